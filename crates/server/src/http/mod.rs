//! The HTTP/JSON API, health checks and Prometheus metrics.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/kv/{keyspace}/{key}` | the value as JSON (`?raw=true` or `Accept: application/octet-stream`: the bytes) |
//! | `PUT /v1/kv/{keyspace}/{key}` | body = the value's bytes; `?ttl_ms=N`, `?if=absent|present` |
//! | `DELETE /v1/kv/{keyspace}/{key}` | `{"deleted": bool}` |
//! | `GET /v1/kv/{keyspace}?prefix=&start=&end=&limit=&cursor=` | ordered range scan, paged by an opaque cursor |
//! | `GET/POST /v1/keyspaces`, `GET/DELETE /v1/keyspaces/{name}` | keyspace administration |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | liveness, readiness, metrics (never need auth) |
//!
//! Keys in paths are percent-decoded and may contain `/`. Keys and values are returned as
//! `key`/`value` strings when they are UTF-8, otherwise as `key_hex`/`value_hex`.
//!
//! Errors are JSON `{"error": {"code": "<stable code>", "message": "..."}}` with a status chosen
//! by what the caller must do (see `capdb_types::error`). When a password is configured, `/v1`
//! routes need `Authorization: Bearer <password>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use capdb_types::limits::{SCAN_COUNT_MAX, check_key, check_value};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, EvictionPolicy, KeyspaceName, KeyspaceSpec, Mode, Mutation, Reply};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use crate::node::Consistency;
use crate::node::{Keyspace, Node, ScanPosition};
use capdb_types::ReadMode;

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
            Error::InvalidInput(_) | Error::NotAnInteger | Error::Overflow => {
                StatusCode::BAD_REQUEST
            }
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::KeyspaceNotFound(_) => StatusCode::NOT_FOUND,
            Error::KeyspaceExists(_) => StatusCode::CONFLICT,
            Error::OutOfMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Unavailable(_) | Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
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
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/partition", axum::routing::post(set_partition))
        .route(
            "/v1/cluster/nodes/{id}/remove",
            axum::routing::post(remove_node),
        )
        .route("/v1/cluster/step-down", axum::routing::post(step_down))
        .route("/v1/cluster/reconcile-report", get(reconcile_report))
        .route("/v1/keyspaces/{name}/digest", get(keyspace_digest))
        .route("/v1/debug/clock", get(get_clock).post(set_clock))
        .route(
            "/v1/debug/lose-write-answers",
            axum::routing::post(lose_write_answers),
        )
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

async fn list_keyspaces(State(node): State<Arc<Node>>) -> Json<Json_> {
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

async fn create_keyspace(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: CreateKeyspace = json_body(body)?;
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

async fn describe_keyspace(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
    Ok(Json(spec_json(&*node.keyspace(&name)?).await).into_response())
}

async fn drop_keyspace(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
    node.drop_keyspace(&name).await?;
    Ok(Json(json!({"dropped": name})).into_response())
}

/// `"key": "..."` when UTF-8, else `"key_hex": "..."`.
fn bytes_field(obj: &mut serde_json::Map<String, Json_>, name: &str, data: &[u8]) {
    match std::str::from_utf8(data) {
        Ok(s) => {
            obj.insert(name.into(), json!(s));
        }
        Err(_) => {
            obj.insert(format!("{name}_hex"), json!(hex(data)));
        }
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn entry_json(key: &[u8], v: &capdb_types::Value, now: u64) -> Json_ {
    let mut obj = serde_json::Map::new();
    bytes_field(&mut obj, "key", key);
    bytes_field(&mut obj, "value", &v.data);
    obj.insert(
        "ttl_ms".into(),
        json!(v.header.expire_at_ms.map(|at| at.saturating_sub(now))),
    );
    obj.insert("timestamp".into(), json!(v.header.timestamp.to_string()));
    Json_::Object(obj)
}

#[derive(Deserialize)]
struct GetQuery {
    raw: Option<bool>,
    /// `stale`: read the nearest replica without a linearizability check.
    consistency: Option<String>,
}

/// `?consistency=`: `linearizable` (default) or `stale` for `cp` reads; `one` (default),
/// `quorum` or `all` for `ap` reads and writes. `stale` also reads `ap` at `one`.
fn read_mode(consistency: Option<&str>) -> Result<Consistency, ApiError> {
    let d = Consistency::default();
    match consistency {
        None | Some("linearizable") => Ok(d),
        Some("stale") => Ok(Consistency {
            cp_read: ReadMode::Stale,
            ap_read: capdb_ap::Level::One,
            ..d
        }),
        Some(level @ ("one" | "quorum" | "all")) => {
            let l: capdb_ap::Level = level.parse()?;
            Ok(Consistency {
                ap_read: l,
                ap_write: l,
                ..d
            })
        }
        Some(other) => Err(ApiError(Error::InvalidInput(format!(
            "consistency={other}: expected linearizable (default) or stale for cp keyspaces, one (default), quorum or all for ap keyspaces"
        )))),
    }
}

async fn get_key(
    State(node): State<Arc<Node>>,
    Path((keyspace, key)): Path<(String, String)>,
    Query(q): Query<GetQuery>,
    headers: HeaderMap,
) -> ApiResult {
    check_key(key.as_bytes())?;
    let ks = node.keyspace(&keyspace)?;
    let now = capdb_types::unix_now_ms();
    let mode = read_mode(q.consistency.as_deref())?;
    let Some(v) = ks.get(key.as_bytes(), now, mode).await? else {
        return Ok(api_error(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("key '{key}' does not exist in keyspace '{keyspace}'"),
        ));
    };
    let raw = q.raw.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.starts_with("application/octet-stream"));
    if raw {
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v.data).into_response());
    }
    let mut body = entry_json(key.as_bytes(), &v, now);
    body["keyspace"] = json!(keyspace);
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    ttl_ms: Option<u64>,
    #[serde(rename = "if")]
    condition: Option<String>,
    /// `ap` keyspaces: `one` (default), `quorum` or `all`.
    consistency: Option<String>,
}

async fn put_key(
    State(node): State<Arc<Node>>,
    Path((keyspace, key)): Path<(String, String)>,
    query: Result<Query<PutQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError(Error::InvalidInput(e.body_text())))?;
    let body = body.map_err(bytes_rejection)?;
    check_key(key.as_bytes())?;
    check_value(&body, node.config.limits.value_bytes_max)?;
    let condition = match q.condition.as_deref() {
        None => Condition::Always,
        Some("absent") => Condition::IfAbsent,
        Some("present") => Condition::IfPresent,
        Some(other) => {
            return Err(ApiError(Error::InvalidInput(format!(
                "if={other}: expected 'absent' or 'present'"
            ))));
        }
    };
    let now = capdb_types::unix_now_ms();
    let expiry = match q.ttl_ms {
        None => ExpiryUpdate::Clear,
        Some(0) => {
            return Err(ApiError(Error::InvalidInput(
                "ttl_ms must be positive".into(),
            )));
        }
        Some(ms) => ExpiryUpdate::At(now.saturating_add(ms)),
    };
    let ks = node.keyspace(&keyspace)?;
    let m = Mutation::Set {
        key: Bytes::from(key.into_bytes()),
        value: body,
        condition,
        expiry,
        return_old: false,
    };
    let c = read_mode(q.consistency.as_deref())?;
    let reply = ks
        .apply(vec![m], now, c)
        .await?
        .pop()
        .expect("one reply per mutation")?;
    Ok(Json(json!({"written": reply == Reply::Ok})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    /// `ap` keyspaces: `one` (default), `quorum` or `all`.
    consistency: Option<String>,
}

async fn delete_key(
    State(node): State<Arc<Node>>,
    Path((keyspace, key)): Path<(String, String)>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError(Error::InvalidInput(e.body_text())))?;
    let c = read_mode(q.consistency.as_deref())?;
    check_key(key.as_bytes())?;
    let ks = node.keyspace(&keyspace)?;
    let m = Mutation::Delete {
        key: Bytes::from(key.into_bytes()),
    };
    let reply = ks
        .apply(vec![m], capdb_types::unix_now_ms(), c)
        .await?
        .pop()
        .expect("one reply per mutation")?;
    Ok(Json(json!({"deleted": reply == Reply::Integer(1)})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanQuery {
    prefix: Option<String>,
    /// First key to include.
    start: Option<String>,
    /// First key to exclude.
    end: Option<String>,
    limit: Option<usize>,
    /// Opaque: the `cursor` of the previous page.
    cursor: Option<String>,
    consistency: Option<String>,
}

/// Cursor text: hex of `[shard u32 big-endian][last key]`.
fn encode_cursor(pos: &ScanPosition) -> String {
    let mut raw = pos.shard.to_be_bytes().to_vec();
    raw.extend_from_slice(pos.after.as_deref().unwrap_or_default());
    hex(&raw)
}

fn decode_cursor(text: &str) -> Option<ScanPosition> {
    let raw = unhex(text)?;
    if raw.len() < 4 {
        return None;
    }
    let shard = u32::from_be_bytes(raw[..4].try_into().ok()?);
    let after = (raw.len() > 4).then(|| Bytes::copy_from_slice(&raw[4..]));
    Some(ScanPosition { shard, after })
}

async fn scan(
    State(node): State<Arc<Node>>,
    Path(keyspace): Path<String>,
    query: Result<Query<ScanQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError(Error::InvalidInput(e.body_text())))?;
    let ks = node.keyspace(&keyspace)?;
    ks.check_live()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=SCAN_COUNT_MAX).contains(&limit) {
        return Err(ApiError(Error::InvalidInput(format!(
            "limit must be 1 to {SCAN_COUNT_MAX}"
        ))));
    }
    let mode = read_mode(q.consistency.as_deref())?;
    let pos = match &q.cursor {
        Some(c) => decode_cursor(c).ok_or_else(|| Error::InvalidInput("invalid cursor".into()))?,
        None => ScanPosition::default(),
    };
    let now = capdb_types::unix_now_ms();
    let mut entries = Vec::new();
    if q.cursor.is_none()
        && let Some(start) = &q.start
    {
        // Inclusive start: the start key itself, then everything after it.
        if let Some(v) = ks.get(start.as_bytes(), now, mode).await?
            && q.prefix
                .as_ref()
                .is_none_or(|p| start.starts_with(p.as_str()))
            && q.end.as_ref().is_none_or(|e| start.as_str() < e.as_str())
        {
            entries.push(entry_json(start.as_bytes(), &v, now));
        }
    }
    // Scans are "after a key" (exclusive); an inclusive `start` is its own first entry above.
    let floor = q
        .start
        .as_ref()
        .map(|s| Bytes::from(s.clone().into_bytes()));
    let (page, next) = ks
        .scan(
            pos,
            floor,
            q.prefix.map(|p| Bytes::from(p.into_bytes())),
            q.end.map(|e| Bytes::from(e.into_bytes())),
            limit - entries.len().min(limit - 1),
            now,
            mode,
        )
        .await?;
    entries.extend(page.iter().map(|(k, v)| entry_json(k, v, now)));
    Ok(Json(json!({
        "keyspace": keyspace,
        "entries": entries,
        "cursor": next.as_ref().map(encode_cursor),
    }))
    .into_response())
}

/// Nodes (with health and labels), and every shard with its leader and replication lag,
/// gathered from every node (each answers within a second or is reported unhealthy).
async fn cluster_status(State(node): State<Arc<Node>>) -> ApiResult {
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
async fn set_partition(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body: PartitionBody = json_body(body)?;
    node.set_partition(body.blocked.iter().copied().collect());
    tracing::warn!(blocked = ?body.blocked, "peer traffic filter changed");
    Ok(Json(json!({"blocked": body.blocked})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    offset_ms: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoseAnswersBody {
    count: u64,
}

/// Drops the answers of the next `count` writes this node forwards to another node's leader,
/// after the leader applied them, as a broken connection would (exactly-once tests).
async fn lose_write_answers(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    require_fault_injection(&node)?;
    let body: LoseAnswersBody = json_body(body)?;
    node.groups.debug_lose_write_answers(body.count);
    tracing::warn!(
        count = body.count,
        "fault injection: answers of forwarded writes will be dropped"
    );
    Ok(Json(json!({"count": body.count})).into_response())
}

/// Fault injection routes exist only on nodes started with `--debug-fault-injection`.
fn require_fault_injection(node: &Node) -> Result<(), ApiError> {
    if node.config.cluster.debug.fault_injection {
        Ok(())
    } else {
        Err(ApiError(Error::InvalidInput(
            "fault injection is disabled; start the node with --debug-fault-injection (testing only)"
                .into(),
        )))
    }
}

async fn get_clock(State(node): State<Arc<Node>>) -> ApiResult {
    require_fault_injection(&node)?;
    Ok(Json(
        json!({"offset_ms": capdb_types::clock_offset_ms(), "now_ms": capdb_types::unix_now_ms()}),
    )
    .into_response())
}

/// Shifts this node's wall clock by `offset_ms` (HLC timestamps and TTL deadlines; Raft timing
/// runs on the monotonic clock). Bounded to a day either way.
async fn set_clock(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    require_fault_injection(&node)?;
    let body: ClockBody = json_body(body)?;
    if body.offset_ms.unsigned_abs() > 86_400_000 {
        return Err(ApiError(Error::InvalidInput(
            "offset_ms must be within one day (86400000) either way".into(),
        )));
    }
    capdb_types::set_clock_offset_ms(body.offset_ms);
    tracing::warn!(
        offset_ms = body.offset_ms,
        "fault injection: wall clock offset changed"
    );
    Ok(Json(json!({"offset_ms": body.offset_ms})).into_response())
}

/// What anti-entropy, read repair and hinted handoff reconciled, per `ap` keyspace, summed
/// over every node that answered, with each node's episodes (divergence seen until replicas
/// were in sync again, and how long that took).
async fn reconcile_report(State(node): State<Arc<Node>>) -> ApiResult {
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

/// This node's replica digest of an `ap` keyspace: one hash per shard it holds (equal hashes on
/// two nodes mean their replicas of that shard hold the same versions).
async fn keyspace_digest(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult {
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

/// Drains a node: its replicas move elsewhere, then it leaves the map.
async fn remove_node(State(node): State<Arc<Node>>, Path(id): Path<u64>) -> ApiResult {
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
async fn step_down(State(node): State<Arc<Node>>) -> ApiResult {
    node.groups.step_down_everywhere().await;
    Ok(Json(json!({"stepped_down": node.id()})).into_response())
}
