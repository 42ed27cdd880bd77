//! The Redis protocol front end (RESP2, and RESP3 after `HELLO 3`).
//!
//! # Request flow
//!
//! ```text
//! TcpListener (serve)            one task per connection, holding one of `connections_max` permits
//!   -> Connection::run           read into a buffer, parse every complete command (parse.rs)
//!   -> Connection::execute       dispatch by name (commands.rs); replies go to ReplyWriter (reply.rs)
//!   -> consecutive writes to one keyspace are gathered into one Keyspace::apply call (one group
//!      commit for a whole pipeline), then every reply is written in order and flushed once
//! ```
//!
//! # Bounds
//!
//! - At most `connections_max` connections; the next one gets `-ERR max number of clients
//!   reached` and is closed.
//! - A command may not exceed `frame_bytes_max` (checked on the declared length, before
//!   buffering); anything else malformed is a protocol error that closes that connection only.
//! - At most `pipeline_depth_max` commands run per read before replies are written, and replies
//!   are written whenever [`OUTPUT_FLUSH_BYTES`] accumulate; the server does not read more from a
//!   client until its replies are written, so a client that never reads is held by TCP
//!   backpressure, not by server memory.

mod cluster;
mod commands;
pub mod glob;
pub mod parse;
pub mod reply;
mod scan;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::node::{Keyspace, Node};
use parse::{ParseError, parse_command};
use reply::ReplyWriter;

pub use commands::COMMAND_NAMES;

/// Replies are written to the socket once this many bytes are buffered, even mid-pipeline.
pub const OUTPUT_FLUSH_BYTES: usize = 64 * 1024;

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
                let line = format!("-{}\r\n", commands::error_line(&e));
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

/// Writes batched for one group commit: consecutive mutation commands of one connection.
struct PendingWrites {
    keyspace: Arc<Keyspace>,
    mutations: Vec<capdb_types::Mutation>,
    /// One entry per command, in order: how to turn its mutation replies into its RESP reply.
    commands: Vec<commands::PendingCommand>,
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
    quit: bool,
    /// When the current batch of commands was read, and the wall clock then (Unix ms). One
    /// clock reading per read serves every command of a pipeline.
    batch_started: Instant,
    now_ms: u64,
    /// Commands answered since the last socket write: (name, failed).
    finished: Vec<(&'static str, bool)>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.node.metrics.connections.dec();
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
            quit: false,
            batch_started: Instant::now(),
            now_ms: capdb_types::unix_now_ms(),
            finished: Vec::new(),
        }
    }

    /// Writes buffered replies, then records the latency of every command they answer: from
    /// the read that delivered the command to its reply being handed to the socket.
    async fn write_out(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        stream.write_all(&self.out.out).await?;
        self.out.out.clear();
        let took = self.batch_started.elapsed();
        for (name, failed) in self.finished.drain(..) {
            let m = self.node.metrics.command(name);
            m.duration.observe(took);
            if failed {
                m.errors.inc();
            }
        }
        Ok(())
    }

    async fn run(mut self, mut stream: TcpStream) -> std::io::Result<()> {
        let frame_max = self.node.config.limits.frame_bytes_max;
        let depth_max = self.node.config.limits.pipeline_depth_max;
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            // Run every complete command in the buffer (up to the pipeline bound).
            let mut executed = 0;
            let mut protocol_error = None;
            while executed < depth_max && !self.quit {
                match parse_command(&buf, frame_max) {
                    Ok(parsed) => {
                        let frame = buf.split_to(parsed.consumed).freeze();
                        if parsed.args.is_empty() {
                            continue;
                        }
                        let args: Vec<Bytes> = parsed
                            .args
                            .iter()
                            .map(|&(s, e)| frame.slice(s..e))
                            .collect();
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
            };
            if n == 0 {
                return Ok(()); // the client closed (possibly mid-frame: nothing to answer)
            }
            self.batch_started = Instant::now();
            self.now_ms = capdb_types::unix_now_ms();
        }
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
        commands::execute(self, name, &args, started).await;
    }

    /// Applies gathered writes in one call and writes their replies, in order.
    async fn flush_pending(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let now = self.now_ms;
        let result = p.keyspace.apply(p.mutations, now, self.consistency).await;
        commands::reply_pending(self, p.commands, result);
    }
}
