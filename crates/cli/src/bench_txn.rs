//! `capdb bench txn`: what a transaction costs next to a plain write, on one shard and across
//! shards, under contention, and how long a dead coordinator's locks outlive it.
//!
//! Starts its own 3-node cluster of this binary on loopback and a `cp` keyspace `bench` with 4
//! shards, 3 replicas each. Keys are placed on shards by asking the cluster (`CLUSTER
//! KEYSLOT`; 4 shards split the 16,384 slots in quarters).
//!
//! - **Cost of atomicity.** Four cases, each at every `--clients` count for `--seconds`,
//!   clients spread over the nodes, each on keys of its own (no contention): `SET k v`;
//!   `MULTI SET k1 SET k2 EXEC` with both keys on one shard (one Raft entry); the same with the
//!   keys on 2 shards, and with one SET on each of the 4 shards (two-phase commit over the
//!   shards' Raft groups). A transaction is sent as one pipelined write (MULTI, the SETs,
//!   EXEC), as Redis clients send it, and timed from that write to EXEC's answer. Reported:
//!   p50, p99, throughput, and each as a ratio to SET's at the same client count.
//! - **Contention.** `--hot-clients` clients all run `MULTI INCR a INCR b EXEC` on the same two
//!   keys on two shards. Counted: committed, `-TRYAGAIN` (every retry met locks), anything
//!   else; then a and b are read back: both must equal the number of committed EXECs (an EXEC
//!   answered `-UNCERTAIN` may or may not have counted; the check allows for it).
//! - **Coordinator kills.** Node 3 is restarted with `--debug-txn-crash POINT` (testing only:
//!   it aborts in the middle of its first cross-shard EXEC). Per round: restart node 3, send a
//!   cross-shard EXEC through it, note when its connection breaks (the coordinator died), then
//!   poll a linearizable GET of both keys through node 1 until each answers (a read of a
//!   write-locked key waits up to 5 s and then answers `-TRYAGAIN`: polled again). The time
//!   from the death to the last answer is how long the orphaned locks lived. The values read
//!   must be the outcome the crash point dictates (committed after every prepare, aborted
//!   after one). The throughput cases run before node 3 gets the flag: any cross-shard EXEC
//!   through it would kill it.
//!
//! What this does not measure: WATCH, transactions across keyspaces, node failures other than
//! the coordinator's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::NodeProc;
use crate::client::HttpClient;

/// Options of `capdb bench txn`.
#[derive(clap::Args)]
pub struct TxnArgs {
    /// Seconds of load per case and client count (and for the contention case).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent client counts each case runs at (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    clients: Vec<usize>,
    /// Clients of the contention case (all on the same two keys).
    #[arg(long, default_value_t = 16)]
    hot_clients: usize,
    /// Coordinator kills measured per crash point (0: skip the kills).
    #[arg(long, default_value_t = 5)]
    kill_rounds: usize,
    /// Where the killed coordinator dies: after-prepares (the cluster must commit),
    /// after-one-prepare (the cluster must abort) or both.
    #[arg(long, default_value = "both", value_parser = ["after-prepares", "after-one-prepare", "both"])]
    crash_point: String,
    /// Keep the cluster's data and logs in this directory (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// The keyspace the bench creates: `cp`, 4 shards, 3 replicas each.
const KEYSPACE: &str = "bench";
const SHARDS: usize = 4;
/// Slots per shard: 4 shards split Redis's 16,384 slots in quarters.
const SLOTS_PER_SHARD: i64 = 16_384 / SHARDS as i64;
/// The value every SET writes.
const VALUE: &str = "0123456789abcdef";

/// Raft timing (`capdb_raft::groups::default_raft_config`): a follower calls an election after
/// the leader lease (350 ms) plus 200-350 ms; and the lock deadline of a prepare
/// (`capdb_txn::Config::lock_hold_ms`) and the period of the orphan recovery
/// (`server::node::txns::RECOVERY_PERIOD`). Used only to print the target and the expectation.
const ELECTION_TIMEOUT_MAX_MS: u64 = 700;
const LOCK_HOLD_MS: u64 = 1_200;
const RECOVERY_PERIOD_MS: u64 = 100;

/// How long the cluster may take to start, elect, or create the keyspace.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// How long one request may take before the bench gives up on it (EXEC's own retries under
/// contention end after 5 s; a read of a locked key answers within 5 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bulk string and array the RESP reader accepts (the bench reads only short values
/// and EXEC arrays of at most 4 replies).
const BULK_BYTES_MAX: usize = 1024 * 1024;
const ARRAY_LEN_MAX: usize = 1024;
/// Tags tried per client when looking for a key on every shard (a tag lands on a given shard
/// with probability 1/4, so 400 tries all miss one shard with probability (3/4)^400).
const TAG_TRIES_MAX: usize = 400;

// ---- RESP: just enough of a client to time requests ----

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn is_ok(&self) -> bool {
        matches!(self, Reply::Status(s) if s == "OK")
    }
}

/// One command in RESP's wire form.
fn command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
    }
    out
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<String, String> {
    let mut line = Vec::new();
    // Bounded like a bulk string: a header line is a few bytes.
    let n = (&mut *r)
        .take(BULK_BYTES_MAX as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    if !line.ends_with(b"\r\n") {
        return Err("malformed reply line".into());
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| "reply line is not UTF-8".into())
}

/// Reads one reply (arrays whole).
fn read_reply<R: AsyncBufRead + Unpin + Send>(
    r: &mut R,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Reply, String>> + Send + '_>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at_checked(1).ok_or("empty reply line")?;
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| format!("bad length {rest:?}"))
        };
        match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Int(number()?)),
            "$" => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Reply::Bulk(None));
                };
                if len > BULK_BYTES_MAX {
                    return Err(format!("bulk string of {len} bytes"));
                }
                let mut data = vec![0; len + 2];
                r.read_exact(&mut data).await.map_err(|e| e.to_string())?;
                data.truncate(len);
                Ok(Reply::Bulk(Some(data)))
            }
            "*" => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Reply::Array(None));
                };
                if len > ARRAY_LEN_MAX {
                    return Err(format!("array of {len} replies"));
                }
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(read_reply(r).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            other => Err(format!("unknown reply type {other:?}")),
        }
    })
}

/// A RESP connection with `bench` selected.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, String> {
        let s = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("{addr}: connect timed out"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let mut conn = Conn {
            stream: BufReader::new(s),
        };
        match conn
            .call(&[command(&["SELECT", KEYSPACE])])
            .await?
            .as_slice()
        {
            [r] if r.is_ok() => Ok(conn),
            other => Err(format!("{addr}: SELECT {KEYSPACE}: {other:?}")),
        }
    }

    /// Sends `commands` in one write and reads their replies.
    async fn call(&mut self, commands: &[Vec<u8>]) -> Result<Vec<Reply>, String> {
        let round_trip = async {
            self.stream
                .get_mut()
                .write_all(&commands.concat())
                .await
                .map_err(|e| e.to_string())?;
            let mut replies = Vec::with_capacity(commands.len());
            for _ in commands {
                replies.push(read_reply(&mut self.stream).await?);
            }
            Ok(replies)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, round_trip)
            .await
            .map_err(|_| format!("no reply within {REQUEST_TIMEOUT:?}"))?
    }

    /// The one reply of one command.
    async fn one(&mut self, parts: &[&str]) -> Result<Reply, String> {
        let mut replies = self.call(&[command(parts)]).await?;
        replies.pop().ok_or_else(|| "no reply".into())
    }
}

/// `MULTI`, `commands`, `EXEC` as one pipeline.
fn transaction(commands: &[Vec<&str>]) -> Vec<Vec<u8>> {
    let mut out = vec![command(&["MULTI"])];
    out.extend(commands.iter().map(|c| command(c)));
    out.push(command(&["EXEC"]));
    out
}

/// The EXEC array of a transaction's replies, or what came instead (an error line, or what
/// MULTI or a queued command answered).
fn exec_replies(replies: Vec<Reply>) -> Result<Vec<Reply>, Reply> {
    let mut replies = replies.into_iter();
    if let Some(multi) = replies.next().filter(|r| !r.is_ok()) {
        return Err(multi);
    }
    let mut last = None;
    for r in replies {
        if let Some(prev) = last.replace(r)
            && prev != Reply::Status("QUEUED".into())
        {
            return Err(prev);
        }
    }
    match last {
        Some(Reply::Array(Some(items))) => Ok(items),
        other => Err(other.unwrap_or(Reply::Error("no EXEC reply".into()))),
    }
}

/// Short text of an unexpected reply, for the report.
fn describe(r: &Reply) -> String {
    match r {
        Reply::Error(e) => format!("-{e}"),
        other => format!("{other:?}"),
    }
}

/// Largest `/metrics` page read.
const METRICS_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The sum over `nodes` of `capdb_cross_shard_transactions{outcome="OUTCOME"}`: the
/// cross-shard transactions the nodes coordinated so far that ended so (`retried`: attempts
/// after the first, after lock conflicts; `recovered`: orphans finished by a shard leader).
async fn cross_shard_count(nodes: &[NodeProc], outcome: &str) -> Result<u64, String> {
    let name = format!("capdb_cross_shard_transactions{{outcome=\"{outcome}\"}}");
    Ok(metric_sums(nodes, &[&name]).await?[0] as u64)
}

/// The sums over `nodes` of the metrics `names` (each a full series name, labels included; a
/// node without one counts 0).
async fn metric_sums(nodes: &[NodeProc], names: &[&str]) -> Result<Vec<f64>, String> {
    let mut sums = vec![0.0; names.len()];
    for n in nodes {
        let page = async {
            let mut s = TcpStream::connect(&n.http).await?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: capdb\r\n\r\n")
                .await?;
            let mut body = Vec::new();
            s.take(METRICS_BYTES_MAX).read_to_end(&mut body).await?;
            std::io::Result::Ok(String::from_utf8_lossy(&body).into_owned())
        };
        let page = tokio::time::timeout(REQUEST_TIMEOUT, page)
            .await
            .map_err(|_| format!("node {}: /metrics timed out", n.id))?
            .map_err(|e| format!("node {}: /metrics: {e}", n.id))?;
        for (sum, name) in sums.iter_mut().zip(names) {
            *sum += page
                .lines()
                .find_map(|l| l.strip_prefix(*name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok(sums)
}

/// The storage engines' counters (summed over the nodes) a case's cost is read from: redb's
/// group commits, the seconds spent committing and, of those, in redb's commit (page writes
/// and fsync); the write-ahead log's batches (one write + fdatasync each) and their seconds.
const STORAGE_METRICS: [&str; 5] = [
    "capdb_storage_commits",
    "capdb_storage_commit_seconds",
    "capdb_storage_sync_seconds",
    "capdb_wal_syncs",
    "capdb_wal_sync_seconds",
];

// ---- keys on shards ----

/// Hash tags whose keys land on each shard: `tags[s]` is on shard `s`.
type ShardTags = [String; SHARDS];

/// Finds, for each name in `names`, one hash tag per shard (`{name.N}`), asking the cluster
/// which slot each candidate hashes to.
async fn shard_tags(conn: &mut Conn, names: &[String]) -> Result<Vec<ShardTags>, String> {
    let mut all = Vec::with_capacity(names.len());
    for name in names {
        let mut found: [Option<String>; SHARDS] = Default::default();
        // Candidates are asked about in batches of 16 (one round trip each).
        let mut tried = 0;
        while found.iter().any(Option::is_none) {
            if tried >= TAG_TRIES_MAX {
                return Err(format!("no tag of {name} on every shard in {tried} tries"));
            }
            let candidates: Vec<String> =
                (tried..tried + 16).map(|n| format!("{name}.{n}")).collect();
            tried += 16;
            let asks: Vec<Vec<u8>> = candidates
                .iter()
                .map(|t| command(&["CLUSTER", "KEYSLOT", &format!("{{{t}}}")]))
                .collect();
            for (tag, reply) in candidates.into_iter().zip(conn.call(&asks).await?) {
                let Reply::Int(slot) = reply else {
                    return Err(format!("CLUSTER KEYSLOT answered {}", describe(&reply)));
                };
                let shard = usize::try_from(slot / SLOTS_PER_SHARD)
                    .ok()
                    .filter(|s| *s < SHARDS)
                    .ok_or_else(|| format!("CLUSTER KEYSLOT answered slot {slot}"))?;
                found[shard].get_or_insert(tag);
            }
        }
        all.push(found.map(|t| t.expect("the loop ends when every shard has a tag")));
    }
    Ok(all)
}

/// A key with hash tag `tag` (so on the tag's shard).
fn key(tag: &str, suffix: &str) -> String {
    format!("{{{tag}}}{suffix}")
}

// ---- the cases ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Set,
    ExecOneShard,
    ExecTwoShards,
    ExecFourShards,
}

impl Case {
    const ALL: [Case; 4] = [
        Case::Set,
        Case::ExecOneShard,
        Case::ExecTwoShards,
        Case::ExecFourShards,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Set => "SET",
            Case::ExecOneShard => "EXEC 2 SETs, 1 shard",
            Case::ExecTwoShards => "EXEC 2 SETs, 2 shards",
            Case::ExecFourShards => "EXEC 4 SETs, 4 shards",
        }
    }

    /// The pipeline client `client` sends, over its own tags; its first shard rotates with
    /// the client so the load spreads over every shard's leader.
    fn pipeline(self, client: usize, tags: &ShardTags) -> Vec<Vec<u8>> {
        let shard = |i: usize| tags[(client + i) % SHARDS].as_str();
        let set = |k: &str| vec!["SET".to_string(), k.to_string(), VALUE.to_string()];
        let keys: Vec<String> = match self {
            Case::Set => return vec![command(&["SET", &key(shard(0), "a"), VALUE])],
            Case::ExecOneShard => vec![key(shard(0), "a"), key(shard(0), "b")],
            Case::ExecTwoShards => vec![key(shard(0), "a"), key(shard(1), "a")],
            Case::ExecFourShards => (0..SHARDS).map(|i| key(shard(i), "a")).collect(),
        };
        let sets: Vec<Vec<String>> = keys.iter().map(|k| set(k)).collect();
        let borrowed: Vec<Vec<&str>> = sets
            .iter()
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        transaction(&borrowed)
    }

    /// Whether `replies` say the pipeline did what it asked.
    fn succeeded(self, replies: Vec<Reply>) -> Result<(), String> {
        if self == Case::Set {
            return match replies.as_slice() {
                [r] if r.is_ok() => Ok(()),
                [r] => Err(describe(r)),
                _ => Err("no reply".into()),
            };
        }
        match exec_replies(replies) {
            Ok(items) if items.iter().all(Reply::is_ok) => Ok(()),
            Ok(items) => Err(format!("EXEC answered {items:?}")),
            Err(r) => Err(describe(&r)),
        }
    }
}

/// What one client measured.
#[derive(Default)]
struct ClientRun {
    /// Microseconds per successful request: one u32 per request (5 s at a few thousand
    /// requests per second is well under a megabyte).
    latencies_us: Vec<u32>,
    failures: u64,
    first_failure: Option<String>,
}

/// One case at one client count.
struct Measured {
    case: Case,
    clients: usize,
    p50_ms: f64,
    p99_ms: f64,
    ops_per_s: f64,
    failures: u64,
    first_failure: Option<String>,
    /// Cross-shard attempts retried after a lock conflict during the run.
    retried: u64,
    /// redb group commits per successful request, summed over the nodes (state machine
    /// applies and other writes; a commit carries many requests under load).
    commits_per_op: f64,
    /// Time in those commits per request, and of it in redb's commit (pages and fsync).
    commit_us_per_op: f64,
    sync_us_per_op: f64,
    /// Write-ahead log batches (Raft log appends, one fdatasync each) per request, summed over
    /// the nodes, and their time per request.
    wal_syncs_per_op: f64,
    wal_us_per_op: f64,
}

/// The value at quantile `q` of sorted `values` (nearest rank).
fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs `case` with `tags.len()` clients (client `i` on node `i % nodes`, on `tags[i]`) for
/// `seconds`.
async fn measure(
    case: Case,
    nodes: &[NodeProc],
    tags: &[ShardTags],
    seconds: u64,
) -> Result<Measured, String> {
    let mut conns = Vec::with_capacity(tags.len());
    for i in 0..tags.len() {
        conns.push(Conn::open(&nodes[i % nodes.len()].resp).await?);
    }
    let retried_before = cross_shard_count(nodes, "retried").await?;
    let storage_before = metric_sums(nodes, &STORAGE_METRICS).await?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns.into_iter().enumerate() {
        let pipeline = case.pipeline(i, &tags[i]);
        tasks.push(tokio::spawn(async move {
            let mut run = ClientRun::default();
            while Instant::now() < until {
                let sent = Instant::now();
                let outcome = match conn.call(&pipeline).await {
                    Ok(replies) => case.succeeded(replies),
                    Err(e) => return Err(format!("{}: {e}", case.name())),
                };
                match outcome {
                    Ok(()) => run
                        .latencies_us
                        .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(why) => {
                        run.failures += 1;
                        run.first_failure.get_or_insert(why);
                    }
                }
            }
            Ok(run)
        }));
    }
    let mut all = ClientRun::default();
    for t in tasks {
        let run = t.await.map_err(|e| e.to_string())??;
        all.latencies_us.extend(run.latencies_us);
        all.failures += run.failures;
        if all.first_failure.is_none() {
            all.first_failure = run.first_failure;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let retried = cross_shard_count(nodes, "retried")
        .await?
        .saturating_sub(retried_before);
    let storage_after = metric_sums(nodes, &STORAGE_METRICS).await?;
    let ops = all.latencies_us.len().max(1) as f64;
    let per_op = |i: usize| (storage_after[i] - storage_before[i]).max(0.0) / ops;
    all.latencies_us.sort_unstable();
    Ok(Measured {
        case,
        clients: tags.len(),
        p50_ms: quantile(&all.latencies_us, 0.50) as f64 / 1000.0,
        p99_ms: quantile(&all.latencies_us, 0.99) as f64 / 1000.0,
        ops_per_s: all.latencies_us.len() as f64 / elapsed,
        failures: all.failures,
        first_failure: all.first_failure,
        retried,
        commits_per_op: per_op(0),
        commit_us_per_op: per_op(1) * 1e6,
        sync_us_per_op: per_op(2) * 1e6,
        wal_syncs_per_op: per_op(3),
        wal_us_per_op: per_op(4) * 1e6,
    })
}

/// What the contention case counted.
struct Contention {
    clients: usize,
    committed: u64,
    tryagain: u64,
    uncertain: u64,
    other: u64,
    first_other: Option<String>,
    /// Attempts retried after a lock conflict.
    retried: u64,
    /// Transactions finished by the orphan recovery (no coordinator died here: each is a
    /// transaction whose locks outlived its coordinator's attention).
    recovered: u64,
    p50_ms: f64,
    p99_ms: f64,
    ops_per_s: f64,
    /// a and b read back after the load.
    a: i64,
    b: i64,
}

impl Contention {
    /// a == b, and equal to the committed EXECs (up to the uncertain ones, which may or may
    /// not have counted).
    fn consistent(&self) -> bool {
        let committed = self.committed as i64;
        self.a == self.b && self.a >= committed && self.a <= committed + self.uncertain as i64
    }
}

/// `hot_clients` clients on the same two keys (two shards), `MULTI INCR a INCR b EXEC`.
async fn contention(
    nodes: &[NodeProc],
    tags: &ShardTags,
    hot_clients: usize,
    seconds: u64,
) -> Result<Contention, String> {
    let (a, b) = (key(&tags[0], "hot"), key(&tags[1], "hot"));
    let pipeline = transaction(&[vec!["INCR", &a], vec!["INCR", &b]]);
    let mut conns = Vec::with_capacity(hot_clients);
    for i in 0..hot_clients {
        conns.push(Conn::open(&nodes[i % nodes.len()].resp).await?);
    }
    let retried_before = cross_shard_count(nodes, "retried").await?;
    let recovered_before = cross_shard_count(nodes, "recovered").await?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(hot_clients);
    for mut conn in conns {
        let pipeline = pipeline.clone();
        tasks.push(tokio::spawn(async move {
            // (latencies of committed EXECs, tryagain, uncertain, other, first other)
            let mut counts = (Vec::<u32>::new(), 0u64, 0u64, 0u64, None::<String>);
            while Instant::now() < until {
                let sent = Instant::now();
                let replies = conn.call(&pipeline).await?;
                match exec_replies(replies) {
                    Ok(items) if items.iter().all(|r| matches!(r, Reply::Int(_))) => counts
                        .0
                        .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(Reply::Error(e)) if e.starts_with("TRYAGAIN") => counts.1 += 1,
                    Err(Reply::Error(e)) if e.starts_with("UNCERTAIN") => counts.2 += 1,
                    other => {
                        counts.3 += 1;
                        counts.4.get_or_insert(format!("{other:?}"));
                    }
                }
            }
            Ok::<_, String>(counts)
        }));
    }
    let (mut latencies, mut tryagain, mut uncertain, mut other, mut first_other) =
        (Vec::new(), 0, 0, 0, None);
    for t in tasks {
        let c = t.await.map_err(|e| e.to_string())??;
        latencies.extend(c.0);
        tryagain += c.1;
        uncertain += c.2;
        other += c.3;
        if first_other.is_none() {
            first_other = c.4;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let retried = cross_shard_count(nodes, "retried")
        .await?
        .saturating_sub(retried_before);
    latencies.sort_unstable();
    let mut check = Conn::open(&nodes[0].resp).await?;
    let read = |r: Reply| match r {
        Reply::Bulk(None) => Ok(0),
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v)
            .parse::<i64>()
            .map_err(|e| e.to_string()),
        other => Err(format!("GET answered {}", describe(&other))),
    };
    let a = read(get_when_unlocked(&mut check, &a).await?)?;
    let b = read(get_when_unlocked(&mut check, &b).await?)?;
    // Read after a and b answered, i.e. after any orphan's recovery released them.
    let recovered = cross_shard_count(nodes, "recovered")
        .await?
        .saturating_sub(recovered_before);
    Ok(Contention {
        clients: hot_clients,
        committed: latencies.len() as u64,
        tryagain,
        uncertain,
        other,
        first_other,
        retried,
        recovered,
        p50_ms: quantile(&latencies, 0.50) as f64 / 1000.0,
        p99_ms: quantile(&latencies, 0.99) as f64 / 1000.0,
        ops_per_s: latencies.len() as f64 / elapsed,
        a,
        b,
    })
}

/// A linearizable GET of `key`, repeated while it answers `-TRYAGAIN` (the key is locked, or
/// its shard has no leader) for up to [`SETUP_DEADLINE`].
async fn get_when_unlocked(conn: &mut Conn, key: &str) -> Result<Reply, String> {
    let until = Instant::now() + SETUP_DEADLINE;
    loop {
        match conn.one(&["GET", key]).await? {
            Reply::Error(e) if e.starts_with("TRYAGAIN") && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reply => return Ok(reply),
        }
    }
}

// ---- coordinator kills ----

/// One coordinator kill.
struct Kill {
    /// From the coordinator's death to both keys answering reads.
    released: Duration,
    /// The keys' values then, if not what the crash point dictates.
    wrong_outcome: Option<String>,
}

/// Retries `parts` through `conn` until it answers `+OK` or an integer, for up to
/// [`SETUP_DEADLINE`] (a node just started learns the leaders first).
async fn until_written(conn: &mut Conn, parts: &[&str]) -> Result<(), String> {
    let until = Instant::now() + SETUP_DEADLINE;
    loop {
        let reply = conn.one(parts).await?;
        if reply.is_ok() || matches!(reply, Reply::Int(_)) {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(format!("{}: {}", parts.join(" "), describe(&reply)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection to `addr`, retrying while the node starts.
async fn open_when_up(addr: &str) -> Result<Conn, String> {
    let until = Instant::now() + SETUP_DEADLINE;
    loop {
        match Conn::open(addr).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One round: node 3 (index 2) restarted with `--debug-txn-crash point` coordinates `MULTI
/// SET a 1 SET b 1 EXEC` over two shards and dies; then both keys are read through node 1
/// until they answer.
async fn kill_round(nodes: &mut [NodeProc], point: &str, tags: &ShardTags) -> Result<Kill, String> {
    let (a, b) = (key(&tags[0], "k"), key(&tags[1], "k"));
    let coordinator = &mut nodes[2];
    coordinator.kill9();
    coordinator.spawn()?;
    let mut via3 = open_when_up(&coordinator.resp).await?;
    for k in [&a, &b] {
        until_written(&mut via3, &["SET", k, "0"]).await?;
        until_written(&mut via3, &["DEL", k]).await?;
    }
    let mut via1 = Conn::open(&nodes[0].resp).await?;
    let replies = via3
        .call(&transaction(&[vec!["SET", &a, "1"], vec!["SET", &b, "1"]]))
        .await;
    let died = Instant::now();
    if let Ok(replies) = replies {
        return Err(format!(
            "node 3 should have died in EXEC ({point}) but answered {replies:?}"
        ));
    }
    let got_a = get_when_unlocked(&mut via1, &a).await?;
    let got_b = get_when_unlocked(&mut via1, &b).await?;
    let released = died.elapsed();
    let expected = match point {
        "after-prepares" => Reply::Bulk(Some(b"1".to_vec())),
        _ => Reply::Bulk(None),
    };
    let wrong_outcome = (got_a != expected || got_b != expected)
        .then(|| format!("a = {}, b = {}", describe(&got_a), describe(&got_b)));
    // Node 3 must really have died (not merely closed the connection).
    let child = nodes[2].child.as_mut().ok_or("node 3 has no process")?;
    let until = Instant::now() + SETUP_DEADLINE;
    while child.is_running() {
        if Instant::now() > until {
            return Err("node 3 broke its connection but did not die".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Kill {
        released,
        wrong_outcome,
    })
}

/// `rounds` kills at `point`; node 3 keeps the crash flag only for these rounds.
async fn coordinator_kills(
    nodes: &mut [NodeProc],
    point: &str,
    tags: &[ShardTags],
) -> Result<Vec<Kill>, String> {
    let plain = nodes[2].command.clone();
    nodes[2].command = plain.clone().args(["--debug-txn-crash", point]);
    let mut kills = Vec::with_capacity(tags.len());
    for (round, t) in tags.iter().enumerate() {
        let kill = kill_round(nodes, point, t).await;
        if let Ok(k) = &kill {
            eprintln!(
                "{point} round {}: locks released {} ms after the coordinator died{}",
                round + 1,
                k.released.as_millis(),
                k.wrong_outcome
                    .as_ref()
                    .map(|w| format!(" WRONG OUTCOME: {w}"))
                    .unwrap_or_default()
            );
        }
        match kill {
            Ok(k) => kills.push(k),
            Err(e) => {
                nodes[2].command = plain;
                return Err(format!("{point} round {}: {e}", round + 1));
            }
        }
    }
    nodes[2].command = plain;
    Ok(kills)
}

// ---- the run ----

/// Runs `capdb bench txn` (see the module doc).
pub async fn txn(args: TxnArgs) -> Result<(), String> {
    if args.seconds == 0 || args.clients.is_empty() || args.clients.contains(&0) {
        return Err("--seconds and every --clients count must be at least 1".into());
    }
    if args.hot_clients < 2 {
        return Err("--hot-clients must be at least 2 (no contention otherwise)".into());
    }
    crate::bench::on_local_cluster("txn", args.work_dir.clone(), async |nodes| {
        run(&args, nodes).await
    })
    .await
}

async fn run(args: &TxnArgs, nodes: &mut [NodeProc]) -> Result<(), String> {
    let http = HttpClient::new(&nodes[0].http, None)?;
    create_keyspace(&http, nodes).await?;
    let mut keys = Conn::open(&nodes[0].resp).await?;
    let most = args.clients.iter().copied().max().unwrap_or(1);
    let names: Vec<String> = (0..most).map(|i| format!("c{i}")).collect();
    let tags = shard_tags(&mut keys, &names).await?;
    warm_up(nodes, &tags[0]).await?;

    eprintln!("{} s per case; clients {:?}", args.seconds, args.clients);
    let mut measured = Vec::new();
    for &clients in &args.clients {
        for case in Case::ALL {
            let m = measure(case, nodes, &tags[..clients], args.seconds).await?;
            eprintln!(
                "  {:<22} {clients:>3} clients: p50 {:.2} ms, p99 {:.2} ms, {:.0} ops/s",
                case.name(),
                m.p50_ms,
                m.p99_ms,
                m.ops_per_s
            );
            measured.push(m);
        }
    }
    let hot_tags = shard_tags(&mut keys, &["hot".to_string()]).await?;
    let hot = contention(nodes, &hot_tags[0], args.hot_clients, args.seconds).await?;

    let points: &[&str] = match args.crash_point.as_str() {
        "both" => &["after-prepares", "after-one-prepare"],
        one => &[one],
    };
    let mut kills = Vec::new();
    if args.kill_rounds > 0 {
        for point in points {
            let names: Vec<String> = (0..args.kill_rounds)
                .map(|r| format!("kill-{point}-{r}"))
                .collect();
            let tags = shard_tags(&mut keys, &names).await?;
            kills.push((*point, coordinator_kills(nodes, point, &tags).await?));
        }
    }

    print_throughput(&measured, args.seconds);
    print_targets(&measured);
    print_contention(&hot, args.seconds);
    print_kills(&kills);
    Ok(())
}

/// Waits for every node to be ready, creates the keyspace and waits until every node knows it.
async fn create_keyspace(http: &HttpClient, nodes: &[NodeProc]) -> Result<(), String> {
    let until = Instant::now() + SETUP_DEADLINE;
    crate::bench::create_cp_keyspace(http, KEYSPACE, SHARDS, until).await?;
    for n in nodes {
        loop {
            match Conn::open(&n.resp).await {
                Ok(_) => break,
                Err(e) if Instant::now() > until => {
                    return Err(format!("node {}: {e}", n.id));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// A write to every shard through every node, retried until it succeeds: every shard has a
/// leader and every node routes to it before anything is timed.
async fn warm_up(nodes: &[NodeProc], tags: &ShardTags) -> Result<(), String> {
    for n in nodes {
        let mut conn = Conn::open(&n.resp).await?;
        for tag in tags {
            until_written(&mut conn, &["SET", &key(tag, "warm"), VALUE]).await?;
        }
    }
    Ok(())
}

// ---- the report ----

fn print_throughput(measured: &[Measured], seconds: u64) {
    println!();
    println!(
        "### Transactions vs SET (3 nodes, cp keyspace of 4 shards x 3 replicas, {seconds} s per row, clients spread over the nodes, no contention)"
    );
    println!();
    println!(
        "| case | clients | p50 ms | p99 ms | ops/s | p50 / SET | p99 / SET | ops/s / SET | failed | retried attempts | storage commits / op | commit µs / op (of it redb) | WAL syncs / op | WAL µs / op |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in measured {
        let set = baseline(measured, m.clients);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {} | {} | {:.1} | {:.0} ({:.0}) | {:.1} | {:.0} |",
            m.case.name(),
            m.clients,
            m.p50_ms,
            m.p99_ms,
            m.ops_per_s,
            ratio(m.p50_ms, set.map(|s| s.p50_ms)),
            ratio(m.p99_ms, set.map(|s| s.p99_ms)),
            ratio(m.ops_per_s, set.map(|s| s.ops_per_s)),
            m.failures,
            m.retried,
            m.commits_per_op,
            m.commit_us_per_op,
            m.sync_us_per_op,
            m.wal_syncs_per_op,
            m.wal_us_per_op
        );
    }
    for m in measured.iter().filter(|m| m.failures > 0) {
        println!(
            "\n{} at {} clients: {} failed, first: {}",
            m.case.name(),
            m.clients,
            m.failures,
            m.first_failure.as_deref().unwrap_or("?")
        );
    }
}

fn baseline(measured: &[Measured], clients: usize) -> Option<&Measured> {
    measured
        .iter()
        .find(|s| s.case == Case::Set && s.clients == clients)
}

fn ratio(x: f64, of: Option<f64>) -> f64 {
    match of {
        Some(b) if b > 0.0 => x / b,
        _ => f64::NAN,
    }
}

/// Issue 13's targets, met or not, per client count.
fn print_targets(measured: &[Measured]) {
    println!();
    println!("### Targets");
    println!();
    println!("| target | clients | measured | met |");
    println!("|---|---:|---:|---|");
    for m in measured {
        let Some(set) = baseline(measured, m.clients) else {
            continue;
        };
        let checks: Vec<(&str, f64, bool)> = match m.case {
            Case::Set => continue,
            Case::ExecOneShard => {
                let r = ratio(m.p50_ms, Some(set.p50_ms));
                vec![("1-shard EXEC p50 <= 1.1x SET", r, r <= 1.1)]
            }
            Case::ExecTwoShards | Case::ExecFourShards => {
                let (p50, p99, ops) = (
                    ratio(m.p50_ms, Some(set.p50_ms)),
                    ratio(m.p99_ms, Some(set.p99_ms)),
                    ratio(m.ops_per_s, Some(set.ops_per_s)),
                );
                let four = m.case == Case::ExecFourShards;
                vec![
                    (
                        if four {
                            "4-shard EXEC p50 <= 1.5x SET"
                        } else {
                            "2-shard EXEC p50 <= 1.5x SET"
                        },
                        p50,
                        p50 <= 1.5,
                    ),
                    (
                        if four {
                            "4-shard EXEC p99 <= 2x SET"
                        } else {
                            "2-shard EXEC p99 <= 2x SET"
                        },
                        p99,
                        p99 <= 2.0,
                    ),
                    (
                        if four {
                            "4-shard EXEC ops/s >= 1/3 SET"
                        } else {
                            "2-shard EXEC ops/s >= 1/3 SET"
                        },
                        ops,
                        ops >= 1.0 / 3.0,
                    ),
                ]
            }
        };
        for (name, value, met) in checks {
            println!(
                "| {name} | {} | {value:.2}x | {} |",
                m.clients,
                if met { "yes" } else { "**no**" }
            );
        }
    }
    println!(
        "\nA cross-shard EXEC answers once every shard has prepared (one Raft round per shard, \
         in parallel; the replies come with the votes); the commits follow in the background."
    );
}

fn print_contention(hot: &Contention, seconds: u64) {
    println!();
    println!(
        "### Hot keys: {} clients, `MULTI INCR a INCR b EXEC`, a and b on 2 shards, {seconds} s",
        hot.clients
    );
    println!();
    println!(
        "| committed | ops/s | p50 ms | p99 ms | -TRYAGAIN | -UNCERTAIN | other | retried attempts | recovered orphans | a | b | a == b == committed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
        hot.committed,
        hot.ops_per_s,
        hot.p50_ms,
        hot.p99_ms,
        hot.tryagain,
        hot.uncertain,
        hot.other,
        hot.retried,
        hot.recovered,
        hot.a,
        hot.b,
        if hot.consistent() { "yes" } else { "**NO**" }
    );
    if let Some(first) = &hot.first_other {
        println!("\nfirst other answer: {first}");
    }
}

fn print_kills(kills: &[(&str, Vec<Kill>)]) {
    if kills.is_empty() {
        return;
    }
    let target = ELECTION_TIMEOUT_MAX_MS + 1_000;
    println!();
    println!(
        "### Coordinator killed mid-EXEC (node 3, `--debug-txn-crash`): death to locks released"
    );
    println!();
    println!(
        "| crash point | rounds | each (ms) | p50 ms | p99 ms | max ms | target ms | wrong outcomes |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for (point, rounds) in kills {
        let mut ms: Vec<u32> = rounds
            .iter()
            .map(|k| k.released.as_millis().min(u32::MAX as u128) as u32)
            .collect();
        let each = ms.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        ms.sort_unstable();
        println!(
            "| {point} | {} | {each} | {} | {} | {} | {target} | {} |",
            ms.len(),
            quantile(&ms, 0.50),
            quantile(&ms, 0.99),
            ms.last().copied().unwrap_or(0),
            rounds.iter().filter(|k| k.wrong_outcome.is_some()).count()
        );
    }
    for (point, rounds) in kills {
        for (i, k) in rounds.iter().enumerate() {
            if let Some(w) = &k.wrong_outcome {
                println!("\n{point} round {}: wrong outcome: {w}", i + 1);
            }
        }
    }
    println!(
        "\nTarget: election timeout (~{ELECTION_TIMEOUT_MAX_MS} ms) + 1 s. Expected instead: about \
         the lock deadline ({LOCK_HOLD_MS} ms from the prepare) plus up to one orphan recovery \
         period ({RECOVERY_PERIOD_MS} ms) plus the recovery's own steps (a round of prevents \
         or commits through the shards' leaders)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(wire: &str) -> Result<Reply, String> {
        let mut r = BufReader::new(wire.as_bytes());
        read_reply(&mut r).await
    }

    #[tokio::test]
    async fn an_exec_array_keeps_errors_and_nested_replies_in_place() {
        let got = parse("*4\r\n+OK\r\n-TRYAGAIN locked\r\n:7\r\n$3\r\nabc\r\n")
            .await
            .unwrap();
        assert_eq!(
            got,
            Reply::Array(Some(vec![
                Reply::Status("OK".into()),
                Reply::Error("TRYAGAIN locked".into()),
                Reply::Int(7),
                Reply::Bulk(Some(b"abc".to_vec())),
            ]))
        );
    }

    #[tokio::test]
    async fn null_bulk_and_null_array_are_nil() {
        assert_eq!(parse("$-1\r\n").await.unwrap(), Reply::Bulk(None));
        assert_eq!(parse("*-1\r\n").await.unwrap(), Reply::Array(None));
    }

    #[tokio::test]
    async fn a_cut_reply_is_an_error_not_a_value() {
        assert!(parse("*2\r\n+OK\r\n").await.is_err());
        assert!(parse("$5\r\nab").await.is_err());
    }

    #[test]
    fn a_transaction_answer_is_its_exec_array_or_what_came_instead() {
        let ok = Reply::Status("OK".into());
        let queued = Reply::Status("QUEUED".into());
        let exec = Reply::Array(Some(vec![ok.clone()]));
        assert_eq!(
            exec_replies(vec![ok.clone(), queued.clone(), exec]),
            Ok(vec![ok.clone()])
        );
        let tryagain = Reply::Error("TRYAGAIN locked".into());
        assert_eq!(
            exec_replies(vec![ok.clone(), queued.clone(), tryagain.clone()]),
            Err(tryagain)
        );
        let moved = Reply::Error("MOVED 1 x".into());
        assert_eq!(
            exec_replies(vec![ok, moved.clone(), Reply::Error("EXECABORT".into())]),
            Err(moved)
        );
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
