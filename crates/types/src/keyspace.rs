//! Keyspaces: named collections of keys, each with a chosen CAP trade-off.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The name of the keyspace that always exists (mode `cp`), selected by `SELECT 0`.
pub const DEFAULT_KEYSPACE: &str = "default";

/// Longest keyspace name, in bytes.
pub const KEYSPACE_NAME_BYTES_MAX: usize = 64;

/// Largest replication factor accepted (replicas are placed on distinct nodes).
pub const REPLICATION_FACTOR_MAX: u32 = 7;

/// Largest shard count accepted per keyspace (16384 hash slots are split among them).
pub const SHARDS_MAX: u32 = 1024;

/// A validated keyspace name: 1 to 64 characters from `[A-Za-z0-9_-]`.
///
/// Names that are all digits are allowed on purpose: `SELECT 3` (from `redis-cli -n 3` or
/// `redis-benchmark --dbnum 3`) selects the keyspace named `3`, which is how tools that only know
/// Redis database numbers reach a keyspace. `SELECT 0` means the keyspace connections start in
/// (the server's `resp_keyspace`, `default` unless configured).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyspaceName(String);

impl KeyspaceName {
    pub fn new(name: impl Into<String>) -> Result<KeyspaceName> {
        let name = name.into();
        if name.is_empty() || name.len() > KEYSPACE_NAME_BYTES_MAX {
            return Err(Error::InvalidInput(format!(
                "keyspace name must be 1 to {KEYSPACE_NAME_BYTES_MAX} characters"
            )));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::InvalidInput(format!(
                "keyspace name '{name}' may only contain letters, digits, '_' and '-'"
            )));
        }
        Ok(KeyspaceName(name))
    }

    pub fn default_keyspace() -> KeyspaceName {
        KeyspaceName(DEFAULT_KEYSPACE.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyspaceName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        KeyspaceName::new(s)
    }
}

impl From<KeyspaceName> for String {
    fn from(n: KeyspaceName) -> String {
        n.0
    }
}

impl std::fmt::Display for KeyspaceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The CAP trade-off a keyspace makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Consistent: Raft-replicated shards, linearizable, durable before acknowledging.
    Cp,
    /// Available: leaderless replication with tunable quorums; deletes are tombstones.
    Ap,
    /// In memory only: TTL and eviction under a memory limit; lost on restart.
    Cache,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cp => "cp",
            Mode::Ap => "ap",
            Mode::Cache => "cache",
        }
    }

    /// Whether writes reach disk before they are acknowledged.
    pub fn is_durable(self) -> bool {
        !matches!(self, Mode::Cache)
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "cp" => Ok(Mode::Cp),
            "ap" => Ok(Mode::Ap),
            "cache" => Ok(Mode::Cache),
            other => Err(Error::InvalidInput(format!(
                "unknown keyspace mode '{other}' (expected cp, ap or cache)"
            ))),
        }
    }
}

/// Which entry a full cache keyspace evicts.
///
/// Both are Redis's sampled approximations: on each eviction a handful of random entries are
/// sampled and the worst one goes. `Lru` evicts the least recently used, `Lfu` the least
/// frequently used (a logarithmic access counter that decays over time, as Redis's `allkeys-lfu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    #[default]
    Lru,
    Lfu,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<EvictionPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "lru" | "allkeys-lru" => Ok(EvictionPolicy::Lru),
            "lfu" | "allkeys-lfu" => Ok(EvictionPolicy::Lfu),
            other => Err(Error::InvalidInput(format!(
                "unknown eviction policy '{other}' (expected lru or lfu)"
            ))),
        }
    }
}

/// Default memory limit of a cache keyspace: 256 MiB.
pub const CACHE_MAX_MEMORY_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
/// Smallest memory limit a cache keyspace takes: 1 MiB.
pub const CACHE_MAX_MEMORY_BYTES_MIN: u64 = 1024 * 1024;

/// Everything recorded about a keyspace when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceSpec {
    pub name: KeyspaceName,
    pub mode: Mode,
    /// Copies of each shard (replication arrives with clustering; recorded now).
    pub replication_factor: u32,
    /// Number of shards the 16384 hash slots are split into.
    pub shards: u32,
    /// Memory limit for `cache` keyspaces, in bytes (keys + values + per-entry overhead).
    #[serde(default)]
    pub max_memory_bytes: Option<u64>,
    /// Eviction policy for `cache` keyspaces.
    #[serde(default)]
    pub eviction: Option<EvictionPolicy>,
    /// Unix milliseconds at creation.
    pub created_at_ms: u64,
}

impl KeyspaceSpec {
    /// Builds and validates a spec, filling mode-dependent defaults.
    pub fn new(
        name: KeyspaceName,
        mode: Mode,
        replication_factor: Option<u32>,
        shards: Option<u32>,
        max_memory_bytes: Option<u64>,
        eviction: Option<EvictionPolicy>,
    ) -> Result<KeyspaceSpec> {
        let replication_factor = replication_factor.unwrap_or(3);
        let shards = shards.unwrap_or(1);
        if !(1..=REPLICATION_FACTOR_MAX).contains(&replication_factor) {
            return Err(Error::InvalidInput(format!(
                "replication factor must be 1 to {REPLICATION_FACTOR_MAX}"
            )));
        }
        if !(1..=SHARDS_MAX).contains(&shards) {
            return Err(Error::InvalidInput(format!(
                "shard count must be 1 to {SHARDS_MAX}"
            )));
        }
        let (max_memory_bytes, eviction) = match mode {
            Mode::Cache => {
                let max = max_memory_bytes.unwrap_or(CACHE_MAX_MEMORY_BYTES_DEFAULT);
                if max < CACHE_MAX_MEMORY_BYTES_MIN {
                    return Err(Error::InvalidInput(
                        "max_memory_bytes of a cache keyspace must be at least 1 MiB".into(),
                    ));
                }
                (Some(max), Some(eviction.unwrap_or_default()))
            }
            _ if max_memory_bytes.is_some() || eviction.is_some() => {
                return Err(Error::InvalidInput(
                    "max_memory_bytes and eviction apply only to cache keyspaces".into(),
                ));
            }
            _ => (None, None),
        };
        Ok(KeyspaceSpec {
            name,
            mode,
            replication_factor,
            shards,
            max_memory_bytes,
            eviction,
            created_at_ms: crate::unix_now_ms(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(KeyspaceName::new("users-v2_1").is_ok());
        assert!(KeyspaceName::new("3").is_ok());
        assert!(KeyspaceName::new("").is_err());
        assert!(KeyspaceName::new("a/b").is_err());
        assert!(KeyspaceName::new("x".repeat(65)).is_err());
    }

    #[test]
    fn cache_options_only_on_cache_keyspaces() {
        let n = KeyspaceName::new("c").unwrap();
        let s = KeyspaceSpec::new(n.clone(), Mode::Cache, None, None, None, None).unwrap();
        assert_eq!(s.max_memory_bytes, Some(CACHE_MAX_MEMORY_BYTES_DEFAULT));
        assert_eq!(s.eviction, Some(EvictionPolicy::Lru));
        assert!(KeyspaceSpec::new(n.clone(), Mode::Cp, None, None, Some(1 << 30), None).is_err());
        assert!(KeyspaceSpec::new(n, Mode::Cp, Some(0), None, None, None).is_err());
    }
}
