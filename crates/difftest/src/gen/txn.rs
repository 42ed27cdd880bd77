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
//! Every key shares the hash tag `{d}`, so a transaction never spans shards, except in mode
//! `cp-shards` ([`crate::Mode::CpShards`]): there the generator gives each queued command one
//! of [`TAGS`] (one per shard of a 4-shard keyspace) for all its keys, and the WATCHes before
//! MULTI watch keys under several tags, so a transaction's commands and guards span shards
//! while no single command is `CROSSSLOT`. Both servers get the same rewritten commands.

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

/// The hash tags of mode `cp-shards`, one per shard of a 4-shard keyspace, in shard order:
/// `CLUSTER KEYSLOT` (CRC16 of the tag mod 16384) puts them in the quarters 0, 1, 2 and 3 of
/// the slots (478, 4607, 11298, 12733; proved by a test below, and checked on capdb when a
/// run starts). `{d}`, the tag of every other mode, is one of them.
pub const TAGS: [&str; 4] = ["{d3}", "{d2}", "{d}", "{d0}"];

/// One of [`TAGS`].
pub(super) fn tag(g: &mut Gen) -> &'static str {
    TAGS[g.rng.below(TAGS.len() as u64) as usize]
}

/// `arg` with every `{d}` (the generator's only tag) replaced by `tag`.
pub(super) fn retag_arg(arg: &[u8], tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + 2);
    let mut i = 0;
    while i < arg.len() {
        if arg[i..].starts_with(b"{d}") {
            out.extend_from_slice(tag.as_bytes());
            i += 3;
        } else {
            out.push(arg[i]);
            i += 1;
        }
    }
    out
}

/// `s` with all its keys (and patterns) under `tag`: one tag for the whole command, so it is
/// never `CROSSSLOT` alone.
pub(super) fn retag(s: &mut Step, tag: &str) {
    for a in s.args.iter_mut().skip(1) {
        *a = retag_arg(a, tag);
    }
}

/// Whether a command's keys, as Redis's key specs find them, all carry a tag: false for the
/// invalid forms whose `numkeys` counts options past the keys (`ZUNIONSTORE d 9 k1 k2
/// AGGREGATE ...`), whose "keys" `AGGREGATE`, `3`, ... hash elsewhere. On one shard that
/// changes nothing; over 4 shards capdb answers `-CROSSSLOT` (the one-shard rule, as Redis
/// Cluster does) where a standalone Redis answers the command, so mode `cp-shards` leaves
/// them out.
pub(super) fn keys_tagged(s: &Step) -> bool {
    let at = match &s.name()[..] {
        "lmpop" | "zmpop" | "sintercard" | "zintercard" | "zunion" | "zinter" | "zdiff" => 1,
        "blmpop" | "bzmpop" | "zunionstore" | "zinterstore" | "zdiffstore" => 2,
        _ => return true,
    };
    let n = s
        .args
        .get(at)
        .and_then(|a| std::str::from_utf8(a).ok()?.parse::<i64>().ok())
        .unwrap_or(0);
    s.args
        .iter()
        .skip(at + 1)
        .take(n.max(0) as usize)
        .all(|a| a.starts_with(b"{d"))
}

/// A pool key under a tag: `{d}` alone, or with `spread` one of [`TAGS`].
fn key_under(g: &mut Gen, spread: bool) -> Vec<u8> {
    let k = g.key();
    if spread {
        let t = tag(g);
        retag_arg(&k, t)
    } else {
        k
    }
}

/// What a block does before MULTI: the steps, and the keys it watches. With `spread`, each
/// watched key has its own tag (WATCH over several shards is allowed on `cp`, as in Redis),
/// and sometimes a second WATCH adds keys.
pub(super) fn prelude(g: &mut Gen, spread: bool) -> Vec<Step> {
    let mut out = Vec::new();
    if !g.chance(if spread { 60 } else { 40 }) {
        return out;
    }
    let key = key_under(g, spread);
    let mut watched = vec![key.clone()];
    let mut s = step!(g.name("watch"), key);
    if spread && g.chance(40) {
        let k = key_under(g, spread);
        s.args.push(k.clone());
        watched.push(k);
    }
    out.push(s);
    if spread && g.chance(25) {
        let k = key_under(g, spread);
        out.push(step!(g.name("watch"), k.clone()));
        watched.push(k);
    }
    match g.rng.below(10) {
        // This client changes a watched key: EXEC answers nil.
        0..=2 => {
            let key = if watched.len() > 1 {
                g.rng.pick(&watched).clone()
            } else {
                watched.swap_remove(0)
            };
            out.push(change(g, key));
        }
        // ... or another key: EXEC runs.
        3 => {
            let other = key_under(g, spread);
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
        // A member no set holds: a real add in every mode. (Re-adding a member already there
        // is no change in Redis but is one in `ap`, where the add-wins set records it: README.)
        3 => step!(
            "SADD",
            key,
            format!("watch-change-{}", g.rng.below(1 << 30))
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC16-XMODEM, Redis Cluster's key hash (as `capdb_cluster::slots::crc16`).
    fn crc16(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &b in data {
            crc ^= (b as u16) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    #[test]
    fn the_tags_land_on_the_four_shards_in_order() {
        // Redis Cluster's check value, and `CLUSTER KEYSLOT foo`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % 16384, 12182);
        for (shard, t) in TAGS.iter().enumerate() {
            let inner = t.trim_start_matches('{').trim_end_matches('}');
            let slot = crc16(inner.as_bytes()) % 16384;
            assert_eq!(slot / 4096, shard as u16, "{t}: slot {slot}");
        }
    }

    #[test]
    fn retagging_replaces_only_the_tag() {
        assert_eq!(retag_arg(b"{d}:3", "{d0}"), b"{d0}:3");
        assert_eq!(retag_arg(b"{d}:[0-3]", "{d2}"), b"{d2}:[0-3]");
        assert_eq!(retag_arg(b"{d}", "{d}"), b"{d}");
        assert_eq!(retag_arg(b"a{d", "{d3}"), b"a{d");
        let mut s = step!("MSET", "{d}:1", "{d}", "{d}:2", "x");
        retag(&mut s, "{d3}");
        assert_eq!(s, step!("MSET", "{d3}:1", "{d3}", "{d3}:2", "x"));
    }

    #[test]
    fn numkeys_past_the_keys_is_not_one_slot() {
        let bad = step!(
            "ZUNIONSTORE",
            "{d0}:z",
            "9",
            "{d0}:1",
            "{d0}:2",
            "AGGREGATE",
            "SUM"
        );
        assert!(!keys_tagged(&bad));
        assert!(keys_tagged(&step!(
            "ZUNIONSTORE",
            "{d}:z",
            "2",
            "{d}:1",
            "{d}:2",
            "AGGREGATE",
            "SUM"
        )));
        assert!(keys_tagged(&step!("ZUNIONSTORE", "{d}:z", "abc", "{d}:1")));
        assert!(!keys_tagged(&step!("BLMPOP", "0", "2", "{d}:1", "LEFT")));
        assert!(keys_tagged(&step!("LMPOP", "9", "{d}:1")));
        assert!(keys_tagged(&step!("SET", "{d}:1", "x")));
    }
}
