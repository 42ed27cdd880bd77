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
//! Hashes, sets, sorted sets and lists run `capdb-data`'s commands at the coordinator too
//! (`view.rs`), and replicate per-element deltas that merge as CRDTs
//! (`capdb_types::composite`): hash fields and sorted-set members last-writer-wins per element,
//! sets add-wins, a list as one register whose concurrent loss the report counts. Replicas store
//! a collection element by element (a head record per key, a record per element, see
//! `capdb_storage`'s `disk/ap.rs`): a write of k elements stores and sends O(k) bytes; reads
//! assemble the key whole. `reclaim.rs` removes the elements a delete hid, in bounded steps.
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
//! - this file: the service (`Ap`), its configuration and its channel's handler.
//! - `client.rs`: the operations clients ask for, coordinated (GET, writes, INCR, SCAN, FLUSHDB).
//! - `replicate.rs`: sending versions to replicas until a level is met, reading them back.
//! - [`replica`]: what a replica does with requests addressed to it.
//! - [`messages`]: the `ap` channel's messages and [`Level`].
//! - [`hints`], [`anti_entropy`], [`detector`]: hinted handoff, background repair, failure
//!   detection.
//! - `reclaim.rs`: removing element records hidden by a delete, in bounded steps.

pub mod anti_entropy;
mod client;
pub mod detector;
pub mod hints;
pub mod messages;
mod reclaim;
pub mod replica;
mod replicate;
mod view;

use std::sync::Arc;
use std::time::Duration;

use capdb_cluster::state::KeyspaceEntry;
use capdb_cluster::{ClusterState, NodeId};
use capdb_storage::disk::{DiskEngine, DiskTable};
use capdb_types::{Error, Hlc, KeyspaceName, Result};
use tokio::sync::watch;

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
    point_reads: PointReads,
    /// Turns true at shutdown; the background loops end (and release the storage engine).
    stop: watch::Sender<bool>,
}

/// How commands that name their elements (`capdb_data::point`) read big collections, since
/// start: `partial`, only the elements named; `fallback`, the whole collection after a
/// partial read did not settle the command (replicas disagreeing on what the key shows, or
/// the command reading past what was fetched).
#[derive(Default)]
struct PointReads {
    partial: std::sync::atomic::AtomicU64,
    fallback: std::sync::atomic::AtomicU64,
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
            point_reads: PointReads::default(),
            stop: watch::channel(false).0,
        });
        tokio::spawn(detector::run(ap.clone()));
        tokio::spawn(hints::run(ap.clone()));
        tokio::spawn(anti_entropy::run(ap.clone()));
        tokio::spawn(reclaim::run(ap.clone()));
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
}

fn shard_index(entry: &KeyspaceEntry, key: &[u8]) -> usize {
    let slot = capdb_cluster::slots::key_slot(key);
    capdb_cluster::slots::shard_of_slot(slot, entry.shards.len() as u32) as usize
}

/// Serves the `ap` channel: requests from other nodes' coordinators.
pub struct ApHandler(pub Arc<Ap>);

impl Handler<ApService> for ApHandler {
    async fn handle(&self, _from: NodeId, request: ApRequest) -> Result<ApResponse> {
        self.0.handle(request).await
    }
}
