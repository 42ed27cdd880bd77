//! The writer thread: takes queued jobs in batches, runs them in its open transaction, answers
//! them (before the commit when they need no fsync) and commits (see `mod.rs`, `visible.rs`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capdb_types::{Error, Hlc, Result};
use redb::{Database, Durability, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::ops::{Exec, Op, Output, execute};
use super::visible::Visibility;
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
    visible: Arc<Visibility>,
    wal_closed: Closed,
) -> Result<(mpsc::Sender<Job>, Closed)> {
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_JOBS_MAX);
    let closed = Closed::new();
    let writer_closed = closed.clone();
    std::thread::Builder::new()
        .name("capdb-writer".into())
        .spawn(move || {
            writer_loop(&db, rx, &hlc, value_bytes_max, &stats, &visible);
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

/// Longest a transaction of answered writes stays uncommitted while nothing else asks for a
/// commit. Readers do not wait for it (they ask for a commit, `visible.rs`); it bounds how much
/// a commit carries, hence how long it stalls the writer.
pub const COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// Most jobs answered before their commit: at this many the writer commits.
pub const UNCOMMITTED_JOBS_MAX: usize = 65_536;
/// Most payload bytes answered before their commit: at this many the writer commits.
pub const UNCOMMITTED_BYTES_MAX: usize = 64 << 20;

/// The writer's open transaction: batches executed since the last commit.
struct Open {
    txn: WriteTransaction,
    since: Instant,
    /// Jobs executed in it and already answered (non-durable jobs).
    answered: usize,
    jobs: usize,
    bytes: usize,
    /// The tables that existed when it began, restored if it aborts.
    tables_before: HashSet<String>,
    /// The views' changes of its applies, written just before it commits.
    views: std::cell::RefCell<super::views::Deferred>,
}

/// The writer's state between batches.
struct Writer<'a> {
    db: &'a Database,
    hlc: &'a Hlc,
    value_bytes_max: usize,
    stats: &'a EngineStats,
    visible: &'a Visibility,
    /// Tables that exist: a write to a table dropped after the write was queued must fail, not
    /// silently re-create the table (redb's open_table creates missing tables).
    live_tables: HashSet<String>,
    open: Option<Open>,
    last_durable: Instant,
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    hlc: &Hlc,
    value_bytes_max: usize,
    stats: &EngineStats,
    visible: &Visibility,
) {
    let live_tables = match list_tables(db) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot list tables; storage writer stopping");
            return;
        }
    };
    // Waiting for the next job with a deadline (the commit window) needs a timer.
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the writer's timer; storage writer stopping");
            return;
        }
    };
    // A panic here drops the open transaction, and with it writes already answered.
    let _stop = BreakOnPanic(visible);
    let mut w = Writer {
        db,
        hlc,
        value_bytes_max,
        stats,
        visible,
        live_tables,
        open: None,
        last_durable: Instant::now(),
    };
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH_JOBS_MAX);
    loop {
        let first = match &w.open {
            None => rx.blocking_recv(),
            Some(o) => {
                let left = COMMIT_WINDOW.saturating_sub(o.since.elapsed());
                let next = timer.block_on(async {
                    let window = tokio::time::sleep(left);
                    tokio::pin!(window);
                    loop {
                        tokio::select! {
                            job = rx.recv() => return Some(job),
                            // A wake-up left by a reader whose commit already happened is not
                            // a reason to commit.
                            _ = visible.commit_asked() => if visible.commit_wanted() {
                                return None;
                            },
                            _ = &mut window => return None,
                        }
                    }
                });
                match next {
                    Some(job) => job,
                    None => {
                        // A reader asked, or the window passed with nothing queued.
                        let _ = w.commit();
                        continue;
                    }
                }
            }
        };
        let Some(first) = first else { break };
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
        w.run_batch(&mut batch, bytes);
    }
    // Every handle is gone: commit what was answered, then stop.
    let _ = w.commit();
    tracing::debug!("storage writer stopped: all engine handles dropped");
}

impl Writer<'_> {
    /// Executes a batch, answers it (at once for jobs that need no fsync, after the commit for
    /// the others) and commits when something asks for it. Leaves `batch` empty.
    fn run_batch(&mut self, batch: &mut Vec<Job>, bytes: usize) {
        if let Some(e) = self.visible.broken() {
            return fail_all(batch, &e);
        }
        let started = Instant::now();
        let durable = batch.iter().any(|j| j.op.durable());
        // A batch that waits for its commit runs in a transaction of its own, so that its
        // failure (which it reports to its callers) never takes writes answered before it.
        if durable
            && self.open.as_ref().is_some_and(|o| o.answered > 0)
            && let Err(e) = self.commit()
        {
            return fail_all(batch, &e);
        }
        let o = match self.open.take() {
            Some(o) => o,
            None => match self.begin() {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, jobs = batch.len(), "cannot begin a write transaction; the batch fails");
                    return fail_all(batch, &e);
                }
            },
        };
        let x = Exec {
            txn: &o.txn,
            hlc: self.hlc,
            value_bytes_max: self.value_bytes_max,
            stats: self.stats,
            views: &o.views,
        };
        let mut outputs = Vec::with_capacity(batch.len());
        for job in batch.iter() {
            match execute(&x, &job.op, &mut self.live_tables) {
                Ok(out) => outputs.push(out),
                Err(e) => {
                    // The transaction aborts: this batch and every answered job before it.
                    self.live_tables = o.tables_before;
                    if o.answered > 0 {
                        tracing::error!(error = %e, answered = o.answered, "a write failed after earlier writes were answered; storage stops until restart");
                        self.visible.break_for_good(e.to_string());
                    } else {
                        tracing::error!(error = %e, jobs = batch.len(), "write batch failed; nothing of it was applied");
                    }
                    return fail_all(batch, &e);
                }
            }
        }
        debug_assert_eq!(outputs.len(), batch.len());
        let mut o = o;
        o.jobs += batch.len();
        o.bytes += bytes;
        self.stats
            .commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if durable {
            self.open = Some(o);
            // This commit is the durability point every job of the batch waits for.
            match self.commit_durable(true) {
                Ok(()) => answer_all(batch, outputs),
                Err(e) => fail_all(batch, &e),
            }
            return;
        }
        // Numbered before anyone hears of it: a reader told it happened waits for its commit.
        self.visible.executed();
        o.answered += batch.len();
        answer_all(batch, outputs);
        let due = self.visible.commit_wanted()
            || o.since.elapsed() >= COMMIT_WINDOW
            || o.answered >= UNCOMMITTED_JOBS_MAX
            || o.bytes >= UNCOMMITTED_BYTES_MAX
            || self.last_durable.elapsed() >= CHECKPOINT_INTERVAL;
        self.open = Some(o);
        if due {
            let _ = self.commit();
        }
    }

    fn begin(&self) -> Result<Open> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::None).map_err(io_err)?;
        Ok(Open {
            txn,
            since: Instant::now(),
            answered: 0,
            jobs: 0,
            bytes: 0,
            tables_before: self.live_tables.clone(),
            views: Default::default(),
        })
    }

    /// Commits the open transaction, durably when a checkpoint is due
    /// ([`CHECKPOINT_INTERVAL`]).
    fn commit(&mut self) -> Result<()> {
        self.commit_durable(false)
    }

    fn commit_durable(&mut self, durable: bool) -> Result<()> {
        let Some(mut o) = self.open.take() else {
            return Ok(());
        };
        let durable = durable || self.last_durable.elapsed() >= CHECKPOINT_INTERVAL;
        let started = Instant::now();
        let result = (|| {
            o.views.get_mut().flush(&o.txn)?;
            if durable {
                o.txn
                    .set_durability(Durability::Immediate)
                    .map_err(io_err)?;
            }
            o.txn.commit().map_err(io_err)
        })();
        let took = started.elapsed().as_micros() as u64;
        self.stats.sync_micros.fetch_add(took, Ordering::Relaxed);
        self.stats.commit_micros.fetch_add(took, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.jobs.fetch_add(o.jobs as u64, Ordering::Relaxed);
                if durable {
                    self.stats.durable_commits.fetch_add(1, Ordering::Relaxed);
                    self.last_durable = Instant::now();
                }
                self.visible.committed();
                Ok(())
            }
            Err(e) => {
                self.live_tables = o.tables_before;
                if o.answered > 0 {
                    tracing::error!(error = %e, answered = o.answered, "a commit of answered writes failed; storage stops until restart");
                    self.visible.break_for_good(e.to_string());
                } else {
                    tracing::error!(error = %e, "commit failed; nothing of it was applied");
                }
                Err(e)
            }
        }
    }
}

/// Stops the engine from serving when the writer thread unwinds (`visible.rs`).
struct BreakOnPanic<'a>(&'a Visibility);

impl Drop for BreakOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .break_for_good("the storage writer thread panicked".into());
        }
    }
}

fn answer_all(batch: &mut Vec<Job>, outputs: Vec<Output>) {
    for (job, out) in batch.drain(..).zip(outputs) {
        let _ = job.done.send(Ok(out));
    }
}

fn fail_all(batch: &mut Vec<Job>, e: &Error) {
    for job in batch.drain(..) {
        let _ = job.done.send(Err(e.clone()));
    }
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
