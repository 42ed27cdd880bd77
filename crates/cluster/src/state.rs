//! The cluster map: what the meta Raft group agrees on.
//!
//! [`ClusterState`] is the meta group's state machine: nodes with their addresses and labels,
//! keyspaces with their shards, and which nodes hold each shard's replicas. It changes only by
//! applying [`MetaCommand`]s in log order, deterministically, so every node that has applied the
//! same log prefix holds the same map. Placement decisions (which nodes get a new shard's
//! replicas) are made by the meta leader *before* proposing, and travel inside the command.
//!
//! Every node caches the latest state it has applied; data requests route by that cached copy
//! and never wait on the meta group.

use std::collections::BTreeMap;

use capdb_types::{KeyspaceName, KeyspaceSpec};
use serde::{Deserialize, Serialize};

use crate::slots;

pub use capdb_types::{GroupId, NodeId};

/// The meta group's id.
pub const META_GROUP: GroupId = 0;

/// What the cluster knows about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Inter-node traffic (Raft, forwarding).
    pub peer_addr: String,
    /// Redis protocol, as clients should reach it (CLUSTER SLOTS, -MOVED).
    pub resp_addr: String,
    /// HTTP API, as clients should reach it.
    pub http_addr: String,
    /// Placement labels (`zone=a`, `region=eu`).
    pub labels: BTreeMap<String, String>,
    /// Being drained by `cluster remove`: gets no new replicas; removed once it holds none.
    #[serde(default)]
    pub draining: bool,
}

impl NodeInfo {
    /// The node's zone (label `zone`), used to spread replicas.
    pub fn zone(&self) -> &str {
        self.labels.get("zone").map(String::as_str).unwrap_or("")
    }
}

/// One shard of a keyspace: a slot range served by one Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub group: GroupId,
    /// Inclusive slot range.
    pub slots: (u16, u16),
    /// Nodes that should hold a replica (the group's target voter set).
    pub replicas: Vec<NodeId>,
    /// The voter set the group was created with (the nodes that bootstrap it).
    pub initial_replicas: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceEntry {
    pub spec: KeyspaceSpec,
    pub shards: Vec<ShardInfo>,
}

impl KeyspaceEntry {
    /// The shard that owns `key`.
    pub fn shard_for_key(&self, key: &[u8]) -> &ShardInfo {
        let slot = slots::key_slot(key);
        let i = slots::shard_of_slot(slot, self.shards.len() as u32);
        &self.shards[i as usize]
    }
}

/// The replicated cluster map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Bumped by every applied command; caches compare versions.
    pub version: u64,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub keyspaces: BTreeMap<KeyspaceName, KeyspaceEntry>,
    pub next_group: GroupId,
}

/// A change to the cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Adds or updates a node (addresses, labels).
    UpsertNode(NodeInfo),
    /// Marks a node as draining (no new replicas; replicas move away).
    DrainNode(NodeId),
    /// Forgets a node that holds no replicas.
    RemoveNode(NodeId),
    /// Creates a keyspace; `replicas[i]` are shard i's replicas, chosen by the leader.
    CreateKeyspace {
        spec: KeyspaceSpec,
        replicas: Vec<Vec<NodeId>>,
    },
    DropKeyspace(KeyspaceName),
    /// Sets the target replicas of one shard (rebalancing, repair, drain).
    SetReplicas {
        keyspace: KeyspaceName,
        shard: u32,
        replicas: Vec<NodeId>,
    },
}

/// The answer to a meta command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Ok,
    /// Written by versions before refusals were typed; still decoded from remembered replies,
    /// never produced.
    Error(String),
    /// The map refused the command and is unchanged.
    Refused(capdb_types::Error),
}

impl ClusterState {
    /// Applies a command. Invalid commands change nothing and answer an error: the decision is
    /// deterministic, so every replica answers the same.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        // Re-registering with unchanged details is a no-op: it must not bump the version (every
        // bump wakes every node's catalog and reconciler).
        if let MetaCommand::UpsertNode(info) = cmd
            && self.nodes.get(&info.id).is_some_and(|n| {
                n.peer_addr == info.peer_addr
                    && n.resp_addr == info.resp_addr
                    && n.http_addr == info.http_addr
                    && n.labels == info.labels
            })
        {
            return MetaResponse::Ok;
        }
        let result = self.apply_inner(cmd);
        if result.is_ok() {
            self.version += 1;
        }
        match result {
            Ok(()) => MetaResponse::Ok,
            Err(e) => MetaResponse::Refused(e),
        }
    }

    fn apply_inner(&mut self, cmd: &MetaCommand) -> Result<(), capdb_types::Error> {
        use capdb_types::Error;
        let invalid = |msg: String| Error::InvalidInput(msg);
        match cmd {
            MetaCommand::UpsertNode(info) => {
                let draining = self.nodes.get(&info.id).is_some_and(|n| n.draining);
                let mut info = info.clone();
                info.draining |= draining;
                self.nodes.insert(info.id, info);
            }
            MetaCommand::DrainNode(id) => {
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| invalid(format!("node {id} is not a member")))?;
                node.draining = true;
            }
            MetaCommand::RemoveNode(id) => {
                if !self.nodes.contains_key(id) {
                    return Err(invalid(format!("node {id} is not a member")));
                }
                if let Some((ks, _, _)) = self.shards_of(*id).next() {
                    return Err(invalid(format!(
                        "node {id} still holds replicas of keyspace '{ks}'"
                    )));
                }
                self.nodes.remove(id);
            }
            MetaCommand::CreateKeyspace { spec, replicas } => {
                if self.keyspaces.contains_key(&spec.name) {
                    return Err(Error::KeyspaceExists(spec.name.to_string()));
                }
                if replicas.len() != spec.shards as usize {
                    return Err(invalid("one replica set per shard is required".into()));
                }
                for r in replicas.iter().flatten() {
                    if !self.nodes.contains_key(r) {
                        return Err(invalid(format!("replica node {r} is not a member")));
                    }
                }
                let shards = replicas
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let group = self.next_group.max(1);
                        self.next_group = group + 1;
                        ShardInfo {
                            group,
                            slots: slots::shard_slot_range(i as u32, spec.shards),
                            replicas: r.clone(),
                            initial_replicas: r.clone(),
                        }
                    })
                    .collect();
                self.keyspaces.insert(
                    spec.name.clone(),
                    KeyspaceEntry {
                        spec: spec.clone(),
                        shards,
                    },
                );
            }
            MetaCommand::DropKeyspace(name) => {
                if name.as_str() == capdb_types::keyspace::DEFAULT_KEYSPACE {
                    return Err(invalid("the default keyspace cannot be dropped".into()));
                }
                self.keyspaces
                    .remove(name)
                    .ok_or_else(|| invalid(format!("keyspace '{name}' does not exist")))?;
            }
            MetaCommand::SetReplicas {
                keyspace,
                shard,
                replicas,
            } => {
                for r in replicas {
                    if !self.nodes.contains_key(r) {
                        return Err(invalid(format!("replica node {r} is not a member")));
                    }
                }
                if replicas.is_empty() {
                    return Err(invalid("a shard needs at least one replica".into()));
                }
                let entry = self
                    .keyspaces
                    .get_mut(keyspace)
                    .ok_or_else(|| invalid(format!("keyspace '{keyspace}' does not exist")))?;
                let s = entry.shards.get_mut(*shard as usize).ok_or_else(|| {
                    invalid(format!("keyspace '{keyspace}' has no shard {shard}"))
                })?;
                s.replicas = replicas.clone();
            }
        }
        Ok(())
    }

    /// `(keyspace, shard index, shard)` of every shard with a replica on `node`.
    pub fn shards_of(
        &self,
        node: NodeId,
    ) -> impl Iterator<Item = (&KeyspaceName, usize, &ShardInfo)> + '_ {
        self.keyspaces.iter().flat_map(move |(name, ks)| {
            ks.shards
                .iter()
                .enumerate()
                .filter(move |(_, s)| s.replicas.contains(&node))
                .map(move |(i, s)| (name, i, s))
        })
    }

    /// Every shard: `(keyspace, index, shard)`.
    pub fn all_shards(&self) -> impl Iterator<Item = (&KeyspaceName, usize, &ShardInfo)> + '_ {
        self.keyspaces
            .iter()
            .flat_map(|(name, ks)| ks.shards.iter().enumerate().map(move |(i, s)| (name, i, s)))
    }

    /// The keyspace and shard index of a data group.
    pub fn find_group(&self, group: GroupId) -> Option<(&KeyspaceEntry, usize)> {
        self.keyspaces.values().find_map(|ks| {
            ks.shards
                .iter()
                .position(|s| s.group == group)
                .map(|i| (ks, i))
        })
    }

    /// Replica count per node (placement load).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.nodes.keys().map(|&n| (n, 0)).collect();
        for (_, _, s) in self.all_shards() {
            for r in &s.replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capdb_types::Mode;

    pub fn node(id: NodeId, zone: &str) -> NodeInfo {
        NodeInfo {
            id,
            peer_addr: format!("127.0.0.1:{}", 7000 + id),
            resp_addr: format!("127.0.0.1:{}", 6000 + id),
            http_addr: format!("127.0.0.1:{}", 8000 + id),
            labels: [("zone".to_string(), zone.to_string())].into(),
            draining: false,
        }
    }

    #[test]
    fn commands_apply_deterministically_and_validate() {
        let mut s = ClusterState::default();
        for i in 1..=3 {
            assert_eq!(
                s.apply(&MetaCommand::UpsertNode(node(i, "a"))),
                MetaResponse::Ok
            );
        }
        let spec = KeyspaceSpec::new(
            KeyspaceName::new("k").unwrap(),
            Mode::Cp,
            Some(3),
            Some(2),
            None,
            None,
        )
        .unwrap();
        let cmd = MetaCommand::CreateKeyspace {
            spec,
            replicas: vec![vec![1, 2, 3], vec![2, 3, 1]],
        };
        assert_eq!(s.apply(&cmd), MetaResponse::Ok);
        assert!(matches!(s.apply(&cmd), MetaResponse::Refused(_)));
        let ks = &s.keyspaces[&KeyspaceName::new("k").unwrap()];
        assert_eq!(ks.shards[0].group, 1);
        assert_eq!(ks.shards[1].group, 2);
        assert_eq!(ks.shards[0].slots, (0, 8191));
        assert!(matches!(
            s.apply(&MetaCommand::RemoveNode(2)),
            MetaResponse::Refused(_)
        ));
        let mut replay = ClusterState::default();
        for i in 1..=3 {
            replay.apply(&MetaCommand::UpsertNode(node(i, "a")));
        }
        replay.apply(&cmd);
        assert_eq!(replay, s, "the same log gives the same state");
        let v = s.version;
        assert_eq!(
            s.apply(&MetaCommand::UpsertNode(node(1, "a"))),
            MetaResponse::Ok
        );
        assert_eq!(s.version, v, "an unchanged registration changes nothing");
    }
}
