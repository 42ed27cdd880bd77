//! Commands on keys whatever their value: DEL, EXPIRE and its variants, PERSIST (writes,
//! queued); EXISTS, TYPE, TTL/PTTL (reads).

use bytes::Bytes;
use capdb_types::Mutation;

use super::{Outcome, Queued, WriteCall, check_kv, expiry_at, read, read_many};
use crate::resp::{Connection, Shape};

/// `DEL key [key ...]` (and `UNLINK`): the number of keys deleted.
pub(super) fn del(w: &WriteCall<'_>) -> Result<Queued, String> {
    w.args[1..]
        .iter()
        .map(|k| check_kv(k, None, w.value_max).map(|_| Mutation::Delete { key: k.clone() }))
        .collect::<Result<Vec<_>, String>>()
        .map(|m| (Shape::SumIntegers, m))
}

/// `EXPIRE key seconds`.
pub(super) fn expire(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiry(w, "expire", 1000, false)
}

/// `PEXPIRE key milliseconds`.
pub(super) fn pexpire(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiry(w, "pexpire", 1, false)
}

/// `EXPIREAT key unix-seconds`.
pub(super) fn expireat(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiry(w, "expireat", 1000, true)
}

/// `PEXPIREAT key unix-milliseconds`.
pub(super) fn pexpireat(w: &WriteCall<'_>) -> Result<Queued, String> {
    set_expiry(w, "pexpireat", 1, true)
}

fn set_expiry(
    w: &WriteCall<'_>,
    name: &str,
    unit_ms: i64,
    absolute: bool,
) -> Result<Queued, String> {
    let args = w.args;
    check_kv(&args[1], None, w.value_max)?;
    if args.len() > 3 {
        return Err(format!(
            "ERR unsupported option for '{name}' (NX/XX/GT/LT are not supported yet)"
        ));
    }
    let at = expiry_at(&args[2], unit_ms, absolute, name, w.now)?;
    Ok((
        Shape::Plain,
        vec![Mutation::Expire {
            key: args[1].clone(),
            at_ms: Some(at),
        }],
    ))
}

/// `PERSIST key`.
pub(super) fn persist(w: &WriteCall<'_>) -> Result<Queued, String> {
    check_kv(&w.args[1], None, w.value_max)?;
    Ok((
        Shape::Plain,
        vec![Mutation::Expire {
            key: w.args[1].clone(),
            at_ms: None,
        }],
    ))
}

/// `EXISTS key [key ...]`: how many of the keys exist (a key named twice counts twice).
pub(super) async fn exists(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let values = read_many(conn, &args[1..]).await?;
    conn.out
        .int(values.iter().filter(|v| v.is_some()).count() as i64);
    Ok(())
}

/// `TYPE key`: every value is a string.
pub(super) async fn key_type(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    match read(conn, &args[1]).await? {
        Some(_) => conn.out.simple("string"),
        None => conn.out.simple("none"),
    }
    Ok(())
}

/// `TTL key`: seconds left, rounded; -1 without expiry, -2 when the key does not exist.
pub(super) async fn ttl(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    time_to_live(conn, args, true).await
}

/// `PTTL key`: as TTL, in milliseconds.
pub(super) async fn pttl(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    time_to_live(conn, args, false).await
}

async fn time_to_live(conn: &mut Connection, args: &[Bytes], in_seconds: bool) -> Outcome {
    let n = match read(conn, &args[1]).await? {
        None => -2,
        Some(v) => match v.header.expire_at_ms {
            None => -1,
            Some(at) => {
                let ms = at.saturating_sub(conn.now_ms) as i64;
                if in_seconds { (ms + 500) / 1000 } else { ms }
            }
        },
    };
    conn.out.int(n);
    Ok(())
}
