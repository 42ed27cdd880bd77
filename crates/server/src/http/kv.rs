//! Keys and values: get, put and delete one key, and ordered range scans paged by an opaque
//! cursor. `?consistency=` chooses how strongly a request is confirmed ([`read_mode`]).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use capdb_types::limits::{SCAN_COUNT_MAX, check_key, check_value};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Mutation, ReadMode, Reply};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiResult, api_error, bytes_rejection};
use crate::node::{Consistency, Node, ScanPosition};

/// `"key": "..."` when UTF-8, else `"key_hex": "..."`.
pub(super) fn bytes_field(obj: &mut serde_json::Map<String, Json_>, name: &str, data: &[u8]) {
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

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
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
    if v.is_string() {
        bytes_field(&mut obj, "value", &v.data);
    } else {
        // A hash, list, set or sorted set: read it with its own commands (RESP).
        obj.insert("value".into(), Json_::Null);
    }
    obj.insert("type".into(), json!(v.header.kind.type_name()));
    obj.insert(
        "ttl_ms".into(),
        json!(v.header.expire_at_ms.map(|at| at.saturating_sub(now))),
    );
    obj.insert("timestamp".into(), json!(v.header.timestamp.to_string()));
    Json_::Object(obj)
}

#[derive(Deserialize)]
pub(super) struct GetQuery {
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

pub(super) async fn get_key(
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
    if !v.is_string() {
        return Err(capdb_types::Error::WrongType.into());
    }
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
pub(super) struct PutQuery {
    ttl_ms: Option<u64>,
    #[serde(rename = "if")]
    condition: Option<String>,
    /// `ap` keyspaces: `one` (default), `quorum` or `all`.
    consistency: Option<String>,
}

pub(super) async fn put_key(
    State(node): State<Arc<Node>>,
    Path((keyspace, key)): Path<(String, String)>,
    query: Result<Query<PutQuery>, QueryRejection>,
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
pub(super) struct DeleteQuery {
    /// `ap` keyspaces: `one` (default), `quorum` or `all`.
    consistency: Option<String>,
}

pub(super) async fn delete_key(
    State(node): State<Arc<Node>>,
    Path((keyspace, key)): Path<(String, String)>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
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
pub(super) struct ScanQuery {
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

pub(super) async fn scan(
    State(node): State<Arc<Node>>,
    Path(keyspace): Path<String>,
    query: Result<Query<ScanQuery>, QueryRejection>,
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
