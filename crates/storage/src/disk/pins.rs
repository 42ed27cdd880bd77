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
//! per node (a replica that is full answers that it holds none, and the job places its tasks on
//! another or re-pins), each released by its owner (`Request::JobUnpin`) or after
//! [`PIN_HOLD_MAX`], and none survives a restart (pins live in memory only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_types::{Error, Result, Value};
use redb::{ReadableTable, ReadableTableMetadata};

use super::{DiskTable, META_TABLE, MetaItem, io_err, table_def};

/// Most pins one node holds.
pub const PINS_MAX: usize = 16;
/// Longest a pin is held without being released.
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
    /// Rows of the shard's table (expired, not yet swept, keys included).
    pub keys: u64,
    pub first_key: Option<Bytes>,
    pub last_key: Option<Bytes>,
    /// Whether this replica holds it (`false`: it holds [`PINS_MAX`] others).
    pub held: bool,
}

struct Pin {
    txn: Arc<redb::ReadTransaction>,
    info: PinInfo,
    taken: Instant,
}

/// The pins a node holds, by (table, owner).
#[derive(Default)]
pub(crate) struct Pins {
    held: Mutex<HashMap<(String, Bytes), Pin>>,
}

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Bytes), Pin>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the pins older than [`PIN_HOLD_MAX`]; how many went.
    pub(crate) fn expire(&self) -> usize {
        let mut held = self.lock();
        let before = held.len();
        held.retain(|_, p| p.taken.elapsed() < PIN_HOLD_MAX);
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

impl DiskTable {
    /// Takes the pin of `owner` on this table (see the module doc): records `meta` (the
    /// applied state of the pin's entry, and whatever else the entry must record) in a storage
    /// job, then holds a read transaction that holds exactly that. `applied_key`: the `_meta`
    /// row of `meta` that names the applied index, checked in the pinned transaction. A pin of
    /// the same owner is replaced.
    pub async fn pin(
        &self,
        owner: &[u8],
        index: u64,
        meta: Vec<MetaItem>,
        applied_key: &str,
    ) -> Result<PinInfo> {
        let Some(expected) = meta
            .iter()
            .find(|(k, _)| k == applied_key)
            .and_then(|(_, v)| v.clone())
        else {
            return Err(Error::InvalidInput(format!(
                "a pin must record its applied state ({applied_key})"
            )));
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
        let seen = self.engine.visible().await?;
        let txn = self.engine.begin_read_seen(Some(seen))?;
        let applied = txn
            .open_table(META_TABLE)
            .map_err(io_err)?
            .get(applied_key)
            .map_err(io_err)?
            .map(|v| v.value().to_vec());
        if applied.as_deref() != Some(&expected[..]) {
            return Err(Error::Corruption(format!(
                "the pinned snapshot of {} does not hold the pin's applied state",
                self.table
            )));
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
                    taken: Instant::now(),
                },
            );
        } else {
            tracing::warn!(table = %self.table, pins = held.len(), "a pin is refused: this node holds the most it may");
        }
        Ok(info)
    }

    /// Releases the pin of `owner` on this table; whether there was one.
    pub fn unpin(&self, owner: &[u8]) -> bool {
        self.engine
            .pins
            .lock()
            .remove(&(self.table.clone(), Bytes::copy_from_slice(owner)))
            .is_some()
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
    /// the pin of `owner`: at most `limit` (and [`PINNED_PAGE_KEYS_MAX`]) keys, at most
    /// [`PINNED_PAGE_EXAMINE_MAX`] rows examined. Expired keys (at `now_ms`) are included only
    /// when `include_expired`. Refused when this node holds no such pin (never held, expired,
    /// released, or the node restarted; `Unavailable`): the caller reads another replica or
    /// re-pins.
    #[allow(clippy::too_many_arguments)]
    pub fn pinned_scan(
        &self,
        owner: &[u8],
        from: Option<&[u8]>,
        to: Option<&[u8]>,
        after: Option<&[u8]>,
        limit: usize,
        now_ms: u64,
        include_expired: bool,
    ) -> Result<PinnedPage> {
        use std::ops::Bound;
        let txn = {
            let held = self.engine.pins.lock();
            match held.get(&(self.table.clone(), Bytes::copy_from_slice(owner))) {
                Some(p) if p.taken.elapsed() < PIN_HOLD_MAX => p.txn.clone(),
                _ => {
                    return Err(Error::Unavailable(format!(
                        "no pin of {} for this owner on this node",
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
            let value = Value::decode(v.value()).map_err(|e| match e {
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
