//! Prometheus metrics, rendered at `GET /metrics` in the OpenMetrics text format.
//!
//! - `capdb_command_duration_seconds{command}`: histogram per RESP command (its `_count` is the
//!   request count); `capdb_command_errors_total{command}` counts error replies.
//! - `capdb_http_request_duration_seconds{route,method,status}`: histogram per HTTP route.
//! - Connection gauges/counters, and storage gauges (keys and memory per keyspace, database
//!   file size, group-commit counters) refreshed on every scrape.
//!
//! Command handles are created once at start for every known command, so the hot path only
//! touches atomics (no label lookup per request).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node::Node;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TxnLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyspaceLabel {
    keyspace: String,
    mode: &'static str,
}

/// Buckets of [`LatencyHistogram`]: 10 µs doubling 22 times (up to ~21 s), then +Inf.
const LATENCY_BUCKETS: usize = 22;
const LATENCY_FIRST_BUCKET_NANOS: u64 = 10_000;

/// A lock-free latency histogram. prometheus-client's histogram takes a mutex per observation,
/// which on the per-command hot path was measurable contention between worker threads; this one
/// is a handful of relaxed atomic adds.
/// Cheap to clone: clones share the counts.
#[derive(Debug, Default, Clone)]
pub struct LatencyHistogram(std::sync::Arc<LatencyCounts>);

#[derive(Debug, Default)]
pub struct LatencyCounts {
    /// Per-bucket (not cumulative) counts; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl std::ops::Deref for LatencyHistogram {
    type Target = LatencyCounts;
    fn deref(&self) -> &LatencyCounts {
        &self.0
    }
}

impl LatencyCounts {
    pub fn observe(&self, took: Duration) {
        self.observe_many(took, 1);
    }

    /// `n` observations of the same latency (the commands of one pipeline answered by one
    /// write): one set of atomic adds instead of `n`.
    pub fn observe_many(&self, took: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let nanos = took.as_nanos().min(u64::MAX as u128) as u64;
        // Bucket i holds values <= 10 µs * 2^i.
        let ratio = nanos.saturating_sub(1) / LATENCY_FIRST_BUCKET_NANOS;
        let index = if ratio == 0 {
            0
        } else {
            (64 - ratio.leading_zeros()) as usize
        };
        self.buckets[index.min(LATENCY_BUCKETS)].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(nanos.saturating_mul(n), Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for LatencyHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for LatencyHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = (0..=LATENCY_BUCKETS)
            .map(|i| {
                let upper = if i == LATENCY_BUCKETS {
                    f64::INFINITY
                } else {
                    (LATENCY_FIRST_BUCKET_NANOS << i) as f64 / 1e9
                };
                (upper, self.buckets[i].load(Ordering::Relaxed))
            })
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            self.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// Handles for one command.
#[derive(Clone)]
pub struct CommandMetrics {
    pub duration: LatencyHistogram,
    pub errors: Counter,
}

pub struct Metrics {
    registry: Registry,
    commands: Vec<(&'static str, CommandMetrics)>,
    pub http: Family<HttpLabel, Histogram>,
    pub connections: Gauge,
    pub connections_total: Counter,
    pub connections_rejected: Counter,
    pub protocol_errors: Counter,
    pub pubsub_slow_subscribers: Counter,
    pub pubsub_dropped: Counter,
    transactions: Family<TxnLabel, Counter>,
    keys: Family<KeyspaceLabel, Gauge>,
    memory: Family<KeyspaceLabel, Gauge>,
    evicted: Family<KeyspaceLabel, Gauge>,
    expired: Family<KeyspaceLabel, Gauge>,
    file_bytes: Gauge,
    commits: Gauge,
    committed_jobs: Gauge,
    commit_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    sync_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    durable_commits: Gauge,
    wal_syncs: Gauge,
    wal_sync_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    wal_bytes: Gauge,
    wal_file_bytes: Gauge,
    wal_moved: Gauge,
    corruptions: Gauge,
    /// Cross-shard transactions: the coordinator's counters by what happened.
    cross_shard: Family<TxnLabel, Gauge>,
    txn_prepared: Gauge,
    txn_oldest_lock_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn latency_histogram() -> Histogram {
    // 10 µs to ~20 s.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 22))
}

impl Metrics {
    /// Counts one EXEC that ended with `outcome` (see the `transactions` metric's help).
    pub fn transaction(&self, outcome: &'static str) {
        self.transactions.get_or_create(&TxnLabel { outcome }).inc();
    }

    /// The lock gauges of cross-shard transactions on the shards this node leads: how many
    /// are prepared and not decided, and how long the oldest has held its locks.
    pub fn txn_locks(&self, prepared: u64, oldest_ms: u64) {
        self.txn_prepared.set(prepared as i64);
        self.txn_oldest_lock_seconds.set(oldest_ms as f64 / 1e3);
    }

    /// `commands`: every command name the server knows (lowercase).
    pub fn new(commands: &[&'static str]) -> Metrics {
        let mut registry = Registry::with_prefix("capdb");
        let durations = Family::<CommandLabel, LatencyHistogram>::default();
        let errors = Family::<CommandLabel, Counter>::default();
        registry.register(
            "command_duration_seconds",
            "Time to execute a RESP command, from parse to reply",
            durations.clone(),
        );
        registry.register(
            "command_errors",
            "RESP commands answered with an error",
            errors.clone(),
        );
        let mut handles: Vec<(&'static str, CommandMetrics)> = commands
            .iter()
            .chain(std::iter::once(&"unknown"))
            .map(|&command| {
                let label = CommandLabel { command };
                (
                    command,
                    CommandMetrics {
                        duration: durations.get_or_create(&label).clone(),
                        errors: errors.get_or_create(&label).clone(),
                    },
                )
            })
            .collect();
        handles.sort_by_key(|(c, _)| *c);
        let http = Family::<HttpLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            http.clone(),
        );
        let m = Metrics {
            commands: handles,
            http,
            connections: Gauge::default(),
            connections_total: Counter::default(),
            connections_rejected: Counter::default(),
            protocol_errors: Counter::default(),
            pubsub_slow_subscribers: Counter::default(),
            pubsub_dropped: Counter::default(),
            transactions: Family::default(),
            keys: Family::default(),
            memory: Family::default(),
            evicted: Family::default(),
            expired: Family::default(),
            file_bytes: Gauge::default(),
            commits: Gauge::default(),
            committed_jobs: Gauge::default(),
            commit_seconds: Gauge::default(),
            sync_seconds: Gauge::default(),
            durable_commits: Gauge::default(),
            wal_syncs: Gauge::default(),
            wal_sync_seconds: Gauge::default(),
            wal_bytes: Gauge::default(),
            wal_file_bytes: Gauge::default(),
            wal_moved: Gauge::default(),
            corruptions: Gauge::default(),
            cross_shard: Family::default(),
            txn_prepared: Gauge::default(),
            txn_oldest_lock_seconds: Gauge::default(),
            registry,
        };
        m.register_rest()
    }

    fn register_rest(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "connections",
            "Open client connections (RESP)",
            self.connections.clone(),
        );
        r.register(
            "connections_accepted",
            "Client connections accepted (RESP)",
            self.connections_total.clone(),
        );
        r.register(
            "pubsub_slow_subscribers",
            "Subscribers disconnected because their message queue was full",
            self.pubsub_slow_subscribers.clone(),
        );
        r.register(
            "pubsub_dropped",
            "Pub/sub messages not sent to another node (its queue full, or it did not answer)",
            self.pubsub_dropped.clone(),
        );
        r.register(
            "transactions",
            "EXEC calls by outcome: committed (ran), watch_aborted (a watched key changed: nil), \
             discarded (EXECABORT: queue-time errors), failed (an error before anything ran, or \
             -UNCERTAIN)",
            self.transactions.clone(),
        );
        r.register(
            "cross_shard_transactions",
            "Cross-shard transactions coordinated by this node, by outcome: committed, \
             watch_aborted, conflict (-TRYAGAIN after every retry met locks), unknown \
             (-UNCERTAIN), retried (attempts after the first), recovered (orphans finished \
             here); and per shard whose commit followed the answer: commits_rode (carried by \
             the next prepare to the shard) or commits_alone (an entry of its own)",
            self.cross_shard.clone(),
        );
        r.register(
            "transaction_locks_prepared",
            "Cross-shard transactions prepared and not decided on the shards this node leads \
             (each holds the locks of its keys there)",
            self.txn_prepared.clone(),
        );
        r.register(
            "transaction_oldest_lock_seconds",
            "How long the oldest of those has held its locks",
            self.txn_oldest_lock_seconds.clone(),
        );
        r.register(
            "connections_rejected",
            "Client connections refused because connections_max was reached",
            self.connections_rejected.clone(),
        );
        r.register(
            "protocol_errors",
            "Connections closed for malformed RESP",
            self.protocol_errors.clone(),
        );
        r.register(
            "keyspace_keys",
            "Keys stored per keyspace",
            self.keys.clone(),
        );
        r.register(
            "keyspace_memory_bytes",
            "Accounted memory of cache keyspaces",
            self.memory.clone(),
        );
        r.register(
            "keyspace_evicted_keys",
            "Keys evicted from cache keyspaces",
            self.evicted.clone(),
        );
        r.register(
            "keyspace_expired_keys",
            "Keys removed by expiry from cache keyspaces",
            self.expired.clone(),
        );
        r.register(
            "storage_file_bytes",
            "Size of the database file",
            self.file_bytes.clone(),
        );
        r.register(
            "storage_commits",
            "Transactions committed by the storage writer (group commits)",
            self.commits.clone(),
        );
        r.register(
            "storage_durable_commits",
            "Of storage_commits, the durable ones (one fsync each): asked for, or a checkpoint",
            self.durable_commits.clone(),
        );
        r.register(
            "wal_syncs",
            "Write-ahead log batches (one write and one fdatasync each, every Raft group's appends)",
            self.wal_syncs.clone(),
        );
        r.register(
            "wal_sync_seconds",
            "Total time spent writing and syncing write-ahead log batches",
            self.wal_sync_seconds.clone(),
        );
        r.register(
            "wal_written_bytes",
            "Bytes written to the write-ahead log",
            self.wal_bytes.clone(),
        );
        r.register(
            "wal_file_bytes",
            "Size of the write-ahead log's segment files",
            self.wal_file_bytes.clone(),
        );
        r.register(
            "wal_moved_records",
            "Live records copied forward so that an old segment can be reused",
            self.wal_moved.clone(),
        );
        r.register(
            "storage_committed_jobs",
            "Write requests acknowledged by group commits",
            self.committed_jobs.clone(),
        );
        r.register(
            "storage_commit_seconds",
            "Total time spent committing",
            self.commit_seconds.clone(),
        );
        r.register(
            "storage_sync_seconds",
            "Of storage_commit_seconds, the time in the engine's commit (page writes and fsync)",
            self.sync_seconds.clone(),
        );
        r.register(
            "storage_corruptions",
            "Stored values that failed their checksum",
            self.corruptions.clone(),
        );
        self
    }

    /// The handles of a command (by lowercase name); unknown names share one handle.
    pub fn command(&self, name: &str) -> &CommandMetrics {
        let i = self
            .commands
            .binary_search_by_key(&name, |(c, _)| c)
            .or_else(|_| self.commands.binary_search_by_key(&"unknown", |(c, _)| c))
            .expect("'unknown' is always registered");
        &self.commands[i].1
    }

    pub fn observe_http(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        took: Duration,
    ) {
        self.http
            .get_or_create(&HttpLabel {
                route,
                method,
                status,
            })
            .observe(took.as_secs_f64());
    }

    /// Refreshes storage gauges and renders everything.
    pub fn render(&self, node: &Node) -> String {
        for ks in node.keyspaces() {
            let label = KeyspaceLabel {
                keyspace: ks.spec.name.to_string(),
                mode: ks.spec.mode.as_str(),
            };
            // Keys stored on this node: for replicated keyspaces, in the replicas it holds.
            let local = ks.local_len();
            if let Some(n) = local {
                self.keys.get_or_create(&label).set(n as i64);
            }
            if let Some(m) = ks.memory() {
                self.memory.get_or_create(&label).set(m.used_bytes as i64);
                self.evicted
                    .get_or_create(&label)
                    .set(m.evicted_keys as i64);
                self.expired
                    .get_or_create(&label)
                    .set(m.expired_keys as i64);
            }
        }
        let t = &node.txns.metrics;
        for (outcome, n) in [
            ("committed", &t.committed),
            ("watch_aborted", &t.watch_failed),
            ("conflict", &t.conflicts),
            ("unknown", &t.unknown),
            ("retried", &t.retried),
            ("recovered", &t.recovered),
            ("commits_rode", &t.commits_rode),
            ("commits_alone", &t.commits_alone),
        ] {
            self.cross_shard
                .get_or_create(&TxnLabel { outcome })
                .set(n.load(Ordering::Relaxed) as i64);
        }
        let s = node.engine.stats();
        self.file_bytes.set(node.engine.file_bytes() as i64);
        self.commits.set(s.commits.load(Ordering::Relaxed) as i64);
        self.committed_jobs
            .set(s.jobs.load(Ordering::Relaxed) as i64);
        self.commit_seconds
            .set(s.commit_micros.load(Ordering::Relaxed) as f64 / 1e6);
        self.corruptions
            .set(s.corruptions.load(Ordering::Relaxed) as i64);
        self.sync_seconds
            .set(s.sync_micros.load(Ordering::Relaxed) as f64 / 1e6);
        self.durable_commits
            .set(s.durable_commits.load(Ordering::Relaxed) as i64);
        let wal = node.engine.wal();
        let w = wal.stats();
        self.wal_syncs.set(w.syncs.load(Ordering::Relaxed) as i64);
        self.wal_sync_seconds
            .set(w.sync_micros.load(Ordering::Relaxed) as f64 / 1e6);
        self.wal_bytes.set(w.bytes.load(Ordering::Relaxed) as i64);
        self.wal_file_bytes.set(wal.file_bytes() as i64);
        self.wal_moved.set(w.moved.load(Ordering::Relaxed) as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
