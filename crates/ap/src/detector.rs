//! Failure detection for `ap` replication, independent of the meta group.
//!
//! Every node probes every other node in its cached map twice a second over the existing
//! peer connections. Three missed probes in a row mark a node down; one answer marks it up
//! again, which wakes hinted handoff and anti-entropy. A partition is therefore noticed within
//! about 1.5 s on both sides, each side using only what it can see.
//!
//! Why not SWIM (e.g. the `foca` crate): SWIM's indirect probing and gossip pay off at hundreds
//! of nodes; at the tens of nodes a capdb cluster has, direct probes over connections that are
//! already open are simpler, cost a few hundred tiny messages per second in all, and detect a
//! failure just as fast.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capdb_cluster::NodeId;
use tokio::sync::watch;

use super::Ap;
use super::messages::ApRequest;

pub const PROBE_EVERY: Duration = Duration::from_millis(500);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// Consecutive missed probes before a node counts as down.
pub const MISSES_TO_DOWN: u32 = 3;

#[derive(Debug, Clone, Copy)]
struct Health {
    up: bool,
    misses: u32,
}

pub struct Detector {
    me: NodeId,
    health: Mutex<HashMap<NodeId, Health>>,
    /// Bumped whenever some node comes back up.
    recovered: watch::Sender<u64>,
    /// Unix ms of the latest recovery (a partition healing, a node restarting).
    last_recovery_ms: std::sync::atomic::AtomicU64,
}

impl Detector {
    pub fn new(me: NodeId) -> Detector {
        Detector {
            me,
            health: Mutex::default(),
            recovered: watch::channel(0).0,
            last_recovery_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether `node` is believed down (unknown nodes are assumed up).
    pub fn is_down(&self, node: NodeId) -> bool {
        node != self.me
            && self
                .health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
                .is_some_and(|h| !h.up)
    }

    /// Nodes currently believed down.
    pub fn down(&self) -> Vec<NodeId> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<NodeId> = h.iter().filter(|(_, h)| !h.up).map(|(n, _)| *n).collect();
        v.sort();
        v
    }

    /// When a node last came back (Unix ms; 0: never).
    pub fn last_recovery_ms(&self) -> u64 {
        self.last_recovery_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver that changes whenever a node recovers.
    pub fn recoveries(&self) -> watch::Receiver<u64> {
        self.recovered.subscribe()
    }

    fn record(&self, node: NodeId, ok: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let e = h.entry(node).or_insert(Health {
            up: true,
            misses: 0,
        });
        if ok {
            e.misses = 0;
            if !e.up {
                e.up = true;
                tracing::info!(node, "ap failure detector: node is back");
                self.last_recovery_ms.store(
                    capdb_types::unix_now_ms(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.recovered.send_modify(|n| *n += 1);
            }
        } else {
            e.misses += 1;
            if e.up && e.misses >= MISSES_TO_DOWN {
                e.up = false;
                tracing::warn!(node, "ap failure detector: node unreachable");
            }
        }
    }
}

pub(super) async fn run(ap: Arc<Ap>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ap.stopped() => return,
        }
        let nodes: Vec<NodeId> = ap
            .state()
            .nodes
            .keys()
            .copied()
            .filter(|&n| n != ap.me)
            .collect();
        let probes = nodes.into_iter().map(|n| {
            let ap = ap.clone();
            async move {
                let ok = ap.call(n, ApRequest::Ping, PROBE_TIMEOUT).await.is_ok();
                ap.detector.record(n, ok);
            }
        });
        futures::future::join_all(probes).await;
    }
}
