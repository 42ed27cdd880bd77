//! Local groups follow the cluster map: start the groups of this node's `cp` shards, drop the
//! ones it no longer holds, and on groups it leads move the Raft membership towards the map.
//!
//! A membership change is one step at a time per group, in the background: add the missing
//! learners, wait until every future voter has caught up (at most [`CATCH_UP_ENTRIES`] behind),
//! then replace the voter set. A node leaving a group is dropped by itself once it sees it is
//! no longer a voter.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capdb_cluster::{ClusterState, GroupId, META_GROUP, NodeId, placement};
use capdb_storage::layout::shard_table;
use capdb_types::{Error, Mode};
use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ServerState};

use super::{CATCH_UP_ENTRIES, Group, Groups};
use crate::command::PeerNode;
use crate::state_machine::Kind;

/// Longest wait for future voters to catch up before a membership step gives up (it is retried
/// on the next pass).
const CATCH_UP_WAIT_MAX: Duration = Duration::from_secs(30);

impl Groups {
    /// One pass: local groups follow the map; groups this node leads move their membership.
    pub async fn follow_map(self: &Arc<Self>, state: &ClusterState) -> Result<(), Error> {
        self.start_missing_groups(state).await?;
        for (group, g) in self.all() {
            let m = g.raft.metrics().borrow_watched().clone();
            let target: BTreeSet<NodeId> = if group == META_GROUP {
                if state.nodes.is_empty() {
                    continue;
                }
                placement::meta_target_voters(
                    state,
                    m.membership_config.membership().voter_ids().collect(),
                )
            } else {
                match state.find_group(group) {
                    Some((ks, i)) => ks.shards[i].replicas.iter().copied().collect(),
                    None => BTreeSet::new(),
                }
            };
            if m.state == ServerState::Leader && !target.is_empty() {
                let learners_wanted: BTreeSet<NodeId> = if group == META_GROUP {
                    state
                        .nodes
                        .keys()
                        .copied()
                        .filter(|n| !target.contains(n))
                        .collect()
                } else {
                    BTreeSet::new()
                };
                self.spawn_membership_change(group, g.clone(), target.clone(), learners_wanted);
            }
            // Drop data groups this node no longer belongs to, once removed from their voters.
            if group != META_GROUP && !target.contains(&self.me) {
                let voters: BTreeSet<NodeId> =
                    m.membership_config.membership().voter_ids().collect();
                let keyspace_gone = state.find_group(group).is_none();
                if keyspace_gone
                    || (!voters.contains(&self.me) && m.membership_config.log_id().is_some())
                {
                    self.drop_group(group).await;
                }
            }
        }
        Ok(())
    }

    /// Starts the groups of this node's `cp` shards that are not running; the initial replicas
    /// of a new shard bootstrap it.
    async fn start_missing_groups(&self, state: &ClusterState) -> Result<(), Error> {
        for (name, _, shard) in state.shards_of(self.me) {
            let raft = state
                .keyspaces
                .get(name)
                .is_some_and(|k| k.spec.mode == Mode::Cp);
            if !raft || self.holds(shard.group) {
                continue;
            }
            let table = shard_table(shard.group);
            let g = self.start_group(shard.group, Kind::Data { table }).await?;
            let pristine = g.log.is_pristine().map_err(|e| Error::Io(e.to_string()))?;
            if pristine
                && shard.initial_replicas.contains(&self.me)
                && shard.initial_replicas == shard.replicas
            {
                let members: BTreeMap<NodeId, PeerNode> = shard
                    .initial_replicas
                    .iter()
                    .filter_map(|n| {
                        state.nodes.get(n).map(|info| {
                            (
                                *n,
                                PeerNode {
                                    peer_addr: info.peer_addr.clone(),
                                },
                            )
                        })
                    })
                    .collect();
                if let Err(e) = g.raft.initialize(members).await {
                    tracing::debug!(group = shard.group, error = %e, "group already initialized");
                }
            }
        }
        Ok(())
    }

    /// Moves a led group's membership towards `voters` (and `learners`), one step at a time, in
    /// the background; at most one change per group runs at once.
    fn spawn_membership_change(
        self: &Arc<Self>,
        group: GroupId,
        g: Arc<Group>,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) {
        let m = g.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let current_voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let current_learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let missing_learners: Vec<NodeId> = voters
            .iter()
            .chain(learners.iter())
            .filter(|n| !current_voters.contains(n) && !current_learners.contains(n))
            .copied()
            .collect();
        if current_voters == voters && missing_learners.is_empty() {
            return;
        }
        if !self
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = this
                .change_membership(group, &g, &voters, &missing_learners)
                .await;
            if let Err(e) = result {
                tracing::info!(group, error = %e, "membership change step did not finish; will retry");
            }
            this.changing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&group);
        });
    }

    async fn change_membership(
        &self,
        group: GroupId,
        g: &Group,
        voters: &BTreeSet<NodeId>,
        missing: &[NodeId],
    ) -> Result<(), String> {
        for &n in missing {
            let addr = self
                .addr_of(n)
                .ok_or_else(|| format!("no address for node {n}"))?;
            tracing::info!(group, node = n, "adding learner");
            tokio::time::timeout(
                Duration::from_secs(5),
                g.raft.add_learner(n, PeerNode { peer_addr: addr }, false),
            )
            .await
            .map_err(|_| "add_learner timed out".to_string())?
            .map_err(|e| e.to_string())?;
        }
        self.wait_for_catch_up(g, voters).await?;
        let current: BTreeSet<NodeId> = g
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if current != *voters {
            tracing::info!(group, ?current, target = ?voters, "changing voters");
            tokio::time::timeout(
                Duration::from_secs(10),
                g.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false),
            )
            .await
            .map_err(|_| "change_membership timed out".to_string())?
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Waits until every future voter has caught up, while this node still leads.
    async fn wait_for_catch_up(&self, g: &Group, voters: &BTreeSet<NodeId>) -> Result<(), String> {
        let deadline = Instant::now() + CATCH_UP_WAIT_MAX;
        loop {
            let m = g.raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader {
                return Err("no longer the leader".into());
            }
            let current_voters: BTreeSet<NodeId> =
                m.membership_config.membership().voter_ids().collect();
            let matched = |n: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(n).copied().flatten())
                    .map(|l| l.index)
            };
            let lagging = lagging_voters(
                self.me,
                voters,
                &current_voters,
                m.last_log_index.unwrap_or(0),
                matched,
            );
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "learners {lagging:?} did not catch up within {} s",
                    CATCH_UP_WAIT_MAX.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Future voters (not yet voters, other than `me`) whose replicated log is more than
/// [`CATCH_UP_ENTRIES`] behind `last`, or unknown.
fn lagging_voters(
    me: NodeId,
    voters: &BTreeSet<NodeId>,
    current_voters: &BTreeSet<NodeId>,
    last: u64,
    matched: impl Fn(&NodeId) -> Option<u64>,
) -> Vec<NodeId> {
    voters
        .iter()
        .filter(|n| **n != me && !current_voters.contains(n))
        .filter(|n| matched(n).is_none_or(|index| index + CATCH_UP_ENTRIES < last))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{CATCH_UP_ENTRIES, lagging_voters};

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_learner_within_the_catch_up_window_may_become_a_voter() {
        let last = 1_000;
        let matched = |n: &u64| (*n == 4).then_some(last - CATCH_UP_ENTRIES);
        assert!(lagging_voters(1, &set(&[1, 2, 4]), &set(&[1, 2, 3]), last, matched).is_empty());
    }

    #[test]
    fn a_learner_further_behind_or_never_heard_from_waits() {
        let last = 1_000;
        let matched = |n: &u64| (*n == 4).then_some(last - CATCH_UP_ENTRIES - 1);
        assert_eq!(
            lagging_voters(1, &set(&[1, 4, 5]), &set(&[1, 2, 3]), last, matched),
            vec![4, 5]
        );
    }

    #[test]
    fn current_voters_and_the_leader_itself_never_wait() {
        let nothing = |_: &u64| None;
        assert!(lagging_voters(1, &set(&[1, 2, 3]), &set(&[2, 3]), 50, nothing).is_empty());
    }
}
