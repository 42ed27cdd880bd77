//! The replica side: what a node does with `ap` requests addressed to it, on its local table.
//!
//! The table stores each key in the split form (`capdb_storage`'s `disk/ap.rs`): a head record
//! and one record per collection element. Reads assemble a key whole; anti-entropy compares
//! records one by one (an element record falls in its key's bucket), so a replica missing one
//! element is sent that element, not the collection.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use capdb_types::{Error, Result, Value};

use super::Ap;
use super::messages::{ApRequest, ApResponse, Slots};

/// Leaves of a shard's anti-entropy tree: keys hash into this many buckets.
pub const BUCKETS: u32 = 1024;
/// Most keys one scan page returns.
const SCAN_PAGE_MAX: u32 = 10_000;

fn hash64(parts: &[&[u8]]) -> u64 {
    // SipHash with fixed keys: the same on every node running this binary.
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// The bucket a key falls in.
pub fn bucket_of(key: &[u8]) -> u32 {
    (hash64(&[key]) % BUCKETS as u64) as u32
}

/// A version's fingerprint: equal fingerprints mean equal versions.
pub fn fingerprint(v: &Value) -> u64 {
    hash64(&[&v.encode()])
}

fn in_slots(key: &[u8], slots: Slots) -> bool {
    let s = capdb_cluster::slots::key_slot(key);
    s >= slots.0 && s <= slots.1
}

/// Whether anti-entropy compares this version: all of them. Expired values too: leaving them
/// out would let an older value on another replica look like the only one and come back; the
/// expiry sweep turns them into tombstones, which merge like deletes.
fn compared(_v: &Value, _now_ms: u64) -> bool {
    true
}

/// Bucket hashes of one shard's records in the local table (heads and element records, each
/// in its key's bucket), of records written at or before `before_ms` (`u64::MAX`: all).
pub fn digest(ap: &Ap, keyspace: &str, slots: Slots, before_ms: u64) -> Result<Vec<u64>> {
    let now = capdb_types::unix_now_ms();
    let mut buckets = vec![0u64; BUCKETS as usize];
    ap.table(keyspace).ap_for_each_record(|r| {
        if in_slots(r.key, slots)
            && compared(&r.value, now)
            && r.value.header.timestamp.physical_ms() <= before_ms
        {
            let b = bucket_of(r.key) as usize;
            buckets[b] =
                buckets[b].wrapping_add(hash64(&[&r.id, &fingerprint(&r.value).to_le_bytes()]));
        }
        true
    })?;
    Ok(buckets)
}

/// (record id, fingerprint) of one shard's records in the given buckets (see [`digest`]).
pub fn fingerprints(
    ap: &Ap,
    keyspace: &str,
    slots: Slots,
    buckets: &[u32],
    before_ms: u64,
) -> Result<Vec<(Bytes, u64)>> {
    let wanted: std::collections::HashSet<u32> = buckets.iter().copied().collect();
    let now = capdb_types::unix_now_ms();
    let mut out = Vec::new();
    ap.table(keyspace).ap_for_each_record(|r| {
        if in_slots(r.key, slots)
            && compared(&r.value, now)
            && r.value.header.timestamp.physical_ms() <= before_ms
            && wanted.contains(&bucket_of(r.key))
        {
            out.push((Bytes::from(r.id), fingerprint(&r.value)));
        }
        true
    })?;
    Ok(out)
}

/// Merges versions (plain versions or composite deltas) into the local table (durably), and
/// counts what the reconciliation report says about them: a list version lost to a concurrent
/// one, a type conflict, the bytes stored.
pub(crate) async fn merge_counted(
    ap: &Ap,
    keyspace: &str,
    entries: Vec<(Bytes, Value)>,
) -> Result<u64> {
    let outcome = ap.table(keyspace).ap_merge(entries).await?;
    ap.stats.collection_conflicts(keyspace, outcome.conflicts);
    ap.stats.merged(keyspace, outcome.stored_bytes);
    Ok(outcome.changed)
}

/// Serves one `ap` request addressed to this node, on its local table.
pub(super) async fn handle(ap: &Arc<Ap>, request: ApRequest) -> Result<ApResponse> {
    match request {
        ApRequest::Ping => Ok(ApResponse::Pong),
        ApRequest::Merge { keyspace, entries } => {
            check_table(ap, &keyspace)?;
            Ok(ApResponse::Count(
                merge_counted(ap, &keyspace, entries).await?,
            ))
        }
        ApRequest::Read { keyspace, keys } => {
            check_table(ap, &keyspace)?;
            let t = ap.table(&keyspace);
            let values = keys
                .iter()
                .map(|k| t.ap_get(k))
                .collect::<Result<Vec<_>>>()?;
            Ok(ApResponse::Values(values))
        }
        ApRequest::ReadPart {
            keyspace,
            key,
            kind,
            subs,
        } => {
            check_table(ap, &keyspace)?;
            Ok(ApResponse::Part(
                ap.table(&keyspace).ap_get_part(&key, kind, &subs)?,
            ))
        }
        ApRequest::ReadRecords { keyspace, ids } => {
            check_table(ap, &keyspace)?;
            Ok(ApResponse::Records(
                ap.table(&keyspace).ap_read_records(&ids)?,
            ))
        }
        ApRequest::CounterAdd {
            keyspace,
            key,
            delta,
            timestamp,
            now_ms,
        } => {
            check_table(ap, &keyspace)?;
            ap.hlc.observe(timestamp);
            let v = ap
                .table(&keyspace)
                .counter_add(key, ap.me, delta, ap.hlc.now(), now_ms)
                .await?;
            Ok(ApResponse::Value(v))
        }
        ApRequest::Hint {
            target,
            keyspace,
            entries,
        } => {
            ap.hints.store(target, &keyspace, entries).await?;
            ap.stats.hint_stored(&keyspace);
            Ok(ApResponse::Count(1))
        }
        ApRequest::Digest {
            keyspace,
            slots,
            before_ms,
        } => {
            check_table(ap, &keyspace)?;
            let ap = ap.clone();
            let d = tokio::task::spawn_blocking(move || digest(&ap, &keyspace, slots, before_ms))
                .await
                .map_err(|e| Error::Io(e.to_string()))??;
            Ok(ApResponse::Digest(d))
        }
        ApRequest::Fingerprints {
            keyspace,
            slots,
            buckets,
            before_ms,
        } => {
            check_table(ap, &keyspace)?;
            let ap = ap.clone();
            let f = tokio::task::spawn_blocking(move || {
                fingerprints(&ap, &keyspace, slots, &buckets, before_ms)
            })
            .await
            .map_err(|e| Error::Io(e.to_string()))??;
            Ok(ApResponse::Fingerprints(f))
        }
        ApRequest::Scan {
            keyspace,
            slots,
            after,
            prefix,
            limit,
            now_ms,
        } => {
            check_table(ap, &keyspace)?;
            scan_page(ap, &keyspace, slots, after, prefix, limit, now_ms)
        }
        ApRequest::Purge {
            keyspace,
            entries,
            elements,
        } => {
            check_table(ap, &keyspace)?;
            let n = ap
                .table(&keyspace)
                .purge_tombstones(entries, elements)
                .await?;
            ap.stats.tombstones_purged(&keyspace, n);
            Ok(ApResponse::Count(n))
        }
        ApRequest::Stats => Ok(ApResponse::Stats(ap.stats_json().to_string())),
    }
}

/// One page of a scan of the shard `slots` of `keyspace`: the live entries after `after`
/// (matching `prefix`), rendered, at most `limit` (clamped to 1..=[`SCAN_PAGE_MAX`]), with the
/// key the next page starts after (`None` at the end).
fn scan_page(
    ap: &Ap,
    keyspace: &str,
    slots: Slots,
    after: Option<Bytes>,
    prefix: Option<Bytes>,
    limit: u32,
    now_ms: u64,
) -> Result<ApResponse> {
    let limit = limit.clamp(1, SCAN_PAGE_MAX) as usize;
    let mut entries = Vec::new();
    let mut next = None;
    let mut result = Ok(());
    // Bounded work per page: at most this many records examined.
    let mut examined = 0usize;
    ap.table(keyspace)
        .ap_for_each_key(after.as_deref(), |k, v| {
            examined += 1;
            let wanted = prefix.as_ref().is_none_or(|p| k.starts_with(p))
                && in_slots(k, slots)
                && v.is_live(now_ms);
            if wanted {
                match capdb_types::merge::render(v) {
                    Ok(v) => entries.push((Bytes::copy_from_slice(k), v)),
                    Err(e) => {
                        result = Err(e);
                        return false;
                    }
                }
                if entries.len() >= limit {
                    next = Some(Bytes::copy_from_slice(k));
                    return false;
                }
            }
            // This key is done either way: the next page starts after it.
            if examined >= 100_000 {
                next = Some(Bytes::copy_from_slice(k));
                return false;
            }
            true
        })?;
    result?;
    Ok(ApResponse::Page(entries, next))
}

/// The keyspace must exist here (a node learns of a new keyspace from the map shortly after
/// it is created; until then it refuses, and the coordinator hints or retries).
fn check_table(ap: &Ap, keyspace: &str) -> Result<()> {
    let name = capdb_types::KeyspaceName::new(keyspace)?;
    if ap.state().keyspaces.contains_key(&name) {
        Ok(())
    } else {
        Err(Error::KeyspaceNotFound(keyspace.to_string()))
    }
}
