//! The write-ahead log: every Raft group's log entries of this node, in one append-only log of
//! recycled segment files, made durable by one `pwrite` + one `fdatasync` per batch.
//!
//! # Why not redb (as before) or raft-engine
//!
//! Measured in `bench/logbench` (docs/design/log-engine.md): a batch fsync'd through redb costs
//! 1.6–3.8× the disk's floor, growing with every group in the batch (each group's B-tree pages
//! are written and synced, scattered in the file); this log runs at the floor (an overwrite of
//! pre-zeroed blocks, one sequential write however many groups). raft-engine came close but
//! adds 29 crates, a C build and protobuf 2.
//!
//! # Shape
//!
//! - Files `<dir>/seg-NNNNNN.log`, [`WalConfig::segment_bytes`] each, zero-filled once when
//!   created (a later write is an overwrite of initialized blocks, so the sync writes data only;
//!   perf.md §1), then **reused** once nothing live is left in them, oldest first.
//! - One writer thread (`capdb-wal`) takes every queued job of every group (up to
//!   [`BATCH_JOBS_MAX`] / [`BATCH_BYTES_MAX`]), writes them as one frame and syncs once
//!   (`writer.rs`). Jobs are applied in queue order, so a truncate never overtakes an append.
//! - In memory: per group, index → position of its record. Readers `pread` a record under a
//!   read lock; a segment is only reused after every position into it was dropped, which takes
//!   the write lock, so a reader never reads a reused file.
//! - Format and its checks: `format.rs`; what a crash leaves and how it is read back:
//!   `recover.rs`.
//!
//! # What the caller (the Raft log store) must do
//!
//! - **Purge** ([`Wal::purge`]) only once the state machine that applied those entries is
//!   durable: the entries are then never needed again, and the segments holding them may be
//!   reused. A purge is forgotten by a crash; at start the caller purges again up to its durable
//!   watermark.
//! - Appends of one group are in index order; an append at index `i` replaces every entry of
//!   the group from `i` on (a newer leader's entries), as openraft expects.
//!
//! # Bounds
//!
//! Queue: [`WAL_QUEUE_JOBS_MAX`] jobs (callers wait when full). Disk: segments are created only
//! when no free one exists, up to [`WalConfig::bytes_max`] in total; at the limit writes wait
//! (backpressure) until purges free the oldest segment, and the groups pinning it are asked to
//! snapshot and purge ([`Wal::set_pinned_hook`]; the Raft layer purges up to the snapshot,
//! without the tail openraft keeps after its own snapshots, which an idle group would pin
//! forever); they are also
//! asked at a segment switch once the segments in use pass a quarter of the limit. An idle group's
//! few live entries never pin a segment: when the oldest segment holds little that is live
//! (at most a quarter of a segment), the writer copies it forward (`Moved` records) so the file
//! can be reused.
//!
//! Known gap: a group whose replica was being dropped when the node crashed (between the Raft
//! shutdown and the log truncate, `raft/src/groups/mod.rs`) is never opened again; its entries
//! are copied forward at every segment switch, or pin a segment if they are many.

mod format;
mod recover;
mod writer;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use capdb_types::{Error, Result};
use tokio::sync::{mpsc, oneshot};

pub use writer::{BATCH_BYTES_MAX, BATCH_JOBS_MAX, WAL_QUEUE_JOBS_MAX};

/// Sizes of the log.
#[derive(Debug, Clone, Copy)]
pub struct WalConfig {
    /// Size of one segment file. A batch larger than a segment gets a segment of its own size.
    pub segment_bytes: u64,
    /// Most bytes of segment files in total.
    pub bytes_max: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 << 20,
            bytes_max: 4 << 30,
        }
    }
}

/// Counters exposed as metrics.
#[derive(Debug, Default)]
pub struct WalStats {
    /// Batches written (each is one `pwrite` and one `fdatasync`).
    pub syncs: AtomicU64,
    /// Jobs (appends, truncates) those batches carried.
    pub jobs: AtomicU64,
    /// Time spent writing and syncing batches (microseconds).
    pub sync_micros: AtomicU64,
    /// Bytes written, headers and copied records included.
    pub bytes: AtomicU64,
    /// Records copied forward to free an old segment.
    pub moved: AtomicU64,
    /// Segment files created (not counting reuse).
    pub segments_created: AtomicU64,
}

/// Where a record is: its segment slot and the offset of its record header in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    slot: u32,
    off: u64,
    len: u32,
}

/// One segment file.
struct Slot {
    file: Arc<File>,
    number: u64,
    bytes: u64,
    /// The current use of the file (`None`: never used, or its header did not survive a crash).
    header: Option<format::SegmentHeader>,
    /// Index positions pointing into this file, and their payload bytes.
    live: u64,
    live_bytes: u64,
}

/// The in-memory index, shared by readers and the writer.
struct State {
    groups: HashMap<u64, BTreeMap<u64, Pos>>,
    /// Each group's purge watermark since open: an append queued before a purge and written
    /// after it must not bring entries at or below it back.
    purged: HashMap<u64, u64>,
    slots: Vec<Slot>,
    /// Slots in use, oldest generation first; the writer writes the back one.
    used: VecDeque<u32>,
    /// Slots free for reuse, in the order they were freed (strictly oldest first: a free
    /// file's stale records are replayed before every newer segment's, which supersede them).
    free: VecDeque<u32>,
}

impl State {
    fn forget(&mut self, pos: Pos) {
        let s = &mut self.slots[pos.slot as usize];
        debug_assert!(s.live > 0, "live count of slot {} underflows", pos.slot);
        s.live -= 1;
        s.live_bytes -= u64::from(pos.len);
    }

    fn remember(&mut self, pos: Pos) {
        let s = &mut self.slots[pos.slot as usize];
        s.live += 1;
        s.live_bytes += u64::from(pos.len);
    }

    /// Drops every entry of `group` from `from` on (0: the whole group, watermark included).
    fn truncate(&mut self, group: u64, from: u64) {
        if from == 0 {
            self.purged.remove(&group);
        }
        let Some(entries) = self.groups.get_mut(&group) else {
            return;
        };
        let gone = entries.split_off(&from);
        if entries.is_empty() {
            self.groups.remove(&group);
        }
        for pos in gone.into_values() {
            self.forget(pos);
        }
    }

    /// Drops every entry of `group` up to and including `upto`.
    fn purge(&mut self, group: u64, upto: u64) {
        let mark = self.purged.entry(group).or_insert(upto);
        *mark = (*mark).max(upto);
        let Some(entries) = self.groups.get_mut(&group) else {
            return;
        };
        let kept = entries.split_off(&upto.saturating_add(1));
        let gone = std::mem::replace(entries, kept);
        if entries.is_empty() {
            self.groups.remove(&group);
        }
        for pos in gone.into_values() {
            self.forget(pos);
        }
    }

    /// Records entry `index` of `group` at `pos`; an `Entry` (not a move) first drops every
    /// entry from `index` on.
    fn put(&mut self, group: u64, index: u64, pos: Pos, replaces_later: bool) {
        if self.purged.get(&group).is_some_and(|&p| index <= p) {
            return;
        }
        if replaces_later {
            self.truncate(group, index);
        }
        let old = self.groups.entry(group).or_default().insert(index, pos);
        if let Some(old) = old {
            self.forget(old);
        }
        self.remember(pos);
    }

    /// Reads the payload of the record at `pos`, checking that it is `group`'s entry `index`.
    fn read(&self, group: u64, index: u64, pos: Pos) -> Result<Vec<u8>> {
        let slot = &self.slots[pos.slot as usize];
        let mut buf = vec![0u8; format::RECORD_HEADER_BYTES + pos.len as usize];
        slot.file.read_exact_at(&mut buf, pos.off).map_err(|e| {
            Error::Io(format!(
                "cannot read write-ahead log segment {}: {e}",
                slot.number
            ))
        })?;
        let (r, _) = format::decode_record(&buf)?;
        if r.group != group
            || r.index != index
            || !matches!(r.kind, format::Kind::Entry | format::Kind::Moved)
        {
            return Err(Error::Corruption(format!(
                "write-ahead log segment {} at {} holds group {} index {}, expected group {group} index {index}",
                slot.number, pos.off, r.group, r.index
            )));
        }
        Ok(r.payload.to_vec())
    }
}

struct Shared {
    state: RwLock<State>,
    stats: WalStats,
    /// Called with a group whose live entries pin the oldest segment ([`Wal::set_pinned_hook`]).
    pinned_hook: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl Shared {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// What runs when a job is durable (or failed).
type DoneFn = Box<dyn FnOnce(Result<()>) + Send>;

/// A job's completion, called exactly once: with the outcome, or, if the job is dropped
/// unanswered (the writer thread died), with an error, so no caller waits for ever.
struct Done(Option<DoneFn>);

impl Done {
    fn new(f: impl FnOnce(Result<()>) + Send + 'static) -> Done {
        Done(Some(Box::new(f)))
    }

    fn call(mut self, result: Result<()>) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(Error::Io("write-ahead log writer stopped".into())));
        }
    }
}

/// A queued change.
enum Job {
    /// Entries `(index, payload)` of a group, in index order.
    Append {
        group: u64,
        records: Vec<(u64, Vec<u8>)>,
        done: Done,
    },
    /// Drops the group's entries from `from` on (0: all).
    Truncate { group: u64, from: u64, done: Done },
    /// Answered once every job queued before it is durable; writes nothing itself.
    Barrier { done: Done },
}

impl Job {
    fn payload_bytes(&self) -> usize {
        match self {
            Job::Append { records, .. } => records
                .iter()
                .map(|(_, p)| p.len() + format::RECORD_HEADER_BYTES)
                .sum(),
            Job::Truncate { .. } => format::RECORD_HEADER_BYTES,
            Job::Barrier { .. } => 0,
        }
    }

    fn finish(self, result: Result<()>) {
        match self {
            Job::Append { done, .. } | Job::Truncate { done, .. } | Job::Barrier { done } => {
                done.call(result)
            }
        }
    }
}

/// The node's write-ahead log. Cheap to clone; the writer thread stops when the last clone
/// drops.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    dir: PathBuf,
    closed: crate::disk::Closed,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, reading back what it holds (`recover.rs`), and starts
    /// the writer. Fails with [`Error::Corruption`] when acknowledged records are damaged or
    /// missing, rather than start without them.
    pub fn open(dir: &Path, config: WalConfig) -> Result<Wal> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
        let recovered = recover::recover(dir)?;
        let shared = Arc::new(Shared {
            state: RwLock::new(recovered.state),
            stats: WalStats::default(),
            pinned_hook: std::sync::OnceLock::new(),
        });
        let closed = crate::disk::Closed::new();
        let jobs = writer::start(
            dir.to_path_buf(),
            config,
            shared.clone(),
            recovered.next_generation,
            recovered.next_seq,
            closed.clone(),
        )?;
        Ok(Wal {
            shared,
            jobs,
            dir: dir.to_path_buf(),
            closed,
        })
    }

    /// Signals when the writer (and any segment file it was creating) has stopped, after every
    /// handle was dropped.
    pub fn closed(&self) -> crate::disk::Closed {
        self.closed.clone()
    }

    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Sets what to call, on the writer thread (it must not block), with a group whose live
    /// entries keep the oldest segment from being reused: the Raft layer asks that group to
    /// snapshot, after which openraft purges its log. Only the first call counts.
    pub fn set_pinned_hook(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.shared.pinned_hook.set(Box::new(hook));
    }

    /// Bytes of segment files.
    pub fn file_bytes(&self) -> u64 {
        self.shared.read_state().slots.iter().map(|s| s.bytes).sum()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues `records` (`(index, payload)`, consecutive indexes) of `group` behind every
    /// earlier job and returns once queued; `done` runs on the writer thread once they are
    /// durable (or failed): it must not block. Entry `records[0].0` replaces every entry of the
    /// group from that index on.
    pub async fn append(
        &self,
        group: u64,
        records: Vec<(u64, Vec<u8>)>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        debug_assert!(
            records.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "appends are consecutive"
        );
        self.jobs
            .send(Job::Append {
                group,
                records,
                done: Done::new(done),
            })
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Appends and waits until durable.
    pub async fn append_durable(&self, group: u64, records: Vec<(u64, Vec<u8>)>) -> Result<()> {
        debug_assert!(
            records.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "appends are consecutive"
        );
        self.queue_and_wait(|done| Job::Append {
            group,
            records,
            done,
        })
        .await
    }

    /// Drops `group`'s entries from `from` on (0: every entry, e.g. when the group leaves the
    /// node) and waits until that is durable.
    pub async fn truncate(&self, group: u64, from: u64) -> Result<()> {
        self.queue_and_wait(|done| Job::Truncate { group, from, done })
            .await
    }

    /// Waits until every job queued before this call is durable.
    pub async fn barrier(&self) -> Result<()> {
        self.queue_and_wait(|done| Job::Barrier { done }).await
    }

    /// Queues the job `make` builds around its completion and waits for its outcome.
    async fn queue_and_wait(&self, make: impl FnOnce(Done) -> Job) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let done = Done::new(move |r| {
            let _ = tx.send(r);
        });
        self.jobs
            .send(make(done))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await
            .map_err(|_| Error::Io("write-ahead log writer stopped".into()))?
    }

    /// Forgets `group`'s entries up to and including `upto`. The caller guarantees they are
    /// never needed again, even after a crash (the state machine that applied them is durable);
    /// see the module docs.
    pub fn purge(&self, group: u64, upto: u64) {
        self.shared.write_state().purge(group, upto);
    }

    /// `group`'s entries with index in `from..to`, in order, as `(index, payload)`.
    pub fn read(&self, group: u64, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let st = self.shared.read_state();
        let Some(entries) = st.groups.get(&group) else {
            return Ok(Vec::new());
        };
        entries
            .range(from..to)
            .map(|(&i, &pos)| Ok((i, st.read(group, i, pos)?)))
            .collect()
    }

    /// `group`'s last entry.
    pub fn last(&self, group: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let st = self.shared.read_state();
        let Some((&i, &pos)) = st.groups.get(&group).and_then(|e| e.last_key_value()) else {
            return Ok(None);
        };
        Ok(Some((i, st.read(group, i, pos)?)))
    }

    /// The first and last index of `group`'s entries, and whether they are consecutive.
    pub fn bounds(&self, group: u64) -> Option<(u64, u64, bool)> {
        let st = self.shared.read_state();
        let entries = st.groups.get(&group)?;
        let (&first, _) = entries.first_key_value()?;
        let (&last, _) = entries.last_key_value()?;
        Some((first, last, last - first + 1 == entries.len() as u64))
    }

    /// Groups with entries in the log.
    pub fn groups(&self) -> Vec<u64> {
        let mut g: Vec<u64> = self.shared.read_state().groups.keys().copied().collect();
        g.sort_unstable();
        g
    }
}

#[cfg(test)]
mod tests;
