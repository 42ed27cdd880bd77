//! The HTTP/JSON API, health checks and Prometheus metrics.
//!
//! | route | what | file |
//! |---|---|---|
//! | `GET /v1/kv/{keyspace}/{key}` | the value as JSON (`?raw=true` or `Accept: application/octet-stream`: the bytes) | `kv.rs` |
//! | `PUT /v1/kv/{keyspace}/{key}` | body = the value's bytes; `?ttl_ms=N`, `?if=absent\|present` | `kv.rs` |
//! | `DELETE /v1/kv/{keyspace}/{key}` | `{"deleted": bool}` | `kv.rs` |
//! | `GET /v1/kv/{keyspace}?prefix=&start=&end=&limit=&cursor=` | ordered range scan, paged by an opaque cursor | `kv.rs` |
//! | `POST /v1/txn` | guards (value, existence, version) and operations (put, get, delete): all run atomically if every guard holds, else none and the failed guard (`cp`: across shards) | `txn.rs` |
//! | `GET/POST /v1/keyspaces`, `GET/DELETE /v1/keyspaces/{name}` | keyspace administration | `keyspaces.rs` |
//! | `GET /v1/keyspaces/{name}/digest` | this node's digest of an `ap` keyspace, one hash per shard it holds | `keyspaces.rs` |
//! | `GET /v1/cluster` | nodes (health, labels, load) and every shard (leader, term, members, replication lag), asked of every node | `cluster.rs` |
//! | `GET /v1/cluster/reconcile-report` | what anti-entropy, read repair and hinted handoff reconciled, per `ap` keyspace and node | `cluster.rs` |
//! | `POST /v1/cluster/partition` | `{"blocked": [node ids]}`: this node drops traffic to and from them (tests; `[]` heals) | `cluster.rs` |
//! | `POST /v1/cluster/nodes/{id}/remove` | drains a node: its replicas move away, then it leaves the map | `cluster.rs` |
//! | `POST /v1/cluster/step-down` | hands every leadership of this node to other replicas (maintenance, preStop) | `cluster.rs` |
//! | `GET/POST /v1/debug/clock` | this node's wall-clock offset, read or shifted (`--debug-fault-injection` only) | `debug.rs` |
//! | `POST /v1/debug/lose-write-answers` | `{"count": n}`: drops the answers of the next n forwarded writes (`--debug-fault-injection` only) | `debug.rs` |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | liveness, readiness, metrics (never need auth) | this file |
//!
//! Keys in paths are percent-decoded and may contain `/`. Keys and values are returned as
//! `key`/`value` strings when they are UTF-8, otherwise as `key_hex`/`value_hex`.
//!
//! Errors are JSON `{"error": {"code": "<stable code>", "message": "..."}}` with a status chosen
//! by what the caller must do (see `capdb_types::error`). When a password is configured, `/v1`
//! routes need `Authorization: Bearer <password>`.
//!
//! This file holds what every route shares: the router, authentication, per-route metrics, the
//! one mapping from errors to statuses, and JSON body parsing. The handlers live in one file
//! per route family (the table's last column), so each file reads as one part of the API.

mod changes;
mod cluster;
mod debug;
mod jobs;
mod keyspaces;
mod kv;
mod txn;
mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capdb_types::Error;
use serde_json::json;

use crate::node::Node;
use cluster::{cluster_status, reconcile_report, remove_node, set_partition, step_down};
use debug::{get_clock, lose_write_answers, set_clock};
use keyspaces::{
    create_keyspace, describe_keyspace, drop_keyspace, keyspace_digest, list_keyspaces,
};
use kv::{delete_key, get_key, put_key, scan};

/// An error answered as JSON: a database error, or an HTTP-level one (body too large, ...).
pub enum ApiError {
    Db(Error),
    Http(StatusCode, &'static str, String),
}

#[allow(non_snake_case)]
fn ApiError(e: Error) -> ApiError {
    ApiError::Db(e)
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::Db(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = match self {
            ApiError::Db(e) => e,
            ApiError::Http(status, code, message) => return api_error(status, code, message),
        };
        let status = match &e {
            Error::InvalidInput(_) | Error::NotAnInteger | Error::Overflow | Error::Command(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::WrongType => StatusCode::CONFLICT,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::KeyspaceNotFound(_) => StatusCode::NOT_FOUND,
            Error::KeyspaceExists(_) => StatusCode::CONFLICT,
            Error::OutOfMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Unavailable(_) | Error::ShuttingDown | Error::Locked(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Corruption(_) | Error::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // The write may or may not have happened: not 503, which clients retry.
            Error::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        let body = json!({"error": {"code": e.code(), "message": e.to_string(), "retryable": e.is_retryable()}});
        (status, Json(body)).into_response()
    }
}

fn api_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "retryable": false}})),
    )
        .into_response()
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// Builds the router.
pub fn router(node: Arc<Node>) -> Router {
    let body_max = node.config.limits.http_body_bytes_max;
    let v1 = Router::new()
        .route("/v1/keyspaces", get(list_keyspaces).post(create_keyspace))
        .route(
            "/v1/keyspaces/{name}",
            get(describe_keyspace).delete(drop_keyspace),
        )
        .route("/v1/kv/{keyspace}", get(scan))
        .route("/v1/txn", post(txn::txn))
        .route("/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/v1/jobs/libraries", get(jobs::libraries))
        .route(
            "/v1/jobs/libraries/{name}",
            get(jobs::library)
                .put(jobs::library_load)
                .delete(jobs::library_delete),
        )
        .route("/v1/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/v1/jobs/{id}/result", get(jobs::result))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/views/{keyspace}", get(views::list))
        .route(
            "/v1/views/{keyspace}/{name}",
            get(views::get).put(views::create).delete(views::drop),
        )
        .route("/v1/views/{keyspace}/{name}/verify", post(views::verify))
        .route("/v1/changes/{keyspace}", get(changes::merged_changes))
        .route("/v1/changes/{keyspace}/snapshot", get(changes::snapshot))
        .route("/v1/changes/{keyspace}/{shard}", get(changes::changes))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/partition", post(set_partition))
        .route("/v1/cluster/nodes/{id}/remove", post(remove_node))
        .route("/v1/cluster/step-down", post(step_down))
        .route("/v1/cluster/reconcile-report", get(reconcile_report))
        .route("/v1/keyspaces/{name}/digest", get(keyspace_digest))
        .route("/v1/debug/clock", get(get_clock).post(set_clock))
        .route("/v1/debug/lose-write-answers", post(lose_write_answers))
        .route(
            "/v1/kv/{keyspace}/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            node.clone(),
            require_auth,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            api_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see /v1/keyspaces and /v1/kv/{keyspace}/{key}".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(node.clone(), observe))
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(node)
}

/// Records each request's latency under its route template.
async fn observe(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route: &'static str = match req.extensions().get::<MatchedPath>().map(|p| p.as_str()) {
        Some("/v1/keyspaces") => "/v1/keyspaces",
        Some("/v1/keyspaces/{name}") => "/v1/keyspaces/{name}",
        Some("/v1/kv/{keyspace}") => "/v1/kv/{keyspace}",
        Some("/v1/kv/{keyspace}/{*key}") => "/v1/kv/{keyspace}/{key}",
        Some("/v1/changes/{keyspace}") => "/v1/changes/{keyspace}",
        Some("/v1/changes/{keyspace}/{shard}") => "/v1/changes/{keyspace}/{shard}",
        Some("/v1/jobs") => "/v1/jobs",
        Some("/v1/jobs/libraries") => "/v1/jobs/libraries",
        Some("/v1/jobs/libraries/{name}") => "/v1/jobs/libraries/{name}",
        Some("/v1/jobs/{id}") => "/v1/jobs/{id}",
        Some("/v1/jobs/{id}/result") => "/v1/jobs/{id}/result",
        Some("/v1/jobs/{id}/events") => "/v1/jobs/{id}/events",
        Some("/v1/views/{keyspace}") => "/v1/views/{keyspace}",
        Some("/v1/views/{keyspace}/{name}") => "/v1/views/{keyspace}/{name}",
        Some("/v1/views/{keyspace}/{name}/verify") => "/v1/views/{keyspace}/{name}/verify",
        Some("/v1/cluster") => "/v1/cluster",
        Some("/v1/cluster/partition") => "/v1/cluster/partition",
        Some("/v1/cluster/nodes/{id}/remove") => "/v1/cluster/nodes/{id}/remove",
        Some("/v1/cluster/step-down") => "/v1/cluster/step-down",
        Some("/v1/cluster/reconcile-report") => "/v1/cluster/reconcile-report",
        Some("/v1/keyspaces/{name}/digest") => "/v1/keyspaces/{name}/digest",
        Some("/v1/debug/clock") => "/v1/debug/clock",
        Some("/v1/debug/lose-write-answers") => "/v1/debug/lose-write-answers",
        Some("/healthz") => "/healthz",
        Some("/readyz") => "/readyz",
        Some("/metrics") => "/metrics",
        _ => "other",
    };
    let method: &'static str = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    };
    let resp = next.run(req).await;
    node.metrics
        .observe_http(route, method, resp.status().as_u16(), started.elapsed());
    resp
}

async fn require_auth(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &node.config.password {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| {
            g.len() == expected.len()
                && g.bytes()
                    .zip(expected.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0
        });
        if !ok {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server needs 'Authorization: Bearer <password>'".into(),
            );
        }
    }
    next.run(req).await
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        )
            .into_response();
    }
    if !node.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "joining"})),
        )
            .into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let text = node.metrics.render(&node);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Parses a JSON body whatever its content type (`curl -d` sends a form type by default).
fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(bytes_rejection)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError(Error::InvalidInput(format!("invalid JSON body: {e}"))))
}

fn bytes_rejection(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::Http(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "request body over the limit (limits.http_body_bytes_max): {}",
                e.body_text()
            ),
        )
    } else {
        ApiError(Error::InvalidInput(format!(
            "cannot read request body: {}",
            e.body_text()
        )))
    }
}
