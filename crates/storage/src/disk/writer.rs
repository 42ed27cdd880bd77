//! The writer thread: takes queued jobs in batches and commits each batch in one transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use capdb_types::{Error, Hlc, Result};
use redb::{Database, Durability, ReadableDatabase};
use tokio::sync::{mpsc, oneshot};

use super::ops::{Exec, Op, Output, execute};
use super::{Closed, DiskEngine, EngineStats, io_err};

/// Jobs waiting for the writer. A full queue makes callers wait (backpressure), it never grows.
pub const WRITE_QUEUE_JOBS_MAX: usize = 16_384;
/// Most jobs committed in one transaction.
pub const BATCH_JOBS_MAX: usize = 4_096;
/// Most payload bytes committed in one transaction (a batch may exceed it by one job).
pub const BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Longest time between durable commits while commits happen. Raft applies are not fsync'd
/// (the write-ahead log can redo them), so without a durable commit now and then a crash would
/// roll the state machines back further and further, and redb would not reuse the pages they
/// freed (it reclaims them at durable commits). Each checkpoint's fsync stalls this writer;
/// measured on a 3-node cluster at 64 clients (`bench/cluster_vs_etcd.py`), put p99 was 76 ms
/// with a checkpoint every second, 54 ms every 5 s, 54 ms with none.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) struct Job {
    pub(super) op: Op,
    pub(super) done: oneshot::Sender<Result<Output>>,
}

/// Starts the writer thread; returns its job queue and the signal that it has stopped. The thread
/// runs until every sender of the queue (every engine handle) has been dropped.
pub(super) fn start(
    db: Arc<Database>,
    hlc: Arc<Hlc>,
    value_bytes_max: usize,
    stats: Arc<EngineStats>,
    wal_closed: Closed,
) -> Result<(mpsc::Sender<Job>, Closed)> {
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_JOBS_MAX);
    let closed = Closed::new();
    let writer_closed = closed.clone();
    std::thread::Builder::new()
        .name("capdb-writer".into())
        .spawn(move || {
            writer_loop(&db, rx, &hlc, value_bytes_max, &stats);
            // Dropping the last handle closes the file cleanly.
            drop(db);
            // The engine is closed once its write-ahead log is too (it stops with the same
            // handles; its files must not be touched by a thread of this engine after).
            wal_closed.wait(std::time::Duration::from_secs(30));
            writer_closed.set();
        })
        .map_err(|e| Error::Io(format!("cannot start writer thread: {e}")))?;
    Ok((tx, closed))
}

impl DiskEngine {
    /// Queues `op` behind every earlier job (waiting while the queue is full) and returns where
    /// its answer will arrive.
    pub(super) async fn enqueue(&self, op: Op) -> Result<oneshot::Receiver<Result<Output>>> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job { op, done })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(wait)
    }

    /// Queues `op` and waits for its answer.
    pub(super) async fn submit(&self, op: Op) -> Result<Output> {
        answer(self.enqueue(op).await?.await)
    }
}

/// A job's answer as its caller sees it: a job that failed alone is an error too.
pub(super) fn answer(
    received: Result<Result<Output>, oneshot::error::RecvError>,
) -> Result<Output> {
    match received.map_err(|_| Error::Io("storage writer stopped".into()))?? {
        Output::Failed(e) => Err(e),
        out => Ok(out),
    }
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
) {
    // Tables that exist: a write to a table dropped after the write was queued must fail, not
    // silently re-create the table (redb's open_table creates missing tables).
    let mut live_tables: std::collections::HashSet<String> = match list_tables(db) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot list tables; storage writer stopping");
            return;
        }
    };
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH_JOBS_MAX);
    let mut last_durable = Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.op.payload_bytes();
        batch.push(first);
        while batch.len() < BATCH_JOBS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.op.payload_bytes();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let before = live_tables.clone();
        let checkpoint = last_durable.elapsed() >= CHECKPOINT_INTERVAL;
        let result = commit_batch(
            db,
            &batch,
            hlc,
            value_bytes_max,
            stats,
            &mut live_tables,
            checkpoint,
        );
        if let Ok(true) = result.as_ref().map(|(_, durable)| *durable) {
            last_durable = Instant::now();
        }
        let result = result.map(|(outputs, _)| outputs);
        if result.is_err() {
            live_tables = before;
        }
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(outputs) => {
                debug_assert_eq!(outputs.len(), batch.len());
                for (job, out) in batch.drain(..).zip(outputs) {
                    let _ = job.done.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "write batch failed; nothing of it was applied");
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("storage writer stopped: all engine handles dropped");
}

fn list_tables(db: &Database) -> Result<std::collections::HashSet<String>> {
    use redb::TableHandle;
    let txn = db.begin_read().map_err(io_err)?;
    let names = txn
        .list_tables()
        .map_err(io_err)?
        .map(|t| t.name().to_string())
        .collect();
    Ok(names)
}

/// Commits a batch; answers each job's output and whether the commit was durable.
fn commit_batch(
    db: &Database,
    batch: &[Job],
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
    live_tables: &mut std::collections::HashSet<String>,
    checkpoint: bool,
) -> Result<(Vec<Output>, bool)> {
    let mut txn = db.begin_write().map_err(io_err)?;
    // One fsync per batch: this is the durability point every acknowledgement waits for. A
    // batch of only replicated applies skips it (their Raft log entries are durable in the
    // write-ahead log), unless it is time for a checkpoint.
    let durable = checkpoint || batch.iter().any(|j| j.op.durable());
    let durability = if durable {
        Durability::Immediate
    } else {
        Durability::None
    };
    txn.set_durability(durability).map_err(io_err)?;
    let x = Exec {
        txn: &txn,
        hlc,
        value_bytes_max,
        stats,
    };
    let mut outputs = Vec::with_capacity(batch.len());
    for job in batch {
        outputs.push(execute(&x, &job.op, live_tables)?);
    }
    let syncing = Instant::now();
    txn.commit().map_err(io_err)?;
    stats
        .sync_micros
        .fetch_add(syncing.elapsed().as_micros() as u64, Ordering::Relaxed);
    if durable {
        stats.durable_commits.fetch_add(1, Ordering::Relaxed);
    }
    Ok((outputs, durable))
}
