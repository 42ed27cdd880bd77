//! The durable engine: one redb file per node, one table per keyspace, group commit.
//!
//! # Design: one writer thread
//!
//! Every write of the node goes through one thread that owns redb's write transaction. redb
//! admits one write transaction at a time, and each durable commit costs an fsync; instead of
//! making callers take turns for that, the writer gathers what they queued and commits it
//! together. This buys three things at once: throughput that grows with concurrency (group
//! commit, below), read-modify-write commands that are atomic without locks (they run inside the
//! writer), and one order for all writes (a job is applied after every job queued before it,
//! which is what [`DiskEngine::flush`] and the Raft log rely on). The queue is bounded
//! ([`WRITE_QUEUE_JOBS_MAX`]): when it is full callers wait, so memory never grows under load.
//!
//! # Write path (group commit)
//!
//! Callers send a job (an op and a reply channel) over the bounded channel to the writer thread
//! and await its reply. The writer takes everything queued (up to [`BATCH_JOBS_MAX`] jobs or
//! [`BATCH_BYTES_MAX`] bytes), applies it in one redb write transaction, commits with
//! `Durability::Immediate` (one fsync for the whole batch) and only then answers every job. While
//! one batch is being fsync'd the next one queues up, so throughput grows with concurrency
//! instead of being capped at one write per fsync. Read-modify-write commands (INCR, APPEND,
//! SET NX) run inside the writer, so they are atomic without locks.
//!
//! Jobs that need no fsync (replicated applies, which the durable Raft log can redo, and
//! `_meta` puts not asked to be durable) are answered as soon as they have run, before any
//! commit: the writer keeps its transaction open across batches of them and commits it when a
//! reader needs it, when a job needing an fsync arrives, or after [`COMMIT_WINDOW`] (or
//! [`UNCOMMITTED_JOBS_MAX`] jobs, [`UNCOMMITTED_BYTES_MAX`] bytes), whichever comes first
//! (`visible.rs` says why and how readers see them). Those commits are not synced, unless
//! [`CHECKPOINT_INTERVAL`] has passed since the last durable commit: then it is the checkpoint (a
//! crash rolls the state machines back to the last durable commit, and their logs replay the
//! rest; redb reuses freed pages only after a durable commit). A batch holding a job that needs
//! an fsync runs in a transaction of its own and is answered after its durable commit.
//!
//! A storage error fails the whole batch (the transaction is aborted, nothing of it is applied,
//! every caller gets [`Error::Io`]); if that transaction also held jobs already answered, those
//! are lost with it, so the engine stops serving until the node restarts and its Raft logs
//! replay them (`visible.rs`). A semantic error (INCR of a non-integer) fails its mutation
//! only, and a job whose keyspace table was dropped after it was queued fails alone.
//!
//! # Read path
//!
//! Reads open a redb read transaction (an MVCC snapshot of the last commit) on the caller's
//! thread. They never wait for the writer, except for the commit of writes answered before
//! the read began (`visible.rs`).
//!
//! # Integrity
//!
//! Every value carries a CRC-32 ([`capdb_types::value`]); a mismatch is reported as
//! [`Error::Corruption`], counted in [`EngineStats::corruptions`] and never served. redb itself
//! checksums its pages and repairs its allocator state after a crash.
//!
//! # Customers
//!
//! Every table and `_meta` name they pass is built in [`crate::layout`].
//!
//! | customer | uses |
//! |---|---|
//! | the server's keyspace router | [`DiskEngine::open`], [`DiskEngine::create_table`] / [`DiskEngine::drop_table`], [`DiskEngine::table`] read and written as a [`KeyspaceStore`](crate::KeyspaceStore), [`DiskTable::sweep_expired`] (active expiry); `stats`, `file_bytes`, `flush` and `closed` for metrics and shutdown |
//! | Raft log stores | their entries are in the write-ahead log ([`DiskEngine::wal`], `crate::wal`); here `meta_put` / `meta_get` for vote, committed and purged, and `log_last` / `log_read` / `drop_group` to import a log an earlier version kept in redb |
//! | Raft state machines | [`DiskEngine::apply_replicated`], snapshots through [`DiskEngine::dump_table`] and [`DiskEngine::replace_table`], `meta_list` / `meta_get` / `meta_put`; [`DiskEngine::drop_group`] when a group leaves the node; shard reads through `table` |
//! | jobs (issue 15) | [`DiskTable::pin`] when a shard applies a pin entry, [`DiskTable::pinned_scan`] for tasks, [`DiskTable::unpin`] (`pins.rs`) |
//! | `ap` replicas | `table(.., tombstones: true)` in the split form (`ap.rs`): [`DiskTable::ap_get`], [`DiskTable::ap_for_each_key`], [`DiskTable::ap_for_each_record`], [`DiskTable::ap_read_records`], [`DiskTable::ap_merge`], [`DiskTable::ap_reclaim_step`], [`DiskTable::counter_add`], [`DiskTable::purge_tombstones`] |
//! | `ap` hinted handoff | log tables as queues (`log_append`, `log_first`, `log_read`, `log_last`, `log_remove`) and `_meta` markers (`meta_list`, `meta_put`) |
//! | the control loop | `meta_get` / `meta_put` (the node-removed record) |
//!
//! # Files
//!
//! - `mod.rs`: the handles ([`DiskEngine`], [`DiskTable`]), opening the file, table lifecycle.
//! - `writer.rs`: the writer thread, the job queue, batching and the commit.
//! - `visible.rs`: how readers see writes answered before their commit.
//! - `ops.rs`: the ops a job carries, what each answers, and how each runs in the transaction.
//! - `mutation.rs`: one client mutation under the writer (also for replicated applies).
//! - `table.rs`: [`DiskTable`]'s reads, scans and `ap` operations.
//! - `ap.rs`: `ap` tables in the split form (a head record per key, a record per element).
//! - `log.rs`, `meta.rs`, `replicated.rs`: log tables, the `_meta` table, Raft state machines.
//! - `touched.rs`, `txn.rs`: WATCH's touched rows; cross-shard transactions' locks and records.

mod ap;
mod changes;
mod groups;
mod jobs;
mod log;
mod meta;
mod mutation;
mod ops;
mod overlay;
mod pins;
mod replicated;
mod space;
mod table;
mod touched;
mod txn;
mod views;
mod visible;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use capdb_types::{Error, Hlc, Result};
use redb::{Database, TableDefinition};
use tokio::sync::mpsc;

pub use ap::{
    AP_RECLAIM_STEP_MAX, AP_WITNESS_SCAN_MAX, ApPart, ApRecord, MergeOutcome, partial_fits,
};
pub use changes::{
    CHANGES_QUERY, CHANGES_READ_BYTES_MAX, CHANGES_READ_MAX, CHANGES_SNAPSHOT_QUERY,
    CHANGES_TRIM_BYTES_MAX, CHANGES_TRIM_EVENTS_MAX, CHANGES_TXN_QUERY, ChangeInfo, ChangesStep,
    PIN_BYTES_MAX, RETENTION_BYTES_DEFAULT, RETENTION_MS_DEFAULT, SNAPSHOT_EXAMINE_MAX,
    SNAPSHOT_PAGE_MAX, TxnPartAt,
};
pub use groups::{CHANGES_GROUP_QUERY, CHANGES_PINS_QUERY, PINS_GROUPS_MAX};
pub use jobs::{JOBS_QUERY, LIST_PAGE_MAX, QUERY_BYTES_MAX, STREAM_PAGE_MAX, TASKS_PAGE_MAX};

/// Encodes a step's answer for the `_meta` row that remembers it (exactly-once retries).
pub type RememberReply = Box<dyn Fn(&Result<capdb_types::Reply>) -> Vec<u8> + Send + Sync>;
pub use meta::MetaItem;
use ops::Op;
pub use pins::{
    PIN_HOLD_MAX, PINNED_PAGE_EXAMINE_MAX, PINNED_PAGE_KEYS_MAX, PINS_MAX, PinInfo, PinnedPage,
};
pub use replicated::{
    Queued, RememberReplies, RowSource, SnapshotPage, SnapshotRows, SnapshotTable, TableDump,
    TableSnapshot,
};
pub use table::SCAN_EXAMINE_MAX;
pub use touched::{TOUCHED_MAX, WatchGuard, horizon_row};
pub use txn::{GC_STEP_MAX, OpenTxns, Orphan, RECORD_RETAIN_MS, RememberAnswer, TxnAnswer, TxnJob};
pub use views::{
    Counts as ViewCounts, DEBUG_VIEW_SKIP_TXN, DeltaBuilder as ViewDeltaBuilder,
    Emits as ViewEmits, ROWS_PAGE_MAX as VIEW_ROWS_PAGE_MAX, Row as ViewRow, VIEWS_QUERY,
    ViewDelta,
};
pub use visible::VISIBLE_WAIT_MAX;
use writer::Job;
pub use writer::{
    BATCH_BYTES_MAX, BATCH_JOBS_MAX, CHECKPOINT_INTERVAL, COMMIT_WINDOW, UNCOMMITTED_BYTES_MAX,
    UNCOMMITTED_JOBS_MAX, WRITE_QUEUE_JOBS_MAX,
};

const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new(crate::layout::META_TABLE);

fn table_def(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

fn log_def(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

fn io_err(e: impl std::fmt::Display) -> Error {
    let text = e.to_string();
    if text.to_ascii_lowercase().contains("corrupt") {
        Error::Corruption(text)
    } else {
        Error::Io(text)
    }
}

/// Counters exposed as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Of which durable (each is one fsync): asked for, or a checkpoint ([`CHECKPOINT_INTERVAL`]).
    pub durable_commits: AtomicU64,
    /// Jobs those commits held.
    pub jobs: AtomicU64,
    /// Total time spent applying and committing batches (microseconds).
    pub commit_micros: AtomicU64,
    /// Of which in redb's commit call: page writes and the fsync (microseconds).
    pub sync_micros: AtomicU64,
    /// Values that failed their checksum on read.
    pub corruptions: AtomicU64,
}

/// How often written-but-unsynced database pages are handed to the disk.
const WRITEBACK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Starts a thread that asks the kernel to start writing the database file's dirty pages every
/// [`WRITEBACK_EVERY`] while commits happen (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts
/// the writes, waits for nothing, flushes no disk cache). Raft applies are committed without a
/// sync, so their pages pile up in the page cache; without this, the checkpoint's fsync
/// ([`CHECKPOINT_INTERVAL`]) would write a second of them while the writer thread waits, and
/// every write behind it would wait too. Correctness does not depend on it: the kernel may
/// write dirty pages back at any time anyway.
fn start_writeback(path: &Path, closed: Closed, stats: Arc<EngineStats>) {
    let Ok(file) = std::fs::File::open(path) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("capdb-writeback".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            use std::sync::atomic::Ordering;
            let mut seen = stats.commits.load(Ordering::Relaxed);
            while !closed.wait(WRITEBACK_EVERY) {
                let now = stats.commits.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    // SAFETY: a plain syscall on a descriptor this thread owns.
                    unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                    }
                }
            }
        });
}

/// The node's durable engine. Cheap to clone; the writer thread stops when the last clone drops.
#[derive(Clone)]
pub struct DiskEngine {
    /// Read transactions held at a shard's log index for jobs (`pins.rs`). First, so that it
    /// is dropped before the database when the last handle goes.
    pins: Arc<pins::Pins>,
    db: Arc<Database>,
    /// The Raft groups' logs (`crate::wal`), in `<dir>/wal`, next to the database.
    wal: crate::wal::Wal,
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    stats: Arc<EngineStats>,
    closed: Closed,
    value_bytes_max: usize,
    /// What readers can see of what the writer answered (`visible.rs`).
    visible: Arc<visible::Visibility>,
}

/// Signals when the writer thread has stopped and released its handle on the database. The file
/// is closed cleanly (no repair at next open) once every engine handle has been dropped.
#[derive(Clone)]
pub struct Closed(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Closed {
    pub(crate) fn new() -> Closed {
        Closed(Arc::default())
    }

    /// Says the thread it stands for has stopped.
    pub(crate) fn set(&self) {
        let (lock, cvar) = &*self.0;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cvar.notify_all();
    }

    /// Waits up to `timeout` for the writer to stop; returns whether it did.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let (lock, cvar) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |closed| !*closed)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// How a [`DiskEngine`] is sized.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// The largest value a write may carry.
    pub value_bytes_max: usize,
    /// Bytes of `capdb.redb`'s pages redb keeps in memory (its read cache and write buffer);
    /// pages past it are read from the file again (a system call, a copy and an allocation
    /// each).
    pub cache_bytes: u64,
    pub wal: crate::wal::WalConfig,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            value_bytes_max: capdb_types::limits::VALUE_BYTES_MAX_DEFAULT,
            cache_bytes: 1 << 30,
            wal: crate::wal::WalConfig::default(),
        }
    }
}

impl DiskEngine {
    /// Opens (or creates) `dir/capdb.redb` and starts the writer thread, with the write-ahead
    /// log's default sizes ([`crate::wal::WalConfig`]).
    pub fn open(dir: &Path, hlc: Arc<Hlc>, value_bytes_max: usize) -> Result<DiskEngine> {
        Self::open_with(
            dir,
            hlc,
            EngineOptions {
                value_bytes_max,
                ..EngineOptions::default()
            },
        )
    }

    /// [`DiskEngine::open`] with the write-ahead log sized by `wal` (its segments and its
    /// limit): tests use a small log, to reach the limit in seconds.
    pub fn open_with_wal(
        dir: &Path,
        hlc: Arc<Hlc>,
        value_bytes_max: usize,
        wal: crate::wal::WalConfig,
    ) -> Result<DiskEngine> {
        Self::open_with(
            dir,
            hlc,
            EngineOptions {
                value_bytes_max,
                wal,
                ..EngineOptions::default()
            },
        )
    }

    /// [`DiskEngine::open`] with every size given.
    pub fn open_with(dir: &Path, hlc: Arc<Hlc>, options: EngineOptions) -> Result<DiskEngine> {
        let EngineOptions {
            value_bytes_max,
            cache_bytes,
            wal,
        } = options;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("cannot create data dir {}: {e}", dir.display())))?;
        let path = dir.join("capdb.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX));
        // After a crash redb verifies every page checksum and rebuilds its allocator state
        // before the node serves; say so, since it can take a while on a large file. If the
        // newest commit's pages fail verification redb falls back to the previous commit.
        let repair_path = path.clone();
        builder.set_repair_callback(move |session| {
            if session.progress() == 0.0 {
                tracing::warn!(file = %repair_path.display(), "database was not closed cleanly: verifying checksums and repairing before serving");
            }
        });
        let db = builder
            .create(&path)
            .map_err(|e| Error::Io(format!("cannot open database {}: {e}", path.display())))?;
        // Make sure the meta table exists so readers can always open it.
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(META_TABLE).map_err(io_err)?;
        txn.commit().map_err(io_err)?;

        let wal = crate::wal::Wal::open(&dir.join("wal"), wal)?;
        let db = Arc::new(db);
        let stats = Arc::new(EngineStats::default());
        let visible = Arc::new(visible::Visibility::default());
        let (jobs, closed) = writer::start(
            db.clone(),
            hlc,
            value_bytes_max,
            stats.clone(),
            visible.clone(),
            wal.closed(),
        )?;
        start_writeback(&path, closed.clone(), stats.clone());
        Ok(DiskEngine {
            db,
            wal,
            jobs,
            path,
            stats,
            closed,
            value_bytes_max,
            visible,
            pins: Arc::default(),
        })
    }

    /// A read transaction that sees every write answered before this call (waiting, when
    /// writes were answered but not yet committed, for the commit that holds them: `visible.rs`).
    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        self.begin_read_seen(None)
    }

    /// The data directory (the database file and the write-ahead log are in it).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// [`DiskEngine::begin_read`], or with `seen` (from [`DiskEngine::visible`]) a read
    /// transaction that sees every write answered before that call.
    fn begin_read_seen(&self, seen: Option<u64>) -> Result<redb::ReadTransaction> {
        self.visible.wait_blocking(seen)?;
        redb::ReadableDatabase::begin_read(&*self.db).map_err(io_err)
    }

    /// Waits until every write answered before this call can be read, without blocking the
    /// thread; returns the point reached, for [`DiskTable::seen`]: async readers call it
    /// before their reads so the reads themselves never wait.
    pub async fn visible(&self) -> Result<u64> {
        self.visible.wait().await
    }

    /// A handle to wait for the engine to close, usable after every engine handle is dropped.
    pub fn closed(&self) -> Closed {
        self.closed.clone()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The node's write-ahead log, where Raft groups keep their logs.
    pub fn wal(&self) -> &crate::wal::Wal {
        &self.wal
    }

    /// Size of the database file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until every write submitted before this call is durable.
    pub async fn flush(&self) -> Result<()> {
        self.submit(Op::Barrier).await?.into_done()
    }

    /// Creates a table and records its metadata, atomically.
    pub async fn create_table(
        &self,
        table: &str,
        meta_key: &str,
        meta_value: Vec<u8>,
    ) -> Result<()> {
        self.submit(Op::CreateTable {
            table: table.to_string(),
            meta_key: meta_key.to_string(),
            meta_value,
        })
        .await?
        .into_done()
    }

    /// Drops a table and its metadata, atomically.
    pub async fn drop_table(&self, table: &str, meta_key: &str) -> Result<()> {
        self.pins.release_tables(&[table]);
        self.submit(Op::DropTable {
            table: table.to_string(),
            meta_key: meta_key.to_string(),
        })
        .await?
        .into_done()
    }

    /// A handle on one table. `tombstones`: deletes write tombstones instead of removing.
    pub fn table(&self, table: &str, tombstones: bool) -> DiskTable {
        DiskTable {
            engine: self.clone(),
            table: table.to_string(),
            tombstones,
            seen: None,
        }
    }
}

/// One keyspace's table in the [`DiskEngine`].
#[derive(Clone)]
pub struct DiskTable {
    engine: DiskEngine,
    table: String,
    tombstones: bool,
    /// The reads need only see writes answered before this point ([`DiskEngine::visible`]),
    /// instead of before each read.
    seen: Option<u64>,
}

impl DiskTable {
    /// This handle's reads need only see the writes answered before `seen`, a point
    /// [`DiskEngine::visible`] returned (so they never wait for newer commits).
    pub fn seen(mut self, seen: u64) -> DiskTable {
        self.seen = Some(seen);
        self
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        self.engine.begin_read_seen(self.seen)
    }
}
