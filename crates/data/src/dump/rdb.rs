//! The DUMP payload: one value in Redis's RDB object format, then the RDB version (2 bytes,
//! little-endian) and Redis's CRC-64 of everything before it (8 bytes, little-endian).
//!
//! # What is written
//!
//! The simplest encodings Redis 7.0 restores, each converted by Redis on load to the encoding
//! it would have chosen itself (a small hash becomes a listpack, a set of few integers an
//! intset): type 0 strings (integers that fit 32 bits in Redis's integer encoding, everything
//! else plain, never LZF-compressed), type 1 lists, type 2 sets, type 4 hashes and type 5
//! sorted sets (`ZSET_2`: binary little-endian doubles). The version written is 10, Redis 7.0's.
//!
//! # What is read
//!
//! Everything Redis 7.0's DUMP produces, and the plain encodings older versions wrote:
//! strings (plain, integer-encoded, LZF-compressed), lists (type 1; `QUICKLIST_2`, type 18,
//! with listpack and plain nodes), sets (type 2; intset, 11), hashes (type 4; listpack, 16),
//! sorted sets (type 3 with text scores; `ZSET_2`, 5; listpack, 17), and the ziplist
//! encodings of Redis 6 and older (lists 10 and quicklists of ziplists 14, sorted sets 12,
//! hashes 13). Not read: zipmaps (type 9, Redis 2.4), streams, modules, and anything newer than
//! RDB version 10 (as Redis 7.0 refuses it).
//!
//! # Validation
//!
//! A payload comes from a client, so every length is checked before it is used: a declared
//! element count must fit in the bytes that remain (each element takes at least one), a string
//! must lie within the payload, a listpack or intset is walked entry by entry (header, each
//! entry's back-length, the terminator, the declared count), and LZF output is bounded by the
//! length it declares (itself at most 88 times the compressed length, LZF's largest expansion).
//! Empty collections,
//! NaN scores and duplicate members or fields are refused, as Redis refuses them. Redis 7.0
//! (`sanitize-dump-payload no`, its default) checks listpacks and intsets more shallowly and
//! would restore a few malformed ones (duplicates inside a listpack, a score that is not a
//! number); capdb answers those with `Bad data format` too, since its elements cannot hold
//! duplicates. Bytes between the value's end and the footer are ignored, as Redis ignores them.
//!
//! # Budget
//!
//! What a payload decodes into is bounded, not only what it is: a listpack entry takes 2 bytes
//! (`00 01`) yet becomes a string of its own (a [`Bytes`], a heap allocation and a slot in the
//! command RESTORE runs), and LZF expands up to 88 times, so a 3 MiB payload could otherwise
//! decode into a hundred million elements. One budget is charged as the value is read, whatever
//! the encoding (plain strings, listpack, ziplist, intset, quicklist nodes, compressed or not):
//!
//! - each element (a list item, a set member, a hash field or value, a sorted set member or
//!   score) counts against [`ELEMENTS_MAX`], so the command RESTORE builds (RPUSH, SADD, HSET,
//!   ZADD with the key) never has more arguments than a client's command may
//!   ([`FRAME_ELEMENTS_MAX`]);
//! - each element's length plus [`ELEMENT_OVERHEAD`], and the bytes LZF produces for a
//!   container (a listpack, ziplist or intset, parsed then dropped) or a string value, count
//!   against [`DECODED_BYTES_MAX`] (an element LZF produced is counted once, as an element).
//!
//! A charge is made as soon as its size is known, before the element's bytes are copied when the
//! encoding gives the length first, and before LZF runs; the first charge past either bound
//! stops decoding with [`DecodeError::TooManyElements`] or [`DecodeError::TooLarge`]. So a
//! payload's decoded value (and the decoder's working memory: at most one container's LZF
//! output besides the elements) stays within about [`DECODED_BYTES_MAX`], and no vector is ever
//! reserved for a declared count beyond what the budget still allows.

use std::collections::HashSet;

use bytes::Bytes;

use capdb_types::limits::FRAME_ELEMENTS_MAX;

use super::crc64::crc64;
use super::lzf;

/// The RDB version written, and the newest one read: Redis 7.0's.
pub const RDB_VERSION: u16 = 10;

/// The most bytes one payload decodes into (see the module doc's budget): every element's
/// length plus [`ELEMENT_OVERHEAD`], and LZF's output. A payload arrives in one RESP argument
/// (at most the frame limit, 16 MiB by default), but LZF can expand 88 times and a 2-byte
/// listpack entry becomes a whole string, so without a bound a small payload could make the
/// server allocate gigabytes.
pub const DECODED_BYTES_MAX: usize = 256 << 20;

/// The most elements one payload decodes into (a hash field and its value are two, as a sorted
/// set's member and score are): RESTORE runs them as one command with its name and key, which
/// then has at most [`FRAME_ELEMENTS_MAX`] arguments, as a client's command.
pub const ELEMENTS_MAX: usize = FRAME_ELEMENTS_MAX - 2;

/// The bytes an element costs besides its length, in [`DECODED_BYTES_MAX`]: its [`Bytes`]
/// handle and shared header, the allocator's rounding, its slot in the command's argument list.
pub const ELEMENT_OVERHEAD: usize = 64;

/// The length a score is charged as: the longest `%.17g` (`-2.2250738585072014e-308`), the
/// argument RESTORE gives ZADD.
const SCORE_TEXT_MAX: usize = 24;

/// The longest decimal integer an integer encoding turns into (`-9223372036854775808`).
const INT_TEXT_MAX: usize = 20;

/// Payloads up to this long cannot reach either bound, whatever they hold, so they need no
/// decoding to be admitted (see `super::check_limits`). Every element consumes at least one
/// byte of the payload or of LZF's output, which is at most 88 times the payload, so such a
/// payload has at most `89 * len` elements ([`ELEMENTS_MAX`] or fewer), each charged the bytes
/// it consumed or at most 24 bytes (an integer's or a score's text), plus the
/// overhead; with LZF's output for containers that is well within [`DECODED_BYTES_MAX`].
pub const WITHIN_LIMITS_LEN_MAX: usize = ELEMENTS_MAX / (1 + LZF_EXPANSION_MAX as usize);

const _: () = assert!(SCORE_TEXT_MAX >= INT_TEXT_MAX);
const _: () = {
    let consumed = (1 + LZF_EXPANSION_MAX as usize) * WITHIN_LIMITS_LEN_MAX;
    let lzf = LZF_EXPANSION_MAX as usize * WITHIN_LIMITS_LEN_MAX;
    assert!(consumed * (ELEMENT_OVERHEAD + SCORE_TEXT_MAX) + consumed + lzf <= DECODED_BYTES_MAX);
};

/// The most output bytes an LZF stream makes of one input byte: a back reference of 3 bytes
/// copies up to 264.
const LZF_EXPANSION_MAX: u64 = 88;

/// The 2-byte version and the 8-byte checksum after the value.
const FOOTER_LEN: usize = 10;

const TYPE_STRING: u8 = 0;
const TYPE_LIST: u8 = 1;
const TYPE_SET: u8 = 2;
const TYPE_ZSET: u8 = 3;
const TYPE_HASH: u8 = 4;
const TYPE_ZSET_2: u8 = 5;
const TYPE_LIST_ZIPLIST: u8 = 10;
const TYPE_SET_INTSET: u8 = 11;
const TYPE_ZSET_ZIPLIST: u8 = 12;
const TYPE_HASH_ZIPLIST: u8 = 13;
const TYPE_LIST_QUICKLIST: u8 = 14;
const TYPE_HASH_LISTPACK: u8 = 16;
const TYPE_ZSET_LISTPACK: u8 = 17;
const TYPE_LIST_QUICKLIST_2: u8 = 18;

/// `QUICKLIST_2` node containers.
const NODE_PLAIN: u64 = 1;
const NODE_PACKED: u64 = 2;

/// String encodings (a length byte `11xxxxxx`).
const ENC_INT8: u8 = 0;
const ENC_INT16: u8 = 1;
const ENC_INT32: u8 = 2;
const ENC_LZF: u8 = 3;

/// A value as the payload carries it, independent of how capdb stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    String(Bytes),
    List(Vec<Bytes>),
    Set(Vec<Bytes>),
    Hash(Vec<(Bytes, Bytes)>),
    ZSet(Vec<(Bytes, f64)>),
}

/// Why a payload was refused; each is one of Redis's error replies (see `super::restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Too short, a newer RDB version, or a checksum mismatch.
    VersionOrChecksum,
    /// Anything wrong inside the value.
    BadData,
    /// A sound payload (as far as it was read) that decodes into more than
    /// [`DECODED_BYTES_MAX`] (see the module doc's budget): capdb's limit, not Redis's.
    TooLarge,
    /// A sound payload (as far as it was read) that decodes into more than [`ELEMENTS_MAX`]
    /// elements: capdb's limit, not Redis's.
    TooManyElements,
}

type Result<T> = std::result::Result<T, DecodeError>;

/// The payload of `obj`: its RDB encoding, the version and the checksum.
pub fn encode(obj: &Object) -> Vec<u8> {
    let mut out = Vec::new();
    match obj {
        Object::String(s) => {
            out.push(TYPE_STRING);
            put_string(&mut out, s);
        }
        Object::List(items) => {
            out.push(TYPE_LIST);
            put_len(&mut out, items.len() as u64);
            items.iter().for_each(|i| put_string(&mut out, i));
        }
        Object::Set(members) => {
            out.push(TYPE_SET);
            put_len(&mut out, members.len() as u64);
            members.iter().for_each(|m| put_string(&mut out, m));
        }
        Object::Hash(pairs) => {
            out.push(TYPE_HASH);
            put_len(&mut out, pairs.len() as u64);
            for (f, v) in pairs {
                put_string(&mut out, f);
                put_string(&mut out, v);
            }
        }
        Object::ZSet(pairs) => {
            out.push(TYPE_ZSET_2);
            put_len(&mut out, pairs.len() as u64);
            for (m, score) in pairs {
                put_string(&mut out, m);
                out.extend_from_slice(&score.to_le_bytes());
            }
        }
    }
    seal(out)
}

/// Appends the version and the checksum to an encoded value.
pub fn seal(mut value: Vec<u8>) -> Vec<u8> {
    value.extend_from_slice(&RDB_VERSION.to_le_bytes());
    let crc = crc64(0, &value);
    value.extend_from_slice(&crc.to_le_bytes());
    value
}

/// The value bytes of a payload whose footer is sound: Redis's `verifyDumpPayload`.
pub fn verify(payload: &[u8]) -> Result<&[u8]> {
    if payload.len() < FOOTER_LEN {
        return Err(DecodeError::VersionOrChecksum);
    }
    let (value, footer) = payload.split_at(payload.len() - FOOTER_LEN);
    let version = u16::from_le_bytes([footer[0], footer[1]]);
    if version > RDB_VERSION {
        return Err(DecodeError::VersionOrChecksum);
    }
    let mut crc = [0u8; 8];
    crc.copy_from_slice(&footer[2..]);
    if crc64(0, &payload[..payload.len() - 8]) != u64::from_le_bytes(crc) {
        return Err(DecodeError::VersionOrChecksum);
    }
    Ok(value)
}

/// The value a payload carries, fully validated (see the module doc), within the budget.
pub fn decode(payload: &[u8]) -> Result<Object> {
    decode_within(
        payload,
        Budget {
            elements_left: ELEMENTS_MAX,
            bytes_left: DECODED_BYTES_MAX,
        },
    )
}

/// [`decode`] within `budget`.
fn decode_within(payload: &[u8], budget: Budget) -> Result<Object> {
    let value = verify(payload)?;
    let mut r = Reader {
        buf: value,
        pos: 0,
        budget,
    };
    let kind = r.byte()?;
    let obj = r.object(kind)?;
    let (len, unique) = match &obj {
        Object::String(_) => return Ok(obj),
        Object::List(items) => (items.len(), true),
        Object::Set(members) => (members.len(), distinct(members.iter())),
        Object::Hash(pairs) => (pairs.len(), distinct(pairs.iter().map(|(f, _)| f))),
        Object::ZSet(pairs) => (pairs.len(), distinct(pairs.iter().map(|(m, _)| m))),
    };
    // Redis never keeps an empty collection, and refuses duplicate members or fields.
    if len == 0 || !unique {
        return Err(DecodeError::BadData);
    }
    Ok(obj)
}

fn distinct<'a>(mut items: impl Iterator<Item = &'a Bytes>) -> bool {
    let mut seen = HashSet::new();
    items.all(|i| seen.insert(i))
}

/// An RDB length (`rdbSaveLen`): 6 bits, 14 bits, or a marker byte and 32 or 64 bits
/// big-endian.
fn put_len(out: &mut Vec<u8>, n: u64) {
    if n < 1 << 6 {
        out.push(n as u8);
    } else if n < 1 << 14 {
        out.push(0x40 | (n >> 8) as u8);
        out.push(n as u8);
    } else if let Ok(n) = u32::try_from(n) {
        out.push(0x80);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(0x81);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// An RDB string: Redis's integer encoding when the bytes are the canonical decimal form of an
/// integer that fits 32 bits (`rdbTryIntegerEncoding`), else the length and the bytes.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    if let Some(n) = canonical_int(s) {
        if let Ok(n) = i8::try_from(n) {
            out.extend_from_slice(&[0xc0 | ENC_INT8, n as u8]);
            return;
        }
        if let Ok(n) = i16::try_from(n) {
            out.push(0xc0 | ENC_INT16);
            out.extend_from_slice(&n.to_le_bytes());
            return;
        }
        if let Ok(n) = i32::try_from(n) {
            out.push(0xc0 | ENC_INT32);
            out.extend_from_slice(&n.to_le_bytes());
            return;
        }
    }
    put_len(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// The integer `s` spells, when `s` is exactly how Redis prints it.
fn canonical_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let n = crate::format::parse_int(s)?;
    (n.to_string().as_bytes() == s).then_some(n)
}

fn int_string(n: i64) -> Bytes {
    Bytes::from(n.to_string())
}

/// What a payload may still decode into (see the module doc's budget).
#[derive(Debug, Clone, Copy)]
struct Budget {
    elements_left: usize,
    bytes_left: usize,
}

impl Budget {
    /// Charges `n` bytes that are not an element (LZF's output for a container or a string).
    fn bytes(&mut self, n: usize) -> Result<()> {
        self.bytes_left = self
            .bytes_left
            .checked_sub(n)
            .ok_or(DecodeError::TooLarge)?;
        Ok(())
    }

    /// Charges one element of `len` bytes.
    fn element(&mut self, len: usize) -> Result<()> {
        self.elements_left = self
            .elements_left
            .checked_sub(1)
            .ok_or(DecodeError::TooManyElements)?;
        self.bytes(len.saturating_add(ELEMENT_OVERHEAD))
    }

    /// A capacity for a declared count of `n` elements: never more than may still be decoded,
    /// so a count the payload does not back reserves nothing past the budget.
    fn capacity(&self, n: usize) -> usize {
        n.min(self.elements_left)
    }
}

/// A position in a payload's value bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    budget: Budget,
}

/// How a string read from the payload is charged to the budget.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// An element: one of [`ELEMENTS_MAX`], its length and [`ELEMENT_OVERHEAD`].
    Element,
    /// A container (listpack, ziplist, intset) or a string value: only what LZF produces (the
    /// container's elements are charged as it is walked; a plain one lies in the payload).
    Blob,
}

enum Len {
    Plain(u64),
    /// A string in a special encoding (`ENC_*`).
    Encoded(u8),
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::BadData)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// `rdbLoadLenByRef`.
    fn len_or_encoding(&mut self) -> Result<Len> {
        let b = self.byte()?;
        Ok(match b >> 6 {
            0 => Len::Plain((b & 0x3f) as u64),
            1 => Len::Plain(((b & 0x3f) as u64) << 8 | self.byte()? as u64),
            3 => Len::Encoded(b & 0x3f),
            _ => match b {
                0x80 => Len::Plain(u32::from_be_bytes(self.array()?) as u64),
                0x81 => Len::Plain(u64::from_be_bytes(self.array()?)),
                _ => return Err(DecodeError::BadData),
            },
        })
    }

    fn length(&mut self) -> Result<u64> {
        match self.len_or_encoding()? {
            Len::Plain(n) => Ok(n),
            Len::Encoded(_) => Err(DecodeError::BadData),
        }
    }

    /// A count of items that each take at least `bytes_min` of the bytes that remain: a huge
    /// declared count is refused before anything is allocated for it.
    fn count(&mut self, bytes_min: usize) -> Result<usize> {
        let n = self.length()?;
        if n > (self.remaining() / bytes_min) as u64 {
            return Err(DecodeError::BadData);
        }
        Ok(n as usize)
    }

    /// An element: a string charged as one.
    fn element(&mut self) -> Result<Bytes> {
        self.string(Charge::Element)
    }

    /// A container or a string value (see [`Charge::Blob`]).
    fn blob(&mut self) -> Result<Bytes> {
        self.string(Charge::Blob)
    }

    /// `rdbGenericLoadStringObject`, charged as `charge` says before its bytes are copied or
    /// decompressed.
    fn string(&mut self, charge: Charge) -> Result<Bytes> {
        let int = |r: &mut Self, n: i64| -> Result<Bytes> {
            let s = int_string(n);
            if charge == Charge::Element {
                r.budget.element(s.len())?;
            }
            Ok(s)
        };
        match self.len_or_encoding()? {
            Len::Plain(n) => {
                let n = usize::try_from(n).map_err(|_| DecodeError::BadData)?;
                let s = self.take(n)?;
                if charge == Charge::Element {
                    self.budget.element(n)?;
                }
                Ok(Bytes::copy_from_slice(s))
            }
            Len::Encoded(ENC_INT8) => {
                let n = i8::from_le_bytes(self.array()?);
                int(self, n as i64)
            }
            Len::Encoded(ENC_INT16) => {
                let n = i16::from_le_bytes(self.array()?);
                int(self, n as i64)
            }
            Len::Encoded(ENC_INT32) => {
                let n = i32::from_le_bytes(self.array()?);
                int(self, n as i64)
            }
            Len::Encoded(ENC_LZF) => {
                let compressed_len = self.length()?;
                let len = self.length()?;
                let compressed_len =
                    usize::try_from(compressed_len).map_err(|_| DecodeError::BadData)?;
                let compressed = self.take(compressed_len)?;
                // No LZF stream expands more than 88 times (3 bytes name 264): a longer
                // declared output is malformed, as Redis finds; a possible one past the
                // budget is capdb's limit.
                if len > (compressed_len as u64).saturating_mul(LZF_EXPANSION_MAX) {
                    return Err(DecodeError::BadData);
                }
                let len = usize::try_from(len).map_err(|_| DecodeError::TooLarge)?;
                match charge {
                    Charge::Element => self.budget.element(len)?,
                    Charge::Blob => self.budget.bytes(len)?,
                }
                if len == 0 {
                    // Redis compares lzf_decompress's answer (0 on failure) with the length.
                    return Ok(Bytes::new());
                }
                lzf::decompress(compressed, len)
                    .map(Bytes::from)
                    .ok_or(DecodeError::BadData)
            }
            Len::Encoded(_) => Err(DecodeError::BadData),
        }
    }

    /// A score written as text (type 3): a length byte (253 NaN, 254 +inf, 255 -inf), then
    /// that many bytes of `%.17g`.
    fn text_score(&mut self) -> Result<f64> {
        let score = match self.byte()? {
            255 => f64::NEG_INFINITY,
            254 => f64::INFINITY,
            253 => f64::NAN,
            n => std::str::from_utf8(self.take(n as usize)?)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or(DecodeError::BadData)?,
        };
        not_nan(score)
    }

    fn binary_score(&mut self) -> Result<f64> {
        not_nan(f64::from_le_bytes(self.array()?))
    }

    /// A sorted set member's score, charged as an element (ZADD's argument).
    fn score(&mut self, text: bool) -> Result<f64> {
        let score = if text {
            self.text_score()?
        } else {
            self.binary_score()?
        };
        self.budget.element(SCORE_TEXT_MAX)?;
        Ok(score)
    }

    /// The value of RDB object type `kind` (`rdbLoadObject`).
    fn object(&mut self, kind: u8) -> Result<Object> {
        Ok(match kind {
            TYPE_STRING => Object::String(self.blob()?),
            TYPE_LIST => Object::List(self.strings()?),
            TYPE_SET => Object::Set(self.strings()?),
            TYPE_ZSET | TYPE_ZSET_2 => {
                let n = self.count(if kind == TYPE_ZSET { 2 } else { 9 })?;
                let mut pairs = Vec::with_capacity(self.budget.capacity(n));
                for _ in 0..n {
                    let member = self.element()?;
                    let score = self.score(kind == TYPE_ZSET)?;
                    pairs.push((member, score));
                }
                Object::ZSet(pairs)
            }
            TYPE_HASH => {
                let n = self.count(2)?;
                let mut pairs = Vec::with_capacity(self.budget.capacity(n));
                for _ in 0..n {
                    pairs.push((self.element()?, self.element()?));
                }
                Object::Hash(pairs)
            }
            TYPE_SET_INTSET => {
                let blob = self.blob()?;
                Object::Set(intset(&blob, &mut self.budget)?)
            }
            TYPE_LIST_ZIPLIST => {
                let blob = self.blob()?;
                Object::List(ziplist(&blob, &mut self.budget)?)
            }
            TYPE_HASH_ZIPLIST => {
                let blob = self.blob()?;
                Object::Hash(pairs(ziplist(&blob, &mut self.budget)?)?)
            }
            TYPE_HASH_LISTPACK => {
                let blob = self.blob()?;
                Object::Hash(pairs(listpack(&blob, &mut self.budget)?)?)
            }
            TYPE_ZSET_LISTPACK | TYPE_ZSET_ZIPLIST => {
                let blob = self.blob()?;
                let entries = if kind == TYPE_ZSET_LISTPACK {
                    listpack(&blob, &mut self.budget)?
                } else {
                    ziplist(&blob, &mut self.budget)?
                };
                let mut scored = Vec::with_capacity(entries.len() / 2);
                for (member, score) in pairs(entries)? {
                    // Integers are stored as integers, other scores as `%.17g` text.
                    let score = std::str::from_utf8(&score)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .ok_or(DecodeError::BadData)?;
                    scored.push((member, not_nan(score)?));
                }
                Object::ZSet(scored)
            }
            TYPE_LIST_QUICKLIST => {
                let nodes = self.count(1)?;
                let mut items = Vec::new();
                for _ in 0..nodes {
                    let blob = self.blob()?;
                    items.extend(ziplist(&blob, &mut self.budget)?);
                }
                Object::List(items)
            }
            TYPE_LIST_QUICKLIST_2 => {
                let nodes = self.count(2)?;
                let mut items = Vec::new();
                for _ in 0..nodes {
                    match self.length()? {
                        NODE_PLAIN => items.push(self.element()?),
                        // An empty node is skipped, as Redis skips it.
                        NODE_PACKED => {
                            let blob = self.blob()?;
                            items.extend(listpack(&blob, &mut self.budget)?);
                        }
                        _ => return Err(DecodeError::BadData),
                    }
                }
                Object::List(items)
            }
            _ => return Err(DecodeError::BadData),
        })
    }

    /// A count, then that many strings.
    fn strings(&mut self) -> Result<Vec<Bytes>> {
        let n = self.count(1)?;
        let mut out = Vec::with_capacity(self.budget.capacity(n));
        for _ in 0..n {
            out.push(self.element()?);
        }
        Ok(out)
    }
}

fn not_nan(score: f64) -> Result<f64> {
    if score.is_nan() {
        Err(DecodeError::BadData)
    } else {
        Ok(score)
    }
}

/// Consecutive entries as (field, value) pairs; an odd count is malformed.
fn pairs(entries: Vec<Bytes>) -> Result<Vec<(Bytes, Bytes)>> {
    if !entries.len().is_multiple_of(2) {
        return Err(DecodeError::BadData);
    }
    let mut out = Vec::with_capacity(entries.len() / 2);
    let mut it = entries.into_iter();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((a, b));
    }
    Ok(out)
}

/// An intset's members as decimal strings: a header (element width 2, 4 or 8 bytes; count),
/// then the elements little-endian, strictly ascending.
fn intset(blob: &[u8], budget: &mut Budget) -> Result<Vec<Bytes>> {
    let bad = DecodeError::BadData;
    let header = blob.get(..8).ok_or(bad)?;
    let width = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as u64;
    if ![2, 4, 8].contains(&width) || 8 + count * width as u64 != blob.len() as u64 {
        return Err(bad);
    }
    let mut out = Vec::with_capacity(budget.capacity(count as usize));
    let mut last: Option<i64> = None;
    for raw in blob[8..].chunks_exact(width) {
        let n = match *raw {
            [a, b] => i16::from_le_bytes([a, b]) as i64,
            [a, b, c, d] => i32::from_le_bytes([a, b, c, d]) as i64,
            [a, b, c, d, e, f, g, h] => i64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return Err(bad),
        };
        if last.is_some_and(|l| l >= n) {
            return Err(bad);
        }
        last = Some(n);
        let s = int_string(n);
        budget.element(s.len())?;
        out.push(s);
    }
    Ok(out)
}

/// A listpack's entries, integers as decimal strings. Layout: total bytes (u32 LE), entry count
/// (u16 LE, 65535 when unknown), entries, the terminator `0xff`; each entry is an encoding byte,
/// its data, and its back-length (the entry's length, written to be read backwards).
fn listpack(blob: &[u8], budget: &mut Budget) -> Result<Vec<Bytes>> {
    let bad = DecodeError::BadData;
    if blob.len() < 7
        || u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize != blob.len()
    {
        return Err(bad);
    }
    let declared = u16::from_le_bytes([blob[4], blob[5]]);
    let mut at = 6;
    let mut out = Vec::new();
    loop {
        let rest = blob.get(at..).ok_or(bad)?;
        if rest.first() == Some(&0xff) {
            if rest.len() != 1 {
                return Err(bad);
            }
            break;
        }
        let (len, value) = lp_entry(rest)?;
        let (back, back_len) = lp_backlen(len);
        if rest.get(len..len + back_len) != Some(&back[..back_len]) {
            return Err(bad);
        }
        budget.element(value.len())?;
        out.push(value);
        at += len + back_len;
    }
    if declared != u16::MAX && declared as usize != out.len() {
        return Err(bad);
    }
    Ok(out)
}

/// One listpack entry at the start of `e`: its length (encoding and data, without the
/// back-length) and its value.
fn lp_entry(e: &[u8]) -> Result<(usize, Bytes)> {
    let bad = DecodeError::BadData;
    let b = *e.first().ok_or(bad)?;
    let text = |from: usize, n: usize| -> Result<(usize, Bytes)> {
        let end = from.checked_add(n).ok_or(bad)?;
        Ok((end, Bytes::copy_from_slice(e.get(from..end).ok_or(bad)?)))
    };
    let fixed = |n: usize| e.get(1..1 + n).ok_or(bad);
    if b & 0x80 == 0 {
        return Ok((1, int_string((b & 0x7f) as i64)));
    }
    if b & 0xc0 == 0x80 {
        return text(1, (b & 0x3f) as usize);
    }
    if b & 0xe0 == 0xc0 {
        let u = ((b & 0x1f) as u16) << 8 | *e.get(1).ok_or(bad)? as u16;
        // Thirteen bits, two's complement.
        return Ok((2, int_string(((u << 3) as i16 >> 3) as i64)));
    }
    if b & 0xf0 == 0xe0 {
        return text(
            2,
            ((b & 0x0f) as usize) << 8 | *e.get(1).ok_or(bad)? as usize,
        );
    }
    match b {
        0xf0 => {
            let n = fixed(4)?;
            text(5, u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize)
        }
        0xf1 => {
            let n = fixed(2)?;
            Ok((3, int_string(i16::from_le_bytes([n[0], n[1]]) as i64)))
        }
        0xf2 => {
            let n = fixed(3)?;
            let v = i32::from_le_bytes([0, n[0], n[1], n[2]]) >> 8;
            Ok((4, int_string(v as i64)))
        }
        0xf3 => {
            let n = fixed(4)?;
            Ok((
                5,
                int_string(i32::from_le_bytes([n[0], n[1], n[2], n[3]]) as i64),
            ))
        }
        0xf4 => {
            let n = fixed(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(n);
            Ok((9, int_string(i64::from_le_bytes(a))))
        }
        _ => Err(bad),
    }
}

/// A ziplist's entries (Redis 6 and older), integers as decimal strings. Layout: total bytes
/// (u32 LE), offset of the last entry (u32 LE), entry count (u16 LE, 65535 when unknown),
/// entries, the terminator `0xff`; each entry is the previous entry's length (1 byte, or `0xfe`
/// and 4 bytes LE), an encoding, and its data.
fn ziplist(blob: &[u8], budget: &mut Budget) -> Result<Vec<Bytes>> {
    let bad = DecodeError::BadData;
    let u32_at = |i: usize| -> Result<usize> {
        let b = blob.get(i..i + 4).ok_or(bad)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if blob.len() < 11 || u32_at(0)? != blob.len() {
        return Err(bad);
    }
    let tail = u32_at(4)?;
    let declared = u16::from_le_bytes([blob[8], blob[9]]);
    let (mut at, mut prev_len, mut last_at) = (10, 0usize, 10);
    let mut out = Vec::new();
    loop {
        let rest = blob.get(at..).ok_or(bad)?;
        let first = *rest.first().ok_or(bad)?;
        if first == 0xff {
            if rest.len() != 1 {
                return Err(bad);
            }
            break;
        }
        let (prev, header) = if first < 0xfe {
            (first as usize, 1)
        } else if first == 0xfe {
            (u32_at(at + 1)?, 5)
        } else {
            return Err(bad);
        };
        if prev != prev_len {
            return Err(bad);
        }
        let (len, value) = zl_entry(&rest[header..])?;
        last_at = at;
        prev_len = header + len;
        at += prev_len;
        budget.element(value.len())?;
        out.push(value);
    }
    if tail != last_at || (declared != u16::MAX && declared as usize != out.len()) {
        return Err(bad);
    }
    Ok(out)
}

/// One ziplist entry after its previous-length field: its length (encoding and data) and
/// value.
fn zl_entry(e: &[u8]) -> Result<(usize, Bytes)> {
    let bad = DecodeError::BadData;
    let b = *e.first().ok_or(bad)?;
    let text = |from: usize, n: usize| -> Result<(usize, Bytes)> {
        let end = from.checked_add(n).ok_or(bad)?;
        Ok((end, Bytes::copy_from_slice(e.get(from..end).ok_or(bad)?)))
    };
    let int = |n: usize| -> Result<i64> {
        let d = e.get(1..1 + n).ok_or(bad)?;
        let mut a = [0u8; 8];
        a[8 - n..].copy_from_slice(d);
        // Little-endian in the ziplist: placed in the high bytes, then shifted down (signed).
        let v = i64::from_le_bytes(a);
        Ok(v >> (8 * (8 - n)))
    };
    match b >> 6 {
        0 => return text(1, (b & 0x3f) as usize),
        1 => {
            return text(
                2,
                ((b & 0x3f) as usize) << 8 | *e.get(1).ok_or(bad)? as usize,
            );
        }
        2 if b == 0x80 => {
            let n = e.get(1..5).ok_or(bad)?;
            return text(5, u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize);
        }
        2 => return Err(bad),
        _ => {}
    }
    let (n, v) = match b {
        0xc0 => (2, int(2)?),
        0xd0 => (4, int(4)?),
        0xe0 => (8, int(8)?),
        0xf0 => (3, int(3)?),
        0xfe => (1, int(1)?),
        0xf1..=0xfd => (0, (b & 0x0f) as i64 - 1),
        _ => return Err(bad),
    };
    Ok((1 + n, int_string(v)))
}

/// A listpack back-length (`lpEncodeBacklen`): `len` in 7-bit groups, most significant first,
/// every byte but the first with its high bit set.
fn lp_backlen(len: usize) -> ([u8; 5], usize) {
    let n = match len {
        0..=127 => 1,
        128..16383 => 2,
        16383..2097151 => 3,
        2097151..268435455 => 4,
        _ => 5,
    };
    let mut b = [0u8; 5];
    for (i, byte) in b.iter_mut().take(n).enumerate() {
        let shift = 7 * (n - 1 - i);
        let group = ((len >> shift) & 0x7f) as u8;
        *byte = if i == 0 {
            (len >> shift) as u8
        } else {
            group | 0x80
        };
    }
    (b, n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// DUMP payloads from redis-server 7.0.15 (`redis-cli --no-raw`, hex).
    pub(crate) const REDIS: &[(&str, &str)] = &[
        ("s", "000568656c6c6f0a006372df766534200a"),
        ("i", "00c139300a009d94ea2793fc08b9"),
        ("big", "000c3330303030303030303030300a003aed26f6c1bb060d"),
        ("neg", "00c0fb0a0049c4c6f4d7263f68"),
        (
            "lz",
            "00c30e4046016161e03000016263a0020162630a00519758e336b15810",
        ),
        (
            "l",
            "120102171700000005008161028162020101ded402f270110104ff0a00a692bfe23f431b0d",
        ),
        (
            "si",
            "0b100200000004000000f9ff0100020003000a003bfa4a3923b1fa84",
        ),
        ("ss", "02030162016301610a00b294da2e4ecda6fc"),
        (
            "h",
            "1013130000000400816602817602826632037b01ff0a003a4aa3f1de234b6b",
        ),
        (
            "z",
            "111d1d0000000600816302842d696e660581610283312e35048162020201ff0a0017dce91ab8436c89",
        ),
    ];

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn redis(name: &str) -> Vec<u8> {
        hex(REDIS.iter().find(|(n, _)| *n == name).unwrap().1)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn bs(items: &[&str]) -> Vec<Bytes> {
        items.iter().map(|s| b(s)).collect()
    }

    /// A listpack of `entries` as strings (test fixtures; capdb never writes listpacks).
    pub(crate) fn lp_of(entries: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for e in entries {
            let start = body.len();
            if e.len() < 64 {
                body.push(0x80 | e.len() as u8);
            } else if e.len() < 4096 {
                body.push(0xe0 | (e.len() >> 8) as u8);
                body.push(e.len() as u8);
            } else {
                body.push(0xf0);
                body.extend_from_slice(&(e.len() as u32).to_le_bytes());
            }
            body.extend_from_slice(e);
            let (back, n) = lp_backlen(body.len() - start);
            body.extend_from_slice(&back[..n]);
        }
        let mut lp = Vec::new();
        lp.extend_from_slice(&((body.len() + 7) as u32).to_le_bytes());
        lp.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        lp.extend_from_slice(&body);
        lp.push(0xff);
        lp
    }

    /// A sealed payload of a type byte and raw value bytes.
    fn raw(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(value);
        seal(v)
    }

    /// A sealed payload of a type byte and one RDB string.
    fn with_blob(kind: u8, blob: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        put_string(&mut v, blob);
        seal(v)
    }

    #[test]
    fn reads_what_redis_7_0_dumps() {
        assert_eq!(decode(&redis("s")).unwrap(), Object::String(b("hello")));
        assert_eq!(decode(&redis("i")).unwrap(), Object::String(b("12345")));
        assert_eq!(
            decode(&redis("big")).unwrap(),
            Object::String(b("300000000000"))
        );
        assert_eq!(decode(&redis("neg")).unwrap(), Object::String(b("-5")));
        let lz = format!("{}{}", "a".repeat(59), "bcabcabcabc");
        assert_eq!(decode(&redis("lz")).unwrap(), Object::String(b(&lz)));
        assert_eq!(
            decode(&redis("l")).unwrap(),
            Object::List(bs(&["a", "b", "1", "-300", "70000"]))
        );
        assert_eq!(
            decode(&redis("si")).unwrap(),
            Object::Set(bs(&["-7", "1", "2", "3"]))
        );
        assert_eq!(
            decode(&redis("ss")).unwrap(),
            Object::Set(bs(&["b", "c", "a"]))
        );
        assert_eq!(
            decode(&redis("h")).unwrap(),
            Object::Hash(vec![(b("f"), b("v")), (b("f2"), b("123"))])
        );
        assert_eq!(
            decode(&redis("z")).unwrap(),
            Object::ZSet(vec![
                (b("c"), f64::NEG_INFINITY),
                (b("a"), 1.5),
                (b("b"), 2.0)
            ])
        );
    }

    #[test]
    fn what_it_writes_reads_back() {
        let objects = [
            Object::String(b("")),
            Object::String(b("hello")),
            Object::String(b("-2147483648")),
            Object::String(b("2147483648")),
            Object::String(b("007")),
            Object::String(b("-0")),
            Object::String(Bytes::from(vec![7u8; 20_000])),
            Object::List(bs(&["a", "", "1", "a"])),
            Object::Set(bs(&["1", "x", "-3"])),
            Object::Hash(vec![(b("f"), b("1")), (b(""), b(""))]),
            Object::ZSet(vec![
                (b("a"), -0.0),
                (b("b"), f64::INFINITY),
                (b("c"), 5e-324),
                (b("d"), 0.1),
            ]),
        ];
        for obj in objects {
            let payload = encode(&obj);
            assert_eq!(decode(&payload).unwrap(), obj);
        }
        // A long list takes 14- and 32-bit lengths.
        let long: Vec<Bytes> = (0..70_000).map(|i| Bytes::from(format!("e{i}"))).collect();
        let obj = Object::List(long);
        assert_eq!(decode(&encode(&obj)).unwrap(), obj);
    }

    #[test]
    fn writes_integers_as_redis_does() {
        // Redis's own bytes for "12345" and "-5" (int16 and int8 encodings).
        assert_eq!(encode(&Object::String(b("12345"))), redis("i"));
        assert_eq!(encode(&Object::String(b("-5"))), redis("neg"));
        assert_eq!(encode(&Object::String(b("hello"))), redis("s"));
        // Past 32 bits: plain, as Redis writes it.
        assert_eq!(encode(&Object::String(b("300000000000"))), redis("big"));
    }

    #[test]
    fn refuses_a_bad_footer() {
        let good = redis("s");
        assert_eq!(decode(&good[..9]), Err(DecodeError::VersionOrChecksum));
        assert_eq!(decode(b""), Err(DecodeError::VersionOrChecksum));
        // Any flipped bit, in the value or the footer.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                decode(&bad),
                Err(DecodeError::VersionOrChecksum),
                "byte {i}"
            );
        }
        // A newer RDB version, correctly sealed.
        let mut newer = good[..good.len() - 10].to_vec();
        newer.extend_from_slice(&11u16.to_le_bytes());
        let crc = crc64(0, &newer);
        newer.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&newer), Err(DecodeError::VersionOrChecksum));
    }

    #[test]
    fn refuses_truncated_values() {
        // Every prefix of every Redis value, resealed: never a panic, always an error.
        for (name, payload) in REDIS {
            let payload = hex(payload);
            let value = &payload[..payload.len() - 10];
            for cut in 0..value.len() {
                let got = decode(&seal(value[..cut].to_vec()));
                assert!(got.is_err(), "{name} cut at {cut}: {got:?}");
            }
        }
    }

    #[test]
    fn refuses_huge_declared_lengths_without_allocating() {
        // A string of 2^64-1 bytes, a list of 2^32-1 elements, a 32-bit length: all refused
        // before any allocation.
        let mut huge = vec![0x81];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(decode(&raw(TYPE_STRING, &huge)), Err(DecodeError::BadData));
        let mut many = vec![0x80];
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&raw(TYPE_LIST, &many)), Err(DecodeError::BadData));
        assert_eq!(decode(&raw(TYPE_HASH, &many)), Err(DecodeError::BadData));
        assert_eq!(decode(&raw(TYPE_ZSET_2, &many)), Err(DecodeError::BadData));
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &many)),
            Err(DecodeError::BadData)
        );
        // LZF declaring 2^40 bytes of output from 2 bytes of input: more than any stream of 2
        // bytes makes (Redis: Bad data format too).
        let mut lzf = vec![0xc3, 0x02, 0x81];
        lzf.extend_from_slice(&(1u64 << 40).to_be_bytes());
        lzf.extend_from_slice(&[0x00, b'a']);
        assert_eq!(decode(&raw(TYPE_STRING, &lzf)), Err(DecodeError::BadData));
        // LZF strings that each expand legitimately (one literal, then 378 back references
        // of 264 bytes: 99,793 bytes from 1,136), refused once together they pass the budget.
        let mut stream = vec![0x00, b'a'];
        for _ in 0..378 {
            stream.extend_from_slice(&[0xe0, 0xff, 0x00]);
        }
        let lzf_string = |out: &mut Vec<u8>| {
            out.push(0xc0 | ENC_LZF);
            put_len(out, stream.len() as u64);
            put_len(out, 99_793);
            out.extend_from_slice(&stream);
        };
        let mut list = vec![3];
        (0..3).for_each(|_| lzf_string(&mut list));
        let payload = raw(TYPE_LIST, &list);
        // Each element costs its length and the overhead, once (LZF produced it).
        let cost = 3 * (99_793 + ELEMENT_OVERHEAD);
        let budget = |bytes_left| Budget {
            elements_left: ELEMENTS_MAX,
            bytes_left,
        };
        let Object::List(items) = decode_within(&payload, budget(cost)).unwrap() else {
            panic!("a list")
        };
        assert!(
            items
                .iter()
                .all(|i| i.len() == 99_793 && i.iter().all(|&c| c == b'a'))
        );
        assert_eq!(
            decode_within(&payload, budget(cost - 1)),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn refuses_what_redis_refuses() {
        // Empty collections.
        assert_eq!(decode(&raw(TYPE_LIST, &[0])), Err(DecodeError::BadData));
        assert_eq!(decode(&raw(TYPE_SET, &[0])), Err(DecodeError::BadData));
        assert_eq!(decode(&raw(TYPE_HASH, &[0])), Err(DecodeError::BadData));
        assert_eq!(decode(&raw(TYPE_ZSET_2, &[0])), Err(DecodeError::BadData));
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &[0])),
            Err(DecodeError::BadData)
        );
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &{
                let mut v = vec![1, NODE_PACKED as u8];
                put_string(&mut v, &lp_of(&[]));
                v
            })),
            Err(DecodeError::BadData)
        );
        // Duplicates.
        let dup_set = encode(&Object::Set(bs(&["a", "a"])));
        assert_eq!(decode(&dup_set), Err(DecodeError::BadData));
        let dup_hash = encode(&Object::Hash(vec![(b("f"), b("1")), (b("f"), b("2"))]));
        assert_eq!(decode(&dup_hash), Err(DecodeError::BadData));
        let dup_zset = encode(&Object::ZSet(vec![(b("m"), 1.0), (b("m"), 2.0)]));
        assert_eq!(decode(&dup_zset), Err(DecodeError::BadData));
        assert_eq!(
            decode(&with_blob(
                TYPE_HASH_LISTPACK,
                &lp_of(&[b"f", b"1", b"f", b"2"])
            )),
            Err(DecodeError::BadData)
        );
        // NaN scores, binary and text.
        let nan = encode(&Object::ZSet(vec![(b("m"), f64::NAN)]));
        assert_eq!(decode(&nan), Err(DecodeError::BadData));
        assert_eq!(
            decode(&raw(TYPE_ZSET, &[1, 1, b'm', 253])),
            Err(DecodeError::BadData)
        );
        // Unknown and unsupported types (streams, modules, zipmaps).
        for kind in [6, 7, 9, 15, 19, 20, 200] {
            assert_eq!(
                decode(&raw(kind, &[0])),
                Err(DecodeError::BadData),
                "{kind}"
            );
        }
        // An unknown quicklist node container.
        let mut node = vec![1, 3];
        put_string(&mut node, b"x");
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &node)),
            Err(DecodeError::BadData)
        );
    }

    #[test]
    fn reads_the_other_encodings() {
        // Type 3 sorted set: text scores and the infinities' codes.
        let mut z = vec![3];
        z.extend_from_slice(&[1, b'a', 3, b'1', b'.', b'5']);
        z.extend_from_slice(&[1, b'b', 254]);
        z.extend_from_slice(&[1, b'c', 255]);
        assert_eq!(
            decode(&raw(TYPE_ZSET, &z)).unwrap(),
            Object::ZSet(vec![
                (b("a"), 1.5),
                (b("b"), f64::INFINITY),
                (b("c"), f64::NEG_INFINITY)
            ])
        );
        // Quicklist with a plain node and a packed node.
        let mut ql = vec![2, NODE_PLAIN as u8];
        put_string(&mut ql, b"plain");
        ql.push(NODE_PACKED as u8);
        put_string(&mut ql, &lp_of(&[b"x", &[b'y'; 100], &[b'z'; 5000]]));
        let want = vec![
            b("plain"),
            b("x"),
            Bytes::from(vec![b'y'; 100]),
            Bytes::from(vec![b'z'; 5000]),
        ];
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &ql)).unwrap(),
            Object::List(want)
        );
        // A listpack with an unknown count (65535), and every integer encoding.
        let mut lp = vec![0, 0, 0, 0, 0xff, 0xff];
        for (entry, _) in [
            (&[0x05][..], 5),
            (&[0xdf, 0xff][..], -1),
            (&[0xc1, 0x00][..], 256),
            (&[0xf1, 0x00, 0x80][..], -32768),
            (&[0xf2, 0x00, 0x00, 0x80][..], -8388608),
            (&[0xf3, 0xff, 0xff, 0xff, 0x7f][..], i32::MAX as i64),
            (&[0xf4, 0, 0, 0, 0, 0, 0, 0, 0x80][..], i64::MIN),
        ] {
            lp.extend_from_slice(entry);
            let (back, n) = lp_backlen(entry.len());
            lp.extend_from_slice(&back[..n]);
        }
        lp.push(0xff);
        let total = lp.len() as u32;
        lp[..4].copy_from_slice(&total.to_le_bytes());
        let mut ql = vec![1, NODE_PACKED as u8];
        put_string(&mut ql, &lp);
        assert_eq!(
            decode(&raw(TYPE_LIST_QUICKLIST_2, &ql)).unwrap(),
            Object::List(bs(&[
                "5",
                "-1",
                "256",
                "-32768",
                "-8388608",
                "2147483647",
                "-9223372036854775808"
            ]))
        );
    }

    #[test]
    fn refuses_malformed_listpacks_and_intsets() {
        let good = lp_of(&[b"f", b"v"]);
        assert!(decode(&with_blob(TYPE_HASH_LISTPACK, &good)).is_ok());
        let mut cases: Vec<Vec<u8>> = Vec::new();
        // Wrong total, wrong count, a missing or early terminator, a bad back-length, an odd
        // number of entries, an unknown encoding byte, a string past the end.
        let mut c = good.clone();
        c[0] += 1;
        cases.push(c);
        let mut c = good.clone();
        c[4] = 3;
        cases.push(c);
        let mut c = good.clone();
        *c.last_mut().unwrap() = 0;
        cases.push(c);
        let mut c = good.clone();
        c[8] = 9;
        cases.push(c);
        cases.push(lp_of(&[b"f"]));
        let mut c = vec![0, 0, 0, 0, 1, 0, 0xf5, 1, 0xff];
        c[0] = c.len() as u8;
        cases.push(c);
        let mut c = vec![0, 0, 0, 0, 1, 0, 0x85, b'a', 0xff];
        c[0] = c.len() as u8;
        cases.push(c);
        let mut c = good.clone();
        let at = c.len() - 1;
        c.insert(at, 0xff);
        c[0] += 1;
        cases.push(c);
        for (i, blob) in cases.iter().enumerate() {
            assert_eq!(
                decode(&with_blob(TYPE_HASH_LISTPACK, blob)),
                Err(DecodeError::BadData),
                "case {i}"
            );
        }
        // Intsets: width 3, a size that does not match the count, unsorted, duplicate.
        for blob in [
            &[3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0][..],
            &[2, 0, 0, 0, 2, 0, 0, 0, 1, 0][..],
            &[2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 1, 0][..],
            &[2, 0, 0, 0, 2, 0, 0, 0, 1, 0, 1, 0][..],
            &[2, 0, 0, 0, 0, 0, 0, 0][..],
            &[2, 0, 0][..],
        ] {
            assert_eq!(
                decode(&with_blob(TYPE_SET_INTSET, blob)),
                Err(DecodeError::BadData)
            );
        }
    }

    /// A ziplist of raw entries (encoding and data each), with correct previous lengths,
    /// tail and count (test fixtures: Redis 6's encoding).
    fn zl_of_raw(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = Vec::new();
        let (mut prev, mut tail) = (0usize, 10usize);
        for e in entries {
            tail = 10 + body.len();
            let start = body.len();
            if prev < 254 {
                body.push(prev as u8);
            } else {
                body.push(0xfe);
                body.extend_from_slice(&(prev as u32).to_le_bytes());
            }
            body.extend_from_slice(e);
            prev = body.len() - start;
        }
        let mut zl = Vec::new();
        zl.extend_from_slice(&((body.len() + 11) as u32).to_le_bytes());
        zl.extend_from_slice(&(tail as u32).to_le_bytes());
        zl.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        zl.extend_from_slice(&body);
        zl.push(0xff);
        zl
    }

    /// A ziplist string entry.
    fn zl_str(s: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        if s.len() < 64 {
            e.push(s.len() as u8);
        } else if s.len() < 16384 {
            e.push(0x40 | (s.len() >> 8) as u8);
            e.push(s.len() as u8);
        } else {
            e.push(0x80);
            e.extend_from_slice(&(s.len() as u32).to_be_bytes());
        }
        e.extend_from_slice(s);
        e
    }

    /// Ziplist payloads of every type that has one, as Redis 6 wrote them; checked to restore
    /// in redis-server 7.0.15 with these contents.
    pub(crate) fn ziplist_payloads() -> Vec<(Vec<u8>, Object)> {
        let ints: Vec<Vec<u8>> = vec![
            vec![0xf1],                                                 // 0
            vec![0xfd],                                                 // 12
            vec![0xfe, 0x80],                                           // -128
            vec![0xc0, 0x00, 0x80],                                     // -32768
            vec![0xf0, 0xff, 0xff, 0x7f],                               // 8388607
            vec![0xd0, 0x00, 0x00, 0x00, 0x80],                         // i32::MIN
            vec![0xe0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // i64::MAX
        ];
        let long = vec![b'x'; 300];
        let mut list_entries = vec![zl_str(b"a"), zl_str(&long)];
        list_entries.extend(ints);
        let list_values = bs(&[
            "a",
            &"x".repeat(300),
            "0",
            "12",
            "-128",
            "-32768",
            "8388607",
            "-2147483648",
            "9223372036854775807",
        ]);
        let with = |kind: u8, blobs: &[Vec<u8>], count: Option<u8>| {
            let mut v = vec![kind];
            if let Some(n) = count {
                v.push(n);
            }
            for b in blobs {
                put_string(&mut v, b);
            }
            seal(v)
        };
        let list = zl_of_raw(&list_entries);
        let node2 = zl_of_raw(&[zl_str(b"last")]);
        let mut quick = list_values.clone();
        quick.push(b("last"));
        let hash = zl_of_raw(&[zl_str(b"f"), zl_str(b"v"), zl_str(b"n"), vec![0xf3]]);
        let zset = zl_of_raw(&[zl_str(b"a"), zl_str(b"1.5"), zl_str(b"b"), vec![0xf3]]);
        vec![
            (
                with(TYPE_LIST_ZIPLIST, std::slice::from_ref(&list), None),
                Object::List(list_values),
            ),
            (
                with(TYPE_LIST_QUICKLIST, &[list, node2], Some(2)),
                Object::List(quick),
            ),
            (
                with(TYPE_HASH_ZIPLIST, &[hash], None),
                Object::Hash(vec![(b("f"), b("v")), (b("n"), b("2"))]),
            ),
            (
                with(TYPE_ZSET_ZIPLIST, &[zset], None),
                Object::ZSet(vec![(b("a"), 1.5), (b("b"), 2.0)]),
            ),
        ]
    }

    #[test]
    fn reads_redis_6_ziplists() {
        for (payload, want) in ziplist_payloads() {
            assert_eq!(decode(&payload).unwrap(), want);
        }
        let good = zl_of_raw(&[zl_str(b"a"), zl_str(b"b")]);
        assert!(decode(&with_blob(TYPE_LIST_ZIPLIST, &good)).is_ok());
        // Wrong total, tail, count, previous length; an unknown encoding; no terminator; a
        // string past the end; empty.
        let mut cases = Vec::new();
        for (at, delta) in [(0, 1u8), (4, 1), (8, 1), (13, 1)] {
            let mut c = good.clone();
            c[at] = c[at].wrapping_add(delta);
            cases.push(c);
        }
        cases.push(zl_of_raw(&[vec![0xff - 0x0f + 0x0e]]));
        cases.push(zl_of_raw(&[vec![0x90]]));
        let mut c = good.clone();
        *c.last_mut().unwrap() = 0;
        cases.push(c);
        cases.push(zl_of_raw(&[vec![0x05, b'a']]));
        cases.push(zl_of_raw(&[]));
        for (i, blob) in cases.iter().enumerate() {
            assert_eq!(
                decode(&with_blob(TYPE_LIST_ZIPLIST, blob)),
                Err(DecodeError::BadData),
                "case {i}"
            );
        }
        // Every prefix of a good one, resealed.
        let (payload, _) = ziplist_payloads().remove(1);
        let value = &payload[..payload.len() - 10];
        for cut in 0..value.len() {
            assert!(
                decode(&seal(value[..cut].to_vec())).is_err(),
                "cut at {cut}"
            );
        }
    }

    /// The elements `obj` counts against [`ELEMENTS_MAX`].
    fn elements_of(obj: &Object) -> usize {
        match obj {
            Object::String(_) => 0,
            Object::List(v) | Object::Set(v) => v.len(),
            Object::Hash(v) => 2 * v.len(),
            Object::ZSet(v) => 2 * v.len(),
        }
    }

    /// The bytes `obj`'s elements are charged at least: their lengths and the overhead (a
    /// score's text, as long as a listpack's or at most [`SCORE_TEXT_MAX`], is left out).
    fn element_bytes_of(obj: &Object) -> usize {
        let lens: usize = match obj {
            Object::String(_) => 0,
            Object::List(v) | Object::Set(v) => v.iter().map(Bytes::len).sum(),
            Object::Hash(v) => v.iter().map(|(f, x)| f.len() + x.len()).sum(),
            Object::ZSet(v) => v.iter().map(|(m, _)| m.len()).sum(),
        };
        lens + ELEMENT_OVERHEAD * elements_of(obj)
    }

    #[test]
    fn every_encoding_charges_the_budget() {
        let mut payloads: Vec<Vec<u8>> = ["l", "si", "ss", "h", "z"]
            .iter()
            .map(|n| redis(n))
            .collect();
        payloads.extend(ziplist_payloads().into_iter().map(|(p, _)| p));
        payloads.push(encode(&Object::List(bs(&["a", "12", "-7", "long item"]))));
        payloads.push(encode(&Object::Set(bs(&["a", "b", "300000"]))));
        payloads.push(encode(&Object::Hash(vec![
            (b("f"), b("v")),
            (b("n"), b("1")),
        ])));
        payloads.push(encode(&Object::ZSet(vec![(b("a"), 1.5), (b("b"), 2.0)])));
        payloads.push(raw(TYPE_ZSET, &[2, 1, b'a', 1, b'1', 1, b'b', 254]));
        for (i, payload) in payloads.iter().enumerate() {
            let obj = decode(payload).unwrap();
            let n = elements_of(&obj);
            assert!(n > 0, "case {i}");
            let budget = |elements_left, bytes_left| Budget {
                elements_left,
                bytes_left,
            };
            // Exactly as many elements as it holds: refused with one fewer.
            assert_eq!(
                decode_within(payload, budget(n, DECODED_BYTES_MAX)).as_ref(),
                Ok(&obj),
                "case {i}"
            );
            assert_eq!(
                decode_within(payload, budget(n - 1, DECODED_BYTES_MAX)),
                Err(DecodeError::TooManyElements),
                "case {i}"
            );
            // The least byte budget it decodes within covers every element and its
            // overhead; one byte less is refused.
            let (mut lo, mut hi) = (0, DECODED_BYTES_MAX);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if decode_within(payload, budget(ELEMENTS_MAX, mid)).is_ok() {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            assert!(lo >= element_bytes_of(&obj), "case {i}: {lo}");
            assert_eq!(
                decode_within(payload, budget(ELEMENTS_MAX, lo - 1)),
                Err(DecodeError::TooLarge),
                "case {i}"
            );
        }
    }

    /// A listpack of `n` empty strings (`00 01` each: a 7-bit integer 0, its back-length),
    /// declaring its count unknown (65535), LZF-compressed: the header and one entry as a
    /// literal, then back references of 264 bytes copying the entries 2 bytes back. `n - 1`
    /// must be a multiple of 132. Returns the stream and the listpack's length.
    pub(crate) fn lzf_listpack_of_zeros(n: usize) -> (Vec<u8>, usize) {
        assert_eq!((n - 1) % 132, 0);
        let len = 6 + 2 * n + 1;
        let mut stream = vec![0x07];
        stream.extend_from_slice(&(len as u32).to_le_bytes());
        stream.extend_from_slice(&[0xff, 0xff, 0x00, 0x01]);
        for _ in 0..(n - 1) / 132 {
            stream.extend_from_slice(&[0xe0, 0xff, 0x01]);
        }
        stream.extend_from_slice(&[0x00, 0xff]);
        (stream, len)
    }

    #[test]
    fn a_compressed_listpack_of_too_many_entries_is_refused_early() {
        // The reviewer's trigger, at the element cap: one packed QUICKLIST_2 node whose
        // listpack is LZF-compressed, ~24 KB on the wire for ~1M entries.
        let small = 1 + 132 * 10;
        let (stream, len) = lzf_listpack_of_zeros(small);
        let node = |stream: &[u8], len: usize| {
            let mut v = vec![1, NODE_PACKED as u8, 0xc0 | ENC_LZF];
            put_len(&mut v, stream.len() as u64);
            put_len(&mut v, len as u64);
            v.extend_from_slice(stream);
            raw(TYPE_LIST_QUICKLIST_2, &v)
        };
        // The construction is sound: a small one decodes.
        let Ok(Object::List(items)) = decode(&node(&stream, len)) else {
            panic!("a list")
        };
        assert!(items.len() == small && items.iter().all(|i| i.as_ref() == b"0"));
        let many = 1 + 132 * ELEMENTS_MAX.div_ceil(132);
        assert!(many > ELEMENTS_MAX);
        let (stream, len) = lzf_listpack_of_zeros(many);
        let payload = node(&stream, len);
        assert!(payload.len() < 32 << 10, "{}", payload.len());
        assert_eq!(decode(&payload), Err(DecodeError::TooManyElements));
        // Decoding stops at the first element past the budget, not after the listpack.
        let budget = Budget {
            elements_left: 10,
            bytes_left: DECODED_BYTES_MAX,
        };
        assert_eq!(
            decode_within(&payload, budget),
            Err(DecodeError::TooManyElements)
        );
        // The same entries as a hash's listpack: refused too.
        let mut hash = vec![0xc0 | ENC_LZF];
        put_len(&mut hash, stream.len() as u64);
        put_len(&mut hash, len as u64);
        hash.extend_from_slice(&stream);
        assert_eq!(
            decode(&raw(TYPE_HASH_LISTPACK, &hash)),
            Err(DecodeError::TooManyElements)
        );
        // The reviewer's full size: ~3 MiB of LZF declaring a listpack past 256 MiB, refused
        // before LZF runs.
        let huge = 1 + 132 * ((DECODED_BYTES_MAX / 264) + 1);
        let (stream, len) = lzf_listpack_of_zeros(huge);
        assert!(len > DECODED_BYTES_MAX && stream.len() < 4 << 20);
        assert_eq!(decode(&node(&stream, len)), Err(DecodeError::TooLarge));
        // Within the element cap, the bytes: each empty entry costs the overhead, so a
        // smaller byte budget refuses the small list too.
        let (stream, len) = lzf_listpack_of_zeros(small);
        let budget = Budget {
            elements_left: ELEMENTS_MAX,
            bytes_left: len + small * ELEMENT_OVERHEAD,
        };
        assert_eq!(
            decode_within(&node(&stream, len), budget),
            Err(DecodeError::TooLarge)
        );
    }

    #[test]
    fn a_plain_list_of_too_many_empty_strings_is_refused() {
        // The reviewer's second trigger, uncompressed: a type 1 list of empty strings, one
        // byte each. One past the cap is refused; the cap itself decodes.
        let list = |n: usize| {
            let mut v = Vec::with_capacity(n + 5);
            put_len(&mut v, n as u64);
            v.resize(v.len() + n, 0);
            raw(TYPE_LIST, &v)
        };
        assert_eq!(
            decode(&list(ELEMENTS_MAX + 1)),
            Err(DecodeError::TooManyElements)
        );
        let Ok(Object::List(items)) = decode(&list(ELEMENTS_MAX)) else {
            panic!("a list")
        };
        assert_eq!(items.len(), ELEMENTS_MAX);
        // A 16 MiB payload (the frame limit) of them stops at the cap, well before its end.
        assert_eq!(decode(&list(16 << 20)), Err(DecodeError::TooManyElements));
        // A hash's field and value count two, as do a sorted set's member and score.
        let pairs = ELEMENTS_MAX / 2 + 1;
        let mut hash = Vec::new();
        put_len(&mut hash, pairs as u64);
        hash.resize(hash.len() + 2 * pairs, 0);
        assert_eq!(
            decode(&raw(TYPE_HASH, &hash)),
            Err(DecodeError::TooManyElements)
        );
        let mut zset = Vec::new();
        put_len(&mut zset, pairs as u64);
        for _ in 0..pairs {
            zset.push(0);
            zset.extend_from_slice(&1.0f64.to_le_bytes());
        }
        assert_eq!(
            decode(&raw(TYPE_ZSET_2, &zset)),
            Err(DecodeError::TooManyElements)
        );
        // An intset of more members than the cap (4 bytes each).
        let n = ELEMENTS_MAX + 1;
        let mut blob = Vec::with_capacity(8 + 4 * n);
        blob.extend_from_slice(&4u32.to_le_bytes());
        blob.extend_from_slice(&(n as u32).to_le_bytes());
        for i in 0..n as i32 {
            blob.extend_from_slice(&i.to_le_bytes());
        }
        assert_eq!(
            decode(&with_blob(TYPE_SET_INTSET, &blob)),
            Err(DecodeError::TooManyElements)
        );
    }

    #[test]
    fn lzf_past_the_byte_budget_is_refused_before_decompressing() {
        // 3 MiB of garbage declaring 260 MiB (possible for 3 MiB of LZF, 88 times): past the
        // budget, refused before LZF runs.
        let garbage = vec![0xffu8; 3 << 20];
        let string = |declared: usize| {
            let mut v = vec![0xc0 | ENC_LZF];
            put_len(&mut v, garbage.len() as u64);
            put_len(&mut v, declared as u64);
            v.extend_from_slice(&garbage);
            raw(TYPE_STRING, &v)
        };
        assert_eq!(decode(&string(260 << 20)), Err(DecodeError::TooLarge));
        // Within the budget, the garbage is found at once (nothing reserved for 256 MiB).
        assert_eq!(decode(&string(256 << 20)), Err(DecodeError::BadData));
    }

    #[test]
    fn backlen_matches_redis() {
        // lpEncodeBacklen's boundaries.
        assert_eq!(lp_backlen(2), ([2, 0, 0, 0, 0], 1));
        assert_eq!(lp_backlen(127), ([127, 0, 0, 0, 0], 1));
        assert_eq!(lp_backlen(128), ([1, 128, 0, 0, 0], 2));
        assert_eq!(lp_backlen(16382), ([127, 254, 0, 0, 0], 2));
        assert_eq!(lp_backlen(16383), ([0, 255, 255, 0, 0], 3));
    }
}
