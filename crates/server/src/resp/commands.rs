//! The commands: argument parsing, dispatch and reply shapes.
//!
//! Writes (SET, DEL, INCR, ...) become [`Mutation`]s and are *queued* on the connection; the
//! queue is applied in one `Keyspace::apply` when the pipeline ends or a command that is not a write
//! to the same keyspace arrives, so replies stay in order while a pipeline of N writes costs one
//! group commit. Everything else runs at once.
//!
//! Error replies follow Redis wording where clients or tools depend on it (arity, syntax,
//! integer, unknown command, NOAUTH, WRONGPASS).

use std::time::Instant;

use bytes::Bytes;
use capdb_types::limits::{check_key, check_value};
use capdb_types::mutation::{Condition, ExpiryUpdate, parse_i64_strict};
use capdb_types::{Error, Mutation, Reply};

use super::{Connection, PendingWrites, glob};
use capdb_types::ReadMode;

/// Every command name the server knows, lowercase (aliases resolve to their canonical name).
pub const COMMAND_NAMES: &[&str] = &[
    "append",
    "auth",
    "client",
    "cluster",
    "command",
    "config",
    "consistency",
    "dbsize",
    "decr",
    "decrby",
    "del",
    "echo",
    "exists",
    "expire",
    "expireat",
    "flushall",
    "flushdb",
    "get",
    "getdel",
    "hello",
    "incr",
    "incrby",
    "info",
    "keys",
    "mget",
    "mset",
    "persist",
    "pexpire",
    "pexpireat",
    "ping",
    "psetex",
    "pttl",
    "quit",
    "readonly",
    "readwrite",
    "scan",
    "select",
    "set",
    "setex",
    "setnx",
    "strlen",
    "time",
    "ttl",
    "type",
];

/// `(name, arity, flags, first key, last key, key step)`, as `COMMAND` reports them. A negative
/// arity means "at least |arity| arguments", counting the command name.
/// `(name, arity, flags, first key, last key, key step)`.
type CommandInfo = (&'static str, i64, &'static [&'static str], i64, i64, i64);

const COMMAND_TABLE: &[CommandInfo] = &[
    ("append", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    (
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "client",
        -2,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    ("cluster", -2, &["admin", "stale"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    (
        "config",
        -2,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    ("consistency", -1, &["fast", "loading", "stale"], 0, 0, 0),
    ("dbsize", 1, &["readonly", "fast"], 0, 0, 0),
    ("decr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("del", -2, &["write"], 1, -1, 1),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("expire", -3, &["write", "fast"], 1, 1, 1),
    ("expireat", -3, &["write", "fast"], 1, 1, 1),
    ("flushall", -1, &["write"], 0, 0, 0),
    ("flushdb", -1, &["write"], 0, 0, 0),
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("getdel", 2, &["write", "fast"], 1, 1, 1),
    (
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    ("incr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("incrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("keys", 2, &["readonly"], 0, 0, 0),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("mset", -3, &["write", "denyoom"], 1, -1, 2),
    ("persist", 2, &["write", "fast"], 1, 1, 1),
    ("pexpire", -3, &["write", "fast"], 1, 1, 1),
    ("pexpireat", -3, &["write", "fast"], 1, 1, 1),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("psetex", 4, &["write", "denyoom"], 1, 1, 1),
    ("pttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("quit", -1, &["fast", "no_auth"], 0, 0, 0),
    ("readonly", 1, &["fast", "loading", "stale"], 0, 0, 0),
    ("readwrite", 1, &["fast", "loading", "stale"], 0, 0, 0),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("select", 2, &["loading", "stale", "fast"], 0, 0, 0),
    ("set", -3, &["write", "denyoom"], 1, 1, 1),
    ("setex", 4, &["write", "denyoom"], 1, 1, 1),
    ("setnx", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("time", 1, &["loading", "stale", "fast"], 0, 0, 0),
    ("ttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("type", 2, &["readonly", "fast"], 1, 1, 1),
];

const _: () = assert!(COMMAND_NAMES.len() == COMMAND_TABLE.len());

#[test]
fn command_table_is_sorted_and_matches_the_names() {
    assert!(COMMAND_TABLE.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(
        COMMAND_TABLE
            .iter()
            .zip(COMMAND_NAMES)
            .all(|(c, n)| c.0 == *n)
    );
}

/// Resolves aliases to the canonical command name (`unlink` is `del`).
pub fn canonical_name(name: &str) -> &str {
    match name {
        "unlink" => "del",
        other => other,
    }
}

/// The table entry of a command (the table is sorted by name).
fn lookup(name: &str) -> Option<&'static CommandInfo> {
    COMMAND_TABLE
        .binary_search_by_key(&name, |c| c.0)
        .ok()
        .map(|i| &COMMAND_TABLE[i])
}

fn arity_ok(info: &CommandInfo, argc: usize) -> bool {
    let arity = info.1;
    if arity >= 0 {
        argc == arity as usize
    } else {
        argc >= arity.unsigned_abs() as usize
    }
}

/// How the replies of a queued command's mutations become its RESP reply.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One mutation; its reply as is.
    Plain,
    /// DEL k1..kn: the sum of the integer replies.
    SumIntegers,
    /// MSET: OK once all applied.
    AllOk,
    /// SETNX: 1 if set, 0 if not.
    SetFlag,
}

pub(super) struct PendingCommand {
    name: &'static str,
    shape: Shape,
    count: usize,
    started: Instant,
}

/// The RESP error line for an error.
pub fn error_line(e: &Error) -> String {
    match e {
        Error::NotAnInteger => "ERR value is not an integer or out of range".into(),
        Error::Overflow => "ERR increment or decrement would overflow".into(),
        Error::OutOfMemory(_) => format!("OOM {e}"),
        Error::Unavailable(_) | Error::ShuttingDown => format!("TRYAGAIN {e}"),
        Error::Corruption(_) => format!("CORRUPT {e}"),
        Error::OutcomeUnknown(_) => format!("UNCERTAIN {e}"),
        _ => format!("ERR {e}"),
    }
}

impl Connection {
    /// Records a finished command; its latency is observed when its reply is written.
    fn done(&mut self, name: &'static str, _started: Instant, failed: bool) {
        self.finished.push((name, failed));
    }

    fn fail(&mut self, name: &'static str, started: Instant, line: &str) {
        self.out.error(line);
        self.done(name, started, true);
    }

    fn write_reply(&mut self, r: &Reply) {
        match r {
            Reply::Ok => self.out.ok(),
            Reply::Nil => self.out.null(),
            Reply::Integer(n) => self.out.int(*n),
            Reply::Bulk(b) => self.out.bulk(b),
        }
    }

    /// Queues a write command's mutations behind earlier queued writes to the same keyspace.
    async fn queue(
        &mut self,
        name: &'static str,
        shape: Shape,
        mutations: Vec<Mutation>,
        started: Instant,
    ) {
        if let Err(e) = self.keyspace.check_live() {
            self.flush_pending().await;
            return self.fail(name, started, &error_line(&e));
        }
        let same = self
            .pending
            .as_ref()
            .is_some_and(|p| std::sync::Arc::ptr_eq(&p.keyspace, &self.keyspace));
        if !same {
            self.flush_pending().await;
        }
        let p = self.pending.get_or_insert_with(|| PendingWrites {
            keyspace: self.keyspace.clone(),
            mutations: Vec::new(),
            commands: Vec::new(),
        });
        p.commands.push(PendingCommand {
            name,
            shape,
            count: mutations.len(),
            started,
        });
        p.mutations.extend(mutations);
    }
}

/// Writes the replies of a flushed batch, in order.
pub(super) fn reply_pending(
    conn: &mut Connection,
    commands: Vec<PendingCommand>,
    result: capdb_types::Result<Vec<capdb_types::Result<Reply>>>,
) {
    let replies = match result {
        Ok(r) => r,
        Err(e) => {
            let line = error_line(&e);
            for c in commands {
                conn.fail(c.name, c.started, &line);
            }
            return;
        }
    };
    let mut it = replies.into_iter();
    for c in commands {
        let mine: Vec<_> = it.by_ref().take(c.count).collect();
        debug_assert_eq!(mine.len(), c.count);
        if let Some(Err(e)) = mine.iter().find(|r| r.is_err()) {
            // A command over several shards whose part on one shard certainly failed while
            // another part may have taken effect must not say -TRYAGAIN (clients retry it).
            let partial = e.is_retryable()
                && mine
                    .iter()
                    .any(|r| !matches!(r, Err(other) if other.is_retryable()));
            let line = if partial {
                error_line(&Error::OutcomeUnknown(format!(
                    "part of the command may have taken effect, part did not ({e}); read before retrying"
                )))
            } else {
                error_line(e)
            };
            conn.fail(c.name, c.started, &line);
            continue;
        }
        let ok = mine.into_iter().map(|r| r.expect("errors handled above"));
        match c.shape {
            Shape::Plain => {
                for r in ok {
                    conn.write_reply(&r);
                }
            }
            Shape::SumIntegers => {
                let n = ok
                    .map(|r| if let Reply::Integer(n) = r { n } else { 0 })
                    .sum();
                conn.out.int(n);
            }
            Shape::AllOk => conn.out.ok(),
            Shape::SetFlag => {
                let set = ok.into_iter().any(|r| r == Reply::Ok);
                conn.out.int(set as i64);
            }
        }
        conn.done(c.name, c.started, false);
    }
}

fn syntax() -> String {
    "ERR syntax error".into()
}

fn parse_int(arg: &[u8]) -> Result<i64, String> {
    parse_i64_strict(arg).ok_or_else(|| "ERR value is not an integer or out of range".into())
}

/// Converts a relative or absolute expiry argument to absolute Unix milliseconds.
fn expiry_at(
    arg: &[u8],
    unit_ms: i64,
    absolute: bool,
    cmd: &str,
    now_ms: u64,
) -> Result<u64, String> {
    let invalid = || format!("ERR invalid expire time in '{cmd}' command");
    let n = parse_int(arg)?;
    let ms = n.checked_mul(unit_ms).ok_or_else(invalid)?;
    let at = if absolute {
        Some(ms)
    } else {
        (now_ms as i64).checked_add(ms)
    };
    let at = at.ok_or_else(invalid)?;
    Ok(at.max(0) as u64)
}

fn check_kv(key: &[u8], value: Option<&[u8]>, value_max: usize) -> Result<(), String> {
    check_key(key).map_err(|e| error_line(&e))?;
    if let Some(v) = value {
        check_value(v, value_max).map_err(|e| error_line(&e))?;
    }
    Ok(())
}

/// `CONSISTENCY [READ|WRITE] [ONE|QUORUM|ALL]`: the levels of `ap` reads and writes on this
/// connection (default ONE for both; QUORUM for both reads your writes). Without a level it reports them; without READ or
/// WRITE it sets both.
fn consistency(conn: &mut Connection, args: &[Bytes]) -> Result<(), String> {
    use capdb_ap::Level;
    let upper: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
        .collect();
    let parse = |s: &str| -> Result<Level, String> {
        s.parse::<Level>()
            .map_err(|_| format!("ERR consistency level '{s}': expected ONE, QUORUM or ALL"))
    };
    let c = &mut conn.consistency;
    match upper.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => {}
        ["READ", l] => c.ap_read = parse(l)?,
        ["WRITE", l] => c.ap_write = parse(l)?,
        [l] if l != "READ" && l != "WRITE" => {
            let level = parse(l)?;
            c.ap_read = level;
            c.ap_write = level;
        }
        _ => return Err("ERR syntax error: CONSISTENCY [READ|WRITE] [ONE|QUORUM|ALL]".into()),
    }
    if args.len() == 1 {
        let (r, w) = (c.ap_read.as_str(), c.ap_write.as_str());
        conn.out.array(4);
        conn.out.bulk(b"read");
        conn.out.bulk(r.as_bytes());
        conn.out.bulk(b"write");
        conn.out.bulk(w.as_bytes());
    } else {
        conn.out.ok();
    }
    Ok(())
}

/// Parses `SET key value [NX|XX|IFEQ v|IFNE v] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn parse_set(args: &[Bytes], now_ms: u64) -> Result<Mutation, String> {
    let mut condition = Condition::Always;
    let mut expiry = ExpiryUpdate::Clear;
    let mut return_old = false;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        let next = args.get(i + 1);
        match (&opt[..], next) {
            (b"NX", _) if condition == Condition::Always => condition = Condition::IfAbsent,
            (b"XX", _) if condition == Condition::Always => condition = Condition::IfPresent,
            (b"IFEQ", Some(v)) if condition == Condition::Always => {
                condition = Condition::IfEqual(v.clone());
                i += 1;
            }
            (b"IFNE", Some(v)) if condition == Condition::Always => {
                condition = Condition::IfNotEqual(v.clone());
                i += 1;
            }
            (b"GET", _) => return_old = true,
            (b"KEEPTTL", _) if expiry == ExpiryUpdate::Clear => expiry = ExpiryUpdate::Keep,
            (b"EX" | b"PX" | b"EXAT" | b"PXAT", Some(v)) if expiry == ExpiryUpdate::Clear => {
                let unit = if opt[0] == b'E' { 1000 } else { 1 };
                let absolute = opt.ends_with(b"AT");
                if parse_int(v).map_err(|_| syntax())? <= 0 {
                    return Err("ERR invalid expire time in 'set' command".into());
                }
                expiry = ExpiryUpdate::At(expiry_at(v, unit, absolute, "set", now_ms)?);
                i += 1;
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    Ok(Mutation::Set {
        key: args[1].clone(),
        value: args[2].clone(),
        condition,
        expiry,
        return_old,
    })
}

pub(super) async fn execute(conn: &mut Connection, name: &str, args: &[Bytes], started: Instant) {
    let Some(info) = lookup(name) else {
        conn.flush_pending().await;
        let mut line = format!(
            "ERR unknown command '{}', with args beginning with: ",
            String::from_utf8_lossy(&args[0])
                .chars()
                .take(128)
                .collect::<String>()
        );
        for a in args.iter().skip(1).take(8) {
            line.push_str(&format!(
                "'{}' ",
                String::from_utf8_lossy(a)
                    .chars()
                    .take(64)
                    .collect::<String>()
            ));
        }
        return conn.fail("unknown", started, &line);
    };
    let sname = info.0;
    if !arity_ok(info, args.len()) {
        conn.flush_pending().await;
        return conn.fail(
            sname,
            started,
            &format!("ERR wrong number of arguments for '{name}' command"),
        );
    }
    if !conn.authenticated && !matches!(name, "auth" | "hello" | "quit") {
        conn.flush_pending().await;
        return conn.fail(sname, started, "NOAUTH Authentication required.");
    }
    if info.3 >= 1
        && let Some(key) = args.get(info.3 as usize)
        && let Some(line) = super::cluster::moved(conn, key, info.2.contains(&"readonly"))
    {
        conn.flush_pending().await;
        return conn.fail(sname, started, &line);
    }
    let now = conn.now_ms;
    let value_max = conn.node.config.limits.value_bytes_max;

    // Writes: queued for one group commit per pipeline.
    let write: Option<Result<(Shape, Vec<Mutation>), String>> = match name {
        "set" => Some(
            check_kv(&args[1], Some(&args[2]), value_max)
                .and_then(|_| parse_set(args, now))
                .map(|m| (Shape::Plain, vec![m])),
        ),
        "setnx" => Some(check_kv(&args[1], Some(&args[2]), value_max).map(|_| {
            (
                Shape::SetFlag,
                vec![Mutation::Set {
                    key: args[1].clone(),
                    value: args[2].clone(),
                    condition: Condition::IfAbsent,
                    expiry: ExpiryUpdate::Clear,
                    return_old: false,
                }],
            )
        })),
        "setex" | "psetex" => Some(check_kv(&args[1], Some(&args[3]), value_max).and_then(|_| {
            let unit = if name == "setex" { 1000 } else { 1 };
            if parse_int(&args[2])? <= 0 {
                return Err(format!("ERR invalid expire time in '{name}' command"));
            }
            let at = expiry_at(&args[2], unit, false, name, now)?;
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
        })),
        "mset" => Some(if args.len().is_multiple_of(2) {
            Err("ERR wrong number of arguments for 'mset' command".into())
        } else {
            args[1..]
                .chunks(2)
                .map(|kv| {
                    check_kv(&kv[0], Some(&kv[1]), value_max)?;
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
        }),
        "del" => Some(
            args[1..]
                .iter()
                .map(|k| check_kv(k, None, value_max).map(|_| Mutation::Delete { key: k.clone() }))
                .collect::<Result<Vec<_>, String>>()
                .map(|m| (Shape::SumIntegers, m)),
        ),
        "getdel" => Some(check_kv(&args[1], None, value_max).map(|_| {
            (
                Shape::Plain,
                vec![Mutation::GetDel {
                    key: args[1].clone(),
                }],
            )
        })),
        "incr" | "decr" | "incrby" | "decrby" => {
            Some(check_kv(&args[1], None, value_max).and_then(|_| {
                let delta = match name {
                    "incr" => 1,
                    "decr" => -1,
                    "incrby" => parse_int(&args[2])?,
                    _ => parse_int(&args[2])?
                        .checked_neg()
                        .ok_or_else(|| "ERR decrement would overflow".to_string())?,
                };
                Ok((
                    Shape::Plain,
                    vec![Mutation::IncrBy {
                        key: args[1].clone(),
                        delta,
                    }],
                ))
            }))
        }
        "append" => Some(check_kv(&args[1], Some(&args[2]), value_max).map(|_| {
            (
                Shape::Plain,
                vec![Mutation::Append {
                    key: args[1].clone(),
                    data: args[2].clone(),
                }],
            )
        })),
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            Some(check_kv(&args[1], None, value_max).and_then(|_| {
                if args.len() > 3 {
                    return Err(format!(
                        "ERR unsupported option for '{name}' (NX/XX/GT/LT are not supported yet)"
                    ));
                }
                let unit = if name.starts_with('p') { 1 } else { 1000 };
                let at = expiry_at(&args[2], unit, name.ends_with("at"), name, now)?;
                Ok((
                    Shape::Plain,
                    vec![Mutation::Expire {
                        key: args[1].clone(),
                        at_ms: Some(at),
                    }],
                ))
            }))
        }
        "persist" => Some(check_kv(&args[1], None, value_max).map(|_| {
            (
                Shape::Plain,
                vec![Mutation::Expire {
                    key: args[1].clone(),
                    at_ms: None,
                }],
            )
        })),
        _ => None,
    };
    if let Some(write) = write {
        return match write {
            Ok((shape, mutations)) => conn.queue(sname, shape, mutations, started).await,
            Err(line) => {
                conn.flush_pending().await;
                conn.fail(sname, started, &line)
            }
        };
    }

    // Everything else runs now, after the queued writes (replies stay in order).
    conn.flush_pending().await;
    match run_now(conn, name, args, now).await {
        Ok(()) => conn.done(sname, started, false),
        Err(line) => conn.fail(sname, started, &line),
    }
}

async fn run_now(
    conn: &mut Connection,
    name: &str,
    args: &[Bytes],
    now: u64,
) -> Result<(), String> {
    let ks = conn.keyspace.clone();
    let mode = conn.consistency;
    let read_many = |keys: Vec<Bytes>| {
        let ks = ks.clone();
        async move {
            ks.get_many(&keys, now, mode)
                .await
                .map_err(|e| error_line(&e))
        }
    };
    let read = |key: &Bytes| {
        let f = read_many(vec![key.clone()]);
        async move { f.await.map(|mut v| v.pop().flatten()) }
    };
    match name {
        "ping" => match args.get(1) {
            Some(msg) => conn.out.bulk(msg),
            None => conn.out.simple("PONG"),
        },
        "echo" => conn.out.bulk(&args[1]),
        "quit" => {
            conn.out.ok();
            conn.quit = true;
        }
        "get" if ks.is_local() => {
            let out = &mut conn.out;
            ks.read_with(&args[1], now, |v| match v {
                Some(v) => out.bulk(&v.data),
                None => out.null(),
            })
            .map_err(|e| error_line(&e))?;
        }
        "get" => match read(&args[1]).await? {
            Some(v) => conn.out.bulk(&v.data),
            None => conn.out.null(),
        },
        "strlen" => {
            let n = read(&args[1]).await?.map_or(0, |v| v.data.len());
            conn.out.int(n as i64);
        }
        "type" => match read(&args[1]).await? {
            Some(_) => conn.out.simple("string"),
            None => conn.out.simple("none"),
        },
        "exists" => {
            let values = read_many(args[1..].to_vec()).await?;
            conn.out
                .int(values.iter().filter(|v| v.is_some()).count() as i64);
        }
        "mget" => {
            let values = read_many(args[1..].to_vec()).await?;
            conn.out.array(values.len());
            for v in values {
                match v {
                    Some(v) => conn.out.bulk(&v.data),
                    None => conn.out.null(),
                }
            }
        }
        "ttl" | "pttl" => {
            let n = match read(&args[1]).await? {
                None => -2,
                Some(v) => match v.header.expire_at_ms {
                    None => -1,
                    Some(at) => {
                        let ms = at.saturating_sub(now) as i64;
                        if name == "ttl" { (ms + 500) / 1000 } else { ms }
                    }
                },
            };
            conn.out.int(n);
        }
        "dbsize" => super::scan::dbsize(conn, &ks).await?,
        "keys" => super::scan::keys(conn, &ks, &args[1], now).await?,
        "flushdb" => {
            check_flush_args(&args[1..])?;
            ks.clear(conn.consistency)
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.ok();
        }
        "flushall" => {
            check_flush_args(&args[1..])?;
            for ks in conn.node.keyspaces() {
                ks.clear(conn.consistency)
                    .await
                    .map_err(|e| error_line(&e))?;
            }
            conn.out.ok();
        }
        "readonly" => {
            conn.consistency.cp_read = ReadMode::Stale;
            conn.out.ok();
        }
        "readwrite" => {
            conn.consistency.cp_read = ReadMode::Linearizable;
            conn.out.ok();
        }
        "consistency" => consistency(conn, args)?,
        "cluster" => super::cluster::command(conn, args)?,
        "select" => {
            let raw = String::from_utf8_lossy(&args[1]).into_owned();
            let found = if raw == "0" {
                conn.node.resp_keyspace()
            } else {
                conn.node.keyspace(&raw)
            };
            match found {
                Ok(ks) => {
                    conn.keyspace = ks;
                    conn.out.ok();
                }
                Err(_) if raw.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(format!(
                        "ERR DB index is out of range (no keyspace named '{raw}'; create one with that name to select it by number)"
                    ));
                }
                Err(e) => return Err(error_line(&e)),
            }
        }
        "auth" => {
            let (user, pass) = match args.len() {
                2 => (None, &args[1]),
                3 => (Some(&args[1]), &args[2]),
                _ => return Err(syntax()),
            };
            authenticate(conn, user, pass)?;
            conn.out.ok();
        }
        "hello" => hello(conn, args)?,
        "scan" => super::scan::scan(conn, &ks, args, now).await?,
        "info" => {
            let text = info(conn, &args[1..]).await;
            conn.out.verbatim(&text);
        }
        "client" => client(conn, args)?,
        "command" => command(conn, args)?,
        "config" => config(conn, args)?,
        "time" => {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            conn.out.array(2);
            conn.out.bulk(d.as_secs().to_string().as_bytes());
            conn.out.bulk(d.subsec_micros().to_string().as_bytes());
        }
        other => unreachable!("command '{other}' is in the table but has no handler"),
    }
    Ok(())
}

fn check_flush_args(args: &[Bytes]) -> Result<(), String> {
    match args {
        [] => Ok(()),
        [m] if m.eq_ignore_ascii_case(b"sync") || m.eq_ignore_ascii_case(b"async") => Ok(()),
        _ => Err(syntax()),
    }
}

fn authenticate(conn: &mut Connection, user: Option<&Bytes>, pass: &[u8]) -> Result<(), String> {
    let Some(expected) = &conn.node.config.password else {
        return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into());
    };
    let user_ok = user.is_none_or(|u| &u[..] == b"default");
    // Constant-time comparison: the time taken must not reveal how much of the password matched.
    let pass_ok = pass.len() == expected.len()
        && pass
            .iter()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if user_ok && pass_ok {
        conn.authenticated = true;
        Ok(())
    } else {
        Err("WRONGPASS invalid username-password pair or user is disabled.".into())
    }
}

fn hello(conn: &mut Connection, args: &[Bytes]) -> Result<(), String> {
    let mut proto = if conn.out.resp3 { 3 } else { 2 };
    let mut i = 1;
    if let Some(v) = args.get(1) {
        proto = match parse_i64_strict(v) {
            Some(p @ (2 | 3)) => p,
            Some(_) => return Err("NOPROTO unsupported protocol version".into()),
            None => return Err("ERR Protocol version is not an integer or out of range".into()),
        };
        i = 2;
    }
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match &opt[..] {
            b"AUTH" if i + 2 < args.len() => {
                authenticate(conn, Some(&args[i + 1]), &args[i + 2].clone())?;
                i += 3;
            }
            b"SETNAME" if i + 1 < args.len() => {
                set_name(conn, &args[i + 1])?;
                i += 2;
            }
            _ => {
                return Err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                ));
            }
        }
    }
    if !conn.authenticated {
        return Err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into());
    }
    conn.out.resp3 = proto == 3;
    conn.out.map(8);
    conn.out.bulk(b"server");
    conn.out.bulk(b"capdb");
    conn.out.bulk(b"version");
    conn.out.bulk(crate::REDIS_COMPAT_VERSION.as_bytes());
    conn.out.bulk(b"proto");
    conn.out.int(proto);
    conn.out.bulk(b"id");
    conn.out.int(conn.id as i64);
    conn.out.bulk(b"mode");
    conn.out.bulk(if conn.cluster_mode {
        b"cluster".as_slice()
    } else {
        b"standalone".as_slice()
    });
    conn.out.bulk(b"role");
    conn.out.bulk(b"master");
    conn.out.bulk(b"modules");
    conn.out.array(0);
    conn.out.bulk(b"capdb_version");
    conn.out.bulk(env!("CARGO_PKG_VERSION").as_bytes());
    Ok(())
}

fn set_name(conn: &mut Connection, name: &Bytes) -> Result<(), String> {
    if name.iter().any(|&b| b <= b' ' || b > b'~') {
        return Err(
            "ERR Client names cannot contain spaces, newlines or special characters.".into(),
        );
    }
    if name.len() > 256 {
        return Err("ERR client name longer than 256 bytes".into());
    }
    conn.name = (!name.is_empty()).then(|| name.clone());
    Ok(())
}

fn client(conn: &mut Connection, args: &[Bytes]) -> Result<(), String> {
    let sub = args[1].to_ascii_lowercase();
    match (&sub[..], args.len()) {
        (b"setname", 3) => {
            set_name(conn, &args[2])?;
            conn.out.ok();
        }
        (b"getname", 2) => match &conn.name {
            Some(n) => conn.out.bulk(&n.clone()),
            None => conn.out.null(),
        },
        (b"id", 2) => conn.out.int(conn.id as i64),
        (b"setinfo", 4) => {
            let attr = args[2].to_ascii_lowercase();
            match &attr[..] {
                b"lib-name" => conn.lib_name = Some(args[3].clone()),
                b"lib-ver" => {}
                _ => {
                    return Err(format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2])
                    ));
                }
            }
            conn.out.ok();
        }
        (b"info", 2) | (b"list", 2) => {
            let line = format!(
                "id={} addr={} name={} db={} lib-name={} resp={}\n",
                conn.id,
                conn.peer,
                conn.name
                    .as_ref()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default(),
                conn.keyspace.spec.name,
                conn.lib_name
                    .as_ref()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default(),
                if conn.out.resp3 { 3 } else { 2 },
            );
            conn.out.verbatim(&line);
        }
        (b"setname" | b"getname" | b"id" | b"setinfo" | b"info" | b"list", _) => {
            return Err(format!(
                "ERR wrong number of arguments for 'client|{}' command",
                String::from_utf8_lossy(&sub)
            ));
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

fn write_command_info(conn: &mut Connection, entry: &CommandInfo) {
    let (name, arity, flags, first, last, step) = *entry;
    conn.out.array(6);
    conn.out.bulk(name.as_bytes());
    conn.out.int(arity);
    conn.out.set(flags.len());
    for f in flags {
        conn.out.simple(f);
    }
    conn.out.int(first);
    conn.out.int(last);
    conn.out.int(step);
}

fn command(conn: &mut Connection, args: &[Bytes]) -> Result<(), String> {
    let Some(sub) = args.get(1) else {
        conn.out.array(COMMAND_TABLE.len());
        for entry in COMMAND_TABLE {
            write_command_info(conn, entry);
        }
        return Ok(());
    };
    let sub = sub.to_ascii_lowercase();
    match &sub[..] {
        b"count" => conn.out.int(COMMAND_TABLE.len() as i64),
        b"list" => {
            conn.out.array(COMMAND_TABLE.len());
            for (name, ..) in COMMAND_TABLE {
                conn.out.bulk(name.as_bytes());
            }
        }
        b"info" => {
            conn.out.array(args.len() - 2);
            for a in &args[2..] {
                let a = a.to_ascii_lowercase();
                match COMMAND_TABLE.iter().find(|c| c.0.as_bytes() == &a[..]) {
                    Some(entry) => write_command_info(conn, entry),
                    None => conn.out.null_array(),
                }
            }
        }
        // redis-cli asks for documentation to show hints; an empty answer makes it fall back to
        // no hints, which is correct for commands we do not document here.
        b"docs" => conn.out.map(0),
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

/// `CONFIG GET` answers the few parameters tools ask about (redis-benchmark reads `save` and
/// `appendonly`); `CONFIG SET` is refused: capdb is configured by file, environment and flags.
fn config(conn: &mut Connection, args: &[Bytes]) -> Result<(), String> {
    let sub = args[1].to_ascii_lowercase();
    match &sub[..] {
        b"get" if args.len() >= 3 => {
            let l = conn.node.config.limits;
            let known: Vec<(&str, String)> = vec![
                ("save", String::new()),
                ("appendonly", "no".into()),
                ("databases", conn.node.keyspaces().len().to_string()),
                ("maxclients", l.connections_max.to_string()),
                ("proto-max-bulk-len", l.value_bytes_max.to_string()),
                ("client-query-buffer-limit", l.frame_bytes_max.to_string()),
            ];
            let found: Vec<_> = known
                .into_iter()
                .filter(|(k, _)| {
                    args[2..]
                        .iter()
                        .any(|p| glob::matches(&p.to_ascii_lowercase(), k.as_bytes()))
                })
                .collect();
            conn.out.map(found.len());
            for (k, v) in found {
                conn.out.bulk(k.as_bytes());
                conn.out.bulk(v.as_bytes());
            }
            Ok(())
        }
        b"get" => Err("ERR wrong number of arguments for 'config|get' command".into()),
        b"set" | b"rewrite" | b"resetstat" => Err(format!(
            "ERR CONFIG {} is not supported: capdb is configured by its TOML file, CAPDB_* environment variables and flags",
            String::from_utf8_lossy(&args[1]).to_uppercase()
        )),
        _ => Err(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

async fn info(conn: &Connection, sections: &[Bytes]) -> String {
    use std::fmt::Write;
    let node = &conn.node;
    let wanted = |s: &str| {
        sections.is_empty()
            || sections.iter().any(|a| {
                a.eq_ignore_ascii_case(s.as_bytes())
                    || a.eq_ignore_ascii_case(b"all")
                    || a.eq_ignore_ascii_case(b"everything")
                    || (a.eq_ignore_ascii_case(b"default") && s != "commandstats")
            })
    };
    let mut out = String::new();
    let uptime = node.started.elapsed().as_secs();
    if wanted("server") {
        let _ = write!(
            out,
            "# Server\r\nredis_version:{}\r\ncapdb_version:{}\r\nredis_mode:{}\r\nos:{} {}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nuptime_in_days:{}\r\nexecutable:capdb\r\n\r\n",
            crate::REDIS_COMPAT_VERSION,
            env!("CARGO_PKG_VERSION"),
            if conn.cluster_mode {
                "cluster"
            } else {
                "standalone"
            },
            std::env::consts::OS,
            std::env::consts::ARCH,
            std::process::id(),
            node.config.resp_addr.port(),
            uptime,
            uptime / 86_400
        );
    }
    if wanted("clients") {
        let _ = write!(
            out,
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:0\r\n\r\n",
            node.metrics.connections.get(),
            node.config.limits.connections_max
        );
    }
    let keyspaces = node.keyspaces();
    if wanted("memory") {
        let used: u64 = keyspaces
            .iter()
            .filter_map(|k| k.memory().map(|m| m.used_bytes))
            .sum();
        let max: u64 = keyspaces
            .iter()
            .filter_map(|k| k.spec.max_memory_bytes)
            .sum();
        let _ = write!(
            out,
            "# Memory\r\nused_memory:{used}\r\nused_memory_human:{:.2}M\r\nmaxmemory:{max}\r\n\r\n",
            used as f64 / 1048576.0,
        );
    }
    if wanted("persistence") {
        let s = node.engine.stats();
        let _ = write!(
            out,
            "# Persistence\r\nloading:0\r\nrdb_changes_since_last_save:0\r\naof_enabled:0\r\ncapdb_storage:redb\r\ncapdb_group_commits:{}\r\ncapdb_committed_writes:{}\r\ncapdb_storage_file_bytes:{}\r\n\r\n",
            s.commits.load(std::sync::atomic::Ordering::Relaxed),
            s.jobs.load(std::sync::atomic::Ordering::Relaxed),
            node.engine.file_bytes()
        );
    }
    if wanted("stats") {
        let (mut expired, mut evicted) = (0, 0);
        for k in &keyspaces {
            if let Some(m) = k.memory() {
                expired += m.expired_keys;
                evicted += m.evicted_keys;
            }
        }
        let _ = write!(
            out,
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\nexpired_keys:{expired}\r\nevicted_keys:{evicted}\r\n\r\n",
            node.metrics.connections_total.get(),
            node.commands_processed
                .load(std::sync::atomic::Ordering::Relaxed),
            node.metrics.connections_rejected.get(),
        );
    }
    if wanted("replication") {
        out.push_str("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n");
    }
    if wanted("cluster") {
        out.push_str(&super::cluster::info_section(conn));
    }
    if wanted("keyspace") {
        out.push_str("# Keyspace\r\n");
        for k in &keyspaces {
            let name = k.spec.name.as_str();
            let label = if name == node.config.resp_keyspace.as_str() {
                "db0".to_string()
            } else if name.bytes().all(|b| b.is_ascii_digit()) {
                format!("db{name}")
            } else {
                format!("keyspace_{name}")
            };
            let scope = super::cluster::scope(conn, k);
            let keys = k
                .len_in(&scope, crate::node::Consistency::RELAXED)
                .await
                .unwrap_or(0);
            if keys > 0 {
                let _ = write!(out, "{label}:keys={keys},mode={}\r\n", k.spec.mode.as_str());
            }
        }
    }
    out
}
