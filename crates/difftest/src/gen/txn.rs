//! Transactions: MULTI/EXEC/DISCARD/WATCH/UNWATCH.
//!
//! A MULTI row starts a *block* ([`super::Generator`] builds it, since it draws the queued
//! commands from every other family): sometimes a WATCH first (then maybe a change to a
//! watched key, or to another key, by this client, or an UNWATCH), then MULTI, up to six
//! queued commands, then EXEC (or DISCARD, or EXEC with an argument). Queued commands are
//! drawn from the rows whose replies compare exactly (no walks, no random or clock-dependent
//! replies, nothing the harness must resync after): EXEC's array is compared byte for byte.
//! Now and then the block queues an unknown command (the transaction is then dirty: EXECABORT),
//! a nested MULTI or a WATCH (errors that do not make it dirty). The other rows are the
//! commands alone: EXEC and DISCARD without MULTI, UNWATCH, and a WATCH left for a later block.
//! Every key shares the hash tag `{d}`, so a transaction never spans shards.

use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "txn",
    home: (0, 16),
    weight: 8,
    commands: &[
        CommandGen {
            name: "multi",
            weight: 12,
            make: multi,
        },
        CommandGen {
            name: "exec",
            weight: 1,
            make: alone,
        },
        CommandGen {
            name: "discard",
            weight: 1,
            make: alone,
        },
        CommandGen {
            name: "unwatch",
            weight: 1,
            make: alone,
        },
        CommandGen {
            name: "watch",
            weight: 1,
            make: watch,
        },
    ],
};

/// The MULTI of a block (the generator adds the rest).
fn multi(g: &mut Gen, name: &str) -> Step {
    step!(g.name(name))
}

/// EXEC, DISCARD or UNWATCH on their own (with an argument now and then: an arity error).
fn alone(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name))
}

/// `WATCH key [key]` (or an arity error).
fn watch(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    let mut s = step!(g.name(name), g.key());
    if g.chance(30) {
        s.args.push(g.key());
    }
    s
}

/// What a block does before MULTI: the steps, and the keys it watches.
pub(super) fn prelude(g: &mut Gen) -> Vec<Step> {
    let mut out = Vec::new();
    if !g.chance(40) {
        return out;
    }
    let key = g.key();
    out.push(step!(g.name("watch"), key.clone()));
    match g.rng.below(10) {
        // This client changes the watched key: EXEC answers nil.
        0..=2 => out.push(change(g, key)),
        // ... or another key: EXEC runs.
        3 => {
            let other = g.key();
            out.push(change(g, other));
        }
        4 => out.push(step!(g.name("unwatch"))),
        _ => {}
    }
    out
}

/// A change to `key` whatever it holds (or a no-op when it holds another type: WRONGTYPE).
fn change(g: &mut Gen, key: Vec<u8>) -> Step {
    match g.rng.below(5) {
        0 => step!("SET", key, g.value()),
        1 => step!("DEL", key),
        2 => step!("APPEND", key, "x"),
        3 => step!("SADD", key, g.set_member()),
        _ => step!("PEXPIRE", key, "100000"),
    }
}

/// A command queued between MULTI and EXEC that is not drawn from a family: an unknown
/// command (dirty), a nested MULTI, a WATCH (errors that leave the transaction clean).
pub(super) fn odd_one(g: &mut Gen) -> Step {
    match g.rng.below(3) {
        0 => step!("NOSUCHCOMMAND", g.key()),
        1 => step!(g.name("multi")),
        _ => step!(g.name("watch"), g.key()),
    }
}

/// How a block ends.
pub(super) fn end(g: &mut Gen) -> Step {
    match g.rng.below(20) {
        0 | 1 => step!(g.name("discard")),
        2 => step!(g.name("exec"), "now"),
        _ => step!(g.name("exec")),
    }
}
