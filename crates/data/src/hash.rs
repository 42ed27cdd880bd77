//! Hashes: HSET, HGET, HINCRBY, HSCAN and the rest, with Redis 7's replies and errors, and
//! Redis 7.4's field expiry (HEXPIRE, HTTL, HPERSIST and their variants).
//!
//! A field is the element `0 ‖ hash(field) ‖ field` (see [`crate::meta::hashed_sub`]) holding
//! the field's value, so HGET/HSET/HDEL touch one element and HSCAN pages in hash order.
//!
//! # Field expiry
//!
//! - **Encoding.** A hash that never had a field with an expiry stores each value as it is (as
//!   every hash written before field expiry existed does), so field expiry costs it nothing.
//!   The first HEXPIRE on a hash rewrites its values once (O(N), as Redis converts a listpack to
//!   `listpackex`) and sets the sticky [`crate::meta::CollMeta::field_expiry`] flag; from then
//!   on each value starts with one byte, `0` (no expiry) or `1` followed by the expiry (Unix
//!   ms, u64 little-endian). A field with an expiry also has an index element
//!   `2 ‖ u64be(expire_at_ms) ‖ field` (empty value), so the expired fields are a range read
//!   from the start of that index: O(expired), not O(fields).
//! - **Visibility.** A field whose expiry is at or before the command's clock ([`Ctx::now_ms`],
//!   the log entry's clock in `cp`: replicas agree) is absent for every hash command: HGET,
//!   HGETALL, HSCAN, HRANDFIELD, HEXISTS, ... A hash whose fields have all expired reads as
//!   an absent key to hash commands.
//! - **HLEN counts live fields only** (the stored count minus the expired fields the index
//!   holds). Redis 7.4 counts expired fields it has not reclaimed yet; capdb's answer does not
//!   depend on when reclamation ran.
//! - **Reclamation.** Every hash write first deletes the expired fields (and the key when none
//!   is left), inside the same atomic step. Until a write comes, key-level commands (EXISTS,
//!   TYPE, SCAN, DBSIZE) still see a hash whose fields have all expired: the active expiry of
//!   keys does not look at fields yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, int_arg, syntax, wrong_args};
use crate::format::{format_long_double_human, parse_double, parse_int};
use crate::meta::{Open, create, finish, hashed_sub, member_of_hashed, open};
use crate::rng::Rng;
use crate::scan;
use crate::space::{ElRange, Space};

const FIELD: u8 = 0;
/// The expiry index of a hash with field expiry: `2 ‖ u64be(expire_at_ms) ‖ field`.
const EXPIRY: u8 = 2;

/// TESTING ONLY (`capdb server --debug-plant-difference`, set once at start): HLEN answers one
/// more than the truth when the hash has exactly 3 fields, a planted difference the
/// differential tester (`capdb difftest`) must find. Never set otherwise.
pub static PLANT_DIFFERENCE: AtomicBool = AtomicBool::new(false);
/// Redis 7.0's `hash-max-listpack-entries` and `hash-max-listpack-value` defaults (the compiled
/// defaults of redis-server 7.0.15, `CONFIG GET` checked: 512 and 64; `redis.conf` says the
/// same): past either, Redis converts the hash to a hashtable (for good).
pub const LISTPACK_ENTRIES: u64 = 512;
pub const LISTPACK_VALUE: usize = 64;

const KEY: Keys = Keys::Range(1, 1, 1);
const W: &[&str] = &["write", "denyoom", "fast"];
const R: &[&str] = &["readonly", "fast"];

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "hdel",         arity: -3, flags: &["write", "fast"], keys: KEY, run: Run::Write(hdel) },
    Spec { name: "hexists",      arity: 3,  flags: R, keys: KEY, run: Run::Read(hexists) },
    Spec { name: "hexpire",      arity: -6, flags: &["write", "fast"], keys: KEY, run: Run::Write(hexpire) },
    Spec { name: "hexpireat",    arity: -6, flags: &["write", "fast"], keys: KEY, run: Run::Write(hexpire) },
    Spec { name: "hexpiretime",  arity: -5, flags: R, keys: KEY, run: Run::Read(httl) },
    Spec { name: "hget",         arity: 3,  flags: R, keys: KEY, run: Run::Read(hget) },
    Spec { name: "hgetall",      arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hgetall) },
    Spec { name: "hincrby",      arity: 4,  flags: W, keys: KEY, run: Run::Write(hincrby) },
    Spec { name: "hincrbyfloat", arity: 4,  flags: W, keys: KEY, run: Run::Write(hincrbyfloat) },
    Spec { name: "hkeys",        arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hkeys) },
    Spec { name: "hlen",         arity: 2,  flags: R, keys: KEY, run: Run::Read(hlen) },
    Spec { name: "hmget",        arity: -3, flags: R, keys: KEY, run: Run::Read(hmget) },
    Spec { name: "hmset",        arity: -4, flags: W, keys: KEY, run: Run::Write(hmset) },
    Spec { name: "hpersist",     arity: -5, flags: &["write", "fast"], keys: KEY, run: Run::Write(hpersist) },
    Spec { name: "hpexpire",     arity: -6, flags: &["write", "fast"], keys: KEY, run: Run::Write(hexpire) },
    Spec { name: "hpexpireat",   arity: -6, flags: &["write", "fast"], keys: KEY, run: Run::Write(hexpire) },
    Spec { name: "hpexpiretime", arity: -5, flags: R, keys: KEY, run: Run::Read(httl) },
    Spec { name: "hpttl",        arity: -5, flags: R, keys: KEY, run: Run::Read(httl) },
    Spec { name: "hrandfield",   arity: -2, flags: &["readonly"], keys: KEY, run: Run::Read(hrandfield) },
    Spec { name: "hscan",        arity: -3, flags: &["readonly"], keys: KEY, run: Run::Read(hscan) },
    Spec { name: "hset",         arity: -4, flags: W, keys: KEY, run: Run::Write(hset) },
    Spec { name: "hsetnx",       arity: 4,  flags: W, keys: KEY, run: Run::Write(hsetnx) },
    Spec { name: "hstrlen",      arity: 3,  flags: R, keys: KEY, run: Run::Read(hstrlen) },
    Spec { name: "httl",         arity: -5, flags: R, keys: KEY, run: Run::Read(httl) },
    Spec { name: "hvals",        arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(hvals) },
];

fn open_hash(space: &mut dyn Space, key: &Bytes) -> Result<Option<Open>> {
    open(space, key, ValueKind::Hash)
}

/// The hash at `key` as a read sees it: `None` when absent or when every field has expired.
fn open_read(space: &mut dyn Space, key: &Bytes, cx: &Ctx) -> Result<Option<Open>> {
    let Some(h) = open_hash(space, key)? else {
        return Ok(None);
    };
    if h.meta.field_expiry && live_len(space, &h, cx.now_ms)? == 0 {
        return Ok(None);
    }
    Ok(Some(h))
}

/// The hash at `key` for a write, its expired fields deleted first (and the key with them when
/// none is left): `None` when absent then.
fn open_write_existing(space: &mut dyn Space, key: &Bytes, cx: &Ctx) -> Result<Option<Open>> {
    let Some(mut h) = open_hash(space, key)? else {
        return Ok(None);
    };
    if purge_expired(space, &mut h, cx.now_ms)? > 0 {
        // Stored now, whatever the command does next (it may still fail).
        finish(space, &h, cx)?;
        if h.meta.len == 0 {
            return Ok(None);
        }
    }
    Ok(Some(h))
}

/// [`open_write_existing`], or a new, empty hash (stored by [`finish`] once it has a field).
fn open_write(space: &mut dyn Space, key: &Bytes, cx: &Ctx) -> Result<Open> {
    match open_write_existing(space, key, cx)? {
        Some(h) => Ok(h),
        None => create(space, key, ValueKind::Hash),
    }
}

/// A field as stored: its value and expiry.
struct Stored {
    value: Bytes,
    expire_at_ms: Option<u64>,
}

/// Decodes a stored field value (see the module doc).
fn decode(h: &Open, raw: Bytes) -> Result<Stored> {
    if !h.meta.field_expiry {
        return Ok(Stored {
            value: raw,
            expire_at_ms: None,
        });
    }
    let corrupt = || Error::Corruption(format!("hash field value of {} bytes", raw.len()));
    match raw.first() {
        Some(0) => Ok(Stored {
            value: raw.slice(1..),
            expire_at_ms: None,
        }),
        Some(1) if raw.len() >= 9 => Ok(Stored {
            expire_at_ms: Some(u64::from_le_bytes(
                raw[1..9].try_into().map_err(|_| corrupt())?,
            )),
            value: raw.slice(9..),
        }),
        _ => Err(corrupt()),
    }
}

fn encode(h: &Open, value: &[u8], expire_at_ms: Option<u64>) -> Vec<u8> {
    if !h.meta.field_expiry {
        debug_assert!(
            expire_at_ms.is_none(),
            "an expiry needs the field-expiry encoding"
        );
        return value.to_vec();
    }
    let mut out = Vec::with_capacity(9 + value.len());
    match expire_at_ms {
        None => out.push(0),
        Some(at) => {
            out.push(1);
            out.extend_from_slice(&at.to_le_bytes());
        }
    }
    out.extend_from_slice(value);
    out
}

fn expiry_sub(at: u64, field: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(9 + field.len());
    s.push(EXPIRY);
    s.extend_from_slice(&at.to_be_bytes());
    s.extend_from_slice(field);
    s
}

fn is_expired(at: Option<u64>, now_ms: u64) -> bool {
    at.is_some_and(|at| at <= now_ms)
}

/// The stored field, live or expired.
fn stored_field(space: &mut dyn Space, h: &Open, field: &[u8]) -> Result<Option<Stored>> {
    space
        .el_get(&h.coll, &hashed_sub(FIELD, field))?
        .map(|raw| decode(h, raw))
        .transpose()
}

/// The live field.
fn live_field(
    space: &mut dyn Space,
    h: &Open,
    field: &[u8],
    now_ms: u64,
) -> Result<Option<Stored>> {
    Ok(stored_field(space, h, field)?.filter(|f| !is_expired(f.expire_at_ms, now_ms)))
}

fn get_field(space: &mut dyn Space, h: &Open, field: &[u8], cx: &Ctx) -> Result<Option<Bytes>> {
    Ok(live_field(space, h, field, cx.now_ms)?.map(|f| f.value))
}

/// The index entries of the fields expired at `now_ms`: (index subkey, field).
fn expired_entries(space: &mut dyn Space, h: &Open, now_ms: u64) -> Result<Vec<(Bytes, Bytes)>> {
    if !h.meta.field_expiry {
        return Ok(Vec::new());
    }
    let end = match now_ms.checked_add(1) {
        Some(after) => expiry_sub(after, &[]),
        None => vec![EXPIRY + 1],
    };
    // Ascending by expiry, up to `now_ms` included: O(expired).
    space
        .el_range(
            &h.coll,
            ElRange {
                lo: std::ops::Bound::Included(&[EXPIRY]),
                hi: std::ops::Bound::Excluded(&end),
                rev: false,
                limit: usize::MAX,
            },
        )?
        .into_iter()
        .map(|(sub, _)| {
            if sub.len() < 9 {
                return Err(Error::Corruption(format!(
                    "hash expiry index key of {} bytes",
                    sub.len()
                )));
            }
            let field = sub.slice(9..);
            Ok((sub, field))
        })
        .collect()
}

/// The number of live fields.
fn live_len(space: &mut dyn Space, h: &Open, now_ms: u64) -> Result<u64> {
    let expired = expired_entries(space, h, now_ms)?.len() as u64;
    Ok(h.meta.len.saturating_sub(expired))
}

/// Deletes the expired fields and their index entries; returns how many.
fn purge_expired(space: &mut dyn Space, h: &mut Open, now_ms: u64) -> Result<u64> {
    let expired = expired_entries(space, h, now_ms)?;
    for (sub, field) in &expired {
        space.el_remove(&h.coll, sub)?;
        if space.el_delete(&h.coll, &hashed_sub(FIELD, field))? {
            h.meta.len -= 1;
        }
    }
    Ok(expired.len() as u64)
}

/// Sets a field's value; returns whether it is new. `keep_ttl`: the field keeps its expiry
/// (HINCRBY changes a value in place), else it loses it (HSET replaces the field), as in Redis.
fn set_field_with(
    space: &mut dyn Space,
    h: &mut Open,
    field: &[u8],
    value: &[u8],
    keep_ttl: bool,
) -> Result<bool> {
    let sub = hashed_sub(FIELD, field);
    let new = if h.meta.field_expiry {
        let old = stored_field(space, h, field)?;
        let old_at = old.as_ref().and_then(|f| f.expire_at_ms);
        let at = if keep_ttl { old_at } else { None };
        if let (Some(old_at), None) = (old_at, at) {
            space.el_remove(&h.coll, &expiry_sub(old_at, field))?;
        }
        space.el_put(&h.coll, &sub, &encode(h, value, at))?;
        old.is_none()
    } else {
        space.el_insert(&h.coll, &sub, value)?
    };
    if new {
        h.meta.len += 1;
    }
    if h.meta.len > LISTPACK_ENTRIES || field.len() > LISTPACK_VALUE || value.len() > LISTPACK_VALUE
    {
        h.meta.big = true;
    }
    Ok(new)
}

/// Sets a field as HSET does (any expiry is cleared); returns whether it is new.
fn set_field(space: &mut dyn Space, h: &mut Open, field: &[u8], value: &[u8]) -> Result<bool> {
    set_field_with(space, h, field, value, false)
}

/// The live fields and their values.
fn all_fields(space: &mut dyn Space, h: &Open, cx: &Ctx) -> Result<Vec<(Bytes, Bytes)>> {
    let mut out = Vec::new();
    for (sub, raw) in space.el_range(&h.coll, ElRange::prefixed(&[FIELD], &[FIELD + 1]))? {
        let f = decode(h, raw)?;
        if !is_expired(f.expire_at_ms, cx.now_ms) {
            out.push((member_of_hashed(&sub)?, f.value));
        }
    }
    Ok(out)
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
    let mut h = open_write(space, &args[1], cx)?;
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
    let mut h = open_write(space, &args[1], cx)?;
    if get_field(space, &h, &args[2], cx)?.is_some() {
        return Ok(Reply::Integer(0));
    }
    set_field(space, &mut h, &args[2], &args[3])?;
    finish(space, &h, cx)?;
    Ok(Reply::Integer(1))
}

/// `HGET key field`.
fn hget(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Nil);
    };
    Ok(get_field(space, &h, &args[2], cx)?.map_or(Reply::Nil, Reply::Bulk))
}

/// `HMGET key field [field ...]`.
fn hmget(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let h = open_read(space, &args[1], cx)?;
    let mut out = Vec::with_capacity(args.len() - 2);
    for f in &args[2..] {
        out.push(match &h {
            Some(h) => get_field(space, h, f, cx)?.map_or(Reply::Nil, Reply::Bulk),
            None => Reply::Nil,
        });
    }
    Ok(Reply::Array(out))
}

/// `HGETALL key`: a map of fields to values.
fn hgetall(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Map(Vec::new()));
    };
    Ok(Reply::Map(
        all_fields(space, &h, cx)?
            .into_iter()
            .map(|(f, v)| (Reply::Bulk(f), Reply::Bulk(v)))
            .collect(),
    ))
}

/// `HKEYS key`.
fn hkeys(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Array(Vec::new()));
    };
    Ok(Reply::Array(
        all_fields(space, &h, cx)?
            .into_iter()
            .map(|(f, _)| Reply::Bulk(f))
            .collect(),
    ))
}

/// `HVALS key`.
fn hvals(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Array(Vec::new()));
    };
    Ok(Reply::Array(
        all_fields(space, &h, cx)?
            .into_iter()
            .map(|(_, v)| Reply::Bulk(v))
            .collect(),
    ))
}

/// Deletes a field and its expiry index entry; returns whether it was there.
fn delete_field(space: &mut dyn Space, h: &mut Open, field: &[u8]) -> Result<bool> {
    let sub = hashed_sub(FIELD, field);
    if h.meta.field_expiry
        && let Some(at) = stored_field(space, h, field)?.and_then(|f| f.expire_at_ms)
    {
        space.el_remove(&h.coll, &expiry_sub(at, field))?;
    }
    let was = space.el_delete(&h.coll, &sub)?;
    if was {
        h.meta.len -= 1;
    }
    Ok(was)
}

/// `HDEL key field [field ...]`: the number removed; an emptied hash is deleted.
fn hdel(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(mut h) = open_write_existing(space, &args[1], cx)? else {
        return Ok(Reply::Integer(0));
    };
    let mut removed = 0;
    for f in &args[2..] {
        removed += delete_field(space, &mut h, f)? as i64;
    }
    if removed > 0 {
        finish(space, &h, cx)?;
    }
    Ok(Reply::Integer(removed))
}

/// `HEXISTS key field`.
fn hexists(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(
        get_field(space, &h, &args[2], cx)?.is_some() as i64,
    ))
}

/// `HLEN key`: the live fields (see the module doc).
fn hlen(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let len = match open_read(space, &args[1], cx)? {
        Some(h) => live_len(space, &h, cx.now_ms)? as i64,
        None => 0,
    };
    let planted = len == 3 && PLANT_DIFFERENCE.load(Ordering::Relaxed);
    Ok(Reply::Integer(len + planted as i64))
}

/// `HSTRLEN key field`.
fn hstrlen(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(
        get_field(space, &h, &args[2], cx)?.map_or(0, |v| v.len() as i64),
    ))
}

/// `HINCRBY key field increment` (the field keeps its expiry).
fn hincrby(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let delta = int_arg(args, 3)?;
    let mut h = open_write(space, &args[1], cx)?;
    let old = match get_field(space, &h, &args[2], cx)? {
        Some(v) => parse_int(&v).ok_or_else(|| err("ERR hash value is not an integer"))?,
        None => 0,
    };
    let new = old
        .checked_add(delta)
        .ok_or_else(|| err("ERR increment or decrement would overflow"))?;
    set_field_with(space, &mut h, &args[2], new.to_string().as_bytes(), true)?;
    finish(space, &h, cx)?;
    Ok(Reply::Integer(new))
}

/// `HINCRBYFLOAT key field increment` (see [`format_long_double_human`] for the printing; the
/// field keeps its expiry).
fn hincrbyfloat(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let delta = parse_double(&args[3]).ok_or_else(|| err("ERR value is not a valid float"))?;
    let mut h = open_write(space, &args[1], cx)?;
    let old = match get_field(space, &h, &args[2], cx)? {
        Some(v) => parse_double(&v).ok_or_else(|| err("ERR hash value is not a float"))?,
        None => 0.0,
    };
    let new = old + delta;
    if new.is_nan() || new.is_infinite() {
        return Err(err("ERR increment would produce NaN or Infinity"));
    }
    let text = Bytes::from(format_long_double_human(new));
    set_field_with(space, &mut h, &args[2], &text, true)?;
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
    let Some(h) = open_read(space, &args[1], cx)? else {
        return Ok(match count {
            None => Reply::Nil,
            Some(_) => Reply::Array(Vec::new()),
        });
    };
    let mut rng = Rng::new(cx.seed);
    let picked = if h.meta.field_expiry {
        // Draw from the live fields (read once: probing could land on expired ones).
        let live = all_fields(space, &h, cx)?;
        pick_members(live, count.unwrap_or(1), &mut rng)?
    } else {
        random_members(space, &h, FIELD, count.unwrap_or(1), &mut rng)?
    };
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

/// [`random_members`]' choice from members already read.
fn pick_members(
    mut all: Vec<(Bytes, Bytes)>,
    count: i64,
    rng: &mut Rng,
) -> Result<Vec<(Bytes, Bytes)>> {
    if count == 0 || all.is_empty() {
        return Ok(Vec::new());
    }
    if count < 0 {
        let n = count.unsigned_abs();
        let most = capdb_types::limits::FRAME_ELEMENTS_MAX as u64;
        if n > most {
            return Err(err(format!(
                "ERR count is over the limit of {most} members with repetitions"
            )));
        }
        return Ok((0..n)
            .map(|_| all[rng.below(all.len() as u64) as usize].clone())
            .collect());
    }
    rng.shuffle(&mut all);
    all.truncate(count as usize);
    Ok(all)
}

/// Redis 7.4's largest field expiry, in Unix ms (`HFE_MAX_ABS_TIME_MSEC`: 2^46 - 1, the year
/// 4199).
const FIELD_EXPIRE_AT_MS_MAX: i64 = ((1 << 48) - 1) >> 2;

/// The fields of `... FIELDS numfields field [field ...]` with `FIELDS` at `at`, checked as
/// Redis 7.4 checks them; `not_positive` is the error for a `numfields` below 1 (HEXPIRE and
/// the readers word it differently).
fn fields_arg<'a>(args: &'a [Bytes], at: usize, not_positive: &str) -> Result<&'a [Bytes]> {
    if !args
        .get(at)
        .is_some_and(|a| a.eq_ignore_ascii_case(b"FIELDS"))
    {
        return Err(err(
            "ERR Mandatory argument FIELDS is missing or not at the right position",
        ));
    }
    let n = args
        .get(at + 1)
        .and_then(|a| parse_int(a))
        .filter(|n| *n >= 1)
        .ok_or_else(|| err(not_positive))?;
    let fields = &args[(at + 2).min(args.len())..];
    if n as u64 != fields.len() as u64 {
        return Err(err(
            "ERR The `numfields` parameter must match the number of arguments",
        ));
    }
    Ok(fields)
}

/// Rewrites every value of a hash in the field-expiry encoding (once per hash, at its first
/// field expiry; see the module doc).
fn enable_field_expiry(space: &mut dyn Space, h: &mut Open) -> Result<()> {
    if h.meta.field_expiry {
        return Ok(());
    }
    let all = space.el_range(&h.coll, ElRange::prefixed(&[FIELD], &[FIELD + 1]))?;
    h.meta.field_expiry = true;
    for (sub, value) in all {
        space.el_put(&h.coll, &sub, &encode(h, &value, None))?;
    }
    Ok(())
}

/// Gives a live field a new expiry (`None`: none), keeping its value and the index in step.
fn set_expiry(
    space: &mut dyn Space,
    h: &mut Open,
    field: &[u8],
    f: Stored,
    at: Option<u64>,
) -> Result<()> {
    if at.is_some() {
        enable_field_expiry(space, h)?;
    }
    if let Some(old) = f.expire_at_ms {
        space.el_remove(&h.coll, &expiry_sub(old, field))?;
    }
    if let Some(at) = at {
        space.el_put(&h.coll, &expiry_sub(at, field), &[])?;
    }
    space.el_put(&h.coll, &hashed_sub(FIELD, field), &encode(h, &f.value, at))
}

/// The absolute expiry of `HEXPIRE`-family arguments at `now_ms` (relative forms from
/// `now_ms`), or Redis's error.
fn expire_at_arg(args: &[Bytes], now_ms: u64) -> Result<u64> {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let (unit_ms, relative) = match name.as_str() {
        "hexpire" => (1000, true),
        "hpexpire" => (1, true),
        "hexpireat" => (1000, false),
        _ => (1, false),
    };
    let n = int_arg(args, 2)?;
    if n < 0 {
        return Err(err("ERR invalid expire time, must be >= 0"));
    }
    let invalid = || err(format!("ERR invalid expire time in '{name}' command"));
    if n > FIELD_EXPIRE_AT_MS_MAX / unit_ms {
        return Err(invalid());
    }
    let base = if relative { now_ms as i64 } else { 0 };
    let ms = n * unit_ms;
    if ms > FIELD_EXPIRE_AT_MS_MAX - base {
        return Err(invalid());
    }
    Ok((ms + base) as u64)
}

/// Rewrites `HEXPIRE`/`HPEXPIRE` (a time relative to now) as `HPEXPIREAT` with the absolute
/// time, so that replaying the command later gives the same result (as
/// [`crate::strings::absolutize`] does for GETEX). `None` when there is nothing to rewrite
/// (another command, or a time that is an error anyway, which replays identically).
pub fn absolutize(args: &[Bytes], now_ms: u64) -> Option<Vec<Bytes>> {
    let relative = args
        .first()
        .is_some_and(|n| n.eq_ignore_ascii_case(b"hexpire") || n.eq_ignore_ascii_case(b"hpexpire"));
    if !relative || args.len() < 3 {
        return None;
    }
    let at = expire_at_arg(args, now_ms).ok()?;
    let mut out = args.to_vec();
    out[0] = Bytes::from_static(b"HPEXPIREAT");
    out[2] = Bytes::from(at.to_string());
    Some(out)
}

/// `HEXPIRE key seconds [NX|XX|GT|LT] FIELDS numfields field [field ...]`, and HPEXPIRE
/// (milliseconds), HEXPIREAT and HPEXPIREAT (Unix time): for each field, -2 (no such field),
/// 0 (the condition is not met; no expiry counts as infinite for GT and LT), 1 (set) or 2
/// (deleted: the time is now or past). A hash left without fields is deleted.
fn hexpire(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    // Redis's order: the key's type, the time, the condition, the fields.
    open_hash(space, &args[1])?;
    let at = expire_at_arg(args, cx.now_ms)?;
    let cond = args[3].to_ascii_uppercase();
    let cond: &[u8] = match &cond[..] {
        c @ (b"NX" | b"XX" | b"GT" | b"LT") => c,
        _ => b"",
    };
    let fields_at = if cond.is_empty() { 3 } else { 4 };
    let fields = fields_arg(
        args,
        fields_at,
        "ERR Parameter `numFields` should be greater than 0",
    )?;
    let Some(mut h) = open_write_existing(space, &args[1], cx)? else {
        return Ok(Reply::Array(vec![Reply::Integer(-2); fields.len()]));
    };
    let mut out = Vec::with_capacity(fields.len());
    let mut changed = false;
    for field in fields {
        let Some(f) = live_field(space, &h, field, cx.now_ms)? else {
            out.push(Reply::Integer(-2));
            continue;
        };
        let prev = f.expire_at_ms;
        let met = match cond {
            b"NX" => prev.is_none(),
            b"XX" => prev.is_some(),
            b"GT" => prev.is_some_and(|p| at > p),
            b"LT" => prev.is_none_or(|p| at < p),
            _ => true,
        };
        if !met {
            out.push(Reply::Integer(0));
            continue;
        }
        changed = true;
        if at <= cx.now_ms {
            delete_field(space, &mut h, field)?;
            out.push(Reply::Integer(2));
        } else {
            set_expiry(space, &mut h, field, f, Some(at))?;
            out.push(Reply::Integer(1));
        }
    }
    if changed {
        finish(space, &h, cx)?;
    }
    Ok(Reply::Array(out))
}

/// `HTTL key FIELDS numfields field [field ...]`, and HPTTL (milliseconds), HEXPIRETIME and
/// HPEXPIRETIME (Unix time): for each field, -2 (no such field), -1 (no expiry) or the time.
/// Seconds round up, as Redis 7.4 computes them (`(ms + 999) / 1000`), HEXPIRETIME included.
fn httl(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let (seconds, relative) = match name.as_str() {
        "httl" => (true, true),
        "hpttl" => (false, true),
        "hexpiretime" => (true, false),
        _ => (false, false),
    };
    let h = open_read(space, &args[1], cx)?;
    let fields = fields_arg(args, 2, "ERR Number of fields must be a positive integer")?;
    let Some(h) = h else {
        return Ok(Reply::Array(vec![Reply::Integer(-2); fields.len()]));
    };
    let base = if relative { cx.now_ms } else { 0 };
    let mut out = Vec::with_capacity(fields.len());
    for field in fields {
        out.push(Reply::Integer(
            match live_field(space, &h, field, cx.now_ms)? {
                None => -2,
                Some(Stored {
                    expire_at_ms: None, ..
                }) => -1,
                Some(Stored {
                    expire_at_ms: Some(at),
                    ..
                }) => {
                    let ms = at.saturating_sub(base);
                    (if seconds { ms.div_ceil(1000) } else { ms }) as i64
                }
            },
        ));
    }
    Ok(Reply::Array(out))
}

/// `HPERSIST key FIELDS numfields field [field ...]`: for each field, -2 (no such field), -1
/// (no expiry) or 1 (expiry removed).
fn hpersist(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    open_hash(space, &args[1])?;
    let fields = fields_arg(args, 2, "ERR Number of fields must be a positive integer")?;
    let Some(mut h) = open_write_existing(space, &args[1], cx)? else {
        return Ok(Reply::Array(vec![Reply::Integer(-2); fields.len()]));
    };
    let mut out = Vec::with_capacity(fields.len());
    let mut changed = false;
    for field in fields {
        out.push(Reply::Integer(
            match live_field(space, &h, field, cx.now_ms)? {
                None => -2,
                Some(f) if f.expire_at_ms.is_none() => -1,
                Some(f) => {
                    set_expiry(space, &mut h, field, f, None)?;
                    changed = true;
                    1
                }
            },
        ));
    }
    if changed {
        finish(space, &h, cx)?;
    }
    Ok(Reply::Array(out))
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
fn hscan(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let cursor = scan::parse_cursor(&args[2])?;
    let Some(h) = open_read(space, &args[1], cx)? else {
        return scan::reply(0, Vec::new(), None, |_, _, _| Ok(()));
    };
    let opts = scan::parse_opts(args, 3)?;
    let (next, mut page) = scan::page(space, &h, FIELD, cursor, opts.count)?;
    if h.meta.field_expiry {
        let mut live = Vec::with_capacity(page.len());
        for (sub, raw) in page {
            let f = decode(&h, raw)?;
            if !is_expired(f.expire_at_ms, cx.now_ms) {
                live.push((sub, f.value));
            }
        }
        page = live;
    }
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
        for i in 0..600 {
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
        assert_eq!(seen.len(), 600);
    }

    #[test]
    fn a_hash_stays_listpack_up_to_512_fields_as_in_redis_7_0() {
        // Found by `capdb difftest` (a hash of 129-512 fields): redis-server 7.0.15's
        // `hash-max-listpack-entries` is 512, so OBJECT ENCODING answers listpack and one HSCAN
        // call returns every field, whatever COUNT says.
        let mut s = MapSpace::new(0);
        for i in 0..512 {
            run(&mut s, &format!("HSET h f{i} v")).unwrap();
        }
        assert_eq!(run(&mut s, "OBJECT ENCODING h").unwrap(), bulk("listpack"));
        let Reply::Array(parts) = run(&mut s, "HSCAN h 0 COUNT 7").unwrap() else {
            panic!()
        };
        assert_eq!(parts[0], bulk("0"));
        let Reply::Array(items) = &parts[1] else {
            panic!()
        };
        assert_eq!(items.len(), 2 * 512);
        run(&mut s, "HSET h f512 v").unwrap();
        assert_eq!(run(&mut s, "OBJECT ENCODING h").unwrap(), bulk("hashtable"));
        // A value longer than `hash-max-listpack-value` (64) converts at once.
        run(&mut s, &format!("HSET g a {}", "x".repeat(64))).unwrap();
        assert_eq!(run(&mut s, "OBJECT ENCODING g").unwrap(), bulk("listpack"));
        run(&mut s, &format!("HSET g b {}", "x".repeat(65))).unwrap();
        assert_eq!(run(&mut s, "OBJECT ENCODING g").unwrap(), bulk("hashtable"));
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

    // Field expiry (Redis 7.4). The differential tester's Redis is 7.0, so these follow the
    // examples and reply descriptions of redis.io's command pages.

    fn ints(v: &[i64]) -> Reply {
        Reply::Array(v.iter().map(|n| Reply::Integer(*n)).collect())
    }

    /// The command's clock `ms` after the tests' `NOW` (the space's clock moves along).
    fn at(s: &mut MapSpace, ms: u64) -> Ctx {
        s.now_ms = crate::testing::words::NOW + ms;
        Ctx {
            now_ms: s.now_ms,
            ..crate::testing::words::cx()
        }
    }

    use crate::testing::words::{run_with, space};

    #[test]
    fn hexpire_example_fields_vanish_and_so_does_the_emptied_hash() {
        let mut s = MapSpace::new(crate::testing::words::NOW);
        run(&mut s, "HSET mykey field1 hello field2 world").unwrap();
        assert_eq!(
            run(&mut s, "HEXPIRE mykey 10 FIELDS 3 field1 field2 field3").unwrap(),
            ints(&[1, 1, -2])
        );
        let cx = at(&mut s, 9_999);
        assert_eq!(
            run_with(&mut s, "HLEN mykey", &cx).unwrap(),
            Reply::Integer(2)
        );
        let cx = at(&mut s, 10_000);
        for (cmd, empty) in [
            ("HGETALL mykey", Reply::Map(Vec::new())),
            ("HKEYS mykey", Reply::Array(Vec::new())),
            ("HLEN mykey", Reply::Integer(0)),
            ("HGET mykey field1", Reply::Nil),
            ("HEXISTS mykey field2", Reply::Integer(0)),
            ("HSTRLEN mykey field2", Reply::Integer(0)),
            ("HRANDFIELD mykey", Reply::Nil),
            ("HTTL mykey FIELDS 1 field1", ints(&[-2])),
        ] {
            assert_eq!(run_with(&mut s, cmd, &cx).unwrap(), empty, "{cmd}");
        }
        // The next write reclaims the expired fields with their index entries.
        assert_eq!(
            run_with(&mut s, "HSET mykey field3 x", &cx).unwrap(),
            Reply::Integer(1)
        );
        assert_eq!(
            run_with(&mut s, "HLEN mykey", &cx).unwrap(),
            Reply::Integer(1)
        );
        assert_eq!(s.elements.len(), 1, "only field3 is stored");
        // A write that adds nothing deletes a hash whose fields have all expired.
        run_with(&mut s, "HEXPIRE mykey 1 FIELDS 1 field3", &cx).unwrap();
        let cx = at(&mut s, 20_000);
        assert_eq!(
            run_with(&mut s, "HDEL mykey nosuch", &cx).unwrap(),
            Reply::Integer(0)
        );
        assert!(s.top.is_empty() && s.elements.is_empty());
    }

    #[test]
    fn httl_and_hpersist_examples() {
        let mut s = space();
        run(&mut s, "HSET mykey field1 hello field2 world").unwrap();
        assert_eq!(
            run(&mut s, "HEXPIRE mykey 300 FIELDS 2 field1 field3").unwrap(),
            ints(&[1, -2])
        );
        assert_eq!(
            run(&mut s, "HTTL mykey FIELDS 3 field1 field2 field3").unwrap(),
            ints(&[300, -1, -2])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE mykey 300 FIELDS 1 field2").unwrap(),
            ints(&[1])
        );
        assert_eq!(
            run(&mut s, "HPERSIST mykey FIELDS 2 field2 field3").unwrap(),
            ints(&[1, -2])
        );
        assert_eq!(
            run(&mut s, "HTTL mykey FIELDS 2 field1 field2").unwrap(),
            ints(&[300, -1])
        );
        assert_eq!(
            run(&mut s, "HPERSIST mykey FIELDS 1 field2").unwrap(),
            ints(&[-1])
        );
        // A missing key: -2 for every field.
        assert_eq!(
            run(&mut s, "HTTL nokey FIELDS 2 a b").unwrap(),
            ints(&[-2, -2])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE nokey 5 FIELDS 1 a").unwrap(),
            ints(&[-2])
        );
        assert_eq!(
            run(&mut s, "HPERSIST nokey FIELDS 1 a").unwrap(),
            ints(&[-2])
        );
    }

    #[test]
    fn the_four_clocks_of_the_readers() {
        let mut s = space();
        let now = crate::testing::words::NOW; // 1,000,000 ms: 1,000 s
        run(&mut s, "HSET h f v").unwrap();
        assert_eq!(
            run(&mut s, "HPEXPIRE h 1500 FIELDS 1 f").unwrap(),
            ints(&[1])
        );
        assert_eq!(run(&mut s, "HPTTL h FIELDS 1 f").unwrap(), ints(&[1500]));
        // Seconds round up, as Redis 7.4 computes them: 1.5 s left reads 2.
        assert_eq!(run(&mut s, "HTTL h FIELDS 1 f").unwrap(), ints(&[2]));
        assert_eq!(
            run(&mut s, "HPEXPIRETIME h FIELDS 1 f").unwrap(),
            ints(&[now as i64 + 1500])
        );
        assert_eq!(
            run(&mut s, "HEXPIRETIME h FIELDS 1 f").unwrap(),
            ints(&[(now + 1500).div_ceil(1000) as i64])
        );
        assert_eq!(
            run(
                &mut s,
                &format!("HEXPIREAT h {} FIELDS 1 f", now / 1000 + 50)
            )
            .unwrap(),
            ints(&[1])
        );
        assert_eq!(
            run(&mut s, "HPEXPIRETIME h FIELDS 1 f").unwrap(),
            ints(&[(now / 1000 + 50) as i64 * 1000])
        );
        assert_eq!(
            run(&mut s, &format!("HPEXPIREAT h {} FIELDS 1 f", now + 7)).unwrap(),
            ints(&[1])
        );
        assert_eq!(run(&mut s, "HPTTL h FIELDS 1 f").unwrap(), ints(&[7]));
    }

    #[test]
    fn conditions_treat_no_expiry_as_infinite() {
        let mut s = space();
        run(&mut s, "HSET h a 1 b 2").unwrap();
        // NX: only fields without an expiry; XX: only fields with one.
        assert_eq!(
            run(&mut s, "HEXPIRE h 100 XX FIELDS 1 a").unwrap(),
            ints(&[0])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE h 100 NX FIELDS 1 a").unwrap(),
            ints(&[1])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE h 200 nx FIELDS 2 a b").unwrap(),
            ints(&[0, 1])
        );
        // GT never sets an expiry on a field without one; LT always does.
        run(&mut s, "HPERSIST h FIELDS 1 b").unwrap();
        assert_eq!(
            run(&mut s, "HEXPIRE h 50 GT FIELDS 2 a b").unwrap(),
            ints(&[0, 0])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE h 150 GT FIELDS 1 a").unwrap(),
            ints(&[1])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE h 150 LT FIELDS 2 a b").unwrap(),
            ints(&[0, 1])
        );
        assert_eq!(
            run(&mut s, "HEXPIRE h 120 LT FIELDS 1 a").unwrap(),
            ints(&[1])
        );
        assert_eq!(
            run(&mut s, "HTTL h FIELDS 2 a b").unwrap(),
            ints(&[120, 150])
        );
    }

    #[test]
    fn a_time_now_or_past_deletes_the_field_and_the_last_one_the_key() {
        let mut s = space();
        run(&mut s, "HSET h a 1 b 2").unwrap();
        assert_eq!(run(&mut s, "HEXPIRE h 0 FIELDS 1 a").unwrap(), ints(&[2]));
        assert_eq!(run(&mut s, "HLEN h").unwrap(), Reply::Integer(1));
        assert_eq!(
            run(&mut s, "HPEXPIREAT h 1 FIELDS 2 b zz").unwrap(),
            ints(&[2, -2])
        );
        assert!(s.top.is_empty() && s.elements.is_empty());
    }

    #[test]
    fn hset_clears_a_fields_expiry_and_hincrby_keeps_it() {
        let mut s = space();
        run(&mut s, "HSET h n 1 s x").unwrap();
        run(&mut s, "HEXPIRE h 100 FIELDS 2 n s").unwrap();
        assert_eq!(run(&mut s, "HINCRBY h n 5").unwrap(), Reply::Integer(6));
        assert_eq!(
            run(&mut s, "HINCRBYFLOAT h n 0.5").unwrap(),
            Reply::Bulk(Bytes::from_static(b"6.5"))
        );
        assert_eq!(run(&mut s, "HSET h s y").unwrap(), Reply::Integer(0));
        assert_eq!(
            run(&mut s, "HTTL h FIELDS 2 n s").unwrap(),
            ints(&[100, -1])
        );
        assert_eq!(run(&mut s, "HGET h s").unwrap(), bulk("y"));
        // HDEL takes the field's index entry with it.
        assert_eq!(run(&mut s, "HDEL h n").unwrap(), Reply::Integer(1));
        assert_eq!(s.elements.len(), 1, "s's value, no index entry left");
    }

    #[test]
    fn scans_and_random_fields_skip_expired_fields_and_hlen_counts_live_ones() {
        let mut s = space();
        for i in 0..200 {
            run(&mut s, &format!("HSET h f{i} v{i}")).unwrap();
        }
        let half: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        run(
            &mut s,
            &format!("HPEXPIRE h 10 FIELDS 100 {}", half.join(" ")),
        )
        .unwrap();
        let cx = at(&mut s, 10);
        assert_eq!(
            run_with(&mut s, "HLEN h", &cx).unwrap(),
            Reply::Integer(100)
        );
        let mut seen = HashSet::new();
        let mut cursor = "0".to_string();
        loop {
            let Reply::Array(parts) =
                run_with(&mut s, &format!("HSCAN h {cursor} COUNT 13"), &cx).unwrap()
            else {
                panic!()
            };
            let (Reply::Bulk(c), Reply::Array(items)) = (&parts[0], &parts[1]) else {
                panic!()
            };
            for pair in items.chunks(2) {
                let (Reply::Bulk(f), Reply::Bulk(v)) = (&pair[0], &pair[1]) else {
                    panic!()
                };
                assert_eq!(&f[1..], &v[1..], "values are decoded");
                assert!(seen.insert(f.clone()));
            }
            cursor = String::from_utf8(c.to_vec()).unwrap();
            if cursor == "0" {
                break;
            }
        }
        assert_eq!(seen.len(), 100);
        assert!(!seen.contains(&Bytes::from_static(b"f0")));
        let Reply::Array(picked) = run_with(&mut s, "HRANDFIELD h -300", &cx).unwrap() else {
            panic!()
        };
        assert_eq!(picked.len(), 300);
        for p in picked {
            let Reply::Bulk(f) = p else { panic!() };
            let i: usize = std::str::from_utf8(&f[1..]).unwrap().parse().unwrap();
            assert!(i >= 100, "f{i} has expired");
        }
    }

    #[test]
    fn field_expiry_arguments_are_checked_as_redis_checks_them() {
        let mut s = space();
        s.put(
            b"str",
            capdb_types::Value::new(Bytes::from_static(b"x"), Timestamp(1), None),
        )
        .unwrap();
        // The key's type comes first.
        assert_eq!(
            run(&mut s, "HEXPIRE str x FIELDS 1 a").unwrap_err(),
            Error::WrongType
        );
        assert_eq!(
            run(&mut s, "HTTL str FIELDS 0 a").unwrap_err(),
            Error::WrongType
        );
        run(&mut s, "HSET h a 1").unwrap();
        for (cmd, error) in [
            (
                "HEXPIRE h x FIELDS 1 a",
                "ERR value is not an integer or out of range",
            ),
            (
                "HEXPIRE h -1 FIELDS 1 a",
                "ERR invalid expire time, must be >= 0",
            ),
            (
                "HEXPIRE h 70368744177664 FIELDS 1 a",
                "ERR invalid expire time in 'hexpire' command",
            ),
            (
                "HPEXPIREAT h 70368744177664 FIELDS 1 a",
                "ERR invalid expire time in 'hpexpireat' command",
            ),
            (
                "HEXPIRE h 10 FIELD 1 a",
                "ERR Mandatory argument FIELDS is missing or not at the right position",
            ),
            (
                "HEXPIRE h 10 NX XX FIELDS 1 a",
                "ERR Mandatory argument FIELDS is missing or not at the right position",
            ),
            (
                "HEXPIRE h 10 FIELDS 0 a",
                "ERR Parameter `numFields` should be greater than 0",
            ),
            (
                "HEXPIRE h 10 FIELDS 2 a",
                "ERR The `numfields` parameter must match the number of arguments",
            ),
            (
                "HTTL h FIELDS x a",
                "ERR Number of fields must be a positive integer",
            ),
            (
                "HPERSIST h FIELDS 1 a b",
                "ERR The `numfields` parameter must match the number of arguments",
            ),
            (
                "HPTTL h NOTFIELDS 1 a",
                "ERR Mandatory argument FIELDS is missing or not at the right position",
            ),
            (
                "HTTL h FIELDS 1",
                "ERR wrong number of arguments for 'httl' command",
            ),
        ] {
            assert_eq!(run(&mut s, cmd).unwrap_err(), err(error), "{cmd}");
        }
        // Nothing changed.
        assert_eq!(run(&mut s, "HTTL h FIELDS 1 a").unwrap(), ints(&[-1]));
    }

    #[test]
    fn a_hash_written_before_field_expiry_reads_and_converts_in_place() {
        // Values of a hash that never had a field expiry are stored as they are.
        let mut s = space();
        run(&mut s, "HSET h a 1 b 2").unwrap();
        let raw: Vec<Bytes> = s.elements.values().cloned().collect();
        assert!(raw.contains(&Bytes::from_static(b"1")), "{raw:?}");
        run(&mut s, "HEXPIRE h 100 FIELDS 1 a").unwrap();
        assert_eq!(run(&mut s, "HGET h b").unwrap(), bulk("2"));
        assert_eq!(run(&mut s, "HGET h a").unwrap(), bulk("1"));
        let Reply::Map(mut pairs) = run(&mut s, "HGETALL h").unwrap() else {
            panic!()
        };
        pairs.sort_by_key(|(f, _)| format!("{f:?}"));
        assert_eq!(pairs, vec![(bulk("a"), bulk("1")), (bulk("b"), bulk("2"))]);
    }

    #[test]
    fn relative_expiries_are_logged_as_absolute_times() {
        let now = crate::testing::words::NOW;
        let words = |cmd: &str| -> Vec<Bytes> {
            cmd.split_whitespace()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect()
        };
        assert_eq!(
            absolutize(&words("hexpire h 10 NX FIELDS 1 f"), now),
            Some(words(&format!(
                "HPEXPIREAT h {} NX FIELDS 1 f",
                now + 10_000
            )))
        );
        assert_eq!(
            absolutize(&words("HPEXPIRE h 5 FIELDS 1 f"), now),
            Some(words(&format!("HPEXPIREAT h {} FIELDS 1 f", now + 5)))
        );
        // Absolute forms, other commands and invalid times are left alone.
        assert_eq!(absolutize(&words("HEXPIREAT h 10 FIELDS 1 f"), now), None);
        assert_eq!(absolutize(&words("HSET h 10 x"), now), None);
        assert_eq!(absolutize(&words("HEXPIRE h -1 FIELDS 1 f"), now), None);
        // Replayed later, the rewritten command sets the same expiry.
        let mut s = space();
        run(&mut s, "HSET h f v").unwrap();
        let rewritten = absolutize(&words("HEXPIRE h 10 FIELDS 1 f"), now).unwrap();
        let cx = at(&mut s, 3_000);
        crate::execute(&rewritten, &mut s, &cx).unwrap();
        assert_eq!(
            run_with(&mut s, "HPEXPIRETIME h FIELDS 1 f", &cx).unwrap(),
            ints(&[(now + 10_000) as i64])
        );
    }
}
