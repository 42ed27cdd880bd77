//! Synchronous views inside the apply (issue 15, `docs/design/mapreduce.md` §10; the types
//! and why: `capdb_types::views`). Each shard of a `cp` keyspace keeps, per view, one row per
//! group and multisets for min and max, updated in the storage transaction of every write
//! that changes a key the view reads ([`ViewSet`], called from `ops.rs` and `txn.rs`), and
//! built by [`ViewCommand::Backfill`] entries behind a cursor.
//!
//! # Rows (element table, reserved id 0; `‖name` is `len u16 BE‖name`, numbers big-endian)
//!
//! - `0‖view-def/‖name` -> [`ViewDef`] (postcard)
//! - `0‖view-row/‖name‖generation u64‖group` -> [`Row`]: contributions and one accumulator per
//!   reducer (min and max ones stay empty: their multisets hold them)
//! - `0‖view-mmc/‖name‖generation‖reducer u8‖len u32‖group‖first number` -> [`Chunk`]: a
//!   min or max reducer's multiset of the group, in chunks of up to [`CHUNK_NUMBERS_MAX`]
//!   ascending (number, how many keys give it) pairs, each stored under its first number
//!   ([`Fixed`] made sortable: the first chunk holds the min, the last the max). A fold
//!   rewrites a chunk once for all its changes ([`fold_chunks`]); a row per number made the
//!   multiset about ten times larger, and a fold wrote nearly every page of it. One multiset
//!   per value slot, under the first min or max reducer of that slot: `min(a)` and `max(a)`
//!   read the same rows. The bare `0‖view-mmc/‖name‖generation` row says the view keeps
//!   chunks.
//! - `0‖view-mm/‖name‖generation‖reducer u8‖len u32‖group‖number` -> i64 LE: the same
//!   multiset a row per number, as views defined before chunks (no `view-mmc/` marker)
//!   keep it. (Views defined before multisets were shared kept one per reducer; both hold
//!   the same counts, so reading the first's is exact, and the second's rows go with the
//!   view.)
//! - `0‖view-dlt/‖name‖generation‖seq u64` -> [`Unfolded`]: the change to the rows of the
//!   writes since the last such row (those of one commit of the writer's: [`Deferred`]),
//!   kept as one row rather than read into each group's (writes touch up to a group each:
//!   one row written instead of a read and a write per group); at most [`UNFOLDED_MAX`],
//!   then folded into the rows by the write of one more. Every read of the rows merges them
//!   ([`unfolded`]).
//! - `0‖view-dmm/‖name‖generation‖seq u64‖held u64` -> [`UnfoldedMm`]: the same for the
//!   min/max multisets (`held`: the changes of the unfolded rows up to this one), folded in
//!   key order once [`UNFOLDED_MM_CHANGES_MAX`] changes or [`UNFOLDED_MM_ROWS_MAX`] rows wait
//!   (a write's (group, number) lies anywhere in the multiset: changed in place, every write
//!   dirtied its own page of the table; folded, a chunk is rewritten once for all its
//!   changes). Reads of the extremes merge them ([`read_group`]).
//! - `0‖view-cnt/‖name‖generation` -> [`Counts`] (its `groups` counts folded rows; the
//!   bounds are judged by the shard's leader, [`ViewCommand::Overflow`], never by the apply,
//!   whose batches differ between replicas)
//! - `0‖view-gone/‖name‖generation` -> empty: a dropped generation whose rows are still being
//!   deleted ([`ViewCommand::Purge`])
//! - `0‖view-pos/‖name‖generation` -> u64 LE: an async (Lua) view's position in the shard's
//!   change log (the stream clock of the last entry whose events it counts)
//!
//! # Async (Lua) views
//!
//! The apply never runs their map: [`ViewSet::load`] leaves them out. Their updater (the
//! shard leader's node) reads [`async_read`] (the events after the position and, while
//! building, the next keys, from one snapshot), maps them and proposes
//! [`ViewCommand::Advance`] with a [`ViewDelta`] built by [`DeltaBuilder`]; it applies only
//! if the view still stands where the read found it. While building, an event counts only
//! for a key the cursor has passed, as a write does for a synchronous view.
//!
//! The rows are replicated state: snapshots carry the element table; FLUSHDB keeps the
//! definitions (as ready: nothing is left to count) and drops the rest ([`carried_rows`]).
//!
//! # What a view counts
//!
//! Exactly what a job with its spec (`expired: include`) reads from the same state: string
//! values, not tombstones, expired or not (a key counts until the log removes it; the
//! apply cannot see time pass), under the prefix and matching the pattern.

use std::collections::HashMap;

use bytes::Bytes;
use capdb_reduce::acc::{Acc, Contribution, Reducer};
use capdb_reduce::extract::Scalar;
use capdb_reduce::num::Fixed;
use capdb_reduce::{GroupKey, JobSpec, Plan};
use capdb_types::views::{
    ADVANCE_EVENTS_MAX, ADVANCE_KEYS_MAX, AsyncAt, BACKFILL_BYTES_MAX, BACKFILL_KEYS_MAX,
    PURGE_ROWS_MAX, VIEW_GROUPS_MAX, VIEW_MINMAX_ROWS_MAX, VIEWS_MAX, ViewCommand, ViewDef,
    ViewState, name_is_valid,
};
use capdb_types::{Error, Reply, Result};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{io_err, table_def};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// The internal read command that reads views' rows ([`query`]): `defs`, `gone`,
/// `rows name generation after count`, `groups name generation group...`.
pub const VIEWS_QUERY: &str = "capdb.views";
/// TESTING ONLY (`capdb server --debug-view-skip-txn`): commits of cross-shard
/// transactions skip the views, so `capdb chaos --workload view` can prove it detects drift.
pub static DEBUG_VIEW_SKIP_TXN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Most groups one `rows` query answers.
pub const ROWS_PAGE_MAX: usize = 10_000;
/// Unfolded changes a view keeps (each one commit's) before they are folded into its
/// rows: what a read merges at most.
pub const UNFOLDED_MAX: u64 = 32;
/// Unfolded changes to a view's min/max multisets kept before they are folded: rows (each
/// one commit's), and (number, change) pairs over all of them (what a read of the extremes
/// merges at most, plus one commit's). By changes, not rows: a fold rewrites nearly every
/// chunk it reaches, so it should come once many changes wait, whatever a commit brings (a
/// loaded cluster commits every ~10 ms, ~200 changes per shard each).
pub const UNFOLDED_MM_ROWS_MAX: u64 = 256;
pub const UNFOLDED_MM_CHANGES_MAX: u64 = 16_384;

const RESERVED: [u8; 8] = [0; 8];
const DEF: &[u8] = b"view-def/";
const ROW: &[u8] = b"view-row/";
/// A commit's change to a view's rows, not yet folded into them
/// (`‖name‖generation‖seq u64 BE` -> postcard [`Unfolded`]).
const DLT: &[u8] = b"view-dlt/";
const MM: &[u8] = b"view-mm/";
/// A view's min/max multisets in chunks (`‖name‖generation‖reducer‖len u32‖group‖first
/// number` -> postcard [`Chunk`]); the bare `‖name‖generation` row marks a view whose
/// multisets are kept so ([`multisets_chunked`]).
const MMC: &[u8] = b"view-mmc/";
/// Most numbers one multiset chunk holds: a chunk past it is split in equal parts. (512 was
/// measured, fifteenth session: the fold's B-tree work fell, but chunks of a few KB cost
/// more to rewrite than they saved: a min/max view's CPU per write rose from +1.4-1.9 µs to
/// +2.2-2.4 µs in `apply_cost`, batches of 16.)
pub const CHUNK_NUMBERS_MAX: usize = 64;
/// A commit's change to a view's multisets, not yet folded into them
/// (`‖name‖generation‖seq u64 BE` -> postcard [`UnfoldedMm`]).
const DMM: &[u8] = b"view-dmm/";
const CNT: &[u8] = b"view-cnt/";
const GONE: &[u8] = b"view-gone/";
/// An async view's position (`‖name‖generation` -> u64 LE stream clock).
const POS: &[u8] = b"view-pos/";

fn def_key(name: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(DEF);
    k.extend_from_slice(name);
    k
}

fn def_prefix() -> Vec<u8> {
    def_key(b"")
}

/// `0‖kind‖len‖name‖generation`: what every row of one generation of a view starts with.
fn gen_prefix(kind: &[u8], name: &[u8], generation: u64) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(kind);
    k.extend_from_slice(&(name.len() as u16).to_be_bytes());
    k.extend_from_slice(name);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn row_key(name: &[u8], generation: u64, group: &[u8]) -> Vec<u8> {
    let mut k = gen_prefix(ROW, name, generation);
    k.extend_from_slice(group);
    k
}

/// `i128` as bytes that sort as the numbers do.
fn sortable(n: Fixed) -> [u8; 16] {
    ((n.0 as u128) ^ (1 << 127)).to_be_bytes()
}

fn unsortable(b: &[u8]) -> Option<Fixed> {
    let raw: [u8; 16] = b.try_into().ok()?;
    Some(Fixed((u128::from_be_bytes(raw) ^ (1 << 127)) as i128))
}

/// What every multiset row of `group` for `reducer` starts with, in layout `kind` ([`MM`]: a
/// row per number, [`MMC`]: chunks).
fn multiset_prefix(
    kind: &[u8],
    name: &[u8],
    generation: u64,
    reducer: u8,
    group: &[u8],
) -> Vec<u8> {
    let mut k = gen_prefix(kind, name, generation);
    k.push(reducer);
    k.extend_from_slice(&(group.len() as u32).to_be_bytes());
    k.extend_from_slice(group);
    k
}

/// Numbers of one multiset in ascending order, each with how many keys give it (never 0);
/// stored under the first of them.
type Chunk = Vec<(Fixed, i64)>;

/// Whether view `name`'s multisets of `generation` are chunked (views defined before chunks
/// keep a row per number: [`MM`]).
fn multisets_chunked(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    generation: u64,
) -> Result<bool> {
    Ok(el
        .get(&gen_prefix(MMC, name, generation)[..])
        .map_err(io_err)?
        .is_some())
}

/// The chunk of the group whose multiset rows start with `prefix` that holds `number` or
/// would take it: the last chunk whose first number is at most `number`, else the group's
/// first. `None`: the group has no chunk.
fn chunk_for(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    number: Fixed,
) -> Result<Option<(Vec<u8>, Chunk)>> {
    let mut at = prefix.to_vec();
    at.extend_from_slice(&sortable(number));
    // Every key between `prefix` and `at` starts with `prefix`: it is this group's.
    let floor = el
        .range(prefix..=&at[..])
        .map_err(io_err)?
        .next_back()
        .transpose()
        .map_err(io_err)?;
    let found = match floor {
        Some(e) => Some(e),
        None => el
            .range(&at[..]..&group_upper(prefix)[..])
            .map_err(io_err)?
            .next()
            .transpose()
            .map_err(io_err)?,
    };
    found
        .map(|(k, raw)| {
            Ok((
                k.value().to_vec(),
                decode(raw.value(), "a view's multiset chunk")?,
            ))
        })
        .transpose()
}

/// Above every multiset row of the group whose rows start with `prefix` (`prefix‖16 bytes`).
fn group_upper(prefix: &[u8]) -> Vec<u8> {
    let mut upper = prefix.to_vec();
    upper.extend_from_slice(&[0xff; 17]);
    upper
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(raw).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::Io(format!("cannot encode a view row: {e}")))
}

fn get<T: serde::de::DeserializeOwned>(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    what: &str,
) -> Result<Option<T>> {
    match el.get(key).map_err(io_err)? {
        Some(raw) => decode(raw.value(), what).map(Some),
        None => Ok(None),
    }
}

fn int(raw: &[u8]) -> Result<i64> {
    raw.try_into()
        .map(i64::from_le_bytes)
        .map_err(|_| Error::Corruption("a view's min/max row".into()))
}

/// Plans made from view specs, most recent first: a storage job loads its shard's views
/// each time, and parsing a spec costs more than a batch of writes' share of it. Pure (a
/// spec's text gives one plan), so a cache changes nothing but time.
static PLANS: std::sync::Mutex<Vec<(String, std::sync::Arc<Plan>)>> =
    std::sync::Mutex::new(Vec::new());
/// Plans the cache holds (views per keyspace × a few keyspaces).
const PLANS_CACHED_MAX: usize = 256;

fn plan_of(spec: &str) -> std::result::Result<std::sync::Arc<Plan>, String> {
    let mut cache = PLANS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = cache.iter().position(|(s, _)| s == spec) {
        let hit = cache.remove(i);
        let plan = hit.1.clone();
        cache.insert(0, hit);
        return Ok(plan);
    }
    let parsed = JobSpec::parse(spec.as_bytes()).map_err(|e| e.to_string())?;
    let plan = std::sync::Arc::new(Plan::new(parsed).map_err(|e| e.to_string())?);
    cache.insert(0, (spec.to_string(), plan.clone()));
    cache.truncate(PLANS_CACHED_MAX);
    Ok(plan)
}

/// One group's row on one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Contributions (keys giving this group): the row goes when it reaches 0.
    pub n: i64,
    /// One per reducer, in the plan's order; min and max stay empty here.
    pub accs: Vec<Acc>,
}

/// What a view has counted on one shard (as a job's partial counts them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub keys: i64,
    pub skipped: i64,
    pub rounded: i64,
    pub groups: i64,
    pub minmax_rows: i64,
}

/// A view as the apply uses it.
struct Loaded {
    name: Bytes,
    def: ViewDef,
    plan: std::sync::Arc<Plan>,
    /// Each min and max reducer: its index and the index of the reducer whose multiset it
    /// reads (the first min or max of the same value slot: a min and a max of one value
    /// share a multiset, so a write updates one row, not two).
    minmax: Vec<(u8, u8)>,
    /// The multisets kept: owning reducer index and value slot, one per slot.
    multisets: Vec<(u8, usize)>,
    /// Value slot of each reducer that takes a number (sum, avg), by reducer index.
    slots: Vec<Option<usize>>,
}

impl Loaded {
    fn new(name: Bytes, def: ViewDef) -> Result<Loaded> {
        let plan = plan_of(&def.spec)
            .map_err(|e| Error::Corruption(format!("view {name:?}'s spec: {e}")))?;
        let mut minmax = Vec::new();
        let mut multisets: Vec<(u8, usize)> = Vec::new();
        let mut slots = Vec::new();
        for (i, (_, r, slot)) in plan.reducers().enumerate() {
            match (r, slot) {
                (Reducer::Min(_) | Reducer::Max(_), Some(s)) => {
                    let owner = match multisets.iter().find(|(_, slot)| *slot == s) {
                        Some(&(owner, _)) => owner,
                        None => {
                            multisets.push((i as u8, s));
                            i as u8
                        }
                    };
                    minmax.push((i as u8, owner));
                    slots.push(None);
                }
                (_, slot) => slots.push(slot),
            }
        }
        Ok(Loaded {
            name,
            def,
            plan,
            minmax,
            multisets,
            slots,
        })
    }

    /// Whether a change of `key` counts now: the view is kept and its cursor has passed
    /// the key, and the key is the view's.
    fn live_for(&self, key: &[u8]) -> bool {
        passed(&self.def.state, key) && self.plan.spec().input.wants(key)
    }

    /// A Lua view: kept from the change log, off the apply.
    fn is_async(&self) -> bool {
        self.plan.spec().lua.is_some()
    }
}

/// Whether a view in `state` counts a change of `key` now (its cursor has passed the key).
fn passed(state: &ViewState, key: &[u8]) -> bool {
    match state {
        ViewState::Ready => true,
        ViewState::Building { cursor, .. } => cursor.as_deref().is_some_and(|c| key <= c),
        ViewState::Overflow { .. } => false,
    }
}

/// A map of the apply's own keys (foldhash: a write hashes a group or two per view, and
/// nothing an attacker picks can collide them into more than a job's work). Never iterated
/// into stored bytes without a sort.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Pending changes to one view's rows, written when the writer commits ([`Deferred`]).
#[derive(Default)]
struct Pending {
    /// Keyed by the group's canonical bytes, held inline when short (no allocation per write).
    rows: FastMap<GroupKey, Row>,
    minmax: MinMaxChanges,
    counts: Counts,
    touched: bool,
}

/// Most changes [`MinMaxChanges`] holds before it sums them (then at most twice what summing
/// left, or this).
const MINMAX_SUM_AT_LEAST: usize = 4_096;

/// Changes to a view's min/max multisets, `(owner reducer, group, number, change)`, held as
/// they come and summed per (reducer, group, number) once they pass twice what the last sum
/// left (at least [`MINMAX_SUM_AT_LEAST`]), and when written ([`MinMaxChanges::summed`]).
/// A commit's writes are mostly distinct (group, number) pairs: a push each and one sort at
/// the write, which sorts them anyway, cost less than a hash map's entry per write.
#[derive(Default)]
struct MinMaxChanges {
    changes: Vec<(u8, GroupKey, Fixed, i64)>,
    sum_at: usize,
}

impl MinMaxChanges {
    fn add(&mut self, r: u8, group: GroupKey, number: Fixed, d: i64) {
        self.changes.push((r, group, number, d));
        if self.changes.len() >= self.sum_at.max(MINMAX_SUM_AT_LEAST) {
            self.sum();
            self.sum_at = self.changes.len() * 2;
        }
    }

    fn len(&self) -> usize {
        self.changes.len()
    }

    fn sum(&mut self) {
        self.changes
            .sort_unstable_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        self.changes.dedup_by(|later, first| {
            let same = (later.0, &later.1, later.2) == (first.0, &first.1, first.2);
            if same {
                first.3 += later.3;
            }
            same
        });
        self.changes.retain(|c| c.3 != 0);
    }

    /// Sorted by (reducer, group, number), each summed, none 0.
    fn summed(mut self) -> Vec<(u8, GroupKey, Fixed, i64)> {
        self.sum();
        self.changes
    }
}

/// The views of one shard, loaded once per commit of the writer's ([`Deferred`]), with what
/// its writes change.
pub(super) struct ViewSet {
    views: Vec<Loaded>,
    pending: Vec<Pending>,
    /// The shard keeps an async view (not in `views`: the apply does not count for it).
    any_async: bool,
}

impl ViewSet {
    /// The shard's synchronous views (one range lookup when it has none).
    pub(super) fn load(el: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<ViewSet> {
        let mut views = Vec::new();
        let mut any_async = false;
        for (name, def) in defs(el)? {
            if matches!(def.state, ViewState::Overflow { .. }) {
                continue;
            }
            let v = Loaded::new(name, def)?;
            if v.is_async() {
                any_async = true;
            } else {
                views.push(v);
            }
        }
        let pending = views.iter().map(|_| Pending::default()).collect();
        Ok(ViewSet {
            views,
            pending,
            any_async,
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// Whether the shard keeps an async view (its change log's events then carry what it
    /// needs: `changes::fill_prev`).
    pub(super) fn has_async(&self) -> bool {
        self.any_async
    }

    /// Whether writes changed some view's rows.
    pub(super) fn has_pending(&self) -> bool {
        self.pending.iter().any(|p| p.touched)
    }

    /// Of `keys`, those some view counts a change of now (each once).
    pub(super) fn keys_of<'k>(&self, keys: impl IntoIterator<Item = &'k Bytes>) -> Vec<Bytes> {
        if self.views.is_empty() {
            return Vec::new();
        }
        // A command may name a million keys: past a few, a set, not a scan of `out`, keeps
        // this linear; most name one (no set to allocate and hash into per write).
        const SCAN_UP_TO: usize = 8;
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<Bytes> = Vec::new();
        for k in keys {
            if !self.views.iter().any(|v| v.live_for(k)) {
                continue;
            }
            let fresh = if out.len() < SCAN_UP_TO {
                !out.contains(k)
            } else {
                if seen.is_empty() {
                    seen.extend(out.iter().cloned());
                }
                seen.insert(k.clone())
            };
            if fresh {
                out.push(k.clone());
            }
        }
        out
    }

    /// The string values `keys` hold now (what a view counts of them), in `keys`' order.
    pub(super) fn read(
        &self,
        t: &impl ReadableTable<&'static [u8], &'static [u8]>,
        keys: &[Bytes],
    ) -> Result<Vec<Option<Bytes>>> {
        keys.iter().map(|k| counted_value(t, k)).collect()
    }

    /// Counts the change of `keys` from `before` to what they hold now in `t`.
    pub(super) fn account(
        &mut self,
        t: &impl ReadableTable<&'static [u8], &'static [u8]>,
        keys: &[Bytes],
        before: Vec<Option<Bytes>>,
    ) -> Result<()> {
        for (key, before) in keys.iter().zip(before) {
            let after = counted_value(t, key)?;
            self.account_one(key, before, after)?;
        }
        Ok(())
    }

    /// Counts the change of one key from `before` to `after` (the values a view counts).
    pub(super) fn account_one(
        &mut self,
        key: &[u8],
        before: Option<Bytes>,
        after: Option<Bytes>,
    ) -> Result<()> {
        if before == after {
            return Ok(());
        }
        for vi in 0..self.views.len() {
            if !self.views[vi].live_for(key) {
                continue;
            }
            if let Some(v) = &before {
                self.contribute(vi, key, v, -1)?;
            }
            if let Some(v) = &after {
                self.contribute(vi, key, v, 1)?;
            }
        }
        Ok(())
    }

    /// Adds (`sign` 1) or takes back (-1) what `key` holding `value` gives view `vi`.
    fn contribute(&mut self, vi: usize, key: &[u8], value: &[u8], sign: i64) -> Result<()> {
        let v = &self.views[vi];
        let p = &mut self.pending[vi];
        p.touched = true;
        p.counts.keys += sign;
        let Some(mapped) = v.plan.map_key(key, value) else {
            p.counts.skipped += sign;
            return Ok(());
        };
        if mapped.rounded {
            p.counts.rounded += sign;
        }
        for group in mapped.groups {
            add_group(v, p, group, &mapped.numbers, sign)?;
        }
        Ok(())
    }

    /// Changes held: the bound [`Deferred`] keeps them under.
    fn pending_len(&self) -> usize {
        self.pending
            .iter()
            .map(|p| p.rows.len() + p.minmax.len())
            .sum()
    }

    /// Writes the changes held into the views' rows, and holds none after.
    fn write(&mut self, el: &mut RawTable<'_>) -> Result<()> {
        for (v, p) in self.views.iter().zip(self.pending.iter_mut()) {
            if p.touched {
                write_pending(el, v, std::mem::take(p))?;
            }
        }
        Ok(())
    }
}

/// Most changes (group rows plus min/max numbers, over every shard) the views hold in memory
/// between writes of their rows: the storage job that passes it writes them all (so at most
/// this plus one job's changes are held).
pub const DEFERRED_CHANGES_MAX: usize = 1 << 16;

/// The views' changes of every apply in the writer's open transaction, held in memory by
/// shard (with the shard's views, loaded once) and written into their rows when the
/// transaction commits ([`Deferred::flush`]), or before a job that reads or changes the
/// rows or the definitions (`ops::execute`).
///
/// Why: a cluster applies batches of a few writes each, and every storage job that writes a
/// view's rows pays for reading its counts, finding its next sequence number and writing
/// its unfolded rows, which is several times what its writes' own share costs. Nothing
/// reads the rows between those points: readers ask the writer for a commit
/// (`visible.rs`), and the transaction's rows and applied state commit together, so a
/// crash loses both or neither. What the rows hold once written is the same sum whatever
/// the points (folds already differ between replicas: their batches do).
#[derive(Default)]
pub(super) struct Deferred {
    by_table: HashMap<String, ViewSet>,
}

impl Deferred {
    /// The views of `table`'s shard, with the changes held for them.
    pub(super) fn take(
        &mut self,
        table: &str,
        el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    ) -> Result<ViewSet> {
        match self.by_table.remove(table) {
            Some(set) => Ok(set),
            None => ViewSet::load(el),
        }
    }

    /// Holds `set` (taken by [`take`](Self::take) and counted into) until the commit; writes
    /// every change held now if they pass [`DEFERRED_CHANGES_MAX`].
    pub(super) fn keep(
        &mut self,
        txn: &redb::WriteTransaction,
        table: &str,
        set: ViewSet,
    ) -> Result<()> {
        self.by_table.insert(table.to_string(), set);
        let held: usize = self.by_table.values().map(ViewSet::pending_len).sum();
        if held > DEFERRED_CHANGES_MAX {
            self.flush(txn)?;
        }
        Ok(())
    }

    /// Writes every change held and forgets the views loaded (a job after this one may
    /// change them).
    pub(super) fn flush(&mut self, txn: &redb::WriteTransaction) -> Result<()> {
        for (table, mut set) in self.by_table.drain() {
            if set.has_pending() {
                let mut el = txn
                    .open_table(table_def(&crate::layout::element_table(&table)))
                    .map_err(io_err)?;
                set.write(&mut el)?;
            }
        }
        Ok(())
    }
}

/// Adds (`sign` 1) or takes back (-1) one contribution to `group` of view `v`.
fn add_group(
    v: &Loaded,
    p: &mut Pending,
    group: GroupKey,
    numbers: &[Fixed],
    sign: i64,
) -> Result<()> {
    for &(r, slot) in &v.multisets {
        let n = *numbers
            .get(slot)
            .ok_or_else(|| Error::Corruption("a view's value slot".into()))?;
        p.minmax.add(r, group.clone(), n, sign);
    }
    let row = p.rows.entry(group).or_insert_with(|| Row {
        n: 0,
        accs: v.plan.empty_accs(),
    });
    row.n += sign;
    for (i, slot) in v.slots.iter().enumerate() {
        let acc = &mut row.accs[i];
        let c = match (&*acc, slot) {
            (Acc::Count(_), _) => Contribution::One,
            (Acc::Sum(_) | Acc::Avg { .. }, Some(s)) => Contribution::Number(
                *numbers
                    .get(*s)
                    .ok_or_else(|| Error::Corruption("a view's value slot".into()))?,
            ),
            _ => continue,
        };
        let done = if sign > 0 { acc.add(c) } else { acc.retract(c) };
        done.map_err(|e| Error::Corruption(format!("view accumulator: {e}")))?;
    }
    Ok(())
}

/// What one key gives an async view: its map's emits, each a group's parts, a number per
/// value slot (`None`: the emit lacked one, counted as skipped, as a job counts it) and
/// whether a number was rounded.
pub type Emits = [(Vec<Scalar>, Vec<Option<Fixed>>, bool)];

/// The change to an async view's rows one [`ViewCommand::Advance`] carries: computed by the
/// updater off the apply ([`DeltaBuilder`]), added by the apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ViewDelta {
    rows: Vec<(Vec<u8>, Row)>,
    minmax: Vec<(u8, Vec<u8>, Fixed, i64)>,
    keys: i64,
    skipped: i64,
    rounded: i64,
}

impl ViewDelta {
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(self)
    }

    /// Adds `other` (of the same view) to this one.
    pub fn absorb(&mut self, other: ViewDelta) -> Result<()> {
        let mut rows: HashMap<Vec<u8>, Row> = std::mem::take(&mut self.rows).into_iter().collect();
        for (group, row) in other.rows {
            match rows.get_mut(&group) {
                Some(mine) => {
                    mine.n += row.n;
                    for (a, b) in mine.accs.iter_mut().zip(&row.accs) {
                        a.merge(b)
                            .map_err(|e| Error::Corruption(format!("view accumulator: {e}")))?;
                    }
                }
                None => {
                    rows.insert(group, row);
                }
            }
        }
        self.rows = rows.into_iter().collect();
        let mut minmax: HashMap<(u8, Vec<u8>, Fixed), i64> = std::mem::take(&mut self.minmax)
            .into_iter()
            .map(|(r, g, n, d)| ((r, g, n), d))
            .collect();
        for (r, g, n, d) in other.minmax {
            *minmax.entry((r, g, n)).or_default() += d;
        }
        self.minmax = minmax
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .map(|((r, g, n), d)| (r, g, n, d))
            .collect();
        self.keys += other.keys;
        self.skipped += other.skipped;
        self.rounded += other.rounded;
        Ok(())
    }

    fn into_pending(self) -> Pending {
        Pending {
            rows: self
                .rows
                .into_iter()
                .map(|(g, row)| (GroupKey::new(&g), row))
                .collect(),
            minmax: MinMaxChanges {
                changes: self
                    .minmax
                    .into_iter()
                    .map(|(r, g, n, d)| (r, GroupKey::new(&g), n, d))
                    .collect(),
                sum_at: 0,
            },
            counts: Counts {
                keys: self.keys,
                skipped: self.skipped,
                rounded: self.rounded,
                ..Counts::default()
            },
            touched: true,
        }
    }
}

/// Builds an async view's [`ViewDelta`] from what keys held before and after, mapped by the
/// view's Lua (the caller's: storage does not run it).
pub struct DeltaBuilder {
    view: Loaded,
    pending: Pending,
}

impl DeltaBuilder {
    /// For a view of `spec` (its canonical JSON).
    pub fn new(spec: &str) -> Result<DeltaBuilder> {
        let def = ViewDef {
            generation: 0,
            spec: spec.to_string(),
            state: ViewState::Ready,
        };
        Ok(DeltaBuilder {
            view: Loaded::new(Bytes::new(), def)?,
            pending: Pending::default(),
        })
    }

    /// Adds (`sign` 1) or takes back (-1) what one key gives the view.
    pub fn key(&mut self, emits: &Emits, sign: i64) -> Result<()> {
        let p = &mut self.pending;
        p.touched = true;
        p.counts.keys += sign;
        for (parts, numbers, rounded) in emits {
            let Some(numbers) = numbers.iter().copied().collect::<Option<Vec<_>>>() else {
                p.counts.skipped += sign;
                continue;
            };
            if *rounded {
                p.counts.rounded += sign;
            }
            let mut group = Vec::new();
            for s in parts {
                s.encode(&mut group);
            }
            add_group(&self.view, p, GroupKey::new(&group), &numbers, sign)?;
        }
        Ok(())
    }

    pub fn finish(self) -> ViewDelta {
        let p = self.pending;
        ViewDelta {
            rows: p
                .rows
                .into_iter()
                .map(|(g, row)| (g.as_bytes().to_vec(), row))
                .collect(),
            minmax: p
                .minmax
                .summed()
                .into_iter()
                .map(|(r, g, n, d)| (r, g.as_bytes().to_vec(), n, d))
                .collect(),
            keys: p.counts.keys,
            skipped: p.counts.skipped,
            rounded: p.counts.rounded,
        }
    }
}

fn pos_key(name: &[u8], generation: u64) -> Vec<u8> {
    gen_prefix(POS, name, generation)
}

/// An async view's position on this shard (0 before its first).
fn position(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &ViewDef,
    name: &[u8],
) -> Result<u64> {
    match el.get(&pos_key(name, v.generation)[..]).map_err(io_err)? {
        Some(raw) => Ok(int(raw.value())? as u64),
        None => Ok(0),
    }
}

/// Stops every async view of the shard (`overflow` with `why`): its change log no longer
/// carries what it counts from. Applied in the entry that turns the log (or its previous
/// values) off, so no update can read past the gap.
pub(super) fn stop_async(el: &mut RawTable<'_>, why: &str) -> Result<()> {
    for (name, mut def) in defs(el)? {
        if matches!(def.state, ViewState::Overflow { .. })
            || !Loaded::new(name.clone(), def.clone())?.is_async()
        {
            continue;
        }
        def.state = ViewState::Overflow {
            why: format!("{why}: VIEW DROP it and CREATE it again"),
        };
        el.insert(&def_key(&name)[..], &encode(&def)?[..])
            .map_err(io_err)?;
    }
    Ok(())
}

/// After FLUSHDB (whose rows went with the data): every async view counts from the flush's
/// own event, at `clock`, on (events before it were of keys that are gone).
pub(super) fn after_flush(
    x: &super::ops::Exec,
    table: &str,
    clock: capdb_types::Timestamp,
) -> Result<()> {
    let mut el: RawTable<'_> = x
        .txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    for (name, def) in defs(&el)? {
        if Loaded::new(name.clone(), def.clone())?.is_async() {
            el.insert(
                &pos_key(&name, def.generation)[..],
                &clock.0.to_le_bytes()[..],
            )
            .map_err(io_err)?;
        }
    }
    Ok(())
}

/// A page of the keys a view reads, in key order ([`counted_page`]).
struct CountedPage {
    /// The keys the view counts and their string values.
    entries: Vec<(Bytes, Bytes)>,
    /// Keys examined (strings or not).
    scanned: usize,
    /// The last key examined.
    last: Option<Bytes>,
    /// No key of the view's input is left after the page.
    exhausted: bool,
}

/// The keys of `input` after `after` (`None`: from the first) in `t`, at most `keys_max`
/// and about [`BACKFILL_BYTES_MAX`] bytes: what a build step or a recomputation adds.
fn counted_page(
    t: Option<&impl ReadableTable<&'static [u8], &'static [u8]>>,
    input: &capdb_reduce::spec::Input,
    after: Option<&[u8]>,
    keys_max: usize,
) -> Result<CountedPage> {
    let mut page = CountedPage {
        entries: Vec::new(),
        scanned: 0,
        last: None,
        exhausted: true,
    };
    let Some(t) = t else {
        return Ok(page);
    };
    let prefix = input.scan_prefix();
    let lower = match after {
        Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
        _ => std::ops::Bound::Included(prefix),
    };
    let mut bytes = 0;
    for r in t
        .range::<&[u8]>((lower, std::ops::Bound::Unbounded))
        .map_err(io_err)?
    {
        let (k, v) = r.map_err(io_err)?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        if page.scanned >= keys_max || bytes >= BACKFILL_BYTES_MAX {
            page.exhausted = false;
            break;
        }
        page.scanned += 1;
        bytes += key.len() + v.value().len();
        if let Some(value) = decoded_string(key, v.value())
            && input.wants(key)
        {
            page.entries.push((Bytes::copy_from_slice(key), value));
        }
        page.last = Some(Bytes::copy_from_slice(key));
    }
    Ok(page)
}

/// The value of `key` a view counts: a string, not a tombstone, expired or not.
fn counted_value(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<Bytes>> {
    let Some(raw) = t.get(key).map_err(io_err)? else {
        return Ok(None);
    };
    Ok(decoded_string(key, raw.value()))
}

/// A record's string value, if it is one a view counts (not a tombstone; expired or not).
pub(super) fn counted(v: capdb_types::value::Value) -> Option<Bytes> {
    (!v.header.tombstone && v.is_string()).then_some(v.data)
}

/// A stored record's string value, if it is one a view counts. A record that does not
/// decode is not counted (logged): failing the apply would stop the replica for good, and a
/// write must stay able to replace a corrupt key (its repair).
fn decoded_string(key: &[u8], raw: &[u8]) -> Option<Bytes> {
    match capdb_types::value::Value::decode(raw) {
        Ok(v) => (!v.header.tombstone && v.is_string()).then_some(v.data),
        Err(e) => {
            tracing::error!(key = ?Bytes::copy_from_slice(key), error = %e, "a corrupt record is not counted by views");
            None
        }
    }
}

/// Unfolded changes to a view's rows: `(group, change)`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Unfolded {
    rows: Vec<(Vec<u8>, Row)>,
}

fn merge_row(into: &mut Row, change: &Row) -> Result<()> {
    into.n += change.n;
    for (a, d) in into.accs.iter_mut().zip(&change.accs) {
        a.merge(d)
            .map_err(|e| Error::Corruption(format!("view accumulator: {e}")))?;
    }
    Ok(())
}

fn dlt_key(name: &[u8], generation: u64, seq: u64) -> Vec<u8> {
    let mut k = gen_prefix(DLT, name, generation);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The unfolded changes of a view's rows, merged by group (what every read adds to the
/// rows), and the keys of their rows.
#[allow(clippy::type_complexity)]
fn unfolded_rows(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    generation: u64,
) -> Result<(std::collections::BTreeMap<Vec<u8>, Row>, Vec<Vec<u8>>)> {
    let prefix = gen_prefix(DLT, name, generation);
    let mut merged: std::collections::BTreeMap<Vec<u8>, Row> = std::collections::BTreeMap::new();
    let mut keys = Vec::new();
    for r in el.range(&prefix[..]..).map_err(io_err)? {
        let (k, raw) = r.map_err(io_err)?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        keys.push(k.value().to_vec());
        let u: Unfolded = decode(raw.value(), "a view's unfolded change")?;
        for (group, change) in u.rows {
            match merged.get_mut(&group) {
                Some(row) => merge_row(row, &change)?,
                None => {
                    merged.insert(group, change);
                }
            }
        }
    }
    Ok((merged, keys))
}

/// [`unfolded_rows`] without the keys.
fn unfolded(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
) -> Result<std::collections::BTreeMap<Vec<u8>, Row>> {
    Ok(unfolded_rows(el, &v.name, v.def.generation)?.0)
}

/// A row as reads see it: the folded one with its unfolded change, `None` when the group
/// has no contribution left.
fn merged_row(folded: Option<Row>, change: Option<&Row>) -> Result<Option<Row>> {
    let row = match (folded, change) {
        (Some(mut r), Some(c)) => {
            merge_row(&mut r, c)?;
            r
        }
        (Some(r), None) => r,
        (None, Some(c)) => c.clone(),
        (None, None) => return Ok(None),
    };
    Ok((row.n > 0).then_some(row))
}

fn write_pending(el: &mut RawTable<'_>, v: &Loaded, p: Pending) -> Result<()> {
    let (name, generation) = (&v.name[..], v.def.generation);
    let cnt_key = gen_prefix(CNT, name, generation);
    let mut counts: Counts = get(el, &cnt_key, "a view's counts")?.unwrap_or_default();
    counts.keys += p.counts.keys;
    counts.skipped += p.counts.skipped;
    counts.rounded += p.counts.rounded;
    // The rows' change is kept as one unfolded row, until there are `UNFOLDED_MAX` of them:
    // then they and this one are folded into the rows.
    let next = next_seq(el, DLT, name, generation)?;
    let rows: Vec<(Vec<u8>, Row)> = if p.rows.is_empty() {
        Vec::new()
    } else if next + 1 < UNFOLDED_MAX {
        // In group order: the same change gives the same bytes (a hash map's order would not).
        let mut rows: Vec<(Vec<u8>, Row)> = p
            .rows
            .into_iter()
            .map(|(g, row)| (g.as_bytes().to_vec(), row))
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let change = Unfolded { rows };
        el.insert(&dlt_key(name, generation, next)[..], &encode(&change)?[..])
            .map_err(io_err)?;
        Vec::new()
    } else {
        let (mut merged, keys) = unfolded_rows(el, name, generation)?;
        for k in &keys {
            el.remove(&k[..]).map_err(io_err)?;
        }
        for (group, change) in p.rows {
            match merged.get_mut(group.as_bytes()) {
                Some(row) => merge_row(row, &change)?,
                None => {
                    merged.insert(group.as_bytes().to_vec(), change);
                }
            }
        }
        merged.into_iter().collect()
    };
    for (group, delta) in rows {
        let key = row_key(name, generation, &group);
        let stored: Option<Row> = get(el, &key, "a view row")?;
        let existed = stored.is_some();
        let mut row = stored.unwrap_or_else(|| Row {
            n: 0,
            accs: v.plan.empty_accs(),
        });
        merge_row(&mut row, &delta)?;
        if row.n <= 0 {
            if row.n < 0 {
                tracing::error!(view = ?v.name, n = row.n, "a view group counted below zero");
            }
            if existed {
                el.remove(&key[..]).map_err(io_err)?;
                counts.groups -= 1;
            }
        } else {
            el.insert(&key[..], &encode(&row)?[..]).map_err(io_err)?;
            if !existed {
                counts.groups += 1;
            }
        }
    }
    write_minmax(el, v, p.minmax, &mut counts)?;
    el.insert(&cnt_key[..], &encode(&counts)?[..])
        .map_err(io_err)?;
    Ok(())
}

/// The sequence number the next unfolded change of `kind` (`DLT`, `DMM`) takes.
fn next_seq(el: &RawTable<'_>, kind: &[u8], name: &[u8], generation: u64) -> Result<u64> {
    Ok(next_unfolded(el, kind, name, generation)?.0)
}

/// The sequence number the next unfolded change of `kind` takes, and how many changes the
/// unfolded rows hold before it (`DMM` keys carry the running count after the sequence
/// number: `seq u64 BE‖held u64 BE`; keys of 8 bytes, from before, count none).
fn next_unfolded(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    kind: &[u8],
    name: &[u8],
    generation: u64,
) -> Result<(u64, u64)> {
    let prefix = gen_prefix(kind, name, generation);
    let mut upper = prefix.clone();
    upper.extend_from_slice(&[0xff; 9]);
    let last = el
        .range(&prefix[..]..&upper[..])
        .map_err(io_err)?
        .next_back()
        .transpose()
        .map_err(io_err)?
        .map(|(k, _)| {
            let rest = &k.value()[prefix.len()..];
            let word = |at: usize| {
                rest.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| Error::Corruption("a view's unfolded change key".into()))
            };
            match rest.len() {
                8 => Ok((word(0)?, 0)),
                16 => Ok((word(0)?, word(8)?)),
                _ => Err(Error::Corruption("a view's unfolded change key".into())),
            }
        })
        .transpose()?;
    Ok(last.map_or((0, 0), |(seq, held)| (seq + 1, held)))
}

/// Unfolded changes to a view's min/max multisets: `(owner reducer, group, number, change)`,
/// sorted, no change 0.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UnfoldedMm {
    /// The group as [`GroupKey`]: the same stored bytes as a `Vec<u8>`, read and sorted with
    /// no allocation of its own (a fold reads and sorts 16,384 of them).
    rows: Vec<(u8, GroupKey, Fixed, i64)>,
}

/// An upper bound of the numbers the view's unfolded multiset changes add to its multisets:
/// the running count of changes the last unfolded row's key carries (every change, added or
/// taken back), read with no decoding. Rows from before keys carried it count none, so while
/// the first row is one of those, the additions are counted row by row.
fn unfolded_mm_additions(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    generation: u64,
) -> Result<i64> {
    let prefix = gen_prefix(DMM, name, generation);
    let mut upper = prefix.clone();
    upper.extend_from_slice(&[0xff; 9]);
    let mut rows = el.range(&prefix[..]..&upper[..]).map_err(io_err)?;
    let first_counts = match rows.next().transpose().map_err(io_err)? {
        None => return Ok(0),
        Some((k, _)) => k.value().len() == prefix.len() + 16,
    };
    if first_counts {
        let (_, held) = next_unfolded(el, DMM, name, generation)?;
        return Ok(i64::try_from(held).unwrap_or(i64::MAX));
    }
    let mut added = 0i64;
    for r in el.range(&prefix[..]..&upper[..]).map_err(io_err)? {
        let (_, raw) = r.map_err(io_err)?;
        let u: UnfoldedMm = decode(raw.value(), "a view's unfolded min/max change")?;
        added += u.rows.iter().filter(|c| c.3 > 0).count() as i64;
    }
    Ok(added)
}

/// The unfolded multiset changes of a view, each number's summed.
#[allow(clippy::type_complexity)]
fn unfolded_mm_rows(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    generation: u64,
) -> Result<HashMap<(u8, Vec<u8>, Fixed), i64>> {
    let prefix = gen_prefix(DMM, name, generation);
    let mut merged: HashMap<(u8, Vec<u8>, Fixed), i64> = HashMap::new();
    for r in el.range(&prefix[..]..).map_err(io_err)? {
        let (k, raw) = r.map_err(io_err)?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        let u: UnfoldedMm = decode(raw.value(), "a view's unfolded min/max change")?;
        for (r, group, number, d) in u.rows {
            *merged
                .entry((r, group.as_bytes().to_vec(), number))
                .or_default() += d;
        }
    }
    Ok(merged)
}

/// What reads of a view's extremes need besides its rows: how its multisets are kept, and
/// its unfolded multiset changes by (owner reducer, group), which they add to the
/// multisets' rows (none for a view with no min or max).
struct MmChanges {
    chunked: bool,
    by_group: HashMap<(u8, Vec<u8>), std::collections::BTreeMap<Fixed, i64>>,
}

fn unfolded_mm(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
) -> Result<MmChanges> {
    let mut out = MmChanges {
        chunked: multisets_chunked(el, &v.name, v.def.generation)?,
        by_group: HashMap::new(),
    };
    if v.multisets.is_empty() {
        return Ok(out);
    }
    for ((r, group, number), d) in unfolded_mm_rows(el, &v.name, v.def.generation)? {
        if d != 0 {
            out.by_group
                .entry((r, group))
                .or_default()
                .insert(number, d);
        }
    }
    Ok(out)
}

/// How many keys give `group` `number` in the multiset of reducer `r`, as its folded rows
/// hold it.
fn stored_count(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
    chunked: bool,
    r: u8,
    group: &[u8],
    number: Fixed,
) -> Result<Option<i64>> {
    if chunked {
        let prefix = multiset_prefix(MMC, &v.name, v.def.generation, r, group);
        return Ok(chunk_for(el, &prefix, number)?.and_then(|(_, chunk)| {
            chunk
                .binary_search_by(|(n, _)| n.cmp(&number))
                .ok()
                .map(|i| chunk[i].1)
        }));
    }
    let mut key = multiset_prefix(MM, &v.name, v.def.generation, r, group);
    key.extend_from_slice(&sortable(number));
    match el.get(&key[..]).map_err(io_err)? {
        Some(raw) => Ok(Some(int(raw.value())?)),
        None => Ok(None),
    }
}

/// Chunks a fold reads before it writes them: what it holds decoded at once (64 numbers
/// each, ~1.5 KB: ~400 KB).
const FOLD_BATCH_CHUNKS: usize = 256;

/// A chunk a fold rewrites: its key (empty: a new chunk), its numbers, the changes it takes.
type Taking<'c> = (Vec<u8>, Chunk, &'c [(Fixed, i64)]);

/// A chunk's value as a fold's pass finds it.
enum Value<'a> {
    Decoded(Chunk),
    Stored(redb::AccessGuard<'a, &'static [u8]>),
}

/// Folds one group's changes (`changes`: ascending numbers, none 0) into its chunked
/// multiset of reducer `r`; counts the numbers it adds and removes into `counts.minmax_rows`.
///
/// A chunk takes the changes below the next chunk's first number. The chunks are found by
/// one pass over the group's keys from the chunk that takes the first change (a B-tree
/// descent, then neighbouring leaves), in batches of [`FOLD_BATCH_CHUNKS`] chunks that take
/// changes, each then written back: looking each chunk up on its own cost four descents per
/// chunk (its own, the next chunk's, a remove and an insert), the most of a min/max view's
/// fold (sixteenth session's profile: redb's page reads +60 % per write with the view).
fn fold_chunks(
    el: &mut RawTable<'_>,
    v: &Loaded,
    r: u8,
    group: &[u8],
    changes: &[(Fixed, i64)],
    counts: &mut Counts,
) -> Result<()> {
    let prefix = multiset_prefix(MMC, &v.name, v.def.generation, r, group);
    let upper = group_upper(&prefix);
    let mut rest = changes;
    while let Some(&(first_change, _)) = rest.first() {
        // (chunk key, its numbers, the changes it takes)
        let mut batch: Vec<Taking<'_>> = Vec::new();
        match chunk_for(el, &prefix, first_change)? {
            // No chunk in the group: a new one takes every change (an empty key: nothing
            // to replace).
            None => {
                batch.push((Vec::new(), Vec::new(), rest));
                rest = &[];
            }
            Some((start, start_chunk)) => {
                let mut keys = el.range::<&[u8]>(&start[..]..&upper[..]).map_err(io_err)?;
                // The start chunk itself (read above) comes first.
                keys.next();
                // The chunk looked at: its key, and its value decoded (the start chunk) or
                // not yet (decoded only if it takes changes, known once the next key is read).
                let mut key = start;
                let mut value = Value::Decoded(start_chunk);
                loop {
                    let next = keys.next().transpose().map_err(io_err)?;
                    let next_first = next
                        .as_ref()
                        .map(|(k, _)| {
                            unsortable(&k.value()[prefix.len()..]).ok_or_else(|| {
                                Error::Corruption("a view's multiset chunk key".into())
                            })
                        })
                        .transpose()?;
                    let taken =
                        next_first.map_or(rest.len(), |n| rest.partition_point(|(x, _)| *x < n));
                    if taken > 0 {
                        let chunk = match value {
                            Value::Decoded(chunk) => chunk,
                            Value::Stored(raw) => decode(raw.value(), "a view's multiset chunk")?,
                        };
                        let (mine, later) = rest.split_at(taken);
                        batch.push((key, chunk, mine));
                        rest = later;
                    }
                    let Some((k, raw)) = next else { break };
                    if rest.is_empty() || batch.len() >= FOLD_BATCH_CHUNKS {
                        break;
                    }
                    key = k.value().to_vec();
                    value = Value::Stored(raw);
                }
            }
        }
        for (key, chunk, mine) in batch {
            fold_chunk(el, &prefix, key, chunk, mine, counts)?;
        }
    }
    Ok(())
}

/// Writes chunk `chunk` (stored under `key`; empty: a new one) with `mine` (ascending, none 0)
/// merged into it, split in equal parts past [`CHUNK_NUMBERS_MAX`], each under its first number.
fn fold_chunk(
    el: &mut RawTable<'_>,
    prefix: &[u8],
    key: Vec<u8>,
    chunk: Chunk,
    mine: &[(Fixed, i64)],
    counts: &mut Counts,
) -> Result<()> {
    // Both ascending: merged in one pass.
    let mut merged: Chunk = Vec::with_capacity(chunk.len() + mine.len());
    let (mut a, mut b) = (chunk.into_iter().peekable(), mine.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => a.next(),
            (None, Some(&&(n, d))) => {
                b.next();
                counts.minmax_rows += 1;
                Some((n, d))
            }
            (Some(&(x, c)), Some(&&(n, d))) => match x.cmp(&n) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => {
                    b.next();
                    counts.minmax_rows += 1;
                    Some((n, d))
                }
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next();
                    if c + d == 0 {
                        counts.minmax_rows -= 1;
                        None
                    } else {
                        Some((x, c + d))
                    }
                }
            },
        };
        merged.extend(next);
    }
    // Each part is stored under its first number.
    let parts = merged.len().div_ceil(CHUNK_NUMBERS_MAX);
    let same_key = parts == 1 && !key.is_empty() && key[prefix.len()..] == sortable(merged[0].0);
    if !key.is_empty() && !same_key {
        el.remove(&key[..]).map_err(io_err)?;
    }
    if parts > 0 {
        let per_part = merged.len().div_ceil(parts);
        for part in merged.chunks(per_part) {
            let mut k = prefix.to_vec();
            k.extend_from_slice(&sortable(part[0].0));
            el.insert(&k[..], &encode(&part)?[..]).map_err(io_err)?;
        }
    }
    Ok(())
}

/// Writes a commit's change to view `v`'s multisets: one unfolded row, or, when
/// [`UNFOLDED_MM_ROWS_MAX`] or [`UNFOLDED_MM_CHANGES_MAX`] are reached, all of them folded
/// into the multisets' rows in key order.
fn write_minmax(
    el: &mut RawTable<'_>,
    v: &Loaded,
    minmax: MinMaxChanges,
    counts: &mut Counts,
) -> Result<()> {
    let (name, generation) = (&v.name[..], v.def.generation);
    // Sorted (the same change gives the same bytes) and summed.
    let mut changes = minmax.summed();
    if changes.is_empty() {
        return Ok(());
    }
    let (next, held) = next_unfolded(el, DMM, name, generation)?;
    let held = held.saturating_add(changes.len() as u64);
    if next + 1 < UNFOLDED_MM_ROWS_MAX && held < UNFOLDED_MM_CHANGES_MAX {
        let mut key = gen_prefix(DMM, name, generation);
        key.extend_from_slice(&next.to_be_bytes());
        key.extend_from_slice(&held.to_be_bytes());
        let change = UnfoldedMm { rows: changes };
        el.insert(&key[..], &encode(&change)?[..]).map_err(io_err)?;
        return Ok(());
    }
    // Every unfolded change and this one.
    let prefix = gen_prefix(DMM, name, generation);
    let mut stored: Vec<Vec<u8>> = Vec::new();
    for e in el.range(&prefix[..]..).map_err(io_err)? {
        let (k, raw) = e.map_err(io_err)?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        stored.push(k.value().to_vec());
        let u: UnfoldedMm = decode(raw.value(), "a view's unfolded min/max change")?;
        changes.extend(u.rows);
    }
    for k in &stored {
        el.remove(&k[..]).map_err(io_err)?;
    }
    if multisets_chunked(el, name, generation)? {
        // Sorted and summed per (reducer, group, number); each group's run folded into its
        // chunks. A stable sort: it finds the unfolded rows' sorted runs and merges them.
        changes.sort();
        changes.dedup_by(|later, first| {
            let same = (later.0, &later.1, later.2) == (first.0, &first.1, first.2);
            if same {
                first.3 += later.3;
            }
            same
        });
        changes.retain(|c| c.3 != 0);
        let mut run: Vec<(Fixed, i64)> = Vec::new();
        let mut i = 0;
        while i < changes.len() {
            let (r, group) = (changes[i].0, &changes[i].1);
            run.clear();
            while i < changes.len() && changes[i].0 == r && &changes[i].1 == group {
                run.push((changes[i].2, changes[i].3));
                i += 1;
            }
            fold_chunks(el, v, r, group.as_bytes(), &run, counts)?;
        }
        return Ok(());
    }
    // As (multiset row key, change), sorted and summed per row: in the multisets' key
    // order, neighbouring changes share a page.
    let mut rows: Vec<(Vec<u8>, i64)> = changes
        .into_iter()
        .map(|(r, group, number, d)| {
            let mut key = multiset_prefix(MM, name, generation, r, group.as_bytes());
            key.extend_from_slice(&sortable(number));
            (key, d)
        })
        .collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|later, first| {
        let same = later.0 == first.0;
        if same {
            first.1 += later.1;
        }
        same
    });
    for (key, delta) in rows.into_iter().filter(|(_, d)| *d != 0) {
        let stored = match el.get(&key[..]).map_err(io_err)? {
            Some(raw) => Some(int(raw.value())?),
            None => None,
        };
        let n = stored.unwrap_or(0) + delta;
        if n == 0 {
            el.remove(&key[..]).map_err(io_err)?;
            counts.minmax_rows -= 1;
        } else {
            el.insert(&key[..], &n.to_le_bytes()[..]).map_err(io_err)?;
            if stored.is_none() {
                counts.minmax_rows += 1;
            }
        }
    }
    Ok(())
}

/// Why view `v` is past its bounds on this replica (its folded groups plus the groups only
/// its unfolded changes hold, or its min/max rows), if it is: what the shard's leader
/// proposes [`ViewCommand::Overflow`] for.
fn over_bounds(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
) -> Result<Option<String>> {
    let counts: Counts = get(
        el,
        &gen_prefix(CNT, &v.name, v.def.generation),
        "a view's counts",
    )?
    .unwrap_or_default();
    let mut minmax_rows = counts.minmax_rows;
    // Only when the unfolded changes could take the rows past the bound (an upper bound of
    // the numbers they add, read from the last unfolded row's key) are they merged and each
    // looked up: a number they add may be kept already. The leader asks every 500 ms; the
    // merge costs an allocation per change.
    if !v.multisets.is_empty()
        && minmax_rows + unfolded_mm_additions(el, &v.name, v.def.generation)?
            > VIEW_MINMAX_ROWS_MAX
    {
        let changes = unfolded_mm(el, v)?;
        for ((r, group), numbers) in &changes.by_group {
            for (number, d) in numbers {
                let stored = stored_count(el, v, changes.chunked, *r, group, *number)?;
                match stored {
                    None if *d > 0 => minmax_rows += 1,
                    Some(n) if n + d == 0 => minmax_rows -= 1,
                    _ => {}
                }
            }
        }
    }
    if minmax_rows > VIEW_MINMAX_ROWS_MAX {
        return Ok(Some(format!(
            "more than {VIEW_MINMAX_ROWS_MAX} distinct min/max values on a shard"
        )));
    }
    let mut groups = counts.groups;
    for (group, change) in unfolded(el, v)? {
        let row = row_key(&v.name, v.def.generation, &group);
        if change.n > 0 && el.get(&row[..]).map_err(io_err)?.is_none() {
            groups += 1;
        }
    }
    Ok(
        (groups > VIEW_GROUPS_MAX)
            .then(|| format!("more than {VIEW_GROUPS_MAX} groups on a shard")),
    )
}

/// Every view definition of the shard, by name.
pub(super) fn defs(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<(Bytes, ViewDef)>> {
    let prefix = def_prefix();
    let mut out = Vec::new();
    for r in el.range(&prefix[..]..).map_err(io_err)? {
        let (k, v) = r.map_err(io_err)?;
        let Some(name) = k.value().strip_prefix(&prefix[..]) else {
            break;
        };
        out.push((
            Bytes::copy_from_slice(name),
            decode(v.value(), "a view definition")?,
        ));
    }
    Ok(out)
}

/// The element-table rows a FLUSHDB carries over: the definitions, ready (an empty
/// keyspace has nothing left to count). Their rows and the purges go with the table.
pub(super) fn carried_rows(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for (name, mut def) in defs(el)? {
        if multisets_chunked(el, &name, def.generation)? {
            out.push((gen_prefix(MMC, &name, def.generation), Vec::new()));
        }
        def.state = ViewState::Ready;
        out.push((def_key(&name), encode(&def)?));
    }
    Ok(out)
}

fn refuse(line: impl Into<String>) -> Result<Result<Reply>> {
    Ok(Err(Error::Command(line.into())))
}

/// Applies one view command to shard `table` (data in `table`, rows in `el_table`).
pub(super) fn apply(
    x: &super::ops::Exec,
    table: &str,
    el_table: &str,
    cmd: &ViewCommand,
) -> Result<Result<Reply>> {
    let name = cmd.name();
    if !name_is_valid(name) {
        return refuse("ERR a view name is 1 to 64 of A-Z a-z 0-9 _ -");
    }
    let mut el: RawTable<'_> = x.txn.open_table(table_def(el_table)).map_err(io_err)?;
    let dkey = def_key(name);
    let current: Option<ViewDef> = get(&el, &dkey, "a view definition")?;
    match cmd {
        ViewCommand::Define {
            generation, spec, ..
        } => {
            if let Some(def) = current {
                if &def.spec == spec {
                    return Ok(Ok(Reply::Array(vec![
                        Reply::Integer(def.generation as i64),
                        Reply::Bulk(Bytes::from_static(b"exists")),
                    ])));
                }
                return refuse(format!(
                    "ERR view '{}' exists with another spec (VIEW DROP it first)",
                    String::from_utf8_lossy(name)
                ));
            }
            if let Err(e) = JobSpec::parse(spec.as_bytes()).and_then(|s| s.check_view()) {
                return refuse(format!("ERR view spec: {e}"));
            }
            if defs(&el)?.len() >= VIEWS_MAX {
                return refuse(format!(
                    "ERR at most {VIEWS_MAX} views per keyspace (VIEW DROP one)"
                ));
            }
            if el
                .get(&gen_prefix(GONE, name, *generation)[..])
                .map_err(io_err)?
                .is_some()
            {
                return refuse("ERR that generation of the view is still being dropped");
            }
            let def = ViewDef {
                generation: *generation,
                spec: spec.clone(),
                state: ViewState::Building {
                    cursor: None,
                    keys_done: 0,
                },
            };
            if Loaded::new(name.clone(), def.clone())?.is_async() {
                // Kept from the change log: it must be on, with each event's previous value.
                let log = super::changes::ChangeLog::load(&el)?;
                if !log.wants_prev() {
                    return refuse(
                        "ERR a Lua view is kept from the keyspace's change log: turn it on with previous values first (CHANGES CONFIG <keyspace> ON PREV yes)",
                    );
                }
                el.insert(
                    &pos_key(name, *generation)[..],
                    &log.clock().0.to_le_bytes()[..],
                )
                .map_err(io_err)?;
            }
            el.insert(&dkey[..], &encode(&def)?[..]).map_err(io_err)?;
            // Its multisets are kept in chunks.
            el.insert(&gen_prefix(MMC, name, *generation)[..], &[][..])
                .map_err(io_err)?;
            Ok(Ok(Reply::Array(vec![
                Reply::Integer(*generation as i64),
                Reply::Bulk(Bytes::from_static(b"created")),
            ])))
        }
        ViewCommand::Drop { .. } => {
            let Some(def) = current else {
                return Ok(Ok(Reply::Integer(0)));
            };
            el.remove(&dkey[..]).map_err(io_err)?;
            el.insert(&gen_prefix(GONE, name, def.generation)[..], &[][..])
                .map_err(io_err)?;
            Ok(Ok(Reply::Integer(1)))
        }
        ViewCommand::Purge { generation, .. } => {
            if current
                .as_ref()
                .is_some_and(|d| d.generation == *generation)
            {
                return refuse("ERR that generation of the view is defined: VIEW DROP first");
            }
            let mut deleted = 0;
            for kind in [ROW, DLT, MM, MMC, DMM, CNT, POS] {
                let prefix = gen_prefix(kind, name, *generation);
                let keys: Vec<Vec<u8>> = el
                    .range(&prefix[..]..)
                    .map_err(io_err)?
                    .map(|r| r.map(|(k, _)| k.value().to_vec()).map_err(io_err))
                    .take_while(|k| k.as_ref().map_or(true, |k| k.starts_with(&prefix)))
                    .take(PURGE_ROWS_MAX - deleted)
                    .collect::<Result<_>>()?;
                for k in &keys {
                    el.remove(&k[..]).map_err(io_err)?;
                }
                deleted += keys.len();
                if deleted >= PURGE_ROWS_MAX {
                    break;
                }
            }
            if deleted == 0 {
                el.remove(&gen_prefix(GONE, name, *generation)[..])
                    .map_err(io_err)?;
            }
            Ok(Ok(Reply::Integer(deleted as i64)))
        }
        ViewCommand::Advance {
            from, to, delta, ..
        } => {
            let Some(def) = current else {
                return refuse("ERR no such view here");
            };
            let here = AsyncAt {
                generation: def.generation,
                state: def.state.clone(),
                position: position(&el, &def, name)?,
            };
            if here != *from {
                // A repeated, stale or concurrent update: it counts nothing.
                return Ok(Ok(advance_reply(&here)));
            }
            let old = Loaded::new(name.clone(), def.clone())?;
            if !old.is_async() {
                return refuse("ERR only a Lua view advances from the change log");
            }
            let delta: ViewDelta = decode(delta, "a view's delta")?;
            if to.generation != from.generation {
                // Rebuilt from nothing: the old generation's rows go in the background.
                if el
                    .get(&gen_prefix(GONE, name, to.generation)[..])
                    .map_err(io_err)?
                    .is_some()
                {
                    return refuse("ERR that generation of the view is still being dropped");
                }
                el.insert(&gen_prefix(GONE, name, from.generation)[..], &[][..])
                    .map_err(io_err)?;
            }
            let mut def = def;
            def.generation = to.generation;
            def.state = to.state.clone();
            el.insert(&dkey[..], &encode(&def)?[..]).map_err(io_err)?;
            el.insert(
                &pos_key(name, to.generation)[..],
                &to.position.to_le_bytes()[..],
            )
            .map_err(io_err)?;
            if delta != ViewDelta::default() {
                let v = Loaded::new(name.clone(), def.clone())?;
                write_pending(&mut el, &v, delta.into_pending())?;
            }
            // `write_pending` may have turned it `overflow`: answer what is stored.
            let stored: ViewDef = get(&el, &dkey, "a view definition")?.unwrap_or(def);
            let position = position(&el, &stored, name)?;
            Ok(Ok(advance_reply(&AsyncAt {
                generation: stored.generation,
                state: stored.state,
                position,
            })))
        }
        ViewCommand::Overflow {
            generation, why, ..
        } => {
            let Some(mut def) = current.filter(|d| d.generation == *generation) else {
                return refuse("ERR no such view generation here");
            };
            if !matches!(def.state, ViewState::Overflow { .. }) {
                tracing::warn!(view = ?name, why, "view overflow: no longer kept");
                def.state = ViewState::Overflow { why: why.clone() };
                el.insert(&dkey[..], &encode(&def)?[..]).map_err(io_err)?;
            }
            Ok(Ok(state_reply(&def)))
        }
        ViewCommand::Backfill {
            generation, after, ..
        } => {
            let Some(mut def) = current.filter(|d| d.generation == *generation) else {
                return refuse("ERR no such view generation here");
            };
            if Loaded::new(name.clone(), def.clone())?.is_async() {
                return refuse("ERR a Lua view is built by its updater (ViewCommand::Advance)");
            }
            let ViewState::Building { cursor, keys_done } = &def.state else {
                return Ok(Ok(state_reply(&def)));
            };
            if cursor != after {
                // A repeated or stale proposal: the cursor already moved.
                return Ok(Ok(state_reply(&def)));
            }
            let (cursor, keys_done) = (cursor.clone(), *keys_done);
            let loaded = Loaded::new(name.clone(), def.clone())?;
            let mut set = ViewSet {
                views: vec![loaded],
                pending: vec![Pending::default()],
                any_async: false,
            };
            let t = x.txn.open_table(table_def(table)).map_err(io_err)?;
            let page = counted_page(
                Some(&t),
                &set.views[0].plan.spec().input,
                cursor.as_deref(),
                BACKFILL_KEYS_MAX,
            )?;
            for (key, value) in &page.entries {
                set.contribute(0, key, value, 1)?;
            }
            let (scanned, last, exhausted) = (page.scanned, page.last, page.exhausted);
            drop(t);
            def.state = if exhausted {
                ViewState::Ready
            } else {
                ViewState::Building {
                    cursor: last.or(cursor),
                    keys_done: keys_done + scanned as u64,
                }
            };
            set.views[0].def = def.clone();
            el.insert(&dkey[..], &encode(&def)?[..]).map_err(io_err)?;
            set.write(&mut el)?;
            // `write` may have turned it `overflow`: answer what is stored.
            let stored: Option<ViewDef> = get(&el, &dkey, "a view definition")?;
            Ok(Ok(state_reply(&stored.unwrap_or(def))))
        }
    }
}

/// `[state, position]`.
fn advance_reply(at: &AsyncAt) -> Reply {
    Reply::Array(vec![
        Reply::Bulk(Bytes::from_static(at.state.name().as_bytes())),
        Reply::Integer(at.position as i64),
    ])
}

/// What an async view's updater reads, from one snapshot (`txn`) of shard `table`
/// (`capdb.views async name`). Answers one of:
///
/// - `["ok", from, to, [[key, before|nil, after|nil], ...], [[key, value], ...]]`: where
///   the view stands (`from`, postcard [`AsyncAt`]) and where it goes once the updater adds
///   what the listed changes (the events after its position that it counts, at most
///   [`ADVANCE_EVENTS_MAX`], whole entries) and, while it builds and every event is read,
///   the next keys (at most [`ADVANCE_KEYS_MAX`], the string values it counts) give;
/// - `["lost", from, to]`: events it needs went (the retention, or a snapshot this replica
///   installed): `to` rebuilds it from this snapshot under a new generation;
/// - `["off", from, why]`: the change log no longer carries what it needs.
pub(super) fn async_read(txn: &redb::ReadTransaction, table: &str, name: &[u8]) -> Result<Reply> {
    let no_view = || {
        Error::Command(format!(
            "NOVIEW no view '{}'",
            String::from_utf8_lossy(name)
        ))
    };
    let el = match txn.open_table(table_def(&crate::layout::element_table(table))) {
        Ok(el) => el,
        Err(redb::TableError::TableDoesNotExist(_)) => return Err(no_view()),
        Err(e) => return Err(io_err(e)),
    };
    let def: ViewDef = get(&el, &def_key(name), "a view definition")?.ok_or_else(no_view)?;
    let v = Loaded::new(Bytes::copy_from_slice(name), def.clone())?;
    if !v.is_async() {
        return Err(Error::Command("ERR not a Lua view".into()));
    }
    let from = AsyncAt {
        generation: def.generation,
        state: def.state.clone(),
        position: position(&el, &def, name)?,
    };
    let log = super::changes::ChangeLog::load(&el)?;
    drop(el);
    if !log.wants_prev() {
        return Ok(Reply::Array(vec![
            bulk(Bytes::from_static(b"off")),
            bulk(encode(&from)?),
            bulk(Bytes::from_static(
                b"the keyspace's change log was turned off or its previous values (PREV) were: VIEW DROP the view and CREATE it again",
            )),
        ]));
    }
    let start = capdb_types::changes::StreamId::of_event(
        capdb_types::Timestamp(from.position.saturating_add(1)),
        0,
    );
    let (changes, more) = match super::changes::read_page(
        txn,
        table,
        start,
        capdb_types::changes::StreamId::MAX,
        ADVANCE_EVENTS_MAX,
        false,
        true,
    ) {
        Ok(page) => page,
        Err(Error::Command(line)) if line.starts_with("HISTORYLOST") => {
            let to = AsyncAt {
                generation: from
                    .generation
                    .max(capdb_types::unix_now_ms())
                    .max(from.generation + 1),
                state: ViewState::Building {
                    cursor: None,
                    keys_done: 0,
                },
                position: log.clock().0,
            };
            return Ok(Reply::Array(vec![
                bulk(Bytes::from_static(b"lost")),
                bulk(encode(&from)?),
                bulk(encode(&to)?),
            ]));
        }
        Err(e) => return Err(e),
    };
    let mut to = from.clone();
    to.position = match (more, changes.last()) {
        (true, Some(last)) => last.clock.0,
        _ => log.clock().0,
    };
    let input = &v.plan.spec().input;
    let mut events = Vec::new();
    for c in &changes {
        let key = &c.event.key;
        if !passed(&from.state, key) || !input.wants(key) {
            continue;
        }
        use capdb_types::changes::ChangeOp;
        let (before, after) = match &c.event.op {
            ChangeOp::Set { value, prev, .. } => (prev.clone(), Some(value.clone())),
            ChangeOp::Incr { value, prev, .. } => {
                (prev.clone(), Some(Bytes::from(value.to_string())))
            }
            ChangeOp::Del { prev } | ChangeOp::Expire { prev } => (prev.clone(), None),
            // A deadline changes no value; a collection is not counted (a string it
            // replaced is logged as a `del` before it); FLUSHDB moved the position past it.
            ChangeOp::Ttl { .. } | ChangeOp::Cmd { .. } | ChangeOp::Evict | ChangeOp::Flush => {
                continue;
            }
        };
        if before == after {
            continue;
        }
        let opt = |b: Option<Bytes>| b.map_or(Reply::Nil, Reply::Bulk);
        events.push(Reply::Array(vec![
            bulk(key.clone()),
            opt(before),
            opt(after),
        ]));
    }
    let mut page = Vec::new();
    if let (ViewState::Building { cursor, keys_done }, false) = (&from.state, more) {
        let t = match txn.open_table(table_def(table)) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(io_err(e)),
        };
        let got = counted_page(t.as_ref(), input, cursor.as_deref(), ADVANCE_KEYS_MAX)?;
        page.extend(
            got.entries
                .into_iter()
                .map(|(k, v)| Reply::Array(vec![bulk(k), bulk(v)])),
        );
        let (scanned, last, exhausted) = (got.scanned, got.last, got.exhausted);
        to.state = if exhausted {
            ViewState::Ready
        } else {
            ViewState::Building {
                cursor: last.or(cursor.clone()),
                keys_done: keys_done + scanned as u64,
            }
        };
    }
    Ok(Reply::Array(vec![
        bulk(Bytes::from_static(b"ok")),
        bulk(encode(&from)?),
        bulk(encode(&to)?),
        Reply::Array(events),
        Reply::Array(page),
    ]))
}

/// A page of an async view's keys for its verification (`capdb.views scan name after`):
/// `[clock, [[key, value], ...], next|nil]`, the string values the view counts after
/// `after` (empty: from the first), at most [`BACKFILL_KEYS_MAX`], and the change log's
/// clock in the same snapshot (the caller checks no change came between pages).
pub(super) fn async_scan(
    txn: &redb::ReadTransaction,
    table: &str,
    name: &[u8],
    after: &[u8],
) -> Result<Reply> {
    let el = txn
        .open_table(table_def(&crate::layout::element_table(table)))
        .map_err(io_err)?;
    let Some(def) = get::<ViewDef>(&el, &def_key(name), "a view definition")? else {
        return Err(Error::Command(format!(
            "NOVIEW no view '{}'",
            String::from_utf8_lossy(name)
        )));
    };
    let v = Loaded::new(Bytes::copy_from_slice(name), def)?;
    let clock = super::changes::ChangeLog::load(&el)?.clock().0;
    drop(el);
    let t = match txn.open_table(table_def(table)) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(io_err(e)),
    };
    let after = (!after.is_empty()).then_some(after);
    let page = counted_page(t.as_ref(), &v.plan.spec().input, after, BACKFILL_KEYS_MAX)?;
    let rows: Vec<Reply> = page
        .entries
        .into_iter()
        .map(|(k, v)| Reply::Array(vec![bulk(k), bulk(v)]))
        .collect();
    let next = match (page.exhausted, page.last) {
        (false, Some(last)) => bulk(last),
        _ => Reply::Nil,
    };
    Ok(Reply::Array(vec![
        Reply::Integer(clock as i64),
        Reply::Array(rows),
        next,
    ]))
}

/// View `name`'s definition, when it is ready on this shard (what VERIFY compares);
/// `NOVIEW` or `NOTREADY` otherwise.
fn ready_def(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
) -> Result<ViewDef> {
    let Some(def) = get::<ViewDef>(el, &def_key(name), "a view definition")? else {
        return Err(Error::Command(format!(
            "NOVIEW no view '{}'",
            String::from_utf8_lossy(name)
        )));
    };
    if def.state != ViewState::Ready {
        return Err(Error::Command(format!(
            "NOTREADY view '{}' is {} on this shard",
            String::from_utf8_lossy(name),
            def.state.name()
        )));
    }
    Ok(def)
}

/// `VIEW VERIFY` of an async view on one shard (`capdb.views verify-with name clock
/// delta`): its rows against `delta`, what its node recomputed from the shard's keys while
/// the change log stood at `clock`. Compared only when the view has counted exactly up to
/// there and nothing was logged since (else `TRYAGAIN`): no window, no tolerance.
pub(super) fn verify_with(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    clock: u64,
    delta: &[u8],
) -> Result<Reply> {
    let def = ready_def(el, name)?;
    let at = position(el, &def, name)?;
    let now = super::changes::ChangeLog::load(el)?.clock().0;
    if at != clock || now != clock {
        return Err(Error::Command(
            "TRYAGAIN the shard changed while its Lua view was recomputed (VIEW VERIFY of a Lua view compares a quiet shard)".into(),
        ));
    }
    let v = Loaded::new(Bytes::copy_from_slice(name), def)?;
    let fresh: ViewDelta = decode(delta, "a recomputed view")?;
    compare(el, &v, fresh.into_pending())
}

/// `[state, cursor or nil]`.
fn state_reply(def: &ViewDef) -> Reply {
    let cursor = match &def.state {
        ViewState::Building {
            cursor: Some(c), ..
        } => Reply::Bulk(c.clone()),
        _ => Reply::Nil,
    };
    Reply::Array(vec![
        Reply::Bulk(Bytes::from_static(def.state.name().as_bytes())),
        cursor,
    ])
}

/// The accumulators of `group`'s row with its min and max filled from their multisets.
fn read_group(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
    mm_changes: &MmChanges,
    group: &[u8],
    mut row: Row,
) -> Result<Row> {
    let no_change = std::collections::BTreeMap::new();
    for &(r, owner) in &v.minmax {
        let kind = if mm_changes.chunked { MMC } else { MM };
        let prefix = multiset_prefix(kind, &v.name, v.def.generation, owner, group);
        let upper = group_upper(&prefix);
        let is_max = matches!(row.accs.get(r as usize), Some(Acc::Max(_)));
        let changes = mm_changes
            .by_group
            .get(&(owner, group.to_vec()))
            .unwrap_or(&no_change);
        let range = el.range(&prefix[..]..&upper[..]).map_err(io_err)?;
        let range: Box<dyn Iterator<Item = _> + '_> = match is_max {
            true => Box::new(range.rev()),
            false => Box::new(range),
        };
        // The multiset's numbers with their counts, from the extreme.
        let (chunked, plen) = (mm_changes.chunked, prefix.len());
        let rows = range.flat_map(move |e| -> Box<dyn Iterator<Item = Result<(Fixed, i64)>>> {
            let numbers = (|| {
                let (k, val) = e.map_err(io_err)?;
                if chunked {
                    let chunk: Chunk = decode(val.value(), "a view's multiset chunk")?;
                    return Ok(chunk);
                }
                let number = unsortable(&k.value()[plen..])
                    .ok_or_else(|| Error::Corruption("a view's min/max row".into()))?;
                Ok(vec![(number, int(val.value())?)])
            })();
            match numbers {
                Ok(n) if is_max => Box::new(n.into_iter().rev().map(Ok)),
                Ok(n) => Box::new(n.into_iter().map(Ok)),
                Err(e) => Box::new(std::iter::once(Err(e))),
            }
        });
        let mut changes: Box<dyn Iterator<Item = _>> = match is_max {
            true => Box::new(changes.iter().rev()),
            false => Box::new(changes.iter()),
        };
        // `a` comes before `b` in the walk from the extreme.
        let before = |a: Fixed, b: Fixed| if is_max { a > b } else { a < b };
        // The multiset's rows and the unfolded changes, merged in the walk's order: the first
        // number whose multiplicity (row plus change) is above 0. Rows a change empties are
        // passed over: the walk reads at most one row more than there are changes.
        let mut found = None;
        let mut change = changes.next();
        'rows: for e in rows {
            let (number, mut n) = e?;
            while let Some((&x, &d)) = change {
                if x == number {
                    n += d;
                    change = changes.next();
                    break;
                }
                if !before(x, number) {
                    break;
                }
                // A number only the changes hold.
                if d > 0 {
                    found = Some(x);
                    break 'rows;
                }
                change = changes.next();
            }
            // A multiplicity below 1 (never, once built) does not hold the value.
            if n > 0 {
                found = Some(number);
                break;
            }
        }
        if found.is_none() {
            while let Some((&x, &d)) = change {
                if d > 0 {
                    found = Some(x);
                    break;
                }
                change = changes.next();
            }
        }
        match row.accs.get_mut(r as usize) {
            Some(Acc::Min(m) | Acc::Max(m)) => *m = found,
            _ => return Err(Error::Corruption("a view's min/max reducer".into())),
        }
    }
    Ok(row)
}

fn bulk(b: impl Into<Bytes>) -> Reply {
    Reply::Bulk(b.into())
}

/// [`VIEWS_QUERY`], from one snapshot of the element table.
///
/// - `defs` → `[[name, def], ...]` (postcard [`ViewDef`]s)
/// - `gone` → `[[name, generation], ...]`: dropped generations with rows left
/// - `rows name generation after count` → `[def, counts, [[group, row], ...]]`, groups after
///   `after` (empty: from the first) in byte order, rows postcard [`Row`]s with min and
///   max filled; `def` nil when the view (that generation) is not here
/// - `groups name generation group...` → the same, for the given groups (missing ones left out)
pub(super) fn query(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    args: &[Bytes],
) -> Result<Reply> {
    let bad = || Error::InvalidInput("malformed views query".into());
    let num = |b: &Bytes| -> Result<u64> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    let sub = args.get(1).ok_or_else(bad)?;
    match (&sub[..], args.get(2..).unwrap_or_default()) {
        (b"defs", []) => Ok(Reply::Array(
            defs(el)?
                .into_iter()
                .map(|(name, def)| Ok(Reply::Array(vec![bulk(name), bulk(encode(&def)?)])))
                .collect::<Result<_>>()?,
        )),
        (b"over", []) => {
            // `[[name, generation, why], ...]`: views kept here past their bounds.
            let mut out = Vec::new();
            for (name, def) in defs(el)? {
                if matches!(def.state, ViewState::Overflow { .. }) {
                    continue;
                }
                let generation = def.generation;
                let v = Loaded::new(name.clone(), def)?;
                if let Some(why) = over_bounds(el, &v)? {
                    out.push(Reply::Array(vec![
                        bulk(name),
                        Reply::Integer(generation as i64),
                        bulk(why),
                    ]));
                }
            }
            Ok(Reply::Array(out))
        }
        (b"async-defs", []) => {
            // The names of the async views kept (building or ready).
            let mut out = Vec::new();
            for (name, def) in defs(el)? {
                if !matches!(def.state, ViewState::Overflow { .. })
                    && Loaded::new(name.clone(), def)?.is_async()
                {
                    out.push(bulk(name));
                }
            }
            Ok(Reply::Array(out))
        }
        (b"gone", []) => {
            let mut prefix = RESERVED.to_vec();
            prefix.extend_from_slice(GONE);
            let mut out = Vec::new();
            for r in el.range(&prefix[..]..).map_err(io_err)? {
                let (k, _) = r.map_err(io_err)?;
                let Some(rest) = k.value().strip_prefix(&prefix[..]) else {
                    break;
                };
                let [l0, l1, rest @ ..] = rest else {
                    return Err(Error::Corruption("a dropped view's row".into()));
                };
                let len = u16::from_be_bytes([*l0, *l1]) as usize;
                let (name, generation) = rest.split_at_checked(len).ok_or_else(bad)?;
                let generation: [u8; 8] = generation
                    .try_into()
                    .map_err(|_| Error::Corruption("a dropped view's row".into()))?;
                out.push(Reply::Array(vec![
                    bulk(Bytes::copy_from_slice(name)),
                    Reply::Integer(u64::from_be_bytes(generation) as i64),
                ]));
            }
            Ok(Reply::Array(out))
        }
        (b"rows", [name, generation, after, count]) => {
            let generation = num(generation)?;
            let count = usize::try_from(num(count)?)
                .map_err(|_| bad())?
                .clamp(1, ROWS_PAGE_MAX);
            let Some(v) = loaded(el, name, generation)? else {
                return Ok(Reply::Array(vec![Reply::Nil]));
            };
            let prefix = gen_prefix(ROW, name, v.def.generation);
            let mut start = prefix.clone();
            start.extend_from_slice(after);
            let lower = if after.is_empty() {
                std::ops::Bound::Included(&start[..])
            } else {
                std::ops::Bound::Excluded(&start[..])
            };
            // The folded rows and the unfolded changes, merged in group order.
            let changes = unfolded(el, &v)?;
            let mm_changes = unfolded_mm(el, &v)?;
            let mut pending = changes
                .range::<[u8], _>((
                    if after.is_empty() {
                        std::ops::Bound::Unbounded
                    } else {
                        std::ops::Bound::Excluded(&after[..])
                    },
                    std::ops::Bound::Unbounded,
                ))
                .peekable();
            let mut folded = el
                .range::<&[u8]>((lower, std::ops::Bound::Unbounded))
                .map_err(io_err)?
                .map(|r| {
                    r.map_err(io_err).map(|(k, raw)| {
                        (
                            k.value().strip_prefix(&prefix[..]).map(<[u8]>::to_vec),
                            raw.value().to_vec(),
                        )
                    })
                })
                .peekable();
            let mut rows = Vec::new();
            while rows.len() < count {
                let next_folded = match folded.peek() {
                    Some(Ok((Some(g), _))) => Some(g.clone()),
                    Some(Err(_)) => {
                        return Err(folded
                            .next()
                            .and_then(|r| r.err())
                            .unwrap_or_else(|| Error::Io("a view row".into())));
                    }
                    _ => None,
                };
                let next_pending = pending.peek().map(|(g, _)| (*g).clone());
                let group = match (&next_folded, &next_pending) {
                    (None, None) => break,
                    (Some(f), Some(p)) => f.min(p).clone(),
                    (Some(f), None) => f.clone(),
                    (None, Some(p)) => p.clone(),
                };
                let base = match next_folded.as_ref() == Some(&group) {
                    true => match folded.next() {
                        Some(Ok((_, raw))) => Some(decode::<Row>(&raw, "a view row")?),
                        _ => None,
                    },
                    false => None,
                };
                let change = match next_pending.as_ref() == Some(&group) {
                    true => pending.next().map(|(_, c)| c),
                    false => None,
                };
                if let Some(row) = merged_row(base, change)? {
                    let row = read_group(el, &v, &mm_changes, &group, row)?;
                    rows.push(Reply::Array(vec![
                        bulk(Bytes::from(group)),
                        bulk(encode(&row)?),
                    ]));
                }
            }
            header(el, &v, rows)
        }
        (b"pos", [name]) => {
            // `[position|nil, clock]`: an async view's position and the change log's clock
            // (nil for a synchronous view: always caught up); nil alone without the view.
            let Some(v) = loaded(el, name, 0)? else {
                return Ok(Reply::Array(vec![Reply::Nil]));
            };
            let pos = match v.is_async() {
                true => Reply::Integer(position(el, &v.def, name)? as i64),
                false => Reply::Nil,
            };
            let clock = super::changes::ChangeLog::load(el)?.clock().0;
            Ok(Reply::Array(vec![pos, Reply::Integer(clock as i64)]))
        }
        (b"groups", [name, generation, groups @ ..]) => {
            let generation = num(generation)?;
            let Some(v) = loaded(el, name, generation)? else {
                return Ok(Reply::Array(vec![Reply::Nil]));
            };
            let changes = unfolded(el, &v)?;
            let mm_changes = unfolded_mm(el, &v)?;
            let mut rows = Vec::new();
            for group in groups.iter().take(ROWS_PAGE_MAX) {
                let key = row_key(name, v.def.generation, group);
                let folded = get::<Row>(el, &key, "a view row")?;
                if let Some(row) = merged_row(folded, changes.get(&group[..]))? {
                    let row = read_group(el, &v, &mm_changes, group, row)?;
                    rows.push(Reply::Array(vec![bulk(group.clone()), bulk(encode(&row)?)]));
                }
            }
            header(el, &v, rows)
        }
        _ => Err(bad()),
    }
}

fn loaded(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
    generation: u64,
) -> Result<Option<Loaded>> {
    let def: Option<ViewDef> = get(el, &def_key(name), "a view definition")?;
    // Generation 0: whichever is defined.
    match def.filter(|d| generation == 0 || d.generation == generation) {
        Some(def) => Loaded::new(Bytes::copy_from_slice(name), def).map(Some),
        None => Ok(None),
    }
}

fn header(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
    rows: Vec<Reply>,
) -> Result<Reply> {
    let counts: Counts = get(
        el,
        &gen_prefix(CNT, &v.name, v.def.generation),
        "a view's counts",
    )?
    .unwrap_or_default();
    Ok(Reply::Array(vec![
        bulk(encode(&v.def)?),
        bulk(encode(&counts)?),
        Reply::Array(rows),
    ]))
}

/// `VIEW VERIFY` on one shard: the view's rows against a recomputation from the data of
/// the same snapshot (`t` and `el` from one read transaction). Answers
/// `[drift, groups_checked, [[group, view row or nil, recomputed or nil], ...≤ 100]]`,
/// counting the shard's counts as one more group.
pub(super) fn verify(
    t: Option<&impl ReadableTable<&'static [u8], &'static [u8]>>,
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    name: &[u8],
) -> Result<Reply> {
    let def = ready_def(el, name)?;
    let v = Loaded::new(Bytes::copy_from_slice(name), def)?;
    if v.is_async() {
        return Err(Error::Command(
            "ERR a Lua view is verified by its node (VIEW VERIFY), not by this query".into(),
        ));
    }
    // The recomputation, as a backfill from nothing would make it.
    let mut set = ViewSet {
        views: vec![Loaded::new(v.name.clone(), v.def.clone())?],
        pending: vec![Pending::default()],
        any_async: false,
    };
    if let Some(t) = t {
        let prefix = v.plan.spec().input.scan_prefix().to_vec();
        for r in t.range(&prefix[..]..).map_err(io_err)? {
            let (k, val) = r.map_err(io_err)?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            if let Some(value) = decoded_string(k.value(), val.value())
                && v.plan.spec().input.wants(k.value())
            {
                set.contribute(0, k.value(), &value, 1)?;
            }
        }
    }
    let fresh = set.pending.pop().unwrap_or_default();
    compare(el, &v, fresh)
}

/// The view's rows (`el`) against `fresh`, what a recomputation from the same state gave:
/// `[drift, groups_checked, [example, ...≤ 100]]`.
fn compare(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    v: &Loaded,
    mut fresh: Pending,
) -> Result<Reply> {
    // Each min/max reducer's extremes per group, in one pass over the multiset.
    let mut extremes: HashMap<(u8, &[u8]), (Fixed, Fixed)> = HashMap::new();
    let fresh_minmax = std::mem::take(&mut fresh.minmax).summed();
    for (r, group, x, n) in &fresh_minmax {
        if *n > 0 {
            let e = extremes.entry((*r, group.as_bytes())).or_insert((*x, *x));
            e.0 = e.0.min(*x);
            e.1 = e.1.max(*x);
        }
    }
    let mut recomputed: HashMap<Vec<u8>, Row> = HashMap::new();
    for (group, mut row) in fresh.rows.clone() {
        let group = group.as_bytes().to_vec();
        for &(r, owner) in &v.minmax {
            let found = extremes.get(&(owner, &group[..]));
            match row.accs.get_mut(r as usize) {
                Some(Acc::Min(m)) => *m = found.map(|e| e.0),
                Some(Acc::Max(m)) => *m = found.map(|e| e.1),
                _ => {}
            }
        }
        recomputed.insert(group, row);
    }
    let mut drift = 0u64;
    let mut checked = 0u64;
    let mut examples = Vec::new();
    // Readable: the group as JSON, each row as its count and accumulators.
    let mut note = |group: &[u8], view: Option<&Row>, fresh: Option<&Row>| -> Result<()> {
        if examples.len() < 100 {
            let group = capdb_reduce::extract::Scalar::decode_all(group).map_or_else(
                || format!("{group:?}"),
                |parts| {
                    serde_json::Value::Array(parts.iter().map(|p| p.to_json()).collect())
                        .to_string()
                },
            );
            let show = |r: Option<&Row>| {
                r.map_or("(none)".to_string(), |r| format!("n {} {:?}", r.n, r.accs))
            };
            examples.push(Reply::Bulk(Bytes::from(format!(
                "group {group}: view {}, recomputed {}",
                show(view),
                show(fresh)
            ))));
        }
        Ok(())
    };
    // The view's rows as reads see them: folded rows with their unfolded changes.
    let prefix = gen_prefix(ROW, &v.name, v.def.generation);
    let mut changes = unfolded(el, v)?;
    let mm_changes = unfolded_mm(el, v)?;
    let mut kept: Vec<(Vec<u8>, Row)> = Vec::new();
    for r in el.range(&prefix[..]..).map_err(io_err)? {
        let (k, raw) = r.map_err(io_err)?;
        let Some(group) = k.value().strip_prefix(&prefix[..]) else {
            break;
        };
        let folded: Row = decode(raw.value(), "a view row")?;
        if let Some(row) = merged_row(Some(folded), changes.remove(group).as_ref())? {
            kept.push((group.to_vec(), row));
        }
    }
    for (group, change) in changes {
        if let Some(row) = merged_row(None, Some(&change))? {
            kept.push((group, row));
        }
    }
    let mut seen = 0usize;
    for (group, row) in &kept {
        checked += 1;
        let row = read_group(el, v, &mm_changes, group, row.clone())?;
        match recomputed.get(group) {
            Some(f) => {
                seen += 1;
                if *f != row {
                    drift += 1;
                    note(group, Some(&row), Some(f))?;
                }
            }
            None => {
                drift += 1;
                note(group, Some(&row), None)?;
            }
        }
    }
    if seen < recomputed.len() {
        let kept: HashMap<&[u8], ()> = kept.iter().map(|(g, _)| (&g[..], ())).collect();
        for (group, f) in &recomputed {
            if !kept.contains_key(&group[..]) {
                checked += 1;
                drift += 1;
                note(group, None, Some(f))?;
            }
        }
    }
    let counts: Counts = get(
        el,
        &gen_prefix(CNT, &v.name, v.def.generation),
        "a view's counts",
    )?
    .unwrap_or_default();
    let want = fresh.counts;
    checked += 1;
    if (counts.keys, counts.skipped, counts.rounded) != (want.keys, want.skipped, want.rounded) {
        drift += 1;
        if examples.len() < 100 {
            examples.push(bulk(format!(
                "counts: view keys {} skipped {} rounded {}, recomputed keys {} skipped {} rounded {}",
                counts.keys, counts.skipped, counts.rounded, want.keys, want.skipped, want.rounded
            )));
        }
    }
    Ok(Reply::Array(vec![
        Reply::Integer(drift as i64),
        Reply::Integer(checked as i64),
        Reply::Array(examples),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_set(prefix: &str) -> ViewSet {
        let spec = format!(
            r#"{{"input": {{"keyspace": "k", "prefix": "{prefix}", "expired": "include"}}, "map": {{"group": [{{"json": "$.c"}}]}}, "reduce": {{"n": "count"}}}}"#
        );
        let spec = JobSpec::parse(spec.as_bytes())
            .expect("a valid spec")
            .canonical()
            .to_string();
        let def = ViewDef {
            generation: 1,
            spec,
            state: ViewState::Ready,
        };
        ViewSet {
            views: vec![Loaded::new(Bytes::from_static(b"v"), def).expect("a view")],
            pending: vec![Pending::default()],
            any_async: false,
        }
    }

    #[test]
    fn a_command_s_keys_are_counted_once_each_in_the_order_first_named() {
        let set = view_set("o:");
        // (keys named, distinct among them): a few (compared with those found so far) and
        // more than eight (then kept in a set).
        for (named, distinct) in [
            (1usize, 1usize),
            (3, 2),
            (8, 8),
            (12, 9),
            (40, 21),
            (40, 40),
        ] {
            // Every distinct key named, in a scrambled order, with keys the view does not
            // read between them.
            let keys: Vec<Bytes> = (0..named.max(distinct))
                .flat_map(|i| {
                    [
                        Bytes::from(format!("o:{}", (i * 13 + 5) % distinct)),
                        Bytes::from(format!("x:{i}")),
                    ]
                })
                .collect();
            let mut expected: Vec<Bytes> = Vec::new();
            for k in keys.iter().filter(|k| k.starts_with(b"o:")) {
                if !expected.contains(k) {
                    expected.push(k.clone());
                }
            }
            assert_eq!(expected.len(), distinct);
            assert_eq!(
                set.keys_of(&keys),
                expected,
                "{named} keys named, {distinct} distinct"
            );
        }
    }
}
