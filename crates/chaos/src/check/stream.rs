//! The `stream` workload's checker (issue 14, design §7): the writes' history against what
//! the change-stream readers saw (`crate::stream`).
//!
//! 1. **The stream holds every acknowledged write once**: in the final read of the merged
//!    stream, each acknowledged write's value appears exactly once per key it wrote, an
//!    indeterminate one either so or not at all, a failed one never, and nothing else
//!    appears (no invented events); IDs strictly increase. A transaction's events (a write
//!    of two keys in one MULTI/EXEC) are adjacent, and when they carry a `txn` id it is one.
//! 2. **No loss, no duplicate, no premature watermark for a position-holding reader**: the
//!    plain reader's processed sequence (crashes rolled back to checkpoints) is exactly the
//!    final stream, event for event, up to a resolved end point taken after the writes. An event logged below a point the reader had already passed would be in
//!    the final read and not in the reader's.
//! 3. **Exactly once per consumer group** (up to the same end point): no entry is handed
//!    out by `>` twice, no entry's XACK answers 1 twice, every entry of the stream was
//!    delivered to the group (by `>` or a claim) and acknowledged, nothing else was, and
//!    after the drain nothing is pending.
//! 4. **Per-key order**: a write acknowledged before another on the same key was invoked
//!    has the smaller ID.
//! 5. **Resolved IDs**: never go back (between announcements that do not overlap in time),
//!    and every write invoked after an announcement completed lies above it.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value as Json, json};

use crate::history::{F, Op, Stage, Workload};
use crate::stream::{Seen, StreamLog};

type Id = (u64, u64);

/// One write of the workload (a transaction's key names its keys, comma-separated).
struct Write<'a> {
    op: &'a Op,
    value: i64,
    keys: Vec<&'a str>,
}

fn show(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

/// Checks the readers' log against the history; answers the problems found and details.
pub fn check(ops: &[Op], log: &StreamLog) -> (Vec<String>, Json) {
    let mut problems = Vec::new();
    let mut say = |p: String| {
        if problems.len() < 50 {
            problems.push(p);
        }
    };
    let writes: Vec<Write<'_>> = ops
        .iter()
        .filter(|o| o.workload == Workload::Stream && o.f == F::Write)
        .filter_map(|op| {
            op.value.as_i64().map(|value| Write {
                op,
                value,
                keys: op.key.split(',').collect(),
            })
        })
        .collect();
    if !log.drained {
        say("the stream readers could not read to the end within 60 s of the heal".into());
    }
    let full: Vec<&Seen> = log
        .full
        .iter()
        .filter(|s| s.key.starts_with("stream:"))
        .collect();

    // 1. The stream holds every acknowledged write once.
    if let Some(w) = log.full.windows(2).find(|w| w[0].id >= w[1].id) {
        say(format!(
            "the merged stream's IDs go back: {} then {}",
            show(w[0].id),
            show(w[1].id)
        ));
    }
    let mut by_value: HashMap<i64, Vec<&Seen>> = HashMap::new();
    for s in &full {
        if let Some(v) = s.value {
            by_value.entry(v).or_default().push(s);
        }
    }
    let (mut ok, mut lost, mut doubled, mut txns) = (0, 0, 0, 0);
    let position: HashMap<Id, usize> = log
        .full
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id, i))
        .collect();
    for w in &writes {
        let events = by_value
            .get(&w.value)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let n = events.len();
        // Each of its keys exactly once (or, for a write whose outcome is unknown, nothing).
        let whole = n == w.keys.len()
            && w.keys
                .iter()
                .all(|k| events.iter().filter(|e| e.key == *k).count() == 1);
        match w.op.outcome {
            Stage::Ok if n == 0 => {
                lost += 1;
                say(format!(
                    "acknowledged write {}={} is not in the merged stream",
                    w.op.key, w.value
                ));
            }
            Stage::Ok | Stage::Info | Stage::Invoke if n > 0 && !whole => {
                doubled += 1;
                say(format!(
                    "write {}={} appears as {n} events on keys {:?} in the merged stream",
                    w.op.key,
                    w.value,
                    events.iter().map(|e| &e.key).collect::<Vec<_>>()
                ));
            }
            Stage::Fail if n > 0 => say(format!(
                "failed write {}={} appears in the merged stream",
                w.op.key, w.value
            )),
            _ => {}
        }
        if w.op.outcome == Stage::Ok {
            ok += 1;
        }
        // A transaction's events side by side, under one id.
        if w.keys.len() > 1 && whole {
            txns += 1;
            let mut at: Vec<usize> = events
                .iter()
                .filter_map(|e| position.get(&e.id).copied())
                .collect();
            at.sort_unstable();
            if at.windows(2).any(|p| p[1] != p[0] + 1) {
                say(format!(
                    "transaction {}={} is split in the merged stream (positions {at:?})",
                    w.op.key, w.value
                ));
            }
            if events.iter().any(|e| e.txn != events[0].txn) {
                say(format!(
                    "transaction {}={}'s events carry different txn ids",
                    w.op.key, w.value
                ));
            }
        }
    }
    let written: HashMap<i64, &Write<'_>> = writes.iter().map(|w| (w.value, w)).collect();
    for s in &full {
        let matches = s
            .value
            .and_then(|v| written.get(&v))
            .is_some_and(|w| w.keys.contains(&s.key.as_str()));
        if !matches {
            say(format!(
                "the merged stream holds {} {}={:?} that no client wrote",
                show(s.id),
                s.key,
                s.value
            ));
        }
    }

    // 2. The plain reader saw exactly the stream, event for event, up to the end point
    // (everything past it may still have been arriving).
    let upto_end = |s: &&Seen| s.id <= log.end;
    let plain: Vec<&Seen> = log.plain.iter().filter(upto_end).collect();
    let until_end: Vec<&Seen> = log.full.iter().filter(upto_end).collect();
    if plain != until_end {
        let at = plain
            .iter()
            .zip(&until_end)
            .position(|(a, b)| a != b)
            .unwrap_or(plain.len().min(until_end.len()));
        say(format!(
            "the plain reader's sequence ({} events) differs from the final read ({} events up to {}) at position {at}: {:?} vs {:?}",
            plain.len(),
            until_end.len(),
            show(log.end),
            plain.get(at),
            until_end.get(at),
        ));
    }

    // 3. Exactly once per group (up to the end point), each delivery the stream's event.
    let in_stream: HashMap<Id, &Seen> = log.full.iter().map(|s| (s.id, s)).collect();
    let mut group_details = Vec::new();
    for (g, deliveries) in log.deliveries.iter().enumerate() {
        let mut fresh: HashMap<Id, u32> = HashMap::new();
        let mut delivered: std::collections::HashSet<Id> = Default::default();
        for (s, _, by_claim) in deliveries {
            if s.id > log.end {
                continue;
            }
            if in_stream.get(&s.id).is_some_and(|f| *f != s) {
                say(format!(
                    "group g{g} got {:?} where the stream holds {:?}",
                    s,
                    in_stream.get(&s.id)
                ));
            }
            delivered.insert(s.id);
            if !by_claim {
                *fresh.entry(s.id).or_default() += 1;
            }
        }
        for (id, n) in &fresh {
            if *n > 1 {
                say(format!(
                    "group g{g}: {} was handed out by `>` {n} times",
                    show(*id)
                ));
            }
        }
        let mut acked: HashMap<Id, (u32, u32)> = HashMap::new();
        for (id, answer) in log.acks.get(g).into_iter().flatten() {
            let e = acked.entry(*id).or_default();
            match answer {
                Some(1) => e.0 += 1,
                Some(_) => {}
                None => e.1 += 1,
            }
        }
        for (id, (ones, _)) in &acked {
            if *ones > 1 {
                say(format!(
                    "group g{g}: XACK of {} answered 1 {ones} times",
                    show(*id)
                ));
            }
        }
        let mut never = 0;
        for s in full.iter().filter(|s| s.id <= log.end) {
            if !delivered.contains(&s.id) {
                never += 1;
                say(format!(
                    "group g{g} never got {} ({}={:?})",
                    show(s.id),
                    s.key,
                    s.value
                ));
            } else if acked
                .get(&s.id)
                .is_none_or(|(ones, errs)| *ones == 0 && *errs == 0)
            {
                say(format!(
                    "group g{g}: {} was never acknowledged, yet is not pending",
                    show(s.id)
                ));
            }
        }
        for id in &delivered {
            if !in_stream.contains_key(id) {
                say(format!(
                    "group g{g} got {}, which is not in the stream",
                    show(*id)
                ));
            }
        }
        match log.pending_after.get(g).copied().flatten() {
            Some(0) => {}
            other => say(format!(
                "group g{g}: after the drain XPENDING counts {other:?} entries, not 0"
            )),
        }
        group_details.push(json!({
            "deliveries": deliveries.len(),
            "redelivered_by_claim": deliveries.iter().filter(|d| d.2).count(),
            "never_delivered": never,
        }));
    }

    // 4. Per-key order for writes ordered in real time (a transaction counts on each key).
    let id_on = |w: &Write<'_>, key: &str| {
        by_value
            .get(&w.value)
            .and_then(|v| v.iter().find(|s| s.key == key))
            .map(|s| s.id)
    };
    let id_of = |w: &Write<'_>| {
        by_value
            .get(&w.value)
            .and_then(|v| v.iter().map(|s| s.id).min())
    };
    let mut per_key: BTreeMap<&str, Vec<&Write<'_>>> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.op.outcome == Stage::Ok) {
        for k in &w.keys {
            per_key.entry(k).or_default().push(w);
        }
    }
    let mut order_violations = 0;
    for (key, ws) in &per_key {
        let id_of = |w: &Write<'_>| id_on(w, key);
        let mut by_complete: Vec<(u64, Id)> = ws
            .iter()
            .filter_map(|w| Some((w.op.complete_ns?, id_of(w)?)))
            .collect();
        by_complete.sort();
        // The largest ID among writes completed up to each point.
        let mut prefix_max: Vec<Id> = Vec::with_capacity(by_complete.len());
        for (_, id) in &by_complete {
            let m = prefix_max.last().map_or(*id, |p: &Id| (*p).max(*id));
            prefix_max.push(m);
        }
        for w in ws {
            let Some(id) = id_of(w) else { continue };
            let before = by_complete.partition_point(|(t, _)| *t < w.op.invoke_ns);
            if let Some(m) = before.checked_sub(1).map(|i| prefix_max[i])
                && m >= id
            {
                order_violations += 1;
                say(format!(
                    "{key}: write {} (ID {}) was invoked after a write with ID {} was acknowledged, yet comes before it",
                    w.value,
                    show(id),
                    show(m)
                ));
            }
        }
    }

    // 5. Resolved IDs.
    let mut announced: Vec<(u64, Id)> = log.resolved.iter().map(|(_, c, r)| (*c, *r)).collect();
    announced.sort();
    let mut max_so_far: Vec<Id> = Vec::with_capacity(announced.len());
    for (_, r) in &announced {
        let m = max_so_far.last().map_or(*r, |p: &Id| (*p).max(*r));
        max_so_far.push(m);
    }
    let highest_before = |t: u64| {
        announced
            .partition_point(|(c, _)| *c < t)
            .checked_sub(1)
            .map(|i| max_so_far[i])
    };
    let mut went_back = 0;
    for (invoked, _, r) in &log.resolved {
        if let Some(m) = highest_before(*invoked)
            && m > *r
        {
            went_back += 1;
            say(format!(
                "a resolved ID went back: {} announced after {} had been",
                show(*r),
                show(m)
            ));
        }
    }
    let mut below = 0;
    for w in &writes {
        let Some(id) = id_of(w) else { continue };
        if let Some(m) = highest_before(w.op.invoke_ns)
            && id <= m
        {
            below += 1;
            say(format!(
                "write {}={} was invoked after resolved ID {} was announced, yet has ID {}",
                w.op.key,
                w.value,
                show(m),
                show(id)
            ));
        }
    }

    let details = json!({
        "events": full.len(),
        "acknowledged_writes": ok,
        "lost": lost,
        "doubled": doubled,
        "plain_reader_events": log.plain.len(),
        "groups": group_details,
        "per_key_order_violations": order_violations,
        "resolved_announcements": log.resolved.len(),
        "resolved_went_back": went_back,
        "writes_below_resolved": below,
        "reader_errors": log.errors,
        "transactions": txns,
        "cross_shard_transaction_events": full.iter().filter(|s| s.txn.is_some()).count(),
    });
    (problems, details)
}
