//! The bytes on disk: segment headers, frames and records (all little-endian).
//!
//! ```text
//! segment  = header (SEGMENT_HEADER_BYTES, zero-padded) frame*
//! header   = magic u64 | format u32 | 0 u32 | generation u64 | salt u64 | crc32 u32
//! frame    = magic u32 | body_len u32 | generation u64 | seq u64 | crc32 u32 | 0 u32 | body
//!            | zero padding to a multiple of FRAME_ALIGN
//! body     = record*
//! record   = kind u8 | 0 u8 u8 u8 | len u32 | group u64 | index u64 | payload (len bytes)
//! ```
//!
//! A frame's CRC covers the segment's secret `salt` (random per use of the file), its header
//! fields and its body. A frame therefore only verifies in the segment use that wrote it: frames
//! left from an earlier use of a recycled file fail (other generation, other salt), and so would
//! bytes a client stored inside a value that happen to look like a frame (the salt is never sent
//! anywhere).

use capdb_types::{Error, Result};

pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"CAPDBWAL");
pub const SEGMENT_FORMAT: u32 = 1;
/// Bytes reserved at the start of a segment for its header; frames start after it.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
const SEGMENT_HEADER_USED: usize = 36;

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"CWF1");
pub const FRAME_HEADER_BYTES: usize = 32;
/// Frames start at multiples of this (so a scan for a frame header can step by it).
pub const FRAME_ALIGN: u64 = 8;
/// Largest frame body: one writer batch (the writer splits nothing; a batch is bounded well
/// below this, see `writer.rs`).
pub const FRAME_BODY_MAX: usize = 1 << 31;

pub const RECORD_HEADER_BYTES: usize = 24;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Entry `index` of `group`; every later entry of the group is gone (a newer leader's
    /// entry replaces what followed it).
    Entry = 1,
    /// Entry `index` of `group`, copied forward from an older segment so that segment can be
    /// reused; it changes nothing else.
    Moved = 2,
    /// Every entry of `group` from `index` on is gone (`index` 0: the whole group).
    Truncate = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Entry),
            2 => Some(Kind::Moved),
            3 => Some(Kind::Truncate),
            _ => None,
        }
    }
}

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub generation: u64,
    pub salt: u64,
}

pub fn encode_segment_header(h: SegmentHeader, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&SEGMENT_MAGIC.to_le_bytes());
    out.extend_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&h.generation.to_le_bytes());
    out.extend_from_slice(&h.salt.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, SEGMENT_HEADER_USED);
    out.resize(start + SEGMENT_HEADER_BYTES as usize, 0);
}

/// The header, or `None` when the bytes are not a valid header (a new, zeroed file, or a header
/// torn by a crash while it was being rewritten: the segment is then free).
pub fn decode_segment_header(b: &[u8]) -> Option<SegmentHeader> {
    if b.len() < SEGMENT_HEADER_USED {
        return None;
    }
    let crc = u32::from_le_bytes(b[32..36].try_into().ok()?);
    if crc32fast::hash(&b[..32]) != crc
        || u64::from_le_bytes(b[0..8].try_into().ok()?) != SEGMENT_MAGIC
        || u32::from_le_bytes(b[8..12].try_into().ok()?) != SEGMENT_FORMAT
    {
        return None;
    }
    Some(SegmentHeader {
        generation: u64::from_le_bytes(b[16..24].try_into().ok()?),
        salt: u64::from_le_bytes(b[24..32].try_into().ok()?),
    })
}

/// One record to put in a frame.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub kind: Kind,
    pub group: u64,
    pub index: u64,
    pub payload: &'a [u8],
}

/// Appends a record to a frame body under construction; returns the payload's offset within
/// the body.
pub fn encode_record(r: RecordRef<'_>, body: &mut Vec<u8>) -> usize {
    body.push(r.kind as u8);
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
    body.extend_from_slice(&r.group.to_le_bytes());
    body.extend_from_slice(&r.index.to_le_bytes());
    let at = body.len();
    body.extend_from_slice(r.payload);
    at
}

/// Decodes the record at the start of `b`: the record and its total length.
pub fn decode_record(b: &[u8]) -> Result<(RecordRef<'_>, usize)> {
    let bad = |m: &str| Error::Corruption(format!("write-ahead log record: {m}"));
    if b.len() < RECORD_HEADER_BYTES {
        return Err(bad("shorter than its header"));
    }
    let kind = Kind::from_u8(b[0]).ok_or_else(|| bad("unknown kind"))?;
    // The header is at least RECORD_HEADER_BYTES long (checked above).
    let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (group, index) = (u64_at(8), u64_at(16));
    let end = RECORD_HEADER_BYTES
        .checked_add(len)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("longer than its frame"))?;
    Ok((
        RecordRef {
            kind,
            group,
            index,
            payload: &b[RECORD_HEADER_BYTES..end],
        },
        end,
    ))
}

/// The length of a frame with a body of `body_len` bytes, padding included.
pub fn frame_len(body_len: usize) -> u64 {
    (FRAME_HEADER_BYTES as u64 + body_len as u64).next_multiple_of(FRAME_ALIGN)
}

fn frame_crc(salt: u64, head: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(head);
    h.update(body);
    h.finalize()
}

/// Appends a frame holding `body` to `out`, padded to [`FRAME_ALIGN`].
pub fn encode_frame(header: SegmentHeader, seq: u64, body: &[u8], out: &mut Vec<u8>) {
    assert!(body.len() <= FRAME_BODY_MAX, "writer batches are bounded");
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = frame_crc(header.salt, &out[start..start + 24], body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(body);
    out.resize(start + frame_len(body.len()) as usize, 0);
}

/// A frame's header fields, before its body is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub body_len: usize,
    pub seq: u64,
    crc: u32,
}

/// The frame header at the start of `b` if it claims to belong to the segment use `header`
/// (magic and generation match, the body length is possible); its CRC is checked with
/// [`frame_body_ok`].
pub fn decode_frame_header(header: SegmentHeader, b: &[u8]) -> Option<FrameHeader> {
    if b.len() < FRAME_HEADER_BYTES
        || u32::from_le_bytes(b[0..4].try_into().ok()?) != FRAME_MAGIC
        || u64::from_le_bytes(b[8..16].try_into().ok()?) != header.generation
    {
        return None;
    }
    let body_len = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    if body_len > FRAME_BODY_MAX {
        return None;
    }
    Some(FrameHeader {
        body_len,
        seq: u64::from_le_bytes(b[16..24].try_into().ok()?),
        crc: u32::from_le_bytes(b[24..28].try_into().ok()?),
    })
}

/// Whether `body` is the body the frame header `head` (its first 24 bytes in `head_bytes`)
/// was written with.
pub fn frame_body_ok(
    header: SegmentHeader,
    head_bytes: &[u8],
    fh: FrameHeader,
    body: &[u8],
) -> bool {
    body.len() == fh.body_len && frame_crc(header.salt, &head_bytes[..24], body) == fh.crc
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: SegmentHeader = SegmentHeader {
        generation: 7,
        salt: 0xdead_beef,
    };

    #[test]
    fn a_segment_header_round_trips_and_a_damaged_one_is_free() {
        let mut b = Vec::new();
        encode_segment_header(H, &mut b);
        assert_eq!(b.len() as u64, SEGMENT_HEADER_BYTES);
        assert_eq!(decode_segment_header(&b), Some(H));
        b[20] ^= 1;
        assert_eq!(decode_segment_header(&b), None);
        assert_eq!(decode_segment_header(&[0u8; 4096]), None);
    }

    #[test]
    fn a_frame_verifies_only_with_its_segments_salt_and_generation() {
        let mut body = Vec::new();
        let at = encode_record(
            RecordRef {
                kind: Kind::Entry,
                group: 3,
                index: 9,
                payload: b"hello",
            },
            &mut body,
        );
        assert_eq!(&body[at..], b"hello");
        let mut f = Vec::new();
        encode_frame(H, 42, &body, &mut f);
        assert_eq!(f.len() as u64 % FRAME_ALIGN, 0);
        let fh = decode_frame_header(H, &f).expect("header");
        assert_eq!(fh.seq, 42);
        let b = &f[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + fh.body_len];
        assert!(frame_body_ok(H, &f, fh, b));
        let other_salt = SegmentHeader { salt: 1, ..H };
        assert!(!frame_body_ok(other_salt, &f, fh, b));
        let other_gen = SegmentHeader { generation: 8, ..H };
        assert!(decode_frame_header(other_gen, &f).is_none());
        let (r, len) = decode_record(b).expect("record");
        assert_eq!(
            (r.kind, r.group, r.index, r.payload, len),
            (Kind::Entry, 3, 9, &b"hello"[..], b.len())
        );
    }

    #[test]
    fn a_record_longer_than_its_frame_is_refused_not_read_past() {
        let mut body = Vec::new();
        encode_record(
            RecordRef {
                kind: Kind::Truncate,
                group: 1,
                index: 0,
                payload: &[1, 2, 3],
            },
            &mut body,
        );
        body.truncate(body.len() - 1);
        assert!(decode_record(&body).is_err());
    }
}
