//! `capdb bench failover`: how long a `cp` shard is unavailable when its leader dies.
//!
//! Starts its own cluster of real `capdb` processes on loopback (this binary), keeps a steady
//! write load on every node, and for each round kills the current leader of the `default`
//! keyspace's shard with SIGKILL. The unavailability window of a round is the time from the
//! kill to the completion of the first write that was *sent after the kill* and acknowledged.
//! The killed node is restarted and the cluster allowed to settle (all voters back, leader
//! known) before the next round. Prints each window, then p50, p99 and max.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capdb_launch::{LocalNode, NodeCommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::client::HttpClient;

/// Options of `capdb bench failover`.
#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Nodes in the cluster (3 or more).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent writers (spread over the nodes).
    #[arg(long, default_value_t = 6)]
    writers: usize,
    /// Keep the cluster's data and logs in this directory (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub(crate) struct NodeProc {
    pub(crate) id: u64,
    pub(crate) resp: String,
    pub(crate) http: String,
    pub(crate) command: NodeCommand,
    /// Killed when dropped (and when this process dies: capdb-launch).
    pub(crate) child: Option<LocalNode>,
}

impl NodeProc {
    pub(crate) fn spawn(&mut self) -> Result<(), String> {
        let child = self
            .command
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", self.id))?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
        }
    }
}

/// Starts `n` nodes of this binary on loopback ports, founding one cluster; data and logs go
/// under `work`.
pub(crate) fn spawn_local_cluster(
    binary: &PathBuf,
    work: &std::path::Path,
    n: usize,
) -> Result<Vec<NodeProc>, String> {
    let peers: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let mut nodes = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        let id = i as u64 + 1;
        let (resp, http) = (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        );
        let command = NodeCommand::new(binary)
            .node_id(id)
            .data_dir(work.join(format!("node{id}")))
            .resp_addr(&resp)
            .http_addr(&http)
            .peer_addr(format!("127.0.0.1:{peer}"))
            .initial_cluster(initial.join(","))
            .env("CAPDB_LOG", "warn")
            .stderr_log_file(work.join(format!("node{id}.log")));
        nodes.push(NodeProc {
            id,
            resp,
            http,
            command,
            child: None,
        });
    }
    for node in &mut nodes {
        node.spawn()?;
    }
    Ok(nodes)
}

fn free_port() -> Result<u16, String> {
    capdb_launch::free_port().map_err(|e| format!("no free port: {e}"))
}

/// One `SET` over a fresh or kept RESP connection; `Ok(true)` when acknowledged with `+OK`.
async fn set(conn: &mut Option<BufReader<TcpStream>>, addr: &str, key: &str) -> bool {
    if conn.is_none() {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                *conn = Some(BufReader::new(s));
            }
            _ => return false,
        }
    }
    let c = conn.as_mut().expect("connected");
    let cmd = format!(
        "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$5\r\nvalue\r\n",
        key.len()
    );
    let round_trip = async {
        c.get_mut().write_all(cmd.as_bytes()).await?;
        let mut line = String::new();
        c.read_line(&mut line).await?;
        std::io::Result::Ok(line)
    };
    match tokio::time::timeout(Duration::from_secs(10), round_trip).await {
        Ok(Ok(line)) if line.starts_with("+OK") => true,
        Ok(Ok(line)) if line.starts_with('-') => false,
        _ => {
            *conn = None;
            false
        }
    }
}

async fn wait_settled(
    client: &HttpClient,
    voters: usize,
    deadline: Duration,
) -> Result<u64, String> {
    let until = Instant::now() + deadline;
    loop {
        if let Ok(v) = client.request("GET", "/v1/cluster", None).await {
            let shard = &v["keyspaces"][0]["shards"][0];
            let lag_ok = shard["replication_lag_entries"]
                .as_object()
                .is_some_and(|m| {
                    m.len() >= voters - 1 && m.values().all(|l| l.as_u64().is_some_and(|l| l < 100))
                });
            if let (Some(leader), Some(vs)) = (shard["leader"].as_u64(), shard["voters"].as_array())
                && vs.len() == voters
                && lag_ok
            {
                return Ok(leader);
            }
        }
        if Instant::now() > until {
            return Err(format!("cluster did not settle within {deadline:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (sent, acknowledged) times of the writes that succeeded.
type Successes = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// Runs `capdb bench failover` (see the module doc).
pub async fn failover(args: FailoverArgs) -> Result<(), String> {
    if args.rounds == 0 {
        return Err("--rounds must be at least 1 (nothing to measure otherwise)".into());
    }
    if args.nodes < 3 {
        return Err("--nodes must be at least 3 (a leader must be able to die)".into());
    }
    let binary = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let temp = args.work_dir.is_none();
    let work = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("capdb-failover-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let mut nodes = spawn_local_cluster(&binary, &work, args.nodes)?;
    let rf = args.nodes.min(3);
    let clients: Vec<HttpClient> = nodes
        .iter()
        .map(|n| HttpClient::new(&n.http, None))
        .collect::<Result<_, _>>()?;
    eprintln!(
        "starting a {}-node cluster in {}",
        args.nodes,
        work.display()
    );
    wait_settled(&clients[0], rf, Duration::from_secs(60)).await?;

    // Steady write load on every node.
    let (stop, successes, writers) = start_writers(&nodes, args.writers);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut windows = Vec::new();
    for round in 1..=args.rounds {
        let window = failover_round(round, &mut nodes, &clients, rf, &successes, &stop).await?;
        windows.push(window);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    for n in &mut nodes {
        n.kill9();
    }
    if temp {
        let _ = std::fs::remove_dir_all(&work);
    }
    print_summary(windows, &args);
    Ok(())
}

/// Starts `writers` tasks, spread over the nodes, each writing fresh keys one at a time until
/// `stop` turns true and recording its successes.
fn start_writers(
    nodes: &[NodeProc],
    writers: usize,
) -> (Arc<AtomicBool>, Successes, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let successes: Successes = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let addr = nodes[w % nodes.len()].resp.clone();
        let (stop, successes) = (stop.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if set(&mut conn, &addr, &format!("w{w}:{i}")).await {
                    successes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((started, Instant::now()));
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                i += 1;
            }
        }));
    }
    (stop, successes, tasks)
}

/// One round: kills the settled leader, returns the time until the first write sent after the
/// kill was acknowledged, then restarts the node and waits for the cluster to settle. After
/// 30 s without such a write, stops the writers and fails.
async fn failover_round(
    round: usize,
    nodes: &mut [NodeProc],
    clients: &[HttpClient],
    rf: usize,
    successes: &Successes,
    stop: &AtomicBool,
) -> Result<Duration, String> {
    let leader = wait_settled(&clients[0], rf, Duration::from_secs(60)).await?;
    let victim = nodes
        .iter()
        .position(|n| n.id == leader)
        .ok_or("leader is not one of ours")?;
    successes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let killed_at = Instant::now();
    nodes[victim].kill9();
    let deadline = killed_at + Duration::from_secs(30);
    let window = loop {
        let first = successes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(start, _)| *start >= killed_at)
            .map(|(_, end)| *end)
            .min();
        if let Some(end) = first {
            break end - killed_at;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            return Err(format!(
                "round {round}: no write succeeded within 30 s of killing node {leader}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "round {round:>2}: killed leader node {leader}, writes resumed after {:>5} ms",
        window.as_millis()
    );
    nodes[victim].spawn()?;
    let other = if victim == 0 { 1 } else { 0 };
    wait_settled(&clients[other], rf, Duration::from_secs(60)).await?;
    Ok(window)
}

/// Prints the unavailability windows' p50, p99 and max.
fn print_summary(mut windows: Vec<Duration>, args: &FailoverArgs) {
    windows.sort();
    let pct =
        |p: f64| windows[((windows.len() as f64 * p).ceil() as usize).clamp(1, windows.len()) - 1];
    println!(
        "leader failover, {} rounds, {} nodes, {} writers (default settings: heartbeat 60 ms, election timeout 200-350 ms):",
        windows.len(),
        args.nodes,
        args.writers
    );
    println!(
        "unavailability p50 {} ms, p99 {} ms, max {} ms",
        pct(0.5).as_millis(),
        pct(0.99).as_millis(),
        windows.last().map(|w| w.as_millis()).unwrap_or(0)
    );
}

/// Runs `run` on a 3-node cluster of this binary started for it (named `label` in its work
/// directory), then kills the nodes; the work directory goes unless it was given or the run
/// failed (its logs are kept then).
pub(crate) async fn on_local_cluster(
    label: &str,
    work_dir: Option<PathBuf>,
    run: impl AsyncFnOnce(&mut [NodeProc]) -> Result<(), String>,
) -> Result<(), String> {
    let binary = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let temp = work_dir.is_none();
    let work = work_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("capdb-bench-{label}-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    eprintln!("starting a 3-node cluster in {}", work.display());
    let mut nodes = spawn_local_cluster(&binary, &work, 3)?;
    let result = run(&mut nodes).await;
    for n in &mut nodes {
        n.kill9();
    }
    if temp && result.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    } else if result.is_err() {
        eprintln!("node logs kept in {}", work.display());
    }
    result
}

/// A RESP connection to `addr` with keyspace `keyspace` selected (no response timeout: a
/// benchmark waits out what it measures).
pub(crate) async fn connect_keyspace(
    addr: &str,
    keyspace: &str,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let client =
        redis::Client::open(format!("redis://{addr}/")).map_err(|e| format!("{addr}: {e}"))?;
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    redis::cmd("SELECT")
        .arg(keyspace)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("{addr}: SELECT {keyspace}: {e}"))?;
    Ok(conn)
}

/// Creates `cp` keyspace `keyspace` of `shards` shards and waits (until `until`) until every
/// node can write to every shard, so that nothing timed waits for a leader.
pub(crate) async fn set_up_cp_keyspace(
    nodes: &[NodeProc],
    keyspace: &str,
    shards: usize,
    until: std::time::Instant,
) -> Result<(), String> {
    let http = crate::client::HttpClient::new(&nodes[0].http, None)?;
    create_cp_keyspace(&http, keyspace, shards, until).await?;
    for n in nodes {
        let mut conn = loop {
            match connect_keyspace(&n.resp, keyspace).await {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > until => {
                    return Err(format!("node {}: {e}", n.id));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        };
        for i in 0..64 {
            loop {
                let done: redis::RedisResult<()> = redis::cmd("SET")
                    .arg(format!("warm:{i}"))
                    .arg("x")
                    .query_async(&mut conn)
                    .await;
                match done {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() > until => {
                        return Err(format!("node {}: warm-up write: {e}", n.id));
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        }
    }
    Ok(())
}

/// Waits (until `until`) for node 1 behind `http` to be ready, then creates a `cp` keyspace
/// of `shards` shards with 3 replicas each.
pub(crate) async fn create_cp_keyspace(
    http: &crate::client::HttpClient,
    name: &str,
    shards: usize,
    until: std::time::Instant,
) -> Result<(), String> {
    while http.request("GET", "/readyz", None).await.is_err() {
        if std::time::Instant::now() > until {
            return Err("node 1 not ready in time".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let spec =
        format!(r#"{{"name":"{name}","mode":"cp","shards":{shards},"replication_factor":3}}"#);
    http.request("POST", "/v1/keyspaces", Some(spec.into_bytes()))
        .await
        .map(|_| ())
}
