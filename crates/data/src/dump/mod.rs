//! DUMP and RESTORE in Redis's own payload format, so values move between capdb and Redis
//! (`redis-cli --pipe`, migration tools, `MIGRATE`-style scripts) in either direction.
//!
//! # Why Redis's format, and not capdb's records
//!
//! A payload is only useful if the other side can read it: tools copy keys from Redis into a new
//! store with `DUMP` there and `RESTORE` here, and back. capdb stores a collection as a meta
//! record plus element records (see [`crate::meta`]), which no Redis understands, and whose
//! collection ids mean nothing outside the space that allocated them. So DUMP reads the value
//! through the family's own read commands and writes it in the RDB object format ([`rdb`]), and
//! RESTORE decodes a payload into an [`rdb::Object`] and builds the value with the family's own
//! write commands (RPUSH, SADD, HSET, ZADD). Both sides therefore follow every rule the families
//! keep (element layout, Redis's encoding thresholds for `OBJECT ENCODING`, the cache's and
//! `ap`'s element handling) without knowing any of them: a restored hash of 10 short fields is a
//! `listpack` in capdb exactly as it is in Redis.
//!
//! # Interoperability and limits
//!
//! - capdb writes RDB version 10 (Redis 7.0) with the plainest encodings Redis 7.0 restores;
//!   it reads everything Redis 7.0's DUMP produces (see [`rdb`] for the list and what is
//!   refused). The payload bytes differ from Redis's (Redis writes listpacks, LZF): only the
//!   restored contents are the same.
//! - An HLL is a string in both (see [`crate::hll`]): it travels as its bytes.
//! - A hash's field expiry (HEXPIRE) has no place in RDB version 10: DUMP writes the live fields
//!   without their deadlines.
//! - `IDLETIME` and `FREQ` are checked as Redis checks them and then ignored: capdb keeps no
//!   access times or counters (`OBJECT IDLETIME` answers 0).
//! - Every element (and a string) must fit `value_bytes_max`, like any other write.
//! - What a payload decodes into is bounded (see [`rdb`]'s budget), since a few bytes of a
//!   listpack or of LZF become a whole element: at most [`rdb::ELEMENTS_MAX`] elements (a
//!   hash's field and value, a sorted set's member and score, count two), so the command
//!   RESTORE runs has no more arguments than a client's may
//!   ([`capdb_types::limits::FRAME_ELEMENTS_MAX`]), and at most [`rdb::DECODED_BYTES_MAX`]
//!   (256 MiB) of elements' bytes, [`rdb::ELEMENT_OVERHEAD`] (64) more per element, and LZF
//!   output. Past either, RESTORE answers capdb's own error, which names the limit:
//!   `ERR DUMP payload has more than 1048574 elements, capdb's limit` or
//!   `ERR DUMP payload decodes into more than 256 MiB (elements' bytes plus 64 per element),
//!   capdb's limit`. Decoding stops at the first element past the budget, so the refusal costs
//!   no more memory than the budget.
//! - Errors are Redis 7.0's, in Redis's order: options (`syntax error`, IDLETIME/FREQ ranges),
//!   `BUSYKEY`, the TTL, the payload's footer, then its contents (`Bad data format`), except
//!   that a payload over capdb's limits is refused by the node that received the command
//!   ([`check_limits`]), before BUSYKEY, when its options and TTL are sound.
//!
//! # Replication
//!
//! RESTORE is a write like any other: a [`capdb_types::Mutation::Exec`] of its arguments, run
//! by every replica of a `cp` shard (the payload travels in the log once; each replica decodes
//! it), under the cache's shard locks, or over an `ap` coordinator's view (where, like COPY, it
//! is a read-modify-write that is not atomic against concurrent writers, and the restored
//! collection merges by the `ap` rules). A relative TTL is made absolute by the node that
//! received the command ([`absolutize`]), so replicas replaying it later agree on the deadline.
//!
//! That node also refuses a payload over the budget ([`check_limits`]), so it never enters a
//! `cp` shard's log. Replaying one anyway (a log written before this check, another node's
//! bug) is safe too: the replica's decode is under the same budget, so that entry fails alone
//! with the same error, on every replica alike, and costs at most the budget's memory.

mod crc64;
mod lzf;
pub mod rdb;

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, Value, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, execute, not_integer, syntax};
use crate::format::{format_double, parse_double, parse_int};
use crate::space::Space;
use rdb::{DecodeError, Object};

const KEY: Keys = Keys::Range(1, 1, 1);

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "dump",    arity: 2,  flags: &["readonly"], keys: KEY, run: Run::Read(dump) },
    Spec { name: "restore", arity: -4, flags: &["write", "denyoom"], keys: KEY, run: Run::Write(restore) },
];

/// `DUMP key`: the value as a payload Redis 7.0 restores, or nil for a missing key.
fn dump(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let key = &args[1];
    let Some(value) = space.get(key)? else {
        return Ok(Reply::Nil);
    };
    Ok(match read_object(space, key, &value, cx)? {
        Some(obj) => Reply::Bulk(Bytes::from(rdb::encode(&obj))),
        // A hash whose every field has expired reads as absent.
        None => Reply::Nil,
    })
}

/// The value at `key` as a payload object, read through its family's read command, so DUMP
/// shows exactly what those commands show; `None` for a collection they see as empty.
fn read_object(
    space: &mut dyn Space,
    key: &Bytes,
    value: &Value,
    cx: &Ctx,
) -> Result<Option<Object>> {
    let mut read = |words: &[&'static [u8]]| -> Result<Reply> {
        let mut args = vec![Bytes::from_static(words[0]), key.clone()];
        args.extend(words[1..].iter().map(|w| Bytes::from_static(w)));
        execute(&args, space, cx)
    };
    let obj = match value.header.kind {
        ValueKind::String => return Ok(Some(Object::String(value.data.clone()))),
        ValueKind::List => Object::List(items(read(&[b"lrange", b"0", b"-1"])?)?),
        ValueKind::Set => Object::Set(items(read(&[b"smembers"])?)?),
        ValueKind::Hash => Object::Hash(pairs(read(&[b"hgetall"])?)?),
        ValueKind::ZSet => {
            let mut scored = Vec::new();
            for (member, score) in pairs(read(&[b"zrange", b"0", b"-1", b"withscores"])?)? {
                let score = parse_double(&score).ok_or_else(|| unexpected("a score"))?;
                scored.push((member, score));
            }
            Object::ZSet(scored)
        }
    };
    let empty = match &obj {
        Object::List(v) | Object::Set(v) => v.is_empty(),
        Object::Hash(v) => v.is_empty(),
        Object::ZSet(v) => v.is_empty(),
        Object::String(_) => false,
    };
    Ok((!empty).then_some(obj))
}

fn unexpected(what: &str) -> Error {
    Error::Corruption(format!("DUMP read {what} it cannot serialize"))
}

fn text(reply: Reply) -> Result<Bytes> {
    match reply {
        Reply::Bulk(b) => Ok(b),
        Reply::Double(s) => Ok(Bytes::from(s)),
        _ => Err(unexpected("a reply")),
    }
}

/// The strings of an array or set reply.
fn items(reply: Reply) -> Result<Vec<Bytes>> {
    match reply {
        Reply::Array(v) | Reply::Set(v) => v.into_iter().map(text).collect(),
        _ => Err(unexpected("a reply")),
    }
}

/// The pairs of a map or pairs reply.
fn pairs(reply: Reply) -> Result<Vec<(Bytes, Bytes)>> {
    match reply {
        Reply::Map(v) | Reply::Pairs(v) => v
            .into_iter()
            .map(|(a, b)| Ok((text(a)?, text(b)?)))
            .collect(),
        _ => Err(unexpected("a reply")),
    }
}

/// RESTORE's options after the payload.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    replace: bool,
    absttl: bool,
}

/// Redis's `restoreCommand` option loop: IDLETIME and FREQ exclude each other (the second is a
/// syntax error), and their values are range-checked, then ignored (see the module doc).
fn options(args: &[Bytes]) -> Result<Options> {
    let mut o = Options::default();
    let (mut idle, mut freq) = (false, false);
    let mut j = 4;
    while j < args.len() {
        let a = &args[j];
        let more = j + 1 < args.len();
        if a.eq_ignore_ascii_case(b"replace") {
            o.replace = true;
        } else if a.eq_ignore_ascii_case(b"absttl") {
            o.absttl = true;
        } else if a.eq_ignore_ascii_case(b"idletime") && more && !freq {
            let n = parse_int(&args[j + 1]).ok_or_else(not_integer)?;
            if n < 0 {
                return Err(err("ERR Invalid IDLETIME value, must be >= 0"));
            }
            idle = true;
            j += 1;
        } else if a.eq_ignore_ascii_case(b"freq") && more && !idle {
            let n = parse_int(&args[j + 1]).ok_or_else(not_integer)?;
            if !(0..=255).contains(&n) {
                return Err(err("ERR Invalid FREQ value, must be >= 0 and <= 255"));
            }
            freq = true;
            j += 1;
        } else {
            return Err(syntax());
        }
        j += 1;
    }
    Ok(o)
}

fn decode_error(e: DecodeError) -> Error {
    err(match e {
        DecodeError::VersionOrChecksum => "ERR DUMP payload version or checksum are wrong".into(),
        DecodeError::BadData => "ERR Bad data format".into(),
        DecodeError::TooLarge => format!(
            "ERR DUMP payload decodes into more than {} MiB (elements' bytes plus {} per \
             element), capdb's limit",
            rdb::DECODED_BYTES_MAX >> 20,
            rdb::ELEMENT_OVERHEAD
        ),
        DecodeError::TooManyElements => format!(
            "ERR DUMP payload has more than {} elements, capdb's limit",
            rdb::ELEMENTS_MAX
        ),
    })
}

/// For the node that receives a command, before it is queued or replicated: capdb's limit
/// error for a RESTORE whose payload decodes past the budget (see the module doc), so that
/// such a payload never enters a log. Everything else is `Ok` and left to the command, which
/// answers it in Redis's order when it runs (a bad option, BUSYKEY, a bad TTL or footer, `Bad
/// data format`). A payload too short to reach the budget whatever it holds
/// ([`rdb::WITHIN_LIMITS_LEN_MAX`]) is not decoded here; a longer one is decoded once more,
/// under the budget.
pub fn check_limits(args: &[Bytes]) -> Result<()> {
    if args.len() < 4
        || !args[0].eq_ignore_ascii_case(b"restore")
        || args[3].len() <= rdb::WITHIN_LIMITS_LEN_MAX
        || options(args).is_err()
        || parse_int(&args[2]).is_none_or(|t| t < 0)
    {
        return Ok(());
    }
    match rdb::decode(&args[3]) {
        Err(e @ (DecodeError::TooLarge | DecodeError::TooManyElements)) => Err(decode_error(e)),
        _ => Ok(()),
    }
}

/// `RESTORE key ttl payload [REPLACE] [ABSTTL] [IDLETIME seconds] [FREQ frequency]`: creates
/// `key` from a DUMP payload (capdb's or Redis's), with a deadline `ttl` ms from now (Unix ms
/// with ABSTTL; 0: none). A deadline already past restores nothing (and REPLACE still deletes
/// the old value), as in Redis.
fn restore(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let o = options(args)?;
    let key = &args[1];
    let exists = space.get(key)?.is_some();
    if exists && !o.replace {
        return Err(err("BUSYKEY Target key name already exists."));
    }
    let ttl = parse_int(&args[2]).ok_or_else(not_integer)?;
    if ttl < 0 {
        return Err(err("ERR Invalid TTL value, must be >= 0"));
    }
    let obj = rdb::decode(&args[3]).map_err(decode_error)?;
    check_sizes(&obj, cx.value_bytes_max)?;
    if exists {
        space.remove(key)?;
    }
    let deadline = match ttl {
        0 => None,
        // Redis adds without checking; an overflow there wraps into the past.
        t if o.absttl => Some(t),
        t => Some((cx.now_ms as i64).checked_add(t).unwrap_or(i64::MIN)),
    };
    if deadline.is_some_and(|at| at <= cx.now_ms as i64) {
        return Ok(Reply::Ok);
    }
    create(space, key, obj, deadline.map(|at| at as u64), cx)?;
    Ok(Reply::Ok)
}

/// Every string of `obj` within the value limit, as any write's values must be.
fn check_sizes(obj: &Object, value_bytes_max: usize) -> Result<()> {
    let fits = |b: &Bytes| b.len() <= value_bytes_max;
    let ok = match obj {
        Object::String(s) => fits(s),
        Object::List(v) | Object::Set(v) => v.iter().all(fits),
        Object::Hash(v) => v.iter().all(|(f, x)| fits(f) && fits(x)),
        Object::ZSet(v) => v.iter().all(|(m, _)| fits(m)),
    };
    if ok {
        Ok(())
    } else {
        Err(crate::strings::too_long())
    }
}

/// Stores `obj` at `key` (absent now): a string as its record, a collection through its
/// family's write command, then the deadline.
fn create(
    space: &mut dyn Space,
    key: &Bytes,
    obj: Object,
    expire_at_ms: Option<u64>,
    cx: &Ctx,
) -> Result<()> {
    let command = |name: &'static [u8], n: usize| {
        let mut args = Vec::with_capacity(n + 2);
        args.push(Bytes::from_static(name));
        args.push(key.clone());
        args
    };
    let args = match obj {
        Object::String(s) => return space.put(key, Value::new(s, cx.timestamp, expire_at_ms)),
        Object::List(items) => {
            let mut args = command(b"rpush", items.len());
            args.extend(items);
            args
        }
        Object::Set(members) => {
            let mut args = command(b"sadd", members.len());
            args.extend(members);
            args
        }
        Object::Hash(pairs) => {
            let mut args = command(b"hset", 2 * pairs.len());
            for (f, v) in pairs {
                args.push(f);
                args.push(v);
            }
            args
        }
        Object::ZSet(pairs) => {
            let mut args = command(b"zadd", 2 * pairs.len());
            for (m, score) in pairs {
                // `%.17g` reads back as the same double.
                args.push(Bytes::from(format_double(score)));
                args.push(m);
            }
            args
        }
    };
    execute(&args, space, cx)?;
    if let Some(at) = expire_at_ms {
        let value = space
            .get(key)?
            .ok_or_else(|| Error::Corruption("RESTORE stored nothing".into()))?;
        space.put(
            key,
            Value::of_kind(value.header.kind, value.data, cx.timestamp, Some(at)),
        )?;
    }
    Ok(())
}

/// Rewrites `RESTORE key ttl payload ...` with a relative `ttl` into `RESTORE key <now + ttl>
/// payload ABSTTL ...`, so that replaying it later gives the same deadline. `None` when there
/// is nothing to rewrite: another command, no TTL, ABSTTL already, or a TTL that is an error
/// anyway (which replays identically). ABSTTL goes right after the payload, where no option
/// can take it as its value.
pub fn absolutize(args: &[Bytes], now_ms: u64) -> Option<Vec<Bytes>> {
    if args.len() < 4 || !args[0].eq_ignore_ascii_case(b"restore") {
        return None;
    }
    if args[4..].iter().any(|a| a.eq_ignore_ascii_case(b"absttl")) {
        return None;
    }
    let ttl = parse_int(&args[2]).filter(|&t| t > 0)?;
    let at = i64::try_from(now_ms).ok()?.checked_add(ttl)?;
    let mut out = Vec::with_capacity(args.len() + 1);
    out.extend_from_slice(&args[..2]);
    out.push(Bytes::from(at.to_string()));
    out.push(args[3].clone());
    out.push(Bytes::from_static(b"ABSTTL"));
    out.extend_from_slice(&args[4..]);
    Some(out)
}

#[cfg(test)]
mod tests;
