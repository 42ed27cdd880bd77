//! `CONFIG GET`, `CONFIG SET`, `CONFIG RESETSTAT`, `CONFIG REWRITE`, `CONFIG HELP`.
//!
//! # What a setting means here
//!
//! Settings are per node, as in Redis Cluster, where `CONFIG SET` changes only the node it is
//! sent to: nothing is replicated, and a restart returns to the node's configuration (file,
//! `CAPDB_*` environment, flags). The memory settings describe the connection's keyspace (the
//! one `SELECT` chose): a `cache` keyspace has a memory limit and an eviction policy on every
//! node; `cp` and `ap` keyspaces are durable and never evict, so they read as Redis's defaults,
//! `maxmemory 0` and `noeviction`.
//!
//! | setting | `CONFIG SET` |
//! |---|---|
//! | `notify-keyspace-events` | stored and answered as Redis normalises it (`KEA` reads `AKE`) |
//! | `maxmemory`, `maxmemory-policy` | validated as Redis does; a `cache` keyspace's limit and policy change on this node (a lower limit evicts at once; `0`, no limit, is refused: a cache needs one); `cp`/`ap` read `0` and `noeviction` and refuse other values; Redis's policies other than `allkeys-lru`/`allkeys-lfu` are refused by name |
//! | `save`, `appendonly`, `databases`, `maxclients`, `maxmemory-samples`, `port`, `cluster-enabled`, `proto-max-bulk-len`, `client-query-buffer-limit` | readable; `can't set immutable config` (they come from the node's configuration) |
//! | the encoding thresholds: `hash-max-listpack-entries`/`-value`, `set-max-intset-entries`, `zset-max-listpack-entries`/`-value`, `list-max-listpack-size`, `list-compress-depth` (and the `ziplist` aliases) | readable, Redis 7.0's defaults; `can't set immutable config` (Redis can change them; capdb's are fixed) |
//!
//! `CONFIG SET` with several pairs is all or nothing, as Redis's: every name is checked
//! (unknown, immutable, duplicate: the first problem wins), then every value, and only then is
//! anything applied. Error texts are Redis 7.0's, compared reply by reply with redis-server
//! 7.0.15.

use bytes::Bytes;
use capdb_data::glob;
use capdb_types::keyspace::{EvictionPolicy, Mode};

use super::Outcome;
use crate::node::settings::KeyspaceEvents;
use crate::resp::Connection;

/// How a setting is written: not at all, or through a check that returns the change to apply.
enum Setter {
    Immutable,
    Check(fn(&Connection, &[u8]) -> Result<Change, String>),
}

/// A checked `CONFIG SET` value, applied once every pair of the command has been checked.
enum Change {
    /// The value is what the node already has.
    Keep,
    KeyspaceEvents(KeyspaceEvents),
    /// A cache keyspace's memory limit (bytes).
    MaxMemory(u64),
    /// A cache keyspace's eviction policy.
    Policy(EvictionPolicy),
}

struct Param {
    name: &'static str,
    get: fn(&Connection) -> String,
    set: Setter,
}

/// Every setting `CONFIG GET` answers, in the order it lists them.
const PARAMS: &[Param] = &[
    Param {
        name: "maxmemory",
        get: |c| max_memory_bytes(c).to_string(),
        set: Setter::Check(set_max_memory),
    },
    Param {
        name: "maxmemory-policy",
        get: |c| policy_name(c).into(),
        set: Setter::Check(set_max_memory_policy),
    },
    Param {
        name: "maxmemory-samples",
        // The cache samples this many entries per eviction (storage/src/memory).
        get: |_| "5".into(),
        set: Setter::Immutable,
    },
    Param {
        name: "notify-keyspace-events",
        get: |c| c.node.settings.keyspace_events().to_flag_string(),
        set: Setter::Check(set_keyspace_events),
    },
    Param {
        name: "save",
        get: |_| String::new(),
        set: Setter::Immutable,
    },
    Param {
        name: "appendonly",
        get: |_| "no".into(),
        set: Setter::Immutable,
    },
    Param {
        name: "databases",
        get: |c| c.node.keyspaces().len().to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "maxclients",
        get: |c| c.node.config.limits.connections_max.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "port",
        get: |c| c.node.config.resp_addr.port().to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "cluster-enabled",
        get: |c| {
            if c.node.config.redis_cluster {
                "yes"
            } else {
                "no"
            }
            .into()
        },
        set: Setter::Immutable,
    },
    Param {
        name: "proto-max-bulk-len",
        get: |c| c.node.config.limits.value_bytes_max.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "client-query-buffer-limit",
        get: |c| c.node.config.limits.frame_bytes_max.to_string(),
        set: Setter::Immutable,
    },
    // Where Redis 7.0 leaves its compact encodings (OBJECT ENCODING, HSCAN/SSCAN/ZSCAN paging
    // follow them): redis-server 7.0.15's defaults, fixed in `capdb-data`. Each under its
    // 7.0 name and its older alias, as Redis lists them.
    Param {
        name: "hash-max-listpack-entries",
        get: |_| capdb_data::hash::LISTPACK_ENTRIES.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "hash-max-ziplist-entries",
        get: |_| capdb_data::hash::LISTPACK_ENTRIES.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "hash-max-listpack-value",
        get: |_| capdb_data::hash::LISTPACK_VALUE.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "hash-max-ziplist-value",
        get: |_| capdb_data::hash::LISTPACK_VALUE.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "set-max-intset-entries",
        get: |_| capdb_data::set::INTSET_ENTRIES.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "zset-max-listpack-entries",
        get: |_| capdb_data::zset::LISTPACK_ENTRIES.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "zset-max-ziplist-entries",
        get: |_| capdb_data::zset::LISTPACK_ENTRIES.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "zset-max-listpack-value",
        get: |_| capdb_data::zset::LISTPACK_VALUE.to_string(),
        set: Setter::Immutable,
    },
    Param {
        name: "zset-max-ziplist-value",
        get: |_| capdb_data::zset::LISTPACK_VALUE.to_string(),
        set: Setter::Immutable,
    },
    // Lists are quicklists (Redis 7.0's only list encoding) with these defaults.
    Param {
        name: "list-max-listpack-size",
        get: |_| "-2".into(),
        set: Setter::Immutable,
    },
    Param {
        name: "list-max-ziplist-size",
        get: |_| "-2".into(),
        set: Setter::Immutable,
    },
    Param {
        name: "list-compress-depth",
        get: |_| "0".into(),
        set: Setter::Immutable,
    },
];

fn param(name: &[u8]) -> Option<&'static Param> {
    PARAMS
        .iter()
        .find(|p| p.name.as_bytes().eq_ignore_ascii_case(name))
}

const HELP: &[&str] = &[
    "CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GET <pattern>",
    "    Return parameters matching the glob-like <pattern> and their values.",
    "SET <directive> <value>",
    "    Set the configuration <directive> to <value>.",
    "RESETSTAT",
    "    Reset statistics reported by the INFO command.",
    "REWRITE",
    "    Rewrite the configuration file.",
    "HELP",
    "    Prints this help.",
];

/// `CONFIG <subcommand> ...`.
pub(super) fn config(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = args[1].to_ascii_lowercase();
    match (&sub[..], args.len()) {
        (b"get", 3..) => get(conn, &args[2..]),
        (b"set", 4..) => set(conn, &args[2..]),
        (b"resetstat", 2) => Err(
            "ERR CONFIG RESETSTAT is not supported: capdb's statistics are Prometheus counters, which never go back to zero"
                .into(),
        ),
        (b"rewrite", 2) => Err(
            "ERR CONFIG REWRITE is not supported: CONFIG SET lasts until the node restarts; capdb is configured by its TOML file, CAPDB_* environment variables and flags"
                .into(),
        ),
        (b"help", 2) => {
            conn.out.array(HELP.len());
            for line in HELP {
                conn.out.simple(line);
            }
            Ok(())
        }
        (b"get" | b"set" | b"resetstat" | b"rewrite" | b"help", _) => Err(format!(
            "ERR wrong number of arguments for 'config|{}' command",
            String::from_utf8_lossy(&sub)
        )),
        _ => Err(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

/// `CONFIG GET pattern [pattern ...]`: each matching setting once. As Redis 7: a pattern
/// without glob characters names its setting as typed (`CONFIG GET MAXMEMORY` answers
/// `MAXMEMORY`), a glob matches names case-insensitively and answers them lowercase.
fn get(conn: &mut Connection, patterns: &[Bytes]) -> Outcome {
    let mut found: Vec<(&'static Param, String)> = Vec::new();
    for pattern in patterns {
        let is_glob = pattern.iter().any(|b| matches!(b, b'*' | b'?' | b'['));
        if !is_glob {
            if let Some(p) = param(pattern)
                && !found.iter().any(|(f, _)| std::ptr::eq(*f, p))
            {
                found.push((p, String::from_utf8_lossy(pattern).into_owned()));
            }
            continue;
        }
        let pattern = pattern.to_ascii_lowercase();
        for p in PARAMS {
            if glob::matches(&pattern, p.name.as_bytes())
                && !found.iter().any(|(f, _)| std::ptr::eq(*f, p))
            {
                found.push((p, p.name.to_string()));
            }
        }
    }
    conn.out.map(found.len());
    for (p, shown) in found {
        let value = (p.get)(conn);
        conn.out.bulk(shown.as_bytes());
        conn.out.bulk(value.as_bytes());
    }
    Ok(())
}

/// `CONFIG SET name value [name value ...]`: all or nothing (see the module doc).
fn set(conn: &mut Connection, pairs: &[Bytes]) -> Outcome {
    if !pairs.len().is_multiple_of(2) {
        return Err("ERR syntax error".into());
    }
    let failed = |name: &str, why: &str| {
        format!("ERR CONFIG SET failed (possibly related to argument '{name}') - {why}")
    };
    // Names first: unknown, immutable or repeated; the first problem wins.
    let mut checks = Vec::with_capacity(pairs.len() / 2);
    for (i, pair) in pairs.chunks(2).enumerate() {
        let typed = String::from_utf8_lossy(&pair[0]);
        let Some(p) = param(&pair[0]) else {
            return Err(format!(
                "ERR Unknown option or number of arguments for CONFIG SET - '{typed}'"
            ));
        };
        let Setter::Check(check) = p.set else {
            return Err(failed(&typed, "can't set immutable config"));
        };
        if pairs[..2 * i]
            .chunks(2)
            .any(|earlier| param(&earlier[0]).is_some_and(|e| std::ptr::eq(e, p)))
        {
            return Err(failed(&typed, "duplicate parameter"));
        }
        checks.push((p, check, &pair[1]));
    }
    // Then every value, before anything changes.
    let mut changes = Vec::with_capacity(checks.len());
    for (p, check, value) in checks {
        changes.push(check(conn, value).map_err(|why| failed(p.name, &why))?);
    }
    for change in changes {
        match change {
            Change::Keep => {}
            Change::MaxMemory(bytes) => {
                if let Some((_, policy)) = conn.keyspace.cache_limits() {
                    conn.keyspace
                        .set_cache_limits(bytes, policy, conn.now_ms)
                        .map_err(|e| failed("maxmemory", &e.to_string()))?;
                }
            }
            Change::Policy(policy) => {
                if let Some((bytes, _)) = conn.keyspace.cache_limits() {
                    conn.keyspace
                        .set_cache_limits(bytes, policy, conn.now_ms)
                        .map_err(|e| failed("maxmemory-policy", &e.to_string()))?;
                }
            }
            Change::KeyspaceEvents(e) => {
                conn.node.settings.set_keyspace_events(e);
                // Before answering OK: a removal right after it is announced (the expiry tick
                // would switch the cache's notices on only up to 100 ms later).
                for ks in conn.node.keyspaces() {
                    ks.notice_cache_removals(e.active());
                }
            }
        }
    }
    conn.out.ok();
    Ok(())
}

fn set_keyspace_events(_: &Connection, value: &[u8]) -> Result<Change, String> {
    KeyspaceEvents::parse(value)
        .map(Change::KeyspaceEvents)
        .ok_or_else(|| "Invalid event class character. Use 'Ag$lshzxeKEtmdn'.".into())
}

/// The connection's keyspace's memory limit: a `cache` keyspace's, else 0 (no limit).
fn max_memory_bytes(conn: &Connection) -> u64 {
    conn.keyspace.cache_limits().map_or(0, |(bytes, _)| bytes)
}

fn policy_name(conn: &Connection) -> &'static str {
    match conn.keyspace.cache_limits() {
        Some((_, EvictionPolicy::Lfu)) => "allkeys-lfu",
        Some((_, EvictionPolicy::Lru)) => "allkeys-lru",
        None => "noeviction",
    }
}

fn set_max_memory(conn: &Connection, value: &[u8]) -> Result<Change, String> {
    let bytes = parse_memory(value).ok_or("argument must be a memory value")?;
    if bytes == max_memory_bytes(conn) {
        return Ok(Change::Keep);
    }
    let ks = &conn.keyspace.spec;
    Err(match ks.mode {
        Mode::Cache if bytes > 0 => return Ok(Change::MaxMemory(bytes)),
        Mode::Cache => format!(
            "cache keyspace '{}' needs a memory limit (Redis's 0, no limit, is not available)",
            ks.name
        ),
        Mode::Cp | Mode::Ap => format!(
            "keyspace '{}' is durable ({}) and has no memory limit; only cache keyspaces have one",
            ks.name,
            ks.mode.as_str()
        ),
    })
}

/// Redis's eviction policies; capdb's cache implements the two `allkeys-` sampled ones.
const POLICIES: &[&str] = &[
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "noeviction",
];

fn set_max_memory_policy(conn: &Connection, value: &[u8]) -> Result<Change, String> {
    let Some(policy) = POLICIES
        .iter()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(value))
    else {
        return Err(format!(
            "argument(s) must be one of the following: {}",
            POLICIES.join(", ")
        ));
    };
    if *policy == policy_name(conn) {
        return Ok(Change::Keep);
    }
    let ks = &conn.keyspace.spec;
    Err(match ks.mode {
        Mode::Cache if *policy == "allkeys-lru" => return Ok(Change::Policy(EvictionPolicy::Lru)),
        Mode::Cache if *policy == "allkeys-lfu" => return Ok(Change::Policy(EvictionPolicy::Lfu)),
        Mode::Cache => {
            format!("capdb's cache evicts with allkeys-lru or allkeys-lfu only, not {policy}")
        }
        Mode::Cp | Mode::Ap => format!(
            "keyspace '{}' is durable ({}) and never evicts: its policy is noeviction",
            ks.name,
            ks.mode.as_str()
        ),
    })
}

/// A memory value as Redis reads one (`memtoull`): digits, then optionally `b`, `k` (1000),
/// `kb` (1024), `m`, `mb`, `g`, `gb`, any case. `None` when malformed, and (unlike Redis,
/// which saturates or wraps) when beyond `u64`.
fn parse_memory(value: &[u8]) -> Option<u64> {
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, unit) = value.split_at(digits);
    let unit = unit.to_ascii_lowercase();
    let multiplier: u64 = match &unit[..] {
        b"" | b"b" => 1,
        b"k" => 1000,
        b"kb" => 1024,
        b"m" => 1000 * 1000,
        b"mb" => 1024 * 1024,
        b"g" => 1000 * 1000 * 1000,
        b"gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    // Redis reads no digits as 0 (`CONFIG SET maxmemory ""` sets 0).
    let n: u64 = if number.is_empty() {
        0
    } else {
        std::str::from_utf8(number).ok()?.parse().ok()?
    };
    n.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_values_are_read_as_redis_reads_them() {
        assert_eq!(parse_memory(b"100mb"), Some(104_857_600));
        assert_eq!(parse_memory(b"1GB"), Some(1_073_741_824));
        assert_eq!(parse_memory(b"5k"), Some(5_000));
        assert_eq!(parse_memory(b"7"), Some(7));
        assert_eq!(parse_memory(b"0"), Some(0));
        assert_eq!(parse_memory(b""), Some(0));
        for bad in [&b"-1"[..], b"1.5mb", b"x", b"1 mb", b"99999999999999999999"] {
            assert_eq!(parse_memory(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
