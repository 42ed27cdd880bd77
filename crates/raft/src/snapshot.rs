//! Raft snapshots that are never held whole in memory.
//!
//! openraft snapshots a group every few thousand entries (`groups::default_raft_config`), and a
//! data shard can hold millions of keys. Building each snapshot as one encoded buffer cost a
//! full copy of the shard in memory and a third of a busy node's CPU, and a shard over the
//! transport's frame bound could never be sent at all. So:
//!
//! - **Built lazily.** A snapshot is a [`LocalSnapshot`]: a storage read transaction (the
//!   applied state, the session rows and the tables, consistent with each other) and nothing
//!   else. Building one costs a read of three `_meta` entries; the rows are read only if the
//!   snapshot is sent, page by page ([`Parts`]).
//! - **Sent in parts.** The leader sends [`SnapshotPart`]s of about [`SNAPSHOT_PART_BYTES`]
//!   each ([`crate::messages::SnapshotRequest::Part`]), waiting for each acknowledgement, then
//!   asks the follower to install ([`crate::messages::SnapshotRequest::Install`]).
//! - **Received to a spool.** The follower appends each part (checked to decode) to a file in
//!   `<data dir>/snapshots-in` with a CRC ([`Inbox`]); the install reads the file batch by
//!   batch inside the one storage transaction that replaces the shard. A part out of order, a
//!   transfer superseded by a newer one from the same leader, or one idle longer than
//!   [`RECEIVING_IDLE_MAX`] is dropped with its file; the leader's openraft then sends the
//!   snapshot again from the start.
//!
//! What a follower holds at a time: one part in memory, and at most one spool per (leader,
//! group) on disk, removed once installed or dropped (and all of them at start).
//!
//! The snapshot openraft asks for when it must send one ([`crate::state_machine`]'s
//! `get_current_snapshot`) is read *then*, at the state machine's current applied entry, not at
//! the entry of the last build: it is newer, consistent, and of a committed entry, which is all
//! a follower needs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capdb_cluster::{ClusterState, ClusterStateV1, GroupId, NodeId};
use capdb_storage::disk::{SnapshotTable, TableSnapshot};
use serde::{Deserialize, Serialize};

/// About how many bytes of rows one part carries (a row larger than this travels alone).
pub const SNAPSHOT_PART_BYTES: usize = 2 << 20;
/// A receiving transfer with no part for this long is dropped with its spool.
pub const RECEIVING_IDLE_MAX: Duration = Duration::from_secs(120);
/// Largest part a spool holds (the transport's frame bound: no bigger part can arrive).
const SPOOLED_PART_BYTES_MAX: usize = capdb_transport::FRAME_BYTES_MAX;

/// One part of a snapshot, in the order sent: one `Head`, then the data table's rows, then the
/// element table's, each in key order.
#[derive(Debug, Serialize, Deserialize)]
pub enum SnapshotPart {
    /// The group's session rows (`_meta` keys without the group's session prefix) and, for the
    /// meta group, the cluster map.
    Head {
        sessions: Vec<(String, Vec<u8>)>,
        state: Option<ClusterState>,
    },
    /// A page of one of the shard's tables.
    Rows(SnapshotTable, Vec<(Vec<u8>, Vec<u8>)>),
}

/// [`SnapshotPart`] as versions before cache shards wrote it (their map is a
/// [`ClusterStateV1`]): decoded only.
#[derive(Deserialize)]
enum SnapshotPartV1 {
    Head {
        sessions: Vec<(String, Vec<u8>)>,
        state: Option<ClusterStateV1>,
    },
    Rows(SnapshotTable, Vec<(Vec<u8>, Vec<u8>)>),
}

impl SnapshotPart {
    /// Reads a part: the current layout, else the one before cache shards (a head from a
    /// leader of that version, or spooled by one; every byte read), converted.
    pub fn decode(raw: &[u8]) -> Result<SnapshotPart, postcard::Error> {
        match postcard::from_bytes::<SnapshotPart>(raw) {
            Ok(part) => Ok(part),
            Err(current) => match postcard::take_from_bytes::<SnapshotPartV1>(raw) {
                Ok((SnapshotPartV1::Head { sessions, state }, [])) => Ok(SnapshotPart::Head {
                    sessions,
                    state: state.map(ClusterState::from),
                }),
                Ok((SnapshotPartV1::Rows(table, rows), [])) => Ok(SnapshotPart::Rows(table, rows)),
                _ => Err(current),
            },
        }
    }
}

/// A group's snapshot as openraft passes it around: this node's state, to be read when sent, or
/// one received from a leader, to be read when installed.
pub enum SnapshotData {
    Local(Arc<LocalSnapshot>),
    Spooled(Spool),
}

impl SnapshotData {
    /// The snapshot's parts, in order, read as they are taken (blocking reads).
    pub fn into_parts(
        self,
    ) -> io::Result<Box<dyn Iterator<Item = io::Result<SnapshotPart>> + Send>> {
        Ok(match self {
            SnapshotData::Local(local) => Box::new(Parts::new(local)),
            SnapshotData::Spooled(spool) => Box::new(spool.read()?),
        })
    }
}

/// This node's state machine as of one storage read transaction.
pub struct LocalSnapshot {
    pub(crate) rows: TableSnapshot,
    pub(crate) sessions: Vec<(String, Vec<u8>)>,
    pub(crate) state: Option<ClusterState>,
}

/// Reads a [`LocalSnapshot`]'s parts page by page.
pub struct Parts {
    snapshot: Arc<LocalSnapshot>,
    next: Next,
}

enum Next {
    Head,
    Rows(SnapshotTable, Option<Vec<u8>>),
    Done,
}

impl Parts {
    pub fn new(snapshot: Arc<LocalSnapshot>) -> Parts {
        Parts {
            snapshot,
            next: Next::Head,
        }
    }
}

impl Iterator for Parts {
    type Item = io::Result<SnapshotPart>;

    fn next(&mut self) -> Option<io::Result<SnapshotPart>> {
        loop {
            match std::mem::replace(&mut self.next, Next::Done) {
                Next::Done => return None,
                Next::Head => {
                    self.next = Next::Rows(SnapshotTable::Data, None);
                    return Some(Ok(SnapshotPart::Head {
                        sessions: self.snapshot.sessions.clone(),
                        state: self.snapshot.state.clone(),
                    }));
                }
                Next::Rows(which, after) => {
                    let (rows, more) =
                        match self
                            .snapshot
                            .rows
                            .page(which, after.as_deref(), SNAPSHOT_PART_BYTES)
                        {
                            Ok(page) => page,
                            Err(e) => return Some(Err(crate::io(e))),
                        };
                    self.next = match (more, which) {
                        (Some(after), _) => Next::Rows(which, Some(after)),
                        (None, SnapshotTable::Data) => Next::Rows(SnapshotTable::Elements, None),
                        (None, SnapshotTable::Elements) => Next::Done,
                    };
                    if !rows.is_empty() {
                        return Some(Ok(SnapshotPart::Rows(which, rows)));
                    }
                }
            }
        }
    }
}

/// A snapshot received from a leader: its parts in a file, each `[u32 length][u32 CRC-32]`
/// and the part (postcard), little-endian. The file goes when this is dropped.
pub struct Spool {
    path: PathBuf,
    /// Bytes of the file.
    pub bytes: u64,
    /// Parts in the file.
    pub parts: u64,
}

impl Spool {
    fn read(self) -> io::Result<SpoolReader> {
        let file = BufReader::with_capacity(1 << 20, File::open(&self.path)?);
        Ok(SpoolReader { file, _spool: self })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a [`Spool`]'s parts in order; holds the spool so its file stays until read.
struct SpoolReader {
    file: BufReader<File>,
    _spool: Spool,
}

impl Iterator for SpoolReader {
    type Item = io::Result<SnapshotPart>;

    fn next(&mut self) -> Option<io::Result<SnapshotPart>> {
        let mut header = [0u8; 8];
        match self.file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(e)),
        }
        let corrupt = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > SPOOLED_PART_BYTES_MAX {
            return Some(Err(corrupt(format!(
                "spooled snapshot part of {len} bytes"
            ))));
        }
        let mut raw = vec![0u8; len];
        if let Err(e) = self.file.read_exact(&mut raw) {
            return Some(Err(e));
        }
        if crc32fast::hash(&raw) != crc {
            return Some(Err(corrupt("spooled snapshot part fails its CRC".into())));
        }
        Some(SnapshotPart::decode(&raw).map_err(|e| corrupt(format!("spooled snapshot part: {e}"))))
    }
}

/// Why a part or an install was refused: the sender starts the snapshot again.
#[derive(Debug, thiserror::Error)]
pub enum InboxRefusal {
    #[error("snapshot part {got} of transfer {transfer} out of order (expected {expected})")]
    OutOfOrder {
        transfer: u64,
        got: u64,
        expected: u64,
    },
    #[error("snapshot part does not decode: {0}")]
    Undecodable(String),
    #[error("cannot spool a snapshot part: {0}")]
    Io(#[from] io::Error),
}

/// The snapshots this node is receiving, one spool per (leader, group).
pub struct Inbox {
    dir: PathBuf,
    receiving: Mutex<HashMap<(NodeId, GroupId), Receiving>>,
}

struct Receiving {
    transfer: u64,
    next: u64,
    file: BufWriter<File>,
    spool: Spool,
    last_part: Instant,
}

impl Inbox {
    /// An inbox spooling in `dir`, emptied first (spools of a previous run are worthless: their
    /// senders start again).
    pub fn open(dir: &Path) -> io::Result<Inbox> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        Ok(Inbox {
            dir: dir.to_path_buf(),
            receiving: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, GroupId), Receiving>> {
        self.receiving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transfers with no part for [`RECEIVING_IDLE_MAX`], taken out of the inbox.
    fn take_idle(&self, now: Instant) -> Vec<Receiving> {
        let mut receiving = self.lock();
        let idle: Vec<_> = receiving
            .iter()
            .filter(|(_, r)| now.duration_since(r.last_part) >= RECEIVING_IDLE_MAX)
            .map(|(k, _)| *k)
            .collect();
        idle.into_iter()
            .filter_map(|k| receiving.remove(&k))
            .collect()
    }

    /// Drops the transfers with no part for [`RECEIVING_IDLE_MAX`] and their spools (blocking:
    /// it removes files); answers how many.
    pub fn sweep_idle(&self) -> usize {
        self.take_idle(Instant::now()).len()
    }

    /// Spools part `seq` of transfer `transfer` of `group` from `from`. Part 0 (the head)
    /// starts the transfer (dropping an older one of the same leader and group); any other
    /// (rows) must follow the last one spooled. Blocking file I/O (callers run it off the
    /// runtime); the inbox's lock is never held across it.
    pub fn part(
        &self,
        from: NodeId,
        group: GroupId,
        transfer: u64,
        seq: u64,
        part: &[u8],
    ) -> Result<(), InboxRefusal> {
        let decoded =
            SnapshotPart::decode(part).map_err(|e| InboxRefusal::Undecodable(e.to_string()))?;
        // What the install reads must be a head and then rows: checked here, so a spool that
        // passed is only unreadable if the disk fails.
        if matches!(decoded, SnapshotPart::Head { .. }) != (seq == 0) {
            return Err(InboxRefusal::Undecodable(format!(
                "part {seq} is not what a snapshot holds there (the head first, then rows)"
            )));
        }
        let now = Instant::now();
        // Taken out of the map while its file is written (dropped ones, and their files, go
        // outside the lock too).
        let (mut r, dropped) = {
            let mut dropped = self.take_idle(now);
            let mut receiving = self.lock();
            let mine = receiving.remove(&(from, group));
            match mine {
                Some(r) if seq > 0 && r.transfer == transfer && r.next == seq => (Some(r), dropped),
                Some(r) if seq > 0 => {
                    let expected = r.next;
                    if r.transfer != transfer {
                        // Another transfer's: left as it is.
                        receiving.insert((from, group), r);
                    }
                    return Err(InboxRefusal::OutOfOrder {
                        transfer,
                        got: seq,
                        expected,
                    });
                }
                None if seq > 0 => {
                    return Err(InboxRefusal::OutOfOrder {
                        transfer,
                        got: seq,
                        expected: 0,
                    });
                }
                old => {
                    dropped.extend(old);
                    (None, dropped)
                }
            }
        };
        drop(dropped);
        let mut r = match r.take() {
            Some(r) => r,
            None => {
                let path = self
                    .dir
                    .join(format!("group-{group}-from-{from}-{transfer}.parts"));
                Receiving {
                    transfer,
                    next: 0,
                    file: BufWriter::with_capacity(1 << 20, File::create(&path)?),
                    spool: Spool {
                        path,
                        bytes: 0,
                        parts: 0,
                    },
                    last_part: now,
                }
            }
        };
        (|| {
            r.file.write_all(&(part.len() as u32).to_le_bytes())?;
            r.file.write_all(&crc32fast::hash(part).to_le_bytes())?;
            r.file.write_all(part)
        })()?;
        r.next += 1;
        r.spool.parts += 1;
        r.spool.bytes += 8 + part.len() as u64;
        r.last_part = now;
        // A newer transfer started meanwhile wins; this one (and its file) goes.
        self.lock().entry((from, group)).or_insert(r);
        Ok(())
    }

    /// The spool of transfer `transfer` of `group` from `from`, complete with `parts` parts,
    /// taken out of the inbox to be installed. Blocking (a flush).
    pub fn finish(
        &self,
        from: NodeId,
        group: GroupId,
        transfer: u64,
        parts: u64,
    ) -> Result<Spool, InboxRefusal> {
        let mine = {
            let mut receiving = self.lock();
            match receiving.remove(&(from, group)) {
                Some(r) if r.transfer == transfer && r.next == parts && parts > 0 => Ok(r),
                Some(r) => {
                    let expected = r.next;
                    if r.transfer != transfer {
                        receiving.insert((from, group), r);
                    }
                    Err(expected)
                }
                None => Err(0),
            }
        };
        match mine {
            Ok(mut r) => {
                r.file.flush()?;
                Ok(r.spool)
            }
            Err(expected) => Err(InboxRefusal::OutOfOrder {
                transfer,
                got: parts,
                expected,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Part `n` of a snapshot: the head first, then rows.
    fn rows(n: u8) -> SnapshotPart {
        if n == 0 {
            return SnapshotPart::Head {
                sessions: Vec::new(),
                state: None,
            };
        }
        SnapshotPart::Rows(SnapshotTable::Data, vec![(vec![n], vec![n; 3])])
    }

    fn encoded(p: &SnapshotPart) -> Vec<u8> {
        postcard::to_stdvec(p).unwrap()
    }

    #[test]
    fn a_spool_gives_back_its_parts_in_order_and_goes_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(&dir.path().join("in")).unwrap();
        for seq in 0..3u8 {
            inbox
                .part(1, 7, 99, seq as u64, &encoded(&rows(seq)))
                .unwrap();
        }
        let spool = inbox.finish(1, 7, 99, 3).unwrap();
        let path = spool.path.clone();
        assert_eq!(spool.parts, 3);
        let got: Vec<u8> = SnapshotData::Spooled(spool)
            .into_parts()
            .unwrap()
            .map(|p| match p.unwrap() {
                SnapshotPart::Rows(_, r) => r[0].0[0],
                SnapshotPart::Head { .. } => 0,
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(!path.exists(), "a read spool is removed");
    }

    #[test]
    fn parts_out_of_order_or_of_a_superseded_transfer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        assert!(matches!(
            inbox.part(1, 7, 5, 1, &encoded(&rows(1))),
            Err(InboxRefusal::OutOfOrder { expected: 0, .. })
        ));
        inbox.part(1, 7, 5, 0, &encoded(&rows(0))).unwrap();
        assert!(inbox.part(1, 7, 5, 2, &encoded(&rows(2))).is_err());
        // A new transfer from the same leader replaces the old one.
        inbox.part(1, 7, 6, 0, &encoded(&rows(0))).unwrap();
        assert!(inbox.part(1, 7, 5, 1, &encoded(&rows(1))).is_err());
        assert!(inbox.finish(1, 7, 5, 1).is_err());
        assert!(matches!(
            inbox.part(1, 7, 6, 1, b"\xff\xff\xff"),
            Err(InboxRefusal::Undecodable(_))
        ));
        // A head after the first part, or rows first, is not a snapshot.
        assert!(matches!(
            inbox.part(1, 7, 6, 1, &encoded(&rows(0))),
            Err(InboxRefusal::Undecodable(_))
        ));
        assert!(matches!(
            inbox.part(1, 7, 8, 0, &encoded(&rows(1))),
            Err(InboxRefusal::Undecodable(_))
        ));
        let spool = inbox.finish(1, 7, 6, 1).unwrap();
        assert_eq!(spool.parts, 1);
        // Another leader's transfer of the same group is its own.
        inbox.part(2, 7, 5, 0, &encoded(&rows(0))).unwrap();
        assert!(inbox.finish(2, 7, 5, 1).is_ok());
    }

    #[test]
    fn an_abandoned_transfer_goes_with_its_spool() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        inbox.part(1, 7, 5, 0, &encoded(&rows(0))).unwrap();
        assert_eq!(inbox.take_idle(Instant::now()).len(), 0, "not idle yet");
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files(), 1);
        let later = Instant::now() + RECEIVING_IDLE_MAX;
        assert_eq!(inbox.take_idle(later).len(), 1);
        assert_eq!(files(), 0, "its spool is removed");
        assert!(
            inbox.finish(1, 7, 5, 1).is_err(),
            "and it cannot be installed"
        );
    }

    #[test]
    fn a_corrupted_spool_is_an_error_not_a_part() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        inbox.part(1, 7, 5, 0, &encoded(&rows(0))).unwrap();
        let spool = inbox.finish(1, 7, 5, 1).unwrap();
        let mut raw = std::fs::read(&spool.path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        std::fs::write(&spool.path, raw).unwrap();
        let mut parts = SnapshotData::Spooled(spool).into_parts().unwrap();
        assert!(parts.next().unwrap().is_err());
    }

    #[test]
    fn a_head_from_a_leader_before_cache_shards_is_read() {
        // What that version sent: `Head` (variant 0), no sessions, then `Some` and its map
        // (the fixture was written by it).
        let v1 = include_bytes!("../../cluster/tests/fixtures/cluster_state_v1.postcard");
        let mut head = vec![0u8, 0, 1];
        head.extend_from_slice(v1);
        let Ok(SnapshotPart::Head { sessions, state }) = SnapshotPart::decode(&head) else {
            panic!("the old head is not read");
        };
        assert!(sessions.is_empty());
        let state = state.expect("the map");
        assert_eq!(state, ClusterState::decode(v1).unwrap());
        assert_eq!(state.keyspaces.len(), 2);
        assert!(
            state.cache.is_empty(),
            "cache keyspaces wait for their adoption"
        );
        // The spool takes it as part 0, and gives it back converted.
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(&dir.path().join("in")).unwrap();
        inbox.part(1, 0, 5, 0, &head).unwrap();
        let spool = inbox.finish(1, 0, 5, 1).unwrap();
        let parts: Vec<SnapshotPart> = SnapshotData::Spooled(spool)
            .into_parts()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(matches!(&parts[..], [SnapshotPart::Head { state: Some(s), .. }] if *s == state));
        // Neither layout: refused.
        assert!(SnapshotPart::decode(&head[..head.len() - 1]).is_err());
    }
}
