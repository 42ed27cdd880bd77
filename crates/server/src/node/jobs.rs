//! Jobs on a node (issue 15, `docs/design/mapreduce.md`): the system keyspace `_jobs` that
//! holds their state, the node's side of `capdb_jobs::Cluster` (job commands and pins through
//! the shards' logs, tasks on this node or on another over [`JobsService`]), the coordinators
//! of the jobs whose `_jobs` shard this node leads, and what the front ends call.
//!
//! # Who coordinates
//!
//! The leader of a job's `_jobs` shard, at its Raft term (the job's *epoch*): every second
//! each node looks at the `_jobs` shards it leads and starts a coordinator for every job that
//! has not ended and has none here. A new leader's coordinator claims the job at its newer
//! term and resumes it from its records; the old one's commands are refused from then on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_cluster::{GroupId, NodeId};
use capdb_jobs::throttle::Throttle;
use capdb_jobs::worker::{AttemptKey, Attempts, Checkpoint, PAGE_KEYS, Page, Probe};
use capdb_jobs::{Cluster, ShardReplicas, TaskError, TaskOrder, TaskOutput};
use capdb_raft::command::{Request, Response};
use capdb_reduce::JobSpec;
use capdb_storage::disk::JOBS_QUERY;
use capdb_transport::{Channel, Handler, Peers, Service};
use capdb_types::jobs::{JobCommand, JobRecord, JobState, ShardPin, TaskRecord};
use capdb_types::keyspace::{KeyspaceName, KeyspaceSpec, Mode};
use capdb_types::{Error, ReadMode, Reply, Result};
use serde::{Deserialize, Serialize};

use super::Node;

/// The system keyspace of jobs' state (users cannot create, select, flush or drop it).
pub const JOBS_KEYSPACE: &str = "_jobs";
/// Longest a task's call to another node waits for its output: a job's own longest
/// `limits.max_s` (heartbeats find a lost attempt within seconds; this only bounds the call).
pub const TASK_DEADLINE: Duration = Duration::from_secs(capdb_reduce::spec::MAX_S_CAP);
/// How often a node looks for jobs to coordinate (one local read of each `_jobs` shard it
/// leads); a submission on the leader itself wakes it at once.
const COORDINATE_EVERY: Duration = Duration::from_millis(250);
/// How long a job whose coordinator stopped with an error waits before the next one: from
/// the least, doubling after each error in a row, up to the most.
const RETRY_WAIT_MIN: Duration = Duration::from_secs(1);
const RETRY_WAIT_MAX: Duration = Duration::from_secs(60);
/// Ids one listing of a `_jobs` shard reads (`JOB LIST`; the jobs that have not ended are
/// read from their own index, at most 16 per shard).
const LIST_MAX: usize = capdb_storage::disk::LIST_PAGE_MAX;

/// Whether `name` is a system keyspace's (reserved: a leading `_`).
pub fn is_system_keyspace(name: &str) -> bool {
    name.starts_with('_')
}

/// How long a heartbeat or a cancel waits for the other node (the coordinator's heartbeat
/// period bounds it too).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A request on the jobs channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum JobsRequest {
    /// Run this task attempt on your replica (which holds the pin) and answer its output.
    RunTask(TaskOrder),
    /// A heartbeat: how does this attempt go?
    Probe(AttemptKey),
    /// Stop this attempt.
    Cancel(AttemptKey),
    /// This attempt's newest checkpoint, if it reaches past this many keys.
    Checkpoint(AttemptKey, u64),
    /// Renew the lease of this pin of this shard: (shard, owner, index).
    RenewPin(u64, Bytes, u64),
    /// The n-th string key of this pin of this shard: (shard, owner, index, n).
    KeyAt(u64, Bytes, u64, u64),
}

/// An answer on the jobs channel, by request.
#[derive(Debug, Serialize, Deserialize)]
pub enum JobsResponse {
    Task(std::result::Result<TaskOutput, TaskError>),
    Probe(Probe),
    /// Whether it was running.
    Cancelled(bool),
    Checkpoint(Option<Checkpoint>),
    /// Whether this node holds the pin.
    Renewed(bool),
    KeyAt(Option<Bytes>),
}

/// The jobs channel between nodes.
pub struct JobsService;

impl Service for JobsService {
    const CHANNEL: Channel = Channel::Jobs;
    type Request = JobsRequest;
    type Response = JobsResponse;
}

/// Serves the jobs channel: runs tasks here, answers heartbeats and cancels.
pub struct JobsHandler(pub Arc<Node>);

impl Handler<JobsService> for JobsHandler {
    async fn handle(&self, _from: NodeId, request: JobsRequest) -> JobsResponse {
        match request {
            JobsRequest::RunTask(order) => JobsResponse::Task(run_task_here(&self.0, order).await),
            JobsRequest::Probe(key) => JobsResponse::Probe(self.0.jobs.attempts.probe(&key)),
            JobsRequest::Cancel(key) => JobsResponse::Cancelled(self.0.jobs.attempts.cancel(&key)),
            JobsRequest::Checkpoint(key, newer_than) => {
                JobsResponse::Checkpoint(self.0.jobs.attempts.checkpoint(&key, newer_than))
            }
            JobsRequest::RenewPin(shard, owner, index) => {
                JobsResponse::Renewed(renew_pin_here(&self.0, shard, &owner, index))
            }
            JobsRequest::KeyAt(shard, owner, index, n) => {
                JobsResponse::KeyAt(key_at_here(&self.0, shard, owner, index, n).await)
            }
        }
    }
}

/// This node's jobs: its peers on the jobs channel and the jobs it coordinates.
pub struct Jobs {
    pub peers: Peers<JobsService>,
    /// The task attempts running on this node (heartbeats read them, cancels reach them).
    pub attempts: Arc<Attempts>,
    /// The node's scan-rate limit, following foreground latency (`capdb_jobs::throttle`).
    pub throttle: Arc<Throttle>,
    /// Job id -> the epoch of the coordinator running it here.
    coordinating: Mutex<HashMap<Bytes, u64>>,
    /// Job id -> errors in a row of its coordinators here, and when the next may start.
    retry: Mutex<HashMap<Bytes, (u32, Instant)>>,
    /// A job was submitted here: look for jobs to coordinate now.
    submitted: tokio::sync::Notify,
}

impl Jobs {
    pub fn new(peers: Peers<JobsService>, throttle: bool) -> Jobs {
        Jobs {
            peers,
            attempts: Arc::default(),
            throttle: Arc::new(Throttle::new(throttle)),
            coordinating: Mutex::default(),
            retry: Mutex::default(),
            submitted: tokio::sync::Notify::new(),
        }
    }

    fn coordinating(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, u64>> {
        self.coordinating.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn retry(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, (u32, Instant)>> {
        self.retry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a job off the coordinating set when its coordinator's task ends, even by a panic.
struct Coordinating {
    node: Arc<Node>,
    id: Bytes,
    epoch: u64,
}

impl Drop for Coordinating {
    fn drop(&mut self) {
        let mut c = self.node.jobs.coordinating();
        // A newer coordinator of the same job (a later term) keeps its entry.
        if c.get(&self.id) == Some(&self.epoch) {
            c.remove(&self.id);
        }
    }
}

/// Renews the lease of a pin on this node's replica of `shard`: whether it holds it.
fn renew_pin_here(node: &Node, shard: u64, owner: &[u8], index: u64) -> bool {
    node.groups.holds(shard)
        && node
            .engine
            .table(&capdb_storage::layout::shard_table(shard), false)
            .renew_pin(owner, index)
}

/// The `n`-th string key (from 0) of this node's replica of `shard` under its pin of `owner`
/// at `index` (`None`: fewer keys, no such pin here, or `n` past a task's most keys). Read a
/// page at a time on a thread that may block.
async fn key_at_here(node: &Node, shard: u64, owner: Bytes, index: u64, n: u64) -> Option<Bytes> {
    if !node.groups.holds(shard) || n > capdb_jobs::plan::TASK_KEYS_MAX {
        return None;
    }
    let table = node
        .engine
        .table(&capdb_storage::layout::shard_table(shard), false);
    tokio::task::spawn_blocking(move || {
        capdb_jobs::worker::nth_key(
            |after| {
                table
                    .pinned_scan(&owner, index, None, None, after, PAGE_KEYS, true)
                    .map(|p| Page {
                        entries: p.entries.into_iter().map(|(k, v)| (k, v.data)).collect(),
                        next: p.next,
                    })
                    .map_err(|e| e.to_string())
            },
            n,
        )
    })
    .await
    .ok()
    .flatten()
}

/// Runs a task attempt on this node's replica of its shard (on a thread that may block).
async fn run_task_here(
    node: &Node,
    order: TaskOrder,
) -> std::result::Result<TaskOutput, TaskError> {
    if !node.groups.holds(order.shard) {
        return Err(TaskError::Failed(format!(
            "node {} holds no replica of shard {}",
            node.id(),
            order.shard
        )));
    }
    let include_expired = JobSpec::parse(order.spec.as_bytes())
        .map(|s| s.input.expired == capdb_reduce::spec::Expired::Include)
        .map_err(|e| TaskError::User(format!("the job's spec: {e}")))?;
    let table = node
        .engine
        .table(&capdb_storage::layout::shard_table(order.shard), false);
    let registered = node
        .jobs
        .attempts
        .start((order.job.clone(), order.task, order.attempt))?;
    let nice = node.config.cluster.job_nice;
    let throttle = node.jobs.throttle.clone();
    let (answer, output) = tokio::sync::oneshot::channel();
    // A thread of its own (not the runtime's blocking pool): it is niced for the task's
    // life and ends with it, as a thread cannot be un-niced without privileges.
    let spawned = std::thread::Builder::new()
        .name("capdb-task".into())
        .spawn(move || {
            lower_priority(nice);
            let _ = answer.send(capdb_jobs::worker::run(
                &order,
                |after| {
                    table
                        .pinned_scan(
                            &order.job,
                            order.pin_index,
                            order.from.as_deref(),
                            order.to.as_deref(),
                            after,
                            PAGE_KEYS,
                            include_expired,
                        )
                        .map(|p| Page {
                            entries: p.entries.into_iter().map(|(k, v)| (k, v.data)).collect(),
                            next: p.next,
                        })
                        .map_err(|e| e.to_string())
                },
                &registered.progress,
                Some(&throttle),
            ));
        });
    if let Err(e) = spawned {
        return Err(TaskError::Failed(format!("no thread for the task: {e}")));
    }
    output
        .await
        .map_err(|_| TaskError::Failed("the task's thread ended without an answer".into()))?
}

/// Lowers the calling thread's scheduling priority to nice `level` (Linux: per thread).
/// Best effort: a failure leaves the thread as it was, which is only slower for others.
fn lower_priority(level: i32) {
    if level == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority on this thread's own id; no memory is involved.
        let tid = unsafe { libc::gettid() };
        let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, level) };
        if done != 0 {
            tracing::debug!(level, error = %std::io::Error::last_os_error(), "a task thread could not be niced");
        }
    }
}

/// The node as the job coordinator sees the cluster.
#[derive(Clone)]
pub struct NodeCluster(pub Arc<Node>);

fn bulk(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

impl NodeCluster {
    /// Where `node` listens to its peers.
    fn peer_addr(&self, node: u64) -> Result<String> {
        self.0
            .cluster()
            .nodes
            .get(&node)
            .map(|n| n.peer_addr.clone())
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))
    }

    /// The `_jobs` shard job `id` lives on.
    fn jobs_group(&self, id: &[u8]) -> Result<GroupId> {
        let state = self.0.cluster();
        let name = KeyspaceName::new(JOBS_KEYSPACE)?;
        let ks = state.keyspaces.get(&name).ok_or_else(|| {
            Error::Unavailable("the _jobs keyspace does not exist yet: submit a job".into())
        })?;
        Ok(ks.shard_for_key(id).group)
    }

    /// A read of `_jobs` rows (`capdb.jobs ...`) on the shard of `id`.
    async fn jobs_query(&self, group: GroupId, args: &[&[u8]]) -> Result<Reply> {
        let mut a = vec![bulk(JOBS_QUERY)];
        a.extend(args.iter().map(|x| Bytes::copy_from_slice(x)));
        self.0
            .groups
            .query(
                group,
                a,
                ReadMode::Linearizable,
                capdb_types::unix_now_ms(),
                0,
            )
            .await
    }

    /// A data shard's single answer to `request` (proposed through its log).
    async fn write_one(
        &self,
        group: GroupId,
        request: Request,
    ) -> Result<std::result::Result<Reply, Error>> {
        match self.0.groups.write(group, request).await? {
            Response::Replies(mut v) if v.len() == 1 => Ok(v.remove(0)),
            Response::Expired => Err(Error::OutcomeUnknown(
                "the request was retried after its session was forgotten".into(),
            )),
            other => Err(Error::Io(format!("unexpected answer {other:?}"))),
        }
    }

    /// Job `id`'s record (`None`: no such job).
    pub async fn record(&self, id: &[u8]) -> Result<Option<JobRecord>> {
        let group = self.jobs_group(id)?;
        match self.jobs_query(group, &[b"record", id]).await? {
            Reply::Bulk(raw) => postcard::from_bytes(&raw)
                .map(Some)
                .map_err(|e| Error::Corruption(format!("a job record: {e}"))),
            _ => Ok(None),
        }
    }

    /// The final result of job `id` (the job must be done): its rows as one JSON array,
    /// joined from its chunks (each a JSON array) without parsing them.
    pub async fn result(&self, id: &[u8], rec: &JobRecord) -> Result<Bytes> {
        let group = self.jobs_group(id)?;
        let mut out = Vec::from(&b"["[..]);
        for n in 0..rec.result_chunks {
            let chunk = self
                .jobs_query(group, &[b"result", id, n.to_string().as_bytes()])
                .await?;
            let Reply::Bulk(raw) = chunk else {
                return Err(Error::Corruption(format!(
                    "result chunk {n} of a done job is missing"
                )));
            };
            let inner = raw
                .strip_prefix(b"[")
                .and_then(|r| r.strip_suffix(b"]"))
                .ok_or_else(|| Error::Corruption(format!("result chunk {n} is not an array")))?;
            if !inner.is_empty() {
                if out.len() > 1 {
                    out.push(b',');
                }
                out.extend_from_slice(inner);
            }
        }
        out.push(b']');
        Ok(Bytes::from(out))
    }

    /// Job ids on every `_jobs` shard (at most [`LIST_MAX`] per shard).
    pub async fn list(&self) -> Result<Vec<Bytes>> {
        let state = self.0.cluster();
        let Some(ks) = state.keyspaces.get(&KeyspaceName::new(JOBS_KEYSPACE)?) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for s in &ks.shards {
            if let Reply::Array(ids) = self
                .jobs_query(s.group, &[b"list", b"", LIST_MAX.to_string().as_bytes()])
                .await?
            {
                out.extend(ids.into_iter().filter_map(|r| match r {
                    Reply::Bulk(b) => Some(b),
                    _ => None,
                }));
            }
        }
        Ok(out)
    }
}

impl Cluster for NodeCluster {
    async fn job(&self, cmd: JobCommand) -> Result<std::result::Result<Reply, Error>> {
        let group = self.jobs_group(cmd.id())?;
        self.write_one(group, Request::Job(cmd)).await
    }

    async fn record(&self, id: &Bytes) -> Result<Option<JobRecord>> {
        NodeCluster::record(self, id).await
    }

    async fn tasks(&self, id: &Bytes) -> Result<Vec<TaskRecord>> {
        let group = self.jobs_group(id)?;
        let mut out: Vec<TaskRecord> = Vec::new();
        loop {
            let from = out.len().to_string();
            let page = self
                .jobs_query(group, &[b"tasks", id, from.as_bytes(), b"1024"])
                .await?;
            let Reply::Array(rows) = page else {
                return Err(Error::Io("a tasks query answered no array".into()));
            };
            if rows.is_empty() {
                return Ok(out);
            }
            for r in rows {
                let Reply::Bulk(raw) = r else {
                    return Err(Error::Io("a task row is not bytes".into()));
                };
                out.push(
                    postcard::from_bytes(&raw)
                        .map_err(|e| Error::Corruption(format!("a task record: {e}")))?,
                );
            }
        }
    }

    async fn partial_chunk(
        &self,
        id: &Bytes,
        task: u32,
        attempt: u16,
        n: u32,
    ) -> Result<Option<Bytes>> {
        let group = self.jobs_group(id)?;
        let (task, attempt, n) = (task.to_string(), attempt.to_string(), n.to_string());
        match self
            .jobs_query(
                group,
                &[
                    b"partial",
                    id,
                    task.as_bytes(),
                    attempt.as_bytes(),
                    n.as_bytes(),
                ],
            )
            .await?
        {
            Reply::Bulk(raw) => Ok(Some(raw)),
            _ => Ok(None),
        }
    }

    async fn shards(&self, keyspace: &str) -> Result<Vec<ShardReplicas>> {
        let state = self.0.cluster();
        let name = KeyspaceName::new(keyspace)?;
        if is_system_keyspace(keyspace) {
            return Err(Error::InvalidInput(format!(
                "'{keyspace}' is a system keyspace: jobs cannot read it"
            )));
        }
        let ks = state
            .keyspaces
            .get(&name)
            .ok_or_else(|| Error::KeyspaceNotFound(keyspace.to_string()))?;
        if ks.spec.mode != Mode::Cp {
            return Err(Error::InvalidInput(format!(
                "jobs run over cp keyspaces; '{keyspace}' is {}",
                ks.spec.mode.as_str()
            )));
        }
        Ok(ks
            .shards
            .iter()
            .map(|s| ShardReplicas {
                shard: s.group,
                replicas: s.replicas.clone(),
                leader: self.0.groups.leader_of(s.group),
            })
            .collect())
    }

    async fn pin(&self, shard: u64, owner: Bytes, now_ms: u64) -> Result<ShardPin> {
        let answer = self
            .write_one(shard, Request::JobPin { owner, now_ms })
            .await??;
        let Reply::Array(v) = answer else {
            return Err(Error::Io(format!("a pin answered {answer:?}")));
        };
        let int = |r: Option<&Reply>| match r {
            Some(Reply::Integer(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        let key = |r: Option<&Reply>| match r {
            Some(Reply::Bulk(b)) => Some(b.clone()),
            _ => None,
        };
        match (int(v.first()), int(v.get(1))) {
            (Some(index), Some(keys)) => Ok(ShardPin {
                shard,
                index,
                keys,
                first_key: key(v.get(2)),
                last_key: key(v.get(3)),
            }),
            _ => Err(Error::Io(format!("a pin answered {v:?}"))),
        }
    }

    async fn key_at(
        &self,
        shard: &ShardReplicas,
        owner: Bytes,
        index: u64,
        n: u64,
    ) -> Option<Bytes> {
        // This node first (no hop), then the other replicas in turn.
        let me = self.0.id();
        let mut order: Vec<u64> = shard
            .replicas
            .iter()
            .copied()
            .filter(|r| *r == me)
            .collect();
        order.extend(shard.replicas.iter().copied().filter(|r| *r != me));
        for node in order {
            let key = if node == me {
                key_at_here(&self.0, shard.shard, owner.clone(), index, n).await
            } else {
                let Ok(addr) = self.peer_addr(node) else {
                    continue;
                };
                let asked = self
                    .0
                    .jobs
                    .peers
                    .get(node, &addr)
                    .call(
                        JobsRequest::KeyAt(shard.shard, owner.clone(), index, n),
                        PROBE_TIMEOUT * 5,
                    )
                    .await;
                match asked {
                    Ok(JobsResponse::KeyAt(key)) => key,
                    _ => None,
                }
            };
            if key.is_some() {
                return key;
            }
        }
        None
    }

    async fn renew_pin(&self, node: u64, shard: u64, owner: Bytes, index: u64) -> Result<bool> {
        if node == self.0.id() {
            return Ok(renew_pin_here(&self.0, shard, &owner, index));
        }
        let addr = self.peer_addr(node)?;
        match self
            .0
            .jobs
            .peers
            .get(node, &addr)
            .call(JobsRequest::RenewPin(shard, owner, index), PROBE_TIMEOUT)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?
        {
            JobsResponse::Renewed(held) => Ok(held),
            other => Err(Error::Io(format!(
                "node {node} answered a pin's renewal with {other:?}"
            ))),
        }
    }

    async fn unpin(&self, shard: u64, owner: Bytes, index: u64) -> Result<()> {
        self.write_one(shard, Request::JobUnpin { owner, index })
            .await??;
        Ok(())
    }

    async fn run_task(
        &self,
        node: u64,
        order: TaskOrder,
    ) -> std::result::Result<TaskOutput, TaskError> {
        if node == self.0.id() {
            return run_task_here(&self.0, order).await;
        }
        let Some(addr) = self
            .0
            .cluster()
            .nodes
            .get(&node)
            .map(|n| n.peer_addr.clone())
        else {
            return Err(TaskError::Unreachable(format!(
                "no address for node {node}"
            )));
        };
        match self
            .0
            .jobs
            .peers
            .get(node, &addr)
            .call(JobsRequest::RunTask(order), TASK_DEADLINE)
            .await
            .map_err(|e| TaskError::Unreachable(e.to_string()))?
        {
            JobsResponse::Task(out) => out,
            other => Err(TaskError::Failed(format!(
                "node {node} answered a task with {other:?}"
            ))),
        }
    }

    async fn probe(&self, node: u64, key: AttemptKey) -> Result<Probe> {
        if node == self.0.id() {
            return Ok(self.0.jobs.attempts.probe(&key));
        }
        let addr = self.peer_addr(node)?;
        match self
            .0
            .jobs
            .peers
            .get(node, &addr)
            .call(JobsRequest::Probe(key), PROBE_TIMEOUT)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?
        {
            JobsResponse::Probe(p) => Ok(p),
            other => Err(Error::Io(format!(
                "node {node} answered a heartbeat with {other:?}"
            ))),
        }
    }

    async fn checkpoint(
        &self,
        node: u64,
        key: AttemptKey,
        newer_than: u64,
    ) -> Result<Option<Checkpoint>> {
        if node == self.0.id() {
            return Ok(self.0.jobs.attempts.checkpoint(&key, newer_than));
        }
        let addr = self.peer_addr(node)?;
        match self
            .0
            .jobs
            .peers
            .get(node, &addr)
            .call(JobsRequest::Checkpoint(key, newer_than), PROBE_TIMEOUT)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?
        {
            JobsResponse::Checkpoint(c) => Ok(c),
            other => Err(Error::Io(format!(
                "node {node} answered a checkpoint request with {other:?}"
            ))),
        }
    }

    async fn cancel(&self, node: u64, key: AttemptKey) {
        if node == self.0.id() {
            self.0.jobs.attempts.cancel(&key);
            return;
        }
        let Ok(addr) = self.peer_addr(node) else {
            return;
        };
        let sent = self
            .0
            .jobs
            .peers
            .get(node, &addr)
            .call(JobsRequest::Cancel(key), PROBE_TIMEOUT)
            .await;
        if let Err(e) = sent {
            tracing::debug!(node, error = %e, "a task attempt's cancel was not delivered (it ends on its own)");
        }
    }

    fn now_ms(&self) -> u64 {
        capdb_types::unix_now_ms()
    }
}

impl Node {
    /// Makes sure the `_jobs` keyspace exists (`cp`, one shard, up to 3 replicas).
    pub(super) async fn ensure_jobs_keyspace(&self) -> Result<()> {
        let name = KeyspaceName::new(JOBS_KEYSPACE)?;
        if self.cluster().keyspaces.contains_key(&name) {
            return Ok(());
        }
        let nodes = self.cluster().nodes.len().max(1) as u32;
        let spec = KeyspaceSpec::new(name, Mode::Cp, Some(nodes.min(3)), Some(1), None, None)?;
        match self.create_keyspace(spec).await {
            Ok(_) | Err(Error::KeyspaceExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits a job (`spec`: its JSON): its id and whether it was created (`false`: the same
    /// spec was already submitted under this id). A spec that does not parse, or names a
    /// keyspace that is not `cp`, is refused before anything is recorded.
    pub async fn job_submit(self: &Arc<Self>, spec: &[u8]) -> Result<(Bytes, bool)> {
        // A library's function named: the record keeps its source (`job_library.rs`).
        let spec = &self.resolve_lua_library(spec).await?;
        let parsed = JobSpec::parse(spec).map_err(|e| Error::InvalidInput(e.to_string()))?;
        if parsed.output.to != capdb_reduce::spec::Destination::Result {
            return Err(Error::InvalidInput(
                "output.to: \"keyspace\" is not available in this version: use \"result\"".into(),
            ));
        }
        let cluster = NodeCluster(self.clone());
        cluster.shards(&parsed.input.keyspace).await?;
        let id = match &parsed.id {
            Some(id) => Bytes::from(id.clone()),
            None => Bytes::from(format!(
                "{}-{}-{:016x}",
                self.id(),
                capdb_types::unix_now_ms(),
                fastrand::u64(..)
            )),
        };
        let mut canonical = parsed.canonical();
        canonical["id"] = serde_json::Value::String(String::from_utf8_lossy(&id).into_owned());
        self.ensure_jobs_keyspace().await?;
        let answer = cluster
            .job(JobCommand::Submit {
                id: id.clone(),
                spec: canonical.to_string(),
                now_ms: capdb_types::unix_now_ms(),
            })
            .await??;
        let created = matches!(&answer, Reply::Array(v) if matches!(v.get(1), Some(Reply::Status(s)) if s == "created"));
        self.jobs.submitted.notify_one();
        Ok((id, created))
    }

    /// Job `id`'s record.
    pub async fn job_record(self: &Arc<Self>, id: &[u8]) -> Result<Option<JobRecord>> {
        if !self
            .cluster()
            .keyspaces
            .contains_key(&KeyspaceName::new(JOBS_KEYSPACE)?)
        {
            return Ok(None);
        }
        NodeCluster(self.clone()).record(id).await
    }

    /// Job `id`'s result rows (a JSON array); `Ok(Err(state))` while it has not ended done.
    pub async fn job_result(
        self: &Arc<Self>,
        id: &[u8],
    ) -> Result<Option<std::result::Result<Bytes, JobState>>> {
        let cluster = NodeCluster(self.clone());
        let Some(rec) = self.job_record(id).await? else {
            return Ok(None);
        };
        if rec.state != JobState::Done {
            return Ok(Some(Err(rec.state)));
        }
        Ok(Some(Ok(cluster.result(id, &rec).await?)))
    }

    /// Cancels job `id`: whether it was running (`None`: no such job).
    pub async fn job_cancel(self: &Arc<Self>, id: &[u8]) -> Result<Option<bool>> {
        if self.job_record(id).await?.is_none() {
            return Ok(None);
        }
        let answer = NodeCluster(self.clone())
            .job(JobCommand::Cancel {
                id: Bytes::copy_from_slice(id),
                now_ms: capdb_types::unix_now_ms(),
            })
            .await??;
        Ok(Some(answer == Reply::Integer(1)))
    }

    /// Job `id`'s task records, in task order (`None`: no such job).
    pub async fn job_tasks(self: &Arc<Self>, id: &[u8]) -> Result<Option<Vec<TaskRecord>>> {
        if self.job_record(id).await?.is_none() {
            return Ok(None);
        }
        NodeCluster(self.clone())
            .tasks(&Bytes::copy_from_slice(id))
            .await
            .map(Some)
    }

    /// The node coordinating job `id` (the leader of its `_jobs` shard), as this node knows.
    pub fn job_coordinator(self: &Arc<Self>, id: &[u8]) -> Option<NodeId> {
        let group = NodeCluster(self.clone()).jobs_group(id).ok()?;
        self.groups.leader_of(group)
    }

    /// Every job's id.
    pub async fn job_list(self: &Arc<Self>) -> Result<Vec<Bytes>> {
        NodeCluster(self.clone()).list().await
    }

    /// Entries of job `id`'s stream after `after` (exclusive), at most `count` (and a page's
    /// bound), each `[id, [field, value, ...]]` as Redis streams answer them; `None`: no such
    /// job.
    pub async fn job_stream(
        self: &Arc<Self>,
        id: &[u8],
        after: capdb_types::changes::StreamId,
        count: usize,
    ) -> Result<Option<Vec<Reply>>> {
        if self.job_record(id).await?.is_none() {
            return Ok(None);
        }
        let cluster = NodeCluster(self.clone());
        let group = cluster.jobs_group(id)?;
        let page = cluster
            .jobs_query(
                group,
                &[
                    b"stream",
                    id,
                    after.ms.to_string().as_bytes(),
                    after.seq.to_string().as_bytes(),
                    count.to_string().as_bytes(),
                ],
            )
            .await?;
        match page {
            Reply::Array(entries) => Ok(Some(entries)),
            other => Err(Error::Io(format!("a job stream read answered {other:?}"))),
        }
    }
}

/// Rounds of [`run_coordinators`] between two passes of the retention (about a minute).
const FORGET_EVERY_ROUNDS: u64 = 240;
/// Jobs one retention pass forgets at most per `_jobs` shard.
const FORGET_PER_PASS: usize = 64;

/// Forgets the jobs of `_jobs` shard `group` (led here) that ended more than
/// [`capdb_types::jobs::JOB_RETENTION_MS`] ago, a bounded number, each in bounded steps.
async fn forget_ended(cluster: &NodeCluster, group: GroupId) {
    let before = capdb_types::unix_now_ms().saturating_sub(capdb_types::jobs::JOB_RETENTION_MS);
    let ids = match cluster
        .jobs_query(
            group,
            &[
                b"ended",
                before.to_string().as_bytes(),
                FORGET_PER_PASS.to_string().as_bytes(),
            ],
        )
        .await
    {
        Ok(Reply::Array(ids)) => ids,
        _ => return,
    };
    for id in ids {
        let Reply::Bulk(id) = id else { continue };
        // Each step deletes at most FORGET_ROWS_MAX rows and says whether more remain.
        for _ in 0..1_000 {
            match cluster.job(JobCommand::Forget { id: id.clone() }).await {
                Ok(Ok(Reply::Integer(1))) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(job = %String::from_utf8_lossy(&id), error = %e, "forgetting a job is left for the next pass");
                    return;
                }
            }
        }
    }
}

/// Ends the node's scan-rate limit's windows (`capdb_jobs::throttle`): one a second, or a
/// half-second one while tasks are held to measure the idle baseline.
pub async fn run_throttle(node: Arc<Node>) {
    while !node.is_shutting_down() {
        let length = if node.jobs.throttle.holding() {
            capdb_jobs::throttle::PAUSE
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(length).await;
        let step = node.jobs.throttle.tick(length, Instant::now());
        if let Some(s) = step.slowdown {
            tracing::debug!(p99_us = step.p99_us, slowdown = s, rate = ?step.rate, "job scan limit");
        }
    }
}

/// Starts a coordinator for every job not ended on the `_jobs` shards this node leads, every
/// [`COORDINATE_EVERY`], until shutdown: one per job and term (a coordinator of an older term
/// here is fenced by the newer one's claim), and after errors in a row, later and later.
pub async fn run_coordinators(node: Arc<Node>) {
    let cfg = capdb_jobs::coordinator::Config {
        slots_per_node: node.config.cluster.job_slots,
        ..Default::default()
    };
    let mut round: u64 = 0;
    while !node.is_shutting_down() {
        tokio::select! {
            _ = tokio::time::sleep(COORDINATE_EVERY) => {}
            _ = node.jobs.submitted.notified() => {}
        }
        let state = node.cluster();
        let Ok(name) = KeyspaceName::new(JOBS_KEYSPACE) else {
            return;
        };
        let Some(ks) = state.keyspaces.get(&name) else {
            continue;
        };
        let cluster = NodeCluster(node.clone());
        round += 1;
        for shard in &ks.shards {
            let Some(epoch) = node.groups.led_term(shard.group) else {
                continue;
            };
            if round.is_multiple_of(FORGET_EVERY_ROUNDS) {
                forget_ended(&cluster, shard.group).await;
            }
            let ids = match cluster.jobs_query(shard.group, &[b"active"]).await {
                Ok(Reply::Array(ids)) => ids,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the active jobs");
                    continue;
                }
            };
            for id in ids {
                let Reply::Bulk(id) = id else { continue };
                if node
                    .jobs
                    .coordinating()
                    .get(&id)
                    .is_some_and(|e| *e >= epoch)
                {
                    continue;
                }
                if node
                    .jobs
                    .retry()
                    .get(&id)
                    .is_some_and(|(_, at)| Instant::now() < *at)
                {
                    continue;
                }
                node.jobs.coordinating().insert(id.clone(), epoch);
                let guard = Coordinating {
                    node: node.clone(),
                    id: id.clone(),
                    epoch,
                };
                let (node, cluster, cfg) = (node.clone(), cluster.clone(), cfg.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let ended =
                        capdb_jobs::coordinator::run(&cluster, id.clone(), epoch, &cfg).await;
                    let job = String::from_utf8_lossy(&id);
                    match ended {
                        Ok(e) => {
                            node.jobs.retry().remove(&id);
                            tracing::info!(%job, epoch, ended = ?e, "job coordinator stopped");
                        }
                        Err(e) => {
                            let mut retry = node.jobs.retry();
                            let entry = retry.entry(id.clone()).or_insert((0, Instant::now()));
                            entry.0 = entry.0.saturating_add(1);
                            let wait = RETRY_WAIT_MIN
                                .saturating_mul(1u32 << entry.0.min(6))
                                .min(RETRY_WAIT_MAX);
                            entry.1 = Instant::now() + wait;
                            tracing::warn!(%job, epoch, error = %e, retry_in_ms = wait.as_millis() as u64, "job coordinator stopped; the job resumes later");
                        }
                    }
                });
            }
        }
    }
}
