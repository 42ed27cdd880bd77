//! Counters: no lost and no doubled increments.
//!
//! A counter's value is observed by reads and, in `cp` runs, by every acknowledged increment
//! (INCRBY answers the value after it was applied). Each observation must be explained by the
//! increments: every increment acknowledged before the observation was sent is certainly in it
//! (its own increment too), every other increment sent before the observation was answered
//! (concurrent, or indeterminate: `info`) may be, once at most, and increments that certainly
//! failed (`fail`) are not. Two checks follow, both sound (neither can convict a correct
//! server):
//!
//! - **bounds**: the value lies between the certain sum and the certain plus every possible
//!   increment;
//! - **combination**: the value minus the certain sum is the sum of some subset of the
//!   possible increments, each used at most once.
//!
//! Why the second: with indeterminate increments around (and a leader kill produces them), the
//! bounds have slack, and an increment applied twice often stays under the upper bound. The
//! workload draws every increment at random from a large range (`workload::INCREMENT_MAX`), so
//! the sums of different subsets almost never coincide, and a value that counts one increment
//! twice is almost never a subset sum. The search is exact (meet in the middle); with more than
//! [`EXACT_MAX`] possible increments it is skipped and only the bounds apply (keys retire after
//! a bounded number of operations, so this is rare).
//!
//! The final read after the heal is an observation like any other, with every increment of the
//! run before it: at least every acknowledged one, at most every attempted one that did not
//! fail, and exactly some combination of them.

use std::collections::HashSet;

use serde::Serialize;

use crate::history::{F, Op, Stage};

/// Most possible increments the combination check considers for one observation (it
/// enumerates `2^(EXACT_MAX/2)` sums on each side).
pub const EXACT_MAX: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterError {
    pub key: String,
    /// What observed the value: `read`, or `add` (an increment's own answer).
    pub observed_by: &'static str,
    pub read_value: i64,
    pub lower: i64,
    pub upper: i64,
    pub read_invoke_ns: u64,
    pub final_read: bool,
    /// `bounds` (outside `[lower, upper]`) or `combination` (inside them, but no subset of the
    /// possible increments, each counted once, makes up the difference).
    pub reason: &'static str,
}

/// Something that saw the counter's value.
struct Observation {
    value: i64,
    invoke_ns: u64,
    done_ns: u64,
    /// For an increment's own answer: its index in the increments.
    own: Option<usize>,
    final_read: bool,
}

/// An increment that may have happened.
struct Add {
    invoke_ns: u64,
    /// When it was acknowledged; `None` for indeterminate increments.
    ok_ns: Option<u64>,
    delta: i64,
}

/// Checks one key's operations (any order). Returns the observations that no set of
/// increments explains.
pub fn check(ops: &[&Op]) -> Result<Vec<CounterError>, String> {
    let mut adds: Vec<Add> = Vec::new();
    let mut observations: Vec<Observation> = Vec::new();
    for op in ops.iter().filter(|o| o.f == F::Add) {
        let delta = op
            .value
            .as_i64()
            .ok_or_else(|| format!("key {}: add value {} is not an integer", op.key, op.value))?;
        if delta < 0 {
            return Err(format!("key {}: add value {delta} is negative", op.key));
        }
        match op.outcome {
            Stage::Fail => continue,
            Stage::Ok => adds.push(Add {
                invoke_ns: op.invoke_ns,
                ok_ns: Some(op.complete_ns.unwrap_or(u64::MAX)),
                delta,
            }),
            _ => adds.push(Add {
                invoke_ns: op.invoke_ns,
                ok_ns: None,
                delta,
            }),
        }
        // An acknowledged increment's answer is the counter after it (absent in histories of
        // `ap` runs, whose replicas answer with their local view, and in older histories).
        if op.outcome == Stage::Ok
            && let Some(v) = op.result.as_i64()
        {
            observations.push(Observation {
                value: v,
                invoke_ns: op.invoke_ns,
                done_ns: op.complete_ns.unwrap_or(u64::MAX),
                own: Some(adds.len() - 1),
                final_read: false,
            });
        }
    }
    for read in ops
        .iter()
        .filter(|o| o.f == F::Read && o.outcome == Stage::Ok)
    {
        let value = match &read.result {
            serde_json::Value::Null => 0,
            v => v
                .as_i64()
                .ok_or_else(|| format!("key {}: counter read {v} is not an integer", read.key))?,
        };
        observations.push(Observation {
            value,
            invoke_ns: read.invoke_ns,
            done_ns: read.complete_ns.unwrap_or(u64::MAX),
            own: None,
            final_read: read.final_read,
        });
    }
    let key = ops.first().map(|o| o.key.clone()).unwrap_or_default();
    let mut errors = Vec::new();
    for o in observations {
        let Observation {
            value,
            invoke_ns,
            done_ns,
            own,
            final_read,
        } = o;
        let mut certain: i64 = 0;
        let mut possible: Vec<i64> = Vec::new();
        for (i, a) in adds.iter().enumerate() {
            if Some(i) == own || a.ok_ns.is_some_and(|t| t < invoke_ns) {
                certain += a.delta;
            } else if a.invoke_ns < done_ns {
                possible.push(a.delta);
            }
        }
        let lower = certain;
        let upper = certain + possible.iter().sum::<i64>();
        let reason = if value < lower || value > upper {
            Some("bounds")
        } else if possible.len() <= EXACT_MAX && !subset_sums_to(&possible, value - certain) {
            Some("combination")
        } else {
            None
        };
        if let Some(reason) = reason {
            errors.push(CounterError {
                key: key.clone(),
                observed_by: if own.is_none() { "read" } else { "add" },
                read_value: value,
                lower,
                upper,
                read_invoke_ns: invoke_ns,
                final_read,
                reason,
            });
        }
    }
    Ok(errors)
}

/// Whether some subset of `items` (each used at most once; all non-negative) sums to
/// `target`. Meet in the middle: every sum of the first half in a set, then each sum of the
/// second half looks up its complement.
fn subset_sums_to(items: &[i64], target: i64) -> bool {
    assert!(
        items.len() <= EXACT_MAX,
        "too many items for an exact search"
    );
    if target < 0 {
        return false;
    }
    // Items larger than the target can never be part of the subset.
    let items: Vec<i64> = items.iter().copied().filter(|&d| d <= target).collect();
    let (a, b) = items.split_at(items.len() / 2);
    let sums = |half: &[i64]| {
        let mut out = vec![0i64];
        for &d in half {
            let more: Vec<i64> = out.iter().map(|s| s + d).filter(|&s| s <= target).collect();
            out.extend(more);
        }
        out
    };
    let left: HashSet<i64> = sums(a).into_iter().collect();
    sums(b).into_iter().any(|s| left.contains(&(target - s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn op(
        f: F,
        value: serde_json::Value,
        t: (u64, u64),
        outcome: Stage,
        result: serde_json::Value,
    ) -> Op {
        Op {
            process: 0,
            node: 1,
            role: None,
            workload: crate::history::Workload::Counter,
            f,
            key: "c".into(),
            value,
            invoke_ns: t.0,
            complete_ns: Some(t.1),
            outcome,
            result,
            error: None,
            final_read: false,
        }
    }

    fn final_read(value: i64, t: u64) -> Op {
        let mut r = op(F::Read, json!(null), (t, t + 1), Stage::Ok, json!(value));
        r.final_read = true;
        r
    }

    fn reasons(ops: &[Op]) -> Vec<&'static str> {
        let refs: Vec<&Op> = ops.iter().collect();
        check(&refs).unwrap().iter().map(|e| e.reason).collect()
    }

    #[test]
    fn reads_within_bounds_pass_and_lost_or_doubled_increments_fail() {
        let ops = [
            op(F::Add, json!(1), (0, 10), Stage::Ok, json!(null)),
            op(F::Add, json!(2), (5, 20), Stage::Info, json!(null)),
            op(F::Read, json!(null), (30, 40), Stage::Ok, json!(1)),
            op(F::Read, json!(null), (30, 40), Stage::Ok, json!(3)),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(check(&refs).unwrap().is_empty());
        // Lost: the acknowledged +1 is missing.
        let lost = op(F::Read, json!(null), (30, 40), Stage::Ok, json!(0));
        let refs: Vec<&Op> = ops.iter().chain([&lost]).collect();
        assert_eq!(check(&refs).unwrap().len(), 1);
        // Doubled: more than was ever attempted.
        let doubled = op(F::Read, json!(null), (30, 40), Stage::Ok, json!(4));
        let refs: Vec<&Op> = ops.iter().chain([&doubled]).collect();
        assert_eq!(check(&refs).unwrap()[0].upper, 3);
    }

    #[test]
    fn a_doubled_acknowledged_increment_fails_even_within_the_bounds() {
        // +300 acknowledged, +500 indeterminate (it may or may not have happened). A final
        // 600 is under the upper bound (800) but is 300 counted twice: no subset of {500}
        // makes up the 300 beyond the certain 300.
        let base = [
            op(F::Add, json!(300), (0, 10), Stage::Ok, json!(null)),
            op(F::Add, json!(500), (5, 20), Stage::Info, json!(null)),
        ];
        let mut doubled = base.to_vec();
        doubled.push(final_read(600, 100));
        assert_eq!(reasons(&doubled), ["combination"]);
        // Every honest outcome passes: the +500 applied or not.
        for v in [300, 800] {
            let mut ok = base.to_vec();
            ok.push(final_read(v, 100));
            assert!(reasons(&ok).is_empty(), "{v}");
        }
        // Without the uncertain increment the bounds alone catch it.
        assert_eq!(
            reasons(&[base[0].clone(), final_read(600, 100)]),
            ["bounds"]
        );
    }

    #[test]
    fn a_doubled_indeterminate_or_failed_increment_fails() {
        let ops = [
            op(F::Add, json!(1000), (0, 10), Stage::Ok, json!(null)),
            op(F::Add, json!(70), (5, 20), Stage::Info, json!(null)),
            op(F::Add, json!(9), (6, 21), Stage::Info, json!(null)),
        ];
        // The indeterminate +70 counted twice: 1140, above the bound 1000 + 70 + 9.
        let mut twice = ops.to_vec();
        twice.push(final_read(1140, 100));
        assert_eq!(reasons(&twice), ["bounds"]);
        // With a larger uncertain neighbour the bound has room; the combination has not.
        let mut roomy = ops.to_vec();
        roomy.push(op(F::Add, json!(200), (7, 22), Stage::Info, json!(null)));
        roomy.push(final_read(1140, 100));
        assert_eq!(reasons(&roomy), ["combination"]);
        // A failed increment certainly did not happen: seeing it applied is a violation.
        let failed = [
            op(F::Add, json!(1000), (0, 10), Stage::Ok, json!(null)),
            op(F::Add, json!(40), (5, 20), Stage::Fail, json!(null)),
            op(F::Add, json!(200), (7, 22), Stage::Info, json!(null)),
            final_read(1040, 100),
        ];
        assert_eq!(reasons(&failed), ["combination"]);
    }

    #[test]
    fn an_increment_that_answers_a_doubled_count_fails() {
        // INCRBY 25 sent through a follower, applied by a dying leader and again by the next
        // one, answers 50 although it is the only increment: its own answer convicts it.
        let ops = [op(F::Add, json!(25), (0, 900), Stage::Ok, json!(50))];
        assert_eq!(reasons(&ops), ["bounds"]);
        let refs: Vec<&Op> = ops.iter().collect();
        assert_eq!(check(&refs).unwrap()[0].observed_by, "add");
        // Honest answers pass, including one that includes a concurrent increment.
        let ok = [
            op(F::Add, json!(25), (0, 900), Stage::Ok, json!(32)),
            op(F::Add, json!(7), (10, 20), Stage::Ok, json!(7)),
            op(F::Add, json!(100), (950, 990), Stage::Ok, json!(132)),
            final_read(132, 1000),
        ];
        assert!(reasons(&ok).is_empty());
    }

    #[test]
    fn subset_sums_are_exact() {
        assert!(subset_sums_to(&[], 0));
        assert!(!subset_sums_to(&[], 1));
        assert!(subset_sums_to(&[3, 5, 9], 14));
        assert!(subset_sums_to(&[3, 5, 9], 17));
        assert!(!subset_sums_to(&[3, 5, 9], 6));
        assert!(!subset_sums_to(&[3, 5, 9], -3));
        // Each item once: 5 + 5 is not available from a single 5.
        assert!(!subset_sums_to(&[5, 3], 10));
        assert!(subset_sums_to(&[5, 5], 10));
        let many: Vec<i64> = (0..EXACT_MAX as i64).map(|i| 1 << i).collect();
        assert!(subset_sums_to(&many, (1 << 31) + 5));
        assert!(!subset_sums_to(&many, 1 << 33));
    }
}
