//! A collection's elements in the cache: subkey → value, held the way its commands use them.
//!
//! The family code (`capdb-data`) sees elements as an ordered map from subkey to value, the
//! layout the disk engine stores. An ordered tree is what that needs for ranges, but it is a poor
//! fit for the two hot shapes of in-memory collections, so the cache holds them differently:
//!
//! - **Runs** (lists): a list's elements sit at contiguous positions whose subkeys are
//!   `0 ‖ u64be(position ^ 1 << 63)` (see `capdb_data::list`). A deque in chunks
//!   ([`ChunkedDeque`], `chunked.rs`: no reallocation of a whole list as it grows) indexed by
//!   `position - first` holds them: LPUSH/RPUSH/LPOP/RPOP touch one end, LINDEX/LSET index,
//!   LRANGE slices, and an element costs its value and one `Bytes`, not a tree slot (a tree of
//!   positions made LPUSH allocate a node every few elements and fault in pages as it grew).
//! - **Maps** (everything else: hash fields, set members, sorted-set members and score index):
//!   values in a hash table, so HGET/HSET/SADD/SISMEMBER/ZSCORE on a member that exists is one
//!   probe instead of a tree search that misses the cache at every level; and the subkeys alone
//!   in an ordered set, which only ranges (HGETALL, SCAN cursors, ZRANGE, ...) and inserts and
//!   removals of subkeys touch. Elements the family code never looks up by subkey and whose
//!   value is always empty (a sorted set's order index: `Coll::is_order_only`, the caller's
//!   `alone` argument) are held in the ordered set only: a ZADD that changes a score removes
//!   and inserts one index record, and a hash table that nothing probes would double that.
//!
//! A run answers exactly as a map of the same subkeys would: a write that would break
//! contiguity (or any subkey not shaped as a list position) turns the run into a map first, in
//! one O(n) step, so the representation is an optimisation the family code cannot observe.
//! (List commands never do that: they renumber instead of leaving holes.)
//!
//! # Accounting
//!
//! An element is accounted as its subkey, its value and the overhead of the representation it
//! is held in ([`RUN_ELEMENT_OVERHEAD_BYTES`], [`MAP_ELEMENT_OVERHEAD_BYTES`]: the slots, the
//! value's allocation, the tree share); [`ElementStore::bytes`] is the total, kept right
//! through a run's turning into a map.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

use bytes::Bytes;

use super::chunked::ChunkedDeque;
use super::space::SubKey;

/// Accounted bytes per element of a run on top of its subkey and value: its `Bytes` slot in the
/// deque and the value's allocation header and rounding.
pub const RUN_ELEMENT_OVERHEAD_BYTES: u64 = 48;
/// Accounted bytes per element of a map on top of its subkey and value: a hash-table slot (a
/// `SubKey` and a `Bytes`, at the table's load), a copy of the `SubKey` in the ordered set (at a
/// tree node's fill), and the value's allocation header and rounding.
pub const MAP_ELEMENT_OVERHEAD_BYTES: u64 = 224;
/// Accounted bytes per element of a map held in its ordered set alone (see the module doc): its
/// `SubKey` there, at a tree node's fill.
pub const ORDER_ONLY_ELEMENT_OVERHEAD_BYTES: u64 = 96;

/// The value of every element held in the ordered set alone.
static EMPTY: Bytes = Bytes::new();

/// Hasher of element tables (randomly seeded per table: members are client-chosen).
type Hasher = foldhash::fast::RandomState;

/// Subkeys up to this long are looked up in the ordered set as a [`SubKey`] (built without
/// allocating, compared as integers); longer ones as byte slices.
const SUBKEY_INLINE: usize = 32;

/// The first byte of a list position subkey (`capdb_data::list`'s `ITEM`).
const POSITION_TAG: u8 = 0;

/// The position a list subkey stands for, `None` for any other subkey.
fn position_of(sub: &[u8]) -> Option<i64> {
    match sub {
        [POSITION_TAG, rest @ ..] if rest.len() == 8 => {
            let raw: [u8; 8] = rest.try_into().ok()?;
            Some((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
        }
        _ => None,
    }
}

/// The subkey of list position `pos` (inverse of [`position_of`]).
fn position_sub(pos: i64) -> [u8; 9] {
    let mut s = [POSITION_TAG; 9];
    s[1..].copy_from_slice(&((pos as u64) ^ (1 << 63)).to_be_bytes());
    s
}

#[derive(Debug)]
enum Held {
    /// `items[i]` is the element at position `first + i` (subkey [`position_sub`]).
    Run {
        first: i64,
        items: ChunkedDeque<Bytes>,
    },
    /// Values by subkey (of every element but those held in the order alone), and every
    /// subkey in order.
    Map {
        values: HashMap<SubKey, Bytes, Hasher>,
        order: BTreeSet<SubKey>,
    },
}

/// A collection's elements (see the module doc). Starts as an empty run.
#[derive(Debug)]
pub(crate) struct ElementStore {
    held: Held,
    /// Accounted bytes of every element (see the module doc).
    bytes: u64,
}

fn order_contains(order: &BTreeSet<SubKey>, sub: &[u8]) -> bool {
    if sub.len() <= SUBKEY_INLINE {
        order.contains(&SubKey::new(sub))
    } else {
        order.contains(sub)
    }
}

fn order_remove(order: &mut BTreeSet<SubKey>, sub: &[u8]) -> bool {
    if sub.len() <= SUBKEY_INLINE {
        order.remove(&SubKey::new(sub))
    } else {
        order.remove(sub)
    }
}

impl ElementStore {
    pub(crate) fn new() -> ElementStore {
        ElementStore {
            held: Held::Run {
                first: 0,
                items: ChunkedDeque::default(),
            },
            bytes: 0,
        }
    }

    /// Accounted bytes of all elements.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Accounted bytes of one element as it is held now (`alone`: see the module doc).
    fn element_bytes(&self, sub: &[u8], value: &[u8], alone: bool) -> u64 {
        let overhead = match self.held {
            Held::Run { .. } => RUN_ELEMENT_OVERHEAD_BYTES,
            Held::Map { .. } if alone => ORDER_ONLY_ELEMENT_OVERHEAD_BYTES,
            Held::Map { .. } => MAP_ELEMENT_OVERHEAD_BYTES,
        };
        sub.len() as u64 + value.len() as u64 + overhead
    }

    pub(crate) fn len(&self) -> usize {
        match &self.held {
            Held::Run { items, .. } => items.len(),
            Held::Map { order, .. } => order.len(),
        }
    }

    /// Turns a run into a map of the same subkeys (no-op for a map).
    fn as_map(&mut self) -> (&mut HashMap<SubKey, Bytes, Hasher>, &mut BTreeSet<SubKey>) {
        if let Held::Run { first, items } = &mut self.held {
            let mut values = HashMap::with_capacity_and_hasher(items.len(), Hasher::default());
            let mut order = BTreeSet::new();
            for (i, v) in std::mem::take(items).into_values().enumerate() {
                let sub = SubKey::new(&position_sub(*first + i as i64));
                order.insert(sub.clone());
                values.insert(sub, v);
            }
            self.held = Held::Map { values, order };
            self.bytes +=
                self.len() as u64 * (MAP_ELEMENT_OVERHEAD_BYTES - RUN_ELEMENT_OVERHEAD_BYTES);
        }
        match &mut self.held {
            Held::Map { values, order } => (values, order),
            Held::Run { .. } => unreachable!("converted to a map just above"),
        }
    }

    /// The value at `sub`; `alone` says the element is one held in the order alone (the same
    /// answer for a subkey every time; see the module doc).
    pub(crate) fn get(&self, sub: &[u8], alone: bool) -> Option<&Bytes> {
        match &self.held {
            Held::Run { first, items } => {
                let at = position_of(sub)?.checked_sub(*first)?;
                items.get(usize::try_from(at).ok()?)
            }
            Held::Map { order, .. } if alone => order_contains(order, sub).then_some(&EMPTY),
            Held::Map { values, .. } => values.get(sub),
        }
    }

    /// Stores `value` at `sub` (`alone`: as for [`Self::get`], and then `value` is empty); the
    /// value it replaced, if any.
    pub(crate) fn insert(&mut self, sub: &[u8], value: Bytes, alone: bool) -> Option<Bytes> {
        debug_assert!(
            !alone || value.is_empty(),
            "an element held in the order alone has an empty value"
        );
        let len = value.len();
        let old = self.insert_unaccounted(sub, value, alone);
        if let Some(old) = &old {
            self.bytes -= self.element_bytes(sub, old, alone);
        }
        self.bytes += self.element_bytes(sub, &[], alone) + len as u64;
        old
    }

    /// Removes the element at `sub` (`alone`: as for [`Self::get`]); its value, if it was
    /// there.
    pub(crate) fn remove(&mut self, sub: &[u8], alone: bool) -> Option<Bytes> {
        let old = self.remove_unaccounted(sub, alone)?;
        self.bytes -= self.element_bytes(sub, &old, alone);
        Some(old)
    }

    fn insert_unaccounted(&mut self, sub: &[u8], value: Bytes, alone: bool) -> Option<Bytes> {
        if let Held::Run { first, items } = &mut self.held
            && let Some(pos) = position_of(sub)
            && let Some(end) = first.checked_add(items.len() as i64)
        {
            if items.is_empty() {
                *first = pos;
                items.push_back(value);
                return None;
            }
            if pos == end {
                items.push_back(value);
                return None;
            }
            if first.checked_sub(1) == Some(pos) {
                items.push_front(value);
                *first = pos;
                return None;
            }
            // A position within the run is an index of it (`get_mut` answers it).
            if (*first..end).contains(&pos)
                && let Some(slot) = items.get_mut((pos - *first) as usize)
            {
                return Some(std::mem::replace(slot, value));
            }
            // A hole would open: fall through to a map.
        }
        let (values, order) = self.as_map();
        if alone {
            return (!order.insert(SubKey::new(sub))).then(Bytes::new);
        }
        match values.get_mut(sub) {
            Some(slot) => Some(std::mem::replace(slot, value)),
            None => {
                let key = SubKey::new(sub);
                order.insert(key.clone());
                values.insert(key, value);
                None
            }
        }
    }

    fn remove_unaccounted(&mut self, sub: &[u8], alone: bool) -> Option<Bytes> {
        if let Held::Run { first, items } = &mut self.held {
            let pos = position_of(sub)?;
            let end = first.checked_add(items.len() as i64)?;
            if !(*first..end).contains(&pos) {
                return None;
            }
            if pos == *first {
                *first += 1;
                return items.pop_front();
            }
            if pos == end - 1 {
                return items.pop_back();
            }
            // A hole would open: fall through to a map.
        }
        let (values, order) = self.as_map();
        if alone {
            return order_remove(order, sub).then(Bytes::new);
        }
        let old = values.remove(sub)?;
        order_remove(order, sub);
        Some(old)
    }

    /// `pick` of each element with a subkey within `lo..hi`, ascending (descending when
    /// `rev`), at most `limit` of them; `alone` says which subkeys are held in the order alone
    /// (as for [`Self::get`]).
    pub(crate) fn range<T>(
        &self,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
        limit: usize,
        alone: impl Fn(&[u8]) -> bool,
        mut pick: impl FnMut(&[u8], &Bytes) -> T,
    ) -> Vec<T> {
        let empty = match (lo, hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
            | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
            _ => false,
        };
        if empty {
            return Vec::new();
        }
        match &self.held {
            Held::Run { first, items } => {
                let sub_at = |i: usize| position_sub(*first + i as i64);
                let start = run_index(*first, items.len(), lo, false);
                let end = run_index(*first, items.len(), hi, true).max(start);
                let n = (end - start).min(limit);
                let mut pick = |(i, v): (usize, &Bytes)| pick(&sub_at(i), v);
                if rev {
                    let run = items.range(end - n, end).rev();
                    run.enumerate()
                        .map(|(j, v)| (end - 1 - j, v))
                        .map(&mut pick)
                        .collect()
                } else {
                    let run = items.range(start, start + n).enumerate();
                    run.map(|(j, v)| (start + j, v)).map(&mut pick).collect()
                }
            }
            Held::Map { values, order } => {
                let it = order.range::<[u8], _>((lo, hi));
                let mut pick = |k: &SubKey| {
                    if alone(k) {
                        return pick(k, &EMPTY);
                    }
                    let v = values.get(&k[..]).expect(
                        "every subkey in the order not held there alone has a value (ElementStore invariant)",
                    );
                    pick(k, v)
                };
                if rev {
                    it.rev().take(limit).map(&mut pick).collect()
                } else {
                    it.take(limit).map(&mut pick).collect()
                }
            }
        }
    }
}

/// Where a range bound cuts a run of `len` positions starting at `first`: the number of the
/// run's elements below a lower bound (`upper` false), or up to and including an upper bound
/// (`upper` true); so `start..end` are the indices within both bounds.
///
/// The family code bounds its ranges of a list by positions (LRANGE, LPOP, ...), which map to
/// an index by one subtraction; any other bound is found by a binary search over the run's
/// subkeys (a list's ranges are walked on every pop, where a search of a million-element run
/// was most of LPOP's cost).
fn run_index(first: i64, len: usize, bound: Bound<&[u8]>, upper: bool) -> usize {
    let (b, inclusive) = match bound {
        Bound::Unbounded => return if upper { len } else { 0 },
        Bound::Included(b) => (b, true),
        Bound::Excluded(b) => (b, false),
    };
    if let Some(pos) = position_of(b) {
        // Index of the bound's position in the run, possibly outside `0..len`.
        let at = i128::from(pos) - i128::from(first);
        // Elements at indices < cut are below a lower bound / within an upper bound.
        let cut = if inclusive == upper { at + 1 } else { at };
        return cut.clamp(0, len as i128) as usize;
    }
    let sub_at = |i: usize| position_sub(first + i as i64);
    if upper {
        partition_point(len, |i| {
            if inclusive {
                sub_at(i)[..] <= *b
            } else {
                sub_at(i)[..] < *b
            }
        })
    } else {
        partition_point(len, |i| {
            if inclusive {
                sub_at(i)[..] < *b
            } else {
                sub_at(i)[..] <= *b
            }
        })
    }
}

/// The first index in `0..len` for which `pred` is false (`pred` is true, then false).
fn partition_point(len: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Random operations on an [`ElementStore`] and on a plain ordered map answer alike, for
    /// subkeys that are list positions (runs, and runs broken into maps) and for others, some
    /// of them held in the order alone (here: those with tag 1, always with an empty value).
    #[test]
    fn answers_exactly_as_an_ordered_map() {
        let alone = |k: &[u8]| k.first() == Some(&1);
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut store = ElementStore::new();
            let mut model: BTreeMap<Vec<u8>, Bytes> = BTreeMap::new();
            // Mostly list-shaped traffic at the ends; now and then a hole or a foreign subkey.
            let (mut head, mut tail) = (0i64, 0i64);
            for step in 0..300 {
                let sub: Vec<u8> = match rng.u8(0..10) {
                    0..=2 => {
                        head -= 1;
                        position_sub(head).to_vec()
                    }
                    3..=5 => {
                        tail += 1;
                        position_sub(tail - 1).to_vec()
                    }
                    6 | 7 => position_sub(rng.i64(head.min(tail) - 2..head.max(tail) + 2)).to_vec(),
                    8 if seed % 4 == 0 => vec![rng.u8(1..3), rng.u8(..)],
                    _ => position_sub(if rng.bool() { head } else { tail - 1 }).to_vec(),
                };
                let value = if alone(&sub) {
                    Bytes::new()
                } else {
                    Bytes::from(format!("v{step}"))
                };
                if rng.u8(0..3) == 0 {
                    assert_eq!(
                        store.remove(&sub, alone(&sub)),
                        model.remove(&sub),
                        "seed {seed}"
                    );
                    if sub == position_sub(head) {
                        head += 1;
                    } else if sub == position_sub(tail - 1) {
                        tail -= 1;
                    }
                } else {
                    assert_eq!(
                        store.insert(&sub, value.clone(), alone(&sub)),
                        model.insert(sub.clone(), value),
                        "seed {seed}"
                    );
                }
                assert_eq!(store.len(), model.len());
                let overhead = |k: &[u8]| match store.held {
                    Held::Run { .. } => RUN_ELEMENT_OVERHEAD_BYTES,
                    Held::Map { .. } if alone(k) => ORDER_ONLY_ELEMENT_OVERHEAD_BYTES,
                    Held::Map { .. } => MAP_ELEMENT_OVERHEAD_BYTES,
                };
                let accounted: u64 = model
                    .iter()
                    .map(|(k, v)| (k.len() + v.len()) as u64 + overhead(k))
                    .sum();
                assert_eq!(store.bytes(), accounted, "seed {seed} step {step}");
                let probe = if rng.u8(0..4) == 0 {
                    vec![rng.u8(1..3), rng.u8(..)]
                } else {
                    position_sub(rng.i64(head.min(tail) - 2..head.max(tail) + 2)).to_vec()
                };
                assert_eq!(store.get(&probe, alone(&probe)), model.get(&probe[..]));
                // Mostly list positions (the bounds list commands use), now and then a bound
                // that is no position: a prefix of one, one extended, or another tag.
                let bound = |rng: &mut fastrand::Rng| -> Vec<u8> {
                    let p = position_sub(rng.i64(head.min(tail) - 2..head.max(tail) + 2));
                    match rng.u8(0..8) {
                        0 => p[..rng.usize(0..9)].to_vec(),
                        1 => [&p[..], &[rng.u8(..)]].concat(),
                        2 => vec![rng.u8(1..3)],
                        _ => p.to_vec(),
                    }
                };
                let (a, b) = (bound(&mut rng), bound(&mut rng));
                let bounds = [
                    Bound::Included(&a[..]),
                    Bound::Excluded(&a[..]),
                    Bound::Unbounded,
                ];
                let lo = bounds[rng.usize(..3)];
                let hi = [
                    Bound::Included(&b[..]),
                    Bound::Excluded(&b[..]),
                    Bound::Unbounded,
                ][rng.usize(..3)];
                let rev = rng.bool();
                let limit = rng.usize(0..20);
                let got = store.range(lo, hi, rev, limit, alone, |k, v| (k.to_vec(), v.clone()));
                let empty = match (lo, hi) {
                    (Bound::Included(x), Bound::Included(y)) => x > y,
                    (Bound::Included(x) | Bound::Excluded(x), Bound::Excluded(y))
                    | (Bound::Excluded(x), Bound::Included(y)) => x >= y,
                    _ => false,
                };
                let want: Vec<(Vec<u8>, Bytes)> = if empty {
                    Vec::new()
                } else {
                    let it = model
                        .range::<[u8], _>((lo, hi))
                        .map(|(k, v)| (k.clone(), v.clone()));
                    if rev {
                        it.rev().take(limit).collect()
                    } else {
                        it.take(limit).collect()
                    }
                };
                assert_eq!(got, want, "seed {seed} step {step}");
            }
        }
    }

    /// A list longer than several chunks (`chunked.rs`) reads as the ordered map of its
    /// positions, by index, by range in both directions, and after pops at both ends.
    #[test]
    fn a_run_of_many_chunks_reads_as_an_ordered_map() {
        let n = 3 * super::super::chunked::CHUNK as i64 + 5;
        let mut store = ElementStore::new();
        let mut model: BTreeMap<Vec<u8>, Bytes> = BTreeMap::new();
        for p in 0..n {
            for pos in [-p, p + 1] {
                let v = Bytes::from(format!("v{pos}"));
                store.insert(&position_sub(pos), v.clone(), false);
                model.insert(position_sub(pos).to_vec(), v);
            }
        }
        for p in 0..200 {
            for pos in [-(n - 1) + p, n - p] {
                assert_eq!(
                    store.remove(&position_sub(pos), false),
                    model.remove(&position_sub(pos)[..])
                );
            }
        }
        assert!(matches!(store.held, Held::Run { .. }));
        assert_eq!(store.len(), model.len());
        for (k, v) in &model {
            assert_eq!(store.get(k, false), Some(v));
        }
        for (a, b) in [(-700, 700), (-n, n + 1), (100, 2_000), (-1_500, -1_400)] {
            let (lo, hi) = (position_sub(a), position_sub(b));
            for rev in [false, true] {
                let got = store.range(
                    Bound::Included(&lo[..]),
                    Bound::Excluded(&hi[..]),
                    rev,
                    usize::MAX,
                    |_| false,
                    |k, v| (k.to_vec(), v.clone()),
                );
                let it = model
                    .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
                    .map(|(k, v)| (k.clone(), v.clone()));
                let want: Vec<_> = if rev {
                    it.rev().collect()
                } else {
                    it.collect()
                };
                assert_eq!(got, want, "{a}..{b} rev {rev}");
            }
        }
    }

    #[test]
    fn list_traffic_stays_a_run() {
        let mut store = ElementStore::new();
        for p in 0..100 {
            store.insert(&position_sub(-p), Bytes::from_static(b"l"), false);
            store.insert(&position_sub(p + 1), Bytes::from_static(b"r"), false);
        }
        store.insert(&position_sub(5), Bytes::from_static(b"set"), false);
        store.remove(&position_sub(-99), false);
        store.remove(&position_sub(100), false);
        assert!(matches!(store.held, Held::Run { .. }));
        assert_eq!(store.len(), 198);
        store.remove(&position_sub(7), false);
        assert!(matches!(store.held, Held::Map { .. }), "a hole makes a map");
        assert_eq!(store.len(), 197);
        assert_eq!(
            store.get(&position_sub(5), false),
            Some(&Bytes::from_static(b"set"))
        );
    }
}
