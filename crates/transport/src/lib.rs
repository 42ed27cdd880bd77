//! Node-to-node transport: request/response over TCP, one multiplexed connection per peer and
//! *service*.
//!
//! A service ([`Service`]) is a typed pair of request and response messages with its own
//! [`Channel`]: Raft traffic, snapshots, forwarded client requests, leaderless (`ap`)
//! replication, node administration. Each channel has its own connection to a peer, so a
//! heartbeat never queues behind a 100 MiB snapshot or an anti-entropy stream, and each service
//! is served by its own [`Handler`]: no service's messages pass through another's code.
//!
//! This crate knows frames, connections, bounds and the peer filter. It must not depend on
//! Raft, on storage, or on any service's messages (services depend on it, never the reverse).
//!
//! # Wire format
//!
//! A connection opens with a hello: `b"cpdb"`, a protocol version byte and the channel byte.
//! Then every frame is `[u32 length][u64 request id][u64 sender node id][payload]`
//! (little-endian), where the payload is the request or response encoded with `postcard`.
//! Responses carry the id of their request, so many requests share one connection and complete
//! out of order.
//!
//! Why not gRPC: openraft's types are serde already, a frame codec is ~300 lines, and tonic +
//! prost would add ~40 crates and a code generator to every build (see ARCHITECTURE.md).
//!
//! # Bounds and failure
//!
//! - Frames larger than [`FRAME_BYTES_MAX`] are refused by both sides (the connection closes).
//! - Each client peer queues at most [`PEER_QUEUE_MAX`] requests per service; a full queue
//!   fails the call at once (`Overloaded`) rather than growing memory.
//! - The server runs at most [`INFLIGHT_PER_CONNECTION_MAX`] requests per connection at once;
//!   further frames wait (TCP backpressure).
//! - A connection that does not say hello within [`HELLO_TIMEOUT`], or names a channel this
//!   node does not serve, is closed.
//! - Every call has a deadline. A broken connection fails every request in flight on it with
//!   `Unreachable` and is re-established by the next call (with backoff).
//! - A [`PeerFilter`] lets an operator cut this node off from chosen peers (both directions)
//!   without root: the playground's partitions use it.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

/// Largest frame either side accepts (a forwarded write of the largest value must fit;
/// snapshots travel in parts of about 2 MiB).
pub const FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Requests waiting to be sent to one peer.
pub const PEER_QUEUE_MAX: usize = 4_096;
/// Requests one server connection runs concurrently.
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 1_024;
/// Time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Time a new connection has to say hello before the server closes it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

const HEADER_LEN: usize = 16;
const HELLO_MAGIC: &[u8; 4] = b"cpdb";
/// 2: Raft snapshots in parts (`SnapshotRequest::Part`/`Install`).
const PROTOCOL_VERSION: u8 = 2;

pub use capdb_cluster::NodeId;

/// The services nodes speak to each other, one connection per peer each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Raft's own messages: append entries (and heartbeats), votes, leader transfers.
    Raft = 1,
    /// Raft snapshots, in parts, kept off the Raft channel.
    Snapshot = 2,
    /// Client requests forwarded to a Raft group's leader (or replica), and meta commands.
    Forward = 3,
    /// Leaderless (`ap`) replication: writes, reads, hints, anti-entropy, probes.
    Ap = 4,
    /// Node administration: status, simulated partitions.
    Admin = 5,
    /// Pub/sub messages published through another node.
    PubSub = 6,
    /// Job tasks run on another node's replica (issue 15), kept off the other channels: a
    /// task's answer waits for its whole scan.
    Jobs = 7,
}

impl Channel {
    fn from_byte(b: u8) -> Option<Channel> {
        [
            Channel::Raft,
            Channel::Snapshot,
            Channel::Forward,
            Channel::Ap,
            Channel::Admin,
            Channel::PubSub,
            Channel::Jobs,
        ]
        .into_iter()
        .find(|c| *c as u8 == b)
    }
}

/// A typed request/response protocol on its own [`Channel`].
pub trait Service: 'static {
    const CHANNEL: Channel;
    type Request: Serialize + DeserializeOwned + Send + 'static;
    type Response: Serialize + DeserializeOwned + Send + 'static;
}

/// Serves one service's requests arriving from peers.
pub trait Handler<S: Service>: Send + Sync + 'static {
    fn handle(&self, from: NodeId, request: S::Request)
    -> impl Future<Output = S::Response> + Send;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The connection broke while the request was sent or awaited; the request may or may not
    /// have been executed.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    /// No connection to the peer could be made: the request was certainly not sent.
    #[error("peer {0} unreachable (not sent): {1}")]
    NotSent(String, String),
    /// No answer before the deadline; the request may or may not have been executed.
    #[error("peer {0} did not answer within {1} ms")]
    Timeout(String, u64),
    /// Too many requests queued for this peer.
    #[error("too many requests queued for peer {0}")]
    Overloaded(String),
    /// The message could not be encoded or decoded (a bug or a version mismatch).
    #[error("message codec error: {0}")]
    Codec(String),
    /// Traffic to this peer is blocked by the operator (simulated partition).
    #[error("traffic to peer {0} is blocked")]
    Blocked(String),
}

/// Peers this node refuses to talk to, in both directions.
#[derive(Debug, Default, Clone)]
pub struct PeerFilter(Arc<RwLock<HashSet<NodeId>>>);

impl PeerFilter {
    pub fn is_blocked(&self, node: NodeId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&node)
    }

    pub fn set(&self, blocked: HashSet<NodeId>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = blocked;
    }

    pub fn blocked(&self) -> HashSet<NodeId> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn encode<T: Serialize>(id: u64, from: NodeId, msg: &T) -> Result<Vec<u8>, RpcError> {
    let mut buf = postcard::to_extend(msg, vec![0u8; 4 + HEADER_LEN])
        .map_err(|e| RpcError::Codec(e.to_string()))?;
    let len = buf.len() - 4;
    if len > FRAME_BYTES_MAX {
        return Err(RpcError::Codec(format!(
            "frame of {len} bytes exceeds {FRAME_BYTES_MAX}"
        )));
    }
    buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[4..12].copy_from_slice(&id.to_le_bytes());
    buf[12..20].copy_from_slice(&from.to_le_bytes());
    Ok(buf)
}

/// Reads one frame: (id, sender, payload). `Ok(None)` on a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u64, NodeId, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(HEADER_LEN..=FRAME_BYTES_MAX).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes outside 16..={FRAME_BYTES_MAX}"),
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await?;
    let id = u64::from_le_bytes(header[0..8].try_into().expect("8 bytes"));
    let from = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let mut payload = vec![0u8; len - HEADER_LEN];
    r.read_exact(&mut payload).await?;
    Ok(Some((id, from, payload)))
}

struct Outgoing<Req, Resp> {
    request: Req,
    reply: oneshot::Sender<Result<Resp, RpcError>>,
}

type Pending<Resp> = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Resp, RpcError>>>>>;

/// The client side of the connection to one peer for service `S`. Cheap to clone.
pub struct Peer<S: Service> {
    addr: String,
    node: NodeId,
    queue: mpsc::Sender<Outgoing<S::Request, S::Response>>,
    filter: PeerFilter,
}

impl<S: Service> Clone for Peer<S> {
    fn clone(&self) -> Self {
        Peer {
            addr: self.addr.clone(),
            node: self.node,
            queue: self.queue.clone(),
            filter: self.filter.clone(),
        }
    }
}

impl<S: Service> Peer<S> {
    /// A peer at `addr` (node id `node`), talking as `me`. The connection is opened lazily and
    /// re-opened after failures; the background task ends when every handle is dropped.
    pub fn new(me: NodeId, node: NodeId, addr: String, filter: PeerFilter) -> Self {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        tokio::spawn(peer_task::<S::Request, S::Response>(
            me,
            S::CHANNEL,
            addr.clone(),
            rx,
        ));
        Peer {
            addr,
            node,
            queue: tx,
            filter,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `request` and waits for the answer, at most `deadline`.
    pub async fn call(
        &self,
        request: S::Request,
        deadline: Duration,
    ) -> Result<S::Response, RpcError> {
        if self.filter.is_blocked(self.node) {
            return Err(RpcError::Blocked(self.addr.clone()));
        }
        let (reply, wait) = oneshot::channel();
        self.queue
            .try_send(Outgoing { request, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => RpcError::Overloaded(self.addr.clone()),
                mpsc::error::TrySendError::Closed(_) => {
                    RpcError::NotSent(self.addr.clone(), "peer task stopped".into())
                }
            })?;
        match tokio::time::timeout(deadline, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RpcError::Unreachable(
                self.addr.clone(),
                "connection dropped".into(),
            )),
            Err(_) => Err(RpcError::Timeout(
                self.addr.clone(),
                deadline.as_millis() as u64,
            )),
        }
    }
}

/// How long bytes sent on a peer connection may stay unacknowledged before the kernel drops
/// the connection (`TCP_USER_TIMEOUT`). Without it, a connection through a lossy link can stay
/// stalled long after the link heals (TCP's retransmission backoff grows to two minutes)
/// while every call on it times out; dropped, the next call reconnects at once. Ten seconds
/// of silence from a peer that has our bytes is a dead link, not a slow one.
pub const UNACKED_MAX: Duration = Duration::from_secs(10);

/// Options of every peer connection, both ends: no Nagle delay, and [`UNACKED_MAX`].
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(UNACKED_MAX));
}

/// First wait before reconnecting to a peer that refused a connection.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest wait before reconnecting to a peer that keeps refusing connections.
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The background task of a [`Peer`]: connects when a request arrives, runs the connection
/// until it breaks, and reconnects (with backoff) on the next request. Ends when every handle
/// is dropped.
async fn peer_task<Req, Resp>(
    me: NodeId,
    channel: Channel,
    addr: String,
    mut rx: mpsc::Receiver<Outgoing<Req, Resp>>,
) where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    let mut backoff = BACKOFF_MIN;
    let mut next_id: u64 = 1;
    // Wait for the first request before connecting.
    let mut first = match rx.recv().await {
        Some(o) => Some(o),
        None => return,
    };
    loop {
        let (read_half, mut w) = match connect(&addr, channel, &mut backoff).await {
            Ok(connection) => connection,
            Err(failure) => {
                if !fail_connect(failure, &mut first, &mut rx, &addr, &mut backoff).await {
                    return;
                }
                match rx.recv().await {
                    Some(o) => first = Some(o),
                    None => return,
                }
                continue;
            }
        };
        let broken = run_connection(
            me,
            &addr,
            read_half,
            &mut w,
            first.take(),
            &mut rx,
            &mut next_id,
        )
        .await;
        if !broken {
            return; // every handle dropped
        }
        match rx.recv().await {
            Some(o) => first = Some(o),
            None => return,
        }
    }
}

/// Why no connection to a peer could be made.
enum ConnectFailure {
    /// The connection was refused (or the network failed): back off before the next attempt.
    Refused(String),
    /// No connection within [`CONNECT_TIMEOUT`].
    TimedOut,
    /// The connection was made but the hello could not be written.
    HelloNotSent,
}

/// Connects to `addr` and writes the hello for `channel` (it is flushed with the first
/// request). A TCP connection, even one whose hello fails, resets `backoff`.
async fn connect(
    addr: &str,
    channel: Channel,
    backoff: &mut Duration,
) -> Result<(OwnedReadHalf, BufWriter<OwnedWriteHalf>), ConnectFailure> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectFailure::Refused(e.to_string())),
        Err(_) => return Err(ConnectFailure::TimedOut),
    };
    *backoff = BACKOFF_MIN;
    tune(&stream);
    let (read_half, write_half) = stream.into_split();
    let mut w = BufWriter::new(write_half);
    let hello = [
        HELLO_MAGIC[0],
        HELLO_MAGIC[1],
        HELLO_MAGIC[2],
        HELLO_MAGIC[3],
        PROTOCOL_VERSION,
        channel as u8,
    ];
    if w.write_all(&hello).await.is_err() {
        return Err(ConnectFailure::HelloNotSent);
    }
    Ok((read_half, w))
}

/// Fails `first` and every queued request with `NotSent` after a failed connection attempt.
/// After a refused connection, also waits out `backoff` (then doubles it, up to
/// [`BACKOFF_MAX`]), failing the requests that arrive meanwhile. `false` when every handle is
/// dropped.
async fn fail_connect<Req, Resp>(
    failure: ConnectFailure,
    first: &mut Option<Outgoing<Req, Resp>>,
    rx: &mut mpsc::Receiver<Outgoing<Req, Resp>>,
    addr: &str,
    backoff: &mut Duration,
) -> bool {
    let why = match failure {
        ConnectFailure::Refused(why) => why,
        ConnectFailure::TimedOut => {
            fail_queued(first, rx, addr, "connect timed out");
            return true;
        }
        ConnectFailure::HelloNotSent => {
            fail_queued(first, rx, addr, "hello not sent");
            return true;
        }
    };
    fail_queued(first, rx, addr, &why);
    // Back off before the next connection attempt, but fail requests arriving
    // meanwhile at once: a caller must learn quickly that this peer is down.
    let until = tokio::time::Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            o = rx.recv() => match o {
                Some(o) => {
                    let _ = o.reply.send(Err(RpcError::NotSent(addr.to_string(), why.clone())));
                }
                None => return false,
            },
        }
    }
}

/// Runs one connection: a reader task completes requests as their responses arrive, while
/// this loop writes `first` and then each queued request. Every request still in flight when
/// it ends fails with `Unreachable`. `true` when the connection broke, `false` when every
/// handle was dropped.
async fn run_connection<Req, Resp>(
    me: NodeId,
    addr: &str,
    read_half: OwnedReadHalf,
    w: &mut BufWriter<OwnedWriteHalf>,
    mut first: Option<Outgoing<Req, Resp>>,
    rx: &mut mpsc::Receiver<Outgoing<Req, Resp>>,
    next_id: &mut u64,
) -> bool
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    let pending: Pending<Resp> = Arc::default();
    let (dead_tx, mut dead_rx) = watch::channel(false);
    let reader = tokio::spawn(read_responses(
        read_half,
        pending.clone(),
        addr.to_string(),
        dead_tx,
    ));
    let broken = loop {
        let out = match first.take() {
            Some(o) => o,
            None => {
                tokio::select! {
                    biased;
                    _ = dead_rx.changed() => break true,
                    o = rx.recv() => match o {
                        Some(o) => o,
                        None => break false,
                    },
                }
            }
        };
        let id = *next_id;
        *next_id += 1;
        let frame = match encode(id, me, &out.request) {
            Ok(f) => f,
            Err(e) => {
                let _ = out.reply.send(Err(e));
                continue;
            }
        };
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, out.reply);
        let written = async {
            w.write_all(&frame).await?;
            // Flush when nothing else is waiting, so bursts share syscalls.
            if rx.is_empty() {
                w.flush().await?;
            }
            std::io::Result::Ok(())
        }
        .await;
        if written.is_err() {
            break true;
        }
    };
    reader.abort();
    fail_pending(&pending, addr, "connection broke");
    broken
}

/// The reader task of a connection: hands each response to the request awaiting it until the
/// connection ends, then flips `dead` and fails every request in flight with `Unreachable`.
async fn read_responses<Resp: DeserializeOwned>(
    read_half: OwnedReadHalf,
    pending: Pending<Resp>,
    addr: String,
    dead: watch::Sender<bool>,
) {
    let mut r = BufReader::new(read_half);
    let why = loop {
        match read_frame(&mut r).await {
            Ok(Some((id, _from, payload))) => {
                let result = postcard::from_bytes::<Resp>(&payload)
                    .map_err(|e| RpcError::Codec(e.to_string()));
                if let Some(tx) = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
                {
                    let _ = tx.send(result);
                }
            }
            Ok(None) => break "closed by peer".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = dead.send(true);
    fail_pending(&pending, &addr, &why);
}

/// Fails every request awaiting a response with `Unreachable` (`addr`, `why`).
fn fail_pending<Resp>(pending: &Pending<Resp>, addr: &str, why: &str) {
    for (_, tx) in pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
        let _ = tx.send(Err(RpcError::Unreachable(
            addr.to_string(),
            why.to_string(),
        )));
    }
}

/// Fails `first` and every request queued so far with `NotSent` (`addr`, `why`).
fn fail_queued<Req, Resp>(
    first: &mut Option<Outgoing<Req, Resp>>,
    rx: &mut mpsc::Receiver<Outgoing<Req, Resp>>,
    addr: &str,
    why: &str,
) {
    let err = || RpcError::NotSent(addr.to_string(), why.to_string());
    if let Some(o) = first.take() {
        let _ = o.reply.send(Err(err()));
    }
    while let Ok(o) = rx.try_recv() {
        let _ = o.reply.send(Err(err()));
    }
}

type Served = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>;

/// One service's handler with its types erased: decodes a request, serves it, encodes the
/// answer frame.
trait ErasedHandler: Send + Sync {
    fn serve(&self, from: NodeId, id: u64, payload: &[u8]) -> Result<Served, String>;
}

struct Typed<S, H> {
    handler: Arc<H>,
    _service: PhantomData<fn() -> S>,
}

impl<S: Service, H: Handler<S>> ErasedHandler for Typed<S, H> {
    fn serve(&self, from: NodeId, id: u64, payload: &[u8]) -> Result<Served, String> {
        let request = postcard::from_bytes::<S::Request>(payload).map_err(|e| e.to_string())?;
        let handler = self.handler.clone();
        Ok(Box::pin(async move {
            let response = handler.handle(from, request).await;
            match encode(id, 0, &response) {
                Ok(frame) => Some(frame),
                Err(e) => {
                    tracing::error!(error = %e, channel = ?S::CHANNEL, "cannot encode a peer response");
                    None
                }
            }
        }))
    }
}

/// The services this node serves, by channel.
#[derive(Default)]
pub struct Services {
    handlers: HashMap<Channel, Arc<dyn ErasedHandler>>,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves service `S` with `handler`.
    pub fn with<S: Service, H: Handler<S>>(mut self, handler: Arc<H>) -> Self {
        let previous = self.handlers.insert(
            S::CHANNEL,
            Arc::new(Typed::<S, H> {
                handler,
                _service: PhantomData,
            }),
        );
        assert!(
            previous.is_none(),
            "channel {:?} has two services",
            S::CHANNEL
        );
        self
    }
}

/// Serves peer connections on `listener` until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    filter: PeerFilter,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tune(&stream);
        tokio::spawn(serve_connection(
            stream,
            services.clone(),
            filter.clone(),
            shutdown.clone(),
        ));
    }
}

/// Reads the hello and returns the service it names.
async fn read_hello(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    services: &Services,
) -> Result<Arc<dyn ErasedHandler>, String> {
    let mut hello = [0u8; 6];
    tokio::time::timeout(HELLO_TIMEOUT, r.read_exact(&mut hello))
        .await
        .map_err(|_| "no hello in time".to_string())?
        .map_err(|e| e.to_string())?;
    if &hello[0..4] != HELLO_MAGIC || hello[4] != PROTOCOL_VERSION {
        return Err(format!("not a capdb peer hello: {hello:?}"));
    }
    Channel::from_byte(hello[5])
        .and_then(|c| services.handlers.get(&c).cloned())
        .ok_or_else(|| format!("no service on channel {}", hello[5]))
}

async fn serve_connection(
    stream: TcpStream,
    services: Arc<Services>,
    filter: PeerFilter,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, write_half) = stream.into_split();
    let mut r = BufReader::new(read_half);
    let handler = match read_hello(&mut r, &services).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "peer connection refused");
            return;
        }
    };
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(INFLIGHT_PER_CONNECTION_MAX);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(write_half);
        while let Some(frame) = out_rx.recv().await {
            if w.write_all(&frame).await.is_err() {
                return;
            }
            if out_rx.is_empty() && w.flush().await.is_err() {
                return;
            }
        }
    });
    let permits = Arc::new(Semaphore::new(INFLIGHT_PER_CONNECTION_MAX));
    loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            f = read_frame(&mut r) => f,
        };
        let (id, from, payload) = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "peer connection closed");
                break;
            }
        };
        if filter.is_blocked(from) {
            continue; // a simulated partition drops the request; the caller times out
        }
        let served = match handler.serve(from, id, &payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, from, "undecodable peer request; closing the connection");
                break;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (out_tx, filter) = (out_tx.clone(), filter.clone());
        tokio::spawn(async move {
            let frame = served.await;
            drop(permit);
            if filter.is_blocked(from) {
                return;
            }
            if let Some(frame) = frame {
                let _ = out_tx.send(frame).await;
            }
        });
    }
    drop(out_tx);
    let _ = writer.await;
}

/// The peers of service `S` by node id, each connected on first use.
pub struct Peers<S: Service> {
    me: NodeId,
    filter: PeerFilter,
    peers: Mutex<HashMap<NodeId, Peer<S>>>,
}

impl<S: Service> Peers<S> {
    pub fn new(me: NodeId, filter: PeerFilter) -> Self {
        Peers {
            me,
            filter,
            peers: Mutex::default(),
        }
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn filter(&self) -> &PeerFilter {
        &self.filter
    }

    /// The peer `node` at `addr` (re-created if its address changed).
    pub fn get(&self, node: NodeId, addr: &str) -> Peer<S> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get(&node)
            && p.addr == addr
        {
            return p.clone();
        }
        let p = Peer::new(self.me, node, addr.to_string(), self.filter.clone());
        peers.insert(node, p.clone());
        p
    }
}
