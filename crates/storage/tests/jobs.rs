//! Jobs' replicated state (`disk/jobs.rs`): the rules a `_jobs` shard applies in log order so
//! that a job ends the same whoever coordinates it and whoever dies.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{ChangesStep, DiskEngine, JOBS_QUERY};
use capdb_types::jobs::{
    ACTIVE_JOBS_MAX, AttemptEnd, AttemptOutcome, JobCommand, JobOutcome, JobRecord, JobState,
    TaskPlan, TaskRecord, TaskState,
};
use capdb_types::{Error, Hlc, Reply};

const TABLE: &str = "shard/9";

struct Shard {
    e: DiskEngine,
    index: u64,
}

impl Shard {
    fn open(dir: &std::path::Path) -> Shard {
        Shard {
            e: DiskEngine::open(dir, Arc::new(Hlc::new()), 1 << 20).unwrap(),
            index: 0,
        }
    }

    /// Applies `cmd` as the next entry: its answer.
    async fn apply(&mut self, cmd: JobCommand) -> Result<Reply, Error> {
        self.index += 1;
        self.e
            .changes_config(TABLE, ChangesStep::Job(cmd), self.index, Vec::new(), None)
            .await
            .unwrap()
    }

    fn query(&self, args: &[&str]) -> Reply {
        let mut a = vec![Bytes::from_static(JOBS_QUERY.as_bytes())];
        a.extend(args.iter().map(|s| Bytes::from(s.to_string())));
        self.e.table(TABLE, false).query(&a, 0, 0).unwrap()
    }

    fn record(&self, id: &str) -> JobRecord {
        match self.query(&["record", id]) {
            Reply::Bulk(b) => postcard::from_bytes(&b).unwrap(),
            other => panic!("no record: {other:?}"),
        }
    }

    fn task(&self, id: &str, n: u32) -> TaskRecord {
        match self.query(&["tasks", id, &n.to_string(), "1"]) {
            Reply::Array(mut v) if v.len() == 1 => match v.remove(0) {
                Reply::Bulk(b) => postcard::from_bytes(&b).unwrap(),
                other => panic!("{other:?}"),
            },
            other => panic!("no task: {other:?}"),
        }
    }

    fn stream(&self, id: &str) -> Vec<(String, Vec<String>)> {
        let Reply::Array(entries) = self.query(&["stream", id, "0", "0", "1000"]) else {
            panic!()
        };
        entries
            .into_iter()
            .map(|e| match e {
                Reply::Array(mut v) => {
                    let fields = match v.remove(1) {
                        Reply::Array(f) => f
                            .into_iter()
                            .map(|f| match f {
                                Reply::Bulk(b) => String::from_utf8(b.to_vec()).unwrap(),
                                other => panic!("{other:?}"),
                            })
                            .collect(),
                        other => panic!("{other:?}"),
                    };
                    let id = match v.remove(0) {
                        Reply::Bulk(b) => String::from_utf8(b.to_vec()).unwrap(),
                        other => panic!("{other:?}"),
                    };
                    (id, fields)
                }
                other => panic!("{other:?}"),
            })
            .collect()
    }
}

fn id(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn refused(r: Result<Reply, Error>, code: &str) {
    match r {
        Err(Error::Command(line)) => assert!(line.starts_with(code), "{line}"),
        other => panic!("expected {code}, got {other:?}"),
    }
}

fn plan(n: usize) -> Vec<TaskPlan> {
    (0..n)
        .map(|i| TaskPlan {
            shard: i as u64,
            from: None,
            to: None,
            pin_index: 7,
        })
        .collect()
}

fn done(keys: u64, partial: &str) -> AttemptOutcome {
    AttemptOutcome::Done {
        keys,
        partial: Bytes::from(partial.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_is_idempotent_by_id_and_spec() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    let submit = |spec: &str| JobCommand::Submit {
        id: id("j1"),
        spec: spec.to_string(),
        now_ms: 1_000,
    };
    assert_eq!(
        s.apply(submit("{a}")).await.unwrap(),
        Reply::Array(vec![Reply::Bulk(id("j1")), Reply::Status("created".into())])
    );
    assert_eq!(
        s.apply(submit("{a}")).await.unwrap(),
        Reply::Array(vec![Reply::Bulk(id("j1")), Reply::Status("exists".into())])
    );
    refused(
        s.apply(submit("{b}")).await,
        "ERR a job with this id exists with another spec",
    );
    let rec = s.record("j1");
    assert_eq!(
        (rec.state, rec.spec.as_str(), rec.epoch),
        (JobState::Queued, "{a}", 0)
    );
    refused(
        s.apply(JobCommand::Submit {
            id: id("bad id"),
            spec: "x".into(),
            now_ms: 1,
        })
        .await,
        "ERR a job id",
    );
    refused(
        s.apply(JobCommand::Cancel {
            id: id("nope"),
            now_ms: 1,
        })
        .await,
        "NOJOB",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_coordinator_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    s.apply(JobCommand::Submit {
        id: id("j"),
        spec: "s".into(),
        now_ms: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 3,
    })
    .await
    .unwrap();
    // A newer coordinator claims it; the older one's commands are refused from then on.
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 5,
    })
    .await
    .unwrap();
    refused(
        s.apply(JobCommand::Claim {
            id: id("j"),
            epoch: 4,
        })
        .await,
        "STALE",
    );
    refused(
        s.apply(JobCommand::Plan {
            id: id("j"),
            epoch: 3,
            pins: vec![],
            tasks: plan(2),
        })
        .await,
        "STALE",
    );
    refused(
        s.apply(JobCommand::Finish {
            id: id("j"),
            epoch: 4,
            now_ms: 2,
            outcome: JobOutcome::Failed { reason: "x".into() },
        })
        .await,
        "STALE",
    );
    assert_eq!(s.record("j").state, JobState::Queued);
    s.apply(JobCommand::Plan {
        id: id("j"),
        epoch: 5,
        pins: vec![],
        tasks: plan(2),
    })
    .await
    .unwrap();
    let rec = s.record("j");
    assert_eq!(
        (rec.state, rec.tasks_total, rec.epoch),
        (JobState::Running, 2, 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_success_of_a_task_wins_and_a_job_is_done_only_when_all_are() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    s.apply(JobCommand::Submit {
        id: id("j"),
        spec: "s".into(),
        now_ms: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Plan {
        id: id("j"),
        epoch: 1,
        pins: vec![],
        tasks: plan(2),
    })
    .await
    .unwrap();
    let start = |task, attempt, node| JobCommand::AttemptStart {
        id: id("j"),
        epoch: 1,
        task,
        attempt,
        node,
        speculative: attempt > 1,
        now_ms: 10,
    };
    let end = |task, attempt, outcome| JobCommand::AttemptEnd {
        id: id("j"),
        epoch: 1,
        task,
        attempt,
        // Attempt n of these tasks runs on node n + 1.
        node: u64::from(attempt) + 1,
        outcome,
    };
    s.apply(start(0, 1, 2)).await.unwrap();
    s.apply(start(0, 2, 3)).await.unwrap();
    // A retried start (its answer lost) is answered as the first; another node's is refused.
    assert_eq!(s.apply(start(0, 2, 3)).await.unwrap(), Reply::Ok);
    refused(
        s.apply(start(0, 2, 4)).await,
        "ERR this attempt was started already on another node",
    );
    assert_eq!(
        s.apply(end(0, 2, done(5, "second"))).await.unwrap(),
        Reply::Status("accepted".into())
    );
    // The first attempt finishes later: its output is dropped.
    assert_eq!(
        s.apply(end(0, 1, done(5, "first"))).await.unwrap(),
        Reply::Status("superseded".into())
    );
    // A retried report answers what was recorded.
    assert_eq!(
        s.apply(end(0, 2, done(5, "second"))).await.unwrap(),
        Reply::Status("accepted".into())
    );
    let t = s.task("j", 0);
    assert_eq!(
        t.state,
        TaskState::Done {
            attempt: 2,
            keys: 5,
            partial: id("second")
        }
    );
    assert_eq!(t.attempts[0].end, AttemptEnd::Superseded);
    refused(s.apply(start(0, 3, 4)).await, "TASKDONE");
    // Not done while a task is not.
    refused(
        s.apply(JobCommand::Finish {
            id: id("j"),
            epoch: 1,
            now_ms: 20,
            outcome: JobOutcome::Done,
        })
        .await,
        "ERR 1 of 2 tasks are done",
    );
    // A lost attempt leaves its task to run again.
    s.apply(start(1, 1, 2)).await.unwrap();
    // Only where it was started, and a loss only by the coordinator of the record's epoch.
    let lost = |epoch, node| JobCommand::AttemptEnd {
        id: id("j"),
        epoch,
        task: 1,
        attempt: 1,
        node,
        outcome: AttemptOutcome::Lost { reason: "x".into() },
    };
    refused(
        s.apply(lost(1, 3)).await,
        "ERR attempt 1 of task 1 was started on node 2, not 3",
    );
    refused(s.apply(lost(0, 2)).await, "STALE");
    s.apply(end(
        1,
        1,
        AttemptOutcome::Lost {
            reason: "node 2 missed 3 heartbeats".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(s.task("j", 1).state, TaskState::Pending);
    s.apply(start(1, 2, 3)).await.unwrap();
    s.apply(end(1, 2, done(7, "p"))).await.unwrap();
    // The job ends with its closing entry, in one command: a reader who sees `final` finds
    // the job done.
    let finish = JobCommand::FinishPublishing {
        id: id("j"),
        epoch: 1,
        now_ms: 30,
        outcome: JobOutcome::Done,
        closing: vec![(id("type"), id("final"))],
    };
    let before = s.stream("j").len();
    s.apply(finish.clone()).await.unwrap();
    let rec = s.record("j");
    assert_eq!(
        (rec.state, rec.tasks_done, rec.keys_scanned, rec.ended_ms),
        (JobState::Done, 2, 12, Some(30))
    );
    let stream = s.stream("j");
    assert_eq!(stream.len(), before + 1);
    assert_eq!(stream.last().unwrap().1, vec!["type", "final"]);
    // Once: a repeat is refused and publishes nothing.
    refused(s.apply(finish).await, "ENDED");
    assert_eq!(s.stream("j").len(), before + 1);
    refused(s.apply(start(1, 3, 2)).await, "ENDED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_partial_travels_in_chunks_that_only_the_accepted_attempt_leaves_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    s.apply(JobCommand::Submit {
        id: id("j"),
        spec: "s".into(),
        now_ms: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Plan {
        id: id("j"),
        epoch: 1,
        pins: vec![],
        tasks: plan(1),
    })
    .await
    .unwrap();
    for (attempt, node) in [(1u16, 2u64), (2, 3), (3, 4)] {
        s.apply(JobCommand::AttemptStart {
            id: id("j"),
            epoch: 1,
            task: 0,
            attempt,
            node,
            speculative: attempt > 1,
            now_ms: 10,
        })
        .await
        .unwrap();
    }
    let chunk = |attempt: u16, node: u64, n: u32, bytes: &str| JobCommand::PartialChunk {
        id: id("j"),
        task: 0,
        attempt,
        node,
        n,
        bytes: Bytes::from(bytes.to_string()),
    };
    let end = |attempt: u16, node: u64, outcome| JobCommand::AttemptEnd {
        id: id("j"),
        epoch: 1,
        task: 0,
        attempt,
        node,
        outcome,
    };
    let in_chunks = |chunks, bytes| AttemptOutcome::DoneInChunks {
        keys: 9,
        chunks,
        bytes,
    };
    let part = |s: &Shard, attempt: &str, n: &str| s.query(&["partial", "j", "0", attempt, n]);
    // Only from where the attempt was started, and within the bounds.
    refused(
        s.apply(chunk(1, 3, 0, "x")).await,
        "ERR attempt 1 of task 0 was started on node 2, not 3",
    );
    refused(s.apply(chunk(1, 2, 128, "x")).await, "LIMIT");
    // Attempt 1 writes two chunks (one twice: a retried proposal), attempt 3 one.
    for c in [
        chunk(1, 2, 0, "ab"),
        chunk(1, 2, 0, "ab"),
        chunk(1, 2, 1, "cde"),
        chunk(3, 4, 0, "zz"),
    ] {
        assert_eq!(s.apply(c).await.unwrap(), Reply::Ok);
    }
    assert_eq!(s.record("j").partial_bytes, 7);
    // The end must name exactly what was written.
    refused(s.apply(end(1, 2, in_chunks(3, 5))).await, "ERR chunk 2");
    refused(
        s.apply(end(1, 2, in_chunks(1, 2))).await,
        "ERR the attempt's partial chunks hold 2 bytes and more chunks",
    );
    refused(
        s.apply(end(1, 2, in_chunks(2, 6))).await,
        "ERR the attempt's partial chunks hold 5 bytes",
    );
    // Attempt 2 wrote only its chunk 5 (chunks land in any order), then fails: nothing of it
    // stays. Attempt 1's output is the task's.
    s.apply(chunk(2, 3, 5, "q")).await.unwrap();
    assert_eq!(s.record("j").partial_bytes, 8);
    s.apply(end(
        2,
        3,
        AttemptOutcome::Failed {
            error: "x".into(),
            user: false,
        },
    ))
    .await
    .unwrap();
    assert_eq!(part(&s, "2", "5"), Reply::Nil);
    assert_eq!(s.record("j").partial_bytes, 7);
    assert_eq!(
        s.apply(end(1, 2, in_chunks(2, 5))).await.unwrap(),
        Reply::Status("accepted".into())
    );
    assert_eq!(
        s.task("j", 0).state,
        TaskState::DoneInChunks {
            attempt: 1,
            keys: 9,
            chunks: 2
        }
    );
    assert_eq!(part(&s, "1", "0"), Reply::Bulk(id("ab")));
    assert_eq!(part(&s, "1", "1"), Reply::Bulk(id("cde")));
    // A chunk for a done task is refused; the late attempt 3 is superseded and its chunk goes.
    refused(s.apply(chunk(3, 4, 1, "zz")).await, "TASKDONE");
    assert_eq!(
        s.apply(end(3, 4, in_chunks(1, 2))).await.unwrap(),
        Reply::Status("superseded".into())
    );
    assert_eq!(part(&s, "3", "0"), Reply::Nil);
    let rec = s.record("j");
    assert_eq!(
        (rec.tasks_done, rec.keys_scanned, rec.partial_bytes),
        (1, 9, 5)
    );
    // The result's chunks: 0 starts a write, the others land in any order; a rewrite (a new
    // coordinator's) with fewer chunks starts with 0 again and hides the stale ones.
    let result = |n: u32| JobCommand::ResultChunk {
        id: id("j"),
        epoch: 1,
        n,
        bytes: Bytes::from(format!("[{n}]")),
    };
    for n in [0, 2, 1] {
        s.apply(result(n)).await.unwrap();
    }
    assert_eq!(s.record("j").result_chunks, 3);
    for n in [0, 1] {
        s.apply(result(n)).await.unwrap();
    }
    assert_eq!(s.record("j").result_chunks, 2);
    // Once the job ends its partial chunks are done with: they go at once (the shard's
    // snapshots need not carry them for the day an ended job is kept).
    s.apply(JobCommand::Finish {
        id: id("j"),
        epoch: 1,
        now_ms: 20,
        outcome: JobOutcome::Done,
    })
    .await
    .unwrap();
    assert_eq!(part(&s, "1", "0"), Reply::Nil);
    assert_eq!(part(&s, "1", "1"), Reply::Nil);
    assert_eq!(s.record("j").partial_bytes, 0);
    assert_eq!(
        s.apply(JobCommand::Forget { id: id("j") }).await.unwrap(),
        Reply::Integer(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ids_rise_across_coordinators_and_the_stream_is_bounded_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    s.apply(JobCommand::Submit {
        id: id("j"),
        spec: "s".into(),
        now_ms: 5_000,
    })
    .await
    .unwrap();
    let publish = |epoch, now_ms, kind: &str| JobCommand::Publish {
        id: id("j"),
        epoch,
        now_ms,
        entries: vec![vec![(id("type"), id(kind))]],
    };
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 1,
    })
    .await
    .unwrap();
    s.apply(publish(1, 6_000, "partial")).await.unwrap();
    // A new coordinator whose clock is behind: the IDs still rise.
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 2,
    })
    .await
    .unwrap();
    s.apply(publish(2, 5_500, "partial")).await.unwrap();
    s.apply(publish(2, 5_500, "final")).await.unwrap();
    let ids: Vec<String> = s.stream("j").into_iter().map(|(i, _)| i).collect();
    assert_eq!(ids, vec!["5000-0", "6000-0", "6000-1", "6000-2"]);
    assert_eq!(s.stream("j")[0].1, vec!["type", "submitted"]);
    let big = JobCommand::Publish {
        id: id("j"),
        epoch: 2,
        now_ms: 7_000,
        entries: vec![vec![(id("result"), Bytes::from(vec![b'x'; 300 * 1024]))]],
    };
    refused(s.apply(big).await, "ERR a job stream entry is at most");
    // A refusal changes nothing, even after an entry of the same command that would fit.
    let mixed = JobCommand::Publish {
        id: id("j"),
        epoch: 2,
        now_ms: 9_000,
        entries: vec![
            vec![(id("type"), id("partial"))],
            vec![(id("result"), Bytes::from(vec![b'x'; 300 * 1024]))],
        ],
    };
    refused(s.apply(mixed).await, "ERR a job stream entry is at most");
    assert_eq!(s.stream("j").len(), 4);
    assert_eq!(s.record("j").stream_last.to_string(), "6000-2");
    // The deposed coordinator (epoch 1) changes nothing; a command ahead of its claim neither.
    refused(s.apply(publish(1, 9_000, "partial")).await, "STALE");
    refused(
        s.apply(publish(3, 9_000, "partial")).await,
        "ERR claim the job first",
    );
    // Reading after a position.
    let Reply::Array(after) = s.query(&["stream", "j", "6000", "0", "10"]) else {
        panic!()
    };
    assert_eq!(after.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_jobs_are_bounded_and_ended_jobs_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    for n in 0..ACTIVE_JOBS_MAX {
        s.apply(JobCommand::Submit {
            id: id(&format!("j{n}")),
            spec: "s".into(),
            now_ms: 1,
        })
        .await
        .unwrap();
    }
    refused(
        s.apply(JobCommand::Submit {
            id: id("one-more"),
            spec: "s".into(),
            now_ms: 1,
        })
        .await,
        "JOBSFULL",
    );
    refused(
        s.apply(JobCommand::Forget { id: id("j0") }).await,
        "ERR a job is forgotten only once it has ended",
    );
    assert_eq!(
        s.apply(JobCommand::Cancel {
            id: id("j0"),
            now_ms: 2
        })
        .await
        .unwrap(),
        Reply::Integer(1)
    );
    assert_eq!(
        s.apply(JobCommand::Cancel {
            id: id("j0"),
            now_ms: 3
        })
        .await
        .unwrap(),
        Reply::Integer(0)
    );
    assert_eq!(s.record("j0").state, JobState::Cancelled);
    // Its slot is free again.
    s.apply(JobCommand::Submit {
        id: id("one-more"),
        spec: "s".into(),
        now_ms: 4,
    })
    .await
    .unwrap();
    // A result is written only once every task is done.
    s.apply(JobCommand::Claim {
        id: id("j1"),
        epoch: 1,
    })
    .await
    .unwrap();
    refused(
        s.apply(JobCommand::ResultChunk {
            id: id("j1"),
            epoch: 1,
            n: 0,
            bytes: id("[]"),
        })
        .await,
        "ERR a result is written once every task is done",
    );
    // j0 ended (cancelled at 2): it is listed for the retention until it is forgotten.
    assert_eq!(
        s.query(&["ended", "3", "10"]),
        Reply::Array(vec![Reply::Bulk(id("j0"))])
    );
    assert_eq!(
        s.query(&["ended", "2", "10"]),
        Reply::Array(vec![]),
        "ended at 2, not before"
    );
    assert_eq!(
        s.apply(JobCommand::Forget { id: id("j0") }).await.unwrap(),
        Reply::Integer(0)
    );
    assert_eq!(s.query(&["ended", "3", "10"]), Reply::Array(vec![]));
    assert_eq!(s.query(&["record", "j0"]), Reply::Nil);
    assert_eq!(s.stream("j0"), vec![]);
    assert_eq!(
        s.apply(JobCommand::Forget { id: id("j0") }).await.unwrap(),
        Reply::Integer(0)
    );
    // The active index holds exactly the jobs not ended.
    let Reply::Array(active) = s.query(&["active"]) else {
        panic!()
    };
    assert_eq!(active.len(), ACTIVE_JOBS_MAX as usize);
    assert!(!active.contains(&Reply::Bulk(id("j0"))), "j0 was cancelled");
    assert!(active.contains(&Reply::Bulk(id("one-more"))));
    let Reply::Array(list) = s.query(&["list", "", "100"]) else {
        panic!()
    };
    assert_eq!(list.len(), ACTIVE_JOBS_MAX as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ends_even_when_its_closing_entry_is_over_the_entry_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Shard::open(dir.path());
    s.apply(JobCommand::Submit {
        id: id("j"),
        spec: "s".into(),
        now_ms: 1,
    })
    .await
    .unwrap();
    s.apply(JobCommand::Claim {
        id: id("j"),
        epoch: 1,
    })
    .await
    .unwrap();
    // Its second field alone is past the entry bound: the entry keeps the first.
    let huge = Bytes::from(vec![b'x'; capdb_types::jobs::JOB_STREAM_ENTRY_MAX + 1]);
    s.apply(JobCommand::FinishPublishing {
        id: id("j"),
        epoch: 1,
        now_ms: 5,
        outcome: JobOutcome::Failed {
            reason: "boom".into(),
        },
        closing: vec![(id("type"), id("error")), (id("message"), huge)],
    })
    .await
    .unwrap();
    assert!(matches!(s.record("j").state, JobState::Failed { .. }));
    assert_eq!(s.stream("j").last().unwrap().1, vec!["type", "error"]);
}
