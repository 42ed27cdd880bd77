//! The coordinator's side of replication: sending versions to a shard's replicas until the
//! request's level is met (storing hints for the unreachable ones), and reading them back
//! merged, with read repair. What counts toward a level is [`counted_holder`].

use std::sync::Arc;

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_cluster::state::ShardInfo;
use capdb_types::{Error, KeyspaceName, Result, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Ap, ApRequest, ApResponse, Level, REPLICA_TIMEOUT};

impl Ap {
    /// Writes versions of one shard's keys to its replicas; returns once `level` is met.
    pub(crate) async fn write_versions(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        entries: Vec<(Bytes, Value)>,
        level: Level,
    ) -> Result<()> {
        let required = level.required(shard.replicas.len());
        self.replicate(keyspace, shard.replicas.clone(), entries, required, level)
            .await
    }

    /// Sends versions to `replicas`, storing hints for those that cannot take them, and
    /// returns once `required` acknowledgements arrived (0: at once; delivery goes on in the
    /// background either way). Hints count unless `level` is `all`.
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        replicas: Vec<NodeId>,
        entries: Vec<(Bytes, Value)>,
        required: usize,
        level: Level,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if replicas.is_empty() {
            return if required == 0 {
                Ok(())
            } else {
                Err(Error::Unavailable(
                    "the shard has no replicas in the cluster map yet; retry".into(),
                ))
            };
        }
        assert!(
            required <= replicas.len(),
            "a required level ({required}) never exceeds the replica count ({})",
            replicas.len()
        );
        // What each replica's share became: stored on the replica, stored as a hint on a
        // stand-in that counts toward the level, or neither.
        let (tx, mut rx) = mpsc::channel::<Option<NodeId>>(replicas.len().max(1));
        for &r in &replicas {
            let ap = self.clone();
            let tx = tx.clone();
            let ks = keyspace.to_string();
            let entries = entries.clone();
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let delivered = !ap.detector.is_down(r)
                    && ap
                        .call(
                            r,
                            ApRequest::Merge {
                                keyspace: ks.clone(),
                                entries: entries.clone(),
                            },
                            REPLICA_TIMEOUT,
                        )
                        .await
                        .is_ok();
                let counts = if delivered {
                    counted_holder(Delivery::Stored, r, level, &replicas)
                } else {
                    // The replica's share goes to a healthy stand-in, handed off later.
                    let holder = ap.hint_holder(&replicas, r);
                    let stored = ap
                        .call(
                            holder,
                            ApRequest::Hint {
                                target: r,
                                keyspace: ks,
                                entries,
                            },
                            REPLICA_TIMEOUT,
                        )
                        .await
                        .is_ok();
                    let delivery = if stored {
                        Delivery::Hinted
                    } else {
                        Delivery::Lost
                    };
                    counted_holder(delivery, holder, level, &replicas)
                };
                let _ = tx.send(counts).await;
            });
        }
        drop(tx);
        if required == 0 {
            return Ok(());
        }
        // Distinct nodes holding the write: two hints on one stand-in count once.
        let mut holders = std::collections::BTreeSet::new();
        let mut answers = 0;
        while let Some(holder) = rx.recv().await {
            answers += 1;
            holders.extend(holder);
            if holders.len() >= required {
                return Ok(());
            }
            if answers == replicas.len() {
                break;
            }
        }
        // Not `Unavailable` (-TRYAGAIN, which clients retry on their own): the write was sent
        // and may be stored where it arrived, from where it spreads (hints, anti-entropy).
        Err(Error::OutcomeUnknown(format!(
            "{} of {required} required replicas acknowledged (consistency {}); the write may have taken effect where it arrived and would then reach the other replicas later; read before retrying",
            holders.len(),
            level.as_str()
        )))
    }

    /// The node that keeps a hint for unreachable replica `target`: the next node after it (in
    /// id order, wrapping) that is up, not draining and not a replica of the shard; this node
    /// when there is none.
    pub(crate) fn hint_holder(&self, replicas: &[NodeId], target: NodeId) -> NodeId {
        let state = self.state();
        let ids: Vec<NodeId> = state.nodes.keys().copied().collect();
        let start = ids.iter().position(|&n| n > target).unwrap_or(0);
        ids.iter()
            .cycle()
            .skip(start)
            .take(ids.len())
            .copied()
            .find(|&n| {
                !replicas.contains(&n)
                    && !self.detector.is_down(n)
                    && !state.nodes.get(&n).is_some_and(|i| i.draining)
            })
            .unwrap_or(self.me)
    }

    // ------------------------------------------------------------------ coordinator: reads

    /// Reads the stored versions of one shard's keys at `level`, merged across the replicas
    /// that answered; repairs stale replicas in the background.
    pub(crate) async fn read_versions(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        keys: Vec<Bytes>,
        level: Level,
    ) -> Result<Vec<Option<Value>>> {
        let read = ReadOf::Keys(keys.clone());
        Ok(self
            .read_merged(keyspace, shard, level, keys, read)
            .await?
            .merged)
    }

    /// Reads what a command naming only `subs` of `key`'s collection of `kind` needs, at
    /// `level` (see `capdb_storage::disk::DiskTable::ap_get_part`), merged across the replicas
    /// that answered, with what each said of its answer; repairs stale replicas in the
    /// background (with what was read).
    pub(crate) async fn read_part(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        key: Bytes,
        kind: u8,
        subs: Vec<Bytes>,
        level: Level,
    ) -> Result<PartRead> {
        let read = ReadOf::Part {
            key: key.clone(),
            kind,
            subs,
        };
        let answer = self
            .read_merged(keyspace, shard, level, vec![key], read)
            .await?;
        Ok(PartRead {
            value: answer.merged.into_iter().next().flatten(),
            parts: answer.parts,
        })
    }

    /// Sends `read` to the shard's replicas; answers once `level` is met (the versions merged
    /// per key), then repairs the replicas that answered.
    async fn read_merged(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        level: Level,
        keys: Vec<Bytes>,
        read: ReadOf,
    ) -> Result<ReadAnswer> {
        let replicas: Vec<NodeId> = shard.replicas.clone();
        let required = level.required(replicas.len());
        let (answer_tx, answer_rx) = oneshot::channel();
        let ap = self.clone();
        let ks = keyspace.to_string();
        tokio::spawn(async move {
            ap.read_and_repair(ks, replicas, keys, read, required, answer_tx)
                .await
        });
        match answer_rx.await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable("read coordinator stopped".into())),
        }
    }

    async fn read_and_repair(
        self: Arc<Self>,
        keyspace: String,
        replicas: Vec<NodeId>,
        keys: Vec<Bytes>,
        read: ReadOf,
        required: usize,
        answer: oneshot::Sender<Result<ReadAnswer>>,
    ) {
        let (tx, mut rx) = mpsc::channel(replicas.len().max(1));
        let mut asked = 0;
        for &r in &replicas {
            if self.detector.is_down(r) {
                continue;
            }
            asked += 1;
            let ap = self.clone();
            let tx = tx.clone();
            let req = read.request(&keyspace);
            tokio::spawn(async move {
                let r_out = match ap.call(r, req, REPLICA_TIMEOUT).await {
                    Ok(ApResponse::Values(v)) => Some((v, None)),
                    Ok(ApResponse::Part(p)) => Some((vec![p.value], Some((p.whole, p.witness)))),
                    _ => None,
                };
                let _ = tx.send((r, r_out)).await;
            });
        }
        drop(tx);
        let mut replies: Vec<(NodeId, Vec<Option<Value>>)> = Vec::new();
        let mut parts: Vec<Part> = Vec::new();
        // Part reads: the elements every replica was asked for or named as its witness (read
        // repair sends only those: a whole reply's other elements were not read elsewhere).
        let mut repairable: Option<std::collections::BTreeSet<Bytes>> = match &read {
            ReadOf::Part { subs, .. } => Some(subs.iter().cloned().collect()),
            ReadOf::Keys(_) => None,
        };
        let mut answer = Some(answer);
        while let Some((node, out)) = rx.recv().await {
            if let Some((values, part)) = out.filter(|(v, _)| v.len() == keys.len()) {
                replies.push((node, values));
                if let (Some(keep), Some((_, Some(w)))) = (repairable.as_mut(), &part) {
                    keep.insert(w.clone());
                }
                parts.extend(part);
            }
            if replies.len() >= required
                && let Some(a) = answer.take()
            {
                let _ = a.send(Ok(ReadAnswer {
                    merged: merge_replies(&replies, keys.len()),
                    parts: std::mem::take(&mut parts),
                }));
            }
        }
        if let Some(a) = answer.take() {
            let _ = a.send(Err(Error::Unavailable(format!(
                "{} of {required} required replicas answered (asked {asked}); retry, or read at a lower consistency level",
                replies.len()
            ))));
            return;
        }
        // Read repair: every replica that answered gets what it lacks.
        let merged = merge_replies(&replies, keys.len());
        for (node, values) in &replies {
            let stale: Vec<(Bytes, Value)> = keys
                .iter()
                .zip(values.iter().zip(&merged))
                .filter_map(|(k, (mine, best))| match (mine, best) {
                    (m, Some(b)) if m.as_ref() != Some(b) => {
                        Some((k.clone(), repair_delta(m.as_ref(), b, repairable.as_ref())))
                    }
                    _ => None,
                })
                .collect();
            if stale.is_empty() {
                continue;
            }
            let n = stale.len() as u64;
            let ok = self
                .call(
                    *node,
                    ApRequest::Merge {
                        keyspace: keyspace.clone(),
                        entries: stale,
                    },
                    REPLICA_TIMEOUT,
                )
                .await
                .is_ok();
            if ok {
                self.stats.read_repaired(&keyspace, n);
            }
        }
    }
}

/// What one replica said of its answer to a partial read: (whether it is the whole state, its
/// witness: see `capdb_storage::disk::ApPart::witness`).
pub(crate) type Part = (bool, Option<Bytes>);

/// A partial read merged across the replicas that made its level.
pub(crate) struct PartRead {
    pub value: Option<Value>,
    /// One per replica whose answer is in `value`.
    pub parts: Vec<Part>,
}

struct ReadAnswer {
    merged: Vec<Option<Value>>,
    parts: Vec<Part>,
}

/// What a read asks each replica for.
enum ReadOf {
    Keys(Vec<Bytes>),
    Part {
        key: Bytes,
        kind: u8,
        subs: Vec<Bytes>,
    },
}

impl ReadOf {
    fn request(&self, keyspace: &str) -> ApRequest {
        match self {
            ReadOf::Keys(keys) => ApRequest::Read {
                keyspace: keyspace.to_string(),
                keys: keys.clone(),
            },
            ReadOf::Part { key, kind, subs } => ApRequest::ReadPart {
                keyspace: keyspace.to_string(),
                key: key.clone(),
                kind: *kind,
                subs: subs.clone(),
            },
        }
    }
}

/// What a replica that answered `mine` needs of `best`: for a collection, its head and the
/// elements whose versions differ (not the whole collection), only those in `only` when
/// given; else `best`.
fn repair_delta(
    mine: Option<&Value>,
    best: &Value,
    only: Option<&std::collections::BTreeSet<Bytes>>,
) -> Value {
    use capdb_types::composite::{Composite, is_composite};
    if !is_composite(best) || (mine.is_none() && only.is_none()) {
        return best.clone();
    }
    let Ok(mut b) = Composite::of(best) else {
        return best.clone();
    };
    if let Some(only) = only {
        for (kind, c) in b.colls.iter_mut() {
            if *kind != capdb_types::ValueKind::List as u8 {
                c.entries.retain(|sub, _| only.contains(sub));
            }
        }
    }
    match mine.map(Composite::of) {
        Some(Ok(m)) => b.delta_from(&m).to_value(),
        Some(Err(_)) => best.clone(),
        None => b.to_value(),
    }
}

/// Merges each key's versions across replies.
fn merge_replies(replies: &[(NodeId, Vec<Option<Value>>)], n: usize) -> Vec<Option<Value>> {
    (0..n)
        .map(|i| {
            replies.iter().filter_map(|(_, v)| v[i].as_ref()).fold(
                None::<Value>,
                |acc, v| match acc {
                    None => Some(v.clone()),
                    Some(a) => Some(capdb_types::merge::merge(&a, v)),
                },
            )
        })
        .collect()
}

/// What happened to one replica's share of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Stored on the replica itself.
    Stored,
    /// Stored as a hint on a stand-in node, to be handed off later.
    Hinted,
    /// Neither.
    Lost,
}

/// The node a share counts as held by toward the write's level, if any: the replica when it
/// stored it; a stand-in holding a hint under a sloppy quorum (`one`, `quorum`), unless the
/// stand-in is itself a replica (it then counts once, for its own share); nobody under `all`,
/// which only counts replicas.
fn counted_holder(
    delivery: Delivery,
    holder: NodeId,
    level: Level,
    replicas: &[NodeId],
) -> Option<NodeId> {
    match delivery {
        Delivery::Stored => Some(holder),
        Delivery::Hinted => (level != Level::All && !replicas.contains(&holder)).then_some(holder),
        Delivery::Lost => None,
    }
}

#[cfg(test)]
mod level_counting {
    use super::{Delivery, Level, counted_holder};

    const REPLICAS: [u64; 3] = [1, 2, 3];

    #[test]
    fn a_replica_that_stored_its_share_counts_at_every_level() {
        for level in [Level::One, Level::Quorum, Level::All] {
            assert_eq!(
                counted_holder(Delivery::Stored, 2, level, &REPLICAS),
                Some(2)
            );
        }
    }

    #[test]
    fn a_hint_on_a_stand_in_counts_for_one_and_quorum_but_never_for_all() {
        assert_eq!(
            counted_holder(Delivery::Hinted, 4, Level::One, &REPLICAS),
            Some(4)
        );
        assert_eq!(
            counted_holder(Delivery::Hinted, 4, Level::Quorum, &REPLICAS),
            Some(4)
        );
        assert_eq!(
            counted_holder(Delivery::Hinted, 4, Level::All, &REPLICAS),
            None
        );
    }

    #[test]
    fn a_hint_kept_by_another_replica_does_not_count_that_replica_twice() {
        assert_eq!(
            counted_holder(Delivery::Hinted, 3, Level::One, &REPLICAS),
            None
        );
    }

    #[test]
    fn a_lost_share_counts_for_nobody() {
        assert_eq!(
            counted_holder(Delivery::Lost, 2, Level::One, &REPLICAS),
            None
        );
    }

    #[test]
    fn levels_require_one_a_majority_or_every_replica() {
        assert_eq!(Level::One.required(3), 1);
        assert_eq!(Level::Quorum.required(3), 2);
        assert_eq!(Level::Quorum.required(4), 3);
        assert_eq!(Level::All.required(3), 3);
        // Never more than there are replicas, never zero for a shard with replicas.
        assert_eq!(Level::All.required(0), 1);
        assert_eq!(Level::Quorum.required(1), 1);
    }
}
