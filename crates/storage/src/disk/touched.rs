//! WATCH on a `cp` shard: the log index of each key's last change (the *touched* rows).
//!
//! Redis aborts EXEC when a watched key was modified in any way after WATCH: a write by anyone
//! (this client included), a SET of the same value, a delete then a re-create, expiry. A value
//! cannot tell that (a delete leaves no record), so applying a shard's log records, for every
//! key a write changed, the log index of that write. A watch is a log index *w* (an entry
//! proposed through the log at WATCH: everything linearized before WATCH is at or below it);
//! its guard, checked while applying the transaction's own entry, holds iff the key's last
//! change is at or below *w* and the key did not expire after WATCH ([`WatchGuard`]).
//!
//! The rows live in the shard's element table under the reserved id 0 (`0 ‖ "touched/" ‖ key`
//! -> u64 LE index), so they are replicated state: written by applying entries, identical on
//! every replica, carried by snapshots (which copy the element table) and cleared with it.
//!
//! # Only while someone watches
//!
//! Recording costs every write a few tree operations, so it is on only after a watch point:
//! the first one at index *p* turns it on and raises the horizon to *p* (changes before it
//! were not recorded; no watch older than *p* can still be judged). `0 ‖ "touched-on"` holds
//! the latest watch point's index while recording is on. It turns off again when the rows
//! reach their bound with no watch point since they were last dropped (below). All of this is
//! decided by applying the log, so every replica records the same rows.
//!
//! # Bound
//!
//! At most [`TOUCHED_MAX`] keys are remembered. When one more would be, every row is dropped
//! and the *horizon* (`0 ‖ "touched-horizon"`) becomes the current index: a watch older than
//! the horizon counts as changed (a conservative abort, which Redis's rule allows: a changed
//! key aborts, never the reverse). FLUSHDB and snapshot installs replace the element table; a
//! FLUSHDB sets the horizon to its own index ([`horizon_row`]), so every older watch aborts,
//! and turns recording off until the next watch point.

use bytes::Bytes;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Result, Value, ValueKind};
use redb::ReadableTable;

use super::io_err;

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// Keys whose last change a shard remembers at most (see the module doc).
pub const TOUCHED_MAX: u64 = 100_000;

const RESERVED: [u8; 8] = [0; 8];
const ROW_PREFIX: &[u8] = b"touched/";
const HORIZON: &[u8] = b"touched-horizon";
const COUNT: &[u8] = b"touched-count";
const ON: &[u8] = b"touched-on";

fn reserved(name: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(name);
    k
}

fn row(key: &[u8]) -> Vec<u8> {
    let mut k = reserved(ROW_PREFIX);
    k.extend_from_slice(key);
    k
}

/// A watched key's guard: no change to `key` after log index `index`, and no expiry after
/// `since_ms` (the WATCH's clock) up to `until_ms` (the transaction's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchGuard {
    pub key: Bytes,
    pub index: u64,
    pub since_ms: u64,
    pub until_ms: u64,
}

/// The element-table row that sets the horizon to `index` (every watch older than it aborts):
/// what a FLUSHDB at `index` leaves in the emptied element table.
pub fn horizon_row(index: u64) -> (Vec<u8>, Vec<u8>) {
    (reserved(HORIZON), index.to_le_bytes().to_vec())
}

fn read_u64(el: &RawTable<'_>, key: &[u8]) -> Result<Option<u64>> {
    Ok(el
        .get(key)
        .map_err(io_err)?
        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes)))
}

/// Whether recording is on, and since which watch point (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(super) struct Recording {
    /// The latest watch point's index while recording is on.
    on: Option<u64>,
    horizon: u64,
}

impl Recording {
    pub(super) fn load(el: &RawTable<'_>) -> Result<Recording> {
        Ok(Recording {
            on: read_u64(el, &reserved(ON))?,
            horizon: read_u64(el, &reserved(HORIZON))?.unwrap_or(0),
        })
    }

    pub(super) fn is_on(&self) -> bool {
        self.on.is_some()
    }
}

/// A watch point applied at `index`: recording is on from there (turning it on raises the
/// horizon to `index`).
pub(super) fn watch_point(el: &mut RawTable<'_>, rec: &mut Recording, index: u64) -> Result<()> {
    if rec.on.is_none() {
        let (k, v) = horizon_row(index);
        el.insert(&k[..], &v[..]).map_err(io_err)?;
        rec.horizon = index;
    }
    el.insert(&reserved(ON)[..], &index.to_le_bytes()[..])
        .map_err(io_err)?;
    rec.on = Some(index);
    Ok(())
}

/// Records that `keys` changed at log index `index` (nothing while recording is off).
pub(super) fn record(
    el: &mut RawTable<'_>,
    rec: &mut Recording,
    keys: &[Bytes],
    index: u64,
) -> Result<()> {
    record_at(el, rec, keys, index, index)
}

/// Records that `keys` changed at log index `at`, applied at `index` (>= `at`): a
/// cross-shard transaction's writes are applied by its commit, but the transaction took its
/// place in the shard's order at its prepare (it held the keys' locks from there, and its
/// replies were computed there), so a WATCH after the prepare does not see them as a change.
/// `index` is where the rows may be dropped (the horizon never moves back).
pub(super) fn record_at(
    el: &mut RawTable<'_>,
    rec: &mut Recording,
    keys: &[Bytes],
    at: u64,
    index: u64,
) -> Result<()> {
    debug_assert!(at <= index, "a change recorded after it was applied");
    for key in keys {
        let Some(last_watch) = rec.on else {
            return Ok(());
        };
        let row_key = row(key);
        let last = el
            .get(&row_key[..])
            .map_err(io_err)?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes));
        let known = last.is_some();
        if !known {
            let count = read_u64(el, &reserved(COUNT))?.unwrap_or(0);
            if count >= TOUCHED_MAX {
                forget_all(el, index)?;
                let horizon_before = rec.horizon;
                rec.horizon = index;
                if last_watch <= horizon_before {
                    // No watch point since the rows were last dropped: stop recording.
                    el.remove(&reserved(ON)[..]).map_err(io_err)?;
                    el.insert(&reserved(COUNT)[..], &0u64.to_le_bytes()[..])
                        .map_err(io_err)?;
                    rec.on = None;
                    return Ok(());
                }
                el.insert(&reserved(COUNT)[..], &1u64.to_le_bytes()[..])
                    .map_err(io_err)?;
            } else {
                el.insert(&reserved(COUNT)[..], &(count + 1).to_le_bytes()[..])
                    .map_err(io_err)?;
            }
        }
        // Never lowered (a key changed later than `at` stays changed then).
        let at = last.map_or(at, |l| l.max(at));
        el.insert(&row_key[..], &at.to_le_bytes()[..])
            .map_err(io_err)?;
    }
    Ok(())
}

/// Drops every row; watches older than `index` count as changed from now on.
fn forget_all(el: &mut RawTable<'_>, index: u64) -> Result<()> {
    let lo = reserved(ROW_PREFIX);
    let mut hi = reserved(ROW_PREFIX);
    if let Some(last) = hi.last_mut() {
        *last += 1;
    }
    let doomed: Vec<Vec<u8>> = el
        .range::<&[u8]>(&lo[..]..&hi[..])
        .map_err(io_err)?
        .map(|e| e.map(|(k, _)| k.value().to_vec()).map_err(io_err))
        .collect::<Result<_>>()?;
    for k in doomed {
        el.remove(&k[..]).map_err(io_err)?;
    }
    let (k, v) = horizon_row(index);
    el.insert(&k[..], &v[..]).map_err(io_err)?;
    Ok(())
}

/// Whether every guard holds: `top` is the shard's table, `el` its element table.
pub(super) fn guards_hold(
    top: &RawTable<'_>,
    el: &RawTable<'_>,
    rec: &Recording,
    guards: &[WatchGuard],
) -> Result<bool> {
    for g in guards {
        // Older than what the rows cover, or recording is off (then no watch point since the
        // horizon exists, and every guard comes from one): changed, as far as anyone knows.
        if g.index < rec.horizon || !rec.is_on() {
            return Ok(false);
        }
        if read_u64(el, &row(&g.key))?.is_some_and(|at| at > g.index) {
            return Ok(false);
        }
        // Expired after WATCH (and not yet removed by the active expiry, whose removal would
        // be a change): a change from its deadline on, as in Redis >= 6.0.9.
        if let Some(raw) = top.get(&g.key[..]).map_err(io_err)?
            && let Ok(v) = Value::decode(raw.value())
            && let Some(at) = v.header.expire_at_ms
            && at > g.since_ms
            && at <= g.until_ms
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A [`Space`] that notes every key a command changes (its record, or its elements), so the
/// state machine can record them as touched: as closely as it can to where Redis signals a
/// modified key, and otherwise more often, never less (an extra abort is allowed, a missed one
/// is not).
pub(super) struct Tracking<'s> {
    pub(super) inner: &'s mut dyn Space,
    pub(super) changed: &'s mut Vec<Bytes>,
}

impl Tracking<'_> {
    fn note(&mut self, key: &[u8]) {
        if self.changed.last().is_none_or(|k| k[..] != *key) {
            self.changed.push(Bytes::copy_from_slice(key));
        }
    }
}

impl Space for Tracking<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        self.inner.get(key)
    }
    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        self.note(key);
        self.inner.put(key, value)
    }
    fn remove(&mut self, key: &[u8]) -> Result<()> {
        // Removing nothing changes nothing (BITOP's empty result on a missing destination);
        // the active expiry's removals are noted by the caller (`capdb.expired`). Removing a
        // corrupt record is a change.
        if !matches!(self.inner.get(key), Ok(None)) {
            self.note(key);
        }
        self.inner.remove(key)
    }
    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        self.note(from);
        self.note(to);
        self.inner.rename(from, to)
    }
    fn new_id(&mut self) -> Result<u64> {
        self.inner.new_id()
    }
    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        self.inner.el_get(c, sub)
    }
    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.note(&c.key);
        self.inner.el_put(c, sub, value)
    }
    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        self.note(&c.key);
        self.inner.el_remove(c, sub)
    }
    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        self.inner.el_range(c, range)
    }
    fn creating(&mut self, key: &[u8], kind: ValueKind) -> Result<()> {
        self.inner.creating(key, kind)
    }
    fn el_insert(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<bool> {
        // A new element changes the key; a rewritten one does when the command then stores
        // the collection's record, which is when Redis signals it (SADD of a present member
        // changes nothing; HSET, LSET store the record).
        let new = self.inner.el_insert(c, sub, value)?;
        if new {
            self.note(&c.key);
        }
        Ok(new)
    }
    fn el_values(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<Bytes>> {
        self.inner.el_values(c, range)
    }
    fn el_delete(&mut self, c: &Coll, sub: &[u8]) -> Result<bool> {
        let was = self.inner.el_delete(c, sub)?;
        if was {
            self.note(&c.key);
        }
        Ok(was)
    }
}
