//! The ids every layer shares, defined once.

/// A node of the cluster (stable across restarts; 1, 2, 3, ... in the cluster map).
pub type NodeId = u64;

/// A replication group: a Raft group (the meta group is 0, each `cp` shard has its own), or
/// the id the cluster map gives an `ap` or `cache` shard (which has no Raft group).
pub type GroupId = u64;
