//! `GET /v1/changes/{keyspace}/{shard}`: a shard's change stream over HTTP (issue 14), the same
//! events and IDs as `XRANGE __changes:<keyspace>#<shard>`; `GET /v1/changes/{keyspace}`: the
//! keyspace's merged stream (`XRANGE __changes:<keyspace>`, `node/merged.rs`), which also
//! tells where it is resolved: SSE `event: progress` (its `id:` is the resolved ID, so a
//! client resuming from it skips nothing) and an NDJSON `{"progress": id}` line that ends
//! every answer. While idle, an SSE merged stream closes its shards about every second, so
//! the resolved ID advances (an NDJSON long-poll closes only shards that hold events back).
//!
//! - `Accept: text/event-stream`: Server-Sent Events, one event per change (`id:` its stream
//!   ID, `data:` its JSON), kept open and fed as the shard applies changes; a client that
//!   reconnects with `Last-Event-ID` resumes right after that ID. A comment line every 15 s
//!   keeps idle connections open.
//! - Otherwise NDJSON: one JSON object per line, at most `limit` (default 1,000) events after
//!   `after` (default: from the start); `wait_ms` (≤ 30,000) long-polls when there are none.
//!
//! - `prefix=P` (or `prefix_hex=` for any bytes): only the events on keys starting with `P`,
//!   with the same IDs
//!   (`node/prefixed.rs`, like the stream key `__changes:<keyspace>[#<shard>]:P`). A shard's
//!   filtered stream also tells how far it looked (the same progress line and event: nothing
//!   else up to there matches), so a client resuming from it does not scan it again.
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
use crate::node::{Consistency, Keyspace, Node, merged, prefixed};

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
    /// Only events on keys starting with this (`node/prefixed.rs`).
    prefix: Option<String>,
    /// The same, as hex (a prefix that is not UTF-8).
    prefix_hex: Option<String>,
}

/// The key prefix a request names: `prefix` (UTF-8 text) or `prefix_hex` (any bytes), not
/// both.
fn prefix_of(text: Option<String>, hex: Option<String>) -> Result<Option<bytes::Bytes>, ApiError> {
    match (text, hex) {
        (Some(_), Some(_)) => Err(ApiError::from(Error::InvalidInput(
            "give prefix or prefix_hex, not both".into(),
        ))),
        (Some(t), None) => Ok(Some(bytes::Bytes::from(t))),
        (None, Some(h)) => super::kv::unhex(&h)
            .map(|b| Some(bytes::Bytes::from(b)))
            .ok_or_else(|| {
                ApiError::from(Error::InvalidInput(
                    "prefix_hex is not hex (two digits per byte)".into(),
                ))
            }),
        (None, None) => Ok(None),
    }
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

/// What a page read found: entries, and for a merged stream its resolved ID and the shards
/// holding it back.
struct Found {
    entries: Vec<Reply>,
    resolved: Option<StreamId>,
    lagging: Vec<u32>,
    /// What the lagging shards must be closed at.
    newest: capdb_types::Timestamp,
    /// A prefix-filtered shard read: the last ID it looked at.
    scanned: Option<StreamId>,
}

/// Reads the events after `after` (exclusive) of one shard (`Some`) or the merged stream
/// (`None`; `closing`: close idle shards holding events back first); an error when the
/// keyspace's changes are off.
async fn page(
    ks: &Keyspace,
    shard: Option<u32>,
    prefix: Option<&[u8]>,
    after: StreamId,
    limit: usize,
    closing: bool,
) -> Result<Found, Error> {
    let from = if after == StreamId::MIN {
        StreamId::MIN
    } else {
        after.successor()
    };
    let (now_ms, c) = (capdb_types::unix_now_ms(), Consistency::default());
    let (on, events, found) = match shard {
        Some(shard) => {
            let range = (from, StreamId::MAX);
            let (page, scanned) = match prefix {
                Some(p) => {
                    let all = usize::MAX;
                    prefixed::read_shard(ks, shard, p, range, limit, false, all, now_ms, c).await?
                }
                None => (
                    ks.changes_read(shard, range, limit, false, now_ms, c)
                        .await?,
                    None,
                ),
            };
            let found = Found {
                entries: page.entries,
                resolved: None,
                lagging: Vec::new(),
                newest: capdb_types::Timestamp::ZERO,
                scanned,
            };
            (page.on, page.events, found)
        }
        None => {
            let to = StreamId::MAX;
            let page = match prefix {
                Some(p) => {
                    let all = usize::MAX;
                    prefixed::read_merged(ks, p, from, to, limit, closing, all, now_ms, c)
                        .await?
                        .0
                }
                None if closing => merged::read_closing(ks, from, to, limit, now_ms, c).await?,
                None => merged::read(ks, from, to, limit, now_ms, c).await?,
            };
            let found = Found {
                entries: page.entries,
                resolved: Some(page.resolved),
                lagging: page.lagging,
                newest: page.newest,
                scanned: None,
            };
            (page.on, page.events, found)
        }
    };
    if !on && events == 0 {
        return Err(Error::InvalidInput(format!(
            "changes of keyspace '{}' are off (CHANGES CONFIG {} on)",
            ks.spec.name, ks.spec.name
        )));
    }
    Ok(found)
}

/// Where the shards a reader waits on stand here (see [`wait`]).
fn marks(ks: &Keyspace, shard: Option<u32>) -> Vec<(u32, Option<u64>)> {
    let shards: Vec<u32> = match shard {
        Some(s) => vec![s],
        None => (0..ks.shard_count().unwrap_or(0) as u32).collect(),
    };
    shards
        .into_iter()
        .map(|s| (s, ks.changes_mark(s)))
        .collect()
}

/// Waits until one of the shards applied past its mark, or `max`; when events wait on
/// lagging shards of a merged stream, closes those first and waits briefly.
async fn wait(
    ks: &Keyspace,
    marks: &[(u32, Option<u64>)],
    lagging: &[u32],
    newest: capdb_types::Timestamp,
    max: Duration,
) {
    let max = if lagging.is_empty() {
        max
    } else {
        merged::close_shards(ks, lagging, newest, Duration::from_secs(1)).await;
        // Not faster than this while they do not close (a shard without a leader).
        max.min(merged::PROGRESS_GAP * 4)
    };
    if marks.is_empty() {
        tokio::time::sleep(max).await;
        return;
    }
    futures::future::select_all(
        marks
            .iter()
            .map(|(s, mark)| Box::pin(ks.wait_changes(*s, *mark, max))),
    )
    .await;
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
    answer(node, ks, Some(shard), headers, query)
        .await
        .map_err(history_lost)
}

/// `GET /v1/changes/{keyspace}`: the merged stream.
pub(super) async fn merged_changes(
    State(node): State<Arc<Node>>,
    Path(keyspace): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::from(Error::InvalidInput(e.body_text())))?;
    let ks = node.keyspace(&keyspace)?;
    ks.check_live()?;
    if ks.streams_per_node() {
        // This node's own stream (a cache's ring, an ap replica's log), as one shard.
        return answer(node, ks, Some(0), headers, query)
            .await
            .map_err(history_lost);
    }
    if ks.shard_count().is_none() {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "change streams are built for cp and cache keyspaces only so far; '{keyspace}' is not one"
        ))));
    }
    answer(node, ks, None, headers, query)
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
    shard: Option<u32>,
    headers: HeaderMap,
    query: ChangesQuery,
) -> ApiResult {
    let limit = query.limit.unwrap_or(CHANGES_PAGE_MAX);
    let prefix = prefix_of(query.prefix, query.prefix_hex)?;
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
        let first = page(&ks, shard, prefix.as_deref(), after, CHANGES_PAGE_MAX, true).await?;
        return Ok(sse_stream(node.clone(), ks, shard, prefix, after, first).into_response());
    }
    let mut after = parse_after(query.after.as_deref())?;
    let longest = Duration::from_millis(query.wait_ms.unwrap_or(0)).min(CHANGES_WAIT_MAX);
    let until = tokio::time::Instant::now() + longest;
    let mut closing = true;
    let found = loop {
        let marks = marks(&ks, shard);
        let found = page(&ks, shard, prefix.as_deref(), after, limit, closing).await?;
        closing = false;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if !found.entries.is_empty() || left.is_zero() || node.is_shutting_down() {
            break found;
        }
        if let Some(r) = found.resolved.or(found.scanned) {
            after = after.max(r);
        }
        wait(
            &ks,
            &marks,
            &found.lagging,
            found.newest,
            left.min(SSE_WAIT),
        )
        .await;
    };
    let mut body = String::new();
    for e in &found.entries {
        if let Some((_, json)) = entry_json(e) {
            body.push_str(&json.to_string());
            body.push('\n');
        }
    }
    // A merged stream says where it is resolved; a prefix-filtered one how far it looked
    // (nothing else up to there matches): resuming from either skips nothing.
    if let Some(resolved) = found.resolved.or(found.scanned) {
        let resolved = after.max(resolved);
        body.push_str(&serde_json::json!({ "progress": resolved.to_string() }).to_string());
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// An SSE stream from `after`, starting with `first` (already read).
fn sse_stream(
    node: Arc<Node>,
    ks: Arc<Keyspace>,
    shard: Option<u32>,
    prefix: Option<bytes::Bytes>,
    after: StreamId,
    first: Found,
) -> Response {
    struct State {
        node: Arc<Node>,
        ks: Arc<Keyspace>,
        shard: Option<u32>,
        prefix: Option<bytes::Bytes>,
        after: StreamId,
        pending: std::collections::VecDeque<Reply>,
        failed: bool,
        /// Merged stream: the resolved ID last announced, and when idle reads last closed
        /// every shard.
        announced: StreamId,
        closed_at: tokio::time::Instant,
        lagging: Vec<u32>,
        newest: capdb_types::Timestamp,
        resolved: Option<StreamId>,
        /// Where the shards stood before the last page was read, and whether it was empty
        /// (only then does the stream wait before reading again).
        marks: Vec<(u32, Option<u64>)>,
        idle: bool,
    }
    let idle = first.entries.is_empty();
    // After the first read (an apply in between waits out at most one `SSE_WAIT`).
    let first_marks = marks(&ks, shard);
    let state = State {
        node,
        ks,
        shard,
        prefix,
        after,
        pending: first.entries.into(),
        failed: false,
        announced: after,
        closed_at: tokio::time::Instant::now(),
        idle,
        lagging: first.lagging,
        newest: first.newest,
        // A prefix-filtered shard stream announces how far it looked, like a merged one.
        resolved: first.resolved.or(first.scanned),
        marks: first_marks,
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
            // A merged stream announces how far it is resolved, when that moved.
            if let Some(r) = st.resolved.take()
                && r > st.announced
                && r > st.after
            {
                st.announced = r;
                st.after = r;
                let event = Event::default()
                    .event("progress")
                    .id(r.to_string())
                    .data(serde_json::json!({ "progress": r.to_string() }).to_string());
                return Some((Ok::<Event, std::convert::Infallible>(event), st));
            }
            if st.idle {
                let lagging = std::mem::take(&mut st.lagging);
                wait(&st.ks, &st.marks, &lagging, st.newest, SSE_WAIT).await;
                if st.node.is_shutting_down() {
                    return None;
                }
                // Idle: close every shard now and then, so the resolved ID advances.
                let idle_close = st.shard.is_none() && st.closed_at.elapsed() >= SSE_WAIT;
                if idle_close {
                    st.closed_at = tokio::time::Instant::now();
                    let all: Vec<u32> = (0..st.ks.shard_count().unwrap_or(0) as u32).collect();
                    merged::close_shards(&st.ks, &all, capdb_types::Timestamp::ZERO, SSE_WAIT)
                        .await;
                }
            }
            // Taken before the read: an apply after it moves them, so the next wait cannot
            // miss it.
            st.marks = marks(&st.ks, st.shard);
            let prefix = st.prefix.clone();
            match page(
                &st.ks,
                st.shard,
                prefix.as_deref(),
                st.after,
                CHANGES_PAGE_MAX,
                false,
            )
            .await
            {
                Ok(found) => {
                    st.idle = found.entries.is_empty();
                    st.pending = found.entries.into();
                    st.lagging = found.lagging;
                    st.newest = found.newest;
                    st.resolved = found.resolved.or(found.scanned);
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

#[derive(Deserialize)]
pub(super) struct SnapshotQuery {
    prefix: Option<String>,
    prefix_hex: Option<String>,
}

/// `GET /v1/changes/{keyspace}/snapshot[?prefix=P]`: the way back for a reader whose position
/// went with the retention (`node/snapshot.rs`). NDJSON, streamed: one line per live key
/// (`{"key", "type": "string", "value", "expire_at_ms"?}`, or for a collection
/// `{"key", "type", "dump_hex"}`: Redis's DUMP payload, for RESTORE), then the events that
/// came while it was read (as `/v1/changes/{keyspace}` gives them), then
/// `{"resume": "<id>"}`: applying the rows and then the events gives the keyspace as it was
/// at that merged-stream ID; read the stream after it. A failure mid-way ends the body with
/// an `{"error": ...}` line (start over).
pub(super) async fn snapshot(
    State(node): State<Arc<Node>>,
    Path(keyspace): Path<String>,
    query: Result<Query<SnapshotQuery>, QueryRejection>,
) -> ApiResult {
    use crate::node::snapshot::{
        Mark, Replay, replay_from, replay_of, replay_to_at_least, still_held,
    };
    let Query(query) = query.map_err(|e| ApiError::from(Error::InvalidInput(e.body_text())))?;
    let ks = node.keyspace(&keyspace)?;
    ks.check_live()?;
    let Some(shards) = ks.shard_count() else {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "the snapshot way back is built for cp keyspaces; '{keyspace}' streams each node's own changes"
        ))));
    };
    let (now_ms, c) = (capdb_types::unix_now_ms(), Consistency::default());
    let first = merged::read(&ks, StreamId::MAX, StreamId::MAX, 1, now_ms, c).await?;
    if !first.on {
        return Err(ApiError::from(Error::InvalidInput(format!(
            "changes of keyspace '{keyspace}' are off (CHANGES CONFIG {keyspace} on)"
        ))));
    }
    enum Phase {
        Rows {
            shard: u32,
            after: Option<bytes::Bytes>,
        },
        Replay {
            at: StreamId,
            end: StreamId,
        },
        /// Every shard's log still holds what the replay read (checked after it).
        Check(StreamId),
        Resume(StreamId),
        Done,
    }
    struct Snap {
        ks: Arc<Keyspace>,
        node: Arc<Node>,
        prefix: bytes::Bytes,
        shards: u32,
        marks: Vec<Mark>,
        phase: Phase,
    }
    let state = Snap {
        ks,
        node,
        prefix: prefix_of(query.prefix, query.prefix_hex)?.unwrap_or_default(),
        shards: shards as u32,
        marks: Vec::new(),
        phase: Phase::Rows {
            shard: 0,
            after: None,
        },
    };
    let line = |json: Json| {
        let mut s = json.to_string();
        s.push('\n');
        s
    };
    let stream = futures::stream::unfold(state, move |mut st| async move {
        let (now_ms, c) = (capdb_types::unix_now_ms(), Consistency::default());
        loop {
            if st.node.is_shutting_down() && !matches!(st.phase, Phase::Done) {
                st.phase = Phase::Done;
                let e =
                    line(serde_json::json!({ "error": "the node is shutting down; start over" }));
                return Some((Ok(e), st));
            }
            let step: Result<String, Error> = match std::mem::replace(&mut st.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Resume(r) => Ok(line(serde_json::json!({ "resume": r.to_string() }))),
                Phase::Check(end) => {
                    let mut lost = None;
                    for s in 0..st.shards {
                        let range = (StreamId::MAX, StreamId::MAX);
                        match st.ks.changes_read(s, range, 0, false, now_ms, c).await {
                            Ok(p) if p.on && still_held(&st.marks, s, p.floor) => {}
                            Ok(_) => {
                                lost = Some(Error::Command(format!(
                                    "ERR shard {s}'s change log lost events the snapshot needed while it was read (the retention trimmed them, or the log was turned off); start over"
                                )));
                                break;
                            }
                            Err(e) => {
                                lost = Some(e);
                                break;
                            }
                        }
                    }
                    match lost {
                        None => {
                            st.phase = Phase::Resume(end);
                            continue;
                        }
                        Some(e) => Err(e),
                    }
                }
                Phase::Rows { shard, .. } if shard >= st.shards => {
                    // Resolved past every page's clock: nothing in the pages' data lies
                    // after the resume position (bounded: a shard without a leader fails it).
                    let needed = replay_to_at_least(&st.marks);
                    let high = needed.clock();
                    let all: Vec<u32> = (0..st.shards).collect();
                    let started = tokio::time::Instant::now();
                    let resolved = loop {
                        match merged::read(&st.ks, StreamId::MAX, StreamId::MAX, 1, now_ms, c).await
                        {
                            Ok(page) if page.resolved >= needed => break Ok(page.resolved),
                            Ok(_) if started.elapsed() > CHANGES_WAIT_MAX => {
                                break Err(Error::Command(
                                    "TRYAGAIN the keyspace's shards did not close past the snapshot; start over".into(),
                                ));
                            }
                            Ok(_) => {
                                merged::close_shards(&st.ks, &all, high, SSE_WAIT).await;
                                tokio::time::sleep(merged::PROGRESS_GAP).await;
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    match resolved {
                        Ok(end) => {
                            st.phase = Phase::Replay {
                                at: replay_from(&st.marks),
                                end,
                            };
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Phase::Rows { shard, after } => {
                    let page = st
                        .ks
                        .changes_snapshot_page(shard, after.as_ref(), &st.prefix, now_ms, c)
                        .await;
                    page.map(|page| {
                        let mut out = String::new();
                        for row in &page.rows {
                            let mut obj = Map::new();
                            super::kv::bytes_field(&mut obj, "key", &row.key);
                            obj.insert("type".into(), Json::String(row.kind.clone()));
                            if row.kind == "string" {
                                super::kv::bytes_field(&mut obj, "value", &row.data);
                            } else {
                                let hex: String =
                                    row.data.iter().map(|b| format!("{b:02x}")).collect();
                                obj.insert("dump_hex".into(), Json::String(hex));
                            }
                            if let Some(at) = row.expire_at_ms {
                                obj.insert("expire_at_ms".into(), Json::from(at));
                            }
                            out.push_str(&line(Json::Object(obj)));
                        }
                        st.phase = match &page.mark.next {
                            Some(next) => Phase::Rows {
                                shard,
                                after: Some(next.clone()),
                            },
                            None => Phase::Rows {
                                shard: shard + 1,
                                after: None,
                            },
                        };
                        st.marks.push(page.mark);
                        out
                    })
                }
                Phase::Replay { at, end } => {
                    match merged::read(&st.ks, at, end, CHANGES_PAGE_MAX, now_ms, c).await {
                        Ok(page) => {
                            let mut out = String::new();
                            let mut split = false;
                            for e in &page.entries {
                                let wanted = st.prefix.is_empty()
                                    || crate::node::prefixed::matches(e, &st.prefix);
                                match replay_of(e, &st.marks) {
                                    Replay::Apply if wanted => {
                                        if let Some((_, json)) = entry_json(e) {
                                            out.push_str(&line(json));
                                        }
                                    }
                                    Replay::Split => split = true,
                                    _ => {}
                                }
                            }
                            if split {
                                let e = "a FLUSHDB ran while the snapshot was read; start over";
                                out.push_str(&line(serde_json::json!({ "error": e })));
                                return Some((Ok(out), st));
                            }
                            let next = page.resolved.successor();
                            if page.resolved >= end {
                                st.phase = Phase::Check(end);
                                Ok(out)
                            } else if next <= at {
                                Err(Error::Io(
                                    "the merged stream did not move during a snapshot's replay"
                                        .into(),
                                ))
                            } else {
                                st.phase = Phase::Replay { at: next, end };
                                Ok(out)
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            let chunk =
                step.unwrap_or_else(|e| line(serde_json::json!({ "error": e.to_string() })));
            return Some((Ok::<String, std::convert::Infallible>(chunk), st));
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
