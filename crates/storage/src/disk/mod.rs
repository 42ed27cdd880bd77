//! The durable engine: one redb file per node, one table per keyspace, group commit.
//!
//! # Write path
//!
//! Callers send a [`Job`] over a bounded channel to the single writer thread and await its reply.
//! The writer takes everything queued (up to [`BATCH_JOBS_MAX`] jobs or [`BATCH_BYTES_MAX`]
//! bytes), applies it in one redb write transaction, commits with `Durability::Immediate` (one
//! fsync for the whole batch) and only then answers every job. While one batch is being fsync'd
//! the next one queues up, so throughput grows with concurrency instead of being capped at one
//! write per fsync. Read-modify-write commands (INCR, APPEND, SET NX) run inside the writer, so
//! they are atomic without locks.
//!
//! A storage error fails the whole batch (the transaction is aborted, nothing of it is applied,
//! every caller gets [`Error::Io`]); a semantic error (INCR of a non-integer) fails its mutation
//! only.
//!
//! # Read path
//!
//! Reads open a redb read transaction (an MVCC snapshot of the last commit) on the caller's
//! thread; they never wait for the writer and only ever see committed, fsync'd data.
//!
//! # Integrity
//!
//! Every value carries a CRC-32 ([`capdb_types::value`]); a mismatch is reported as
//! [`Error::Corruption`], counted in [`EngineStats::corruptions`] and never served. redb itself
//! checksums its pages and repairs its allocator state after a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use capdb_types::{Effect, Error, Hlc, Mutation, Reply, Result, Timestamp, Value};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableError,
};
use tokio::sync::{mpsc, oneshot};

use crate::{BatchReplies, KeyspaceStore, ScanPage, ScanRange};

/// Jobs waiting for the writer. A full queue makes callers wait (backpressure), it never grows.
pub const WRITE_QUEUE_JOBS_MAX: usize = 16_384;
/// Most jobs committed in one transaction.
pub const BATCH_JOBS_MAX: usize = 4_096;
/// Most payload bytes committed in one transaction (a batch may exceed it by one job).
pub const BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most stored entries a scan page examines (live or not) before returning, so a range full of
/// expired keys or tombstones cannot make one call unbounded.
pub const SCAN_EXAMINE_MAX: usize = 100_000;

const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("_meta");

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

/// A table's content and chosen `_meta` entries, read from one consistent snapshot
/// (snapshot build).
pub struct TableDump {
    /// Every `(key, encoded value)` of the table, in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// The requested `_meta` values, in the order of the requested keys.
    pub meta: Vec<Option<Vec<u8>>>,
    /// Every `_meta` entry under the requested prefix, in key order.
    pub meta_prefixed: Vec<(String, Vec<u8>)>,
}

/// A `_meta` change: put (`Some`) or delete (`None`).
pub type MetaItem = (String, Option<Vec<u8>>);

/// Stores the replies of a range of an [`DiskEngine::apply_replicated`] call's mutations in
/// `_meta`, in the same transaction as the mutations: the value is `prefix` followed by the
/// postcard encoding of `replies[first..first + count]` (a `Vec<Result<Reply>>`). Replicated
/// state machines use it to remember what a request answered, so a retry of it can be answered
/// the same way instead of being applied again.
#[derive(Debug, Clone)]
pub struct RememberReplies {
    pub key: String,
    pub prefix: Vec<u8>,
    pub first: usize,
    pub count: usize,
}

/// Counters exposed as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Transactions committed (each is one fsync).
    pub commits: AtomicU64,
    /// Jobs acknowledged by those commits.
    pub jobs: AtomicU64,
    /// Total time spent applying and committing batches (microseconds).
    pub commit_micros: AtomicU64,
    /// Of which in redb's commit call: page writes and the fsync (microseconds).
    pub sync_micros: AtomicU64,
    /// Values that failed their checksum on read.
    pub corruptions: AtomicU64,
}

enum Op {
    Apply {
        table: String,
        tombstones: bool,
        mutations: Vec<Mutation>,
        now_ms: u64,
    },
    /// Deletes the given keys if they are still expired at `now_ms` (active expiry). In a
    /// table with tombstones (`ap`) an expired value becomes a tombstone with its timestamp
    /// instead, so replicas converge on the deletion rather than resurrecting older values.
    RemoveExpired {
        table: String,
        keys: Vec<Bytes>,
        now_ms: u64,
        tombstones: bool,
    },
    Clear {
        table: String,
    },
    CreateTable {
        table: String,
        meta_key: String,
        meta_value: Vec<u8>,
    },
    DropTable {
        table: String,
        meta_key: String,
    },
    /// Completes once every job queued before it is durable.
    Barrier,
    /// `ap` replication: merges incoming versions into a table (`capdb_types::merge`);
    /// replies with how many keys changed.
    Merge {
        table: String,
        entries: Vec<(Bytes, Value)>,
    },
    /// `ap` counters: this node's increment of a key's PN-counter, read-modify-write under the
    /// writer (so increments of one node never race); replies with the new version.
    CounterAdd {
        table: String,
        key: Bytes,
        node: u64,
        delta: i64,
        timestamp: Timestamp,
        now_ms: u64,
    },
    /// `ap` tombstone collection: removes each key whose stored version is still the tombstone
    /// with exactly this timestamp (a newer write is kept).
    PurgeTombstones {
        table: String,
        entries: Vec<(Bytes, Timestamp)>,
    },
    /// Applies the mutations of committed Raft entries to a shard table, with the leader's
    /// timestamps, and records the applied state in `_meta` in the same transaction. Not durable
    /// by itself: the Raft log is, and replaying it restores anything lost (see `durable`).
    ApplyReplicated {
        table: String,
        mutations: Vec<(Mutation, Timestamp, u64)>,
        meta: Vec<MetaItem>,
        remember: Vec<RememberReplies>,
    },
    /// Appends records to a log table (u64 index -> bytes).
    LogAppend {
        table: String,
        records: Vec<(u64, Vec<u8>)>,
    },
    /// Deletes log records with index in `from..=to` (`to: None` = to the end).
    LogRemove {
        table: String,
        from: u64,
        to: Option<u64>,
    },
    /// Puts (`Some`) or deletes (`None`) `_meta` entries.
    MetaPut {
        items: Vec<(String, Option<Vec<u8>>)>,
        durable: bool,
    },
    /// Replaces a table's whole content (snapshot install): deletes every `_meta` entry under
    /// `clear_meta_prefix`, then sets `_meta` entries.
    ReplaceTable {
        table: String,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        clear_meta_prefix: Option<String>,
        meta: Vec<MetaItem>,
    },
    /// Deletes tables (data and log) and `_meta` entries (by key and by prefix) of a group this
    /// node no longer holds.
    DropGroup {
        tables: Vec<String>,
        log_tables: Vec<String>,
        meta_keys: Vec<String>,
        meta_prefixes: Vec<String>,
    },
}

impl Op {
    fn payload_bytes(&self) -> usize {
        match self {
            Op::Apply { mutations, .. } => mutations
                .iter()
                .map(|m| {
                    m.key().len()
                        + match m {
                            Mutation::Set { value, .. } => value.len(),
                            Mutation::Append { data, .. } => data.len(),
                            _ => 0,
                        }
                })
                .sum(),
            Op::RemoveExpired { keys, .. } => keys.iter().map(|k| k.len()).sum(),
            Op::Merge { entries, .. } => entries.iter().map(|(k, v)| k.len() + v.data.len()).sum(),
            Op::PurgeTombstones { entries, .. } => entries.iter().map(|(k, _)| k.len() + 8).sum(),
            Op::LogAppend { records, .. } => records.iter().map(|(_, r)| r.len() + 8).sum(),
            Op::ReplaceTable { entries, .. } => {
                entries.iter().map(|(k, v)| k.len() + v.len()).sum()
            }
            Op::ApplyReplicated { mutations, .. } => mutations
                .iter()
                .map(|(m, _, _)| {
                    m.key().len()
                        + match m {
                            Mutation::Set { value, .. } => value.len(),
                            Mutation::Append { data, .. } => data.len(),
                            _ => 0,
                        }
                })
                .sum(),
            _ => 0,
        }
    }

    /// Whether the job's acknowledgement must wait for an fsync. A batch made only of
    /// non-durable jobs commits without one; any durable job makes the whole batch (and every
    /// earlier non-durable commit) durable.
    fn durable(&self) -> bool {
        match self {
            Op::ApplyReplicated { .. } => false,
            Op::MetaPut { durable, .. } => *durable,
            _ => true,
        }
    }
}

enum Output {
    Replies(BatchReplies),
    /// The new version written by `CounterAdd`.
    Value(Value),
    /// Replies of `ApplyReplicated`, one per mutation.
    Count(u64),
    Done,
    /// The job failed alone (e.g. its table was dropped); the rest of the batch committed.
    Failed(Error),
}

struct Job {
    op: Op,
    done: oneshot::Sender<Result<Output>>,
}

/// The node's durable engine. Cheap to clone; the writer thread stops when the last clone drops.
#[derive(Clone)]
pub struct DiskEngine {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    stats: Arc<EngineStats>,
    closed: Closed,
}

/// Signals when the writer thread has stopped and released its handle on the database. The file
/// is closed cleanly (no repair at next open) once every engine handle has been dropped.
#[derive(Clone)]
pub struct Closed(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Closed {
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

impl DiskEngine {
    /// Opens (or creates) `dir/capdb.redb` and starts the writer thread.
    pub fn open(dir: &Path, hlc: Arc<Hlc>, value_bytes_max: usize) -> Result<DiskEngine> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("cannot create data dir {}: {e}", dir.display())))?;
        let path = dir.join("capdb.redb");
        let mut builder = Database::builder();
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

        let db = Arc::new(db);
        let stats = Arc::new(EngineStats::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_JOBS_MAX);
        let writer_db = db.clone();
        let writer_stats = stats.clone();
        let closed = Closed(Arc::default());
        let writer_closed = closed.clone();
        std::thread::Builder::new()
            .name("capdb-writer".into())
            .spawn(move || {
                writer_loop(&writer_db, rx, &hlc, value_bytes_max, &writer_stats);
                // Dropping the last handle closes the file cleanly.
                drop(writer_db);
                let (lock, cvar) = &*writer_closed.0;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cvar.notify_all();
            })
            .map_err(|e| Error::Io(format!("cannot start writer thread: {e}")))?;
        Ok(DiskEngine {
            db,
            jobs: tx,
            path,
            stats,
            closed,
        })
    }

    /// A handle to wait for the engine to close, usable after every engine handle is dropped.
    pub fn closed(&self) -> Closed {
        self.closed.clone()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Size of the database file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    async fn submit(&self, op: Op) -> Result<Output> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { op, done })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match wait
            .await
            .map_err(|_| Error::Io("storage writer stopped".into()))??
        {
            Output::Failed(e) => Err(e),
            out => Ok(out),
        }
    }

    /// Waits until every write submitted before this call is durable.
    pub async fn flush(&self) -> Result<()> {
        self.submit(Op::Barrier).await.map(|_| ())
    }

    /// Every `(key, value)` of the meta table whose key starts with `prefix`.
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META_TABLE).map_err(io_err)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
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
        .await
        .map(|_| ())
    }

    /// Drops a table and its metadata, atomically.
    pub async fn drop_table(&self, table: &str, meta_key: &str) -> Result<()> {
        self.submit(Op::DropTable {
            table: table.to_string(),
            meta_key: meta_key.to_string(),
        })
        .await
        .map(|_| ())
    }

    // ---- Support for Raft groups (log storage and replicated state machines) ----

    /// Queues a log append and returns once it is queued (ordered after every earlier write);
    /// `done` runs after the append is durable (or failed).
    pub async fn log_append(
        &self,
        table: &str,
        records: Vec<(u64, Vec<u8>)>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                op: Op::LogAppend {
                    table: table.to_string(),
                    records,
                },
                done: tx,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::spawn(async move {
            let result = match rx.await {
                Ok(Ok(Output::Failed(e))) | Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => Ok(()),
                Err(_) => Err(Error::Io("storage writer stopped".into())),
            };
            done(result);
        });
        Ok(())
    }

    /// Deletes log records `from..=to` (`None`: to the end) and waits until that is durable.
    pub async fn log_remove(&self, table: &str, from: u64, to: Option<u64>) -> Result<()> {
        self.submit(Op::LogRemove {
            table: table.to_string(),
            from,
            to,
        })
        .await
        .map(|_| ())
    }

    /// Log records with index in `from..to`, in order.
    pub fn log_read(&self, table: &str, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(e)),
        };
        let mut out = Vec::new();
        for entry in t.range(from..to).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The first record of a log table.
    pub fn log_first(&self, table: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let first = t.first().map_err(io_err)?;
        Ok(first.map(|(k, v)| (k.value(), v.value().to_vec())))
    }

    /// The last record of a log table.
    pub fn log_last(&self, table: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = match txn.open_table(log_def(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let last = t.last().map_err(io_err)?;
        Ok(last.map(|(k, v)| (k.value(), v.value().to_vec())))
    }

    /// Puts or deletes `_meta` entries; waits for durability when `durable`.
    pub async fn meta_put(
        &self,
        items: Vec<(String, Option<Vec<u8>>)>,
        durable: bool,
    ) -> Result<()> {
        self.submit(Op::MetaPut { items, durable })
            .await
            .map(|_| ())
    }

    /// One `_meta` entry.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META_TABLE).map_err(io_err)?;
        Ok(table.get(key).map_err(io_err)?.map(|v| v.value().to_vec()))
    }

    /// Applies replicated mutations `(mutation, leader timestamp, leader now_ms)` to `table`
    /// and records `meta` (the applied state) and the `remember`ed replies atomically with them.
    pub async fn apply_replicated(
        &self,
        table: &str,
        mutations: Vec<(Mutation, Timestamp, u64)>,
        meta: Vec<MetaItem>,
        remember: Vec<RememberReplies>,
    ) -> Result<BatchReplies> {
        match self
            .submit(Op::ApplyReplicated {
                table: table.to_string(),
                mutations,
                meta,
                remember,
            })
            .await?
        {
            Output::Replies(r) => Ok(r),
            _ => unreachable!("ApplyReplicated yields replies"),
        }
    }

    /// Replaces a table's content, deletes the `_meta` entries under `clear_meta_prefix` and
    /// sets `meta`, durably and atomically (snapshot install, FLUSHDB).
    pub async fn replace_table(
        &self,
        table: &str,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        clear_meta_prefix: Option<String>,
        meta: Vec<MetaItem>,
    ) -> Result<()> {
        self.submit(Op::ReplaceTable {
            table: table.to_string(),
            entries,
            clear_meta_prefix,
            meta,
        })
        .await
        .map(|_| ())
    }

    /// Every `(key, encoded value)` of a table plus the given `_meta` entries and those under
    /// `meta_prefix`, from one consistent snapshot (snapshot build).
    pub fn dump_table(
        &self,
        table: &str,
        meta_keys: &[String],
        meta_prefix: &str,
    ) -> Result<TableDump> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let meta_table = txn.open_table(META_TABLE).map_err(io_err)?;
        let meta = meta_keys
            .iter()
            .map(|k| {
                meta_table
                    .get(k.as_str())
                    .map(|v| v.map(|v| v.value().to_vec()))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(io_err)?;
        let mut meta_prefixed = Vec::new();
        for entry in meta_table.range(meta_prefix..).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            if !k.value().starts_with(meta_prefix) {
                break;
            }
            meta_prefixed.push((k.value().to_string(), v.value().to_vec()));
        }
        let entries = match txn.open_table(table_def(table)) {
            Ok(t) => {
                let mut out = Vec::new();
                for e in t.iter().map_err(io_err)? {
                    let (k, v) = e.map_err(io_err)?;
                    out.push((k.value().to_vec(), v.value().to_vec()));
                }
                out
            }
            Err(TableError::TableDoesNotExist(_)) => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        Ok(TableDump {
            entries,
            meta,
            meta_prefixed,
        })
    }

    /// Deletes a group's tables and `_meta` entries (by key and by prefix).
    pub async fn drop_group(
        &self,
        tables: Vec<String>,
        log_tables: Vec<String>,
        meta_keys: Vec<String>,
        meta_prefixes: Vec<String>,
    ) -> Result<()> {
        self.submit(Op::DropGroup {
            tables,
            log_tables,
            meta_keys,
            meta_prefixes,
        })
        .await
        .map(|_| ())
    }

    /// A handle on one table. `tombstones`: deletes write tombstones instead of removing.
    pub fn table(&self, table: &str, tombstones: bool) -> DiskTable {
        DiskTable {
            engine: self.clone(),
            table: table.to_string(),
            tombstones,
        }
    }
}

/// One keyspace's table in the [`DiskEngine`].
#[derive(Clone)]
pub struct DiskTable {
    engine: DiskEngine,
    table: String,
    tombstones: bool,
}

impl DiskTable {
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T>,
    ) -> Result<Option<T>> {
        let txn = self.engine.db.begin_read().map_err(io_err)?;
        match txn.open_table(table_def(&self.table)) {
            Ok(t) => f(&t).map(Some),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    fn decode(&self, raw: &[u8]) -> Result<Value> {
        Value::decode(raw).inspect_err(|e| {
            self.engine
                .stats
                .corruptions
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(table = %self.table, error = %e, "corrupt value refused");
        })
    }

    /// Active expiry: examines up to `examine` keys after `after` and deletes those that have
    /// expired. Returns where to continue (`None`: wrapped around to the start).
    pub async fn sweep_expired(
        &self,
        after: Option<Bytes>,
        examine: usize,
        now_ms: u64,
    ) -> Result<(Option<Bytes>, u64)> {
        let found = self.read(|t| {
            let mut expired = Vec::new();
            let mut last = None;
            let iter = match &after {
                Some(a) => t.range::<&[u8]>((
                    std::ops::Bound::Excluded(&a[..]),
                    std::ops::Bound::Unbounded,
                )),
                None => t.range::<&[u8]>(..),
            }
            .map_err(io_err)?;
            for entry in iter.take(examine) {
                let (k, v) = entry.map_err(io_err)?;
                let key = Bytes::copy_from_slice(k.value());
                if let Ok(value) = Value::decode(v.value())
                    && value.is_expired(now_ms)
                {
                    expired.push(key.clone());
                }
                last = Some(key);
            }
            Ok((expired, last))
        })?;
        let Some((expired, last)) = found else {
            return Ok((None, 0));
        };
        let removed = if expired.is_empty() {
            0
        } else {
            match self
                .engine
                .submit(Op::RemoveExpired {
                    table: self.table.clone(),
                    keys: expired,
                    now_ms,
                    tombstones: self.tombstones,
                })
                .await?
            {
                Output::Count(n) => n,
                _ => 0,
            }
        };
        Ok((last, removed))
    }
}

/// `ap` replica operations: raw versions (tombstones and expired values included), merges.
impl DiskTable {
    /// The stored version of `key`, whatever its state.
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Value>> {
        Ok(self
            .read(|t| match t.get(key).map_err(io_err)? {
                Some(raw) => self.decode(raw.value()).map(Some),
                None => Ok(None),
            })?
            .flatten())
    }

    /// Calls `f` on every stored version in key order (tombstones included) until it returns
    /// false. Corrupt records are reported and skipped.
    pub fn for_each_raw(&self, f: impl FnMut(&[u8], Value) -> bool) -> Result<()> {
        self.for_each_raw_after(None, f)
    }

    /// Like [`DiskTable::for_each_raw`], starting after `after` (exclusive).
    pub fn for_each_raw_after(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], Value) -> bool,
    ) -> Result<()> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.read(|t| {
            for entry in t
                .range::<&[u8]>((lower, Bound::Unbounded))
                .map_err(io_err)?
            {
                let (k, v) = entry.map_err(io_err)?;
                if let Ok(value) = self.decode(v.value())
                    && !f(k.value(), value)
                {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Merges versions from other replicas; returns how many keys changed. Durable when it
    /// returns.
    pub async fn merge(&self, entries: Vec<(Bytes, Value)>) -> Result<u64> {
        match self
            .engine
            .submit(Op::Merge {
                table: self.table.clone(),
                entries,
            })
            .await?
        {
            Output::Count(n) => Ok(n),
            _ => unreachable!("Merge yields a count"),
        }
    }

    /// This node's increment of a counter; returns the new version. Durable when it returns.
    pub async fn counter_add(
        &self,
        key: Bytes,
        node: u64,
        delta: i64,
        timestamp: capdb_types::Timestamp,
        now_ms: u64,
    ) -> Result<Value> {
        match self
            .engine
            .submit(Op::CounterAdd {
                table: self.table.clone(),
                key,
                node,
                delta,
                timestamp,
                now_ms,
            })
            .await?
        {
            Output::Value(v) => Ok(v),
            _ => unreachable!("CounterAdd yields a value"),
        }
    }

    /// Removes tombstones every replica is known to hold; returns how many went.
    pub async fn purge_tombstones(
        &self,
        entries: Vec<(Bytes, capdb_types::Timestamp)>,
    ) -> Result<u64> {
        match self
            .engine
            .submit(Op::PurgeTombstones {
                table: self.table.clone(),
                entries,
            })
            .await?
        {
            Output::Count(n) => Ok(n),
            _ => unreachable!("PurgeTombstones yields a count"),
        }
    }
}

impl KeyspaceStore for DiskTable {
    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>> {
        let found = self.read(|t| match t.get(key).map_err(io_err)? {
            Some(raw) => self.decode(raw.value()).map(Some),
            None => Ok(None),
        })?;
        Ok(found.flatten().filter(|v| v.is_live(now_ms)))
    }

    async fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<BatchReplies> {
        match self
            .engine
            .submit(Op::Apply {
                table: self.table.clone(),
                tombstones: self.tombstones,
                mutations,
                now_ms,
            })
            .await?
        {
            Output::Replies(r) => Ok(r),
            _ => unreachable!("Apply always yields replies"),
        }
    }

    fn scan(&self, range: &ScanRange, limit: usize, now_ms: u64) -> Result<ScanPage> {
        use std::ops::Bound;
        // The lower bound is the greater of `after` (exclusive) and `prefix` (inclusive).
        let lower = match (&range.after, &range.prefix) {
            (Some(a), Some(p)) if p[..] > a[..] => Bound::Included(&p[..]),
            (Some(a), _) => Bound::Excluded(&a[..]),
            (None, Some(p)) => Bound::Included(&p[..]),
            (None, None) => Bound::Unbounded,
        };
        let upper = match &range.end {
            Some(e) => Bound::Excluded(&e[..]),
            None => Bound::Unbounded,
        };
        if let (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u)) = (lower, upper)
            && l >= u
        {
            return Ok(ScanPage::default());
        }
        let page = self.read(|t| {
            let mut page = ScanPage::default();
            let mut examined = 0usize;
            for entry in t.range::<&[u8]>((lower, upper)).map_err(io_err)? {
                let (k, v) = entry.map_err(io_err)?;
                let key = k.value();
                if let Some(p) = &range.prefix
                    && !key.starts_with(p)
                {
                    return Ok(page_done(page));
                }
                examined += 1;
                let value = self.decode(v.value())?;
                if value.is_live(now_ms) {
                    page.entries.push((Bytes::copy_from_slice(key), value));
                }
                if page.entries.len() >= limit || examined >= SCAN_EXAMINE_MAX {
                    page.next_after = Some(Bytes::copy_from_slice(key));
                    return Ok(page);
                }
            }
            Ok(page_done(page))
        })?;
        Ok(page.unwrap_or_default())
    }

    fn len(&self) -> Result<u64> {
        let n = self.read(|t| {
            if !self.tombstones {
                return t.len().map_err(io_err);
            }
            let mut live = 0;
            for entry in t.iter().map_err(io_err)? {
                let (_, v) = entry.map_err(io_err)?;
                if !self.decode(v.value())?.header.tombstone {
                    live += 1;
                }
            }
            Ok(live)
        })?;
        Ok(n.unwrap_or(0))
    }

    async fn clear(&self) -> Result<()> {
        self.engine
            .submit(Op::Clear {
                table: self.table.clone(),
            })
            .await
            .map(|_| ())
    }
}

fn page_done(mut page: ScanPage) -> ScanPage {
    page.next_after = None;
    page
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
) {
    // Tables that exist: a write to a table dropped after the write was queued must fail, not
    // silently re-create the table (redb's open_table creates missing tables).
    let mut live_tables: std::collections::HashSet<String> = match list_tables(db) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot list tables; storage writer stopping");
            return;
        }
    };
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH_JOBS_MAX);
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.op.payload_bytes();
        batch.push(first);
        while batch.len() < BATCH_JOBS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.op.payload_bytes();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let before = live_tables.clone();
        let result = commit_batch(db, &batch, hlc, value_bytes_max, stats, &mut live_tables);
        if result.is_err() {
            live_tables = before;
        }
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(outputs) => {
                debug_assert_eq!(outputs.len(), batch.len());
                for (job, out) in batch.drain(..).zip(outputs) {
                    let _ = job.done.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "write batch failed; nothing of it was applied");
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("storage writer stopped: all engine handles dropped");
}

fn list_tables(db: &Database) -> Result<std::collections::HashSet<String>> {
    use redb::TableHandle;
    let txn = db.begin_read().map_err(io_err)?;
    let names = txn
        .list_tables()
        .map_err(io_err)?
        .map(|t| t.name().to_string())
        .collect();
    Ok(names)
}

fn commit_batch(
    db: &Database,
    batch: &[Job],
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
    live_tables: &mut std::collections::HashSet<String>,
) -> Result<Vec<Output>> {
    let mut txn = db.begin_write().map_err(io_err)?;
    // One fsync per batch: this is the durability point every acknowledgement waits for. A
    // batch of only replicated applies skips it (their Raft log entries are durable already).
    let durability = if batch.iter().any(|j| j.op.durable()) {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(durability).map_err(io_err)?;
    let mut outputs = Vec::with_capacity(batch.len());
    for job in batch {
        outputs.push(execute(
            &txn,
            &job.op,
            hlc,
            value_bytes_max,
            stats,
            live_tables,
        )?);
    }
    let syncing = Instant::now();
    txn.commit().map_err(io_err)?;
    stats
        .sync_micros
        .fetch_add(syncing.elapsed().as_micros() as u64, Ordering::Relaxed);
    Ok(outputs)
}

fn execute(
    txn: &redb::WriteTransaction,
    op: &Op,
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
    live_tables: &mut std::collections::HashSet<String>,
) -> Result<Output> {
    let missing = |table: &String| {
        Output::Failed(Error::KeyspaceNotFound(
            crate::layout::keyspace_of_table(table).to_string(),
        ))
    };
    match op {
        Op::Apply { table, .. }
        | Op::RemoveExpired { table, .. }
        | Op::Clear { table }
        | Op::Merge { table, .. }
        | Op::CounterAdd { table, .. }
        | Op::PurgeTombstones { table, .. }
            if !live_tables.contains(table) =>
        {
            Ok(missing(table))
        }
        Op::Barrier => Ok(Output::Done),
        Op::Merge { table, entries } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let mut changed = 0;
            for (key, incoming) in entries {
                hlc.observe(incoming.header.timestamp);
                let current = match t.get(&key[..]).map_err(io_err)? {
                    Some(raw) => Value::decode(raw.value()).ok(),
                    None => None,
                };
                let merged = match &current {
                    Some(c) => capdb_types::merge::merge(c, incoming),
                    None => incoming.clone(),
                };
                if current.as_ref() != Some(&merged) {
                    t.insert(&key[..], &merged.encode()[..]).map_err(io_err)?;
                    changed += 1;
                }
            }
            Ok(Output::Count(changed))
        }
        Op::CounterAdd {
            table,
            key,
            node,
            delta,
            timestamp,
            now_ms,
        } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let current = match t.get(&key[..]).map_err(io_err)? {
                Some(raw) => match Value::decode(raw.value()) {
                    Ok(v) => Some(v),
                    // Fails this job alone, not the whole batch.
                    Err(e) => return Ok(Output::Failed(e)),
                },
                None => None,
            };
            match capdb_types::merge::counter_add(
                current.as_ref(),
                *node,
                *delta,
                *timestamp,
                *now_ms,
            ) {
                Ok(v) => {
                    t.insert(&key[..], &v.encode()[..]).map_err(io_err)?;
                    Ok(Output::Value(v))
                }
                Err(e) => Ok(Output::Failed(e)),
            }
        }
        Op::PurgeTombstones { table, entries } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let mut removed = 0;
            for (key, ts) in entries {
                let still = match t.get(&key[..]).map_err(io_err)? {
                    Some(raw) => Value::decode(raw.value())
                        .is_ok_and(|v| v.header.tombstone && v.header.timestamp == *ts),
                    None => false,
                };
                if still {
                    t.remove(&key[..]).map_err(io_err)?;
                    removed += 1;
                }
            }
            Ok(Output::Count(removed))
        }
        Op::ApplyReplicated {
            table,
            mutations,
            meta,
            remember,
        } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let mut replies = Vec::with_capacity(mutations.len());
            for (m, ts, now_ms) in mutations {
                hlc.observe(*ts);
                replies.push(apply_one(
                    &mut t,
                    m,
                    false,
                    *now_ms,
                    Some(*ts),
                    hlc,
                    value_bytes_max,
                    stats,
                )?);
            }
            drop(t);
            let mut mt = txn.open_table(META_TABLE).map_err(io_err)?;
            // Replies first, then `meta`: a reply remembered and already forgotten by a later
            // entry of this batch is deleted, not left behind.
            for r in remember {
                let Some(range) = replies.get(r.first..r.first + r.count) else {
                    return Err(Error::InvalidInput(format!(
                        "replies {}..{} to remember are outside the batch of {}",
                        r.first,
                        r.first + r.count,
                        replies.len()
                    )));
                };
                let value = postcard::to_extend(range, r.prefix.clone())
                    .map_err(|e| Error::Io(format!("cannot encode replies: {e}")))?;
                mt.insert(r.key.as_str(), &value[..]).map_err(io_err)?;
            }
            put_meta(&mut mt, meta)?;
            Ok(Output::Replies(replies))
        }
        Op::LogAppend { table, records } => {
            let mut t = txn.open_table(log_def(table)).map_err(io_err)?;
            for (index, record) in records {
                t.insert(*index, &record[..]).map_err(io_err)?;
            }
            Ok(Output::Done)
        }
        Op::LogRemove { table, from, to } => {
            let mut t = txn.open_table(log_def(table)).map_err(io_err)?;
            match to {
                Some(to) if to < from => {}
                Some(to) => {
                    t.retain_in(*from..=*to, |_, _| false).map_err(io_err)?;
                }
                None => {
                    t.retain_in(*from.., |_, _| false).map_err(io_err)?;
                }
            }
            Ok(Output::Done)
        }
        Op::MetaPut { items, .. } => {
            let mut mt = txn.open_table(META_TABLE).map_err(io_err)?;
            put_meta(&mut mt, items)?;
            Ok(Output::Done)
        }
        Op::ReplaceTable {
            table,
            entries,
            clear_meta_prefix,
            meta,
        } => {
            txn.delete_table(table_def(table)).map_err(io_err)?;
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            for (k, v) in entries {
                t.insert(&k[..], &v[..]).map_err(io_err)?;
            }
            drop(t);
            let mut mt = txn.open_table(META_TABLE).map_err(io_err)?;
            if let Some(prefix) = clear_meta_prefix {
                remove_meta_prefix(&mut mt, prefix)?;
            }
            put_meta(&mut mt, meta)?;
            Ok(Output::Done)
        }
        Op::DropGroup {
            tables,
            log_tables,
            meta_keys,
            meta_prefixes,
        } => {
            for t in tables {
                txn.delete_table(table_def(t)).map_err(io_err)?;
            }
            for t in log_tables {
                txn.delete_table(log_def(t)).map_err(io_err)?;
            }
            let mut mt = txn.open_table(META_TABLE).map_err(io_err)?;
            for k in meta_keys {
                mt.remove(k.as_str()).map_err(io_err)?;
            }
            for prefix in meta_prefixes {
                remove_meta_prefix(&mut mt, prefix)?;
            }
            Ok(Output::Done)
        }
        Op::Apply {
            table,
            tombstones,
            mutations,
            now_ms,
        } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let mut replies = Vec::with_capacity(mutations.len());
            for m in mutations {
                replies.push(apply_one(
                    &mut t,
                    m,
                    *tombstones,
                    *now_ms,
                    None,
                    hlc,
                    value_bytes_max,
                    stats,
                )?);
            }
            Ok(Output::Replies(replies))
        }
        Op::RemoveExpired {
            table,
            keys,
            now_ms,
            tombstones,
        } => {
            let mut t = txn.open_table(table_def(table)).map_err(io_err)?;
            let mut removed = 0;
            for key in keys {
                let expired = match t.get(&key[..]).map_err(io_err)? {
                    Some(raw) => Value::decode(raw.value())
                        .ok()
                        .filter(|v| !v.header.tombstone && v.is_expired(*now_ms)),
                    None => None,
                };
                if let Some(v) = expired {
                    if *tombstones {
                        let tomb = Value::tombstone(v.header.timestamp);
                        t.insert(&key[..], &tomb.encode()[..]).map_err(io_err)?;
                    } else {
                        t.remove(&key[..]).map_err(io_err)?;
                    }
                    removed += 1;
                }
            }
            Ok(Output::Count(removed))
        }
        Op::Clear { table } => {
            txn.delete_table(table_def(table)).map_err(io_err)?;
            txn.open_table(table_def(table)).map_err(io_err)?;
            Ok(Output::Done)
        }
        Op::CreateTable {
            table,
            meta_key,
            meta_value,
        } => {
            txn.open_table(table_def(table)).map_err(io_err)?;
            let mut meta = txn.open_table(META_TABLE).map_err(io_err)?;
            meta.insert(meta_key.as_str(), &meta_value[..])
                .map_err(io_err)?;
            live_tables.insert(table.clone());
            Ok(Output::Done)
        }
        Op::DropTable { table, meta_key } => {
            txn.delete_table(table_def(table)).map_err(io_err)?;
            let mut meta = txn.open_table(META_TABLE).map_err(io_err)?;
            meta.remove(meta_key.as_str()).map_err(io_err)?;
            live_tables.remove(table);
            Ok(Output::Done)
        }
    }
}

/// Applies `_meta` puts and deletes.
fn put_meta(mt: &mut redb::Table<&str, &[u8]>, items: &[MetaItem]) -> Result<()> {
    for (k, v) in items {
        match v {
            Some(v) => {
                mt.insert(k.as_str(), &v[..]).map_err(io_err)?;
            }
            None => {
                mt.remove(k.as_str()).map_err(io_err)?;
            }
        }
    }
    Ok(())
}

/// Deletes every `_meta` entry whose key starts with `prefix`.
fn remove_meta_prefix(mt: &mut redb::Table<&str, &[u8]>, prefix: &str) -> Result<()> {
    let mut doomed = Vec::new();
    for entry in mt.range(prefix..).map_err(io_err)? {
        let (k, _) = entry.map_err(io_err)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        doomed.push(k.value().to_string());
    }
    for k in doomed {
        mt.remove(k.as_str()).map_err(io_err)?;
    }
    Ok(())
}

/// Applies one mutation inside the writer's transaction. `Err` only for storage failures
/// (which abort the batch); semantic failures come back as `Ok(Err(..))`.
#[allow(clippy::too_many_arguments)]
fn apply_one(
    t: &mut redb::Table<&'static [u8], &'static [u8]>,
    m: &Mutation,
    tombstones: bool,
    now_ms: u64,
    timestamp: Option<Timestamp>,
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
) -> Result<Result<Reply>> {
    let stamp = || timestamp.unwrap_or_else(|| hlc.now());
    let key = &m.key()[..];
    let stored = t
        .get(key)
        .map_err(io_err)?
        .map(|raw| Value::decode(raw.value()));
    let current = match stored {
        None => None,
        Some(Ok(v)) => v.is_live(now_ms).then_some(v),
        Some(Err(corrupt)) => {
            stats.corruptions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %corrupt, "corrupt value met by a write");
            // A write that does not depend on the old value may replace a corrupt one (this is
            // how an operator repairs a key); anything that would read it fails.
            match m {
                Mutation::Set {
                    condition: capdb_types::mutation::Condition::Always,
                    return_old: false,
                    expiry:
                        capdb_types::mutation::ExpiryUpdate::Clear
                        | capdb_types::mutation::ExpiryUpdate::At(_),
                    ..
                } => None,
                Mutation::Delete { .. } => {
                    remove(t, key, tombstones, stamp())?;
                    return Ok(Ok(Reply::Integer(1)));
                }
                _ => return Ok(Err(corrupt)),
            }
        }
    };
    let (effect, reply) = match m.apply(current.as_ref(), now_ms, stamp(), value_bytes_max) {
        Ok(done) => done,
        Err(e) => return Ok(Err(e)),
    };
    match effect {
        Effect::Unchanged => {}
        Effect::Put(v) => {
            t.insert(key, &v.encode()[..]).map_err(io_err)?;
        }
        Effect::Remove(ts) => remove(t, key, tombstones, ts)?,
    }
    Ok(Ok(reply))
}

fn remove(
    t: &mut redb::Table<&'static [u8], &'static [u8]>,
    key: &[u8],
    tombstones: bool,
    ts: capdb_types::Timestamp,
) -> Result<()> {
    if tombstones {
        t.insert(key, &Value::tombstone(ts).encode()[..])
            .map_err(io_err)?;
    } else {
        t.remove(key).map_err(io_err)?;
    }
    Ok(())
}
