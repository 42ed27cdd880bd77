//! A `cache` keyspace's change stream (issue 14): a bounded ring of this node's changes, in
//! memory, as the cache itself is.
//!
//! # What it promises, and what it does not
//!
//! Every change to the store while the ring is on becomes an event with a Redis stream ID
//! (`ms-seq`, from this node's clock, strictly increasing), appended while the key's shard is
//! locked, so a key's events are in the order its changes happened. Expiry and eviction are
//! events too (`expire`, `evict`). Nothing survives a restart, and another node's ring is
//! another stream (the cache is per node). The ring keeps at most [`RING_EVENTS_MAX`] events
//! and its byte bound (keys and values); the oldest go first. A reader whose position fell off
//! is told, never silently skipped: its read starts with a `gap` entry whose ID is the last
//! event that went, so it reads on from the oldest held.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use capdb_types::Timestamp;
use capdb_types::changes::{Change, ChangeOp, Event, StreamId};

/// Events a ring keeps at most, whatever their size.
pub const RING_EVENTS_MAX: usize = 1_000_000;
/// Bytes of keys and values a ring keeps by default (`CHANGES CONFIG ks on RETENTION-BYTES n`
/// sets it, up to [`RING_BYTES_MAX`]).
pub const RING_BYTES_DEFAULT: u64 = 64 << 20;
/// The largest byte bound a ring accepts.
pub const RING_BYTES_MAX: u64 = 1 << 30;

/// One read of the ring.
#[derive(Debug, Clone, Default)]
pub struct RingPage {
    pub on: bool,
    /// Events held.
    pub events: u64,
    /// The last event's ID (`0-0`: none yet).
    pub last: StreamId,
    /// The events read, in order (a `gap` first when the read began below what is held:
    /// see [`RingPage::gap`]).
    pub changes: Vec<Change>,
    /// Set when the read began at or below the last event that went: it did, up to this ID.
    pub gap: Option<StreamId>,
    /// The read stopped at its count or byte bound.
    pub more: bool,
    /// The last ID that went (`0-0`: none).
    pub floor: StreamId,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<Change>,
    bytes: u64,
    bytes_max: u64,
    last: StreamId,
    /// The last event that went (trimmed by the bounds, or dropped by a switch off).
    floor: StreamId,
    /// Where the ring began recording, the last time it was switched on: changes before it
    /// (while off, or before this process started) went unrecorded.
    began: StreamId,
    /// Events ever appended (the `index` field of each).
    appended: u64,
}

/// The ring (see the module doc).
pub struct ChangeRing {
    on: AtomicBool,
    inner: Mutex<Inner>,
    /// Events ever appended, for readers waiting for the next one.
    appended: tokio::sync::watch::Sender<u64>,
}

impl Default for ChangeRing {
    fn default() -> Self {
        ChangeRing {
            on: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                bytes_max: RING_BYTES_DEFAULT,
                ..Inner::default()
            }),
            appended: tokio::sync::watch::channel(0).0,
        }
    }
}

/// What an event costs the ring besides its key and values (the entry, its vectors).
pub const EVENT_OVERHEAD_BYTES: u64 = 96;

fn event_bytes(e: &Event) -> u64 {
    let value = match &e.op {
        ChangeOp::Set { value, prev, .. } => value.len() + prev.as_ref().map_or(0, Bytes::len),
        ChangeOp::Cmd { args, also, .. } => args.iter().chain(also).map(Bytes::len).sum(),
        _ => 0,
    };
    (e.key.len() + value) as u64 + EVENT_OVERHEAD_BYTES
}

impl ChangeRing {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Turns the ring on (keeping `bytes_max` bytes, clamped to [`RING_BYTES_MAX`]) or off
    /// (everything held goes; IDs never go back).
    /// Turned on after being off (or first, after a start), the ring marks a new beginning:
    /// its floor moves past everything before, so a reader from before is told (`gap`) that
    /// changes went unrecorded.
    pub fn configure(&self, on: bool, bytes_max: Option<u64>) {
        let mut dropped = VecDeque::new();
        {
            let mut r = self.lock();
            if let Some(b) = bytes_max {
                r.bytes_max = b.clamp(1, RING_BYTES_MAX);
            }
            let was_on = self.is_on();
            if was_on && !on {
                dropped = std::mem::take(&mut r.events);
                r.bytes = 0;
                r.floor = r.last;
            } else if on && !was_on {
                let start = StreamId {
                    ms: capdb_types::unix_now_ms(),
                    seq: 0,
                };
                let mark = r.last.successor().max(start);
                r.last = mark;
                r.began = mark;
            }
            self.trim(&mut r);
            self.on.store(on, Ordering::Relaxed);
        }
        // Freed outside the lock: writers do not wait for a million events to drop.
        drop(dropped);
    }

    /// Appends one event per change, at `now_ms` (the caller holds the key's shard lock).
    pub fn append(&self, now_ms: u64, events: impl IntoIterator<Item = Event>) {
        if !self.is_on() {
            return;
        }
        let mut r = self.lock();
        // Switched off meanwhile: nothing is recorded (the switch moved the floor).
        if !self.is_on() {
            return;
        }
        let before = r.appended;
        for event in events {
            let id = if now_ms > r.last.ms {
                StreamId { ms: now_ms, seq: 0 }
            } else {
                r.last.successor()
            };
            r.last = id;
            r.bytes += event_bytes(&event);
            r.appended += 1;
            let index = r.appended;
            r.events.push_back(Change {
                id,
                index,
                clock: Timestamp::from_parts(id.ms.min(Timestamp::PHYSICAL_MS_MAX), 0),
                event,
                txn: None,
            });
        }
        self.trim(&mut r);
        let appended = r.appended;
        drop(r);
        if appended != before {
            self.appended.send_replace(appended);
        }
    }

    fn trim(&self, r: &mut Inner) {
        while r.events.len() > RING_EVENTS_MAX || (r.bytes > r.bytes_max && r.events.len() > 1) {
            let Some(gone) = r.events.pop_front() else {
                break;
            };
            r.bytes = r.bytes.saturating_sub(event_bytes(&gone.event));
            r.floor = gone.id;
        }
    }

    /// The events with IDs in `from..=to` (newest first when `rev`), at most `count` and
    /// about `bytes_max` bytes.
    pub fn read(
        &self,
        from: StreamId,
        to: StreamId,
        count: usize,
        bytes_max: usize,
        rev: bool,
    ) -> RingPage {
        let r = self.lock();
        let mut page = RingPage {
            on: self.is_on(),
            events: r.events.len() as u64,
            last: r.last,
            floor: r.floor,
            ..RingPage::default()
        };
        if from > to {
            return page;
        }
        // Changes a reader from `from` would have read went: trimmed ones, or (for a reader
        // with a position, not one from the start) those before the ring began recording.
        let from_start = from <= StreamId { ms: 0, seq: 1 };
        let trimmed = r.floor != StreamId::MIN && from <= r.floor;
        let unrecorded = !from_start && from <= r.began;
        if !rev && (trimmed || unrecorded) {
            page.gap = Some(r.floor.max(r.began));
        }
        if count == 0 {
            return page;
        }
        let start = r.events.partition_point(|c| c.id < from);
        let end = r.events.partition_point(|c| c.id <= to);
        let mut bytes = 0usize;
        let held: Box<dyn Iterator<Item = &Change>> = if rev {
            Box::new(r.events.range(start..end).rev())
        } else {
            Box::new(r.events.range(start..end))
        };
        for c in held {
            if page.changes.len() >= count || (bytes >= bytes_max && !page.changes.is_empty()) {
                page.more = true;
                break;
            }
            bytes += event_bytes(&c.event) as usize;
            page.changes.push(c.clone());
        }
        page
    }

    /// Whether a forward read from `from` starts with a `gap` (see [`ChangeRing::read`]).
    pub fn gap_before(&self, from: StreamId) -> bool {
        let r = self.lock();
        let from_start = from <= StreamId { ms: 0, seq: 1 };
        (r.floor != StreamId::MIN && from <= r.floor) || (!from_start && from <= r.began)
    }

    /// Events ever appended (a reader's mark before it reads).
    pub fn mark(&self) -> u64 {
        *self.appended.borrow()
    }

    /// Waits until an event is appended after `mark`, or `max` passed.
    pub async fn wait_past(&self, mark: u64, max: std::time::Duration) {
        let mut rx = self.appended.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|n| *n > mark)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str) -> Event {
        Event {
            key: Bytes::from(key.to_string()),
            op: ChangeOp::Set {
                value: Bytes::from_static(b"0123456789"),
                expire_at_ms: None,
                prev: None,
            },
        }
    }

    #[test]
    fn ids_increase_and_a_reader_that_fell_off_is_told_where_it_lands() {
        let ring = ChangeRing::default();
        let t = capdb_types::unix_now_ms() + 60_000;
        ring.append(t, [set("off")]);
        assert_eq!(
            ring.read(StreamId::MIN, StreamId::MAX, 10, 1 << 20, false)
                .changes
                .len(),
            0
        );
        // 11 bytes of key and value per event, plus the overhead; room for three.
        ring.configure(true, Some(3 * (11 + EVENT_OVERHEAD_BYTES)));
        assert!(
            ring.gap_before(StreamId { ms: 5, seq: 0 }),
            "a reader from before the ring began is told"
        );
        assert!(
            !ring.gap_before(StreamId::MIN),
            "a reader from the start is not"
        );
        ring.append(t, [set("a"), set("b")]);
        ring.append(t - 1, [set("c")]);
        ring.append(t + 4, [set("d")]);
        let id = |ms: u64, seq: u64| StreamId { ms, seq }.to_string();
        let ids: Vec<String> = ring
            .read(StreamId::MIN, StreamId::MAX, 10, 1 << 20, false)
            .changes
            .iter()
            .map(|c| c.id.to_string())
            .collect();
        assert_eq!(
            ids,
            [id(t, 1), id(t, 2), id(t + 4, 0)],
            "the oldest went, a clock going back did not"
        );
        let page = ring.read(StreamId::MIN, StreamId::MAX, 10, 1 << 20, false);
        assert_eq!(page.gap, Some(StreamId { ms: t, seq: 0 }));
        let after_gap = ring.read(
            StreamId { ms: t, seq: 1 },
            StreamId::MAX,
            10,
            1 << 20,
            false,
        );
        assert_eq!(after_gap.gap, None);
        assert_eq!(after_gap.changes.len(), 3);
        let newest = ring.read(StreamId::MIN, StreamId::MAX, 1, 1 << 20, true);
        assert_eq!(newest.changes[0].id.to_string(), id(t + 4, 0));
        assert!(newest.more);
        assert_eq!(ring.mark(), 4);
        // Off and on again: a reader from before is told what went unrecorded.
        ring.configure(false, None);
        assert_eq!(
            ring.read(StreamId::MIN, StreamId::MAX, 10, 1 << 20, false)
                .events,
            0
        );
        ring.append(t + 5, [set("lost")]);
        ring.configure(true, None);
        let page = ring.read(
            StreamId { ms: t + 4, seq: 1 },
            StreamId::MAX,
            10,
            1 << 20,
            false,
        );
        assert!(page.gap.is_some_and(|g| g > StreamId { ms: t + 4, seq: 0 }));
    }
}
