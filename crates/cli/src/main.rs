//! The `capdb` binary: one executable for the server and its command-line clients.

mod bench;
mod bench_ap;
mod bench_changes;
mod bench_txn;
mod bench_views;
mod changes;
mod chaos;
mod client;
mod difftest;
mod job;
mod log_limit;
mod playground;
mod view;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use client::HttpClient;

/// The process's allocator: mimalloc instead of the system's (glibc) malloc.
///
/// A cache write allocates and frees element values and reply buffers on whichever runtime
/// worker runs it, and a value is often freed by another worker than the one that allocated
/// it. glibc's arenas made `free` and `malloc` a fifth of HSET's profile on a 100,000-field
/// hash, and HSET ran 65% faster under a thread-caching allocator (Redis links jemalloc for
/// the same reason). mimalloc builds from the C source its crate ships (no system library).
///
/// Built with `no_thp`: mimalloc otherwise asks for transparent huge pages on its arenas, and
/// every time it gives freed memory back and takes it again the kernel zeroes a whole 2 MiB
/// page. redb allocates a fresh buffer for each page it writes, so on the write path this was
/// the storage writer thread's top symbol (`clear_page_erms` under
/// `do_huge_pmd_anonymous_page`, 4–8 % of its samples under `capdb bench changes`); without
/// huge pages it is gone from the profile. Throughput moved within this machine's noise
/// (3-node SETs +4 %; single-node `bench/redis_compare.py --baseline-binary`: -7 % to +6 %
/// per case), and a process no longer holds whole huge pages for small live allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  capdb server                                   # one node: RESP on 127.0.0.1:6380, HTTP on :8080
  capdb server --data-dir /var/lib/capdb --resp-addr 0.0.0.0:6380
  capdb keyspace create sessions --mode cache --max-memory-bytes 1073741824 --eviction lfu
  capdb keyspace list
  capdb kv put greeting hello --ttl-ms 60000
  capdb kv get greeting
  capdb kv scan --prefix user: --limit 50
  redis-cli -p 6380 SET k v                      # any Redis client works too
";

#[derive(Parser)]
#[command(name = "capdb", version, about = "capdb: a distributed key-value database where each keyspace chooses its CAP trade-off", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// HTTP address of any capdb node.
    #[arg(
        long,
        global = true,
        env = "CAPDB_ADDR",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT"
    )]
    addr: String,
    /// Password, if the server requires one.
    #[arg(long, global = true, env = "CAPDB_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a capdb node.
    #[command(
        after_help = "Settings come from --config FILE, then CAPDB_* environment variables, then flags (each overrides the previous).\n\nExample:\n  capdb server --data-dir ./data --resp-addr 127.0.0.1:6380 --http-addr 127.0.0.1:8080"
    )]
    Server(Box<capdb_server::ServerArgs>),
    /// Read and write keys over the HTTP API.
    Kv {
        #[command(subcommand)]
        op: KvOp,
        #[command(flatten)]
        target: Target,
    },
    /// Create, list, describe and drop keyspaces.
    Keyspace {
        #[command(subcommand)]
        op: KeyspaceOp,
        #[command(flatten)]
        target: Target,
    },
    /// Inspect and change the cluster.
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
        #[command(flatten)]
        target: Target,
    },
    /// MapReduce jobs: run one and follow it, or look at jobs.
    Job {
        #[command(subcommand)]
        op: job::JobOp,
        #[command(flatten)]
        target: Target,
    },
    /// Incremental views of a cp keyspace: define, read, verify, drop.
    View {
        #[command(subcommand)]
        op: view::ViewOp,
        #[command(flatten)]
        target: Target,
    },
    /// Follow a keyspace's change streams (over RESP).
    Changes {
        #[command(subcommand)]
        op: changes::ChangesOp,
        #[command(flatten)]
        target: changes::RespTarget,
    },
    /// Measurements against a cluster this command starts itself.
    Bench {
        #[command(subcommand)]
        op: BenchOp,
    },
    /// Start a local cluster (3 nodes, keyspaces cp, ap and cache) and break it on purpose.
    Playground(playground::PlaygroundArgs),
    /// Jepsen-style fault injection with a linearizability checker (needs root).
    Chaos {
        #[command(subcommand)]
        op: chaos::ChaosOp,
    },
    /// Compare capdb's replies with a real redis-server's, command by command, over a seeded
    /// random command list.  Example: capdb difftest --mode cp --seed 1 --commands 100000
    Difftest(difftest::DifftestArgs),
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum BenchOp {
    /// Kill the shard leader N times under write load; print the unavailability window.
    /// Example: capdb bench failover --rounds 20
    Failover(bench::FailoverArgs),
    /// ap write throughput at one/quorum/all, and convergence time after a partition.
    /// Example: capdb bench ap --divergent-keys 100000
    Ap(bench_ap::ApArgs),
    /// SET vs single-shard and cross-shard EXEC (p50, p99, ops/s at 1/16/64 clients), a
    /// hot-key case, and how long a killed coordinator's locks outlive it.
    /// Example: capdb bench txn --seconds 5 --kill-rounds 5
    Txn(bench_txn::TxnArgs),
    /// Change streams: write throughput off vs on, commit-to-XREAD latency, catch-up rate.
    /// Example: capdb bench changes --seconds 5
    Changes(bench_changes::ChangesArgs),
    /// Incremental views: SET throughput with 0, 1 and 4 views kept, and their cost.
    /// Example: capdb bench views --seconds 5 --rounds 3
    Views(bench_views::ViewsArgs),
}

#[derive(Subcommand)]
enum ClusterOp {
    /// Nodes (health, labels), shards (leader, replicas, replication lag).  Example: capdb cluster status
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain node N (its replicas move to other nodes), then remove it.  Example: capdb cluster remove 4
    Remove {
        id: u64,
        /// Return at once instead of waiting until the node has left.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move the leaderships of the node at --addr to other replicas (before maintenance).
    StepDown,
    /// What ap replication reconciled per keyspace (anti-entropy, read repair, hints) and how
    /// long the last convergence took.  Example: capdb cluster reconcile-report
    ReconcileReport {
        /// Print the raw JSON (with every node's episodes).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KvOp {
    /// Print a key's value.  Example: capdb kv get user:1 --keyspace users
    Get {
        key: String,
        #[arg(long, short = 'k', default_value = "default")]
        keyspace: String,
    },
    /// Write a key.  Example: capdb kv put user:1 '{"name":"ada"}' --ttl-ms 60000
    Put {
        key: String,
        value: String,
        #[arg(long, short = 'k', default_value = "default")]
        keyspace: String,
        /// Expire the key after this many milliseconds.
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// Only write if the key is absent (`absent`) or present (`present`).
        #[arg(long = "if", value_name = "absent|present")]
        condition: Option<String>,
    },
    /// Delete a key.  Example: capdb kv del user:1
    Del {
        key: String,
        #[arg(long, short = 'k', default_value = "default")]
        keyspace: String,
    },
    /// List keys in order.  Example: capdb kv scan --prefix user: --limit 20
    Scan {
        #[arg(long, short = 'k', default_value = "default")]
        keyspace: String,
        #[arg(long)]
        prefix: Option<String>,
        /// First key to include.
        #[arg(long)]
        start: Option<String>,
        /// First key to exclude.
        #[arg(long)]
        end: Option<String>,
        /// Most keys to print (all pages are followed up to this many).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum KeyspaceOp {
    /// Create a keyspace.  Example: capdb keyspace create events --mode ap --replication-factor 3
    Create {
        name: String,
        /// cp (linearizable, Raft), ap (available, quorums) or cache (in memory).
        #[arg(long)]
        mode: String,
        #[arg(long)]
        replication_factor: Option<u32>,
        #[arg(long)]
        shards: Option<u32>,
        /// Memory limit of a cache keyspace.
        #[arg(long)]
        max_memory_bytes: Option<u64>,
        /// Eviction policy of a cache keyspace: lru or lfu.
        #[arg(long)]
        eviction: Option<String>,
    },
    /// List keyspaces.
    List,
    /// Show one keyspace.
    Describe { name: String },
    /// Drop a keyspace and all its data.
    Drop { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Difftest(args) = cli.command {
        // Blocking sockets and child processes: no runtime needed.
        return difftest::main(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Chaos { op } = cli.command {
        return runtime.block_on(chaos::main(op));
    }
    // A job's end chooses the exit code (0 done, 1 failed, 2 bad spec, 3 contact lost).
    if let Command::Job { op, target } = cli.command {
        let exit = runtime.block_on(async move {
            match crate::client::HttpClient::new(&target.addr, target.password.clone()) {
                Ok(client) => job::job(op, &client).await,
                Err(e) => job::JobExit::Failed(e),
            }
        });
        match &exit {
            job::JobExit::Done => {}
            job::JobExit::Failed(e) | job::JobExit::BadSpec(e) | job::JobExit::ContactLost(e) => {
                eprintln!("error: {e}");
            }
        }
        return ExitCode::from(exit.code() as u8);
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Chaos { .. } | Command::Difftest(_) | Command::Job { .. } => {
                unreachable!("handled above")
            }
            Command::Playground(args) => playground::main(args).await,
            Command::Server(args) => server(*args).await,
            Command::Kv { op, target } => kv(op, &target).await,
            Command::Keyspace { op, target } => keyspace(op, &target).await,
            Command::Cluster { op, target } => cluster(op, &target).await,
            Command::View { op, target } => {
                let client = HttpClient::new(&target.addr, target.password.clone())?;
                view::view(op, &client).await
            }
            Command::Changes { op, target } => changes::changes(op, &target).await,
            Command::Bench {
                op: BenchOp::Failover(args),
            } => bench::failover(args).await,
            Command::Bench {
                op: BenchOp::Ap(args),
            } => bench_ap::ap(args).await,
            Command::Bench {
                op: BenchOp::Txn(args),
            } => bench_txn::txn(args).await,
            Command::Bench {
                op: BenchOp::Changes(args),
            } => bench_changes::changes(args).await,
            Command::Bench {
                op: BenchOp::Views(args),
            } => bench_views::views(args).await,
            Command::Version => {
                println!("capdb {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn server(args: capdb_server::ServerArgs) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Repeated lines are rate-limited (log_limit.rs); CAPDB_LOG_RATE_LIMIT=off writes them all.
    // Without its reporter thread the limiter would hide lines silently, so then it is left out.
    let limit_env = std::env::var("CAPDB_LOG_RATE_LIMIT").ok();
    let (rate_limit, reporter_error) = if log_limit::enabled_by_env(limit_env.as_deref()) {
        let limit = log_limit::RateLimit::new();
        match limit.spawn_reporter() {
            Ok(()) => (Some(limit), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_env("CAPDB_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with(rate_limit.clone())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    if let Some(e) = reporter_error {
        tracing::warn!(error = %e, "cannot start the log rate limiter's thread; repeated lines are not limited");
    }
    let config = capdb_server::Config::resolve(&args).map_err(|e| e.to_string())?;
    let result = capdb_server::run(config, shutdown_signal())
        .await
        .map_err(|e| e.to_string());
    for summary in rate_limit.iter().flat_map(|r| r.flush_all()) {
        summary.log();
    }
    result
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler; only Ctrl-C will stop the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn kv(op: KvOp, target: &Target) -> Result<(), String> {
    let client = HttpClient::new(&target.addr, target.password.clone())?;
    match op {
        KvOp::Get { key, keyspace } => {
            let v = client
                .request("GET", &client::kv_path(&keyspace, &key), None)
                .await?;
            match (v.get("value"), v.get("value_hex")) {
                (Some(serde_json::Value::String(s)), _) => println!("{s}"),
                (_, Some(serde_json::Value::String(h))) => println!("(hex) {h}"),
                _ => print_json(&v),
            }
        }
        KvOp::Put {
            key,
            value,
            keyspace,
            ttl_ms,
            condition,
        } => {
            let path = kv_put_path(&keyspace, &key, ttl_ms, condition);
            let v = client
                .request("PUT", &path, Some(value.into_bytes()))
                .await?;
            println!(
                "{}",
                if v["written"] == json!(true) {
                    "OK"
                } else {
                    "(not written: condition not met)"
                }
            );
        }
        KvOp::Del { key, keyspace } => {
            let v = client
                .request("DELETE", &client::kv_path(&keyspace, &key), None)
                .await?;
            println!(
                "{}",
                if v["deleted"] == json!(true) {
                    "1"
                } else {
                    "0"
                }
            );
        }
        KvOp::Scan {
            keyspace,
            prefix,
            start,
            end,
            limit,
        } => kv_scan(&client, &keyspace, [prefix, start, end], limit).await?,
    }
    Ok(())
}

/// The path of a `kv put`: the key's, with its TTL and condition in the query.
fn kv_put_path(
    keyspace: &str,
    key: &str,
    ttl_ms: Option<u64>,
    condition: Option<String>,
) -> String {
    let mut path = client::kv_path(keyspace, key);
    let mut query = Vec::new();
    if let Some(ms) = ttl_ms {
        query.push(format!("ttl_ms={ms}"));
    }
    if let Some(c) = condition {
        query.push(format!("if={}", client::encode(&c)));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    path
}

/// `kv scan`: prints up to `limit` entries (key, tab, value), following the pages.
/// `[prefix, start, end]` narrow the scan.
async fn kv_scan(
    client: &HttpClient,
    keyspace: &str,
    [prefix, start, end]: [Option<String>; 3],
    limit: usize,
) -> Result<(), String> {
    let mut printed = 0usize;
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![format!("limit={}", (limit - printed).clamp(1, 1000))];
        for (name, v) in [
            ("prefix", &prefix),
            ("start", &start),
            ("end", &end),
            ("cursor", &cursor),
        ] {
            if let Some(v) = v {
                query.push(format!("{name}={}", client::encode(v)));
            }
        }
        let path = format!("/v1/kv/{}?{}", client::encode(keyspace), query.join("&"));
        let v = client.request("GET", &path, None).await?;
        for e in v["entries"].as_array().into_iter().flatten() {
            let k = text_or_hex(e, "key");
            let val = text_or_hex(e, "value");
            println!("{k}\t{val}");
            printed += 1;
        }
        match v["cursor"].as_str() {
            Some(c) if printed < limit => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(())
}

/// A scanned entry's `field` as text, or `(hex) ...` from `{field}_hex`; empty when neither.
fn text_or_hex(e: &serde_json::Value, field: &str) -> String {
    e.get(field)
        .and_then(|k| k.as_str())
        .map(str::to_string)
        .or_else(|| {
            e.get(format!("{field}_hex"))
                .and_then(|k| k.as_str())
                .map(|h| format!("(hex) {h}"))
        })
        .unwrap_or_default()
}

async fn keyspace(op: KeyspaceOp, target: &Target) -> Result<(), String> {
    let client = HttpClient::new(&target.addr, target.password.clone())?;
    match op {
        KeyspaceOp::Create {
            name,
            mode,
            replication_factor,
            shards,
            max_memory_bytes,
            eviction,
        } => {
            let body = json!({
                "name": name, "mode": mode, "replication_factor": replication_factor,
                "shards": shards, "max_memory_bytes": max_memory_bytes, "eviction": eviction,
            });
            let v = client
                .request("POST", "/v1/keyspaces", Some(body.to_string().into_bytes()))
                .await?;
            print_json(&v);
        }
        KeyspaceOp::List => {
            let v = client.request("GET", "/v1/keyspaces", None).await?;
            println!(
                "{:<24} {:<6} {:>4} {:>6} {:>10}",
                "NAME", "MODE", "RF", "SHARDS", "KEYS"
            );
            for k in v["keyspaces"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<6} {:>4} {:>6} {:>10}",
                    k["name"].as_str().unwrap_or("?"),
                    k["mode"].as_str().unwrap_or("?"),
                    k["replication_factor"].to_string(),
                    k["shards"].to_string(),
                    k["keys"].to_string()
                );
            }
        }
        KeyspaceOp::Describe { name } => {
            let v = client
                .request(
                    "GET",
                    &format!("/v1/keyspaces/{}", client::encode(&name)),
                    None,
                )
                .await?;
            print_json(&v);
        }
        KeyspaceOp::Drop { name } => {
            client
                .request(
                    "DELETE",
                    &format!("/v1/keyspaces/{}", client::encode(&name)),
                    None,
                )
                .await?;
            println!("dropped {name}");
        }
    }
    Ok(())
}

async fn cluster(op: ClusterOp, target: &Target) -> Result<(), String> {
    let client = HttpClient::new(&target.addr, target.password.clone())?;
    match op {
        ClusterOp::Status { json } => {
            let v = client.request("GET", "/v1/cluster", None).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            print_status(&v);
        }
        ClusterOp::Remove { id, no_wait } => {
            client
                .request(
                    "POST",
                    &format!("/v1/cluster/nodes/{id}/remove"),
                    Some(Vec::new()),
                )
                .await?;
            println!("node {id} is draining: its replicas move to other nodes");
            if no_wait {
                return Ok(());
            }
            wait_removed(&client, id).await?;
        }
        ClusterOp::StepDown => {
            let v = client
                .request("POST", "/v1/cluster/step-down", Some(Vec::new()))
                .await?;
            print_json(&v);
        }
        ClusterOp::ReconcileReport { json } => {
            let v = client
                .request("GET", "/v1/cluster/reconcile-report", None)
                .await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            print_reconcile_report(&v);
        }
    }
    Ok(())
}

/// Prints `cluster status`: the nodes, then each keyspace's shards.
fn print_status(v: &serde_json::Value) {
    println!(
        "map version {}   meta leader: node {}",
        v["map_version"], v["meta_leader"]
    );
    println!(
        "\n{:<5} {:<8} {:<22} {:<22} {:<20} {:>8} {:>8}",
        "NODE", "HEALTH", "PEER", "RESP", "LABELS", "REPLICAS", "LEADING"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        let labels: Vec<String> = n["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let health = match (n["healthy"].as_bool(), n["draining"].as_bool()) {
            (Some(true), Some(true)) => "draining",
            (Some(true), _) => "up",
            _ => "DOWN",
        };
        println!(
            "{:<5} {:<8} {:<22} {:<22} {:<20} {:>8} {:>8}",
            n["id"].to_string(),
            health,
            n["peer_addr"].as_str().unwrap_or(""),
            n["resp_addr"].as_str().unwrap_or(""),
            labels.join(","),
            n["replicas"].to_string(),
            n["leading"].to_string()
        );
    }
    for ks in v["keyspaces"].as_array().into_iter().flatten() {
        println!(
            "\nkeyspace {} ({}, rf {})",
            ks["name"].as_str().unwrap_or("?"),
            ks["mode"].as_str().unwrap_or("?"),
            ks["replication_factor"]
        );
        println!(
            "  {:<6} {:<13} {:<8} {:<16} LAG (entries behind the leader)",
            "GROUP", "SLOTS", "LEADER", "REPLICAS"
        );
        for sh in ks["shards"].as_array().into_iter().flatten() {
            println!(
                "  {:<6} {:<13} {:<8} {:<16} {}",
                sh["group"].to_string(),
                format!("{}-{}", sh["slots"][0], sh["slots"][1]),
                sh["leader"]
                    .as_u64()
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "none".into()),
                sh["replicas"].to_string(),
                sh["replication_lag_entries"]
            );
        }
    }
}

/// Waits (up to 300 s) until node `id` has left the cluster, printing its replicas meanwhile.
async fn wait_removed(client: &HttpClient, id: u64) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let v = client.request("GET", "/v1/cluster", None).await?;
        let member = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == id);
        match member {
            None => {
                println!("node {id} removed from the cluster");
                return Ok(());
            }
            Some(n) => println!("  node {id} still holds {} replicas", n["replicas"]),
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "node {id} still a member after 300 s; see `capdb cluster status`"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Prints the `cluster reconcile-report` per keyspace, and the nodes that did not answer.
fn print_reconcile_report(v: &serde_json::Value) {
    let keyspaces = v["keyspaces"].as_object().cloned().unwrap_or_default();
    if keyspaces.is_empty() {
        println!("no ap keyspace has reconciled anything yet");
    }
    for (ks, r) in keyspaces {
        let t = &r["totals"];
        println!(
            "keyspace {ks}: compared {} keys, repaired {}, conflicts {} (resolved {}), read repairs {}, hints stored {} / delivered {}, tombstones collected {}, list versions lost {}, type conflicts {}",
            t["keys_compared"],
            t["keys_repaired"],
            t["conflicts"],
            t["resolved"],
            t["read_repairs"],
            t["hints_stored"],
            t["hints_delivered"],
            t["tombstones_purged"],
            t["list_versions_lost"],
            t["type_conflicts"]
        );
        let e = &r["last_episode"];
        if e.is_object() {
            println!(
                "  last convergence: {} ms (node {}: diverged at {}, in sync at {} Unix ms; {} repaired, {} conflicts)",
                e["convergence_ms"],
                e["node"],
                e["started_ms"],
                e["converged_ms"],
                e["keys_repaired"],
                e["conflicts"]
            );
        }
    }
    if let Some(u) = v["unreachable_nodes"].as_array().filter(|u| !u.is_empty()) {
        println!("not answering: nodes {u:?}");
    }
}
