//! The data-type commands (hashes, lists, sets, sorted sets, and the string and key commands
//! built with them): their rows live in `capdb_data`'s tables; this file admits them (arity,
//! authentication, key limits, `-MOVED`, `-CROSSSLOT`) and hands them to the keyspace: a write
//! is queued as one [`Mutation::Exec`] with the connection's other writes, a read runs at once
//! where the data is.

use std::time::Instant;

use bytes::Bytes;
use capdb_data::{Run, Spec};
use capdb_types::Mutation;
use capdb_types::limits::check_key;

use super::{Outcome, error_line};
use crate::resp::{Connection, Shape, cluster};

/// Redis Cluster's wording: clients recognise it.
pub(super) const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// Runs (or, for a write, queues) a data-type command.
pub(super) async fn execute(
    conn: &mut Connection,
    spec: &'static Spec,
    args: Vec<Bytes>,
    started: Instant,
) {
    let key = match admit(conn, spec, &args) {
        Ok(key) => key,
        Err(line) => {
            conn.flush_pending().await;
            return conn.fail(spec.name, started, &line);
        }
    };
    match spec.run {
        Run::Write(_) => {
            // A RESTORE payload past capdb's decode budget never enters a log.
            if let Err(e) = capdb_data::dump::check_limits(&args) {
                conn.flush_pending().await;
                return conn.fail(spec.name, started, &error_line(&e));
            }
            // Replicas replay the command later: relative times become absolute now.
            let args = capdb_data::strings::absolutize(&args, conn.now_ms)
                .or_else(|| capdb_data::hash::absolutize(&args, conn.now_ms))
                .or_else(|| capdb_data::dump::absolutize(&args, conn.now_ms))
                .unwrap_or(args);
            let key = key.unwrap_or_default();
            let m = Mutation::Exec { key, args };
            conn.queue(spec.name, Shape::Plain, std::iter::once(m), started)
                .await;
        }
        // A pipeline's reads of a replicated keyspace run together (see `resp/mod.rs`).
        Run::Read(_) if !conn.keyspace.is_local() => {
            conn.queue_query(spec.name, args, started).await;
        }
        Run::Read(_) => {
            conn.flush_pending().await;
            let (ks, now, c) = (conn.keyspace.clone(), conn.now_ms, conn.consistency);
            let outcome: Outcome = match ks.query(args, now, c).await {
                Ok(reply) => {
                    conn.out.reply(&reply);
                    Ok(())
                }
                Err(e) => Err(error_line(&e)),
            };
            match outcome {
                Ok(()) => conn.done(spec.name, started, false),
                Err(line) => conn.fail(spec.name, started, &line),
            }
        }
    }
}

/// Arity, authentication, key limits, and where the keys are; the first key, if any.
fn admit(conn: &Connection, spec: &Spec, args: &[Bytes]) -> Result<Option<Bytes>, String> {
    if !spec.arity_ok(args.len()) {
        return Err(format!(
            "ERR wrong number of arguments for '{}' command",
            spec.name
        ));
    }
    if !conn.authenticated {
        return Err("NOAUTH Authentication required.".into());
    }
    // An invalid numkeys: the command answers its own error (on nothing, it touches no data).
    // Inline up to a few keys: this runs for every data-type command.
    let mut keys: smallvec::SmallVec<[&Bytes; 4]> = smallvec::SmallVec::new();
    if spec
        .each_key_index(args, |i| keys.extend(args.get(i)))
        .is_err()
    {
        return Err(argument_error(args));
    }
    for k in &keys {
        check_key(k).map_err(|e| error_line(&e))?;
    }
    let Some(first) = keys.first() else {
        return Ok(None);
    };
    if let Some(line) = cluster::moved(conn, first, !spec.is_write()) {
        return Err(line);
    }
    if !cluster::same_place(conn, &keys) {
        return Err(CROSSSLOT.into());
    }
    Ok(Some((*first).clone()))
}

/// The error a command with invalid arguments answers, found by running it on no data.
pub(super) fn argument_error(args: &[Bytes]) -> String {
    let cx = capdb_data::Ctx {
        now_ms: 0,
        timestamp: capdb_types::Timestamp::ZERO,
        seed: 0,
        value_bytes_max: 0,
    };
    match capdb_data::execute(args, &mut capdb_data::testing::EmptySpace, &cx) {
        Err(e) => error_line(&e),
        Ok(_) => "ERR syntax error".into(),
    }
}
