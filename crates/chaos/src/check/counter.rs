//! Counters: no lost and no doubled increments.
//!
//! Every acknowledged read must lie between the increments that certainly happened before it
//! (acknowledged before the read was sent) and those that possibly did (sent before the read
//! was answered, including indeterminate ones). The final read after the heal bounds the total
//! the same way: at least every acknowledged increment, at most every attempted one.

use serde::Serialize;

use crate::history::{F, Op, Stage};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterError {
    pub key: String,
    pub read_value: i64,
    pub lower: i64,
    pub upper: i64,
    pub read_invoke_ns: u64,
    pub final_read: bool,
}

/// Checks one key's operations (any order). Returns the reads that break the bounds.
pub fn check(ops: &[&Op]) -> Result<Vec<CounterError>, String> {
    let mut adds: Vec<(u64, Option<u64>, i64)> = Vec::new(); // (invoke, ok completion, delta)
    for op in ops.iter().filter(|o| o.f == F::Add) {
        let delta = op
            .value
            .as_i64()
            .ok_or_else(|| format!("key {}: add value {} is not an integer", op.key, op.value))?;
        match op.outcome {
            Stage::Fail => {}
            Stage::Ok => adds.push((op.invoke_ns, op.complete_ns, delta)),
            _ => adds.push((op.invoke_ns, None, delta)),
        }
    }
    let mut errors = Vec::new();
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
        let done = read.complete_ns.unwrap_or(u64::MAX);
        let lower: i64 = adds
            .iter()
            .filter(|(_, ok_at, _)| ok_at.is_some_and(|t| t < read.invoke_ns))
            .map(|a| a.2)
            .sum();
        let upper: i64 = adds
            .iter()
            .filter(|(inv, _, _)| *inv < done)
            .map(|a| a.2)
            .sum();
        if value < lower || value > upper {
            errors.push(CounterError {
                key: read.key.clone(),
                read_value: value,
                lower,
                upper,
                read_invoke_ns: read.invoke_ns,
                final_read: read.final_read,
            });
        }
    }
    Ok(errors)
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
}
