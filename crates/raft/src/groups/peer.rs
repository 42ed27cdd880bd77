//! Serving peers: Raft messages, snapshots, and requests forwarded to this node's groups.
//! Each is its own transport service, registered by the node.

use std::sync::Arc;
use std::time::Instant;

use capdb_cluster::{GroupId, META_GROUP, NodeId};
use capdb_storage::ScanRange;
use capdb_transport::Handler;
use capdb_types::unix_now_ms;

use super::Groups;
use super::route::{HOP_TIMEOUT, relayed};
use crate::command::{Snapshot, TypeConfig};
use crate::messages::{
    ForwardError, ForwardRequest, ForwardResponse, ForwardService, RaftRefusal, RaftRequest,
    RaftResponse, RaftService, SnapshotAck, SnapshotRequest, SnapshotService,
};
use crate::snapshot::{InboxRefusal, SnapshotData};

/// Serves the Raft, snapshot and forwarding channels with this node's groups.
#[derive(Clone)]
pub struct GroupsHandler(pub Arc<Groups>);

impl Handler<RaftService> for GroupsHandler {
    async fn handle(
        &self,
        _from: NodeId,
        (group, request): (GroupId, RaftRequest),
    ) -> Result<RaftResponse, RaftRefusal> {
        let g = self.0.group(group).ok_or(RaftRefusal::NoReplica(group))?;
        let refused = |e: openraft::errors::RaftError<TypeConfig>| RaftRefusal::Raft(e.to_string());
        Ok(match request {
            RaftRequest::AppendEntries(rpc) => {
                RaftResponse::AppendEntries(g.raft.append_entries(rpc).await.map_err(refused)?)
            }
            RaftRequest::Vote(rpc) => RaftResponse::Vote(g.raft.vote(rpc).await.map_err(refused)?),
            RaftRequest::TransferLeader(req) => RaftResponse::TransferLeader(
                g.raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(|e| RaftRefusal::Raft(e.to_string()))?,
            ),
        })
    }
}

/// Runs `f` (the snapshot inbox's file I/O) off the runtime's threads.
async fn off_runtime<T: Send + 'static>(
    groups: Arc<Groups>,
    f: impl FnOnce(&Groups) -> Result<T, InboxRefusal> + Send + 'static,
) -> Result<T, RaftRefusal> {
    tokio::task::spawn_blocking(move || f(&groups))
        .await
        .map_err(|e| RaftRefusal::Snapshot(format!("snapshot inbox failed: {e}")))?
        .map_err(|e| RaftRefusal::Snapshot(e.to_string()))
}

impl Handler<SnapshotService> for GroupsHandler {
    async fn handle(
        &self,
        from: NodeId,
        request: SnapshotRequest,
    ) -> Result<SnapshotAck, RaftRefusal> {
        match request {
            SnapshotRequest::Part {
                group,
                transfer,
                seq,
                part,
            } => {
                self.0.group(group).ok_or(RaftRefusal::NoReplica(group))?;
                off_runtime(self.0.clone(), move |g| {
                    g.snapshots_in.part(from, group, transfer, seq, &part)
                })
                .await?;
                Ok(SnapshotAck::Spooled)
            }
            SnapshotRequest::Install {
                group,
                transfer,
                parts,
                vote,
                meta,
            } => {
                let g = self.0.group(group).ok_or(RaftRefusal::NoReplica(group))?;
                let spool = off_runtime(self.0.clone(), move |g| {
                    g.snapshots_in.finish(from, group, transfer, parts)
                })
                .await?;
                let snapshot = Snapshot {
                    meta,
                    snapshot: SnapshotData::Spooled(spool),
                };
                let response = g
                    .raft
                    .install_full_snapshot(vote, snapshot)
                    .await
                    .map_err(|e| RaftRefusal::Raft(e.to_string()))?;
                Ok(SnapshotAck::Installed(response))
            }
        }
    }
}

impl Handler<ForwardService> for GroupsHandler {
    async fn handle(&self, from: NodeId, request: ForwardRequest) -> ForwardResponse {
        let groups = &self.0;
        let deadline = Instant::now() + HOP_TIMEOUT;
        match request {
            ForwardRequest::Write { group, request } => {
                ForwardResponse::Write(groups.serve_write(from, group, request).await)
            }
            ForwardRequest::Read { group, keys, mode } => ForwardResponse::Read(
                groups
                    .read_local(group, &keys, mode, unix_now_ms(), deadline)
                    .await,
            ),
            ForwardRequest::Scan {
                group,
                after,
                prefix,
                limit,
                mode,
            } => {
                let range = ScanRange {
                    after,
                    end: None,
                    prefix,
                };
                ForwardResponse::Scan(
                    groups
                        .scan_local(group, range, limit, mode, unix_now_ms(), deadline)
                        .await,
                )
            }
            ForwardRequest::Count { group, mode } => {
                ForwardResponse::Count(groups.count_local(group, mode, deadline).await)
            }
            ForwardRequest::Query {
                group,
                args,
                mode,
                seed,
            } => ForwardResponse::Query(
                groups
                    .query_local(group, &args, mode, unix_now_ms(), seed, deadline)
                    .await,
            ),
        }
    }
}

impl Groups {
    /// A write forwarded by node `from`: proposed here when this node leads the group. A seed
    /// relays meta writes for nodes that cannot reach the meta leader themselves (joiners).
    async fn serve_write(
        &self,
        from: NodeId,
        group: GroupId,
        request: crate::command::Request,
    ) -> Result<crate::command::Response, ForwardError> {
        if !self.holds(group) {
            if group == META_GROUP {
                // A joining node asks through a seed: forward to the meta leader.
                return relayed(self.write_via(group, request, false).await);
            }
            return Err(ForwardError::UnknownGroup(group));
        }
        let deadline = Instant::now() + HOP_TIMEOUT;
        let local = self.write_local(group, request.clone(), deadline).await;
        if group == META_GROUP
            && let Err(ForwardError::NotLeader { .. }) = &local
            && !self.cluster().nodes.contains_key(&from)
        {
            return relayed(self.write_via(group, request, false).await);
        }
        local
    }
}
