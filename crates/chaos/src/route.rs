//! Where clients send their requests, and what role that node has in the key's shard.
//!
//! Why this matters: a write that reaches the shard's leader is proposed there, while a write
//! that reaches any other node is forwarded to the leader over the peer protocol, and that
//! forwarding path has its own failure handling (what to do when the leader dies with the
//! request in flight). A harness whose clients mostly talk to the leader, or whose faults
//! rarely hit the leader of the keys being written, never exercises it. So clients move
//! between nodes ([`Route::Mixed`]): every [`REBIND_OPS`] operations and after every error
//! they pick a new node, a follower of the workload's shard three times in four and its
//! leader otherwise. The history records each operation's role ([`Role`]) so a violation can be
//! traced to the path it took.
//!
//! The harness learns leaders and replicas by polling `GET /v1/cluster` ([`watch`]); roles may
//! therefore lag a failover by a poll interval, which is why the history calls them what the
//! harness *saw*.

use std::sync::Mutex;
use std::time::Duration;

use crate::cluster::Nodes;
use crate::history::Role;

/// Operations a client sends to one node before it picks another (under [`Route::Mixed`]).
pub const REBIND_OPS: u32 = 20;
/// How often the shard map is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The hash tag of the `cas` workload's keys: all of them live in this one slot, so in one
/// shard, whose leader the `kill-leader` nemesis aims at.
pub const WORKLOAD_TAG: &str = "cas";

/// How clients choose their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Client `c` talks to node `c % nodes + 1` for the whole run.
    Fixed,
    /// Clients move between nodes, mostly followers of the workload's shard (see the module doc).
    Mixed,
}

impl Route {
    pub fn parse(s: &str) -> Result<Route, String> {
        match s {
            "fixed" => Ok(Route::Fixed),
            "mixed" => Ok(Route::Mixed),
            other => Err(format!("unknown route '{other}': expected fixed or mixed")),
        }
    }
}

/// One shard of the `default` keyspace as the cluster last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Inclusive slot range.
    pub slots: (u16, u16),
    pub leader: Option<u32>,
    pub replicas: Vec<u32>,
}

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) of the key, or of its `{hash tag}`
/// when it has a non-empty one, modulo 16384 (what capdb routes by, as Redis Cluster does).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The harness's latest view of the shards, shared by clients and the nemesis.
#[derive(Default)]
pub struct ShardMap {
    shards: Mutex<Vec<Shard>>,
}

impl ShardMap {
    pub fn set(&self, shards: Vec<Shard>) {
        *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = shards;
    }

    /// The shard holding `slot`, as last seen.
    pub fn shard_of(&self, slot: u16) -> Option<Shard> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.slots.0 <= slot && slot <= s.slots.1)
            .cloned()
    }

    /// `node`'s role in the shard of `key`; `None` while the shard or its leader is unknown.
    pub fn role(&self, node: u32, key: &str) -> Option<Role> {
        let shard = self.shard_of(key_slot(key))?;
        let leader = shard.leader?;
        Some(if node == leader {
            Role::Leader
        } else if shard.replicas.contains(&node) {
            Role::Follower
        } else {
            Role::Other
        })
    }

    /// A node for a client to talk to next: with the workload shard's leader known, one of
    /// its followers (or, with more nodes than replicas, any non-leader) three times in four
    /// and the leader otherwise; any node while the leader is unknown.
    pub fn pick(&self, nodes: u32, rng: &mut fastrand::Rng) -> u32 {
        let leader = self
            .shard_of(key_slot(&format!("{{{WORKLOAD_TAG}}}")))
            .and_then(|s| s.leader);
        match leader {
            Some(l) if nodes > 1 && l >= 1 && l <= nodes => {
                if rng.u8(0..4) == 0 {
                    l
                } else {
                    // A uniformly chosen node other than the leader.
                    let k = rng.u32(1..nodes);
                    if k >= l { k + 1 } else { k }
                }
            }
            _ => rng.u32(1..=nodes),
        }
    }
}

/// Polls the cluster's shard map into `map` until `stop` turns true. Nodes that are down are
/// skipped; an unanswered poll keeps the previous view.
pub async fn watch(nodes: &Nodes, map: &ShardMap, mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        if let Some(shards) = nodes.shards().await {
            map.set(shards);
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("{cas}:1"), key_slot("{cas}:2"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert_ne!(key_slot("{}x"), key_slot("x"));
    }

    #[test]
    fn roles_and_picks_follow_the_leader() {
        let map = ShardMap::default();
        assert_eq!(map.role(1, "{cas}:1"), None);
        map.set(vec![Shard {
            slots: (0, 16383),
            leader: Some(2),
            replicas: vec![1, 2, 3],
        }]);
        assert_eq!(map.role(2, "{cas}:1"), Some(Role::Leader));
        assert_eq!(map.role(1, "{cas}:1"), Some(Role::Follower));
        assert_eq!(map.role(4, "{cas}:1"), Some(Role::Other));
        let mut rng = fastrand::Rng::with_seed(1);
        let picks: Vec<u32> = (0..400).map(|_| map.pick(3, &mut rng)).collect();
        let to_leader = picks.iter().filter(|&&p| p == 2).count();
        assert!((60..140).contains(&to_leader), "{to_leader}");
        assert!(picks.iter().all(|&p| (1..=3).contains(&p)));
        assert!(picks.contains(&1) && picks.contains(&3));
    }
}
