//! The `stream` workload's readers (issue 14): while clients write unique values to
//! `stream:N` keys (an ordinary workload, recorded in the history), these follow the `default`
//! keyspace's merged change stream `__changes:default` through random nodes, under the same
//! faults:
//!
//! - **group consumers**: [`GROUPS`] consumer groups of [`CONSUMERS`] consumers each, looping
//!   `XREADGROUP ... >` then one `XACK` per entry, recording every delivery and every ack's
//!   answer. Now and then a consumer "crashes" between delivery and ack (drops its connection
//!   and forgets); its next incarnation first claims entries idle for a second
//!   (`XAUTOCLAIM`). Any error is a crash too (a new connection, maybe to another node).
//! - **a plain reader**: `XREAD` from a checkpointed position; a crash rolls what it
//!   processed back to the last checkpoint and reads on from there.
//! - **a watcher**: asks `CHANGES RESOLVED default` of random nodes, recording each answer
//!   with its invocation and completion times.
//!
//! After the final heal they stop; the groups are drained (claim everything, read `>` to the
//! end, ack), the reader reads to the end, and the whole stream is read once more with
//! `XRANGE`. `check::stream` judges the lot against the writes' history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::watch;

use crate::HarnessError;
use crate::cluster::Nodes;
use crate::workload::Shared;

/// Keys the workload writes (`stream:0` ...): spread over the shards.
pub const STREAM_KEYS: usize = 12;
/// Consumer groups, and consumers per group.
pub const GROUPS: usize = 2;
pub const CONSUMERS: usize = 2;
/// The merged stream read.
pub const STREAM_KEY: &str = "__changes:default";

/// A stream ID as `(ms, seq)`.
pub type Pos = (u64, u64);
/// An XACK of one ID and its answer (`None`: an error, outcome unknown).
pub type Ack = (Pos, Option<i64>);
/// A resolved ID announced: (invoked ns, completed ns, the ID).
pub type Announced = (u64, u64, Pos);

/// One entry as a reader got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: (u64, u64),
    pub key: String,
    /// The written value (`None`: the event carries none, e.g. a delete).
    pub value: Option<i64>,
    /// The transaction the event belongs to, if any.
    pub txn: Option<String>,
}

/// What the readers recorded.
#[derive(Debug, Default, Clone)]
pub struct StreamLog {
    /// The stream's position when the workload began (every write comes after it).
    pub start: (u64, u64),
    /// Per group: every delivery (entry, consumer incarnation, whether by a claim rather
    /// than `>`), in the order received.
    pub deliveries: Vec<Vec<(Seen, u64, bool)>>,
    /// Per group: every XACK of one ID and its answer (`None`: an error, outcome unknown).
    pub acks: Vec<Vec<Ack>>,
    /// Per group: the pending entries left after the drain (must be 0).
    pub pending_after: Vec<Option<i64>>,
    /// The plain reader's processed sequence (crashes rolled back to checkpoints).
    pub plain: Vec<Seen>,
    /// Whether the plain reader and the drains reached the end.
    pub drained: bool,
    /// Resolved after the workload stopped and late commits landed: every reader is
    /// compared with the stream up to here.
    pub end: Pos,
    /// The whole stream after `start`, read once at the end (past `end` too).
    pub full: Vec<Seen>,
    /// Resolved IDs announced: (invoked ns, completed ns, id).
    pub resolved: Vec<Announced>,
    /// Errors of the readers (for the report; an error is not a finding by itself).
    pub errors: u64,
}

fn parse_id(s: &str) -> Option<(u64, u64)> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn id_text(id: (u64, u64)) -> String {
    format!("{}-{}", id.0, id.1)
}

pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The entries of a stream reply part `[[id, [field, value, ...]], ...]`.
fn entries(v: &Value) -> Vec<Seen> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = parse_id(&text(pair.first()?)?)?;
            let Value::Array(fields) = pair.get(1)? else {
                return None;
            };
            let mut seen = Seen {
                id,
                key: String::new(),
                value: None,
                txn: None,
            };
            for f in fields.chunks(2) {
                let (Some(k), Some(v)) = (f.first().and_then(text), f.get(1).and_then(text)) else {
                    continue;
                };
                match k.as_str() {
                    "key" => seen.key = v,
                    "value" => seen.value = v.parse().ok(),
                    "txn" => seen.txn = Some(v),
                    _ => {}
                }
            }
            Some(seen)
        })
        .collect()
}

/// The entries of the first stream of an XREAD/XREADGROUP reply (none for nil).
fn first_stream(v: &Value) -> Vec<Seen> {
    match v {
        Value::Array(per_key) => match per_key.first() {
            Some(Value::Array(kv)) => kv.get(1).map(entries).unwrap_or_default(),
            _ => Vec::new(),
        },
        Value::Map(m) => m.first().map(|(_, e)| entries(e)).unwrap_or_default(),
        _ => Vec::new(),
    }
}

async fn connect(addr: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(7)));
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())
}

async fn query(
    conn: &mut redis::aio::MultiplexedConnection,
    args: &[&str],
) -> Result<Value, String> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    tokio::time::timeout(Duration::from_secs(8), c.query_async(conn))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Runs `args` on the first node (from a random start) that answers, for up to `within`.
pub(crate) async fn anywhere(
    nodes: &Nodes,
    args: &[&str],
    within: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    let mut i = fastrand::u32(1..=nodes.count());
    while Instant::now() < deadline {
        i = i % nodes.count() + 1;
        match connect(&nodes.resp_addr(i)).await {
            Ok(mut c) => match query(&mut c, args).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("{}: {last}", args.join(" ")))
}

/// Turns the keyspace's change log on and creates the groups (at the log's start), before any
/// write; answers where the stream stands.
pub async fn set_up(nodes: &Nodes) -> Result<(u64, u64), HarnessError> {
    let within = Duration::from_secs(60);
    let fail = |e: String| HarnessError(format!("stream workload setup: {e}"));
    anywhere(nodes, &["CHANGES", "CONFIG", "default", "on"], within)
        .await
        .map_err(fail)?;
    for g in 0..GROUPS {
        let name = format!("g{g}");
        match anywhere(nodes, &["XGROUP", "CREATE", STREAM_KEY, &name, "0"], within).await {
            Ok(_) => {}
            // A retried create that had worked.
            Err(e) if e.contains("BUSYGROUP") => {}
            Err(e) => return Err(fail(e)),
        }
    }
    let resolved = anywhere(nodes, &["CHANGES", "RESOLVED", "default"], within)
        .await
        .map_err(fail)?;
    text(&resolved)
        .and_then(|t| parse_id(&t))
        .ok_or_else(|| fail(format!("CHANGES RESOLVED answered {resolved:?}")))
}

/// The running readers.
pub struct Readers {
    stop: watch::Sender<bool>,
    groups: Vec<tokio::task::JoinHandle<GroupLog>>,
    plain: tokio::task::JoinHandle<(Vec<Seen>, u64)>,
    watcher: tokio::task::JoinHandle<(Vec<Announced>, u64)>,
    start: (u64, u64),
}

#[derive(Default)]
struct GroupLog {
    deliveries: Vec<(Seen, u64, bool)>,
    acks: Vec<Ack>,
    errors: u64,
}

/// Starts the readers (the history's clock is `shared.recorder`'s).
pub fn start(shared: Arc<Shared>, nodes: Arc<Nodes>, start: (u64, u64), seed: u64) -> Readers {
    let (stop, stop_rx) = watch::channel(false);
    let mut groups = Vec::new();
    for g in 0..GROUPS {
        for c in 0..CONSUMERS {
            let (nodes, stop) = (nodes.clone(), stop_rx.clone());
            let seed = seed
                .wrapping_mul(31)
                .wrapping_add((g * CONSUMERS + c) as u64);
            groups.push(tokio::spawn(consume(nodes, g, c, seed, stop)));
        }
    }
    let plain = tokio::spawn(read_plain(nodes.clone(), start, seed, stop_rx.clone()));
    let watcher = tokio::spawn(watch_resolved(shared, nodes, seed, stop_rx));
    Readers {
        stop,
        groups,
        plain,
        watcher,
        start,
    }
}

/// One group consumer until `stop`.
async fn consume(
    nodes: Arc<Nodes>,
    group: usize,
    consumer: usize,
    seed: u64,
    stop: watch::Receiver<bool>,
) -> GroupLog {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut log = GroupLog::default();
    let g = format!("g{group}");
    let mut incarnation: u64 = 0;
    while !*stop.borrow() {
        incarnation += 1;
        let name = format!("c{consumer}-{incarnation}");
        let node = rng.u32(1..=nodes.count());
        let Ok(mut conn) = connect(&nodes.resp_addr(node)).await else {
            log.errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // A new incarnation takes over what dead ones left pending for a second.
        let mut batch = match query(
            &mut conn,
            &[
                "XAUTOCLAIM",
                STREAM_KEY,
                &g,
                &name,
                "1000",
                "0-0",
                "COUNT",
                "100",
            ],
        )
        .await
        {
            Ok(Value::Array(parts)) => parts.get(1).map(entries).unwrap_or_default(),
            Ok(_) => Vec::new(),
            Err(_) => {
                log.errors += 1;
                continue;
            }
        };
        let mut by_claim = true;
        loop {
            for e in &batch {
                log.deliveries.push((e.clone(), incarnation, by_claim));
            }
            by_claim = false;
            // Now and then, die between delivery and ack.
            if !batch.is_empty() && rng.u8(0..30) == 0 {
                break;
            }
            let mut failed = false;
            for e in &batch {
                let id = id_text(e.id);
                match query(&mut conn, &["XACK", STREAM_KEY, &g, &id]).await {
                    Ok(Value::Int(n)) => log.acks.push((e.id, Some(n))),
                    _ => {
                        log.acks.push((e.id, None));
                        failed = true;
                        break;
                    }
                }
            }
            if failed || *stop.borrow() {
                log.errors += u64::from(failed);
                break;
            }
            let args = [
                "XREADGROUP",
                "GROUP",
                &g,
                &name,
                "COUNT",
                "50",
                "BLOCK",
                "300",
                "STREAMS",
                STREAM_KEY,
                ">",
            ];
            let read = query(&mut conn, &args);
            // Never cancelled half-way (a delivery the server recorded would go unseen):
            // the block is short, and `stop` is looked at between reads.
            batch = match read.await {
                Ok(v) => first_stream(&v),
                Err(_) => {
                    log.errors += 1;
                    break;
                }
            };
        }
    }
    log
}

/// The plain reader until `stop`: (its processed sequence, errors).
async fn read_plain(
    nodes: Arc<Nodes>,
    start: (u64, u64),
    seed: u64,
    stop: watch::Receiver<bool>,
) -> (Vec<Seen>, u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let (mut processed, mut checkpoint, mut errors) = (Vec::<Seen>::new(), 0usize, 0u64);
    while !*stop.borrow() {
        let node = rng.u32(1..=nodes.count());
        let Ok(mut conn) = connect(&nodes.resp_addr(node)).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let from = id_text(processed.last().map_or(start, |s: &Seen| s.id));
            let args = [
                "XREAD", "COUNT", "100", "BLOCK", "300", "STREAMS", STREAM_KEY, &from,
            ];
            let read = query(&mut conn, &args);
            if *stop.borrow() {
                break;
            }
            match read.await {
                Ok(v) => processed.extend(first_stream(&v)),
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
            match rng.u8(0..20) {
                // A checkpoint: what was processed so far is kept.
                0..=3 => checkpoint = processed.len(),
                // A crash: back to the checkpoint, on another connection.
                4 => {
                    processed.truncate(checkpoint);
                    break;
                }
                _ => {}
            }
        }
    }
    (processed, errors)
}

/// The watcher until `stop`: every resolved ID announced, with its times.
async fn watch_resolved(
    shared: Arc<Shared>,
    nodes: Arc<Nodes>,
    seed: u64,
    stop: watch::Receiver<bool>,
) -> (Vec<Announced>, u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xabcd);
    let (mut out, mut errors) = (Vec::new(), 0u64);
    while !*stop.borrow() {
        let node = rng.u32(1..=nodes.count());
        let invoked = shared.recorder.now_ns();
        let answer = match connect(&nodes.resp_addr(node)).await {
            Ok(mut c) => query(&mut c, &["CHANGES", "RESOLVED", "default"]).await,
            Err(e) => Err(e),
        };
        let completed = shared.recorder.now_ns();
        match answer
            .ok()
            .as_ref()
            .and_then(text)
            .and_then(|t| parse_id(&t))
        {
            Some(id) => out.push((invoked, completed, id)),
            None => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    (out, errors)
}

/// Stops the readers, drains the groups and the plain reader, and reads the whole stream.
pub async fn finish(readers: Readers, nodes: &Nodes) -> StreamLog {
    let _ = readers.stop.send(true);
    let mut log = StreamLog {
        start: readers.start,
        deliveries: vec![Vec::new(); GROUPS],
        acks: vec![Vec::new(); GROUPS],
        pending_after: vec![None; GROUPS],
        ..StreamLog::default()
    };
    for (n, task) in readers.groups.into_iter().enumerate() {
        let g = n / CONSUMERS;
        if let Ok(gl) = task.await {
            log.deliveries[g].extend(gl.deliveries);
            log.acks[g].extend(gl.acks);
            log.errors += gl.errors;
        }
    }
    if let Ok((plain, errors)) = readers.plain.await {
        log.plain = plain;
        log.errors += errors;
    }
    if let Ok((resolved, errors)) = readers.watcher.await {
        log.resolved = resolved;
        log.errors += errors;
    }
    log.drained = drain(nodes, &mut log).await.is_ok();
    log
}

/// Claims and reads every group to the end, acknowledging; reads the plain reader to the
/// end; reads the whole stream.
async fn drain(nodes: &Nodes, log: &mut StreamLog) -> Result<(), String> {
    let within = Duration::from_secs(60);
    // Commits still on their way (riding the next prepare, or an orphan's recovery after the
    // lock deadline) land within a few seconds of the last write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = anywhere(nodes, &["CHANGES", "RESOLVED", "default"], within).await?;
    log.end = text(&end)
        .and_then(|t| parse_id(&t))
        .ok_or_else(|| format!("CHANGES RESOLVED answered {end:?}"))?;
    for g in 0..GROUPS {
        let group = format!("g{g}");
        let incarnation = u64::MAX - g as u64;
        let deadline = Instant::now() + within;
        // Until nothing is pending: a delivery or an ack whose answer was lost shows up as
        // pending again, and the next round claims it.
        loop {
            let mut got: Vec<(Seen, bool)> = Vec::new();
            let mut cursor = "0-0".to_string();
            loop {
                let v = anywhere(
                    nodes,
                    &[
                        "XAUTOCLAIM",
                        STREAM_KEY,
                        &group,
                        "drain",
                        "0",
                        &cursor,
                        "COUNT",
                        "1000",
                    ],
                    within,
                )
                .await?;
                let Value::Array(parts) = v else {
                    return Err("XAUTOCLAIM answered no array".into());
                };
                got.extend(
                    parts
                        .get(1)
                        .map(entries)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| (e, true)),
                );
                cursor = parts.first().and_then(text).unwrap_or_default();
                if cursor == "0-0" {
                    break;
                }
            }
            let mut empty_reads = 0;
            while empty_reads < 2 {
                let v = anywhere(
                    nodes,
                    &[
                        "XREADGROUP",
                        "GROUP",
                        &group,
                        "drain",
                        "COUNT",
                        "1000",
                        "BLOCK",
                        "500",
                        "STREAMS",
                        STREAM_KEY,
                        ">",
                    ],
                    within,
                )
                .await?;
                let read = first_stream(&v);
                if read.is_empty() {
                    empty_reads += 1;
                }
                got.extend(read.into_iter().map(|e| (e, false)));
            }
            for (e, by_claim) in got {
                let id = id_text(e.id);
                log.acks[g].extend(
                    ack(nodes, &group, &id, within)
                        .await
                        .into_iter()
                        .map(|a| (e.id, a)),
                );
                log.deliveries[g].push((e, incarnation, by_claim));
            }
            let pending = anywhere(nodes, &["XPENDING", STREAM_KEY, &group], within).await?;
            let n = match pending {
                Value::Array(p) => match p.first() {
                    Some(Value::Int(n)) => Some(*n),
                    _ => None,
                },
                _ => None,
            };
            log.pending_after[g] = n;
            if n == Some(0) || Instant::now() > deadline {
                break;
            }
        }
    }
    // The plain reader, then everything once more.
    let mut empty_reads = 0;
    while empty_reads < 2 {
        let from = id_text(log.plain.last().map_or(log.start, |s| s.id));
        let v = anywhere(
            nodes,
            &[
                "XREAD", "COUNT", "1000", "BLOCK", "500", "STREAMS", STREAM_KEY, &from,
            ],
            within,
        )
        .await?;
        let got = first_stream(&v);
        if got.is_empty() {
            empty_reads += 1;
        }
        log.plain.extend(got);
    }
    let mut from = format!("({}", id_text(log.start));
    loop {
        let v = anywhere(
            nodes,
            &["XRANGE", STREAM_KEY, &from, "+", "COUNT", "1000"],
            within,
        )
        .await?;
        let got = entries(&v);
        let Some(last) = got.last() else { break };
        from = format!("({}", id_text(last.id));
        log.full.extend(got);
    }
    Ok(())
}

/// XACK of one ID until some node answers: every attempt's answer (`None`: an error, whose
/// outcome is unknown).
async fn ack(nodes: &Nodes, group: &str, id: &str, within: Duration) -> Vec<Option<i64>> {
    let deadline = Instant::now() + within;
    let mut answers = Vec::new();
    let mut i = fastrand::u32(1..=nodes.count());
    while Instant::now() < deadline {
        i = i % nodes.count() + 1;
        let answer = match connect(&nodes.resp_addr(i)).await {
            Ok(mut c) => query(&mut c, &["XACK", STREAM_KEY, group, id]).await,
            // Nothing was sent: nothing to record.
            Err(_) => continue,
        };
        match answer {
            Ok(Value::Int(n)) => {
                answers.push(Some(n));
                return answers;
            }
            _ => answers.push(None),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    answers
}
