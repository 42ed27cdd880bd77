//! A cache shard copy's replication stream: its entries and its backlog (issue 16,
//! `docs/design/cache-cluster.md` §3.1). Built so far: the entry and the backlog with its epoch
//! history, which answers a replica's resync request; `MemStore` appends an entry per run of
//! commands applied, with what each drew (timestamp, seed), while it keeps a stream
//! (`MemStore::keep_stream`), an entry per key it removes by itself (expiry, lazy or active, and
//! eviction) and one per FLUSHDB, and a replica replays them (`MemStore::apply_replicated`),
//! removing nothing by itself (`MemStore::set_replica`).
//!
//! # Offsets and epochs
//!
//! A shard's stream numbers its entries 1, 2, 3... across epochs: a promoted replica goes on from
//! its own last offset (the map's `CacheShard::start_offset`), so entries of epoch `e` have
//! offsets after the offset `e` started at. Every copy keeps the start of each epoch it saw
//! ([`EPOCHS_KEPT_MAX`] of them), as Kafka's leader-epoch cache does, so that a replica which
//! followed an old primary can ask "where did epoch `e` end in your history?":
//!
//! - it holds nothing past that end: it continues from its next offset, if the backlog still
//!   holds it ([`SyncFrom::Continue`]);
//! - it holds entries past that end: they were applied by a primary that lost the epoch, and no
//!   copy of the new history has them; they are the writes the failover lost, counted
//!   ([`SyncFrom::Diverged`]), and the replica takes a full copy;
//! - otherwise (too far behind, an epoch older than the history kept): a full copy
//!   ([`SyncFrom::Full`]).
//!
//! # Bounds
//!
//! The backlog keeps the newest entries within [`Backlog::new`]'s bytes and entries (default
//! [`BACKLOG_BYTES_DEFAULT`], [`BACKLOG_ENTRIES_DEFAULT`]), dropping the oldest: writes never
//! wait on replicas (Redis's `repl-backlog-size`); a replica behind the oldest kept entry takes
//! a full copy. The epoch history keeps [`EPOCHS_KEPT_MAX`] epochs.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use capdb_types::{Mutation, Timestamp};
use serde::{Deserialize, Serialize};

/// Default bytes of entries a backlog keeps (16 MiB).
pub const BACKLOG_BYTES_DEFAULT: usize = 16 << 20;
/// Default number of entries a backlog keeps.
pub const BACKLOG_ENTRIES_DEFAULT: usize = 1 << 20;
/// Epochs whose start a copy remembers.
pub const EPOCHS_KEPT_MAX: usize = 64;
/// Accounted bytes per entry on top of its keys and values.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// One entry of a shard's stream: a run of commands applied under one locking on the primary,
/// or removals of its own, with what replaying them needs to decide as the primary did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub offset: u64,
    pub epoch: u64,
    /// The primary's clock when it applied the entry (expiry decisions).
    pub now_ms: u64,
    pub op: CacheOp,
}

/// What an entry changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheOp {
    /// Commands' mutations, `sizes[i]` of them for the i-th command, applied in order, each
    /// with what it drew: its timestamp and its seed (SPOP, SRANDMEMBER, ...).
    Commands {
        mutations: Vec<Mutation>,
        sizes: Vec<u32>,
        stamps: Vec<(Timestamp, u64)>,
    },
    /// Keys the primary removed by itself: expired (lazily or actively) or evicted.
    Remove(Vec<Bytes>),
    /// FLUSHDB.
    Flush,
}

impl CacheEntry {
    /// Bytes the backlog accounts for the entry: its keys, values and arguments, plus
    /// [`ENTRY_OVERHEAD_BYTES`] (an estimate, for the bound; never 0).
    pub fn accounted_bytes(&self) -> usize {
        let payload = match &self.op {
            CacheOp::Commands { mutations, .. } => {
                mutations.iter().map(mutation_bytes).sum::<usize>() + 24 * mutations.len()
            }
            CacheOp::Remove(keys) => keys.iter().map(Bytes::len).sum(),
            CacheOp::Flush => 0,
        };
        ENTRY_OVERHEAD_BYTES + payload
    }
}

fn mutation_bytes(m: &Mutation) -> usize {
    let condition = |c: &capdb_types::mutation::Condition| match c {
        capdb_types::mutation::Condition::IfEqual(b)
        | capdb_types::mutation::Condition::IfNotEqual(b) => b.len(),
        _ => 0,
    };
    let data = match m {
        Mutation::Set {
            value,
            condition: c,
            ..
        } => value.len() + condition(c),
        Mutation::Append { data, .. } => data.len(),
        Mutation::Exec { args, .. } => args.iter().map(Bytes::len).sum(),
        _ => 0,
    };
    m.key().len() + data + 16
}

/// What a backlog holds of an entry.
pub trait Offsetted {
    fn offset(&self) -> u64;
    fn epoch(&self) -> u64;
    /// Bytes counted against the backlog's bound.
    fn accounted_bytes(&self) -> usize;
}

impl Offsetted for Arc<CacheEntry> {
    fn offset(&self) -> u64 {
        self.offset
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn accounted_bytes(&self) -> usize {
        CacheEntry::accounted_bytes(self)
    }
}

/// Where a replica that asked to resync goes on from ([`Backlog::sync_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFrom {
    /// It holds a prefix of this history: entries from `next` on follow (none yet when `next`
    /// is past the last offset).
    Continue { next: u64 },
    /// It holds `lost` entries past where its epoch ended in this history: writes a failover
    /// lost. It takes a full copy.
    Diverged { lost: u64 },
    /// It takes a full copy: too far behind the backlog, or an epoch this history does not
    /// know.
    Full,
    /// It has seen a later epoch than this copy: this copy is the stale one.
    Stale,
}

/// Why an entry cannot be appended: the stream's order would break (a bug or a stale sender,
/// never a client's doing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendRefusal {
    /// Not the next offset.
    Gap { expected: u64, got: u64 },
    /// An epoch before the last one.
    OldEpoch { last: u64, got: u64 },
    /// The copy keeps no stream.
    NoStream,
    /// The copy is no replica ([`crate::memory::MemStore::set_replica`]): it makes its own
    /// entries.
    NotReplica,
    /// The entry does not hold one stamp per mutation.
    Malformed,
}

/// A shard copy's newest stream entries and the starts of the epochs it saw.
#[derive(Debug)]
pub struct Backlog<E> {
    entries: VecDeque<E>,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
    /// `(epoch, offset it started at)`, ascending; entries of an epoch come after its start.
    epochs: VecDeque<(u64, u64)>,
    last_offset: u64,
}

impl<E: Offsetted> Backlog<E> {
    /// An empty backlog of a copy whose stream stands at `offset` in `epoch` (0 and 1 for a new
    /// shard; a full copy's offset and epoch after a resync).
    pub fn new(epoch: u64, offset: u64, max_bytes: usize, max_entries: usize) -> Backlog<E> {
        Backlog {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_entries: max_entries.max(1),
            epochs: VecDeque::from([(epoch, offset)]),
            last_offset: offset,
        }
    }

    pub fn last_offset(&self) -> u64 {
        self.last_offset
    }

    pub fn epoch(&self) -> u64 {
        self.epochs.back().map_or(0, |e| e.0)
    }

    /// The oldest offset the backlog still holds (none when empty).
    pub fn first_held(&self) -> Option<u64> {
        self.entries.front().map(Offsetted::offset)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Starts `epoch` at the current offset (a promotion, or a replica learning of one before
    /// its first entry). An epoch not after the last is ignored.
    pub fn begin_epoch(&mut self, epoch: u64) {
        if epoch > self.epoch() {
            self.epochs.push_back((epoch, self.last_offset));
            while self.epochs.len() > EPOCHS_KEPT_MAX {
                self.epochs.pop_front();
            }
        }
    }

    /// Appends the next entry, dropping the oldest past the bounds. An entry of a later epoch
    /// starts that epoch.
    pub fn push(&mut self, entry: E) -> Result<(), AppendRefusal> {
        if entry.offset() != self.last_offset + 1 {
            return Err(AppendRefusal::Gap {
                expected: self.last_offset + 1,
                got: entry.offset(),
            });
        }
        if entry.epoch() < self.epoch() {
            return Err(AppendRefusal::OldEpoch {
                last: self.epoch(),
                got: entry.epoch(),
            });
        }
        self.begin_epoch(entry.epoch());
        self.last_offset = entry.offset();
        self.bytes += entry.accounted_bytes();
        self.entries.push_back(entry);
        while self.entries.len() > self.max_entries
            || (self.bytes > self.max_bytes && self.entries.len() > 1)
        {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.accounted_bytes();
        }
        Ok(())
    }

    /// Where epoch `epoch` ended in this history: the start of the next epoch this copy saw,
    /// or the last offset if it is the current one. `None`: an epoch this copy does not know
    /// (older than its history, or one it never saw between two it did: it cannot tell where
    /// that one ended, so the replica takes a full copy).
    pub fn epoch_end(&self, epoch: u64) -> Option<u64> {
        let i = self.epochs.iter().position(|&(e, _)| e == epoch)?;
        Some(
            self.epochs
                .get(i + 1)
                .map_or(self.last_offset, |&(_, start)| start),
        )
    }

    /// Where a replica whose stream stands at `offset` in `epoch` goes on from.
    pub fn sync_from(&self, epoch: u64, offset: u64) -> SyncFrom {
        if epoch > self.epoch() {
            return SyncFrom::Stale;
        }
        let Some(end) = self.epoch_end(epoch) else {
            return SyncFrom::Full;
        };
        if offset > end {
            return SyncFrom::Diverged { lost: offset - end };
        }
        if offset == self.last_offset {
            return SyncFrom::Continue { next: offset + 1 };
        }
        match self.first_held() {
            Some(first) if first <= offset + 1 => SyncFrom::Continue { next: offset + 1 },
            _ => SyncFrom::Full,
        }
    }

    /// The held entries from offset `from` on, at most `max` of them (empty: none held yet, or
    /// `from` is no longer held).
    pub fn read_from(&self, from: u64, max: usize) -> impl Iterator<Item = &E> + '_ {
        let skip = self
            .first_held()
            .filter(|&first| from >= first)
            .map_or(self.entries.len(), |first| (from - first) as usize);
        self.entries.iter().skip(skip).take(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A test entry: offset, epoch, bytes.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct E(u64, u64, usize);

    impl Offsetted for E {
        fn offset(&self) -> u64 {
            self.0
        }
        fn epoch(&self) -> u64 {
            self.1
        }
        fn accounted_bytes(&self) -> usize {
            self.2
        }
    }

    #[test]
    fn entries_follow_one_another_and_the_oldest_go_past_the_bounds() {
        let mut b: Backlog<E> = Backlog::new(1, 0, 100, 3);
        assert_eq!(
            b.push(E(2, 1, 10)),
            Err(AppendRefusal::Gap {
                expected: 1,
                got: 2
            })
        );
        for o in 1..=4 {
            b.push(E(o, 1, 10)).unwrap();
        }
        assert_eq!((b.len(), b.first_held(), b.bytes()), (3, Some(2), 30));
        b.push(E(5, 1, 90)).unwrap();
        assert_eq!((b.len(), b.first_held(), b.bytes()), (2, Some(4), 100));
        // One entry larger than the bound is still held: the newest always is.
        b.push(E(6, 1, 500)).unwrap();
        assert_eq!((b.len(), b.first_held()), (1, Some(6)));
        b.begin_epoch(3);
        assert_eq!(
            b.push(E(7, 2, 1)),
            Err(AppendRefusal::OldEpoch { last: 3, got: 2 })
        );
    }

    #[test]
    fn a_replica_continues_diverges_or_copies_as_its_epoch_ended_here() {
        // Epoch 1: offsets 1-10; epoch 2 started at 8 (the promoted replica had 8), 9-12.
        let mut b: Backlog<E> = Backlog::new(1, 0, usize::MAX, 1000);
        for o in 1..=8 {
            b.push(E(o, 1, 1)).unwrap();
        }
        b.begin_epoch(2);
        for o in 9..=12 {
            b.push(E(o, 2, 1)).unwrap();
        }
        assert_eq!(b.epoch_end(1), Some(8));
        assert_eq!(b.epoch_end(2), Some(12));
        // A replica of epoch 1 at 6 or 8 is a prefix; at 10 it holds two lost entries.
        assert_eq!(b.sync_from(1, 6), SyncFrom::Continue { next: 7 });
        assert_eq!(b.sync_from(1, 8), SyncFrom::Continue { next: 9 });
        assert_eq!(b.sync_from(1, 10), SyncFrom::Diverged { lost: 2 });
        assert_eq!(b.sync_from(2, 12), SyncFrom::Continue { next: 13 });
        assert_eq!(b.sync_from(2, 13), SyncFrom::Diverged { lost: 1 });
        assert_eq!(b.sync_from(3, 12), SyncFrom::Stale);
        assert_eq!(b.sync_from(0, 0), SyncFrom::Full, "an epoch never seen");
        let next: Vec<u64> = b.read_from(7, 3).map(|e| e.0).collect();
        assert_eq!(next, vec![7, 8, 9]);
        assert_eq!(b.read_from(13, 3).count(), 0);
    }

    /// The model: every entry ever appended and every epoch start, unbounded.
    #[derive(Default)]
    struct Model {
        entries: Vec<E>,
        epochs: Vec<(u64, u64)>,
    }

    impl Model {
        fn last(&self) -> u64 {
            self.entries.last().map_or(0, |e| e.0)
        }
        fn end(&self, epoch: u64) -> Option<u64> {
            let i = self.epochs.iter().position(|&(e, _)| e == epoch)?;
            Some(self.epochs.get(i + 1).map_or(self.last(), |&(_, s)| s))
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push(usize),
        Promote,
        Ask(u64, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1usize..40).prop_map(Step::Push),
            1 => Just(Step::Promote),
            3 => (0u64..12, 0u64..80).prop_map(|(e, o)| Step::Ask(e, o)),
        ]
    }

    proptest! {
        /// Against an unbounded model: the backlog holds a suffix of every entry within its
        /// bounds, and a resync answer is `Continue` exactly when the replica's entries are a
        /// prefix of this history and the rest is held, `Diverged` by exactly the entries past
        /// its epoch's end.
        #[test]
        fn the_backlog_answers_as_the_whole_history_would(
            steps in proptest::collection::vec(step(), 1..120),
            max_bytes in 20usize..400,
            max_entries in 1usize..30,
        ) {
            let mut b: Backlog<E> = Backlog::new(1, 0, max_bytes, max_entries);
            let mut m = Model { epochs: vec![(1, 0)], ..Model::default() };
            for s in steps {
                match s {
                    Step::Push(bytes) => {
                        let e = E(m.last() + 1, m.epochs.last().unwrap().0, bytes);
                        b.push(e).unwrap();
                        m.entries.push(e);
                    }
                    Step::Promote => {
                        let epoch = m.epochs.last().unwrap().0 + 1;
                        b.begin_epoch(epoch);
                        m.epochs.push((epoch, m.last()));
                    }
                    Step::Ask(epoch, offset) => {
                        let current = m.epochs.last().unwrap().0;
                        let kept = m.epochs.len() <= EPOCHS_KEPT_MAX
                            || m.epochs[m.epochs.len() - EPOCHS_KEPT_MAX].0 <= epoch;
                        let want = if epoch > current {
                            SyncFrom::Stale
                        } else {
                            match m.end(epoch).filter(|_| kept) {
                                None => SyncFrom::Full,
                                Some(end) if offset > end => {
                                    SyncFrom::Diverged { lost: offset - end }
                                }
                                Some(_) if offset == m.last() => {
                                    SyncFrom::Continue { next: offset + 1 }
                                }
                                Some(_) => match b.first_held() {
                                    Some(f) if f <= offset + 1 => {
                                        SyncFrom::Continue { next: offset + 1 }
                                    }
                                    _ => SyncFrom::Full,
                                },
                            }
                        };
                        prop_assert_eq!(b.sync_from(epoch, offset), want);
                        if let SyncFrom::Continue { next } = want {
                            let got: Vec<E> = b.read_from(next, usize::MAX).copied().collect();
                            let all = &m.entries[next as usize - 1..];
                            prop_assert_eq!(&got[..], all, "the rest of the history follows");
                        }
                    }
                }
                // A suffix of the history, within the bounds (the newest entry always).
                let held: Vec<E> = b.read_from(b.first_held().unwrap_or(0), usize::MAX)
                    .copied().collect();
                prop_assert!(m.entries.ends_with(&held));
                prop_assert_eq!(held.is_empty(), m.entries.is_empty());
                prop_assert!(held.len() <= max_entries);
                let bytes: usize = held.iter().map(|e| e.2).sum();
                prop_assert_eq!(bytes, b.bytes());
                prop_assert!(bytes <= max_bytes || held.len() == 1);
                // Nothing more could have been kept within the bounds.
                if let Some(older) = m.entries.len().checked_sub(held.len() + 1).map(|i| m.entries[i]) {
                    prop_assert!(held.len() + 1 > max_entries || bytes + older.2 > max_bytes);
                }
            }
        }
    }
}
