//! The `view` workload (issue 15): writers change JSON values under `view:` (sets, deletes,
//! short expiries, and one write in four a MULTI/EXEC over two keys, most often of two
//! shards) while a synchronous view of them (count, sum, avg, min, max by group) is kept by
//! every shard's apply. The nemeses do their worst; after the final heal and the drain the
//! view must equal a job recomputing the same spec from the data, and `VIEW VERIFY` (each
//! shard's rows against a recomputation from the same snapshot) must find no drift.
//!
//! Beside it, the same view with a Lua map (`chaos_lua`), kept asynchronously from the
//! change log by each shard leader's node through the same faults: read once caught up
//! (`FRESH`), it must equal the synchronous one, and its VERIFY must find no drift.
//!
//! A server started with `--debug-view-skip-txn` (cross-shard commits skip the views) must
//! fail this check: CI runs it to prove the check can fail.

use std::time::{Duration, Instant};

use redis::Value;
use serde_json::json;

use crate::HarnessError;
use crate::cluster::Nodes;
use crate::stream::{anywhere, text};

/// Keys the writers use (`view:0..`), spread over the shards.
pub const VIEW_KEYS: usize = 300;
/// Groups the values fall in.
pub const VIEW_GROUPS: u8 = 5;
const VIEW: &str = "chaos";
const SPEC: &str = r#"{"input": {"prefix": "view:"},
  "map": {"group": [{"json": "$.g"}], "values": {"a": {"json": "$.a"}}},
  "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"},
             "low": {"min": "a"}, "high": {"max": "a"}}}"#;

const LUA_VIEW: &str = "chaos_lua";
const LUA_SPEC: &str = r#"{"input": {"prefix": "view:"},
  "map": {"lua": {"source": "function map(key, value)\n  local d = capdb.json_decode(value)\n  if type(d) == 'table' and d.g ~= nil and type(d.a) == 'number' then emit(d.g, {a = d.a}) end\nend"},
          "values": ["a"]},
  "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"},
             "low": {"min": "a"}, "high": {"max": "a"}}}"#;

/// Defines the views before the first write (so they build while the nemeses run).
pub async fn set_up(nodes: &Nodes) -> Result<(), HarnessError> {
    for (name, spec) in [(VIEW, SPEC), (LUA_VIEW, LUA_SPEC)] {
        anywhere(
            nodes,
            &["VIEW", "CREATE", name, spec],
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| HarnessError(format!("view workload setup ({name}): {e}")))?;
    }
    Ok(())
}

/// What one writer does to `view:` keys: `value` is `{"del": true}`, or `{"set": {...},
/// "px": ms?}`; a key naming two (`view:a,view:b`) is a MULTI/EXEC setting both.
pub fn next_value(rng: &mut fastrand::Rng, e: i64) -> serde_json::Value {
    let doc = json!({"g": format!("g{}", rng.u8(0..VIEW_GROUPS)), "a": (e % 2_001) - 1_000});
    match rng.u8(0..10) {
        0 => json!({"del": true}),
        1 => json!({"set": doc, "px": 300}),
        2 => json!({"set": "not json"}),
        _ => json!({"set": doc}),
    }
}

/// After the final heal, with the writers stopped: the view equals a job's answer, and
/// VERIFY finds no drift. Returns the problems and a line of details.
pub async fn check(nodes: &Nodes) -> (Vec<String>, String) {
    let within = Duration::from_secs(120);
    let mut problems = Vec::new();
    // Built on every shard (a build interrupted by the nemeses resumes under new leaders).
    let deadline = Instant::now() + within;
    for name in [VIEW, LUA_VIEW] {
        loop {
            match anywhere(nodes, &["VIEW", "INFO", name], within).await {
                Ok(v) if field(&v, "state").as_deref() == Some("ready") => break,
                Ok(v) if Instant::now() > deadline => {
                    problems.push(format!(
                        "view {name} was not built 120 s after the heal: {v:?}"
                    ));
                    return (problems, "not built".into());
                }
                Err(e) => {
                    problems.push(format!("VIEW INFO {name} failed: {e}"));
                    return (problems, "unreadable".into());
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    // Keys set with a short expiry leave through the log and count until then: compare
    // once the view reads the same before and after the job (and the Lua view, caught up,
    // in between).
    let mut details = String::from("never settled");
    let mut settled = false;
    let mut lua_differs = None;
    for _ in 0..20 {
        let before = get_rows(nodes, VIEW).await;
        let job = job_rows(nodes).await;
        let lua = get_rows(nodes, LUA_VIEW).await;
        let after = get_rows(nodes, VIEW).await;
        match (before, job, lua, after) {
            (Ok(b), Ok(j), Ok(l), Ok(a)) if b == a => {
                let groups = a.as_array().map_or(0, Vec::len);
                if a != j {
                    details = format!("view of {groups} groups DIFFERS from the job");
                    problems.push(format!(
                        "the view differs from a job over the same data: view {a} job {j}"
                    ));
                } else if l != a {
                    // Perhaps an expiry between the reads: read again.
                    lua_differs = Some(format!("Lua view {l} view {a}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                } else {
                    details = format!("view of {groups} groups equals the job and the Lua view");
                    lua_differs = None;
                }
                settled = true;
                break;
            }
            (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                details = format!("reads failing: {e}");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(d) = lua_differs {
        problems.push(format!(
            "the Lua view differs from the synchronous one: {d}"
        ));
    } else if !settled {
        problems.push(format!(
            "the view could not be compared with a job: {details}"
        ));
    }
    for name in [VIEW, LUA_VIEW] {
        // A Lua view is verified on a quiet shard: `TRYAGAIN` (asked again, as any error
        // is, for up to 120 s) while expiries still leave.
        match anywhere(nodes, &["VIEW", "VERIFY", name], within).await {
            Ok(v) => match field(&v, "drift").as_deref() {
                Some("0") => details.push_str(&format!("; VERIFY {name}: no drift")),
                other => problems.push(format!("VIEW VERIFY {name} found drift {other:?}: {v:?}")),
            },
            Err(e) => problems.push(format!("VIEW VERIFY {name} failed: {e}")),
        }
    }
    (problems, details)
}

fn field(v: &Value, name: &str) -> Option<String> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|p| Some((p.first()?, p.get(1)?)))
            .collect(),
        _ => return None,
    };
    pairs
        .into_iter()
        .find(|(k, _)| text(k).as_deref() == Some(name))
        .and_then(|(_, v)| text(v))
}

/// View `name`'s rows, read once it has caught up with every change (`FRESH`).
async fn get_rows(nodes: &Nodes, name: &str) -> Result<serde_json::Value, String> {
    let v = anywhere(
        nodes,
        &["VIEW", "GET", name, "FRESH", "20000"],
        Duration::from_secs(30),
    )
    .await?;
    if field(&v, "complete").as_deref() != Some("1") {
        return Err(format!(
            "VIEW GET {name} not complete after the build: {v:?}"
        ));
    }
    if field(&v, "caught_up").as_deref() != Some("1") {
        return Err(format!("VIEW GET {name} did not catch up in 20 s: {v:?}"));
    }
    let rows = field(&v, "rows").ok_or_else(|| format!("VIEW GET: {v:?}"))?;
    serde_json::from_str(&rows).map_err(|e| e.to_string())
}

async fn job_rows(nodes: &Nodes) -> Result<serde_json::Value, String> {
    let mut spec: serde_json::Value = serde_json::from_str(SPEC).map_err(|e| e.to_string())?;
    spec["input"]["keyspace"] = json!("default");
    spec["input"]["expired"] = json!("include");
    // An id of our own: a submission retried after a lost answer is the same job.
    spec["id"] = json!(format!("chaos-view-{}", fastrand::u64(..)));
    let spec = spec.to_string();
    let within = Duration::from_secs(60);
    let submitted = anywhere(nodes, &["JOB", "SUBMIT", &spec], within).await?;
    let Value::Array(parts) = &submitted else {
        return Err(format!("JOB SUBMIT answered {submitted:?}"));
    };
    let id = parts.first().and_then(text).ok_or("JOB SUBMIT: no id")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = anywhere(nodes, &["JOB", "STATUS", &id], within).await?;
        match field(&st, "state").as_deref() {
            Some("done") => break,
            Some("failed" | "cancelled") => return Err(format!("the job ended {st:?}")),
            _ if Instant::now() > deadline => return Err(format!("the job did not end: {st:?}")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let rows = anywhere(nodes, &["JOB", "RESULT", &id], within).await?;
    let rows = text(&rows).ok_or_else(|| format!("JOB RESULT answered {rows:?}"))?;
    serde_json::from_str(&rows).map_err(|e| e.to_string())
}
