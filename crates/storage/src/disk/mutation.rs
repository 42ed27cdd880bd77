//! One client mutation under the writer: Redis semantics come from [`Mutation::apply`]; this
//! part reads the stored value, writes the effect (a tombstone instead of a removal in `ap`
//! tables), and decides what a corrupt stored value allows.

use std::sync::atomic::Ordering;

use capdb_data::meta::CollMeta;
use capdb_types::{Effect, Mutation, Reply, Result, Timestamp, Value};
use redb::ReadableTable;

use super::io_err;
use super::ops::Exec;
use super::space::TxnSpace;

/// The seed of a data-type command's random choices: a function of its timestamp, which in a
/// `cp` shard is the leader's and the same on every replica.
pub(crate) fn seed_of(timestamp: Timestamp) -> u64 {
    let mut z = timestamp.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether `m` replaces its key's value without reading it: the writes that may replace a
/// corrupt value (how an operator repairs a key), with DEL.
pub(super) fn overwrites_blindly(m: &Mutation) -> bool {
    matches!(
        m,
        Mutation::Set {
            condition: capdb_types::mutation::Condition::Always,
            return_old: false,
            expiry: capdb_types::mutation::ExpiryUpdate::Clear
                | capdb_types::mutation::ExpiryUpdate::At(_),
            ..
        }
    )
}

/// What a key-level mutation (not a data-type command) left on its key, for the change log
/// (`changes.rs`), so it need not read the key back.
pub(super) enum Written {
    Put(Value),
    Removed,
}

/// Applies one mutation inside the writer's transaction. `Err` only for storage failures
/// (which abort the batch); semantic failures come back as `Ok(Err(..))`. `changed`, when
/// given, receives the keys the mutation changed (WATCH's touched rows); `written`, when
/// given, what a key-level mutation that changed its key left there; `prior`, when given,
/// the record a key-level mutation found (expired or not; `None`: none, or corrupt), which
/// views count from without reading the key again.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_one<'txn>(
    x: &Exec<'txn>,
    table: &str,
    t: &mut redb::Table<'txn, &'static [u8], &'static [u8]>,
    m: &Mutation,
    tombstones: bool,
    now_ms: u64,
    timestamp: Option<Timestamp>,
    changed: Option<&mut Vec<bytes::Bytes>>,
    written: Option<&mut Option<Written>>,
    prior: Option<&mut Option<Value>>,
) -> Result<Result<Reply>> {
    let stamp = || timestamp.unwrap_or_else(|| x.hlc.now());
    let key = &m.key()[..];
    if let Mutation::Exec { args, .. } = m {
        let ts = stamp();
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: ts,
            seed: seed_of(ts),
            value_bytes_max: x.value_bytes_max,
        };
        let mut space = TxnSpace::new(x, table, t, now_ms);
        let ran = match changed {
            Some(changed) => {
                let mut tracking = super::touched::Tracking {
                    inner: &mut space,
                    changed,
                };
                let ran = capdb_data::execute(args, &mut tracking, &cx);
                // The active expiry removes records that are no longer live: each key it
                // names in its reply was removed (a change WATCH must see).
                if args.first().is_some_and(|n| {
                    n.eq_ignore_ascii_case(capdb_data::command::EXPIRED_COMMAND.as_bytes())
                }) && let Ok(Reply::Array(removed)) = &ran
                {
                    for r in removed {
                        if let Reply::Bulk(k) = r {
                            tracking.changed.push(k.clone());
                        }
                    }
                }
                ran
            }
            None => capdb_data::execute(args, &mut space, &cx),
        };
        return match ran {
            // Storage failures abort the batch; everything else is the command's answer.
            Err(e @ capdb_types::Error::Io(_)) => Err(e),
            other => Ok(other),
        };
    }
    let stored = t
        .get(key)
        .map_err(io_err)?
        .map(|raw| Value::decode(raw.value()));
    if let (Some(p), Some(Ok(v))) = (prior, &stored) {
        *p = Some(v.clone());
    }
    let current = match &stored {
        None => None,
        Some(Ok(v)) => v.is_live(now_ms).then(|| v.clone()),
        Some(Err(corrupt)) => {
            x.stats.corruptions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %corrupt, "corrupt value met by a write");
            let corrupt = corrupt.clone();
            // A write that does not depend on the old value may replace a corrupt one (this is
            // how an operator repairs a key); anything that would read it fails.
            match m {
                m if overwrites_blindly(m) => None,
                Mutation::Delete { .. } => {
                    if let Some(changed) = changed {
                        changed.push(m.key().clone());
                    }
                    remove(t, key, tombstones, stamp())?;
                    return Ok(Ok(Reply::Integer(1)));
                }
                _ => return Ok(Err(corrupt)),
            }
        }
    };
    let (effect, reply) = match m.apply(current.as_ref(), now_ms, stamp(), x.value_bytes_max) {
        Ok(done) => done,
        Err(e) => return Ok(Err(e)),
    };
    // A string write replacing a collection (SET over a hash, DEL, EXPIRE in the past, or an
    // expired collection's record) reclaims its elements.
    let replaced = match (&stored, &effect) {
        (_, Effect::Unchanged) => None,
        (Some(Ok(old)), Effect::Put(new)) => CollMeta::of(old).ok().flatten().filter(|o| {
            CollMeta::of(new)
                .ok()
                .flatten()
                .is_none_or(|n| n.id != o.id)
        }),
        (Some(Ok(old)), Effect::Remove(_)) => CollMeta::of(old).ok().flatten(),
        _ => None,
    };
    if replaced.is_some() {
        let mut space = TxnSpace::new(x, table, t, now_ms);
        space.replacing(key, None)?;
    }
    if let (Some(changed), false) = (changed, matches!(effect, Effect::Unchanged)) {
        changed.push(m.key().clone());
    }
    match effect {
        Effect::Unchanged => {}
        Effect::Put(v) => {
            t.insert(key, &v.encode()[..]).map_err(io_err)?;
            if let Some(w) = written {
                *w = Some(Written::Put(v));
            }
        }
        Effect::Remove(ts) => {
            remove(t, key, tombstones, ts)?;
            if let Some(w) = written {
                *w = Some(Written::Removed);
            }
        }
    }
    Ok(Ok(reply))
}

fn remove(
    t: &mut redb::Table<&'static [u8], &'static [u8]>,
    key: &[u8],
    tombstones: bool,
    ts: capdb_types::Timestamp,
) -> Result<()> {
    if tombstones {
        t.insert(key, &Value::tombstone(ts).encode()[..])
            .map_err(io_err)?;
    } else {
        t.remove(key).map_err(io_err)?;
    }
    Ok(())
}
