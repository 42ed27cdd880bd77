//! Errors shaped by what the caller must do.
//!
//! Every front end (RESP, HTTP, CLI) maps these variants to its own wire shape in one place, so
//! the decision "retry, fix the request, or give up" is made here once:
//!
//! | variant                          | caller should                    | RESP prefix | HTTP |
//! |----------------------------------|----------------------------------|-------------|------|
//! | `InvalidInput`, `NotAnInteger`, `Overflow`, `TooLarge` | fix the request | `ERR` | 400/413 |
//! | `KeyspaceNotFound`               | create the keyspace or fix name  | `ERR`       | 404  |
//! | `KeyspaceExists`                 | nothing: it is already there     | `ERR`       | 409  |
//! | `OutOfMemory`                    | shrink the value or raise limit  | `OOM`       | 507  |
//! | `Unavailable`, `ShuttingDown`    | retry (elsewhere / later): the request certainly did not take effect | `TRYAGAIN` | 503 |
//! | `OutcomeUnknown`                 | read to learn the outcome before retrying: it may or may not have taken effect | `UNCERTAIN` | 504 |
//! | `Corruption`                     | alert an operator; never retried | `CORRUPT`   | 500  |
//! | `Io`                             | alert an operator                | `ERR`       | 500  |

use thiserror::Error;

/// The result type used throughout capdb.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// The request is malformed or not allowed; retrying it unchanged fails again.
    #[error("{0}")]
    InvalidInput(String),
    /// The stored value (or an argument) is not a base-10 64-bit integer.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// An increment would overflow a 64-bit integer.
    #[error("increment or decrement would overflow")]
    Overflow,
    /// A key, value, frame or body exceeds a documented limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        what: std::borrow::Cow<'static, str>,
        size: usize,
        limit: usize,
    },
    #[error("keyspace '{0}' does not exist")]
    KeyspaceNotFound(String),
    #[error("keyspace '{0}' already exists")]
    KeyspaceExists(String),
    /// A cache keyspace cannot make room for this write (the entry alone exceeds the limit).
    #[error("command not allowed when used memory > 'maxmemory' ({0})")]
    OutOfMemory(String),
    /// The node cannot serve this now, and the request **certainly did not take effect**; the
    /// same request may succeed later or elsewhere. Redis Cluster clients retry `-TRYAGAIN`
    /// on their own, so this must never be used when the outcome is in doubt.
    #[error("{0}")]
    Unavailable(String),
    /// The node is stopping; retry on another node or after restart.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Stored data failed its checksum or could not be decoded. Never served.
    #[error("data corruption detected: {0}")]
    Corruption(String),
    /// The storage layer failed (disk full, I/O error). Durability of the request is unknown.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// A write **may or may not have taken effect** (for `ap`: it took effect on some replicas
    /// but not at the requested level): the node lost track of it, e.g. the leader failed and no
    /// other node could answer for it before the deadline. Retrying blindly could apply it
    /// twice; read the key to learn the outcome first.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// A command met a key holding another type (a hash where a string was expected, ...).
    /// Nothing changed.
    #[error("Operation against a key holding the wrong kind of value")]
    WrongType,
    /// A Redis command refused its arguments or the stored data with Redis's own error line
    /// (code first: `ERR ...`, `WRONGTYPE ...`). Nothing changed; retrying unchanged fails again.
    #[error("{0}")]
    Command(String),
    /// A key is locked by a cross-shard transaction between its prepare and its commit: the
    /// write **certainly did not take effect**; retrying it shortly will (the node retries for
    /// a bounded time before answering this). Last in the enum: older logs' replies decode.
    #[error("key is locked by transaction {0}; retry")]
    Locked(String),
}

impl Error {
    /// Whether the same request may succeed if retried later or on another node.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::ShuttingDown | Error::Locked(_)
        )
    }

    /// A short stable code for machine consumers (HTTP JSON `code`, metrics labels).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput(_) => "invalid_input",
            Error::NotAnInteger => "not_an_integer",
            Error::Overflow => "overflow",
            Error::TooLarge { .. } => "too_large",
            Error::KeyspaceNotFound(_) => "keyspace_not_found",
            Error::KeyspaceExists(_) => "keyspace_exists",
            Error::OutOfMemory(_) => "out_of_memory",
            Error::Unavailable(_) => "unavailable",
            Error::ShuttingDown => "shutting_down",
            Error::Corruption(_) => "corruption",
            Error::Io(_) => "io",
            Error::OutcomeUnknown(_) => "outcome_unknown",
            Error::WrongType => "wrong_type",
            Error::Command(_) => "command",
            Error::Locked(_) => "locked",
        }
    }
}

/// Builds an [`Error::InvalidInput`] from a format string.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::Error::InvalidInput(format!($($arg)*)) };
}
