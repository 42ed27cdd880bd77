//! How the replicas of an `ap` key agree without coordination.
//!
//! Every version carries the HLC timestamp of the write that made it. Two versions of a key
//! merge deterministically, whatever order replicas see them in:
//!
//! - **Last writer wins** for `SET`/`DEL`: the larger timestamp wins. Ties (two nodes issuing
//!   the same HLC reading) break by tombstone first (a delete beats a write at the same
//!   instant), then by the larger payload bytes, so every replica picks the same winner.
//! - **Counters** (`INCR`/`DECR` in `ap` keyspaces) are PN-counters: each node counts its own
//!   increments and decrements, and merging takes the per-node maximum, so concurrent
//!   increments on both sides of a partition all count.
//!
//! The two combine as a product lattice. Every version has a *reset*: for a plain value or a
//! tombstone, itself; for a counter, the plain value (or delete) it started counting from,
//! its *epoch*. Merging keeps the last-writer-wins reset, and the per-node maximum of the
//! counters counting from that reset; counters from an older reset are dropped. So a `SET` or
//! `DEL` wins over increments made concurrently from an older value (documented behaviour),
//! and increments made after it all count.
//!
//! [`merge`] is commutative, associative and idempotent (property-tested below), which is what
//! read repair, hinted handoff and anti-entropy rely on to converge in any order.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Timestamp, Value};

/// The payload of a counter version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Timestamp of the version the counter started from (0: from nothing).
    pub epoch: Timestamp,
    /// Whether that version was a delete (or nothing).
    pub epoch_deleted: bool,
    /// The bytes that version held (a decimal integer, or empty after a delete).
    pub base: Bytes,
    /// Per node: total of its increments.
    pub p: BTreeMap<u64, u64>,
    /// Per node: total of its decrements (as a positive number).
    pub n: BTreeMap<u64, u64>,
}

impl Counter {
    /// The counter's value: base plus every increment minus every decrement.
    pub fn total(&self) -> Result<i64> {
        let base = if self.base.is_empty() {
            0
        } else {
            crate::mutation::parse_i64_strict(&self.base).ok_or(Error::NotAnInteger)?
        };
        let mut t = base as i128;
        t += self.p.values().map(|&v| v as i128).sum::<i128>();
        t -= self.n.values().map(|&v| v as i128).sum::<i128>();
        i64::try_from(t).map_err(|_| Error::Overflow)
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(postcard::to_stdvec(self).expect("a counter always encodes"))
    }

    pub fn decode(data: &[u8]) -> Result<Counter> {
        postcard::from_bytes(data)
            .map_err(|e| Error::Corruption(format!("counter payload does not decode: {e}")))
    }
}

/// The reset a version belongs to: (timestamp, deleted, bytes), compared last-writer-wins.
type Reset = (Timestamp, bool, Bytes);

fn reset_of(v: &Value) -> (Reset, Option<Counter>) {
    if v.header.counter
        && let Ok(c) = Counter::decode(&v.data)
    {
        return ((c.epoch, c.epoch_deleted, c.base.clone()), Some(c));
    }
    // A counter that does not decode is treated as a plain value (it is never served as one:
    // rendering reports the corruption).
    (
        (v.header.timestamp, v.header.tombstone, v.data.clone()),
        None,
    )
}

/// Whether version `a` beats version `b` under last-writer-wins (strictly); used as the
/// deterministic order of whole versions.
pub fn wins(a: &Value, b: &Value) -> bool {
    let key = |v: &Value| (v.header.timestamp, v.header.tombstone, v.header.counter);
    match key(a).cmp(&key(b)) {
        std::cmp::Ordering::Equal => a.data > b.data,
        o => o == std::cmp::Ordering::Greater,
    }
}

/// The timestamp of the plain value or delete a version counts from (its own for a plain
/// value or tombstone, the epoch for a counter): a collection's elements written at or before
/// it are hidden (see [`crate::composite`]).
pub fn reset_timestamp(v: &Value) -> Timestamp {
    reset_of(v).0.0
}

/// Merges two versions of one key into the version every replica should hold.
pub fn merge(a: &Value, b: &Value) -> Value {
    if crate::composite::is_composite(a) || crate::composite::is_composite(b) {
        return crate::composite::merge(a, b);
    }
    let (ra, ca) = reset_of(a);
    let (rb, cb) = reset_of(b);
    let reset = if ra >= rb { ra.clone() } else { rb.clone() };
    // Versions that count from the winning reset; the latest of them gives timestamp and TTL.
    let mut latest: Option<&Value> = None;
    let mut counters: Vec<Counter> = Vec::new();
    for (v, r, c) in [(a, &ra, ca), (b, &rb, cb)] {
        if *r != reset {
            continue;
        }
        if latest.is_none_or(|l| wins(v, l)) {
            latest = Some(v);
        }
        counters.extend(c);
    }
    let latest = latest.expect("the winning reset belongs to a or b");
    if counters.is_empty() {
        return latest.clone();
    }
    let mut merged = Counter {
        epoch: reset.0,
        epoch_deleted: reset.1,
        base: reset.2,
        ..Counter::default()
    };
    for c in &counters {
        for (node, v) in &c.p {
            let e = merged.p.entry(*node).or_insert(0);
            *e = (*e).max(*v);
        }
        for (node, v) in &c.n {
            let e = merged.n.entry(*node).or_insert(0);
            *e = (*e).max(*v);
        }
    }
    let mut v = Value::new(
        merged.encode(),
        latest.header.timestamp,
        latest.header.expire_at_ms,
    );
    v.header.counter = true;
    v
}

/// Applies `delta` by node `node` at `timestamp` to the key's current version (any state:
/// absent, tombstone, expired, plain integer, counter) and returns the new counter version.
/// `now_ms` decides whether `current` has expired.
pub fn counter_add(
    current: Option<&Value>,
    node: u64,
    delta: i64,
    timestamp: Timestamp,
    now_ms: u64,
) -> Result<Value> {
    if let Some(c) = current.filter(|v| crate::composite::is_composite(v)) {
        // A key that holds (or held) a collection: count on its plain part, keep the rest.
        let comp = crate::composite::Composite::of(c)?;
        if let crate::composite::Visible::Coll(_) = comp.visible(now_ms) {
            return Err(Error::WrongType);
        }
        // An expired collection is gone: the counter starts from a delete at its newest write,
        // which drops its elements as a SET would (counting from its older plain part would
        // leave them hidden in the record, and a delete of the expired collection would take
        // the increments with it).
        let base = if c.is_expired(now_ms) && !c.header.tombstone {
            Some(Value::tombstone(c.header.timestamp))
        } else {
            comp.base()
        };
        let added = counter_add(base.as_ref(), node, delta, timestamp, now_ms)?;
        return Ok(merge(c, &added));
    }
    let live = current.filter(|v| v.is_live(now_ms));
    let mut counter = match (current, live) {
        (_, Some(v)) if v.header.counter => Counter::decode(&v.data)?,
        (_, Some(v)) => {
            crate::mutation::parse_i64_strict(&v.data).ok_or(Error::NotAnInteger)?;
            Counter {
                epoch: v.header.timestamp,
                epoch_deleted: false,
                base: v.data.clone(),
                ..Counter::default()
            }
        }
        // Deleted or expired: count from zero, after that version (an expired counter's epoch
        // is its own last write).
        (Some(v), None) => Counter {
            epoch: v.header.timestamp,
            epoch_deleted: true,
            ..Counter::default()
        },
        (None, None) => Counter {
            epoch: Timestamp::ZERO,
            epoch_deleted: true,
            ..Counter::default()
        },
    };
    let slot = if delta >= 0 {
        counter.p.entry(node).or_insert(0)
    } else {
        counter.n.entry(node).or_insert(0)
    };
    *slot = slot
        .checked_add(delta.unsigned_abs())
        .ok_or(Error::Overflow)?;
    counter.total()?;
    let expire = live.and_then(|v| v.header.expire_at_ms);
    let mut v = Value::new(counter.encode(), timestamp, expire);
    v.header.counter = true;
    Ok(v)
}

/// What the expiry sweep of an `ap` table stores in place of `v`, expired at `now_ms`: a
/// tombstone at its timestamp for a plain value (it merges as the expired value would: every
/// later write beats both), or `None` to leave the record as it is.
///
/// A collection stays. No tombstone merges as an expired collection does: a later PERSIST or
/// EXPIRE from a replica that saw it (a TTL register newer than anything here) makes its
/// elements visible again, and a field written before the deadline (arriving late) still falls
/// under the deadline; a tombstone at the collection's newest write would drop the elements
/// under the PERSIST, and leave the late field visible without a deadline. Expired collections
/// are removed by tombstone collection instead, once they expired longer than the grace period
/// ago and every replica holds the same (`capdb-ap`'s anti-entropy).
pub fn expiry_replacement(v: &Value, now_ms: u64) -> Option<Value> {
    if crate::composite::is_composite(v) || v.header.tombstone || !v.is_expired(now_ms) {
        return None;
    }
    Some(Value::tombstone(v.header.timestamp))
}

/// What a client sees of a version: a counter reads as its decimal total.
pub fn render(v: Value) -> Result<Value> {
    if crate::composite::is_composite(&v) {
        return crate::composite::render(v);
    }
    if !v.header.counter || v.header.tombstone {
        return Ok(v);
    }
    let total = Counter::decode(&v.data)?.total()?;
    Ok(Value::new(
        Bytes::from(total.to_string()),
        v.header.timestamp,
        v.header.expire_at_ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plain(s: &str, ts: u64) -> Value {
        Value::new(Bytes::from(s.to_string()), Timestamp(ts), None)
    }

    #[test]
    fn last_writer_wins_and_ties_break_the_same_everywhere() {
        let (a, b) = (plain("a", 5), plain("b", 7));
        assert_eq!(merge(&a, &b), b);
        assert_eq!(merge(&b, &a), b);
        let (x, y) = (plain("x", 9), plain("y", 9));
        assert_eq!(merge(&x, &y), merge(&y, &x));
        let t = Value::tombstone(Timestamp(9));
        assert_eq!(
            merge(&x, &t),
            t,
            "a delete beats a write at the same instant"
        );
        assert_eq!(merge(&t, &plain("late", 10)).data, "late");
    }

    #[test]
    fn concurrent_increments_on_both_sides_all_count() {
        let start = plain("10", 1);
        // Side A (node 1) adds 3 then 4; side B (node 2) adds 5 and subtracts 1.
        let a1 = counter_add(Some(&start), 1, 3, Timestamp(2), 0).unwrap();
        let a2 = counter_add(Some(&a1), 1, 4, Timestamp(3), 0).unwrap();
        let b1 = counter_add(Some(&start), 2, 5, Timestamp(2), 0).unwrap();
        let b2 = counter_add(Some(&b1), 2, -1, Timestamp(4), 0).unwrap();
        let m = merge(&a2, &b2);
        assert_eq!(render(m.clone()).unwrap().data, "21");
        assert_eq!(merge(&b2, &a2), m);
        assert_eq!(merge(&m, &a1), m, "old versions merge in harmlessly");
        // A SET after the increments resets the counter.
        let reset = plain("0", 9);
        assert_eq!(render(merge(&m, &reset)).unwrap().data, "0");
        assert!(matches!(
            counter_add(Some(&plain("x", 1)), 1, 1, Timestamp(2), 0),
            Err(Error::NotAnInteger)
        ));
    }

    fn arb_version() -> impl Strategy<Value = Value> {
        let plain = (0u64..6, prop::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(ts, d)| Value::new(Bytes::from(d), Timestamp(ts), None));
        let tomb = (0u64..6).prop_map(|ts| Value::tombstone(Timestamp(ts)));
        // Counters of one epoch, as different nodes would produce them.
        // Counters from a few resets, as different nodes would produce them.
        let counter = (
            prop::collection::btree_map(0u64..3, 0u64..5, 0..3),
            0u64..6,
            0u64..3,
        )
            .prop_map(|(p, ts, epoch)| {
                let c = Counter {
                    epoch: Timestamp(epoch),
                    epoch_deleted: epoch == 0,
                    base: if epoch == 0 {
                        Bytes::new()
                    } else {
                        Bytes::from(epoch.to_string())
                    },
                    p,
                    ..Counter::default()
                };
                let mut v = Value::new(c.encode(), Timestamp(ts), None);
                v.header.counter = true;
                v
            });
        prop_oneof![plain, tomb, counter]
    }

    proptest! {
        #[test]
        fn merge_is_commutative_idempotent_and_associative(
            a in arb_version(), b in arb_version(), c in arb_version()
        ) {
            prop_assert_eq!(merge(&a, &b), merge(&b, &a));
            prop_assert_eq!(merge(&a, &a), a.clone());
            prop_assert_eq!(merge(&merge(&a, &b), &c), merge(&a, &merge(&b, &c)));
        }
    }
}
