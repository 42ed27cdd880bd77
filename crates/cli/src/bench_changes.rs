//! `capdb bench changes`: what change streams cost and how fast they deliver (issue 14), on a
//! 3-node local cluster and a `cp` keyspace of 2 shards, in one run:
//!
//! 1. **Write throughput, changes off vs on**: `--clients` connections (spread over the nodes)
//!    send pipelines of 16 SETs for `--seconds`, for `--rounds` rounds of one run each way;
//!    the medians and their ratio (the target: on costs at most 10 %), and each
//!    round's own cost (runs of the same setting differ by up to ±10 % on a loaded 2-core
//!    machine: more rounds, a steadier median). Rounds alternate their order (off then on,
//!    on then off, ...), because throughput drifts down over a run as the files grow, which
//!    would otherwise count against whichever setting always runs second. Also the nodes' CPU
//!    time per write (user + system, from `/proc/<pid>/stat`), which the machine's noise moves
//!    less than throughput.
//! 2. **Commit-to-XREAD latency**: one writer sends SETs through node 1 at `--rate` per second;
//!    a consumer per shard on node 2 follows with `XREAD BLOCK`. Latency = when the consumer
//!    got the event minus when the writer got the write's `+OK` (0 when the event came first,
//!    which pulls the p50 down), p50 and p99 (targets: 2 ms and 20 ms on loopback). Every
//!    node holds a replica of both shards here; a node without one looks every 10 ms.
//! 3. **Catch-up**: `--catchup-events` SETs written first, then one consumer reads them all
//!    from every shard's stream with `XREAD COUNT 1000`: events per second.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::bench::NodeProc;

/// Options of `capdb bench changes`.
#[derive(clap::Args)]
pub struct ChangesArgs {
    /// Seconds per throughput run (`--rounds` of one off and one on) and of the latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of throughput runs (each: changes off and on, the order alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections of the throughput runs.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Writes per second of the latency run.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Events the catch-up reader reads from the start.
    #[arg(long, default_value_t = 50_000)]
    catchup_events: usize,
    /// Keep the cluster's data and logs in this directory (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

const KEYSPACE: &str = "streams";
const SHARDS: usize = 2;
const PIPELINE: usize = 16;
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `capdb bench changes` (see the module doc).
pub async fn changes(args: ChangesArgs) -> Result<(), String> {
    if args.seconds == 0 || args.clients == 0 || args.rate == 0 || args.rounds == 0 {
        return Err("--seconds, --clients, --rate and --rounds must be at least 1".into());
    }
    crate::bench::on_local_cluster("changes", args.work_dir.clone(), async |nodes| {
        run(&args, nodes).await
    })
    .await
}

async fn connect(addr: &str) -> Result<MultiplexedConnection, String> {
    crate::bench::connect_keyspace(addr, KEYSPACE).await
}

async fn setup(nodes: &[NodeProc]) -> Result<Vec<String>, String> {
    let until = Instant::now() + SETUP_DEADLINE;
    crate::bench::set_up_cp_keyspace(nodes, KEYSPACE, SHARDS, until).await?;
    let mut conn = connect(&nodes[0].resp).await?;
    let keys: Vec<String> = redis::cmd("CHANGES")
        .arg("SHARDS")
        .arg(KEYSPACE)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("CHANGES SHARDS: {e}"))?;
    Ok(keys)
}

async fn switch(nodes: &[NodeProc], on: bool) -> Result<(), String> {
    let mut conn = connect(&nodes[0].resp).await?;
    redis::cmd("CHANGES")
        .arg("CONFIG")
        .arg(KEYSPACE)
        .arg(if on { "on" } else { "off" })
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("CHANGES CONFIG: {e}"))
}

/// SET pipelines from `clients` connections for `seconds`: writes per second.
async fn throughput(nodes: &[NodeProc], clients: usize, seconds: u64) -> Result<f64, String> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut conn = connect(&nodes[c % nodes.len()].resp).await?;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut n = 0u64;
            while Instant::now() < until {
                let mut pipe = redis::pipe();
                for _ in 0..PIPELINE {
                    pipe.cmd("SET")
                        .arg(format!("t:{c}:{n}"))
                        .arg("0123456789abcdef");
                    n += 1;
                }
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| format!("SET pipeline: {e}"))?;
                done += PIPELINE as u64;
            }
            Ok::<u64, String>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The entries of an XREAD reply, every key's in turn: (ID, the `key` field).
fn xread_entries(reply: &redis::Value) -> Vec<(String, Option<String>)> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let per_key: Vec<&Value> = match reply {
        Value::Array(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for item in per_key {
        let entries = match item {
            Value::Array(kv) if kv.len() == 2 => &kv[1],
            other => other,
        };
        let Value::Array(entries) = entries else {
            continue;
        };
        for e in entries {
            let Value::Array(pair) = e else { continue };
            let (Some(id), Some(Value::Array(fields))) = (pair.first().and_then(text), pair.get(1))
            else {
                continue;
            };
            let key = fields
                .chunks(2)
                .find(|f| text(&f[0]).as_deref() == Some("key"))
                .and_then(|f| f.get(1).and_then(text));
            out.push((id, key));
        }
    }
    out
}

/// Where each of `streams` stands now (exclusive starts): each shard's last ID, or for the
/// merged stream (a single `__changes:<ks>` key) its resolved ID.
async fn starts(
    conn: &mut MultiplexedConnection,
    streams: &[String],
) -> Result<Vec<String>, String> {
    if streams.len() == 1 && !streams[0].contains('#') {
        let resolved: String = redis::cmd("CHANGES")
            .arg("RESOLVED")
            .arg(KEYSPACE)
            .query_async(conn)
            .await
            .map_err(|e| format!("CHANGES RESOLVED: {e}"))?;
        return Ok(vec![resolved]);
    }
    crate::changes::last_ids(conn, KEYSPACE).await
}

/// Commit-to-XREAD latencies (µs) of writes at `rate` per second for `seconds`, read from
/// each shard's stream or (`streams` = the merged key alone) the merged stream.
async fn latency(
    nodes: &[NodeProc],
    streams: &[String],
    rate: u64,
    seconds: u64,
) -> Result<Vec<u64>, String> {
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut consumers = Vec::new();
    for (shard, key) in streams.iter().enumerate() {
        let mut conn = connect(&nodes[1 % nodes.len()].resp).await?;
        let (key, seen, stop) = (key.clone(), seen.clone(), stop.clone());
        // Each consumer starts after its stream's position now (not `$` again on every call,
        // which would skip what lands between two calls).
        let start = starts(&mut conn, streams)
            .await?
            .get(shard)
            .cloned()
            .ok_or("CHANGES LAST answered fewer shards than CHANGES SHARDS")?;
        consumers.push(tokio::spawn(async move {
            let mut from = start;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got: redis::Value = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&from)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("XREAD {key}: {e}"))?;
                let now = Instant::now();
                for (id, key) in xread_entries(&got) {
                    if let Some(k) = key {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(k)
                            .or_insert(now);
                    }
                    from = id;
                }
            }
            Ok::<(), String>(())
        }));
    }
    // Let every consumer resolve `$` before the first write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut writer = connect(&nodes[0].resp).await?;
    let interval = Duration::from_micros(1_000_000 / rate);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    let mut i = 0u64;
    while Instant::now() < until {
        let key = format!("lat:{i}");
        redis::cmd("SET")
            .arg(&key)
            .arg("x")
            .query_async::<()>(&mut writer)
            .await
            .map_err(|e| format!("SET: {e}"))?;
        acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now());
        i += 1;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    // Give the last events time to arrive, then stop the consumers.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in consumers {
        c.await.map_err(|e| e.to_string())??;
    }
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let missing = acked.keys().filter(|k| !seen.contains_key(*k)).count();
    if missing > 0 {
        return Err(format!(
            "{missing} of {} acknowledged writes never reached a consumer",
            acked.len()
        ));
    }
    let mut out: Vec<u64> = acked
        .iter()
        .map(|(k, at)| seen[k].saturating_duration_since(*at).as_micros() as u64)
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Writes `events` SETs, then reads every shard's stream from the start: events per second.
async fn catch_up(
    nodes: &[NodeProc],
    streams: &[String],
    events: usize,
) -> Result<(usize, f64), String> {
    let mut conn = connect(&nodes[0].resp).await?;
    // Where each stream stands before the writes: the reader reads everything after it.
    let starts = starts(&mut conn, streams).await?;
    for chunk in (0..events).collect::<Vec<_>>().chunks(256) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("c:{i}"))
                .arg("0123456789abcdef");
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("SET pipeline: {e}"))?;
    }
    let mut reader = connect(&nodes[1 % nodes.len()].resp).await?;
    let started = Instant::now();
    let mut read = 0usize;
    for (key, start) in streams.iter().zip(starts) {
        let mut from = start;
        loop {
            let got: redis::Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(key)
                .arg(&from)
                .query_async(&mut reader)
                .await
                .map_err(|e| format!("XREAD {key}: {e}"))?;
            let entries = xread_entries(&got);
            let Some((last, _)) = entries.last() else {
                break;
            };
            from = last.clone();
            read += entries.len();
        }
    }
    if read != events {
        return Err(format!(
            "catch-up read {read} events of the {events} written"
        ));
    }
    Ok((read, read as f64 / started.elapsed().as_secs_f64()))
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`USER_HZ`, fixed at 100 in Linux's
/// user-space ABI).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, every thread) the node processes have used so far; `None`
/// when a node's `/proc` entry cannot be read (not Linux, or the node is gone).
pub(crate) fn nodes_cpu_seconds(nodes: &[NodeProc]) -> Option<f64> {
    let mut total = 0.0;
    for n in nodes {
        let pid = n.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces, inside parentheses):
        // state is field 3, utime field 14, stime field 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        total += (utime + stime) / USER_HZ;
    }
    Some(total)
}

async fn run(args: &ChangesArgs, nodes: &[NodeProc]) -> Result<(), String> {
    let streams = setup(nodes).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // CPU microseconds of the nodes per write, per run.
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for state in order {
            switch(nodes, state).await?;
            let cpu_before = nodes_cpu_seconds(nodes);
            let ops = throughput(nodes, args.clients, args.seconds).await?;
            let cpu = cpu_before
                .zip(nodes_cpu_seconds(nodes))
                .map(|(b, a)| (a - b) * 1e6 / (ops * args.seconds as f64));
            eprintln!(
                "  SET pipelines, changes {}: {ops:.0} writes/s{}",
                if state { "on" } else { "off" },
                cpu.map(|c| format!(", {c:.0} µs of node CPU per write"))
                    .unwrap_or_default()
            );
            if state {
                on.push(ops)
            } else {
                off.push(ops)
            }
            if let Some(c) = cpu {
                if state {
                    on_cpu.push(c)
                } else {
                    off_cpu.push(c)
                }
            }
        }
    }
    // Each round's cost (its off run against its on run), before the medians sort them.
    let per_round: Vec<String> = off
        .iter()
        .zip(&on)
        .map(|(o, n)| format!("{:.1} %", (1.0 - n / o) * 100.0))
        .collect();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        }
    };
    let (off_ops, on_ops) = (median(&mut off), median(&mut on));
    let cpu_per_write = (off_cpu.len() == args.rounds && on_cpu.len() == args.rounds)
        .then(|| (median(&mut off_cpu), median(&mut on_cpu)));
    switch(nodes, true).await?;
    let lat = latency(nodes, &streams, args.rate, args.seconds).await?;
    eprintln!("  latency: {} writes followed", lat.len());
    let merged = vec![format!("__changes:{KEYSPACE}")];
    let merged_lat = latency(nodes, &merged, args.rate, args.seconds).await?;
    eprintln!("  merged latency: {} writes followed", merged_lat.len());
    switch(nodes, false).await?;
    switch(nodes, true).await?;
    let (read, rate) = catch_up(nodes, &streams, args.catchup_events).await?;
    let (merged_read, merged_rate) = catch_up(nodes, &merged, args.catchup_events).await?;

    println!();
    println!(
        "### Change streams (3 nodes, cp keyspace of {SHARDS} shards x 3 replicas, {} s per run)",
        args.seconds
    );
    println!();
    println!("| measure | value | target | met |");
    println!("|---|---:|---:|---|");
    let cost = 1.0 - on_ops / off_ops;
    println!(
        "| SET writes/s, changes off ({} clients x pipelines of {PIPELINE}, median of {} runs) | {off_ops:.0} | | |",
        args.clients, args.rounds
    );
    println!("| SET writes/s, changes on (same) | {on_ops:.0} | | |");
    if let Some((off_cpu, on_cpu)) = cpu_per_write {
        println!(
            "| nodes' CPU per write, off / on (user + system of the 3 processes, medians) | {off_cpu:.0} / {on_cpu:.0} µs ({:+.1} %) | | |",
            (on_cpu / off_cpu - 1.0) * 100.0
        );
    }
    println!(
        "| cost of changes on (medians; each round: {}) | {:.1} % | <= 10 % | {} |",
        per_round.join(", "),
        cost * 100.0,
        if cost <= 0.10 { "yes" } else { "**no**" }
    );
    let (p50, p99) = (
        quantile(&lat, 0.50) as f64 / 1000.0,
        quantile(&lat, 0.99) as f64 / 1000.0,
    );
    println!(
        "| commit-to-XREAD p50 ({} writes at {}/s through node 1, consumers on node 2) | {p50:.2} ms | <= 2 ms | {} |",
        lat.len(),
        args.rate,
        if p50 <= 2.0 { "yes" } else { "**no**" }
    );
    println!(
        "| commit-to-XREAD p99 | {p99:.2} ms | <= 20 ms | {} |",
        if p99 <= 20.0 { "yes" } else { "**no**" }
    );
    let (m50, m99) = (
        quantile(&merged_lat, 0.50) as f64 / 1000.0,
        quantile(&merged_lat, 0.99) as f64 / 1000.0,
    );
    println!(
        "| merged stream (`__changes:{KEYSPACE}`, {SHARDS} shards): commit-to-XREAD p50 / p99 | {m50:.2} / {m99:.2} ms | (per-shard + one commit) | |"
    );
    println!(
        "| catch-up read from the start ({read} events, XREAD COUNT 1000), shard streams | {rate:.0} events/s | | |"
    );
    println!(
        "| catch-up read, merged stream ({merged_read} events) | {merged_rate:.0} events/s | | |"
    );
    Ok(())
}
