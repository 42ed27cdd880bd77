//! Append-only sets: no acknowledged element lost, none invented, none doubled.
//!
//! Elements are unique integers added to a key: appended to a string (`set`), added to a Redis
//! set (`sadd`) or as fields of a Redis hash (`hset`); nobody removes one. Checks:
//! - the final read (after the last heal) holds every acknowledged insert (else *lost*);
//! - no read ever holds an element nobody tried to insert (*unexpected*), holds one twice
//!   (*duplicated*: an insert applied twice), or holds one whose insert answered `fail`, which
//!   promises it was certainly not applied (*failed but present*);
//! - no read holds anything that is not an element at all (*malformed*);
//! - a collection insert (SADD, HSET) of its fresh element answers "1 added"; an
//!   acknowledged one answering 0 found its element already there, which only an earlier
//!   application of the same request can explain (*reapplied*: exactly-once broken);
//! - once a read has returned an element, every read sent after that never misses it
//!   (*vanished*: an acknowledged state rolled back).
//!
//! The same rules hold in `ap` keyspaces, whose sets are add-wins and whose hash fields are
//! last-writer-wins per field: with no removes and unique fields, every acknowledged add
//! survives every merge. `ap` runs read only after the final heal and convergence, so
//! *vanished*, which would need linearizable reads, never applies to them.

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
    pub failed_but_present: Vec<i64>,
    pub reapplied: Vec<i64>,
    /// Read elements that are not integers, as read.
    pub malformed: Vec<String>,
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
            && self.failed_but_present.is_empty()
            && self.reapplied.is_empty()
            && self.malformed.is_empty()
    }
}

/// What a read returned: its integer elements, and anything else it held (a client records a
/// member that does not parse as an integer as the string it read).
fn elements(op: &Op) -> Result<(Vec<i64>, Vec<String>), String> {
    let mut ints = Vec::new();
    let mut malformed = Vec::new();
    match &op.result {
        serde_json::Value::Null => {}
        serde_json::Value::Array(items) => {
            for v in items {
                match v.as_i64() {
                    Some(e) => ints.push(e),
                    None => malformed.push(v.as_str().map_or_else(|| v.to_string(), String::from)),
                }
            }
        }
        v => return Err(format!("key {}: set read {v} is not a list", op.key)),
    }
    Ok((ints, malformed))
}

/// Checks one key's operations.
pub fn check(key: &str, ops: &[&Op]) -> Result<SetResult, String> {
    let mut attempted = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut failed = BTreeSet::new();
    let mut reapplied = BTreeSet::new();
    for op in ops.iter().filter(|o| o.f == F::Insert) {
        let e = op
            .value
            .as_i64()
            .ok_or_else(|| format!("key {key}: inserted {} is not an integer", op.value))?;
        attempted.insert(e);
        match op.outcome {
            Stage::Ok => {
                acked.insert(e);
                // Only collection inserts record their answer (string appends: null).
                if op.result.as_i64() == Some(0) {
                    reapplied.insert(e);
                }
            }
            Stage::Fail => {
                failed.insert(e);
            }
            _ => {}
        }
    }
    let mut result = SetResult {
        key: key.to_string(),
        acknowledged: acked.len(),
        ..Default::default()
    };
    let mut reads: Vec<(&Op, Vec<i64>)> = Vec::new();
    let mut malformed = BTreeSet::new();
    for op in ops
        .iter()
        .filter(|o| o.f == F::Read && o.outcome == Stage::Ok)
    {
        let (ints, junk) = elements(op)?;
        malformed.extend(junk);
        reads.push((op, ints));
    }
    let (mut unexpected, mut duplicated, mut vanished, mut failed_but_present) = (
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
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
            if failed.contains(&e) {
                failed_but_present.insert(e);
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
    result.failed_but_present = failed_but_present.into_iter().collect();
    result.reapplied = reapplied.into_iter().collect();
    result.malformed = malformed.into_iter().collect();
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
        op_of(
            crate::history::Workload::Set,
            f,
            value,
            t,
            outcome,
            result,
            final_read,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn op_of(
        workload: crate::history::Workload,
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
            workload,
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

    /// An SADD history: members 1-4 acknowledged ("1 added"), 5 indeterminate, 6 certainly
    /// failed; the final read is given by each case.
    fn sadd_history(final_read: serde_json::Value) -> Vec<Op> {
        let sadd = |e: i64, outcome, result| {
            op_of(
                crate::history::Workload::Sadd,
                F::Insert,
                json!(e),
                (0, 1),
                outcome,
                result,
                false,
            )
        };
        let mut ops: Vec<Op> = (1..=4).map(|e| sadd(e, Stage::Ok, json!(1))).collect();
        ops.push(sadd(5, Stage::Info, json!(null)));
        ops.push(sadd(6, Stage::Fail, json!(null)));
        ops.push(op_of(
            crate::history::Workload::Sadd,
            F::Read,
            json!(null),
            (9, 10),
            Stage::Ok,
            final_read,
            true,
        ));
        ops
    }

    #[test]
    fn every_acknowledged_sadd_in_the_final_read_passes() {
        // The indeterminate member may be there or not.
        for read in [json!([4, 2, 1, 3]), json!([1, 2, 3, 4, 5])] {
            let ops = sadd_history(read);
            let r = check("sadd:0", &ops.iter().collect::<Vec<_>>()).unwrap();
            assert!(r.valid(), "{r:?}");
            assert_eq!(r.acknowledged, 4);
        }
    }

    #[test]
    fn a_dropped_sadd_member_is_lost() {
        // What a server that drops an acknowledged member (say, a merge that loses an add)
        // leaves in the history.
        let ops = sadd_history(json!([1, 2, 4, 5]));
        let r = check("sadd:0", &ops.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.lost, vec![3]);
        assert!(!r.valid());
    }

    #[test]
    fn a_failed_insert_that_shows_up_is_reported() {
        // `fail` promised member 6 was certainly not applied.
        let ops = sadd_history(json!([1, 2, 3, 4, 6]));
        let r = check("sadd:0", &ops.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.failed_but_present, vec![6]);
        assert!(r.lost.is_empty() && !r.valid());
    }

    #[test]
    fn an_insert_answered_zero_added_was_applied_twice() {
        // A fresh member is added by exactly one request: answering "0 added" means that
        // request found its own earlier application.
        let mut ops = sadd_history(json!([1, 2, 3, 4]));
        ops[1].result = json!(0);
        let r = check("sadd:0", &ops.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.reapplied, vec![2]);
        assert!(!r.valid());
    }

    #[test]
    fn members_that_are_not_elements_are_malformed() {
        let ops = sadd_history(json!([1, 2, 3, 4, "04"]));
        let r = check("sadd:0", &ops.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(r.malformed, vec!["04".to_string()]);
        assert!(!r.valid());
    }
}
