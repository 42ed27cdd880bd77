//! The replica side: what a node does with `ap` requests addressed to it, on its local table.

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

/// Bucket hashes of one shard's keys in the local table, of versions written at or before
/// `before_ms` (`u64::MAX`: all).
pub fn digest(ap: &Ap, keyspace: &str, slots: Slots, before_ms: u64) -> Result<Vec<u64>> {
    let now = capdb_types::unix_now_ms();
    let mut buckets = vec![0u64; BUCKETS as usize];
    ap.table(keyspace).for_each_raw(|k, v| {
        if in_slots(k, slots) && compared(&v, now) && v.header.timestamp.physical_ms() <= before_ms
        {
            let b = bucket_of(k) as usize;
            buckets[b] = buckets[b].wrapping_add(hash64(&[k, &fingerprint(&v).to_le_bytes()]));
        }
        true
    })?;
    Ok(buckets)
}

/// (key, fingerprint) of one shard's keys in the given buckets.
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
    ap.table(keyspace).for_each_raw(|k, v| {
        if in_slots(k, slots)
            && compared(&v, now)
            && v.header.timestamp.physical_ms() <= before_ms
            && wanted.contains(&bucket_of(k))
        {
            out.push((Bytes::copy_from_slice(k), fingerprint(&v)));
        }
        true
    })?;
    Ok(out)
}

/// Merges versions into the local table (durably), first counting what the reconciliation
/// report says about collections: a list version lost to a concurrent one, a type conflict.
/// Only incoming collection versions are examined (one extra local read each).
pub(crate) async fn merge_counted(
    ap: &Ap,
    keyspace: &str,
    entries: Vec<(Bytes, Value)>,
) -> Result<u64> {
    let table = ap.table(keyspace);
    let mut found = capdb_types::composite::Conflicts::default();
    for (k, v) in &entries {
        if !capdb_types::composite::is_composite(v) {
            continue;
        }
        if let Some(current) = table.get_raw(k)? {
            let (_, c) = capdb_types::composite::merge_counting(&current, v);
            found.list_versions_lost += c.list_versions_lost;
            found.type_conflicts += c.type_conflicts;
        }
    }
    ap.stats.collection_conflicts(keyspace, found);
    table.merge(entries).await
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
                .map(|k| t.get_raw(k))
                .collect::<Result<Vec<_>>>()?;
            Ok(ApResponse::Values(values))
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
        ApRequest::Purge { keyspace, entries } => {
            check_table(ap, &keyspace)?;
            let n = ap.table(&keyspace).purge_tombstones(entries).await?;
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
        .for_each_raw_after(after.as_deref(), |k, v| {
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
