//! A node: its storage engine, its Raft groups and `ap` service, the keyspace catalog front
//! ends use, and the loops that keep them following the cluster map.
//!
//! # Rooms
//!
//! - this file: [`Node`], the catalog (rebuilt by a background task whenever the map changes,
//!   so lookups on the request path are a map read) and keyspace administration;
//! - [`router`]: a keyspace and the store of its mode, the one place that knows the modes;
//! - [`control`]: the node's control loop (registration, local groups following the map, the
//!   meta leader's placement duties);
//! - [`admin`]: the admin service peers call (status), and this node's status;
//! - [`settings`]: what `CONFIG SET` changes at run time.

pub mod admin;
pub mod blocking;
pub mod changes;
pub mod control;
pub mod job_library;
pub mod jobs;
pub mod merged;
pub mod prefixed;
pub mod pubsub;
pub mod router;
pub mod settings;
pub mod snapshot;
pub mod txns;
pub mod view_update;
pub mod views;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use capdb_ap::Ap;
use capdb_cluster::{ClusterState, MetaCommand, NodeId, NodeInfo, placement};
use capdb_raft::Groups;
use capdb_storage::disk::DiskEngine;
use capdb_types::keyspace::DEFAULT_KEYSPACE;
use capdb_types::{Error, Hlc, KeyspaceName, KeyspaceSpec, Result};

use crate::config::Config;
pub use crate::keyscan::{SCAN_CURSORS_MAX, ScanCursor, ScanCursors, ScanPosition, ShardScope};
use crate::metrics::Metrics;
pub use router::{ChangesPage, Consistency, Keyspace, MemoryUse, TxnPartPage, Watched};

/// Everything one running node shares between its front ends.
pub struct Node {
    pub config: Config,
    pub hlc: Arc<Hlc>,
    pub engine: DiskEngine,
    /// This node as the cluster map lists it (addresses, labels).
    pub info: NodeInfo,
    /// The Raft groups this node holds (`cp` shards and the meta group).
    pub groups: Arc<Groups>,
    /// Leaderless replication of `ap` keyspaces.
    pub ap: Arc<Ap>,
    /// The coordinator of this node's cross-shard `cp` transactions.
    pub txns: Arc<txns::TxnCoordinator>,
    admin_peers: admin::AdminPeers,
    /// Subscriptions on this node and delivery to the others.
    pub pubsub: Arc<pubsub::PubSub>,
    /// Clients blocked on keys here, and other nodes' interest in keys.
    pub blocking: blocking::Blocking,
    /// Jobs: the task channel to other nodes, the jobs coordinated here (`jobs.rs`).
    pub jobs: jobs::Jobs,
    pub metrics: Metrics,
    catalog: RwLock<BTreeMap<KeyspaceName, Arc<Keyspace>>>,
    shutting_down: AtomicBool,
    next_client_id: AtomicU64,
    pub commands_processed: AtomicU64,
    pub started: std::time::Instant,
    pub scan_cursors: ScanCursors,
    /// What `CONFIG SET` changes at run time (per node, as in Redis Cluster).
    pub settings: settings::Settings,
}

impl Node {
    /// A node over running groups and `ap` service; starts following the map (catalog and
    /// control loop).
    pub fn new(
        config: Config,
        engine: DiskEngine,
        hlc: Arc<Hlc>,
        info: NodeInfo,
        groups: Arc<Groups>,
        ap: Arc<Ap>,
        metrics: Metrics,
    ) -> Arc<Node> {
        let crash = config.cluster.debug.txn_crash;
        let job_throttle = config.cluster.job_throttle;
        let node = Arc::new(Node {
            config,
            hlc,
            engine,
            admin_peers: admin::AdminPeers(capdb_transport::Peers::new(
                info.id,
                groups.filter().clone(),
            )),
            pubsub: Arc::new(pubsub::PubSub::new(
                capdb_transport::Peers::new(info.id, groups.filter().clone()),
                metrics.pubsub_dropped.clone(),
            )),
            blocking: blocking::Blocking::default(),
            jobs: jobs::Jobs::new(
                capdb_transport::Peers::new(info.id, groups.filter().clone()),
                job_throttle,
            ),
            info,
            txns: txns::coordinator(groups.clone(), crash),
            groups,
            ap,
            metrics,
            catalog: RwLock::default(),
            shutting_down: AtomicBool::new(false),
            next_client_id: AtomicU64::new(1),
            commands_processed: AtomicU64::new(0),
            started: std::time::Instant::now(),
            scan_cursors: ScanCursors::new(),
            settings: settings::Settings::default(),
        });
        let n = node.clone();
        tokio::spawn(async move { n.follow_map().await });
        tokio::spawn(control::run(node.clone()));
        tokio::spawn(txns::recover_orphans(node.clone()));
        tokio::spawn(changes::trim_changes(node.clone()));
        tokio::spawn(jobs::run_coordinators(node.clone()));
        tokio::spawn(jobs::run_throttle(node.clone()));
        tokio::spawn(views::view_work(node.clone()));
        node
    }

    pub fn id(&self) -> NodeId {
        self.info.id
    }

    /// The latest cluster map this node has applied.
    pub fn cluster(&self) -> Arc<ClusterState> {
        self.groups.cluster()
    }

    fn services(&self) -> router::Services {
        router::Services {
            me: self.id(),
            engine: self.engine.clone(),
            hlc: self.hlc.clone(),
            groups: self.groups.clone(),
            txns: self.txns.clone(),
            ap: self.ap.clone(),
            value_bytes_max: self.config.limits.value_bytes_max,
        }
    }

    /// Rebuilds the catalog whenever the cluster map changes.
    async fn follow_map(self: Arc<Self>) {
        let mut changes = self.groups.watch_cluster();
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
        let services = self.services();
        let mut new = BTreeMap::new();
        for (name, entry) in &state.keyspaces {
            let ks = match old.get(name).filter(|ks| ks.serves(entry)) {
                Some(ks) => ks.clone(),
                None => Arc::new(Keyspace::open(entry, &services).await?),
            };
            new.insert(name.clone(), ks);
        }
        for (name, ks) in &old {
            if !new.contains_key(name) {
                ks.close().await;
            }
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    fn read_catalog(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<KeyspaceName, Arc<Keyspace>>> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The keyspace with this name.
    /// A keyspace users may address (system keyspaces, named with a leading `_`, are not:
    /// only their own code reads and writes them).
    pub fn keyspace(&self, name: &str) -> Result<Arc<Keyspace>> {
        if jobs::is_system_keyspace(name) {
            return Err(Error::InvalidInput(format!(
                "'{name}' is a system keyspace: it cannot be selected, read, written or dropped"
            )));
        }
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

    /// Every keyspace users may address, by name (system keyspaces are left out: FLUSHALL,
    /// INFO and listings never touch them).
    pub fn keyspaces(&self) -> Vec<Arc<Keyspace>> {
        self.read_catalog()
            .values()
            .filter(|k| !jobs::is_system_keyspace(k.spec.name.as_str()))
            .cloned()
            .collect()
    }

    /// Whether this node can serve: registered, the catalog built, and caught up (every Raft
    /// group it holds knows a leader and has applied nearly all of its log). Kubernetes
    /// readiness (`/readyz`) uses this, so a restarted pod takes traffic once it has caught up.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && self.cluster().nodes.contains_key(&self.id())
            && self.default_keyspace().is_ok()
            && self.groups.caught_up(READY_APPLY_LAG_MAX)
    }

    /// Creates a keyspace cluster-wide; returns once this node's catalog has it.
    pub async fn create_keyspace(&self, spec: KeyspaceSpec) -> Result<Arc<Keyspace>> {
        let state = self.cluster();
        if state.keyspaces.contains_key(&spec.name) {
            return Err(Error::KeyspaceExists(spec.name.to_string()));
        }
        let replicas = placement::place_keyspace(&state, spec.shards, spec.replication_factor);
        let name = spec.name.clone();
        self.groups
            .propose_meta(MetaCommand::CreateKeyspace { spec, replicas })
            .await?;
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
        self.groups
            .propose_meta(MetaCommand::DropKeyspace(ks.spec.name.clone()))
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
    /// each node's `ap` replica tables a bounded sweep of [`DISK_SWEEP_KEYS`] keys per second each,
    /// and `cp` shards, once a second, a deletion through the log of expired keys the shard's
    /// leader finds (see [`Keyspace::expire_step`]). Keys removed by expiry (and a cache's
    /// evictions) are published as `expired`/`evicted` keyspace events when they are wanted.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut cursors: BTreeMap<KeyspaceName, Option<Bytes>> = BTreeMap::new();
        let mut round: u64 = 0;
        while !self.is_shutting_down() {
            tick.tick().await;
            round += 1;
            let now = capdb_types::unix_now_ms();
            if round.is_multiple_of(10) {
                // Pins held past their time (`storage/src/disk/pins.rs`) are let go here, so an
                // idle node does not keep their read transactions (and redb's pages) alive.
                self.engine.pins_held();
            }
            for ks in self.keyspaces() {
                let cursor = cursors.remove(&ks.spec.name).flatten();
                let mut removed = Vec::new();
                let step = ks
                    .expire_step(
                        now,
                        round.is_multiple_of(10),
                        cursor,
                        DISK_SWEEP_KEYS,
                        &mut removed,
                    )
                    .await;
                let notify = self.settings.keyspace_events().active();
                let cache_removals = ks.cache_removals(notify);
                if notify && !(removed.is_empty() && cache_removals.is_empty()) {
                    use capdb_data::notify::{Class, Event};
                    use capdb_storage::memory::Removal;
                    let mut events: Vec<Event> = removed
                        .iter()
                        .map(|k| Event::new(Class::Expired, "expired", k))
                        .collect();
                    events.extend(cache_removals.iter().map(|(k, why)| match why {
                        Removal::Expired => Event::new(Class::Expired, "expired", k),
                        Removal::Evicted => Event::new(Class::Evicted, "evicted", k),
                    }));
                    self.pubsub
                        .publish_events(&self, ks.spec.name.as_str(), events);
                }
                match step {
                    Ok(next) => {
                        cursors.insert(ks.spec.name.clone(), next);
                    }
                    Err(e) => {
                        tracing::warn!(keyspace = %ks.spec.name, error = %e, "expiry sweep failed")
                    }
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
