//! Cross-shard transactions at a participant shard: its lock table and transaction records
//! (the protocol and its rules are `capdb_types::txn`; the coordinator is `capdb-txn`).
//!
//! A participant applies each step of a transaction ([`ShardStep`]) as one entry of its log:
//! - *prepare*: votes YES when no other transaction holds a conflicting lock on its keys, its
//!   WATCH guards hold (`touched.rs`) and its deadline has not passed; then locks the keys,
//!   runs the commands on an overlay of the shard (`overlay.rs`) and stages what they would
//!   change (a redo); the vote carries their replies, which the record keeps, so a repeated
//!   prepare (or a prevent that finds it) answers them again;
//! - *commit*: releases the locks and applies the redo, recording its keys as touched at the
//!   prepare's log index (where the transaction took its place in this shard's order);
//! - *abort* / *prevent*: drop what was staged, or make sure no prepare can land later.
//!
//! While a key is locked, other writes to it are refused at apply with [`Error::Locked`] (the
//! node retries them for a bounded time), and a write-locked key's linearizable reads wait
//! ([`DiskTable::write_locked`]): nothing outside the transaction sees or changes its keys
//! between its prepare and its commit, which is what makes the shards' commits, at different
//! log positions, one serializable point.
//!
//! # Rows
//!
//! Everything is replicated state in the shard's element table under the reserved id 0 (as
//! the touched rows), so it is identical on every replica, carried by snapshots and cleared by
//! FLUSHDB (which the coordinator then sees as a refused or lost prepare):
//! - `0 ‖ "txn-lock/" ‖ key` -> the key's [`KeyLocks`];
//! - `0 ‖ "txn/" ‖ id` -> the transaction's [`Record`];
//! - `0 ‖ "txn-open/" ‖ id` -> its lock deadline (u64 LE), while it is prepared: what the
//!   recovery of orphaned transactions scans ([`DiskTable::orphaned_txns`]);
//! - `0 ‖ "txn-done/" ‖ decided ms (BE) ‖ id` -> empty: decided records, oldest first.
//!
//! # Bounds
//!
//! A decided record is kept [`RECORD_RETAIN_MS`] after its decision (a repeated step within
//! that time answers the same), then dropped, at most [`GC_STEP_MAX`] per step. A prepare
//! applied after its deadline is refused, so a dropped record can never let a late prepare
//! through. Locks are bounded by the keys of prepared transactions (each bounded by the RESP
//! layer's transaction limits).

use bytes::Bytes;
use capdb_types::txn::{
    self, Conflict, Effect, KeyLocks, LockMode, Outcome, Participation, Refusal, ShardStep, Step,
    TxnId,
};
use capdb_types::{Error, GroupId, Mutation, Reply, Result, Timestamp};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::meta::MetaItem;
use super::ops::{Exec, Output};
use super::overlay::{Overlay, Redo};
use super::space::TxnSpace;
use super::touched::{self, Tracking, WatchGuard};
use super::{META_TABLE, io_err, table_def};
use crate::layout::element_table;

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// How long a decided transaction's record is kept to answer repeated steps.
pub const RECORD_RETAIN_MS: u64 = 60_000;
/// Decided records dropped per step at most.
pub const GC_STEP_MAX: usize = 64;

const RESERVED: [u8; 8] = [0; 8];
const LOCK: &[u8] = b"txn-lock/";
const RECORD: &[u8] = b"txn/";
const OPEN: &[u8] = b"txn-open/";
const DONE: &[u8] = b"txn-done/";

fn row(kind: &[u8], rest: &[&[u8]]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(kind);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

fn id_bytes(id: TxnId) -> [u8; 24] {
    let mut b = [0; 24];
    b[..8].copy_from_slice(&id.origin.to_be_bytes());
    b[8..16].copy_from_slice(&id.epoch.to_be_bytes());
    b[16..].copy_from_slice(&id.seq.to_be_bytes());
    b
}

fn id_of(b: &[u8]) -> Option<TxnId> {
    let b: &[u8; 24] = b.try_into().ok()?;
    let n = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Some(TxnId {
        origin: n(0),
        epoch: n(8),
        seq: n(16),
    })
}

/// What a participant keeps per transaction. Its first two fields must stay first
/// ([`RecordHead`]). Records of the build before replies at prepare (which kept the commands,
/// not a redo) cannot be read by this one: drain cross-shard transactions before upgrading
/// from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    participation: Participation,
    /// Every participant (from the prepare), for the recovery of an orphan.
    participants: Vec<GroupId>,
    /// What the commands change, computed at the prepare, while prepared.
    redo: Redo,
    /// The keys the commands change (recorded as touched when the redo is applied).
    touched: Vec<Bytes>,
    /// The prepare's log index: the transaction's place in this shard's order.
    prepared_at: u64,
    /// The commands' replies (from the prepare), one per command.
    replies: Option<Vec<Result<Reply>>>,
}

/// The first fields of a [`Record`], which every version of it starts with.
#[derive(Debug, Deserialize)]
struct RecordHead {
    participation: Participation,
    participants: Vec<GroupId>,
}

/// Runs a prepare's commands on an overlay of the shard (see `overlay.rs`), at the prepare's
/// clock and timestamp: their replies, what they change, and which keys.
fn run_at_prepare(
    x: &Exec,
    table: &str,
    job: &TxnJob,
    commands: &[Mutation],
) -> Result<(Vec<Result<Reply>>, Redo, Vec<Bytes>)> {
    x.hlc.observe(job.timestamp);
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut base = TxnSpace::new(x, table, &mut t, job.now_ms);
    let mut overlay = Overlay::new(&mut base, job.now_ms);
    let mut changed = Vec::new();
    let mut replies = Vec::with_capacity(commands.len());
    for m in commands {
        replies.push(overlay.command(|o| {
            let mut space = Tracking {
                inner: o,
                changed: &mut changed,
            };
            run_one(x, &mut space, m, job)
        })?);
    }
    let redo = overlay.into_redo()?;
    changed.sort();
    changed.dedup();
    Ok((replies, redo, changed))
}

/// One command on `space` (`Err`: a storage failure, which fails the whole batch).
fn run_one(
    x: &Exec,
    space: &mut dyn capdb_data::Space,
    m: &Mutation,
    job: &TxnJob,
) -> Result<Result<Reply>> {
    let ran = match m {
        Mutation::Exec { args, .. } => {
            let cx = capdb_data::Ctx {
                now_ms: job.now_ms,
                timestamp: job.timestamp,
                seed: super::mutation::seed_of(job.timestamp),
                value_bytes_max: x.value_bytes_max,
            };
            capdb_data::execute(args, space, &cx)
        }
        other => {
            let key = &other.key()[..];
            (|| {
                let current = match space.get(key) {
                    // A corrupt value may be replaced or deleted, as outside a transaction
                    // (`mutation.rs`); anything that would read it fails.
                    Err(Error::Corruption(_)) if super::mutation::overwrites_blindly(other) => None,
                    Err(Error::Corruption(_)) if matches!(other, Mutation::Delete { .. }) => {
                        space.remove(key)?;
                        return Ok(Reply::Integer(1));
                    }
                    read => read?,
                };
                let (effect, reply) = other.apply(
                    current.as_ref(),
                    job.now_ms,
                    job.timestamp,
                    x.value_bytes_max,
                )?;
                match effect {
                    capdb_types::Effect::Unchanged => {}
                    capdb_types::Effect::Put(v) => space.put(key, v)?,
                    capdb_types::Effect::Remove(_) => space.remove(key)?,
                }
                Ok(reply)
            })()
        }
    };
    match ran {
        Err(e @ Error::Io(_)) => Err(e),
        other => Ok(other),
    }
}

/// One step of a transaction, as the state machine hands it to the engine: with the entry's
/// leader timestamp and clock, and its log index (the touched rows of the commit's writes).
#[derive(Debug, Clone)]
pub struct TxnJob {
    pub txn: TxnId,
    pub step: ShardStep<Mutation, WatchGuard>,
    pub timestamp: Timestamp,
    pub now_ms: u64,
    pub index: u64,
}

/// Encodes a step's answer for the `_meta` row that remembers it (the state machine's own
/// response format), written in the same storage transaction as the step.
pub type RememberAnswer = Box<dyn Fn(&Result<TxnAnswer>) -> Vec<u8> + Send + Sync>;

/// What a step answered: where the transaction stands here, and with a commit its replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnAnswer {
    pub outcome: Outcome,
    pub replies: Option<Vec<Result<Reply>>>,
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(raw).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| Error::Io(format!("cannot encode: {e}")))
}

fn read_locks(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<KeyLocks> {
    match el.get(&row(LOCK, &[key])[..]).map_err(io_err)? {
        Some(raw) => decode(raw.value(), "a lock record"),
        None => Ok(KeyLocks::default()),
    }
}

fn write_locks(el: &mut RawTable<'_>, key: &[u8], locks: &KeyLocks) -> Result<()> {
    let k = row(LOCK, &[key]);
    if locks.is_empty() {
        el.remove(&k[..]).map_err(io_err)?;
    } else {
        el.insert(&k[..], &encode(locks)?[..]).map_err(io_err)?;
    }
    Ok(())
}

/// Whether any key of the shard is locked (one seek: the common case costs writes nothing
/// more).
pub(super) fn any_locks(el: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<bool> {
    let start = row(LOCK, &[]);
    Ok(match el.range(&start[..]..).map_err(io_err)?.next() {
        Some(e) => e.map_err(io_err)?.0.value().starts_with(&start),
        None => false,
    })
}

/// The transaction whose lock keeps a non-transactional command from `key` (`writes`: it
/// changes the key, so any lock keeps it out; else only a write lock does).
pub(super) fn lock_holder(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    writes: bool,
) -> Result<Option<TxnId>> {
    let locks = read_locks(el, key)?;
    Ok(locks
        .held
        .iter()
        .find(|h| writes || h.mode == LockMode::Write)
        .map(|h| h.txn))
}

/// The keys a mutation touches and whether it changes them (a data-type command by its
/// table row; every other mutation writes its key).
pub(super) fn mutation_keys(m: &Mutation) -> (Vec<Bytes>, bool) {
    match m {
        Mutation::Exec { args, key } => {
            let keys =
                capdb_data::command::command_keys(args).unwrap_or_else(|_| vec![key.clone()]);
            (keys, capdb_data::command::writes(args))
        }
        other => (vec![other.key().clone()], true),
    }
}

/// The vote of a first prepare: YES at the entry's timestamp, or why not.
fn vote(
    x: &Exec,
    table: &str,
    el: &RawTable<'_>,
    job: &TxnJob,
    p: &txn::Prepare<Mutation, WatchGuard>,
) -> Result<std::result::Result<Timestamp, Refusal>> {
    if job.now_ms > p.deadline_ms {
        // Too late: its coordinator (or a recovery) may already have decided without it.
        return Ok(Err(Refusal::Prevented));
    }
    for (key, mode) in &p.keys {
        if let Some(holder) = read_locks(el, key)?.blocker(job.txn, *mode) {
            return Ok(Err(Refusal::Locked(Conflict {
                key: key.clone(),
                holder,
            })));
        }
    }
    if let Some(first) = p.guards.first() {
        let t = x.txn.open_table(table_def(table)).map_err(io_err)?;
        let rec = touched::Recording::load(el)?;
        if !touched::guards_hold(&t, el, &rec, &p.guards)? {
            return Ok(Err(Refusal::WatchFailed {
                key: first.key.clone(),
            }));
        }
    }
    Ok(Ok(
        super::changes::ChangeLog::load(el)?.vote_at(job.timestamp)
    ))
}

/// [`super::ops::Op::TxnStep`]: applies one step of a transaction and records `meta` (the
/// applied state) in the same transaction. A step that breaks the protocol (a commit without
/// a YES vote here) changes nothing and answers an error.
pub(super) fn apply_step(
    x: &Exec,
    table: &str,
    job: &TxnJob,
    meta: &[MetaItem],
    remember: Option<&(String, RememberAnswer)>,
) -> Result<Output> {
    let answer = step_inner(x, table, job)?;
    let mut mt = x.txn.open_table(META_TABLE).map_err(io_err)?;
    if let Some((key, encode_answer)) = remember {
        mt.insert(key.as_str(), &encode_answer(&answer)[..])
            .map_err(io_err)?;
    }
    // The applied state after the remembered answer (a later forget in `meta` wins).
    super::meta::put_meta(&mut mt, meta)?;
    Ok(Output::Txn(answer))
}

/// The step itself (`Err` inside: a protocol violation, nothing changed).
fn step_inner(x: &Exec, table: &str, job: &TxnJob) -> Result<Result<TxnAnswer>> {
    if let ShardStep::Prepare(p) = &job.step {
        for (earlier, ts) in &p.committed_first {
            commit_known(x, table, job, *earlier, *ts)?;
        }
    }
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    let record_key = row(RECORD, &[&id_bytes(job.txn)]);
    let current: Option<Record> = match el.get(&record_key[..]).map_err(io_err)? {
        // One that cannot be read fails this step alone (nothing changes; the locks stay
        // until an operator steps in), never the whole batch of the shard's log.
        Some(raw) => match decode(raw.value(), "a transaction record") {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(txn = %job.txn, table, error = %e, "unreadable transaction record");
                return Ok(Err(e));
            }
        },
        None => None,
    };
    let prepare = match &job.step {
        ShardStep::Prepare(p) => Some(p),
        _ => None,
    };
    let pure = match (&job.step, prepare) {
        (_, Some(p)) => Step::Prepare {
            vote: match &current {
                // Repeated or late: `step` answers what is there without a new vote.
                Some(_) => Ok(job.timestamp),
                None => vote(x, table, &el, job, p)?,
            },
        },
        (ShardStep::Commit { ts }, _) => Step::Commit { ts: *ts },
        (ShardStep::Abort, _) => Step::Abort,
        _ => Step::Prevent,
    };
    let stepped = txn::step(current.as_ref().map(|r| &r.participation), pure, || {
        let p = prepare.expect("only a prepare locks and stages");
        (p.keys.clone(), p.anchor, p.deadline_ms)
    });
    let (next, effect, outcome) = match stepped {
        Ok(t) => t,
        Err(violation) => {
            tracing::error!(txn = %job.txn, table, why = %violation.0, "transaction step refused: protocol violation");
            return Ok(Err(Error::InvalidInput(format!(
                "transaction {}: {}",
                job.txn, violation.0
            ))));
        }
    };
    let mut record = current.clone().unwrap_or(Record {
        participation: Participation::Prevented,
        participants: Vec::new(),
        redo: Redo::default(),
        touched: Vec::new(),
        prepared_at: job.index,
        replies: None,
    });
    let open_key = row(OPEN, &[&id_bytes(job.txn)]);
    let mut to_apply = None;
    match effect {
        Effect::LockAndStage => {
            let p = prepare.expect("only a prepare locks and stages");
            for (key, mode) in &p.keys {
                let mut locks = read_locks(&el, key)?;
                locks.grant(job.txn, *mode, p.deadline_ms);
                write_locks(&mut el, key, &locks)?;
            }
            el.insert(&open_key[..], &p.deadline_ms.to_le_bytes()[..])
                .map_err(io_err)?;
            record.participants = p.participants.clone();
            record.prepared_at = job.index;
            // The locks are taken: nothing outside the transaction changes these keys until
            // the commit applies what the commands do now.
            drop(el);
            let (replies, redo, touched) = run_at_prepare(x, table, job, &p.commands)?;
            record.replies = Some(replies);
            record.redo = redo;
            record.touched = touched;
            el = x
                .txn
                .open_table(table_def(&element_table(table)))
                .map_err(io_err)?;
        }
        Effect::ApplyAndUnlock | Effect::DropAndUnlock => {
            if let Some(Participation::Prepared { keys, .. }) =
                current.as_ref().map(|r| &r.participation)
            {
                for (key, _) in keys {
                    let mut locks = read_locks(&el, key)?;
                    if locks.release(job.txn) {
                        write_locks(&mut el, key, &locks)?;
                    }
                }
            }
            el.remove(&open_key[..]).map_err(io_err)?;
            let redo = std::mem::take(&mut record.redo);
            let touched = std::mem::take(&mut record.touched);
            if effect == Effect::ApplyAndUnlock {
                to_apply = Some((redo, touched));
            }
        }
        Effect::None => {}
    }
    let changed = current.as_ref().map(|r| &r.participation) != next.as_ref();
    if let Some(next) = next {
        record.participation = next;
    }
    drop(el);
    let mut applied = None;
    if let Some((redo, touched)) = to_apply {
        // The locks are released above, in this same storage transaction.
        let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
        // The change log gets the commit's effects as this entry's events (`changes.rs`).
        let mut log = {
            let el = x
                .txn
                .open_table(table_def(&element_table(table)))
                .map_err(io_err)?;
            super::changes::ChangeLog::load(&el)?
        };
        let before = if log.wants_prev() {
            super::changes::values_before(&t, &touched, job.now_ms)?
        } else {
            Default::default()
        };
        // Views (`views.rs`) count the commit's effects like a write's.
        let mut views = {
            let el = x
                .txn
                .open_table(table_def(&element_table(table)))
                .map_err(io_err)?;
            x.views.borrow_mut().take(table, &el)?
        };
        let for_async_views = views.has_async();
        let view_keys =
            if super::views::DEBUG_VIEW_SKIP_TXN.load(std::sync::atomic::Ordering::Relaxed) {
                Vec::new()
            } else {
                // The records the commit writes (a removal of an expired key, which the
                // transaction's own view of its keys did not see, included).
                views.keys_of(redo.top.iter().map(|(k, _)| k))
            };
        let view_before = views.read(&t, &view_keys)?;
        TxnSpace::new(x, table, &mut t, job.now_ms).apply_redo(&redo)?;
        if !view_keys.is_empty() {
            views.account(&t, &view_keys, view_before)?;
        }
        x.views.borrow_mut().keep(x.txn, table, views)?;
        if log.is_on() {
            let mut seen = std::collections::HashSet::with_capacity(touched.len());
            let mut events = touched
                .iter()
                .filter(|k| seen.insert(*k))
                .map(|k| {
                    let live_at = super::changes::live_at(job.now_ms, for_async_views);
                    super::changes::event_of(&t, None, k, live_at)
                })
                .collect::<Result<Vec<_>>>()?;
            super::changes::fill_prev(&mut events, &before, for_async_views);
            drop(t);
            // Logged at or above the commit timestamp, the largest vote, so above every write
            // before the transaction on every participant (`ChangeLog::vote_at`).
            let commit_ts = match &job.step {
                ShardStep::Commit { ts } => *ts,
                _ => job.timestamp,
            };
            let logged = super::changes::Logged {
                index: job.index,
                ts: job.timestamp.max(commit_ts),
                kind: capdb_types::changes::RowKind::Commit {
                    id: Bytes::copy_from_slice(&id_bytes(job.txn)),
                    commit_ts,
                    participants: record.participants.clone(),
                },
                events,
            };
            super::changes::append(x, table, &mut log, vec![logged])?;
        }
        applied = Some(touched);
    }
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    if let Some(touched) = applied {
        let mut recording = touched::Recording::load(&el)?;
        touched::record_at(
            &mut el,
            &mut recording,
            &touched,
            record.prepared_at,
            job.index,
        )?;
    }
    if changed {
        el.insert(&record_key[..], &encode(&record)?[..])
            .map_err(io_err)?;
        if !matches!(record.participation, Participation::Prepared { .. }) {
            let done = row(DONE, &[&job.now_ms.to_be_bytes(), &id_bytes(job.txn)]);
            el.insert(&done[..], &[][..]).map_err(io_err)?;
        }
    }
    collect_decided(&mut el, job.now_ms)?;
    // A YES vote and a commit both carry the replies (computed at the prepare).
    let replies = match outcome {
        Outcome::Yes(_) | Outcome::Committed(_) => record.replies.clone(),
        _ => None,
    };
    Ok(Ok(TxnAnswer { outcome, replies }))
}

/// Commits `txn`, known to be committed at `ts` (`Prepare::committed_first`), if it is still
/// prepared here, as part of applying `job`.
fn commit_known(x: &Exec, table: &str, job: &TxnJob, txn: TxnId, ts: Timestamp) -> Result<()> {
    let prepared = {
        let el = x
            .txn
            .open_table(table_def(&element_table(table)))
            .map_err(io_err)?;
        let raw = el
            .get(&row(RECORD, &[&id_bytes(txn)])[..])
            .map_err(io_err)?;
        raw.is_some_and(|raw| {
            matches!(
                postcard::take_from_bytes::<RecordHead>(raw.value()),
                Ok((head, _)) if matches!(head.participation, Participation::Prepared { .. })
            )
        })
    };
    if prepared {
        let commit = TxnJob {
            txn,
            step: ShardStep::Commit { ts },
            timestamp: job.timestamp,
            now_ms: job.now_ms,
            index: job.index,
        };
        if let Err(e) = step_inner(x, table, &commit)? {
            tracing::error!(%txn, error = %e, "a known commit was refused");
        }
    }
    Ok(())
}

/// Drops up to [`GC_STEP_MAX`] records decided more than [`RECORD_RETAIN_MS`] before `now_ms`.
fn collect_decided(el: &mut RawTable<'_>, now_ms: u64) -> Result<()> {
    let start = row(DONE, &[]);
    let mut old = Vec::new();
    for e in el.range(&start[..]..).map_err(io_err)?.take(GC_STEP_MAX) {
        let (k, _) = e.map_err(io_err)?;
        let k = k.value();
        let Some(rest) = k.strip_prefix(&start[..]) else {
            break;
        };
        let Some((at, id)) = rest.split_first_chunk::<8>() else {
            break;
        };
        if u64::from_be_bytes(*at).saturating_add(RECORD_RETAIN_MS) > now_ms {
            break;
        }
        old.push((k.to_vec(), id.to_vec()));
    }
    for (done, id) in old {
        el.remove(&done[..]).map_err(io_err)?;
        el.remove(&row(RECORD, &[&id])[..]).map_err(io_err)?;
    }
    Ok(())
}

/// A prepared transaction past its lock deadline: whoever leads the shard finishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub txn: TxnId,
    pub participants: Vec<GroupId>,
    pub deadline_ms: u64,
}

/// Prepared transactions of a shard and their locks, for recovery and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenTxns {
    /// Transactions prepared here and not decided.
    pub prepared: u64,
    /// The earliest lock deadline among them.
    pub earliest_deadline_ms: Option<u64>,
    /// Those past their deadline at the time asked, with their participants.
    pub orphans: Vec<Orphan>,
}

/// Reads the open transactions of a shard's element table (a read snapshot).
pub(super) fn open_txns(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    now_ms: u64,
) -> Result<OpenTxns> {
    let start = row(OPEN, &[]);
    let mut out = OpenTxns::default();
    for e in el.range(&start[..]..).map_err(io_err)? {
        let (k, v) = e.map_err(io_err)?;
        let Some(id) = k.value().strip_prefix(&start[..]) else {
            break;
        };
        let (Some(txn), Ok(deadline)) = (id_of(id), <[u8; 8]>::try_from(v.value())) else {
            continue;
        };
        let deadline_ms = u64::from_le_bytes(deadline);
        out.prepared += 1;
        out.earliest_deadline_ms = Some(
            out.earliest_deadline_ms
                .map_or(deadline_ms, |d| d.min(deadline_ms)),
        );
        if deadline_ms < now_ms {
            let participants = match el.get(&row(RECORD, &[id])[..]).map_err(io_err)? {
                // Only the head: the rest of the record changed shape across versions.
                Some(raw) => match postcard::take_from_bytes::<RecordHead>(raw.value()) {
                    Ok((head, _)) => head.participants,
                    Err(e) => {
                        tracing::error!(%txn, error = %e, "unreadable transaction record");
                        continue;
                    }
                },
                None => Vec::new(),
            };
            out.orphans.push(Orphan {
                txn,
                participants,
                deadline_ms,
            });
        }
    }
    Ok(out)
}

/// The transactions prepared on the shard and not decided (a read snapshot's).
pub(super) fn prepared_ids(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<TxnId>> {
    let start = row(OPEN, &[]);
    let mut out = Vec::new();
    for e in el.range(&start[..]..).map_err(io_err)? {
        let (k, _) = e.map_err(io_err)?;
        let Some(id) = k.value().strip_prefix(&start[..]) else {
            break;
        };
        out.extend(id_of(id));
    }
    Ok(out)
}

/// The smallest YES vote among the transactions prepared here and not decided: their
/// commits will be logged at or above it (the commit timestamp is the largest vote), so the
/// shard's change stream is closed only below it (`changes.rs`).
pub(super) fn min_open_vote(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Option<Timestamp>> {
    let mut min: Option<Timestamp> = None;
    for id in prepared_ids(el)? {
        let Some(raw) = el.get(&row(RECORD, &[&id_bytes(id)])[..]).map_err(io_err)? else {
            continue;
        };
        if let Ok((
            RecordHead {
                participation: Participation::Prepared { ts, .. },
                ..
            },
            _,
        )) = postcard::take_from_bytes::<RecordHead>(raw.value())
        {
            min = Some(min.map_or(ts, |m| m.min(ts)));
        }
    }
    Ok(min)
}

/// Whether transaction `id` (its 24 stored bytes) is prepared here and not decided.
pub(super) fn is_open(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: &[u8],
) -> Result<bool> {
    Ok(el.get(&row(OPEN, &[id])[..]).map_err(io_err)?.is_some())
}

/// The first transaction that keeps a linearizable read of `keys` waiting (a write lock).
pub(super) fn read_blocker(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    keys: &[Bytes],
) -> Result<Option<TxnId>> {
    if !any_locks(el)? {
        return Ok(None);
    }
    for k in keys {
        if let Some(t) = lock_holder(el, k, false)? {
            return Ok(Some(t));
        }
    }
    Ok(None)
}
