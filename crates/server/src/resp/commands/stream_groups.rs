//! Consumer groups on change streams (issue 14, design §5): XGROUP, XREADGROUP, XACK,
//! XPENDING, XCLAIM, XAUTOCLAIM and XINFO GROUPS|CONSUMERS with Redis's replies.
//!
//! A group's state (last delivered ID, consumers, pending entries) lives in the keyspace's
//! first shard and changes only through its Raft log (`storage/src/disk/groups.rs`), so an
//! acknowledgement or a delivery survives a failover and a retried command applies once.
//!
//! `XREADGROUP ... >` reads the stream after the group's last ID, then records the delivery
//! conditionally on that ID being unchanged (a compare-and-set through the log): two
//! consumers reading at once never get the same entry; the loser reads again. A delivery is
//! recorded before the entries are answered, so a consumer that dies with them unread finds
//! them pending (XAUTOCLAIM, or its own history with an ID).
//!
//! Differences from Redis: `lag` in XINFO GROUPS is nil (the merged stream's length up to the
//! group's position is not counted); XAUTOCLAIM's third element (deleted IDs) is always
//! empty, and a claimed entry gone with the retention is answered as `[id, nil]`; LASTID in
//! XCLAIM is accepted and ignored; groups do not pin the retention yet.

use std::time::Duration;

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::changes::StreamId;
use capdb_types::changes::groups::{GroupCommand, GroupOp, GroupRecord, Pending};

use super::streams::{Page, Target, parse_id, read_page, resolve};
use super::{Outcome, error_line, parse_int, syntax};
use crate::resp::Connection;

/// The name a stream's groups are kept under: the keyspace (merged) or `<keyspace>#<n>`.
fn stream_name(ks: &crate::node::Keyspace, target: Target) -> Bytes {
    match target {
        Target::Merged => Bytes::from(ks.spec.name.to_string()),
        Target::Shard(n) => Bytes::from(format!("{}#{n}", ks.spec.name)),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `op` on `group` of the stream `key` names; the answer, with a missing group worded
/// by `nogroup`.
async fn apply(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
    op: GroupOp,
    nogroup: impl FnOnce() -> String,
) -> Result<Reply, String> {
    let (ks, target) = resolve(conn, key)?;
    let cmd = GroupCommand {
        stream: stream_name(&ks, target),
        group: Bytes::copy_from_slice(group),
        op,
    };
    match ks.changes_group(cmd).await.map_err(|e| error_line(&e))? {
        Ok(reply) => Ok(reply),
        Err(capdb_types::Error::Command(line)) if line == "NOGROUP" => Err(nogroup()),
        Err(e) => Err(error_line(&e)),
    }
}

/// The group's record and pending entries (`None`: no such group).
async fn load(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
) -> Result<Option<(GroupRecord, Vec<(StreamId, Pending)>)>, String> {
    let (ks, target) = resolve(conn, key)?;
    let reply = ks
        .changes_group_query(
            &stream_name(&ks, target),
            Some(group),
            conn.now_ms,
            conn.consistency,
        )
        .await
        .map_err(|e| error_line(&e))?;
    let bad = || "ERR unexpected consumer-group state".to_string();
    let Reply::Array(parts) = reply else {
        return Err(bad());
    };
    let [rec, Reply::Array(rows)] = <[Reply; 2]>::try_from(parts).map_err(|_| bad())? else {
        return Err(bad());
    };
    let Reply::Bulk(rec) = rec else {
        return Ok(None);
    };
    let rec: GroupRecord = postcard::from_bytes(&rec).map_err(|_| bad())?;
    let mut pel = Vec::with_capacity(rows.len());
    for r in rows {
        let Reply::Array(pair) = r else {
            return Err(bad());
        };
        let [Reply::Bulk(id), Reply::Bulk(p)] = <[Reply; 2]>::try_from(pair).map_err(|_| bad())?
        else {
            return Err(bad());
        };
        pel.push((parse_id(&id)?, postcard::from_bytes(&p).map_err(|_| bad())?));
    }
    Ok(Some((rec, pel)))
}

/// The entry with ID `id` of the stream `key` names (`[id, nil]` when it is gone).
async fn entry_by_id(conn: &Connection, key: &[u8], id: StreamId) -> Result<Reply, String> {
    let page = match read_page(conn, key, (id, id), 1, false, false).await {
        Ok(p) => p,
        Err(e) if e.starts_with("HISTORYLOST") => Page {
            entries: Vec::new(),
            events: 0,
            last: StreamId::MIN,
            resolved: None,
            lagging: Vec::new(),
            newest: capdb_types::Timestamp::ZERO,
        },
        Err(e) => return Err(e),
    };
    Ok(page.entries.into_iter().next().unwrap_or_else(|| {
        Reply::Array(vec![Reply::Bulk(Bytes::from(id.to_string())), Reply::Nil])
    }))
}

fn id_arg(text: &[u8]) -> Result<StreamId, String> {
    parse_id(text)
}

/// `ENTRIESREAD n` at `args[at..]`, alone or nothing.
fn entries_read(args: &[Bytes], at: usize) -> Result<Option<u64>, String> {
    match args.get(at..).unwrap_or_default() {
        [] => Ok(None),
        [word, n] if word.eq_ignore_ascii_case(b"entriesread") => {
            let n = parse_int(n)?;
            if n < -1 {
                return Err("ERR value for ENTRIESREAD must be positive or -1".into());
            }
            Ok(Some(n.max(0) as u64))
        }
        _ => Err(syntax()),
    }
}

/// `$` or an ID: where a group starts (`$`: the stream's last ID now).
async fn start_id(conn: &Connection, key: &[u8], id: &[u8]) -> Result<StreamId, String> {
    if id == b"$" {
        Ok(
            read_page(conn, key, (StreamId::MAX, StreamId::MAX), 0, false, false)
                .await?
                .last,
        )
    } else {
        id_arg(id)
    }
}

/// `XGROUP CREATE|DESTROY|SETID|CREATECONSUMER|DELCONSUMER ...`.
pub(super) async fn xgroup(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    let no_such = |key: &[u8], group: &[u8]| {
        let (k, g) = (lossy(key), lossy(group));
        move || format!("NOGROUP No such consumer group '{g}' for key name '{k}'")
    };
    let reply = match (sub.as_slice(), args.len()) {
        (b"create", 5..) => {
            let (key, group) = (&args[2], &args[3]);
            // MKSTREAM: change streams always exist while on.
            let mut rest: Vec<Bytes> = args[5..].to_vec();
            rest.retain(|a| !a.eq_ignore_ascii_case(b"mkstream"));
            let er = entries_read(&rest, 0)?;
            let last = start_id(conn, key, &args[4]).await?;
            apply(
                conn,
                key,
                group,
                GroupOp::Create {
                    last,
                    entries_read: er,
                },
                no_such(key, group),
            )
            .await?
        }
        (b"setid", 5 | 7) => {
            let (key, group) = (&args[2], &args[3]);
            let er = entries_read(args, 5)?;
            let last = start_id(conn, key, &args[4]).await?;
            apply(
                conn,
                key,
                group,
                GroupOp::SetId {
                    last,
                    entries_read: er,
                },
                no_such(key, group),
            )
            .await?
        }
        (b"destroy", 4) => {
            apply(
                conn,
                &args[2],
                &args[3],
                GroupOp::Destroy,
                no_such(&args[2], &args[3]),
            )
            .await?
        }
        (b"createconsumer", 5) => {
            let op = GroupOp::CreateConsumer {
                consumer: args[4].clone(),
                now_ms: conn.now_ms,
            };
            apply(conn, &args[2], &args[3], op, no_such(&args[2], &args[3])).await?
        }
        (b"delconsumer", 5) => {
            let op = GroupOp::DelConsumer {
                consumer: args[4].clone(),
            };
            apply(conn, &args[2], &args[3], op, no_such(&args[2], &args[3])).await?
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand or wrong number of arguments for '{}'. Try XGROUP HELP.",
                lossy(&args[1])
            ));
        }
    };
    conn.out.reply(&reply);
    Ok(())
}

/// `XACK key group id [id ...]`.
pub(super) async fn xack(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let ids = args[3..]
        .iter()
        .map(|a| id_arg(a))
        .collect::<Result<Vec<_>, String>>()?;
    let reply = apply(conn, &args[1], &args[2], GroupOp::Ack { ids }, String::new).await?;
    conn.out.reply(&reply);
    Ok(())
}

fn no_key_or_group(key: &[u8], group: &[u8]) -> String {
    format!(
        "NOGROUP No such key '{}' or consumer group '{}'",
        lossy(key),
        lossy(group)
    )
}

/// `XPENDING key group [[IDLE min-idle-time] start end count [consumer]]`.
pub(super) async fn xpending(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (key, group) = (&args[1], &args[2]);
    let mut rest = &args[3..];
    let mut min_idle = None;
    if rest
        .first()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"idle"))
    {
        let n = parse_int(rest.get(1).ok_or_else(syntax)?)?;
        min_idle = Some(n.max(0) as u64);
        rest = &rest[2..];
    }
    let extended = match rest {
        [] if min_idle.is_none() => None,
        [start, end, count] => Some((start, end, count, None)),
        [start, end, count, consumer] => Some((start, end, count, Some(consumer))),
        _ => return Err(syntax()),
    };
    let Some((_, pel)) = load(conn, key, group).await? else {
        return Err(no_key_or_group(key, group));
    };
    let reply = match extended {
        None => {
            if pel.is_empty() {
                Reply::Array(vec![
                    Reply::Integer(0),
                    Reply::Nil,
                    Reply::Nil,
                    Reply::NilArray,
                ])
            } else {
                let mut per: std::collections::BTreeMap<&Bytes, u64> = Default::default();
                for (_, p) in &pel {
                    *per.entry(&p.consumer).or_default() += 1;
                }
                let id = |i: StreamId| Reply::Bulk(Bytes::from(i.to_string()));
                Reply::Array(vec![
                    Reply::Integer(pel.len() as i64),
                    id(pel[0].0),
                    id(pel[pel.len() - 1].0),
                    Reply::Array(
                        per.into_iter()
                            .map(|(c, n)| {
                                Reply::Array(vec![
                                    Reply::Bulk(c.clone()),
                                    Reply::Bulk(Bytes::from(n.to_string())),
                                ])
                            })
                            .collect(),
                    ),
                ])
            }
        }
        Some((start, end, count, consumer)) => {
            let count = parse_int(count)?;
            let range =
                capdb_types::changes::range_bounds(start, end).map_err(|e| error_line(&e))?;
            let mut out = Vec::new();
            if let Some((lo, hi)) = range {
                for (id, p) in &pel {
                    if out.len() as i64 >= count {
                        break;
                    }
                    let idle = conn.now_ms.saturating_sub(p.delivered_ms);
                    if *id < lo
                        || *id > hi
                        || min_idle.is_some_and(|m| idle < m)
                        || consumer.is_some_and(|c| *c != p.consumer)
                    {
                        continue;
                    }
                    out.push(Reply::Array(vec![
                        Reply::Bulk(Bytes::from(id.to_string())),
                        Reply::Bulk(p.consumer.clone()),
                        Reply::Integer(idle as i64),
                        Reply::Integer(p.deliveries as i64),
                    ]));
                }
            }
            Reply::Array(out)
        }
    };
    conn.out.reply(&reply);
    Ok(())
}

/// Entries for claimed IDs (or the IDs alone with `justid`).
async fn claimed_entries(
    conn: &Connection,
    key: &[u8],
    ids: Vec<Reply>,
    justid: bool,
) -> Result<Vec<Reply>, String> {
    if justid {
        return Ok(ids);
    }
    let mut out = Vec::with_capacity(ids.len());
    for r in ids {
        let Reply::Bulk(id) = r else { continue };
        out.push(entry_by_id(conn, key, parse_id(&id)?).await?);
    }
    Ok(out)
}

/// `XCLAIM key group consumer min-idle-time id [id ...] [IDLE ms] [TIME unix-time-ms]
/// [RETRYCOUNT count] [FORCE] [JUSTID] [LASTID lastid]`.
pub(super) async fn xclaim(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (key, group, consumer) = (&args[1], &args[2], &args[3]);
    let min_idle = parse_int(&args[4])
        .map_err(|_| "ERR Invalid min-idle-time argument for XCLAIM".to_string())?;
    let mut ids = Vec::new();
    let mut i = 5;
    while let Some(a) = args.get(i) {
        match StreamId::parse_with(a, 0) {
            Ok(id) => ids.push(id),
            Err(_) if ids.is_empty() => {
                return Err("ERR Invalid stream ID specified as stream command argument".into());
            }
            Err(_) => break,
        }
        i += 1;
    }
    let (mut delivered_ms, mut retry_count, mut force, mut justid) = (None, None, false, false);
    while let Some(a) = args.get(i) {
        match a.to_ascii_lowercase().as_slice() {
            b"idle" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                delivered_ms = Some(conn.now_ms.saturating_sub(n.max(0) as u64));
                i += 2;
            }
            b"time" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                delivered_ms = Some(n.max(0) as u64);
                i += 2;
            }
            b"retrycount" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                retry_count = Some(n.max(0) as u64);
                i += 2;
            }
            b"lastid" => {
                id_arg(args.get(i + 1).ok_or_else(syntax)?)?;
                i += 2;
            }
            b"force" => {
                force = true;
                i += 1;
            }
            b"justid" => {
                justid = true;
                i += 1;
            }
            _ => {
                return Err(format!("ERR Unrecognized XCLAIM option '{}'", lossy(a)));
            }
        }
    }
    let op = GroupOp::Claim {
        consumer: consumer.clone(),
        min_idle_ms: min_idle.max(0) as u64,
        ids,
        delivered_ms,
        retry_count,
        force,
        justid,
        now_ms: conn.now_ms,
    };
    let reply = apply(conn, key, group, op, || no_key_or_group(key, group)).await?;
    let Reply::Array(ids) = reply else {
        return Err("ERR unexpected answer to XCLAIM".into());
    };
    let entries = claimed_entries(conn, key, ids, justid).await?;
    conn.out.reply(&Reply::Array(entries));
    Ok(())
}

/// `XAUTOCLAIM key group consumer min-idle-time start [COUNT count] [JUSTID]`.
pub(super) async fn xautoclaim(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (key, group, consumer) = (&args[1], &args[2], &args[3]);
    let min_idle = parse_int(&args[4])
        .map_err(|_| "ERR Invalid min-idle-time argument for XAUTOCLAIM".to_string())?;
    let start = capdb_types::changes::range_bound(&args[5], true).map_err(|e| error_line(&e))?;
    let (mut count, mut justid) = (100usize, false);
    let mut i = 6;
    while let Some(a) = args.get(i) {
        match a.to_ascii_lowercase().as_slice() {
            b"count" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                // Redis's bound on COUNT.
                if !(1..=i64::MAX / 10).contains(&n) {
                    return Err("ERR COUNT must be > 0".into());
                }
                count = (n as usize).min(capdb_storage::disk::CHANGES_READ_MAX);
                i += 2;
            }
            b"justid" => {
                justid = true;
                i += 1;
            }
            _ => return Err(syntax()),
        }
    }
    let op = GroupOp::AutoClaim {
        consumer: consumer.clone(),
        min_idle_ms: min_idle.max(0) as u64,
        start,
        count,
        justid,
        now_ms: conn.now_ms,
    };
    let reply = apply(conn, key, group, op, || no_key_or_group(key, group)).await?;
    let Reply::Array(parts) = reply else {
        return Err("ERR unexpected answer to XAUTOCLAIM".into());
    };
    let [next, Reply::Array(ids)] = <[Reply; 2]>::try_from(parts)
        .map_err(|_| "ERR unexpected answer to XAUTOCLAIM".to_string())?
    else {
        return Err("ERR unexpected answer to XAUTOCLAIM".into());
    };
    let entries = claimed_entries(conn, key, ids, justid).await?;
    conn.out.reply(&Reply::Array(vec![
        next,
        Reply::Array(entries),
        Reply::Array(Vec::new()),
    ]));
    Ok(())
}

/// `XREADGROUP GROUP group consumer [COUNT count] [BLOCK ms] [NOACK] STREAMS key [key ...] id
/// [id ...]`.
pub(super) async fn xreadgroup(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    if !args[1].eq_ignore_ascii_case(b"group") || args.len() < 4 {
        return Err(syntax());
    }
    let (group, consumer) = (args[2].clone(), args[3].clone());
    let mut count = super::streams::XREAD_DEFAULT_COUNT;
    let (mut block, mut noack) = (None::<u64>, false);
    let mut i = 4;
    let streams_at = loop {
        let Some(word) = args.get(i) else {
            return Err(syntax());
        };
        match word.to_ascii_lowercase().as_slice() {
            b"count" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                count = usize::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or(capdb_storage::disk::CHANGES_READ_MAX)
                    .min(capdb_storage::disk::CHANGES_READ_MAX);
                i += 2;
            }
            b"block" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                if n < 0 {
                    return Err("ERR timeout is negative".into());
                }
                block = Some(n as u64);
                i += 2;
            }
            b"noack" => {
                noack = true;
                i += 1;
            }
            b"streams" => break i + 1,
            _ => return Err(syntax()),
        }
    };
    let rest = &args[streams_at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err("ERR Unbalanced 'xreadgroup' list of streams: for each stream key an ID or '>' must be specified.".into());
    }
    let (keys, ids) = rest.split_at(rest.len() / 2);
    let nogroup = |key: &[u8]| {
        format!(
            "NOGROUP No such key '{}' or consumer group '{}' in XREADGROUP with GROUP option",
            lossy(key),
            lossy(&group)
        )
    };
    let mut found: Vec<(Bytes, Vec<Reply>)> = Vec::new();
    let mut fresh: Vec<usize> = Vec::new();
    // History reads (an ID): the consumer's pending entries after it, never blocking.
    for (n, (key, id)) in keys.iter().zip(ids).enumerate() {
        if id.as_ref() == b">" {
            fresh.push(n);
            continue;
        }
        let after = id_arg(id)?;
        let Some((_, pel)) = load(conn, key, &group).await? else {
            return Err(nogroup(key));
        };
        let op = GroupOp::Seen {
            consumer: consumer.clone(),
            now_ms: conn.now_ms,
        };
        apply(conn, key, &group, op, || nogroup(key)).await?;
        let mut entries = Vec::new();
        for (pid, p) in pel.iter().filter(|(pid, _)| *pid > after) {
            if entries.len() >= count {
                break;
            }
            if p.consumer == consumer {
                entries.push(entry_by_id(conn, key, *pid).await?);
            }
        }
        found.push((key.clone(), entries));
    }
    let deadline = block
        .filter(|_| found.is_empty())
        .map(|ms| (ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms)));
    let mut probe = super::blocking::ClosedProbe::new(conn.socket_fd);
    let mut shutdown = conn.shutdown.clone();
    'read: loop {
        for &n in &fresh {
            let key = &keys[n];
            // Read after the group's last ID, then deliver if nobody moved it meanwhile.
            let delivered = loop {
                let Some((rec, _)) = load(conn, key, &group).await? else {
                    return Err(nogroup(key));
                };
                let page = read_page(
                    conn,
                    key,
                    (rec.last.successor(), StreamId::MAX),
                    count,
                    false,
                    true,
                )
                .await?;
                if page.entries.is_empty() {
                    break Vec::new();
                }
                let ids = page
                    .entries
                    .iter()
                    .filter_map(|e| match e {
                        Reply::Array(p) => match p.first() {
                            Some(Reply::Bulk(id)) => StreamId::parse_with(id, 0).ok(),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect();
                let op = GroupOp::Deliver {
                    consumer: consumer.clone(),
                    expect: rec.last,
                    ids,
                    noack,
                    now_ms: conn.now_ms,
                };
                match apply(conn, key, &group, op, || nogroup(key)).await? {
                    Reply::Integer(1) => break page.entries,
                    // Another consumer of the group took them: read on from where it left.
                    _ => continue,
                }
            };
            if !delivered.is_empty() {
                found.push((key.clone(), delivered));
            }
        }
        if !found.is_empty() {
            break 'read;
        }
        match deadline {
            None => break 'read,
            Some(Some(at)) if tokio::time::Instant::now() >= at => break 'read,
            Some(at) => {
                let wait = at.map_or(super::streams::XREAD_POLL, |at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                        .min(super::streams::XREAD_POLL)
                });
                // Woken by an apply on any shard of the streams read (a merged stream's
                // idle shards are closed by the next read), or the poll.
                let shards: Vec<(std::sync::Arc<crate::node::Keyspace>, u32)> = fresh
                    .iter()
                    .filter_map(|n| resolve(conn, &keys[*n]).ok())
                    .flat_map(|(ks, t)| match t {
                        Target::Shard(s) => vec![(ks, s)],
                        Target::Merged => (0..ks.shard_count().unwrap_or(0) as u32)
                            .map(|s| (ks.clone(), s))
                            .collect(),
                    })
                    .collect();
                let marks: Vec<Option<u64>> =
                    shards.iter().map(|(ks, s)| ks.changes_mark(*s)).collect();
                let applied = async {
                    if shards.is_empty() {
                        tokio::time::sleep(wait).await;
                    } else {
                        futures::future::select_all(
                            shards
                                .iter()
                                .zip(&marks)
                                .map(|((ks, s), mark)| Box::pin(ks.wait_changes(*s, *mark, wait))),
                        )
                        .await;
                    }
                };
                tokio::select! {
                    _ = applied => {}
                    _ = probe.closed() => return Ok(()),
                    _ = shutdown.changed() => return Err("TRYAGAIN server is shutting down".into()),
                }
            }
        }
    }
    if found.is_empty() {
        conn.out.reply(&Reply::NilArray);
        return Ok(());
    }
    let reply = if conn.out.resp3 {
        Reply::Map(
            found
                .into_iter()
                .map(|(k, e)| (Reply::Bulk(k), Reply::Array(e)))
                .collect(),
        )
    } else {
        Reply::Array(
            found
                .into_iter()
                .map(|(k, e)| Reply::Array(vec![Reply::Bulk(k), Reply::Array(e)]))
                .collect(),
        )
    };
    conn.out.reply(&reply);
    Ok(())
}

/// `XINFO GROUPS key` | `XINFO CONSUMERS key group`.
pub(super) async fn xinfo(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    let pairs = |conn: &Connection, kv: Vec<(&'static str, Reply)>| {
        if conn.out.resp3 {
            Reply::Map(
                kv.into_iter()
                    .map(|(k, v)| (Reply::Bulk(Bytes::from_static(k.as_bytes())), v))
                    .collect(),
            )
        } else {
            Reply::Array(
                kv.into_iter()
                    .flat_map(|(k, v)| [Reply::Bulk(Bytes::from_static(k.as_bytes())), v])
                    .collect(),
            )
        }
    };
    match (sub.as_slice(), args.len()) {
        (b"groups", 3) => {
            let key = &args[2];
            let (ks, target) = resolve(conn, key)?;
            let reply = ks
                .changes_group_query(
                    &stream_name(&ks, target),
                    None,
                    conn.now_ms,
                    conn.consistency,
                )
                .await
                .map_err(|e| error_line(&e))?;
            let Reply::Array(rows) = reply else {
                return Err("ERR unexpected consumer-group state".into());
            };
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let Reply::Array(pair) = r else { continue };
                let [Reply::Bulk(name), Reply::Bulk(rec)] = pair.as_slice() else {
                    continue;
                };
                let rec: GroupRecord = postcard::from_bytes(rec)
                    .map_err(|_| "ERR unexpected consumer-group state".to_string())?;
                out.push(pairs(
                    conn,
                    vec![
                        ("name", Reply::Bulk(name.clone())),
                        ("consumers", Reply::Integer(rec.consumers.len() as i64)),
                        ("pending", Reply::Integer(rec.pending as i64)),
                        (
                            "last-delivered-id",
                            Reply::Bulk(Bytes::from(rec.last.to_string())),
                        ),
                        ("entries-read", Reply::Integer(rec.entries_read as i64)),
                        ("lag", Reply::Nil),
                    ],
                ));
            }
            conn.out.reply(&Reply::Array(out));
            Ok(())
        }
        (b"consumers", 4) => {
            let (key, group) = (&args[2], &args[3]);
            let Some((rec, pel)) = load(conn, key, group).await? else {
                return Err(no_key_or_group(key, group));
            };
            let out = rec
                .consumers
                .iter()
                .map(|(name, (seen, active))| {
                    let pending = pel.iter().filter(|(_, p)| p.consumer == *name).count();
                    let inactive = if *active == 0 {
                        -1
                    } else {
                        conn.now_ms.saturating_sub(*active) as i64
                    };
                    pairs(
                        conn,
                        vec![
                            ("name", Reply::Bulk(name.clone())),
                            ("pending", Reply::Integer(pending as i64)),
                            (
                                "idle",
                                Reply::Integer(conn.now_ms.saturating_sub(*seen) as i64),
                            ),
                            ("inactive", Reply::Integer(inactive)),
                        ],
                    )
                })
                .collect();
            conn.out.reply(&Reply::Array(out));
            Ok(())
        }
        _ => Err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try XINFO HELP.",
            lossy(&args[1])
        )),
    }
}
