//! Change streams over Redis's stream commands (issue 14, `docs/design/streams.md` §4): a
//! `cp` shard's change log read as a read-only stream key `__changes:<keyspace>#<shard>`.
//!
//! - `CHANGES CONFIG <ks> on|off [RETENTION-MS ms] [RETENTION-BYTES n] [PREV yes|no]` turns
//!   a keyspace's logs on or off (every
//!   shard, through its Raft log); `CHANGES SHARDS <ks>` lists its stream keys,
//!   `CHANGES LAST <ks>` each one's last ID (what `$` means now) and `CHANGES RESOLVED <ks>`
//!   how far the merged stream is resolved (after closing every shard).
//! - `__changes:<ks>` is the keyspace's merged stream (`node/merged.rs`): every shard's
//!   events by stream clock, a cross-shard transaction's together, released up to the
//!   resolved clock (a read closes idle shards that hold events back).
//! - `XRANGE`, `XREVRANGE`, `XLEN` and `XREAD [COUNT] [BLOCK] STREAMS` read them with Redis's
//!   replies. Any node answers (no `-MOVED`): the read goes through the shard's read path at
//!   the connection's consistency, so IDs are the same whichever node serves.
//! - Writes to stream keys (`XADD`, `XTRIM`, `XDEL`, `XSETID`) answer an error: capdb has no
//!   stream type of its own.
//!
//! - A key with a prefix (`__changes:<ks>[#<shard>]:<prefix>`) is the same stream keeping
//!   only the events on keys starting with it, with the same IDs (`node/prefixed.rs`).
//!
//! - A `cache` or `ap` keyspace's `__changes:<ks>` is the node's own stream (a cache's ring,
//!   an `ap` replica's log), read as shard 0 of the node asked.
//!
//! Consumer groups are in `stream_groups.rs`. Differences from Redis:
//! a read of a shard's stream returns at most [`capdb_storage::disk::CHANGES_READ_MAX`]
//! entries and about [`capdb_storage::disk::CHANGES_READ_BYTES_MAX`] (a merged read takes up
//! to that from every shard, plus whole transactions; XREAD without COUNT:
//! [`XREAD_DEFAULT_COUNT`]). A blocked XREAD reads again when this node's replica of one of its
//! shards applies an entry, and at least every [`XREAD_POLL`]; it stops when the client leaves
//! or the server shuts down.

use std::time::Duration;

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::changes::{StreamId, StreamKey, range_bounds};

use super::{Outcome, error_line, parse_int, syntax};
use crate::node::ChangesPage;
use crate::resp::Connection;

/// Entries per key an XREAD without COUNT returns at most.
pub const XREAD_DEFAULT_COUNT: usize = 1_000;
/// How long a blocked XREAD waits for its shards' replicas on this node to apply something
/// before it reads again anyway (a node with no replica of a shard reads every 10 ms).
pub const XREAD_POLL: Duration = Duration::from_millis(100);

/// Whether a stream command (`name`) on `key` reads a change stream: any node serves it (no
/// `-MOVED`); a key that only starts like one answers its parse error on any node too.
pub(super) fn reads_a_stream(name: &str, key: &[u8]) -> bool {
    matches!(
        name,
        "xlen"
            | "xrange"
            | "xrevrange"
            | "xack"
            | "xpending"
            | "xclaim"
            | "xautoclaim"
            | "xgroup"
            | "xinfo"
    ) && (matches!(StreamKey::parse(key), Ok(Some(_)) | Err(_))
        || super::job_streams::job_of(key).is_some())
}

/// `CHANGES CONFIG <keyspace> on|off [RETENTION-MS ms] [RETENTION-BYTES n] [PREV yes|no]` |
/// `CHANGES SHARDS <keyspace>` | `CHANGES LAST <keyspace>` | `CHANGES RESOLVED <keyspace>`.
pub(super) async fn changes(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    match (sub.as_slice(), args.len()) {
        (b"config", 4 | 6 | 8 | 10) => {
            let on = match args[3].to_ascii_lowercase().as_slice() {
                b"on" | b"values" => true,
                b"off" => false,
                _ => return Err("ERR CHANGES CONFIG takes on or off".into()),
            };
            let (mut retention_ms, mut retention_bytes, mut prev) = (None, None, None);
            for pair in args[4..].chunks(2) {
                let [word, n] = pair else {
                    return Err(syntax());
                };
                if word.eq_ignore_ascii_case(b"prev") {
                    prev = Some(match n.to_ascii_lowercase().as_slice() {
                        b"yes" => true,
                        b"no" => false,
                        _ => return Err("ERR PREV takes yes or no".into()),
                    });
                    continue;
                }
                let n = parse_int(n)?;
                match word.to_ascii_lowercase().as_slice() {
                    b"retention-ms" if n >= 1 => retention_ms = Some(n as u64),
                    b"retention-ms" => {
                        return Err("ERR RETENTION-MS must be at least 1".into());
                    }
                    // At least one event's worth, so the newest always stays.
                    b"retention-bytes" if n >= 1 => retention_bytes = Some(n as u64),
                    b"retention-bytes" => {
                        return Err("ERR RETENTION-BYTES must be at least 1".into());
                    }
                    _ => return Err(syntax()),
                }
            }
            let ks = keyspace_named(conn, &args[2])?;
            ks.changes_config(on, retention_ms, retention_bytes, prev)
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.simple("OK");
            Ok(())
        }
        (b"shards", 3) if keyspace_named(conn, &args[2])?.streams_per_node() => {
            let name = String::from_utf8_lossy(&args[2]).into_owned();
            conn.out
                .reply(&Reply::Array(vec![Reply::Bulk(Bytes::from(format!(
                    "__changes:{name}"
                )))]));
            Ok(())
        }
        // A cache keyspace's one stream (this node's ring): where it stands.
        (b"last" | b"resolved", 3) if keyspace_named(conn, &args[2])?.streams_per_node() => {
            let ks = keyspace_named(conn, &args[2])?;
            let page = ks
                .changes_read(
                    0,
                    (StreamId::MAX, StreamId::MAX),
                    0,
                    false,
                    conn.now_ms,
                    conn.consistency,
                )
                .await
                .map_err(|e| error_line(&e))?;
            if !page.on && page.events == 0 {
                return Err(changes_off(&ks));
            }
            if sub.as_slice() == b"last" {
                conn.out.reply(&Reply::Array(vec![Reply::Bulk(page.last)]));
            } else {
                conn.out.reply(&Reply::Bulk(page.last));
            }
            Ok(())
        }
        (b"shards", 3) => {
            let ks = keyspace_named(conn, &args[2])?;
            let n = ks.shard_count().ok_or_else(|| {
                "ERR change streams are built for cp keyspaces only so far".to_string()
            })?;
            let name = String::from_utf8_lossy(&args[2]).into_owned();
            let keys: Vec<Reply> = (0..n)
                .map(|i| Reply::Bulk(Bytes::from(format!("__changes:{name}#{i}"))))
                .collect();
            conn.out.reply(&Reply::Array(keys));
            Ok(())
        }
        // The last ID of each shard's stream, in shard order (what `$` means now): where a
        // reader that wants only what comes next starts, as an explicit position.
        (b"last", 3) => {
            let ks = keyspace_named(conn, &args[2])?;
            let n = ks.shard_count().ok_or_else(|| {
                "ERR change streams are built for cp keyspaces only so far".to_string()
            })?;
            let mut last = Vec::with_capacity(n);
            for shard in 0..n as u32 {
                let page = ks
                    .changes_read(
                        shard,
                        (StreamId::MAX, StreamId::MAX),
                        0,
                        false,
                        conn.now_ms,
                        conn.consistency,
                    )
                    .await
                    .map_err(|e| error_line(&e))?;
                last.push(Reply::Bulk(page.last));
            }
            conn.out.reply(&Reply::Array(last));
            Ok(())
        }
        // How far the keyspace's merged stream is resolved, after closing every shard now:
        // no event at or below this ID will ever appear in it.
        (b"resolved", 3) => {
            let ks = keyspace_named(conn, &args[2])?;
            ks.shard_count().ok_or_else(|| {
                "ERR change streams are built for cp keyspaces only so far".to_string()
            })?;
            let page = crate::node::merged::resolve_now(&ks, conn.now_ms, conn.consistency)
                .await
                .map_err(|e| error_line(&e))?;
            if !page.on && page.events == 0 {
                return Err(changes_off(&ks));
            }
            conn.out
                .reply(&Reply::Bulk(Bytes::from(page.resolved.to_string())));
            Ok(())
        }
        _ => Err(format!(
            "ERR unknown CHANGES subcommand or wrong number of arguments for '{}' (CHANGES CONFIG <keyspace> on|off [RETENTION-MS ms] [RETENTION-BYTES n] [PREV yes|no], CHANGES SHARDS <keyspace>, CHANGES LAST <keyspace>, CHANGES RESOLVED <keyspace>)",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

fn keyspace_named(
    conn: &Connection,
    name: &[u8],
) -> Result<std::sync::Arc<crate::node::Keyspace>, String> {
    let name = std::str::from_utf8(name).map_err(|_| "ERR keyspace names are UTF-8".to_string())?;
    conn.node.keyspace(name).map_err(|e| error_line(&e))
}

/// Which stream of a keyspace a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Shard(u32),
    /// Every shard's, merged (`node/merged.rs`).
    Merged,
}

/// The keyspace and stream a stream key names (errors for what is not built yet).
pub(super) fn resolve(
    conn: &Connection,
    key: &[u8],
) -> Result<(std::sync::Arc<crate::node::Keyspace>, Target), String> {
    let parsed = StreamKey::parse(key).map_err(|e| error_line(&e))?;
    let Some(sk) = parsed else {
        return Err(format!(
            "ERR capdb has no stream type: '{}' is not a change stream (read __changes:<keyspace>#<shard>; CHANGES SHARDS <keyspace> lists them)",
            String::from_utf8_lossy(key)
        ));
    };
    let ks = match &sk.keyspace {
        Some(name) => keyspace_named(conn, name.as_bytes())?,
        None => conn.keyspace.clone(),
    };
    if ks.streams_per_node() {
        // One stream per node (a cache's ring, an ap replica's log), read as shard 0.
        return Ok((ks, Target::Shard(sk.shard.unwrap_or(0))));
    }
    if ks.shard_count().is_none() {
        return Err(format!(
            "ERR change streams are built for cp and cache keyspaces only so far; '{}' is not one",
            ks.spec.name
        ));
    }
    Ok((ks, sk.shard.map_or(Target::Merged, Target::Shard)))
}

fn changes_off(ks: &crate::node::Keyspace) -> String {
    format!(
        "ERR changes of keyspace '{}' are off (CHANGES CONFIG {} on)",
        ks.spec.name, ks.spec.name
    )
}

/// What a read of a stream key found: its entries, events held, last ID (for `$`), and
/// for a merged stream the resolved ID and the shards holding it back.
pub(super) struct Page {
    pub(super) entries: Vec<Reply>,
    pub(super) events: u64,
    pub(super) last: StreamId,
    pub(super) resolved: Option<StreamId>,
    pub(super) lagging: Vec<u32>,
    /// What the lagging shards must be closed at.
    pub(super) newest: capdb_types::Timestamp,
    /// A key-prefix stream's forward read: the last ID it looked at (nothing else at or
    /// below it matches), so a reader that found nothing moves on from there.
    pub(super) scanned: Option<StreamId>,
    /// A key-prefix stream's read stopped at its page budget before the end of its range.
    pub(super) partial: bool,
}

/// What a key-prefix stream's read asks for.
struct Prefixed {
    range: (StreamId, StreamId),
    count: usize,
    rev: bool,
    closing: bool,
    pages_max: usize,
}

/// Reads a page of the stream `key` names; an error when its keyspace's changes are off
/// (and it holds none). `closing`: on a merged stream, close idle shards that hold events
/// back first (a non-blocking read answers everything logged before it).
pub(super) async fn read_page(
    conn: &Connection,
    key: &[u8],
    range: (StreamId, StreamId),
    count: usize,
    rev: bool,
    closing: bool,
) -> Result<Page, String> {
    read_page_bounded(conn, key, range, count, rev, closing, usize::MAX).await
}

/// [`read_page`]; a key-prefix stream scans at most `pages_max` unfiltered pages (a blocking
/// reader's step: `Page::partial` says it stopped there and reads on without waiting).
pub(super) async fn read_page_bounded(
    conn: &Connection,
    key: &[u8],
    range: (StreamId, StreamId),
    count: usize,
    rev: bool,
    closing: bool,
    pages_max: usize,
) -> Result<Page, String> {
    let (ks, target) = resolve(conn, key)?;
    let prefix = StreamKey::parse(key).ok().flatten().and_then(|k| k.prefix);
    if let Some(prefix) = prefix {
        let read = Prefixed {
            range,
            count,
            rev,
            closing,
            pages_max,
        };
        return read_prefixed(conn, &ks, target, &prefix, read).await;
    }
    match target {
        Target::Shard(shard) => {
            let page: ChangesPage = ks
                .changes_read(shard, range, count, rev, conn.now_ms, conn.consistency)
                .await
                .map_err(|e| error_line(&e))?;
            if !page.on && page.events == 0 {
                return Err(changes_off(&ks));
            }
            Ok(Page {
                entries: page.entries,
                events: page.events,
                last: parse_id(&page.last)?,
                resolved: None,
                lagging: Vec::new(),
                newest: capdb_types::Timestamp::ZERO,
                scanned: None,
                partial: false,
            })
        }
        Target::Merged => {
            let (from, to) = range;
            let read = if rev && count > 0 && from <= to {
                crate::node::merged::read_rev(&ks, from, to, count, conn.now_ms, conn.consistency)
                    .await
            } else if from == StreamId::MAX {
                // Where the stream stands (`$`, XLEN): everything logged before this call is
                // at or below the answer's resolved ID.
                crate::node::merged::resolve_now(&ks, conn.now_ms, conn.consistency).await
            } else if closing {
                crate::node::merged::read_closing(
                    &ks,
                    from,
                    to,
                    count,
                    conn.now_ms,
                    conn.consistency,
                )
                .await
            } else {
                crate::node::merged::read(&ks, from, to, count, conn.now_ms, conn.consistency).await
            };
            let page = read.map_err(|e| error_line(&e))?;
            if !page.on && page.events == 0 {
                return Err(changes_off(&ks));
            }
            Ok(Page {
                entries: page.entries,
                events: page.events,
                last: page.resolved,
                resolved: Some(page.resolved),
                lagging: page.lagging,
                newest: page.newest,
                scanned: None,
                partial: false,
            })
        }
    }
}

/// [`read_page`] of a key-prefix stream (`node/prefixed.rs`): the same reads, filtered.
async fn read_prefixed(
    conn: &Connection,
    ks: &crate::node::Keyspace,
    target: Target,
    prefix: &[u8],
    read: Prefixed,
) -> Result<Page, String> {
    use crate::node::prefixed;
    let Prefixed {
        range,
        count,
        rev,
        closing,
        pages_max,
    } = read;
    let mut partial = false;
    let (now_ms, c) = (conn.now_ms, conn.consistency);
    let fail = |e: capdb_types::Error| error_line(&e);
    // XLEN and `$` ask where the stream stands (no entries): the unfiltered answers.
    let counting = range == (StreamId::MAX, StreamId::MAX);
    match target {
        Target::Shard(shard) => {
            let (page, scanned) = if counting {
                let page = ks
                    .changes_read(shard, range, 0, false, now_ms, c)
                    .await
                    .map_err(fail)?;
                (page, None)
            } else {
                let read = prefixed::read_shard(
                    ks, shard, prefix, range, count, rev, pages_max, now_ms, c,
                )
                .await
                .map_err(fail)?;
                // Stopped by the budget, not by the count: read on.
                partial = read.0.more && read.0.entries.len() < count;
                read
            };
            if !page.on && page.events == 0 {
                return Err(changes_off(ks));
            }
            Ok(Page {
                entries: page.entries,
                // Counted by XLEN only (`prefixed::count`, a scan).
                events: 0,
                last: parse_id(&page.last)?,
                resolved: None,
                lagging: Vec::new(),
                newest: capdb_types::Timestamp::ZERO,
                scanned,
                partial,
            })
        }
        Target::Merged => {
            let (from, to) = range;
            let page = if counting {
                crate::node::merged::resolve_now(ks, now_ms, c).await
            } else if rev {
                prefixed::read_merged_rev(ks, prefix, from, to, count, now_ms, c).await
            } else {
                prefixed::read_merged(ks, prefix, from, to, count, closing, pages_max, now_ms, c)
                    .await
                    .map(|(page, stopped)| {
                        partial = stopped;
                        page
                    })
            }
            .map_err(fail)?;
            if !page.on && page.events == 0 {
                return Err(changes_off(ks));
            }
            Ok(Page {
                entries: page.entries,
                events: 0,
                last: page.resolved,
                resolved: Some(page.resolved),
                lagging: page.lagging,
                newest: page.newest,
                scanned: None,
                partial,
            })
        }
    }
}

/// `COUNT n` at `args[at..]` (XRANGE's optional tail); `None` without it.
fn range_count(args: &[Bytes], at: usize) -> Result<Option<usize>, String> {
    match &args[at..] {
        [] => Ok(None),
        [word, n] if word.eq_ignore_ascii_case(b"count") => {
            let n = parse_int(n)?;
            Ok(Some(usize::try_from(n).unwrap_or(0)))
        }
        _ => Err(syntax()),
    }
}

/// `XRANGE key start end [COUNT count]`.
pub(super) async fn xrange(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    range_command(conn, args, false).await
}

/// `XREVRANGE key end start [COUNT count]`.
pub(super) async fn xrevrange(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    range_command(conn, args, true).await
}

async fn range_command(conn: &mut Connection, args: &[Bytes], rev: bool) -> Outcome {
    let count = range_count(args, 4)?;
    if super::job_streams::job_of(&args[1]).is_some() {
        if rev {
            return Err("ERR XREVRANGE is not served on job streams: read them with XRANGE".into());
        }
        return super::job_streams::xrange(conn, args, count).await;
    }
    let (start, end) = if rev {
        (&args[3], &args[2])
    } else {
        (&args[2], &args[3])
    };
    let range = range_bounds(start, end).map_err(|e| error_line(&e))?;
    let entries = match (range, count) {
        // COUNT 0 or less: the null reply, as Redis answers it.
        (_, Some(0)) => {
            read_page(
                conn,
                &args[1],
                (StreamId::MAX, StreamId::MAX),
                0,
                rev,
                false,
            )
            .await?;
            conn.out.reply(&Reply::NilArray);
            return Ok(());
        }
        (Some(range), count) => {
            read_page(
                conn,
                &args[1],
                range,
                count.unwrap_or(usize::MAX),
                rev,
                true,
            )
            .await?
            .entries
        }
        // An empty range: nothing, once the key is known to be a stream.
        (None, _) => {
            read_page(
                conn,
                &args[1],
                (StreamId::MAX, StreamId::MAX),
                0,
                rev,
                false,
            )
            .await?;
            Vec::new()
        }
    };
    conn.out.reply(&Reply::Array(entries));
    Ok(())
}

/// `XLEN key`.
pub(super) async fn xlen(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    if super::job_streams::job_of(&args[1]).is_some() {
        return super::job_streams::xlen(conn, args).await;
    }
    let page = read_page(
        conn,
        &args[1],
        (StreamId::MAX, StreamId::MAX),
        0,
        false,
        false,
    )
    .await?;
    // A key-prefix stream's length is counted by a scan of what is held.
    let events = match StreamKey::parse(&args[1])
        .ok()
        .flatten()
        .and_then(|k| k.prefix)
    {
        Some(prefix) => {
            let (ks, target) = resolve(conn, &args[1])?;
            let shard = match target {
                Target::Shard(n) => Some(n),
                Target::Merged => None,
            };
            crate::node::prefixed::count(&ks, shard, &prefix, conn.now_ms, conn.consistency)
                .await
                .map_err(|e| error_line(&e))?
        }
        None => page.events,
    };
    conn.out.int(i64::try_from(events).unwrap_or(i64::MAX));
    Ok(())
}

/// `XREAD [COUNT count] [BLOCK milliseconds] STREAMS key [key ...] id [id ...]`.
pub(super) async fn xread(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let mut count = XREAD_DEFAULT_COUNT;
    let mut block: Option<u64> = None;
    let mut i = 1;
    let streams_at = loop {
        let Some(word) = args.get(i) else {
            return Err(syntax());
        };
        match word.to_ascii_lowercase().as_slice() {
            b"count" => {
                let n = parse_int(args.get(i + 1).ok_or_else(syntax)?)?;
                // As in Redis, zero or less is no limit (here: the read bound).
                count = usize::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or(capdb_storage::disk::CHANGES_READ_MAX);
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
            b"streams" => break i + 1,
            _ => return Err(syntax()),
        }
    };
    let rest = &args[streams_at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err("ERR Unbalanced 'xread' list of streams: for each stream key an ID or '$' must be specified.".into());
    }
    let (keys, ids) = rest.split_at(rest.len() / 2);
    if keys.iter().any(|k| super::job_streams::job_of(k).is_some()) {
        return super::job_streams::xread(conn, keys, ids, count, block).await;
    }
    // Where each key's reading starts (exclusive): `$` is the stream's last ID now.
    let mut after: Vec<StreamId> = Vec::with_capacity(keys.len());
    // `$` once per stream: key-prefix keys of one stream share its last ID.
    let mut last_of: std::collections::HashMap<(Option<String>, Option<u32>), StreamId> =
        std::collections::HashMap::new();
    for (k, id) in keys.iter().zip(ids) {
        let start = if id.as_ref() == b"$" {
            let stream = StreamKey::parse(k)
                .ok()
                .flatten()
                .map(|sk| (sk.keyspace, sk.shard));
            match stream.as_ref().and_then(|s| last_of.get(s)) {
                Some(last) => *last,
                None => {
                    let last = read_page(conn, k, (StreamId::MAX, StreamId::MAX), 0, false, false)
                        .await?
                        .last;
                    if let Some(stream) = stream {
                        last_of.insert(stream, last);
                    }
                    last
                }
            }
        } else {
            parse_id(id)?
        };
        after.push(start);
    }
    let deadline =
        block.map(|ms| (ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms)));
    let mut probe = super::blocking::ClosedProbe::new(conn.socket_fd);
    let mut shutdown = conn.shutdown.clone();
    let targets: Vec<(std::sync::Arc<crate::node::Keyspace>, Target)> = keys
        .iter()
        .map(|k| resolve(conn, k))
        .collect::<Result<_, String>>()?;
    // The shards whose applies wake this read: each merged stream's all.
    let shards = wake_shards(&targets);
    // A merged stream read past what it resolved does not read that part again.
    let mut cursors = after.clone();
    let mut first = true;
    // Rounds in a row with events held back by idle shards: the look-again backs off, so a
    // shard that cannot close (no leader) costs a few reads a second, not hundreds.
    let mut lag_rounds: u32 = 0;
    loop {
        // Where each shard's replica here stands, before reading: an apply after the read
        // moves it, so the wait below cannot miss it.
        let marks: Vec<Option<u64>> = shards.iter().map(|(ks, n)| ks.changes_mark(*n)).collect();
        let mut found: Vec<(Bytes, Vec<Reply>)> = Vec::new();
        let mut lagging: Vec<(
            std::sync::Arc<crate::node::Keyspace>,
            Vec<u32>,
            capdb_types::Timestamp,
        )> = Vec::new();
        // A key-prefix stream read stopped at its budget: look again at once.
        let mut partial = false;
        for ((k, from), (ks, _)) in keys.iter().zip(cursors.iter_mut()).zip(&targets) {
            if *from == StreamId::MAX {
                continue;
            }
            let page = read_page_bounded(
                conn,
                k,
                (from.successor(), StreamId::MAX),
                count,
                false,
                first,
                crate::node::prefixed::PAGES_PER_STEP,
            )
            .await?;
            partial |= page.partial;
            if !page.entries.is_empty() {
                found.push((k.clone(), page.entries));
            } else if let Some(seen) = page.resolved.or(page.scanned) {
                *from = (*from).max(seen);
            }
            if !page.lagging.is_empty() {
                lagging.push((ks.clone(), page.lagging, page.newest));
            }
        }
        first = false;
        if !found.is_empty() {
            conn.out.reply(&per_key_reply(conn.out.resp3, found));
            return Ok(());
        }
        // More history to look through: read on (a blocking read within its deadline).
        if partial && !matches!(deadline, Some(Some(at)) if tokio::time::Instant::now() >= at) {
            continue;
        }
        match deadline {
            // Not blocking, or the block ran out: the null reply.
            None => break,
            Some(Some(at)) if tokio::time::Instant::now() >= at => break,
            // BLOCK 0 waits for as long as it takes, as in Redis.
            // (until the client leaves: nothing is written to it then; or the server stops).
            Some(at) => {
                // Events wait on idle shards of a merged stream: close those, then look
                // again soon (their progress entries wake the wait below).
                lag_rounds = if lagging.is_empty() {
                    0
                } else {
                    lag_rounds + 1
                };
                let poll = if lagging.is_empty() {
                    XREAD_POLL
                } else {
                    for (ks, shards, newest) in &lagging {
                        crate::node::merged::close_shards(
                            ks,
                            shards,
                            *newest,
                            Duration::from_secs(1),
                        )
                        .await;
                    }
                    (crate::node::merged::PROGRESS_GAP * (1 << lag_rounds.min(5))).min(XREAD_POLL)
                };
                let wait = at.map_or(poll, |at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                        .min(poll)
                });
                let applied = wait_applied(&shards, &marks, wait);
                tokio::select! {
                    _ = applied => {}
                    _ = probe.closed() => return Ok(()),
                    _ = shutdown.changed() => return Err("TRYAGAIN server is shutting down".into()),
                }
            }
        }
    }
    conn.out.reply(&Reply::NilArray);
    Ok(())
}

/// Every shard whose applies can wake a reader of these streams (a merged stream's: all).
pub(super) fn wake_shards(
    targets: &[(std::sync::Arc<crate::node::Keyspace>, Target)],
) -> Vec<(std::sync::Arc<crate::node::Keyspace>, u32)> {
    targets
        .iter()
        .flat_map(|(ks, t)| match t {
            Target::Shard(n) => vec![(ks.clone(), *n)],
            Target::Merged => (0..ks.shard_count().unwrap_or(0) as u32)
                .map(|n| (ks.clone(), n))
                .collect(),
        })
        .collect()
}

/// Waits until one of `shards` applied past its mark here (taken before the read), or
/// `wait` passed.
pub(super) async fn wait_applied(
    shards: &[(std::sync::Arc<crate::node::Keyspace>, u32)],
    marks: &[Option<u64>],
    wait: Duration,
) {
    if shards.is_empty() {
        tokio::time::sleep(wait).await;
        return;
    }
    futures::future::select_all(
        shards
            .iter()
            .zip(marks)
            .map(|((ks, n), mark)| Box::pin(ks.wait_changes(*n, *mark, wait))),
    )
    .await;
}

/// XREAD's and XREADGROUP's reply: each key with its entries (RESP3: a map).
pub(super) fn per_key_reply(resp3: bool, found: Vec<(Bytes, Vec<Reply>)>) -> Reply {
    if resp3 {
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
    }
}

pub(super) fn parse_id(text: &[u8]) -> Result<StreamId, String> {
    StreamId::parse_with(text, 0).map_err(|e| error_line(&e))
}

/// `XADD`, `XTRIM`, `XDEL`, `XSETID`: change streams are read-only.
pub(super) fn read_only(_conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    Err("ERR change streams are read-only; capdb has no stream type".into())
}
