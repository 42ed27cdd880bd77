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
//!
//! # Checkpoints
//!
//! Every [`TaskOrder::checkpoint_every_ms`], between pages, an attempt whose partial result is
//! at most [`CHECKPOINT_MAX`] keeps a [`Checkpoint`]: where the next page starts, the keys read
//! so far and the partial result of exactly those keys. Heartbeats show how far the newest
//! reaches; the coordinator fetches it and gives it to the task's next attempt (a retry on
//! another replica, a speculative copy), which starts there instead of at the range's start.
//! Every replica's pin holds the same snapshot, so the rest of the range read anywhere
//! completes the same answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_reduce::{JobSpec, Merged, Partial, Plan};
use capdb_types::jobs::{PARTIAL_CHUNK_MAX, PARTIAL_CHUNKS_MAX};

use crate::{TaskError, TaskOrder, TaskOutput};

/// Keys a worker asks for per page.
pub const PAGE_KEYS: usize = 4_096;

/// Groups a task's table holds before they are moved out as a sorted run
/// ([`Plan::spill`]): about 2 MB of table, which stays in the processor's caches.
pub const TABLE_GROUPS_MAX: usize = 16_384;

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

/// The largest partial result a checkpoint holds (a larger one is not kept: a re-run starts
/// from the last checkpoint within the bound, or from the range's start).
pub const CHECKPOINT_MAX: usize = 1024 * 1024;

/// Where an attempt got to: the next page starts after `after`, and `partial` is the partial
/// result (stored form) of the `keys_read` keys before it, at pin `pin_index`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub pin_index: u64,
    pub after: Bytes,
    pub keys_read: u64,
    pub partial: Bytes,
}

/// What a running attempt shows: its progress, its newest checkpoint, and whether it was
/// asked to stop.
#[derive(Debug, Default)]
pub struct Progress {
    keys: AtomicU64,
    throttled_ms: AtomicU64,
    cancelled: AtomicBool,
    checkpoint: Mutex<Option<Arc<Checkpoint>>>,
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

    /// The newest checkpoint.
    pub fn checkpoint(&self) -> Option<Arc<Checkpoint>> {
        self.checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn keep(&self, c: Checkpoint) {
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(c));
    }

    /// Keys read before the newest checkpoint's position (0: none).
    fn checkpoint_keys(&self) -> u64 {
        self.checkpoint().map_or(0, |c| c.keys_read)
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
        /// Keys read before its newest checkpoint (0: none yet).
        checkpoint_keys: u64,
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
                checkpoint_keys: p.checkpoint_keys(),
            },
            Some(Entry::Ended(at)) if at.elapsed() < ENDED_KEPT => Probe::Ended,
            _ => Probe::Unknown,
        }
    }

    /// The newest checkpoint of running attempt `key`, if it reaches past `newer_than` keys.
    pub fn checkpoint(&self, key: &AttemptKey, newer_than: u64) -> Option<Checkpoint> {
        let progress = match self.lock().get(key) {
            Some(Entry::Running(p)) => p.clone(),
            _ => return None,
        };
        progress
            .checkpoint()
            .filter(|c| c.keys_read > newer_than)
            .map(|c| (*c).clone())
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
    let (mut partial, mut after, mut read) = match resumed(order, &plan) {
        Some((partial, after, read)) => (partial, Some(after), read),
        None => (plan.partial(), None, 0),
    };
    // The groups moved out of `partial`'s table (its counts stay in `partial`).
    let mut spilled = Merged::default();
    progress.keys.store(read, Ordering::Relaxed);
    let started = std::time::Instant::now();
    // Keys read by this attempt (its rate limit counts these, not the checkpoint's).
    let mut read_here: u64 = 0;
    let checkpoint_every = Duration::from_millis(order.checkpoint_every_ms);
    let mut checkpointed = Instant::now();
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(TaskError::Failed("the attempt was cancelled".into()));
        }
        let p = page(after.as_deref()).map_err(TaskError::Failed)?;
        let read_before = read;
        read += p.entries.len() as u64;
        read_here += p.entries.len() as u64;
        if let Some(limit) = node_limit {
            let waited = limit.take(p.entries.len() as u64, || progress.is_cancelled());
            progress.throttled_ms.fetch_add(waited, Ordering::Relaxed);
            if progress.is_cancelled() {
                return Err(TaskError::Failed("the attempt was cancelled".into()));
            }
        }
        if let Some(rate) = rate {
            let due = std::time::Duration::from_secs_f64(read_here as f64 / rate as f64);
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
        if partial.groups() >= TABLE_GROUPS_MAX {
            plan.spill(&mut partial, &mut spilled)
                .map_err(|e| TaskError::User(e.to_string()))?;
        }
        match p.next {
            Some(next) => {
                if order.checkpoint_every_ms > 0 && checkpointed.elapsed() >= checkpoint_every {
                    checkpointed = Instant::now();
                    keep_checkpoint(order, progress, &plan, &partial, &spilled, &next, read);
                }
                after = Some(next)
            }
            None => break,
        }
    }
    let keys = partial.keys;
    let bytes = plan
        .encode_spilled(partial, spilled)
        .map_err(|e| TaskError::User(e.to_string()))?;
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

/// The `n`-th key (from 0) that `page` reads from the start of its range, as [`run`] reads
/// pages (`None`: fewer keys, or a page could not be read): where a big shard's first task is
/// cut, at a real key.
pub fn nth_key(
    mut page: impl FnMut(Option<&[u8]>) -> Result<Page, String>,
    n: u64,
) -> Option<Bytes> {
    let mut after: Option<Bytes> = None;
    let mut seen = 0u64;
    loop {
        let p = page(after.as_deref()).ok()?;
        let len = p.entries.len() as u64;
        if seen + len > n {
            return p
                .entries
                .into_iter()
                .nth((n - seen) as usize)
                .map(|(k, _)| k);
        }
        seen += len;
        after = Some(p.next?);
    }
}

/// The checkpoint `order` resumes from, as (partial, after, keys read), when this attempt can
/// use it: taken at its pin, inside its range, a partial result of its plan. Any other is
/// ignored (the attempt reads its whole range: slower, never wrong).
fn resumed(order: &TaskOrder, plan: &Plan) -> Option<(Partial, Bytes, u64)> {
    let c = order.resume.as_ref()?;
    let inside = c.pin_index == order.pin_index
        && order.from.as_ref().is_none_or(|from| c.after >= *from)
        && order.to.as_ref().is_none_or(|to| c.after < *to);
    let partial = Partial::decode(&c.partial)
        .ok()
        .filter(|p| plan.check(p).is_ok());
    match partial {
        Some(p) if inside => Some((p, c.after.clone(), c.keys_read)),
        _ => {
            tracing::warn!(
                task = order.task,
                attempt = order.attempt,
                "a checkpoint that does not fit this attempt was ignored: it reads its whole range"
            );
            None
        }
    }
}

/// Keeps a checkpoint at `after` (`read` keys read) if the partial result fits
/// [`CHECKPOINT_MAX`].
fn keep_checkpoint(
    order: &TaskOrder,
    progress: &Progress,
    plan: &Plan,
    partial: &Partial,
    spilled: &Merged,
    after: &Bytes,
    read: u64,
) {
    // The in-memory estimate is above the stored size: past twice the bound, skip encoding
    // (first by the count, at least 56 bytes a group, without a pass over the groups).
    if (partial.groups() + spilled.groups_at_most()) * 56 > 2 * CHECKPOINT_MAX
        || partial.size_estimate() + spilled.size_estimate() > 2 * CHECKPOINT_MAX
    {
        return;
    }
    let bytes = if spilled.groups_at_most() == 0 {
        partial.encode()
    } else {
        // Small (within the bound above): copied, so the task goes on with its own.
        match plan.encode_spilled(partial.clone(), spilled.clone()) {
            Ok(b) => b,
            Err(_) => return,
        }
    };
    if bytes.len() <= CHECKPOINT_MAX {
        progress.keep(Checkpoint {
            pin_index: order.pin_index,
            after: after.clone(),
            keys_read: read,
            partial: Bytes::from(bytes),
        });
    }
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
                throttled_ms: 0,
                checkpoint_keys: 0,
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
            resume: None,
            checkpoint_every_ms: 0,
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

    /// Twenty keys `k00`..`k19` in pages of three, each page after a short nap (so that a
    /// checkpoint every millisecond is taken after every page); `firsts` records where each
    /// page started.
    fn pages<'a>(
        firsts: &'a mut Vec<Option<Bytes>>,
        stop_after: Option<(usize, &'a Progress)>,
    ) -> impl FnMut(Option<&[u8]>) -> Result<Page, String> + 'a {
        let keys: Vec<Bytes> = (0..20).map(|i| Bytes::from(format!("k{i:02}"))).collect();
        move |after| {
            firsts.push(after.map(Bytes::copy_from_slice));
            if let Some((n, progress)) = stop_after
                && firsts.len() > n
            {
                progress.cancel();
            }
            std::thread::sleep(Duration::from_millis(2));
            let rest: Vec<&Bytes> = keys
                .iter()
                .filter(|k| after.is_none_or(|a| k.as_ref() > a))
                .collect();
            let page: Vec<(Bytes, Bytes)> = rest
                .iter()
                .take(3)
                .map(|k| {
                    (
                        (*k).clone(),
                        Bytes::from(format!("{{\"a\":{}}}", k[1] - b'0')),
                    )
                })
                .collect();
            let next = (rest.len() > 3).then(|| page[2].0.clone());
            Ok(Page {
                entries: page,
                next,
            })
        }
    }

    fn summing(checkpoint_every_ms: u64, resume: Option<Checkpoint>) -> TaskOrder {
        TaskOrder {
            job: Bytes::from_static(b"job@1"),
            task: 0,
            attempt: 1,
            spec: r#"{"id":"s","input":{"keyspace":"k"},"map":{"values":{"a":{"json":"$.a"}}},"reduce":{"n":"count","total":{"sum":"a"}}}"#.into(),
            shard: 1,
            pin_index: 7,
            from: None,
            to: None,
            resume,
            checkpoint_every_ms,
        }
    }

    #[test]
    fn a_run_resumed_from_a_checkpoint_reads_only_the_rest_and_gives_the_whole_answer() {
        let mut firsts = Vec::new();
        let whole = run(
            &summing(0, None),
            pages(&mut firsts, None),
            &Progress::default(),
            None,
        )
        .unwrap();
        assert_eq!((whole.keys, firsts.len()), (20, 7));

        // An attempt that takes a checkpoint after each page is stopped during its fifth.
        let stopped = Progress::default();
        let mut firsts = Vec::new();
        let out = run(
            &summing(1, None),
            pages(&mut firsts, Some((4, &stopped))),
            &stopped,
            None,
        );
        assert_eq!(
            out,
            Err(TaskError::Failed("the attempt was cancelled".into()))
        );
        let checkpoint = (*stopped.checkpoint().expect("a checkpoint was taken")).clone();
        assert_eq!(checkpoint.pin_index, 7);
        assert!(
            checkpoint.keys_read >= 3 && checkpoint.keys_read <= 15,
            "{checkpoint:?}"
        );
        assert_eq!(stopped.checkpoint_keys(), checkpoint.keys_read);

        // The next attempt starts where the checkpoint is and reads only the rest.
        let mut firsts = Vec::new();
        let progress = Progress::default();
        let resumed = run(
            &summing(0, Some(checkpoint.clone())),
            pages(&mut firsts, None),
            &progress,
            None,
        )
        .unwrap();
        assert_eq!(resumed, whole, "the resumed answer is the whole range's");
        assert_eq!(firsts[0].as_ref(), Some(&checkpoint.after));
        assert_eq!(
            progress.keys(),
            20,
            "progress counts the checkpoint's keys too"
        );
        assert!(firsts.len() < 7);
    }

    #[test]
    fn the_nth_key_is_read_across_pages() {
        let mut firsts = Vec::new();
        assert_eq!(
            nth_key(pages(&mut firsts, None), 0),
            Some(Bytes::from("k00"))
        );
        assert_eq!(
            nth_key(pages(&mut Vec::new(), None), 5),
            Some(Bytes::from("k05"))
        );
        assert_eq!(
            nth_key(pages(&mut Vec::new(), None), 19),
            Some(Bytes::from("k19"))
        );
        assert_eq!(
            nth_key(pages(&mut Vec::new(), None), 20),
            None,
            "twenty keys only"
        );
        assert_eq!(firsts.len(), 1, "a key of the first page reads only it");
    }

    #[test]
    fn a_checkpoint_that_does_not_fit_the_attempt_is_ignored() {
        let stopped = Progress::default();
        let mut firsts = Vec::new();
        let _ = run(
            &summing(1, None),
            pages(&mut firsts, Some((3, &stopped))),
            &stopped,
            None,
        );
        let good = (*stopped.checkpoint().unwrap()).clone();
        let whole = run(
            &summing(0, None),
            pages(&mut Vec::new(), None),
            &Progress::default(),
            None,
        )
        .unwrap();
        let other_pin = Checkpoint {
            pin_index: 8,
            ..good.clone()
        };
        let corrupt = Checkpoint {
            partial: Bytes::from_static(b"\x01nonsense"),
            ..good.clone()
        };
        let mut outside = summing(0, None);
        outside.to = Some(Bytes::from_static(b"k00"));
        for bad in [other_pin, corrupt] {
            let mut firsts = Vec::new();
            let out = run(
                &summing(0, Some(bad)),
                pages(&mut firsts, None),
                &Progress::default(),
                None,
            )
            .unwrap();
            assert_eq!(out, whole);
            assert_eq!(firsts[0], None, "read from the range's start");
        }
        outside.resume = Some(good);
        let mut firsts = Vec::new();
        let _ = run(
            &outside,
            pages(&mut firsts, None),
            &Progress::default(),
            None,
        )
        .unwrap();
        assert_eq!(
            firsts[0], None,
            "a checkpoint past the range's end is ignored"
        );
    }
}
