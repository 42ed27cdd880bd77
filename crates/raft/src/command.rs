//! The Raft type configuration shared by every group (data shards and the meta group), and the
//! commands their logs carry ([`Request`]) with what applying one answers ([`Response`]).

use std::fmt;

use capdb_cluster::{MetaCommand, MetaResponse};
use capdb_types::{Error, Mutation, Reply, Timestamp};
use serde::{Deserialize, Serialize};

/// How a node is reached for Raft traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub peer_addr: String,
}

openraft::declare_raft_types!(
    /// One type configuration for all groups. Standard Raft leader ids: at most one leader per
    /// term, as in the Raft paper (openraft's default allows several).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = PeerNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<Self::Term, Self::NodeId>,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type SnapshotData = crate::snapshot::SnapshotData;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// A command in a group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Data shard: mutations, stamped once by the leader so every replica stores the same
    /// timestamps and evaluates expiry against the same clock.
    Write {
        mutations: Vec<Mutation>,
        timestamp: Timestamp,
        now_ms: u64,
    },
    /// Data shard: delete every key (FLUSHDB).
    Clear,
    /// Meta group: change the cluster map.
    Meta(MetaCommand),
    /// Any of the above, stamped by the node that routes it so that the state machine applies
    /// it at most once however often it is retried (see [`crate::sessions`]). Every client
    /// write travels this way; the bare forms are only in logs written before it existed.
    Identified {
        id: crate::sessions::RequestId,
        request: Box<Request>,
    },
    /// Data shard: a MULTI/EXEC transaction, applied in one storage transaction: every
    /// mutation in order (reads too, as read-only data-type commands, so they see the writes
    /// before them), or none when a `guards` key changed since its WATCH. Replies: with guards,
    /// the verdict first (OK, or the null array: aborted, nothing applied), then one per
    /// mutation; without, one per mutation (as a `Write`).
    Txn {
        mutations: Vec<Mutation>,
        timestamp: Timestamp,
        now_ms: u64,
        guards: Vec<TxnGuard>,
    },
    /// Data shard: a point in the log for WATCH; answers its own log index (one
    /// `Reply::Integer`). Changes nothing.
    WatchPoint,
    /// Data shard: one step of a cross-shard transaction at this participant (prepare, commit,
    /// abort or prevent: `capdb_storage::disk::TxnJob`), stamped by the proposing leader like
    /// a write. Answers [`Response::Txn`].
    TxnStep {
        txn: capdb_types::txn::TxnId,
        step: capdb_types::txn::ShardStep<capdb_types::Mutation, TxnGuard>,
        timestamp: Timestamp,
        now_ms: u64,
    },
    /// Data shard: turns its change log on or off from this entry on
    /// (`capdb_storage::disk` `changes.rs`); answers OK.
    ChangesConfig { on: bool },
    /// Data shard: keep change-log rows this long (ms); answers OK.
    ChangesRetention { retention_ms: u64 },
    /// Data shard: delete the change-log rows past the retention at `now_ms` (the proposing
    /// leader's clock, the same for every replica), a bounded number per entry; answers OK.
    ChangesTrim { now_ms: u64 },
    /// Data shard: close its change stream up to `ts` (the proposing node's clock): every
    /// later event gets a larger stream clock, so a merged reader may release everything at
    /// or below it while the shard is idle. Answers OK.
    ChangesProgress { ts: Timestamp },
    /// Data shard (a keyspace's first): a consumer-group command on one of its change
    /// streams (`capdb_storage::disk` `groups.rs`); answers what it answers.
    ChangesGroup(capdb_types::changes::groups::GroupCommand),
    /// Data shard: keep at most this many bytes of change-log events; answers OK.
    ChangesRetentionBytes { bytes: u64 },
    /// Data shard: [`Request::ChangesTrim`], and also every change-log entry below clock
    /// `keep_from` (the proposing leader's retention-by-size decision); answers OK.
    ChangesTrimTo { now_ms: u64, keep_from: Timestamp },
    /// Data shard: whether change events carry their key's previous string value from
    /// this entry on; answers OK.
    ChangesPrev { on: bool },
    /// Data shard: [`Request::ChangesTrimTo`] (`keep_from` optional) that keeps every entry
    /// at or above clock `pinned`: the oldest consumer-group position on the shard, as the
    /// proposing leader read it (within `capdb_storage::disk::PIN_BYTES_MAX`); answers OK.
    ChangesTrimPinned {
        now_ms: u64,
        keep_from: Option<Timestamp>,
        pinned: Timestamp,
    },
    /// Data shard: every replica holds a read transaction at exactly this entry for `owner`
    /// (a job, issue 15: `capdb_storage::disk` `pins.rs`), replacing its earlier pin, and
    /// judges expiry in it at `now_ms` (the proposer's clock). Answers `[index, keys, first
    /// key or nil, last key or nil]`, the same from every replica (whether a replica holds the
    /// pin shows when a task scans it).
    JobPin { owner: bytes::Bytes, now_ms: u64 },
    /// Data shard: every replica releases the pin of `owner` taken at `index` (not a later
    /// one); answers OK.
    JobUnpin { owner: bytes::Bytes, index: u64 },
    /// A `_jobs` shard: a change to jobs' state (`capdb_storage::disk` `jobs.rs`); answers
    /// what it answers.
    Job(capdb_types::jobs::JobCommand),
    /// Data shard (`cp`): a change to its views (`capdb_storage::disk` `views.rs`): define,
    /// backfill, drop, purge; answers what it answers.
    View(capdb_types::views::ViewCommand),
}

/// A watched key's guard in a [`Request::Txn`]: the key has not changed after log index
/// `index` (a [`Request::WatchPoint`]'s answer) nor expired after `since_ms` (the WATCH's
/// clock). See `capdb_storage::disk::WatchGuard`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnGuard {
    pub key: bytes::Bytes,
    pub index: u64,
    pub since_ms: u64,
}

impl TxnGuard {
    /// The guard as the engine judges it in an entry applied with clock `until_ms`.
    pub fn judged_at(self, until_ms: u64) -> capdb_storage::disk::WatchGuard {
        capdb_storage::disk::WatchGuard {
            key: self.key,
            index: self.index,
            since_ms: self.since_ms,
            until_ms,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Write { mutations, .. } => write!(f, "write({} mutations)", mutations.len()),
            Request::Clear => f.write_str("clear"),
            Request::Meta(c) => write!(f, "meta({c:?})"),
            Request::Txn {
                mutations, guards, ..
            } => write!(
                f,
                "txn({} mutations, {} guards)",
                mutations.len(),
                guards.len()
            ),
            Request::WatchPoint => f.write_str("watch point"),
            Request::ChangesConfig { on } => {
                write!(f, "changes {}", if *on { "on" } else { "off" })
            }
            Request::ChangesRetention { retention_ms } => {
                write!(f, "changes retention {retention_ms} ms")
            }
            Request::ChangesTrim { now_ms } => write!(f, "changes trim at {now_ms}"),
            Request::ChangesProgress { ts } => write!(f, "changes progress to {ts:?}"),
            Request::ChangesGroup(c) => write!(f, "changes group {:?}", c.op),
            Request::ChangesTrimTo { now_ms, keep_from } => {
                write!(f, "changes trim at {now_ms} and below {keep_from:?}")
            }
            Request::ChangesRetentionBytes { bytes } => {
                write!(f, "changes retention {bytes} bytes")
            }
            Request::ChangesPrev { on } => {
                write!(f, "changes prev {}", if *on { "on" } else { "off" })
            }
            Request::ChangesTrimPinned {
                now_ms,
                keep_from,
                pinned,
            } => write!(
                f,
                "changes trim at {now_ms}, below {keep_from:?}, pinned at {pinned:?}"
            ),
            Request::TxnStep { txn, step, .. } => write!(f, "txn {} of {txn}", step.name()),
            Request::JobPin { owner, .. } => {
                write!(f, "pin for {}", String::from_utf8_lossy(owner))
            }
            Request::JobUnpin { owner, index } => {
                write!(f, "unpin for {} at {index}", String::from_utf8_lossy(owner))
            }
            Request::Job(c) => write!(f, "job {} of {}", c.name(), String::from_utf8_lossy(c.id())),
            Request::View(c) => {
                write!(
                    f,
                    "view {} of {}",
                    c.kind(),
                    String::from_utf8_lossy(c.name())
                )
            }
            Request::Identified { id, request } => {
                write!(f, "{request} as {}.{}#{}", id.origin, id.epoch, id.seq)
            }
        }
    }
}

/// What applying a command answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    Empty,
    /// One reply per mutation of a `Write`.
    Replies(Vec<Result<Reply, Error>>),
    Meta(MetaResponse),
    /// An identified request that was not applied, and whether an earlier copy of it was is no
    /// longer known (see [`crate::sessions::Decision::Expired`]).
    Expired,
    /// What a participant answered to a [`Request::TxnStep`] (`Err`: the step broke the
    /// protocol and changed nothing).
    Txn(Result<capdb_storage::disk::TxnAnswer, Error>),
}
