//! Commands on keys whatever their value: DEL, EXPIRE and its variants, PERSIST (writes,
//! queued); EXISTS, TYPE, TTL/PTTL (reads).

use bytes::Bytes;
use capdb_types::Mutation;
use capdb_types::mutation::ExpireWhen;

use super::{Outcome, Queued, WriteCall, check_kv, error_line, expiry_at, read, read_many};
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
    // Redis checks the options before the time.
    let when = expire_options(&args[3..])?;
    let at = expiry_at(&args[2], unit_ms, absolute, name, w.now)?;
    let key = args[1].clone();
    let mutation = match when {
        None => Mutation::Expire {
            key,
            at_ms: Some(at),
        },
        Some(when) => Mutation::ExpireIf {
            key,
            at_ms: at,
            when,
        },
    };
    Ok((Shape::Plain, vec![mutation]))
}

/// The `NX`/`XX`/`GT`/`LT` options of the EXPIRE family (`None`: none given), with Redis's
/// errors for unknown and incompatible ones.
fn expire_options(options: &[Bytes]) -> Result<Option<ExpireWhen>, String> {
    if options.is_empty() {
        return Ok(None);
    }
    let mut when = ExpireWhen {
        nx: false,
        xx: false,
        gt: false,
        lt: false,
    };
    for option in options {
        match &option.to_ascii_lowercase()[..] {
            b"nx" => when.nx = true,
            b"xx" => when.xx = true,
            b"gt" => when.gt = true,
            b"lt" => when.lt = true,
            _ => {
                return Err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(option)
                ));
            }
        }
    }
    if when.nx && (when.xx || when.gt || when.lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if when.gt && when.lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    Ok(Some(when))
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
        Some(v) => conn.out.simple(v.header.kind.type_name()),
        None => conn.out.simple("none"),
    }
    Ok(())
}

/// `RANDOMKEY`: a random key, or nil when the keyspace is empty.
pub(super) async fn randomkey(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    let (ks, now, c) = (conn.keyspace.clone(), conn.now_ms, conn.consistency);
    match ks.random_key(now, c).await.map_err(|e| error_line(&e))? {
        Some(k) => conn.out.bulk(&k),
        None => conn.out.null(),
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
                if in_seconds {
                    ((ms as i128 + 500) / 1000) as i64
                } else {
                    ms
                }
            }
        },
    };
    conn.out.int(n);
    Ok(())
}
