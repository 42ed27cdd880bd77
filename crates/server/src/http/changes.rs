//! `GET /v1/changes/{keyspace}/{shard}`: a shard's change stream over HTTP (issue 14), the same
//! events and IDs as `XRANGE __changes:<keyspace>#<shard>`.
//!
//! - `Accept: text/event-stream`: Server-Sent Events, one event per change (`id:` its stream
//!   ID, `data:` its JSON), kept open and fed as the shard applies changes; a client that
//!   reconnects with `Last-Event-ID` resumes right after that ID. A comment line every 15 s
//!   keeps idle connections open.
//! - Otherwise NDJSON: one JSON object per line, at most `limit` (default 1,000) events after
//!   `after` (default: from the start); `wait_ms` (≤ 30,000) long-polls when there are none.
//!
//! Pull only: each step reads one bounded page from storage (`Keyspace::changes_read`: at most
//! 1,000 events and about 16 MiB), so a slow client costs the server its position and one page
//! at most. Streams and long-polls end when the node shuts down.
//! Keys and values are JSON strings when UTF-8, else `<field>_hex`; a command's arguments are
//! an `args` array (and other changed keys `also`), each a string or `{"hex": ...}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use capdb_types::changes::StreamId;
use capdb_types::{Error, Reply};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use super::{ApiError, ApiResult};
use crate::node::{Consistency, Keyspace, Node};

/// Events one NDJSON answer holds at most, and one SSE step reads.
pub const CHANGES_PAGE_MAX: usize = 1_000;
/// Longest long-poll of an NDJSON request.
pub const CHANGES_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long an SSE stream waits for the shard to apply something before it reads anyway.
const SSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
pub(super) struct ChangesQuery {
    after: Option<String>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

/// One stream entry (`[id, [field, value, ...]]`) as a JSON object; repeated fields (`arg`,
/// `also`) become arrays (`args`, `also`).
fn entry_json(entry: &Reply) -> Option<(String, Json)> {
    let Reply::Array(pair) = entry else {
        return None;
    };
    let [Reply::Bulk(id), Reply::Array(fields)] = pair.as_slice() else {
        return None;
    };
    let id = String::from_utf8_lossy(id).into_owned();
    let mut obj = Map::new();
    obj.insert("id".into(), Json::String(id.clone()));
    let (mut args, mut also) = (Vec::new(), Vec::new());
    for f in fields.chunks(2) {
        let [Reply::Bulk(name), Reply::Bulk(value)] = f else {
            continue;
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let (text, hex) = match std::str::from_utf8(value) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(value.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            ),
        };
        match (name.as_str(), text, hex) {
            ("arg", Some(t), _) => args.push(Json::String(t)),
            ("arg", None, Some(h)) => args.push(serde_json::json!({ "hex": h })),
            ("also", Some(t), _) => also.push(Json::String(t)),
            ("also", None, Some(h)) => also.push(serde_json::json!({ "hex": h })),
            (_, Some(t), _) => {
                obj.insert(name, Json::String(t));
            }
            (_, None, Some(h)) => {
                obj.insert(format!("{name}_hex"), Json::String(h));
            }
            _ => {}
        }
    }
    if !args.is_empty() {
        obj.insert("args".into(), Json::Array(args));
    }
    if !also.is_empty() {
        obj.insert("also".into(), Json::Array(also));
    }
    Some((id, Json::Object(obj)))
}

fn parse_after(text: Option<&str>) -> Result<StreamId, ApiError> {
    match text {
        None | Some("0") | Some("-") => Ok(StreamId::MIN),
        Some(t) => StreamId::parse_with(t.as_bytes(), 0).map_err(ApiError::from),
    }
}

/// Reads the events after `after` (exclusive); an error when the keyspace's changes are off.
async fn page(
    ks: &Keyspace,
    shard: u32,
    after: StreamId,
    limit: usize,
) -> Result<Vec<Reply>, Error> {
    let from = if after == StreamId::MIN {
        StreamId::MIN
    } else {
        after.successor()
    };
    let page = ks
        .changes_read(
            shard,
            (from, StreamId::MAX),
            limit,
            false,
            capdb_types::unix_now_ms(),
            Consistency::default(),
        )
        .await?;
    if !page.on && page.events == 0 {
        return Err(Error::InvalidInput(format!(
            "changes of keyspace '{}' are off (CHANGES CONFIG {} on)",
            ks.spec.name, ks.spec.name
        )));
    }
    Ok(page.entries)
}

pub(super) async fn changes(
    State(node): State<Arc<Node>>,
    Path((keyspace, shard)): Path<(String, u32)>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::from(Error::InvalidInput(e.body_text())))?;
    let ks = node.keyspace(&keyspace)?;
    ks.check_live()?;
    answer(node, ks, shard, headers, query)
        .await
        .map_err(history_lost)
}

/// `HISTORYLOST` (the position went with the retention) is HTTP 410 Gone.
fn history_lost(e: ApiError) -> ApiError {
    match e {
        ApiError::Db(Error::Command(line)) if line.starts_with("HISTORYLOST ") => ApiError::Http(
            StatusCode::GONE,
            "history_lost",
            line["HISTORYLOST ".len()..].to_string(),
        ),
        other => other,
    }
}

async fn answer(
    node: Arc<Node>,
    ks: Arc<Keyspace>,
    shard: u32,
    headers: HeaderMap,
    query: ChangesQuery,
) -> ApiResult {
    let limit = query.limit.unwrap_or(CHANGES_PAGE_MAX);
    if !(1..=CHANGES_PAGE_MAX).contains(&limit) {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "limit must be 1 to {CHANGES_PAGE_MAX}"
        ))));
    }
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if sse {
        let resume = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .or(query.after.as_deref());
        let after = parse_after(resume)?;
        // The first page now, so that a bad request (changes off, no such shard) is an HTTP
        // error rather than an empty stream.
        let first = page(&ks, shard, after, CHANGES_PAGE_MAX).await?;
        return Ok(sse_stream(node.clone(), ks, shard, after, first).into_response());
    }
    let after = parse_after(query.after.as_deref())?;
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0)).min(CHANGES_WAIT_MAX);
    let until = tokio::time::Instant::now() + wait;
    let entries = loop {
        let mark = ks.changes_mark(shard);
        let entries = page(&ks, shard, after, limit).await?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if !entries.is_empty() || left.is_zero() || node.is_shutting_down() {
            break entries;
        }
        ks.wait_changes(shard, mark, left.min(SSE_WAIT)).await;
    };
    let mut body = String::new();
    for e in &entries {
        if let Some((_, json)) = entry_json(e) {
            body.push_str(&json.to_string());
            body.push('\n');
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// An SSE stream from `after`, starting with `first` (already read).
fn sse_stream(
    node: Arc<Node>,
    ks: Arc<Keyspace>,
    shard: u32,
    after: StreamId,
    first: Vec<Reply>,
) -> Response {
    struct State {
        node: Arc<Node>,
        ks: Arc<Keyspace>,
        shard: u32,
        after: StreamId,
        pending: std::collections::VecDeque<Reply>,
        failed: bool,
    }
    let state = State {
        node,
        ks,
        shard,
        after,
        pending: first.into(),
        failed: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        // A node shutting down ends its streams (clients reconnect elsewhere with their
        // last ID) rather than holding the shutdown up.
        if st.failed || st.node.is_shutting_down() {
            return None;
        }
        loop {
            if let Some(entry) = st.pending.pop_front() {
                let Some((id, json)) = entry_json(&entry) else {
                    continue;
                };
                if let Ok(parsed) = StreamId::parse_with(id.as_bytes(), 0) {
                    st.after = parsed;
                }
                let event = Event::default().id(id).data(json.to_string());
                return Some((Ok::<Event, std::convert::Infallible>(event), st));
            }
            let mark = st.ks.changes_mark(st.shard);
            match page(&st.ks, st.shard, st.after, CHANGES_PAGE_MAX).await {
                Ok(entries) if !entries.is_empty() => st.pending = entries.into(),
                Ok(_) => {
                    st.ks.wait_changes(st.shard, mark, SSE_WAIT).await;
                    if st.node.is_shutting_down() {
                        return None;
                    }
                }
                Err(e) => {
                    // Told once, as an `error` event; the client reconnects from its last ID.
                    st.failed = true;
                    let event = Event::default()
                        .event("error")
                        .data(serde_json::json!({"error": e.to_string()}).to_string());
                    return Some((Ok(event), st));
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
