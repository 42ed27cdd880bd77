//! Strings: SET and its options, GET, GETDEL, the INCR family, APPEND, MSET/MGET, STRLEN,
//! GETSET, GETRANGE/SUBSTR, SETRANGE, INCRBYFLOAT, MSETNX, GETEX and LCS.

use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "strings",
    home: (0, 6),
    weight: 30,
    commands: &[
        CommandGen {
            name: "set",
            weight: 20,
            make: set,
        },
        CommandGen {
            name: "get",
            weight: 15,
            make: get,
        },
        CommandGen {
            name: "getdel",
            weight: 3,
            make: one_key,
        },
        CommandGen {
            name: "setnx",
            weight: 3,
            make: setnx,
        },
        CommandGen {
            name: "setex",
            weight: 2,
            make: setex,
        },
        CommandGen {
            name: "psetex",
            weight: 2,
            make: setex,
        },
        CommandGen {
            name: "mset",
            weight: 4,
            make: mset,
        },
        CommandGen {
            name: "mget",
            weight: 5,
            make: mget,
        },
        CommandGen {
            name: "incr",
            weight: 5,
            make: one_key,
        },
        CommandGen {
            name: "decr",
            weight: 3,
            make: one_key,
        },
        CommandGen {
            name: "incrby",
            weight: 4,
            make: incrby,
        },
        CommandGen {
            name: "decrby",
            weight: 3,
            make: incrby,
        },
        CommandGen {
            name: "append",
            weight: 5,
            make: append,
        },
        CommandGen {
            name: "strlen",
            weight: 4,
            make: one_key,
        },
        CommandGen {
            name: "getset",
            weight: 2,
            make: getset,
        },
        CommandGen {
            name: "getrange",
            weight: 3,
            make: getrange,
        },
        CommandGen {
            name: "setrange",
            weight: 3,
            make: setrange,
        },
        CommandGen {
            name: "incrbyfloat",
            weight: 3,
            make: incrbyfloat,
        },
        CommandGen {
            name: "msetnx",
            weight: 2,
            make: mset,
        },
        CommandGen {
            name: "getex",
            weight: 3,
            make: getex,
        },
        CommandGen {
            name: "substr",
            weight: 1,
            make: getrange,
        },
        CommandGen {
            name: "lcs",
            weight: 3,
            make: lcs,
        },
    ],
};

fn get(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key(), g.key());
    }
    step!(g.name(name), g.key())
}

/// GETDEL, INCR, DECR, STRLEN: `NAME key`, or an arity error.
fn one_key(g: &mut Gen, name: &str) -> Step {
    let name = g.name(name);
    if g.invalid() {
        return step!(name);
    }
    step!(name, g.key())
}

/// An expiry of `unit` (`EX`, `PX`, `EXAT`, `PXAT`): far future, past (absolute only, when
/// `past`) or invalid.
pub fn expiry_value(g: &mut Gen, unit: &str, invalid: bool, past: bool) -> Vec<u8> {
    if invalid {
        return match g.rng.below(4) {
            0 => b"0".to_vec(),
            1 => b"-1".to_vec(),
            2 => b"9223372036854775807".to_vec(),
            _ => g.bad_int(),
        };
    }
    // Past deadlines only where Redis deletes the key at once (EXPIREAT, GETEX): a SET with
    // one leaves an expired key that Redis's DBSIZE counts until its expiry cycle runs.
    let v: &&str = match unit {
        "EX" => g.rng.pick(&["100", "1000", "100000"]),
        "PX" => g.rng.pick(&["100000", "5000000"]),
        "EXAT" if past => g.rng.pick(&["4000000000", "3000000000", "1"]),
        "EXAT" => g.rng.pick(&["4000000000", "3000000000"]),
        _ if past => g.rng.pick(&["4000000000000", "3000000000000", "1"]),
        _ => g.rng.pick(&["4000000000000", "3000000000000"]),
    };
    v.as_bytes().to_vec()
}

fn set(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key(), g.value());
    let invalid = g.invalid();
    if g.chance(30) {
        let c = *g.rng.pick(&["NX", "XX"]);
        s.args.push(g.word(c));
    }
    if g.chance(20) {
        s.args.push(g.word("GET"));
    }
    if g.chance(35) {
        let unit = *g.rng.pick(&["EX", "PX", "EXAT", "PXAT", "KEEPTTL"]);
        s.args.push(g.word(unit));
        if unit != "KEEPTTL" {
            let bad = invalid && g.chance(50);
            s.args.push(expiry_value(g, unit, bad, false));
        }
    }
    if invalid {
        match g.rng.below(4) {
            0 => s.args.push(g.word("NX")),
            1 => s.args.push(g.word("EX")),
            2 => s.args.push(b"FOO".to_vec()),
            _ => s.args.truncate(2),
        }
    }
    // Options in any order, as Redis accepts them.
    if s.args.len() > 4 && g.chance(30) {
        let tail = s.args.split_off(3);
        let mut groups: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut i = 0;
        while i < tail.len() {
            let takes_value = matches!(
                &tail[i].to_ascii_uppercase()[..],
                b"EX" | b"PX" | b"EXAT" | b"PXAT"
            ) && i + 1 < tail.len();
            let n = if takes_value { 2 } else { 1 };
            groups.push(tail[i..i + n].to_vec());
            i += n;
        }
        groups.reverse();
        s.args.extend(groups.into_iter().flatten());
    }
    s
}

fn setnx(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name), g.key(), g.value())
}

fn setex(g: &mut Gen, name: &str) -> Step {
    let unit = if name == "setex" { "EX" } else { "PX" };
    let bad = g.invalid();
    if bad && g.chance(30) {
        return step!(g.name(name), g.key(), b"100");
    }
    let v = expiry_value(g, unit, bad, false);
    step!(g.name(name), g.key(), v, g.value())
}

fn mset(g: &mut Gen, name: &str) -> Step {
    let name = g.name(name);
    let mut s = step!(name);
    for _ in 0..g.rng.range(1, 4) {
        s.args.push(g.key());
        s.args.push(g.value());
    }
    if g.invalid() {
        s.args.pop();
    }
    s
}

fn mget(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name));
    if !g.invalid() {
        let n = g.rng.range(1, 5) as usize;
        s.args.extend(g.keys(n));
    }
    s
}

fn incrby(g: &mut Gen, name: &str) -> Step {
    let name = g.name(name);
    let by = if g.invalid() {
        g.bad_int()
    } else if g.chance(10) {
        g.int_text()
    } else {
        g.small_int()
    };
    step!(name, g.key(), by)
}

fn append(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name), g.key(), g.value())
}

fn getset(g: &mut Gen, name: &str) -> Step {
    step!(g.name(name), g.key(), g.value())
}

fn getrange(g: &mut Gen, name: &str) -> Step {
    let (a, b) = if g.invalid() {
        (g.bad_int(), g.index())
    } else {
        (g.index(), g.index())
    };
    step!(g.name(name), g.key(), a, b)
}

fn setrange(g: &mut Gen, name: &str) -> Step {
    let offset = if g.invalid() {
        g.rng.pick(&["-1", "abc", "536870912"]).as_bytes().to_vec()
    } else {
        g.rng.range(0, 80).to_string().into_bytes()
    };
    step!(g.name(name), g.key(), offset, g.value())
}

fn incrbyfloat(g: &mut Gen, name: &str) -> Step {
    let by = if g.invalid() {
        g.bad_long_double()
    } else {
        g.float_text()
    };
    step!(g.name(name), g.key(), by)
}

fn getex(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key());
    let invalid = g.invalid();
    match g.rng.below(6) {
        0 => {}
        1 => s.args.push(g.word("PERSIST")),
        _ => {
            let unit = *g.rng.pick(&["EX", "PX", "EXAT", "PXAT"]);
            s.args.push(g.word(unit));
            let bad = invalid && g.chance(50);
            let v = expiry_value(g, unit, bad, true);
            s.args.push(v);
        }
    }
    if invalid {
        let extra = *g.rng.pick(&["PERSIST", "EX", "FOO"]);
        s.args.push(g.word(extra));
    }
    s
}

/// `LCS key1 key2 [LEN] [IDX] [MINMATCHLEN len] [WITHMATCHLEN]`, options in any order (LEN
/// with IDX is refused).
fn lcs(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name), g.key(), g.key());
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    match g.rng.below(10) {
        0..=2 => {}
        3..=4 => opts.push(vec![g.word("LEN")]),
        _ => opts.push(vec![g.word("IDX")]),
    }
    if g.chance(30) {
        let n = if invalid && g.chance(50) {
            g.bad_int()
        } else {
            g.rng.pick(&["0", "1", "2", "3", "-1"]).as_bytes().to_vec()
        };
        opts.push(vec![g.word("MINMATCHLEN"), n]);
    }
    if g.chance(30) {
        opts.push(vec![g.word("WITHMATCHLEN")]);
    }
    if invalid {
        let o = *g.rng.pick(&["LEN", "IDX", "MINMATCHLEN", "FOO"]);
        opts.push(vec![g.word(o)]);
    }
    if g.chance(40) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    s
}
