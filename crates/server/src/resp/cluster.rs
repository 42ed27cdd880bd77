//! Redis Cluster compatibility: `CLUSTER SLOTS|SHARDS|NODES|INFO|KEYSLOT|MYID|REDIRECT`.
//!
//! capdb serves every key on every node (requests are forwarded to the shard leader), so plain
//! clients need none of this. Cluster-aware clients read the slot map of the connection's
//! keyspace (the `default` keyspace unless `SELECT` chose another `cp` keyspace) and send each
//! key to its shard's leader, saving the forwarding hop.
//!
//! `-MOVED` redirects: a connection that sends `CLUSTER REDIRECT ON` gets `-MOVED <slot>
//! <host>:<port>` for a key whose shard leader is another node, as Redis Cluster would answer,
//! instead of having the request forwarded. `CLUSTER REDIRECT OFF` (the default) forwards.
//!
//! A node can lead some shards and follow in others, which Redis's master/replica model cannot
//! express: `CLUSTER NODES` lists a node as `master` when it leads at least one shard of the
//! keyspace (with those slots), else as `slave` of the first shard's leader.

use capdb_cluster::{ClusterState, NodeId, slots};
use capdb_replication::manager::Manager;

use super::Connection;
use crate::node::{Keyspace, Store};

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

/// Shards of the connection's keyspace.
fn layout(ks: &Keyspace, manager: &Manager) -> Result<Vec<ShardView>, String> {
    if !matches!(ks.store, Store::Replicated(_)) {
        return Err(format!(
            "ERR keyspace '{}' is not sharded (mode {}); SELECT a cp keyspace",
            ks.spec.name,
            ks.spec.mode.as_str()
        ));
    }
    // The current map (replicas move; the keyspace handle may be older).
    let state = manager.cluster();
    let entry = state
        .keyspaces
        .get(&ks.spec.name)
        .ok_or_else(|| format!("ERR keyspace '{}' no longer exists", ks.spec.name))?;
    Ok(entry
        .shards
        .iter()
        .map(|s| {
            let leader = manager.leader_of(s.group).unwrap_or(s.replicas[0]);
            (s.slots, leader, s.replicas.clone())
        })
        .collect())
}

/// `-MOVED` for a key command whose shard leader is elsewhere, when the connection asked for
/// redirects.
pub(super) fn moved(conn: &Connection, key: &[u8]) -> Option<String> {
    if !conn.redirect {
        return None;
    }
    let Store::Replicated(r) = &conn.keyspace.store else {
        return None;
    };
    let shard = r.entry.shard_for_key(key);
    let leader = conn.node.manager.leader_of(shard.group)?;
    if leader == conn.node.manager.id() {
        return None;
    }
    let state = conn.node.manager.cluster();
    let addr = &state.nodes.get(&leader)?.resp_addr;
    Some(format!("MOVED {} {addr}", slots::key_slot(key)))
}

fn write_node_entry(conn: &mut Connection, state: &ClusterState, id: NodeId) {
    let (host, port) = state
        .nodes
        .get(&id)
        .map(|n| host_port(&n.resp_addr))
        .unwrap_or_default();
    conn.out.array(3);
    conn.out.bulk(host.as_bytes());
    conn.out.int(port);
    conn.out.bulk(node_id_text(id).as_bytes());
}

pub(super) fn command(conn: &mut Connection, args: &[bytes::Bytes]) -> Result<(), String> {
    let sub = args[1].to_ascii_lowercase();
    let manager = conn.node.manager.clone();
    let state = manager.cluster();
    match &sub[..] {
        b"keyslot" if args.len() == 3 => conn.out.int(slots::key_slot(&args[2]) as i64),
        b"myid" => conn.out.bulk(node_id_text(manager.id()).as_bytes()),
        b"redirect" if args.len() == 3 => {
            conn.redirect = match &args[2].to_ascii_lowercase()[..] {
                b"on" => true,
                b"off" => false,
                _ => return Err("ERR CLUSTER REDIRECT takes ON or OFF".into()),
            };
            conn.out.ok();
        }
        b"slots" => {
            let shards = layout(&conn.keyspace, &manager)?;
            conn.out.array(shards.len());
            for ((start, end), leader, replicas) in shards {
                let followers: Vec<NodeId> =
                    replicas.into_iter().filter(|r| *r != leader).collect();
                conn.out.array(3 + followers.len());
                conn.out.int(start as i64);
                conn.out.int(end as i64);
                write_node_entry(conn, &state, leader);
                for f in followers {
                    write_node_entry(conn, &state, f);
                }
            }
        }
        b"shards" => {
            let shards = layout(&conn.keyspace, &manager)?;
            conn.out.array(shards.len());
            for ((start, end), leader, replicas) in shards {
                conn.out.map(2);
                conn.out.bulk(b"slots");
                conn.out.array(2);
                conn.out.int(start as i64);
                conn.out.int(end as i64);
                conn.out.bulk(b"nodes");
                conn.out.array(replicas.len());
                for r in replicas {
                    let (host, port) = state
                        .nodes
                        .get(&r)
                        .map(|n| host_port(&n.resp_addr))
                        .unwrap_or_default();
                    conn.out.map(7);
                    conn.out.bulk(b"id");
                    conn.out.bulk(node_id_text(r).as_bytes());
                    conn.out.bulk(b"port");
                    conn.out.int(port);
                    conn.out.bulk(b"ip");
                    conn.out.bulk(host.as_bytes());
                    conn.out.bulk(b"endpoint");
                    conn.out.bulk(host.as_bytes());
                    conn.out.bulk(b"role");
                    conn.out.bulk(if r == leader {
                        b"master".as_slice()
                    } else {
                        b"replica".as_slice()
                    });
                    conn.out.bulk(b"replication-offset");
                    conn.out.int(0);
                    conn.out.bulk(b"health");
                    conn.out.bulk(b"online");
                }
            }
        }
        b"nodes" => {
            let shards = layout(&conn.keyspace, &manager)?;
            let first_leader = shards.first().map(|s| s.1);
            let mut text = String::new();
            for (id, info) in &state.nodes {
                let led: Vec<String> = shards
                    .iter()
                    .filter(|s| s.1 == *id)
                    .map(|s| format!("{}-{}", s.0.0, s.0.1))
                    .collect();
                let (host, port) = host_port(&info.resp_addr);
                let myself = if *id == manager.id() { "myself," } else { "" };
                let (role, master) = if led.is_empty() {
                    (
                        "slave",
                        first_leader.map(node_id_text).unwrap_or_else(|| "-".into()),
                    )
                } else {
                    ("master", "-".to_string())
                };
                text.push_str(&format!(
                    "{} {host}:{port}@{} {myself}{role} {master} 0 0 {} connected {}\n",
                    node_id_text(*id),
                    host_port(&info.peer_addr).1,
                    state.version,
                    led.join(" ")
                ));
            }
            conn.out.verbatim(&text);
        }
        b"info" => {
            let shards = layout(&conn.keyspace, &manager).unwrap_or_default();
            let ok = !shards.is_empty() && shards.iter().all(|s| state.nodes.contains_key(&s.1));
            let text = format!(
                "cluster_enabled:1\r\ncluster_state:{}\r\ncluster_slots_assigned:{}\r\ncluster_slots_ok:{}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:{}\r\ncluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n",
                if ok { "ok" } else { "fail" },
                if shards.is_empty() { 0 } else { slots::SLOTS },
                if ok { slots::SLOTS } else { 0 },
                state.nodes.len(),
                shards.len(),
                state.version,
                state.version,
            );
            conn.out.verbatim(&text);
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
