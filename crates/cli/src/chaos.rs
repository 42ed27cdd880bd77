//! `capdb chaos run|check|clean`: the command-line face of the `capdb-chaos` crate.
//!
//! Exit codes: 0 when every check passed, 1 on a violation or an unknown verdict, 2 when the
//! harness itself failed (no root, bad flags, nodes that never started, a malformed history).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use capdb_chaos::check::{self, Validity};
use capdb_chaos::history::Workload;
use capdb_chaos::nemesis::Kind;

const RUN_EXAMPLES: &str = "\
Examples (as root):
  capdb chaos run --duration 120 --seed 7 --out chaos-out
  capdb chaos run --duration 1200 --seed 42 --out long --nemesis all --nodes 5
  capdb chaos run --duration 60 --nemesis partition-leader --workload register --unsafe-reads --out broken
  capdb chaos run --duration 60 --seed 3 --nodes 3 --workload cas,counter --nemesis kill-leader \
      --rate 300 --quiet 3 --fault-min 3 --fault-max 5 --out forwarded
      (writes through followers while the shard leader is killed: catches writes applied twice)
  capdb chaos run --duration 30 --seed 11 --nodes 3 --nemesis partition,kill,kill-leader \
      --workload bank --shards 3 --out bank
      (transfers between accounts on three shards; every read of the bank must sum to the total)
  capdb chaos run --server-bin old/capdb ...   (this harness driving another server build)
  capdb chaos check chaos-out/history.jsonl

Output: DIR/report.json (ops, ok, fail, info, valid, seed, windows, latency, evidence),
DIR/history.jsonl (every operation and fault), DIR/timeline.svg, DIR/nodes/node-N.log.";

// Parsed once per process: the size of the `Run` variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum ChaosOp {
    /// Start a cluster in network namespaces, run workloads under faults, check the history.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Re-check a saved history.  Example: capdb chaos check out/history.jsonl
    Check {
        history: PathBuf,
        /// Seconds the linearizability search may spend per key.
        #[arg(long, default_value_t = 20)]
        key_budget_secs: u64,
    },
    /// Remove namespaces left by runs that were killed outright.
    Clean,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Seconds of workload under faults (recovery and final reads come after).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seed of the fault plan and the workload's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for report.json, history.jsonl, timeline.svg and node logs.
    #[arg(long, default_value = "chaos-out")]
    out: PathBuf,
    /// Nodes in the cluster (3 to 9).
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Shards of the cp keyspace `default` (every node's --default-shards). With more than
    /// one, the append and bank workloads' transactions span shards.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Concurrent clients, spread over the nodes.
    #[arg(long, default_value_t = 10)]
    clients: u32,
    /// Target operations per second, all clients together.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Workloads, comma-separated: register, cas (compare-and-set heavy registers on one
    /// shard), counter, set (appends to a string), sadd (SADD/SMEMBERS on Redis sets), hset
    /// (HSET/HKEYS on Redis hashes), append (MULTI/EXEC transactions of RPUSH and LRANGE,
    /// checked for strict serializability; cp only), bank (transfers under WATCH and reads of
    /// every account in MULTI/EXEC: every read must sum to the total; cp only), or all
    /// (register, counter, set, sadd, hset; without register in --mode ap).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    workload: Vec<String>,
    /// Nemeses, comma-separated: partition, partition-leader (always cut the workload shard's
    /// leader off), kill, pause, loss, clock, kill-leader (kill -9 the workload shard's leader
    /// while writes are being forwarded to it), all (every one but partition-leader), or none.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    nemesis: Vec<String>,
    /// Where clients connect: mixed (they move between nodes, three in four times to a
    /// follower of the workload's shard, so writes take the forwarding path) or fixed (client
    /// c always talks to node c % nodes + 1).
    #[arg(long, default_value = "mixed")]
    route: String,
    /// Keyspace mode under test: cp (linearizability of registers, counters, sets) or ap
    /// (acknowledged quorum writes survive, concurrent increments all count, replicas converge).
    #[arg(long, default_value = "cp")]
    mode: String,
    /// Quiet seconds between fault windows.
    #[arg(long, default_value_t = 5)]
    quiet: u64,
    /// Shortest fault window, seconds.
    #[arg(long, default_value_t = 5)]
    fault_min: u64,
    /// Longest fault window, seconds.
    #[arg(long, default_value_t = 15)]
    fault_max: u64,
    /// Seconds between the final heal and the final reads.
    #[arg(long, default_value_t = 10)]
    recovery: u64,
    /// Run the nodes with --debug-unsafe-local-reads (a deliberately broken mode the checker
    /// must flag).
    #[arg(long)]
    unsafe_reads: bool,
    /// An extra argument for every node's `capdb server` (repeat it for several), e.g.
    /// --server-arg=--debug-apply-duplicates to break exactly-once on purpose.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// The capdb binary to run as nodes [default: this executable], e.g. an older build to
    /// test with this harness.
    #[arg(long = "server-bin", visible_alias = "binary")]
    server_bin: Option<PathBuf>,
    /// Seconds the linearizability search may spend per key.
    #[arg(long, default_value_t = 20)]
    key_budget_secs: u64,
}

fn parse_workloads(names: &[String]) -> Result<Vec<Workload>, String> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "all" => out.extend([
                Workload::Register,
                Workload::Counter,
                Workload::Set,
                Workload::Sadd,
                Workload::Hset,
            ]),
            "register" => out.push(Workload::Register),
            "cas" => out.push(Workload::Cas),
            "counter" => out.push(Workload::Counter),
            "set" => out.push(Workload::Set),
            "sadd" => out.push(Workload::Sadd),
            "hset" => out.push(Workload::Hset),
            "append" => out.push(Workload::Append),
            "bank" => out.push(Workload::Bank),
            "stream" => out.push(Workload::Stream),
            "view" => out.push(Workload::View),
            other => {
                return Err(format!(
                    "unknown workload '{other}': expected register, cas, counter, set, sadd, hset, append, bank, stream, view or all"
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn parse_nemeses(names: &[String]) -> Result<Vec<Kind>, String> {
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "all" => out.extend(Kind::ALL),
            "none" => {}
            other => out.push(Kind::parse(other)?),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn limits(key_budget_secs: u64) -> check::Limits {
    check::Limits {
        per_key: Duration::from_secs(key_budget_secs.max(1)),
        ..Default::default()
    }
}

fn harness_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("chaos: harness error: {msg}");
    ExitCode::from(2)
}

fn verdict_code(validity: Validity) -> ExitCode {
    match validity {
        Validity::Valid => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// Runs one `capdb chaos` subcommand (exit codes: see the module doc).
pub async fn main(op: ChaosOp) -> ExitCode {
    match op {
        ChaosOp::Clean => match capdb_chaos::net::clean_all() {
            Ok(removed) => {
                println!(
                    "removed {} namespaces: {}",
                    removed.len(),
                    removed.join(" ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => harness_error(e),
        },
        ChaosOp::Check {
            history,
            key_budget_secs,
        } => check_history(history, key_budget_secs).await,
        ChaosOp::Run(a) => {
            let out = a.out.clone();
            let opts = match run_options(a) {
                Ok(o) => o,
                Err(e) => return harness_error(e),
            };
            match capdb_chaos::run::run(opts).await {
                Ok(outcome) => print_outcome(&outcome, &out),
                Err(e) => harness_error(e),
            }
        }
    }
}

/// `capdb chaos check`: re-checks a saved history and prints the verdict as JSON.
async fn check_history(history: PathBuf, key_budget_secs: u64) -> ExitCode {
    let records = match capdb_chaos::history::read(&history) {
        Ok(r) => r,
        Err(e) => return harness_error(e),
    };
    let result =
        match tokio::task::spawn_blocking(move || check::check(&records, limits(key_budget_secs)))
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return harness_error(e),
            Err(e) => return harness_error(e),
        };
    let out = serde_json::json!({
        "valid": result.validity.to_json(),
        "problems": result.problems,
        "checks": result.details,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    verdict_code(result.validity)
}

/// The options of `capdb chaos run`, or why the flags are unusable.
fn run_options(a: RunArgs) -> Result<capdb_chaos::run::Options, String> {
    let workloads = parse_workloads(&a.workload)?;
    let nemeses = parse_nemeses(&a.nemesis)?;
    let ap = match a.mode.as_str() {
        "cp" => false,
        "ap" => true,
        other => return Err(format!("--mode {other}: expected cp or ap")),
    };
    // ap keyspaces promise convergence, not linearizability: no register workload.
    let workloads = if ap && a.workload == ["all"] {
        workloads.into_iter().filter(|w| !w.is_register()).collect()
    } else {
        workloads
    };
    if ap && workloads.contains(&Workload::Append) {
        return Err(
            "--workload append checks strict serializability, which ap keyspaces do not promise"
                .into(),
        );
    }
    if ap && workloads.contains(&Workload::View) {
        return Err("--workload view keeps a view of a cp keyspace; ap keyspaces have none".into());
    }
    if ap && workloads.contains(&Workload::Bank) {
        return Err(
            "--workload bank needs atomic transactions under WATCH, which ap keyspaces do not offer"
                .into(),
        );
    }
    if ap && a.shards != 1 {
        return Err(
            "--shards sets the cp keyspace's shards; it has no effect with --mode ap".into(),
        );
    }
    if !(1..=capdb_chaos::run::SHARDS_MAX).contains(&a.shards) {
        return Err(format!(
            "--shards must be 1 to {}",
            capdb_chaos::run::SHARDS_MAX
        ));
    }
    if a.fault_min == 0 || a.fault_min > a.fault_max {
        return Err("--fault-min must be at least 1 and at most --fault-max".into());
    }
    let route = capdb_chaos::route::Route::parse(&a.route)?;
    let binary = a
        .server_bin
        .map_or_else(std::env::current_exe, Ok)
        .map_err(|e| format!("cannot find the capdb binary: {e}"))?;
    if !binary.is_file() {
        return Err(format!("--server-bin {}: no such file", binary.display()));
    }
    Ok(capdb_chaos::run::Options {
        duration: Duration::from_secs(a.duration),
        seed: a.seed,
        out: a.out,
        nodes: a.nodes,
        shards: a.shards,
        clients: a.clients.max(1),
        rate: a.rate.max(1),
        workloads,
        nemeses,
        quiet: Duration::from_secs(a.quiet),
        fault_min: Duration::from_secs(a.fault_min),
        fault_max: Duration::from_secs(a.fault_max),
        recovery: Duration::from_secs(a.recovery),
        unsafe_reads: a.unsafe_reads,
        server_args: a.server_arg,
        binary,
        limits: limits(a.key_budget_secs),
        ap,
        route,
    })
}

/// Prints a run's summary (problems, availability per window, where the report is) and
/// returns its exit code.
fn print_outcome(outcome: &capdb_chaos::run::Outcome, out: &Path) -> ExitCode {
    let r = &outcome.report;
    println!(
        "chaos: seed {} | {} ops: {} ok, {} fail, {} info | valid: {}",
        r["seed"], r["ops"], r["ok"], r["fail"], r["info"], r["valid"]
    );
    for p in r["problems"].as_array().into_iter().flatten() {
        println!("  problem: {}", p.as_str().unwrap_or_default());
    }
    for w in r["windows"].as_array().into_iter().flatten() {
        println!(
            "  window {:>3} avail {:>5} ops {:>5}  {}",
            w["window"],
            w["availability"],
            w["ops"],
            w["fault"].as_str().unwrap_or_default()
        );
    }
    println!("chaos: report in {}", out.join("report.json").display());
    outcome.exit_code_as()
}

trait ExitCodeAs {
    fn exit_code_as(&self) -> ExitCode;
}

impl ExitCodeAs for capdb_chaos::run::Outcome {
    fn exit_code_as(&self) -> ExitCode {
        ExitCode::from(self.exit_code() as u8)
    }
}
