//! Walking the order index: score and lex ranges, ranks, and the commands built on them (the
//! ZRANGE family, ZRANGESTORE, ZCOUNT, ZLEXCOUNT, ZRANK/ZREVRANK, ZREMRANGEBY*).
//!
//! Every walk reads the index in pages of at most [`PAGE`] records (fewer when the caller needs
//! fewer), so memory stays bounded by what a reply holds, whatever the sorted set's size.

use std::ops::Bound::{self, Excluded, Included, Unbounded};

use bytes::Bytes;
use capdb_types::{Reply, Result};

use super::{
    Entry, SCORE, all_index, decode_index, entries_reply, index_key, index_prefix, open_zset,
    sortable, store_entries,
};
use crate::command::{Ctx, err, int_arg, syntax};
use crate::format::parse_double;
use crate::meta::{Open, finish, hashed_sub};
use crate::space::{ElRange, Space};

/// Most index records read at once.
const PAGE: usize = 256;

type B = Bound<Vec<u8>>;

/// Whether a walk goes on.
pub(super) enum Flow {
    Go,
    Stop,
}

fn as_ref(b: &B) -> Bound<&[u8]> {
    match b {
        Included(k) => Included(k),
        Excluded(k) => Excluded(k),
        Unbounded => Unbounded,
    }
}

fn is_empty(lo: &B, hi: &B) -> bool {
    match (lo, hi) {
        (Included(a) | Excluded(a), Included(b) | Excluded(b)) => {
            a > b || (a == b && !(matches!(lo, Included(_)) && matches!(hi, Included(_))))
        }
        _ => false,
    }
}

/// Calls `f` on the index records within `lo..hi`, ascending (descending when `rev`), until it
/// says stop. `hint` is how many records `f` may want at most (it sizes the pages).
pub(super) fn visit(
    space: &mut dyn Space,
    z: &Open,
    mut lo: B,
    mut hi: B,
    rev: bool,
    hint: u64,
    mut f: impl FnMut(&mut dyn Space, Entry) -> Result<Flow>,
) -> Result<()> {
    let mut left = hint;
    loop {
        if left == 0 || is_empty(&lo, &hi) {
            return Ok(());
        }
        let limit = left.min(PAGE as u64) as usize;
        let page = space.el_range(
            &z.coll,
            ElRange {
                lo: as_ref(&lo),
                hi: as_ref(&hi),
                rev,
                limit,
            },
        )?;
        let full = page.len() == limit;
        let mut last = None;
        for (sub, _) in page {
            left = left.saturating_sub(1);
            if let Flow::Stop = f(space, decode_index(&sub)?)? {
                return Ok(());
            }
            last = Some(sub);
        }
        match (full, last) {
            (true, Some(l)) if rev => hi = Excluded(l.to_vec()),
            (true, Some(l)) => lo = Excluded(l.to_vec()),
            _ => return Ok(()),
        }
    }
}

/// Up to `n` records of `lo..hi` after skipping `skip`, in walk order.
pub(super) fn take(
    space: &mut dyn Space,
    z: &Open,
    lo: B,
    hi: B,
    rev: bool,
    skip: u64,
    n: u64,
) -> Result<Vec<Entry>> {
    let n = n.min(z.meta.len);
    let mut out = Vec::with_capacity(n.min(PAGE as u64) as usize);
    if n == 0 {
        return Ok(out);
    }
    let mut skipped = 0;
    visit(space, z, lo, hi, rev, skip.saturating_add(n), |_, e| {
        if skipped < skip {
            skipped += 1;
            return Ok(Flow::Go);
        }
        out.push(e);
        Ok(if out.len() as u64 == n {
            Flow::Stop
        } else {
            Flow::Go
        })
    })?;
    Ok(out)
}

/// Redis's normalisation of a rank range (negative counts from the end): the ascending ranks
/// `a..=b` it selects, or `None` when empty.
fn rank_span(len: u64, start: i64, end: i64) -> Option<(u64, u64)> {
    let len = len as i64;
    let start = if start < 0 { len + start } else { start }.max(0);
    let end = if end < 0 { len + end } else { end };
    if start > end || start >= len {
        return None;
    }
    Some((start as u64, end.min(len - 1) as u64))
}

/// The members of ascending ranks `a..=b`, in ascending order, walking from the nearer end.
fn by_rank(space: &mut dyn Space, z: &Open, a: u64, b: u64) -> Result<Vec<Entry>> {
    let n = b - a + 1;
    let from_end = z.meta.len - 1 - b;
    let (lo, hi) = all_index();
    if a <= from_end {
        take(space, z, lo, hi, false, a, n)
    } else {
        let mut v = take(space, z, lo, hi, true, from_end, n)?;
        v.reverse();
        Ok(v)
    }
}

// ---- Score and lex ranges ----------------------------------------------------------------

/// C's `strtod` over a whole range bound: leading white space skipped, an empty string is 0,
/// NaN refused.
fn strtod_whole(raw: &[u8]) -> Option<f64> {
    // C's isspace: what `is_ascii_whitespace` counts, and \v.
    let start = raw
        .iter()
        .position(|&c| !(c.is_ascii_whitespace() || c == b'\x0b'))
        .unwrap_or(raw.len());
    let rest = &raw[start..];
    if rest.is_empty() {
        return raw.is_empty().then_some(0.0);
    }
    parse_double(rest)
}

/// `min` and `max` of a score range as index bounds (`(` excludes), or Redis's error.
fn score_bounds(min: &[u8], max: &[u8]) -> Result<(B, B)> {
    let bound = |raw: &[u8]| -> Option<(f64, bool)> {
        match raw.split_first() {
            Some((b'(', rest)) => strtod_whole(rest).map(|x| (x, true)),
            _ => strtod_whole(raw).map(|x| (x, false)),
        }
    };
    let bad = || err("ERR min or max is not a float");
    let (min, minex) = bound(min).ok_or_else(bad)?;
    let (max, maxex) = bound(max).ok_or_else(bad)?;
    // No stored score is NaN, so the sortable value after any score's is free.
    let lo = sortable(min).saturating_add(minex as u64);
    let hi = sortable(max).saturating_add(!maxex as u64);
    Ok((Included(index_prefix(lo)), Excluded(index_prefix(hi))))
}

/// One end of a lex range.
#[derive(Debug, Clone)]
pub(super) enum Lex {
    /// `-`
    Min,
    /// `+`
    Max,
    /// `[member`
    Incl(Bytes),
    /// `(member`
    Excl(Bytes),
}

fn parse_lex(raw: &Bytes) -> Option<Lex> {
    match raw.first()? {
        b'+' if raw.len() == 1 => Some(Lex::Max),
        b'-' if raw.len() == 1 => Some(Lex::Min),
        b'[' => Some(Lex::Incl(raw.slice(1..))),
        b'(' => Some(Lex::Excl(raw.slice(1..))),
        _ => None,
    }
}

fn lex_range(min: &Bytes, max: &Bytes) -> Result<(Lex, Lex)> {
    let bad = || err("ERR min or max not valid string range item");
    Ok((
        parse_lex(min).ok_or_else(bad)?,
        parse_lex(max).ok_or_else(bad)?,
    ))
}

fn gte_min(m: &[u8], min: &Lex) -> bool {
    match min {
        Lex::Min => true,
        Lex::Max => false,
        Lex::Incl(a) => m >= &a[..],
        Lex::Excl(a) => m > &a[..],
    }
}

fn lte_max(m: &[u8], max: &Lex) -> bool {
    match max {
        Lex::Max => true,
        Lex::Min => false,
        Lex::Incl(b) => m <= &b[..],
        Lex::Excl(b) => m < &b[..],
    }
}

/// What a range selects.
pub(super) enum Sel {
    /// The index records within these bounds.
    Keys(B, B),
    /// A lex range over members of different scores (outside what Redis defines): Redis's
    /// listpack walk, from the first member at or after `min` while members are at most `max`
    /// (mirrored when reversed), reading the index from its end.
    Scan(Lex, Lex),
    Nothing,
}

fn score_sel(min: &[u8], max: &[u8]) -> Result<Sel> {
    let (lo, hi) = score_bounds(min, max)?;
    Ok(Sel::Keys(lo, hi))
}

/// A lex range over `z`: one range read when every member has the same score (what ZRANGEBYLEX
/// is for: reading the first and last record tells), else [`Sel::Scan`].
fn lex_sel(space: &mut dyn Space, z: &Open, min: Lex, max: Lex) -> Result<Sel> {
    let (lo, hi) = all_index();
    let first = take(space, z, lo.clone(), hi.clone(), false, 0, 1)?;
    let last = take(space, z, lo, hi, true, 0, 1)?;
    let (Some(f), Some(l)) = (first.first(), last.first()) else {
        return Ok(Sel::Nothing);
    };
    let s = sortable(f.1);
    if s == sortable(l.1) {
        let p = index_prefix(s);
        let with = |m: &[u8]| [&p[..], m].concat();
        let lo = match &min {
            Lex::Min => Included(p.clone()),
            Lex::Max => return Ok(Sel::Nothing),
            Lex::Incl(a) => Included(with(a)),
            Lex::Excl(a) => Excluded(with(a)),
        };
        let hi = match &max {
            Lex::Max => Excluded(index_prefix(s.saturating_add(1))),
            Lex::Min => return Ok(Sel::Nothing),
            Lex::Incl(b) => Included(with(b)),
            Lex::Excl(b) => Excluded(with(b)),
        };
        return Ok(Sel::Keys(lo, hi));
    }
    if !gte_min(&l.0, &min) || !lte_max(&f.0, &max) {
        return Ok(Sel::Nothing);
    }
    Ok(Sel::Scan(min, max))
}

/// [`visit`] over a selection.
fn visit_sel(
    space: &mut dyn Space,
    z: &Open,
    sel: Sel,
    rev: bool,
    hint: u64,
    mut f: impl FnMut(&mut dyn Space, Entry) -> Result<Flow>,
) -> Result<()> {
    match sel {
        Sel::Nothing => Ok(()),
        Sel::Keys(lo, hi) => visit(space, z, lo, hi, rev, hint, f),
        Sel::Scan(min, max) => {
            let (lo, hi) = all_index();
            let mut started = false;
            visit(space, z, lo, hi, rev, z.meta.len, |space, e| {
                let (starts, stays) = if rev {
                    (lte_max(&e.0, &max), gte_min(&e.0, &min))
                } else {
                    (gte_min(&e.0, &min), lte_max(&e.0, &max))
                };
                if !started {
                    if !starts {
                        return Ok(Flow::Go);
                    }
                    started = true;
                }
                if !stays {
                    return Ok(Flow::Stop);
                }
                f(space, e)
            })
        }
    }
}

fn count_sel(space: &mut dyn Space, z: &Open, sel: Sel) -> Result<u64> {
    let mut n = 0;
    visit_sel(space, z, sel, false, z.meta.len, |_, _| {
        n += 1;
        Ok(Flow::Go)
    })?;
    Ok(n)
}

/// Up to `limit` members of a selection after skipping `offset` (Redis's LIMIT: a negative
/// offset selects nothing, a negative count everything).
fn take_sel(
    space: &mut dyn Space,
    z: &Open,
    sel: Sel,
    rev: bool,
    offset: i64,
    limit: i64,
) -> Result<Vec<Entry>> {
    if offset < 0 || limit == 0 || offset as u64 >= z.meta.len {
        return Ok(Vec::new());
    }
    let skip = offset as u64;
    let n = if limit < 0 {
        z.meta.len
    } else {
        (limit as u64).min(z.meta.len)
    };
    let mut out = Vec::new();
    let mut skipped = 0;
    visit_sel(space, z, sel, rev, skip + n, |_, e| {
        if skipped < skip {
            skipped += 1;
            return Ok(Flow::Go);
        }
        out.push(e);
        Ok(if out.len() as u64 == n {
            Flow::Stop
        } else {
            Flow::Go
        })
    })?;
    Ok(out)
}

/// Removes every member of a selection; the number removed (the caller finishes).
fn remove_sel(space: &mut dyn Space, z: &mut Open, sel: Sel, hint: u64) -> Result<u64> {
    let coll = z.coll.clone();
    let mut removed = 0;
    visit_sel(space, z, sel, false, hint, |space, (m, s)| {
        space.el_remove(&coll, &index_key(s, &m))?;
        space.el_remove(&coll, &hashed_sub(SCORE, &m))?;
        removed += 1;
        Ok(Flow::Go)
    })?;
    z.meta.len -= removed;
    Ok(removed)
}

// ---- ZRANGE and friends ------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum By {
    Auto,
    Rank,
    Score,
    Lex,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Auto,
    Forward,
    Reverse,
}

/// Redis's `zrangeGenericCommand`: the key at `at`, min and max after it, then options. Returns
/// the selected members (with scores) and whether WITHSCORES was given.
fn zrange_generic(
    args: &[Bytes],
    space: &mut dyn Space,
    at: usize,
    store: bool,
    mut by: By,
    mut dir: Dir,
) -> Result<(Vec<Entry>, bool)> {
    let (mut min_at, mut max_at) = (at + 1, at + 2);
    let mut with_scores = false;
    let (mut offset, mut limit) = (0, -1);
    let mut j = at + 3;
    while j < args.len() {
        let left = args.len() - j - 1;
        let a = &args[j];
        if !store && a.eq_ignore_ascii_case(b"WITHSCORES") {
            with_scores = true;
        } else if a.eq_ignore_ascii_case(b"LIMIT") && left >= 2 {
            offset = int_arg(args, j + 1)?;
            limit = int_arg(args, j + 2)?;
            j += 2;
        } else if dir == Dir::Auto && a.eq_ignore_ascii_case(b"REV") {
            dir = Dir::Reverse;
        } else if by == By::Auto && a.eq_ignore_ascii_case(b"BYLEX") {
            by = By::Lex;
        } else if by == By::Auto && a.eq_ignore_ascii_case(b"BYSCORE") {
            by = By::Score;
        } else {
            return Err(syntax());
        }
        j += 1;
    }
    let rev = dir == Dir::Reverse;
    if by == By::Auto {
        by = By::Rank;
    }
    if limit != -1 && by == By::Rank {
        return Err(err(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        ));
    }
    if with_scores && by == By::Lex {
        return Err(err(
            "ERR syntax error, WITHSCORES not supported in combination with BYLEX",
        ));
    }
    if rev && by != By::Rank {
        std::mem::swap(&mut min_at, &mut max_at);
    }
    enum Parsed {
        Rank(i64, i64),
        Score(Sel),
        Lex(Lex, Lex),
    }
    let parsed = match by {
        By::Score => Parsed::Score(score_sel(&args[min_at], &args[max_at])?),
        By::Lex => {
            let (min, max) = lex_range(&args[min_at], &args[max_at])?;
            Parsed::Lex(min, max)
        }
        _ => Parsed::Rank(int_arg(args, min_at)?, int_arg(args, max_at)?),
    };
    let Some(z) = open_zset(space, &args[at])? else {
        return Ok((Vec::new(), with_scores));
    };
    let entries = match parsed {
        Parsed::Rank(start, end) => match rank_span(z.meta.len, start, end) {
            None => Vec::new(),
            Some((a, b)) if rev => {
                let len = z.meta.len;
                let mut v = by_rank(space, &z, len - 1 - b, len - 1 - a)?;
                v.reverse();
                v
            }
            Some((a, b)) => by_rank(space, &z, a, b)?,
        },
        Parsed::Score(sel) => take_sel(space, &z, sel, rev, offset, limit)?,
        Parsed::Lex(min, max) => {
            let sel = lex_sel(space, &z, min, max)?;
            take_sel(space, &z, sel, rev, offset, limit)?
        }
    };
    Ok((entries, with_scores))
}

fn client_range(args: &[Bytes], space: &mut dyn Space, by: By, dir: Dir) -> Result<Reply> {
    let (entries, with_scores) = zrange_generic(args, space, 1, false, by, dir)?;
    Ok(entries_reply(entries, with_scores))
}

/// `ZRANGE key start stop [BYSCORE|BYLEX] [REV] [LIMIT offset count] [WITHSCORES]`.
pub(super) fn zrange(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Auto, Dir::Auto)
}

/// `ZREVRANGE key start stop [WITHSCORES]`.
pub(super) fn zrevrange(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Rank, Dir::Reverse)
}

/// `ZRANGEBYSCORE key min max [WITHSCORES] [LIMIT offset count]`.
pub(super) fn zrangebyscore(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Score, Dir::Forward)
}

/// `ZREVRANGEBYSCORE key max min [WITHSCORES] [LIMIT offset count]`.
pub(super) fn zrevrangebyscore(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Score, Dir::Reverse)
}

/// `ZRANGEBYLEX key min max [LIMIT offset count]`.
pub(super) fn zrangebylex(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Lex, Dir::Forward)
}

/// `ZREVRANGEBYLEX key max min [LIMIT offset count]`.
pub(super) fn zrevrangebylex(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    client_range(args, space, By::Lex, Dir::Reverse)
}

/// `ZRANGESTORE dst src min max [BYSCORE|BYLEX] [REV] [LIMIT offset count]`: the number stored;
/// an empty result deletes `dst`.
pub(super) fn zrangestore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (entries, _) = zrange_generic(args, space, 2, true, By::Auto, Dir::Auto)?;
    store_entries(space, &args[1], &entries, cx)
}

/// `ZCOUNT key min max`.
pub(super) fn zcount(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let sel = score_sel(&args[2], &args[3])?;
    let Some(z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    Ok(Reply::Integer(count_sel(space, &z, sel)? as i64))
}

/// `ZLEXCOUNT key min max`.
pub(super) fn zlexcount(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let (min, max) = lex_range(&args[2], &args[3])?;
    let Some(z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let sel = lex_sel(space, &z, min, max)?;
    Ok(Reply::Integer(count_sel(space, &z, sel)? as i64))
}

fn rank_command(args: &[Bytes], space: &mut dyn Space, rev: bool) -> Result<Reply> {
    let Some(z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Nil);
    };
    let Some(score) = super::score_of(space, &z, &args[2])? else {
        return Ok(Reply::Nil);
    };
    let key = index_key(score, &args[2]);
    let (lo, hi) = all_index();
    let sel = if rev {
        Sel::Keys(Excluded(key), hi)
    } else {
        Sel::Keys(lo, Excluded(key))
    };
    Ok(Reply::Integer(count_sel(space, &z, sel)? as i64))
}

/// `ZRANK key member`: O(rank) reads.
pub(super) fn zrank(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    rank_command(args, space, false)
}

/// `ZREVRANK key member`: O(reverse rank) reads.
pub(super) fn zrevrank(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    rank_command(args, space, true)
}

fn finish_removal(space: &mut dyn Space, z: &Open, removed: u64, cx: &Ctx) -> Result<Reply> {
    if removed > 0 {
        finish(space, z, cx)?;
    }
    Ok(Reply::Integer(removed as i64))
}

/// `ZREMRANGEBYRANK key start stop`.
pub(super) fn zremrangebyrank(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let start = int_arg(args, 2)?;
    let end = int_arg(args, 3)?;
    let Some(mut z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let Some((a, b)) = rank_span(z.meta.len, start, end) else {
        return Ok(Reply::Integer(0));
    };
    let doomed = by_rank(space, &z, a, b)?;
    for (m, s) in &doomed {
        super::remove_member(space, &mut z, m, *s)?;
    }
    finish_removal(space, &z, doomed.len() as u64, cx)
}

/// `ZREMRANGEBYSCORE key min max`.
pub(super) fn zremrangebyscore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let sel = score_sel(&args[2], &args[3])?;
    let Some(mut z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let len = z.meta.len;
    let removed = remove_sel(space, &mut z, sel, len)?;
    finish_removal(space, &z, removed, cx)
}

/// `ZREMRANGEBYLEX key min max`.
pub(super) fn zremrangebylex(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let (min, max) = lex_range(&args[2], &args[3])?;
    let Some(mut z) = open_zset(space, &args[1])? else {
        return Ok(Reply::Integer(0));
    };
    let sel = lex_sel(space, &z, min, max)?;
    let len = z.meta.len;
    let removed = remove_sel(space, &mut z, sel, len)?;
    finish_removal(space, &z, removed, cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bounds_parse_like_strtod() {
        assert_eq!(strtod_whole(b""), Some(0.0));
        assert_eq!(strtod_whole(b"  1.5"), Some(1.5));
        assert_eq!(strtod_whole(b"\x0b2"), Some(2.0));
        assert_eq!(strtod_whole(b" "), None);
        assert_eq!(strtod_whole(b"1 "), None);
        assert_eq!(strtod_whole(b"nan"), None);
        assert_eq!(strtod_whole(b"-inf"), Some(f64::NEG_INFINITY));
    }

    #[test]
    fn rank_spans_follow_redis_normalisation() {
        assert_eq!(rank_span(5, 0, -1), Some((0, 4)));
        assert_eq!(rank_span(5, -100, 100), Some((0, 4)));
        assert_eq!(rank_span(5, 3, 1), None);
        assert_eq!(rank_span(5, 5, 10), None);
        assert_eq!(rank_span(5, -2, -1), Some((3, 4)));
        assert_eq!(rank_span(5, i64::MIN, i64::MAX), Some((0, 4)));
    }
}
