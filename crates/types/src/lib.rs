//! Shared vocabulary of capdb: everything the layers above agree on.
//!
//! It must not depend on any other capdb crate, nor do I/O: every layer uses it, so it stays
//! pure data and pure functions.
//!
//! # Layout
//!
//! - [`value`]: a stored value and its header (HLC timestamp, tombstone flag, expiry), and the
//!   checksummed byte encoding every engine writes to disk.
//! - [`hlc`]: the hybrid logical clock that stamps every write.
//! - [`mutation`]: every state change a client can ask for (SET with its options, INCRBY, APPEND,
//!   EXPIRE, ...) as data, with one pure function that applies it to the current value. Engines
//!   call that function instead of re-implementing Redis semantics, and a replicated log can carry
//!   a mutation unchanged because it holds absolute times, never "now".
//! - [`keyspace`]: keyspace names, modes (`cp`, `ap`, `cache`) and their specification.
//! - [`merge`] and [`composite`]: how `ap` replicas merge versions (last writer wins,
//!   PN-counters, and per-element rules for collections).
//! - [`txn`]: transactions across `cp` shards: locks, a participant's states and steps, and
//!   the commit rule, as pure functions every replica runs while applying its log.
//! - [`limits`]: the documented bounds on keys, values and frames.
//! - [`error`]: errors shaped by what the caller must do.
//!
//! This crate has no I/O and no async runtime: it must stay cheap to compile and trivially
//! testable.

pub mod changes;
pub mod composite;
pub mod consistency;
pub mod error;
pub mod hlc;
pub mod ids;
pub mod jobs;
pub mod keyspace;
pub mod limits;
pub mod merge;
pub mod mutation;
pub mod txn;
pub mod value;
pub mod views;

pub use consistency::ReadMode;
pub use error::{Error, Result};
pub use hlc::{Hlc, Timestamp};
pub use ids::{GroupId, NodeId};
pub use keyspace::{EvictionPolicy, KeyspaceName, KeyspaceSpec, Mode};
pub use mutation::{Effect, Mutation, Reply};
pub use value::{Header, Value, ValueKind};

/// Milliseconds since the Unix epoch, from the system clock.
///
/// Expiry times are absolute Unix milliseconds (as Redis stores them), so they survive restarts
/// and can be carried in a replicated log unchanged.
///
/// Includes the fault-injection offset set by [`set_clock_offset_ms`] (zero in production).
pub fn unix_now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_add_signed(CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Shifts this process's wall clock (`capdb chaos` clock nemesis). Raft timing uses the
/// monotonic clock and is unaffected; HLC timestamps and TTL deadlines see the shift.
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Sets the fault-injection clock offset (only reachable through `--debug-fault-injection`).
pub fn set_clock_offset_ms(offset_ms: i64) {
    CLOCK_OFFSET_MS.store(offset_ms, std::sync::atomic::Ordering::Relaxed);
}

/// The current fault-injection clock offset.
pub fn clock_offset_ms() -> i64 {
    CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}
