//! What an engine provides to run data-type commands: top-level records and element records.

use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Result, Value, ValueKind};

/// A collection's handle for element operations: its key (engines that keep elements with the
/// key's entry, like the cache, find them by it), its id (engines with one element table,
/// like redb, prefix element keys with it) and its kind (which family's layout its subkeys
/// follow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coll {
    pub key: Bytes,
    pub id: u64,
    pub kind: ValueKind,
}

impl Coll {
    /// Whether the element at `sub` is one that commands only read in ranges, never look up by
    /// its subkey alone, and that always has an empty value: a sorted set's order index record
    /// ([`crate::zset::is_index_sub`]). An engine may keep such elements in its ordered
    /// structure only, out of the one that serves lookups by subkey (the cache does: a ZADD
    /// that changes a score then costs one tree update for the index, not a tree and a hash
    /// table update).
    ///
    /// The family code's side of the contract: it never calls [`Space::el_get`] (nor the
    /// default [`Space::el_insert`]/[`Space::el_delete`]) on such a subkey, and always writes
    /// it with an empty value. Writes, removals and ranges by subkey are fine.
    pub fn is_order_only(&self, sub: &[u8]) -> bool {
        self.kind == ValueKind::ZSet && crate::zset::is_index_sub(sub)
    }
}

/// Which elements [`Space::el_range`] returns: subkeys within `lo..hi`, ascending (or
/// descending when `rev`), at most `limit` of them.
#[derive(Debug, Clone, Copy)]
pub struct ElRange<'a> {
    pub lo: Bound<&'a [u8]>,
    pub hi: Bound<&'a [u8]>,
    pub rev: bool,
    pub limit: usize,
}

impl<'a> ElRange<'a> {
    /// Every element, ascending.
    pub fn all() -> ElRange<'a> {
        ElRange {
            lo: Bound::Unbounded,
            hi: Bound::Unbounded,
            rev: false,
            limit: usize::MAX,
        }
    }

    /// Whether `sub` is within the range's bounds (its limit and order aside).
    pub fn contains(&self, sub: &[u8]) -> bool {
        let above = match self.lo {
            Bound::Included(l) => sub >= l,
            Bound::Excluded(l) => sub > l,
            Bound::Unbounded => true,
        };
        let below = match self.hi {
            Bound::Included(h) => sub <= h,
            Bound::Excluded(h) => sub < h,
            Bound::Unbounded => true,
        };
        above && below
    }

    /// Elements whose subkey starts with `prefix`, ascending.
    pub fn prefixed(prefix: &'a [u8], end: &'a [u8]) -> ElRange<'a> {
        ElRange {
            lo: Bound::Included(prefix),
            hi: if end.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Excluded(end)
            },
            rev: false,
            limit: usize::MAX,
        }
    }
}

/// One keyspace (or one shard of it) as a command sees it, inside one atomic step of the
/// engine (a redb write transaction, the cache's shard locks, a read snapshot).
///
/// ### To ensure correctness
///
/// - [`Space::get`] returns only live records (no tombstones, nothing expired at the step's
///   clock).
/// - [`Space::put`] and [`Space::remove`] replace the key's top-level record. When the record
///   they replace (live *or expired*) is a collection whose id differs from the new record's,
///   the engine reclaims that collection's elements (at once, or later in bounded steps; they
///   are unreachable either way, since ids are never reused).
/// - [`Space::rename`] moves the live record at `from` (the caller has checked there is one,
///   and that `from != to`) with its elements to `to`, keeping its header (kind, TTL,
///   timestamp) and its collection id, and replaces what `to` held as [`Space::put`] does
///   (reclaiming a replaced collection's elements). It must not copy elements when the engine
///   can avoid it: RENAME of a big collection is O(1) in Redis.
/// - [`Space::new_id`] never returns an id twice in the life of the space, and is replicated
///   state where the space is (a `cp` shard): every replica allocates the same ids.
/// - A read-only space (queries) answers every write with an error.
pub trait Space {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>>;
    fn put(&mut self, key: &[u8], value: Value) -> Result<()>;
    fn remove(&mut self, key: &[u8]) -> Result<()>;
    /// Moves the live record at `from` with its elements to `to`, replacing (and reclaiming)
    /// whatever `to` held.
    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()>;
    fn new_id(&mut self) -> Result<u64>;
    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>>;
    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()>;
    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()>;
    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>>;

    /// A new collection of `kind` is about to get elements at `key` (its meta record is stored
    /// after them). Engines that keep elements by kind (`ap` merges a set's members differently
    /// from a hash's fields) learn the kind here; others need nothing.
    fn creating(&mut self, _key: &[u8], _kind: ValueKind) -> Result<()> {
        Ok(())
    }

    /// [`Space::el_put`], answering whether the subkey is new. Engines override it to look the
    /// subkey up once (HSET, SADD on a big collection are a tree search each).
    fn el_insert(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<bool> {
        let new = self.el_get(c, sub)?.is_none();
        self.el_put(c, sub, value)?;
        Ok(new)
    }

    /// The values of [`Space::el_range`], without their subkeys. Engines override it to skip
    /// copying subkeys a caller does not need (LRANGE).
    fn el_values(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<Bytes>> {
        Ok(self
            .el_range(c, range)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// [`Space::el_remove`], answering whether the subkey was there.
    fn el_delete(&mut self, c: &Coll, sub: &[u8]) -> Result<bool> {
        let was = self.el_get(c, sub)?.is_some();
        if was {
            self.el_remove(c, sub)?;
        }
        Ok(was)
    }
}
