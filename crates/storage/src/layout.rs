//! Every name the storage engine is addressed by: tables and `_meta` keys, in one place.
//!
//! Tables hold data; `_meta` is one small key/value table for per-group and per-node records.
//! Each customer of the engine (Raft groups, `ap` replicas, hinted handoff, the catalog) builds
//! its names here and nowhere else, so a reader sees the whole on-disk namespace at a glance and
//! two customers can never collide.
//!
//! | name | what | written by |
//! |---|---|---|
//! | `shard/{group}` | keys of a `cp` shard | its Raft state machine |
//! | `shard/{group}/el` | elements of that shard's hashes, lists, sets and sorted sets, its collection-id counter and reclaim queue, and WATCH's touched rows (`disk/touched.rs`) | its Raft state machine; the reclaimer |
//! | `raftlog/{group}` | the Raft log of a group | its log store |
//! | `_meta raft/{group}/{vote,committed,purged,applied,state}` | Raft records of a group | log store, state machine |
//! | `_meta raft/{group}/session/…` | exactly-once sessions of a group | its state machine |
//! | `ks/{keyspace}` | this node's replica of an `ap` keyspace (every shard it holds) | `ap` |
//! | `ks/{keyspace}/el` | reserved for the elements of `ap` collections | – |
//! | `_meta keyspace/{keyspace}` | marker of an `ap` keyspace's table | the node's catalog |
//! | `hints/{node}` | hinted-handoff queue for an unreachable node | `ap` hints |
//! | `_meta ap-hints/{node}` | marker of a hint queue | `ap` hints |
//! | `_meta node/{id}/removed` | this node was removed from the cluster | the control loop |

use capdb_types::GroupId;

/// The `_meta` table itself (every `_meta …` row above lives in it).
pub const META_TABLE: &str = "_meta";

/// The table holding a `cp` shard's keys.
pub fn shard_table(group: GroupId) -> String {
    format!("shard/{group}")
}

/// The element table of a keyspace or shard table: the fields, members and items of its
/// collections (see `disk/space.rs`).
pub fn element_table(table: &str) -> String {
    format!("{table}{ELEMENTS_SUFFIX}")
}

const ELEMENTS_SUFFIX: &str = "/el";

/// The table holding a Raft group's log.
pub fn raft_log_table(group: GroupId) -> String {
    format!("raftlog/{group}")
}

/// A Raft record of a group in `_meta` (`vote`, `committed`, `purged`, `applied`, `state`).
pub fn raft_meta_key(group: GroupId, what: &str) -> String {
    format!("raft/{group}/{what}")
}

/// The Raft records a group keeps in `_meta` (dropped with the group).
pub const RAFT_META_RECORDS: [&str; 5] = ["vote", "committed", "purged", "applied", "state"];

/// The `_meta` prefix of a group's exactly-once session rows.
pub fn raft_sessions_prefix(group: GroupId) -> String {
    format!("raft/{group}/session/")
}

const AP_TABLE_PREFIX: &str = "ks/";

/// The local table of an `ap` keyspace (one per keyspace per node; it holds the keys of every
/// shard this node replicates).
pub fn ap_table(keyspace: &str) -> String {
    format!("{AP_TABLE_PREFIX}{keyspace}")
}

/// The keyspace an `ap` table belongs to (the inverse of [`ap_table`]); other tables name
/// themselves.
pub fn keyspace_of_table(table: &str) -> &str {
    let table = table.strip_suffix(ELEMENTS_SUFFIX).unwrap_or(table);
    table.strip_prefix(AP_TABLE_PREFIX).unwrap_or(table)
}

/// The `_meta` marker of a keyspace's table.
pub fn keyspace_marker(keyspace: &str) -> String {
    format!("keyspace/{keyspace}")
}

/// The hinted-handoff queue for node `target`.
pub fn hint_table(target: capdb_types::NodeId) -> String {
    format!("hints/{target}")
}

/// The `_meta` prefix of hint-queue markers.
pub const HINT_MARKER_PREFIX: &str = "ap-hints/";

/// The `_meta` record saying this node was removed from the cluster.
pub fn node_removed_key(node: capdb_types::NodeId) -> String {
    format!("node/{node}/removed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ap_table_names_its_keyspace_back() {
        assert_eq!(keyspace_of_table(&ap_table("users")), "users");
        assert_eq!(keyspace_of_table("shard/7"), "shard/7");
    }
}
