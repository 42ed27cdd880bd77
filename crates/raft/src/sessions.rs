//! Exactly-once application of replicated writes.
//!
//! A write that reaches a leader may be committed even when its answer never comes back (the
//! leader dies after committing, the connection breaks, the hop times out). The node that
//! routes it must then retry on the new leader, and without help the retry would be applied a
//! second time: a compare-and-set fails its own check, an INCR counts twice, a SET overwrites a
//! later write. This module is the help: client sessions as in the Raft dissertation (§6.3),
//! with completion floors as in RIFL (Lee et al., SOSP 2015).
//!
//! # How it works
//!
//! - Every node process is a **session** `(origin node, random epoch)` and numbers its writes
//!   `seq = 1, 2, 3, ...` ([`RequestIds`]). The routing node stamps a write once
//!   ([`RequestId`]) and sends the same stamp on every retry, to any leader.
//! - Each group's state machine keeps a [`SessionTable`]: for every session, which sequence
//!   numbers it applied, and (in `_meta`, written in the same transaction as the write itself)
//!   what each answered. A copy of a write it already applied is **not applied again**: it is
//!   answered with the remembered reply ([`Decision::Duplicate`]).
//! - Decisions are made while applying committed log entries, so every replica makes the same
//!   ones in the same order; the table is part of the state machine (persisted with the applied
//!   log id, carried in snapshots), so it survives restarts, snapshots and leader changes.
//!
//! # Bounds (what is remembered, and for how long)
//!
//! - **Floor.** Every id carries the origin's *floor*: the smallest sequence number it still has
//!   in flight. Everything below was answered and will never be retried, so its reply is
//!   forgotten at once. In steady state a session remembers about as many replies as its node
//!   has writes in flight.
//! - **Retry window.** An origin retries a write for at most its request deadline (3 s). A reply
//!   is forgotten once the session has sent a write [`RETRY_WINDOW_MS`] later (on the origin's
//!   monotonic clock, so clock jumps do not matter).
//! - **Per session** at most [`REMEMBERED_PER_SESSION_MAX`] replies; the oldest are forgotten
//!   first (the floor rises past them).
//! - **Sessions**: at most [`SESSIONS_MAX`] per group. When a new one would exceed that, the
//!   least recently used (by log index of its last entry) is dropped. A process restart starts
//!   a new session, so sessions of dead processes are what get dropped. Only the log decides
//!   (no wall clock: a node whose clock is off must not age anyone else's session), so every
//!   replica drops the same session at the same entry. A write of a dropped session that is
//!   *not* a copy is applied as it would have been; only a copy of a write of the least
//!   recently used of thousands of sessions could be misjudged, and Raft produces copies only
//!   within seconds of the original.
//!
//! A copy of a write whose reply was forgotten, or that is below its session's floor, is never
//! applied: it is answered [`Decision::Expired`] (the routing node reports the outcome as
//! unknown; by the bounds above this happens only to copies nobody waits for).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use capdb_cluster::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

/// How long after a write its reply is remembered, in the origin's session time. Must exceed
/// the longest time an origin keeps retrying one write (the request deadline, 3 s) plus the time
/// a copy may sit in flight; generous, because forgetting early would allow a double apply.
pub const RETRY_WINDOW_MS: u64 = 60_000;
/// Replies remembered per session at most (writes in flight on one node, or within the retry
/// window while one write is stuck).
pub const REMEMBERED_PER_SESSION_MAX: usize = 100_000;
/// Sessions remembered per group at most (one per process start of a node that wrote to it).
pub const SESSIONS_MAX: usize = 4_096;

/// The identity of one write, stamped once by the node that routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The routing node.
    pub origin: NodeId,
    /// Random per process start of `origin`: a restarted node is a new session.
    pub epoch: u64,
    /// Position of this write among the session's writes (from 1).
    pub seq: u64,
    /// Every write of the session below this was answered and will never be sent again.
    pub floor: u64,
    /// When the write was first sent, in ms since the session started (monotonic).
    pub sent_ms: u64,
}

/// Issues [`RequestId`]s for this node's session and tracks which are in flight.
pub struct RequestIds {
    origin: NodeId,
    epoch: u64,
    started: Instant,
    state: Mutex<Issued>,
}

#[derive(Default)]
struct Issued {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// One write in flight; its sequence number leaves the in-flight set when this drops (the
/// write was answered, or its caller gave up on it).
pub struct InFlight {
    ids: Arc<RequestIds>,
    id: RequestId,
}

impl InFlight {
    pub fn id(&self) -> RequestId {
        self.id
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ids.lock().in_flight.remove(&self.id.seq);
    }
}

impl RequestIds {
    pub fn new(origin: NodeId) -> Arc<RequestIds> {
        Arc::new(RequestIds {
            origin,
            epoch: fastrand::u64(1..),
            started: Instant::now(),
            state: Mutex::new(Issued {
                next: 1,
                in_flight: BTreeSet::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Issued> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stamps a new write. Keep the guard until the write's answer is final.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut st = self.lock();
        let seq = st.next;
        st.next += 1;
        st.in_flight.insert(seq);
        let floor = *st.in_flight.first().expect("seq was just inserted");
        // Read under the lock: `sent_ms` never decreases as `seq` grows (the state machine
        // forgets replies from the oldest end relying on it).
        let sent_ms = self.started.elapsed().as_millis() as u64;
        drop(st);
        InFlight {
            ids: self.clone(),
            id: RequestId {
                origin: self.origin,
                epoch: self.epoch,
                seq,
                floor,
                sent_ms,
            },
        }
    }
}

/// What the state machine does with one identified write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// First time seen: apply it and remember its reply under [`SessionTable::row_key`].
    Apply,
    /// Applied before: answer with the reply remembered under [`SessionTable::row_key`].
    Duplicate,
    /// Not applied now, and whether an earlier copy was is no longer known: answer "outcome
    /// unknown". Only copies nobody waits for get this (see the module doc).
    Expired,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    floor: u64,
    newest_sent_ms: u64,
    /// Log index of the session's last entry (least recently used sessions go first).
    last_index: u64,
    /// Remembered replies: seq -> sent_ms (the replies themselves are rows in `_meta`).
    #[serde(skip)]
    remembered: BTreeMap<u64, u64>,
}

type SessionKey = (NodeId, u64);

/// A group's sessions (see the module doc). Pure bookkeeping: the state machine writes the
/// changes it reports ([`SessionTable::take_changes`]) in the same transaction as the entries
/// that caused them.
#[derive(Debug, Default)]
pub struct SessionTable {
    prefix: String,
    sessions: HashMap<SessionKey, Session>,
    /// Sessions whose header changed since the last [`SessionTable::take_changes`].
    dirty: BTreeSet<SessionKey>,
    /// Deletions since then, in the order they happened (rows and headers).
    forgotten: Vec<String>,
}

/// `_meta` changes: put (`Some`) or delete (`None`).
pub type Changes = Vec<(String, Option<Vec<u8>>)>;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("session types always encode")
}

impl SessionTable {
    /// The `_meta` prefix under which a group's sessions live.
    pub fn prefix_of(group: GroupId) -> String {
        capdb_storage::layout::raft_sessions_prefix(group)
    }

    /// An empty table for `group`.
    pub fn new(group: GroupId) -> SessionTable {
        SessionTable {
            prefix: Self::prefix_of(group),
            ..Default::default()
        }
    }

    /// Rebuilds the table from its `_meta` rows (`key` with the full prefix, value).
    pub fn load(group: GroupId, rows: &[(String, Vec<u8>)]) -> Result<SessionTable, String> {
        let mut t = SessionTable::new(group);
        for (key, value) in rows {
            let rest = key
                .strip_prefix(&t.prefix)
                .ok_or_else(|| format!("session row {key} outside {}", t.prefix))?;
            let (session, seq) = match rest.split_once('/') {
                Some((s, seq)) => (s, Some(seq)),
                None => (rest, None),
            };
            let sk = parse_session(session).ok_or_else(|| format!("bad session row {key}"))?;
            match seq {
                None => {
                    let header: Session = postcard::from_bytes(value)
                        .map_err(|e| format!("corrupt session header {key}: {e}"))?;
                    let s = t.sessions.entry(sk).or_default();
                    s.floor = header.floor;
                    s.newest_sent_ms = header.newest_sent_ms;
                    s.last_index = header.last_index;
                }
                Some(seq) => {
                    let seq = u64::from_str_radix(seq, 16)
                        .map_err(|_| format!("bad session row {key}"))?;
                    let sent_ms = row_sent_ms(value).ok_or_else(|| format!("short row {key}"))?;
                    t.sessions
                        .entry(sk)
                        .or_default()
                        .remembered
                        .insert(seq, sent_ms);
                }
            }
        }
        Ok(t)
    }

    /// The `_meta` key of a write's remembered reply.
    pub fn row_key(&self, id: &RequestId) -> String {
        row_key_of(&self.prefix, (id.origin, id.epoch), id.seq)
    }

    fn header_key(&self, sk: SessionKey) -> String {
        format!("{}{:016x}.{:016x}", self.prefix, sk.0, sk.1)
    }

    /// Decides what to do with a write committed at log `index`, and updates the bookkeeping
    /// as if the decision were carried out (an `Apply` is remembered from now on).
    pub fn decide(&mut self, id: &RequestId, index: u64) -> Decision {
        let sk = (id.origin, id.epoch);
        if !self.sessions.contains_key(&sk) && self.sessions.len() >= SESSIONS_MAX {
            self.drop_least_recently_used();
        }
        self.dirty.insert(sk);
        let s = self.sessions.entry(sk).or_default();
        s.floor = s.floor.max(id.floor);
        s.newest_sent_ms = s.newest_sent_ms.max(id.sent_ms);
        s.last_index = s.last_index.max(index);
        // Forget what can no longer be asked for: below the floor, or out of the window. Both
        // conditions hold for a prefix of the seqs (sent_ms grows with seq).
        let horizon = s.newest_sent_ms.saturating_sub(RETRY_WINDOW_MS);
        while let Some((&seq, &sent)) = s.remembered.first_key_value() {
            if seq >= s.floor && sent >= horizon {
                break;
            }
            s.remembered.pop_first();
            self.forgotten.push(row_key_of(&self.prefix, sk, seq));
        }
        if s.remembered.contains_key(&id.seq) {
            return Decision::Duplicate;
        }
        if id.seq < s.floor || id.sent_ms < horizon {
            return Decision::Expired;
        }
        s.remembered.insert(id.seq, id.sent_ms);
        while s.remembered.len() > REMEMBERED_PER_SESSION_MAX {
            let (oldest, _) = s.remembered.pop_first().expect("over the limit, not empty");
            s.floor = s.floor.max(oldest + 1);
            self.forgotten.push(row_key_of(&self.prefix, sk, oldest));
        }
        Decision::Apply
    }

    /// Drops the session whose last entry is oldest in the log, with its rows.
    fn drop_least_recently_used(&mut self) {
        let Some(sk) = self
            .sessions
            .iter()
            .map(|(k, s)| (s.last_index, *k))
            .min()
            .map(|(_, k)| k)
        else {
            return;
        };
        let s = self.sessions.remove(&sk).expect("just found");
        for seq in s.remembered.keys() {
            self.forgotten.push(row_key_of(&self.prefix, sk, *seq));
        }
        self.dirty.remove(&sk);
        self.forgotten.push(self.header_key(sk));
    }

    /// The `_meta` changes since the last call (headers of touched sessions, forgotten rows
    /// and sessions), to be written with the entries that caused them, in this order.
    pub fn take_changes(&mut self) -> Changes {
        // Deletions first, then the headers of sessions that exist now: a session dropped and
        // then started again in the same batch ends up present.
        let mut out: Changes = std::mem::take(&mut self.forgotten)
            .into_iter()
            .map(|k| (k, None))
            .collect();
        for sk in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.sessions.get(&sk) {
                out.push((self.header_key(sk), Some(encode(s))));
            }
        }
        out
    }

    /// Replies remembered in total (metrics, tests).
    pub fn remembered(&self) -> usize {
        self.sessions.values().map(|s| s.remembered.len()).sum()
    }

    /// Sessions known (metrics, tests).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

fn row_key_of(prefix: &str, sk: SessionKey, seq: u64) -> String {
    format!("{prefix}{:016x}.{:016x}/{seq:016x}", sk.0, sk.1)
}

fn parse_session(s: &str) -> Option<SessionKey> {
    let (origin, epoch) = s.split_once('.')?;
    Some((
        u64::from_str_radix(origin, 16).ok()?,
        u64::from_str_radix(epoch, 16).ok()?,
    ))
}

/// A remembered reply row: `[sent_ms: u64 LE][kind: u8][postcard payload]`.
pub mod row {
    /// The payload is a `Vec<Result<Reply, Error>>` (a data write's replies).
    pub const REPLIES: u8 = 0;
    /// The payload is a whole `Response`.
    pub const RESPONSE: u8 = 1;

    /// The row's first bytes, before the payload.
    pub fn prefix(sent_ms: u64, kind: u8) -> Vec<u8> {
        let mut p = sent_ms.to_le_bytes().to_vec();
        p.push(kind);
        p
    }
}

fn row_sent_ms(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64, floor: u64, sent_ms: u64) -> RequestId {
        RequestId {
            origin: 7,
            epoch: 99,
            seq,
            floor,
            sent_ms,
        }
    }

    #[test]
    fn a_retry_of_an_applied_write_is_a_duplicate_not_a_second_apply() {
        let mut t = SessionTable::new(3);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Apply);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Duplicate);
        assert_eq!(t.decide(&id(2, 1, 5), 0), Decision::Apply);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Duplicate);
    }

    #[test]
    fn writes_arriving_out_of_order_are_each_applied_once() {
        let mut t = SessionTable::new(3);
        assert_eq!(t.decide(&id(3, 1, 2), 0), Decision::Apply);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Apply);
        assert_eq!(t.decide(&id(2, 1, 1), 0), Decision::Apply);
        for seq in 1..=3 {
            assert_eq!(t.decide(&id(seq, 1, seq - 1), 0), Decision::Duplicate);
        }
    }

    #[test]
    fn the_floor_forgets_answered_writes_and_refuses_their_late_copies() {
        let mut t = SessionTable::new(3);
        for seq in 1..=10 {
            assert_eq!(t.decide(&id(seq, 1, seq), 0), Decision::Apply);
        }
        assert_eq!(t.remembered(), 10);
        // The origin has answered everything below 10.
        assert_eq!(t.decide(&id(11, 10, 11), 0), Decision::Apply);
        assert_eq!(t.remembered(), 2);
        assert_eq!(t.decide(&id(4, 1, 4), 0), Decision::Expired);
        // Never-seen writes below the floor are refused too: the origin gave up on them.
        let changes = t.take_changes();
        let deletes = changes.iter().filter(|(_, v)| v.is_none()).count();
        assert_eq!(deletes, 9, "one row deleted per forgotten reply");
    }

    #[test]
    fn replies_are_forgotten_after_the_retry_window_and_late_copies_refused() {
        let mut t = SessionTable::new(3);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Apply);
        // Write 1 is still in flight at the origin (floor 1) but a minute has passed.
        assert_eq!(t.decide(&id(2, 1, RETRY_WINDOW_MS + 1), 0), Decision::Apply);
        assert_eq!(t.remembered(), 1);
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Expired);
    }

    #[test]
    fn a_session_remembers_a_bounded_number_of_replies() {
        let mut t = SessionTable::new(3);
        let n = REMEMBERED_PER_SESSION_MAX as u64 + 5;
        for seq in 1..=n {
            assert_eq!(t.decide(&id(seq, 1, 0), 0), Decision::Apply);
        }
        assert_eq!(t.remembered(), REMEMBERED_PER_SESSION_MAX);
        // The oldest were forgotten and their copies are refused, never applied again.
        assert_eq!(t.decide(&id(1, 1, 0), 0), Decision::Expired);
        assert_eq!(t.decide(&id(n, 1, 0), 0), Decision::Duplicate);
    }

    #[test]
    fn beyond_the_cap_the_least_recently_used_session_is_dropped_with_its_rows() {
        let mut t = SessionTable::new(3);
        let of = |origin: u64| RequestId {
            origin,
            epoch: 1,
            seq: 1,
            floor: 1,
            sent_ms: 0,
        };
        for origin in 0..SESSIONS_MAX as u64 {
            assert_eq!(t.decide(&of(origin), 10 + origin), Decision::Apply);
        }
        // Session 0 writes again: now session 1 is the least recently used.
        let again = RequestId { seq: 2, ..of(0) };
        assert_eq!(t.decide(&again, 100_000), Decision::Apply);
        t.take_changes();
        assert_eq!(t.decide(&of(999_999), 100_001), Decision::Apply);
        assert_eq!(t.sessions(), SESSIONS_MAX);
        let changes = t.take_changes();
        assert!(changes.contains(&(t.header_key((1, 1)), None)));
        assert!(changes.contains(&(t.row_key(&of(1)), None)));
        assert_eq!(t.decide(&again, 100_002), Decision::Duplicate);
    }

    #[test]
    fn a_session_dropped_and_started_again_in_one_batch_keeps_its_header() {
        let mut t = SessionTable::new(3);
        let of = |origin: u64, seq: u64| RequestId {
            origin,
            epoch: 1,
            seq,
            floor: 1,
            sent_ms: seq,
        };
        for origin in 0..SESSIONS_MAX as u64 {
            t.decide(&of(origin, 1), origin);
        }
        t.take_changes();
        // A new session pushes out session 0, which then writes again.
        t.decide(&of(SESSIONS_MAX as u64, 1), 10_000);
        t.decide(&of(0, 2), 10_001);
        let changes = t.take_changes();
        let last_for_header = changes
            .iter()
            .rev()
            .find(|(k, _)| *k == t.header_key((0, 1)))
            .map(|(_, v)| v.is_some());
        assert_eq!(
            last_for_header,
            Some(true),
            "the header is put after its deletion"
        );
    }

    #[test]
    fn the_table_reloads_from_its_rows_with_the_same_decisions() {
        let mut t = SessionTable::new(12);
        for seq in 1..=4 {
            let floor = if seq < 3 { 1 } else { 2 };
            assert_eq!(t.decide(&id(seq, floor, seq), 0), Decision::Apply);
        }
        let mut rows: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for seq in 1..=4 {
            let mut v = row::prefix(seq, row::REPLIES);
            v.push(0);
            rows.insert(t.row_key(&id(seq, 2, seq)), v);
        }
        for (k, v) in t.take_changes() {
            match v {
                Some(v) => {
                    rows.insert(k, v);
                }
                None => {
                    rows.remove(&k);
                }
            }
        }
        let rows: Vec<(String, Vec<u8>)> = rows.into_iter().collect();
        let mut back = SessionTable::load(12, &rows).unwrap();
        assert_eq!(back.remembered(), 3, "seq 1 is below the floor 2");
        assert_eq!(back.decide(&id(3, 2, 3), 0), Decision::Duplicate);
        assert_eq!(back.decide(&id(1, 2, 1), 0), Decision::Expired);
        assert_eq!(back.decide(&id(5, 2, 5), 0), Decision::Apply);
    }

    proptest::proptest! {
        /// An origin issues writes, finishes some, and copies of any of them (in flight or
        /// finished, any number of times, in any order) reach the state machine: each write is
        /// applied at most once, and the first copy of a write still in flight is applied.
        #[test]
        fn every_write_is_applied_at_most_once_under_any_delivery(
            ops in proptest::collection::vec((0u8..3, 0usize..64), 1..300)
        ) {
            let ids = RequestIds::new(5);
            let mut t = SessionTable::new(1);
            let mut issued: Vec<(RequestId, Option<InFlight>)> = Vec::new();
            let mut applied: BTreeSet<u64> = BTreeSet::new();
            for (op, pick) in ops {
                match op {
                    0 => {
                        let f = ids.begin();
                        issued.push((f.id(), Some(f)));
                    }
                    1 if !issued.is_empty() => {
                        let i = pick % issued.len();
                        issued[i].1 = None; // answered: leaves the in-flight set
                    }
                    _ if !issued.is_empty() => {
                        let i = pick % issued.len();
                        let (id, in_flight) = (&issued[i].0, issued[i].1.is_some());
                        let first = !applied.contains(&id.seq);
                        match t.decide(id, 0) {
                            Decision::Apply => {
                                proptest::prop_assert!(first, "seq {} applied twice", id.seq);
                                applied.insert(id.seq);
                            }
                            Decision::Duplicate => proptest::prop_assert!(!first),
                            Decision::Expired => proptest::prop_assert!(
                                !in_flight,
                                "a write still in flight must be applied or answered"
                            ),
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn ids_carry_the_smallest_sequence_number_still_in_flight() {
        let ids = RequestIds::new(4);
        let a = ids.begin();
        let b = ids.begin();
        assert_eq!((a.id().seq, a.id().floor), (1, 1));
        assert_eq!((b.id().seq, b.id().floor), (2, 1));
        drop(a);
        let c = ids.begin();
        assert_eq!((c.id().seq, c.id().floor), (3, 2));
        drop(b);
        drop(c);
        assert_eq!(ids.begin().id().floor, 4);
    }
}
