//! Server configuration: defaults, then a TOML file, then `CAPDB_*` environment variables, then
//! command-line flags; each later source overrides the earlier ones. Everything is typed and
//! validated before the server binds a socket, and every error names the setting and the source.
//!
//! The commented reference file is `config/capdb.toml` in the repository.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use capdb_types::keyspace::{DEFAULT_KEYSPACE, SHARDS_MAX};
use capdb_types::{KeyspaceName, limits};
use clap::Args;
use serde::Deserialize;

/// Resolved, validated configuration of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the node keeps its data (the redb file lives here).
    pub data_dir: PathBuf,
    /// Redis protocol listener.
    pub resp_addr: SocketAddr,
    /// HTTP/JSON API, health and metrics listener.
    pub http_addr: SocketAddr,
    /// When set, RESP clients must AUTH and HTTP clients must send `Authorization: Bearer`.
    pub password: Option<String>,
    pub limits: Limits,
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    pub shutdown_grace_ms: u64,
    /// MiB of memory the storage engine keeps pages of `capdb.redb` in (its read cache and
    /// write buffer); `None`: a quarter of the memory this node may use
    /// ([`storage_cache_bytes`]).
    pub storage_cache_mb: Option<u64>,
    pub cluster: ClusterConfig,
    /// Redis Cluster mode (`redis_cluster = true`, Redis's `cluster-enabled yes`): RESP
    /// connections start with `-MOVED` redirects on, `SCAN`/`DBSIZE`/`KEYS` answer for the slots
    /// this node serves, and `INFO` says `cluster_enabled:1`. Off by default: plain clients get
    /// every key from every node. See `resp/cluster.rs`.
    pub redis_cluster: bool,
    /// The keyspace a RESP connection starts in, which `SELECT 0` also selects (`default`
    /// unless set). Redis Cluster clients cannot `SELECT`, so in cluster mode this is the
    /// keyspace they see.
    pub resp_keyspace: KeyspaceName,
}

/// This node's place in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Stable identity of this node (never reuse an id for a node with a wiped disk).
    pub node_id: u64,
    /// Inter-node listener.
    pub peer_addr: SocketAddr,
    /// How other nodes reach this node's peer listener (defaults to `peer_addr`).
    pub advertise_addr: String,
    /// The first cluster's members, `id -> peer address` (`--initial-cluster`). A node started
    /// with neither this nor `join` forms a one-node cluster of itself.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Peer addresses of existing members to join through (`--join`).
    pub join: Vec<String>,
    /// Placement labels, e.g. `zone=a`.
    pub labels: BTreeMap<String, String>,
    /// Log entries between snapshots of a Raft group (then the log is compacted).
    pub raft_snapshot_logs: u64,
    /// Shards of the `default` keyspace, used once: when the cluster is formed and the meta
    /// leader creates it (an existing `default` keeps the shards it was created with). Give
    /// every founding node the same value.
    pub default_shards: u32,
    /// Job tasks (`JOB SUBMIT`) this node runs at once, per job: each takes a core while it
    /// runs, so more finish a job sooner and leave less for foreground requests.
    pub job_slots: usize,
    /// The nice level (0 to 19) of the threads that run job tasks here: the kernel serves
    /// foreground requests, Raft and the writer first when the cores are busy.
    pub job_nice: i32,
    /// Whether job tasks share a scan-rate limit that follows foreground latency (halved when
    /// the p99 of commands passes 1.2 times its idle value).
    pub job_throttle: bool,
    /// Testing switches that weaken guarantees on purpose; never set in production.
    pub debug: DebugConfig,
    /// Milliseconds between anti-entropy passes of `ap` keyspaces.
    pub ap_anti_entropy_interval_ms: u64,
    /// Bytes per second anti-entropy may stream from this node.
    pub ap_anti_entropy_bytes_per_sec: u64,
    /// Age before a tombstone every replica holds may be collected.
    pub ap_tombstone_grace_ms: u64,
}

/// Switches for fault-injection testing (`capdb chaos`, `capdb difftest`). All are off by default and only
/// settable by flag, so no configuration file can turn them on by accident.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugConfig {
    /// Serve linearizable reads from this node's local replica without a read barrier: a
    /// deliberately broken mode that the chaos checker must catch (stale reads).
    pub unsafe_local_reads: bool,
    /// Enable `/v1/debug/*` routes that inject faults into this node (clock offset).
    pub fault_injection: bool,
    /// Apply every copy of a retried write (exactly-once off): a deliberately broken mode that
    /// the chaos checker must catch (doubled increments, CAS answered nil though applied).
    pub apply_duplicates: bool,
    /// Run a `cp` MULTI/EXEC as one log entry per command (not atomic, WATCH ignored): a
    /// deliberately broken mode that the chaos `append` checker must catch.
    pub unsafe_txn: bool,
    /// Merged change streams release events up to the *largest* closed clock of the shards,
    /// not the smallest: a premature watermark the chaos `stream` checker must catch.
    pub unsafe_resolved: bool,
    /// `--debug-view-skip-txn`.
    pub view_skip_txn: bool,
    /// HLEN answers one too many for a hash of exactly 3 fields: a deliberately wrong reply
    /// `capdb difftest` must catch (`capdb_data::hash::PLANT_DIFFERENCE`).
    pub plant_difference: bool,
    /// The node aborts in the middle of the first cross-shard transaction it coordinates
    /// (`capdb_txn::CrashPoint`): what the recovery of orphaned locks is tested with.
    pub txn_crash: Option<capdb_txn::CrashPoint>,
}

pub const DEFAULT_PEER_ADDR: &str = "127.0.0.1:7380";

/// Bounds on what clients may send. See `capdb_types::limits` for the reasoning behind each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub value_bytes_max: usize,
    pub frame_bytes_max: usize,
    pub pipeline_depth_max: usize,
    pub connections_max: usize,
    pub http_body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            value_bytes_max: limits::VALUE_BYTES_MAX_DEFAULT,
            frame_bytes_max: limits::FRAME_BYTES_MAX_DEFAULT,
            pipeline_depth_max: limits::PIPELINE_DEPTH_MAX_DEFAULT,
            connections_max: limits::CONNECTIONS_MAX_DEFAULT,
            http_body_bytes_max: limits::HTTP_BODY_BYTES_MAX_DEFAULT,
        }
    }
}

pub const DEFAULT_RESP_ADDR: &str = "127.0.0.1:6380";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "capdb-data";
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Shards of the `default` keyspace unless `default_shards` says otherwise: one, so that every
/// multi-key command and transaction works on it (cross-shard ones answer `-CROSSSLOT` until
/// cross-shard transactions land).
pub const DEFAULT_SHARDS: u32 = 1;

/// The configuration file's shape. Unknown keys are errors (a typo must not be ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    resp_addr: Option<String>,
    http_addr: Option<String>,
    password: Option<String>,
    shutdown_grace_ms: Option<u64>,
    storage_cache_mb: Option<u64>,
    limits: Option<FileLimits>,
    node_id: Option<u64>,
    peer_addr: Option<String>,
    advertise_addr: Option<String>,
    initial_cluster: Option<String>,
    join: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    raft_snapshot_logs: Option<u64>,
    default_shards: Option<u32>,
    job_slots: Option<usize>,
    job_nice: Option<i32>,
    job_throttle: Option<bool>,
    ap_anti_entropy_interval_ms: Option<u64>,
    ap_anti_entropy_bytes_per_sec: Option<u64>,
    ap_tombstone_grace_ms: Option<u64>,
    redis_cluster: Option<bool>,
    resp_keyspace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    value_bytes_max: Option<usize>,
    frame_bytes_max: Option<usize>,
    pipeline_depth_max: Option<usize>,
    connections_max: Option<usize>,
    http_body_bytes_max: Option<usize>,
}

/// Flags of `capdb server`. Each also reads a `CAPDB_*` environment variable; a flag given on
/// the command line wins over the variable, and both win over the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, env = "CAPDB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for this node's data [default: ./capdb-data].
    #[arg(long, env = "CAPDB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis protocol listen address [default: 127.0.0.1:6380].
    #[arg(long, env = "CAPDB_RESP_ADDR", value_name = "HOST:PORT")]
    pub resp_addr: Option<String>,
    /// HTTP API listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "CAPDB_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Require this password (RESP AUTH, HTTP bearer token).
    #[arg(
        long,
        env = "CAPDB_PASSWORD",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Largest value in bytes [default: 8388608].
    #[arg(long, env = "CAPDB_VALUE_BYTES_MAX", value_name = "BYTES")]
    pub value_bytes_max: Option<usize>,
    /// Largest RESP command frame in bytes [default: 16777216].
    #[arg(long, env = "CAPDB_FRAME_BYTES_MAX", value_name = "BYTES")]
    pub frame_bytes_max: Option<usize>,
    /// Commands run per read before replies are flushed [default: 1024].
    #[arg(long, env = "CAPDB_PIPELINE_DEPTH_MAX", value_name = "N")]
    pub pipeline_depth_max: Option<usize>,
    /// Simultaneous client connections [default: 10000].
    #[arg(long, env = "CAPDB_CONNECTIONS_MAX", value_name = "N")]
    pub connections_max: Option<usize>,
    /// Largest HTTP request body in bytes [default: value limit + 64 KiB].
    #[arg(long, env = "CAPDB_HTTP_BODY_BYTES_MAX", value_name = "BYTES")]
    pub http_body_bytes_max: Option<usize>,
    /// Milliseconds shutdown waits for in-flight requests [default: 10000].
    #[arg(long, env = "CAPDB_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// MiB of memory the storage engine caches pages of its file in (16 to 16777216)
    /// [default: a quarter of the memory the node may use, at least 256].
    #[arg(long, env = "CAPDB_STORAGE_CACHE_MB", value_name = "MIB")]
    pub storage_cache_mb: Option<u64>,
    /// This node's id, unique and stable in the cluster [default: 1].
    #[arg(long, env = "CAPDB_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,
    /// Inter-node (Raft, forwarding) listen address [default: 127.0.0.1:7380].
    #[arg(long, env = "CAPDB_PEER_ADDR", value_name = "HOST:PORT")]
    pub peer_addr: Option<String>,
    /// Peer address other nodes should use, when it differs from --peer-addr.
    #[arg(long, env = "CAPDB_ADVERTISE_ADDR", value_name = "HOST:PORT")]
    pub advertise_addr: Option<String>,
    /// The first cluster: every founding member as ID=HOST:PORT (peer address), comma-separated.
    /// Give the same list to each founding node.
    #[arg(long, env = "CAPDB_INITIAL_CLUSTER", value_name = "ID=HOST:PORT,...")]
    pub initial_cluster: Option<String>,
    /// Join an existing cluster through any of these members' peer addresses.
    #[arg(
        long,
        env = "CAPDB_JOIN",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub join: Vec<String>,
    /// A placement label, KEY=VALUE (repeatable), e.g. --label zone=a.
    #[arg(
        long = "label",
        env = "CAPDB_LABELS",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Raft log entries between snapshots (log compaction) [default: 20000].
    #[arg(long, env = "CAPDB_RAFT_SNAPSHOT_LOGS", value_name = "N")]
    pub raft_snapshot_logs: Option<u64>,
    /// Shards the cp keyspace `default` is created with when the cluster forms (1 to 1024;
    /// give every founding node the same value; an existing cluster keeps its shards)
    /// [default: 1].
    #[arg(long, env = "CAPDB_DEFAULT_SHARDS", value_name = "N")]
    pub default_shards: Option<u32>,
    /// Job tasks this node runs at once, per job (1 to 64): each takes a core while it runs
    /// [default: 1].
    #[arg(long, env = "CAPDB_JOB_SLOTS", value_name = "N")]
    pub job_slots: Option<usize>,
    /// The nice level of job task threads (0 to 19; 0: as foreground work) [default: 10].
    #[arg(long, env = "CAPDB_JOB_NICE", value_name = "N")]
    pub job_nice: Option<i32>,
    /// Whether job tasks slow down when foreground latency rises (true or false)
    /// [default: true].
    #[arg(long, env = "CAPDB_JOB_THROTTLE", value_name = "BOOL")]
    pub job_throttle: Option<bool>,
    /// Milliseconds between anti-entropy passes over ap keyspaces [default: 10000].
    #[arg(long, env = "CAPDB_AP_ANTI_ENTROPY_INTERVAL_MS", value_name = "MS")]
    pub ap_anti_entropy_interval_ms: Option<u64>,
    /// Bytes per second ap anti-entropy may stream from this node [default: 33554432].
    #[arg(
        long,
        env = "CAPDB_AP_ANTI_ENTROPY_BYTES_PER_SEC",
        value_name = "BYTES"
    )]
    pub ap_anti_entropy_bytes_per_sec: Option<u64>,
    /// Milliseconds a tombstone lives at least before it may be collected (once every replica
    /// holds it); hints live a third of that at most [default: 10800000, 3 h].
    #[arg(long, env = "CAPDB_AP_TOMBSTONE_GRACE_MS", value_name = "MS")]
    pub ap_tombstone_grace_ms: Option<u64>,
    /// Take the node id from the host name's ordinal suffix plus one (`capdb-0` is node 1), as
    /// Kubernetes StatefulSet pods are named. Reads $HOSTNAME, else the kernel's host name.
    #[arg(long, env = "CAPDB_NODE_ID_FROM_HOSTNAME", conflicts_with = "node_id")]
    pub node_id_from_hostname: bool,
    /// Read placement labels from this file, one KEY=VALUE per line (`#` comments allowed);
    /// --label flags override it. Kubernetes writes the pod's zone here.
    #[arg(long, env = "CAPDB_LABELS_FILE", value_name = "PATH")]
    pub labels_file: Option<PathBuf>,
    /// Redis Cluster mode (like Redis's cluster-enabled yes): RESP connections get -MOVED for
    /// keys whose shard leader is another node, and SCAN, DBSIZE and KEYS answer for this
    /// node's slots, so cluster clients (redis-cli -c, redis-py RedisCluster, redis-benchmark
    /// --cluster) see each key on exactly one master.
    #[arg(long, env = "CAPDB_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// The keyspace RESP connections start in and SELECT 0 selects [default: default]. Redis
    /// Cluster clients cannot SELECT: in cluster mode this is the keyspace they see.
    #[arg(long, env = "CAPDB_RESP_KEYSPACE", value_name = "NAME")]
    pub resp_keyspace: Option<String>,
    /// TESTING ONLY: serve linearizable reads from the local replica without a read barrier.
    /// This breaks linearizability on purpose so `capdb chaos` can prove it detects it.
    #[arg(long, hide = true)]
    pub debug_unsafe_local_reads: bool,
    /// TESTING ONLY: enable the /v1/debug/* fault-injection routes (clock offset).
    #[arg(long, hide = true)]
    pub debug_fault_injection: bool,
    /// TESTING ONLY: apply every copy of a retried write again (exactly-once off). This breaks
    /// correctness on purpose so `capdb chaos` can prove it detects double application.
    #[arg(long, hide = true)]
    pub debug_apply_duplicates: bool,
    /// TESTING ONLY: run a cp MULTI/EXEC as one log entry per command (not atomic, WATCH
    /// ignored). This breaks transactions on purpose so `capdb chaos` can prove it detects it.
    #[arg(long, hide = true)]
    pub debug_unsafe_txn: bool,
    /// TESTING ONLY: merged change streams release events past the resolved timestamp (up
    /// to the most advanced shard's). Breaks the merged order on purpose so `capdb chaos`
    /// can prove it detects a premature watermark.
    #[arg(long, hide = true)]
    pub debug_unsafe_resolved: bool,
    /// TESTING ONLY: commits of cross-shard transactions skip incremental views. Breaks the
    /// views on purpose so `capdb chaos --workload view` can prove it detects drift.
    #[arg(long, hide = true)]
    pub debug_view_skip_txn: bool,
    /// TESTING ONLY: HLEN answers one more than the truth when the hash has exactly 3 fields.
    /// A planted difference so `capdb difftest` can prove it detects one.
    #[arg(long, hide = true)]
    pub debug_plant_difference: bool,
    /// TESTING ONLY: abort the process in the middle of the first cross-shard transaction
    /// this node coordinates: `after-prepares` (every shard voted yes, no commit sent) or
    /// `after-one-prepare` (one shard prepared, the others never heard). The cluster must
    /// finish it and release its locks.
    #[arg(long, hide = true, value_parser = parse_crash_point)]
    pub debug_txn_crash: Option<capdb_txn::CrashPoint>,
}

fn parse_crash_point(s: &str) -> std::result::Result<capdb_txn::CrashPoint, String> {
    match s {
        "after-prepares" => Ok(capdb_txn::CrashPoint::AfterPrepares),
        "after-one-prepare" => Ok(capdb_txn::CrashPoint::AfterOnePrepare),
        other => Err(format!(
            "unknown crash point {other:?}: after-prepares or after-one-prepare"
        )),
    }
}

/// A configuration error: which setting, from where, and why.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

fn parse_addr(value: &str, setting: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError(format!(
            "{setting} = '{value}' is not a HOST:PORT socket address (example: 127.0.0.1:6380)"
        ))
    })
}

impl Config {
    /// Resolves the configuration from `args` (flags and environment, already merged by clap)
    /// over the optional file over the defaults, and validates it. Settings are checked in a
    /// fixed order (limits, the cluster settings, `resp_keyspace`, the client addresses, then
    /// the checks across settings), so a configuration with several mistakes always reports the
    /// same one first.
    pub fn resolve(args: &ServerArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let limits = resolve_limits(args, file.limits.as_ref().unwrap_or(&FileLimits::default()));
        let resp_addr = args
            .resp_addr
            .clone()
            .or(file.resp_addr.clone())
            .unwrap_or_else(|| DEFAULT_RESP_ADDR.into());
        let http_addr = args
            .http_addr
            .clone()
            .or(file.http_addr.clone())
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into());
        let cluster = resolve_cluster(args, &file)?;
        let resp_keyspace = args
            .resp_keyspace
            .clone()
            .or(file.resp_keyspace)
            .unwrap_or_else(|| DEFAULT_KEYSPACE.into());
        let resp_keyspace = KeyspaceName::new(&resp_keyspace)
            .map_err(|e| ConfigError(format!("resp_keyspace = '{resp_keyspace}': {e}")))?;
        let config = Config {
            cluster,
            redis_cluster: args.redis_cluster || file.redis_cluster.unwrap_or(false),
            resp_keyspace,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            resp_addr: parse_addr(&resp_addr, "resp_addr")?,
            http_addr: parse_addr(&http_addr, "http_addr")?,
            password: args
                .password
                .clone()
                .or(file.password)
                .filter(|p| !p.is_empty()),
            limits,
            shutdown_grace_ms: args
                .shutdown_grace_ms
                .or(file.shutdown_grace_ms)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
            storage_cache_mb: args.storage_cache_mb.or(file.storage_cache_mb),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if self.resp_addr == self.http_addr
            || self.resp_addr == self.cluster.peer_addr
            || self.http_addr == self.cluster.peer_addr
        {
            return Err(ConfigError(format!(
                "resp_addr ({}), http_addr ({}) and peer_addr ({}) need different ports",
                self.resp_addr, self.http_addr, self.cluster.peer_addr
            )));
        }
        if l.value_bytes_max == 0 || l.value_bytes_max > 512 * 1024 * 1024 {
            return Err(ConfigError(
                "limits.value_bytes_max must be between 1 and 536870912 (512 MiB)".into(),
            ));
        }
        if l.frame_bytes_max < l.value_bytes_max + limits::KEY_BYTES_MAX {
            return Err(ConfigError(format!(
                "limits.frame_bytes_max ({}) must be at least value_bytes_max + {} (key limit) = {}, \
                 or the largest allowed SET could not be sent",
                l.frame_bytes_max,
                limits::KEY_BYTES_MAX,
                l.value_bytes_max + limits::KEY_BYTES_MAX
            )));
        }
        if l.http_body_bytes_max < l.value_bytes_max {
            return Err(ConfigError(format!(
                "limits.http_body_bytes_max ({}) must be at least value_bytes_max ({})",
                l.http_body_bytes_max, l.value_bytes_max
            )));
        }
        if !(1..=1_000_000).contains(&l.pipeline_depth_max) {
            return Err(ConfigError(
                "limits.pipeline_depth_max must be 1 to 1000000".into(),
            ));
        }
        if !(1..=1_000_000).contains(&l.connections_max) {
            return Err(ConfigError(
                "limits.connections_max must be 1 to 1000000".into(),
            ));
        }
        if self.shutdown_grace_ms > 600_000 {
            return Err(ConfigError(
                "shutdown_grace_ms must be at most 600000 (10 minutes)".into(),
            ));
        }
        if let Some(mb) = self.storage_cache_mb
            && !(STORAGE_CACHE_MB_MIN..=STORAGE_CACHE_MB_MAX).contains(&mb)
        {
            return Err(ConfigError(format!(
                "storage_cache_mb = {mb}: {STORAGE_CACHE_MB_MIN} to {STORAGE_CACHE_MB_MAX} MiB"
            )));
        }
        Ok(())
    }

    /// The bytes of the storage engine's page cache: `storage_cache_mb`, else a quarter of
    /// the memory this node may use (the machine's, or its container's limit when lower), at
    /// least [`STORAGE_CACHE_MB_AUTO_MIN`] MiB.
    ///
    /// Why a quarter: pages in the cache are read without a system call, a copy or an
    /// allocation (J2 of `bench/mapreduce.py`, over a 3 GB file: 14 % less node CPU with the
    /// file cached), and the kernel's page cache, the write buffers, Raft logs and clients need the
    /// rest. The cache fills only as pages are read, so an idle node holds little of it.
    pub fn storage_cache_bytes(&self) -> u64 {
        let mb = self.storage_cache_mb.unwrap_or_else(|| {
            (usable_memory_bytes().unwrap_or(0) / 4 / (1 << 20)).max(STORAGE_CACHE_MB_AUTO_MIN)
        });
        mb.saturating_mul(1 << 20)
    }
}

/// Bounds of `storage_cache_mb`.
pub const STORAGE_CACHE_MB_MIN: u64 = 16;
pub const STORAGE_CACHE_MB_MAX: u64 = 1 << 24;
/// The least page cache the automatic size gives (redb's own default is 1024).
pub const STORAGE_CACHE_MB_AUTO_MIN: u64 = 256;

/// The memory this process may use: the machine's physical memory, or the cgroup's limit
/// (a container's) when that is lower. `None` when neither can be read.
fn usable_memory_bytes() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let physical = (pages > 0 && page > 0).then(|| pages as u64 * page as u64);
    // cgroup v2, then v1 ("max" or a huge number: no limit).
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    match (physical, limit) {
        (Some(p), Some(l)) => Some(p.min(l)),
        (p, l) => p.or(l),
    }
}

/// The limits: a flag, else the file, else the default. The frame and HTTP body limits default
/// to what the largest allowed value needs.
fn resolve_limits(args: &ServerArgs, fl: &FileLimits) -> Limits {
    let d = Limits::default();
    let value_bytes_max = args
        .value_bytes_max
        .or(fl.value_bytes_max)
        .unwrap_or(d.value_bytes_max);
    Limits {
        value_bytes_max,
        frame_bytes_max: args.frame_bytes_max.or(fl.frame_bytes_max).unwrap_or(
            d.frame_bytes_max
                .max(value_bytes_max + limits::KEY_BYTES_MAX + 1024),
        ),
        pipeline_depth_max: args
            .pipeline_depth_max
            .or(fl.pipeline_depth_max)
            .unwrap_or(d.pipeline_depth_max),
        connections_max: args
            .connections_max
            .or(fl.connections_max)
            .unwrap_or(d.connections_max),
        http_body_bytes_max: args
            .http_body_bytes_max
            .or(fl.http_body_bytes_max)
            .unwrap_or(value_bytes_max + 64 * 1024),
    }
}

/// This node's place in the cluster: identity, peer addresses, founding members or members to
/// join, labels, and the replication settings.
fn resolve_cluster(args: &ServerArgs, file: &FileConfig) -> Result<ClusterConfig, ConfigError> {
    let node_id = if args.node_id_from_hostname {
        node_id_from_hostname(&hostname()?)?
    } else {
        args.node_id.or(file.node_id).unwrap_or(1)
    };
    let peer_addr_text = args
        .peer_addr
        .clone()
        .or(file.peer_addr.clone())
        .unwrap_or_else(|| DEFAULT_PEER_ADDR.into());
    let peer_addr = parse_addr(&peer_addr_text, "peer_addr")?;
    let advertise_addr = args
        .advertise_addr
        .clone()
        .or(file.advertise_addr.clone())
        .unwrap_or_else(|| peer_addr.to_string());
    if !advertise_addr.contains(':') {
        return Err(ConfigError(format!(
            "advertise_addr = '{advertise_addr}' must be HOST:PORT"
        )));
    }
    let initial_cluster = match args
        .initial_cluster
        .clone()
        .or(file.initial_cluster.clone())
    {
        Some(text) => parse_initial_cluster(&text)?,
        None => BTreeMap::new(),
    };
    let join = if args.join.is_empty() {
        file.join.clone().unwrap_or_default()
    } else {
        args.join.clone()
    };
    let labels = resolve_labels(args, file)?;
    let (initial_cluster, join) = founding_or_joining(node_id, initial_cluster, join)?;
    if node_id == 0 || node_id > u64::MAX / 2 {
        return Err(ConfigError("node_id must be between 1 and 2^63".into()));
    }
    let raft_snapshot_logs = args
        .raft_snapshot_logs
        .or(file.raft_snapshot_logs)
        .unwrap_or(capdb_raft::groups::SNAPSHOT_LOGS_DEFAULT);
    if !(10..=10_000_000).contains(&raft_snapshot_logs) {
        return Err(ConfigError(
            "raft_snapshot_logs must be 10 to 10000000".into(),
        ));
    }
    let default_shards = args
        .default_shards
        .or(file.default_shards)
        .unwrap_or(DEFAULT_SHARDS);
    if !(1..=SHARDS_MAX).contains(&default_shards) {
        return Err(ConfigError(format!(
            "default_shards = {default_shards}: the default keyspace needs 1 to {SHARDS_MAX} shards"
        )));
    }
    /// Job task threads' nice level unless configured.
    const JOB_NICE_DEFAULT: i32 = 10;
    let job_slots = args.job_slots.or(file.job_slots).unwrap_or(1);
    if !(1..=64).contains(&job_slots) {
        return Err(ConfigError(format!(
            "job_slots = {job_slots}: 1 to 64 tasks at once"
        )));
    }
    let job_nice = args.job_nice.or(file.job_nice).unwrap_or(JOB_NICE_DEFAULT);
    if !(0..=19).contains(&job_nice) {
        return Err(ConfigError(format!(
            "job_nice = {job_nice}: a nice level of 0 to 19"
        )));
    }
    let ap = resolve_ap(args, file)?;
    Ok(ClusterConfig {
        default_shards,
        job_slots,
        job_nice,
        job_throttle: args.job_throttle.or(file.job_throttle).unwrap_or(true),
        ap_tombstone_grace_ms: ap.tombstone_grace_ms,
        ap_anti_entropy_interval_ms: ap.anti_entropy_interval_ms,
        ap_anti_entropy_bytes_per_sec: ap.anti_entropy_bytes_per_sec,
        node_id,
        peer_addr,
        advertise_addr,
        initial_cluster,
        join,
        labels,
        raft_snapshot_logs,
        debug: DebugConfig {
            unsafe_local_reads: args.debug_unsafe_local_reads,
            fault_injection: args.debug_fault_injection,
            apply_duplicates: args.debug_apply_duplicates,
            unsafe_txn: args.debug_unsafe_txn,
            unsafe_resolved: args.debug_unsafe_resolved,
            view_skip_txn: args.debug_view_skip_txn,
            plant_difference: args.debug_plant_difference,
            txn_crash: args.debug_txn_crash,
        },
    })
}

/// Placement labels: the file's, then the labels file's, then `--label` flags, each overriding
/// the one before.
fn resolve_labels(
    args: &ServerArgs,
    file: &FileConfig,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = file.labels.clone().unwrap_or_default();
    if let Some(path) = &args.labels_file {
        labels.extend(read_labels_file(path)?);
    }
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                ConfigError(format!("label '{l}' must be KEY=VALUE (example: zone=a)"))
            })?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// `(initial_cluster, join)` as the node will use them: a node listed in `initial_cluster`
/// founds the cluster with the others listed; a node not listed joins through them.
fn founding_or_joining(
    node_id: u64,
    mut initial_cluster: BTreeMap<u64, String>,
    mut join: Vec<String>,
) -> Result<(BTreeMap<u64, String>, Vec<String>), ConfigError> {
    if !initial_cluster.is_empty() && !join.is_empty() {
        return Err(ConfigError(
            "give either initial_cluster (to form a new cluster) or join (to enter an existing one), not both".into(),
        ));
    }
    if !initial_cluster.is_empty() && !initial_cluster.contains_key(&node_id) {
        // Not a founding member: join the cluster the listed members formed. This lets every
        // StatefulSet pod take the same flags, whatever its ordinal.
        join = std::mem::take(&mut initial_cluster).into_values().collect();
    }
    Ok((initial_cluster, join))
}

/// The `ap` replication settings, checked.
struct ApSettings {
    anti_entropy_interval_ms: u64,
    anti_entropy_bytes_per_sec: u64,
    tombstone_grace_ms: u64,
}

fn resolve_ap(args: &ServerArgs, file: &FileConfig) -> Result<ApSettings, ConfigError> {
    let anti_entropy_interval_ms = args
        .ap_anti_entropy_interval_ms
        .or(file.ap_anti_entropy_interval_ms)
        .unwrap_or(10_000);
    if !(100..=86_400_000).contains(&anti_entropy_interval_ms) {
        return Err(ConfigError(
            "ap_anti_entropy_interval_ms must be 100 to 86400000".into(),
        ));
    }
    let anti_entropy_bytes_per_sec = args
        .ap_anti_entropy_bytes_per_sec
        .or(file.ap_anti_entropy_bytes_per_sec)
        .unwrap_or(32 * 1024 * 1024);
    if anti_entropy_bytes_per_sec < 64 * 1024 {
        return Err(ConfigError(
            "ap_anti_entropy_bytes_per_sec must be at least 65536".into(),
        ));
    }
    let tombstone_grace_ms = args
        .ap_tombstone_grace_ms
        .or(file.ap_tombstone_grace_ms)
        .unwrap_or(3 * 3600 * 1000);
    if tombstone_grace_ms < 1000 {
        return Err(ConfigError(
            "ap_tombstone_grace_ms must be at least 1000".into(),
        ));
    }
    Ok(ApSettings {
        anti_entropy_interval_ms,
        anti_entropy_bytes_per_sec,
        tombstone_grace_ms,
    })
}

/// This machine's host name: `$HOSTNAME` (Kubernetes sets it to the pod name), else the
/// kernel's.
fn hostname() -> Result<String, ConfigError> {
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.trim().is_empty()
    {
        return Ok(h.trim().to_string());
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .map_err(|e| {
            ConfigError(format!(
                "node_id_from_hostname: cannot read the host name: {e}"
            ))
        })
}

/// `capdb-2` is node 3: StatefulSet ordinals start at 0, node ids at 1.
fn node_id_from_hostname(host: &str) -> Result<u64, ConfigError> {
    let first_label = host.split('.').next().unwrap_or(host);
    first_label
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .filter(|o| *o < u64::MAX / 2)
        .map(|o| o + 1)
        .ok_or_else(|| {
            ConfigError(format!(
                "node_id_from_hostname: host name '{host}' does not end in -ORDINAL (example: capdb-0)"
            ))
        })
}

/// Reads `KEY=VALUE` lines; blank lines and `#` comments are skipped. Bounded: a labels file
/// over 64 KiB is refused.
fn read_labels_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigError(format!("labels_file {}: {e}", path.display())))?;
    if meta.len() > 64 * 1024 {
        return Err(ConfigError(format!(
            "labels_file {}: larger than 64 KiB",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("labels_file {}: {e}", path.display())))?;
    let mut labels = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "labels_file {} line {}: '{line}' must be KEY=VALUE (example: zone=a)",
                    path.display(),
                    n + 1
                ))
            })?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// Parses `1=host:7380,2=host:7381`.
fn parse_initial_cluster(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "initial_cluster entry '{part}' must be ID=HOST:PORT (example: 1=10.0.0.1:7380)"
            ))
        })?;
        let id: u64 = id.trim().parse().map_err(|_| {
            ConfigError(format!(
                "initial_cluster entry '{part}': '{id}' is not a node id"
            ))
        })?;
        if !addr.contains(':') {
            return Err(ConfigError(format!(
                "initial_cluster entry '{part}': '{addr}' is not HOST:PORT"
            )));
        }
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(ConfigError(format!(
                "initial_cluster lists node {id} twice"
            )));
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("c.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    /// A tiny self-cleaning temp dir (avoids a dev-dependency for two tests).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "capdb-cfg-{}-{}",
                    std::process::id(),
                    fastrand()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn fastrand() -> u64 {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::Instant::now())
        }
    }

    #[test]
    fn precedence_is_flags_over_file_over_defaults() {
        let (_d, p) = write(
            "resp_addr = \"127.0.0.1:7001\"\nhttp_addr = \"127.0.0.1:7002\"\n[limits]\nconnections_max = 5\n",
        );
        let args = ServerArgs {
            config: Some(p),
            http_addr: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.resp_addr.port(), 7001);
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.limits.connections_max, 5);
        assert_eq!(c.limits.value_bytes_max, limits::VALUE_BYTES_MAX_DEFAULT);
    }

    #[test]
    fn bad_files_and_values_are_named() {
        let (_d, p) = write("resp_adr = \"x\"\n");
        let e = Config::resolve(&ServerArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `resp_adr`"), "{e}");
        let e = Config::resolve(&ServerArgs {
            resp_addr: Some("nope".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("resp_addr = 'nope'"), "{e}");
        let e = Config::resolve(&ServerArgs {
            value_bytes_max: Some(1000),
            frame_bytes_max: Some(10),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("frame_bytes_max"), "{e}");
    }

    #[test]
    fn the_storage_cache_is_a_quarter_of_memory_unless_set_within_bounds() {
        let auto = Config::resolve(&ServerArgs::default()).unwrap();
        assert_eq!(auto.storage_cache_mb, None);
        let quarter = usable_memory_bytes().unwrap() / 4;
        assert_eq!(
            auto.storage_cache_bytes(),
            quarter.max(STORAGE_CACHE_MB_AUTO_MIN << 20) >> 20 << 20
        );
        let (_d, p) = write("storage_cache_mb = 64\n");
        let set = Config::resolve(&ServerArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(set.storage_cache_bytes(), 64 << 20);
        for bad in [0, STORAGE_CACHE_MB_MIN - 1, STORAGE_CACHE_MB_MAX + 1] {
            let e = Config::resolve(&ServerArgs {
                storage_cache_mb: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("storage_cache_mb"), "{e}");
        }
    }

    #[test]
    fn the_reference_file_parses_with_every_setting_uncommented() {
        let text = include_str!("../../../config/capdb.toml");
        // Uncomment `# key = value` lines (not prose, not the password) and parse the result.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.contains(" = ")
                        && !rest.starts_with("password")
                        && !rest.starts_with("join")
                        && !rest.starts_with("initial_cluster") =>
                {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (_d, p) = write(&uncommented);
        let c = Config::resolve(&ServerArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.cluster.ap_anti_entropy_interval_ms, 10_000);
        assert_eq!(c.cluster.labels["zone"], "eu-west-1a");
    }

    #[test]
    fn redis_cluster_mode_and_the_resp_keyspace() {
        let c = Config::resolve(&ServerArgs::default()).unwrap();
        assert!(
            !c.redis_cluster,
            "off by default: plain clients get every key"
        );
        assert_eq!(c.resp_keyspace.as_str(), "default");
        let (_d, p) = write("redis_cluster = true\nresp_keyspace = \"kv\"\n");
        let c = Config::resolve(&ServerArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert!(c.redis_cluster);
        assert_eq!(c.resp_keyspace.as_str(), "kv");
        let e = Config::resolve(&ServerArgs {
            resp_keyspace: Some("no spaces".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("resp_keyspace = 'no spaces'"), "{e}");
    }

    #[test]
    fn the_default_keyspace_has_one_shard_unless_told_otherwise() {
        let c = Config::resolve(&ServerArgs::default()).unwrap();
        assert_eq!(c.cluster.default_shards, 1);
        let (_d, p) = write("default_shards = 4\n");
        let from_file = ServerArgs {
            config: Some(p),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(&from_file).unwrap().cluster.default_shards,
            4
        );
        let flag_wins = ServerArgs {
            default_shards: Some(3),
            ..from_file
        };
        assert_eq!(
            Config::resolve(&flag_wins).unwrap().cluster.default_shards,
            3
        );
        for bad in [0, SHARDS_MAX + 1] {
            let e = Config::resolve(&ServerArgs {
                default_shards: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "default_shards = {bad}: the default keyspace needs 1 to"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn statefulset_host_names_map_to_node_ids() {
        assert_eq!(node_id_from_hostname("capdb-0").unwrap(), 1);
        assert_eq!(node_id_from_hostname("my-db-12.peers.ns.svc").unwrap(), 13);
        assert!(node_id_from_hostname("capdb").is_err());
        assert!(node_id_from_hostname("capdb-x").is_err());
    }

    #[test]
    fn a_node_missing_from_initial_cluster_joins_through_it() {
        let args = ServerArgs {
            node_id: Some(4),
            initial_cluster: Some("1=a:7380,2=b:7380,3=c:7380".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert!(c.cluster.initial_cluster.is_empty());
        assert_eq!(c.cluster.join, vec!["a:7380", "b:7380", "c:7380"]);
        let args = ServerArgs {
            node_id: Some(2),
            ..args
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.cluster.initial_cluster.len(), 3);
        assert!(c.cluster.join.is_empty());
    }

    #[test]
    fn labels_file_is_read_and_flags_override_it() {
        let (_d, p) = write("# from the node\nzone = us-east-1a\n\nrack=r1\n");
        let args = ServerArgs {
            labels_file: Some(p.clone()),
            labels: vec!["rack=r9".into()],
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.cluster.labels["zone"], "us-east-1a");
        assert_eq!(c.cluster.labels["rack"], "r9");
        std::fs::write(&p, "zone\n").unwrap();
        let e = Config::resolve(&args).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
