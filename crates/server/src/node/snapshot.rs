//! The way back for a change-stream reader whose position went with the retention (issue 14,
//! design §2.7): a consistent snapshot of a keyspace's data, then the events that came after
//! it, then the merged-stream position to resume from (`GET /v1/changes/{ks}/snapshot`).
//!
//! # Why the result is exact without stopping writes
//!
//! Each page of a shard's keys is read from one storage snapshot together with the stream
//! clock `C` of the last change the shard logged in it (`capdb.changes-snapshot`): every
//! change in the page's data logged at or below `C`, every later one above it. Pages are read
//! one after the other while writes go on, so after the last page the reader closes every
//! shard until the merged stream is resolved at some `R` past every page's `C`
//! ([`replay_to_at_least`]), and replays the merged stream up to `R`, keeping an event only
//! when its clock is above the `C` of the page its key fell in. Applying the rows, then those
//! events, in order, gives the keyspace exactly as it was at `R`; reading the merged stream
//! after `R` continues from there. Last, it checks that no shard's retention trimmed (and no
//! switch off dropped) an event the replay needed ([`still_held`]); if one did, the answer
//! ends with an error instead of the resume position.
//!
//! Where the replay starts: at the smallest closed clock of the pages. An event not in its
//! page has a clock above that page's horizon, which is at least its closed clock; a
//! cross-shard transaction is placed at its first part, whose clock is at or above the commit
//! timestamp, which is above the closed clock of every participant that had not applied its
//! part when its page was read (a prepared transaction holds the closed clock below its
//! vote; a later prepare votes above it).
//!
//! # Limits
//!
//! A page holds at most `SNAPSHOT_PAGE_MAX` keys (and about 16 MiB); the reader keeps one mark
//! per page (its key range and clocks: a few dozen bytes per thousand keys). What the rows
//! and events cannot carry: FLUSHDB logs no event; DUMP leaves out hash fields' deadlines
//! (HEXPIRE); a `cmd` event on a collection carries its command, which a consumer replays
//! (RENAME/EXPIRE of a collection and cross-shard commits on collections carry none).

use bytes::Bytes;
use capdb_types::changes::{StreamId, merged};
use capdb_types::{Error, Reply, Result, Timestamp};

/// One live key of a snapshot page.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Bytes,
    /// `string`, `hash`, `list`, `set`, `zset`.
    pub kind: String,
    /// A string's value, or a collection's DUMP payload (Redis's format).
    pub data: Bytes,
    pub expire_at_ms: Option<u64>,
}

/// A page of one shard's keys, with where its change log stood when it was read.
#[derive(Debug, Clone)]
pub struct Page {
    pub mark: Mark,
    pub rows: Vec<Row>,
}

/// Which keys a page covered and the clocks it was read at.
#[derive(Debug, Clone)]
pub struct Mark {
    pub shard: u32,
    /// Keys after this one (`None`: from the first).
    pub after: Option<Bytes>,
    /// Up to and with this one (`None`: to the last): where the next page starts.
    pub next: Option<Bytes>,
    /// Every change logged after the page was read has a stream clock above this.
    pub clock: Timestamp,
    pub closed: Timestamp,
}

impl Mark {
    fn covers(&self, shard: u32, key: &[u8]) -> bool {
        shard == self.shard
            && self.after.as_ref().is_none_or(|a| key > &a[..])
            && self.next.as_ref().is_none_or(|n| key <= &n[..])
    }
}

impl Page {
    pub(super) fn from_reply(shard: u32, after: Option<Bytes>, reply: Reply) -> Result<Page> {
        let bad = || Error::Io("unexpected answer to a change-log snapshot query".into());
        let Reply::Array(parts) = reply else {
            return Err(bad());
        };
        let [
            Reply::Integer(on),
            Reply::Bulk(clock),
            Reply::Bulk(closed),
            Reply::Array(rows),
            next,
        ] = <[Reply; 5]>::try_from(parts).map_err(|_| bad())?
        else {
            return Err(bad());
        };
        if on != 1 {
            return Err(Error::Command(format!(
                "ERR the change log of shard {shard} is off: a snapshot needs every shard's"
            )));
        }
        let number = |b: &Bytes| -> Result<u64> {
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        let rows = rows
            .into_iter()
            .map(|r| {
                let Reply::Array(f) = r else {
                    return Err(bad());
                };
                let [
                    Reply::Bulk(key),
                    Reply::Bulk(kind),
                    Reply::Bulk(data),
                    Reply::Bulk(at),
                ] = <[Reply; 4]>::try_from(f).map_err(|_| bad())?
                else {
                    return Err(bad());
                };
                Ok(Row {
                    key,
                    kind: String::from_utf8_lossy(&kind).into_owned(),
                    data,
                    expire_at_ms: if at.is_empty() {
                        None
                    } else {
                        Some(number(&at)?)
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = match next {
            Reply::Bulk(k) => Some(k),
            Reply::Nil => None,
            _ => return Err(bad()),
        };
        Ok(Page {
            mark: Mark {
                shard,
                after,
                next,
                clock: Timestamp(number(&clock)?),
                closed: Timestamp(number(&closed)?),
            },
            rows,
        })
    }
}

/// Where the replay after the pages `marks` starts: the first merged ID at the smallest of
/// their closed clocks (see the module doc: an event not in its page is above that page's
/// closed clock, and so is a transaction's placement).
pub fn replay_from(marks: &[Mark]) -> StreamId {
    let low = marks
        .iter()
        .map(|m| m.closed)
        .min()
        .unwrap_or(Timestamp::ZERO);
    merged::id(low, 0, 0)
}

/// The replay must reach at least this merged ID: past every page's clock, so nothing in
/// the pages' data lies after the resume position.
pub fn replay_to_at_least(marks: &[Mark]) -> StreamId {
    let high = marks
        .iter()
        .map(|m| m.clock)
        .max()
        .unwrap_or(Timestamp::ZERO);
    merged::clock_end(high)
}

/// Whether shard `shard`'s log still holds every event the replay needs (none above its
/// pages' smallest clock went with the retention, or with the log turned off and on): its
/// `floor` (the last event that went) is at or below it.
pub fn still_held(marks: &[Mark], shard: u32, floor: StreamId) -> bool {
    let low = marks
        .iter()
        .filter(|m| m.shard == shard)
        .map(|m| m.clock)
        .min();
    low.is_none_or(|low| floor.clock() <= low)
}

/// What a replay does with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Already in the pages' data.
    Skip,
    /// Came after its page was read: the consumer applies it.
    Apply,
    /// A `flush` that came while its shard's pages were being read (some before it, some
    /// after): the pages are not one state; the snapshot must start over.
    Split,
}

/// [`replays`], telling a flush between a shard's pages apart.
pub fn replay_of(entry: &Reply, marks: &[Mark]) -> Replay {
    if !replays(entry, marks) {
        return Replay::Skip;
    }
    let Reply::Array(pair) = entry else {
        return Replay::Apply;
    };
    let Some(Reply::Array(fields)) = pair.get(1) else {
        return Replay::Apply;
    };
    let field = |name: &[u8]| {
        fields.chunks(2).find_map(|p| match p {
            [Reply::Bulk(k), Reply::Bulk(v)] if k.as_ref() == name => Some(v.clone()),
            _ => None,
        })
    };
    if field(b"op").is_none_or(|op| op.as_ref() != b"flush") {
        return Replay::Apply;
    }
    let shard = field(b"shard").and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
    let clock = field(b"ts").and_then(|t| {
        let (ms, logical) = std::str::from_utf8(&t).ok()?.split_once('.')?;
        Some(Timestamp::from_parts(
            ms.parse().ok()?,
            logical.parse().ok()?,
        ))
    });
    match (shard, clock) {
        (Some(s), Some(c)) if marks.iter().any(|m| m.shard == s && c <= m.clock) => Replay::Split,
        _ => Replay::Apply,
    }
}

/// Whether a merged-stream entry (`[id, [field, value, ...]]`) must be replayed after the
/// pages `marks`: its change came after the page its key fell in was read.
pub fn replays(entry: &Reply, marks: &[Mark]) -> bool {
    let Reply::Array(pair) = entry else {
        return false;
    };
    let Some(Reply::Array(fields)) = pair.get(1) else {
        return false;
    };
    let field = |name: &[u8]| {
        fields.chunks(2).find_map(|p| match p {
            [Reply::Bulk(k), Reply::Bulk(v)] if k.as_ref() == name => Some(v),
            _ => None,
        })
    };
    let flush = field(b"op").is_some_and(|op| op.as_ref() == b"flush");
    let (Some(shard), Some(ts)) = (field(b"shard"), field(b"ts")) else {
        return false;
    };
    let shard = std::str::from_utf8(shard)
        .ok()
        .and_then(|s| s.parse::<u32>().ok());
    let clock = std::str::from_utf8(ts).ok().and_then(|t| {
        let (ms, logical) = t.split_once('.')?;
        Some(Timestamp::from_parts(
            ms.parse().ok()?,
            logical.parse().ok()?,
        ))
    });
    let (Some(shard), Some(clock)) = (shard, clock) else {
        return false;
    };
    if flush {
        // Every key of the shard went: replayed when it came after all its pages (one
        // between them is refused by the reader, [`Replay::Split`]).
        return marks.iter().any(|m| m.shard == shard && clock > m.clock);
    }
    let Some(key) = field(b"key") else {
        return false;
    };
    marks
        .iter()
        .find(|m| m.covers(shard, key))
        .is_none_or(|m| clock > m.clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(shard: u32, after: Option<&str>, next: Option<&str>, clock: u64) -> Mark {
        Mark {
            shard,
            after: after.map(|a| Bytes::from(a.to_string())),
            next: next.map(|n| Bytes::from(n.to_string())),
            clock: Timestamp::from_parts(clock, 0),
            closed: Timestamp::from_parts(clock + 5, 0),
        }
    }

    fn event(key: &str, shard: u32, ms: u64) -> Reply {
        let f = |k: &str, v: String| {
            [
                Reply::Bulk(Bytes::from(k.to_string())),
                Reply::Bulk(Bytes::from(v)),
            ]
        };
        let mut fields = Vec::new();
        fields.extend(f("op", "set".into()));
        fields.extend(f("key", key.into()));
        fields.extend(f("ts", format!("{ms}.0")));
        fields.extend(f("shard", shard.to_string()));
        Reply::Array(vec![
            Reply::Bulk(Bytes::from_static(b"1-0")),
            Reply::Array(fields),
        ])
    }

    #[test]
    fn an_event_is_replayed_only_when_it_came_after_its_keys_page() {
        // Shard 0 read in two pages (up to "m" at clock 100, the rest at 200); shard 1 in one.
        let marks = vec![
            mark(0, None, Some("m"), 100),
            mark(0, Some("m"), None, 200),
            mark(1, None, None, 150),
        ];
        assert!(!replays(&event("a", 0, 100), &marks), "in the first page");
        assert!(replays(&event("a", 0, 101), &marks), "after the first page");
        assert!(
            replays(&event("m", 0, 150), &marks),
            "\"m\" is the first page's last key (the second page's clock is 200)"
        );
        assert!(!replays(&event("n", 0, 150), &marks), "in the second page");
        assert!(replays(&event("n", 0, 201), &marks));
        assert!(replays(&event("n", 1, 151), &marks), "shard 1's page");
        assert!(!replays(&event("n", 1, 150), &marks));
        assert_eq!(
            replay_from(&marks),
            merged::id(Timestamp::from_parts(105, 0), 0, 0)
        );
        assert_eq!(
            replay_to_at_least(&marks),
            merged::clock_end(Timestamp::from_parts(200, 0))
        );
        let floor = |ms| StreamId::of_event(Timestamp::from_parts(ms, 0), 3);
        assert!(still_held(&marks, 0, floor(100)));
        assert!(
            !still_held(&marks, 0, floor(101)),
            "an event after the first page went"
        );
        assert!(still_held(&marks, 1, floor(150)));
        assert!(still_held(&marks, 2, floor(999)), "no page of shard 2");
    }
}
