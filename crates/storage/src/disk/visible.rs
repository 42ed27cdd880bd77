//! What readers can see: the writer answers Raft applies before it commits them, so a reader
//! that must see an answered write first waits for the commit that makes it visible.
//!
//! # Why answers come before commits
//!
//! A Raft apply needs no commit to be safe: its entry is durable in the write-ahead log, and a
//! crash replays whatever the last durable commit did not hold (`writer.rs`). Waiting for the
//! commit only delayed the answer: a redb commit of a batch costs hundreds of microseconds
//! (every B-tree page the batch dirtied is checksummed and written out), more than the
//! log's own write and fsync. So the writer runs applies in an open transaction, answers them
//! at once, and commits that transaction later, for many batches at a time (fewer, larger
//! commits: a page dirtied by several batches is written once).
//!
//! # The rule readers follow
//!
//! Reads open redb read transactions, which see only committed data. Every batch the writer
//! runs gets the next *executed* number before any of its jobs is answered; every commit
//! publishes the executed number it covers as *committed*. A reader takes the executed number
//! when it starts and, if the committed number is behind it, asks the writer to commit now and
//! waits for it ([`Visibility::wait_blocking`], or [`Visibility::wait`] in async code). Whatever
//! the reader learned was applied (an answer it saw, a Raft applied index it waited for) was
//! executed before it took the number, so the read sees it. An async reader waits first and
//! hands the number it reached to its table handle (`DiskTable::seen`), so its reads need
//! nothing newer and never block (under steady writes, each read taking a fresh number would
//! otherwise wait for a commit of its own). Only batches answered before their commit are
//! numbered: a batch that waits for its durable commit is visible when it is answered.
//!
//! # Costs and bounds
//!
//! A read waits only when writes were answered since the last commit: at most the rest of one
//! batch and one commit. Readers never wait on each other. A writer whose commit failed after
//! it answered writes is broken for good ([`Visibility::broken`]): its state is behind what it
//! answered, so every later read and write fails until the node restarts and replays its logs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use capdb_types::{Error, Result};

/// Longest a reader waits for a commit before it reports the storage as unavailable.
pub const VISIBLE_WAIT_MAX: Duration = Duration::from_secs(30);

/// Executed and committed batch numbers, shared by the writer and every reader.
#[derive(Default)]
pub(crate) struct Visibility {
    executed: AtomicU64,
    committed: AtomicU64,
    /// A reader waits for a commit: the writer commits after its current batch.
    wanted: AtomicBool,
    /// Why the writer stopped serving (set once, never cleared).
    broken: Mutex<Option<String>>,
    is_broken: AtomicBool,
    lock: Mutex<()>,
    cvar: Condvar,
    notify: tokio::sync::Notify,
    /// Wakes the writer while it waits for jobs with a transaction open.
    writer_wake: tokio::sync::Notify,
}

impl Visibility {
    /// The writer: a batch is about to be answered; returns its number.
    pub(crate) fn executed(&self) -> u64 {
        self.executed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The writer: everything executed so far is committed.
    pub(crate) fn committed(&self) {
        let executed = self.executed.load(Ordering::SeqCst);
        {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.committed.store(executed, Ordering::SeqCst);
            self.wanted.store(false, Ordering::SeqCst);
        }
        self.cvar.notify_all();
        self.notify.notify_waiters();
    }

    /// The writer: whether a reader waits for a commit.
    pub(crate) fn commit_wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst)
    }

    /// The writer, waiting for jobs with a transaction open: resolves when a reader asks for a
    /// commit (at once if one asked since the last wait).
    pub(crate) async fn commit_asked(&self) {
        self.writer_wake.notified().await
    }

    /// The writer: answered writes were lost (a failed commit); nothing is served any more.
    pub(crate) fn break_for_good(&self, why: String) {
        {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = self.broken.lock().unwrap_or_else(|p| p.into_inner());
            b.get_or_insert(why);
            self.is_broken.store(true, Ordering::SeqCst);
        }
        self.cvar.notify_all();
        self.notify.notify_waiters();
    }

    /// Why the writer stopped serving, once it has.
    pub(crate) fn broken(&self) -> Option<Error> {
        if !self.is_broken.load(Ordering::SeqCst) {
            return None;
        }
        let why = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        Some(Error::Io(format!(
            "storage stopped after a failed commit ({}); restart the node to recover from its logs",
            why.as_deref().unwrap_or("unknown")
        )))
    }

    /// The executed number a reader starting now must see committed, or `None` when it
    /// already is.
    fn pending(&self) -> Result<Option<u64>> {
        if let Some(e) = self.broken() {
            return Err(e);
        }
        let target = self.executed.load(Ordering::SeqCst);
        if self.committed.load(Ordering::SeqCst) >= target {
            return Ok(None);
        }
        self.ask();
        Ok(Some(target))
    }

    /// Asks the writer to commit (it may be waiting for jobs with a transaction open).
    fn ask(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        self.writer_wake.notify_one();
    }

    fn reached(&self, target: u64) -> Result<bool> {
        if let Some(e) = self.broken() {
            return Err(e);
        }
        Ok(self.committed.load(Ordering::SeqCst) >= target)
    }

    /// Waits (blocking the thread) until everything executed before this call is committed,
    /// or only what was executed before `seen` when given (a number [`Visibility::wait`]
    /// returned: the caller already waited, and needs nothing newer).
    pub(crate) fn wait_blocking(&self, seen: Option<u64>) -> Result<()> {
        let target = match seen {
            Some(seen) if self.reached(seen)? => return Ok(()),
            Some(seen) => {
                self.ask();
                seen
            }
            None => match self.pending()? {
                Some(target) => target,
                None => return Ok(()),
            },
        };
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed = None;
        let (_guard, timeout) = self
            .cvar
            .wait_timeout_while(guard, VISIBLE_WAIT_MAX, |_| match self.reached(target) {
                Ok(reached) => !reached,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })
            .unwrap_or_else(|p| p.into_inner());
        if let Some(e) = failed {
            return Err(e);
        }
        if timeout.timed_out() {
            return Err(Error::Unavailable(format!(
                "storage did not commit within {} s",
                VISIBLE_WAIT_MAX.as_secs()
            )));
        }
        Ok(())
    }

    /// [`Visibility::wait_blocking`] for async callers; returns the number it waited for, for
    /// the reads that follow to need nothing newer.
    pub(crate) async fn wait(&self) -> Result<u64> {
        let target = match self.pending()? {
            Some(target) => target,
            None => return Ok(self.committed.load(Ordering::SeqCst)),
        };
        let waited = tokio::time::timeout(VISIBLE_WAIT_MAX, async {
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.reached(target)? {
                    return Ok(target);
                }
                notified.await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "storage did not commit within {} s",
                VISIBLE_WAIT_MAX.as_secs()
            )))
        })
    }
}
