//! Pub/sub across the cluster: who is subscribed on this node, and how a message published
//! through any node reaches subscribers on every node.
//!
//! # Delivery
//!
//! PUBLISH delivers to this node's subscribers at once and answers how many received it (what
//! Redis Cluster answers: the receivers on the node you asked), then hands the message to one
//! outbound queue per other node in the cluster map. One sender task per peer sends a queue's
//! messages in batches, one batch after the other, so two messages published through the same
//! node arrive everywhere in publish order. Every node delivers every message (as Redis
//! Cluster's bus does); sharded channels (SPUBLISH/SSUBSCRIBE) travel the same way, in their own
//! namespace.
//!
//! Pub/sub is at-most-once, as in Redis: a message is not stored, a node that is down misses it,
//! and nothing is retried.
//!
//! # Bounds
//!
//! - Each subscribed connection has a queue of [`SUBSCRIBER_QUEUE_MAX`] messages. A subscriber
//!   that does not keep up (its queue full) is disconnected, as Redis's
//!   `client-output-buffer-limit pubsub` does, so a slow reader never holds server memory.
//! - Each peer's outbound queue holds [`PEER_QUEUE_MAX`] messages; beyond that (a slow or
//!   unreachable node) new messages for it are dropped and counted
//!   (`capdb_pubsub_dropped_total`): the publisher never waits for another node.
//! - A connection may hold [`CHANNELS_PER_CONNECTION_MAX`] subscriptions (channels, patterns and
//!   shard channels together).
//! - PUBSUB CHANNELS/NUMSUB/NUMPAT answer for this node, as in Redis Cluster.
//!
//! # Keyspace notifications
//!
//! A write's keyspace events (`capdb_data::notify` decides them) are published by the node
//! that received the write, after its reply, filtered by that node's `notify-keyspace-events`
//! ([`PubSub::publish_events`]): `__keyspace@<db>__:<key>` with the event name and
//! `__keyevent@<db>__:<event>` with the key, as Redis does, where `<db>` is what `SELECT` takes
//! for the keyspace (`0` for the connection's starting keyspace, else its name). They travel
//! as any published message, so a subscriber on any node receives them: wider than Redis
//! Cluster, whose events stay on the node that holds the key. `expired` comes from the node
//! that removed the key (a `cp` shard's leader sweeping, a cache node).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_transport::{Channel, Handler, Peers, Service};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Node;
use super::settings::KeyspaceEvents;

/// Messages waiting for one subscribed connection.
pub const SUBSCRIBER_QUEUE_MAX: usize = 16_384;
/// Messages waiting to be sent to one peer.
pub const PEER_QUEUE_MAX: usize = 16_384;
/// Messages sent to a peer in one request at most.
const PEER_BATCH_MAX: usize = 512;
/// How long a peer has to take a batch before it is dropped.
const PEER_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Subscriptions one connection may hold.
pub const CHANNELS_PER_CONNECTION_MAX: usize = 100_000;

/// Which namespace a channel is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// SUBSCRIBE/PUBLISH.
    Channel,
    /// PSUBSCRIBE: the name is a glob pattern over channels.
    Pattern,
    /// SSUBSCRIBE/SPUBLISH.
    Shard,
}

/// A published message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub shard: bool,
    pub channel: Bytes,
    pub payload: Bytes,
}

/// What a subscribed connection receives.
#[derive(Debug, Clone)]
pub enum Push {
    Message {
        channel: Bytes,
        payload: Bytes,
    },
    PMessage {
        pattern: Bytes,
        channel: Bytes,
        payload: Bytes,
    },
    SMessage {
        channel: Bytes,
        payload: Bytes,
    },
}

/// A subscribed connection's end of its queue.
#[derive(Clone)]
pub struct Subscriber {
    tx: mpsc::Sender<Push>,
    /// Set when a message could not be queued: the connection must close.
    pub overflowed: Arc<AtomicBool>,
}

impl Subscriber {
    pub fn new() -> (Subscriber, mpsc::Receiver<Push>) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE_MAX);
        (
            Subscriber {
                tx,
                overflowed: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    fn send(&self, push: Push) -> bool {
        match self.tx.try_send(push) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Relaxed);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

type Subscribers = HashMap<Bytes, HashMap<u64, Subscriber>>;

#[derive(Default)]
struct Registry {
    channels: Subscribers,
    patterns: Subscribers,
    shard: Subscribers,
}

impl Registry {
    fn of(&mut self, kind: Kind) -> &mut Subscribers {
        match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
            Kind::Shard => &mut self.shard,
        }
    }
}

/// One thing a node tells another on the pub/sub channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Item {
    /// Deliver to this node's subscribers.
    Publish(Message),
    /// These keys were written: wake this node's clients blocked on them (BLPOP, ...).
    Wake { keyspace: String, keys: Vec<Bytes> },
    /// A client of the sending node blocks on these keys until `until_ms`: send it a `Wake`
    /// when they are written (see `blocking.rs`).
    Interest {
        keyspace: String,
        keys: Vec<Bytes>,
        until_ms: u64,
    },
}

/// A request on the pub/sub channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum PubSubRequest {
    /// Items in the order the sending node queued them.
    Batch(Vec<Item>),
}

/// The pub/sub channel between nodes.
pub struct PubSubService;

impl Service for PubSubService {
    const CHANNEL: Channel = Channel::PubSub;
    type Request = PubSubRequest;
    type Response = ();
}

/// Serves the pub/sub channel with this node's registry.
pub struct PubSubHandler(pub Arc<Node>);

impl Handler<PubSubService> for PubSubHandler {
    async fn handle(&self, from: NodeId, request: PubSubRequest) {
        let PubSubRequest::Batch(items) = request;
        for item in items {
            match item {
                Item::Publish(m) => {
                    self.0.pubsub.deliver_local(&m);
                }
                Item::Wake { keyspace, keys } => self.0.blocking.wake_local(&keyspace, &keys),
                Item::Interest {
                    keyspace,
                    keys,
                    until_ms,
                } => self
                    .0
                    .blocking
                    .note_interest(from, &keyspace, keys, until_ms),
            }
        }
    }
}

/// This node's subscriptions and its outbound queues to other nodes.
pub struct PubSub {
    registry: Mutex<Registry>,
    peers: Peers<PubSubService>,
    outbound: Mutex<HashMap<NodeId, mpsc::Sender<Item>>>,
    dropped: prometheus_client::metrics::counter::Counter,
    pub delivered: AtomicU64,
}

impl PubSub {
    pub fn new(
        peers: Peers<PubSubService>,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> PubSub {
        PubSub {
            registry: Mutex::default(),
            peers,
            outbound: Mutex::default(),
            dropped,
            delivered: AtomicU64::new(0),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, kind: Kind, name: Bytes, conn: u64, sub: &Subscriber) {
        self.registry()
            .of(kind)
            .entry(name)
            .or_default()
            .insert(conn, sub.clone());
    }

    pub fn unsubscribe(&self, kind: Kind, name: &[u8], conn: u64) {
        let mut r = self.registry();
        let map = r.of(kind);
        if let Some(subs) = map.get_mut(name) {
            subs.remove(&conn);
            if subs.is_empty() {
                map.remove(name);
            }
        }
    }

    /// Delivers a message to this node's subscribers; returns how many received it.
    pub fn deliver_local(&self, m: &Message) -> i64 {
        let r = self.registry();
        let mut n = 0;
        if m.shard {
            for s in r.shard.get(&m.channel).into_iter().flat_map(|s| s.values()) {
                n += s.send(Push::SMessage {
                    channel: m.channel.clone(),
                    payload: m.payload.clone(),
                }) as i64;
            }
        } else {
            for s in r
                .channels
                .get(&m.channel)
                .into_iter()
                .flat_map(|s| s.values())
            {
                n += s.send(Push::Message {
                    channel: m.channel.clone(),
                    payload: m.payload.clone(),
                }) as i64;
            }
            for (pattern, subs) in &r.patterns {
                if capdb_data::glob::matches(pattern, &m.channel) {
                    for s in subs.values() {
                        n += s.send(Push::PMessage {
                            pattern: pattern.clone(),
                            channel: m.channel.clone(),
                            payload: m.payload.clone(),
                        }) as i64;
                    }
                }
            }
        }
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Publishes keyspace events of `keyspace` (see the module doc) to every node's
    /// subscribers, as this node's `notify-keyspace-events` allows.
    pub fn publish_events(
        self: &Arc<Self>,
        node: &Node,
        keyspace: &str,
        events: Vec<capdb_data::notify::Event>,
    ) {
        let flags = node.settings.keyspace_events();
        let db = if keyspace == node.config.resp_keyspace.as_str() {
            "0"
        } else {
            keyspace
        };
        for e in events {
            if !flags.has(e.class.bit()) {
                continue;
            }
            let publish = |channel: Vec<u8>, payload: Bytes| {
                let m = Message {
                    shard: false,
                    channel: channel.into(),
                    payload,
                };
                self.deliver_local(&m);
                self.broadcast(node, Item::Publish(m));
            };
            if flags.has(KeyspaceEvents::KEYSPACE) {
                let mut channel = format!("__keyspace@{db}__:").into_bytes();
                channel.extend_from_slice(&e.key);
                publish(channel, Bytes::from_static(e.name.as_bytes()));
            }
            if flags.has(KeyspaceEvents::KEYEVENT) {
                let channel = format!("__keyevent@{db}__:{}", e.name).into_bytes();
                publish(channel, e.key);
            }
        }
    }

    /// Channels with subscribers on this node (`kind` Channel or Shard), matching `pattern`.
    pub fn channels(&self, kind: Kind, pattern: Option<&[u8]>) -> Vec<Bytes> {
        let mut r = self.registry();
        let mut out: Vec<Bytes> = r
            .of(kind)
            .keys()
            .filter(|c| pattern.is_none_or(|p| capdb_data::glob::matches(p, c)))
            .cloned()
            .collect();
        out.sort();
        out
    }

    /// Subscribers of `name` on this node.
    pub fn count(&self, kind: Kind, name: &[u8]) -> usize {
        self.registry().of(kind).get(name).map_or(0, |s| s.len())
    }

    /// Distinct patterns subscribed on this node.
    pub fn patterns(&self) -> usize {
        self.registry().patterns.len()
    }

    /// Queues an item for every other node of the map (see the module doc).
    pub fn broadcast(self: &Arc<Self>, node: &Node, item: Item) {
        let others: Vec<NodeId> = node
            .cluster()
            .nodes
            .keys()
            .copied()
            .filter(|&id| id != node.id())
            .collect();
        self.send_to(node, &others, item);
    }

    /// Queues an item for the given nodes (never waits: a full queue drops it, counted).
    pub fn send_to(self: &Arc<Self>, node: &Node, targets: &[NodeId], item: Item) {
        if targets.is_empty() {
            return;
        }
        let state = node.cluster();
        let mut outbound = self.outbound.lock().unwrap_or_else(|p| p.into_inner());
        for &id in targets {
            let Some(info) = state.nodes.get(&id) else {
                continue;
            };
            let tx = outbound.entry(id).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
                tokio::spawn(send_loop(self.clone(), id, info.peer_addr.clone(), rx));
                tx
            });
            if tx.try_send(item.clone()).is_err() {
                self.dropped.inc();
            }
        }
    }
}

/// Sends one peer's queued messages, batch after batch (publish order is kept per publisher).
async fn send_loop(pubsub: Arc<PubSub>, peer: NodeId, addr: String, mut rx: mpsc::Receiver<Item>) {
    let mut batch = Vec::with_capacity(PEER_BATCH_MAX);
    while rx.recv_many(&mut batch, PEER_BATCH_MAX).await > 0 {
        let n = batch.len() as u64;
        let request = PubSubRequest::Batch(std::mem::take(&mut batch));
        let sent = pubsub
            .peers
            .get(peer, &addr)
            .call(request, PEER_SEND_TIMEOUT)
            .await;
        if let Err(e) = sent {
            pubsub.dropped.inc_by(n);
            tracing::debug!(peer, error = %e, "pub/sub messages to a peer dropped");
        }
    }
}
