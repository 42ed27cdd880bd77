//! A node's state: storage engine, the cluster (meta group and shard groups), and the keyspace
//! catalog front ends use.
//!
//! The catalog comes from the replicated cluster map: every node sees the same keyspaces. Each
//! keyspace has a [`Store`]:
//!
//! - `cp` keyspaces are [`Store::Replicated`]: keys hash to slots, slots to shards, and each
//!   shard is a Raft group; requests go to the shard's leader (forwarded if it lives elsewhere).
//! - `cache` keyspaces are [`Store::Memory`]: each node holds its own in-memory cache (the spec
//!   is cluster-wide, the data is per node).
//! - `ap` keyspaces are [`Store::Ap`]: leaderless replication (`capdb_replication::ap`); this
//!   node coordinates each request across the shard's replicas at the request's consistency
//!   level and holds a durable local table (with tombstones) for the shards it replicates.
//!
//! The catalog cache is rebuilt by a background task whenever the map changes, so lookups on
//! the request path are a map read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::state::KeyspaceEntry;
use capdb_cluster::{ClusterState, MetaCommand, placement};
use capdb_replication::ap::{Ap, Level};
use capdb_replication::manager::Manager;
use capdb_replication::network::ReadMode;
use capdb_storage::disk::DiskEngine;
use capdb_storage::memory::MemStore;
use capdb_storage::{BatchReplies, KeyspaceStore, ScanRange};
use capdb_types::keyspace::DEFAULT_KEYSPACE;
use capdb_types::{Error, Hlc, KeyspaceName, KeyspaceSpec, Mode, Mutation, Result, Value};

use crate::config::Config;
use crate::keyscan::walk_shards;
pub use crate::keyscan::{SCAN_CURSORS_MAX, ScanCursor, ScanCursors, ScanPosition, ShardScope};
use crate::metrics::Metrics;

/// How strongly a request must be confirmed, per keyspace mode: `cp` reads are linearizable
/// or stale (`READONLY`), `ap` reads and writes wait for one, a quorum or all replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    pub cp_read: ReadMode,
    pub ap_read: Level,
    pub ap_write: Level,
}

impl Default for Consistency {
    fn default() -> Self {
        Consistency {
            cp_read: ReadMode::Linearizable,
            // ap keyspaces put availability first: a single replica (or a hint) answers, so
            // every side of a partition keeps working. QUORUM for both gives
            // read-your-writes (R + W > N).
            ap_read: Level::One,
            ap_write: Level::One,
        }
    }
}

impl Consistency {
    /// Stale `cp` reads, `one` for `ap`: what internal best-effort reads (INFO, metrics) use.
    pub const RELAXED: Consistency = Consistency {
        cp_read: ReadMode::Stale,
        ap_read: Level::One,
        ap_write: Level::One,
    };
}

/// An `ap` keyspace: its name and the node's replication service.
pub struct ApStore {
    pub name: KeyspaceName,
    pub ap: Arc<Ap>,
    pub value_bytes_max: usize,
}

/// Where a keyspace's data lives.
pub enum Store {
    /// `ap`: leaderless replicas.
    Ap(ApStore),
    /// `cache`: in memory on this node.
    Memory(Arc<MemStore>),
    /// `cp`: Raft-replicated shards.
    Replicated(Replicated),
}

/// A `cp` keyspace: its shard layout and the node's group manager.
pub struct Replicated {
    pub entry: KeyspaceEntry,
    pub manager: Arc<Manager>,
}

/// One keyspace: its specification and its store.
pub struct Keyspace {
    pub spec: KeyspaceSpec,
    pub store: Store,
    dropped: AtomicBool,
}

impl Keyspace {
    /// Fails once the keyspace has been dropped (connections may still hold it selected).
    pub fn check_live(&self) -> Result<()> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(Error::KeyspaceNotFound(self.spec.name.to_string()));
        }
        Ok(())
    }

    /// Whether reads are served from this node's memory without any network hop.
    pub fn is_local(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// Calls `f` with the live value of `key` (local stores only; see [`Keyspace::is_local`]).
    pub fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        self.check_live()?;
        match &self.store {
            Store::Memory(m) => m.read_with(key, now_ms, f),
            Store::Replicated(_) | Store::Ap(_) => Err(Error::InvalidInput(
                "read_with on a replicated keyspace".into(),
            )),
        }
    }

    /// The live values of `keys`, in order.
    pub async fn get_many(
        &self,
        keys: &[Bytes],
        now_ms: u64,
        c: Consistency,
    ) -> Result<Vec<Option<Value>>> {
        self.check_live()?;
        let mode = c.cp_read;
        match &self.store {
            Store::Ap(a) => a.ap.get_many(&a.name, keys, c.ap_read, now_ms).await,
            Store::Memory(m) => keys.iter().map(|k| m.get(k, now_ms)).collect(),
            Store::Replicated(r) => {
                // One request per shard, in parallel; answers put back in key order.
                let mut by_group: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
                for (i, k) in keys.iter().enumerate() {
                    by_group
                        .entry(r.entry.shard_for_key(k).group)
                        .or_default()
                        .push(i);
                }
                let calls = by_group.iter().map(|(group, idx)| {
                    let ks: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
                    r.manager.read(*group, ks, mode, now_ms)
                });
                let results = futures::future::join_all(calls).await;
                let mut out = vec![None; keys.len()];
                for ((_, idx), values) in by_group.iter().zip(results) {
                    for (&i, v) in idx.iter().zip(values?) {
                        out[i] = v;
                    }
                }
                Ok(out)
            }
        }
    }

    pub async fn get(&self, key: &[u8], now_ms: u64, c: Consistency) -> Result<Option<Value>> {
        let mut v = self
            .get_many(&[Bytes::copy_from_slice(key)], now_ms, c)
            .await?;
        Ok(v.pop().flatten())
    }

    /// Applies mutations. Within one shard they apply atomically and in order; across shards
    /// of a replicated keyspace each shard applies its part (cross-shard atomicity is the job of
    /// transactions, a later feature).
    pub async fn apply(
        &self,
        mutations: Vec<Mutation>,
        now_ms: u64,
        c: Consistency,
    ) -> Result<BatchReplies> {
        self.check_live()?;
        match &self.store {
            Store::Ap(a) => {
                a.ap.apply(&a.name, mutations, c.ap_write, now_ms, a.value_bytes_max)
                    .await
            }
            Store::Memory(m) => m.apply(mutations, now_ms).await,
            Store::Replicated(r) => {
                let n = mutations.len();
                let mut by_group: BTreeMap<u64, (Vec<usize>, Vec<Mutation>)> = BTreeMap::new();
                for (i, m) in mutations.into_iter().enumerate() {
                    let e = by_group
                        .entry(r.entry.shard_for_key(m.key()).group)
                        .or_default();
                    e.0.push(i);
                    e.1.push(m);
                }
                let mut index_lists = Vec::new();
                let calls: Vec<_> = by_group
                    .into_iter()
                    .map(|(group, (idx, muts))| {
                        index_lists.push(idx);
                        r.manager.write_mutations(group, muts, now_ms)
                    })
                    .collect();
                let results = futures::future::join_all(calls).await;
                // A shard that failed fails its own mutations only: the others may have been
                // applied, and each command's reply must say what happened to it.
                let mut out: Vec<Option<Result<capdb_types::Reply>>> = vec![None; n];
                for (idx, replies) in index_lists.into_iter().zip(results) {
                    match replies {
                        Ok(replies) => {
                            for (i, r) in idx.into_iter().zip(replies) {
                                out[i] = Some(r);
                            }
                        }
                        Err(e) => {
                            for i in idx {
                                out[i] = Some(Err(e.clone()));
                            }
                        }
                    }
                }
                Ok(out
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| Err(Error::Io("missing reply".into()))))
                    .collect())
            }
        }
    }

    /// One page of keys in order, continuing from `pos`; returns the next position (`None`:
    /// done). Replicated keyspaces are scanned shard after shard (keys are ordered within a
    /// shard); `floor` (exclusive) bounds every shard from below.
    #[allow(clippy::too_many_arguments)]
    pub async fn scan(
        &self,
        pos: ScanPosition,
        floor: Option<Bytes>,
        prefix: Option<Bytes>,
        end: Option<Bytes>,
        limit: usize,
        now_ms: u64,
        c: Consistency,
    ) -> Result<(Vec<(Bytes, Value)>, Option<ScanPosition>)> {
        self.scan_in(&ShardScope::All, pos, floor, prefix, end, limit, now_ms, c)
            .await
    }

    /// [`Keyspace::scan`] over the shards of `scope` only (replicated keyspaces).
    #[allow(clippy::too_many_arguments)]
    pub async fn scan_in(
        &self,
        scope: &ShardScope,
        pos: ScanPosition,
        floor: Option<Bytes>,
        prefix: Option<Bytes>,
        end: Option<Bytes>,
        limit: usize,
        now_ms: u64,
        c: Consistency,
    ) -> Result<(Vec<(Bytes, Value)>, Option<ScanPosition>)> {
        self.check_live()?;
        let mode = c.cp_read;
        let local = |page: capdb_storage::ScanPage| {
            let next = page.next_after.map(|after| ScanPosition {
                shard: 0,
                after: Some(after),
            });
            (page.entries, next)
        };
        let range = ScanRange {
            after: pos.after.clone().or_else(|| floor.clone()),
            end: end.clone(),
            prefix: prefix.clone(),
        };
        match &self.store {
            Store::Memory(m) => Ok(local(m.scan(&range, limit, now_ms)?)),
            Store::Ap(a) => {
                // Shard after shard, each from one replica (scans are best effort in ap).
                let shards = a.ap.shard_count(&a.name)? as u32;
                walk_shards(
                    shards,
                    &ShardScope::All,
                    pos,
                    floor,
                    end,
                    limit,
                    |shard, after, want| {
                        let prefix = prefix.clone();
                        Box::pin(async move {
                            a.ap.scan_shard(&a.name, shard as usize, after, prefix, want, now_ms)
                                .await
                        })
                    },
                )
                .await
            }
            Store::Replicated(r) => {
                let shards = r.entry.shards.len() as u32;
                walk_shards(
                    shards,
                    scope,
                    pos,
                    floor,
                    end,
                    limit,
                    |shard, after, want| {
                        let group = r.entry.shards[shard as usize].group;
                        let prefix = prefix.clone();
                        Box::pin(async move {
                            r.manager
                                .scan(group, after, prefix, want, mode, now_ms)
                                .await
                        })
                    },
                )
                .await
            }
        }
    }

    /// Number of keys (DBSIZE).
    pub async fn len(&self, c: Consistency) -> Result<u64> {
        self.len_in(&ShardScope::All, c).await
    }

    /// Number of keys in the shards of `scope` (replicated keyspaces; the others count all).
    pub async fn len_in(&self, scope: &ShardScope, c: Consistency) -> Result<u64> {
        self.check_live()?;
        let mode = c.cp_read;
        match &self.store {
            Store::Ap(a) => {
                let mut n = 0u64;
                for shard in 0..a.ap.shard_count(&a.name)? {
                    let mut after = None;
                    loop {
                        let (page, next) =
                            a.ap.scan_shard(
                                &a.name,
                                shard,
                                after,
                                None,
                                10_000,
                                capdb_types::unix_now_ms(),
                            )
                            .await?;
                        n += page.len() as u64;
                        match next {
                            Some(k) => after = Some(k),
                            None => break,
                        }
                    }
                }
                Ok(n)
            }
            Store::Memory(m) => m.len(),
            Store::Replicated(r) => {
                let calls = r
                    .entry
                    .shards
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| scope.contains(*i as u32))
                    .map(|(_, s)| r.manager.count(s.group, mode));
                let counts = futures::future::join_all(calls).await;
                counts.into_iter().sum()
            }
        }
    }

    /// Deletes every key (FLUSHDB).
    pub async fn clear(&self, c: Consistency) -> Result<()> {
        self.check_live()?;
        match &self.store {
            Store::Ap(a) => {
                a.ap.clear(&a.name, c.ap_write, capdb_types::unix_now_ms())
                    .await
            }
            Store::Memory(m) => m.clear().await,
            Store::Replicated(r) => {
                for (i, s) in r.entry.shards.iter().enumerate() {
                    match r.manager.clear(s.group).await {
                        Ok(()) => {}
                        // Earlier shards were cleared: not "certainly nothing happened".
                        Err(e) if i > 0 && e.is_retryable() => {
                            return Err(Error::OutcomeUnknown(format!(
                                "{i} of {} shards were cleared, then: {e}",
                                r.entry.shards.len()
                            )));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }
}

/// Everything one running node shares between its front ends.
pub struct Node {
    pub config: Config,
    pub hlc: Arc<Hlc>,
    pub engine: DiskEngine,
    pub manager: Arc<Manager>,
    pub metrics: Metrics,
    catalog: RwLock<BTreeMap<KeyspaceName, Arc<Keyspace>>>,
    shutting_down: AtomicBool,
    next_client_id: AtomicU64,
    pub commands_processed: AtomicU64,
    pub started: std::time::Instant,
    pub scan_cursors: ScanCursors,
}

impl Node {
    pub fn new(
        config: Config,
        engine: DiskEngine,
        hlc: Arc<Hlc>,
        manager: Arc<Manager>,
        metrics: Metrics,
    ) -> Arc<Node> {
        let node = Arc::new(Node {
            config,
            hlc,
            engine,
            manager,
            metrics,
            catalog: RwLock::default(),
            shutting_down: AtomicBool::new(false),
            next_client_id: AtomicU64::new(1),
            commands_processed: AtomicU64::new(0),
            started: std::time::Instant::now(),
            scan_cursors: ScanCursors::new(),
        });
        let n = node.clone();
        tokio::spawn(async move { n.follow_map().await });
        node
    }

    /// Rebuilds the catalog whenever the cluster map changes.
    async fn follow_map(self: Arc<Self>) {
        let mut changes = self.manager.watch_cluster();
        loop {
            let state = changes.borrow_and_update().clone();
            if let Err(e) = self.rebuild_catalog(&state).await {
                tracing::warn!(error = %e, "catalog rebuild failed; will retry on the next map change");
            }
            if self.is_shutting_down() || changes.changed().await.is_err() {
                return;
            }
        }
    }

    async fn rebuild_catalog(&self, state: &ClusterState) -> Result<()> {
        let old = self.read_catalog().clone();
        let mut new = BTreeMap::new();
        for (name, entry) in &state.keyspaces {
            let reuse = old.get(name).filter(|ks| {
                ks.spec == entry.spec
                    && match &ks.store {
                        Store::Replicated(r) => r
                            .entry
                            .shards
                            .iter()
                            .map(|s| s.group)
                            .eq(entry.shards.iter().map(|s| s.group)),
                        _ => true,
                    }
            });
            let ks = match reuse {
                Some(ks) => ks.clone(),
                None => self.build_keyspace(entry).await?,
            };
            new.insert(name.clone(), ks);
        }
        for (name, ks) in &old {
            if !new.contains_key(name) {
                ks.dropped.store(true, Ordering::Release);
                if let Store::Memory(m) = &ks.store {
                    let _ = m.clear().await;
                }
                if let Store::Ap(a) = &ks.store {
                    let table = capdb_replication::ap::table_name(a.name.as_str());
                    let _ = self
                        .engine
                        .drop_table(&table, &format!("keyspace/{}", a.name))
                        .await;
                }
            }
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    async fn build_keyspace(&self, entry: &KeyspaceEntry) -> Result<Arc<Keyspace>> {
        let spec = entry.spec.clone();
        let store = match spec.mode {
            Mode::Cache => Store::Memory(Arc::new(MemStore::new(
                spec.max_memory_bytes
                    .expect("cache specs carry a memory limit"),
                spec.eviction.unwrap_or_default(),
                self.hlc.clone(),
                self.config.limits.value_bytes_max,
            ))),
            Mode::Ap => {
                let table = capdb_replication::ap::table_name(spec.name.as_str());
                self.engine
                    .create_table(&table, &format!("keyspace/{}", spec.name), Vec::new())
                    .await?;
                Store::Ap(ApStore {
                    name: spec.name.clone(),
                    ap: self.manager.ap().clone(),
                    value_bytes_max: self.config.limits.value_bytes_max,
                })
            }
            Mode::Cp => Store::Replicated(Replicated {
                entry: entry.clone(),
                manager: self.manager.clone(),
            }),
        };
        Ok(Arc::new(Keyspace {
            spec,
            store,
            dropped: AtomicBool::new(false),
        }))
    }

    fn read_catalog(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<KeyspaceName, Arc<Keyspace>>> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The keyspace with this name.
    pub fn keyspace(&self, name: &str) -> Result<Arc<Keyspace>> {
        let name = KeyspaceName::new(name)?;
        self.read_catalog()
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::KeyspaceNotFound(name.to_string()))
    }

    /// `default`, once the cluster has created it.
    pub fn default_keyspace(&self) -> Result<Arc<Keyspace>> {
        self.keyspace(DEFAULT_KEYSPACE).map_err(|_| {
            Error::Unavailable(
                "the cluster is still forming (no default keyspace yet); retry".into(),
            )
        })
    }

    /// The keyspace RESP connections start in and `SELECT 0` selects: `resp_keyspace`
    /// (`default` unless configured). A configured one must have been created by an operator.
    pub fn resp_keyspace(&self) -> Result<Arc<Keyspace>> {
        let name = &self.config.resp_keyspace;
        if name.as_str() == DEFAULT_KEYSPACE {
            return self.default_keyspace();
        }
        self.keyspace(name.as_str()).map_err(|_| {
            Error::InvalidInput(format!(
                "keyspace '{name}' (the resp_keyspace setting) does not exist; create it (POST /v1/keyspaces)"
            ))
        })
    }

    /// Every keyspace, by name.
    pub fn keyspaces(&self) -> Vec<Arc<Keyspace>> {
        self.read_catalog().values().cloned().collect()
    }

    /// Whether this node can serve: registered in the map, the catalog built.
    /// Whether this node can serve: registered, the catalog built, and caught up (every Raft
    /// group it holds knows a leader and has applied nearly all of its log). Kubernetes
    /// readiness (`/readyz`) uses this, so a restarted pod takes traffic once it has caught up.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && self
                .manager
                .cluster()
                .nodes
                .contains_key(&self.manager.id())
            && self.default_keyspace().is_ok()
            && self.manager.caught_up(READY_APPLY_LAG_MAX)
    }

    /// Creates a keyspace cluster-wide; returns once this node's catalog has it.
    pub async fn create_keyspace(&self, spec: KeyspaceSpec) -> Result<Arc<Keyspace>> {
        let state = self.manager.cluster();
        if state.keyspaces.contains_key(&spec.name) {
            return Err(Error::KeyspaceExists(spec.name.to_string()));
        }
        let replicas = placement::place_keyspace(&state, spec.shards, spec.replication_factor);
        let name = spec.name.clone();
        self.manager
            .meta(MetaCommand::CreateKeyspace { spec, replicas })
            .await
            .map_err(|e| match e {
                Error::InvalidInput(m) if m.contains("already exists") => {
                    Error::KeyspaceExists(name.to_string())
                }
                other => other,
            })?;
        let ks = self.wait_for(&name, true).await?.expect("present");
        tracing::info!(keyspace = %ks.spec.name, mode = ks.spec.mode.as_str(), "keyspace created");
        Ok(ks)
    }

    pub async fn drop_keyspace(&self, name: &str) -> Result<()> {
        let ks = self.keyspace(name)?;
        if ks.spec.name.as_str() == DEFAULT_KEYSPACE {
            return Err(Error::InvalidInput(
                "the default keyspace cannot be dropped".into(),
            ));
        }
        self.manager
            .meta(MetaCommand::DropKeyspace(ks.spec.name.clone()))
            .await?;
        self.wait_for(&ks.spec.name, false).await?;
        tracing::info!(keyspace = %ks.spec.name, "keyspace dropped");
        Ok(())
    }

    /// Waits (bounded) until the local catalog has (or no longer has) `name`.
    async fn wait_for(&self, name: &KeyspaceName, present: bool) -> Result<Option<Arc<Keyspace>>> {
        for _ in 0..250 {
            let found = self.read_catalog().get(name).cloned();
            if found.is_some() == present {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Unavailable(format!(
            "the change to keyspace '{name}' was accepted but has not reached this node yet; retry"
        )))
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Runs active expiry until shutdown: cache keyspaces every 100 ms (Redis's `hz 10`),
    /// each node's `ap` replica tables a bounded sweep of [`DISK_SWEEP_KEYS`] keys per second each.
    /// (Replicated keyspaces hide expired keys from readers; reclaiming their space through the
    /// log is not done yet.)
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut cursors: BTreeMap<KeyspaceName, Option<Bytes>> = BTreeMap::new();
        let mut round: u64 = 0;
        while !self.is_shutting_down() {
            tick.tick().await;
            round += 1;
            let now = capdb_types::unix_now_ms();
            for ks in self.keyspaces() {
                match &ks.store {
                    Store::Memory(m) => {
                        m.expire_cycle(now);
                    }
                    Store::Ap(a) if round.is_multiple_of(10) => {
                        let t = self
                            .engine
                            .table(&capdb_replication::ap::table_name(a.name.as_str()), true);
                        let cursor = cursors.remove(&ks.spec.name).flatten();
                        match t.sweep_expired(cursor, DISK_SWEEP_KEYS, now).await {
                            Ok((next, _)) => {
                                cursors.insert(ks.spec.name.clone(), next);
                            }
                            Err(e) => {
                                tracing::warn!(keyspace = %ks.spec.name, error = %e, "expiry sweep failed")
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Log entries a group may still have to apply while the node counts as ready.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// Keys examined per durable keyspace per second by active expiry. Expired keys are invisible to
/// readers at once (lazy expiry); the sweep only reclaims their space.
pub const DISK_SWEEP_KEYS: usize = 2_000;
