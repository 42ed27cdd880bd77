//! The one leader-routing loop, and writes.
//!
//! Every request for a group (write, read, scan, count) runs [`Groups::route`]: pick a node
//! (this one when it leads or, for stale reads, holds a replica; else the best guess of the
//! leader; else the replicas in turn), try it, and interpret the outcome: done, a final error,
//! or retry (remembering a leader named in the answer). The deadline ([`REQUEST_DEADLINE`]),
//! the leader guesses and the "outcome unknown" rules live here and nowhere else: during an
//! election or on the minority side of a partition the caller gets an error in bounded time,
//! never a wrong answer.
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

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capdb_cluster::{GroupId, META_GROUP, MetaCommand, MetaResponse, NodeId};
use capdb_transport::RpcError;
use capdb_types::{Error, Mutation, Reply};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};

use super::{Groups, REQUEST_DEADLINE, Raft, unavailable};
use crate::command::{Request, Response};
use crate::messages::{ForwardError, ForwardRequest, ForwardResponse};

/// How long a write (or a single-shard transaction) refused because a cross-shard transaction
/// locks one of its keys is retried before `-TRYAGAIN` reaches the client. A lock lives from
/// a prepare to its commit (a few milliseconds), or, when the coordinator died, until the
/// recovery releases it (its deadline, 1.2 s, plus a recovery round).
pub const LOCK_WAIT_MAX: Duration = Duration::from_secs(5);

/// What a node runs when one of its commands waits for a cross-shard transaction's lock on a
/// group ([`Groups::on_lock_wait`]).
pub type LockWaitHook = Box<dyn Fn(GroupId) + Send + Sync>;

impl Groups {
    /// Has `hook` run whenever a command on this node is about to wait for a transaction's
    /// lock on a group: the node's coordinator sends the commits it holds back for that group
    /// at once, so nobody waits out its ride window. Set once; later calls are ignored.
    pub fn on_lock_wait(&self, hook: LockWaitHook) {
        let _ = self.lock_wait_hook.set(hook);
    }

    /// Waits before the next try of something a transaction's lock on `group` refused; `None`
    /// once [`LOCK_WAIT_MAX`] has passed since `since`. Backs off from 1 ms to 50 ms.
    pub(crate) async fn wait_for_lock(
        &self,
        group: GroupId,
        since: Instant,
        tries: &mut u32,
    ) -> Option<()> {
        if since.elapsed() >= LOCK_WAIT_MAX {
            return None;
        }
        if let Some(hook) = self.lock_wait_hook.get() {
            hook(group);
        }
        let pause = Duration::from_millis(1u64 << (*tries).min(6)).min(Duration::from_millis(50));
        *tries += 1;
        tokio::time::sleep(pause).await;
        Some(())
    }
}

/// Time one forwarded hop may take.
pub(crate) const HOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying when no leader is known (an election is running).
const RETRY_PAUSE: Duration = Duration::from_millis(40);
/// A leader that has heard from no quorum for this long refuses new writes before proposing
/// them (`-TRYAGAIN`, certainly not applied) instead of appending entries it most likely cannot
/// commit (which could only be answered "outcome unknown"). Heartbeats are acknowledged every
/// 60 ms; followers elect a new leader after 550-700 ms of silence. A stall shorter than the
/// request deadline only delays writes: they are retried until then.
const QUORUM_SILENCE_MAX: Duration = Duration::from_millis(500);

/// Which node an attempt goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// The group's leader (or the best guess of it).
    Leader,
    /// Any replica, this node's own first (stale reads).
    AnyReplica,
}

/// How routing a request ended without an answer.
pub(crate) enum RouteError {
    /// A final error: retrying cannot help (or must be the client's decision).
    Final(Error),
    /// The deadline passed. `uncertain`: some attempt may have been applied.
    Exhausted { last_err: String, uncertain: bool },
}

impl From<Error> for RouteError {
    fn from(e: Error) -> Self {
        RouteError::Final(e)
    }
}

/// Nodes to send a request for a group to, best first: the leader this node's replica knows,
/// the leader an earlier answer named, then the group's replicas rotated by `attempt` so that a
/// dead guess does not stick. No node appears twice.
pub fn candidate_order(
    local_leader: Option<NodeId>,
    guess: Option<NodeId>,
    replicas: &[NodeId],
    attempt: usize,
) -> Vec<NodeId> {
    let mut out: Vec<NodeId> = local_leader.into_iter().chain(guess).collect();
    for k in 0..replicas.len() {
        out.push(replicas[(attempt + k) % replicas.len()]);
    }
    let mut seen = BTreeSet::new();
    out.retain(|n| seen.insert(*n));
    out
}

/// What a failed call to a peer means for a forwarded write: certainly not delivered (try
/// another node), or delivered with its answer lost (may have been applied).
pub(crate) fn forward_error(e: RpcError) -> ForwardError {
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
pub(crate) fn relayed(result: Result<Response, Error>) -> Result<Response, ForwardError> {
    match result {
        Ok(r) => Ok(r),
        Err(Error::Unavailable(_) | Error::ShuttingDown) => {
            Err(ForwardError::NotLeader { leader: None })
        }
        Err(Error::OutcomeUnknown(why)) => Err(ForwardError::Uncertain(why)),
        Err(e) => Err(ForwardError::Db(e)),
    }
}

impl Groups {
    fn local_leader(&self, group: GroupId) -> Option<NodeId> {
        let g = self.group(group)?;
        g.raft.metrics().borrow_watched().current_leader
    }

    fn leader_guess(&self, group: GroupId) -> Option<NodeId> {
        self.leader_guesses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
    }

    fn set_leader_guess(&self, group: GroupId, node: Option<NodeId>) {
        let mut guesses = self
            .leader_guesses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match node {
            Some(n) => guesses.insert(group, n),
            None => guesses.remove(&group),
        };
    }

    /// Candidates to send a request for `group` to, best first (see [`candidate_order`]).
    fn candidates(&self, group: GroupId, attempt: usize) -> Vec<NodeId> {
        let state = self.cluster();
        let replicas: Vec<NodeId> = if group == META_GROUP {
            state.nodes.keys().copied().collect()
        } else {
            state
                .find_group(group)
                .map(|(ks, i)| ks.shards[i].replicas.clone())
                .unwrap_or_default()
        };
        candidate_order(
            self.local_leader(group),
            self.leader_guess(group),
            &replicas,
            attempt,
        )
    }

    /// The best guess of a group's leader: local metrics, then the last answer, then the first
    /// replica of the map.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.candidates(group, 0).into_iter().next()
    }

    fn pick(&self, group: GroupId, pick: Pick, attempt: usize) -> Option<NodeId> {
        match pick {
            Pick::AnyReplica if self.holds(group) => Some(self.me),
            Pick::AnyReplica => self.candidates(group, attempt).into_iter().last(),
            Pick::Leader => self.candidates(group, attempt).into_iter().next(),
        }
    }

    /// Runs `attempt(target, attempt number, deadline)` until it succeeds, fails finally, or the
    /// deadline passes. `target` is the node picked (`None`: no candidate known). Outcomes mean:
    ///
    /// - `NotLeader`: retry, at the named leader if any (else after [`RETRY_PAUSE`]);
    /// - `UnknownGroup`, `Uncertain`: retry after [`RETRY_PAUSE`] (an uncertain write is safe
    ///   to retry: writes are applied at most once), forgetting the leader guess;
    /// - `Db`: final; but a refusal (`Unavailable`) after an attempt that may have been
    ///   applied is not certain, and becomes `OutcomeUnknown`.
    pub(crate) async fn route<T, F, Fut>(
        &self,
        group: GroupId,
        pick: Pick,
        mut attempt: F,
    ) -> Result<T, RouteError>
    where
        F: FnMut(Option<NodeId>, usize, Instant) -> Fut,
        Fut: Future<Output = Result<T, ForwardError>>,
    {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut attempts = 0;
        let mut last_err = String::from("no leader known");
        // Whether an attempt may have been applied (its answer was lost).
        let mut uncertain = false;
        while Instant::now() < deadline {
            attempts += 1;
            let target = self.pick(group, pick, attempts);
            let outcome = match attempt(target, attempts, deadline).await {
                Err(ForwardError::Db(Error::Unavailable(why))) if uncertain => {
                    Err(ForwardError::Db(Error::OutcomeUnknown(format!(
                        "{why}; an earlier attempt may have been applied: read before retrying"
                    ))))
                }
                other => other,
            };
            uncertain |= matches!(outcome, Err(ForwardError::Uncertain(_)));
            match outcome {
                Ok(v) => return Ok(v),
                Err(ForwardError::Db(e)) => return Err(RouteError::Final(e)),
                Err(ForwardError::NotLeader { leader }) => {
                    last_err = ForwardError::NotLeader {
                        leader: leader.clone(),
                    }
                    .to_string();
                    let named = leader.map(|(id, _)| id).filter(|&id| Some(id) != target);
                    self.set_leader_guess(group, named);
                    if named.is_none() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Err(e @ (ForwardError::UnknownGroup(_) | ForwardError::Uncertain(_))) => {
                    self.set_leader_guess(group, None);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    last_err = e.to_string();
                }
            }
        }
        Err(RouteError::Exhausted {
            last_err,
            uncertain,
        })
    }

    /// Sends a forwarded request to `node`. `Err` is the transport's failure, for the caller
    /// to interpret (a write's lost answer is uncertain; a read's is simply retried).
    pub(crate) async fn forward(
        &self,
        node: NodeId,
        request: ForwardRequest,
    ) -> Result<ForwardResponse, Option<RpcError>> {
        let addr = self.addr_of(node).ok_or(None)?;
        self.forward_peers
            .get(node, &addr)
            .call(request, HOP_TIMEOUT)
            .await
            .map_err(Some)
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
    pub(crate) async fn write_via(
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
        let request = &request;
        let routed = self
            .route(group, Pick::Leader, |target, attempt, deadline| async move {
                let outcome = match target {
                    Some(t) if t == self.me => {
                        self.write_local(group, request.clone(), deadline).await
                    }
                    Some(t) => self.write_remote(t, group, request.clone()).await,
                    None if via_seeds && group == META_GROUP && !self.join.is_empty() => {
                        self.meta_via_seed(request.clone(), attempt).await
                    }
                    None => Err(ForwardError::NotLeader { leader: None }),
                };
                match outcome {
                    Ok(Response::Expired) => Err(ForwardError::Db(Error::OutcomeUnknown(format!(
                        "shard group {group}: the write's outcome is no longer known (its earlier copy may have been applied); read before retrying"
                    )))),
                    other => other,
                }
            })
            .await;
        match routed {
            Ok(v) => Ok(v),
            Err(RouteError::Final(e)) => Err(e),
            Err(RouteError::Exhausted {
                last_err,
                uncertain: true,
            }) => Err(Error::OutcomeUnknown(format!(
                "shard group {group}: the write may or may not have been applied: a leader took it but no leader confirmed it within {} ms ({last_err}); read before retrying",
                REQUEST_DEADLINE.as_millis()
            ))),
            Err(RouteError::Exhausted { last_err, .. }) => Err(unavailable(format!(
                "shard group {group} has no reachable leader with a quorum within {} ms ({last_err}); the write was not applied; retry",
                REQUEST_DEADLINE.as_millis()
            ))),
        }
    }

    /// A meta write from a node that knows no leader (a joiner): through a `--join` seed, which
    /// relays it to the meta leader.
    async fn meta_via_seed(
        &self,
        request: Request,
        attempt: usize,
    ) -> Result<Response, ForwardError> {
        let n = attempt % self.join.len();
        let seed = &self.join[n];
        // Seeds are addressed before their ids are known: use reserved ids from the top.
        let peer = self.forward_peers.get(u64::MAX - n as u64, seed);
        let request = ForwardRequest::Write {
            group: META_GROUP,
            request,
        };
        match peer.call(request, HOP_TIMEOUT).await {
            Ok(ForwardResponse::Write(r)) => r,
            Ok(_) => Err(ForwardError::NotLeader { leader: None }),
            Err(e) => Err(forward_error(e)),
        }
    }

    pub(crate) async fn write_local(
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
        match self
            .forward(node, ForwardRequest::Write { group, request })
            .await
        {
            Ok(ForwardResponse::Write(Ok(_))) if self.take_lost_answer() => {
                tracing::warn!(
                    node,
                    group,
                    "fault injection: the leader's answer is dropped"
                );
                Err(forward_error(RpcError::Unreachable(
                    format!("node {node}"),
                    "connection dropped (fault injection)".into(),
                )))
            }
            Ok(ForwardResponse::Write(r)) => r,
            Ok(other) => Err(ForwardError::Db(Error::Io(format!(
                "unexpected answer from node {node}: {other:?}"
            )))),
            Err(None) => Err(ForwardError::NotLeader { leader: None }),
            Err(Some(e)) => Err(forward_error(e)),
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
        let count = mutations.len();
        let (since, mut tries) = (Instant::now(), 0);
        loop {
            let request = Request::Write {
                mutations: mutations.clone(),
                timestamp: self.hlc.now(),
                now_ms,
            };
            let replies = match self.write(group, request).await? {
                Response::Replies(r) => {
                    assert_eq!(r.len(), count, "one reply per mutation");
                    r
                }
                other => {
                    return Err(Error::Io(format!(
                        "unexpected response to a write: {other:?}"
                    )));
                }
            };
            // A lock refuses the whole entry (nothing applied): try again as a new request
            // (the same one would get the remembered refusal).
            let locked = matches!(replies.first(), Some(Err(Error::Locked(_))));
            if !locked || self.wait_for_lock(group, since, &mut tries).await.is_none() {
                return Ok(replies);
            }
        }
    }

    /// Runs a MULTI/EXEC transaction on one data group as one log entry (`Request::Txn`):
    /// `None` when a guarded key changed since its WATCH (nothing applied), else one reply
    /// per mutation. Retried and forwarded like any write, exactly once.
    pub async fn write_txn(
        &self,
        group: GroupId,
        mutations: Vec<Mutation>,
        guards: Vec<crate::command::TxnGuard>,
        now_ms: u64,
    ) -> Result<Option<Vec<Result<Reply, Error>>>, Error> {
        let count = mutations.len();
        if self.unsafe_txn {
            // Deliberately broken (testing only): one entry per command, guards ignored.
            let mut replies = Vec::with_capacity(count);
            for m in mutations {
                replies.extend(self.write_mutations(group, vec![m], now_ms).await?);
            }
            return Ok(Some(replies));
        }
        let guarded = !guards.is_empty();
        let (since, mut tries) = (Instant::now(), 0);
        let mut replies = loop {
            let request = Request::Txn {
                mutations: mutations.clone(),
                timestamp: self.hlc.now(),
                now_ms,
                guards: guards.clone(),
            };
            let replies = match self.write(group, request).await? {
                Response::Replies(r) => r,
                other => {
                    return Err(Error::Io(format!(
                        "unexpected response to a transaction: {other:?}"
                    )));
                }
            };
            // Refused whole by a cross-shard transaction's lock: nothing ran; try again.
            match replies.first() {
                Some(Err(e @ Error::Locked(_))) => {
                    if self.wait_for_lock(group, since, &mut tries).await.is_none() {
                        return Err(e.clone());
                    }
                }
                _ => break replies,
            }
        };
        if guarded {
            match replies.first() {
                Some(Ok(Reply::Ok)) => {
                    let _verdict = replies.remove(0);
                }
                Some(Ok(Reply::NilArray)) => return Ok(None),
                other => {
                    return Err(Error::Io(format!(
                        "unexpected verdict of a transaction: {other:?}"
                    )));
                }
            }
        }
        if replies.len() != count {
            return Err(Error::Io(format!(
                "a transaction of {count} mutations got {} replies",
                replies.len()
            )));
        }
        Ok(Some(replies))
    }

    /// Whether `--debug-unsafe-txn` (testing only) is on: transactions run one command at a
    /// time, not atomic.
    pub fn unsafe_txn(&self) -> bool {
        self.unsafe_txn
    }

    /// Has one step of cross-shard transaction `txn` applied by participant `group` (through
    /// its leader, retried like any write) and returns the participant's answer. `Err`: the
    /// step may or may not have been applied (every step is idempotent: resend it).
    pub async fn txn_step(
        &self,
        group: GroupId,
        txn: capdb_types::txn::TxnId,
        step: capdb_types::txn::ShardStep<Mutation, crate::command::TxnGuard>,
        now_ms: u64,
    ) -> Result<capdb_storage::disk::TxnAnswer, Error> {
        let request = Request::TxnStep {
            txn,
            step,
            timestamp: self.hlc.now(),
            now_ms,
        };
        match self.write(group, request).await? {
            Response::Txn(answer) => answer,
            other => Err(Error::Io(format!(
                "unexpected response to a transaction step: {other:?}"
            ))),
        }
    }

    /// Turns a data group's change log on or off, through its log (every replica switches at
    /// the same entry).
    pub async fn changes_config(&self, group: GroupId, on: bool) -> Result<(), Error> {
        match self.write(group, Request::ChangesConfig { on }).await? {
            Response::Replies(r) if matches!(r.first(), Some(Ok(Reply::Ok))) => Ok(()),
            other => Err(Error::Io(format!(
                "unexpected response to a change-log switch: {other:?}"
            ))),
        }
    }

    /// Sets how long a data group keeps its change-log rows, through its log.
    pub async fn changes_retention(&self, group: GroupId, retention_ms: u64) -> Result<(), Error> {
        self.changes_step(group, Request::ChangesRetention { retention_ms })
            .await
    }

    /// Sets whether a data group's change events carry their key's previous string value,
    /// through its log.
    pub async fn changes_prev(&self, group: GroupId, on: bool) -> Result<(), Error> {
        self.changes_step(group, Request::ChangesPrev { on }).await
    }

    /// Sets how many bytes of change-log events a data group keeps, through its log.
    pub async fn changes_retention_bytes(&self, group: GroupId, bytes: u64) -> Result<(), Error> {
        self.changes_step(group, Request::ChangesRetentionBytes { bytes })
            .await
    }

    /// Trims a data group's change log at this node's clock (the leader's), and to its size
    /// bound as this node's replica counts it, through its log.
    /// `pinned`: the oldest consumer-group position's clock on this shard (entries at or
    /// above it stay, within `capdb_storage::disk::PIN_BYTES_MAX`); with it, nothing is
    /// proposed when nothing below it is due.
    pub async fn changes_trim(
        &self,
        group: GroupId,
        pinned: Option<capdb_types::Timestamp>,
    ) -> Result<(), Error> {
        let now_ms = capdb_types::unix_now_ms();
        let table = self
            .engine
            .table(&capdb_storage::layout::shard_table(group), false);
        let keep_from = table.changes_size_keep_from()?;
        let request = match (pinned, keep_from) {
            (Some(pinned), keep_from) => {
                if !table.changes_trim_due(now_ms, Some(pinned))? {
                    return Ok(());
                }
                Request::ChangesTrimPinned {
                    now_ms,
                    keep_from,
                    pinned,
                }
            }
            (None, Some(keep_from)) => Request::ChangesTrimTo { now_ms, keep_from },
            (None, None) => Request::ChangesTrim { now_ms },
        };
        self.changes_step(group, request).await
    }

    /// Closes a data group's change stream up to this node's clock now, and at least to
    /// `at_least` (another shard's clock, which a clock running behind would not reach),
    /// through its log ([`Request::ChangesProgress`]), so that a merged reader can release
    /// events of other shards while this one is idle. Coalesced per group on this node: when
    /// one reaching `at_least` was proposed less than `min_gap` ago, nothing is proposed and
    /// `Ok(false)` answers.
    pub async fn changes_progress(
        &self,
        group: GroupId,
        min_gap: Duration,
        at_least: capdb_types::Timestamp,
    ) -> Result<bool, Error> {
        let ts = self.hlc.now().max(at_least);
        {
            let mut sent = self.progress_sent.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if sent.get(&group).is_some_and(|(at, reached)| {
                now.saturating_duration_since(*at) < min_gap && *reached >= at_least
            }) {
                return Ok(false);
            }
            // Bounded by the groups of this cluster (one entry each).
            sent.insert(group, (now, ts));
        }
        self.changes_step(group, Request::ChangesProgress { ts })
            .await
            .map(|()| true)
    }

    /// Applies a consumer-group command through a data group's log; its answer (an error
    /// inside: refused, nothing changed).
    pub async fn changes_group(
        &self,
        group: GroupId,
        cmd: capdb_types::changes::groups::GroupCommand,
    ) -> Result<Result<Reply, Error>, Error> {
        match self.write(group, Request::ChangesGroup(cmd)).await? {
            Response::Replies(mut r) if r.len() == 1 => Ok(r.remove(0)),
            other => Err(Error::Io(format!(
                "unexpected response to a consumer-group command: {other:?}"
            ))),
        }
    }

    /// Applies a view command through a data group's log (`capdb_storage::disk` `views.rs`);
    /// its answer (an error inside: refused, nothing changed).
    pub async fn view(
        &self,
        group: GroupId,
        cmd: capdb_types::views::ViewCommand,
    ) -> Result<Result<Reply, Error>, Error> {
        match self.write(group, Request::View(cmd)).await? {
            Response::Replies(mut r) if r.len() == 1 => Ok(r.remove(0)),
            other => Err(Error::Io(format!(
                "unexpected response to a view command: {other:?}"
            ))),
        }
    }

    async fn changes_step(&self, group: GroupId, request: Request) -> Result<(), Error> {
        match self.write(group, request).await? {
            Response::Replies(r) if matches!(r.first(), Some(Ok(Reply::Ok))) => Ok(()),
            other => Err(Error::Io(format!(
                "unexpected response to a change-log step: {other:?}"
            ))),
        }
    }

    /// A point in a data group's log for WATCH: the log index of an entry proposed now, so
    /// every change linearized before this call is at or below it.
    pub async fn watch_point(&self, group: GroupId) -> Result<u64, Error> {
        match self.write(group, Request::WatchPoint).await? {
            Response::Replies(r) => match r.first() {
                Some(Ok(Reply::Integer(i))) if *i >= 0 => Ok(*i as u64),
                other => Err(Error::Io(format!(
                    "unexpected answer to a watch point: {other:?}"
                ))),
            },
            other => Err(Error::Io(format!(
                "unexpected response to a watch point: {other:?}"
            ))),
        }
    }

    /// Deletes every key of a data group (FLUSHDB), through its log. Refused (nothing
    /// deleted) while a cross-shard transaction is prepared on the group: retried like a write
    /// refused by a lock, then `Error::Locked`.
    pub async fn clear(&self, group: GroupId) -> Result<(), Error> {
        let (since, mut tries) = (Instant::now(), 0);
        loop {
            match self.write(group, Request::Clear).await? {
                Response::Replies(r) => match r.first() {
                    Some(Err(e @ Error::Locked(_))) => {
                        if self.wait_for_lock(group, since, &mut tries).await.is_none() {
                            return Err(e.clone());
                        }
                    }
                    _ => return Ok(()),
                },
                other => {
                    return Err(Error::Io(format!(
                        "unexpected response to a clear: {other:?}"
                    )));
                }
            }
        }
    }

    /// Proposes a change to the cluster map. A refusal by the map comes back typed.
    pub async fn propose_meta(&self, cmd: MetaCommand) -> Result<(), Error> {
        match self.write(META_GROUP, Request::Meta(cmd)).await? {
            Response::Meta(MetaResponse::Ok) => Ok(()),
            Response::Meta(MetaResponse::Refused(e)) => Err(e),
            Response::Meta(MetaResponse::Error(e)) => Err(Error::InvalidInput(e)),
            other => Err(Error::Io(format!(
                "unexpected response to a meta command: {other:?}"
            ))),
        }
    }

    /// Whether this node leads `group` now.
    pub fn leads(&self, group: GroupId) -> bool {
        self.group(group)
            .is_some_and(|g| g.raft.metrics().borrow_watched().state == ServerState::Leader)
    }

    /// The term this node leads `group` in, if it leads it (a job coordinator's epoch).
    pub fn led_term(&self, group: GroupId) -> Option<u64> {
        self.group(group).and_then(|g| {
            let m = g.raft.metrics().borrow_watched().clone();
            (m.state == ServerState::Leader).then_some(m.current_term)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::candidate_order;

    #[test]
    fn the_known_leader_comes_first_then_the_guess_then_the_replicas() {
        assert_eq!(
            candidate_order(Some(2), Some(3), &[1, 2, 3], 0),
            vec![2, 3, 1]
        );
    }

    #[test]
    fn no_node_is_tried_twice_in_one_order() {
        assert_eq!(candidate_order(Some(1), Some(1), &[1, 2], 0), vec![1, 2]);
    }

    #[test]
    fn retries_rotate_through_the_replicas_so_a_dead_guess_does_not_stick() {
        // With nothing known, attempt k starts at replica k (mod n).
        assert_eq!(candidate_order(None, None, &[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(candidate_order(None, None, &[1, 2, 3], 2), vec![3, 1, 2]);
        assert_eq!(candidate_order(None, None, &[1, 2, 3], 3), vec![1, 2, 3]);
    }

    #[test]
    fn a_group_without_replicas_in_the_map_has_only_what_is_known() {
        assert_eq!(candidate_order(None, Some(4), &[], 7), vec![4]);
        assert!(candidate_order(None, None, &[], 7).is_empty());
    }
}
