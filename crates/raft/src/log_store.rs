//! The Raft log of one group, on the node's storage engine.
//!
//! Records live in the table `raftlog/{group}` (index -> postcard-encoded entry); the vote, the
//! committed id and the last purged id live in `_meta` under `raft/{group}/...`.
//!
//! ### To ensure correctness (openraft's contract, and how it is met)
//!
//! - **Durable before acknowledged**: `append` queues the records on the engine's writer and
//!   calls openraft's `IOFlushed` callback only after the batch holding them has been fsync'd.
//!   `save_vote` waits for its fsync before returning (a forgotten vote can elect two leaders).
//! - **Ordered**: every write goes through the engine's single FIFO writer, so a later write
//!   (vote, append, truncate, purge) never lands before an earlier one.
//! - **Readable at once**: appended entries are visible to every reader before they are durable,
//!   through the in-memory `unflushed` overlay, which drops an entry once it is on disk.
//! - **No holes**: truncation removes from the end; purge records its watermark first.

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
    group: GroupId,
    table: String,
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
fn encode_entry(entry: &Entry) -> Vec<u8> {
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
    /// Opens the log of `group`, reading its durable state.
    pub fn open(engine: DiskEngine, group: GroupId) -> io::Result<LogStore> {
        let table = log_table(group);
        let last_purged: Option<LogId> =
            match engine.meta_get(&meta_key(group, "purged")).map_err(io)? {
                Some(raw) => Some(decode(&raw, "purged log id")?),
                None => None,
            };
        let last_log = match engine.log_last(&table).map_err(io)? {
            Some((_, raw)) => Some(decode_entry(&raw)?.log_id),
            None => last_purged,
        };
        Ok(LogStore {
            engine,
            group,
            table,
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
        for (index, raw) in self.engine.log_read(&self.table, start, end).map_err(io)? {
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
        // Durable before returning: a node must never forget whom it voted for.
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
        // (Written as a hint riding the next batch instead, it took the pause before each apply
        // away: applies came in smaller batches, cross-shard EXEC at 16 clients went 3.0x ->
        // 6.3x SET's p50; see docs/design/transactions.md.)
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
        self.engine
            .log_append(&self.table, records, move |result| {
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
        // Waits for durability: truncation is rare, and later appends must not race it.
        self.engine
            .log_remove(&self.table, from, None)
            .await
            .map_err(io)
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
        // The watermark first, then the records: a crash in between leaves extra records that
        // readers never ask for, never a hole.
        self.engine
            .meta_put(
                vec![(meta_key(self.group, "purged"), Some(encode(&log_id)))],
                true,
            )
            .await
            .map_err(io)?;
        self.engine
            .log_remove(&self.table, 0, Some(log_id.index))
            .await
            .map_err(io)
    }
}
