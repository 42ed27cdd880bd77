//! `capdb playground`: a local cluster in one command, for trying capdb and for demos.
//!
//! The foreground process owns the nodes (real `capdb server` processes on loopback) and
//! listens for control commands on `127.0.0.1:BASE+100`, a line protocol that
//! `capdb playground partition|heal|kill|restart|status` (from another terminal) and the
//! interactive prompt both use. Partitions need no root: each node is told which peers to
//! drop (`POST /v1/cluster/partition`), and drops their traffic in both directions.
//!
//! Ports: node i (1-based) serves RESP on BASE+i, HTTP on BASE+100+i and peers on BASE+200+i.
//!
//! Nodes start through `capdb-launch`, so they die with the playground even when it is killed
//! with SIGKILL.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capdb_launch::{LocalNode, NodeCommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::client::HttpClient;

/// Most nodes a playground runs (ports and the machine's patience).
const NODES_MAX: u32 = 9;
/// Longest control command line accepted.
const CONTROL_LINE_MAX: usize = 1024;

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  capdb playground                      # 3 nodes: RESP 7001-7003, HTTP 7101-7103
  capdb playground --nodes 5 --base-port 8000 --data-dir ./pg-data

While it runs, from another terminal (same --base-port):
  capdb playground partition 1          # cut node 1 off from the others
  capdb playground partition 1,2 3      # explicit sides
  capdb playground heal
  capdb playground kill 2               # SIGKILL node 2
  capdb playground restart 2
  capdb playground status")]
pub struct PlaygroundArgs {
    #[command(subcommand)]
    op: Option<ControlOp>,
    /// Nodes to start (1 to 9).
    #[arg(long, default_value_t = 3, global = true)]
    nodes: u32,
    /// Node i serves RESP on P+i, HTTP on P+100+i, peers on P+200+i; control on P+100.
    #[arg(long, default_value_t = 7000, global = true)]
    base_port: u16,
    /// Keep data here (and reuse it next time) instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Subcommand, Clone)]
enum ControlOp {
    /// Cut nodes off: `partition 1` isolates node 1; `partition 1,2 3` makes sides {1,2} and {3}.
    Partition {
        #[arg(required = true)]
        sides: Vec<String>,
    },
    /// Restore every link.
    Heal,
    /// SIGKILL node N.
    Kill { node: u32 },
    /// Start node N again (after kill).
    Restart { node: u32 },
    /// Show nodes, links and shard leaders.
    Status,
}

impl ControlOp {
    fn line(&self) -> String {
        match self {
            ControlOp::Partition { sides } => format!("partition {}", sides.join(" ")),
            ControlOp::Heal => "heal".into(),
            ControlOp::Kill { node } => format!("kill {node}"),
            ControlOp::Restart { node } => format!("restart {node}"),
            ControlOp::Status => "status".into(),
        }
    }
}

struct Ports {
    base: u16,
}

impl Ports {
    fn resp(&self, i: u32) -> u16 {
        self.base + i as u16
    }
    fn http(&self, i: u32) -> u16 {
        self.base + 100 + i as u16
    }
    fn peer(&self, i: u32) -> u16 {
        self.base + 200 + i as u16
    }
    fn control(&self) -> u16 {
        self.base + 100
    }
}

struct Playground {
    binary: PathBuf,
    dir: PathBuf,
    nodes: u32,
    ports: Ports,
    children: Mutex<Vec<Option<LocalNode>>>,
    /// Current sides of a partition (empty when healed), for `status`.
    partition: Mutex<Vec<BTreeSet<u32>>>,
}

pub async fn main(args: PlaygroundArgs) -> Result<(), String> {
    if args.nodes == 0 || args.nodes > NODES_MAX {
        return Err(format!("--nodes must be 1 to {NODES_MAX}"));
    }
    if args.base_port == 0 || args.base_port > 65535 - 300 {
        return Err("--base-port must be 1 to 65235".into());
    }
    let ports = Ports {
        base: args.base_port,
    };
    if let Some(op) = args.op {
        return control_client(&ports, &op.line()).await;
    }
    run(args, ports).await
}

/// Sends one command to a running playground and prints its answer.
async fn control_client(ports: &Ports, line: &str) -> Result<(), String> {
    let addr = format!("127.0.0.1:{}", ports.control());
    let mut s = TcpStream::connect(&addr).await.map_err(|e| {
        format!("no playground answers on {addr} ({e}); start one with `capdb playground` (same --base-port)")
    })?;
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(s).lines();
    let mut failed = false;
    while let Some(l) = lines.next_line().await.map_err(|e| e.to_string())? {
        if let Some(err) = l.strip_prefix("error: ") {
            eprintln!("error: {err}");
            failed = true;
        } else {
            println!("{l}");
        }
    }
    if failed {
        Err("the playground refused the command".into())
    } else {
        Ok(())
    }
}

async fn run(args: PlaygroundArgs, ports: Ports) -> Result<(), String> {
    let (dir, temporary) = match args.data_dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("capdb-playground-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Refuse early when the ports are taken (most often: another playground).
    let control = TcpListener::bind(("127.0.0.1", ports.control()))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on 127.0.0.1:{} ({e}); is another playground running? use --base-port",
                ports.control()
            )
        })?;
    let pg = Arc::new(Playground {
        binary: std::env::current_exe().map_err(|e| format!("cannot find capdb: {e}"))?,
        dir: dir.clone(),
        nodes: args.nodes,
        ports,
        children: Mutex::new((0..args.nodes).map(|_| None).collect()),
        partition: Mutex::default(),
    });
    for i in 1..=pg.nodes {
        if let Err(e) = pg.start(i) {
            pg.stop_all();
            return Err(e);
        }
    }
    let result = async {
        pg.wait_ready(Duration::from_secs(60)).await?;
        pg.create_keyspaces().await
    }
    .await;
    if let Err(e) = result {
        pg.stop_all();
        return Err(format!("{e}; node logs are in {}", dir.display()));
    }
    pg.print_welcome(temporary);

    let server = {
        let pg = pg.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = control.accept().await else {
                    continue;
                };
                let pg = pg.clone();
                tokio::spawn(async move { serve_control(pg, stream).await });
            }
        })
    };
    let prompt = {
        let pg = pg.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            loop {
                eprint!("playground> ");
                match lines.next_line().await {
                    Ok(Some(line)) if line.trim().is_empty() => continue,
                    Ok(Some(line)) if matches!(line.trim(), "quit" | "exit") => break,
                    Ok(Some(line)) => {
                        for l in pg.command(line.trim()).await {
                            println!("{l}");
                        }
                    }
                    // No terminal (or end of input): keep running until Ctrl-C.
                    _ => std::future::pending::<()>().await,
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = prompt => {}
    }
    server.abort();
    eprintln!("\nstopping the playground...");
    pg.stop_all();
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("removed {}", dir.display());
    } else {
        eprintln!("data kept in {}", dir.display());
    }
    Ok(())
}

async fn serve_control(pg: Arc<Playground>, stream: TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(CONTROL_LINE_MAX as u64);
    use tokio::io::AsyncReadExt;
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let out = pg.command(line.trim()).await;
    let _ = write.write_all((out.join("\n") + "\n").as_bytes()).await;
}

impl Playground {
    fn http(&self, i: u32) -> HttpClient {
        HttpClient::new(&format!("127.0.0.1:{}", self.ports.http(i)), None).expect("valid addr")
    }

    fn start(&self, i: u32) -> Result<(), String> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut children[i as usize - 1];
        if let Some(c) = slot.as_mut()
            && c.try_wait().ok().flatten().is_none()
        {
            return Err(format!("node {i} is already running"));
        }
        let initial: Vec<String> = (1..=self.nodes)
            .map(|j| format!("{j}=127.0.0.1:{}", self.ports.peer(j)))
            .collect();
        let child = NodeCommand::new(&self.binary)
            .node_id(i.into())
            .data_dir(self.dir.join(format!("node-{i}")))
            .resp_addr(format!("127.0.0.1:{}", self.ports.resp(i)))
            .http_addr(format!("127.0.0.1:{}", self.ports.http(i)))
            .peer_addr(format!("127.0.0.1:{}", self.ports.peer(i)))
            .initial_cluster(initial.join(","))
            .args(["--label", &format!("zone=z{}", (i - 1) % 3 + 1)])
            .log_file(self.dir.join(format!("node-{i}.log")))
            // Ctrl-C reaches the playground only; it stops the nodes itself, in order.
            .own_process_group()
            .spawn()
            .map_err(|e| format!("starting node {i}: {e}"))?;
        *slot = Some(child);
        Ok(())
    }

    fn kill(&self, i: u32) -> Result<(), String> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        match children[i as usize - 1].take() {
            Some(mut c) => {
                let _ = c.kill();
                Ok(())
            }
            None => Err(format!("node {i} is not running")),
        }
    }

    /// SIGTERM to every node (each hands off leaderships and closes its files), then waits;
    /// SIGKILL for any still running after 15 s.
    fn stop_all(&self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for c in children.iter_mut().flatten() {
            let _ = c.terminate(Duration::ZERO);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for c in children.iter_mut() {
            if let Some(child) = c.as_mut() {
                let _ = child.wait_until(deadline);
                let _ = child.kill();
            }
            *c = None;
        }
    }

    fn running(&self, i: u32) -> bool {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children[i as usize - 1]
            .as_mut()
            .is_some_and(|c| c.is_running())
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for i in 1..=self.nodes {
            loop {
                if !self.running(i) {
                    return Err(format!("node {i} exited during startup"));
                }
                let ok = tokio::time::timeout(Duration::from_secs(2), async {
                    let s = TcpStream::connect(("127.0.0.1", self.ports.http(i))).await;
                    if s.is_err() {
                        return false;
                    }
                    self.http(i).request("GET", "/readyz", None).await.is_ok()
                })
                .await
                .unwrap_or(false);
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "node {i} was not ready within {} s",
                        timeout.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    async fn create_keyspaces(&self) -> Result<(), String> {
        let specs = [
            r#"{"name":"cp","mode":"cp"}"#,
            r#"{"name":"ap","mode":"ap"}"#,
            r#"{"name":"cache","mode":"cache","max_memory_bytes":268435456,"eviction":"lru"}"#,
        ];
        for spec in specs {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match self
                    .http(1)
                    .request("POST", "/v1/keyspaces", Some(spec.as_bytes().to_vec()))
                    .await
                {
                    Ok(_) => break,
                    Err(e) if e.contains("already exists") || e.contains("HTTP 409") => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("creating keyspace {spec}: {e}"));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
        // Every node must know the keyspaces before the playground says it is ready.
        for i in 1..=self.nodes {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self
                .http(i)
                .request("GET", "/v1/keyspaces/cache", None)
                .await
                .is_err()
            {
                if Instant::now() > deadline {
                    return Err(format!("node {i} never saw the new keyspaces"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn print_welcome(&self, temporary: bool) {
        let p = &self.ports;
        println!(
            "capdb playground: {} nodes on 127.0.0.1, data in {}{}",
            self.nodes,
            self.dir.display(),
            if temporary { " (removed at exit)" } else { "" }
        );
        for i in 1..=self.nodes {
            println!(
                "  node {i}: RESP 127.0.0.1:{}  HTTP 127.0.0.1:{}  log {}",
                p.resp(i),
                p.http(i),
                self.dir.join(format!("node-{i}.log")).display()
            );
        }
        let (r1, h1) = (p.resp(1), p.http(1));
        let base = if p.base == 7000 {
            String::new()
        } else {
            format!(" --base-port {}", p.base)
        };
        println!(
            "
Keyspaces: cp (linearizable, Raft), ap (stays writable in a partition), cache (in memory).

Connect:
  redis-cli -p {r1}                            # then: SELECT ap / SET k v / GET k
  printf 'SELECT cp\\nSET k v\\nGET k\\n' | redis-cli -p {r1}
  curl -X PUT --data-binary v http://127.0.0.1:{h1}/v1/kv/ap/k
  curl http://127.0.0.1:{h1}/v1/kv/ap/k
  capdb kv get k --keyspace ap --addr 127.0.0.1:{h1}
  capdb cluster status --addr 127.0.0.1:{h1}

Break it (here at the prompt, or `capdb playground CMD{base}` from another terminal):
  partition 1        cut node 1 off: cp writes on node 1 are refused, ap writes still answer
  partition 1,2 3    explicit sides
  heal | kill N | restart N | status

Ctrl-C stops everything."
        );
    }

    /// Runs one control command; returns the lines to show. Errors start with "error: ".
    async fn command(&self, line: &str) -> Vec<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let node_arg = |w: Option<&&str>| -> Result<u32, String> {
            let n: u32 = w
                .ok_or("which node? (example: kill 2)")?
                .parse()
                .map_err(|_| "a node is a number, e.g. 2".to_string())?;
            if n == 0 || n > self.nodes {
                return Err(format!("node {n} does not exist (1 to {})", self.nodes));
            }
            Ok(n)
        };
        let result: Result<Vec<String>, String> = match words.first().copied() {
            Some("partition") => self.partition(&words[1..]).await,
            Some("heal") => self.partition(&[]).await,
            Some("kill") => match node_arg(words.get(1)) {
                Ok(n) => self.kill(n).map(|()| vec![format!("node {n} killed (SIGKILL)")]),
                Err(e) => Err(e),
            },
            Some("restart") => match node_arg(words.get(1)) {
                Ok(n) => self.start(n).map(|()| {
                    vec![format!(
                        "node {n} restarting (it rejoins and catches up by itself)"
                    )]
                }),
                Err(e) => Err(e),
            },
            Some("status") => Ok(self.status().await),
            Some("help") | None => Ok(vec![
                "commands: partition 1 | partition 1,2 3 | heal | kill N | restart N | status | quit"
                    .into(),
            ]),
            Some(other) => Err(format!("unknown command '{other}' (try help)")),
        };
        match result {
            Ok(lines) => lines,
            Err(e) => vec![format!("error: {e}")],
        }
    }

    fn parse_side(&self, text: &str) -> Result<BTreeSet<u32>, String> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                let n: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{s}' is not a node number"))?;
                if n == 0 || n > self.nodes {
                    return Err(format!("node {n} does not exist (1 to {})", self.nodes));
                }
                Ok(n)
            })
            .collect()
    }

    /// `sides` empty: heal. One side: it against everyone else. Several: as given (nodes in
    /// no side form one more side).
    async fn partition(&self, sides: &[&str]) -> Result<Vec<String>, String> {
        let mut groups: Vec<BTreeSet<u32>> = sides
            .iter()
            .map(|s| self.parse_side(s))
            .collect::<Result<_, _>>()?;
        let listed: BTreeSet<u32> = groups.iter().flatten().copied().collect();
        if listed.len() != groups.iter().map(|g| g.len()).sum::<usize>() {
            return Err("a node appears in two sides".into());
        }
        let rest: BTreeSet<u32> = (1..=self.nodes).filter(|n| !listed.contains(n)).collect();
        if !groups.is_empty() && !rest.is_empty() {
            groups.push(rest);
        }
        if groups.len() == 1 {
            return Err("a partition needs at least two sides".into());
        }
        let side_of = |n: u32| groups.iter().position(|g| g.contains(&n));
        let mut out = Vec::new();
        for i in 1..=self.nodes {
            let blocked: Vec<u32> = (1..=self.nodes)
                .filter(|&j| j != i && side_of(i) != side_of(j))
                .collect();
            let body = serde_json::json!({ "blocked": blocked }).to_string();
            match self
                .http(i)
                .request("POST", "/v1/cluster/partition", Some(body.into_bytes()))
                .await
            {
                Ok(_) => {}
                Err(e) => out.push(format!(
                    "warning: node {i} did not take the new links ({e}); it keeps its old ones"
                )),
            }
        }
        *self.partition.lock().unwrap_or_else(|p| p.into_inner()) = groups.clone();
        if groups.is_empty() {
            out.push("healed: every node talks to every other".into());
        } else {
            let text: Vec<String> = groups.iter().map(fmt_set).collect();
            out.push(format!("partitioned: {}", text.join(" | ")));
        }
        Ok(out)
    }

    async fn status(&self) -> Vec<String> {
        let mut out = Vec::new();
        let sides = self
            .partition
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        out.push(if sides.is_empty() {
            "links: all healthy".into()
        } else {
            format!(
                "links: partitioned {}",
                sides.iter().map(fmt_set).collect::<Vec<_>>().join(" | ")
            )
        });
        let mut view = None;
        for i in 1..=self.nodes {
            let running = self.running(i);
            out.push(format!(
                "node {i}: {}  RESP :{}  HTTP :{}",
                if running { "running" } else { "stopped" },
                self.ports.resp(i),
                self.ports.http(i)
            ));
            if running && view.is_none() {
                view = self.http(i).request("GET", "/v1/cluster", None).await.ok();
            }
        }
        if let Some(v) = view {
            for ks in v["keyspaces"].as_array().into_iter().flatten() {
                let leaders: Vec<String> = ks["shards"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| match s["leader"].as_u64() {
                        Some(l) => format!("shard {} leader {l}", s["group"]),
                        None => format!("shard {} no leader", s["group"]),
                    })
                    .collect();
                let mode = ks["mode"].as_str().unwrap_or("?");
                out.push(format!(
                    "keyspace {} ({mode}): {}",
                    ks["name"].as_str().unwrap_or("?"),
                    match mode {
                        "cp" => leaders.join(", "),
                        "ap" => "leaderless: every replica takes writes".into(),
                        _ => "in memory on each node".into(),
                    }
                ));
            }
        }
        out
    }
}

fn fmt_set(s: &BTreeSet<u32>) -> String {
    let v: Vec<String> = s.iter().map(|n| n.to_string()).collect();
    format!("{{{}}}", v.join(","))
}
