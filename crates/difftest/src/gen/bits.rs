//! Bitmaps and bit fields over strings: SETBIT, GETBIT, BITCOUNT and BITPOS (with BYTE/BIT
//! ranges), BITOP over several keys, BITFIELD with every type, offset form and overflow mode,
//! and BITFIELD_RO.
//!
//! Writes stay near the start of a string (SETBIT below bit 2048, BITFIELD below bit 500), so
//! values stay short and every other string command keeps working on them; reads also go far
//! past the end (bits there read as 0), and the refused offsets (negative, 2^32) are asked.

use super::{CommandGen, Family, Gen, Step};
use crate::step;

pub const FAMILY: Family = Family {
    name: "bits",
    home: (2, 6),
    weight: 12,
    commands: &[
        CommandGen {
            name: "setbit",
            weight: 10,
            make: setbit,
        },
        CommandGen {
            name: "getbit",
            weight: 6,
            make: getbit,
        },
        CommandGen {
            name: "bitcount",
            weight: 6,
            make: bitcount,
        },
        CommandGen {
            name: "bitpos",
            weight: 6,
            make: bitpos,
        },
        CommandGen {
            name: "bitop",
            weight: 5,
            make: bitop,
        },
        CommandGen {
            name: "bitfield",
            weight: 10,
            make: bitfield,
        },
        CommandGen {
            name: "bitfield_ro",
            weight: 3,
            make: bitfield,
        },
    ],
};

/// A bit offset to write: mostly within the first bytes.
fn write_offset(g: &mut Gen) -> Vec<u8> {
    match g.rng.below(10) {
        0..=5 => g.rng.range(0, 63),
        6..=8 => g.rng.range(0, 400),
        _ => g.rng.range(0, 2047),
    }
    .to_string()
    .into_bytes()
}

/// A refused bit offset.
fn bad_offset(g: &mut Gen) -> Vec<u8> {
    g.rng
        .pick(&["-1", "abc", "4294967296", "1.5", "", "99999999999999999999"])
        .as_bytes()
        .to_vec()
}

fn setbit(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let offset = if invalid && g.chance(50) {
        bad_offset(g)
    } else {
        write_offset(g)
    };
    let bit = if invalid && g.chance(60) {
        g.rng.pick(&["2", "-1", "abc", ""]).as_bytes().to_vec()
    } else {
        g.rng.pick(&["0", "1", "1"]).as_bytes().to_vec()
    };
    if invalid && g.chance(15) {
        return step!(g.name(name), g.key(), offset);
    }
    step!(g.name(name), g.key(), offset, bit)
}

fn getbit(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let offset = if invalid {
        bad_offset(g)
    } else if g.chance(10) {
        g.rng
            .pick(&["4294967295", "100000", "8000"])
            .as_bytes()
            .to_vec()
    } else {
        write_offset(g)
    };
    step!(g.name(name), g.key(), offset)
}

/// A BITCOUNT/BITPOS range end: small, either sign, sometimes far out.
fn range_end(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g.bad_int();
    }
    match g.rng.below(10) {
        0 => g
            .rng
            .pick(&["100", "-100", "9223372036854775807", "-9223372036854775808"])
            .as_bytes()
            .to_vec(),
        _ => g.rng.range(-12, 12).to_string().into_bytes(),
    }
}

/// A range unit: BYTE or BIT, or a refused word.
fn unit(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(40) {
        return b"BITS".to_vec();
    }
    let u = *g.rng.pick(&["BYTE", "BIT"]);
    g.word(u)
}

/// `BITCOUNT key [start end [BYTE|BIT]]`, and a lone start (a syntax error).
fn bitcount(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let mut s = step!(g.name(name), g.key());
    let parts = if invalid {
        g.rng.range(1, 4)
    } else {
        *g.rng.pick(&[0, 2, 2, 3])
    };
    if parts >= 1 {
        s.args.push(range_end(g, invalid));
    }
    if parts >= 2 {
        s.args.push(range_end(g, false));
    }
    if parts >= 3 {
        s.args.push(unit(g, invalid));
    }
    if parts >= 4 {
        s.args.push(b"x".to_vec());
    }
    s
}

/// `BITPOS key bit [start [end [BYTE|BIT]]]`.
fn bitpos(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let bit = if invalid && g.chance(40) {
        g.rng.pick(&["2", "-1", "abc"]).as_bytes().to_vec()
    } else {
        g.rng.pick(&["0", "1"]).as_bytes().to_vec()
    };
    let mut s = step!(g.name(name), g.key(), bit);
    let parts = if invalid {
        g.rng.range(0, 4)
    } else {
        g.rng.range(0, 3)
    };
    if parts >= 1 {
        s.args.push(range_end(g, invalid));
    }
    if parts >= 2 {
        s.args.push(range_end(g, false));
    }
    if parts >= 3 {
        s.args.push(unit(g, invalid));
    }
    if parts >= 4 {
        s.args.push(b"x".to_vec());
    }
    s
}

/// `BITOP AND|OR|XOR|NOT destkey key [key ...]`: one to four sources (NOT takes exactly one).
fn bitop(g: &mut Gen, name: &str) -> Step {
    let invalid = g.invalid();
    let op = if invalid && g.chance(40) {
        b"NAND".to_vec()
    } else {
        let o = *g.rng.pick(&["AND", "OR", "XOR", "NOT"]);
        g.word(o)
    };
    let not = op.eq_ignore_ascii_case(b"NOT");
    let n = if not && !(invalid && g.chance(50)) {
        1
    } else {
        g.rng.range(1, 4)
    };
    let mut s = step!(g.name(name), op, g.key());
    if invalid && g.chance(20) {
        return s;
    }
    for _ in 0..n {
        s.args.push(g.key());
    }
    s
}

/// A BITFIELD type: signed widths 1 to 64, unsigned 1 to 63; or a refused one.
fn field_type(g: &mut Gen, invalid: bool) -> (Vec<u8>, u32) {
    if invalid {
        let t = *g
            .rng
            .pick(&["u64", "i65", "i0", "u0", "x8", "8", "i", "I8"]);
        return (t.as_bytes().to_vec(), 8);
    }
    let w = *g.rng.pick(&[
        1u32, 2, 3, 4, 5, 7, 8, 8, 9, 15, 16, 16, 17, 31, 32, 33, 63, 64,
    ]);
    let signed = w == 64 || g.chance(50);
    let t = format!("{}{w}", if signed { "i" } else { "u" });
    (t.into_bytes(), w)
}

/// A BITFIELD offset: a bit number or `#n` (n times the type's width).
fn field_offset(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g
            .rng
            .pick(&["-1", "abc", "#-1", "#", "##1", "4294967296", "#x"])
            .as_bytes()
            .to_vec();
    }
    if g.chance(30) {
        format!("#{}", g.rng.range(0, 5)).into_bytes()
    } else {
        g.rng.range(0, 100).to_string().into_bytes()
    }
}

/// A BITFIELD value or increment: small, at the edges of the common widths, or the 64-bit
/// extremes.
fn field_value(g: &mut Gen, invalid: bool) -> Vec<u8> {
    if invalid && g.chance(50) {
        return g.bad_int();
    }
    match g.rng.below(10) {
        0..=4 => g.rng.range(-20, 20).to_string().into_bytes(),
        5..=7 => g
            .rng
            .pick(&[
                "127",
                "128",
                "-128",
                "-129",
                "255",
                "256",
                "32767",
                "-32768",
                "65535",
                "65536",
                "2147483647",
                "-2147483648",
                "4294967295",
            ])
            .as_bytes()
            .to_vec(),
        _ => g
            .rng
            .pick(&[
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775806",
                "4611686018427387904",
            ])
            .as_bytes()
            .to_vec(),
    }
}

/// `BITFIELD key [GET type offset] [SET type offset value] [INCRBY type offset increment]
/// [OVERFLOW WRAP|SAT|FAIL] ...` (one to four operations; OVERFLOW anywhere, even last), and
/// BITFIELD_RO with GETs (a write is its error).
fn bitfield(g: &mut Gen, name: &str) -> Step {
    let ro = name == "bitfield_ro";
    let invalid = g.invalid();
    let mut s = step!(g.name(name), g.key());
    let ops = g.rng.range(if ro { 0 } else { 1 }, 4);
    for i in 0..ops {
        let bad_here = invalid && g.chance(40);
        let which = if ro && !bad_here { 0 } else { g.rng.below(10) };
        match which {
            0..=2 => {
                let bad_type = bad_here && g.chance(50);
                let (t, _) = field_type(g, bad_type);
                s.args.push(g.word("GET"));
                s.args.push(t);
                s.args.push(field_offset(g, bad_here));
            }
            3..=5 => {
                let bad_type = bad_here && g.chance(50);
                let (t, _) = field_type(g, bad_type);
                s.args.push(g.word("SET"));
                s.args.push(t);
                s.args.push(field_offset(g, bad_here));
                s.args.push(field_value(g, bad_here));
            }
            6..=7 => {
                let bad_type = bad_here && g.chance(50);
                let (t, _) = field_type(g, bad_type);
                s.args.push(g.word("INCRBY"));
                s.args.push(t);
                s.args.push(field_offset(g, bad_here));
                s.args.push(field_value(g, bad_here));
            }
            _ => {
                s.args.push(g.word("OVERFLOW"));
                let m = if bad_here {
                    "SATURATE"
                } else {
                    g.rng.pick(&["WRAP", "SAT", "FAIL"])
                };
                s.args.push(g.word(m));
            }
        }
        if bad_here && i + 1 == ops && g.chance(30) {
            // A truncated operation.
            s.args.pop();
        }
    }
    if invalid && g.chance(20) {
        s.args.push(g.word("FOO"));
    }
    s
}
