//! The cluster map and the decisions made from it.
//!
//! # Layout
//!
//! - [`slots`]: Redis Cluster hash slots (CRC16, hash tags) and how a keyspace's shards split them.
//! - [`state`]: [`state::ClusterState`], the meta Raft group's state machine: nodes, labels,
//!   keyspaces, shards and their replicas, changed only by [`state::MetaCommand`]s.
//! - [`placement`]: where replicas go (distinct nodes, spread over zones, least loaded), and the
//!   one-step-at-a-time repair/rebalancing plan the meta leader follows, and the meta group's
//!   voters. Specified by the scripts in `tests/placement/` (see `tests/placement_scripts.rs`).
//! - [`lease`]: cache shards' primary leases, granted by a majority of the meta voters and
//!   released before a promotion, as pure rules over a given clock. Specified by the scripts in
//!   `tests/lease/` (see `tests/lease_scripts.rs`).
//!
//! Pure logic, no I/O: it must not depend on storage, Raft or the network. The Raft group that
//! replicates this state lives in `capdb-raft` (`groups/meta.rs`).

pub mod lease;
pub mod placement;
pub mod slots;
pub mod state;

pub use state::{
    CacheShard, ClusterState, ClusterStateV1, GroupId, META_GROUP, MetaCommand, MetaResponse,
    NodeId, NodeInfo, ShardInfo,
};
