//! How strongly a read must be confirmed.

use serde::{Deserialize, Serialize};

/// How a `cp` read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// ReadIndex on the leader, then a local read: never stale.
    Linearizable,
    /// The receiving replica's local state, possibly behind the leader.
    Stale,
}
