//! Hashes, sets, sorted sets and lists in `ap` keyspaces: a key's state as a CRDT.
//!
//! An `ap` key that holds (or held) a collection is stored as one record, a [`Composite`]:
//!
//! - `base`: the key's plain lattice version from [`crate::merge`] (the last SET, DEL, expiry
//!   tombstone or counter), merged as before;
//! - `colls`: per collection kind, its elements, each with its own version.
//!
//! Every part merges as a join-semilattice, so replicas converge whatever order they see
//! versions in (property-tested below):
//!
//! | part | merge rule | concurrent outcome |
//! |---|---|---|
//! | hash field, sorted-set member | last writer wins per element on (timestamp, node, value); HDEL/ZREM write an element tombstone | the later write wins per field; different fields never conflict |
//! | set member | add-wins observed-remove set: per node, the latest add and the latest add removed; visible while some node's add is newer than its removal | a concurrent SADD and SREM of one member: present |
//! | list | the whole list is one last-writer-wins register, with a version vector (`clock`) that tells a concurrent overwrite from a later one | concurrent pushes on two sides: one side's list wins whole; the merge counts the loss |
//! | TTL of a collection | last writer wins | |
//! | DEL, SET over a collection, expiry | the `base` version at time *t* hides (and drops) every element version older than *t* | element writes newer than the delete survive it (delete is per-element LWW) |
//!
//! What a client sees ([`Composite::visible`]): of the live `base` and each kind with visible
//! elements, the one written last. Two candidates at once only arise from concurrent writes of
//! different types (a type conflict): the later wins, the merge counts it.
//!
//! Each kind's elements are keyed by the subkeys `capdb-data` uses (hash field, set member,
//! list position), so the `ap` coordinator runs the very same command code as `cp` over this
//! state.
//!
//! # Whole and split forms
//!
//! The whole [`Composite`] is the model, and what travels between nodes (a write's delta, a
//! read's answer). Replicas store it *split* ([`Composite::split`]): a head (the base, each
//! kind's registers, lists whole, since a list is one register) and one [`Element`] record per
//! hash field, set member or sorted-set score record, so that a write of k elements stores
//! O(k) whatever the collection's size and the value limit bounds an element, not the
//! collection (`capdb-storage`'s `disk/ap.rs`). Heads join with [`Composite::join_head`],
//! element records with [`Entry::join`]; [`Composite::assemble`] puts them back together.
//! Because pruning by a delete is a lattice homomorphism (pruning then joining equals joining
//! then pruning), merging heads and element records in any order, pruning elements by
//! whatever delete a replica knew, then assembling, equals merging the whole states
//! (property-tested below).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Timestamp, Value, ValueKind};

/// The stored state of an `ap` key that holds, or held, a collection. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Composite {
    /// The plain version (encoded [`Value`]: a string, tombstone or counter), if any.
    pub base: Option<Bytes>,
    /// Per [`ValueKind`] (as `u8`), its elements.
    pub colls: BTreeMap<u8, CollState>,
}

/// One kind's elements and collection-level registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollState {
    /// Subkey (as `capdb-data` lays elements out) to element versions.
    pub entries: BTreeMap<Bytes, Entry>,
    /// The collection's deadline, last writer wins: (timestamp, node, deadline).
    pub ttl: (Timestamp, u64, Option<u64>),
    /// When Redis would have converted the collection to its general encoding (sticky: the
    /// latest such write; `ZERO`: never). A timestamp so that a delete hides it too.
    pub big: Timestamp,
    /// When the current incarnation was created (a collection emptied element by element and
    /// created again starts compact, as in Redis): `big` counts only if not older.
    pub created: Timestamp,
    /// Lists only: the whole list's version (timestamp, node), its ends, and the version
    /// vector of the writes it includes (node to its latest write).
    pub written: (Timestamp, u64),
    pub head: i64,
    pub tail: i64,
    pub clock: BTreeMap<u64, Timestamp>,
}

/// One element's versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Last writer wins: (timestamp, node) and the element's bytes (`None`: removed).
    pub ts: Timestamp,
    pub origin: u64,
    pub value: Option<Bytes>,
    /// Sets only: per node, its latest add, and the latest of its adds a removal observed.
    pub adds: BTreeMap<u64, Timestamp>,
    pub removes: BTreeMap<u64, Timestamp>,
}

/// What a key shows a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Visible {
    /// Nothing (deleted, never written).
    Absent,
    /// The plain version (string or counter, unrendered).
    Base(Value),
    /// A collection of this kind.
    Coll(ValueKind),
}

/// What a merge found that a reconciliation report counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// A list version was discarded for a concurrent one (its writes are lost).
    pub list_versions_lost: u64,
    /// Two types were written concurrently to one key; the later won.
    pub type_conflicts: u64,
}

const LIST: u8 = ValueKind::List as u8;
const SET: u8 = ValueKind::Set as u8;

/// Whether `v` is a composite (in an `ap` table, every non-string kind is one).
pub fn is_composite(v: &Value) -> bool {
    v.header.kind != ValueKind::String
}

impl Entry {
    /// Whether the element is present (after pruning, every version left is newer than the
    /// key's last delete).
    pub fn visible(&self, kind: u8) -> bool {
        if kind == SET {
            self.adds
                .iter()
                .any(|(o, a)| self.removes.get(o).is_none_or(|r| a > r))
        } else {
            self.value.is_some()
        }
    }

    /// The newest version in the element (its record's timestamp in the split form).
    pub fn top(&self) -> Timestamp {
        let tags = self.adds.values().chain(self.removes.values()).max();
        tags.copied().unwrap_or(Timestamp::ZERO).max(self.ts)
    }

    /// Joins another version of the same element (a join-semilattice).
    pub fn join(&mut self, o: &Entry) {
        if (o.ts, o.origin, &o.value) > (self.ts, self.origin, &self.value) {
            self.ts = o.ts;
            self.origin = o.origin;
            self.value = o.value.clone();
        }
        max_into(&mut self.adds, &o.adds);
        max_into(&mut self.removes, &o.removes);
    }

    /// Drops the versions a delete at `reset` hides; false when nothing is left.
    pub fn prune(&mut self, reset: Timestamp) -> bool {
        self.adds.retain(|_, a| *a > reset);
        self.removes.retain(|_, r| *r > reset);
        if self.ts <= reset {
            self.ts = Timestamp::ZERO;
            self.origin = 0;
            self.value = None;
        }
        // A removal is kept while it could meet the add it removed (it may arrive later).
        !self.adds.is_empty() || !self.removes.is_empty() || self.ts > Timestamp::ZERO
    }
}

fn max_into(into: &mut BTreeMap<u64, Timestamp>, from: &BTreeMap<u64, Timestamp>) {
    for (k, v) in from {
        let e = into.entry(*k).or_insert(*v);
        *e = (*e).max(*v);
    }
}

impl CollState {
    /// Whether any element is visible.
    pub fn any_visible(&self, kind: u8) -> bool {
        if kind == LIST {
            return self.tail > self.head;
        }
        self.entries.values().any(|e| e.visible(kind))
    }

    /// The latest timestamp of anything in this state.
    pub fn top(&self) -> Timestamp {
        let entries = self.entries.values().map(Entry::top).max();
        entries
            .unwrap_or(Timestamp::ZERO)
            .max(self.ttl.0)
            .max(self.written.0)
    }

    fn join(&mut self, kind: u8, o: &CollState, conflicts: &mut Conflicts) {
        if kind == LIST {
            let concurrent = !dominates(&self.clock, &o.clock) && !dominates(&o.clock, &self.clock);
            if concurrent && self.written != o.written {
                conflicts.list_versions_lost += 1;
            }
            let mut clock = self.clock.clone();
            max_into(&mut clock, &o.clock);
            if (o.written, o.encode_for_order()) > (self.written, self.encode_for_order()) {
                *self = o.clone();
            }
            self.clock = clock;
            return;
        }
        for (sub, e) in &o.entries {
            match self.entries.get_mut(sub) {
                Some(mine) => mine.join(e),
                None => {
                    self.entries.insert(sub.clone(), e.clone());
                }
            }
        }
        if (o.ttl.0, o.ttl.1, o.ttl.2) > self.ttl {
            self.ttl = o.ttl;
        }
        self.big = self.big.max(o.big);
        self.created = self.created.max(o.created);
    }

    /// A total order among list versions written at the same (timestamp, node), which only a
    /// bug could produce; keeps the merge deterministic even then.
    fn encode_for_order(&self) -> Vec<u8> {
        postcard::to_stdvec(&(&self.entries, self.head, self.tail, self.ttl)).unwrap_or_default()
    }

    /// Drops what a delete at `reset` hides; false when nothing is left.
    fn prune(&mut self, kind: u8, reset: Timestamp) -> bool {
        if kind == LIST {
            // History before the delete no longer tells versions apart.
            self.clock.retain(|_, t| *t > reset);
            return self.written.0 > reset;
        }
        self.entries.retain(|_, e| e.prune(reset));
        if self.ttl.0 <= reset {
            self.ttl = (Timestamp::ZERO, 0, None);
        }
        if self.big <= reset {
            self.big = Timestamp::ZERO;
        }
        if self.created <= reset {
            self.created = Timestamp::ZERO;
        }
        // Kept while anything newer than the delete is left, registers included: dropping a
        // state that still holds a register would depend on the order merges happen in.
        !self.entries.is_empty()
            || self.ttl.0 > Timestamp::ZERO
            || self.big > Timestamp::ZERO
            || self.created > Timestamp::ZERO
    }

    /// Whether Redis would report the general encoding for the current incarnation.
    pub fn is_big(&self) -> bool {
        self.big > Timestamp::ZERO && self.big >= self.created
    }
}

/// Whether version vector `a` includes everything `b` does.
fn dominates(a: &BTreeMap<u64, Timestamp>, b: &BTreeMap<u64, Timestamp>) -> bool {
    b.iter().all(|(n, t)| a.get(n).is_some_and(|x| x >= t))
}

impl Composite {
    /// The composite view of any stored version (a plain version becomes the base).
    pub fn of(v: &Value) -> Result<Composite> {
        if !is_composite(v) {
            return Ok(Composite {
                base: Some(Bytes::from(v.encode())),
                colls: BTreeMap::new(),
            });
        }
        postcard::from_bytes(&v.data)
            .map_err(|e| Error::Corruption(format!("ap collection record does not decode: {e}")))
    }

    /// The plain version, if any.
    pub fn base(&self) -> Option<Value> {
        self.base.as_ref().and_then(|b| Value::decode(b).ok())
    }

    /// The timestamp of the last delete or overwrite: element versions at or before it are
    /// hidden (and dropped).
    pub fn reset(&self) -> Timestamp {
        self.base()
            .map(|b| crate::merge::reset_timestamp(&b))
            .unwrap_or(Timestamp::ZERO)
    }

    /// Joins `other` into this state.
    pub fn join(&mut self, other: &Composite) -> Conflicts {
        let mut conflicts = Conflicts::default();
        let before = self.candidates();
        self.base = match (self.base(), other.base()) {
            (Some(a), Some(b)) => Some(Bytes::from(crate::merge::merge(&a, &b).encode())),
            (a, b) => a.or(b).map(|v| Bytes::from(v.encode())),
        };
        for (kind, c) in &other.colls {
            match self.colls.get_mut(kind) {
                Some(mine) => mine.join(*kind, c, &mut conflicts),
                None => {
                    self.colls.insert(*kind, c.clone());
                }
            }
        }
        self.prune();
        if self.candidates() >= 2 && before < 2 && other.candidates() < 2 {
            conflicts.type_conflicts += 1;
        }
        conflicts
    }

    /// Drops element removals older than `before` (tombstone collection: every replica is
    /// known to hold them, see `capdb-ap`'s anti-entropy); true when anything went.
    pub fn collect_removed(&mut self, before: Timestamp) -> bool {
        let mut changed = false;
        for (kind, c) in self.colls.iter_mut() {
            if *kind == LIST {
                continue;
            }
            let n = c.entries.len();
            c.entries.retain(|_, e| {
                let removed = if *kind == SET {
                    !e.visible(*kind)
                } else {
                    e.value.is_none()
                };
                !(removed && e.top() < before)
            });
            changed |= c.entries.len() != n;
        }
        if changed {
            self.colls
                .retain(|k, c| *k == LIST || !c.entries.is_empty() || c.ttl.0 > Timestamp::ZERO);
        }
        changed
    }

    /// Whether any element removal older than `before` could be collected.
    pub fn has_removed_before(&self, before: Timestamp) -> bool {
        self.colls.iter().any(|(kind, c)| {
            *kind != LIST
                && c.entries.values().any(|e| {
                    let removed = if *kind == SET {
                        !e.visible(*kind)
                    } else {
                        e.value.is_none()
                    };
                    removed && e.top() < before
                })
        })
    }

    /// Drops every element version the base's delete hides, and kinds left empty.
    pub fn prune(&mut self) {
        let reset = self.reset();
        self.colls.retain(|kind, c| c.prune(*kind, reset));
    }

    /// How many things a client could be shown (live base, kinds with visible elements).
    pub fn candidates(&self) -> usize {
        let base = self.base().is_some_and(|b| !b.header.tombstone) as usize;
        base + self
            .colls
            .iter()
            .filter(|(k, c)| c.any_visible(**k))
            .count()
    }

    /// The candidate written last and its deadline (expiry is not judged here).
    fn winner(&self) -> (Visible, Option<u64>, Timestamp) {
        let mut best = (Visible::Absent, None, Timestamp::ZERO);
        if let Some(b) = self.base().filter(|b| !b.header.tombstone) {
            best = (
                Visible::Base(b.clone()),
                b.header.expire_at_ms,
                b.header.timestamp,
            );
        }
        for (kind, c) in &self.colls {
            if !c.any_visible(*kind) {
                continue;
            }
            let top = c.top();
            if matches!(best.0, Visible::Absent) || top > best.2 {
                let kind = ValueKind::from_bits(*kind).unwrap_or(ValueKind::String);
                best = (Visible::Coll(kind), c.ttl.2, top);
            }
        }
        best
    }

    /// What a client sees at `now_ms`.
    pub fn visible(&self, now_ms: u64) -> Visible {
        let (v, expire, _) = self.winner();
        match expire {
            Some(at) if at <= now_ms => Visible::Absent,
            _ => v,
        }
    }

    /// The timestamp of the newest thing in the state.
    pub fn top(&self) -> Timestamp {
        let base = self.base().map(|b| b.header.timestamp);
        let colls = self.colls.values().map(CollState::top).max();
        base.unwrap_or(Timestamp::ZERO)
            .max(colls.unwrap_or(Timestamp::ZERO))
    }

    /// The version to store: the plain base alone when no collection part is left, else a
    /// composite whose header tells readers what the winner is (timestamp: the newest
    /// anything; tombstone: nothing visible; deadline: the winner's).
    pub fn to_value(&self) -> Value {
        if self.colls.is_empty() {
            return self
                .base()
                .unwrap_or_else(|| Value::tombstone(Timestamp::ZERO));
        }
        let (winner, expire, _) = self.winner();
        let kind = match &winner {
            Visible::Coll(k) => *k,
            // Any collection kind marks the record as a composite; `render` shows the base.
            _ => self
                .colls
                .keys()
                .next()
                .and_then(|k| ValueKind::from_bits(*k))
                .unwrap_or(ValueKind::Hash),
        };
        let data = postcard::to_stdvec(self).expect("a composite always encodes");
        let mut v = Value::of_kind(kind, Bytes::from(data), self.top(), expire);
        v.header.tombstone = matches!(winner, Visible::Absent);
        if v.header.tombstone {
            v.header.expire_at_ms = None;
        }
        v
    }
}

/// One element of a collection in the split form: (kind as `u8`, subkey, versions).
pub type Element = (u8, Bytes, Entry);

impl Entry {
    /// Whether only removals are left (HDEL, ZREM: a removed value; SREM: no add survives a
    /// removal): what tombstone collection drops once every replica holds it.
    pub fn removed(&self, kind: u8) -> bool {
        if kind == SET {
            !self.visible(kind)
        } else {
            self.value.is_none()
        }
    }

    /// The stored form of an element record: a [`Value`] of the collection's kind whose
    /// timestamp is the element's newest version (what anti-entropy's `before_ms` and tombstone
    /// collection look at) and whose data is the encoded entry.
    pub fn to_record(&self, kind: u8) -> Value {
        let data = postcard::to_stdvec(self).expect("an element always encodes");
        let kind = ValueKind::from_bits(kind).unwrap_or(ValueKind::Hash);
        Value::of_kind(kind, Bytes::from(data), self.top(), None)
    }

    /// The entry an element record holds.
    pub fn of_record(v: &Value) -> Result<Entry> {
        postcard::from_bytes(&v.data)
            .map_err(|e| Error::Corruption(format!("ap element record does not decode: {e}")))
    }
}

/// The split form: how `ap` tables store a collection (see the module docs).
impl Composite {
    /// Splits the state into its *head* (the base, every kind's registers, and lists whole)
    /// and its elements (hash fields, set and sorted-set members), one record each.
    pub fn split(mut self) -> (Composite, Vec<Element>) {
        let mut elements = Vec::new();
        for (kind, c) in self.colls.iter_mut() {
            if *kind == LIST {
                continue;
            }
            for (sub, e) in std::mem::take(&mut c.entries) {
                elements.push((*kind, sub, e));
            }
        }
        // A kind left with neither elements nor registers newer than the delete goes, as in
        // the whole form's pruning.
        self.prune();
        (self, elements)
    }

    /// Whether the head holds nothing at all (no base, no kind): not worth a record.
    pub fn is_empty(&self) -> bool {
        self.base.is_none() && self.colls.is_empty()
    }

    /// Joins element versions into the state (then drops what the base's delete hides): the
    /// inverse of [`Composite::split`], in any order and any grouping.
    pub fn assemble(&mut self, elements: impl IntoIterator<Item = Element>) {
        for (kind, sub, e) in elements {
            let c = self.colls.entry(kind).or_default();
            match c.entries.get_mut(&sub) {
                Some(mine) => mine.join(&e),
                None => {
                    c.entries.insert(sub, e);
                }
            }
        }
        self.prune();
    }

    /// Joins another head into this one (no element entries involved); reports a list version
    /// lost. Type conflicts need the elements' visibility: the caller counts them on the
    /// assembled states.
    pub fn join_head(&mut self, other: &Composite) -> Conflicts {
        let mut conflicts = Conflicts::default();
        self.base = match (self.base(), other.base()) {
            (Some(a), Some(b)) => Some(Bytes::from(crate::merge::merge(&a, &b).encode())),
            (a, b) => a.or(b).map(|v| Bytes::from(v.encode())),
        };
        for (kind, c) in &other.colls {
            match self.colls.get_mut(kind) {
                Some(mine) => mine.join(*kind, c, &mut conflicts),
                None => {
                    self.colls.insert(*kind, c.clone());
                }
            }
        }
        self.prune();
        conflicts
    }

    /// What a replica holding `mine` lacks of this state: the head whole (small), and the
    /// elements whose versions differ (read repair sends this rather than the whole state).
    pub fn delta_from(&self, mine: &Composite) -> Composite {
        let mut delta = self.clone();
        for (kind, c) in delta.colls.iter_mut() {
            if *kind == LIST {
                continue;
            }
            let theirs = mine.colls.get(kind);
            c.entries
                .retain(|sub, e| theirs.and_then(|t| t.entries.get(sub)) != Some(e));
        }
        delta
    }
}

/// Whether `v` is a collection that expired before `horizon` and was last written before it:
/// what tombstone collection removes in place of the expiry sweep (see
/// [`crate::merge::expiry_replacement`]).
pub fn expired_before(v: &Value, horizon: Timestamp) -> bool {
    is_composite(v)
        && !v.header.tombstone
        && v.header.timestamp < horizon
        && v.is_expired(horizon.physical_ms().saturating_sub(1))
}

/// Merges two versions of which at least one is a composite.
pub(crate) fn merge(a: &Value, b: &Value) -> Value {
    match (Composite::of(a), Composite::of(b)) {
        (Ok(mut ca), Ok(cb)) => {
            ca.join(&cb);
            ca.to_value()
        }
        // A record that does not decode cannot take part; the readable one is kept (the
        // corrupt one is reported where it is read).
        (Ok(_), Err(_)) => a.clone(),
        (Err(_), Ok(_)) => b.clone(),
        (Err(_), Err(_)) => {
            if crate::merge::wins(a, b) {
                a.clone()
            } else {
                b.clone()
            }
        }
    }
}

/// WATCH on an `ap` key: a fingerprint of what the key shows and of the versions that wrote
/// it, compared at EXEC with the one taken at WATCH. It changes with every write Redis counts
/// as a change: a new version of the base (SET, even of the same value; DEL), of a visible
/// element (HSET, ZADD of a new score, an element's removal, which hides it), of a set
/// member's adds, of the deadline (EXPIRE), of a list. It ignores what no client can see and
/// no Redis command signals: hidden elements, set removals of an invisible member, what
/// tombstone collection drops. (The record's timestamp is not enough: an SREM records the adds
/// it observed, no newer timestamp.) A record that shows nothing at `now_ms` (a delete's
/// tombstone, an expired or emptied key) stamps its newest version, so that a key created and
/// deleted again since WATCH counts as changed, as in Redis, and a key that expires after WATCH
/// too. Compared within one process only.
pub fn watch_stamp(v: &Value, now_ms: u64) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    if !v.is_live(now_ms) {
        (3u8, v.header.timestamp.0).hash(&mut h);
        return Ok(h.finish());
    }
    if !is_composite(v) {
        v.encode().hash(&mut h);
        return Ok(h.finish());
    }
    let c = Composite::of(v)?;
    match c.winner().0 {
        Visible::Absent => 0u8.hash(&mut h),
        Visible::Base(b) => {
            1u8.hash(&mut h);
            b.encode().hash(&mut h);
        }
        Visible::Coll(kind) => {
            let k = kind as u8;
            (2u8, k).hash(&mut h);
            if let Some(cs) = c.colls.get(&k) {
                let mut shown = cs.clone();
                if k != LIST {
                    shown.entries.retain(|_, e| e.visible(k));
                    for e in shown.entries.values_mut() {
                        e.removes.clear();
                    }
                }
                postcard::to_stdvec(&shown)
                    .map_err(|e| Error::Io(format!("ap watch stamp: {e}")))?
                    .hash(&mut h);
            }
        }
    }
    Ok(h.finish())
}

/// What a client sees of a composite version (see [`crate::merge::render`]); the caller has
/// judged expiry on the header.
pub(crate) fn render(v: Value) -> Result<Value> {
    let c = Composite::of(&v)?;
    Ok(match c.winner().0 {
        Visible::Absent => Value::tombstone(v.header.timestamp),
        Visible::Base(b) => crate::merge::render(b)?,
        Visible::Coll(kind) => Value::of_kind(
            kind,
            Bytes::new(),
            v.header.timestamp,
            v.header.expire_at_ms,
        ),
    })
}

/// Merges two versions and reports what the merge found (for the reconciliation report).
pub fn merge_counting(a: &Value, b: &Value) -> (Value, Conflicts) {
    if !is_composite(a) && !is_composite(b) {
        return (crate::merge::merge(a, b), Conflicts::default());
    }
    match (Composite::of(a), Composite::of(b)) {
        (Ok(mut ca), Ok(cb)) => {
            let c = ca.join(&cb);
            (ca.to_value(), c)
        }
        _ => (merge(a, b), Conflicts::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: u8 = ValueKind::Hash as u8;

    fn ts(t: u64) -> Timestamp {
        Timestamp(t)
    }

    fn field(t: u64, node: u64, v: Option<&str>) -> Entry {
        Entry {
            ts: ts(t),
            origin: node,
            value: v.map(|s| Bytes::from(s.to_string())),
            ..Entry::default()
        }
    }

    fn hash(fields: &[(&str, Entry)]) -> Value {
        let mut c = CollState::default();
        for (f, e) in fields {
            c.entries.insert(Bytes::from(f.to_string()), e.clone());
        }
        let mut comp = Composite::default();
        comp.colls.insert(HASH, c);
        comp.to_value()
    }

    fn fields(v: &Value) -> Vec<(String, String)> {
        let c = Composite::of(v).unwrap();
        let Some(h) = c.colls.get(&HASH) else {
            return vec![];
        };
        h.entries
            .iter()
            .filter(|(_, e)| e.visible(HASH))
            .map(|(k, e)| {
                let v = e.value.clone().unwrap();
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn hash_fields_written_on_both_sides_all_survive_and_the_later_write_of_one_field_wins() {
        let a = hash(&[
            ("x", field(5, 1, Some("a"))),
            ("k", field(7, 1, Some("side-a"))),
        ]);
        let b = hash(&[
            ("y", field(6, 2, Some("b"))),
            ("k", field(8, 2, Some("side-b"))),
        ]);
        let m = merge(&a, &b);
        assert_eq!(m, merge(&b, &a));
        assert_eq!(
            fields(&m),
            vec![
                ("k".into(), "side-b".into()),
                ("x".into(), "a".into()),
                ("y".into(), "b".into())
            ]
        );
    }

    #[test]
    fn a_delete_hides_older_fields_but_not_fields_written_after_it() {
        let h = hash(&[
            ("old", field(5, 1, Some("1"))),
            ("new", field(12, 2, Some("2"))),
        ]);
        let m = merge(&h, &Value::tombstone(ts(10)));
        assert_eq!(fields(&m), vec![("new".into(), "2".into())]);
        // Everything older than the delete: the key is gone, a plain tombstone is left.
        let gone = merge(
            &hash(&[("old", field(5, 1, Some("1")))]),
            &Value::tombstone(ts(10)),
        );
        assert!(!is_composite(&gone) && gone.header.tombstone);
    }

    #[test]
    fn a_concurrent_add_beats_a_remove_that_did_not_see_it() {
        let set_with = |adds: &[(u64, u64)], removes: &[(u64, u64)]| {
            let mut e = Entry {
                value: Some(Bytes::new()),
                ..Entry::default()
            };
            e.adds = adds.iter().map(|(n, t)| (*n, ts(*t))).collect();
            e.removes = removes.iter().map(|(n, t)| (*n, ts(*t))).collect();
            let mut c = CollState::default();
            c.entries.insert(Bytes::from_static(b"m"), e);
            let mut comp = Composite::default();
            comp.colls.insert(SET, c);
            comp
        };
        // Node 1 added at 5; side A removes what it saw (node 1's add at 5); side B (node 2)
        // adds again at 6 without seeing the removal.
        let mut removed = set_with(&[(1, 5)], &[(1, 5)]);
        let readded = set_with(&[(1, 5), (2, 6)], &[]);
        removed.join(&readded);
        assert_eq!(removed.visible(0), Visible::Coll(ValueKind::Set));
        // A removal that saw both adds wins.
        let mut both = set_with(&[(1, 5), (2, 6)], &[(1, 5), (2, 6)]);
        both.join(&readded);
        assert_eq!(both.visible(0), Visible::Absent);
    }

    #[test]
    fn concurrent_list_versions_keep_the_later_and_count_the_loss() {
        let list = |written: u64, node: u64, clock: &[(u64, u64)]| {
            let mut c = CollState {
                written: (ts(written), node),
                head: 0,
                tail: 1,
                ..CollState::default()
            };
            c.clock = clock.iter().map(|(n, t)| (*n, ts(*t))).collect();
            c.entries
                .insert(Bytes::from_static(b"p0"), field(written, node, Some("e")));
            let mut comp = Composite::default();
            comp.colls.insert(LIST, c);
            comp
        };
        let mut a = list(5, 1, &[(1, 5)]);
        let later = list(7, 1, &[(1, 7)]);
        assert_eq!(
            a.join(&later).list_versions_lost,
            0,
            "a later write is no conflict"
        );
        let mut a = list(5, 1, &[(1, 5)]);
        let b = list(6, 2, &[(2, 6)]);
        assert_eq!(a.join(&b).list_versions_lost, 1);
        assert_eq!(a.colls[&LIST].written, (ts(6), 2));
    }

    #[test]
    fn a_string_and_a_hash_written_concurrently_show_the_later_and_count_a_type_conflict() {
        let s = Value::new(Bytes::from_static(b"str"), ts(9), None);
        let h = hash(&[("f", field(11, 2, Some("v")))]);
        let (m, c) = merge_counting(&s, &h);
        assert_eq!(c.type_conflicts, 1);
        assert_eq!(
            render(m.clone()).unwrap().header.kind,
            ValueKind::Hash,
            "the hash was written last"
        );
        // The hash field is older than a later SET: the SET wins and drops it.
        let s2 = Value::new(Bytes::from_static(b"str"), ts(12), None);
        let m2 = merge(&m, &s2);
        assert!(!is_composite(&m2));
        assert_eq!(m2.data, "str");
    }

    #[test]
    fn removed_fields_older_than_the_horizon_are_collected_and_live_ones_stay() {
        let h = hash(&[
            ("gone", field(5, 1, None)),
            ("recent-gone", field(50, 1, None)),
            ("live", field(4, 1, Some("v"))),
        ]);
        let mut c = Composite::of(&h).unwrap();
        assert!(c.has_removed_before(ts(10)));
        assert!(c.collect_removed(ts(10)));
        let left: Vec<_> = c.colls[&HASH].entries.keys().cloned().collect();
        assert_eq!(
            left,
            vec![
                Bytes::from_static(b"live"),
                Bytes::from_static(b"recent-gone")
            ]
        );
        assert!(!c.has_removed_before(ts(10)));
    }

    #[test]
    fn a_collection_ttl_expires_the_key_for_readers() {
        let mut c = CollState::default();
        c.entries
            .insert(Bytes::from_static(b"f"), field(5, 1, Some("v")));
        c.ttl = (ts(5), 1, Some(1_000));
        let mut comp = Composite::default();
        comp.colls.insert(HASH, c);
        assert_eq!(comp.visible(999), Visible::Coll(ValueKind::Hash));
        assert_eq!(comp.visible(1_000), Visible::Absent);
        let v = comp.to_value();
        assert!(v.is_live(999) && !v.is_live(1_000));
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_parts(ms, 0)
    }

    /// A hash of `fields` (name, written at ms) whose TTL register is `ttl` (written at ms,
    /// deadline).
    fn hash_with_ttl(fields: &[(&str, u64)], ttl: (u64, Option<u64>)) -> Value {
        let mut c = CollState::default();
        for (f, ms) in fields {
            c.entries.insert(
                Bytes::from(f.to_string()),
                Entry {
                    ts: at(*ms),
                    origin: 1,
                    value: Some(Bytes::from_static(b"v")),
                    ..Entry::default()
                },
            );
        }
        c.ttl = (at(ttl.0), 1, ttl.1);
        let mut comp = Composite::default();
        comp.colls.insert(HASH, c);
        comp.to_value()
    }

    /// What a replica holds after its expiry sweep ran at `now_ms`.
    fn swept(v: &Value, now_ms: u64) -> Value {
        crate::merge::expiry_replacement(v, now_ms).unwrap_or_else(|| v.clone())
    }

    #[test]
    fn a_persist_that_one_replica_missed_keeps_the_collection_after_that_replica_swept_it() {
        // h = {f} with EXPIRE (at 100ms) for 1_000ms; PERSIST at 500ms reached a quorum but
        // not replica C. C's sweep runs after the deadline, then anti-entropy brings the
        // PERSIST (the TTL register alone: the delta PERSIST replicates).
        let on_c = hash_with_ttl(&[("f", 50)], (100, Some(1_000)));
        let persist = hash_with_ttl(&[], (500, None));
        let healed = merge(&swept(&on_c, 1_000), &persist);
        assert!(
            healed.is_live(5_000),
            "the acknowledged PERSIST lost the hash"
        );
        assert_eq!(fields(&healed), vec![("f".into(), "v".into())]);
        // Every replica ends with the same record, whichever merged first.
        assert_eq!(healed, merge(&persist, &swept(&on_c, 1_000)));
    }

    #[test]
    fn a_field_written_just_before_the_deadline_expires_with_the_collection_on_every_replica() {
        // HSET h g at 900ms (before the deadline at 1_000ms) reached a quorum; its delta
        // carries the TTL register its coordinator read. Replica C gets it late, after its
        // sweep ran.
        let on_c = hash_with_ttl(&[("f", 50)], (100, Some(1_000)));
        let late = hash_with_ttl(&[("g", 900)], (100, Some(1_000)));
        let healed = merge(&swept(&on_c, 1_000), &late);
        assert!(
            !healed.is_live(5_000),
            "an expired hash came back, without its deadline: {:?}",
            Composite::of(&healed).unwrap()
        );
    }

    #[test]
    fn an_incr_on_an_expired_collection_counts_from_nothing_and_drops_its_elements() {
        let expired = hash_with_ttl(&[("f", 50)], (100, Some(1_000)));
        let incr = crate::merge::counter_add(Some(&expired), 2, 5, at(2_000), 2_000).unwrap();
        assert!(
            !is_composite(&incr),
            "the expired hash is kept hidden in the counter"
        );
        assert_eq!(crate::merge::render(incr.clone()).unwrap().data, "5");
        // A replica that did not see the INCR still holds the expired hash (or, swept by a
        // build that tombstoned expired collections, a tombstone at its newest write): the
        // increment survives the merge with either.
        for other in [expired.clone(), Value::tombstone(expired.header.timestamp)] {
            let m = merge(&incr, &other);
            assert_eq!(crate::merge::render(m).unwrap().data, "5");
        }
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            0u64..8,
            0u64..3,
            prop::option::of(prop::collection::vec(0u8..3, 0..2)),
            prop::collection::btree_map(0u64..3, 0u64..8, 0..3),
            prop::collection::btree_map(0u64..3, 0u64..8, 0..2),
        )
            .prop_map(|(t, o, v, adds, removes)| Entry {
                ts: ts(t),
                origin: o,
                value: v.map(Bytes::from),
                adds: adds.into_iter().map(|(k, v)| (k, ts(v))).collect(),
                removes: removes.into_iter().map(|(k, v)| (k, ts(v))).collect(),
            })
    }

    fn arb_coll() -> impl Strategy<Value = CollState> {
        (
            prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "c"]),
                arb_entry(),
                0..3,
            ),
            (0u64..8, 0u64..3, prop::option::of(0u64..3)),
            (0u64..3, 0u64..3),
            (0u64..8, 0u64..3),
            0i64..3,
            prop::collection::btree_map(0u64..3, 0u64..8, 0..3),
        )
            .prop_map(
                |(entries, ttl, (big, created), written, len, clock)| CollState {
                    entries: entries
                        .into_iter()
                        .map(|(k, e)| (Bytes::from_static(k.as_bytes()), e))
                        .collect(),
                    ttl: (ts(ttl.0), ttl.1, ttl.2),
                    big: ts(big),
                    created: ts(created),
                    written: (ts(written.0), written.1),
                    head: 0,
                    tail: len,
                    // A list's clock never runs ahead of its own version.
                    clock: clock
                        .into_iter()
                        .map(|(k, v)| (k, ts(v.min(written.0))))
                        .collect(),
                },
            )
    }

    fn arb_version() -> impl Strategy<Value = Value> {
        let plain = (0u64..8, prop::collection::vec(any::<u8>(), 0..2))
            .prop_map(|(t, d)| Value::new(Bytes::from(d), ts(t), None));
        let tomb = (0u64..8).prop_map(|t| Value::tombstone(ts(t)));
        let comp = (
            prop::option::of(prop_oneof![
                (0u64..8).prop_map(|t| Value::tombstone(ts(t))),
                (0u64..8).prop_map(|t| Value::new(Bytes::from_static(b"s"), ts(t), None)),
            ]),
            prop::collection::btree_map(prop::sample::select(vec![1u8, 2, 3, 4]), arb_coll(), 1..3),
        )
            .prop_map(|(base, mut colls)| {
                // Only lists use the list registers; only sets use tags.
                for (kind, c) in colls.iter_mut() {
                    if *kind != LIST {
                        c.written = (Timestamp::ZERO, 0);
                        c.head = 0;
                        c.tail = 0;
                        c.clock.clear();
                    }
                    if *kind != SET {
                        for e in c.entries.values_mut() {
                            e.adds.clear();
                            e.removes.clear();
                        }
                    }
                }
                let mut c = Composite {
                    base: base.map(|b| Bytes::from(b.encode())),
                    colls,
                };
                c.prune();
                c.to_value()
            });
        prop_oneof![1 => plain, 1 => tomb, 2 => comp]
    }

    /// Joins element records the way a replica's element table does: per (kind, subkey).
    fn join_elements(
        into: &mut BTreeMap<(u8, Bytes), Entry>,
        elements: impl IntoIterator<Item = Element>,
    ) {
        for (kind, sub, e) in elements {
            into.entry((kind, sub))
                .and_modify(|mine| mine.join(&e))
                .or_insert(e);
        }
    }

    proptest! {
        #[test]
        fn split_records_merged_in_any_order_assemble_to_the_merged_whole(
            a in arb_version(), b in arb_version(), c in arb_version()
        ) {
            let m = crate::merge::merge;
            let whole = m(&m(&a, &b), &c);
            let parts: Vec<(Composite, Vec<Element>)> = [&a, &b, &c]
                .iter()
                .map(|v| Composite::of(v).unwrap().split())
                .collect();
            // Heads in one order, element records in the other, and elements pruned on
            // arrival by the delete their replica knew then (as a replica stores them).
            let mut head = Composite::default();
            for (h, _) in parts.iter().rev() {
                head.join_head(h);
            }
            let mut els = BTreeMap::new();
            for (i, (_, es)) in parts.iter().enumerate() {
                let known = parts[..=i].iter().fold(Composite::default(), |mut acc, (h, _)| {
                    acc.join_head(h);
                    acc
                });
                let pruned = es.iter().cloned().filter_map(|(k, s, mut e)| {
                    e.prune(known.reset()).then_some((k, s, e))
                });
                join_elements(&mut els, pruned);
            }
            let mut assembled = head;
            assembled.assemble(els.into_iter().map(|((k, s), e)| (k, s, e)));
            prop_assert_eq!(assembled.to_value(), whole);
        }

        #[test]
        fn head_and_element_records_each_merge_commutatively_associatively_idempotently(
            a in arb_version(), b in arb_version(), c in arb_version(),
            x in arb_entry(), y in arb_entry(), z in arb_entry()
        ) {
            let head = |v: &Value| Composite::of(v).unwrap().split().0;
            let jh = |p: &Composite, q: &Composite| {
                let mut r = p.clone();
                r.join_head(q);
                r
            };
            let (a, b, c) = (head(&a), head(&b), head(&c));
            prop_assert_eq!(jh(&a, &b).to_value(), jh(&b, &a).to_value());
            prop_assert_eq!(jh(&a, &a).to_value(), a.to_value());
            prop_assert_eq!(jh(&jh(&a, &b), &c).to_value(), jh(&a, &jh(&b, &c)).to_value());
            let je = |p: &Entry, q: &Entry| {
                let mut r = p.clone();
                r.join(q);
                r
            };
            prop_assert_eq!(je(&x, &y), je(&y, &x));
            prop_assert_eq!(je(&x, &x), x.clone());
            prop_assert_eq!(je(&je(&x, &y), &z), je(&x, &je(&y, &z)));
        }

        #[test]
        fn an_element_record_decodes_to_its_entry(e in arb_entry(), kind in 1u8..5) {
            let r = e.to_record(kind);
            prop_assert_eq!(Entry::of_record(&Value::decode(&r.encode()).unwrap()).unwrap(), e.clone());
            prop_assert_eq!(r.header.timestamp, e.top());
        }
    }

    proptest! {
        #[test]
        fn merge_is_commutative_idempotent_and_associative(
            a in arb_version(), b in arb_version(), c in arb_version()
        ) {
            let m = crate::merge::merge;
            prop_assert_eq!(m(&a, &b), m(&b, &a));
            prop_assert_eq!(m(&a, &a), m(&a, &m(&a, &a)));
            prop_assert_eq!(m(&m(&a, &b), &c), m(&a, &m(&b, &c)));
        }
    }
}
