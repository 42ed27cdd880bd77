//! The Raft groups of one node, and everything that routes requests to them.
//!
//! # What runs where
//!
//! - Every node runs the **meta group** (group 0): a voter on the first three nodes of the map,
//!   a learner elsewhere. Its state machine publishes the [`ClusterState`] to [`Manager::cluster`].
//! - A node runs a **data group** for each shard whose `replicas` include it. The initial
//!   replicas of a new shard bootstrap it (all with the same membership, which openraft allows);
//!   replicas added later start empty and are brought in by the group's leader.
//! - The **reconciler** ([`Manager::reconcile`], on every map change and every second) starts
//!   and stops local groups, and on groups this node leads, moves the Raft membership towards
//!   the map's `replicas` (add learner, wait until caught up, change voters). On the meta leader
//!   it also registers the `default` keyspace and takes one placement step at a time.
//!
//! # Requests
//!
//! [`Manager::write`] and [`Manager::read`] serve a request on this node when it leads the group,
//! and otherwise forward it to the leader (learned from local Raft metrics, earlier answers, or
//! by trying replicas). Every request has a deadline ([`REQUEST_DEADLINE`]): during an election
//! or on the minority side of a partition the caller gets an error in bounded time, never a
//! wrong answer.
//!
//! Writes are stamped once with a [`RequestId`](crate::sessions::RequestId) and state machines
//! apply each id at most once, so a write whose answer was lost (leader died, connection broke,
//! hop timed out) is simply sent again, to whichever node leads now: a copy of an applied write
//! gets the first copy's reply. What the caller finally hears is the truth:
//!
//! | the caller gets | meaning |
//! |---|---|
//! | a reply | applied exactly once, with this reply |
//! | `Error::Unavailable` (`-TRYAGAIN`) | certainly not applied: every attempt was refused or never sent |
//! | `Error::OutcomeUnknown` (`-UNCERTAIN`) | some attempt may have been applied, and no leader could tell before the deadline |
//!
//! Linearizable reads use ReadIndex (`ensure_linearizable(ReadPolicy::ReadIndex)`): the leader
//! confirms with a quorum heartbeat sent after the read arrived that it still leads, then waits
//! until its state machine has applied everything committed before the read. This does not
//! depend on clocks, unlike a leader lease, which is why it is the default. `Stale` reads answer
//! from the local replica without that round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_cluster::{
    ClusterState, GroupId, META_GROUP, MetaCommand, MetaResponse, NodeId, NodeInfo, placement,
};
use capdb_storage::disk::DiskEngine;
use capdb_storage::{KeyspaceStore, ScanRange};
use capdb_types::{Error, Hlc, KeyspaceName, KeyspaceSpec, Mode, Mutation, Reply, Value};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, ReadPolicy, ServerState};
use tokio::sync::watch;

use crate::log_store::{LogStore, log_table, meta_key};
use crate::network::{
    ForwardError, GroupStatus, NetworkFactory, NodeStatus, PeerPool, PeerRequest, PeerResponse,
    ReadMode,
};
use crate::rpc::{self, PeerFilter, RpcError};
use crate::sessions::RequestIds;
use crate::state_machine::{Kind, StateMachine};
use crate::types::{PeerNode, Raft, Request, Response};

/// Longest time a client request waits for a leader before failing with a retryable error.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// Time one forwarded hop may take.
const HOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying when no leader is known (an election is running).
const RETRY_PAUSE: Duration = Duration::from_millis(40);
/// How often the reconciler runs even without map changes.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Minimum time between two placement moves proposed by the meta leader.
const PLACEMENT_STEP_EVERY: Duration = Duration::from_secs(1);
/// A leader that has heard from no quorum for this long refuses new writes before proposing
/// them (`-TRYAGAIN`, certainly not applied) instead of appending entries it most likely cannot
/// commit (which could only be answered "outcome unknown"). Heartbeats are acknowledged every
/// 60 ms; followers elect a new leader after 550-700 ms of silence. A stall shorter than the
/// request deadline only delays writes: they are retried until then.
const QUORUM_SILENCE_MAX: Duration = Duration::from_millis(500);
/// A learner is "caught up" when it is at most this many entries behind the leader.
const CATCH_UP_ENTRIES: u64 = 64;

/// Static settings of a node's manager.
pub struct ManagerConfig {
    pub me: NodeInfo,
    /// The bootstrap voters of the meta group (`--initial-cluster`), or empty when joining.
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Peer addresses of existing members to join through (`--join`).
    pub join: Vec<String>,
    pub raft: Arc<openraft::Config>,
    /// TESTING ONLY (`--debug-unsafe-local-reads`): answer linearizable reads from the local
    /// replica without a read barrier. Breaks linearizability on purpose.
    pub unsafe_local_reads: bool,
    /// Tunables of `ap` replication.
    pub ap: crate::ap::ApConfig,
    /// TESTING ONLY (`--debug-apply-duplicates`): state machines apply every copy of a retried
    /// write (exactly-once off), a deliberately broken mode the chaos checker must catch.
    pub apply_duplicates: bool,
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
        ..Default::default()
    }
}

/// Default of [`default_raft_config`]'s `snapshot_logs`.
pub const SNAPSHOT_LOGS_DEFAULT: u64 = 20_000;

struct Group {
    raft: Raft,
    log: LogStore,
    /// Linearizable reads waiting for a read barrier (see [`Manager::read_barrier`]).
    barrier: Mutex<BarrierQueue>,
}

#[derive(Default)]
struct BarrierQueue {
    running: bool,
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), ForwardError>>>,
}

/// Runs read barriers for `g` while reads are waiting, each serving every read that arrived
/// before it started.
async fn run_barriers(group: GroupId, g: Arc<Group>) {
    loop {
        let batch = {
            let mut q = g.barrier.lock().unwrap_or_else(|p| p.into_inner());
            if q.waiting.is_empty() {
                q.running = false;
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let result = match tokio::time::timeout(
            HOP_TIMEOUT,
            g.raft.ensure_linearizable(ReadPolicy::ReadIndex),
        )
        .await
        {
            Err(_) => Err(ForwardError::Db(unavailable(format!(
                "shard group {group}: read barrier timed out (no quorum?)"
            )))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(ForwardError::NotLeader {
                    leader: f
                        .leader_id
                        .map(|id| (id, f.leader_node.map(|n| n.peer_addr).unwrap_or_default())),
                })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
                Err(ForwardError::Db(unavailable(format!(
                    "shard group {group}: leader cannot reach a quorum ({q})"
                ))))
            }
            Ok(Err(e)) => Err(ForwardError::Db(unavailable(format!(
                "shard group {group}: {e}"
            )))),
        };
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

/// The Raft groups of this node.
pub struct Manager {
    me: NodeId,
    info: NodeInfo,
    engine: DiskEngine,
    hlc: Arc<Hlc>,
    raft_config: Arc<openraft::Config>,
    peers: Arc<PeerPool>,
    join: Vec<String>,
    groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    cluster: watch::Receiver<Arc<ClusterState>>,
    hints: Mutex<HashMap<GroupId, NodeId>>,
    /// Groups whose membership change is in progress (one at a time per group).
    changing: Mutex<BTreeSet<GroupId>>,
    last_placement: Mutex<Option<Instant>>,
    stopping: AtomicBool,
    /// See [`ManagerConfig::unsafe_local_reads`].
    unsafe_local_reads: bool,
    /// See [`ManagerConfig::apply_duplicates`].
    apply_duplicates: bool,
    /// Leaderless replication of `ap` keyspaces.
    ap: Arc<crate::ap::Ap>,
    /// Stamps this node's writes so that each is applied at most once.
    ids: Arc<RequestIds>,
    /// TESTING ONLY (`POST /v1/debug/lose-write-answers`): the next this-many answers to writes
    /// forwarded to another node's leader are dropped as if the connection broke after the
    /// leader applied them.
    lose_write_answers: AtomicU64,
}

/// The table holding a data group's keys.
pub fn shard_table(group: GroupId) -> String {
    format!("shard/{group}")
}

fn unavailable(msg: impl Into<String>) -> Error {
    Error::Unavailable(msg.into())
}

impl Manager {
    /// Starts the meta group (bootstrapping it when this node is in `initial_cluster` and has
    /// never run) and the background reconciler.
    pub async fn start(
        config: ManagerConfig,
        engine: DiskEngine,
        hlc: Arc<Hlc>,
        filter: PeerFilter,
    ) -> Result<Arc<Manager>, Error> {
        let me = config.me.id;
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
        let peers = Arc::new(PeerPool::new(me, filter));
        let ap = crate::ap::Ap::start(
            me,
            engine.clone(),
            hlc.clone(),
            peers.clone(),
            rx.clone(),
            config.ap.clone(),
        );
        let manager = Arc::new(Manager {
            ap,
            me,
            info: config.me.clone(),
            engine: engine.clone(),
            hlc,
            raft_config: config.raft.clone(),
            peers,
            join,
            groups: RwLock::default(),
            cluster: rx,
            hints: Mutex::default(),
            changing: Mutex::default(),
            last_placement: Mutex::default(),
            stopping: AtomicBool::new(false),
            unsafe_local_reads: config.unsafe_local_reads,
            apply_duplicates: config.apply_duplicates,
            ids: RequestIds::new(me),
            lose_write_answers: AtomicU64::new(0),
        });
        let meta = manager
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
        let m = manager.clone();
        tokio::spawn(async move { m.run_reconciler().await });
        Ok(manager)
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Whether every group this node holds knows a leader and has applied all but at most
    /// `max_lag` entries of its log.
    pub fn caught_up(&self, max_lag: u64) -> bool {
        let groups: Vec<Arc<Group>> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        groups.iter().all(|g| {
            let m = g.raft.metrics().borrow_watched().clone();
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let last = m.last_log_index.unwrap_or(0);
            m.current_leader.is_some() && last.saturating_sub(applied) <= max_lag
        })
    }

    /// The `ap` replication service.
    pub fn ap(&self) -> &Arc<crate::ap::Ap> {
        &self.ap
    }

    pub fn peers(&self) -> &Arc<PeerPool> {
        &self.peers
    }

    /// The latest cluster map this node has applied.
    pub fn cluster(&self) -> Arc<ClusterState> {
        self.cluster.borrow().clone()
    }

    /// A receiver that changes whenever the map does.
    pub fn watch_cluster(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.cluster.clone()
    }

    fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    async fn start_group(&self, group: GroupId, kind: Kind) -> Result<Arc<Group>, Error> {
        if let Some(g) = self.group(group) {
            return Ok(g);
        }
        let io = |e: std::io::Error| Error::Io(e.to_string());
        let log = LogStore::open(self.engine.clone(), group).map_err(io)?;
        let sm = StateMachine::open(self.engine.clone(), group, kind)
            .map_err(io)?
            .apply_duplicates(self.apply_duplicates);
        let network = NetworkFactory {
            group,
            peers: self.peers.clone(),
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

    /// Stops every group (graceful shutdown). Leaders hand off leadership first when they can.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.ap.shutdown();
        let groups: Vec<(GroupId, Arc<Group>)> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
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
        let groups: Vec<Arc<Group>> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for g in groups {
            self.transfer_away(&g.raft).await;
        }
    }

    // ---------------------------------------------------------------- addresses and leaders

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

    fn local_leader(&self, group: GroupId) -> Option<NodeId> {
        let g = self.group(group)?;
        g.raft.metrics().borrow_watched().current_leader
    }

    fn hint(&self, group: GroupId) -> Option<NodeId> {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
    }

    fn set_hint(&self, group: GroupId, node: Option<NodeId>) {
        let mut h = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        match node {
            Some(n) => {
                h.insert(group, n);
            }
            None => {
                h.remove(&group);
            }
        }
    }

    /// Candidates to send a request for `group` to, best first.
    fn candidates(&self, group: GroupId, attempt: usize) -> Vec<NodeId> {
        let mut out = Vec::new();
        if let Some(l) = self.local_leader(group) {
            out.push(l);
        }
        if let Some(h) = self.hint(group) {
            out.push(h);
        }
        let state = self.cluster();
        let replicas: Vec<NodeId> = if group == META_GROUP {
            state.nodes.keys().copied().collect()
        } else {
            state
                .find_group(group)
                .map(|(ks, i)| ks.shards[i].replicas.clone())
                .unwrap_or_default()
        };
        if !replicas.is_empty() {
            // Rotate through replicas on retries so a dead hint does not stick.
            for k in 0..replicas.len() {
                out.push(replicas[(attempt + k) % replicas.len()]);
            }
        }
        let mut seen = BTreeSet::new();
        out.retain(|n| seen.insert(*n));
        out
    }

    // ---------------------------------------------------------------- writes

    /// Proposes `request` to `group`'s leader, wherever it is, and returns the applied response.
    pub async fn write(&self, group: GroupId, request: Request) -> Result<Response, Error> {
        self.write_via(group, request, true).await
    }

    /// `write`, optionally allowed to go through `--join` seeds when no leader is known. A
    /// request forwarded on behalf of another node never uses seeds: two nodes that both know
    /// no leader would otherwise bounce it between them, proposing it again at every bounce.
    ///
    /// The request is stamped with a new id unless it already carries one (a request forwarded
    /// by another node keeps its origin's id), and every attempt sends the same stamp, so any
    /// failure may be retried: see the module doc for what the caller finally hears.
    async fn write_via(
        &self,
        group: GroupId,
        request: Request,
        via_seeds: bool,
    ) -> Result<Response, Error> {
        let mut _in_flight = None;
        let request = match request {
            r @ Request::Identified { .. } => r,
            r => {
                let stamp = self.ids.begin();
                let id = stamp.id();
                _in_flight = Some(stamp);
                Request::Identified {
                    id,
                    request: Box::new(r),
                }
            }
        };
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut attempt = 0;
        let mut last_err = String::from("no leader known");
        // Whether an attempt may have been applied (its answer was lost).
        let mut uncertain = false;
        while Instant::now() < deadline {
            attempt += 1;
            let target = self.candidates(group, attempt).into_iter().next();
            let outcome = match target {
                Some(t) if t == self.me => self.write_local(group, request.clone(), deadline).await,
                Some(t) => self.write_remote(t, group, request.clone()).await,
                None if via_seeds && group == META_GROUP && !self.join.is_empty() => {
                    self.meta_via_seed(request.clone(), attempt).await
                }
                None => Err(ForwardError::NotLeader { leader: None }),
            };
            let outcome = match outcome {
                // A final refusal after an attempt that may have been applied is not certain.
                Err(ForwardError::Db(Error::Unavailable(why))) if uncertain => {
                    Err(ForwardError::Db(Error::OutcomeUnknown(format!(
                        "{why}; an earlier attempt may have been applied: read before retrying"
                    ))))
                }
                other => other,
            };
            uncertain |= matches!(outcome, Err(ForwardError::Uncertain(_)));
            match self.settle(group, target, outcome).await? {
                Step::Done(Response::Expired) => {
                    return Err(Error::OutcomeUnknown(format!(
                        "shard group {group}: the write's outcome is no longer known (its earlier copy may have been applied); read before retrying"
                    )));
                }
                Step::Done(v) => return Ok(v),
                Step::Retry(why) => last_err = why,
            }
        }
        if uncertain {
            return Err(Error::OutcomeUnknown(format!(
                "shard group {group}: the write may or may not have been applied: a leader took it but no leader confirmed it within {} ms ({last_err}); read before retrying",
                REQUEST_DEADLINE.as_millis()
            )));
        }
        Err(unavailable(format!(
            "shard group {group} has no reachable leader with a quorum within {} ms ({last_err}); the write was not applied; retry",
            REQUEST_DEADLINE.as_millis()
        )))
    }

    /// What one routing attempt's outcome means: done, a final error (`Err`), or retry with
    /// the reason. A leader hint in the answer is remembered for the next attempt; with no hint
    /// (an election is running) the next attempt waits [`RETRY_PAUSE`].
    async fn settle<T>(
        &self,
        group: GroupId,
        target: Option<NodeId>,
        outcome: Result<T, ForwardError>,
    ) -> Result<Step<T>, Error> {
        match outcome {
            Ok(v) => Ok(Step::Done(v)),
            Err(ForwardError::Db(e)) => Err(e),
            Err(ForwardError::NotLeader { leader }) => {
                let why = ForwardError::NotLeader {
                    leader: leader.clone(),
                }
                .to_string();
                let hint = leader.map(|(id, _)| id).filter(|&id| Some(id) != target);
                self.set_hint(group, hint);
                if hint.is_none() {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Step::Retry(why))
            }
            Err(e @ (ForwardError::UnknownGroup(_) | ForwardError::Uncertain(_))) => {
                // An uncertain outcome is safe to retry: writes are applied at most once.
                self.set_hint(group, None);
                tokio::time::sleep(RETRY_PAUSE).await;
                Ok(Step::Retry(e.to_string()))
            }
        }
    }

    async fn meta_via_seed(
        &self,
        request: Request,
        attempt: usize,
    ) -> Result<Response, ForwardError> {
        let seed = &self.join[attempt % self.join.len()];
        // Seeds are addressed before their ids are known: use reserved ids from the top.
        let peer = self
            .peers
            .get(u64::MAX - (attempt % self.join.len()) as u64, seed);
        match peer
            .call(
                PeerRequest::Write {
                    group: META_GROUP,
                    request,
                },
                HOP_TIMEOUT,
            )
            .await
        {
            Ok(PeerResponse::Write(r)) => r,
            Ok(_) => Err(ForwardError::NotLeader { leader: None }),
            Err(e) => Err(forward_error(e)),
        }
    }

    async fn write_local(
        &self,
        group: GroupId,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, ForwardError> {
        let g = self.group(group).ok_or(ForwardError::UnknownGroup(group))?;
        if leads_without_quorum(&g.raft) {
            // Not proposed: certainly not applied. The caller retries until its deadline.
            return Err(ForwardError::NotLeader { leader: None });
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(HOP_TIMEOUT);
        match tokio::time::timeout(left, g.raft.client_write(request)).await {
            Err(_) => Err(ForwardError::Uncertain(format!(
                "shard group {group}: the write was not committed within {} ms (no quorum?)",
                left.as_millis()
            ))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ForwardError::NotLeader {
                    leader: f
                        .leader_id
                        .map(|id| (id, f.leader_node.map(|n| n.peer_addr).unwrap_or_default())),
                })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => Err(
                ForwardError::Uncertain("leadership changed while the write was in flight".into()),
            ),
            // The entry may have been appended before the group stopped or failed.
            Ok(Err(e)) => Err(ForwardError::Uncertain(format!("shard group {group}: {e}"))),
        }
    }

    async fn write_remote(
        &self,
        node: NodeId,
        group: GroupId,
        request: Request,
    ) -> Result<Response, ForwardError> {
        let Some(addr) = self.addr_of(node) else {
            return Err(ForwardError::NotLeader { leader: None });
        };
        let peer = self.peers.get(node, &addr);
        match peer
            .call(PeerRequest::Write { group, request }, HOP_TIMEOUT)
            .await
        {
            Ok(PeerResponse::Write(Ok(_))) if self.take_lost_answer() => {
                tracing::warn!(
                    node,
                    group,
                    "fault injection: the leader's answer is dropped"
                );
                Err(forward_error(RpcError::Unreachable(
                    addr,
                    "connection dropped (fault injection)".into(),
                )))
            }
            Ok(PeerResponse::Write(r)) => r,
            Ok(PeerResponse::Unavailable(_)) => Err(ForwardError::UnknownGroup(group)),
            Ok(other) => Err(ForwardError::Db(Error::Io(format!(
                "unexpected answer from node {node}: {other:?}"
            )))),
            Err(e) => Err(forward_error(e)),
        }
    }

    /// TESTING ONLY: drops the answers of the next `count` writes this node forwards to a
    /// leader elsewhere, after that leader applied them (see `lose_write_answers`).
    pub fn debug_lose_write_answers(&self, count: u64) {
        self.lose_write_answers.store(count, Ordering::Release);
    }

    fn take_lost_answer(&self) -> bool {
        self.lose_write_answers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Applies mutations to a data group: stamps them, proposes them, returns their replies.
    pub async fn write_mutations(
        &self,
        group: GroupId,
        mutations: Vec<Mutation>,
        now_ms: u64,
    ) -> Result<Vec<Result<Reply, Error>>, Error> {
        let request = Request::Write {
            mutations,
            timestamp: self.hlc.now(),
            now_ms,
        };
        match self.write(group, request).await? {
            Response::Replies(r) => Ok(r),
            other => Err(Error::Io(format!(
                "unexpected response to a write: {other:?}"
            ))),
        }
    }

    /// Deletes every key of a data group (FLUSHDB), through its log.
    pub async fn clear(&self, group: GroupId) -> Result<(), Error> {
        self.write(group, Request::Clear).await.map(|_| ())
    }

    /// Proposes a change to the cluster map.
    pub async fn meta(&self, cmd: MetaCommand) -> Result<(), Error> {
        match self.write(META_GROUP, Request::Meta(cmd)).await? {
            Response::Meta(MetaResponse::Ok) => Ok(()),
            Response::Meta(MetaResponse::Error(e)) => Err(Error::InvalidInput(e)),
            other => Err(Error::Io(format!(
                "unexpected response to a meta command: {other:?}"
            ))),
        }
    }

    // ---------------------------------------------------------------- reads

    /// Reads keys of one group. `Linearizable` reads go to the leader (ReadIndex); `Stale`
    /// reads are served by this node's replica when it has one, else by any replica.
    pub async fn read(
        &self,
        group: GroupId,
        keys: Vec<Bytes>,
        mode: ReadMode,
        now_ms: u64,
    ) -> Result<Vec<Option<Value>>, Error> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut attempt = 0;
        let mut last_err = String::from("no leader known");
        let mode = if self.unsafe_local_reads {
            ReadMode::Stale
        } else {
            mode
        };
        while Instant::now() < deadline {
            attempt += 1;
            let target = match mode {
                ReadMode::Stale if self.group(group).is_some() => Some(self.me),
                ReadMode::Stale => self.candidates(group, attempt).into_iter().last(),
                ReadMode::Linearizable => self.candidates(group, attempt).into_iter().next(),
            };
            let outcome = match target {
                Some(t) if t == self.me => {
                    self.read_local(group, &keys, mode, now_ms, deadline).await
                }
                Some(t) => self.read_remote(t, group, keys.clone(), mode).await,
                None => Err(ForwardError::NotLeader { leader: None }),
            };
            match self.settle(group, target, outcome).await? {
                Step::Done(v) => return Ok(v),
                Step::Retry(why) => last_err = why,
            }
        }
        Err(unavailable(format!(
            "shard group {group}: no leader could confirm a linearizable read within {} ms ({last_err}); retry, or read with READONLY for a possibly stale answer",
            REQUEST_DEADLINE.as_millis()
        )))
    }

    /// Confirms this node may serve a linearizable read of `group` now (ReadIndex).
    ///
    /// Concurrent reads share barriers: a read joins the queue, and the next barrier to *start*
    /// serves every read queued before it, so each read is covered by a leadership check that
    /// began after the read arrived (what linearizability needs), while a burst of reads costs
    /// a couple of heartbeat rounds instead of one each.
    async fn read_barrier(
        &self,
        group: GroupId,
        g: &Arc<Group>,
        deadline: Instant,
    ) -> Result<(), ForwardError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = g.barrier.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            tokio::spawn(run_barriers(group, g.clone()));
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(HOP_TIMEOUT + Duration::from_millis(500));
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ForwardError::Db(unavailable(
                "read barrier abandoned (group stopping)",
            ))),
            Err(_) => Err(ForwardError::Db(unavailable(format!(
                "shard group {group}: read barrier timed out (no quorum?)"
            )))),
        }
    }

    async fn read_local(
        &self,
        group: GroupId,
        keys: &[Bytes],
        mode: ReadMode,
        now_ms: u64,
        deadline: Instant,
    ) -> Result<Vec<Option<Value>>, ForwardError> {
        let g = self.group(group).ok_or(ForwardError::UnknownGroup(group))?;
        if mode == ReadMode::Linearizable {
            self.read_barrier(group, &g, deadline).await?;
        }
        let table = self.engine.table(&shard_table(group), false);
        keys.iter()
            .map(|k| table.get(k, now_ms).map_err(ForwardError::Db))
            .collect()
    }

    async fn read_remote(
        &self,
        node: NodeId,
        group: GroupId,
        keys: Vec<Bytes>,
        mode: ReadMode,
    ) -> Result<Vec<Option<Value>>, ForwardError> {
        let Some(addr) = self.addr_of(node) else {
            return Err(ForwardError::NotLeader { leader: None });
        };
        let peer = self.peers.get(node, &addr);
        match peer
            .call(PeerRequest::ReadMany { group, keys, mode }, HOP_TIMEOUT)
            .await
        {
            Ok(PeerResponse::ReadMany(r)) => r,
            Ok(PeerResponse::Unavailable(_)) => Err(ForwardError::UnknownGroup(group)),
            Ok(other) => Err(ForwardError::Db(Error::Io(format!(
                "unexpected answer from node {node}: {other:?}"
            )))),
            Err(_) => Err(ForwardError::NotLeader { leader: None }),
        }
    }

    /// One page of a group's keys in order.
    pub async fn scan(
        &self,
        group: GroupId,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        mode: ReadMode,
        now_ms: u64,
    ) -> Result<crate::network::ScanPage, Error> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut last_err = String::from("no leader known");
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            let target = match mode {
                ReadMode::Stale if self.group(group).is_some() => Some(self.me),
                _ => self.candidates(group, attempt).into_iter().next(),
            };
            let outcome = match target {
                Some(t) if t == self.me => {
                    self.scan_local(
                        group,
                        after.clone(),
                        prefix.clone(),
                        limit,
                        mode,
                        now_ms,
                        deadline,
                    )
                    .await
                }
                Some(t) => {
                    let addr = self.addr_of(t).unwrap_or_default();
                    let req = PeerRequest::Scan {
                        group,
                        after: after.clone(),
                        prefix: prefix.clone(),
                        limit,
                        mode,
                    };
                    match self.peers.get(t, &addr).call(req, HOP_TIMEOUT).await {
                        Ok(PeerResponse::Scan(r)) => r,
                        _ => Err(ForwardError::NotLeader { leader: None }),
                    }
                }
                None => Err(ForwardError::NotLeader { leader: None }),
            };
            match self.settle(group, target, outcome).await? {
                Step::Done(v) => return Ok(v),
                Step::Retry(why) => last_err = why,
            }
        }
        Err(unavailable(format!(
            "shard group {group}: no leader for a scan within {} ms ({last_err}); retry",
            REQUEST_DEADLINE.as_millis()
        )))
    }

    #[allow(clippy::too_many_arguments)]
    async fn scan_local(
        &self,
        group: GroupId,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        mode: ReadMode,
        now_ms: u64,
        deadline: Instant,
    ) -> Result<crate::network::ScanPage, ForwardError> {
        let g = self.group(group).ok_or(ForwardError::UnknownGroup(group))?;
        if mode == ReadMode::Linearizable {
            self.read_barrier(group, &g, deadline).await?;
        }
        let table = self.engine.table(&shard_table(group), false);
        let range = ScanRange {
            after,
            end: None,
            prefix,
        };
        let page = table
            .scan(&range, limit as usize, now_ms)
            .map_err(ForwardError::Db)?;
        Ok((page.entries, page.next_after))
    }

    /// The number of keys in a group (DBSIZE), read like `read`.
    pub async fn count(&self, group: GroupId, mode: ReadMode) -> Result<u64, Error> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut last_err = String::from("no leader known");
        let mut attempt = 0;
        while Instant::now() < deadline {
            attempt += 1;
            let target = match mode {
                ReadMode::Stale if self.group(group).is_some() => Some(self.me),
                _ => self.candidates(group, attempt).into_iter().next(),
            };
            let outcome = match target {
                Some(t) if t == self.me => self.count_local(group, mode, deadline).await,
                Some(t) => {
                    let addr = self.addr_of(t).unwrap_or_default();
                    match self
                        .peers
                        .get(t, &addr)
                        .call(PeerRequest::Count { group, mode }, HOP_TIMEOUT)
                        .await
                    {
                        Ok(PeerResponse::Count(r)) => r,
                        _ => Err(ForwardError::NotLeader { leader: None }),
                    }
                }
                None => Err(ForwardError::NotLeader { leader: None }),
            };
            match self.settle(group, target, outcome).await? {
                Step::Done(v) => return Ok(v),
                Step::Retry(why) => last_err = why,
            }
        }
        Err(unavailable(format!(
            "shard group {group}: no leader to count keys within {} ms ({last_err}); retry",
            REQUEST_DEADLINE.as_millis()
        )))
    }

    async fn count_local(
        &self,
        group: GroupId,
        mode: ReadMode,
        deadline: Instant,
    ) -> Result<u64, ForwardError> {
        let g = self.group(group).ok_or(ForwardError::UnknownGroup(group))?;
        if mode == ReadMode::Linearizable {
            self.read_barrier(group, &g, deadline).await?;
        }
        self.engine
            .table(&shard_table(group), false)
            .len()
            .map_err(ForwardError::Db)
    }

    /// The best guess of a group's leader: local metrics, then the last answer, then the first
    /// replica of the map.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.candidates(group, 0).into_iter().next()
    }

    // ---------------------------------------------------------------- incoming requests

    async fn handle_request(&self, from: NodeId, request: PeerRequest) -> PeerResponse {
        let no_group =
            |g: GroupId| PeerResponse::Unavailable(format!("node has no replica of group {g}"));
        match request {
            PeerRequest::AppendEntries { group, rpc } => match self.group(group) {
                Some(g) => PeerResponse::AppendEntries(
                    g.raft.append_entries(rpc).await.map_err(|e| e.to_string()),
                ),
                None => no_group(group),
            },
            PeerRequest::Vote { group, rpc } => match self.group(group) {
                Some(g) => PeerResponse::Vote(g.raft.vote(rpc).await.map_err(|e| e.to_string())),
                None => no_group(group),
            },
            PeerRequest::Snapshot {
                group,
                vote,
                meta,
                data,
            } => match self.group(group) {
                Some(g) => {
                    let snapshot = crate::types::Snapshot {
                        meta,
                        snapshot: std::io::Cursor::new(data),
                    };
                    PeerResponse::Snapshot(
                        g.raft
                            .install_full_snapshot(vote, snapshot)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
                None => no_group(group),
            },
            PeerRequest::TransferLeader { group, req } => match self.group(group) {
                Some(g) => PeerResponse::TransferLeader(
                    g.raft
                        .handle_transfer_leader(req)
                        .await
                        .map_err(|e| e.to_string()),
                ),
                None => no_group(group),
            },
            PeerRequest::Write { group, request } => {
                if self.group(group).is_none() {
                    if group == META_GROUP {
                        // A joining node asks through a seed: forward to the meta leader.
                        return PeerResponse::Write(relayed(
                            self.write_via(group, request, false).await,
                        ));
                    }
                    return no_group(group);
                }
                let deadline = Instant::now() + HOP_TIMEOUT;
                let local = self.write_local(group, request.clone(), deadline).await;
                // Seeds forward meta writes for joiners that cannot reach the leader themselves.
                if group == META_GROUP
                    && let Err(ForwardError::NotLeader { .. }) = &local
                    && !self.cluster().nodes.contains_key(&from)
                {
                    return PeerResponse::Write(relayed(
                        self.write_via(group, request, false).await,
                    ));
                }
                PeerResponse::Write(local)
            }
            PeerRequest::Read { group, key, mode } => {
                let deadline = Instant::now() + HOP_TIMEOUT;
                PeerResponse::Read(
                    self.read_local(group, &[key], mode, capdb_types::unix_now_ms(), deadline)
                        .await
                        .map(|mut v| v.pop().flatten()),
                )
            }
            PeerRequest::ReadMany { group, keys, mode } => {
                let deadline = Instant::now() + HOP_TIMEOUT;
                PeerResponse::ReadMany(
                    self.read_local(group, &keys, mode, capdb_types::unix_now_ms(), deadline)
                        .await,
                )
            }
            PeerRequest::Scan {
                group,
                after,
                prefix,
                limit,
                mode,
            } => {
                let deadline = Instant::now() + HOP_TIMEOUT;
                PeerResponse::Scan(
                    self.scan_local(
                        group,
                        after,
                        prefix,
                        limit,
                        mode,
                        capdb_types::unix_now_ms(),
                        deadline,
                    )
                    .await,
                )
            }
            PeerRequest::Count { group, mode } => {
                let deadline = Instant::now() + HOP_TIMEOUT;
                PeerResponse::Count(self.count_local(group, mode, deadline).await)
            }
            PeerRequest::Meta(cmd) => {
                PeerResponse::Meta(match self.write(META_GROUP, Request::Meta(cmd)).await {
                    Ok(Response::Meta(r)) => Ok(r),
                    Ok(other) => Err(ForwardError::Db(Error::Io(format!(
                        "unexpected meta response {other:?}"
                    )))),
                    Err(e) => Err(ForwardError::Db(e)),
                })
            }
            PeerRequest::Status => PeerResponse::Status(self.status()),
            PeerRequest::Partition { blocked } => {
                self.peers.filter().set(blocked.into_iter().collect());
                PeerResponse::Done
            }
            PeerRequest::Ap(req) => {
                PeerResponse::Ap(self.ap.handle(req).await.map_err(|e| e.to_string()))
            }
        }
    }

    /// This node's view of its groups.
    pub fn status(&self) -> NodeStatus {
        let groups: Vec<(GroupId, Arc<Group>)> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut out: Vec<GroupStatus> = groups
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
        let state = self.cluster();
        let mut blocked: Vec<NodeId> = self.peers.filter().blocked().into_iter().collect();
        blocked.sort();
        NodeStatus {
            info: state
                .nodes
                .get(&self.me)
                .cloned()
                .or_else(|| Some(self.info.clone())),
            map_version: state.version,
            groups: out,
            blocked,
        }
    }

    /// Asks another node for its status.
    pub async fn remote_status(&self, node: NodeId) -> Result<NodeStatus, Error> {
        let addr = self
            .addr_of(node)
            .ok_or_else(|| unavailable(format!("no address for node {node}")))?;
        match self
            .peers
            .get(node, &addr)
            .call(PeerRequest::Status, Duration::from_secs(1))
            .await
        {
            Ok(PeerResponse::Status(s)) => Ok(s),
            Ok(other) => Err(Error::Io(format!("unexpected answer {other:?}"))),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    // ---------------------------------------------------------------- reconciler

    async fn run_reconciler(self: Arc<Self>) {
        let mut changes = self.cluster.clone();
        let removed_key = format!("node/{}/removed", self.me);
        let mut removed = self.engine.meta_get(&removed_key).ok().flatten().is_some();
        if removed {
            tracing::error!(
                node = self.me,
                "this node was removed from the cluster; it will not rejoin (wipe its data dir to join as a new node)"
            );
        }
        // Whether this node has ever seen itself in the map: once it has, vanishing from the
        // map means it was removed (drained), and it must not register itself back.
        let mut seen = false;
        while !self.stopping.load(Ordering::Acquire) {
            match self.cluster().nodes.get(&self.me) {
                Some(n) => {
                    seen = true;
                    if !same_endpoints(n, &self.info) {
                        self.register().await;
                    }
                }
                None if seen && !removed => {
                    tracing::warn!(
                        node = self.me,
                        "this node has been removed from the cluster"
                    );
                    removed = true;
                    let _ = self
                        .engine
                        .meta_put(vec![(removed_key.clone(), Some(vec![1]))], true)
                        .await;
                }
                None if !removed => {
                    self.register().await;
                }
                None => {}
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "reconcile step failed; retrying");
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
        }
    }

    /// Adds this node (addresses, labels) to the map. Returns whether it is there.
    async fn register(&self) -> bool {
        tracing::debug!(node = self.me, "registering");
        match self.meta(MetaCommand::UpsertNode(self.info.clone())).await {
            Ok(()) => {
                tracing::info!(node = self.me, "registered in the cluster map");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "registration not done yet");
                false
            }
        }
    }

    /// One reconciliation pass: local groups follow the map; leaders move memberships.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), Error> {
        let state = self.cluster();
        // Start groups this node should hold (only cp keyspaces run Raft).
        for (name, _, shard) in state.shards_of(self.me) {
            let raft = state
                .keyspaces
                .get(name)
                .is_some_and(|k| k.spec.mode == capdb_types::Mode::Cp);
            if raft && self.group(shard.group).is_none() {
                let g = self
                    .start_group(
                        shard.group,
                        Kind::Data {
                            table: shard_table(shard.group),
                        },
                    )
                    .await?;
                let pristine = g.log.is_pristine().map_err(|e| Error::Io(e.to_string()))?;
                if pristine
                    && shard.initial_replicas.contains(&self.me)
                    && shard.initial_replicas == shard.replicas
                {
                    let members: BTreeMap<NodeId, PeerNode> = shard
                        .initial_replicas
                        .iter()
                        .filter_map(|n| {
                            state.nodes.get(n).map(|info| {
                                (
                                    *n,
                                    PeerNode {
                                        peer_addr: info.peer_addr.clone(),
                                    },
                                )
                            })
                        })
                        .collect();
                    if let Err(e) = g.raft.initialize(members).await {
                        tracing::debug!(group = shard.group, error = %e, "group already initialized");
                    }
                }
            }
        }
        // Groups this node leads: move their membership towards the map.
        let local: Vec<(GroupId, Arc<Group>)> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (group, g) in &local {
            let m = g.raft.metrics().borrow_watched().clone();
            let target: BTreeSet<NodeId> = if *group == META_GROUP {
                if state.nodes.is_empty() {
                    continue;
                }
                meta_target_voters(
                    &state,
                    m.membership_config.membership().voter_ids().collect(),
                )
            } else {
                match state.find_group(*group) {
                    Some((ks, i)) => ks.shards[i].replicas.iter().copied().collect(),
                    None => BTreeSet::new(),
                }
            };
            if m.state == ServerState::Leader && !target.is_empty() {
                let learners_wanted: BTreeSet<NodeId> = if *group == META_GROUP {
                    state
                        .nodes
                        .keys()
                        .copied()
                        .filter(|n| !target.contains(n))
                        .collect()
                } else {
                    BTreeSet::new()
                };
                self.spawn_membership_change(*group, g.clone(), target.clone(), learners_wanted);
            }
            // Drop data groups this node no longer belongs to, once removed from their voters.
            if *group != META_GROUP && !target.contains(&self.me) {
                let voters: BTreeSet<NodeId> =
                    m.membership_config.membership().voter_ids().collect();
                let keyspace_gone = state.find_group(*group).is_none();
                if keyspace_gone
                    || (!voters.contains(&self.me) && m.membership_config.log_id().is_some())
                {
                    self.drop_group(*group).await;
                }
            }
        }
        if self
            .group(META_GROUP)
            .is_some_and(|g| g.raft.metrics().borrow_watched().state == ServerState::Leader)
        {
            self.meta_leader_duties(&state).await;
        }
        Ok(())
    }

    async fn drop_group(&self, group: GroupId) {
        let g = self
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        if let Some(g) = g {
            tracing::info!(group, "dropping a replica this node no longer holds");
            let _ = g.raft.shutdown().await;
            let metas = ["vote", "committed", "purged", "applied"]
                .iter()
                .map(|w| meta_key(group, w))
                .collect();
            if let Err(e) = self
                .engine
                .drop_group(
                    vec![shard_table(group)],
                    vec![log_table(group)],
                    metas,
                    vec![crate::sessions::SessionTable::prefix_of(group)],
                )
                .await
            {
                tracing::warn!(group, error = %e, "could not delete the dropped replica's data");
            }
        }
    }

    /// Moves a led group's membership towards `voters` (and `learners`), one step at a time, in
    /// the background; at most one change per group runs at once.
    fn spawn_membership_change(
        self: &Arc<Self>,
        group: GroupId,
        g: Arc<Group>,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) {
        let m = g.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership().clone();
        let current_voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let current_learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let missing_learners: Vec<NodeId> = voters
            .iter()
            .chain(learners.iter())
            .filter(|n| !current_voters.contains(n) && !current_learners.contains(n))
            .copied()
            .collect();
        if current_voters == voters && missing_learners.is_empty() {
            return;
        }
        if !self
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let result = this
                .change_membership(group, &g, &voters, &missing_learners)
                .await;
            if let Err(e) = result {
                tracing::info!(group, error = %e, "membership change step did not finish; will retry");
            }
            this.changing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&group);
        });
    }

    async fn change_membership(
        &self,
        group: GroupId,
        g: &Group,
        voters: &BTreeSet<NodeId>,
        missing: &[NodeId],
    ) -> Result<(), String> {
        for &n in missing {
            let addr = self
                .addr_of(n)
                .ok_or_else(|| format!("no address for node {n}"))?;
            tracing::info!(group, node = n, "adding learner");
            tokio::time::timeout(
                Duration::from_secs(5),
                g.raft.add_learner(n, PeerNode { peer_addr: addr }, false),
            )
            .await
            .map_err(|_| "add_learner timed out".to_string())?
            .map_err(|e| e.to_string())?;
        }
        // Wait until every future voter has caught up before making it a voter.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = g.raft.metrics().borrow_watched().clone();
            if m.state != ServerState::Leader {
                return Err("no longer the leader".into());
            }
            let last = m.last_log_index.unwrap_or(0);
            let current_voters: BTreeSet<NodeId> =
                m.membership_config.membership().voter_ids().collect();
            let lagging: Vec<NodeId> = voters
                .iter()
                .filter(|n| **n != self.me && !current_voters.contains(n))
                .filter(|n| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(n).copied().flatten())
                        .is_none_or(|matched| matched.index + CATCH_UP_ENTRIES < last)
                })
                .copied()
                .collect();
            if lagging.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("learners {lagging:?} did not catch up within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let current: BTreeSet<NodeId> = g
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if current != *voters {
            tracing::info!(group, ?current, target = ?voters, "changing voters");
            tokio::time::timeout(
                Duration::from_secs(10),
                g.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false),
            )
            .await
            .map_err(|_| "change_membership timed out".to_string())?
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The meta leader's jobs: make sure `default` exists, and take placement steps.
    async fn meta_leader_duties(&self, state: &ClusterState) {
        if state.nodes.is_empty() {
            return;
        }
        let default = KeyspaceName::default_keyspace();
        if !state.keyspaces.contains_key(&default) {
            let spec = match KeyspaceSpec::new(default, Mode::Cp, None, None, None, None) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the default keyspace spec");
                    return;
                }
            };
            // Wait until the founders have registered (as many as the meta group has voters,
            // up to the replication factor), so the keyspace starts with all its replicas as
            // voters: a write acknowledged at formation is then on a majority of a full
            // replica set, never on one node that merely has learners catching up.
            let founders = self
                .group(META_GROUP)
                .map(|g| {
                    g.raft
                        .metrics()
                        .borrow_watched()
                        .membership_config
                        .membership()
                        .voter_ids()
                        .count()
                })
                .unwrap_or(1);
            let wanted = founders.min(spec.replication_factor as usize).max(1);
            let live = state.nodes.values().filter(|n| !n.draining).count();
            if live < wanted {
                tracing::debug!(
                    live,
                    wanted,
                    "default keyspace waits for the founding nodes to register"
                );
                return;
            }
            let replicas = placement::place_keyspace(state, spec.shards, spec.replication_factor);
            if let Err(e) = self
                .meta(MetaCommand::CreateKeyspace { spec, replicas })
                .await
            {
                tracing::debug!(error = %e, "default keyspace not created yet");
            }
            return;
        }
        {
            let mut last = self
                .last_placement
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < PLACEMENT_STEP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        // Remove drained nodes that hold nothing any more.
        for n in state.nodes.values().filter(|n| n.draining) {
            if state.shards_of(n.id).next().is_none() {
                tracing::info!(node = n.id, "drained node removed from the cluster");
                let _ = self.meta(MetaCommand::RemoveNode(n.id)).await;
                return;
            }
        }
        if let Some(step) = placement::next_move(state) {
            tracing::info!(?step, "placement step");
            if let Err(e) = self.meta(step).await {
                tracing::info!(error = %e, "placement step refused");
            }
        }
    }

    /// Blocks or unblocks peers on this node (simulated partitions).
    pub fn set_partition(&self, blocked: BTreeSet<NodeId>) {
        self.peers.filter().set(blocked.into_iter().collect());
    }
}

/// The meta group's next voter set: keep the current voters (a founding voter may simply not
/// have registered yet) except draining ones, and top up to [`placement::META_VOTERS`] from
/// the map's nodes.
fn meta_target_voters(state: &ClusterState, current: BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let draining = |n: &NodeId| state.nodes.get(n).is_some_and(|i| i.draining);
    let mut target: BTreeSet<NodeId> = current.into_iter().filter(|n| !draining(n)).collect();
    for n in placement::meta_voters(state)
        .into_iter()
        .chain(state.nodes.keys().copied())
    {
        if target.len() >= placement::META_VOTERS {
            break;
        }
        if !draining(&n) {
            target.insert(n);
        }
    }
    target
}

/// What a failed call to a peer means for a forwarded request: certainly not delivered (try
/// another node), or delivered with its answer lost (may have been applied).
fn forward_error(e: RpcError) -> ForwardError {
    match e {
        RpcError::NotSent(..) | RpcError::Blocked(_) | RpcError::Overloaded(_) => {
            ForwardError::NotLeader { leader: None }
        }
        RpcError::Unreachable(..) | RpcError::Timeout(..) | RpcError::Codec(_) => {
            ForwardError::Uncertain(e.to_string())
        }
    }
}

/// Whether this node leads `raft` with other voters and has heard from none of a quorum of
/// them for [`QUORUM_SILENCE_MAX`] (cut off from the majority, or the majority is down).
fn leads_without_quorum(raft: &Raft) -> bool {
    use openraft::Instant as _;
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.state == ServerState::Leader
        && m.membership_config
            .membership()
            .voter_ids()
            .nth(1)
            .is_some()
        && m.last_quorum_acked
            .as_ref()
            .is_some_and(|acked| acked.elapsed() > QUORUM_SILENCE_MAX)
}

/// A write relayed for another node (a seed forwarding a joiner's meta write): what the relay
/// heard, in the terms the sender routes by, so that it keeps retrying (elsewhere) and knows
/// whether an attempt may have been applied.
fn relayed(result: Result<Response, Error>) -> Result<Response, ForwardError> {
    match result {
        Ok(r) => Ok(r),
        Err(Error::Unavailable(_) | Error::ShuttingDown) => {
            Err(ForwardError::NotLeader { leader: None })
        }
        Err(Error::OutcomeUnknown(why)) => Err(ForwardError::Uncertain(why)),
        Err(e) => Err(ForwardError::Db(e)),
    }
}

/// The meaning of one routing attempt (see [`Manager::settle`]).
enum Step<T> {
    Done(T),
    Retry(String),
}

fn same_endpoints(a: &NodeInfo, b: &NodeInfo) -> bool {
    a.peer_addr == b.peer_addr
        && a.resp_addr == b.resp_addr
        && a.http_addr == b.http_addr
        && a.labels == b.labels
}

/// Serves peer requests with this manager.
pub struct PeerHandler(pub Arc<Manager>);

impl rpc::Handler<PeerRequest, PeerResponse> for PeerHandler {
    async fn handle(&self, from: NodeId, request: PeerRequest) -> PeerResponse {
        self.0.handle_request(from, request).await
    }
}
