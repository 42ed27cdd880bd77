//! The writer thread: every queued job of every group in one frame, one `pwrite`, one
//! `fdatasync`; then the index is updated and the jobs are answered, in queue order.
//!
//! After any failed batch the writer answers every later job with the same error: what the
//! disk holds after a failed `fdatasync` is unknown (the kernel may have dropped the dirty
//! pages), and a later batch written after a failed one would leave a hole in a group's log (its
//! appends are queued without waiting for each other). Nothing more is acknowledged until the
//! node restarts and reads the log back. A full log is not a failure: the writer waits for
//! purges (backpressure; callers wait behind the bounded queue) and asks the group pinning the
//! oldest segment to snapshot ([`super::Wal::set_pinned_hook`]).
//!
//! A reused segment's new header is written and synced before any frame, so a power loss that
//! keeps only some of the pages of a write can never mix the new header with the old frames.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capdb_types::{Error, Result};
use tokio::sync::mpsc;

use super::format::{self, Kind, RecordRef, SEGMENT_HEADER_BYTES, SegmentHeader};
use super::recover::create_segment;
use super::{Job, Pos, Shared, Slot, WalConfig};

/// Jobs waiting for the writer. A full queue makes callers wait (backpressure), it never grows.
pub const WAL_QUEUE_JOBS_MAX: usize = 16_384;
/// Most jobs written in one batch.
pub const BATCH_JOBS_MAX: usize = 4_096;
/// Most payload bytes written in one batch (a batch may exceed it by one job).
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// How often the writer looks again for a free segment while the log is full.
const FULL_RETRY: Duration = Duration::from_millis(20);
/// How often a group pinning the oldest segment is asked again to snapshot.
const PINNED_ASK_EVERY: Duration = Duration::from_secs(10);
/// At a segment switch, the groups pinning the oldest segment are asked to snapshot only once
/// the segments in use hold `bytes_max / SNAPSHOT_ASK_SHARE` bytes (1 GiB of the default 4):
/// a burst of large entries in one group (a job's partial results) must not make every
/// other group snapshot its whole shard, while a restart still replays a bounded log.
const SNAPSHOT_ASK_SHARE: u64 = 4;

pub(super) fn start(
    dir: PathBuf,
    config: WalConfig,
    shared: Arc<Shared>,
    next_generation: u64,
    next_seq: u64,
    closed: crate::disk::Closed,
) -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel(WAL_QUEUE_JOBS_MAX);
    let writer = Writer {
        dir,
        config,
        shared,
        next_generation,
        next_seq,
        current: None,
        broken: None,
        body: Vec::new(),
        buf: Vec::new(),
        asked: HashMap::new(),
        spare: None,
    };
    std::thread::Builder::new()
        .name("capdb-wal".into())
        .spawn(move || {
            writer.run(rx);
            closed.set();
        })
        .map_err(|e| Error::Io(format!("cannot start the write-ahead log writer: {e}")))?;
    Ok(tx)
}

/// The segment being written.
#[derive(Clone, Copy)]
struct Current {
    slot: u32,
    header: SegmentHeader,
    /// Where the next frame goes.
    off: u64,
    /// The header is not on disk yet: it goes in the same write as the first frame.
    fresh: bool,
}

/// A record of the batch: where its job is and what it does to the index.
struct Placed {
    kind: Kind,
    group: u64,
    index: u64,
    /// Offset of the record in the frame body, and its payload length.
    at: usize,
    len: u32,
}

/// A live record copied forward from the oldest segment.
struct Move {
    group: u64,
    index: u64,
    from: Pos,
    payload: Vec<u8>,
}

struct Writer {
    dir: PathBuf,
    config: WalConfig,
    shared: Arc<Shared>,
    next_generation: u64,
    next_seq: u64,
    /// `None` until the first write after open: a new segment is started then, so a torn tail
    /// left by a crash is never written over (recover.rs).
    current: Option<Current>,
    /// Set after a failed write or sync (module docs).
    broken: Option<Error>,
    body: Vec<u8>,
    buf: Vec<u8>,
    /// When each group pinning the oldest segment was last asked to snapshot.
    asked: HashMap<u64, Instant>,
    /// A segment file being created ahead of need by a helper thread: its number and size, and
    /// where the file arrives. Zero-filling 64 MiB takes tens of milliseconds; done on the
    /// writer when a segment is needed, every write would wait for it.
    spare: Option<(u64, u64, std::sync::mpsc::Receiver<Result<std::fs::File>>)>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        self.prepare_spare();
        let mut batch: Vec<Job> = Vec::with_capacity(BATCH_JOBS_MAX);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.payload_bytes();
            batch.push(first);
            while batch.len() < BATCH_JOBS_MAX && bytes < BATCH_BYTES_MAX {
                match rx.try_recv() {
                    Ok(job) => {
                        bytes += job.payload_bytes();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            let result = match &self.broken {
                Some(e) => Err(e.clone()),
                None => self.write(&batch),
            };
            if let Err(e) = &result
                && self.broken.is_none()
            {
                tracing::error!(error = %e, "write-ahead log stopped: every later write fails until the node restarts");
                self.broken = Some(e.clone());
            }
            for job in batch.drain(..) {
                job.finish(result.clone());
            }
        }
        // A segment file still being created must be finished before this log counts as
        // closed (a new log on the same directory would race it).
        if let Some((_, _, spare)) = self.spare.take() {
            let _ = spare.recv();
        }
        tracing::debug!("write-ahead log writer stopped: every handle dropped");
    }

    fn write(&mut self, batch: &[Job]) -> Result<()> {
        let started = Instant::now();
        self.body.clear();
        let mut placed: Vec<Placed> = Vec::new();
        for job in batch {
            match job {
                Job::Append { group, records, .. } => {
                    for (index, payload) in records {
                        let at = format::encode_record(
                            RecordRef {
                                kind: Kind::Entry,
                                group: *group,
                                index: *index,
                                payload,
                            },
                            &mut self.body,
                        );
                        placed.push(Placed {
                            kind: Kind::Entry,
                            group: *group,
                            index: *index,
                            at: at - format::RECORD_HEADER_BYTES,
                            len: payload.len() as u32,
                        });
                    }
                }
                // Jobs before it in this batch are durable when the batch is; jobs in earlier
                // batches already are.
                Job::Barrier { .. } => {}
                Job::Truncate { group, from, .. } => {
                    let at = format::encode_record(
                        RecordRef {
                            kind: Kind::Truncate,
                            group: *group,
                            index: *from,
                            payload: &[],
                        },
                        &mut self.body,
                    );
                    placed.push(Placed {
                        kind: Kind::Truncate,
                        group: *group,
                        index: *from,
                        at: at - format::RECORD_HEADER_BYTES,
                        len: 0,
                    });
                }
            }
        }
        if placed.is_empty() {
            return Ok(());
        }
        if self.body.len() > format::FRAME_BODY_MAX {
            return Err(Error::TooLarge {
                what: "write-ahead log batch".into(),
                size: self.body.len(),
                limit: format::FRAME_BODY_MAX,
            });
        }
        let need = format::frame_len(self.body.len());
        let (mut cur, moves) = self.make_room(need)?;

        // Copied records go first in the same frame (one checksum for all of it, so a torn
        // write can never keep the batch and lose the copies).
        let mut moved_at = Vec::with_capacity(moves.len());
        if !moves.is_empty() {
            let mut body = Vec::with_capacity(self.body.len() + moves.len() * 64);
            for m in &moves {
                let at = format::encode_record(
                    RecordRef {
                        kind: Kind::Moved,
                        group: m.group,
                        index: m.index,
                        payload: &m.payload,
                    },
                    &mut body,
                );
                moved_at.push(at - format::RECORD_HEADER_BYTES);
            }
            let shift = body.len();
            body.extend_from_slice(&self.body);
            self.body = body;
            for p in &mut placed {
                p.at += shift;
            }
        }
        let file = self.shared.read_state().slots[cur.slot as usize]
            .file
            .clone();
        let failed = |e: std::io::Error| {
            Error::Io(format!(
                "write-ahead log write or sync failed (the node must restart to read its log back): {e}"
            ))
        };
        use std::os::unix::fs::FileExt;
        if cur.fresh {
            // The header alone first, synced (module docs).
            self.buf.clear();
            format::encode_segment_header(cur.header, &mut self.buf);
            file.write_all_at(&self.buf, 0)
                .and_then(|()| file.sync_data())
                .map_err(failed)?;
            cur.fresh = false;
            self.current = Some(cur);
        }
        self.buf.clear();
        let frame_off = cur.off;
        format::encode_frame(cur.header, self.next_seq, &self.body, &mut self.buf);
        self.next_seq += 1;
        file.write_all_at(&self.buf, frame_off)
            .and_then(|()| file.sync_data())
            .map_err(failed)?;
        cur.off = frame_off + self.buf.len() as u64;
        self.current = Some(cur);

        // Publish, in the order replay would apply the records.
        {
            let mut st = self.shared.write_state();
            let base = frame_off + format::FRAME_HEADER_BYTES as u64;
            for (m, at) in moves.iter().zip(moved_at) {
                let to = Pos {
                    slot: cur.slot,
                    off: base + at as u64,
                    len: m.payload.len() as u32,
                };
                // Only if the entry is still the one copied (a purge may have dropped it).
                if st.groups.get(&m.group).and_then(|e| e.get(&m.index)) == Some(&m.from) {
                    st.put(m.group, m.index, to, false);
                }
            }
            for p in &placed {
                match p.kind {
                    Kind::Entry | Kind::Moved => st.put(
                        p.group,
                        p.index,
                        Pos {
                            slot: cur.slot,
                            off: base + p.at as u64,
                            len: p.len,
                        },
                        true,
                    ),
                    Kind::Truncate => st.truncate(p.group, p.index),
                }
            }
        }
        let stats = &self.shared.stats;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.moved.fetch_add(moves.len() as u64, Ordering::Relaxed);
        stats
            .bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        stats
            .sync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes sure a frame of `need` bytes fits in the current segment, starting the next one if
    /// not (waiting while the log is full); after starting one, returns the live records of the
    /// oldest segment to copy forward when they are few (so an idle group does not pin that
    /// file), to go first in the frame.
    fn make_room(&mut self, need: u64) -> Result<(Current, Vec<Move>)> {
        if let Some(cur) = self.current {
            let bytes = self.shared.read_state().slots[cur.slot as usize].bytes;
            if cur.off + need <= bytes {
                return Ok((cur, Vec::new()));
            }
        }
        let current_slot = self.current.map(|c| c.slot);
        // Room for the frame and for copies of up to a quarter of a segment.
        let room = SEGMENT_HEADER_BYTES + need;
        let mut waited_since: Option<Instant> = None;
        let (slot, oldest) = loop {
            let (pick, oldest) = {
                let mut st = self.shared.write_state();
                // Free what nothing points into, oldest first, never the segment being written.
                while let Some(&front) = st.used.front() {
                    if Some(front) == current_slot || st.slots[front as usize].live > 0 {
                        break;
                    }
                    st.used.pop_front();
                    st.free.push_back(front);
                }
                // Reuse the oldest free segment (its stale records must go before any newer
                // free one's, recover.rs); a file without a header holds none, so any of those
                // that fits will do.
                let fits = |st: &super::State, s: u32| st.slots[s as usize].bytes >= room;
                let pick = match st.free.front() {
                    Some(&s) if fits(&st, s) => st.free.pop_front(),
                    _ => st
                        .free
                        .iter()
                        .position(|&s| st.slots[s as usize].header.is_none() && fits(&st, s))
                        .and_then(|i| st.free.remove(i)),
                };
                (
                    pick,
                    st.used
                        .front()
                        .copied()
                        .filter(|&o| Some(o) != current_slot),
                )
            };
            if let Some(s) = pick {
                break (s, oldest);
            }
            match self.create(room)? {
                Some(s) => break (s, oldest),
                None => {
                    // Full: wait for purges, asking whoever pins the oldest segment to snapshot.
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    if let Some(o) = oldest {
                        self.ask_pinning(o);
                    }
                    if since.elapsed() >= Duration::from_secs(5) {
                        tracing::error!(
                            waited_s = since.elapsed().as_secs(),
                            limit = self.config.bytes_max,
                            "write-ahead log full: writes wait until the oldest segment is purged"
                        );
                        waited_since = Some(Instant::now());
                    }
                    std::thread::sleep(FULL_RETRY);
                }
            }
        };

        // The copies: found under the read lock, read from the files without it (only this
        // thread changes segments; a purge meanwhile is caught when publishing).
        let mut moves = Vec::new();
        if let Some(oldest) = oldest {
            let candidates = {
                let st = self.shared.read_state();
                let s = &st.slots[oldest as usize];
                let move_bytes = format::frame_len(
                    (s.live_bytes + s.live * format::RECORD_HEADER_BYTES as u64) as usize,
                );
                let slot_bytes = st.slots[slot as usize].bytes;
                let candidates: Vec<(u64, u64, Pos)> = if s.live > 0
                    && move_bytes <= self.config.segment_bytes / 4
                    && room + move_bytes <= slot_bytes
                {
                    st.groups
                        .iter()
                        .flat_map(|(&g, e)| {
                            e.iter()
                                .filter(|(_, p)| p.slot == oldest)
                                .map(move |(&i, &p)| (g, i, p))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                candidates
            };
            let (live, in_use) = {
                let st = self.shared.read_state();
                (
                    st.slots[oldest as usize].live,
                    st.used
                        .iter()
                        .map(|&u| st.slots[u as usize].bytes)
                        .sum::<u64>(),
                )
            };
            if candidates.is_empty()
                && live > 0
                && in_use >= self.config.bytes_max / SNAPSHOT_ASK_SHARE
            {
                // Too much is live there to copy, and the log has grown past its share: its
                // group must snapshot and purge. Below the share the log just grows (a
                // snapshot of a big shard costs far more than the disk).
                self.ask_pinning(oldest);
            }
            for (group, index, from) in candidates {
                let payload = {
                    let st = self.shared.read_state();
                    st.read(group, index, from)?
                };
                moves.push(Move {
                    group,
                    index,
                    from,
                    payload,
                });
            }
        }

        let header = SegmentHeader {
            generation: self.next_generation,
            salt: fastrand::u64(..),
        };
        self.next_generation += 1;
        {
            let mut st = self.shared.write_state();
            st.slots[slot as usize].header = Some(header);
            st.used.push_back(slot);
        }
        let cur = Current {
            slot,
            header,
            off: SEGMENT_HEADER_BYTES,
            fresh: true,
        };
        self.current = Some(cur);
        self.prepare_spare();
        Ok((cur, moves))
    }

    /// Starts creating the next segment file in the background when no free one is left (and
    /// the limit allows it), so the next switch finds it ready.
    fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let (free, total, number) = {
            let st = self.shared.read_state();
            (
                st.free.len(),
                st.slots.iter().map(|s| s.bytes).sum::<u64>(),
                st.slots.iter().map(|s| s.number + 1).max().unwrap_or(0),
            )
        };
        let bytes = self.config.segment_bytes;
        if free > 0 || total + bytes > self.config.bytes_max {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = self.dir.clone();
        let started = std::thread::Builder::new()
            .name("capdb-wal-spare".into())
            .spawn(move || {
                let _ = tx.send(create_segment(&dir, number, bytes));
            });
        if started.is_ok() {
            self.spare = Some((number, bytes, rx));
        }
    }

    /// Asks the groups with live entries in segment `slot` to snapshot (so they purge), each at
    /// most every [`PINNED_ASK_EVERY`].
    fn ask_pinning(&mut self, slot: u32) {
        let Some(hook) = self.shared.pinned_hook.get() else {
            return;
        };
        let groups: Vec<u64> = {
            let st = self.shared.read_state();
            st.groups
                .iter()
                .filter(|(_, e)| e.values().any(|p| p.slot == slot))
                .map(|(&g, _)| g)
                .collect()
        };
        for g in groups {
            let due = self
                .asked
                .get(&g)
                .is_none_or(|t| t.elapsed() >= PINNED_ASK_EVERY);
            if due {
                self.asked.insert(g, Instant::now());
                tracing::info!(
                    group = g,
                    "asking a group to snapshot: its entries pin the oldest write-ahead log segment"
                );
                hook(g);
            }
        }
    }

    /// Creates a new segment of at least `room` bytes; `None` when that would pass
    /// [`WalConfig::bytes_max`].
    fn create(&mut self, room: u64) -> Result<Option<u32>> {
        let bytes = self.config.segment_bytes.max(room.next_multiple_of(4096));
        let spare_bytes = self.spare.as_ref().map_or(0, |(_, b, _)| *b);
        let (total, number) = {
            let st = self.shared.read_state();
            let total: u64 = st.slots.iter().map(|s| s.bytes).sum();
            let number = st.slots.iter().map(|s| s.number + 1).max().unwrap_or(0);
            let number = self
                .spare
                .as_ref()
                .map_or(number, |(n, _, _)| number.max(n + 1));
            (total, number)
        };
        let (file, number, bytes) = match self.spare.take() {
            // The spare fits: wait for it (usually ready).
            Some((n, b, rx)) if b >= room => {
                let file = rx.recv().map_err(|_| {
                    Error::Io("the write-ahead log's segment creator stopped".into())
                })??;
                (file, n, b)
            }
            spare => {
                self.spare = spare;
                if total + spare_bytes + bytes > self.config.bytes_max {
                    return Ok(None);
                }
                (create_segment(&self.dir, number, bytes)?, number, bytes)
            }
        };
        self.shared
            .stats
            .segments_created
            .fetch_add(1, Ordering::Relaxed);
        let mut st = self.shared.write_state();
        st.slots.push(Slot {
            file: Arc::new(file),
            number,
            bytes,
            header: None,
            live: 0,
            live_bytes: 0,
        });
        Ok(Some((st.slots.len() - 1) as u32))
    }
}
