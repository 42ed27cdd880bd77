//! Jobs over HTTP (issue 15, `node/jobs.rs`): `POST /v1/jobs` (the spec as the body),
//! `GET /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/result`,
//! `GET /v1/jobs/{id}/events` (its stream as SSE or NDJSON), `DELETE /v1/jobs/{id}`;
//! Lua libraries (`node/job_library.rs`): `PUT /v1/jobs/libraries/{name}` (the code as the
//! body; `?replace=true` to replace one; a body without the `#!lua name=` line gets it from
//! the path), `GET /v1/jobs/libraries`, `GET` and `DELETE /v1/jobs/libraries/{name}`.

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
    // The newest entry of its stream (progress, a partial result, the final one).
    let latest = node
        .job_stream(id.as_bytes(), rec.stream_last.predecessor(), 1)
        .await?
        .and_then(|page| page.first().and_then(event_json))
        .map_or(json!(null), |(_, _, v)| v);
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
        "latest": latest,
    }))
    .into_response())
}

/// `GET /v1/jobs/{id}/result`: the rows; 409 while the job has not ended done.
pub(super) async fn result(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult {
    match node.job_result(id.as_bytes()).await? {
        None => Err(not_found(&id)),
        Some(Err(JobState::Failed { reason })) => Err(ApiError::Http(
            StatusCode::GONE,
            "job_failed",
            format!("the job failed, it has no result: {reason}"),
        )),
        Some(Err(JobState::Cancelled)) => Err(ApiError::Http(
            StatusCode::GONE,
            "job_cancelled",
            "the job was cancelled, it has no result".into(),
        )),
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

/// Query of `GET /v1/jobs/{id}/events`.
#[derive(serde::Deserialize)]
pub(super) struct EventsQuery {
    after: Option<String>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

/// Entries one page reads, and the longest NDJSON long-poll.
const EVENTS_PAGE_MAX: usize = 1_000;
const EVENTS_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a stream of a running job looks for new entries.
const EVENTS_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// A job stream entry as (its ID, its type, JSON): fields as strings, `result` as the JSON it
/// holds.
fn event_json(entry: &capdb_types::Reply) -> Option<(String, String, serde_json::Value)> {
    use capdb_types::Reply;
    let Reply::Array(pair) = entry else {
        return None;
    };
    let [Reply::Bulk(id), Reply::Array(fields)] = pair.as_slice() else {
        return None;
    };
    let id = String::from_utf8_lossy(id).into_owned();
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), json!(id));
    let mut kind = String::from("message");
    for f in fields.chunks(2) {
        let [Reply::Bulk(name), Reply::Bulk(value)] = f else {
            continue;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let text = String::from_utf8_lossy(value).into_owned();
        if name == "type" {
            kind = text.clone();
        }
        let v = if name == "result" {
            serde_json::from_str(&text).unwrap_or(json!(text))
        } else {
            json!(text)
        };
        obj.insert(name, v);
    }
    Some((id, kind, serde_json::Value::Object(obj)))
}

fn parse_after(text: Option<&str>) -> Result<capdb_types::changes::StreamId, ApiError> {
    use capdb_types::changes::StreamId;
    match text {
        None | Some("0") | Some("-") => Ok(StreamId::MIN),
        Some(t) => StreamId::parse_with(t.as_bytes(), 0).map_err(ApiError::from),
    }
}

/// `GET /v1/jobs/{id}/events`: the job's stream (`__job:<id>`). With `Accept:
/// text/event-stream`, Server-Sent Events (`event:` the entry's type, `id:` its stream ID,
/// `Last-Event-ID` resumes), ending after the job's closing entry; otherwise NDJSON after
/// `after`, at most `limit`, long-polling up to `wait_ms` when there is none.
pub(super) async fn events(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    let limit = query.limit.unwrap_or(EVENTS_PAGE_MAX);
    if !(1..=EVENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "limit must be 1 to {EVENTS_PAGE_MAX}"
        ))));
    }
    let sse = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let resume = if sse {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .or(query.after.as_deref())
    } else {
        query.after.as_deref()
    };
    let after = parse_after(resume)?;
    // The first page now: an unknown job is a 404, not an empty stream.
    let first = node
        .job_stream(id.as_bytes(), after, limit)
        .await?
        .ok_or_else(|| not_found(&id))?;
    if sse {
        struct St {
            node: Arc<Node>,
            id: String,
            after: capdb_types::changes::StreamId,
            pending: std::collections::VecDeque<capdb_types::Reply>,
            closed: bool,
        }
        let st = St {
            node,
            id,
            after,
            pending: first.into(),
            closed: false,
        };
        let stream = futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(entry) = st.pending.pop_front() {
                    let Some((eid, kind, data)) = event_json(&entry) else {
                        continue;
                    };
                    if let Ok(p) = capdb_types::changes::StreamId::parse_with(eid.as_bytes(), 0) {
                        st.after = p;
                    }
                    st.closed = matches!(kind.as_str(), "final" | "error" | "cancelled");
                    let event = Event::default().id(eid).event(kind).data(data.to_string());
                    return Some((Ok::<Event, std::convert::Infallible>(event), st));
                }
                // After the closing entry, and when the node stops, the stream ends; so does a
                // stream resumed at or past the end of an ended job.
                if st.closed || st.node.is_shutting_down() {
                    return None;
                }
                if let Ok(Some(rec)) = st.node.job_record(st.id.as_bytes()).await
                    && rec.state.has_ended()
                    && st.after >= rec.stream_last
                {
                    return None;
                }
                tokio::time::sleep(EVENTS_POLL).await;
                match st
                    .node
                    .job_stream(st.id.as_bytes(), st.after, EVENTS_PAGE_MAX)
                    .await
                {
                    Ok(Some(page)) => st.pending.extend(page),
                    // The job was forgotten, or the read failed: the client resumes with its
                    // last ID.
                    Ok(None) | Err(_) => return None,
                }
            }
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
            .into_response());
    }
    let until = tokio::time::Instant::now()
        + std::time::Duration::from_millis(query.wait_ms.unwrap_or(0)).min(EVENTS_WAIT_MAX);
    let mut entries = first;
    while entries.is_empty() && tokio::time::Instant::now() < until && !node.is_shutting_down() {
        tokio::time::sleep(EVENTS_POLL).await;
        entries = node
            .job_stream(id.as_bytes(), after, limit)
            .await?
            .ok_or_else(|| not_found(&id))?;
    }
    let mut body = String::new();
    for e in &entries {
        if let Some((_, _, json)) = event_json(e) {
            body.push_str(&json.to_string());
            body.push('\n');
        }
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
pub(super) struct LoadQuery {
    replace: Option<bool>,
}

/// What a refused library load means over HTTP: 409 for a name taken, 400 for bad code.
fn library_refusal(e: Error) -> ApiError {
    match &e {
        Error::Command(line) if line.contains("already exists") => {
            ApiError::Http(StatusCode::CONFLICT, "library_exists", line.clone())
        }
        Error::Command(line) if line.starts_with("ERR") => {
            ApiError::Http(StatusCode::BAD_REQUEST, "bad_library", line.clone())
        }
        _ => ApiError::from(e),
    }
}

/// `PUT /v1/jobs/libraries/{name}`: 201 `{"library", "functions"}`.
pub(super) async fn library_load(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<LoadQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    let body = body.map_err(|e| ApiError::from(Error::InvalidInput(e.to_string())))?;
    let code = if body.starts_with(b"#!") {
        body.to_vec()
    } else {
        let mut c = format!("#!lua name={name}\n").into_bytes();
        c.extend_from_slice(&body);
        c
    };
    let named = crate::node::job_library::library_name(&code).map_err(library_refusal)?;
    if named != name {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "the code names itself '{named}', the path '{name}'"
        ))));
    }
    let loaded = node
        .job_library_load(&code, q.replace.unwrap_or(false))
        .await
        .map_err(library_refusal)?;
    let functions = node
        .job_libraries()
        .await?
        .into_iter()
        .find(|l| l.name == loaded)
        .map(|l| l.functions)
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(json!({"library": loaded, "functions": functions})),
    )
        .into_response())
}

/// `GET /v1/jobs/libraries`: `{"libraries": [{"name", "functions", "bytes"}]}`.
pub(super) async fn libraries(State(node): State<Arc<Node>>) -> ApiResult {
    let libs: Vec<_> = node
        .job_libraries()
        .await?
        .into_iter()
        .map(|l| json!({"name": l.name, "functions": l.functions, "bytes": l.code.len()}))
        .collect();
    Ok(Json(json!({"libraries": libs})).into_response())
}

/// `GET /v1/jobs/libraries/{name}`: the code as loaded (`text/x-lua`), or 404.
pub(super) async fn library(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
    match node
        .job_libraries()
        .await?
        .into_iter()
        .find(|l| l.name == name)
    {
        Some(l) => Ok((
            [(axum::http::header::CONTENT_TYPE, "text/x-lua")],
            l.code.to_vec(),
        )
            .into_response()),
        None => Err(ApiError::Http(
            StatusCode::NOT_FOUND,
            "library_not_found",
            format!("no library '{name}'"),
        )),
    }
}

/// `DELETE /v1/jobs/libraries/{name}`: `{"library", "deleted": true}`, or 404 when there
/// was none.
pub(super) async fn library_delete(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult {
    if node.job_library_delete(&name).await? {
        Ok(Json(json!({"library": name, "deleted": true})).into_response())
    } else {
        Err(ApiError::Http(
            StatusCode::NOT_FOUND,
            "library_not_found",
            format!("no library '{name}'"),
        ))
    }
}
