//! Change streams' shared vocabulary (issue 14, `docs/design/streams.md`): stream positions as
//! Redis stream IDs, the read-only stream keys that name a keyspace's changes, the stream clock
//! that orders a shard's log, and the stored form of a change-log row.
//!
//! Pure code: no storage, no Raft. What writes rows (the apply) and what reads them (the stream
//! crate, the RESP and HTTP gateways) build on these types, so that every replica derives the
//! same IDs from the same log and every reader parses positions the way Redis does.
//!
//! # Why IDs come from the stream clock
//!
//! A Redis stream ID is `<ms>-<seq>`. capdb's positions must be the same on every replica and
//! close to wall-clock time (so `XRANGE k 1733300000000 +` means what users expect). The stream
//! clock ([`next_clock`]) is a pure function of the log (each entry's leader-stamped timestamp,
//! raised just enough to be strictly increasing), so an event's ID is `ms` = the clock's
//! physical part and `seq` = its logical part in the high 32 bits and the event's place in its
//! entry in the low 32 ([`StreamId::of_event`]): unique, ordered like the log, identical
//! everywhere.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Timestamp};

/// A position in a change stream: a Redis stream ID, ordered as `(ms, seq)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The ID of the `n`th event (from 0) of an entry whose stream clock is `clock`.
    pub fn of_event(clock: Timestamp, n: u32) -> StreamId {
        StreamId {
            ms: clock.physical_ms(),
            seq: (clock.logical() as u64) << 32 | n as u64,
        }
    }

    /// The stream clock of the entry this ID's event belongs to (the inverse of
    /// [`StreamId::of_event`] for IDs it made; any ID maps to the clock at or below it).
    pub fn clock(self) -> Timestamp {
        let logical = (self.seq >> 32).min(u16::MAX as u64) as u16;
        Timestamp::from_parts(self.ms.min(Timestamp::PHYSICAL_MS_MAX), logical)
    }

    /// The next ID after this one (saturating at [`StreamId::MAX`]): what an exclusive start
    /// `(id` means.
    pub fn successor(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => match self.ms.checked_add(1) {
                Some(ms) => StreamId { ms, seq: 0 },
                None => StreamId::MAX,
            },
        }
    }

    /// The ID before this one (saturating at [`StreamId::MIN`]): what an exclusive end means.
    pub fn predecessor(self) -> StreamId {
        match self.seq.checked_sub(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => match self.ms.checked_sub(1) {
                Some(ms) => StreamId { ms, seq: u64::MAX },
                None => StreamId::MIN,
            },
        }
    }

    /// An explicit ID as Redis accepts it: `<ms>-<seq>`, or `<ms>` alone, whose sequence is
    /// `missing_seq` (Redis takes 0 for a start and the maximum for an end).
    pub fn parse_with(text: &[u8], missing_seq: u64) -> Result<StreamId> {
        let invalid =
            || Error::Command("ERR Invalid stream ID specified as stream command argument".into());
        let text = std::str::from_utf8(text).map_err(|_| invalid())?;
        let (ms, seq) = match text.split_once('-') {
            Some((ms, seq)) => (ms, Some(seq)),
            None => (text, None),
        };
        let number = |s: &str| -> Result<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            s.parse().map_err(|_| invalid())
        };
        Ok(StreamId {
            ms: number(ms)?,
            seq: match seq {
                Some(seq) => number(seq)?,
                None => missing_seq,
            },
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One end of an XRANGE/XREVRANGE range, as given: `-`, `+`, `<id>` or `(<id>` (exclusive).
/// Resolved to the inclusive IDs a reader scans between by [`range_bounds`].
pub fn range_bound(text: &[u8], is_start: bool) -> Result<StreamId> {
    match text {
        b"-" => Ok(StreamId::MIN),
        b"+" => Ok(StreamId::MAX),
        [b'(', rest @ ..] => {
            if rest == b"-" || rest == b"+" {
                return Err(Error::Command(
                    "ERR invalid start or end ID: exclusive ranges need an explicit ID".into(),
                ));
            }
            let id = StreamId::parse_with(rest, if is_start { 0 } else { u64::MAX })?;
            let moved = if is_start {
                (id != StreamId::MAX).then(|| id.successor())
            } else {
                (id != StreamId::MIN).then(|| id.predecessor())
            };
            moved.ok_or_else(|| Error::Command("ERR invalid start ID for the interval".into()))
        }
        id => StreamId::parse_with(id, if is_start { 0 } else { u64::MAX }),
    }
}

/// The inclusive `[start, end]` IDs of `XRANGE key start end`; `None` when the range is empty.
pub fn range_bounds(start: &[u8], end: &[u8]) -> Result<Option<(StreamId, StreamId)>> {
    let (s, e) = (range_bound(start, true)?, range_bound(end, false)?);
    Ok((s <= e).then_some((s, e)))
}

/// What a read-only stream key names (see the design, §4.1): a keyspace's merged change stream,
/// or one shard's, optionally only the events whose key starts with a prefix. Keyspace names
/// cannot contain `:` or `#`, so the grammar is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKey {
    /// `None`: the connection's keyspace (the key `__changes` alone).
    pub keyspace: Option<String>,
    /// `Some(n)`: shard `n`'s stream, in log order; `None`: the merged stream.
    pub shard: Option<u32>,
    /// Only events on keys starting with these bytes (raw; may contain `:`).
    pub prefix: Option<Bytes>,
}

/// The prefix every stream key starts with.
pub const STREAM_KEY_PREFIX: &[u8] = b"__changes";

impl StreamKey {
    /// The stream `key` names; `Ok(None)` when it is not a stream key at all (an ordinary key);
    /// an error when it starts like one but does not parse.
    pub fn parse(key: &[u8]) -> Result<Option<StreamKey>> {
        let Some(rest) = key.strip_prefix(STREAM_KEY_PREFIX) else {
            return Ok(None);
        };
        let bad = |why: &str| {
            Error::Command(format!(
                "ERR invalid change stream key '{}': {why} (expected __changes:<keyspace>[#<shard>][:<prefix>])",
                String::from_utf8_lossy(key)
            ))
        };
        let rest = match rest {
            [] => {
                return Ok(Some(StreamKey {
                    keyspace: None,
                    shard: None,
                    prefix: None,
                }));
            }
            [b':', rest @ ..] => rest,
            // `__changesX`: an ordinary key that merely starts alike.
            _ => return Ok(None),
        };
        let name_end = rest
            .iter()
            .position(|b| *b == b':' || *b == b'#')
            .unwrap_or(rest.len());
        let name = std::str::from_utf8(&rest[..name_end])
            .map_err(|_| bad("the keyspace name is not UTF-8"))?;
        if name.is_empty() {
            return Err(bad("no keyspace name"));
        }
        let mut tail = &rest[name_end..];
        let mut shard = None;
        if let [b'#', after @ ..] = tail {
            let digits_end = after
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(after.len());
            let digits = std::str::from_utf8(&after[..digits_end]).unwrap_or_default();
            shard = Some(
                digits
                    .parse::<u32>()
                    .map_err(|_| bad("the shard is not a number"))?,
            );
            tail = &after[digits_end..];
        }
        let prefix = match tail {
            [] => None,
            [b':', prefix @ ..] => Some(Bytes::copy_from_slice(prefix)),
            _ => return Err(bad("unexpected characters after the shard")),
        };
        Ok(Some(StreamKey {
            keyspace: Some(name.to_string()),
            shard,
            prefix,
        }))
    }
}

/// The stream clock of the next entry of a shard's log (design §2.4): its leader-stamped
/// timestamp, raised just above the previous entry's clock, so that clocks strictly increase in
/// log order whatever order the stamps arrived in, and every replica computes the same ones.
pub fn next_clock(prev: Timestamp, entry: Timestamp) -> Timestamp {
    entry.max(Timestamp(prev.0.saturating_add(1)))
}

/// What one change did to one key (design §2.3). Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOp {
    /// A string stored (SET, APPEND, SETEX, a data-type command storing a string).
    Set {
        value: Bytes,
        expire_at_ms: Option<u64>,
        prev: Option<Bytes>,
    },
    /// The key deleted by a command.
    Del { prev: Option<Bytes> },
    /// The key deleted by its expiry.
    Expire { prev: Option<Bytes> },
    /// The key's deadline changed (`None`: PERSIST).
    Ttl { expire_at_ms: Option<u64> },
    /// A counter changed by `delta` to `value`.
    Incr {
        value: i64,
        delta: i64,
        prev: Option<Bytes>,
    },
    /// A collection changed by this command (its arguments, relative times made absolute);
    /// `also`: the other keys it changed.
    Cmd {
        /// The collection's [`crate::ValueKind`], as `u8`.
        kind: u8,
        args: Vec<Bytes>,
        also: Vec<Bytes>,
    },
    /// The key evicted by a `cache` keyspace's memory limit.
    Evict,
    /// Every key of the stream's shard removed (FLUSHDB); the event's key is empty.
    Flush,
}

/// One change event: a key and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub key: Bytes,
    pub op: ChangeOp,
}

/// One event as a reader gets it: its ID, the log index and stream clock of its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: StreamId,
    pub index: u64,
    pub clock: Timestamp,
    pub event: Event,
    /// Set when the event is part of a cross-shard transaction's commit on this shard.
    pub txn: Option<TxnPart>,
}

/// Which cross-shard transaction an event belongs to: its id (24 bytes: coordinator,
/// session, number, big-endian) and the Raft groups of every participant, so that a merged
/// reader can gather the other shards' parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnPart {
    pub id: Bytes,
    pub groups: Vec<u64>,
}

/// A transaction id's 24 stored bytes as `TxnId` prints it (`origin.epoch.seq`), or hex.
pub fn txn_id_text(id: &[u8]) -> String {
    match <&[u8; 24]>::try_from(id) {
        Ok(b) => {
            let n = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[i..i + 8]);
                u64::from_be_bytes(w)
            };
            crate::txn::TxnId {
                origin: n(0),
                epoch: n(8),
                seq: n(16),
            }
            .to_string()
        }
        Err(_) => id.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The 24 stored bytes of a transaction id printed by [`txn_id_text`] (`None`: not one).
pub fn txn_id_bytes(text: &[u8]) -> Option<[u8; 24]> {
    let text = std::str::from_utf8(text).ok()?;
    let mut parts = text.split('.');
    let origin: u64 = parts.next()?.parse().ok()?;
    let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
    let seq: u64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&origin.to_be_bytes());
    out[8..16].copy_from_slice(&epoch.to_be_bytes());
    out[16..].copy_from_slice(&seq.to_be_bytes());
    Some(out)
}

/// Positions in a keyspace's merged stream (design §3.3): events of every shard ordered by
/// stream clock, then shard, then place. `seq` = the clock's logical part in the top 16 bits,
/// the shard in the next 16, the event's place (in its entry, or in its transaction) in the
/// low 32. Deterministic, so any node gives the same IDs.
pub mod merged {
    use super::StreamId;
    use crate::Timestamp;

    /// The ID of the `n`th event placed at (`clock`, `shard`).
    pub fn id(clock: Timestamp, shard: u32, n: u32) -> StreamId {
        StreamId {
            ms: clock.physical_ms(),
            seq: (clock.logical() as u64) << 48 | ((shard as u64) & 0xFFFF) << 32 | n as u64,
        }
    }

    /// The clock, shard and place an ID names (any ID maps to the place at or below it).
    pub fn parts(id: StreamId) -> (Timestamp, u32, u32) {
        let clock =
            Timestamp::from_parts(id.ms.min(Timestamp::PHYSICAL_MS_MAX), (id.seq >> 48) as u16);
        (clock, ((id.seq >> 32) & 0xFFFF) as u32, id.seq as u32)
    }

    /// The last ID at `clock` (every shard's events at it are at or below it).
    pub fn clock_end(clock: Timestamp) -> StreamId {
        StreamId {
            ms: clock.physical_ms(),
            seq: (clock.logical() as u64) << 48 | 0xFFFF_FFFF_FFFF,
        }
    }
}

/// Consumer groups on change streams (design §5): what a group keeps and the changes made to
/// it through the Raft log of the keyspace's first shard, so that a delivery or an
/// acknowledgement survives a failover and a retried one is applied once.
pub mod groups {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use serde::{Deserialize, Serialize};

    use super::StreamId;

    /// Entries a group's pending list holds at most (a delivery past it is refused: XACK
    /// first).
    pub const PEL_MAX: usize = 100_000;
    /// Consumers a group holds at most.
    pub const CONSUMERS_MAX: usize = 10_000;
    /// Groups one stream holds at most.
    pub const GROUPS_MAX: usize = 100;
    /// Bytes a group or consumer name holds at most (each pending entry names its consumer).
    pub const NAME_MAX: usize = 128;
    /// Pending entries one read of a group's list returns at most.
    pub const PEL_PAGE_MAX: usize = 10_000;

    /// A group: where `>` reads on from, and its consumers.
    #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub struct GroupRecord {
        pub last: StreamId,
        /// Entries delivered to the group by `>` (XINFO's `entries-read`).
        pub entries_read: u64,
        /// Consumer name -> (last seen ms, last successful read ms).
        pub consumers: BTreeMap<Bytes, (u64, u64)>,
        /// Entries in the pending list.
        pub pending: u64,
    }

    /// One delivered, unacknowledged entry.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Pending {
        pub consumer: Bytes,
        pub delivered_ms: u64,
        pub deliveries: u64,
    }

    /// A change to the groups of one stream (`stream`: `<keyspace>` for the merged stream,
    /// `<keyspace>#<n>` for a shard's). Variants are only ever appended.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum GroupOp {
        Create {
            last: StreamId,
            entries_read: Option<u64>,
        },
        Destroy,
        SetId {
            last: StreamId,
            entries_read: Option<u64>,
        },
        CreateConsumer {
            consumer: Bytes,
            now_ms: u64,
        },
        DelConsumer {
            consumer: Bytes,
        },
        /// `>`: entries `ids` (in order) delivered to `consumer`, if the group's last ID is
        /// still `expect` (answers 1); else nothing changes and the group's last ID answers
        /// (read again from there).
        Deliver {
            consumer: Bytes,
            expect: StreamId,
            ids: Vec<StreamId>,
            noack: bool,
            now_ms: u64,
        },
        /// The consumer read its history or came back (XREADGROUP with an ID): seen now.
        Seen {
            consumer: Bytes,
            now_ms: u64,
        },
        Ack {
            ids: Vec<StreamId>,
        },
        Claim {
            consumer: Bytes,
            min_idle_ms: u64,
            ids: Vec<StreamId>,
            /// The new delivery time (IDLE / TIME), else now.
            delivered_ms: Option<u64>,
            retry_count: Option<u64>,
            force: bool,
            justid: bool,
            now_ms: u64,
        },
        AutoClaim {
            consumer: Bytes,
            min_idle_ms: u64,
            start: StreamId,
            count: usize,
            justid: bool,
            now_ms: u64,
        },
        /// The group's next entries went with the retention: its last ID moves to `to` if
        /// it is still `expect`. Answers the group's last ID.
        Skip {
            expect: StreamId,
            to: StreamId,
        },
    }

    /// A [`GroupOp`] on one stream's group.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GroupCommand {
        pub stream: Bytes,
        pub group: Bytes,
        pub op: GroupOp,
    }
}

/// Field names of a transaction's events (see [`Change::fields`]).
pub const TXN_FIELD: &str = "txn";
/// The participants' Raft groups, comma-separated (shard streams only; a merged stream
/// drops it).
pub const TXN_GROUPS_FIELD: &str = "txn-groups";

impl Change {
    /// The event as a Redis stream entry's fields (design §3), in order: `op`, `key`, then what
    /// the op carries, then `ts`, `shard`, `index`.
    pub fn fields(&self, shard: u32) -> Vec<(&'static str, Bytes)> {
        let text = |s: String| Bytes::from(s);
        let mut f: Vec<(&'static str, Bytes)> = Vec::with_capacity(8);
        let op = match &self.event.op {
            ChangeOp::Set { .. } => "set",
            ChangeOp::Del { .. } => "del",
            ChangeOp::Expire { .. } => "expire",
            ChangeOp::Ttl { .. } => "ttl",
            ChangeOp::Incr { .. } => "incr",
            ChangeOp::Cmd { .. } => "cmd",
            ChangeOp::Evict => "evict",
            ChangeOp::Flush => "flush",
        };
        f.push(("op", Bytes::from_static(op.as_bytes())));
        if !matches!(self.event.op, ChangeOp::Flush) {
            f.push(("key", self.event.key.clone()));
        }
        match &self.event.op {
            ChangeOp::Set {
                value,
                expire_at_ms,
                prev,
            } => {
                f.push(("value", value.clone()));
                if let Some(p) = prev {
                    f.push(("prev", p.clone()));
                }
                if let Some(at) = expire_at_ms {
                    f.push(("expire_at_ms", text(at.to_string())));
                }
            }
            ChangeOp::Del { prev } | ChangeOp::Expire { prev } => {
                if let Some(p) = prev {
                    f.push(("prev", p.clone()));
                }
            }
            ChangeOp::Ttl { expire_at_ms } => {
                if let Some(at) = expire_at_ms {
                    f.push(("expire_at_ms", text(at.to_string())));
                }
            }
            ChangeOp::Incr { value, delta, prev } => {
                f.push(("value", text(value.to_string())));
                if let Some(p) = prev {
                    f.push(("prev", p.clone()));
                }
                f.push(("delta", text(delta.to_string())));
            }
            ChangeOp::Cmd { kind, args, also } => {
                let kind = crate::ValueKind::from_bits(*kind).map_or("unknown", |k| k.type_name());
                f.push(("type", Bytes::from_static(kind.as_bytes())));
                if let Some((name, rest)) = args.split_first() {
                    f.push(("cmd", Bytes::from(name.to_ascii_lowercase())));
                    f.extend(rest.iter().map(|a| ("arg", a.clone())));
                }
                f.extend(also.iter().map(|k| ("also", k.clone())));
            }
            ChangeOp::Evict | ChangeOp::Flush => {}
        }
        f.push((
            "ts",
            text(format!(
                "{}.{}",
                self.clock.physical_ms(),
                self.clock.logical()
            )),
        ));
        f.push(("shard", text(shard.to_string())));
        f.push(("index", text(self.index.to_string())));
        if let Some(t) = &self.txn {
            f.push((TXN_FIELD, text(txn_id_text(&t.id))));
            let groups: Vec<String> = t.groups.iter().map(u64::to_string).collect();
            f.push((TXN_GROUPS_FIELD, text(groups.join(","))));
        }
        f
    }

    /// The entry as XRANGE answers it: `[id, [field, value, ...]]`.
    pub fn to_reply(&self, shard: u32) -> crate::Reply {
        use crate::Reply;
        let fields = self
            .fields(shard)
            .into_iter()
            .flat_map(|(k, v)| {
                [
                    Reply::Bulk(Bytes::from_static(k.as_bytes())),
                    Reply::Bulk(v),
                ]
            })
            .collect();
        Reply::Array(vec![
            Reply::Bulk(Bytes::from(self.id.to_string())),
            Reply::Array(fields),
        ])
    }
}

/// What kind of log entry a row's events came from. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowKind {
    Plain,
    /// A single-shard transaction (EXEC), by its request id.
    Txn1 {
        id: Bytes,
    },
    /// A cross-shard transaction's commit on this shard.
    Commit {
        id: Bytes,
        commit_ts: Timestamp,
        participants: Vec<u64>,
    },
    /// FLUSHDB: no per-key events.
    Flush,
}

/// One log entry's part of a row: its index, its stream clock, its kind, and how many of the
/// row's events are its own (they follow the previous heads' events, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHead {
    pub index: u64,
    pub clock: Timestamp,
    pub kind: RowKind,
    pub events: u32,
}

/// The change-log row of one storage job of a shard's apply: the entries that logged something
/// and their events, in log order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangeRow {
    pub entries: Vec<EntryHead>,
    pub events: Vec<Event>,
}

/// The stored row format this code writes.
const ROW_FORMAT: u8 = 1;

impl ChangeRow {
    /// `[format u8] [crc32 u32 LE over what follows] postcard(row)`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = postcard::to_stdvec(self)
            .map_err(|e| Error::Io(format!("change-log row does not encode: {e}")))?;
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(ROW_FORMAT);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The row `raw` holds; `Corruption` when its checksum, format or shape is wrong (a row is
    /// never served unverified).
    pub fn decode(raw: &[u8]) -> Result<ChangeRow> {
        let corrupt = |why: String| Error::Corruption(format!("change-log row: {why}"));
        let [format, c0, c1, c2, c3, body @ ..] = raw else {
            return Err(corrupt(format!(
                "{} bytes, shorter than its header",
                raw.len()
            )));
        };
        if *format != ROW_FORMAT {
            return Err(corrupt(format!("unknown format {format}")));
        }
        if crc32fast::hash(body) != u32::from_le_bytes([*c0, *c1, *c2, *c3]) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let row: ChangeRow =
            postcard::from_bytes(body).map_err(|e| corrupt(format!("does not decode: {e}")))?;
        let counted: u64 = row.entries.iter().map(|e| e.events as u64).sum();
        if counted != row.events.len() as u64 {
            return Err(corrupt(format!(
                "heads count {counted} events, the row holds {}",
                row.events.len()
            )));
        }
        Ok(row)
    }

    /// Each event with its entry's head and its ID, in order.
    pub fn events_with_ids(&self) -> Vec<(&EntryHead, StreamId, &Event)> {
        let mut out = Vec::with_capacity(self.events.len());
        let mut events = self.events.iter();
        for head in &self.entries {
            for n in 0..head.events {
                if let Some(e) = events.next() {
                    out.push((head, StreamId::of_event(head.clock, n), e));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn merged_ids_order_by_clock_then_shard_then_place_and_round_trip() {
        let c = |ms, l| Timestamp::from_parts(ms, l);
        let ids = [
            merged::id(c(5, 0), 3, 9),
            merged::id(c(5, 1), 0, 0),
            merged::id(c(5, 1), 0, 1),
            merged::id(c(5, 1), 2, 0),
            merged::id(c(6, 0), 0, 0),
        ];
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(merged::parts(ids[3]), (c(5, 1), 2, 0));
        assert!(merged::clock_end(c(5, 1)) > ids[3] && merged::clock_end(c(5, 1)) < ids[4]);
    }

    #[test]
    fn transaction_ids_print_and_parse_back() {
        let id = crate::txn::TxnId {
            origin: 3,
            epoch: 0xdead_beef,
            seq: 42,
        };
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&3u64.to_be_bytes());
        raw[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        raw[16..].copy_from_slice(&42u64.to_be_bytes());
        assert_eq!(txn_id_text(&raw), id.to_string());
        assert_eq!(txn_id_bytes(id.to_string().as_bytes()), Some(raw));
        assert_eq!(txn_id_bytes(b"1.2"), None);
    }
    use crate::ValueKind;

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    #[test]
    fn ids_parse_and_print_as_redis_writes_them() {
        assert_eq!(
            StreamId::parse_with(b"1733300000000-5", 0).unwrap(),
            id(1733300000000, 5)
        );
        assert_eq!(StreamId::parse_with(b"17", 0).unwrap(), id(17, 0));
        assert_eq!(
            StreamId::parse_with(b"17", u64::MAX).unwrap(),
            id(17, u64::MAX)
        );
        assert_eq!(id(17, 3).to_string(), "17-3");
        for bad in [
            &b""[..],
            b"-",
            b"1-",
            b"-1",
            b"a-1",
            b"1-2-3",
            b"+1",
            b"18446744073709551616",
        ] {
            let e = StreamId::parse_with(bad, 0).unwrap_err().to_string();
            assert!(e.contains("Invalid stream ID"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn range_ends_follow_redis_including_exclusive_ones() {
        assert_eq!(
            range_bounds(b"-", b"+").unwrap(),
            Some((StreamId::MIN, StreamId::MAX))
        );
        assert_eq!(
            range_bounds(b"5", b"5").unwrap(),
            Some((id(5, 0), id(5, u64::MAX)))
        );
        assert_eq!(
            range_bounds(b"(5-1", b"(6-0").unwrap(),
            Some((id(5, 2), id(5, u64::MAX)))
        );
        assert_eq!(range_bounds(b"6", b"5").unwrap(), None);
        assert!(range_bounds(b"(-", b"+").is_err());
        assert!(range_bounds(b"(18446744073709551615-18446744073709551615", b"+").is_err());
    }

    #[test]
    fn stream_keys_name_a_keyspace_a_shard_and_a_prefix() {
        let parse = |k: &[u8]| StreamKey::parse(k).unwrap();
        assert_eq!(parse(b"users"), None);
        assert_eq!(parse(b"__changesX"), None);
        assert_eq!(
            parse(b"__changes"),
            Some(StreamKey {
                keyspace: None,
                shard: None,
                prefix: None
            })
        );
        assert_eq!(
            parse(b"__changes:users"),
            Some(StreamKey {
                keyspace: Some("users".into()),
                shard: None,
                prefix: None
            })
        );
        assert_eq!(
            parse(b"__changes:users#3:user:1:"),
            Some(StreamKey {
                keyspace: Some("users".into()),
                shard: Some(3),
                prefix: Some(Bytes::from_static(b"user:1:")),
            })
        );
        assert_eq!(
            parse(b"__changes:users:"),
            Some(StreamKey {
                keyspace: Some("users".into()),
                shard: None,
                prefix: Some(Bytes::new()),
            })
        );
        for bad in [
            &b"__changes:"[..],
            b"__changes:#1",
            b"__changes:u#",
            b"__changes:u#x",
            b"__changes:u#1x",
        ] {
            assert!(StreamKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn arb_op() -> impl Strategy<Value = ChangeOp> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from);
        prop_oneof![
            (bytes(), any::<Option<u64>>(), proptest::option::of(bytes())).prop_map(
                |(value, expire_at_ms, prev)| ChangeOp::Set {
                    value,
                    expire_at_ms,
                    prev
                }
            ),
            proptest::option::of(bytes()).prop_map(|prev| ChangeOp::Del { prev }),
            any::<Option<u64>>().prop_map(|expire_at_ms| ChangeOp::Ttl { expire_at_ms }),
            (any::<i64>(), any::<i64>()).prop_map(|(value, delta)| ChangeOp::Incr {
                value,
                delta,
                prev: None
            }),
            (
                proptest::collection::vec(bytes(), 0..4),
                proptest::collection::vec(bytes(), 0..2)
            )
                .prop_map(|(args, also)| ChangeOp::Cmd {
                    kind: ValueKind::Hash as u8,
                    args,
                    also
                }),
        ]
    }

    fn arb_row() -> impl Strategy<Value = ChangeRow> {
        proptest::collection::vec(
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..8), arb_op()),
                    0..4,
                ),
            ),
            0..4,
        )
        .prop_map(|entries| {
            let mut row = ChangeRow::default();
            for (index, clock, events) in entries {
                row.entries.push(EntryHead {
                    index,
                    clock: Timestamp(clock),
                    kind: RowKind::Plain,
                    events: events.len() as u32,
                });
                row.events.extend(events.into_iter().map(|(k, op)| Event {
                    key: Bytes::from(k),
                    op,
                }));
            }
            row
        })
    }

    proptest! {
        #[test]
        fn a_row_decodes_to_itself_and_any_flipped_bit_is_caught(row in arb_row(), at in any::<usize>(), bit in 0u8..8) {
            let raw = row.encode().unwrap();
            prop_assert_eq!(ChangeRow::decode(&raw).unwrap(), row);
            let mut bad = raw.clone();
            let i = at % bad.len();
            bad[i] ^= 1 << bit;
            prop_assert!(ChangeRow::decode(&bad).is_err());
            prop_assert!(ChangeRow::decode(&raw[..raw.len() - 1]).is_err() || raw.len() <= 5);
        }

        #[test]
        fn the_stream_clock_strictly_increases_whatever_order_stamps_arrive_in(stamps in proptest::collection::vec(0u64..1 << 40, 1..50)) {
            let mut clock = Timestamp::ZERO;
            let mut ids = Vec::new();
            for s in stamps {
                let next = next_clock(clock, Timestamp(s));
                prop_assert!(next > clock);
                prop_assert!(next >= Timestamp(s));
                clock = next;
                ids.push(StreamId::of_event(clock, 0));
                ids.push(StreamId::of_event(clock, 1));
            }
            prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "IDs follow the log order");
            for id in ids {
                let n = (id.seq & u32::MAX as u64) as u32;
                prop_assert_eq!(StreamId::of_event(id.clock(), n), id);
            }
        }

        #[test]
        fn ids_print_and_parse_back(ms in any::<u64>(), seq in any::<u64>()) {
            let i = id(ms, seq);
            prop_assert_eq!(StreamId::parse_with(i.to_string().as_bytes(), 0).unwrap(), i);
            prop_assert!(i.successor() >= i && i.predecessor() <= i);
        }
    }
}
