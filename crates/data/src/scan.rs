//! HSCAN, SSCAN and ZSCAN over members stored under `tag ‖ hash ‖ member` (see
//! [`crate::meta::hashed_sub`]).
//!
//! A cursor is a position in hash space, as in Redis: a page returns members whose hash is at
//! or after the cursor, and the next cursor is the hash of the first member not returned (0 when
//! done). So a member present for the whole scan is returned at least once, whatever happens to
//! the collection meanwhile, and a page never splits members that share a hash (which would
//! return them twice or lose one). A collection Redis would still hold in its compact encoding
//! (listpack/intset, `CollMeta::big` unset) answers everything at once with cursor 0, ignoring
//! COUNT, exactly as Redis does.

use std::ops::Bound;

use bytes::Bytes;
use capdb_types::limits::SCAN_COUNT_MAX;
use capdb_types::{Reply, Result};

use crate::command::{err, syntax};
use crate::meta::{Open, hash_of_hashed, member_of_hashed};
use crate::space::{ElRange, Space};

/// A SCAN-family command's MATCH and COUNT.
pub struct ScanOpts {
    pub pattern: Option<Bytes>,
    pub count: usize,
}

/// The cursor argument, read as Redis reads it (C's `strtoul`, whole argument): an optional
/// sign, decimal digits, the empty string as 0, a negative number wrapped (`-1` is 2^64 - 1);
/// `ERR invalid cursor` for anything else or past 64 bits.
pub fn parse_cursor(arg: &[u8]) -> Result<u64> {
    if arg.is_empty() {
        return Ok(0);
    }
    let (negative, digits) = match arg[0] {
        b'-' => (true, &arg[1..]),
        b'+' => (false, &arg[1..]),
        _ => (false, arg),
    };
    std::str::from_utf8(digits)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .map(|v| if negative { v.wrapping_neg() } else { v })
        .ok_or_else(|| err("ERR invalid cursor"))
}

/// `[MATCH pattern] [COUNT n]` from `args[from..]`.
pub fn parse_opts(args: &[Bytes], from: usize) -> Result<ScanOpts> {
    let mut opts = ScanOpts {
        pattern: None,
        count: 10,
    };
    let mut i = from;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        let Some(value) = args.get(i + 1) else {
            return Err(syntax());
        };
        match &opt[..] {
            b"COUNT" => {
                let n = crate::format::parse_int(value).ok_or_else(crate::command::not_integer)?;
                if n < 1 {
                    return Err(syntax());
                }
                opts.count = (n as usize).min(SCAN_COUNT_MAX);
            }
            b"MATCH" => {
                // `*` matches everything: skip the matcher, as Redis does.
                opts.pattern = (&value[..] != b"*").then(|| value.clone());
            }
            _ => return Err(syntax()),
        }
        i += 2;
    }
    Ok(opts)
}

/// One page of members (subkey, value) under `tag` from `cursor`; returns the next cursor.
pub fn page(
    space: &mut dyn Space,
    open: &Open,
    tag: u8,
    cursor: u64,
    count: usize,
) -> Result<(u64, Vec<(Bytes, Bytes)>)> {
    let end = [tag + 1];
    if !open.meta.big {
        let all = space.el_range(&open.coll, ElRange::prefixed(&[tag], &end))?;
        return Ok((0, all));
    }
    let mut from = vec![tag];
    from.extend_from_slice(&cursor.to_be_bytes());
    let mut got = space.el_range(
        &open.coll,
        ElRange {
            lo: Bound::Included(&from),
            hi: Bound::Excluded(&end),
            rev: false,
            limit: count + 1,
        },
    )?;
    if got.len() <= count {
        return Ok((0, got));
    }
    let next = got.pop().expect("count + 1 members");
    let next_hash = hash_of_hashed(&next.0);
    if got
        .last()
        .is_none_or(|(s, _)| hash_of_hashed(s) != next_hash)
    {
        return Ok((next_hash, got));
    }
    // The page would split members sharing a hash: take all of them, continue after.
    let mut hi = vec![tag];
    hi.extend_from_slice(&(next_hash + 1).to_be_bytes());
    let same = space.el_range(
        &open.coll,
        ElRange {
            lo: Bound::Excluded(&next.0),
            hi: Bound::Excluded(&hi),
            rev: false,
            limit: usize::MAX,
        },
    )?;
    got.push(next);
    got.extend(same);
    let rest = space.el_range(
        &open.coll,
        ElRange {
            lo: Bound::Included(&hi),
            hi: Bound::Excluded(&end),
            rev: false,
            limit: 1,
        },
    )?;
    Ok((rest.first().map_or(0, |(s, _)| hash_of_hashed(s)), got))
}

/// The reply `[cursor, [items...]]`, keeping members that MATCH (`item` turns a member and its
/// stored value into the items it contributes).
pub fn reply(
    next: u64,
    page: Vec<(Bytes, Bytes)>,
    pattern: Option<&Bytes>,
    mut item: impl FnMut(Bytes, Bytes, &mut Vec<Reply>) -> Result<()>,
) -> Result<Reply> {
    let mut items = Vec::new();
    for (sub, value) in page {
        let member = member_of_hashed(&sub)?;
        if pattern.is_none_or(|p| crate::glob::matches(p, &member)) {
            item(member, value, &mut items)?;
        }
    }
    Ok(Reply::Array(vec![
        Reply::Bulk(Bytes::from(next.to_string())),
        Reply::Array(items),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_parse_like_strtoul_over_the_whole_argument() {
        // Found by `capdb difftest`: Redis reads cursors with strtoul.
        assert_eq!(parse_cursor(b"").unwrap(), 0);
        assert_eq!(parse_cursor(b"+0").unwrap(), 0);
        assert_eq!(parse_cursor(b"-0").unwrap(), 0);
        assert_eq!(parse_cursor(b"00").unwrap(), 0);
        assert_eq!(parse_cursor(b"-1").unwrap(), u64::MAX);
        assert_eq!(parse_cursor(b"18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            &b"18446744073709551616"[..],
            b" 1",
            b"1 ",
            b"+",
            b"-",
            b"abc",
            b"1x",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
