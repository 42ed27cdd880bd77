//! Rate limiting of repeated log lines, so a fault cannot drown the log.
//!
//! An unreachable peer makes openraft log `HeartbeatWorker(id=2, target=3) failed to send a
//! heartbeat: …` at WARN on every heartbeat of every Raft group the node leads (60 ms), and once
//! more for every ReadIndex round of linearizable reads, because each round is a heartbeat. One
//! dead replica of three under read load measured 200-650 such lines a second on the shard
//! leader (debug build, loopback), and the useful lines around the fault scroll away.
//!
//! [`RateLimit`] is a `tracing_subscriber` layer that sits after the `CAPDB_LOG` filter and
//! decides, per event, whether it is written:
//!
//! - INFO, WARN and ERROR events are counted per *message*: the event's callsite (the macro call
//!   in the source) plus a fingerprint of its text and fields, so `target=3` and `target=1`
//!   are different messages and one flapping peer cannot hide another. DEBUG and TRACE are never
//!   limited: whoever turns them on asked for everything.
//! - The first [`BURST`] events of a message in a callsite's [`WINDOW`] are written; the rest of
//!   that window is suppressed and counted.
//! - When a window with suppressed events ends, the reporter thread writes one line at the same
//!   level: `suppressed 1151 similar lines from openraft::core::heartbeat::worker
//!   (openraft-0.10.0-alpha.37/src/core/heartbeat/worker.rs:145) in the last 10 s`, so an
//!   operator still sees that it goes on, and how fast. At shutdown the open windows are
//!   reported too ([`RateLimit::flush_all`]).
//!
//! A steady flood therefore costs `BURST` lines plus one summary per message per 10 s.
//! `CAPDB_LOG_RATE_LIMIT=off` turns the layer off (every line is written, as before).
//!
//! # Bounds
//!
//! Memory: one entry per callsite that logged in its current window (callsites are the static
//! macro calls compiled into the binary, so their number is fixed), each holding at most
//! [`MESSAGES_PER_CALLSITE_MAX`] message fingerprints with their counters (24 bytes each), so
//! well under a kilobyte per callsite. Further distinct messages of the same callsite within the
//! window (say, an error text with a changing number in it) share one extra budget of `BURST`.
//! An entry is dropped once its window ended and was reported. Time: one hash of the event's
//! fields and one short critical section per INFO-or-worse event that passed `CAPDB_LOG`.
//!
//! # Re-entrancy
//!
//! The filter callback never logs: it hashes the event's fields (before taking the lock, so a
//! field's `Debug` that logs cannot deadlock) and updates counters. Summaries are collected under
//! the lock by [`RateLimit::flush`] and logged after it is released, by the reporter thread
//! ([`RateLimit::spawn_reporter`]). Summaries use the target [`SUMMARY_TARGET`], which the
//! layer always lets through, so they are never themselves suppressed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber, callsite};
use tracing_subscriber::layer::{Context, Layer};

/// Length of a callsite's counting window, and the period summaries cover.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Events of one message written per window; the rest are suppressed and counted.
pub const BURST: u32 = 5;

/// Distinct messages (fingerprints) tracked per callsite and window; more share one budget.
pub const MESSAGES_PER_CALLSITE_MAX: usize = 8;

/// How often the reporter thread looks for ended windows (a summary is at most this late).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The target of summary lines; events with it are never limited.
pub const SUMMARY_TARGET: &str = "capdb::log_limit";

/// The time source: `Instant::now` in the server, a hand-moved clock in tests.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Whether `CAPDB_LOG_RATE_LIMIT` (the value of the variable, if set) leaves the limiter on.
pub fn enabled_by_env(value: Option<&str>) -> bool {
    !matches!(value.map(str::trim), Some("off" | "0" | "false" | "no"))
}

/// The layer. Clones share their counters.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<Mutex<Limiter>>,
    clock: Clock,
}

impl RateLimit {
    /// A limiter on the real clock with the documented [`WINDOW`] and [`BURST`].
    pub fn new() -> RateLimit {
        RateLimit::with_clock(WINDOW, BURST, Arc::new(Instant::now))
    }

    pub fn with_clock(window: Duration, burst: u32, clock: Clock) -> RateLimit {
        assert!(window > Duration::ZERO, "a zero window would limit nothing");
        assert!(burst > 0, "a zero burst would write nothing");
        RateLimit {
            limiter: Arc::new(Mutex::new(Limiter::new(window, burst))),
            clock,
        }
    }

    /// Takes the summaries of every window that has ended, by target. Logs nothing.
    pub fn flush(&self) -> Vec<Summary> {
        let now = (self.clock)();
        self.lock().flush(now, false)
    }

    /// Ends every window now, even unfinished ones, and takes the summaries: for shutdown, so
    /// the log's last lines do not hide a flood that was still going on.
    pub fn flush_all(&self) -> Vec<Summary> {
        let now = (self.clock)();
        self.lock().flush(now, true)
    }

    /// Starts the thread that logs summaries every [`REPORT_INTERVAL`], for the process's life.
    /// A plain thread rather than a task: it must keep reporting while the runtime is busy.
    pub fn spawn_reporter(&self) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("log-limit".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(REPORT_INTERVAL);
                    for summary in this.flush() {
                        summary.log();
                    }
                }
            })
            .map(drop)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        // Counters stay meaningful after a panic elsewhere; never turn logging into a panic.
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: Subscriber> Layer<S> for RateLimit {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::INFO || meta.target() == SUMMARY_TARGET {
            return true;
        }
        // Hashed before the lock is taken: a field's Debug may itself log.
        let fingerprint = fingerprint(event);
        let now = (self.clock)();
        self.lock().admit(meta, fingerprint, now)
    }
}

/// What a reporter logs for one callsite: how many lines were suppressed over which period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub meta: &'static Metadata<'static>,
    pub suppressed: u64,
    /// Distinct messages among the suppressed lines (counting the shared overflow as one).
    pub messages: usize,
    pub period: Duration,
}

impl Summary {
    pub fn text(&self) -> String {
        let mut s = format!(
            "suppressed {} similar lines from {} ({}:{}) in the last {} s",
            self.suppressed,
            self.meta.target(),
            short_file(self.meta.file().unwrap_or("?")),
            self.meta.line().unwrap_or(0),
            self.period.as_secs_f64().round(),
        );
        if self.messages > 1 {
            let _ = write!(s, " ({} distinct messages)", self.messages);
        }
        s
    }

    /// Logs the summary at the level of the lines it stands for.
    pub fn log(&self) {
        let text = self.text();
        match *self.meta.level() {
            Level::ERROR => tracing::error!(target: SUMMARY_TARGET, "{text}"),
            Level::WARN => tracing::warn!(target: SUMMARY_TARGET, "{text}"),
            _ => tracing::info!(target: SUMMARY_TARGET, "{text}"),
        }
    }
}

/// The counting, with time passed in (no clock, no I/O, no logging).
struct Limiter {
    window: Duration,
    burst: u32,
    callsites: HashMap<callsite::Identifier, CallsiteWindow>,
}

struct CallsiteWindow {
    meta: &'static Metadata<'static>,
    start: Instant,
    /// At most `MESSAGES_PER_CALLSITE_MAX` entries.
    messages: Vec<(u64, Count)>,
    /// Messages beyond the cap share this budget.
    overflow: Count,
    /// Suppressed lines of ended windows not yet taken by `flush`.
    unreported: Option<Summary>,
}

#[derive(Default, Clone, Copy)]
struct Count {
    written: u32,
    suppressed: u64,
}

impl Count {
    fn admit(&mut self, burst: u32) -> bool {
        if self.written < burst {
            self.written += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl CallsiteWindow {
    fn new(meta: &'static Metadata<'static>, start: Instant) -> CallsiteWindow {
        CallsiteWindow {
            meta,
            start,
            messages: Vec::new(),
            overflow: Count::default(),
            unreported: None,
        }
    }

    /// Ends the window if `now` is past it (or at once, with `early`): its suppressed lines
    /// join `unreported`, and counting starts afresh.
    fn roll(&mut self, now: Instant, window: Duration, early: bool) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed < window && !early {
            return;
        }
        let counts = self.messages.iter().map(|(_, c)| c).chain([&self.overflow]);
        let (suppressed, messages) = counts
            .filter(|c| c.suppressed > 0)
            .fold((0, 0), |(n, m), c| (n + c.suppressed, m + 1));
        if suppressed > 0 {
            let s = self.unreported.get_or_insert(Summary {
                meta: self.meta,
                suppressed: 0,
                messages: 0,
                period: Duration::ZERO,
            });
            s.suppressed += suppressed;
            s.messages = s.messages.max(messages);
            s.period += elapsed.min(window);
        }
        self.start = now;
        self.messages.clear();
        self.overflow = Count::default();
    }

    fn is_idle(&self) -> bool {
        self.unreported.is_none() && self.messages.is_empty() && self.overflow.written == 0
    }
}

impl Limiter {
    fn new(window: Duration, burst: u32) -> Limiter {
        Limiter {
            window,
            burst,
            callsites: HashMap::new(),
        }
    }

    /// Whether an event of `meta` whose text and fields hash to `fingerprint` is written.
    fn admit(&mut self, meta: &'static Metadata<'static>, fingerprint: u64, now: Instant) -> bool {
        let (window, burst) = (self.window, self.burst);
        let cw = self
            .callsites
            .entry(meta.callsite())
            .or_insert_with(|| CallsiteWindow::new(meta, now));
        cw.roll(now, window, false);
        if let Some((_, count)) = cw.messages.iter_mut().find(|(f, _)| *f == fingerprint) {
            return count.admit(burst);
        }
        if cw.messages.len() < MESSAGES_PER_CALLSITE_MAX {
            let mut count = Count::default();
            let written = count.admit(burst);
            cw.messages.push((fingerprint, count));
            return written;
        }
        cw.overflow.admit(burst)
    }

    /// Rolls every ended window (every window, with `early`) and takes the summaries; forgets
    /// callsites gone quiet.
    fn flush(&mut self, now: Instant, early: bool) -> Vec<Summary> {
        let window = self.window;
        let mut out = Vec::new();
        self.callsites.retain(|_, cw| {
            cw.roll(now, window, early);
            out.extend(cw.unreported.take());
            !cw.is_idle()
        });
        out.sort_by_key(|s| (s.meta.target(), s.meta.line()));
        out
    }
}

/// A dependency's source path from its crate directory on
/// (`openraft-0.10.0-alpha.37/src/core/heartbeat/worker.rs`, not the cargo registry's full path).
fn short_file(path: &str) -> &str {
    const REGISTRY: &str = "/registry/src/";
    match path.find(REGISTRY) {
        // Skip the index directory (`index.crates.io-…/`) too.
        Some(i) => {
            let rest = &path[i + REGISTRY.len()..];
            rest.split_once('/')
                .map_or(rest, |(_, crate_path)| crate_path)
        }
        None => path,
    }
}

/// A hash of the event's message and fields, names and values.
fn fingerprint(event: &Event<'_>) -> u64 {
    struct Fields(DefaultHasher);
    impl std::fmt::Write for Fields {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.write(field.name().as_bytes());
            let _ = write!(self, "={value:?};");
        }
    }
    let mut fields = Fields(DefaultHasher::new());
    event.record(&mut fields);
    fields.0.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tracing_subscriber::layer::SubscriberExt;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct ManualClock(Arc<Mutex<Instant>>);

    impl ManualClock {
        fn new() -> ManualClock {
            ManualClock(Arc::new(Mutex::new(Instant::now())))
        }
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
        fn clock(&self) -> Clock {
            let t = self.0.clone();
            Arc::new(move || *t.lock().unwrap())
        }
    }

    /// The log lines a `fmt` layer wrote.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// The subscriber `capdb server` builds, writing to `lines`, on a manual clock.
    fn subscriber(
        clock: &ManualClock,
        lines: &Lines,
    ) -> (Box<dyn Subscriber + Send + Sync>, RateLimit) {
        let limit = RateLimit::with_clock(WINDOW, BURST, clock.clock());
        let lines = lines.clone();
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(limit.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || lines.clone()),
            );
        (Box::new(sub), limit)
    }

    fn heartbeat_failed(target: u64) {
        tracing::warn!("HeartbeatWorker(id=2, target={target}) failed to send a heartbeat");
    }

    fn meta_of_heartbeat_failed() -> &'static Metadata<'static> {
        // Any static metadata does for the pure limiter; take one from a real callsite.
        struct Grab(Mutex<Option<&'static Metadata<'static>>>);
        impl Subscriber for Grab {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, e: &Event<'_>) {
                *self.0.lock().unwrap() = Some(e.metadata());
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let grab = Arc::new(Grab(Mutex::new(None)));
        tracing::subscriber::with_default(grab.clone(), || heartbeat_failed(3));
        let meta = *grab.0.lock().unwrap();
        meta.expect("event seen")
    }

    #[test]
    fn writes_a_burst_per_window_then_counts() {
        let meta = meta_of_heartbeat_failed();
        let t0 = Instant::now();
        let mut l = Limiter::new(WINDOW, BURST);
        let written = (0..1000)
            .filter(|i| l.admit(meta, 7, t0 + Duration::from_millis(*i)))
            .count();
        assert_eq!(written, BURST as usize);
        // Nothing to report while the window is open.
        assert_eq!(
            l.flush(t0 + WINDOW - Duration::from_millis(1), false),
            vec![]
        );
        let summaries = l.flush(t0 + WINDOW, false);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].suppressed, 1000 - BURST as u64);
        assert_eq!(summaries[0].messages, 1);
        assert_eq!(summaries[0].period, WINDOW);
        // Reported once; the next window starts with a fresh burst.
        assert_eq!(l.flush(t0 + WINDOW + Duration::from_secs(1), false), vec![]);
        let t1 = t0 + WINDOW + Duration::from_secs(2);
        assert!(l.admit(meta, 7, t1));
        // After a quiet window the callsite is forgotten.
        assert_eq!(l.flush(t1 + WINDOW, false), vec![]);
        assert!(l.callsites.is_empty());
    }

    #[test]
    fn distinct_messages_have_their_own_budget_up_to_the_cap() {
        let meta = meta_of_heartbeat_failed();
        let t0 = Instant::now();
        let mut l = Limiter::new(WINDOW, BURST);
        // Two peers down: each gets its burst.
        for peer in [1, 3] {
            let written = (0..100).filter(|_| l.admit(meta, peer, t0)).count();
            assert_eq!(written, BURST as usize, "peer {peer}");
        }
        // Beyond the cap, new messages share one budget.
        let cap = MESSAGES_PER_CALLSITE_MAX as u64;
        for f in 100..100 + cap - 2 {
            assert!(l.admit(meta, f, t0));
        }
        assert_eq!(l.callsites[&meta.callsite()].messages.len(), cap as usize);
        let written = (1000..1100).filter(|f| l.admit(meta, *f, t0)).count();
        assert_eq!(written, BURST as usize);
        assert_eq!(l.callsites[&meta.callsite()].messages.len(), cap as usize);
        let s = l.flush(t0 + WINDOW, false);
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].suppressed,
            2 * (100 - BURST as u64) + (100 - BURST as u64)
        );
        assert_eq!(s[0].messages, 3);
    }

    #[test]
    fn unreported_windows_accumulate_until_flushed() {
        let meta = meta_of_heartbeat_failed();
        let t0 = Instant::now();
        let mut l = Limiter::new(WINDOW, BURST);
        for w in 0..3u32 {
            let start = t0 + WINDOW * w;
            let written = (0..10).filter(|_| l.admit(meta, 1, start)).count();
            assert_eq!(written, BURST as usize, "window {w}");
        }
        let s = l.flush(t0 + WINDOW * 3, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suppressed, 3 * (10 - BURST as u64));
        assert_eq!(s[0].period, WINDOW * 3);
        assert_eq!(l.callsites.len(), 0);
    }

    #[test]
    fn shutdown_reports_the_open_window() {
        let meta = meta_of_heartbeat_failed();
        let t0 = Instant::now();
        let mut l = Limiter::new(WINDOW, BURST);
        let written = (0..50).filter(|_| l.admit(meta, 1, t0)).count();
        assert_eq!(written, BURST as usize);
        let end = t0 + Duration::from_secs(3);
        assert_eq!(l.flush(end, false), vec![]);
        let s = l.flush(end, true);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suppressed, 50 - BURST as u64);
        assert_eq!(s[0].period, Duration::from_secs(3));
        assert!(l.callsites.is_empty() || l.flush(end + WINDOW, true).is_empty());
    }

    #[test]
    fn dependency_paths_are_shortened() {
        assert_eq!(
            short_file(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/openraft-0.10.0-alpha.37/src/core/heartbeat/worker.rs"
            ),
            "openraft-0.10.0-alpha.37/src/core/heartbeat/worker.rs"
        );
        assert_eq!(
            short_file("crates/raft/src/groups/route.rs"),
            "crates/raft/src/groups/route.rs"
        );
    }

    #[test]
    fn env_switch() {
        assert!(enabled_by_env(None));
        assert!(enabled_by_env(Some("on")));
        assert!(!enabled_by_env(Some("off")));
        assert!(!enabled_by_env(Some(" 0 ")));
    }

    /// End to end through `fmt`: a heartbeat flood from one dead peer becomes BURST lines and a
    /// summary; a second peer's first lines and other lines still get through.
    #[test]
    fn a_flood_becomes_a_burst_and_a_summary_line() {
        let clock = ManualClock::new();
        let lines = Lines::default();
        let (sub, limit) = subscriber(&clock, &lines);
        tracing::subscriber::with_default(sub, || {
            for _ in 0..20_000 {
                heartbeat_failed(3);
                clock.advance(Duration::from_micros(300)); // 6 s in all
            }
            heartbeat_failed(1);
            tracing::info!("a different line");
            assert_eq!(limit.flush(), vec![], "the window is still open");
            let written = lines.take();
            assert_eq!(written.len(), BURST as usize + 2, "{written:#?}");
            assert!(written[0].contains("target=3) failed to send a heartbeat"));
            assert!(written[BURST as usize].contains("target=1)"));

            clock.advance(WINDOW);
            for s in limit.flush() {
                s.log();
            }
            let written = lines.take();
            assert_eq!(written.len(), 1, "{written:#?}");
            let expected = format!(
                "suppressed {} similar lines from capdb::log_limit::tests (crates/cli/src/log_limit.rs:",
                20_000 - BURST
            );
            assert!(written[0].contains(" WARN "), "{}", written[0]);
            assert!(written[0].contains(&expected), "{}", written[0]);
            assert!(written[0].ends_with("in the last 10 s"), "{}", written[0]);
        });
    }
}
