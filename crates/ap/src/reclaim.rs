//! Reclaiming element records that a delete hid.
//!
//! A DEL (or SET, or INCR over an expired collection) of an `ap` collection writes only the
//! key's head: its base hides every older element at once. The replica's storage queues the key
//! and this loop removes the hidden element records in bounded steps
//! ([`capdb_storage::disk::AP_RECLAIM_STEP_MAX`] records per step, each step one job of the
//! storage writer), so deleting a big collection never stalls other clients. Local work: the
//! records removed are hidden on every replica already, and a crash only means the queue is
//! taken up again (it is stored with the delete).

use std::sync::Arc;
use std::time::Duration;

use capdb_types::Mode;

use super::Ap;

/// Pause between rounds over the keyspaces.
const RECLAIM_INTERVAL: Duration = Duration::from_millis(200);
/// Most steps per keyspace per round (the next round goes on).
const STEPS_PER_ROUND: usize = 64;

pub(super) async fn run(ap: Arc<Ap>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECLAIM_INTERVAL) => {}
            _ = ap.stopped() => return,
        }
        let state = ap.state();
        for (name, entry) in &state.keyspaces {
            if entry.spec.mode != Mode::Ap
                || !entry.shards.iter().any(|s| s.replicas.contains(&ap.me))
            {
                continue;
            }
            let table = ap.table(name.as_str());
            for _ in 0..STEPS_PER_ROUND {
                match table.ap_reclaim_step().await {
                    Ok(0) => break,
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) => {
                        tracing::debug!(keyspace = %name, error = %e, "ap element reclaim step failed");
                        break;
                    }
                }
            }
        }
    }
}
