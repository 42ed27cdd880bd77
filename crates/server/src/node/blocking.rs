//! Clients blocked on keys (BLPOP, BRPOP, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP), and the
//! wake-ups that end their wait, whichever node the write went through.
//!
//! # How a blocked client is served
//!
//! A blocked client retries the command's non-blocking form (LMPOP, LMOVE, ZMPOP, ...) as an
//! ordinary write whenever it is woken, and blocks again when that finds nothing, until its
//! timeout. The pop itself is therefore exactly as atomic and durable as any write of the
//! keyspace (one Raft entry in `cp`); waking only says "look again".
//!
//! - **Local wake-ups**: after a connection's writes are applied, the keys they wrote wake this
//!   node's clients blocked on them ([`Blocking::wake_local`]).
//! - **Remote wake-ups**: a node whose client blocks announces its interest in the keys to every
//!   other node (`Item::Interest`, valid for [`INTEREST_TTL`], renewed while it waits). A node
//!   that applies a write to a key another node is interested in sends that node an
//!   `Item::Wake`. Announcements and wake-ups travel on the pub/sub channel, so they are
//!   at-most-once: a blocked client also looks again every [`POLL_INTERVAL`], reading before
//!   it writes.
//!
//! # What differs from Redis
//!
//! Redis hands a pushed element to the longest-waiting blocked client before any other command
//! runs. Here the woken client races with other clients' pops: an element pushed while a
//! client is blocked can be taken by a plain LPOP that arrives before the woken client's retry
//! (it is never lost or delivered twice). Among clients blocked on one node, the one woken first
//! retries first.
//!
//! # Bounds
//!
//! Interest records expire after [`INTEREST_TTL`]; a node keeps at most [`INTEREST_KEYS_MAX`] of
//! them (beyond, new interest is ignored and those clients rely on polling).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::NodeId;
use tokio::sync::Notify;

/// How long an announced interest lasts unless renewed.
pub const INTEREST_TTL: Duration = Duration::from_secs(30);
/// How often a blocked client looks again without a wake-up.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Remote interest records one node keeps at most.
pub const INTEREST_KEYS_MAX: usize = 100_000;

type Slot = (String, Bytes);

/// This node's blocked clients and other nodes' interest in keys.
#[derive(Default)]
pub struct Blocking {
    local: Mutex<HashMap<Slot, Vec<Weak<Notify>>>>,
    local_count: AtomicUsize,
    remote: Mutex<HashMap<Slot, HashMap<NodeId, u64>>>,
    remote_count: AtomicUsize,
    /// Clients blocked on this node now (INFO's `blocked_clients`).
    clients: AtomicUsize,
}

impl Blocking {
    /// Registers a blocked client (its `notify`) on `keys`.
    pub fn register(&self, keyspace: &str, keys: &[Bytes], notify: &Arc<Notify>) {
        self.clients.fetch_add(1, Ordering::Relaxed);
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            local
                .entry((keyspace.to_string(), k.clone()))
                .or_default()
                .push(Arc::downgrade(notify));
        }
        self.local_count.store(local.len(), Ordering::Relaxed);
    }

    /// Removes a client's registrations (and any other dead ones on those keys).
    pub fn unregister(&self, keyspace: &str, keys: &[Bytes], notify: &Arc<Notify>) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            let slot = (keyspace.to_string(), k.clone());
            if let Some(v) = local.get_mut(&slot) {
                v.retain(|w| w.upgrade().is_some_and(|n| !Arc::ptr_eq(&n, notify)));
                if v.is_empty() {
                    local.remove(&slot);
                }
            }
        }
        self.local_count.store(local.len(), Ordering::Relaxed);
    }

    /// Clients blocked on this node now.
    pub fn blocked_clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Whether any client anywhere may care about writes (the common case is no: one load).
    pub fn anyone_waiting(&self) -> bool {
        self.local_count.load(Ordering::Relaxed) > 0
            || self.remote_count.load(Ordering::Relaxed) > 0
    }

    /// Wakes this node's clients blocked on `keys` (each looks again).
    pub fn wake_local(&self, keyspace: &str, keys: &[Bytes]) {
        if self.local_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            if let Some(v) = local.get(&(keyspace.to_string(), k.clone())) {
                for n in v.iter().filter_map(Weak::upgrade) {
                    n.notify_one();
                }
            }
        }
    }

    /// Records that `from` has clients blocked on `keys` until `until_ms`.
    pub fn note_interest(&self, from: NodeId, keyspace: &str, keys: Vec<Bytes>, until_ms: u64) {
        let now = capdb_types::unix_now_ms();
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote.retain(|_, nodes| {
            nodes.retain(|_, until| *until > now);
            !nodes.is_empty()
        });
        for k in keys {
            if remote.len() >= INTEREST_KEYS_MAX {
                break;
            }
            remote
                .entry((keyspace.to_string(), k))
                .or_default()
                .insert(from, until_ms);
        }
        self.remote_count.store(remote.len(), Ordering::Relaxed);
    }

    /// The other nodes interested in writes to `keys` now.
    pub fn interested_nodes(&self, keyspace: &str, keys: &[Bytes]) -> Vec<NodeId> {
        if self.remote_count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let now = capdb_types::unix_now_ms();
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<NodeId> = keys
            .iter()
            .filter_map(|k| remote.get(&(keyspace.to_string(), k.clone())))
            .flat_map(|nodes| nodes.iter().filter(|(_, u)| **u > now).map(|(n, _)| *n))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}
