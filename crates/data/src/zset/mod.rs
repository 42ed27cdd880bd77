//! Sorted sets: ZADD, ZRANGE (and its BYSCORE/BYLEX/REV/LIMIT forms), ZUNION/ZINTER/ZDIFF and
//! their store forms, ZSCAN and the rest, with Redis 7.0's replies and errors.
//!
//! # Layout
//!
//! Two element records per member:
//!
//! - `0 ‖ hash(member) ‖ member` (see [`crate::meta::hashed_sub`]) → the score, 8 bytes of `f64`
//!   little-endian: ZSCORE, ZADD and ZREM find a member with one read, ZSCAN pages in hash order
//!   ([`crate::scan::page`]) and ZRANDMEMBER seeks random hash positions
//!   ([`crate::hash::random_members`]). Sets use the same hashed layout (with empty values), so
//!   ZINTER/ZUNION/ZDIFF probe a set exactly as they probe a sorted set, with score 1.
//! - `1 ‖ sortable(score) ‖ member` → empty: the order index. [`sortable`] maps a score to 8
//!   bytes whose byte order is numeric order, so the index is ordered by (score, member bytes),
//!   exactly Redis's order. A score range or a lex range (the sorted set's members sharing one
//!   score) is one range read of it; ZRANGE by rank, ZRANK/ZREVRANK, ZCOUNT and ZLEXCOUNT walk
//!   it in pages, which costs O(rank) or O(count) reads where Redis's skiplist needs O(log n)
//!   (a rank range starts from whichever end is nearer).
//!
//! `-0` is stored (and indexed) as `0`, as Redis's listpack encoding does; a reply computed
//! without storing (ZADD INCR of a new member, ZUNION) prints `-0` as Redis does.
//!
//! `CollMeta::big` is Redis's `skiplist` encoding: a sorted set leaves `listpack` for good past
//! 128 members (`zset-max-listpack-entries`) or when a member longer than 64 bytes
//! (`zset-max-listpack-value`) is added; the store commands build a new sorted set, compact again
//! when its result is small. A compact sorted set answers ZSCAN in one page with cursor 0.
//!
//! BZPOPMIN/BZPOPMAX/BZMPOP (not here) build on [`pop`] and [`pop_first`].

mod range;
mod store;
#[cfg(test)]
mod tests;

use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, not_integer, syntax};
use crate::format::{format_double, format_double_listpack, parse_double_in_range, parse_int};
use crate::meta::{Open, finish, hashed_sub, open};
use crate::rng::Rng;
use crate::scan;
use crate::space::Space;

/// The hashed member → score records.
const SCORE: u8 = 0;
/// The order index.
const INDEX: u8 = 1;
/// Redis's `zset-max-listpack-entries` and `zset-max-listpack-value` defaults.
pub const LISTPACK_ENTRIES: u64 = 128;
pub const LISTPACK_VALUE: usize = 64;
/// Most members ZRANDMEMBER returns with a negative count (repetitions allowed): Redis would
/// build any reply asked for (and run out of memory); capdb refuses one larger than the largest
/// command it accepts.
const RANDOM_REPEAT_MAX: u64 = capdb_types::limits::FRAME_ELEMENTS_MAX as u64;

const KEY: Keys = Keys::Range(1, 1, 1);
const W: &[&str] = &["write", "denyoom", "fast"];
const WF: &[&str] = &["write", "fast"];
const R: &[&str] = &["readonly"];
const RF: &[&str] = &["readonly", "fast"];
const NUM: Keys = Keys::NumKeys { at: 1, dest: false };
const NUM_DEST: Keys = Keys::NumKeys { at: 2, dest: true };
const STORE: &[&str] = &["write", "denyoom", "movablekeys"];
const MOVABLE: &[&str] = &["readonly", "movablekeys"];

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "zadd",             arity: -4, flags: W,  keys: KEY, run: Run::Write(zadd) },
    Spec { name: "zcard",            arity: 2,  flags: RF, keys: KEY, run: Run::Read(zcard) },
    Spec { name: "zcount",           arity: 4,  flags: RF, keys: KEY, run: Run::Read(range::zcount) },
    Spec { name: "zdiff",            arity: -3, flags: MOVABLE, keys: NUM, run: Run::Read(store::zdiff) },
    Spec { name: "zdiffstore",       arity: -4, flags: STORE, keys: NUM_DEST, run: Run::Write(store::zdiffstore) },
    Spec { name: "zincrby",          arity: 4,  flags: W,  keys: KEY, run: Run::Write(zincrby) },
    Spec { name: "zinter",           arity: -3, flags: MOVABLE, keys: NUM, run: Run::Read(store::zinter) },
    Spec { name: "zintercard",       arity: -3, flags: MOVABLE, keys: NUM, run: Run::Read(store::zintercard) },
    Spec { name: "zinterstore",      arity: -4, flags: STORE, keys: NUM_DEST, run: Run::Write(store::zinterstore) },
    Spec { name: "zlexcount",        arity: 4,  flags: RF, keys: KEY, run: Run::Read(range::zlexcount) },
    Spec { name: "zmpop",            arity: -4, flags: &["write", "movablekeys"], keys: NUM, run: Run::Write(zmpop) },
    Spec { name: "zmscore",          arity: -3, flags: RF, keys: KEY, run: Run::Read(zmscore) },
    Spec { name: "zpopmax",          arity: -2, flags: WF, keys: KEY, run: Run::Write(zpopmax) },
    Spec { name: "zpopmin",          arity: -2, flags: WF, keys: KEY, run: Run::Write(zpopmin) },
    Spec { name: "zrandmember",      arity: -2, flags: R,  keys: KEY, run: Run::Read(zrandmember) },
    Spec { name: "zrange",           arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrange) },
    Spec { name: "zrangebylex",      arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrangebylex) },
    Spec { name: "zrangebyscore",    arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrangebyscore) },
    Spec { name: "zrangestore",      arity: -5, flags: &["write", "denyoom"], keys: Keys::Range(1, 2, 1), run: Run::Write(range::zrangestore) },
    Spec { name: "zrank",            arity: 3,  flags: RF, keys: KEY, run: Run::Read(range::zrank) },
    Spec { name: "zrem",             arity: -3, flags: WF, keys: KEY, run: Run::Write(zrem) },
    Spec { name: "zremrangebylex",   arity: 4,  flags: &["write"], keys: KEY, run: Run::Write(range::zremrangebylex) },
    Spec { name: "zremrangebyrank",  arity: 4,  flags: &["write"], keys: KEY, run: Run::Write(range::zremrangebyrank) },
    Spec { name: "zremrangebyscore", arity: 4,  flags: &["write"], keys: KEY, run: Run::Write(range::zremrangebyscore) },
    Spec { name: "zrevrange",        arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrevrange) },
    Spec { name: "zrevrangebylex",   arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrevrangebylex) },
    Spec { name: "zrevrangebyscore", arity: -4, flags: R,  keys: KEY, run: Run::Read(range::zrevrangebyscore) },
    Spec { name: "zrevrank",         arity: 3,  flags: RF, keys: KEY, run: Run::Read(range::zrevrank) },
    Spec { name: "zscan",            arity: -3, flags: R,  keys: KEY, run: Run::Read(zscan) },
    Spec { name: "zscore",           arity: 3,  flags: RF, keys: KEY, run: Run::Read(zscore) },
    Spec { name: "zunion",           arity: -3, flags: MOVABLE, keys: NUM, run: Run::Read(store::zunion) },
    Spec { name: "zunionstore",      arity: -4, flags: STORE, keys: NUM_DEST, run: Run::Write(store::zunionstore) },
];

/// A member and its score.
pub type Entry = (Bytes, f64);

// ---- Layout ------------------------------------------------------------------------------

const SIGN: u64 = 1 << 63;

/// `-0` is `0` wherever a score is stored.
fn norm(score: f64) -> f64 {
    if score == 0.0 { 0.0 } else { score }
}

/// A score as 64 bits whose unsigned order is the scores' numeric order: the IEEE-754 bits with
/// the sign bit flipped for non-negative numbers and every bit inverted for negative ones.
pub fn sortable(score: f64) -> u64 {
    let bits = norm(score).to_bits();
    if bits & SIGN == 0 { bits | SIGN } else { !bits }
}

/// The inverse of [`sortable`].
pub fn unsortable(s: u64) -> f64 {
    f64::from_bits(if s & SIGN != 0 { s & !SIGN } else { !s })
}

/// The index records of scores from `sortable` on start at or after this subkey.
fn index_prefix(sortable: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(INDEX);
    k.extend_from_slice(&sortable.to_be_bytes());
    k
}

fn index_key(score: f64, member: &[u8]) -> Vec<u8> {
    let mut k = index_prefix(sortable(score));
    k.extend_from_slice(member);
    k
}

fn decode_index(sub: &[u8]) -> Result<Entry> {
    if sub.len() < 9 || sub[0] != INDEX {
        return Err(Error::Corruption(format!(
            "sorted set index key of {} bytes",
            sub.len()
        )));
    }
    let s = u64::from_be_bytes(sub[1..9].try_into().expect("checked: 8 bytes"));
    Ok((Bytes::copy_from_slice(&sub[9..]), unsortable(s)))
}

/// The score stored in a member record; a set's member (empty value) counts as 1, as Redis's
/// ZUNION/ZINTER/ZDIFF take it.
/// Whether a subkey is an order-index record. Engines that cannot keep a secondary index
/// consistent under their merge rules (`ap` keyspaces keep only member → score records, merged
/// per member) derive the index from the score records instead of storing it.
pub fn is_index_sub(sub: &[u8]) -> bool {
    sub.first() == Some(&INDEX)
}

/// The order-index subkey of a member → score record (see [`is_index_sub`]).
pub fn index_of_score_record(sub: &[u8], value: &[u8]) -> Result<Vec<u8>> {
    let member = crate::meta::member_of_hashed(sub)?;
    Ok(index_key(decode_score(value)?, &member))
}

fn decode_score(raw: &[u8]) -> Result<f64> {
    if raw.is_empty() {
        return Ok(1.0);
    }
    let b: [u8; 8] = raw
        .try_into()
        .map_err(|_| Error::Corruption(format!("sorted set score of {} bytes", raw.len())))?;
    Ok(f64::from_le_bytes(b))
}

/// Every index record.
fn all_index() -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    (
        Bound::Included(vec![INDEX]),
        Bound::Excluded(vec![INDEX + 1]),
    )
}

fn open_zset(space: &mut dyn Space, key: &Bytes) -> Result<Option<Open>> {
    open(space, key, ValueKind::ZSet)
}

fn score_of(space: &mut dyn Space, z: &Open, member: &[u8]) -> Result<Option<f64>> {
    space
        .el_get(&z.coll, &hashed_sub(SCORE, member))?
        .map(|raw| decode_score(&raw))
        .transpose()
}

/// Stores `member` with `score`, replacing its index record when it had `old`.
fn put_member(
    space: &mut dyn Space,
    z: &mut Open,
    member: &[u8],
    old: Option<f64>,
    score: f64,
) -> Result<()> {
    let score = norm(score);
    match old {
        Some(o) => space.el_remove(&z.coll, &index_key(o, member))?,
        None => {
            z.meta.len += 1;
            if z.meta.len > LISTPACK_ENTRIES || member.len() > LISTPACK_VALUE {
                z.meta.big = true;
            }
        }
    }
    space.el_put(&z.coll, &hashed_sub(SCORE, member), &score.to_le_bytes())?;
    space.el_put(&z.coll, &index_key(score, member), &[])
}

fn remove_member(space: &mut dyn Space, z: &mut Open, member: &[u8], score: f64) -> Result<()> {
    space.el_remove(&z.coll, &index_key(score, member))?;
    space.el_remove(&z.coll, &hashed_sub(SCORE, member))?;
    z.meta.len -= 1;
    Ok(())
}

/// Whether Redis 7.0 would hold a newly built sorted set of `len` members, the longest
/// `longest` bytes, as a skiplist (the store commands).
fn big_for(len: u64, longest: usize) -> bool {
    len > LISTPACK_ENTRIES || longest > LISTPACK_VALUE
}

// ---- Replies -----------------------------------------------------------------------------

fn double(score: f64) -> Reply {
    Reply::Double(format_double(score))
}

/// Members, or members with scores (pairs RESP3 nests).
fn entries_reply(entries: Vec<Entry>, with_scores: bool) -> Reply {
    if with_scores {
        Reply::Pairs(
            entries
                .into_iter()
                .map(|(m, s)| (Reply::Bulk(m), double(s)))
                .collect(),
        )
    } else {
        Reply::Array(entries.into_iter().map(|(m, _)| Reply::Bulk(m)).collect())
    }
}

fn not_float() -> Error {
    err("ERR value is not a valid float")
}

// ---- ZADD, ZINCRBY -----------------------------------------------------------------------

#[derive(Default, Clone, Copy)]
struct AddFlags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
    incr: bool,
}

enum Outcome {
    Added(f64),
    Updated(f64),
    /// Present with that score already (or the same after INCR 0): processed, not changed.
    Same(f64),
    Nop,
}

/// Redis's `zsetAdd`.
fn zset_add(
    space: &mut dyn Space,
    z: &mut Open,
    score: f64,
    member: &[u8],
    f: AddFlags,
) -> Result<Outcome> {
    match score_of(space, z, member)? {
        Some(cur) => {
            if f.nx {
                return Ok(Outcome::Nop);
            }
            let mut score = score;
            if f.incr {
                score += cur;
                if score.is_nan() {
                    return Err(err("ERR resulting score is not a number (NaN)"));
                }
            }
            if (f.lt && score >= cur) || (f.gt && score <= cur) {
                return Ok(Outcome::Nop);
            }
            if score == cur {
                return Ok(Outcome::Same(score));
            }
            put_member(space, z, member, Some(cur), score)?;
            Ok(Outcome::Updated(score))
        }
        None if !f.xx => {
            put_member(space, z, member, None, score)?;
            Ok(Outcome::Added(score))
        }
        None => Ok(Outcome::Nop),
    }
}

/// `ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member ...]`: the number added (or
/// changed, with CH); with INCR, the new score (nil when not applied).
fn zadd(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut f = AddFlags::default();
    let mut ch = false;
    let mut at = 2;
    while at < args.len() {
        match &args[at].to_ascii_lowercase()[..] {
            b"nx" => f.nx = true,
            b"xx" => f.xx = true,
            b"ch" => ch = true,
            b"incr" => f.incr = true,
            b"gt" => f.gt = true,
            b"lt" => f.lt = true,
            _ => break,
        }
        at += 1;
    }
    add_generic(args, at, f, ch, space, cx)
}

/// `ZINCRBY key increment member`: the new score.
fn zincrby(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let f = AddFlags {
        incr: true,
        ..AddFlags::default()
    };
    add_generic(args, 2, f, false, space, cx)
}

fn add_generic(
    args: &[Bytes],
    at: usize,
    f: AddFlags,
    ch: bool,
    space: &mut dyn Space,
    cx: &Ctx,
) -> Result<Reply> {
    let rest = &args[at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err(syntax());
    }
    if f.nx && f.xx {
        return Err(err(
            "ERR XX and NX options at the same time are not compatible",
        ));
    }
    if (f.nx && (f.gt || f.lt)) || (f.gt && f.lt) {
        return Err(err(
            "ERR GT, LT, and/or NX options at the same time are not compatible",
        ));
    }
    if f.incr && rest.len() > 2 {
        return Err(err(
            "ERR INCR option supports a single increment-element pair",
        ));
    }
    let mut pairs = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        pairs.push((
            parse_double_in_range(&pair[0]).ok_or_else(not_float)?,
            &pair[1],
        ));
    }
    let nil_or_zero = || {
        if f.incr {
            Reply::Nil
        } else {
            Reply::Integer(0)
        }
    };
    let mut z = match open_zset(space, &args[1])? {
        Some(z) => z,
        None if f.xx => return Ok(nil_or_zero()),
        None => crate::meta::create(space, &args[1], ValueKind::ZSet)?,
    };
    for (_, member) in &pairs {
        capdb_types::limits::check_value(member, cx.value_bytes_max)?;
    }
    let (mut added, mut updated) = (0, 0);
    let mut last = None;
    for (score, member) in pairs {
        match zset_add(space, &mut z, score, member, f)? {
            Outcome::Added(s) => {
                added += 1;
                last = Some(s);
            }
            Outcome::Updated(s) => {
                updated += 1;
                last = Some(s);
            }
            Outcome::Same(s) => last = Some(s),
            Outcome::Nop => {}
        }
    }
    if added + updated > 0 {
        finish(space, &z, cx)?;
    }
    Ok(if f.incr {
        last.map_or(Reply::Nil, double)
    } else {
        Reply::Integer(if ch { added + updated } else { added })
    })
}

// ---- Single-member reads -----------------------------------------------------------------

/// `ZSCORE key member`.
fn zscore(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Nil);
    };
    Ok(score_of(space, &z, &args[2])?.map_or(Reply::Nil, double))
}

/// `ZMSCORE key member [member ...]`.
fn zmscore(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let z = open_zset(space, &args[1])?;
    let mut out = Vec::with_capacity(args.len() - 2);
    for m in &args[2..] {
        out.push(match &z {
            Some(z) => score_of(space, z, m)?.map_or(Reply::Nil, double),
            None => Reply::Nil,
        });
    }
    Ok(Reply::Array(out))
}

/// `ZCARD key`.
fn zcard(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(
        open_zset(space, &args[1])?.map_or(0, |z| z.meta.len as i64),
    ))
}

/// `ZREM key member [member ...]`: the number removed; an emptied sorted set is deleted.
fn zrem(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(mut z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let mut removed = 0;
    for m in &args[2..] {
        if let Some(score) = score_of(space, &z, m)? {
            remove_member(space, &mut z, m, score)?;
            removed += 1;
            if z.meta.len == 0 {
                break;
            }
        }
    }
    if removed > 0 {
        finish(space, &z, cx)?;
    }
    Ok(Reply::Integer(removed))
}

// ---- Pops --------------------------------------------------------------------------------

/// Removes and returns up to `count` members with the lowest scores (the highest when `max`),
/// in pop order. The caller stores the meta with [`finish`] (which deletes an emptied key).
pub fn pop(space: &mut dyn Space, z: &mut Open, max: bool, count: u64) -> Result<Vec<Entry>> {
    let (lo, hi) = all_index();
    let got = range::take(space, z, lo, hi, max, 0, count.min(z.meta.len))?;
    for (m, s) in &got {
        remove_member(space, z, m, *s)?;
    }
    Ok(got)
}

/// ZMPOP's (and BZMPOP's) step: pops up to `count` members from the first of `keys` that
/// exists; `WRONGTYPE` when that key is not a sorted set; `None` when none exists.
pub fn pop_first(
    space: &mut dyn Space,
    keys: &[Bytes],
    max: bool,
    count: u64,
    cx: &Ctx,
) -> Result<Option<(Bytes, Vec<Entry>)>> {
    for key in keys {
        if let Some(mut z) = open_zset(space, key)? {
            let got = pop(space, &mut z, max, count)?;
            finish(space, &z, cx)?;
            return Ok(Some((key.clone(), got)));
        }
    }
    Ok(None)
}

fn pop_command(args: &[Bytes], space: &mut dyn Space, cx: &Ctx, max: bool) -> Result<Reply> {
    if args.len() > 3 {
        return Err(syntax());
    }
    let count = match args.get(2) {
        None => None,
        // Redis's getPositiveLongFromObjectOrReply: one message for a non-integer and a
        // negative count.
        Some(raw) => Some(
            parse_int(raw)
                .filter(|n| *n >= 0)
                .ok_or_else(|| err("ERR value is out of range, must be positive"))?
                as u64,
        ),
    };
    let Some(mut z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Array(Vec::new()));
    };
    if count == Some(0) {
        return Ok(Reply::Array(Vec::new()));
    }
    let got = pop(space, &mut z, max, count.unwrap_or(1))?;
    finish(space, &z, cx)?;
    Ok(match count {
        Some(_) => entries_reply(got, true),
        None => Reply::Array(
            got.into_iter()
                .flat_map(|(m, s)| [Reply::Bulk(m), double(s)])
                .collect(),
        ),
    })
}

/// `ZPOPMIN key [count]`: without count a flat `[member, score]`, with count pairs.
fn zpopmin(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    pop_command(args, space, cx, false)
}

/// `ZPOPMAX key [count]`.
fn zpopmax(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    pop_command(args, space, cx, true)
}

/// A positive integer argument of ZMPOP (`numkeys`, `COUNT`), with Redis's one message for both
/// a non-integer and a value below 1.
fn positive(raw: &[u8], msg: &str) -> Result<u64> {
    match parse_int(raw) {
        Some(n) if n >= 1 => Ok(n as u64),
        _ => Err(err(msg)),
    }
}

/// `ZMPOP numkeys key [key ...] MIN|MAX [COUNT count]`: `[key, [[member, score], ...]]` (nested
/// in both protocols), or a null array when every key is missing.
/// ZMPOP's (and BZMPOP's) arguments: `numkeys key [key ...] MIN|MAX [COUNT count]` with
/// `numkeys` at `numkeys_at` (ZMPOP: 1, BZMPOP: 2), with Redis's errors in Redis's order. The
/// keys' indices, whether MAX, and the count.
pub fn parse_zmpop(
    args: &[Bytes],
    numkeys_at: usize,
) -> Result<(std::ops::Range<usize>, bool, u64)> {
    let numkeys = positive(
        args.get(numkeys_at).map_or(&b""[..], |a| &a[..]),
        "ERR numkeys should be greater than 0",
    )?;
    let where_at = numkeys.saturating_add(numkeys_at as u64 + 1);
    if where_at >= args.len() as u64 {
        return Err(syntax());
    }
    let where_at = where_at as usize;
    let max = match &args[where_at].to_ascii_uppercase()[..] {
        b"MIN" => false,
        b"MAX" => true,
        _ => return Err(syntax()),
    };
    let mut count = None;
    let mut i = where_at + 1;
    while i < args.len() {
        if count.is_none() && args[i].eq_ignore_ascii_case(b"COUNT") && i + 1 < args.len() {
            count = Some(positive(
                &args[i + 1],
                "ERR count should be greater than 0",
            )?);
            i += 2;
        } else {
            return Err(syntax());
        }
    }
    Ok((numkeys_at + 1..where_at, max, count.unwrap_or(1)))
}

fn zmpop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (keys, max, count) = parse_zmpop(args, 1)?;
    Ok(match pop_first(space, &args[keys], max, count, cx)? {
        None => Reply::NilArray,
        Some((key, got)) => Reply::Array(vec![
            Reply::Bulk(key),
            Reply::Array(
                got.into_iter()
                    .map(|(m, s)| Reply::Array(vec![Reply::Bulk(m), double(s)]))
                    .collect(),
            ),
        ]),
    })
}

// ---- ZRANDMEMBER, ZSCAN ------------------------------------------------------------------

/// `ZRANDMEMBER key [count [WITHSCORES]]`: distinct members for a positive count, `-count`
/// members with repetitions for a negative one.
fn zrandmember(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut count = None;
    let mut with_scores = false;
    if args.len() >= 3 {
        let n = parse_int(&args[2]).ok_or_else(not_integer)?;
        if n == i64::MIN {
            return Err(err(
                "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807",
            ));
        }
        if args.len() > 4 || (args.len() == 4 && !args[3].eq_ignore_ascii_case(b"WITHSCORES")) {
            return Err(syntax());
        }
        if args.len() == 4 {
            with_scores = true;
            if !(-(i64::MAX / 2)..=i64::MAX / 2).contains(&n) {
                return Err(err("ERR value is out of range"));
            }
        }
        count = Some(n);
    }
    let Some(z) = open_zset(space, &args[1])? else {
        return Ok(match count {
            None => Reply::Nil,
            Some(_) => Reply::Array(Vec::new()),
        });
    };
    if count == Some(0) {
        return Ok(Reply::Array(Vec::new()));
    }
    if let Some(n) = count
        && n < 0
        && n.unsigned_abs() > RANDOM_REPEAT_MAX
    {
        return Err(err(format!(
            "ERR count is over the limit of {RANDOM_REPEAT_MAX} members with repetitions"
        )));
    }
    let mut rng = Rng::new(cx.seed);
    let picked = crate::hash::random_members(space, &z, SCORE, count.unwrap_or(1), &mut rng)?;
    let Some(_) = count else {
        return Ok(picked
            .into_iter()
            .next()
            .map_or(Reply::Nil, |(m, _)| Reply::Bulk(m)));
    };
    let entries = picked
        .into_iter()
        .map(|(m, raw)| Ok((m, decode_score(&raw)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(entries_reply(entries, with_scores))
}

/// `ZSCAN key cursor [MATCH pattern] [COUNT count]`: members and scores (as bulk strings).
fn zscan(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let cursor = scan::parse_cursor(&args[2])?;
    let Some(z) = open_zset(space, &args[1])? else {
        return scan::reply(0, Vec::new(), None, |_, _, _| Ok(()));
    };
    let opts = scan::parse_opts(args, 3)?;
    let (next, page) = scan::page(space, &z, SCORE, cursor, opts.count)?;
    // A compact sorted set answers the score texts its listpack holds; a big one `%.17g`.
    let text = if z.meta.big {
        format_double
    } else {
        format_double_listpack
    };
    scan::reply(next, page, opts.pattern.as_ref(), |m, raw, items| {
        items.push(Reply::Bulk(m));
        items.push(Reply::Bulk(Bytes::from(text(decode_score(&raw)?))));
        Ok(())
    })
}

/// Opens `key` for a write that replaces it wholesale (the store commands): a new, empty sorted
/// set (the old value, of any type, is replaced when the result is stored).
fn open_new(space: &mut dyn Space, key: &Bytes) -> Result<Open> {
    crate::meta::create(space, key, ValueKind::ZSet)
}

/// Stores `entries` (distinct members) as the new value of `dst`, replacing whatever it held
/// (its TTL too), or deletes `dst` when there are none: the store commands' ending. Returns the
/// number stored.
fn store_entries(space: &mut dyn Space, dst: &Bytes, entries: &[Entry], cx: &Ctx) -> Result<Reply> {
    if entries.is_empty() {
        if space.get(dst)?.is_some() {
            space.remove(dst)?;
        }
        return Ok(Reply::Integer(0));
    }
    let mut z = open_new(space, dst)?;
    let mut longest = 0;
    for (m, s) in entries {
        longest = longest.max(m.len());
        put_member(space, &mut z, m, None, *s)?;
    }
    z.meta.big = big_for(z.meta.len, longest);
    finish(space, &z, cx)?;
    Ok(Reply::Integer(entries.len() as i64))
}
