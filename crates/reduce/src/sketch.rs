//! Top-k: the most frequent values of a group, exact while they are few, then a bounded
//! summary with error bounds.
//!
//! Exact counts are kept for up to [`EXACT_MAX`] distinct values. Past that the summary keeps
//! at most `2 × 64 × k` counters (Space-Saving with lazy eviction, Metwally et al.): whenever
//! it holds more, it keeps the `64 × k` largest and remembers in `floor` the largest count it
//! dropped. A value not held may have been seen up to `floor` times, so a new one starts at
//! `floor + 1` with error `floor`: each counter's count is an upper bound of the true
//! frequency and `count - error` a lower bound, and a value seen more than `floor` times is
//! always held. Two summaries merge by adding counts, a value missing from one counting as
//! that one's `floor` (count and error), then pruning the same way; the bounds stay bounds in
//! any merge order (Agarwal et al., "Mergeable Summaries"). Results say `approximate` with the
//! error of each value they list.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Distinct values counted exactly before the summary turns approximate.
pub const EXACT_MAX: usize = 65_536;
/// Largest `k` a spec may ask for.
pub const K_MAX: u32 = 10_000;
/// Counters per `k` an approximate summary keeps after a prune (twice as many before one).
pub const COUNTERS_PER_K: usize = 64;
/// Longest value a summary holds, in bytes: longer ones are counted by their first
/// `VALUE_BYTES_MAX` bytes (the caller cuts them), so a summary holds at most
/// `EXACT_MAX × VALUE_BYTES_MAX` bytes of values.
pub const VALUE_BYTES_MAX: usize = 1024;

/// A top-k summary of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "TopKWire", from = "TopKWire")]
pub struct TopK {
    k: u32,
    /// value -> (count, error). Exact: every error is 0 and every value seen is here.
    counts: HashMap<Vec<u8>, (u64, u64), foldhash::fast::FixedState>,
    /// The largest count ever dropped (0: nothing dropped, the counts are exact).
    floor: u64,
}

/// The stored form: counters sorted by value, so equal summaries encode alike.
#[derive(Serialize, Deserialize)]
struct TopKWire {
    k: u32,
    floor: u64,
    counts: Vec<(Vec<u8>, u64, u64)>,
}

impl From<TopK> for TopKWire {
    fn from(t: TopK) -> TopKWire {
        let mut counts: Vec<(Vec<u8>, u64, u64)> =
            t.counts.into_iter().map(|(v, (c, e))| (v, c, e)).collect();
        counts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        TopKWire {
            k: t.k,
            floor: t.floor,
            counts,
        }
    }
}

impl From<TopKWire> for TopK {
    fn from(w: TopKWire) -> TopK {
        TopK {
            k: w.k.clamp(1, K_MAX),
            counts: w.counts.into_iter().map(|(v, c, e)| (v, (c, e))).collect(),
            floor: w.floor,
        }
    }
}

/// One listed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranked {
    pub value: Vec<u8>,
    /// An upper bound of its count (the count itself when exact).
    pub count: u64,
    /// `count - error` is a lower bound.
    pub error: u64,
}

impl TopK {
    pub fn new(k: u32) -> TopK {
        TopK {
            k,
            counts: HashMap::default(),
            floor: 0,
        }
    }

    /// Counters kept after a prune.
    fn kept(&self) -> usize {
        (self.k as usize * COUNTERS_PER_K).max(1)
    }

    /// Whether the map holds more than it may (it is then pruned).
    fn over(&self) -> bool {
        if self.floor == 0 {
            self.counts.len() > EXACT_MAX.max(self.kept())
        } else {
            self.counts.len() > 2 * self.kept()
        }
    }

    /// Counts one occurrence of `value`.
    pub fn add(&mut self, value: &[u8]) {
        if let Some((c, _)) = self.counts.get_mut(value) {
            *c += 1;
            return;
        }
        self.counts
            .insert(value.to_vec(), (self.floor + 1, self.floor));
        if self.over() {
            self.prune();
        }
    }

    /// Keeps the [`TopK::kept`] largest counters (ties: the smallest values), raising `floor`
    /// to the largest count dropped.
    fn prune(&mut self) {
        let kept = self.kept();
        if self.counts.len() <= kept {
            return;
        }
        let mut all: Vec<(Vec<u8>, (u64, u64))> = self.counts.drain().collect();
        all.sort_unstable_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
        let dropped_max = all[kept].1.0;
        all.truncate(kept);
        self.floor = self.floor.max(dropped_max);
        self.counts.extend(all);
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &TopK) {
        let (mine, theirs) = (self.floor, other.floor);
        for (v, (c, e)) in self.counts.iter_mut() {
            let (oc, oe) = other.counts.get(v).copied().unwrap_or((theirs, theirs));
            *c += oc;
            *e += oe;
        }
        for (v, (c, e)) in &other.counts {
            if !self.counts.contains_key(v) {
                self.counts.insert(v.clone(), (c + mine, e + mine));
            }
        }
        // A value held by neither may have been seen `floor` times in each.
        self.floor = mine + theirs;
        if self.over() {
            self.prune();
        }
    }

    /// The `k` most frequent values, most frequent first (ties: the smallest value first).
    pub fn top(&self) -> Vec<Ranked> {
        let mut all: Vec<Ranked> = self
            .counts
            .iter()
            .map(|(v, (c, e))| Ranked {
                value: v.clone(),
                count: *c,
                error: *e,
            })
            .collect();
        // Ties by value as values order (numbers by number, then strings by bytes), as groups
        // do; a value that is not a scalar's canonical bytes sorts by its bytes, after them.
        all.sort_by_cached_key(|r| {
            (
                std::cmp::Reverse(r.count),
                crate::extract::Scalar::decode_all(&r.value),
                r.value.clone(),
            )
        });
        all.truncate(self.k as usize);
        all
    }

    pub fn is_approximate(&self) -> bool {
        self.floor > 0
    }

    /// Values held.
    pub fn held(&self) -> usize {
        self.counts.len()
    }

    /// About how many bytes it holds.
    pub fn bytes(&self) -> usize {
        self.counts.keys().map(|v| v.len() + 48).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(t: &TopK) -> Vec<(String, u64)> {
        t.top()
            .into_iter()
            .map(|r| (String::from_utf8(r.value).unwrap(), r.count))
            .collect()
    }

    #[test]
    fn ties_are_ordered_as_values_not_as_bytes() {
        use crate::extract::Scalar;
        use crate::num::Fixed;
        let mut t = TopK::new(10);
        let enc = |s: Scalar| {
            let mut b = Vec::new();
            s.encode(&mut b);
            b
        };
        for v in [
            Scalar::Str(b"zz".to_vec()),
            Scalar::Str(b"aaa".to_vec()),
            Scalar::Num(Fixed::from_int(5)),
            Scalar::Num(Fixed::from_int(-1)),
        ] {
            t.add(&enc(v));
        }
        let order: Vec<Scalar> = t
            .top()
            .into_iter()
            .map(|r| Scalar::decode_all(&r.value).unwrap().remove(0))
            .collect();
        assert_eq!(
            order,
            vec![
                Scalar::Num(Fixed::from_int(-1)),
                Scalar::Num(Fixed::from_int(5)),
                Scalar::Str(b"aaa".to_vec()),
                Scalar::Str(b"zz".to_vec()),
            ]
        );
    }

    #[test]
    fn exact_while_few_and_merge_adds() {
        let mut a = TopK::new(2);
        for w in ["x", "y", "x", "z", "x", "y"] {
            a.add(w.as_bytes());
        }
        assert_eq!(top(&a), vec![("x".into(), 3), ("y".into(), 2)]);
        let mut b = TopK::new(2);
        for w in ["z", "z", "z", "z"] {
            b.add(w.as_bytes());
        }
        a.merge(&b);
        assert_eq!(top(&a), vec![("z".into(), 5), ("x".into(), 3)]);
        assert!(!a.is_approximate());
    }

    #[test]
    fn approximate_summaries_keep_heavy_values_and_true_bounds() {
        // A heavy value among many distinct light ones, split over two summaries.
        let mut parts = [TopK::new(1), TopK::new(1)];
        let mut truth = 0u64;
        for i in 0..(EXACT_MAX as u64 * 3) {
            let p = &mut parts[(i % 2) as usize];
            if i % 10 == 0 {
                p.add(b"heavy");
                truth += 1;
            } else {
                p.add(format!("light{i}").as_bytes());
            }
        }
        let [mut a, b] = parts;
        assert!(a.is_approximate() && b.is_approximate());
        a.merge(&b);
        let best = &a.top()[0];
        assert_eq!(best.value, b"heavy");
        assert!(
            best.count >= truth && best.count - best.error <= truth,
            "{best:?} vs {truth}"
        );
        assert!(a.held() <= 2 * COUNTERS_PER_K);
    }
}
