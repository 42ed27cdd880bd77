//! Change streams filtered by a key prefix (`__changes:<ks>[#<shard>]:<prefix>`, issue 14,
//! design §4.1): only the events whose key, or one of whose other changed keys (`also`),
//! starts with the prefix.
//!
//! # Why the filter runs here, on whole pages
//!
//! A filtered stream keeps the whole stream's IDs (an entry of `__changes:users:u:` has the ID
//! it has in `__changes:users`), so positions mean the same in both and a consumer can move
//! between them. The merged order numbers a transaction's events across its parts, which only
//! a reader of whole parts can do; so the filter reads the unfiltered stream's pages
//! (`merged::read`, `Keyspace::changes_read`) and keeps the matching entries, page after page,
//! until it has `count` of them or reached the end of the range.
//!
//! # Bounds
//!
//! A read holds at most `count` (at most [`CHANGES_READ_MAX`]) matching entries of about
//! [`CHANGES_READ_BYTES_MAX`] at most, plus one page (the same bounds);
//! it scans at most the retained part of the range (bounded by the retention), one page per
//! step. A read that found nothing still says how far it looked (`scanned`, or a merged
//! page's `resolved`), so a blocked reader does not scan the same events again.

use bytes::Bytes;
use capdb_storage::disk::{CHANGES_READ_BYTES_MAX, CHANGES_READ_MAX};
use capdb_types::changes::{StreamId, TXN_FIELD};
use capdb_types::{Reply, Result};

use super::merged::{self, MergedPage};
use super::{ChangesPage, Consistency, Keyspace};

/// Whether a stream entry (`[id, [field, value, ...]]`) changed a key starting with `prefix`;
/// a `flush` (every key) and a `gap` (changes went unrecorded) concern every prefix.
pub fn matches(entry: &Reply, prefix: &[u8]) -> bool {
    fields(entry).is_some_and(|f| {
        f.chunks(2).any(|pair| match pair {
            [Reply::Bulk(name), Reply::Bulk(v)] => {
                ((name.as_ref() == b"key" || name.as_ref() == b"also") && v.starts_with(prefix))
                    || (name.as_ref() == b"op" && (v.as_ref() == b"flush" || v.as_ref() == b"gap"))
            }
            _ => false,
        })
    })
}

fn fields(entry: &Reply) -> Option<&[Reply]> {
    match entry {
        Reply::Array(pair) => match pair.as_slice() {
            [_, Reply::Array(fields)] => Some(fields),
            _ => None,
        },
        _ => None,
    }
}

/// The bytes an entry's fields bring to a reply (for the read's byte bound).
fn entry_bytes(entry: &Reply) -> usize {
    fields(entry).map_or(0, |f| {
        f.iter()
            .map(|r| match r {
                Reply::Bulk(b) => b.len(),
                _ => 0,
            })
            .sum()
    })
}

/// Where a merged read goes on after its `HISTORYLOST` (which names, in merged IDs, the
/// oldest position held).
fn past_lost(e: &capdb_types::Error) -> Option<StreamId> {
    oldest_in(&e.to_string())
}

/// An entry's ID.
pub fn entry_id(entry: &Reply) -> Option<StreamId> {
    match entry {
        Reply::Array(pair) => match pair.first() {
            Some(Reply::Bulk(id)) => StreamId::parse_with(id, 0).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// The transaction an entry belongs to (its `txn` field), if any.
fn txn_of(entry: &Reply) -> Option<&Bytes> {
    fields(entry)?.chunks(2).find_map(|pair| match pair {
        [Reply::Bulk(name), Reply::Bulk(id)] if name.as_ref() == TXN_FIELD.as_bytes() => Some(id),
        _ => None,
    })
}

/// A filtered read of one shard's stream: the page of the last step (its `on`, `events` and
/// `last` describe the shard), its entries replaced by the matching ones; and the last ID
/// looked at (forward reads), below which nothing else matches.
#[allow(clippy::too_many_arguments)]
pub async fn read_shard(
    ks: &Keyspace,
    shard: u32,
    prefix: &[u8],
    (from, to): (StreamId, StreamId),
    count: usize,
    rev: bool,
    pages_max: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<(ChangesPage, Option<StreamId>)> {
    let count = count.min(CHANGES_READ_MAX);
    let mut kept: Vec<Reply> = Vec::new();
    let mut bytes = 0usize;
    let (mut lo, mut hi) = (from, to);
    let mut scanned = None;
    let mut pages = 0usize;
    loop {
        pages += 1;
        let mut page = ks
            .changes_read(shard, (lo, hi), CHANGES_READ_MAX, rev, now_ms, c)
            .await?;
        let last_seen = page.entries.last().and_then(entry_id);
        let more = page.more;
        let mut full = false;
        for e in std::mem::take(&mut page.entries) {
            if kept.len() >= count || (bytes >= CHANGES_READ_BYTES_MAX && !kept.is_empty()) {
                full = true;
                break;
            }
            if matches(&e, prefix) {
                scanned = entry_id(&e);
                bytes += entry_bytes(&e);
                kept.push(e);
            }
        }
        let full = full || kept.len() >= count;
        if !full && !rev {
            scanned = last_seen.or(scanned);
        }
        let next = match last_seen {
            Some(id) if more && !full => Some(id),
            _ => None,
        };
        let Some(id) = next else {
            page.entries = kept;
            return Ok((page, scanned));
        };
        if pages >= pages_max {
            // The budget of this call: `more` and `scanned` tell the caller to read on.
            page.entries = kept;
            page.more = true;
            return Ok((page, scanned));
        }
        if rev {
            hi = id.predecessor();
        } else {
            lo = id.successor();
        }
    }
}

/// A filtered forward read of a keyspace's merged stream from `from` to `to` (inclusive):
/// at most about `count` matching entries (a transaction's are kept together); `resolved`
/// is where the unfiltered read got to (or the last entry kept, when the count stopped it).
/// `closing`: close idle shards that hold events back (a non-blocking read). At most
/// `pages_max` unfiltered pages: the answer's `bool` says the budget stopped it before `to`
/// (read on after `resolved`).
#[allow(clippy::too_many_arguments)]
pub async fn read_merged(
    ks: &Keyspace,
    prefix: &[u8],
    from: StreamId,
    to: StreamId,
    count: usize,
    closing: bool,
    pages_max: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<(MergedPage, bool)> {
    let count = count.min(CHANGES_READ_MAX);
    let mut kept: Vec<Reply> = Vec::new();
    let mut bytes = 0usize;
    let mut at = from;
    let mut pages = 0usize;
    loop {
        pages += 1;
        let mut page = if closing {
            merged::read_closing(ks, at, to, CHANGES_READ_MAX, now_ms, c).await?
        } else {
            merged::read(ks, at, to, CHANGES_READ_MAX, now_ms, c).await?
        };
        let mut stopped_at = None;
        for e in std::mem::take(&mut page.entries) {
            if !matches(&e, prefix) {
                continue;
            }
            let same_txn = txn_of(&e).is_some() && kept.last().and_then(txn_of) == txn_of(&e);
            let full = kept.len() >= count || bytes >= CHANGES_READ_BYTES_MAX;
            if full && !kept.is_empty() && !same_txn {
                stopped_at = kept.last().and_then(entry_id);
                break;
            }
            bytes += entry_bytes(&e);
            kept.push(e);
        }
        if let Some(last) = stopped_at {
            page.resolved = last;
            page.entries = kept;
            return Ok((page, false));
        }
        let next = page.resolved.successor();
        if page.resolved >= to || next <= at || page.resolved < at {
            page.entries = kept;
            return Ok((page, false));
        }
        if pages >= pages_max {
            page.entries = kept;
            return Ok((page, true));
        }
        at = next;
    }
}

/// Unfiltered pages one blocking read's step of a key-prefix stream scans at most (up to
/// 10,000 events each), so that a read over many rarely matching prefixes answers within
/// its BLOCK and shares the server; it reads on at its next step.
pub const PAGES_PER_STEP: usize = 4;

/// A filtered XREVRANGE of a merged stream: the newest `count` matching entries in
/// `from..=to`, newest first, found by a forward scan of the range that keeps the last
/// `count` (a prefix may match nothing recent, so no window can be guessed).
pub async fn read_merged_rev(
    ks: &Keyspace,
    prefix: &[u8],
    from: StreamId,
    to: StreamId,
    count: usize,
    now_ms: u64,
    c: Consistency,
) -> Result<MergedPage> {
    let count = count.clamp(1, CHANGES_READ_MAX);
    let mut kept: std::collections::VecDeque<Reply> = std::collections::VecDeque::new();
    let mut at = from;
    loop {
        let page = merged::read_closing(ks, at, to, CHANGES_READ_MAX, now_ms, c).await;
        // A reverse read asks for the newest: it ends where the logs begin, no error (a
        // shard's floor only rises, so this moves forward and ends).
        let mut page = match page {
            Err(e) if e.to_string().starts_with("HISTORYLOST") => match past_lost(&e) {
                Some(next) if next > at => {
                    at = next;
                    continue;
                }
                _ => return Err(e),
            },
            other => other?,
        };
        for e in std::mem::take(&mut page.entries) {
            if matches(&e, prefix) {
                if kept.len() == count {
                    kept.pop_front();
                }
                kept.push_back(e);
            }
        }
        let next = page.resolved.successor();
        if page.resolved >= to || next <= at || page.resolved < at {
            page.entries = kept.into_iter().rev().collect();
            return Ok(page);
        }
        at = next;
    }
}

/// How many retained events of a stream match `prefix` (XLEN of a filtered stream): a scan
/// of each shard's log (of every shard for a merged stream, as an unfiltered XLEN sums what
/// the shards hold).
pub async fn count(
    ks: &Keyspace,
    shard: Option<u32>,
    prefix: &[u8],
    now_ms: u64,
    c: Consistency,
) -> Result<u64> {
    let shards: Vec<u32> = match shard {
        Some(s) => vec![s],
        None => (0..ks.shard_count().unwrap_or(0) as u32).collect(),
    };
    let mut n = 0u64;
    for shard in shards {
        let mut lo = StreamId::MIN;
        loop {
            let page = match ks
                .changes_read(
                    shard,
                    (lo, StreamId::MAX),
                    CHANGES_READ_MAX,
                    false,
                    now_ms,
                    c,
                )
                .await
            {
                Ok(p) => p,
                // Events below `lo` went with the retention meanwhile: count from the oldest
                // held (the floor only rises, so this ends).
                Err(e) if e.to_string().starts_with("HISTORYLOST") => {
                    match oldest_in(&e.to_string()) {
                        Some(oldest) if oldest > lo => {
                            lo = oldest;
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            n += page.entries.iter().filter(|e| matches(e, prefix)).count() as u64;
            match page.entries.last().and_then(entry_id) {
                Some(id) if page.more => lo = id.successor(),
                _ => break,
            }
        }
    }
    Ok(n)
}

/// The oldest ID a `HISTORYLOST` error names (`... held from <id> on ...`).
fn oldest_in(text: &str) -> Option<StreamId> {
    let rest = text.split("held from ").nth(1)?;
    let id = rest.split_whitespace().next()?;
    StreamId::parse_with(id.as_bytes(), 0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &str)]) -> Reply {
        Reply::Array(vec![
            Reply::Bulk(Bytes::from(id.to_string())),
            Reply::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| {
                        [
                            Reply::Bulk(Bytes::from(k.to_string())),
                            Reply::Bulk(Bytes::from(v.to_string())),
                        ]
                    })
                    .collect(),
            ),
        ])
    }

    #[test]
    fn an_entry_matches_by_its_key_or_another_changed_key_never_by_a_value() {
        let e = entry(
            "1-0",
            &[("op", "set"), ("key", "user:1"), ("value", "order:1")],
        );
        assert!(matches(&e, b"user:"));
        assert!(matches(&e, b""));
        assert!(!matches(&e, b"order:"));
        let moved = entry(
            "2-0",
            &[
                ("op", "cmd"),
                ("key", "a"),
                ("arg", "user:9"),
                ("also", "user:2"),
            ],
        );
        assert!(matches(&moved, b"user:"));
        assert!(!matches(&moved, b"b"));
        assert!(matches(&entry("3-0", &[("op", "flush")]), b"user:"));
        assert!(matches(
            &entry("4-0", &[("op", "gap"), ("to", "3-0")]),
            b"user:"
        ));
        assert_eq!(entry_id(&moved), Some(StreamId { ms: 2, seq: 0 }));
    }

    #[test]
    fn the_oldest_id_is_read_from_a_history_lost_error() {
        let e = "HISTORYLOST the shard's changes are held from 17-5 on (older ones ...)";
        assert_eq!(oldest_in(e), Some(StreamId { ms: 17, seq: 5 }));
        assert_eq!(oldest_in("ERR other"), None);
    }
}
