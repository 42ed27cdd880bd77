//! Jobs' replicated state (issue 15, `docs/design/mapreduce.md` §4): the records of a job and
//! its tasks, and the commands that change them, applied in log order by the shard of the
//! `_jobs` keyspace that the job's id hashes to (`capdb_storage::disk` `jobs.rs`).
//!
//! # Why the decisions are made by the log
//!
//! A job must end the same whoever coordinates it and whoever dies: the first successful
//! output of a task counts and never a second (a retried or speculative attempt that also
//! succeeds is recorded as superseded), and a coordinator that lost its leadership can no
//! longer change the job (its commands carry its *epoch*, the Raft term it claimed the job in;
//! a command with an older epoch than the record's changes nothing). Both are decided by the
//! `_jobs` shard's state machine in log order, so every replica, and every later coordinator,
//! sees the same outcome.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::changes::StreamId;

/// Longest job id, in bytes (`[A-Za-z0-9_-]`).
pub const JOB_ID_MAX: usize = 64;
/// Jobs that have not ended, per `_jobs` shard: a submission past it is refused (`JOBSFULL`).
pub const ACTIVE_JOBS_MAX: u64 = 16;
/// Tasks of one job.
pub const TASKS_MAX: usize = 65_536;
/// Attempts recorded per task (running, failed, lost, superseded, done together).
pub const ATTEMPTS_MAX: usize = 8;
/// A task's partial result up to this size travels in its `AttemptEnd` and is kept in its
/// task record; a larger one is written first as chunks of at most [`PARTIAL_CHUNK_MAX`]
/// bytes (`PartialChunk`), at most [`PARTIAL_CHUNKS_MAX`] of them (a larger partial fails
/// the job with a limit error naming the bound), so that no log entry and no task record is
/// large (a task record is read with every other one of its job).
pub const PARTIAL_INLINE_MAX: usize = 1 << 20;
pub const PARTIAL_CHUNK_MAX: usize = 1 << 20;
pub const PARTIAL_CHUNKS_MAX: u32 = 128;
/// Entries of a job's stream (progress, partial results, task events); past it, `partial`
/// and `task` entries are refused (and dropped by the coordinator), `final` and `error`
/// entries still land (up to [`JOB_STREAM_RESERVE`] more).
pub const JOB_STREAM_MAX: u64 = 100_000;
pub const JOB_STREAM_RESERVE: u64 = 64;
/// Bytes of one stream entry (each field also counts [`FIELD_OVERHEAD`]), and fields of one.
pub const JOB_STREAM_ENTRY_MAX: usize = 256 * 1024;
pub const JOB_STREAM_FIELDS_MAX: usize = 64;
pub const FIELD_OVERHEAD: usize = 16;
/// Bytes of a job's whole stream (as [`JOB_STREAM_ENTRY_MAX`] counts them): past it, as past
/// [`JOB_STREAM_MAX`] entries, only closing entries land.
pub const JOB_STREAM_BYTES_MAX: u64 = 64 << 20;
/// Bytes of the partial results a job's tasks hold in `_jobs` together: the accepted ones
/// and the chunks of attempts not yet ended. A group-by over many groups needs about 30
/// bytes per group and task (10 M keys in 1 M groups: about 300 MB).
pub const JOB_PARTIALS_BYTES_MAX: u64 = 1 << 30;
/// Longest spec (canonical JSON) and longest error or reason text kept (longer is cut).
pub const SPEC_BYTES_MAX: usize = 64 * 1024;
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Bytes of one result chunk; a result has at most [`RESULT_CHUNKS_MAX`].
pub const RESULT_CHUNK_MAX: usize = 1 << 20;
pub const RESULT_CHUNKS_MAX: u32 = 256;
/// Rows one `Forget` deletes at most (it answers whether rows remain).
pub const FORGET_ROWS_MAX: usize = 4_096;
/// How long an ended job (its record, stream and result) is kept before its `_jobs` shard's
/// leader forgets it.
pub const JOB_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Submitted, not planned yet.
    Queued,
    /// Its shards are pinned and its tasks planned: they run.
    Running,
    Done,
    Failed {
        reason: String,
    },
    Cancelled,
}

impl JobState {
    pub fn has_ended(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed { .. } | JobState::Cancelled
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Where one input shard was pinned for the job (`Request::JobPin`'s answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPin {
    /// The shard's Raft group.
    pub shard: u64,
    pub index: u64,
    pub keys: u64,
    pub first_key: Option<Bytes>,
    pub last_key: Option<Bytes>,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The spec in canonical form (JSON text).
    pub spec: String,
    pub submitted_ms: u64,
    /// The epoch of the coordinator that last claimed it (0: none yet).
    pub epoch: u64,
    pub state: JobState,
    pub pins: Vec<ShardPin>,
    pub tasks_total: u32,
    pub tasks_done: u32,
    pub keys_scanned: u64,
    pub ended_ms: Option<u64>,
    /// The last ID of its stream, and how many entries it holds.
    pub stream_last: StreamId,
    pub stream_entries: u64,
    /// Result chunks written.
    pub result_chunks: u32,
    /// The epoch of the coordinator whose plan runs (its pins are owned by
    /// [`pin_owner`]`(id, planned_epoch)`).
    pub planned_epoch: u64,
    /// Bytes of its stream (as [`JOB_STREAM_ENTRY_MAX`] counts them) and of its tasks'
    /// accepted partial results.
    pub stream_bytes: u64,
    pub partial_bytes: u64,
}

/// The owner of a job's pins taken by the coordinator of `epoch`: a coordinator that lost a
/// race to plan releases its own pins without touching the winner's.
pub fn pin_owner(id: &[u8], epoch: u64) -> Bytes {
    let mut o = id.to_vec();
    o.push(b'@');
    o.extend_from_slice(epoch.to_string().as_bytes());
    Bytes::from(o)
}

/// What one task covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlan {
    pub shard: u64,
    /// Keys from `from` (inclusive) to `to` (exclusive); `None`: unbounded.
    pub from: Option<Bytes>,
    pub to: Option<Bytes>,
    pub pin_index: u64,
}

/// How an attempt ended (or that it runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptEnd {
    Running,
    /// It succeeded and its output is the task's.
    Done,
    /// It succeeded after another attempt already had: its output was dropped.
    Superseded,
    /// Its node died or stalled, or it was cancelled.
    Lost {
        reason: String,
    },
    /// It failed: `user` when the job's own code or data caused it (the job fails at once).
    Failed {
        error: String,
        user: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u16,
    pub node: u64,
    pub started_ms: u64,
    pub speculative: bool,
    pub end: AttemptEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Running,
    /// Done by this attempt; its partial result (`capdb_reduce::Partial`'s stored form).
    Done {
        attempt: u16,
        keys: u64,
        partial: Bytes,
    },
    /// Done by this attempt, whose partial result is the attempt's `chunks` chunks
    /// (`PartialChunk`), joined in order.
    DoneInChunks {
        attempt: u16,
        keys: u64,
        chunks: u32,
    },
}

impl TaskState {
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            TaskState::Done { .. } | TaskState::DoneInChunks { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub plan: TaskPlan,
    pub state: TaskState,
    pub attempts: Vec<Attempt>,
}

/// What an attempt reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    Done {
        keys: u64,
        partial: Bytes,
    },
    Failed {
        error: String,
        user: bool,
    },
    Lost {
        reason: String,
    },
    /// Done, its partial result written first as `chunks` chunks of `bytes` together.
    DoneInChunks {
        keys: u64,
        chunks: u32,
        bytes: u64,
    },
}

impl AttemptOutcome {
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            AttemptOutcome::Done { .. } | AttemptOutcome::DoneInChunks { .. }
        )
    }
}

/// How a job ends, as its coordinator says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    Done,
    Failed { reason: String },
}

/// A change to jobs' state, applied by the `_jobs` shard in log order. Append-only: new
/// variants go at the end (logs hold the old ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobCommand {
    /// A new job (answers `[id, "created"]`), or the same spec under an existing id (answers
    /// `[id, "exists"]`); another spec under an existing id is refused.
    Submit {
        id: Bytes,
        spec: String,
        now_ms: u64,
    },
    /// A coordinator takes the job over at `epoch` (its Raft term): answers the record; one
    /// with an older epoch than the record's is refused (`STALE`).
    Claim { id: Bytes, epoch: u64 },
    /// The pins and the tasks; the job runs.
    Plan {
        id: Bytes,
        epoch: u64,
        pins: Vec<ShardPin>,
        tasks: Vec<TaskPlan>,
    },
    AttemptStart {
        id: Bytes,
        epoch: u64,
        task: u32,
        attempt: u16,
        node: u64,
        speculative: bool,
        now_ms: u64,
    },
    /// A `Done` is not fenced by epoch: the first success wins, whoever reports it (`node`:
    /// where it ran, which must be where the attempt was started). A `Failed` or `Lost` is the
    /// coordinator's judgement, fenced. Answers `accepted` (this attempt's output is the
    /// task's), `superseded` (another's was), or `recorded`.
    AttemptEnd {
        id: Bytes,
        epoch: u64,
        task: u32,
        attempt: u16,
        node: u64,
        outcome: AttemptOutcome,
    },
    /// Entries for the job's stream (each its fields), IDs given at apply.
    Publish {
        id: Bytes,
        epoch: u64,
        now_ms: u64,
        entries: Vec<Vec<(Bytes, Bytes)>>,
    },
    /// Chunk `n` of the final result (JSON rows, `capdb_reduce` order).
    ResultChunk {
        id: Bytes,
        epoch: u64,
        n: u32,
        bytes: Bytes,
    },
    Finish {
        id: Bytes,
        epoch: u64,
        now_ms: u64,
        outcome: JobOutcome,
    },
    /// The user cancels it (not fenced).
    Cancel { id: Bytes, now_ms: u64 },
    /// Deletes an ended job's rows, at most [`FORGET_ROWS_MAX`] (answers whether more remain).
    Forget { id: Bytes },
    /// Chunk `n` of the partial result of a running attempt (started on `node`), before its
    /// `AttemptEnd` with `DoneInChunks`. Not fenced, as a `Done` is not; a repeated chunk
    /// replaces itself.
    PartialChunk {
        id: Bytes,
        task: u32,
        attempt: u16,
        node: u64,
        n: u32,
        bytes: Bytes,
    },
    /// `Finish`, and in the same entry `closing` (its `final` or `error` entry) appended to
    /// the job's stream: whoever reads the closing entry finds the job ended (`JOB RESULT`
    /// answers), and no job ends without it. An entry past the stream's entry bounds keeps
    /// its first fields that fit.
    FinishPublishing {
        id: Bytes,
        epoch: u64,
        now_ms: u64,
        outcome: JobOutcome,
        closing: Vec<(Bytes, Bytes)>,
    },
}

impl JobCommand {
    pub fn id(&self) -> &Bytes {
        match self {
            JobCommand::Submit { id, .. }
            | JobCommand::Claim { id, .. }
            | JobCommand::Plan { id, .. }
            | JobCommand::AttemptStart { id, .. }
            | JobCommand::AttemptEnd { id, .. }
            | JobCommand::Publish { id, .. }
            | JobCommand::ResultChunk { id, .. }
            | JobCommand::Finish { id, .. }
            | JobCommand::Cancel { id, .. }
            | JobCommand::Forget { id }
            | JobCommand::PartialChunk { id, .. }
            | JobCommand::FinishPublishing { id, .. } => id,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            JobCommand::Submit { .. } => "submit",
            JobCommand::Claim { .. } => "claim",
            JobCommand::Plan { .. } => "plan",
            JobCommand::AttemptStart { .. } => "attempt-start",
            JobCommand::AttemptEnd { .. } => "attempt-end",
            JobCommand::Publish { .. } => "publish",
            JobCommand::ResultChunk { .. } => "result-chunk",
            JobCommand::Finish { .. } => "finish",
            JobCommand::Cancel { .. } => "cancel",
            JobCommand::Forget { .. } => "forget",
            JobCommand::PartialChunk { .. } => "partial-chunk",
            JobCommand::FinishPublishing { .. } => "finish-publishing",
        }
    }
}

/// Whether `id` is a valid job id.
pub fn id_is_valid(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= JOB_ID_MAX
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}
