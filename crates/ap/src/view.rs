//! Data-type commands in `ap` keyspaces: the coordinator runs `capdb-data`'s command code over
//! a [`View`] of the versions it read, and replicates what the command wrote as deltas that
//! replicas merge (the rules are in [`capdb_types::composite`]).
//!
//! The coordinator reads each key the command names at the request's level, builds the
//! key's [`Composite`] (a plain version is a composite with only a base), and runs the command.
//! A command that names its elements (`capdb_data::point`) on a big collection reads only
//! those, the head and one visible element ([`View::restrict`]): the view then knows whether
//! the collection exists, its kind, TTL and encoding, and the named elements, but not its
//! size, which such commands never need; one that reaches further sets [`View::missed`] and
//! runs again over the whole state.
//! The view records the command's writes as element versions stamped with one timestamp
//! (`t_write`), and deletes and overwrites with an earlier one (`t_reset`), so that a command
//! that empties a key and fills it again keeps what it wrote. What goes to the replicas is a
//! *delta*: the base if it changed, the elements the command touched, the collection registers,
//! and for lists the whole list (a list is one register). Replicas store the delta's elements
//! as records of their own (`capdb_storage`'s `disk/ap.rs`): a write of k elements stores
//! O(k) bytes, and the value limit bounds each element, not the collection.
//!
//! The reply is computed from what this coordinator read: under concurrency two coordinators
//! may both answer `HDEL … = 1`, or both pop the same list element; the merged state follows
//! the rules in [`capdb_types::composite`]. As for every `ap` read-modify-write, nothing is
//! atomic across keys.
//!
//! Sorted sets keep only member → score records here: the order index `capdb-data` also writes
//! would not stay consistent under per-member merging (two sides scoring one member
//! differently would leave two index records), so the view derives it from the score records
//! and keeps the command's index writes local.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use capdb_data::meta::CollMeta;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::composite::{CollState, Composite, Visible};
use capdb_types::{Error, Result, Timestamp, Value, ValueKind};

const LIST: u8 = ValueKind::List as u8;
const SET: u8 = ValueKind::Set as u8;
const ZSET: u8 = ValueKind::ZSet as u8;

/// The keys one command reads and writes, as this coordinator sees them.
pub(crate) struct View {
    me: u64,
    t_reset: Timestamp,
    t_write: Timestamp,
    now_ms: u64,
    keys: HashMap<Bytes, KeyState>,
    next_id: u64,
    /// The command reached past what a partial read fetched (see [`View::restrict`]): its
    /// run is void, and the coordinator runs it again over the whole collection.
    missed: bool,
}

#[derive(Default)]
struct KeyState {
    /// What was read, joined with what the command wrote.
    state: Composite,
    /// The collection id `get` reports: distinct per key, and a created collection's own
    /// (commands compare ids to tell collections apart).
    id: u64,
    /// The kind element operations address (the visible or the created collection's).
    kind: u8,
    base_written: bool,
    /// Per kind: the subkeys written (lists: the whole list is written).
    touched: BTreeMap<u8, BTreeSet<Bytes>>,
    /// Sorted sets: the order index, derived from the score records on first use.
    index: Option<BTreeMap<Bytes, ()>>,
    /// Keys the command did not name are unreadable.
    read: bool,
    /// A partial read: the only subkeys whose state is known (those fetched and those this
    /// command wrote). `None`: the whole collection was read.
    loaded: Option<BTreeSet<Bytes>>,
}

impl View {
    /// A view over the versions read (`None`: nothing stored). `t_reset < t_write`, both later
    /// than every timestamp read.
    pub(crate) fn new(
        me: u64,
        t_reset: Timestamp,
        t_write: Timestamp,
        now_ms: u64,
        read: HashMap<Bytes, Option<Value>>,
    ) -> Result<View> {
        debug_assert!(t_reset < t_write);
        let mut keys = HashMap::with_capacity(read.len());
        for (n, (k, v)) in read.into_iter().enumerate() {
            let state = match v {
                Some(v) => Composite::of(&v)?,
                None => Composite::default(),
            };
            keys.insert(
                k,
                KeyState {
                    state,
                    // Distinct per key: commands tell collections apart by id.
                    id: n as u64 + 1,
                    read: true,
                    ..KeyState::default()
                },
            );
        }
        Ok(View {
            me,
            t_reset,
            t_write,
            now_ms,
            keys,
            next_id: 1 << 40,
            missed: false,
        })
    }

    /// Marks `key` as read partially: of its collection's elements, only those at `loaded`
    /// (present or not) are known; its registers and the witness of its non-emptiness are
    /// (see `capdb_data::point`). A command that reads any other element, or a range, sets
    /// [`View::missed`] and fails.
    pub(crate) fn restrict(&mut self, key: &[u8], loaded: BTreeSet<Bytes>) {
        if let Some(ks) = self.keys.get_mut(key) {
            // Elements only some replicas sent (a witness they did not share) are not known:
            // their versions on the other replicas were not read.
            for (kind, c) in ks.state.colls.iter_mut() {
                if *kind != LIST {
                    c.entries.retain(|sub, _| loaded.contains(sub));
                }
            }
            ks.loaded = Some(loaded);
        }
    }

    /// Whether the command reached past a partial read (its reply and writes are void).
    pub(crate) fn missed(&self) -> bool {
        self.missed
    }

    /// Fails the command when `key` was read partially and `sub` (any element, for `None`)
    /// was not fetched.
    fn need(&mut self, key: &[u8], sub: Option<&[u8]>) -> Result<()> {
        let known = match self.keys.get(key).and_then(|k| k.loaded.as_ref()) {
            None => true,
            Some(loaded) => sub.is_some_and(|s| loaded.contains(s)),
        };
        if known {
            return Ok(());
        }
        self.missed = true;
        Err(Error::Io(
            "ap command read past its partial read (run again over the whole collection)".into(),
        ))
    }

    /// `sub` of `key` is now known (this command wrote it).
    fn learn(&mut self, key: &[u8], sub: &[u8]) {
        if let Some(loaded) = self.keys.get_mut(key).and_then(|k| k.loaded.as_mut()) {
            loaded.insert(Bytes::copy_from_slice(sub));
        }
    }

    fn key(&mut self, key: &[u8]) -> Result<&mut KeyState> {
        match self.keys.get_mut(key) {
            Some(k) if k.read => Ok(k),
            _ => Err(Error::Io(format!(
                "ap command touched key {:?} it did not declare",
                String::from_utf8_lossy(key)
            ))),
        }
    }

    /// The versions to replicate, one per key written: each a delta (the key's head and the
    /// elements the command touched). Replicas store each element as its own record, so the
    /// value limit applies per element, and to a list whole (a list is one register).
    pub(crate) fn into_writes(self, value_bytes_max: usize) -> Result<Vec<(Bytes, Value)>> {
        let mut out = Vec::new();
        for (key, ks) in self.keys {
            if !ks.base_written && ks.touched.is_empty() {
                continue;
            }
            let mut delta = Composite {
                base: if ks.base_written {
                    ks.state.base.clone()
                } else {
                    None
                },
                colls: BTreeMap::new(),
            };
            for (kind, subs) in &ks.touched {
                let Some(c) = ks.state.colls.get(kind) else {
                    continue;
                };
                let part = if *kind == LIST {
                    c.clone()
                } else {
                    CollState {
                        entries: c
                            .entries
                            .iter()
                            .filter(|(s, _)| subs.contains(*s))
                            .map(|(s, e)| (s.clone(), e.clone()))
                            .collect(),
                        ttl: c.ttl,
                        big: c.big,
                        created: c.created,
                        ..CollState::default()
                    }
                };
                delta.colls.insert(*kind, part);
            }
            if delta.base.is_none() && delta.colls.is_empty() {
                continue;
            }
            check_record_sizes(&key, &delta, value_bytes_max)?;
            out.push((key, delta.to_value()));
        }
        Ok(out)
    }

    /// Sets a collection's deadline (EXPIRE, PERSIST on a key holding a collection).
    pub(crate) fn set_ttl(&mut self, key: &[u8], expire_at_ms: Option<u64>) -> Result<()> {
        let (me, t_write, now_ms) = (self.me, self.t_write, self.now_ms);
        let ks = self.key(key)?;
        let Visible::Coll(kind) = ks.state.visible(now_ms) else {
            return Err(Error::Io(
                "ap TTL change of a key without a collection".into(),
            ));
        };
        let kind = kind as u8;
        let c = ks.state.colls.entry(kind).or_default();
        c.ttl = (t_write, me, expire_at_ms);
        ks.touch_registers(kind, me, t_write);
        Ok(())
    }

    /// A delete or overwrite of the whole key by this command: the base becomes a tombstone at
    /// `t_reset`, hiding everything older, and whatever this command wrote to the key before is
    /// dropped.
    fn reset(&mut self, key: &[u8]) -> Result<()> {
        // `t_reset` must be later than every element it hides, and this node's clock has only
        // seen the elements a partial read fetched.
        self.need(key, None)?;
        let (t_reset, t_write) = (self.t_reset, self.t_write);
        let ks = self.key(key)?;
        let tomb = Value::tombstone(t_reset);
        ks.state.base = Some(Bytes::from(
            match ks.state.base() {
                Some(b) => capdb_types::merge::merge(&b, &tomb),
                None => tomb,
            }
            .encode(),
        ));
        for c in ks.state.colls.values_mut() {
            c.entries
                .retain(|_, e| e.ts < t_write && !e.adds.values().any(|a| *a >= t_write));
            if c.written.0 >= t_write {
                *c = CollState::default();
            }
        }
        ks.state.prune();
        ks.base_written = true;
        ks.touched.clear();
        ks.index = None;
        Ok(())
    }
}

impl KeyState {
    /// The collection-level registers of `kind` changed; lists are rewritten whole.
    fn touch_registers(&mut self, kind: u8, me: u64, t_write: Timestamp) {
        self.touched.entry(kind).or_default();
        if kind == LIST
            && let Some(c) = self.state.colls.get_mut(&kind)
        {
            c.written = (t_write, me);
            c.clock.insert(me, t_write);
        }
    }

    fn touch(&mut self, sub: &[u8], me: u64, t_write: Timestamp) {
        let kind = self.kind;
        self.touch_registers(kind, me, t_write);
        if kind != LIST {
            self.touched
                .entry(kind)
                .or_default()
                .insert(Bytes::copy_from_slice(sub));
        }
    }

    /// Sorted sets: the derived order index.
    fn index(&mut self) -> Result<&mut BTreeMap<Bytes, ()>> {
        if self.index.is_none() {
            let mut index = BTreeMap::new();
            if let Some(c) = self.state.colls.get(&ZSET) {
                for (sub, e) in &c.entries {
                    if let (true, Some(v)) = (e.visible(ZSET), &e.value) {
                        let k = capdb_data::zset::index_of_score_record(sub, v)?;
                        index.insert(Bytes::from(k), ());
                    }
                }
            }
            self.index = Some(index);
        }
        Ok(self.index.get_or_insert_default())
    }

    fn visible_len(&self, kind: u8) -> u64 {
        let Some(c) = self.state.colls.get(&kind) else {
            return 0;
        };
        if kind == LIST {
            return (c.tail - c.head).max(0) as u64;
        }
        c.entries.values().filter(|e| e.visible(kind)).count() as u64
    }
}

/// Refuses a write whose records would exceed the value limit: an element (its encoded
/// versions), or a list (one record), before anything is replicated.
fn check_record_sizes(key: &[u8], delta: &Composite, value_bytes_max: usize) -> Result<()> {
    let too_big = |what: &str, n: usize| {
        Error::Command(format!(
            "ERR ap {what} of '{}' would take {n} bytes, more than the value limit of {value_bytes_max}; nothing was written",
            String::from_utf8_lossy(key)
        ))
    };
    for (kind, c) in &delta.colls {
        if *kind == LIST {
            let n = postcard::to_stdvec(c)
                .map(|b| b.len())
                .unwrap_or(usize::MAX);
            if n > value_bytes_max {
                return Err(too_big("list (a list is one record)", n));
            }
            continue;
        }
        for (sub, e) in &c.entries {
            let n = sub.len() + e.value.as_ref().map_or(0, |v| v.len());
            if n > value_bytes_max {
                return Err(too_big("collection element", n));
            }
        }
    }
    Ok(())
}

impl Space for View {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        let now_ms = self.now_ms;
        let ks = self.key(key)?;
        match ks.state.visible(now_ms) {
            Visible::Absent => Ok(None),
            Visible::Base(b) => Ok(Some(capdb_types::merge::render(b)?)),
            Visible::Coll(kind) => {
                let k = kind as u8;
                ks.kind = k;
                let c = ks.state.colls.get(&k).ok_or_else(|| {
                    Error::Corruption("ap collection visible without its elements".into())
                })?;
                let meta = CollMeta {
                    id: ks.id,
                    len: ks.visible_len(k),
                    head: c.head,
                    tail: c.tail,
                    big: c.is_big(),
                    field_expiry: false,
                };
                Ok(Some(Value::of_kind(kind, meta.encode(), c.top(), c.ttl.2)))
            }
        }
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        let (me, t_write, now_ms) = (self.me, self.t_write, self.now_ms);
        if value.is_string() {
            let ks = self.key(key)?;
            let mut v = value;
            v.header.timestamp = t_write;
            // A second write of the key by this command replaces its first (MSETNX k a k b),
            // which a merge of two versions with one timestamp would not.
            let merged = match ks.state.base() {
                Some(b) if !ks.base_written => capdb_types::merge::merge(&b, &v),
                _ => v,
            };
            ks.state.base = Some(Bytes::from(merged.encode()));
            ks.state.prune();
            ks.base_written = true;
            ks.touched.clear();
            ks.index = None;
            return Ok(());
        }
        let meta = CollMeta::decode(&value.data)?;
        if meta.field_expiry {
            // Field expiry changes how every field's value is stored and keeps an expiry index:
            // neither survives merging fields one by one. The command fails before anything is
            // replicated.
            return Err(Error::Command(
                "ERR hash field expiry (HEXPIRE and its variants) is not available on ap keyspaces; use a cp or cache keyspace".into(),
            ));
        }
        let kind = value.header.kind as u8;
        let (visible, id) = {
            let ks = self.key(key)?;
            (ks.state.visible(now_ms), ks.id)
        };
        // A new collection was announced by `creating` (which deleted what it replaces).
        let same = matches!(visible, Visible::Coll(k) if k as u8 == kind) && meta.id == id;
        let ks = self.key(key)?;
        ks.id = meta.id;
        ks.kind = kind;
        let c = ks.state.colls.entry(kind).or_default();
        let mut changed = !same;
        if c.ttl.2 != value.header.expire_at_ms {
            c.ttl = (t_write, me, value.header.expire_at_ms);
            changed = true;
        }
        if meta.big && !c.is_big() {
            c.big = t_write;
            changed = true;
        }
        if kind == LIST && (c.head, c.tail) != (meta.head, meta.tail) {
            c.head = meta.head;
            c.tail = meta.tail;
            changed = true;
        }
        // A list stored again unchanged (LTRIM keeping every element) is still a write Redis
        // signals (a WATCH aborts): the list register is rewritten.
        if changed || kind == LIST {
            ks.touch_registers(kind, me, t_write);
        }
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        let now_ms = self.now_ms;
        let ks = self.key(key)?;
        match ks.state.visible(now_ms) {
            // Emptied element by element (or never there): the element removals say it all.
            Visible::Absent => Ok(()),
            _ => self.reset(key),
        }
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        // Copies every visible element.
        self.need(from, None)?;
        self.need(to, None)?;
        let (me, t_write, now_ms) = (self.me, self.t_write, self.now_ms);
        let src = {
            let ks = self.key(from)?;
            (ks.state.visible(now_ms), ks.state.clone(), ks.id)
        };
        match src.0 {
            Visible::Absent => return Ok(()),
            Visible::Base(b) => {
                self.reset(to)?;
                self.put(to, capdb_types::merge::render(b)?)?;
            }
            Visible::Coll(kind) => {
                let k = kind as u8;
                self.reset(to)?;
                let Some(from_coll) = src.1.colls.get(&k) else {
                    return Ok(());
                };
                let ks = self.key(to)?;
                ks.id = src.2;
                ks.kind = k;
                let mut c = CollState {
                    ttl: (t_write, me, from_coll.ttl.2),
                    created: t_write,
                    big: if from_coll.is_big() {
                        t_write
                    } else {
                        Timestamp::ZERO
                    },
                    head: from_coll.head,
                    tail: from_coll.tail,
                    ..CollState::default()
                };
                let mut subs = BTreeSet::new();
                for (sub, e) in &from_coll.entries {
                    if !e.visible(k) {
                        continue;
                    }
                    let mut copy = capdb_types::composite::Entry {
                        ts: t_write,
                        origin: me,
                        value: e.value.clone(),
                        ..Default::default()
                    };
                    if k == SET {
                        copy.adds.insert(me, t_write);
                    }
                    c.entries.insert(sub.clone(), copy);
                    subs.insert(sub.clone());
                }
                ks.state.colls.insert(k, c);
                ks.touched.insert(k, subs);
                ks.touch_registers(k, me, t_write);
            }
        }
        self.reset(from)
    }

    fn creating(&mut self, key: &[u8], kind: ValueKind) -> Result<()> {
        let now_ms = self.now_ms;
        let ks = self.key(key)?;
        let visible = ks.state.visible(now_ms);
        // Replacing a live key (a store command's destination) or elements still there but
        // hidden (an expired collection, the loser of a type conflict) deletes them first.
        // After a collection emptied element by element nothing needs hiding, and no delete
        // may hide adds made concurrently elsewhere.
        let hidden = ks.state.colls.iter().any(|(k, c)| c.any_visible(*k));
        if !matches!(visible, Visible::Absent) || hidden {
            self.reset(key)?;
        }
        let (me, t_write) = (self.me, self.t_write);
        let ks = self.key(key)?;
        ks.kind = kind as u8;
        // A new incarnation starts compact, whatever the last one's encoding was.
        ks.state.colls.entry(kind as u8).or_default().created = t_write;
        ks.touch_registers(kind as u8, me, t_write);
        Ok(())
    }

    fn new_id(&mut self) -> Result<u64> {
        self.next_id += 1;
        Ok(self.next_id)
    }

    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        let kind = self.key(&c.key)?.kind;
        let index_sub = kind == ZSET && capdb_data::zset::is_index_sub(sub);
        self.need(&c.key, (!index_sub).then_some(sub))?;
        let ks = self.key(&c.key)?;
        if index_sub {
            return Ok(ks.index()?.contains_key(sub).then(Bytes::new));
        }
        let Some(e) = ks.state.colls.get(&kind).and_then(|c| c.entries.get(sub)) else {
            return Ok(None);
        };
        if !e.visible(kind) {
            return Ok(None);
        }
        Ok(Some(if kind == SET {
            Bytes::new()
        } else {
            e.value.clone().unwrap_or_default()
        }))
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        let (me, t_write) = (self.me, self.t_write);
        let ks = self.key(&c.key)?;
        let kind = ks.kind;
        if kind == ZSET && capdb_data::zset::is_index_sub(sub) {
            ks.index()?.insert(Bytes::copy_from_slice(sub), ());
            return Ok(());
        }
        self.learn(&c.key, sub);
        let ks = self.key(&c.key)?;
        let e = ks
            .state
            .colls
            .entry(kind)
            .or_default()
            .entries
            .entry(Bytes::copy_from_slice(sub))
            .or_default();
        e.ts = t_write;
        e.origin = me;
        e.value = Some(Bytes::copy_from_slice(value));
        if kind == SET {
            e.adds.insert(me, t_write);
        }
        ks.touch(sub, me, t_write);
        Ok(())
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        let (me, t_write) = (self.me, self.t_write);
        let ks = self.key(&c.key)?;
        let kind = ks.kind;
        if kind == ZSET && capdb_data::zset::is_index_sub(sub) {
            ks.index()?.remove(sub);
            return Ok(());
        }
        // Removing an element this command never read is a write of what it did not see
        // (observed-remove sets need the adds it removes).
        self.need(&c.key, Some(sub))?;
        let ks = self.key(&c.key)?;
        let Some(coll) = ks.state.colls.get_mut(&kind) else {
            return Ok(());
        };
        if kind == LIST {
            coll.entries.remove(sub);
        } else {
            let Some(e) = coll.entries.get_mut(sub) else {
                return Ok(());
            };
            if kind == SET {
                // Observed-remove: exactly the adds this coordinator saw.
                let adds = e.adds.clone();
                for (node, added) in adds {
                    let r = e.removes.entry(node).or_insert(added);
                    *r = (*r).max(added);
                }
            } else {
                e.ts = t_write;
                e.origin = me;
                e.value = None;
            }
        }
        ks.touch(sub, me, t_write);
        Ok(())
    }

    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        self.need(&c.key, None)?;
        let ks = self.key(&c.key)?;
        let kind = ks.kind;
        let mut out: Vec<(Bytes, Bytes)> = Vec::new();
        if let Some(coll) = ks.state.colls.get(&kind) {
            for (sub, e) in coll.entries.range::<[u8], _>((range.lo, range.hi)) {
                if e.visible(kind) {
                    let v = if kind == SET {
                        Bytes::new()
                    } else {
                        e.value.clone().unwrap_or_default()
                    };
                    out.push((sub.clone(), v));
                }
            }
        }
        if kind == ZSET {
            // Index records sort after every score record (their tag is larger).
            for (sub, ()) in ks.index()?.range::<[u8], _>((range.lo, range.hi)) {
                debug_assert!(range.contains(sub));
                out.push((sub.clone(), Bytes::new()));
            }
        }
        if range.rev {
            out.reverse();
        }
        out.truncate(range.limit);
        Ok(out)
    }
}
