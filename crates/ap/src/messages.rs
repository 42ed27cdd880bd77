//! Node-to-node messages of `ap` replication, on the transport's own `ap` channel.

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_transport::{Channel, RpcError, Service};
use capdb_types::{Error, Timestamp, Value};
use serde::{Deserialize, Serialize};

/// How many replicas must answer, per request (reads and writes choose separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Level {
    /// One replica (or a hint holder, for writes). The default: available on every side of
    /// a partition.
    #[default]
    One,
    /// A majority of the replicas (hint holders count: a sloppy quorum).
    Quorum,
    /// Every replica; hints do not count.
    All,
}

impl Level {
    /// Acknowledgements needed out of `replicas`.
    pub fn required(self, replicas: usize) -> usize {
        match self {
            Level::One => 1,
            Level::Quorum => replicas / 2 + 1,
            Level::All => replicas,
        }
        .clamp(1, replicas.max(1))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::One => "one",
            Level::Quorum => "quorum",
            Level::All => "all",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = capdb_types::Error;

    fn from_str(s: &str) -> Result<Level, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(Level::One),
            "quorum" => Ok(Level::Quorum),
            "all" => Ok(Level::All),
            other => Err(capdb_types::Error::InvalidInput(format!(
                "consistency level '{other}': expected one, quorum or all"
            ))),
        }
    }
}

/// Keys of one shard: the slot range a request is about.
pub type Slots = (u16, u16);

#[derive(Debug, Serialize, Deserialize)]
pub enum ApRequest {
    /// Failure detection probe.
    Ping,
    /// Merge these versions into the keyspace's local replica.
    Merge {
        keyspace: String,
        entries: Vec<(Bytes, Value)>,
    },
    /// The stored versions of these keys (tombstones included), each assembled whole from
    /// its head and element records.
    Read { keyspace: String, keys: Vec<Bytes> },
    /// Stored records by anti-entropy id (a key's head or one element record, see
    /// `capdb_storage::disk::ApRecord`), each as (key, a version that merges it in).
    ReadRecords { keyspace: String, ids: Vec<Bytes> },
    /// This replica's increment of a counter (it owns its own slot of the PN-counter).
    CounterAdd {
        keyspace: String,
        key: Bytes,
        delta: i64,
        timestamp: Timestamp,
        now_ms: u64,
    },
    /// Keep these versions for `target` until it is reachable again (hinted handoff).
    Hint {
        target: NodeId,
        keyspace: String,
        entries: Vec<(Bytes, Value)>,
    },
    /// The bucket hashes of a shard's keys (the leaves of the anti-entropy tree), counting
    /// only versions written at or before `before_ms` (writes still in flight are left to the
    /// next pass).
    Digest {
        keyspace: String,
        slots: Slots,
        before_ms: u64,
    },
    /// Record fingerprints (heads and elements, by record id) in these buckets of a shard.
    Fingerprints {
        keyspace: String,
        slots: Slots,
        buckets: Vec<u32>,
        before_ms: u64,
    },
    /// A page of a shard's live keys in order (SCAN, DBSIZE).
    Scan {
        keyspace: String,
        slots: Slots,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        now_ms: u64,
    },
    /// Remove these tombstones (every replica is known to hold them). For an expired `ap`
    /// collection the timestamp is a horizon: it goes (its elements in bounded steps).
    /// `elements`: element records (by record key) holding only removals older than the
    /// horizon given with each.
    Purge {
        keyspace: String,
        entries: Vec<(Bytes, Timestamp)>,
        elements: Vec<(Bytes, Timestamp)>,
    },
    /// This node's reconciliation statistics (JSON).
    Stats,
    /// What a command naming only these elements of `key`'s collection of `kind` needs:
    /// see `capdb_storage::disk::DiskTable::ap_get_part` (the head, those element records
    /// and a visible element, its witness, when the collection is big; else the whole state).
    ReadPart {
        keyspace: String,
        key: Bytes,
        kind: u8,
        subs: Vec<Bytes>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ApResponse {
    Pong,
    Count(u64),
    Values(Vec<Option<Value>>),
    Records(Vec<Option<(Bytes, Value)>>),
    Value(Value),
    Digest(Vec<u64>),
    Fingerprints(Vec<(Bytes, u64)>),
    Page(Vec<(Bytes, Value)>, Option<Bytes>),
    Stats(String),
    Part(capdb_storage::disk::ApPart),
}

/// The `ap` channel: a replica answers with its response or the typed error that refused it.
pub struct ApService;

impl Service for ApService {
    const CHANNEL: Channel = Channel::Ap;
    type Request = ApRequest;
    type Response = Result<ApResponse, Error>;
}

/// Why a call to a replica failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The replica answered with an error: the request was refused and had no effect there.
    #[error(transparent)]
    Refused(Error),
    /// No answer (unreachable, timed out, blocked): the request may or may not have been
    /// executed by the replica.
    #[error(transparent)]
    Transport(RpcError),
    /// The node is not in the cluster map this node has: nothing was sent.
    #[error("node {0} is not in the cluster map")]
    NotInMap(NodeId),
}
