//! Reading the log back at open.
//!
//! # What a crash can leave, and how each case is read
//!
//! The writer syncs each batch before it writes the next, and writes a reused segment's header
//! in the same `pwrite` as its first frame. So a crash leaves at most one damaged frame: the
//! last one, not yet synced, whose batch nobody was told is durable.
//!
//! 1. Segment headers are read; a file whose header fails its check is **free** (new, or its
//!    header rewrite was torn: its first frame was never acknowledged).
//! 2. Segments are replayed in generation order, frames in sequence order. A record `Entry i`
//!    drops the group's entries from `i` on and records `i`; `Moved i` records `i` only;
//!    `Truncate from` drops from `from` on. Free files' older records are replayed too when their
//!    header survived; everything newer supersedes them (segments are freed and reused strictly
//!    oldest first).
//! 3. A segment's frames end at the first frame that does not verify. That is the **torn tail**
//!    when nothing acknowledged can follow it: it must be in the last segment holding frames,
//!    and no verifying frame of that segment's use may follow it. Otherwise acknowledged
//!    records are damaged or missing (a sequence gap between segments, a valid frame after a bad
//!    one): the log refuses to open ([`Error::Corruption`]) rather than serve without them.
//! 4. The writer always starts a new segment after open, so it never writes over a torn tail.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use capdb_types::{Error, Result};

use super::format::{
    self, FRAME_ALIGN, FRAME_HEADER_BYTES, FRAME_MAGIC, Kind, SEGMENT_HEADER_BYTES, SegmentHeader,
};
use super::{Pos, Slot, State};

pub(super) struct Recovered {
    pub state: State,
    pub next_generation: u64,
    pub next_seq: u64,
}

/// The file of segment `number`.
pub(super) fn segment_path(dir: &Path, number: u64) -> std::path::PathBuf {
    dir.join(format!("seg-{number:06}.log"))
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let text = format!("{what} {}", path.display());
    move |e| Error::Io(format!("{text}: {e}"))
}

pub(super) fn recover(dir: &Path) -> Result<Recovered> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbers.push(n);
        } else if name.ends_with(".tmp") {
            // A segment whose creation did not finish: never used.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    numbers.sort_unstable();

    let mut slots = Vec::with_capacity(numbers.len());
    for number in numbers {
        let path = segment_path(dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        let bytes = file.metadata().map_err(io("cannot stat", &path))?.len();
        let mut head = vec![0u8; SEGMENT_HEADER_BYTES as usize];
        let header = if bytes >= SEGMENT_HEADER_BYTES {
            file.read_exact_at(&mut head, 0)
                .map_err(io("cannot read", &path))?;
            format::decode_segment_header(&head)
        } else {
            None
        };
        slots.push(Slot {
            file: Arc::new(file),
            number,
            bytes,
            header,
            live: 0,
            live_bytes: 0,
        });
    }

    let mut order: Vec<u32> = (0..slots.len() as u32)
        .filter(|&s| slots[s as usize].header.is_some())
        .collect();
    order.sort_by_key(|&s| slots[s as usize].header.map(|h| h.generation));
    let free: VecDeque<u32> = (0..slots.len() as u32)
        .filter(|&s| slots[s as usize].header.is_none())
        .collect();

    let mut groups: HashMap<u64, BTreeMap<u64, Pos>> = HashMap::new();
    let mut expected_seq: Option<u64> = None;
    // Where each segment's frames ended.
    let mut ends: Vec<(u32, u64)> = Vec::with_capacity(order.len());
    for &slot in &order {
        let s = &slots[slot as usize];
        let Some(header) = s.header else {
            continue; // only slots with a header are ordered
        };
        let mut off = SEGMENT_HEADER_BYTES;
        while let Some((fh_seq, body, len)) = read_frame(s, header, off)? {
            if let Some(expected) = expected_seq
                && fh_seq != expected
            {
                return Err(Error::Corruption(format!(
                    "write-ahead log: segment {} holds frame {fh_seq} where frame {expected} was expected; acknowledged records are missing",
                    s.number
                )));
            }
            replay_frame(&mut groups, slot, off, &body)?;
            expected_seq = Some(fh_seq + 1);
            off += len;
        }
        ends.push((slot, off));
    }

    // Only the newest segment may end in a torn frame: nothing verifying may follow where its
    // frames stopped. The one before it too (the newest may hold only a header whose first
    // frame was torn). Earlier segments ending early show as a sequence gap above.
    for &(slot, end) in ends.iter().rev().take(2) {
        let s = &slots[slot as usize];
        let Some(header) = s.header else {
            continue;
        };
        if let Some(at) = find_frame_after(s, header, end)? {
            return Err(Error::Corruption(format!(
                "write-ahead log: segment {} has a damaged frame at {end} followed by a valid one at {at}; acknowledged records are damaged",
                s.number
            )));
        }
    }

    let next_generation = order
        .last()
        .and_then(|&s| slots[s as usize].header)
        .map_or(1, |h| h.generation + 1);
    let mut state = State {
        groups,
        purged: HashMap::new(),
        slots,
        used: order.into_iter().collect(),
        free,
    };
    let positions: Vec<Pos> = state
        .groups
        .values()
        .flat_map(|e| e.values().copied())
        .collect();
    for pos in positions {
        state.remember(pos);
    }
    Ok(Recovered {
        state,
        next_generation,
        next_seq: expected_seq.unwrap_or(1),
    })
}

/// The frame at `off` of segment use `header` if it verifies: its sequence number, body and
/// length with padding.
fn read_frame(s: &Slot, header: SegmentHeader, off: u64) -> Result<Option<(u64, Vec<u8>, u64)>> {
    if off + FRAME_HEADER_BYTES as u64 > s.bytes {
        return Ok(None);
    }
    let mut head = [0u8; FRAME_HEADER_BYTES];
    s.file.read_exact_at(&mut head, off).map_err(|e| {
        Error::Io(format!(
            "cannot read write-ahead log segment {}: {e}",
            s.number
        ))
    })?;
    let Some(fh) = format::decode_frame_header(header, &head) else {
        return Ok(None);
    };
    let len = format::frame_len(fh.body_len);
    if off + len > s.bytes {
        return Ok(None);
    }
    let mut body = vec![0u8; fh.body_len];
    s.file
        .read_exact_at(&mut body, off + FRAME_HEADER_BYTES as u64)
        .map_err(|e| {
            Error::Io(format!(
                "cannot read write-ahead log segment {}: {e}",
                s.number
            ))
        })?;
    if !format::frame_body_ok(header, &head, fh, &body) {
        return Ok(None);
    }
    Ok(Some((fh.seq, body, len)))
}

/// Applies a verified frame's records to the index.
fn replay_frame(
    groups: &mut HashMap<u64, BTreeMap<u64, Pos>>,
    slot: u32,
    frame_off: u64,
    body: &[u8],
) -> Result<()> {
    let mut at = 0usize;
    while at < body.len() {
        let (r, len) = format::decode_record(&body[at..])?;
        let pos = Pos {
            slot,
            off: frame_off + FRAME_HEADER_BYTES as u64 + at as u64,
            len: r.payload.len() as u32,
        };
        match r.kind {
            Kind::Entry => {
                let entries = groups.entry(r.group).or_default();
                entries.split_off(&r.index);
                entries.insert(r.index, pos);
            }
            Kind::Moved => {
                groups.entry(r.group).or_default().insert(r.index, pos);
            }
            Kind::Truncate => {
                if let Some(entries) = groups.get_mut(&r.group) {
                    entries.split_off(&r.index);
                    if entries.is_empty() {
                        groups.remove(&r.group);
                    }
                }
            }
        }
        at += len;
    }
    Ok(())
}

/// The offset of a frame of segment use `header` that verifies, at or after `from` (stepping by
/// [`FRAME_ALIGN`]).
fn find_frame_after(s: &Slot, header: SegmentHeader, from: u64) -> Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let mut base = from.next_multiple_of(FRAME_ALIGN);
    let magic = FRAME_MAGIC.to_le_bytes();
    let generation = header.generation.to_le_bytes();
    let mut buf = vec![0u8; (CHUNK + FRAME_HEADER_BYTES as u64) as usize];
    while base + FRAME_HEADER_BYTES as u64 <= s.bytes {
        let n = (s.bytes - base).min(buf.len() as u64) as usize;
        s.file.read_exact_at(&mut buf[..n], base).map_err(|e| {
            Error::Io(format!(
                "cannot read write-ahead log segment {}: {e}",
                s.number
            ))
        })?;
        let mut i = 0usize;
        while i + FRAME_HEADER_BYTES <= n && (i as u64) < CHUNK {
            if buf[i..i + 4] == magic
                && buf[i + 8..i + 16] == generation
                && read_frame(s, header, base + i as u64)?.is_some()
            {
                return Ok(Some(base + i as u64));
            }
            i += FRAME_ALIGN as usize;
        }
        base += CHUNK;
    }
    Ok(None)
}

/// Creates segment file `number` of `bytes` zero-filled bytes, synced, under its final name.
pub(super) fn create_segment(dir: &Path, number: u64, bytes: u64) -> Result<File> {
    use std::io::Write;
    let path = segment_path(dir, number);
    let tmp = dir.join(format!("seg-{number:06}.tmp"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    // Written zeros, not a sparse file or unwritten extents: a later overwrite then changes
    // no file metadata, and its sync is the disk's fast kind (perf.md §1).
    let zeros = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])
            .map_err(io("cannot fill", &tmp))?;
        left -= n as u64;
    }
    file.sync_all().map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot rename", &tmp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", dir))?;
    Ok(file)
}
