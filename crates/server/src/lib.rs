//! A capdb node.
//!
//! The top of the stack below the binary: it may use every capdb library crate, and none of
//! them may use it.
//!
//! # Layout
//!
//! - [`config`]: typed configuration from file, environment and flags, validated at start.
//! - [`node`]: the node: its Raft groups and `ap` service, the keyspace catalog and router
//!   (the only place that knows the keyspace modes), the control loop, admin status.
//! - [`keyscan`]: scans shard by shard, and the table behind numeric `SCAN` cursors.
//! - [`resp`]: the Redis protocol front end (parser, commands, replies).
//! - [`http`]: the HTTP/JSON API, health checks and `/metrics`.
//! - [`metrics`]: Prometheus metrics.
//!
//! [`run`] assembles them, one helper per step (bind the listeners, start the Raft groups and
//! `ap` replication, serve peers, serve clients), and implements graceful shutdown
//! (`Running::shut_down`): stop accepting, let connections finish what they have read, wait
//! (bounded by `shutdown_grace_ms`), make sure every queued write is durable, return.

pub mod config;
pub mod http;
pub mod keyscan;
pub mod metrics;
pub mod node;
pub mod resp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capdb_cluster::{NodeId, NodeInfo};
use capdb_storage::disk::DiskEngine;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

pub use config::{Config, ServerArgs};

/// The Redis version capdb reports (HELLO, INFO) so clients enable the features it implements.
pub const REDIS_COMPAT_VERSION: &str = "7.2.0";

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(#[from] capdb_types::Error),
}

/// Runs a node until `shutdown` completes, then shuts it down gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    if config.cluster.debug.plant_difference {
        tracing::warn!("--debug-plant-difference: HLEN answers wrong on purpose (testing only)");
        capdb_data::hash::PLANT_DIFFERENCE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if config.cluster.debug.unsafe_resolved {
        tracing::warn!(
            "--debug-unsafe-resolved: merged change streams release events too early on purpose (testing only)"
        );
        node::merged::UNSAFE_RESOLVED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if config.cluster.debug.view_skip_txn {
        tracing::warn!(
            "--debug-view-skip-txn: cross-shard commits skip incremental views on purpose (testing only)"
        );
        capdb_storage::disk::DEBUG_VIEW_SKIP_TXN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let listeners = Listeners::bind(&config).await?;
    let hlc = Arc::new(capdb_types::Hlc::new());
    let engine = capdb_storage::disk::DiskEngine::open_with(
        &config.data_dir,
        hlc.clone(),
        capdb_storage::disk::EngineOptions {
            value_bytes_max: config.limits.value_bytes_max,
            cache_bytes: config.storage_cache_bytes(),
            ..Default::default()
        },
    )?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // The cluster: meta group, shard groups, peer RPC.
    let info = node_info(&config, listeners.resp_addr, listeners.http_addr);
    let filter = capdb_transport::PeerFilter::default();
    let me = info.id;
    let groups = start_groups(&config, &info, &engine, &hlc, &filter).await?;
    let ap = start_ap(&config, me, &engine, &hlc, &filter, &groups);

    let metrics = metrics::Metrics::new(&resp::all_command_names());
    let node = node::Node::new(
        config,
        engine,
        hlc,
        info,
        groups.clone(),
        ap.clone(),
        metrics,
    );
    let peer_task = serve_peers(&node, &groups, &ap, listeners.peer, filter, &stop_rx);
    let clients = serve_clients(&node, listeners.resp, listeners.http, &stop_rx);
    let expiry_task = tokio::spawn(node.clone().run_expiry());
    tracing::info!(node = me, resp = %listeners.resp_addr, http = %listeners.http_addr, peer = %listeners.peer_addr, data_dir = %node.config.data_dir.display(), storage_cache_mb = node.config.storage_cache_bytes() >> 20, "capdb node started");

    shutdown.await;
    Running {
        node,
        groups,
        ap,
        stop: stop_tx,
        clients,
        expiry_task,
        peer_task,
    }
    .shut_down()
    .await
}

/// The three listeners, bound before anything else starts so a taken port fails fast.
struct Listeners {
    resp: TcpListener,
    http: TcpListener,
    peer: TcpListener,
    resp_addr: SocketAddr,
    http_addr: SocketAddr,
    peer_addr: SocketAddr,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, ServerError> {
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        let (resp_addr, http_addr) = (config.resp_addr, config.http_addr);
        let peer_addr = config.cluster.peer_addr;
        Ok(Listeners {
            resp: bind("resp_addr", resp_addr).await?,
            http: bind("http_addr", http_addr).await?,
            peer: bind("peer_addr", peer_addr).await?,
            resp_addr,
            http_addr,
            peer_addr,
        })
    }
}

/// This node as the cluster map lists it. Client addresses bound to an unspecified IP
/// (`0.0.0.0`) are advertised with the host of `advertise_addr` (else the RESP address's IP).
fn node_info(config: &Config, resp_addr: SocketAddr, http_addr: SocketAddr) -> NodeInfo {
    let advertise_host = config
        .cluster
        .advertise_addr
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| resp_addr.ip().to_string());
    let advertised = |addr: SocketAddr| {
        if addr.ip().is_unspecified() {
            format!("{advertise_host}:{}", addr.port())
        } else {
            addr.to_string()
        }
    };
    NodeInfo {
        id: config.cluster.node_id,
        peer_addr: config.cluster.advertise_addr.clone(),
        resp_addr: advertised(resp_addr),
        http_addr: advertised(http_addr),
        labels: config.cluster.labels.clone(),
        draining: false,
    }
}

/// Starts the Raft groups (the meta group first). A node given neither `initial_cluster` nor
/// `join` founds a cluster of itself.
async fn start_groups(
    config: &Config,
    info: &NodeInfo,
    engine: &DiskEngine,
    hlc: &Arc<capdb_types::Hlc>,
    filter: &capdb_transport::PeerFilter,
) -> Result<Arc<capdb_raft::Groups>, ServerError> {
    let mut initial_cluster = config.cluster.initial_cluster.clone();
    if initial_cluster.is_empty() && config.cluster.join.is_empty() {
        // A standalone node is a cluster of one.
        initial_cluster.insert(info.id, info.peer_addr.clone());
    }
    let raft = capdb_raft::groups::default_raft_config(config.cluster.raft_snapshot_logs)
        .validate()
        .map_err(|e| ServerError::Storage(capdb_types::Error::InvalidInput(e.to_string())))?;
    let groups = capdb_raft::Groups::start(
        capdb_raft::GroupsConfig {
            me: info.id,
            initial_cluster,
            join: config.cluster.join.clone(),
            unsafe_local_reads: config.cluster.debug.unsafe_local_reads,
            apply_duplicates: config.cluster.debug.apply_duplicates,
            unsafe_txn: config.cluster.debug.unsafe_txn,
            raft: Arc::new(raft),
        },
        engine.clone(),
        hlc.clone(),
        filter.clone(),
    )
    .await?;
    Ok(groups)
}

/// Starts leaderless replication for `ap` keyspaces, following the map the groups replicate.
fn start_ap(
    config: &Config,
    me: NodeId,
    engine: &DiskEngine,
    hlc: &Arc<capdb_types::Hlc>,
    filter: &capdb_transport::PeerFilter,
    groups: &capdb_raft::Groups,
) -> Arc<capdb_ap::Ap> {
    let c = &config.cluster;
    capdb_ap::Ap::start(
        me,
        engine.clone(),
        hlc.clone(),
        filter.clone(),
        groups.watch_cluster(),
        capdb_ap::ApConfig {
            anti_entropy_interval: Duration::from_millis(c.ap_anti_entropy_interval_ms),
            anti_entropy_bytes_per_sec: c.ap_anti_entropy_bytes_per_sec,
            tombstone_grace: Duration::from_millis(c.ap_tombstone_grace_ms),
            // Shorter than the grace, so no delayed hint can resurrect a collected delete.
            hint_max_age: Duration::from_millis((c.ap_tombstone_grace_ms / 3).min(3600 * 1000)),
        },
    )
}

/// Every peer service on one port, each on its own connections.
fn serve_peers(
    node: &Arc<node::Node>,
    groups: &Arc<capdb_raft::Groups>,
    ap: &Arc<capdb_ap::Ap>,
    listener: TcpListener,
    filter: capdb_transport::PeerFilter,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let raft_handler = Arc::new(capdb_raft::groups::peer::GroupsHandler(groups.clone()));
    let services = capdb_transport::Services::new()
        .with::<capdb_raft::messages::RaftService, _>(raft_handler.clone())
        .with::<capdb_raft::messages::SnapshotService, _>(raft_handler.clone())
        .with::<capdb_raft::messages::ForwardService, _>(raft_handler)
        .with::<capdb_ap::ApService, _>(Arc::new(capdb_ap::ApHandler(ap.clone())))
        .with::<node::admin::AdminService, _>(Arc::new(node::admin::AdminHandler(node.clone())))
        .with::<node::pubsub::PubSubService, _>(Arc::new(node::pubsub::PubSubHandler(node.clone())))
        .with::<node::jobs::JobsService, _>(Arc::new(node::jobs::JobsHandler(node.clone())));
    tokio::spawn(capdb_transport::serve(
        listener,
        Arc::new(services),
        filter,
        stop.clone(),
    ))
}

/// The client front ends while they run.
struct Clients {
    resp_task: JoinHandle<()>,
    http_task: JoinHandle<std::io::Result<()>>,
    /// One per RESP connection (`connections_max` in all): all back means all closed.
    permits: Arc<Semaphore>,
}

/// Starts the RESP and HTTP front ends; both stop accepting when `stop` flips.
fn serve_clients(
    node: &Arc<node::Node>,
    resp_listener: TcpListener,
    http_listener: TcpListener,
    stop: &watch::Receiver<bool>,
) -> Clients {
    let permits = Arc::new(Semaphore::new(node.config.limits.connections_max));
    let resp_task = tokio::spawn(resp::serve(
        node.clone(),
        resp_listener,
        permits.clone(),
        stop.clone(),
    ));
    let mut http_stop = stop.clone();
    let http_task = tokio::spawn(
        axum::serve(http_listener, http::router(node.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    Clients {
        resp_task,
        http_task,
        permits,
    }
}

/// A started node: what the shutdown sequence stops, in order.
struct Running {
    node: Arc<node::Node>,
    groups: Arc<capdb_raft::Groups>,
    ap: Arc<capdb_ap::Ap>,
    stop: watch::Sender<bool>,
    clients: Clients,
    expiry_task: JoinHandle<()>,
    peer_task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets connections finish what they have read (bounded by
    /// `shutdown_grace_ms`), stops the groups, makes queued writes durable and closes the
    /// database file.
    async fn shut_down(self) -> Result<(), ServerError> {
        let Running {
            node,
            groups,
            ap,
            stop,
            clients,
            expiry_task,
            peer_task,
        } = self;
        let grace = Duration::from_millis(node.config.shutdown_grace_ms);
        let connections_max = node.config.limits.connections_max;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        node.begin_shutdown();
        let _ = stop.send(true);
        let _ = clients.resp_task.await;
        // Every connection holds a permit; having them all back means every connection is done.
        let all = clients.permits.acquire_many(connections_max as u32);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "connections still open after the grace period; closing them"
            );
        }
        if tokio::time::timeout(grace, clients.http_task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests still running after the grace period");
        }
        expiry_task.abort();
        let _ = expiry_task.await;
        // Hand leadership to other replicas, then stop the Raft groups.
        ap.shutdown();
        groups.shutdown().await;
        peer_task.abort();
        let _ = peer_task.await;
        // All acknowledged writes are already durable; this waits for writes still queued.
        node.engine.flush().await?;
        // Close the database file cleanly (the next start skips crash repair) once the last
        // handle is gone; a task that outlived the grace period may still hold one, so this is
        // bounded.
        let closed = node.engine.closed();
        drop(node);
        drop(groups);
        drop(ap);
        let clean = tokio::task::spawn_blocking(move || closed.wait(Duration::from_secs(5)))
            .await
            .unwrap_or(false);
        tracing::info!(clean_close = clean, "shutdown complete");
        Ok(())
    }
}
