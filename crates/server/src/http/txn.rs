//! `POST /v1/txn`: a transaction with guards, etcd-style. If every guard holds, every
//! operation runs, atomically (on a `cp` keyspace across any of its shards); if one does not,
//! nothing runs and the answer says which.
//!
//! ```json
//! {"keyspace": "default",
//!  "guards": [{"key": "a", "value": "1"}, {"key": "b", "exists": false},
//!             {"key": "c", "version": "1796305836822-0"}],
//!  "ops": [{"op": "put", "key": "a", "value": "2", "ttl_ms": 60000},
//!          {"op": "get", "key": "c"}, {"op": "delete", "key": "d"}]}
//! ```
//!
//! Answers `{"committed": true, "results": [{"written": true}, {"value": "..."},
//! {"deleted": 1}]}` (one per operation, in order), or `{"committed": false, "failed_guard":
//! {"index": 1, "key": "b", "value": "...", "version": "..."}}` (nothing ran; what the key held).
//!
//! # How
//!
//! The guards are judged the way WATCH judges: the guarded keys are watched (a point in each
//! shard's log), read, and compared; then the operations run as one transaction whose WATCH
//! guards are those keys, so a change between the read and the commit aborts it, and the whole
//! check runs again (up to [`ATTEMPTS_MAX`] times, then `503`: nothing ran). A guard's
//! `version` is the key's timestamp as the kv API shows it.
//!
//! # Bounds and errors
//!
//! At most [`OPS_MAX`] operations and [`GUARDS_MAX`] guards (`400`); the body is bounded by
//! `limits.http_body_bytes_max`. `ap` and `cache` keyspaces take a transaction on one shard
//! only (`400`, as `-CROSSSLOT`); on `ap` the guards are best effort (as WATCH there). Errors
//! say what happened to the operations as the kv API's do: `503` nothing ran, `504` unknown.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::IntoResponse;
use capdb_types::limits::{check_key, check_value};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Mode, Mutation, Reply};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::{ApiError, ApiResult, json_body};
use crate::node::{Consistency, Keyspace, Node, Watched};

/// Operations one transaction may carry.
pub const OPS_MAX: usize = 10_000;
/// Guards one transaction may carry.
pub const GUARDS_MAX: usize = 1_000;
/// Times the guards are judged again after a concurrent change aborted the commit.
pub const ATTEMPTS_MAX: usize = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnRequest {
    keyspace: Option<String>,
    #[serde(default)]
    guards: Vec<Guard>,
    ops: Vec<Op>,
}

/// One guard: `value` (the key holds this string), `exists`, or `version` (its timestamp);
/// several in one guard must all hold.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Guard {
    key: String,
    value: Option<String>,
    exists: Option<bool>,
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "lowercase")]
enum Op {
    Put {
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } => key,
        }
    }

    fn mutation(&self, now: u64, value_max: usize) -> Result<Mutation, Error> {
        let key = Bytes::copy_from_slice(self.key().as_bytes());
        check_key(&key)?;
        Ok(match self {
            Op::Put { value, ttl_ms, .. } => {
                check_value(value.as_bytes(), value_max)?;
                let expiry = match ttl_ms {
                    None => ExpiryUpdate::Clear,
                    Some(0) => return Err(Error::InvalidInput("ttl_ms must be positive".into())),
                    Some(ms) => ExpiryUpdate::At(now.saturating_add(*ms)),
                };
                Mutation::Set {
                    key,
                    value: Bytes::copy_from_slice(value.as_bytes()),
                    condition: Condition::Always,
                    expiry,
                    return_old: false,
                }
            }
            Op::Get { .. } => Mutation::Exec {
                key: key.clone(),
                args: vec![Bytes::from_static(b"capdb.get"), key],
            },
            Op::Delete { .. } => Mutation::Delete { key },
        })
    }

    fn result(&self, reply: Result<Reply, Error>) -> Json_ {
        match (self, reply) {
            (_, Err(e)) => json!({"error": {"code": e.code(), "message": e.to_string()}}),
            (Op::Put { .. }, Ok(r)) => json!({"written": r == Reply::Ok}),
            (Op::Get { .. }, Ok(Reply::Bulk(v))) => json!({"value": String::from_utf8_lossy(&v)}),
            (Op::Get { .. }, Ok(_)) => json!({"value": null}),
            (Op::Delete { .. }, Ok(Reply::Integer(n))) => json!({"deleted": n}),
            (Op::Delete { .. }, Ok(_)) => json!({"deleted": 0}),
        }
    }
}

pub(super) async fn txn(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req: TxnRequest = json_body(body)?;
    if req.ops.len() > OPS_MAX || req.guards.len() > GUARDS_MAX {
        return Err(ApiError(Error::InvalidInput(format!(
            "a transaction carries at most {OPS_MAX} operations and {GUARDS_MAX} guards"
        ))));
    }
    let ks = node.keyspace(req.keyspace.as_deref().unwrap_or("default"))?;
    let now = capdb_types::unix_now_ms();
    let value_max = node.config.limits.value_bytes_max;
    let mutations = req
        .ops
        .iter()
        .map(|op| op.mutation(now, value_max))
        .collect::<Result<Vec<_>, Error>>()?;
    let guard_keys: Vec<Bytes> = req
        .guards
        .iter()
        .map(|g| {
            let k = Bytes::copy_from_slice(g.key.as_bytes());
            check_key(&k).map(|()| k)
        })
        .collect::<Result<_, Error>>()?;
    // Where each operation runs; several shards only on `cp`.
    let shards: Vec<u64> = mutations.iter().map(|m| ks.txn_shard(m.key())).collect();
    let spread = shards
        .iter()
        .chain(
            guard_keys
                .iter()
                .map(|k| ks.txn_shard(k))
                .collect::<Vec<_>>()
                .iter(),
        )
        .any(|s| Some(s) != shards.first());
    if spread && ks.spec.mode != Mode::Cp {
        return Err(ApiError(Error::InvalidInput(format!(
            "keys on several shards: {} keyspaces run a transaction on one shard only",
            ks.spec.mode.as_str()
        ))));
    }
    let c = Consistency::default();
    for _ in 0..ATTEMPTS_MAX {
        let watched = watch(&ks, &guard_keys, now).await?;
        let values = ks.get_many(&guard_keys, now, c).await?;
        for (i, (g, v)) in req.guards.iter().zip(&values).enumerate() {
            if !holds(g, v.as_ref()) {
                let mut failed = json!({"index": i, "key": g.key});
                if let Some(v) = v {
                    failed["value"] = json!(String::from_utf8_lossy(&v.data));
                    failed["version"] = json!(v.header.timestamp.to_string());
                }
                return Ok(
                    Json(json!({"committed": false, "failed_guard": failed})).into_response()
                );
            }
        }
        let guards: Vec<&Watched> = watched.iter().collect();
        let ran = if spread {
            let commands = shards
                .iter()
                .copied()
                .zip(mutations.iter().cloned())
                .collect();
            Keyspace::transact_across(&node.txns, commands, &guards, now).await?
        } else {
            ks.transact(mutations.clone(), &guards, now, c).await?
        };
        if let Some(replies) = ran {
            let results: Vec<Json_> = req
                .ops
                .iter()
                .zip(replies)
                .map(|(op, r)| op.result(r))
                .collect();
            return Ok(Json(json!({"committed": true, "results": results})).into_response());
        }
        // A guarded key changed after it was read: judge the guards again.
    }
    Err(ApiError(Error::Unavailable(format!(
        "the guarded keys kept changing through {ATTEMPTS_MAX} attempts; nothing was applied, retry"
    ))))
}

/// Watches `keys` shard by shard (each shard's point in its log).
async fn watch(ks: &Keyspace, keys: &[Bytes], now: u64) -> Result<Vec<Watched>, Error> {
    let mut by_shard: Vec<(u64, Vec<Bytes>)> = Vec::new();
    for k in keys {
        let s = ks.txn_shard(k);
        match by_shard.iter_mut().find(|(at, _)| *at == s) {
            Some((_, keys)) => keys.push(k.clone()),
            None => by_shard.push((s, vec![k.clone()])),
        }
    }
    let mut out = Vec::new();
    for (_, keys) in by_shard {
        out.extend(ks.watch(&keys, now, Consistency::default()).await?);
    }
    Ok(out)
}

/// Whether guard `g` holds for the key's current value.
fn holds(g: &Guard, v: Option<&capdb_types::Value>) -> bool {
    let exists_ok = g.exists.is_none_or(|e| e == v.is_some());
    let value_ok = g
        .value
        .as_ref()
        .is_none_or(|want| v.is_some_and(|v| v.is_string() && v.data == want.as_bytes()));
    let version_ok = g
        .version
        .as_ref()
        .is_none_or(|want| v.is_some_and(|v| v.header.timestamp.to_string() == *want));
    exists_ok && value_ok && version_ok
}
