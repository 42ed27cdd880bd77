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
        return Err(err(
            "ERR BITOP NOT must be called with a single source key.",
        ));
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
        err(
            "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.",
        )
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

/// Whether `value + incr` overflows the field upwards (1), downwards (-1) or not (0), decided
/// exactly as Redis decides it (`checkSignedBitfieldOverflow`/`checkUnsignedBitfieldOverflow`,
/// wrapping arithmetic included): for a signed field, a SET of a value far below the minimum
/// (such as -2^63 into an `i5`) counts as an overflow *upwards* there, which matters for SAT.
fn overflow_direction(f: &Field, value: i128, incr: i64) -> i8 {
    if f.signed {
        let value = value as i64;
        let max: i64 = if f.bits == 64 {
            i64::MAX
        } else {
            (1i64 << (f.bits - 1)) - 1
        };
        let min = -max - 1;
        let max_incr = (max as u64).wrapping_sub(value as u64) as i64;
        let min_incr = min.wrapping_sub(value);
        let wide = f.bits != 64;
        if value > max || (wide && incr > max_incr) || (value >= 0 && incr > 0 && incr > max_incr) {
            1
        } else if value < min
            || (wide && incr < min_incr)
            || (value < 0 && incr < 0 && incr < min_incr)
        {
            -1
        } else {
            0
        }
    } else {
        let max = (1i128 << f.bits) - 1;
        let sum = value + incr as i128;
        if value > max || sum > max {
            1
        } else if sum < 0 {
            -1
        } else {
            0
        }
    }
}

/// `value + incr` made to fit the field by its overflow policy; `None` for FAIL on overflow.
/// `value` is a SET's argument (an unsigned field takes its 64-bit pattern) or the field's
/// current value (INCRBY).
fn fit(f: &Field, value: i128, incr: i64) -> Option<i128> {
    let span = 1i128 << f.bits;
    let (min, max) = if f.signed {
        (-(span >> 1), (span >> 1) - 1)
    } else {
        (0, span - 1)
    };
    let sum = value + incr as i128;
    let direction = overflow_direction(f, value, incr);
    if direction == 0 {
        return Some(sum);
    }
    match f.overflow {
        Overflow::Fail => None,
        Overflow::Sat => Some(if direction > 0 { max } else { min }),
        Overflow::Wrap => {
            let m = sum.rem_euclid(span);
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
                let v = if f.signed {
                    v as i128
                } else {
                    v as u64 as i128
                };
                (fit(f, v, 0), Some(current))
            }
            FieldOp::IncrBy(by) => {
                let new = fit(f, current, by);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings::tests::{
        NOW, cx, data, deadline_of, error, get, int, ints, run, run_with, set, space,
        with_string_and_hash,
    };

    const OFFSET_ERR: &str = "ERR bit offset is not an integer or out of range";
    const TOO_LONG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

    #[test]
    fn table_is_sorted() {
        assert!(crate::command::sorted(COMMANDS));
    }

    #[test]
    fn setbit_answers_the_previous_bit_and_grows_with_zeros() {
        let mut s = space();
        assert_eq!(run(&mut s, "SETBIT k 7 1").unwrap(), int(0));
        assert_eq!(data(&mut s, "k"), b"\x01");
        assert_eq!(run(&mut s, "SETBIT k 7 0").unwrap(), int(1));
        assert_eq!(run(&mut s, "SETBIT k 7 1").unwrap(), int(0));
        assert_eq!(run(&mut s, "SETBIT k 7 1").unwrap(), int(1));
        assert_eq!(run(&mut s, "SETBIT k 0 1").unwrap(), int(0));
        assert_eq!(data(&mut s, "k"), b"\x81");
        assert_eq!(run(&mut s, "SETBIT k 17 1").unwrap(), int(0));
        assert_eq!(data(&mut s, "k"), b"\x81\x00\x40");
        assert_eq!(run(&mut s, "SETBIT z 3 0").unwrap(), int(0));
        assert_eq!(
            data(&mut s, "z"),
            b"\x00",
            "clearing a bit still creates the key"
        );
    }

    #[test]
    fn setbit_keeps_the_ttl() {
        let mut s = space();
        set(&mut s, "t", b"v", Some(NOW + 100));
        run(&mut s, "SETBIT t 100 1").unwrap();
        assert_eq!(deadline_of(&mut s, "t"), Some(NOW + 100));
        assert_eq!(data(&mut s, "t").len(), 13);
    }

    #[test]
    fn setbit_checks_offset_then_bit_then_type_then_size() {
        let mut s = with_string_and_hash();
        for bad in ["x", "-1", "4294967296", "01"] {
            assert_eq!(error(&mut s, &format!("SETBIT k {bad} 1")), OFFSET_ERR);
        }
        assert_eq!(error(&mut s, "SETBIT h x 1"), OFFSET_ERR);
        let bit_err = "ERR bit is not an integer or out of range";
        for bad in ["2", "-1", "x", "01"] {
            assert_eq!(error(&mut s, &format!("SETBIT k 1 {bad}")), bit_err);
        }
        assert_eq!(error(&mut s, "SETBIT k 4294967295 2"), bit_err);
        assert_eq!(error(&mut s, "SETBIT h 1 1"), "WRONGTYPE");
        // Offsets below 2^32 that would grow the string past the value limit: no allocation.
        assert_eq!(error(&mut s, "SETBIT k 4294967295 1"), TOO_LONG);
        assert_eq!(get(&mut s, "k"), None);
        let max_bit = cx().value_bytes_max as u64 * 8 - 1;
        assert_eq!(
            run(&mut s, &format!("SETBIT k {max_bit} 1")).unwrap(),
            int(0)
        );
        assert_eq!(
            error(&mut s, &format!("SETBIT k {} 1", max_bit + 1)),
            TOO_LONG
        );
    }

    #[test]
    fn getbit_reads_zero_past_the_end() {
        let mut s = with_string_and_hash();
        run(&mut s, "SETBIT k 7 1").unwrap();
        assert_eq!(run(&mut s, "GETBIT k 7").unwrap(), int(1));
        assert_eq!(run(&mut s, "GETBIT k 6").unwrap(), int(0));
        assert_eq!(run(&mut s, "GETBIT k 100").unwrap(), int(0));
        assert_eq!(run(&mut s, "GETBIT k 4294967295").unwrap(), int(0));
        assert_eq!(run(&mut s, "GETBIT nokey 1").unwrap(), int(0));
        assert_eq!(error(&mut s, "GETBIT k 4294967296"), OFFSET_ERR);
        assert_eq!(error(&mut s, "GETBIT k -1"), OFFSET_ERR);
        assert_eq!(error(&mut s, "GETBIT h x"), OFFSET_ERR);
        assert_eq!(error(&mut s, "GETBIT h 0"), "WRONGTYPE");
    }

    #[test]
    fn bitcount_counts_byte_and_bit_ranges() {
        let mut s = with_string_and_hash();
        set(&mut s, "s", b"foobar", None);
        for (cmd, want) in [
            ("BITCOUNT s", 26),
            ("BITCOUNT s 0 0", 4),
            ("BITCOUNT s 1 1", 6),
            ("BITCOUNT s 1 1 byte", 6),
            ("BITCOUNT s 5 30 bit", 17),
            ("BITCOUNT s 5 30 BIT", 17),
            ("BITCOUNT s -3 -1 bit", 1),
            ("BITCOUNT s -100 100", 26),
            ("BITCOUNT s 0 -1 bit", 26),
            ("BITCOUNT s -9223372036854775808 -1 bit", 26),
            ("BITCOUNT s 9223372036854775807 -9223372036854775808 bit", 0),
            // Both negative and reversed: 0 before the unit is even looked at.
            ("BITCOUNT s -1 -2 foo", 0),
            // A missing key is 0 whatever the other arguments.
            ("BITCOUNT nokey 1", 0),
            ("BITCOUNT nokey a b foo x", 0),
        ] {
            assert_eq!(run(&mut s, cmd).unwrap(), int(want), "{cmd}");
        }
        set(&mut s, "e", b"", None);
        assert_eq!(run(&mut s, "BITCOUNT e").unwrap(), int(0));
        assert_eq!(run(&mut s, "BITCOUNT e 0 -1 bit").unwrap(), int(0));
    }

    #[test]
    fn bitcount_errors_follow_redis() {
        let mut s = with_string_and_hash();
        assert_eq!(error(&mut s, "BITCOUNT s 1"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITCOUNT s 0 1 foo"), "ERR syntax error");
        assert_eq!(
            error(&mut s, "BITCOUNT s 0 1 bit extra"),
            "ERR syntax error"
        );
        let not_int = "ERR value is not an integer or out of range";
        assert_eq!(error(&mut s, "BITCOUNT s a 1"), not_int);
        assert_eq!(error(&mut s, "BITCOUNT s 0 a"), not_int);
        assert_eq!(error(&mut s, "BITCOUNT h"), "WRONGTYPE");
        assert_eq!(error(&mut s, "BITCOUNT h 1"), "WRONGTYPE");
    }

    #[test]
    fn bitpos_finds_the_first_set_or_clear_bit() {
        let mut s = space();
        set(&mut s, "s", b"\xff\xf0\x00", None);
        set(&mut s, "f", b"\xff\xff", None);
        set(&mut s, "e", b"", None);
        for (cmd, want) in [
            ("BITPOS s 0", 12),
            ("BITPOS s 1", 0),
            ("BITPOS s 1 1", 8),
            ("BITPOS s 0 0 1", 12),
            ("BITPOS s 1 2 -1 byte", -1),
            ("BITPOS s 1 7 15 bit", 7),
            ("BITPOS s 0 0 11 bit", -1),
            ("BITPOS s 0 0 12 bit", 12),
            ("BITPOS s 0 1 1 bit", -1),
            ("BITPOS s 0 8 11 bit", -1),
            ("BITPOS s 1 12", -1),
            ("BITPOS s 0 3", -1),
            ("BITPOS s 1 -1 -1 bit", -1),
            ("BITPOS s 1 9 10 bit", 9),
            ("BITPOS s 1 11 20 bit", 11),
            // All ones and no explicit end: the first bit past the string.
            ("BITPOS f 0", 16),
            ("BITPOS f 0 0", 16),
            // An explicit end: not found.
            ("BITPOS f 0 0 -1", -1),
            ("BITPOS f 0 0 -1 bit", -1),
            ("BITPOS f 0 3 15 bit", -1),
            ("BITPOS f 0 1 1 byte", -1),
            ("BITPOS f 1 16", -1),
            ("BITPOS f 0 16", -1),
            ("BITPOS f 0 -1 -2", -1),
            ("BITPOS f 0 -1", 16),
            // An empty string has no bits; a missing key is all zeros.
            ("BITPOS e 0", -1),
            ("BITPOS e 1", -1),
            ("BITPOS nokey 0", 0),
            ("BITPOS nokey 1", -1),
            ("BITPOS nokey 0 x", 0),
        ] {
            assert_eq!(run(&mut s, cmd).unwrap(), int(want), "{cmd}");
        }
    }

    #[test]
    fn bitpos_skips_whole_bytes_in_long_strings() {
        let mut s = space();
        let mut v = vec![0u8; 10_000];
        v[9_000] = 0x10;
        set(&mut s, "z", &v, None);
        assert_eq!(run(&mut s, "BITPOS z 1").unwrap(), int(9_000 * 8 + 3));
        assert_eq!(run(&mut s, "BITPOS z 1 72004 -1 bit").unwrap(), int(-1));
        assert_eq!(run(&mut s, "BITPOS z 0 72003 -1 bit").unwrap(), int(72_004));
    }

    #[test]
    fn bitpos_errors_follow_redis_order() {
        let mut s = with_string_and_hash();
        set(&mut s, "f", b"\xff\xff", None);
        let not_int = "ERR value is not an integer or out of range";
        let bit_err = "ERR The bit argument must be 1 or 0.";
        assert_eq!(error(&mut s, "BITPOS nokey 2"), bit_err);
        assert_eq!(error(&mut s, "BITPOS h 2"), bit_err);
        assert_eq!(error(&mut s, "BITPOS nokey x"), not_int);
        assert_eq!(error(&mut s, "BITPOS f 01"), not_int);
        assert_eq!(error(&mut s, "BITPOS h 0"), "WRONGTYPE");
        assert_eq!(error(&mut s, "BITPOS h 0 x"), "WRONGTYPE");
        assert_eq!(error(&mut s, "BITPOS f 0 x"), not_int);
        assert_eq!(error(&mut s, "BITPOS f 0 0 x"), not_int);
        assert_eq!(
            error(&mut s, "BITPOS f 0 3 bit"),
            not_int,
            "the end, not a unit"
        );
        assert_eq!(error(&mut s, "BITPOS f 0 0 1 foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITPOS f 0 x 1 foo"), not_int);
        assert_eq!(error(&mut s, "BITPOS f 0 0 x foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITPOS f 0 0 1 bit x"), "ERR syntax error");
    }

    #[test]
    fn bitop_combines_bytes_treating_short_and_missing_sources_as_zeros() {
        let mut s = space();
        set(&mut s, "a", b"\xff\x0f", None);
        set(&mut s, "b", b"\xf0", None);
        assert_eq!(run(&mut s, "BITOP AND d a b").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\xf0\x00");
        assert_eq!(run(&mut s, "BITOP or d a b").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\xff\x0f");
        assert_eq!(run(&mut s, "BITOP XOR d a b").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\x0f\x0f");
        assert_eq!(run(&mut s, "BITOP XOR d a a a").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\xff\x0f");
        assert_eq!(run(&mut s, "BITOP NOT d a").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\x00\xf0");
        assert_eq!(run(&mut s, "BITOP AND d a nokey").unwrap(), int(2));
        assert_eq!(data(&mut s, "d"), b"\x00\x00");
    }

    #[test]
    fn bitop_replaces_the_destination_and_clears_its_ttl() {
        let mut s = space();
        set(&mut s, "a", b"\xff", None);
        set(&mut s, "d", b"x", Some(NOW + 100));
        run(&mut s, "BITOP AND d a").unwrap();
        assert_eq!(deadline_of(&mut s, "d"), None);
        run(&mut s, "HSET h f v").unwrap();
        assert_eq!(run(&mut s, "BITOP OR h a").unwrap(), int(1));
        assert!(get(&mut s, "h").unwrap().is_string());
        assert!(s.elements.is_empty(), "the hash's fields were reclaimed");
    }

    #[test]
    fn bitop_of_empty_sources_deletes_the_destination() {
        let mut s = space();
        set(&mut s, "d", b"x", None);
        assert_eq!(run(&mut s, "BITOP AND d nokey nokey2").unwrap(), int(0));
        assert_eq!(get(&mut s, "d"), None);
        assert_eq!(run(&mut s, "BITOP NOT d nokey").unwrap(), int(0));
        assert_eq!(get(&mut s, "d"), None);
    }

    #[test]
    fn bitop_errors_follow_redis() {
        let mut s = with_string_and_hash();
        assert_eq!(
            error(&mut s, "BITOP NOT d s s"),
            "ERR BITOP NOT must be called with a single source key."
        );
        assert_eq!(error(&mut s, "BITOP foo d s"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITOP foo d h"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITOP AND d s h"), "WRONGTYPE");
        assert_eq!(error(&mut s, "BITOP NOT d h"), "WRONGTYPE");
        assert_eq!(
            error(&mut s, "BITOP AND d"),
            "ERR wrong number of arguments for 'bitop' command"
        );
        assert_eq!(get(&mut s, "d"), None);
    }

    #[test]
    fn bitop_keys_are_the_destination_and_every_source() {
        let spec = crate::lookup("bitop").unwrap();
        let args: Vec<Bytes> = "BITOP AND d a b"
            .split(' ')
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect();
        assert_eq!(spec.key_indices(&args).unwrap(), vec![2, 3, 4]);
    }

    #[test]
    fn bitfield_set_get_and_incrby_signed_fields() {
        let mut s = space();
        assert_eq!(
            run(&mut s, "BITFIELD k SET i8 0 100 GET i8 0 INCRBY i8 0 100").unwrap(),
            ints(&[0, 100, -56])
        );
        assert_eq!(
            run(&mut s, "BITFIELD k OVERFLOW SAT INCRBY i8 0 100").unwrap(),
            ints(&[44])
        );
        assert_eq!(
            run(&mut s, "BITFIELD k overflow wrap incrby i8 0 100").unwrap(),
            ints(&[-112])
        );
        assert_eq!(
            run(&mut s, "BITFIELD k GET u63 0 GET i64 0").unwrap(),
            ints(&[5_188_146_770_730_811_392, -8_070_450_532_247_928_832])
        );
    }

    #[test]
    fn bitfield_overflow_fail_returns_nil() {
        let mut s = space();
        run(&mut s, "BITFIELD k SET i8 0 100").unwrap();
        assert_eq!(
            run(&mut s, "BITFIELD k OVERFLOW FAIL INCRBY i8 0 100 GET i8 0").unwrap(),
            Reply::Array(vec![Reply::Nil, int(100)])
        );
        assert_eq!(
            run(&mut s, "BITFIELD k OVERFLOW FAIL SET i8 0 200 GET i8 0").unwrap(),
            Reply::Array(vec![Reply::Nil, int(100)])
        );
    }

    #[test]
    fn bitfield_grows_the_string_even_when_every_write_fails() {
        let mut s = space();
        assert_eq!(
            run(&mut s, "BITFIELD n OVERFLOW FAIL SET u8 100 -1").unwrap(),
            Reply::Array(vec![Reply::Nil])
        );
        assert_eq!(data(&mut s, "n"), vec![0u8; 14]);
    }

    #[test]
    fn bitfield_unsigned_set_takes_the_bit_pattern_of_negative_values() {
        let mut s = space();
        for (cmd, want) in [
            (
                "BITFIELD n OVERFLOW SAT SET u8 0 -5 GET u8 0",
                &[0, 255][..],
            ),
            ("BITFIELD n OVERFLOW SAT SET u8 0 300 GET u8 0", &[255, 255]),
            ("BITFIELD n SET u8 0 300 GET u8 0", &[255, 44]),
            ("BITFIELD n SET u8 0 -5 GET u8 0", &[44, 251]),
            ("BITFIELD n SET i8 0 200 GET i8 0", &[-5, -56]),
            (
                "BITFIELD n OVERFLOW SAT SET i8 0 200 GET i8 0 SET i8 0 -200 GET i8 0",
                &[-56, 127, 127, -128],
            ),
            (
                "BITFIELD n SET u4 2 15 GET u8 0 GET u4 2 GET u2 3",
                &[0, 188, 15, 3],
            ),
        ] {
            assert_eq!(run(&mut s, cmd).unwrap(), ints(want), "{cmd}");
        }
    }

    #[test]
    fn bitfield_64_bit_fields_wrap_and_saturate_at_the_extremes() {
        let mut s = space();
        assert_eq!(
            run(
                &mut s,
                "BITFIELD n SET i64 0 -1 GET i64 0 GET u63 0 GET u63 1"
            )
            .unwrap(),
            ints(&[0, -1, i64::MAX, i64::MAX])
        );
        for (cmd, want) in [
            (
                "BITFIELD n OVERFLOW WRAP INCRBY i64 0 -9223372036854775808",
                Some(i64::MAX),
            ),
            (
                "BITFIELD n OVERFLOW SAT INCRBY i64 0 -9223372036854775808",
                Some(-1),
            ),
            (
                "BITFIELD n OVERFLOW FAIL INCRBY i64 0 -9223372036854775808",
                None,
            ),
        ] {
            let want = Reply::Array(vec![want.map_or(Reply::Nil, Reply::Integer)]);
            assert_eq!(run(&mut s, cmd).unwrap(), want, "{cmd}");
        }
        assert_eq!(
            run(
                &mut s,
                "BITFIELD n OVERFLOW SAT INCRBY i64 0 9223372036854775807 INCRBY i64 0 1"
            )
            .unwrap(),
            ints(&[i64::MAX - 1, i64::MAX])
        );
        assert_eq!(
            run(
                &mut s,
                "BITFIELD n OVERFLOW SAT INCRBY u63 0 -9223372036854775808"
            )
            .unwrap(),
            ints(&[0])
        );
        assert_eq!(
            run(&mut s, "BITFIELD n OVERFLOW WRAP INCRBY u63 0 -1").unwrap(),
            ints(&[i64::MAX])
        );
    }

    #[test]
    fn bitfield_sat_of_a_huge_negative_signed_set_saturates_upwards_as_redis_does() {
        // Redis's overflow check wraps when the value is far below the field's minimum, and
        // reports an overflow upwards (found by comparing with redis-server 7.0.15).
        let mut s = space();
        assert_eq!(
            run(
                &mut s,
                "BITFIELD k OVERFLOW SAT SET i5 0 -9223372036854775808 GET i5 0 SET i5 0 -4611686018427387904 GET i5 0"
            )
            .unwrap(),
            ints(&[0, 15, 15, -16])
        );
        assert_eq!(
            run(
                &mut s,
                "BITFIELD k OVERFLOW WRAP SET i5 0 -9223372036854775808 GET i5 0"
            )
            .unwrap(),
            ints(&[-16, 0])
        );
    }

    #[test]
    fn bitfield_hash_offsets_are_multiples_of_the_width() {
        let mut s = space();
        assert_eq!(
            run(
                &mut s,
                "BITFIELD n SET u8 #2 7 GET u8 16 GET u8 #2 GET i64 1000"
            )
            .unwrap(),
            ints(&[0, 7, 7, 0])
        );
        assert_eq!(data(&mut s, "n"), b"\0\0\x07");
    }

    #[test]
    fn bitfield_keeps_the_ttl() {
        let mut s = space();
        set(&mut s, "t", b"v", Some(NOW + 100));
        run(&mut s, "BITFIELD t SET u8 8 1").unwrap();
        assert_eq!(deadline_of(&mut s, "t"), Some(NOW + 100));
    }

    #[test]
    fn bitfield_with_only_gets_is_a_read() {
        let mut s = space();
        assert_eq!(run(&mut s, "BITFIELD nokey GET u8 0").unwrap(), ints(&[0]));
        assert_eq!(run(&mut s, "BITFIELD nokey").unwrap(), ints(&[]));
        assert_eq!(get(&mut s, "nokey"), None);
        let ro = crate::testing::EmptySpace;
        let args: Vec<Bytes> = "BITFIELD_RO k GET u8 0 GET i4 #3"
            .split(' ')
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect();
        let mut ro = ro;
        assert_eq!(
            crate::execute(&args, &mut ro, &cx()).unwrap(),
            ints(&[0, 0])
        );
    }

    #[test]
    fn bitfield_errors_follow_redis_order() {
        let mut s = with_string_and_hash();
        let type_err = "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.";
        for bad in ["u64", "i65", "I8", "u0", "u", "u08", "i-1"] {
            assert_eq!(
                error(&mut s, &format!("BITFIELD k GET {bad} 0")),
                type_err,
                "{bad}"
            );
        }
        for bad in ["-1", "x", "#-1", "4294967296", "#536870912", "#"] {
            assert_eq!(
                error(&mut s, &format!("BITFIELD k GET u8 {bad}")),
                OFFSET_ERR,
                "{bad}"
            );
        }
        assert_eq!(
            run(&mut s, "BITFIELD k GET u8 4294967295").unwrap(),
            ints(&[0])
        );
        assert_eq!(
            run(&mut s, "BITFIELD k GET u8 #536870911").unwrap(),
            ints(&[0])
        );
        for bad in [
            "BITFIELD k OVERFLOW",
            "BITFIELD k GET",
            "BITFIELD k GET u8",
            "BITFIELD k SET u8 0",
            "BITFIELD k foo",
            "BITFIELD k GET u8 0 foo",
            "BITFIELD h foo",
        ] {
            assert_eq!(error(&mut s, bad), "ERR syntax error", "{bad}");
        }
        assert_eq!(
            error(&mut s, "BITFIELD k OVERFLOW foo INCRBY i8 0 1"),
            "ERR Invalid OVERFLOW type specified"
        );
        let not_int = "ERR value is not an integer or out of range";
        assert_eq!(error(&mut s, "BITFIELD k SET u8 0 x"), not_int);
        assert_eq!(error(&mut s, "BITFIELD k INCRBY u8 0 x"), not_int);
        assert_eq!(error(&mut s, "BITFIELD h GET u8 x"), OFFSET_ERR);
        assert_eq!(error(&mut s, "BITFIELD h GET u8 0"), "WRONGTYPE");
        assert_eq!(error(&mut s, "BITFIELD h SET u8 0 1"), "WRONGTYPE");
        assert_eq!(get(&mut s, "k"), None, "nothing was written");
    }

    #[test]
    fn bitfield_ro_refuses_writes_after_parsing_every_argument() {
        let mut s = with_string_and_hash();
        let ro_err = "ERR BITFIELD_RO only supports the GET subcommand";
        assert_eq!(error(&mut s, "BITFIELD_RO k SET u8 0 1"), ro_err);
        assert_eq!(error(&mut s, "BITFIELD_RO h SET u8 0 1"), ro_err);
        assert_eq!(
            error(&mut s, "BITFIELD_RO k SET u8 0 x"),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(error(&mut s, "BITFIELD_RO k foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "BITFIELD_RO h GET u8 0"), "WRONGTYPE");
        assert_eq!(
            run(&mut s, "BITFIELD_RO s GET u8 0").unwrap(),
            ints(&[b'h' as i64])
        );
    }

    #[test]
    fn bitfield_growth_is_bounded_by_the_value_limit() {
        let mut s = space();
        let small = Ctx {
            value_bytes_max: 4,
            ..cx()
        };
        assert_eq!(
            run_with(&mut s, "BITFIELD k SET u8 24 1", &small).unwrap(),
            ints(&[0])
        );
        assert_eq!(
            run_with(&mut s, "BITFIELD k SET u8 25 1", &small),
            Err(too_long())
        );
        assert_eq!(
            run_with(&mut s, "BITFIELD k SET i64 4294967295 1", &cx()),
            Err(too_long())
        );
        assert_eq!(data(&mut s, "k"), b"\0\0\0\x01");
    }
}
