//! A `cp` shard's change log (issue 14, `docs/design/streams.md` §2): every change the apply
//! makes, in log order, written in the same storage transaction as the change itself.
//!
//! # Why in the apply's transaction
//!
//! The log is a function of the Raft log, written by the job that applies the entries, so it
//! can never disagree with the data (no change without its event, no event without its change),
//! and every replica writes the same rows under the same positions from the same entries (a
//! replica that installed a snapshot lacks those before it, and says so). A crash loses
//! nothing the WAL does not replay.
//!
//! # Rows
//!
//! - `{shard}/chg` (u64 -> bytes): one [`ChangeRow`] per storage job that changed something,
//!   keyed by the stream clock of its first entry ([`capdb_types::changes::next_clock`]: the
//!   entry's leader timestamp raised just above the previous logged entry's clock, so keys
//!   strictly increase in log order and an ID maps to its row with one seek).
//! - In the element table under the reserved id 0 (replicated state, carried by snapshots and
//!   across FLUSHDB): `chg-on` (present while the log is on; its value is the index that turned
//!   it on), `chg-clock` (u64 LE each: the last logged entry's clock, the events this replica
//!   holds, the last entry's event count, so the last ID is known without reading a row, the
//!   closed clock progress entries reached, and the event bytes held), `chg-retention` (ms;
//!   default [`RETENTION_MS_DEFAULT`]), `chg-retention-bytes` (default
//!   [`RETENTION_BYTES_DEFAULT`]) and `chg-floor` (the ID of the last event this replica no
//!   longer holds: trimmed by the retention, or before a snapshot it installed; a read
//!   reaching it is an error, never a silent gap).
//! - `{shard}/chg-txn`: a cross-shard transaction's id -> the stream clock of its part here
//!   (how a merged reader finds the other parts).
//!
//! # What is logged (this version)
//!
//! Effects (what a key-level write wrote, or read back after a data-type command): a string
//! key that holds a value afterwards logs
//! `Set` with its value and deadline; a key that is gone logs `Del` (`Expire` when the leader's
//! expiry sweep removed it); a collection logs `Cmd` with the command's arguments (a collection
//! can be too big to copy on every write). Single-shard transactions log their events under
//! the entry like any write; a cross-shard transaction's commit logs its effects on this shard
//! under the commit's entry (a collection it changed as `Cmd` without arguments). Not yet
//! logged: FLUSHDB (the log survives it, with no event). A replica that installs a snapshot
//! has no rows from before it (the log is not in snapshots): it marks the floor, and a read
//! reaching below it answers `HISTORYLOST` naming the oldest position it holds.
//!
//! # Bounds
//!
//! A row holds one storage job's events (the writer's job bound); [`CHANGES_READ_MAX`] events
//! per read. Rows past the shard's retention go by its leader's trim entries ([`trim`]: at
//! most [`CHANGES_TRIM_EVENTS_MAX`] events or [`CHANGES_TRIM_BYTES_MAX`] bytes each); turning
//! the log off deletes it.

use bytes::Bytes;
use capdb_types::changes::{
    Change, ChangeOp, ChangeRow, EntryHead, Event, RowKind, StreamId, TxnPart, next_clock,
};
use capdb_types::{Error, Mutation, Result, Timestamp, Value, ValueKind};
use redb::{ReadableTable, ReadableTableMetadata};

use super::{io_err, log_def, table_def};
use crate::layout::{change_table, change_txn_table};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// Most events one read returns (a reader asks again from where it stopped).
pub const CHANGES_READ_MAX: usize = 10_000;

/// The internal read command that reads a shard's change log through the query path
/// (`DiskTable::changes_query`); not a client command.
pub const CHANGES_QUERY: &str = "capdb.changes";

/// The internal read command that finds a cross-shard transaction's part in a shard's
/// change log (`DiskTable::changes_txn_query`); not a client command.
pub const CHANGES_TXN_QUERY: &str = "capdb.changes-txn";
/// The internal read command that answers a page of a shard's data with where its change
/// log stood, from one snapshot (`DiskTable::changes_snapshot_query`): the way back for a
/// reader whose position went with the retention.
pub const CHANGES_SNAPSHOT_QUERY: &str = "capdb.changes-snapshot";
/// Keys one snapshot page holds at most (and about [`CHANGES_READ_BYTES_MAX`] of keys and
/// values, after at least one key).
pub const SNAPSHOT_PAGE_MAX: usize = 1_000;
/// Rows one snapshot page examines at most (deleted and expired ones too).
pub const SNAPSHOT_EXAMINE_MAX: usize = 10_000;

const RESERVED: [u8; 8] = [0; 8];
const ON: &[u8] = b"chg-on";
const CLOCK: &[u8] = b"chg-clock";
const FLOOR: &[u8] = b"chg-floor";
const RETENTION: &[u8] = b"chg-retention";
const RETENTION_BYTES: &[u8] = b"chg-retention-bytes";
/// Present: events carry the key's previous string value (`prev`).
const PREV: &[u8] = b"chg-prev";

/// How long a shard keeps its change-log rows unless configured (`CHANGES CONFIG ... RETENTION-MS`).
pub const RETENTION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// How many bytes of events (keys, values, arguments) a shard keeps unless configured
/// (`CHANGES CONFIG ... RETENTION-BYTES`): past it, the oldest go whatever their age.
pub const RETENTION_BYTES_DEFAULT: u64 = 1 << 30;
/// Events one trim entry deletes at most, and bytes of them (whole entries; the first
/// always): the next trim continues.
pub const CHANGES_TRIM_EVENTS_MAX: usize = 65_536;
/// A consumer group's position holds the retention back (a *pin*) only while the shard holds
/// at most this many bytes of events: past it the pin lapses, the trim goes on, and the
/// group's next read is told its entries went (disk stays bounded whatever a group does).
pub const PIN_BYTES_MAX: u64 = 4 << 30;
pub const CHANGES_TRIM_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A change-log step applied through the shard's log (`Request::ChangesConfig` and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesStep {
    /// On (from this entry) or off (every row deleted).
    Switch(bool),
    /// Keep rows this long (ms).
    Retention(u64),
    /// Keep at most this many bytes of events.
    RetentionBytes(u64),
    /// Whether events carry the key's previous string value (`prev`).
    Prev(bool),
    /// Delete the entries older than the retention before `now_ms` (the proposer's clock,
    /// carried by the entry), a bounded number; reads below what went answer `HISTORYLOST`.
    Trim { now_ms: u64 },
    /// [`ChangesStep::Trim`], and also every entry below clock `keep_from` (the leader's
    /// retention-by-size decision, [`size_keep_from`], carried in the entry so that every
    /// replica deletes the same events whatever its own byte count).
    TrimTo { now_ms: u64, keep_from: Timestamp },
    /// [`ChangesStep::TrimTo`] (`keep_from` optional) that keeps every entry at or above
    /// clock `pinned` (the oldest consumer-group position on this shard, as the leader read
    /// it) while the shard holds at most [`PIN_BYTES_MAX`].
    TrimPinned {
        now_ms: u64,
        keep_from: Option<Timestamp>,
        pinned: Timestamp,
    },
    /// Close the shard's stream up to `ts` (the proposer's clock): every later event gets a
    /// larger clock, so a merged reader may release everything at or below it.
    Progress { ts: Timestamp },
    /// A consumer-group command on this (first) shard's element table (`groups.rs`).
    Group(capdb_types::changes::groups::GroupCommand),
    /// A job command on a `_jobs` shard's element table (`jobs.rs`): not a change-log step,
    /// but the same kind of entry (applied alone, its answer remembered with it).
    Job(capdb_types::jobs::JobCommand),
    /// A view command on a `cp` shard (`views.rs`): its definitions, backfill and purge.
    View(capdb_types::views::ViewCommand),
}

/// Bytes of keys and values one read gathers at most (past it the read stops, after at least
/// one event): a consumer's page stays well under the transport's frame bound even when every
/// event carries a large value.
pub const CHANGES_READ_BYTES_MAX: usize = 16 * 1024 * 1024;

fn reserved(name: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(name);
    k
}

/// Whether a shard logs its changes, and where its clock stands.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ChangeLog {
    on: bool,
    clock: Timestamp,
    events: u64,
    /// Events of the last logged entry (its last event's ID is `(clock, last_events - 1)`).
    last_events: u64,
    /// How far a progress entry closed the stream (may be past `clock`).
    closed: Timestamp,
    /// Bytes of the events held (keys, values, arguments: what retention by size counts).
    bytes: u64,
    /// Events carry the previous string value of their key.
    prev: bool,
}

impl ChangeLog {
    pub(super) fn load(el: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<ChangeLog> {
        let on = el.get(&reserved(ON)[..]).map_err(io_err)?.is_some();
        if !on {
            // The common case costs one lookup per storage job.
            return Ok(ChangeLog::default());
        }
        let c = match el.get(&reserved(CLOCK)[..]).map_err(io_err)? {
            Some(raw) => decode_clock(raw.value())?,
            None => ClockRow::default(),
        };
        let prev = el.get(&reserved(PREV)[..]).map_err(io_err)?.is_some();
        Ok(ChangeLog {
            on,
            clock: c.clock,
            events: c.events,
            last_events: c.last_events,
            closed: c.closed,
            bytes: c.bytes,
            prev,
        })
    }

    pub(super) fn is_on(&self) -> bool {
        self.on
    }

    /// The stream clock of the last entry that logged events (an async view's position).
    pub(super) fn clock(&self) -> Timestamp {
        self.clock
    }

    /// Whether events carry their key's previous string value (read before the apply).
    pub(super) fn wants_prev(&self) -> bool {
        self.on && self.prev
    }

    /// Every event logged from now on gets a clock above this (the closed timestamp of the
    /// shard's stream, design §3.2).
    pub(super) fn horizon(&self) -> Timestamp {
        self.clock.max(self.closed)
    }

    /// The timestamp a cross-shard transaction's YES vote carries when the entry stamped
    /// `ts` prepares it here: above every event this shard logged before it. The commit
    /// timestamp is the largest vote and every part of the commit is logged at or above it
    /// (`txn.rs`), so each part comes after every earlier write to the transaction's keys on
    /// every participant: what lets a merged reader place the whole transaction at its first
    /// part and keep per-key order.
    pub(super) fn vote_at(&self, ts: Timestamp) -> Timestamp {
        if self.on {
            next_clock(self.horizon(), ts)
        } else {
            ts
        }
    }

    fn clock_row(&self) -> Vec<u8> {
        encode_clock(ClockRow {
            clock: self.clock,
            events: self.events,
            last_events: self.last_events,
            closed: self.closed,
            bytes: self.bytes,
        })
    }
}

/// `chg-clock`: the last logged entry's clock, events held, events of the last logged entry,
/// and how far progress entries closed the stream (a row of 24 bytes, from before progress
/// entries, has none).
#[derive(Debug, Clone, Copy, Default)]
struct ClockRow {
    clock: Timestamp,
    events: u64,
    last_events: u64,
    closed: Timestamp,
    bytes: u64,
}

fn decode_clock(raw: &[u8]) -> Result<ClockRow> {
    let bad = || Error::Corruption(format!("change-log clock row of {} bytes", raw.len()));
    let word = |at: usize| -> Result<u64> {
        raw.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(bad)
    };
    // 24 bytes before progress entries, 32 before retention by size.
    if ![24, 32, 40].contains(&raw.len()) {
        return Err(bad());
    }
    let optional = |at: usize| -> Result<u64> { if raw.len() > at { word(at) } else { Ok(0) } };
    Ok(ClockRow {
        clock: Timestamp(word(0)?),
        events: word(8)?,
        last_events: word(16)?,
        closed: Timestamp(optional(24)?),
        bytes: optional(32)?,
    })
}

fn encode_clock(c: ClockRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    for w in [c.clock.0, c.events, c.last_events, c.closed.0, c.bytes] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// Rewrites the `chg-clock` row of `el` through `change` (nothing when there is none).
fn update_clock(el: &mut RawTable<'_>, change: impl FnOnce(&mut ClockRow)) -> Result<()> {
    let Some(raw) = el
        .get(&reserved(CLOCK)[..])
        .map_err(io_err)?
        .map(|v| v.value().to_vec())
    else {
        return Ok(());
    };
    let mut c = decode_clock(&raw)?;
    change(&mut c);
    el.insert(&reserved(CLOCK)[..], &encode_clock(c)[..])
        .map_err(io_err)?;
    Ok(())
}

/// `chg-floor`: the ID of the last event this replica no longer holds (`None`: it holds
/// every event since the log was turned on).
fn read_floor(el: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<Option<StreamId>> {
    let Some(raw) = el.get(&reserved(FLOOR)[..]).map_err(io_err)? else {
        return Ok(None);
    };
    let raw = raw.value();
    let word = |at: usize| -> Result<u64> {
        raw.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Error::Corruption("change-log floor row".into()))
    };
    if raw.len() != 16 {
        return Err(Error::Corruption("change-log floor row".into()));
    }
    Ok(Some(StreamId {
        ms: word(0)?,
        seq: word(8)?,
    }))
}

/// Raises the floor to `id` (never lowers it).
fn raise_floor(el: &mut RawTable<'_>, id: StreamId) -> Result<()> {
    if read_floor(el)?.is_some_and(|f| f >= id) {
        return Ok(());
    }
    let mut v = id.ms.to_le_bytes().to_vec();
    v.extend_from_slice(&id.seq.to_le_bytes());
    el.insert(&reserved(FLOOR)[..], &v[..]).map_err(io_err)?;
    Ok(())
}

/// After a snapshot install into `el`: the replica holds no rows up to the snapshot's last
/// event.
pub(super) fn mark_snapshot(el: &mut RawTable<'_>) -> Result<()> {
    let c = match el.get(&reserved(CLOCK)[..]).map_err(io_err)? {
        Some(raw) => decode_clock(raw.value())?,
        None => return Ok(()),
    };
    // It holds none of the events counted so far.
    update_clock(el, |c| {
        c.events = 0;
        c.bytes = 0;
    })?;
    let last = StreamId::of_event(
        c.clock,
        u32::try_from(c.last_events.saturating_sub(1)).unwrap_or(u32::MAX),
    );
    raise_floor(el, last)
}

/// The element-table rows a FLUSHDB must carry over so the log stays on with its clock.
pub fn carried_rows(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in [ON, CLOCK, FLOOR, RETENTION, RETENTION_BYTES, PREV] {
        let k = reserved(name);
        if let Some(v) = el.get(&k[..]).map_err(io_err)? {
            out.push((k, v.value().to_vec()));
        }
    }
    // Views' definitions (their rows go: nothing is left to count).
    out.extend(super::views::carried_rows(el)?);
    // Consumer groups and their pending entries (bounded by their limits, `groups.rs`).
    for prefix in super::groups::all_rows_prefixes() {
        for r in el.range(&prefix[..]..).map_err(io_err)? {
            let (k, v) = r.map_err(io_err)?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
    }
    Ok(out)
}

/// Turns the log on (from log index `index`) or off (deleting every row) in the job of `x`.
pub(super) fn configure(x: &super::ops::Exec, table: &str, on: bool, index: u64) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    let was_on = el.get(&reserved(ON)[..]).map_err(io_err)?.is_some();
    if on && !was_on {
        el.insert(&reserved(ON)[..], &index.to_le_bytes()[..])
            .map_err(io_err)?;
    } else if !on && was_on {
        el.remove(&reserved(ON)[..]).map_err(io_err)?;
        // Writes from here on are not logged: Lua views stop now (see `set_prev`).
        super::views::stop_async(&mut el, "the keyspace's change log was turned off")?;
        // The clock stays (IDs never go back, even across off and on); the count restarts.
        let c = match el.get(&reserved(CLOCK)[..]).map_err(io_err)? {
            Some(raw) => decode_clock(raw.value())?,
            None => ClockRow::default(),
        };
        el.insert(
            &reserved(CLOCK)[..],
            &encode_clock(ClockRow {
                events: 0,
                bytes: 0,
                ..c
            })[..],
        )
        .map_err(io_err)?;
        // Every row goes: a consumer at an older position is told so if the log comes back,
        // rather than served what follows as if nothing were missing.
        if let Some(n) = c.last_events.checked_sub(1) {
            let last = StreamId::of_event(c.clock, u32::try_from(n).unwrap_or(u32::MAX));
            raise_floor(&mut el, last)?;
        }
        drop(el);
        x.txn
            .delete_table(log_def(&change_table(table)))
            .map_err(io_err)?;
        x.txn
            .delete_table(table_def(&change_txn_table(table)))
            .map_err(io_err)?;
    }
    Ok(())
}

fn read_u64_row(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
) -> Result<Option<u64>> {
    match el.get(&reserved(name)[..]).map_err(io_err)? {
        Some(raw) => raw
            .value()
            .try_into()
            .map(u64::from_le_bytes)
            .map(Some)
            .map_err(|_| Error::Corruption("change-log row of the wrong size".into())),
        None => Ok(None),
    }
}

/// Sets how long the shard keeps its rows.
pub(super) fn set_retention(x: &super::ops::Exec, table: &str, ms: u64) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    el.insert(&reserved(RETENTION)[..], &ms.to_le_bytes()[..])
        .map_err(io_err)?;
    Ok(())
}

/// Sets whether events carry the key's previous string value.
pub(super) fn set_prev(x: &super::ops::Exec, table: &str, on: bool) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    if on {
        el.insert(&reserved(PREV)[..], &[1u8][..]).map_err(io_err)?;
    } else if el.remove(&reserved(PREV)[..]).map_err(io_err)?.is_some() {
        // Events from here on lack what Lua views need: they stop now, in this entry, so
        // that no update reads them (turned on again, they would not know of the gap).
        super::views::stop_async(
            &mut el,
            "the keyspace's change log stopped carrying previous values (PREV no)",
        )?;
    }
    Ok(())
}

/// What a key held before a change, for its event's `prev` (design §2.3: collections never
/// carry it).
pub(super) struct Before {
    /// The stored string (`None`: absent, removed, or a collection).
    value: Option<Bytes>,
    /// Whether it was live then: an expired string is the `prev` of its `expire` event only.
    live: bool,
}

/// [`Before`] for each of `keys`, read before the change (one lookup per distinct key).
pub(super) fn values_before<'k>(
    t: &RawTable<'_>,
    keys: impl IntoIterator<Item = &'k Bytes>,
    now_ms: u64,
) -> Result<std::collections::HashMap<Bytes, Before>> {
    let mut out = std::collections::HashMap::new();
    for k in keys {
        if out.contains_key(k) {
            continue;
        }
        let v = match t.get(&k[..]).map_err(io_err)? {
            Some(raw) => Some(Value::decode(raw.value())?),
            None => None,
        };
        let before = match v.filter(|v| !v.header.tombstone && v.header.kind == ValueKind::String) {
            Some(v) => Before {
                live: v.is_live(now_ms),
                value: Some(v.data),
            },
            None => Before {
                value: None,
                live: false,
            },
        };
        out.insert(k.clone(), before);
    }
    Ok(out)
}

/// The time at which the events of a write judge whether a value it left is live (else they
/// log `del`): the write's own, or, while the shard keeps an async view, the start of time.
/// A view counts a key until the log removes it, so a value written with a deadline already
/// past (a transaction committed late, `PXAT` in the past) is logged as the `set` it is in
/// the data, and its removal by the sweep as the `expire` that follows.
pub(super) fn live_at(now_ms: u64, for_async_views: bool) -> u64 {
    if for_async_views { 0 } else { now_ms }
}

/// Gives each event the previous value its key held (from [`values_before`]).
///
/// `for_views` (the shard keeps an async view, which counts a key until the log removes it,
/// as a synchronous one does): a value whose deadline passed but that the sweep had not
/// removed yet is given too, and a string replaced by a collection (COPY or RESTORE with
/// REPLACE, a `*STORE` onto it) is logged as a `del` carrying it before the collection's
/// `cmd`, so that the view can take back what it counted.
pub(super) fn fill_prev(
    events: &mut Vec<Event>,
    before: &std::collections::HashMap<Bytes, Before>,
    for_views: bool,
) {
    let mut deleted: Vec<(usize, Event)> = Vec::new();
    for (i, e) in events.iter_mut().enumerate() {
        let Some(Before {
            value: Some(old),
            live,
        }) = before.get(&e.key)
        else {
            continue;
        };
        match &mut e.op {
            ChangeOp::Expire { prev } => *prev = Some(old.clone()),
            ChangeOp::Set { prev, .. } | ChangeOp::Del { prev } | ChangeOp::Incr { prev, .. }
                if *live || for_views =>
            {
                *prev = Some(old.clone())
            }
            ChangeOp::Cmd { .. } if for_views => deleted.push((
                i,
                Event {
                    key: e.key.clone(),
                    op: ChangeOp::Del {
                        prev: Some(old.clone()),
                    },
                },
            )),
            _ => {}
        }
    }
    // From the last, so that the earlier positions hold.
    for (i, del) in deleted.into_iter().rev() {
        events.insert(i, del);
    }
}

/// Sets how many bytes of events the shard keeps.
pub(super) fn set_retention_bytes(x: &super::ops::Exec, table: &str, bytes: u64) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    el.insert(&reserved(RETENTION_BYTES)[..], &bytes.to_le_bytes()[..])
        .map_err(io_err)?;
    Ok(())
}

/// Whether the oldest row is past the retention at `now_ms`, or the events held are more
/// than the retention by size (a trim is due), from one snapshot.
/// `pinned`: the oldest consumer-group position's clock on this shard (kept while the shard
/// holds at most [`PIN_BYTES_MAX`]), so that a pinned log costs no trim entry.
pub(super) fn trim_due(
    txn: &redb::ReadTransaction,
    table: &str,
    now_ms: u64,
    pinned: Option<Timestamp>,
) -> Result<bool> {
    let (retention, keep_from, bytes) = match txn
        .open_table(table_def(&crate::layout::element_table(table)))
    {
        Ok(el) => {
            let log = ChangeLog::load(&el)?;
            if !log.on {
                return Ok(false);
            }
            let max_bytes = read_u64_row(&el, RETENTION_BYTES)?.unwrap_or(RETENTION_BYTES_DEFAULT);
            let keep_from = if log.bytes > max_bytes {
                size_keep_from(txn, table)?
            } else {
                None
            };
            let retention = read_u64_row(&el, RETENTION)?.unwrap_or(RETENTION_MS_DEFAULT);
            (retention, keep_from, log.bytes)
        }
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(io_err(e)),
    };
    let cutoff = Timestamp::from_parts(now_ms.saturating_sub(retention), 0);
    // Entries below this clock are due.
    let mut below = cutoff.max(keep_from.unwrap_or(Timestamp::ZERO));
    if let Some(pin) = pinned.filter(|_| bytes <= PIN_BYTES_MAX) {
        below = below.min(pin);
    }
    match txn.open_table(log_def(&change_table(table))) {
        Ok(chg) => Ok(chg
            .first()
            .map_err(io_err)?
            .is_some_and(|(k, _)| k.value() < below.0)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// [`ChangesStep::Trim`]: deletes the oldest entries' events that are older than the
/// retention before `now_ms`, at most [`CHANGES_TRIM_EVENTS_MAX`] events and
/// [`CHANGES_TRIM_BYTES_MAX`] bytes of them, and raises the floor to the last one deleted.
///
/// By whole log entries, never by rows: replicas group entries into rows as their apply
/// batches fell, which differs between them, while the entries and their events are the same
/// everywhere. So every replica deletes exactly the same events and sets the same floor. A row
/// left holding later entries is rewritten and keyed by its new first clock.
/// `pinned`: entries at or above this clock stay (a consumer group's position), unless the
/// shard holds more than [`PIN_BYTES_MAX`] (the pin lapses; logged).
pub(super) fn trim(
    x: &super::ops::Exec,
    table: &str,
    now_ms: u64,
    keep_from: Option<Timestamp>,
    pinned: Option<Timestamp>,
) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    let log = ChangeLog::load(&el)?;
    if !log.on {
        return Ok(());
    }
    let pinned = match pinned {
        Some(_) if log.bytes > PIN_BYTES_MAX => {
            tracing::warn!(
                table,
                bytes = log.bytes,
                "a consumer group's position no longer holds the change log back: the shard holds more than {PIN_BYTES_MAX} bytes of events"
            );
            None
        }
        p => p,
    };
    let retention = read_u64_row(&el, RETENTION)?.unwrap_or(RETENTION_MS_DEFAULT);
    let cutoff = Timestamp::from_parts(now_ms.saturating_sub(retention), 0);
    let mut chg = x
        .txn
        .open_table(log_def(&change_table(table)))
        .map_err(io_err)?;
    let mut gone: Vec<u64> = Vec::new();
    // Transactions whose part here goes: their index rows go too.
    let mut gone_txns: Vec<Bytes> = Vec::new();
    // A row of which only the first entries go: its key and what stays.
    let mut rewrite: Option<(u64, ChangeRow)> = None;
    let (mut events, mut bytes, mut last_id) = (0u64, 0usize, None);
    'rows: for r in chg.iter().map_err(io_err)? {
        let (k, v) = r.map_err(io_err)?;
        let row = ChangeRow::decode(v.value())?;
        // Events of the entries before `taken` (their heads' counts; `decode` checked they add
        // up to the row's events).
        let mut taken_events = 0usize;
        for (taken, head) in row.entries.iter().enumerate() {
            let n = head.events as usize;
            let entry_bytes: usize = row
                .events
                .get(taken_events..taken_events + n)
                .unwrap_or_default()
                .iter()
                .map(event_bytes)
                .sum();
            let full = events as usize + n > CHANGES_TRIM_EVENTS_MAX
                || bytes + entry_bytes > CHANGES_TRIM_BYTES_MAX;
            // Due: older than the retention, or below what the size allows (decided by the
            // proposer). The first due entry always goes (however big), so a trim progresses.
            let due = (head.clock < cutoff || keep_from.is_some_and(|k| head.clock < k))
                && pinned.is_none_or(|p| head.clock < p);
            if !due || (full && events > 0) {
                if taken > 0 {
                    let rest = ChangeRow {
                        entries: row.entries[taken..].to_vec(),
                        events: row.events.get(taken_events..).unwrap_or_default().to_vec(),
                    };
                    rewrite = Some((k.value(), rest));
                }
                break 'rows;
            }
            taken_events += n;
            events += n as u64;
            bytes += entry_bytes;
            if let RowKind::Commit { id, .. } = &head.kind {
                gone_txns.push(id.clone());
            }
            if n > 0 {
                last_id = Some(StreamId::of_event(head.clock, head.events - 1));
            }
        }
        gone.push(k.value());
    }
    for k in &gone {
        chg.remove(*k).map_err(io_err)?;
    }
    if let Some((old_key, rest)) = rewrite {
        chg.remove(old_key).map_err(io_err)?;
        if let Some(first) = rest.entries.first() {
            chg.insert(first.clock.0, &rest.encode()?[..])
                .map_err(io_err)?;
        }
    }
    if !gone_txns.is_empty() {
        let mut index = x
            .txn
            .open_table(table_def(&change_txn_table(table)))
            .map_err(io_err)?;
        for id in &gone_txns {
            index.remove(&id[..]).map_err(io_err)?;
        }
    }
    if events == 0 {
        return Ok(());
    }
    if let Some(id) = last_id {
        raise_floor(&mut el, id)?;
    }
    let emptied = chg.is_empty().map_err(io_err)?;
    update_clock(&mut el, |c| {
        c.events = c.events.saturating_sub(events);
        // An empty log holds nothing, whatever an older count said.
        c.bytes = if emptied {
            0
        } else {
            c.bytes.saturating_sub(bytes as u64)
        };
    })
}

/// Retention by size, from one snapshot: the clock of the first entry to keep so that the
/// events from it on fit the shard's bound (`None`: they all fit). Never past the newest
/// entry with events, which always stays. Reads only the entries that go (at most one trim's
/// worth, [`CHANGES_TRIM_EVENTS_MAX`]).
pub(super) fn size_keep_from(
    txn: &redb::ReadTransaction,
    table: &str,
) -> Result<Option<Timestamp>> {
    let (log, max_bytes) = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => (
            ChangeLog::load(&el)?,
            read_u64_row(&el, RETENTION_BYTES)?.unwrap_or(RETENTION_BYTES_DEFAULT),
        ),
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    if !log.on || log.bytes <= max_bytes {
        return Ok(None);
    }
    let chg = match txn.open_table(log_def(&change_table(table))) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let (mut held, mut seen, mut going) = (log.bytes, 0usize, 0usize);
    for r in chg.iter().map_err(io_err)? {
        let (_, v) = r.map_err(io_err)?;
        let row = ChangeRow::decode(v.value())?;
        let mut at = 0usize;
        for head in &row.entries {
            let n = head.events as usize;
            if held <= max_bytes || head.clock >= log.clock || seen >= CHANGES_TRIM_EVENTS_MAX {
                // Nothing before it: nothing to trim.
                return Ok((going > 0).then_some(head.clock));
            }
            going += 1;
            let entry_bytes: u64 = row
                .events
                .get(at..at + n)
                .unwrap_or_default()
                .iter()
                .map(|e| event_bytes(e) as u64)
                .sum();
            held = held.saturating_sub(entry_bytes);
            at += n;
            seen += n;
        }
    }
    Ok(None)
}

/// [`ChangesStep::Progress`]: closes the stream up to `ts` (no event is ever logged at or
/// below it from now on).
pub(super) fn progress(x: &super::ops::Exec, table: &str, ts: Timestamp) -> Result<()> {
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    let log = ChangeLog::load(&el)?;
    if !log.on || ts <= log.horizon() {
        return Ok(());
    }
    let closed = ChangeLog { closed: ts, ..log };
    el.insert(&reserved(CLOCK)[..], &closed.clock_row()[..])
        .map_err(io_err)?;
    Ok(())
}

/// The event a key-level mutation left on `key`, from what it wrote (as [`event_of`] reads it).
pub(super) fn event_written(key: &Bytes, written: super::mutation::Written, now_ms: u64) -> Event {
    let op = match written {
        super::mutation::Written::Put(v)
            if v.is_live(now_ms) && !v.header.tombstone && v.header.kind == ValueKind::String =>
        {
            ChangeOp::Set {
                value: v.data,
                expire_at_ms: v.header.expire_at_ms,
                prev: None,
            }
        }
        super::mutation::Written::Put(v) if v.is_live(now_ms) && !v.header.tombstone => {
            ChangeOp::Cmd {
                kind: v.header.kind as u8,
                args: Vec::new(),
                also: Vec::new(),
            }
        }
        _ => ChangeOp::Del { prev: None },
    };
    Event {
        key: key.clone(),
        op,
    }
}

/// The event `m` (`None`: a cross-shard transaction's commit) left on `key`, read back from
/// the table after it was applied.
pub(super) fn event_of(
    t: &RawTable<'_>,
    m: Option<&Mutation>,
    key: &Bytes,
    now_ms: u64,
) -> Result<Event> {
    let stored = match t.get(&key[..]).map_err(io_err)? {
        Some(raw) => Some(Value::decode(raw.value())?),
        None => None,
    };
    let expired_sweep = matches!(m, Some(Mutation::Exec { args, .. }) if args.first().is_some_and(|n| {
        n.eq_ignore_ascii_case(capdb_data::command::EXPIRED_COMMAND.as_bytes())
    }));
    let op = match stored.filter(|v| v.is_live(now_ms) && !v.header.tombstone) {
        None if expired_sweep => ChangeOp::Expire { prev: None },
        None => ChangeOp::Del { prev: None },
        Some(v) if v.header.kind == ValueKind::String => ChangeOp::Set {
            value: v.data,
            expire_at_ms: v.header.expire_at_ms,
            prev: None,
        },
        Some(v) => ChangeOp::Cmd {
            kind: v.header.kind as u8,
            args: match m {
                Some(Mutation::Exec { args, .. }) => args.clone(),
                // A collection changed by a key command (EXPIRE, PERSIST, RENAME's target), or
                // by a cross-shard transaction (its commit applies effects, not commands):
                // no arguments to give.
                _ => Vec::new(),
            },
            also: Vec::new(),
        },
    };
    Ok(Event {
        key: key.clone(),
        op,
    })
}

/// One log entry's events for [`append`].
pub(super) struct Logged {
    pub index: u64,
    /// The entry's timestamp (for a transaction's commit: at least its commit timestamp).
    pub ts: Timestamp,
    pub kind: RowKind,
    pub events: Vec<Event>,
}

/// Appends one row holding `entries` in the job of `x`, and advances the clock. A
/// cross-shard transaction's commit also gets its index row (`{shard}/chg-txn`: id -> clock),
/// by which a merged reader finds this part from another shard's.
pub(super) fn append(
    x: &super::ops::Exec,
    table: &str,
    log: &mut ChangeLog,
    entries: Vec<Logged>,
) -> Result<()> {
    let mut row = ChangeRow::default();
    let mut first = None;
    let mut txns: Vec<(Bytes, Timestamp)> = Vec::new();
    for Logged {
        index,
        ts,
        kind,
        events,
    } in entries
    {
        let commit = matches!(kind, RowKind::Commit { .. });
        if events.is_empty() && !commit {
            continue;
        }
        let clock = next_clock(log.horizon(), ts);
        if events.is_empty() {
            // A transaction's part that changed nothing here (its keys were only read): a
            // head without events, so that other shards' readers find where it stands. The
            // last event stays what it was.
            log.closed = clock;
        } else {
            log.clock = clock;
            log.events += events.len() as u64;
            log.last_events = events.len() as u64;
            log.bytes += events.iter().map(|e| event_bytes(e) as u64).sum::<u64>();
        }
        first.get_or_insert(clock);
        if let RowKind::Commit { id, .. } = &kind {
            txns.push((id.clone(), clock));
        }
        row.entries.push(EntryHead {
            index,
            clock,
            kind,
            events: u32::try_from(events.len())
                .map_err(|_| Error::InvalidInput("an entry of over 2^32 changes".into()))?,
        });
        row.events.extend(events);
    }
    let Some(first) = first else {
        return Ok(());
    };
    let mut chg = x
        .txn
        .open_table(log_def(&change_table(table)))
        .map_err(io_err)?;
    chg.insert(first.0, &row.encode()?[..]).map_err(io_err)?;
    if !txns.is_empty() {
        let mut index = x
            .txn
            .open_table(table_def(&change_txn_table(table)))
            .map_err(io_err)?;
        for (id, clock) in &txns {
            index
                .insert(&id[..], &clock.0.to_le_bytes()[..])
                .map_err(io_err)?;
        }
    }
    let mut el = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    el.insert(&reserved(CLOCK)[..], &log.clock_row()[..])
        .map_err(io_err)?;
    Ok(())
}

/// What a shard's change log holds, for `XLEN` and `CHANGES LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeInfo {
    pub on: bool,
    /// Events this replica holds.
    pub events: u64,
    /// The ID of the last event logged (`0-0` when none).
    pub last: StreamId,
    /// Every event logged after this snapshot gets a clock above this (design §3.2): the
    /// horizon, or just below the smallest vote of a transaction prepared here.
    pub closed: Timestamp,
    /// The last ID trimmed or never held (retention, a snapshot installed); `None`: the log
    /// holds everything since it was turned on.
    pub floor: Option<StreamId>,
}

/// Where a cross-shard transaction's part on one shard stands ([`txn_part`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnPartAt {
    /// Logged at this clock, with these events.
    Logged(Timestamp, Vec<Change>),
    /// Not logged yet: the transaction is still prepared here (its commit will come).
    Pending,
    /// Not held: trimmed, or never logged (the log was off, or the transaction unknown).
    /// Either way it lies at or below the floor of a replica that holds no such part.
    Gone,
}

/// The events with IDs in `from..=to`, ascending (descending when `rev`), at most `count`
/// (and [`CHANGES_READ_MAX`]), read from one snapshot (`txn`).
pub(super) fn read(
    txn: &redb::ReadTransaction,
    table: &str,
    from: StreamId,
    to: StreamId,
    count: usize,
    rev: bool,
) -> Result<Vec<Change>> {
    read_page(txn, table, from, to, count, rev, false).map(|(events, _)| events)
}

/// [`read`], also saying whether it stopped at a bound before the end of the range (`true`:
/// read on from after the last event). `whole`: never stop inside an entry (a bound reached
/// mid-entry takes the rest of its events), so that a merged reader knows every event up to
/// the last one's clock.
pub(super) fn read_page(
    txn: &redb::ReadTransaction,
    table: &str,
    from: StreamId,
    to: StreamId,
    count: usize,
    rev: bool,
    whole: bool,
) -> Result<(Vec<Change>, bool)> {
    let count = count.min(CHANGES_READ_MAX);
    let mut out = Vec::new();
    let mut more = false;
    if from > to || count == 0 {
        return Ok((out, from <= to));
    }
    let floor = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => read_floor(&el)?,
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(io_err(e)),
    };
    // A forward read continues from a position: reaching below what is held would skip
    // events, so it is an error. A reverse read asks for the newest ones, and a read from the
    // very start (`-`, `0`) for whatever is held: both begin at the floor.
    let from_start = from <= StreamId { ms: 0, seq: 1 };
    let from = match floor {
        Some(floor) if (rev || from_start) && from <= floor => floor.successor(),
        _ => from,
    };
    if from > to {
        return Ok((out, false));
    }
    if let Some(floor) = floor
        && from <= floor
    {
        let oldest = floor.successor();
        return Err(Error::Command(format!(
            "HISTORYLOST the shard's changes are held from {oldest} on (older ones went with the retention, or came before a snapshot this replica installed); read from {oldest}"
        )));
    }
    let mut bytes = 0usize;
    let chg = match txn.open_table(log_def(&change_table(table))) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((out, false)),
        Err(e) => return Err(io_err(e)),
    };
    // A row's key is its first event's clock; the row holding `from` may start before it.
    let lo = from.clock().0;
    let hi = to.clock().0;
    let start = chg
        .range(..=lo)
        .map_err(io_err)?
        .next_back()
        .transpose()
        .map_err(io_err)?
        .map_or(lo, |(k, _)| k.value());
    let mut take = |raw: &[u8], out: &mut Vec<Change>| -> Result<bool> {
        let row = ChangeRow::decode(raw)?;
        let mut events: Vec<Change> = row
            .events_with_ids()
            .into_iter()
            .filter(|(_, id, _)| *id >= from && *id <= to)
            .map(|(head, id, e)| change_of(head, id, e))
            .collect();
        if rev {
            events.reverse();
        }
        for e in events {
            let full = out.len() >= count || (bytes >= CHANGES_READ_BYTES_MAX && !out.is_empty());
            let same_entry = whole && out.last().is_some_and(|l: &Change| l.clock == e.clock);
            if full && !same_entry {
                more = true;
                return Ok(false);
            }
            bytes += event_bytes(&e.event);
            out.push(e);
        }
        Ok(true)
    };
    let rows = chg.range(start..=hi).map_err(io_err)?;
    if rev {
        for r in rows.rev() {
            let (_, v) = r.map_err(io_err)?;
            if !take(v.value(), &mut out)? {
                break;
            }
        }
    } else {
        for r in rows {
            let (_, v) = r.map_err(io_err)?;
            if !take(v.value(), &mut out)? {
                break;
            }
        }
    }
    Ok((out, more))
}

fn change_of(head: &EntryHead, id: StreamId, e: &Event) -> Change {
    Change {
        id,
        index: head.index,
        clock: head.clock,
        event: e.clone(),
        txn: match &head.kind {
            RowKind::Commit {
                id, participants, ..
            } => Some(TxnPart {
                id: id.clone(),
                groups: participants.clone(),
            }),
            _ => None,
        },
    }
}

/// Transaction `id`'s part in this shard's log, from one snapshot: its clock and events, or
/// why there are none. `prepared`: whether the transaction is prepared here (read from the
/// same snapshot by the caller).
pub(super) fn txn_part(
    txn: &redb::ReadTransaction,
    table: &str,
    id: &[u8],
    prepared: bool,
) -> Result<TxnPartAt> {
    let clock = match txn.open_table(table_def(&change_txn_table(table))) {
        Ok(index) => match index.get(id).map_err(io_err)? {
            Some(raw) => Some(Timestamp(u64::from_le_bytes(
                raw.value()
                    .try_into()
                    .map_err(|_| Error::Corruption("change-log transaction index row".into()))?,
            ))),
            None => None,
        },
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(io_err(e)),
    };
    let Some(clock) = clock else {
        return Ok(if prepared {
            TxnPartAt::Pending
        } else {
            TxnPartAt::Gone
        });
    };
    let from = StreamId::of_event(clock, 0);
    let to = StreamId::of_event(clock, u32::MAX);
    let mut events = Vec::new();
    loop {
        let start = events.last().map_or(from, |c: &Change| c.id.successor());
        // One entry's events: bounded by the transaction's own size.
        let page = read(txn, table, start, to, CHANGES_READ_MAX, false)?;
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    Ok(TxnPartAt::Logged(clock, events))
}

/// The bytes an event brings to a reply (key, value, arguments).
fn event_bytes(e: &Event) -> usize {
    e.key.len()
        + match &e.op {
            ChangeOp::Set { value, prev, .. } => value.len() + prev.as_ref().map_or(0, Bytes::len),
            ChangeOp::Del { prev } | ChangeOp::Expire { prev } | ChangeOp::Incr { prev, .. } => {
                prev.as_ref().map_or(0, Bytes::len)
            }
            ChangeOp::Ttl { .. } | ChangeOp::Evict | ChangeOp::Flush => 0,
            ChangeOp::Cmd { args, also, .. } => {
                args.iter().chain(also).map(Bytes::len).sum::<usize>()
            }
        }
}

/// Whether the log is on, its event count and last ID, from one snapshot.
pub(super) fn info(txn: &redb::ReadTransaction, table: &str) -> Result<ChangeInfo> {
    let log = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => ChangeLog::load(&el)?,
        Err(redb::TableError::TableDoesNotExist(_)) => ChangeLog::default(),
        Err(e) => return Err(io_err(e)),
    };
    // The last event ever logged, held or trimmed since: where `$` reads from.
    let last = match log.last_events.checked_sub(1) {
        Some(n) => StreamId::of_event(log.clock, u32::try_from(n).unwrap_or(u32::MAX)),
        None => StreamId::MIN,
    };
    // A prepared transaction's commit will be logged at or above its vote: closed below it.
    let open_vote = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => super::txn::min_open_vote(&el)?,
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(io_err(e)),
    };
    let closed = match open_vote {
        Some(v) => log.horizon().min(Timestamp(v.0.saturating_sub(1))),
        None => log.horizon(),
    };
    let floor = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => read_floor(&el)?,
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(io_err(e)),
    };
    Ok(ChangeInfo {
        on: log.on,
        events: log.events,
        last,
        closed,
        floor,
    })
}
