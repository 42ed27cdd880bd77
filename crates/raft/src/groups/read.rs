//! Reads of `cp` groups: ReadIndex barriers, and reads, scans and counts routed like writes.
//!
//! Linearizable reads use ReadIndex (`ensure_linearizable(ReadPolicy::ReadIndex)`): the leader
//! confirms with a quorum heartbeat sent after the read arrived that it still leads, then waits
//! until its state machine has applied everything committed before the read. This does not
//! depend on clocks, unlike a leader lease, which is why it is the default. `Stale` reads answer
//! from the local replica (or any replica) without that round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_cluster::{GroupId, NodeId};
use capdb_storage::layout::shard_table;
use capdb_storage::{KeyspaceStore, ScanRange};
use capdb_types::{Error, ReadMode, Reply, Value};
use openraft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{LinearizableReadError, RaftError};

use super::route::{HOP_TIMEOUT, Pick, RouteError};
use super::{Group, Groups, REQUEST_DEADLINE, unavailable};
use crate::messages::{ForwardError, ForwardRequest, ForwardResponse, ScanPage};

/// Most linearizable reads of one group waiting for a barrier. Beyond it a read is refused at
/// once (`-TRYAGAIN`, nothing happened) rather than growing memory; every waiting read is
/// answered within [`HOP_TIMEOUT`] plus a little, so the queue drains at least that fast.
pub const BARRIER_WAITING_MAX: usize = 100_000;

/// Linearizable reads waiting for a read barrier of one group.
#[derive(Default)]
pub(crate) struct BarrierQueue {
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
            // The group is stopping here (this replica is being dropped after a move): another
            // replica can serve the read, so the router tries elsewhere.
            Ok(Err(RaftError::Fatal(_))) => Err(ForwardError::UnknownGroup(group)),
        };
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}

/// A read's transport failure: reads change nothing, so any failure is simply retried.
fn read_error(_: Option<capdb_transport::RpcError>) -> ForwardError {
    ForwardError::NotLeader { leader: None }
}

fn pick_for(mode: ReadMode) -> Pick {
    match mode {
        ReadMode::Linearizable => Pick::Leader,
        ReadMode::Stale => Pick::AnyReplica,
    }
}

fn read_failed(group: GroupId, what: &str, e: RouteError) -> Error {
    match e {
        RouteError::Final(e) => e,
        RouteError::Exhausted { last_err, .. } => unavailable(format!(
            "shard group {group}: no leader for {what} within {} ms ({last_err}); retry, or read with READONLY for a possibly stale answer",
            REQUEST_DEADLINE.as_millis()
        )),
    }
}

impl Groups {
    /// Routes one read-only request: served by `local` when the pick is this node, else sent
    /// as `remote()` and its answer taken out by `answer` (which hands back any other kind).
    async fn route_read<T, L, LF>(
        &self,
        group: GroupId,
        mode: ReadMode,
        what: &str,
        local: L,
        remote: impl Fn() -> ForwardRequest,
        answer: fn(ForwardResponse) -> Result<Result<T, ForwardError>, ForwardResponse>,
    ) -> Result<T, Error>
    where
        L: Fn(Instant) -> LF,
        LF: Future<Output = Result<T, ForwardError>>,
    {
        let (local, remote) = (&local, &remote);
        self.route(group, pick_for(mode), |target, _, deadline| async move {
            match target {
                Some(t) if t == self.me => local(deadline).await,
                Some(t) => match answer(self.forward(t, remote()).await.map_err(read_error)?) {
                    Ok(result) => result,
                    Err(other) => Err(unexpected(t, other)),
                },
                None => Err(ForwardError::NotLeader { leader: None }),
            }
        })
        .await
        .map_err(|e| read_failed(group, what, e))
    }

    /// Reads keys of one group. `Linearizable` reads go to the leader (ReadIndex); `Stale`
    /// reads are served by this node's replica when it has one, else by any replica.
    pub async fn read(
        &self,
        group: GroupId,
        keys: Vec<Bytes>,
        mode: ReadMode,
        now_ms: u64,
    ) -> Result<Vec<Option<Value>>, Error> {
        let mode = if self.unsafe_local_reads {
            ReadMode::Stale
        } else {
            mode
        };
        let keys = &keys;
        self.route_read(
            group,
            mode,
            "a linearizable read",
            |deadline| self.read_local(group, keys, mode, now_ms, deadline),
            || ForwardRequest::Read {
                group,
                keys: keys.clone(),
                mode,
            },
            |answer| match answer {
                ForwardResponse::Read(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
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
    ) -> Result<ScanPage, Error> {
        let range = ScanRange {
            after,
            end: None,
            prefix,
        };
        let range = &range;
        self.route_read(
            group,
            mode,
            "a scan",
            |deadline| self.scan_local(group, range.clone(), limit, mode, now_ms, deadline),
            || ForwardRequest::Scan {
                group,
                after: range.after.clone(),
                prefix: range.prefix.clone(),
                limit,
                mode,
            },
            |answer| match answer {
                ForwardResponse::Scan(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// The number of keys in a group (DBSIZE), read like [`Groups::read`].
    pub async fn count(&self, group: GroupId, mode: ReadMode) -> Result<u64, Error> {
        self.route_read(
            group,
            mode,
            "counting keys",
            |deadline| self.count_local(group, mode, deadline),
            || ForwardRequest::Count { group, mode },
            |answer| match answer {
                ForwardResponse::Count(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// Runs a read-only data-type command on a group, routed and fenced like [`Groups::read`].
    /// Its own errors (WRONGTYPE, syntax) come back as final errors.
    pub async fn query(
        &self,
        group: GroupId,
        args: Vec<Bytes>,
        mode: ReadMode,
        now_ms: u64,
        seed: u64,
    ) -> Result<Reply, Error> {
        let mode = if self.unsafe_local_reads {
            ReadMode::Stale
        } else {
            mode
        };
        let args = &args;
        self.route_read(
            group,
            mode,
            "a linearizable read",
            |deadline| self.query_local(group, args, mode, now_ms, seed, deadline),
            || ForwardRequest::Query {
                group,
                args: args.clone(),
                mode,
                seed,
            },
            |answer| match answer {
                ForwardResponse::Query(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// The last log index this node's replica of `group` applied (`None`: no replica here):
    /// taken before a read, then handed to [`Groups::wait_applied_past`] to wait for what
    /// comes after it without missing an apply in between.
    pub fn applied_mark(&self, group: GroupId) -> Option<u64> {
        let g = self.group(group)?;
        let applied = g.raft.data_metrics().borrow_watched().last_applied;
        Some(applied.map_or(0, |l| l.index))
    }

    /// Waits until this node's replica of `group` has applied past `mark`, or `max` passed
    /// (at once past `max` when this node holds no replica): what a blocked change-stream
    /// reader waits on instead of polling.
    pub async fn wait_applied_past(&self, group: GroupId, mark: Option<u64>, max: Duration) {
        let (Some(g), Some(mark)) = (self.group(group), mark) else {
            // No replica here to watch: look again soon.
            tokio::time::sleep(max.min(Duration::from_millis(10))).await;
            return;
        };
        let mut rx = g.raft.data_metrics();
        let past = async {
            loop {
                if rx
                    .borrow_watched()
                    .last_applied
                    .is_some_and(|l| l.index > mark)
                {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The group stopped: nothing more will be applied here.
                    return std::future::pending().await;
                }
            }
        };
        let _ = tokio::time::timeout(max, past).await;
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
            if q.waiting.len() >= BARRIER_WAITING_MAX {
                return Err(ForwardError::Db(unavailable(format!(
                    "shard group {group}: {BARRIER_WAITING_MAX} reads already wait for a read barrier; retry"
                ))));
            }
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
            // The barrier task ended without answering: the group is stopping here.
            Ok(Err(_)) => Err(ForwardError::UnknownGroup(group)),
            Err(_) => Err(ForwardError::Db(unavailable(format!(
                "shard group {group}: read barrier timed out (no quorum?)"
            )))),
        }
    }

    /// The group's replica on this node, after a read barrier when `mode` asks for one.
    async fn readable(
        &self,
        group: GroupId,
        mode: ReadMode,
        deadline: Instant,
    ) -> Result<capdb_storage::disk::DiskTable, ForwardError> {
        let g = self.group(group).ok_or(ForwardError::UnknownGroup(group))?;
        if mode == ReadMode::Linearizable {
            self.read_barrier(group, &g, deadline).await?;
        }
        // Applies are answered before the storage commits them: wait here, not in the reads.
        let seen = self.engine.visible().await.map_err(ForwardError::Db)?;
        Ok(self.engine.table(&shard_table(group), false).seen(seen))
    }

    pub(crate) async fn read_local(
        &self,
        group: GroupId,
        keys: &[Bytes],
        mode: ReadMode,
        now_ms: u64,
        deadline: Instant,
    ) -> Result<Vec<Option<Value>>, ForwardError> {
        let table = self.readable(group, mode, deadline).await?;
        if mode != ReadMode::Linearizable {
            return keys
                .iter()
                .map(|k| table.get(k, now_ms).map_err(ForwardError::Db))
                .collect();
        }
        // Lock check and values from one snapshot; a locked key waits (bounded) and rereads.
        let (since, mut tries) = (Instant::now(), 0);
        loop {
            match table
                .get_unless_locked(keys, now_ms)
                .map_err(ForwardError::Db)?
            {
                Ok(values) => return Ok(values),
                Err(holder) => {
                    if self.wait_for_lock(group, since, &mut tries).await.is_none() {
                        return Err(ForwardError::Db(Error::Locked(holder.to_string())));
                    }
                }
            }
        }
    }

    pub(crate) async fn scan_local(
        &self,
        group: GroupId,
        range: ScanRange,
        limit: u32,
        mode: ReadMode,
        now_ms: u64,
        deadline: Instant,
    ) -> Result<ScanPage, ForwardError> {
        let table = self.readable(group, mode, deadline).await?;
        if mode == ReadMode::Linearizable {
            self.wait_for_prepared(group, &table).await?;
        }
        let page = table
            .scan(&range, limit as usize, now_ms)
            .map_err(ForwardError::Db)?;
        Ok((page.entries, page.next_after))
    }

    pub(crate) async fn query_local(
        &self,
        group: GroupId,
        args: &[Bytes],
        mode: ReadMode,
        now_ms: u64,
        seed: u64,
        deadline: Instant,
    ) -> Result<Reply, ForwardError> {
        let table = self.readable(group, mode, deadline).await?;
        if mode == ReadMode::Linearizable {
            self.wait_for_locks(group, &table, &table.command_keys(args))
                .await?;
        }
        // `VIEW VERIFY` scans the whole shard: on a thread that may block, never on the
        // runtime's workers (on 2 cores, a worker busy for seconds starves the Raft
        // heartbeats of every group and leaders fall).
        let scans_shard = args
            .first()
            .is_some_and(|a| a.as_ref() == capdb_storage::disk::VIEWS_QUERY.as_bytes())
            && args.get(1).is_some_and(|s| s.as_ref() == b"verify");
        if scans_shard {
            let args = args.to_vec();
            return tokio::task::spawn_blocking(move || table.query(&args, now_ms, seed))
                .await
                .map_err(|e| ForwardError::Db(capdb_types::Error::Io(e.to_string())))?
                .map_err(ForwardError::Db);
        }
        table.query(args, now_ms, seed).map_err(ForwardError::Db)
    }

    pub(crate) async fn count_local(
        &self,
        group: GroupId,
        mode: ReadMode,
        deadline: Instant,
    ) -> Result<u64, ForwardError> {
        let table = self.readable(group, mode, deadline).await?;
        if mode == ReadMode::Linearizable {
            self.wait_for_prepared(group, &table).await?;
        }
        table.len().map_err(ForwardError::Db)
    }
}

impl Groups {
    /// Waits until no cross-shard transaction holds a write lock on `keys` here: a transaction
    /// may be committed (every shard voted yes) before this shard has applied its commit, and a
    /// linearizable read must not return what it is about to replace. Bounded by
    /// [`super::route::LOCK_WAIT_MAX`], then `-TRYAGAIN` (nothing was read).
    async fn wait_for_locks(
        &self,
        group: GroupId,
        table: &capdb_storage::disk::DiskTable,
        keys: &[Bytes],
    ) -> Result<(), ForwardError> {
        let (since, mut tries) = (Instant::now(), 0);
        while let Some(holder) = table.write_locked(keys).map_err(ForwardError::Db)? {
            if self.wait_for_lock(group, since, &mut tries).await.is_none() {
                return Err(ForwardError::Db(Error::Locked(holder.to_string())));
            }
        }
        Ok(())
    }

    /// Waits until every cross-shard transaction prepared here when the read began is decided
    /// and applied: a scan or count of the shard (KEYS, SCAN, DBSIZE) must not miss what a
    /// transaction that already answered its client is about to write. Transactions prepared
    /// later are concurrent with the read and not waited for, so a steady stream of them cannot
    /// starve it. Bounded by [`super::route::LOCK_WAIT_MAX`], then `-TRYAGAIN` (nothing was read).
    async fn wait_for_prepared(
        &self,
        group: GroupId,
        table: &capdb_storage::disk::DiskTable,
    ) -> Result<(), ForwardError> {
        let mut waiting = table.prepared_txns().map_err(ForwardError::Db)?;
        let (since, mut tries) = (Instant::now(), 0);
        while let Some(first) = waiting.first() {
            if self.wait_for_lock(group, since, &mut tries).await.is_none() {
                return Err(ForwardError::Db(Error::Locked(first.to_string())));
            }
            let open = table.prepared_txns().map_err(ForwardError::Db)?;
            waiting.retain(|t| open.contains(t));
        }
        Ok(())
    }
}

fn unexpected(node: NodeId, answer: ForwardResponse) -> ForwardError {
    ForwardError::Db(Error::Io(format!(
        "unexpected answer from node {node}: {answer:?}"
    )))
}
