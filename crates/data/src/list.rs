//! Lists: LPUSH, LPOP, LRANGE, LINSERT, LMOVE, LMPOP and the rest of the non-blocking list
//! commands, with Redis 7's replies and errors.
//!
//! # Layout
//!
//! A list's elements sit at contiguous positions `[meta.head, meta.tail)` (`tail - head ==
//! len`); the element at position `p` is the record `0 ‖ u64be(p as u64 ^ 1 << 63)`, so byte
//! order is position order and a range of indices is one ordered range read. Why:
//!
//! - pushes and pops at either end touch one element (LPUSH writes at `head - 1`, RPUSH at
//!   `tail`), and LINDEX/LSET are one element read/write (position `head + index`), as cheap
//!   as Redis's quicklist or cheaper;
//! - LRANGE reads only the requested run; LTRIM removes only the trimmed ends;
//! - LINSERT and LREM renumber the shorter side of the change (O(N), as in Redis), reading it a
//!   page at a time, so no command holds more than a page of a big list in memory besides
//!   what it replies (LREM keeps fixed the end farther from the removed elements);
//! - a list that LTRIM or LREM empties is deleted whole by [`finish`]: its element records go
//!   with the key (the engine reclaims them), without one delete per element.
//!
//! `CollMeta::big` stays false: Redis 7.0 reports `quicklist` for every list, and lists have no
//! SCAN command whose paging it would change.
//!
//! The blocking commands (BLPOP, BRPOP, BLMOVE, BLMPOP) are built on [`pop`], [`pop_count`],
//! [`move_element`], [`mpop`], [`parse_where`] and [`parse_mpop`].

use std::ops::{Bound, Range};

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, int_arg, not_integer, syntax};
use crate::format::parse_int;
use crate::meta::{Open, finish, open, open_or_create};
use crate::space::{Coll, ElRange, Space};

const ITEM: u8 = 0;
/// How many elements a scan over a list (LINSERT, LREM, LPOS, renumbering) reads at once.
const PAGE: usize = 256;

const KEY: Keys = Keys::Range(1, 1, 1);
const TWO_KEYS: Keys = Keys::Range(1, 2, 1);
const PUSH: &[&str] = &["write", "denyoom", "fast"];

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "lindex",    arity: 3,  flags: &["readonly"], keys: KEY, run: Run::Read(lindex) },
    Spec { name: "linsert",   arity: 5,  flags: &["write", "denyoom"], keys: KEY, run: Run::Write(linsert) },
    Spec { name: "llen",      arity: 2,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(llen) },
    Spec { name: "lmove",     arity: 5,  flags: &["write", "denyoom"], keys: TWO_KEYS, run: Run::Write(lmove) },
    Spec { name: "lmpop",     arity: -4, flags: &["write", "movablekeys"], keys: Keys::NumKeys { at: 1, dest: false }, run: Run::Write(lmpop) },
    Spec { name: "lpop",      arity: -2, flags: &["write", "fast"], keys: KEY, run: Run::Write(lpop) },
    Spec { name: "lpos",      arity: -3, flags: &["readonly"], keys: KEY, run: Run::Read(lpos) },
    Spec { name: "lpush",     arity: -3, flags: PUSH, keys: KEY, run: Run::Write(lpush) },
    Spec { name: "lpushx",    arity: -3, flags: PUSH, keys: KEY, run: Run::Write(lpushx) },
    Spec { name: "lrange",    arity: 4,  flags: &["readonly"], keys: KEY, run: Run::Read(lrange) },
    Spec { name: "lrem",      arity: 4,  flags: &["write"], keys: KEY, run: Run::Write(lrem) },
    Spec { name: "lset",      arity: 4,  flags: &["write", "denyoom"], keys: KEY, run: Run::Write(lset) },
    Spec { name: "ltrim",     arity: 4,  flags: &["write"], keys: KEY, run: Run::Write(ltrim) },
    Spec { name: "rpop",      arity: -2, flags: &["write", "fast"], keys: KEY, run: Run::Write(rpop) },
    Spec { name: "rpoplpush", arity: 3,  flags: &["write", "denyoom"], keys: TWO_KEYS, run: Run::Write(rpoplpush) },
    Spec { name: "rpush",     arity: -3, flags: PUSH, keys: KEY, run: Run::Write(rpush) },
    Spec { name: "rpushx",    arity: -3, flags: PUSH, keys: KEY, run: Run::Write(rpushx) },
];

// ---------------------------------------------------------------------------------------------
// Positions and element access

/// The subkey of the element at position `pos` (byte order is position order).
fn sub(pos: i64) -> [u8; 9] {
    let mut s = [ITEM; 9];
    s[1..].copy_from_slice(&((pos as u64) ^ (1 << 63)).to_be_bytes());
    s
}

/// The position of an element subkey (see [`sub`]).
fn pos_of(sub: &[u8]) -> Result<i64> {
    match sub {
        [ITEM, rest @ ..] if rest.len() == 8 => {
            let raw: [u8; 8] = rest.try_into().expect("checked: 8 bytes");
            Ok((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
        }
        _ => Err(Error::Corruption(format!(
            "list element key of {} bytes",
            sub.len()
        ))),
    }
}

/// The live list at `key`: `None` when absent, `WrongType` when the key holds anything else.
pub fn open_list(space: &mut dyn Space, key: &Bytes) -> Result<Option<Open>> {
    open(space, key, ValueKind::List)
}

fn missing_element(pos: i64) -> Error {
    Error::Corruption(format!("list element at position {pos} is missing"))
}

/// Calls `f` with each element at positions `lo..=hi`, ascending (descending when `rev`),
/// reading a page at a time, until `f` returns false. `f` may write positions already visited.
fn walk(
    space: &mut dyn Space,
    coll: &Coll,
    lo: i64,
    hi: i64,
    rev: bool,
    mut f: impl FnMut(&mut dyn Space, i64, Bytes) -> Result<bool>,
) -> Result<()> {
    let (mut lo, mut hi) = (lo, hi);
    while lo <= hi {
        let (a, b) = (sub(lo), sub(hi));
        let page = space.el_range(
            coll,
            ElRange {
                lo: Bound::Included(&a),
                hi: Bound::Included(&b),
                rev,
                limit: PAGE,
            },
        )?;
        if page.is_empty() {
            return Err(missing_element(if rev { hi } else { lo }));
        }
        for (k, v) in page {
            let p = pos_of(&k)?;
            if !f(space, p, v)? {
                return Ok(());
            }
            // Positions are contiguous: the walk is over once the far end is visited.
            if rev {
                if p <= lo {
                    return Ok(());
                }
                hi = p - 1;
            } else {
                if p >= hi {
                    return Ok(());
                }
                lo = p + 1;
            }
        }
    }
    Ok(())
}

/// Moves the elements at positions `lo..=hi` by `delta` (±1) positions, overwriting what is
/// there; the position vacated at the far end keeps its old element.
fn shift(space: &mut dyn Space, coll: &Coll, lo: i64, hi: i64, delta: i64) -> Result<()> {
    walk(space, coll, lo, hi, delta > 0, |space, p, v| {
        space.el_put(coll, &sub(p + delta), &v)?;
        Ok(true)
    })
}

/// Adds `value` at the head (`left`) or the tail.
pub fn push(space: &mut dyn Space, l: &mut Open, value: &[u8], left: bool) -> Result<()> {
    let pos = if left { l.meta.head - 1 } else { l.meta.tail };
    space.el_put(&l.coll, &sub(pos), value)?;
    if left {
        l.meta.head = pos;
    } else {
        l.meta.tail = pos + 1;
    }
    l.meta.len += 1;
    Ok(())
}

/// Removes up to `n` elements from the head (`left`) or the tail, in pop order. The caller
/// stores the meta ([`finish`]).
pub fn take(space: &mut dyn Space, l: &mut Open, left: bool, n: u64) -> Result<Vec<Bytes>> {
    let n = n.min(l.meta.len);
    if n == 0 {
        return Ok(Vec::new());
    }
    let (lo, hi) = if left {
        (l.meta.head, l.meta.head + n as i64 - 1)
    } else {
        (l.meta.tail - n as i64, l.meta.tail - 1)
    };
    let mut out = Vec::with_capacity(n.min(PAGE as u64) as usize);
    walk(space, &l.coll, lo, hi, !left, |space, p, v| {
        space.el_remove(&l.coll, &sub(p))?;
        out.push(v);
        Ok(true)
    })?;
    if out.len() as u64 != n {
        return Err(missing_element(if left { lo } else { hi }));
    }
    if left {
        l.meta.head += n as i64;
    } else {
        l.meta.tail -= n as i64;
    }
    l.meta.len -= n;
    Ok(out)
}

/// Inserts `value` so that it ends up at `index` (`0..=len`), renumbering the shorter side.
fn insert_at(space: &mut dyn Space, l: &mut Open, index: u64, value: &[u8]) -> Result<()> {
    let len = l.meta.len;
    let at = l.meta.head + index as i64;
    if index <= len - index {
        if index > 0 {
            shift(space, &l.coll, l.meta.head, at - 1, -1)?;
        }
        space.el_put(&l.coll, &sub(at - 1), value)?;
        l.meta.head -= 1;
    } else {
        shift(space, &l.coll, at, l.meta.tail - 1, 1)?;
        space.el_put(&l.coll, &sub(at), value)?;
        l.meta.tail += 1;
    }
    l.meta.len += 1;
    Ok(())
}

/// The position of a Redis index (negative: from the tail), `None` when out of range.
fn position(l: &Open, index: i64) -> Option<i64> {
    let len = l.meta.len as i64;
    let i = if index < 0 { index + len } else { index };
    (0..len).contains(&i).then(|| l.meta.head + i)
}

/// LRANGE's and LTRIM's `start`/`stop` clamped to the list: the index range kept, empty when
/// nothing is.
fn clamp_range(len: i64, start: i64, stop: i64) -> Range<i64> {
    let start = if start < 0 {
        (start + len).max(0)
    } else {
        start
    };
    let stop = if stop < 0 { stop + len } else { stop };
    if start > stop || start >= len {
        return 0..0;
    }
    start..stop.min(len - 1) + 1
}

// ---------------------------------------------------------------------------------------------
// Helpers for the blocking commands

/// `LEFT` (true) or `RIGHT` (false), any case; else `ERR syntax error`.
pub fn parse_where(arg: &[u8]) -> Result<bool> {
    if arg.eq_ignore_ascii_case(b"LEFT") {
        Ok(true)
    } else if arg.eq_ignore_ascii_case(b"RIGHT") {
        Ok(false)
    } else {
        Err(syntax())
    }
}

/// Pops one element from the head (`from_left`) or tail of the list at `key`; `None` when the
/// key is absent. Deletes an emptied list.
pub fn pop(space: &mut dyn Space, key: &Bytes, from_left: bool, cx: &Ctx) -> Result<Option<Bytes>> {
    Ok(pop_count(space, key, from_left, 1, cx)?.and_then(|v| v.into_iter().next()))
}

/// Pops up to `count` elements (clamped to the length); `None` when the key is absent.
pub fn pop_count(
    space: &mut dyn Space,
    key: &Bytes,
    from_left: bool,
    count: u64,
    cx: &Ctx,
) -> Result<Option<Vec<Bytes>>> {
    let Some(mut l) = open_list(space, key)? else {
        return Ok(None);
    };
    let out = take(space, &mut l, from_left, count)?;
    if !out.is_empty() {
        finish(space, &l, cx)?;
    }
    Ok(Some(out))
}

/// LMOVE: pops from `src` (head when `from_left`) and pushes onto `dst` (head when `to_left`),
/// returning the element; `None` when `src` is absent (whatever `dst` holds). `WRONGTYPE` when
/// `src`, or `dst` while `src` has elements, is not a list; nothing moves then.
pub fn move_element(
    space: &mut dyn Space,
    src: &Bytes,
    dst: &Bytes,
    from_left: bool,
    to_left: bool,
    cx: &Ctx,
) -> Result<Option<Bytes>> {
    let Some(mut s) = open_list(space, src)? else {
        return Ok(None);
    };
    if src == dst {
        let Some(v) = take(space, &mut s, from_left, 1)?.pop() else {
            return Ok(None);
        };
        push(space, &mut s, &v, to_left)?;
        finish(space, &s, cx)?;
        return Ok(Some(v));
    }
    let mut d = open_or_create(space, dst, ValueKind::List)?;
    let Some(v) = take(space, &mut s, from_left, 1)?.pop() else {
        return Ok(None);
    };
    finish(space, &s, cx)?;
    push(space, &mut d, &v, to_left)?;
    finish(space, &d, cx)?;
    Ok(Some(v))
}

/// LMPOP's (and BLMPOP's) arguments after the command name (and timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpopArgs {
    /// Indices of the keys in the argument list.
    pub keys: Range<usize>,
    pub from_left: bool,
    pub count: u64,
}

/// Parses `numkeys key [key ...] LEFT|RIGHT [COUNT count]` with `numkeys` at `numkeys_at`
/// (LMPOP: 1, BLMPOP: 2), with Redis's errors in Redis's order.
pub fn parse_mpop(args: &[Bytes], numkeys_at: usize) -> Result<MpopArgs> {
    let numkeys = args
        .get(numkeys_at)
        .and_then(|a| parse_int(a))
        .filter(|&n| n > 0)
        .ok_or_else(|| err("ERR numkeys should be greater than 0"))?;
    let first = numkeys_at + 1;
    let where_at = first
        .checked_add(usize::try_from(numkeys).unwrap_or(usize::MAX))
        .filter(|&w| w < args.len())
        .ok_or_else(syntax)?;
    let from_left = parse_where(&args[where_at])?;
    let mut count = None;
    let mut j = where_at + 1;
    while j < args.len() {
        if count.is_none() && args[j].eq_ignore_ascii_case(b"COUNT") && j + 1 < args.len() {
            let n = parse_int(&args[j + 1])
                .filter(|&n| n > 0)
                .ok_or_else(|| err("ERR count should be greater than 0"))?;
            count = Some(n as u64);
            j += 2;
        } else {
            return Err(syntax());
        }
    }
    Ok(MpopArgs {
        keys: first..where_at,
        from_left,
        count: count.unwrap_or(1),
    })
}

/// LMPOP's work: pops up to `count` elements from the first non-empty list among `keys`,
/// returning its key and the elements; `None` when every key is absent. `WRONGTYPE` when a key
/// before the first non-empty list is not a list.
pub fn mpop(
    space: &mut dyn Space,
    keys: &[Bytes],
    from_left: bool,
    count: u64,
    cx: &Ctx,
) -> Result<Option<(Bytes, Vec<Bytes>)>> {
    for key in keys {
        if let Some(popped) = pop_count(space, key, from_left, count, cx)?
            && !popped.is_empty()
        {
            return Ok(Some((key.clone(), popped)));
        }
    }
    Ok(None)
}

/// The reply of LMPOP/BLMPOP: `[key, [elements]]`, or the null array.
pub fn mpop_reply(popped: Option<(Bytes, Vec<Bytes>)>) -> Reply {
    match popped {
        None => Reply::NilArray,
        Some((key, elements)) => Reply::Array(vec![
            Reply::Bulk(key),
            Reply::Array(elements.into_iter().map(Reply::Bulk).collect()),
        ]),
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

fn push_command(
    args: &[Bytes],
    space: &mut dyn Space,
    cx: &Ctx,
    left: bool,
    only_existing: bool,
) -> Result<Reply> {
    let mut l = if only_existing {
        match open_list(space, &args[1])? {
            Some(l) => l,
            None => return Ok(Reply::Integer(0)),
        }
    } else {
        open_or_create(space, &args[1], ValueKind::List)?
    };
    for v in &args[2..] {
        push(space, &mut l, v, left)?;
    }
    finish(space, &l, cx)?;
    Ok(Reply::Integer(l.meta.len as i64))
}

/// `LPUSH key element [element ...]`: each element in turn at the head; the new length.
fn lpush(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    push_command(args, space, cx, true, false)
}

/// `RPUSH key element [element ...]`: each element in turn at the tail; the new length.
fn rpush(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    push_command(args, space, cx, false, false)
}

/// `LPUSHX key element [element ...]`: LPUSH onto an existing list only (else 0).
fn lpushx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    push_command(args, space, cx, true, true)
}

/// `RPUSHX key element [element ...]`: RPUSH onto an existing list only (else 0).
fn rpushx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    push_command(args, space, cx, false, true)
}

fn pop_command(args: &[Bytes], space: &mut dyn Space, cx: &Ctx, left: bool) -> Result<Reply> {
    let count = match args.len() {
        2 => None,
        3 => Some(
            parse_int(&args[2])
                .filter(|&n| n >= 0)
                .ok_or_else(|| err("ERR value is out of range, must be positive"))?
                as u64,
        ),
        _ => {
            let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
            return Err(crate::command::wrong_args(&name));
        }
    };
    let popped = pop_count(space, &args[1], left, count.unwrap_or(1), cx)?;
    Ok(match (popped, count) {
        (None, None) => Reply::Nil,
        (None, Some(_)) => Reply::NilArray,
        (Some(v), None) => v.into_iter().next().map_or(Reply::Nil, Reply::Bulk),
        (Some(v), Some(_)) => Reply::Array(v.into_iter().map(Reply::Bulk).collect()),
    })
}

/// `LPOP key [count]`: the head element (nil when absent), or with a count an array of up to
/// `count` elements (a null array when absent).
fn lpop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    pop_command(args, space, cx, true)
}

/// `RPOP key [count]`: LPOP from the tail.
fn rpop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    pop_command(args, space, cx, false)
}

/// `LLEN key`.
fn llen(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(
        open_list(space, &args[1])?.map_or(0, |l| l.meta.len as i64),
    ))
}

/// `LRANGE key start stop`: the elements at indices `start..=stop` (negative: from the tail).
fn lrange(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let (start, stop) = (int_arg(args, 2)?, int_arg(args, 3)?);
    let Some(l) = open_list(space, &args[1])? else {
        return Ok(Reply::Array(Vec::new()));
    };
    let r = clamp_range(l.meta.len as i64, start, stop);
    if r.is_empty() {
        return Ok(Reply::Array(Vec::new()));
    }
    let (lo, hi) = (sub(l.meta.head + r.start), sub(l.meta.head + r.end - 1));
    let got = space.el_values(
        &l.coll,
        ElRange {
            lo: Bound::Included(&lo),
            hi: Bound::Included(&hi),
            rev: false,
            limit: (r.end - r.start) as usize,
        },
    )?;
    if got.len() as i64 != r.end - r.start {
        return Err(missing_element(l.meta.head + r.start));
    }
    Ok(Reply::Array(got.into_iter().map(Reply::Bulk).collect()))
}

/// `LINDEX key index`: the element at `index` (negative: from the tail), nil when out of range.
fn lindex(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(l) = open_list(space, &args[1])? else {
        return Ok(Reply::Nil);
    };
    let index = int_arg(args, 2)?;
    let Some(pos) = position(&l, index) else {
        return Ok(Reply::Nil);
    };
    space
        .el_get(&l.coll, &sub(pos))?
        .map(Reply::Bulk)
        .ok_or_else(|| missing_element(pos))
}

/// `LSET key index element`: OK, or `ERR no such key` / `ERR index out of range`.
fn lset(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(l) = open_list(space, &args[1])? else {
        return Err(err("ERR no such key"));
    };
    let index = int_arg(args, 2)?;
    let pos = position(&l, index).ok_or_else(|| err("ERR index out of range"))?;
    space.el_put(&l.coll, &sub(pos), &args[3])?;
    finish(space, &l, cx)?;
    Ok(Reply::Ok)
}

/// `LINSERT key BEFORE|AFTER pivot element`: inserts next to the first `pivot` from the head;
/// the new length, -1 when there is no pivot, 0 when the key is absent.
fn linsert(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let after = if args[2].eq_ignore_ascii_case(b"AFTER") {
        true
    } else if args[2].eq_ignore_ascii_case(b"BEFORE") {
        false
    } else {
        return Err(syntax());
    };
    let Some(mut l) = open_list(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let pivot = &args[3];
    let mut found = None;
    walk(
        space,
        &l.coll,
        l.meta.head,
        l.meta.tail - 1,
        false,
        |_, p, v| {
            if v == pivot {
                found = Some(p);
            }
            Ok(found.is_none())
        },
    )?;
    let Some(p) = found else {
        return Ok(Reply::Integer(-1));
    };
    let index = (p - l.meta.head) as u64 + after as u64;
    insert_at(space, &mut l, index, &args[4])?;
    finish(space, &l, cx)?;
    Ok(Reply::Integer(l.meta.len as i64))
}

/// `LREM key count element`: removes the first `count` occurrences (from the tail when
/// negative, all when 0); the number removed.
fn lrem(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let count = int_arg(args, 2)?;
    let Some(mut l) = open_list(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    if l.meta.len == 0 {
        return Ok(Reply::Integer(0));
    }
    let element = &args[3];
    let (head, tail) = (l.meta.head, l.meta.tail);
    let limit = if count == 0 {
        u64::MAX
    } else {
        count.unsigned_abs()
    };
    // Pass 1: the matches to remove are exactly the matches within [lo, hi].
    let (mut k, mut lo, mut hi) = (0u64, i64::MAX, i64::MIN);
    walk(space, &l.coll, head, tail - 1, count < 0, |_, p, v| {
        if v == element {
            k += 1;
            lo = lo.min(p);
            hi = hi.max(p);
        }
        Ok(k < limit)
    })?;
    if k == 0 {
        return Ok(Reply::Integer(0));
    }
    if k < l.meta.len {
        // Pass 2: close the gaps by renumbering the shorter side; the other end stays put.
        let mut removed = 0i64;
        let coll = l.coll.clone();
        if hi - head <= tail - 1 - lo {
            walk(space, &coll, head, hi, true, |space, p, v| {
                if p >= lo && v == element {
                    removed += 1;
                } else if removed > 0 {
                    space.el_put(&coll, &sub(p + removed), &v)?;
                }
                Ok(true)
            })?;
            for p in head..head + removed {
                space.el_remove(&coll, &sub(p))?;
            }
            l.meta.head += removed;
        } else {
            walk(space, &coll, lo, tail - 1, false, |space, p, v| {
                if p <= hi && v == element {
                    removed += 1;
                } else if removed > 0 {
                    space.el_put(&coll, &sub(p - removed), &v)?;
                }
                Ok(true)
            })?;
            for p in tail - removed..tail {
                space.el_remove(&coll, &sub(p))?;
            }
            l.meta.tail -= removed;
        }
        if removed as u64 != k {
            return Err(Error::Corruption(format!(
                "LREM found {k} matches, then {removed}"
            )));
        }
    }
    // An emptied list is deleted whole by `finish` (its elements reclaimed with it).
    l.meta.len -= k;
    if l.meta.len == 0 {
        l.meta.tail = l.meta.head;
    }
    finish(space, &l, cx)?;
    Ok(Reply::Integer(k as i64))
}

/// `LTRIM key start stop`: keeps only indices `start..=stop`; OK.
fn ltrim(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (start, stop) = (int_arg(args, 2)?, int_arg(args, 3)?);
    let Some(mut l) = open_list(space, &args[1])? else {
        return Ok(Reply::Ok);
    };
    let len = l.meta.len as i64;
    let keep = clamp_range(len, start, stop);
    if keep.is_empty() {
        // Deleted whole by `finish`, elements reclaimed with the key.
        l.meta.len = 0;
        l.meta.tail = l.meta.head;
    } else if keep.start > 0 || keep.end < len {
        let head = l.meta.head;
        for p in (head..head + keep.start).chain(head + keep.end..l.meta.tail) {
            space.el_remove(&l.coll, &sub(p))?;
        }
        l.meta.head = head + keep.start;
        l.meta.tail = head + keep.end;
        l.meta.len = (keep.end - keep.start) as u64;
    }
    // Stored even when every element is kept: Redis's LTRIM signals the key as modified
    // whatever it trimmed (a WATCH of it aborts).
    finish(space, &l, cx)?;
    Ok(Reply::Ok)
}

/// `LPOS key element [RANK rank] [COUNT num-matches] [MAXLEN len]`: the index of the
/// `rank`-th match (negative: counting from the tail), or with COUNT an array of up to `count`
/// of them (0: all), looking at no more than `maxlen` elements (0: all).
fn lpos(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let (mut rank, mut count, mut maxlen) = (1i64, None, 0i64);
    let mut j = 3;
    while j < args.len() {
        let opt = &args[j];
        let more = j + 1 < args.len();
        if opt.eq_ignore_ascii_case(b"RANK") && more {
            rank = parse_int(&args[j + 1]).ok_or_else(not_integer)?;
            if rank == 0 {
                return Err(err(
                    "ERR RANK can't be zero: use 1 to start from the first match, 2 from the \
                     second ... or use negative to start from the end of the list",
                ));
            }
        } else if opt.eq_ignore_ascii_case(b"COUNT") && more {
            count = Some(
                parse_int(&args[j + 1])
                    .filter(|&n| n >= 0)
                    .ok_or_else(|| err("ERR COUNT can't be negative"))?,
            );
        } else if opt.eq_ignore_ascii_case(b"MAXLEN") && more {
            maxlen = parse_int(&args[j + 1])
                .filter(|&n| n >= 0)
                .ok_or_else(|| err("ERR MAXLEN can't be negative"))?;
        } else {
            return Err(syntax());
        }
        j += 2;
    }
    // Redis negates a negative rank in a C long: RANK -9223372036854775808 stays negative, so
    // every match qualifies. The wrapping arithmetic below reproduces that.
    let from_tail = rank < 0;
    if from_tail {
        rank = rank.wrapping_neg();
    }
    let Some(l) = open_list(space, &args[1])? else {
        return Ok(match count {
            Some(_) => Reply::Array(Vec::new()),
            None => Reply::Nil,
        });
    };
    let element = &args[2];
    let len = l.meta.len as i64;
    let (mut scanned, mut matches) = (0i64, 0i64);
    let mut found = Vec::new();
    if len > 0 {
        walk(
            space,
            &l.coll,
            l.meta.head,
            l.meta.tail - 1,
            from_tail,
            |_, p, v| {
                if maxlen != 0 && scanned >= maxlen {
                    return Ok(false);
                }
                scanned += 1;
                if v != element {
                    return Ok(true);
                }
                matches += 1;
                if matches < rank {
                    return Ok(true);
                }
                found.push(p - l.meta.head);
                Ok(match count {
                    None => false,
                    Some(0) => true,
                    Some(c) => matches.wrapping_sub(rank).wrapping_add(1) < c,
                })
            },
        )?;
    }
    Ok(match count {
        None => found.first().map_or(Reply::Nil, |&i| Reply::Integer(i)),
        Some(_) => Reply::Array(found.into_iter().map(Reply::Integer).collect()),
    })
}

/// `LMOVE source destination LEFT|RIGHT LEFT|RIGHT`: the element moved, nil when `source` is
/// absent.
fn lmove(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let from_left = parse_where(&args[3])?;
    let to_left = parse_where(&args[4])?;
    Ok(
        move_element(space, &args[1], &args[2], from_left, to_left, cx)?
            .map_or(Reply::Nil, Reply::Bulk),
    )
}

/// `RPOPLPUSH source destination`: `LMOVE source destination RIGHT LEFT`.
fn rpoplpush(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    Ok(move_element(space, &args[1], &args[2], false, true, cx)?.map_or(Reply::Nil, Reply::Bulk))
}

/// `LMPOP numkeys key [key ...] LEFT|RIGHT [COUNT count]`: `[key, [elements]]` from the first
/// non-empty list, a null array when there is none.
fn lmpop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let a = parse_mpop(args, 1)?;
    Ok(mpop_reply(mpop(
        space,
        &args[a.keys],
        a.from_left,
        a.count,
        cx,
    )?))
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::meta::CollMeta;
    use crate::testing::MapSpace;
    use capdb_types::{Timestamp, Value};
    use proptest::prelude::*;

    use crate::testing::words::cx;

    fn run(space: &mut MapSpace, cmd: &str) -> Result<Reply> {
        let args: Vec<Bytes> = cmd
            .split_whitespace()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let reply = crate::execute(&args, space, &cx());
        check_records(space);
        reply
    }

    fn ok(space: &mut MapSpace, cmd: &str) -> Reply {
        run(space, cmd).unwrap_or_else(|e| panic!("{cmd}: {e:?}"))
    }

    fn fails(space: &mut MapSpace, cmd: &str) -> Error {
        match run(space, cmd) {
            Ok(r) => panic!("{cmd} answered {r:?}"),
            Err(e) => e,
        }
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn bulks(items: &str) -> Reply {
        Reply::Array(items.split_whitespace().map(bulk).collect())
    }

    fn ints(items: &[i64]) -> Reply {
        Reply::Array(items.iter().map(|&i| Reply::Integer(i)).collect())
    }

    fn int(i: i64) -> Reply {
        Reply::Integer(i)
    }

    fn with_string(key: &str) -> MapSpace {
        let mut s = MapSpace::new(0);
        s.put(
            key.as_bytes(),
            Value::new(Bytes::from_static(b"x"), Timestamp(1), None),
        )
        .unwrap();
        s
    }

    fn meta(s: &MapSpace, key: &str) -> CollMeta {
        CollMeta::of(&s.top[key.as_bytes()]).unwrap().unwrap()
    }

    /// Every list's elements are exactly its positions `[head, tail)`, and no element record
    /// outlives its list.
    fn check_records(s: &MapSpace) {
        let mut expected = 0;
        for v in s.top.values() {
            let Some(m) = CollMeta::of(v).unwrap() else {
                continue;
            };
            assert!(m.len > 0, "an empty list is deleted");
            assert_eq!(m.tail - m.head, m.len as i64);
            let positions: Vec<i64> = s
                .elements
                .keys()
                .filter(|(id, _)| *id == m.id)
                .map(|(_, k)| pos_of(k).unwrap())
                .collect();
            assert_eq!(positions, (m.head..m.tail).collect::<Vec<_>>());
            expected += positions.len();
        }
        assert_eq!(s.elements.len(), expected, "stray element records");
    }

    #[test]
    fn table_is_sorted_and_keys_are_where_redis_says() {
        assert!(crate::command::sorted(COMMANDS));
        let spec = |n: &str| crate::lookup(n).unwrap();
        assert_eq!(spec("lmove").keys, Keys::Range(1, 2, 1));
        assert_eq!(spec("rpoplpush").keys, Keys::Range(1, 2, 1));
        let args: Vec<Bytes> = "lmpop 2 a b left"
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        assert_eq!(spec("lmpop").key_indices(&args).unwrap(), vec![2, 3]);
        assert!(spec("lrange").flags.contains(&"readonly"));
        assert!(spec("lpush").is_write());
    }

    #[test]
    fn subkeys_sort_in_position_order() {
        let ps = [i64::MIN, -1_000_000, -2, -1, 0, 1, 2, 1 << 40, i64::MAX];
        for w in ps.windows(2) {
            assert!(sub(w[0]) < sub(w[1]));
        }
        for p in ps {
            assert_eq!(pos_of(&sub(p)).unwrap(), p);
        }
        assert!(pos_of(b"\0abc").is_err());
    }

    #[test]
    fn lpush_prepends_in_argument_order() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "LPUSH l a b c"), int(3));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("c b a"));
        assert_eq!(meta(&s, "l").head, -3);
    }

    #[test]
    fn rpush_appends_and_returns_the_new_length() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "RPUSH l a b"), int(2));
        assert_eq!(ok(&mut s, "LPUSH l z"), int(3));
        assert_eq!(ok(&mut s, "RPUSH l c"), int(4));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("z a b c"));
        assert_eq!(ok(&mut s, "LLEN l"), int(4));
        assert_eq!(ok(&mut s, "LLEN nokey"), int(0));
        assert_eq!(
            fails(&mut s, "LPUSH l"),
            err("ERR wrong number of arguments for 'lpush' command")
        );
    }

    #[test]
    fn pushx_only_pushes_onto_an_existing_list() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "RPUSHX l a"), int(0));
        assert_eq!(ok(&mut s, "LPUSHX l a"), int(0));
        assert!(s.top.is_empty(), "no key is created");
        ok(&mut s, "RPUSH l a");
        assert_eq!(ok(&mut s, "RPUSHX l b c"), int(3));
        assert_eq!(ok(&mut s, "LPUSHX l x y"), int(5));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("y x a b c"));
    }

    #[test]
    fn pop_without_count_answers_an_element_or_nil() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "LPOP nokey"), Reply::Nil);
        assert_eq!(ok(&mut s, "RPOP nokey"), Reply::Nil);
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(ok(&mut s, "LPOP l"), bulk("a"));
        assert_eq!(ok(&mut s, "RPOP l"), bulk("c"));
        assert_eq!(ok(&mut s, "LPOP l"), bulk("b"));
        assert!(s.top.is_empty(), "the last pop deletes the key");
    }

    #[test]
    fn pop_with_count_answers_an_array_and_a_null_array_for_a_missing_key() {
        let mut s = MapSpace::new(0);
        // redis-server: `*-1` (RESP3 `_`) for a missing key, whatever the count, even 0.
        assert_eq!(ok(&mut s, "LPOP nokey 2"), Reply::NilArray);
        assert_eq!(ok(&mut s, "RPOP nokey 0"), Reply::NilArray);
        ok(&mut s, "RPUSH l a b c d");
        assert_eq!(ok(&mut s, "LPOP l 0"), Reply::Array(Vec::new()));
        assert_eq!(ok(&mut s, "LPOP l 1"), bulks("a"));
        assert_eq!(ok(&mut s, "RPOP l 2"), bulks("d c"));
        assert_eq!(ok(&mut s, "RPOP l 9999999999"), bulks("b"));
        assert!(s.top.is_empty());
    }

    #[test]
    fn pop_count_is_checked_before_the_key() {
        let mut s = with_string("s");
        let range = err("ERR value is out of range, must be positive");
        assert_eq!(fails(&mut s, "LPOP s -1"), range);
        assert_eq!(fails(&mut s, "LPOP nokey x"), range);
        assert_eq!(fails(&mut s, "RPOP s 0"), Error::WrongType);
        assert_eq!(fails(&mut s, "LPOP s"), Error::WrongType);
        assert_eq!(
            fails(&mut s, "LPOP s 1 2"),
            err("ERR wrong number of arguments for 'lpop' command")
        );
        assert_eq!(
            fails(&mut s, "RPOP s 1 2"),
            err("ERR wrong number of arguments for 'rpop' command")
        );
    }

    #[test]
    fn lrange_clamps_indices_like_redis() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c d e");
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b c d e"));
        assert_eq!(ok(&mut s, "LRANGE l -100 100"), bulks("a b c d e"));
        assert_eq!(ok(&mut s, "LRANGE l -2 -1"), bulks("d e"));
        assert_eq!(ok(&mut s, "LRANGE l 1 2"), bulks("b c"));
        assert_eq!(ok(&mut s, "LRANGE l 3 1"), bulks(""));
        assert_eq!(ok(&mut s, "LRANGE l 5 10"), bulks(""));
        assert_eq!(ok(&mut s, "LRANGE l -9223372036854775808 0"), bulks("a"));
        assert_eq!(ok(&mut s, "LRANGE nokey 0 -1"), bulks(""));
    }

    #[test]
    fn lrange_parses_its_integers_before_looking_at_the_key() {
        let mut s = with_string("s");
        assert_eq!(fails(&mut s, "LRANGE s x 1"), crate::command::not_integer());
        assert_eq!(
            fails(&mut s, "LRANGE nokey 0 x"),
            crate::command::not_integer()
        );
        assert_eq!(fails(&mut s, "LRANGE s 0 1"), Error::WrongType);
    }

    #[test]
    fn lindex_reads_one_element_and_looks_at_the_key_first() {
        let mut s = with_string("s");
        ok(&mut s, "RPUSH l a b c d e");
        assert_eq!(ok(&mut s, "LINDEX l 0"), bulk("a"));
        assert_eq!(ok(&mut s, "LINDEX l -1"), bulk("e"));
        assert_eq!(ok(&mut s, "LINDEX l 5"), Reply::Nil);
        assert_eq!(ok(&mut s, "LINDEX l -6"), Reply::Nil);
        assert_eq!(fails(&mut s, "LINDEX l x"), crate::command::not_integer());
        // redis-server checks the key before the index.
        assert_eq!(ok(&mut s, "LINDEX nokey x"), Reply::Nil);
        assert_eq!(fails(&mut s, "LINDEX s x"), Error::WrongType);
    }

    #[test]
    fn lset_replaces_one_element_with_errors_in_redis_order() {
        let mut s = with_string("s");
        ok(&mut s, "RPUSH l a b c d e");
        assert_eq!(ok(&mut s, "LSET l 0 A"), Reply::Ok);
        assert_eq!(ok(&mut s, "LSET l -1 E"), Reply::Ok);
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("A b c d E"));
        let range = err("ERR index out of range");
        assert_eq!(fails(&mut s, "LSET l 5 z"), range);
        assert_eq!(fails(&mut s, "LSET l -6 z"), range);
        assert_eq!(fails(&mut s, "LSET l x z"), crate::command::not_integer());
        assert_eq!(fails(&mut s, "LSET nokey x z"), err("ERR no such key"));
        assert_eq!(fails(&mut s, "LSET s x z"), Error::WrongType);
    }

    #[test]
    fn linsert_goes_next_to_the_first_pivot_from_the_head() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c b a");
        assert_eq!(ok(&mut s, "LINSERT l BEFORE b X"), int(6));
        assert_eq!(ok(&mut s, "LINSERT l after b Y"), int(7));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a X b Y c b a"));
        assert_eq!(ok(&mut s, "LINSERT l AFTER zz Y"), int(-1));
        assert_eq!(ok(&mut s, "LINSERT l after a first"), int(8));
        assert_eq!(ok(&mut s, "LINSERT l before a head"), int(9));
        assert_eq!(
            ok(&mut s, "LRANGE l 0 -1"),
            bulks("head a first X b Y c b a")
        );
        let m = meta(&s, "l");
        assert_eq!(
            (m.head, m.tail),
            (-4, 5),
            "inserts near the head move the head"
        );
    }

    #[test]
    fn linsert_near_the_tail_renumbers_the_tail_side() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c d e");
        ok(&mut s, "LINSERT l AFTER e z");
        ok(&mut s, "LINSERT l BEFORE e y");
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b c d y e z"));
        let m = meta(&s, "l");
        assert_eq!((m.head, m.tail), (0, 7));
    }

    #[test]
    fn linsert_checks_its_syntax_before_the_key() {
        let mut s = with_string("s");
        assert_eq!(fails(&mut s, "LINSERT s middle b X"), syntax());
        assert_eq!(fails(&mut s, "LINSERT nokey middle b X"), syntax());
        assert_eq!(ok(&mut s, "LINSERT nokey before b X"), int(0));
        assert_eq!(fails(&mut s, "LINSERT s before b X"), Error::WrongType);
        assert!(!s.top.contains_key(&b"nokey"[..]));
    }

    #[test]
    fn lrem_with_positive_count_removes_from_the_head() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b a c a");
        assert_eq!(ok(&mut s, "LREM l 2 a"), int(2));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("b c a"));
    }

    #[test]
    fn lrem_with_negative_count_removes_from_the_tail() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b a c a");
        assert_eq!(ok(&mut s, "LREM l -2 a"), int(2));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b c"));
        assert_eq!(ok(&mut s, "LREM l -9223372036854775808 a"), int(1));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("b c"));
    }

    #[test]
    fn lrem_with_zero_count_removes_every_match_and_an_emptied_list_is_deleted() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c b a b");
        assert_eq!(ok(&mut s, "LREM l 0 b"), int(3));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a c a"));
        assert_eq!(ok(&mut s, "LREM l 0 zz"), int(0));
        assert_eq!(ok(&mut s, "LREM l 0 a"), int(2));
        assert_eq!(ok(&mut s, "LREM l 0 c"), int(1));
        assert!(s.top.is_empty() && s.elements.is_empty());
        assert_eq!(ok(&mut s, "LREM nokey 0 c"), int(0));
    }

    #[test]
    fn lrem_parses_count_before_the_key() {
        let mut s = with_string("s");
        assert_eq!(fails(&mut s, "LREM s x b"), crate::command::not_integer());
        assert_eq!(
            fails(&mut s, "LREM nokey x b"),
            crate::command::not_integer()
        );
        assert_eq!(fails(&mut s, "LREM s 0 b"), Error::WrongType);
    }

    #[test]
    fn ltrim_keeps_only_the_range() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c d e");
        assert_eq!(ok(&mut s, "LTRIM l 1 -2"), Reply::Ok);
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("b c d"));
        assert_eq!(ok(&mut s, "LTRIM l -100 100"), Reply::Ok);
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("b c d"));
        assert_eq!(ok(&mut s, "LTRIM l -1 -1"), Reply::Ok);
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("d"));
    }

    #[test]
    fn ltrim_out_of_range_deletes_the_key() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(ok(&mut s, "LTRIM l 5 10"), Reply::Ok);
        assert!(s.top.is_empty() && s.elements.is_empty());
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(ok(&mut s, "LTRIM l 2 1"), Reply::Ok);
        assert!(s.top.is_empty() && s.elements.is_empty());
        assert_eq!(ok(&mut s, "LTRIM nokey 0 1"), Reply::Ok);
    }

    #[test]
    fn ltrim_parses_its_integers_before_the_key() {
        let mut s = with_string("s");
        assert_eq!(fails(&mut s, "LTRIM s x 1"), crate::command::not_integer());
        assert_eq!(
            fails(&mut s, "LTRIM nokey 0 x"),
            crate::command::not_integer()
        );
        assert_eq!(fails(&mut s, "LTRIM s 0 1"), Error::WrongType);
    }

    #[test]
    fn lpos_finds_matches_by_rank_count_and_maxlen() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c 1 2 3 c c");
        assert_eq!(ok(&mut s, "LPOS l c"), int(2));
        assert_eq!(ok(&mut s, "LPOS l zz"), Reply::Nil);
        assert_eq!(ok(&mut s, "LPOS l c RANK 2"), int(6));
        assert_eq!(ok(&mut s, "LPOS l c rank -1"), int(7));
        assert_eq!(ok(&mut s, "LPOS l c rank -2"), int(6));
        assert_eq!(ok(&mut s, "LPOS l c rank 10"), Reply::Nil);
        assert_eq!(ok(&mut s, "LPOS l c count 0"), ints(&[2, 6, 7]));
        assert_eq!(ok(&mut s, "LPOS l c count 2"), ints(&[2, 6]));
        assert_eq!(ok(&mut s, "LPOS l c count 0 rank -1"), ints(&[7, 6, 2]));
        assert_eq!(ok(&mut s, "LPOS l c count 0 maxlen 3"), ints(&[2]));
        assert_eq!(ok(&mut s, "LPOS l c maxlen 2"), Reply::Nil);
        assert_eq!(ok(&mut s, "LPOS l c maxlen 0"), int(2));
        assert_eq!(ok(&mut s, "LPOS l c rank 2 count 2 maxlen 7"), ints(&[6]));
        assert_eq!(ok(&mut s, "LPOS l c count 1 count 2"), ints(&[2, 6]));
        assert_eq!(ok(&mut s, "LPOS l zz count 3"), ints(&[]));
        assert_eq!(ok(&mut s, "LPOS l c rank 10 count 1"), ints(&[]));
        assert_eq!(ok(&mut s, "LPOS nokey c"), Reply::Nil);
        assert_eq!(ok(&mut s, "LPOS nokey c count 1"), ints(&[]));
    }

    #[test]
    fn lpos_rank_of_the_smallest_long_matches_redis() {
        // redis-server 7.0.15 negates RANK in a C long: every match from the tail qualifies.
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c 1 2 3 c c");
        assert_eq!(ok(&mut s, "LPOS l c rank -9223372036854775808"), int(7));
        assert_eq!(
            ok(&mut s, "LPOS l c rank -9223372036854775808 count 1"),
            ints(&[7, 6, 2])
        );
        assert_eq!(ok(&mut s, "LPOS l c rank 9223372036854775807"), Reply::Nil);
    }

    #[test]
    fn lpos_checks_its_options_before_the_key() {
        let mut s = with_string("s");
        let rank0 = err(
            "ERR RANK can't be zero: use 1 to start from the first match, 2 from the second ... \
             or use negative to start from the end of the list",
        );
        assert_eq!(fails(&mut s, "LPOS s c rank 0"), rank0);
        assert_eq!(fails(&mut s, "LPOS nokey c rank 0"), rank0);
        assert_eq!(
            fails(&mut s, "LPOS s c rank x"),
            crate::command::not_integer()
        );
        assert_eq!(
            fails(&mut s, "LPOS s c count -1"),
            err("ERR COUNT can't be negative")
        );
        assert_eq!(
            fails(&mut s, "LPOS s c count x"),
            err("ERR COUNT can't be negative")
        );
        assert_eq!(
            fails(&mut s, "LPOS s c maxlen -1"),
            err("ERR MAXLEN can't be negative")
        );
        assert_eq!(fails(&mut s, "LPOS s c foo"), syntax());
        assert_eq!(fails(&mut s, "LPOS s c rank"), syntax());
        assert_eq!(fails(&mut s, "LPOS s c count 1 count"), syntax());
        assert_eq!(fails(&mut s, "LPOS s c"), Error::WrongType);
        assert_eq!(fails(&mut s, "LPOS s c count 1"), Error::WrongType);
    }

    #[test]
    fn lmove_moves_between_any_ends() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(ok(&mut s, "LMOVE l m left right"), bulk("a"));
        assert_eq!(ok(&mut s, "LMOVE l m RIGHT LEFT"), bulk("c"));
        assert_eq!(ok(&mut s, "LRANGE m 0 -1"), bulks("c a"));
        assert_eq!(ok(&mut s, "LMOVE l m left left"), bulk("b"));
        assert!(
            !s.top.contains_key(&b"l"[..]),
            "an emptied source is deleted"
        );
        assert_eq!(ok(&mut s, "LRANGE m 0 -1"), bulks("b c a"));
        assert_eq!(ok(&mut s, "LMOVE nokey m left left"), Reply::Nil);
    }

    #[test]
    fn lmove_onto_the_same_list_rotates_it() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(ok(&mut s, "LMOVE l l left right"), bulk("a"));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("b c a"));
        assert_eq!(ok(&mut s, "RPOPLPUSH l l"), bulk("a"));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b c"));
        ok(&mut s, "RPUSH one x");
        assert_eq!(ok(&mut s, "LMOVE one one left right"), bulk("x"));
        assert_eq!(ok(&mut s, "LRANGE one 0 -1"), bulks("x"));
    }

    #[test]
    fn lmove_checks_directions_then_source_then_destination() {
        let mut s = with_string("s");
        ok(&mut s, "RPUSH l a b");
        assert_eq!(fails(&mut s, "LMOVE s m LEFT middle"), syntax());
        assert_eq!(fails(&mut s, "LMOVE nokey m up left"), syntax());
        assert_eq!(fails(&mut s, "LMOVE s m left left"), Error::WrongType);
        // A missing source answers nil whatever the destination holds.
        assert_eq!(ok(&mut s, "LMOVE nokey s left left"), Reply::Nil);
        assert_eq!(fails(&mut s, "LMOVE l s left left"), Error::WrongType);
        assert_eq!(fails(&mut s, "RPOPLPUSH l s"), Error::WrongType);
        assert_eq!(fails(&mut s, "RPOPLPUSH s l"), Error::WrongType);
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b"), "nothing moved");
        assert_eq!(ok(&mut s, "RPOPLPUSH nokey s"), Reply::Nil);
    }

    #[test]
    fn rpoplpush_moves_the_tail_to_the_head() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "RPUSH l a b c");
        ok(&mut s, "RPUSH m x");
        assert_eq!(ok(&mut s, "RPOPLPUSH l m"), bulk("c"));
        assert_eq!(ok(&mut s, "LRANGE m 0 -1"), bulks("c x"));
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), bulks("a b"));
    }

    fn popped(key: &str, items: &str) -> Reply {
        Reply::Array(vec![bulk(key), bulks(items)])
    }

    #[test]
    fn lmpop_pops_from_the_first_non_empty_list() {
        let mut s = with_string("s");
        ok(&mut s, "RPUSH m a b c");
        assert_eq!(ok(&mut s, "LMPOP 2 l m left"), popped("m", "a"));
        assert_eq!(ok(&mut s, "LMPOP 2 l m RIGHT COUNT 5"), popped("m", "c b"));
        assert_eq!(ok(&mut s, "LMPOP 2 l m left"), Reply::NilArray);
        assert_eq!(
            ok(&mut s, "LMPOP 1 l left count 9223372036854775807"),
            Reply::NilArray
        );
        ok(&mut s, "RPUSH l z");
        // Keys after the first non-empty list are not looked at.
        assert_eq!(ok(&mut s, "LMPOP 2 l s left"), popped("l", "z"));
        assert!(s.top.len() == 1, "only the string is left");
    }

    #[test]
    fn lmpop_errors_in_redis_order() {
        let mut s = with_string("s");
        let numkeys = err("ERR numkeys should be greater than 0");
        for bad in ["0", "-1", "x", "99999999999999999999"] {
            assert_eq!(fails(&mut s, &format!("LMPOP {bad} l left")), numkeys);
        }
        assert_eq!(fails(&mut s, "LMPOP 3 l m left"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 5 l m left"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 2 l m middle"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 1 s middle"), syntax());
        let count = err("ERR count should be greater than 0");
        assert_eq!(fails(&mut s, "LMPOP 2 l m left count 0"), count);
        assert_eq!(fails(&mut s, "LMPOP 2 l m left count -1"), count);
        assert_eq!(fails(&mut s, "LMPOP 1 s left count x"), count);
        assert_eq!(fails(&mut s, "LMPOP 2 l m left count"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 2 l m left count 1 count 2"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 2 l m left foo 1"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 1 l left right"), syntax());
        assert_eq!(fails(&mut s, "LMPOP 1 s left"), Error::WrongType);
        assert_eq!(fails(&mut s, "LMPOP 2 nokey s left"), Error::WrongType);
        assert_eq!(
            fails(&mut s, "LMPOP 1 l"),
            err("ERR wrong number of arguments for 'lmpop' command")
        );
    }

    #[test]
    fn every_command_refuses_a_string_key() {
        let mut s = with_string("s");
        for cmd in [
            "LPUSH s a",
            "RPUSH s a",
            "LPUSHX s a",
            "RPUSHX s a",
            "LPOP s",
            "RPOP s 2",
            "LLEN s",
            "LRANGE s 0 -1",
            "LINDEX s 0",
            "LSET s 0 a",
            "LINSERT s before a b",
            "LREM s 0 a",
            "LTRIM s 0 1",
            "LPOS s a",
            "LMOVE s d left right",
            "RPOPLPUSH s d",
            "LMPOP 1 s left",
        ] {
            assert_eq!(fails(&mut s, cmd), Error::WrongType, "{cmd}");
        }
        assert_eq!(s.top.len(), 1, "nothing was created");
    }

    #[test]
    fn the_blocking_helpers_pop_and_move() {
        let mut s = with_string("s");
        let key = Bytes::from_static(b"l");
        ok(&mut s, "RPUSH l a b c");
        assert_eq!(
            pop(&mut s, &key, true, &cx()).unwrap(),
            Some(bulk_bytes("a"))
        );
        assert_eq!(
            pop(&mut s, &key, false, &cx()).unwrap(),
            Some(bulk_bytes("c"))
        );
        let dst = Bytes::from_static(b"d");
        assert_eq!(
            move_element(&mut s, &key, &dst, true, true, &cx()).unwrap(),
            Some(bulk_bytes("b"))
        );
        assert_eq!(pop(&mut s, &key, true, &cx()).unwrap(), None);
        assert_eq!(
            pop(&mut s, &Bytes::from_static(b"s"), true, &cx()).unwrap_err(),
            Error::WrongType
        );
        let args: Vec<Bytes> = "blmpop 0 2 x d right count 3"
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let a = parse_mpop(&args, 2).unwrap();
        assert_eq!(
            a,
            MpopArgs {
                keys: 3..5,
                from_left: false,
                count: 3
            }
        );
        assert_eq!(
            mpop_reply(mpop(&mut s, &args[a.keys], a.from_left, a.count, &cx()).unwrap()),
            popped("d", "b")
        );
        check_records(&s);
    }

    fn bulk_bytes(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn big_lists_are_scanned_across_pages() {
        let mut s = MapSpace::new(0);
        let n = PAGE as i64 * 3 + 17;
        for i in 0..n {
            ok(&mut s, &format!("RPUSH l e{}", i % 100));
        }
        let mut model: VecDeque<String> = (0..n).map(|i| format!("e{}", i % 100)).collect();
        assert_eq!(ok(&mut s, "LINSERT l BEFORE e99 mid"), int(n + 1));
        model.insert(99, "mid".into());
        let e5: Vec<i64> = (0..model.len() as i64)
            .filter(|&i| model[i as usize] == "e5")
            .collect();
        assert_eq!(ok(&mut s, "LPOS l e5 rank -2"), int(e5[e5.len() - 2]));
        assert_eq!(ok(&mut s, "LPOS l e5 count 0"), ints(&e5));
        assert_eq!(ok(&mut s, "LREM l 0 e7"), int(8));
        model.retain(|e| e != "e7");
        assert_eq!(ok(&mut s, "LREM l -3 e50"), int(3));
        let mut removed = 0;
        for i in (0..model.len()).rev() {
            if model[i] == "e50" && removed < 3 {
                model.remove(i);
                removed += 1;
            }
        }
        ok(&mut s, &format!("LINSERT l AFTER e{} tail", (n - 3) % 100));
        let at = model
            .iter()
            .position(|e| *e == format!("e{}", (n - 3) % 100))
            .unwrap();
        model.insert(at + 1, "tail".into());
        let want = Reply::Array(model.iter().map(|e| bulk(e)).collect());
        assert_eq!(ok(&mut s, "LRANGE l 0 -1"), want);
        let popped = ok(&mut s, &format!("LPOP l {}", PAGE + 3));
        let Reply::Array(popped) = popped else {
            panic!()
        };
        assert_eq!(popped.len(), PAGE + 3);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(bool, u8),
        Pop(bool, Option<u8>),
        Set(i8, u8),
        Insert(bool, u8, u8),
        Rem(i8, u8),
        Trim(i8, i8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 0u8..6).prop_map(|(l, v)| Op::Push(l, v)),
            2 => (any::<bool>(), proptest::option::of(0u8..5)).prop_map(|(l, c)| Op::Pop(l, c)),
            1 => (-8i8..8, 0u8..6).prop_map(|(i, v)| Op::Set(i, v)),
            2 => (any::<bool>(), 0u8..6, 0u8..6).prop_map(|(a, p, v)| Op::Insert(a, p, v)),
            1 => (-3i8..4, 0u8..6).prop_map(|(c, v)| Op::Rem(c, v)),
            1 => (-10i8..10, -10i8..10).prop_map(|(a, b)| Op::Trim(a, b)),
        ]
    }

    /// What Redis answers, on a VecDeque.
    fn model(m: &mut VecDeque<u8>, op: &Op) -> Reply {
        let was_empty = m.is_empty();
        let e = |v: u8| bulk(&v.to_string());
        let index = |i: i64, len: usize| {
            let i = if i < 0 { i + len as i64 } else { i };
            (0..len as i64).contains(&i).then_some(i as usize)
        };
        match *op {
            Op::Push(left, v) => {
                if left {
                    m.push_front(v)
                } else {
                    m.push_back(v)
                }
                int(m.len() as i64)
            }
            Op::Pop(left, count) => {
                let mut out = Vec::new();
                for _ in 0..count.unwrap_or(1) {
                    match if left { m.pop_front() } else { m.pop_back() } {
                        Some(v) => out.push(e(v)),
                        None => break,
                    }
                }
                match count {
                    None => out.pop().unwrap_or(Reply::Nil),
                    // A missing key: the null array, even for a count of 0.
                    Some(_) if was_empty => Reply::NilArray,
                    Some(_) => Reply::Array(out),
                }
            }
            Op::Set(i, v) => match index(i as i64, m.len()) {
                _ if m.is_empty() => Reply::Nil, // error, compared separately
                Some(i) => {
                    m[i] = v;
                    Reply::Ok
                }
                None => Reply::Nil,
            },
            Op::Insert(after, p, v) => {
                if m.is_empty() {
                    return int(0);
                }
                match m.iter().position(|&x| x == p) {
                    Some(i) => {
                        m.insert(i + after as usize, v);
                        int(m.len() as i64)
                    }
                    None => int(-1),
                }
            }
            Op::Rem(c, v) => {
                let limit = if c == 0 {
                    usize::MAX
                } else {
                    c.unsigned_abs() as usize
                };
                let mut removed = 0;
                if c >= 0 {
                    let mut i = 0;
                    while i < m.len() {
                        if m[i] == v && removed < limit {
                            m.remove(i);
                            removed += 1;
                        } else {
                            i += 1;
                        }
                    }
                } else {
                    for i in (0..m.len()).rev() {
                        if m[i] == v && removed < limit {
                            m.remove(i);
                            removed += 1;
                        }
                    }
                }
                int(removed as i64)
            }
            Op::Trim(a, b) => {
                let r = clamp_range(m.len() as i64, a as i64, b as i64);
                let kept: VecDeque<u8> = m
                    .iter()
                    .skip(r.start as usize)
                    .take((r.end - r.start) as usize)
                    .copied()
                    .collect();
                *m = kept;
                Reply::Ok
            }
        }
    }

    fn command(op: &Op) -> String {
        let side = |left: bool| if left { "L" } else { "R" };
        match op {
            Op::Push(l, v) => format!("{}PUSH l {v}", side(*l)),
            Op::Pop(l, None) => format!("{}POP l", side(*l)),
            Op::Pop(l, Some(c)) => format!("{}POP l {c}", side(*l)),
            Op::Set(i, v) => format!("LSET l {i} {v}"),
            Op::Insert(a, p, v) => {
                format!("LINSERT l {} {p} {v}", if *a { "AFTER" } else { "BEFORE" })
            }
            Op::Rem(c, v) => format!("LREM l {c} {v}"),
            Op::Trim(a, b) => format!("LTRIM l {a} {b}"),
        }
    }

    fn check_against_model(prefill: usize, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
        let mut s = MapSpace::new(0);
        let mut m = VecDeque::new();
        for i in 0..prefill {
            let v = (i % 6) as u8;
            ok(&mut s, &format!("RPUSH l {v}"));
            m.push_back(v);
        }
        for op in ops {
            let cmd = command(op);
            let was_empty = m.is_empty();
            let want = model(&mut m, op);
            match run(&mut s, &cmd) {
                Ok(got) => prop_assert_eq!(got, want, "{}", cmd),
                Err(e) => {
                    // Only LSET fails here: on a missing key or out of range.
                    prop_assert!(matches!(op, Op::Set(..)), "{} failed: {:?}", cmd, e);
                    prop_assert_eq!(
                        e,
                        err(if was_empty {
                            "ERR no such key"
                        } else {
                            "ERR index out of range"
                        })
                    );
                }
            }
            let all = Reply::Array(m.iter().map(|v| bulk(&v.to_string())).collect());
            prop_assert_eq!(run(&mut s, "LRANGE l 0 -1").unwrap(), all);
            prop_assert_eq!(run(&mut s, "LLEN l").unwrap(), int(m.len() as i64));
            prop_assert_eq!(s.top.is_empty(), m.is_empty());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn random_list_operations_match_a_vecdeque(ops in proptest::collection::vec(op(), 1..80)) {
            check_against_model(0, &ops)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Lists longer than a page: LINSERT, LREM and trims renumber across page boundaries.
        #[test]
        fn random_operations_on_lists_of_several_pages_match_a_vecdeque(
            prefill in PAGE..PAGE * 3,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            check_against_model(prefill, &ops)?;
        }
    }
}
