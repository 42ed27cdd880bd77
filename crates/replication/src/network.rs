//! Node-to-node messages, and openraft's network traits on top of [`crate::rpc`].
//!
//! One connection per peer carries the traffic of every group (each request names its group),
//! plus forwarded client requests and cluster administration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::{GroupId, MetaCommand, NodeId, NodeInfo};
use capdb_types::{Error, Value};
use openraft::alias::VoteOf;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::{Deserialize, Serialize};

use crate::rpc::{Peer, Peers, RpcError};
use crate::types::{PeerNode, Request, Response, Snapshot, SnapshotData, SnapshotMeta, TypeConfig};

/// How a forwarded read must be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// ReadIndex on the leader, then a local read: never stale.
    Linearizable,
    /// The receiving replica's local state, possibly behind the leader.
    Stale,
}

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries {
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    Vote {
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
    },
    Snapshot {
        group: GroupId,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    /// The leader asks the target to take over leadership now.
    TransferLeader {
        group: GroupId,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
    },
    /// A client write for `group`, to be proposed by its leader.
    Write { group: GroupId, request: Request },
    /// A client read of one key in `group`.
    Read {
        group: GroupId,
        key: Bytes,
        mode: ReadMode,
    },
    /// Several keys of one group (MGET, EXISTS).
    ReadMany {
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
    /// A change to the cluster map, for the meta leader.
    Meta(MetaCommand),
    /// This node's view: its info, the cluster map version it has applied, and its groups.
    Status,
    /// Asks the node to treat these peers as unreachable (simulated partition); empty = heal.
    Partition { blocked: Vec<NodeId> },
    /// Leaderless replication of `ap` keyspaces.
    Ap(crate::ap::ApRequest),
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

/// Per-group status, reported by `Status`.
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub info: Option<NodeInfo>,
    pub map_version: u64,
    pub groups: Vec<GroupStatus>,
    pub blocked: Vec<NodeId>,
}

/// A page of a shard scan: entries in key order and where the next page starts.
pub type ScanPage = (Vec<(Bytes, Value)>, Option<Bytes>);

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    TransferLeader(Result<openraft::raft::TransferLeaderResponse<TypeConfig>, String>),
    Write(Result<Response, ForwardError>),
    Read(Result<Option<Value>, ForwardError>),
    ReadMany(Result<Vec<Option<Value>>, ForwardError>),
    Scan(Result<ScanPage, ForwardError>),
    Count(Result<u64, ForwardError>),
    Meta(Result<capdb_cluster::MetaResponse, ForwardError>),
    Status(NodeStatus),
    Ap(Result<crate::ap::ApResponse, String>),
    Done,
    /// The target cannot handle this group now (not created yet, stopping).
    Unavailable(String),
}

pub type PeerPool = Peers<PeerRequest, PeerResponse>;

/// Creates openraft network clients for one group.
pub struct NetworkFactory {
    pub group: GroupId,
    pub peers: Arc<PeerPool>,
}

/// openraft's client to one peer, for one group.
pub struct Network {
    group: GroupId,
    target: NodeId,
    peer: Peer<PeerRequest, PeerResponse>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Network {
        Network {
            group: self.group,
            target,
            peer: self.peers.get(target, &node.peer_addr),
        }
    }
}

fn rpc_error(e: RpcError) -> RPCError<TypeConfig> {
    match e {
        RpcError::Unreachable(..)
        | RpcError::NotSent(..)
        | RpcError::Blocked(_)
        | RpcError::Overloaded(_) => RPCError::Unreachable(Unreachable::from_string(e.to_string())),
        RpcError::Timeout(..) | RpcError::Codec(_) => {
            RPCError::Network(NetworkError::from_string(e.to_string()))
        }
    }
}

fn remote(msg: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

impl Network {
    async fn call(
        &self,
        req: PeerRequest,
        ttl: Duration,
    ) -> Result<PeerResponse, RPCError<TypeConfig>> {
        self.peer.call(req, ttl).await.map_err(rpc_error)
    }
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                PeerRequest::AppendEntries {
                    group: self.group,
                    rpc,
                },
                option.soft_ttl(),
            )
            .await?
        {
            PeerResponse::AppendEntries(Ok(r)) => Ok(r),
            PeerResponse::AppendEntries(Err(e)) | PeerResponse::Unavailable(e) => Err(remote(e)),
            other => Err(remote(format!(
                "unexpected answer to append_entries from {}: {other:?}",
                self.target
            ))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                PeerRequest::Vote {
                    group: self.group,
                    rpc,
                },
                option.soft_ttl(),
            )
            .await?
        {
            PeerResponse::Vote(Ok(r)) => Ok(r),
            PeerResponse::Vote(Err(e)) | PeerResponse::Unavailable(e) => Err(remote(e)),
            other => Err(remote(format!(
                "unexpected answer to vote from {}: {other:?}",
                self.target
            ))),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .call(
                PeerRequest::TransferLeader {
                    group: self.group,
                    req,
                },
                option.soft_ttl(),
            )
            .await?
        {
            PeerResponse::TransferLeader(Ok(r)) => Ok(r),
            PeerResponse::TransferLeader(Err(e)) | PeerResponse::Unavailable(e) => Err(remote(e)),
            other => Err(remote(format!(
                "unexpected answer to transfer_leader from {}: {other:?}",
                self.target
            ))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = PeerRequest::Snapshot {
            group: self.group,
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        match self.call(req, option.soft_ttl()).await? {
            PeerResponse::Snapshot(Ok(r)) => Ok(r),
            PeerResponse::Snapshot(Err(e)) | PeerResponse::Unavailable(e) => Err(remote(e).into()),
            other => Err(remote(format!(
                "unexpected answer to snapshot from {}: {other:?}",
                self.target
            ))
            .into()),
        }
    }
}
