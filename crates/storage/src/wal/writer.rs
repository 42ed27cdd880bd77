//! The writer thread: every queued job of every group in one frame, one `pwrite`, one
//! `fdatasync`; then the index is updated and the jobs are answered, in queue order.
//!
//! After a failed write or sync the writer answers every later job with the same error: what
//! the disk holds after a failed `fdatasync` is unknown (the kernel may have dropped the dirty
//! pages), so nothing more may be acknowledged until the node restarts and reads the log back.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

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

pub(super) fn start(
    dir: PathBuf,
    config: WalConfig,
    shared: Arc<Shared>,
    next_generation: u64,
    next_seq: u64,
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
    };
    std::thread::Builder::new()
        .name("capdb-wal".into())
        .spawn(move || writer.run(rx))
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
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
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
            for job in batch.drain(..) {
                job.finish(result.clone());
            }
        }
        tracing::debug!("write-ahead log writer stopped: every handle dropped");
    }

    fn write(&mut self, batch: &[Job]) -> Result<()> {
        let started = Instant::now();
        self.body.clear();
        let mut placed = Vec::new();
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
        let moves = self.make_room(need)?;
        let mut cur = self.current.expect("make_room sets the current segment");

        // The bytes: [segment header] [frame of moved records] frame of the batch.
        self.buf.clear();
        let start = if cur.fresh {
            format::encode_segment_header(cur.header, &mut self.buf);
            0
        } else {
            cur.off
        };
        let mut moved_at = Vec::with_capacity(moves.len());
        if !moves.is_empty() {
            let mut mbody = Vec::new();
            for m in &moves {
                let at = format::encode_record(
                    RecordRef {
                        kind: Kind::Moved,
                        group: m.group,
                        index: m.index,
                        payload: &m.payload,
                    },
                    &mut mbody,
                );
                moved_at.push(at - format::RECORD_HEADER_BYTES);
            }
            let frame_off = start + self.buf.len() as u64;
            format::encode_frame(cur.header, self.next_seq, &mbody, &mut self.buf);
            self.next_seq += 1;
            for at in &mut moved_at {
                *at += (frame_off + format::FRAME_HEADER_BYTES as u64) as usize;
            }
        }
        let frame_off = start + self.buf.len() as u64;
        format::encode_frame(cur.header, self.next_seq, &self.body, &mut self.buf);
        self.next_seq += 1;

        let file = self.shared.read_state().slots[cur.slot as usize]
            .file
            .clone();
        let written = {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&self.buf, start)
                .and_then(|()| file.sync_data())
        };
        if let Err(e) = written {
            let e = Error::Io(format!(
                "write-ahead log write or sync failed (the node must restart to read its log back): {e}"
            ));
            tracing::error!(error = %e, "write-ahead log stopped");
            self.broken = Some(e.clone());
            return Err(e);
        }
        cur.off = start + self.buf.len() as u64;
        cur.fresh = false;
        self.current = Some(cur);

        // Publish, in the order replay would apply the records.
        {
            let mut st = self.shared.write_state();
            for (m, at) in moves.iter().zip(moved_at) {
                let to = Pos {
                    slot: cur.slot,
                    off: at as u64,
                    len: m.payload.len() as u32,
                };
                // Only if the entry is still the one copied (a purge may have dropped it).
                if st.groups.get(&m.group).and_then(|e| e.get(&m.index)) == Some(&m.from) {
                    st.put(m.group, m.index, to, false);
                }
            }
            let base = frame_off + format::FRAME_HEADER_BYTES as u64;
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
    /// not; after starting one, returns the live records of the oldest segment to copy forward
    /// when they are few (so an idle group does not pin that file).
    fn make_room(&mut self, need: u64) -> Result<Vec<Move>> {
        if let Some(cur) = self.current {
            let bytes = self.shared.read_state().slots[cur.slot as usize].bytes;
            if cur.off + need <= bytes {
                return Ok(Vec::new());
            }
        }
        let room = SEGMENT_HEADER_BYTES + need;
        let current_slot = self.current.map(|c| c.slot);
        let reuse = {
            let mut st = self.shared.write_state();
            // Free what nothing points into, oldest first, never the segment being written.
            while let Some(&front) = st.used.front() {
                if Some(front) == current_slot || st.slots[front as usize].live > 0 {
                    break;
                }
                st.used.pop_front();
                st.free.push_back(front);
            }
            match st.free.front() {
                Some(&s) if st.slots[s as usize].bytes >= room => st.free.pop_front(),
                _ => None,
            }
        };
        let slot = match reuse {
            Some(s) => s,
            None => self.create(room)?,
        };
        let header = SegmentHeader {
            generation: self.next_generation,
            salt: fastrand::u64(..),
        };
        self.next_generation += 1;
        let moves = {
            let mut st = self.shared.write_state();
            st.slots[slot as usize].header = Some(header);
            st.used.push_back(slot);
            let slot_bytes = st.slots[slot as usize].bytes;
            let mut moves = Vec::new();
            if let Some(&oldest) = st.used.front()
                && oldest != slot
                && Some(oldest) != current_slot
            {
                let s = &st.slots[oldest as usize];
                let move_bytes = format::frame_len(
                    (s.live_bytes + s.live * format::RECORD_HEADER_BYTES as u64) as usize,
                );
                if s.live > 0
                    && move_bytes <= self.config.segment_bytes / 4
                    && room + move_bytes <= slot_bytes
                {
                    for (&group, entries) in &st.groups {
                        for (&index, &from) in entries {
                            if from.slot == oldest {
                                moves.push(Move {
                                    group,
                                    index,
                                    from,
                                    payload: st.read(group, index, from)?,
                                });
                            }
                        }
                    }
                }
            }
            moves
        };
        self.current = Some(Current {
            slot,
            header,
            off: SEGMENT_HEADER_BYTES,
            fresh: true,
        });
        Ok(moves)
    }

    /// Creates a new segment of at least `room` bytes, within [`WalConfig::bytes_max`].
    fn create(&mut self, room: u64) -> Result<u32> {
        let bytes = self.config.segment_bytes.max(room.next_multiple_of(4096));
        let (total, number, pinned) = {
            let st = self.shared.read_state();
            let total: u64 = st.slots.iter().map(|s| s.bytes).sum();
            let number = st.slots.iter().map(|s| s.number + 1).max().unwrap_or(0);
            let pinned = st.used.front().and_then(|&oldest| {
                st.groups
                    .iter()
                    .find_map(|(g, e)| e.values().any(|p| p.slot == oldest).then_some(*g))
            });
            (total, number, pinned)
        };
        if total + bytes > self.config.bytes_max {
            tracing::error!(
                total,
                limit = self.config.bytes_max,
                ?pinned,
                "write-ahead log full: the oldest segment is still needed"
            );
            return Err(Error::Io(format!(
                "write-ahead log is full ({total} bytes of segments, limit {}); group {pinned:?} still needs the oldest segment",
                self.config.bytes_max
            )));
        }
        let file = create_segment(&self.dir, number, bytes)?;
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
        Ok((st.slots.len() - 1) as u32)
    }
}
