//! The Raft log of one group, in the node's write-ahead log (`capdb_storage::wal`).
//!
//! Entries are records of the group in the write-ahead log (index -> postcard-encoded entry +
//! CRC-32); the vote, the committed id and the last purged id live in redb's `_meta` under
//! `raft/{group}/...`.
//!
//! ### To ensure correctness (openraft's contract, and how it is met)
//!
//! - **Durable before acknowledged**: `append` queues the records on the write-ahead log and
//!   calls openraft's `IOFlushed` callback only after the batch holding them has been fsync'd.
//!   `save_vote` waits for its fsync before returning (a forgotten vote can elect two leaders).
//! - **Ordered**: appends and truncations go through the log's single FIFO writer. The vote is
//!   in redb, a different file; openraft takes a saved vote to mean that every log write
//!   submitted before it is durable too (its I/O ids order by vote first), so `save_vote` waits
//!   for a write-ahead log barrier as well as for its own fsync.
//! - **Readable at once**: appended entries are visible to every reader before they are durable,
//!   through the in-memory `unflushed` overlay, which drops an entry once it is on disk.
//! - **No holes**: truncation removes from the end; purge records its watermark first.
//! - **The state machine can always be rebuilt**: applies are not fsync'd (redb commits them
//!   without a sync; a checkpoint makes them durable at least every
//!   `capdb_storage::disk::CHECKPOINT_INTERVAL`), so after a crash the state machine may be
//!   behind what it had applied. The log therefore keeps every entry the durable state machine
//!   has not applied: `purge` first writes its watermark with a durable redb commit, which makes
//!   every apply queued before it durable (openraft purges only entries a snapshot covers, so
//!   applied), and only then lets the log forget the entries. At start openraft re-applies
//!   `(applied, committed]`. The reverse, a state machine durable ahead of the local log
//!   (openraft applies entries a quorum has even before this node's fsync), is repaired by
//!   openraft at start: it purges the log up to the applied id (its `get_initial_state`).
//! - **No leader restored by a restart**: the saved committed id is a hint (not fsync'd, see
//!   `save_committed`), so a restarted node does not know everything it had committed until a
//!   leader of a new term commits its blank entry. openraft's leader restore (a leader resuming
//!   without an election) is therefore off (`groups::default_raft_config`): with it, a restarted
//!   leader answered ReadIndex reads from its stale state machine (the kill -9 tests caught it).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use capdb_cluster::GroupId;
use capdb_storage::disk::DiskEngine;
use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use crate::command::{Entry, LogId, TypeConfig, Vote};
use crate::io;

pub(crate) use capdb_storage::layout::{raft_log_table as log_table, raft_meta_key as meta_key};
use capdb_storage::wal::Wal;

struct Mem {
    /// Appended entries not yet known to be durable, by index.
    unflushed: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    last_log: Option<LogId>,
}

/// One group's log. Cheap to clone; clones share state (the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    engine: DiskEngine,
    wal: Wal,
    group: GroupId,
    mem: Arc<Mutex<Mem>>,
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> io::Result<T> {
    postcard::from_bytes(raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("Raft types always encode")
}

/// A log record: the encoded entry followed by its CRC-32, so a damaged entry is refused (the
/// group stops with a storage error) instead of being applied or replicated to followers.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut raw = encode(entry);
    let crc = crc32fast::hash(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    raw
}

fn decode_entry(raw: &[u8]) -> io::Result<Entry> {
    let corrupt = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if raw.len() < 4 {
        return Err(corrupt("log record shorter than its checksum"));
    }
    let (body, crc) = raw.split_at(raw.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != stored {
        return Err(corrupt(
            "log record checksum mismatch: the Raft log is corrupt",
        ));
    }
    decode(body, "log entry")
}

impl LogStore {
    /// Opens the log of `group`, reading its durable state. A log kept in redb by an earlier
    /// version is moved into the write-ahead log first.
    pub async fn open(engine: DiskEngine, group: GroupId) -> io::Result<LogStore> {
        let wal = engine.wal().clone();
        let last_purged: Option<LogId> =
            match engine.meta_get(&meta_key(group, "purged")).map_err(io)? {
                Some(raw) => Some(decode(&raw, "purged log id")?),
                None => None,
            };
        let next = last_purged.map_or(0, |p| p.index + 1);
        import_redb_log(&engine, &wal, group, next).await?;
        // The log may still hold entries purged before a crash (a purge is memory-only until
        // its segment is reused); the durable watermark says which.
        if let Some(p) = last_purged {
            wal.purge(group, p.index);
        }
        if let Some((first, last, consecutive)) = wal.bounds(group)
            && (!consecutive || (last_purged.is_some() && first != next))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the log of group {group} has a hole: entries {first}..={last} (consecutive: {consecutive}) after purged {last_purged:?}"
                ),
            ));
        }
        let last_log = match wal.last(group).map_err(io)? {
            Some((_, raw)) => Some(decode_entry(&raw)?.log_id),
            None => last_purged,
        };
        Ok(LogStore {
            engine,
            wal,
            group,
            mem: Arc::new(Mutex::new(Mem {
                unflushed: BTreeMap::new(),
                last_purged,
                last_log,
            })),
        })
    }

    /// Whether this group has never stored anything (no vote, no log): a fresh replica.
    pub fn is_pristine(&self) -> io::Result<bool> {
        let vote = self
            .engine
            .meta_get(&meta_key(self.group, "vote"))
            .map_err(io)?;
        let mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        Ok(vote.is_none() && mem.last_log.is_none())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let (start, end) = bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        // Overlay first (under the lock), then disk: an entry that leaves the overlay after
        // being flushed is then certainly on disk.
        let overlay: BTreeMap<u64, Entry> = {
            let mem = self.lock();
            mem.unflushed
                .range(start..end)
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        };
        let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
        for (index, raw) in self.wal.read(self.group, start, end).map_err(io)? {
            entries.insert(index, decode_entry(&raw)?);
        }
        entries.extend(overlay);
        let out: Vec<Entry> = entries.into_values().collect();
        for pair in out.windows(2) {
            if pair[1].log_id.index != pair[0].log_id.index + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "hole in the log of group {} after index {}",
                        self.group, pair[0].log_id.index
                    ),
                ));
            }
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        match self
            .engine
            .meta_get(&meta_key(self.group, "vote"))
            .map_err(io)?
        {
            Some(raw) => Ok(Some(decode(&raw, "vote")?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let mem = self.lock();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log.or(mem.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        // Durable before returning: a node must never forget whom it voted for. And every log
        // write submitted before it must be durable too (module docs).
        self.wal.barrier().await.map_err(io)?;
        self.engine
            .meta_put(
                vec![(meta_key(self.group, "vote"), Some(encode(vote)))],
                true,
            )
            .await
            .map_err(io)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not fsync'd on its own: losing it only means re-applying a few entries after a crash.
        // Its commit is also what batches the applies: while openraft waits for it, more entries
        // commit, and the apply after it carries them all. Measured twice: as a hint riding the
        // next batch (redb log), cross-shard EXEC at 16 clients went 3.0x -> 6.3x SET's p50
        // (docs/design/transactions.md); kept in memory only (write-ahead log), single-node SET
        // at -P 16 went 136 k -> 56 k/s (docs/design/log-engine.md).
        let value = committed.map(|c| encode(&c));
        self.engine
            .meta_put(vec![(meta_key(self.group, "committed"), value)], false)
            .await
            .map_err(io)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        match self
            .engine
            .meta_get(&meta_key(self.group, "committed"))
            .map_err(io)?
        {
            Some(raw) => {
                let committed: LogId = decode(&raw, "committed log id")?;
                // Past the end of the log this node kept (a storage failure let the hint land
                // without the entries it covers): unknown, not a claim openraft would try to
                // re-apply from missing entries. The leader says again what is committed.
                let kept = {
                    let mem = self.lock();
                    mem.last_log.or(mem.last_purged)
                };
                if kept.is_none_or(|k| k.index < committed.index) {
                    tracing::warn!(group = self.group, %committed, ?kept, "the saved committed index is past the log's end; ignoring it");
                    return Ok(None);
                }
                Ok(Some(committed))
            }
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut records = Vec::new();
        let mut appended: Vec<LogId> = Vec::new();
        {
            let mut mem = self.lock();
            for entry in entries {
                records.push((entry.log_id.index, encode_entry(&entry)));
                appended.push(entry.log_id);
                mem.last_log = Some(entry.log_id);
                mem.unflushed.insert(entry.log_id.index, entry);
            }
        }
        if records.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let mem = self.mem.clone();
        self.wal
            .append(self.group, records, move |result| {
                {
                    let mut mem = mem.lock().unwrap_or_else(|p| p.into_inner());
                    for id in &appended {
                        // Only drop the overlay entry if it was not replaced meanwhile.
                        if mem
                            .unflushed
                            .get(&id.index)
                            .is_some_and(|e| e.log_id == *id)
                        {
                            mem.unflushed.remove(&id.index);
                        }
                    }
                }
                callback.io_completed(result.map_err(io));
            })
            .await
            .map_err(io)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        {
            let mut mem = self.lock();
            mem.unflushed.retain(|&i, _| i < from);
            // Truncating past the end removes nothing; otherwise the given id is the new last.
            if mem.last_log.is_some_and(|l| l.index >= from) {
                mem.last_log = last_log_id.or(mem.last_purged);
            }
        }
        // Waits for durability: truncation is rare, and the entries it drops must not come back
        // after a crash once a later entry was applied (openraft then refuses to start).
        self.wal.truncate(self.group, from).await.map_err(io)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        {
            let mut mem = self.lock();
            debug_assert!(
                mem.last_purged.is_none_or(|p| p.index <= log_id.index),
                "purge moves forward"
            );
            mem.last_purged = Some(log_id);
            if mem.last_log.is_none_or(|l| l.index < log_id.index) {
                mem.last_log = Some(log_id);
            }
            mem.unflushed.retain(|&i, _| i > log_id.index);
        }
        // The watermark first, with a durable commit: it also makes durable every apply queued
        // before it (module docs), so the log may then forget the entries. A crash in between
        // leaves extra records that are purged again at open, never a hole.
        self.engine
            .meta_put(
                vec![(meta_key(self.group, "purged"), Some(encode(&log_id)))],
                true,
            )
            .await
            .map_err(io)?;
        self.wal.purge(self.group, log_id.index);
        Ok(())
    }
}

/// Moves a log an earlier version kept in redb (table `raftlog/{group}`) into the write-ahead
/// log: the entries from `next` on, in one durable append, then the table is dropped. A crash
/// in between repeats it at the next start (an append at an index replaces what follows, so
/// the copy is idempotent).
async fn import_redb_log(
    engine: &DiskEngine,
    wal: &Wal,
    group: GroupId,
    next: u64,
) -> io::Result<()> {
    let table = log_table(group);
    if engine.log_last(&table).map_err(io)?.is_none() {
        return Ok(());
    }
    let records = engine.log_read(&table, next, u64::MAX).map_err(io)?;
    tracing::info!(
        group,
        entries = records.len(),
        "moving the Raft log from redb into the write-ahead log"
    );
    if records.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the redb log of group {group} has a hole"),
        ));
    }
    if !records.is_empty() {
        wal.append_durable(group, records).await.map_err(io)?;
    }
    engine
        .drop_group(Vec::new(), vec![table], Vec::new(), Vec::new())
        .await
        .map_err(io)
}
