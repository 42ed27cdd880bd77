//! Append-only sets: no acknowledged element lost, none invented, none doubled.
//!
//! Elements are unique integers appended to a key. Checks:
//! - the final read (after the last heal) holds every acknowledged insert (else *lost*);
//! - no read ever holds an element nobody tried to insert (*unexpected*) or holds one twice
//!   (*duplicated*: an insert applied twice);
//! - once a read has returned an element, every read sent after that never misses it
//!   (*vanished*: an acknowledged state rolled back).

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::history::{F, Op, Stage};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetResult {
    pub key: String,
    pub acknowledged: usize,
    pub lost: Vec<i64>,
    pub unexpected: Vec<i64>,
    pub duplicated: Vec<i64>,
    pub vanished: Vec<i64>,
    /// Whether a final read of this key succeeded (without one, nothing can be said of loss).
    pub final_read: bool,
}

impl SetResult {
    pub fn valid(&self) -> bool {
        self.final_read
            && self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.duplicated.is_empty()
            && self.vanished.is_empty()
    }
}

fn elements(op: &Op) -> Result<Vec<i64>, String> {
    match &op.result {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| format!("key {}: set element {v} is not an integer", op.key))
            })
            .collect(),
        v => Err(format!("key {}: set read {v} is not a list", op.key)),
    }
}

/// Checks one key's operations.
pub fn check(key: &str, ops: &[&Op]) -> Result<SetResult, String> {
    let mut attempted = BTreeSet::new();
    let mut acked = BTreeSet::new();
    for op in ops.iter().filter(|o| o.f == F::Insert) {
        let e = op
            .value
            .as_i64()
            .ok_or_else(|| format!("key {key}: inserted {} is not an integer", op.value))?;
        attempted.insert(e);
        if op.outcome == Stage::Ok {
            acked.insert(e);
        }
    }
    let mut result = SetResult {
        key: key.to_string(),
        acknowledged: acked.len(),
        ..Default::default()
    };
    let mut reads: Vec<(&Op, Vec<i64>)> = Vec::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Read && o.outcome == Stage::Ok)
    {
        reads.push((op, elements(op)?));
    }
    let (mut unexpected, mut duplicated, mut vanished) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    // The earliest completion time at which each element was seen.
    let mut first_seen: HashMap<i64, u64> = HashMap::new();
    for (op, els) in &reads {
        let mut seen = BTreeSet::new();
        for &e in els {
            if !seen.insert(e) {
                duplicated.insert(e);
            }
            if !attempted.contains(&e) {
                unexpected.insert(e);
            }
            let done = op.complete_ns.unwrap_or(u64::MAX);
            first_seen
                .entry(e)
                .and_modify(|t| *t = (*t).min(done))
                .or_insert(done);
        }
    }
    for (op, els) in &reads {
        let present: BTreeSet<i64> = els.iter().copied().collect();
        for (&e, &seen_at) in &first_seen {
            if seen_at < op.invoke_ns && !present.contains(&e) {
                vanished.insert(e);
            }
        }
    }
    if let Some((_, els)) = reads.iter().rfind(|(op, _)| op.final_read) {
        result.final_read = true;
        let present: BTreeSet<i64> = els.iter().copied().collect();
        result.lost = acked.difference(&present).copied().collect();
    }
    result.unexpected = unexpected.into_iter().collect();
    result.duplicated = duplicated.into_iter().collect();
    result.vanished = vanished.into_iter().collect();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(
        f: F,
        value: serde_json::Value,
        t: (u64, u64),
        outcome: Stage,
        result: serde_json::Value,
        final_read: bool,
    ) -> Op {
        Op {
            process: 0,
            node: 1,
            role: None,
            workload: crate::history::Workload::Set,
            f,
            key: "s".into(),
            value,
            invoke_ns: t.0,
            complete_ns: Some(t.1),
            outcome,
            result,
            error: None,
            final_read,
        }
    }

    #[test]
    fn lost_unexpected_duplicated_and_vanished_elements_are_reported() {
        let ops = [
            op(F::Insert, json!(1), (0, 1), Stage::Ok, json!(null), false),
            op(F::Insert, json!(2), (0, 1), Stage::Ok, json!(null), false),
            op(F::Insert, json!(3), (0, 1), Stage::Info, json!(null), false),
            op(
                F::Read,
                json!(null),
                (2, 3),
                Stage::Ok,
                json!([1, 2, 3]),
                false,
            ),
        ];
        let good = op(
            F::Read,
            json!(null),
            (9, 10),
            Stage::Ok,
            json!([1, 2]),
            true,
        );
        let refs: Vec<&Op> = ops.iter().chain([&good]).collect();
        let r = check("s", &refs).unwrap();
        // 3 was seen at time 3 and is missing at time 9: vanished (an indeterminate insert
        // that became visible must stay visible).
        assert_eq!(r.vanished, vec![3]);
        assert!(r.lost.is_empty());
        let bad = op(
            F::Read,
            json!(null),
            (9, 10),
            Stage::Ok,
            json!([1, 3, 3, 9]),
            true,
        );
        let refs: Vec<&Op> = ops.iter().chain([&bad]).collect();
        let r = check("s", &refs).unwrap();
        assert_eq!(
            (r.lost.clone(), r.unexpected.clone(), r.duplicated.clone()),
            (vec![2], vec![9], vec![3])
        );
        assert!(!r.valid());
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(
            !check("s", &refs).unwrap().valid(),
            "no final read is not a pass"
        );
    }
}
