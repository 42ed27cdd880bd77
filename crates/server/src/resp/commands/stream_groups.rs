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
//! group's position is not counted); LASTID in XCLAIM is accepted and ignored; the commands
//! are refused inside MULTI; groups do not pin the retention yet. As in Redis 7, claimed
//! entries gone with the retention leave the pending list (XAUTOCLAIM lists them as
//! deleted); a history read answers them as `[id, nil]`.

use std::time::Duration;

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::changes::groups::{
    GroupCommand, GroupOp, GroupRecord, NAME_MAX, PEL_MAX, PEL_PAGE_MAX, Pending,
};
use capdb_types::changes::{StreamId, StreamKey};

use super::streams::{
    Page, Target, parse_id, per_key_reply, read_page, resolve, wait_applied, wake_shards,
};
use super::{Outcome, error_line, parse_int, syntax};
use crate::resp::Connection;

/// The name a stream's groups are kept under: the keyspace (merged) or `<keyspace>#<n>`.
fn stream_name(ks: &crate::node::Keyspace, target: Target, key: &[u8]) -> Bytes {
    let mut name = match target {
        Target::Merged => ks.spec.name.to_string().into_bytes(),
        Target::Shard(n) => format!("{}#{n}", ks.spec.name).into_bytes(),
    };
    // A key-prefix stream is a stream of its own: its groups are not the whole stream's.
    if let Some(prefix) = StreamKey::parse(key).ok().flatten().and_then(|k| k.prefix) {
        name.push(b':');
        name.extend_from_slice(&prefix);
    }
    Bytes::from(name)
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
        stream: stream_name(&ks, target, key),
        group: Bytes::copy_from_slice(group),
        op,
    };
    match ks.changes_group(cmd).await.map_err(|e| error_line(&e))? {
        Ok(reply) => Ok(reply),
        Err(capdb_types::Error::Command(line)) if line == "NOGROUP" => Err(nogroup()),
        Err(e) => Err(error_line(&e)),
    }
}

/// The group's record (`None`: no such group); `fresh`: read linearizably whatever the
/// connection's consistency (a delivery's compare-and-set starts from it).
async fn load(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
    fresh: bool,
) -> Result<Option<GroupRecord>, String> {
    Ok(query_group(conn, key, group, None, fresh).await?.0)
}

/// Every pending entry from `from` on, page by page, to `visit` until it answers false
/// (`None`: no such group). At most [`PEL_MAX`] entries in all.
async fn each_pending(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
    from: StreamId,
    mut visit: impl FnMut(StreamId, Pending) -> bool,
) -> Result<Option<()>, String> {
    let mut from = from;
    for _ in 0..=PEL_MAX / PEL_PAGE_MAX {
        let (rec, rows) = query_group(conn, key, group, Some((from, PEL_PAGE_MAX)), false).await?;
        if rec.is_none() {
            return Ok(None);
        }
        let full = rows.len() == PEL_PAGE_MAX;
        let mut next = None;
        for (id, p) in rows {
            next = Some(id.successor());
            if !visit(id, p) {
                return Ok(Some(()));
            }
        }
        match next {
            Some(n) if full => from = n,
            _ => break,
        }
    }
    Ok(Some(()))
}

type GroupState = (Option<GroupRecord>, Vec<(StreamId, Pending)>);

/// The group's record and a page of its pending entries (`page`: from, count).
async fn query_group(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
    page: Option<(StreamId, usize)>,
    fresh: bool,
) -> Result<GroupState, String> {
    let (ks, target) = resolve(conn, key)?;
    let c = if fresh {
        crate::node::Consistency::default()
    } else {
        conn.consistency
    };
    let reply = ks
        .changes_group_query(
            &stream_name(&ks, target, key),
            Some(group),
            page,
            conn.now_ms,
            c,
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
        return Ok((None, Vec::new()));
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
    Ok((Some(rec), pel))
}

/// A name a group or consumer may have (the storage refuses longer ones too).
fn check_name(name: &[u8]) -> Result<(), String> {
    if name.len() > NAME_MAX {
        return Err(format!(
            "ERR consumer group and consumer names are at most {NAME_MAX} bytes"
        ));
    }
    Ok(())
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
            scanned: None,
            partial: false,
        },
        Err(e) => return Err(e),
    };
    Ok(page.entries.into_iter().next().unwrap_or_else(|| {
        Reply::Array(vec![Reply::Bulk(Bytes::from(id.to_string())), Reply::Nil])
    }))
}

/// Whether an entry [`entry_by_id`] answered is gone (trimmed by the retention).
fn is_gone(entry: &Reply) -> bool {
    matches!(entry, Reply::Array(p) if matches!(p.get(1), Some(Reply::Nil)))
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
            check_name(group)?;
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
            check_name(&args[4])?;
            let op = GroupOp::CreateConsumer {
                consumer: args[4].clone(),
                now_ms: capdb_types::unix_now_ms(),
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
    let now_ms = capdb_types::unix_now_ms();
    let reply = match extended {
        None => {
            let (mut total, mut min, mut max) = (0i64, None, None);
            let mut per: std::collections::BTreeMap<Bytes, u64> = Default::default();
            let found = each_pending(conn, key, group, StreamId::MIN, |id, p| {
                total += 1;
                min = min.or(Some(id));
                max = Some(id);
                *per.entry(p.consumer).or_default() += 1;
                true
            })
            .await?;
            if found.is_none() {
                return Err(no_key_or_group(key, group));
            }
            let id = |i: Option<StreamId>| {
                i.map_or(Reply::Nil, |i| Reply::Bulk(Bytes::from(i.to_string())))
            };
            if total == 0 {
                Reply::Array(vec![
                    Reply::Integer(0),
                    Reply::Nil,
                    Reply::Nil,
                    Reply::NilArray,
                ])
            } else {
                Reply::Array(vec![
                    Reply::Integer(total),
                    id(min),
                    id(max),
                    Reply::Array(
                        per.into_iter()
                            .map(|(c, n)| {
                                Reply::Array(vec![
                                    Reply::Bulk(c),
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
            let (lo, hi) = range.unwrap_or((StreamId::MAX, StreamId::MIN));
            let found = each_pending(conn, key, group, lo, |id, p| {
                if out.len() as i64 >= count || id > hi {
                    return false;
                }
                let idle = now_ms.saturating_sub(p.delivered_ms);
                if min_idle.is_some_and(|m| idle < m) || consumer.is_some_and(|c| *c != p.consumer)
                {
                    return true;
                }
                out.push(Reply::Array(vec![
                    Reply::Bulk(Bytes::from(id.to_string())),
                    Reply::Bulk(p.consumer),
                    Reply::Integer(idle as i64),
                    Reply::Integer(p.deliveries as i64),
                ]));
                true
            })
            .await?;
            if found.is_none() {
                return Err(no_key_or_group(key, group));
            }
            Reply::Array(out)
        }
    };
    conn.out.reply(&reply);
    Ok(())
}

/// Entries for claimed IDs (or the IDs alone with `justid`), and the IDs of those gone with
/// the retention, which leave the pending list (as Redis 7 drops deleted entries).
async fn claimed_entries(
    conn: &Connection,
    key: &[u8],
    group: &[u8],
    ids: Vec<Reply>,
    justid: bool,
) -> Result<(Vec<Reply>, Vec<Reply>), String> {
    if justid {
        return Ok((ids, Vec::new()));
    }
    let (mut out, mut gone) = (Vec::with_capacity(ids.len()), Vec::new());
    for r in ids {
        let Reply::Bulk(id) = r else { continue };
        let id = parse_id(&id)?;
        let entry = entry_by_id(conn, key, id).await?;
        if is_gone(&entry) {
            gone.push(id);
        } else {
            out.push(entry);
        }
    }
    if !gone.is_empty() {
        let op = GroupOp::Ack { ids: gone.clone() };
        apply(conn, key, group, op, String::new).await?;
    }
    let gone = gone
        .into_iter()
        .map(|id| Reply::Bulk(Bytes::from(id.to_string())))
        .collect();
    Ok((out, gone))
}

/// `XCLAIM key group consumer min-idle-time id [id ...] [IDLE ms] [TIME unix-time-ms]
/// [RETRYCOUNT count] [FORCE] [JUSTID] [LASTID lastid]`.
pub(super) async fn xclaim(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (key, group, consumer) = (&args[1], &args[2], &args[3]);
    check_name(consumer)?;
    let min_idle = parse_int(&args[4])
        .map_err(|_| "ERR Invalid min-idle-time argument for XCLAIM".to_string())?;
    let now_ms = capdb_types::unix_now_ms();
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
                delivered_ms = Some(now_ms.saturating_sub(n.max(0) as u64));
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
        now_ms,
    };
    let reply = apply(conn, key, group, op, || no_key_or_group(key, group)).await?;
    let Reply::Array(ids) = reply else {
        return Err("ERR unexpected answer to XCLAIM".into());
    };
    let (entries, _gone) = claimed_entries(conn, key, group, ids, justid).await?;
    conn.out.reply(&Reply::Array(entries));
    Ok(())
}

/// `XAUTOCLAIM key group consumer min-idle-time start [COUNT count] [JUSTID]`.
pub(super) async fn xautoclaim(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (key, group, consumer) = (&args[1], &args[2], &args[3]);
    check_name(consumer)?;
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
        now_ms: capdb_types::unix_now_ms(),
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
    let (entries, gone) = claimed_entries(conn, key, group, ids, justid).await?;
    conn.out.reply(&Reply::Array(vec![
        next,
        Reply::Array(entries),
        Reply::Array(gone),
    ]));
    Ok(())
}

/// How many times one XREADGROUP tries to deliver when other consumers keep winning.
const DELIVER_TRIES: u32 = 100;

/// Where a group whose next entries went with the retention moves to, from the
/// `HISTORYLOST` line (which names the oldest entry of a shard): just before it, in the
/// stream `key` names.
fn skip_target(line: &str, key: &[u8]) -> Option<StreamId> {
    let _ = key;
    // The line names, in the stream's own IDs, the oldest position held (a merged stream's
    // is past every event at the trimmed clock: `merged::in_merged_terms`).
    let oldest = line
        .split_whitespace()
        .find_map(|w| StreamId::parse_with(w.trim_end_matches([';', ',']).as_bytes(), 0).ok())?;
    Some(oldest.predecessor())
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
    check_name(&consumer)?;
    // Every group first (as Redis checks them before serving any), read linearizably: the
    // `>` reads start from their last IDs.
    let mut last: Vec<Option<StreamId>> = Vec::with_capacity(keys.len());
    for (key, id) in keys.iter().zip(ids) {
        let Some(rec) = load(conn, key, &group, true).await? else {
            return Err(nogroup(key));
        };
        last.push((id.as_ref() == b">").then_some(rec.last));
    }
    let mut found: Vec<(Bytes, Vec<Reply>)> = Vec::new();
    // History reads (an ID): the consumer's pending entries after it, never blocking.
    for (key, id) in keys.iter().zip(ids) {
        if id.as_ref() == b">" {
            continue;
        }
        let after = id_arg(id)?;
        let op = GroupOp::Seen {
            consumer: consumer.clone(),
            now_ms: capdb_types::unix_now_ms(),
        };
        apply(conn, key, &group, op, || nogroup(key)).await?;
        let mut mine = Vec::new();
        let visited = each_pending(conn, key, &group, after.successor(), |pid, p| {
            if p.consumer == consumer {
                mine.push(pid);
            }
            mine.len() < count
        })
        .await?;
        if visited.is_none() {
            return Err(nogroup(key));
        }
        let mut entries = Vec::with_capacity(mine.len());
        for pid in mine {
            entries.push(entry_by_id(conn, key, pid).await?);
        }
        found.push((key.clone(), entries));
    }
    let deadline = block
        .filter(|_| found.is_empty())
        .map(|ms| (ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms)));
    let mut probe = super::blocking::ClosedProbe::new(conn.socket_fd);
    let mut shutdown = conn.shutdown.clone();
    // The shards whose applies wake a blocked read (a merged stream's: all).
    let targets: Vec<_> = keys
        .iter()
        .zip(&last)
        .filter(|(_, l)| l.is_some())
        .filter_map(|(k, _)| resolve(conn, k).ok())
        .collect();
    let shards = wake_shards(&targets);
    // Per key, how far a read found nothing after the group's last ID (a merged stream's
    // resolved ID, a prefix stream's scanned one): the next round reads on from there.
    let mut seen: Vec<Option<StreamId>> = vec![None; keys.len()];
    'read: loop {
        // Taken before the reads: an apply after them moves the marks, so the wait below
        // cannot miss it.
        let marks: Vec<Option<u64>> = shards.iter().map(|(ks, s)| ks.changes_mark(*s)).collect();
        for (n, key) in keys.iter().enumerate() {
            let Some(mut after) = last[n] else { continue };
            // Read after the group's last ID, then deliver if nobody moved it meanwhile; a
            // consumer that lost the race reads on from the winner's last ID.
            let mut tries = 0;
            let delivered = loop {
                tries += 1;
                if tries > DELIVER_TRIES {
                    let e = format!(
                        "ERR consumer group '{}' kept moving: {DELIVER_TRIES} deliveries lost the race; try again",
                        lossy(&group)
                    );
                    if found.is_empty() {
                        return Err(e);
                    }
                    // Deliveries already recorded are answered, never dropped.
                    break Vec::new();
                }
                let start = seen[n].filter(|s| *s > after).unwrap_or(after);
                let page = match read_page(
                    conn,
                    key,
                    (start.successor(), StreamId::MAX),
                    count,
                    false,
                    true,
                )
                .await
                {
                    Ok(p) => p,
                    Err(e) if e.starts_with("HISTORYLOST") => {
                        // What the group would read next went with the retention: it
                        // reads on from the oldest entry held, as Redis does.
                        let Some(to) = skip_target(&e, key) else {
                            return Err(e);
                        };
                        let op = GroupOp::Skip { expect: after, to };
                        match apply(conn, key, &group, op, || nogroup(key)).await {
                            Ok(Reply::Bulk(id)) => {
                                after = parse_id(&id)?;
                                seen[n] = None;
                            }
                            Ok(_) => return Err("ERR unexpected answer to a skip".into()),
                            Err(e) if found.is_empty() => return Err(e),
                            Err(_) => break Vec::new(),
                        }
                        continue;
                    }
                    Err(e) if found.is_empty() => return Err(e),
                    Err(_) => break Vec::new(),
                };
                if page.entries.is_empty() {
                    seen[n] = page.resolved.or(page.scanned).max(Some(start));
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
                    expect: after,
                    ids,
                    noack,
                    // When the entries are handed out (a blocked read may have waited long).
                    now_ms: capdb_types::unix_now_ms(),
                };
                match apply(conn, key, &group, op, || nogroup(key)).await {
                    Ok(Reply::Integer(1)) => break page.entries,
                    // Another consumer of the group took them: read on from where it left.
                    Ok(Reply::Bulk(id)) => {
                        after = parse_id(&id)?;
                        seen[n] = None;
                    }
                    Ok(_) => return Err("ERR unexpected answer to a delivery".into()),
                    Err(e) if found.is_empty() => return Err(e),
                    Err(_) => break Vec::new(),
                }
            };
            last[n] = Some(after);
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
                let applied = wait_applied(&shards, &marks, wait);
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
    conn.out.reply(&per_key_reply(conn.out.resp3, found));
    Ok(())
}

/// The first entry of the stream `key` names at or after `from` (`None`: none), reading on
/// from where the retention left the log when `from` went with it (a few tries: each shard's
/// floor at most once).
async fn first_entry(
    conn: &Connection,
    key: &[u8],
    start: StreamId,
    shards: usize,
) -> Result<Option<Reply>, String> {
    let mut from = start;
    for _ in 0..shards + FIRST_ENTRY_TRIES {
        match read_page(conn, key, (from, StreamId::MAX), 1, false, true).await {
            Ok(page) => return Ok(page.entries.into_iter().next()),
            Err(e) if e.starts_with("HISTORYLOST") => match skip_target(&e, key) {
                Some(to) if to.successor() > from => from = to.successor(),
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Err("TRYAGAIN the change log kept being trimmed under the read; try again".into())
}

/// Reads of the first entry tried past the shards' count, when the retention keeps trimming
/// under them.
const FIRST_ENTRY_TRIES: usize = 5;

/// `XINFO STREAM key`: Redis 7's fields, then capdb's. Differences: `entries-added` counts
/// the events held (not every one ever logged); `max-deleted-entry-id` is where the
/// retention trimmed (on a merged stream: the end of the newest clock any shard trimmed);
/// the radix-tree fields are 0.
async fn stream_info(conn: &Connection, key: &[u8]) -> Result<Vec<(&'static str, Reply)>, String> {
    let (ks, target) = resolve(conn, key)?;
    let now = read_page(conn, key, (StreamId::MAX, StreamId::MAX), 0, false, false).await?;
    let prefix = StreamKey::parse(key).ok().flatten().and_then(|k| k.prefix);
    let (shard, shards): (Option<u32>, Vec<u32>) = match target {
        Target::Shard(n) => (Some(n), vec![n]),
        Target::Merged => (None, (0..ks.shard_count().unwrap_or(0) as u32).collect()),
    };
    let length = match &prefix {
        Some(p) => crate::node::prefixed::count(&ks, shard, p, conn.now_ms, conn.consistency)
            .await
            .map_err(|e| error_line(&e))?,
        None => now.events,
    };
    let mut trimmed = StreamId::MIN;
    for s in &shards {
        let page = ks
            .changes_read(
                *s,
                (StreamId::MAX, StreamId::MAX),
                0,
                false,
                conn.now_ms,
                conn.consistency,
            )
            .await
            .map_err(|e| error_line(&e))?;
        trimmed = trimmed.max(page.floor);
    }
    if shard.is_none() && trimmed != StreamId::MIN {
        trimmed = capdb_types::changes::merged::clock_end(trimmed.clock());
    }
    // From just past what the retention cut (a read below it is refused).
    let start = if trimmed == StreamId::MIN {
        StreamId::MIN
    } else {
        trimmed.successor()
    };
    let first = first_entry(conn, key, start, shards.len()).await?;
    let last = match first.as_ref().and_then(crate::node::prefixed::entry_id) {
        Some(oldest) => read_page(conn, key, (oldest, StreamId::MAX), 1, true, true)
            .await?
            .entries
            .into_iter()
            .next(),
        None => None,
    };
    let groups = match ks
        .changes_group_query(
            &stream_name(&ks, target, key),
            None,
            None,
            conn.now_ms,
            conn.consistency,
        )
        .await
        .map_err(|e| error_line(&e))?
    {
        Reply::Array(rows) => rows.len() as i64,
        _ => 0,
    };
    let id = |id: StreamId| Reply::Bulk(Bytes::from(id.to_string()));
    let recorded_first = first
        .as_ref()
        .and_then(crate::node::prefixed::entry_id)
        .unwrap_or(StreamId::MIN);
    let mut fields = vec![
        (
            "length",
            Reply::Integer(i64::try_from(length).unwrap_or(i64::MAX)),
        ),
        ("radix-tree-keys", Reply::Integer(0)),
        ("radix-tree-nodes", Reply::Integer(0)),
        ("last-generated-id", id(now.last)),
        ("max-deleted-entry-id", id(trimmed)),
        (
            "entries-added",
            Reply::Integer(i64::try_from(length).unwrap_or(i64::MAX)),
        ),
        ("recorded-first-entry-id", id(recorded_first)),
        ("groups", Reply::Integer(groups)),
        ("first-entry", first.unwrap_or(Reply::Nil)),
        ("last-entry", last.unwrap_or(Reply::Nil)),
    ];
    if let Some(resolved) = now.resolved {
        fields.push(("resolved-id", id(resolved)));
    }
    fields.push(("shards", Reply::Integer(shards.len() as i64)));
    Ok(fields)
}

/// `XINFO STREAM key` | `XINFO GROUPS key` | `XINFO CONSUMERS key group`.
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
        (b"stream", 3) => {
            let fields = stream_info(conn, &args[2]).await?;
            let reply = pairs(conn, fields);
            conn.out.reply(&reply);
            Ok(())
        }
        (b"stream", _) if args.len() > 3 && args[3].eq_ignore_ascii_case(b"full") => Err(
            "ERR XINFO STREAM FULL is not supported on change streams; use XINFO STREAM, XINFO GROUPS and XPENDING".into(),
        ),
        (b"groups", 3) => {
            let key = &args[2];
            let (ks, target) = resolve(conn, key)?;
            let reply = ks
                .changes_group_query(
                    &stream_name(&ks, target, key),
                    None,
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
            let no_group = || {
                format!(
                    "NOGROUP No such consumer group '{}' for key name '{}'",
                    lossy(group),
                    lossy(key)
                )
            };
            let Some(rec) = load(conn, key, group, false).await? else {
                return Err(no_group());
            };
            let mut per: std::collections::HashMap<Bytes, i64> = Default::default();
            each_pending(conn, key, group, StreamId::MIN, |_, p| {
                *per.entry(p.consumer).or_default() += 1;
                true
            })
            .await?
            .ok_or_else(no_group)?;
            let now_ms = capdb_types::unix_now_ms();
            let out = rec
                .consumers
                .iter()
                .map(|(name, (seen, active))| {
                    let pending = per.get(name).copied().unwrap_or(0);
                    let inactive = if *active == 0 {
                        -1
                    } else {
                        now_ms.saturating_sub(*active) as i64
                    };
                    pairs(
                        conn,
                        vec![
                            ("name", Reply::Bulk(name.clone())),
                            ("pending", Reply::Integer(pending)),
                            ("idle", Reply::Integer(now_ms.saturating_sub(*seen) as i64)),
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
