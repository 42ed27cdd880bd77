//! Replica placement, run by the meta leader. Pure functions of the cluster map, so they are
//! unit-tested without a cluster, and their decisions travel to every node inside meta commands.
//!
//! Rules, in order:
//! 1. A shard's replicas are on distinct nodes, never on draining nodes.
//! 2. Replicas spread across zones (label `zone`): a zone gets a second replica of a shard only
//!    when every zone already has one.
//! 3. Among equal choices, the node holding the fewest replicas wins (then the lowest id).
//! 4. A cache keyspace gets its primaries ([`MetaCommand::CacheAdopt`]) before any other step.
//!    A cache shard's primary is handed off to a replica that stays before it leaves the shard
//!    (its epoch fenced, [`MetaCommand::CacheFence`], then [`MetaCommand::CachePromote`], the
//!    next epoch); balancing moves no cache primary. (These direct steps are safe only while no
//!    primary holds a lease: once leases are served, issue 16 step 6, a hand-off waits for the
//!    old primary to give its lease up and for the voters' release before it promotes, and so
//!    becomes a task of its own rather than a placement step.)
//!
//! [`next_move`] yields one step of repair/rebalancing at a time (a shard missing replicas, a
//! replica on a draining node, or a load difference above one), so moves happen one by one and
//! each is a normal Raft membership change of that shard.

use std::collections::{BTreeMap, BTreeSet};

use capdb_types::KeyspaceName;

use crate::state::{CacheShard, ClusterState, MetaCommand, NodeId};

/// Most voters in the meta group.
pub const META_VOTERS: usize = 3;

fn eligible(state: &ClusterState) -> Vec<NodeId> {
    state
        .nodes
        .values()
        .filter(|n| !n.draining)
        .map(|n| n.id)
        .collect()
}

/// Picks up to `count` nodes for a shard that already has replicas on `existing`.
pub fn pick(
    state: &ClusterState,
    load: &BTreeMap<NodeId, usize>,
    existing: &[NodeId],
    count: usize,
) -> Vec<NodeId> {
    let mut chosen: Vec<NodeId> = Vec::new();
    let mut zones: BTreeMap<&str, usize> = BTreeMap::new();
    for n in existing {
        if let Some(info) = state.nodes.get(n) {
            *zones.entry(info.zone()).or_default() += 1;
        }
    }
    let mut candidates: Vec<NodeId> = eligible(state)
        .into_iter()
        .filter(|n| !existing.contains(n))
        .collect();
    while chosen.len() < count && !candidates.is_empty() {
        let best = *candidates
            .iter()
            .min_by_key(|&&n| {
                let zone = state.nodes[&n].zone();
                (
                    zones.get(zone).copied().unwrap_or(0),
                    load.get(&n).copied().unwrap_or(0),
                    n,
                )
            })
            .expect("candidates is not empty");
        candidates.retain(|&n| n != best);
        *zones.entry(state.nodes[&best].zone()).or_default() += 1;
        chosen.push(best);
    }
    debug_assert!(chosen.len() <= count);
    debug_assert!(
        chosen
            .iter()
            .all(|n| state.nodes.get(n).is_some_and(|i| !i.draining)),
        "picked a draining or unknown node: {chosen:?}"
    );
    debug_assert!(
        distinct(&chosen) && chosen.iter().all(|n| !existing.contains(n)),
        "picked a node twice or one already holding the shard: {chosen:?} (existing {existing:?})"
    );
    chosen
}

/// Whether no node appears twice. `ClusterState::apply` does not check that a shard's replicas
/// are distinct, so placement asserts only that it keeps them distinct.
fn distinct(nodes: &[NodeId]) -> bool {
    nodes.iter().collect::<BTreeSet<_>>().len() == nodes.len()
}

/// Replica sets for the `shards` shards of a new keyspace with replication factor `rf`.
pub fn place_keyspace(state: &ClusterState, shards: u32, rf: u32) -> Vec<Vec<NodeId>> {
    let mut load = state.load();
    (0..shards)
        .map(|_| {
            let replicas = pick(state, &load, &[], rf as usize);
            for r in &replicas {
                *load.entry(*r).or_default() += 1;
            }
            replicas
        })
        .collect()
}

/// The next repair or rebalancing step, if any.
pub fn next_move(state: &ClusterState) -> Option<MetaCommand> {
    // 0. Cache keyspaces get their primaries once every shard has a replica.
    for (name, ks) in &state.keyspaces {
        if ks.spec.mode == capdb_types::Mode::Cache
            && !state.cache.contains_key(name)
            && ks.shards.iter().all(|s| !s.replicas.is_empty())
        {
            return Some(MetaCommand::CacheAdopt {
                keyspace: name.clone(),
            });
        }
    }
    let load = state.load();
    let eligible: BTreeSet<NodeId> = eligible(state).into_iter().collect();
    // 1. Repair: replicas on draining/unknown nodes, or fewer replicas than wanted.
    for (name, i, shard) in state.all_shards() {
        let rf = state.keyspaces[name].spec.replication_factor as usize;
        let want = rf.min(eligible.len()).max(1);
        let healthy: Vec<NodeId> = shard
            .replicas
            .iter()
            .copied()
            .filter(|r| eligible.contains(r))
            .collect();
        if healthy.len() < want {
            let mut replicas = shard.replicas.clone();
            let added = pick(state, &load, &shard.replicas, want - healthy.len());
            if !added.is_empty() {
                // Add first; the bad replicas go in a later step, once the new ones hold data.
                // So this set may still hold draining nodes, but none that it adds.
                replicas.extend(added);
                debug_assert!(
                    distinct(&replicas) || !distinct(&shard.replicas),
                    "{replicas:?}"
                );
                return Some(MetaCommand::SetReplicas {
                    keyspace: name.clone(),
                    shard: i as u32,
                    replicas,
                });
            }
        }
        if healthy.len() >= want && healthy.len() < shard.replicas.len() {
            debug_assert!(distinct(&healthy) || !distinct(&shard.replicas));
            // A cache shard's primary leaving is handed off first, to the first replica that
            // stays (the map refuses to drop a primary).
            if let Some(c) = state.cache_shard(name, i)
                && !healthy.contains(&c.primary)
            {
                return Some(hand_off(name, i, c, healthy[0]));
            }
            return Some(MetaCommand::SetReplicas {
                keyspace: name.clone(),
                shard: i as u32,
                replicas: healthy,
            });
        }
    }
    // 2. Balance: move one replica to the least loaded node from the most loaded node that can
    //    give one without worsening its shard's zone spread.
    let (&min_node, &min) = load
        .iter()
        .filter(|(n, _)| eligible.contains(n))
        .min_by_key(|(n, l)| (**l, **n))?;
    let mut sources: Vec<(NodeId, usize)> = load
        .iter()
        .filter(|(n, l)| eligible.contains(n) && **l > min + 1)
        .map(|(n, l)| (*n, *l))
        .collect();
    sources.sort_by_key(|(n, l)| (std::cmp::Reverse(*l), *n));
    let zone = |n: &NodeId| state.nodes[n].zone().to_string();
    for (source, _) in sources {
        for (name, i, shard) in state.all_shards() {
            if !shard.replicas.contains(&source) || shard.replicas.contains(&min_node) {
                continue;
            }
            // Balancing moves no cache primary (a hand-off for balance alone is not worth its
            // pause): another of the source's shards moves.
            if state
                .cache_shard(name, i)
                .is_some_and(|c| c.primary == source)
            {
                continue;
            }
            let zones_before: BTreeSet<String> = shard.replicas.iter().map(zone).collect();
            let mut replicas: Vec<NodeId> = shard
                .replicas
                .iter()
                .copied()
                .filter(|&r| r != source)
                .collect();
            replicas.push(min_node);
            let zones_after: BTreeSet<String> = replicas.iter().map(zone).collect();
            if zones_after.len() < zones_before.len() {
                continue;
            }
            // Repair left every shard on eligible nodes only (else it returned a step above),
            // and `min_node` is eligible and not in this shard.
            debug_assert!(
                replicas.iter().all(|n| eligible.contains(n)),
                "balancing proposes a draining node: {name}/{i} {replicas:?}"
            );
            debug_assert!(
                distinct(&replicas) || !distinct(&shard.replicas),
                "{replicas:?}"
            );
            return Some(MetaCommand::SetReplicas {
                keyspace: name.clone(),
                shard: i as u32,
                replicas,
            });
        }
    }
    None
}

/// The next step of a planned hand-off of cache shard `keyspace/shard`'s primary to `to` (a
/// replica that stays): its epoch fenced, then the next epoch, nothing lost. (Until cache shards
/// stream, the epoch's stream starts where the last one did.)
fn hand_off(keyspace: &KeyspaceName, shard: usize, c: &CacheShard, to: NodeId) -> MetaCommand {
    if c.fenced < c.epoch {
        return MetaCommand::CacheFence {
            keyspace: keyspace.clone(),
            shard: shard as u32,
            epoch: c.epoch,
        };
    }
    MetaCommand::CachePromote {
        keyspace: keyspace.clone(),
        shard: shard as u32,
        epoch: c.epoch + 1,
        primary: to,
        start_offset: c.start_offset,
        lost_at_least: 0,
        lag_ms_before: 0,
    }
}

/// The meta group's voters: the first [`META_VOTERS`] non-draining nodes by id (all when fewer).
pub fn meta_voters(state: &ClusterState) -> BTreeSet<NodeId> {
    eligible(state).into_iter().take(META_VOTERS).collect()
}

/// The meta group's next voter set: keep the current voters (a founding voter may simply not
/// have registered yet) except draining ones, and top up to [`META_VOTERS`] from the map's
/// nodes.
pub fn meta_target_voters(state: &ClusterState, current: BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let draining = |n: &NodeId| state.nodes.get(n).is_some_and(|i| i.draining);
    let mut target: BTreeSet<NodeId> = current.into_iter().filter(|n| !draining(n)).collect();
    let kept = target.len();
    for n in meta_voters(state)
        .into_iter()
        .chain(state.nodes.keys().copied())
    {
        if target.len() >= META_VOTERS {
            break;
        }
        if !draining(&n) {
            target.insert(n);
        }
    }
    debug_assert!(!target.iter().any(draining), "{target:?}");
    debug_assert!(target.len() <= META_VOTERS.max(kept), "{target:?}");
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MetaCommand, NodeInfo};
    use capdb_types::{KeyspaceName, KeyspaceSpec, Mode};

    fn node(id: NodeId, zone: &str) -> NodeInfo {
        NodeInfo {
            id,
            peer_addr: String::new(),
            resp_addr: String::new(),
            http_addr: String::new(),
            labels: [("zone".to_string(), zone.to_string())].into(),
            draining: false,
        }
    }

    fn cluster(zones: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, z) in zones.iter().enumerate() {
            s.apply(&MetaCommand::UpsertNode(node(i as u64 + 1, z)));
        }
        s
    }

    fn create(s: &mut ClusterState, name: &str, shards: u32, rf: u32) {
        let replicas = place_keyspace(s, shards, rf);
        let spec = KeyspaceSpec::new(
            KeyspaceName::new(name).unwrap(),
            Mode::Cp,
            Some(rf),
            Some(shards),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            s.apply(&MetaCommand::CreateKeyspace { spec, replicas }),
            crate::state::MetaResponse::Ok
        );
    }

    #[test]
    fn replicas_spread_across_zones_and_distinct_nodes() {
        let s = cluster(&["a", "a", "b", "b", "c", "c"]);
        for replicas in place_keyspace(&s, 8, 3) {
            let zones: BTreeSet<&str> = replicas.iter().map(|n| s.nodes[n].zone()).collect();
            assert_eq!(zones.len(), 3, "{replicas:?}");
            assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), 3);
        }
    }

    #[test]
    fn balancing_keeps_zone_spread() {
        // A second node in zone a can only share zone a's replicas: 2 + 2, not 3 each.
        let mut s = cluster(&["a", "b", "c"]);
        create(&mut s, "k", 4, 3);
        s.apply(&MetaCommand::UpsertNode(node(4, "a")));
        while let Some(cmd) = next_move(&s) {
            assert_eq!(s.apply(&cmd), crate::state::MetaResponse::Ok);
        }
        let load = s.load();
        assert_eq!((load[&1], load[&4]), (2, 2), "{load:?}");
        for (_, _, shard) in s.all_shards() {
            let zones: BTreeSet<&str> = shard.replicas.iter().map(|n| s.nodes[n].zone()).collect();
            assert_eq!(zones.len(), 3);
        }
    }

    #[test]
    fn fewer_nodes_than_rf_places_on_all() {
        let s = cluster(&["a", "b"]);
        assert_eq!(place_keyspace(&s, 1, 3), vec![vec![1, 2]]);
    }

    #[test]
    fn a_new_node_gets_replicas_and_a_drained_node_loses_them() {
        let mut s = cluster(&["a", "b", "c"]);
        create(&mut s, "k", 4, 3);
        s.apply(&MetaCommand::UpsertNode(node(4, "d")));
        let mut steps = 0;
        while let Some(cmd) = next_move(&s) {
            assert_eq!(s.apply(&cmd), crate::state::MetaResponse::Ok);
            steps += 1;
            assert!(steps < 50, "rebalancing must converge");
        }
        let load = s.load();
        assert!(load[&4] >= 2, "{load:?}");
        assert!(load.values().max().unwrap() - load.values().min().unwrap() <= 1);
        s.apply(&MetaCommand::DrainNode(2));
        while let Some(cmd) = next_move(&s) {
            assert_eq!(s.apply(&cmd), crate::state::MetaResponse::Ok);
            steps += 1;
            assert!(steps < 100);
        }
        assert_eq!(s.load()[&2], 0);
        for (_, _, shard) in s.all_shards() {
            assert_eq!(shard.replicas.len(), 3);
        }
        assert_eq!(
            s.apply(&MetaCommand::RemoveNode(2)),
            crate::state::MetaResponse::Ok
        );
    }
}
