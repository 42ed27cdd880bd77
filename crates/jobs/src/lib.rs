//! Jobs (issue 15, `docs/design/mapreduce.md` §5–§7): MapReduce where the data is, where a
//! failure costs one task and results show while the job runs.
//!
//! - [`coordinator`]: drives one job from its record in `_jobs` to its end: pins every input
//!   shard at one log index, splits the shards into tasks, places attempts on replicas that
//!   hold the pin (followers first), retries a failed task alone on another replica, merges
//!   the first accepted output of each task, publishes partial results with their coverage,
//!   and writes the final result. Its every decision that must survive it goes through the
//!   `_jobs` shard's log (`capdb_types::jobs`), so another coordinator takes over where it
//!   stopped and the first success of a task counts, never two.
//! - [`worker`]: runs one task: pages of a pinned snapshot through the job's plan into a
//!   partial result.
//! - [`plan`]: how a pinned shard is split into tasks.
//!
//! # Why the cluster is a trait
//!
//! The coordinator sees the cluster only through [`Cluster`] (propose a job command, pin a
//! shard, run a task on a node), as the transaction coordinator sees shards through its
//! `Participants`: the node implements it over its Raft groups and transport, and
//! `tests/simulation.rs` over real storage engines with nodes that die. No Lua here yet, and
//! this crate must never be linked by storage (user code stays off the apply path).

pub mod coordinator;
pub mod lua;
pub mod plan;
pub mod throttle;
pub mod worker;

use std::future::Future;

use bytes::Bytes;
use capdb_types::jobs::{JobCommand, JobRecord, ShardPin, TaskRecord};
use capdb_types::{Error, Reply};
use serde::{Deserialize, Serialize};

/// An input shard and where its replicas are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplicas {
    /// The shard's Raft group.
    pub shard: u64,
    /// Nodes holding a replica (voters).
    pub replicas: Vec<u64>,
    /// The leader, when known (tasks go to followers first, so the leader keeps serving).
    pub leader: Option<u64>,
}

/// What a worker is asked to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOrder {
    pub job: Bytes,
    pub task: u32,
    pub attempt: u16,
    /// The job's spec (canonical JSON).
    pub spec: String,
    pub shard: u64,
    pub pin_index: u64,
    pub from: Option<Bytes>,
    pub to: Option<Bytes>,
    /// Where to start: the newest checkpoint of an earlier attempt of this task at the same
    /// pin (`None`: from the range's start).
    pub resume: Option<worker::Checkpoint>,
    /// How often the attempt takes a checkpoint (ms; 0: never).
    pub checkpoint_every_ms: u64,
}

/// A task's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    pub keys: u64,
    /// `capdb_reduce::Partial`'s stored form.
    pub partial: Bytes,
}

/// Why a task attempt did not give an output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskError {
    /// The job's spec or data caused it (a limit, a sum out of range): the job fails at once
    /// with this message; running the task elsewhere would fail the same way.
    User(String),
    /// The attempt failed where it ran (no pin there, storage, corruption): another replica
    /// may succeed.
    Failed(String),
    /// No answer from its node (down, cut off, too slow): it may still be running.
    Unreachable(String),
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::User(m) | TaskError::Failed(m) | TaskError::Unreachable(m) => f.write_str(m),
        }
    }
}

/// The cluster as a coordinator uses it.
pub trait Cluster: Send + Sync + 'static {
    /// Applies `cmd` on the `_jobs` shard of its job, through its log: the answer (an error
    /// inside: refused, nothing changed). `Err`: not known to be applied (retry it: job
    /// commands are safe to repeat, or refused as such).
    fn job(
        &self,
        cmd: JobCommand,
    ) -> impl Future<Output = Result<Result<Reply, Error>, Error>> + Send;

    /// Job `id`'s record (one read of its `_jobs` shard; `None`: no such job).
    fn record(&self, id: &Bytes) -> impl Future<Output = Result<Option<JobRecord>, Error>> + Send;

    /// The task records of job `id`, in task order (from one read of its `_jobs` shard).
    fn tasks(&self, id: &Bytes) -> impl Future<Output = Result<Vec<TaskRecord>, Error>> + Send;

    /// Chunk `n` of the partial result of attempt `attempt` of task `task` of job `id`
    /// (`None`: not there).
    fn partial_chunk(
        &self,
        id: &Bytes,
        task: u32,
        attempt: u16,
        n: u32,
    ) -> impl Future<Output = Result<Option<Bytes>, Error>> + Send;

    /// The shards of `keyspace` (a `cp` keyspace) and their replicas.
    fn shards(
        &self,
        keyspace: &str,
    ) -> impl Future<Output = Result<Vec<ShardReplicas>, Error>> + Send;

    /// Pins `shard` for `owner` through its log (`Request::JobPin`), judging expiry at
    /// `now_ms`: where.
    fn pin(
        &self,
        shard: u64,
        owner: Bytes,
        now_ms: u64,
    ) -> impl Future<Output = Result<ShardPin, Error>> + Send;

    /// Renews the lease of that pin on `node`'s replica: whether it holds it.
    fn renew_pin(
        &self,
        node: u64,
        shard: u64,
        owner: Bytes,
        index: u64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// The `n`-th string key (from 0) of `shard` as its pin of `owner` at `index` holds it,
    /// read on one of its replicas (`None`: it has fewer keys, or no replica answered).
    fn key_at(
        &self,
        shard: &ShardReplicas,
        owner: Bytes,
        index: u64,
        n: u64,
    ) -> impl Future<Output = Option<Bytes>> + Send;

    /// Releases that pin on every replica (`Request::JobUnpin`).
    fn unpin(
        &self,
        shard: u64,
        owner: Bytes,
        index: u64,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Runs a task attempt on `node` and waits for its output.
    fn run_task(
        &self,
        node: u64,
        order: TaskOrder,
    ) -> impl Future<Output = Result<TaskOutput, TaskError>> + Send;

    /// The newest checkpoint of attempt `key` on `node`, if it has read past `newer_than`
    /// keys (`Err`: no answer).
    fn checkpoint(
        &self,
        node: u64,
        key: worker::AttemptKey,
        newer_than: u64,
    ) -> impl Future<Output = Result<Option<worker::Checkpoint>, Error>> + Send;

    /// A heartbeat: what `node` says of attempt `key` (`Err`: no answer).
    fn probe(
        &self,
        node: u64,
        key: worker::AttemptKey,
    ) -> impl Future<Output = Result<worker::Probe, Error>> + Send;

    /// Asks `node` to stop attempt `key` (best effort: an attempt not stopped ends on its own
    /// and its output is refused as superseded, or is dropped unread).
    fn cancel(&self, node: u64, key: worker::AttemptKey) -> impl Future<Output = ()> + Send;

    /// Unix ms (the node's clock).
    fn now_ms(&self) -> u64;
}
