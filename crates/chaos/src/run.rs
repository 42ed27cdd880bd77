//! One chaos run, start to finish: topology, nodes, clients, nemesis schedule, final heal,
//! recovery, final reads, checking and the report.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::HarnessError;
use crate::check::{self, Validity};
use crate::cluster::Nodes;
use crate::history::{F, Stage, Workload, Writer};
use crate::nemesis::{self, Kind};
use crate::net::Topology;
use crate::report;
use crate::route::{self, Route, ShardMap, WORKLOAD_TAG};
use crate::workload::{self, Client, Keys, Mix, Recorder, Shared};

#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    pub out: PathBuf,
    pub nodes: u32,
    pub clients: u32,
    /// Target operations per second across all clients.
    pub rate: u32,
    pub workloads: Vec<Workload>,
    pub nemeses: Vec<Kind>,
    pub quiet: Duration,
    pub fault_min: Duration,
    pub fault_max: Duration,
    /// Time between the final heal and the final reads.
    pub recovery: Duration,
    /// Start the nodes with `--debug-unsafe-local-reads` (a deliberately broken mode).
    pub unsafe_reads: bool,
    /// More arguments for every `capdb server`, e.g. a testing flag that breaks a guarantee
    /// on purpose so a run can show the checkers notice.
    pub server_args: Vec<String>,
    /// The `capdb` binary to run as nodes.
    pub binary: PathBuf,
    pub limits: check::Limits,
    /// Test an `ap` keyspace instead of the `cp` default one.
    pub ap: bool,
    /// How clients choose the nodes they talk to.
    pub route: Route,
    /// Shards of the `default` keyspace (`--default-shards` of every node; 1 is the nodes'
    /// own default, and then the flag is not passed at all).
    pub shards: u32,
}

/// Shards of the `default` keyspace a run may ask for: enough to put every bank account on a
/// shard of its own, few enough that a 3-node cluster elects every leader quickly.
pub const SHARDS_MAX: u32 = 16;

/// The keyspace an `ap` run works on.
pub const AP_KEYSPACE: &str = "chaos_ap";

/// How a run ended.
pub struct Outcome {
    pub validity: Validity,
    pub report: serde_json::Value,
}

impl Outcome {
    /// 0 when every check passed, 1 otherwise (a violation, or a verdict that is unknown).
    pub fn exit_code(&self) -> i32 {
        if self.validity == Validity::Valid {
            0
        } else {
            1
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs the whole thing. Errors are harness failures (exit 2).
pub async fn run(opts: Options) -> Result<Outcome, HarnessError> {
    if !is_root() {
        return Err(HarnessError(
            "capdb chaos needs root: it creates network namespaces and nftables rules".into(),
        ));
    }
    if opts.nodes < 3 || opts.nodes > 9 {
        return Err(HarnessError("--nodes must be 3 to 9".into()));
    }
    if opts.workloads.is_empty() {
        return Err(HarnessError("no workload selected".into()));
    }
    if opts.ap && opts.workloads.contains(&Workload::Stream) {
        return Err(HarnessError(
            "the stream workload follows a cp keyspace's change stream; ap keyspaces have none yet"
                .into(),
        ));
    }
    if opts.ap && opts.workloads.iter().any(|w| w.is_register()) {
        return Err(HarnessError(
            "the register and cas workloads check linearizability, which ap keyspaces do not promise; use --workload counter,set,sadd,hset with --mode ap".into(),
        ));
    }
    // A run starts from empty nodes: data left by an earlier run in the same directory names
    // other addresses and would make a different cluster.
    let nodes_dir = opts.out.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)
            .map_err(|e| HarnessError(format!("{}: {e}", nodes_dir.display())))?;
    }
    std::fs::create_dir_all(opts.out.join("nodes"))
        .map_err(|e| HarnessError(format!("{}: {e}", opts.out.display())))?;
    let history_path = opts.out.join("history.jsonl");
    let writer = Writer::create(&history_path)
        .map_err(|e| HarnessError(format!("{}: {e}", history_path.display())))?;

    let run_id = std::process::id() % 10_000;
    let topo = Arc::new(Topology::create(run_id, opts.nodes)?);
    let mut extra = Vec::new();
    if opts.unsafe_reads {
        extra.push("--debug-unsafe-local-reads".to_string());
    }
    if opts.shards != 1 {
        extra.push(format!("--default-shards={}", opts.shards));
    }
    extra.extend(opts.server_args.iter().cloned());
    let nodes = Arc::new(Nodes::new(
        topo.clone(),
        opts.binary.clone(),
        &opts.out,
        extra,
    ));
    let result = drive(&opts, &topo, &nodes, writer).await;
    nodes.kill_all();
    topo.destroy();
    let (records, extra_problems, interrupted, crashes, recovered, convergence) = result?;

    eprintln!("chaos: checking {} history records", records.len());
    let mut verdict = check::check(&records, opts.limits).map_err(HarnessError)?;
    for p in extra_problems {
        verdict.validity = Validity::Invalid;
        verdict.problems.push(p);
    }
    let run_info = json!({
        "seed": opts.seed,
        "duration_s": opts.duration.as_secs_f64(),
        "nodes": opts.nodes,
        "shards": opts.shards,
        "clients": opts.clients,
        "rate": opts.rate,
        "mode": if opts.ap { "ap" } else { "cp" },
        "route": format!("{:?}", opts.route).to_lowercase(),
        "binary": opts.binary.display().to_string(),
        "ap_convergence_s": convergence,
        "workloads": opts.workloads,
        "nemeses": opts.nemeses.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
        "unsafe_reads": opts.unsafe_reads,
        "server_args": opts.server_args,
        "interrupted": interrupted,
        "recovered": recovered,
        "crashes": crashes,
        "files": {"history": "history.jsonl", "timeline": "timeline.svg", "node_logs": "nodes/"},
    });
    let report = report::build(&records, &verdict, run_info).map_err(HarnessError)?;
    let write = |name: &str, text: String| {
        std::fs::write(opts.out.join(name), text).map_err(|e| HarnessError(format!("{name}: {e}")))
    };
    write(
        "report.json",
        serde_json::to_string_pretty(&report).expect("json"),
    )?;
    write(
        "timeline.svg",
        report::timeline_svg(&records, opts.nodes).map_err(HarnessError)?,
    )?;
    if interrupted {
        return Err(HarnessError(format!(
            "interrupted; partial report in {}",
            opts.out.display()
        )));
    }
    Ok(Outcome {
        validity: verdict.validity,
        report,
    })
}

type Driven = (
    Vec<crate::history::Record>,
    Vec<String>,
    bool,
    Vec<String>,
    bool,
    Option<f64>,
);

/// Creates the `ap` keyspace and waits until every node knows it.
async fn create_ap_keyspace(nodes: &Nodes) -> Result<(), HarnessError> {
    let body = format!(r#"{{"name":"{AP_KEYSPACE}","mode":"ap","replication_factor":3}}"#);
    match crate::cluster::http(&nodes.http_addr(1), "POST", "/v1/keyspaces", Some(&body)).await {
        Ok((201 | 409, _)) => {}
        other => {
            return Err(HarnessError(format!(
                "creating the ap keyspace failed: {other:?}"
            )));
        }
    }
    for i in 1..=nodes.count() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let path = format!("/v1/keyspaces/{AP_KEYSPACE}");
        while !matches!(
            crate::cluster::http(&nodes.http_addr(i), "GET", &path, None).await,
            Ok((200, _))
        ) {
            if Instant::now() > deadline {
                return Err(HarnessError(format!("node {i} never saw the ap keyspace")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Waits until every node reports the same replica digest of the `ap` keyspace; returns the
/// seconds that took, or `None` after 60 s.
async fn wait_converged(nodes: &Nodes) -> Option<f64> {
    let started = Instant::now();
    let path = format!("/v1/keyspaces/{AP_KEYSPACE}/digest");
    while started.elapsed() < Duration::from_secs(60) {
        // Each node reports the shards it holds; every shard's replicas must agree.
        let mut by_shard: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        let mut all_answered = true;
        for i in 1..=nodes.count() {
            match crate::cluster::http(&nodes.http_addr(i), "GET", &path, None).await {
                Ok((200, body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    for s in v["shards"].as_array().into_iter().flatten() {
                        by_shard
                            .entry(s["shard"].as_u64().unwrap_or(u64::MAX))
                            .or_default()
                            .push(s["digest"].as_str().unwrap_or_default().to_string());
                    }
                }
                _ => all_answered = false,
            }
        }
        let agree = by_shard
            .values()
            .all(|d| d.len() >= 2 && d.windows(2).all(|w| w[0] == w[1]));
        if all_answered && !by_shard.is_empty() && agree {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Drives a run on its topology and nodes: starts the cluster and the clients, runs the
/// nemesis schedule, heals, lets the cluster recover, and makes the final reads. Returns the
/// history and what the run itself found.
async fn drive(
    opts: &Options,
    topo: &Arc<Topology>,
    nodes: &Arc<Nodes>,
    writer: Writer,
) -> Result<Driven, HarnessError> {
    start_cluster(opts, topo, nodes).await?;
    let mut interrupt = watch_interrupts();
    // The stream workload's log and groups exist before the first write.
    let stream_start = if opts.workloads.contains(&Workload::Stream) {
        Some(crate::stream::set_up(nodes).await?)
    } else {
        None
    };
    // The view workload's view exists before the first write (it builds under the nemeses).
    if opts.workloads.contains(&Workload::View) {
        crate::view::set_up(nodes).await?;
    }
    let (shared, clients) = start_clients(opts, nodes, writer).await?;
    let readers = stream_start
        .map(|start| crate::stream::start(shared.clone(), nodes.clone(), start, opts.seed));
    let plan = nemesis::plan(
        opts.seed,
        opts.duration,
        &opts.nemeses,
        opts.nodes,
        opts.quiet,
        (opts.fault_min, opts.fault_max),
    );
    let started = Instant::now();
    let (mut interrupted, mut crashes) =
        run_windows(opts, &plan, topo, nodes, &shared, &mut interrupt, started).await?;
    check_crashes(nodes, &shared, &mut crashes);

    // Final heal, then recovery with the workload still running, then the final reads.
    nemesis::heal_all(topo, nodes).await?;
    nemesis::reset_clocks(nodes).await;
    shared
        .recorder
        .nemesis("start", 0, "final heal and recovery");
    eprintln!(
        "chaos: [{:>5.1}s] final heal; recovering for {} s",
        started.elapsed().as_secs_f64(),
        opts.recovery.as_secs()
    );
    if !interrupted {
        tokio::select! {
            _ = tokio::time::sleep(opts.recovery) => {}
            _ = interrupt.changed() => { interrupted = true; }
        }
    }
    clients.stop().await;
    let stream_log = match readers {
        Some(r) if !interrupted => Some(crate::stream::finish(r, nodes).await),
        _ => None,
    };
    let convergence = if opts.ap && !interrupted {
        let c = wait_converged(nodes).await;
        match c {
            Some(s) => {
                eprintln!("chaos: ap replicas converged {s:.1} s after the workload stopped")
            }
            None => eprintln!("chaos: ap replicas did NOT converge within 60 s"),
        }
        c
    } else {
        None
    };
    shared
        .recorder
        .nemesis("stop", 0, "final heal and recovery");
    let recovered = if interrupted {
        false
    } else {
        final_reads(&shared, nodes, opts.clients as u64, opts.ap).await
    };
    let mut problems = Vec::new();
    if opts.ap && !interrupted && convergence.is_none() {
        problems.push(
            "ap replicas did not converge: digests still differed 60 s after the final heal".into(),
        );
    }
    if !recovered && !interrupted {
        problems.push(
            "the cluster did not recover: some final read failed for 60 s after the heal".into(),
        );
    }
    if opts.workloads.contains(&Workload::View) && !interrupted {
        let (found, details) = crate::view::check(nodes).await;
        eprintln!("chaos: view workload: {details}");
        for p in &found {
            eprintln!("chaos: view: {p}");
        }
        problems.extend(found.into_iter().map(|p| format!("view: {p}")));
    }
    check_crashes(nodes, &shared, &mut crashes);
    problems.extend(crashes.iter().cloned());
    let records = shared.recorder.finish();
    if let Some(log) = stream_log {
        let ops = crate::history::pair(&records).map_err(HarnessError)?;
        let (found, details) = check::stream::check(&ops, &log);
        eprintln!("chaos: stream workload: {details}");
        for p in &found {
            eprintln!("chaos: stream: {p}");
        }
        problems.extend(found.into_iter().map(|p| format!("stream: {p}")));
    }
    Ok((
        records,
        problems,
        interrupted,
        crashes,
        recovered,
        convergence,
    ))
}

/// Starts every node and waits until they are ready and every shard has a leader; creates
/// the `ap` keyspace for `ap` runs.
async fn start_cluster(opts: &Options, topo: &Topology, nodes: &Nodes) -> Result<(), HarnessError> {
    let n = opts.nodes;
    for i in 1..=n {
        nodes.start(i)?;
    }
    eprintln!(
        "chaos: {n} nodes starting in namespaces {}..",
        topo.namespace(1)
    );
    nodes.wait_ready(Duration::from_secs(60)).await?;
    // Every shard needs a leader before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let all_led = |shards: Option<Vec<route::Shard>>| {
        shards.is_some_and(|s| {
            s.len() == opts.shards as usize && s.iter().all(|s| s.leader.is_some())
        })
    };
    while !all_led(nodes.shards().await) {
        if Instant::now() > deadline {
            return Err(HarnessError(format!(
                "not every one of the {} shards of keyspace default had a leader within 30 s",
                opts.shards
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    if opts.ap {
        create_ap_keyspace(nodes).await?;
    }
    Ok(())
}

/// Turns true on Ctrl-C or SIGTERM.
fn watch_interrupts() -> watch::Receiver<bool> {
    let (interrupt_tx, interrupt) = watch::channel(false);
    tokio::spawn(async move {
        // Without a SIGTERM handler (cannot happen on Linux, but never panic) Ctrl-C still works.
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let sigterm = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm => {}
        }
        eprintln!("chaos: interrupted; cleaning up");
        let _ = interrupt_tx.send(true);
    });
    interrupt
}

/// The running client loops and the shard map watcher.
struct Clients {
    stop: watch::Sender<bool>,
    watcher: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    /// Stops the clients and the watcher, and waits for them.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.watcher.await;
    }
}

/// Sets up what the clients share (recording to `writer`), sets the bank's accounts when that
/// workload runs, starts the shard map watcher and `opts.clients` client loops, spread over
/// the nodes.
async fn start_clients(
    opts: &Options,
    nodes: &Arc<Nodes>,
    writer: Writer,
) -> Result<(Arc<Shared>, Clients), HarnessError> {
    let n = opts.nodes;
    let weights: Vec<(Workload, u32)> = opts
        .workloads
        .iter()
        .map(|w| (*w, if w.is_register() { 2 } else { 1 }))
        .collect();
    let shared = Arc::new(Shared {
        recorder: Recorder::new(writer),
        keys: Mutex::new({
            let mut k = Keys::new((opts.clients / 3).max(2), 2, 2);
            k.ap = opts.ap;
            k
        }),
        mix: Mix { workloads: weights },
        clients: opts.clients as u64,
        route: opts.route,
        addrs: (1..=n).map(|i| nodes.resp_addr(i)).collect(),
        shards: ShardMap::default(),
        forwarded_in_flight: Default::default(),
    });
    // Roles and routing need the shard map from the first operation on.
    if let Some(map) = nodes.shards().await {
        shared.shards.set(map);
    }
    if opts.workloads.contains(&Workload::Bank) {
        set_up_bank(&shared, nodes, opts.clients as u64).await?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = {
        let (shared, nodes, stop) = (shared.clone(), nodes.clone(), stop_rx.clone());
        tokio::spawn(async move { route::watch(&nodes, &shared.shards, stop).await })
    };
    let interval = Duration::from_secs_f64(opts.clients as f64 / opts.rate.max(1) as f64);
    let mut tasks = Vec::new();
    for c in 0..opts.clients {
        let node = c % n + 1;
        let client = if opts.ap {
            Client::ap(node, nodes.resp_addr(node), AP_KEYSPACE)
        } else {
            Client::new(node, nodes.resp_addr(node))
        };
        tasks.push(tokio::spawn(workload::client_loop(
            shared.clone(),
            c as u64,
            client,
            opts.seed.wrapping_mul(1000).wrapping_add(c as u64),
            interval,
            stop_rx.clone(),
        )));
    }
    let clients = Clients {
        stop: stop_tx,
        watcher,
        tasks,
    };
    Ok((shared, clients))
}

/// Sets every bank account to its initial balance (the recorded setup operation), retrying
/// for up to 60 s: no fault has started yet, so a cluster that cannot do it is a harness
/// failure, not a finding.
async fn set_up_bank(shared: &Shared, nodes: &Nodes, clients: u64) -> Result<(), HarnessError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    // Process ids after the clients' own, before the final reads'.
    let mut process = 500_000_000 + clients;
    let mut client = Client::new(1, nodes.resp_addr(1));
    loop {
        let (stage, _) =
            workload::perform(shared, &mut client, process, workload::bank_setup()).await;
        if stage == Stage::Ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError(
                "could not set the bank's initial balances within 60 s".into(),
            ));
        }
        process += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Records and reports nodes that exited on their own since the last look.
fn check_crashes(nodes: &Nodes, shared: &Shared, crashes: &mut Vec<String>) {
    for (i, code) in nodes.exited() {
        let msg = format!("node {i} exited on its own ({code}); see nodes/node-{i}.log");
        eprintln!("chaos: {msg}");
        shared.recorder.nemesis("crash", 0, &msg);
        crashes.push(msg);
    }
}

/// Runs the nemesis `plan` (times from `started`), then waits out the run's duration. Returns
/// whether the run was interrupted, and the crashes seen at each window's start.
async fn run_windows(
    opts: &Options,
    plan: &[nemesis::Window],
    topo: &Topology,
    nodes: &Nodes,
    shared: &Shared,
    interrupt: &mut watch::Receiver<bool>,
    started: Instant,
) -> Result<(bool, Vec<String>), HarnessError> {
    let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0x7461726765747321);
    let mut crashes = Vec::new();
    let mut interrupted = false;
    let sleep_until = |at: Duration| tokio::time::sleep_until((started + at).into());
    for window in plan {
        tokio::select! {
            _ = sleep_until(window.start) => {}
            _ = interrupt.changed() => { interrupted = true; break; }
        }
        check_crashes(nodes, shared, &mut crashes);
        let aim = nemesis::Aim {
            forwarded_in_flight: &shared.forwarded_in_flight,
            slot: route::key_slot(&format!("{{{WORKLOAD_TAG}}}")),
        };
        let (text, undo) = nemesis::apply(window, topo, nodes, &mut rng, &aim).await?;
        eprintln!(
            "chaos: [{:>5.1}s] window {} starts: {text}",
            started.elapsed().as_secs_f64(),
            window.number
        );
        shared.recorder.nemesis("start", window.number, &text);
        tokio::select! {
            _ = sleep_until(window.end) => {}
            _ = interrupt.changed() => { interrupted = true; }
        }
        nemesis::revert(undo, topo, nodes).await?;
        shared.recorder.nemesis("stop", window.number, &text);
        eprintln!(
            "chaos: [{:>5.1}s] window {} healed",
            started.elapsed().as_secs_f64(),
            window.number
        );
        if interrupted {
            break;
        }
    }
    if !interrupted {
        tokio::select! {
            _ = sleep_until(opts.duration) => {}
            _ = interrupt.changed() => { interrupted = true; }
        }
    }
    Ok((interrupted, crashes))
}

/// Reads every key ever used, retrying each for up to 60 s in all. Returns whether all
/// succeeded.
async fn final_reads(shared: &Shared, nodes: &Nodes, clients: u64, ap: bool) -> bool {
    let keys: Vec<(Workload, String)> = shared
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .used
        .iter()
        // The stream workload's writes are checked through the change stream.
        // The view workload's, through the view (`crate::view::check`).
        .filter(|(w, _)| *w != Workload::Stream && *w != Workload::View)
        .cloned()
        .collect();
    let elements = shared
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .elements
        .clone();
    let append_reads = shared
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .final_append_reads();
    eprintln!("chaos: final reads of {} keys", keys.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut process = 1_000_000_000 + clients;
    let mut all_ok = true;
    for (k, (w, key)) in keys.into_iter().enumerate() {
        let node = (k as u32 % nodes.count()) + 1;
        let mut client = if ap {
            let mut c = Client::ap(node, nodes.resp_addr(node), AP_KEYSPACE);
            c.set_elements = elements.clone();
            c
        } else {
            Client::new(node, nodes.resp_addr(node))
        };
        // The `append` workload reads every list it used in one transaction.
        let (f, value) = if w == Workload::Append {
            (F::Txn, append_reads.clone())
        } else {
            (F::Read, serde_json::Value::Null)
        };
        loop {
            let op = workload::Invocation {
                workload: w,
                f,
                key: key.clone(),
                value: value.clone(),
                final_read: true,
            };
            let (stage, _) = workload::perform(shared, &mut client, process, op).await;
            process += 1;
            if stage == Stage::Ok {
                break;
            }
            if Instant::now() > deadline {
                all_ok = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    all_ok
}
