//! Checkers for a run's history: one per workload, each answering valid, invalid (with the
//! evidence) or unknown (a bound was hit). Only "valid" from every checker passes a run.

pub mod counter;
pub mod register;
pub mod set;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::history::{F, Op, Record, Stage, Workload};

/// Bounds on checking a whole history.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time the linearizability search may spend on one key.
    pub per_key: Duration,
    /// Memoized configurations one key's search may keep (about 100 bytes each).
    pub max_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_key: Duration::from_secs(20),
            max_cache_entries: 5_000_000,
        }
    }
}

/// The checkers' combined answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Invalid,
    Unknown,
}

impl Validity {
    /// `true`, `false` or `"unknown"`, as Jepsen writes it.
    pub fn to_json(self) -> Json {
        match self {
            Validity::Valid => json!(true),
            Validity::Invalid => json!(false),
            Validity::Unknown => json!("unknown"),
        }
    }

    fn and(self, other: Validity) -> Validity {
        match (self, other) {
            (Validity::Invalid, _) | (_, Validity::Invalid) => Validity::Invalid,
            (Validity::Unknown, _) | (_, Validity::Unknown) => Validity::Unknown,
            _ => Validity::Valid,
        }
    }
}

/// What the checkers found.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub validity: Validity,
    /// One line per problem, for people.
    pub problems: Vec<String>,
    /// Per-workload details for `report.json`.
    pub details: Json,
}

/// Checks a history (already read or just recorded).
pub fn check(records: &[Record], limits: Limits) -> Result<CheckResult, String> {
    let ops = crate::history::pair(records)?;
    let mut by_key: BTreeMap<(Workload, &str), Vec<&Op>> = BTreeMap::new();
    for op in &ops {
        by_key.entry((op.workload, &op.key)).or_default().push(op);
    }
    let mut validity = Validity::Valid;
    let mut problems = Vec::new();

    // Registers: linearizability per key, on two threads.
    let register_keys: Vec<(&str, &Vec<&Op>)> = by_key
        .iter()
        .filter(|((w, _), _)| *w == Workload::Register)
        .map(|((_, k), v)| (*k, v))
        .collect();
    let mut entries_by_key = Vec::new();
    for (key, ops) in &register_keys {
        let mut entries = Vec::new();
        let mut source = Vec::new();
        for op in ops.iter() {
            if let Some(e) = register::entry(op)? {
                entries.push(e);
                source.push(*op);
            }
        }
        entries_by_key.push((*key, entries, source));
    }
    let outcomes: Vec<register::Outcome> = {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(vec![None; entries_by_key.len()]);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, entries, _)) = entries_by_key.get(i) else {
                            break;
                        };
                        let budget = register::Budget {
                            deadline: Instant::now() + limits.per_key,
                            max_cache_entries: limits.max_cache_entries,
                        };
                        let outcome = register::check(entries, budget);
                        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(outcome);
                    }
                });
            }
        });
        results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|o| o.expect("every key checked"))
            .collect()
    };
    let mut reg_violations = Vec::new();
    let mut reg_unknown = Vec::new();
    let mut reg_ops = 0;
    for ((key, entries, source), outcome) in entries_by_key.iter().zip(&outcomes) {
        reg_ops += entries.len();
        match outcome {
            register::Outcome::Linearizable => {}
            register::Outcome::Violation(sub) => {
                validity = Validity::Invalid;
                problems.push(format!(
                    "register {key}: not linearizable; smallest failing sub-history has {} operations",
                    sub.len()
                ));
                let ops: Vec<Json> = sub.iter().map(|&i| op_json(source[i])).collect();
                reg_violations.push(json!({"key": key, "sub_history": ops}));
            }
            register::Outcome::Unknown(why) => {
                validity = validity.and(Validity::Unknown);
                problems.push(format!("register {key}: unknown ({why})"));
                reg_unknown.push(json!({"key": key, "reason": why}));
            }
        }
    }

    // Counters.
    let mut counter_errors = Vec::new();
    let mut counter_keys = 0;
    for ((w, key), ops) in &by_key {
        if *w != Workload::Counter {
            continue;
        }
        counter_keys += 1;
        let errors = counter::check(ops)?;
        for e in &errors {
            problems.push(format!(
                "counter {key}: read {} outside [{}, {}]{}",
                e.read_value,
                e.lower,
                e.upper,
                if e.final_read { " (final read)" } else { "" }
            ));
        }
        if !errors.is_empty() {
            validity = Validity::Invalid;
        }
        counter_errors.extend(errors);
        if !ops
            .iter()
            .any(|o| o.final_read && o.outcome == Stage::Ok && o.f == F::Read)
        {
            validity = Validity::Invalid;
            problems.push(format!(
                "counter {key}: no final read succeeded after the heal (the cluster did not recover)"
            ));
        }
    }

    // Sets.
    let mut set_results = Vec::new();
    for ((w, key), ops) in &by_key {
        if *w != Workload::Set {
            continue;
        }
        let r = set::check(key, ops)?;
        if !r.valid() {
            validity = Validity::Invalid;
            problems.push(format!(
                "set {key}: lost {:?}, unexpected {:?}, duplicated {:?}, vanished {:?}{}",
                r.lost,
                r.unexpected,
                r.duplicated,
                r.vanished,
                if r.final_read {
                    ""
                } else {
                    ", no final read succeeded"
                }
            ));
        }
        set_results.push(r);
    }

    let details = json!({
        "register": {
            "keys": register_keys.len(),
            "ops_checked": reg_ops,
            "violations": reg_violations,
            "unknown": reg_unknown,
        },
        "counter": {"keys": counter_keys, "errors": counter_errors},
        "set": {
            "keys": set_results.len(),
            "acknowledged": set_results.iter().map(|r| r.acknowledged).sum::<usize>(),
            "lost": set_results.iter().map(|r| r.lost.len()).sum::<usize>(),
            "invalid_keys": set_results.iter().filter(|r| !r.valid()).collect::<Vec<_>>(),
        },
    });
    Ok(CheckResult {
        validity,
        problems,
        details,
    })
}

fn op_json(op: &Op) -> Json {
    json!({
        "process": op.process,
        "node": op.node,
        "f": op.f,
        "value": op.value,
        "type": op.outcome,
        "result": op.result,
        "invoke_ns": op.invoke_ns,
        "complete_ns": op.complete_ns,
    })
}
