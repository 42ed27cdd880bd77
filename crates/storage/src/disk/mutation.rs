//! One client mutation under the writer: Redis semantics come from [`Mutation::apply`]; this
//! part reads the stored value, writes the effect (a tombstone instead of a removal in `ap`
//! tables), and decides what a corrupt stored value allows.

use std::sync::atomic::Ordering;

use capdb_types::{Effect, Mutation, Reply, Result, Timestamp, Value};
use redb::ReadableTable;

use super::io_err;
use super::ops::Exec;

/// Applies one mutation inside the writer's transaction. `Err` only for storage failures
/// (which abort the batch); semantic failures come back as `Ok(Err(..))`.
pub(super) fn apply_one(
    x: &Exec,
    t: &mut redb::Table<&'static [u8], &'static [u8]>,
    m: &Mutation,
    tombstones: bool,
    now_ms: u64,
    timestamp: Option<Timestamp>,
) -> Result<Result<Reply>> {
    let stamp = || timestamp.unwrap_or_else(|| x.hlc.now());
    let key = &m.key()[..];
    let stored = t
        .get(key)
        .map_err(io_err)?
        .map(|raw| Value::decode(raw.value()));
    let current = match stored {
        None => None,
        Some(Ok(v)) => v.is_live(now_ms).then_some(v),
        Some(Err(corrupt)) => {
            x.stats.corruptions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %corrupt, "corrupt value met by a write");
            // A write that does not depend on the old value may replace a corrupt one (this is
            // how an operator repairs a key); anything that would read it fails.
            match m {
                Mutation::Set {
                    condition: capdb_types::mutation::Condition::Always,
                    return_old: false,
                    expiry:
                        capdb_types::mutation::ExpiryUpdate::Clear
                        | capdb_types::mutation::ExpiryUpdate::At(_),
                    ..
                } => None,
                Mutation::Delete { .. } => {
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
    match effect {
        Effect::Unchanged => {}
        Effect::Put(v) => {
            t.insert(key, &v.encode()[..]).map_err(io_err)?;
        }
        Effect::Remove(ts) => remove(t, key, tombstones, ts)?,
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
