//! Support for Raft groups, part 2: replicated state machines. Applying committed entries (with
//! the applied state and remembered replies in the same transaction), snapshot build
//! ([`DiskEngine::dump_table`]) and install ([`DiskEngine::replace_table`]), and dropping a
//! group this node no longer holds. Part 1, the log, is in `log.rs`.

use capdb_types::{Mutation, Result, Timestamp};
use redb::{ReadableTable, TableError};

use super::meta::MetaItem;
use super::ops::Op;
use super::{DiskEngine, META_TABLE, io_err, table_def};
use crate::BatchReplies;

/// A queued job's answer, to be awaited later.
pub type Queued<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

/// A table's content and chosen `_meta` entries, read from one consistent snapshot
/// (snapshot build).
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
    /// sets `meta`, durably and atomically (snapshot install, FLUSHDB). `keep_changes`
    /// (FLUSHDB, the entry's log index): the shard's change log stays on with its rows and
    /// logs a `flush` event; else (a snapshot) its rows go.
    pub async fn replace_table(
        &self,
        table: &str,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        elements: Vec<(Vec<u8>, Vec<u8>)>,
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
            entries,
            elements,
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

    /// Every `(key, encoded value)` of a table plus the given `_meta` entries and those under
    /// `meta_prefix`, from one consistent snapshot (snapshot build).
    pub fn dump_table(
        &self,
        table: &str,
        meta_keys: &[String],
        meta_prefix: &str,
    ) -> Result<TableDump> {
        let txn = self.begin_read()?;
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
        let rows = |name: &str| -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            match txn.open_table(table_def(name)) {
                Ok(t) => {
                    let mut out = Vec::new();
                    for e in t.iter().map_err(io_err)? {
                        let (k, v) = e.map_err(io_err)?;
                        out.push((k.value().to_vec(), v.value().to_vec()));
                    }
                    Ok(out)
                }
                Err(TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
                Err(e) => Err(io_err(e)),
            }
        };
        Ok(TableDump {
            entries: rows(table)?,
            elements: rows(&crate::layout::element_table(table))?,
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
