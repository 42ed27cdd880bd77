//! Replication for `cp` keyspaces and for the cluster map.
//!
//! Every `cp` shard and the meta group is an openraft group; a node runs one `Raft` instance per
//! group it holds a replica of. All groups of a node share one storage engine (one redb file, one
//! writer thread), so log appends of every group share each fsync.
//!
//! # Layout
//!
//! - [`types`]: the Raft type configuration and the commands logs carry.
//! - [`log_store`]: the Raft log of one group on the storage engine (durable before acknowledged).
//! - [`state_machine`]: applying committed commands: data shards into their table, the meta
//!   group into the [`capdb_cluster::ClusterState`]; snapshots of both.
//! - [`sessions`]: exactly-once application: request ids stamped by the routing node, and
//!   each group's table of applied ids and remembered replies.
//! - [`network`]: openraft's network traits over [`rpc`], and the node-to-node messages.
//! - [`rpc`]: request/response framing over TCP between nodes.
//! - [`manager`]: the groups of one node: starting, bootstrapping, membership changes, routing
//!   client requests to leaders (forwarding), linearizable and stale reads, the meta leader's
//!   placement loop.

pub mod ap;
pub mod log_store;
pub mod manager;
pub mod network;
pub mod rpc;
pub mod sessions;
pub mod state_machine;
pub mod types;

/// Converts an error into the `std::io::Error` openraft's storage traits return.
pub(crate) fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
