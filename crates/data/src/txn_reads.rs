//! The server's own key reads (GET, MGET, STRLEN, EXISTS, TTL, PTTL, TYPE) as internal
//! commands over a [`Space`], named `capdb.<command>`.
//!
//! Outside a transaction the server answers these from values it fetches (`get_many`), which is
//! cheaper. Inside MULTI/EXEC every keyed command must run in the transaction's one atomic step
//! of the engine (one Raft entry on `cp`, one lock scope on `cache`) and see the writes before
//! it, so the transaction carries them as [`capdb_types::Mutation::Exec`] of these commands.
//! Clients cannot send them (`lookup` does not find internal commands). Replies are exactly the
//! server's for the public command.

use bytes::Bytes;
use capdb_types::{Error, Reply, Result};

use crate::command::Ctx;
use crate::space::Space;

/// `capdb.get key`: the string, nil, or WRONGTYPE.
pub fn get(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    match space.get(&args[1])? {
        Some(v) if v.is_string() => Ok(Reply::Bulk(v.data)),
        Some(_) => Err(Error::WrongType),
        None => Ok(Reply::Nil),
    }
}

/// `capdb.mget key [key ...]`: nil for a missing key or one of another type.
pub fn mget(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let mut out = Vec::with_capacity(args.len() - 1);
    for k in &args[1..] {
        out.push(match space.get(k)? {
            Some(v) if v.is_string() => Reply::Bulk(v.data),
            _ => Reply::Nil,
        });
    }
    Ok(Reply::Array(out))
}

/// `capdb.strlen key`.
pub fn strlen(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    match space.get(&args[1])? {
        Some(v) if !v.is_string() => Err(Error::WrongType),
        v => Ok(Reply::Integer(v.map_or(0, |v| v.data.len()) as i64)),
    }
}

/// `capdb.exists key [key ...]`: a key named twice counts twice.
pub fn exists(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let mut n = 0;
    for k in &args[1..] {
        if space.get(k)?.is_some() {
            n += 1;
        }
    }
    Ok(Reply::Integer(n))
}

/// `capdb.ttl key`: seconds left, rounded; -1 without expiry, -2 for a missing key.
pub fn ttl(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    time_to_live(args, space, cx, true)
}

/// `capdb.pttl key`: as `capdb.ttl`, in milliseconds.
pub fn pttl(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    time_to_live(args, space, cx, false)
}

fn time_to_live(args: &[Bytes], space: &mut dyn Space, cx: &Ctx, seconds: bool) -> Result<Reply> {
    let n = match space.get(&args[1])? {
        None => -2,
        Some(v) => match v.header.expire_at_ms {
            None => -1,
            Some(at) => {
                let ms = at.saturating_sub(cx.now_ms) as i64;
                if seconds {
                    ((ms as i128 + 500) / 1000) as i64
                } else {
                    ms
                }
            }
        },
    };
    Ok(Reply::Integer(n))
}

/// `capdb.type key`: the type's name, `none` for a missing key.
pub fn key_type(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Status(match space.get(&args[1])? {
        Some(v) => v.header.kind.type_name().to_string(),
        None => "none".to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MapSpace;

    fn run(space: &mut MapSpace, line: &str) -> Result<Reply> {
        let args: Vec<Bytes> = line
            .split(' ')
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect();
        let cx = Ctx {
            now_ms: 1_000,
            timestamp: capdb_types::Timestamp::ZERO,
            seed: 0,
            value_bytes_max: 1 << 20,
        };
        crate::command::execute(&args, space, &cx)
    }

    #[test]
    fn internal_reads_answer_as_the_public_commands() {
        let mut s = MapSpace::default();
        run(&mut s, "SETRANGE k 0 hello").unwrap();
        run(&mut s, "RPUSH l a").unwrap();
        assert_eq!(run(&mut s, "capdb.get k"), Ok(Reply::Bulk("hello".into())));
        assert_eq!(run(&mut s, "capdb.get missing"), Ok(Reply::Nil));
        assert_eq!(run(&mut s, "capdb.get l"), Err(Error::WrongType));
        assert_eq!(run(&mut s, "capdb.strlen k"), Ok(Reply::Integer(5)));
        assert_eq!(run(&mut s, "capdb.exists k k l x"), Ok(Reply::Integer(3)));
        assert_eq!(run(&mut s, "capdb.ttl k"), Ok(Reply::Integer(-1)));
        assert_eq!(run(&mut s, "capdb.pttl x"), Ok(Reply::Integer(-2)));
        assert_eq!(
            run(&mut s, "capdb.type l"),
            Ok(Reply::Status("list".into()))
        );
        assert_eq!(
            run(&mut s, "capdb.mget k l x"),
            Ok(Reply::Array(vec![
                Reply::Bulk("hello".into()),
                Reply::Nil,
                Reply::Nil
            ]))
        );
    }

    #[test]
    fn clients_cannot_name_internal_reads() {
        assert!(crate::command::lookup("capdb.get").is_none());
    }
}
