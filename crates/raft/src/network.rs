//! openraft's network traits on top of the transport: the adapter and nothing else.
//!
//! A group's messages go to a peer on the Raft channel; snapshots on the snapshot channel, so
//! heartbeats never wait behind a snapshot part. A snapshot is read and sent part by part
//! (`crate::snapshot`), each acknowledged before the next is read.

use std::sync::Arc;
use std::time::Duration;

use capdb_transport::{Peer, Peers, RpcError};
use capdb_types::{GroupId, NodeId};
use openraft::alias::VoteOf;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};

use crate::command::{PeerNode, Snapshot, SnapshotData, TypeConfig};
use crate::messages::{
    RaftRequest, RaftResponse, RaftService, SnapshotAck, SnapshotRequest, SnapshotService,
};

/// The slowest install a snapshot's sender waits for, in bytes per second (beyond openraft's
/// `install_snapshot_timeout`, which every part gets).
const INSTALL_BYTES_PER_SECOND_MIN: u64 = 4 << 20;

/// The node's Raft and snapshot peers, shared by every group.
pub struct RaftPeers {
    pub raft: Peers<RaftService>,
    pub snapshot: Peers<SnapshotService>,
}

/// Creates openraft network clients for one group.
pub struct NetworkFactory {
    pub group: GroupId,
    pub peers: Arc<RaftPeers>,
}

/// openraft's client to one peer, for one group.
pub struct Network {
    group: GroupId,
    target: NodeId,
    raft: Peer<RaftService>,
    snapshot: Peer<SnapshotService>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Network {
        Network {
            group: self.group,
            target,
            raft: self.peers.raft.get(target, &node.peer_addr),
            snapshot: self.peers.snapshot.get(target, &node.peer_addr),
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
    /// Sends one Raft message of this group and returns the answer of the same kind.
    async fn call(
        &self,
        request: RaftRequest,
        option: &RPCOption,
    ) -> Result<RaftResponse, RPCError<TypeConfig>> {
        self.raft
            .call((self.group, request), option.soft_ttl())
            .await
            .map_err(rpc_error)?
            .map_err(|e| remote(e.to_string()))
    }

    fn unexpected(&self, what: &str, answer: RaftResponse) -> RPCError<TypeConfig> {
        remote(format!(
            "unexpected answer to {what} from node {}: {answer:?}",
            self.target
        ))
    }
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::AppendEntries(rpc), &option).await? {
            RaftResponse::AppendEntries(r) => Ok(r),
            other => Err(self.unexpected("append_entries", other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::Vote(rpc), &option).await? {
            RaftResponse::Vote(r) => Ok(r),
            other => Err(self.unexpected("vote", other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::TransferLeader(req), &option).await? {
            RaftResponse::TransferLeader(r) => Ok(r),
            other => Err(self.unexpected("transfer_leader", other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let closed = |e: ReplicationClosed| StreamingError::Closed(e);
        // The snapshot is read now, not when this leader started sending: a node deposed
        // meanwhile may have applied entries of a newer term, which the follower must never
        // get under this older vote (openraft asserts it). Its replication is being cancelled.
        if let Some(last) = &snapshot.meta.last_log_id
            && last.leader_id.term > vote.leader_id.term
        {
            return Err(closed(ReplicationClosed::new(
                "the snapshot holds entries of a newer term than this leader's",
            )));
        }
        let mut cancel = std::pin::pin!(cancel);
        let ttl = option.soft_ttl();
        let transfer = fastrand::u64(..);
        let mut parts = snapshot
            .snapshot
            .into_parts()
            .map_err(|e| StreamingError::from(remote(format!("cannot read the snapshot: {e}"))))?;
        let mut seq = 0u64;
        let mut bytes = 0u64;
        loop {
            // Reading a page is a blocking storage read.
            let read = tokio::task::spawn_blocking(move || {
                let part = parts.next().map(|p| {
                    p.and_then(|p| postcard::to_stdvec(&p).map_err(std::io::Error::other))
                });
                (parts, part)
            });
            let (rest, part) = tokio::select! {
                biased;
                c = &mut cancel => return Err(closed(c)),
                r = read => r.map_err(|e| remote(format!("snapshot reader failed: {e}")))?,
            };
            parts = rest;
            let Some(part) = part else { break };
            let part = part.map_err(|e| remote(format!("cannot read the snapshot's rows: {e}")))?;
            bytes += part.len() as u64;
            let req = SnapshotRequest::Part {
                group: self.group,
                transfer,
                seq,
                part,
            };
            let ack = tokio::select! {
                biased;
                c = &mut cancel => return Err(closed(c)),
                a = self.snapshot.call(req, ttl) => a.map_err(rpc_error)?,
            };
            match ack.map_err(|e| remote(e.to_string()))? {
                SnapshotAck::Spooled => seq += 1,
                SnapshotAck::Installed(_) => {
                    return Err(remote("a snapshot part answered as an install".into()).into());
                }
            }
        }
        // The install replaces the follower's table in one storage transaction: its time grows
        // with the snapshot (a time-out would make this leader send it again, newer, forever).
        let install_ttl = ttl + Duration::from_secs(bytes / INSTALL_BYTES_PER_SECOND_MIN);
        let req = SnapshotRequest::Install {
            group: self.group,
            transfer,
            parts: seq,
            vote,
            meta: snapshot.meta,
        };
        let ack = tokio::select! {
            biased;
            c = &mut cancel => return Err(closed(c)),
            a = self.snapshot.call(req, install_ttl) => a.map_err(rpc_error)?,
        };
        match ack.map_err(|e| remote(e.to_string()))? {
            SnapshotAck::Installed(r) => Ok(r),
            SnapshotAck::Spooled => {
                Err(remote("a snapshot install answered as a part".into()).into())
            }
        }
    }
}
