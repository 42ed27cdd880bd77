//! Cross-shard transactions on `cp` keyspaces: the node's coordinator (`capdb-txn`) wired to
//! the Raft groups, and the recovery of transactions whose coordinator died.
//!
//! A MULTI/EXEC whose keys are on several shards (of one or several `cp` keyspaces) becomes a
//! [`Plan`]: each command with its shard and the keys it locks (read or write), each WATCH
//! guard with its shard. The coordinator prepares every participant shard at once (one log
//! entry each: `Request::TxnStep`), decides, answers, and commits in the background; the
//! participants run their commands at the prepare, under the locks, on an overlay of their
//! state, and apply what they would change at the commit (`capdb_storage::disk` `txn.rs`,
//! `overlay.rs`), so their votes carry the replies. What EXEC answers for each
//! ending is in [`Finished`]; see `ARCHITECTURE.md`, "Transactions".
//!
//! # Orphans
//!
//! A coordinator can die between prepares, leaving locks behind. Every node runs
//! [`recover_orphans`]: each [`RECOVERY_PERIOD`] it reads, on the shards it leads, the
//! transactions prepared and past their lock deadline, and finishes each with
//! [`Coordinator::recover`] (prevent the participants that have not prepared, decide, carry the
//! decision out). Any participant's leader may do this for any transaction: the prevent rule
//! makes concurrent recoveries and a slow coordinator agree. So a lock outlives its coordinator
//! by at most its deadline ([`capdb_txn::Config::lock_hold_ms`]) plus a recovery round.

use std::sync::Arc;
use std::time::Duration;

use capdb_raft::Groups;
use capdb_raft::command::TxnGuard;
use capdb_txn::{
    Answer, Coordinator, Finished, Participants, Plan, PlannedCommand, Step, Unreachable,
};
use capdb_types::txn::{LockMode, TxnId};
use capdb_types::{GroupId, Mutation, Reply, Result};

/// How often each node looks for orphaned transactions on the shards it leads.
pub const RECOVERY_PERIOD: Duration = Duration::from_millis(100);
/// Orphans one node recovers at once at most (the rest wait for the next round).
pub const RECOVERIES_IN_FLIGHT_MAX: usize = 64;

/// The coordinator type of a node.
pub type TxnCoordinator = Coordinator<ShardSteps>;

/// Participant shards reached through this node's Raft groups (each step proposed through the
/// shard's leader, retried and forwarded like any write).
pub struct ShardSteps {
    pub groups: Arc<Groups>,
}

impl Participants for ShardSteps {
    type Reply = Result<Reply>;
    type Command = Mutation;
    type Guard = TxnGuard;

    async fn step(
        &self,
        group: GroupId,
        txn: TxnId,
        step: Step<Self>,
    ) -> std::result::Result<Answer<Self::Reply>, Unreachable> {
        match self.groups.txn_step(group, txn, step, now_ms()).await {
            Ok(a) => Ok(Answer {
                outcome: a.outcome,
                replies: a.replies,
            }),
            // Whatever failed, the step may have been applied: the coordinator resends it
            // (steps are idempotent) or resolves the participant.
            Err(e) => Err(Unreachable(e.to_string())),
        }
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new coordinator for this node: its transaction ids start a new session (epoch) per
/// process, so they never repeat an earlier run's. `crash`: testing only (see
/// `DebugConfig::txn_crash`).
pub fn coordinator(
    groups: Arc<Groups>,
    crash: Option<capdb_txn::CrashPoint>,
) -> Arc<TxnCoordinator> {
    let origin = groups.id();
    let epoch = fastrand::u64(1..);
    let coordinator = Arc::new(Coordinator::new(
        Arc::new(ShardSteps {
            groups: groups.clone(),
        }),
        origin,
        epoch,
        capdb_txn::Config {
            debug_crash: crash,
            ..capdb_txn::Config::default()
        },
    ));
    // A command here that meets a lock sends this node's commits for that shard at once
    // (weak: the groups must not keep the coordinator, which keeps the groups, alive).
    let weak = Arc::downgrade(&coordinator);
    groups.on_lock_wait(Box::new(move |group| {
        if let Some(c) = weak.upgrade() {
            c.flush_rides(group);
        }
    }));
    coordinator
}

/// Runs a cross-shard transaction's plan: what EXEC answers (see [`answer`]). With
/// `--debug-unsafe-txn` (testing only) every command is applied alone and the guards are
/// ignored: not atomic, on purpose, for the chaos checkers to catch.
pub async fn execute(
    txns: &TxnCoordinator,
    plan: Plan<Mutation, TxnGuard>,
    now_ms: u64,
) -> Result<Option<Vec<Result<Reply>>>> {
    let groups = &txns.participants().groups;
    if groups.unsafe_txn() {
        let mut replies = Vec::with_capacity(plan.commands.len());
        for c in plan.commands {
            replies.extend(
                groups
                    .write_mutations(c.group, vec![c.command], now_ms)
                    .await?,
            );
        }
        return Ok(Some(replies));
    }
    answer(txns.execute(&plan).await)
}

/// One command of a transaction with the shard its keys are on: the keys it locks, in write
/// mode when it may change them.
pub fn planned(group: GroupId, m: Mutation) -> PlannedCommand<Mutation> {
    let (keys, writes) = match &m {
        Mutation::Exec { key, args } => (
            capdb_data::command::command_keys(args).unwrap_or_else(|_| vec![key.clone()]),
            capdb_data::command::writes(args),
        ),
        other => (vec![other.key().clone()], true),
    };
    let mode = if writes {
        LockMode::Write
    } else {
        LockMode::Read
    };
    PlannedCommand {
        group,
        command: m,
        keys: keys.into_iter().map(|k| (k, mode)).collect(),
    }
}

/// A plan from commands and guards already placed on their shards.
pub fn plan(
    commands: Vec<(GroupId, Mutation)>,
    guards: Vec<(GroupId, TxnGuard)>,
) -> Plan<Mutation, TxnGuard> {
    Plan {
        commands: commands.into_iter().map(|(g, m)| planned(g, m)).collect(),
        guards: guards
            .into_iter()
            .map(|(g, guard)| (g, guard.key.clone(), guard))
            .collect(),
    }
}

/// What EXEC answers for a finished cross-shard transaction: `Ok(Some(replies))` committed,
/// `Ok(None)` a watched key changed (nothing applied), `Err` nothing applied (`-TRYAGAIN`:
/// locks stayed taken) or unknown (`-UNCERTAIN`: the cluster finishes it; read before
/// retrying).
pub fn answer(finished: Finished<Result<Reply>>) -> Result<Option<Vec<Result<Reply>>>> {
    match finished {
        Finished::Committed(replies) => Ok(Some(replies)),
        Finished::WatchFailed => Ok(None),
        Finished::Conflict => Err(capdb_types::Error::Unavailable(
            "the transaction's keys stayed locked by other transactions; nothing was applied, retry"
                .into(),
        )),
        Finished::Unknown(why) => Err(capdb_types::Error::OutcomeUnknown(format!(
            "the transaction may or may not have committed ({why}); read its keys before retrying"
        ))),
    }
}

/// Finishes orphaned transactions on the shards this node leads, forever (see the module
/// doc). Also publishes the lock gauges.
pub async fn recover_orphans(node: Arc<super::Node>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(RECOVERIES_IN_FLIGHT_MAX));
    let mut recovering: std::collections::HashSet<TxnId> = Default::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<TxnId>();
    loop {
        tokio::time::sleep(RECOVERY_PERIOD).await;
        if node.is_shutting_down() {
            return;
        }
        while let Ok(id) = done_rx.try_recv() {
            recovering.remove(&id);
        }
        let now = now_ms();
        let open = node.groups.open_txns_led(now);
        let prepared: u64 = open.iter().map(|(_, o)| o.prepared).sum();
        let earliest = open
            .iter()
            .filter_map(|(_, o)| o.earliest_deadline_ms)
            .min();
        let hold = capdb_txn::Config::default().lock_hold_ms;
        let oldest_age_ms = earliest.map_or(0, |d| now.saturating_sub(d.saturating_sub(hold)));
        node.metrics.txn_locks(prepared, oldest_age_ms);
        for (_, o) in open {
            for orphan in o.orphans {
                if recovering.contains(&orphan.txn) || orphan.participants.is_empty() {
                    continue;
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    break;
                };
                recovering.insert(orphan.txn);
                let (txns, done) = (node.txns.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let decision = txns.recover(orphan.txn, &orphan.participants).await;
                    tracing::info!(txn = %orphan.txn, ?decision, "orphaned transaction finished by recovery");
                    drop(permit);
                    let _ = done.send(orphan.txn);
                });
            }
        }
    }
}
