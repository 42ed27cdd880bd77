//! HyperLogLog: PFADD, PFCOUNT, PFMERGE and PFDEBUG, a port of Redis 7.0's `hyperloglog.c`
//! that keeps its byte format, so an HLL is the same string in capdb and in Redis.
//!
//! # Layout
//!
//! An HLL is a plain string (one top-level record, see [`crate::strings`]; `TYPE` says
//! `string`, `GET` returns its bytes, `SET` of bytes Redis produced makes an HLL capdb reads).
//! Keeping Redis's bytes exactly means every reply depends only on the value, whichever server
//! wrote it:
//!
//! - a 16-byte header: `HYLL`, an encoding byte (0 dense, 1 sparse), 3 unused bytes (kept as
//!   they are), and the cached cardinality as a little-endian `u64` whose most significant bit
//!   set means "stale" (a write sets that bit and leaves the other bits as they were);
//! - dense: 16,384 registers of 6 bits, packed from the least significant bit of each byte
//!   (12,288 bytes);
//! - sparse: a run-length code of the registers, `00xxxxxx` ZERO (1 to 64 zero registers),
//!   `01xxxxxx yyyyyyyy` XZERO (up to 16,384 zero registers), `1vvvvvxx` VAL (1 to 4
//!   registers holding 1 to 32). A new HLL is sparse; it turns dense (for good) when a
//!   register needs more than 32 or the string would pass `hll-sparse-max-bytes` (3,000, its
//!   default; capdb has no such setting).
//!
//! Elements are hashed with MurmurHash64A (seed `0xadc83b19`): the low 14 bits pick the
//! register, the run of zero bits above them (plus one) is the value. The estimate is the one
//! of Redis 7 (Ertl's "new" estimator, with its `tau` and `sigma`), rounded as Redis's x86-64
//! build rounds it, including its overflow to `i64::MIN` for degenerate dense values.
//!
//! The in-place edits of the sparse code (splitting a run, merging equal neighbours over at
//! most five opcodes) follow Redis step by step, because the resulting bytes are visible to
//! `GET`. Bytes past the end of a string read as 0, as the terminator of a Redis `sds` string
//! does, so truncated sparse strings behave as in Redis too.
//!
//! PFCOUNT of one key is a write here: when the cached cardinality is stale it stores the new
//! one (Redis does the same and propagates it). PFCOUNT of several keys writes nothing.
//! PFSELFTEST is left out: it is a keyless diagnostic of Redis's own C macros, with random
//! input, and answers nothing about the data.

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, Value};

use crate::command::{Ctx, Keys, Run, Spec, err};
use crate::space::Space;
use crate::strings::get_string;

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "pfadd",   arity: -2, flags: &["write", "denyoom", "fast"], keys: Keys::Range(1, 1, 1), run: Run::Write(pfadd) },
    Spec { name: "pfcount", arity: -2, flags: &["readonly"], keys: Keys::Range(1, -1, 1), run: Run::Write(pfcount) },
    Spec { name: "pfdebug", arity: 3,  flags: &["write", "denyoom", "admin"], keys: Keys::Range(2, 2, 1), run: Run::Write(pfdebug) },
    Spec { name: "pfmerge", arity: -2, flags: &["write", "denyoom"], keys: Keys::Range(1, -1, 1), run: Run::Write(pfmerge) },
];

// ---------------------------------------------------------------------------------------------
// The representation

/// Bits of the hash that pick the register.
const P: u32 = 14;
/// Bits of the hash left for the run of zeros.
const Q: usize = 64 - P as usize;
const REGISTERS: usize = 1 << P;
const REGISTER_MAX: u32 = 63;
const HEADER: usize = 16;
const DENSE_SIZE: usize = HEADER + (REGISTERS * 6).div_ceil(8);
const DENSE: u8 = 0;
const SPARSE: u8 = 1;
/// Redis's `hll-sparse-max-bytes` default: a sparse string never grows past it.
const SPARSE_MAX_BYTES: usize = 3000;
const VAL_MAX_VALUE: u8 = 32;
const VAL_MAX_LEN: usize = 4;
const ZERO_MAX_LEN: usize = 64;
const XZERO_MAX_LEN: usize = 16384;
const SEED: u64 = 0xadc8_3b19;
/// 0.5 / ln(2), the estimator's alpha for an infinite number of registers.
const ALPHA_INF: f64 = 0.721_347_520_444_481_7;

/// A sparse string whose code does not cover exactly the 16,384 registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Corrupt;

impl From<Corrupt> for Error {
    fn from(_: Corrupt) -> Error {
        err("INVALIDOBJ Corrupted HLL object detected")
    }
}

/// Redis's error for a string that is not an HLL (a non-string is plain `WRONGTYPE`).
fn not_hll() -> Error {
    err("WRONGTYPE Key is not a valid HyperLogLog string value.")
}

/// MurmurHash64A (64-bit MurmurHash2), reading 8-byte blocks little-endian as Redis does on
/// every architecture.
fn murmur64a(key: &[u8], seed: u64) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h = seed ^ (key.len() as u64).wrapping_mul(M);
    let mut blocks = key.chunks_exact(8);
    for block in &mut blocks {
        let mut k = u64::from_le_bytes(block.try_into().expect("chunks_exact yields 8 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate() {
            h ^= u64::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

/// The register an element falls in and the value it offers: the length of the `0...01`
/// pattern above the register bits (1 to `Q + 1`).
fn pattern(element: &[u8]) -> (usize, u8) {
    let hash = murmur64a(element, SEED);
    let index = (hash & (REGISTERS as u64 - 1)) as usize;
    let rest = (hash >> P) | (1u64 << Q);
    (index, rest.trailing_zeros() as u8 + 1)
}

/// Register `i` of a dense register array (bytes past the end read as 0).
fn dense_get(regs: &[u8], i: usize) -> u8 {
    let byte = i * 6 / 8;
    let fb = (i * 6) & 7;
    let b0 = u32::from(regs[byte]);
    let b1 = u32::from(regs.get(byte + 1).copied().unwrap_or(0));
    (((b0 >> fb) | (b1 << (8 - fb))) & REGISTER_MAX) as u8
}

/// Sets register `i` of a dense register array to `val` (at most 63).
fn dense_put(regs: &mut [u8], i: usize, val: u8) {
    let byte = i * 6 / 8;
    let fb = (i * 6) & 7;
    let v = u32::from(val);
    regs[byte] &= !((REGISTER_MAX << fb) as u8);
    regs[byte] |= (v << fb) as u8;
    if let Some(b1) = regs.get_mut(byte + 1) {
        *b1 &= !((REGISTER_MAX >> (8 - fb)) as u8);
        *b1 |= (v >> (8 - fb)) as u8;
    }
}

/// Raises register `i` to `count` when it is lower; whether it changed.
fn dense_raise(regs: &mut [u8], i: usize, count: u8) -> bool {
    if count > dense_get(regs, i) {
        dense_put(regs, i, count);
        true
    } else {
        false
    }
}

/// One opcode of the sparse code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Zero(usize),
    XZero(usize),
    Val { value: u8, len: usize },
}

impl Op {
    /// The opcode at `buf[i]`; `tail` stands for the byte past the end (the second byte of a
    /// truncated XZERO).
    fn at(buf: &[u8], tail: u8, i: usize) -> Op {
        let b = buf[i];
        match b & 0xc0 {
            0x00 => Op::Zero(usize::from(b & 0x3f) + 1),
            0x40 => {
                let low = usize::from(buf.get(i + 1).copied().unwrap_or(tail));
                Op::XZero((usize::from(b & 0x3f) << 8 | low) + 1)
            }
            _ => Op::Val {
                value: ((b >> 2) & 0x1f) + 1,
                len: usize::from(b & 3) + 1,
            },
        }
    }

    /// Its length in bytes.
    fn size(self) -> usize {
        if let Op::XZero(_) = self { 2 } else { 1 }
    }

    /// How many registers it covers.
    fn span(self) -> usize {
        match self {
            Op::Zero(n) | Op::XZero(n) => n,
            Op::Val { len, .. } => len,
        }
    }
}

fn val_byte(value: u8, len: usize) -> u8 {
    0x80 | (value - 1) << 2 | (len - 1) as u8
}

/// Appends the opcode for `len` (1 to 16,384) zero registers: ZERO up to 64, XZERO above.
fn push_zeros(out: &mut Vec<u8>, len: usize) {
    if len > ZERO_MAX_LEN {
        let l = len - 1;
        out.push((l >> 8) as u8 | 0x40);
        out.push((l & 0xff) as u8);
    } else {
        out.push((len - 1) as u8);
    }
}

/// An HLL string being read or changed: all of it, header included.
struct Hll {
    buf: Vec<u8>,
    /// The byte just past the end, as in Redis's `sds` buffer: 0 (the terminator) except
    /// after Redis's sparse edit of a truncated XZERO, which writes its last byte there. It
    /// lives only for the command (Redis keeps it in memory until the string is rewritten).
    tail: u8,
}

impl Hll {
    /// A new, empty HLL: sparse, XZERO opcodes covering every register, cardinality 0.
    fn new() -> Hll {
        let mut buf = Vec::with_capacity(HEADER + 2);
        buf.extend_from_slice(b"HYLL");
        buf.push(SPARSE);
        buf.resize(HEADER, 0);
        let mut left = REGISTERS;
        while left > 0 {
            let n = left.min(XZERO_MAX_LEN);
            let l = n - 1;
            buf.push((l >> 8) as u8 | 0x40);
            buf.push((l & 0xff) as u8);
            left -= n;
        }
        Hll { buf, tail: 0 }
    }

    /// The HLL a string holds, with Redis's checks (`isHLLObjectOrReply`): the magic, a known
    /// encoding, and the exact length of a dense one. A sparse code is checked when used.
    fn parse(data: &[u8]) -> Result<Hll> {
        if data.len() < HEADER || &data[..4] != b"HYLL" || data[4] > SPARSE {
            return Err(not_hll());
        }
        if data[4] == DENSE && data.len() != DENSE_SIZE {
            return Err(not_hll());
        }
        Ok(Hll {
            buf: data.to_vec(),
            tail: 0,
        })
    }

    /// The sparse opcode at byte `p`.
    fn op(&self, p: usize) -> Op {
        Op::at(&self.buf, self.tail, p)
    }

    fn is_dense(&self) -> bool {
        self.buf[4] == DENSE
    }

    /// The cached cardinality, unless stale.
    fn cached(&self) -> Option<u64> {
        let card = u64::from_le_bytes(
            self.buf[8..HEADER]
                .try_into()
                .expect("the header is 16 bytes (checked by parse)"),
        );
        (card >> 63 == 0).then_some(card)
    }

    fn set_cached(&mut self, card: u64) {
        self.buf[8..HEADER].copy_from_slice(&card.to_le_bytes());
    }

    /// Marks the cached cardinality stale (its other bits stay).
    fn invalidate(&mut self) {
        self.buf[HEADER - 1] |= 0x80;
    }

    /// Adds an element; whether a register changed.
    fn add(&mut self, element: &[u8]) -> Result<bool, Corrupt> {
        let (index, count) = pattern(element);
        self.raise(index, count)
    }

    /// Raises register `index` to `count` when lower; whether it changed.
    fn raise(&mut self, index: usize, count: u8) -> Result<bool, Corrupt> {
        if self.is_dense() {
            Ok(dense_raise(&mut self.buf[HEADER..], index, count))
        } else {
            self.sparse_raise(index, count)
        }
    }

    /// Redis's `hllSparseSet`: edits the sparse code in place, or turns the HLL dense when the
    /// value does not fit a VAL opcode or the string would pass [`SPARSE_MAX_BYTES`].
    fn sparse_raise(&mut self, index: usize, count: u8) -> Result<bool, Corrupt> {
        if count > VAL_MAX_VALUE {
            return self.promote(index, count);
        }
        // Find the opcode covering the register.
        let end = self.buf.len();
        let mut p = HEADER;
        let mut first = 0;
        let mut prev = None;
        let mut span = 0;
        while p < end {
            let op = self.op(p);
            span = op.span();
            if index < first + span {
                break;
            }
            prev = Some(p);
            p += op.size();
            first += span;
        }
        if span == 0 || p >= end {
            return Err(Corrupt);
        }
        let op = self.op(p);
        // The trivial cases: nothing to do, or one byte replaced.
        match op {
            Op::Val { value, .. } if value >= count => return Ok(false),
            Op::Val { len: 1, .. } | Op::Zero(1) => {
                self.buf[p] = val_byte(count, 1);
                self.merge_vals(prev);
                return Ok(true);
            }
            _ => {}
        }
        // Split the opcode around the register.
        let last = first + span - 1;
        let mut seq = Vec::with_capacity(5);
        match op {
            Op::Val { value, .. } => {
                if index != first {
                    seq.push(val_byte(value, index - first));
                }
                seq.push(val_byte(count, 1));
                if index != last {
                    seq.push(val_byte(value, last - index));
                }
            }
            Op::Zero(_) | Op::XZero(_) => {
                if index != first {
                    push_zeros(&mut seq, index - first);
                }
                seq.push(val_byte(count, 1));
                if index != last {
                    push_zeros(&mut seq, last - index);
                }
            }
        }
        let old = op.size();
        if seq.len() > old && end + seq.len() - old > SPARSE_MAX_BYTES {
            return self.promote(index, count);
        }
        // Redis sets the new length, then copies the sequence in: replacing a truncated XZERO
        // at the very end, the sequence's last byte lands past the end, in the tail byte.
        let new_len = end + seq.len() - old;
        self.tail = if p + seq.len() > new_len {
            seq[new_len - p]
        } else {
            0
        };
        let rest = (p + old).min(end);
        self.buf.splice(p..rest, seq);
        self.buf.truncate(new_len);
        self.merge_vals(prev);
        Ok(true)
    }

    /// Merges adjacent VAL opcodes of equal value, scanning at most five opcodes from the
    /// one before the edit (as Redis does, so the bytes are Redis's), then marks the cache
    /// stale.
    fn merge_vals(&mut self, prev: Option<usize>) {
        let mut p = prev.unwrap_or(HEADER);
        let mut scan = 5;
        while p < self.buf.len() && scan > 0 {
            scan -= 1;
            match self.op(p) {
                Op::XZero(_) => p += 2,
                Op::Zero(_) => p += 1,
                Op::Val { value, len } => {
                    if p + 1 < self.buf.len()
                        && let Op::Val {
                            value: v2,
                            len: len2,
                        } = self.op(p + 1)
                        && v2 == value
                        && len + len2 <= VAL_MAX_LEN
                    {
                        self.buf[p + 1] = val_byte(value, len + len2);
                        self.buf.remove(p);
                        self.tail = 0;
                        continue;
                    }
                    p += 1;
                }
            }
        }
        self.invalidate();
    }

    /// Turns the HLL dense, then raises the register (which must change).
    fn promote(&mut self, index: usize, count: u8) -> Result<bool, Corrupt> {
        self.make_dense()?;
        Ok(dense_raise(&mut self.buf[HEADER..], index, count))
    }

    /// Redis's `hllSparseToDense`: the header is kept (cached cardinality included) with the
    /// dense encoding; a code not covering exactly the registers is corrupt.
    fn make_dense(&mut self) -> Result<(), Corrupt> {
        if self.is_dense() {
            return Ok(());
        }
        let mut dense = vec![0u8; DENSE_SIZE];
        dense[..HEADER].copy_from_slice(&self.buf[..HEADER]);
        dense[4] = DENSE;
        let regs = &mut dense[HEADER..];
        let mut idx = 0;
        let mut p = HEADER;
        while p < self.buf.len() {
            let op = self.op(p);
            match op {
                Op::Zero(n) | Op::XZero(n) => idx += n,
                Op::Val { value, len } => {
                    if idx + len > REGISTERS {
                        break;
                    }
                    for i in idx..idx + len {
                        dense_put(regs, i, value);
                    }
                    idx += len;
                }
            }
            p += op.size();
        }
        if idx != REGISTERS {
            return Err(Corrupt);
        }
        self.buf = dense;
        self.tail = 0;
        Ok(())
    }

    /// How many registers hold each value, and whether a sparse code covers exactly the
    /// registers.
    fn histogram(&self) -> ([u64; 64], bool) {
        let mut h = [0u64; 64];
        if self.is_dense() {
            let regs = &self.buf[HEADER..];
            for i in 0..REGISTERS {
                h[usize::from(dense_get(regs, i))] += 1;
            }
            return (h, true);
        }
        let mut idx = 0usize;
        let mut p = HEADER;
        while p < self.buf.len() {
            let op = self.op(p);
            match op {
                Op::Zero(n) | Op::XZero(n) => h[0] += n as u64,
                Op::Val { value, len } => h[usize::from(value)] += len as u64,
            }
            idx += op.span();
            p += op.size();
        }
        (h, idx == REGISTERS)
    }

    /// The estimated cardinality (Redis's `hllCount`).
    fn count(&self) -> Result<u64, Corrupt> {
        match self.histogram() {
            (h, true) => Ok(estimate(&h)),
            _ => Err(Corrupt),
        }
    }

    /// Raises each `max[i]` to register `i` (Redis's `hllMerge`).
    fn merge_into(&self, max: &mut [u8; REGISTERS]) -> Result<(), Corrupt> {
        if self.is_dense() {
            let regs = &self.buf[HEADER..];
            for (i, m) in max.iter_mut().enumerate() {
                *m = (*m).max(dense_get(regs, i));
            }
            return Ok(());
        }
        let mut idx = 0;
        let mut p = HEADER;
        while p < self.buf.len() {
            let op = self.op(p);
            match op {
                Op::Zero(n) | Op::XZero(n) => idx += n,
                Op::Val { value, len } => {
                    if idx + len > REGISTERS {
                        break;
                    }
                    for m in &mut max[idx..idx + len] {
                        *m = (*m).max(value);
                    }
                    idx += len;
                }
            }
            p += op.size();
        }
        if idx == REGISTERS {
            Ok(())
        } else {
            Err(Corrupt)
        }
    }

    fn into_bytes(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

/// An HLL as a value outside any key space: how job and view reducers count distinct
/// elements (`crates/reduce`), in the bytes PFADD writes, so that a result stored as a string
/// answers PFCOUNT and PFMERGE in capdb and in Redis alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HyperLogLog {
    bytes: Vec<u8>,
}

impl Default for HyperLogLog {
    fn default() -> HyperLogLog {
        HyperLogLog::new()
    }
}

impl HyperLogLog {
    /// An empty HLL (sparse, cardinality 0).
    pub fn new() -> HyperLogLog {
        HyperLogLog {
            bytes: Hll::new().buf,
        }
    }

    /// The HLL held by `bytes` (PFADD's format), checked whole: a corrupt sparse code is an
    /// error here, not at a later count.
    pub fn from_bytes(bytes: &[u8]) -> Result<HyperLogLog> {
        let hll = Hll::parse(bytes)?;
        hll.histogram_checked()?;
        Ok(HyperLogLog { bytes: hll.buf })
    }

    /// Adds `element`; whether a register changed.
    pub fn add(&mut self, element: &[u8]) -> Result<bool> {
        let mut hll = Hll {
            buf: std::mem::take(&mut self.bytes),
            tail: 0,
        };
        let changed = hll.add(element);
        if matches!(changed, Ok(true)) {
            hll.invalidate();
        }
        self.bytes = hll.buf;
        Ok(changed?)
    }

    /// Makes this the union of itself and `other` (the registers PFMERGE would give), in one
    /// pass over the registers: sparse while every register fits the sparse code and the
    /// string stays within 3,000 bytes, else dense. The bytes depend only on the registers
    /// (not on the order things were added), so equal sketches are equal strings.
    pub fn merge(&mut self, other: &HyperLogLog) -> Result<()> {
        let mut max = [0u8; REGISTERS];
        let mine = Hll {
            buf: std::mem::take(&mut self.bytes),
            tail: 0,
        };
        let merged = mine
            .merge_into(&mut max)
            .and_then(|()| merge_slice_into(&other.bytes, &mut max));
        self.bytes = mine.buf;
        merged?;
        self.bytes = Hll::from_registers(&max).buf;
        Ok(())
    }

    /// The estimated number of distinct elements added (0.81 % standard error).
    pub fn count(&self) -> Result<u64> {
        let hll = Hll {
            buf: self.bytes.clone(),
            tail: 0,
        };
        Ok(hll.count()?)
    }

    /// The bytes PFADD would have written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// [`Hll::merge_into`] of the HLL held by `bytes` (without copying them).
fn merge_slice_into(bytes: &[u8], max: &mut [u8; REGISTERS]) -> Result<(), Corrupt> {
    // `Hll` owns its buffer; a dense one is read in place, a sparse one (≤ 3,000 bytes of
    // code, or corrupt) is copied.
    if bytes.len() == DENSE_SIZE && bytes.get(4) == Some(&DENSE) {
        let regs = &bytes[HEADER..];
        for (i, m) in max.iter_mut().enumerate() {
            *m = (*m).max(dense_get(regs, i));
        }
        return Ok(());
    }
    Hll {
        buf: bytes.to_vec(),
        tail: 0,
    }
    .merge_into(max)
}

impl Hll {
    /// The histogram of a whole, well-formed HLL, or the corruption error: a sparse code
    /// must cover exactly the registers and end exactly at the end of the string (a cut-off
    /// last opcode is corrupt here, though Redis reads past it as zeros).
    fn histogram_checked(&self) -> Result<(), Corrupt> {
        if !self.is_dense() {
            let mut p = HEADER;
            while p < self.buf.len() {
                p += self.op(p).size();
            }
            if p != self.buf.len() {
                return Err(Corrupt);
            }
        }
        match self.histogram() {
            (_, true) => Ok(()),
            _ => Err(Corrupt),
        }
    }

    /// The HLL holding exactly these registers, its cached cardinality stale.
    fn from_registers(max: &[u8; REGISTERS]) -> Hll {
        let mut hll = Hll::new();
        hll.buf.truncate(HEADER);
        let sparse_fits = max.iter().all(|&m| m <= VAL_MAX_VALUE);
        let mut i = 0;
        while sparse_fits && i < REGISTERS {
            let v = max[i];
            let mut run = 1;
            while i + run < REGISTERS && max[i + run] == v {
                run += 1;
            }
            i += run;
            if v == 0 {
                while run > 0 {
                    let n = run.min(XZERO_MAX_LEN);
                    push_zeros(&mut hll.buf, n);
                    run -= n;
                }
            } else {
                while run > 0 {
                    let n = run.min(VAL_MAX_LEN);
                    hll.buf.push(val_byte(v, n));
                    run -= n;
                }
            }
            if hll.buf.len() > SPARSE_MAX_BYTES {
                break;
            }
        }
        if !sparse_fits || hll.buf.len() > SPARSE_MAX_BYTES {
            let mut dense = vec![0u8; DENSE_SIZE];
            dense[..HEADER].copy_from_slice(&hll.buf[..HEADER]);
            dense[4] = DENSE;
            for (i, &m) in max.iter().enumerate() {
                dense_put(&mut dense[HEADER..], i, m);
            }
            hll.buf = dense;
        }
        hll.invalidate();
        hll
    }
}

/// Ertl's sigma (arXiv:1702.01284), as Redis computes it.
fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if before == z {
            return z;
        }
    }
}

/// Ertl's tau (arXiv:1702.01284), as Redis computes it.
fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if before == z {
            return z / 3.0;
        }
    }
}

/// The cardinality estimated from a register histogram, with Redis's final conversions
/// (`llroundl`, then back through a `double` to `uint64_t`): an estimate out of the `i64`
/// range (an infinite one, when every register is 50 or more) becomes `i64::MIN`, that is
/// 2^63, as on Redis's x86-64 build.
fn estimate(h: &[u64; 64]) -> u64 {
    let m = REGISTERS as f64;
    let mut z = m * tau((m - h[Q + 1] as f64) / m);
    for &count in h[1..=Q].iter().rev() {
        z += count as f64;
        z *= 0.5;
    }
    z += m * sigma(h[0] as f64 / m);
    let e = (ALPHA_INF * m * m / z).round();
    let rounded = if e.is_finite() && e >= -(2f64.powi(63)) && e < 2f64.powi(63) {
        e as i64
    } else {
        i64::MIN
    };
    let back = rounded as f64;
    if back < 0.0 {
        (back as i64) as u64
    } else {
        back as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// The HLL at `key`: `None` when absent, plain `WRONGTYPE` for a non-string, Redis's HLL
/// `WRONGTYPE` for a string that is not an HLL. With it, the key's TTL.
fn open_hll(space: &mut dyn Space, key: &[u8]) -> Result<Option<(Hll, Option<u64>)>> {
    match get_string(space, key)? {
        None => Ok(None),
        Some(v) => Ok(Some((Hll::parse(&v.data)?, v.header.expire_at_ms))),
    }
}

fn store(space: &mut dyn Space, key: &[u8], hll: Hll, expire: Option<u64>, cx: &Ctx) -> Result<()> {
    space.put(key, Value::new(hll.into_bytes(), cx.timestamp, expire))
}

/// `PFADD key [element ...]`: 1 when a register changed (or the key was created), else 0.
/// The TTL is kept.
fn pfadd(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let key = &args[1];
    let (mut hll, expire, mut updated) = match open_hll(space, key)? {
        None => (Hll::new(), None, true),
        Some((hll, expire)) => (hll, expire, false),
    };
    for element in &args[2..] {
        match hll.add(element) {
            Ok(changed) => updated |= changed,
            Err(corrupt) => {
                // Redis edits the string in place: what changed before the corrupt part stays.
                if updated {
                    store(space, key, hll, expire, cx)?;
                }
                return Err(corrupt.into());
            }
        }
    }
    if updated {
        hll.invalidate();
        store(space, key, hll, expire, cx)?;
    }
    Ok(Reply::Integer(i64::from(updated)))
}

/// `PFCOUNT key [key ...]`: the estimated cardinality of one HLL (stored back in its header
/// when it was stale), or of the union of several (computed without writing anything).
fn pfcount(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    if args.len() > 2 {
        let mut max = [0u8; REGISTERS];
        for key in &args[1..] {
            if let Some((hll, _)) = open_hll(space, key)? {
                hll.merge_into(&mut max)?;
            }
        }
        let mut h = [0u64; 64];
        for &r in &max {
            h[usize::from(r)] += 1;
        }
        return Ok(Reply::Integer(estimate(&h) as i64));
    }
    let key = &args[1];
    let Some((mut hll, expire)) = open_hll(space, key)? else {
        return Ok(Reply::Integer(0));
    };
    if let Some(card) = hll.cached() {
        return Ok(Reply::Integer(card as i64));
    }
    let card = hll.count()?;
    hll.set_cached(card);
    store(space, key, hll, expire, cx)?;
    Ok(Reply::Integer(card as i64))
}

/// `PFMERGE destkey [sourcekey ...]`: the union of the sources and the destination into the
/// destination (dense when any of them is), keeping its TTL. Always writes.
fn pfmerge(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut max = [0u8; REGISTERS];
    let mut dense = false;
    let mut dest = None;
    for (j, key) in args[1..].iter().enumerate() {
        let Some((hll, expire)) = open_hll(space, key)? else {
            continue;
        };
        dense |= hll.is_dense();
        hll.merge_into(&mut max)?;
        if j == 0 {
            dest = Some((hll, expire));
        }
    }
    let (mut hll, expire) = dest.unwrap_or_else(|| (Hll::new(), None));
    if dense {
        hll.make_dense()?;
    }
    for (i, &m) in max.iter().enumerate() {
        if m != 0 {
            // As in Redis, a register that cannot be set is skipped: the destination's code
            // was whole when checked, but an edit at a truncated end can cut it short.
            let _ = hll.raise(i, m);
        }
    }
    hll.invalidate();
    store(space, &args[1], hll, expire, cx)?;
    Ok(Reply::Ok)
}

/// `PFDEBUG GETREG|DECODE|ENCODING|TODENSE key`: Redis's debugging view of an HLL (GETREG
/// and TODENSE make a sparse HLL dense, and store it).
fn pfdebug(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let key = &args[2];
    let Some((mut hll, expire)) = open_hll(space, key)? else {
        return Err(err("ERR The specified key does not exist"));
    };
    let sub = &args[1];
    match sub.to_ascii_lowercase().as_slice() {
        b"getreg" => {
            if !hll.is_dense() {
                hll.make_dense()?;
                let regs: Vec<Reply> = registers(&hll);
                store(space, key, hll, expire, cx)?;
                return Ok(Reply::Array(regs));
            }
            Ok(Reply::Array(registers(&hll)))
        }
        b"decode" => {
            if hll.is_dense() {
                return Err(err("ERR HLL encoding is not sparse"));
            }
            let mut words = Vec::new();
            let mut p = HEADER;
            while p < hll.buf.len() {
                let op = hll.op(p);
                words.push(match op {
                    Op::Zero(n) => format!("z:{n}"),
                    Op::XZero(n) => format!("Z:{n}"),
                    Op::Val { value, len } => format!("v:{value},{len}"),
                });
                p += op.size();
            }
            Ok(Reply::Bulk(Bytes::from(words.join(" "))))
        }
        b"encoding" => Ok(Reply::Status(
            if hll.is_dense() { "dense" } else { "sparse" }.into(),
        )),
        b"todense" => {
            if hll.is_dense() {
                return Ok(Reply::Integer(0));
            }
            hll.make_dense()?;
            store(space, key, hll, expire, cx)?;
            Ok(Reply::Integer(1))
        }
        _ => Err(err(format!(
            "ERR Unknown PFDEBUG subcommand '{}'",
            String::from_utf8_lossy(sub)
        ))),
    }
}

/// Every register of a dense HLL, as integer replies.
fn registers(hll: &Hll) -> Vec<Reply> {
    let regs = &hll.buf[HEADER..];
    (0..REGISTERS)
        .map(|i| Reply::Integer(i64::from(dense_get(regs, i))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings::tests::{cx, error, int, run, set, space};
    use crate::testing::MapSpace;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn render(r: &Result<Reply>) -> String {
        fn one(r: &Reply) -> String {
            match r {
                Reply::Ok => "s:OK".into(),
                Reply::Nil => "n".into(),
                Reply::Integer(n) => format!("i:{n}"),
                Reply::Bulk(b) => format!("b:{}", to_hex(b)),
                Reply::Status(s) => format!("s:{s}"),
                Reply::Array(a) => format!("a:{}", a.iter().map(one).collect::<Vec<_>>().join(",")),
                other => format!("{other:?}"),
            }
        }
        match r {
            Ok(r) => one(r),
            Err(Error::Command(line)) => format!("e:{line}"),
            Err(Error::WrongType) => {
                "e:WRONGTYPE Operation against a key holding the wrong kind of value".into()
            }
            Err(e) => format!("{e:?}"),
        }
    }

    /// Runs one vector line (`hex args \t expected reply`) against `s`; `get` and `set` are
    /// served from the space directly. The rendered reply.
    fn run_vector(s: &mut MapSpace, words: &str) -> String {
        let args: Vec<Bytes> = words
            .split(' ')
            .map(|w| Bytes::from(if w == "-" { Vec::new() } else { hex(w) }))
            .collect();
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        let reply = match name.as_str() {
            "get" => Ok(match s.get(&args[1]).unwrap() {
                Some(v) => Reply::Bulk(v.data),
                None => Reply::Nil,
            }),
            "set" => s
                .put(&args[1], Value::new(args[2].clone(), cx().timestamp, None))
                .map(|()| Reply::Ok),
            _ => crate::execute(&args, s, &cx()),
        };
        render(&reply)
    }

    /// Replays every line of a vector file, returning the lines that differ.
    fn replay(text: &str) -> Vec<String> {
        let mut s = space();
        let mut diffs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let Some((words, want)) = line.split_once('\t') else {
                continue;
            };
            let got = run_vector(&mut s, words);
            if got != want {
                diffs.push(format!(
                    "line {}: {words}\n  want {want}\n  got  {got}",
                    n + 1
                ));
            }
        }
        diffs
    }

    /// Replays vector files recorded from redis-server 7.0.15 by `testdata/hll_vectors.py`
    /// (random and crafted HLLs: sparse edits, promotion, corrupt and truncated codes, dense
    /// values of every register range, merges, unions, PFDEBUG; replies and every `GET`):
    /// `HLL_VECTORS=a.txt,b.txt cargo test -p capdb-data --lib hll -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn vectors_from_redis_file() {
        let path = std::env::var("HLL_VECTORS").expect("HLL_VECTORS names a vector file");
        for p in path.split(',') {
            let text = std::fs::read_to_string(p).unwrap();
            let diffs = replay(&text);
            for d in diffs.iter().take(10) {
                eprintln!("{d}");
            }
            assert!(diffs.is_empty(), "{p}: {} lines differ", diffs.len());
            eprintln!("{p}: {} lines match", text.lines().count());
        }
    }

    #[test]
    fn table_is_sorted() {
        assert!(crate::command::sorted(COMMANDS));
    }

    fn fnv(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    fn get_hex(s: &mut MapSpace, key: &str) -> String {
        to_hex(&s.get(key.as_bytes()).unwrap().unwrap().data)
    }

    fn args(words: &[&[u8]]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::copy_from_slice(w)).collect()
    }

    fn exec(s: &mut MapSpace, words: &[&[u8]]) -> Result<Reply> {
        crate::execute(&args(words), s, &cx())
    }

    /// Redis's PFADD of `el0` .. `el{n-1}` to `key`.
    fn add_range(s: &mut MapSpace, key: &str, prefix: &str, n: usize) -> Result<Reply> {
        let mut words: Vec<Vec<u8>> = vec![b"PFADD".to_vec(), key.as_bytes().to_vec()];
        words.extend((0..n).map(|i| format!("{prefix}{i}").into_bytes()));
        let refs: Vec<&[u8]> = words.iter().map(|w| w.as_slice()).collect();
        exec(s, &refs)
    }

    // Every expectation below was recorded from redis-server 7.0.15.

    #[test]
    fn empty_and_single_element_bytes_match_redis() {
        let mut s = space();
        assert_eq!(run(&mut s, "PFADD e").unwrap(), int(1));
        assert_eq!(get_hex(&mut s, "e"), "48594c4c0100000000000000000000807fff");
        assert_eq!(run(&mut s, "PFCOUNT e").unwrap(), int(0));
        assert_eq!(get_hex(&mut s, "e"), "48594c4c0100000000000000000000007fff");
        // Nothing new: 0, and the bytes stay.
        assert_eq!(run(&mut s, "PFADD e").unwrap(), int(0));
        assert_eq!(get_hex(&mut s, "e"), "48594c4c0100000000000000000000007fff");

        assert_eq!(run(&mut s, "PFADD one x").unwrap(), int(1));
        assert_eq!(
            get_hex(&mut s, "one"),
            "48594c4c0100000000000000000000807ff58408"
        );
        assert_eq!(run(&mut s, "PFCOUNT one").unwrap(), int(1));
        assert_eq!(
            get_hex(&mut s, "one"),
            "48594c4c0100000001000000000000007ff58408"
        );
        assert_eq!(run(&mut s, "PFADD one x").unwrap(), int(0));
        // A change sets the stale bit and keeps the rest of the old count.
        assert_eq!(run(&mut s, "PFADD one y").unwrap(), int(1));
        assert_eq!(
            get_hex(&mut s, "one"),
            "48594c4c0100000001000000000000807a538845a08408"
        );
        assert_eq!(run(&mut s, "PFCOUNT one").unwrap(), int(2));
        assert_eq!(run(&mut s, "PFCOUNT missing").unwrap(), int(0));
        assert_eq!(run(&mut s, "PFCOUNT missing e").unwrap(), int(0));
        assert_eq!(run(&mut s, "PFCOUNT one one").unwrap(), int(2));
        assert!(s.get(b"one").unwrap().unwrap().is_string());
    }

    const SPARSE_100: &str = "48594c4c010000000000000000000080138042c684416480388440af80409480417f8440558840fa8441ca8c088440c9801480398040dd80436f8440588040728440c790406e844048800c8c1a80423e80179c40538040e980228c404b8840488829844164801f8c38840d80408a8440cc8c41f88034801a84228040e79c408480404a80415b8040518041848440f680408784407280099040be8c41a2802e84406ea00580407f80409b8441c780409684358040f088405480404480108040f78c098440b08c41a284404e8c0f90412c840a8040a588008840e380409d804071800180404884389c40af881f840f88422780404188298041a28002803a8405800384228440b08041b4944072a040e2800480413a8440fc884095";

    #[test]
    fn a_sparse_hll_of_a_hundred_elements_matches_redis() {
        let mut s = space();
        assert_eq!(add_range(&mut s, "k", "el", 100).unwrap(), int(1));
        assert_eq!(get_hex(&mut s, "k"), SPARSE_100);
        assert_eq!(run(&mut s, "PFCOUNT k").unwrap(), int(100));
        assert!(get_hex(&mut s, "k").starts_with("48594c4c010000006400000000000000138042c6"));
    }

    #[test]
    fn sparse_bytes_written_by_redis_are_read_and_updated_alike() {
        let mut s = space();
        set(&mut s, "k", &hex(SPARSE_100), None);
        assert_eq!(run(&mut s, "PFCOUNT k").unwrap(), int(100));
        assert_eq!(run(&mut s, "PFCOUNT k d k").unwrap(), int(100));
        // And the same in a union with one of capdb's own.
        add_range(&mut s, "d", "el", 100).unwrap();
        assert_eq!(run(&mut s, "PFCOUNT k d").unwrap(), int(100));
    }

    #[test]
    fn sparse_turns_dense_at_3000_bytes_as_in_redis() {
        let mut s = space();
        let mut sparse_len = 0;
        for i in 0..1684 {
            let el = format!("e{i}");
            exec(&mut s, &[b"PFADD", b"p", el.as_bytes()]).unwrap();
            let data = s.get(b"p").unwrap().unwrap().data;
            if i < 1683 {
                assert_eq!(data[4], SPARSE, "sparse after e{i}");
                sparse_len = data.len();
                if i == 1682 {
                    assert_eq!(fnv(&data), 0x3c1b_2ef7_aaad_95df);
                }
            } else {
                assert_eq!(data[4], DENSE, "dense after e{i}");
                assert_eq!(data.len(), DENSE_SIZE);
                assert_eq!(fnv(&data), 0x1dff_1bb5_5f47_4a5d);
            }
        }
        assert_eq!(sparse_len, 3000);
        assert_eq!(run(&mut s, "PFCOUNT p").unwrap(), int(1685));
        assert_eq!(
            &get_hex(&mut s, "p")[..32],
            "48594c4c000000009506000000000000"
        );
        assert_eq!(
            run(&mut s, "PFDEBUG ENCODING p").unwrap(),
            Reply::Status("dense".into())
        );
    }

    #[test]
    fn dense_bytes_written_by_redis_are_read_and_updated_alike() {
        let dense = hex(include_str!("../testdata/hll_dense5000.hex").trim());
        let mut s = space();
        set(&mut s, "d", &dense, None);
        assert_eq!(&to_hex(&dense[..16]), "48594c4c000000000000000000000080");
        assert_eq!(run(&mut s, "PFCOUNT d").unwrap(), int(5037));
        let after = s.get(b"d").unwrap().unwrap().data;
        assert_eq!(&to_hex(&after[..16]), "48594c4c00000000ad13000000000000");
        assert_eq!(after[16..], dense[16..]);
        // The same bytes from capdb's own PFADD.
        add_range(&mut s, "mine", "d", 5000).unwrap();
        assert_eq!(s.get(b"mine").unwrap().unwrap().data[..], dense[..]);
        assert_eq!(add_range(&mut s, "d", "x", 1000).unwrap(), int(1));
        assert_eq!(
            fnv(&s.get(b"d").unwrap().unwrap().data),
            0x5f05_6b12_84f2_86a1
        );
        assert_eq!(run(&mut s, "PFCOUNT d").unwrap(), int(6029));
        // PFCOUNT of several keys: the union (7848 in Redis with these three).
        add_range(&mut s, "k", "el", 100).unwrap();
        for i in 0..1684 {
            let el = format!("e{i}");
            exec(&mut s, &[b"PFADD", b"p", el.as_bytes()]).unwrap();
        }
        assert_eq!(run(&mut s, "PFCOUNT d k p").unwrap(), int(7848));
    }

    #[test]
    fn pfcount_of_several_keys_writes_nothing() {
        let mut s = space();
        run(&mut s, "PFADD a x y z").unwrap();
        run(&mut s, "PFADD b z w").unwrap();
        let (a, b) = (get_hex(&mut s, "a"), get_hex(&mut s, "b"));
        assert_eq!(run(&mut s, "PFCOUNT a b missing").unwrap(), int(4));
        assert_eq!((get_hex(&mut s, "a"), get_hex(&mut s, "b")), (a.clone(), b));
        // One key: the count is cached in the header.
        assert_eq!(run(&mut s, "PFCOUNT a").unwrap(), int(3));
        assert_ne!(get_hex(&mut s, "a"), a);
        assert!(get_hex(&mut s, "a").starts_with("48594c4c010000000300000000000000"));
    }

    #[test]
    fn a_valid_cached_count_is_answered_as_stored() {
        let mut s = space();
        let mut v = hex("48594c4c0100000000000000000000007fff");
        v[8] = 42;
        set(&mut s, "k", &v, None);
        assert_eq!(run(&mut s, "PFCOUNT k").unwrap(), int(42));
    }

    #[test]
    fn pfmerge_unions_into_the_destination() {
        let mut s = space();
        run(&mut s, "PFADD a x y").unwrap();
        run(&mut s, "PFADD b y z").unwrap();
        assert_eq!(run(&mut s, "PFMERGE m a b").unwrap(), Reply::Ok);
        assert_eq!(run(&mut s, "PFCOUNT m").unwrap(), int(3));
        // An empty merge creates an empty HLL with a stale count, and rewrites it each time.
        assert_eq!(run(&mut s, "PFMERGE e").unwrap(), Reply::Ok);
        assert_eq!(get_hex(&mut s, "e"), "48594c4c0100000000000000000000807fff");
        run(&mut s, "PFCOUNT e").unwrap();
        run(&mut s, "PFMERGE e missing").unwrap();
        assert_eq!(get_hex(&mut s, "e"), "48594c4c0100000000000000000000807fff");
        // A dense source makes the destination dense.
        add_range(&mut s, "big", "d", 5000).unwrap();
        run(&mut s, "PFMERGE a big").unwrap();
        assert_eq!(
            run(&mut s, "PFDEBUG ENCODING a").unwrap(),
            Reply::Status("dense".into())
        );
        assert_eq!(
            run(&mut s, "PFDEBUG ENCODING m").unwrap(),
            Reply::Status("sparse".into())
        );
    }

    #[test]
    fn writes_keep_the_ttl() {
        let mut s = space();
        let later = crate::strings::tests::NOW + 10_000;
        set(&mut s, "k", &hex(SPARSE_100), Some(later));
        run(&mut s, "PFADD k new-element").unwrap();
        assert_eq!(crate::strings::tests::deadline_of(&mut s, "k"), Some(later));
        run(&mut s, "PFCOUNT k").unwrap();
        assert_eq!(crate::strings::tests::deadline_of(&mut s, "k"), Some(later));
        run(&mut s, "PFMERGE k").unwrap();
        assert_eq!(crate::strings::tests::deadline_of(&mut s, "k"), Some(later));
        run(&mut s, "PFMERGE fresh k").unwrap();
        assert_eq!(crate::strings::tests::deadline_of(&mut s, "fresh"), None);
    }

    #[test]
    fn errors_follow_redis() {
        let mut s = space();
        set(&mut s, "s", b"hello", None);
        run(&mut s, "HSET h f v").unwrap();
        run(&mut s, "PFADD a x").unwrap();
        let not_hll = "WRONGTYPE Key is not a valid HyperLogLog string value.";
        for cmd in [
            "PFADD s a",
            "PFADD s",
            "PFCOUNT s",
            "PFCOUNT a s",
            "PFMERGE s a",
            "PFMERGE a s",
        ] {
            assert_eq!(error(&mut s, cmd), not_hll, "{cmd}");
        }
        for cmd in [
            "PFADD h a",
            "PFCOUNT h",
            "PFCOUNT a h",
            "PFMERGE a h",
            "PFDEBUG ENCODING h",
        ] {
            assert_eq!(error(&mut s, cmd), "WRONGTYPE", "{cmd}");
        }
        // The first bad key in order decides.
        assert_eq!(error(&mut s, "PFCOUNT h s"), "WRONGTYPE");
        assert_eq!(error(&mut s, "PFCOUNT s h"), not_hll);
        // Bad headers: magic, encoding, dense length, short.
        for v in [
            "48594c580100000000000000000000807fff",
            "48594c4c0200000000000000000000807fff",
            "48594c4c0000000000000000000000807fff",
            "48594c4c0100000000000000000000",
        ] {
            set(&mut s, "bad", &hex(v), None);
            assert_eq!(error(&mut s, "PFCOUNT bad"), not_hll, "{v}");
        }
        // A sparse code covering the wrong number of registers.
        let corrupt = "INVALIDOBJ Corrupted HLL object detected";
        set(
            &mut s,
            "c",
            &hex("48594c4c0100000000000000000000807ffe"),
            None,
        );
        for cmd in [
            "PFCOUNT c",
            "PFCOUNT a c",
            "PFMERGE m c",
            "PFDEBUG GETREG c",
            "PFDEBUG TODENSE c",
        ] {
            assert_eq!(error(&mut s, cmd), corrupt, "{cmd}");
        }
        assert_eq!(
            error(&mut s, "PFADD"),
            "ERR wrong number of arguments for 'pfadd' command"
        );
        assert_eq!(
            error(&mut s, "PFCOUNT"),
            "ERR wrong number of arguments for 'pfcount' command"
        );
        assert_eq!(
            error(&mut s, "PFMERGE"),
            "ERR wrong number of arguments for 'pfmerge' command"
        );
        assert_eq!(
            error(&mut s, "PFDEBUG x"),
            "ERR wrong number of arguments for 'pfdebug' command"
        );
        assert_eq!(
            error(&mut s, "PFDEBUG nope missing"),
            "ERR The specified key does not exist"
        );
        assert_eq!(
            error(&mut s, "PFDEBUG nope a"),
            "ERR Unknown PFDEBUG subcommand 'nope'"
        );
    }

    #[test]
    fn pfadd_on_a_partly_corrupt_sparse_keeps_what_it_changed_before_failing() {
        // XZERO:8192 only: q1 falls in it, q0 past it (Redis answers the error and keeps q1).
        let mut s = space();
        set(
            &mut s,
            "c",
            &hex("48594c4c0100000005000000000000005fff"),
            None,
        );
        assert_eq!(
            error(&mut s, "PFADD c q1 q0 r0"),
            "INVALIDOBJ Corrupted HLL object detected"
        );
        assert_eq!(
            get_hex(&mut s, "c"),
            "48594c4c0100000005000000000000804df7805206"
        );
    }

    #[test]
    fn a_truncated_final_xzero_is_edited_as_redis_edits_it() {
        // XZERO:16127 then an XZERO whose second byte is missing (Redis reads its string's
        // terminator, 0: 257 registers). Splitting it writes one byte past the end, which the
        // next edit in the same command reads.
        let mut s = space();
        set(
            &mut s,
            "t",
            &hex("48594c4c010000000000000000000080 7efe41"
                .replace(' ', "")
                .as_str()),
            None,
        );
        assert_eq!(
            run(&mut s, "PFADD t t71 t184 t198 t273 t280 t557").unwrap(),
            int(1)
        );
        assert_eq!(
            get_hex(&mut s, "t"),
            "48594c4c0100000000000000000000807efe1c800f842f84228c404e802580"
        );
        // Redis, after a reload, finds it corrupt too.
        assert_eq!(
            error(&mut s, "PFCOUNT t"),
            "INVALIDOBJ Corrupted HLL object detected"
        );
    }

    fn dense_of(value: u8) -> Vec<u8> {
        let mut v = hex("48594c4c000000000000000000000080");
        v.resize(DENSE_SIZE, 0);
        for i in 0..REGISTERS {
            dense_put(&mut v[HEADER..], i, value);
        }
        v
    }

    #[test]
    fn degenerate_dense_values_count_as_redis_on_x86_64() {
        let mut s = space();
        for (value, want) in [
            (1u8, 23637i64),
            (32, 50_760_319_129_350),
            (33, 101_520_638_258_700),
            (50, i64::MIN),
            (51, i64::MIN),
            (63, i64::MIN),
        ] {
            set(&mut s, "d", &dense_of(value), None);
            assert_eq!(
                run(&mut s, "PFCOUNT d").unwrap(),
                int(want),
                "all registers {value}"
            );
        }
        // The overflowed count is stored as 2^63, so it stays stale.
        assert_eq!(
            &get_hex(&mut s, "d")[..32],
            "48594c4c000000000000000000000080"
        );
    }

    #[test]
    fn pfdebug_views_match_redis() {
        let mut s = space();
        run(&mut s, "PFADD a x").unwrap();
        assert_eq!(
            run(&mut s, "PFDEBUG DECODE a").unwrap(),
            crate::strings::tests::bulk(b"Z:16374 v:2,1 z:9")
        );
        assert_eq!(
            run(&mut s, "PFDEBUG encoding a").unwrap(),
            Reply::Status("sparse".into())
        );
        let Reply::Array(regs) = run(&mut s, "PFDEBUG GETREG a").unwrap() else {
            panic!("an array")
        };
        assert_eq!(regs.len(), REGISTERS);
        assert_eq!(regs[16374], int(2));
        assert_eq!(regs.iter().filter(|r| **r != int(0)).count(), 1);
        // GETREG made it dense, for good.
        assert_eq!(run(&mut s, "PFDEBUG TODENSE a").unwrap(), int(0));
        assert_eq!(
            error(&mut s, "PFDEBUG DECODE a"),
            "ERR HLL encoding is not sparse"
        );
        run(&mut s, "PFADD b x").unwrap();
        assert_eq!(run(&mut s, "PFDEBUG Todense b").unwrap(), int(1));
        assert_eq!(get_hex(&mut s, "a"), get_hex(&mut s, "b"));
        assert_eq!(run(&mut s, "PFCOUNT b").unwrap(), int(1));
    }

    #[test]
    fn the_value_type_counts_merges_and_keeps_pfadds_bytes() {
        let mut space = MapSpace::default();
        add_range(&mut space, "k", "e", 500).unwrap();
        let mut a = HyperLogLog::new();
        let mut b = HyperLogLog::new();
        for i in 0..500 {
            let e = format!("e{i}");
            if i % 2 == 0 {
                a.add(e.as_bytes()).unwrap()
            } else {
                b.add(e.as_bytes()).unwrap()
            };
        }
        let mut whole = HyperLogLog::new();
        for i in 0..500 {
            whole.add(format!("e{i}").as_bytes()).unwrap();
        }
        // PFADD's bytes (the header's cached count aside: PFADD leaves it stale, as here).
        assert_eq!(to_hex(whole.as_bytes()), get_hex(&mut space, "k"));
        a.merge(&b).unwrap();
        assert_eq!(a.count().unwrap(), whole.count().unwrap());
        assert!((480..=520).contains(&whole.count().unwrap()));
        assert_eq!(HyperLogLog::from_bytes(whole.as_bytes()).unwrap(), whole);
        assert!(HyperLogLog::from_bytes(b"HYLL").is_err());
        let mut corrupt = HyperLogLog::new().as_bytes().to_vec();
        corrupt.truncate(HEADER + 1);
        assert!(HyperLogLog::from_bytes(&corrupt).is_err());
        // A cut-off final XZERO (its second byte missing) is refused.
        let mut cut = HyperLogLog::new().as_bytes()[..HEADER].to_vec();
        cut.extend_from_slice(&[0x7E, 0xFE, 0x41]);
        assert!(HyperLogLog::from_bytes(&cut).is_err());
        // Merged sketches are equal strings whatever the order, sparse or dense.
        for n in [50, 20_000] {
            let (mut x, mut y) = (HyperLogLog::new(), HyperLogLog::new());
            for i in 0..n {
                let e = format!("m{i}");
                if i % 3 == 0 {
                    x.add(e.as_bytes()).unwrap()
                } else {
                    y.add(e.as_bytes()).unwrap()
                };
            }
            let mut xy = x.clone();
            xy.merge(&y).unwrap();
            let mut yx = y.clone();
            yx.merge(&x).unwrap();
            assert_eq!(xy, yx);
            let mut whole = HyperLogLog::new();
            for i in 0..n {
                whole.add(format!("m{i}").as_bytes()).unwrap();
            }
            assert_eq!(xy.count().unwrap(), whole.count().unwrap());
            assert_eq!(xy.as_bytes()[4] == DENSE, n == 20_000);
        }
    }

    #[test]
    fn murmur_and_pattern_match_redis_placement() {
        // "x" lands in register 16374 with value 2 (PFDEBUG DECODE in Redis: Z:16374 v:2,1).
        assert_eq!(pattern(b"x"), (16374, 2));
        // Hashing reads 8-byte blocks little-endian plus a tail of each length.
        let seen: std::collections::HashSet<u64> =
            (0..=17).map(|n| murmur64a(&vec![7u8; n], SEED)).collect();
        assert_eq!(seen.len(), 18);
    }
}
