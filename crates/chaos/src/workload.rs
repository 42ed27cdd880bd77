//! Clients: real Redis-protocol connections (the `redis` crate) from the harness to the nodes,
//! recording every operation to the history. Where each client connects is [`crate::route`]'s
//! business: bound to one node, or moving between the leader and followers of the workload's
//! shard.
//!
//! Keys follow Jepsen's "independent" pattern: a few register keys are active at a time and
//! each is retired after [`REGISTER_OPS_PER_KEY`] operations, so every key's history stays small
//! enough for the linearizability search. Written values are unique per key, so a read names
//! exactly the write it saw. Counter keys retire too (after [`COUNTER_OPS_PER_KEY`]), and each
//! increment is a large random number, so the counter checker can tell which increments a
//! value is made of and a doubled one stands out (see `check::counter`).
//!
//! Collections are attacked with the commands users send: the `sadd` workload adds unique
//! integers to Redis sets (`SADD sadd:N member`, read with `SMEMBERS`), the `hset` workload
//! adds unique fields to Redis hashes (`HSET hset:N field field`, read with `HKEYS`), each key
//! retired after [`COLLECTION_ELEMENTS_PER_KEY`] elements. Both record the insert's answer (how
//! many elements were new), so an insert applied twice shows as an acknowledged "0 added". In
//! `ap` keyspaces SADD runs at level `one` (both sides of a partition keep adding, and the
//! add-wins merge must keep every acknowledged add) and HSET at `quorum`.
//!
//! Transactions are attacked as Jepsen's list-append does: the `append` workload sends
//! `MULTI`, one to four `RPUSH append:N element` / `LRANGE append:N 0 -1`, `EXEC`, over a few
//! lists that every client shares, and records what each read returned; `check::append` infers
//! the order of versions from the reads and looks for cycles (strict serializability). An EXEC
//! answered `-EXECABORT` or nil ran nothing (`fail`).
//!
//! The `bank` workload moves money between [`BANK_ACCOUNTS`] accounts (`bank:0..N`, set to
//! [`BANK_BALANCE_INITIAL`] each with `SET NX` before the clock starts): a transfer is `WATCH a
//! b`, `GET a`, `GET b`, then, when `a` can pay, `MULTI`, `DECRBY a x`, `INCRBY b x`, `EXEC`
//! (nil: a watched key changed, nothing happened, `fail`); a read is `MULTI`, a `GET` per
//! account, `EXEC`. The accounts carry no hash tag, so in a keyspace of several shards they
//! spread over them and every transaction is a cross-shard one. A transfer's outcome depends
//! on how far it got: any error before `EXEC` was sent is `fail` (nothing was proposed), an
//! error or timeout after it is classified like any write's (`info` unless the error promises
//! otherwise).
//!
//! Outcomes are classified per error, because the checkers trust them: a `fail` must certainly
//! not have happened, or a correct server could be convicted. Reads that fail are `fail` (they
//! changed nothing). For writes, `-TRYAGAIN` is `fail` (capdb sends it only when the write was
//! certainly not applied, and Redis Cluster clients retry it automatically, so it must not be
//! sent otherwise), a CAS answered nil is a definite "not applied" (`ok` with result `false`),
//! and everything else (`-UNCERTAIN`, any other error, a dropped connection, a timeout) is
//! `info`: the write may or may not have happened, and the client carries on as a new process.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value as Json, json};
use tokio::sync::watch;

use crate::history::{F, NemesisEvent, OpEvent, Record, Role, Stage, Workload, Writer};
use crate::route::{REBIND_OPS, Route, ShardMap, WORKLOAD_TAG};

/// Operations on one register key before it is retired for a fresh one.
pub const REGISTER_OPS_PER_KEY: u32 = 120;
/// Operations on one `cas` key before it is retired for a fresh one.
pub const CAS_OPS_PER_KEY: u32 = 100;
/// Operations on one counter key before it is retired (bounds how many uncertain increments
/// the counter checker must consider for one key).
pub const COUNTER_OPS_PER_KEY: u32 = 150;
/// Increments are drawn from `1..=INCREMENT_MAX`: large and random, so that sums of different
/// sets of increments almost never coincide.
pub const INCREMENT_MAX: i64 = 1_000_000_000;
/// Elements appended to one set key before a fresh key takes over (bounds value size).
pub const SET_ELEMENTS_PER_KEY: u32 = 500;
/// Members (fields) added to one `sadd` (`hset`) key before a fresh key takes over. An `ap`
/// collection is one record re-stored on every write, so this also bounds each write's cost.
pub const COLLECTION_ELEMENTS_PER_KEY: u32 = 200;
/// Appends to one `append:N` list before a fresh key takes over (bounds each LRANGE's reply).
pub const APPEND_ELEMENTS_PER_KEY: u32 = 100;
/// `append` lists in use at once: few, so transactions collide on them.
pub const APPEND_KEYS_ACTIVE: u32 = 6;
/// Micro-operations per transaction at most.
pub const APPEND_MOPS_MAX: usize = 4;
/// Accounts of the `bank` workload (`bank:0` to `bank:7`): few, so transfers collide and
/// `WATCH` has conflicts to catch.
pub const BANK_ACCOUNTS: u32 = 8;
/// Each account's balance when the run starts; the bank's total is this times [`BANK_ACCOUNTS`].
pub const BANK_BALANCE_INITIAL: i64 = 20;
/// Transfers move `1..=BANK_TRANSFER_MAX`: half an initial balance, so accounts often run low
/// and a transfer that `WATCH` should have aborted overdraws one.
pub const BANK_TRANSFER_MAX: i64 = 10;
/// How long a client waits for any reply; the server's own bound is about 5 s. It is also the
/// connection's response timeout: the `redis` crate's default of 500 ms would turn every
/// write that waits out a failover into an `info`, and an indeterminate write can be placed
/// anywhere by the checker, so the evidence of a doubled write would be lost.
pub const OP_TIMEOUT: Duration = Duration::from_secs(7);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The run's history: appended to the file as it happens and kept for the checkers.
pub struct Recorder {
    started: Instant,
    inner: Mutex<(Writer, Vec<Record>)>,
    index: AtomicU64,
}

impl Recorder {
    pub fn new(writer: Writer) -> Recorder {
        Recorder {
            started: Instant::now(),
            inner: Mutex::new((writer, Vec::new())),
            index: AtomicU64::new(0),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn push(&self, mut record: Record) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Index and time are taken under the lock so the file is in time order.
        let index = self.index.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ns();
        match &mut record {
            Record::Op(e) => {
                e.index = index;
                e.time_ns = now;
            }
            Record::Nemesis(e) => {
                e.index = index;
                e.time_ns = now;
            }
        }
        // A full disk must not stop the run; the in-memory copy is still checked.
        let _ = inner.0.write(&record);
        inner.1.push(record);
    }

    pub fn nemesis(&self, stage: &str, window: u32, fault: &str) {
        self.push(Record::Nemesis(NemesisEvent {
            index: 0,
            time_ns: 0,
            nemesis: stage.into(),
            window,
            fault: fault.into(),
        }));
    }

    /// Flushes the file and hands back every record.
    pub fn finish(&self) -> Vec<Record> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = inner.0.flush();
        std::mem::take(&mut inner.1)
    }
}

/// Which workloads run, and their share of operations.
#[derive(Debug, Clone)]
pub struct Mix {
    pub workloads: Vec<(Workload, u32)>,
}

impl Mix {
    fn pick(&self, rng: &mut fastrand::Rng) -> Workload {
        let total: u32 = self.workloads.iter().map(|w| w.1).sum();
        let mut x = rng.u32(0..total.max(1));
        for (w, weight) in &self.workloads {
            if x < *weight {
                return *w;
            }
            x -= weight;
        }
        self.workloads[0].0
    }
}

struct RegisterKey {
    id: u32,
    ops: u32,
    /// Values written so far (recent ones are CAS candidates).
    written: Vec<i64>,
    next_value: i64,
}

/// A key of the `cas` workload.
struct CasKey {
    id: u32,
    ops: u32,
    next_value: i64,
    /// The value clients last saw there (a read, an acknowledged write or successful CAS):
    /// the next CAS expects it, so most CAS operations succeed, and a doubled one shows.
    known: Option<i64>,
    /// A CAS on this key just failed: read before the next CAS.
    stale: bool,
}

impl CasKey {
    fn new(id: u32) -> CasKey {
        CasKey {
            id,
            ops: 0,
            next_value: 1,
            known: None,
            stale: false,
        }
    }

    fn name(&self) -> String {
        cas_key(self.id)
    }
}

/// The name of `cas` key `id`: all share one hash tag, so one slot and one shard.
pub fn cas_key(id: u32) -> String {
    format!("{{{WORKLOAD_TAG}}}:{id}")
}

/// Shared key state: which keys are active, what values come next.
pub struct Keys {
    registers: Vec<RegisterKey>,
    next_register: u32,
    cas: Vec<CasKey>,
    next_cas: u32,
    /// Active counter keys: (id, operations so far).
    counters: Vec<(u32, u32)>,
    next_counter: u32,
    sets: Vec<(u32, u32)>,
    next_set: u32,
    /// Active `sadd` and `hset` keys: (id, elements so far), and the next fresh id of each.
    sadds: Vec<(u32, u32)>,
    next_sadd: u32,
    hsets: Vec<(u32, u32)>,
    next_hset: u32,
    /// Elements are unique across every set-like workload and key.
    next_element: i64,
    /// Every key ever used, for the final reads.
    pub used: BTreeSet<(Workload, String)>,
    /// `ap` runs: no reads during the run (they are not expected to be linearizable), and set
    /// elements are keys of their own (`set:N:E`), so the elements tried per set are kept.
    pub ap: bool,
    pub elements: std::collections::BTreeMap<String, Vec<i64>>,
    /// `append` lists in use: (id, appends so far).
    appends: Vec<(u32, u32)>,
    next_append: u32,
    /// Every `append` list ever used, for the final read.
    pub append_keys: BTreeSet<String>,
}

impl Keys {
    pub fn new(active_registers: u32, counters: u32, active_sets: u32) -> Keys {
        Keys {
            registers: (0..active_registers)
                .map(|id| RegisterKey {
                    id,
                    ops: 0,
                    written: Vec::new(),
                    next_value: 1,
                })
                .collect(),
            next_register: active_registers,
            cas: (0..active_registers).map(CasKey::new).collect(),
            next_cas: active_registers,
            counters: (0..counters.max(1)).map(|id| (id, 0)).collect(),
            next_counter: counters.max(1),
            sets: (0..active_sets).map(|id| (id, 0)).collect(),
            next_set: active_sets,
            sadds: (0..active_sets).map(|id| (id, 0)).collect(),
            next_sadd: active_sets,
            hsets: (0..active_sets).map(|id| (id, 0)).collect(),
            next_hset: active_sets,
            next_element: 1,
            used: BTreeSet::new(),
            ap: false,
            elements: Default::default(),
            appends: (0..APPEND_KEYS_ACTIVE).map(|id| (id, 0)).collect(),
            next_append: APPEND_KEYS_ACTIVE,
            append_keys: BTreeSet::new(),
        }
    }

    /// The next transaction of the `append` workload: 1 to [`APPEND_MOPS_MAX`] micro-operations,
    /// each an append of a fresh element or a read of a whole list, on the active lists.
    fn next_append(&mut self, rng: &mut fastrand::Rng) -> (F, String, Json) {
        let mut mops = Vec::new();
        for _ in 0..rng.usize(1..=APPEND_MOPS_MAX) {
            let slot = rng.usize(0..self.appends.len());
            let key = format!("append:{}", self.appends[slot].0);
            self.append_keys.insert(key.clone());
            if rng.bool() {
                mops.push(json!(["r", key, null]));
            } else {
                let e = self.next_element;
                self.next_element += 1;
                mops.push(json!(["append", key, e]));
                self.appends[slot].1 += 1;
                if self.appends[slot].1 >= APPEND_ELEMENTS_PER_KEY {
                    self.appends[slot] = (self.next_append, 0);
                    self.next_append += 1;
                }
            }
        }
        (F::Txn, "append".to_string(), Json::Array(mops))
    }

    /// The final read of the `append` workload: one transaction reading every list used.
    pub fn final_append_reads(&self) -> Json {
        Json::Array(
            self.append_keys
                .iter()
                .map(|k| json!(["r", k, null]))
                .collect(),
        )
    }

    /// Chooses the next operation of workload `w`: (f, key, value).
    fn next(&mut self, w: Workload, rng: &mut fastrand::Rng) -> (F, String, Json) {
        let (f, key, value) = match w {
            Workload::Register => {
                let slot = rng.usize(0..self.registers.len());
                let k = &mut self.registers[slot];
                k.ops += 1;
                let key = format!("reg:{}", k.id);
                let (f, value) = match rng.u8(0..4) {
                    0 | 1 => (F::Read, Json::Null),
                    2 => {
                        let v = k.next_value;
                        k.next_value += 1;
                        k.written.push(v);
                        (F::Write, json!(v))
                    }
                    _ => {
                        let recent = &k.written[k.written.len().saturating_sub(3)..];
                        let expected = if recent.is_empty() {
                            0
                        } else {
                            recent[rng.usize(0..recent.len())]
                        };
                        let v = k.next_value;
                        k.next_value += 1;
                        k.written.push(v);
                        (F::Cas, json!([expected, v]))
                    }
                };
                if k.ops >= REGISTER_OPS_PER_KEY {
                    *k = RegisterKey {
                        id: self.next_register,
                        ops: 0,
                        written: Vec::new(),
                        next_value: 1,
                    };
                    self.next_register += 1;
                }
                (f, key, value)
            }
            Workload::Cas => self.next_cas(rng),
            Workload::Counter => {
                let slot = rng.usize(0..self.counters.len());
                let key = format!("ctr:{}", self.counters[slot].0);
                self.counters[slot].1 += 1;
                if self.counters[slot].1 >= COUNTER_OPS_PER_KEY {
                    self.counters[slot] = (self.next_counter, 0);
                    self.next_counter += 1;
                }
                if !self.ap && rng.u8(0..5) == 0 {
                    (F::Read, key, Json::Null)
                } else {
                    (F::Add, key, json!(rng.i64(1..=INCREMENT_MAX)))
                }
            }
            Workload::Set => {
                let slot = rng.usize(0..self.sets.len());
                let key = format!("set:{}", self.sets[slot].0);
                if !self.ap && rng.u8(0..5) == 0 {
                    (F::Read, key, Json::Null)
                } else {
                    let e = self.next_element;
                    self.next_element += 1;
                    if self.ap {
                        self.elements.entry(key.clone()).or_default().push(e);
                    }
                    self.sets[slot].1 += 1;
                    if self.sets[slot].1 >= SET_ELEMENTS_PER_KEY {
                        self.sets[slot] = (self.next_set, 0);
                        self.next_set += 1;
                    }
                    (F::Insert, key, json!(e))
                }
            }
            Workload::Sadd | Workload::Hset => self.next_collection(w, rng),
            Workload::Append => self.next_append(rng),
            Workload::Bank => next_bank(rng),
            Workload::Stream => {
                let e = self.next_element;
                self.next_element += 1;
                let n = crate::stream::STREAM_KEYS;
                let a = rng.usize(0..n);
                // One write in four is a MULTI/EXEC over two keys (most often two shards):
                // its key names both, comma-separated.
                let key = if rng.u8(0..4) == 0 {
                    format!("stream:{a},stream:{}", (a + 1 + rng.usize(0..n - 1)) % n)
                } else {
                    format!("stream:{a}")
                };
                (F::Write, key, json!(e))
            }
            Workload::View => {
                let e = self.next_element;
                self.next_element += 1;
                let n = crate::view::VIEW_KEYS;
                let a = rng.usize(0..n);
                // One write in four is a MULTI/EXEC over two keys (most often two shards).
                let key = if rng.u8(0..4) == 0 {
                    format!("view:{a},view:{}", (a + 1 + rng.usize(0..n - 1)) % n)
                } else {
                    format!("view:{a}")
                };
                (F::Write, key, crate::view::next_value(rng, e))
            }
        };
        self.used.insert((w, key.clone()));
        (f, key, value)
    }

    /// The next `sadd` or `hset` operation: a read one time in five (`cp` only: `ap` keys are
    /// read once, after the final heal), otherwise an insert of a fresh element, after which a
    /// key holding [`COLLECTION_ELEMENTS_PER_KEY`] elements is retired.
    fn next_collection(&mut self, w: Workload, rng: &mut fastrand::Rng) -> (F, String, Json) {
        let read = !self.ap && rng.u8(0..5) == 0;
        let element = self.next_element;
        let (active, next_id) = match w {
            Workload::Hset => (&mut self.hsets, &mut self.next_hset),
            _ => (&mut self.sadds, &mut self.next_sadd),
        };
        let slot = rng.usize(0..active.len());
        let key = format!("{}:{}", format!("{w:?}").to_lowercase(), active[slot].0);
        if read {
            return (F::Read, key, Json::Null);
        }
        self.next_element += 1;
        active[slot].1 += 1;
        if active[slot].1 >= COLLECTION_ELEMENTS_PER_KEY {
            active[slot] = (*next_id, 0);
            *next_id += 1;
        }
        (F::Insert, key, json!(element))
    }

    /// The next `cas` operation: a write on a fresh key (so there is something to compare
    /// with), a read after a failed CAS or one time in four, a blind write one time in ten,
    /// otherwise a CAS from the last value seen to a new unique one.
    fn next_cas(&mut self, rng: &mut fastrand::Rng) -> (F, String, Json) {
        let slot = rng.usize(0..self.cas.len());
        let k = &mut self.cas[slot];
        k.ops += 1;
        let key = k.name();
        let roll = rng.u8(0..20);
        let op = match k.known {
            _ if k.stale || (5..10).contains(&roll) => {
                k.stale = false;
                (F::Read, key, Json::Null)
            }
            Some(expected) if roll >= 10 || (2..5).contains(&roll) => {
                let v = k.next_value;
                k.next_value += 1;
                (F::Cas, key, json!([expected, v]))
            }
            _ => {
                let v = k.next_value;
                k.next_value += 1;
                (F::Write, key, json!(v))
            }
        };
        if k.ops >= CAS_OPS_PER_KEY {
            *k = CasKey::new(self.next_cas);
            self.next_cas += 1;
        }
        op
    }

    /// Learns from a completed `cas` operation what the key holds now.
    fn observe(&mut self, w: Workload, f: F, key: &str, value: &Json, stage: Stage, result: &Json) {
        if w != Workload::Cas {
            return;
        }
        let Some(k) = self.cas.iter_mut().find(|k| k.name() == key) else {
            return;
        };
        match (f, stage) {
            (F::Read, Stage::Ok) => k.known = result.as_i64(),
            (F::Write, Stage::Ok) => k.known = value.as_i64(),
            (F::Cas, Stage::Ok) if result == &json!(true) => k.known = value[1].as_i64(),
            (F::Cas, _) | (F::Write, _) => k.stale = true,
            _ => {}
        }
    }
}

/// The next `bank` operation: a read of every account two times in five, otherwise a transfer
/// of a random amount between two different random accounts.
fn next_bank(rng: &mut fastrand::Rng) -> (F, String, Json) {
    if rng.u8(0..5) < 2 {
        return (F::Read, "bank".into(), Json::Null);
    }
    let from = rng.u32(0..BANK_ACCOUNTS);
    // A uniformly chosen account other than `from`.
    let to = (from + rng.u32(1..BANK_ACCOUNTS)) % BANK_ACCOUNTS;
    let amount = rng.i64(1..=BANK_TRANSFER_MAX);
    (
        F::Transfer,
        "bank".into(),
        json!({"from": from, "to": to, "amount": amount}),
    )
}

/// The setup operation of the `bank` workload, recorded before the clock starts: it sets every
/// account to the initial balance, and its value tells the checker the total.
pub fn bank_setup() -> Invocation {
    Invocation {
        workload: Workload::Bank,
        f: F::Write,
        key: "bank".into(),
        value: json!({"accounts": BANK_ACCOUNTS, "balance": BANK_BALANCE_INITIAL}),
        final_read: false,
    }
}

/// The key of bank account `n`.
pub fn bank_key(n: u32) -> String {
    format!("bank:{n}")
}

/// What a failed request means for its operation: `fail` (certainly not applied) or `info`
/// (maybe applied). See the module doc for why each case is what it is.
pub fn error_stage(mutates: bool, error_code: Option<&str>) -> Stage {
    if !mutates {
        return Stage::Fail;
    }
    match error_code {
        // capdb's promise: the write was not applied (and will not be). EXECABORT and
        // CROSSSLOT refuse a transaction (or command) before anything runs.
        Some("TRYAGAIN" | "EXECABORT" | "CROSSSLOT") => Stage::Fail,
        // `UNCERTAIN`: capdb says it cannot know; anything else we cannot vouch for either.
        _ => Stage::Info,
    }
}

/// What one request came back with.
enum Outcome {
    Ok(Json),
    /// Certainly not applied.
    Fail(String),
    /// Maybe applied.
    Info(String),
}

/// One client connection to one node.
pub struct Client {
    pub node: u32,
    addr: String,
    conn: Option<redis::aio::MultiplexedConnection>,
    /// `ap` runs: the keyspace to select, and the write level set on the connection now.
    ap_keyspace: Option<String>,
    ap_write_level: Option<&'static str>,
    /// `ap` runs: the elements of each set key (for the final read, an MGET of them).
    pub set_elements: std::collections::BTreeMap<String, Vec<i64>>,
}

impl Client {
    pub fn new(node: u32, addr: String) -> Client {
        Client {
            node,
            addr,
            conn: None,
            ap_keyspace: None,
            ap_write_level: None,
            set_elements: Default::default(),
        }
    }

    /// A client of an `ap` keyspace: reads at `all` (only final reads happen), set inserts and
    /// HSET at `quorum`, counter increments and SADD at `one`.
    pub fn ap(node: u32, addr: String, keyspace: &str) -> Client {
        Client {
            ap_keyspace: Some(keyspace.to_string()),
            ..Client::new(node, addr)
        }
    }

    /// Moves the client to another node (a no-op when it is already there).
    pub fn rebind(&mut self, node: u32, addr: String) {
        if node != self.node {
            self.node = node;
            self.addr = addr;
            self.conn = None;
            self.ap_write_level = None;
        }
    }

    async fn connection(&mut self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let client =
            redis::Client::open(format!("redis://{}/", self.addr)).map_err(|e| e.to_string())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let c = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        if let Some(ks) = &self.ap_keyspace {
            let mut setup = c.clone();
            let select: redis::RedisResult<()> =
                redis::cmd("SELECT").arg(ks).query_async(&mut setup).await;
            select.map_err(|e| format!("SELECT {ks}: {e}"))?;
            let level: redis::RedisResult<()> = redis::cmd("CONSISTENCY")
                .arg("READ")
                .arg("ALL")
                .query_async(&mut setup)
                .await;
            level.map_err(|e| format!("CONSISTENCY: {e}"))?;
            self.ap_write_level = None;
        }
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Runs one operation and classifies its outcome.
    async fn run(&mut self, w: Workload, f: F, key: &str, value: &Json) -> Outcome {
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => return Outcome::Fail(e),
        };
        let mutates = f != F::Read;
        if self.ap_keyspace.is_some()
            && mutates
            && let Err(e) = self.set_write_level(&mut conn, w, f).await
        {
            return e;
        }
        if f == F::Transfer {
            // Whether it may have happened depends on whether EXEC was sent.
            let mut exec_sent = false;
            let work = transfer(&mut conn, value, &mut exec_sent);
            let done = tokio::time::timeout(OP_TIMEOUT, work).await;
            if !matches!(done, Ok(Ok(_))) {
                // The connection may still hold the WATCH: start afresh.
                self.conn = None;
            }
            return self.classify(done, exec_sent);
        }
        let ap = self.ap_keyspace.is_some();
        let elements = self.set_elements.get(key).cloned().unwrap_or_default();
        let work = request(&mut conn, w, f, key, value, ap, &elements);
        let done = tokio::time::timeout(OP_TIMEOUT, work).await;
        self.classify(done, mutates)
    }

    /// `ap` runs: sets the connection's write level for operation `f` of workload `w` (`one`
    /// for increments and SADD, `quorum` otherwise) unless it is set already. On error the
    /// connection is dropped.
    async fn set_write_level(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
        w: Workload,
        f: F,
    ) -> Result<(), Outcome> {
        let want = if f == F::Add || w == Workload::Sadd {
            "one"
        } else {
            "quorum"
        };
        if self.ap_write_level != Some(want) {
            let r: redis::RedisResult<()> = redis::cmd("CONSISTENCY")
                .arg("WRITE")
                .arg(want)
                .query_async(conn)
                .await;
            if let Err(e) = r {
                self.conn = None;
                return Err(Outcome::Fail(format!("CONSISTENCY: {e}")));
            }
            self.ap_write_level = Some(want);
        }
        Ok(())
    }

    /// The outcome of a request (`done`: its result, or `Err` when it timed out). Drops the
    /// connection after connection errors and timeouts.
    fn classify(
        &mut self,
        done: Result<redis::RedisResult<Json>, tokio::time::error::Elapsed>,
        mutates: bool,
    ) -> Outcome {
        match done {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.conn = None;
                }
                match error_stage(mutates, e.code()) {
                    Stage::Fail => Outcome::Fail(e.to_string()),
                    _ => Outcome::Info(e.to_string()),
                }
            }
            Err(_) => {
                self.conn = None;
                if mutates {
                    Outcome::Info("timed out".into())
                } else {
                    Outcome::Fail("timed out".into())
                }
            }
        }
    }
}

/// Sends one operation's commands on `conn` and returns its result. `ap` keyspaces keep each
/// set element as a key of its own (`elements`: those tried for `key`).
async fn request(
    conn: &mut redis::aio::MultiplexedConnection,
    w: Workload,
    f: F,
    key: &str,
    value: &Json,
    ap: bool,
    elements: &[i64],
) -> redis::RedisResult<Json> {
    match (w, f) {
        (_, F::Txn) => transaction(conn, value).await,
        (Workload::Bank, F::Read) => bank_read(conn).await,
        (Workload::Bank, F::Write) => {
            // NX: a copy of this setup delayed past the first transfer must not reset a balance.
            for n in 0..BANK_ACCOUNTS {
                let _: Option<String> = redis::cmd("SET")
                    .arg(bank_key(n))
                    .arg(BANK_BALANCE_INITIAL)
                    .arg("NX")
                    .query_async(conn)
                    .await?;
            }
            Ok(Json::Null)
        }
        (Workload::Bank, _) | (_, F::Transfer) => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "bank operations are reads, transfers and the setup",
        ))),
        (Workload::Append, _) => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "append operations are transactions",
        ))),
        (Workload::Set, F::Read) if ap => {
            // Each element is a key of its own; the set is what exists of them.
            let mut present = Vec::new();
            for chunk in elements.chunks(200) {
                let keys: Vec<String> = chunk.iter().map(|e| format!("{key}:{e}")).collect();
                let v: Vec<Option<String>> = conn.mget(&keys).await?;
                present.extend(
                    chunk
                        .iter()
                        .zip(v)
                        .filter(|(_, v)| v.is_some())
                        .map(|(e, _)| *e),
                );
            }
            Ok(json!(present))
        }
        (Workload::Set, F::Insert) if ap => {
            let () = conn
                .set(format!("{key}:{}", value.as_i64().unwrap_or(0)), 1)
                .await?;
            Ok(Json::Null)
        }
        (Workload::Sadd, F::Insert) => {
            let added: i64 = conn.sadd(key, value.as_i64().unwrap_or(0)).await?;
            Ok(json!(added))
        }
        (Workload::Hset, F::Insert) => {
            let field = value.as_i64().unwrap_or(0);
            let added: i64 = conn.hset(key, field, field).await?;
            Ok(json!(added))
        }
        (Workload::Sadd, F::Read) => {
            let members: Vec<String> = conn.smembers(key).await?;
            Ok(collection_elements(members))
        }
        (Workload::Hset, F::Read) => {
            let fields: Vec<String> = conn.hkeys(key).await?;
            Ok(collection_elements(fields))
        }
        (
            Workload::Register
            | Workload::Cas
            | Workload::Counter
            | Workload::Stream
            | Workload::View,
            F::Read,
        ) => {
            let v: Option<i64> = conn.get(key).await?;
            Ok(json!(v))
        }
        (Workload::Set, F::Read) => {
            let v: Option<String> = conn.get(key).await?;
            let els: Vec<i64> = v
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|e| e.parse().ok())
                .collect();
            Ok(json!(els))
        }
        (Workload::View, F::Write) => {
            let mut tx = redis::pipe();
            if key.contains(',') {
                tx.atomic();
            }
            for k in key.split(',') {
                match (&value["set"], value["px"].as_u64()) {
                    (serde_json::Value::Null, _) => tx.del(k).ignore(),
                    (v, px) => {
                        let text = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        let c = tx.cmd("SET").arg(k).arg(text);
                        if let Some(ms) = px {
                            c.arg("PX").arg(ms);
                        }
                        c.ignore()
                    }
                };
            }
            let () = tx.query_async(conn).await?;
            Ok(Json::Null)
        }
        (Workload::Stream, F::Write) if key.contains(',') => {
            let mut tx = redis::pipe();
            tx.atomic();
            for k in key.split(',') {
                tx.set(k, value.as_i64().unwrap_or(0)).ignore();
            }
            let () = tx.query_async(conn).await?;
            Ok(Json::Null)
        }
        (_, F::Write) => {
            let () = conn.set(key, value.as_i64().unwrap_or(0)).await?;
            Ok(Json::Null)
        }
        (_, F::Cas) => {
            let (expected, new) = (
                value[0].as_i64().unwrap_or(0),
                value[1].as_i64().unwrap_or(0),
            );
            let r: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(new)
                .arg("IFEQ")
                .arg(expected)
                .query_async(conn)
                .await?;
            Ok(json!(r.is_some()))
        }
        (_, F::Add) => {
            let v: i64 = conn.incr(key, value.as_i64().unwrap_or(0)).await?;
            Ok(json!(v))
        }
        (_, F::Insert) => {
            let _: i64 = conn
                .append(key, format!(" {}", value.as_i64().unwrap_or(0)))
                .await?;
            Ok(Json::Null)
        }
    }
}

/// Runs a transaction of the `append` workload: MULTI, an RPUSH or LRANGE per micro-operation,
/// EXEC. Returns the micro-operations with each read's list filled in. An EXEC answered nil
/// (nothing run) is reported as an `EXECABORT` error, which the caller records as `fail`.
async fn transaction(
    conn: &mut redis::aio::MultiplexedConnection,
    mops: &Json,
) -> redis::RedisResult<Json> {
    let malformed = || redis::RedisError::from((redis::ErrorKind::Client, "malformed micro-op"));
    let mops = mops.as_array().ok_or_else(malformed)?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for m in mops {
        let key = m[1].as_str().ok_or_else(malformed)?;
        match m[0].as_str() {
            Some("append") => pipe
                .cmd("RPUSH")
                .arg(key)
                .arg(m[2].as_i64().ok_or_else(malformed)?),
            Some("r") => pipe.cmd("LRANGE").arg(key).arg(0).arg(-1),
            _ => return Err(malformed()),
        };
    }
    let replies: redis::Value = pipe.query_async(conn).await?;
    let replies = match replies {
        redis::Value::Array(items) if items.len() == mops.len() => items,
        redis::Value::Nil => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort),
                "EXEC answered nil",
            )));
        }
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected EXEC reply",
                format!("{other:?}"),
            )));
        }
    };
    let mut out = Vec::with_capacity(mops.len());
    for (m, reply) in mops.iter().zip(replies) {
        if m[0] == "r" {
            let list: Vec<String> = redis::from_redis_value(reply)?;
            out.push(json!(["r", m[1], collection_elements(list)]));
        } else {
            if let redis::Value::ServerError(e) = reply {
                return Err(e.into());
            }
            out.push(m.clone());
        }
    }
    Ok(Json::Array(out))
}

/// Reads every bank account in one `MULTI`/`EXEC`: the balances in account order (`null` for
/// a missing account).
async fn bank_read(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<Json> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for n in 0..BANK_ACCOUNTS {
        pipe.cmd("GET").arg(bank_key(n));
    }
    let replies: redis::Value = pipe.query_async(conn).await?;
    let items = match replies {
        redis::Value::Array(items) if items.len() == BANK_ACCOUNTS as usize => items,
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected EXEC reply to a bank read",
                format!("{other:?}"),
            )));
        }
    };
    let mut balances = Vec::with_capacity(items.len());
    for reply in items {
        if let redis::Value::ServerError(e) = reply {
            return Err(e.into());
        }
        let balance: Option<i64> = redis::from_redis_value(reply)?;
        balances.push(balance);
    }
    Ok(json!(balances))
}

/// One bank transfer, `{"from": a, "to": b, "amount": x}`: `WATCH` both accounts, read both,
/// and when `a` can pay, `MULTI`, `DECRBY a x`, `INCRBY b x`, `EXEC`. Returns `true` when EXEC
/// committed it, `false` when `a` could not pay (nothing sent; the WATCH is dropped). An EXEC
/// answered nil is an `EXECABORT` error (nothing happened). `exec_sent` turns true just before
/// EXEC goes out: from then on an error or a timeout leaves the outcome unknown.
async fn transfer(
    conn: &mut redis::aio::MultiplexedConnection,
    value: &Json,
    exec_sent: &mut bool,
) -> redis::RedisResult<Json> {
    let malformed = || redis::RedisError::from((redis::ErrorKind::Client, "malformed transfer"));
    let account = |field: &str| {
        value[field]
            .as_u64()
            .filter(|n| *n < BANK_ACCOUNTS as u64)
            .map(|n| bank_key(n as u32))
    };
    let (Some(from), Some(to), Some(amount)) =
        (account("from"), account("to"), value["amount"].as_i64())
    else {
        return Err(malformed());
    };
    let () = redis::cmd("WATCH")
        .arg(&from)
        .arg(&to)
        .query_async(conn)
        .await?;
    let balance: Option<i64> = conn.get(&from).await?;
    let _: Option<i64> = conn.get(&to).await?;
    if balance.unwrap_or(0) < amount {
        let () = redis::cmd("UNWATCH").query_async(conn).await?;
        return Ok(json!(false));
    }
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("DECRBY")
        .arg(&from)
        .arg(amount)
        .cmd("INCRBY")
        .arg(&to)
        .arg(amount);
    *exec_sent = true;
    let replies: redis::Value = pipe.query_async(conn).await?;
    match replies {
        redis::Value::Array(items) if items.len() == 2 => {
            for reply in items {
                if let redis::Value::ServerError(e) = reply {
                    return Err(e.into());
                }
            }
            Ok(json!(true))
        }
        redis::Value::Nil => Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort),
            "EXEC answered nil (a watched account changed)",
        ))),
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected EXEC reply to a transfer",
            format!("{other:?}"),
        ))),
    }
}

/// A collection read as the history records it: integer elements as numbers, anything else
/// as the string read (the checker reports it as malformed rather than the harness dropping it).
fn collection_elements(items: Vec<String>) -> Json {
    Json::Array(
        items
            .into_iter()
            .map(|s| match s.parse::<i64>() {
                Ok(e) if e.to_string() == s => json!(e),
                _ => json!(s),
            })
            .collect(),
    )
}

/// Everything the clients share.
pub struct Shared {
    pub recorder: Recorder,
    pub keys: Mutex<Keys>,
    pub mix: Mix,
    pub clients: u64,
    /// How clients choose nodes, each node's RESP address (node `i` at `i - 1`), and the
    /// shard map roles are taken from.
    pub route: Route,
    pub addrs: Vec<String>,
    pub shards: ShardMap,
    /// Writes sent through a node that was not the shard's leader and not answered yet: the
    /// `kill-leader` nemesis waits for some before it strikes.
    pub forwarded_in_flight: AtomicU64,
}

/// One operation to perform.
pub struct Invocation {
    pub workload: Workload,
    pub f: F,
    pub key: String,
    pub value: Json,
    /// Marks the final reads after the heal.
    pub final_read: bool,
}

/// Runs one operation end to end: invoke record, request, completion record. Returns the
/// outcome and result; after `Info` the caller must continue under a fresh process id.
pub async fn perform(
    shared: &Shared,
    client: &mut Client,
    process: u64,
    op: Invocation,
) -> (Stage, Json) {
    let Invocation {
        workload: w,
        f,
        key,
        value,
        final_read,
    } = op;
    let node = client.node;
    // `ap` keyspaces have no leader; roles are about the `default` keyspace's shards.
    let role = if client.ap_keyspace.is_some() {
        None
    } else {
        shared.shards.role(node, &key)
    };
    let forwarded = f != F::Read && matches!(role, Some(Role::Follower | Role::Other));
    let event = |stage: Stage, result: Json, error: Option<String>| {
        Record::Op(OpEvent {
            index: 0,
            time_ns: 0,
            stage,
            process,
            node,
            role,
            workload: w,
            f,
            key: key.clone(),
            value: value.clone(),
            result,
            error,
            final_read,
        })
    };
    shared.recorder.push(event(Stage::Invoke, Json::Null, None));
    if forwarded {
        shared.forwarded_in_flight.fetch_add(1, Ordering::SeqCst);
    }
    let (stage, result, error) = match client.run(w, f, &key, &value).await {
        Outcome::Ok(v) => (Stage::Ok, v, None),
        Outcome::Fail(e) => (Stage::Fail, Json::Null, Some(e)),
        Outcome::Info(e) => (Stage::Info, Json::Null, Some(e)),
    };
    if forwarded {
        shared.forwarded_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    // Reads, CAS, increments (the counter's new value) and collection inserts (how many
    // elements were new) carry a result the checkers use; not increments of `ap` keyspaces,
    // whose replicas answer with their own partial view.
    let result = match f {
        F::Read | F::Cas | F::Txn | F::Transfer => result,
        F::Add if client.ap_keyspace.is_none() => result,
        F::Insert if w.is_collection() => result,
        _ => Json::Null,
    };
    shared.recorder.push(event(stage, result.clone(), error));
    shared
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(w, f, &key, &value, stage, &result);
    (stage, result)
}

/// One client's loop: an operation, then a pause to keep to `interval` per client, until
/// `stop` turns true. After an indeterminate outcome the client continues as a new process.
pub async fn client_loop(
    shared: Arc<Shared>,
    id: u64,
    mut client: Client,
    seed: u64,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Its own generator: how often the leader was known must not change the operations.
    let mut route_rng = fastrand::Rng::with_seed(seed ^ 0x726f757465);
    let mut process = id;
    // A mixed-route client picks its first node like every later one.
    let mut bound_ops = REBIND_OPS;
    let mut last = Stage::Ok;
    while !*stop.borrow() {
        if shared.route == Route::Mixed
            && (bound_ops >= REBIND_OPS || last != Stage::Ok)
            && !shared.addrs.is_empty()
        {
            let node = shared
                .shards
                .pick(shared.addrs.len() as u32, &mut route_rng);
            client.rebind(node, shared.addrs[node as usize - 1].clone());
            bound_ops = 0;
        }
        bound_ops += 1;
        let started = Instant::now();
        let w = shared.mix.pick(&mut rng);
        let (f, key, value) = shared
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(w, &mut rng);
        let op = Invocation {
            workload: w,
            f,
            key,
            value,
            final_read: false,
        };
        let (stage, _) = perform(&shared, &mut client, process, op).await;
        last = stage;
        if stage == Stage::Info {
            process += shared.clients;
        }
        // After an error, back off a little longer so a partition does not turn into a flood
        // of indeterminate operations (each one makes the checker's job harder).
        let pause = if stage == Stage::Ok {
            interval.saturating_sub(started.elapsed())
        } else {
            interval.max(Duration::from_millis(300))
        };
        let jitter = Duration::from_micros(rng.u64(0..=(pause.as_micros() as u64 / 5).max(1)));
        tokio::select! {
            _ = tokio::time::sleep(pause + jitter) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_what_they_promise() {
        // Reads change nothing: any error is a failure.
        assert_eq!(error_stage(false, None), Stage::Fail);
        assert_eq!(error_stage(false, Some("UNCERTAIN")), Stage::Fail);
        // Writes: only TRYAGAIN promises "not applied".
        assert_eq!(error_stage(true, Some("TRYAGAIN")), Stage::Fail);
        assert_eq!(error_stage(true, Some("UNCERTAIN")), Stage::Info);
        assert_eq!(error_stage(true, Some("ERR")), Stage::Info);
        assert_eq!(error_stage(true, None), Stage::Info);
        // The redis crate reports the codes as capdb sends them.
        let code = |line: &str| {
            let e = redis::parse_redis_value(line.as_bytes())
                .and_then(|v| v.extract_error())
                .expect_err("an error reply");
            e.code().map(str::to_string)
        };
        assert_eq!(code("-TRYAGAIN no leader\r\n").as_deref(), Some("TRYAGAIN"));
        assert_eq!(
            code("-UNCERTAIN the outcome is unknown\r\n").as_deref(),
            Some("UNCERTAIN")
        );
    }

    #[test]
    fn a_transfer_is_uncertain_only_once_exec_was_sent() {
        let error = |code: &str| -> redis::RedisResult<Json> {
            Err(
                redis::parse_redis_value(format!("-{code} x\r\n").as_bytes())
                    .and_then(|v| v.extract_error())
                    .expect_err("an error reply"),
            )
        };
        let mut client = Client::new(1, "127.0.0.1:1".into());
        let stage = |client: &mut Client, code: &str, exec_sent: bool| match client
            .classify(Ok(error(code)), exec_sent)
        {
            Outcome::Ok(_) => Stage::Ok,
            Outcome::Fail(_) => Stage::Fail,
            Outcome::Info(_) => Stage::Info,
        };
        // WATCH, GET or MULTI failed: nothing was proposed, whatever the error says.
        assert_eq!(stage(&mut client, "UNCERTAIN", false), Stage::Fail);
        assert_eq!(stage(&mut client, "ERR", false), Stage::Fail);
        // EXEC went out: only an answer that promises "not applied" is a failure.
        assert_eq!(stage(&mut client, "UNCERTAIN", true), Stage::Info);
        assert_eq!(stage(&mut client, "ERR", true), Stage::Info);
        assert_eq!(stage(&mut client, "EXECABORT", true), Stage::Fail);
        assert_eq!(stage(&mut client, "TRYAGAIN", true), Stage::Fail);
    }

    #[test]
    fn transfers_move_money_between_two_different_accounts() {
        let mut rng = fastrand::Rng::with_seed(9);
        let (mut reads, mut transfers) = (0, 0);
        for _ in 0..1000 {
            match next_bank(&mut rng) {
                (F::Read, key, Json::Null) if key == "bank" => reads += 1,
                (F::Transfer, key, v) if key == "bank" => {
                    transfers += 1;
                    let (from, to) = (v["from"].as_u64().unwrap(), v["to"].as_u64().unwrap());
                    assert_ne!(from, to);
                    assert!(from < BANK_ACCOUNTS as u64 && to < BANK_ACCOUNTS as u64);
                    assert!((1..=BANK_TRANSFER_MAX).contains(&v["amount"].as_i64().unwrap()));
                }
                other => panic!("not a bank operation: {other:?}"),
            }
        }
        assert!(
            reads > 300 && transfers > 500,
            "{reads} reads, {transfers} transfers"
        );
    }

    #[test]
    fn cas_operations_expect_the_last_value_seen() {
        let mut keys = Keys::new(1, 1, 1);
        let mut rng = fastrand::Rng::with_seed(5);
        // A fresh key is written first: there is nothing to compare with yet.
        let (f, key, value) = keys.next(Workload::Cas, &mut rng);
        assert_eq!((f, key.as_str()), (F::Write, "{cas}:0"));
        keys.observe(Workload::Cas, f, &key, &value, Stage::Ok, &Json::Null);
        let mut saw_cas = false;
        for _ in 0..40 {
            let (f, key, value) = keys.next(Workload::Cas, &mut rng);
            let known = keys.cas[0].known;
            match f {
                F::Cas => {
                    saw_cas = true;
                    assert_eq!(value[0].as_i64(), known);
                    // A failed CAS makes the next operation on the key a read.
                    keys.observe(Workload::Cas, f, &key, &value, Stage::Ok, &json!(false));
                    let (next, _, _) = keys.next(Workload::Cas, &mut rng);
                    assert_eq!(next, F::Read);
                }
                F::Write => keys.observe(Workload::Cas, f, &key, &value, Stage::Ok, &Json::Null),
                F::Read => keys.observe(Workload::Cas, f, &key, &value, Stage::Ok, &json!(known)),
                other => panic!("{other:?} in the cas workload"),
            }
        }
        assert!(saw_cas);
        // Every key of the workload lives in one slot.
        assert!(keys.used.iter().all(|(_, k)| k.starts_with("{cas}:")));
    }

    #[test]
    fn collection_reads_keep_what_is_not_an_element() {
        let read = collection_elements(vec!["7".into(), "04".into(), "x".into(), "-2".into()]);
        assert_eq!(read, json!([7, "04", "x", -2]));
    }

    #[test]
    fn collection_keys_retire_after_their_elements() {
        let mut keys = Keys::new(1, 1, 1);
        keys.ap = true;
        let mut rng = fastrand::Rng::with_seed(3);
        let mut seen = std::collections::BTreeMap::<String, Vec<i64>>::new();
        for _ in 0..2 * COLLECTION_ELEMENTS_PER_KEY {
            let (f, key, value) = keys.next(Workload::Sadd, &mut rng);
            // `ap` runs read only after the final heal.
            assert_eq!(f, F::Insert);
            seen.entry(key).or_default().push(value.as_i64().unwrap());
        }
        let (_, hkey, _) = keys.next(Workload::Hset, &mut rng);
        assert_eq!(hkey, "hset:0");
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["sadd:0", "sadd:1"]);
        assert!(
            seen.values()
                .all(|v| v.len() == COLLECTION_ELEMENTS_PER_KEY as usize)
        );
        // Elements are unique across keys and workloads.
        let mut all: Vec<i64> = seen.into_values().flatten().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * COLLECTION_ELEMENTS_PER_KEY as usize);
    }
}
