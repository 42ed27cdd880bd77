//! `capdb changes tail KEYSPACE`: follows a keyspace's merged change stream over RESP, as any
//! Redis client would (`CHANGES RESOLVED` for the default `--from $`, then `XREAD BLOCK` on
//! `__changes:<keyspace>`), and prints one line per event:
//! `<id> #<shard> <op> <key> [<value>] [<cmd>]`, or with `--json` one JSON object per line
//! with every field (a command's arguments as an `args` array).
//!
//! Events come in the merged order (stream clock, then shard; a cross-shard transaction's
//! together). `--shards` reads each shard's stream instead (`CHANGES SHARDS`, `CHANGES LAST`),
//! each in its own order, without waiting on idle shards. `--prefix` reads the filtered
//! streams (`__changes:<keyspace>[#<shard>]:<prefix>`): the server keeps only the events on
//! keys starting with it, with the IDs they have in the whole stream.

use std::io::Write;

use redis::Value;

/// `capdb changes ...`.
#[derive(clap::Subcommand)]
pub enum ChangesOp {
    /// Follow a keyspace's changes, every shard's, one line per event (Ctrl-C stops).
    /// Example: capdb changes tail default --from 0 --prefix user:
    Tail {
        keyspace: String,
        /// Only events on keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Start after this stream ID on every shard (`0`: from the oldest held; default: only
        /// what comes from now on).
        #[arg(long, default_value = "$")]
        from: String,
        /// One JSON object per event instead of a line of text.
        #[arg(long)]
        json: bool,
        /// Stop after this many events (default: follow until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Read each shard's stream (its own order) instead of the merged one.
        #[arg(long)]
        shards: bool,
    },
}

/// Where `capdb changes` connects.
#[derive(clap::Args, Clone)]
pub struct RespTarget {
    /// RESP address of any capdb node.
    #[arg(
        long,
        global = true,
        env = "CAPDB_RESP",
        default_value = "127.0.0.1:6380",
        value_name = "HOST:PORT"
    )]
    resp: String,
    /// Password, if the server requires one.
    #[arg(long, global = true, env = "CAPDB_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// The last ID of each shard's stream of `keyspace` now (`CHANGES LAST`), in shard order:
/// where a reader that wants only what comes next starts, as explicit IDs (asking `$` on
/// every call would skip what lands between two calls).
pub(crate) async fn last_ids(
    conn: &mut redis::aio::MultiplexedConnection,
    keyspace: &str,
) -> Result<Vec<String>, String> {
    redis::cmd("CHANGES")
        .arg("LAST")
        .arg(keyspace)
        .query_async(conn)
        .await
        .map_err(|e| format!("CHANGES LAST {keyspace}: {e}"))
}

/// Runs `capdb changes`.
pub async fn changes(op: ChangesOp, target: &RespTarget) -> Result<(), String> {
    let ChangesOp::Tail {
        keyspace,
        prefix,
        from,
        json,
        count,
        shards,
    } = op;
    let url = match &target.password {
        Some(p) => format!("redis://:{p}@{}/", target.resp),
        None => format!("redis://{}/", target.resp),
    };
    let client = redis::Client::open(url).map_err(|e| format!("{}: {e}", target.resp))?;
    // No response timeout: a blocked XREAD answers only when something comes (or after its
    // BLOCK), which the client's default 500 ms would cut short.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("{}: {e}", target.resp))?;
    let keys: Vec<String> = if shards {
        redis::cmd("CHANGES")
            .arg("SHARDS")
            .arg(&keyspace)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?
    } else {
        vec![format!("__changes:{keyspace}")]
    };
    if keys.is_empty() {
        return Err(format!("keyspace {keyspace} has no shards"));
    }
    let keys: Vec<String> = match &prefix {
        Some(p) => keys.into_iter().map(|k| format!("{k}:{p}")).collect(),
        None => keys,
    };
    // Each position, resolved once: `$` means "from now" (asked again on every call, it
    // would skip what lands between two calls).
    let positions: Vec<String> = match (from.as_str(), shards) {
        ("$", true) => last_ids(&mut conn, &keyspace).await?,
        ("$", false) => vec![
            redis::cmd("CHANGES")
                .arg("RESOLVED")
                .arg(&keyspace)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("CHANGES RESOLVED {keyspace}: {e}"))?,
        ],
        _ => vec![from.clone(); keys.len()],
    };
    if positions.len() != keys.len() {
        return Err(format!("keyspace {keyspace} changed its shards; run again"));
    }
    let mut positions = positions;
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS");
        for k in &keys {
            cmd.arg(k);
        }
        for p in &positions {
            cmd.arg(p);
        }
        let reply: Value = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let Value::Array(per_key) = reply else {
            continue;
        };
        for item in per_key {
            let Value::Array(kv) = item else { continue };
            let [stream, Value::Array(entries)] = kv.as_slice() else {
                continue;
            };
            let stream = text(stream);
            let Some(at) = keys.iter().position(|k| *k == stream) else {
                continue;
            };
            for e in entries {
                let Value::Array(pair) = e else { continue };
                let [id, Value::Array(fields)] = pair.as_slice() else {
                    continue;
                };
                let id = text(id);
                positions[at] = id.clone();
                let fields: Vec<(String, String)> = fields
                    .chunks(2)
                    .filter_map(|f| Some((text(f.first()?), text(f.get(1)?))))
                    .collect();
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                let key = field("key").unwrap_or_default();
                let line = if json {
                    let mut obj = serde_json::Map::new();
                    obj.insert("id".into(), id.clone().into());
                    let mut repeated: std::collections::BTreeMap<&str, Vec<serde_json::Value>> =
                        Default::default();
                    for (k, v) in &fields {
                        match k.as_str() {
                            // Repeated fields (a command's arguments) as arrays.
                            "arg" => repeated.entry("args").or_default().push(v.clone().into()),
                            "also" => repeated.entry("also").or_default().push(v.clone().into()),
                            _ => {
                                obj.insert(k.clone(), v.clone().into());
                            }
                        }
                    }
                    for (k, v) in repeated {
                        obj.insert(k.into(), serde_json::Value::Array(v));
                    }
                    serde_json::Value::Object(obj).to_string()
                } else {
                    let mut line = format!(
                        "{id} #{} {} {key}",
                        field("shard").unwrap_or("?"),
                        field("op").unwrap_or("?")
                    );
                    for extra in ["value", "cmd"] {
                        if let Some(v) = field(extra) {
                            line.push(' ');
                            line.push_str(v);
                        }
                    }
                    line
                };
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                printed += 1;
                if count.is_some_and(|c| printed >= c) {
                    return out.flush().map_err(|e| e.to_string());
                }
            }
        }
        out.flush().map_err(|e| e.to_string())?;
    }
}
