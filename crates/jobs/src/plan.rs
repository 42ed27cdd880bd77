//! Splitting pinned shards into tasks: one per shard, or several when a shard holds more than
//! [`TASK_KEYS_MAX`] keys, bounded by keys interpolated between the shard's first and last
//! key (the 16 bytes after their common prefix, read as a big-endian number). Interpolation
//! is a guess of where keys lie: on skewed keys some tasks get more than their share (the
//! design's speculation covers stragglers, not skew).
//!
//! A shard of more than [`FIRST_TASK_KEYS`] keys starts with a task of about that many, so
//! that a first partial result is out within about a second of the start (a task's output
//! is what partial results are made of), whatever the shard's size. Its end is the shard's
//! real key at that count when the coordinator could read it from the pin ([`tasks_cut`]):
//! interpolation is far off on keys such as `u:{n}` (decimal digits use 10 of 256 byte
//! values, so an interpolated "200 k keys" held all 555 k keys of a leading digit).

use bytes::Bytes;
use capdb_types::jobs::{ShardPin, TASKS_MAX, TaskPlan};

/// Keys a task covers at most (by the shard's count, evenly split).
pub const TASK_KEYS_MAX: u64 = 1_000_000;
/// Keys of a big shard's first task (about: the cut is interpolated).
pub const FIRST_TASK_KEYS: u64 = 200_000;

/// The tasks of `pins` (input shards pinned for the job), in shard order; at most
/// [`TASKS_MAX`] (past it, tasks cover more keys each).
pub fn tasks(pins: &[ShardPin]) -> Vec<TaskPlan> {
    tasks_cut(pins, &std::collections::HashMap::new())
}

/// [`tasks`], where `first_cuts` gives, by shard, the key that ends the shard's small first
/// task (its [`FIRST_TASK_KEYS`]-th key, read from the pin); a shard without one, or whose cut
/// is not strictly inside its keys, is cut by interpolation.
pub fn tasks_cut(
    pins: &[ShardPin],
    first_cuts: &std::collections::HashMap<u64, Bytes>,
) -> Vec<TaskPlan> {
    // A big shard's small first task counts too.
    let wanted: u64 = pins
        .iter()
        .map(|p| p.keys.div_ceil(TASK_KEYS_MAX).max(1) + u64::from(p.keys > FIRST_TASK_KEYS))
        .sum();
    // Past the bound every shard gets fewer tasks, in proportion.
    let scale = (wanted as f64 / TASKS_MAX as f64).max(1.0);
    let mut out = Vec::new();
    for p in pins {
        let n = ((p.keys.div_ceil(TASK_KEYS_MAX).max(1) as f64 / scale).floor() as u64).max(1);
        let bounds = match (&p.first_key, &p.last_key) {
            (Some(first), Some(last)) if scale <= 1.0 && p.keys > FIRST_TASK_KEYS => {
                // A small first task, then the rest evenly.
                let read = first_cuts
                    .get(&p.shard)
                    .filter(|cut| cut.as_ref() > first.as_ref() && cut.as_ref() <= last.as_ref());
                let early = match read {
                    Some(cut) => vec![cut.clone()],
                    None => split_keys(first, last, p.keys.div_ceil(FIRST_TASK_KEYS)),
                };
                match early.first() {
                    Some(cut) => {
                        let rest = (p.keys - FIRST_TASK_KEYS).div_ceil(TASK_KEYS_MAX).max(1);
                        let mut b = vec![cut.clone()];
                        b.extend(split_keys(cut, last, rest));
                        b
                    }
                    None => split_keys(first, last, n),
                }
            }
            (Some(first), Some(last)) if n > 1 => split_keys(first, last, n),
            _ => Vec::new(),
        };
        let mut from: Option<Bytes> = None;
        for b in bounds {
            out.push(TaskPlan {
                shard: p.shard,
                from: from.clone(),
                to: Some(b.clone()),
                pin_index: p.index,
            });
            from = Some(b);
        }
        out.push(TaskPlan {
            shard: p.shard,
            from,
            to: None,
            pin_index: p.index,
        });
    }
    out
}

/// Up to `n - 1` keys strictly between `first` and `last`, rising, that cut the range into
/// `n` parts of about equal width (fewer when the keys are too close to cut).
pub fn split_keys(first: &[u8], last: &[u8], n: u64) -> Vec<Bytes> {
    if first >= last || n < 2 {
        return Vec::new();
    }
    let common = first.iter().zip(last).take_while(|(a, b)| a == b).count();
    let num = |k: &[u8]| -> u128 {
        let mut b = [0u8; 16];
        for (i, x) in k.iter().skip(common).take(16).enumerate() {
            b[i] = *x;
        }
        u128::from_be_bytes(b)
    };
    let (lo, hi) = (num(first), num(last));
    let step = (hi - lo) / u128::from(n);
    let mut out: Vec<Bytes> = Vec::new();
    for i in 1..n {
        let at = lo + step * u128::from(i);
        let mut key = first[..common].to_vec();
        let bytes = at.to_be_bytes();
        // Trailing zero bytes add nothing to a bound.
        let len = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        key.extend_from_slice(&bytes[..len]);
        let key = Bytes::from(key);
        if key.as_ref() > first && key.as_ref() < last && out.last().is_none_or(|prev| prev < &key)
        {
            out.push(key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(shard: u64, keys: u64, first: &str, last: &str) -> ShardPin {
        ShardPin {
            shard,
            index: 9,
            keys,
            first_key: Some(Bytes::from(first.to_string())),
            last_key: Some(Bytes::from(last.to_string())),
        }
    }

    #[test]
    fn a_small_shard_is_one_task_and_a_big_one_is_cut_into_rising_ranges() {
        let t = tasks(&[
            pin(1, 10, "a", "z"),
            pin(2, 2_500_000, "u:00000000", "u:99999999"),
        ]);
        // The big shard: a small first task, then 2.3 M keys in 3.
        assert_eq!(t.len(), 5);
        assert_eq!(
            (t[0].shard, t[0].from.clone(), t[0].to.clone()),
            (1, None, None)
        );
        let big: Vec<&TaskPlan> = t.iter().filter(|p| p.shard == 2).collect();
        assert_eq!(big[0].from, None);
        assert_eq!(big[3].to, None);
        for w in big.windows(2) {
            assert_eq!(w[0].to, w[1].from);
        }
        assert!(big[0].to < big[1].to && big[1].to < big[2].to);
        // The first covers about an eighth of the width (200 k of 2.5 M keys, evenly spread).
        let at = |k: &Option<Bytes>, or: &str| {
            let k = k.clone().unwrap_or_else(|| Bytes::from(or.to_string()));
            k[2..]
                .iter()
                .rev()
                .fold(0f64, |f, b| (f + f64::from(*b)) / 256.0)
        };
        let span = at(&None, "u:99999999") - at(&None, "u:00000000");
        let width = |p: &TaskPlan| (at(&p.to, "u:99999999") - at(&p.from, "u:00000000")) / span;
        assert!(width(big[0]) < 0.1 && width(big[1]) > 0.25, "{big:?}");
        assert!(big.iter().all(|p| p.pin_index == 9));
    }

    #[test]
    fn a_first_cut_read_from_the_pin_ends_the_first_task_there() {
        let big = pin(2, 2_500_000, "u:1", "u:9999998");
        let cut = Bytes::from_static(b"u:1199999");
        let cuts = std::collections::HashMap::from([(2, cut.clone())]);
        let t = tasks_cut(std::slice::from_ref(&big), &cuts);
        assert_eq!(
            (t[0].from.clone(), t[0].to.clone()),
            (None, Some(cut.clone()))
        );
        assert_eq!(t[1].from, Some(cut));
        assert_eq!(t.len(), 4, "then 2.3 M keys in 3: {t:?}");
        for w in t.windows(2) {
            assert_eq!(w[0].to, w[1].from);
        }
        // A cut outside the shard's keys is not used: interpolated, as without one.
        for outside in ["u:0", "u:99999999", "u:1"] {
            let cuts = std::collections::HashMap::from([(2, Bytes::from(outside))]);
            assert_eq!(
                tasks_cut(std::slice::from_ref(&big), &cuts),
                tasks(std::slice::from_ref(&big))
            );
        }
    }

    #[test]
    fn keys_too_close_to_cut_give_fewer_tasks() {
        assert_eq!(split_keys(b"a", b"a\x00", 10), Vec::<Bytes>::new());
        assert_eq!(split_keys(b"b", b"a", 4), Vec::<Bytes>::new());
        let cuts = split_keys(b"k000", b"k999", 4);
        assert_eq!(cuts.len(), 3);
        assert!(cuts.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_empty_shard_is_one_task() {
        let empty = ShardPin {
            shard: 3,
            index: 1,
            keys: 0,
            first_key: None,
            last_key: None,
        };
        assert_eq!(tasks(&[empty]).len(), 1);
    }
}
