//! The coordinator: one transaction from plan to answer (see the crate docs for the protocol).
//!
//! `execute` runs attempts. An attempt takes a fresh [`TxnId`], sends every participant its
//! prepare at once, and applies the commit rule to the answers:
//! - all YES: committed. The replies are assembled in command order and the commits go out in
//!   the background (a participant that misses its commit keeps its locks until the anchor's
//!   recovery commits it, which it will: every vote is YES). A participant that runs its
//!   commands only when it commits (it voted without replies) is committed first and its
//!   commit's answer carries them.
//! - a commit *rides* this node's next prepare to the same shard (`Prepare::committed_first`)
//!   when one is sent within [`Config::commit_ride_for`]; otherwise it is sent as an entry of
//!   its own. Each commit entry costs every replica of the shard an fsync, and a commit sent
//!   right after the answer meets the client's next transaction at the disks: measured with
//!   `capdb bench txn` at one client, the 2-shard EXEC's p50 went from 1.06–1.22 ms to
//!   0.79–0.87 ms (`docs/design/transactions.md`). The price: the keys stay locked up to that
//!   window longer for transactions coordinated elsewhere. A command on this node that meets
//!   the lock sends the shard's waiting commits at once ([`Coordinator::flush_rides`]), and
//!   this node's next prepare on the same keys carries them.
//! - a NO: aborted. A failed WATCH ends the transaction (nothing applied, EXEC answers nil);
//!   a lock conflict, or a prepare that arrived after a recovery's prevent, releases this
//!   attempt's locks (awaited, so the next attempt does not meet its own) and tries again
//!   with a new id, for up to [`Config::retry_for`] (and [`Config::attempts_max`] attempts).
//! - some answer missing: the unreachable participants are *prevented* (retried until
//!   [`Config::resolve_for`] has passed). A prevent either finds the prepare (its vote counts)
//!   or makes any later prepare a NO, so once every participant has answered one or the other,
//!   the decision is certain. If one stays unreachable, the answer is `Unknown`.
//!
//! Every step is idempotent at the participant (`capdb_types::txn::step`), so resending one
//! after a lost reply is always safe, and a coordinator and a recovery racing on the same
//! transaction cannot decide differently.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use capdb_types::txn::{Decision, LockMode, Outcome, Refusal, TxnId, decide};
pub use capdb_types::txn::{Prepare, ShardStep};
use capdb_types::{GroupId, Timestamp};
use tokio::time::Instant;

/// One command of a transaction (`C`: in the node a `Mutation`), with the shard its keys are
/// on and how it uses them.
#[derive(Debug, Clone)]
pub struct PlannedCommand<C> {
    pub group: GroupId,
    pub command: C,
    pub keys: Vec<(Bytes, LockMode)>,
}

/// A whole transaction as the coordinator receives it: every command and WATCH guard (`G`)
/// up front (one-shot transactions: locks are never held across a client's think time).
#[derive(Debug, Clone)]
pub struct Plan<C, G> {
    pub commands: Vec<PlannedCommand<C>>,
    /// WATCH guards: the shard that judges each, the key (read-locked there until the
    /// decision, so it cannot change after the guard held), and the guard.
    pub guards: Vec<(GroupId, Bytes, G)>,
}

impl<C, G> Default for Plan<C, G> {
    fn default() -> Self {
        Plan {
            commands: Vec::new(),
            guards: Vec::new(),
        }
    }
}

/// A participant's answer to any step.
#[derive(Debug, Clone)]
pub struct Answer<R> {
    pub outcome: Outcome,
    /// With `Yes` and `Committed`: this shard's replies, in its commands' order (the
    /// participant keeps them with its vote, so a repeated step returns them too).
    pub replies: Option<Vec<R>>,
}

/// A step whose outcome at the participant is unknown: it may or may not have been applied.
#[derive(Debug, Clone)]
pub struct Unreachable(pub String);

/// How the coordinator reaches participant shards.
pub trait Participants: Send + Sync + 'static {
    type Reply: Clone + Send + Sync + 'static;
    type Command: Clone + Send + Sync + 'static;
    type Guard: Clone + Send + Sync + 'static;

    /// Has `step` of `txn` applied by shard `group` (proposed through its leader) and returns
    /// the participant's answer. `Err`: unknown whether it was applied.
    fn step(
        &self,
        group: GroupId,
        txn: TxnId,
        step: Step<Self>,
    ) -> impl Future<Output = Result<Answer<Self::Reply>, Unreachable>> + Send;

    /// Unix ms (the node's clock, for lock deadlines).
    fn now_ms(&self) -> u64;
}

/// The step type of participants `P`.
pub type Step<P> = ShardStep<<P as Participants>::Command, <P as Participants>::Guard>;

/// The plan type of participants `P`.
pub type PlanOf<P> = Plan<<P as Participants>::Command, <P as Participants>::Guard>;

/// The coordinator's bounds.
#[derive(Debug, Clone)]
pub struct Config {
    /// Attempts per transaction when locks conflict, and how long they may go on (whichever
    /// ends first; then `Conflict`: `-TRYAGAIN`). Plain writes wait as long for a lock.
    pub attempts_max: u32,
    pub retry_for: Duration,
    /// Locks count as orphaned this long after the prepare was sent. Participants compare it
    /// with their own clocks, so clocks must agree to well within it (a participant whose
    /// clock runs ahead by more refuses every prepare: unavailable, never wrong).
    pub lock_hold_ms: u64,
    /// How long an unanswered step is resent before giving up on the participant.
    pub resolve_for: Duration,
    /// First pause between attempts (doubling, with jitter).
    pub retry_pause: Duration,
    /// How long a commit waits to ride this node's next prepare to its shard before it is
    /// sent alone (module docs). Zero: always alone, right away. Must stay far below
    /// `lock_hold_ms`, or the recovery of orphans would finish live transactions.
    pub commit_ride_for: Duration,
    /// TESTING ONLY: the process aborts at this point of every transaction's first attempt,
    /// leaving its locks for the recovery of orphans to release.
    pub debug_crash: Option<CrashPoint>,
}

/// Where a coordinator dies on purpose (`Config::debug_crash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After every participant answered its prepare, before any commit: the recovery must
    /// commit (every vote is YES, and the client may have been about to hear so).
    AfterPrepares,
    /// After the first participant prepared, before the others heard anything: the recovery
    /// must abort (the others are prevented).
    AfterOnePrepare,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            attempts_max: 1_000,
            retry_for: Duration::from_secs(5),
            lock_hold_ms: 1_200,
            resolve_for: Duration::from_secs(3),
            retry_pause: Duration::from_millis(2),
            commit_ride_for: Duration::from_millis(2),
            debug_crash: None,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub committed: AtomicU64,
    pub watch_failed: AtomicU64,
    /// Transactions given up after every attempt met a lock.
    pub conflicts: AtomicU64,
    /// Attempts after the first.
    pub retried: AtomicU64,
    pub unknown: AtomicU64,
    /// Transactions finished by [`Coordinator::recover`].
    pub recovered: AtomicU64,
    /// Commits (one per transaction and shard) that rode a later prepare to their shard, and
    /// those sent as entries of their own ([`Config::commit_ride_for`]).
    pub commits_rode: AtomicU64,
    pub commits_alone: AtomicU64,
}

/// How a transaction ended, for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished<R> {
    /// Applied on every shard; the replies in command order.
    Committed(Vec<R>),
    /// A watched key had changed: nothing applied.
    WatchFailed,
    /// Every attempt met locks of other transactions: nothing applied.
    Conflict,
    /// A participant stayed unreachable: it may or may not commit; the anchor's recovery
    /// decides.
    Unknown(String),
}

/// Coordinates transactions for one node: a session of transaction ids and the protocol.
pub struct Coordinator<P: Participants> {
    participants: Arc<P>,
    origin: u64,
    epoch: u64,
    seq: AtomicU64,
    config: Config,
    pub metrics: Arc<Metrics>,
    /// Commits on the way (see [`Committing`]).
    committing: Arc<Mutex<Committing>>,
    /// Per (shard, key), a FIFO latch that this node's transactions on the key take in turn
    /// (see [`Coordinator::latch`]). An entry lives while a transaction holds or waits for it.
    latches: Arc<Mutex<Latches>>,
}

/// The latches one transaction holds; released (and their unused entries dropped) with it.
struct Latched {
    keys: Vec<(GroupId, Bytes)>,
    held: Vec<tokio::sync::OwnedMutexGuard<()>>,
    latches: Arc<Mutex<Latches>>,
}

impl Drop for Latched {
    fn drop(&mut self) {
        self.held.clear();
        let mut latches = self.latches.lock().unwrap_or_else(PoisonError::into_inner);
        for k in &self.keys {
            // Only the map's own reference left: nobody holds or waits for it.
            if latches.get(k).is_some_and(|l| Arc::strong_count(l) == 1) {
                latches.remove(k);
            }
        }
    }
}

/// Latches by (shard, key) (see [`Coordinator::latch`]). This map and the commits on the way
/// are changed by single inserts and removals, so a panic elsewhere while one was locked
/// leaves them whole: a poisoned lock is taken as it is.
type Latches = HashMap<(GroupId, Bytes), Arc<tokio::sync::Mutex<()>>>;

/// Committed transactions whose commits have not been answered yet by some shard.
#[derive(Default)]
struct Committing {
    /// (shard, key) -> the transaction and its commit timestamp: a later prepare of the same
    /// keys carries them (`Prepare::committed_first`) instead of meeting their locks. An entry
    /// goes when its commit is answered or given up ([`Config::resolve_for`]), so it holds at
    /// most the keys of the transactions committed in that time.
    by_key: HashMap<(GroupId, Bytes), (TxnId, Timestamp)>,
    /// Per shard, the commits waiting to ride the next prepare there (at most those of the
    /// last [`Config::commit_ride_for`]; the timer of each sends it alone if none came).
    waiting: HashMap<GroupId, Vec<Ride>>,
}

/// A commit waiting for (or riding) a prepare to its shard: the keys it unlocks there.
struct Ride {
    id: TxnId,
    ts: Timestamp,
    keys: Vec<Bytes>,
}

impl Committing {
    /// Forgets the keys of `id`'s commit on `group` (it was answered, or given up).
    fn answered(&mut self, group: GroupId, id: TxnId, keys: Vec<Bytes>) {
        for k in keys {
            if self
                .by_key
                .get(&(group, k.clone()))
                .is_some_and(|(t, _)| *t == id)
            {
                self.by_key.remove(&(group, k));
            }
        }
    }
}

/// An attempt's end: finished, or try again with a new id.
enum Attempt<R> {
    Done(Finished<R>),
    Retry,
}

impl<P: Participants> Coordinator<P> {
    /// A coordinator for node `origin`; `epoch` must differ per process start (a restarted
    /// node is a new session, so its ids never repeat an earlier process's).
    pub fn new(participants: Arc<P>, origin: u64, epoch: u64, mut config: Config) -> Self {
        // A ride window near the lock deadline would let the recovery of orphans finish live
        // transactions: keep it to a tenth of the deadline at most.
        let ride_max = Duration::from_millis(config.lock_hold_ms / 10);
        config.commit_ride_for = config.commit_ride_for.min(ride_max);
        Coordinator {
            participants,
            origin,
            epoch,
            seq: AtomicU64::new(0),
            config,
            metrics: Arc::new(Metrics::default()),
            committing: Arc::new(Mutex::new(Committing::default())),
            latches: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn next_id(&self) -> TxnId {
        TxnId {
            origin: self.origin,
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Runs `plan` to its end (see [`Finished`] for what each answer promises).
    pub async fn execute(&self, plan: &PlanOf<P>) -> Finished<P::Reply> {
        if plan.commands.is_empty() && plan.guards.is_empty() {
            return Finished::Committed(Vec::new());
        }
        let until = Instant::now() + self.config.retry_for;
        let Ok(_latched) = tokio::time::timeout_at(until, self.latch(plan)).await else {
            self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
            return Finished::Conflict;
        };
        let mut pause = self.config.retry_pause;
        for attempt in 0..self.config.attempts_max {
            if attempt > 0 {
                if Instant::now() >= until {
                    break;
                }
                self.metrics.retried.fetch_add(1, Ordering::Relaxed);
                let jitter = fastrand::u64(0..=pause.as_micros() as u64);
                tokio::time::sleep(pause + Duration::from_micros(jitter)).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            if let Attempt::Done(f) = self.attempt(plan).await {
                let counter = match &f {
                    Finished::Committed(_) => &self.metrics.committed,
                    Finished::WatchFailed => &self.metrics.watch_failed,
                    Finished::Conflict => &self.metrics.conflicts,
                    Finished::Unknown(_) => &self.metrics.unknown,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return f;
            }
        }
        self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
        Finished::Conflict
    }

    async fn attempt(&self, plan: &PlanOf<P>) -> Attempt<P::Reply> {
        let id = self.next_id();
        // Commands per shard, in transaction order (a shard with only guards has none); the
        // anchor is the first command's shard.
        let mut parts: BTreeMap<GroupId, Vec<usize>> = BTreeMap::new();
        for (i, c) in plan.commands.iter().enumerate() {
            parts.entry(c.group).or_default().push(i);
        }
        for (g, _, _) in &plan.guards {
            parts.entry(*g).or_default();
        }
        let anchor = match (plan.commands.first(), plan.guards.first()) {
            (Some(c), _) => c.group,
            (None, Some((g, _, _))) => *g,
            (None, None) => unreachable!("execute returns early for an empty plan"),
        };
        let groups: Vec<GroupId> = parts.keys().copied().collect();
        let deadline_ms = self.participants.now_ms() + self.config.lock_hold_ms;
        let keys_of: BTreeMap<GroupId, Vec<(Bytes, LockMode)>> = groups
            .iter()
            .map(|g| {
                let mut keys: Vec<(Bytes, LockMode)> = Vec::new();
                for &i in &parts[g] {
                    keys.extend(plan.commands[i].keys.iter().cloned());
                }
                for (_, key, _) in plan.guards.iter().filter(|(gg, _, _)| gg == g) {
                    keys.push((key.clone(), LockMode::Read));
                }
                (*g, keys)
            })
            .collect();
        // Commits waiting for a prepare to these shards ride along (taken per shard here, so
        // no timer sends them too); each rides until its prepare is answered.
        let prepares = groups.iter().map(|g| {
            let riders = Riders {
                group: *g,
                rides: self.take_rides(*g),
                sender: self.sender(),
            };
            let idx = &parts[g];
            let keys = keys_of[g].clone();
            let mut committed_first = self.committing_on(*g, &keys);
            committed_first.extend(riders.rides.iter().map(|r| (r.id, r.ts)));
            committed_first.sort();
            committed_first.dedup();
            let prepare = Prepare {
                anchor,
                participants: groups.clone(),
                commands: idx
                    .iter()
                    .map(|&i| plan.commands[i].command.clone())
                    .collect(),
                keys,
                guards: plan
                    .guards
                    .iter()
                    .filter(|(gg, _, _)| gg == g)
                    .map(|(_, _, guard)| guard.clone())
                    .collect(),
                deadline_ms,
                committed_first,
            };
            let step = self.participants.step(*g, id, ShardStep::Prepare(prepare));
            async move {
                let answer = step.await;
                // Answered: applied, its riders committed before it. Not answered (or this
                // future dropped): maybe not; the riders go alone, as `Riders` drops.
                if answer.is_ok() {
                    riders.settle();
                }
                answer
            }
        });
        let answers = if self.config.debug_crash == Some(CrashPoint::AfterOnePrepare) {
            let first = prepares
                .into_iter()
                .next()
                .expect("a transaction has a participant");
            let answered = first.await.map(|a| a.outcome);
            tracing::error!(%id, ?answered, "TESTING: the coordinator dies after one prepare");
            std::process::abort();
        } else {
            futures::future::join_all(prepares).await
        };
        if self.config.debug_crash == Some(CrashPoint::AfterPrepares) {
            tracing::error!(%id, "TESTING: the coordinator dies after its prepares");
            std::process::abort();
        }
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(groups.len());
        let mut replies: Vec<Option<Vec<P::Reply>>> = Vec::with_capacity(groups.len());
        for a in answers {
            match a {
                Ok(a) => {
                    outcomes.push(Some(a.outcome));
                    replies.push(a.replies);
                }
                Err(_) => {
                    outcomes.push(None);
                    replies.push(None);
                }
            }
        }
        let mut decision = decide(&outcomes);
        if decision == Decision::Unknown {
            decision = self.resolve(id, &groups, &mut outcomes, &mut replies).await;
        }
        match decision {
            Decision::Commit { ts } => {
                // A shard that voted without replies (it runs its commands when it commits),
                // or whose vote came through a recovery's commit, answers them to its commit:
                // commit those now and wait; the rest commit in the background.
                let until = Instant::now() + self.config.resolve_for;
                let waiting: Vec<usize> = (0..groups.len())
                    .filter(|&i| replies[i].is_none())
                    .collect();
                let commits = waiting
                    .iter()
                    .map(|&i| self.step_until(groups[i], id, ShardStep::Commit { ts }, until));
                let mut committed = vec![false; groups.len()];
                for (&i, answer) in waiting.iter().zip(futures::future::join_all(commits).await) {
                    if let Some(a) = answer {
                        committed[i] = matches!(a.outcome, Outcome::Committed(_));
                        replies[i] = a.replies;
                    }
                }
                // The others (and any commit that went unanswered) in the background: a
                // shard committed above must not get a second commit entry for nothing.
                let rest: Vec<GroupId> = groups
                    .iter()
                    .zip(&committed)
                    .filter(|(_, done)| !**done)
                    .map(|(g, _)| *g)
                    .collect();
                if !rest.is_empty() {
                    let keys = rest
                        .iter()
                        .map(|g| (*g, keys_of[g].iter().map(|(k, _)| k.clone()).collect()))
                        .collect();
                    self.commit_in_background(id, ts, keys);
                }
                let mut out: Vec<Option<P::Reply>> = vec![None; plan.commands.len()];
                for (g, shard_replies) in groups.iter().zip(replies) {
                    let idx = &parts[g];
                    match shard_replies {
                        Some(r) if r.len() == idx.len() => {
                            for (&i, reply) in idx.iter().zip(r) {
                                out[i] = Some(reply);
                            }
                        }
                        _ => {
                            return Attempt::Done(Finished::Unknown(format!(
                                "transaction {id} committed, but shard {g}'s replies were lost"
                            )));
                        }
                    }
                }
                Attempt::Done(Finished::Committed(out.into_iter().flatten().collect()))
            }
            Decision::Abort => {
                let watch = outcomes
                    .iter()
                    .any(|o| matches!(o, Some(Outcome::No(Refusal::WatchFailed { .. }))));
                if watch {
                    self.finish_in_background(id, groups, ShardStep::Abort);
                    return Attempt::Done(Finished::WatchFailed);
                }
                // A lock conflict (or a recovery's prevent got to a slow prepare first):
                // release this attempt's locks before the next attempt can meet them.
                self.finish(id, &groups, ShardStep::Abort).await;
                Attempt::Retry
            }
            Decision::Unknown => {
                let missing: Vec<GroupId> = groups
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, o)| o.is_none())
                    .map(|(g, _)| *g)
                    .collect();
                Attempt::Done(Finished::Unknown(format!(
                    "transaction {id}: shards {missing:?} unreachable; the anchor shard {anchor} finishes it"
                )))
            }
        }
    }

    /// Fills in the missing answers by preventing those participants, resending until
    /// [`Config::resolve_for`] has passed; returns the decision then.
    async fn resolve(
        &self,
        id: TxnId,
        groups: &[GroupId],
        outcomes: &mut [Option<Outcome>],
        replies: &mut [Option<Vec<P::Reply>>],
    ) -> Decision {
        let until = Instant::now() + self.config.resolve_for;
        let asks = groups
            .iter()
            .zip(outcomes.iter())
            .enumerate()
            .filter(|(_, (_, o))| o.is_none())
            .map(|(i, (g, _))| async move {
                (i, self.step_until(*g, id, ShardStep::Prevent, until).await)
            });
        for (i, answer) in futures::future::join_all(asks).await {
            if let Some(a) = answer {
                outcomes[i] = Some(a.outcome);
                replies[i] = a.replies;
            }
        }
        decide(outcomes)
    }

    /// Resends `step` to `group` until it is answered or `until` passes.
    async fn step_until(
        &self,
        group: GroupId,
        id: TxnId,
        step: Step<P>,
        until: Instant,
    ) -> Option<Answer<P::Reply>> {
        step_until(&*self.participants, group, id, step, until).await
    }

    /// Sends a decision's step to every participant and waits for the answers (bounded).
    async fn finish(&self, id: TxnId, groups: &[GroupId], step: Step<P>) {
        let until = Instant::now() + self.config.resolve_for;
        let sends = groups
            .iter()
            .map(|g| self.step_until(*g, id, step.clone(), until));
        futures::future::join_all(sends).await;
    }

    /// Sends a decision's step to every participant without waiting. A participant it never
    /// reaches keeps its locks until the anchor's recovery finishes the transaction.
    fn finish_in_background(&self, id: TxnId, groups: Vec<GroupId>, step: Step<P>) {
        let participants = self.participants.clone();
        let until = Instant::now() + self.config.resolve_for;
        tokio::spawn(async move {
            let sends = groups
                .iter()
                .map(|g| step_until(&*participants, *g, id, step.clone(), until));
            futures::future::join_all(sends).await;
        });
    }

    /// Takes this node's latches on every key of `plan`, in one global order (no deadlock
    /// between this node's transactions), each first come, first served. Transactions of one
    /// node on the same keys so run one after the other: the later one's prepare carries the
    /// earlier one's commit (`Prepare::committed_first`) instead of meeting its locks and
    /// backing off, which would let a hot key starve some of them. Transactions coordinated by
    /// other nodes still meet at the participants' locks.
    async fn latch(&self, plan: &PlanOf<P>) -> Latched {
        let mut keys: Vec<(GroupId, Bytes)> = plan
            .commands
            .iter()
            .flat_map(|c| c.keys.iter().map(|(k, _)| (c.group, k.clone())))
            .chain(plan.guards.iter().map(|(g, k, _)| (*g, k.clone())))
            .collect();
        keys.sort();
        keys.dedup();
        let mutexes: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut latches = self.latches.lock().unwrap_or_else(PoisonError::into_inner);
            keys.iter()
                .map(|k| latches.entry(k.clone()).or_default().clone())
                .collect()
        };
        let mut latched = Latched {
            keys,
            held: Vec::with_capacity(mutexes.len()),
            latches: self.latches.clone(),
        };
        for m in mutexes {
            latched.held.push(m.lock_owned().await);
        }
        latched
    }

    fn lock_committing(&self) -> std::sync::MutexGuard<'_, Committing> {
        self.committing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The committed transactions whose commits are on the way to `group` and lock some of
    /// `keys` there.
    fn committing_on(&self, group: GroupId, keys: &[(Bytes, LockMode)]) -> Vec<(TxnId, Timestamp)> {
        let committing = self.lock_committing();
        if committing.by_key.is_empty() {
            return Vec::new();
        }
        let mut found: Vec<(TxnId, Timestamp)> = keys
            .iter()
            .filter_map(|(k, _)| committing.by_key.get(&(group, k.clone())).copied())
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// The commits waiting to ride a prepare to `group`, taken (the caller sends them).
    fn take_rides(&self, group: GroupId) -> Vec<Ride> {
        self.lock_committing()
            .waiting
            .remove(&group)
            .unwrap_or_default()
    }

    /// Commits `id` on each shard of `keys` (with the keys it locks there) without waiting:
    /// by the next prepare this node sends to that shard within [`Config::commit_ride_for`],
    /// else alone. Until a shard answers, later prepares of those keys carry the commit.
    fn commit_in_background(&self, id: TxnId, ts: Timestamp, keys: Vec<(GroupId, Vec<Bytes>)>) {
        let ride_for = self.config.commit_ride_for;
        let groups: Vec<GroupId> = keys.iter().map(|(g, _)| *g).collect();
        let mut alone: Vec<(GroupId, Ride)> = Vec::new();
        {
            let mut committing = self.lock_committing();
            for (g, ks) in keys {
                for k in &ks {
                    committing.by_key.insert((g, k.clone()), (id, ts));
                }
                let ride = Ride { id, ts, keys: ks };
                if ride_for.is_zero() {
                    alone.push((g, ride));
                } else {
                    committing.waiting.entry(g).or_default().push(ride);
                }
            }
        }
        let sender = self.sender();
        if ride_for.is_zero() {
            for (g, ride) in alone {
                sender.alone(g, ride);
            }
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(ride_for).await;
            // Those no prepare took are still waiting: send them alone.
            let alone: Vec<(GroupId, Ride)> = {
                let mut committing = sender
                    .committing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                groups
                    .into_iter()
                    .filter_map(|g| {
                        let waiting = committing.waiting.get_mut(&g)?;
                        let at = waiting.iter().position(|r| r.id == id)?;
                        let ride = waiting.swap_remove(at);
                        if waiting.is_empty() {
                            committing.waiting.remove(&g);
                        }
                        Some((g, ride))
                    })
                    .collect()
            };
            for (g, ride) in alone {
                sender.alone(g, ride);
            }
        });
    }

    /// Sends every commit waiting to ride a prepare to `group` now, each alone: run when a
    /// command on this node meets a transaction's lock there (`Groups::on_lock_wait`), so
    /// that it waits for a commit round, not for the ride window.
    pub fn flush_rides(&self, group: GroupId) {
        let rides = {
            let mut committing = self.lock_committing();
            if committing.waiting.is_empty() {
                return;
            }
            committing.waiting.remove(&group).unwrap_or_default()
        };
        let sender = self.sender();
        for ride in rides {
            sender.alone(group, ride);
        }
    }

    fn sender(&self) -> CommitSender<P> {
        CommitSender {
            participants: self.participants.clone(),
            committing: self.committing.clone(),
            metrics: self.metrics.clone(),
            resolve_for: self.config.resolve_for,
        }
    }

    /// The participants this coordinator reaches.
    pub fn participants(&self) -> &P {
        &self.participants
    }

    /// Finishes transaction `id` whose coordinator may be gone (run by the anchor shard's
    /// leader for a record past its deadline): prevents every participant that has not
    /// prepared, decides, and carries the decision out. Returns the decision (`Unknown` if a
    /// participant stayed unreachable: try again later).
    pub async fn recover(&self, id: TxnId, groups: &[GroupId]) -> Decision {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; groups.len()];
        let mut replies: Vec<Option<Vec<P::Reply>>> = vec![None; groups.len()];
        let decision = self.resolve(id, groups, &mut outcomes, &mut replies).await;
        match &decision {
            Decision::Commit { ts } => {
                self.finish(id, groups, ShardStep::Commit { ts: *ts }).await;
            }
            Decision::Abort => self.finish(id, groups, ShardStep::Abort).await,
            Decision::Unknown => return decision,
        }
        self.metrics.recovered.fetch_add(1, Ordering::Relaxed);
        decision
    }
}

/// What sends commits alone, in the background (cloned into timers and [`Riders`]).
struct CommitSender<P: Participants> {
    participants: Arc<P>,
    committing: Arc<Mutex<Committing>>,
    metrics: Arc<Metrics>,
    resolve_for: Duration,
}

impl<P: Participants> CommitSender<P> {
    /// Sends `ride`'s commit to `group` as an entry of its own, resent until answered (or
    /// [`Config::resolve_for`]; then the recovery of orphans commits it), then forgets its
    /// keys. Outside a runtime (the process is shutting down) nothing is sent: the recovery
    /// commits it after the lock deadline.
    fn alone(&self, group: GroupId, ride: Ride) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.metrics.commits_alone.fetch_add(1, Ordering::Relaxed);
        let participants = self.participants.clone();
        let committing = self.committing.clone();
        let until = Instant::now() + self.resolve_for;
        runtime.spawn(async move {
            let commit = ShardStep::Commit { ts: ride.ts };
            step_until(&*participants, group, ride.id, commit, until).await;
            committing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .answered(group, ride.id, ride.keys);
        });
    }
}

/// The commits riding one prepare to `group`. [`Riders::settle`] once the prepare is
/// answered (it was applied, and they with it); dropped unsettled (the prepare was not
/// answered, or the transaction's future was dropped mid-flight, as when an HTTP client goes
/// away), they are sent alone, so a commit another client was already promised never waits
/// for the recovery of orphans.
struct Riders<P: Participants> {
    group: GroupId,
    rides: Vec<Ride>,
    sender: CommitSender<P>,
}

impl<P: Participants> Riders<P> {
    fn settle(mut self) {
        let rides = std::mem::take(&mut self.rides);
        if rides.is_empty() {
            return;
        }
        self.sender
            .metrics
            .commits_rode
            .fetch_add(rides.len() as u64, Ordering::Relaxed);
        let mut committing = self
            .sender
            .committing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for r in rides {
            committing.answered(self.group, r.id, r.keys);
        }
    }
}

impl<P: Participants> Drop for Riders<P> {
    fn drop(&mut self) {
        for ride in std::mem::take(&mut self.rides) {
            self.sender.alone(self.group, ride);
        }
    }
}

async fn step_until<P: Participants>(
    participants: &P,
    group: GroupId,
    id: TxnId,
    step: Step<P>,
    until: Instant,
) -> Option<Answer<P::Reply>> {
    let mut pause = Duration::from_millis(5);
    loop {
        match participants.step(group, id, step.clone()).await {
            Ok(a) => return Some(a),
            Err(e) => {
                if Instant::now() >= until {
                    tracing::debug!(%id, group, error = %e.0, "participant unreachable");
                    return None;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}
