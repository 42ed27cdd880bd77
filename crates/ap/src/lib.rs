//! `ap` keyspaces: leaderless replication (Dynamo-style).
//!
//! The replicas of an `ap` shard are peers; there is no leader and no Raft group. Any node
//! *coordinates* a request using its cached cluster map (a partitioned node keeps serving from
//! the map it last saw): it sends the request to the shard's replicas and answers once the
//! request's consistency [`Level`] is met: `one`, `quorum` or `all`.
//!
//! - **Versions** carry HLC timestamps and merge by last-writer-wins, with PN-counters for
//!   INCR/DECR (`capdb_types::merge`). Deletes write tombstones.
//! - **Writes** go to every replica; an unreachable replica's share goes to the next healthy
//!   node as a *hint* ([`hints`]), which counts toward `one`/`quorum` (a sloppy quorum) and is
//!   handed off when the replica is back.
//! - **Reads** ask every reachable replica, answer after `level` replies, then repair the
//!   replicas that answered with an older version (read repair).
//! - **Anti-entropy** ([`anti_entropy`]) compares replicas shard by shard in the background,
//!   bucket digests first, then key fingerprints, and streams only what differs, under a
//!   bandwidth budget. It also collects tombstones once every replica holds them, and keeps
//!   the reconciliation report.
//! - **Failure detection** ([`detector`]) is this module's own probing, independent of the
//!   meta group, so both sides of a partition keep working.
//!
//! Read-modify-write commands other than INCR/DECR (SET NX/XX/GET, APPEND, GETDEL, EXPIRE,
//! DEL's count) read at the write's level, compute the new version at the coordinator and
//! write it: they are not atomic against concurrent writers (last writer wins), as in other
//! leaderless stores. The README documents this.
//!
//! # Boundaries
//!
//! This crate speaks to other nodes over its own transport channel ([`ApService`]) and stores
//! into the node's storage engine. It must not depend on Raft (`capdb-raft`) or on the node and
//! front-end layers: an `ap` request never passes through a Raft room, and `ap` keeps working
//! on both sides of a partition whatever the meta group can do.
//!
//! # Layout
//!
//! - this file: the coordinator (writes, reads, counters, scans, FLUSHDB).
//! - [`replica`]: what a replica does with requests addressed to it.
//! - [`messages`]: the `ap` channel's messages and [`Level`].
//! - [`hints`], [`anti_entropy`], [`detector`]: hinted handoff, background repair, failure
//!   detection.

pub mod anti_entropy;
pub mod detector;
pub mod hints;
pub mod messages;
pub mod replica;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::state::{KeyspaceEntry, ShardInfo};
use capdb_cluster::{ClusterState, NodeId};
use capdb_storage::disk::{DiskEngine, DiskTable};
use capdb_types::mutation::Condition;
use capdb_types::{Effect, Error, Hlc, KeyspaceName, Mutation, Reply, Result, Value};
use tokio::sync::{mpsc, oneshot, watch};

pub use messages::{ApRequest, ApResponse, ApService, CallError, Level};

use capdb_transport::{Handler, PeerFilter, Peers};

/// How long a coordinator waits for replicas before answering with what it has.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys per merge message (bounds frame sizes; values are at most the value limit each).
pub const MERGE_BATCH_KEYS: usize = 512;

/// Tunables of `ap` replication.
#[derive(Debug, Clone)]
pub struct ApConfig {
    /// Pause between anti-entropy passes (a peer coming back triggers one at once).
    pub anti_entropy_interval: Duration,
    /// Bytes per second anti-entropy may stream, per node.
    pub anti_entropy_bytes_per_sec: u64,
    /// Tombstones younger than this are never collected (longer than `hint_max_age`, so no
    /// delayed hint can resurrect a collected delete).
    pub tombstone_grace: Duration,
    /// Hints older than this are dropped (anti-entropy repairs what they carried).
    pub hint_max_age: Duration,
}

impl Default for ApConfig {
    fn default() -> Self {
        ApConfig {
            anti_entropy_interval: Duration::from_secs(10),
            anti_entropy_bytes_per_sec: 32 * 1024 * 1024,
            tombstone_grace: Duration::from_secs(3 * 3600),
            hint_max_age: Duration::from_secs(3600),
        }
    }
}

/// The `ap` replication service of one node.
pub struct Ap {
    me: NodeId,
    engine: DiskEngine,
    hlc: Arc<Hlc>,
    peers: Peers<ApService>,
    cluster: watch::Receiver<Arc<ClusterState>>,
    config: ApConfig,
    detector: detector::Detector,
    hints: hints::Hints,
    stats: anti_entropy::Stats,
    budget: anti_entropy::Budget,
    /// Turns true at shutdown; the background loops end (and release the storage engine).
    stop: watch::Sender<bool>,
}

/// The local table of an `ap` keyspace (see [`capdb_storage::layout::ap_table`]).
pub use capdb_storage::layout::ap_table as table_name;

impl Ap {
    pub fn start(
        me: NodeId,
        engine: DiskEngine,
        hlc: Arc<Hlc>,
        filter: PeerFilter,
        cluster: watch::Receiver<Arc<ClusterState>>,
        config: ApConfig,
    ) -> Arc<Ap> {
        let budget = anti_entropy::Budget::new(config.anti_entropy_bytes_per_sec);
        let ap = Arc::new(Ap {
            me,
            hints: hints::Hints::open(engine.clone(), config.hint_max_age),
            engine,
            hlc,
            peers: Peers::new(me, filter),
            cluster,
            config,
            detector: detector::Detector::new(me),
            stats: anti_entropy::Stats::default(),
            budget,
            stop: watch::channel(false).0,
        });
        tokio::spawn(detector::run(ap.clone()));
        tokio::spawn(hints::run(ap.clone()));
        tokio::spawn(anti_entropy::run(ap.clone()));
        ap
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Ends the background loops (failure detection, hint delivery, anti-entropy).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Resolves when [`Ap::shutdown`] has been called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn state(&self) -> Arc<ClusterState> {
        self.cluster.borrow().clone()
    }

    fn table(&self, keyspace: &str) -> DiskTable {
        self.engine.table(&table_name(keyspace), true)
    }

    fn entry(&self, keyspace: &KeyspaceName) -> Result<KeyspaceEntry> {
        self.state()
            .keyspaces
            .get(keyspace)
            .cloned()
            .ok_or_else(|| Error::KeyspaceNotFound(keyspace.to_string()))
    }

    /// Whether the failure detector currently believes `node` is down.
    pub fn is_down(&self, node: NodeId) -> bool {
        self.detector.is_down(node)
    }

    /// Sends one request to `node` (or serves it here), bounded by `timeout`.
    pub async fn call(
        self: &Arc<Self>,
        node: NodeId,
        request: ApRequest,
        timeout: Duration,
    ) -> std::result::Result<ApResponse, CallError> {
        if node == self.me {
            return self.handle(request).await.map_err(CallError::Refused);
        }
        let addr = match self.state().nodes.get(&node) {
            Some(n) => n.peer_addr.clone(),
            None => return Err(CallError::NotInMap(node)),
        };
        let peer = self.peers.get(node, &addr);
        match peer.call(request, timeout).await {
            Ok(r) => r.map_err(CallError::Refused),
            Err(e) => Err(CallError::Transport(e)),
        }
    }

    /// Serves a request from another node (or from this node's own coordinator).
    pub async fn handle(self: &Arc<Self>, request: ApRequest) -> Result<ApResponse> {
        replica::handle(self, request).await
    }

    // ------------------------------------------------------------------ coordinator: writes

    /// Writes versions of one shard's keys to its replicas; returns once `level` is met.
    async fn write_versions(
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
    async fn replicate(
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
    fn hint_holder(&self, replicas: &[NodeId], target: NodeId) -> NodeId {
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
    async fn read_versions(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        keys: Vec<Bytes>,
        level: Level,
    ) -> Result<Vec<Option<Value>>> {
        let replicas: Vec<NodeId> = shard.replicas.clone();
        let required = level.required(replicas.len());
        let (answer_tx, answer_rx) = oneshot::channel();
        let ap = self.clone();
        let ks = keyspace.to_string();
        tokio::spawn(async move {
            ap.read_and_repair(ks, replicas, keys, required, answer_tx)
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
        required: usize,
        answer: oneshot::Sender<Result<Vec<Option<Value>>>>,
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
            let req = ApRequest::Read {
                keyspace: keyspace.clone(),
                keys: keys.clone(),
            };
            tokio::spawn(async move {
                let r_out = match ap.call(r, req, REPLICA_TIMEOUT).await {
                    Ok(ApResponse::Values(v)) => Some(v),
                    _ => None,
                };
                let _ = tx.send((r, r_out)).await;
            });
        }
        drop(tx);
        let mut replies: Vec<(NodeId, Vec<Option<Value>>)> = Vec::new();
        let mut answer = Some(answer);
        while let Some((node, out)) = rx.recv().await {
            if let Some(values) = out.filter(|v| v.len() == keys.len()) {
                replies.push((node, values));
            }
            if replies.len() >= required
                && let Some(a) = answer.take()
            {
                let _ = a.send(Ok(merge_replies(&replies, keys.len())));
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
                    (m, Some(b)) if m.as_ref() != Some(b) => Some((k.clone(), b.clone())),
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

    // ------------------------------------------------------------------ client operations

    /// Live values of `keys` (counters rendered as their totals), at `level`.
    pub async fn get_many(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        keys: &[Bytes],
        level: Level,
        now_ms: u64,
    ) -> Result<Vec<Option<Value>>> {
        let entry = self.entry(keyspace)?;
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_shard.entry(shard_index(&entry, k)).or_default().push(i);
        }
        let mut out = vec![None; keys.len()];
        let calls = by_shard.into_iter().map(|(s, idx)| {
            let shard_keys: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
            let shard = entry.shards[s].clone();
            async move {
                let v = self
                    .read_versions(keyspace, &shard, shard_keys, level)
                    .await;
                (idx, v)
            }
        });
        for (idx, values) in futures::future::join_all(calls).await {
            for (i, v) in idx.into_iter().zip(values?) {
                out[i] = match v.filter(|v| v.is_live(now_ms)) {
                    Some(v) => Some(capdb_types::merge::render(v)?),
                    None => None,
                };
            }
        }
        Ok(out)
    }

    /// Applies client mutations at `level`, in order. See the module docs for which commands
    /// are blind writes, counters or read-modify-writes.
    pub async fn apply(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        mutations: Vec<Mutation>,
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
    ) -> Result<Vec<Result<Reply>>> {
        let entry = self.entry(keyspace)?;
        let mut replies: Vec<Option<Result<Reply>>> = vec![None; mutations.len()];
        // Consecutive blind writes (plain SETs) travel together, one batch per shard; any other
        // command first waits for the writes queued before it, so a pipeline keeps its order.
        let mut pending = BlindBatches::new();
        for (i, m) in mutations.into_iter().enumerate() {
            let s = shard_index(&entry, m.key());
            if let Some(version) = self.blind_version(&m, now_ms) {
                let e = pending.entry(s).or_default();
                e.0.push(i);
                e.1.push((m.key().clone(), version));
                continue;
            }
            self.flush_blind(keyspace, &entry, &mut pending, &mut replies, level)
                .await;
            let shard = entry.shards[s].clone();
            replies[i] = Some(
                self.apply_one(keyspace, &shard, m, level, now_ms, value_bytes_max)
                    .await,
            );
        }
        self.flush_blind(keyspace, &entry, &mut pending, &mut replies, level)
            .await;
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Io("missing reply".into()))))
            .collect())
    }

    /// The version a plain SET writes without reading (None for every other command).
    fn blind_version(&self, m: &Mutation, now_ms: u64) -> Option<Value> {
        use capdb_types::mutation::ExpiryUpdate;
        let Mutation::Set {
            value,
            condition: Condition::Always,
            expiry,
            return_old: false,
            ..
        } = m
        else {
            return None;
        };
        let expire = match expiry {
            ExpiryUpdate::Keep => return None,
            ExpiryUpdate::At(at) => Some(*at),
            ExpiryUpdate::Clear => None,
        };
        Some(match expire {
            Some(at) if at <= now_ms => Value::tombstone(self.hlc.now()),
            _ => Value::new(value.clone(), self.hlc.now(), expire),
        })
    }

    /// Writes the queued blind writes, shards in parallel, and fills in their replies.
    async fn flush_blind(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        entry: &KeyspaceEntry,
        pending: &mut BlindBatches,
        replies: &mut [Option<Result<Reply>>],
        level: Level,
    ) {
        if pending.is_empty() {
            return;
        }
        let batches = std::mem::take(pending);
        let calls = batches.into_iter().map(|(s, (idx, entries))| {
            let shard = entry.shards[s].clone();
            async move {
                let mut result = Ok(());
                for chunk in entries.chunks(MERGE_BATCH_KEYS) {
                    result = self
                        .write_versions(keyspace, &shard, chunk.to_vec(), level)
                        .await;
                    if result.is_err() {
                        break;
                    }
                }
                (idx, result)
            }
        });
        for (idx, result) in futures::future::join_all(calls).await {
            for i in idx {
                replies[i] = Some(result.clone().map(|()| Reply::Ok));
            }
        }
    }

    async fn apply_one(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        m: Mutation,
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
    ) -> Result<Reply> {
        let key = m.key().clone();
        match &m {
            Mutation::IncrBy { delta, .. } => {
                self.counter_add(keyspace, shard, key, *delta, level, now_ms)
                    .await
            }
            _ => {
                let current = self
                    .read_versions(keyspace, shard, vec![key.clone()], level)
                    .await?
                    .pop()
                    .flatten()
                    .filter(|v| v.is_live(now_ms));
                let current = match current {
                    Some(v) => Some(capdb_types::merge::render(v)?),
                    None => None,
                };
                let timestamp = self.hlc.now();
                let (effect, reply) =
                    m.apply(current.as_ref(), now_ms, timestamp, value_bytes_max)?;
                let version = match effect {
                    Effect::Unchanged => return Ok(reply),
                    Effect::Put(v) => v,
                    Effect::Remove(ts) => Value::tombstone(ts),
                };
                self.write_versions(keyspace, shard, vec![(key, version)], level)
                    .await?;
                Ok(reply)
            }
        }
    }

    /// INCRBY: one replica (this node when it is one) adds to its own slot of the key's
    /// PN-counter, then the new version goes to the other replicas like any write.
    async fn counter_add(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        key: Bytes,
        delta: i64,
        level: Level,
        now_ms: u64,
    ) -> Result<Reply> {
        // One owner only: a failed call may still have counted the increment there, so trying
        // another replica could count it twice. The caller sees an error with an unknown
        // outcome instead (like any write that times out).
        let mut order: Vec<NodeId> = shard.replicas.clone();
        order.sort_by_key(|&n| (n != self.me, n));
        let Some(owner) = order.into_iter().find(|&n| !self.detector.is_down(n)) else {
            return Err(Error::Unavailable(
                "no replica of the counter's shard is reachable; the increment was not applied"
                    .into(),
            ));
        };
        let timestamp = self.hlc.now();
        let req = ApRequest::CounterAdd {
            keyspace: keyspace.to_string(),
            key: key.clone(),
            delta,
            timestamp,
            now_ms,
        };
        match self.call(owner, req, REPLICA_TIMEOUT).await {
            Ok(ApResponse::Value(v)) => {
                let total = capdb_types::merge::render(v.clone())?;
                let total = capdb_types::mutation::parse_i64_strict(&total.data)
                    .ok_or(Error::NotAnInteger)?;
                // The owner already holds the new version: one acknowledgement.
                let others: Vec<NodeId> = shard
                    .replicas
                    .iter()
                    .copied()
                    .filter(|&n| n != owner)
                    .collect();
                let needed = level.required(shard.replicas.len()) - 1;
                if let Err(e) = self
                    .replicate(keyspace, others, vec![(key, v)], needed, level)
                    .await
                {
                    // Counted already: a retry would count it twice.
                    return Err(Error::OutcomeUnknown(format!(
                        "the increment was counted on node {owner} but did not reach the level {} ({e}); it will reach the other replicas later: do not retry it",
                        level.as_str()
                    )));
                }
                Ok(Reply::Integer(total))
            }
            Ok(other) => Err(Error::Io(format!("unexpected answer {other:?}"))),
            // A definite refusal (not an integer, overflow) is final.
            Err(CallError::Refused(e @ (Error::NotAnInteger | Error::Overflow))) => Err(e),
            Err(e) => Err(Error::OutcomeUnknown(format!(
                "the increment's outcome is unknown ({e}); it may have been counted: read before retrying"
            ))),
        }
    }

    /// A page of live keys of one shard, from one replica (this node when it is one).
    #[allow(clippy::too_many_arguments)]
    pub async fn scan_shard(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard_index: usize,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        now_ms: u64,
    ) -> Result<(Vec<(Bytes, Value)>, Option<Bytes>)> {
        let entry = self.entry(keyspace)?;
        let shard = entry
            .shards
            .get(shard_index)
            .ok_or_else(|| Error::InvalidInput("scan position past the last shard".into()))?;
        let mut order = shard.replicas.clone();
        order.sort_by_key(|&n| (n != self.me, self.detector.is_down(n), n));
        let mut last_err = String::from("no replica reachable");
        for node in order {
            let req = ApRequest::Scan {
                keyspace: keyspace.to_string(),
                slots: shard.slots,
                after: after.clone(),
                prefix: prefix.clone(),
                limit,
                now_ms,
            };
            match self.call(node, req, REPLICA_TIMEOUT).await {
                Ok(ApResponse::Page(entries, next)) => return Ok((entries, next)),
                Ok(other) => last_err = format!("unexpected answer {other:?}"),
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(Error::Unavailable(format!(
            "no replica of shard {shard_index} answered the scan ({last_err})"
        )))
    }

    pub fn shard_count(&self, keyspace: &KeyspaceName) -> Result<usize> {
        Ok(self.entry(keyspace)?.shards.len())
    }

    /// Deletes every key (FLUSHDB): writes a tombstone for each live key, shard by shard.
    pub async fn clear(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        level: Level,
        now_ms: u64,
    ) -> Result<()> {
        let entry = self.entry(keyspace)?;
        for (i, shard) in entry.shards.iter().enumerate() {
            let mut after = None;
            loop {
                let (page, next) = self
                    .scan_shard(keyspace, i, after.clone(), None, 1000, now_ms)
                    .await?;
                let ts = self.hlc.now();
                let entries: Vec<(Bytes, Value)> = page
                    .into_iter()
                    .map(|(k, _)| (k, Value::tombstone(ts)))
                    .collect();
                self.write_versions(keyspace, shard, entries, level).await?;
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Reconciliation statistics of this node, as JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        self.stats.to_json(&self.hints)
    }
}

/// Blind writes waiting to go out: per shard index, the positions of their commands in the
/// batch and the versions.
type BlindBatches = BTreeMap<usize, (Vec<usize>, Vec<(Bytes, Value)>)>;

fn shard_index(entry: &KeyspaceEntry, key: &[u8]) -> usize {
    let slot = capdb_cluster::slots::key_slot(key);
    capdb_cluster::slots::shard_of_slot(slot, entry.shards.len() as u32) as usize
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

/// Serves the `ap` channel: requests from other nodes' coordinators.
pub struct ApHandler(pub Arc<Ap>);

impl Handler<ApService> for ApHandler {
    async fn handle(&self, _from: NodeId, request: ApRequest) -> Result<ApResponse> {
        self.0.handle(request).await
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
