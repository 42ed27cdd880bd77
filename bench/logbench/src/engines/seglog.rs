//! A minimal segment log: `SEGMENTS` files of `SEGMENT_BYTES`, preallocated (`fallocate`) and
//! zero-filled once, then recycled round-robin (the oldest segment is reused once every group's
//! entries in it are purged; here the ring is sized so that always holds). A batch is one
//! `pwrite` of every group's records followed by one `fdatasync`: the blocks are already
//! allocated and initialized, so the sync writes data only, no extent or size change.
//!
//! Record: `[len u32][crc32 u32][group u64][index u64][payload]`, little-endian. The CRC covers
//! the segment's generation (not stored in the record), group, index and payload, so a record
//! left from an earlier use of the same file fails its check and ends recovery there.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{GROUPS_MAX, fsync_dir};
use crate::{Entry, LogEngine, Result, ctx};

pub const SEGMENT_BYTES: u64 = 64 << 20;
pub const SEGMENTS: usize = 4;
pub const HEADER: usize = 24;

pub struct SegLog {
    files: Vec<File>,
    /// Segment being written, its generation and write offset.
    active: usize,
    generation: u64,
    offset: u64,
    next: [u64; GROUPS_MAX],
    buf: Vec<u8>,
}

impl SegLog {
    pub fn open(dir: &Path) -> Result<SegLog> {
        std::fs::create_dir_all(dir).map_err(ctx(format!("create {}", dir.display())))?;
        let mut files = Vec::with_capacity(SEGMENTS);
        for i in 0..SEGMENTS {
            let path = dir.join(format!("seg-{i:04}.log"));
            let ready = std::fs::metadata(&path).is_ok_and(|m| m.len() == SEGMENT_BYTES);
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(ctx(format!("open {}", path.display())))?;
            if !ready {
                preallocate(&mut f, SEGMENT_BYTES)
                    .map_err(|e| format!("preallocate {}: {e}", path.display()))?;
            }
            files.push(f);
        }
        fsync_dir(dir)?;
        Ok(SegLog {
            files,
            active: 0,
            generation: 1,
            offset: 0,
            next: [1; GROUPS_MAX],
            buf: Vec::with_capacity(1 << 20),
        })
    }
}

/// `fallocate` the whole file, then write zeros over it and fsync, so that later writes are
/// overwrites of initialized blocks (unwritten extents would need a conversion at each sync).
fn preallocate(f: &mut File, bytes: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..bytes / zeros.len() as u64 {
        f.write_all(&zeros)?;
    }
    f.sync_all()
}

pub fn record_crc(generation: u64, group: u64, index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&group.to_le_bytes());
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

impl LogEngine for SegLog {
    fn next_index(&self, group: u64) -> u64 {
        self.next[group as usize]
    }

    fn append(&mut self, batch: &[Entry<'_>]) -> Result<()> {
        let bytes: usize = batch.iter().map(|e| HEADER + e.payload.len()).sum();
        if bytes as u64 > SEGMENT_BYTES {
            return Err("batch larger than a segment".into());
        }
        if self.offset + bytes as u64 > SEGMENT_BYTES {
            // Rotate to the next (recycled) segment. A real log would first write the new
            // segment's header (generation) and sync it with this batch.
            self.active = (self.active + 1) % SEGMENTS;
            self.generation += 1;
            self.offset = 0;
        }
        self.buf.clear();
        for e in batch {
            let crc = record_crc(self.generation, e.group, e.index, e.payload);
            self.buf
                .extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(&crc.to_le_bytes());
            self.buf.extend_from_slice(&e.group.to_le_bytes());
            self.buf.extend_from_slice(&e.index.to_le_bytes());
            self.buf.extend_from_slice(e.payload);
            self.next[e.group as usize] = e.index + 1;
        }
        let f = &self.files[self.active];
        f.write_all_at(&self.buf, self.offset)
            .map_err(ctx("seglog pwrite"))?;
        f.sync_data().map_err(ctx("seglog fdatasync"))?;
        self.offset += self.buf.len() as u64;
        Ok(())
    }
}
