//! The log engines under test.

pub mod raftengine;
pub mod redb;
pub mod seglog;

use std::path::Path;

use crate::{Result, ctx};

/// fsync of a directory, so created or renamed files survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx(format!("fsync dir {}", dir.display())))
}

/// Most groups any configuration uses.
pub const GROUPS_MAX: usize = 64;

/// Log entries kept per group: older ones are purged as the log grows (as openraft purges
/// after a snapshot), so every engine runs in a steady state instead of growing forever.
pub const KEEP: u64 = 8192;
/// How often (in entries of one group) the purge runs.
pub const PURGE_EVERY: u64 = 4096;
