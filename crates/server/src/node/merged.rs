//! A keyspace's merged change stream (`__changes:<keyspace>`, issue 14, design §3.3): the
//! events of all its shards in one order, by stream clock, then shard, then place, with a
//! cross-shard transaction's events together.
//!
//! # The order and why it is safe to release
//!
//! Each shard's log gives its events strictly increasing stream clocks, and a shard's
//! *closed* clock says that every event it logs later gets a larger one (`changes.rs`: its
//! horizon, kept just below the smallest vote of a transaction prepared there, since that
//! transaction's commit is placed at or above it). So
//! once every shard is closed at R (the *resolved* clock, the smallest of them), no event at
//! or below R can still appear anywhere: a reader may release them all, in order, and never
//! has to go back. A shard with nothing to log holds R back; a reader that sees events
//! waiting above R proposes a progress entry there ([`Keyspace::changes_progress`],
//! coalesced), which closes it at the proposer's clock, and at least at the waiting events'
//! (so a proposer whose clock runs behind still releases them with one entry).
//!
//! # Transactions arrive together
//!
//! A cross-shard transaction logs one part per participant, at different clocks. The merged
//! stream places all of them at its first part with events (the smallest clock, then shard),
//! numbered in shard order; a part without events (its keys were only read) has no say.
//! Per-key order still holds: every part is logged at or above the commit timestamp, which
//! is above every event logged on any participant before its prepare
//! (`ChangeLog::vote_at`), and the transaction's keys stay locked until its part is logged.
//! Parts not in a page are found by the transaction's id (`Keyspace::changes_txn`, read
//! linearizably, so a lagging replica never answers for it); a part still pending (prepared,
//! not committed) stops the page just before the transaction (rare: the prepared shard's
//! closed clock is below it); a part gone (trimmed, or logged while that shard's log was
//! off) is left out. Known limit: a reader whose position falls between a transaction's
//! parts while the retention trims the earlier one gets the later parts again.
//!
//! # Bounds
//!
//! Each page reads at most `count` events per shard (whole log entries), plus the other
//! parts of the transactions it meets; nothing is kept between pages but the caller's
//! position.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use capdb_storage::disk::CHANGES_READ_MAX;
use capdb_types::changes::{StreamId, TXN_FIELD, TXN_GROUPS_FIELD, merged, txn_id_bytes};
use capdb_types::{Error, Reply, Result, Timestamp};

use super::{ChangesPage, Consistency, Keyspace, TxnPartPage};

/// Progress entries this node proposes to one shard at most once per this (a reader waiting
/// on an idle shard releases other shards' events within about this plus one commit).
pub const PROGRESS_GAP: Duration = Duration::from_millis(5);

/// TESTING ONLY (`--debug-unsafe-resolved`): release events up to the largest horizon of
/// the shards, not the smallest (a premature watermark, for the chaos checker to catch).
pub static UNSAFE_RESOLVED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A page of a merged stream.
#[derive(Debug, Clone)]
pub struct MergedPage {
    /// The entries (`[id, [field, value, ...]]`), in order.
    pub entries: Vec<Reply>,
    /// Every event at or below this ID (and at or after the read's start) is in this page:
    /// a reader continues after it, and no event at or below it will ever appear.
    pub resolved: StreamId,
    /// Shards whose closed clock holds back events other shards already logged: a progress
    /// entry there releases them.
    pub lagging: Vec<u32>,
    /// Whether every shard's log is on.
    pub on: bool,
    /// Events the shards hold, summed.
    pub events: u64,
    /// The largest last ID's clock of the shards.
    pub last_clock: Timestamp,
    /// The newest clock read: what the lagging shards must be closed at to release it.
    pub newest: Timestamp,
}

/// One event of a shard's page, as read.
struct Read {
    id: StreamId,
    fields: Vec<Reply>,
    txn: Option<(Bytes, Vec<u64>)>,
}

fn parse_entry(entry: Reply) -> Result<Read> {
    let bad = || Error::Io("unexpected change-log entry".into());
    let Reply::Array(parts) = entry else {
        return Err(bad());
    };
    let [Reply::Bulk(id), Reply::Array(fields)] =
        <[Reply; 2]>::try_from(parts).map_err(|_| bad())?
    else {
        return Err(bad());
    };
    let id = StreamId::parse_with(&id, 0)?;
    let (mut txn, mut groups) = (None, Vec::new());
    let mut kept = Vec::with_capacity(fields.len());
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match (&k, &v) {
            (Reply::Bulk(name), Reply::Bulk(text))
                if name.as_ref() == TXN_GROUPS_FIELD.as_bytes() =>
            {
                groups = std::str::from_utf8(text)
                    .map_err(|_| bad())?
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(|g| g.parse::<u64>().map_err(|_| bad()))
                    .collect::<Result<_>>()?;
                continue;
            }
            (Reply::Bulk(name), Reply::Bulk(text)) if name.as_ref() == TXN_FIELD.as_bytes() => {
                txn = Some(text.clone());
            }
            _ => {}
        }
        kept.push(k);
        kept.push(v);
    }
    Ok(Read {
        id,
        fields: kept,
        txn: txn.map(|t| (t, groups)),
    })
}

/// A transaction met in a page: its participants and the parts found so far, by shard.
struct Gathered {
    groups: Vec<u64>,
    parts: BTreeMap<u32, (Timestamp, Vec<Read>)>,
    pending: bool,
    gone: bool,
}

/// One entry to emit, with its ID and, for a transaction's events, the ID of its first.
struct Item {
    id: StreamId,
    group: Option<StreamId>,
    fields: Vec<Reply>,
}

/// Reads the merged stream of `ks` from `from` (inclusive) to `to` (inclusive): at most about
/// `count` entries (a transaction is never split by the count), all at or below the resolved
/// clock.
pub async fn read(
    ks: &Keyspace,
    from: StreamId,
    to: StreamId,
    count: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<MergedPage> {
    let shards = ks.shard_count().ok_or_else(|| {
        Error::Command("ERR change streams are built for cp keyspaces only so far".into())
    })? as u32;
    let groups = ks.shard_groups();
    let (start_clock, _, _) = merged::parts(from);
    let shard_from = StreamId::of_event(start_clock, 0);
    let per_shard = count.clamp(1, CHANGES_READ_MAX);
    let pages: Vec<ChangesPage> = futures::future::try_join_all((0..shards).map(|s| {
        ks.changes_read_page(
            s,
            (shard_from, StreamId::MAX),
            per_shard,
            false,
            true,
            now_ms,
            c,
        )
    }))
    .await
    .map_err(in_merged_terms)?;
    let on = pages.iter().all(|p| p.on);
    let events = pages.iter().map(|p| p.events).sum();
    if let Some(off) = pages.iter().position(|p| !p.on)
        && pages.iter().any(|p| p.on)
    {
        // Part-way through a switch: the merged order needs every shard's log.
        return Err(Error::Command(format!(
            "ERR changes of keyspace '{}' are off on shard {off} (CHANGES CONFIG {} on)",
            ks.spec.name, ks.spec.name
        )));
    }
    let last_clock = pages
        .iter()
        .filter_map(|p| StreamId::parse_with(&p.last, 0).ok())
        .map(StreamId::clock)
        .max()
        .unwrap_or(Timestamp::ZERO);
    // Each shard is known up to its horizon: its closed clock, or the last clock read when
    // the page stopped at its bound (whole entries, so that clock is complete).
    let mut reads: Vec<Vec<Read>> = Vec::with_capacity(pages.len());
    let mut horizon = Vec::with_capacity(pages.len());
    let mut more = Vec::with_capacity(pages.len());
    for p in pages {
        let r: Vec<Read> = p
            .entries
            .into_iter()
            .map(parse_entry)
            .collect::<Result<_>>()?;
        horizon.push(match (p.more, r.last()) {
            (true, Some(last)) => last.id.clock(),
            _ => p.closed,
        });
        more.push(p.more);
        reads.push(r);
    }
    let resolved_clock = if UNSAFE_RESOLVED.load(std::sync::atomic::Ordering::Relaxed) {
        horizon.iter().copied().max()
    } else {
        horizon.iter().copied().min()
    }
    .unwrap_or(Timestamp::ZERO);
    let newest = reads
        .iter()
        .filter_map(|r| r.last().map(|e| e.id.clock()))
        .max()
        .unwrap_or(Timestamp::ZERO);
    let lagging = if newest > resolved_clock {
        (0..shards)
            .filter(|s| !more[*s as usize] && horizon[*s as usize] < newest)
            .collect()
    } else {
        Vec::new()
    };

    let mut items: Vec<Item> = Vec::new();
    let mut txns: HashMap<Bytes, Gathered> = HashMap::new();
    for (s, shard_reads) in reads.into_iter().enumerate() {
        let s = s as u32;
        for r in shard_reads {
            let clock = r.id.clock();
            match r.txn.clone() {
                None if clock <= resolved_clock => {
                    let n = r.id.seq as u32;
                    items.push(Item {
                        id: merged::id(clock, s, n),
                        group: None,
                        fields: r.fields,
                    });
                }
                None => {}
                Some((id, parts_groups)) => {
                    let g = txns.entry(id).or_insert_with(|| Gathered {
                        groups: parts_groups,
                        parts: BTreeMap::new(),
                        pending: false,
                        gone: false,
                    });
                    g.parts
                        .entry(s)
                        .or_insert_with(|| (clock, Vec::new()))
                        .1
                        .push(r);
                }
            }
        }
    }
    // Transactions with a part at or below the resolved clock are placed now; the others
    // wait for a later page.
    txns.retain(|_, g| g.parts.values().any(|(clock, _)| *clock <= resolved_clock));
    let mut lookups = Vec::new();
    for (id, g) in &txns {
        for group in &g.groups {
            let Some(s) = groups.iter().position(|x| x == group) else {
                continue;
            };
            let s = s as u32;
            if !g.parts.contains_key(&s) {
                lookups.push((id.clone(), s));
            }
        }
    }
    // Linearizable, whatever the reader's consistency: a lagging replica would not know a
    // part that the page's replica already counted as closed.
    let found = futures::future::try_join_all(lookups.iter().map(|(id, s)| async move {
        let raw = txn_id_bytes(id)
            .ok_or_else(|| Error::Io("a change-log transaction id does not parse".into()))?;
        ks.changes_txn(*s, &raw, now_ms, Consistency::default())
            .await
    }))
    .await?;
    for ((id, s), part) in lookups.into_iter().zip(found) {
        let Some(g) = txns.get_mut(&id) else {
            continue;
        };
        match part {
            TxnPartPage::Logged(clock, entries) => {
                let r: Vec<Read> = entries
                    .into_iter()
                    .map(parse_entry)
                    .collect::<Result<_>>()?;
                g.parts.insert(s, (clock, r));
            }
            TxnPartPage::Pending => g.pending = true,
            TxnPartPage::Gone => g.gone = true,
        }
    }
    let mut blocked: Option<StreamId> = None;
    for g in txns.into_values() {
        // Placed at its first part with events (parts gone or empty have no say).
        let Some((first_shard, first_clock)) = g
            .parts
            .iter()
            .filter(|(_, (_, reads))| !reads.is_empty())
            .map(|(s, (clock, _))| (*clock, *s))
            .min()
            .map(|(clock, s)| (s, clock))
        else {
            continue;
        };
        let first = merged::id(first_clock, first_shard, 0);
        if g.pending {
            if first >= from {
                blocked = Some(blocked.map_or(first, |b| b.min(first)));
            }
            continue;
        }
        let mut n: u32 = 0;
        for (_, (_, reads)) in g.parts {
            for r in reads {
                items.push(Item {
                    id: merged::id(first_clock, first_shard, n),
                    group: Some(first),
                    fields: r.fields,
                });
                n = n.saturating_add(1);
            }
        }
    }
    items.sort_by_key(|i| i.id);

    let mut entries = Vec::new();
    let mut last: Option<&Item> = None;
    let mut stopped = false;
    for item in &items {
        if item.id < from {
            continue;
        }
        if item.id > to || blocked.is_some_and(|b| item.id >= b) {
            break;
        }
        let same_txn = item.group.is_some() && last.is_some_and(|l| l.group == item.group);
        if entries.len() >= count && !same_txn {
            stopped = true;
            break;
        }
        entries.push(Reply::Array(vec![
            Reply::Bulk(Bytes::from(item.id.to_string())),
            Reply::Array(item.fields.clone()),
        ]));
        last = Some(item);
    }
    let resolved = match (stopped, last) {
        (true, Some(l)) => l.id,
        _ => {
            let mut r = merged::clock_end(resolved_clock);
            if let Some(b) = blocked {
                r = r.min(b.predecessor());
            }
            r.min(to)
        }
    };
    Ok(MergedPage {
        entries,
        resolved,
        lagging,
        on,
        events,
        last_clock,
        newest,
    })
}

/// A shard's `HISTORYLOST` (naming the oldest event it holds, whose clock's earlier events
/// all went) said in the merged stream's IDs: where a merged reader can read from.
fn in_merged_terms(e: Error) -> Error {
    let text = e.to_string();
    let Some(rest) = text.strip_prefix("HISTORYLOST ") else {
        return e;
    };
    let oldest = rest
        .split("held from ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| StreamId::parse_with(id.as_bytes(), 0).ok());
    match oldest {
        Some(oldest) => {
            let from = merged::clock_end(oldest.clock()).successor();
            Error::Command(format!(
                "HISTORYLOST the keyspace's changes are held from {from} on (older ones went with the retention, or came before a snapshot a replica installed); read from {from}"
            ))
        }
        None => e,
    }
}

/// Where the merged stream stands now: every shard closed at least at the newest clock any
/// of them logged, then read. Its `resolved` is what `$` means (everything logged before
/// this call is at or below it) and what `CHANGES RESOLVED` answers.
pub async fn resolve_now(ks: &Keyspace, now_ms: u64, c: Consistency) -> Result<MergedPage> {
    let page = read(ks, StreamId::MAX, StreamId::MAX, 1, now_ms, c).await?;
    let all: Vec<u32> = (0..ks.shard_count().unwrap_or(0) as u32).collect();
    close_shards(ks, &all, page.last_clock, Duration::from_secs(1)).await;
    read(ks, StreamId::MAX, StreamId::MAX, 1, now_ms, c).await
}

/// Proposes progress entries on `shards`, at least to `at_least` (coalesced per
/// [`PROGRESS_GAP`]), each bounded by `max`; errors are left to the next read (a shard
/// without a leader holds the stream back, as it must).
pub async fn close_shards(ks: &Keyspace, shards: &[u32], at_least: Timestamp, max: Duration) {
    let proposals = shards.iter().map(|s| async move {
        let close = ks.changes_progress(*s, PROGRESS_GAP, at_least);
        if let Ok(Err(e)) = tokio::time::timeout(max, close).await {
            tracing::debug!(keyspace = %ks.spec.name, shard = s, error = %e, "progress entry failed");
        }
    });
    futures::future::join_all(proposals).await;
}

/// [`read`], and when events wait on idle shards, closes them and reads once more: what a
/// non-blocking read (XRANGE, a first XREAD) answers.
pub async fn read_closing(
    ks: &Keyspace,
    from: StreamId,
    to: StreamId,
    count: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<MergedPage> {
    let page = read(ks, from, to, count, now_ms, c).await?;
    if page.lagging.is_empty() || page.resolved >= to {
        return Ok(page);
    }
    close_shards(ks, &page.lagging, page.newest, Duration::from_secs(1)).await;
    read(ks, from, to, count, now_ms, c).await
}

/// The newest `count` entries with IDs in `from..=to`, newest first (XREVRANGE): a forward
/// read of a window that holds them, keeping only the last `count` (at most `count` entries
/// in memory). The window starts where each shard's own `count` newest events begin; when
/// transactions placed before it leave it short, the window grows to `from`.
pub async fn read_rev(
    ks: &Keyspace,
    from: StreamId,
    to: StreamId,
    count: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<MergedPage> {
    let count = count.clamp(1, CHANGES_READ_MAX);
    let shards = ks.shard_count().unwrap_or(0) as u32;
    let (to_clock, _, _) = merged::parts(to);
    let (from_clock, _, _) = merged::parts(from);
    let shard_range = (
        StreamId::of_event(from_clock, 0),
        StreamId::of_event(to_clock, u32::MAX),
    );
    let newest = futures::future::try_join_all(
        (0..shards).map(|s| ks.changes_read(s, shard_range, count, true, now_ms, c)),
    )
    .await?;
    // Each shard's `count` newest events begin at or after the window's start.
    let mut window = from;
    for page in &newest {
        if page.entries.len() >= count
            && let Some(oldest) = page.entries.last().map(|e| parse_entry(e.clone()))
        {
            let start = merged::id(oldest?.id.clock(), 0, 0);
            window = window.max(start.min(to));
        }
    }
    for start in [window, from] {
        let mut kept: std::collections::VecDeque<Reply> = std::collections::VecDeque::new();
        let mut at = start;
        let mut page = loop {
            let page = read_closing(ks, at, to, CHANGES_READ_MAX, now_ms, c).await?;
            let next = page.resolved.successor();
            let done = page.entries.is_empty() || page.resolved >= to || next <= at;
            for e in page.entries.iter().cloned() {
                if kept.len() == count {
                    kept.pop_front();
                }
                kept.push_back(e);
            }
            if done {
                break page;
            }
            at = next;
        };
        if kept.len() >= count || start == from {
            page.entries = kept.into_iter().rev().collect();
            return Ok(page);
        }
    }
    Err(Error::Io("the reverse read found no window".into()))
}
