//! Fault injection (`/v1/debug/*`), for exactly-once and clock tests: these routes refuse unless
//! the node was started with `--debug-fault-injection` (testing only).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::IntoResponse;
use capdb_types::Error;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, ApiResult, json_body};
use crate::node::Node;

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
pub(super) async fn lose_write_answers(
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

pub(super) async fn get_clock(State(node): State<Arc<Node>>) -> ApiResult {
    require_fault_injection(&node)?;
    Ok(Json(
        json!({"offset_ms": capdb_types::clock_offset_ms(), "now_ms": capdb_types::unix_now_ms()}),
    )
    .into_response())
}

/// Shifts this node's wall clock by `offset_ms` (HLC timestamps and TTL deadlines; Raft timing
/// runs on the monotonic clock). Bounded to a day either way.
pub(super) async fn set_clock(
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
