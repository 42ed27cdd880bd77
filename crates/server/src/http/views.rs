//! Views over HTTP (issue 15, `node/views.rs`): `GET /v1/views/{ks}` (the views and their
//! state), `PUT /v1/views/{ks}/{name}` (the spec as the body: 201 created, 200 when it
//! exists with this spec), `GET /v1/views/{ks}/{name}?group=&after=&limit=` (rows, coverage,
//! the next page's cursor), `DELETE /v1/views/{ks}/{name}`, `POST /v1/views/{ks}/{name}/verify`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use capdb_types::Error;
use capdb_types::views::ViewState;
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::node::Node;

/// What a refusal means over HTTP: 404 no such view, 409 another spec under the name, a view
/// missing on a shard or no longer kept; else as any error.
fn refusal(e: Error) -> ApiError {
    match &e {
        Error::Command(line) if line.starts_with("NOVIEW") => {
            ApiError::Http(StatusCode::NOT_FOUND, "view_not_found", line.clone())
        }
        Error::Command(line) if line.contains("exists with another spec") => {
            ApiError::Http(StatusCode::CONFLICT, "view_exists", line.clone())
        }
        Error::Command(line) if line.starts_with("VIEWINCOMPLETE") => {
            ApiError::Http(StatusCode::CONFLICT, "view_incomplete", line.clone())
        }
        Error::Command(line) if line.starts_with("VIEWOVERFLOW") => {
            ApiError::Http(StatusCode::CONFLICT, "view_overflow", line.clone())
        }
        Error::Command(line) if line.starts_with("NOTREADY") => {
            ApiError::Http(StatusCode::CONFLICT, "view_building", line.clone())
        }
        _ => ApiError::from(e),
    }
}

pub(super) async fn create(
    State(node): State<Arc<Node>>,
    Path((ks, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    let (generation, created) = node
        .view_create(&ks, name.as_bytes(), &body)
        .await
        .map_err(refusal)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"view": name, "generation": generation, "created": created})),
    )
        .into_response())
}

pub(super) async fn list(State(node): State<Arc<Node>>, Path(ks): Path<String>) -> ApiResult {
    let defs = node.view_defs(&ks).await.map_err(refusal)?;
    let views: Vec<_> = defs
        .into_iter()
        .map(|(name, shards)| {
            let spec: serde_json::Value = shards
                .first()
                .and_then(|(_, d)| serde_json::from_str(&d.spec).ok())
                .unwrap_or(json!(null));
            json!({
                "name": String::from_utf8_lossy(&name),
                "shards": shards.iter().map(|(s, d)| {
                    let mut o = json!({"shard": s, "state": d.state.name(), "generation": d.generation});
                    if let ViewState::Building { keys_done, .. } = d.state {
                        o["keys_built"] = json!(keys_done);
                    }
                    o
                }).collect::<Vec<_>>(),
                "spec": spec,
            })
        })
        .collect();
    Ok(Json(json!({"keyspace": ks, "views": views})).into_response())
}

#[derive(serde::Deserialize)]
pub(super) struct GetQuery {
    group: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    /// Wait up to this many ms until an async (Lua) view has counted every change logged
    /// before the read (`caught_up` says whether it did).
    fresh_ms: Option<u64>,
}

pub(super) async fn get(
    State(node): State<Arc<Node>>,
    Path((ks, name)): Path<(String, String)>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    if q.limit == Some(0) {
        return Err(ApiError::from(Error::InvalidInput(
            "limit: a positive number of groups".into(),
        )));
    }
    let after = match &q.after {
        None => Vec::new(),
        Some(h) => from_hex(h).ok_or_else(|| {
            ApiError::from(Error::InvalidInput(
                "after: the cursor a read answered as next".into(),
            ))
        })?,
    };
    let groups: Vec<bytes::Bytes> = q
        .group
        .iter()
        .map(|g| bytes::Bytes::from(g.clone()))
        .collect();
    let caught_up = match q.fresh_ms {
        Some(ms) => Some(
            node.view_wait_fresh(&ks, name.as_bytes(), std::time::Duration::from_millis(ms))
                .await
                .map_err(refusal)?,
        ),
        None => None,
    };
    let read = node
        .view_get(
            &ks,
            name.as_bytes(),
            &groups,
            &after,
            q.limit.unwrap_or(1_000),
        )
        .await
        .map_err(refusal)?;
    let mut body = json!({
        "view": name,
        "complete": read.complete,
        "shards_ready": read.shards_ready,
        "shards_total": read.shards_total,
        "keys": read.keys,
        "skipped": read.skipped,
        "rounded": read.rounded,
        "rows": read.rows,
        "next": read.next.map(|n| to_hex(&n)),
    });
    if let Some(c) = caught_up {
        body["caught_up"] = json!(c);
    }
    Ok(Json(body).into_response())
}

pub(super) async fn drop(
    State(node): State<Arc<Node>>,
    Path((ks, name)): Path<(String, String)>,
) -> ApiResult {
    let had = node
        .view_drop(&ks, name.as_bytes())
        .await
        .map_err(refusal)?;
    if !had {
        return Err(refusal(Error::Command(format!("NOVIEW no view '{name}'"))));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn verify(
    State(node): State<Arc<Node>>,
    Path((ks, name)): Path<(String, String)>,
) -> ApiResult {
    let v = node
        .view_verify(&ks, name.as_bytes())
        .await
        .map_err(refusal)?;
    Ok(Json(json!({
        "view": name,
        "drift": v.drift,
        "groups_checked": v.groups_checked,
        "examples": v.examples,
    }))
    .into_response())
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(t: &str) -> Option<Vec<u8>> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}
