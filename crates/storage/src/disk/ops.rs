//! The jobs the writer runs (`Op`), what they answer (`Output`), and how each runs inside the
//! batch's write transaction.

use std::collections::HashSet;

use bytes::Bytes;
use capdb_types::changes::ChangeOp;
use capdb_types::{Error, Hlc, Mutation, Result, Timestamp, Value};
use redb::{ReadableTable, WriteTransaction};

use super::meta::{put_meta, remove_meta_prefix};
use super::mutation::apply_one;
use super::{EngineStats, META_TABLE, MetaItem, RememberReplies, io_err, log_def, table_def};
use crate::BatchReplies;
use crate::layout::element_table;

/// A job for the writer. Each runs inside its batch's one write transaction (see [`execute`]).
pub(super) enum Op {
    /// Client mutations on a keyspace table, evaluated and stamped under the writer (so
    /// read-modify-writes are atomic); replies one per mutation.
    Apply {
        table: String,
        tombstones: bool,
        mutations: Vec<Mutation>,
        now_ms: u64,
    },
    /// Deletes the given keys if they are still expired at `now_ms` (active expiry). In a
    /// table with tombstones (`ap`) an expired value becomes a tombstone with its timestamp
    /// instead, so replicas converge on the deletion rather than resurrecting older values; an
    /// expired `ap` collection stays (`capdb_types::merge::expiry_replacement` says why) until
    /// tombstone collection removes it.
    RemoveExpired {
        table: String,
        keys: Vec<Bytes>,
        now_ms: u64,
        tombstones: bool,
    },
    /// Deletes every key of a table; the table stays.
    Clear { table: String },
    /// Creates a table and records its `_meta` entry.
    CreateTable {
        table: String,
        meta_key: String,
        meta_value: Vec<u8>,
    },
    /// Drops a table and its `_meta` entry.
    DropTable { table: String, meta_key: String },
    /// Completes once every job queued before it is durable.
    Barrier,
    /// `ap` replication: merges incoming versions (plain or composite deltas) into a table's
    /// heads and element records (`ap.rs`); replies with what it did.
    Merge {
        table: String,
        entries: Vec<(Bytes, Value)>,
    },
    /// `ap` counters: this node's increment of a key's PN-counter, read-modify-write under the
    /// writer (so increments of one node never race); replies with the new head (`ap.rs`).
    CounterAdd {
        table: String,
        key: Bytes,
        node: u64,
        delta: i64,
        timestamp: Timestamp,
        now_ms: u64,
    },
    /// `ap` tombstone collection: removes each key whose stored version is still the tombstone
    /// with exactly this timestamp (a newer write is kept). For a key holding a collection the
    /// timestamp is the collection horizon instead: the collection goes if it expired and was
    /// last written before it, else its element removals older than it go.
    PurgeTombstones {
        table: String,
        entries: Vec<(Bytes, Timestamp)>,
        /// Element removals of `ap` collections: (element record key, horizon); each goes if
        /// it still holds only removals older than the horizon.
        elements: Vec<(Bytes, Timestamp)>,
    },
    /// One bounded step of an `ap` table's reclaim queue (see `ap.rs`); replies with a count
    /// (0: nothing queued).
    ApReclaim { table: String },
    /// Applies the mutations of committed Raft entries to a shard table, with the leader's
    /// timestamps, and records the applied state in `_meta` in the same transaction. Not durable
    /// by itself: the Raft log is, and replaying it restores anything lost (see `durable`).
    ApplyReplicated {
        table: String,
        /// (mutation, leader timestamp, leader clock, log index of its entry).
        mutations: Vec<(Mutation, Timestamp, u64, u64)>,
        meta: Vec<MetaItem>,
        remember: Vec<RememberReplies>,
        /// A transaction's WATCH guards (`touched.rs`): when any fails nothing is applied. With guards, the replies start with the
        /// verdict: OK (applied) or the null array (a watched key changed).
        guards: Vec<super::WatchGuard>,
        /// Log indexes of WATCH's points in the applied entries (`touched.rs`).
        watch_points: Vec<u64>,
    },
    /// One step of a cross-shard transaction at this participant shard (`txn.rs`), with the
    /// applied state in `meta`; answers [`Output::Txn`].
    TxnStep {
        table: String,
        job: super::txn::TxnJob,
        meta: Vec<MetaItem>,
        /// The `_meta` key remembering the answer, and how to encode it.
        remember: Option<(String, super::txn::RememberAnswer)>,
    },
    /// Turns a shard's change log on or off, sets its retention or trims it, at log index
    /// `index` (`changes.rs`), with the applied state in `meta`.
    ChangesConfig {
        table: String,
        step: super::ChangesStep,
        index: u64,
        meta: Vec<MetaItem>,
        /// The `_meta` key remembering the answer, and how to encode it.
        remember: Option<(String, super::RememberReply)>,
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
        /// FLUSHDB (its log index): the change log and its state stay (`changes.rs`), and
        /// it logs a `flush` event; a snapshot install drops the log.
        keep_changes: Option<u64>,
        table: String,
        /// The rows of the table and of its element table (see `space.rs`), replaced with it;
        /// taken by the one execution (a stream is read once).
        rows: std::sync::Mutex<Option<super::replicated::RowSource>>,
        /// About how many bytes `rows` are.
        bytes: usize,
        clear_meta_prefix: Option<String>,
        meta: Vec<MetaItem>,
    },
    /// Deletes up to [`super::space::RECLAIM_STEP_MAX`] elements of the dead collections queued
    /// in a table's element table; replies with how many.
    Reclaim { table: String },
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
    /// Roughly how many bytes the op writes, for the batch bound [`super::BATCH_BYTES_MAX`].
    pub(super) fn payload_bytes(&self) -> usize {
        match self {
            Op::Apply { mutations, .. } => mutations.iter().map(mutation_bytes).sum(),
            Op::RemoveExpired { keys, .. } => keys.iter().map(|k| k.len()).sum(),
            Op::Merge { entries, .. } => entries.iter().map(|(k, v)| k.len() + v.data.len()).sum(),
            Op::PurgeTombstones {
                entries, elements, ..
            } => entries
                .iter()
                .chain(elements)
                .map(|(k, _)| k.len() + 8)
                .sum(),
            Op::LogAppend { records, .. } => records.iter().map(|(_, r)| r.len() + 8).sum(),
            Op::ReplaceTable { bytes, .. } => *bytes,
            Op::ApplyReplicated { mutations, .. } => {
                mutations.iter().map(|(m, ..)| mutation_bytes(m)).sum()
            }
            Op::TxnStep { job, .. } => match &job.step {
                capdb_types::txn::ShardStep::Prepare(p) => {
                    p.commands.iter().map(mutation_bytes).sum()
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// The keyspace table this op writes, for the ops that must fail alone when that table was
    /// dropped after they were queued: they must not silently re-create it (redb's
    /// `open_table` creates missing tables).
    fn keyspace_table(&self) -> Option<&str> {
        match self {
            Op::Apply { table, .. }
            | Op::RemoveExpired { table, .. }
            | Op::Clear { table }
            | Op::Merge { table, .. }
            | Op::CounterAdd { table, .. }
            | Op::PurgeTombstones { table, .. }
            | Op::ApReclaim { table } => Some(table),
            Op::CreateTable { .. }
            | Op::DropTable { .. }
            | Op::Barrier
            | Op::ApplyReplicated { .. }
            | Op::TxnStep { .. }
            | Op::ChangesConfig { .. }
            | Op::LogAppend { .. }
            | Op::LogRemove { .. }
            | Op::MetaPut { .. }
            | Op::ReplaceTable { .. }
            | Op::DropGroup { .. }
            | Op::Reclaim { .. } => None,
        }
    }

    /// Whether the job's acknowledgement must wait for an fsync. A batch made only of
    /// non-durable jobs commits without one; any durable job makes the whole batch (and every
    /// earlier non-durable commit) durable.
    pub(super) fn durable(&self) -> bool {
        match self {
            // Not through a Raft log (an `ap` replica's own change log, index 0): nothing
            // would replay it after a crash.
            Op::ChangesConfig { index: 0, .. } => true,
            // Reclaiming unreachable elements again after a crash is harmless.
            Op::ApplyReplicated { .. }
            | Op::TxnStep { .. }
            | Op::ChangesConfig { .. }
            | Op::Reclaim { .. }
            | Op::ApReclaim { .. } => false,
            Op::MetaPut { durable, .. } => *durable,
            _ => true,
        }
    }
}

/// The bytes a client mutation brings: its key, plus the value of a SET or the data of an APPEND.
fn mutation_bytes(m: &Mutation) -> usize {
    m.key().len()
        + match m {
            Mutation::Set { value, .. } => value.len(),
            Mutation::Append { data, .. } => data.len(),
            _ => 0,
        }
}

/// What a job answers; which kind depends on its [`Op`].
pub(super) enum Output {
    /// Replies of `Apply` and `ApplyReplicated`, one per mutation.
    Replies(BatchReplies),
    /// The new version written by `CounterAdd`.
    Value(Value),
    /// How many keys `RemoveExpired` and `PurgeTombstones` removed (or reclaim steps did).
    Count(u64),
    /// What an `ap` `Merge` did.
    Merged(super::ap::MergeOutcome),
    /// What a `TxnStep` answered (an error: the step broke the protocol, nothing changed).
    Txn(Result<super::txn::TxnAnswer>),
    /// What a `ChangesConfig` answered (an error inside: refused, nothing changed).
    Answer(Result<capdb_types::Reply>),
    /// Every other op, done.
    Done,
    /// The job failed alone (e.g. its table was dropped); the rest of the batch committed.
    Failed(Error),
}

/// Each op answers one kind of [`Output`]; its wrapper takes that kind out with one of these. A
/// different kind would be a bug in the engine: it comes back as [`Error::Io`], never as a panic,
/// since peers and clients reach every wrapper.
impl Output {
    pub(super) fn into_replies(self) -> Result<BatchReplies> {
        match self {
            Output::Replies(replies) => Ok(replies),
            other => Err(other.unexpected("replies")),
        }
    }

    pub(super) fn into_count(self) -> Result<u64> {
        match self {
            Output::Count(n) => Ok(n),
            other => Err(other.unexpected("a count")),
        }
    }

    pub(super) fn into_value(self) -> Result<Value> {
        match self {
            Output::Value(v) => Ok(v),
            other => Err(other.unexpected("a value")),
        }
    }

    pub(super) fn into_txn(self) -> Result<super::txn::TxnAnswer> {
        match self {
            Output::Txn(answer) => answer,
            other => Err(other.unexpected("a transaction answer")),
        }
    }

    pub(super) fn into_answer(self) -> Result<Result<capdb_types::Reply>> {
        match self {
            Output::Answer(a) => Ok(a),
            other => Err(other.unexpected("an answer")),
        }
    }

    pub(super) fn into_done(self) -> Result<()> {
        match self {
            Output::Done => Ok(()),
            other => Err(other.unexpected("done")),
        }
    }

    /// The error for a reply that is not the `expected` kind (a job that failed alone is its
    /// own error).
    fn unexpected(self, expected: &str) -> Error {
        let got = match self {
            Output::Failed(e) => return e,
            Output::Replies(_) => "replies",
            Output::Value(_) => "a value",
            Output::Count(_) => "a count",
            Output::Merged(_) => "a merge outcome",
            Output::Txn(_) => "a transaction answer",
            Output::Answer(_) => "an answer",
            Output::Done => "done",
        };
        Error::Io(format!(
            "unexpected reply from the storage writer: expected {expected}, got {got}"
        ))
    }
}

/// What running an op needs besides the op: the batch's write transaction and the engine's
/// clock, value limit and counters.
pub(super) struct Exec<'a> {
    pub(super) txn: &'a WriteTransaction,
    pub(super) hlc: &'a Hlc,
    pub(super) value_bytes_max: usize,
    pub(super) stats: &'a EngineStats,
    /// The views' changes held until the transaction commits (`views.rs`).
    pub(super) views: &'a std::cell::RefCell<super::views::Deferred>,
}

impl Op {
    /// Whether the op leaves the views' rows and definitions alone and reads none of them:
    /// the changes held for them (`views::Deferred`) need not be written before it. Any op
    /// not named here has them written first.
    fn leaves_views_alone(&self) -> bool {
        matches!(
            self,
            // These count into the changes held.
            Op::ApplyReplicated { .. }
                | Op::TxnStep { .. }
                // No view lives in their tables (views are kept on `cp` shards only).
                | Op::Apply { .. }
                | Op::RemoveExpired { .. }
                | Op::Merge { .. }
                | Op::CounterAdd { .. }
                | Op::PurgeTombstones { .. }
                | Op::ApReclaim { .. }
                // Raft's log and `_meta`.
                | Op::LogAppend { .. }
                | Op::LogRemove { .. }
                | Op::MetaPut { .. }
                | Op::Barrier
        )
    }
}

/// Runs one op inside the batch's transaction. `Err` only for storage failures (which abort the
/// whole batch); a job that fails alone answers [`Output::Failed`].
pub(super) fn execute(x: &Exec, op: &Op, live_tables: &mut HashSet<String>) -> Result<Output> {
    if !op.leaves_views_alone() {
        x.views.borrow_mut().flush(x.txn)?;
    }
    if let Some(table) = op.keyspace_table()
        && !live_tables.contains(table)
    {
        return Ok(Output::Failed(Error::KeyspaceNotFound(
            crate::layout::keyspace_of_table(table).to_string(),
        )));
    }
    match op {
        Op::Apply {
            table,
            tombstones,
            mutations,
            now_ms,
        } => apply_mutations(x, table, *tombstones, mutations, *now_ms),
        Op::RemoveExpired {
            table,
            keys,
            now_ms,
            tombstones,
        } => remove_expired(x, table, keys, *now_ms, *tombstones),
        Op::Clear { table } => clear_table(x, table),
        Op::CreateTable {
            table,
            meta_key,
            meta_value,
        } => create_table(x, table, meta_key, meta_value, live_tables),
        Op::DropTable { table, meta_key } => drop_table(x, table, meta_key, live_tables),
        // Nothing to write: the batch's commit is what a barrier waits for.
        Op::Barrier => Ok(Output::Done),
        Op::Merge { table, entries } => super::ap::merge(x, table, entries),
        Op::CounterAdd {
            table,
            key,
            node,
            delta,
            timestamp,
            now_ms,
        } => super::ap::counter_add(x, table, key, *node, *delta, *timestamp, *now_ms),
        Op::PurgeTombstones {
            table,
            entries,
            elements,
        } => super::ap::purge(x, table, entries, elements),
        Op::ApReclaim { table } => super::ap::reclaim_step(x, table),
        Op::ApplyReplicated {
            table,
            mutations,
            meta,
            remember,
            guards,
            watch_points,
        } => apply_replicated(
            x,
            table,
            mutations,
            meta,
            remember,
            guards,
            watch_points,
            true,
        ),
        Op::TxnStep {
            table,
            job,
            meta,
            remember,
        } => super::txn::apply_step(x, table, job, meta, remember.as_ref()),
        Op::ChangesConfig {
            table,
            step,
            index,
            meta,
            remember,
        } => {
            let ok = || Ok(capdb_types::Reply::Ok);
            let answer = match step {
                super::ChangesStep::Switch(on) => {
                    super::changes::configure(x, table, *on, *index).map(|()| ok())?
                }
                super::ChangesStep::RetentionBytes(n) => {
                    super::changes::set_retention_bytes(x, table, *n).map(|()| ok())?
                }
                super::ChangesStep::Prev(on) => {
                    super::changes::set_prev(x, table, *on).map(|()| ok())?
                }
                super::ChangesStep::Retention(ms) => {
                    super::changes::set_retention(x, table, *ms).map(|()| ok())?
                }
                super::ChangesStep::Trim { now_ms } => {
                    super::changes::trim(x, table, *now_ms, None, None).map(|()| ok())?
                }
                super::ChangesStep::TrimTo { now_ms, keep_from } => {
                    super::changes::trim(x, table, *now_ms, Some(*keep_from), None)
                        .map(|()| ok())?
                }
                super::ChangesStep::TrimPinned {
                    now_ms,
                    keep_from,
                    pinned,
                } => super::changes::trim(x, table, *now_ms, *keep_from, Some(*pinned))
                    .map(|()| ok())?,
                super::ChangesStep::Progress { ts } => {
                    super::changes::progress(x, table, *ts).map(|()| ok())?
                }
                super::ChangesStep::Group(cmd) => {
                    super::groups::apply(x, &element_table(table), cmd)?
                }
                super::ChangesStep::Job(cmd) => super::jobs::apply(x, &element_table(table), cmd)?,
                super::ChangesStep::View(cmd) => {
                    super::views::apply(x, table, &element_table(table), cmd)?
                }
            };
            let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
            if let Some((key, encode_answer)) = remember {
                mt.insert(key.as_str(), &encode_answer(&answer)[..])
                    .map_err(io_err)?;
            }
            // The applied state after the remembered answer (a later forget in `meta` wins).
            put_meta(&mut mt, meta)?;
            Ok(Output::Answer(answer))
        }
        Op::LogAppend { table, records } => append_log(x, table, records),
        Op::LogRemove { table, from, to } => remove_log_range(x, table, *from, *to),
        Op::MetaPut { items, .. } => update_meta(x, items),
        Op::ReplaceTable {
            table,
            rows,
            clear_meta_prefix,
            meta,
            keep_changes,
            ..
        } => {
            let rows = rows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or_else(|| Error::Corruption("a table replacement ran twice".into()))?;
            replace_table(
                x,
                table,
                rows,
                clear_meta_prefix.as_deref(),
                meta,
                *keep_changes,
            )
        }
        Op::Reclaim { table } => reclaim(x, table),
        Op::DropGroup {
            tables,
            log_tables,
            meta_keys,
            meta_prefixes,
        } => drop_group(x, tables, log_tables, meta_keys, meta_prefixes),
    }
}

/// [`Op::Apply`]: client mutations, evaluated and stamped here.
fn apply_mutations(
    x: &Exec,
    table: &str,
    tombstones: bool,
    mutations: &[Mutation],
    now_ms: u64,
) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut replies = Vec::with_capacity(mutations.len());
    for m in mutations {
        replies.push(apply_one(
            x, table, &mut t, m, tombstones, now_ms, None, None, None, None,
        )?);
    }
    Ok(Output::Replies(replies))
}

/// [`Op::RemoveExpired`].
fn remove_expired(
    x: &Exec,
    table: &str,
    keys: &[Bytes],
    now_ms: u64,
    tombstones: bool,
) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut removed = 0;
    for key in keys {
        let expired = match t.get(&key[..]).map_err(io_err)? {
            Some(raw) => Value::decode(raw.value())
                .ok()
                .filter(|v| !v.header.tombstone && v.is_expired(now_ms)),
            None => None,
        };
        if let Some(v) = expired {
            if tombstones {
                // An expired `ap` collection stays (see `expiry_replacement`); tombstone
                // collection removes it.
                let Some(tomb) = capdb_types::merge::expiry_replacement(&v, now_ms) else {
                    continue;
                };
                t.insert(&key[..], &tomb.encode()[..]).map_err(io_err)?;
            } else {
                t.remove(&key[..]).map_err(io_err)?;
            }
            removed += 1;
        }
    }
    Ok(Output::Count(removed))
}

/// [`Op::Clear`]: the table stays, empty.
fn clear_table(x: &Exec, table: &str) -> Result<Output> {
    x.txn.delete_table(table_def(table)).map_err(io_err)?;
    x.txn
        .delete_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    x.txn.open_table(table_def(table)).map_err(io_err)?;
    Ok(Output::Done)
}

/// [`Op::CreateTable`].
fn create_table(
    x: &Exec,
    table: &str,
    meta_key: &str,
    meta_value: &[u8],
    live_tables: &mut HashSet<String>,
) -> Result<Output> {
    x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut meta = x.txn.open_table(META_TABLE).map_err(io_err)?;
    meta.insert(meta_key, meta_value).map_err(io_err)?;
    live_tables.insert(table.to_string());
    Ok(Output::Done)
}

/// [`Op::DropTable`].
fn drop_table(
    x: &Exec,
    table: &str,
    meta_key: &str,
    live_tables: &mut HashSet<String>,
) -> Result<Output> {
    x.txn.delete_table(table_def(table)).map_err(io_err)?;
    x.txn
        .delete_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    // Its change log goes with it: a keyspace created again under the name starts afresh.
    x.txn
        .delete_table(log_def(&crate::layout::change_table(table)))
        .map_err(io_err)?;
    x.txn
        .delete_table(table_def(&crate::layout::change_txn_table(table)))
        .map_err(io_err)?;
    let mut meta = x.txn.open_table(META_TABLE).map_err(io_err)?;
    meta.remove(meta_key).map_err(io_err)?;
    live_tables.remove(table);
    Ok(Output::Done)
}

/// [`Op::ApplyReplicated`]. With `respect_locks`, an entry (the mutations of one log index)
/// with a key a cross-shard transaction locks is refused whole with [`Error::Locked`]
/// (`txn.rs`); a transaction's own commit runs without (its locks are released first).
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_replicated(
    x: &Exec,
    table: &str,
    mutations: &[(Mutation, Timestamp, u64, u64)],
    meta: &[MetaItem],
    remember: &[RememberReplies],
    guards: &[super::WatchGuard],
    watch_points: &[u64],
    respect_locks: bool,
) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let el_name = crate::layout::element_table(table);
    let mut replies = Vec::with_capacity(mutations.len() + 1);
    let mut run = true;
    // Entries refused by a lock: (log index, the holder).
    let mut refused: Vec<(u64, capdb_types::txn::TxnId)> = Vec::new();
    // A cross-shard transaction that holds a write lock on a watched key (a single-shard
    // EXEC's guard, or `/v1/txn`'s) may already have answered its client: it changed the key
    // at its prepare, before this entry, though its commit is not applied yet.
    let mut guard_blocker = None;
    let recording = {
        let el = x.txn.open_table(table_def(&el_name)).map_err(io_err)?;
        if respect_locks && !guards.is_empty() && super::txn::any_locks(&el)? {
            for g in guards {
                if let Some(holder) = super::txn::lock_holder(&el, &g.key, false)? {
                    guard_blocker = Some(holder);
                    break;
                }
            }
        }
        if respect_locks && super::txn::any_locks(&el)? {
            for (m, _, _, index) in mutations {
                if refused.last().is_some_and(|(i, _)| i == index) {
                    continue;
                }
                let (keys, writes) = super::txn::mutation_keys(m);
                for k in &keys {
                    if let Some(holder) = super::txn::lock_holder(&el, k, writes)? {
                        refused.push((*index, holder));
                        break;
                    }
                }
            }
        }
        (
            super::touched::Recording::load(&el)?,
            super::changes::ChangeLog::load(&el)?,
            x.views.borrow_mut().take(table, &el)?,
        )
    };
    let (mut recording, mut changes, mut views) = recording;
    let for_async_views = views.has_async();
    let refusal = |index: u64| {
        refused
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, holder)| Error::Locked(holder.to_string()))
    };
    if !guards.is_empty() {
        let el = x.txn.open_table(table_def(&el_name)).map_err(io_err)?;
        if let Some(holder) = refused.first().map(|(_, h)| *h).or(guard_blocker) {
            // A transaction is one entry: refused whole, its verdict says why.
            run = false;
            replies.push(Err(Error::Locked(holder.to_string())));
        } else {
            run = super::touched::guards_hold(&t, &el, &recording, guards)?;
            replies.push(Ok(if run {
                capdb_types::Reply::Ok
            } else {
                capdb_types::Reply::NilArray
            }));
        }
    }
    // Keys each entry changed, for the touched rows (`touched.rs`), while anyone may watch.
    let track = recording.is_on() || !watch_points.is_empty() || changes.is_on();
    let mut touched: Vec<(u64, Vec<Bytes>)> = Vec::new();
    // The change log's events per entry (`changes.rs`), while it is on.
    let mut logged: Vec<super::changes::Logged> = Vec::new();
    for (m, ts, now_ms, index) in mutations.iter().filter(|_| run) {
        if let Some(e) = refusal(*index) {
            replies.push(Err(e));
            continue;
        }
        x.hlc.observe(*ts);
        let mut changed = Vec::new();
        let mut written = None;
        // With `prev` on: the string values the keys held before (one read per key).
        let before = if changes.wants_prev() {
            super::changes::values_before(&t, &super::txn::mutation_keys(m).0, *now_ms)?
        } else {
            Default::default()
        };
        // Views (`views.rs`): the values their keys held before, counted against after.
        let view_keys = match views.is_empty() {
            true => Vec::new(),
            false => match super::txn::mutation_keys(m) {
                (keys, true) => views.keys_of(&keys),
                // A read inside EXEC changes nothing.
                (_, false) => Vec::new(),
            },
        };
        // A key-level mutation tells what it found and what it left: no read of its own.
        let direct = !view_keys.is_empty() && !matches!(m, Mutation::Exec { .. });
        let view_before = if direct {
            Vec::new()
        } else {
            views.read(&t, &view_keys)?
        };
        let mut prior = None;
        replies.push(apply_one(
            x,
            table,
            &mut t,
            m,
            false,
            *now_ms,
            Some(*ts),
            track.then_some(&mut changed),
            (changes.is_on() || direct).then_some(&mut written),
            direct.then_some(&mut prior),
        )?);
        if direct {
            let before = prior.and_then(super::views::counted);
            let after = match &written {
                Some(super::mutation::Written::Put(v)) => super::views::counted(v.clone()),
                Some(super::mutation::Written::Removed) => None,
                None => before.clone(),
            };
            views.account_one(&view_keys[0], before, after)?;
        } else if !view_keys.is_empty() {
            views.account(&t, &view_keys, view_before)?;
        }
        if changes.is_on() && !changed.is_empty() {
            let live_at = super::changes::live_at(*now_ms, for_async_views);
            let mut events = Vec::with_capacity(changed.len());
            match (written.take(), changed.as_slice()) {
                // A key-level mutation: its effect is known, no need to read it back.
                (Some(w), [key]) => {
                    let mut event = super::changes::event_written(key, w, live_at);
                    // A counter's change says so: its delta and the new value.
                    if let (Mutation::IncrBy { delta, .. }, ChangeOp::Set { value, .. }) =
                        (m, &event.op)
                        && let Some(n) = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse::<i64>().ok())
                    {
                        event.op = ChangeOp::Incr {
                            value: n,
                            delta: *delta,
                            prev: None,
                        };
                    }
                    events.push(event);
                }
                _ => {
                    let mut seen: HashSet<&Bytes> = HashSet::with_capacity(changed.len());
                    for k in &changed {
                        if seen.insert(k) {
                            events.push(super::changes::event_of(&t, Some(m), k, live_at)?);
                        }
                    }
                }
            }
            super::changes::fill_prev(&mut events, &before, for_async_views);
            match logged.last_mut() {
                Some(l) if l.index == *index => l.events.extend(events),
                _ => logged.push(super::changes::Logged {
                    index: *index,
                    ts: *ts,
                    kind: capdb_types::changes::RowKind::Plain,
                    events,
                }),
            }
        }
        if !changed.is_empty() {
            match touched.last_mut() {
                Some((at, keys)) if at == index => keys.extend(changed),
                _ => touched.push((*index, changed)),
            }
        }
    }
    drop(t);
    x.views.borrow_mut().keep(x.txn, table, views)?;
    if !logged.is_empty() {
        super::changes::append(x, table, &mut changes, logged)?;
    }
    if !touched.is_empty() || !watch_points.is_empty() {
        let mut el = x.txn.open_table(table_def(&el_name)).map_err(io_err)?;
        // In log order: a watch point turns recording on for the entries after it.
        let mut points = watch_points.iter().copied().peekable();
        for (index, keys) in &touched {
            while let Some(p) = points.next_if(|p| p < index) {
                super::touched::watch_point(&mut el, &mut recording, p)?;
            }
            super::touched::record(&mut el, &mut recording, keys, *index)?;
        }
        for p in points {
            super::touched::watch_point(&mut el, &mut recording, p)?;
        }
    }
    let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
    // Replies first, then `meta`: a reply remembered and already forgotten by a later
    // entry of this batch is deleted, not left behind.
    for r in remember {
        // An aborted transaction answers its verdict alone.
        let count = if guards.is_empty() {
            r.count
        } else {
            replies.len().saturating_sub(r.first)
        };
        let Some(range) = replies.get(r.first..r.first + count) else {
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

/// [`Op::LogAppend`].
fn append_log(x: &Exec, table: &str, records: &[(u64, Vec<u8>)]) -> Result<Output> {
    let mut t = x.txn.open_table(log_def(table)).map_err(io_err)?;
    for (index, record) in records {
        t.insert(*index, &record[..]).map_err(io_err)?;
    }
    Ok(Output::Done)
}

/// [`Op::LogRemove`].
fn remove_log_range(x: &Exec, table: &str, from: u64, to: Option<u64>) -> Result<Output> {
    let mut t = x.txn.open_table(log_def(table)).map_err(io_err)?;
    match to {
        Some(to) if to < from => {}
        Some(to) => {
            t.retain_in(from..=to, |_, _| false).map_err(io_err)?;
        }
        None => {
            t.retain_in(from.., |_, _| false).map_err(io_err)?;
        }
    }
    Ok(Output::Done)
}

/// [`Op::MetaPut`].
fn update_meta(x: &Exec, items: &[MetaItem]) -> Result<Output> {
    let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
    put_meta(&mut mt, items)?;
    Ok(Output::Done)
}

/// [`Op::ReplaceTable`].
fn replace_table(
    x: &Exec,
    table: &str,
    rows: super::replicated::RowSource,
    clear_meta_prefix: Option<&str>,
    meta: &[MetaItem],
    keep_changes: Option<u64>,
) -> Result<Output> {
    // FLUSHDB keeps the change log on, at its clock; a snapshot brings its own state and no
    // log rows, so a replica's rows from before it (with a gap to it) go.
    let carried = if keep_changes.is_some() {
        let el = x
            .txn
            .open_table(table_def(&element_table(table)))
            .map_err(io_err)?;
        super::changes::carried_rows(&el)?
    } else {
        x.txn
            .delete_table(log_def(&crate::layout::change_table(table)))
            .map_err(io_err)?;
        x.txn
            .delete_table(table_def(&crate::layout::change_txn_table(table)))
            .map_err(io_err)?;
        Vec::new()
    };
    // Only FLUSHDB carries rows (above), and it brings no element rows that could collide
    // with them: nothing to reconcile.
    let elements_name = element_table(table);
    x.txn.delete_table(table_def(table)).map_err(io_err)?;
    x.txn
        .delete_table(table_def(&elements_name))
        .map_err(io_err)?;
    {
        let mut data = x.txn.open_table(table_def(table)).map_err(io_err)?;
        let mut el = x
            .txn
            .open_table(table_def(&elements_name))
            .map_err(io_err)?;
        for batch in rows {
            let (which, batch) = batch?;
            let t = match which {
                super::replicated::SnapshotTable::Data => &mut data,
                super::replicated::SnapshotTable::Elements => &mut el,
            };
            for (k, v) in batch {
                t.insert(&k[..], &v[..]).map_err(io_err)?;
            }
        }
    }
    {
        let mut el = x
            .txn
            .open_table(table_def(&elements_name))
            .map_err(io_err)?;
        for (k, v) in &carried {
            el.insert(&k[..], &v[..]).map_err(io_err)?;
        }
        if keep_changes.is_none() {
            // The rows before the snapshot are not here: reads below it say so.
            super::changes::mark_snapshot(&mut el)?;
        }
    }
    if let Some(index) = keep_changes {
        // Every key of the shard went: one `flush` event says so (a reader clears what it
        // holds of this shard; the merged stream carries it like any event).
        let mut log = {
            let el = x
                .txn
                .open_table(table_def(&element_table(table)))
                .map_err(io_err)?;
            super::changes::ChangeLog::load(&el)?
        };
        if log.is_on() {
            let flush = super::changes::Logged {
                index,
                ts: Timestamp::ZERO,
                kind: capdb_types::changes::RowKind::Plain,
                events: vec![capdb_types::changes::Event {
                    key: Bytes::new(),
                    op: capdb_types::changes::ChangeOp::Flush,
                }],
            };
            super::changes::append(x, table, &mut log, vec![flush])?;
            // Async views were emptied with the data: they count from the flush on.
            super::views::after_flush(x, table, log.clock())?;
        }
    }
    let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
    if let Some(prefix) = clear_meta_prefix {
        remove_meta_prefix(&mut mt, prefix)?;
    }
    put_meta(&mut mt, meta)?;
    Ok(Output::Done)
}

/// [`Op::Reclaim`].
fn reclaim(x: &Exec, table: &str) -> Result<Output> {
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    super::space::reclaim_step(&mut el).map(Output::Count)
}

/// [`Op::DropGroup`].
fn drop_group(
    x: &Exec,
    tables: &[String],
    log_tables: &[String],
    meta_keys: &[String],
    meta_prefixes: &[String],
) -> Result<Output> {
    for t in tables {
        x.txn.delete_table(table_def(t)).map_err(io_err)?;
        x.txn
            .delete_table(table_def(&element_table(t)))
            .map_err(io_err)?;
    }
    for t in log_tables {
        x.txn.delete_table(log_def(t)).map_err(io_err)?;
    }
    let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
    for k in meta_keys {
        mt.remove(k.as_str()).map_err(io_err)?;
    }
    for prefix in meta_prefixes {
        remove_meta_prefix(&mut mt, prefix)?;
    }
    Ok(Output::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_the_wrong_kind_is_an_io_error_not_a_panic() {
        assert!(matches!(Output::Done.into_count(), Err(Error::Io(_))));
        assert!(matches!(Output::Count(3).into_replies(), Err(Error::Io(_))));
        assert!(matches!(
            Output::Replies(Vec::new()).into_done(),
            Err(Error::Io(_))
        ));
        assert!(matches!(Output::Count(3).into_count(), Ok(3)));
        // A job that failed alone keeps its own error.
        let failed = Output::Failed(Error::KeyspaceNotFound("k".into()));
        assert!(matches!(
            failed.into_value(),
            Err(Error::KeyspaceNotFound(_))
        ));
    }

    #[test]
    fn a_mutation_counts_its_bytes_once() {
        let set = Mutation::Set {
            key: Bytes::from_static(b"key"),
            value: Bytes::from_static(b"value"),
            condition: capdb_types::mutation::Condition::Always,
            expiry: capdb_types::mutation::ExpiryUpdate::Clear,
            return_old: false,
        };
        let delete = Mutation::Delete {
            key: Bytes::from_static(b"gone"),
        };
        let apply = Op::Apply {
            table: "t".into(),
            tombstones: false,
            mutations: vec![set.clone(), delete.clone()],
            now_ms: 0,
        };
        assert_eq!(apply.payload_bytes(), 3 + 5 + 4);
        let replicated = Op::ApplyReplicated {
            table: "t".into(),
            mutations: vec![
                (set, Timestamp::default(), 0, 1),
                (delete, Timestamp::default(), 0, 1),
            ],
            meta: Vec::new(),
            remember: Vec::new(),
            guards: Vec::new(),
            watch_points: Vec::new(),
        };
        assert_eq!(replicated.payload_bytes(), 3 + 5 + 4);
    }
}
