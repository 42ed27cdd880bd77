//! A node's state: its storage engine, its keyspace catalog and their stores.
//!
//! The catalog is persisted in the engine's `_meta` table (one JSON [`KeyspaceSpec`] per
//! keyspace) and loaded at start; `default` (mode `cp`) is created on first start and can never be
//! dropped. Durable keyspaces (`cp`, `ap`) are tables of the [`DiskEngine`]; `cache` keyspaces are
//! [`MemStore`]s whose specification is durable but whose data is not.
//!
//! Front ends resolve a keyspace once (at `SELECT`, or per HTTP request) and then talk to its
//! [`Store`] directly; there is no global lock on the data path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use capdb_storage::disk::{DiskEngine, DiskTable};
use capdb_storage::memory::MemStore;
use capdb_storage::{BatchReplies, KeyspaceStore, ScanPage, ScanRange};
use capdb_types::keyspace::DEFAULT_KEYSPACE;
use capdb_types::{Error, Hlc, KeyspaceName, KeyspaceSpec, Mode, Mutation, Result, Value};

use crate::config::Config;
use crate::metrics::Metrics;

const META_PREFIX: &str = "keyspace/";

fn table_name(name: &KeyspaceName) -> String {
    format!("ks/{name}")
}

/// Where a keyspace's data lives.
pub enum Store {
    Disk(DiskTable),
    Memory(Arc<MemStore>),
}

impl Store {
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>> {
        match self {
            Store::Disk(t) => t.get(key, now_ms),
            Store::Memory(m) => m.get(key, now_ms),
        }
    }

    pub fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        match self {
            Store::Disk(t) => t.read_with(key, now_ms, f),
            Store::Memory(m) => m.read_with(key, now_ms, f),
        }
    }

    pub async fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<BatchReplies> {
        match self {
            Store::Disk(t) => t.apply(mutations, now_ms).await,
            Store::Memory(m) => m.apply(mutations, now_ms).await,
        }
    }

    pub fn scan(&self, range: &ScanRange, limit: usize, now_ms: u64) -> Result<ScanPage> {
        match self {
            Store::Disk(t) => t.scan(range, limit, now_ms),
            Store::Memory(m) => m.scan(range, limit, now_ms),
        }
    }

    pub fn len(&self) -> Result<u64> {
        match self {
            Store::Disk(t) => t.len(),
            Store::Memory(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub async fn clear(&self) -> Result<()> {
        match self {
            Store::Disk(t) => t.clear().await,
            Store::Memory(m) => m.clear().await,
        }
    }
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

    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>> {
        self.check_live()?;
        self.store.get(key, now_ms)
    }

    /// Calls `f` with the live value of `key` without copying it where the store allows.
    pub fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        self.check_live()?;
        self.store.read_with(key, now_ms, f)
    }

    pub async fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<BatchReplies> {
        self.check_live()?;
        self.store.apply(mutations, now_ms).await
    }
}

/// Everything one running node shares between its front ends.
pub struct Node {
    pub config: Config,
    pub hlc: Arc<Hlc>,
    pub engine: DiskEngine,
    pub metrics: Metrics,
    keyspaces: RwLock<BTreeMap<KeyspaceName, Arc<Keyspace>>>,
    /// Serializes keyspace creation and removal.
    admin: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    next_client_id: AtomicU64,
    pub commands_processed: AtomicU64,
    pub started: std::time::Instant,
    pub scan_cursors: ScanCursors,
}

/// Most SCAN cursors remembered; the oldest is forgotten first (its next use gets
/// `ERR invalid cursor` and the client restarts from 0).
pub const SCAN_CURSORS_MAX: usize = 100_000;

/// Cursor id -> (keyspace, last key returned), and ids oldest first.
type CursorTable = (
    std::collections::HashMap<u64, (KeyspaceName, Bytes)>,
    std::collections::VecDeque<u64>,
);

/// Server-side SCAN positions behind the numeric cursors RESP clients pass around.
pub struct ScanCursors {
    inner: std::sync::Mutex<CursorTable>,
    next: AtomicU64,
}

impl ScanCursors {
    fn new() -> ScanCursors {
        // Start at a random point so that cursors from before a restart do not name new positions.
        let start =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
                >> 16;
        ScanCursors {
            inner: std::sync::Mutex::new(Default::default()),
            next: AtomicU64::new(start.max(1)),
        }
    }

    /// Remembers a position and returns its cursor (never 0).
    pub fn put(&self, keyspace: &KeyspaceName, after: Bytes) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed).max(1);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if order.len() >= SCAN_CURSORS_MAX
            && let Some(old) = order.pop_front()
        {
            map.remove(&old);
        }
        map.insert(id, (keyspace.clone(), after));
        order.push_back(id);
        id
    }

    /// The position of a cursor, if it is known and belongs to this keyspace. Cursors stay valid
    /// after use, so a client may retry a page.
    pub fn get(&self, cursor: u64, keyspace: &KeyspaceName) -> Option<Bytes> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(&cursor)
            .filter(|(k, _)| k == keyspace)
            .map(|(_, b)| b.clone())
    }
}

impl Node {
    /// Opens the engine, loads the catalog and makes sure `default` exists.
    pub async fn open(config: Config, metrics: Metrics) -> Result<Arc<Node>> {
        let hlc = Arc::new(Hlc::new());
        let engine =
            DiskEngine::open(&config.data_dir, hlc.clone(), config.limits.value_bytes_max)?;
        let node = Arc::new(Node {
            config,
            hlc,
            engine,
            metrics,
            keyspaces: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            next_client_id: AtomicU64::new(1),
            commands_processed: AtomicU64::new(0),
            started: std::time::Instant::now(),
            scan_cursors: ScanCursors::new(),
        });
        for (key, raw) in node.engine.meta_list(META_PREFIX)? {
            let spec: KeyspaceSpec = serde_json::from_slice(&raw)
                .map_err(|e| Error::Corruption(format!("catalog entry {key}: {e}")))?;
            let ks = node.build_keyspace(spec);
            node.write_catalog().insert(ks.spec.name.clone(), ks);
        }
        let default = KeyspaceName::default_keyspace();
        if !node.read_catalog().contains_key(&default) {
            let spec = KeyspaceSpec::new(default, Mode::Cp, None, None, None, None)?;
            node.create_keyspace(spec).await?;
        }
        Ok(node)
    }

    fn read_catalog(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<KeyspaceName, Arc<Keyspace>>> {
        self.keyspaces.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_catalog(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<KeyspaceName, Arc<Keyspace>>> {
        self.keyspaces.write().unwrap_or_else(|p| p.into_inner())
    }

    fn build_keyspace(&self, spec: KeyspaceSpec) -> Arc<Keyspace> {
        let store = match spec.mode {
            Mode::Cache => Store::Memory(Arc::new(MemStore::new(
                spec.max_memory_bytes
                    .expect("cache specs carry a memory limit"),
                spec.eviction.unwrap_or_default(),
                self.hlc.clone(),
                self.config.limits.value_bytes_max,
            ))),
            Mode::Cp | Mode::Ap => Store::Disk(
                self.engine
                    .table(&table_name(&spec.name), spec.mode == Mode::Ap),
            ),
        };
        Arc::new(Keyspace {
            spec,
            store,
            dropped: AtomicBool::new(false),
        })
    }

    /// The keyspace with this name.
    pub fn keyspace(&self, name: &str) -> Result<Arc<Keyspace>> {
        let name = KeyspaceName::new(name)?;
        self.read_catalog()
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::KeyspaceNotFound(name.to_string()))
    }

    pub fn default_keyspace(&self) -> Arc<Keyspace> {
        self.keyspace(DEFAULT_KEYSPACE)
            .expect("the default keyspace always exists")
    }

    /// Every keyspace, by name.
    pub fn keyspaces(&self) -> Vec<Arc<Keyspace>> {
        self.read_catalog().values().cloned().collect()
    }

    pub async fn create_keyspace(&self, spec: KeyspaceSpec) -> Result<Arc<Keyspace>> {
        let _admin = self.admin.lock().await;
        if self.read_catalog().contains_key(&spec.name) {
            return Err(Error::KeyspaceExists(spec.name.to_string()));
        }
        let json = serde_json::to_vec(&spec).expect("specs serialize");
        self.engine
            .create_table(
                &table_name(&spec.name),
                &format!("{META_PREFIX}{}", spec.name),
                json,
            )
            .await?;
        let ks = self.build_keyspace(spec);
        self.write_catalog()
            .insert(ks.spec.name.clone(), ks.clone());
        tracing::info!(keyspace = %ks.spec.name, mode = ks.spec.mode.as_str(), "keyspace created");
        Ok(ks)
    }

    pub async fn drop_keyspace(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        let ks = self.keyspace(name)?;
        if ks.spec.name.as_str() == DEFAULT_KEYSPACE {
            return Err(Error::InvalidInput(
                "the default keyspace cannot be dropped".into(),
            ));
        }
        ks.dropped.store(true, Ordering::Release);
        self.engine
            .drop_table(
                &table_name(&ks.spec.name),
                &format!("{META_PREFIX}{}", ks.spec.name),
            )
            .await?;
        if let Store::Memory(m) = &ks.store {
            m.clear().await?;
        }
        self.write_catalog().remove(&ks.spec.name);
        tracing::info!(keyspace = %ks.spec.name, "keyspace dropped");
        Ok(())
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
    /// durable keyspaces a bounded sweep of [`DISK_SWEEP_KEYS`] keys per second each.
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
                    Store::Disk(t) if round.is_multiple_of(10) => {
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
                    Store::Disk(_) => {}
                }
            }
        }
    }
}

/// Keys examined per durable keyspace per second by active expiry. Expired keys are invisible to
/// readers at once (lazy expiry); the sweep only reclaims their space.
pub const DISK_SWEEP_KEYS: usize = 2_000;
