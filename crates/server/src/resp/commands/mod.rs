//! The commands: one table, dispatch, and the argument helpers the families share.
//!
//! # One table
//!
//! [`COMMANDS`] is the one place a command is known: a row carries its name, arity, flags and
//! key positions (what `COMMAND` reports) and its handler. Dispatch, the authentication check
//! (flag `no_auth`), `-MOVED` (first key, flag `readonly`), `COMMAND` and the metrics' label set
//! ([`COMMAND_NAMES`], derived at compile time) all read it, so a command cannot be listed
//! without a handler, nor handled without being listed. Adding one is a row here and a function
//! in its family's file.
//!
//! # Writes are queued, everything else runs at once
//!
//! A [`Handler::Write`] only parses: its arguments become [`Mutation`]s, *queued* on the
//! connection; the queue is applied in one `Keyspace::apply` when the pipeline ends or a command
//! that is not a write to the same keyspace arrives, so replies stay in order while a pipeline of
//! N writes costs one group commit. Every other handler runs at once, after the queued writes
//! (so a read sees the writes before it): [`Handler::Now`] without waiting, [`Handler::Wait`]
//! waiting on the store or the cluster (a boxed future: the table holds plain function
//! pointers), and [`Handler::Read`] for GET, which a local (`cache`) keyspace answers without
//! waiting, straight from the entry under its shard lock, so the hottest read allocates nothing.
//!
//! # Families
//!
//! - `strings.rs`: SET and its variants, MSET, GETDEL, INCR/DECR, APPEND, GET, MGET, STRLEN;
//! - `keys.rs`: DEL, EXISTS, TYPE, TTL/PTTL, EXPIRE and its variants, PERSIST;
//! - `scan.rs`: the commands that walk or count a whole keyspace: SCAN, KEYS, DBSIZE;
//! - `server.rs`: INFO, COMMAND, TIME, FLUSHDB, FLUSHALL;
//! - `config.rs`: CONFIG GET/SET and the node's run-time settings;
//! - `docs.rs`: COMMAND DOCS, from Redis's documentation (`command_docs.resp`);
//! - `connection.rs`: the connection's own state: AUTH, HELLO, CLIENT, SELECT, PING, ECHO,
//!   QUIT, READONLY/READWRITE, CONSISTENCY;
//! - CLUSTER is in `../cluster.rs`, with the rest of Redis Cluster compatibility.
//!
//! Error replies follow Redis wording where clients or tools depend on it (arity, syntax,
//! integer, unknown command, NOAUTH, WRONGPASS).

mod blocking;
mod config;
mod connection;
mod data;
mod docs;
mod job_streams;
mod jobs;
mod keys;
mod pubsub;
mod scan;
mod server;
mod stream_groups;
mod streams;
mod strings;
pub(super) mod txn;
mod views;

use std::time::Instant;

use bytes::Bytes;
use capdb_types::limits::{check_key, check_value};
use capdb_types::mutation::parse_i64_strict;
use capdb_types::{Error, Mutation, Value};
use futures::future::BoxFuture;

use super::{Connection, Shape, cluster};

/// What a handler returns: `Ok` once its reply is written, or the error line to answer.
type Outcome = Result<(), String>;

/// A write command's mutations and how their replies make its reply.
type Queued = (Shape, Vec<Mutation>);

/// What a write's parser reads.
struct WriteCall<'a> {
    /// The arguments, the command name first.
    args: &'a [Bytes],
    /// The batch's clock reading (Unix ms), for relative expiry.
    now: u64,
    value_max: usize,
}

/// How a command runs (see the module doc).
enum Handler {
    /// Parses the arguments into mutations, queued for one group commit per pipeline.
    Write(fn(&WriteCall<'_>) -> Result<Queued, String>),
    /// Runs at once, without waiting.
    Now(fn(&mut Connection, &[Bytes]) -> Outcome),
    /// Runs at once and waits on the store or the cluster.
    Wait(for<'a> fn(&'a mut Connection, &'a [Bytes]) -> BoxFuture<'a, Outcome>),
    /// A read: `local` when the connection's keyspace is local (answered without waiting),
    /// else `remote`.
    Read {
        local: fn(&mut Connection, &[Bytes]) -> Outcome,
        remote: for<'a> fn(&'a mut Connection, &'a [Bytes]) -> BoxFuture<'a, Outcome>,
    },
}

/// A command as the server knows it: what `COMMAND` reports about it, and what runs it.
struct Command {
    /// Lowercase; the table is sorted by it.
    name: &'static str,
    /// Arguments counting the name; negative: at least |arity|.
    arity: i64,
    flags: &'static [&'static str],
    /// First key, last key (negative: counted from the end), step; `(0, 0, 0)`: no keys.
    keys: (i64, i64, i64),
    handler: Handler,
}

const fn row(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
    handler: Handler,
) -> Command {
    Command {
        name,
        arity,
        flags,
        keys,
        handler,
    }
}

/// A [`Handler::Wait`] from an `async fn(&mut Connection, &[Bytes]) -> Outcome`.
macro_rules! wait {
    ($f:path) => {
        Handler::Wait(|conn, args| Box::pin($f(conn, args)))
    };
}

/// A [`Handler::Read`] from its local `fn` and its remote `async fn`.
macro_rules! read {
    ($local:path, $remote:path) => {
        Handler::Read {
            local: $local,
            remote: |conn, args| Box::pin($remote(conn, args)),
        }
    };
}

use Handler::{Now, Write};

const NO_KEYS: (i64, i64, i64) = (0, 0, 0);
const KEY: (i64, i64, i64) = (1, 1, 1);
const EVERY_KEY: (i64, i64, i64) = (1, -1, 1);

/// Every command, sorted by name (checked at compile time: lookup is a binary search).
#[rustfmt::skip]
const COMMANDS: &[Command] = &[
    row("append",      3,  &["write", "denyoom", "fast"], KEY, Write(strings::append)),
    row("auth",        -2, &["noscript", "loading", "stale", "fast", "no_auth"], NO_KEYS, Now(connection::auth)),
    row("blmove",      6,  &["write", "denyoom", "noscript", "blocking"], (1, 2, 1), wait!(blocking::run)),
    row("blmpop",      -5, &["write", "blocking", "movablekeys"], NO_KEYS, wait!(blocking::run)),
    row("blpop",       -3, &["write", "noscript", "blocking"], (1, -2, 1), wait!(blocking::run)),
    row("brpop",       -3, &["write", "noscript", "blocking"], (1, -2, 1), wait!(blocking::run)),
    row("brpoplpush",  4,  &["write", "denyoom", "noscript", "blocking"], (1, 2, 1), wait!(blocking::run)),
    row("bzmpop",      -5, &["write", "blocking", "movablekeys"], NO_KEYS, wait!(blocking::run)),
    row("bzpopmax",    -3, &["write", "noscript", "blocking", "fast"], (1, -2, 1), wait!(blocking::run)),
    row("bzpopmin",    -3, &["write", "noscript", "blocking", "fast"], (1, -2, 1), wait!(blocking::run)),
    row("changes",     -3, &["admin"], NO_KEYS, wait!(streams::changes)),
    row("client",      -2, &["admin", "noscript", "loading", "stale"], NO_KEYS, Now(connection::client)),
    row("cluster",     -2, &["admin", "stale"], NO_KEYS, Now(cluster::command)),
    row("command",     -1, &["loading", "stale"], NO_KEYS, Now(server::command)),
    row("config",      -2, &["admin", "noscript", "loading", "stale"], NO_KEYS, Now(config::config)),
    row("consistency", -1, &["fast", "loading", "stale"], NO_KEYS, Now(connection::consistency)),
    row("dbsize",      1,  &["readonly", "fast"], NO_KEYS, wait!(scan::dbsize)),
    row("decr",        2,  &["write", "denyoom", "fast"], KEY, Write(strings::decr)),
    row("decrby",      3,  &["write", "denyoom", "fast"], KEY, Write(strings::decrby)),
    row("del",         -2, &["write"], EVERY_KEY, Write(keys::del)),
    row("discard",     1,  &["noscript", "loading", "stale", "fast"], NO_KEYS, Now(txn::discard)),
    row("echo",        2,  &["fast"], NO_KEYS, Now(connection::echo)),
    row("exec",        1,  &["noscript", "loading", "stale", "skip_slowlog"], NO_KEYS, wait!(txn::exec)),
    row("exists",      -2, &["readonly", "fast"], EVERY_KEY, wait!(keys::exists)),
    row("expire",      -3, &["write", "fast"], KEY, Write(keys::expire)),
    row("expireat",    -3, &["write", "fast"], KEY, Write(keys::expireat)),
    row("flushall",    -1, &["write"], NO_KEYS, wait!(server::flushall)),
    row("flushdb",     -1, &["write"], NO_KEYS, wait!(server::flushdb)),
    row("get",         2,  &["readonly", "fast"], KEY, read!(strings::get_local, strings::get)),
    row("getdel",      2,  &["write", "fast"], KEY, Write(strings::getdel)),
    row("hello",       -1, &["noscript", "loading", "stale", "fast", "no_auth"], NO_KEYS, Now(connection::hello)),
    row("incr",        2,  &["write", "denyoom", "fast"], KEY, Write(strings::incr)),
    row("incrby",      3,  &["write", "denyoom", "fast"], KEY, Write(strings::incrby)),
    row("info",        -1, &["loading", "stale"], NO_KEYS, wait!(server::info)),
    row("job",         -2, &["admin"], NO_KEYS, wait!(jobs::job)),
    row("keys",        2,  &["readonly"], NO_KEYS, wait!(scan::keys)),
    row("mget",        -2, &["readonly", "fast"], EVERY_KEY, wait!(strings::mget)),
    row("mset",        -3, &["write", "denyoom"], (1, -1, 2), Write(strings::mset)),
    row("multi",       1,  &["noscript", "loading", "stale", "fast"], NO_KEYS, Now(txn::multi)),
    row("persist",     2,  &["write", "fast"], KEY, Write(keys::persist)),
    row("pexpire",     -3, &["write", "fast"], KEY, Write(keys::pexpire)),
    row("pexpireat",   -3, &["write", "fast"], KEY, Write(keys::pexpireat)),
    row("ping",        -1, &["fast"], NO_KEYS, Now(connection::ping)),
    row("psetex",      4,  &["write", "denyoom"], KEY, Write(strings::psetex)),
    row("psubscribe",  -2, &["pubsub", "noscript", "loading", "stale"], NO_KEYS, Now(pubsub::psubscribe)),
    row("pttl",        2,  &["readonly", "fast"], KEY, wait!(keys::pttl)),
    row("publish",     3,  &["pubsub", "loading", "stale", "fast"], NO_KEYS, Now(pubsub::publish)),
    row("pubsub",      -2, &["pubsub", "loading", "stale"], NO_KEYS, Now(pubsub::pubsub)),
    row("punsubscribe", -1, &["pubsub", "noscript", "loading", "stale"], NO_KEYS, Now(pubsub::punsubscribe)),
    row("quit",        -1, &["fast", "no_auth"], NO_KEYS, Now(connection::quit)),
    row("randomkey",   1,  &["readonly"], NO_KEYS, wait!(keys::randomkey)),
    row("readonly",    1,  &["fast", "loading", "stale"], NO_KEYS, Now(connection::readonly)),
    row("readwrite",   1,  &["fast", "loading", "stale"], NO_KEYS, Now(connection::readwrite)),
    row("scan",        -2, &["readonly"], NO_KEYS, wait!(scan::scan)),
    row("select",      2,  &["loading", "stale", "fast"], NO_KEYS, Now(connection::select)),
    row("set",         -3, &["write", "denyoom"], KEY, Write(strings::set)),
    row("setex",       4,  &["write", "denyoom"], KEY, Write(strings::setex)),
    row("setnx",       3,  &["write", "denyoom", "fast"], KEY, Write(strings::setnx)),
    row("spublish",    3,  &["pubsub", "loading", "stale", "fast"], KEY, Now(pubsub::spublish)),
    row("ssubscribe",  -2, &["pubsub", "noscript", "loading", "stale"], EVERY_KEY, Now(pubsub::ssubscribe)),
    row("strlen",      2,  &["readonly", "fast"], KEY, wait!(strings::strlen)),
    row("subscribe",   -2, &["pubsub", "noscript", "loading", "stale"], NO_KEYS, Now(pubsub::subscribe)),
    row("sunsubscribe", -1, &["pubsub", "noscript", "loading", "stale"], EVERY_KEY, Now(pubsub::sunsubscribe)),
    row("time",        1,  &["loading", "stale", "fast"], NO_KEYS, Now(server::time)),
    row("ttl",         2,  &["readonly", "fast"], KEY, wait!(keys::ttl)),
    row("type",        2,  &["readonly", "fast"], KEY, wait!(keys::key_type)),
    row("unsubscribe", -1, &["pubsub", "noscript", "loading", "stale"], NO_KEYS, Now(pubsub::unsubscribe)),
    row("unwatch",     1,  &["noscript", "loading", "stale", "fast"], NO_KEYS, Now(txn::unwatch)),
    row("view",        -2, &["admin"], NO_KEYS, wait!(views::view)),
    row("watch",       -2, &["noscript", "loading", "stale", "fast"], EVERY_KEY, wait!(txn::watch)),
    row("xack",        -4, &["write", "fast"], KEY, wait!(stream_groups::xack)),
    row("xadd",        -5, &["write", "denyoom", "fast"], KEY, Now(streams::read_only)),
    row("xautoclaim",  -6, &["write", "fast"], KEY, wait!(stream_groups::xautoclaim)),
    row("xclaim",      -6, &["write", "fast"], KEY, wait!(stream_groups::xclaim)),
    row("xdel",        -3, &["write", "fast"], KEY, Now(streams::read_only)),
    row("xgroup",      -2, &["write"], (2, 2, 1), wait!(stream_groups::xgroup)),
    row("xinfo",       -2, &["readonly"], (2, 2, 1), wait!(stream_groups::xinfo)),
    row("xlen",        2,  &["readonly", "fast"], KEY, wait!(streams::xlen)),
    row("xpending",    -3, &["readonly"], KEY, wait!(stream_groups::xpending)),
    row("xrange",      -4, &["readonly"], KEY, wait!(streams::xrange)),
    row("xread",       -4, &["readonly", "blocking", "movablekeys"], NO_KEYS, wait!(streams::xread)),
    row("xreadgroup",  -7, &["write", "blocking", "movablekeys"], NO_KEYS, wait!(stream_groups::xreadgroup)),
    row("xrevrange",   -4, &["readonly"], KEY, wait!(streams::xrevrange)),
    row("xsetid",      -3, &["write", "denyoom", "fast"], KEY, Now(streams::read_only)),
    row("xtrim",       -4, &["write"], KEY, Now(streams::read_only)),
];

/// Every command name the server knows, lowercase, sorted (aliases resolve to their canonical
/// name): the names of [`COMMANDS`].
pub const COMMAND_NAMES: &[&str] = &{
    let mut names = [""; COMMANDS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = COMMANDS[i].name;
        i += 1;
    }
    names
};

/// Every command name the server answers: [`COMMAND_NAMES`] and the data-type commands.
pub fn all_command_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = COMMAND_NAMES.to_vec();
    names.extend(capdb_data::command::all().map(|s| s.name));
    names.sort_unstable();
    names
}

const _: () = assert!(
    sorted_by_name(COMMANDS),
    "COMMANDS must be sorted by name, without duplicates"
);

const fn sorted_by_name(table: &[Command]) -> bool {
    let mut i = 1;
    while i < table.len() {
        let (a, b) = (table[i - 1].name.as_bytes(), table[i].name.as_bytes());
        let mut j = 0;
        loop {
            if j == a.len() {
                if j == b.len() {
                    return false; // equal names
                }
                break; // a is a prefix of b
            }
            if j == b.len() || a[j] > b[j] {
                return false;
            }
            if a[j] < b[j] {
                break;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

/// Resolves aliases to the canonical command name (`unlink` is `del`).
pub fn canonical_name(name: &str) -> &str {
    match name {
        "unlink" => "del",
        other => other,
    }
}

/// A lowercase command name of up to 16 bytes as one big-endian integer (zero-padded; names
/// have no zero bytes), so the lookup compares integers instead of calling `memcmp` per row:
/// it runs for every command, and misses for every data-type command.
fn packed_name(name: &str) -> Option<u128> {
    let name = name.as_bytes();
    if name.len() > 16 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..name.len()].copy_from_slice(name);
    Some(u128::from_be_bytes(b))
}

/// The table row of a command.
fn lookup(name: &str) -> Option<&'static Command> {
    static PACKED: std::sync::OnceLock<Vec<(u128, &'static Command)>> = std::sync::OnceLock::new();
    let Some(packed) = packed_name(name) else {
        return COMMANDS.iter().find(|c| c.name == name);
    };
    let table = PACKED.get_or_init(|| {
        let mut v: Vec<(u128, &'static Command)> = COMMANDS
            .iter()
            .filter_map(|c| Some((packed_name(c.name)?, c)))
            .collect();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    });
    table
        .binary_search_by_key(&packed, |(p, _)| *p)
        .ok()
        .map(|i| table[i].1)
}

fn arity_ok(cmd: &Command, argc: usize) -> bool {
    if cmd.arity >= 0 {
        argc == cmd.arity as usize
    } else {
        argc >= cmd.arity.unsigned_abs() as usize
    }
}

/// Runs (or, for a write, queues) one command by its canonical lowercase `name`.
pub(super) async fn execute(conn: &mut Connection, name: &str, args: Vec<Bytes>, started: Instant) {
    if conn.subscribed_resp2() && !pubsub::ALLOWED_WHILE_SUBSCRIBED.contains(&name) {
        conn.flush_pending().await;
        let shown = String::from_utf8_lossy(&args[0]).to_string();
        return conn.fail(
            "unknown",
            started,
            &format!("ERR Can't execute '{shown}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"),
        );
    }
    if conn.multi.is_some() && !txn::runs_at_once(name) {
        return txn::queue(conn, name, args, started).await;
    }
    let Some(cmd) = lookup(name) else {
        if let Some(spec) = capdb_data::lookup(name) {
            return data::execute(conn, spec, args, started).await;
        }
        conn.flush_pending().await;
        return conn.fail("unknown", started, &unknown_command(&args));
    };
    let args = &args[..];
    if let Err(line) = admit(conn, cmd, args) {
        conn.flush_pending().await;
        if conn.multi.is_some() || cmd.name == "exec" {
            return txn::rejected(conn, cmd.name, started, &line);
        }
        return conn.fail(cmd.name, started, &line);
    }
    let outcome = match cmd.handler {
        Handler::Write(parse) => {
            let call = WriteCall {
                args,
                now: conn.now_ms,
                value_max: conn.node.config.limits.value_bytes_max,
            };
            match parse(&call) {
                Ok((shape, mutations)) => {
                    return conn.queue(cmd.name, shape, mutations, started).await;
                }
                Err(line) => {
                    conn.flush_pending().await;
                    Err(line)
                }
            }
        }
        // Everything else runs now, after the queued writes (replies stay in order).
        Handler::Now(run) => {
            conn.flush_pending().await;
            run(conn, args)
        }
        Handler::Wait(run) => {
            conn.flush_pending().await;
            run(conn, args).await
        }
        // A pipeline's GETs of a replicated keyspace are read together (see `resp/mod.rs`).
        Handler::Read { .. } if cmd.name == "get" && !conn.keyspace.is_local() => {
            return conn.queue_get(args[1].clone(), started).await;
        }
        Handler::Read { local, remote } => {
            conn.flush_pending().await;
            if conn.keyspace.is_local() {
                local(conn, args)
            } else {
                remote(conn, args).await
            }
        }
    };
    match outcome {
        Ok(()) => conn.done(cmd.name, started, false),
        Err(line) => conn.fail(cmd.name, started, &line),
    }
}

/// The checks before a command runs, in this order: arity, authentication, and in cluster mode
/// `-MOVED` when another node leads the shard of its first key.
fn admit(conn: &Connection, cmd: &Command, args: &[Bytes]) -> Outcome {
    if !arity_ok(cmd, args.len()) {
        // Redis names the command as called: an alias (UNLINK) by its own name.
        let called = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        let shown = if canonical_name(&called) == cmd.name {
            &called
        } else {
            cmd.name
        };
        return Err(format!(
            "ERR wrong number of arguments for '{shown}' command"
        ));
    }
    if !conn.authenticated && !cmd.flags.contains(&"no_auth") {
        return Err("NOAUTH Authentication required.".into());
    }
    let first_key = cmd.keys.0;
    if first_key >= 1
        && let Some(key) = args.get(first_key as usize)
        && !streams::reads_a_stream(cmd.name, key)
        && let Some(line) = cluster::moved(conn, key, cmd.flags.contains(&"readonly"))
    {
        return Err(line);
    }
    Ok(())
}

/// Redis's wording, which clients match on.
fn unknown_command(args: &[Bytes]) -> String {
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
    line
}

/// The RESP error line for an error.
pub fn error_line(e: &Error) -> String {
    match e {
        Error::NotAnInteger => "ERR value is not an integer or out of range".into(),
        Error::Overflow => "ERR increment or decrement would overflow".into(),
        Error::OutOfMemory(_) => format!("OOM {e}"),
        Error::Unavailable(_) | Error::ShuttingDown | Error::Locked(_) => format!("TRYAGAIN {e}"),
        Error::Corruption(_) => format!("CORRUPT {e}"),
        Error::OutcomeUnknown(_) => format!("UNCERTAIN {e}"),
        Error::WrongType => format!("WRONGTYPE {e}"),
        // Already a whole Redis error line.
        Error::Command(line) => line.clone(),
        _ => format!("ERR {e}"),
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

/// The live values of `keys` in the connection's keyspace, in order, at its consistency.
async fn read_many(conn: &Connection, keys: &[Bytes]) -> Result<Vec<Option<Value>>, String> {
    conn.keyspace
        .get_many(keys, conn.now_ms, conn.consistency)
        .await
        .map_err(|e| error_line(&e))
}

/// The live value of `key` (see [`read_many`]).
async fn read(conn: &Connection, key: &Bytes) -> Result<Option<Value>, String> {
    read_many(conn, std::slice::from_ref(key))
        .await
        .map(|mut v| v.pop().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_every_row_by_its_name_and_nothing_else() {
        for c in COMMANDS {
            assert_eq!(lookup(c.name).map(|found| found.name), Some(c.name));
        }
        for missing in [
            "",
            "gett",
            "ge",
            "lpush",
            "subscribex",
            "a-name-longer-than-16",
        ] {
            assert!(lookup(missing).is_none(), "{missing}");
        }
    }
}
