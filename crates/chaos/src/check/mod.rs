//! Checkers for a run's history: one per workload, each answering valid, invalid (with the
//! evidence) or unknown (a bound was hit). Only "valid" from every checker passes a run.

pub mod append;
pub mod bank;
pub mod counter;
pub mod register;
pub mod set;
pub mod stream;

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

/// Operations by (workload, key).
type ByKey<'a> = BTreeMap<(Workload, &'a str), Vec<&'a Op>>;

/// Checks a history (already read or just recorded).
pub fn check(records: &[Record], limits: Limits) -> Result<CheckResult, String> {
    let ops = crate::history::pair(records)?;
    let mut by_key: ByKey = BTreeMap::new();
    for op in &ops {
        by_key.entry((op.workload, &op.key)).or_default().push(op);
    }
    let mut validity = Validity::Valid;
    let mut problems = Vec::new();
    let register = check_registers(&by_key, limits, &mut validity, &mut problems)?;
    let counter = check_counters(&by_key, &mut validity, &mut problems)?;
    let mut details = json!({
        "register": register,
        "counter": counter,
    });
    // One entry per set-like workload: `set`, and `sadd` and `hset` when they ran.
    if let Some(d) = details.as_object_mut() {
        d.extend(check_sets(&by_key, &mut validity, &mut problems)?);
        if let Some(append) = check_appends(&ops, &mut validity, &mut problems)? {
            d.insert("append".into(), append);
        }
        if let Some(bank) = check_bank(&ops, &mut validity, &mut problems)? {
            d.insert("bank".into(), bank);
        }
    }
    Ok(CheckResult {
        validity,
        problems,
        details,
    })
}

/// Registers (and the cas workload's keys): linearizability per key, on two threads. Adds to
/// `validity` and `problems`; returns the details for the report.
fn check_registers(
    by_key: &ByKey,
    limits: Limits,
    validity: &mut Validity,
    problems: &mut Vec<String>,
) -> Result<Json, String> {
    let register_keys: Vec<(&str, &Vec<&Op>)> = by_key
        .iter()
        .filter(|((w, _), _)| w.is_register())
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
    let histories: Vec<&[register::Entry]> =
        entries_by_key.iter().map(|(_, e, _)| &e[..]).collect();
    let outcomes = search_registers(&histories, limits);
    let mut reg_violations = Vec::new();
    let mut reg_unknown = Vec::new();
    let mut reg_ops = 0;
    for (((key, entries, source), outcome), (_, all_ops)) in
        entries_by_key.iter().zip(&outcomes).zip(&register_keys)
    {
        reg_ops += entries.len();
        match outcome {
            register::Outcome::Linearizable => {}
            register::Outcome::Violation(sub) => {
                *validity = Validity::Invalid;
                let sub_ops: Vec<&Op> = sub.iter().map(|&i| source[i]).collect();
                let writers = writers_of_observed(&sub_ops, all_ops);
                let blame: Vec<String> = writers.iter().map(|w| describe(w)).collect();
                problems.push(format!(
                    "register {key}: not linearizable; smallest failing sub-history has {} operations{}",
                    sub.len(),
                    if blame.is_empty() {
                        String::new()
                    } else {
                        format!("; what it observed was written by {}", blame.join(", "))
                    }
                ));
                let ops: Vec<Json> = sub_ops.iter().map(|o| op_json(o)).collect();
                let writers: Vec<Json> = writers.iter().map(|o| op_json(o)).collect();
                reg_violations.push(
                    json!({"key": key, "sub_history": ops, "writers_of_observed_values": writers}),
                );
            }
            register::Outcome::Unknown(why) => {
                *validity = validity.and(Validity::Unknown);
                problems.push(format!("register {key}: unknown ({why})"));
                reg_unknown.push(json!({"key": key, "reason": why}));
            }
        }
    }
    Ok(json!({
        "keys": register_keys.len(),
        "ops_checked": reg_ops,
        "violations": reg_violations,
        "unknown": reg_unknown,
    }))
}

/// Runs the linearizability search on each key's history, on two threads, each key within
/// `limits`. The outcomes are in the order of `histories`.
fn search_registers(histories: &[&[register::Entry]], limits: Limits) -> Vec<register::Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; histories.len()]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(entries) = histories.get(i) else {
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
}

/// Transactions of the `append` workload: strict serializability (`append.rs`). `None` when
/// the workload did not run.
fn check_appends(
    ops: &[Op],
    validity: &mut Validity,
    problems: &mut Vec<String>,
) -> Result<Option<Json>, String> {
    let mut txns = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        if op.workload != Workload::Append {
            continue;
        }
        txns.push(append_txn(index, op)?);
    }
    if txns.is_empty() {
        return Ok(None);
    }
    let r = append::check(&txns);
    if !r.valid() {
        *validity = Validity::Invalid;
        let mut kinds: Vec<&str> = r.anomalies.iter().map(|a| a.kind.as_str()).collect();
        kinds.sort();
        kinds.dedup();
        problems.push(format!(
            "append: not strictly serializable: {} anomalies ({})",
            r.anomalies.len(),
            kinds.join(", ")
        ));
    }
    Ok(Some(json!({
        "transactions": r.transactions,
        "committed": r.committed,
        "keys": r.keys,
        "anomalies": r.anomalies.iter().take(50).collect::<Vec<_>>(),
    })))
}

/// The `bank` workload: every read sums to the total, no balance negative (`bank.rs`). `None`
/// when the workload did not run.
fn check_bank(
    ops: &[Op],
    validity: &mut Validity,
    problems: &mut Vec<String>,
) -> Result<Option<Json>, String> {
    let bank_ops: Vec<&Op> = ops
        .iter()
        .filter(|o| o.workload == Workload::Bank)
        .collect();
    if bank_ops.is_empty() {
        return Ok(None);
    }
    let r = bank::check(&bank_ops)?;
    if !r.valid() {
        *validity = Validity::Invalid;
        problems.extend(r.problems());
    }
    Ok(Some(serde_json::to_value(&r).map_err(|e| e.to_string())?))
}

/// One `append` operation as the checker sees it: micro-operations from its result when it
/// succeeded, else from what was sent (reads unknown).
fn append_txn(index: usize, op: &Op) -> Result<append::Txn, String> {
    let outcome = match op.outcome {
        Stage::Ok => append::Outcome::Ok,
        Stage::Fail => append::Outcome::Fail,
        _ => append::Outcome::Info,
    };
    let source = if outcome == append::Outcome::Ok {
        &op.result
    } else {
        &op.value
    };
    let bad = || format!("append operation {index}: malformed micro-operations {source}");
    let mut mops = Vec::new();
    for m in source.as_array().ok_or_else(bad)? {
        let key = m[1].as_str().ok_or_else(bad)?.to_string();
        mops.push(match m[0].as_str() {
            Some("append") => append::Mop::Append {
                key,
                value: m[2].as_i64().ok_or_else(bad)?,
            },
            Some("r") => append::Mop::Read {
                key,
                value: match &m[2] {
                    Json::Null => None,
                    Json::Array(items) => Some(
                        items
                            .iter()
                            // A non-integer element is garbage: no append wrote it.
                            .map(|e| e.as_i64().unwrap_or(i64::MIN))
                            .collect(),
                    ),
                    _ => return Err(bad()),
                },
            },
            _ => return Err(bad()),
        });
    }
    Ok(append::Txn {
        index,
        invoke_ns: op.invoke_ns,
        complete_ns: op.complete_ns,
        outcome,
        mops,
    })
}

/// Counters: every observation within the bounds the increments allow, and a final read per
/// key. Adds to `validity` and `problems`; returns the details for the report.
fn check_counters(
    by_key: &ByKey,
    validity: &mut Validity,
    problems: &mut Vec<String>,
) -> Result<Json, String> {
    let mut counter_errors = Vec::new();
    let mut counter_keys = 0;
    for ((w, key), ops) in by_key {
        if *w != Workload::Counter {
            continue;
        }
        counter_keys += 1;
        let mut errors = counter::check(ops)?;
        errors.sort_by_key(|e| e.read_invoke_ns);
        // Once an increment is counted twice every later observation of the key is off too:
        // name the first one and the final read, and count the rest.
        let shown: Vec<&counter::CounterError> = errors
            .iter()
            .enumerate()
            .filter(|(i, e)| *i == 0 || e.final_read)
            .map(|(_, e)| e)
            .collect();
        for e in &shown {
            problems.push(counter_problem(key, e, errors.len(), shown.len()));
        }
        if !errors.is_empty() {
            *validity = Validity::Invalid;
        }
        counter_errors.extend(errors);
        if !ops
            .iter()
            .any(|o| o.final_read && o.outcome == Stage::Ok && o.f == F::Read)
        {
            *validity = Validity::Invalid;
            problems.push(format!(
                "counter {key}: no final read succeeded after the heal (the cluster did not recover)"
            ));
        }
    }
    Ok(json!({"keys": counter_keys, "errors": counter_errors}))
}

/// One line for counter error `e` of `key`, which has `errors` in all, `shown` of them named.
fn counter_problem(key: &str, e: &counter::CounterError, errors: usize, shown: usize) -> String {
    let what = if e.observed_by == "add" {
        "an increment answered"
    } else if e.final_read {
        "the final read saw"
    } else {
        "a read saw"
    };
    let more = if e.final_read || errors <= shown {
        String::new()
    } else {
        format!(" ({errors} observations of this key fail in all)")
    };
    match e.reason {
        "bounds" => format!(
            "counter {key}: {what} {}, outside [{}, {}] (lost or doubled increments){more}",
            e.read_value, e.lower, e.upper
        ),
        _ => format!(
            "counter {key}: {what} {}, which no set of the possible increments (each counted once) adds up to (a doubled or failed increment applied){more}",
            e.read_value
        ),
    }
}

/// Set-like workloads (string appends, Redis sets, Redis hashes): every acknowledged element
/// present, nothing unexpected (see [`set`]). Adds to `validity` and `problems`; returns the
/// details for the report, per workload.
fn check_sets(
    by_key: &ByKey,
    validity: &mut Validity,
    problems: &mut Vec<String>,
) -> Result<serde_json::Map<String, Json>, String> {
    let mut details = serde_json::Map::new();
    for workload in Workload::ALL.into_iter().filter(|w| w.is_set()) {
        let mut results = Vec::new();
        for ((w, key), ops) in by_key {
            if *w != workload {
                continue;
            }
            let r = set::check(key, ops)?;
            if !r.valid() {
                *validity = Validity::Invalid;
                problems.push(set_problem(workload, &r));
            }
            results.push(r);
        }
        if results.is_empty() && workload != Workload::Set {
            continue;
        }
        details.insert(
            workload_name(workload),
            json!({
                "keys": results.len(),
                "acknowledged": results.iter().map(|r| r.acknowledged).sum::<usize>(),
                "lost": results.iter().map(|r| r.lost.len()).sum::<usize>(),
                "invalid_keys": results.iter().filter(|r| !r.valid()).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(details)
}

/// A workload's name as the command line and the history spell it.
fn workload_name(w: Workload) -> String {
    format!("{w:?}").to_lowercase()
}

/// One line for an invalid key of a set-like workload, naming only what went wrong, e.g.
/// `sadd sadd:3: lost [17, 40]`.
fn set_problem(workload: Workload, r: &set::SetResult) -> String {
    let mut what = Vec::new();
    let mut add = |name: &str, items: String, empty: bool| {
        if !empty {
            what.push(format!("{name} {items}"));
        }
    };
    add("lost", format!("{:?}", r.lost), r.lost.is_empty());
    add(
        "unexpected",
        format!("{:?}", r.unexpected),
        r.unexpected.is_empty(),
    );
    add(
        "duplicated",
        format!("{:?}", r.duplicated),
        r.duplicated.is_empty(),
    );
    add(
        "vanished",
        format!("{:?}", r.vanished),
        r.vanished.is_empty(),
    );
    add(
        "answered fail (certainly not applied) but present",
        format!("{:?}", r.failed_but_present),
        r.failed_but_present.is_empty(),
    );
    add(
        "answered 0 added (applied twice)",
        format!("{:?}", r.reapplied),
        r.reapplied.is_empty(),
    );
    add(
        "malformed",
        format!("{:?}", r.malformed),
        r.malformed.is_empty(),
    );
    if !r.final_read {
        what.push("no final read succeeded".into());
    }
    format!("{} {}: {}", workload_name(workload), r.key, what.join(", "))
}

/// The operations outside a failing sub-history that wrote a value it observed (a read's
/// result, a successful CAS's expected value). A violation shrunk to "a read of a value
/// nothing wrote" is explained by them: typically a write that answered `fail`, or a CAS that
/// answered `false`, although it took effect.
fn writers_of_observed<'a>(sub: &[&Op], all: &[&'a Op]) -> Vec<&'a Op> {
    let mut observed = Vec::new();
    for op in sub {
        match op.f {
            F::Read => observed.extend(op.result.as_i64()),
            F::Cas if op.result == json!(true) => observed.extend(op.value[0].as_i64()),
            _ => {}
        }
    }
    all.iter()
        .copied()
        .filter(|o| !sub.iter().any(|s| std::ptr::eq(*s, *o)))
        .filter(|o| {
            let written = match o.f {
                F::Write => o.value.as_i64(),
                F::Cas => o.value[1].as_i64(),
                _ => None,
            };
            written.is_some_and(|v| observed.contains(&v))
        })
        .collect()
}

/// One operation in a sentence, e.g. `cas [17,18] answered false (process 9 via node 3,
/// follower)`.
fn describe(op: &Op) -> String {
    let answer = match (op.outcome, op.f) {
        (Stage::Ok, F::Cas) => format!("answered {}", op.result),
        (Stage::Ok, _) => "answered ok".to_string(),
        (Stage::Fail, _) => format!("failed ({})", op.error.as_deref().unwrap_or("")),
        _ => format!("outcome unknown ({})", op.error.as_deref().unwrap_or("")),
    };
    let via = match op.role {
        Some(r) => format!("node {}, {}", op.node, format!("{r:?}").to_lowercase()),
        None => format!("node {}", op.node),
    };
    format!(
        "{} {} {answer} (process {} via {via})",
        format!("{:?}", op.f).to_lowercase(),
        op.value,
        op.process
    )
}

fn op_json(op: &Op) -> Json {
    json!({
        "process": op.process,
        "node": op.node,
        "role": op.role,
        "error": op.error,
        "f": op.f,
        "value": op.value,
        "type": op.outcome,
        "result": op.result,
        "invoke_ns": op.invoke_ns,
        "complete_ns": op.complete_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{OpEvent, Role};

    /// An operation as the two records a run writes: invoke and completion (none when `done`
    /// is `None`: the run ended first).
    #[allow(clippy::too_many_arguments)]
    fn op(
        process: u64,
        w: Workload,
        f: F,
        key: &str,
        value: Json,
        (at, done): (u64, Option<u64>),
        outcome: Stage,
        result: Json,
    ) -> Vec<Record> {
        let event = |stage, time_ns, result| {
            Record::Op(OpEvent {
                index: 0,
                time_ns,
                stage,
                process,
                node: 1,
                role: Some(Role::Follower),
                workload: w,
                f,
                key: key.into(),
                value: value.clone(),
                result,
                error: None,
                final_read: false,
            })
        };
        let mut out = vec![event(Stage::Invoke, at, Json::Null)];
        if let Some(done) = done {
            out.push(event(outcome, done, result));
        }
        out
    }

    fn sorted(mut records: Vec<Record>) -> Vec<Record> {
        records.sort_by_key(|r| match r {
            Record::Op(e) => e.time_ns,
            Record::Nemesis(e) => e.time_ns,
        });
        records
    }

    #[test]
    fn a_doubled_cas_fails_the_run() {
        let (c, k) = (Workload::Cas, "{cas}:7");
        let ms = 1_000_000;
        let records = sorted(
            [
                op(
                    0,
                    c,
                    F::Write,
                    k,
                    json!(190),
                    (0, Some(5 * ms)),
                    Stage::Ok,
                    Json::Null,
                ),
                op(
                    1,
                    c,
                    F::Read,
                    k,
                    Json::Null,
                    (10 * ms, Some(20 * ms)),
                    Stage::Ok,
                    json!(190),
                ),
                // Applied, answered nil (it was applied a second time and failed its check).
                op(
                    2,
                    c,
                    F::Cas,
                    k,
                    json!([190, 257]),
                    (20 * ms, Some(700 * ms)),
                    Stage::Ok,
                    json!(false),
                ),
                op(
                    3,
                    c,
                    F::Cas,
                    k,
                    json!([8, 278]),
                    (35 * ms, Some(40 * ms)),
                    Stage::Info,
                    Json::Null,
                ),
                op(
                    4,
                    c,
                    F::Read,
                    k,
                    Json::Null,
                    (698 * ms, Some(699 * ms)),
                    Stage::Ok,
                    json!(257),
                ),
            ]
            .concat(),
        );
        let r = check(&records, Limits::default()).unwrap();
        assert_eq!(r.validity, Validity::Invalid);
        assert!(
            r.problems[0].starts_with("register {cas}:7: not linearizable"),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems[0].ends_with(
                "written by cas [190,257] answered false (process 2 via node 1, follower)"
            ),
            "{:?}",
            r.problems
        );
        assert_eq!(r.details["register"]["violations"][0]["key"], "{cas}:7");
    }

    #[test]
    fn a_doubled_increment_fails_the_run() {
        let (c, k) = (Workload::Counter, "ctr:0");
        let ms = 1_000_000;
        let mut records = [
            op(
                0,
                c,
                F::Add,
                k,
                json!(300),
                (0, Some(900 * ms)),
                Stage::Ok,
                json!(300),
            ),
            // An indeterminate increment gives the upper bound room for the doubled one...
            op(
                1,
                c,
                F::Add,
                k,
                json!(500),
                (5 * ms, Some(30 * ms)),
                Stage::Info,
                Json::Null,
            ),
            // ...and one that certainly failed counts for nothing.
            op(
                2,
                c,
                F::Add,
                k,
                json!(40),
                (6 * ms, Some(31 * ms)),
                Stage::Fail,
                Json::Null,
            ),
        ]
        .concat();
        let mut last = op(
            5,
            c,
            F::Read,
            k,
            Json::Null,
            (2000 * ms, Some(2001 * ms)),
            Stage::Ok,
            json!(600),
        );
        for r in &mut last {
            if let Record::Op(e) = r {
                e.final_read = true;
            }
        }
        records.extend(last);
        let r = check(&sorted(records), Limits::default()).unwrap();
        assert_eq!(r.validity, Validity::Invalid);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0].contains("the final read saw 600"),
            "{:?}",
            r.problems
        );
        assert_eq!(r.details["counter"]["errors"][0]["reason"], "combination");
    }

    #[test]
    fn append_transactions_are_read_from_the_history_and_a_stale_read_fails_the_run() {
        let ms = 1_000_000;
        let history = |late_read: Json| {
            let (w, k) = (Workload::Append, "append");
            let records = sorted(
                [
                    op(
                        1,
                        w,
                        F::Txn,
                        k,
                        json!([["append", "append:0", 1], ["append", "append:1", 2]]),
                        (0, Some(ms)),
                        Stage::Ok,
                        json!([["append", "append:0", 1], ["append", "append:1", 2]]),
                    ),
                    // Failed: certainly not applied, so nobody may read 3.
                    op(
                        2,
                        w,
                        F::Txn,
                        k,
                        json!([["append", "append:0", 3]]),
                        (2 * ms, Some(3 * ms)),
                        Stage::Fail,
                        Json::Null,
                    ),
                    op(
                        3,
                        w,
                        F::Txn,
                        k,
                        json!([["r", "append:0", null], ["r", "append:1", null]]),
                        (4 * ms, Some(5 * ms)),
                        Stage::Ok,
                        json!([["r", "append:0", [1]], ["r", "append:1", late_read]]),
                    ),
                ]
                .concat(),
            );
            check(&records, Limits::default()).unwrap()
        };
        let r = history(json!([2]));
        assert_eq!(r.validity, Validity::Valid, "{:?}", r.problems);
        assert_eq!(r.details["append"]["committed"], 2);
        // Begun after the append completed, it misses it: a stale read.
        let r = history(json!([]));
        assert_eq!(r.validity, Validity::Invalid);
        assert_eq!(
            r.problems,
            vec!["append: not strictly serializable: 2 anomalies (G-single, lost)".to_string()]
        );
    }

    #[test]
    fn a_collection_that_drops_an_acknowledged_element_fails_the_run() {
        let ms = 1_000_000;
        // Two Redis collections, each with three acknowledged inserts ("1 added").
        let history = |sadd_final: Json, hset_final: Json| {
            let mut records = Vec::new();
            for (n, (w, key, last)) in [
                (Workload::Sadd, "sadd:0", sadd_final),
                (Workload::Hset, "hset:0", hset_final),
            ]
            .into_iter()
            .enumerate()
            {
                let p = 10 * n as u64;
                for e in 1..=3u64 {
                    records.extend(op(
                        p + e,
                        w,
                        F::Insert,
                        key,
                        json!(e),
                        (e * ms, Some((e + 1) * ms)),
                        Stage::Ok,
                        json!(1),
                    ));
                }
                let mut read = op(
                    p + 9,
                    w,
                    F::Read,
                    key,
                    Json::Null,
                    (100 * ms, Some(101 * ms)),
                    Stage::Ok,
                    last,
                );
                for r in &mut read {
                    if let Record::Op(e) = r {
                        e.final_read = true;
                    }
                }
                records.extend(read);
            }
            check(&sorted(records), Limits::default()).unwrap()
        };
        let r = history(json!([1, 2, 3]), json!([3, 2, 1]));
        assert_eq!(r.validity, Validity::Valid, "{:?}", r.problems);
        assert_eq!(r.details["sadd"]["acknowledged"], 3);
        assert_eq!(r.details["hset"]["acknowledged"], 3);

        let r = history(json!([1, 3]), json!([1, 2, 3]));
        assert_eq!(r.validity, Validity::Invalid);
        assert_eq!(r.problems, vec!["sadd sadd:0: lost [2]".to_string()]);
        let r = history(json!([1, 2, 3]), json!([1, 2, 3, 3]));
        assert_eq!(r.validity, Validity::Invalid);
        assert_eq!(r.problems, vec!["hset hset:0: duplicated [3]".to_string()]);
    }
}
