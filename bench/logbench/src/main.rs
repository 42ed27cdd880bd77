//! Raft log engines on this machine's disk, side by side in one run (issue 18).
//!
//! Closed loop, one thread, one batch in flight: each batch carries `B` entries for each of `G`
//! groups (`G * B` entries, 100-300 byte payloads) and is durable (fdatasync) before the next
//! starts. Engines:
//!
//! - `redb`: as capdb uses it today: one table `raftlog/{g}` per group, one write transaction
//!   per batch, `Durability::Immediate`;
//! - `seglog`: a minimal segment log: preallocated, zero-filled once, recycled segment files;
//!   records `[len, crc32, group, index, payload]`, one `pwrite` + `fdatasync` per batch;
//! - `raft-engine`: TiKV's multi-Raft log engine, `write(batch, sync = true)`, log recycling on.
//!
//! And the physical floor in the same run: fdatasync of a 4 KiB overwrite of a pre-zeroed file,
//! and of a 4 KiB append that grows a file.
//!
//! Every configuration runs once per round, rounds interleaved; the summary gives medians over
//! rounds. Usage: `logbench [--dir D] [--rounds N] [--secs S] [--groups 1,2,4]
//! [--batches 1,16,64] [--engines floor,redb,seglog,raft-engine]`.

mod engines;
mod floor;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What fails the bench: a message, printed and exit 1. No I/O error is ever ignored.
pub type Result<T> = std::result::Result<T, String>;

/// An error with what was being done.
pub fn ctx<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// One entry to append.
pub struct Entry<'a> {
    pub group: u64,
    pub index: u64,
    pub payload: &'a [u8],
}

/// A log engine under test: `append` returns once every entry of the batch is durable.
pub trait LogEngine {
    fn append(&mut self, batch: &[Entry<'_>]) -> Result<()>;
    /// Next index to use for `group` (engines keep their logs across runs).
    fn next_index(&self, group: u64) -> u64;
}

struct Args {
    dir: PathBuf,
    rounds: usize,
    secs: f64,
    groups: Vec<u64>,
    batches: Vec<usize>,
    engines: Vec<String>,
}

fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| format!("bad {what}: {x}")))
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("/tmp/logbench"),
        rounds: 5,
        secs: 1.5,
        groups: vec![1, 2, 4],
        batches: vec![1, 16, 64],
        engines: ["floor", "redb", "seglog", "raft-engine"]
            .map(String::from)
            .to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(val()?),
            "--rounds" => a.rounds = val()?.parse().map_err(ctx("--rounds"))?,
            "--secs" => a.secs = val()?.parse().map_err(ctx("--secs"))?,
            "--groups" => a.groups = parse_list(&val()?, "group count")?,
            "--batches" => a.batches = parse_list(&val()?, "batch size")?,
            "--engines" => a.engines = parse_list(&val()?, "engine")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Result of one run of one configuration.
#[derive(Clone, Copy)]
struct Run {
    p50_us: f64,
    p99_us: f64,
    entries_per_s: f64,
    batches: usize,
    /// Share of batches whose fsync took ≥ 2 ms (the disk's slow mode).
    slow_share: f64,
    /// CPU time of the whole process (user + system, every thread) per batch.
    cpu_us_per_batch: f64,
}

/// User + system CPU time of the process so far, in µs.
fn process_cpu_us() -> Result<f64> {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()));
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Ok(us(ru.ru_utime) + us(ru.ru_stime))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn summarize(mut lat_ns: Vec<u64>, entries: usize, elapsed: Duration, cpu_us: f64) -> Run {
    lat_ns.sort_unstable();
    let slow = lat_ns.iter().filter(|&&l| l >= 2_000_000).count();
    Run {
        p50_us: percentile(&lat_ns, 0.50),
        p99_us: percentile(&lat_ns, 0.99),
        entries_per_s: entries as f64 / elapsed.as_secs_f64(),
        batches: lat_ns.len(),
        slow_share: slow as f64 / lat_ns.len().max(1) as f64,
        cpu_us_per_batch: cpu_us / lat_ns.len().max(1) as f64,
    }
}

/// Payloads of 100-300 bytes, deterministic.
fn payloads() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..1024)
        .map(|_| {
            let len = 100 + (next() % 201) as usize;
            (0..len).map(|_| next() as u8).collect()
        })
        .collect()
}

/// Appends batches of `per_group` entries for each of `groups` groups for `secs` seconds.
fn drive(
    engine: &mut dyn LogEngine,
    groups: u64,
    per_group: usize,
    secs: f64,
    pool: &[Vec<u8>],
) -> Result<Run> {
    let mut lat = Vec::with_capacity(1 << 16);
    let mut entries = 0usize;
    let mut p = 0usize;
    let mut batch: Vec<Entry<'_>> = Vec::with_capacity(groups as usize * per_group);
    let limit = Duration::from_secs_f64(secs);
    let cpu0 = process_cpu_us()?;
    let start = Instant::now();
    while start.elapsed() < limit || lat.len() < 20 {
        batch.clear();
        for g in 0..groups {
            let first = engine.next_index(g);
            for i in 0..per_group as u64 {
                p = (p + 1) % pool.len();
                batch.push(Entry {
                    group: g,
                    index: first + i,
                    payload: &pool[p],
                });
            }
        }
        let t = Instant::now();
        engine.append(&batch)?;
        lat.push(t.elapsed().as_nanos() as u64);
        entries += batch.len();
    }
    let elapsed = start.elapsed();
    Ok(summarize(lat, entries, elapsed, process_cpu_us()? - cpu0))
}

#[derive(Clone, PartialEq)]
struct Config {
    engine: String,
    groups: u64,
    per_group: usize,
}

impl Config {
    fn label(&self) -> String {
        if self.engine.starts_with("floor") {
            self.engine.clone()
        } else {
            format!("{} G={} B={}", self.engine, self.groups, self.per_group)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn open_engine(name: &str, dir: &Path) -> Result<Box<dyn LogEngine>> {
    Ok(match name {
        "redb" => Box::new(engines::redb::RedbLog::open(&dir.join("redb"))?),
        "seglog" => Box::new(engines::seglog::SegLog::open(&dir.join("seglog"))?),
        "raft-engine" => Box::new(engines::raftengine::RaftEngineLog::open(
            &dir.join("raft-engine"),
        )?),
        other => return Err(format!("unknown engine {other}")),
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("logbench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let a = parse_args()?;
    std::fs::create_dir_all(&a.dir).map_err(ctx(format!("create {}", a.dir.display())))?;
    let fs = filesystem_of(&a.dir);
    println!(
        "# logbench: dir {} ({fs}), {} rounds x {} s per configuration, payloads 100-300 B",
        a.dir.display(),
        a.rounds,
        a.secs
    );
    let pool = payloads();

    let mut configs = Vec::new();
    for e in &a.engines {
        if e == "floor" {
            for f in ["floor-overwrite-4k", "floor-append-4k"] {
                configs.push(Config {
                    engine: f.into(),
                    groups: 1,
                    per_group: 1,
                });
            }
            continue;
        }
        for &g in &a.groups {
            for &b in &a.batches {
                configs.push(Config {
                    engine: e.clone(),
                    groups: g,
                    per_group: b,
                });
            }
        }
    }

    // Engines are opened once (setup, preallocation, zero-fill) and kept across rounds.
    let setup = Instant::now();
    let mut opened: Vec<(String, Box<dyn LogEngine>)> = Vec::new();
    for e in &a.engines {
        let t = Instant::now();
        if e == "floor" {
            floor::prepare(&a.dir.join("floor"))?;
        } else {
            opened.push((e.clone(), open_engine(e, &a.dir)?));
        }
        println!("# opened {e} in {:.2} s", t.elapsed().as_secs_f64());
    }
    println!("# setup {:.1} s", setup.elapsed().as_secs_f64());

    let mut results: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
    for round in 0..a.rounds {
        // Rotate the order each round so no configuration always follows the same one.
        let n = configs.len();
        for k in 0..n {
            let i = (k + round * 7) % n;
            let c = &configs[i];
            let run = if c.engine.starts_with("floor") {
                let mode = if c.engine == "floor-overwrite-4k" {
                    floor::Mode::Overwrite
                } else {
                    floor::Mode::Append
                };
                let cpu0 = process_cpu_us()?;
                let (lat, elapsed) = floor::run(&a.dir.join("floor"), mode, a.secs)?;
                let n = lat.len();
                summarize(lat, n, elapsed, process_cpu_us()? - cpu0)
            } else {
                let (_, engine) = opened
                    .iter_mut()
                    .find(|(e, _)| *e == c.engine)
                    .ok_or("engine not opened")?;
                drive(engine.as_mut(), c.groups, c.per_group, a.secs, &pool)?
            };
            println!(
                "round {round} {:<28} batches {:>6} p50 {:>8.1} us p99 {:>8.1} us {:>10.0} entries/s slow(>=2ms) {:>5.1}% cpu/batch {:>6.1} us",
                c.label(),
                run.batches,
                run.p50_us,
                run.p99_us,
                run.entries_per_s,
                run.slow_share * 100.0,
                run.cpu_us_per_batch
            );
            results[i].push(run);
        }
    }

    println!();
    println!(
        "## Medians over {} rounds (per-batch latency; entries/s = G x B x batches/s)",
        a.rounds
    );
    println!();
    println!(
        "| configuration | p50 µs | p99 µs | entries/s | batches/s | CPU µs/batch | slow-mode batches |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (c, runs) in configs.iter().zip(&results) {
        let per = (c.groups as usize * c.per_group) as f64;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% |",
            c.label(),
            median(runs.iter().map(|r| r.p50_us).collect()),
            median(runs.iter().map(|r| r.p99_us).collect()),
            median(runs.iter().map(|r| r.entries_per_s).collect()),
            median(runs.iter().map(|r| r.entries_per_s / per).collect()),
            median(runs.iter().map(|r| r.cpu_us_per_batch).collect()),
            median(runs.iter().map(|r| r.slow_share * 100.0).collect()),
        );
    }
    Ok(())
}

/// The filesystem type and device of `dir`, from /proc/self/mounts (longest matching prefix).
fn filesystem_of(dir: &Path) -> String {
    let Ok(abs) = std::fs::canonicalize(dir) else {
        return "unknown filesystem".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown filesystem".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if abs.starts_with(f[1]) && best.as_ref().is_none_or(|(l, _)| f[1].len() > *l) {
            best = Some((f[1].len(), format!("{} on {} ({})", f[2], f[0], f[1])));
        }
    }
    best.map_or_else(|| "unknown filesystem".into(), |(_, s)| s)
}
