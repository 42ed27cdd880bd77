//! Sets: SADD, SREM, SPOP, SINTER, the store forms, SSCAN and the rest, with Redis 7's replies
//! and errors.
//!
//! A member is the element `0 ‖ hash(member) ‖ member` (see [`crate::meta::hashed_sub`]) with an
//! empty value, so SADD/SREM/SISMEMBER touch one element, SSCAN pages in hash order
//! ([`crate::scan::page`]), SPOP/SRANDMEMBER seek random hash positions
//! ([`crate::hash::random_members`]), and an intersection walks the smallest set and probes the
//! others with the same subkey.
//!
//! `CollMeta::big` is what Redis 7.0 calls the `hashtable` encoding: a set stays an `intset`
//! while every member is an integer (Redis's `string2ll` rule, [`parse_int`]) and it has at most
//! 512 members (`set-max-intset-entries`), and never converts back, except where Redis builds a
//! new set: the store forms, SMOVE into a new key, and SPOP's "keep the few left" strategy.

use std::collections::HashSet;
use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Reply, Result, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, not_integer, numkeys, syntax};
use crate::format::parse_int;
use crate::hash::random_members;
use crate::meta::{
    CollMeta, Open, create, finish, hashed_sub, member_of_hashed, open, open_or_create,
};
use crate::rng::Rng;
use crate::scan;
use crate::space::{ElRange, Space};

const MEMBER: u8 = 0;
/// Redis's `set-max-intset-entries` default.
pub const INTSET_ENTRIES: u64 = 512;
/// Redis's `SPOP_MOVE_STRATEGY_MUL`: SPOP with a count rebuilds the set from the members it
/// keeps when `left * 5 <= count`, which re-decides the encoding.
const SPOP_MOVE_STRATEGY_MUL: u64 = 5;
/// Members read per step when walking a set (intersections, differences).
const WALK_PAGE: usize = 1024;
/// Most members SRANDMEMBER with a negative count may answer. Redis has no bound (it would
/// build the reply until memory runs out); a reply this long is far past any reply limit.
pub const RANDOM_REPLY_MAX: u64 = 1 << 22;

const KEY: Keys = Keys::Range(1, 1, 1);
const ALL_KEYS: Keys = Keys::Range(1, -1, 1);
const R: &[&str] = &["readonly"];
const RF: &[&str] = &["readonly", "fast"];

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "sadd",        arity: -3, flags: &["write", "denyoom", "fast"], keys: KEY, run: Run::Write(sadd) },
    Spec { name: "scard",       arity: 2,  flags: RF, keys: KEY, run: Run::Read(scard) },
    Spec { name: "sdiff",       arity: -2, flags: R, keys: ALL_KEYS, run: Run::Read(sdiff) },
    Spec { name: "sdiffstore",  arity: -3, flags: &["write", "denyoom"], keys: ALL_KEYS, run: Run::Write(sdiffstore) },
    Spec { name: "sinter",      arity: -2, flags: R, keys: ALL_KEYS, run: Run::Read(sinter) },
    Spec { name: "sintercard",  arity: -3, flags: &["readonly", "movablekeys"], keys: Keys::NumKeys { at: 1, dest: false }, run: Run::Read(sintercard) },
    Spec { name: "sinterstore", arity: -3, flags: &["write", "denyoom"], keys: ALL_KEYS, run: Run::Write(sinterstore) },
    Spec { name: "sismember",   arity: 3,  flags: RF, keys: KEY, run: Run::Read(sismember) },
    Spec { name: "smembers",    arity: 2,  flags: R, keys: KEY, run: Run::Read(smembers) },
    Spec { name: "smismember",  arity: -3, flags: RF, keys: KEY, run: Run::Read(smismember) },
    Spec { name: "smove",       arity: 4,  flags: &["write", "fast"], keys: Keys::Range(1, 2, 1), run: Run::Write(smove) },
    Spec { name: "spop",        arity: -2, flags: &["write", "fast"], keys: KEY, run: Run::Write(spop) },
    Spec { name: "srandmember", arity: -2, flags: R, keys: KEY, run: Run::Read(srandmember) },
    Spec { name: "srem",        arity: -3, flags: &["write", "fast"], keys: KEY, run: Run::Write(srem) },
    Spec { name: "sscan",       arity: -3, flags: R, keys: KEY, run: Run::Read(sscan) },
    Spec { name: "sunion",      arity: -2, flags: R, keys: ALL_KEYS, run: Run::Read(sunion) },
    Spec { name: "sunionstore", arity: -3, flags: &["write", "denyoom"], keys: ALL_KEYS, run: Run::Write(sunionstore) },
];

fn open_set(space: &mut dyn Space, key: &Bytes) -> Result<Option<Open>> {
    open(space, key, ValueKind::Set)
}

/// Every key's set, in order (`None` where absent), or `WRONGTYPE` if any key holds another
/// type: Redis checks every key before computing anything.
fn open_all(space: &mut dyn Space, keys: &[Bytes]) -> Result<Vec<Option<Open>>> {
    keys.iter().map(|k| open_set(space, k)).collect()
}

/// Whether Redis would leave the intset encoding on adding `member` to a set of `meta.len`
/// members (counting it).
fn note_added(meta: &mut CollMeta, member: &[u8]) {
    if meta.len > INTSET_ENTRIES || parse_int(member).is_none() {
        meta.big = true;
    }
}

fn contains(space: &mut dyn Space, s: &Open, member: &[u8]) -> Result<bool> {
    Ok(space
        .el_get(&s.coll, &hashed_sub(MEMBER, member))?
        .is_some())
}

/// Adds a member; returns whether it is new.
fn add(space: &mut dyn Space, s: &mut Open, member: &[u8]) -> Result<bool> {
    let sub = hashed_sub(MEMBER, member);
    if !space.el_insert(&s.coll, &sub, &[])? {
        return Ok(false);
    }
    s.meta.len += 1;
    note_added(&mut s.meta, member);
    Ok(true)
}

/// Removes a member; returns whether it was there.
fn remove(space: &mut dyn Space, s: &mut Open, member: &[u8]) -> Result<bool> {
    let sub = hashed_sub(MEMBER, member);
    if !space.el_delete(&s.coll, &sub)? {
        return Ok(false);
    }
    s.meta.len -= 1;
    Ok(true)
}

fn members(space: &mut dyn Space, s: &Open) -> Result<Vec<Bytes>> {
    space
        .el_range(&s.coll, ElRange::prefixed(&[MEMBER], &[MEMBER + 1]))?
        .into_iter()
        .map(|(sub, _)| member_of_hashed(&sub))
        .collect()
}

/// Walks the subkeys of `s` in pages of [`WALK_PAGE`]; `visit` returns false to stop.
fn walk(
    space: &mut dyn Space,
    s: &Open,
    mut visit: impl FnMut(&mut dyn Space, Bytes) -> Result<bool>,
) -> Result<()> {
    let end = [MEMBER + 1];
    let mut after: Option<Bytes> = None;
    loop {
        let lo = match &after {
            Some(sub) => Bound::Excluded(&sub[..]),
            None => Bound::Included(&[MEMBER][..]),
        };
        let page = space.el_range(
            &s.coll,
            ElRange {
                lo,
                hi: Bound::Excluded(&end),
                rev: false,
                limit: WALK_PAGE,
            },
        )?;
        let full = page.len() == WALK_PAGE;
        for (sub, _) in page {
            after = Some(sub.clone());
            if !visit(space, sub)? {
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
}

fn bulks(members: Vec<Bytes>) -> Vec<Reply> {
    members.into_iter().map(Reply::Bulk).collect()
}

/// `SADD key member [member ...]`: the number of members added.
fn sadd(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut s = open_or_create(space, &args[1], ValueKind::Set)?;
    let mut added = 0;
    for m in &args[2..] {
        added += add(space, &mut s, m)? as i64;
    }
    if added > 0 {
        finish(space, &s, cx)?;
    }
    Ok(Reply::Integer(added))
}

/// `SREM key member [member ...]`: the number removed; an emptied set is deleted.
fn srem(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let Some(mut s) = open_set(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let mut removed = 0;
    for m in &args[2..] {
        removed += remove(space, &mut s, m)? as i64;
    }
    if removed > 0 {
        finish(space, &s, cx)?;
    }
    Ok(Reply::Integer(removed))
}

/// `SMEMBERS key`: a set.
fn smembers(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(s) = open_set(space, &args[1])? else {
        return Ok(Reply::Set(Vec::new()));
    };
    Ok(Reply::Set(bulks(members(space, &s)?)))
}

/// `SISMEMBER key member`.
fn sismember(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let Some(s) = open_set(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(contains(space, &s, &args[2])? as i64))
}

/// `SMISMEMBER key member [member ...]`: an array of 1/0.
fn smismember(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let s = open_set(space, &args[1])?;
    let mut out = Vec::with_capacity(args.len() - 2);
    for m in &args[2..] {
        let hit = match &s {
            Some(s) => contains(space, s, m)?,
            None => false,
        };
        out.push(Reply::Integer(hit as i64));
    }
    Ok(Reply::Array(out))
}

/// `SCARD key`.
fn scard(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(
        open_set(space, &args[1])?.map_or(0, |s| s.meta.len as i64),
    ))
}

/// `SPOP key [count]`: one member (or nil), or a set of up to `count` distinct members; the
/// choice depends only on the data and `cx.seed`, so every replica pops the same members.
fn spop(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    if args.len() > 3 {
        return Err(syntax());
    }
    let count = match args.get(2) {
        Some(raw) => Some(
            parse_int(raw)
                .filter(|c| *c >= 0)
                .ok_or_else(|| err("ERR value is out of range, must be positive"))?
                as u64,
        ),
        None => None,
    };
    let Some(mut s) = open_set(space, &args[1])? else {
        return Ok(match count {
            Some(_) => Reply::Set(Vec::new()),
            None => Reply::Nil,
        });
    };
    let mut rng = Rng::new(cx.seed);
    let Some(count) = count else {
        let Some((member, _)) = random_members(space, &s, MEMBER, 1, &mut rng)?.pop() else {
            return Ok(Reply::Nil);
        };
        remove(space, &mut s, &member)?;
        finish(space, &s, cx)?;
        return Ok(Reply::Bulk(member));
    };
    if count == 0 {
        return Ok(Reply::Set(Vec::new()));
    }
    if count >= s.meta.len {
        // Everything: the key goes (the engine reclaims its members).
        let all = members(space, &s)?;
        space.remove(&args[1])?;
        return Ok(Reply::Set(bulks(all)));
    }
    let picked = random_members(space, &s, MEMBER, count as i64, &mut rng)?;
    for (m, _) in &picked {
        remove(space, &mut s, m)?;
    }
    if s.meta.len * SPOP_MOVE_STRATEGY_MUL <= count {
        // Redis builds a new set from the few members left: its encoding starts over.
        let left = members(space, &s)?;
        s.meta.big = s.meta.len > INTSET_ENTRIES || left.iter().any(|m| parse_int(m).is_none());
    }
    finish(space, &s, cx)?;
    Ok(Reply::Set(bulks(
        picked.into_iter().map(|(m, _)| m).collect(),
    )))
}

/// `SRANDMEMBER key [count]`: one member (or nil); `count >= 0` distinct members (at most all),
/// `count < 0` exactly `-count` members, repetitions allowed.
fn srandmember(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    if args.len() > 3 {
        return Err(syntax());
    }
    let count = match args.get(2) {
        Some(raw) => {
            let c = parse_int(raw).ok_or_else(not_integer)?;
            if c == i64::MIN {
                return Err(err(
                    "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807",
                ));
            }
            Some(c)
        }
        None => None,
    };
    let Some(s) = open_set(space, &args[1])? else {
        return Ok(match count {
            Some(_) => Reply::Array(Vec::new()),
            None => Reply::Nil,
        });
    };
    let mut rng = Rng::new(cx.seed);
    let Some(count) = count else {
        return Ok(random_members(space, &s, MEMBER, 1, &mut rng)?
            .pop()
            .map_or(Reply::Nil, |(m, _)| Reply::Bulk(m)));
    };
    if count < 0 && count.unsigned_abs() > RANDOM_REPLY_MAX {
        return Err(err(format!(
            "ERR SRANDMEMBER would answer more than {RANDOM_REPLY_MAX} members: use a smaller count"
        )));
    }
    let picked = random_members(space, &s, MEMBER, count, &mut rng)?;
    Ok(Reply::Array(
        picked.into_iter().map(|(m, _)| Reply::Bulk(m)).collect(),
    ))
}

/// `SMOVE source destination member`: 1 when moved (or, with source = destination, when it is
/// a member), 0 otherwise.
fn smove(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (src_key, dst_key, member) = (&args[1], &args[2], &args[3]);
    let src = open_set(space, src_key)?;
    let dst = open_set(space, dst_key);
    let Some(mut src) = src else {
        return Ok(Reply::Integer(0));
    };
    let dst = dst?;
    if src_key == dst_key {
        return Ok(Reply::Integer(contains(space, &src, member)? as i64));
    }
    if !remove(space, &mut src, member)? {
        return Ok(Reply::Integer(0));
    }
    finish(space, &src, cx)?;
    let mut dst = match dst {
        Some(d) => d,
        None => create(space, dst_key, ValueKind::Set)?,
    };
    if add(space, &mut dst, member)? {
        finish(space, &dst, cx)?;
    }
    Ok(Reply::Integer(1))
}

/// The intersection of `keys`' sets: walks the smallest and probes the others, stopping at
/// `limit` members (0: no limit). Returns the count and, when `collect`, the members.
fn intersect(
    space: &mut dyn Space,
    keys: &[Bytes],
    limit: u64,
    collect: bool,
) -> Result<(u64, Vec<Bytes>)> {
    let mut sets = Vec::with_capacity(keys.len());
    for s in open_all(space, keys)? {
        match s {
            Some(s) => sets.push(s),
            // A missing key is an empty set: so is the intersection.
            None => return Ok((0, Vec::new())),
        }
    }
    sets.sort_by_key(|s| s.meta.len);
    let Some((first, rest)) = sets.split_first() else {
        return Ok((0, Vec::new()));
    };
    let mut n = 0u64;
    let mut out = Vec::new();
    walk(space, first, |space, sub| {
        for other in rest {
            if other.coll.id != first.coll.id && space.el_get(&other.coll, &sub)?.is_none() {
                return Ok(true);
            }
        }
        n += 1;
        if collect {
            out.push(member_of_hashed(&sub)?);
        }
        Ok(limit == 0 || n < limit)
    })?;
    Ok((n, out))
}

/// The union of `keys`' sets (missing keys are empty).
fn union(space: &mut dyn Space, keys: &[Bytes]) -> Result<Vec<Bytes>> {
    let sets = open_all(space, keys)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in sets.iter().flatten() {
        for m in members(space, s)? {
            if seen.insert(m.clone()) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// The members of the first key's set in none of the others: walks the first, probes the rest.
fn difference(space: &mut dyn Space, keys: &[Bytes]) -> Result<Vec<Bytes>> {
    let sets = open_all(space, keys)?;
    let Some((Some(first), rest)) = sets.split_first() else {
        return Ok(Vec::new());
    };
    let rest: Vec<&Open> = rest.iter().flatten().collect();
    let mut out = Vec::new();
    walk(space, first, |space, sub| {
        for other in &rest {
            if space.el_get(&other.coll, &sub)?.is_some() {
                return Ok(true);
            }
        }
        out.push(member_of_hashed(&sub)?);
        Ok(true)
    })?;
    Ok(out)
}

/// Replaces `dst` (whatever it holds, its TTL too) with a new set of `members`, or deletes it
/// when there are none; answers the new size. Sources were read before: `dst` may be one.
fn store(space: &mut dyn Space, dst: &Bytes, members: Vec<Bytes>, cx: &Ctx) -> Result<Reply> {
    if space.get(dst)?.is_some() {
        space.remove(dst)?;
    }
    if members.is_empty() {
        return Ok(Reply::Integer(0));
    }
    let mut s = create(space, dst, ValueKind::Set)?;
    for m in &members {
        space.el_put(&s.coll, &hashed_sub(MEMBER, m), &[])?;
        s.meta.len += 1;
        note_added(&mut s.meta, m);
    }
    finish(space, &s, cx)?;
    Ok(Reply::Integer(s.meta.len as i64))
}

/// `SINTER key [key ...]`: a set.
fn sinter(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let (_, members) = intersect(space, &args[1..], 0, true)?;
    Ok(Reply::Set(bulks(members)))
}

/// `SUNION key [key ...]`: a set.
fn sunion(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Set(bulks(union(space, &args[1..])?)))
}

/// `SDIFF key [key ...]`: a set.
fn sdiff(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Set(bulks(difference(space, &args[1..])?)))
}

/// `SINTERSTORE destination key [key ...]`: the size of the stored intersection.
fn sinterstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (_, members) = intersect(space, &args[2..], 0, true)?;
    store(space, &args[1], members, cx)
}

/// `SUNIONSTORE destination key [key ...]`: the size of the stored union.
fn sunionstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let members = union(space, &args[2..])?;
    store(space, &args[1], members, cx)
}

/// `SDIFFSTORE destination key [key ...]`: the size of the stored difference.
fn sdiffstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let members = difference(space, &args[2..])?;
    store(space, &args[1], members, cx)
}

/// `SINTERCARD numkeys key [key ...] [LIMIT limit]`: the intersection's size, counting no
/// further than `limit` (0: no limit).
fn sintercard(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let n = numkeys(args, 1)?;
    let keys = &args[2..2 + n];
    let mut limit = 0u64;
    let mut i = 2 + n;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"LIMIT") && i + 1 < args.len() {
            limit = parse_int(&args[i + 1])
                .filter(|l| *l >= 0)
                .ok_or_else(|| err("ERR LIMIT can't be negative"))? as u64;
            i += 2;
        } else {
            return Err(syntax());
        }
    }
    let (count, _) = intersect(space, keys, limit, false)?;
    Ok(Reply::Integer(count as i64))
}

/// `SSCAN key cursor [MATCH pattern] [COUNT count]`.
fn sscan(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let cursor = scan::parse_cursor(&args[2])?;
    let Some(s) = open_set(space, &args[1])? else {
        return scan::reply(0, Vec::new(), None, |_, _, _| Ok(()));
    };
    let opts = scan::parse_opts(args, 3)?;
    let (next, page) = scan::page(space, &s, MEMBER, cursor, opts.count)?;
    scan::reply(next, page, opts.pattern.as_ref(), |m, _, items| {
        items.push(Reply::Bulk(m));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::space::Coll;
    use crate::testing::MapSpace;
    use capdb_types::{Error, Timestamp, Value};
    use proptest::prelude::*;

    fn cx_seed(seed: u64) -> Ctx {
        Ctx {
            now_ms: 1_000,
            timestamp: Timestamp(1),
            seed,
            value_bytes_max: 1 << 20,
        }
    }

    fn words(cmd: &str) -> Vec<Bytes> {
        cmd.split_whitespace()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn run_on(space: &mut dyn Space, cmd: &str, seed: u64) -> Result<Reply> {
        crate::execute(&words(cmd), space, &cx_seed(seed))
    }

    fn run(space: &mut MapSpace, cmd: &str) -> Result<Reply> {
        run_on(space, cmd, 7)
    }

    fn ok(space: &mut MapSpace, cmd: &str) -> Reply {
        run(space, cmd).unwrap_or_else(|e| panic!("{cmd}: {e:?}"))
    }

    fn fails(space: &mut MapSpace, cmd: &str, line: &str) {
        assert_eq!(run(space, cmd).unwrap_err(), err(line), "{cmd}");
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn int(n: i64) -> Reply {
        Reply::Integer(n)
    }

    /// The members of a set-shaped reply, sorted.
    fn sorted_members(r: Reply) -> Vec<String> {
        let items = match r {
            Reply::Set(v) | Reply::Array(v) => v,
            other => panic!("not a collection: {other:?}"),
        };
        let mut out: Vec<String> = items
            .into_iter()
            .map(|i| match i {
                Reply::Bulk(b) => String::from_utf8(b.to_vec()).unwrap(),
                other => panic!("not a bulk: {other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    fn members_of(space: &mut MapSpace, key: &str) -> Vec<String> {
        sorted_members(ok(space, &format!("SMEMBERS {key}")))
    }

    fn strs(v: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    fn meta_of(space: &MapSpace, key: &str) -> CollMeta {
        CollMeta::of(space.top.get(key.as_bytes()).expect("key exists"))
            .unwrap()
            .expect("a collection")
    }

    fn put_string(space: &mut MapSpace, key: &str) {
        space
            .put(
                key.as_bytes(),
                Value::new(Bytes::from_static(b"x"), Timestamp(1), None),
            )
            .unwrap();
    }

    fn spec(name: &str) -> &'static Spec {
        crate::lookup(name).unwrap()
    }

    #[test]
    fn table_is_sorted_and_registered() {
        assert!(crate::command::sorted(COMMANDS));
        for c in COMMANDS {
            let found = crate::lookup(c.name).expect("registered in FAMILIES");
            assert_eq!((found.arity, found.keys), (c.arity, c.keys));
        }
    }

    #[test]
    fn key_positions_match_redis() {
        let args = words("SINTERCARD 2 a b LIMIT 1");
        assert_eq!(spec("sintercard").key_indices(&args).unwrap(), vec![2, 3]);
        let args = words("SINTERSTORE d a b");
        assert_eq!(
            spec("sinterstore").key_indices(&args).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(spec("sdiffstore").keys, Keys::Range(1, -1, 1));
        assert_eq!(spec("sunionstore").keys, Keys::Range(1, -1, 1));
        let args = words("SMOVE a b m");
        assert_eq!(spec("smove").key_indices(&args).unwrap(), vec![1, 2]);
        let args = words("SUNION a b c");
        assert_eq!(spec("sunion").key_indices(&args).unwrap(), vec![1, 2, 3]);
        for name in ["sadd", "srem", "spop", "smove", "sinterstore"] {
            assert!(spec(name).is_write(), "{name}");
        }
        for name in ["smembers", "srandmember", "sintercard", "sscan", "sinter"] {
            assert!(!spec(name).is_write(), "{name}");
        }
    }

    #[test]
    fn sadd_counts_only_new_members() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "SADD k a b a"), int(2));
        assert_eq!(ok(&mut s, "SADD k b c"), int(1));
        assert_eq!(ok(&mut s, "SADD k a"), int(0));
        assert_eq!(ok(&mut s, "SCARD k"), int(3));
        assert_eq!(members_of(&mut s, "k"), strs(&["a", "b", "c"]));
    }

    #[test]
    fn srem_counts_removed_members_and_the_last_one_deletes_the_key() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k a b c");
        assert_eq!(ok(&mut s, "SREM k a zz a"), int(1));
        assert_eq!(ok(&mut s, "SREM nokey a"), int(0));
        assert_eq!(ok(&mut s, "SREM k b c"), int(2));
        assert!(s.top.is_empty());
        assert!(s.elements.is_empty());
        assert_eq!(ok(&mut s, "SCARD k"), int(0));
    }

    #[test]
    fn membership_replies_and_their_shapes() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k 1 2 3");
        assert_eq!(ok(&mut s, "SISMEMBER k 2"), int(1));
        assert_eq!(ok(&mut s, "SISMEMBER k 9"), int(0));
        assert_eq!(ok(&mut s, "SISMEMBER nokey 9"), int(0));
        assert_eq!(
            ok(&mut s, "SMISMEMBER k 1 9"),
            Reply::Array(vec![int(1), int(0)])
        );
        assert_eq!(
            ok(&mut s, "SMISMEMBER nokey a b"),
            Reply::Array(vec![int(0), int(0)])
        );
        assert!(matches!(ok(&mut s, "SMEMBERS k"), Reply::Set(v) if v.len() == 3));
        // A missing key: an empty set (RESP3 `~0`), as Redis answers.
        for cmd in [
            "SMEMBERS nokey",
            "SINTER nokey",
            "SUNION nokey",
            "SDIFF nokey",
        ] {
            assert_eq!(ok(&mut s, cmd), Reply::Set(Vec::new()), "{cmd}");
        }
        assert!(matches!(ok(&mut s, "SINTER k"), Reply::Set(v) if v.len() == 3));
        assert!(matches!(ok(&mut s, "SUNION k"), Reply::Set(v) if v.len() == 3));
        assert!(matches!(ok(&mut s, "SDIFF k"), Reply::Set(v) if v.len() == 3));
    }

    #[test]
    fn every_command_on_a_string_key_is_the_wrong_type() {
        let mut s = MapSpace::new(0);
        put_string(&mut s, "str");
        ok(&mut s, "SADD set 1");
        for cmd in [
            "SADD str a",
            "SREM str a",
            "SMEMBERS str",
            "SISMEMBER str a",
            "SMISMEMBER str a",
            "SCARD str",
            "SPOP str",
            "SPOP str 0",
            "SPOP str 1",
            "SRANDMEMBER str",
            "SRANDMEMBER str 0",
            "SMOVE str set a",
            "SMOVE set str a",
            "SMOVE set str 1",
            "SMOVE set str 2",
            "SMOVE str str a",
            "SINTER set str",
            "SINTER nokey str",
            "SUNION nokey str",
            "SDIFF nokey str",
            "SDIFF set str",
            "SINTERCARD 1 str",
            "SINTERCARD 2 nokey str",
            "SINTERSTORE d nokey str",
            "SUNIONSTORE d set str",
            "SDIFFSTORE d str",
            "SSCAN str 0",
        ] {
            assert_eq!(run(&mut s, cmd).unwrap_err(), Error::WrongType, "{cmd}");
        }
        // A WRONGTYPE store leaves its destination alone.
        assert!(!s.top.contains_key(&b"d"[..]));
        assert_eq!(members_of(&mut s, "set"), strs(&["1"]));
    }

    #[test]
    fn argument_errors_are_redis_texts_in_redis_order() {
        // Each line was answered by redis-server 7.0.15.
        let mut s = MapSpace::new(0);
        put_string(&mut s, "str");
        ok(&mut s, "SADD s 1 2");
        for (cmd, line) in [
            ("SADD", "ERR wrong number of arguments for 'sadd' command"),
            ("SADD s", "ERR wrong number of arguments for 'sadd' command"),
            ("SREM s", "ERR wrong number of arguments for 'srem' command"),
            (
                "SISMEMBER s",
                "ERR wrong number of arguments for 'sismember' command",
            ),
            (
                "SMISMEMBER s",
                "ERR wrong number of arguments for 'smismember' command",
            ),
            (
                "SCARD s x",
                "ERR wrong number of arguments for 'scard' command",
            ),
            (
                "SMOVE s d",
                "ERR wrong number of arguments for 'smove' command",
            ),
            (
                "SINTERSTORE d",
                "ERR wrong number of arguments for 'sinterstore' command",
            ),
            (
                "SINTER",
                "ERR wrong number of arguments for 'sinter' command",
            ),
            (
                "SINTERCARD 1",
                "ERR wrong number of arguments for 'sintercard' command",
            ),
            // Count checks come before the key's type.
            (
                "SPOP nokey -1",
                "ERR value is out of range, must be positive",
            ),
            ("SPOP str -1", "ERR value is out of range, must be positive"),
            ("SPOP str x", "ERR value is out of range, must be positive"),
            ("SPOP str 1 2", "ERR syntax error"),
            (
                "SRANDMEMBER str x",
                "ERR value is not an integer or out of range",
            ),
            ("SRANDMEMBER nokey 1 2", "ERR syntax error"),
            (
                "SRANDMEMBER nokey -9223372036854775808",
                "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807",
            ),
            ("SINTERCARD 0 s", "ERR numkeys should be greater than 0"),
            ("SINTERCARD -1 s", "ERR numkeys should be greater than 0"),
            ("SINTERCARD x s", "ERR numkeys should be greater than 0"),
            (
                "SINTERCARD 2 s",
                "ERR Number of keys can't be greater than number of args",
            ),
            ("SINTERCARD 1 s LIMIT", "ERR syntax error"),
            ("SINTERCARD 1 s FOO 1", "ERR syntax error"),
            ("SINTERCARD 1 s LIMIT -1", "ERR LIMIT can't be negative"),
            ("SINTERCARD 1 s LIMIT x", "ERR LIMIT can't be negative"),
            ("SINTERCARD 1 str LIMIT -1", "ERR LIMIT can't be negative"),
            ("SINTERCARD 2 s str LIMIT x", "ERR LIMIT can't be negative"),
            ("SSCAN s x", "ERR invalid cursor"),
            ("SSCAN str x", "ERR invalid cursor"),
            ("SSCAN s 18446744073709551616", "ERR invalid cursor"),
            ("SSCAN s 0 COUNT 0", "ERR syntax error"),
            (
                "SSCAN s 0 COUNT x",
                "ERR value is not an integer or out of range",
            ),
            ("SSCAN s 0 MATCH", "ERR syntax error"),
            ("SSCAN s 0 FOO 1", "ERR syntax error"),
        ] {
            fails(&mut s, cmd, line);
        }
        // Options of a missing key's scan are not looked at, as in Redis.
        assert_eq!(
            ok(&mut s, "SSCAN nokey 0 COUNT 0"),
            Reply::Array(vec![bulk("0"), Reply::Array(Vec::new())])
        );
    }

    #[test]
    fn spop_of_a_missing_key_and_count_zero() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "SPOP nokey"), Reply::Nil);
        assert_eq!(ok(&mut s, "SPOP nokey 2"), Reply::Set(Vec::new()));
        assert_eq!(ok(&mut s, "SPOP nokey 0"), Reply::Set(Vec::new()));
        ok(&mut s, "SADD k a");
        assert_eq!(ok(&mut s, "SPOP k 0"), Reply::Set(Vec::new()));
        assert_eq!(ok(&mut s, "SCARD k"), int(1));
    }

    #[test]
    fn spop_removes_what_it_returns_and_the_last_pop_deletes_the_key() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k a b c d e f g h i j");
        let popped = sorted_members(ok(&mut s, "SPOP k 3"));
        assert_eq!(popped.len(), 3);
        let left = members_of(&mut s, "k");
        assert_eq!(left.len(), 7);
        assert!(popped.iter().all(|m| !left.contains(m)));
        let Reply::Bulk(one) = ok(&mut s, "SPOP k") else {
            panic!()
        };
        assert!(left.contains(&String::from_utf8(one.to_vec()).unwrap()));
        assert_eq!(ok(&mut s, "SCARD k"), int(6));
        // A huge count is clamped to the set: everything, and the key is gone.
        let rest = sorted_members(ok(&mut s, "SPOP k 9999999999"));
        assert_eq!(rest.len(), 6);
        assert!(s.top.is_empty());
        assert!(s.elements.is_empty());
        ok(&mut s, "SADD k a");
        assert_eq!(ok(&mut s, "SPOP k"), bulk("a"));
        assert!(s.top.is_empty() && s.elements.is_empty());
    }

    #[test]
    fn spop_keeps_the_ttl() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k 1 2 3");
        let mut v = s.top.get(&b"k"[..]).unwrap().clone();
        v.header.expire_at_ms = Some(50_000);
        s.top.insert(Bytes::from_static(b"k"), v);
        ok(&mut s, "SPOP k");
        assert_eq!(
            s.top.get(&b"k"[..]).unwrap().header.expire_at_ms,
            Some(50_000)
        );
    }

    #[test]
    fn spop_is_the_same_on_every_replica_given_the_seed() {
        let build = || {
            let mut s = MapSpace::new(0);
            for i in 0..300 {
                ok(&mut s, &format!("SADD k m{i}"));
            }
            s
        };
        for seed in [1, 2, 99, u64::MAX] {
            let (mut a, mut b) = (build(), build());
            for cmd in ["SPOP k", "SPOP k 5", "SPOP k 100", "SPOP k"] {
                assert_eq!(
                    run_on(&mut a, cmd, seed).unwrap(),
                    run_on(&mut b, cmd, seed).unwrap(),
                    "{cmd} seed {seed}"
                );
            }
            assert_eq!(a.elements, b.elements);
        }
        // And the seed matters.
        let (mut a, mut b) = (build(), build());
        let picks: Vec<_> = (0..4)
            .map(|i| {
                (
                    run_on(&mut a, "SPOP k 3", i).unwrap(),
                    run_on(&mut b, "SPOP k 3", i + 100).unwrap(),
                )
            })
            .collect();
        assert!(picks.iter().any(|(x, y)| x != y));
    }

    #[test]
    fn srandmember_counts_distinct_repeating_and_bounded() {
        let mut s = MapSpace::new(0);
        assert_eq!(ok(&mut s, "SRANDMEMBER nokey"), Reply::Nil);
        assert_eq!(ok(&mut s, "SRANDMEMBER nokey 5"), Reply::Array(Vec::new()));
        assert_eq!(ok(&mut s, "SRANDMEMBER nokey -5"), Reply::Array(Vec::new()));
        assert_eq!(
            ok(&mut s, "SRANDMEMBER nokey 9223372036854775807"),
            Reply::Array(Vec::new())
        );
        ok(&mut s, "SADD k a b c");
        assert_eq!(ok(&mut s, "SRANDMEMBER k 0"), Reply::Array(Vec::new()));
        assert_eq!(
            sorted_members(ok(&mut s, "SRANDMEMBER k 5")),
            strs(&["a", "b", "c"])
        );
        assert_eq!(
            sorted_members(ok(&mut s, "SRANDMEMBER k 9223372036854775807")),
            strs(&["a", "b", "c"])
        );
        let two = sorted_members(ok(&mut s, "SRANDMEMBER k 2"));
        assert_eq!(two.len(), 2);
        assert_ne!(two[0], two[1]);
        let many = sorted_members(ok(&mut s, "SRANDMEMBER k -7"));
        assert_eq!(many.len(), 7);
        assert!(many.iter().all(|m| ["a", "b", "c"].contains(&m.as_str())));
        assert!(matches!(ok(&mut s, "SRANDMEMBER k"), Reply::Bulk(_)));
        // Reads never change the set.
        assert_eq!(ok(&mut s, "SCARD k"), int(3));
        // A negative count can not ask for an unbounded reply.
        assert!(matches!(
            run(&mut s, "SRANDMEMBER k -9223372036854775807"),
            Err(Error::Command(line)) if line.starts_with("ERR SRANDMEMBER would answer")
        ));
        assert!(run(&mut s, &format!("SRANDMEMBER k -{}", RANDOM_REPLY_MAX + 1)).is_err());
    }

    #[test]
    fn srandmember_distinct_picks_of_a_big_set() {
        let mut s = MapSpace::new(0);
        for i in 0..1000 {
            ok(&mut s, &format!("SADD k m{i}"));
        }
        let picked = sorted_members(ok(&mut s, "SRANDMEMBER k 50"));
        let distinct: BTreeSet<_> = picked.iter().collect();
        assert_eq!(distinct.len(), 50);
    }

    #[test]
    fn smove_moves_one_member_and_deletes_an_emptied_source() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD src a b");
        assert_eq!(ok(&mut s, "SMOVE src dst a"), int(1));
        assert_eq!(members_of(&mut s, "src"), strs(&["b"]));
        assert_eq!(members_of(&mut s, "dst"), strs(&["a"]));
        assert_eq!(ok(&mut s, "SMOVE src dst zz"), int(0));
        // Already in the destination: still moved (it leaves the source).
        ok(&mut s, "SADD dst b");
        assert_eq!(ok(&mut s, "SMOVE src dst b"), int(1));
        assert!(!s.top.contains_key(&b"src"[..]));
        assert_eq!(members_of(&mut s, "dst"), strs(&["a", "b"]));
        assert_eq!(s.elements.len(), 2);
        // A missing source answers 0 even when the destination is not a set.
        put_string(&mut s, "str");
        assert_eq!(ok(&mut s, "SMOVE nokey str a"), int(0));
        assert_eq!(ok(&mut s, "SMOVE nokey other a"), int(0));
        assert!(!s.top.contains_key(&b"other"[..]));
    }

    #[test]
    fn smove_where_source_is_destination_only_checks_membership() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k a");
        assert_eq!(ok(&mut s, "SMOVE k k a"), int(1));
        assert_eq!(ok(&mut s, "SMOVE k k b"), int(0));
        assert_eq!(members_of(&mut s, "k"), strs(&["a"]));
    }

    #[test]
    fn set_algebra() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD a 1 2 3 x");
        ok(&mut s, "SADD b 2 3 4 x");
        ok(&mut s, "SADD c 3 x y");
        assert_eq!(
            sorted_members(ok(&mut s, "SINTER a b c")),
            strs(&["3", "x"])
        );
        assert_eq!(sorted_members(ok(&mut s, "SINTER a b nokey")), strs(&[]));
        assert_eq!(
            sorted_members(ok(&mut s, "SINTER a a")),
            strs(&["1", "2", "3", "x"])
        );
        assert_eq!(
            sorted_members(ok(&mut s, "SUNION a nokey c")),
            strs(&["1", "2", "3", "x", "y"])
        );
        assert_eq!(sorted_members(ok(&mut s, "SDIFF a b")), strs(&["1"]));
        assert_eq!(
            sorted_members(ok(&mut s, "SDIFF a nokey c")),
            strs(&["1", "2"])
        );
        assert_eq!(sorted_members(ok(&mut s, "SDIFF nokey a")), strs(&[]));
        assert_eq!(sorted_members(ok(&mut s, "SDIFF a a")), strs(&[]));
        assert_eq!(ok(&mut s, "SINTERCARD 2 a b"), int(3));
        assert_eq!(ok(&mut s, "SINTERCARD 2 a b LIMIT 2"), int(2));
        assert_eq!(ok(&mut s, "SINTERCARD 2 a b limit 0"), int(3));
        assert_eq!(ok(&mut s, "SINTERCARD 2 a b LIMIT 1 LIMIT 5"), int(3));
        assert_eq!(ok(&mut s, "SINTERCARD 2 a nokey"), int(0));
    }

    #[test]
    fn store_forms_overwrite_any_destination_and_its_ttl() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD a 1 2 3");
        ok(&mut s, "SADD b 2 3 4");
        put_string(&mut s, "d");
        assert_eq!(ok(&mut s, "SINTERSTORE d a b"), int(2));
        assert_eq!(members_of(&mut s, "d"), strs(&["2", "3"]));
        let mut v = s.top.get(&b"d"[..]).unwrap().clone();
        v.header.expire_at_ms = Some(50_000);
        s.top.insert(Bytes::from_static(b"d"), v);
        assert_eq!(ok(&mut s, "SUNIONSTORE d a b"), int(4));
        assert_eq!(s.top.get(&b"d"[..]).unwrap().header.expire_at_ms, None);
        assert_eq!(ok(&mut s, "SDIFFSTORE d a b"), int(1));
        assert_eq!(members_of(&mut s, "d"), strs(&["1"]));
        // Old destination members are reclaimed: a, b and d's one member remain.
        assert_eq!(s.elements.len(), 3 + 3 + 1);
    }

    #[test]
    fn sinterstore_with_an_empty_result_deletes_the_destination() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD a 1");
        ok(&mut s, "SADD b 2");
        for cmd in [
            "SINTERSTORE d a b",
            "SINTERSTORE d a nokey",
            "SUNIONSTORE d nokey nokey2",
            "SDIFFSTORE d a a",
            "SDIFFSTORE d nokey a",
        ] {
            ok(&mut s, "SADD d x");
            assert_eq!(ok(&mut s, cmd), int(0), "{cmd}");
            assert!(!s.top.contains_key(&b"d"[..]), "{cmd}");
            put_string(&mut s, "d");
            assert_eq!(ok(&mut s, cmd), int(0), "{cmd}");
            assert!(!s.top.contains_key(&b"d"[..]), "{cmd} over a string");
        }
        assert_eq!(s.elements.len(), 2);
    }

    #[test]
    fn a_store_destination_may_be_one_of_its_sources() {
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD s 1 2 3");
        ok(&mut s, "SADD t 2 3 4");
        assert_eq!(ok(&mut s, "SDIFFSTORE s s t"), int(1));
        assert_eq!(members_of(&mut s, "s"), strs(&["1"]));
        assert_eq!(ok(&mut s, "SINTERSTORE t t t"), int(3));
        assert_eq!(members_of(&mut s, "t"), strs(&["2", "3", "4"]));
        assert_eq!(ok(&mut s, "SUNIONSTORE t s t"), int(4));
        assert_eq!(members_of(&mut s, "t"), strs(&["1", "2", "3", "4"]));
        assert_eq!(s.elements.len(), 1 + 4);
    }

    /// A space that counts element reads, to check costs.
    struct Counting {
        inner: MapSpace,
        gets: usize,
        ranged: usize,
    }

    impl Space for Counting {
        fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
            self.inner.get(key)
        }
        fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
            self.inner.put(key, value)
        }
        fn remove(&mut self, key: &[u8]) -> Result<()> {
            self.inner.remove(key)
        }
        fn new_id(&mut self) -> Result<u64> {
            self.inner.new_id()
        }
        fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
            self.gets += 1;
            self.inner.el_get(c, sub)
        }
        fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
            self.inner.el_put(c, sub, value)
        }
        fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
            self.inner.el_remove(c, sub)
        }
        fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
            let got = self.inner.el_range(c, range)?;
            self.ranged += got.len();
            Ok(got)
        }
        fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
            self.inner.rename(from, to)
        }
    }

    #[test]
    fn sinter_walks_the_smallest_set_and_probes_the_others() {
        let mut s = MapSpace::new(0);
        for i in 0..3000 {
            ok(&mut s, &format!("SADD big m{i}"));
        }
        ok(&mut s, "SADD small m1 m2 zz");
        let mut c = Counting {
            inner: s,
            gets: 0,
            ranged: 0,
        };
        let r = run_on(&mut c, "SINTER big small", 1).unwrap();
        assert_eq!(sorted_members(r), strs(&["m1", "m2"]));
        assert_eq!((c.ranged, c.gets), (3, 3));
        // SINTERCARD's LIMIT stops the walk.
        c.ranged = 0;
        assert_eq!(
            run_on(&mut c, "SINTERCARD 1 big LIMIT 5", 1).unwrap(),
            int(5)
        );
        assert!(c.ranged <= WALK_PAGE, "read {} members", c.ranged);
        // SDIFF walks the first set only.
        c.ranged = 0;
        c.gets = 0;
        let r = run_on(&mut c, "SDIFF small big", 1).unwrap();
        assert_eq!(sorted_members(r), strs(&["zz"]));
        assert_eq!((c.ranged, c.gets), (3, 3));
    }

    #[test]
    fn sets_stay_intsets_while_members_are_at_most_512_integers() {
        // Each case was checked with OBJECT ENCODING on redis-server 7.0.15.
        let mut s = MapSpace::new(0);
        ok(
            &mut s,
            "SADD i 1 -5 9223372036854775807 -9223372036854775808",
        );
        assert!(!meta_of(&s, "i").big);
        for (key, member) in [
            ("a", "x"),
            ("b", "-0"),
            ("c", "01"),
            ("d", "+1"),
            ("e", "1.0"),
        ] {
            ok(&mut s, &format!("SADD {key} 1 {member}"));
            assert!(meta_of(&s, key).big, "{member} is not an integer");
        }
        let ints: Vec<String> = (1..=512).map(|i| i.to_string()).collect();
        ok(&mut s, &format!("SADD n {}", ints.join(" ")));
        assert!(!meta_of(&s, "n").big);
        ok(&mut s, "SADD n 513");
        assert!(meta_of(&s, "n").big);
        // Sticky: removing the member that converted it changes nothing.
        ok(&mut s, "SREM n 513");
        assert!(meta_of(&s, "n").big);
        ok(&mut s, "SREM a x");
        assert!(meta_of(&s, "a").big);
        ok(&mut s, "SPOP a 0");
        assert!(meta_of(&s, "a").big);
    }

    #[test]
    fn sets_redis_rebuilds_start_over_as_intsets() {
        let mut s = MapSpace::new(0);
        // SPOP keeping few members (left * 5 <= count) rebuilds the set.
        ok(&mut s, "SADD k x y 1 2 3 4 5 6 7 8 9");
        let popped = sorted_members(ok(&mut s, "SPOP k 10"));
        let left = members_of(&mut s, "k");
        let all_int = left.iter().all(|m| m != "x" && m != "y");
        assert_eq!(meta_of(&s, "k").big, !all_int, "{popped:?} {left:?}");
        // ... with every seed, the rule is the members left.
        for seed in 0..20 {
            let mut s = MapSpace::new(0);
            ok(&mut s, "SADD k x 1 2 3 4 5 6 7 8 9");
            run_on(&mut s, "SPOP k 9", seed).unwrap();
            let left = members_of(&mut s, "k");
            assert_eq!(meta_of(&s, "k").big, left[0] == "x");
        }
        // SPOP taking fewer (left * 5 > count) keeps the encoding.
        let mut s = MapSpace::new(0);
        ok(&mut s, "SADD k x 1 2 3 4 5 6 7 8 9");
        let popped = sorted_members(ok(&mut s, "SPOP k 8"));
        assert!(meta_of(&s, "k").big, "{popped:?}");
        // Stores build a new set.
        ok(&mut s, "SADD h 1 2 x");
        ok(&mut s, "SREM h x");
        assert!(meta_of(&s, "h").big);
        ok(&mut s, "SUNIONSTORE h h");
        assert!(!meta_of(&s, "h").big);
        ok(&mut s, "SADD j 1 x");
        ok(&mut s, "SINTERSTORE d j");
        assert!(meta_of(&s, "d").big);
        // SMOVE into a new key: the member decides.
        ok(&mut s, "SMOVE j m1 1");
        assert!(!meta_of(&s, "m1").big);
        ok(&mut s, "SMOVE j m2 x");
        assert!(meta_of(&s, "m2").big);
    }

    fn scan_all(s: &mut MapSpace, key: &str, count: usize) -> (usize, Vec<String>) {
        let mut cursor = "0".to_string();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            let Reply::Array(parts) = ok(s, &format!("SSCAN {key} {cursor} COUNT {count}")) else {
                panic!()
            };
            let (Reply::Bulk(c), Reply::Array(items)) = (&parts[0], &parts[1]) else {
                panic!()
            };
            seen.extend(sorted_members(Reply::Array(items.clone())));
            cursor = String::from_utf8(c.to_vec()).unwrap();
            if cursor == "0" {
                return (pages, seen);
            }
        }
    }

    #[test]
    fn sscan_of_an_intset_answers_everything_at_once() {
        let mut s = MapSpace::new(0);
        let ints: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
        ok(&mut s, &format!("SADD k {}", ints.join(" ")));
        let (pages, seen) = scan_all(&mut s, "k", 3);
        assert_eq!((pages, seen.len()), (1, 100));
        assert_eq!(
            ok(&mut s, "SSCAN k 0 MATCH 1*"),
            ok(&mut s, "SSCAN k 5 MATCH 1* COUNT 1")
        );
        let Reply::Array(parts) = ok(&mut s, "SSCAN k 0 MATCH 1?") else {
            panic!()
        };
        assert_eq!(sorted_members(parts[1].clone()).len(), 10);
    }

    #[test]
    fn sscan_of_a_big_set_returns_every_member_once_across_pages() {
        let mut s = MapSpace::new(0);
        for i in 0..600 {
            ok(&mut s, &format!("SADD k m{i}"));
        }
        let (pages, seen) = scan_all(&mut s, "k", 7);
        assert!(pages > 50);
        let distinct: BTreeSet<_> = seen.iter().collect();
        assert_eq!((seen.len(), distinct.len()), (600, 600));
        assert_eq!(
            ok(&mut s, "SSCAN nokey 0"),
            Reply::Array(vec![bulk("0"), Reply::Array(Vec::new())])
        );
    }

    // ---- The model test: random writes on MapSpace against BTreeSets. ----

    const KEYS: &[&str] = &["a", "b", "c"];
    const POOL: &[&str] = &["1", "2", "3", "10", "-7", "x", "y", "-0", "01", "zz"];

    #[derive(Debug, Clone)]
    enum Op {
        Add(usize, Vec<usize>),
        Rem(usize, Vec<usize>),
        Pop(usize, Option<u64>, u64),
        Move(usize, usize, usize),
        Store(u8, usize, Vec<usize>),
        Str(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 0..KEYS.len();
        let member = 0..POOL.len();
        prop_oneof![
            4 => (key.clone(), prop::collection::vec(member.clone(), 1..6)).prop_map(|(k, m)| Op::Add(k, m)),
            2 => (key.clone(), prop::collection::vec(member.clone(), 1..4)).prop_map(|(k, m)| Op::Rem(k, m)),
            2 => (key.clone(), prop::option::of(0u64..12), any::<u64>()).prop_map(|(k, c, s)| Op::Pop(k, c, s)),
            2 => (key.clone(), key.clone(), member).prop_map(|(a, b, m)| Op::Move(a, b, m)),
            2 => (0u8..3, key.clone(), prop::collection::vec(key.clone(), 1..4)).prop_map(|(f, d, k)| Op::Store(f, d, k)),
            1 => key.prop_map(Op::Str),
        ]
    }

    /// What a key holds in the model: a set and whether Redis would have left the intset.
    #[derive(Debug, Clone)]
    enum M {
        Set(BTreeSet<String>, bool),
        Str,
    }

    /// Redis's string2ll, written independently: the canonical text of an i64.
    fn is_int(m: &str) -> bool {
        m.parse::<i64>().is_ok_and(|n| n.to_string() == m)
    }

    fn fresh_big(set: &BTreeSet<String>) -> bool {
        set.len() > 512 || set.iter().any(|m| !is_int(m))
    }

    fn model_add(entry: &mut (BTreeSet<String>, bool), m: &str) {
        if entry.0.insert(m.to_string()) && (entry.0.len() > 512 || !is_int(m)) {
            entry.1 = true;
        }
    }

    fn check(space: &mut MapSpace, model: &BTreeMap<usize, M>) {
        let mut total = 0;
        for (i, key) in KEYS.iter().enumerate() {
            match model.get(&i) {
                None => assert!(
                    !space.top.contains_key(key.as_bytes()),
                    "{key} should be gone"
                ),
                Some(M::Str) => {
                    assert_eq!(
                        run(space, &format!("SCARD {key}")).unwrap_err(),
                        Error::WrongType
                    )
                }
                Some(M::Set(set, big)) => {
                    assert!(!set.is_empty(), "the model keeps no empty set");
                    let want: Vec<String> = set.iter().cloned().collect();
                    assert_eq!(members_of(space, key), want, "{key}");
                    assert_eq!(ok(space, &format!("SCARD {key}")), int(set.len() as i64));
                    assert_eq!(meta_of(space, key).big, *big, "{key} encoding");
                    total += set.len();
                }
            }
        }
        assert_eq!(space.elements.len(), total, "no element outlives its set");
    }

    fn apply(space: &mut MapSpace, model: &mut BTreeMap<usize, M>, op: &Op) {
        let name = |i: usize| KEYS[i];
        match op {
            Op::Add(k, ms) => {
                let cmd = format!(
                    "SADD {} {}",
                    name(*k),
                    ms.iter().map(|m| POOL[*m]).collect::<Vec<_>>().join(" ")
                );
                let r = run(space, &cmd);
                match model
                    .entry(*k)
                    .or_insert_with(|| M::Set(BTreeSet::new(), false))
                {
                    M::Str => assert_eq!(r.unwrap_err(), Error::WrongType),
                    M::Set(set, big) => {
                        let before = set.len();
                        let mut e = (std::mem::take(set), *big);
                        for m in ms {
                            model_add(&mut e, POOL[*m]);
                        }
                        assert_eq!(r.unwrap(), int((e.0.len() - before) as i64), "{cmd}");
                        (*set, *big) = e;
                    }
                }
            }
            Op::Rem(k, ms) => {
                let cmd = format!(
                    "SREM {} {}",
                    name(*k),
                    ms.iter().map(|m| POOL[*m]).collect::<Vec<_>>().join(" ")
                );
                let r = run(space, &cmd);
                match model.get_mut(k) {
                    Some(M::Str) => assert_eq!(r.unwrap_err(), Error::WrongType),
                    None => assert_eq!(r.unwrap(), int(0)),
                    Some(M::Set(set, _)) => {
                        let n = ms
                            .iter()
                            .map(|m| POOL[*m])
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .filter(|m| set.remove(*m))
                            .count();
                        assert_eq!(r.unwrap(), int(n as i64), "{cmd}");
                    }
                }
            }
            Op::Pop(k, count, seed) => {
                let cmd = match count {
                    Some(c) => format!("SPOP {} {c}", name(*k)),
                    None => format!("SPOP {}", name(*k)),
                };
                let r = run_on(space, &cmd, *seed);
                match model.get_mut(k) {
                    Some(M::Str) => assert_eq!(r.unwrap_err(), Error::WrongType),
                    None => assert_eq!(
                        r.unwrap(),
                        if count.is_some() {
                            Reply::Set(Vec::new())
                        } else {
                            Reply::Nil
                        }
                    ),
                    Some(M::Set(set, big)) => {
                        let popped = match count {
                            None => vec![match r.unwrap() {
                                Reply::Bulk(b) => String::from_utf8(b.to_vec()).unwrap(),
                                other => panic!("{other:?}"),
                            }],
                            Some(_) => {
                                let r = r.unwrap();
                                assert!(matches!(r, Reply::Set(_)), "{r:?}");
                                sorted_members(r)
                            }
                        };
                        let want = count.map_or(1, |c| (c as usize).min(set.len()));
                        assert_eq!(popped.len(), want, "{cmd}");
                        for m in &popped {
                            assert!(set.remove(m), "{cmd} popped {m}, not a member or twice");
                        }
                        if let Some(c) = count
                            && !set.is_empty()
                            && (set.len() as u64) * SPOP_MOVE_STRATEGY_MUL <= *c
                        {
                            *big = fresh_big(set);
                        }
                    }
                }
            }
            Op::Move(src, dst, m) => {
                let member = POOL[*m];
                let cmd = format!("SMOVE {} {} {member}", name(*src), name(*dst));
                let r = run(space, &cmd);
                let src_m = model.get(src).cloned();
                let dst_m = model.get(dst).cloned();
                match (src_m, dst_m) {
                    (None, _) => assert_eq!(r.unwrap(), int(0)),
                    (Some(M::Str), _) | (_, Some(M::Str)) => {
                        assert_eq!(r.unwrap_err(), Error::WrongType)
                    }
                    (Some(M::Set(s, _)), _) if src == dst => {
                        assert_eq!(r.unwrap(), int(s.contains(member) as i64))
                    }
                    (Some(M::Set(mut s, sbig)), d) => {
                        if !s.remove(member) {
                            assert_eq!(r.unwrap(), int(0));
                            return;
                        }
                        assert_eq!(r.unwrap(), int(1));
                        model.insert(*src, M::Set(s, sbig));
                        let mut e = match d {
                            Some(M::Set(d, dbig)) => (d, dbig),
                            _ => (BTreeSet::new(), false),
                        };
                        model_add(&mut e, member);
                        model.insert(*dst, M::Set(e.0, e.1));
                    }
                }
            }
            Op::Store(form, dst, keys) => {
                let verb = ["SINTERSTORE", "SUNIONSTORE", "SDIFFSTORE"][*form as usize];
                let cmd = format!(
                    "{verb} {} {}",
                    name(*dst),
                    keys.iter().map(|k| name(*k)).collect::<Vec<_>>().join(" ")
                );
                let r = run(space, &cmd);
                if keys.iter().any(|k| matches!(model.get(k), Some(M::Str))) {
                    assert_eq!(r.unwrap_err(), Error::WrongType, "{cmd}");
                    return;
                }
                let sets: Vec<BTreeSet<String>> = keys
                    .iter()
                    .map(|k| match model.get(k) {
                        Some(M::Set(s, _)) => s.clone(),
                        _ => BTreeSet::new(),
                    })
                    .collect();
                let result: BTreeSet<String> = match form {
                    0 => sets[1..].iter().fold(sets[0].clone(), |acc, s| &acc & s),
                    1 => sets.iter().fold(BTreeSet::new(), |acc, s| &acc | s),
                    _ => sets[1..].iter().fold(sets[0].clone(), |acc, s| &acc - s),
                };
                assert_eq!(r.unwrap(), int(result.len() as i64), "{cmd}");
                if result.is_empty() {
                    model.remove(dst);
                } else {
                    let big = fresh_big(&result);
                    model.insert(*dst, M::Set(result, big));
                }
            }
            Op::Str(k) => {
                put_string(space, name(*k));
                model.insert(*k, M::Str);
            }
        }
        model.retain(|_, v| !matches!(v, M::Set(s, _) if s.is_empty()));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_writes_match_a_btreeset_model(ops in prop::collection::vec(op(), 1..40)) {
            let mut space = MapSpace::new(0);
            let mut model = BTreeMap::new();
            for op in &ops {
                apply(&mut space, &mut model, op);
                check(&mut space, &model);
            }
        }
    }
}
