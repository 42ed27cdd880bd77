//! The node's control loop: on every map change and every [`RECONCILE_EVERY`], register this
//! node in the map (or notice it was removed), let the local Raft groups follow the map
//! ([`Groups::follow_map`](capdb_raft::Groups::follow_map)), and on the meta leader take the
//! cluster-wide duties: create the `default` keyspace once the founders have registered, remove
//! drained nodes that hold nothing, and take one placement step at a time
//! ([`capdb_cluster::placement`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use capdb_cluster::{ClusterState, MetaCommand, NodeInfo, placement};
use capdb_storage::layout;
use capdb_types::{KeyspaceName, KeyspaceSpec, Mode};

use super::Node;

/// How often the control loop runs even without map changes.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Minimum time between two placement moves proposed by the meta leader.
const PLACEMENT_STEP_EVERY: Duration = Duration::from_secs(1);

/// Runs the control loop until the node's groups stop.
pub(super) async fn run(node: Arc<Node>) {
    let groups = node.groups.clone();
    let me = node.id();
    let mut changes = groups.watch_cluster();
    let removed_key = layout::node_removed_key(me);
    let mut removed = node.engine.meta_get(&removed_key).ok().flatten().is_some();
    if removed {
        tracing::error!(
            node = me,
            "this node was removed from the cluster; it will not rejoin (wipe its data dir to join as a new node)"
        );
    }
    // Whether this node has ever seen itself in the map: once it has, vanishing from the
    // map means it was removed (drained), and it must not register itself back.
    let mut seen = false;
    let mut last_placement: Option<Instant> = None;
    while !groups.is_stopping() {
        let state = groups.cluster();
        match state.nodes.get(&me) {
            Some(n) => {
                seen = true;
                if !same_endpoints(n, &node.info) {
                    register(&node).await;
                }
            }
            None if seen && !removed => {
                tracing::warn!(node = me, "this node has been removed from the cluster");
                removed = true;
                let _ = node
                    .engine
                    .meta_put(vec![(removed_key.clone(), Some(vec![1]))], true)
                    .await;
            }
            None if !removed => {
                register(&node).await;
            }
            None => {}
        }
        let state = groups.cluster();
        if let Err(e) = groups.follow_map(&state).await {
            tracing::warn!(error = %e, "reconcile step failed; retrying");
        }
        if groups.leads_meta() {
            meta_leader_duties(&node, &state, &mut last_placement).await;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
    }
}

/// Adds this node (addresses, labels) to the map. Returns whether it is there.
async fn register(node: &Node) -> bool {
    tracing::debug!(node = node.id(), "registering");
    match node
        .groups
        .propose_meta(MetaCommand::UpsertNode(node.info.clone()))
        .await
    {
        Ok(()) => {
            tracing::info!(node = node.id(), "registered in the cluster map");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "registration not done yet");
            false
        }
    }
}

fn same_endpoints(a: &NodeInfo, b: &NodeInfo) -> bool {
    a.peer_addr == b.peer_addr
        && a.resp_addr == b.resp_addr
        && a.http_addr == b.http_addr
        && a.labels == b.labels
}

/// The meta leader's jobs: make sure `default` exists, and take placement steps.
async fn meta_leader_duties(node: &Node, state: &ClusterState, last: &mut Option<Instant>) {
    if state.nodes.is_empty() {
        return;
    }
    if !state
        .keyspaces
        .contains_key(&KeyspaceName::default_keyspace())
    {
        create_default_keyspace(node, state).await;
        return;
    }
    if last.is_some_and(|t| t.elapsed() < PLACEMENT_STEP_EVERY) {
        return;
    }
    *last = Some(Instant::now());
    // Remove drained nodes that hold nothing any more.
    for n in state.nodes.values().filter(|n| n.draining) {
        if state.shards_of(n.id).next().is_none() {
            tracing::info!(node = n.id, "drained node removed from the cluster");
            let _ = node
                .groups
                .propose_meta(MetaCommand::RemoveNode(n.id))
                .await;
            return;
        }
    }
    if let Some(step) = placement::next_move(state) {
        tracing::info!(?step, "placement step");
        if let Err(e) = node.groups.propose_meta(step).await {
            tracing::info!(error = %e, "placement step refused");
        }
    }
}

/// Creates the `default` keyspace once the founders have registered (as many as the meta group
/// has voters, up to the replication factor), so it starts with all its replicas as voters: a
/// write acknowledged at formation is then on a majority of a full replica set, never on one
/// node that merely has learners catching up.
async fn create_default_keyspace(node: &Node, state: &ClusterState) {
    let default = KeyspaceName::default_keyspace();
    let shards = Some(node.config.cluster.default_shards);
    let spec = match KeyspaceSpec::new(default, Mode::Cp, None, shards, None, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the default keyspace spec");
            return;
        }
    };
    let founders = node.groups.meta_voter_count();
    let wanted = founders.min(spec.replication_factor as usize).max(1);
    let live = state.nodes.values().filter(|n| !n.draining).count();
    if live < wanted {
        tracing::debug!(
            live,
            wanted,
            "default keyspace waits for the founding nodes to register"
        );
        return;
    }
    let replicas = placement::place_keyspace(state, spec.shards, spec.replication_factor);
    if let Err(e) = node
        .groups
        .propose_meta(MetaCommand::CreateKeyspace { spec, replicas })
        .await
    {
        tracing::debug!(error = %e, "default keyspace not created yet");
    }
}
