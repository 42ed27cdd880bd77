//! The Redis protocol front end (RESP2, and RESP3 after `HELLO 3`).
//!
//! # Request flow
//!
//! ```text
//! TcpListener (serve)            one task per connection, holding one of `connections_max` permits
//!   -> Connection::run           read into a buffer, parse every complete command (parse.rs)
//!   -> Connection::execute       dispatch by name (commands/mod.rs, one table: name, arity, flags,
//!                                handler); replies go to ReplyWriter (reply.rs)
//!   -> consecutive writes to one keyspace are gathered into one Keyspace::apply call (one group
//!      commit for a whole pipeline), then every reply is written in order and flushed once
//!   -> consecutive reads of a replicated keyspace (GETs, and the data types' read commands:
//!      LRANGE, HGET, ...) are gathered the same way: the GETs into one Keyspace::get_each call
//!      (one read barrier and one storage read per shard), the others run concurrently with it
//!      (sharing the read barriers), instead of one after another
//! ```
//!
//! Gathering never changes an answer: the gathered commands of a connection run in its order
//! (a write or any other command first runs every gathered command before it), each gets its
//! own reply or error, and each gathered read is served after every read of the gather was
//! received and before any was answered, which is within each one's interval (so still
//! linearizable; reads do not change what other reads see, so their order among themselves
//! does not matter).
//!
//! # Rooms
//!
//! - this file: accepting connections, and [`Connection`]: its state, the read loop, the queue
//!   of pending writes and how their replies are written (every method of `Connection` is
//!   here, so its state changes are all in one file);
//! - `commands/`: the command table and one file per command family;
//! - `cluster.rs`: Redis Cluster compatibility (`CLUSTER`, `-MOVED`, which slots a node serves);
//! - `parse.rs`, `reply.rs`, `glob.rs`: the wire format in and out, and `MATCH` patterns.
//!
//! # Bounds
//!
//! - At most `connections_max` connections; the next one gets `-ERR max number of clients
//!   reached` and is closed.
//! - A command may not exceed `frame_bytes_max` (checked on the declared length, before
//!   buffering); anything else malformed is a protocol error that closes that connection only.
//! - At most `pipeline_depth_max` commands run per read before replies are written, and replies
//!   are written whenever [`OUTPUT_FLUSH_BYTES`] accumulate (reads gathered together count as
//!   one: at most [`GATHERED_READS_MAX`], and at most half a peer frame of values at the value
//!   size limit, 16 with the default 8 MiB); the server does not read more from a
//!   client until its replies are written, so a client that never reads is held by TCP
//!   backpressure, not by server memory.

mod cluster;
mod commands;

pub mod parse;
pub mod reply;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use capdb_types::{Error, Mutation, Reply};

use crate::node::{Keyspace, Node};
use commands::error_line;
use parse::{ParseError, parse_command};
use reply::ReplyWriter;

pub use commands::{COMMAND_NAMES, all_command_names};

/// Replies are written to the socket once this many bytes are buffered, even mid-pipeline.
pub const OUTPUT_FLUSH_BYTES: usize = 64 * 1024;

/// Most reads gathered together: their answers are all in memory at once (up to this many
/// times the largest reply), where reads run one by one hold one. Fewer when values may be
/// large ([`gathered_reads_max`]).
pub const GATHERED_READS_MAX: usize = 64;

/// How many reads a gather may hold with values of up to `value_bytes_max`: the GETs of one
/// shard travel to a remote leader and back as one message, whose answer must fit in half a
/// peer frame (so their values do, whatever their size), and never more than
/// [`GATHERED_READS_MAX`]. At least 1 (a single read is what runs without gathering).
fn gathered_reads_max(value_bytes_max: usize) -> usize {
    (capdb_transport::FRAME_BYTES_MAX / 2 / value_bytes_max.max(1)).clamp(1, GATHERED_READS_MAX)
}

/// Most entries a write batch's vectors are allocated for up front (see `last_batch`).
const BATCH_HINT_MAX: usize = 1024;

/// Accepts RESP connections until `shutdown` flips, then returns. Connections finish the
/// commands they have read and close; `permits` lets the caller wait for them all.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            node.metrics.connections_rejected.inc();
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let keyspace = match node.resp_keyspace() {
            Ok(ks) => ks,
            Err(e) => {
                let line = format!("-{}\r\n", error_line(&e));
                tokio::spawn(async move {
                    let _ = stream.write_all(line.as_bytes()).await;
                });
                continue;
            }
        };
        node.metrics.connections_total.inc();
        node.metrics.connections.inc();
        let conn = Connection::new(node.clone(), keyspace, shutdown.clone(), peer);
        tokio::spawn(async move {
            if let Err(e) = conn.run(stream).await {
                tracing::debug!(%peer, error = %e, "connection ended with an I/O error");
            }
            drop(permit);
        });
    }
    tracing::info!("RESP listener closed");
}

/// The keyspace events of a flushed batch, in command order, from the commands that asked for
/// them; the replies of their wrapped data-type commands are unwrapped in place (the client
/// sees the command's own reply).
fn keyspace_events(
    commands: &[PendingCommand],
    mutations: &[Mutation],
    replies: &mut [capdb_types::Result<Reply>],
    now_ms: u64,
) -> Vec<capdb_data::notify::Event> {
    use capdb_data::notify;
    let mut events = Vec::new();
    let mut at = 0;
    for c in commands {
        let range = at..(at + c.count).min(replies.len()).min(mutations.len());
        at += c.count;
        if !c.notify {
            continue;
        }
        for i in range {
            let Ok(reply) = &mut replies[i] else {
                continue;
            };
            match &mutations[i] {
                Mutation::Exec { args, .. } if notify::is_wrapped(args) => {
                    let (inner, mine) = notify::unwrap(std::mem::replace(reply, Reply::Nil));
                    *reply = inner;
                    events.extend(mine);
                }
                m => events.extend(notify::mutation_events(m, reply, now_ms)),
            }
        }
    }
    events
}

/// Writes batched for one group commit: consecutive mutation commands of one connection.
struct PendingWrites {
    keyspace: Arc<Keyspace>,
    mutations: Vec<Mutation>,
    /// One entry per command, in order: how to turn its mutation replies into its RESP reply.
    commands: Vec<PendingCommand>,
}

/// Reads gathered to run together: consecutive reads of one connection to one replicated
/// keyspace.
struct PendingReads {
    keyspace: Arc<Keyspace>,
    /// Each read and when its command was read, in order.
    reads: Vec<(GatheredRead, Instant)>,
}

/// A gathered read.
enum GatheredRead {
    /// `GET key`.
    Get(Bytes),
    /// A data type's read command (its name, for metrics, and its arguments).
    Query(&'static str, Vec<Bytes>),
}

/// How the replies of a queued command's mutations become its RESP reply.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One mutation; its reply as is.
    Plain,
    /// DEL k1..kn: the sum of the integer replies.
    SumIntegers,
    /// MSET: OK once all applied.
    AllOk,
    /// SETNX: 1 if set, 0 if not.
    SetFlag,
}

/// A queued write command: its name (for metrics), reply shape and number of mutations.
struct PendingCommand {
    name: &'static str,
    shape: Shape,
    count: usize,
    started: Instant,
    /// Its keyspace events are wanted (`notify-keyspace-events` was active when it was queued):
    /// its data-type commands travel wrapped (`capdb_data::notify`).
    notify: bool,
}

pub(crate) struct Connection {
    node: Arc<Node>,
    shutdown: watch::Receiver<bool>,
    id: u64,
    peer: std::net::SocketAddr,
    name: Option<Bytes>,
    lib_name: Option<Bytes>,
    keyspace: Arc<Keyspace>,
    /// `READONLY` switches to stale reads from the nearest replica; `READWRITE` back.
    /// Consistency of this connection's requests: `READONLY`/`READWRITE` switch `cp` reads,
    /// `CONSISTENCY` sets the `ap` levels.
    pub(super) consistency: crate::node::Consistency,
    /// Redis Cluster behaviour (`-MOVED` instead of forwarding to a remote leader; `SCAN`,
    /// `DBSIZE`, `KEYS` for this node's slots; `cluster_enabled:1`): starts as the server's
    /// `redis_cluster` setting, `CLUSTER REDIRECT ON|OFF` switches it (see `cluster.rs`).
    cluster_mode: bool,
    authenticated: bool,
    out: ReplyWriter,
    pending: Option<PendingWrites>,
    /// Gathered GETs; never at the same time as `pending` (each flushes the other first).
    pending_reads: Option<PendingReads>,
    /// Sizes of the last flushed batch (mutations, commands): the next batch's vectors start
    /// at that capacity instead of growing one reallocation at a time through a pipeline.
    /// Capped at [`BATCH_HINT_MAX`] (one MSET of a million keys must not make every later
    /// batch allocate for a million).
    last_batch: (usize, usize),
    quit: bool,
    /// When the current batch of commands was read, and the wall clock then (Unix ms). One
    /// clock reading per read serves every command of a pipeline.
    batch_started: Instant,
    now_ms: u64,
    /// Commands answered since the last socket write: (name, failed).
    finished: Vec<(&'static str, bool)>,
    /// Pub/sub subscriptions, once the connection subscribed to anything.
    subs: Option<Box<Subscriptions>>,
    /// The client's socket, for blocking commands to notice a client that leaves.
    socket_fd: Option<std::os::fd::RawFd>,
    /// The open transaction, between MULTI and EXEC/DISCARD (`commands/txn.rs`).
    multi: Option<Box<commands::txn::Multi>>,
    /// Keys watched by WATCH until EXEC, DISCARD, UNWATCH or disconnect (dropping them ends
    /// the watch).
    watched: Vec<crate::node::Watched>,
}

/// A connection's pub/sub state: what it subscribed to, and its message queue (see
/// `node/pubsub.rs` for delivery and bounds).
struct Subscriptions {
    sub: crate::node::pubsub::Subscriber,
    rx: tokio::sync::mpsc::Receiver<crate::node::pubsub::Push>,
    channels: std::collections::HashSet<Bytes>,
    patterns: std::collections::HashSet<Bytes>,
    shard: std::collections::HashSet<Bytes>,
}

impl Subscriptions {
    fn set(&mut self, kind: crate::node::pubsub::Kind) -> &mut std::collections::HashSet<Bytes> {
        use crate::node::pubsub::Kind;
        match kind {
            Kind::Channel => &mut self.channels,
            Kind::Pattern => &mut self.patterns,
            Kind::Shard => &mut self.shard,
        }
    }

    fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty()
    }
}

/// The next message for a subscribed connection (never, for one that is not subscribed).
async fn next_push(subs: &mut Option<Box<Subscriptions>>) -> Option<crate::node::pubsub::Push> {
    match subs {
        Some(s) => s.rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.node.metrics.connections.dec();
        if let Some(s) = self.subs.take() {
            use crate::node::pubsub::Kind;
            for (kind, names) in [
                (Kind::Channel, &s.channels),
                (Kind::Pattern, &s.patterns),
                (Kind::Shard, &s.shard),
            ] {
                for n in names {
                    self.node.pubsub.unsubscribe(kind, n, self.id);
                }
            }
        }
    }
}

impl Connection {
    fn new(
        node: Arc<Node>,
        keyspace: Arc<Keyspace>,
        shutdown: watch::Receiver<bool>,
        peer: std::net::SocketAddr,
    ) -> Connection {
        Connection {
            id: node.next_client_id(),
            keyspace,
            consistency: crate::node::Consistency::default(),
            cluster_mode: node.config.redis_cluster,
            authenticated: node.config.password.is_none(),
            node,
            shutdown,
            peer,
            name: None,
            lib_name: None,
            out: ReplyWriter::new(),
            pending: None,
            pending_reads: None,
            last_batch: (0, 0),
            quit: false,
            batch_started: Instant::now(),
            now_ms: capdb_types::unix_now_ms(),
            finished: Vec::new(),
            subs: None,
            socket_fd: None,
            multi: None,
            watched: Vec::new(),
        }
    }

    /// Writes buffered replies, then records the latency of every command they answer: from
    /// the read that delivered the command to its reply being handed to the socket.
    async fn write_out(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        stream.write_all(&self.out.out).await?;
        self.out.out.clear();
        let took = self.batch_started.elapsed();
        // A pipeline is mostly runs of one command: one metrics lookup and one observation of
        // the shared latency per run, not per command.
        let metrics = &self.node.metrics;
        let mut finished = self.finished.drain(..).peekable();
        while let Some((name, failed)) = finished.next() {
            let (mut n, mut errors) = (1u64, failed as u64);
            while let Some((_, f)) = finished.next_if(|(next, _)| std::ptr::eq(*next, name)) {
                n += 1;
                errors += f as u64;
            }
            let m = metrics.command(name);
            m.duration.observe_many(took, n);
            // What the node's job scan limit protects (`capdb_jobs::throttle`).
            self.node.jobs.throttle.observe(name, took, n);
            if errors > 0 {
                m.errors.inc_by(errors);
            }
        }
        Ok(())
    }

    async fn run(mut self, mut stream: TcpStream) -> std::io::Result<()> {
        self.socket_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
        let frame_max = self.node.config.limits.frame_bytes_max;
        let depth_max = self.node.config.limits.pipeline_depth_max;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            // Run every complete command in the buffer (up to the pipeline bound).
            let mut executed = 0;
            let mut protocol_error = None;
            while executed < depth_max && !self.quit {
                match parse_command(&buf, frame_max, !self.authenticated) {
                    Ok(parsed) => {
                        let frame = buf.split_to(parsed.consumed).freeze();
                        let args: Vec<Bytes> = match parsed.decoded {
                            Some(words) => words.into_iter().map(Bytes::from).collect(),
                            None => parsed
                                .args
                                .iter()
                                .map(|&(s, e)| frame.slice(s..e))
                                .collect(),
                        };
                        if args.is_empty() {
                            continue;
                        }
                        self.execute(args).await;
                        executed += 1;
                        if self.out.out.len() >= OUTPUT_FLUSH_BYTES {
                            self.flush_pending().await;
                            self.write_out(&mut stream).await?;
                        }
                    }
                    Err(ParseError::Incomplete) => break,
                    Err(ParseError::Protocol(msg)) => {
                        protocol_error = Some(msg);
                        break;
                    }
                }
            }
            self.flush_pending().await;
            if let Some(msg) = &protocol_error {
                self.node.metrics.protocol_errors.inc();
                tracing::debug!(peer = %self.peer, error = %msg, "closing connection after a protocol error");
                self.out.error(&format!("ERR {msg}"));
            }
            if !self.out.out.is_empty() {
                self.write_out(&mut stream).await?;
                // Keep a huge reply from pinning its buffer for the life of the connection.
                if self.out.out.capacity() > 4 * OUTPUT_FLUSH_BYTES {
                    self.out.out = BytesMut::with_capacity(16 * 1024);
                }
            }
            if protocol_error.is_some() || self.quit {
                let _ = stream.shutdown().await;
                return Ok(());
            }
            if executed >= depth_max {
                continue; // more complete commands may be buffered: run them before reading
            }
            if *self.shutdown.borrow() {
                return Ok(());
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            let n = tokio::select! {
                biased;
                r = stream.read_buf(&mut buf) => r?,
                _ = self.shutdown.changed() => return Ok(()),
                push = next_push(&mut self.subs) => {
                    if let Some(push) = push {
                        self.write_push(push);
                    }
                    // Everything else already queued goes out in the same write.
                    while let Some(p) = self.subs.as_mut().and_then(|s| s.rx.try_recv().ok()) {
                        self.write_push(p);
                        if self.out.out.len() >= OUTPUT_FLUSH_BYTES {
                            break;
                        }
                    }
                    if self.subs.as_ref().is_some_and(|s| s.sub.overflowed.load(std::sync::atomic::Ordering::Relaxed)) {
                        // Redis's pubsub output limit: a subscriber that cannot keep up is dropped.
                        self.node.metrics.pubsub_slow_subscribers.inc();
                        return Ok(());
                    }
                    self.write_out(&mut stream).await?;
                    continue;
                }
            };
            if n == 0 {
                return Ok(()); // the client closed (possibly mid-frame: nothing to answer)
            }
            self.batch_started = Instant::now();
            self.now_ms = capdb_types::unix_now_ms();
        }
    }

    /// Writes a pub/sub message in this connection's protocol.
    fn write_push(&mut self, push: crate::node::pubsub::Push) {
        use crate::node::pubsub::Push;
        match push {
            Push::Message { channel, payload } => {
                self.out.push(3);
                self.out.bulk(b"message");
                self.out.bulk(&channel);
                self.out.bulk(&payload);
            }
            Push::PMessage {
                pattern,
                channel,
                payload,
            } => {
                self.out.push(4);
                self.out.bulk(b"pmessage");
                self.out.bulk(&pattern);
                self.out.bulk(&channel);
                self.out.bulk(&payload);
            }
            Push::SMessage { channel, payload } => {
                self.out.push(3);
                self.out.bulk(b"smessage");
                self.out.bulk(&channel);
                self.out.bulk(&payload);
            }
        }
    }

    /// Whether a RESP2 connection is in subscribed mode (only pub/sub commands, PING, QUIT).
    fn subscribed_resp2(&self) -> bool {
        !self.out.resp3 && self.subs.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Runs one command, writing its reply (or queueing it behind pending writes).
    async fn execute(&mut self, args: Vec<Bytes>) {
        self.node
            .commands_processed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = self.batch_started;
        let mut lower = [0u8; 24];
        let name = args[0].as_ref();
        let name: &str = if name.len() <= lower.len() {
            lower[..name.len()].copy_from_slice(name);
            lower[..name.len()].make_ascii_lowercase();
            std::str::from_utf8(&lower[..name.len()]).unwrap_or("")
        } else {
            ""
        };
        let name = commands::canonical_name(name);
        commands::execute(self, name, args, started).await;
    }

    /// Runs the gathered commands (writes in one apply, or GETs in one read) and writes their
    /// replies, in order.
    async fn flush_pending(&mut self) {
        if let Some(r) = self.pending_reads.take() {
            debug_assert!(
                self.pending.is_none(),
                "reads and writes are never gathered together"
            );
            return self.flush_reads(r).await;
        }
        let Some(p) = self.pending.take() else {
            return;
        };
        self.last_batch = (
            p.mutations.len().min(BATCH_HINT_MAX),
            p.commands.len().min(BATCH_HINT_MAX),
        );
        let now = self.now_ms;
        // Keys written by data-type commands wake clients blocked on them (here or elsewhere);
        // gathered only when someone waits.
        let written: Vec<Bytes> = if self.node.blocking.anyone_waiting() {
            written_keys(&p.mutations)
        } else {
            Vec::new()
        };
        let keyspace = p.keyspace.clone();
        let notified = p
            .commands
            .iter()
            .any(|c| c.notify)
            .then(|| p.mutations.clone());
        let sizes: Vec<usize> = p.commands.iter().map(|c| c.count).collect();
        let mut result = p
            .keyspace
            .apply_commands(p.mutations, &sizes, now, self.consistency)
            .await;
        let events = match (&notified, &mut result) {
            (Some(mutations), Ok(replies)) => keyspace_events(&p.commands, mutations, replies, now),
            _ => Vec::new(),
        };
        self.reply_pending(p.commands, result);
        if !events.is_empty() {
            let name = keyspace.spec.name.as_str();
            self.node.pubsub.publish_events(&self.node, name, events);
        }
        self.wake_blocked(&keyspace, written);
    }

    /// Gathers a read of a replicated keyspace behind the reads gathered before it (writes
    /// gathered before it run first).
    async fn queue_read(&mut self, read: GatheredRead, started: Instant) {
        let same = self
            .pending_reads
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(&r.keyspace, &self.keyspace));
        if !same {
            self.flush_pending().await;
        }
        if self.pending_reads.as_ref().is_some_and(|r| {
            r.reads.len() >= gathered_reads_max(self.node.config.limits.value_bytes_max)
        }) {
            self.flush_pending().await;
        }
        self.pending_reads
            .get_or_insert_with(|| PendingReads {
                keyspace: self.keyspace.clone(),
                reads: Vec::with_capacity(16),
            })
            .reads
            .push((read, started));
    }

    /// Gathers a data type's read command (see [`Connection::queue_read`]).
    async fn queue_query(&mut self, name: &'static str, args: Vec<Bytes>, started: Instant) {
        self.queue_read(GatheredRead::Query(name, args), started)
            .await
    }

    /// Gathers `GET key` (see [`Connection::queue_read`]).
    async fn queue_get(&mut self, key: Bytes, started: Instant) {
        self.queue_read(GatheredRead::Get(key), started).await
    }

    /// Runs the gathered reads together (the GETs in one call, the other reads concurrently
    /// with it) and writes each one's reply, in order.
    async fn flush_reads(&mut self, r: PendingReads) {
        let (now, c) = (self.now_ms, self.consistency);
        let keys: Vec<Bytes> = r
            .reads
            .iter()
            .filter_map(|(read, _)| match read {
                GatheredRead::Get(k) => Some(k.clone()),
                GatheredRead::Query(..) => None,
            })
            .collect();
        let queries = r.reads.iter().filter_map(|(read, _)| match read {
            GatheredRead::Query(_, args) => Some(r.keyspace.query(args.clone(), now, c)),
            GatheredRead::Get(_) => None,
        });
        let gets = async {
            if keys.is_empty() {
                Vec::new()
            } else {
                r.keyspace.get_each(&keys, now, c).await
            }
        };
        let (values, replies) = futures::join!(gets, futures::future::join_all(queries));
        debug_assert_eq!(values.len() + replies.len(), r.reads.len());
        let (mut values, mut replies) = (values.into_iter(), replies.into_iter());
        for (read, started) in r.reads {
            let outcome = match read {
                GatheredRead::Get(_) => match values.next() {
                    Some(Ok(Some(v))) if v.is_string() => {
                        self.out.bulk(&v.data);
                        Ok("get")
                    }
                    Some(Ok(Some(_))) => Err(("get", error_line(&Error::WrongType))),
                    Some(Ok(None)) => {
                        self.out.null();
                        Ok("get")
                    }
                    Some(Err(e)) => Err(("get", error_line(&e))),
                    None => Err(("get", "ERR missing reply".to_string())),
                },
                GatheredRead::Query(name, _) => match replies.next() {
                    Some(Ok(reply)) => {
                        self.out.reply(&reply);
                        Ok(name)
                    }
                    Some(Err(e)) => Err((name, error_line(&e))),
                    None => Err((name, "ERR missing reply".to_string())),
                },
            };
            match outcome {
                Ok(name) => self.done(name, started, false),
                Err((name, line)) => self.fail(name, started, &line),
            }
        }
    }

    /// Wakes clients blocked on `written` keys of `keyspace`, here and on other nodes.
    fn wake_blocked(&self, keyspace: &Keyspace, written: Vec<Bytes>) {
        if written.is_empty() || !self.node.blocking.anyone_waiting() {
            return;
        }
        let name = keyspace.spec.name.as_str();
        self.node.blocking.wake_local(name, &written);
        let nodes = self.node.blocking.interested_nodes(name, &written);
        self.node.pubsub.send_to(
            &self.node,
            &nodes,
            crate::node::pubsub::Item::Wake {
                keyspace: name.to_string(),
                keys: written,
            },
        );
    }

    /// Records a finished command; its latency is observed when its reply is written.
    fn done(&mut self, name: &'static str, _started: Instant, failed: bool) {
        self.finished.push((name, failed));
    }

    fn fail(&mut self, name: &'static str, started: Instant, line: &str) {
        self.out.error(line);
        self.done(name, started, true);
    }

    fn write_reply(&mut self, r: &Reply) {
        self.out.reply(r);
    }

    /// Queues a write command's mutations behind earlier queued writes to the same keyspace.
    async fn queue(
        &mut self,
        name: &'static str,
        shape: Shape,
        mutations: impl IntoIterator<Item = Mutation, IntoIter: ExactSizeIterator>,
        started: Instant,
    ) {
        let mutations = mutations.into_iter();
        if self.pending_reads.is_some() {
            self.flush_pending().await;
        }
        if let Err(e) = self.keyspace.check_live() {
            self.flush_pending().await;
            return self.fail(name, started, &error_line(&e));
        }
        let same = self
            .pending
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.keyspace, &self.keyspace));
        if !same {
            self.flush_pending().await;
        }
        let (mutations_hint, commands_hint) = self.last_batch;
        let p = self.pending.get_or_insert_with(|| PendingWrites {
            keyspace: self.keyspace.clone(),
            mutations: Vec::with_capacity(mutations_hint),
            commands: Vec::with_capacity(commands_hint),
        });
        // The one cost of notifications when they are off: this atomic read.
        let notify = self.node.settings.keyspace_events().active();
        p.commands.push(PendingCommand {
            name,
            shape,
            count: mutations.len(),
            started,
            notify,
        });
        if notify {
            p.mutations.extend(mutations.map(|m| match m {
                Mutation::Exec { key, args } => Mutation::Exec {
                    key,
                    args: capdb_data::notify::wrap(args),
                },
                other => other,
            }));
        } else {
            p.mutations.extend(mutations);
        }
    }

    /// Writes the replies of a flushed batch, in order.
    fn reply_pending(
        &mut self,
        commands: Vec<PendingCommand>,
        result: capdb_types::Result<Vec<capdb_types::Result<Reply>>>,
    ) {
        let replies = match result {
            Ok(r) => r,
            Err(e) => {
                let line = error_line(&e);
                for c in commands {
                    self.fail(c.name, c.started, &line);
                }
                return;
            }
        };
        let mut it = replies.into_iter();
        for c in commands {
            if let (Shape::Plain, 1) = (c.shape, c.count) {
                // The common case (every data-type command): one reply, written as is.
                match it.next() {
                    Some(Ok(r)) => {
                        self.write_reply(&r);
                        self.done(c.name, c.started, false);
                    }
                    Some(Err(e)) => self.fail(c.name, c.started, &error_line(&e)),
                    None => self.fail(c.name, c.started, "ERR missing reply"),
                }
                continue;
            }
            let mine: Vec<_> = it.by_ref().take(c.count).collect();
            debug_assert_eq!(mine.len(), c.count);
            if let Some(Err(e)) = mine.iter().find(|r| r.is_err()) {
                // A command over several shards whose part on one shard certainly failed while
                // another part may have taken effect must not say -TRYAGAIN (clients retry it).
                let partial = e.is_retryable()
                    && mine
                        .iter()
                        .any(|r| !matches!(r, Err(other) if other.is_retryable()));
                let line = if partial {
                    error_line(&Error::OutcomeUnknown(format!(
                        "part of the command may have taken effect, part did not ({e}); read before retrying"
                    )))
                } else {
                    error_line(e)
                };
                self.fail(c.name, c.started, &line);
                continue;
            }
            let ok = mine.into_iter().map(|r| r.expect("errors handled above"));
            match c.shape {
                Shape::Plain => {
                    for r in ok {
                        self.write_reply(&r);
                    }
                }
                Shape::SumIntegers => {
                    let n = ok
                        .map(|r| if let Reply::Integer(n) = r { n } else { 0 })
                        .sum();
                    self.out.int(n);
                }
                Shape::AllOk => self.out.ok(),
                Shape::SetFlag => {
                    let set = ok.into_iter().any(|r| r == Reply::Ok);
                    self.out.int(set as i64);
                }
            }
            self.done(c.name, c.started, false);
        }
    }
}

/// The keys data-type writes of `mutations` touch (to wake clients blocked on them).
fn written_keys(mutations: &[Mutation]) -> Vec<Bytes> {
    mutations
        .iter()
        .filter_map(|m| match m {
            Mutation::Exec { args, .. } => capdb_data::command::command_keys(args).ok(),
            _ => None,
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_holds_at_most_half_a_peer_frame_of_values() {
        assert_eq!(gathered_reads_max(1024), GATHERED_READS_MAX);
        assert_eq!(gathered_reads_max(8 << 20), 16);
        assert_eq!(gathered_reads_max(512 << 20), 1);
        assert_eq!(gathered_reads_max(0), GATHERED_READS_MAX);
        for value_max in [1, 1 << 10, 4 << 20, 8 << 20, 100 << 20, 1 << 30] {
            let n = gathered_reads_max(value_max);
            assert!((1..=GATHERED_READS_MAX).contains(&n));
            assert!(n == 1 || n * value_max <= capdb_transport::FRAME_BYTES_MAX / 2);
        }
    }
}
