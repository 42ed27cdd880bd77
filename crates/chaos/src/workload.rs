//! Clients: real Redis-protocol connections (the `redis` crate) from the harness to the nodes,
//! each client bound to one node, recording every operation to the history.
//!
//! Keys follow Jepsen's "independent" pattern: a few register keys are active at a time and
//! each is retired after [`REGISTER_OPS_PER_KEY`] operations, so every key's history stays small
//! enough for the linearizability search. Written values are unique per key, so a read names
//! exactly the write it saw.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value as Json, json};
use tokio::sync::watch;

use crate::history::{F, NemesisEvent, OpEvent, Record, Stage, Workload, Writer};

/// Operations on one register key before it is retired for a fresh one.
pub const REGISTER_OPS_PER_KEY: u32 = 120;
/// Elements appended to one set key before a fresh key takes over (bounds value size).
pub const SET_ELEMENTS_PER_KEY: u32 = 500;
/// How long a client waits for any reply; the server's own bound is about 5 s.
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

/// Shared key state: which keys are active, what values come next.
pub struct Keys {
    registers: Vec<RegisterKey>,
    next_register: u32,
    counters: u32,
    sets: Vec<(u32, u32)>,
    next_set: u32,
    next_element: i64,
    /// Every key ever used, for the final reads.
    pub used: BTreeSet<(Workload, String)>,
    /// `ap` runs: no reads during the run (they are not expected to be linearizable), and set
    /// elements are keys of their own (`set:N:E`), so the elements tried per set are kept.
    pub ap: bool,
    pub elements: std::collections::BTreeMap<String, Vec<i64>>,
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
            counters,
            sets: (0..active_sets).map(|id| (id, 0)).collect(),
            next_set: active_sets,
            next_element: 1,
            used: BTreeSet::new(),
            ap: false,
            elements: Default::default(),
        }
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
            Workload::Counter => {
                let key = format!("ctr:{}", rng.u32(0..self.counters));
                if !self.ap && rng.u8(0..5) == 0 {
                    (F::Read, key, Json::Null)
                } else {
                    (F::Add, key, json!(rng.i64(1..=5)))
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
        };
        self.used.insert((w, key.clone()));
        (f, key, value)
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

    /// A client of an `ap` keyspace: reads at `all` (only final reads happen), set inserts at
    /// `quorum`, counter increments at `one`.
    pub fn ap(node: u32, addr: String, keyspace: &str) -> Client {
        Client {
            ap_keyspace: Some(keyspace.to_string()),
            ..Client::new(node, addr)
        }
    }

    async fn connection(&mut self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let client =
            redis::Client::open(format!("redis://{}/", self.addr)).map_err(|e| e.to_string())?;
        let c = tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
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
        if self.ap_keyspace.is_some() && mutates {
            let want = if f == F::Add { "one" } else { "quorum" };
            if self.ap_write_level != Some(want) {
                let r: redis::RedisResult<()> = redis::cmd("CONSISTENCY")
                    .arg("WRITE")
                    .arg(want)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = r {
                    self.conn = None;
                    return Outcome::Fail(format!("CONSISTENCY: {e}"));
                }
                self.ap_write_level = Some(want);
            }
        }
        let ap = self.ap_keyspace.is_some();
        let elements = self.set_elements.get(key).cloned().unwrap_or_default();
        let work = async {
            match (w, f) {
                (Workload::Set, F::Read) if ap => {
                    // Each element is a key of its own; the set is what exists of them.
                    let mut present = Vec::new();
                    for chunk in elements.chunks(200) {
                        let keys: Vec<String> =
                            chunk.iter().map(|e| format!("{key}:{e}")).collect();
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
                (Workload::Register | Workload::Counter, F::Read) => {
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
                        .query_async(&mut conn)
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
        };
        match tokio::time::timeout(OP_TIMEOUT, work).await {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => {
                let e: redis::RedisError = e;
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.conn = None;
                }
                if mutates {
                    Outcome::Info(e.to_string())
                } else {
                    Outcome::Fail(e.to_string())
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

/// Everything the clients share.
pub struct Shared {
    pub recorder: Recorder,
    pub keys: Mutex<Keys>,
    pub mix: Mix,
    pub clients: u64,
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
/// outcome; after `Info` the caller must continue under a fresh process id.
pub async fn perform(shared: &Shared, client: &mut Client, process: u64, op: Invocation) -> Stage {
    let Invocation {
        workload: w,
        f,
        key,
        value,
        final_read,
    } = op;
    let node = client.node;
    let event = |stage: Stage, result: Json, error: Option<String>| {
        Record::Op(OpEvent {
            index: 0,
            time_ns: 0,
            stage,
            process,
            node,
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
    let (stage, result, error) = match client.run(w, f, &key, &value).await {
        Outcome::Ok(v) => (Stage::Ok, v, None),
        Outcome::Fail(e) => (Stage::Fail, Json::Null, Some(e)),
        Outcome::Info(e) => (Stage::Info, Json::Null, Some(e)),
    };
    // Only reads and CAS carry a result the checkers need.
    let result = match f {
        F::Read | F::Cas => result,
        _ => Json::Null,
    };
    shared.recorder.push(event(stage, result, error));
    stage
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
    let mut process = id;
    while !*stop.borrow() {
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
        let stage = perform(&shared, &mut client, process, op).await;
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
