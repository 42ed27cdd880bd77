//! Support for Raft groups, part 2: replicated state machines. Applying committed entries (with
//! the applied state and remembered replies in the same transaction), snapshots read in pages
//! from one read transaction ([`DiskEngine::table_snapshot`]) and installed from a stream of
//! row batches ([`DiskEngine::replace_table_from`]), and dropping a group this node no longer
//! holds. Part 1, the log, is in `log.rs`.
//!
//! A snapshot is never materialised whole: a 10 M-key shard is GBs, and Raft snapshots each
//! group every few thousand entries. The sender pages through a [`TableSnapshot`] (a redb read
//! transaction, so applies go on meanwhile) and the receiver's rows arrive from its spool
//! batch by batch, so each side holds one page at a time.

use capdb_types::{Mutation, Result, Timestamp};
use redb::TableError;

use super::meta::MetaItem;
use super::ops::Op;
use super::{DiskEngine, META_TABLE, io_err, table_def};
use crate::BatchReplies;

/// A queued job's answer, to be awaited later.
pub type Queued<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

/// A table's content and chosen `_meta` entries, read from one consistent snapshot (tests and
/// tools; Raft pages through a [`TableSnapshot`] instead).
pub struct TableDump {
    /// Every `(key, encoded value)` of the table, in key order.
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Every row of its element table (collections' elements, id counter, reclaim queue).
    pub elements: Vec<(Vec<u8>, Vec<u8>)>,
    /// The requested `_meta` values, in the order of the requested keys.
    pub meta: Vec<Option<Vec<u8>>>,
    /// Every `_meta` entry under the requested prefix, in key order.
    pub meta_prefixed: Vec<(String, Vec<u8>)>,
}

/// Which of a shard's two tables a page of snapshot rows belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotTable {
    /// The keys and their values.
    Data,
    /// The element table (collections' elements, the id counter, the reclaim queue, the
    /// change log's and views' rows).
    Elements,
}

/// One batch of rows of a snapshot being installed, in key order within its table.
pub type SnapshotRows = (SnapshotTable, Vec<(Vec<u8>, Vec<u8>)>);

/// Where [`DiskEngine::replace_table_from`] reads the rows it installs, batch by batch, on the
/// writer thread (a spooled snapshot: the receiver never holds it whole). An `Err` aborts the
/// install: nothing of it is committed.
pub type RowSource = Box<dyn Iterator<Item = Result<SnapshotRows>> + Send>;

/// A group's state machine as of one redb read transaction: what a Raft snapshot sends, read
/// page by page when it is sent ([`TableSnapshot::page`]). Applies continue meanwhile; the
/// transaction keeps the pages it sees from being reused until it is dropped, so it is held
/// only while a snapshot is being sent.
pub struct TableSnapshot {
    txn: redb::ReadTransaction,
    table: String,
    /// The requested `_meta` values, in the order of the requested keys.
    pub meta: Vec<Option<Vec<u8>>>,
    /// Every `_meta` entry under the requested prefix, in key order.
    pub meta_prefixed: Vec<(String, Vec<u8>)>,
}

/// A page of a [`TableSnapshot`]: rows in key order, and the key to continue after (`None`:
/// the table is done).
pub type SnapshotPage = (Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>);

impl TableSnapshot {
    /// The rows of `which` after `after` (from the first with `None`), up to about `bytes_max`
    /// bytes of keys and values (at least one row).
    pub fn page(
        &self,
        which: SnapshotTable,
        after: Option<&[u8]>,
        bytes_max: usize,
    ) -> Result<SnapshotPage> {
        let name = match which {
            SnapshotTable::Data => self.table.clone(),
            SnapshotTable::Elements => crate::layout::element_table(&self.table),
        };
        let t = match self.txn.open_table(table_def(&name)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), None)),
            Err(e) => return Err(io_err(e)),
        };
        let lower = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let mut rows = Vec::new();
        let mut bytes = 0;
        for e in t
            .range::<&[u8]>((lower, std::ops::Bound::Unbounded))
            .map_err(io_err)?
        {
            let (k, v) = e.map_err(io_err)?;
            if bytes >= bytes_max {
                let next = rows.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| k.clone());
                return Ok((rows, next));
            }
            bytes += k.value().len() + v.value().len();
            rows.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok((rows, None))
    }
}

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

impl DiskEngine {
    /// Applies replicated mutations `(mutation, leader timestamp, leader now_ms, log index)` to
    /// `table` and records `meta` (the applied state) and the `remember`ed replies atomically
    /// with them; every key a mutation changed is recorded as touched at its log index (WATCH,
    /// `touched.rs`) while recording is on, which `watch_points` (WATCH's entries among the
    /// applied ones, by log index) turn on. With `guards` (a transaction), nothing is applied
    /// unless every guard holds, and the replies start with the verdict (OK, or the null
    /// array: aborted).
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_replicated(
        &self,
        table: &str,
        mutations: Vec<(Mutation, Timestamp, u64, u64)>,
        meta: Vec<MetaItem>,
        remember: Vec<RememberReplies>,
        guards: Vec<super::WatchGuard>,
        watch_points: Vec<u64>,
    ) -> Result<BatchReplies> {
        self.submit(Op::ApplyReplicated {
            table: table.to_string(),
            mutations,
            meta,
            remember,
            guards,
            watch_points,
        })
        .await?
        .into_replies()
    }

    /// Applies one step of a cross-shard transaction at this participant shard (`txn.rs`) and
    /// records `meta` (the applied state) and the `remember`ed answer with it. `Err`: storage
    /// failed, or the step broke the protocol (nothing changed).
    pub async fn txn_step(
        &self,
        table: &str,
        job: super::TxnJob,
        meta: Vec<MetaItem>,
        remember: Option<(String, super::RememberAnswer)>,
    ) -> Result<super::TxnAnswer> {
        self.submit(Op::TxnStep {
            table: table.to_string(),
            job,
            meta,
            remember,
        })
        .await?
        .into_txn()
    }

    /// [`DiskEngine::txn_step`], queued now and answered later: the step is behind every job
    /// queued before this call and ahead of every job queued after it, so a state machine can
    /// queue the steps of a run of entries without waiting for each (the writer commits them
    /// together) and collect the answers at the end.
    pub async fn txn_step_queued(
        &self,
        table: &str,
        job: super::TxnJob,
        meta: Vec<MetaItem>,
        remember: Option<(String, super::RememberAnswer)>,
    ) -> Result<Queued<super::TxnAnswer>> {
        let wait = self
            .enqueue(Op::TxnStep {
                table: table.to_string(),
                job,
                meta,
                remember,
            })
            .await?;
        Ok(Box::pin(async move {
            super::writer::answer(wait.await)?.into_txn()
        }))
    }

    /// Replaces a table's content, deletes the `_meta` entries under `clear_meta_prefix` and
    /// sets `meta`, durably and atomically (FLUSHDB, tests). `keep_changes` (FLUSHDB, the
    /// entry's log index): the shard's change log stays on with its rows and logs a `flush`
    /// event; else (a snapshot) its rows go. [`DiskEngine::replace_table_from`] with the rows
    /// in memory.
    pub async fn replace_table(
        &self,
        table: &str,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        elements: Vec<(Vec<u8>, Vec<u8>)>,
        clear_meta_prefix: Option<String>,
        meta: Vec<MetaItem>,
        keep_changes: Option<u64>,
    ) -> Result<()> {
        let bytes = entries
            .iter()
            .chain(&elements)
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let rows: Vec<Result<SnapshotRows>> = vec![
            Ok((SnapshotTable::Data, entries)),
            Ok((SnapshotTable::Elements, elements)),
        ];
        self.replace_table_from(
            table,
            Box::new(rows.into_iter()),
            bytes,
            clear_meta_prefix,
            meta,
            keep_changes,
        )
        .await
    }

    /// [`DiskEngine::replace_table`] with the rows read from `rows` batch by batch inside the
    /// one write transaction (snapshot install from a spool); `bytes` is about how many bytes
    /// they are (the writer's batch bound). An error from `rows` installs nothing.
    pub async fn replace_table_from(
        &self,
        table: &str,
        rows: RowSource,
        bytes: usize,
        clear_meta_prefix: Option<String>,
        meta: Vec<MetaItem>,
        keep_changes: Option<u64>,
    ) -> Result<()> {
        // A snapshot installed (not a FLUSHDB, which keeps the shard's log): the replica no
        // longer holds the shard as of its pins.
        if keep_changes.is_none() {
            self.pins.release_tables(&[table]);
        }
        self.submit(Op::ReplaceTable {
            keep_changes,
            table: table.to_string(),
            rows: std::sync::Mutex::new(Some(rows)),
            bytes,
            clear_meta_prefix,
            meta,
        })
        .await?
        .into_done()
    }

    /// Turns a shard's change log on or off, sets its retention or trims it (`step`) at log
    /// index `index`, with the applied state
    /// `meta`, in one storage transaction (not durable by itself, like an apply).
    /// Answers what the step answers (an error inside: refused, nothing changed), remembered
    /// under `remember` in the same transaction.
    pub async fn changes_config(
        &self,
        table: &str,
        step: super::ChangesStep,
        index: u64,
        meta: Vec<MetaItem>,
        remember: Option<(String, super::RememberReply)>,
    ) -> Result<Result<capdb_types::Reply>> {
        self.submit(Op::ChangesConfig {
            table: table.to_string(),
            step,
            index,
            meta,
            remember,
        })
        .await?
        .into_answer()
    }

    /// A group's state machine as of now: `table`'s rows (and its element table's) to be
    /// read page by page, with the given `_meta` entries and those under `meta_prefix`, all
    /// from one read transaction (a Raft snapshot; the applied state is among the entries).
    pub fn table_snapshot(
        &self,
        table: &str,
        meta_keys: &[String],
        meta_prefix: &str,
    ) -> Result<TableSnapshot> {
        let txn = self.begin_read()?;
        let (meta, meta_prefixed) = {
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
            (meta, super::meta::meta_prefixed(&meta_table, meta_prefix)?)
        };
        Ok(TableSnapshot {
            txn,
            table: table.to_string(),
            meta,
            meta_prefixed,
        })
    }

    /// Every `(key, encoded value)` of a table plus the given `_meta` entries and those under
    /// `meta_prefix`, from one consistent snapshot, in memory (tests and tools).
    pub fn dump_table(
        &self,
        table: &str,
        meta_keys: &[String],
        meta_prefix: &str,
    ) -> Result<TableDump> {
        let snap = self.table_snapshot(table, meta_keys, meta_prefix)?;
        let all = |which| -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            let mut out = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (rows, next) = snap.page(which, after.as_deref(), 1 << 20)?;
                out.extend(rows);
                match next {
                    Some(n) => after = Some(n),
                    None => return Ok(out),
                }
            }
        };
        Ok(TableDump {
            entries: all(SnapshotTable::Data)?,
            elements: all(SnapshotTable::Elements)?,
            meta: snap.meta.clone(),
            meta_prefixed: snap.meta_prefixed.clone(),
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
        let names: Vec<&str> = tables.iter().map(String::as_str).collect();
        self.pins.release_tables(&names);
        self.submit(Op::DropGroup {
            tables,
            log_tables,
            meta_keys,
            meta_prefixes,
        })
        .await?
        .into_done()
    }
}
