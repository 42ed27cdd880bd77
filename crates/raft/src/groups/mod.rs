//! The Raft groups of one node, and everything that routes requests to them.
//!
//! # What runs where
//!
//! - Every node runs the **meta group** (group 0): a voter on the first three nodes of the map,
//!   a learner elsewhere. Its state machine publishes the [`ClusterState`] ([`meta`]).
//! - A node runs a **data group** for each `cp` shard whose `replicas` include it. The initial
//!   replicas of a new shard bootstrap it (all with the same membership, which openraft allows);
//!   replicas added later start empty and are brought in by the group's leader.
//! - [`Groups::follow_map`] (called by the node's control loop on every map change and twice a
//!   second) starts and stops local groups, and on groups this node leads, moves the Raft
//!   membership towards the map's `replicas` ([`membership`]).
//!
//! # Rooms
//!
//! - this file: the set of groups (start, stop, drop, status) and the addresses of peers;
//! - [`route`]: the one leader-routing loop every request uses, and writes;
//! - [`read`]: ReadIndex barriers and reads, scans, counts;
//! - [`membership`]: following the map (start/stop groups, membership changes);
//! - [`meta`]: proposing to the meta group, watching the map it publishes;
//! - [`peer`]: serving peers' Raft, snapshot and forwarded requests.

pub mod membership;
pub mod meta;
pub mod peer;
pub mod read;
pub mod route;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use capdb_cluster::{ClusterState, GroupId, META_GROUP, NodeId, placement};
use capdb_storage::disk::DiskEngine;
use capdb_storage::layout;
use capdb_transport::{PeerFilter, Peers};
use capdb_types::{Error, Hlc};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use crate::command::{PeerNode, TypeConfig};
use crate::log_store::LogStore;
use crate::messages::{ForwardService, GroupStatus};
use crate::network::{NetworkFactory, RaftPeers};
use crate::sessions::RequestIds;
use crate::state_machine::{Kind, StateMachine};

/// A Raft group of this node.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Longest time a client request waits for a leader before failing with a retryable error.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// A learner is "caught up" when it is at most this many entries behind the leader.
const CATCH_UP_ENTRIES: u64 = 64;

/// Static settings of a node's Raft groups.
pub struct GroupsConfig {
    pub me: NodeId,
    /// The bootstrap voters of the meta group (`--initial-cluster`), or empty when joining.
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Peer addresses of existing members to join through (`--join`).
    pub join: Vec<String>,
    pub raft: Arc<openraft::Config>,
    /// TESTING ONLY (`--debug-unsafe-local-reads`): answer linearizable reads from the local
    /// replica without a read barrier. Breaks linearizability on purpose.
    pub unsafe_local_reads: bool,
    /// TESTING ONLY (`--debug-apply-duplicates`): state machines apply every copy of a retried
    /// write (exactly-once off), a deliberately broken mode the chaos checker must catch.
    pub apply_duplicates: bool,
    /// TESTING ONLY (`--debug-unsafe-txn`): a MULTI/EXEC transaction is proposed as one entry
    /// per command (not atomic, guards ignored), a deliberately broken mode the chaos
    /// `append` checker must catch.
    pub unsafe_txn: bool,
}

/// Raft timing used by capdb, for failover well under 1.5 s: a follower calls an election
/// when it has heard nothing for the leader lease (`election_timeout_max`) plus a random
/// 200-350 ms. Heartbeats every 60 ms keep the lease alive with room for slow fsyncs.
///
/// `snapshot_logs`: a group snapshots its state machine after this many log entries and then
/// purges the log up to the snapshot (keeping a tail for followers that are slightly behind).
pub fn default_raft_config(snapshot_logs: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "capdb".into(),
        heartbeat_interval: 60,
        election_timeout_min: 200,
        election_timeout_max: 350,
        install_snapshot_timeout: 60_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs),
        max_in_snapshot_log_to_keep: (snapshot_logs / 20).min(1_000),
        purge_batch_size: (snapshot_logs / 80).clamp(1, 256),
        // A leader restarted by a crash must win an election again. Applies and the committed
        // id are not fsync'd (the log is), so a leader restored without one would answer
        // ReadIndex reads from a state machine behind what it had acknowledged (openraft's
        // documented hazard; the kill -9 tests read `None` for acknowledged keys). A new term's
        // blank entry is what proves what is committed.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
}

/// Default of [`default_raft_config`]'s `snapshot_logs`.
pub const SNAPSHOT_LOGS_DEFAULT: u64 = 20_000;

/// How long a group asked to free the write-ahead log's oldest segment may take to build its
/// snapshot before the purge is given up (the log asks again).
const PINNING_SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// Snapshots `g` and purges its log up to what it had applied when asked (see
/// [`Groups::snapshot_when_pinning`]). A leader keeps what a follower still needs, within
/// the tail openraft would keep (`keep` entries): a follower further behind gets a snapshot,
/// as it would after openraft's own purge.
async fn snapshot_and_purge(g: &Group, keep: u64) -> Result<(), String> {
    let (applied, followers_matched) = {
        let m = g.raft.metrics().borrow_watched().clone();
        let matched = m.replication.as_ref().map(|r| {
            r.values()
                .map(|l| l.as_ref().map_or(0, |l| l.index))
                .min()
                .unwrap_or(u64::MAX)
        });
        (m.last_applied.map(|l| l.index), matched)
    };
    let Some(applied) = applied else {
        return Ok(());
    };
    let upto = match followers_matched {
        Some(matched) => applied.min(matched.max(applied.saturating_sub(keep))),
        None => applied,
    };
    g.raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| e.to_string())?;
    // After a restart the snapshot point is already the last applied entry, and a snapshot
    // of nothing new is not built again: the wait ends at once.
    g.raft
        .wait(Some(PINNING_SNAPSHOT_WAIT))
        .metrics(
            |m| m.snapshot.as_ref().is_some_and(|s| s.index >= applied),
            "a snapshot covering the applied entries",
        )
        .await
        .map_err(|e| e.to_string())?;
    // Unlike the purge after a snapshot, this one keeps no tail.
    g.raft
        .trigger()
        .purge_log(upto)
        .await
        .map_err(|e| e.to_string())
}

/// One group: its Raft instance, its log, and the reads waiting for a barrier.
pub(crate) struct Group {
    raft: Raft,
    log: LogStore,
    /// Linearizable reads waiting for a read barrier (see [`read`]).
    barrier: Mutex<read::BarrierQueue>,
}

/// The Raft groups of this node.
pub struct Groups {
    me: NodeId,
    engine: DiskEngine,
    hlc: Arc<Hlc>,
    raft_config: Arc<openraft::Config>,
    filter: PeerFilter,
    raft_peers: Arc<RaftPeers>,
    forward_peers: Peers<ForwardService>,
    join: Vec<String>,
    groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    cluster: watch::Receiver<Arc<ClusterState>>,
    /// The last leader each group's answers pointed to ([`route`]).
    leader_guesses: Mutex<HashMap<GroupId, NodeId>>,
    /// Groups whose membership change is in progress (one at a time per group).
    changing: Mutex<BTreeSet<GroupId>>,
    stopping: AtomicBool,
    /// See [`GroupsConfig::unsafe_local_reads`].
    unsafe_local_reads: bool,
    /// See [`GroupsConfig::apply_duplicates`].
    apply_duplicates: bool,
    /// See [`GroupsConfig::unsafe_txn`].
    unsafe_txn: bool,
    /// Stamps this node's writes so that each is applied at most once.
    ids: Arc<RequestIds>,
    /// TESTING ONLY (`POST /v1/debug/lose-write-answers`): the next this-many answers to writes
    /// forwarded to another node's leader are dropped as if the connection broke after the
    /// leader applied them.
    lose_write_answers: AtomicU64,
    /// See [`Groups::on_lock_wait`].
    lock_wait_hook: std::sync::OnceLock<route::LockWaitHook>,
    /// When this node last proposed a progress entry to each group
    /// ([`Groups::changes_progress`]), for coalescing.
    progress_sent: Mutex<HashMap<GroupId, (std::time::Instant, capdb_types::Timestamp)>>,
    /// Snapshots being received from leaders, spooled to disk (`crate::snapshot`).
    snapshots_in: crate::snapshot::Inbox,
}

fn unavailable(msg: impl Into<String>) -> Error {
    Error::Unavailable(msg.into())
}

impl Groups {
    /// Starts the meta group (bootstrapping it when this node is in `initial_cluster` and has
    /// never run). The node's control loop then calls [`Groups::follow_map`].
    pub async fn start(
        config: GroupsConfig,
        engine: DiskEngine,
        hlc: Arc<Hlc>,
        filter: PeerFilter,
    ) -> Result<Arc<Groups>, Error> {
        let me = config.me;
        let (tx, rx) = watch::channel(Arc::new(ClusterState::default()));
        // Founding members outside the meta voters reach the meta leader through the others.
        let mut join = config.join.clone();
        if join.is_empty() {
            join = config
                .initial_cluster
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(_, addr)| addr.clone())
                .collect();
        }
        let snapshots_in = crate::snapshot::Inbox::open(&engine.dir().join("snapshots-in"))
            .map_err(|e| Error::Io(format!("cannot open the snapshot inbox: {e}")))?;
        let groups = Arc::new(Groups {
            me,
            engine,
            hlc,
            raft_config: config.raft.clone(),
            raft_peers: Arc::new(RaftPeers {
                raft: Peers::new(me, filter.clone()),
                snapshot: Peers::new(me, filter.clone()),
            }),
            forward_peers: Peers::new(me, filter.clone()),
            filter,
            join,
            groups: RwLock::default(),
            cluster: rx,
            leader_guesses: Mutex::default(),
            changing: Mutex::default(),
            stopping: AtomicBool::new(false),
            unsafe_local_reads: config.unsafe_local_reads,
            apply_duplicates: config.apply_duplicates,
            unsafe_txn: config.unsafe_txn,
            ids: RequestIds::new(me),
            lose_write_answers: AtomicU64::new(0),
            lock_wait_hook: std::sync::OnceLock::new(),
            progress_sent: Mutex::new(HashMap::new()),
            snapshots_in,
        });
        groups.snapshot_when_pinning();
        groups.sweep_snapshot_inbox();
        let meta = groups
            .start_group(META_GROUP, Kind::Meta { published: tx })
            .await?;
        let pristine = meta
            .log
            .is_pristine()
            .map_err(|e| Error::Io(e.to_string()))?;
        if pristine && !config.initial_cluster.is_empty() {
            let voters: BTreeMap<NodeId, PeerNode> = config
                .initial_cluster
                .iter()
                .take(placement::META_VOTERS)
                .map(|(id, addr)| {
                    (
                        *id,
                        PeerNode {
                            peer_addr: addr.clone(),
                        },
                    )
                })
                .collect();
            if voters.contains_key(&me) {
                tracing::info!(?voters, "bootstrapping the meta group");
                if let Err(e) = meta.raft.initialize(voters).await {
                    tracing::info!(error = %e, "meta group already initialized");
                }
            }
        }
        Ok(groups)
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The peers this node refuses to talk to (simulated partitions), shared by every service.
    pub fn filter(&self) -> &PeerFilter {
        &self.filter
    }

    /// Whether [`Groups::shutdown`] has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn all(&self) -> Vec<(GroupId, Arc<Group>)> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Whether every group this node holds knows a leader and has applied all but at most
    /// `max_lag` entries of its log.
    pub fn caught_up(&self, max_lag: u64) -> bool {
        self.all().iter().all(|(_, g)| {
            let m = g.raft.metrics().borrow_watched().clone();
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let last = m.last_log_index.unwrap_or(0);
            m.current_leader.is_some() && last.saturating_sub(applied) <= max_lag
        })
    }

    fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Whether this node holds a replica of `group`.
    pub fn holds(&self, group: GroupId) -> bool {
        self.group(group).is_some()
    }

    async fn start_group(&self, group: GroupId, kind: Kind) -> Result<Arc<Group>, Error> {
        if let Some(g) = self.group(group) {
            return Ok(g);
        }
        let io = |e: std::io::Error| Error::Io(e.to_string());
        let log = LogStore::open(self.engine.clone(), group)
            .await
            .map_err(io)?;
        let sm = StateMachine::open(self.engine.clone(), group, kind)
            .map_err(io)?
            .apply_duplicates(self.apply_duplicates);
        let network = NetworkFactory {
            group,
            peers: self.raft_peers.clone(),
        };
        let raft = Raft::new(self.me, self.raft_config.clone(), network, log.clone(), sm)
            .await
            .map_err(|e| Error::Io(format!("cannot start group {group}: {e}")))?;
        let g = Arc::new(Group {
            raft,
            log,
            barrier: Mutex::default(),
        });
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        Ok(groups.entry(group).or_insert(g).clone())
    }

    /// Asks a group to snapshot and purge its log when the write-ahead log says its live
    /// entries keep the oldest segment from being reused (a group gone idle with unpurged
    /// entries), so the segment can be reused.
    ///
    /// The purge is asked for explicitly, up to what the snapshot covers: after a snapshot
    /// openraft keeps a tail of `max_in_snapshot_log_to_keep` entries (1,000), and purges
    /// only in batches. An idle group's tail of large entries (a bulk load's last thousand
    /// batches: ~20 MB here) then pinned the oldest segment for good, segments are reused
    /// oldest first, and once the other groups had written the log's limit every write on the
    /// node waited forever. A follower that lags past the purge gets a snapshot instead.
    fn snapshot_when_pinning(self: &Arc<Self>) {
        // Bounded: a group asked while the queue is full is asked again later by the log.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<GroupId>(64);
        self.engine.wal().set_pinned_hook(move |group| {
            let _ = tx.try_send(group);
        });
        let groups = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(group) = rx.recv().await {
                let Some(groups) = groups.upgrade() else {
                    return;
                };
                let Some(g) = groups.group(group) else {
                    continue;
                };
                let keep = groups.raft_config.max_in_snapshot_log_to_keep;
                // One task per ask (the log asks a group at most every few seconds).
                tokio::spawn(async move {
                    if let Err(e) = snapshot_and_purge(&g, keep).await {
                        tracing::warn!(group, error = %e, "could not snapshot and purge a group pinning the write-ahead log");
                    }
                });
            }
        });
    }

    /// Drops snapshot transfers abandoned by their senders (a leader that died or stopped
    /// sending), with their spools, every [`crate::snapshot::RECEIVING_IDLE_MAX`] / 4.
    fn sweep_snapshot_inbox(self: &Arc<Self>) {
        let groups = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::snapshot::RECEIVING_IDLE_MAX / 4).await;
                let Some(groups) = groups.upgrade() else {
                    return;
                };
                // Removing files: off the runtime's threads.
                let swept =
                    tokio::task::spawn_blocking(move || groups.snapshots_in.sweep_idle()).await;
                if let Ok(n) = swept
                    && n > 0
                {
                    tracing::info!(transfers = n, "dropped abandoned snapshot transfers");
                }
            }
        });
    }

    /// Stops a data group this node no longer holds and deletes its data.
    async fn drop_group(&self, group: GroupId) {
        assert_ne!(group, META_GROUP, "the meta group is never dropped");
        let g = self
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        if let Some(g) = g {
            tracing::info!(group, "dropping a replica this node no longer holds");
            let _ = g.raft.shutdown().await;
            // The log first: its entries must not outlive the watermarks below, or a later
            // replica of the same group on this node would start from them.
            if let Err(e) = self.engine.wal().truncate(group, 0).await {
                tracing::warn!(group, error = %e, "could not delete the dropped replica's log");
                return;
            }
            let metas = layout::RAFT_META_RECORDS
                .iter()
                .map(|w| layout::raft_meta_key(group, w))
                .collect();
            if let Err(e) = self
                .engine
                .drop_group(
                    vec![
                        layout::shard_table(group),
                        layout::change_txn_table(&layout::shard_table(group)),
                    ],
                    vec![
                        layout::raft_log_table(group),
                        layout::change_table(&layout::shard_table(group)),
                    ],
                    metas,
                    vec![layout::raft_sessions_prefix(group)],
                )
                .await
            {
                tracing::warn!(group, error = %e, "could not delete the dropped replica's data");
            }
        }
    }

    /// Stops every group (graceful shutdown). Leaders hand off leadership first when they can.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let groups = self.all();
        for (_, g) in &groups {
            self.transfer_away(&g.raft).await;
        }
        for (id, g) in groups {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = id, error = %e, "group did not shut down cleanly");
            }
        }
    }

    /// If this node leads `raft`, asks a caught-up voter to take over (used before stopping).
    async fn transfer_away(&self, raft: &Raft) {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return;
        }
        let Some(repl) = &m.replication else { return };
        let last = m.last_log_index.unwrap_or(0);
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        if let Some((&to, _)) = repl
            .iter()
            .filter(|(id, _)| **id != self.me && voters.contains(id))
            .max_by_key(|(_, matched)| matched.map(|l| l.index).unwrap_or(0))
            .filter(|(_, matched)| matched.map(|l| l.index).unwrap_or(0) + CATCH_UP_ENTRIES >= last)
        {
            let _ = raft.trigger().transfer_leader(to).await;
            let _ = raft
                .wait(Some(Duration::from_millis(800)))
                .metrics(|m| m.state != ServerState::Leader, "leadership transferred")
                .await;
        }
    }

    /// Moves leadership of every group this node leads elsewhere (`cluster drain`, preStop).
    pub async fn step_down_everywhere(&self) {
        for (_, g) in self.all() {
            self.transfer_away(&g.raft).await;
        }
    }

    /// The peer address of a node: from the map, else from the meta group's membership.
    fn addr_of(&self, node: NodeId) -> Option<String> {
        if let Some(n) = self.cluster().nodes.get(&node) {
            return Some(n.peer_addr.clone());
        }
        let meta = self.group(META_GROUP)?;
        let m = meta.raft.metrics().borrow_watched().clone();
        m.membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.peer_addr.clone())
    }

    /// The cross-shard transactions prepared and not decided on each data group this node
    /// leads (the recovery of orphans runs where the leader is; metrics).
    pub fn open_txns_led(&self, now_ms: u64) -> Vec<(GroupId, capdb_storage::disk::OpenTxns)> {
        self.all()
            .into_iter()
            .filter(|(g, _)| *g != META_GROUP && self.leads(*g))
            .filter_map(|(g, _)| {
                match self
                    .engine
                    .table(&layout::shard_table(g), false)
                    .open_txns(now_ms)
                {
                    Ok(open) => Some((g, open)),
                    Err(e) => {
                        tracing::warn!(group = g, error = %e, "cannot read open transactions");
                        None
                    }
                }
            })
            .collect()
    }

    /// The data groups this node leads whose change logs hold rows past their retention at
    /// `now_ms` (each is trimmed by an entry its leader proposes).
    pub fn changes_trim_due_led(&self, now_ms: u64) -> Vec<GroupId> {
        self.all()
            .into_iter()
            .filter(|(g, _)| *g != META_GROUP && self.leads(*g))
            .filter(|(g, _)| {
                self.engine
                    .table(&layout::shard_table(*g), false)
                    .changes_trim_due(now_ms, None)
                    .unwrap_or_else(|e| {
                        tracing::warn!(group = g, error = %e, "cannot read the change log");
                        false
                    })
            })
            .map(|(g, _)| g)
            .collect()
    }

    /// For each data group this node leads, the next step of its views' background work
    /// (`capdb_storage::disk` `views.rs`): a backfill per building view, a purge per dropped
    /// generation with rows left. Local reads; a group without views costs one lookup.
    pub fn views_work_led(&self) -> Vec<(GroupId, capdb_types::views::ViewCommand)> {
        use capdb_storage::KeyspaceStore;
        use capdb_types::Reply;
        use capdb_types::views::{ViewCommand, ViewDef, ViewState};
        let mut out = Vec::new();
        let query = |t: &capdb_storage::disk::DiskTable, sub: &'static [u8]| {
            let args = [
                bytes::Bytes::from_static(capdb_storage::disk::VIEWS_QUERY.as_bytes()),
                bytes::Bytes::from_static(sub),
            ];
            match t.query(&args, 0, 0) {
                Ok(Reply::Array(rows)) => rows,
                Ok(_) => Vec::new(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the views");
                    Vec::new()
                }
            }
        };
        for (g, _) in self.all() {
            if g == META_GROUP || !self.leads(g) {
                continue;
            }
            let t = self.engine.table(&layout::shard_table(g), false);
            // Async (Lua) views are built by their updater, not by backfill entries.
            let lua: Vec<bytes::Bytes> = query(&t, b"async-defs")
                .into_iter()
                .filter_map(|r| match r {
                    Reply::Bulk(name) => Some(name),
                    _ => None,
                })
                .collect();
            for row in query(&t, b"defs") {
                let Reply::Array(v) = row else { continue };
                let [Reply::Bulk(name), Reply::Bulk(def)] = &v[..] else {
                    continue;
                };
                let Ok(def) = postcard::from_bytes::<ViewDef>(def) else {
                    continue;
                };
                if let ViewState::Building { cursor, .. } = def.state
                    && !lua.contains(name)
                {
                    out.push((
                        g,
                        ViewCommand::Backfill {
                            name: name.clone(),
                            generation: def.generation,
                            after: cursor,
                        },
                    ));
                }
            }
            // Past its bounds here: the leader stops it, one entry for every replica.
            for row in query(&t, b"over") {
                let Reply::Array(v) = row else { continue };
                if let [
                    Reply::Bulk(name),
                    Reply::Integer(generation),
                    Reply::Bulk(why),
                ] = &v[..]
                {
                    out.push((
                        g,
                        ViewCommand::Overflow {
                            name: name.clone(),
                            generation: *generation as u64,
                            why: String::from_utf8_lossy(why).into_owned(),
                        },
                    ));
                }
            }
            for row in query(&t, b"gone") {
                let Reply::Array(v) = row else { continue };
                if let [Reply::Bulk(name), Reply::Integer(generation)] = &v[..] {
                    out.push((
                        g,
                        ViewCommand::Purge {
                            name: name.clone(),
                            generation: *generation as u64,
                        },
                    ));
                }
            }
        }
        out
    }

    /// The async (Lua) views kept (building or ready) on the shards this node leads:
    /// `(group, view name)`, for their updater (`server/src/node/views.rs`).
    pub fn views_async_led(&self) -> Vec<(GroupId, bytes::Bytes)> {
        use capdb_storage::KeyspaceStore;
        use capdb_types::Reply;
        let mut out = Vec::new();
        let args = [
            bytes::Bytes::from_static(capdb_storage::disk::VIEWS_QUERY.as_bytes()),
            bytes::Bytes::from_static(b"async-defs"),
        ];
        for (g, _) in self.all() {
            if g == META_GROUP || !self.leads(g) {
                continue;
            }
            let t = self.engine.table(&layout::shard_table(g), false);
            match t.query(&args, 0, 0) {
                Ok(Reply::Array(rows)) => out.extend(rows.into_iter().filter_map(|r| match r {
                    Reply::Bulk(name) => Some((g, name)),
                    _ => None,
                })),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the views"),
            }
        }
        out
    }

    /// Runs an internal read query on this replica of data group `g`, as it stands here (no
    /// read index: for work whose entries are compare-and-set, like an async view's update).
    pub fn query_replica(
        &self,
        g: GroupId,
        args: &[bytes::Bytes],
    ) -> Result<capdb_types::Reply, capdb_types::Error> {
        use capdb_storage::KeyspaceStore;
        self.engine
            .table(&layout::shard_table(g), false)
            .query(args, capdb_types::unix_now_ms(), 0)
    }

    /// This node's view of its groups, in group order.
    pub fn status(&self) -> Vec<GroupStatus> {
        let mut out: Vec<GroupStatus> = self
            .all()
            .into_iter()
            .map(|(group, g)| {
                let m = g.raft.metrics().borrow_watched().clone();
                GroupStatus {
                    group,
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    last_applied: m.last_applied.map(|l| l.index),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    learners: m.membership_config.membership().learner_ids().collect(),
                    replication: m
                        .replication
                        .as_ref()
                        .map(|r| r.iter().map(|(k, v)| (*k, v.map(|l| l.index))).collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by_key(|g| g.group);
        out
    }
}
