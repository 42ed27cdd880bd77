//! `capdb difftest`: the command-line face of the `capdb-difftest` crate (seeded random
//! commands sent to a real redis-server and to capdb, every reply compared).
//!
//! Exit codes: 0 when no reply differed, 1 on a difference, 2 when the harness itself could
//! not run (a server would not start, bad flags).

use std::path::PathBuf;
use std::process::ExitCode;

use capdb_difftest::{Mode, Options};

const EXAMPLES: &str = "\
Examples:
  capdb difftest --mode cp --seed 1 --commands 100000
  capdb difftest --mode cache --seed 7 --commands 5000 --resp3-percent 100
  capdb difftest --mode ap --seed 3 --commands 100000 --redis-server /usr/bin/redis-server
  capdb difftest --mode cp --seed 1 --commands 20000 --capdb-arg=--debug-plant-difference --minimize
  capdb difftest --mode cp-shards --seed 7 --commands 100000

It starts its own redis-server (--save '' --appendonly no) and one capdb node on free loopback
ports. On the first difference it prints the seed, the command's index, the command and both
replies, and writes the command list to OUT/<mode>-<seed>.txt (with --minimize, a short
reproduction to OUT/<mode>-<seed>.min.txt). Every command family runs in every mode.";

#[derive(clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct DifftestArgs {
    /// Keyspace mode under test: cp, ap (one node), cache, or cp-shards (cp on 4 shards, each
    /// command queued in MULTI under its own shard's hash tag: cross-shard transactions).
    #[arg(long, default_value = "cp")]
    mode: String,
    /// Seed of the command list: the same seed replays the same commands.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Commands to send (a SCAN walk counts as one).
    #[arg(long, default_value_t = 10_000)]
    commands: u64,
    /// The reference server.
    #[arg(long, default_value = "redis-server", value_name = "PATH")]
    redis_server: PathBuf,
    /// The capdb binary to test [default: this executable].
    #[arg(long, value_name = "PATH")]
    capdb: Option<PathBuf>,
    /// An extra `capdb server` argument (repeat for several), e.g.
    /// --capdb-arg=--debug-plant-difference to prove the harness finds a planted difference.
    #[arg(long = "capdb-arg", value_name = "ARG", allow_hyphen_values = true)]
    capdb_args: Vec<String>,
    /// Percentage of commands sent over RESP3 connections (after HELLO 3).
    #[arg(long, default_value_t = 50)]
    resp3_percent: u64,
    /// Most commands per pipeline.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Where a difference's command list is written.
    #[arg(long, default_value = "target/difftest", value_name = "DIR")]
    out: PathBuf,
    /// On a difference, cut the command list down to a short reproduction.
    #[arg(long)]
    minimize: bool,
}

pub fn main(args: DifftestArgs) -> ExitCode {
    let mode: Mode = match args.mode.parse() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let capdb = match args.capdb.map_or_else(std::env::current_exe, Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find this executable ({e}); pass --capdb PATH");
            return ExitCode::from(2);
        }
    };
    let options = Options {
        redis_server: args.redis_server,
        capdb,
        capdb_args: args.capdb_args,
        resp3_percent: args.resp3_percent.min(100),
        batch: args.batch,
        out_dir: args.out,
        minimize: args.minimize,
        ..Options::new(mode, args.seed, args.commands)
    };
    match capdb_difftest::run(&options, &mut std::io::stdout()) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Ok(outcome) => {
            let classes: Vec<String> = outcome
                .classes
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            println!("replies compared per class: {}", classes.join(", "));
            match outcome.difference {
                None => {
                    println!(
                        "no difference in {} commands (mode {mode}, seed {})",
                        outcome.compared, options.seed
                    );
                    ExitCode::SUCCESS
                }
                Some(d) => {
                    println!("DIFFERENCE (mode {mode}, seed {}):\n{d}", options.seed);
                    if let Some(f) = &d.file {
                        println!("command list: {}", f.display());
                    }
                    if let Some(min) = &d.minimized {
                        println!("minimised to {} commands:", min.len());
                        for (s, resp3) in min {
                            println!(
                                "  {} {}",
                                if *resp3 { "resp3" } else { "resp2" },
                                capdb_difftest::resp::command_line(&s.args)
                            );
                        }
                    }
                    ExitCode::from(1)
                }
            }
        }
    }
}
