//! Data-type commands on the cache: the [`Space`] of the shards a command locked.
//!
//! A collection's elements live with its entry ([`Elements`]: subkey to value, keyed exactly as
//! the disk engine keys them and answering ranges in the same order, so both engines run the
//! same family code with the same orders; `elements.rs` holds them). Elements of a collection a
//! command creates are held aside until the command stores its meta record ([`Space::put`]
//! attaches them). Memory accounting counts every element's subkey, value and its
//! representation's overhead (`elements.rs`), so collections take part in the byte limit and
//! eviction like strings do.
//!
//! Dropping a collection with more than [`RECLAIM_INLINE_MAX`] elements hands it to a reclaim
//! thread (Redis's lazyfree): freeing ten million elements must not stall the shard's clients.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_data::meta::CollMeta;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Error, Result, Value};

use super::elements::ElementStore;
use super::{Entry, Key, MemStore, Shard};

/// Collections up to this many elements are freed inline; bigger ones on the reclaim thread.
pub const RECLAIM_INLINE_MAX: usize = 64;
/// Collections waiting for the reclaim thread; when full, a drop happens inline.
pub const RECLAIM_QUEUE_MAX: usize = 64;

/// An element's subkey: its bytes (inline up to 32, so a hash field or set member of up to 23
/// bytes needs no allocation of its own), led by its first 16 bytes as one big-endian integer.
///
/// Ordered exactly as the bytes are (the families' orders are byte orders: list positions,
/// hash positions, scores), but a comparison is one integer comparison whenever the first 16
/// bytes differ, which for hashed subkeys (`tag ‖ u64be(hash) ‖ member`), list positions
/// (`tag ‖ u64be(position)`) and score index entries is nearly always. A tree search compares
/// its key with a dozen or more keys; comparing them as byte slices (a `memcmp` call each) was
/// the largest cost of HSET, SADD and LPUSH on big collections.
#[derive(Clone, Debug)]
pub(crate) struct SubKey {
    /// The first 16 bytes, zero-padded.
    head: u128,
    bytes: smallvec::SmallVec<[u8; 32]>,
}

impl SubKey {
    pub(crate) fn new(bytes: &[u8]) -> SubKey {
        let mut head = [0u8; 16];
        let n = bytes.len().min(16);
        head[..n].copy_from_slice(&bytes[..n]);
        SubKey {
            head: u128::from_be_bytes(head),
            bytes: smallvec::SmallVec::from_slice(bytes),
        }
    }
}

impl std::ops::Deref for SubKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::borrow::Borrow<[u8]> for SubKey {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::hash::Hash for SubKey {
    /// As its bytes hash (`Borrow<[u8]>` requires it: tables are probed with byte slices).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes[..].hash(state)
    }
}

impl PartialEq for SubKey {
    fn eq(&self, other: &SubKey) -> bool {
        self.head == other.head && self.bytes == other.bytes
    }
}

impl Eq for SubKey {}

impl PartialOrd for SubKey {
    fn partial_cmp(&self, other: &SubKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SubKey {
    /// The byte order (as `Borrow<[u8]>` requires). Where the zero-padded heads differ, the
    /// first differing byte is either a real difference of both keys, or a nonzero byte of the
    /// longer key where the shorter one has ended (the shorter is then a prefix, so smaller):
    /// either way the heads order the keys as their bytes do. Equal heads: compare the bytes.
    fn cmp(&self, other: &SubKey) -> std::cmp::Ordering {
        self.head
            .cmp(&other.head)
            .then_with(|| self.bytes[..].cmp(&other.bytes[..]))
    }
}

/// A collection's elements.
#[derive(Debug)]
pub(crate) struct Elements {
    pub(crate) id: u64,
    pub(crate) map: ElementStore,
}

impl Elements {
    /// Accounted bytes of all elements.
    pub(crate) fn bytes(&self) -> u64 {
        self.map.bytes()
    }

    fn new(id: u64) -> Elements {
        Elements {
            id,
            map: ElementStore::new(),
        }
    }
}

/// Frees a collection, on the reclaim thread when it is big.
pub(crate) fn reclaim(elements: Box<Elements>) {
    if elements.map.len() <= RECLAIM_INLINE_MAX {
        return;
    }
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Box<Elements>>>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<Elements>>(RECLAIM_QUEUE_MAX);
        std::thread::Builder::new()
            .name("capdb-reclaim".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = queue {
        // Full or gone: drop here, which is only slower.
        let _ = tx.try_send(elements);
    }
}

/// The shards one command locked, as a [`Space`].
pub(super) struct MemSpace<'a, 'g> {
    pub(super) store: &'a MemStore,
    /// Sorted by shard index.
    pub(super) guards: &'a mut [(usize, MutexGuard<'g, Shard>)],
    pub(super) now_ms: u64,
    /// Elements of collections created by this command and not yet stored.
    pub(super) pending: Vec<Elements>,
}

impl MemSpace<'_, '_> {
    fn shard(&mut self, key: &[u8]) -> Result<&mut Shard> {
        shard_in(self.store, self.guards, key)
    }

    /// The elements of `c`: its entry's when stored (`attached`: their bytes count in the
    /// store's total), else the pending ones (created on demand when `create`). One lookup of
    /// the key: this runs for every element a command touches.
    fn elements(&mut self, c: &Coll, create: bool) -> Result<Option<(&mut Elements, bool)>> {
        let (store, now) = (self.store, self.now_ms);
        let shard = shard_in(store, self.guards, &c.key)?;
        if let Some(i) = store.live_index(shard, &c.key, now)
            && let Some(e) = shard.map[i].elements.as_deref_mut()
            && e.id == c.id
        {
            return Ok(Some((e, true)));
        }
        let pending = &mut self.pending;
        let at = match pending.iter().position(|e| e.id == c.id) {
            Some(at) => at,
            None if create => {
                pending.push(Elements::new(c.id));
                pending.len() - 1
            }
            None => return Ok(None),
        };
        Ok(Some((&mut pending[at], false)))
    }
    /// `pick` of each element of `c` in `r`, in the range's order.
    fn walk_range<T>(
        &mut self,
        c: &Coll,
        r: ElRange<'_>,
        pick: impl FnMut(&[u8], &Bytes) -> T,
    ) -> Result<Vec<T>> {
        let Some((e, _)) = self.elements(c, false)? else {
            return Ok(Vec::new());
        };
        let alone = |sub: &[u8]| c.is_order_only(sub);
        Ok(e.map.range(r.lo, r.hi, r.rev, r.limit, alone, pick))
    }
}

/// The locked shard of `key` among `guards` (sorted by shard index).
fn shard_in<'s, 'g>(
    store: &MemStore,
    guards: &'s mut [(usize, MutexGuard<'g, Shard>)],
    key: &[u8],
) -> Result<&'s mut Shard> {
    let i = store.shard_of(key);
    match guards.binary_search_by_key(&i, |(s, _)| *s) {
        Ok(slot) => Ok(&mut guards[slot].1),
        Err(_) => Err(Error::Io(
            "a command touched a key it did not declare (an engine bug)".into(),
        )),
    }
}

impl Space for MemSpace<'_, '_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        let (store, now) = (self.store, self.now_ms);
        let shard = self.shard(key)?;
        Ok(store.live_index(shard, key, now).map(|i| {
            let e = &mut shard.map[i];
            store.touch(e, now);
            e.value.clone()
        }))
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        let (store, now) = (self.store, self.now_ms);
        let new_id = CollMeta::of(&value)?.map(|m| m.id);
        let attach = new_id
            .and_then(|id| self.pending.iter().position(|e| e.id == id))
            .map(|at| self.pending.swap_remove(at));
        let shard = self.shard(key)?;
        let index = store.live_index(shard, key, now);
        if let Some(i) = index {
            let entry = &mut shard.map[i];
            if entry
                .elements
                .as_ref()
                .is_some_and(|e| Some(e.id) != new_id)
                && let Some(old) = entry.elements.take()
            {
                store.used_bytes.fetch_sub(old.bytes(), Ordering::Relaxed);
                reclaim(old);
            }
        }
        let at = store.put_locked(shard, index, key, value, now);
        if let Some(elements) = attach {
            let (_, entry) = shard
                .map
                .get_index_mut(at)
                .ok_or_else(|| Error::Io("entry vanished after put (an engine bug)".into()))?;
            store
                .used_bytes
                .fetch_add(elements.bytes(), Ordering::Relaxed);
            if let Some(old) = entry.elements.replace(Box::new(elements)) {
                store.used_bytes.fetch_sub(old.bytes(), Ordering::Relaxed);
                reclaim(old);
            }
        }
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        let (store, now) = (self.store, self.now_ms);
        let shard = self.shard(key)?;
        if let Some(i) = store.live_index(shard, key, now) {
            store.remove_at(shard, i);
        }
        Ok(())
    }

    fn new_id(&mut self) -> Result<u64> {
        Ok(self
            .store
            .next_collection_id
            .fetch_add(1, Ordering::Relaxed))
    }

    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .elements(c, false)?
            .and_then(|(e, _)| e.map.get(sub, c.is_order_only(sub)).cloned()))
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.el_insert(c, sub, value).map(|_| ())
    }

    fn el_insert(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<bool> {
        let store = self.store;
        let alone = c.is_order_only(sub);
        if alone && !value.is_empty() {
            return Err(Error::Io(
                "an order-only element written with a value (a data-type bug)".into(),
            ));
        }
        let (e, attached) = self
            .elements(c, true)?
            .ok_or_else(|| Error::Io("no elements after create (an engine bug)".into()))?;
        let before = e.bytes();
        let old = e.map.insert(sub, Bytes::copy_from_slice(value), alone);
        let new = old.is_none();
        if attached {
            store.used_bytes.fetch_add(e.bytes(), Ordering::Relaxed);
            store.used_bytes.fetch_sub(before, Ordering::Relaxed);
            // A new element changes the key; a rewritten one changes it when the command
            // stores the collection's record after it, as Redis signals (SADD of a present
            // member changes nothing). A new collection's elements count when it is stored.
            if new {
                store.changed(shard_in(store, self.guards, &c.key)?, &c.key);
            }
        }
        Ok(new)
    }

    fn el_delete(&mut self, c: &Coll, sub: &[u8]) -> Result<bool> {
        let store = self.store;
        let Some((e, attached)) = self.elements(c, false)? else {
            return Ok(false);
        };
        let before = e.bytes();
        if e.map.remove(sub, c.is_order_only(sub)).is_none() {
            return Ok(false);
        }
        if attached {
            // A removal may turn a run into a map, which accounts more.
            store.used_bytes.fetch_add(e.bytes(), Ordering::Relaxed);
            store.used_bytes.fetch_sub(before, Ordering::Relaxed);
            store.changed(shard_in(store, self.guards, &c.key)?, &c.key);
        }
        Ok(true)
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        self.el_delete(c, sub).map(|_| ())
    }

    fn el_range(&mut self, c: &Coll, r: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        let pick = |k: &[u8], v: &Bytes| (Bytes::copy_from_slice(k), v.clone());
        self.walk_range(c, r, pick)
    }

    fn el_values(&mut self, c: &Coll, r: ElRange<'_>) -> Result<Vec<Bytes>> {
        self.walk_range(c, r, |_, v| v.clone())
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        let (store, now) = (self.store, self.now_ms);
        let shard = self.shard(from)?;
        let Some(i) = store.live_index(shard, from, now) else {
            return Ok(());
        };
        // Take the entry out whole (elements included), without freeing anything.
        let (_, entry) = shard
            .map
            .swap_remove_index(i)
            .ok_or_else(|| Error::Io("entry vanished (an engine bug)".into()))?;
        if entry.value.header.expire_at_ms.is_some() {
            shard.expiring.swap_remove(from);
        }
        store.changed(shard, from);
        let moved_bytes = store.entry_total(from, &entry);
        store.used_bytes.fetch_sub(moved_bytes, Ordering::Relaxed);
        let shard = self.shard(to)?;
        if let Some(j) = store.live_index(shard, to, now) {
            store.remove_at(shard, j);
        }
        let entry = Entry {
            value: entry.value,
            accessed_ms: entry.accessed_ms,
            frequency: entry.frequency,
            elements: entry.elements,
        };
        if entry.value.header.expire_at_ms.is_some() {
            shard.expiring.insert(Key::from_slice(to));
        }
        store
            .used_bytes
            .fetch_add(store.entry_total(to, &entry), Ordering::Relaxed);
        store.changed(shard, to);
        shard.map.insert(Key::from_slice(to), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subkeys_order_exactly_as_their_bytes() {
        // Edge cases of the zero-padded head: prefixes, trailing zeros, keys of 16 and 17
        // bytes, differences after the head.
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1],
            vec![1, 0],
            vec![1, 0, 0, 5],
            vec![0xff; 16],
            vec![0xff; 17],
            [vec![7; 16], vec![0]].concat(),
            [vec![7; 16], vec![1]].concat(),
            [vec![7; 16], vec![1, 2, 3]].concat(),
            vec![7; 16],
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let len = rng.usize(0..40);
            // Few distinct byte values, so many keys share long prefixes.
            keys.push((0..len).map(|_| rng.u8(0..3)).collect());
        }
        for a in &keys {
            for b in &keys {
                let (x, y) = (SubKey::new(a), SubKey::new(b));
                assert_eq!(x.cmp(&y), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(x == y, a == b);
            }
        }
        let mut map = std::collections::BTreeMap::new();
        for k in &keys {
            map.insert(SubKey::new(k), Bytes::new());
        }
        for k in &keys {
            assert!(map.contains_key(&SubKey::new(k)));
            assert!(map.contains_key(&k[..]));
        }
        let lo: &[u8] = &[1];
        let hi: &[u8] = &[2];
        let ranged: Vec<&[u8]> = map
            .range::<[u8], _>((std::ops::Bound::Included(lo), std::ops::Bound::Excluded(hi)))
            .map(|(k, _)| &k[..])
            .collect();
        let mut want: Vec<&[u8]> = keys
            .iter()
            .map(|k| &k[..])
            .filter(|k| *k >= lo && *k < hi)
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(ranged, want);
    }
}
