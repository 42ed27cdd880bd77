//! Linearizability of single-key registers (read / write / compare-and-set).
//!
//! The search is Wing & Gong's, with Lowe's memoization (as in Porcupine and Knossos' `wgl`):
//! walk the history's call and return entries in time order; at a call, try to linearize that
//! operation now (if the register model accepts it), remembering the choice on a stack; at a
//! return whose operation is not yet linearized, backtrack. A cache of (set of linearized
//! operations, register state) pairs prunes configurations already explored. Histories are
//! split per key first (linearizability is compositional), which keeps each search small.
//!
//! Indeterminate (`info`) operations return at "infinity": they may be linearized anywhere
//! after their call, including after everything else, which is the same as never happening.
//! Failed operations are dropped (they certainly did not happen), and so are indeterminate
//! reads (they observed nothing we know).
//!
//! Cost is exponential in the worst case, so every search runs under a [`Budget`] and answers
//! [`Outcome::Unknown`] when it runs out: never a guess.

use std::collections::HashSet;
use std::time::Instant;

use serde_json::Value as Json;

use crate::history::{F, Op, Stage};

/// Bounds on one search.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub deadline: Instant,
    /// Most memoized configurations kept (each is the bitset plus a state).
    pub max_cache_entries: usize,
}

/// A register operation as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOp {
    /// A read that returned this value (`None`: the key did not exist).
    Read(Option<i64>),
    Write(i64),
    /// Compare-and-set `expected -> new` with its known outcome, or `None` when indeterminate.
    Cas {
        expected: i64,
        new: i64,
        succeeded: Option<bool>,
    },
}

/// One operation of a single key's history, ready for the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub op: RegOp,
    pub call: u64,
    /// `u64::MAX` for an indeterminate operation.
    pub ret: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// Not linearizable; carries the indices of a small failing sub-history (a subset of the
    /// input that is still not linearizable and from which no further operation could be
    /// removed without also removing the write that produced an observed value).
    Violation(Vec<usize>),
    /// The budget ran out; the reason says which bound.
    Unknown(String),
}

type State = Option<i64>;

fn step(state: State, op: RegOp) -> Option<State> {
    match op {
        RegOp::Read(v) => (state == v).then_some(state),
        RegOp::Write(v) => Some(Some(v)),
        RegOp::Cas {
            expected,
            new,
            succeeded,
        } => {
            let matches = state == Some(expected);
            match succeeded {
                Some(true) => matches.then_some(Some(new)),
                Some(false) => (!matches).then_some(state),
                None => Some(if matches { Some(new) } else { state }),
            }
        }
    }
}

/// Converts a paired client operation into a register entry, or `None` when it carries no
/// information (failed, or an indeterminate read). Errors describe malformed values.
pub fn entry(op: &Op) -> Result<Option<Entry>, String> {
    if op.outcome == Stage::Fail {
        return Ok(None);
    }
    let info = op.outcome == Stage::Info;
    let int = |v: &Json, what: &str| {
        v.as_i64()
            .ok_or_else(|| format!("key {}: {what} {v} is not an integer", op.key))
    };
    let reg = match op.f {
        F::Read if info => return Ok(None),
        F::Read => RegOp::Read(match &op.result {
            Json::Null => None,
            v => Some(int(v, "read result")?),
        }),
        F::Write => RegOp::Write(int(&op.value, "written value")?),
        F::Cas => {
            let pair = op
                .value
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| format!("key {}: cas value must be [expected, new]", op.key))?;
            RegOp::Cas {
                expected: int(&pair[0], "cas expected")?,
                new: int(&pair[1], "cas new")?,
                succeeded: if info {
                    None
                } else {
                    Some(op.result.as_bool().ok_or_else(|| {
                        format!("key {}: cas result {} is not a boolean", op.key, op.result)
                    })?)
                },
            }
        }
        other => {
            return Err(format!(
                "key {}: {other:?} is not a register operation",
                op.key
            ));
        }
    };
    Ok(Some(Entry {
        op: reg,
        call: op.invoke_ns,
        ret: if info {
            u64::MAX
        } else {
            op.complete_ns.unwrap_or(u64::MAX)
        },
    }))
}

/// Checks one key's history, and shrinks a violation to a small failing sub-history.
pub fn check(history: &[Entry], budget: Budget) -> Outcome {
    match search(history, budget) {
        Search::Linearizable => Outcome::Linearizable,
        Search::Unknown(why) => Outcome::Unknown(why),
        Search::Violation => Outcome::Violation(shrink(history, budget)),
    }
}

enum Search {
    Linearizable,
    Violation,
    Unknown(String),
}

/// Doubly linked list node over call/return events; index 0 is the head sentinel.
#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
    /// For a call: the index of its return node.
    partner: usize,
}

const NIL: usize = usize::MAX;

/// The history's call and return events in time order, as a doubly linked list of [`Node`]s
/// (index 0 is the head sentinel) with each call pointing at its return.
fn event_list(history: &[Entry]) -> Vec<Node> {
    let n = history.len();
    // Events in time order; at equal times calls come first, so touching operations count as
    // concurrent (the permissive reading, which never invents a violation).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in history.iter().enumerate() {
        assert!(e.call <= e.ret, "an operation returns before it is called");
        events.push((e.call, true, i));
        events.push((e.ret, false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    let mut nodes = vec![
        Node {
            op: NIL,
            is_call: false,
            prev: NIL,
            next: NIL,
            partner: NIL,
        };
        2 * n + 1
    ];
    let mut ret_node = vec![NIL; n];
    let mut call_node = vec![NIL; n];
    for (k, &(_, is_call, op)) in events.iter().enumerate() {
        let idx = k + 1;
        nodes[idx] = Node {
            op,
            is_call,
            prev: idx - 1,
            next: if k + 1 < events.len() { idx + 1 } else { NIL },
            partner: NIL,
        };
        if is_call {
            call_node[op] = idx;
        } else {
            ret_node[op] = idx;
        }
    }
    nodes[0].next = 1;
    for op in 0..n {
        nodes[call_node[op]].partner = ret_node[op];
    }
    nodes
}

/// Searches for a linearization of `history` within `budget` (see the module doc).
fn search(history: &[Entry], budget: Budget) -> Search {
    let n = history.len();
    if n == 0 {
        return Search::Linearizable;
    }
    let mut nodes = event_list(history);

    let unlink = |nodes: &mut Vec<Node>, i: usize| {
        let Node { prev, next, .. } = nodes[i];
        nodes[prev].next = next;
        if next != NIL {
            nodes[next].prev = prev;
        }
    };
    let relink = |nodes: &mut Vec<Node>, i: usize| {
        let Node { prev, next, .. } = nodes[i];
        nodes[prev].next = i;
        if next != NIL {
            nodes[next].prev = i;
        }
    };

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state: State = None;
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut cur = nodes[0].next;
    let mut steps: u64 = 0;
    loop {
        if nodes[0].next == NIL {
            return Search::Linearizable;
        }
        steps += 1;
        if steps.is_multiple_of(4096) && Instant::now() > budget.deadline {
            return Search::Unknown(format!(
                "time budget spent after {steps} search steps ({} operations)",
                n
            ));
        }
        let node = nodes[cur];
        if node.is_call {
            if let Some(next_state) = step(state, history[node.op].op) {
                linearized[node.op / 64] |= 1 << (node.op % 64);
                if cache.insert((linearized.clone(), next_state)) {
                    if cache.len() > budget.max_cache_entries {
                        return Search::Unknown(format!(
                            "memory budget spent: {} configurations cached ({} operations)",
                            cache.len(),
                            n
                        ));
                    }
                    stack.push((cur, state));
                    state = next_state;
                    unlink(&mut nodes, node.partner);
                    unlink(&mut nodes, cur);
                    cur = nodes[0].next;
                    continue;
                }
                linearized[node.op / 64] &= !(1 << (node.op % 64));
            }
            cur = node.next;
        } else {
            // A return whose operation could not be linearized before it: backtrack.
            let Some((call, prev_state)) = stack.pop() else {
                return Search::Violation;
            };
            let op = nodes[call].op;
            state = prev_state;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(&mut nodes, call);
            let partner = nodes[call].partner;
            relink(&mut nodes, partner);
            cur = nodes[call].next;
        }
    }
}

/// Greedily removes operations while the rest stays non-linearizable. A write (or successful
/// or indeterminate CAS) is kept while a remaining operation observes its value, so the
/// shrunk history never "reads a value nobody wrote" merely because the writer was removed.
fn shrink(history: &[Entry], budget: Budget) -> Vec<usize> {
    let mut keep: Vec<usize> = (0..history.len()).collect();
    let observed = |keep: &[usize], skip: usize| -> HashSet<i64> {
        let mut seen = HashSet::new();
        for &i in keep {
            if i == skip {
                continue;
            }
            match history[i].op {
                RegOp::Read(Some(v)) => {
                    seen.insert(v);
                }
                RegOp::Cas { expected, .. } => {
                    seen.insert(expected);
                }
                _ => {}
            }
        }
        seen
    };
    let mut changed = true;
    while changed && Instant::now() < budget.deadline {
        changed = false;
        let mut pos = 0;
        while pos < keep.len() {
            let candidate = keep[pos];
            let produces = match history[candidate].op {
                RegOp::Write(v) => Some(v),
                RegOp::Cas {
                    new,
                    succeeded: Some(true) | None,
                    ..
                } => Some(new),
                _ => None,
            };
            if let Some(v) = produces
                && observed(&keep, candidate).contains(&v)
            {
                pos += 1;
                continue;
            }
            let trial: Vec<Entry> = keep
                .iter()
                .filter(|&&i| i != candidate)
                .map(|&i| history[i])
                .collect();
            if matches!(search(&trial, budget), Search::Violation) {
                keep.remove(pos);
                changed = true;
            } else {
                pos += 1;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget() -> Budget {
        Budget {
            deadline: Instant::now() + Duration::from_secs(10),
            max_cache_entries: 1_000_000,
        }
    }

    fn e(op: RegOp, call: u64, ret: u64) -> Entry {
        Entry { op, call, ret }
    }
    use RegOp::*;
    fn cas(expected: i64, new: i64, ok: Option<bool>) -> RegOp {
        Cas {
            expected,
            new,
            succeeded: ok,
        }
    }

    #[test]
    fn sequential_and_overlapping_histories_are_linearizable() {
        let h = [
            e(Write(1), 0, 10),
            e(Read(Some(1)), 11, 20),
            e(cas(1, 2, Some(true)), 21, 30),
            e(Read(Some(2)), 31, 40),
        ];
        assert_eq!(check(&h, budget()), Outcome::Linearizable);
        // A read overlapping a write may see either value.
        let h = [
            e(Write(1), 0, 10),
            e(Write(2), 20, 40),
            e(Read(Some(1)), 25, 30),
            e(Read(Some(2)), 26, 50),
        ];
        assert_eq!(check(&h, budget()), Outcome::Linearizable);
        // Reads before any write see nothing.
        assert_eq!(
            check(&[e(Read(None), 0, 1)], budget()),
            Outcome::Linearizable
        );
    }

    #[test]
    fn a_stale_read_is_caught() {
        let h = [
            e(Write(1), 0, 10),
            e(Write(2), 20, 30),
            e(Read(Some(1)), 40, 50),
        ];
        assert_eq!(check(&h, budget()), Outcome::Violation(vec![0, 1, 2]));
    }

    #[test]
    fn a_lost_write_is_caught() {
        // The write of 2 was acknowledged, yet a later read sees the older value... then none.
        let h = [
            e(Write(1), 0, 10),
            e(Write(2), 20, 30),
            e(Read(None), 40, 50),
        ];
        assert!(matches!(check(&h, budget()), Outcome::Violation(_)));
    }

    #[test]
    fn a_double_successful_cas_is_caught() {
        let h = [
            e(Write(0), 0, 5),
            e(cas(0, 1, Some(true)), 10, 30),
            e(cas(0, 2, Some(true)), 10, 30),
        ];
        let Outcome::Violation(sub) = check(&h, budget()) else {
            panic!("double CAS not caught")
        };
        assert_eq!(sub, vec![0, 1, 2]);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught() {
        let h = [e(Write(1), 0, 10), e(Read(Some(7)), 20, 30)];
        assert_eq!(check(&h, budget()), Outcome::Violation(vec![1]));
    }

    #[test]
    fn indeterminate_operations_may_or_may_not_happen() {
        // An info write may take effect late...
        let h = [
            e(Write(1), 0, 10),
            e(Write(2), 5, u64::MAX),
            e(Read(Some(1)), 20, 30),
            e(Read(Some(2)), 40, 50),
        ];
        assert_eq!(check(&h, budget()), Outcome::Linearizable);
        // ...or never.
        let h = [
            e(Write(1), 0, 10),
            e(Write(2), 5, u64::MAX),
            e(Read(Some(1)), 40, 50),
        ];
        assert_eq!(check(&h, budget()), Outcome::Linearizable);
        // But it cannot take effect before it was called.
        let h = [e(Read(Some(2)), 0, 10), e(Write(2), 20, u64::MAX)];
        assert!(matches!(check(&h, budget()), Outcome::Violation(_)));
        // An indeterminate CAS behaves like a CAS, whichever way it went.
        let h = [
            e(Write(0), 0, 1),
            e(cas(0, 5, None), 2, u64::MAX),
            e(Read(Some(5)), 10, 11),
            e(Read(Some(0)), 12, 13),
        ];
        assert!(matches!(check(&h, budget()), Outcome::Violation(_)));
    }

    #[test]
    fn a_cas_applied_twice_answers_false_and_is_caught() {
        // Issue 10's history: a CAS sent to a follower was applied by the dying leader, sent
        // again to the next leader, failed its comparison there and answered nil (false); the
        // next read sees its value, which nothing else wrote.
        let h = [
            e(Write(34190), 0, 5),
            e(Read(Some(34190)), 10, 20),
            e(cas(34190, 34257, Some(false)), 20, 700),
            e(cas(34008, 34278, None), 35, u64::MAX),
            e(Read(Some(34257)), 698, 699),
        ];
        let Outcome::Violation(sub) = check(&h, budget()) else {
            panic!("doubled CAS not caught")
        };
        // Shrunk to the read: with the CAS answering false, nothing wrote what it saw.
        assert_eq!(sub, vec![4]);
        // The truthful answer (applied once, true) is linearizable, and so is "unknown".
        let mut honest = h;
        honest[2] = e(cas(34190, 34257, Some(true)), 20, 700);
        assert_eq!(check(&honest, budget()), Outcome::Linearizable);
        honest[2] = e(cas(34190, 34257, None), 20, u64::MAX);
        assert_eq!(check(&honest, budget()), Outcome::Linearizable);
    }

    #[test]
    fn a_failed_cas_observes_a_different_value() {
        let h = [e(Write(3), 0, 1), e(cas(3, 4, Some(false)), 2, 3)];
        assert!(matches!(check(&h, budget()), Outcome::Violation(_)));
        let h = [e(Write(3), 0, 1), e(cas(2, 4, Some(false)), 2, 3)];
        assert_eq!(check(&h, budget()), Outcome::Linearizable);
    }

    #[test]
    fn an_exhausted_budget_answers_unknown_never_a_verdict() {
        let h: Vec<Entry> = (0..40)
            .map(|i| e(Write(i), 0, 100))
            .chain([e(Read(Some(-1)), 200, 300)])
            .collect();
        let b = Budget {
            deadline: Instant::now(),
            max_cache_entries: 100,
        };
        assert!(matches!(check(&h, b), Outcome::Unknown(_)));
    }

    /// Brute force over all orders consistent with real time: the oracle for small histories.
    fn brute_force(h: &[Entry]) -> bool {
        fn go(h: &[Entry], done: &mut Vec<bool>, state: State, left: usize) -> bool {
            if left == 0 {
                return true;
            }
            for i in 0..h.len() {
                if done[i] {
                    continue;
                }
                // i may go next only if no pending op returned before i was called.
                let blocked = (0..h.len()).any(|j| !done[j] && j != i && h[j].ret < h[i].call);
                if blocked {
                    continue;
                }
                if let Some(s) = step(state, h[i].op) {
                    done[i] = true;
                    if go(h, done, s, left - 1) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            false
        }
        go(h, &mut vec![false; h.len()], None, h.len())
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut good, mut bad) = (0, 0);
        for _ in 0..3000 {
            let n = rng.usize(1..=7);
            let h: Vec<Entry> = (0..n)
                .map(|_| {
                    let call = rng.u64(0..40);
                    let ret = if rng.u8(0..10) == 0 {
                        u64::MAX
                    } else {
                        call + rng.u64(0..15)
                    };
                    let v = rng.i64(0..3);
                    let op = match rng.u8(0..4) {
                        0 | 1 if ret != u64::MAX => Read(if rng.bool() { Some(v) } else { None }),
                        0..=2 => Write(v),
                        _ => cas(
                            v,
                            rng.i64(0..3),
                            if ret == u64::MAX {
                                None
                            } else {
                                Some(rng.bool())
                            },
                        ),
                    };
                    e(op, call, ret)
                })
                .collect();
            let expected = brute_force(&h);
            let got = check(&h, budget());
            match (&got, expected) {
                (Outcome::Linearizable, true) => good += 1,
                (Outcome::Violation(sub), false) => {
                    bad += 1;
                    let sub: Vec<Entry> = sub.iter().map(|&i| h[i]).collect();
                    assert!(!brute_force(&sub), "shrunk history must still fail: {h:?}");
                }
                _ => panic!("checker said {got:?}, brute force said {expected} for {h:?}"),
            }
        }
        assert!(
            good > 300 && bad > 300,
            "both kinds exercised: {good} good, {bad} bad"
        );
    }
}
