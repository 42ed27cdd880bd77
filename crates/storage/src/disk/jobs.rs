//! Jobs' replicated state (issue 15, `docs/design/mapreduce.md` §4): each job's record, its
//! tasks, its stream and its result, kept in the element table of the `_jobs` shard its id
//! hashes to, under the reserved id 0, and changed only by that shard's log
//! (`Request::Job`, applied alone: [`apply`]). The rules that make a job end the same however
//! its coordinators and workers die are here, in log order: epoch fencing, the first
//! success of a task wins, bounded everything. Types and bounds: `capdb_types::jobs`.
//!
//! # Rows
//!
//! - `0‖job/‖len‖id` -> [`JobRecord`] (postcard)
//! - `0‖job-task/‖len‖id‖task u32` -> [`TaskRecord`]
//! - `0‖job-log/‖len‖id‖ms u64‖seq u64` (big-endian) -> the entry's fields (postcard
//!   `Vec<(Bytes, Bytes)>`): the job's stream, IDs given at apply, rising
//! - `0‖job-res/‖len‖id‖chunk u32` -> a chunk of the final result
//! - `0‖job-part/‖len‖id‖task u32‖attempt u16‖chunk u32` -> a chunk of an attempt's partial
//!   result (`PartialChunk`): kept while the attempt runs and once its output is the task's;
//!   removed when the attempt fails, is lost or is superseded
//! - `0‖job-active` -> u64 LE: jobs that have not ended ([`ACTIVE_JOBS_MAX`])
//! - `0‖job-act/‖len‖id` -> empty: one per job that has not ended (what coordinators look
//!   for, without reading every retained job)
//! - `0‖job-end/‖ended ms u64‖id` -> empty: one per ended job not yet forgotten, oldest first
//!   (what the retention forgets)
//!
//! The rows are replicated state: snapshots carry the element table (FLUSHDB is refused on
//! `_jobs` by the server).
//!
//! # Refusals (code first, as Redis errors)
//!
//! `NOJOB` (no such job), `STALE` (a deposed coordinator), `ENDED` (the job has ended),
//! `TASKDONE` (an attempt of a task already done), `JOBSFULL` (16 jobs not ended on this
//! shard), `LIMIT` (a partial result past its bound: the job's own limit), `ERR` otherwise.

use bytes::Bytes;
use capdb_types::changes::StreamId;
use capdb_types::jobs::{
    ACTIVE_JOBS_MAX, ATTEMPTS_MAX, Attempt, AttemptEnd, AttemptOutcome, FIELD_OVERHEAD,
    FORGET_ROWS_MAX, JOB_PARTIALS_BYTES_MAX, JOB_STREAM_BYTES_MAX, JOB_STREAM_ENTRY_MAX,
    JOB_STREAM_FIELDS_MAX, JOB_STREAM_MAX, JOB_STREAM_RESERVE, JobCommand, JobOutcome, JobRecord,
    JobState, MESSAGE_BYTES_MAX, PARTIAL_CHUNK_MAX, PARTIAL_CHUNKS_MAX, PARTIAL_INLINE_MAX,
    RESULT_CHUNK_MAX, RESULT_CHUNKS_MAX, SPEC_BYTES_MAX, TASKS_MAX, TaskRecord, TaskState,
    id_is_valid,
};
use capdb_types::{Error, Reply, Result};
use redb::ReadableTable;

use super::{io_err, table_def};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// The internal read command that reads jobs' rows (`DiskTable::read_query`): `record id`,
/// `tasks id from count`, `stream id after-ms after-seq count`, `result id chunk`,
/// `partial id task attempt chunk`, `list after count`, `active` (the ids of the jobs that have not ended), `ended before-ms
/// count` (jobs that ended before then, oldest first).
pub const JOBS_QUERY: &str = "capdb.jobs";
/// Most task records one `tasks` query answers, and most bytes of them (after one).
pub const TASKS_PAGE_MAX: usize = 1_024;
pub const QUERY_BYTES_MAX: usize = 16 << 20;
/// Most stream entries one `stream` query answers; most ids one `list` query answers.
pub const STREAM_PAGE_MAX: usize = 1_000;
pub const LIST_PAGE_MAX: usize = 1_000;

const RESERVED: [u8; 8] = [0; 8];
const JOB: &[u8] = b"job/";
const TASK: &[u8] = b"job-task/";
const LOG: &[u8] = b"job-log/";
const RES: &[u8] = b"job-res/";
const PART: &[u8] = b"job-part/";
const ACTIVE: &[u8] = b"job-active";
const ACTIVE_ROWS: &[u8] = b"job-act/";
const ENDED_ROWS: &[u8] = b"job-end/";

fn ended_key(ended_ms: u64, id: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(ENDED_ROWS);
    k.extend_from_slice(&ended_ms.to_be_bytes());
    k.extend_from_slice(id);
    k
}

fn named(kind: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(kind);
    k.extend_from_slice(&(id.len() as u32).to_be_bytes());
    k.extend_from_slice(id);
    k
}

fn numbered(prefix: &[u8], n: &[u64]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for x in n {
        k.extend_from_slice(&x.to_be_bytes());
    }
    k
}

fn task_key(id: &[u8], task: u32) -> Vec<u8> {
    let mut k = named(TASK, id);
    k.extend_from_slice(&task.to_be_bytes());
    k
}

fn chunk_key(id: &[u8], n: u32) -> Vec<u8> {
    let mut k = named(RES, id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn part_key(id: &[u8], task: u32, attempt: u16, n: u32) -> Vec<u8> {
    let mut k = named(PART, id);
    k.extend_from_slice(&task.to_be_bytes());
    k.extend_from_slice(&attempt.to_be_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Removes the rows under `prefix`, at most `most` of them: the bytes their values held, and
/// whether rows remain.
fn remove_prefixed(el: &mut RawTable<'_>, prefix: &[u8], most: usize) -> Result<(u64, bool)> {
    let mut keys = Vec::new();
    let mut more = false;
    for r in el.range(prefix..).map_err(io_err)? {
        let (k, _) = r.map_err(io_err)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        if keys.len() == most {
            more = true;
            break;
        }
        keys.push(k.value().to_vec());
    }
    let mut freed = 0;
    for k in keys {
        if let Some(old) = el.remove(&k[..]).map_err(io_err)? {
            freed += old.value().len() as u64;
        }
    }
    Ok((freed, more))
}

/// Removes the partial chunks of one attempt, wherever they are (they land in any order):
/// the bytes they held.
fn remove_parts(el: &mut RawTable<'_>, id: &[u8], task: u32, attempt: u16) -> Result<u64> {
    let mut prefix = named(PART, id);
    prefix.extend_from_slice(&task.to_be_bytes());
    prefix.extend_from_slice(&attempt.to_be_bytes());
    // At most PARTIAL_CHUNKS_MAX rows: a chunk's n is below it.
    Ok(remove_prefixed(el, &prefix, PARTIAL_CHUNKS_MAX as usize)?.0)
}

/// Attempt `attempt` of task `task` (of its `attempts`), which must have been started on
/// `node`: else the refusal's line.
fn attempt_on(
    attempts: &mut [Attempt],
    task: u32,
    attempt: u16,
    node: u64,
) -> std::result::Result<&mut Attempt, String> {
    let a = attempts
        .iter_mut()
        .find(|a| a.n == attempt)
        .ok_or_else(|| "ERR no such attempt".to_string())?;
    if a.node != node {
        return Err(format!(
            "ERR attempt {attempt} of task {task} was started on node {}, not {node}",
            a.node
        ));
    }
    Ok(a)
}

fn active_key() -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(ACTIVE);
    k
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(raw).map_err(|e| Error::Corruption(format!("{what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::Io(format!("a job row does not encode: {e}")))
}

fn refuse(line: impl Into<String>) -> Result<Result<Reply>> {
    Ok(Err(Error::Command(line.into())))
}

fn status(s: &str) -> Reply {
    Reply::Status(s.to_string())
}

fn get<T: serde::de::DeserializeOwned>(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    what: &str,
) -> Result<Option<T>> {
    match el.get(key).map_err(io_err)? {
        Some(raw) => decode(raw.value(), what).map(Some),
        None => Ok(None),
    }
}

fn put<T: serde::Serialize>(el: &mut RawTable<'_>, key: &[u8], v: &T) -> Result<()> {
    el.insert(key, &encode(v)?[..]).map_err(io_err)?;
    Ok(())
}

fn active(el: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<u64> {
    Ok(match el.get(&active_key()[..]).map_err(io_err)? {
        Some(raw) => u64::from_le_bytes(
            raw.value()
                .try_into()
                .map_err(|_| Error::Corruption("the active-jobs row".into()))?,
        ),
        None => 0,
    })
}

fn set_active(el: &mut RawTable<'_>, n: u64) -> Result<()> {
    el.insert(&active_key()[..], &n.to_le_bytes()[..])
        .map_err(io_err)?;
    Ok(())
}

/// Ends job `id` (`rec`) in `state` at `now_ms` (one fewer active job).
fn end(
    el: &mut RawTable<'_>,
    id: &[u8],
    rec: &mut JobRecord,
    state: JobState,
    now_ms: u64,
) -> Result<()> {
    debug_assert!(!rec.state.has_ended(), "a job ends once");
    // Its tasks' partial chunks are done with (the result, if any, is written): the shard
    // need not carry them, in snapshots too, until the job is forgotten. A bounded number
    // here; Forget removes any beyond.
    let (freed, _) = remove_prefixed(el, &named(PART, id), FORGET_ROWS_MAX)?;
    rec.partial_bytes = rec.partial_bytes.saturating_sub(freed);
    rec.state = state;
    rec.ended_ms = Some(now_ms);
    el.remove(&named(ACTIVE_ROWS, id)[..]).map_err(io_err)?;
    el.insert(&ended_key(now_ms, id)[..], &[][..])
        .map_err(io_err)?;
    let n = active(el)?;
    set_active(el, n.saturating_sub(1))
}

/// A text cut to [`MESSAGE_BYTES_MAX`] bytes (at a character boundary).
fn cut(text: &str) -> String {
    let mut end = text.len().min(MESSAGE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Bytes an entry counts for (its fields' names and values, and [`FIELD_OVERHEAD`] each).
fn entry_bytes(fields: &[(Bytes, Bytes)]) -> usize {
    fields
        .iter()
        .map(|(k, v)| k.len() + v.len() + FIELD_OVERHEAD)
        .sum()
}

/// Appends `fields` to the job's stream at `now_ms`: the entry's ID, rising across
/// coordinators (`max(now_ms, last ms)` and a sequence).
fn append_entry(
    el: &mut RawTable<'_>,
    id: &[u8],
    rec: &mut JobRecord,
    now_ms: u64,
    fields: &[(Bytes, Bytes)],
) -> Result<StreamId> {
    let at = if now_ms > rec.stream_last.ms {
        StreamId { ms: now_ms, seq: 0 }
    } else {
        StreamId {
            ms: rec.stream_last.ms,
            seq: rec.stream_last.seq + 1,
        }
    };
    let key = numbered(&named(LOG, id), &[at.ms, at.seq]);
    put(el, &key, &fields)?;
    rec.stream_last = at;
    rec.stream_entries += 1;
    rec.stream_bytes = rec.stream_bytes.saturating_add(entry_bytes(fields) as u64);
    Ok(at)
}

fn field(name: &str, value: impl Into<Bytes>) -> (Bytes, Bytes) {
    (Bytes::copy_from_slice(name.as_bytes()), value.into())
}

/// Applies one job command in the job of `x` (element table `el_table` of a `_jobs` shard):
/// its answer (an error inside: refused, nothing changed).
pub(super) fn apply(
    x: &super::ops::Exec,
    el_table: &str,
    cmd: &JobCommand,
) -> Result<Result<Reply>> {
    let id = cmd.id();
    if !id_is_valid(id) {
        return refuse("ERR a job id is 1 to 64 of A-Z a-z 0-9 _ -");
    }
    let mut el: RawTable<'_> = x.txn.open_table(table_def(el_table)).map_err(io_err)?;
    let jkey = named(JOB, id);
    let rec: Option<JobRecord> = get(&el, &jkey, "a job record")?;
    let Some(mut rec) = rec else {
        return match cmd {
            JobCommand::Submit { spec, now_ms, .. } => {
                if spec.len() > SPEC_BYTES_MAX {
                    return refuse(format!(
                        "ERR a job's spec is at most {SPEC_BYTES_MAX} bytes"
                    ));
                }
                let n = active(&el)?;
                if n >= ACTIVE_JOBS_MAX {
                    return refuse(format!(
                        "JOBSFULL {ACTIVE_JOBS_MAX} jobs are running on this shard of _jobs: wait for one to end, or cancel one"
                    ));
                }
                let mut rec = JobRecord {
                    spec: spec.clone(),
                    submitted_ms: *now_ms,
                    epoch: 0,
                    state: JobState::Queued,
                    pins: Vec::new(),
                    tasks_total: 0,
                    tasks_done: 0,
                    keys_scanned: 0,
                    ended_ms: None,
                    stream_last: StreamId::MIN,
                    stream_entries: 0,
                    result_chunks: 0,
                    planned_epoch: 0,
                    stream_bytes: 0,
                    partial_bytes: 0,
                };
                append_entry(
                    &mut el,
                    id,
                    &mut rec,
                    *now_ms,
                    &[field("type", "submitted")],
                )?;
                put(&mut el, &jkey, &rec)?;
                el.insert(&named(ACTIVE_ROWS, id)[..], &[][..])
                    .map_err(io_err)?;
                set_active(&mut el, n + 1)?;
                Ok(Ok(Reply::Array(vec![
                    Reply::Bulk(id.clone()),
                    status("created"),
                ])))
            }
            // Forgetting what is not there is done.
            JobCommand::Forget { .. } => Ok(Ok(Reply::Integer(0))),
            _ => refuse("NOJOB no such job"),
        };
    };
    // Fencing: a coordinator claims the job at its epoch (a Raft term, so at least 1) and
    // then speaks at exactly that epoch: an older one changes nothing, and a command ahead of
    // its own claim is refused too.
    let fenced = match cmd {
        JobCommand::Plan { epoch, .. }
        | JobCommand::AttemptStart { epoch, .. }
        | JobCommand::Publish { epoch, .. }
        | JobCommand::ResultChunk { epoch, .. }
        | JobCommand::Finish { epoch, .. }
        | JobCommand::FinishPublishing { epoch, .. } => Some(*epoch),
        JobCommand::AttemptEnd { epoch, outcome, .. } if !outcome.is_done() => Some(*epoch),
        _ => None,
    };
    let claim_epoch = match cmd {
        JobCommand::Claim { epoch, .. } => Some(*epoch),
        _ => None,
    };
    if claim_epoch == Some(0) {
        return refuse("ERR a claim's epoch is at least 1");
    }
    if let Some(epoch) = fenced.or(claim_epoch)
        && epoch < rec.epoch
    {
        return refuse(format!(
            "STALE the job was claimed at epoch {} (this command's: {epoch})",
            rec.epoch
        ));
    }
    if let Some(epoch) = fenced
        && epoch > rec.epoch
    {
        return refuse(format!(
            "ERR claim the job first (it is claimed at epoch {}, this command's: {epoch})",
            rec.epoch
        ));
    }
    let changes_a_running_job = matches!(
        cmd,
        JobCommand::Plan { .. }
            | JobCommand::AttemptStart { .. }
            | JobCommand::ResultChunk { .. }
            | JobCommand::Finish { .. }
            | JobCommand::FinishPublishing { .. }
    );
    if changes_a_running_job && rec.state.has_ended() {
        return refuse(format!("ENDED the job has ended ({})", rec.state.name()));
    }
    match cmd {
        JobCommand::Submit { spec, .. } => {
            if *spec == rec.spec {
                Ok(Ok(Reply::Array(vec![
                    Reply::Bulk(id.clone()),
                    status("exists"),
                ])))
            } else {
                refuse("ERR a job with this id exists with another spec")
            }
        }
        JobCommand::Claim { epoch, .. } => {
            if *epoch > rec.epoch {
                rec.epoch = *epoch;
                put(&mut el, &jkey, &rec)?;
            }
            Ok(Ok(Reply::Bulk(Bytes::from(encode(&rec)?))))
        }
        JobCommand::Plan {
            pins, tasks, epoch, ..
        } => {
            if rec.state != JobState::Queued {
                return refuse(format!("ERR the job is already {}", rec.state.name()));
            }
            if tasks.is_empty() || tasks.len() > TASKS_MAX {
                return refuse(format!("ERR a job has 1 to {TASKS_MAX} tasks"));
            }
            for (n, plan) in tasks.iter().enumerate() {
                let task = TaskRecord {
                    plan: plan.clone(),
                    state: TaskState::Pending,
                    attempts: Vec::new(),
                };
                put(&mut el, &task_key(id, n as u32), &task)?;
            }
            rec.pins = pins.clone();
            rec.planned_epoch = *epoch;
            rec.tasks_total = tasks.len() as u32;
            rec.state = JobState::Running;
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        JobCommand::AttemptStart {
            task,
            attempt,
            node,
            speculative,
            now_ms,
            ..
        } => {
            let tkey = task_key(id, *task);
            let Some(mut t): Option<TaskRecord> = get(&el, &tkey, "a task record")? else {
                return refuse("ERR no such task");
            };
            if t.state.is_done() {
                return refuse("TASKDONE the task is done");
            }
            if t.attempts.len() >= ATTEMPTS_MAX {
                return refuse(format!(
                    "ERR the task has had {ATTEMPTS_MAX} attempts, its most"
                ));
            }
            if let Some(a) = t.attempts.iter().find(|a| a.n == *attempt) {
                // A retried start (its answer was lost) is answered as the first was.
                return if a.node == *node {
                    Ok(Ok(Reply::Ok))
                } else {
                    refuse("ERR this attempt was started already on another node")
                };
            }
            t.attempts.push(Attempt {
                n: *attempt,
                node: *node,
                started_ms: *now_ms,
                speculative: *speculative,
                end: AttemptEnd::Running,
            });
            t.state = TaskState::Running;
            put(&mut el, &tkey, &t)?;
            Ok(Ok(Reply::Ok))
        }
        JobCommand::AttemptEnd {
            task,
            attempt,
            node,
            outcome,
            ..
        } => {
            let tkey = task_key(id, *task);
            let Some(mut t): Option<TaskRecord> = get(&el, &tkey, "a task record")? else {
                return refuse("ERR no such task");
            };
            let done = t.state.is_done();
            let a = match attempt_on(&mut t.attempts, *task, *attempt, *node) {
                Ok(a) => a,
                Err(line) => return refuse(line),
            };
            if a.end != AttemptEnd::Running {
                // Reported already (a retried report): what it was recorded as.
                return Ok(Ok(status(match a.end {
                    AttemptEnd::Done => "accepted",
                    AttemptEnd::Superseded => "superseded",
                    _ => "recorded",
                })));
            }
            let answer = match outcome {
                AttemptOutcome::Done { keys, partial } => {
                    if done || rec.state.has_ended() {
                        a.end = AttemptEnd::Superseded;
                        "superseded"
                    } else if partial.len() > PARTIAL_INLINE_MAX
                        || rec.partial_bytes.saturating_add(partial.len() as u64)
                            > JOB_PARTIALS_BYTES_MAX
                    {
                        return refuse(format!(
                            "LIMIT a task's partial result is at most {PARTIAL_INLINE_MAX} bytes, and a job's together {JOB_PARTIALS_BYTES_MAX} (this one: {})",
                            partial.len()
                        ));
                    } else {
                        a.end = AttemptEnd::Done;
                        t.state = TaskState::Done {
                            attempt: *attempt,
                            keys: *keys,
                            partial: partial.clone(),
                        };
                        rec.tasks_done += 1;
                        rec.keys_scanned = rec.keys_scanned.saturating_add(*keys);
                        rec.partial_bytes = rec.partial_bytes.saturating_add(partial.len() as u64);
                        put(&mut el, &jkey, &rec)?;
                        "accepted"
                    }
                }
                AttemptOutcome::DoneInChunks {
                    keys,
                    chunks,
                    bytes,
                } => {
                    if done || rec.state.has_ended() {
                        a.end = AttemptEnd::Superseded;
                        "superseded"
                    } else {
                        // The chunks must be there, exactly `chunks` of them, `bytes` together.
                        let mut held = 0u64;
                        for n in 0..*chunks {
                            match el
                                .get(&part_key(id, *task, *attempt, n)[..])
                                .map_err(io_err)?
                            {
                                Some(c) => held += c.value().len() as u64,
                                None => {
                                    return refuse(format!(
                                        "ERR chunk {n} of the attempt's partial result is missing"
                                    ));
                                }
                            }
                        }
                        let extra = el
                            .get(&part_key(id, *task, *attempt, *chunks)[..])
                            .map_err(io_err)?
                            .is_some();
                        if held != *bytes || extra {
                            return refuse(format!(
                                "ERR the attempt's partial chunks hold {held} bytes{}, not {bytes} in {chunks}",
                                if extra { " and more chunks" } else { "" }
                            ));
                        }
                        a.end = AttemptEnd::Done;
                        t.state = TaskState::DoneInChunks {
                            attempt: *attempt,
                            keys: *keys,
                            chunks: *chunks,
                        };
                        rec.tasks_done += 1;
                        rec.keys_scanned = rec.keys_scanned.saturating_add(*keys);
                        // The chunks' bytes were counted as they were written.
                        put(&mut el, &jkey, &rec)?;
                        "accepted"
                    }
                }
                AttemptOutcome::Failed { error, user } => {
                    a.end = AttemptEnd::Failed {
                        error: cut(error),
                        user: *user,
                    };
                    "recorded"
                }
                AttemptOutcome::Lost { reason } => {
                    a.end = AttemptEnd::Lost {
                        reason: cut(reason),
                    };
                    "recorded"
                }
            };
            // An attempt whose output is not the task's leaves no chunks behind.
            if a.end != AttemptEnd::Done {
                let freed = remove_parts(&mut el, id, *task, *attempt)?;
                if freed > 0 {
                    rec.partial_bytes = rec.partial_bytes.saturating_sub(freed);
                    put(&mut el, &jkey, &rec)?;
                }
            }
            // No attempt runs any more and none succeeded: the task waits for another.
            if t.state == TaskState::Running
                && !t.attempts.iter().any(|a| a.end == AttemptEnd::Running)
            {
                t.state = TaskState::Pending;
            }
            put(&mut el, &tkey, &t)?;
            Ok(Ok(status(answer)))
        }
        JobCommand::Publish {
            now_ms, entries, ..
        } => {
            // Every entry is checked before any is written: a refusal changes nothing.
            for fields in entries {
                if fields.len() > JOB_STREAM_FIELDS_MAX
                    || entry_bytes(fields) > JOB_STREAM_ENTRY_MAX
                {
                    return refuse(format!(
                        "ERR a job stream entry is at most {JOB_STREAM_FIELDS_MAX} fields and {JOB_STREAM_ENTRY_MAX} bytes"
                    ));
                }
            }
            let mut ids = Vec::with_capacity(entries.len());
            for fields in entries {
                let kind = fields
                    .iter()
                    .find(|(k, _)| k.as_ref() == b"type")
                    .map(|(_, v)| v.clone());
                let closing = matches!(kind.as_deref(), Some(b"final" | b"error" | b"cancelled"));
                // Past the bounds only closing entries land (within a reserve); others are
                // dropped (answered nil), and the stream stays readable.
                let reserve = if closing { JOB_STREAM_RESERVE } else { 0 };
                let room = rec.stream_entries < JOB_STREAM_MAX + reserve
                    && rec.stream_bytes
                        < JOB_STREAM_BYTES_MAX + reserve * JOB_STREAM_ENTRY_MAX as u64;
                // An ended job's stream takes only closing entries (a cancelled job's
                // coordinator may still publish a partial before it hears).
                if !room || (rec.state.has_ended() && !closing) {
                    ids.push(Reply::Nil);
                    continue;
                }
                let at = append_entry(&mut el, id, &mut rec, *now_ms, fields)?;
                ids.push(Reply::Bulk(Bytes::from(at.to_string())));
            }
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Array(ids)))
        }
        JobCommand::ResultChunk { n, bytes, .. } => {
            if bytes.len() > RESULT_CHUNK_MAX || *n >= RESULT_CHUNKS_MAX {
                return refuse(format!(
                    "ERR a result is at most {RESULT_CHUNKS_MAX} chunks of {RESULT_CHUNK_MAX} bytes"
                ));
            }
            if rec.state != JobState::Running || rec.tasks_done < rec.tasks_total {
                return refuse("ERR a result is written once every task is done");
            }
            el.insert(&chunk_key(id, *n)[..], &bytes[..])
                .map_err(io_err)?;
            // Chunk 0 starts a (re)write, alone; the others may land in any order (a
            // coordinator has several in flight). A new coordinator's rewrite, which may have
            // fewer chunks, starts with chunk 0 again, so a stale chunk past it is not read.
            rec.result_chunks = if *n == 0 {
                1
            } else {
                rec.result_chunks.max(n + 1)
            };
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        JobCommand::Finish {
            now_ms, outcome, ..
        }
        | JobCommand::FinishPublishing {
            now_ms, outcome, ..
        } => {
            // A closing entry past the entry bounds keeps its first fields that fit: the job
            // ends whatever its entry (a refusal would leave it running).
            let closing = match cmd {
                JobCommand::FinishPublishing { closing, .. } => {
                    let mut kept = Vec::new();
                    for f in closing.iter().take(JOB_STREAM_FIELDS_MAX) {
                        kept.push(f.clone());
                        if entry_bytes(&kept) > JOB_STREAM_ENTRY_MAX {
                            kept.pop();
                            break;
                        }
                    }
                    Some(kept)
                }
                _ => None,
            };
            let state = match outcome {
                JobOutcome::Done => {
                    if rec.tasks_done < rec.tasks_total || rec.state != JobState::Running {
                        return refuse(format!(
                            "ERR {} of {} tasks are done: the job cannot be done",
                            rec.tasks_done, rec.tasks_total
                        ));
                    }
                    JobState::Done
                }
                JobOutcome::Failed { reason } => JobState::Failed {
                    reason: cut(reason),
                },
            };
            end(&mut el, id, &mut rec, state, *now_ms)?;
            // Once per job (an ended job refuses this): within the reserve kept for closing
            // entries ([`JOB_STREAM_RESERVE`]).
            if let Some(fields) = closing {
                append_entry(&mut el, id, &mut rec, *now_ms, &fields)?;
            }
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        JobCommand::Cancel { now_ms, .. } => {
            if rec.state.has_ended() {
                return Ok(Ok(Reply::Integer(0)));
            }
            end(&mut el, id, &mut rec, JobState::Cancelled, *now_ms)?;
            append_entry(
                &mut el,
                id,
                &mut rec,
                *now_ms,
                &[field("type", "cancelled")],
            )?;
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Integer(1)))
        }
        JobCommand::PartialChunk {
            task,
            attempt,
            node,
            n,
            bytes,
            ..
        } => {
            if bytes.len() > PARTIAL_CHUNK_MAX || *n >= PARTIAL_CHUNKS_MAX {
                return refuse(format!(
                    "LIMIT a task's partial result is at most {PARTIAL_CHUNKS_MAX} chunks of {PARTIAL_CHUNK_MAX} bytes"
                ));
            }
            if rec.state.has_ended() {
                return refuse(format!("ENDED the job has ended ({})", rec.state.name()));
            }
            let Some(mut t): Option<TaskRecord> = get(&el, &task_key(id, *task), "a task record")?
            else {
                return refuse("ERR no such task");
            };
            if t.state.is_done() {
                return refuse("TASKDONE the task is done");
            }
            let a = match attempt_on(&mut t.attempts, *task, *attempt, *node) {
                Ok(a) => a,
                Err(line) => return refuse(line),
            };
            if a.end != AttemptEnd::Running {
                return refuse("ERR the attempt has ended");
            }
            let key = part_key(id, *task, *attempt, *n);
            let replaced = el
                .get(&key[..])
                .map_err(io_err)?
                .map_or(0, |old| old.value().len() as u64);
            let held = rec.partial_bytes.saturating_sub(replaced);
            if held.saturating_add(bytes.len() as u64) > JOB_PARTIALS_BYTES_MAX {
                return refuse(format!(
                    "LIMIT a job's partial results are at most {JOB_PARTIALS_BYTES_MAX} bytes together"
                ));
            }
            el.insert(&key[..], &bytes[..]).map_err(io_err)?;
            rec.partial_bytes = held + bytes.len() as u64;
            put(&mut el, &jkey, &rec)?;
            Ok(Ok(Reply::Ok))
        }
        JobCommand::Forget { .. } => {
            if !rec.state.has_ended() {
                return refuse("ERR a job is forgotten only once it has ended");
            }
            let mut left = FORGET_ROWS_MAX;
            for kind in [LOG, TASK, RES, PART] {
                let prefix = named(kind, id);
                let keys: Vec<Vec<u8>> = {
                    let mut keys = Vec::new();
                    for r in el.range(&prefix[..]..).map_err(io_err)? {
                        let (k, _) = r.map_err(io_err)?;
                        if !k.value().starts_with(&prefix) || keys.len() >= left {
                            break;
                        }
                        keys.push(k.value().to_vec());
                    }
                    keys
                };
                for k in &keys {
                    el.remove(&k[..]).map_err(io_err)?;
                }
                left -= keys.len();
                if left == 0 {
                    // More rows remain: the record stays, so the next Forget finds them.
                    return Ok(Ok(Reply::Integer(1)));
                }
            }
            el.remove(&jkey[..]).map_err(io_err)?;
            if let Some(ended_ms) = rec.ended_ms {
                el.remove(&ended_key(ended_ms, id)[..]).map_err(io_err)?;
            }
            Ok(Ok(Reply::Integer(0)))
        }
    }
}

/// [`JOBS_QUERY`], from one snapshot of the element table.
pub(super) fn query(
    el: &impl ReadableTable<&'static [u8], &'static [u8]>,
    args: &[Bytes],
) -> Result<Reply> {
    let bad = || Error::InvalidInput("malformed jobs query".into());
    let num = |b: &Bytes| -> Result<u64> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)
    };
    let sub = args.get(1).ok_or_else(bad)?;
    match (&sub[..], args.get(2..).unwrap_or_default()) {
        (b"record", [id]) => Ok(match el.get(&named(JOB, id)[..]).map_err(io_err)? {
            Some(raw) => Reply::Bulk(Bytes::copy_from_slice(raw.value())),
            None => Reply::Nil,
        }),
        (b"partial", [id, task, attempt, n]) => {
            let task = u32::try_from(num(task)?).map_err(|_| bad())?;
            let attempt = u16::try_from(num(attempt)?).map_err(|_| bad())?;
            let n = u32::try_from(num(n)?).map_err(|_| bad())?;
            Ok(
                match el
                    .get(&part_key(id, task, attempt, n)[..])
                    .map_err(io_err)?
                {
                    Some(raw) => Reply::Bulk(Bytes::copy_from_slice(raw.value())),
                    None => Reply::Nil,
                },
            )
        }
        (b"tasks", [id, from, count]) => {
            let from = u32::try_from(num(from)?).map_err(|_| bad())?;
            let count = usize::try_from(num(count)?)
                .map_err(|_| bad())?
                .min(TASKS_PAGE_MAX);
            let prefix = named(TASK, id);
            let mut out = Vec::new();
            let mut bytes = 0;
            for r in el.range(&task_key(id, from)[..]..).map_err(io_err)? {
                let (k, v) = r.map_err(io_err)?;
                if !k.value().starts_with(&prefix)
                    || out.len() >= count
                    || (bytes >= QUERY_BYTES_MAX)
                {
                    break;
                }
                bytes += v.value().len();
                out.push(Reply::Bulk(Bytes::copy_from_slice(v.value())));
            }
            Ok(Reply::Array(out))
        }
        (b"stream", [id, ms, seq, count]) => {
            let after = StreamId {
                ms: num(ms)?,
                seq: num(seq)?,
            };
            let count = usize::try_from(num(count)?)
                .map_err(|_| bad())?
                .min(STREAM_PAGE_MAX);
            let prefix = named(LOG, id);
            let start = numbered(&prefix, &[after.ms, after.seq]);
            let mut out = Vec::new();
            let mut bytes = 0;
            for r in el.range(&start[..]..).map_err(io_err)? {
                let (k, v) = r.map_err(io_err)?;
                let key = k.value();
                if !key.starts_with(&prefix) || out.len() >= count || bytes >= QUERY_BYTES_MAX {
                    break;
                }
                bytes += v.value().len();
                let rest = &key[prefix.len()..];
                let word = |at: usize| -> Result<u64> {
                    Ok(u64::from_be_bytes(
                        rest.get(at..at + 8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| Error::Corruption("a job stream row key".into()))?,
                    ))
                };
                let at = StreamId {
                    ms: word(0)?,
                    seq: word(8)?,
                };
                if at <= after {
                    continue;
                }
                let fields: Vec<(Bytes, Bytes)> = decode(v.value(), "a job stream entry")?;
                let mut flat = Vec::with_capacity(fields.len() * 2);
                for (f, v) in fields {
                    flat.push(Reply::Bulk(f));
                    flat.push(Reply::Bulk(v));
                }
                out.push(Reply::Array(vec![
                    Reply::Bulk(Bytes::from(at.to_string())),
                    Reply::Array(flat),
                ]));
            }
            Ok(Reply::Array(out))
        }
        (b"result", [id, n]) => {
            let n = u32::try_from(num(n)?).map_err(|_| bad())?;
            Ok(match el.get(&chunk_key(id, n)[..]).map_err(io_err)? {
                Some(raw) => Reply::Bulk(Bytes::copy_from_slice(raw.value())),
                None => Reply::Nil,
            })
        }
        (b"active", []) => {
            // At most ACTIVE_JOBS_MAX rows.
            let prefix = {
                let mut p = RESERVED.to_vec();
                p.extend_from_slice(ACTIVE_ROWS);
                p
            };
            let mut out = Vec::new();
            for r in el.range(&prefix[..]..).map_err(io_err)? {
                let (k, _) = r.map_err(io_err)?;
                let key = k.value();
                if !key.starts_with(&prefix) || out.len() as u64 > ACTIVE_JOBS_MAX {
                    break;
                }
                if let Some(id) = key.get(prefix.len() + 4..) {
                    out.push(Reply::Bulk(Bytes::copy_from_slice(id)));
                }
            }
            Ok(Reply::Array(out))
        }
        (b"ended", [before_ms, count]) => {
            // The ended jobs ended before `before_ms`, oldest first.
            let before = num(before_ms)?;
            let count = usize::try_from(num(count)?)
                .map_err(|_| bad())?
                .min(LIST_PAGE_MAX);
            let prefix = {
                let mut p = RESERVED.to_vec();
                p.extend_from_slice(ENDED_ROWS);
                p
            };
            let mut out = Vec::new();
            for r in el.range(&prefix[..]..).map_err(io_err)? {
                let (k, _) = r.map_err(io_err)?;
                let key = k.value();
                let Some(rest) = key.strip_prefix(&prefix[..]) else {
                    break;
                };
                let ms = rest
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| Error::Corruption("an ended-job row key".into()))?;
                if ms >= before || out.len() >= count {
                    break;
                }
                out.push(Reply::Bulk(Bytes::copy_from_slice(&rest[8..])));
            }
            Ok(Reply::Array(out))
        }
        (b"list", [after, count]) => {
            let count = usize::try_from(num(count)?)
                .map_err(|_| bad())?
                .min(LIST_PAGE_MAX);
            let prefix = {
                let mut p = RESERVED.to_vec();
                p.extend_from_slice(JOB);
                p
            };
            let start = if after.is_empty() {
                prefix.clone()
            } else {
                let mut s = named(JOB, after);
                s.push(0);
                s
            };
            let mut out = Vec::new();
            for r in el.range(&start[..]..).map_err(io_err)? {
                let (k, _) = r.map_err(io_err)?;
                let key = k.value();
                if !key.starts_with(&prefix) || out.len() >= count {
                    break;
                }
                if let Some(id) = key.get(prefix.len() + 4..) {
                    out.push(Reply::Bulk(Bytes::copy_from_slice(id)));
                }
            }
            Ok(Reply::Array(out))
        }
        _ => Err(bad()),
    }
}
