//! Bitmaps and bit fields over strings: SETBIT, GETBIT, BITCOUNT, BITPOS, BITOP, BITFIELD and
//! BITFIELD_RO, with Redis 7's replies, errors and order of checks.
//!
//! A bitmap is a string (one top-level record, see [`crate::strings`]); bit 0 is the most
//! significant bit of the first byte, and bits past the end read as 0. Writes that grow the
//! string pad it with zero bytes, keep its TTL, and are bounded twice: an offset must be below
//! 2^32 (Redis's default `proto-max-bulk-len` of 512 MB, in bits), checked before anything is
//! read, and the grown string must fit `value_bytes_max` (Redis's `proto-max-bulk-len` error),
//! checked before anything is allocated.

use bytes::Bytes;
use capdb_types::{Reply, Result, Value};

use crate::command::{Ctx, Keys, Run, Spec, err, int_arg, syntax};
use crate::format::parse_int;
use crate::space::Space;
use crate::strings::{get_string, too_long};

const KEY: Keys = Keys::Range(1, 1, 1);

/// Redis's default `proto-max-bulk-len`: bit offsets address at most this many bytes.
const PROTO_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "bitcount",    arity: -2, flags: &["readonly"], keys: KEY, run: Run::Read(bitcount) },
    Spec { name: "bitfield",    arity: -2, flags: &["write", "denyoom"], keys: KEY, run: Run::Write(bitfield) },
    Spec { name: "bitfield_ro", arity: -2, flags: &["readonly", "fast"], keys: KEY, run: Run::Read(bitfield_ro) },
    Spec { name: "bitop",       arity: -4, flags: &["write", "denyoom"], keys: Keys::Range(2, -1, 1), run: Run::Write(bitop) },
    Spec { name: "bitpos",      arity: -3, flags: &["readonly"], keys: KEY, run: Run::Read(bitpos) },
    Spec { name: "getbit",      arity: 3,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(getbit) },
    Spec { name: "setbit",      arity: 4,  flags: &["write", "denyoom"], keys: KEY, run: Run::Write(setbit) },
];

/// A bit offset argument (`getBitOffsetFromArgument`): a non-negative integer addressing a
/// byte below [`PROTO_MAX_BULK_LEN`]; with `width` (BITFIELD), `#n` means `n * width`.
fn bit_offset(raw: &[u8], width: Option<u32>) -> Result<u64> {
    let bad = || err("ERR bit offset is not an integer or out of range");
    let (digits, mul) = match width {
        Some(w) if raw.first() == Some(&b'#') => (&raw[1..], w as i64),
        _ => (raw, 1),
    };
    let n = parse_int(digits)
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(bad)?;
    if n < 0 || (n as u64 >> 3) >= PROTO_MAX_BULK_LEN {
        return Err(bad());
    }
    Ok(n as u64)
}

fn bit_at(data: &[u8], offset: u64) -> u8 {
    data.get((offset >> 3) as usize)
        .map_or(0, |b| (b >> (7 - (offset & 7))) & 1)
}

fn set_bit_at(data: &mut [u8], offset: u64, on: bool) {
    let byte = &mut data[(offset >> 3) as usize];
    let mask = 1u8 << (7 - (offset & 7));
    *byte = if on { *byte | mask } else { *byte & !mask };
}

/// Grows `data` with zero bytes to hold bit `offset`, within `value_bytes_max`; whether it grew.
fn grow_for_bit(data: &mut Vec<u8>, offset: u64, cx: &Ctx) -> Result<bool> {
    let needed = (offset >> 3) + 1;
    if needed <= data.len() as u64 {
        return Ok(false);
    }
    if needed > cx.value_bytes_max as u64 {
        return Err(too_long());
    }
    data.resize(needed as usize, 0);
    Ok(true)
}

/// `SETBIT key offset 0|1`: the bit's previous value. The TTL is kept.
fn setbit(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let offset = bit_offset(&args[2], None)?;
    let on = parse_int(&args[3])
        .filter(|b| *b == 0 || *b == 1)
        .ok_or_else(|| err("ERR bit is not an integer or out of range"))? as u8;
    let old = get_string(space, &args[1])?;
    let mut data = old.as_ref().map_or_else(Vec::new, |v| v.data.to_vec());
    let grew = grow_for_bit(&mut data, offset, cx)?;
    let was = bit_at(&data, offset);
    if old.is_none() || grew || was != on {
        set_bit_at(&mut data, offset, on == 1);
        let expire = old.and_then(|v| v.header.expire_at_ms);
        space.put(
            &args[1],
            Value::new(Bytes::from(data), cx.timestamp, expire),
        )?;
    }
    Ok(Reply::Integer(was as i64))
}

/// `GETBIT key offset`: 0 past the end and for a missing key.
fn getbit(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let offset = bit_offset(&args[2], None)?;
    let bit = get_string(space, &args[1])?.map_or(0, |v| bit_at(&v.data, offset));
    Ok(Reply::Integer(bit as i64))
}

/// A `start end [BYTE|BIT]` range normalised as Redis does (negative offsets from the end,
/// clamped to the string), as inclusive bit positions; `None` when empty.
fn bit_range(start: i64, end: i64, strlen: usize, in_bits: bool) -> Option<(u64, u64)> {
    let total = if in_bits {
        strlen as i64 * 8
    } else {
        strlen as i64
    };
    let norm = |x: i64| if x < 0 { total + x } else { x }.max(0);
    let start = norm(start);
    let end = norm(end).min(total - 1);
    if start > end {
        return None;
    }
    let (start, end) = (start as u64, end as u64);
    Some(if in_bits {
        (start, end)
    } else {
        (start * 8, end * 8 + 7)
    })
}

/// `BYTE` or `BIT`, case-insensitive (a syntax error otherwise).
fn unit_is_bit(raw: &[u8]) -> Result<bool> {
    if raw.eq_ignore_ascii_case(b"BIT") {
        Ok(true)
    } else if raw.eq_ignore_ascii_case(b"BYTE") {
        Ok(false)
    } else {
        Err(syntax())
    }
}

/// `BITCOUNT key [start end [BYTE|BIT]]`: the number of set bits (0 for a missing key, whatever
/// the other arguments).
fn bitcount(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(v) = get_string(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let data = &v.data[..];
    let range = match args.len() {
        2 => bit_range(0, -1, data.len(), false),
        4 | 5 => {
            let start = int_arg(args, 2)?;
            let end = int_arg(args, 3)?;
            if start < 0 && end < 0 && start > end {
                return Ok(Reply::Integer(0));
            }
            let in_bits = args.len() == 5 && unit_is_bit(&args[4])?;
            bit_range(start, end, data.len(), in_bits)
        }
        _ => return Err(syntax()),
    };
    let Some((lo, hi)) = range else {
        return Ok(Reply::Integer(0));
    };
    let (first, last) = ((lo >> 3) as usize, (hi >> 3) as usize);
    let mut count: u64 = data[first..=last]
        .iter()
        .map(|b| b.count_ones() as u64)
        .sum();
    // Take away the bits of the edge bytes that lie outside the range.
    count -= (data[first] & !(0xffu8 >> (lo & 7))).count_ones() as u64;
    count -= (data[last] & (0xffu16 >> ((hi & 7) + 1)) as u8).count_ones() as u64;
    Ok(Reply::Integer(count as i64))
}

/// The first bit equal to `bit` in the inclusive bit range.
fn first_bit(data: &[u8], lo: u64, hi: u64, bit: u8) -> Option<u64> {
    let skip = if bit == 1 { 0x00 } else { 0xff };
    let mut i = lo;
    while i <= hi {
        if i & 7 == 0 && i + 7 <= hi && data[(i >> 3) as usize] == skip {
            i += 8;
            continue;
        }
        if bit_at(data, i) == bit {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// `BITPOS key 0|1 [start [end [BYTE|BIT]]]`: the first bit set (or clear) in the range, or
/// -1. A missing key is all zeros; looking for a 0 without an explicit end finds the first bit
/// past the string when the range is all ones.
fn bitpos(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let bit = int_arg(args, 2)?;
    if bit != 0 && bit != 1 {
        return Err(err("ERR The bit argument must be 1 or 0."));
    }
    let Some(v) = get_string(space, &args[1])? else {
        return Ok(Reply::Integer(if bit == 1 { -1 } else { 0 }));
    };
    let data = &v.data[..];
    let (range, end_given) = match args.len() {
        3 => (bit_range(0, -1, data.len(), false), false),
        4..=6 => {
            let start = int_arg(args, 3)?;
            let in_bits = args.len() == 6 && unit_is_bit(&args[5])?;
            let (end, given) = if args.len() >= 5 {
                (int_arg(args, 4)?, true)
            } else {
                (-1, false)
            };
            (bit_range(start, end, data.len(), in_bits), given)
        }
        _ => return Err(syntax()),
    };
    let Some((lo, hi)) = range else {
        return Ok(Reply::Integer(-1));
    };
    Ok(Reply::Integer(match first_bit(data, lo, hi, bit as u8) {
        Some(pos) => pos as i64,
        None if bit == 1 || end_given => -1,
        None => hi as i64 + 1,
    }))
}

/// `BITOP AND|OR|XOR|NOT destkey key [key ...]`: stores the bytewise result (missing keys and
/// the short ends of shorter strings are zeros) at `destkey`, replacing whatever it held and
/// clearing its TTL; deletes `destkey` when every source is empty. The result's length.
fn bitop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let op = args[1].to_ascii_uppercase();
    let fold: fn(u8, u8) -> u8 = match &op[..] {
        b"AND" => |a, b| a & b,
        b"OR" => |a, b| a | b,
        b"XOR" => |a, b| a ^ b,
        b"NOT" => |a, _| a,
        _ => return Err(syntax()),
    };
    let not = &op[..] == b"NOT";
    if not && args.len() != 4 {
        return Err(err("ERR BITOP NOT must be called with a single source key."));
    }
    let mut sources = Vec::with_capacity(args.len() - 3);
    for key in &args[3..] {
        sources.push(get_string(space, key)?.map(|v| v.data).unwrap_or_default());
    }
    let len = sources.iter().map(|s| s.len()).max().unwrap_or(0);
    let dest = &args[2];
    if len == 0 {
        if space.get(dest)?.is_some() {
            space.remove(dest)?;
        }
        return Ok(Reply::Integer(0));
    }
    let byte = |s: &Bytes, i: usize| s.get(i).copied().unwrap_or(0);
    let out: Vec<u8> = (0..len)
        .map(|i| {
            let first = byte(&sources[0], i);
            if not {
                return !first;
            }
            sources[1..]
                .iter()
                .fold(first, |acc, s| fold(acc, byte(s, i)))
        })
        .collect();
    space.put(dest, Value::new(Bytes::from(out), cx.timestamp, None))?;
    Ok(Reply::Integer(len as i64))
}

// ---------------------------------------------------------------------------------------------
// BITFIELD

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    Wrap,
    Sat,
    Fail,
}

#[derive(Debug, Clone, Copy)]
enum FieldOp {
    Get,
    Set(i64),
    IncrBy(i64),
}

#[derive(Debug, Clone, Copy)]
struct Field {
    op: FieldOp,
    signed: bool,
    bits: u32,
    offset: u64,
    overflow: Overflow,
}

/// A bit field type: `i1`..`i64` or `u1`..`u63` (lowercase, as Redis requires).
fn field_type(raw: &[u8]) -> Result<(bool, u32)> {
    let bad = || {
        err("ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.")
    };
    let signed = match raw.first() {
        Some(b'i') => true,
        Some(b'u') => false,
        _ => return Err(bad()),
    };
    let bits = parse_int(&raw[1..]).ok_or_else(bad)?;
    if bits < 1 || bits > if signed { 64 } else { 63 } {
        return Err(bad());
    }
    Ok((signed, bits as u32))
}

/// The sub-commands of a BITFIELD, parsed and checked in order (Redis reports the first bad
/// argument before looking at the key).
fn parse_fields(args: &[Bytes]) -> Result<Vec<Field>> {
    let mut fields = Vec::new();
    let mut overflow = Overflow::Wrap;
    let mut j = 2;
    while j < args.len() {
        let rest = args.len() - j - 1;
        let sub = args[j].to_ascii_uppercase();
        let takes = match &sub[..] {
            b"GET" if rest >= 2 => 2,
            b"SET" | b"INCRBY" if rest >= 3 => 3,
            b"OVERFLOW" if rest >= 1 => {
                let kind = &args[j + 1];
                overflow = if kind.eq_ignore_ascii_case(b"WRAP") {
                    Overflow::Wrap
                } else if kind.eq_ignore_ascii_case(b"SAT") {
                    Overflow::Sat
                } else if kind.eq_ignore_ascii_case(b"FAIL") {
                    Overflow::Fail
                } else {
                    return Err(err("ERR Invalid OVERFLOW type specified"));
                };
                j += 2;
                continue;
            }
            _ => return Err(syntax()),
        };
        let (signed, bits) = field_type(&args[j + 1])?;
        let offset = bit_offset(&args[j + 2], Some(bits))?;
        let op = match &sub[..] {
            b"GET" => FieldOp::Get,
            b"SET" => FieldOp::Set(int_arg(args, j + 3)?),
            _ => FieldOp::IncrBy(int_arg(args, j + 3)?),
        };
        fields.push(Field {
            op,
            signed,
            bits,
            offset,
            overflow,
        });
        j += 1 + takes;
    }
    Ok(fields)
}

/// The field's value as its type reads it (bits past the end read as 0).
fn field_value(data: &[u8], f: &Field) -> i128 {
    let raw = (0..f.bits as u64).fold(0u64, |v, i| (v << 1) | bit_at(data, f.offset + i) as u64);
    if f.signed && (raw >> (f.bits - 1)) & 1 == 1 {
        raw as i128 - (1i128 << f.bits)
    } else {
        raw as i128
    }
}

/// Writes the low `bits` bits of `value`; `data` holds the field (the caller grew it).
fn write_field(data: &mut [u8], f: &Field, value: i128) {
    let value = value as u64;
    for i in 0..f.bits as u64 {
        set_bit_at(
            data,
            f.offset + i,
            (value >> (f.bits as u64 - 1 - i)) & 1 == 1,
        );
    }
}

/// `value` made to fit the field by its overflow policy; `None` for FAIL on overflow.
fn fit(value: i128, f: &Field) -> Option<i128> {
    let span = 1i128 << f.bits;
    let (min, max) = if f.signed {
        (-(span >> 1), (span >> 1) - 1)
    } else {
        (0, span - 1)
    };
    if (min..=max).contains(&value) {
        return Some(value);
    }
    match f.overflow {
        Overflow::Fail => None,
        Overflow::Sat => Some(if value > max { max } else { min }),
        Overflow::Wrap => {
            let m = value.rem_euclid(span);
            Some(if f.signed && m > max { m - span } else { m })
        }
    }
}

/// `BITFIELD key [GET type offset] [SET type offset value] [INCRBY type offset increment]
/// [OVERFLOW WRAP|SAT|FAIL] ...`: one reply per GET/SET/INCRBY (SET: the old value, INCRBY:
/// the new one; nil when OVERFLOW FAIL refused it). An offset `#n` is n times the width.
fn bitfield(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    bitfield_generic(args, space, cx, false)
}

/// `BITFIELD_RO key [GET type offset] ...`: BITFIELD with GET only.
fn bitfield_ro(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    bitfield_generic(args, space, cx, true)
}

fn bitfield_generic(
    args: &[Bytes],
    space: &mut dyn Space,
    cx: &Ctx,
    read_only: bool,
) -> Result<Reply> {
    let fields = parse_fields(args)?;
    let highest = fields
        .iter()
        .filter(|f| !matches!(f.op, FieldOp::Get))
        .map(|f| f.offset + f.bits as u64 - 1)
        .max();
    let Some(highest) = highest else {
        // Only GETs: a read, which never creates the key.
        let data = get_string(space, &args[1])?.map(|v| v.data);
        let data = data.as_deref().unwrap_or_default();
        return Ok(Reply::Array(
            fields
                .iter()
                .map(|f| Reply::Integer(field_value(data, f) as i64))
                .collect(),
        ));
    };
    if read_only {
        return Err(err("ERR BITFIELD_RO only supports the GET subcommand"));
    }
    let old = get_string(space, &args[1])?;
    let mut data = old.as_ref().map_or_else(Vec::new, |v| v.data.to_vec());
    // As in Redis, the string grows to the farthest write before any runs, even if OVERFLOW
    // FAIL then refuses every write.
    let mut changed = grow_for_bit(&mut data, highest, cx)? || old.is_none();
    let mut replies = Vec::with_capacity(fields.len());
    for f in &fields {
        let current = field_value(&data, f);
        let (new, reply) = match f.op {
            FieldOp::Get => {
                replies.push(Reply::Integer(current as i64));
                continue;
            }
            FieldOp::Set(v) => {
                // An unsigned field takes the 64-bit pattern of a negative value, as Redis.
                let v = if f.signed { v as i128 } else { v as u64 as i128 };
                (fit(v, f), Some(current))
            }
            FieldOp::IncrBy(by) => {
                let new = fit(current + by as i128, f);
                (new, new)
            }
        };
        match (new, reply) {
            (Some(new), Some(reply)) => {
                replies.push(Reply::Integer(reply as i64));
                if new != current {
                    write_field(&mut data, f, new);
                    changed = true;
                }
            }
            _ => replies.push(Reply::Nil),
        }
    }
    if changed {
        let expire = old.and_then(|v| v.header.expire_at_ms);
        space.put(
            &args[1],
            Value::new(Bytes::from(data), cx.timestamp, expire),
        )?;
    }
    Ok(Reply::Array(replies))
}
