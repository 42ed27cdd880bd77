//! The `cache` keyspace store: in memory, Redis expiry, sampled LRU/LFU eviction.
//!
//! # Design
//!
//! Keys are spread over [`SHARDS`] mutex-protected shards by hash, so connections on different
//! cores rarely contend. Each shard is an `IndexMap` (hash map with dense indices), which gives
//! O(1) lookup *and* O(1) uniform random sampling — exactly what Redis's approximated eviction
//! and active expiry need — plus an `IndexSet` of the keys that carry a TTL.
//!
//! - **Lazy expiry**: a read or write that meets an expired key removes it first.
//! - **Active expiry** ([`MemStore::expire_cycle`], run every 100 ms by the server): Redis's
//!   algorithm: sample [`EXPIRE_SAMPLE`] keys with a TTL per shard, delete the expired ones, and
//!   repeat while more than a quarter of the sample had expired, within a time budget.
//! - **Eviction**: memory use is accounted as key + value + [`ENTRY_OVERHEAD_BYTES`] per entry.
//!   After a write that leaves the keyspace above its limit, entries are evicted until it is
//!   under: each eviction samples [`EVICTION_SAMPLE`] random entries and drops the least recently
//!   used (LRU) or least frequently used (LFU, Redis's logarithmic counter with decay). A single
//!   entry larger than the whole limit is refused with `OOM`.
//!
//! Why not `moka`/`quick_cache`: Redis semantics need per-key absolute expiry that `EXPIRE`,
//! `PERSIST` and `KEEPTTL` can change, expiry that is visible to `TTL`, and eviction by a byte
//! budget shared by the whole keyspace; both crates own expiry and eviction internally and expose
//! neither sampling nor TTL edits, so the semantics would have to be rebuilt around them anyway.
//!
//! Multi-key mutations (MSET, SMOVE, SINTERSTORE, ...) lock the shards they touch in index order,
//! so they are atomic to readers and cannot deadlock.
//!
//! Hashes, lists, sets and sorted sets keep their elements with their entry (`space.rs`), and run
//! the same `capdb-data` family code as the disk engine.

mod chunked;
mod elements;
pub mod ring;
mod space;
pub mod stream;
mod watch;

pub use watch::TOUCHED_PER_SHARD_MAX;

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_types::{Effect, Error, EvictionPolicy, Hlc, Mutation, Reply, Result, Value};
use indexmap::{IndexMap, IndexSet};

use crate::{BatchReplies, KeyspaceStore, ScanPage, ScanRange};

/// Number of shards; a power of two.
pub const SHARDS: usize = 64;
/// Accounted bytes per entry on top of key and value (map slot, header, allocation overhead).
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;
/// Entries sampled per eviction (Redis `maxmemory-samples` default).
pub const EVICTION_SAMPLE: usize = 5;
/// Most evictions performed after one write; if still over the limit the next write continues.
pub const EVICTIONS_PER_WRITE_MAX: usize = 1_024;
/// Keys with a TTL sampled per shard per active-expiry round (Redis `ACTIVE_EXPIRE_CYCLE_KEYS_PER_LOOP`).
pub const EXPIRE_SAMPLE: usize = 20;
/// Time budget of one active-expiry cycle.
pub const EXPIRE_CYCLE_BUDGET: Duration = Duration::from_millis(25);

const _: () = assert!(SHARDS.is_power_of_two());

/// LFU counter start and logarithmic factor (Redis `LFU_INIT_VAL`, `lfu-log-factor`).
const LFU_INIT: u8 = 5;
const LFU_LOG_FACTOR: u32 = 10;
/// Minutes of idleness that take one from the LFU counter (Redis `lfu-decay-time`).
const LFU_DECAY_MINUTES: u32 = 1;

/// Hasher of the per-shard maps (randomly seeded per map).
type Hasher = foldhash::fast::RandomState;

/// The shards one batch touches, and their locks (inline up to a pipeline's worth: a batch
/// of writes to a few keys allocates nothing for its locking).
type ShardList = smallvec::SmallVec<[usize; 16]>;
type Guards<'a> = smallvec::SmallVec<[(usize, MutexGuard<'a, Shard>); 4]>;

struct Entry {
    value: Value,
    /// Unix milliseconds of the last access, truncated to 32 bits (LRU) — wraps every ~49 days,
    /// always compared with wrapping arithmetic.
    accessed_ms: u32,
    /// Logarithmic access frequency (LFU).
    frequency: u8,
    /// A collection's elements (hash fields, list items, set and sorted-set members).
    elements: Option<Box<space::Elements>>,
}

/// Keys up to 32 bytes are stored inline in the map's entry, saving one cache miss per lookup
/// (lookups are memory-latency bound: hash slot, entry, key bytes, value bytes).
type Key = smallvec::SmallVec<[u8; 32]>;

#[derive(Default)]
struct Shard {
    map: IndexMap<Key, Entry, Hasher>,
    expiring: IndexSet<Key, Hasher>,
    /// Which keys changed when, while anyone watches (`watch.rs`).
    changes: watch::ChangeLog,
    /// The keys changed by the mutation being applied, while the change ring is on (taken
    /// by `apply_locked` to make the ring's events).
    ring_touched: Option<Vec<Key>>,
}

/// Keys removed by expiry or eviction, kept for the server to drain (its `expired` and
/// `evicted` keyspace events) only while it asks for them ([`MemStore::notice_removals`]). At
/// most [`REMOVAL_NOTICES_MAX`] wait; beyond that the newest are dropped (events are
/// at-most-once, as pub/sub is).
#[derive(Debug, Default)]
struct RemovalNotices {
    on: std::sync::atomic::AtomicBool,
    queue: Mutex<Vec<(Bytes, Removal)>>,
}

/// Removal notices waiting to be drained, at most.
pub const REMOVAL_NOTICES_MAX: usize = 16_384;

/// Why a key left the cache by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Expired,
    Evicted,
}

/// Counters exposed as metrics.
#[derive(Debug, Default)]
pub struct MemStats {
    pub evicted_keys: AtomicU64,
    pub expired_keys: AtomicU64,
}

pub struct MemStore {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard. Seeded independently of the maps' hashers: if both used the same
    /// hash, every key of a shard would share the bits that pick the shard, and the map would
    /// crowd them into a fraction of its buckets.
    shard_hasher: foldhash::fast::FixedState,
    used_bytes: AtomicU64,
    /// The limit and policy: set at creation, changed at run time by `CONFIG SET` on this node.
    max_bytes: AtomicU64,
    /// 0: LRU, 1: LFU.
    policy: std::sync::atomic::AtomicU8,
    hlc: std::sync::Arc<Hlc>,
    value_bytes_max: usize,
    stats: MemStats,
    /// Ids of collections created here (never reused; not replicated: the cache is per node).
    next_collection_id: AtomicU64,
    removals: RemovalNotices,
    /// Watches alive ([`WatchTicket`]s): changes are recorded only while there are any.
    watchers: std::sync::atomic::AtomicUsize,
    /// The keyspace's change stream on this node, while on (`ring.rs`).
    ring: ring::ChangeRing,
    /// This copy's replication stream, if it keeps one ([`MemStore::keep_stream`]): every run
    /// of commands applied appends an entry, under the locks of the shards it touched.
    stream: std::sync::OnceLock<Mutex<stream::Backlog<std::sync::Arc<stream::CacheEntry>>>>,
    /// A replica copy ([`MemStore::set_replica`]): it removes nothing by itself (no expiry, no
    /// eviction: an expired key is hidden until the primary's removal arrives), so that it holds
    /// exactly what the stream gives it.
    replica: std::sync::atomic::AtomicBool,
}

/// What one mutation drew when it applied: its timestamp and (data-type commands) its seed.
/// Drawn by the primary, carried in the stream, given back on replay.
type Stamp = (capdb_types::Timestamp, u64);

/// A key watched on a cache keyspace (WATCH): where its shard's change count stood. Changes
/// are recorded while it lives; dropping it (EXEC, DISCARD, UNWATCH, disconnect) ends that.
pub struct WatchTicket {
    store: std::sync::Arc<MemStore>,
    key: Bytes,
    mark: u64,
}

impl WatchTicket {
    pub fn key(&self) -> &Bytes {
        &self.key
    }
}

impl Drop for WatchTicket {
    fn drop(&mut self) {
        self.store.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn policy_code(p: EvictionPolicy) -> u8 {
    match p {
        EvictionPolicy::Lru => 0,
        EvictionPolicy::Lfu => 1,
    }
}

fn entry_bytes(key: &[u8], value: &Value) -> u64 {
    key.len() as u64 + value.data.len() as u64 + ENTRY_OVERHEAD_BYTES
}

impl MemStore {
    pub fn new(
        max_bytes: u64,
        policy: EvictionPolicy,
        hlc: std::sync::Arc<Hlc>,
        value_bytes_max: usize,
    ) -> MemStore {
        assert!(max_bytes > 0, "a cache needs a memory limit");
        MemStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_hasher: foldhash::fast::FixedState::with_seed(0x5eed_cafe_f00d_d00d),
            used_bytes: AtomicU64::new(0),
            max_bytes: AtomicU64::new(max_bytes),
            policy: std::sync::atomic::AtomicU8::new(policy_code(policy)),
            hlc,
            value_bytes_max,
            stats: MemStats::default(),
            next_collection_id: AtomicU64::new(1),
            removals: RemovalNotices::default(),
            watchers: std::sync::atomic::AtomicUsize::new(0),
            ring: ring::ChangeRing::default(),
            stream: std::sync::OnceLock::new(),
            replica: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes this copy a replica (`true`: it removes nothing by itself; expired keys are hidden
    /// until the primary's removal arrives) or a primary again (`false`: a promotion).
    pub fn set_replica(&self, on: bool) {
        self.replica.store(on, Ordering::Release);
    }

    fn is_replica(&self) -> bool {
        self.replica.load(Ordering::Acquire)
    }

    /// Appends an entry of `op` to the stream, if this copy keeps one (its key's shard, or
    /// every shard for a flush, locked by the caller).
    fn record_op(&self, now_ms: u64, op: stream::CacheOp) {
        // A replica's backlog takes the primary's entries only (`apply_replicated`).
        if self.is_replica() {
            return;
        }
        let Some(mut backlog) = self.stream() else {
            return;
        };
        let entry = stream::CacheEntry {
            offset: backlog.last_offset() + 1,
            epoch: backlog.epoch(),
            now_ms,
            op,
        };
        let pushed = backlog.push(std::sync::Arc::new(entry));
        debug_assert!(pushed.is_ok(), "the next offset of the copy's own epoch");
    }

    /// Starts this copy's replication stream at `offset` in `epoch`, keeping a backlog within
    /// `max_bytes` and `max_entries` (`stream.rs`). Once only: `false` if it already keeps one.
    pub fn keep_stream(
        &self,
        epoch: u64,
        offset: u64,
        max_bytes: usize,
        max_entries: usize,
    ) -> bool {
        self.stream
            .set(Mutex::new(stream::Backlog::new(
                epoch,
                offset,
                max_bytes,
                max_entries,
            )))
            .is_ok()
    }

    /// This copy's stream, if it keeps one: its backlog, locked. The store takes this lock
    /// after shard locks: a caller must not call into the store while holding it.
    pub fn stream(
        &self,
    ) -> Option<MutexGuard<'_, stream::Backlog<std::sync::Arc<stream::CacheEntry>>>> {
        let backlog = self.stream.get()?;
        Some(backlog.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What `m` draws to apply now: a timestamp, and a seed if it is a data-type command.
    fn stamp(&self, m: &Mutation, now_ms: u64) -> Stamp {
        let seed = match m {
            Mutation::Exec { .. } => fastrand::u64(..),
            _ => 0,
        };
        (self.hlc.tick(now_ms), seed)
    }

    /// Appends commands applied under the current locks to the stream, if this copy keeps one.
    /// The mutations are copied into exactly sized buffers: they may be slices of a
    /// connection's read buffer, which the backlog must not keep alive.
    fn record(&self, now_ms: u64, mutations: &[&Mutation], sizes: Vec<u32>, stamps: Vec<Stamp>) {
        if self.stream.get().is_none() {
            return;
        }
        let mutations = mutations.iter().map(|m| owned_mutation(m)).collect();
        let op = stream::CacheOp::Commands {
            mutations,
            sizes,
            stamps,
        };
        self.record_op(now_ms, op);
    }

    /// Applies an entry of the primary's stream to this copy (a replica): the same mutations
    /// with what they drew there, in stream order, with no eviction of its own; kept in this
    /// copy's backlog too. Refused, and nothing applied, if it is not the next entry.
    ///
    /// Why replay meets no expired key it should remove: a write never stores a value already
    /// expired at its `now_ms` (`Mutation::apply` removes instead), so a key a primary's command
    /// found expired was expired before the command's run began, and the primary logged its
    /// removal (under the key's lock) before the run's entry.
    pub fn apply_replicated(
        &self,
        entry: std::sync::Arc<stream::CacheEntry>,
    ) -> std::result::Result<(), stream::AppendRefusal> {
        if !self.is_replica() {
            return Err(stream::AppendRefusal::NotReplica);
        }
        if let stream::CacheOp::Commands {
            mutations, stamps, ..
        } = &entry.op
            && mutations.len() != stamps.len()
        {
            return Err(stream::AppendRefusal::Malformed);
        }
        let mut order = ShardList::new();
        match &entry.op {
            stream::CacheOp::Commands { mutations, .. } => {
                for m in mutations {
                    self.push_shards(m, &mut order);
                }
            }
            stream::CacheOp::Remove(keys) => order.extend(keys.iter().map(|k| self.shard_of(k))),
            stream::CacheOp::Flush => order.extend(0..SHARDS),
        }
        order.sort_unstable();
        order.dedup();
        let mut guards: Guards<'_> = order.iter().map(|&i| (i, self.lock(i))).collect();
        {
            let Some(mut backlog) = self.stream() else {
                return Err(stream::AppendRefusal::NoStream);
            };
            backlog.push(entry.clone())?;
        }
        let now_ms = entry.now_ms;
        match &entry.op {
            stream::CacheOp::Commands {
                mutations, stamps, ..
            } => {
                for (m, &stamp) in mutations.iter().zip(stamps) {
                    self.hlc.observe(stamp.0);
                    // Its reply is the primary's to give; a command that failed there fails
                    // here the same way, on the same state.
                    let _ = self.apply_locked(&mut guards, &order, m, now_ms, stamp);
                }
            }
            stream::CacheOp::Remove(keys) => {
                for key in keys {
                    // `order` holds every removed key's shard: it was built from these keys.
                    let Ok(slot) = order.binary_search(&self.shard_of(key)) else {
                        debug_assert!(false, "the shard of a removed key was not locked");
                        continue;
                    };
                    let shard = &mut *guards[slot].1;
                    if let Some(i) = shard.map.get_index_of(&key[..]) {
                        self.remove_at(shard, i);
                    }
                }
            }
            stream::CacheOp::Flush => {
                for (_, shard) in guards.iter_mut() {
                    while let Some(last) = shard.map.len().checked_sub(1) {
                        self.remove_at(shard, last);
                    }
                }
            }
        }
        Ok(())
    }

    /// This node's change stream of the keyspace (`ring.rs`).
    pub fn changes_ring(&self) -> &ring::ChangeRing {
        &self.ring
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    pub fn policy(&self) -> EvictionPolicy {
        match self.policy.load(Ordering::Relaxed) {
            1 => EvictionPolicy::Lfu,
            _ => EvictionPolicy::Lru,
        }
    }

    /// Changes the memory limit and the eviction policy (`CONFIG SET maxmemory`,
    /// `maxmemory-policy`, on this node). A lower limit evicts down to it at once, as Redis does.
    /// Switching policies keeps every entry's access data: LFU starts from the counters the
    /// entries have (reads keep them under LRU too), as Redis reinterprets its `lru` field.
    pub fn set_limits(&self, max_bytes: u64, policy: EvictionPolicy, now_ms: u64) -> Result<()> {
        if max_bytes == 0 {
            return Err(Error::InvalidInput(
                "a cache keyspace needs a memory limit (Redis's 0, no limit, is not available)"
                    .into(),
            ));
        }
        self.policy.store(policy_code(policy), Ordering::Relaxed);
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
        if self.used_bytes.load(Ordering::Relaxed) > max_bytes {
            self.evict_to_limit(now_ms, &HashSet::new());
        }
        Ok(())
    }

    pub fn stats(&self) -> &MemStats {
        &self.stats
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        (self.shard_hasher.hash_one(key) as usize) & (SHARDS - 1)
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave a shard half-updated in a way that
        // breaks memory safety; keep serving rather than poisoning the whole keyspace.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `key` (in the locked `shard`) changed, while anyone watches.
    fn changed(&self, shard: &mut Shard, key: &[u8]) {
        if self.watchers.load(Ordering::Acquire) > 0 {
            shard.changes.record(key);
        }
        if let Some(touched) = shard.ring_touched.as_mut()
            && touched.last().is_none_or(|last| last[..] != *key)
        {
            touched.push(Key::from_slice(key));
        }
    }

    /// Starts watching `key` (WATCH): an expired entry is removed first (a key that expired
    /// before WATCH does not abort EXEC; one that expires after does, as in Redis >= 6.0.9).
    pub fn watch(self: &std::sync::Arc<Self>, key: &Bytes, now_ms: u64) -> WatchTicket {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        let mut shard = self.lock(self.shard_of(key));
        self.live_index(&mut shard, key, now_ms);
        WatchTicket {
            store: self.clone(),
            key: key.clone(),
            mark: shard.changes.mark(),
        }
    }

    /// Accounted bytes of an entry: key, value, overhead and its elements.
    fn entry_total(&self, key: &[u8], entry: &Entry) -> u64 {
        entry_bytes(key, &entry.value) + entry.elements.as_ref().map_or(0, |e| e.bytes())
    }

    /// Removes the entry at `index` of a locked shard, keeping the byte count right.
    fn remove_at(&self, shard: &mut Shard, index: usize) {
        let Some((k, entry)) = shard.map.swap_remove_index(index) else {
            return;
        };
        self.changed(shard, &k);
        if entry.value.header.expire_at_ms.is_some() {
            shard.expiring.swap_remove(&k[..]);
        }
        self.used_bytes
            .fetch_sub(self.entry_total(&k, &entry), Ordering::Relaxed);
        if let Some(elements) = entry.elements {
            space::reclaim(elements);
        }
    }

    /// The index of `key`'s live entry, removing it first if it has expired (lazy expiry).
    /// Starts (or stops) keeping the keys expiry and eviction remove, for [`Self::drain_removals`].
    pub fn notice_removals(&self, on: bool) {
        self.removals.on.store(on, Ordering::Relaxed);
        if !on {
            self.drain_removals();
        }
    }

    /// The keys removed by expiry or eviction since the last call, in order (see
    /// [`RemovalNotices`]).
    pub fn drain_removals(&self) -> Vec<(Bytes, Removal)> {
        let mut q = self
            .removals
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *q)
    }

    fn notice(&self, key: &[u8], why: Removal) {
        // The key's shard is locked: its removal takes its place in the stream among the key's
        // other changes (before the entry of a command that met it expired).
        if self.stream.get().is_some() {
            let op = stream::CacheOp::Remove(vec![Bytes::copy_from_slice(key)]);
            self.record_op(capdb_types::unix_now_ms(), op);
        }
        // The key's shard is locked: its event takes its place among the key's others.
        if self.ring.is_on() {
            let op = match why {
                Removal::Expired => capdb_types::changes::ChangeOp::Expire { prev: None },
                Removal::Evicted => capdb_types::changes::ChangeOp::Evict,
            };
            let event = capdb_types::changes::Event {
                key: Bytes::copy_from_slice(key),
                op,
            };
            self.ring.append(capdb_types::unix_now_ms(), [event]);
        }
        if !self.removals.on.load(Ordering::Relaxed) {
            return;
        }
        let mut q = self
            .removals
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if q.len() < REMOVAL_NOTICES_MAX {
            q.push((Bytes::copy_from_slice(key), why));
        }
    }

    fn live_index(&self, shard: &mut Shard, key: &[u8], now_ms: u64) -> Option<usize> {
        let index = shard.map.get_index_of(key)?;
        if shard.map[index].value.is_expired(now_ms) {
            if self.is_replica() {
                // Hidden, not removed: the primary's removal comes through the stream (before
                // any command of the primary's that met it expired).
                return None;
            }
            self.notice(key, Removal::Expired);
            // Its `expire` event is the removal's; the mutation did not change it (yet).
            let touched = shard.ring_touched.take();
            self.remove_at(shard, index);
            shard.ring_touched = touched;
            self.stats.expired_keys.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(index)
    }

    fn touch(&self, entry: &mut Entry, now_ms: u64) {
        let now = now_ms as u32;
        if self.policy() == EvictionPolicy::Lfu {
            entry.frequency = lfu_decay(entry.frequency, entry.accessed_ms, now);
            entry.frequency = lfu_increment(entry.frequency);
        }
        entry.accessed_ms = now;
    }

    /// Stores `value` under `key`, whose live entry (if any) is at `index`; returns the index
    /// of the entry.
    fn put_locked(
        &self,
        shard: &mut Shard,
        index: Option<usize>,
        key: &[u8],
        value: Value,
        now_ms: u64,
    ) -> usize {
        let meta = capdb_data::meta::CollMeta::of(&value).ok().flatten();
        // Copy into exactly-sized allocations: the caller's buffers may be slices of a large
        // network read buffer that must not be kept alive (and unaccounted) by the cache. A
        // collection's record is not: `CollMeta::encode` made it, exactly sized, for this write.
        let value = match meta {
            Some(_) => value,
            None => Value {
                data: Bytes::copy_from_slice(&value.data),
                ..value
            },
        };
        self.changed(shard, key);
        let added = entry_bytes(key, &value);
        let now = now_ms as u32;
        let expires = value.header.expire_at_ms.is_some();
        match index.filter(|&i| i < shard.map.len()) {
            Some(i) => {
                let entry = &mut shard.map[i];
                let old = entry_bytes(key, &entry.value);
                let had_expiry = entry.value.header.expire_at_ms.is_some();
                // A value that is not the same collection (SET over a hash, ...) drops its
                // elements.
                let keeps = meta.map(|m| m.id);
                if entry.elements.as_ref().is_some_and(|e| Some(e.id) != keeps)
                    && let Some(gone) = entry.elements.take()
                {
                    self.used_bytes.fetch_sub(gone.bytes(), Ordering::Relaxed);
                    space::reclaim(gone);
                }
                entry.value = value;
                self.touch(entry, now_ms);
                self.used_bytes.fetch_add(added, Ordering::Relaxed);
                self.used_bytes.fetch_sub(old, Ordering::Relaxed);
                match (had_expiry, expires) {
                    (false, true) => {
                        shard.expiring.insert(Key::from_slice(key));
                    }
                    (true, false) => {
                        shard.expiring.swap_remove(key);
                    }
                    _ => {}
                }
                i
            }
            None => {
                let key = Key::from_slice(key);
                if expires {
                    shard.expiring.insert(key.clone());
                }
                let (at, _) = shard.map.insert_full(
                    key,
                    Entry {
                        value,
                        accessed_ms: now,
                        frequency: LFU_INIT,
                        elements: None,
                    },
                );
                self.used_bytes.fetch_add(added, Ordering::Relaxed);
                at
            }
        }
    }

    /// Evicts sampled entries until the store is within its limit (bounded per call).
    ///
    /// Keys in `spare` (the ones the batch just wrote) are not sampled while anything else can
    /// go: Redis evicts before it runs a command, so a write it answered is never its own
    /// eviction's victim, and with millisecond access times a whole batch would otherwise tie
    /// with older entries. Only when every remaining entry is spared do spared keys go too.
    fn evict_to_limit(&self, now_ms: u64, spare: &HashSet<&[u8]>) {
        if self.is_replica() {
            // The primary's evictions come through the stream.
            return;
        }
        let mut rng = fastrand::Rng::new();
        let mut evicted = 0;
        let mut sparing = !spare.is_empty();
        while self.used_bytes.load(Ordering::Relaxed) > self.max_bytes()
            && evicted < EVICTIONS_PER_WRITE_MAX
        {
            // Sample from one random non-empty shard per eviction (shards are balanced by hash).
            let start = rng.usize(..SHARDS);
            let victim_found = (0..SHARDS).any(|step| {
                let i = (start + step) & (SHARDS - 1);
                let mut shard = self.lock(i);
                let len = shard.map.len();
                if len == 0 {
                    return false;
                }
                let now = now_ms as u32;
                let spared = |idx: &usize| {
                    sparing
                        && shard
                            .map
                            .get_index(*idx)
                            .is_some_and(|(k, _)| spare.contains(&k[..]))
                };
                // Draw at most a few times the sample size, so a shard full of spared keys
                // costs a bounded number of draws.
                let victim = (0..EVICTION_SAMPLE.min(len) * 4)
                    .map(|_| rng.usize(..len))
                    .filter(|idx| !spared(idx))
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|&idx| {
                        let e = &shard.map[idx];
                        match self.policy() {
                            // Oldest access first: larger idle time = smaller key.
                            EvictionPolicy::Lru => {
                                u64::MAX - now.wrapping_sub(e.accessed_ms) as u64
                            }
                            EvictionPolicy::Lfu => {
                                lfu_decay(e.frequency, e.accessed_ms, now) as u64
                            }
                        }
                    });
                let Some(victim) = victim else {
                    return false;
                };
                if let Some((k, _)) = shard.map.get_index(victim) {
                    self.notice(k, Removal::Evicted);
                }
                self.remove_at(&mut shard, victim);
                true
            });
            if !victim_found {
                if sparing {
                    sparing = false;
                    continue;
                }
                break;
            }
            evicted += 1;
            self.stats.evicted_keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A random live key (RANDOMKEY): a few random probes of random shards, as Redis samples
    /// its dictionary; `None` when the store is empty.
    pub fn random_key(&self, now_ms: u64) -> Option<Bytes> {
        let mut rng = fastrand::Rng::new();
        let start = rng.usize(..SHARDS);
        for step in 0..SHARDS {
            let mut shard = self.lock((start + step) & (SHARDS - 1));
            for _ in 0..8 {
                let len = shard.map.len();
                if len == 0 {
                    break;
                }
                let i = rng.usize(..len);
                if shard.map[i].value.is_expired(now_ms) {
                    if self.is_replica() {
                        continue;
                    }
                    if let Some((k, _)) = shard.map.get_index(i) {
                        self.notice(k, Removal::Expired);
                    }
                    self.remove_at(&mut shard, i);
                    continue;
                }
                let (k, _) = shard.map.get_index(i)?;
                return Some(Bytes::copy_from_slice(k));
            }
        }
        None
    }

    /// One round of active expiry over every shard; returns the number of keys removed.
    pub fn expire_cycle(&self, now_ms: u64) -> u64 {
        if self.is_replica() {
            // The primary's expiry comes through the stream.
            return 0;
        }
        let started = Instant::now();
        let mut rng = fastrand::Rng::new();
        let mut removed = 0;
        for i in 0..SHARDS {
            loop {
                let mut shard = self.lock(i);
                let n = shard.expiring.len();
                if n == 0 {
                    break;
                }
                let sample = EXPIRE_SAMPLE.min(n);
                let mut expired = 0;
                for _ in 0..sample {
                    let len = shard.expiring.len();
                    if len == 0 {
                        break;
                    }
                    let key = shard.expiring[rng.usize(..len)].clone();
                    let index = shard.map.get_index_of(&key[..]);
                    if let Some(i) = index
                        && shard.map[i].value.is_expired(now_ms)
                    {
                        self.notice(&key, Removal::Expired);
                        self.remove_at(&mut shard, i);
                        expired += 1;
                    }
                }
                removed += expired as u64;
                // Redis: keep going on this shard while more than 25% of the sample was expired.
                if expired * 4 <= sample || started.elapsed() > EXPIRE_CYCLE_BUDGET {
                    break;
                }
            }
            if started.elapsed() > EXPIRE_CYCLE_BUDGET {
                break;
            }
        }
        self.stats
            .expired_keys
            .fetch_add(removed, Ordering::Relaxed);
        removed
    }
}

/// `m` with its bytes copied into exactly sized buffers (see [`MemStore::record`]).
fn owned_mutation(m: &Mutation) -> Mutation {
    let own = |b: &Bytes| Bytes::copy_from_slice(b);
    match m {
        Mutation::Set {
            key,
            value,
            condition,
            expiry,
            return_old,
        } => Mutation::Set {
            key: own(key),
            value: own(value),
            // IFEQ/IFNE's bytes are slices of the read buffer too.
            condition: match condition {
                capdb_types::mutation::Condition::IfEqual(b) => {
                    capdb_types::mutation::Condition::IfEqual(own(b))
                }
                capdb_types::mutation::Condition::IfNotEqual(b) => {
                    capdb_types::mutation::Condition::IfNotEqual(own(b))
                }
                other => other.clone(),
            },
            expiry: *expiry,
            return_old: *return_old,
        },
        Mutation::Delete { key } => Mutation::Delete { key: own(key) },
        Mutation::GetDel { key } => Mutation::GetDel { key: own(key) },
        Mutation::IncrBy { key, delta } => Mutation::IncrBy {
            key: own(key),
            delta: *delta,
        },
        Mutation::Append { key, data } => Mutation::Append {
            key: own(key),
            data: own(data),
        },
        Mutation::Expire { key, at_ms } => Mutation::Expire {
            key: own(key),
            at_ms: *at_ms,
        },
        Mutation::ExpireIf { key, at_ms, when } => Mutation::ExpireIf {
            key: own(key),
            at_ms: *at_ms,
            when: *when,
        },
        Mutation::Exec { key, args } => Mutation::Exec {
            key: own(key),
            args: args.iter().map(own).collect(),
        },
    }
}

/// Redis's probabilistic logarithmic counter increment.
fn lfu_increment(counter: u8) -> u8 {
    if counter == u8::MAX {
        return counter;
    }
    let base = counter.saturating_sub(LFU_INIT) as u32;
    let p = 1.0 / (base * LFU_LOG_FACTOR + 1) as f64;
    if fastrand::f64() < p {
        counter + 1
    } else {
        counter
    }
}

/// The counter after idle-time decay (one per [`LFU_DECAY_MINUTES`] idle).
fn lfu_decay(counter: u8, accessed_ms: u32, now_ms: u32) -> u8 {
    let idle_minutes = now_ms.wrapping_sub(accessed_ms) / 60_000;
    counter.saturating_sub((idle_minutes / LFU_DECAY_MINUTES).min(255) as u8)
}

impl MemStore {
    /// Applies `mutations` under the locks of every shard they touch (and the shards of the
    /// watched keys), so no other command interleaves: MULTI/EXEC's one lock scope. `None`, and
    /// nothing applied, when a watched key changed since its WATCH.
    pub fn apply_guarded(
        &self,
        mutations: Vec<Mutation>,
        watches: &[&WatchTicket],
        now_ms: u64,
    ) -> Result<Option<BatchReplies>> {
        // Refuse entries that could never fit before touching anything.
        for m in &mutations {
            self.check_fits(m)?;
        }
        let mut order = ShardList::new();
        for m in &mutations {
            self.push_shards(m, &mut order);
        }
        for w in watches {
            order.push(self.shard_of(&w.key));
        }
        order.sort_unstable();
        order.dedup();
        // Lock every touched shard in index order (no deadlock), apply, then release.
        let mut guards: Guards<'_> = order.iter().map(|&i| (i, self.lock(i))).collect();
        for w in watches {
            let slot = order
                .binary_search(&self.shard_of(&w.key))
                .expect("the shard of every watched key was locked");
            let shard = &mut *guards[slot].1;
            // A key that expired since WATCH is removed here, which counts as its change.
            self.live_index(shard, &w.key, now_ms);
            if shard.changes.changed_since(&w.key, w.mark) {
                return Ok(None);
            }
        }
        let stamps: Vec<Stamp> = mutations.iter().map(|m| self.stamp(m, now_ms)).collect();
        let replies = mutations
            .iter()
            .zip(&stamps)
            .map(|(m, &stamp)| self.apply_locked(&mut guards, &order, m, now_ms, stamp))
            .collect();
        if self.stream.get().is_some() {
            let all: Vec<&Mutation> = mutations.iter().collect();
            self.record(now_ms, &all, vec![all.len() as u32], stamps);
        }
        drop(guards);
        self.evict_after(&mutations, now_ms);
        Ok(Some(replies))
    }

    /// Applies the mutations of a run of commands (`sizes`: how many mutations each has, in
    /// order) one command after another, each atomic, as Redis runs a pipeline: a command
    /// holds the locks of its own keys' shards only (consecutive commands on the same shards
    /// share one locking), so a pipeline never holds many shards at once and connections on
    /// other cores do not wait for all of it; and a command that fails (one too big for the
    /// keyspace) fails alone. Mutations past the sizes given apply as one command.
    pub fn apply_commands(
        &self,
        mutations: Vec<Mutation>,
        sizes: &[usize],
        now_ms: u64,
    ) -> BatchReplies {
        debug_assert_eq!(sizes.iter().sum::<usize>(), mutations.len());
        // Each command's mutations and the shards they touch, in order.
        let mut commands: Vec<(std::ops::Range<usize>, ShardList)> =
            Vec::with_capacity(sizes.len() + 1);
        let mut start = 0;
        for n in sizes.iter().copied().chain(std::iter::once(usize::MAX)) {
            let end = start + n.min(mutations.len() - start);
            if end == start {
                continue;
            }
            let mut order = ShardList::new();
            for m in &mutations[start..end] {
                self.push_shards(m, &mut order);
            }
            order.sort_unstable();
            order.dedup();
            commands.push((start..end, order));
            start = end;
        }
        let mut replies = Vec::with_capacity(mutations.len());
        let mut next = 0;
        while next < commands.len() {
            // A run of commands on the same shards: one locking for all of them.
            let order = &commands[next].1;
            let run = commands[next..]
                .iter()
                .take_while(|(_, o)| o == order)
                .count();
            let mut guards: Guards<'_> = order.iter().map(|&i| (i, self.lock(i))).collect();
            // The commands applied and what they drew, for the stream (if kept).
            let streaming = self.stream.get().is_some();
            let (mut applied, mut sizes, mut stamps) = (Vec::new(), Vec::new(), Vec::new());
            for (range, _) in &commands[next..next + run] {
                let command = &mutations[range.clone()];
                if let Err(e) = command.iter().try_for_each(|m| self.check_fits(m)) {
                    replies.extend(command.iter().map(|_| Err(e.clone())));
                    continue;
                }
                for m in command.iter() {
                    let stamp = self.stamp(m, now_ms);
                    replies.push(self.apply_locked(&mut guards, order, m, now_ms, stamp));
                    if streaming {
                        applied.push(m);
                        stamps.push(stamp);
                    }
                }
                if streaming {
                    sizes.push(command.len() as u32);
                }
            }
            if streaming && !applied.is_empty() {
                self.record(now_ms, &applied, sizes, stamps);
            }
            drop(guards);
            // One pass for the run, sparing every key it wrote: a write answered is never its
            // own pipeline's eviction victim.
            let written = commands[next].0.start..commands[next + run - 1].0.end;
            self.evict_after(&mutations[written], now_ms);
            next += run;
        }
        replies
    }

    /// An entry that could never fit in the keyspace is refused before anything is applied.
    fn check_fits(&self, m: &Mutation) -> Result<()> {
        if let Mutation::Set { key, value, .. } = m {
            let need = key.len() as u64 + value.len() as u64 + ENTRY_OVERHEAD_BYTES;
            if need > self.max_bytes() {
                return Err(Error::OutOfMemory(format!(
                    "entry of {need} bytes exceeds the keyspace limit of {} bytes",
                    self.max_bytes()
                )));
            }
        }
        Ok(())
    }

    /// Adds the shards `m` touches to `order` (unsorted).
    fn push_shards(&self, m: &Mutation, order: &mut ShardList) {
        order.push(self.shard_of(m.key()));
        // Data-type commands may touch several keys (SMOVE, SINTERSTORE, ...).
        if let Mutation::Exec { args, .. } = m {
            let _ = capdb_data::command::each_command_key(args, |k| order.push(self.shard_of(k)));
        }
    }

    /// Applies one mutation; the shards of every key it touches are locked (`order`: their
    /// indexes, sorted, one guard each in `guards`).
    fn apply_locked(
        &self,
        guards: &mut Guards<'_>,
        order: &[usize],
        m: &Mutation,
        now_ms: u64,
        stamp: Stamp,
    ) -> Result<Reply> {
        if !self.ring.is_on() {
            return self.apply_locked_unrecorded(guards, order, m, now_ms, stamp);
        }
        for (_, shard) in guards.iter_mut() {
            shard.ring_touched = Some(Vec::new());
        }
        let reply = self.apply_locked_unrecorded(guards, order, m, now_ms, stamp);
        // The keys it changed, in the order they first changed, as they are now.
        let mut events = Vec::new();
        let mut seen: HashSet<Key> = HashSet::new();
        for (_, shard) in guards.iter_mut() {
            let touched = shard.ring_touched.take().unwrap_or_default();
            for key in touched {
                if !seen.insert(key.clone()) {
                    continue;
                }
                let counter = match m {
                    Mutation::IncrBy { delta, .. } => Some(*delta),
                    _ => None,
                };
                let op = match shard.map.get(&key[..]).map(|e| &e.value) {
                    // A counter's change says so: its delta and the new value.
                    Some(v)
                        if let Some(delta) = counter
                            && let Some(n) = std::str::from_utf8(&v.data)
                                .ok()
                                .and_then(|t| t.parse::<i64>().ok()) =>
                    {
                        capdb_types::changes::ChangeOp::Incr {
                            value: n,
                            delta,
                            prev: None,
                        }
                    }
                    Some(v) if v.header.kind == capdb_types::ValueKind::String => {
                        capdb_types::changes::ChangeOp::Set {
                            value: v.data.clone(),
                            expire_at_ms: v.header.expire_at_ms,
                            prev: None,
                        }
                    }
                    Some(v) => capdb_types::changes::ChangeOp::Cmd {
                        kind: v.header.kind as u8,
                        // Copied: the arguments may be slices of a connection's read buffer,
                        // which the ring must not keep alive.
                        args: match m {
                            Mutation::Exec { args, .. } => {
                                args.iter().map(|a| Bytes::copy_from_slice(a)).collect()
                            }
                            _ => Vec::new(),
                        },
                        also: Vec::new(),
                    },
                    None => capdb_types::changes::ChangeOp::Del { prev: None },
                };
                events.push(capdb_types::changes::Event {
                    key: Bytes::copy_from_slice(&key),
                    op,
                });
            }
        }
        self.ring.append(now_ms, events);
        reply
    }

    /// [`Self::apply_locked`] without the change ring's events.
    fn apply_locked_unrecorded(
        &self,
        guards: &mut Guards<'_>,
        order: &[usize],
        m: &Mutation,
        now_ms: u64,
        stamp: Stamp,
    ) -> Result<Reply> {
        if let Mutation::Exec { args, .. } = m {
            return self.exec_locked(guards, args, now_ms, stamp);
        }
        let sid = self.shard_of(m.key());
        let Ok(slot) = order.binary_search(&sid) else {
            // The callers lock every shard a mutation touches (`push_shards`) first.
            debug_assert!(false, "shard {sid} of a mutation was not locked");
            return Err(Error::Io(format!(
                "shard {sid} was not locked; nothing applied"
            )));
        };
        let shard = &mut *guards[slot].1;
        let key = m.key();
        let index = self.live_index(shard, key, now_ms);
        let current = index.map(|i| &shard.map[i].value);
        let (effect, reply) = m.apply(current, now_ms, stamp.0, self.value_bytes_max)?;
        match effect {
            Effect::Unchanged => {}
            Effect::Put(v) => {
                self.put_locked(shard, index, key, v, now_ms);
            }
            Effect::Remove(_) => {
                if let Some(i) = index {
                    self.remove_at(shard, i);
                }
            }
        }
        Ok(reply)
    }

    /// Evicts down to the limit after `mutations` applied, sparing the keys they wrote.
    fn evict_after(&self, mutations: &[Mutation], now_ms: u64) {
        if self.used_bytes.load(Ordering::Relaxed) > self.max_bytes() {
            // Keys other than each mutation's first (SMOVE's destination, ...) may be evicted
            // by this very batch's pass: Redis would have evicted before the command instead.
            let written: HashSet<&[u8]> = mutations.iter().map(|m| &m.key()[..]).collect();
            self.evict_to_limit(now_ms, &written);
        }
    }

    /// Runs a data-type command over locked shards (every shard its keys hash to).
    fn exec_locked(
        &self,
        guards: &mut [(usize, MutexGuard<'_, Shard>)],
        args: &[Bytes],
        now_ms: u64,
        (timestamp, seed): Stamp,
    ) -> Result<Reply> {
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp,
            seed,
            value_bytes_max: self.value_bytes_max,
        };
        let mut space = space::MemSpace {
            store: self,
            guards,
            now_ms,
            pending: Vec::new(),
        };
        capdb_data::execute(args, &mut space, &cx)
    }
}

impl KeyspaceStore for MemStore {
    fn query(&self, args: &[Bytes], now_ms: u64, seed: u64) -> Result<Reply> {
        // On an argument error the command answers it itself, touching no key.
        let mut order = ShardList::new();
        let _ = capdb_data::command::each_command_key(args, |k| order.push(self.shard_of(k)));
        order.sort_unstable();
        order.dedup();
        let mut guards: Guards<'_> = order.iter().map(|&i| (i, self.lock(i))).collect();
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: capdb_types::Timestamp::ZERO,
            seed,
            value_bytes_max: self.value_bytes_max,
        };
        let mut space = space::MemSpace {
            store: self,
            guards: &mut guards,
            now_ms,
            pending: Vec::new(),
        };
        capdb_data::execute(args, &mut space, &cx)
    }

    fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        let mut shard = self.lock(self.shard_of(key));
        let index = self.live_index(&mut shard, key, now_ms);
        Ok(match index {
            Some(i) => {
                let e = &mut shard.map[i];
                self.touch(e, now_ms);
                f(Some(&e.value))
            }
            None => f(None),
        })
    }

    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>> {
        let mut shard = self.lock(self.shard_of(key));
        let found = self.live_index(&mut shard, key, now_ms).map(|i| {
            let e = &mut shard.map[i];
            self.touch(e, now_ms);
            e.value.clone()
        });
        Ok(found)
    }

    async fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<BatchReplies> {
        self.apply_guarded(mutations, &[], now_ms)
            .map(|r| r.expect("no watches, nothing to abort"))
    }

    fn scan(&self, range: &ScanRange, limit: usize, now_ms: u64) -> Result<ScanPage> {
        // Hash shards are unordered: keep the `limit + 1` smallest keys in range across all
        // shards with a bounded max-heap. O(n log limit) per page; fine for cache sizes, and the
        // cursor is a key so concurrent writes never make a scan skip a surviving key.
        let mut heap: std::collections::BinaryHeap<Bytes> = std::collections::BinaryHeap::new();
        let cap = limit.max(1);
        for i in 0..SHARDS {
            let shard = self.lock(i);
            for (k, e) in shard.map.iter() {
                if !range.contains(k) || !e.value.is_live(now_ms) {
                    continue;
                }
                if heap.len() < cap {
                    heap.push(Bytes::copy_from_slice(k));
                } else if heap.peek().is_some_and(|top| k[..] < top[..]) {
                    heap.pop();
                    heap.push(Bytes::copy_from_slice(k));
                }
            }
        }
        let keys = heap.into_sorted_vec();
        let full = keys.len() >= cap;
        let mut page = ScanPage::default();
        for k in keys {
            // Scans read without touching LRU/LFU state: a scan is not a use.
            let shard = self.lock(self.shard_of(&k));
            if let Some(e) = shard.map.get(&k[..]).filter(|e| e.value.is_live(now_ms)) {
                page.entries.push((k.clone(), e.value.clone()));
            }
            drop(shard);
            page.next_after = Some(k);
        }
        if !full {
            page.next_after = None;
        }
        Ok(page)
    }

    fn len(&self) -> Result<u64> {
        Ok((0..SHARDS).map(|i| self.lock(i).map.len() as u64).sum())
    }

    async fn clear(&self) -> Result<()> {
        // With the change ring on, every shard stays locked until the `flush` event is in
        // the ring: no write lands between the shards' clearing and it.
        // So too while the copy keeps a stream: a write to a shard already cleared waits for
        // the `Flush` entry, and one to a shard not yet cleared comes before it (and is
        // cleared on the replica too).
        let streaming = self.stream.get().is_some();
        let recording = self.ring.is_on();
        let mut held = Vec::new();
        for i in 0..SHARDS {
            let mut shard = self.lock(i);
            let freed: u64 = shard.map.iter().map(|(k, e)| self.entry_total(k, e)).sum();
            // WATCH: as Redis 7.0's `touchAllWatchedKeysInDb`, a flush changes the keys it
            // deletes, and only those: a watched key that was absent (or had expired at WATCH,
            // which removed it here) is not touched. A key that expired after WATCH is still
            // in the map, and counts, as in Redis. A shard with more keys than the change log
            // remembers forgets them all instead (every older watch aborts: conservative).
            if self.watchers.load(Ordering::Acquire) > 0 {
                let s = &mut *shard;
                if s.map.len() > watch::TOUCHED_PER_SHARD_MAX {
                    s.changes.forget_all();
                } else {
                    for k in s.map.keys() {
                        s.changes.record(k);
                    }
                }
            }
            for (_, e) in std::mem::take(&mut shard.map) {
                if let Some(elements) = e.elements {
                    space::reclaim(elements);
                }
            }
            shard.expiring = IndexSet::default();
            self.used_bytes.fetch_sub(freed, Ordering::Relaxed);
            if recording || streaming {
                held.push(shard);
            }
        }
        if streaming {
            self.record_op(capdb_types::unix_now_ms(), stream::CacheOp::Flush);
        }
        if recording {
            let flush = capdb_types::changes::Event {
                key: Bytes::new(),
                op: capdb_types::changes::ChangeOp::Flush,
            };
            self.ring.append(capdb_types::unix_now_ms(), [flush]);
        }
        drop(held);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capdb_types::mutation::{Condition, ExpiryUpdate};

    fn set(key: &[u8], bytes: usize) -> Mutation {
        Mutation::Set {
            key: Bytes::copy_from_slice(key),
            value: Bytes::from(vec![b'v'; bytes]),
            condition: Condition::Always,
            expiry: ExpiryUpdate::Clear,
            return_old: false,
        }
    }

    /// Two keys of one shard, written by one pipeline into a full cache, share one locking
    /// and one eviction pass: that pass must spare both (LFU: new keys are the likeliest
    /// victims), as Redis, which evicts before each command, never evicts what it answered.
    #[test]
    fn a_pipeline_never_evicts_what_it_just_wrote() {
        let store = MemStore::new(
            64 * 1024,
            EvictionPolicy::Lfu,
            std::sync::Arc::new(Hlc::new()),
            1 << 20,
        );
        let now = 1_000;
        for i in 0..200 {
            let key = format!("old-{i}");
            // Older keys are used often, so LFU prefers to evict new ones.
            store.apply_commands(vec![set(key.as_bytes(), 200)], &[1], now);
            for _ in 0..20 {
                let _ = store.get(key.as_bytes(), now);
            }
        }
        let keys: Vec<String> = (0..)
            .map(|i| format!("new-{i}"))
            .scan(None, |first: &mut Option<usize>, k| {
                let shard = store.shard_of(k.as_bytes());
                Some((*first.get_or_insert(shard) == shard).then_some(k))
            })
            .flatten()
            .take(2)
            .collect();
        let replies = store.apply_commands(
            vec![
                set(keys[0].as_bytes(), 8_000),
                set(keys[1].as_bytes(), 8_000),
            ],
            &[1, 1],
            now,
        );
        assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
        assert!(store.used_bytes.load(Ordering::Relaxed) <= 64 * 1024);
        for k in &keys {
            assert!(
                store.get(k.as_bytes(), now).unwrap().is_some(),
                "{k} was evicted"
            );
        }
    }

    mod replay {
        use super::*;
        use proptest::prelude::*;

        const KEYS: [&str; 6] = ["a", "b", "c", "{a}x", "{a}y", "d"];

        fn b(s: &str) -> Bytes {
            Bytes::copy_from_slice(s.as_bytes())
        }

        fn exec(args: &[&str]) -> Mutation {
            Mutation::Exec {
                key: b(args[1]),
                args: args.iter().map(|a| b(a)).collect(),
            }
        }

        /// One command of a random mix: strings, TTLs, and collections, some drawing randomness
        /// (SPOP, SRANDMEMBER with a count on a write path: SPOP) or touching two keys.
        fn command() -> impl Strategy<Value = Mutation> {
            let key = proptest::sample::select(&KEYS[..]);
            let small = 0u32..6;
            prop_oneof![
                (key.clone(), small.clone()).prop_map(|(k, v)| Mutation::Set {
                    key: b(k),
                    value: b(&format!("v{v}")),
                    condition: capdb_types::mutation::Condition::Always,
                    expiry: capdb_types::mutation::ExpiryUpdate::Clear,
                    return_old: false,
                }),
                key.clone().prop_map(|k| Mutation::Delete { key: b(k) }),
                (key.clone(), -3i64..4).prop_map(|(k, d)| Mutation::IncrBy {
                    key: b(k),
                    delta: d
                }),
                (key.clone(), small.clone()).prop_map(|(k, v)| Mutation::Append {
                    key: b(k),
                    data: b(&format!("x{v}")),
                }),
                (key.clone(), 1_000u64..1_040).prop_map(|(k, at)| Mutation::Expire {
                    key: b(k),
                    at_ms: Some(at),
                }),
                (key.clone(), small.clone(), small.clone()).prop_map(|(k, f, v)| exec(&[
                    "HSET",
                    k,
                    &format!("f{f}"),
                    &format!("{v}")
                ])),
                (key.clone(), small.clone()).prop_map(|(k, v)| exec(&[
                    "LPUSH",
                    k,
                    &format!("{v}")
                ])),
                key.clone().prop_map(|k| exec(&["RPOP", k])),
                (key.clone(), small.clone()).prop_map(|(k, v)| exec(&[
                    "SADD",
                    k,
                    &format!("m{v}")
                ])),
                key.clone().prop_map(|k| exec(&["SPOP", k])),
                (key.clone(), small.clone(), small.clone()).prop_map(|(k, s, m)| exec(&[
                    "ZADD",
                    k,
                    &format!("{s}"),
                    &format!("m{m}")
                ])),
                (key.clone(), key.clone(), small.clone()).prop_map(|(f, t, m)| exec(&[
                    "SMOVE",
                    f,
                    t,
                    &format!("m{m}")
                ])),
                (key.clone(), key.clone())
                    .prop_map(|(f, t)| exec(&["LMOVE", f, t, "LEFT", "RIGHT"])),
            ]
        }

        /// What a client can see of every key at `now`: type, TTL and contents.
        fn seen(store: &MemStore, now: u64) -> Vec<String> {
            let mut live: Vec<(Bytes, Value)> = (0..SHARDS)
                .flat_map(|i| {
                    let shard = store.lock(i);
                    shard
                        .map
                        .iter()
                        .filter(|(_, e)| e.value.is_live(now))
                        .map(|(k, e)| (Bytes::copy_from_slice(k), e.value.clone()))
                        .collect::<Vec<_>>()
                })
                .collect();
            live.sort_by(|a, b| a.0.cmp(&b.0));
            let q = |args: &[&[u8]]| {
                let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
                let reply = store.query(&args, now, 7);
                assert!(reply.is_ok(), "{args:?}: {reply:?}");
                reply.unwrap_or(Reply::Nil)
            };
            // An unordered reply's elements (pairs of `pair` of them) in one order.
            let sorted = |reply: Reply, pair: usize| {
                let items = match reply {
                    Reply::Array(items) | Reply::Set(items) => items,
                    Reply::Map(pairs) => pairs.into_iter().flat_map(|(f, v)| [f, v]).collect(),
                    other => return format!("{other:?}"),
                };
                let mut parts: Vec<String> = items.chunks(pair).map(|c| format!("{c:?}")).collect();
                parts.sort();
                parts.join(" ")
            };
            live.iter()
                .map(|(k, v)| {
                    use capdb_types::ValueKind;
                    let contents = match v.header.kind {
                        ValueKind::String => format!("{:?}", v.data),
                        ValueKind::Hash => sorted(q(&[b"HGETALL", k]), 2),
                        ValueKind::List => format!("{:?}", q(&[b"LRANGE", k, b"0", b"-1"])),
                        ValueKind::Set => sorted(q(&[b"SMEMBERS", k]), 1),
                        ValueKind::ZSet => {
                            format!("{:?}", q(&[b"ZRANGE", k, b"0", b"-1", b"WITHSCORES"]))
                        }
                    };
                    format!(
                        "{k:?} {:?} {:?} {contents}",
                        v.header.kind, v.header.expire_at_ms
                    )
                })
                .collect()
        }

        fn copy() -> MemStore {
            sized(1 << 30)
        }

        fn sized(max_bytes: u64) -> MemStore {
            let store = MemStore::new(
                max_bytes,
                EvictionPolicy::Lru,
                std::sync::Arc::new(Hlc::new()),
                1 << 20,
            );
            assert!(store.keep_stream(1, 0, usize::MAX, usize::MAX));
            store
        }

        /// Every entry a copy holds, expired or not, and its accounted bytes: what a replica
        /// must hold exactly (it removes nothing by itself).
        fn held(store: &MemStore) -> (Vec<String>, u64) {
            let mut all: Vec<String> = (0..SHARDS)
                .flat_map(|i| {
                    let shard = store.lock(i);
                    shard
                        .map
                        .iter()
                        .map(|(k, e)| {
                            let v = &e.value;
                            let data = match v.header.kind {
                                capdb_types::ValueKind::String => format!("{:?}", v.data),
                                _ => format!(
                                    "{} element bytes",
                                    e.elements.as_ref().map_or(0, |e| e.bytes())
                                ),
                            };
                            format!(
                                "{k:?} {:?} {:?} {data}",
                                v.header.kind, v.header.expire_at_ms
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            all.sort();
            (all, store.used_bytes())
        }

        fn replay_all(
            primary: &MemStore,
            replica: &MemStore,
        ) -> std::result::Result<(), stream::AppendRefusal> {
            let from = replica.stream().unwrap().last_offset() + 1;
            let entries: Vec<_> = primary
                .stream()
                .unwrap()
                .read_from(from, usize::MAX)
                .cloned()
                .collect();
            entries
                .into_iter()
                .try_for_each(|e| replica.apply_replicated(e))
        }

        /// What the primary does besides writes.
        #[derive(Debug, Clone)]
        enum Act {
            Write(Vec<Mutation>, bool),
            Read(&'static str),
            ExpireCycle,
            RandomKey,
            Flush,
            Wait(u64),
        }

        fn act() -> impl Strategy<Value = Act> {
            prop_oneof![
                8 => (proptest::collection::vec(command(), 1..5), any::<bool>())
                    .prop_map(|(c, multi)| Act::Write(c, multi)),
                3 => proptest::sample::select(&KEYS[..]).prop_map(Act::Read),
                1 => Just(Act::ExpireCycle),
                1 => Just(Act::RandomKey),
                1 => (0u32..20).prop_map(|n| if n == 0 { Act::Flush } else { Act::Wait(n as u64) }),
            ]
        }

        proptest! {
            /// A replica holds exactly what its primary holds, entry for entry and byte for
            /// byte, though only the primary expires (on reads, writes, active cycles, RANDOMKEY)
            /// and evicts (a cache of 500 bytes: a few keys) and flushes: the replica removes nothing by
            /// itself, and hides an expired key until the primary's removal arrives.
            #[test]
            fn a_replica_removes_only_what_its_primary_removed(
                acts in proptest::collection::vec(act(), 1..60),
                replay_every in 1usize..8,
            ) {
                let (primary, replica) = (sized(500), sized(500));
                replica.set_replica(true);
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let mut now = 1_000;
                for (i, a) in acts.into_iter().enumerate() {
                    match a {
                        Act::Write(commands, multi) => {
                            if multi {
                                let applied = primary.apply_guarded(commands, &[], now);
                                prop_assert!(applied.is_ok());
                            } else {
                                let sizes = vec![1; commands.len()];
                                primary.apply_commands(commands, &sizes, now);
                            }
                        }
                        Act::Read(key) => {
                            let _ = primary.get(key.as_bytes(), now);
                            // The replica's own reads hide, never remove.
                            let _ = replica.get(key.as_bytes(), now);
                        }
                        Act::ExpireCycle => {
                            primary.expire_cycle(now);
                            prop_assert_eq!(replica.expire_cycle(now), 0);
                        }
                        Act::RandomKey => {
                            let _ = primary.random_key(now);
                            let _ = replica.random_key(now);
                        }
                        Act::Flush => {
                            prop_assert!(runtime.block_on(primary.clear()).is_ok());
                        }
                        Act::Wait(ms) => now += ms,
                    }
                    if i % replay_every == 0 {
                        prop_assert_eq!(replay_all(&primary, &replica), Ok(()));
                        prop_assert_eq!(held(&replica), held(&primary));
                    }
                }
                prop_assert_eq!(replay_all(&primary, &replica), Ok(()));
                prop_assert_eq!(held(&replica), held(&primary));
                prop_assert_eq!(seen(&replica, now), seen(&primary, now));
            }
        }

        proptest! {
            /// A replica that replays the primary's stream holds what the primary holds, as
            /// clients see it, whatever the commands drew (SPOP) and whatever expired between,
            /// pipelines and MULTI/EXEC alike.
            #[test]
            fn a_replica_replaying_the_stream_holds_what_the_primary_holds(
                batches in proptest::collection::vec(
                    (proptest::collection::vec(command(), 1..6), 0u64..8), 1..40),
            ) {
                let (primary, replica) = (copy(), copy());
                replica.set_replica(true);
                let mut now = 1_000;
                for (commands, step) in batches {
                    now += step;
                    // Odd steps as MULTI/EXEC (one locking, one entry), even ones as a pipeline.
                    if step % 2 == 1 {
                        let applied = primary.apply_guarded(commands, &[], now);
                        prop_assert!(matches!(applied, Ok(Some(_))));
                    } else {
                        let sizes = vec![1; commands.len()];
                        primary.apply_commands(commands, &sizes, now);
                    }
                }
                let entries: Vec<_> = primary.stream().unwrap().read_from(1, usize::MAX).cloned().collect();
                prop_assert!(!entries.is_empty());
                for e in entries {
                    prop_assert_eq!(replica.apply_replicated(e), Ok(()));
                }
                prop_assert_eq!(replica.stream().unwrap().last_offset(), primary.stream().unwrap().last_offset());
                // Read at the last write's time: the same keys are live on both.
                prop_assert_eq!(seen(&replica, now), seen(&primary, now));
            }
        }

        /// One random command from `rng` (the property tests' mix, by hand).
        fn random_command(rng: &mut fastrand::Rng) -> Mutation {
            let k = KEYS[rng.usize(..KEYS.len())];
            let k2 = KEYS[rng.usize(..KEYS.len())];
            let n = rng.u32(0..6).to_string();
            match rng.u8(0..10) {
                0 => Mutation::Set {
                    key: b(k),
                    value: b(&format!("v{n}")),
                    condition: capdb_types::mutation::Condition::Always,
                    expiry: capdb_types::mutation::ExpiryUpdate::Clear,
                    return_old: false,
                },
                1 => Mutation::Delete { key: b(k) },
                2 => Mutation::IncrBy {
                    key: b(k),
                    delta: 1,
                },
                3 => Mutation::Expire {
                    key: b(k),
                    at_ms: Some(1_000 + rng.u64(0..400)),
                },
                4 => exec(&["HSET", k, &format!("f{n}"), &n]),
                5 => exec(&["LPUSH", k, &n]),
                6 => exec(&["SADD", k, &format!("m{n}")]),
                7 => exec(&["SPOP", k]),
                8 => exec(&["SMOVE", k, k2, &format!("m{n}")]),
                _ => exec(&["ZADD", k, &n, &format!("m{n}")]),
            }
        }

        /// Writers on several threads, on shared and disjoint keys, with reads that expire keys
        /// and a small memory limit that evicts: the stream's order (each entry appended under
        /// the locks of the shards it changed) replays, on one thread, into what the primary
        /// holds.
        #[test]
        fn concurrent_writers_replay_into_the_same_copy() {
            for round in 0..20u64 {
                let (primary, replica) = (sized(2_000), sized(2_000));
                replica.set_replica(true);
                let clock = std::sync::atomic::AtomicU64::new(1_000);
                std::thread::scope(|scope| {
                    for t in 0..3u64 {
                        let (primary, clock) = (&primary, &clock);
                        scope.spawn(move || {
                            let mut rng = fastrand::Rng::with_seed(round * 10 + t);
                            for _ in 0..300 {
                                let now = clock.fetch_add(1, Ordering::Relaxed);
                                if rng.u8(0..4) == 0 {
                                    let _ =
                                        primary.get(KEYS[rng.usize(..KEYS.len())].as_bytes(), now);
                                    continue;
                                }
                                let commands: Vec<Mutation> = (0..rng.usize(1..4))
                                    .map(|_| random_command(&mut rng))
                                    .collect();
                                if rng.bool() {
                                    let sizes = vec![1; commands.len()];
                                    primary.apply_commands(commands, &sizes, now);
                                } else {
                                    let _ = primary.apply_guarded(commands, &[], now);
                                }
                            }
                        });
                    }
                });
                assert_eq!(replay_all(&primary, &replica), Ok(()));
                assert_eq!(held(&replica), held(&primary), "round {round}");
                let now = clock.load(Ordering::Relaxed);
                assert_eq!(seen(&replica, now), seen(&primary, now), "round {round}");
            }
        }

        #[test]
        fn an_entry_out_of_order_or_malformed_or_to_a_primary_is_refused_and_applies_nothing() {
            let (primary, replica) = (copy(), copy());
            for i in 0..3 {
                primary.apply_commands(vec![exec(&["SADD", "s", &format!("m{i}")])], &[1], 1_000);
            }
            let entries: Vec<_> = primary.stream().unwrap().read_from(1, 3).cloned().collect();
            assert_eq!(
                replica.apply_replicated(entries[0].clone()),
                Err(stream::AppendRefusal::NotReplica),
                "a copy that is no replica makes its own entries"
            );
            replica.set_replica(true);
            assert_eq!(
                replica.apply_replicated(entries[1].clone()),
                Err(stream::AppendRefusal::Gap {
                    expected: 1,
                    got: 2
                })
            );
            let mut malformed = (*entries[0]).clone();
            if let stream::CacheOp::Commands { stamps, .. } = &mut malformed.op {
                stamps.clear();
            }
            assert_eq!(
                replica.apply_replicated(std::sync::Arc::new(malformed)),
                Err(stream::AppendRefusal::Malformed)
            );
            assert_eq!(replica.len().unwrap(), 0);
            assert_eq!(replica.stream().unwrap().last_offset(), 0);
            let unstreamed = MemStore::new(
                1 << 20,
                EvictionPolicy::Lru,
                std::sync::Arc::new(Hlc::new()),
                1 << 20,
            );
            unstreamed.set_replica(true);
            assert_eq!(
                unstreamed.apply_replicated(entries[0].clone()),
                Err(stream::AppendRefusal::NoStream)
            );
        }

        /// An entry keeps none of a connection's read buffer alive: IFEQ's bytes are copied
        /// like the key and value.
        #[test]
        fn an_entry_owns_its_bytes() {
            let primary = copy();
            let buffer = Bytes::from(vec![b'x'; 1 << 16]);
            let set = Mutation::Set {
                key: buffer.slice(0..1),
                value: buffer.slice(1..2),
                condition: capdb_types::mutation::Condition::IfNotEqual(buffer.slice(2..3)),
                expiry: capdb_types::mutation::ExpiryUpdate::Clear,
                return_old: false,
            };
            primary.apply_commands(vec![set], &[1], 1_000);
            let entry = primary
                .stream()
                .unwrap()
                .read_from(1, 1)
                .next()
                .cloned()
                .unwrap();
            let stream::CacheOp::Commands { mutations, .. } = &entry.op else {
                panic!("{entry:?}");
            };
            let Mutation::Set {
                key,
                value,
                condition: capdb_types::mutation::Condition::IfNotEqual(unwanted),
                ..
            } = &mutations[0]
            else {
                panic!("{mutations:?}");
            };
            let inside = |b: &Bytes| buffer.as_ptr_range().contains(&b.as_ptr());
            assert!(!inside(key) && !inside(value) && !inside(unwanted));
        }
    }
}
