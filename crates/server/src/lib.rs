//! A capdb node.
//!
//! # Layout
//!
//! - [`config`]: typed configuration from file, environment and flags, validated at start.
//! - [`node`]: the node's shared state: storage engine, keyspace catalog, active expiry.
//! - [`resp`]: the Redis protocol front end (parser, commands, replies).
//! - [`http`]: the HTTP/JSON API, health checks and `/metrics`.
//! - [`metrics`]: Prometheus metrics.
//!
//! [`run`] assembles them and implements graceful shutdown: stop accepting, let connections
//! finish what they have read, wait (bounded by `shutdown_grace_ms`), make sure every queued
//! write is durable, return.

pub mod config;
pub mod http;
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
    let resp_listener = TcpListener::bind(resp_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "resp_addr",
            addr: resp_addr,
            source,
        })?;
    let http_listener = TcpListener::bind(http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "http_addr",
            addr: http_addr,
            source,
        })?;

    let metrics = metrics::Metrics::new(resp::COMMAND_NAMES);
    let node = node::Node::open(config, metrics).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
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
    tracing::info!(resp = %resp_addr, http = %http_addr, data_dir = %node.config.data_dir.display(), "capdb node ready");

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
    // All acknowledged writes are already durable; this waits for writes still queued.
    node.engine.flush().await?;
    // Close the database file cleanly (the next start skips crash repair) once the last handle
    // is gone; a connection that outlived the grace period may still hold one, so this is bounded.
    let closed = node.engine.closed();
    drop(node);
    let clean = tokio::task::spawn_blocking(move || closed.wait(Duration::from_secs(5)))
        .await
        .unwrap_or(false);
    tracing::info!(clean_close = clean, "shutdown complete");
    Ok(())
}
