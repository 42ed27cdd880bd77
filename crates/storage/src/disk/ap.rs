//! `ap` tables in the split form: a key's *head* record in the keyspace table, and one record
//! per collection element in its element table.
//!
//! # Why split
//!
//! An `ap` key's state is a CRDT ([`capdb_types::composite`]). Stored as one record, every
//! HSET re-stored the whole collection on every replica, and a collection was bounded by the
//! value limit. Here the key's record is its head (the base version, every kind's registers,
//! and lists whole: a list is one register) and each hash field, set member and sorted-set
//! score record is its own record under [`crate::layout::ap_element_key`] (the key's elements
//! are contiguous). A write of k elements merges k element records and the small head: O(k)
//! bytes stored, whatever the collection's size; each element alone is bounded by the value
//! limit. The merge stays the composite's (property-tested in `capdb-types`: merging heads
//! and element records in any order, then assembling, equals merging whole states).
//!
//! # What stays exact, and what costs what
//!
//! - **Reads** ([`DiskTable::ap_get`]) assemble the head and all the key's elements: O(size).
//!   A command that names its elements reads only those of a big collection, with the head
//!   and the first visible element ([`DiskTable::ap_get_part`]): O(k).
//! - **Visibility** without reading a collection (SCAN, DBSIZE, tombstone collection, type
//!   conflicts): the head plus the first *visible* element of each kind ([`lite`]); only when
//!   two types are candidates (a type conflict) is the key assembled whole, so the answer is
//!   always the whole state's. Finding the first visible element skips removed ones (HDEL
//!   tombstones until they are collected, elements hidden by a delete until reclaimed): a read
//!   cost, outside the writer. Merges look only when two types could show at all
//!   ([`may_conflict`]: one probe per kind), so a write to a collection of one kind never walks
//!   its removed elements.
//! - **Deletes** (DEL, SET over a collection, expiry) write the head only: its base hides
//!   older elements at once (they are pruned on read and never stored again). The key is then
//!   queued ([`crate::layout::ap_reclaim_row`]) and [`DiskTable::ap_reclaim_step`] removes its
//!   hidden elements in steps of at most [`AP_RECLAIM_STEP_MAX`], so a big collection's delete
//!   never stalls the writer. A head tombstone is only collected once no element of its key is
//!   left (else older elements would show again).
//! - Element records arriving already hidden by the head's delete are not stored.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_types::composite::{Composite, Conflicts, Element, Entry, expired_before, is_composite};
use capdb_types::{Result, Timestamp, Value};
use redb::{ReadableTable, TableError};
use serde::{Deserialize, Serialize};

use super::ops::{Exec, Output};
use super::{DiskTable, io_err, table_def};
use crate::layout::{
    AP_RESERVED, ap_element_key, ap_element_parse, ap_element_prefix, ap_reclaim_row, element_table,
};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// Element records one reclaim step examines at most.
pub const AP_RECLAIM_STEP_MAX: usize = 4_096;

const LIST: u8 = capdb_types::ValueKind::List as u8;

/// The non-list kinds, whose elements are records of their own.
const ELEMENT_KINDS: [u8; 3] = [
    capdb_types::ValueKind::Hash as u8,
    capdb_types::ValueKind::Set as u8,
    capdb_types::ValueKind::ZSet as u8,
];

/// What is queued for a key whose elements must go (the value of its reclaim row).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReclaimJob {
    /// The element record the next step starts after.
    after: Option<Vec<u8>>,
    /// `None`: drop what the head's delete hides. `Some(h)`: the collection expired before
    /// horizon `h` (tombstone collection): its elements older than `h` go, then the head.
    expired_before: Option<Timestamp>,
}

/// The end (exclusive) of the range of records starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    // Only a prefix of 0xFF bytes: bounded by the reserved rows, which sort after every key.
    AP_RESERVED.to_vec()
}

fn decode_element(raw: &[u8]) -> Option<Entry> {
    Value::decode(raw)
        .ok()
        .and_then(|v| Entry::of_record(&v).ok())
}

/// The head's composite form (a missing or corrupt head is empty: what arrives replaces it).
fn head_of(v: Option<&Value>) -> Composite {
    v.and_then(|v| Composite::of(v).ok()).unwrap_or_default()
}

/// The elements of `key` (of `kind`, or every kind), in order, as (record key, kind, subkey,
/// entry); corrupt records are skipped.
fn elements_of<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
    kind: Option<u8>,
    mut f: impl FnMut(&[u8], u8, &[u8], Entry) -> bool,
) -> Result<()> {
    let mut prefix = ap_element_prefix(key);
    if let Some(k) = kind {
        prefix.push(k);
    }
    let end = prefix_end(&prefix);
    for item in el.range::<&[u8]>(&prefix[..]..&end[..]).map_err(io_err)? {
        let (k, v) = item.map_err(io_err)?;
        let Some((_, kind, sub)) = ap_element_parse(k.value()) else {
            continue;
        };
        let Some(e) = decode_element(v.value()) else {
            continue;
        };
        if !f(k.value(), kind, sub, e) {
            break;
        }
    }
    Ok(())
}

fn has_elements<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
) -> Result<bool> {
    has_records(el, key, None)
}

/// Whether `key` has any element record (of `kind`, or of any kind): one probe.
fn has_records<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
    kind: Option<u8>,
) -> Result<bool> {
    let mut prefix = ap_element_prefix(key);
    prefix.extend(kind);
    let end = prefix_end(&prefix);
    Ok(el
        .range::<&[u8]>(&prefix[..]..&end[..])
        .map_err(io_err)?
        .next()
        .is_some())
}

/// The whole state of `key`: its head and every element.
fn assemble<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
    head: &Composite,
) -> Result<Composite> {
    let mut state = head.clone();
    let mut elements: Vec<Element> = Vec::new();
    elements_of(el, key, None, |_, kind, sub, e| {
        elements.push((kind, Bytes::copy_from_slice(sub), e));
        true
    })?;
    state.assemble(elements);
    Ok(state)
}

/// The head with the first visible element of each kind: what the whole state shows a client
/// (see the module docs), without reading the whole collection.
pub(super) fn lite<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
    head: &Composite,
) -> Result<Composite> {
    let mut state = head.clone();
    if !has_elements(el, key)? {
        return Ok(state);
    }
    let reset = head.reset();
    let mut found: Vec<Element> = Vec::new();
    for kind in ELEMENT_KINDS {
        elements_of(el, key, Some(kind), |_, kind, sub, mut e| {
            if e.prune(reset) && e.visible(kind) {
                found.push((kind, Bytes::copy_from_slice(sub), e));
                return false;
            }
            true
        })?;
    }
    state.assemble(found);
    if state.candidates() >= 2 {
        // Which type shows depends on every element's version: read them all.
        return assemble(el, key, head);
    }
    Ok(state)
}

/// What [`DiskTable::ap_get_part`] answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApPart {
    /// The stored version: whole, or the head with the elements asked for and the witness.
    pub value: Option<Value>,
    /// Whether `value` is the whole state.
    pub whole: bool,
    /// The collection's witness, if it shows any element: the least of the subkeys asked for
    /// that is visible here, else the first visible element in subkey order. Replicas holding
    /// the same elements name the same witness (the coordinator relies on it).
    pub witness: Option<Bytes>,
}

/// Whether a head is one a partial read may stand for: it holds a big collection of `kind`
/// and nothing that could compete with it for what the key shows (a live plain version,
/// another kind), so that its visibility needs only one visible element and its encoding is
/// settled (see [`DiskTable::ap_get_part`]). Lists are one register, always read whole.
pub fn partial_fits(head: &Composite, kind: u8) -> bool {
    kind != LIST
        && head.base().is_none_or(|b| b.header.tombstone)
        && head.colls.len() == 1
        && head.colls.get(&kind).is_some_and(|c| c.is_big())
}

/// The witness of a (pruned) state that its collection of `kind` is not empty, as
/// [`ApPart::witness`] defines it, from the elements the state holds.
fn witness_of(state: &Composite, kind: u8, subs: &[Bytes]) -> Option<Bytes> {
    if kind == LIST {
        return None;
    }
    let c = state.colls.get(&kind)?;
    let visible = |sub: &Bytes| c.entries.get(sub).is_some_and(|e| e.visible(kind));
    if let Some(named) = subs.iter().filter(|s| visible(s)).min() {
        return Some(named.clone());
    }
    c.entries
        .iter()
        .find(|(_, e)| e.visible(kind))
        .map(|(sub, _)| sub.clone())
}

/// Removed (or hidden) elements a partial read examines at most to find a visible one (see
/// [`DiskTable::ap_get_part`]); past it, the collection is read whole.
pub const AP_WITNESS_SCAN_MAX: usize = 4_096;

fn read_head<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
) -> Result<Option<Value>> {
    Ok(match t.get(key).map_err(io_err)? {
        Some(raw) => Value::decode(raw.value()).ok(),
        None => None,
    })
}

/// Whether merging `delta` into `key` could leave two types visible (a type conflict): an
/// upper bound on the candidates after the merge (a live base on either side, each kind with
/// element records stored or arriving, a list on either side), one probe per kind.
fn may_conflict<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
    key: &[u8],
    head: &Composite,
    delta: &Composite,
) -> Result<bool> {
    let live_base = |c: &Composite| c.base().is_some_and(|b| !b.header.tombstone);
    let list = |c: &Composite| c.colls.get(&LIST).is_some_and(|l| l.tail > l.head);
    let mut n =
        usize::from(live_base(head) || live_base(delta)) + usize::from(list(head) || list(delta));
    for kind in ELEMENT_KINDS {
        let arriving = delta
            .colls
            .get(&kind)
            .is_some_and(|c| !c.entries.is_empty());
        let mut stored = false;
        if !arriving {
            elements_of(el, key, Some(kind), |_, _, _, _| {
                stored = true;
                false
            })?;
        }
        n += usize::from(arriving || stored);
    }
    Ok(n >= 2)
}

/// Queues `key` for reclaiming what its delete hides (if it has elements).
fn queue_reclaim(el: &mut RawTable<'_>, key: &[u8], job: &ReclaimJob) -> Result<()> {
    let row = ap_reclaim_row(key);
    if el.get(&row[..]).map_err(io_err)?.is_some() && job.expired_before.is_none() {
        // A job already queued prunes by the head's reset at each step: nothing to add.
        return Ok(());
    }
    let bytes = postcard::to_stdvec(job)
        .map_err(|e| capdb_types::Error::Io(format!("cannot encode a reclaim job: {e}")))?;
    el.insert(&row[..], &bytes[..]).map_err(io_err)?;
    Ok(())
}

/// What merging a batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct MergeOutcome {
    /// Records (heads and elements) that changed.
    pub changed: u64,
    /// Bytes written to storage (encoded records inserted).
    pub stored_bytes: u64,
    /// What the reconciliation report counts.
    pub conflicts: Conflicts,
}

/// [`super::ops::Op::Merge`] on an `ap` table: each incoming version (a plain version or a
/// composite delta) merges into the key's head and its element records.
pub(super) fn merge(x: &Exec, table: &str, entries: &[(Bytes, Value)]) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    let mut out = MergeOutcome::default();
    // Each key with the count of changed records before it: its merge changed the state when
    // the count moved (for this replica's change log).
    let mut marks: Vec<(&Bytes, u64, Timestamp)> = Vec::with_capacity(entries.len());
    for (key, incoming) in entries {
        x.hlc.observe(incoming.header.timestamp);
        marks.push((key, out.changed, incoming.header.timestamp));
        let current = read_head(&t, key)?;
        if !is_composite(incoming) && current.as_ref().is_none_or(|c| !is_composite(c)) {
            // Plain versions (SET, DEL, counters): merged as they are.
            let merged = match &current {
                Some(c) => capdb_types::merge::merge(c, incoming),
                None => incoming.clone(),
            };
            if current.as_ref() != Some(&merged) {
                let bytes = merged.encode();
                t.insert(&key[..], &bytes[..]).map_err(io_err)?;
                out.changed += 1;
                out.stored_bytes += bytes.len() as u64;
            }
            let old_reset = current
                .as_ref()
                .map(capdb_types::merge::reset_timestamp)
                .unwrap_or(Timestamp::ZERO);
            // Elements can outlive a collection's registers (written after a delete that
            // hid the registers); a later delete must reclaim them too.
            if capdb_types::merge::reset_timestamp(&merged) > old_reset && has_elements(&el, key)? {
                queue_reclaim(
                    &mut el,
                    key,
                    &ReclaimJob {
                        after: None,
                        expired_before: None,
                    },
                )?;
            }
            continue;
        }
        let Ok(delta) = Composite::of(incoming) else {
            x.stats.corruptions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                table,
                "an incoming ap collection version does not decode; skipped"
            );
            continue;
        };
        let mut head = head_of(current.as_ref());
        let old_reset = head.reset();
        // Only incoming collections are examined for type conflicts (as before the split),
        // and only when two types could show after the merge: the common case (elements of
        // one kind) costs a few probes, never a walk over removed elements.
        let counted = is_composite(incoming) && may_conflict(&el, key, &head, &delta)?;
        let before = if counted {
            lite(&el, key, &head)?.candidates()
        } else {
            0
        };
        let other = if counted { delta.candidates() } else { 0 };
        let (delta_head, delta_elements) = delta.split();
        let c = head.join_head(&delta_head);
        out.conflicts.list_versions_lost += c.list_versions_lost;
        if !head.is_empty() {
            let merged = head.to_value();
            if current.as_ref() != Some(&merged) {
                let bytes = merged.encode();
                t.insert(&key[..], &bytes[..]).map_err(io_err)?;
                out.changed += 1;
                out.stored_bytes += bytes.len() as u64;
            }
        }
        let reset = head.reset();
        for (kind, sub, e) in delta_elements {
            let ek = ap_element_key(key, kind, &sub);
            let stored = match el.get(&ek[..]).map_err(io_err)? {
                Some(raw) => decode_element(raw.value()),
                None => None,
            };
            let mut merged = stored.clone().unwrap_or_default();
            merged.join(&e);
            if !merged.prune(reset) {
                // Hidden by the key's delete: nothing to keep.
                if stored.is_some() {
                    el.remove(&ek[..]).map_err(io_err)?;
                    out.changed += 1;
                }
                continue;
            }
            if stored.as_ref() != Some(&merged) {
                let bytes = merged.to_record(kind).encode();
                el.insert(&ek[..], &bytes[..]).map_err(io_err)?;
                out.changed += 1;
                out.stored_bytes += bytes.len() as u64;
            }
        }
        if reset > old_reset && has_elements(&el, key)? {
            queue_reclaim(
                &mut el,
                key,
                &ReclaimJob {
                    after: None,
                    expired_before: None,
                },
            )?;
        }
        if counted {
            let after = lite(&el, key, &head)?.candidates();
            if after >= 2 && before < 2 && other < 2 {
                out.conflicts.type_conflicts += 1;
            }
        }
    }
    let mut log = super::changes::ChangeLog::load(&el)?;
    if log.is_on() {
        let ends = marks
            .iter()
            .skip(1)
            .map(|(_, m, _)| *m)
            .chain([out.changed]);
        let changed: Vec<(&Bytes, Timestamp)> = marks
            .iter()
            .zip(ends)
            .filter(|((_, before, _), after)| after > before)
            .map(|((key, _, ts), _)| (*key, *ts))
            .collect();
        if !changed.is_empty() {
            let now_ms = capdb_types::unix_now_ms();
            let mut seen = std::collections::HashSet::new();
            let mut events = Vec::with_capacity(changed.len());
            for (key, _) in &changed {
                if seen.insert(*key) {
                    events.push(state_event(&t, &el, key, now_ms)?);
                }
            }
            // This replica's clock now at least: an old version arriving late (a hint,
            // anti-entropy) is logged now, not where the retention would trim it at once.
            let ts = changed
                .iter()
                .map(|(_, ts)| *ts)
                .max()
                .unwrap_or(Timestamp::ZERO)
                .max(x.hlc.now());
            drop((t, el));
            let logged = super::changes::Logged {
                index: 0,
                ts,
                kind: capdb_types::changes::RowKind::Plain,
                events,
            };
            super::changes::append(x, table, &mut log, vec![logged])?;
        }
    }
    Ok(Output::Merged(out))
}

/// The event a merge or a counter change left on `key` of an `ap` table: what a read shows
/// now (a string or a counter's total, gone, or a collection of some type).
fn state_event<T, E>(t: &T, el: &E, key: &Bytes, now_ms: u64) -> Result<capdb_types::changes::Event>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
    E: ReadableTable<&'static [u8], &'static [u8]>,
{
    use capdb_types::changes::ChangeOp;
    let head = read_head(t, key)?;
    let op = match lite(el, key, &head_of(head.as_ref()))?.visible(now_ms) {
        capdb_types::composite::Visible::Coll(kind) => ChangeOp::Cmd {
            kind: kind as u8,
            args: Vec::new(),
            also: Vec::new(),
        },
        capdb_types::composite::Visible::Base(v) => match capdb_types::merge::render(v) {
            Ok(v) if !v.header.tombstone && v.is_live(now_ms) => ChangeOp::Set {
                value: v.data,
                expire_at_ms: v.header.expire_at_ms,
                prev: None,
            },
            _ => ChangeOp::Del { prev: None },
        },
        capdb_types::composite::Visible::Absent => ChangeOp::Del { prev: None },
    };
    Ok(capdb_types::changes::Event {
        key: key.clone(),
        op,
    })
}

/// [`super::ops::Op::CounterAdd`] on an `ap` table: a key that holds (or held) a collection
/// is assembled whole (an INCR there is a WRONGTYPE, or counts over an expired collection),
/// and only the new head is stored and answered (a delta the other replicas merge).
pub(super) fn counter_add(
    x: &Exec,
    table: &str,
    key: &[u8],
    node: u64,
    delta: i64,
    timestamp: Timestamp,
    now_ms: u64,
) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    let current = match t.get(key).map_err(io_err)? {
        Some(raw) => match Value::decode(raw.value()) {
            Ok(v) => Some(v),
            // Fails this job alone, not the whole batch.
            Err(e) => return Ok(Output::Failed(e)),
        },
        None => None,
    };
    let elements = has_elements(&el, key)?;
    let state = if elements || current.as_ref().is_some_and(is_composite) {
        let head = head_of(current.as_ref());
        if let capdb_types::composite::Visible::Coll(_) = lite(&el, key, &head)?.visible(now_ms) {
            return Ok(Output::Failed(capdb_types::Error::WrongType));
        }
        Some(assemble(&el, key, &head)?.to_value())
    } else {
        current.clone()
    };
    let old_reset = head_of(current.as_ref()).reset();
    match capdb_types::merge::counter_add(state.as_ref(), node, delta, timestamp, now_ms) {
        Ok(v) => {
            let (head, _) = head_of(Some(&v)).split();
            let stored = head.to_value();
            t.insert(key, &stored.encode()[..]).map_err(io_err)?;
            if elements && head.reset() > old_reset {
                queue_reclaim(
                    &mut el,
                    key,
                    &ReclaimJob {
                        after: None,
                        expired_before: None,
                    },
                )?;
            }
            let mut log = super::changes::ChangeLog::load(&el)?;
            if log.is_on() {
                let event = state_event(&t, &el, &Bytes::copy_from_slice(key), now_ms)?;
                drop((t, el));
                let logged = super::changes::Logged {
                    index: 0,
                    ts: timestamp.max(x.hlc.now()),
                    kind: capdb_types::changes::RowKind::Plain,
                    events: vec![event],
                };
                super::changes::append(x, table, &mut log, vec![logged])?;
            }
            Ok(Output::Value(stored))
        }
        Err(e) => Ok(Output::Failed(e)),
    }
}

/// [`super::ops::Op::PurgeTombstones`] on an `ap` table: `heads` are tombstones (with their
/// timestamp) or expired collections (with the horizon); `elements` are element removals
/// (record key, horizon). Returns how many records went or were queued to go.
pub(super) fn purge(
    x: &Exec,
    table: &str,
    heads: &[(Bytes, Timestamp)],
    elements: &[(Bytes, Timestamp)],
) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    let mut removed = 0;
    for (key, ts) in heads {
        let Some(stored) = read_head(&t, key)? else {
            continue;
        };
        let head = head_of(Some(&stored));
        let shown = lite(&el, key, &head)?.to_value();
        if shown.header.tombstone && shown.header.timestamp == *ts {
            if has_elements(&el, key)? {
                // Older elements would show again without the delete: reclaim them first (a
                // later pass collects the tombstone).
                queue_reclaim(
                    &mut el,
                    key,
                    &ReclaimJob {
                        after: None,
                        expired_before: None,
                    },
                )?;
                continue;
            }
            t.remove(&key[..]).map_err(io_err)?;
            removed += 1;
        } else if expired_before(&shown, *ts) {
            // Expired before the horizon: its elements go in steps, then the head.
            queue_reclaim(
                &mut el,
                key,
                &ReclaimJob {
                    after: None,
                    expired_before: Some(*ts),
                },
            )?;
            removed += 1;
        } else {
            // A head stored whole, with its elements (by a build before the split form: it
            // merges and reads the same): its removals older than the horizon go.
            let mut head = head;
            if head.collect_removed(*ts) {
                t.insert(&key[..], &head.to_value().encode()[..])
                    .map_err(io_err)?;
                removed += 1;
            }
        }
    }
    for (ek, horizon) in elements {
        let Some((_, kind, _)) = ap_element_parse(ek) else {
            continue;
        };
        let gone = match el.get(&ek[..]).map_err(io_err)? {
            Some(raw) => {
                decode_element(raw.value()).is_some_and(|e| e.removed(kind) && e.top() < *horizon)
            }
            None => false,
        };
        if gone {
            el.remove(&ek[..]).map_err(io_err)?;
            removed += 1;
        }
    }
    Ok(Output::Count(removed))
}

/// [`super::ops::Op::Reclaim`] on an `ap` table: one bounded step of the reclaim queue.
pub(super) fn reclaim_step(x: &Exec, table: &str) -> Result<Output> {
    let mut t = x.txn.open_table(table_def(table)).map_err(io_err)?;
    let mut el = x
        .txn
        .open_table(table_def(&element_table(table)))
        .map_err(io_err)?;
    let first = {
        let mut range = el.range::<&[u8]>(&AP_RESERVED[..]..).map_err(io_err)?;
        match range.next() {
            Some(item) => {
                let (k, v) = item.map_err(io_err)?;
                Some((k.value().to_vec(), v.value().to_vec()))
            }
            None => None,
        }
    };
    let Some((row, job)) = first else {
        return Ok(Output::Count(0));
    };
    let key = row[AP_RESERVED.len()..].to_vec();
    let Ok(mut job) = postcard::from_bytes::<ReclaimJob>(&job) else {
        el.remove(&row[..]).map_err(io_err)?;
        return Ok(Output::Count(0));
    };
    let head = head_of(read_head(&t, &key)?.as_ref());
    let reset = head.reset();
    // The step's work, decided on a snapshot of the range, then applied.
    let mut examined = 0usize;
    let mut last = None;
    let mut deletes = Vec::new();
    let mut rewrites = Vec::new();
    {
        let prefix = ap_element_prefix(&key);
        let end = prefix_end(&prefix);
        let start = match &job.after {
            Some(a) => std::ops::Bound::Excluded(&a[..]),
            None => std::ops::Bound::Included(&prefix[..]),
        };
        for item in el
            .range::<&[u8]>((start, std::ops::Bound::Excluded(&end[..])))
            .map_err(io_err)?
        {
            let (k, v) = item.map_err(io_err)?;
            examined += 1;
            let rk = k.value().to_vec();
            let kind = ap_element_parse(&rk).map(|(_, kind, _)| kind).unwrap_or(0);
            match decode_element(v.value()) {
                // Corrupt: nothing can read it.
                None => deletes.push(rk.clone()),
                Some(e) => match job.expired_before {
                    Some(h) if e.top() < h => deletes.push(rk.clone()),
                    Some(_) => {}
                    None => {
                        let mut pruned = e.clone();
                        if !pruned.prune(reset) {
                            deletes.push(rk.clone());
                        } else if pruned != e {
                            rewrites.push((rk.clone(), pruned.to_record(kind).encode()));
                        }
                    }
                },
            }
            last = Some(rk);
            if examined >= AP_RECLAIM_STEP_MAX {
                break;
            }
        }
    }
    let n = deletes.len() as u64;
    for k in &deletes {
        el.remove(&k[..]).map_err(io_err)?;
    }
    for (k, v) in &rewrites {
        el.insert(&k[..], &v[..]).map_err(io_err)?;
    }
    if examined >= AP_RECLAIM_STEP_MAX {
        job.after = last;
        let bytes = postcard::to_stdvec(&job)
            .map_err(|e| capdb_types::Error::Io(format!("cannot encode a reclaim job: {e}")))?;
        el.insert(&row[..], &bytes[..]).map_err(io_err)?;
        return Ok(Output::Count(n.max(1)));
    }
    el.remove(&row[..]).map_err(io_err)?;
    if let Some(h) = job.expired_before
        && !has_elements(&el, &key)?
        && read_head(&t, &key)?.is_some_and(|v| {
            expired_before(
                &lite(&el, &key, &head_of(Some(&v)))
                    .map(|c| c.to_value())
                    .unwrap_or(v),
                h,
            )
        })
    {
        t.remove(&key[..]).map_err(io_err)?;
    }
    // A finished queue row counts as work: the caller steps again until nothing is left.
    Ok(Output::Count(n + 1))
}

/// A record of an `ap` table as anti-entropy compares it: heads and elements, each with an id
/// (`0 ‖ key` for a head, `1 ‖ element record key`) and the user key it belongs to.
pub struct ApRecord<'a> {
    pub key: &'a [u8],
    pub id: Vec<u8>,
    pub value: Value,
}

/// `ap` replica reads in the split form.
impl DiskTable {
    fn ap_read<T>(
        &self,
        f: impl FnOnce(
            Option<&redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
            Option<&redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
        ) -> Result<T>,
    ) -> Result<T> {
        let txn = self.begin_read()?;
        let open = |name: &str| match txn.open_table(table_def(name)) {
            Ok(t) => Ok(Some(t)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        };
        let t = open(&self.table)?;
        let el = open(&element_table(&self.table))?;
        f(t.as_ref(), el.as_ref())
    }

    /// The whole stored state of `key` (head and every element, tombstones included), as one
    /// version; `None` when nothing is stored.
    pub fn ap_get(&self, key: &[u8]) -> Result<Option<Value>> {
        self.ap_read(|t, el| {
            let head = match t {
                Some(t) => read_head(t, key)?,
                None => None,
            };
            let Some(el) = el.filter(|el| has_elements(*el, key).unwrap_or(false)) else {
                return Ok(head);
            };
            let state = assemble(el, key, &head_of(head.as_ref()))?;
            Ok(Some(state.to_value()))
        })
    }

    /// What a command naming only `subs` of `key`'s collection of `kind` needs to read (see
    /// `capdb_data::point`): when the key holds a *big* collection of that kind and nothing
    /// else (no live plain version, no other kind's registers or element records), its head,
    /// the element records at `subs` (tombstones included) and a *witness* that the collection
    /// is not empty ([`ApPart::witness`]): O(|subs|) rather than O(size). Otherwise (a small
    /// collection, anything else, nothing) the whole state, as [`DiskTable::ap_get`] reads it;
    /// also when finding a witness would examine more than [`AP_WITNESS_SCAN_MAX`] removed
    /// elements.
    pub fn ap_get_part(&self, key: &[u8], kind: u8, subs: &[Bytes]) -> Result<ApPart> {
        self.ap_read(|t, el| {
            let head = match t {
                Some(t) => read_head(t, key)?,
                None => None,
            };
            let Some(el) = el.filter(|el| has_elements(*el, key).unwrap_or(false)) else {
                let witness = head
                    .as_ref()
                    .and_then(|h| witness_of(&head_of(Some(h)), kind, subs));
                return Ok(ApPart {
                    value: head,
                    whole: true,
                    witness,
                });
            };
            let h = head_of(head.as_ref());
            let whole = |h: &Composite| -> Result<ApPart> {
                let state = assemble(el, key, h)?;
                let witness = witness_of(&state, kind, subs);
                Ok(ApPart {
                    value: Some(state.to_value()),
                    whole: true,
                    witness,
                })
            };
            // Element records of another kind can outlive that kind's registers (a field
            // written after a delete it did not see): they may compete for what the key shows.
            let mut other_kind = false;
            for k in ELEMENT_KINDS.into_iter().filter(|k| *k != kind) {
                other_kind |= has_records(el, key, Some(k))?;
            }
            if other_kind || !partial_fits(&h, kind) {
                return whole(&h);
            }
            let reset = h.reset();
            let mut found: Vec<Element> = Vec::with_capacity(subs.len() + 1);
            for sub in subs {
                let record = el
                    .get(&ap_element_key(key, kind, sub)[..])
                    .map_err(io_err)?;
                if let Some(e) = record.and_then(|raw| decode_element(raw.value())) {
                    found.push((kind, sub.clone(), e));
                }
            }
            let mut state = h.clone();
            state.assemble(found);
            let mut witness = witness_of(&state, kind, subs);
            if witness.is_none() {
                // No named element is visible here: the first visible one in order.
                // Every record counts toward the bound, corrupt ones (skipped) included.
                let mut examined = 0;
                let mut first: Option<Element> = None;
                let mut prefix = ap_element_prefix(key);
                prefix.push(kind);
                let end = prefix_end(&prefix);
                for item in el.range::<&[u8]>(&prefix[..]..&end[..]).map_err(io_err)? {
                    examined += 1;
                    if examined > AP_WITNESS_SCAN_MAX {
                        break;
                    }
                    let (k, v) = item.map_err(io_err)?;
                    let (Some((_, _, sub)), Some(mut e)) =
                        (ap_element_parse(k.value()), decode_element(v.value()))
                    else {
                        continue;
                    };
                    if e.prune(reset) && e.visible(kind) {
                        first = Some((kind, Bytes::copy_from_slice(sub), e));
                        break;
                    }
                }
                match first {
                    Some(e) => {
                        witness = Some(e.1.clone());
                        state.assemble([e]);
                    }
                    None if examined > AP_WITNESS_SCAN_MAX => return whole(&h),
                    None => {}
                }
            }
            Ok(ApPart {
                value: Some(state.to_value()),
                whole: false,
                witness,
            })
        })
    }

    /// Calls `f` on every key after `after` with what it shows (its head with the first
    /// visible element of each kind: the header is the whole state's), until `f` returns
    /// false. Element records are never keys.
    pub fn ap_for_each_key(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], Value) -> bool,
    ) -> Result<()> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.ap_read(|t, el| {
            let Some(t) = t else { return Ok(()) };
            for item in t
                .range::<&[u8]>((lower, Bound::Unbounded))
                .map_err(io_err)?
            {
                let (k, v) = item.map_err(io_err)?;
                let Ok(value) = Value::decode(v.value()) else {
                    self.engine
                        .stats
                        .corruptions
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let shown = match el {
                    Some(el) if is_composite(&value) || has_elements(el, k.value())? => {
                        lite(el, k.value(), &head_of(Some(&value)))?.to_value()
                    }
                    _ => value,
                };
                if !f(k.value(), shown) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Calls `f` on every record (heads, then elements), until it returns false.
    pub fn ap_for_each_record(&self, mut f: impl FnMut(ApRecord<'_>) -> bool) -> Result<()> {
        self.ap_read(|t, el| {
            if let Some(t) = t {
                for item in t.iter().map_err(io_err)? {
                    let (k, v) = item.map_err(io_err)?;
                    let Ok(value) = Value::decode(v.value()) else {
                        continue;
                    };
                    let mut id = vec![0];
                    id.extend_from_slice(k.value());
                    if !f(ApRecord {
                        key: k.value(),
                        id,
                        value,
                    }) {
                        return Ok(());
                    }
                }
            }
            if let Some(el) = el {
                for item in el.range::<&[u8]>(..&AP_RESERVED[..]).map_err(io_err)? {
                    let (k, v) = item.map_err(io_err)?;
                    let Some((key, _, _)) = ap_element_parse(k.value()) else {
                        continue;
                    };
                    let Ok(value) = Value::decode(v.value()) else {
                        continue;
                    };
                    let mut id = vec![1];
                    id.extend_from_slice(k.value());
                    if !f(ApRecord { key, id, value }) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    /// The records with these ids (see [`ApRecord`]), each as (key, a version that merges it
    /// in: the head itself, or a composite holding the one element).
    pub fn ap_read_records(&self, ids: &[Bytes]) -> Result<Vec<Option<(Bytes, Value)>>> {
        self.ap_read(|t, el| {
            ids.iter()
                .map(|id| match id.first() {
                    Some(0) => {
                        let key = &id[1..];
                        let v = match t {
                            Some(t) => read_head(t, key)?,
                            None => None,
                        };
                        Ok(v.map(|v| (Bytes::copy_from_slice(key), v)))
                    }
                    Some(1) => {
                        let rk = &id[1..];
                        let (Some(el), Some((key, kind, sub))) = (el, ap_element_parse(rk)) else {
                            return Ok(None);
                        };
                        let Some(e) = el
                            .get(rk)
                            .map_err(io_err)?
                            .and_then(|raw| decode_element(raw.value()))
                        else {
                            return Ok(None);
                        };
                        let mut delta = Composite::default();
                        delta
                            .colls
                            .entry(kind)
                            .or_default()
                            .entries
                            .insert(Bytes::copy_from_slice(sub), e);
                        Ok(Some((Bytes::copy_from_slice(key), delta.to_value())))
                    }
                    _ => Ok(None),
                })
                .collect()
        })
    }

    /// Merges versions from other replicas (plain versions or composite deltas) into the
    /// split form; durable when it returns.
    pub async fn ap_merge(&self, entries: Vec<(Bytes, Value)>) -> Result<MergeOutcome> {
        match self
            .engine
            .submit(super::ops::Op::Merge {
                table: self.table.clone(),
                entries,
            })
            .await?
        {
            Output::Merged(m) => Ok(m),
            Output::Failed(e) => Err(e),
            _ => Err(capdb_types::Error::Io(
                "unexpected reply from the storage writer to an ap merge".into(),
            )),
        }
    }

    /// One bounded step of reclaiming hidden elements; 0 when nothing is queued.
    pub async fn ap_reclaim_step(&self) -> Result<u64> {
        let queued = self.ap_read(|_, el| {
            Ok(match el {
                Some(el) => el
                    .range::<&[u8]>(&AP_RESERVED[..]..)
                    .map_err(io_err)?
                    .next()
                    .is_some(),
                None => false,
            })
        })?;
        if !queued {
            return Ok(0);
        }
        self.engine
            .submit(super::ops::Op::ApReclaim {
                table: self.table.clone(),
            })
            .await?
            .into_count()
    }

    /// Element records stored for `key` (tests and diagnostics: reclaiming is observable).
    pub fn ap_element_count(&self, key: &[u8]) -> Result<u64> {
        self.ap_read(|_, el| {
            let mut n = 0;
            if let Some(el) = el {
                elements_of(el, key, None, |_, _, _, _| {
                    n += 1;
                    true
                })?;
            }
            Ok(n)
        })
    }

    /// Element records and queued reclaim jobs in the whole table (diagnostics, metrics).
    pub fn ap_element_stats(&self) -> Result<(u64, u64)> {
        self.ap_read(|_, el| {
            let Some(el) = el else { return Ok((0, 0)) };
            let elements = el
                .range::<&[u8]>(..&AP_RESERVED[..])
                .map_err(io_err)?
                .count() as u64;
            let queued = el
                .range::<&[u8]>(&AP_RESERVED[..]..)
                .map_err(io_err)?
                .count() as u64;
            Ok((elements, queued))
        })
    }
}
