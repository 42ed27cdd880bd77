//! The transport services Raft speaks, each on its own channel:
//!
//! - [`RaftService`]: openraft's append-entries (and heartbeats), votes, leader transfers;
//! - [`SnapshotService`]: snapshots, in parts, kept off the heartbeat channel;
//! - [`ForwardService`]: client requests routed to a group's leader or replica, including the
//!   meta group's writes sent through a seed by a joining node.
//!
//! Errors travel typed: a forwarded request fails with a [`ForwardError`] (whose `Db` case is
//! the database's [`Error`]); openraft's own errors are only displayed by openraft, so they
//! travel as text.

use std::collections::BTreeMap;

use bytes::Bytes;
use capdb_transport::{Channel, Service};
use capdb_types::{Error, GroupId, NodeId, ReadMode, Reply, Value};
use openraft::alias::VoteOf;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::command::{Request, Response, SnapshotMeta, TypeConfig};

/// openraft's messages for one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    /// The leader asks the target to take over leadership now.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
}

/// Why a group could not take a Raft message.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum RaftRefusal {
    /// The node holds no replica of the group (not started yet, or dropped).
    #[error("node has no replica of group {0}")]
    NoReplica(GroupId),
    /// openraft refused it (its error, as text: only openraft reads it).
    #[error("{0}")]
    Raft(String),
    /// A snapshot part or install was refused (out of order, superseded, or not spooled):
    /// the sender starts the snapshot again.
    #[error("{0}")]
    Snapshot(String),
}

/// The Raft channel: `(group, message)`.
pub struct RaftService;

impl Service for RaftService {
    const CHANNEL: Channel = Channel::Raft;
    type Request = (GroupId, RaftRequest);
    type Response = Result<RaftResponse, RaftRefusal>;
}

/// A snapshot of a group's state machine, sent in parts (`crate::snapshot`): every part of a
/// transfer in order from 0, each acknowledged before the next, then `Install`.
#[derive(Debug, Serialize, Deserialize)]
pub enum SnapshotRequest {
    /// Part `seq` (a postcard [`crate::snapshot::SnapshotPart`]) of transfer `transfer`.
    Part {
        group: GroupId,
        transfer: u64,
        seq: u64,
        part: Vec<u8>,
    },
    /// Install transfer `transfer`, complete with `parts` parts: the state as of `meta`.
    Install {
        group: GroupId,
        transfer: u64,
        parts: u64,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMeta,
    },
}

/// What a [`SnapshotRequest`] was answered.
#[derive(Debug, Serialize, Deserialize)]
pub enum SnapshotAck {
    /// The part was spooled.
    Spooled,
    /// openraft's answer to the install.
    Installed(SnapshotResponse<TypeConfig>),
}

/// The snapshot channel.
pub struct SnapshotService;

impl Service for SnapshotService {
    const CHANNEL: Channel = Channel::Snapshot;
    type Request = SnapshotRequest;
    type Response = Result<SnapshotAck, RaftRefusal>;
}

/// A client request for a group, routed to the node that can serve it.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// A write, to be proposed by the group's leader.
    Write { group: GroupId, request: Request },
    /// Keys of one group (GET, MGET, EXISTS).
    Read {
        group: GroupId,
        keys: Vec<Bytes>,
        mode: ReadMode,
    },
    /// A page of a shard's keys in order (SCAN).
    Scan {
        group: GroupId,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        mode: ReadMode,
    },
    /// The number of keys of a shard (DBSIZE).
    Count { group: GroupId, mode: ReadMode },
    /// A read-only data-type command (HGET, LRANGE, ...; `args[0]` its name), evaluated on one
    /// consistent state of the shard's replica.
    Query {
        group: GroupId,
        args: Vec<Bytes>,
        mode: ReadMode,
        seed: u64,
    },
}

/// A page of a shard scan: entries in key order and where the next page starts.
pub type ScanPage = (Vec<(Bytes, Value)>, Option<Bytes>);

/// The answer to a [`ForwardRequest`], one variant per request.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    Write(Result<Response, ForwardError>),
    Read(Result<Vec<Option<Value>>, ForwardError>),
    Scan(Result<ScanPage, ForwardError>),
    Count(Result<u64, ForwardError>),
    Query(Result<Reply, ForwardError>),
}

/// The forwarding channel.
pub struct ForwardService;

impl Service for ForwardService {
    const CHANNEL: Channel = Channel::Forward;
    type Request = ForwardRequest;
    type Response = ForwardResponse;
}

/// Why a forwarded request was not served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// This node is not the group's leader; try `leader` if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// This node holds no replica of the group (yet).
    #[error("no replica of group {0} here")]
    UnknownGroup(GroupId),
    /// The request failed with a database error (already final).
    #[error(transparent)]
    Db(#[from] Error),
    /// The request may or may not have taken effect (a timeout, a broken connection, a leader
    /// that lost its leadership with the entry in flight). Writes are identified and applied at
    /// most once, so the routing node may retry; if it runs out of time the client learns the
    /// outcome is unknown.
    #[error("outcome unknown: {0}")]
    Uncertain(String),
}

/// One group's state as this node sees it (the node's admin status reports these).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Leader only: matched log index per follower.
    pub replication: BTreeMap<NodeId, Option<u64>>,
}
