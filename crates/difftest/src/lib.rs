//! Differential testing of capdb against a real `redis-server`: a seeded generator of random
//! command sequences over every supported command and type, sent to both servers side by side,
//! every reply compared byte for byte, error texts included.
//!
//! # Why a black box
//!
//! The harness speaks RESP over TCP only and starts both servers itself (`redis-server
//! --save '' --appendonly no`, and one `capdb server` node through `capdb-launch`), so it tests
//! what a client sees: the parser, the command table, the keyspace engine of the mode under
//! test (`cp`, `ap` with one node, or `cache`) and the reply encoder, RESP2 and RESP3. Mode
//! `cp-shards` is `cp` on a keyspace of 4 shards with transactions spread over them
//! ([`Mode::CpShards`]): cross-shard MULTI/EXEC, reply for reply.
//!
//! # How a run goes
//!
//! 1. Both servers start; every command a family generates is probed on both (a command capdb
//!    does not serve yet is left out of the mix and listed).
//! 2. The seed names the command list ([`gen`]) and which stretches of it go over RESP3
//!    connections (after `HELLO 3`).
//! 3. Commands go to both servers in pipelines of up to `batch` ([`exec`]); each reply is read
//!    as raw bytes and compared by its command's class ([`compare::CLASSES`]: exact unless a
//!    reviewed row says otherwise). SCAN-family walks and random writes run alone, because the
//!    harness must look at their replies before going on.
//! 4. On the first difference the run stops: the seed, the command's index, the command and
//!    both replies are printed, the command list is written to a file, and with `minimize` the
//!    list is cut down (replayed on the same servers after FLUSHDB) to a short reproduction.
//!
//! Every family runs in every mode: an `ap` keyspace with one node must answer exactly as
//! Redis does (its merge rules only show with concurrent writers on several nodes).

pub mod compare;
pub mod exec;
pub mod r#gen;
pub mod resp;
pub mod rng;
pub mod servers;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use compare::{Class, class_of, compare, show_items, walk_items};
use exec::Conn;
use r#gen::{Generator, Step};
use resp::{Frame, command_line, escape};
use servers::{Capdb, Redis};

/// The keyspace mode under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Cp,
    Ap,
    Cache,
    /// `cp-shards`: a `cp` keyspace of 4 shards (replication factor 1), and transactions
    /// spread over them: each command queued in a MULTI block gets one of
    /// [`r#gen::txn::TAGS`] (one hash tag per shard) for all its keys, WATCH before MULTI
    /// watches keys under several tags, and some commands outside blocks use the other tags
    /// too, so cross-shard EXEC replies (two-phase commit) are compared with Redis's.
    CpShards,
}

impl Mode {
    /// Whether the generator spreads a transaction's commands over the shards' hash tags.
    pub fn spreads_txn(self) -> bool {
        self == Mode::CpShards
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "cp" => Ok(Mode::Cp),
            "ap" => Ok(Mode::Ap),
            "cache" => Ok(Mode::Cache),
            "cp-shards" => Ok(Mode::CpShards),
            other => Err(format!(
                "unknown mode '{other}': use cp, ap, cache or cp-shards"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Cp => "cp",
            Mode::Ap => "ap",
            Mode::Cache => "cache",
            Mode::CpShards => "cp-shards",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub seed: u64,
    pub commands: u64,
    pub redis_server: PathBuf,
    pub capdb: PathBuf,
    /// Extra `capdb server` arguments (e.g. `--debug-plant-difference`).
    pub capdb_args: Vec<String>,
    /// Percentage of commands sent over RESP3 connections.
    pub resp3_percent: u64,
    /// Most commands per pipeline.
    pub batch: usize,
    /// Where a difference's command list is written.
    pub out_dir: PathBuf,
    pub minimize: bool,
}

impl Options {
    pub fn new(mode: Mode, seed: u64, commands: u64) -> Options {
        Options {
            mode,
            seed,
            commands,
            redis_server: PathBuf::from("redis-server"),
            capdb: PathBuf::from("capdb"),
            capdb_args: Vec::new(),
            resp3_percent: 50,
            batch: 32,
            out_dir: PathBuf::from("target/difftest"),
            minimize: false,
        }
    }
}

/// The first difference found.
#[derive(Debug, Clone)]
pub struct Difference {
    /// 0-based index of the command in the seed's list.
    pub index: usize,
    pub step: Step,
    pub resp3: bool,
    pub redis: String,
    pub capdb: String,
    pub why: String,
    /// The command list written for it.
    pub file: Option<PathBuf>,
    /// With `minimize`: a short list that still shows a difference (its last command differs).
    pub minimized: Option<Vec<(Step, bool)>>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "command #{} ({}): {}",
            self.index,
            if self.resp3 { "RESP3" } else { "RESP2" },
            command_line(&self.step.args)
        )?;
        writeln!(f, "  redis: {}", self.redis)?;
        writeln!(f, "  capdb: {}", self.capdb)?;
        write!(f, "  why:   {}", self.why)
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Commands compared (walks count once).
    pub compared: u64,
    pub difference: Option<Difference>,
    /// Replies compared per class.
    pub classes: BTreeMap<String, u64>,
    /// Commands in the mix, and commands a family lists that capdb does not serve yet.
    pub served: Vec<&'static str>,
    pub not_served: Vec<&'static str>,
    /// Mode `cp-shards`: the node's cross-shard transactions by outcome at the end (committed,
    /// watch_aborted, conflict, ...), which shows the run did span shards.
    pub cross_shard: BTreeMap<String, u64>,
}

/// One RESP2 or RESP3 connection to each server, on the keyspace under test.
struct Pair {
    redis: Conn,
    capdb: Conn,
}

struct Session {
    _redis: Redis,
    capdb: Capdb,
    /// RESP2, RESP3.
    pairs: [Pair; 2],
    batch: usize,
}

impl Session {
    fn start(o: &Options) -> Result<Session, String> {
        let redis = Redis::start(&o.redis_server)?;
        let capdb = Capdb::start(&o.capdb, o.mode, &o.capdb_args)?;
        let pair = |resp3: bool| -> Result<Pair, String> {
            let mut p = Pair {
                redis: Conn::connect("redis-server", redis.addr)?,
                capdb: Conn::connect("capdb", capdb.resp)?,
            };
            p.capdb.call_ok(&["SELECT", capdb.db])?;
            if resp3 {
                p.redis.call_ok(&["HELLO", "3"])?;
                p.capdb.call_ok(&["HELLO", "3"])?;
            }
            Ok(p)
        };
        let pairs = [pair(false)?, pair(true)?];
        Ok(Session {
            _redis: redis,
            capdb,
            pairs,
            batch: o.batch.max(1),
        })
    }

    /// Empties both keyspaces, first closing any transaction and WATCH a previous (cut short)
    /// replay left open on either connection: a minimiser's replay must not start inside one.
    fn flush(&mut self) -> Result<(), String> {
        for p in &mut self.pairs {
            for conn in [&mut p.redis, &mut p.capdb] {
                conn.call(&[b"DISCARD".to_vec()])?;
                conn.call_ok(&["UNWATCH"])?;
            }
        }
        let p = &mut self.pairs[0];
        p.redis.call_ok(&["FLUSHDB"])?;
        p.capdb.call_ok(&["FLUSHDB"])?;
        Ok(())
    }

    /// Which generated commands both servers know (a bare name answers an arity error, or
    /// runs harmlessly, unless the command is unknown).
    fn probe(&mut self) -> Result<(Vec<&'static str>, Vec<&'static str>), String> {
        let (mut served, mut not) = (Vec::new(), Vec::new());
        for name in r#gen::all_names() {
            let args = vec![name.as_bytes().to_vec()];
            let p = &mut self.pairs[0];
            let known = |f: &Frame| !(f.is_error() && f.text.starts_with(b"ERR unknown command"));
            let r = p.redis.call(&args)?;
            let c = p.capdb.call(&args)?;
            if known(&r) && known(&c) {
                served.push(name);
            } else {
                not.push(name);
            }
        }
        // Probing MULTI opened a transaction: close it (an old capdb answers an error).
        let p = &mut self.pairs[0];
        p.redis.call(&[b"DISCARD".to_vec()])?;
        p.capdb.call(&[b"DISCARD".to_vec()])?;
        self.flush()?;
        Ok((served, not))
    }

    /// Runs `steps`, comparing each reply; the first difference, if any. `counts` collects
    /// replies per class.
    fn execute(
        &mut self,
        steps: &[(Step, bool)],
        counts: &mut BTreeMap<String, u64>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Option<Difference>, String> {
        let mut i = 0;
        while i < steps.len() {
            progress(i);
            let (first, resp3) = &steps[i];
            if first.walk {
                if let Some(d) = self.walk(i, first, *resp3, counts)? {
                    return Ok(Some(d));
                }
                i += 1;
                continue;
            }
            // A pipeline: same connection pair, no walk, ending at the first step whose reply
            // must be acted on before the next command (a random write, a float increment).
            let mut end = i;
            while end < steps.len()
                && end - i < self.batch
                && steps[end].1 == *resp3
                && !steps[end].0.walk
            {
                end += 1;
                if needs_resync(&steps[end - 1].0) {
                    break;
                }
            }
            let batch = &steps[i..end];
            let pair = &mut self.pairs[*resp3 as usize];
            let cmds: Vec<&[Vec<u8>]> = batch.iter().map(|(s, _)| &s.args[..]).collect();
            pair.redis.send(&cmds)?;
            pair.capdb.send(&cmds)?;
            let mut replies = Vec::with_capacity(batch.len());
            for _ in batch {
                replies.push((pair.redis.read()?, pair.capdb.read()?));
            }
            for (k, ((step, _), (r, c))) in batch.iter().zip(&replies).enumerate() {
                let class = class_of(&step.name());
                *counts.entry(format!("{class:?}")).or_default() += 1;
                if let Err(why) = compare(class, &step.args, r, c) {
                    return Ok(Some(Difference {
                        index: i + k,
                        step: step.clone(),
                        resp3: *resp3,
                        redis: escape(&r.raw),
                        capdb: escape(&c.raw),
                        why,
                        file: None,
                        minimized: None,
                    }));
                }
            }
            if let (Some((step, _)), Some((r, c))) = (batch.last(), replies.last())
                && needs_resync(step)
                && r.raw != c.raw
                && !r.is_error()
            {
                self.resync(step, c, *resp3)?;
            }
            i = end;
        }
        Ok(None)
    }

    /// Makes Redis hold what capdb holds after a random or float write, so later commands
    /// compare again.
    fn resync(&mut self, step: &Step, capdb_reply: &Frame, resp3: bool) -> Result<(), String> {
        let pair = &mut self.pairs[resp3 as usize];
        let key = step.args[1].clone();
        match &step.name()[..] {
            "spop" => {
                let members = |conn: &mut Conn| -> Result<Vec<Vec<u8>>, String> {
                    let f = conn.call(&[b"SMEMBERS".to_vec(), key.clone()])?;
                    Ok(f.children.iter().map(|c| c.text.clone()).collect())
                };
                let ours = members(&mut pair.capdb)?;
                let theirs = members(&mut pair.redis)?;
                let add: Vec<Vec<u8>> = ours
                    .iter()
                    .filter(|m| !theirs.contains(m))
                    .cloned()
                    .collect();
                let rem: Vec<Vec<u8>> = theirs
                    .iter()
                    .filter(|m| !ours.contains(m))
                    .cloned()
                    .collect();
                for (cmd, list) in [(&b"SADD"[..], add), (&b"SREM"[..], rem)] {
                    if !list.is_empty() {
                        let mut args = vec![cmd.to_vec(), key.clone()];
                        args.extend(list);
                        pair.redis.call(&args)?;
                    }
                }
                // The encoding too: Redis's SPOP with a count may rebuild the set (as an
                // intset when what remains are integers), which SADD/SREM above cannot copy.
                let encoding = |conn: &mut Conn| -> Result<Vec<u8>, String> {
                    let f = conn.call(&[b"OBJECT".to_vec(), b"ENCODING".to_vec(), key.clone()])?;
                    Ok(f.text)
                };
                let (ours, theirs) = (encoding(&mut pair.capdb)?, encoding(&mut pair.redis)?);
                if ours != theirs && !ours.is_empty() {
                    if ours == b"intset" {
                        // A set built anew from integers is an intset. The rebuild keeps the
                        // key's deadline: Redis's SPOP overwrites the value in place
                        // (`dbOverwrite`), its TTL stays, and capdb's stays too.
                        let deadline = pair
                            .redis
                            .call(&[b"PEXPIRETIME".to_vec(), key.clone()])?
                            .int()
                            .filter(|at| *at > 0);
                        pair.redis.call(&[b"DEL".to_vec(), key.clone()])?;
                        let mut args = vec![b"SADD".to_vec(), key.clone()];
                        args.extend(members(&mut pair.capdb)?);
                        pair.redis.call(&args)?;
                        if let Some(at) = deadline {
                            pair.redis.call(&[
                                b"PEXPIREAT".to_vec(),
                                key.clone(),
                                at.to_string().into_bytes(),
                            ])?;
                        }
                    } else if theirs == b"intset" {
                        // A non-integer member converts it for good.
                        let marker = b"capdb-difftest-resync".to_vec();
                        pair.redis
                            .call(&[b"SADD".to_vec(), key.clone(), marker.clone()])?;
                        pair.redis.call(&[b"SREM".to_vec(), key.clone(), marker])?;
                    }
                }
            }
            "incrbyfloat" => {
                pair.redis.call(&[
                    b"SET".to_vec(),
                    key,
                    capdb_reply.text.clone(),
                    b"KEEPTTL".to_vec(),
                ])?;
            }
            "hincrbyfloat" => {
                pair.redis.call(&[
                    b"HSET".to_vec(),
                    key,
                    step.args[2].clone(),
                    capdb_reply.text.clone(),
                ])?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A whole SCAN-family walk on each server, compared as sets.
    fn walk(
        &mut self,
        index: usize,
        step: &Step,
        resp3: bool,
        counts: &mut BTreeMap<String, u64>,
    ) -> Result<Option<Difference>, String> {
        *counts.entry(format!("{:?}", Class::Walk)).or_default() += 1;
        let name = step.name();
        let at = if name == "scan" { 1 } else { 2 };
        let pair = &mut self.pairs[resp3 as usize];
        let walk_one = |conn: &mut Conn| -> Result<Result<Vec<Frame>, Frame>, String> {
            let mut args = step.args.clone();
            let mut pages = Vec::new();
            for _ in 0..100_000 {
                let f = conn.call(&args)?;
                let cursor = match (&f.kind, f.children.first()) {
                    (b'*', Some(c)) if f.children.len() == 2 && c.kind == b'$' => c.text.clone(),
                    _ => return Ok(Err(f)),
                };
                pages.push(f);
                if cursor == b"0" {
                    return Ok(Ok(pages));
                }
                args[at] = cursor;
            }
            Err(format!(
                "{} did not finish `{}` in 100000 pages; its cursors loop",
                conn.who,
                command_line(&step.args)
            ))
        };
        let r = walk_one(&mut pair.redis)?;
        let c = walk_one(&mut pair.capdb)?;
        let pairs = name == "hscan" || name == "zscan";
        let diff = |redis: String, capdb: String, why: &str| Difference {
            index,
            step: step.clone(),
            resp3,
            redis,
            capdb,
            why: why.into(),
            file: None,
            minimized: None,
        };
        Ok(match (r, c) {
            (Ok(rp), Ok(cp)) => {
                let (ri, ci) = (walk_items(&rp, pairs), walk_items(&cp, pairs));
                (ri != ci).then(|| {
                    diff(
                        show_items(&ri),
                        show_items(&ci),
                        "the walks returned different elements (compared as sets)",
                    )
                })
            }
            (Err(rf), Err(cf)) if rf.raw == cf.raw => None,
            (r, c) => {
                let show = |x: Result<Vec<Frame>, Frame>| match x {
                    Ok(pages) => escape(&pages[0].raw),
                    Err(f) => escape(&f.raw),
                };
                Some(diff(
                    show(r),
                    show(c),
                    "one walk failed or answered another shape",
                ))
            }
        })
    }
}

pub(crate) fn needs_resync(step: &Step) -> bool {
    matches!(&step.name()[..], "spop" | "incrbyfloat" | "hincrbyfloat")
}

/// The seed's command list: steps and whether each goes over RESP3 (in stretches of 1 to 64).
fn command_list(o: &Options, served: &[&'static str]) -> Vec<(Step, bool)> {
    let mut g = Generator::new(o.seed, &|n| served.contains(&n));
    if o.mode.spreads_txn() {
        g = g.spreading_txn();
    }
    let mut stretch = rng::Rng::new(o.seed ^ 0x05ee_d0f2_e5f3);
    let mut out = Vec::with_capacity(o.commands as usize);
    let mut watches = FlushWatches::new(matches!(o.mode, Mode::Cp | Mode::CpShards));
    while (out.len() as u64) < o.commands {
        let resp3 = stretch.chance(o.resp3_percent);
        let n = stretch.range(1, 64);
        for _ in 0..n {
            if out.len() as u64 >= o.commands {
                break;
            }
            watches.push(&mut out, g.next_step(), resp3);
        }
        // A transaction block stays on one connection to its end.
        while out.last().is_some_and(|(s, _)| s.block) {
            watches.push(&mut out, g.next_step(), resp3);
        }
    }
    out
}

/// The one documented difference the list steers around: on `cp` a FLUSHDB aborts every older
/// WATCH, also of a key that did not exist (README, "Transactions"), where Redis 7.0 aborts
/// only those of keys it deleted. In the `cp` modes, before a FLUSHDB (or FLUSHALL), a
/// connection still watching (a WATCH left for a later block) gets an UNWATCH, sent to both
/// servers; the connection whose MULTI queues the FLUSHDB keeps its watches (its EXEC judges
/// them before the FLUSHDB runs). Other modes follow Redis exactly and get no UNWATCH.
struct FlushWatches {
    on: bool,
    /// Per connection (RESP2, RESP3): inside MULTI, and (maybe) watching.
    in_multi: [bool; 2],
    watching: [bool; 2],
    /// Where the block (or lone command) being pushed starts: an UNWATCH goes before it.
    segment_start: usize,
}

impl FlushWatches {
    fn new(on: bool) -> FlushWatches {
        FlushWatches {
            on,
            in_multi: [false; 2],
            watching: [false; 2],
            segment_start: 0,
        }
    }

    fn push(&mut self, out: &mut Vec<(Step, bool)>, step: Step, resp3: bool) {
        if out.last().is_none_or(|(s, _)| !s.block) {
            self.segment_start = out.len();
        }
        let name = step.name();
        if self.on && matches!(&name[..], "flushdb" | "flushall") {
            for c in [false, true] {
                let i = c as usize;
                if self.watching[i] && !(c == resp3 && self.in_multi[i]) {
                    let unwatch = Step {
                        args: vec![b"UNWATCH".to_vec()],
                        walk: false,
                        block: false,
                    };
                    out.insert(self.segment_start, (unwatch, c));
                    self.segment_start += 1;
                    self.watching[i] = false;
                }
            }
        }
        // Conservative: a WATCH is assumed to hold until a clean EXEC, DISCARD or UNWATCH.
        let i = resp3 as usize;
        match (&name[..], step.args.len()) {
            ("multi", 1) => self.in_multi[i] = true,
            ("exec" | "discard", 1) if self.in_multi[i] => {
                self.in_multi[i] = false;
                self.watching[i] = false;
            }
            ("unwatch", 1) if !self.in_multi[i] => self.watching[i] = false,
            ("watch", 2..) if !self.in_multi[i] => self.watching[i] = true,
            _ => {}
        }
        out.push((step, resp3));
    }
}

/// Writes the list (and the difference) to `path`, one command a line.
fn write_list(
    path: &PathBuf,
    o: &Options,
    d: &Difference,
    list: &[(Step, bool)],
) -> Result<(), String> {
    let mut text = format!(
        "# capdb difftest --mode {} --seed {} (a difference at command #{})\n# {}\n",
        o.mode,
        o.seed,
        d.index,
        d.to_string().replace('\n', "\n# ")
    );
    for (i, (s, resp3)) in list.iter().enumerate() {
        text.push_str(&format!(
            "{i} {} {}{}\n",
            if *resp3 { "resp3" } else { "resp2" },
            if s.walk { "walk " } else { "" },
            command_line(&s.args)
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}; pass --out DIR", dir.display()))?;
    }
    std::fs::write(path, text)
        .map_err(|e| format!("cannot write {}: {e}; pass --out DIR", path.display()))
}

/// Cuts `list` (whose replay shows a difference at its last command) down: drops chunks of
/// halving sizes while a difference at that same command remains, replaying after FLUSHDB each
/// time. At most `budget` replays. A candidate whose first difference is at another command
/// is not kept: a cut list can differ elsewhere for another reason (a RANDOMKEY queued in a
/// MULTI once two keys exist), and following it would lose the difference under study.
fn minimize(
    s: &mut Session,
    mut list: Vec<(Step, bool)>,
    budget: usize,
) -> Result<Vec<(Step, bool)>, String> {
    let Some(target) = list.last().map(|(step, _)| step.args.clone()) else {
        return Ok(list);
    };
    let mut replays = 0;
    let mut counts = BTreeMap::new();
    let mut fails = |s: &mut Session, l: &[(Step, bool)]| -> Result<Option<usize>, String> {
        s.flush()?;
        Ok(s.execute(l, &mut counts, &mut |_| {})?
            .map(|d| d.index)
            .filter(|at| l.get(*at).is_some_and(|(step, _)| step.args == target)))
    };
    let mut chunk = list.len().div_ceil(2);
    while chunk >= 1 && replays < budget {
        let mut i = 0;
        while i < list.len() && replays < budget {
            let mut candidate = list.clone();
            candidate.drain(i..(i + chunk).min(list.len()));
            replays += 1;
            match (!candidate.is_empty())
                .then(|| fails(s, &candidate))
                .transpose()?
            {
                Some(Some(at)) => {
                    candidate.truncate(at + 1);
                    list = candidate;
                }
                _ => i += chunk,
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2).min(chunk - 1).max(1);
    }
    Ok(list)
}

/// Runs one differential test; `log` gets progress lines. `Err` only when the harness itself
/// could not run (a server would not start, a connection broke).
pub fn run(o: &Options, log: &mut dyn Write) -> Result<Outcome, String> {
    run_with(o, log, |served| command_list(o, served))
}

/// Runs a given command list (each step and whether it goes over RESP3) instead of the
/// seed's, the same way [`run`] runs the seed's: resynchronisation after random writes,
/// minimising with `o.minimize`. `o.commands` is not used.
pub fn run_list(
    o: &Options,
    list: Vec<(Step, bool)>,
    log: &mut dyn Write,
) -> Result<Outcome, String> {
    run_with(o, log, |_| list)
}

fn run_with(
    o: &Options,
    log: &mut dyn Write,
    make_list: impl FnOnce(&[&'static str]) -> Vec<(Step, bool)>,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let mut s = Session::start(o)?;
    let (served, not_served) = s.probe()?;
    let _ = writeln!(
        log,
        "difftest: mode {}, seed {}, {} commands, {}% RESP3, pipelines of {}",
        o.mode, o.seed, o.commands, o.resp3_percent, o.batch
    );
    if !not_served.is_empty() {
        let _ = writeln!(
            log,
            "difftest: not served by capdb yet, left out: {}",
            not_served.join(" ")
        );
    }
    let list = make_list(&served);
    let mut outcome = Outcome {
        served,
        not_served,
        ..Outcome::default()
    };
    let total = list.len();
    let mut last = Instant::now();
    let mut at = 0;
    let mut progress = |i: usize| {
        at = i;
        if last.elapsed().as_secs() >= 10 {
            last = Instant::now();
            let _ = writeln!(
                log,
                "difftest: {i}/{total} commands, {} s",
                started.elapsed().as_secs()
            );
        }
    };
    let found = match s.execute(&list, &mut outcome.classes, &mut progress) {
        Ok(found) => found,
        Err(e) => {
            // The harness could not go on (a server closed its connection): keep what shows
            // why, the commands up to the pipeline that broke and capdb's log.
            let end = (at + o.batch.max(1)).min(list.len());
            let path = o.out_dir.join(format!("{}-{}.broken.txt", o.mode, o.seed));
            let mut text = format!(
                "# capdb difftest --mode {} --seed {}: {e} (in the pipeline from command #{at})\n",
                o.mode, o.seed
            );
            for (i, (st, resp3)) in list[..end].iter().enumerate() {
                text.push_str(&format!(
                    "{i} {} {}{}\n",
                    if *resp3 { "resp3" } else { "resp2" },
                    if st.walk { "walk " } else { "" },
                    command_line(&st.args)
                ));
            }
            let _ = std::fs::create_dir_all(&o.out_dir);
            let _ = std::fs::write(&path, text);
            let log_copy = o.out_dir.join(format!("{}-{}.capdb.log", o.mode, o.seed));
            let _ = std::fs::copy(&s.capdb.log, &log_copy);
            return Err(format!(
                "{e} (in the pipeline from command #{at}; commands in {}, capdb's log in {})",
                path.display(),
                log_copy.display()
            ));
        }
    };
    outcome.compared = found.as_ref().map_or(total, |d| d.index + 1) as u64;
    if let Some(mut d) = found {
        let path = o.out_dir.join(format!("{}-{}.txt", o.mode, o.seed));
        write_list(&path, o, &d, &list[..=d.index])?;
        d.file = Some(path);
        // The node's scratch directory goes with it: keep its log next to the list.
        let _ = std::fs::copy(
            &s.capdb.log,
            o.out_dir.join(format!("{}-{}.capdb.log", o.mode, o.seed)),
        );
        if o.minimize {
            let _ = writeln!(log, "difftest: difference at #{}; minimising...", d.index);
            let min = minimize(&mut s, list[..=d.index].to_vec(), 3000)?;
            let path = o.out_dir.join(format!("{}-{}.min.txt", o.mode, o.seed));
            write_list(&path, o, &d, &min)?;
            d.minimized = Some(min);
        }
        outcome.difference = Some(d);
    }
    if o.mode.spreads_txn() {
        outcome.cross_shard = s.capdb.cross_shard_counts()?;
        let counts: Vec<String> = outcome
            .cross_shard
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            log,
            "difftest: cross-shard transactions: {}",
            counts.join(", ")
        );
    }
    let _ = writeln!(
        log,
        "difftest: {} commands compared in {} s",
        outcome.compared,
        started.elapsed().as_secs()
    );
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(words: &str, block: bool) -> Step {
        Step {
            args: words.split(' ').map(|w| w.as_bytes().to_vec()).collect(),
            walk: false,
            block,
        }
    }

    fn lines(out: &[(Step, bool)]) -> Vec<String> {
        out.iter()
            .map(|(s, resp3)| {
                let words: Vec<String> = s
                    .args
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                format!("{}:{}", if *resp3 { 3 } else { 2 }, words.join(" "))
            })
            .collect()
    }

    #[test]
    fn in_cp_modes_a_watch_left_open_is_unwatched_before_a_flushdb() {
        // Found by `capdb difftest --mode cp-shards --seed 1` (command 22,763): a WATCH left
        // on one connection, a FLUSHDB queued on the other, then the first's EXEC.
        for on in [true, false] {
            let mut w = FlushWatches::new(on);
            let mut out = Vec::new();
            w.push(&mut out, step("WATCH k", false), false);
            w.push(&mut out, step("WATCH j", false), true);
            w.push(&mut out, step("MULTI", true), true);
            w.push(&mut out, step("FLUSHDB", true), true);
            w.push(&mut out, step("EXEC", false), true);
            w.push(&mut out, step("MULTI", true), false);
            w.push(&mut out, step("EXEC", false), false);
            let mut want = vec![
                "2:WATCH k",
                "3:WATCH j",
                "2:UNWATCH",
                "3:MULTI",
                "3:FLUSHDB",
                "3:EXEC",
                "2:MULTI",
                "2:EXEC",
            ];
            if !on {
                want.remove(2);
            }
            assert_eq!(lines(&out), want, "cp modes: {on}");
        }
    }
}
