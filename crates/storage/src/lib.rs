//! capdb's storage: where a node keeps the keys of every keyspace it holds.
//!
//! It must not depend on the cluster map, Raft, `ap` or the network: replication decides what
//! to store, storage only stores it (durably, with group commit). Every table and `_meta` key
//! is named in [`layout`].
//!
//! # Layout
//!
//! - [`disk`]: [`disk::DiskEngine`], one redb database file per node holding every durable
//!   (`cp`, `ap`) keyspace as its own table, plus a `_meta` table for the keyspace catalog. All
//!   writes go through one writer thread that applies every queued request in one transaction and
//!   one fsync (group commit); a write is acknowledged only after that commit returns.
//! - [`memory`]: [`memory::MemStore`], the `cache` keyspace: sharded hash maps with Redis expiry
//!   (lazy + active) and sampled LRU/LFU eviction under a byte limit.
//! - [`KeyspaceStore`]: the contract both implement, checked by one conformance suite
//!   (`tests/conformance.rs`).
//!
//! Both stores evaluate client requests with [`capdb_types::Mutation::apply`], so Redis semantics
//! are written once. Why redb: see ARCHITECTURE.md ("Storage engine").

pub mod disk;
pub mod layout;
pub mod memory;
pub mod wal;

use bytes::Bytes;
use capdb_types::{Mutation, Reply, Result, Value};

/// One page of an ordered scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Live entries in ascending key order.
    pub entries: Vec<(Bytes, Value)>,
    /// Where the next page starts (exclusive), or `None` when the range is exhausted.
    pub next_after: Option<Bytes>,
}

/// Bounds of a scan: keys strictly after `after` (if any), below `end` (if any, exclusive), and
/// starting with `prefix` (if any).
#[derive(Debug, Clone, Default)]
pub struct ScanRange {
    pub after: Option<Bytes>,
    pub end: Option<Bytes>,
    pub prefix: Option<Bytes>,
}

impl ScanRange {
    /// Whether `key` is inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.after.as_deref().is_none_or(|a| key > a)
            && self.end.as_deref().is_none_or(|e| key < e)
            && self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
    }
}

/// Outcome of applying a batch: one result per mutation, in order.
pub type BatchReplies = Vec<Result<Reply>>;

/// What every keyspace store provides. All methods see only live values: expired entries and
/// tombstones are invisible to readers.
///
/// ### To ensure correctness
///
/// - `apply` applies the mutations of one call atomically and in order, and returns only after
///   they are as durable as the store promises (fsync'd for the disk engine).
/// - A mutation that fails (e.g. INCR of a non-integer) fails alone; the others of the batch
///   still apply, as in Redis. A storage failure fails the whole call, and nothing of it applies.
/// - Corrupt stored data is reported as [`capdb_types::Error::Corruption`], never returned.
pub trait KeyspaceStore: Send + Sync {
    /// The live value of `key` at `now_ms`.
    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>>;

    /// Calls `f` with the live value of `key` at `now_ms`; stores that can lend the value
    /// without copying it (the cache) override this.
    fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        Ok(f(self.get(key, now_ms)?.as_ref()))
    }

    /// Applies mutations at `now_ms`, atomically and in order.
    fn apply(
        &self,
        mutations: Vec<Mutation>,
        now_ms: u64,
    ) -> impl Future<Output = Result<BatchReplies>> + Send;

    /// Runs a read-only data-type command (`args[0]` its name: HGET, LRANGE, SMEMBERS, ...) on
    /// one consistent state at `now_ms`; `seed` drives random picks (HRANDFIELD).
    fn query(&self, args: &[Bytes], now_ms: u64, seed: u64) -> Result<Reply>;

    /// Up to `limit` live entries of `range`, in ascending key order.
    fn scan(&self, range: &ScanRange, limit: usize, now_ms: u64) -> Result<ScanPage>;

    /// Number of stored keys (Redis DBSIZE: may include expired keys not yet collected).
    fn len(&self) -> Result<u64>;

    /// Whether [`KeyspaceStore::len`] is zero.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Deletes every key.
    fn clear(&self) -> impl Future<Output = Result<()>> + Send;
}
