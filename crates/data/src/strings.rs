//! The string commands beyond SET/GET and friends: GETEX, GETRANGE/SUBSTR, SETRANGE,
//! INCRBYFLOAT, MSETNX, LCS and GETSET, with Redis 7's replies, errors and order of checks.
//!
//! A string is a key's top-level record of kind [`capdb_types::ValueKind::String`]: its bytes
//! are the record's payload and its TTL the record's deadline, so every command here reads or
//! writes one record per key and never touches element records. A write that keeps the TTL
//! (SETRANGE, INCRBYFLOAT) rewrites the record with the same deadline; one that replaces the
//! value as SET does (GETSET, MSETNX) clears it.
//!
//! Relative times are resolved before a command is logged: the server rewrites `GETEX k EX 10`
//! into `GETEX k PXAT <deadline>` with [`absolutize`], so a replica replaying it later sets the
//! same deadline.

use bytes::Bytes;
use capdb_types::limits::check_value;
use capdb_types::{Error, Reply, Result, Value};

use crate::command::{Ctx, Keys, Run, Spec, err, int_arg, not_integer, syntax, wrong_args};
use crate::format::{format_long_double_human, parse_double, parse_int};
use crate::space::Space;

const KEY: Keys = Keys::Range(1, 1, 1);

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "getex",       arity: -2, flags: &["write", "fast"], keys: KEY, run: Run::Write(getex) },
    Spec { name: "getrange",    arity: 4,  flags: &["readonly"], keys: KEY, run: Run::Read(getrange) },
    Spec { name: "getset",      arity: 3,  flags: &["write", "denyoom", "fast"], keys: KEY, run: Run::Write(getset) },
    Spec { name: "incrbyfloat", arity: 3,  flags: &["write", "denyoom", "fast"], keys: KEY, run: Run::Write(incrbyfloat) },
    Spec { name: "lcs",         arity: -3, flags: &["readonly"], keys: Keys::Range(1, 2, 1), run: Run::Read(lcs) },
    Spec { name: "msetnx",      arity: -3, flags: &["write", "denyoom"], keys: Keys::Range(1, -1, 2), run: Run::Write(msetnx) },
    Spec { name: "setrange",    arity: 4,  flags: &["write", "denyoom"], keys: KEY, run: Run::Write(setrange) },
    Spec { name: "substr",      arity: 4,  flags: &["readonly"], keys: KEY, run: Run::Read(getrange) },
];

/// The live string at `key`: `None` when absent, `WrongType` when the key holds a collection.
pub(crate) fn get_string(space: &mut dyn Space, key: &[u8]) -> Result<Option<Value>> {
    match space.get(key)? {
        Some(v) if !v.is_string() => Err(Error::WrongType),
        v => Ok(v),
    }
}

/// Redis's error when a write would make a string longer than `proto-max-bulk-len` (capdb's
/// `value_bytes_max`).
pub(crate) fn too_long() -> Error {
    err("ERR string exceeds maximum allowed size (proto-max-bulk-len)")
}

fn empty_bulk() -> Reply {
    Reply::Bulk(Bytes::new())
}

// ---------------------------------------------------------------------------------------------
// GETEX

/// Which expiry option GETEX was given (the last of a repeated one wins, as in Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
enum GetexOpt {
    None,
    Persist,
    /// The unit option (`EX`, `PX`, `EXAT`, `PXAT`, upper case) and its raw argument.
    Time(&'static str, Bytes),
}

/// GETEX's options, with Redis's syntax rules (`parseExtendedStringArgumentsOrReply`): one
/// kind of expiry only, PERSIST alone, an option word missing its value is a syntax error.
fn parse_getex(args: &[Bytes]) -> Result<GetexOpt> {
    let mut opt = GetexOpt::None;
    let mut j = 2;
    while j < args.len() {
        let word = args[j].to_ascii_uppercase();
        let next = args.get(j + 1);
        let unit: Option<&'static str> = match &word[..] {
            b"EX" => Some("EX"),
            b"PX" => Some("PX"),
            b"EXAT" => Some("EXAT"),
            b"PXAT" => Some("PXAT"),
            _ => None,
        };
        match (unit, &opt) {
            (None, GetexOpt::None | GetexOpt::Persist) if word == b"PERSIST" => {
                opt = GetexOpt::Persist;
            }
            (Some(u), GetexOpt::None) => {
                let Some(v) = next else { return Err(syntax()) };
                opt = GetexOpt::Time(u, v.clone());
                j += 1;
            }
            (Some(u), GetexOpt::Time(prev, _)) if *prev == u => {
                let Some(v) = next else { return Err(syntax()) };
                opt = GetexOpt::Time(u, v.clone());
                j += 1;
            }
            _ => return Err(syntax()),
        }
        j += 1;
    }
    Ok(opt)
}

/// The absolute deadline (Unix ms) of an expiry option, with Redis's checks and errors
/// (`getExpireMillisecondsOrReply`): a non-integer, a non-positive value or an overflow is an
/// error.
fn deadline(cmd: &str, unit: &str, raw: &[u8], now_ms: u64) -> Result<u64> {
    let invalid = || err(format!("ERR invalid expire time in '{cmd}' command"));
    let v = parse_int(raw).ok_or_else(not_integer)?;
    let seconds = unit == "EX" || unit == "EXAT";
    if v <= 0 || (seconds && v > i64::MAX / 1000) {
        return Err(invalid());
    }
    let mut ms = if seconds { v * 1000 } else { v };
    if unit == "EX" || unit == "PX" {
        ms = ms
            .checked_add(i64::try_from(now_ms).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
    }
    Ok(ms as u64)
}

/// Rewrites a command whose arguments hold a time relative to now into one with an absolute
/// time, so that replaying it later gives the same result: `GETEX k EX 10` (or `PX`) becomes
/// `GETEX k PXAT <now + 10 s>`. `None` when there is nothing to rewrite (another command, no
/// relative option, or arguments that are an error anyway, which replay identically).
pub fn absolutize(args: &[Bytes], now_ms: u64) -> Option<Vec<Bytes>> {
    if args.len() < 2 || !args[0].eq_ignore_ascii_case(b"getex") {
        return None;
    }
    let GetexOpt::Time(unit @ ("EX" | "PX"), raw) = parse_getex(args).ok()? else {
        return None;
    };
    let at = deadline("getex", unit, &raw, now_ms).ok()?;
    Some(vec![
        args[0].clone(),
        args[1].clone(),
        Bytes::from_static(b"PXAT"),
        Bytes::from(at.to_string()),
    ])
}

/// `GETEX key [EX seconds | PX ms | EXAT unix-s | PXAT unix-ms | PERSIST]`: the value, after
/// which the TTL is set or removed; a deadline at or before now deletes the key.
fn getex(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let opt = parse_getex(args)?;
    let Some(v) = get_string(space, &args[1])? else {
        return Ok(Reply::Nil);
    };
    let key = &args[1];
    match opt {
        GetexOpt::None => {}
        GetexOpt::Persist => {
            if v.header.expire_at_ms.is_some() {
                space.put(key, Value::new(v.data.clone(), cx.timestamp, None))?;
            }
        }
        GetexOpt::Time(unit, raw) => {
            let at = deadline("getex", unit, &raw, cx.now_ms)?;
            if at <= cx.now_ms {
                space.remove(key)?;
            } else {
                space.put(key, Value::new(v.data.clone(), cx.timestamp, Some(at)))?;
            }
        }
    }
    Ok(Reply::Bulk(v.data))
}

// ---------------------------------------------------------------------------------------------
// Ranges, SETRANGE, INCRBYFLOAT, GETSET, MSETNX

/// `GETRANGE key start end` (and `SUBSTR`, its old name): the bytes between two inclusive
/// offsets, negative ones counting from the end.
fn getrange(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let start = int_arg(args, 2)?;
    let end = int_arg(args, 3)?;
    let Some(v) = get_string(space, &args[1])? else {
        return Ok(empty_bulk());
    };
    let len = v.data.len() as i64;
    if start < 0 && end < 0 && start > end {
        return Ok(empty_bulk());
    }
    let start = if start < 0 { len + start } else { start }.max(0);
    let end = if end < 0 { len + end } else { end }.max(0).min(len - 1);
    if start > end || len == 0 {
        return Ok(empty_bulk());
    }
    Ok(Reply::Bulk(v.data.slice(start as usize..=end as usize)))
}

/// `SETRANGE key offset value`: overwrites from `offset`, padding with zero bytes; the new
/// length. The TTL is kept.
fn setrange(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let offset = int_arg(args, 2)?;
    if offset < 0 {
        return Err(err("ERR offset is out of range"));
    }
    let patch = &args[3];
    let old = get_string(space, &args[1])?;
    let old_len = old.as_ref().map_or(0, |v| v.data.len());
    if patch.is_empty() {
        // Nothing to write: a missing key stays missing.
        return Ok(Reply::Integer(old_len as i64));
    }
    let offset = offset as u64;
    let end = offset
        .checked_add(patch.len() as u64)
        .filter(|&e| e <= cx.value_bytes_max as u64)
        .ok_or_else(too_long)? as usize;
    let offset = offset as usize;
    let mut data = old.as_ref().map_or_else(Vec::new, |v| v.data.to_vec());
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset..end].copy_from_slice(patch);
    let len = data.len();
    let expire = old.and_then(|v| v.header.expire_at_ms);
    space.put(
        &args[1],
        Value::new(Bytes::from(data), cx.timestamp, expire),
    )?;
    Ok(Reply::Integer(len as i64))
}

/// `INCRBYFLOAT key increment`: the new value, printed by [`format_long_double_human`] (see
/// its documentation for where that differs from Redis's `long double`). The TTL is kept.
fn incrbyfloat(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let not_float = || err("ERR value is not a valid float");
    let old = get_string(space, &args[1])?;
    let value = match &old {
        Some(v) => parse_double(&v.data).ok_or_else(not_float)?,
        None => 0.0,
    };
    let incr = parse_double(&args[2]).ok_or_else(not_float)?;
    let new = value + incr;
    if new.is_nan() || new.is_infinite() {
        return Err(err("ERR increment would produce NaN or Infinity"));
    }
    let text = Bytes::from(format_long_double_human(new));
    let expire = old.and_then(|v| v.header.expire_at_ms);
    space.put(&args[1], Value::new(text.clone(), cx.timestamp, expire))?;
    Ok(Reply::Bulk(text))
}

/// `GETSET key value`: sets the value (clearing the TTL, as SET does) and answers the old one.
fn getset(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let old = get_string(space, &args[1])?;
    check_value(&args[2], cx.value_bytes_max)?;
    space.put(&args[1], Value::new(args[2].clone(), cx.timestamp, None))?;
    Ok(old.map_or(Reply::Nil, |v| Reply::Bulk(v.data)))
}

/// `MSETNX key value [key value ...]`: sets every pair (clearing TTLs) when none of the keys
/// exists, whatever its type; 1 when it did, 0 when it set nothing.
fn msetnx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    if args.len().is_multiple_of(2) {
        return Err(wrong_args("msetnx"));
    }
    for pair in args[1..].chunks(2) {
        check_value(&pair[1], cx.value_bytes_max)?;
    }
    for pair in args[1..].chunks(2) {
        if space.get(&pair[0])?.is_some() {
            return Ok(Reply::Integer(0));
        }
    }
    for pair in args[1..].chunks(2) {
        space.put(&pair[0], Value::new(pair[1].clone(), cx.timestamp, None))?;
    }
    Ok(Reply::Integer(1))
}

// ---------------------------------------------------------------------------------------------
// LCS

/// `LCS key1 key2 [LEN] [IDX] [MINMATCHLEN len] [WITHMATCHLEN]`: the longest common
/// subsequence of two strings (missing keys are empty), its length, or its matching ranges.
///
/// As in Redis, a dynamic-programming table of `(len1 + 1) * (len2 + 1)` 32-bit cells is built,
/// and refused when it would exceed `proto-max-bulk-len` bytes; capdb's bound is
/// `value_bytes_max`, so the strings LCS accepts are smaller than with Redis's default 512 MB.
fn lcs(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let a = space.get(&args[1])?;
    let b = space.get(&args[2])?;
    if a.as_ref().is_some_and(|v| !v.is_string()) || b.as_ref().is_some_and(|v| !v.is_string()) {
        return Err(err("ERR The specified keys must contain string values"));
    }
    let a = a.map(|v| v.data).unwrap_or_default();
    let b = b.map(|v| v.data).unwrap_or_default();
    let (mut get_len, mut get_idx, mut with_match_len) = (false, false, false);
    let mut min_match_len: u64 = 0;
    let mut j = 3;
    while j < args.len() {
        let opt = args[j].to_ascii_uppercase();
        match &opt[..] {
            b"IDX" => get_idx = true,
            b"LEN" => get_len = true,
            b"WITHMATCHLEN" => with_match_len = true,
            b"MINMATCHLEN" if j + 1 < args.len() => {
                min_match_len = int_arg(args, j + 1)?.max(0) as u64;
                j += 1;
            }
            _ => return Err(syntax()),
        }
        j += 1;
    }
    if get_idx && get_len {
        return Err(err(
            "ERR If you want both the length and indexes, please just use IDX.",
        ));
    }
    if a.len() as u64 >= u32::MAX as u64 - 1 || b.len() as u64 >= u32::MAX as u64 - 1 {
        return Err(err("ERR String too long for LCS"));
    }
    let (alen, blen) = (a.len(), b.len());
    let cells = (alen as u64 + 1) * (blen as u64 + 1);
    if cells.saturating_mul(4) > cx.value_bytes_max as u64 {
        return Err(err(
            "ERR Insufficient memory, transient memory for LCS exceeds proto-max-bulk-len",
        ));
    }
    let width = blen + 1;
    let mut table = vec![0u32; cells as usize];
    for i in 1..=alen {
        for j in 1..=blen {
            table[i * width + j] = if a[i - 1] == b[j - 1] {
                table[(i - 1) * width + j - 1] + 1
            } else {
                table[(i - 1) * width + j].max(table[i * width + j - 1])
            };
        }
    }
    let total = table[alen * width + blen];
    if get_len {
        return Ok(Reply::Integer(total as i64));
    }
    // Walk back from the end as Redis does, so matches come out in the same order (last
    // first) with the same ranges.
    let mut result = vec![0u8; total as usize];
    let mut idx = total as usize;
    let mut matches = Vec::new();
    let (mut i, mut j) = (alen, blen);
    // `None`: no range open; else (a_start, a_end, b_start, b_end).
    let mut range: Option<(usize, usize, usize, usize)> = None;
    while i > 0 && j > 0 {
        let mut emit = false;
        if a[i - 1] == b[j - 1] {
            result[idx - 1] = a[i - 1];
            match &mut range {
                None => range = Some((i - 1, i - 1, j - 1, j - 1)),
                Some(r) if r.0 == i && r.2 == j => {
                    r.0 -= 1;
                    r.2 -= 1;
                }
                Some(_) => emit = true,
            }
            if range.is_some_and(|r| r.0 == 0 || r.2 == 0) {
                emit = true;
            }
            idx -= 1;
            i -= 1;
            j -= 1;
        } else {
            if table[(i - 1) * width + j] > table[i * width + j - 1] {
                i -= 1;
            } else {
                j -= 1;
            }
            emit = range.is_some();
        }
        if emit && let Some((a0, a1, b0, b1)) = range.take() {
            let len = (a1 - a0 + 1) as u64;
            if get_idx && (min_match_len == 0 || len >= min_match_len) {
                let pair = |x: usize, y: usize| {
                    Reply::Array(vec![Reply::Integer(x as i64), Reply::Integer(y as i64)])
                };
                let mut m = vec![pair(a0, a1), pair(b0, b1)];
                if with_match_len {
                    m.push(Reply::Integer(len as i64));
                }
                matches.push(Reply::Array(m));
            }
        }
    }
    if get_idx {
        return Ok(Reply::Map(vec![
            (
                Reply::Bulk(Bytes::from_static(b"matches")),
                Reply::Array(matches),
            ),
            (
                Reply::Bulk(Bytes::from_static(b"len")),
                Reply::Integer(total as i64),
            ),
        ]));
    }
    Ok(Reply::Bulk(Bytes::from(result)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::MapSpace;
    use capdb_types::Timestamp;

    pub use crate::testing::words::*;

    pub fn bulk(s: &[u8]) -> Reply {
        Reply::Bulk(Bytes::copy_from_slice(s))
    }

    pub fn int(n: i64) -> Reply {
        Reply::Integer(n)
    }

    pub fn ints(ns: &[i64]) -> Reply {
        Reply::Array(ns.iter().map(|n| Reply::Integer(*n)).collect())
    }

    /// The error line of a failed command.
    pub fn error(space: &mut MapSpace, cmd: &str) -> String {
        match run(space, cmd) {
            Err(Error::Command(line)) => line,
            Err(Error::WrongType) => "WRONGTYPE".into(),
            other => panic!("{cmd}: expected an error, got {other:?}"),
        }
    }

    pub fn set(space: &mut MapSpace, key: &str, value: &[u8], expire_at_ms: Option<u64>) {
        space
            .put(
                key.as_bytes(),
                Value::new(Bytes::copy_from_slice(value), Timestamp(1), expire_at_ms),
            )
            .unwrap();
    }

    pub fn get(space: &mut MapSpace, key: &str) -> Option<Value> {
        space.get(key.as_bytes()).unwrap()
    }

    pub fn data(space: &mut MapSpace, key: &str) -> Vec<u8> {
        get(space, key).expect("the key exists").data.to_vec()
    }

    pub fn deadline_of(space: &mut MapSpace, key: &str) -> Option<u64> {
        get(space, key).expect("the key exists").header.expire_at_ms
    }

    /// A space holding the string `s` = "hello", the hash `h` and nothing else.
    pub fn with_string_and_hash() -> MapSpace {
        let mut s = space();
        set(&mut s, "s", b"hello", None);
        run(&mut s, "HSET h f v").unwrap();
        s
    }

    #[test]
    fn table_is_sorted() {
        assert!(crate::command::sorted(COMMANDS));
    }

    #[test]
    fn getex_without_options_reads_like_get() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "GETEX s").unwrap(), bulk(b"hello"));
        assert_eq!(run(&mut s, "GETEX nokey").unwrap(), Reply::Nil);
        assert_eq!(error(&mut s, "GETEX h"), "WRONGTYPE");
    }

    #[test]
    fn getex_ex_and_px_set_a_deadline_from_now() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "GETEX s EX 10").unwrap(), bulk(b"hello"));
        assert_eq!(deadline_of(&mut s, "s"), Some(NOW + 10_000));
        run(&mut s, "GETEX s px 25").unwrap();
        assert_eq!(deadline_of(&mut s, "s"), Some(NOW + 25));
        // A repeated option: the last one wins, as in Redis.
        run(&mut s, "GETEX s EX 10 EX 20").unwrap();
        assert_eq!(deadline_of(&mut s, "s"), Some(NOW + 20_000));
        run(&mut s, "GETEX s EXAT 5000").unwrap();
        assert_eq!(deadline_of(&mut s, "s"), Some(5_000_000));
        assert_eq!(data(&mut s, "s"), b"hello");
    }

    #[test]
    fn getex_persist_removes_the_ttl() {
        let mut s = space();
        set(&mut s, "s", b"v", Some(NOW + 50));
        assert_eq!(run(&mut s, "GETEX s PERSIST").unwrap(), bulk(b"v"));
        assert_eq!(deadline_of(&mut s, "s"), None);
        assert_eq!(run(&mut s, "GETEX s persist PERSIST").unwrap(), bulk(b"v"));
    }

    #[test]
    fn getex_with_a_deadline_already_past_deletes_the_key_and_answers_its_value() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "GETEX s PXAT 1").unwrap(), bulk(b"hello"));
        assert_eq!(get(&mut s, "s"), None);
        set(&mut s, "s", b"hello", None);
        assert_eq!(
            run(&mut s, &format!("GETEX s PXAT {NOW}")).unwrap(),
            bulk(b"hello")
        );
        assert_eq!(get(&mut s, "s"), None, "a deadline equal to now has passed");
    }

    #[test]
    fn getex_checks_syntax_then_the_key_then_the_time_as_redis_does() {
        let mut s = with_string_and_hash();
        for bad in [
            "GETEX s EX",
            "GETEX s EX 10 PX 10",
            "GETEX s PERSIST EX 10",
            "GETEX s EX 10 PERSIST",
            "GETEX s foo",
            "GETEX nokey foo",
        ] {
            assert_eq!(error(&mut s, bad), "ERR syntax error", "{bad}");
        }
        // The time is checked after the key is found (and typed).
        assert_eq!(run(&mut s, "GETEX nokey EX abc").unwrap(), Reply::Nil);
        assert_eq!(error(&mut s, "GETEX h EX abc"), "WRONGTYPE");
        assert_eq!(
            error(&mut s, "GETEX s EX abc"),
            "ERR value is not an integer or out of range"
        );
        for bad in [
            "GETEX s EX 0",
            "GETEX s EX -1",
            "GETEX s PX 9223372036854775807",
            "GETEX s EX 9223372036854775807",
            "GETEX s EX 9223372036854775",
            "GETEX s EXAT 9223372036854776",
            "GETEX s PXAT 0",
        ] {
            assert_eq!(
                error(&mut s, bad),
                "ERR invalid expire time in 'getex' command",
                "{bad}"
            );
        }
        // The largest deadlines Redis accepts.
        run(&mut s, "GETEX s EXAT 9223372036854775").unwrap();
        assert_eq!(deadline_of(&mut s, "s"), Some(9_223_372_036_854_775_000));
        run(&mut s, "GETEX s PXAT 9223372036854775807").unwrap();
        assert_eq!(deadline_of(&mut s, "s"), Some(i64::MAX as u64));
        assert_eq!(
            error(&mut s, "GETEX"),
            "ERR wrong number of arguments for 'getex' command"
        );
    }

    #[test]
    fn absolutize_rewrites_relative_getex_into_pxat() {
        let args = |s: &str| -> Vec<Bytes> {
            s.split_whitespace()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect()
        };
        assert_eq!(
            absolutize(&args("getex k EX 10"), 5_000),
            Some(args("getex k PXAT 15000"))
        );
        assert_eq!(
            absolutize(&args("GETEX k px 7 PX 9"), 5_000),
            Some(args("GETEX k PXAT 5009"))
        );
        for untouched in [
            "GETEX k",
            "GETEX k PERSIST",
            "GETEX k EXAT 10",
            "GETEX k PXAT 10",
            "GETEX k EX abc",
            "GETEX k EX 0",
            "GETEX k EX 10 foo",
            "GETEX k PX 9223372036854775807",
            "SET k v EX 10",
            "GETEX",
        ] {
            assert_eq!(absolutize(&args(untouched), 5_000), None, "{untouched}");
        }
        // A rewritten command replayed later sets the same deadline.
        let mut s = space();
        set(&mut s, "k", b"v", None);
        let rewritten = absolutize(&args("GETEX k EX 10"), NOW - 400).unwrap();
        crate::execute(&rewritten, &mut s, &cx()).unwrap();
        assert_eq!(deadline_of(&mut s, "k"), Some(NOW - 400 + 10_000));
    }

    #[test]
    fn getrange_clamps_offsets_like_redis() {
        let mut s = space();
        set(&mut s, "s", b"This is a string", None);
        for (range, want) in [
            ("0 3", &b"This"[..]),
            ("-3 -1", b"ing"),
            ("0 -1", b"This is a string"),
            ("10 100", b"string"),
            ("-1 -5", b""),
            ("5 3", b""),
            ("-100 2", b"Thi"),
            ("-1 5", b""),
            ("9223372036854775807 -9223372036854775808", b""),
        ] {
            assert_eq!(
                run(&mut s, &format!("GETRANGE s {range}")).unwrap(),
                bulk(want),
                "{range}"
            );
        }
        assert_eq!(run(&mut s, "SUBSTR s 0 3").unwrap(), bulk(b"This"));
        set(&mut s, "e", b"", None);
        assert_eq!(run(&mut s, "GETRANGE e 0 -1").unwrap(), bulk(b""));
        assert_eq!(run(&mut s, "GETRANGE nokey 0 1").unwrap(), bulk(b""));
    }

    #[test]
    fn getrange_checks_integers_before_the_key() {
        let mut s = with_string_and_hash();
        let not_int = "ERR value is not an integer or out of range";
        assert_eq!(error(&mut s, "GETRANGE nokey a 1"), not_int);
        assert_eq!(error(&mut s, "GETRANGE h a 1"), not_int);
        assert_eq!(error(&mut s, "GETRANGE s 0 a"), not_int);
        assert_eq!(error(&mut s, "GETRANGE h 0 1"), "WRONGTYPE");
        assert_eq!(
            error(&mut s, "SUBSTR s 0"),
            "ERR wrong number of arguments for 'substr' command"
        );
    }

    #[test]
    fn setrange_pads_with_zero_bytes() {
        let mut s = space();
        assert_eq!(run(&mut s, "SETRANGE k 3 ab").unwrap(), int(5));
        assert_eq!(data(&mut s, "k"), b"\0\0\0ab");
        set(&mut s, "t", b"hello", None);
        assert_eq!(run(&mut s, "SETRANGE t 1 ZZ").unwrap(), int(5));
        assert_eq!(data(&mut s, "t"), b"hZZlo");
        assert_eq!(run(&mut s, "SETRANGE t 7 !").unwrap(), int(8));
        assert_eq!(data(&mut s, "t"), b"hZZlo\0\0!");
    }

    #[test]
    fn setrange_keeps_the_ttl() {
        let mut s = space();
        set(&mut s, "t", b"hello", Some(NOW + 100));
        run(&mut s, "SETRANGE t 0 J").unwrap();
        assert_eq!(deadline_of(&mut s, "t"), Some(NOW + 100));
    }

    #[test]
    fn setrange_with_an_empty_value_writes_nothing() {
        let mut s = with_string_and_hash();
        let empty = vec![
            Bytes::from_static(b"SETRANGE"),
            Bytes::from_static(b"nokey"),
            Bytes::from_static(b"5"),
            Bytes::new(),
        ];
        assert_eq!(crate::execute(&empty, &mut s, &cx()).unwrap(), int(0));
        assert_eq!(get(&mut s, "nokey"), None, "no key is created");
        let mut on_s = empty.clone();
        on_s[1] = Bytes::from_static(b"s");
        assert_eq!(crate::execute(&on_s, &mut s, &cx()).unwrap(), int(5));
        // Even past the size limit: nothing is written.
        on_s[2] = Bytes::from_static(b"536870912");
        assert_eq!(crate::execute(&on_s, &mut s, &cx()).unwrap(), int(5));
        let mut on_h = empty;
        on_h[1] = Bytes::from_static(b"h");
        assert_eq!(crate::execute(&on_h, &mut s, &cx()), Err(Error::WrongType));
    }

    #[test]
    fn setrange_is_bounded_by_the_value_limit_before_allocating() {
        let mut s = with_string_and_hash();
        let too_long = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";
        let max = cx().value_bytes_max;
        assert_eq!(
            run(&mut s, &format!("SETRANGE s {} x", max - 1)).unwrap(),
            int(max as i64)
        );
        assert_eq!(error(&mut s, &format!("SETRANGE s {max} x")), too_long);
        assert_eq!(error(&mut s, "SETRANGE s 9223372036854775807 x"), too_long);
        assert_eq!(error(&mut s, "SETRANGE nokey 536870912 x"), too_long);
        assert_eq!(
            error(&mut s, "SETRANGE s -1 x"),
            "ERR offset is out of range"
        );
        assert_eq!(
            error(&mut s, "SETRANGE nokey -1 x"),
            "ERR offset is out of range"
        );
        assert_eq!(
            error(&mut s, "SETRANGE h -1 x"),
            "ERR offset is out of range"
        );
        assert_eq!(
            error(&mut s, "SETRANGE s a x"),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(error(&mut s, "SETRANGE h 0 x"), "WRONGTYPE");
    }

    #[test]
    fn incrbyfloat_adds_and_prints_without_trailing_zeros() {
        let mut s = space();
        assert_eq!(run(&mut s, "INCRBYFLOAT f 10.5").unwrap(), bulk(b"10.5"));
        assert_eq!(run(&mut s, "INCRBYFLOAT f 0.1").unwrap(), bulk(b"10.6"));
        assert_eq!(run(&mut s, "INCRBYFLOAT f -5.6").unwrap(), bulk(b"5"));
        assert_eq!(run(&mut s, "INCRBYFLOAT g 5.0e3").unwrap(), bulk(b"5000"));
        assert_eq!(run(&mut s, "INCRBYFLOAT z -0.0").unwrap(), bulk(b"0"));
        assert_eq!(data(&mut s, "f"), b"5");
    }

    #[test]
    fn incrbyfloat_keeps_the_ttl() {
        let mut s = space();
        set(&mut s, "i", b"10", Some(NOW + 100));
        assert_eq!(run(&mut s, "INCRBYFLOAT i 0.5").unwrap(), bulk(b"10.5"));
        assert_eq!(deadline_of(&mut s, "i"), Some(NOW + 100));
    }

    #[test]
    fn incrbyfloat_errors_follow_redis() {
        let mut s = with_string_and_hash();
        set(&mut s, "sp", b" 1", None);
        let not_float = "ERR value is not a valid float";
        assert_eq!(error(&mut s, "INCRBYFLOAT sp 1"), not_float);
        assert_eq!(error(&mut s, "INCRBYFLOAT s 1"), not_float);
        assert_eq!(error(&mut s, "INCRBYFLOAT nokey x"), not_float);
        assert_eq!(error(&mut s, "INCRBYFLOAT nokey nan"), not_float);
        assert_eq!(error(&mut s, "INCRBYFLOAT h x"), "WRONGTYPE");
        assert_eq!(
            error(&mut s, "INCRBYFLOAT nokey inf"),
            "ERR increment would produce NaN or Infinity"
        );
        assert_eq!(get(&mut s, "nokey"), None);
    }

    #[test]
    fn getset_answers_the_old_value_and_clears_the_ttl() {
        let mut s = with_string_and_hash();
        set(&mut s, "t", b"v", Some(NOW + 100));
        assert_eq!(run(&mut s, "GETSET t w").unwrap(), bulk(b"v"));
        assert_eq!(deadline_of(&mut s, "t"), None);
        assert_eq!(data(&mut s, "t"), b"w");
        assert_eq!(run(&mut s, "GETSET new 1").unwrap(), Reply::Nil);
        assert_eq!(data(&mut s, "new"), b"1");
        assert_eq!(error(&mut s, "GETSET h 1"), "WRONGTYPE");
        assert_eq!(
            error(&mut s, "GETSET a b c"),
            "ERR wrong number of arguments for 'getset' command"
        );
    }

    #[test]
    fn msetnx_sets_all_or_nothing() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "MSETNX a 1 a 2").unwrap(), int(1));
        assert_eq!(data(&mut s, "a"), b"2", "the last pair for a key wins");
        assert_eq!(run(&mut s, "MSETNX x 1 a 3").unwrap(), int(0));
        assert_eq!(get(&mut s, "x"), None);
        assert_eq!(
            run(&mut s, "MSETNX h 1 y 2").unwrap(),
            int(0),
            "any type counts"
        );
        assert_eq!(run(&mut s, "MSETNX x 1 y 2").unwrap(), int(1));
        assert_eq!(data(&mut s, "y"), b"2");
        for bad in ["MSETNX a", "MSETNX a 1 b"] {
            assert_eq!(
                error(&mut s, bad),
                "ERR wrong number of arguments for 'msetnx' command"
            );
        }
    }

    #[test]
    fn msetnx_keys_are_every_other_argument() {
        let spec = crate::lookup("msetnx").unwrap();
        let args: Vec<Bytes> = "MSETNX a 1 b 2"
            .split(' ')
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect();
        assert_eq!(spec.key_indices(&args).unwrap(), vec![1, 3]);
        let lcs = crate::lookup("lcs").unwrap();
        assert_eq!(lcs.key_indices(&args[..4]).unwrap(), vec![1, 2]);
    }

    fn lcs_space() -> MapSpace {
        let mut s = with_string_and_hash();
        set(&mut s, "k1", b"ohmytext", None);
        set(&mut s, "k2", b"mynewtext", None);
        s
    }

    fn lcs_match(a: (i64, i64), b: (i64, i64), len: Option<i64>) -> Reply {
        let mut m = vec![ints(&[a.0, a.1]), ints(&[b.0, b.1])];
        m.extend(len.map(Reply::Integer));
        Reply::Array(m)
    }

    fn lcs_idx(matches: Vec<Reply>, len: i64) -> Reply {
        Reply::Map(vec![
            (bulk(b"matches"), Reply::Array(matches)),
            (bulk(b"len"), int(len)),
        ])
    }

    #[test]
    fn lcs_answers_the_subsequence_or_its_length() {
        let mut s = lcs_space();
        assert_eq!(run(&mut s, "LCS k1 k2").unwrap(), bulk(b"mytext"));
        assert_eq!(run(&mut s, "LCS k1 k2 LEN").unwrap(), int(6));
        assert_eq!(
            run(&mut s, "LCS k1 k2 withmatchlen").unwrap(),
            bulk(b"mytext")
        );
        assert_eq!(run(&mut s, "LCS k1 k2 len withmatchlen").unwrap(), int(6));
        assert_eq!(run(&mut s, "LCS k1 nokey").unwrap(), bulk(b""));
        assert_eq!(run(&mut s, "LCS nokey nokey2 LEN").unwrap(), int(0));
    }

    #[test]
    fn lcs_idx_lists_matches_from_the_end_as_redis_does() {
        let mut s = lcs_space();
        assert_eq!(
            run(&mut s, "LCS k1 k2 IDX").unwrap(),
            lcs_idx(
                vec![
                    lcs_match((4, 7), (5, 8), None),
                    lcs_match((2, 3), (0, 1), None)
                ],
                6
            )
        );
        assert_eq!(
            run(&mut s, "LCS k1 k2 IDX MINMATCHLEN 4 WITHMATCHLEN").unwrap(),
            lcs_idx(vec![lcs_match((4, 7), (5, 8), Some(4))], 6)
        );
        assert_eq!(
            run(&mut s, "LCS k1 k2 minmatchlen -5 idx withmatchlen").unwrap(),
            lcs_idx(
                vec![
                    lcs_match((4, 7), (5, 8), Some(4)),
                    lcs_match((2, 3), (0, 1), Some(2))
                ],
                6
            )
        );
        assert_eq!(
            run(&mut s, "LCS k1 nokey IDX").unwrap(),
            lcs_idx(Vec::new(), 0)
        );
    }

    #[test]
    fn lcs_errors_follow_redis() {
        let mut s = lcs_space();
        let not_strings = "ERR The specified keys must contain string values";
        assert_eq!(error(&mut s, "LCS k1 h"), not_strings);
        assert_eq!(error(&mut s, "LCS h k1 foo"), not_strings, "before options");
        assert_eq!(error(&mut s, "LCS k1 k2 foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "LCS k1 k2 MINMATCHLEN"), "ERR syntax error");
        assert_eq!(
            error(&mut s, "LCS k1 k2 MINMATCHLEN x"),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            error(&mut s, "LCS k1 k2 LEN IDX"),
            "ERR If you want both the length and indexes, please just use IDX."
        );
    }

    #[test]
    fn lcs_refuses_a_table_larger_than_the_value_limit() {
        let mut s = space();
        set(&mut s, "a", &[b'a'; 600], None);
        set(&mut s, "b", &[b'b'; 600], None);
        let small = Ctx {
            value_bytes_max: 1 << 20,
            ..cx()
        };
        assert_eq!(
            run_with(
                &mut s,
                "LCS a b LEN",
                &Ctx {
                    value_bytes_max: 601 * 601 * 4,
                    ..small
                }
            )
            .unwrap(),
            int(0)
        );
        assert_eq!(
            run_with(
                &mut s,
                "LCS a b LEN",
                &Ctx {
                    value_bytes_max: 601 * 601 * 4 - 1,
                    ..small
                }
            ),
            Err(err(
                "ERR Insufficient memory, transient memory for LCS exceeds proto-max-bulk-len"
            ))
        );
    }
}
