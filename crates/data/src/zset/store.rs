//! ZUNION, ZINTER, ZDIFF, their store forms, and ZINTERCARD: Redis's
//! `zunionInterDiffGenericCommand`.
//!
//! Sources may be sorted sets or sets (a set member scores 1); both keep members under
//! `0 ‖ hash ‖ member`, so a source is read in pages of that layout and probed with one read
//! per member. An intersection walks its smallest source and probes the others; a union
//! accumulates every member in memory; a difference walks the first source and probes the rest.

use std::collections::HashMap;
use std::ops::Bound::{Excluded, Included};

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, ValueKind};

use super::{Entry, SCORE, decode_score, entries_reply, store_entries};
use crate::command::{Ctx, err, int_arg, syntax};
use crate::format::{parse_double_in_range, parse_int};
use crate::meta::{Open, hashed_sub, member_of_hashed, open};
use crate::space::{ElRange, Space};

const PAGE: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Union,
    Inter,
    Diff,
}

#[derive(Clone, Copy)]
enum Agg {
    Sum,
    Min,
    Max,
}

impl Agg {
    /// Redis's `zunionInterAggregate` (a sum of `inf` and `-inf` is 0).
    fn apply(self, target: &mut f64, v: f64) {
        match self {
            Agg::Sum => {
                *target += v;
                if target.is_nan() {
                    *target = 0.0;
                }
            }
            Agg::Min => {
                if v < *target {
                    *target = v;
                }
            }
            Agg::Max => {
                if v > *target {
                    *target = v;
                }
            }
        }
    }
}

struct Src {
    z: Option<Open>,
    weight: f64,
}

impl Src {
    fn len(&self) -> u64 {
        self.z.as_ref().map_or(0, |z| z.meta.len)
    }
}

/// `w * s`, with Redis's NaN (`0 * inf`) as 0: a union's every product, an intersection's
/// first source's. An intersection's later products go into the aggregate as they are (Redis
/// 7.0's `zunionInterDiffGenericCommand`), so a NaN there makes a sum 0 and never wins a MIN
/// or MAX.
fn weighted(w: f64, s: f64) -> f64 {
    let x = w * s;
    if x.is_nan() { 0.0 } else { x }
}

/// Calls `f` on every member of a source and its score, in pages; stops when `f` says false.
fn for_each(
    space: &mut dyn Space,
    z: &Open,
    mut f: impl FnMut(&mut dyn Space, Entry) -> Result<bool>,
) -> Result<()> {
    let end = [SCORE + 1];
    let mut from: Vec<u8> = vec![SCORE];
    let mut first = true;
    loop {
        let page = space.el_range(
            &z.coll,
            ElRange {
                lo: if first {
                    Included(&from)
                } else {
                    Excluded(&from)
                },
                hi: Excluded(&end),
                rev: false,
                limit: PAGE,
            },
        )?;
        let full = page.len() == PAGE;
        for (sub, raw) in &page {
            if !f(space, (member_of_hashed(sub)?, decode_score(raw)?))? {
                return Ok(());
            }
        }
        match page.last() {
            Some((sub, _)) if full => {
                from = sub.to_vec();
                first = false;
            }
            _ => return Ok(()),
        }
    }
}

fn probe(space: &mut dyn Space, z: &Option<Open>, member: &[u8]) -> Result<Option<f64>> {
    let Some(z) = z else { return Ok(None) };
    space
        .el_get(&z.coll, &hashed_sub(SCORE, member))?
        .map(|raw| decode_score(&raw))
        .transpose()
}

fn generic(
    args: &[Bytes],
    space: &mut dyn Space,
    cx: &Ctx,
    dst: Option<&Bytes>,
    numkeys_at: usize,
    op: Op,
    card_only: bool,
) -> Result<Reply> {
    let setnum = int_arg(args, numkeys_at)?;
    if setnum < 1 {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        return Err(err(format!(
            "ERR at least 1 input key is needed for '{name}' command"
        )));
    }
    let first_key = numkeys_at + 1;
    if setnum as u64 > (args.len() - first_key) as u64 {
        return Err(syntax());
    }
    let setnum = setnum as usize;
    let mut srcs = Vec::with_capacity(setnum);
    for key in &args[first_key..first_key + setnum] {
        let z = match space.get(key)? {
            None => None,
            Some(v) if matches!(v.header.kind, ValueKind::ZSet | ValueKind::Set) => {
                open(space, key, v.header.kind)?
            }
            Some(_) => return Err(Error::WrongType),
        };
        srcs.push(Src { z, weight: 1.0 });
    }
    let mut agg = Agg::Sum;
    let mut with_scores = false;
    let mut limit = 0u64;
    let mut j = first_key + setnum;
    while j < args.len() {
        let remaining = args.len() - j;
        let a = &args[j];
        let set_op = op != Op::Diff && !card_only;
        if set_op && remaining > setnum && a.eq_ignore_ascii_case(b"WEIGHTS") {
            j += 1;
            for src in srcs.iter_mut() {
                src.weight = parse_double_in_range(&args[j])
                    .ok_or_else(|| err("ERR weight value is not a float"))?;
                j += 1;
            }
        } else if set_op && remaining >= 2 && a.eq_ignore_ascii_case(b"AGGREGATE") {
            agg = match &args[j + 1].to_ascii_lowercase()[..] {
                b"sum" => Agg::Sum,
                b"min" => Agg::Min,
                b"max" => Agg::Max,
                _ => return Err(syntax()),
            };
            j += 2;
        } else if dst.is_none() && !card_only && a.eq_ignore_ascii_case(b"WITHSCORES") {
            with_scores = true;
            j += 1;
        } else if card_only && remaining >= 2 && a.eq_ignore_ascii_case(b"LIMIT") {
            limit = parse_int(&args[j + 1])
                .filter(|n| *n >= 0)
                .ok_or_else(|| err("ERR LIMIT can't be negative"))? as u64;
            j += 2;
        } else {
            return Err(syntax());
        }
    }
    if op != Op::Diff {
        srcs.sort_by_key(Src::len);
    }
    let mut out: Vec<Entry> = Vec::new();
    let mut cardinality = 0u64;
    match op {
        Op::Inter => {
            if let Some(z0) = srcs[0].z.clone().filter(|z| z.meta.len > 0) {
                let w0 = srcs[0].weight;
                for_each(space, &z0, |space, (m, s)| {
                    let mut score = weighted(w0, s);
                    for src in &srcs[1..] {
                        let Some(v) = probe(space, &src.z, &m)? else {
                            return Ok(true);
                        };
                        agg.apply(&mut score, src.weight * v);
                    }
                    if card_only {
                        cardinality += 1;
                        return Ok(limit == 0 || cardinality < limit);
                    }
                    out.push((m, score));
                    Ok(true)
                })?;
            }
        }
        Op::Union => {
            let mut acc: HashMap<Bytes, f64> = HashMap::new();
            for src in &srcs {
                let Some(z) = &src.z else { continue };
                for_each(space, z, |_, (m, s)| {
                    let score = weighted(src.weight, s);
                    match acc.get_mut(&m) {
                        Some(t) => agg.apply(t, score),
                        None => {
                            acc.insert(m, score);
                        }
                    }
                    Ok(true)
                })?;
            }
            out = acc.into_iter().collect();
        }
        Op::Diff => {
            if let Some(z0) = srcs[0].z.clone() {
                for_each(space, &z0, |space, (m, s)| {
                    for src in &srcs[1..] {
                        if probe(space, &src.z, &m)?.is_some() {
                            return Ok(true);
                        }
                    }
                    out.push((m, s));
                    Ok(true)
                })?;
            }
        }
    }
    if card_only {
        return Ok(Reply::Integer(cardinality as i64));
    }
    // Redis's skiplist order: score (where -0 equals 0), then member bytes.
    out.sort_by(|a, b| {
        a.1.partial_cmp(&b.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.cmp(&b.0))
    });
    match dst {
        Some(dst) => store_entries(space, dst, &out, cx),
        None => Ok(entries_reply(out, with_scores)),
    }
}

/// `ZUNION numkeys key [key ...] [WEIGHTS weight ...] [AGGREGATE SUM|MIN|MAX] [WITHSCORES]`.
pub(super) fn zunion(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, None, 1, Op::Union, false)
}

/// `ZINTER numkeys key [key ...] [WEIGHTS weight ...] [AGGREGATE SUM|MIN|MAX] [WITHSCORES]`.
pub(super) fn zinter(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, None, 1, Op::Inter, false)
}

/// `ZDIFF numkeys key [key ...] [WITHSCORES]`.
pub(super) fn zdiff(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, None, 1, Op::Diff, false)
}

/// `ZUNIONSTORE dst numkeys key [key ...] [WEIGHTS weight ...] [AGGREGATE SUM|MIN|MAX]`.
pub(super) fn zunionstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, Some(&args[1]), 2, Op::Union, false)
}

/// `ZINTERSTORE dst numkeys key [key ...] [WEIGHTS weight ...] [AGGREGATE SUM|MIN|MAX]`.
pub(super) fn zinterstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, Some(&args[1]), 2, Op::Inter, false)
}

/// `ZDIFFSTORE dst numkeys key [key ...]`.
pub(super) fn zdiffstore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, Some(&args[1]), 2, Op::Diff, false)
}

/// `ZINTERCARD numkeys key [key ...] [LIMIT limit]`.
pub(super) fn zintercard(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    generic(args, space, cx, None, 1, Op::Inter, true)
}
