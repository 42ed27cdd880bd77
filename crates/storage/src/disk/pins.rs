//! Pins: read transactions a node holds open at exactly one log index of a shard, so that a
//! job's tasks (issue 15, `docs/design/mapreduce.md` §5) read the same data whichever replica
//! runs them, however long they take, and whatever is written meanwhile.
//!
//! # How a pin is taken at an exact index
//!
//! A pin is a log entry (`Request::JobPin`), applied alone like a change-log step: the entries
//! before it are applied first, then its own storage job records the applied state, and then,
//! **before the state machine applies anything after it**, [`DiskTable::pin`] waits until that
//! job is committed (`visible.rs`) and opens a read transaction. No later entry of the shard
//! can be in it: the apply of the shard waits for the pin. Every replica does the same when it
//! applies the entry, so each holds the shard as of the same index. The pinned transaction must
//! hold exactly the applied-state row the pin wrote; if it does not, the pin is refused (an
//! invariant, checked rather than assumed).
//!
//! # What a pin costs, and its bounds
//!
//! redb cannot reuse pages freed after a read transaction began until it ends, so a pin held
//! under heavy writes grows the file by what is written meanwhile. Hence: at most [`PINS_MAX`]
//! per node (a replica that is full holds none, and the job places its tasks on another or
//! re-pins), each released by its owner (`Request::JobUnpin`) or when its lease lapses: a pin
//! is held for [`PIN_HOLD_MAX`] after it was taken or last renewed ([`DiskTable::renew_pin`];
//! a running job's coordinator renews its pins every minute, so a job runs as long as its own
//! `limits.max_s` allows, while the pins of a job nobody drives go 10 minutes after its last
//! coordinator stopped; the node's expiry loop drops lapsed ones: [`DiskEngine::pins_held`]),
//! none survives a restart
//! (pins live in memory only), and a table's pins go with the table (dropped, or replaced by
//! an installed snapshot: the replica then no longer holds the shard as of the pin).
//!
//! # The same data on every replica
//!
//! A pin also fixes the clock expiry is judged at (`now_ms`, stamped by the proposer in the
//! entry), so a retry or a speculative copy on another replica sees the same keys; and a scan
//! names the index it expects, so a replica holding an older pin of the same owner (it missed
//! a re-pin) refuses rather than answers from other data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_types::{Error, Result, Value};
use redb::{ReadableTable, ReadableTableMetadata};

use super::{DiskEngine, DiskTable, META_TABLE, MetaItem, io_err, table_def};

/// Most pins one node holds: room for every job a `_jobs` shard runs at once (16) over
/// keyspaces of 16 shards a node holds replicas of. A pin costs a read transaction (the pages
/// it keeps from reuse are those written while it is held, shared by pins taken close
/// together); the 16 of an earlier version starved concurrent jobs of pins.
pub const PINS_MAX: usize = 256;
/// How long a pin is held after it was taken or last renewed (its lease), unless released.
pub const PIN_HOLD_MAX: Duration = Duration::from_secs(10 * 60);
/// Most keys one page of a pinned scan returns, and most rows it examines (expired,
/// collections and tombstones included).
pub const PINNED_PAGE_KEYS_MAX: usize = 4_096;
pub const PINNED_PAGE_EXAMINE_MAX: usize = 16_384;

/// What a pin holds, as every replica that took it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinInfo {
    /// The log index the pin holds the shard at.
    pub index: u64,
    /// The clock a scan judges expiry at (the proposer's, carried by the entry).
    pub now_ms: u64,
    /// Rows of the shard's table (expired, not yet swept, keys included).
    pub keys: u64,
    pub first_key: Option<Bytes>,
    pub last_key: Option<Bytes>,
    /// Whether this replica holds it (`false`: it holds [`PINS_MAX`] others). The only part
    /// that may differ between replicas.
    pub held: bool,
}

struct Pin {
    txn: Arc<redb::ReadTransaction>,
    info: PinInfo,
    /// When it was taken or last renewed.
    renewed: Instant,
}

/// The pins a node holds, by (table, owner).
pub(crate) struct Pins {
    held: Mutex<HashMap<(String, Bytes), Pin>>,
    /// The lease, in ms ([`PIN_HOLD_MAX`]; tests shorten it).
    lease_ms: std::sync::atomic::AtomicU64,
}

impl Default for Pins {
    fn default() -> Pins {
        Pins {
            held: Mutex::default(),
            lease_ms: std::sync::atomic::AtomicU64::new(PIN_HOLD_MAX.as_millis() as u64),
        }
    }
}

impl Pin {
    fn lapsed(&self, lease: Duration) -> bool {
        self.renewed.elapsed() >= lease
    }
}

impl Pins {
    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Bytes), Pin>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases every pin of these tables (dropped, or replaced by a snapshot).
    pub(crate) fn release_tables(&self, tables: &[&str]) {
        self.lock()
            .retain(|(t, _), _| !tables.contains(&t.as_str()));
    }

    /// Drops the pins whose lease lapsed; how many went.
    pub(crate) fn expire(&self) -> usize {
        let lease = self.lease();
        let mut held = self.lock();
        let before = held.len();
        held.retain(|_, p| !p.lapsed(lease));
        before - held.len()
    }

    pub(crate) fn count(&self) -> usize {
        self.lock().len()
    }
}

/// One page of a pinned scan.
#[derive(Debug, Clone, PartialEq)]
pub struct PinnedPage {
    /// String keys and their values, in key order (checksums checked).
    pub entries: Vec<(Bytes, Value)>,
    /// Rows examined (what the page's `entries` came from).
    pub examined: usize,
    /// Rows passed over: collections, tombstones, and expired keys unless included.
    pub passed: usize,
    /// Where the next page starts (after this key); `None`: the range is done.
    pub next: Option<Bytes>,
}

impl DiskEngine {
    /// Pins this node holds (`pins.rs`), after dropping those whose lease lapsed: the node's
    /// expiry loop calls it, so an idle node lets go of them too.
    pub fn pins_held(&self) -> usize {
        self.pins.expire();
        self.pins.count()
    }

    /// Sets how long a pin is held after it was taken or renewed ([`PIN_HOLD_MAX`] unless
    /// set: tests of leases shorten it).
    pub fn set_pin_lease(&self, lease: Duration) {
        self.pins.lease_ms.store(
            lease.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl DiskTable {
    /// Takes the pin of `owner` on this table (see the module doc): records `meta` (the
    /// applied state of the pin's entry, and whatever else the entry must record) in a storage
    /// job, then holds a read transaction that holds exactly that. `applied_key`: the `_meta`
    /// row of `meta` that names the applied index, checked in the pinned transaction. A pin of
    /// the same owner is replaced. `now_ms`: the entry's clock, that scans judge expiry at.
    ///
    /// Outer error: storage failed (the apply must stop, as for any entry). Inner: the pin is
    /// refused and nothing is held (its entry was applied: `meta` is recorded).
    pub async fn pin(
        &self,
        owner: &[u8],
        index: u64,
        now_ms: u64,
        meta: Vec<MetaItem>,
        applied_key: &str,
    ) -> Result<Result<PinInfo>> {
        let Some(expected) = meta
            .iter()
            .find(|(k, _)| k == applied_key)
            .and_then(|(_, v)| v.clone())
        else {
            return Ok(Err(Error::InvalidInput(format!(
                "a pin must record its applied state ({applied_key})"
            ))));
        };
        self.engine
            .apply_replicated(
                &self.table,
                Vec::new(),
                meta,
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )
            .await?;
        // A slow commit is waited out (the apply cannot go on without the pin's answer); a
        // broken writer is an error.
        let seen = loop {
            match self.engine.visible().await {
                Ok(seen) => break seen,
                Err(Error::Unavailable(_)) if self.engine.visible.broken().is_none() => {
                    tracing::warn!(table = %self.table, "a pin waits for a slow commit");
                }
                Err(e) => return Err(e),
            }
        };
        let txn = self.engine.begin_read_seen(Some(seen))?;
        let applied = txn
            .open_table(META_TABLE)
            .map_err(io_err)?
            .get(applied_key)
            .map_err(io_err)?
            .map(|v| v.value().to_vec());
        if applied.as_deref() != Some(&expected[..]) {
            tracing::error!(table = %self.table, "a pin's snapshot does not hold its applied state; refused");
            return Ok(Err(Error::Corruption(format!(
                "the pinned snapshot of {} does not hold the pin's applied state",
                self.table
            ))));
        }
        let (keys, first_key, last_key) = match txn.open_table(table_def(&self.table)) {
            Ok(t) => {
                let first = t
                    .first()
                    .map_err(io_err)?
                    .map(|(k, _)| Bytes::copy_from_slice(k.value()));
                let last = t
                    .last()
                    .map_err(io_err)?
                    .map(|(k, _)| Bytes::copy_from_slice(k.value()));
                (t.len().map_err(io_err)?, first, last)
            }
            Err(redb::TableError::TableDoesNotExist(_)) => (0, None, None),
            Err(e) => return Err(io_err(e)),
        };
        let pins = &self.engine.pins;
        pins.expire();
        let key = (self.table.clone(), Bytes::copy_from_slice(owner));
        let mut held = pins.lock();
        let room = held.len() < PINS_MAX || held.contains_key(&key);
        let info = PinInfo {
            index,
            now_ms,
            keys,
            first_key,
            last_key,
            held: room,
        };
        if room {
            held.insert(
                key,
                Pin {
                    txn: Arc::new(txn),
                    info: info.clone(),
                    renewed: Instant::now(),
                },
            );
        } else {
            tracing::warn!(table = %self.table, pins = held.len(), "a pin is refused: this node holds the most it may");
        }
        Ok(Ok(info))
    }

    /// Releases the pin of `owner` on this table taken at `index` (a later re-pin of the same
    /// owner stays); whether there was one.
    pub fn unpin(&self, owner: &[u8], index: u64) -> bool {
        let key = (self.table.clone(), Bytes::copy_from_slice(owner));
        let mut held = self.engine.pins.lock();
        if held.get(&key).is_some_and(|p| p.info.index == index) {
            held.remove(&key);
            true
        } else {
            false
        }
    }

    /// Renews the lease of the pin of `owner` on this table taken at `index`: it is held for
    /// another [`PIN_HOLD_MAX`] from now. Whether this node holds it (a lapsed one is not
    /// brought back: it may have let go of its transaction already).
    pub fn renew_pin(&self, owner: &[u8], index: u64) -> bool {
        let lease = self.engine.pins.lease();
        let key = (self.table.clone(), Bytes::copy_from_slice(owner));
        let mut held = self.engine.pins.lock();
        match held.get_mut(&key) {
            Some(p) if p.info.index == index && !p.lapsed(lease) => {
                p.renewed = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// What the pin of `owner` holds, if this node holds it.
    pub fn pinned(&self, owner: &[u8]) -> Option<PinInfo> {
        self.engine.pins.expire();
        self.engine
            .pins
            .lock()
            .get(&(self.table.clone(), Bytes::copy_from_slice(owner)))
            .map(|p| p.info.clone())
    }

    /// A page of the string keys in `[from, to)` (`None`: unbounded) after `after`, read from
    /// the pin of `owner` taken at `index`: at most `limit` (and [`PINNED_PAGE_KEYS_MAX`])
    /// keys, at most [`PINNED_PAGE_EXAMINE_MAX`] rows examined (a page may hold no key and
    /// still have a `next`). Expired keys (at the pin's clock) are included only when
    /// `include_expired`. Refused (`Unavailable`) when this node holds no such pin (never held,
    /// expired, released, another index, the node restarted, or the shard's table was
    /// replaced): the caller reads another replica or re-pins. Blocking: run it on a thread
    /// that may block.
    #[allow(clippy::too_many_arguments)]
    pub fn pinned_scan(
        &self,
        owner: &[u8],
        index: u64,
        from: Option<&[u8]>,
        to: Option<&[u8]>,
        after: Option<&[u8]>,
        limit: usize,
        include_expired: bool,
    ) -> Result<PinnedPage> {
        use std::ops::Bound;
        let (txn, now_ms) = {
            let key = (self.table.clone(), Bytes::copy_from_slice(owner));
            let lease = self.engine.pins.lease();
            let mut held = self.engine.pins.lock();
            match held.get(&key) {
                Some(p) if !p.lapsed(lease) && p.info.index == index => {
                    (p.txn.clone(), p.info.now_ms)
                }
                found => {
                    if found.is_some_and(|p| p.lapsed(lease)) {
                        held.remove(&key);
                    }
                    return Err(Error::Unavailable(format!(
                        "no pin of {} at index {index} for this owner on this node",
                        self.table
                    )));
                }
            }
        };
        let t = match txn.open_table(table_def(&self.table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(PinnedPage {
                    entries: Vec::new(),
                    examined: 0,
                    passed: 0,
                    next: None,
                });
            }
            Err(e) => return Err(io_err(e)),
        };
        let lower = match (after, from) {
            (Some(a), Some(f)) if a < f => Bound::Included(f),
            (Some(a), _) => Bound::Excluded(a),
            (None, Some(f)) => Bound::Included(f),
            (None, None) => Bound::Unbounded,
        };
        let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
        let limit = limit.clamp(1, PINNED_PAGE_KEYS_MAX);
        let mut page = PinnedPage {
            entries: Vec::new(),
            examined: 0,
            passed: 0,
            next: None,
        };
        let mut last: Option<Bytes> = None;
        for entry in t.range::<&[u8]>((lower, upper)).map_err(io_err)? {
            if page.entries.len() >= limit || page.examined >= PINNED_PAGE_EXAMINE_MAX {
                page.next = last;
                return Ok(page);
            }
            let (k, v) = entry.map_err(io_err)?;
            page.examined += 1;
            let key = Bytes::copy_from_slice(k.value());
            // A corrupt record fails the page: a job's answer never silently leaves it out.
            let value = self.decode(v.value()).map_err(|e| match e {
                Error::Corruption(why) => {
                    Error::Corruption(format!("{} key {:?}: {why}", self.table, key))
                }
                other => other,
            })?;
            let wanted = !value.header.tombstone
                && value.is_string()
                && (include_expired || !value.is_expired(now_ms));
            if wanted {
                page.entries.push((key.clone(), value));
            } else {
                page.passed += 1;
            }
            last = Some(key);
        }
        Ok(page)
    }
}
