//! Foreground protection (`docs/design/mapreduce.md` §8): one scan-rate limit per node, shared
//! by every task running there, that follows the latency of foreground requests.
//!
//! # Why a feedback loop
//!
//! A fixed rate is wrong both ways: on an idle node it slows jobs for nothing, on a busy one it
//! still takes the cores foreground requests need. So the node measures what it protects: the
//! p99 latency of the commands it answers, in one-second windows ([`Throttle::observe`], fed by
//! the RESP front end). Windows in which no task read anything set the idle baseline (a moving
//! average); in a window with tasks, `s = p99 / idle p99`. Above [`SLOWER_ABOVE`] the rate is
//! halved (from what the tasks actually read in that window, down to [`RATE_FLOOR`]); below
//! [`FASTER_BELOW`] it grows by a tenth (to at most twice what the tasks read); a window with
//! next to no foreground lifts it. Additive increase, multiplicative decrease: TCP's answer to
//! the same question.
//! When tasks have run for a minute with no idle window, they are held for one half-second
//! window so the baseline can be measured again ([`PAUSE`], at most 1 % of their time).
//!
//! Windows with fewer than [`WINDOW_OPS_MIN`] commands say nothing (a quiet node has no
//! foreground to protect). Task threads also run at a lower priority (the node's `job_nice`):
//! the limit handles what niceness cannot, such as the disk and the storage engine's locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Sub-buckets per doubling of the latency histogram: each bucket is within 1/8 (±6 %).
const SUB: usize = 8;
/// Buckets: microseconds 1..8 one each, then 8 per doubling up to 2^26 µs (67 s).
const BUCKETS: usize = SUB + 24 * SUB;
/// A window with fewer commands gives no signal.
pub const WINDOW_OPS_MIN: u64 = 200;
/// `p99 / idle p99` above which the rate halves, and below which it grows: under the 1.25 the
/// limit is for, because the p99 of a longer span is carried by its worst windows.
pub const SLOWER_ABOVE: f64 = 1.15;
pub const FASTER_BELOW: f64 = 1.05;
/// The lowest limit, keys per second per node: jobs always progress.
pub const RATE_FLOOR: u64 = 1_000;
/// How long tasks run without an idle window before they are held for one.
pub const BASELINE_MAX_AGE: Duration = Duration::from_secs(60);
/// How long they are held.
pub const PAUSE: Duration = Duration::from_millis(500);
/// Weight of a new idle window in the baseline.
const BASELINE_WEIGHT: f64 = 0.3;

/// Latencies of one window, lock-free (the front end adds to it on every reply).
struct Window {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Window {
    fn default() -> Window {
        Window {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn bucket_of(took: Duration) -> usize {
    let us = took.as_micros().clamp(1, u64::MAX as u128) as u64;
    let log = 63 - us.leading_zeros() as usize;
    if log < 3 {
        return us as usize;
    }
    let sub = ((us >> (log - 3)) & 7) as usize;
    (SUB + (log - 3) * SUB + sub).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in microseconds.
fn bucket_top_us(i: usize) -> u64 {
    if i < SUB {
        return i as u64 + 1;
    }
    let log = (i - SUB) / SUB + 3;
    let sub = ((i - SUB) % SUB) as u64;
    (8 + sub + 1) << (log - 3)
}

impl Window {
    /// Empties the window: (commands, p99 in µs).
    fn take(&self) -> (u64, u64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let want = total - total / 100;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want && total > 0 {
                return (total, bucket_top_us(i));
            }
        }
        (total, 0)
    }
}

/// The limit's state, changed once per window by [`Throttle::tick`].
#[derive(Debug, Clone)]
struct Limit {
    /// Keys per second for all tasks of the node; `None`: unlimited.
    rate: Option<u64>,
    /// The idle p99 (µs) of each command, and when a baseline was last measured.
    idle_p99_us: HashMap<&'static str, f64>,
    baseline_at: Option<Instant>,
    /// Tasks are held until then (to measure the baseline).
    hold_until: Option<Instant>,
    /// Tokens of the bucket, and when it was last filled.
    tokens: f64,
    filled: Instant,
}

/// What a window showed and what the limit became (for metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub ops: u64,
    pub p99_us: u64,
    /// `p99 / idle p99`, when both were known.
    pub slowdown: Option<f64>,
    pub rate: Option<u64>,
}

/// A node's scan-rate limit.
pub struct Throttle {
    /// A window per command name: a GET and an fsync-bound SET differ tenfold, so one baseline
    /// over their mix would move with the mix. Bounded: the names are the server's own
    /// (static), never a client's text.
    windows: RwLock<HashMap<&'static str, Arc<Window>>>,
    /// Keys tasks read in this window.
    read: AtomicU64,
    limit: Mutex<Limit>,
    /// Whether the limit follows the foreground at all (`false`: tasks are never held).
    enabled: bool,
}

impl Throttle {
    pub fn new(enabled: bool) -> Throttle {
        Throttle {
            windows: RwLock::default(),
            read: AtomicU64::new(0),
            limit: Mutex::new(Limit {
                rate: None,
                idle_p99_us: HashMap::new(),
                baseline_at: None,
                hold_until: None,
                tokens: 0.0,
                filled: Instant::now(),
            }),
            enabled,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limit> {
        self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` foreground commands `command` answered in `took` each.
    pub fn observe(&self, command: &'static str, took: Duration, n: u64) {
        let window = self
            .windows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(command)
            .cloned();
        let window = window.unwrap_or_else(|| {
            self.windows
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(command)
                .or_default()
                .clone()
        });
        window.buckets[bucket_of(took)].fetch_add(n, Ordering::Relaxed);
    }

    /// The current limit (keys/s for the node's tasks together; `None`: none).
    pub fn rate(&self) -> Option<u64> {
        self.lock().rate
    }

    /// Ends a window of `length`: measures it and moves the limit. Called once per window by
    /// the node (every second, or [`PAUSE`] while tasks are held).
    pub fn tick(&self, length: Duration, now: Instant) -> Step {
        let windows: Vec<(&'static str, (u64, u64))> = self
            .windows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, w)| (*name, w.take()))
            .collect();
        let ops: u64 = windows.iter().map(|(_, (n, _))| n).sum();
        let read = self.read.swap(0, Ordering::Relaxed);
        let mut l = self.lock();
        let held = l
            .hold_until
            .is_some_and(|h| h <= now + Duration::from_millis(1));
        // The command slowed the most, of those with enough of a window and a baseline.
        let mut slowdown: Option<f64> = None;
        let mut p99_us = 0;
        if read == 0 || held {
            // No task read: this window is the idle baseline.
            if held {
                // Tried, whatever it found: the next hold is a full age away.
                l.baseline_at = Some(now);
            }
            l.hold_until = None;
            for (name, (n, p99)) in &windows {
                if *n >= WINDOW_OPS_MIN {
                    let p = *p99 as f64;
                    let b = l.idle_p99_us.entry(name).or_insert(p);
                    *b += BASELINE_WEIGHT * (p - *b);
                    l.baseline_at = Some(now);
                }
            }
        } else {
            for (name, (n, p99)) in &windows {
                if let Some(idle) = l.idle_p99_us.get(name).filter(|_| *n >= WINDOW_OPS_MIN) {
                    let s = *p99 as f64 / idle.max(1.0);
                    if slowdown.is_none_or(|m| s > m) {
                        (slowdown, p99_us) = (Some(s), *p99);
                    }
                }
            }
        }
        if let Some(s) = slowdown {
            let measured = (read as f64 / length.as_secs_f64().max(0.001)) as u64;
            if s > SLOWER_ABOVE {
                let from = l.rate.map_or(measured, |r| r.min(measured.max(RATE_FLOOR)));
                l.rate = Some((from / 2).max(RATE_FLOOR));
            } else if s < FASTER_BELOW
                && let Some(r) = l.rate
            {
                // No higher than twice what the tasks read: a limit far above it would let
                // them burst at full speed the moment they could.
                l.rate = Some((r + r / 10).min(measured.saturating_mul(2).max(RATE_FLOOR)));
            }
        } else if ops < WINDOW_OPS_MIN {
            // No foreground to protect: the limit is lifted.
            l.rate = None;
        }
        // Tasks running without an idle window for too long, while there is foreground to
        // protect: hold them for one.
        if read > 0
            && ops >= WINDOW_OPS_MIN
            && self.enabled
            && l.hold_until.is_none()
            && l.baseline_at
                .is_none_or(|at| now.duration_since(at) >= BASELINE_MAX_AGE)
        {
            l.hold_until = Some(now + PAUSE);
        }
        Step {
            ops,
            p99_us,
            slowdown,
            rate: l.rate,
        }
    }

    /// Whether tasks are held for a baseline window now (the node ends that window early).
    pub fn holding(&self) -> bool {
        self.lock().hold_until.is_some()
    }

    /// A task read `keys`: waits (blocking, in slices of at most 100 ms) until the limit lets
    /// them through or `cancelled()` says stop. Answers the milliseconds waited.
    pub fn take(&self, keys: u64, cancelled: impl Fn() -> bool) -> u64 {
        self.read.fetch_add(keys, Ordering::Relaxed);
        if !self.enabled {
            return 0;
        }
        let started = Instant::now();
        let mut need = keys as f64;
        loop {
            let wait = {
                let mut l = self.lock();
                let now = Instant::now();
                if let Some(until) = l.hold_until.filter(|u| *u > now) {
                    until - now
                } else {
                    match l.rate {
                        None => {
                            l.tokens = 0.0;
                            l.filled = now;
                            break;
                        }
                        Some(rate) => {
                            let rate = rate as f64;
                            // At most a second's worth banked: no burst after a quiet spell.
                            l.tokens = (l.tokens
                                + now.duration_since(l.filled).as_secs_f64() * rate)
                                .min(rate);
                            l.filled = now;
                            let got = l.tokens.min(need);
                            l.tokens -= got;
                            need -= got;
                            if need <= 0.0 {
                                break;
                            }
                            Duration::from_secs_f64(need.min(rate) / rate)
                        }
                    }
                }
            };
            if cancelled() {
                break;
            }
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
        started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(t: &Throttle, ops: u64, latency_us: u64) {
        t.observe("GET", Duration::from_micros(latency_us), ops);
    }

    #[test]
    fn each_command_is_judged_against_its_own_baseline() {
        let t = Throttle::new(true);
        let t0 = Instant::now();
        // Idle: GET at 100 µs, SET (it waits for a commit) at 2 ms.
        t.observe("GET", Duration::from_micros(100), 1_000);
        t.observe("SET", Duration::from_micros(2_000), 1_000);
        t.tick(Duration::from_secs(1), t0);
        // With tasks: only GETs, as fast as idle. Against a baseline of the mix they would
        // look 20 times faster; against their own, unchanged.
        t.read.fetch_add(10_000, Ordering::Relaxed);
        t.observe("GET", Duration::from_micros(100), 1_000);
        let s = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(1));
        assert!((s.slowdown.unwrap() - 1.0).abs() < 0.01, "{s:?}");
        // GETs slow down while SETs do not: the worst one counts.
        t.read.fetch_add(10_000, Ordering::Relaxed);
        t.observe("GET", Duration::from_micros(300), 1_000);
        t.observe("SET", Duration::from_micros(2_000), 1_000);
        let s = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(2));
        assert!(s.slowdown.unwrap() > 2.5, "{s:?}");
        assert_eq!(s.rate, Some(5_000));
    }

    #[test]
    fn buckets_are_within_an_eighth_and_ordered() {
        let mut last = 0;
        for us in [1u64, 2, 7, 8, 9, 15, 16, 100, 1_000, 123_456, 10_000_000] {
            let i = bucket_of(Duration::from_micros(us));
            assert!(i >= last);
            last = i;
            let top = bucket_top_us(i);
            assert!(
                top >= us && (top as f64) <= us as f64 * 1.13 + 1.0,
                "{us} -> {top}"
            );
        }
    }

    #[test]
    fn a_slow_foreground_halves_the_rate_a_fast_one_raises_it_and_then_lifts_it() {
        let t = Throttle::new(true);
        let t0 = Instant::now();
        // Idle: 1,000 commands at 100 µs.
        window(&t, 1_000, 100);
        let idle = t.tick(Duration::from_secs(1), t0);
        assert_eq!(idle.rate, None);
        // Tasks read 100 k keys while commands took 300 µs: halved from what they read.
        t.take(100_000, || false);
        window(&t, 1_000, 300);
        let s = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(1));
        assert!(s.slowdown.unwrap() > SLOWER_ABOVE);
        assert_eq!(s.rate, Some(50_000));
        // Slow again: halved again, never under the floor.
        t.read.fetch_add(50_000, Ordering::Relaxed);
        window(&t, 1_000, 300);
        assert_eq!(
            t.tick(Duration::from_secs(1), t0 + Duration::from_secs(2))
                .rate,
            Some(25_000)
        );
        for i in 0..20 {
            t.read.fetch_add(1_000, Ordering::Relaxed);
            window(&t, 1_000, 300);
            t.tick(Duration::from_secs(1), t0 + Duration::from_secs(3 + i));
        }
        assert_eq!(t.rate(), Some(RATE_FLOOR));
        // Fast: +10 % per window while the tasks use it.
        t.read.fetch_add(1_000, Ordering::Relaxed);
        window(&t, 1_000, 100);
        let up = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(30));
        assert_eq!(up.rate, Some(1_100));
        // Never past twice what the tasks read (nor under the floor).
        for i in 0..40 {
            t.read.fetch_add(1_500, Ordering::Relaxed);
            window(&t, 1_000, 100);
            t.tick(Duration::from_secs(1), t0 + Duration::from_secs(31 + i));
        }
        assert_eq!(t.rate(), Some(3_000));
        // No foreground to protect: lifted.
        t.read.fetch_add(1_500, Ordering::Relaxed);
        window(&t, 10, 100);
        assert_eq!(
            t.tick(Duration::from_secs(1), t0 + Duration::from_secs(80))
                .rate,
            None
        );
    }

    #[test]
    fn quiet_windows_say_nothing_and_a_stale_baseline_holds_tasks_for_one_window() {
        let t = Throttle::new(true);
        let t0 = Instant::now();
        // Tasks from the start with foreground and no baseline: held for one window to measure it.
        t.read.fetch_add(10_000, Ordering::Relaxed);
        window(&t, 500, 5_000);
        let s = t.tick(Duration::from_secs(1), t0);
        assert_eq!((s.slowdown, s.rate), (None, None));
        assert!(t.holding());
        // The held window (no task read) is the baseline.
        window(&t, 500, 100);
        t.tick(PAUSE, t0 + PAUSE);
        assert!(!t.holding());
        t.read.fetch_add(10_000, Ordering::Relaxed);
        window(&t, 500, 101);
        let s = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(2));
        assert!(s.slowdown.is_some_and(|s| s < FASTER_BELOW), "{s:?}");
        // A minute later with tasks all along: held again.
        t.read.fetch_add(10_000, Ordering::Relaxed);
        window(&t, 500, 101);
        t.tick(Duration::from_secs(1), t0 + Duration::from_secs(70));
        assert!(t.holding());
    }

    #[test]
    fn without_foreground_tasks_are_never_held() {
        let t = Throttle::new(true);
        let t0 = Instant::now();
        for i in 0..200 {
            t.read.fetch_add(100_000, Ordering::Relaxed);
            window(&t, 10, 100);
            let s = t.tick(Duration::from_secs(1), t0 + Duration::from_secs(i));
            assert!(!t.holding() && s.rate.is_none(), "window {i}: {s:?}");
        }
    }

    #[test]
    fn take_waits_for_tokens_and_hears_a_cancel() {
        let t = Throttle::new(true);
        t.lock().rate = Some(10_000);
        let waited = t.take(2_000, || false);
        assert!(
            waited >= 150,
            "2,000 keys at 10 k/s wait about 200 ms, not {waited}"
        );
        // A cancel ends the wait within a slice.
        t.lock().rate = Some(RATE_FLOOR);
        let started = Instant::now();
        // (Without the cancel this would wait 1,000 s.)
        t.take(1_000_000, || started.elapsed() > Duration::from_millis(150));
        // Disabled: never waits.
        let off = Throttle::new(false);
        off.lock().rate = Some(1);
        assert_eq!(off.take(1_000_000, || false), 0);
    }
}
