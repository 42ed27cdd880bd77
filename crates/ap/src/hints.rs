//! Hinted handoff: versions kept for a replica that could not take them, delivered when it is
//! reachable again.
//!
//! Hints for node N live in the durable log table `hints/N` (one record per write: keyspace,
//! creation time, versions), appended with an fsync before the hint is acknowledged, so a hint
//! that counted toward a write's quorum survives a crash of its holder. A delivery loop hands
//! them to N in order once the failure detector sees N again, and deletes each record only
//! after N has merged it. Bounds: at most [`HINTS_MAX_PER_TARGET`] records per target (beyond
//! that new hints are refused and anti-entropy repairs instead), and records older than
//! `hint_max_age` are dropped for the same reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_storage::disk::DiskEngine;
use capdb_types::{Error, Result, Value};
use serde::{Deserialize, Serialize};

use super::Ap;
use super::messages::ApRequest;

pub const HINTS_MAX_PER_TARGET: u64 = 200_000;
const DELIVER_BATCH: u64 = 512;
use capdb_storage::layout::HINT_MARKER_PREFIX as MARKER_PREFIX;

#[derive(Serialize, Deserialize)]
struct HintRecord {
    keyspace: String,
    created_ms: u64,
    entries: Vec<(Bytes, Value)>,
}

/// A hint record as versions before value kinds wrote it (a value was a serde structure then,
/// not its checksummed bytes). Read only, so hints queued before an upgrade are still delivered.
#[derive(Deserialize)]
struct LegacyHintRecord {
    keyspace: String,
    created_ms: u64,
    entries: Vec<(Bytes, LegacyValue)>,
}

#[derive(Deserialize)]
struct LegacyValue {
    header: LegacyHeader,
    data: Bytes,
}

#[derive(Deserialize)]
struct LegacyHeader {
    timestamp: capdb_types::Timestamp,
    tombstone: bool,
    expire_at_ms: Option<u64>,
    counter: bool,
}

impl HintRecord {
    fn decode(bytes: &[u8]) -> Result<HintRecord, postcard::Error> {
        postcard::from_bytes::<HintRecord>(bytes).or_else(|e| {
            let legacy = postcard::from_bytes::<LegacyHintRecord>(bytes).map_err(|_| e)?;
            Ok(HintRecord {
                keyspace: legacy.keyspace,
                created_ms: legacy.created_ms,
                entries: legacy
                    .entries
                    .into_iter()
                    .map(|(k, v)| {
                        let mut value =
                            Value::new(v.data, v.header.timestamp, v.header.expire_at_ms);
                        value.header.tombstone = v.header.tombstone;
                        value.header.counter = v.header.counter;
                        (k, value)
                    })
                    .collect(),
            })
        })
    }
}

/// Per target: next index to append, first index not yet delivered.
#[derive(Debug, Clone, Copy)]
struct Queue {
    first: u64,
    next: u64,
}

pub struct Hints {
    engine: DiskEngine,
    max_age: Duration,
    queues: Mutex<BTreeMap<NodeId, Queue>>,
    /// Held from reserving an index to queueing its append, so records commit in index order
    /// (delivery deletes ranges of indices and must never skip one still being written).
    append: tokio::sync::Mutex<()>,
}

fn table(target: NodeId) -> String {
    capdb_storage::layout::hint_table(target)
}

impl Hints {
    /// Finds the hint queues left by earlier runs.
    pub fn open(engine: DiskEngine, max_age: Duration) -> Hints {
        let mut queues = BTreeMap::new();
        for (key, _) in engine.meta_list(MARKER_PREFIX).unwrap_or_default() {
            if let Ok(target) = key.trim_start_matches(MARKER_PREFIX).parse::<NodeId>() {
                let first = engine.log_first(&table(target)).ok().flatten();
                let last = engine.log_last(&table(target)).ok().flatten();
                let q = match (first, last) {
                    (Some((f, _)), Some((l, _))) => Queue {
                        first: f,
                        next: l + 1,
                    },
                    _ => Queue { first: 0, next: 0 },
                };
                queues.insert(target, q);
            }
        }
        Hints {
            engine,
            max_age,
            queues: Mutex::new(queues),
            append: tokio::sync::Mutex::new(()),
        }
    }

    /// Records still waiting, per target.
    pub fn pending(&self) -> BTreeMap<NodeId, u64> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, q)| (*n, q.next - q.first))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Durably stores a hint for `target`.
    pub async fn store(
        &self,
        target: NodeId,
        keyspace: &str,
        entries: Vec<(Bytes, Value)>,
    ) -> Result<()> {
        let order = self.append.lock().await;
        let (index, new_target) = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let new_target = !queues.contains_key(&target);
            let q = queues.entry(target).or_insert(Queue { first: 0, next: 0 });
            if q.next - q.first >= HINTS_MAX_PER_TARGET {
                return Err(Error::Unavailable(format!(
                    "{HINTS_MAX_PER_TARGET} hints already wait for node {target}; not storing more (anti-entropy will repair it)"
                )));
            }
            q.next += 1;
            (q.next - 1, new_target)
        };
        let unreserve = || {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(q) = queues.get_mut(&target)
                && q.next == index + 1
            {
                q.next = index;
            }
        };
        if new_target
            && let Err(e) = self
                .engine
                .meta_put(
                    vec![(format!("{MARKER_PREFIX}{target}"), Some(vec![1]))],
                    true,
                )
                .await
        {
            unreserve();
            return Err(e);
        }
        let record = HintRecord {
            keyspace: keyspace.to_string(),
            created_ms: capdb_types::unix_now_ms(),
            entries,
        };
        let bytes = postcard::to_stdvec(&record).map_err(|e| Error::Io(e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self
            .engine
            .log_append(&table(target), vec![(index, bytes)], move |r| {
                let _ = tx.send(r);
            })
            .await
        {
            unreserve();
            return Err(e);
        }
        drop(order);
        rx.await
            .map_err(|_| Error::Io("storage writer stopped".into()))?
    }

    /// Drops every hint for `target` (a node that left the cluster).
    async fn discard(&self, target: NodeId) {
        let _order = self.append.lock().await;
        if self
            .engine
            .log_remove(&table(target), 0, None)
            .await
            .is_err()
            || self
                .engine
                .meta_put(vec![(format!("{MARKER_PREFIX}{target}"), None)], true)
                .await
                .is_err()
        {
            return;
        }
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&target);
        tracing::info!(target, "hints for a node that left the cluster dropped");
    }

    /// Hands `target` its hints, oldest first, until none are left or it stops answering.
    async fn deliver(&self, ap: &Arc<Ap>, target: NodeId) {
        loop {
            let Some(q) = self
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&target)
                .copied()
            else {
                return;
            };
            if q.first >= q.next {
                return;
            }
            let batch = match self
                .engine
                .log_read(&table(target), q.first, q.first + DELIVER_BATCH)
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(target, error = %e, "reading hints failed");
                    return;
                }
            };
            if batch.is_empty() {
                // A gap left by appends that failed: skip to the first stored record. (With
                // none stored, appends may still be in flight: wait for them.)
                if let Ok(Some((first, _))) = self.engine.log_first(&table(target))
                    && first > q.first
                {
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(q) = queues.get_mut(&target) {
                        q.first = q.first.max(first);
                    }
                    continue;
                }
                return;
            }
            // One merge per keyspace for the whole batch (records are small and many).
            let mut by_keyspace: BTreeMap<String, Vec<(Bytes, Value)>> = BTreeMap::new();
            let now = capdb_types::unix_now_ms();
            for (index, bytes) in &batch {
                match HintRecord::decode(bytes) {
                    Ok(r)
                        if now.saturating_sub(r.created_ms) <= self.max_age.as_millis() as u64 =>
                    {
                        by_keyspace.entry(r.keyspace).or_default().extend(r.entries);
                    }
                    Ok(_) => {} // too old: anti-entropy repairs instead
                    Err(_) => tracing::error!(target, index, "corrupt hint record dropped"),
                }
            }
            let mut delivered_all = true;
            for (keyspace, entries) in by_keyspace {
                let n = entries.len() as u64;
                for chunk in entries.chunks(super::MERGE_BATCH_KEYS) {
                    let req = ApRequest::Merge {
                        keyspace: keyspace.clone(),
                        entries: chunk.to_vec(),
                    };
                    match ap.call(target, req, super::REPLICA_TIMEOUT).await {
                        Ok(_) => {}
                        // Dropped from the map meanwhile (as this node sees it): nothing to
                        // deliver. A target that has not learned of a new keyspace yet gets
                        // the hint again later.
                        Err(_)
                            if capdb_types::KeyspaceName::new(&keyspace)
                                .is_ok_and(|k| !ap.state().keyspaces.contains_key(&k)) => {}
                        Err(_) => {
                            delivered_all = false;
                            break;
                        }
                    }
                }
                if !delivered_all {
                    break;
                }
                ap.stats.hints_delivered(&keyspace, n);
            }
            if !delivered_all {
                // Retried later, whole batch (merging twice is harmless).
                return;
            }
            let done_to = batch.last().map(|(i, _)| *i);
            let Some(last) = done_to else { return };
            if self
                .engine
                .log_remove(&table(target), q.first, Some(last))
                .await
                .is_err()
            {
                return;
            }
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(q) = queues.get_mut(&target) {
                q.first = q.first.max(last + 1);
            }
        }
    }
}

/// Delivers hints to every reachable target, every second and whenever a node recovers.
pub(super) async fn run(ap: Arc<Ap>) {
    let mut recoveries = ap.detector.recoveries();
    // Nodes this process has seen in the map: a target missing from the map is only taken to
    // have left when it was seen before (a map not yet caught up after a restart may simply not
    // know a node that joined recently).
    let mut seen: std::collections::BTreeSet<NodeId> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = recoveries.changed() => {}
            _ = ap.stopped() => return,
        }
        let state = ap.state();
        seen.extend(state.nodes.keys().copied());
        let targets: Vec<NodeId> = ap.hints.pending().keys().copied().collect();
        for target in targets {
            if !state.nodes.contains_key(&target) {
                if seen.contains(&target) {
                    // The node left the cluster: its hints have no one to go to.
                    ap.hints.discard(target).await;
                }
                continue;
            }
            if !ap.detector.is_down(target) {
                ap.hints.deliver(&ap, target).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_written_before_value_kinds_still_decodes() {
        #[derive(Serialize)]
        struct OldHeader {
            timestamp: capdb_types::Timestamp,
            tombstone: bool,
            expire_at_ms: Option<u64>,
            counter: bool,
        }
        #[derive(Serialize)]
        struct OldValue {
            header: OldHeader,
            data: Bytes,
        }
        #[derive(Serialize)]
        struct OldRecord {
            keyspace: String,
            created_ms: u64,
            entries: Vec<(Bytes, OldValue)>,
        }
        let old = OldRecord {
            keyspace: "ks".into(),
            created_ms: 5,
            entries: vec![(
                Bytes::from_static(b"k"),
                OldValue {
                    header: OldHeader {
                        timestamp: capdb_types::Timestamp(9),
                        tombstone: true,
                        expire_at_ms: Some(77),
                        counter: false,
                    },
                    data: Bytes::from_static(b"v"),
                },
            )],
        };
        let r = HintRecord::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(r.keyspace, "ks");
        let v = &r.entries[0].1;
        assert_eq!(
            (
                v.header.timestamp.0,
                v.header.expire_at_ms,
                v.header.tombstone
            ),
            (9, Some(77), true)
        );
        assert_eq!(&v.data[..], b"v");
    }
}
