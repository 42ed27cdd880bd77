//! Key commands over any kind of value: EXPIRETIME, PEXPIRETIME, TOUCH, RENAME, RENAMENX, COPY
//! and OBJECT, with Redis 7's replies and errors.
//!
//! A key is one top-level record (a string, or a collection's meta record whose elements live
//! under the collection's id, see [`crate::meta`]). RENAME moves that record with
//! [`Space::rename`], which carries the elements along without copying them (O(1), as in
//! Redis); COPY gives the copy a new id and copies the elements under it in bounded chunks
//! (O(N), as in Redis). capdb has one database per keyspace, so COPY's `DB` can only be 0.

use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Reply, Result, Value, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, not_integer, syntax, wrong_args};
use crate::format::parse_int;
use crate::meta::CollMeta;
use crate::space::{Coll, ElRange, Space};

const KEY: Keys = Keys::Range(1, 1, 1);
const TWO_KEYS: Keys = Keys::Range(1, 2, 1);

/// Elements COPY moves per `el_range` call.
const COPY_CHUNK: usize = 512;

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "copy",        arity: -3, flags: &["write", "denyoom"], keys: TWO_KEYS, run: Run::Write(copy) },
    Spec { name: "expiretime",  arity: 2,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(expiretime) },
    Spec { name: "object",      arity: -2, flags: &["readonly"], keys: Keys::Range(2, 2, 1), run: Run::Read(object) },
    Spec { name: "pexpiretime", arity: 2,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(pexpiretime) },
    Spec { name: "rename",      arity: 3,  flags: &["write"], keys: TWO_KEYS, run: Run::Write(rename) },
    Spec { name: "renamenx",    arity: 3,  flags: &["write", "fast"], keys: TWO_KEYS, run: Run::Write(renamenx) },
    Spec { name: "touch",       arity: -2, flags: &["readonly", "fast"], keys: Keys::Range(1, -1, 1), run: Run::Read(touch) },
];

/// A key's deadline: -2 when the key is missing, -1 when it has none.
fn deadline_ms(args: &[Bytes], space: &mut dyn Space) -> Result<Option<i64>> {
    Ok(space
        .get(&args[1])?
        .map(|v| v.header.expire_at_ms.map_or(-1, |at| at as i64)))
}

/// `EXPIRETIME key`: the deadline in Unix seconds (rounded to the nearest, as Redis does), -1
/// without one, -2 for a missing key.
fn expiretime(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(match deadline_ms(args, space)? {
        None => -2,
        Some(-1) => -1,
        Some(ms) => (ms + 500) / 1000,
    }))
}

/// `PEXPIRETIME key`: the deadline in Unix milliseconds, -1 without one, -2 for a missing key.
fn pexpiretime(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(deadline_ms(args, space)?.unwrap_or(-2)))
}

/// `TOUCH key [key ...]`: how many of the keys exist (a key named twice counts twice). capdb
/// keeps no access times, so nothing else happens.
fn touch(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let mut n = 0;
    for key in &args[1..] {
        n += space.get(key)?.is_some() as i64;
    }
    Ok(Reply::Integer(n))
}

/// `RENAME key newkey`: moves the value (with its TTL and elements) to `newkey`, replacing
/// whatever that held.
fn rename(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    rename_generic(args, space, cx, false)
}

/// `RENAMENX key newkey`: RENAME when `newkey` does not exist; 1 when it renamed, else 0.
fn renamenx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    rename_generic(args, space, cx, true)
}

fn rename_generic(args: &[Bytes], space: &mut dyn Space, cx: &Ctx, nx: bool) -> Result<Reply> {
    let done = if nx { Reply::Integer(1) } else { Reply::Ok };
    let (from, to) = (&args[1], &args[2]);
    let Some(value) = space.get(from)? else {
        return Err(err("ERR no such key"));
    };
    if from == to {
        return Ok(if nx { Reply::Integer(0) } else { Reply::Ok });
    }
    if nx && space.get(to)?.is_some() {
        return Ok(Reply::Integer(0));
    }
    let restamped = Value::of_kind(
        value.header.kind,
        value.data.clone(),
        cx.timestamp,
        value.header.expire_at_ms,
    );
    if value.is_string() {
        space.put(to, restamped)?;
        space.remove(from)?;
    } else {
        // The elements move with the record; the meta record is rewritten only to stamp it.
        space.rename(from, to)?;
        space.put(to, restamped)?;
    }
    Ok(done)
}

/// COPY's `DB` argument: Redis's integer errors, and only database 0 exists (a Redis started
/// with `databases 1` answers the same).
fn copy_db(raw: &[u8]) -> Result<()> {
    let n = parse_int(raw).ok_or_else(not_integer)?;
    if i32::try_from(n).is_err() {
        return Err(err(
            "ERR value is out of range, value must between -2147483648 and 2147483647",
        ));
    }
    if n != 0 {
        return Err(err("ERR DB index is out of range"));
    }
    Ok(())
}

/// `COPY source destination [DB 0] [REPLACE]`: copies the value (with its TTL; a collection's
/// elements under a new id) unless `destination` exists and REPLACE is not given; 1 when it
/// copied, else 0.
fn copy(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut replace = false;
    let mut j = 3;
    while j < args.len() {
        if args[j].eq_ignore_ascii_case(b"REPLACE") {
            replace = true;
        } else if args[j].eq_ignore_ascii_case(b"DB") && j + 1 < args.len() {
            copy_db(&args[j + 1])?;
            j += 1;
        } else {
            return Err(syntax());
        }
        j += 1;
    }
    let (src, dst) = (&args[1], &args[2]);
    if src == dst {
        return Err(err("ERR source and destination objects are the same"));
    }
    let Some(value) = space.get(src)? else {
        return Ok(Reply::Integer(0));
    };
    if space.get(dst)?.is_some() {
        if !replace {
            return Ok(Reply::Integer(0));
        }
        space.remove(dst)?;
    }
    let expire = value.header.expire_at_ms;
    let data = match CollMeta::of(&value)? {
        None => value.data.clone(),
        Some(meta) => {
            let id = space.new_id()?;
            let from = Coll {
                key: src.clone(),
                id: meta.id,
            };
            let to = Coll {
                key: dst.clone(),
                id,
            };
            copy_elements(space, &from, &to)?;
            CollMeta { id, ..meta }.encode()
        }
    };
    space.put(
        dst,
        Value::of_kind(value.header.kind, data, cx.timestamp, expire),
    )?;
    Ok(Reply::Integer(1))
}

/// Copies every element of `from` into `to`, [`COPY_CHUNK`] at a time.
fn copy_elements(space: &mut dyn Space, from: &Coll, to: &Coll) -> Result<()> {
    let mut after: Option<Bytes> = None;
    loop {
        let chunk = space.el_range(
            from,
            ElRange {
                lo: after.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                hi: Bound::Unbounded,
                rev: false,
                limit: COPY_CHUNK,
            },
        )?;
        for (sub, value) in &chunk {
            space.el_put(to, sub, value)?;
        }
        if chunk.len() < COPY_CHUNK {
            return Ok(());
        }
        after = chunk.last().map(|(sub, _)| sub.clone());
    }
}

/// What `OBJECT ENCODING` answers, as Redis 7.0 names it. A string's encoding is decided from
/// its bytes as Redis decides it on SET (`int` for a 64-bit integer of at most 20 characters,
/// `embstr` up to 44 bytes, else `raw`); Redis also answers `raw` for a short string that
/// APPEND, SETRANGE, SETBIT or BITOP produced, which capdb cannot tell apart.
pub fn encoding(value: &Value) -> Result<&'static str> {
    let big = || CollMeta::of(value).map(|m| m.is_some_and(|m| m.big));
    Ok(match value.header.kind {
        ValueKind::String => {
            let data = &value.data;
            if data.len() <= 20 && parse_int(data).is_some() {
                "int"
            } else if data.len() <= 44 {
                "embstr"
            } else {
                "raw"
            }
        }
        ValueKind::Hash if big()? => "hashtable",
        ValueKind::Hash => "listpack",
        ValueKind::Set if big()? => "hashtable",
        ValueKind::Set => "intset",
        ValueKind::ZSet if big()? => "skiplist",
        ValueKind::ZSet => "listpack",
        ValueKind::List => "quicklist",
    })
}

const OBJECT_HELP: &[&str] = &[
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return the kind of internal representation used in order to store the value",
    "    associated with a <key>.",
    "FREQ <key>",
    "    Return the access frequency index of the <key>. The returned integer is",
    "    proportional to the logarithm of the recent access frequency of the key.",
    "IDLETIME <key>",
    "    Return the idle time of the <key>, that is the approximated number of",
    "    seconds elapsed since the last access to the key.",
    "REFCOUNT <key>",
    "    Return the number of references of the value associated with the specified",
    "    <key>.",
    "HELP",
    "    Prints this help.",
];

/// `OBJECT ENCODING|FREQ|IDLETIME|REFCOUNT key` and `OBJECT HELP`. capdb keeps no access
/// times or counts, so IDLETIME answers 0, REFCOUNT 1, and FREQ Redis's error for a server
/// whose eviction policy is not LFU (Redis's default); a missing key is nil.
fn object(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let sub = args[1].to_ascii_lowercase();
    let sub_name = String::from_utf8_lossy(&sub).into_owned();
    match &sub[..] {
        b"help" => {
            if args.len() != 2 {
                return Err(wrong_args("object|help"));
            }
            Ok(Reply::Array(
                OBJECT_HELP
                    .iter()
                    .map(|l| Reply::Status((*l).to_string()))
                    .collect(),
            ))
        }
        b"encoding" | b"freq" | b"idletime" | b"refcount" => {
            if args.len() != 3 {
                return Err(wrong_args(&format!("object|{sub_name}")));
            }
            let Some(value) = space.get(&args[2])? else {
                return Ok(Reply::Nil);
            };
            match &sub[..] {
                b"encoding" => Ok(Reply::Bulk(Bytes::from_static(
                    encoding(&value)?.as_bytes(),
                ))),
                b"idletime" => Ok(Reply::Integer(0)),
                b"refcount" => Ok(Reply::Integer(1)),
                _ => Err(err(
                    "ERR An LFU maxmemory policy is not selected, access frequency not tracked. Please note that when switching between policies at runtime LRU and LFU data will take some time to adjust.",
                )),
            }
        }
        _ => {
            let raw = String::from_utf8_lossy(&args[1]);
            let shown: String = raw.chars().take(128).collect();
            Err(err(format!(
                "ERR unknown subcommand '{shown}'. Try OBJECT HELP."
            )))
        }
    }
}
