//! Hybrid logical clock (Kulkarni et al., 2014).
//!
//! A [`Timestamp`] packs wall-clock milliseconds in the high 48 bits and a logical counter in the
//! low 16 bits, so timestamps compare as plain `u64`s, stay close to real time (useful for
//! humans and for last-writer-wins in `ap` keyspaces), and still move strictly forward when the
//! wall clock stalls or steps back. [`Hlc::observe`] folds in timestamps seen from other nodes so
//! that a write causally after another always gets a larger timestamp.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Bits of the logical counter. 65,536 events per millisecond before the clock borrows from the
/// next millisecond, which is harmless: the physical part merely runs slightly ahead.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock reading; totally ordered, unique per node when issued by [`Hlc::now`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);
    /// The largest physical part a timestamp can hold.
    pub const PHYSICAL_MS_MAX: u64 = u64::MAX >> LOGICAL_BITS;

    pub fn from_parts(physical_ms: u64, logical: u16) -> Timestamp {
        Timestamp((physical_ms << LOGICAL_BITS) | logical as u64)
    }

    /// Wall-clock milliseconds since the Unix epoch this timestamp was issued at (approximately).
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & ((1 << LOGICAL_BITS) - 1)) as u16
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// A node's hybrid logical clock. Lock-free; safe to share between threads.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    pub fn new() -> Hlc {
        Hlc::default()
    }

    /// Issues a timestamp strictly greater than every timestamp issued or observed before.
    pub fn now(&self) -> Timestamp {
        self.tick(crate::unix_now_ms())
    }

    /// Issues a timestamp with the given wall clock reading (tests drive time explicitly).
    pub fn tick(&self, wall_ms: u64) -> Timestamp {
        let wall = Timestamp::from_parts(wall_ms, 0).0;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Timestamp(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// Folds in a timestamp received from elsewhere (a replica, a recovered log).
    pub fn observe(&self, seen: Timestamp) {
        self.last.fetch_max(seen.0, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_when_wall_clock_steps_back() {
        let hlc = Hlc::new();
        let a = hlc.tick(1_000);
        let b = hlc.tick(1_000);
        let c = hlc.tick(900);
        assert!(a < b && b < c);
        assert_eq!(a.physical_ms(), 1_000);
        assert_eq!(c.physical_ms(), 1_000);
        assert_eq!(c.logical(), 2);
    }

    #[test]
    fn observe_moves_the_clock_past_remote_timestamps() {
        let hlc = Hlc::new();
        let remote = Timestamp::from_parts(5_000, 7);
        hlc.observe(remote);
        assert!(hlc.tick(1_000) > remote);
    }
}
