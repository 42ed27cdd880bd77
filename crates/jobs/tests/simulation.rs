//! The coordinator against a simulated cluster: real storage engines (one per node, holding
//! replicas of the input shards, and one for the `_jobs` shard, applying the real job state
//! machine), real pins and pinned scans, and nodes that die or fail. Whatever fails, the
//! result equals one pass over the data, and only the tasks that met a failure ran again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capdb_jobs::coordinator::{Config, Ended, run};
use capdb_jobs::worker::{AttemptKey, Attempts, Checkpoint, PAGE_KEYS, Page, Probe};
use capdb_jobs::{Cluster, ShardReplicas, TaskError, TaskOrder, TaskOutput};
use capdb_reduce::{JobSpec, Plan};
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{ChangesStep, DiskEngine, JOBS_QUERY};
use capdb_types::jobs::{
    AttemptEnd, JobCommand, JobRecord, JobState, ShardPin, TaskRecord, TaskState,
};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Hlc, Mutation, Reply, Timestamp};
use serde_json::json;

const JOBS_TABLE: &str = "shard/1000";

struct Node {
    engine: DiskEngine,
    alive: AtomicBool,
    /// Attempts to fail before running one (a replica that lost its pin, say).
    fail_next: AtomicU32,
    /// Attempts it runs before it dies (`u32::MAX`: it does not).
    runs_left: AtomicU32,
    ran: AtomicU32,
    /// Stalled (SIGSTOP, cut off): its calls and heartbeats are never answered.
    stalled: Arc<AtomicBool>,
    /// Slow: an attempt waits this long before it reads (a hung disk) while its heartbeats
    /// answer "running, nothing read".
    slow_ms: AtomicU64,
    attempts: Arc<Attempts>,
    /// The (task, attempt)s it was asked to stop, in order.
    cancels: Mutex<Vec<(u32, u16)>>,
    /// How long each page takes to read (a big shard on a slow disk).
    page_ms: AtomicU64,
    /// It stalls (as `stalled`) when an attempt of it is about to read past this many keys.
    stall_at_keys: AtomicU64,
    /// Per attempt run here: (task, attempt, keys of the checkpoint it resumed from, keys it
    /// read itself).
    reads: Mutex<Vec<AttemptRead>>,
}

/// (task, attempt, keys of the checkpoint it resumed from, keys it read itself).
type AttemptRead = (u32, u16, Option<u64>, Arc<AtomicU64>);

struct Sim {
    nodes: HashMap<u64, Node>,
    shards: Vec<ShardReplicas>,
    jobs: DiskEngine,
    jobs_index: Mutex<u64>,
    /// Every how many job commands one's answer is lost after it applied (0: none is).
    lose_every: AtomicU32,
    /// Cancel the job once this many tasks have run (0: never).
    cancel_after: AtomicU32,
    /// Each shard's last log index.
    index: Mutex<HashMap<u64, u64>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn applied(table: &str, index: u64) -> Vec<(String, Option<Vec<u8>>)> {
    vec![(
        format!("applied/{table}"),
        Some(index.to_le_bytes().to_vec()),
    )]
}

impl Sim {
    /// `nodes` nodes; shard `g` (1..=shards) on the replicas `placement(g)`, leader the first.
    fn new(nodes: u64, shards: u64, placement: impl Fn(u64) -> Vec<u64>) -> Sim {
        let mut dirs = Vec::new();
        let mut open = || {
            let d = tempfile::tempdir().unwrap();
            let e = DiskEngine::open(d.path(), Arc::new(Hlc::new()), 1 << 20).unwrap();
            dirs.push(d);
            e
        };
        let node_map = (1..=nodes)
            .map(|id| {
                (
                    id,
                    Node {
                        engine: open(),
                        alive: AtomicBool::new(true),
                        fail_next: AtomicU32::new(0),
                        runs_left: AtomicU32::new(u32::MAX),
                        ran: AtomicU32::new(0),
                        stalled: Arc::new(AtomicBool::new(false)),
                        slow_ms: AtomicU64::new(0),
                        attempts: Arc::default(),
                        cancels: Mutex::default(),
                        page_ms: AtomicU64::new(0),
                        stall_at_keys: AtomicU64::new(u64::MAX),
                        reads: Mutex::default(),
                    },
                )
            })
            .collect();
        let jobs = open();
        let shards = (1..=shards)
            .map(|g| {
                let replicas = placement(g);
                ShardReplicas {
                    shard: g,
                    leader: replicas.first().copied(),
                    replicas,
                }
            })
            .collect();
        Sim {
            nodes: node_map,
            shards,
            jobs,
            jobs_index: Mutex::new(0),
            lose_every: AtomicU32::new(0),
            cancel_after: AtomicU32::new(0),
            index: Mutex::default(),
            _dirs: dirs,
        }
    }

    fn replicas(&self, shard: u64) -> &[u64] {
        &self.shards[(shard - 1) as usize].replicas
    }

    /// Writes `records` through each shard's "log": every replica applies the same entries.
    async fn load(&self, records: &[(String, String)]) {
        let shards = self.shards.len() as u64;
        for (i, (k, v)) in records.iter().enumerate() {
            let shard = 1 + (i as u64 % shards);
            let index = {
                let mut idx = self.index.lock().unwrap();
                let e = idx.entry(shard).or_insert(0);
                *e += 1;
                *e
            };
            let table = format!("shard/{shard}");
            for node in self.replicas(shard) {
                let m = Mutation::Set {
                    key: Bytes::from(k.clone()),
                    value: Bytes::from(v.clone()),
                    condition: Condition::Always,
                    expiry: ExpiryUpdate::Clear,
                    return_old: false,
                };
                self.nodes[node]
                    .engine
                    .apply_replicated(
                        &table,
                        vec![(m, Timestamp(index), 1, index)],
                        applied(&table, index),
                        Vec::new(),
                        Vec::new(),
                        Vec::new(),
                    )
                    .await
                    .unwrap();
            }
        }
    }

    fn record(&self, id: &str) -> JobRecord {
        let args = [
            Bytes::from_static(JOBS_QUERY.as_bytes()),
            Bytes::from("record"),
            Bytes::from(id.to_string()),
        ];
        match self
            .jobs
            .table(JOBS_TABLE, false)
            .query(&args, 0, 0)
            .unwrap()
        {
            Reply::Bulk(b) => postcard::from_bytes(&b).unwrap(),
            other => panic!("{other:?}"),
        }
    }
}

impl Cluster for Sim {
    async fn job(&self, cmd: JobCommand) -> Result<Result<Reply, Error>, Error> {
        let index = {
            let mut i = self.jobs_index.lock().unwrap();
            *i += 1;
            *i
        };
        let answer = self
            .jobs
            .changes_config(JOBS_TABLE, ChangesStep::Job(cmd), index, Vec::new(), None)
            .await;
        let every = u64::from(self.lose_every.load(Ordering::SeqCst));
        if every > 0 && index % every == 0 {
            // Applied, but the answer never reaches the coordinator.
            return Err(Error::OutcomeUnknown("the answer was lost".into()));
        }
        answer
    }

    async fn record(&self, id: &Bytes) -> Result<Option<JobRecord>, Error> {
        Ok(Some(Sim::record(self, &String::from_utf8_lossy(id))))
    }

    async fn tasks(&self, id: &Bytes) -> Result<Vec<TaskRecord>, Error> {
        let args = [
            Bytes::from_static(JOBS_QUERY.as_bytes()),
            Bytes::from("tasks"),
            id.clone(),
            Bytes::from("0"),
            Bytes::from("1024"),
        ];
        match self.jobs.table(JOBS_TABLE, false).query(&args, 0, 0)? {
            Reply::Array(v) => Ok(v
                .into_iter()
                .map(|r| match r {
                    Reply::Bulk(b) => postcard::from_bytes(&b).unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect()),
            other => panic!("{other:?}"),
        }
    }

    async fn partial_chunk(
        &self,
        id: &Bytes,
        task: u32,
        attempt: u16,
        n: u32,
    ) -> Result<Option<Bytes>, Error> {
        let args = [
            Bytes::from_static(JOBS_QUERY.as_bytes()),
            Bytes::from("partial"),
            id.clone(),
            Bytes::from(task.to_string()),
            Bytes::from(attempt.to_string()),
            Bytes::from(n.to_string()),
        ];
        match self.jobs.table(JOBS_TABLE, false).query(&args, 0, 0)? {
            Reply::Bulk(b) => Ok(Some(b)),
            _ => Ok(None),
        }
    }

    async fn shards(&self, _keyspace: &str) -> Result<Vec<ShardReplicas>, Error> {
        Ok(self.shards.clone())
    }

    async fn pin(&self, shard: u64, owner: Bytes, now_ms: u64) -> Result<ShardPin, Error> {
        let index = {
            let mut idx = self.index.lock().unwrap();
            let e = idx.entry(shard).or_insert(0);
            *e += 1;
            *e
        };
        let table = format!("shard/{shard}");
        let mut answer = None;
        // Every live replica applies the pin entry; a dead one misses it.
        for node in self.replicas(shard) {
            let n = &self.nodes[node];
            if !n.alive.load(Ordering::SeqCst) {
                continue;
            }
            let info = n
                .engine
                .table(&table, false)
                .pin(
                    &owner,
                    index,
                    now_ms,
                    applied(&table, index),
                    &format!("applied/{table}"),
                )
                .await??;
            answer.get_or_insert(ShardPin {
                shard,
                index: info.index,
                keys: info.keys,
                first_key: info.first_key,
                last_key: info.last_key,
            });
        }
        answer.ok_or_else(|| Error::Unavailable("no live replica".into()))
    }

    async fn key_at(
        &self,
        shard: &ShardReplicas,
        owner: Bytes,
        index: u64,
        n: u64,
    ) -> Option<Bytes> {
        for node in &shard.replicas {
            let nd = &self.nodes[node];
            if !nd.alive.load(Ordering::SeqCst) || nd.stalled.load(Ordering::SeqCst) {
                continue;
            }
            let table = nd.engine.table(&format!("shard/{}", shard.shard), false);
            let key = capdb_jobs::worker::nth_key(
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
            );
            if key.is_some() {
                return key;
            }
        }
        None
    }

    async fn renew_pin(
        &self,
        node: u64,
        shard: u64,
        owner: Bytes,
        index: u64,
    ) -> Result<bool, Error> {
        let n = &self.nodes[&node];
        if n.stalled.load(Ordering::SeqCst) || !n.alive.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(format!("node {node} did not answer")));
        }
        Ok(n.engine
            .table(&format!("shard/{shard}"), false)
            .renew_pin(&owner, index))
    }

    async fn unpin(&self, shard: u64, owner: Bytes, index: u64) -> Result<(), Error> {
        for node in self.replicas(shard) {
            self.nodes[node]
                .engine
                .table(&format!("shard/{shard}"), false)
                .unpin(&owner, index);
        }
        Ok(())
    }

    async fn run_task(&self, node: u64, order: TaskOrder) -> Result<TaskOutput, TaskError> {
        let n = &self.nodes[&node];
        match n.runs_left.load(Ordering::SeqCst) {
            0 => n.alive.store(false, Ordering::SeqCst),
            u32::MAX => {}
            left => n.runs_left.store(left - 1, Ordering::SeqCst),
        }
        if !n.alive.load(Ordering::SeqCst) {
            // A dead node: the call times out.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(TaskError::Unreachable(format!(
                "node {node} did not answer"
            )));
        }
        let ran: u32 = self
            .nodes
            .values()
            .map(|n| n.ran.load(Ordering::SeqCst))
            .sum();
        n.ran.fetch_add(1, Ordering::SeqCst);
        let cancel_after = self.cancel_after.load(Ordering::SeqCst);
        if cancel_after > 0 && ran + 1 == cancel_after {
            let id = order.job.split(|b| *b == b'@').next().unwrap_or_default();
            self.job(JobCommand::Cancel {
                id: Bytes::copy_from_slice(id),
                now_ms: 2,
            })
            .await
            .ok();
        }
        if n.fail_next.load(Ordering::SeqCst) > 0 {
            n.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(TaskError::Failed(format!(
                "node {node}: no pin of this job here"
            )));
        }
        if n.stalled.load(Ordering::SeqCst) {
            // The order went out; nothing ever comes back.
            return std::future::pending().await;
        }
        let registered = n
            .attempts
            .start((order.job.clone(), order.task, order.attempt))?;
        let slow = n.slow_ms.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        let table = n.engine.table(&format!("shard/{}", order.shard), false);
        let read = Arc::new(AtomicU64::new(0));
        let resumed = order.resume.as_ref().map(|c| c.keys_read);
        n.reads
            .lock()
            .unwrap()
            .push((order.task, order.attempt, resumed, read.clone()));
        let page_ms = n.page_ms.load(Ordering::SeqCst);
        let stall_at = n.stall_at_keys.load(Ordering::SeqCst);
        let stalled = n.stalled.clone();
        tokio::task::spawn_blocking(move || {
            let spec = JobSpec::parse(order.spec.as_bytes()).unwrap();
            let include = spec.input.expired == capdb_reduce::spec::Expired::Include;
            capdb_jobs::worker::run(
                &order,
                |after| {
                    std::thread::sleep(Duration::from_millis(page_ms));
                    if resumed.unwrap_or(0) + read.load(Ordering::SeqCst) >= stall_at {
                        // Stalled mid-task: nothing more is read or answered (bounded, so
                        // that the test's runtime can stop; the test lets it go at its end).
                        stalled.store(true, Ordering::SeqCst);
                        let until = std::time::Instant::now() + Duration::from_secs(60);
                        while stalled.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        return Err("stalled".to_string());
                    }
                    table
                        .pinned_scan(
                            &order.job,
                            order.pin_index,
                            order.from.as_deref(),
                            order.to.as_deref(),
                            after,
                            PAGE_KEYS,
                            include,
                        )
                        .map(|p| {
                            read.fetch_add(p.entries.len() as u64, Ordering::SeqCst);
                            Page {
                                entries: p.entries.into_iter().map(|(k, v)| (k, v.data)).collect(),
                                next: p.next,
                            }
                        })
                        .map_err(|e| e.to_string())
                },
                &registered.progress,
                None,
            )
        })
        .await
        .map_err(|e| TaskError::Failed(e.to_string()))?
    }

    async fn probe(&self, node: u64, key: AttemptKey) -> Result<Probe, Error> {
        let n = &self.nodes[&node];
        if n.stalled.load(Ordering::SeqCst) || !n.alive.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        Ok(n.attempts.probe(&key))
    }

    async fn checkpoint(
        &self,
        node: u64,
        key: AttemptKey,
        newer_than: u64,
    ) -> Result<Option<Checkpoint>, Error> {
        let n = &self.nodes[&node];
        if n.stalled.load(Ordering::SeqCst) || !n.alive.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        Ok(n.attempts.checkpoint(&key, newer_than))
    }

    async fn cancel(&self, node: u64, key: AttemptKey) {
        let n = &self.nodes[&node];
        if n.alive.load(Ordering::SeqCst) && !n.stalled.load(Ordering::SeqCst) {
            n.cancels.lock().unwrap().push((key.1, key.2));
            n.attempts.cancel(&key);
        }
    }

    fn now_ms(&self) -> u64 {
        capdb_types::unix_now_ms()
    }
}

fn orders(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("o:{i:06}"),
                json!({"c": format!("c{}", i % 7), "a": i % 100}).to_string(),
            )
        })
        .collect()
}

fn spec() -> String {
    json!({"input": {"keyspace": "orders", "prefix": "o:"},
           "map": {"group": {"json": "$.c"}, "values": {"a": {"json": "$.a"}}},
           "reduce": {"n": "count", "total": {"sum": "a"}},
           "output": {"order_by": "total", "desc": true}})
    .to_string()
}

/// The answer of one pass over `records`.
fn expected(records: &[(String, String)]) -> serde_json::Value {
    let plan = Plan::new(JobSpec::parse(spec().as_bytes()).unwrap()).unwrap();
    let mut p = plan.partial();
    for (k, v) in records {
        plan.add(&mut p, k.as_bytes(), v.as_bytes()).unwrap();
    }
    serde_json::Value::Array(plan.rows(&p).unwrap())
}

async fn submit(sim: &Sim, id: &str) {
    submit_spec(sim, id, &spec()).await;
}

async fn submit_spec(sim: &Sim, id: &str, spec: &str) {
    let canonical = JobSpec::parse(spec.as_bytes())
        .unwrap()
        .canonical()
        .to_string();
    sim.job(JobCommand::Submit {
        id: Bytes::from(id.to_string()),
        spec: canonical,
        now_ms: capdb_types::unix_now_ms(),
    })
    .await
    .unwrap()
    .unwrap();
}

fn result(sim: &Sim, id: &str) -> serde_json::Value {
    let args = [
        Bytes::from_static(JOBS_QUERY.as_bytes()),
        Bytes::from("result"),
        Bytes::from(id.to_string()),
        Bytes::from("0"),
    ];
    match sim
        .jobs
        .table(JOBS_TABLE, false)
        .query(&args, 0, 0)
        .unwrap()
    {
        Reply::Bulk(b) => serde_json::from_slice(&b).unwrap(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_four_shards_gives_the_one_pass_answer_and_runs_on_followers() {
    // 3 nodes, each shard on all of them, leaders spread.
    let sim = spread_over_three(4);
    let data = orders(2_000);
    sim.load(&data).await;
    submit(&sim, "j1").await;
    let ended = run(&sim, Bytes::from("j1"), 1, &Config::default())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "j1"), expected(&data));
    let rec = sim.record("j1");
    assert_eq!(
        (rec.state, rec.tasks_done, rec.keys_scanned),
        (JobState::Done, 4, 2_000)
    );
    // Followers first: no task ran on its shard's leader.
    for (n, t) in sim
        .tasks(&Bytes::from("j1"))
        .await
        .unwrap()
        .iter()
        .enumerate()
    {
        let leader = sim.shards[(t.plan.shard - 1) as usize].leader;
        assert!(
            t.attempts.iter().all(|a| Some(a.node) != leader),
            "task {n} ran on its leader"
        );
        assert_eq!(t.attempts.len(), 1);
    }
    // Pins are released.
    for node in sim.nodes.values() {
        assert_eq!(node.engine.pins_held(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_costs_only_its_tasks() {
    // 3 nodes; node 3 dies after the pins (it holds them but never answers).
    let sim = spread_over_three(6);
    let data = orders(3_000);
    sim.load(&data).await;
    submit(&sim, "j2").await;
    // Node 2 fails its first attempt (as a replica that lost its pin would); node 3 dies once
    // the job has pinned (it holds its pins): every call to it goes unanswered. Both get a
    // task at the start (followers first, the least busy, three slots for six tasks).
    sim.nodes[&2].fail_next.store(1, Ordering::SeqCst);
    let dead = 3;
    sim.nodes[&dead].runs_left.store(0, Ordering::SeqCst);
    let ended = run(&sim, Bytes::from("j2"), 1, &Config::default())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "j2"), expected(&data));
    let tasks = sim.tasks(&Bytes::from("j2")).await.unwrap();
    // The faults happened: node 2 failed one attempt, node 3 lost at least one.
    let all: Vec<&capdb_types::jobs::Attempt> = tasks.iter().flat_map(|t| &t.attempts).collect();
    assert!(
        all.iter()
            .any(|a| a.node == 2 && matches!(a.end, AttemptEnd::Failed { .. }))
    );
    assert!(
        all.iter()
            .any(|a| a.node == dead && matches!(a.end, AttemptEnd::Lost { .. }))
    );
    // Only tasks whose attempt met a failure ran again, and never twice on the same node.
    for (n, t) in tasks.iter().enumerate() {
        let failed: Vec<&capdb_types::jobs::Attempt> = t
            .attempts
            .iter()
            .filter(|a| !matches!(a.end, AttemptEnd::Done))
            .collect();
        for a in &failed {
            assert!(a.node == dead || a.node == 2, "task {n} attempt {a:?}");
        }
        assert_eq!(
            t.attempts.len(),
            failed.len() + 1,
            "task {n}: one success, after its failures"
        );
        let nodes: std::collections::HashSet<u64> = t.attempts.iter().map(|a| a.node).collect();
        assert_eq!(
            nodes.len(),
            t.attempts.len(),
            "task {n} ran twice on one node: {:?}",
            t.attempts
        );
    }
}

/// Six shards over three nodes, each led by a different node.
fn six_shards_over_three() -> Sim {
    spread_over_three(6)
}

/// `shards` shards on all of three nodes, their leaders spread (shard g led by 1 + g % 3).
fn spread_over_three(shards: u64) -> Sim {
    Sim::new(3, shards, |g| {
        let leader = 1 + (g % 3);
        let mut r = vec![leader];
        r.extend((1..=3).filter(|n| *n != leader));
        r
    })
}

fn quick_heartbeats() -> Config {
    Config {
        heartbeat_every: Duration::from_millis(50),
        lost_after: Duration::from_millis(300),
        stuck_after: Duration::from_millis(400),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_is_found_by_heartbeats_and_costs_only_its_tasks() {
    // Node 3 stalls (as under SIGSTOP or a cut link): the orders it is sent never answer, nor
    // do heartbeats. Without heartbeats its calls would wait for the task deadline (minutes).
    let sim = six_shards_over_three();
    let data = orders(3_000);
    sim.load(&data).await;
    submit(&sim, "stalled").await;
    sim.nodes[&3].stalled.store(true, Ordering::SeqCst);
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        run(&sim, Bytes::from("stalled"), 1, &quick_heartbeats()),
    )
    .await
    .expect("the job waited on a stalled node")
    .unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "stalled"), expected(&data));
    let tasks = sim.tasks(&Bytes::from("stalled")).await.unwrap();
    let mut lost_on_3 = 0;
    for (n, t) in tasks.iter().enumerate() {
        for a in &t.attempts {
            match &a.end {
                AttemptEnd::Done => assert_ne!(a.node, 3, "task {n}"),
                AttemptEnd::Lost { reason } => {
                    assert_eq!(a.node, 3, "task {n}: {a:?}");
                    assert!(reason.contains("heartbeats"), "{reason}");
                    lost_on_3 += 1;
                }
                other => panic!("task {n}: attempt {a:?} ended {other:?}"),
            }
        }
        // Only a task that met the stall ran twice.
        let on_3 = t.attempts.iter().filter(|a| a.node == 3).count();
        assert_eq!(t.attempts.len(), 1 + on_3, "task {n}: {:?}", t.attempts);
    }
    assert!(lost_on_3 > 0, "no task was placed on the stalled node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_lost_midway_runs_again_from_its_checkpoint_and_reads_only_the_rest() {
    // Two shards of 20,000 keys, one task each, five pages a task, a page every 100 ms; node 1
    // runs shard 1's task (followers first, the lowest id) and stalls before its fourth page.
    let sim = spread_over_three(2);
    let data = orders(40_000);
    sim.load(&data).await;
    submit(&sim, "resumed").await;
    for node in sim.nodes.values() {
        node.page_ms.store(100, Ordering::SeqCst);
    }
    sim.nodes[&1]
        .stall_at_keys
        .store(3 * PAGE_KEYS as u64, Ordering::SeqCst);
    let cfg = Config {
        checkpoint_every: Duration::from_millis(50),
        ..quick_heartbeats()
    };
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        run(&sim, Bytes::from("resumed"), 1, &cfg),
    )
    .await
    .expect("the job waited on a stalled node")
    .unwrap();
    sim.nodes[&1].stalled.store(false, Ordering::SeqCst);
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "resumed"), expected(&data));
    let tasks = sim.tasks(&Bytes::from("resumed")).await.unwrap();
    let t = &tasks[0];
    assert_eq!(t.attempts.len(), 2, "{:?}", t.attempts);
    assert!(
        t.attempts[0].node == 1 && matches!(t.attempts[0].end, AttemptEnd::Lost { .. }),
        "{:?}",
        t.attempts
    );
    assert!(matches!(t.attempts[1].end, AttemptEnd::Done));
    // The second attempt started from a checkpoint the first took, and read only the rest.
    let second = t.attempts[1].node;
    let reads = sim.nodes[&second].reads.lock().unwrap().clone();
    let (_, _, resumed, read) = reads
        .iter()
        .find(|(task, attempt, _, _)| (*task, *attempt) == (0, t.attempts[1].n))
        .expect("the second attempt ran");
    let resumed = resumed.expect("the second attempt started from a checkpoint");
    assert!(
        resumed >= PAGE_KEYS as u64 && resumed % PAGE_KEYS as u64 == 0,
        "{resumed}"
    );
    assert_eq!(resumed + read.load(Ordering::SeqCst), 20_000);
    // The other task met nothing: one attempt, from its start.
    assert_eq!(tasks[1].attempts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_a_pins_lease_holds_its_pins_by_renewing_them() {
    // Leases of 1 s, tasks of 2 s (five pages of 400 ms): only renewals keep the pins.
    async fn long_job(id: &str, pin_renew_every: Duration) -> (Sim, Vec<(String, String)>, Ended) {
        let sim = spread_over_three(2);
        let data = orders(40_000);
        sim.load(&data).await;
        for node in sim.nodes.values() {
            node.engine.set_pin_lease(Duration::from_secs(1));
            node.page_ms.store(400, Ordering::SeqCst);
        }
        submit(&sim, id).await;
        let cfg = Config {
            pin_renew_every,
            ..quick_heartbeats()
        };
        let ended = tokio::time::timeout(
            Duration::from_secs(120),
            run(&sim, Bytes::from(id.to_string()), 1, &cfg),
        )
        .await
        .expect("the job ended")
        .unwrap();
        (sim, data, ended)
    }
    let (sim, data, ended) = long_job("renewed", Duration::from_millis(100)).await;
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "renewed"), expected(&data));
    for node in sim.nodes.values() {
        assert_eq!(node.engine.pins_held(), 0, "released at the end");
    }
    // The same job without renewals loses its pins on every replica and fails.
    let (_, _, ended) = long_job("unrenewed", Duration::ZERO).await;
    assert!(
        matches!(&ended, Ended::Failed(reason) if reason.contains("no pin")),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_starts_the_tasks_in_flight_from_their_checkpoints() {
    let sim = spread_over_three(2);
    let data = orders(40_000);
    sim.load(&data).await;
    for node in sim.nodes.values() {
        node.page_ms.store(200, Ordering::SeqCst);
    }
    submit(&sim, "takeover").await;
    let cfg = Config {
        checkpoint_every: Duration::from_millis(50),
        ..quick_heartbeats()
    };
    // The first coordinator (epoch 1) runs until an attempt holds a checkpoint past its first
    // page, and dies there (its attempts run on).
    let owner = capdb_types::jobs::pin_owner(&Bytes::from("takeover"), 1);
    let checkpointed = async {
        loop {
            let far = sim.nodes.values().any(|n| {
                n.reads.lock().unwrap().iter().any(|(task, attempt, _, _)| {
                    matches!(
                        n.attempts.probe(&(owner.clone(), *task, *attempt)),
                        Probe::Running { checkpoint_keys, .. } if checkpoint_keys >= PAGE_KEYS as u64
                    )
                })
            });
            if far {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        ended = run(&sim, Bytes::from("takeover"), 1, &cfg) => panic!("the job ended first: {ended:?}"),
        _ = checkpointed => {}
    }
    let ended = run(&sim, Bytes::from("takeover"), 2, &cfg).await.unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "takeover"), expected(&data));
    // The tasks in flight ran again, at least one from its predecessor's checkpoint, reading
    // only the rest.
    let tasks = sim.tasks(&Bytes::from("takeover")).await.unwrap();
    let mut resumed_any = false;
    for (n, t) in tasks.iter().enumerate() {
        let done = t
            .attempts
            .iter()
            .find(|a| matches!(a.end, AttemptEnd::Done))
            .unwrap();
        let reads = sim.nodes[&done.node].reads.lock().unwrap().clone();
        let (_, _, resumed, read) = reads
            .iter()
            .find(|(task, attempt, _, _)| (*task as usize, *attempt) == (n, done.n))
            .unwrap();
        if let Some(k) = resumed {
            assert!(*k >= PAGE_KEYS as u64);
            assert_eq!(k + read.load(Ordering::SeqCst), 20_000);
            resumed_any = true;
        }
    }
    assert!(resumed_any, "{tasks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_attempt_gets_a_speculative_copy_and_only_the_first_output_counts() {
    // Node 3 answers heartbeats but its attempts read nothing for 30 s (a hung disk): each
    // gets a copy on another replica, whose output is the task's; the stuck one is cancelled.
    let sim = six_shards_over_three();
    let data = orders(3_000);
    sim.load(&data).await;
    submit(&sim, "stuck").await;
    sim.nodes[&3].slow_ms.store(30_000, Ordering::SeqCst);
    let ended = tokio::time::timeout(
        Duration::from_secs(20),
        run(&sim, Bytes::from("stuck"), 1, &quick_heartbeats()),
    )
    .await
    .expect("the job waited for a stuck attempt")
    .unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "stuck"), expected(&data));
    let tasks = sim.tasks(&Bytes::from("stuck")).await.unwrap();
    let mut copies = 0;
    for (n, t) in tasks.iter().enumerate() {
        let done: Vec<_> = t
            .attempts
            .iter()
            .filter(|a| a.end == AttemptEnd::Done)
            .collect();
        assert_eq!(
            done.len(),
            1,
            "task {n}: one output counts: {:?}",
            t.attempts
        );
        for a in &t.attempts {
            if a.node == 3 {
                assert!(
                    matches!(&a.end, AttemptEnd::Lost { reason } if reason.starts_with("cancelled: attempt")),
                    "task {n}: {a:?}"
                );
            }
        }
        if t.attempts.iter().any(|a| a.node == 3) {
            assert!(
                done[0].speculative,
                "task {n}: the copy did it: {:?}",
                t.attempts
            );
            copies += 1;
        } else {
            assert!(
                t.attempts.iter().all(|a| !a.speculative),
                "task {n}: {:?}",
                t.attempts
            );
        }
    }
    assert!(copies > 0, "no task was placed on the stuck node");
    // The stuck attempts were asked to stop (each once).
    let mut asked = sim.nodes[&3].cancels.lock().unwrap().clone();
    asked.sort();
    let mut stuck: Vec<(u32, u16)> = Vec::new();
    for (n, t) in tasks.iter().enumerate() {
        stuck.extend(
            t.attempts
                .iter()
                .filter(|a| a.node == 3)
                .map(|a| (n as u32, a.n)),
        );
    }
    assert_eq!(asked, stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_resumes_and_merges_what_was_done() {
    let sim = Sim::new(3, 3, |_| vec![1, 2, 3]);
    let data = orders(1_000);
    sim.load(&data).await;
    submit(&sim, "j3").await;
    // A first coordinator (epoch 1) claims and plans, and one task is done, then it dies.
    run_partly(&sim, "j3").await;
    // The next one (epoch 2) resumes: the done task is not run again.
    let ended = run(&sim, Bytes::from("j3"), 2, &Config::default())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "j3"), expected(&data));
    let tasks = sim.tasks(&Bytes::from("j3")).await.unwrap();
    assert_eq!(
        tasks[0].attempts.len(),
        1,
        "the task done before the takeover ran once"
    );
    assert!(
        matches!(tasks[1].attempts[0].end, AttemptEnd::Lost { .. }),
        "{:?}",
        tasks[1].attempts
    );
    // The deposed coordinator (epoch 1) can change nothing any more.
    let stale = sim
        .job(JobCommand::Publish {
            id: Bytes::from("j3"),
            epoch: 1,
            now_ms: 5,
            entries: vec![vec![(Bytes::from("type"), Bytes::from("partial"))]],
        })
        .await
        .unwrap();
    assert!(
        matches!(stale, Err(Error::Command(ref l)) if l.starts_with("STALE")),
        "{stale:?}"
    );
    // Both coordinators' pins are gone (the job's owner is the first's: it planned).
    for node in sim.nodes.values() {
        assert_eq!(node.engine.pins_held(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_after_their_commands_applied_change_nothing() {
    let sim = spread_over_three(4);
    let data = orders(1_500);
    sim.load(&data).await;
    submit(&sim, "j5").await;
    // Every third job command applies and its answer is lost: claims, the plan, attempt
    // starts and ends, publications, the result, the finish; each is retried.
    sim.lose_every.store(3, Ordering::SeqCst);
    let ended = run(&sim, Bytes::from("j5"), 1, &Config::default())
        .await
        .unwrap();
    sim.lose_every.store(0, Ordering::SeqCst);
    assert_eq!(ended, Ended::Done);
    assert_eq!(result(&sim, "j5"), expected(&data));
    for t in sim.tasks(&Bytes::from("j5")).await.unwrap() {
        assert_eq!(
            t.attempts.len(),
            1,
            "no attempt failed, none ran twice: {:?}",
            t.attempts
        );
    }
    for node in sim.nodes.values() {
        assert_eq!(node.engine.pins_held(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partials_past_a_megabyte_travel_in_chunks_and_give_the_one_pass_answer() {
    let sim = spread_over_three(2);
    let data = orders(100_000);
    sim.load(&data).await;
    // A group per key: each task's partial holds 50,000 groups, past 1 MiB.
    let spec = json!({"input": {"keyspace": "orders", "prefix": "o:"},
                      "map": {"group": {"key": true}, "values": {"a": {"json": "$.a"}}},
                      "reduce": {"total": {"sum": "a"}}})
    .to_string();
    submit_spec(&sim, "big", &spec).await;
    // Every third job command (chunks too) applies and its answer is lost; each is retried.
    sim.lose_every.store(3, Ordering::SeqCst);
    let ended = run(&sim, Bytes::from("big"), 1, &Config::default())
        .await
        .unwrap();
    sim.lose_every.store(0, Ordering::SeqCst);
    assert_eq!(ended, Ended::Done);
    let plan = Plan::new(JobSpec::parse(spec.as_bytes()).unwrap()).unwrap();
    let mut p = plan.partial();
    for (k, v) in &data {
        plan.add(&mut p, k.as_bytes(), v.as_bytes()).unwrap();
    }
    let rec = sim.record("big");
    let mut rows = Vec::new();
    for n in 0..rec.result_chunks {
        let args = [
            Bytes::from_static(JOBS_QUERY.as_bytes()),
            Bytes::from("result"),
            Bytes::from("big"),
            Bytes::from(n.to_string()),
        ];
        let Reply::Bulk(b) = sim
            .jobs
            .table(JOBS_TABLE, false)
            .query(&args, 0, 0)
            .unwrap()
        else {
            panic!("result chunk {n} missing");
        };
        let serde_json::Value::Array(chunk) = serde_json::from_slice(&b).unwrap() else {
            panic!()
        };
        rows.extend(chunk);
    }
    assert_eq!(rows.len(), 100_000);
    assert_eq!(rows, plan.rows(&p).unwrap());
    // The job has ended: its chunks are gone.
    assert_eq!(rec.partial_bytes, 0);
    for (n, t) in sim
        .tasks(&Bytes::from("big"))
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let TaskState::DoneInChunks {
            attempt, chunks, ..
        } = t.state
        else {
            panic!("task {n} is done in chunks: {:?}", t.state);
        };
        assert!(chunks >= 2, "a partial past a megabyte: {chunks} chunks");
        assert_eq!(
            sim.partial_chunk(&Bytes::from("big"), n as u32, attempt, 0)
                .await
                .unwrap(),
            None
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_and_lets_go_of_its_pins() {
    let sim = Sim::new(3, 6, |_| vec![1, 2, 3]);
    sim.load(&orders(600)).await;
    submit(&sim, "j6").await;
    sim.cancel_after.store(2, Ordering::SeqCst);
    let ended = run(&sim, Bytes::from("j6"), 1, &Config::default())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Cancelled);
    assert_eq!(sim.record("j6").state, JobState::Cancelled);
    for node in sim.nodes.values() {
        assert_eq!(node.engine.pins_held(), 0);
    }
}

/// Epoch 1: claim, pin, plan, run task 0 to completion and start task 1, then stop.
async fn run_partly(sim: &Sim, id: &str) {
    let id = Bytes::from(id.to_string());
    sim.job(JobCommand::Claim {
        id: id.clone(),
        epoch: 1,
    })
    .await
    .unwrap()
    .unwrap();
    let owner = capdb_types::jobs::pin_owner(&id, 1);
    let mut pins = Vec::new();
    for s in 1..=3 {
        pins.push(sim.pin(s, owner.clone(), 1_000).await.unwrap());
    }
    let tasks = capdb_jobs::plan::tasks(&pins);
    sim.job(JobCommand::Plan {
        id: id.clone(),
        epoch: 1,
        pins,
        tasks: tasks.clone(),
    })
    .await
    .unwrap()
    .unwrap();
    let spec = sim.record(std::str::from_utf8(&id).unwrap()).spec;
    for (n, node) in [(0u32, 2u64), (1, 3)] {
        sim.job(JobCommand::AttemptStart {
            id: id.clone(),
            epoch: 1,
            task: n,
            attempt: 1,
            node,
            speculative: false,
            now_ms: 1,
        })
        .await
        .unwrap()
        .unwrap();
    }
    let p = &tasks[0];
    let order = TaskOrder {
        job: owner,
        task: 0,
        attempt: 1,
        spec,
        shard: p.shard,
        pin_index: p.pin_index,
        from: p.from.clone(),
        to: p.to.clone(),
        resume: None,
        checkpoint_every_ms: 0,
    };
    let out = sim.run_task(2, order).await.unwrap();
    sim.job(JobCommand::AttemptEnd {
        id: id.clone(),
        epoch: 1,
        task: 0,
        attempt: 1,
        node: 2,
        outcome: capdb_types::jobs::AttemptOutcome::Done {
            keys: out.keys,
            partial: out.partial,
        },
    })
    .await
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sum_out_of_range_fails_the_job_naming_its_group() {
    let sim = Sim::new(2, 1, |_| vec![1, 2]);
    // Two sums that overflow the exact range together: the job's own data fails it.
    sim.load(&[
        ("o:1".into(), json!({"c": "x", "a": 1e29}).to_string()),
        ("o:2".into(), json!({"c": "x", "a": 1e29}).to_string()),
    ])
    .await;
    submit(&sim, "j4").await;
    let ended = run(&sim, Bytes::from("j4"), 1, &Config::default())
        .await
        .unwrap();
    match ended {
        Ended::Failed(reason) => assert!(
            reason.contains("out of range") && reason.contains(r#"["x"]"#),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(sim.record("j4").state, JobState::Failed { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_rate_limit_slows_tasks_and_max_s_ends_a_job_that_runs_past_it() {
    let sim = Sim::new(3, 3, |_| vec![1, 2, 3]);
    sim.load(&orders(600)).await;
    // 200 keys per task at 1,000 keys/s: at least 0.2 s each.
    let limited = json!({"input": {"keyspace": "orders"}, "reduce": {"n": "count"},
                         "limits": {"scan_keys_per_s": 1000}})
    .to_string();
    submit_spec(&sim, "slow", &limited).await;
    let started = std::time::Instant::now();
    assert_eq!(
        run(&sim, Bytes::from("slow"), 1, &Config::default())
            .await
            .unwrap(),
        Ended::Done
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // 200 keys per task at 50 keys/s take 4 s; the job may run 1 s.
    let too_long = json!({"input": {"keyspace": "orders"}, "reduce": {"n": "count"},
                          "limits": {"scan_keys_per_s": 50, "max_s": 1}})
    .to_string();
    submit_spec(&sim, "late", &too_long).await;
    match run(&sim, Bytes::from("late"), 1, &Config::default())
        .await
        .unwrap()
    {
        Ended::Failed(reason) => assert!(reason.contains("limits.max_s"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
