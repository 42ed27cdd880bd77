//! `capdb bench views`: what incremental views cost writes (issue 15: one synchronous view
//! costs at most 10 % of write throughput), on a 3-node local cluster and a `cp` keyspace of
//! 2 shards, in one run.
//!
//! `--clients` connections (spread over the nodes) send pipelines of 16 SETs of ~100-byte
//! JSON orders (`{"c": country, "a": amount, ...}` under `o:`) for `--seconds`, with no view,
//! one view of sums (count, sum, avg by country), one of extremes (min, max by country: kept as
//! multisets, a row per distinct amount), four views kept, and one Lua view of sums (kept
//! asynchronously from the change log: its cost is the log with previous values and the
//! leaders' updates) ([`SETTINGS`]), for `--rounds`
//! rounds, each setting run between two runs with no view, from an empty keyspace
//! (FLUSHDB before each run: throughput drifts down as the files grow, by more than a view
//! costs; a cost is judged against its neighbours), the order of the settings alternating. Before a run with views they are
//! created and waited for until built; after it they are dropped. Reported: the medians, each
//! setting's cost against none, and the nodes' CPU time per write (user + system).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::bench::NodeProc;

/// Options of `capdb bench views`.
#[derive(clap::Args)]
pub struct ViewsArgs {
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (each: a run of every setting, the order alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections of the throughput runs.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// The settings with views to run, by their row in the table (1 = sums, 2 = min/max,
    /// 3 = four views, 4 = Lua), comma-separated; runs with no view always go between them.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 3, 4])]
    settings: Vec<usize>,
    /// Writes per second offered over all clients (0: as fast as they are answered). At a
    /// rate the nodes keep up with, every run does the same work per second, and a view's cost
    /// shows as the nodes' CPU per write, free of the swings of a saturated machine (where
    /// throughput follows CPU, and the runs with no view move by ±15 % between neighbours);
    /// the target is then judged on CPU per write.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Keep the cluster's data and logs in this directory (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

const KEYSPACE: &str = "orders";
const SHARDS: usize = 2;
const PIPELINE: usize = 16;
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// The views the runs keep, by setting ([`SETTINGS`]).
const VIEWS: [(&str, &str); 5] = [
    (
        "sums",
        r#"{"input": {"prefix": "o:"}, "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
            "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"}}}"#,
    ),
    (
        "extremes",
        r#"{"input": {"prefix": "o:"}, "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
            "reduce": {"low": {"min": "a"}, "high": {"max": "a"}}}"#,
    ),
    (
        "by_client",
        r#"{"input": {"prefix": "o:"}, "map": {"group": [{"key_part": {"sep": ":", "index": 1}}]},
            "reduce": {"n": "count"}}"#,
    ),
    (
        "by_sku",
        r#"{"input": {"prefix": "o:"}, "map": {"group": [{"json": "$.sku"}], "values": {"a": {"json": "$.a"}}},
            "reduce": {"mean": {"avg": "a"}}}"#,
    ),
    (
        "lua_sums",
        r#"{"input": {"prefix": "o:"},
            "map": {"lua": {"source": "function map(k, v) local o = capdb.json_decode(v) if o then emit(o.c, {a = o.a}) end end"}, "values": ["a"]},
            "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"}}}"#,
    ),
];

/// What each run keeps: its label and the views (indexes into [`VIEWS`]).
const SETTINGS: [(&str, &[usize]); 5] = [
    ("no view", &[]),
    ("1 view: count, sum, avg by country", &[0]),
    ("1 view: min, max by country (multisets)", &[1]),
    (
        "4 views (the two above, count by client, avg by sku)",
        &[0, 1, 2, 3],
    ),
    ("1 Lua view (async): count, sum, avg by country", &[4]),
];

/// Runs `capdb bench views` (see the module doc).
pub async fn views(args: ViewsArgs) -> Result<(), String> {
    if args.seconds == 0 || args.clients == 0 || args.rounds == 0 {
        return Err("--seconds, --clients and --rounds must be at least 1".into());
    }
    if args.settings.is_empty()
        || args
            .settings
            .iter()
            .any(|s| !(1..SETTINGS.len()).contains(s))
    {
        return Err(format!(
            "--settings takes rows 1 to {} of the table (1 = sums, 2 = min/max, 3 = four views, 4 = Lua), comma-separated",
            SETTINGS.len() - 1
        ));
    }
    crate::bench::on_local_cluster("views", args.work_dir.clone(), async |nodes| {
        run(&args, nodes).await
    })
    .await
}

async fn connect(addr: &str) -> Result<MultiplexedConnection, String> {
    crate::bench::connect_keyspace(addr, KEYSPACE).await
}

async fn setup(nodes: &[NodeProc]) -> Result<(), String> {
    let until = Instant::now() + SETUP_DEADLINE;
    crate::bench::set_up_cp_keyspace(nodes, KEYSPACE, SHARDS, until).await
}

/// Creates the views `keep` names and waits until they are built; drops the others.
async fn keep_views(nodes: &[NodeProc], keep: &[usize]) -> Result<(), String> {
    let mut conn = connect(&nodes[0].resp).await?;
    for (i, (name, spec)) in VIEWS.iter().enumerate() {
        if keep.contains(&i) {
            redis::cmd("VIEW")
                .arg("CREATE")
                .arg(name)
                .arg(spec)
                .query_async::<redis::Value>(&mut conn)
                .await
                .map_err(|e| format!("VIEW CREATE {name}: {e}"))?;
        } else {
            redis::cmd("VIEW")
                .arg("DROP")
                .arg(name)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| format!("VIEW DROP {name}: {e}"))?;
        }
    }
    let until = Instant::now() + Duration::from_secs(600);
    for (name, _) in keep.iter().map(|i| VIEWS[*i]) {
        loop {
            // TRYAGAIN while leaders change is waited out like a build.
            let info: redis::RedisResult<redis::Value> = redis::cmd("VIEW")
                .arg("INFO")
                .arg(name)
                .query_async(&mut conn)
                .await;
            let shown = format!("{info:?}");
            if shown.contains("\"ready\"") {
                break;
            }
            // A view past its bounds is not kept: the run would measure nothing.
            if shown.contains("overflow") {
                return Err(format!("view {name} overflowed: {shown}"));
            }
            if Instant::now() > until {
                return Err(format!("view {name} not built in 10 min: {info:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// SET pipelines of JSON orders from `clients` connections for `seconds`: writes per second.
async fn throughput(
    nodes: &[NodeProc],
    clients: usize,
    seconds: u64,
    round: usize,
    rate: u64,
) -> Result<f64, String> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    // Each client's time between pipelines at `rate` (none: as soon as answered).
    let period =
        (rate > 0).then(|| Duration::from_secs_f64((PIPELINE * clients) as f64 / rate as f64));
    for c in 0..clients {
        let mut conn = connect(&nodes[c % nodes.len()].resp).await?;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut failed = 0u64;
            let mut n = 0u64;
            let mut rng = fastrand::Rng::with_seed((round * 1_000 + c) as u64);
            // Late ticks are not caught up in a burst: a client behind sends at once, then
            // keeps the period.
            let mut pace = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < until {
                // A pace slower than the run ends the client's run at its end, not at the
                // next tick.
                if let Some(t) = pace.as_mut()
                    && tokio::time::timeout_at(tokio::time::Instant::from_std(until), t.tick())
                        .await
                        .is_err()
                {
                    break;
                }
                let mut pipe = redis::pipe();
                for _ in 0..PIPELINE {
                    // Amounts in half units up to 1,000: at most 2,000 distinct per country,
                    // so the min/max multisets stay far below their bound per shard.
                    let value = format!(
                        r#"{{"c":"c{}","a":{}.{},"sku":"s{}","note":"bench order padding"}}"#,
                        rng.u8(0..100),
                        rng.u32(0..1_000),
                        if rng.bool() { "5" } else { "0" },
                        rng.u16(0..1_000)
                    );
                    pipe.cmd("SET").arg(format!("o:{c}:{round}:{n}")).arg(value);
                    n += 1;
                }
                // A refused or uncertain pipeline (a leader change under load) is counted, not
                // fatal: the run says how many there were.
                match pipe.query_async::<()>(&mut conn).await {
                    Ok(()) => done += PIPELINE as u64,
                    Err(_) => failed += 1,
                }
            }
            Ok::<(u64, u64), String>((done, failed))
        }));
    }
    let (mut total, mut failed) = (0, 0);
    for t in tasks {
        let (d, f) = t.await.map_err(|e| e.to_string())??;
        total += d;
        failed += f;
    }
    if failed > 0 {
        eprintln!("  ({failed} pipelines failed: refused or uncertain)");
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn run(args: &ViewsArgs, nodes: &[NodeProc]) -> Result<(), String> {
    setup(nodes).await?;
    let mut round_last: Option<(usize, f64)> = None;
    let mut ops: Vec<Vec<f64>> = vec![Vec::new(); SETTINGS.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); SETTINGS.len()];
    // Each setting's cost against the runs with no view just before and just after it:
    // throughput drifts over a run (the files grow), by more than a view costs.
    let mut paired: Vec<Vec<f64>> = vec![Vec::new(); SETTINGS.len()];
    // The same for CPU per write (with the run's value, if the nodes' CPU could be read).
    let mut paired_cpu: Vec<Vec<f64>> = vec![Vec::new(); SETTINGS.len()];
    let mut cpu_last: (Option<f64>, Option<f64>) = (None, None);
    for round in 0..args.rounds {
        let mut with_views: Vec<usize> = (1..SETTINGS.len())
            .filter(|s| args.settings.contains(s))
            .collect();
        if round % 2 == 1 {
            with_views.reverse();
        }
        // none, a, none, b, none, ...: every setting between two runs with none.
        let mut order = vec![0];
        for s in with_views {
            order.push(s);
            order.push(0);
        }
        for (at, s) in order.into_iter().enumerate() {
            // Every run starts from an empty keyspace, so that none writes into bigger
            // files than another (views stay across FLUSHDB, empty and built).
            let mut conn = connect(&nodes[0].resp).await?;
            redis::cmd("FLUSHDB")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| format!("FLUSHDB: {e}"))?;
            keep_views(nodes, SETTINGS[s].1).await?;
            let cpu_before = crate::bench_changes::nodes_cpu_seconds(nodes);
            let w = throughput(nodes, args.clients, args.seconds, round, args.rate).await?;
            let c = cpu_before
                .zip(crate::bench_changes::nodes_cpu_seconds(nodes))
                .map(|(b, a)| (a - b) * 1e6 / (w * args.seconds as f64));
            eprintln!(
                "  SET pipelines, {}: {w:.0} writes/s{}",
                SETTINGS[s].0,
                c.map(|c| format!(", {c:.0} µs of node CPU per write"))
                    .unwrap_or_default()
            );
            ops[s].push(w);
            if let Some(c) = c {
                cpu[s].push(c);
            }
            // A run with none closes the pair of the setting before it.
            if s == 0 && at > 0 {
                let n = ops[0].len();
                let (before, after) = (ops[0][n - 2], ops[0][n - 1]);
                let with = round_last.take().ok_or("a pair without its setting")?;
                paired[with.0].push(1.0 - with.1 / ((before + after) / 2.0));
                if let (Some(b), Some(v), Some(a)) = (cpu_last.0, cpu_last.1, c) {
                    paired_cpu[with.0].push(v / ((b + a) / 2.0) - 1.0);
                }
                cpu_last = (c, None);
            } else if s != 0 {
                round_last = Some((s, w));
                cpu_last.1 = c;
            } else {
                cpu_last = (c, None);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        match v.len() {
            0 => f64::NAN,
            n if n.is_multiple_of(2) => (v[mid - 1] + v[mid]) / 2.0,
            _ => v[mid],
        }
    };
    // The check the views were right all along: each equals what VERIFY recomputes.
    keep_views(nodes, &[0, 1, 2, 3, 4]).await?;
    let mut conn = connect(&nodes[1].resp).await?;
    let mut drift = 0i64;
    for (name, _) in VIEWS {
        let v: redis::Value = redis::cmd("VIEW")
            .arg("VERIFY")
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("VIEW VERIFY {name}: {e}"))?;
        let text = format!("{v:?}");
        if !text.contains("int(0)") && !text.contains("Int(0)") {
            drift += 1;
            eprintln!("  VIEW VERIFY {name}: {text}");
        }
    }
    println!();
    let offered = match args.rate {
        0 => "as fast as answered".to_string(),
        r => format!("{r} writes/s offered: the target judged on CPU per write"),
    };
    println!(
        "### Incremental views: write cost (3 nodes, cp keyspace of {SHARDS} shards x 3 replicas, {} clients x pipelines of {PIPELINE} SETs of ~100-byte JSON, {offered}, {} s per run, {} rounds)",
        args.clients, args.seconds, args.rounds
    );
    println!();
    println!(
        "| views kept | SET writes/s (median) | cost vs the runs with none beside it (median) | nodes' CPU per write | CPU per write vs the runs beside it (median) | target | met |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let base_cpu = median(&cpu[0]);
    for (i, (label, views)) in SETTINGS.iter().enumerate() {
        if i != 0 && !args.settings.contains(&i) {
            continue;
        }
        let w = median(&ops[i]);
        let cost = if i == 0 { 0.0 } else { median(&paired[i]) };
        let cpu_cost = if i == 0 { 0.0 } else { median(&paired_cpu[i]) };
        let c = median(&cpu[i]);
        let judged = if args.rate > 0 { cpu_cost } else { cost };
        let (target, met) = match views.len() {
            1 => ("<= 10 %", if judged <= 0.10 { "yes" } else { "**no**" }),
            _ => ("", ""),
        };
        println!(
            "| {label} | {w:.0} | {:.1} % | {c:.0} µs ({:+.1} %) | {:+.1} % | {target} | {met} |",
            cost * 100.0,
            (c / base_cpu - 1.0) * 100.0,
            cpu_cost * 100.0
        );
    }
    // Every round's pair, so that the spread shows beside the median.
    for i in 1..SETTINGS.len() {
        if !args.settings.contains(&i) {
            continue;
        }
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.iter()
                .map(|x| format!("{:.1}", x * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!();
        println!(
            "{}: per round, throughput cost {} %; CPU per write {} %",
            SETTINGS[i].0,
            sorted(&paired[i]),
            sorted(&paired_cpu[i])
        );
    }
    println!();
    println!(
        "VIEW VERIFY after the runs: {}",
        if drift == 0 {
            "every view equals its recomputation".to_string()
        } else {
            format!("**{drift} views drifted**")
        }
    );
    if drift > 0 {
        return Err("a view drifted from its data".into());
    }
    Ok(())
}
