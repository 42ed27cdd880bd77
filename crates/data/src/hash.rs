//! Hashes: HSET, HGET, HINCRBY, HSCAN and the rest, with Redis 7's replies and errors.
//!
//! A field is the element `0 ‖ hash(field) ‖ field` (see [`crate::meta::hashed_sub`]) holding
//! the field's value, so HGET/HSET/HDEL touch one element and HSCAN pages in hash order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, int_arg, syntax, wrong_args};
use crate::format::{format_long_double_human, parse_double, parse_int};
use crate::meta::{Open, finish, hashed_sub, member_of_hashed, open, open_or_create};
use crate::rng::Rng;
use crate::scan;
use crate::space::{ElRange, Space};

const FIELD: u8 = 0;

/// TESTING ONLY (`capdb server --debug-plant-difference`, set once at start): HLEN answers one
/// more than the truth when the hash has exactly 3 fields, a planted difference the
/// differential tester (`capdb difftest`) must find. Never set otherwise.
pub static PLANT_DIFFERENCE: AtomicBool = AtomicBool::new(false);
/// Redis's `hash-max-listpack-entries` and `hash-max-listpack-value` defaults: past either, Redis
/// converts the hash to a hashtable (for good).
const LISTPACK_ENTRIES: u64 = 128;
const LISTPACK_VALUE: usize = 64;

const KEY: Keys = Keys::Range(1, 1, 1);
const W: &[&str] = &["write", "denyoom", "fast"];
const R: &[&str] = &["readonly", "fast"];

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "hdel",         arity: -3, flags: &["write", "fast"], keys: KEY, run: Run::Write(hdel) },
    Spec { name: "hexists",      arity: 3,  flags: R, keys: KEY, run: Run::Read(hexists) },
    Spec { name: "hget",         arity: 3,  flags: R, keys: KEY, run: Run::Read(hget) },
    Spec { name: "hgetall",      arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hgetall) },
    Spec { name: "hincrby",      arity: 4,  flags: W, keys: KEY, run: Run::Write(hincrby) },
    Spec { name: "hincrbyfloat", arity: 4,  flags: W, keys: KEY, run: Run::Write(hincrbyfloat) },
    Spec { name: "hkeys",        arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hkeys) },
    Spec { name: "hlen",         arity: 2,  flags: R, keys: KEY, run: Run::Read(hlen) },
    Spec { name: "hmget",        arity: -3, flags: R, keys: KEY, run: Run::Read(hmget) },
    Spec { name: "hmset",        arity: -4, flags: W, keys: KEY, run: Run::Write(hmset) },
    Spec { name: "hrandfield",   arity: -2, flags: &["readonly"], keys: KEY, run: Run::Read(hrandfield) },
    Spec { name: "hscan",        arity: -3, flags: &["readonly"], keys: KEY, run: Run::Read(hscan) },
    Spec { name: "hset",         arity: -4, flags: W, keys: KEY, run: Run::Write(hset) },
    Spec { name: "hsetnx",       arity: 4,  flags: W, keys: KEY, run: Run::Write(hsetnx) },
    Spec { name: "hstrlen",      arity: 3,  flags: R, keys: KEY, run: Run::Read(hstrlen) },
    Spec { name: "hvals",        arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hvals) },
];

fn open_hash(space: &mut dyn Space, key: &Bytes) -> Result<Option<Open>> {
    open(space, key, ValueKind::Hash)
}

fn get_field(space: &mut dyn Space, h: &Open, field: &[u8]) -> Result<Option<Bytes>> {
    space.el_get(&h.coll, &hashed_sub(FIELD, field))
}

/// Sets a field; returns whether it is new.
fn set_field(space: &mut dyn Space, h: &mut Open, field: &[u8], value: &[u8]) -> Result<bool> {
    let sub = hashed_sub(FIELD, field);
    let new = space.el_insert(&h.coll, &sub, value)?;
    if new {
        h.meta.len += 1;
    }
    if h.meta.len > LISTPACK_ENTRIES || field.len() > LISTPACK_VALUE || value.len() > LISTPACK_VALUE
    {
        h.meta.big = true;
    }
    Ok(new)
}

fn all_fields(space: &mut dyn Space, h: &Open) -> Result<Vec<(Bytes, Bytes)>> {
    space
        .el_range(&h.coll, ElRange::prefixed(&[FIELD], &[FIELD + 1]))?
        .into_iter()
        .map(|(sub, v)| Ok((member_of_hashed(&sub)?, v)))
        .collect()
}

fn pairs_arity(args: &[Bytes]) -> Result<()> {
    if !args.len().is_multiple_of(2) {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        return Err(wrong_args(&name));
    }
    Ok(())
}

/// Sets each pair; the number of new fields.
fn set_pairs(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<i64> {
    pairs_arity(args)?;
    let mut h = open_or_create(space, &args[1], ValueKind::Hash)?;
    let mut added = 0;
    for pair in args[2..].chunks(2) {
        added += set_field(space, &mut h, &pair[0], &pair[1])? as i64;
    }
    finish(space, &h, cx)?;
    Ok(added)
}

/// `HSET key field value [field value ...]`: the number of fields added.
fn hset(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    set_pairs(args, space, cx).map(Reply::Integer)
}

/// `HMSET key field value [field value ...]`: OK.
fn hmset(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    set_pairs(args, space, cx).map(|_| Reply::Ok)
}

/// `HSETNX key field value`: 1 when set, 0 when the field existed.
fn hsetnx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut h = open_or_create(space, &args[1], ValueKind::Hash)?;
    if get_field(space, &h, &args[2])?.is_some() {
        return Ok(Reply::Integer(0));
    }
    set_field(space, &mut h, &args[2], &args[3])?;
    finish(space, &h, cx)?;
    Ok(Reply::Integer(1))
}

/// `HGET key field`.
fn hget(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Nil);
    };
    Ok(get_field(space, &h, &args[2])?.map_or(Reply::Nil, Reply::Bulk))
}

/// `HMGET key field [field ...]`.
fn hmget(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let h = open_hash(space, &args[1])?;
    let mut out = Vec::with_capacity(args.len() - 2);
    for f in &args[2..] {
        out.push(match &h {
            Some(h) => get_field(space, h, f)?.map_or(Reply::Nil, Reply::Bulk),
            None => Reply::Nil,
        });
    }
    Ok(Reply::Array(out))
}

/// `HGETALL key`: a map of fields to values.
fn hgetall(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Map(Vec::new()));
    };
    Ok(Reply::Map(
        all_fields(space, &h)?
            .into_iter()
            .map(|(f, v)| (Reply::Bulk(f), Reply::Bulk(v)))
            .collect(),
    ))
}

/// `HKEYS key`.
fn hkeys(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Array(Vec::new()));
    };
    Ok(Reply::Array(
        all_fields(space, &h)?
            .into_iter()
            .map(|(f, _)| Reply::Bulk(f))
            .collect(),
    ))
}

/// `HVALS key`.
fn hvals(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Array(Vec::new()));
    };
    Ok(Reply::Array(
        all_fields(space, &h)?
            .into_iter()
            .map(|(_, v)| Reply::Bulk(v))
            .collect(),
    ))
}

/// `HDEL key field [field ...]`: the number removed; an emptied hash is deleted.
fn hdel(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(mut h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let mut removed = 0;
    for f in &args[2..] {
        let sub = hashed_sub(FIELD, f);
        if space.el_delete(&h.coll, &sub)? {
            h.meta.len -= 1;
            removed += 1;
        }
    }
    if removed > 0 {
        finish(space, &h, cx)?;
    }
    Ok(Reply::Integer(removed))
}

/// `HEXISTS key field`.
fn hexists(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(
        get_field(space, &h, &args[2])?.is_some() as i64
    ))
}

/// `HLEN key`.
fn hlen(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let len = open_hash(space, &args[1])?.map_or(0, |h| h.meta.len as i64);
    let planted = len == 3 && PLANT_DIFFERENCE.load(Ordering::Relaxed);
    Ok(Reply::Integer(len + planted as i64))
}

/// `HSTRLEN key field`.
fn hstrlen(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(
        get_field(space, &h, &args[2])?.map_or(0, |v| v.len() as i64),
    ))
}

/// `HINCRBY key field increment`.
fn hincrby(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let delta = int_arg(args, 3)?;
    let mut h = open_or_create(space, &args[1], ValueKind::Hash)?;
    let old = match get_field(space, &h, &args[2])? {
        Some(v) => parse_int(&v).ok_or_else(|| err("ERR hash value is not an integer"))?,
        None => 0,
    };
    let new = old
        .checked_add(delta)
        .ok_or_else(|| err("ERR increment or decrement would overflow"))?;
    set_field(space, &mut h, &args[2], new.to_string().as_bytes())?;
    finish(space, &h, cx)?;
    Ok(Reply::Integer(new))
}

/// `HINCRBYFLOAT key field increment` (see [`format_long_double_human`] for the printing).
fn hincrbyfloat(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let delta = parse_double(&args[3]).ok_or_else(|| err("ERR value is not a valid float"))?;
    let mut h = open_or_create(space, &args[1], ValueKind::Hash)?;
    let old = match get_field(space, &h, &args[2])? {
        Some(v) => parse_double(&v).ok_or_else(|| err("ERR hash value is not a float"))?,
        None => 0.0,
    };
    let new = old + delta;
    if new.is_nan() || new.is_infinite() {
        return Err(err("ERR increment would produce NaN or Infinity"));
    }
    let text = Bytes::from(format_long_double_human(new));
    set_field(space, &mut h, &args[2], &text)?;
    finish(space, &h, cx)?;
    Ok(Reply::Bulk(text))
}

/// `HRANDFIELD key [count [WITHVALUES]]`.
fn hrandfield(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    // Redis's order: the count (an integer above -2^63), then the syntax, then the range
    // WITHVALUES allows.
    let (count, with_values) = match args.get(2) {
        None => (None, false),
        Some(_) => {
            let c = int_arg(args, 2)?;
            if c == i64::MIN {
                return Err(err(
                    "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807",
                ));
            }
            let with_values = match args.get(3) {
                None => false,
                Some(w) if args.len() == 4 && w.eq_ignore_ascii_case(b"WITHVALUES") => true,
                Some(_) => return Err(syntax()),
            };
            if with_values && !(-(i64::MAX / 2)..=i64::MAX / 2).contains(&c) {
                return Err(err("ERR value is out of range"));
            }
            (Some(c), with_values)
        }
    };
    let Some(h) = open_hash(space, &args[1])? else {
        return Ok(match count {
            None => Reply::Nil,
            Some(_) => Reply::Array(Vec::new()),
        });
    };
    let mut rng = Rng::new(cx.seed);
    let picked = random_members(space, &h, FIELD, count.unwrap_or(1), &mut rng)?;
    if count.is_none() {
        return Ok(picked
            .into_iter()
            .next()
            .map_or(Reply::Nil, |(f, _)| Reply::Bulk(f)));
    }
    Ok(if with_values {
        Reply::Pairs(
            picked
                .into_iter()
                .map(|(f, v)| (Reply::Bulk(f), Reply::Bulk(v)))
                .collect(),
        )
    } else {
        Reply::Array(picked.into_iter().map(|(f, _)| Reply::Bulk(f)).collect())
    })
}

/// `count` random members under `tag` of a hashed layout (member, stored value): distinct when
/// `count >= 0` (at most all of them), with repetitions allowed and exactly `-count` of them
/// when negative, as HRANDFIELD, SRANDMEMBER and ZRANDMEMBER define it. Bounded: at most
/// `|count|` probes beyond reading the whole collection once.
pub fn random_members(
    space: &mut dyn Space,
    open: &Open,
    tag: u8,
    count: i64,
    rng: &mut Rng,
) -> Result<Vec<(Bytes, Bytes)>> {
    let len = open.meta.len;
    if count == 0 || len == 0 {
        return Ok(Vec::new());
    }
    // Repetitions allowed: the reply's size is the count, not the collection's. Bounded like
    // every reply (Redis would try to build it and run out of memory).
    let most = capdb_types::limits::FRAME_ELEMENTS_MAX as u64;
    if count < 0 && count.unsigned_abs() > most {
        return Err(err(format!(
            "ERR count is over the limit of {most} members with repetitions"
        )));
    }
    let end = [tag + 1];
    let probe = |space: &mut dyn Space, rng: &mut Rng| -> Result<(Bytes, Bytes)> {
        let at = rng.below(1 << 63);
        let mut from = vec![tag];
        from.extend_from_slice(&at.to_be_bytes());
        let mut hit = space.el_range(
            &open.coll,
            ElRange {
                lo: std::ops::Bound::Included(&from),
                hi: std::ops::Bound::Excluded(&end),
                rev: false,
                limit: 1,
            },
        )?;
        if hit.is_empty() {
            hit = space.el_range(
                &open.coll,
                ElRange {
                    limit: 1,
                    ..ElRange::prefixed(&[tag], &end)
                },
            )?;
        }
        let (sub, v) = hit
            .pop()
            .ok_or_else(|| Error::Corruption("a non-empty collection has no elements".into()))?;
        Ok((member_of_hashed(&sub)?, v))
    };
    if count < 0 {
        let n = count.unsigned_abs();
        // Small collections: read once and draw from memory.
        if len <= 64 || n > len {
            let all = read_members(space, open, tag)?;
            return Ok((0..n)
                .map(|_| all[rng.below(all.len() as u64) as usize].clone())
                .collect());
        }
        return (0..n).map(|_| probe(space, rng)).collect();
    }
    let n = count as u64;
    if n >= len {
        return read_members(space, open, tag);
    }
    if n * 3 > len || len <= 64 {
        let mut all = read_members(space, open, tag)?;
        rng.shuffle(&mut all);
        all.truncate(n as usize);
        return Ok(all);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n * 4 {
        let m = probe(space, rng)?;
        if seen.insert(m.0.clone()) {
            out.push(m);
            if out.len() as u64 == n {
                return Ok(out);
            }
        }
    }
    // Unlucky probes (hash clustering): finish from a full read.
    let mut rest: Vec<_> = read_members(space, open, tag)?
        .into_iter()
        .filter(|m| !seen.contains(&m.0))
        .collect();
    rng.shuffle(&mut rest);
    out.extend(rest.into_iter().take(n as usize - out.len()));
    Ok(out)
}

fn read_members(space: &mut dyn Space, open: &Open, tag: u8) -> Result<Vec<(Bytes, Bytes)>> {
    space
        .el_range(&open.coll, ElRange::prefixed(&[tag], &[tag + 1]))?
        .into_iter()
        .map(|(sub, v)| Ok((member_of_hashed(&sub)?, v)))
        .collect()
}

/// `HSCAN key cursor [MATCH pattern] [COUNT count]`.
fn hscan(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let cursor = scan::parse_cursor(&args[2])?;
    let Some(h) = open_hash(space, &args[1])? else {
        return scan::reply(0, Vec::new(), None, |_, _, _| Ok(()));
    };
    let opts = scan::parse_opts(args, 3)?;
    let (next, page) = scan::page(space, &h, FIELD, cursor, opts.count)?;
    scan::reply(next, page, opts.pattern.as_ref(), |f, v, items| {
        items.push(Reply::Bulk(f));
        items.push(Reply::Bulk(v));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MapSpace;
    use capdb_types::Timestamp;

    use crate::testing::words::run;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn table_is_sorted() {
        assert!(crate::command::sorted(COMMANDS));
    }

    #[test]
    fn hrandfield_checks_its_count_before_its_syntax() {
        // Found by `capdb difftest`; replies checked against redis-server 7.0.15.
        let mut s = MapSpace::new(0);
        run(&mut s, "HSET h a 1").unwrap();
        assert_eq!(
            run(&mut s, "HRANDFIELD h 0x10 FOO").unwrap_err(),
            err("ERR value is not an integer or out of range")
        );
        assert_eq!(
            run(&mut s, "HRANDFIELD h 1 FOO").unwrap_err(),
            err("ERR syntax error")
        );
        assert_eq!(
            run(&mut s, "HRANDFIELD h 1 WITHVALUES x").unwrap_err(),
            err("ERR syntax error")
        );
        assert_eq!(
            run(&mut s, "HRANDFIELD h -9223372036854775808").unwrap_err(),
            err(
                "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807"
            )
        );
        assert_eq!(
            run(&mut s, "HRANDFIELD h -9223372036854775807 WITHVALUES").unwrap_err(),
            err("ERR value is out of range")
        );
    }

    #[test]
    fn hset_counts_new_fields_and_hget_reads_them() {
        let mut s = MapSpace::new(0);
        assert_eq!(run(&mut s, "HSET h a 1 b 2").unwrap(), Reply::Integer(2));
        assert_eq!(run(&mut s, "HSET h a 3 c 4").unwrap(), Reply::Integer(1));
        assert_eq!(run(&mut s, "HGET h a").unwrap(), bulk("3"));
        assert_eq!(run(&mut s, "HGET h zz").unwrap(), Reply::Nil);
        assert_eq!(run(&mut s, "HLEN h").unwrap(), Reply::Integer(3));
        assert_eq!(
            run(&mut s, "HSET h a").unwrap_err(),
            err("ERR wrong number of arguments for 'hset' command")
        );
    }

    #[test]
    fn the_last_hdel_deletes_the_key_and_its_elements() {
        let mut s = MapSpace::new(0);
        run(&mut s, "HSET h a 1 b 2").unwrap();
        assert_eq!(run(&mut s, "HDEL h a b zz").unwrap(), Reply::Integer(2));
        assert!(s.top.is_empty());
        assert!(s.elements.is_empty());
    }

    #[test]
    fn a_string_key_is_the_wrong_type_and_set_over_a_hash_reclaims_it() {
        let mut s = MapSpace::new(0);
        s.put(
            b"str",
            capdb_types::Value::new(Bytes::from_static(b"x"), Timestamp(1), None),
        )
        .unwrap();
        assert_eq!(run(&mut s, "HGET str f").unwrap_err(), Error::WrongType);
        run(&mut s, "HSET h a 1").unwrap();
        s.put(
            b"h",
            capdb_types::Value::new(Bytes::from_static(b"x"), Timestamp(2), None),
        )
        .unwrap();
        assert!(
            s.elements.is_empty(),
            "overwriting a hash reclaims its fields"
        );
    }

    #[test]
    fn hincrby_and_hincrbyfloat_follow_redis_errors() {
        let mut s = MapSpace::new(0);
        assert_eq!(run(&mut s, "HINCRBY h n 5").unwrap(), Reply::Integer(5));
        assert_eq!(run(&mut s, "HINCRBY h n -7").unwrap(), Reply::Integer(-2));
        run(&mut s, "HSET h s abc").unwrap();
        assert_eq!(
            run(&mut s, "HINCRBY h s 1").unwrap_err(),
            err("ERR hash value is not an integer")
        );
        assert_eq!(
            run(&mut s, "HINCRBY h n x").unwrap_err(),
            crate::command::not_integer()
        );
        assert_eq!(run(&mut s, "HINCRBYFLOAT h f 10.5").unwrap(), bulk("10.5"));
        assert_eq!(run(&mut s, "HINCRBYFLOAT h f 0.1").unwrap(), bulk("10.6"));
        assert_eq!(
            run(&mut s, "HINCRBYFLOAT h s 1").unwrap_err(),
            err("ERR hash value is not a float")
        );
    }

    #[test]
    fn hscan_of_a_big_hash_returns_every_field_once_across_pages() {
        let mut s = MapSpace::new(0);
        for i in 0..500 {
            run(&mut s, &format!("HSET h f{i} v")).unwrap();
        }
        let mut cursor = "0".to_string();
        let mut seen = HashSet::new();
        loop {
            let Reply::Array(parts) = run(&mut s, &format!("HSCAN h {cursor} COUNT 7")).unwrap()
            else {
                panic!()
            };
            let (Reply::Bulk(c), Reply::Array(items)) = (&parts[0], &parts[1]) else {
                panic!()
            };
            for pair in items.chunks(2) {
                let Reply::Bulk(f) = &pair[0] else { panic!() };
                assert!(seen.insert(f.clone()), "returned twice");
            }
            cursor = String::from_utf8(c.to_vec()).unwrap();
            if cursor == "0" {
                break;
            }
        }
        assert_eq!(seen.len(), 500);
    }

    #[test]
    fn hrandfield_counts() {
        let mut s = MapSpace::new(0);
        run(&mut s, "HSET h a 1 b 2 c 3").unwrap();
        let Reply::Array(v) = run(&mut s, "HRANDFIELD h 5").unwrap() else {
            panic!()
        };
        assert_eq!(v.len(), 3);
        let Reply::Array(v) = run(&mut s, "HRANDFIELD h -5").unwrap() else {
            panic!()
        };
        assert_eq!(v.len(), 5);
        let Reply::Pairs(v) = run(&mut s, "HRANDFIELD h 2 WITHVALUES").unwrap() else {
            panic!()
        };
        assert_eq!(v.len(), 2);
        assert_eq!(run(&mut s, "HRANDFIELD nokey").unwrap(), Reply::Nil);
    }
}
