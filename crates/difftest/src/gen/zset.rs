//! Sorted sets: ZADD with every flag, ZINCRBY, ZREM, ZCARD, ZSCORE/ZMSCORE, ZCOUNT/ZLEXCOUNT,
//! the ZRANGE family (rank, BYSCORE, BYLEX, REV, LIMIT, WITHSCORES; exclusive and infinite
//! bounds), ZRANGESTORE, ZRANK/ZREVRANK, ZREMRANGEBY*, ZPOPMIN/ZPOPMAX, ZMPOP, ZRANDMEMBER,
//! ZSCAN walks, ZUNION/ZINTER/ZDIFF (WEIGHTS, AGGREGATE) and their store forms, ZINTERCARD, and
//! BZPOPMIN/BZPOPMAX/BZMPOP with a 10 ms timeout (they answer at once on a non-empty key, nil
//! after the timeout on empty ones; never timeout 0, which blocks forever).
//!
//! # Three kinds of keys
//!
//! Two Redis 7.0 behaviours depend on a sorted set's encoding in ways capdb does not (and
//! should not) copy, so the generator keeps the encodings apart instead of comparing loosely:
//!
//! - **Pool keys** ([`Gen::key`], shared with every family) only ever hold small sorted sets
//!   (Redis's `listpack`): members from [`member`] (fewer than 40, none longer than 64 bytes),
//!   and the store commands write a pool key only from pool sources (sets among them: the set
//!   family never adds members longer than 64 bytes, see `set.rs`). A listpack stores `-0` as
//!   `0`, as capdb always does, so `-0` scores are generated freely here.
//! - **Big keys** (`{d}:zbig0`, `{d}:zbig1`, zset commands only) grow past 128 members with
//!   bulk ZADDs and long members: Redis's `skiplist`. A skiplist keeps a `-0` score as `-0`
//!   where capdb stores `0` (documented in `crates/data/src/zset/mod.rs`), so nothing can put a
//!   `-0` into them: no `-0` score or increment, and a store into a big key takes only positive
//!   weights (`0 * -3` and `-1 * 0` are `-0`); pool sources never hold `-0`.
//! - **Lex keys** (`{d}:zlex0`, `{d}:zlex1`) hold members that all score 0, the only case where
//!   Redis defines the lex commands. Lex ranges over mixed scores are asked of pool keys
//!   (Redis's listpack walk, which capdb reproduces) but never of big keys: a skiplist's answer
//!   then depends on its random node levels.

use super::keys::scan_options;
use super::{CommandGen, Family, Gen, LONG, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "zset",
    home: (13, 5),
    weight: 20,
    commands: &[
        CommandGen {
            name: "zadd",
            weight: 20,
            make: zadd,
        },
        CommandGen {
            name: "zadd",
            weight: 4,
            make: zadd_bulk,
        },
        CommandGen {
            name: "zincrby",
            weight: 5,
            make: zincrby,
        },
        CommandGen {
            name: "zrem",
            weight: 6,
            make: zrem,
        },
        CommandGen {
            name: "zcard",
            weight: 3,
            make: one_key,
        },
        CommandGen {
            name: "zscore",
            weight: 5,
            make: zscore,
        },
        CommandGen {
            name: "zmscore",
            weight: 3,
            make: zrem,
        },
        CommandGen {
            name: "zcount",
            weight: 4,
            make: zcount,
        },
        CommandGen {
            name: "zlexcount",
            weight: 3,
            make: zlexcount,
        },
        CommandGen {
            name: "zrange",
            weight: 12,
            make: zrange,
        },
        CommandGen {
            name: "zrevrange",
            weight: 2,
            make: zrevrange,
        },
        CommandGen {
            name: "zrangebyscore",
            weight: 4,
            make: zrangebyscore,
        },
        CommandGen {
            name: "zrevrangebyscore",
            weight: 3,
            make: zrangebyscore,
        },
        CommandGen {
            name: "zrangebylex",
            weight: 3,
            make: zrangebylex,
        },
        CommandGen {
            name: "zrevrangebylex",
            weight: 2,
            make: zrangebylex,
        },
        CommandGen {
            name: "zrangestore",
            weight: 3,
            make: zrange,
        },
        CommandGen {
            name: "zrank",
            weight: 3,
            make: zscore,
        },
        CommandGen {
            name: "zrevrank",
            weight: 2,
            make: zscore,
        },
        CommandGen {
            name: "zremrangebyrank",
            weight: 2,
            make: zremrangebyrank,
        },
        CommandGen {
            name: "zremrangebyscore",
            weight: 2,
            make: zcount,
        },
        CommandGen {
            name: "zremrangebylex",
            weight: 2,
            make: zlexcount,
        },
        CommandGen {
            name: "zpopmin",
            weight: 3,
            make: zpop,
        },
        CommandGen {
            name: "zpopmax",
            weight: 3,
            make: zpop,
        },
        CommandGen {
            name: "zmpop",
            weight: 3,
            make: zmpop,
        },
        CommandGen {
            name: "zrandmember",
            weight: 3,
            make: zrandmember,
        },
        CommandGen {
            name: "zscan",
            weight: 3,
            make: zscan,
        },
        CommandGen {
            name: "zunion",
            weight: 3,
            make: combine,
        },
        CommandGen {
            name: "zinter",
            weight: 3,
            make: combine,
        },
        CommandGen {
            name: "zdiff",
            weight: 2,
            make: combine,
        },
        CommandGen {
            name: "zunionstore",
            weight: 3,
            make: combine,
        },
        CommandGen {
            name: "zinterstore",
            weight: 3,
            make: combine,
        },
        CommandGen {
            name: "zdiffstore",
            weight: 2,
            make: combine,
        },
        CommandGen {
            name: "zintercard",
            weight: 2,
            make: zintercard,
        },
        CommandGen {
            name: "bzpopmin",
            weight: 1,
            make: bzpop,
        },
        CommandGen {
            name: "bzpopmax",
            weight: 1,
            make: bzpop,
        },
        CommandGen {
            name: "bzmpop",
            weight: 1,
            make: zmpop,
        },
        CommandGen {
            name: "del",
            weight: 1,
            make: del_special,
        },
        CommandGen {
            name: "object",
            weight: 2,
            make: object_encoding,
        },
    ],
};

/// Which kind of key (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pool,
    Big,
    Lex,
}

fn key_of(g: &mut Gen, kind: Kind) -> Vec<u8> {
    match kind {
        Kind::Pool => g.key(),
        Kind::Big => format!("{{d}}:zbig{}", g.rng.below(2)).into_bytes(),
        Kind::Lex => format!("{{d}}:zlex{}", g.rng.below(2)).into_bytes(),
    }
}

/// Mostly pool keys, some big, some lex.
fn any_kind(g: &mut Gen) -> Kind {
    match g.rng.below(100) {
        0..=74 => Kind::Pool,
        75..=89 => Kind::Big,
        _ => Kind::Lex,
    }
}

/// A key for a lex query: never a big one.
fn lex_kind(g: &mut Gen) -> Kind {
    if g.chance(60) { Kind::Lex } else { Kind::Pool }
}

/// A member for `kind`: a small pool (overlapping the set family's members), rarely empty or
/// binary; big keys also get a wide pool and long members.
fn member(g: &mut Gen, kind: Kind) -> Vec<u8> {
    if kind == Kind::Big {
        match g.rng.below(100) {
            0..=1 => return LONG.to_vec(),
            2..=59 => return format!("m{}", g.rng.below(300)).into_bytes(),
            _ => {}
        }
    }
    if kind == Kind::Lex && g.chance(40) {
        return format!("m{}", g.rng.below(300)).into_bytes();
    }
    match g.rng.below(100) {
        0 => Vec::new(),
        1 => b"\x00\xff\r\n".to_vec(),
        2..=29 => g
            .rng
            .pick(&["1", "2", "3", "10", "-5", "100"])
            .as_bytes()
            .to_vec(),
        _ => g
            .rng
            .pick(&["a", "b", "c", "d", "e", "f", "g", "h", "hello", "zz"])
            .as_bytes()
            .to_vec(),
    }
}

/// A score for `kind`: small integers, halves and quarters, other spellings, infinities,
/// signed zeros (pool keys only), and a few huge and tiny ones; every value exact in binary,
/// so sums agree and print alike (`%.17g`). Lex keys: always 0.
fn score(g: &mut Gen, kind: Kind) -> Vec<u8> {
    if kind == Kind::Lex {
        return g
            .rng
            .pick(&["0", "0", "0", "0.0", "+0", "0e5"])
            .as_bytes()
            .to_vec();
    }
    let s: &&str = match g.rng.below(100) {
        0..=44 => return g.rng.range(-5, 20).to_string().into_bytes(),
        45..=64 => g
            .rng
            .pick(&["0.5", "1.25", "-2.75", "2.5", "-0.25", "7.75", "-1.5"]),
        65..=74 => g
            .rng
            .pick(&[".5", "+3", "1e1", "2E0", "5.", "-.25", "1e+1"]),
        75..=81 => g
            .rng
            .pick(&["inf", "-inf", "+inf", "Infinity", "-INF", "+Inf"]),
        82..=91 if kind == Kind::Pool => g.rng.pick(&["0", "-0", "-0.0", "0.0", "-0e3"]),
        82..=91 => g.rng.pick(&["0", "0.0", "+0"]),
        _ => g.rng.pick(&[
            "1e300",
            "-1e300",
            "1.7976931348623157e308",
            "-1.7976931348623157e308",
            "5e-324",
            "2.2250738585072014e-308",
            "1e-300",
            "123456789012345678",
        ]),
    };
    s.as_bytes().to_vec()
}

/// Text ZADD, ZINCRBY and WEIGHTS refuse: junk, NaN, spaces, and values past a double's range
/// (strtod's ERANGE: overflow and underflow to zero).
fn bad_score(g: &mut Gen) -> Vec<u8> {
    g.rng.pick(BAD_SCORES).as_bytes().to_vec()
}

const BAD_SCORES: &[&str] = &[
    "abc", "nan", "", " 1", "1 ", "1.5x", "--1", "1e309", "-1e309", "1e-400", "-2e-999",
];

/// One end of a score range: a score, exclusive or not, infinities, and what C's `strtod`
/// accepts there (leading spaces, an empty string as 0, overflow to infinity); sometimes junk.
fn score_bound(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g
            .rng
            .pick(&["abc", "(abc", "1x", "nan", "(nan", " ", "((1", "[1"])
            .as_bytes()
            .to_vec();
    }
    match g.rng.below(100) {
        0..=9 => g
            .rng
            .pick(&["-inf", "+inf", "inf", "(-inf", "(+inf", "-INF"])
            .as_bytes()
            .to_vec(),
        10..=13 => g
            .rng
            .pick(&["", "(", " 1", "(\t2", "1e309", "(-1e309", "1e-400"])
            .as_bytes()
            .to_vec(),
        n => {
            let mut s = score(g, Kind::Pool);
            if n % 3 == 0 {
                s.insert(0, b'(');
            }
            s
        }
    }
}

/// One end of a lex range: `-`, `+`, `[member`, `(member`; sometimes junk.
fn lex_bound(g: &mut Gen, kind: Kind, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g
            .rng
            .pick(&["a", "", "+a", "-a", "{a", "1"])
            .as_bytes()
            .to_vec();
    }
    match g.rng.below(10) {
        0 => b"-".to_vec(),
        1 => b"+".to_vec(),
        n => {
            let mut m = member(g, kind);
            m.insert(0, if n % 2 == 0 { b'[' } else { b'(' });
            m
        }
    }
}

/// A rank index: near either end, sometimes far out. The refused ones leave out hex (`0x10`):
/// an invalid form may add BYSCORE, making this a score, and C's strtod reads hex floats where
/// capdb refuses them (a documented difference, `crates/data/src/format.rs`).
fn rank(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        let b = g.bad_int();
        return if b.starts_with(b"0x") {
            b"1.5".to_vec()
        } else {
            b
        };
    }
    match g.rng.below(10) {
        0 => g
            .rng
            .pick(&["200", "-200", "9223372036854775807", "-9223372036854775808"])
            .as_bytes()
            .to_vec(),
        _ => g.rng.range(-8, 8).to_string().into_bytes(),
    }
}

/// `LIMIT offset count`: small offsets and counts, negative counts (everything).
fn limit(g: &mut Gen, invalid: bool) -> Vec<Vec<u8>> {
    let off = if invalid && g.chance(30) {
        g.bad_int()
    } else {
        g.rng
            .pick(&["0", "0", "1", "2", "5", "-1"])
            .as_bytes()
            .to_vec()
    };
    let count = g.rng.pick(&["1", "2", "3", "10", "0", "-1", "-5"]);
    vec![g.word("LIMIT"), off, count.as_bytes().to_vec()]
}

/// `ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member ...`: flags alone and in refused
/// combinations, one to four pairs (one with INCR), odd counts, bad scores.
fn zadd(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let mut s = step!(g.name(name), key_of(g, kind));
    let invalid = g.invalid();
    let mut flags: Vec<&str> = Vec::new();
    if g.chance(20) {
        flags.push(*g.rng.pick(&["NX", "XX"]));
    }
    if g.chance(15) {
        flags.push(*g.rng.pick(&["GT", "LT"]));
    }
    if g.chance(20) {
        flags.push("CH");
    }
    let incr = g.chance(12);
    if incr {
        flags.push("INCR");
    }
    if invalid && g.chance(40) {
        flags.push(*g.rng.pick(&["NX", "XX", "GT", "LT", "INCR", "FOO"]));
    }
    if g.chance(30) {
        // Redis reads flags in any order until the first argument that is not one.
        let n = flags.len();
        let i = g.rng.below(n as u64 + 1) as usize;
        flags.rotate_left(i.min(n));
    }
    for f in flags {
        s.args.push(g.word(f));
    }
    let pairs = if incr && !(invalid && g.chance(30)) {
        1
    } else {
        g.rng.range(1, 4)
    };
    for _ in 0..pairs {
        let sc = if invalid && g.chance(30) {
            bad_score(g)
        } else {
            score(g, kind)
        };
        s.args.push(sc);
        s.args.push(member(g, kind));
    }
    if invalid && g.chance(30) {
        s.args.pop();
    }
    s
}

/// A bulk ZADD of 60 to 150 members into a big or lex key: what makes them skiplists (in one
/// or two of them: the keys family's FLUSHDB comes every few hundred commands).
fn zadd_bulk(g: &mut Gen, name: &str) -> Step {
    let kind = if g.chance(60) { Kind::Big } else { Kind::Lex };
    let mut s = step!(g.name(name), key_of(g, kind));
    if g.chance(20) {
        let f = *g.rng.pick(&["NX", "XX", "CH", "GT"]);
        s.args.push(g.word(f));
    }
    for _ in 0..g.rng.range(60, 150) {
        s.args.push(score(g, kind));
        s.args.push(format!("m{}", g.rng.below(400)).into_bytes());
    }
    s
}

/// `ZINCRBY key increment member` (not on lex keys, whose scores must stay 0).
fn zincrby(g: &mut Gen, name: &str) -> Step {
    let kind = if g.chance(80) { Kind::Pool } else { Kind::Big };
    let key = key_of(g, kind);
    if g.invalid() {
        if g.chance(30) {
            return step!(g.name(name), key, b"1");
        }
        return step!(g.name(name), key, bad_score(g), member(g, kind));
    }
    step!(g.name(name), key, score(g, kind), member(g, kind))
}

/// ZREM and ZMSCORE: one to four members, or none.
fn zrem(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let mut s = step!(g.name(name), key_of(g, kind));
    if !g.invalid() {
        for _ in 0..g.rng.range(1, 4) {
            s.args.push(member(g, kind));
        }
    }
    s
}

fn one_key(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    if g.invalid() {
        return step!(g.name(name), key_of(g, kind), b"x");
    }
    step!(g.name(name), key_of(g, kind))
}

/// ZSCORE, ZRANK, ZREVRANK: `key member` (ZRANK's WITHSCORE is 7.2's: an arity error here).
fn zscore(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let key = key_of(g, kind);
    if g.invalid() {
        if g.chance(50) {
            return step!(g.name(name), key);
        }
        return step!(g.name(name), key, member(g, kind), g.word("WITHSCORE"));
    }
    step!(g.name(name), key, member(g, kind))
}

/// ZCOUNT and ZREMRANGEBYSCORE: `key min max`.
fn zcount(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let invalid = g.invalid();
    let (a, b) = (score_bound(g, invalid), score_bound(g, false));
    step!(g.name(name), key_of(g, kind), a, b)
}

/// ZLEXCOUNT and ZREMRANGEBYLEX: `key min max` (never a big key).
fn zlexcount(g: &mut Gen, name: &str) -> Step {
    let kind = lex_kind(g);
    let invalid = g.invalid();
    let (a, b) = (lex_bound(g, kind, invalid), lex_bound(g, kind, false));
    step!(g.name(name), key_of(g, kind), a, b)
}

fn zremrangebyrank(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let invalid = g.invalid();
    let (a, b) = (rank(g, invalid), rank(g, false));
    step!(g.name(name), key_of(g, kind), a, b)
}

/// `ZRANGE key start stop [BYSCORE|BYLEX] [REV] [LIMIT offset count] [WITHSCORES]` and
/// `ZRANGESTORE dst src start stop [BYSCORE|BYLEX] [REV] [LIMIT offset count]`, options in any
/// order, and the refused combinations (LIMIT by rank, WITHSCORES with BYLEX, both BY forms).
fn zrange(g: &mut Gen, name: &str) -> Step {
    let store = name == "zrangestore";
    let invalid = g.invalid();
    let by = g.rng.below(10);
    let kind = if by >= 8 { lex_kind(g) } else { any_kind(g) };
    let mut s = step!(g.name(name));
    if store {
        // The destination is of the source's kind (see the module docs).
        s.args.push(key_of(g, kind));
    }
    s.args.push(key_of(g, kind));
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    match by {
        0..=4 => {
            s.args.push(rank(g, invalid));
            s.args.push(rank(g, false));
        }
        5..=7 => {
            s.args.push(score_bound(g, invalid));
            s.args.push(score_bound(g, false));
            opts.push(vec![g.word("BYSCORE")]);
        }
        _ => {
            s.args.push(lex_bound(g, kind, invalid));
            s.args.push(lex_bound(g, kind, false));
            opts.push(vec![g.word("BYLEX")]);
        }
    }
    if g.chance(30) {
        opts.push(vec![g.word("REV")]);
    }
    if (by >= 5 && g.chance(30)) || (invalid && g.chance(20)) {
        opts.push(limit(g, invalid));
    }
    if (!store && by < 8 && g.chance(40)) || (invalid && g.chance(20)) {
        opts.push(vec![g.word("WITHSCORES")]);
    }
    if invalid && g.chance(30) {
        // Two BY options are a syntax error, but never risk a BYLEX over a big key.
        let o = if kind == Kind::Big {
            *g.rng.pick(&["BYSCORE", "LIMIT", "FOO"])
        } else {
            *g.rng.pick(&["BYSCORE", "BYLEX", "LIMIT", "FOO"])
        };
        opts.push(vec![g.word(o)]);
    }
    if g.chance(40) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    s
}

/// `ZREVRANGE key start stop [WITHSCORES]`.
fn zrevrange(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let invalid = g.invalid();
    let mut s = step!(
        g.name(name),
        key_of(g, kind),
        rank(g, invalid),
        rank(g, false)
    );
    if g.chance(40) {
        s.args.push(g.word("WITHSCORES"));
    }
    if invalid && g.chance(30) {
        s.args.push(b"FOO".to_vec());
    }
    s
}

/// `ZRANGEBYSCORE key min max [WITHSCORES] [LIMIT offset count]` and ZREVRANGEBYSCORE (max
/// first).
fn zrangebyscore(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let invalid = g.invalid();
    let mut s = step!(
        g.name(name),
        key_of(g, kind),
        score_bound(g, invalid),
        score_bound(g, false)
    );
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    if g.chance(40) {
        opts.push(vec![g.word("WITHSCORES")]);
    }
    if g.chance(30) {
        opts.push(limit(g, invalid));
    }
    if invalid && g.chance(30) {
        let o = *g.rng.pick(&["LIMIT", "REV", "BYSCORE"]);
        opts.push(vec![g.word(o)]);
    }
    if g.chance(50) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    s
}

/// `ZRANGEBYLEX key min max [LIMIT offset count]` and ZREVRANGEBYLEX (never a big key).
fn zrangebylex(g: &mut Gen, name: &str) -> Step {
    let kind = lex_kind(g);
    let invalid = g.invalid();
    let mut s = step!(
        g.name(name),
        key_of(g, kind),
        lex_bound(g, kind, invalid),
        lex_bound(g, kind, false)
    );
    if g.chance(30) {
        s.args.extend(limit(g, invalid));
    }
    if invalid && g.chance(30) {
        s.args.push(g.word("WITHSCORES"));
    }
    s
}

/// ZPOPMIN/ZPOPMAX `key [count]`.
fn zpop(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let mut s = step!(g.name(name), key_of(g, kind));
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

/// A blocking pop's timeout: 10 ms (never 0, which would block forever), or a refused one.
fn timeout(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g.rng.pick(&["-1", "abc", "", "-0.5"]).as_bytes().to_vec();
    }
    g.rng.pick(&["0.01", "0.01", "0.005"]).as_bytes().to_vec()
}

/// `ZMPOP numkeys key ... MIN|MAX [COUNT count]` and `BZMPOP timeout numkeys ...`.
fn zmpop(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name));
    if name == "bzmpop" {
        s.args.push(timeout(g, invalid));
    }
    let n = g.rng.range(1, 3) as usize;
    let numkeys = if invalid && g.chance(40) {
        g.rng.pick(&["0", "-1", "9", "abc"]).as_bytes().to_vec()
    } else {
        n.to_string().into_bytes()
    };
    s.args.push(numkeys);
    for _ in 0..n {
        let kind = any_kind(g);
        s.args.push(key_of(g, kind));
    }
    let side = if invalid && g.chance(30) {
        b"UP".to_vec()
    } else {
        let w = *g.rng.pick(&["MIN", "MAX"]);
        g.word(w)
    };
    s.args.push(side);
    if g.chance(40) {
        s.args.push(g.word("COUNT"));
        let c = if invalid && g.chance(50) {
            g.rng.pick(&["0", "-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.pick(&["1", "2", "3", "50"]).as_bytes().to_vec()
        };
        s.args.push(c);
    }
    if invalid && g.chance(30) {
        s.args.push(b"COUNT".to_vec());
    }
    s
}

/// `BZPOPMIN|BZPOPMAX key [key ...] timeout`.
fn bzpop(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name));
    for _ in 0..g.rng.range(1, 3) {
        let kind = any_kind(g);
        s.args.push(key_of(g, kind));
    }
    s.args.push(timeout(g, invalid));
    s
}

/// `ZRANDMEMBER key [count [WITHSCORES]]` (random: compared by properties). Counts stay small:
/// a huge negative one makes Redis build the whole reply (capdb refuses past its frame limit,
/// a documented difference); the extremes it refuses are asked.
fn zrandmember(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let mut s = step!(g.name(name), key_of(g, kind));
    let invalid = g.invalid();
    if g.chance(70) || invalid {
        s.args.push(if invalid && g.chance(50) {
            g.rng
                .pick(&["abc", "1.5", "-9223372036854775808", ""])
                .as_bytes()
                .to_vec()
        } else if g.chance(5) {
            b"9223372036854775807".to_vec()
        } else {
            g.count()
        });
        if g.chance(40) {
            s.args.push(g.word("WITHSCORES"));
        }
    }
    if invalid && g.chance(50) {
        s.args.push(b"FOO".to_vec());
    }
    s
}

/// A whole ZSCAN walk.
fn zscan(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    let key = key_of(g, kind);
    let invalid = g.invalid();
    if invalid && g.chance(30) {
        let c = *g.rng.pick(&["abc", "18446744073709551616", " 1", "+"]);
        return step!(g.name(name), key, c);
    }
    let mut s = step!(g.name(name), key, g.cursor_zero());
    scan_options(g, &mut s, invalid);
    s.walk = true;
    s
}

/// A WEIGHTS value: integers, halves, zero, negative, infinite; only positive finite ones when
/// the result is stored into a big key (no `-0` there, see the module docs).
fn weight(g: &mut Gen, into_big: bool) -> Vec<u8> {
    let w: &&str = if into_big {
        g.rng.pick(&["1", "2", "0.5", "3", "1.5"])
    } else {
        g.rng.pick(&[
            "1", "2", "0.5", "-1", "0", "3", "-0.25", "inf", "-inf", "1e300",
        ])
    };
    w.as_bytes().to_vec()
}

/// ZUNION/ZINTER/ZDIFF and the STORE forms: one to three sources (sets among them),
/// `WEIGHTS` and `AGGREGATE` (not for ZDIFF), `WITHSCORES` (not for the STORE forms), numkeys
/// out of range, repeated options.
fn combine(g: &mut Gen, name: &str) -> Step {
    let store = name.ends_with("store");
    let diff = name.starts_with("zdiff");
    let invalid = g.invalid();
    let n = g.rng.range(1, 3) as usize;
    let kinds: Vec<Kind> = (0..n).map(|_| any_kind(g)).collect();
    let sources: Vec<Vec<u8>> = kinds.iter().map(|k| key_of(g, *k)).collect();
    // A pool key is written only from pool sources; anything else goes into a big key.
    let into_big = store && (kinds.iter().any(|k| *k != Kind::Pool) || g.chance(15));
    let mut s = step!(g.name(name));
    if store {
        let dst = key_of(g, if into_big { Kind::Big } else { Kind::Pool });
        s.args.push(dst);
    }
    let numkeys = if invalid && g.chance(30) {
        g.rng.pick(&["0", "-1", "9", "abc"]).as_bytes().to_vec()
    } else {
        n.to_string().into_bytes()
    };
    s.args.push(numkeys);
    s.args.extend(sources);
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    if (!diff && g.chance(35)) || (invalid && g.chance(20)) {
        let mut o = vec![g.word("WEIGHTS")];
        let count = if invalid && g.chance(40) {
            n.saturating_sub(1)
        } else {
            n
        };
        for _ in 0..count {
            o.push(if invalid && g.chance(20) {
                bad_score(g)
            } else {
                weight(g, into_big)
            });
        }
        opts.push(o);
    }
    if (!diff && g.chance(30)) || (invalid && g.chance(20)) {
        let a = if invalid && g.chance(30) {
            "AVG"
        } else {
            *g.rng.pick(&["SUM", "MIN", "MAX"])
        };
        opts.push(vec![g.word("AGGREGATE"), g.word(a)]);
    }
    if (!store && g.chance(50)) || (invalid && g.chance(20)) {
        opts.push(vec![g.word("WITHSCORES")]);
    }
    if g.chance(40) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    if invalid && g.chance(20) {
        s.args.push(b"AGGREGATE".to_vec());
    }
    s
}

/// `ZINTERCARD numkeys key ... [LIMIT limit]`.
fn zintercard(g: &mut Gen, name: &str) -> Step {
    let n = g.rng.range(1, 3) as usize;
    let invalid = g.invalid();
    let numkeys = if invalid && g.chance(50) {
        g.rng.pick(&["0", "-1", "5", "abc"]).as_bytes().to_vec()
    } else {
        n.to_string().into_bytes()
    };
    let mut s = step!(g.name(name), numkeys);
    for _ in 0..n {
        let kind = any_kind(g);
        s.args.push(key_of(g, kind));
    }
    if g.chance(40) {
        s.args.push(g.word("LIMIT"));
        let l = if invalid && g.chance(50) {
            g.rng.pick(&["-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.range(0, 4).to_string().into_bytes()
        };
        s.args.push(l);
    }
    s
}

/// DEL of a big or lex key now and then (nothing else deletes them but FLUSHDB), so they
/// start over small; mostly of a pool key.
fn del_special(g: &mut Gen, name: &str) -> Step {
    let kind = match g.rng.below(8) {
        0 => Kind::Big,
        1 => Kind::Lex,
        _ => Kind::Pool,
    };
    step!(g.name(name), key_of(g, kind))
}

/// `OBJECT ENCODING key` of any kind of key: `listpack` or `skiplist`, compared exactly.
fn object_encoding(g: &mut Gen, name: &str) -> Step {
    let kind = any_kind(g);
    step!(g.name(name), g.word("ENCODING"), key_of(g, kind))
}

#[cfg(test)]
mod tests {
    use crate::r#gen::Generator;

    fn is_big(a: &[u8]) -> bool {
        a.starts_with(b"{d}:zbig")
    }

    fn is_pool(a: &[u8]) -> bool {
        a.starts_with(b"{d}:") && !a.starts_with(b"{d}:z")
    }

    fn negative_zero(a: &[u8]) -> bool {
        let t = String::from_utf8_lossy(a);
        // A refused score stores nothing.
        !super::BAD_SCORES.contains(&&*t)
            && t.starts_with('-')
            && t.parse::<f64>().is_ok_and(|x| x == 0.0)
    }

    /// The module docs' rules, over a long mix: no lex range over a big key, no `-0` into one,
    /// pool keys written only from pool keys, and no member past 64 bytes into a pool key.
    #[test]
    fn generated_commands_keep_the_encodings_apart() {
        let mut g = Generator::new(11, &|_| true);
        for _ in 0..200_000 {
            let s = g.next_step();
            let name = s.name();
            let a = &s.args;
            let bylex = a.iter().any(|x| x.eq_ignore_ascii_case(b"BYLEX")) || name.contains("lex");
            if bylex {
                assert!(!a.iter().any(|x| is_big(x)), "{a:?}");
            }
            if (name == "zadd" || name == "zincrby") && is_big(&a[1]) {
                assert!(!a.iter().any(|x| negative_zero(x)), "{a:?}");
            }
            if name == "zadd" && is_pool(&a[1]) {
                assert!(a.iter().all(|x| x.len() <= 64), "{a:?}");
            }
            if name.ends_with("store") && name.starts_with('z') && a.len() > 2 {
                if is_pool(&a[1]) {
                    assert!(a[2..].iter().all(|x| !x.starts_with(b"{d}:z")), "{a:?}");
                }
                if is_big(&a[1])
                    && let Some(w) = a.iter().position(|x| x.eq_ignore_ascii_case(b"WEIGHTS"))
                {
                    for x in &a[w + 1..] {
                        let t = String::from_utf8_lossy(x);
                        if super::BAD_SCORES.contains(&&*t) {
                            continue; // refused: nothing is stored
                        }
                        if let Ok(v) = t.parse::<f64>() {
                            assert!(v > 0.0, "{a:?}");
                        }
                    }
                }
            }
        }
    }
}
