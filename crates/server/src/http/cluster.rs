//! The cluster as operators and tests see it: status gathered from every node, the `ap`
//! reconciliation report, draining a node, stepping down, and the simulated partition the
//! playground and tests cut links with.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use capdb_types::Error;
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiResult, json_body};
use crate::node::Node;

/// Nodes (with health and labels), and every shard with its leader and replication lag,
/// gathered from every node (each answers within a second or is reported unhealthy).
pub(super) async fn cluster_status(State(node): State<Arc<Node>>) -> ApiResult {
    let state = node.cluster();
    let me = node.id();
    let node = &node;
    let calls = state.nodes.keys().map(|&id| async move {
        let status = if id == me {
            Ok(node.status())
        } else {
            node.remote_status(id).await
        };
        (id, status)
    });
    let statuses: BTreeMap<u64, Result<crate::node::admin::NodeStatus, Error>> =
        futures::future::join_all(calls).await.into_iter().collect();
    // Each group's view from its leader (the node reporting itself as leader of the group).
    let mut leaders: BTreeMap<u64, (u64, &capdb_raft::GroupStatus)> = BTreeMap::new();
    for (id, st) in &statuses {
        if let Ok(st) = st {
            for g in &st.groups {
                if g.leader == Some(*id) {
                    leaders.insert(g.group, (*id, g));
                }
            }
        }
    }
    let nodes: Vec<Json_> = state
        .nodes
        .values()
        .map(|n| {
            let st = statuses.get(&n.id);
            json!({
                "id": n.id, "peer_addr": n.peer_addr, "resp_addr": n.resp_addr, "http_addr": n.http_addr,
                "labels": n.labels, "draining": n.draining,
                "healthy": st.is_some_and(|s| s.is_ok()),
                "error": st.and_then(|s| s.as_ref().err()).map(|e| e.to_string()),
                "map_version": st.and_then(|s| s.as_ref().ok()).map(|s| s.map_version),
                "replicas": state.shards_of(n.id).count(),
                "leading": leaders.values().filter(|(l, _)| *l == n.id).count(),
                "blocked_peers": st.and_then(|s| s.as_ref().ok()).map(|s| s.blocked.clone()),
            })
        })
        .collect();
    let mut keyspaces = Vec::new();
    let meta = leaders.get(&capdb_cluster::META_GROUP);
    for (name, entry) in &state.keyspaces {
        let shards: Vec<Json_> = entry
            .shards
            .iter()
            .map(|s| {
                let leader = leaders.get(&s.group);
                let lag: BTreeMap<String, Option<u64>> = leader
                    .map(|(_, g)| {
                        let last = g.last_log_index.unwrap_or(0);
                        g.replication
                            .iter()
                            .map(|(n, m)| (n.to_string(), m.map(|m| last.saturating_sub(m))))
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "group": s.group, "slots": [s.slots.0, s.slots.1], "replicas": s.replicas,
                    "leader": leader.map(|(l, _)| *l), "term": leader.map(|(_, g)| g.term),
                    "voters": leader.map(|(_, g)| g.voters.clone()), "learners": leader.map(|(_, g)| g.learners.clone()),
                    "replication_lag_entries": lag,
                })
            })
            .collect();
        keyspaces.push(json!({"name": name, "mode": entry.spec.mode.as_str(), "replication_factor": entry.spec.replication_factor, "shards": shards}));
    }
    Ok(Json(json!({
        "map_version": state.version,
        "this_node": me,
        "meta_leader": meta.map(|(l, _)| *l),
        "nodes": nodes,
        "keyspaces": keyspaces,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionBody {
    /// Node ids this node stops talking to (both directions); empty heals.
    blocked: Vec<u64>,
}

/// Simulated partition: this node drops all traffic to and from `blocked` (no root needed;
/// the playground and tests cut links with it).
pub(super) async fn set_partition(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: PartitionBody = json_body(body)?;
    node.set_partition(body.blocked.iter().copied().collect());
    tracing::warn!(blocked = ?body.blocked, "peer traffic filter changed");
    Ok(Json(json!({"blocked": body.blocked})).into_response())
}

/// What anti-entropy, read repair and hinted handoff reconciled, per `ap` keyspace, summed
/// over every node that answered, with each node's episodes (divergence seen until replicas
/// were in sync again, and how long that took).
pub(super) async fn reconcile_report(State(node): State<Arc<Node>>) -> ApiResult {
    use capdb_ap::{ApRequest, ApResponse};
    let ap = &node.ap;
    let ids: Vec<u64> = node.cluster().nodes.keys().copied().collect();
    let calls = ids.iter().map(|&id| async move {
        let r = ap
            .call(id, ApRequest::Stats, std::time::Duration::from_secs(2))
            .await;
        (id, r)
    });
    let mut per_node = serde_json::Map::new();
    let mut totals: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut convergence: BTreeMap<String, Json_> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (id, r) in futures::future::join_all(calls).await {
        let stats: Json_ = match r {
            Ok(ApResponse::Stats(text)) => serde_json::from_str(&text).unwrap_or(Json_::Null),
            _ => {
                unreachable.push(id);
                continue;
            }
        };
        for (ks, v) in stats["keyspaces"].as_object().into_iter().flatten() {
            let t = totals.entry(ks.clone()).or_default();
            for (k, n) in v["totals"].as_object().into_iter().flatten() {
                *t.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
            // The latest convergence any node measured.
            if let Some(last) = v["episodes"].as_array().and_then(|e| e.last()) {
                let newer = convergence
                    .get(ks)
                    .is_none_or(|c| c["converged_ms"].as_u64() < last["converged_ms"].as_u64());
                if newer {
                    let mut l = last.clone();
                    l["node"] = json!(id);
                    convergence.insert(ks.clone(), l);
                }
            }
        }
        per_node.insert(id.to_string(), stats);
    }
    let keyspaces: BTreeMap<String, Json_> = totals
        .into_iter()
        .map(|(ks, t)| {
            let last = convergence.remove(&ks).unwrap_or(Json_::Null);
            (ks, json!({"totals": t, "last_episode": last}))
        })
        .collect();
    Ok(Json(json!({
        "keyspaces": keyspaces,
        "nodes": per_node,
        "unreachable_nodes": unreachable,
        "note": "keys_repaired: missing on one replica and copied; conflicts: different versions on two replicas, resolved by last-writer-wins or counter merge",
    }))
    .into_response())
}

/// Drains a node: its replicas move elsewhere, then it leaves the map.
pub(super) async fn remove_node(State(node): State<Arc<Node>>, Path(id): Path<u64>) -> ApiResult {
    if !node.cluster().nodes.contains_key(&id) {
        return Err(ApiError(Error::InvalidInput(format!(
            "node {id} is not a member"
        ))));
    }
    node.groups
        .propose_meta(capdb_cluster::MetaCommand::DrainNode(id))
        .await?;
    Ok(Json(json!({"draining": id, "note": "replicas are moving away; the node leaves the map once it holds none"})).into_response())
}

/// Moves every leadership this node holds to other replicas (before maintenance / preStop).
pub(super) async fn step_down(State(node): State<Arc<Node>>) -> ApiResult {
    node.groups.step_down_everywhere().await;
    Ok(Json(json!({"stepped_down": node.id()})).into_response())
}
