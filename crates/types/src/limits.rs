//! Documented bounds. Every limit a client can hit lives here (defaults) and in the server's
//! configuration (overrides), and is enforced with a clear error, never a panic or an unbounded
//! allocation.

/// Largest key, in bytes. Keys are copied into hash tables and B-tree pages; 64 KiB keeps a page
/// holding several keys. (Redis allows 512 MB; no real workload needs that.)
pub const KEY_BYTES_MAX: usize = 64 * 1024;

/// Default largest value, in bytes (configurable as `limits.value_bytes_max`).
pub const VALUE_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;

/// Default largest RESP frame (a whole command with all its arguments), in bytes. Must exceed
/// the value limit so that `SET key <max value>` fits.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// Largest number of elements in one RESP array (arguments of one command), as in Redis.
pub const FRAME_ELEMENTS_MAX: usize = 1024 * 1024;

/// Deepest RESP nesting accepted (commands are flat arrays; nesting is only ever an attack).
pub const FRAME_DEPTH_MAX: usize = 8;

/// Default number of commands run from one read of a pipelining client before its replies are
/// flushed. Replies are never buffered beyond this, and a client that does not read its replies
/// is slowed by TCP backpressure instead of growing server memory.
pub const PIPELINE_DEPTH_MAX_DEFAULT: usize = 1024;

/// Default number of simultaneous client connections (RESP); more are refused with an error.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;

/// Default largest HTTP request body, in bytes (a value plus JSON overhead).
pub const HTTP_BODY_BYTES_MAX_DEFAULT: usize = VALUE_BYTES_MAX_DEFAULT + 64 * 1024;

/// Largest number of keys a single SCAN (RESP or HTTP) returns in one page.
pub const SCAN_COUNT_MAX: usize = 10_000;

/// Checks a key against [`KEY_BYTES_MAX`] and rejects empty keys.
pub fn check_key(key: &[u8]) -> crate::Result<()> {
    if key.is_empty() {
        return Err(crate::Error::InvalidInput("key must not be empty".into()));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(crate::Error::TooLarge {
            what: "key".into(),
            size: key.len(),
            limit: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

/// Checks a value against the configured maximum.
pub fn check_value(value: &[u8], value_bytes_max: usize) -> crate::Result<()> {
    if value.len() > value_bytes_max {
        return Err(crate::Error::TooLarge {
            what: "value".into(),
            size: value.len(),
            limit: value_bytes_max,
        });
    }
    Ok(())
}

const _: () = assert!(FRAME_BYTES_MAX_DEFAULT > VALUE_BYTES_MAX_DEFAULT + KEY_BYTES_MAX);
const _: () = assert!(HTTP_BODY_BYTES_MAX_DEFAULT > VALUE_BYTES_MAX_DEFAULT);
