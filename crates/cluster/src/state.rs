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
//!
//! # Cache shards (issue 16, `docs/design/cache-cluster.md` §2)
//!
//! A `cache` keyspace's shards are placed like every other's; the map also records, per shard,
//! which replica is its **primary** and in which **epoch** ([`CacheShard`]), from the
//! [`MetaCommand::CacheAdopt`] that gives a cache keyspace its primaries (epoch 1, each shard's
//! first replica; proposed by placement right after the keyspace exists, so every node creates
//! them at the same log index, whatever binary applied the entries before).
//!
//! An epoch ends in two committed steps: [`MetaCommand::CacheFence`] marks it fenced (the
//! voters refuse its primary's renewals from then on, and answer a release of it only once they
//! have applied the fence: the durable half of a release, which a voter's restart cannot
//! forget), then [`MetaCommand::CachePromote`], a compare-and-set (`epoch == current + 1`, the
//! current epoch fenced), names the next primary. Two leaders racing to promote cannot both
//! succeed, and the epoch fences every older primary. A [`MetaCommand::SetReplicas`] that would
//! drop a shard's primary is refused: the primary is handed off first.
//!
//! # Stored layout
//!
//! The map is postcard in `_meta` and in meta snapshots, and postcard cannot skip a missing
//! trailing field: [`ClusterState::decode`] reads the current layout, then the one before cache
//! shards ([`ClusterStateV1`]), which has none (its cache keyspaces are adopted by a command).

use std::collections::BTreeMap;

use capdb_types::{EvictionPolicy, KeyspaceName, KeyspaceSpec, Mode};
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

/// A cache keyspace's shard: which of its replicas takes writes, in which epoch, and what the
/// last failover reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheShard {
    /// Starts at 1; each promotion adds one. A copy that is primary in an older epoch is fenced.
    pub epoch: u64,
    /// The replica that takes writes in this epoch (always one of the shard's `replicas`).
    pub primary: NodeId,
    /// The offset of the shard's command stream this epoch starts at.
    pub start_offset: u64,
    /// The last promotion's report: how many stream entries the old primary had at least that
    /// the new one lacked (writes acknowledged without WAIT that the failover lost; 0 for a
    /// planned hand-off).
    pub lost_at_least: u64,
    /// The last promotion's report: how far the new primary lagged behind the old one, in ms.
    pub lag_ms_before: u64,
    /// Epochs up to this one are fenced ([`MetaCommand::CacheFence`]): their primaries' renewals
    /// are refused. A promotion needs the current epoch fenced.
    pub fenced: u64,
}

impl CacheShard {
    /// An adopted shard's: epoch 1, its first replica primary.
    fn first(replicas: &[NodeId]) -> Option<CacheShard> {
        Some(CacheShard {
            epoch: 1,
            primary: *replicas.first()?,
            start_offset: 0,
            lost_at_least: 0,
            lag_ms_before: 0,
            fenced: 0,
        })
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
    /// Every cache keyspace's shards, by index (as in its [`KeyspaceEntry::shards`]). Last:
    /// the field added after the first layout ([`ClusterStateV1`]).
    pub cache: BTreeMap<KeyspaceName, Vec<CacheShard>>,
}

/// The map's stored layout before cache shards: decoded only ([`ClusterState::decode`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStateV1 {
    pub version: u64,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub keyspaces: BTreeMap<KeyspaceName, KeyspaceEntry>,
    pub next_group: GroupId,
}

impl From<ClusterStateV1> for ClusterState {
    /// No cache shards: its cache keyspaces are adopted by a committed
    /// [`MetaCommand::CacheAdopt`], so that every node gives them primaries at the same log
    /// index (nodes convert at different ones, and replay entries applied under older rules).
    fn from(v1: ClusterStateV1) -> ClusterState {
        ClusterState {
            version: v1.version,
            nodes: v1.nodes,
            keyspaces: v1.keyspaces,
            next_group: v1.next_group,
            cache: BTreeMap::new(),
        }
    }
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
    /// Sets the target replicas of one shard (rebalancing, repair, drain). Refused for a cache
    /// shard if `replicas` lacks its primary (hand it off first: [`MetaCommand::CachePromote`]).
    SetReplicas {
        keyspace: KeyspaceName,
        shard: u32,
        replicas: Vec<NodeId>,
    },
    /// Gives a cache keyspace's shards their primaries: epoch 1, each shard's first replica.
    /// Refused if the keyspace is no cache, is adopted already, or has a shard with no replica.
    CacheAdopt {
        keyspace: KeyspaceName,
    },
    /// Fences a cache shard's `epoch` (its current one): voters refuse its primary's renewals
    /// from then on, and answer a release of it. The first step of ending an epoch.
    CacheFence {
        keyspace: KeyspaceName,
        shard: u32,
        epoch: u64,
    },
    /// Makes `primary` the primary of a cache shard in `epoch`. Applied only if `epoch` is the
    /// shard's epoch plus one, the current epoch is fenced, and `primary` is one of its
    /// replicas: a compare-and-set, so of two promotions decided from the same epoch one
    /// applies and the other is refused.
    CachePromote {
        keyspace: KeyspaceName,
        shard: u32,
        epoch: u64,
        primary: NodeId,
        /// The stream offset the new epoch starts at (the new primary's last applied).
        start_offset: u64,
        /// See [`CacheShard::lost_at_least`].
        lost_at_least: u64,
        /// See [`CacheShard::lag_ms_before`].
        lag_ms_before: u64,
    },
    /// Sets a cache keyspace's memory limit (across the cluster: each shard holds its share)
    /// and eviction policy (`None`: unchanged).
    SetCacheLimits {
        keyspace: KeyspaceName,
        max_memory_bytes: Option<u64>,
        eviction: Option<EvictionPolicy>,
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
    /// Reads a stored map: the current layout, else the one before cache shards
    /// ([`ClusterStateV1`], every byte of `raw` read), converted.
    pub fn decode(raw: &[u8]) -> Result<ClusterState, postcard::Error> {
        match postcard::from_bytes::<ClusterState>(raw) {
            Ok(state) => Ok(state),
            Err(current) => match postcard::take_from_bytes::<ClusterStateV1>(raw) {
                Ok((v1, [])) => Ok(v1.into()),
                _ => Err(current),
            },
        }
    }

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
                self.cache.remove(name);
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
                if let Some(c) = self
                    .cache
                    .get(keyspace)
                    .and_then(|c| c.get(*shard as usize))
                    && !replicas.contains(&c.primary)
                {
                    return Err(invalid(format!(
                        "node {} is the primary of cache shard {keyspace}/{shard}: hand it off \
                         before it leaves the shard",
                        c.primary
                    )));
                }
                s.replicas = replicas.clone();
            }
            MetaCommand::CachePromote {
                keyspace,
                shard,
                epoch,
                primary,
                start_offset,
                lost_at_least,
                lag_ms_before,
            } => {
                let (entry, c) = self.cache_shard_mut(keyspace, *shard)?;
                if *epoch != c.epoch + 1 {
                    return Err(invalid(format!(
                        "cache shard {keyspace}/{shard} is in epoch {}: a promotion to epoch \
                         {epoch} was decided from another",
                        c.epoch
                    )));
                }
                if c.fenced < c.epoch {
                    return Err(invalid(format!(
                        "cache shard {keyspace}/{shard}'s epoch {} is not fenced: fence it \
                         before a promotion",
                        c.epoch
                    )));
                }
                if !entry.shards[*shard as usize].replicas.contains(primary) {
                    return Err(invalid(format!(
                        "node {primary} holds no replica of cache shard {keyspace}/{shard}"
                    )));
                }
                *c = CacheShard {
                    epoch: *epoch,
                    primary: *primary,
                    start_offset: *start_offset,
                    lost_at_least: *lost_at_least,
                    lag_ms_before: *lag_ms_before,
                    fenced: c.fenced,
                };
            }
            MetaCommand::CacheAdopt { keyspace } => {
                let entry = self
                    .keyspaces
                    .get(keyspace)
                    .ok_or_else(|| Error::KeyspaceNotFound(keyspace.to_string()))?;
                if entry.spec.mode != Mode::Cache {
                    return Err(invalid(format!("keyspace '{keyspace}' is not a cache")));
                }
                if self.cache.contains_key(keyspace) {
                    return Err(invalid(format!(
                        "cache keyspace '{keyspace}' has its primaries already"
                    )));
                }
                let shards: Option<Vec<CacheShard>> = entry
                    .shards
                    .iter()
                    .map(|s| CacheShard::first(&s.replicas))
                    .collect();
                let shards = shards.ok_or_else(|| {
                    invalid(format!(
                        "a shard of '{keyspace}' has no replica to be primary"
                    ))
                })?;
                self.cache.insert(keyspace.clone(), shards);
            }
            MetaCommand::CacheFence {
                keyspace,
                shard,
                epoch,
            } => {
                let (_, c) = self.cache_shard_mut(keyspace, *shard)?;
                if *epoch != c.epoch {
                    return Err(invalid(format!(
                        "cache shard {keyspace}/{shard} is in epoch {}, not {epoch}",
                        c.epoch
                    )));
                }
                c.fenced = c.fenced.max(*epoch);
            }
            MetaCommand::SetCacheLimits {
                keyspace,
                max_memory_bytes,
                eviction,
            } => {
                let entry = self
                    .keyspaces
                    .get_mut(keyspace)
                    .ok_or_else(|| Error::KeyspaceNotFound(keyspace.to_string()))?;
                if entry.spec.mode != Mode::Cache {
                    return Err(invalid(format!(
                        "keyspace '{keyspace}' is not a cache: it has no memory limit"
                    )));
                }
                if let Some(max) = max_memory_bytes {
                    if *max < capdb_types::keyspace::CACHE_MAX_MEMORY_BYTES_MIN {
                        return Err(invalid(
                            "max_memory_bytes of a cache keyspace must be at least 1 MiB".into(),
                        ));
                    }
                    entry.spec.max_memory_bytes = Some(*max);
                }
                if let Some(policy) = eviction {
                    entry.spec.eviction = Some(*policy);
                }
            }
        }
        Ok(())
    }

    /// A cache shard's entry and its [`CacheShard`], for a command that changes it.
    fn cache_shard_mut(
        &mut self,
        keyspace: &KeyspaceName,
        shard: u32,
    ) -> Result<(&KeyspaceEntry, &mut CacheShard), capdb_types::Error> {
        let invalid = capdb_types::Error::InvalidInput;
        let entry = self
            .keyspaces
            .get(keyspace)
            .ok_or_else(|| capdb_types::Error::KeyspaceNotFound(keyspace.to_string()))?;
        let c = self
            .cache
            .get_mut(keyspace)
            .ok_or_else(|| invalid(format!("keyspace '{keyspace}' is not a cache")))?
            .get_mut(shard as usize)
            .ok_or_else(|| invalid(format!("keyspace '{keyspace}' has no shard {shard}")))?;
        Ok((entry, c))
    }

    /// The cache shard `shard` of `keyspace`, if it is a cache keyspace's.
    pub fn cache_shard(&self, keyspace: &KeyspaceName, shard: usize) -> Option<&CacheShard> {
        self.cache.get(keyspace)?.get(shard)
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

    fn name(n: &str) -> KeyspaceName {
        KeyspaceName::new(n).unwrap()
    }

    /// Nodes 1 to 3, and cache keyspace `c` of 2 shards on `[1, 2]` and `[2, 3]`.
    fn with_cache() -> ClusterState {
        let mut s = ClusterState::default();
        for i in 1..=3 {
            s.apply(&MetaCommand::UpsertNode(node(i, "a")));
        }
        let spec = KeyspaceSpec::new(name("c"), Mode::Cache, Some(2), Some(2), None, None).unwrap();
        let cmd = MetaCommand::CreateKeyspace {
            spec,
            replicas: vec![vec![1, 2], vec![2, 3]],
        };
        assert_eq!(s.apply(&cmd), MetaResponse::Ok);
        assert!(s.cache.is_empty(), "created, not yet adopted");
        assert_eq!(s.apply(&adopt("c")), MetaResponse::Ok);
        s
    }

    fn adopt(keyspace: &str) -> MetaCommand {
        MetaCommand::CacheAdopt {
            keyspace: name(keyspace),
        }
    }

    fn fence(shard: u32, epoch: u64) -> MetaCommand {
        MetaCommand::CacheFence {
            keyspace: name("c"),
            shard,
            epoch,
        }
    }

    fn promote(shard: u32, epoch: u64, primary: NodeId) -> MetaCommand {
        MetaCommand::CachePromote {
            keyspace: name("c"),
            shard,
            epoch,
            primary,
            start_offset: 10,
            lost_at_least: 2,
            lag_ms_before: 30,
        }
    }

    #[test]
    fn an_adopted_cache_keyspace_s_shards_start_in_epoch_1_with_their_first_replica_primary() {
        let mut s = with_cache();
        assert!(
            matches!(s.apply(&adopt("c")), MetaResponse::Refused(_)),
            "adopted once"
        );
        let primaries: Vec<(u64, NodeId)> = s.cache[&name("c")]
            .iter()
            .map(|c| (c.epoch, c.primary))
            .collect();
        assert_eq!(primaries, vec![(1, 1), (1, 2)]);
        assert_eq!(s.cache_shard(&name("c"), 1).map(|c| c.primary), Some(2));
        assert_eq!(s.cache_shard(&name("c"), 2), None);
    }

    #[test]
    fn other_modes_have_no_cache_shards_and_refuse_cache_commands() {
        let mut s = with_cache();
        let spec = KeyspaceSpec::new(name("k"), Mode::Cp, Some(1), Some(1), None, None).unwrap();
        s.apply(&MetaCommand::CreateKeyspace {
            spec,
            replicas: vec![vec![1]],
        });
        assert!(!s.cache.contains_key(&name("k")));
        assert!(matches!(s.apply(&adopt("k")), MetaResponse::Refused(_)));
        assert!(matches!(s.apply(&adopt("nope")), MetaResponse::Refused(_)));
        let mut cmd = promote(0, 2, 1);
        if let MetaCommand::CachePromote { keyspace, .. } = &mut cmd {
            *keyspace = name("k");
        }
        assert!(matches!(s.apply(&cmd), MetaResponse::Refused(_)));
        let limits = MetaCommand::SetCacheLimits {
            keyspace: name("k"),
            max_memory_bytes: Some(8 << 20),
            eviction: None,
        };
        assert!(matches!(s.apply(&limits), MetaResponse::Refused(_)));
    }

    #[test]
    fn a_promotion_applies_only_once_the_epoch_is_fenced() {
        let mut s = with_cache();
        match s.apply(&promote(0, 2, 2)) {
            MetaResponse::Refused(e) => assert!(e.to_string().contains("not fenced"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Only the current epoch is fenced.
        assert!(matches!(s.apply(&fence(0, 2)), MetaResponse::Refused(_)));
        assert_eq!(s.apply(&fence(0, 1)), MetaResponse::Ok);
        assert_eq!(s.cache[&name("c")][0].fenced, 1);
        assert_eq!(s.cache[&name("c")][1].fenced, 0, "per shard");
        assert_eq!(s.apply(&promote(0, 2, 2)), MetaResponse::Ok);
        // The new epoch starts unfenced: the next promotion needs its own fence.
        assert!(matches!(
            s.apply(&promote(0, 3, 1)),
            MetaResponse::Refused(_)
        ));
    }

    #[test]
    fn a_promotion_applies_only_as_the_next_epoch_and_to_a_replica() {
        let mut s = with_cache();
        s.apply(&fence(0, 1));
        let before = s.clone();
        // Not the next epoch (decided from a stale map), or not a replica: refused, unchanged.
        assert!(matches!(
            s.apply(&promote(0, 1, 2)),
            MetaResponse::Refused(_)
        ));
        assert!(matches!(
            s.apply(&promote(0, 3, 2)),
            MetaResponse::Refused(_)
        ));
        assert!(matches!(
            s.apply(&promote(0, 2, 3)),
            MetaResponse::Refused(_)
        ));
        assert!(matches!(
            s.apply(&promote(5, 2, 2)),
            MetaResponse::Refused(_)
        ));
        assert_eq!(
            s, before,
            "a refused promotion changes nothing, not even the version"
        );
        assert_eq!(s.apply(&promote(0, 2, 2)), MetaResponse::Ok);
        assert_eq!(
            s.cache[&name("c")][0],
            CacheShard {
                epoch: 2,
                primary: 2,
                start_offset: 10,
                lost_at_least: 2,
                lag_ms_before: 30,
                fenced: 1,
            }
        );
        // Two promotions decided from epoch 1: the second is refused.
        assert!(matches!(
            s.apply(&promote(0, 2, 1)),
            MetaResponse::Refused(_)
        ));
        assert_eq!(s.cache[&name("c")][0].primary, 2);
        assert_eq!(
            s.cache[&name("c")][1].epoch,
            1,
            "other shards keep their epoch"
        );
    }

    #[test]
    fn a_cache_shard_s_primary_cannot_leave_its_replicas_until_handed_off() {
        let mut s = with_cache();
        let drop_primary = MetaCommand::SetReplicas {
            keyspace: name("c"),
            shard: 0,
            replicas: vec![2, 3],
        };
        match s.apply(&drop_primary) {
            MetaResponse::Refused(e) => assert!(e.to_string().contains("hand it off"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.keyspaces[&name("c")].shards[0].replicas, vec![1, 2]);
        // Growing the set, or dropping another replica, is fine.
        let grow = MetaCommand::SetReplicas {
            keyspace: name("c"),
            shard: 0,
            replicas: vec![1, 2, 3],
        };
        assert_eq!(s.apply(&grow), MetaResponse::Ok);
        assert_eq!(s.apply(&fence(0, 1)), MetaResponse::Ok);
        assert_eq!(s.apply(&promote(0, 2, 3)), MetaResponse::Ok);
        assert_eq!(
            s.apply(&drop_primary),
            MetaResponse::Ok,
            "node 1 is no primary now"
        );
    }

    #[test]
    fn cache_limits_change_the_spec_within_its_bounds() {
        let mut s = with_cache();
        let limits = |max, eviction| MetaCommand::SetCacheLimits {
            keyspace: name("c"),
            max_memory_bytes: max,
            eviction,
        };
        assert_eq!(
            s.apply(&limits(Some(64 << 20), Some(EvictionPolicy::Lfu))),
            MetaResponse::Ok
        );
        let spec = &s.keyspaces[&name("c")].spec;
        assert_eq!(spec.max_memory_bytes, Some(64 << 20));
        assert_eq!(spec.eviction, Some(EvictionPolicy::Lfu));
        assert!(matches!(
            s.apply(&limits(Some(1000), None)),
            MetaResponse::Refused(_)
        ));
        assert_eq!(
            s.apply(&limits(None, Some(EvictionPolicy::Lru))),
            MetaResponse::Ok
        );
        let spec = &s.keyspaces[&name("c")].spec;
        assert_eq!(
            spec.max_memory_bytes,
            Some(64 << 20),
            "None leaves the limit"
        );
        assert_eq!(spec.eviction, Some(EvictionPolicy::Lru));
    }

    #[test]
    fn dropping_a_cache_keyspace_forgets_its_shards() {
        let mut s = with_cache();
        assert_eq!(
            s.apply(&MetaCommand::DropKeyspace(name("c"))),
            MetaResponse::Ok
        );
        assert!(s.cache.is_empty());
    }

    #[test]
    fn the_map_reads_back_in_its_layout_and_in_the_one_before_cache_shards() {
        let mut s = with_cache();
        s.apply(&fence(1, 1));
        s.apply(&promote(1, 2, 3));
        let raw = postcard::to_stdvec(&s).unwrap();
        assert_eq!(ClusterState::decode(&raw).unwrap(), s);
        // Written by the binary before cache shards (`tests/fixtures`, made at 930875f): a
        // cp keyspace `orders` and a cache keyspace `sessions` of 3 shards.
        let v1 = include_bytes!("../tests/fixtures/cluster_state_v1.postcard");
        let old = ClusterState::decode(v1).unwrap();
        assert_eq!(old.version, 5);
        assert_eq!(old.nodes.len(), 3);
        assert_eq!(old.next_group, 6);
        let sessions = &old.keyspaces[&name("sessions")];
        assert_eq!(sessions.spec.max_memory_bytes, Some(64 << 20));
        assert!(
            old.cache.is_empty(),
            "cache keyspaces wait for their adoption"
        );
        let mut adopted = old.clone();
        assert_eq!(adopted.apply(&adopt("sessions")), MetaResponse::Ok);
        let primaries: Vec<(u64, NodeId)> = adopted.cache[&name("sessions")]
            .iter()
            .map(|c| (c.epoch, c.primary))
            .collect();
        assert_eq!(
            primaries,
            vec![(1, 3), (1, 1), (1, 2)],
            "the first replica of each"
        );
        assert!(!adopted.cache.contains_key(&name("orders")));
        // Read back as written now, it is the same map.
        assert_eq!(
            ClusterState::decode(&postcard::to_stdvec(&old).unwrap()).unwrap(),
            old
        );
        // Bytes of neither layout are refused, not read as a part of one.
        assert!(ClusterState::decode(&v1[..v1.len() - 1]).is_err());
        let mut longer = v1.to_vec();
        longer.push(7);
        assert!(ClusterState::decode(&longer).is_err());
    }
}
