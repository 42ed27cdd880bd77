//! `capdb view create|get|verify|drop|list`: incremental views over the HTTP API (issue 15).
//!
//! `capdb view get` reads every page (or the groups named with `--group`) and prints the rows
//! as a table (`--json`: a JSON array), then a line saying whether the view is complete (every
//! shard built) or how many shards are ready: never a silently partial answer.

use serde_json::Value;

use crate::client::{HttpClient, encode};

/// `capdb view ...`.
#[derive(clap::Subcommand)]
pub enum ViewOp {
    /// Define a view of a cp keyspace; it builds in the background, then every write keeps it
    /// current.  Example: capdb view create orders sales spec.json
    Create {
        keyspace: String,
        name: String,
        /// The view's spec (JSON, a job's `input`, `map` and `reduce`); `-` reads standard
        /// input.
        spec: String,
    },
    /// Read a view: every group, or those named.
    Get {
        keyspace: String,
        name: String,
        /// A group to read (repeatable); JSON for numbers and composite groups.
        #[arg(long)]
        group: Vec<String>,
        /// Print the rows as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Recompute a view from the data and report any drift (0 is the only right answer).
    Verify { keyspace: String, name: String },
    /// Drop a view (its rows go in the background).
    Drop { keyspace: String, name: String },
    /// A keyspace's views and their state on each shard.
    List { keyspace: String },
}

/// Groups read per request while paging.
const PAGE: usize = 1_000;

pub async fn view(op: ViewOp, client: &HttpClient) -> Result<(), String> {
    let path = |ks: &str, name: &str| format!("/v1/views/{}/{}", encode(ks), encode(name));
    match op {
        ViewOp::Create {
            keyspace,
            name,
            spec,
        } => {
            let text = if spec == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| format!("cannot read the spec: {e}"))?
            } else {
                std::fs::read_to_string(&spec).map_err(|e| format!("cannot read {spec}: {e}"))?
            };
            let v = client
                .request("PUT", &path(&keyspace, &name), Some(text.into_bytes()))
                .await?;
            let created = v["created"].as_bool().unwrap_or(false);
            println!(
                "view {name} {} (generation {}); it builds in the background: capdb view list {keyspace}",
                if created {
                    "created"
                } else {
                    "exists with this spec"
                },
                v["generation"]
            );
        }
        ViewOp::Get {
            keyspace,
            name,
            group,
            json,
        } => {
            let mut rows = Vec::new();
            let mut after: Option<String> = None;
            let last = loop {
                let mut q = format!("{}?limit={PAGE}", path(&keyspace, &name));
                if let Some(g) = group.first() {
                    // One group per request (the HTTP API takes one).
                    q.push_str(&format!("&group={}", encode(g)));
                }
                if let Some(a) = &after {
                    q.push_str(&format!("&after={a}"));
                }
                let v = client.request("GET", &q, None).await?;
                rows.extend(v["rows"].as_array().cloned().unwrap_or_default());
                match v["next"].as_str() {
                    Some(n) if group.is_empty() => after = Some(n.to_string()),
                    _ => break v,
                }
            };
            // The other groups asked for, one request each.
            let mut last = last;
            for g in group.iter().skip(1) {
                let q = format!("{}?group={}", path(&keyspace, &name), encode(g));
                last = client.request("GET", &q, None).await?;
                rows.extend(last["rows"].as_array().cloned().unwrap_or_default());
            }
            crate::job::print_result(&Value::Array(rows), json);
            if last["complete"] == Value::Bool(true) {
                eprintln!("complete: {} keys counted", last["keys"]);
            } else {
                eprintln!(
                    "NOT COMPLETE: {}/{} shards built; the rows do not count every key yet",
                    last["shards_ready"], last["shards_total"]
                );
            }
        }
        ViewOp::Verify { keyspace, name } => {
            let v = client
                .request("POST", &format!("{}/verify", path(&keyspace, &name)), None)
                .await?;
            println!(
                "drift {} in {} groups checked",
                v["drift"], v["groups_checked"]
            );
            for e in v["examples"].as_array().into_iter().flatten() {
                println!("  {}", e.as_str().unwrap_or_default());
            }
            if v["drift"] != 0 {
                return Err(format!("view {name} drifted from its data"));
            }
        }
        ViewOp::Drop { keyspace, name } => {
            client
                .request("DELETE", &path(&keyspace, &name), None)
                .await?;
            println!("view {name} dropped");
        }
        ViewOp::List { keyspace } => {
            let v = client
                .request("GET", &format!("/v1/views/{}", encode(&keyspace)), None)
                .await?;
            println!("{:<24} {:<10} SHARDS", "NAME", "STATE");
            for view in v["views"].as_array().into_iter().flatten() {
                let shards = view["shards"].as_array().cloned().unwrap_or_default();
                let states: Vec<&str> = shards
                    .iter()
                    .map(|s| s["state"].as_str().unwrap_or("?"))
                    .collect();
                let state = if states.iter().all(|s| *s == "ready") {
                    "ready"
                } else if states.contains(&"overflow") {
                    "overflow"
                } else {
                    "building"
                };
                println!(
                    "{:<24} {:<10} {}",
                    view["name"].as_str().unwrap_or("?"),
                    state,
                    states.join(",")
                );
            }
        }
    }
    Ok(())
}
