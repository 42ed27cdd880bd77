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
//! | `shard/{group}/chg` | that shard's change log, while its keyspace's changes are on (`disk/changes.rs`) | its Raft state machine |
//! | `raftlog/{group}` | the Raft log of a group | its log store |
//! | `_meta raft/{group}/{vote,committed,purged,applied,state}` | Raft records of a group | log store, state machine |
//! | `_meta raft/{group}/session/…` | exactly-once sessions of a group | its state machine |
//! | `ks/{keyspace}` | this node's replica of an `ap` keyspace (every shard it holds) | `ap` |
//! | `ks/{keyspace}/el` | elements of its `ap` collections (one record per hash field, set or sorted-set member, keyed by [`ap_element_key`]) and the queue of keys whose hidden elements are reclaimed ([`ap_reclaim_row`]) | `ap` |
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

/// The change log of a `cp` shard table (`disk/changes.rs`): stream clock -> row.
pub fn change_table(table: &str) -> String {
    format!("{table}/chg")
}

/// A `cp` shard's index of the cross-shard transactions its change log holds
/// (`disk/changes.rs`): transaction id -> the stream clock of its commit here.
pub fn change_txn_table(table: &str) -> String {
    format!("{table}/chg-txn")
}

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

/// The first bytes of every element record of `key` in an `ap` element table: the key's
/// length (4 bytes, big-endian) then the key, so one key's elements are contiguous and no key's
/// range contains another's.
pub fn ap_element_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len() + 1);
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The element record of `key`'s collection of `kind` (a `ValueKind` as `u8`) at `sub` (the
/// subkey `capdb-data` uses: hash field, set member, sorted-set score record).
pub fn ap_element_key(key: &[u8], kind: u8, sub: &[u8]) -> Vec<u8> {
    let mut k = ap_element_prefix(key);
    k.push(kind);
    k.extend_from_slice(sub);
    k
}

/// (key, kind, subkey) of an element record's key; `None` for anything else (a reserved row).
pub fn ap_element_parse(raw: &[u8]) -> Option<(&[u8], u8, &[u8])> {
    let len = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    if raw.starts_with(&AP_RESERVED) {
        return None;
    }
    let key = raw.get(4..4 + len)?;
    let kind = *raw.get(4 + len)?;
    Some((key, kind, &raw[5 + len..]))
}

/// Rows of an `ap` element table that are not elements start with this (no key is 4 GiB long).
pub const AP_RESERVED: [u8; 4] = [0xFF; 4];

/// The reclaim-queue row of `key` in an `ap` element table: its elements hidden by a delete
/// (or expired) are removed later, in bounded steps.
pub fn ap_reclaim_row(key: &[u8]) -> Vec<u8> {
    let mut k = AP_RESERVED.to_vec();
    k.extend_from_slice(key);
    k
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

    #[test]
    fn ap_element_keys_parse_back_and_keep_one_key_contiguous() {
        let k = ap_element_key(b"user", 1, b"field");
        assert_eq!(ap_element_parse(&k), Some((&b"user"[..], 1, &b"field"[..])));
        assert!(k.starts_with(&ap_element_prefix(b"user")));
        // A key that extends another is not inside its range.
        assert!(!ap_element_key(b"users", 1, b"").starts_with(&ap_element_prefix(b"user")));
        assert_eq!(ap_element_parse(&ap_reclaim_row(b"user")), None);
        assert_eq!(ap_element_parse(b"\0\0"), None);
    }
}
