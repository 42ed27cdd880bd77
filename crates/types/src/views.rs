//! Incremental views' replicated state (issue 15, `docs/design/mapreduce.md` §10): a view's
//! definition on each shard of its keyspace and the commands that change it, applied in log
//! order by that shard (`capdb_storage::disk` `views.rs`).
//!
//! # Why inside the apply
//!
//! A synchronous view keeps, per shard, one row per group with accumulators that can take a
//! contribution back (count, sum, avg) and multisets for min and max. Every write that
//! changes a key the view reads updates them in the same storage transaction as the write,
//! from the state before and after it: the log decides the order, the functions are pure, so
//! every replica holds the same rows and a write is counted exactly once, whoever leads.
//!
//! # How a view is built without a pause
//!
//! A new view starts `Building` with a cursor before every key. Each [`ViewCommand::Backfill`]
//! entry adds the next keys (at most [`BACKFILL_KEYS_MAX`]) as they are at that entry, and
//! moves the cursor past them; a write counts at once for a key at or before the cursor and
//! waits for the cursor otherwise. So each key is counted once, at its state when the cursor
//! passed it, plus every change after: the current state, whatever the interleaving. The
//! entry carries the cursor it expects, so a repeated or stale proposal changes nothing.
//!
//! # Async (Lua) views
//!
//! A view whose map is Lua cannot run inside the apply (user code on every replica's write
//! path, and storage must not link Lua). It is kept from the shard's change log instead: the
//! shard leader's node reads the events after the view's position (and, while it builds, a
//! page of keys from the same snapshot), maps them with Lua and proposes
//! [`ViewCommand::Advance`], a compare-and-set on where the view stands. Each event counts
//! once across leader changes, and reads can wait until a view has caught up.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Views per keyspace.
pub const VIEWS_MAX: usize = 16;
/// Longest view name, in bytes (`[A-Za-z0-9_-]`, as a job id).
pub const VIEW_NAME_MAX: usize = 64;
/// Keys one backfill entry adds, and bytes of them (after one key): small enough that an
/// entry holds the node's storage writer for milliseconds, not the tens a view with
/// min/max over a large table takes per 4,096 keys (each key a row in a large multiset).
pub const BACKFILL_KEYS_MAX: usize = 1_024;
pub const BACKFILL_BYTES_MAX: usize = 1 << 20;
/// Groups a view keeps per shard, and min/max multiset rows: past either the shard's leader
/// turns the view `overflow` ([`ViewCommand::Overflow`]; reads refuse it; VIEW DROP and a
/// narrower spec are the way out). A soft bound: writes applied before that entry count.
pub const VIEW_GROUPS_MAX: i64 = 1_000_000;
pub const VIEW_MINMAX_ROWS_MAX: i64 = 1_000_000;
/// Rows one [`ViewCommand::Purge`] entry deletes.
pub const PURGE_ROWS_MAX: usize = 1_024;
/// Change events one [`ViewCommand::Advance`] of an async view counts at most (whole
/// entries: an entry with more is taken alone), and keys of a build page it adds.
pub const ADVANCE_EVENTS_MAX: usize = 1_024;
pub const ADVANCE_KEYS_MAX: usize = 1_024;
/// Bytes of the rows' change one [`ViewCommand::Advance`] may carry: past it the view turns
/// `overflow` (a Lua map emitting that much per key is no view).
pub const ADVANCE_DELTA_BYTES_MAX: usize = 8 << 20;

/// Whether `name` is a valid view name.
pub fn name_is_valid(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= VIEW_NAME_MAX
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// Where a view stands on one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewState {
    /// Keys up to and including `cursor` are counted (`None`: none yet); `keys_done` of them.
    Building {
        cursor: Option<Bytes>,
        keys_done: u64,
    },
    /// Every key is counted; writes keep it current.
    Ready,
    /// A bound passed ([`VIEW_GROUPS_MAX`], [`VIEW_MINMAX_ROWS_MAX`]): no longer kept.
    Overflow { why: String },
}

impl ViewState {
    pub fn name(&self) -> &'static str {
        match self {
            ViewState::Building { .. } => "building",
            ViewState::Ready => "ready",
            ViewState::Overflow { .. } => "overflow",
        }
    }
}

/// A view's definition on one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDef {
    /// Which definition of the name this is: rows are keyed by it, so a view dropped and
    /// created again never meets the old one's rows (deleted in the background).
    pub generation: u64,
    /// The spec in canonical JSON (`capdb_reduce::JobSpec::canonical`): a job with it
    /// recomputes the view.
    pub spec: String,
    pub state: ViewState,
}

/// A change to a shard's views, applied alone in log order. Append-only: new variants go at
/// the end (logs hold the old ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewCommand {
    /// Defines view `name` (answers `[generation, "created"]`), or finds it defined with the same
    /// spec (answers `[its generation, "exists"]`); another spec under the name is refused.
    Define {
        name: Bytes,
        generation: u64,
        spec: String,
    },
    /// Adds the next keys after `after` to a building view of generation `generation` (answers its
    /// state: `[state, cursor]`); changes nothing unless the view is building at `after`.
    Backfill {
        name: Bytes,
        generation: u64,
        after: Option<Bytes>,
    },
    /// Removes the view's definition (answers 1, or 0 when there was none); its rows go in
    /// the background ([`ViewCommand::Purge`]).
    Drop { name: Bytes },
    /// Deletes up to [`PURGE_ROWS_MAX`] rows of a dropped generation (answers how many
    /// rows it deleted; 0: none were left).
    Purge { name: Bytes, generation: u64 },
    /// Moves an async (Lua) view from what its updater read (`from`) to what it computed
    /// (`to`), adding `delta` to its rows; changes nothing unless the view still stands
    /// exactly at `from` (answers `[state, position]` either way). So a repeated, stale or
    /// concurrent update counts nothing twice, whoever leads.
    Advance {
        name: Bytes,
        from: AsyncAt,
        to: AsyncAt,
        /// The rows' change (postcard `ViewDelta` of `capdb_storage::disk`), at most
        /// [`ADVANCE_DELTA_BYTES_MAX`].
        delta: Bytes,
    },
    /// Stops generation `generation` of view `name` (state `overflow` with `why`): proposed
    /// by the shard's leader when the view's rows pass [`VIEW_GROUPS_MAX`] or
    /// [`VIEW_MINMAX_ROWS_MAX`] there. The bound is judged by the leader, not by each
    /// replica's apply: replicas batch entries differently, so a judgement inside the apply
    /// could fall on different sides of the bound on two replicas.
    Overflow {
        name: Bytes,
        generation: u64,
        why: String,
    },
}

/// Where an async (Lua) view stands on one shard: its generation, its state (a building
/// view's cursor) and its position in the shard's change log (the stream clock of the last
/// logged entry whose events it counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncAt {
    pub generation: u64,
    pub state: ViewState,
    pub position: u64,
}

impl ViewCommand {
    pub fn name(&self) -> &Bytes {
        match self {
            ViewCommand::Define { name, .. }
            | ViewCommand::Backfill { name, .. }
            | ViewCommand::Drop { name }
            | ViewCommand::Purge { name, .. }
            | ViewCommand::Advance { name, .. }
            | ViewCommand::Overflow { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ViewCommand::Define { .. } => "define",
            ViewCommand::Backfill { .. } => "backfill",
            ViewCommand::Drop { .. } => "drop",
            ViewCommand::Purge { .. } => "purge",
            ViewCommand::Advance { .. } => "advance",
            ViewCommand::Overflow { .. } => "overflow",
        }
    }
}
