//! `JOB`: MapReduce jobs over a keyspace (issue 15, `node/jobs.rs`).
//!
//! - `JOB SUBMIT <spec json>` → `[id, created|exists]`: the job is recorded in `_jobs` and
//!   runs on its own; a resubmission with the same id and spec answers `exists` (so a client
//!   that lost the answer can resubmit safely), another spec under that id is refused.
//! - `JOB STATUS <id>` → a map: state, tasks done and total, keys scanned, when, and the
//!   reason of a failure.
//! - `JOB RESULT <id>` → the result rows as one JSON array (bulk); `NOTREADY` until it is done.
//! - `JOB TASKS <id>` → per task: `[task, shard, state, [[attempt, node, outcome], ...]]`,
//!   the job's task log (which attempts ran where, and how each ended).
//! - `JOB CANCEL <id>` → 1 when it was running, 0 when it had ended.
//! - `JOB LIST` → every job id.
//! - `JOB LIBRARY LOAD [REPLACE] <code>` → the library's name: Lua code whose first line is
//!   `#!lua name=<library>` (as Redis's FUNCTION LOAD), checked and kept in `_jobs`; a spec
//!   names one of its functions as `"map": {"lua": "<library>.<function>"}`.
//!   `JOB LIBRARY DELETE <name>` → 1, or 0 when there was none. `JOB LIBRARY LIST` → per
//!   library: `[name, [function, ...], code]` (`node/job_library.rs`).

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::jobs::JobState;

use super::{Outcome, error_line, syntax};
use crate::resp::Connection;

fn bulk(s: impl Into<String>) -> Reply {
    Reply::Bulk(Bytes::from(s.into()))
}

fn nojob(id: &Bytes) -> String {
    format!("NOJOB no job '{}'", String::from_utf8_lossy(id))
}

pub(super) async fn job(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    let node = conn.node.clone();
    match (sub.as_slice(), args.len()) {
        (b"submit", 3) => {
            let (id, created) = node
                .job_submit(&args[2])
                .await
                .map_err(|e| error_line(&e))?;
            conn.out.reply(&Reply::Array(vec![
                Reply::Bulk(id),
                bulk(if created { "created" } else { "exists" }),
            ]));
        }
        (b"status", 3) => {
            let rec = node
                .job_record(&args[2])
                .await
                .map_err(|e| error_line(&e))?
                .ok_or_else(|| nojob(&args[2]))?;
            let int = |n: u64| Reply::Integer(i64::try_from(n).unwrap_or(i64::MAX));
            let mut fields = vec![
                (bulk("state"), bulk(rec.state.name())),
                (bulk("tasks_done"), int(u64::from(rec.tasks_done))),
                (bulk("tasks_total"), int(u64::from(rec.tasks_total))),
                (bulk("shards"), int(rec.pins.len() as u64)),
                (bulk("keys_scanned"), int(rec.keys_scanned)),
                (bulk("submitted_ms"), int(rec.submitted_ms)),
                (bulk("ended_ms"), rec.ended_ms.map_or(Reply::Nil, int)),
                (bulk("epoch"), int(rec.epoch)),
                (
                    bulk("coordinator"),
                    node.job_coordinator(&args[2]).map_or(Reply::Nil, int),
                ),
                (bulk("stream_last"), bulk(rec.stream_last.to_string())),
            ];
            if let JobState::Failed { reason } = &rec.state {
                fields.push((bulk("reason"), bulk(reason.clone())));
            }
            conn.out.reply(&Reply::Map(fields));
        }
        (b"result", 3) => {
            match node
                .job_result(&args[2])
                .await
                .map_err(|e| error_line(&e))?
            {
                None => return Err(nojob(&args[2])),
                Some(Err(JobState::Failed { reason })) => {
                    return Err(format!("ERR the job failed, it has no result: {reason}"));
                }
                Some(Err(JobState::Cancelled)) => {
                    return Err("ERR the job was cancelled, it has no result".into());
                }
                Some(Err(state)) => {
                    return Err(format!(
                        "NOTREADY the job is {}: its result is read once it is done",
                        state.name()
                    ));
                }
                Some(Ok(rows)) => conn.out.reply(&Reply::Bulk(rows)),
            }
        }
        (b"tasks", 3) => {
            use capdb_types::jobs::{AttemptEnd, TaskState};
            let tasks = node
                .job_tasks(&args[2])
                .await
                .map_err(|e| error_line(&e))?
                .ok_or_else(|| nojob(&args[2]))?;
            let rows = tasks
                .iter()
                .enumerate()
                .map(|(n, t)| {
                    let state = match t.state {
                        TaskState::Pending => "pending",
                        TaskState::Running => "running",
                        TaskState::Done { .. } | TaskState::DoneInChunks { .. } => "done",
                    };
                    let attempts = t
                        .attempts
                        .iter()
                        .map(|a| {
                            let end = match &a.end {
                                AttemptEnd::Running => "running".to_string(),
                                AttemptEnd::Done => "done".to_string(),
                                AttemptEnd::Superseded => "superseded".to_string(),
                                AttemptEnd::Lost { reason } => format!("lost: {reason}"),
                                AttemptEnd::Failed { error, .. } => format!("failed: {error}"),
                            };
                            Reply::Array(vec![
                                Reply::Integer(i64::from(a.n)),
                                Reply::Integer(i64::try_from(a.node).unwrap_or(i64::MAX)),
                                bulk(end),
                            ])
                        })
                        .collect();
                    Reply::Array(vec![
                        Reply::Integer(n as i64),
                        Reply::Integer(i64::try_from(t.plan.shard).unwrap_or(i64::MAX)),
                        bulk(state),
                        Reply::Array(attempts),
                    ])
                })
                .collect();
            conn.out.reply(&Reply::Array(rows));
        }
        (b"cancel", 3) => match node
            .job_cancel(&args[2])
            .await
            .map_err(|e| error_line(&e))?
        {
            None => return Err(nojob(&args[2])),
            Some(was_running) => conn.out.reply(&Reply::Integer(i64::from(was_running))),
        },
        (b"list", 2) => {
            let ids = node.job_list().await.map_err(|e| error_line(&e))?;
            conn.out
                .reply(&Reply::Array(ids.into_iter().map(Reply::Bulk).collect()));
        }
        (b"library", n) if n >= 3 => {
            let verb = args[2].to_ascii_lowercase();
            match (verb.as_slice(), n) {
                (b"load", 4) => {
                    let name = node
                        .job_library_load(&args[3], false)
                        .await
                        .map_err(|e| error_line(&e))?;
                    conn.out.reply(&bulk(name));
                }
                (b"load", 5) if args[3].eq_ignore_ascii_case(b"replace") => {
                    let name = node
                        .job_library_load(&args[4], true)
                        .await
                        .map_err(|e| error_line(&e))?;
                    conn.out.reply(&bulk(name));
                }
                (b"delete", 4) => {
                    let had = node
                        .job_library_delete(&String::from_utf8_lossy(&args[3]))
                        .await
                        .map_err(|e| error_line(&e))?;
                    conn.out.reply(&Reply::Integer(i64::from(had)));
                }
                (b"list", 3) => {
                    let libs = node.job_libraries().await.map_err(|e| error_line(&e))?;
                    conn.out.reply(&Reply::Array(
                        libs.into_iter()
                            .map(|l| {
                                Reply::Array(vec![
                                    bulk(l.name),
                                    Reply::Array(l.functions.into_iter().map(bulk).collect()),
                                    Reply::Bulk(l.code),
                                ])
                            })
                            .collect(),
                    ));
                }
                _ => return Err(syntax()),
            }
        }
        (b"submit" | b"status" | b"result" | b"tasks" | b"cancel" | b"list" | b"library", _) => {
            return Err(format!(
                "ERR wrong number of arguments for 'job|{}' command",
                String::from_utf8_lossy(&sub)
            ));
        }
        _ => return Err(syntax()),
    }
    Ok(())
}
