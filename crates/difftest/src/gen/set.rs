//! Sets: SADD/SREM, SCARD, SISMEMBER/SMISMEMBER, SMEMBERS, SPOP, SRANDMEMBER, SMOVE,
//! SINTER/SUNION/SDIFF and their STORE forms, SINTERCARD, SSCAN walks.

use super::keys::scan_options;
use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "set",
    home: (12, 5),
    weight: 15,
    commands: &[
        CommandGen {
            name: "sadd",
            weight: 20,
            make: key_members,
        },
        CommandGen {
            name: "srem",
            weight: 8,
            make: key_members,
        },
        CommandGen {
            name: "smismember",
            weight: 3,
            make: key_members,
        },
        CommandGen {
            name: "scard",
            weight: 5,
            make: one_key,
        },
        CommandGen {
            name: "smembers",
            weight: 5,
            make: one_key,
        },
        CommandGen {
            name: "sismember",
            weight: 5,
            make: sismember,
        },
        CommandGen {
            name: "spop",
            weight: 4,
            make: counted,
        },
        CommandGen {
            name: "srandmember",
            weight: 3,
            make: counted,
        },
        CommandGen {
            name: "smove",
            weight: 4,
            make: smove,
        },
        CommandGen {
            name: "sinter",
            weight: 3,
            make: many_keys,
        },
        CommandGen {
            name: "sunion",
            weight: 3,
            make: many_keys,
        },
        CommandGen {
            name: "sdiff",
            weight: 3,
            make: many_keys,
        },
        CommandGen {
            name: "sinterstore",
            weight: 2,
            make: store,
        },
        CommandGen {
            name: "sunionstore",
            weight: 2,
            make: store,
        },
        CommandGen {
            name: "sdiffstore",
            weight: 2,
            make: store,
        },
        CommandGen {
            name: "sintercard",
            weight: 3,
            make: sintercard,
        },
        CommandGen {
            name: "sscan",
            weight: 3,
            make: sscan,
        },
    ],
};

/// SADD, SREM, SMISMEMBER: one to four members, or none.
fn key_members(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    if !g.invalid() {
        let n = g.rng.range(1, 4) as usize;
        s.args.extend(g.set_members(n));
    }
    s
}

fn one_key(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key(), g.key());
    }
    step!(g.name(name), g.key())
}

fn sismember(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name), g.key(), g.set_member())
}

/// SPOP and SRANDMEMBER: `key [count]` (random: compared by properties; SPOP's key is then
/// copied from capdb into Redis).
fn counted(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    let invalid = g.invalid();
    if g.chance(60) || invalid {
        s.args.push(if invalid && g.chance(60) {
            g.bad_int()
        } else {
            g.count()
        });
    }
    if invalid && g.chance(40) {
        s.args.push(b"1".to_vec());
    }
    s
}

fn smove(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key(), g.key());
    }
    step!(g.name(name), g.key(), g.key(), g.set_member())
}

/// SINTER, SUNION, SDIFF over one to three keys.
fn many_keys(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name));
    if !g.invalid() {
        let n = g.rng.range(1, 3) as usize;
        s.args.extend(g.keys(n));
    }
    s
}

/// The STORE forms: a destination and one to three keys.
fn store(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    if !g.invalid() {
        let n = g.rng.range(1, 3) as usize;
        s.args.extend(g.keys(n));
    }
    s
}

/// `SINTERCARD numkeys key [key ...] [LIMIT limit]`, with bad numkeys and limits.
fn sintercard(g: &mut Gen, name: &str) -> Step {
    let n = g.rng.range(1, 3) as usize;
    let invalid = g.invalid();
    let numkeys = if invalid {
        g.rng.pick(&["0", "-1", "5", "abc"]).as_bytes().to_vec()
    } else {
        n.to_string().into_bytes()
    };
    let mut s = step!(g.name(name), numkeys);
    s.args.extend(g.keys(n));
    if g.chance(40) {
        s.args.push(g.word("LIMIT"));
        let l = if invalid && g.chance(50) {
            g.rng.pick(&["-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.range(0, 4).to_string().into_bytes()
        };
        s.args.push(l);
    }
    if invalid && g.chance(30) {
        s.args.push(b"LIMIT".to_vec());
    }
    s
}

/// A whole SSCAN walk.
fn sscan(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    if invalid && g.chance(30) {
        let c = *g.rng.pick(&["abc", "18446744073709551616", " 1", "+"]);
        return step!(g.name(name), g.key(), c);
    }
    let mut s = step!(g.name(name), g.key(), g.cursor_zero());
    scan_options(g, &mut s, invalid);
    s.walk = true;
    s
}
