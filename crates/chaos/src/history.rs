//! The history file: one JSON object per line, in the order events happened.
//!
//! Client operations appear twice, Jepsen style: an `invoke` record when the client sends the
//! request and a completion record (`ok`, `fail` or `info`) when it knows the outcome. `fail`
//! means the operation certainly did not take effect; `info` means the client cannot know (a
//! timeout, a dropped connection, a retryable error after the request may have been proposed).
//! A process has at most one operation outstanding; after an `info` the client continues under
//! a fresh process id, because its old operation may still take effect at any later time.
//!
//! Nemesis records mark when faults start and stop, so a saved history carries everything the
//! checkers and the report need (`capdb chaos check FILE`).

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Which workload an operation belongs to; each has its own checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Single-key registers with read / write / compare-and-set: checked for linearizability.
    Register,
    /// Counters: increments and reads; no lost or doubled increments.
    Counter,
    /// Append-only sets: no acknowledged element lost, none invented or doubled.
    Set,
    /// Compare-and-set heavy registers on keys of one shard (`{cas}:N`), each CAS expecting the
    /// value the clients last saw: checked for linearizability exactly like [`Workload::Register`].
    /// A CAS applied twice (once by a dying leader, again after a retry) fails its own
    /// comparison the second time and answers nil, which no linearization explains.
    Cas,
    /// Real Redis sets: `SADD sadd:N member` of unique members, read with `SMEMBERS`. Checked
    /// like [`Workload::Set`]; in `ap` keyspaces this is the add-wins set's promise.
    Sadd,
    /// Real Redis hashes: `HSET hset:N field field` of unique fields, read with `HKEYS`. Checked
    /// like [`Workload::Set`] (the fields are the elements).
    Hset,
    /// Transactions (`MULTI`, `RPUSH`/`LRANGE` on a few `append:N` lists, `EXEC`), checked for
    /// strict serializability by the list-append checker (`check::append`). Every operation
    /// has the key `append`; its value is the transaction's micro-operations.
    Append,
    /// Bank transfers between accounts `bank:0..N` (`WATCH` both, `GET` both, then `MULTI`,
    /// `DECRBY`, `INCRBY`, `EXEC`) and reads of every account in one `MULTI`/`EXEC`, checked by
    /// `check::bank`: every read sums to the total and no balance is negative. Every operation
    /// has the key `bank`.
    Bank,
    /// Writes of unique values to `stream:N` keys (spread over the shards), followed through
    /// the keyspace's merged change stream by consumer groups that crash and resume, a plain
    /// reader, and watchers of the resolved ID (`crate::stream`), checked by `check::stream`.
    Stream,
    /// Sets, deletes and short-lived sets of JSON values under `view:` (some in MULTI/EXEC
    /// across shards) while a synchronous view of them is kept (`crate::view`); checked after
    /// the final heal: the view equals a job's recomputation and `VIEW VERIFY` finds no drift.
    View,
}

impl Workload {
    /// Every workload, in the order reports list them.
    pub const ALL: [Workload; 10] = [
        Workload::Register,
        Workload::Cas,
        Workload::Counter,
        Workload::Set,
        Workload::Sadd,
        Workload::Hset,
        Workload::Append,
        Workload::Bank,
        Workload::Stream,
        Workload::View,
    ];

    /// Whether the register (linearizability) checker owns this workload's keys.
    pub fn is_register(self) -> bool {
        matches!(self, Workload::Register | Workload::Cas)
    }

    /// Whether the set checker owns this workload's keys (elements added, never removed).
    pub fn is_set(self) -> bool {
        matches!(self, Workload::Set | Workload::Sadd | Workload::Hset)
    }

    /// Whether the workload writes a Redis collection (a set or a hash) rather than a string.
    pub fn is_collection(self) -> bool {
        matches!(self, Workload::Sadd | Workload::Hset)
    }
}

/// The role the client's node had in the key's shard when the operation was sent, as the
/// harness last saw it (polled every few hundred milliseconds, so it may lag a failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The shard's Raft leader: the write is proposed where it arrives.
    Leader,
    /// A replica that is not the leader: the write is forwarded to the leader.
    Follower,
    /// A node holding no replica of the shard: forwarded as well.
    Other,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    Read,
    Write,
    /// Compare-and-set: value `[expected, new]`; completes with `true`/`false` as `result`.
    Cas,
    /// Counter increment by `value`.
    Add,
    /// Set insertion of element `value` (for collections, the reply: how many members or
    /// fields were new, which for a unique element must be 1).
    Insert,
    /// A transaction: `value` holds its micro-operations `[["append", key, element] |
    /// ["r", key, null], ...]`; on `ok`, `result` holds the same with each read's list.
    Txn,
    /// A bank transfer: `value` is `{"from": a, "to": b, "amount": x}` (account numbers); on
    /// `ok`, `result` is `true` when EXEC committed it and `false` when the balance read under
    /// WATCH did not allow it (nothing was sent). An EXEC answered nil (a watched key changed)
    /// is a `fail`: nothing happened.
    Transfer,
}

/// The stage of an operation this record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One client operation event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpEvent {
    pub index: u64,
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    #[serde(rename = "type")]
    pub stage: Stage,
    pub process: u64,
    /// The node the client talks to (1-based).
    pub node: u32,
    /// That node's role in the key's shard, when the harness knew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub workload: Workload,
    pub f: F,
    pub key: String,
    /// The operation's argument: written value, `[expected, new]`, increment, element.
    #[serde(default)]
    pub value: Json,
    /// On completion: what a read returned (number, null, or list for sets), the CAS
    /// outcome (bool), the counter's value after an increment (INCRBY's answer), or how many
    /// elements a collection insert added (SADD's or HSET's answer).
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub result: Json,
    /// On `fail`/`info`: the error the client saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether this is one of the final reads after the last heal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub final_read: bool,
}

/// A fault starting or ending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NemesisEvent {
    pub index: u64,
    pub time_ns: u64,
    /// `start` or `stop`.
    pub nemesis: String,
    /// Window number, shared by a window's start and stop records.
    pub window: u32,
    /// What was done, for humans and the report, e.g. `partition {1,2} | {3,4,5}`.
    pub fault: String,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Op(OpEvent),
    Nemesis(NemesisEvent),
}

/// An operation with its invocation and completion paired.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub process: u64,
    pub node: u32,
    pub role: Option<Role>,
    pub workload: Workload,
    pub f: F,
    pub key: String,
    pub value: Json,
    pub invoke_ns: u64,
    /// `None` while the operation never completed (the run ended first): treated as `info`.
    pub complete_ns: Option<u64>,
    pub outcome: Stage,
    pub result: Json,
    pub error: Option<String>,
    pub final_read: bool,
}

impl Op {
    /// Whether the operation may have taken effect without the client knowing.
    pub fn indeterminate(&self) -> bool {
        self.outcome == Stage::Info
    }
}

/// Pairs invocations with completions. Errors name the record that breaks the format.
pub fn pair(records: &[Record]) -> Result<Vec<Op>, String> {
    let mut open: std::collections::HashMap<u64, usize> = Default::default();
    let mut ops: Vec<Op> = Vec::new();
    for r in records {
        let Record::Op(e) = r else { continue };
        match e.stage {
            Stage::Invoke => {
                if open.contains_key(&e.process) {
                    return Err(format!(
                        "record {}: process {} invokes while an operation is outstanding",
                        e.index, e.process
                    ));
                }
                open.insert(e.process, ops.len());
                ops.push(Op {
                    process: e.process,
                    node: e.node,
                    role: e.role,
                    workload: e.workload,
                    f: e.f,
                    key: e.key.clone(),
                    value: e.value.clone(),
                    invoke_ns: e.time_ns,
                    complete_ns: None,
                    outcome: Stage::Info,
                    result: Json::Null,
                    error: None,
                    final_read: e.final_read,
                });
            }
            stage => {
                let Some(i) = open.remove(&e.process) else {
                    return Err(format!(
                        "record {}: process {} completes an operation it never invoked",
                        e.index, e.process
                    ));
                };
                let op = &mut ops[i];
                if op.key != e.key || op.f != e.f {
                    return Err(format!(
                        "record {}: completion does not match the invocation of process {}",
                        e.index, e.process
                    ));
                }
                op.complete_ns = Some(e.time_ns);
                op.outcome = stage;
                op.result = e.result.clone();
                op.error = e.error.clone();
            }
        }
    }
    Ok(ops)
}

/// Appends records to a history file as they happen (line-buffered through a `BufWriter`).
pub struct Writer {
    out: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        Ok(Writer {
            out: std::io::BufWriter::new(std::fs::File::create(path)?),
        })
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads a whole history file. A malformed line is an error naming the line.
pub fn read(path: &Path) -> Result<Vec<Record>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        records.push(r);
    }
    Ok(records)
}
