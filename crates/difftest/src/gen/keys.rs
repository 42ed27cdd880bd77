//! Keys whatever their type: DEL/UNLINK, EXISTS, TYPE, TTL/PTTL, the EXPIRE family with
//! NX/XX/GT/LT, PERSIST, SCAN walks, KEYS, DBSIZE, a rare FLUSHDB, RENAME/RENAMENX, COPY,
//! TOUCH, EXPIRETIME/PEXPIRETIME, OBJECT, RESTORE of fixed payloads, and (enabled once capdb
//! serves it) RANDOMKEY.

use super::strings::expiry_value;
use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "keys",
    home: (0, 16),
    weight: 20,
    commands: &[
        CommandGen {
            name: "del",
            weight: 6,
            make: del,
        },
        CommandGen {
            name: "unlink",
            weight: 1,
            make: del,
        },
        CommandGen {
            name: "exists",
            weight: 4,
            make: exists,
        },
        CommandGen {
            name: "type",
            weight: 6,
            make: key_type,
        },
        CommandGen {
            name: "ttl",
            weight: 3,
            make: ttl,
        },
        CommandGen {
            name: "pttl",
            weight: 2,
            make: ttl,
        },
        CommandGen {
            name: "expire",
            weight: 4,
            make: expire,
        },
        CommandGen {
            name: "pexpire",
            weight: 2,
            make: expire,
        },
        CommandGen {
            name: "expireat",
            weight: 3,
            make: expireat,
        },
        CommandGen {
            name: "pexpireat",
            weight: 2,
            make: expireat,
        },
        CommandGen {
            name: "persist",
            weight: 3,
            make: persist,
        },
        CommandGen {
            name: "scan",
            weight: 3,
            make: scan,
        },
        CommandGen {
            name: "keys",
            weight: 2,
            make: keys,
        },
        CommandGen {
            name: "dbsize",
            weight: 2,
            make: dbsize,
        },
        CommandGen {
            name: "flushdb",
            weight: 1,
            make: flushdb,
        },
        CommandGen {
            name: "randomkey",
            weight: 1,
            make: randomkey,
        },
        CommandGen {
            name: "rename",
            weight: 2,
            make: rename,
        },
        CommandGen {
            name: "renamenx",
            weight: 1,
            make: rename,
        },
        CommandGen {
            name: "copy",
            weight: 2,
            make: copy,
        },
        CommandGen {
            name: "touch",
            weight: 1,
            make: touch,
        },
        CommandGen {
            name: "expiretime",
            weight: 1,
            make: ttl,
        },
        CommandGen {
            name: "pexpiretime",
            weight: 1,
            make: ttl,
        },
        CommandGen {
            name: "object",
            weight: 3,
            make: object,
        },
        CommandGen {
            name: "restore",
            weight: 2,
            make: restore,
        },
    ],
};

fn del(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name));
    if !g.invalid() {
        let n = g.rng.range(1, 3) as usize;
        s.args.extend(g.keys(n));
    }
    s
}

fn exists(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name));
    if !g.invalid() {
        let n = g.rng.range(1, 4) as usize;
        s.args.extend(g.keys(n));
    }
    s
}

fn key_type(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    step!(g.name(name), g.key())
}

/// TTL, PTTL, EXPIRETIME, PEXPIRETIME.
fn ttl(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key(), g.key());
    }
    step!(g.name(name), g.key())
}

/// Relative expiries (`EXPIRE`, `PEXPIRE`) with `NX`/`XX` only: `GT`/`LT` would compare two
/// deadlines computed from each server's clock at slightly different instants.
fn expire(g: &mut Gen, name: &str) -> Step {
    let unit = if name == "expire" { "EX" } else { "PX" };
    let invalid = g.invalid();
    let value = match g.rng.below(10) {
        // Zero or negative: deletes the key.
        0 if !invalid => b"0".to_vec(),
        1 if !invalid => b"-1".to_vec(),
        _ => {
            let bad = invalid && g.chance(50);
            expiry_value(g, unit, bad, true)
        }
    };
    let mut s = step!(g.name(name), g.key(), value);
    if g.chance(40) {
        let o = *g.rng.pick(&["NX", "XX"]);
        s.args.push(g.word(o));
    }
    if invalid {
        let o = *g.rng.pick(&["GT", "LT", "NX", "FOO", "xx"]);
        s.args.push(g.word(o));
    }
    s
}

/// Absolute expiries with every option combination.
fn expireat(g: &mut Gen, name: &str) -> Step {
    let unit = if name == "expireat" { "EXAT" } else { "PXAT" };
    let invalid = g.invalid();
    let bad = invalid && g.chance(30);
    let value = expiry_value(g, unit, bad, true);
    let mut s = step!(g.name(name), g.key(), value);
    let n = if invalid {
        g.rng.range(1, 3)
    } else {
        g.rng.range(0, 1)
    };
    for _ in 0..n {
        let o = *g.rng.pick(&["NX", "XX", "GT", "LT"]);
        s.args.push(g.word(o));
    }
    if invalid && g.chance(30) {
        s.args.push(b"BAD".to_vec());
    }
    s
}

fn persist(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    step!(g.name(name), g.key())
}

/// Appends `[MATCH p] [COUNT n]` in either order, each present or not.
pub fn scan_options(g: &mut Gen, s: &mut Step, invalid: bool) {
    let mut opts: Vec<Vec<Vec<u8>>> = Vec::new();
    if g.chance(40) {
        opts.push(vec![g.word("MATCH"), g.pattern()]);
    }
    if g.chance(40) {
        let n = if invalid {
            g.rng.pick(&["0", "-1", "abc"]).as_bytes().to_vec()
        } else {
            g.rng.pick(&["1", "2", "5", "100"]).as_bytes().to_vec()
        };
        opts.push(vec![g.word("COUNT"), n]);
    }
    if g.chance(50) {
        opts.reverse();
    }
    s.args.extend(opts.into_iter().flatten());
    if invalid && g.chance(50) {
        s.args.push(g.word("MATCH"));
    }
}

/// A whole SCAN walk, from cursor 0 to cursor 0 (sometimes an invalid cursor: one call).
fn scan(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    if invalid && g.chance(30) {
        // Never a made-up number: capdb's cursors are server-side handles (an unknown one is
        // `invalid cursor`), Redis's are positions in its hash table.
        let c = *g
            .rng
            .pick(&["abc", "18446744073709551616", " 1", "1x", "+"]);
        return step!(g.name(name), c);
    }
    let mut s = step!(g.name(name), g.cursor_zero());
    scan_options(g, &mut s, invalid);
    if g.chance(25) {
        let t = *g
            .rng
            .pick(&["string", "hash", "list", "set", "zset", "none", "HASH"]);
        s.args.push(g.word("TYPE"));
        s.args.push(t.as_bytes().to_vec());
    }
    s.walk = true;
    s
}

fn keys(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name));
    }
    step!(g.name(name), g.pattern())
}

fn dbsize(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), b"x");
    }
    step!(g.name(name))
}

/// Rare (its weight is 1 among hundreds): emptying the keyspace now and then restarts every
/// collection from its compact encoding.
fn flushdb(g: &mut Gen, name: &str) -> Step {
    step!(g.name(name))
}

fn randomkey(g: &mut Gen, name: &str) -> Step {
    step!(g.name(name))
}

fn rename(g: &mut Gen, name: &str) -> Step {
    if g.invalid() {
        return step!(g.name(name), g.key());
    }
    step!(g.name(name), g.key(), g.key())
}

fn copy(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name), g.key(), g.key());
    if g.chance(40) {
        s.args.push(g.word("REPLACE"));
    }
    if g.invalid() {
        s.args.push(b"FOO".to_vec());
    }
    s
}

fn touch(g: &mut Gen, name: &str) -> Step {
    let mut s = step!(g.name(name));
    let n = g.rng.range(1, 3) as usize;
    s.args.extend(g.keys(n));
    s
}

/// `OBJECT ENCODING|REFCOUNT|FREQ key`, `OBJECT HELP`, and the refused forms. IDLETIME only in
/// its refused forms: capdb keeps no access times (it answers 0, `crates/data/src/keys.rs`),
/// and Redis's answer grows with the seconds since the key was last touched.
fn object(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let sub = match g.rng.below(20) {
        0..=13 => "ENCODING",
        14..=15 => "REFCOUNT",
        16 => "FREQ",
        17 => "HELP",
        _ => "IDLETIME",
    };
    let mut s = step!(g.name(name));
    if invalid && g.chance(20) {
        return s;
    }
    if invalid && g.chance(30) {
        s.args.push(b"FOO".to_vec());
        s.args.push(g.key());
        return s;
    }
    s.args.push(g.word(sub));
    match sub {
        "HELP" if invalid => s.args.push(g.key()),
        "HELP" => {}
        "IDLETIME" if g.chance(50) => {}
        "IDLETIME" => {
            s.args.push(g.key());
            s.args.push(g.key());
        }
        _ if invalid && g.chance(50) => {}
        _ => {
            s.args.push(g.key());
            if invalid {
                s.args.push(g.key());
            }
        }
    }
    s
}

/// DUMP payloads RESTORE draws from (hex): what redis-server 7.0.15's DUMP wrote (plain,
/// integer and LZF strings, a quicklist, an intset, a set, listpack hash and sorted set), what
/// capdb's DUMP writes (types 1, 2, 4 and 5), and three both refuse: a sound footer over an
/// empty hash, RDB version 11, a wrong checksum. DUMP itself is not generated: its bytes
/// legitimately differ (capdb writes other encodings of the same value).
const PAYLOADS: &[&str] = &[
    "000568656c6c6f0a006372df766534200a",
    "00c139300a009d94ea2793fc08b9",
    "00c30e4046016161e03000016263a0020162630a00519758e336b15810",
    "120102171700000005008161028162020101ded402f270110104ff0a00a692bfe23f431b0d",
    "0b100200000004000000f9ff0100020003000a003bfa4a3923b1fa84",
    "02030162016301610a00b294da2e4ecda6fc",
    "1013130000000400816602817602826632037b01ff0a003a4aa3f1de234b6b",
    "111d1d0000000600816302842d696e660581610283312e35048162020201ff0a0017dce91ab8436c89",
    "01030161016201610a0085216ff4adfeafb5",
    "0402026631027631026632c0070a0042dbb07bf32bf470",
    "0502026d31000000000000f83f026d32000000000000f0ff0a000fe486da899b1477",
    "02020178c0050a0053ad149f06124344",
    "04000a00933196c0279295bf",
    "0001760b00f8d773c1e4a76347",
    "0001760a009108ceb219388acf",
];

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect()
}

/// `RESTORE key ttl payload [REPLACE] [ABSTTL] [IDLETIME s | FREQ n]` of a fixed payload:
/// BUSYKEY, the TTL forms (relative at least 100 s, absolute far future or past, which
/// restores nothing), the option errors, and each payload's contents read back by the other
/// families' commands.
fn restore(g: &mut Gen, name: &str) -> Step {
    let hex: &&str = g.rng.pick(PAYLOADS);
    let payload = unhex(hex);
    let absttl = g.chance(25);
    let invalid = g.invalid();
    let ttl = if g.chance(60) {
        b"0".to_vec()
    } else if absttl {
        expiry_value(g, "PXAT", invalid, true)
    } else {
        expiry_value(g, "PX", invalid, false)
    };
    let mut s = step!(g.name(name), g.key(), ttl, payload);
    if g.chance(50) {
        s.args.push(g.word("REPLACE"));
    }
    if absttl {
        s.args.push(g.word("ABSTTL"));
    }
    match g.rng.below(10) {
        0 => {
            s.args.push(g.word("IDLETIME"));
            s.args
                .push(g.rng.pick(&[&b"0"[..], b"100", b"-1"]).to_vec());
        }
        1 => {
            s.args.push(g.word("FREQ"));
            s.args
                .push(g.rng.pick(&[&b"0"[..], b"255", b"256"]).to_vec());
        }
        _ => {}
    }
    if invalid && g.chance(50) {
        s.args.push(b"FOO".to_vec());
    }
    s
}
