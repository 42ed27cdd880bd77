//! A double-ended queue in chunks: what holds a cached list's elements (`elements.rs`, runs).
//!
//! One `VecDeque` for a whole list doubles its buffer as the list grows: at a million
//! elements each doubling copies tens of megabytes into memory touched for the first time, and
//! the client whose push triggered it (and everyone queued behind that shard's lock) waits for
//! it. `redis-benchmark -t lpush -n 3000000 -P 16` showed it: a one-second window at a tenth of
//! the usual rate, and page zeroing plus that copy a quarter of the CPU profile. Pushing 4
//! million elements at the front (release, loaded 2-core machine, 3 rounds): the slowest single
//! push took 14–132 ms with one `VecDeque` and 2–3 ms (scheduling noise) in chunks, for the
//! same total time (0.43–0.56 s against 0.38–0.44 s). Redis's quicklist avoids this with a list
//! of small nodes; this is the same idea for slots of `T`.
//!
//! # Shape
//!
//! `chunks` holds the elements in order, each chunk non-empty. Every chunk but the first and the
//! last holds exactly [`CHUNK`] elements, so the element at index `i` is found by arithmetic:
//! in the first chunk if `i` is below its length, else at `(i - first_len) / CHUNK` chunks
//! further, at offset `(i - first_len) % CHUNK`. Only the ends change (pushes and pops at either
//! end; elements in between are only read or replaced), which keeps that invariant: a push goes
//! into the end chunk while it has room, else into a new chunk of its own; a pop that empties
//! an end chunk drops it.
//!
//! A list of up to [`CHUNK`] elements is one chunk that grows as a `VecDeque` does, so a small
//! list costs what it did before; a chunk opened at a full end is allocated at [`CHUNK`] slots
//! at once. The largest single allocation is a chunk's, or the chunk index of a huge list
//! (a pointer-sized slot per [`CHUNK`] elements).

use std::collections::VecDeque;

/// Elements per chunk (a power of two, so the index arithmetic is shifts and masks). At 32
/// bytes per `Bytes` slot a full chunk is a 16 KiB allocation.
pub const CHUNK: usize = 512;

#[derive(Debug)]
pub(crate) struct ChunkedDeque<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for ChunkedDeque<T> {
    fn default() -> Self {
        ChunkedDeque {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> ChunkedDeque<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Which chunk, and where in it, index `i` (< len) is.
    fn locate(&self, i: usize) -> (usize, usize) {
        debug_assert!(i < self.len);
        let first = self.chunks.front().map_or(0, VecDeque::len);
        if i < first {
            (0, i)
        } else {
            let j = i - first;
            (1 + j / CHUNK, j % CHUNK)
        }
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        let (c, at) = self.locate(i);
        self.chunks.get(c)?.get(at)
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        let (c, at) = self.locate(i);
        self.chunks.get_mut(c)?.get_mut(at)
    }

    pub(crate) fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(value),
            _ => {
                let mut chunk = self.new_chunk();
                chunk.push_back(value);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn push_front(&mut self, value: T) {
        match self.chunks.front_mut() {
            Some(first) if first.len() < CHUNK => first.push_front(value),
            _ => {
                let mut chunk = self.new_chunk();
                chunk.push_front(value);
                self.chunks.push_front(chunk);
            }
        }
        self.len += 1;
    }

    /// A chunk for a new end: grown as needed while the list is its only chunk, else
    /// allocated full size once (it will fill before another is opened at this end).
    fn new_chunk(&self) -> VecDeque<T> {
        if self.chunks.is_empty() {
            VecDeque::new()
        } else {
            VecDeque::with_capacity(CHUNK)
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let value = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        debug_assert!(value.is_some(), "chunks are never empty");
        self.len -= usize::from(value.is_some());
        value
    }

    pub(crate) fn pop_back(&mut self) -> Option<T> {
        let last = self.chunks.back_mut()?;
        let value = last.pop_back();
        if last.is_empty() {
            self.chunks.pop_back();
        }
        debug_assert!(value.is_some(), "chunks are never empty");
        self.len -= usize::from(value.is_some());
        value
    }

    /// Every element, front to back.
    pub(crate) fn into_values(self) -> impl Iterator<Item = T> {
        self.chunks.into_iter().flatten()
    }

    /// The elements at indices `from..to` (clamped to the length), front to back. Costs the
    /// chunks it spans, not the list's length.
    pub(crate) fn range(&self, from: usize, to: usize) -> impl DoubleEndedIterator<Item = &T> {
        let to = to.min(self.len);
        let from = from.min(to);
        // Chunks `c0..c_end`, from offset `a0` in the first to offset `b1` in the last.
        let (c0, a0, c_end, b1) = if from < to {
            let (c0, a0) = self.locate(from);
            let (c1, b1) = self.locate(to - 1);
            (c0, a0, c1 + 1, b1 + 1)
        } else {
            (0, 0, 0, 0)
        };
        self.chunks
            .range(c0..c_end)
            .enumerate()
            .flat_map(move |(k, chunk)| {
                let c = c0 + k;
                let lo = if c == c0 { a0 } else { 0 };
                let hi = if c + 1 == c_end { b1 } else { chunk.len() };
                chunk.range(lo..hi)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_shape<T>(d: &ChunkedDeque<T>) {
        assert_eq!(d.chunks.iter().map(VecDeque::len).sum::<usize>(), d.len);
        assert!(d.chunks.iter().all(|c| !c.is_empty()), "no empty chunk");
        let n = d.chunks.len();
        for (i, c) in d.chunks.iter().enumerate() {
            if i != 0 && i + 1 != n {
                assert_eq!(c.len(), CHUNK, "interior chunks are full");
            }
            assert!(c.len() <= CHUNK);
        }
    }

    /// Random pushes, pops, reads, replacements and ranges answer as one `VecDeque` does, and
    /// the shape invariant holds after every step; lists cross several chunks both ways.
    #[test]
    fn answers_as_a_vec_deque() {
        for seed in 0..40 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut d: ChunkedDeque<u64> = ChunkedDeque::default();
            let mut model: VecDeque<u64> = VecDeque::new();
            // Phases that grow, then shrink, so the length crosses chunk edges many times.
            for step in 0..6_000u64 {
                let grow = (step / 1_500) % 2 == 0;
                match rng.u8(0..10) {
                    0..=2 if grow || rng.bool() => {
                        d.push_front(step);
                        model.push_front(step);
                    }
                    3..=5 if grow || rng.bool() => {
                        d.push_back(step);
                        model.push_back(step);
                    }
                    0..=2 => assert_eq!(d.pop_front(), model.pop_front()),
                    3..=5 => assert_eq!(d.pop_back(), model.pop_back()),
                    6 => {
                        let i = rng.usize(0..=model.len());
                        if let Some(slot) = model.get_mut(i) {
                            *slot = step;
                        }
                        if let Some(slot) = d.get_mut(i) {
                            *slot = step;
                        }
                    }
                    7 | 8 => {
                        let i = rng.usize(0..=model.len() + 1);
                        assert_eq!(d.get(i), model.get(i), "seed {seed} step {step}");
                    }
                    _ => {
                        let a = rng.usize(0..=model.len() + 2);
                        let b = rng.usize(0..=model.len() + 2);
                        let got: Vec<u64> = d.range(a, b).copied().collect();
                        let (to, from) = (b.min(model.len()), a.min(b.min(model.len())));
                        let want: Vec<u64> = model.range(from..to).copied().collect();
                        assert_eq!(got, want, "seed {seed} step {step}");
                        let got_rev: Vec<u64> = d.range(a, b).rev().copied().collect();
                        let want_rev: Vec<u64> = want.into_iter().rev().collect();
                        assert_eq!(got_rev, want_rev, "seed {seed} step {step}");
                    }
                }
                assert_eq!(d.len(), model.len());
                assert_eq!(d.is_empty(), model.is_empty());
                check_shape(&d);
            }
            let all: Vec<u64> = d.into_values().collect();
            assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_long_list_is_many_chunks_and_no_allocation_is_larger_than_one() {
        let mut d = ChunkedDeque::default();
        for i in 0..(10 * CHUNK as u64 + 3) {
            if i % 2 == 0 {
                d.push_back(i);
            } else {
                d.push_front(i);
            }
        }
        check_shape(&d);
        assert!(d.chunks.len() >= 10);
        assert!(d.chunks.iter().all(|c| c.capacity() <= 2 * CHUNK));
        // Index arithmetic agrees with walking the chunks.
        let walked: Vec<u64> = d.chunks.iter().flatten().copied().collect();
        for (i, v) in walked.iter().enumerate() {
            assert_eq!(d.get(i), Some(v));
        }
    }
}
