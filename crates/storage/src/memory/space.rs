//! Data-type commands on the cache: the [`Space`] of the shards a command locked.
//!
//! A collection's elements live with its entry ([`Elements`]: an ordered map from subkey to
//! value, keyed exactly as the disk engine keys them, so both engines run the same family code
//! with the same orders). Elements of a collection a command creates are held aside until the
//! command stores its meta record ([`Space::put`] attaches them). Memory accounting counts every
//! element's subkey, value and [`ELEMENT_OVERHEAD_BYTES`], so collections take part in the byte
//! limit and eviction like strings do.
//!
//! Dropping a collection with more than [`RECLAIM_INLINE_MAX`] elements hands it to a reclaim
//! thread (Redis's lazyfree): freeing ten million elements must not stall the shard's clients.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_data::meta::CollMeta;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Error, Result, Value};

use super::{Entry, Key, MemStore, Shard};

/// Accounted bytes per element on top of its subkey and value (tree node share, allocations).
pub const ELEMENT_OVERHEAD_BYTES: u64 = 48;
/// Collections up to this many elements are freed inline; bigger ones on the reclaim thread.
pub const RECLAIM_INLINE_MAX: usize = 64;
/// Collections waiting for the reclaim thread; when full, a drop happens inline.
pub const RECLAIM_QUEUE_MAX: usize = 64;

/// An element's subkey, inline up to 32 bytes: a tree search compares keys in the tree's own
/// nodes instead of following a pointer per comparison (hash and set subkeys are 9 bytes plus
/// the member).
type SubKey = smallvec::SmallVec<[u8; 32]>;

/// A collection's elements.
#[derive(Debug)]
pub(crate) struct Elements {
    pub(crate) id: u64,
    pub(crate) map: BTreeMap<SubKey, Bytes>,
    /// Accounted bytes of all elements.
    pub(crate) bytes: u64,
}

impl Elements {
    fn new(id: u64) -> Elements {
        Elements {
            id,
            map: BTreeMap::new(),
            bytes: 0,
        }
    }
}

fn element_bytes(sub: &[u8], value: &[u8]) -> u64 {
    sub.len() as u64 + value.len() as u64 + ELEMENT_OVERHEAD_BYTES
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
    pub(super) pending: HashMap<u64, Elements>,
}

impl MemSpace<'_, '_> {
    fn shard(&mut self, key: &[u8]) -> Result<&mut Shard> {
        let i = self.store.shard_of(key);
        match self.guards.binary_search_by_key(&i, |(s, _)| *s) {
            Ok(slot) => Ok(&mut self.guards[slot].1),
            Err(_) => Err(Error::Io(
                "a command touched a key it did not declare (an engine bug)".into(),
            )),
        }
    }

    /// The elements of `c`: its entry's when stored, else the pending ones (created on demand
    /// when `create`).
    fn elements(&mut self, c: &Coll, create: bool) -> Result<Option<&mut Elements>> {
        let now = self.now_ms;
        let store = self.store;
        let shard = self.shard(&c.key)?;
        let attached = store
            .live_index(shard, &c.key, now)
            .is_some_and(|i| shard.map[i].elements.as_ref().is_some_and(|e| e.id == c.id));
        if attached {
            let shard = self.shard(&c.key)?;
            let e = shard
                .map
                .get_mut(&c.key[..])
                .and_then(|e| e.elements.as_deref_mut());
            return Ok(e);
        }
        if create {
            return Ok(Some(
                self.pending
                    .entry(c.id)
                    .or_insert_with(|| Elements::new(c.id)),
            ));
        }
        Ok(self.pending.get_mut(&c.id))
    }

    fn is_attached(&mut self, c: &Coll) -> Result<bool> {
        let shard = self.shard(&c.key)?;
        Ok(shard
            .map
            .get(&c.key[..])
            .and_then(|e| e.elements.as_ref())
            .is_some_and(|e| e.id == c.id))
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
        let attach = new_id.and_then(|id| self.pending.remove(&id));
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
                store.used_bytes.fetch_sub(old.bytes, Ordering::Relaxed);
                reclaim(old);
            }
        }
        store.put_locked(shard, index, key, value, now);
        if let Some(elements) = attach {
            let entry = shard
                .map
                .get_mut(key)
                .ok_or_else(|| Error::Io("entry vanished after put (an engine bug)".into()))?;
            store
                .used_bytes
                .fetch_add(elements.bytes, Ordering::Relaxed);
            if let Some(old) = entry.elements.replace(Box::new(elements)) {
                store.used_bytes.fetch_sub(old.bytes, Ordering::Relaxed);
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
            .and_then(|e| e.map.get(sub).cloned()))
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.el_insert(c, sub, value).map(|_| ())
    }

    fn el_insert(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<bool> {
        let attached = self.is_attached(c)?;
        let store = self.store;
        let e = self
            .elements(c, true)?
            .ok_or_else(|| Error::Io("no elements after create (an engine bug)".into()))?;
        let added = element_bytes(sub, value);
        let old = e
            .map
            .insert(SubKey::from_slice(sub), Bytes::copy_from_slice(value));
        let removed = old.as_ref().map_or(0, |old| element_bytes(sub, old));
        e.bytes = e.bytes + added - removed;
        if attached {
            store.used_bytes.fetch_add(added, Ordering::Relaxed);
            store.used_bytes.fetch_sub(removed, Ordering::Relaxed);
        }
        Ok(old.is_none())
    }

    fn el_delete(&mut self, c: &Coll, sub: &[u8]) -> Result<bool> {
        let attached = self.is_attached(c)?;
        let store = self.store;
        let Some(e) = self.elements(c, false)? else {
            return Ok(false);
        };
        let Some(old) = e.map.remove(sub) else {
            return Ok(false);
        };
        let freed = element_bytes(sub, &old);
        e.bytes -= freed;
        if attached {
            store.used_bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        Ok(true)
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        let attached = self.is_attached(c)?;
        let store = self.store;
        if let Some(e) = self.elements(c, false)?
            && let Some(old) = e.map.remove(sub)
        {
            let freed = element_bytes(sub, &old);
            e.bytes -= freed;
            if attached {
                store.used_bytes.fetch_sub(freed, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn el_range(&mut self, c: &Coll, r: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        let Some(e) = self.elements(c, false)? else {
            return Ok(Vec::new());
        };
        let empty = match (r.lo, r.hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
            | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
            _ => false,
        };
        if empty {
            return Ok(Vec::new());
        }
        let it = e.map.range::<[u8], _>((r.lo, r.hi));
        let pick = |(k, v): (&SubKey, &Bytes)| (Bytes::copy_from_slice(k), v.clone());
        Ok(if r.rev {
            it.rev().take(r.limit).map(pick).collect()
        } else {
            it.take(r.limit).map(pick).collect()
        })
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
        shard.map.insert(Key::from_slice(to), entry);
        Ok(())
    }
}
