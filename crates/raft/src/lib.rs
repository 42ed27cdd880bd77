//! Raft for `cp` keyspaces and for the cluster map (the meta group), on openraft.
//!
//! Every `cp` shard and the meta group is an openraft group; a node runs one `Raft` instance per
//! group it holds a replica of. All groups of a node share one storage engine (one redb file, one
//! writer thread), so log appends of every group share each fsync.
//!
//! # Boundaries
//!
//! This crate depends on the transport, storage, the cluster map and the shared types. It must
//! not depend on leaderless replication (`capdb-ap`), on the node's keyspace router or on any
//! front end: it serves groups, and knows nothing of keyspace modes other than `cp`.
//!
//! # Layout
//!
//! - [`command`]: the Raft type configuration and the commands logs carry.
//! - [`log_store`]: the Raft log of one group on the storage engine (durable before acknowledged).
//! - [`state_machine`]: applying committed commands: data shards into their table, the meta
//!   group into the [`capdb_cluster::ClusterState`]; snapshots of both.
//! - [`sessions`]: exactly-once application: request ids stamped by the routing node, and
//!   each group's table of applied ids and remembered replies.
//! - [`snapshot`]: snapshots read page by page when sent, sent in parts, spooled to disk by
//!   the receiver: never a whole shard in memory.
//! - [`messages`]: the transport services Raft speaks (Raft, snapshots, forwarded requests).
//! - [`network`]: openraft's network traits over the transport (the adapter only).
//! - [`groups`]: the Raft groups of one node ([`groups::Groups`]): starting and stopping them,
//!   routing requests to leaders ([`groups::route`]), ReadIndex reads ([`groups::read`]),
//!   membership changes ([`groups::membership`]), the meta group ([`groups::meta`]) and the
//!   handlers of peers' requests ([`groups::peer`]).

pub mod command;
pub mod groups;
pub mod log_store;
pub mod messages;
pub mod network;
pub mod sessions;
pub mod snapshot;
pub mod state_machine;

pub use groups::{Groups, GroupsConfig};
pub use messages::{ForwardError, GroupStatus};

/// Converts an error into the `std::io::Error` openraft's storage traits return.
pub(crate) fn io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
