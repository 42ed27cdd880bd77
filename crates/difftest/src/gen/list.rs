//! Lists: LPUSH/RPUSH(X), LPOP/RPOP with count, LLEN, LRANGE, LINDEX, LSET, LINSERT, LREM,
//! LTRIM, LPOS with RANK/COUNT/MAXLEN, LMOVE, RPOPLPUSH, LMPOP, and the blocking BLPOP, BRPOP,
//! BLMOVE, BRPOPLPUSH and BLMPOP with a 10 ms timeout (they answer at once on a non-empty list,
//! nil after the timeout on an empty one; never timeout 0, which blocks forever). Lists are
//! ordered: every reply compares exactly.

use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "list",
    home: (8, 5),
    weight: 15,
    commands: &[
        CommandGen {
            name: "lpush",
            weight: 10,
            make: push,
        },
        CommandGen {
            name: "rpush",
            weight: 10,
            make: push,
        },
        CommandGen {
            name: "lpushx",
            weight: 2,
            make: push,
        },
        CommandGen {
            name: "rpushx",
            weight: 2,
            make: push,
        },
        CommandGen {
            name: "lpop",
            weight: 5,
            make: pop,
        },
        CommandGen {
            name: "rpop",
            weight: 5,
            make: pop,
        },
        CommandGen {
            name: "llen",
            weight: 4,
            make: llen,
        },
        CommandGen {
            name: "lrange",
            weight: 8,
            make: range,
        },
        CommandGen {
            name: "ltrim",
            weight: 2,
            make: range,
        },
        CommandGen {
            name: "lindex",
            weight: 4,
            make: lindex,
        },
        CommandGen {
            name: "lset",
            weight: 3,
            make: lset,
        },
        CommandGen {
            name: "linsert",
            weight: 3,
            make: linsert,
        },
        CommandGen {
            name: "lrem",
            weight: 3,
            make: lrem,
        },
        CommandGen {
            name: "lpos",
            weight: 4,
            make: lpos,
        },
        CommandGen {
            name: "lmove",
            weight: 3,
            make: lmove,
        },
        CommandGen {
            name: "rpoplpush",
            weight: 2,
            make: rpoplpush,
        },
        CommandGen {
            name: "lmpop",
            weight: 3,
            make: lmpop,
        },
        CommandGen {
            name: "blpop",
            weight: 1,
            make: bpop,
        },
        CommandGen {
            name: "brpop",
            weight: 1,
            make: bpop,
        },
        CommandGen {
            name: "blmove",
            weight: 1,
            make: lmove,
        },
        CommandGen {
            name: "brpoplpush",
            weight: 1,
            make: rpoplpush,
        },
        CommandGen {
            name: "blmpop",
            weight: 1,
            make: lmpop,
        },
    ],
};

fn push(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    if !g.invalid() {
        let n = g.rng.range(1, 4) as usize;
        s.args.extend(g.members(n));
    }
    s
}

/// LPOP/RPOP `key [count]`.
fn pop(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    let invalid = g.invalid();
    if g.chance(50) || invalid {
        s.args.push(if invalid && g.chance(50) {
            g.bad_int()
        } else {
            g.count()
        });
    }
    if invalid && g.chance(30) {
        s.args.push(b"1".to_vec());
    }
    s
}

fn llen(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    step!(g.name(name), g.key())
}

/// LRANGE and LTRIM: `key start stop`.
fn range(g: &mut Gen, name: &str) -> Step {
    let (a, b) = if g.invalid() {
        (g.bad_int(), g.index())
    } else {
        (g.index(), g.index())
    };
    step!(g.name(name), g.key(), a, b)
}

fn lindex(g: &mut Gen, name: &str) -> Step {
    let i = if g.invalid() { g.bad_int() } else { g.index() };
    step!(g.name(name), g.key(), i)
}

fn lset(g: &mut Gen, name: &str) -> Step {
    let i = if g.invalid() { g.bad_int() } else { g.index() };
    step!(g.name(name), g.key(), i, g.member())
}

fn linsert(g: &mut Gen, name: &str) -> Step {
    let wher = if g.invalid() {
        b"MIDDLE".to_vec()
    } else {
        let w = *g.rng.pick(&["BEFORE", "AFTER"]);
        g.word(w)
    };
    step!(g.name(name), g.key(), wher, g.member(), g.member())
}

fn lrem(g: &mut Gen, name: &str) -> Step {
    let n = if g.invalid() {
        g.bad_int()
    } else {
        g.rng.range(-3, 3).to_string().into_bytes()
    };
    step!(g.name(name), g.key(), n, g.member())
}

/// `LPOS key element [RANK r] [COUNT c] [MAXLEN m]`, options in any order.
fn lpos(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key(), g.member());
    let invalid = g.invalid();
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    if g.chance(40) {
        let r = if invalid && g.chance(40) {
            g.rng
                .pick(&["0", "abc", "-9223372036854775808"])
                .as_bytes()
                .to_vec()
        } else {
            g.rng.pick(&["1", "2", "-1", "-2", "3"]).as_bytes().to_vec()
        };
        opts.push(vec![g.word("RANK"), r]);
    }
    if g.chance(40) {
        let c = if invalid && g.chance(40) {
            g.rng.pick(&["-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.range(0, 3).to_string().into_bytes()
        };
        opts.push(vec![g.word("COUNT"), c]);
    }
    if g.chance(25) {
        let m = if invalid && g.chance(40) {
            b"-1".to_vec()
        } else {
            g.rng.range(0, 4).to_string().into_bytes()
        };
        opts.push(vec![g.word("MAXLEN"), m]);
    }
    if g.chance(50) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    if invalid && g.chance(30) {
        s.args.push(b"RANK".to_vec());
    }
    s
}

fn side(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return b"UP".to_vec();
    }
    let w = *g.rng.pick(&["LEFT", "RIGHT"]);
    g.word(w)
}

/// A blocking pop's timeout: 10 ms (never 0, which would block forever), or a refused one.
fn timeout(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g.rng.pick(&["-1", "abc", "", "-0.5"]).as_bytes().to_vec();
    }
    g.rng.pick(&["0.01", "0.01", "0.005"]).as_bytes().to_vec()
}

/// LMOVE and `BLMOVE source destination LEFT|RIGHT LEFT|RIGHT timeout`.
fn lmove(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let (a, b) = (side(g, invalid), side(g, invalid));
    let mut s = step!(g.name(name), g.key(), g.key(), a, b);
    if name == "blmove" {
        s.args.push(timeout(g, invalid));
    }
    s
}

/// RPOPLPUSH and `BRPOPLPUSH source destination timeout`.
fn rpoplpush(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name), g.key());
    if invalid && g.chance(50) {
        return s;
    }
    s.args.push(g.key());
    if name == "brpoplpush" {
        s.args.push(timeout(g, invalid));
    }
    s
}

/// `BLPOP|BRPOP key [key ...] timeout`.
fn bpop(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name));
    let n = g.rng.range(1, 3) as usize;
    s.args.extend(g.keys(n));
    s.args.push(timeout(g, invalid));
    s
}

/// `LMPOP numkeys key [key ...] LEFT|RIGHT [COUNT count]` and `BLMPOP timeout numkeys ...`.
fn lmpop(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let n = g.rng.range(1, 3) as usize;
    let numkeys = if invalid && g.chance(40) {
        g.rng.pick(&["0", "-1", "9", "abc"]).as_bytes().to_vec()
    } else {
        n.to_string().into_bytes()
    };
    let mut s = step!(g.name(name));
    if name == "blmpop" {
        s.args.push(timeout(g, invalid));
    }
    s.args.push(numkeys);
    s.args.extend(g.keys(n));
    s.args.push(side(g, invalid));
    if g.chance(40) {
        s.args.push(g.word("COUNT"));
        let c = if invalid && g.chance(50) {
            g.rng.pick(&["0", "-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.range(1, 4).to_string().into_bytes()
        };
        s.args.push(c);
    }
    if invalid && g.chance(30) {
        s.args.push(b"COUNT".to_vec());
    }
    s
}
