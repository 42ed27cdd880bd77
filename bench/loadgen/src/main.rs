//! Closed-loop load generator for comparing capdb and etcd with the same client logic.
//!
//! Every client is one task with its own connection (clients are spread round-robin over the
//! endpoints). A client sends one request, waits for the reply, records the latency in an HDR
//! histogram and sends the next one: there is never more than one request in flight per client.
//!
//! - capdb: RESP (`redis` crate), `SET key value` / `GET key` on the `default` keyspace (`cp`,
//!   fsync per commit group; GET is linearizable: ReadIndex on the shard leader).
//! - etcd: gRPC (`etcd-client` crate), `Put` / linearizable `Range` (the etcd default).
//!
//! Keys are `k0000000`..`k{key-space - 1}` (8 bytes for a key space up to 10^7), picked uniformly
//! at random; values are `value-size` printable bytes. `--op fill` writes every key of the key
//! space once (batches of 100: a RESP pipeline for capdb, a Txn for etcd) so gets find a value.
//!
//! Example:
//!   loadgen --target etcd --endpoints 127.0.0.1:2379,127.0.0.1:22379 --op put --clients 16 \
//!           --duration 8 --json

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Capdb,
    Etcd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    Put,
    Get,
    /// Write every key of the key space once (not timed as a benchmark point).
    Fill,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Closed-loop put/get load generator for capdb (RESP) and etcd (gRPC)")]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    /// Comma-separated HOST:PORT list (capdb: RESP ports; etcd: client URLs or HOST:PORT).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, value_enum)]
    op: Op,
    /// Concurrent closed-loop clients, each with its own connection.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts (not recorded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Per-request timeout in seconds (a timed-out request counts as an error).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A tiny deterministic PRNG (splitmix64), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn key(i: u64) -> String {
    format!("k{i:07}")
}

fn value(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed ^ 0xA5A5_A5A5);
    (0..size).map(|_| b'a' + (rng.next() % 26) as u8).collect()
}

/// One connection to one node.
enum Conn {
    Capdb(redis::aio::MultiplexedConnection),
    Etcd(etcd_client::Client),
}

#[derive(Debug)]
enum Outcome {
    Hit,
    Miss,
}

impl Conn {
    async fn open(target: Target, endpoint: &str, timeout: Duration) -> Result<Conn, String> {
        match target {
            Target::Capdb => {
                let ep = endpoint
                    .trim_start_matches("redis://")
                    .trim_start_matches("http://");
                let client =
                    redis::Client::open(format!("redis://{ep}/")).map_err(|e| e.to_string())?;
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(|e| format!("connect {ep}: {e}"))?;
                Ok(Conn::Capdb(conn))
            }
            Target::Etcd => {
                let url = if endpoint.contains("://") {
                    endpoint.to_string()
                } else {
                    format!("http://{endpoint}")
                };
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(timeout);
                let client = etcd_client::Client::connect([url.as_str()], Some(opts))
                    .await
                    .map_err(|e| format!("connect {url}: {e}"))?;
                Ok(Conn::Etcd(client))
            }
        }
    }

    async fn put(&mut self, k: &str, v: &[u8]) -> Result<(), String> {
        match self {
            Conn::Capdb(c) => redis::cmd("SET")
                .arg(k)
                .arg(v)
                .query_async::<()>(c)
                .await
                .map_err(|e| e.to_string()),
            Conn::Etcd(c) => c
                .put(k, v.to_vec(), None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    async fn get(&mut self, k: &str) -> Result<Outcome, String> {
        match self {
            Conn::Capdb(c) => redis::cmd("GET")
                .arg(k)
                .query_async::<Option<Vec<u8>>>(c)
                .await
                .map(|v| if v.is_some() { Outcome::Hit } else { Outcome::Miss })
                .map_err(|e| e.to_string()),
            // No options: a linearizable (quorum) read, etcd's default.
            Conn::Etcd(c) => c
                .get(k, None)
                .await
                .map(|r| if r.kvs().is_empty() { Outcome::Miss } else { Outcome::Hit })
                .map_err(|e| e.to_string()),
        }
    }

    /// Writes `keys` in one round trip: a RESP pipeline (capdb) or one Txn (etcd).
    async fn put_batch(&mut self, keys: &[String], v: &[u8]) -> Result<(), String> {
        match self {
            Conn::Capdb(c) => {
                let mut p = redis::pipe();
                for k in keys {
                    p.cmd("SET").arg(k).arg(v).ignore();
                }
                p.query_async::<()>(c).await.map_err(|e| e.to_string())
            }
            Conn::Etcd(c) => {
                let ops: Vec<etcd_client::TxnOp> = keys
                    .iter()
                    .map(|k| etcd_client::TxnOp::put(k.as_str(), v.to_vec(), None))
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

struct ClientResult {
    hist: Histogram<u64>,
    errors: u64,
    misses: u64,
    first_error: Option<String>,
}

async fn run_client(
    id: usize,
    mut conn: Conn,
    args: Arc<Args>,
    measure_start: Instant,
    measure_end: Instant,
) -> ClientResult {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut rng = Rng(args.seed.wrapping_mul(1_000_003).wrapping_add(id as u64));
    let val = value(args.value_size, args.seed.wrapping_add(id as u64));
    let (mut errors, mut misses, mut first_error) = (0u64, 0u64, None);
    loop {
        let k = key(rng.next() % args.key_space);
        let t0 = Instant::now();
        if t0 >= measure_end {
            break;
        }
        let res = match args.op {
            Op::Put => conn.put(&k, &val).await.map(|_| Outcome::Hit),
            Op::Get => conn.get(&k).await,
            Op::Fill => unreachable!(),
        };
        let t1 = Instant::now();
        // Count an operation when it started inside the measured window and ended before its
        // end, so warm-up and the tail after the deadline are excluded.
        if t0 < measure_start || t1 > measure_end {
            continue;
        }
        match res {
            Ok(o) => {
                let us = (t1 - t0).as_micros().max(1) as u64;
                hist.saturating_record(us);
                if matches!(o, Outcome::Miss) {
                    misses += 1;
                }
            }
            Err(e) => {
                errors += 1;
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    ClientResult { hist, errors, misses, first_error }
}

async fn connect_all(args: &Args) -> Result<Vec<Conn>, String> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let ep = &args.endpoints[i % args.endpoints.len()];
        conns.push(Conn::open(args.target, ep, timeout).await?);
    }
    Ok(conns)
}

async fn fill(args: Arc<Args>, conns: Vec<Conn>) -> Result<serde_json::Value, String> {
    const BATCH: u64 = 100;
    let start = Instant::now();
    let n = conns.len() as u64;
    let batches = args.key_space.div_ceil(BATCH);
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let val = value(args.value_size, args.seed.wrapping_add(i as u64));
            let mut b = i as u64;
            while b < batches {
                let keys: Vec<String> = (b * BATCH..((b + 1) * BATCH).min(args.key_space))
                    .map(key)
                    .collect();
                let mut tries = 0;
                loop {
                    match conn.put_batch(&keys, &val).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("fill batch {b}: {e} (retrying)");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(format!("fill batch {b}: {e}")),
                    }
                }
                b += n;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "op": "fill",
        "keys": args.key_space,
        "value_size": args.value_size,
        "seconds": secs,
        "keys_per_sec": args.key_space as f64 / secs,
    }))
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    if args.clients == 0 || args.endpoints.is_empty() || args.key_space == 0 {
        return Err("--clients, --endpoints and --key-space must be non-empty".into());
    }
    let args = Arc::new(args);
    let conns = connect_all(&args).await?;
    if args.op == Op::Fill {
        return fill(args, conns).await;
    }
    let measure_start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let measure_end = measure_start + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(run_client(i, c, args.clone(), measure_start, measure_end)))
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut errors, mut misses, mut first_error) = (0u64, 0u64, None);
    for t in tasks {
        let r = t.await.map_err(|e| e.to_string())?;
        hist.add(&r.hist).map_err(|e| e.to_string())?;
        errors += r.errors;
        misses += r.misses;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let ops = hist.len();
    let q = |p: f64| if ops == 0 { 0 } else { hist.value_at_quantile(p) };
    Ok(json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "op": format!("{:?}", args.op).to_lowercase(),
        "clients": args.clients,
        "endpoints": args.endpoints,
        "duration_s": args.duration,
        "key_space": args.key_space,
        "value_size": args.value_size,
        "ops": ops,
        "ops_per_sec": ops as f64 / args.duration,
        "mean_us": if ops == 0 { 0.0 } else { hist.mean() },
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": if ops == 0 { 0 } else { hist.max() },
        "errors": errors,
        "misses": misses,
        "first_error": first_error,
    }))
}

fn main() {
    let args = Args::parse();
    let as_json = args.json;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(v) if as_json => println!("{v}"),
        Ok(v) => {
            if v["op"] == "fill" {
                println!(
                    "{} fill: {} keys in {:.1} s ({:.0} keys/s)",
                    v["target"].as_str().unwrap_or(""),
                    v["keys"],
                    v["seconds"].as_f64().unwrap_or(0.0),
                    v["keys_per_sec"].as_f64().unwrap_or(0.0)
                );
            } else {
                println!(
                    "{} {} clients={}: {:.0} ops/s  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  \
                     errors {}  misses {}",
                    v["target"].as_str().unwrap_or(""),
                    v["op"].as_str().unwrap_or(""),
                    v["clients"],
                    v["ops_per_sec"].as_f64().unwrap_or(0.0),
                    v["p50_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    v["p99_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    v["max_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    v["errors"],
                    v["misses"]
                );
                if let Some(e) = v["first_error"].as_str() {
                    println!("first error: {e}");
                }
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}
