//! The coordinator against simulated participant shards that lose requests and replies.
//!
//! Each simulated shard applies steps exactly as a real participant's state machine does
//! (`capdb_types::txn::step`, `lock_all`), over accounts holding integers. Clients move money
//! between accounts on different shards in concurrent transactions; every request is lost
//! before it is applied, or its reply after, with some probability, and a short resolution
//! bound makes some transactions end `Unknown`. A recovery pass (what the anchor shard's leader
//! runs) then finishes whatever is left. The specification:
//!
//! - every transaction is all-or-nothing: committed on every participant or on none;
//! - no lock is left once everything is finished;
//! - money is conserved (a half-applied transfer would create or destroy some);
//! - what clients were told is true: a `Committed` answer was committed, a `Conflict` or
//!   `WatchFailed` answer was not, and only `Unknown` answers are left to recovery.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capdb_txn::{
    Answer, Config, Coordinator, Finished, Participants, Plan, PlannedCommand, ShardStep,
    Unreachable,
};
use capdb_types::txn::{
    Decision, Effect, KeyLocks, LockMode, Outcome, Participation, Refusal, Step, TxnId, lock_all,
    step, unlock_all,
};
use capdb_types::{GroupId, Timestamp};

/// One simulated participant shard.
#[derive(Default)]
struct Shard {
    txns: HashMap<TxnId, Participation>,
    /// Per transaction: its participants (the record, for recovery), staged writes, replies.
    record: HashMap<TxnId, Vec<GroupId>>,
    staged: HashMap<TxnId, Vec<(Bytes, i64)>>,
    replies: HashMap<TxnId, Vec<i64>>,
    locks: BTreeMap<Bytes, KeyLocks>,
    data: BTreeMap<Bytes, i64>,
    /// Prepare timestamps: this shard's "log position".
    clock: u64,
}

/// A step as the simulated shards receive it: commands are `["ADD", key, delta]`.
type SimStep = ShardStep<Vec<Bytes>, (Bytes, u64)>;

struct Sim {
    shards: Vec<Mutex<Shard>>,
    rng: Mutex<fastrand::Rng>,
    /// Per mille: a request lost before it is applied; a reply lost after.
    lose_request: u32,
    lose_reply: u32,
    /// Steps a correct coordinator never sends (a commit without a YES vote, ...).
    violations: Mutex<Vec<String>>,
    /// Participants answer their replies only to the commit (they run the commands then), not
    /// with their YES vote.
    replies_at_commit: bool,
}

impl Sim {
    fn chance(&self, per_mille: u32) -> bool {
        self.rng.lock().unwrap().u32(0..1000) < per_mille
    }

    fn apply(&self, group: GroupId, txn: TxnId, s: SimStep) -> Answer<i64> {
        let mut shard = self.shards[group as usize].lock().unwrap();
        let shard = &mut *shard;
        // As a real participant: the commits a prepare carries first, each if still prepared.
        if let ShardStep::Prepare(p) = &s {
            for (earlier, ts) in &p.committed_first {
                if matches!(
                    shard.txns.get(earlier),
                    Some(Participation::Prepared { .. })
                ) {
                    self.apply_to(shard, group, *earlier, ShardStep::Commit { ts: *ts });
                }
            }
        }
        self.apply_to(shard, group, txn, s)
    }

    fn apply_to(&self, shard: &mut Shard, group: GroupId, txn: TxnId, s: SimStep) -> Answer<i64> {
        let current = shard.txns.get(&txn).cloned();
        let pure = match &s {
            ShardStep::Prepare(p) => {
                let vote = if current.is_some() {
                    // Repeated or late: `step` answers what is there without voting again.
                    Ok(Timestamp(0))
                } else {
                    match lock_all(&mut shard.locks, txn, &p.keys, p.deadline_ms) {
                        Ok(()) => {
                            shard.clock += 1;
                            Ok(Timestamp(shard.clock))
                        }
                        Err(c) => Err(Refusal::Locked(c)),
                    }
                };
                Step::Prepare { vote }
            }
            ShardStep::Commit { ts } => Step::Commit { ts: *ts },
            ShardStep::Abort => Step::Abort,
            ShardStep::Prevent => Step::Prevent,
        };
        let keys = match (&s, &current) {
            (ShardStep::Prepare(p), _) => p.keys.clone(),
            (_, Some(Participation::Prepared { keys, .. })) => keys.clone(),
            _ => Vec::new(),
        };
        let stepped = step(current.as_ref(), pure, || {
            let ShardStep::Prepare(p) = &s else {
                unreachable!("only a prepare stages")
            };
            (p.keys.clone(), p.anchor, p.deadline_ms)
        });
        let (next, effect, outcome) = match stepped {
            Ok(t) => t,
            Err(v) => {
                // Refused, as a real participant does; the run fails at its end.
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("shard {group}, {txn}: {}", v.0));
                return Answer {
                    outcome: Outcome::Aborted,
                    replies: None,
                };
            }
        };
        match effect {
            Effect::LockAndStage => {
                let ShardStep::Prepare(p) = &s else {
                    unreachable!()
                };
                // Run the commands on an overlay: replies now, writes at commit.
                let mut overlay: BTreeMap<Bytes, i64> = BTreeMap::new();
                let mut replies = Vec::new();
                for c in &p.commands {
                    let key = c[1].clone();
                    let delta: i64 = std::str::from_utf8(&c[2]).unwrap().parse().unwrap();
                    let now = overlay
                        .get(&key)
                        .or(shard.data.get(&key))
                        .copied()
                        .unwrap_or(0)
                        + delta;
                    overlay.insert(key, now);
                    replies.push(now);
                }
                shard.staged.insert(txn, overlay.into_iter().collect());
                shard.replies.insert(txn, replies);
                shard.record.insert(txn, p.participants.clone());
            }
            Effect::ApplyAndUnlock => {
                for (k, v) in shard.staged.remove(&txn).unwrap_or_default() {
                    shard.data.insert(k, v);
                }
                unlock_all(&mut shard.locks, txn, &keys);
            }
            Effect::DropAndUnlock => {
                shard.staged.remove(&txn);
                unlock_all(&mut shard.locks, txn, &keys);
            }
            Effect::None => {
                // A refused prepare took its locks above only if `lock_all` succeeded, which
                // means the vote was YES; nothing to undo here.
            }
        }
        if let Some(n) = next {
            shard.txns.insert(txn, n);
        }
        let replies = match outcome {
            Outcome::Yes(_) if self.replies_at_commit => None,
            Outcome::Yes(_) | Outcome::Committed(_) => shard.replies.get(&txn).cloned(),
            _ => None,
        };
        Answer { outcome, replies }
    }
}

impl Participants for Sim {
    type Reply = i64;
    type Command = Vec<Bytes>;
    type Guard = (Bytes, u64);

    async fn step(
        &self,
        group: GroupId,
        txn: TxnId,
        s: SimStep,
    ) -> Result<Answer<i64>, Unreachable> {
        // Requests take a little while, so transactions interleave.
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..300))).await;
        if self.chance(self.lose_request) {
            return Err(Unreachable("request lost".into()));
        }
        let a = self.apply(group, txn, s);
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..300))).await;
        if self.chance(self.lose_reply) {
            return Err(Unreachable("reply lost".into()));
        }
        Ok(a)
    }

    fn now_ms(&self) -> u64 {
        0
    }
}

const SHARDS: u64 = 3;
const ACCOUNTS: u64 = 6;
const START: i64 = 1_000;

fn account(a: u64) -> Bytes {
    Bytes::from(format!("acct:{a}"))
}

fn shard_of(a: u64) -> GroupId {
    a % SHARDS
}

fn transfer(from: u64, to: u64, amount: i64) -> Plan<Vec<Bytes>, (Bytes, u64)> {
    let cmd = |a: u64, delta: i64| PlannedCommand {
        group: shard_of(a),
        command: vec![
            Bytes::from_static(b"ADD"),
            account(a),
            Bytes::from(delta.to_string()),
        ],
        keys: vec![(account(a), LockMode::Write)],
    };
    Plan {
        commands: vec![cmd(from, -amount), cmd(to, amount)],
        guards: Vec::new(),
    }
}

async fn run(seed: u64, lose_request: u32, lose_reply: u32, per_client: usize) {
    run_with(seed, lose_request, lose_reply, per_client, false).await
}

async fn run_with(
    seed: u64,
    lose_request: u32,
    lose_reply: u32,
    per_client: usize,
    replies_at_commit: bool,
) {
    fastrand::seed(seed);
    let sim = Arc::new(Sim {
        shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        lose_request,
        lose_reply,
        violations: Mutex::new(Vec::new()),
        replies_at_commit,
    });
    for a in 0..ACCOUNTS {
        sim.shards[shard_of(a) as usize]
            .lock()
            .unwrap()
            .data
            .insert(account(a), START);
    }
    let config = Config {
        resolve_for: Duration::from_millis(30),
        ..Config::default()
    };
    let coordinator = Arc::new(Coordinator::new(sim.clone(), 1, seed, config));
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let coordinator = coordinator.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed * 100 + c);
            let mut answers = Vec::new();
            for _ in 0..per_client {
                let from = rng.u64(0..ACCOUNTS);
                let to = (from + rng.u64(1..ACCOUNTS)) % ACCOUNTS;
                let amount = rng.i64(1..=50);
                let f = coordinator.execute(&transfer(from, to, amount)).await;
                if let Finished::Committed(replies) = &f {
                    assert_eq!(replies.len(), 2, "one reply per command");
                }
                answers.push(f);
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    // Let background commits and aborts land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if lose_request == 0 && lose_reply == 0 {
        // Nothing lost: every commit arrived, by a later prepare or alone; none is left to
        // the recovery (a commit that rode a prepare and was dropped would be).
        for s in &sim.shards {
            let s = s.lock().unwrap();
            let prepared: Vec<&TxnId> = s
                .txns
                .iter()
                .filter(|(_, p)| matches!(p, Participation::Prepared { .. }))
                .map(|(id, _)| id)
                .collect();
            assert!(
                prepared.is_empty(),
                "seed {seed}: commits never sent: {prepared:?}"
            );
        }
        let rode = coordinator
            .metrics
            .commits_rode
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(rode > 0, "seed {seed}: no commit rode a later prepare");
    }

    // The anchors' recovery: finish every transaction still prepared somewhere.
    for round in 0.. {
        let mut open: BTreeMap<TxnId, Vec<GroupId>> = BTreeMap::new();
        for s in &sim.shards {
            let s = s.lock().unwrap();
            for (id, p) in &s.txns {
                if matches!(p, Participation::Prepared { .. }) {
                    open.insert(*id, s.record[id].clone());
                }
            }
        }
        if open.is_empty() {
            break;
        }
        assert!(round < 200, "recovery does not converge: {open:?}");
        for (id, groups) in open {
            let _: Decision = coordinator.recover(id, &groups).await;
        }
    }

    let violations = sim.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "seed {seed}: {} protocol violations, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(3)]
    );

    // All or nothing, per transaction.
    let mut by_txn: BTreeMap<TxnId, Vec<bool>> = BTreeMap::new();
    for s in &sim.shards {
        let s = s.lock().unwrap();
        assert!(s.locks.is_empty(), "locks left: {:?}", s.locks);
        for (id, p) in &s.txns {
            by_txn
                .entry(*id)
                .or_default()
                .push(matches!(p, Participation::Committed { .. }));
        }
    }
    let mut committed_ids = 0;
    for (id, parts) in &by_txn {
        let committed = parts.iter().filter(|c| **c).count();
        // A committed transaction touched 1 or 2 shards, and every one of them committed.
        if committed > 0 {
            assert_eq!(
                committed,
                parts.len(),
                "{id}: committed on some shards only"
            );
            committed_ids += 1;
        }
    }
    let total: i64 = sim
        .shards
        .iter()
        .map(|s| s.lock().unwrap().data.values().sum::<i64>())
        .sum();
    assert_eq!(total, START * ACCOUNTS as i64, "money created or destroyed");

    let told_committed = answers
        .iter()
        .filter(|a| matches!(a, Finished::Committed(_)))
        .count();
    let told_unknown = answers
        .iter()
        .filter(|a| matches!(a, Finished::Unknown(_)))
        .count();
    assert!(
        committed_ids >= told_committed && committed_ids <= told_committed + told_unknown,
        "seed {seed}: {committed_ids} transactions committed, clients were told \
         {told_committed} committed and {told_unknown} unknown"
    );
    assert!(told_committed > 0, "seed {seed}: nothing ever committed");
    let m = &coordinator.metrics;
    eprintln!(
        "seed {seed}: {} answers: committed {told_committed}, unknown {told_unknown}, \
         conflict {}; retried {}, recovered {}; {committed_ids} committed in the end",
        answers.len(),
        m.conflicts.load(std::sync::atomic::Ordering::Relaxed),
        m.retried.load(std::sync::atomic::Ordering::Relaxed),
        m.recovered.load(std::sync::atomic::Ordering::Relaxed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_all_or_nothing_when_nothing_is_lost() {
    for seed in 1..=3 {
        run(seed, 0, 0, 25).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_all_or_nothing_when_requests_and_replies_are_lost() {
    for seed in 1..=6 {
        run(seed, 100, 100, 12).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_all_or_nothing_when_most_replies_are_lost() {
    for seed in 20..=22 {
        run(seed, 50, 400, 8).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_that_reply_only_when_they_commit_are_waited_for() {
    for seed in 30..=33 {
        run_with(seed, 100, 100, 12, true).await;
    }
}

/// The shards (of `groups`) where `id` is still prepared.
fn prepared_on(sim: &Sim, id: TxnId) -> Vec<GroupId> {
    (0..SHARDS)
        .filter(|g| {
            matches!(
                sim.shards[*g as usize].lock().unwrap().txns.get(&id),
                Some(Participation::Prepared { .. })
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waits_to_ride_the_next_prepare_unless_someone_meets_its_lock() {
    let sim = Arc::new(Sim {
        shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        rng: Mutex::new(fastrand::Rng::with_seed(1)),
        lose_request: 0,
        lose_reply: 0,
        violations: Mutex::new(Vec::new()),
        replies_at_commit: false,
    });
    // A window long enough that no timer sends a commit during the test.
    let config = Config {
        lock_hold_ms: 600_000,
        commit_ride_for: Duration::from_secs(60),
        ..Config::default()
    };
    let coordinator = Coordinator::new(sim.clone(), 1, 1, config);
    let first = TxnId {
        origin: 1,
        epoch: 1,
        seq: 1,
    };
    // Accounts 0 and 1 are on shards 0 and 1.
    let answer = coordinator.execute(&transfer(0, 1, 5)).await;
    assert!(matches!(answer, Finished::Committed(_)), "{answer:?}");
    assert_eq!(
        prepared_on(&sim, first),
        vec![0, 1],
        "both commits wait for a ride"
    );

    // The next transaction's prepare to shard 1 carries the commit there; shard 0 still waits.
    let answer = coordinator.execute(&transfer(4, 2, 5)).await;
    assert!(matches!(answer, Finished::Committed(_)), "{answer:?}");
    assert_eq!(
        prepared_on(&sim, first),
        vec![0],
        "shard 1's commit rode a prepare"
    );
    let m = &coordinator.metrics;
    assert_eq!(m.commits_rode.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A command meeting the lock on shard 0 flushes what waits there, alone.
    coordinator.flush_rides(0);
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !prepared_on(&sim, first).is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "the flushed commit never landed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        m.commits_alone.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(sim.violations.lock().unwrap().is_empty());
}
