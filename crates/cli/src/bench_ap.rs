//! `capdb bench ap`: write throughput of an `ap` keyspace at `one` and `quorum` (with the
//! durable `cp` keyspace for reference), and how long replicas take to converge after a
//! partition left many keys divergent.
//!
//! Starts its own 3-node cluster of this binary on loopback. Throughput: `--clients`
//! connections, each pipelining `--pipeline` SETs at a time, for `--seconds` per level.
//! Convergence: node 1 is cut off (the nodes' own partition filter), `--divergent-keys` keys are
//! written on the majority side at `one`, the partition heals, and the clock runs until every
//! node reports the same replica digest; the reconciliation report says what did the work.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::{NodeProc, spawn_local_cluster};
use crate::client::HttpClient;

#[derive(clap::Args)]
pub struct ApArgs {
    /// Seconds of load per consistency level.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// SETs in flight per connection.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Keys written on one side of the partition before it heals.
    #[arg(long, default_value_t = 100_000)]
    divergent_keys: u64,
    /// Keep data and logs here (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn resp_cmd(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Opens a connection that selected `keyspace` and set the `ap` write level.
async fn connect(addr: &str, keyspace: &str, level: &str) -> Result<BufReader<TcpStream>, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let mut c = BufReader::new(s);
    let mut setup = resp_cmd(&[b"SELECT", keyspace.as_bytes()]);
    setup.extend(resp_cmd(&[b"CONSISTENCY", b"WRITE", level.as_bytes()]));
    c.get_mut()
        .write_all(&setup)
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..2 {
        let mut line = String::new();
        c.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if !line.starts_with("+OK") {
            return Err(format!("setup failed: {line}"));
        }
    }
    Ok(c)
}

/// Sends `keys` SETs in pipelined batches; returns how many were acknowledged.
async fn write_keys(
    c: &mut BufReader<TcpStream>,
    prefix: &str,
    range: std::ops::Range<u64>,
    pipeline: usize,
) -> Result<u64, String> {
    let mut ok = 0;
    let keys: Vec<u64> = range.collect();
    for batch in keys.chunks(pipeline) {
        let mut buf = Vec::new();
        for k in batch {
            let key = format!("{prefix}{k}");
            buf.extend(resp_cmd(&[
                b"SET",
                key.as_bytes(),
                b"some-value-of-moderate-size",
            ]));
        }
        c.get_mut()
            .write_all(&buf)
            .await
            .map_err(|e| e.to_string())?;
        for _ in batch {
            let mut line = String::new();
            c.read_line(&mut line).await.map_err(|e| e.to_string())?;
            ok += line.starts_with("+OK") as u64;
        }
    }
    Ok(ok)
}

async fn throughput(
    nodes: &[NodeProc],
    keyspace: &str,
    level: &str,
    args: &ApArgs,
) -> Result<f64, String> {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let addr = nodes[i % nodes.len()].resp.clone();
        let (ks, lv, done) = (keyspace.to_string(), level.to_string(), done.clone());
        let pipeline = args.pipeline;
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addr, &ks, &lv).await?;
            let mut next = 0u64;
            while Instant::now() < until {
                let n = write_keys(
                    &mut c,
                    &format!("t{i}:"),
                    next..next + pipeline as u64,
                    pipeline,
                )
                .await?;
                next += pipeline as u64;
                done.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn partition(clients: &[HttpClient], sides: &[&[usize]]) -> Result<(), String> {
    let side = |n: usize| sides.iter().position(|s| s.contains(&n));
    for (i, c) in clients.iter().enumerate() {
        let id = i + 1;
        let blocked: Vec<usize> = (1..=clients.len())
            .filter(|&o| o != id && side(o) != side(id))
            .collect();
        let body = serde_json::json!({ "blocked": blocked }).to_string();
        c.request("POST", "/v1/cluster/partition", Some(body.into_bytes()))
            .await?;
    }
    Ok(())
}

async fn digests(clients: &[HttpClient], keyspace: &str) -> Vec<Option<serde_json::Value>> {
    let mut out = Vec::new();
    for c in clients {
        out.push(
            c.request("GET", &format!("/v1/keyspaces/{keyspace}/digest"), None)
                .await
                .ok()
                .map(|v| v["shards"].clone()),
        );
    }
    out
}

pub async fn ap(args: ApArgs) -> Result<(), String> {
    let binary = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let temp = args.work_dir.is_none();
    let work = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("capdb-bench-ap-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut nodes = spawn_local_cluster(&binary, &work, 3)?;
    let clients: Vec<HttpClient> = nodes
        .iter()
        .map(|n| HttpClient::new(&n.http, None))
        .collect::<Result<_, _>>()?;
    let result = run(&args, &nodes, &clients).await;
    for n in &mut nodes {
        n.kill9();
    }
    if temp {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

/// Measures write throughput per consistency level, then convergence after a partition.
async fn run(args: &ApArgs, nodes: &[NodeProc], clients: &[HttpClient]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = futures_ready(clients).await;
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err("the cluster did not become ready within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = br#"{"name":"bench","mode":"ap","replication_factor":3}"#;
    clients[0]
        .request("POST", "/v1/keyspaces", Some(spec.to_vec()))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "3 nodes; {} clients x pipeline {}; {} s per level",
        args.clients, args.pipeline, args.seconds
    );
    let one = throughput(nodes, "bench", "one", args).await?;
    let quorum = throughput(nodes, "bench", "quorum", args).await?;
    let all = throughput(nodes, "bench", "all", args).await?;
    let cp = throughput(nodes, "default", "one", args).await?;
    println!(
        "write throughput, 3 nodes, rf 3, {} clients x pipeline {}:",
        args.clients, args.pipeline
    );
    println!("  ap one     {one:>10.0} SET/s");
    println!(
        "  ap quorum  {quorum:>10.0} SET/s   (quorum/one {:.2})",
        quorum / one
    );
    println!(
        "  ap all     {all:>10.0} SET/s   (all/one {:.2})",
        all / one
    );
    println!("  cp (Raft)  {cp:>10.0} SET/s   (for reference)");

    measure_convergence(args, nodes, clients).await
}

/// Convergence after a partition: cuts node 1 off, writes `--divergent-keys` keys on the
/// majority side at `one`, heals, and times how long until every node reports the same replica
/// digest; then prints what did the reconciling.
async fn measure_convergence(
    args: &ApArgs,
    nodes: &[NodeProc],
    clients: &[HttpClient],
) -> Result<(), String> {
    partition(clients, &[&[1], &[2, 3]]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_client = args.divergent_keys.div_ceil(args.clients as u64);
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let addr = nodes[1 + i % 2].resp.clone();
        let (written, pipeline) = (written.clone(), args.pipeline);
        let start = i as u64 * per_client;
        let end = (start + per_client).min(args.divergent_keys);
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&addr, "bench", "one").await?;
            let n = write_keys(&mut c, "div:", start..end, pipeline).await?;
            written.fetch_add(n, Ordering::Relaxed);
            Ok::<(), String>(())
        }));
    }
    let w_started = Instant::now();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let written = written.load(Ordering::Relaxed);
    eprintln!(
        "partition {{1}} | {{2,3}}: wrote {written} keys at `one` on the majority side in {:.1} s",
        w_started.elapsed().as_secs_f64()
    );
    let before = digests(clients, "bench").await;
    if before.windows(2).all(|w| w[0] == w[1]) {
        return Err("replicas agree before the heal: the partition did not cut node 1 off".into());
    }
    let healed = Instant::now();
    partition(clients, &[&[1, 2, 3]]).await?;
    let converged = loop {
        let d = digests(clients, "bench").await;
        if d.iter().all(|x| x.is_some()) && d.windows(2).all(|w| w[0] == w[1]) {
            break healed.elapsed();
        }
        if healed.elapsed() > Duration::from_secs(600) {
            return Err("replicas did not converge within 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "convergence after a partition that left {written} keys divergent: {:.2} s from heal to identical replica digests on all 3 nodes",
        converged.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = clients[0]
        .request("GET", "/v1/cluster/reconcile-report", None)
        .await?;
    let t = &report["keyspaces"]["bench"]["totals"];
    println!(
        "  reconciled by: hints delivered {}, anti-entropy keys repaired {} (compared {}), conflicts {}, read repairs {}",
        t["hints_delivered"],
        t["keys_repaired"],
        t["keys_compared"],
        t["conflicts"],
        t["read_repairs"]
    );
    Ok(())
}

async fn futures_ready(clients: &[HttpClient]) -> bool {
    for c in clients {
        if c.request("GET", "/readyz", None).await.is_err() {
            return false;
        }
    }
    true
}
