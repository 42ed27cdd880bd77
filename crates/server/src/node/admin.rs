//! Node administration between peers: the admin service (status), this node's status, and the
//! operator's peer filter (simulated partitions).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use capdb_cluster::{NodeId, NodeInfo};
use capdb_raft::GroupStatus;
use capdb_transport::{Channel, Handler, Peers, Service};
use capdb_types::Error;
use serde::{Deserialize, Serialize};

use super::Node;

/// Time a peer has to answer a status request before it is reported unhealthy.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// A request on the admin channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum AdminRequest {
    /// This node's view: its info, the cluster map version it has applied, and its groups.
    Status,
}

/// A node's view of itself and its groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub info: Option<NodeInfo>,
    pub map_version: u64,
    pub groups: Vec<GroupStatus>,
    pub blocked: Vec<NodeId>,
}

/// The admin channel.
pub struct AdminService;

impl Service for AdminService {
    const CHANNEL: Channel = Channel::Admin;
    type Request = AdminRequest;
    type Response = NodeStatus;
}

/// Serves the admin channel with this node.
pub struct AdminHandler(pub Arc<Node>);

impl Handler<AdminService> for AdminHandler {
    async fn handle(&self, _from: NodeId, request: AdminRequest) -> NodeStatus {
        match request {
            AdminRequest::Status => self.0.status(),
        }
    }
}

/// The admin clients of a node.
pub struct AdminPeers(pub Peers<AdminService>);

impl Node {
    /// This node's view of its groups.
    pub fn status(&self) -> NodeStatus {
        let state = self.cluster();
        let mut blocked: Vec<NodeId> = self.groups.filter().blocked().into_iter().collect();
        blocked.sort();
        NodeStatus {
            info: state
                .nodes
                .get(&self.id())
                .cloned()
                .or_else(|| Some(self.info.clone())),
            map_version: state.version,
            groups: self.groups.status(),
            blocked,
        }
    }

    /// Asks another node for its status.
    pub async fn remote_status(&self, node: NodeId) -> Result<NodeStatus, Error> {
        let addr = self
            .cluster()
            .nodes
            .get(&node)
            .map(|n| n.peer_addr.clone())
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        self.admin_peers
            .0
            .get(node, &addr)
            .call(AdminRequest::Status, STATUS_TIMEOUT)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    /// Blocks or unblocks peers on this node (simulated partitions), on every channel.
    pub fn set_partition(&self, blocked: BTreeSet<NodeId>) {
        self.groups.filter().set(blocked.into_iter().collect());
    }
}
