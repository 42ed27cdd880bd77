//! Consumer groups of change streams (issue 14, design §5): each group's record and pending
//! list, kept in the element table of the keyspace's first shard under the reserved id 0 and
//! changed only through that shard's Raft log (`Request::ChangesGroup`), so that a delivery
//! or an acknowledgement survives a failover, a retried one is applied once, and every
//! replica answers the same.
//!
//! # Rows
//!
//! - `0‖chg-grp/‖len‖stream‖len‖group` -> [`GroupRecord`] (postcard): where `>` reads on
//!   from, the consumers, the pending count.
//! - `0‖chg-pel/‖len‖stream‖len‖group‖ms‖seq` (big-endian, so rows sort by ID) ->
//!   [`Pending`]: one delivered, unacknowledged entry.
//!
//! Streams and groups are named by arbitrary bytes (length-prefixed, so no name is a prefix
//! of another's rows). Bounds: [`PEL_MAX`] pending entries and [`CONSUMERS_MAX`] consumers per
//! group, [`GROUPS_MAX`] groups per stream; past them a change is refused with an error that
//! says what to do. The rows are replicated state: snapshots carry the element table and
//! FLUSHDB carries them over (`changes::carried_rows`).

use bytes::Bytes;
use capdb_types::changes::StreamId;
use capdb_types::changes::groups::{
    CONSUMERS_MAX, GROUPS_MAX, GroupCommand, GroupOp, GroupRecord, NAME_MAX, PEL_MAX, PEL_PAGE_MAX,
    Pending,
};
use capdb_types::{Error, Reply, Result};
use redb::ReadableTable;

use super::{io_err, table_def};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// The internal read command that answers a stream's groups (`DiskTable::groups_query`).
pub const CHANGES_GROUP_QUERY: &str = "capdb.changes-group";
/// The internal read command that answers every group's position ([`positions`]).
pub const CHANGES_PINS_QUERY: &str = "capdb.changes-pins";
/// Groups [`positions`] looks at, at most (the ones past it hold no history back; with
/// [`GROUPS_MAX`] per stream, that is many streams' worth).
pub const PINS_GROUPS_MAX: usize = 10_000;

const RESERVED: [u8; 8] = [0; 8];
pub(super) const GROUP_ROWS: &[u8] = b"chg-grp/";
pub(super) const PEL_ROWS: &[u8] = b"chg-pel/";

fn named(kind: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(kind);
    for p in parts {
        k.extend_from_slice(&(p.len() as u32).to_be_bytes());
        k.extend_from_slice(p);
    }
    k
}

/// The reserved prefix of every group row, and of every pending row (FLUSHDB carries both).
pub(super) fn all_rows_prefixes() -> [Vec<u8>; 2] {
    [named(GROUP_ROWS, &[]), named(PEL_ROWS, &[])]
}

fn group_key(stream: &[u8], group: &[u8]) -> Vec<u8> {
    named(GROUP_ROWS, &[stream, group])
}

fn pel_prefix(stream: &[u8], group: &[u8]) -> Vec<u8> {
    named(PEL_ROWS, &[stream, group])
}

fn pel_key(prefix: &[u8], id: StreamId) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&id.ms.to_be_bytes());
    k.extend_from_slice(&id.seq.to_be_bytes());
    k
}

fn id_of_pel_key(prefix: &[u8], key: &[u8]) -> Option<StreamId> {
    let rest = key.strip_prefix(prefix)?;
    let ms = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    Some(StreamId { ms, seq })
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(raw).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::Io(format!("a group row does not encode: {e}")))
}

/// Rows whose key starts with `prefix`, from `from` on (keys and values copied), at most
/// `max`.
fn scan(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    from: &[u8],
    max: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for r in el.range(from..).map_err(io_err)? {
        let (k, v) = r.map_err(io_err)?;
        if !k.value().starts_with(prefix) || out.len() >= max {
            break;
        }
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

fn nogroup() -> Result<Result<Reply>> {
    Ok(Err(Error::Command("NOGROUP".into())))
}

fn refuse(line: String) -> Result<Result<Reply>> {
    Ok(Err(Error::Command(line)))
}

fn id_reply(id: StreamId) -> Reply {
    Reply::Bulk(Bytes::from(id.to_string()))
}

/// Makes sure `consumer` exists (`Err`: the group is full of consumers), seen at `now_ms`.
fn touch_consumer(rec: &mut GroupRecord, consumer: &Bytes, now_ms: u64, active: bool) -> bool {
    let full = rec.consumers.len() >= CONSUMERS_MAX;
    match rec.consumers.get_mut(consumer) {
        Some(c) => {
            c.0 = now_ms;
            if active {
                c.1 = now_ms;
            }
            true
        }
        None if full => false,
        None => {
            rec.consumers
                .insert(consumer.clone(), (now_ms, if active { now_ms } else { 0 }));
            true
        }
    }
}

fn consumers_full() -> Result<Result<Reply>> {
    refuse(format!(
        "ERR the consumer group has {CONSUMERS_MAX} consumers, its most: delete some (XGROUP DELCONSUMER)"
    ))
}

/// Applies one group command in the job of `x` (the shard's element table `el_table`):
/// its answer (an error inside: refused, nothing changed; `NOGROUP` alone when the group is
/// missing, which the gateway words per command).
pub(super) fn apply(
    x: &super::ops::Exec,
    el_table: &str,
    cmd: &GroupCommand,
) -> Result<Result<Reply>> {
    let named_too_long = match &cmd.op {
        GroupOp::CreateConsumer { consumer, .. }
        | GroupOp::Deliver { consumer, .. }
        | GroupOp::Seen { consumer, .. }
        | GroupOp::Claim { consumer, .. }
        | GroupOp::AutoClaim { consumer, .. } => consumer.len() > NAME_MAX,
        _ => false,
    };
    if named_too_long || cmd.group.len() > NAME_MAX {
        return refuse(format!(
            "ERR consumer group and consumer names are at most {NAME_MAX} bytes"
        ));
    }
    let mut el: RawTable<'_> = x.txn.open_table(table_def(el_table)).map_err(io_err)?;
    let gkey = group_key(&cmd.stream, &cmd.group);
    let rec: Option<GroupRecord> = match el.get(&gkey[..]).map_err(io_err)? {
        Some(raw) => Some(decode(raw.value(), "a consumer group record")?),
        None => None,
    };
    let pel = pel_prefix(&cmd.stream, &cmd.group);
    let put = |el: &mut RawTable<'_>, rec: &GroupRecord| -> Result<()> {
        el.insert(&gkey[..], &encode(rec)?[..]).map_err(io_err)?;
        Ok(())
    };
    match &cmd.op {
        GroupOp::Create { last, entries_read } => {
            if rec.is_some() {
                return refuse("BUSYGROUP Consumer Group name already exists".into());
            }
            let prefix = named(GROUP_ROWS, &[&cmd.stream]);
            if scan(&el, &prefix, &prefix, GROUPS_MAX)?.len() >= GROUPS_MAX {
                return refuse(format!(
                    "ERR this stream has {GROUPS_MAX} consumer groups, its most: destroy some first"
                ));
            }
            let rec = GroupRecord {
                last: *last,
                entries_read: entries_read.unwrap_or(0),
                ..GroupRecord::default()
            };
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        GroupOp::Destroy => {
            if rec.is_none() {
                return Ok(Ok(Reply::Integer(0)));
            }
            el.remove(&gkey[..]).map_err(io_err)?;
            for (k, _) in scan(&el, &pel, &pel, usize::MAX)? {
                el.remove(&k[..]).map_err(io_err)?;
            }
            Ok(Ok(Reply::Integer(1)))
        }
        GroupOp::SetId { last, entries_read } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            rec.last = *last;
            if let Some(n) = entries_read {
                rec.entries_read = *n;
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        GroupOp::CreateConsumer { consumer, now_ms } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if rec.consumers.contains_key(consumer) {
                return Ok(Ok(Reply::Integer(0)));
            }
            if !touch_consumer(&mut rec, consumer, *now_ms, false) {
                return consumers_full();
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Integer(1)))
        }
        GroupOp::DelConsumer { consumer } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if rec.consumers.remove(consumer).is_none() {
                return Ok(Ok(Reply::Integer(0)));
            }
            let mut gone = 0i64;
            for (k, v) in scan(&el, &pel, &pel, usize::MAX)? {
                let p: Pending = decode(&v, "a pending entry")?;
                if p.consumer == *consumer {
                    el.remove(&k[..]).map_err(io_err)?;
                    gone += 1;
                }
            }
            rec.pending = rec.pending.saturating_sub(gone as u64);
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Integer(gone)))
        }
        GroupOp::Deliver {
            consumer,
            expect,
            ids,
            noack,
            now_ms,
        } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if rec.last != *expect {
                // Another consumer took these: the reader reads again from the new last ID.
                return Ok(Ok(id_reply(rec.last)));
            }
            if !touch_consumer(&mut rec, consumer, *now_ms, !ids.is_empty()) {
                return consumers_full();
            }
            if !noack && rec.pending as usize + ids.len() > PEL_MAX {
                return refuse(format!(
                    "ERR the consumer group has {} pending entries, its most is {PEL_MAX}: acknowledge some (XACK) first",
                    rec.pending
                ));
            }
            if let Some(last) = ids.iter().max() {
                rec.last = rec.last.max(*last);
            }
            rec.entries_read += ids.len() as u64;
            if !noack {
                let row = encode(&Pending {
                    consumer: consumer.clone(),
                    delivered_ms: *now_ms,
                    deliveries: 1,
                })?;
                for id in ids {
                    let had = el
                        .insert(&pel_key(&pel, *id)[..], &row[..])
                        .map_err(io_err)?
                        .is_some();
                    if !had {
                        rec.pending += 1;
                    }
                }
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Integer(1)))
        }
        GroupOp::Skip { expect, to } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if rec.last == *expect && *to > rec.last {
                rec.last = *to;
                put(&mut el, &rec)?;
            }
            Ok(Ok(id_reply(rec.last)))
        }
        GroupOp::Seen { consumer, now_ms } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if !touch_consumer(&mut rec, consumer, *now_ms, false) {
                return consumers_full();
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        GroupOp::Ack { ids } => {
            let Some(mut rec) = rec else {
                return Ok(Ok(Reply::Integer(0)));
            };
            let mut acked = 0i64;
            for id in ids {
                if el
                    .remove(&pel_key(&pel, *id)[..])
                    .map_err(io_err)?
                    .is_some()
                {
                    acked += 1;
                }
            }
            if acked > 0 {
                rec.pending = rec.pending.saturating_sub(acked as u64);
                put(&mut el, &rec)?;
            }
            Ok(Ok(Reply::Integer(acked)))
        }
        GroupOp::Claim {
            consumer,
            min_idle_ms,
            ids,
            delivered_ms,
            retry_count,
            force,
            justid,
            now_ms,
        } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if !touch_consumer(&mut rec, consumer, *now_ms, false) {
                return consumers_full();
            }
            let mut claimed = Vec::new();
            for id in ids {
                let key = pel_key(&pel, *id);
                let current: Option<Pending> = match el.get(&key[..]).map_err(io_err)? {
                    Some(raw) => Some(decode(raw.value(), "a pending entry")?),
                    None => None,
                };
                let mut p = match current {
                    Some(p) => {
                        let idle = now_ms.saturating_sub(p.delivered_ms);
                        if *min_idle_ms > 0 && idle < *min_idle_ms {
                            continue;
                        }
                        p
                    }
                    // FORCE: into the pending list even if it was not there (never past the
                    // group's last ID: it must have been delivered).
                    None if *force && *id <= rec.last && (rec.pending as usize) < PEL_MAX => {
                        rec.pending += 1;
                        Pending {
                            consumer: consumer.clone(),
                            delivered_ms: *now_ms,
                            deliveries: 0,
                        }
                    }
                    None => continue,
                };
                p.consumer = consumer.clone();
                p.delivered_ms = delivered_ms.unwrap_or(*now_ms);
                match retry_count {
                    Some(n) => p.deliveries = *n,
                    None if !justid => p.deliveries += 1,
                    None => {}
                }
                el.insert(&key[..], &encode(&p)?[..]).map_err(io_err)?;
                claimed.push(id_reply(*id));
            }
            if !claimed.is_empty()
                && let Some(c) = rec.consumers.get_mut(consumer)
            {
                c.1 = *now_ms;
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Array(claimed)))
        }
        GroupOp::AutoClaim {
            consumer,
            min_idle_ms,
            start,
            count,
            justid,
            now_ms,
        } => {
            let Some(mut rec) = rec else {
                return nogroup();
            };
            if !touch_consumer(&mut rec, consumer, *now_ms, false) {
                return consumers_full();
            }
            // As Redis: look at up to ten times COUNT entries.
            let attempts = count.saturating_mul(10).max(1);
            let rows = scan(&el, &pel, &pel_key(&pel, *start), attempts + 1)?;
            let mut claimed = Vec::new();
            let mut next = StreamId::MIN;
            for (n, (k, v)) in rows.iter().enumerate() {
                if n == attempts || claimed.len() == *count {
                    next = id_of_pel_key(&pel, k).unwrap_or(StreamId::MIN);
                    break;
                }
                let mut p: Pending = decode(v, "a pending entry")?;
                if now_ms.saturating_sub(p.delivered_ms) < *min_idle_ms {
                    continue;
                }
                p.consumer = consumer.clone();
                p.delivered_ms = *now_ms;
                if !justid {
                    p.deliveries += 1;
                }
                el.insert(&k[..], &encode(&p)?[..]).map_err(io_err)?;
                if let Some(id) = id_of_pel_key(&pel, k) {
                    claimed.push(id_reply(id));
                }
            }
            if !claimed.is_empty()
                && let Some(c) = rec.consumers.get_mut(consumer)
            {
                c.1 = *now_ms;
            }
            put(&mut el, &rec)?;
            Ok(Ok(Reply::Array(vec![
                id_reply(next),
                Reply::Array(claimed),
            ])))
        }
    }
}

/// [`CHANGES_GROUP_QUERY`] `stream [group [from count]]`, from one snapshot of the element
/// table: with a group, `[record (postcard) | nil, [[id, pending (postcard)], ...]]`, the
/// pending entries from ID `from` on, at most `count` (and [`PEL_PAGE_MAX`]; none without
/// `from`); without, every group of the stream as `[[name, record (postcard)], ...]`.
/// Every group's position that holds history back, with its stream's name: the last ID it
/// delivered, or just before its oldest pending entry when that is older (XCLAIM may still
/// want it). At most [`PINS_GROUPS_MAX`] groups.
pub(super) fn positions(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<(Bytes, StreamId)>> {
    let prefix = named(GROUP_ROWS, &[]);
    let mut out = Vec::new();
    for (k, v) in scan(el, &prefix, &prefix, PINS_GROUPS_MAX)? {
        let bad = || Error::Corruption("consumer-group row key".into());
        let rest = k.get(prefix.len()..).ok_or_else(bad)?;
        let part = |at: usize| -> Result<(&[u8], usize)> {
            let len = rest.get(at..at + 4).ok_or_else(bad)?;
            let len = u32::from_be_bytes(len.try_into().map_err(|_| bad())?) as usize;
            Ok((
                rest.get(at + 4..at + 4 + len).ok_or_else(bad)?,
                at + 4 + len,
            ))
        };
        let (stream, next) = part(0)?;
        let (group, _) = part(next)?;
        let rec: GroupRecord = decode(&v, "consumer group")?;
        let pel = pel_prefix(stream, group);
        let oldest = scan(el, &pel, &pel, 1)?
            .first()
            .and_then(|(k, _)| id_of_pel_key(&pel, k));
        let pos = match oldest {
            Some(o) if o <= rec.last => o.predecessor(),
            _ => rec.last,
        };
        out.push((Bytes::copy_from_slice(stream), pos));
    }
    Ok(out)
}

pub(super) fn query(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    stream: &[u8],
    group: Option<&[u8]>,
    page: Option<(StreamId, usize)>,
) -> Result<Reply> {
    match group {
        Some(group) => {
            let rec = match el.get(&group_key(stream, group)[..]).map_err(io_err)? {
                Some(raw) => Reply::Bulk(Bytes::copy_from_slice(raw.value())),
                None => Reply::Nil,
            };
            let pel = pel_prefix(stream, group);
            let (from, count) = page.unwrap_or((StreamId::MAX, 0));
            let rows = scan(el, &pel, &pel_key(&pel, from), count.min(PEL_PAGE_MAX))?
                .into_iter()
                .filter_map(|(k, v)| {
                    let id = id_of_pel_key(&pel, &k)?;
                    Some(Reply::Array(vec![
                        id_reply(id),
                        Reply::Bulk(Bytes::from(v)),
                    ]))
                })
                .collect();
            Ok(Reply::Array(vec![rec, Reply::Array(rows)]))
        }
        None => {
            let prefix = named(GROUP_ROWS, &[stream]);
            let rows = scan(el, &prefix, &prefix, GROUPS_MAX)?
                .into_iter()
                .filter_map(|(k, v)| {
                    let rest = k.strip_prefix(&prefix[..])?;
                    let name = rest.get(4..)?;
                    Some(Reply::Array(vec![
                        Reply::Bulk(Bytes::copy_from_slice(name)),
                        Reply::Bulk(Bytes::from(v)),
                    ]))
                })
                .collect();
            Ok(Reply::Array(rows))
        }
    }
}
