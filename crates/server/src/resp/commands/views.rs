//! `VIEW`: incremental views of the connection's keyspace (issue 15, `node/views.rs`).
//!
//! - `VIEW CREATE <name> <spec json>` → `[generation, created|exists]`: defined on every
//!   shard, built in the background, then kept current by every write. Repeating it with
//!   the same spec is safe (it completes an interrupted create); another spec is refused.
//! - `VIEW GET <name> [GROUP <g> ...] [AFTER <cursor>] [COUNT <n>] [FRESH <ms>]` → a map:
//!   `complete` (0 while a shard is still building: the rows do not count every key yet),
//!   `shards_ready`, `shards_total`, `keys`, `skipped`, `rounded`, `rows` (a JSON array, the
//!   rows a job with the same spec would give), `next` (the cursor of the next page, hex, or
//!   nil). `FRESH`: first wait up to `ms` (≤ 60,000) until an async (Lua) view has counted
//!   every change logged before the read; `caught_up` (1/0) says whether it did (a
//!   synchronous view always has).
//! - `VIEW DROP <name>` → 1, or 0 when there was none.
//! - `VIEW LIST` → per view: `[name, state, shards_ready, shards_total]`.
//! - `VIEW INFO <name>` → a map: state, shards ready and total, the spec (canonical JSON),
//!   and while building, the keys the building shards have counted so far (`keys_built`).
//! - `VIEW VERIFY <name>` → a map: `drift` (groups whose rows differ from a recomputation
//!   from the same snapshot, per shard; 0 is the only right answer), `groups_checked`,
//!   `examples`.

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::views::ViewState;

use super::{Outcome, error_line, syntax};
use crate::resp::Connection;

fn bulk(s: impl Into<String>) -> Reply {
    Reply::Bulk(Bytes::from(s.into()))
}

fn int(n: i64) -> Reply {
    Reply::Integer(n)
}

pub(super) async fn view(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    let node = conn.node.clone();
    let ks = conn.keyspace.spec.name.as_str().to_string();
    match (sub.as_slice(), args.len()) {
        (b"create", 4) => {
            let (generation, created) = node
                .view_create(&ks, &args[2], &args[3])
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.reply(&Reply::Array(vec![
                int(generation as i64),
                bulk(if created { "created" } else { "exists" }),
            ]));
        }
        (b"get", n) if n >= 3 => {
            let mut groups = Vec::new();
            let mut after = Bytes::new();
            let mut count = 1_000usize;
            let mut fresh = None;
            let mut i = 3;
            while i < n {
                let opt = args[i].to_ascii_lowercase();
                match (opt.as_slice(), args.get(i + 1)) {
                    (b"group", Some(g)) => groups.push(g.clone()),
                    (b"after", Some(a)) => {
                        after = from_hex(a)
                            .ok_or("ERR AFTER takes the cursor a VIEW GET answered as next")?;
                    }
                    (b"count", Some(c)) => {
                        count = std::str::from_utf8(c)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .filter(|c| *c > 0)
                            .ok_or("ERR COUNT is a positive integer")?;
                    }
                    (b"fresh", Some(ms)) => {
                        fresh = Some(
                            std::str::from_utf8(ms)
                                .ok()
                                .and_then(|s| s.parse::<u64>().ok())
                                .ok_or("ERR FRESH takes a wait in milliseconds")?,
                        );
                    }
                    _ => return Err(syntax()),
                }
                i += 2;
            }
            let caught_up = match fresh {
                Some(ms) => Some(
                    node.view_wait_fresh(&ks, &args[2], std::time::Duration::from_millis(ms))
                        .await
                        .map_err(|e| error_line(&e))?,
                ),
                None => None,
            };
            let read = node
                .view_get(&ks, &args[2], &groups, &after, count)
                .await
                .map_err(|e| error_line(&e))?;
            let rows = serde_json::Value::Array(read.rows).to_string();
            let mut fields = vec![
                (bulk("complete"), int(i64::from(read.complete))),
                (bulk("shards_ready"), int(read.shards_ready as i64)),
                (bulk("shards_total"), int(read.shards_total as i64)),
                (bulk("keys"), int(read.keys)),
                (bulk("skipped"), int(read.skipped)),
                (bulk("rounded"), int(read.rounded)),
                (bulk("rows"), bulk(rows)),
                (
                    bulk("next"),
                    read.next.map_or(Reply::Nil, |n| bulk(to_hex(&n))),
                ),
            ];
            if let Some(c) = caught_up {
                fields.push((bulk("caught_up"), int(i64::from(c))));
            }
            conn.out.reply(&Reply::Map(fields));
        }
        (b"drop", 3) => {
            let had = node
                .view_drop(&ks, &args[2])
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.reply(&int(i64::from(had)));
        }
        (b"list", 2) => {
            let defs = node.view_defs(&ks).await.map_err(|e| error_line(&e))?;
            let total = conn.keyspace.shard_groups().len();
            let rows = defs
                .into_iter()
                .map(|(name, shards)| {
                    let ready = shards
                        .iter()
                        .filter(|(_, d)| d.state == ViewState::Ready)
                        .count();
                    Reply::Array(vec![
                        Reply::Bulk(name),
                        bulk(summary_state(&shards, total)),
                        int(ready as i64),
                        int(total as i64),
                    ])
                })
                .collect();
            conn.out.reply(&Reply::Array(rows));
        }
        (b"info", 3) => {
            let defs = node.view_defs(&ks).await.map_err(|e| error_line(&e))?;
            let total = conn.keyspace.shard_groups().len();
            let Some((_, shards)) = defs.into_iter().find(|(n, _)| n == &args[2]) else {
                return Err(format!(
                    "NOVIEW no view '{}' in '{ks}'",
                    String::from_utf8_lossy(&args[2])
                ));
            };
            let ready = shards
                .iter()
                .filter(|(_, d)| d.state == ViewState::Ready)
                .count();
            let built: u64 = shards
                .iter()
                .map(|(_, d)| match d.state {
                    ViewState::Building { keys_done, .. } => keys_done,
                    _ => 0,
                })
                .sum();
            let spec = shards
                .first()
                .map(|(_, d)| d.spec.clone())
                .unwrap_or_default();
            let mut fields = vec![
                (bulk("state"), bulk(summary_state(&shards, total))),
                (bulk("shards_ready"), int(ready as i64)),
                (bulk("shards_total"), int(total as i64)),
                (bulk("spec"), bulk(spec)),
            ];
            // How far the build has gone on the shards still building (keys counted).
            if ready < total {
                fields.push((bulk("keys_built"), int(built as i64)));
            }
            if let Some(why) = shards.iter().find_map(|(_, d)| match &d.state {
                ViewState::Overflow { why } => Some(why.clone()),
                _ => None,
            }) {
                fields.push((bulk("overflow"), bulk(why)));
            }
            conn.out.reply(&Reply::Map(fields));
        }
        (b"verify", 3) => {
            let v = node
                .view_verify(&ks, &args[2])
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.reply(&Reply::Map(vec![
                (bulk("drift"), int(v.drift)),
                (bulk("groups_checked"), int(v.groups_checked)),
                (
                    bulk("examples"),
                    Reply::Array(v.examples.into_iter().map(bulk).collect()),
                ),
            ]));
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand or wrong number of arguments for 'VIEW|{}'",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

/// A page cursor (a group's canonical bytes) as text a client can hold and send back.
fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(t: &[u8]) -> Option<Bytes> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// One word for a view across its shards: `ready` on all, `overflow` on any, `incomplete`
/// when a shard lacks it or holds another spec, `building` otherwise.
fn summary_state(shards: &[(usize, capdb_types::views::ViewDef)], total: usize) -> &'static str {
    if shards
        .iter()
        .any(|(_, d)| matches!(d.state, ViewState::Overflow { .. }))
    {
        "overflow"
    } else if shards.len() < total || shards.iter().any(|(_, d)| d.spec != shards[0].1.spec) {
        "incomplete"
    } else if shards.iter().all(|(_, d)| d.state == ViewState::Ready) {
        "ready"
    } else {
        "building"
    }
}
