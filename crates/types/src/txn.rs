//! Transactions across `cp` shards: the rules every participant shard and every coordinator
//! agree on, as pure data and functions (the protocol is in `docs/design/transactions.md`).
//!
//! A transaction that touches several shards is committed by two-phase commit over the shards'
//! Raft groups, with the *parallel commit* decision rule: **a transaction is committed if and
//! only if every participant holds a durable YES prepare**. Each participant's prepare is one
//! entry in its own log; applying it locks the keys and stages the writes, or refuses. The
//! coordinator (the node that received EXEC) answers the client as soon as every vote is YES,
//! then tells participants to commit; nobody has to write the decision first, so the critical
//! path is one consensus round.
//!
//! The catch of that rule is the coordinator dying between prepares: some participants may
//! hold YES votes and locks for a transaction nobody will finish. The anchor shard (the one
//! holding the transaction record) then *recovers* it: it makes every participant that has not
//! prepared apply [`Step::Prevent`], a durable marker after which a late prepare can only be
//! refused, and decides from what it then sees. Because a prevented participant can never vote
//! YES, the coordinator and the recovery can never decide differently: the property test at
//! the bottom of this file plays every interleaving of prepares, prevents and decisions it can
//! generate and checks exactly that.
//!
//! What lives here, and why here: the state a participant keeps per transaction
//! ([`Participation`]) and its transitions ([`step`]), the per-key lock record ([`KeyLocks`])
//! and all-or-nothing locking ([`lock_all`]), and the decision rule ([`decide`]). Every replica
//! of a participant shard runs these while applying its log, so they must be deterministic and
//! free of I/O; the storage engine keeps their results in its lock and transaction tables.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// A transaction's identity: the coordinator's session and the transaction's number in it.
/// Stamped once by the coordinator and kept across its retries, so a participant that sees a
/// step twice recognises it (a retried prepare answers the first vote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId {
    /// The coordinating node.
    pub origin: u64,
    /// Random per process start of `origin`: a restarted coordinator is a new session.
    pub epoch: u64,
    /// The transaction's number in that session.
    pub seq: u64,
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}.{}", self.origin, self.epoch, self.seq)
    }
}

/// How a transaction holds a key from prepare to commit (strict two-phase locking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LockMode {
    /// Read only: shared with other readers.
    Read,
    /// Written (or read and written): exclusive.
    Write,
}

/// One lock: who holds it, how, and until when it may be held before the anchor is asked
/// whether its transaction is still alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub txn: TxnId,
    pub mode: LockMode,
    /// Unix ms.
    pub deadline_ms: u64,
}

/// The locks on one key: the value a participant's lock table keeps under that key. Either
/// one writer, or any number of readers; a transaction holds at most one lock per key (a
/// reader that also writes upgrades).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLocks {
    pub held: Vec<Held>,
}

impl KeyLocks {
    /// The transaction that keeps `txn` from taking the key in `mode`, if any.
    pub fn blocker(&self, txn: TxnId, mode: LockMode) -> Option<TxnId> {
        self.held
            .iter()
            .find(|h| h.txn != txn && (mode == LockMode::Write || h.mode == LockMode::Write))
            .map(|h| h.txn)
    }

    /// Takes the key for `txn` in `mode` (an upgrade if it already reads it). The caller has
    /// checked [`KeyLocks::blocker`].
    pub fn grant(&mut self, txn: TxnId, mode: LockMode, deadline_ms: u64) {
        debug_assert!(
            self.blocker(txn, mode).is_none(),
            "lock granted over a conflict"
        );
        match self.held.iter_mut().find(|h| h.txn == txn) {
            Some(h) => {
                h.mode = h.mode.max(mode);
                h.deadline_ms = h.deadline_ms.max(deadline_ms);
            }
            None => self.held.push(Held {
                txn,
                mode,
                deadline_ms,
            }),
        }
        self.held.sort_by_key(|h| h.txn);
        debug_assert!(self.is_consistent());
    }

    /// Drops `txn`'s lock; whether it held one.
    pub fn release(&mut self, txn: TxnId) -> bool {
        let before = self.held.len();
        self.held.retain(|h| h.txn != txn);
        self.held.len() != before
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The earliest deadline among the holders (the oldest lock's age is measured from it).
    pub fn earliest_deadline_ms(&self) -> Option<u64> {
        self.held.iter().map(|h| h.deadline_ms).min()
    }

    /// The invariant: one holder per transaction, and a writer only alone.
    pub fn is_consistent(&self) -> bool {
        let writers = self
            .held
            .iter()
            .filter(|h| h.mode == LockMode::Write)
            .count();
        let distinct = self.held.windows(2).all(|w| w[0].txn < w[1].txn);
        distinct && (writers == 0 || self.held.len() == 1)
    }
}

/// Where a participant keeps its locks: its storage engine's lock table (inside the write
/// transaction that applies the log entry), or a map in tests.
pub trait LockStore {
    fn locks(&self, key: &[u8]) -> KeyLocks;
    /// Stores the locks of `key` (an empty record means: remove it).
    fn set_locks(&mut self, key: &[u8], locks: KeyLocks);
}

impl LockStore for BTreeMap<Bytes, KeyLocks> {
    fn locks(&self, key: &[u8]) -> KeyLocks {
        self.get(key).cloned().unwrap_or_default()
    }

    fn set_locks(&mut self, key: &[u8], locks: KeyLocks) {
        if locks.is_empty() {
            self.remove(key);
        } else {
            self.insert(Bytes::copy_from_slice(key), locks);
        }
    }
}

/// A key that was locked by another transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub key: Bytes,
    pub holder: TxnId,
}

/// Locks every key for `txn`, or none: on the first conflict nothing is changed and the
/// conflict is returned. A key named twice is taken in the stronger mode.
pub fn lock_all(
    store: &mut impl LockStore,
    txn: TxnId,
    keys: &[(Bytes, LockMode)],
    deadline_ms: u64,
) -> Result<(), Conflict> {
    for (key, mode) in keys {
        if let Some(holder) = store.locks(key).blocker(txn, *mode) {
            return Err(Conflict {
                key: key.clone(),
                holder,
            });
        }
    }
    for (key, mode) in keys {
        let mut locks = store.locks(key);
        locks.grant(txn, *mode, deadline_ms);
        store.set_locks(key, locks);
    }
    Ok(())
}

/// Drops every lock `txn` holds on `keys`.
pub fn unlock_all(store: &mut impl LockStore, txn: TxnId, keys: &[(Bytes, LockMode)]) {
    for (key, _) in keys {
        let mut locks = store.locks(key);
        if locks.release(txn) {
            store.set_locks(key, locks);
        }
    }
}

/// Why a participant voted NO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A key is locked by another transaction: nothing was done; the coordinator may retry the
    /// whole transaction.
    Locked(Conflict),
    /// A WATCHed key changed: the transaction must not run (EXEC answers nil).
    WatchFailed { key: Bytes },
    /// A recovery (or an abort) got here first: this transaction can no longer commit.
    Prevented,
}

/// One participant's part of a transaction, as the coordinator sends it and the shard's log
/// carries it: its commands (`C`: in the node, [`crate::Mutation`]s) and WATCH guards (`G`), in
/// transaction order, with the keys they lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare<C, G> {
    /// The shard that keeps the transaction record (the first command's).
    pub anchor: crate::GroupId,
    /// Every participant, so that whoever finds this prepare orphaned can finish it.
    pub participants: Vec<crate::GroupId>,
    /// This shard's commands, in transaction order.
    pub commands: Vec<C>,
    pub keys: Vec<(Bytes, LockMode)>,
    /// This shard's WATCH guards.
    pub guards: Vec<G>,
    /// Unix ms after which the locks count as orphaned (a prepare applied later is refused).
    pub deadline_ms: u64,
    /// Earlier transactions that hold locks on some of these keys here and are known to be
    /// committed (every vote was YES) while their commits are still on the way: the
    /// participant commits each one still prepared before judging this prepare, so a
    /// client's next transaction on the same keys does not meet its previous one's locks.
    /// Committing a committed transaction is always right, at any time.
    pub committed_first: Vec<(TxnId, Timestamp)>,
}

/// A step sent to one participant shard: one entry in its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardStep<C, G> {
    Prepare(Prepare<C, G>),
    Commit { ts: Timestamp },
    Abort,
    Prevent,
}

impl<C, G> ShardStep<C, G> {
    /// The step's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ShardStep::Prepare(_) => "prepare",
            ShardStep::Commit { .. } => "commit",
            ShardStep::Abort => "abort",
            ShardStep::Prevent => "prevent",
        }
    }
}

/// What a participant shard keeps per transaction (its transaction table), written by the
/// log entries of [`Step`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Participation {
    /// Voted YES at `ts`: holds locks on `keys` and keeps the staged writes.
    Prepared {
        ts: Timestamp,
        keys: Vec<(Bytes, LockMode)>,
        /// The shard holding the transaction record, which recovers it.
        anchor: u64,
        deadline_ms: u64,
    },
    /// Voted NO; nothing is held.
    Refused(Refusal),
    /// Made sure no prepare can land (recovery), or aborted before any prepare arrived.
    Prevented,
    /// Staged writes applied at `ts`, locks released.
    Committed { ts: Timestamp },
    /// Staged writes dropped, locks released.
    Aborted,
}

/// A log entry's instruction to a participant about one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Lock and stage. `vote` is what the participant found when applying it (locks free and
    /// guards holding: YES at that timestamp; else the refusal), computed by the caller from
    /// the lock table and guards; [`step`] decides whether the vote may count.
    Prepare { vote: Result<Timestamp, Refusal> },
    /// The decision was commit, at `ts` (the largest prepare timestamp).
    Commit { ts: Timestamp },
    /// The decision was abort.
    Abort,
    /// Recovery: make sure no prepare can land from now on, and report what is there.
    Prevent,
}

/// What a participant answers to any step: where the transaction stands there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Prepared: a YES vote at this timestamp, not decided yet.
    Yes(Timestamp),
    /// It will never commit here.
    No(Refusal),
    Committed(Timestamp),
    Aborted,
}

/// What the participant must do to its data and locks while applying the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing (a repeated or refused step).
    None,
    /// Take the locks and keep the staged writes (a YES vote).
    LockAndStage,
    /// Apply the staged writes and release the locks.
    ApplyAndUnlock,
    /// Drop the staged writes and release the locks.
    DropAndUnlock,
}

/// A step that breaks the protocol: a commit of a transaction that did not vote YES here, or
/// an abort of one already committed. Never produced by a correct coordinator; a participant
/// refuses it and changes nothing (and the node logs it loudly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolViolation(pub String);

/// The transition of one transaction at one participant: the new state, what to do, and the
/// answer. Every transition is idempotent (a repeated step answers the same), which is what
/// makes retries by the coordinator and by recovery safe.
pub fn step(
    current: Option<&Participation>,
    step: Step,
    prepared: impl FnOnce() -> (Vec<(Bytes, LockMode)>, u64, u64),
) -> Result<(Option<Participation>, Effect, Outcome), ProtocolViolation> {
    use Participation as P;
    let unchanged = |p: &P| (Some(p.clone()), Effect::None, outcome_of(p));
    Ok(match (current, step) {
        // Prepare: only the first one counts; a prevent or abort before it wins.
        (None, Step::Prepare { vote: Ok(ts) }) => {
            let (keys, anchor, deadline_ms) = prepared();
            let p = P::Prepared {
                ts,
                keys,
                anchor,
                deadline_ms,
            };
            (Some(p), Effect::LockAndStage, Outcome::Yes(ts))
        }
        (None, Step::Prepare { vote: Err(r) }) => {
            let p = P::Refused(r);
            let o = outcome_of(&p);
            (Some(p), Effect::None, o)
        }
        (Some(p), Step::Prepare { .. }) => unchanged(p),

        // Commit: only of a YES vote.
        (Some(P::Prepared { .. }), Step::Commit { ts }) => (
            Some(P::Committed { ts }),
            Effect::ApplyAndUnlock,
            Outcome::Committed(ts),
        ),
        (Some(p @ P::Committed { .. }), Step::Commit { .. }) => unchanged(p),
        (p, Step::Commit { ts }) => {
            return Err(ProtocolViolation(format!(
                "commit at {ts:?} of a transaction that did not vote yes here ({p:?})"
            )));
        }

        // Abort: before a prepare it also prevents one.
        (None, Step::Abort) => (Some(P::Prevented), Effect::None, Outcome::Aborted),
        (Some(P::Prepared { .. }), Step::Abort) => {
            (Some(P::Aborted), Effect::DropAndUnlock, Outcome::Aborted)
        }
        (Some(P::Refused(_)), Step::Abort) => (Some(P::Aborted), Effect::None, Outcome::Aborted),
        (Some(p @ (P::Prevented | P::Aborted)), Step::Abort) => {
            (Some(p.clone()), Effect::None, Outcome::Aborted)
        }
        (Some(p @ P::Committed { .. }), Step::Abort) => {
            return Err(ProtocolViolation(format!(
                "abort of a transaction committed here ({p:?})"
            )));
        }

        // Prevent: durable unless a prepare is already there (then it reports the vote).
        (None, Step::Prevent) => (
            Some(P::Prevented),
            Effect::None,
            Outcome::No(Refusal::Prevented),
        ),
        (Some(p), Step::Prevent) => unchanged(p),
    })
}

/// What a participant in state `p` answers.
pub fn outcome_of(p: &Participation) -> Outcome {
    match p {
        Participation::Prepared { ts, .. } => Outcome::Yes(*ts),
        Participation::Refused(r) => Outcome::No(r.clone()),
        Participation::Prevented => Outcome::No(Refusal::Prevented),
        Participation::Committed { ts } => Outcome::Committed(*ts),
        Participation::Aborted => Outcome::Aborted,
    }
}

/// The decision from the participants' answers (`None`: no answer yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every participant voted YES (or one already committed): commit at `ts`, the largest
    /// prepare timestamp, so the writes are later than everything each shard had applied.
    Commit { ts: Timestamp },
    /// Some participant will never commit.
    Abort,
    /// Not yet known: some participant has not answered.
    Unknown,
}

/// The commit rule: committed if and only if every participant holds a YES vote. A
/// coordinator calls it on the answers to its prepares; a recovery calls it after preventing
/// every participant that had no prepare, when no answer is missing.
pub fn decide(answers: &[Option<Outcome>]) -> Decision {
    let mut ts = Timestamp::ZERO;
    let mut missing = false;
    for a in answers {
        match a {
            Some(Outcome::Yes(t)) => ts = ts.max(*t),
            Some(Outcome::Committed(t)) => return Decision::Commit { ts: *t },
            Some(Outcome::No(_) | Outcome::Aborted) => return Decision::Abort,
            None => missing = true,
        }
    }
    if missing || answers.is_empty() {
        Decision::Unknown
    } else {
        Decision::Commit { ts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(seq: u64) -> TxnId {
        TxnId {
            origin: 1,
            epoch: 7,
            seq,
        }
    }

    fn key(k: &str) -> Bytes {
        Bytes::copy_from_slice(k.as_bytes())
    }

    #[test]
    fn readers_share_a_key_and_a_writer_has_it_alone() {
        let mut t = BTreeMap::new();
        let r = |k| (key(k), LockMode::Read);
        let w = |k| (key(k), LockMode::Write);
        assert_eq!(lock_all(&mut t, id(1), &[r("a")], 10), Ok(()));
        assert_eq!(lock_all(&mut t, id(2), &[r("a")], 10), Ok(()));
        assert_eq!(
            lock_all(&mut t, id(3), &[w("b"), w("a")], 10),
            Err(Conflict {
                key: key("a"),
                holder: id(1)
            })
        );
        // All or nothing: "b" was not taken by the refused transaction.
        assert!(t.locks(b"b").is_empty());
        unlock_all(&mut t, id(1), &[r("a")]);
        unlock_all(&mut t, id(2), &[r("a")]);
        assert!(t.is_empty());
        assert_eq!(lock_all(&mut t, id(3), &[w("b"), w("a")], 10), Ok(()));
        assert_eq!(t.locks(b"a").blocker(id(4), LockMode::Read), Some(id(3)));
    }

    #[test]
    fn a_reader_alone_upgrades_to_writer() {
        let mut t = BTreeMap::new();
        let k = key("k");
        lock_all(&mut t, id(1), &[(k.clone(), LockMode::Read)], 5).unwrap();
        lock_all(&mut t, id(1), &[(k.clone(), LockMode::Write)], 9).unwrap();
        let l = t.locks(b"k");
        assert_eq!(l.held.len(), 1);
        assert_eq!(l.held[0].mode, LockMode::Write);
        assert_eq!(l.earliest_deadline_ms(), Some(9));
    }

    #[test]
    fn a_prevent_before_the_prepare_makes_the_prepare_a_no() {
        let p = step(None, Step::Prevent, || unreachable!()).unwrap();
        assert_eq!(p.2, Outcome::No(Refusal::Prevented));
        let late = step(
            p.0.as_ref(),
            Step::Prepare {
                vote: Ok(Timestamp(5)),
            },
            || unreachable!("a prevented participant must not stage"),
        )
        .unwrap();
        assert_eq!(late.1, Effect::None);
        assert_eq!(late.2, Outcome::No(Refusal::Prevented));
    }

    #[test]
    fn commit_without_a_yes_vote_is_refused() {
        assert!(step(None, Step::Commit { ts: Timestamp(1) }, || unreachable!()).is_err());
        let committed = Participation::Committed { ts: Timestamp(3) };
        assert!(step(Some(&committed), Step::Abort, || unreachable!()).is_err());
    }

    #[test]
    fn the_commit_timestamp_is_the_largest_prepare_timestamp() {
        let yes = |t| Some(Outcome::Yes(Timestamp(t)));
        assert_eq!(
            decide(&[yes(4), yes(9), yes(2)]),
            Decision::Commit { ts: Timestamp(9) }
        );
        assert_eq!(decide(&[yes(4), None]), Decision::Unknown);
        assert_eq!(
            decide(&[yes(4), None, Some(Outcome::No(Refusal::Prevented))]),
            Decision::Abort
        );
        assert_eq!(decide(&[]), Decision::Unknown);
    }

    /// One event of the model below.
    #[derive(Debug, Clone)]
    enum Event {
        /// The coordinator's prepare reaches participant i (votes yes unless `refuse`).
        Prepare { i: usize, refuse: bool },
        /// The recovery prevents participant i (or reads its vote).
        Prevent { i: usize },
        /// The coordinator decides from the answers it has.
        CoordinatorDecides,
        /// The recovery decides, once it has prevented (or heard from) everyone.
        RecoveryDecides,
    }

    fn arb_run() -> impl Strategy<Value = (usize, Vec<Event>)> {
        (1usize..5).prop_flat_map(|n| {
            let event = prop_oneof![
                4 => (0..n, prop::bool::weighted(0.2))
                    .prop_map(|(i, refuse)| Event::Prepare { i, refuse }),
                3 => (0..n).prop_map(|i| Event::Prevent { i }),
                1 => Just(Event::CoordinatorDecides),
                1 => Just(Event::RecoveryDecides),
            ];
            (Just(n), prop::collection::vec(event, 0..24))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// The safety of the parallel commit rule with recovery: whatever the order in which
        /// prepares, prevents and the two deciders' moves happen (the coordinator may die at
        /// any point, which is the same as never deciding), the coordinator and the recovery
        /// never decide differently, and applying both decisions everywhere never breaks the
        /// protocol.
        #[test]
        fn coordinator_and_recovery_never_decide_differently((n, events) in arb_run()) {
            let mut state: Vec<Option<Participation>> = vec![None; n];
            let mut coordinator_heard: Vec<Option<Outcome>> = vec![None; n];
            let mut recovery_heard: Vec<Option<Outcome>> = vec![None; n];
            let mut decisions: Vec<Decision> = Vec::new();
            let mut locks: BTreeMap<Bytes, KeyLocks> = BTreeMap::new();
            let txn = id(1);
            let keys_of = |i: usize| vec![(key(&format!("k{i}")), LockMode::Write)];
            for e in events {
                match e {
                    Event::Prepare { i, refuse } => {
                        let vote = if refuse {
                            Err(Refusal::Locked(Conflict { key: key("x"), holder: id(2) }))
                        } else {
                            Ok(Timestamp(10 + i as u64))
                        };
                        let (next, effect, answer) =
                            step(state[i].as_ref(), Step::Prepare { vote }, || (keys_of(i), 0, 99))
                                .unwrap();
                        if effect == Effect::LockAndStage {
                            lock_all(&mut locks, txn, &keys_of(i), 99).unwrap();
                        }
                        state[i] = next;
                        coordinator_heard[i] = Some(answer);
                    }
                    Event::Prevent { i } => {
                        let (next, _, answer) =
                            step(state[i].as_ref(), Step::Prevent, || unreachable!()).unwrap();
                        state[i] = next;
                        recovery_heard[i] = Some(answer);
                    }
                    Event::CoordinatorDecides => decisions.push(decide(&coordinator_heard)),
                    Event::RecoveryDecides => {
                        // Recovery decides only once nothing is missing: it prevents first.
                        if recovery_heard.iter().all(Option::is_some) {
                            decisions.push(decide(&recovery_heard));
                        }
                    }
                }
            }
            let definite: Vec<&Decision> =
                decisions.iter().filter(|d| **d != Decision::Unknown).collect();
            for pair in definite.windows(2) {
                prop_assert_eq!(pair[0], pair[1]);
            }
            // Carrying out the decision at every participant is always allowed, and leaves
            // no lock behind.
            if let Some(d) = definite.first() {
                for (i, slot) in state.iter_mut().enumerate() {
                    let s = match d {
                        Decision::Commit { ts } => Step::Commit { ts: *ts },
                        _ => Step::Abort,
                    };
                    let (next, effect, _) = step(slot.as_ref(), s, || unreachable!())
                        .map_err(|v| TestCaseError::fail(v.0))?;
                    if matches!(effect, Effect::ApplyAndUnlock | Effect::DropAndUnlock) {
                        unlock_all(&mut locks, txn, &keys_of(i));
                    }
                    *slot = next;
                }
                prop_assert!(locks.is_empty(), "locks left: {:?}", locks);
            }
        }

        /// Locking keeps the lock invariant whatever the order of grants and releases.
        #[test]
        fn locks_stay_consistent(ops in prop::collection::vec(
            (0u64..4, 0usize..3, prop::bool::ANY, prop::bool::ANY), 0..60)
        ) {
            let mut t: BTreeMap<Bytes, KeyLocks> = BTreeMap::new();
            for (txn, k, write, release) in ops {
                let keys = vec![(
                    key(&format!("k{k}")),
                    if write { LockMode::Write } else { LockMode::Read },
                )];
                if release {
                    unlock_all(&mut t, id(txn), &keys);
                } else {
                    let before = t.clone();
                    if lock_all(&mut t, id(txn), &keys, 1).is_err() {
                        prop_assert_eq!(&before, &t);
                    }
                }
                for l in t.values() {
                    prop_assert!(l.is_consistent(), "{:?}", l);
                    prop_assert!(!l.is_empty());
                }
            }
        }
    }
}
