//! Anti-entropy: replicas of each `ap` shard compare and exchange what differs, in the
//! background, under a bandwidth budget; and the reconciliation report.
//!
//! For each shard and each pair of its replicas, the lower-id replica runs a session:
//! 1. both sides hash their records of the shard into [`BUCKETS`](super::replica::BUCKETS)
//!    buckets (the leaves of a one-level Merkle tree: 8 KiB per shard on the wire); a record is
//!    a key's head or one element of its collection, in its key's bucket;
//! 2. for the buckets that differ, both sides list (record id, version fingerprint);
//! 3. only the records whose fingerprints differ travel, each way, and merge on arrival (one
//!    missing hash field sends that field, not the hash).
//!
//! Passes run every `anti_entropy_interval` and right after a peer recovers. Tombstones are
//! collected by a shard's lowest-id replica when a pass found every replica in sync and they are
//! older than `tombstone_grace` (so every replica holds them and no delayed hint can bring an
//! older value back).
//!
//! The report counts, per keyspace: keys compared, keys repaired (missing on one side and
//! copied), conflicts (present on both sides with different versions) (anti-entropy counts
//! records, heads and elements, under these names) and how many of those
//! were resolved by the merge, read repairs, hints stored and delivered; and *episodes*: from the
//! first divergence this node saw to the pass that found everything in sync again, with the
//! time convergence took (also logged).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_cluster::state::ShardInfo;
use capdb_types::{Error, Mode, Result, Value};
use serde::Serialize;
use serde_json::json;

use super::messages::{ApRequest, ApResponse, Slots};
use super::replica::{digest, fingerprints};
use super::{Ap, MERGE_BATCH_KEYS, REPLICA_TIMEOUT};

/// Episodes remembered per keyspace.
const EPISODES_KEPT: usize = 20;
/// Most keys, and most element records, one tombstone collection purges (the next one goes on).
const COLLECT_MAX: usize = 100_000;
/// Tombstone collection runs every this many passes.
const GC_EVERY_PASSES: u64 = 6;

/// A token bucket in bytes per second (burst: one second's worth).
pub struct Budget {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    pub fn new(bytes_per_sec: u64) -> Budget {
        let rate = bytes_per_sec.max(1024) as f64;
        Budget {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.rate);
            s.1 = now;
            s.0 -= bytes as f64;
            if s.0 >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-s.0 / self.rate))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub keys_compared: u64,
    pub keys_repaired: u64,
    pub conflicts: u64,
    pub resolved: u64,
    pub read_repairs: u64,
    pub hints_stored: u64,
    pub hints_delivered: u64,
    pub tombstones_purged: u64,
    /// Merges that discarded a list version written concurrently with the one kept (a list is
    /// one register in `ap`: the discarded side's pushes and pops are lost). Counted by each
    /// replica that merged it.
    pub list_versions_lost: u64,
    /// Merges that met two types written concurrently to one key (the later wins).
    pub type_conflicts: u64,
    /// Bytes merges stored in this node's tables (heads and element records written): a write
    /// of k collection elements stores O(k), whatever the collection's size.
    pub merge_bytes_stored: u64,
}

impl Counts {
    fn minus(self, o: Counts) -> Counts {
        Counts {
            keys_compared: self.keys_compared - o.keys_compared,
            keys_repaired: self.keys_repaired - o.keys_repaired,
            conflicts: self.conflicts - o.conflicts,
            resolved: self.resolved - o.resolved,
            read_repairs: self.read_repairs - o.read_repairs,
            hints_stored: self.hints_stored - o.hints_stored,
            hints_delivered: self.hints_delivered - o.hints_delivered,
            tombstones_purged: self.tombstones_purged - o.tombstones_purged,
            list_versions_lost: self.list_versions_lost - o.list_versions_lost,
            type_conflicts: self.type_conflicts - o.type_conflicts,
            merge_bytes_stored: self.merge_bytes_stored - o.merge_bytes_stored,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    /// When this node first saw divergence (a hint stored, a stale replica, differing digests).
    pub started_ms: u64,
    /// When the peers came back (the latest recovery the failure detector saw), if during
    /// the episode.
    pub healed_ms: Option<u64>,
    pub converged_ms: u64,
    /// From the heal (or the first divergence, without one) to replicas in sync.
    pub convergence_ms: u64,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Default)]
struct KsStats {
    totals: Counts,
    /// Set while this node knows of divergence: when it began and the totals then.
    divergent: Option<(u64, Counts)>,
    episodes: VecDeque<Episode>,
    last_pass_in_sync: Option<bool>,
}

#[derive(Default)]
pub struct Stats {
    by_keyspace: Mutex<HashMap<String, KsStats>>,
}

impl Stats {
    fn with(&self, ks: &str, f: impl FnOnce(&mut KsStats)) {
        let mut m = self.by_keyspace.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(ks.to_string()).or_default());
    }

    /// Marks divergence seen now (the start of an episode, if none is open).
    fn diverged(&self, ks: &str) {
        self.with(ks, |s| {
            if s.divergent.is_none() {
                s.divergent = Some((capdb_types::unix_now_ms(), s.totals));
            }
        });
    }

    pub fn read_repaired(&self, ks: &str, n: u64) {
        self.diverged(ks);
        self.with(ks, |s| s.totals.read_repairs += n);
    }

    pub fn hint_stored(&self, ks: &str) {
        self.diverged(ks);
        self.with(ks, |s| s.totals.hints_stored += 1);
    }

    pub fn hints_delivered(&self, ks: &str, n: u64) {
        self.with(ks, |s| s.totals.hints_delivered += n);
    }

    /// What merging collections found (see [`Counts::list_versions_lost`]).
    pub fn collection_conflicts(&self, ks: &str, c: capdb_types::composite::Conflicts) {
        if c.list_versions_lost + c.type_conflicts == 0 {
            return;
        }
        self.diverged(ks);
        self.with(ks, |s| {
            s.totals.list_versions_lost += c.list_versions_lost;
            s.totals.type_conflicts += c.type_conflicts;
        });
    }

    /// Bytes a merge stored (not a sign of divergence: every write is merged).
    pub fn merged(&self, ks: &str, bytes: u64) {
        self.with(ks, |s| s.totals.merge_bytes_stored += bytes);
    }

    pub fn tombstones_purged(&self, ks: &str, n: u64) {
        self.with(ks, |s| s.totals.tombstones_purged += n);
    }

    fn session(&self, ks: &str, compared: u64, repaired: u64, conflicts: u64) {
        if repaired + conflicts > 0 {
            self.diverged(ks);
        }
        self.with(ks, |s| {
            s.totals.keys_compared += compared;
            s.totals.keys_repaired += repaired;
            s.totals.conflicts += conflicts;
            s.totals.resolved += conflicts;
        });
    }

    /// Ends a pass over a keyspace: when everything was in sync, an open episode closes.
    fn pass(&self, ks: &str, in_sync: bool, last_recovery_ms: u64) {
        self.with(ks, |s| {
            s.last_pass_in_sync = Some(in_sync);
            if !in_sync {
                if s.divergent.is_none() {
                    s.divergent = Some((capdb_types::unix_now_ms(), s.totals));
                }
                return;
            }
            if let Some((started, base)) = s.divergent.take() {
                let now = capdb_types::unix_now_ms();
                let healed = (last_recovery_ms >= started).then_some(last_recovery_ms);
                let e = Episode {
                    started_ms: started,
                    healed_ms: healed,
                    converged_ms: now,
                    convergence_ms: now.saturating_sub(healed.unwrap_or(started)),
                    counts: s.totals.minus(base),
                };
                tracing::info!(
                    keyspace = ks,
                    convergence_ms = e.convergence_ms,
                    compared = e.counts.keys_compared,
                    repaired = e.counts.keys_repaired,
                    conflicts = e.counts.conflicts,
                    resolved = e.counts.resolved,
                    hints_delivered = e.counts.hints_delivered,
                    read_repairs = e.counts.read_repairs,
                    "ap keyspace reconciled: replicas in sync again"
                );
                if s.episodes.len() == EPISODES_KEPT {
                    s.episodes.pop_front();
                }
                s.episodes.push_back(e);
            }
        });
    }

    pub fn to_json(&self, hints: &super::hints::Hints) -> serde_json::Value {
        let m = self.by_keyspace.lock().unwrap_or_else(|p| p.into_inner());
        let keyspaces: BTreeMap<&String, serde_json::Value> = m
            .iter()
            .map(|(k, s)| {
                (
                    k,
                    json!({
                        "totals": s.totals,
                        "in_sync": s.last_pass_in_sync,
                        "divergent_since_ms": s.divergent.map(|d| d.0),
                        "episodes": s.episodes,
                    }),
                )
            })
            .collect();
        json!({"keyspaces": keyspaces, "hints_pending": hints.pending()})
    }
}

/// What one session found.
struct Session {
    in_sync: bool,
}

/// An error talking to `peer` during a session.
fn remote(peer: NodeId, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("anti-entropy with node {peer}: {e}"))
}

/// One anti-entropy session with `peer` over one shard of `ks`: compares bucket digests, then
/// the fingerprints of the keys in differing buckets, and streams the differing versions both
/// ways.
async fn session(ap: &Arc<Ap>, ks: &str, shard: &ShardInfo, peer: NodeId) -> Result<Session> {
    // Versions younger than a replica round trip may still be on their way; the next pass
    // compares them.
    // Taken from the HLC, which versions are stamped with, so a clock running ahead somewhere
    // does not keep every new version out of the comparison.
    let before_ms = ap
        .hlc
        .now()
        .physical_ms()
        .saturating_sub(REPLICA_TIMEOUT.as_millis() as u64);
    let slots = shard.slots;
    let differing = exchange_digests(ap, ks, slots, peer, before_ms).await?;
    if differing.is_empty() {
        return Ok(Session { in_sync: true });
    }
    let (my_fp, their_fp) =
        exchange_fingerprints(ap, ks, slots, peer, differing, before_ms).await?;
    let diff = Diff::of(&my_fp, &their_fp);
    stream_differences(ap, ks, peer, &diff.pull, &diff.push).await?;
    ap.stats
        .session(ks, diff.compared, diff.repaired, diff.conflicts);
    Ok(Session { in_sync: false })
}

/// Computes this node's bucket digest of the shard, asks `peer` for its own, and returns the
/// buckets that differ.
async fn exchange_digests(
    ap: &Arc<Ap>,
    ks: &str,
    slots: Slots,
    peer: NodeId,
    before_ms: u64,
) -> Result<Vec<u32>> {
    let (ap2, ks2) = (ap.clone(), ks.to_string());
    let mine = tokio::task::spawn_blocking(move || digest(&ap2, &ks2, slots, before_ms))
        .await
        .map_err(|e| Error::Io(e.to_string()))??;
    let theirs = match ap
        .call(
            peer,
            ApRequest::Digest {
                keyspace: ks.to_string(),
                slots,
                before_ms,
            },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| remote(peer, e))?
    {
        ApResponse::Digest(d) if d.len() == mine.len() => d,
        other => return Err(remote(peer, format!("unexpected answer {other:?}"))),
    };
    Ok((0..mine.len())
        .filter(|&i| mine[i] != theirs[i])
        .map(|i| i as u32)
        .collect())
}

/// (key → fingerprint) of the keys in the `differing` buckets: this node's, then `peer`'s.
async fn exchange_fingerprints(
    ap: &Arc<Ap>,
    ks: &str,
    slots: Slots,
    peer: NodeId,
    differing: Vec<u32>,
    before_ms: u64,
) -> Result<(HashMap<Bytes, u64>, HashMap<Bytes, u64>)> {
    let (ap2, ks2, buckets) = (ap.clone(), ks.to_string(), differing.clone());
    let my_fp: HashMap<Bytes, u64> =
        tokio::task::spawn_blocking(move || fingerprints(&ap2, &ks2, slots, &buckets, before_ms))
            .await
            .map_err(|e| Error::Io(e.to_string()))??
            .into_iter()
            .collect();
    let their_fp: HashMap<Bytes, u64> = match ap
        .call(
            peer,
            ApRequest::Fingerprints {
                keyspace: ks.to_string(),
                slots,
                buckets: differing,
                before_ms,
            },
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| remote(peer, e))?
    {
        ApResponse::Fingerprints(f) => f.into_iter().collect(),
        other => return Err(remote(peer, format!("unexpected answer {other:?}"))),
    };
    Ok((my_fp, their_fp))
}

/// What differs between two replicas' fingerprints.
struct Diff {
    /// Keys to fetch from the peer: missing here, or present on both sides with different
    /// versions.
    pull: Vec<Bytes>,
    /// Keys to send to the peer: missing there, or present on both sides with different
    /// versions.
    push: Vec<Bytes>,
    /// Keys on either side.
    compared: u64,
    /// Keys missing on one side.
    repaired: u64,
    /// Keys present on both sides with different versions.
    conflicts: u64,
}

impl Diff {
    /// Compares this node's fingerprints with the peer's.
    fn of(my_fp: &HashMap<Bytes, u64>, their_fp: &HashMap<Bytes, u64>) -> Diff {
        let mut pull = Vec::new();
        let mut push = Vec::new();
        let (mut repaired, mut conflicts) = (0u64, 0u64);
        for (k, fp) in their_fp {
            match my_fp.get(k) {
                None => {
                    repaired += 1;
                    pull.push(k.clone());
                }
                Some(mine) if mine != fp => {
                    conflicts += 1;
                    pull.push(k.clone());
                    push.push(k.clone());
                }
                Some(_) => {}
            }
        }
        for k in my_fp.keys() {
            if !their_fp.contains_key(k) {
                repaired += 1;
                push.push(k.clone());
            }
        }
        let compared =
            (my_fp.len() + their_fp.keys().filter(|k| !my_fp.contains_key(*k)).count()) as u64;
        Diff {
            pull,
            push,
            compared,
            repaired,
            conflicts,
        }
    }
}

/// Bytes a batch of versions costs against the anti-entropy budget.
fn budget_bytes(entries: &[(Bytes, Value)]) -> u64 {
    entries
        .iter()
        .map(|(k, v)| (k.len() + v.data.len() + 30) as u64)
        .sum()
}

/// Streams the differing versions, in batches of [`MERGE_BATCH_KEYS`] under the bandwidth
/// budget: reads the `pull` keys from `peer` and merges them here, then sends this node's
/// versions of the `push` keys to `peer` to merge there.
async fn stream_differences(
    ap: &Arc<Ap>,
    ks: &str,
    peer: NodeId,
    pull: &[Bytes],
    push: &[Bytes],
) -> Result<()> {
    let table = ap.table(ks);
    for chunk in pull.chunks(MERGE_BATCH_KEYS) {
        let records = match ap
            .call(
                peer,
                ApRequest::ReadRecords {
                    keyspace: ks.to_string(),
                    ids: chunk.to_vec(),
                },
                REPLICA_TIMEOUT * 5,
            )
            .await
            .map_err(|e| remote(peer, e))?
        {
            ApResponse::Records(v) if v.len() == chunk.len() => v,
            other => return Err(remote(peer, format!("unexpected answer {other:?}"))),
        };
        let entries: Vec<(Bytes, Value)> = records.into_iter().flatten().collect();
        ap.budget.take(budget_bytes(&entries)).await;
        super::replica::merge_counted(ap, ks, entries).await?;
    }
    for chunk in push.chunks(MERGE_BATCH_KEYS) {
        let entries: Vec<(Bytes, Value)> = table
            .ap_read_records(chunk)?
            .into_iter()
            .flatten()
            .collect();
        ap.budget.take(budget_bytes(&entries)).await;
        ap.call(
            peer,
            ApRequest::Merge {
                keyspace: ks.to_string(),
                entries,
            },
            REPLICA_TIMEOUT * 5,
        )
        .await
        .map_err(|e| remote(peer, e))?;
    }
    Ok(())
}

/// What tombstone collection asks the replicas to purge for what a key shows, if anything:
/// a tombstone older than the grace period (its timestamp travels, so a newer write is kept);
/// for a collection, the horizon travels, for the whole key when it expired before then (its
/// element records go in bounded steps). Element removals (HDEL, SREM, ZREM) are element
/// records of their own, collected one by one (see `collect_tombstones`).
///
/// `compared_before_ms`: the pass's anti-entropy sessions compared every version written at or
/// before it (and found the replicas in sync). A collection written since was not compared, so
/// its replicas may differ: one may still lack a removal another would collect, and hand its
/// add back later. Its collection waits for a later pass.
pub(crate) fn collectable(
    v: &Value,
    horizon: capdb_types::Timestamp,
    compared_before_ms: u64,
) -> Option<capdb_types::Timestamp> {
    use capdb_types::composite::{Composite, expired_before, is_composite};
    if v.header.tombstone && v.header.timestamp < horizon {
        return Some(v.header.timestamp);
    }
    let compared_collection = !v.header.tombstone
        && is_composite(v)
        && v.header.timestamp.physical_ms() <= compared_before_ms;
    let old_parts = || {
        expired_before(v, horizon) || Composite::of(v).is_ok_and(|c| c.has_removed_before(horizon))
    };
    (compared_collection && old_parts()).then_some(horizon)
}

/// Removes tombstones older than the grace period from every replica of a shard (see
/// [`collectable`]).
async fn collect_tombstones(
    ap: &Arc<Ap>,
    ks: &str,
    shard: &ShardInfo,
    compared_before_ms: u64,
) -> Result<()> {
    let horizon_ms =
        capdb_types::unix_now_ms().saturating_sub(ap.config.tombstone_grace.as_millis() as u64);
    let mut old = Vec::new();
    let slots = shard.slots;
    let horizon = capdb_types::Timestamp::from_parts(horizon_ms, 0);
    let in_shard = |k: &[u8]| {
        let s = capdb_cluster::slots::key_slot(k);
        s >= slots.0 && s <= slots.1
    };
    // Keys, judged on what they show (the head with its first visible elements).
    ap.table(ks).ap_for_each_key(None, |k, v| {
        if in_shard(k)
            && let Some(ts) = collectable(&v, horizon, compared_before_ms)
        {
            old.push((Bytes::copy_from_slice(k), ts));
        }
        old.len() < COLLECT_MAX
    })?;
    // Element removals (HDEL, SREM, ZREM) older than the grace period, once compared: the
    // record's timestamp is its newest version, so a compared record is the same everywhere.
    let mut elements = Vec::new();
    ap.table(ks).ap_for_each_record(|r| {
        if r.id.first() == Some(&1)
            && in_shard(r.key)
            && r.value.header.timestamp < horizon
            && r.value.header.timestamp.physical_ms() <= compared_before_ms
            && capdb_types::composite::Entry::of_record(&r.value)
                .is_ok_and(|e| e.removed(r.value.header.kind as u8))
        {
            elements.push((Bytes::copy_from_slice(&r.id[1..]), horizon));
        }
        elements.len() < COLLECT_MAX
    })?;
    if old.is_empty() && elements.is_empty() {
        return Ok(());
    }
    for &r in &shard.replicas {
        ap.call(
            r,
            ApRequest::Purge {
                keyspace: ks.to_string(),
                entries: old.clone(),
                elements: elements.clone(),
            },
            REPLICA_TIMEOUT * 5,
        )
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    }
    Ok(())
}

/// One pass over every `ap` shard this node replicates.
pub async fn pass(ap: &Arc<Ap>, collect: bool) {
    let state = ap.state();
    for (name, entry) in &state.keyspaces {
        if entry.spec.mode != Mode::Ap {
            continue;
        }
        let ks = name.to_string();
        let mut in_sync = true;
        for shard in &entry.shards {
            if !shard.replicas.contains(&ap.me) {
                continue;
            }
            let mut shard_in_sync = true;
            // Every session below compares at least the versions written before this.
            let compared_before_ms = ap
                .hlc
                .now()
                .physical_ms()
                .saturating_sub(REPLICA_TIMEOUT.as_millis() as u64);
            for &peer in &shard.replicas {
                if peer <= ap.me {
                    continue;
                }
                if ap.detector.is_down(peer) {
                    shard_in_sync = false;
                    continue;
                }
                match session(ap, &ks, shard, peer).await {
                    Ok(s) => shard_in_sync &= s.in_sync,
                    Err(e) => {
                        tracing::debug!(keyspace = %ks, error = %e, "anti-entropy session failed");
                        shard_in_sync = false;
                    }
                }
            }
            let lowest = shard.replicas.iter().min() == Some(&ap.me);
            if collect
                && lowest
                && shard_in_sync
                && shard.replicas.iter().all(|&r| !ap.detector.is_down(r))
                && let Err(e) = collect_tombstones(ap, &ks, shard, compared_before_ms).await
            {
                tracing::debug!(keyspace = %ks, error = %e, "tombstone collection skipped");
            }
            in_sync &= shard_in_sync;
        }
        if !ap.hints.pending().is_empty() {
            in_sync = false;
        }
        ap.stats.pass(&ks, in_sync, ap.detector.last_recovery_ms());
    }
}

pub(super) async fn run(ap: Arc<Ap>) {
    let mut recoveries = ap.detector.recoveries();
    let mut passes: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ap.config.anti_entropy_interval) => {}
            _ = ap.stopped() => return,
            _ = recoveries.changed() => {
                // Let hinted handoff go first; anti-entropy mops up.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        passes += 1;
        pass(&ap, passes.is_multiple_of(GC_EVERY_PASSES)).await;
    }
}

#[cfg(test)]
mod collection {
    use bytes::Bytes;
    use capdb_types::composite::{CollState, Composite, Entry};
    use capdb_types::{Timestamp, Value, ValueKind};

    use super::collectable;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_parts(ms, 0)
    }

    /// A hash of `fields` (name, written at ms, `None`: removed by HDEL) with a deadline.
    fn hash(fields: &[(&str, u64, Option<&str>)], deadline: Option<u64>) -> Value {
        let mut c = CollState::default();
        for (name, ms, value) in fields {
            c.entries.insert(
                Bytes::from(name.to_string()),
                Entry {
                    ts: at(*ms),
                    origin: 1,
                    value: value.map(|v| Bytes::from(v.to_string())),
                    ..Entry::default()
                },
            );
        }
        if deadline.is_some() {
            c.ttl = (at(1_000), 1, deadline);
        }
        let mut comp = Composite::default();
        comp.colls.insert(ValueKind::Hash as u8, c);
        comp.to_value()
    }

    const HORIZON_MS: u64 = 50_000;

    #[test]
    fn tombstones_older_than_the_grace_period_go_with_their_own_timestamp() {
        let old = Value::tombstone(at(40_000));
        assert_eq!(collectable(&old, at(HORIZON_MS), 0), Some(at(40_000)));
        let recent = Value::tombstone(at(60_000));
        assert_eq!(collectable(&recent, at(HORIZON_MS), u64::MAX), None);
    }

    #[test]
    fn old_field_removals_of_a_collection_go_only_once_anti_entropy_compared_it() {
        // HDEL of `gone` long ago; `live` written at 100_000ms, after the versions the pass
        // compared (up to 90_000ms): the replicas' copies of the key were not compared, one may
        // still hold `gone` unremoved.
        let h = hash(&[("gone", 1_000, None), ("live", 100_000, Some("v"))], None);
        assert_eq!(collectable(&h, at(HORIZON_MS), 90_000), None);
        // A later pass compared it (and found every replica in sync).
        assert_eq!(
            collectable(&h, at(HORIZON_MS), 100_000),
            Some(at(HORIZON_MS))
        );
        // Nothing removed before the horizon: nothing to collect.
        let fresh = hash(&[("gone", 60_000, None), ("live", 1_000, Some("v"))], None);
        assert_eq!(collectable(&fresh, at(HORIZON_MS), u64::MAX), None);
    }

    #[test]
    fn an_expired_collection_goes_once_it_expired_longer_ago_than_the_grace_period() {
        let long_expired = hash(&[("f", 1_000, Some("v"))], Some(2_000));
        assert_eq!(
            collectable(&long_expired, at(HORIZON_MS), 40_000),
            Some(at(HORIZON_MS))
        );
        assert!(capdb_types::composite::expired_before(
            &long_expired,
            at(HORIZON_MS)
        ));
        // Expired after the horizon: a PERSIST from before its deadline may still be on its
        // way to some replica.
        let recently_expired = hash(&[("f", 1_000, Some("v"))], Some(55_000));
        assert_eq!(collectable(&recently_expired, at(HORIZON_MS), 40_000), None);
        assert!(!capdb_types::composite::expired_before(
            &recently_expired,
            at(HORIZON_MS)
        ));
    }
}
