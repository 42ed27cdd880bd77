//! Keyspace administration: list, create, describe and drop keyspaces, and the replica digest
//! of an `ap` keyspace (tests compare digests across nodes to see replicas converge).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use capdb_types::{Error, EvictionPolicy, KeyspaceName, KeyspaceSpec, Mode};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiResult, json_body};
use crate::node::{Consistency, Keyspace, Node};

async fn spec_json(ks: &Keyspace) -> Json_ {
    let mut v = serde_json::to_value(&ks.spec).expect("specs serialize");
    v["keys"] = json!(ks.len(Consistency::RELAXED).await.ok());
    if let Some(shards) = ks.led_shards() {
        v["shard_groups"] = json!(
            shards
                .iter()
                .map(|s| json!({
                    "group": s.group, "slots": [s.slots.0, s.slots.1], "replicas": s.replicas,
                }))
                .collect::<Vec<_>>()
        );
    }
    if let Some(memory) = ks.memory() {
        v["used_memory_bytes"] = json!(memory.used_bytes);
    }
    v
}

pub(super) async fn list_keyspaces(State(node): State<Arc<Node>>) -> Json<Json_> {
    let mut list: Vec<Json_> = Vec::new();
    for k in node.keyspaces() {
        list.push(spec_json(&k).await);
    }
    Json(json!({ "keyspaces": list }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyspace {
    name: String,
    mode: String,
    replication_factor: Option<u32>,
    shards: Option<u32>,
    max_memory_bytes: Option<u64>,
    eviction: Option<String>,
}

pub(super) async fn create_keyspace(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: CreateKeyspace = json_body(body)?;
    if crate::node::jobs::is_system_keyspace(&req.name) {
        return Err(Error::InvalidInput(format!(
            "keyspace names starting with '_' are reserved for the system ('{}')",
            req.name
        ))
        .into());
    }
    let eviction = req
        .eviction
        .as_deref()
        .map(str::parse::<EvictionPolicy>)
        .transpose()?;
    let spec = KeyspaceSpec::new(
        KeyspaceName::new(req.name)?,
        req.mode.parse::<Mode>()?,
        req.replication_factor,
        req.shards,
        req.max_memory_bytes,
        eviction,
    )?;
    let ks = node.create_keyspace(spec).await?;
    Ok((StatusCode::CREATED, Json(spec_json(&ks).await)).into_response())
}

pub(super) async fn describe_keyspace(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(Json(spec_json(&*node.keyspace(&name)?).await).into_response())
}

pub(super) async fn drop_keyspace(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult {
    node.drop_keyspace(&name).await?;
    Ok(Json(json!({"dropped": name})).into_response())
}

/// This node's replica digest of an `ap` keyspace: one hash per shard it holds (equal hashes on
/// two nodes mean their replicas of that shard hold the same versions).
pub(super) async fn keyspace_digest(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult {
    let ks = node.keyspace(&name)?;
    if ks.spec.mode != capdb_types::Mode::Ap {
        return Err(ApiError(Error::InvalidInput(format!(
            "keyspace '{name}' is {}; digests exist for ap keyspaces",
            ks.spec.mode.as_str()
        ))));
    }
    let state = node.cluster();
    let me = node.id();
    let entry = state
        .keyspaces
        .get(&ks.spec.name)
        .ok_or_else(|| ApiError(Error::KeyspaceNotFound(name.clone())))?;
    let mut shards = Vec::new();
    for (i, s) in entry.shards.iter().enumerate() {
        if !s.replicas.contains(&me) {
            continue;
        }
        let ap = node.ap.clone();
        let (ksname, slots) = (name.clone(), s.slots);
        let buckets = tokio::task::spawn_blocking(move || {
            capdb_ap::replica::digest(&ap, &ksname, slots, u64::MAX)
        })
        .await
        .map_err(|e| ApiError(Error::Io(e.to_string())))??;
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&buckets, &mut h);
        shards
            .push(json!({"shard": i, "digest": format!("{:016x}", std::hash::Hasher::finish(&h))}));
    }
    Ok(Json(json!({"keyspace": name, "node": me, "shards": shards})).into_response())
}
