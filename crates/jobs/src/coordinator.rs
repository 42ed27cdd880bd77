//! Driving one job to its end (`docs/design/mapreduce.md` §5–§7).
//!
//! The coordinator is the node that leads the job's `_jobs` shard; its epoch is that shard's
//! Raft term. It keeps nothing it cannot rebuild: whatever must survive it is a job command
//! in the shard's log (claimed, planned, each attempt started and ended, each partial result
//! published), so the next coordinator [`run`]s the same job from the records: it merges the
//! outputs of the tasks already done and runs only the rest.
//!
//! # Failures cost one task
//!
//! An attempt that fails where it ran (no pin on that replica, a storage error) or whose node
//! does not answer is recorded and its task alone runs again on another replica, up to
//! [`Config::failed_attempts_max`] times; then the job fails naming the task and its last
//! error. An error of the job itself (its spec, its data, a limit) fails the job at once with
//! that error: running it elsewhere would fail the same way. The first accepted output of a
//! task is the one merged (decided by the log: `superseded` for any later one).
//!
//!
//! # Heartbeats and speculative copies
//!
//! A call that breaks (the node died, the connection was reset) is heard at once; a node that
//! stalls, is cut off or stops (SIGSTOP) answers nothing, so every [`Config::heartbeat_every`]
//! the coordinator asks each live attempt's node how it goes (`Cluster::probe`). An attempt
//! not heard of for [`Config::lost_after`] is recorded lost, asked to stop, and its task runs
//! again elsewhere. An attempt that reads nothing for [`Config::stuck_after`] (a hung disk, a
//! node starved of CPU) or, once three quarters of the tasks are done, runs past 1.5 times the
//! median accepted attempt, gets one speculative copy on another replica (at most a tenth of
//! the slots at once); whichever output is accepted first is the task's, and the other attempt
//! is cancelled and recorded lost. The log decides "first", so two never count.
//!
//! # Checkpoints
//!
//! A running attempt keeps a checkpoint every [`Config::checkpoint_every`] (the worker's
//! `Checkpoint`: where its next page starts and the partial result so far, at most 1 MiB);
//! heartbeats say how far the newest reaches, and the coordinator fetches it when it is newer
//! than the one it holds for the task. The task's next attempt (a retry after a loss or a
//! failure, a speculative copy) starts from it, so a node lost at 90 % of a long task costs the
//! last few seconds of reading, not the task; the job's stream shows each resumed attempt
//! (`type task`, `event resumed`). Checkpoints live in the coordinator's memory only (at most
//! [`CHECKPOINTS_BYTES_MAX`] per job); a new coordinator asks each attempt it finds running
//! (its predecessor's) for its newest before it stops it, and starts the task from there.
//!
//! # Pins are leases
//!
//! Each replica holds a pin for 10 minutes after it was taken or last renewed; the coordinator
//! renews every replica's pins every [`Config::pin_renew_every`] (at once when it takes over),
//! so a job runs as long as its `limits.max_s`, and the pins of a job nobody drives lapse.
//!
//! # Not yet (design §6, step 5)
//!
//! Adopting a dead coordinator's running attempts (they are recorded lost and run again from
//! their checkpoints), re-pinning a shard whose replicas all lost the pin (its tasks fail,
//! then the job), partials larger than 1 MiB held on the worker, output to a keyspace.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_reduce::spec::Destination;
use capdb_reduce::{JobSpec, Merged, Plan, Run};
use capdb_types::jobs::{
    ATTEMPTS_MAX, AttemptEnd, AttemptOutcome, JobCommand, JobOutcome, JobRecord, JobState,
    MESSAGE_BYTES_MAX, PARTIAL_CHUNK_MAX, PARTIAL_INLINE_MAX, RESULT_CHUNK_MAX, RESULT_CHUNKS_MAX,
    ShardPin, TaskRecord, TaskState, pin_owner,
};
use capdb_types::{Error, Reply};
use futures::StreamExt;
use futures::future::{AbortHandle, Abortable};
use futures::stream::FuturesUnordered;

use crate::worker::{Checkpoint, Probe};
use crate::{Cluster, ShardReplicas, TaskError, TaskOrder, TaskOutput};

/// A coordinator's bounds.
#[derive(Debug, Clone)]
pub struct Config {
    /// Attempts of one task a node runs at once.
    pub slots_per_node: usize,
    /// Failed or lost attempts of one task before the job fails.
    pub failed_attempts_max: usize,
    /// How often a partial result is published while tasks run (and at once after the first).
    pub publish_every: Duration,
    /// How long a job command is retried while the `_jobs` shard does not answer; then the
    /// coordinator gives up (the next one resumes the job).
    pub retry_for: Duration,
    /// Groups a partial result or the final entry shows (the whole result: `JOB RESULT`).
    pub groups_shown: usize,
    /// How often each running attempt's node is asked how it goes (a heartbeat).
    pub heartbeat_every: Duration,
    /// An attempt whose node answers no heartbeat for this long is lost: its task runs again
    /// elsewhere (the attempt is asked to stop, in case its node is only slow).
    pub lost_after: Duration,
    /// An attempt that reads nothing for this long while not throttled is stuck: its task
    /// gets a speculative copy on another replica.
    pub stuck_after: Duration,
    /// Whether stragglers get speculative copies.
    pub speculate: bool,
    /// How often a running attempt keeps a checkpoint its task's next attempt starts from
    /// (zero: never).
    pub checkpoint_every: Duration,
    /// How often the job's pins are renewed on every replica (each is held for its lease,
    /// 10 min, after its last renewal; zero: never, and a job longer than the lease fails).
    pub pin_renew_every: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            slots_per_node: 1,
            failed_attempts_max: 4,
            publish_every: Duration::from_secs(1),
            retry_for: Duration::from_secs(60),
            groups_shown: 1_000,
            heartbeat_every: Duration::from_secs(1),
            lost_after: Duration::from_secs(3),
            stuck_after: Duration::from_secs(10),
            speculate: true,
            checkpoint_every: Duration::from_secs(5),
            pin_renew_every: Duration::from_secs(60),
        }
    }
}

/// Bytes of checkpoints a coordinator holds per job (one per task with an attempt in flight or
/// waiting to run again, each at most `worker::CHECKPOINT_MAX`); past it, newer ones are not
/// fetched.
pub const CHECKPOINTS_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Bytes of groups a stream entry shows at most (its bound is 256 KiB).
const SHOWN_BYTES_MAX: usize = 200 * 1024;
/// Groups past which partial results show only their coverage (sorting them every second
/// would cost more than the job).
const PARTIAL_GROUPS_SORTED_MAX: usize = 100_000;

/// How a coordinator's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Done,
    Failed(String),
    Cancelled,
    /// Another coordinator claimed the job (a newer epoch): this one stopped.
    Deposed,
}

/// Why a command's answer stops the run.
enum Stop {
    Ended(Ended),
    /// The job has ended, and this run did not end it (a cancel; or its own `Finish` whose
    /// answer was lost): the record says how.
    EndedElsewhere,
    Error(Error),
}

/// The reason recorded for attempts a new coordinator finds running: not a failure of the
/// task (it does not count toward [`Config::failed_attempts_max`]).
const COORDINATOR_CHANGED: &str = "its coordinator changed";

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Error(e)
    }
}

/// Proposes `cmd`, retrying while the `_jobs` shard does not answer (bounded).
async fn propose<C: Cluster>(
    c: &C,
    cfg: &Config,
    cmd: JobCommand,
) -> Result<Result<Reply, Error>, Error> {
    let until = Instant::now() + cfg.retry_for;
    let mut backoff = Duration::from_millis(100);
    loop {
        match c.job(cmd.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(e) if Instant::now() < until => {
                tracing::debug!(error = %e, command = cmd.name(), "a job command is retried");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Proposes `cmd`; a refusal that ends the run (`STALE`, `ENDED`) becomes a [`Stop`].
async fn command<C: Cluster>(
    c: &C,
    cfg: &Config,
    cmd: JobCommand,
) -> Result<Result<Reply, String>, Stop> {
    match propose(c, cfg, cmd).await? {
        Ok(reply) => Ok(Ok(reply)),
        Err(Error::Command(line)) if line.starts_with("STALE") => Err(Stop::Ended(Ended::Deposed)),
        Err(Error::Command(line)) if line.starts_with("ENDED") => Err(Stop::EndedElsewhere),
        Err(Error::Command(line)) => Ok(Err(line)),
        Err(e) => Err(Stop::Error(e)),
    }
}

/// Runs CPU-heavy work (decoding, merging and ordering up to millions of groups) so that the
/// runtime's other tasks move to other worker threads meanwhile: the node keeps serving while
/// a coordinator merges.
fn heavy<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A task's output as this job's partial result (decoded once, checked against the plan).
fn decoded(plan: &Plan, bytes: &[u8]) -> Result<Run, capdb_reduce::JobError> {
    heavy(|| {
        let r = Run::decode(bytes)?;
        plan.check_run(&r)?;
        Ok(r)
    })
}

/// How long a coordinator waits for the key that ends a big shard's first task (past it, the
/// cut is interpolated).
const FIRST_CUT_WAIT: Duration = Duration::from_secs(5);

/// Chunk writes (a task's partial result, the final result) a coordinator has in flight.
const CHUNK_WRITES_IN_FLIGHT: usize = 8;

fn field(name: &str, value: impl Into<Bytes>) -> (Bytes, Bytes) {
    (Bytes::copy_from_slice(name.as_bytes()), value.into())
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn text(v: impl ToString) -> Bytes {
    Bytes::from(v.to_string())
}

/// Claims job `id` at `epoch`: its record.
async fn claim<C: Cluster>(c: &C, cfg: &Config, id: &Bytes, epoch: u64) -> Result<JobRecord, Stop> {
    match command(
        c,
        cfg,
        JobCommand::Claim {
            id: id.clone(),
            epoch,
        },
    )
    .await?
    {
        Ok(Reply::Bulk(raw)) => postcard::from_bytes(&raw)
            .map_err(|e| Stop::Error(Error::Corruption(format!("a job record: {e}")))),
        Ok(other) => Err(Stop::Error(Error::Io(format!(
            "a claim answered {other:?}"
        )))),
        Err(line) => Err(Stop::Error(Error::Command(line))),
    }
}

/// Runs job `id` as the coordinator of `epoch` until it ends or another coordinator takes it.
/// `Err`: the run stopped without an end (the `_jobs` shard did not answer for
/// [`Config::retry_for`], or storage failed); the job is intact and the next run resumes it.
pub async fn run<C: Cluster>(c: &C, id: Bytes, epoch: u64, cfg: &Config) -> Result<Ended, Error> {
    let cfg = &Config {
        slots_per_node: cfg.slots_per_node.max(1),
        failed_attempts_max: cfg.failed_attempts_max.max(1),
        publish_every: cfg.publish_every.max(Duration::from_millis(10)),
        heartbeat_every: cfg.heartbeat_every.max(Duration::from_millis(10)),
        lost_after: cfg.lost_after.max(cfg.heartbeat_every * 2),
        ..cfg.clone()
    };
    let mut job = Job {
        c,
        cfg,
        id: id.clone(),
        epoch,
        pins: Vec::new(),
        owner: Bytes::new(),
    };
    let outcome = match job.run().await {
        // Ended by someone else, or by this run with its answer lost: as the record says.
        Err(Stop::EndedElsewhere) => match claim(c, cfg, &id, epoch).await {
            Ok(rec) => match rec.state {
                JobState::Done => Ok(Ended::Done),
                JobState::Failed { reason } => Ok(Ended::Failed(reason)),
                JobState::Cancelled => Ok(Ended::Cancelled),
                JobState::Queued | JobState::Running => Err(Stop::Error(Error::Io(
                    "the job was said to have ended but has not".into(),
                ))),
            },
            Err(e) => Err(e),
        },
        other => other,
    };
    // Pins are released whatever happened to the job once it ended (a deposed coordinator
    // leaves them to the winner, whose own release frees them: the owner is shared).
    let ended = matches!(
        &outcome,
        Ok(Ended::Done | Ended::Failed(_) | Ended::Cancelled)
            | Err(Stop::Ended(
                Ended::Done | Ended::Failed(_) | Ended::Cancelled
            ))
    );
    if ended {
        job.unpin_all().await;
    }
    match outcome {
        Ok(e) | Err(Stop::Ended(e)) => Ok(e),
        Err(Stop::Error(e)) => Err(e),
        Err(Stop::EndedElsewhere) => Err(Error::Io("the job's end could not be read".into())),
    }
}

struct Job<'a, C: Cluster> {
    c: &'a C,
    cfg: &'a Config,
    id: Bytes,
    epoch: u64,
    pins: Vec<ShardPin>,
    owner: Bytes,
}

/// The running state of the tasks.
struct Tasks {
    records: Vec<TaskRecord>,
    merged: Merged,
    done: Vec<bool>,
    /// Failed or lost attempts per task, and the nodes they ran on.
    failures: Vec<usize>,
    tried: Vec<HashSet<u64>>,
    last_error: Vec<String>,
    /// The attempts this coordinator started and has not heard the end of, by (task, attempt).
    live: HashMap<(usize, u16), Live>,
    /// The newest checkpoint of each task not done (from any of its attempts: they read the
    /// same pinned snapshot), and their bytes.
    checkpoints: HashMap<usize, Checkpoint>,
    checkpoint_bytes: usize,
}

impl Tasks {
    /// Whether an attempt of task `n` is live.
    fn runs(&self, n: usize) -> bool {
        self.live.keys().any(|(m, _)| *m == n)
    }

    /// Task `n` is done: its output is merged.
    fn set_done(&mut self, n: usize) {
        self.done[n] = true;
        if let Some(c) = self.checkpoints.remove(&n) {
            self.checkpoint_bytes -= c.partial.len();
        }
    }

    /// Keeps `c` as task `n`'s checkpoint if it reaches further than the one held.
    fn keep_checkpoint(&mut self, n: usize, c: Checkpoint) {
        if self.done[n]
            || self
                .checkpoints
                .get(&n)
                .is_some_and(|h| h.keys_read >= c.keys_read)
        {
            return;
        }
        let held = self.checkpoints.get(&n).map_or(0, |h| h.partial.len());
        if self.checkpoint_bytes - held + c.partial.len() > CHECKPOINTS_BYTES_MAX {
            return;
        }
        self.checkpoint_bytes = self.checkpoint_bytes - held + c.partial.len();
        self.checkpoints.insert(n, c);
    }
}

/// An attempt this coordinator started and has not heard the end of.
struct Live {
    node: u64,
    speculative: bool,
    started: Instant,
    /// When its node last answered a heartbeat (or it started), and heartbeat rounds without
    /// an answer since.
    heard: Instant,
    missed: u32,
    /// Keys it had read, and milliseconds it had waited on its rate limit, at the last
    /// heartbeat.
    keys: u64,
    throttled_ms: u64,
    /// Keys before its newest checkpoint, at the last heartbeat.
    checkpoint_keys: u64,
    /// Whether it waited on its rate limit between the last two heartbeats (slow on purpose:
    /// a copy would be as slow).
    throttled: bool,
    /// When its keys last moved, or it last waited on its rate limit.
    moved: Instant,
    /// Stops waiting for its output.
    abort: AbortHandle,
}

/// A task attempt's call to its node: (task, attempt, node, output).
type TaskCall<'f> =
    futures::future::BoxFuture<'f, (usize, u16, u64, Result<TaskOutput, TaskError>)>;
/// The calls of the live attempts.
type Running<'f> = FuturesUnordered<Abortable<TaskCall<'f>>>;

/// What [`Job::start_pending`] fills: the tasks waiting to start, the attempts running, each
/// node's attempts, each task's next attempt number.
struct Slots<'s, 'f> {
    pending: &'s mut VecDeque<usize>,
    running: &'s mut Running<'f>,
    load: &'s mut HashMap<u64, usize>,
    next_attempt: &'s mut Vec<u16>,
}

fn unload(load: &mut HashMap<u64, usize>, node: u64) {
    if let Some(l) = load.get_mut(&node) {
        *l = l.saturating_sub(1);
    }
}

/// Every how many heartbeats the coordinator reads the job's record to hear of a cancel.
const ENDED_CHECK_BEATS: u32 = 3;
/// The shortest time an attempt runs before it can be called slow (a straggler).
const SLOW_AFTER_MIN: Duration = Duration::from_secs(2);

impl<'a, C: Cluster> Job<'a, C> {
    async fn finish_failed(&self, reason: String) -> Result<Ended, Stop> {
        tracing::warn!(job = %String::from_utf8_lossy(&self.id), %reason, "job failed");
        let now = self.c.now_ms();
        let closing = vec![
            field("type", "error"),
            field("message", text(cut(&reason, MESSAGE_BYTES_MAX))),
        ];
        match command(
            self.c,
            self.cfg,
            JobCommand::FinishPublishing {
                id: self.id.clone(),
                epoch: self.epoch,
                now_ms: now,
                outcome: JobOutcome::Failed {
                    reason: reason.clone(),
                },
                closing,
            },
        )
        .await?
        {
            Ok(_) => Ok(Ended::Failed(reason)),
            Err(line) => Err(Stop::Error(Error::Command(line))),
        }
    }

    async fn unpin_all(&self) {
        for p in &self.pins {
            if let Err(e) = self.c.unpin(p.shard, self.owner.clone(), p.index).await {
                tracing::debug!(shard = p.shard, error = %e, "a job's pin was not released (it expires)");
            }
        }
    }

    async fn run(&mut self) -> Result<Ended, Stop> {
        let mut rec = claim(self.c, self.cfg, &self.id, self.epoch).await?;
        // Known before anything can end the run, so that an ended job's pins are released.
        self.pins = rec.pins.clone();
        self.owner = pin_owner(&self.id, rec.planned_epoch);
        match &rec.state {
            JobState::Done => return Ok(Ended::Done),
            JobState::Failed { reason } => return Ok(Ended::Failed(reason.clone())),
            JobState::Cancelled => return Ok(Ended::Cancelled),
            JobState::Queued | JobState::Running => {}
        }
        let spec = match JobSpec::parse(rec.spec.as_bytes()) {
            Ok(s) => s,
            Err(e) => return self.finish_failed(format!("the job's spec: {e}")).await,
        };
        if spec.output.to != Destination::Result {
            return self
                .finish_failed(
                    "output to a keyspace is not available in this version: use \"to\": \"result\""
                        .into(),
                )
                .await;
        }
        let keyspace = spec.input.keyspace.clone();
        // `limits.max_s` holds from the submission, queued or running.
        let max_ms = spec.limits.max_s.saturating_mul(1_000);
        if self.c.now_ms().saturating_sub(rec.submitted_ms) > max_ms {
            let reason = format!(
                "limit: the job ran past limits.max_s ({} s)",
                spec.limits.max_s
            );
            return self.finish_failed(reason).await;
        }
        let plan = match Plan::new(spec) {
            Ok(p) => p,
            Err(e) => return self.finish_failed(e.to_string()).await,
        };
        if rec.state == JobState::Queued {
            if let Err(reason) = self.plan(&keyspace).await? {
                return self.finish_failed(reason).await;
            }
            rec = claim(self.c, self.cfg, &self.id, self.epoch).await?;
        }
        self.pins = rec.pins.clone();
        self.owner = pin_owner(&self.id, rec.planned_epoch);
        let replicas: HashMap<u64, ShardReplicas> = match self.c.shards(&keyspace).await {
            Ok(s) => s.into_iter().map(|s| (s.shard, s)).collect(),
            Err(e @ (Error::KeyspaceNotFound(_) | Error::InvalidInput(_))) => {
                return self.finish_failed(format!("the input keyspace: {e}")).await;
            }
            Err(e) => return Err(Stop::Error(e)),
        };
        let records = self.c.tasks(&self.id).await?;
        if records.len() != rec.tasks_total as usize {
            return Err(Stop::Error(Error::Io(format!(
                "read {} task records of {}",
                records.len(),
                rec.tasks_total
            ))));
        }
        // A keyspace dropped and created again under its name has other shards: the pins
        // and tasks are of data that is gone.
        if let Some(r) = records
            .iter()
            .find(|r| !replicas.contains_key(&r.plan.shard))
        {
            return self
                .finish_failed(format!(
                    "the input keyspace changed: shard {} is no longer one of its shards",
                    r.plan.shard
                ))
                .await;
        }
        let mut t = Tasks {
            merged: Merged::default(),
            done: vec![false; records.len()],
            failures: vec![0; records.len()],
            tried: vec![HashSet::new(); records.len()],
            last_error: vec![String::new(); records.len()],
            live: HashMap::new(),
            checkpoints: HashMap::new(),
            checkpoint_bytes: 0,
            records,
        };
        // What earlier coordinators left: outputs to merge, attempts nobody will hear of.
        for n in 0..t.records.len() {
            self.absorb(&plan, &mut t, n).await?;
        }
        self.run_tasks(&plan, &mut t, &replicas, rec.submitted_ms)
            .await?;
        self.finish(&plan, &mut t).await
    }

    /// Pins every shard of `keyspace` and records the tasks (the job runs from then on).
    /// `Ok(Err(reason))`: it cannot be planned (the job fails). Pins taken are released on
    /// every way out but the one where this plan is the job's.
    async fn plan(&mut self, keyspace: &str) -> Result<Result<(), String>, Stop> {
        let shards = match self.c.shards(keyspace).await {
            Ok(s) if s.is_empty() => {
                return Ok(Err(format!("keyspace '{keyspace}' has no shards")));
            }
            Ok(s) => s,
            Err(e @ (Error::KeyspaceNotFound(_) | Error::InvalidInput(_))) => {
                return Ok(Err(format!("the input keyspace: {e}")));
            }
            Err(e) => return Err(Stop::Error(e)),
        };
        let owner = pin_owner(&self.id, self.epoch);
        let now = self.c.now_ms();
        let mut pins: Vec<ShardPin> = Vec::with_capacity(shards.len());
        let outcome = self.pin_and_plan(&shards, &owner, now, &mut pins).await;
        let ours = match &outcome {
            Ok(Ok(())) => {
                // Planned: by this run (a retried Plan whose answer was lost is refused, so
                // the record decides), or by another coordinator.
                let rec = claim(self.c, self.cfg, &self.id, self.epoch).await;
                matches!(&rec, Ok(r) if r.state != JobState::Queued && r.planned_epoch == self.epoch)
            }
            _ => false,
        };
        if !ours {
            for p in &pins {
                if let Err(e) = self.c.unpin(p.shard, owner.clone(), p.index).await {
                    tracing::debug!(shard = p.shard, error = %e, "a pin was not released (it expires)");
                }
            }
        }
        outcome
    }

    async fn pin_and_plan(
        &self,
        shards: &[ShardReplicas],
        owner: &Bytes,
        now: u64,
        pins: &mut Vec<ShardPin>,
    ) -> Result<Result<(), String>, Stop> {
        for s in shards {
            let until = Instant::now() + self.cfg.retry_for;
            let pin = loop {
                match self.c.pin(s.shard, owner.clone(), now).await {
                    Ok(p) => break p,
                    Err(e) if Instant::now() < until => {
                        tracing::debug!(shard = s.shard, error = %e, "pinning a shard is retried");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(Stop::Error(e)),
                }
            };
            pins.push(pin);
        }
        // Each big shard's first task ends at its real key at that count (read from the pin on
        // a replica, all shards at once, bounded; without it, interpolated).
        let cuts = pins
            .iter()
            .filter(|p| p.keys > crate::plan::FIRST_TASK_KEYS)
            .map(|p| {
                let replicas = shards.iter().find(|s| s.shard == p.shard);
                let read = async move {
                    match replicas {
                        Some(r) => {
                            self.c
                                .key_at(r, owner.clone(), p.index, crate::plan::FIRST_TASK_KEYS)
                                .await
                        }
                        None => None,
                    }
                };
                async move {
                    let cut = tokio::time::timeout(FIRST_CUT_WAIT, read)
                        .await
                        .ok()
                        .flatten();
                    (p.shard, cut)
                }
            });
        let first_cuts: HashMap<u64, Bytes> = futures::future::join_all(cuts)
            .await
            .into_iter()
            .filter_map(|(shard, cut)| Some((shard, cut?)))
            .collect();
        let tasks = crate::plan::tasks_cut(pins, &first_cuts);
        let planned = command(
            self.c,
            self.cfg,
            JobCommand::Plan {
                id: self.id.clone(),
                epoch: self.epoch,
                pins: pins.clone(),
                tasks,
            },
        )
        .await?;
        match planned {
            Ok(_) => Ok(Ok(())),
            // Planned already (by this run, its answer lost, or by another): the record says.
            Err(line) if line.contains("already") => Ok(Ok(())),
            Err(line) => Ok(Err(line)),
        }
    }

    /// Takes in task `n`'s record: merges its output if done, records its running attempts
    /// as lost (their coordinator is gone; a late success of one is superseded), and counts
    /// its failures.
    async fn absorb(&self, plan: &Plan, t: &mut Tasks, n: usize) -> Result<(), Stop> {
        let rec = t.records[n].clone();
        // Counted from the record, which holds every attempt (this run's too).
        t.failures[n] = 0;
        t.tried[n].clear();
        for a in &rec.attempts {
            match &a.end {
                // Live here: its own end will be recorded by this coordinator.
                AttemptEnd::Running if t.live.contains_key(&(n, a.n)) => {}
                AttemptEnd::Running => {
                    command(
                        self.c,
                        self.cfg,
                        JobCommand::AttemptEnd {
                            id: self.id.clone(),
                            epoch: self.epoch,
                            task: n as u32,
                            attempt: a.n,
                            node: a.node,
                            outcome: AttemptOutcome::Lost {
                                reason: COORDINATOR_CHANGED.into(),
                            },
                        },
                    )
                    .await?
                    .ok();
                    // It may still run (its coordinator died, not its node): its newest
                    // checkpoint is where the task's next attempt starts, and it is no one's
                    // now, so its node is asked to stop it.
                    let key = (self.owner.clone(), n as u32, a.n);
                    if !self.cfg.checkpoint_every.is_zero() {
                        let held = t.checkpoints.get(&n).map_or(0, |c| c.keys_read);
                        let fetched = tokio::time::timeout(
                            self.cfg.heartbeat_every / 2,
                            self.c.checkpoint(a.node, key.clone(), held),
                        )
                        .await;
                        if let Ok(Ok(Some(c))) = fetched {
                            t.keep_checkpoint(n, c);
                        }
                    }
                    let _ = tokio::time::timeout(
                        self.cfg.heartbeat_every / 2,
                        self.c.cancel(a.node, key),
                    )
                    .await;
                }
                AttemptEnd::Failed { error, .. } => {
                    t.failures[n] += 1;
                    t.tried[n].insert(a.node);
                    t.last_error[n] = error.clone();
                }
                AttemptEnd::Lost { reason } if reason == COORDINATOR_CHANGED => {}
                AttemptEnd::Lost { reason } => {
                    t.failures[n] += 1;
                    t.tried[n].insert(a.node);
                    t.last_error[n] = reason.clone();
                }
                AttemptEnd::Done | AttemptEnd::Superseded => {}
            }
        }
        let partial = match &rec.state {
            _ if t.done[n] => None,
            TaskState::Done { partial, .. } => Some(partial.clone()),
            TaskState::DoneInChunks {
                attempt, chunks, ..
            } => Some(self.read_chunks(n, *attempt, *chunks).await?),
            TaskState::Pending | TaskState::Running => None,
        };
        if let Some(partial) = partial {
            // An accepted output that does not merge (the job's own group limit, or a
            // corrupt partial) would stop every coordinator the same way: the job fails.
            let merged =
                heavy(|| Run::decode(&partial).and_then(|r| plan.merge_run(&mut t.merged, r)));
            if let Err(e) = merged {
                return Err(Stop::Ended(
                    self.finish_failed(format!("task {n}: {e}")).await?,
                ));
            }
            t.set_done(n);
        }
        Ok(())
    }

    /// Reports attempt `attempt` of task `n` done with `out`: a partial result past
    /// [`PARTIAL_INLINE_MAX`] is written first in chunks (`PartialChunk`), then named by the
    /// `AttemptEnd`. The answer is the `AttemptEnd`'s; a chunk refused because the task is
    /// done or the attempt ended meanwhile answers `superseded`.
    async fn report_done(
        &self,
        n: usize,
        attempt: u16,
        node: u64,
        out: &TaskOutput,
    ) -> Result<Result<Reply, String>, Stop> {
        let outcome = if out.partial.len() <= PARTIAL_INLINE_MAX {
            AttemptOutcome::Done {
                keys: out.keys,
                partial: out.partial.clone(),
            }
        } else {
            let mut chunks = 0u32;
            // Several in flight, as the result's chunks are.
            let mut writes = futures::stream::iter(
                (0..out.partial.len())
                    .step_by(PARTIAL_CHUNK_MAX)
                    .enumerate()
                    .map(|(i, at)| {
                        let end = (at + PARTIAL_CHUNK_MAX).min(out.partial.len());
                        command(
                            self.c,
                            self.cfg,
                            JobCommand::PartialChunk {
                                id: self.id.clone(),
                                task: n as u32,
                                attempt,
                                node,
                                n: i as u32,
                                bytes: out.partial.slice(at..end),
                            },
                        )
                    }),
            )
            .buffer_unordered(CHUNK_WRITES_IN_FLIGHT);
            while let Some(written) = writes.next().await {
                match written? {
                    Ok(_) => chunks += 1,
                    Err(line)
                        if line.starts_with("TASKDONE")
                            || line.starts_with("ERR the attempt has ended") =>
                    {
                        return Ok(Ok(Reply::Status("superseded".into())));
                    }
                    Err(line) => return Ok(Err(line)),
                }
            }
            AttemptOutcome::DoneInChunks {
                keys: out.keys,
                chunks,
                bytes: out.partial.len() as u64,
            }
        };
        command(
            self.c,
            self.cfg,
            JobCommand::AttemptEnd {
                id: self.id.clone(),
                epoch: self.epoch,
                task: n as u32,
                attempt,
                node,
                outcome,
            },
        )
        .await
    }

    /// The partial result of task `n`'s accepted attempt, from its `chunks` chunks.
    async fn read_chunks(&self, n: usize, attempt: u16, chunks: u32) -> Result<Bytes, Stop> {
        let mut out = Vec::new();
        for i in 0..chunks {
            let chunk = self
                .c
                .partial_chunk(&self.id, n as u32, attempt, i)
                .await?
                .ok_or_else(|| {
                    Stop::Error(Error::Corruption(format!(
                        "chunk {i} of task {n}'s accepted partial result is missing"
                    )))
                })?;
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }

    /// Reads task `n`'s record again and takes it in.
    async fn reread(&self, plan: &Plan, t: &mut Tasks, n: usize) -> Result<(), Stop> {
        let records = self.c.tasks(&self.id).await?;
        let Some(rec) = records.get(n) else {
            return Err(Stop::Error(Error::Io(format!(
                "task {n}'s record was not read"
            ))));
        };
        t.records[n] = rec.clone();
        self.absorb(plan, t, n).await
    }

    /// The node to run task `n` on: a follower of its shard with a free slot and not one it
    /// failed on, the least busy first (ties: the lowest id); the leader only when every
    /// follower has failed it (so leaders keep serving); and when every replica has, any
    /// replica again. Never `exclude` (where a copy of it runs). `None`: wait for a slot.
    fn place(
        &self,
        t: &Tasks,
        n: usize,
        replicas: &HashMap<u64, ShardReplicas>,
        load: &HashMap<u64, usize>,
        exclude: Option<u64>,
    ) -> Option<u64> {
        let shard = replicas.get(&t.records[n].plan.shard)?;
        let busy = |node: &u64| load.get(node).copied().unwrap_or(0);
        let untried = |node: &&u64| !t.tried[n].contains(*node) && Some(**node) != exclude;
        let followers: Vec<u64> = shard
            .replicas
            .iter()
            .filter(|r| shard.leader != Some(**r))
            .filter(untried)
            .copied()
            .collect();
        let pool = if !followers.is_empty() {
            followers
        } else {
            let others: Vec<u64> = shard.replicas.iter().filter(untried).copied().collect();
            if others.is_empty() {
                shard.replicas.clone()
            } else {
                others
            }
        };
        pool.into_iter()
            .filter(|node| Some(*node) != exclude)
            .filter(|node| busy(node) < self.cfg.slots_per_node)
            .min_by_key(|node| (busy(node), *node))
    }

    async fn run_tasks(
        &self,
        plan: &Plan,
        t: &mut Tasks,
        replicas: &HashMap<u64, ShardReplicas>,
        submitted_ms: u64,
    ) -> Result<(), Stop> {
        let out = self.drive(plan, t, replicas, submitted_ms).await;
        // Whatever still runs is no one's now (the job ended, or this coordinator stops and
        // the next one starts over): its nodes are asked to stop it, and when the job ended
        // (cancelled, failed) its record says so rather than "running" forever.
        let live: Vec<((usize, u16), Live)> = t.live.drain().collect();
        let stops = live.iter().map(|((n, attempt), l)| {
            l.abort.abort();
            let key = (self.owner.clone(), *n as u32, *attempt);
            tokio::time::timeout(self.cfg.heartbeat_every, self.c.cancel(l.node, key))
        });
        futures::future::join_all(stops).await;
        // A deposed coordinator's records would be refused (the next one records them).
        let ended = matches!(
            out,
            Err(
                Stop::Ended(Ended::Done | Ended::Failed(_) | Ended::Cancelled)
                    | Stop::EndedElsewhere
            )
        );
        if ended && !live.is_empty() {
            let records = async {
                for ((n, attempt), l) in &live {
                    let reason = "the job ended".to_string();
                    if self
                        .end(*n, *attempt, l.node, AttemptOutcome::Lost { reason })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            };
            // Bounded: the records are for the task log only.
            let _ = tokio::time::timeout(self.cfg.lost_after, records).await;
        }
        out
    }

    /// Runs the tasks not done until every one is (`Ok`), or the job ends.
    async fn drive(
        &self,
        plan: &Plan,
        t: &mut Tasks,
        replicas: &HashMap<u64, ShardReplicas>,
        submitted_ms: u64,
    ) -> Result<(), Stop> {
        let mut pending: VecDeque<usize> = (0..t.records.len()).filter(|n| !t.done[*n]).collect();
        let mut running: Running<'_> = FuturesUnordered::new();
        let mut load: HashMap<u64, usize> = HashMap::new();
        let mut next_attempt: Vec<u16> = t
            .records
            .iter()
            .map(|r| r.attempts.iter().map(|a| a.n).max().unwrap_or(0) + 1)
            .collect();
        // How long the attempts whose outputs were accepted ran (what "slow" is measured
        // against).
        let mut took: Vec<Duration> = Vec::new();
        let nodes: HashSet<u64> = replicas
            .values()
            .flat_map(|s| s.replicas.iter().copied())
            .collect();
        let speculative_max = (nodes.len() * self.cfg.slots_per_node / 10).max(1);
        // Tasks done when a partial result was last published (`None`: not yet).
        let mut published_done: Option<usize> = None;
        let spec = self.claim_spec().await?;
        let mut tick = tokio::time::interval(self.cfg.publish_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats: u32 = 0;
        let mut beat = tokio::time::interval(self.cfg.heartbeat_every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: a coordinator taking over renews what its predecessor
        // may have left unrenewed for minutes.
        let renewing = !self.cfg.pin_renew_every.is_zero();
        let mut renew =
            tokio::time::interval(self.cfg.pin_renew_every.max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_ms = plan.spec().limits.max_s.saturating_mul(1_000);
        loop {
            // `limits.max_s`, from the submission: past it the job fails, whatever runs.
            if self.c.now_ms().saturating_sub(submitted_ms) > max_ms {
                return Err(Stop::Ended(
                    self.finish_failed(format!(
                        "limit: the job ran past limits.max_s ({} s)",
                        plan.spec().limits.max_s
                    ))
                    .await?,
                ));
            }
            let mut slots = Slots {
                pending: &mut pending,
                running: &mut running,
                load: &mut load,
                next_attempt: &mut next_attempt,
            };
            self.start_pending(plan, t, replicas, &spec, &mut slots)
                .await?;
            if running.is_empty() {
                if pending.is_empty() {
                    return Ok(());
                }
                // Nothing runs and nothing can start: no replica of this shard is known in
                // the map read at the start. The next coordinator reads it again (and fails
                // the job if the keyspace is gone).
                let n = pending[0];
                return Err(Stop::Error(Error::Unavailable(format!(
                    "task {n}: no node is known to hold a replica of shard {}",
                    t.records[n].plan.shard
                ))));
            }
            tokio::select! {
                // Calls first: a call just launched is sent when first polled, and a heartbeat
                // round must not find it unsent ("unknown" there).
                biased;
                Some(finished) = running.next() => {
                    // Aborted: given up on where it was aborted (lost, or superseded).
                    let Ok((n, attempt, node, result)) = finished else { continue };
                    let Some(live) = t.live.remove(&(n, attempt)) else { continue };
                    unload(&mut load, node);
                    // The slot is taken again before this output is decoded, recorded and
                    // merged (a second or more for a big one): the node's cores stay busy.
                    let mut slots = Slots {
                        pending: &mut pending,
                        running: &mut running,
                        load: &mut load,
                        next_attempt: &mut next_attempt,
                    };
                    self.start_pending(plan, t, replicas, &spec, &mut slots).await?;
                    // Decoded once: checked now, merged if accepted.
                    let result = result.map(|out| {
                        let p = decoded(plan, &out.partial);
                        (out, p)
                    });
                    match result {
                        // An output that does not read as this job's partial is the replica's
                        // fault, not the task's: it runs again elsewhere.
                        Ok((_, Err(_))) => {
                            let error = "its output did not decode".to_string();
                            self.end(n, attempt, node, AttemptOutcome::Failed { error: error.clone(), user: false }).await?;
                            self.count_failure(t, n, node, error).await?;
                            if !t.runs(n) {
                                pending.push_back(n);
                            }
                        }
                        Ok((out, Ok(p))) => {
                            let answer = self.report_done(n, attempt, node, &out).await?;
                            drop(out);
                            match answer {
                                Ok(Reply::Status(s)) if s == "accepted" && !t.done[n] => {
                                    if let Err(e) = heavy(|| plan.merge_run(&mut t.merged, p)) {
                                        return Err(Stop::Ended(self.finish_failed(e.to_string()).await?));
                                    }
                                    t.set_done(n);
                                    took.push(live.started.elapsed());
                                    self.supersede(t, &mut load, n, attempt).await?;
                                    if published_done.is_none() {
                                        self.publish_partial(plan, t).await?;
                                        published_done = Some(t.done.iter().filter(|d| **d).count());
                                    }
                                }
                                Ok(_) => {
                                    // Superseded or recorded: another attempt's output is the
                                    // task's, or none is yet (then it runs again).
                                    self.reread(plan, t, n).await?;
                                    if t.done[n] {
                                        self.supersede(t, &mut load, n, attempt).await?;
                                    } else if !t.runs(n) {
                                        pending.push_back(n);
                                    }
                                }
                                Err(line) => {
                                    // A partial the log refuses (over its bound): the job's own limit.
                                    return Err(Stop::Ended(self.finish_failed(format!("task {n}: {line}")).await?));
                                }
                            }
                        }
                        Err(TaskError::User(message)) => {
                            self.end(n, attempt, node, AttemptOutcome::Failed { error: message.clone(), user: true }).await?;
                            return Err(Stop::Ended(self.finish_failed(format!("task {n}: {message}")).await?));
                        }
                        Err(e) => {
                            let outcome = match &e {
                                TaskError::Unreachable(m) => AttemptOutcome::Lost { reason: m.clone() },
                                other => AttemptOutcome::Failed { error: other.to_string(), user: false },
                            };
                            self.end(n, attempt, node, outcome).await?;
                            tracing::info!(task = n, node, error = %e, "a task attempt failed; the task runs again");
                            self.count_failure(t, n, node, e.to_string()).await?;
                            if !t.runs(n) {
                                pending.push_back(n);
                            }
                        }
                    }
                }
                _ = beat.tick(), if !t.live.is_empty() => {
                    // A job cancelled meanwhile: its attempts are stopped now, not when they end.
                    beats += 1;
                    if beats.is_multiple_of(ENDED_CHECK_BEATS)
                        && let Ok(Ok(Some(rec))) =
                            tokio::time::timeout(self.cfg.heartbeat_every, self.c.record(&self.id)).await
                        && rec.state.has_ended()
                    {
                        return Err(Stop::EndedElsewhere);
                    }
                    let lost = self.heartbeat(t).await;
                    self.gather_checkpoints(t).await;
                    for (n, attempt, node) in lost {
                        let reason = format!(
                            "node {node} did not answer heartbeats for {} ms",
                            self.cfg.lost_after.as_millis()
                        );
                        tracing::info!(task = n, attempt, node, "a task attempt is lost (no heartbeat); the task runs again");
                        self.abandon(t, &mut load, n, attempt, reason.clone()).await?;
                        self.count_failure(t, n, node, reason).await?;
                        if !t.done[n] && !t.runs(n) {
                            pending.push_back(n);
                        }
                    }
                    // Stragglers: a speculative copy on another replica.
                    let mut speculating = t.live.values().filter(|l| l.speculative).count();
                    for (n, busy) in self.stragglers(t, &took) {
                        if speculating >= speculative_max {
                            break;
                        }
                        // A copy must leave the task an attempt to spare under the log's bound
                        // (a refused start would end nothing, but would waste the try).
                        if usize::from(next_attempt[n]) + 1 > ATTEMPTS_MAX {
                            continue;
                        }
                        let Some(node) = self.place(t, n, replicas, &load, Some(busy)) else {
                            continue;
                        };
                        let attempt = next_attempt[n];
                        next_attempt[n] += 1;
                        tracing::info!(task = n, attempt, node, slow_on = busy, "a straggler gets a speculative copy");
                        if let Some(order) = self.start(plan, t, n, attempt, node, true, &spec).await? {
                            self.launch(t, &mut running, &mut load, order, node, true);
                            speculating += 1;
                        }
                    }
                }
                _ = renew.tick(), if renewing => self.renew_pins(t, replicas).await,
                _ = tick.tick() => {
                    // Only when something changed since the last one.
                    let done = t.done.iter().filter(|d| **d).count();
                    if published_done.is_some_and(|p| p != done) {
                        self.publish_partial(plan, t).await?;
                        published_done = Some(done);
                    }
                }
            }
        }
    }

    /// Starts every pending task that has a node with a free slot; the others stay pending.
    async fn start_pending<'f>(
        &self,
        plan: &Plan,
        t: &mut Tasks,
        replicas: &HashMap<u64, ShardReplicas>,
        spec: &str,
        slots: &mut Slots<'_, 'f>,
    ) -> Result<(), Stop>
    where
        'a: 'f,
    {
        let mut waiting = VecDeque::new();
        while let Some(n) = slots.pending.pop_front() {
            if t.done[n] || t.runs(n) {
                continue;
            }
            let Some(node) = self.place(t, n, replicas, slots.load, None) else {
                waiting.push_back(n);
                continue;
            };
            let attempt = slots.next_attempt[n];
            slots.next_attempt[n] += 1;
            match self.start(plan, t, n, attempt, node, false, spec).await? {
                Some(order) => self.launch(t, slots.running, slots.load, order, node, false),
                None if !t.done[n] => waiting.push_back(n),
                None => {}
            }
        }
        *slots.pending = waiting;
        Ok(())
    }

    /// Records attempt `attempt` of task `n` as started on `node` and makes its order.
    /// `None`: not started, because the task was done meanwhile by an attempt this coordinator
    /// did not start (its output is merged now, and `t.done[n]` is set), or, for a
    /// speculative copy, because the log refused it.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        plan: &Plan,
        t: &mut Tasks,
        n: usize,
        attempt: u16,
        node: u64,
        speculative: bool,
        spec: &str,
    ) -> Result<Option<TaskOrder>, Stop> {
        let started = command(
            self.c,
            self.cfg,
            JobCommand::AttemptStart {
                id: self.id.clone(),
                epoch: self.epoch,
                task: n as u32,
                attempt,
                node,
                speculative,
                now_ms: self.c.now_ms(),
            },
        )
        .await?;
        match started {
            Ok(_) => {}
            Err(line) if line.starts_with("TASKDONE") => {
                self.reread(plan, t, n).await?;
                return Ok(None);
            }
            // A copy is an extra: refused, the task goes on with the attempt it has.
            Err(line) if speculative => {
                tracing::info!(task = n, %line, "a speculative copy was refused");
                return Ok(None);
            }
            Err(line) => {
                return Err(Stop::Ended(
                    self.finish_failed(format!("task {n} could not start: {line}"))
                        .await?,
                ));
            }
        }
        let p = &t.records[n].plan;
        let resume = t
            .checkpoints
            .get(&n)
            .filter(|c| c.pin_index == p.pin_index)
            .cloned();
        if let Some(c) = &resume {
            tracing::info!(
                task = n,
                attempt,
                node,
                keys = c.keys_read,
                "an attempt resumes from its task's checkpoint"
            );
            let entry = vec![
                field("type", "task"),
                field("event", "resumed"),
                field("task", text(n)),
                field("attempt", text(attempt)),
                field("node", text(node)),
                field("speculative", text(u8::from(speculative))),
                field("checkpoint_keys", text(c.keys_read)),
            ];
            self.publish(entry).await?;
        }
        Ok(Some(TaskOrder {
            job: self.owner.clone(),
            task: n as u32,
            attempt,
            spec: spec.to_string(),
            shard: p.shard,
            pin_index: p.pin_index,
            from: p.from.clone(),
            to: p.to.clone(),
            resume,
            checkpoint_every_ms: self.cfg.checkpoint_every.as_millis() as u64,
        }))
    }

    /// Sends a started attempt to its node; it is live until its output arrives or it is
    /// given up on.
    fn launch<'f>(
        &self,
        t: &mut Tasks,
        running: &mut Running<'f>,
        load: &mut HashMap<u64, usize>,
        order: TaskOrder,
        node: u64,
        speculative: bool,
    ) where
        'a: 'f,
    {
        let (n, attempt) = (order.task as usize, order.attempt);
        let (abort, registration) = AbortHandle::new_pair();
        let c: &'f C = self.c;
        let call: TaskCall<'f> =
            Box::pin(async move { (n, attempt, node, c.run_task(node, order).await) });
        running.push(Abortable::new(call, registration));
        let now = Instant::now();
        t.live.insert(
            (n, attempt),
            Live {
                node,
                speculative,
                started: now,
                heard: now,
                missed: 0,
                keys: 0,
                throttled_ms: 0,
                checkpoint_keys: 0,
                throttled: false,
                moved: now,
                abort,
            },
        );
        *load.entry(node).or_insert(0) += 1;
    }

    /// Asks every live attempt's node how it goes; answers the attempts lost (no answer for
    /// [`Config::lost_after`]) as (task, attempt, node).
    async fn heartbeat(&self, t: &mut Tasks) -> Vec<(usize, u16, u64)> {
        let asks = t.live.iter().map(|(&(n, attempt), l)| {
            let key = (self.owner.clone(), n as u32, attempt);
            // Half a period: a silent node must not hold up the outputs of the others.
            let ask = tokio::time::timeout(self.cfg.heartbeat_every / 2, self.c.probe(l.node, key));
            async move { ((n, attempt), ask.await) }
        });
        let answers = futures::future::join_all(asks).await;
        let now = Instant::now();
        let rounds = (self.cfg.lost_after.as_millis() / self.cfg.heartbeat_every.as_millis().max(1))
            .max(1) as u32;
        let mut lost = Vec::new();
        for (k, answer) in answers {
            let Some(l) = t.live.get_mut(&k) else {
                continue;
            };
            if matches!(answer, Ok(Ok(Probe::Running { .. } | Probe::Ended))) {
                l.missed = 0;
            } else {
                l.missed += 1;
            }
            match answer {
                Ok(Ok(Probe::Running {
                    keys,
                    throttled_ms,
                    checkpoint_keys,
                })) => {
                    l.heard = now;
                    l.checkpoint_keys = checkpoint_keys;
                    // Waiting on its own rate limit is slow on purpose, not stuck.
                    l.throttled = throttled_ms > l.throttled_ms;
                    if keys != l.keys || l.throttled {
                        l.moved = now;
                    }
                    (l.keys, l.throttled_ms) = (keys, throttled_ms);
                }
                // Its output is on its way.
                Ok(Ok(Probe::Ended)) => {
                    l.heard = now;
                    l.moved = now;
                }
                // Unknown (its node restarted, or the order has not arrived yet), or no
                // answer (down, cut off, stopped): not heard.
                Ok(Ok(Probe::Unknown)) | Ok(Err(_)) | Err(_) => {}
            }
            // Both: silent for the whole bound, and through enough rounds in a row that a
            // coordinator busy elsewhere between two rounds does not judge on one miss.
            if now.duration_since(l.heard) >= self.cfg.lost_after && l.missed >= rounds {
                lost.push((k.0, k.1, l.node));
            }
        }
        lost
    }

    /// Renews the lease of the pins of the shards with tasks not done, on every replica (at
    /// once, each bounded by a heartbeat period). A replica that no longer holds its pin (it
    /// restarted, or the lease lapsed while the job had no coordinator) answers no: tasks
    /// placed there fail and run on another replica.
    async fn renew_pins(&self, t: &Tasks, replicas: &HashMap<u64, ShardReplicas>) {
        let wanted: HashSet<u64> = t
            .records
            .iter()
            .zip(&t.done)
            .filter(|(_, done)| !**done)
            .map(|(r, _)| r.plan.shard)
            .collect();
        let asks = self
            .pins
            .iter()
            .filter(|p| wanted.contains(&p.shard))
            .flat_map(|p| {
                let nodes = replicas
                    .get(&p.shard)
                    .map(|s| s.replicas.clone())
                    .unwrap_or_default();
                nodes.into_iter().map(move |node| {
                    let renewal = tokio::time::timeout(
                        self.cfg.heartbeat_every,
                        self.c.renew_pin(node, p.shard, self.owner.clone(), p.index),
                    );
                    async move { (p.shard, node, renewal.await) }
                })
            });
        let mut held: HashMap<u64, usize> = HashMap::new();
        for (shard, node, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(Ok(true)) => *held.entry(shard).or_default() += 1,
                Ok(Ok(false)) => {
                    tracing::info!(shard, node, "a replica no longer holds the job's pin");
                }
                Ok(Err(e)) => tracing::debug!(shard, node, error = %e, "a pin's renewal failed"),
                Err(_) => tracing::debug!(shard, node, "a pin's renewal was not answered in time"),
            }
        }
        for shard in &wanted {
            if !held.contains_key(shard) {
                tracing::warn!(
                    shard,
                    "no replica answered that it still holds the job's pin of this shard"
                );
            }
        }
    }

    /// Fetches the checkpoints live attempts say they have past the one held for their task
    /// (all at once, each bounded by half a heartbeat; one that does not come is asked for at
    /// the next heartbeat).
    async fn gather_checkpoints(&self, t: &mut Tasks) {
        if self.cfg.checkpoint_every.is_zero() || t.checkpoint_bytes >= CHECKPOINTS_BYTES_MAX {
            return;
        }
        let held = |n: usize| t.checkpoints.get(&n).map_or(0, |c| c.keys_read);
        let asks = t
            .live
            .iter()
            .filter(|((n, _), l)| !t.done[*n] && l.checkpoint_keys > held(*n))
            .map(|(&(n, attempt), l)| {
                let key = (self.owner.clone(), n as u32, attempt);
                let ask = tokio::time::timeout(
                    self.cfg.heartbeat_every / 2,
                    self.c.checkpoint(l.node, key, held(n)),
                );
                async move { (n, ask.await) }
            });
        for (n, answer) in futures::future::join_all(asks).await {
            if let Ok(Ok(Some(c))) = answer {
                t.keep_checkpoint(n, c);
            }
        }
    }

    /// Live attempts that deserve a speculative copy, as (task, the node it is slow on): no
    /// progress for [`Config::stuck_after`] while not throttled; or, once three quarters of
    /// the tasks are done, running longer than 1.5 times the median accepted attempt (and at
    /// least 2 s) while not throttled (a rate limit slows a copy as much). One copy at a time
    /// per task: only a task's sole live attempt is copied.
    fn stragglers(&self, t: &Tasks, took: &[Duration]) -> Vec<(usize, u64)> {
        if !self.cfg.speculate {
            return Vec::new();
        }
        let now = Instant::now();
        let total = t.done.len();
        let done = t.done.iter().filter(|d| **d).count();
        let median = (done * 4 >= total * 3 && !took.is_empty()).then(|| {
            let mut sorted = took.to_vec();
            sorted.sort();
            sorted[sorted.len() / 2]
        });
        let slow_after = median.map(|m| (m * 3 / 2).max(SLOW_AFTER_MIN));
        let mut out: Vec<(usize, u64)> = t
            .live
            .iter()
            // The task's only live attempt (a copy too, once the original is gone).
            .filter(|((n, _), _)| !t.done[*n] && t.live.keys().filter(|(m, _)| m == n).count() == 1)
            .filter(|(_, l)| {
                now.duration_since(l.moved) >= self.cfg.stuck_after
                    || (!l.throttled
                        && slow_after.is_some_and(|s| now.duration_since(l.started) > s))
            })
            .map(|((n, _), l)| (*n, l.node))
            .collect();
        out.sort();
        out
    }

    /// Gives up on live attempt `attempt` of task `n`: stops waiting for it, records it lost
    /// with `reason`, and asks its node to stop it.
    async fn abandon(
        &self,
        t: &mut Tasks,
        load: &mut HashMap<u64, usize>,
        n: usize,
        attempt: u16,
        reason: String,
    ) -> Result<(), Stop> {
        let Some(l) = t.live.remove(&(n, attempt)) else {
            return Ok(());
        };
        l.abort.abort();
        unload(load, l.node);
        self.end(n, attempt, l.node, AttemptOutcome::Lost { reason })
            .await?;
        let key = (self.owner.clone(), n as u32, attempt);
        let _ =
            tokio::time::timeout(self.cfg.heartbeat_every / 2, self.c.cancel(l.node, key)).await;
        Ok(())
    }

    /// Task `n` is done by attempt `winner`: its other live attempts are given up on.
    async fn supersede(
        &self,
        t: &mut Tasks,
        load: &mut HashMap<u64, usize>,
        n: usize,
        winner: u16,
    ) -> Result<(), Stop> {
        let others: Vec<u16> = t
            .live
            .keys()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| *a)
            .collect();
        for attempt in others {
            let reason = format!("cancelled: attempt {winner} did the task first");
            self.abandon(t, load, n, attempt, reason).await?;
        }
        Ok(())
    }

    /// Records how attempt `attempt` of task `n` ended (refusals change nothing: ignored).
    async fn end(
        &self,
        n: usize,
        attempt: u16,
        node: u64,
        outcome: AttemptOutcome,
    ) -> Result<(), Stop> {
        command(
            self.c,
            self.cfg,
            JobCommand::AttemptEnd {
                id: self.id.clone(),
                epoch: self.epoch,
                task: n as u32,
                attempt,
                node,
                outcome,
            },
        )
        .await?
        .ok();
        Ok(())
    }

    /// Counts a failed or lost attempt of task `n` on `node`; past
    /// [`Config::failed_attempts_max`] the job fails.
    async fn count_failure(
        &self,
        t: &mut Tasks,
        n: usize,
        node: u64,
        error: String,
    ) -> Result<(), Stop> {
        t.failures[n] += 1;
        t.tried[n].insert(node);
        t.last_error[n] = error;
        if t.failures[n] >= self.cfg.failed_attempts_max {
            let reason = format!(
                "task {n} failed {} times; the last: {}",
                t.failures[n], t.last_error[n]
            );
            return Err(Stop::Ended(self.finish_failed(reason).await?));
        }
        Ok(())
    }

    /// The job's canonical spec, as recorded.
    async fn claim_spec(&self) -> Result<String, Stop> {
        Ok(claim(self.c, self.cfg, &self.id, self.epoch).await?.spec)
    }

    /// Coverage fields of an entry.
    fn coverage(&self, t: &Tasks) -> Vec<(Bytes, Bytes)> {
        let tasks_done = t.done.iter().filter(|d| **d).count();
        let mut shard_done: HashMap<u64, bool> = HashMap::new();
        for (r, d) in t.records.iter().zip(&t.done) {
            let e = shard_done.entry(r.plan.shard).or_insert(true);
            *e &= *d;
        }
        vec![
            field("tasks_done", text(tasks_done)),
            field("tasks_total", text(t.records.len())),
            field(
                "shards_done",
                text(shard_done.values().filter(|d| **d).count()),
            ),
            field("shards_total", text(shard_done.len())),
            field("keys_scanned", text(t.merged.keys)),
            field("keys_skipped", text(t.merged.skipped)),
            // Whether a running attempt waited on a scan-rate limit (its own or its node's,
            // which follows foreground latency) at the last heartbeat.
            field(
                "throttled",
                text(u8::from(t.live.values().any(|l| l.throttled))),
            ),
        ]
    }

    /// The first groups of `merged` in output order, as JSON that fits an entry.
    fn shown(&self, plan: &Plan, merged: &mut Merged) -> Result<serde_json::Value, String> {
        let total = heavy(|| plan.merged_groups(merged)).map_err(|e| e.to_string())?;
        if total > PARTIAL_GROUPS_SORTED_MAX {
            return Ok(serde_json::json!({"groups_total": total, "groups": [], "truncated": true}));
        }
        let rows = heavy(|| plan.merged_rows(merged)).map_err(|e| e.to_string())?;
        let mut shown = Vec::new();
        let mut bytes = 0;
        for r in rows.iter().take(self.cfg.groups_shown) {
            let len = r.to_string().len();
            if bytes + len > SHOWN_BYTES_MAX {
                break;
            }
            bytes += len;
            shown.push(r.clone());
        }
        let truncated = shown.len() < rows.len();
        Ok(serde_json::json!({"groups": shown, "groups_total": rows.len(), "truncated": truncated}))
    }

    async fn publish(&self, entry: Vec<(Bytes, Bytes)>) -> Result<(), Stop> {
        command(
            self.c,
            self.cfg,
            JobCommand::Publish {
                id: self.id.clone(),
                epoch: self.epoch,
                now_ms: self.c.now_ms(),
                entries: vec![entry],
            },
        )
        .await?
        .ok();
        Ok(())
    }

    /// Publishes the merged result so far, marked incomplete, with its coverage.
    async fn publish_partial(&self, plan: &Plan, t: &mut Tasks) -> Result<(), Stop> {
        let mut entry = vec![field("type", "partial"), field("complete", "0")];
        entry.extend(self.coverage(t));
        // A sum out of range so far may come back in range: nothing is shown then.
        if let Ok(result) = self.shown(plan, &mut t.merged) {
            entry.push(field("result", text(result)));
        }
        self.publish(entry).await
    }

    /// Writes the result, publishes the final entry and ends the job.
    async fn finish(&self, plan: &Plan, t: &mut Tasks) -> Result<Ended, Stop> {
        if let Some(n) = t.done.iter().position(|d| !d) {
            return Err(Stop::Error(Error::Io(format!(
                "the result would miss task {n}'s output"
            ))));
        }
        // Chunks of whole rows, each a JSON array of at most RESULT_CHUNK_MAX bytes.
        let chunks = heavy(|| {
            let rows = plan
                .merged_rows_text(&mut t.merged)
                .map_err(|e| e.to_string())?;
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            let mut chunk = b"[".to_vec();
            for row in rows {
                let row = row.into_bytes();
                if row.len() + 2 > RESULT_CHUNK_MAX {
                    return Err(format!("a result row is over {RESULT_CHUNK_MAX} bytes"));
                }
                if chunk.len() + row.len() + 2 > RESULT_CHUNK_MAX {
                    chunk.push(b']');
                    chunks.push(std::mem::replace(&mut chunk, b"[".to_vec()));
                }
                if chunk.len() > 1 {
                    chunk.push(b',');
                }
                chunk.extend_from_slice(&row);
            }
            chunk.push(b']');
            chunks.push(chunk);
            Ok(chunks)
        });
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => return self.finish_failed(e).await,
        };
        if chunks.len() > RESULT_CHUNKS_MAX as usize {
            return self
                .finish_failed(format!(
                    "the result is over {RESULT_CHUNKS_MAX} chunks of {RESULT_CHUNK_MAX} bytes: set output.limit"
                ))
                .await;
        }
        // Chunk 0 first and alone (it starts the write), then several in flight, so that their
        // log entries share fsyncs (the log applies them in any order: each names its place).
        let mut chunks = chunks.into_iter().enumerate();
        let first = chunks.next().map(|(n, bytes)| (n, Bytes::from(bytes)));
        if let Some((n, bytes)) = first
            && let Err(line) = command(
                self.c,
                self.cfg,
                JobCommand::ResultChunk {
                    id: self.id.clone(),
                    epoch: self.epoch,
                    n: n as u32,
                    bytes,
                },
            )
            .await?
        {
            return Err(Stop::Error(Error::Command(line)));
        }
        let mut writes = futures::stream::iter(chunks.map(|(n, bytes)| {
            command(
                self.c,
                self.cfg,
                JobCommand::ResultChunk {
                    id: self.id.clone(),
                    epoch: self.epoch,
                    n: n as u32,
                    bytes: Bytes::from(bytes),
                },
            )
        }))
        .buffer_unordered(CHUNK_WRITES_IN_FLIGHT);
        while let Some(written) = writes.next().await {
            if let Err(line) = written? {
                return Err(Stop::Error(Error::Command(line)));
            }
        }
        let mut entry = vec![field("type", "final"), field("complete", "1")];
        entry.extend(self.coverage(t));
        entry.push(field("rounded", text(t.merged.rounded)));
        if let Ok(result) = self.shown(plan, &mut t.merged) {
            entry.push(field("result", text(result)));
        }
        // The final entry lands with the job's end, in one entry (`FinishPublishing`).
        match command(
            self.c,
            self.cfg,
            JobCommand::FinishPublishing {
                id: self.id.clone(),
                epoch: self.epoch,
                now_ms: self.c.now_ms(),
                outcome: JobOutcome::Done,
                closing: entry,
            },
        )
        .await?
        {
            Ok(_) => Ok(Ended::Done),
            Err(line) => Err(Stop::Error(Error::Command(line))),
        }
    }
}
