//! Redis Cluster compatibility: cluster mode, `CLUSTER SLOTS|SHARDS|NODES|INFO|KEYSLOT|MYID|
//! REDIRECT`, `-MOVED`, and which slots `SCAN`, `DBSIZE` and `KEYS` answer for.
//!
//! capdb serves every key on every node (requests are forwarded to the shard leader), so plain
//! clients need none of this. Cluster-aware clients read the slot map of the connection's
//! keyspace (`resp_keyspace`, `default` unless configured, or what `SELECT` chose) and send each
//! key to its shard's leader, saving the forwarding hop.
//!
//! # Cluster mode
//!
//! A slot map is not all a Redis Cluster client expects. redis-py's `RedisCluster` refuses a
//! node whose `INFO` lacks `cluster_enabled:1`, scans by sending `SCAN` to every master and
//! uniting the answers, and sums `DBSIZE` over masters; `redis-cli --cluster check|info` reads
//! each node's own `CLUSTER NODES` line for its slots and asks each master for `DBSIZE`. If
//! every node answered for every key, each key would come back once per master. So a
//! connection in *cluster mode* behaves as a Redis Cluster node:
//!
//! - a command whose (first) key belongs to a shard led by another node gets `-MOVED <slot>
//!   <host>:<port>` instead of being forwarded; after `READONLY`, a read of a shard this node
//!   holds a replica of is served from that replica, as a Redis replica serves its master's
//!   slots;
//! - `SCAN`, `DBSIZE` and `KEYS` answer for the slots this node serves ([`served_shards`]);
//! - `INFO` says `cluster_enabled:1` and `redis_mode:cluster`, `HELLO` says `mode cluster`.
//!
//! Cluster clients never ask for any of this (they assume a cluster node), so the server-wide
//! setting `redis_cluster = true` (`--redis-cluster`, Redis's `cluster-enabled yes`) starts every
//! connection in cluster mode. It is off by default, so plain clients keep getting every key
//! from every node. `CLUSTER REDIRECT ON|OFF` switches one connection either way.
//!
//! # Masters and replicas
//!
//! A node can lead some shards and follow in others, which Redis's master/replica model cannot
//! express, and clients rely on that model: redis-py takes a node's role from the first
//! `CLUSTER SLOTS` range it appears in, so a master listed as a replica of another range would
//! never be scanned. So every reply shows one picture: a node that leads a shard is a `master` of
//! the slots of the shards it leads, and only of those; a node that leads none is a `slave` of
//! the leader of the first shard it holds a replica of (or of the first shard), listed as a
//! replica of that master's ranges it holds a copy of. `CLUSTER SHARDS` has one entry per master.
//! Leaders come from Raft elections, so which node is a master can change at any failover, as
//! in Redis Cluster. capdb does not balance leaderships yet: a keyspace needs several shards for
//! several masters, and even then elections may put every leadership on one node.
//!
//! # Which slots a node answers for
//!
//! A master answers `SCAN`/`DBSIZE`/`KEYS` for the slots it lists in `CLUSTER NODES`; a node
//! listed as a replica answers for its master's slots, as a Redis replica does. Every node
//! computes the same listing from the same map and leaders, so the masters' sets partition the
//! slots. Keyspaces that are not sharded (`ap`, `cache`) have no slot map and answer in full.
//!
//! # Leadership changes during a scan
//!
//! `SCAN 0` fixes the set of shards the scan covers, and the cursor keeps it
//! (`keyscan::ScanCursor`): a cursor continued on a node that no longer leads those shards
//! finishes exactly them (the reads go to the new leader, so they stay linearizable), and the
//! node's scan returns every key present throughout once. What one node cannot fix: a client
//! scans the masters it knew when it started. If a leadership moves between the `SCAN 0` sent
//! to one master and the `SCAN 0` sent to another, that shard is scanned by both (its keys
//! twice) or, if it moved to a node the client does not scan, by none. Redis Cluster behaves
//! the same way when a failover or resharding happens during a scan; a client that must not
//! miss keys restarts the scan after its slot map changes (redis-py refreshes it on `-MOVED`).
//!
//! # Not Redis Cluster
//!
//! - Commands whose keys span several slots are served (forwarded per shard) where Redis
//!   answers `-CROSSSLOT`; only the first key decides `-MOVED`.
//! - Node ids are the capdb node id, zero-padded to 40 hex digits.
//! - Topology is changed with capdb's own tools (`capdb cluster`, the HTTP API), not with
//!   `CLUSTER MEET|ADDSLOTS|SETSLOT|FAILOVER` or `redis-cli --cluster fix|reshard`.

use capdb_cluster::{ClusterState, NodeId, slots};
use capdb_raft::Groups;
use capdb_types::ReadMode;

use super::Connection;
use crate::node::{Keyspace, Node, ShardScope};

fn node_id_text(id: NodeId) -> String {
    format!("{id:040x}")
}

fn host_port(addr: &str) -> (String, i64) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse().unwrap_or(0),
        ),
        None => (addr.to_string(), 0),
    }
}

/// A shard as cluster clients see it: (slot range, leader, replicas).
type ShardView = ((u16, u16), NodeId, Vec<NodeId>);

/// Shards of a keyspace, in slot order, with their current leaders.
fn layout(ks: &Keyspace, groups: &Groups) -> Result<Vec<ShardView>, String> {
    if ks.led_shards().is_none() {
        return Err(format!(
            "ERR keyspace '{}' is not sharded (mode {}); SELECT a cp keyspace",
            ks.spec.name,
            ks.spec.mode.as_str()
        ));
    }
    // The current map (replicas move; the keyspace handle may be older).
    let state = groups.cluster();
    let entry = state
        .keyspaces
        .get(&ks.spec.name)
        .ok_or_else(|| format!("ERR keyspace '{}' no longer exists", ks.spec.name))?;
    Ok(entry
        .shards
        .iter()
        .map(|s| {
            let leader = groups.leader_of(s.group).unwrap_or(s.replicas[0]);
            (s.slots, leader, s.replicas.clone())
        })
        .collect())
}

/// The master a node is listed as (or under) in `CLUSTER NODES`: itself when it leads a shard,
/// else the leader of the first shard it holds a replica of, else of the first shard.
fn master_of(shards: &[ShardView], id: NodeId) -> Option<NodeId> {
    if shards.iter().any(|s| s.1 == id) {
        return Some(id);
    }
    shards
        .iter()
        .find(|s| s.2.contains(&id))
        .or(shards.first())
        .map(|s| s.1)
}

/// The slot ranges a master serves, adjacent ranges merged (as Redis prints them).
fn slot_ranges(shards: &[ShardView], master: NodeId) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for ((start, end), leader, _) in shards {
        if *leader != master {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 + 1 == *start => last.1 = *end,
            _ => out.push((*start, *end)),
        }
    }
    out
}

/// The shards `node` answers `SCAN`/`DBSIZE`/`KEYS` for in cluster mode: those led by the
/// master it is listed as (or under) in `CLUSTER NODES`. Keyspaces without a slot map: all.
pub(super) fn served_shards(node: &Node, ks: &Keyspace) -> ShardScope {
    let Ok(shards) = layout(ks, &node.groups) else {
        return ShardScope::All;
    };
    let master = master_of(&shards, node.groups.id());
    ShardScope::Only(
        shards
            .iter()
            .enumerate()
            .filter(|(_, s)| Some(s.1) == master)
            .map(|(i, _)| i as u32)
            .collect(),
    )
}

/// What `SCAN`/`DBSIZE`/`KEYS` of this connection cover: this node's slots in cluster mode,
/// else everything.
pub(super) fn scope(conn: &Connection, ks: &Keyspace) -> ShardScope {
    if conn.cluster_mode {
        served_shards(&conn.node, ks)
    } else {
        ShardScope::All
    }
}

/// The `INFO` section redis-cli, redis-benchmark and cluster clients check.
pub(super) fn info_section(conn: &Connection) -> String {
    format!(
        "# Cluster\r\ncluster_enabled:{}\r\n\r\n",
        u8::from(conn.cluster_mode)
    )
}

/// Whether a multi-key command's keys may run together: in cluster mode they must share a slot
/// (Redis Cluster's rule, which cluster-aware clients also check); otherwise they must share a
/// shard of the keyspace (a single-shard keyspace behaves as a standalone Redis).
pub(super) fn same_place(conn: &Connection, keys: &[&bytes::Bytes]) -> bool {
    let Some((first, rest)) = keys.split_first() else {
        return true;
    };
    if conn.cluster_mode {
        let slot = slots::key_slot(first);
        return rest.iter().all(|k| slots::key_slot(k) == slot);
    }
    conn.keyspace.same_shard(first, rest)
}

/// `-MOVED` for a key command whose shard leader is elsewhere, in cluster mode. `read_only`:
/// the command only reads, so after `READONLY` a local replica may answer it.
pub(super) fn moved(conn: &Connection, key: &[u8], read_only: bool) -> Option<String> {
    if !conn.cluster_mode {
        return None;
    }
    let shard = conn.keyspace.led_shard_for_key(key)?;
    let groups = &conn.node.groups;
    let leader = groups.leader_of(shard.group)?;
    if leader == groups.id() {
        return None;
    }
    let state = groups.cluster();
    if read_only && conn.consistency.cp_read == ReadMode::Stale {
        let replicas = state
            .keyspaces
            .get(&conn.keyspace.spec.name)
            .and_then(|e| e.shards.iter().find(|s| s.group == shard.group))
            .map(|s| s.replicas.as_slice())
            .unwrap_or_default();
        if replicas.contains(&groups.id()) {
            return None;
        }
    }
    let addr = &state.nodes.get(&leader)?.resp_addr;
    Some(format!("MOVED {} {addr}", slots::key_slot(key)))
}

/// One node of a `CLUSTER SLOTS` range: host, port, id and (Redis 7) an empty metadata map.
fn write_node_entry(conn: &mut Connection, state: &ClusterState, id: NodeId) {
    let (host, port) = state
        .nodes
        .get(&id)
        .map(|n| host_port(&n.resp_addr))
        .unwrap_or_default();
    conn.out.array(4);
    conn.out.bulk(host.as_bytes());
    conn.out.int(port);
    conn.out.bulk(node_id_text(id).as_bytes());
    conn.out.map(0);
}

/// `CLUSTER NODES`: one line per node, in Redis's format (`id host:port@bus flags master
/// ping-sent pong-recv epoch link slot...`), the bus port being the peer port.
fn nodes_text(state: &ClusterState, shards: &[ShardView], me: NodeId) -> String {
    let mut text = String::new();
    for (id, info) in &state.nodes {
        let ranges = slot_ranges(shards, *id);
        let (role, master) = match master_of(shards, *id) {
            Some(m) if m != *id => ("slave", node_id_text(m)),
            _ => ("master", "-".to_string()),
        };
        let (host, port) = host_port(&info.resp_addr);
        let myself = if *id == me { "myself," } else { "" };
        text.push_str(&format!(
            "{} {host}:{port}@{} {myself}{role} {master} 0 0 {} connected",
            node_id_text(*id),
            host_port(&info.peer_addr).1,
            state.version,
        ));
        for (start, end) in ranges {
            if start == end {
                text.push_str(&format!(" {start}"));
            } else {
                text.push_str(&format!(" {start}-{end}"));
            }
        }
        text.push('\n');
    }
    text
}

/// `CLUSTER KEYSLOT|MYID|REDIRECT|SLOTS|SHARDS|NODES|INFO`, for the connection's keyspace.
pub(super) fn command(conn: &mut Connection, args: &[bytes::Bytes]) -> Result<(), String> {
    let sub = args[1].to_ascii_lowercase();
    let groups = conn.node.groups.clone();
    let state = groups.cluster();
    match &sub[..] {
        b"keyslot" if args.len() == 3 => conn.out.int(slots::key_slot(&args[2]) as i64),
        b"myid" => conn.out.bulk(node_id_text(groups.id()).as_bytes()),
        b"redirect" if args.len() == 3 => {
            conn.cluster_mode = match &args[2].to_ascii_lowercase()[..] {
                b"on" => true,
                b"off" => false,
                _ => return Err("ERR CLUSTER REDIRECT takes ON or OFF".into()),
            };
            conn.out.ok();
        }
        b"slots" => {
            let shards = layout(&conn.keyspace, &groups)?;
            write_slots(conn, &state, &shards);
        }
        b"shards" => {
            let shards = layout(&conn.keyspace, &groups)?;
            write_shards(conn, &state, &shards);
        }
        b"nodes" => {
            let shards = layout(&conn.keyspace, &groups)?;
            let text = nodes_text(&state, &shards, groups.id());
            conn.out.verbatim(&text);
        }
        b"info" => {
            let shards = layout(&conn.keyspace, &groups).unwrap_or_default();
            conn.out.verbatim(&info_text(&state, &shards));
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand or wrong number of arguments for 'CLUSTER {}'",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

/// `CLUSTER SLOTS`: each shard's range, its leader, and the nodes listed under that leader that
/// hold a copy of it.
fn write_slots(conn: &mut Connection, state: &ClusterState, shards: &[ShardView]) {
    conn.out.array(shards.len());
    for ((start, end), leader, replicas) in shards {
        // Redis clients take a node's role from the first range they see it in, so a
        // master must never be listed as another range's replica: the replicas shown
        // are the nodes listed under this master that hold a copy of this shard.
        let followers: Vec<NodeId> = replicas
            .iter()
            .copied()
            .filter(|r| *r != *leader && master_of(shards, *r) == Some(*leader))
            .collect();
        let (start, end, leader) = (*start, *end, *leader);
        conn.out.array(3 + followers.len());
        conn.out.int(start as i64);
        conn.out.int(end as i64);
        write_node_entry(conn, state, leader);
        for f in followers {
            write_node_entry(conn, state, f);
        }
    }
}

/// `CLUSTER SHARDS`: one Redis shard per master: its slot ranges, itself and the nodes listed
/// under it.
fn write_shards(conn: &mut Connection, state: &ClusterState, shards: &[ShardView]) {
    let masters: std::collections::BTreeSet<NodeId> = shards.iter().map(|s| s.1).collect();
    conn.out.array(masters.len());
    for leader in masters {
        let ranges = slot_ranges(shards, leader);
        conn.out.map(2);
        conn.out.bulk(b"slots");
        conn.out.array(2 * ranges.len());
        for (start, end) in ranges {
            conn.out.int(start as i64);
            conn.out.int(end as i64);
        }
        let mut members: Vec<NodeId> = state
            .nodes
            .keys()
            .copied()
            .filter(|n| master_of(shards, *n) == Some(leader))
            .collect();
        members.sort_by_key(|n| *n != leader);
        conn.out.bulk(b"nodes");
        conn.out.array(members.len());
        for r in members {
            write_shard_member(conn, state, r, r == leader);
        }
    }
}

/// One node of a `CLUSTER SHARDS` entry.
fn write_shard_member(conn: &mut Connection, state: &ClusterState, id: NodeId, master: bool) {
    let (host, port) = state
        .nodes
        .get(&id)
        .map(|n| host_port(&n.resp_addr))
        .unwrap_or_default();
    conn.out.map(7);
    conn.out.bulk(b"id");
    conn.out.bulk(node_id_text(id).as_bytes());
    conn.out.bulk(b"port");
    conn.out.int(port);
    conn.out.bulk(b"ip");
    conn.out.bulk(host.as_bytes());
    conn.out.bulk(b"endpoint");
    conn.out.bulk(host.as_bytes());
    conn.out.bulk(b"role");
    conn.out.bulk(if master {
        b"master".as_slice()
    } else {
        b"replica".as_slice()
    });
    conn.out.bulk(b"replication-offset");
    conn.out.int(0);
    conn.out.bulk(b"health");
    conn.out.bulk(b"online");
}

/// `CLUSTER INFO`: `ok` when every shard's leader is a known node.
fn info_text(state: &ClusterState, shards: &[ShardView]) -> String {
    let ok = !shards.is_empty() && shards.iter().all(|s| state.nodes.contains_key(&s.1));
    let masters: std::collections::BTreeSet<NodeId> = shards.iter().map(|s| s.1).collect();
    format!(
        "cluster_state:{}\r\ncluster_slots_assigned:{}\r\ncluster_slots_ok:{}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:{}\r\ncluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n",
        if ok { "ok" } else { "fail" },
        if shards.is_empty() { 0 } else { slots::SLOTS },
        if ok { slots::SLOTS } else { 0 },
        state.nodes.len(),
        masters.len(),
        state.version,
        state.version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards() -> Vec<ShardView> {
        vec![
            ((0, 5460), 1, vec![1, 2, 3]),
            ((5461, 10922), 1, vec![1, 2, 3]),
            ((10923, 16383), 2, vec![2, 3, 4]),
        ]
    }

    #[test]
    fn masters_lead_and_other_nodes_replicate_the_first_shard_they_hold() {
        let s = shards();
        assert_eq!(master_of(&s, 1), Some(1));
        assert_eq!(master_of(&s, 2), Some(2));
        assert_eq!(master_of(&s, 3), Some(1));
        // Node 4 holds only the third shard: it is listed under that shard's leader.
        assert_eq!(master_of(&s, 4), Some(2));
        // A node holding nothing is listed under the first shard's leader.
        assert_eq!(master_of(&s, 9), Some(1));
        assert_eq!(master_of(&[], 1), None);
    }

    #[test]
    fn adjacent_ranges_of_one_master_merge_and_the_masters_partition_the_slots() {
        let s = shards();
        assert_eq!(slot_ranges(&s, 1), vec![(0, 10922)]);
        assert_eq!(slot_ranges(&s, 2), vec![(10923, 16383)]);
        assert!(slot_ranges(&s, 3).is_empty());
        let s = vec![
            ((0, 99), 1, vec![1]),
            ((100, 199), 2, vec![2]),
            ((200, 16383), 1, vec![1]),
        ];
        assert_eq!(slot_ranges(&s, 1), vec![(0, 99), (200, 16383)]);
    }
}
