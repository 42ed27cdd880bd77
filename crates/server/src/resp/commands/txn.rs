//! Transactions: MULTI, EXEC, DISCARD, WATCH, UNWATCH, with Redis's rules, on one shard of one
//! keyspace in every mode.
//!
//! # Redis's rules (what a client sees)
//!
//! - After MULTI every command but EXEC, DISCARD, MULTI, WATCH and QUIT is checked and queued
//!   (`+QUEUED`). A *queue-time* error (unknown command, wrong arity, NOAUTH, a key too large,
//!   keys on another shard than the transaction's, `-MOVED` in cluster mode, too many queued
//!   commands or bytes) answers its error and marks the transaction dirty: EXEC then answers
//!   `-EXECABORT Transaction discarded because of previous errors.` and runs nothing. Errors a
//!   command finds while running (WRONGTYPE, not an integer, a syntax error in its options, as
//!   Redis finds them at EXEC too) fail only that command, inside EXEC's array.
//! - Nested MULTI, WATCH inside MULTI, EXEC/DISCARD without MULTI answer Redis's errors without
//!   marking anything. EXEC with arguments inside MULTI discards the transaction with
//!   `-EXECABORT Transaction discarded because of: ...`, as Redis does.
//! - EXEC, DISCARD, UNWATCH and disconnecting end every watch. A watched key changed since
//!   WATCH makes EXEC answer the null array (RESP2 `*-1`, RESP3 `_`) and run nothing.
//! - SELECT inside MULTI is queued; the commands after it address the keyspace it selects
//!   (resolved when queued), and after EXEC the connection stays in it. Blocking pops inside
//!   MULTI run their non-blocking form once.
//!
//! # Where a transaction runs
//!
//! Every keyed command of a transaction (reads too: GET inside MULTI sees the writes before it)
//! must address one keyspace and one shard of it ([`Keyspace::txn_shard`]); a command that
//! would leave it answers `-CROSSSLOT` at queue time (Redis Cluster's rule, until cross-shard
//! transactions land), and one addressing a keyspace of another mode
//! [`MIXED_MODES`]. The keyed commands then run as one step of the keyspace's store
//! ([`Keyspace::transact`]): on `cp` one Raft entry (atomic, isolated, exactly once), on
//! `cache` one lock scope, on `ap` one run at this coordinator (not isolated: see the README).
//! Watched keys must be where the transaction runs, or EXEC answers `-CROSSSLOT`.
//!
//! Keyless commands (PING, ECHO, TIME, CLIENT, CONFIG, PUBLISH, SUBSCRIBE, HELLO, SELECT...)
//! run at EXEC on this connection, in their place, through the ordinary dispatch; those that
//! read or change a whole keyspace (FLUSHDB, FLUSHALL, DBSIZE, KEYS, SCAN, RANDOMKEY) split the
//! keyed commands into a step before them and a step after them, so such a transaction is
//! atomic only piecewise (and WATCH guards its first step).
//!
//! # Bounds
//!
//! At most [`QUEUED_MAX`] commands and [`QUEUED_BYTES_MAX`] argument bytes per transaction
//! (the next one is a queue-time error), at most [`WATCHED_MAX`] watched keys per connection.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use capdb_types::limits::check_key;
use capdb_types::{Mode, Mutation, Reply};

use super::{Handler, Outcome, WriteCall, blocking, cluster, error_line, lookup, unknown_command};
use crate::node::{Keyspace, Watched};
use crate::resp::{Connection, Shape};

/// Commands one transaction may queue.
pub const QUEUED_MAX: usize = 10_000;
/// Argument bytes one transaction may queue (its commands are held in memory until EXEC).
pub const QUEUED_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Keys one connection may watch.
pub const WATCHED_MAX: usize = 10_000;

/// The answer of a command addressing a keyspace of another mode than the transaction's.
pub const MIXED_MODES: &str = "ERR a transaction cannot mix keyspaces of different modes (each mode runs transactions its own way)";

const EXECABORT: &str = "EXECABORT Transaction discarded because of previous errors.";

/// Commands that run at once inside MULTI instead of being queued.
const RUN_AT_ONCE: &[&str] = &["discard", "exec", "multi", "quit", "watch"];

/// Keyless commands that read or change a whole keyspace: they split a transaction's keyed
/// commands into the step before them and the step after them.
const KEYSPACE_WIDE: &[&str] = &["dbsize", "flushall", "flushdb", "keys", "randomkey", "scan"];

/// The server's own keyed reads, run inside the transaction as `capdb.<name>` (see
/// `capdb_data::txn_reads`).
const KEYED_READS: &[&str] = &["exists", "get", "mget", "pttl", "strlen", "ttl", "type"];

/// A connection's open transaction (between MULTI and EXEC/DISCARD).
pub(crate) struct Multi {
    steps: Vec<Step>,
    bytes: usize,
    dirty: bool,
    /// The keyspace commands queued next address (SELECT inside MULTI changes it).
    keyspace: Arc<Keyspace>,
    /// Where the keyed commands run: the keyspace and shard of the first of them.
    target: Option<(Arc<Keyspace>, u64)>,
    /// Some keyed command is on another `cp` shard or keyspace than the target: EXEC runs a
    /// cross-shard transaction (`crate::node::txns`).
    spread: bool,
}

impl Multi {
    pub(crate) fn new(keyspace: Arc<Keyspace>) -> Multi {
        Multi {
            steps: Vec::new(),
            bytes: 0,
            dirty: false,
            keyspace,
            target: None,
            spread: false,
        }
    }
}

/// One queued command.
enum Step {
    /// Keyed: runs inside the transaction's step of the store; its replies make its reply.
    Keyed {
        name: &'static str,
        mutations: Vec<Mutation>,
        shape: KeyedShape,
        /// Its keyspace and shard (a `cp` shard is its Raft group); `None` without keys.
        at: Option<(Arc<Keyspace>, u64)>,
    },
    /// Its reply is already known: an error found while parsing it, which Redis finds when the
    /// command runs, so it fails only this command.
    Fixed { name: &'static str, error: String },
    /// Keyless: runs at EXEC through the ordinary dispatch, in its place.
    Replay {
        name: &'static str,
        args: Vec<Bytes>,
        /// The keyspace selected when it was queued.
        keyspace: Arc<Keyspace>,
    },
}

enum KeyedShape {
    /// As the same command outside a transaction ([`Shape`] of the write handlers).
    Write(Shape),
    Blocking(blocking::InTransaction),
}

/// Whether a command runs at once even inside MULTI.
pub(super) fn runs_at_once(name: &str) -> bool {
    RUN_AT_ONCE.contains(&name)
}

/// A command rejected before running while a transaction is open: it marks the transaction
/// dirty. EXEC itself discards the transaction (if any) with Redis's EXECABORT wording, with
/// or without MULTI, as Redis words it.
pub(super) fn rejected(conn: &mut Connection, name: &'static str, started: Instant, line: &str) {
    if name == "exec" {
        conn.multi = None;
        conn.watched.clear();
        let reason = line.strip_prefix("ERR ").unwrap_or(line);
        return conn.fail(
            name,
            started,
            &format!("EXECABORT Transaction discarded because of: {reason}"),
        );
    }
    if let Some(m) = conn.multi.as_mut() {
        m.dirty = true;
    }
    conn.fail(name, started, line)
}

/// `MULTI`.
pub(super) fn multi(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    if conn.multi.is_some() {
        return Err("ERR MULTI calls can not be nested".into());
    }
    conn.multi = Some(Box::new(Multi::new(conn.keyspace.clone())));
    conn.out.ok();
    Ok(())
}

/// `DISCARD`.
pub(super) fn discard(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    if conn.multi.take().is_none() {
        return Err("ERR DISCARD without MULTI".into());
    }
    conn.watched.clear();
    conn.out.ok();
    Ok(())
}

/// `UNWATCH`.
pub(super) fn unwatch(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    conn.watched.clear();
    conn.out.ok();
    Ok(())
}

/// `WATCH key [key ...]`: every key on one shard (Redis Cluster's rule for a multi-key
/// command), except on `cp` keyspaces outside cluster mode, where transactions span shards.
pub(super) async fn watch(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    if conn.multi.is_some() {
        return Err("ERR WATCH inside MULTI is not allowed".into());
    }
    let keys = &args[1..];
    for k in keys {
        check_key(k).map_err(|e| error_line(&e))?;
    }
    if conn.watched.len() + keys.len() > WATCHED_MAX {
        return Err(format!(
            "ERR too many watched keys (at most {WATCHED_MAX} per connection); UNWATCH first"
        ));
    }
    let ks = conn.keyspace.clone();
    let shard = ks.txn_shard(&keys[0]);
    // Keys by shard, in first-seen order: several only on `cp` outside cluster mode (a
    // cross-shard transaction judges each shard's guards there).
    let mut by_shard: Vec<(u64, Vec<Bytes>)> = Vec::new();
    for k in keys {
        let s = ks.txn_shard(k);
        match by_shard.iter_mut().find(|(at, _)| *at == s) {
            Some((_, ks)) => ks.push(k.clone()),
            None => by_shard.push((s, vec![k.clone()])),
        }
    }
    if by_shard.len() > 1 && (ks.spec.mode != Mode::Cp || conn.cluster_mode) {
        return Err(super::data::CROSSSLOT.into());
    }
    if let Some(line) = cluster::moved(conn, &keys[0], true) {
        return Err(line);
    }
    debug_assert_eq!(by_shard[0].0, shard, "the first key's shard comes first");
    for (_, keys) in by_shard {
        let watched = ks
            .watch(&keys, conn.now_ms, conn.consistency)
            .await
            .map_err(|e| error_line(&e))?;
        conn.watched.extend(watched);
    }
    conn.out.ok();
    Ok(())
}

/// Queues one command of an open transaction (see the module doc for what is checked now).
pub(super) async fn queue(conn: &mut Connection, name: &str, args: Vec<Bytes>, started: Instant) {
    match check_and_queue(conn, name, args) {
        Ok(()) => {
            conn.out.simple("QUEUED");
            conn.done("multi", started, false);
        }
        Err((shown, line)) => {
            if let Some(m) = conn.multi.as_mut() {
                m.dirty = true;
            }
            conn.fail(shown, started, &line);
        }
    }
}

type Queued = Result<(), (&'static str, String)>;

fn check_and_queue(conn: &mut Connection, name: &str, args: Vec<Bytes>) -> Queued {
    let Some(multi) = conn.multi.as_ref() else {
        return Err(("exec", "ERR no transaction is open".into()));
    };
    let size: usize = args.iter().map(|a| a.len()).sum();
    if multi.steps.len() >= QUEUED_MAX {
        return Err((
            "unknown",
            format!("ERR too many commands in one transaction (at most {QUEUED_MAX})"),
        ));
    }
    if multi.bytes + size > QUEUED_BYTES_MAX {
        return Err((
            "unknown",
            format!("ERR a transaction may queue at most {QUEUED_BYTES_MAX} bytes of arguments"),
        ));
    }
    let step = if let Some(cmd) = lookup(name) {
        let fail = |line: String| (cmd.name, line);
        if !super::arity_ok(cmd, args.len()) {
            return Err(fail(super::admit(conn, cmd, &args).err().unwrap_or_else(
                || format!("ERR wrong number of arguments for '{}' command", cmd.name),
            )));
        }
        if !conn.authenticated && !cmd.flags.contains(&"no_auth") {
            return Err(fail("NOAUTH Authentication required.".into()));
        }
        server_step(conn, cmd, args).map_err(fail)?
    } else if let Some(spec) = capdb_data::lookup(name) {
        let fail = |line: String| (spec.name, line);
        if !spec.arity_ok(args.len()) {
            return Err(fail(format!(
                "ERR wrong number of arguments for '{}' command",
                spec.name
            )));
        }
        if !conn.authenticated {
            return Err(fail("NOAUTH Authentication required.".into()));
        }
        data_step(conn, spec, args).map_err(fail)?
    } else {
        return Err(("unknown", unknown_command(&args)));
    };
    if let Step::Replay {
        name: "select",
        args,
        ..
    } = &step
    {
        // Later commands address the keyspace it selects; a SELECT that fails answers its
        // error at EXEC and changes nothing, as in Redis.
        let raw = String::from_utf8_lossy(&args[1]).into_owned();
        let found = if raw == "0" {
            conn.node.resp_keyspace()
        } else {
            conn.node.keyspace(&raw)
        };
        if let (Ok(ks), Some(m)) = (found, conn.multi.as_mut()) {
            m.keyspace = ks;
        }
    }
    if let Some(m) = conn.multi.as_mut() {
        m.bytes += size;
        m.steps.push(step);
    }
    Ok(())
}

/// The keyspace queued commands address now.
fn current_keyspace(conn: &Connection) -> Arc<Keyspace> {
    conn.multi
        .as_ref()
        .map_or_else(|| conn.keyspace.clone(), |m| m.keyspace.clone())
}

/// Checks that `keys` can join the transaction (size, shard, mode, `-MOVED`) and makes their
/// keyspace and shard its target.
fn place(
    conn: &mut Connection,
    keys: &[&Bytes],
    write: bool,
) -> Result<Option<(Arc<Keyspace>, u64)>, String> {
    let ks = current_keyspace(conn);
    ks.check_live().map_err(|e| error_line(&e))?;
    for k in keys {
        check_key(k).map_err(|e| error_line(&e))?;
    }
    let Some(first) = keys.first() else {
        return Ok(None);
    };
    if conn.cluster_mode {
        // `-MOVED` and same-slot rules are judged against the selected keyspace.
        let selected = std::mem::replace(&mut conn.keyspace, ks.clone());
        let moved = cluster::moved(conn, first, !write);
        let same = cluster::same_place(conn, keys);
        conn.keyspace = selected;
        if let Some(line) = moved {
            return Err(line);
        }
        if !same {
            return Err(super::data::CROSSSLOT.into());
        }
    }
    let shard = ks.txn_shard(first);
    if keys.iter().any(|k| ks.txn_shard(k) != shard) {
        return Err(super::data::CROSSSLOT.into());
    }
    let cluster_mode = conn.cluster_mode;
    let Some(multi) = conn.multi.as_mut() else {
        return Ok(None);
    };
    match &multi.target {
        None => multi.target = Some((ks.clone(), shard)),
        Some((target, _)) if target.spec.mode != ks.spec.mode => return Err(MIXED_MODES.into()),
        Some((target, s)) if !Arc::ptr_eq(target, &ks) || *s != shard => {
            // `cp` commits across shards and keyspaces; cluster-mode clients expect Redis
            // Cluster's rule, and `ap` and `cache` keep it.
            if ks.spec.mode != Mode::Cp || cluster_mode {
                return Err(super::data::CROSSSLOT.into());
            }
            multi.spread = true;
        }
        Some(_) => {}
    }
    Ok(Some((ks, shard)))
}

/// The step of a command of the server's own table.
fn server_step(
    conn: &mut Connection,
    cmd: &'static super::Command,
    args: Vec<Bytes>,
) -> Result<Step, String> {
    let keys_of = |args: &[Bytes]| -> Vec<Bytes> {
        let (first, last, step) = cmd.keys;
        if first < 1 {
            return Vec::new();
        }
        let n = args.len() as i64;
        let last = if last < 0 { n + last } else { last.min(n - 1) };
        (first..=last)
            .step_by(step.max(1) as usize)
            .filter_map(|i| args.get(i as usize).cloned())
            .collect()
    };
    match cmd.handler {
        Handler::Write(parse) => {
            let keys = keys_of(&args);
            let at = place(conn, &keys.iter().collect::<Vec<_>>(), true)?;
            let call = WriteCall {
                args: &args,
                now: conn.now_ms,
                value_max: conn.node.config.limits.value_bytes_max,
            };
            Ok(match parse(&call) {
                Ok((shape, mutations)) => Step::Keyed {
                    name: cmd.name,
                    mutations,
                    shape: KeyedShape::Write(shape),
                    at,
                },
                Err(error) => Step::Fixed {
                    name: cmd.name,
                    error,
                },
            })
        }
        // A change stream is no part of a transaction's state: reading it inside MULTI would
        // not be atomic with the rest (and BLOCK could hold EXEC up).
        _ if matches!(
            cmd.name,
            "xread"
                | "xreadgroup"
                | "xack"
                | "xgroup"
                | "xpending"
                | "xclaim"
                | "xautoclaim"
                | "xinfo"
        ) =>
        {
            Ok(Step::Fixed {
                name: cmd.name,
                error: format!(
                    "ERR {} cannot be queued in MULTI: change streams are read outside transactions",
                    cmd.name.to_ascii_uppercase()
                ),
            })
        }
        _ if cmd.flags.contains(&"blocking") => match blocking::in_transaction(cmd.name, &args) {
            Ok((attempt, keys, shape)) => {
                let at = place(conn, &keys.iter().collect::<Vec<_>>(), true)?;
                let key = keys.first().cloned().unwrap_or_default();
                Ok(Step::Keyed {
                    name: cmd.name,
                    mutations: vec![Mutation::Exec { key, args: attempt }],
                    shape: KeyedShape::Blocking(shape),
                    at,
                })
            }
            Err(error) => Ok(Step::Fixed {
                name: cmd.name,
                error,
            }),
        },
        _ if KEYED_READS.contains(&cmd.name) => {
            let keys = keys_of(&args);
            let at = place(conn, &keys.iter().collect::<Vec<_>>(), false)?;
            let mut internal = args;
            internal[0] = Bytes::from(format!("capdb.{}", cmd.name));
            Ok(Step::Keyed {
                name: cmd.name,
                mutations: vec![Mutation::Exec {
                    key: keys.first().cloned().unwrap_or_default(),
                    args: internal,
                }],
                shape: KeyedShape::Write(Shape::Plain),
                at,
            })
        }
        _ => Ok(Step::Replay {
            name: cmd.name,
            args,
            keyspace: current_keyspace(conn),
        }),
    }
}

/// The step of a data-type command: always keyed (reads included), run by the store.
fn data_step(
    conn: &mut Connection,
    spec: &'static capdb_data::Spec,
    args: Vec<Bytes>,
) -> Result<Step, String> {
    let Ok(indices) = spec.key_indices(&args) else {
        // An invalid numkeys: the command answers its own error when it runs.
        return Ok(Step::Fixed {
            name: spec.name,
            error: super::data::argument_error(&args),
        });
    };
    let keys: Vec<&Bytes> = indices.iter().filter_map(|&i| args.get(i)).collect();
    let at = place(conn, &keys, spec.is_write())?;
    let key = keys.first().map(|k| (*k).clone()).unwrap_or_default();
    if spec.is_write()
        && let Err(e) = capdb_data::dump::check_limits(&args)
    {
        // A RESTORE payload past capdb's decode budget never enters a log: this command
        // fails alone, as it would when run.
        return Ok(Step::Fixed {
            name: spec.name,
            error: error_line(&e),
        });
    }
    let args = if spec.is_write() {
        // Replicas replay the command later: relative times become absolute now.
        capdb_data::strings::absolutize(&args, conn.now_ms)
            .or_else(|| capdb_data::hash::absolutize(&args, conn.now_ms))
            .or_else(|| capdb_data::dump::absolutize(&args, conn.now_ms))
            .unwrap_or(args)
    } else {
        args
    };
    Ok(Step::Keyed {
        name: spec.name,
        mutations: vec![Mutation::Exec { key, args }],
        shape: KeyedShape::Write(Shape::Plain),
        at,
    })
}

/// `EXEC`. Besides the array of replies (or the null array after a watched key changed), a
/// whole EXEC can answer `-EXECABORT` (dirty: nothing ran), `-CROSSSLOT` (watched keys
/// elsewhere: nothing ran), `-TRYAGAIN` (no leader with a quorum: nothing ran) or
/// `-UNCERTAIN` (the transaction may have been applied: read before retrying).
pub(super) async fn exec(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    if conn.multi.is_none() {
        return Err("ERR EXEC without MULTI".into());
    }
    let ended = run_exec(conn, args).await;
    let outcome = match &ended {
        Ok(Ended::Ran) => "committed",
        Ok(Ended::WatchFailed) => "watch_aborted",
        Err(e) if e.starts_with("EXECABORT") => "discarded",
        Err(_) => "failed",
    };
    conn.node.metrics.transaction(outcome);
    ended.map(|_| ())
}

/// How an EXEC that did not answer an error ended.
enum Ended {
    Ran,
    /// A watched key changed: answered the null array, nothing ran.
    WatchFailed,
}

async fn run_exec(conn: &mut Connection, _args: &[Bytes]) -> Result<Ended, String> {
    let Some(multi) = conn.multi.take() else {
        return Err("ERR EXEC without MULTI".into());
    };
    // Every watch ends with this EXEC, whatever it answers.
    let watched = std::mem::take(&mut conn.watched);
    if multi.dirty {
        return Err(EXECABORT.into());
    }
    let Multi {
        steps,
        target,
        spread,
        ..
    } = *multi;
    // Where the keyed commands (and the watch guards) run.
    let target = match target {
        Some(t) => t,
        None => match watched.first() {
            Some(w) => match conn.node.keyspace(w.keyspace.as_str()) {
                Ok(ks) => (ks, w.shard),
                // The watched keyspace is gone: its keys changed.
                Err(_) => {
                    conn.out.null_array();
                    return Ok(Ended::WatchFailed);
                }
            },
            None => (conn.keyspace.clone(), 0),
        },
    };
    let elsewhere: Vec<&Watched> = watched
        .iter()
        .filter(|w| w.keyspace != target.0.spec.name || w.shard != target.1)
        .collect();
    // Watched keys on other shards join a `cp` transaction (their shards judge the guards);
    // elsewhere they are Redis Cluster's CROSSSLOT.
    let spread = spread || !elsewhere.is_empty();
    if !elsewhere.is_empty() {
        let all_cp = target.0.spec.mode == Mode::Cp
            && elsewhere.iter().all(|w| {
                conn.node
                    .keyspace(w.keyspace.as_str())
                    .is_ok_and(|ks| ks.spec.mode == Mode::Cp)
            });
        if !all_cp || conn.cluster_mode {
            return Err(super::data::CROSSSLOT.into());
        }
    }
    let guards: Vec<&Watched> = watched.iter().collect();
    // The keyed commands, cut into the parts between keyspace-wide commands.
    let mut parts: Vec<Part> = vec![Part::default()];
    let mut layout: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Keyed {
                name,
                mutations,
                shape,
                at,
            } => {
                let count = mutations.len();
                let part = parts.last_mut().expect("parts starts non-empty");
                let (ks, shard) = at.unwrap_or_else(|| target.clone());
                part.wake
                    .push((ks.clone(), crate::resp::written_keys(&mutations)));
                part.commands
                    .extend(mutations.into_iter().map(|m| (shard, m)));
                layout.push(Step::Keyed {
                    name,
                    mutations: Vec::with_capacity(count),
                    shape,
                    at: None,
                });
            }
            Step::Replay { name, .. } if KEYSPACE_WIDE.contains(&name) => {
                layout.push(step);
                parts.push(Part::default());
            }
            other => layout.push(other),
        }
    }
    let counts: Vec<usize> = layout
        .iter()
        .map(|s| match s {
            Step::Keyed { mutations, .. } => mutations.capacity(),
            _ => 0,
        })
        .collect();
    let mut parts = parts.into_iter();
    let runner = PartRunner {
        ks: target.0.clone(),
        spread,
        now: conn.now_ms,
        c: conn.consistency,
    };
    let first = parts.next().unwrap_or_default();
    let wake = first.wake;
    let mut replies = match runner.run(conn, first.commands, &guards).await {
        // Nothing ran (TRYAGAIN), or the client cannot know (UNCERTAIN): EXEC says so whole.
        Err(e) => return Err(error_line(&e)),
        Ok(None) => {
            conn.out.null_array();
            return Ok(Ended::WatchFailed);
        }
        Ok(Some(r)) => r.into_iter(),
    };
    drop(guards);
    drop(elsewhere);
    drop(watched);
    for (ks, written) in wake {
        conn.wake_blocked(&ks, written);
    }
    conn.out.array(layout.len());
    for (step, count) in layout.into_iter().zip(counts) {
        match step {
            Step::Keyed { name, shape, .. } => {
                let mine: Vec<_> = replies.by_ref().take(count).collect();
                match shaped(&shape, mine) {
                    Ok(r) => {
                        conn.out.reply(&r);
                        conn.done(name, conn.batch_started, false);
                    }
                    Err(line) => conn.fail(name, conn.batch_started, &line),
                }
            }
            Step::Fixed { name, error } => conn.fail(name, conn.batch_started, &error),
            Step::Replay {
                name,
                args,
                keyspace,
            } => {
                let selected = std::mem::replace(&mut conn.keyspace, keyspace);
                Box::pin(super::execute(conn, name, args, conn.batch_started)).await;
                if name != "select" {
                    conn.keyspace = selected;
                }
                if KEYSPACE_WIDE.contains(&name) {
                    // The next part runs after it, without the watch guards (already judged).
                    let part = parts.next().unwrap_or_default();
                    let n = part.commands.len();
                    replies = match runner.run(conn, part.commands, &[]).await {
                        Ok(Some(r)) => r.into_iter(),
                        Ok(None) => Vec::new().into_iter(),
                        Err(e) => vec![Err(e); n].into_iter(),
                    };
                    for (ks, written) in part.wake {
                        conn.wake_blocked(&ks, written);
                    }
                }
            }
        }
    }
    Ok(Ended::Ran)
}

/// The keyed commands between two keyspace-wide commands of a transaction.
#[derive(Default)]
struct Part {
    /// Each mutation with its shard.
    commands: Vec<(u64, Mutation)>,
    /// The keys to wake blocked clients on, by keyspace, once it ran.
    wake: Vec<(Arc<Keyspace>, Vec<Bytes>)>,
}

/// How an EXEC's parts run: as one step of the target keyspace's store, or, `spread` over
/// several `cp` shards, as a cross-shard transaction.
struct PartRunner {
    ks: Arc<Keyspace>,
    spread: bool,
    now: u64,
    c: crate::node::Consistency,
}

impl PartRunner {
    async fn run(
        &self,
        conn: &Connection,
        commands: Vec<(u64, Mutation)>,
        guards: &[&Watched],
    ) -> capdb_types::Result<Option<capdb_storage::BatchReplies>> {
        if self.spread {
            Keyspace::transact_across(&conn.node.txns, commands, guards, self.now).await
        } else {
            let mutations = commands.into_iter().map(|(_, m)| m).collect();
            self.ks.transact(mutations, guards, self.now, self.c).await
        }
    }
}

/// A keyed command's reply from its mutations' replies.
fn shaped(shape: &KeyedShape, replies: Vec<capdb_types::Result<Reply>>) -> Result<Reply, String> {
    if let Some(Err(e)) = replies.iter().find(|r| r.is_err()) {
        return Err(error_line(e));
    }
    let mut ok = replies.into_iter().filter_map(Result::ok);
    Ok(match shape {
        KeyedShape::Blocking(b) => b.reply(ok.next().unwrap_or(Reply::NilArray)),
        KeyedShape::Write(Shape::Plain) => ok.next().unwrap_or(Reply::Nil),
        KeyedShape::Write(Shape::SumIntegers) => Reply::Integer(
            ok.map(|r| if let Reply::Integer(n) = r { n } else { 0 })
                .sum(),
        ),
        KeyedShape::Write(Shape::AllOk) => Reply::Ok,
        KeyedShape::Write(Shape::SetFlag) => Reply::Integer(ok.any(|r| r == Reply::Ok) as i64),
    })
}
