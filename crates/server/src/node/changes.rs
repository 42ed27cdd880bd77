//! Change-log retention: each node trims the change logs of the shards it leads.
//!
//! Every [`TRIM_PERIOD`] the node looks, on each shard it leads, whether the oldest change-log
//! row is past the shard's retention (a local read), and only then proposes a trim entry
//! (`Request::ChangesTrim`, stamped with its clock): a bounded delete that every replica applies
//! the same way (by whole log entries), so all of them keep the same events and answer
//! `HISTORYLOST` below the same ID.
//! A shard with nothing to trim costs no entry.

use std::sync::Arc;
use std::time::Duration;

/// How often a node looks for change logs to trim.
pub const TRIM_PERIOD: Duration = Duration::from_secs(1);

/// Trims the change logs of the shards this node leads, forever (see the module doc).
pub async fn trim_changes(node: Arc<super::Node>) {
    loop {
        tokio::time::sleep(TRIM_PERIOD).await;
        if node.is_shutting_down() {
            return;
        }
        for group in node.groups.changes_trim_due_led(capdb_types::unix_now_ms()) {
            if let Err(e) = node.groups.changes_trim(group).await {
                // Tried again next period.
                tracing::debug!(group, error = %e, "change-log trim not applied");
            }
        }
    }
}
