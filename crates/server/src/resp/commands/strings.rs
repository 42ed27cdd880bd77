//! String commands. Writes (SET and its variants, MSET, GETDEL, INCR/DECR, APPEND) only parse
//! their arguments into mutations, which the connection queues; reads (GET, MGET, STRLEN) run at
//! once.

use bytes::Bytes;
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Mutation};

use super::{
    Outcome, Queued, WriteCall, check_kv, error_line, expiry_at, parse_int, read, read_many, syntax,
};
use crate::resp::{Connection, Shape};

/// `SET key value [NX|XX|IFEQ v|IFNE v] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
pub(super) fn set(w: &WriteCall<'_>) -> Result<Queued, String> {
    check_kv(&w.args[1], Some(&w.args[2]), w.value_max)?;
    parse_set(w.args, w.now).map(|m| (Shape::Plain, vec![m]))
}

/// Parses `SET key value [NX|XX|IFEQ v|IFNE v] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]` as
/// Redis 7.0 does: an option may repeat (`NX NX`; `EX 1 EX 2`, the last one wins), conflicting
/// ones are a syntax error, and the expiry is checked only after every option parsed (so a
/// syntax error wins over a bad number, and a bad number is an integer error).
fn parse_set(args: &[Bytes], now_ms: u64) -> Result<Mutation, String> {
    let mut condition = Condition::Always;
    let mut keep_ttl = false;
    let mut expiry: Option<(Vec<u8>, &Bytes)> = None;
    let mut return_old = false;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        let next = args.get(i + 1);
        let plain = matches!(condition, Condition::Always);
        match (&opt[..], next) {
            (b"NX", _) if plain || condition == Condition::IfAbsent => {
                condition = Condition::IfAbsent
            }
            (b"XX", _) if plain || condition == Condition::IfPresent => {
                condition = Condition::IfPresent
            }
            (b"IFEQ", Some(v)) if plain => {
                condition = Condition::IfEqual(v.clone());
                i += 1;
            }
            (b"IFNE", Some(v)) if plain => {
                condition = Condition::IfNotEqual(v.clone());
                i += 1;
            }
            (b"GET", _) => return_old = true,
            (b"KEEPTTL", _) if expiry.is_none() => keep_ttl = true,
            (b"EX" | b"PX" | b"EXAT" | b"PXAT", Some(v))
                if !keep_ttl && expiry.as_ref().is_none_or(|(o, _)| *o == opt) =>
            {
                expiry = Some((opt.clone(), v));
                i += 1;
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    let expiry = match expiry {
        None if keep_ttl => ExpiryUpdate::Keep,
        None => ExpiryUpdate::Clear,
        Some((opt, v)) => {
            let unit = if opt[0] == b'E' { 1000 } else { 1 };
            let absolute = opt.ends_with(b"AT");
            if parse_int(v)? <= 0 {
                return Err("ERR invalid expire time in 'set' command".into());
            }
            ExpiryUpdate::At(expiry_at(v, unit, absolute, "set", now_ms)?)
        }
    };
    Ok(Mutation::Set {
        key: args[1].clone(),
        value: args[2].clone(),
        condition,
        expiry,
        return_old,
    })
}

/// `SETNX key value`: 1 if set, 0 if the key existed.
pub(super) fn setnx(w: &WriteCall<'_>) -> Result<Queued, String> {
    let args = w.args;
    check_kv(&args[1], Some(&args[2]), w.value_max)?;
    Ok((
        Shape::SetFlag,
        vec![Mutation::Set {
            key: args[1].clone(),
            value: args[2].clone(),
            condition: Condition::IfAbsent,
            expiry: ExpiryUpdate::Clear,
            return_old: false,
        }],
    ))
}

/// `SETEX key seconds value`.
pub(super) fn setex(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiring(w, "setex", 1000)
}

/// `PSETEX key milliseconds value`.
pub(super) fn psetex(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiring(w, "psetex", 1)
}

fn set_expiring(w: &WriteCall<'_>, name: &str, unit_ms: i64) -> Result<Queued, String> {
    let args = w.args;
    check_kv(&args[1], Some(&args[3]), w.value_max)?;
    if parse_int(&args[2])? <= 0 {
        return Err(format!("ERR invalid expire time in '{name}' command"));
    }
    let at = expiry_at(&args[2], unit_ms, false, name, w.now)?;
    Ok((
        Shape::Plain,
        vec![Mutation::Set {
            key: args[1].clone(),
            value: args[3].clone(),
            condition: Condition::Always,
            expiry: ExpiryUpdate::At(at),
            return_old: false,
        }],
    ))
}

/// `MSET key value [key value ...]`.
pub(super) fn mset(w: &WriteCall<'_>) -> Result<Queued, String> {
    if w.args.len().is_multiple_of(2) {
        return Err("ERR wrong number of arguments for 'mset' command".into());
    }
    w.args[1..]
        .chunks(2)
        .map(|kv| {
            check_kv(&kv[0], Some(&kv[1]), w.value_max)?;
            Ok(Mutation::Set {
                key: kv[0].clone(),
                value: kv[1].clone(),
                condition: Condition::Always,
                expiry: ExpiryUpdate::Clear,
                return_old: false,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|m| (Shape::AllOk, m))
}

/// `GETDEL key`.
pub(super) fn getdel(w: &WriteCall<'_>) -> Result<Queued, String> {
    check_kv(&w.args[1], None, w.value_max)?;
    Ok((
        Shape::Plain,
        vec![Mutation::GetDel {
            key: w.args[1].clone(),
        }],
    ))
}

pub(super) fn incr(w: &WriteCall<'_>) -> Result<Queued, String> {
    incr_by(w, |_| Ok(1))
}

pub(super) fn decr(w: &WriteCall<'_>) -> Result<Queued, String> {
    incr_by(w, |_| Ok(-1))
}

pub(super) fn incrby(w: &WriteCall<'_>) -> Result<Queued, String> {
    incr_by(w, |args| parse_int(&args[2]))
}

pub(super) fn decrby(w: &WriteCall<'_>) -> Result<Queued, String> {
    incr_by(w, |args| {
        parse_int(&args[2])?
            .checked_neg()
            .ok_or_else(|| "ERR decrement would overflow".to_string())
    })
}

/// INCR, DECR, INCRBY, DECRBY: the key is checked before the delta is parsed.
fn incr_by(
    w: &WriteCall<'_>,
    delta: impl FnOnce(&[Bytes]) -> Result<i64, String>,
) -> Result<Queued, String> {
    check_kv(&w.args[1], None, w.value_max)?;
    let delta = delta(w.args)?;
    Ok((
        Shape::Plain,
        vec![Mutation::IncrBy {
            key: w.args[1].clone(),
            delta,
        }],
    ))
}

/// `APPEND key value`.
pub(super) fn append(w: &WriteCall<'_>) -> Result<Queued, String> {
    check_kv(&w.args[1], Some(&w.args[2]), w.value_max)?;
    Ok((
        Shape::Plain,
        vec![Mutation::Append {
            key: w.args[1].clone(),
            data: w.args[2].clone(),
        }],
    ))
}

/// `GET key` on a local keyspace: the reply is written from the entry under its shard lock.
pub(super) fn get_local(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let out = &mut conn.out;
    conn.keyspace
        .read_with(&args[1], conn.now_ms, |v| match v {
            Some(v) if v.is_string() => {
                out.bulk(&v.data);
                Ok(())
            }
            Some(_) => Err(error_line(&Error::WrongType)),
            None => {
                out.null();
                Ok(())
            }
        })
        .map_err(|e| error_line(&e))?
}

/// `GET key` on a replicated keyspace.
pub(super) async fn get(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    match read(conn, &args[1]).await? {
        Some(v) if v.is_string() => conn.out.bulk(&v.data),
        Some(_) => return Err(error_line(&Error::WrongType)),
        None => conn.out.null(),
    }
    Ok(())
}

/// `MGET key [key ...]`.
pub(super) async fn mget(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let values = read_many(conn, &args[1..]).await?;
    conn.out.array(values.len());
    for v in values {
        // Redis answers nil for a key of another type, not an error.
        match v {
            Some(v) if v.is_string() => conn.out.bulk(&v.data),
            _ => conn.out.null(),
        }
    }
    Ok(())
}

/// `STRLEN key`.
pub(super) async fn strlen(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let n = match read(conn, &args[1]).await? {
        Some(v) if !v.is_string() => return Err(error_line(&Error::WrongType)),
        v => v.map_or(0, |v| v.data.len()),
    };
    conn.out.int(n as i64);
    Ok(())
}
