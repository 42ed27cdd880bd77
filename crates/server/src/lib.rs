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
//! [`run`] assembles them and implements graceful shutdown: stop accepting, let connections
//! finish what they have read, wait (bounded by `shutdown_grace_ms`), make sure every queued
//! write is durable, return.

pub mod config;
pub mod http;
pub mod keyscan;
pub mod metrics;
pub mod node;
pub mod resp;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

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
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let connections_max = config.limits.connections_max;
    let resp_addr = config.resp_addr;
    let http_addr = config.http_addr;
    let peer_addr = config.cluster.peer_addr;
    let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { what, addr, source })
    };
    let resp_listener = bind("resp_addr", resp_addr).await?;
    let http_listener = bind("http_addr", http_addr).await?;
    let peer_listener = bind("peer_addr", peer_addr).await?;

    let hlc = Arc::new(capdb_types::Hlc::new());
    let engine = capdb_storage::disk::DiskEngine::open(
        &config.data_dir,
        hlc.clone(),
        config.limits.value_bytes_max,
    )?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // The cluster: meta group, shard groups, peer RPC.
    let advertise_host = config
        .cluster
        .advertise_addr
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| resp_addr.ip().to_string());
    let advertised = |addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            format!("{advertise_host}:{}", addr.port())
        } else {
            addr.to_string()
        }
    };
    let info = capdb_cluster::NodeInfo {
        id: config.cluster.node_id,
        peer_addr: config.cluster.advertise_addr.clone(),
        resp_addr: advertised(resp_addr),
        http_addr: advertised(http_addr),
        labels: config.cluster.labels.clone(),
        draining: false,
    };
    let mut initial_cluster = config.cluster.initial_cluster.clone();
    if initial_cluster.is_empty() && config.cluster.join.is_empty() {
        // A standalone node is a cluster of one.
        initial_cluster.insert(info.id, info.peer_addr.clone());
    }
    let filter = capdb_transport::PeerFilter::default();
    let me = info.id;
    let groups = capdb_raft::Groups::start(
        capdb_raft::GroupsConfig {
            me,
            initial_cluster,
            join: config.cluster.join.clone(),
            unsafe_local_reads: config.cluster.debug.unsafe_local_reads,
            apply_duplicates: config.cluster.debug.apply_duplicates,
            raft: Arc::new(
                capdb_raft::groups::default_raft_config(config.cluster.raft_snapshot_logs)
                    .validate()
                    .map_err(|e| {
                        ServerError::Storage(capdb_types::Error::InvalidInput(e.to_string()))
                    })?,
            ),
        },
        engine.clone(),
        hlc.clone(),
        filter.clone(),
    )
    .await?;
    let ap = capdb_ap::Ap::start(
        me,
        engine.clone(),
        hlc.clone(),
        filter.clone(),
        groups.watch_cluster(),
        capdb_ap::ApConfig {
            anti_entropy_interval: Duration::from_millis(
                config.cluster.ap_anti_entropy_interval_ms,
            ),
            anti_entropy_bytes_per_sec: config.cluster.ap_anti_entropy_bytes_per_sec,
            tombstone_grace: Duration::from_millis(config.cluster.ap_tombstone_grace_ms),
            // Shorter than the grace, so no delayed hint can resurrect a collected delete.
            hint_max_age: Duration::from_millis(
                (config.cluster.ap_tombstone_grace_ms / 3).min(3600 * 1000),
            ),
        },
    );

    let metrics = metrics::Metrics::new(resp::COMMAND_NAMES);
    let node = node::Node::new(
        config,
        engine,
        hlc,
        info,
        groups.clone(),
        ap.clone(),
        metrics,
    );
    // Every peer service on one port, each on its own connections.
    let raft_handler = Arc::new(capdb_raft::groups::peer::GroupsHandler(groups.clone()));
    let services = capdb_transport::Services::new()
        .with::<capdb_raft::messages::RaftService, _>(raft_handler.clone())
        .with::<capdb_raft::messages::SnapshotService, _>(raft_handler.clone())
        .with::<capdb_raft::messages::ForwardService, _>(raft_handler)
        .with::<capdb_ap::ApService, _>(Arc::new(capdb_ap::ApHandler(ap.clone())))
        .with::<node::admin::AdminService, _>(Arc::new(node::admin::AdminHandler(node.clone())));
    let peer_task = tokio::spawn(capdb_transport::serve(
        peer_listener,
        Arc::new(services),
        filter,
        stop_rx.clone(),
    ));
    let permits = Arc::new(Semaphore::new(connections_max));

    let resp_task = tokio::spawn(resp::serve(
        node.clone(),
        resp_listener,
        permits.clone(),
        stop_rx.clone(),
    ));
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(
        axum::serve(http_listener, http::router(node.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    let expiry_task = tokio::spawn(node.clone().run_expiry());
    tracing::info!(node = me, resp = %resp_addr, http = %http_addr, peer = %peer_addr, data_dir = %node.config.data_dir.display(), "capdb node started");

    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    node.begin_shutdown();
    let _ = stop_tx.send(true);
    let _ = resp_task.await;
    // Every connection holds a permit; having them all back means every connection is done.
    let drained = tokio::time::timeout(grace, permits.acquire_many(connections_max as u32)).await;
    if drained.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "connections still open after the grace period; closing them"
        );
    }
    if tokio::time::timeout(grace, http_task).await.is_err() {
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
    // Close the database file cleanly (the next start skips crash repair) once the last handle
    // is gone; a task that outlived the grace period may still hold one, so this is bounded.
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
