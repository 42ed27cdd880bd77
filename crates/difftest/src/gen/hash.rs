//! Hashes: HSET/HMSET/HSETNX, HGET/HMGET/HGETALL, HDEL, HEXISTS, HLEN, HSTRLEN, HINCRBY,
//! HINCRBYFLOAT, HKEYS/HVALS, HRANDFIELD, HSCAN walks.

use super::keys::scan_options;
use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "hash",
    home: (4, 5),
    weight: 20,
    commands: &[
        CommandGen {
            name: "hset",
            weight: 20,
            make: hset,
        },
        CommandGen {
            name: "hmset",
            weight: 3,
            make: hset,
        },
        CommandGen {
            name: "hsetnx",
            weight: 4,
            make: hsetnx,
        },
        CommandGen {
            name: "hget",
            weight: 10,
            make: key_field,
        },
        CommandGen {
            name: "hexists",
            weight: 4,
            make: key_field,
        },
        CommandGen {
            name: "hstrlen",
            weight: 3,
            make: key_field,
        },
        CommandGen {
            name: "hmget",
            weight: 5,
            make: hmget,
        },
        CommandGen {
            name: "hdel",
            weight: 8,
            make: hdel,
        },
        CommandGen {
            name: "hgetall",
            weight: 5,
            make: one_key,
        },
        CommandGen {
            name: "hkeys",
            weight: 3,
            make: one_key,
        },
        CommandGen {
            name: "hvals",
            weight: 3,
            make: one_key,
        },
        CommandGen {
            name: "hlen",
            weight: 6,
            make: one_key,
        },
        CommandGen {
            name: "hincrby",
            weight: 6,
            make: hincrby,
        },
        CommandGen {
            name: "hincrbyfloat",
            weight: 4,
            make: hincrbyfloat,
        },
        CommandGen {
            name: "hrandfield",
            weight: 3,
            make: hrandfield,
        },
        CommandGen {
            name: "hscan",
            weight: 3,
            make: hscan,
        },
    ],
};

/// HSET and HMSET: one to four pairs, or an odd argument count.
fn hset(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    for _ in 0..g.rng.range(1, 4) {
        s.args.push(g.field());
        s.args.push(g.value());
    }
    if g.invalid() {
        s.args.pop();
    }
    s
}

fn hsetnx(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key(), g.field());
    }
    step!(g.name(name), g.key(), g.field(), g.value())
}

/// HGET, HEXISTS, HSTRLEN.
fn key_field(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name), g.key(), g.field())
}

fn hmget(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    if !g.invalid() {
        for _ in 0..g.rng.range(1, 4) {
            s.args.push(g.field());
        }
    }
    s
}

fn hdel(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    if !g.invalid() {
        for _ in 0..g.rng.range(1, 3) {
            s.args.push(g.field());
        }
    }
    s
}

/// HGETALL, HKEYS, HVALS, HLEN.
fn one_key(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    step!(g.name(name), g.key())
}

fn hincrby(g: &mut Gen, name: &str) -> Step {
    let by = if g.invalid() {
        g.bad_int()
    } else if g.chance(10) {
        g.int_text()
    } else {
        g.small_int()
    };
    step!(g.name(name), g.key(), g.field(), by)
}

fn hincrbyfloat(g: &mut Gen, name: &str) -> Step {
    let by = if g.invalid() {
        g.bad_long_double()
    } else {
        g.float_text()
    };
    step!(g.name(name), g.key(), g.field(), by)
}

/// `HRANDFIELD key [count [WITHVALUES]]` (read-only, random: compared by properties).
fn hrandfield(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    let invalid = g.invalid();
    if g.chance(70) || invalid {
        s.args.push(if invalid && g.chance(50) {
            g.bad_int()
        } else {
            g.count()
        });
        if g.chance(40) {
            s.args.push(g.word("WITHVALUES"));
        }
    }
    if invalid && g.chance(50) {
        s.args.push(b"FOO".to_vec());
    }
    s
}

/// A whole HSCAN walk.
fn hscan(g: &mut Gen, name: &str) -> Step {
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
