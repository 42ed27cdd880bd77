//! The blocking pops: BLPOP, BRPOP, BLMOVE, BRPOPLPUSH, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP.
//!
//! Each runs its non-blocking form (LMPOP, LMOVE, RPOPLPUSH, ZMPOP) as an ordinary write; when
//! that finds nothing, the connection waits (processing nothing else, as in Redis) until a
//! write to one of its keys wakes it, through this node or another (`node/blocking.rs`), or
//! its timeout passes (a null array, whatever the command: see [`timed_out`]), or the client
//! disconnects (nothing is popped for a client that is
//! gone). Every error a client can receive comes from the non-blocking form, with Redis's
//! texts, or from the timeout's parsing.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_types::{Mutation, Reply};
use tokio::sync::Notify;

use super::{Outcome, error_line, syntax};
use crate::node::blocking::{INTEREST_TTL, POLL_INTERVAL};
use crate::node::pubsub::Item;
use crate::resp::reply::ReplyWriter;
use crate::resp::{Connection, cluster};

/// What a blocking command tries, and how its answer is shaped.
struct Blocked {
    /// The non-blocking command, name first.
    attempt: Vec<Bytes>,
    keys: Vec<Bytes>,
    /// `None`: forever.
    timeout: Option<Duration>,
    shape: Shape,
}

#[derive(Clone, Copy)]
enum Shape {
    /// BLPOP/BRPOP: `[key, element]` from LMPOP's `[key, [element]]`; nil array on timeout.
    KeyElement,
    /// BZPOPMIN/MAX: `[key, member, score]` from ZMPOP's `[key, [[member, score]]]`.
    KeyMemberScore,
    /// BLMPOP/BZMPOP: the non-blocking reply as is; nil array on timeout.
    Same,
    /// BLMOVE/BRPOPLPUSH: the element; nil array on timeout (see [`timed_out`]).
    Element,
}

/// Redis's timeout rule: seconds as a float; negative (or too large to count in
/// milliseconds) is "negative".
fn timeout(arg: &[u8]) -> Result<Option<Duration>, String> {
    let secs = capdb_data::format::parse_double(arg)
        .ok_or("ERR timeout is not a float or out of range")?;
    let ms = secs * 1000.0;
    if !(0.0..9.2e18).contains(&ms) {
        return Err("ERR timeout is negative".into());
    }
    Ok((ms > 0.0).then(|| Duration::from_micros((ms * 1000.0) as u64)))
}

fn upper(b: &Bytes) -> Vec<u8> {
    b.to_ascii_uppercase()
}

fn direction(b: &Bytes) -> Result<(), String> {
    match &upper(b)[..] {
        b"LEFT" | b"RIGHT" => Ok(()),
        _ => Err(syntax()),
    }
}

fn parse(name: &str, args: &[Bytes]) -> Result<Blocked, String> {
    let cmd = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    let last = args.len() - 1;
    Ok(match name {
        "blpop" | "brpop" | "bzpopmin" | "bzpopmax" => {
            let t = timeout(&args[last])?;
            let keys = args[1..last].to_vec();
            let (form, end, shape) = match name {
                "blpop" => ("LMPOP", "LEFT", Shape::KeyElement),
                "brpop" => ("LMPOP", "RIGHT", Shape::KeyElement),
                "bzpopmin" => ("ZMPOP", "MIN", Shape::KeyMemberScore),
                _ => ("ZMPOP", "MAX", Shape::KeyMemberScore),
            };
            let mut attempt = vec![cmd(form), cmd(&keys.len().to_string())];
            attempt.extend(keys.iter().cloned());
            attempt.push(cmd(end));
            Blocked {
                attempt,
                keys,
                timeout: t,
                shape,
            }
        }
        "blmove" => {
            direction(&args[3])?;
            direction(&args[4])?;
            Blocked {
                timeout: timeout(&args[5])?,
                attempt: [&[cmd("LMOVE")][..], &args[1..5]].concat(),
                keys: args[1..3].to_vec(),
                shape: Shape::Element,
            }
        }
        "brpoplpush" => Blocked {
            timeout: timeout(&args[3])?,
            attempt: [&[cmd("RPOPLPUSH")][..], &args[1..3]].concat(),
            keys: args[1..3].to_vec(),
            shape: Shape::Element,
        },
        // BLMPOP/BZMPOP timeout numkeys key [key ...] where [COUNT n]: Redis parses the rest
        // before the timeout.
        _ => {
            if name == "blmpop" {
                capdb_data::list::parse_mpop(args, 2).map_err(|e| error_line(&e))?;
            } else {
                capdb_data::zset::parse_zmpop(args, 2).map_err(|e| error_line(&e))?;
            }
            let t = timeout(&args[1])?;
            let form = if name == "blmpop" { "LMPOP" } else { "ZMPOP" };
            let attempt = [&[cmd(form)][..], &args[2..]].concat();
            let keys = capdb_data::command::command_keys(&attempt).map_err(|e| error_line(&e))?;
            Blocked {
                attempt,
                keys,
                timeout: t,
                shape: Shape::Same,
            }
        }
    })
}

/// Whether a reply means "nothing to pop".
fn empty(r: &Reply) -> bool {
    matches!(r, Reply::Nil | Reply::NilArray)
}

fn shaped(shape: Shape, r: Reply) -> Reply {
    let Reply::Array(mut parts) = r else {
        return r;
    };
    match (shape, parts.len()) {
        (Shape::KeyElement | Shape::KeyMemberScore, 2) => {
            let inner = parts.pop();
            let key = parts.pop();
            let mut out: Vec<Reply> = key.into_iter().collect();
            if let Some(Reply::Array(items)) = inner {
                for item in items.into_iter().take(1) {
                    match item {
                        Reply::Array(pair) => out.extend(pair),
                        other => out.push(other),
                    }
                }
            }
            Reply::Array(out)
        }
        _ => Reply::Array(parts),
    }
}

/// How a blocking pop queued inside MULTI answers: it runs its non-blocking form once, inside
/// the transaction, and never blocks (as in Redis, where the empty case answers the null array,
/// or for BLMOVE/BRPOPLPUSH the nil of LMOVE/RPOPLPUSH).
pub(super) struct InTransaction(Shape);

impl InTransaction {
    pub(super) fn reply(&self, r: Reply) -> Reply {
        match (empty(&r), self.0) {
            (true, Shape::Element) => r,
            (true, _) => Reply::NilArray,
            (false, shape) => shaped(shape, r),
        }
    }
}

/// A blocking pop queued inside MULTI: its non-blocking form (name first), its keys, and how
/// its reply is shaped; or the argument error it answers.
pub(super) fn in_transaction(
    name: &str,
    args: &[Bytes],
) -> Result<(Vec<Bytes>, Vec<Bytes>, InTransaction), String> {
    let b = parse(name, args)?;
    Ok((b.attempt, b.keys, InTransaction(b.shape)))
}

/// Runs a blocking pop.
pub(super) async fn run(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let b = parse(&name, args)?;
    let refs: Vec<&Bytes> = b.keys.iter().collect();
    if !cluster::same_place(conn, &refs) {
        return Err(super::data::CROSSSLOT.into());
    }
    let deadline = b.timeout.map(|t| Instant::now() + t);
    let ks = conn.keyspace.clone();
    let notify = Arc::new(Notify::new());
    conn.node
        .blocking
        .register(ks.spec.name.as_str(), &b.keys, &notify);
    let result = wait_and_pop(conn, &b, deadline, &notify).await;
    conn.node
        .blocking
        .unregister(ks.spec.name.as_str(), &b.keys, &notify);
    match result? {
        Some(reply) => conn.out.reply(&shaped(b.shape, reply)),
        None => timed_out(&mut conn.out),
    }
    Ok(())
}

/// What a blocking pop answers when its timeout passes: the null array (`*-1`, RESP3 `_`) for
/// every one of them, BLMOVE and BRPOPLPUSH included, as Redis 7.0's
/// `replyToBlockedClientTimedOut` answers (its documentation promises BLMOVE a nil bulk string;
/// the server under test writes `*-1`).
fn timed_out(out: &mut ReplyWriter) {
    out.null_array();
}

/// Tries, then waits for a wake-up, a poll, the deadline or the client leaving; `None`: timed
/// out (or the client left: nothing is written to it then).
async fn wait_and_pop(
    conn: &mut Connection,
    b: &Blocked,
    deadline: Option<Instant>,
    notify: &Arc<Notify>,
) -> Result<Option<Reply>, String> {
    let ks = conn.keyspace.clone();
    let mut probe = ClosedProbe::new(conn.socket_fd);
    let mut announced_until = Instant::now();
    let mut look_now = true;
    loop {
        if look_now {
            let notify = conn.node.settings.keyspace_events().active();
            let args = if notify {
                capdb_data::notify::wrap(b.attempt.clone())
            } else {
                b.attempt.clone()
            };
            let m = Mutation::Exec {
                key: b.keys.first().cloned().unwrap_or_default(),
                args,
            };
            let now = capdb_types::unix_now_ms();
            let mut replies = ks
                .apply(vec![m], now, conn.consistency)
                .await
                .map_err(|e| error_line(&e))?;
            let mut reply = replies
                .pop()
                .ok_or("ERR the write answered nothing (a bug)")?
                .map_err(|e| error_line(&e))?;
            if notify {
                let (inner, events) = capdb_data::notify::unwrap(reply);
                reply = inner;
                let name = ks.spec.name.as_str();
                conn.node.pubsub.publish_events(&conn.node, name, events);
            }
            if !empty(&reply) {
                // BLMOVE/BRPOPLPUSH pushed to their destination: clients blocked on it wake.
                wake(conn, &b.keys);
                return Ok(Some(reply));
            }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(None);
        }
        if now >= announced_until {
            // Other nodes' writes to these keys should wake this node.
            let until = capdb_types::unix_now_ms() + INTEREST_TTL.as_millis() as u64;
            conn.node.pubsub.broadcast(
                &conn.node,
                Item::Interest {
                    keyspace: ks.spec.name.as_str().to_string(),
                    keys: b.keys.clone(),
                    until_ms: until,
                },
            );
            announced_until = now + INTEREST_TTL / 2;
        }
        let wait = deadline.map_or(POLL_INTERVAL, |d| (d - now).min(POLL_INTERVAL));
        let mut shutdown = conn.shutdown.clone();
        look_now = tokio::select! {
            _ = notify.notified() => true,
            _ = tokio::time::sleep(wait) => {
                // Polling: read first, write only when there is something to pop.
                let found = ks.get_many(&b.keys, capdb_types::unix_now_ms(), conn.consistency).await;
                found.map(|v| v.iter().any(Option::is_some)).unwrap_or(true)
            }
            _ = probe.closed() => return Ok(None),
            _ = shutdown.changed() => return Err("TRYAGAIN server is shutting down".into()),
        };
    }
}

/// Wakes clients blocked on `keys`, here and on nodes that announced interest.
fn wake(conn: &Connection, keys: &[Bytes]) {
    let (node, name) = (&conn.node, conn.keyspace.spec.name.as_str());
    if !node.blocking.anyone_waiting() {
        return;
    }
    node.blocking.wake_local(name, keys);
    let nodes = node.blocking.interested_nodes(name, keys);
    node.pubsub.send_to(
        node,
        &nodes,
        Item::Wake {
            keyspace: name.to_string(),
            keys: keys.to_vec(),
        },
    );
}

/// Notices a client that disconnects while blocked, through a second handle on its socket.
pub(super) struct ClosedProbe(Option<tokio::net::TcpStream>);

impl ClosedProbe {
    pub(super) fn new(fd: Option<RawFd>) -> ClosedProbe {
        let probe = fd.and_then(|fd| {
            // SAFETY: `fd` is the connection's socket, open for as long as the connection runs,
            // which outlives this blocking command; the clone is a new descriptor we own.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let owned = borrowed.try_clone_to_owned().ok()?;
            tokio::net::TcpStream::from_std(std::net::TcpStream::from(owned)).ok()
        });
        ClosedProbe(probe)
    }

    /// Completes when the client closed its side; never when it cannot tell.
    pub(super) async fn closed(&mut self) {
        let Some(s) = &self.0 else {
            return std::future::pending().await;
        };
        let mut byte = [0u8; 1];
        match s.peek(&mut byte).await {
            Ok(0) => {}
            // More commands pipelined behind the blocking one (they run after it, as in
            // Redis), or an error: stop watching.
            _ => {
                self.0 = None;
                std::future::pending::<()>().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_blocking_pop_times_out_with_a_null_array() {
        // redis-server 7.0.15: `BLMOVE empty dst LEFT RIGHT 0.01` and `BRPOPLPUSH empty dst
        // 0.01` answer `*-1` (RESP2) and `_` (RESP3), as BLPOP does.
        for name in ["blmove", "brpoplpush", "blpop", "bzpopmin", "blmpop"] {
            let args: Vec<Bytes> = match name {
                "blmove" => vec!["blmove", "a", "b", "LEFT", "RIGHT", "0.01"],
                "brpoplpush" => vec!["brpoplpush", "a", "b", "0.01"],
                "blmpop" => vec!["blmpop", "0.01", "1", "a", "LEFT"],
                _ => vec![name, "a", "0.01"],
            }
            .into_iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
            assert!(parse(name, &args).is_ok(), "{name}");
            let mut w = ReplyWriter::new();
            timed_out(&mut w);
            w.resp3 = true;
            timed_out(&mut w);
            assert_eq!(&w.out[..], b"*-1\r\n_\r\n", "{name}");
        }
    }

    fn parse_error(line: &str) -> String {
        let args: Vec<Bytes> = line
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let name = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match parse(&name, &args) {
            Ok(_) => "ok".into(),
            Err(e) => e,
        }
    }

    #[test]
    fn blmpop_and_bzmpop_check_their_arguments_before_the_timeout() {
        // Each text was answered by redis-server 7.0.15. BLPOP, BZPOPMIN and BLMOVE's
        // timeout errors come first; BLMPOP and BZMPOP parse numkeys, the side and COUNT first.
        for (line, want) in [
            ("BZMPOP -1 2 a b UP COUNT", "ERR syntax error"),
            ("BZMPOP -1 0 a MIN", "ERR numkeys should be greater than 0"),
            (
                "BZMPOP abc 1 a MIN COUNT 0",
                "ERR count should be greater than 0",
            ),
            ("BZMPOP -1 1 a MAX COUNT 2", "ERR timeout is negative"),
            ("BLMPOP -1 1 a MIN", "ERR syntax error"),
            (
                "BLMPOP abc 1 a LEFT",
                "ERR timeout is not a float or out of range",
            ),
            ("BLMPOP 0.5 1 a LEFT COUNT 2", "ok"),
            ("BZMPOP 0.5 2 a b min", "ok"),
            ("BLPOP a abc", "ERR timeout is not a float or out of range"),
            ("BZPOPMIN a -1", "ERR timeout is negative"),
        ] {
            assert_eq!(parse_error(line), want, "{line}");
        }
    }
}
