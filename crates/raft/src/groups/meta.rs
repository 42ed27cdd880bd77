//! The meta group seen from the node: the cluster map it publishes, and who votes in it.
//! Proposals go through the same routing as every write ([`Groups::propose_meta`]); a node
//! that knows no leader yet (a joiner) sends them through its `--join` seeds.

use std::sync::Arc;

use capdb_cluster::{ClusterState, META_GROUP};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use super::Groups;

impl Groups {
    /// The latest cluster map this node has applied.
    pub fn cluster(&self) -> Arc<ClusterState> {
        self.cluster.borrow().clone()
    }

    /// A receiver that changes whenever the map does.
    pub fn watch_cluster(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.cluster.clone()
    }

    /// Whether this node leads the meta group now (and so carries the placement duties).
    pub fn leads_meta(&self) -> bool {
        self.leads(META_GROUP)
    }

    /// The number of voters of the meta group as this node sees it (1 when unknown).
    pub fn meta_voter_count(&self) -> usize {
        self.group(META_GROUP)
            .map(|g| {
                g.raft
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .count()
            })
            .unwrap_or(1)
    }
}
