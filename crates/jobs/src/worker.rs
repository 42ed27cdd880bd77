//! Running one task: the keys of its range, a page at a time from the pinned snapshot,
//! through the job's plan into one partial result, which alone leaves the node.
//!
//! Blocking (it reads storage and computes): the node runs it on a thread that may block,
//! never on the async runtime's workers.
//!
//! # Heartbeats and cancels
//!
//! A running attempt is registered in its node's [`Attempts`]: the coordinator's heartbeat
//! reads its [`Progress`] (keys scanned, whether it waits on its rate limit), and a cancel
//! sets its flag, heard between pages and between Lua calls. A registry entry outlives its
//! attempt by [`ENDED_KEPT`], so a heartbeat that crosses the attempt's output on the wire
//! hears "ended", not "unknown".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_reduce::{JobSpec, Plan};
use capdb_types::jobs::{PARTIAL_CHUNK_MAX, PARTIAL_CHUNKS_MAX};

use crate::{TaskError, TaskOrder, TaskOutput};

/// Keys a worker asks for per page.
pub const PAGE_KEYS: usize = 4_096;

/// One page of a task's range: string keys and their values, and where the next page starts
/// (`None`: the range is done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<(Bytes, Bytes)>,
    pub next: Option<Bytes>,
}

/// Most attempts a node's registry holds, running and recently ended together. Coordinators
/// place at most `slots_per_node` attempts per node each; past the bound a start is refused
/// (the coordinator places the task elsewhere), never grown.
pub const ATTEMPTS_MAX: usize = 1_024;
/// How long an ended attempt stays known to heartbeats.
pub const ENDED_KEPT: Duration = Duration::from_secs(30);

/// What a running attempt shows: its progress, and whether it was asked to stop.
#[derive(Debug, Default)]
pub struct Progress {
    keys: AtomicU64,
    throttled_ms: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    /// Keys read so far.
    pub fn keys(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    /// Milliseconds it has waited on its scan-rate limit (slow on purpose, not stuck).
    pub fn throttled_ms(&self) -> u64 {
        self.throttled_ms.load(Ordering::Relaxed)
    }

    /// Asks it to stop (heard within a page, or within one Lua call).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// Which attempt: the job's pin owner (`TaskOrder::job`), the task, the attempt.
pub type AttemptKey = (Bytes, u32, u16);

/// What a node says of an attempt when a heartbeat asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    Running {
        keys: u64,
        throttled_ms: u64,
    },
    /// It ended within [`ENDED_KEPT`]: its output (or error) is on its way to the caller.
    Ended,
    /// Not known here: never started (or not yet), or the node restarted since.
    Unknown,
}

enum Entry {
    Running(Arc<Progress>),
    Ended(Instant),
}

/// The attempts running on one node (bounded by [`ATTEMPTS_MAX`]).
#[derive(Default)]
pub struct Attempts {
    entries: Mutex<HashMap<AttemptKey, Entry>>,
}

/// A registered attempt; marks it ended when dropped, however the attempt ends.
pub struct Registered {
    attempts: Arc<Attempts>,
    key: AttemptKey,
    pub progress: Arc<Progress>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.attempts
            .lock()
            .insert(self.key.clone(), Entry::Ended(Instant::now()));
    }
}

impl Attempts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an attempt about to run. Refused when the same attempt runs here already (a
    /// repeated order) or the registry is full of running attempts.
    pub fn start(self: &Arc<Self>, key: AttemptKey) -> Result<Registered, TaskError> {
        let mut entries = self.lock();
        if matches!(entries.get(&key), Some(Entry::Running(_))) {
            return Err(TaskError::Failed(
                "this attempt is running here already".into(),
            ));
        }
        if entries.len() >= ATTEMPTS_MAX {
            entries.retain(|_, e| {
                matches!(e, Entry::Ended(at) if at.elapsed() < ENDED_KEPT)
                    || matches!(e, Entry::Running(_))
            });
        }
        if entries.len() >= ATTEMPTS_MAX {
            // Forget the oldest ended attempt, if any: a heartbeat then hears "unknown" (the
            // coordinator waits for the output it is owed before judging it lost).
            let oldest = entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Ended(at) => Some((*at, k.clone())),
                    Entry::Running(_) => None,
                })
                .min();
            match oldest {
                Some((_, k)) => {
                    entries.remove(&k);
                }
                None => {
                    return Err(TaskError::Failed(format!(
                        "this node runs {ATTEMPTS_MAX} attempts already"
                    )));
                }
            }
        }
        let progress = Arc::new(Progress::default());
        entries.insert(key.clone(), Entry::Running(progress.clone()));
        Ok(Registered {
            attempts: self.clone(),
            key,
            progress,
        })
    }

    /// What a heartbeat hears of `key`.
    pub fn probe(&self, key: &AttemptKey) -> Probe {
        match self.lock().get(key) {
            Some(Entry::Running(p)) => Probe::Running {
                keys: p.keys(),
                throttled_ms: p.throttled_ms(),
            },
            Some(Entry::Ended(at)) if at.elapsed() < ENDED_KEPT => Probe::Ended,
            _ => Probe::Unknown,
        }
    }

    /// Asks `key` to stop; whether it was running here.
    pub fn cancel(&self, key: &AttemptKey) -> bool {
        match self.lock().get(key) {
            Some(Entry::Running(p)) => {
                p.cancel();
                true
            }
            _ => false,
        }
    }

    /// Whether running attempt `key` was asked to stop.
    pub fn was_cancelled(&self, key: &AttemptKey) -> bool {
        matches!(self.lock().get(key), Some(Entry::Running(p)) if p.is_cancelled())
    }

    /// Attempts running here now.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| matches!(e, Entry::Running(_)))
            .count()
    }
}

/// Runs `order`: `page(after)` reads the page after `after` (`None`: from the range's start)
/// from the pin; `progress` shows how far it got and carries a cancel, heard between pages;
/// `node_limit`, the node's scan-rate limit, is taken for every page read. A page that cannot
/// be read fails the attempt (another replica may hold the pin); a limit of the spec fails the
/// job.
pub fn run(
    order: &TaskOrder,
    mut page: impl FnMut(Option<&[u8]>) -> Result<Page, String>,
    progress: &Progress,
    node_limit: Option<&crate::throttle::Throttle>,
) -> Result<TaskOutput, TaskError> {
    let cancelled = &progress.cancelled;
    let spec = JobSpec::parse(order.spec.as_bytes())
        .map_err(|e| TaskError::User(format!("the job's spec: {e}")))?;
    // `limits.scan_keys_per_s`, per task (a node-wide limit driven by foreground latency is
    // the design's next step): after each page the task sleeps until it is within the rate.
    let rate = spec.limits.scan_keys_per_s;
    let max_run = std::time::Duration::from_secs(spec.limits.max_s);
    // A Lua map: one VM for the task, the source compiled once.
    let mut lua = match &spec.lua {
        Some(map) => Some(
            crate::lua::LuaMapper::new(map, spec.values.keys().cloned().collect())
                .map_err(TaskError::User)?,
        ),
        None => None,
    };
    let plan = Plan::new(spec).map_err(|e| TaskError::User(e.to_string()))?;
    let mut partial = plan.partial();
    let mut after: Option<Bytes> = None;
    let started = std::time::Instant::now();
    let mut read: u64 = 0;
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(TaskError::Failed("the attempt was cancelled".into()));
        }
        let p = page(after.as_deref()).map_err(TaskError::Failed)?;
        let read_before = read;
        read += p.entries.len() as u64;
        if let Some(limit) = node_limit {
            let waited = limit.take(p.entries.len() as u64, || progress.is_cancelled());
            progress.throttled_ms.fetch_add(waited, Ordering::Relaxed);
            if progress.is_cancelled() {
                return Err(TaskError::Failed("the attempt was cancelled".into()));
            }
        }
        if let Some(rate) = rate {
            let due = std::time::Duration::from_secs_f64(read as f64 / rate as f64);
            // In slices, so that a cancel is heard within one.
            while let Some(ahead) = due.checked_sub(started.elapsed()) {
                if cancelled.load(Ordering::Relaxed) {
                    return Err(TaskError::Failed("the attempt was cancelled".into()));
                }
                let nap = ahead.min(std::time::Duration::from_millis(100));
                std::thread::sleep(nap);
                progress
                    .throttled_ms
                    .fetch_add(nap.as_millis() as u64, Ordering::Relaxed);
            }
        }
        let at = |key: &[u8], e: String| {
            TaskError::User(format!("key {:?}: {e}", String::from_utf8_lossy(key)))
        };
        for (i, (key, value)) in p.entries.iter().enumerate() {
            match lua.as_mut() {
                None => plan
                    .add(&mut partial, key, value)
                    .map_err(|e| at(key, e.to_string()))?,
                Some(m) => {
                    // A Lua call may take up to a second: a page of them, an hour. Between
                    // keys, the attempt hears a cancel and the job's own time limit.
                    if cancelled.load(Ordering::Relaxed) {
                        return Err(TaskError::Failed("the attempt was cancelled".into()));
                    }
                    if started.elapsed() > max_run {
                        return Err(TaskError::User(format!(
                            "limits.max_s: the task ran past {} s",
                            max_run.as_secs()
                        )));
                    }
                    // A Lua page takes long: progress by the key, so it does not look stuck.
                    progress
                        .keys
                        .store(read_before + i as u64, Ordering::Relaxed);
                    if !plan.read_key(&mut partial, key, value) {
                        continue;
                    }
                    // A user-code error fails the job at once, naming the key.
                    for (group, numbers, rounded) in m.call(key, value).map_err(|e| at(key, e))? {
                        plan.add_emit(&mut partial, &group, &numbers, rounded)
                            .map_err(|e| at(key, e.to_string()))?;
                    }
                }
            }
        }
        progress.keys.store(read, Ordering::Relaxed);
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let keys = partial.keys;
    let bytes = partial.encode();
    let most = PARTIAL_CHUNK_MAX * PARTIAL_CHUNKS_MAX as usize;
    if bytes.len() > most {
        return Err(TaskError::User(format!(
            "a task's partial result is {} bytes, over the {most} a task may send: fewer groups (limits.groups_max) or a narrower input",
            bytes.len()
        )));
    }
    Ok(TaskOutput {
        keys,
        partial: Bytes::from(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(task: u32) -> AttemptKey {
        (Bytes::from_static(b"job@1"), task, 1)
    }

    #[test]
    fn a_registered_attempt_answers_heartbeats_hears_a_cancel_and_is_known_ended_after() {
        let attempts = Arc::new(Attempts::default());
        assert_eq!(attempts.probe(&key(0)), Probe::Unknown);
        let running = attempts.start(key(0)).unwrap();
        running.progress.keys.store(42, Ordering::Relaxed);
        assert_eq!(
            attempts.probe(&key(0)),
            Probe::Running {
                keys: 42,
                throttled_ms: 0
            }
        );
        // The same attempt twice is refused; another runs beside it.
        assert!(attempts.start(key(0)).is_err());
        let other = attempts.start(key(1)).unwrap();
        assert_eq!(attempts.running(), 2);
        assert!(attempts.cancel(&key(0)));
        assert!(running.progress.is_cancelled() && attempts.was_cancelled(&key(0)));
        assert!(!other.progress.is_cancelled());
        drop(running);
        assert_eq!(attempts.probe(&key(0)), Probe::Ended);
        assert!(!attempts.cancel(&key(0)), "an ended attempt is not running");
        assert_eq!(attempts.running(), 1);
    }

    #[test]
    fn the_registry_is_bounded_forgetting_ended_attempts_first() {
        let attempts = Arc::new(Attempts::default());
        let mut running = Vec::new();
        for t in 0..ATTEMPTS_MAX as u32 - 1 {
            running.push(attempts.start(key(t)).unwrap());
        }
        // One ended entry fills the registry; the next start forgets it.
        drop(attempts.start(key(u32::MAX)).unwrap());
        running.push(attempts.start(key(1_000_000)).unwrap());
        assert_eq!(attempts.probe(&key(u32::MAX)), Probe::Unknown);
        // Full of running attempts: refused, not grown.
        let refused = attempts.start(key(2_000_000));
        assert!(matches!(refused, Err(TaskError::Failed(m)) if m.contains("attempts already")));
        assert_eq!(attempts.running(), ATTEMPTS_MAX);
    }

    #[test]
    fn a_cancelled_run_stops_at_its_next_page() {
        let order = TaskOrder {
            job: Bytes::from_static(b"job@1"),
            task: 0,
            attempt: 1,
            spec: r#"{"id":"w","input":{"keyspace":"k"},"map":{"group":{"key":true}},"reduce":{"n":"count"}}"#.into(),
            shard: 1,
            pin_index: 1,
            from: None,
            to: None,
        };
        let progress = Progress::default();
        let mut pages = 0;
        let out = run(
            &order,
            |_| {
                pages += 1;
                if pages == 2 {
                    progress.cancel();
                }
                Ok(Page {
                    entries: vec![(Bytes::from(format!("k{pages}")), Bytes::from_static(b"v"))],
                    next: Some(Bytes::from(format!("k{pages}"))),
                })
            },
            &progress,
            None,
        );
        assert_eq!(
            out,
            Err(TaskError::Failed("the attempt was cancelled".into()))
        );
        assert_eq!(pages, 2);
        assert_eq!(progress.keys(), 2);
    }
}
