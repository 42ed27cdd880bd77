//! Jobs over HTTP (issue 15, `node/jobs.rs`): `POST /v1/jobs` (the spec as the body),
//! `GET /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/result`, `DELETE /v1/jobs/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use capdb_types::Error;
use capdb_types::jobs::JobState;
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::node::Node;

fn not_found(id: &str) -> ApiError {
    ApiError::Http(
        StatusCode::NOT_FOUND,
        "job_not_found",
        format!("no job '{id}'"),
    )
}

/// What a refusal of the `_jobs` state machine means over HTTP: 429 (retry later) for
/// `JOBSFULL`, 409 for an id taken by another spec, 404 for `NOJOB`; else as any error.
fn refusal(e: Error) -> ApiError {
    match &e {
        Error::Command(line) if line.starts_with("JOBSFULL") => {
            ApiError::Http(StatusCode::TOO_MANY_REQUESTS, "jobs_full", line.clone())
        }
        Error::Command(line) if line.contains("exists with another spec") => {
            ApiError::Http(StatusCode::CONFLICT, "job_exists", line.clone())
        }
        Error::Command(line) if line.starts_with("NOJOB") => {
            ApiError::Http(StatusCode::NOT_FOUND, "job_not_found", line.clone())
        }
        _ => ApiError::from(e),
    }
}

/// `POST /v1/jobs`: 201 `{"id", "created": true}`, or 200 with `created: false` when the same
/// spec was submitted under this id before.
pub(super) async fn submit(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    let (id, created) = node.job_submit(&body).await.map_err(refusal)?;
    let id = String::from_utf8_lossy(&id).into_owned();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"id": id, "created": created}))).into_response())
}

pub(super) async fn list(State(node): State<Arc<Node>>) -> ApiResult {
    let ids: Vec<String> = node
        .job_list()
        .await?
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    Ok(Json(json!({"jobs": ids})).into_response())
}

pub(super) async fn status(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    let rec = node
        .job_record(id.as_bytes())
        .await?
        .ok_or_else(|| not_found(&id))?;
    let spec: serde_json::Value = serde_json::from_str(&rec.spec).unwrap_or(json!(null));
    let reason = match &rec.state {
        JobState::Failed { reason } => json!(reason),
        _ => json!(null),
    };
    Ok(Json(json!({
        "id": id,
        "state": rec.state.name(),
        "reason": reason,
        "tasks_done": rec.tasks_done,
        "tasks_total": rec.tasks_total,
        "shards": rec.pins.iter().map(|p| json!({"shard": p.shard, "index": p.index, "keys": p.keys})).collect::<Vec<_>>(),
        "keys_scanned": rec.keys_scanned,
        "submitted_ms": rec.submitted_ms,
        "ended_ms": rec.ended_ms,
        "epoch": rec.epoch,
        "stream_last": rec.stream_last.to_string(),
        "spec": spec,
    }))
    .into_response())
}

/// `GET /v1/jobs/{id}/result`: the rows; 409 while the job has not ended done.
pub(super) async fn result(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    match node.job_result(id.as_bytes()).await? {
        None => Err(not_found(&id)),
        Some(Err(state)) => Err(ApiError::Http(
            StatusCode::CONFLICT,
            "not_ready",
            format!(
                "the job is {}: its result is read once it is done",
                state.name()
            ),
        )),
        Some(Ok(rows)) => {
            // The rows as stored (already JSON), in a body built around them.
            let mut body = json!({"id": id, "complete": true}).to_string().into_bytes();
            body.pop();
            body.extend_from_slice(b",\"rows\":");
            body.extend_from_slice(&rows);
            body.push(b'}');
            Ok((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response())
        }
    }
}

/// `DELETE /v1/jobs/{id}`: cancels it (`cancelled`: whether it was running).
pub(super) async fn cancel(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    match node.job_cancel(id.as_bytes()).await.map_err(refusal)? {
        None => Err(not_found(&id)),
        Some(was_running) => Ok(Json(json!({"id": id, "cancelled": was_running})).into_response()),
    }
}
