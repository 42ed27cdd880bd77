//! Change-log retention: each node trims the change logs of the shards it leads.
//!
//! Every [`TRIM_PERIOD`] the node looks, on each shard it leads, whether the oldest change-log
//! row is past the shard's retention (a local read), and only then proposes a trim entry
//! (`Request::ChangesTrim`, stamped with its clock): a bounded delete that every replica applies
//! the same way (by whole log entries), so all of them keep the same events and answer
//! `HISTORYLOST` below the same ID.
//! A shard with nothing to trim costs no entry. An `ap` keyspace's replica logs are each
//! node's own: the node trims them itself, in its storage, by the same retention rules.
//!
//! # Consumer groups pin the history they still need
//!
//! Before trimming, the leader reads every consumer group's position of the keyspace (its
//! last delivered ID, or just before its oldest pending entry), from the first shard where
//! groups live, and carries the oldest one's clock in the trim entry
//! (`Request::ChangesTrimPinned`): entries at or above it stay. A pin is bounded: it lapses
//! once its position is older than [`PIN_AGE_MAX_MS`] or the shard holds more than
//! `capdb_storage::disk::PIN_BYTES_MAX` bytes of events; the group's next read then reads on
//! from the oldest entry held, as in Redis. When the positions cannot be read (no leader for
//! the first shard), nothing is trimmed that period. A group created or moved back at an old
//! ID between the leader's read and the trim's apply is not protected by that trim (its next
//! read is told, as above).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capdb_cluster::GroupId;
use capdb_types::Timestamp;
use capdb_types::changes::{StreamId, merged};

use super::{Consistency, Keyspace};

/// How often a node looks for change logs to trim.
pub const TRIM_PERIOD: Duration = Duration::from_secs(1);

/// A consumer group's position holds the retention back for at most this long (by its
/// position's clock): an abandoned group does not keep a log forever. Bytes are bounded too
/// (`capdb_storage::disk::PIN_BYTES_MAX`).
pub const PIN_AGE_MAX_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Trims the change logs of the shards this node leads, forever (see the module doc).
pub async fn trim_changes(node: Arc<super::Node>) {
    loop {
        tokio::time::sleep(TRIM_PERIOD).await;
        if node.is_shutting_down() {
            return;
        }
        let now_ms = capdb_types::unix_now_ms();
        trim_ap_logs(&node.keyspaces(), now_ms).await;
        let due = node.groups.changes_trim_due_led(now_ms);
        if due.is_empty() {
            continue;
        }
        let pins = pins_of(&node.keyspaces(), &due, now_ms).await;
        for group in due {
            let pinned = match pins.get(&group) {
                Some(Ok(p)) => *p,
                // The groups' positions could not be read (no leader for the first shard):
                // nothing is trimmed rather than what a group still needs.
                Some(Err(e)) => {
                    tracing::debug!(group, error = %e, "change-log trim waits for group positions");
                    continue;
                }
                None => None,
            };
            if let Err(e) = node.groups.changes_trim(group, pinned).await {
                // Tried again next period.
                tracing::debug!(group, error = %e, "change-log trim not applied");
            }
        }
    }
}

/// Trims this node's `ap` replicas' change logs past their retention, here (each replica's
/// log is its own: no entry goes through a Raft log).
async fn trim_ap_logs(keyspaces: &[Arc<Keyspace>], now_ms: u64) {
    use capdb_storage::disk::ChangesStep;
    for ks in keyspaces {
        let Some((engine, table)) = ks.ap_changes_table() else {
            continue;
        };
        let t = engine.table(&table, true);
        let step = match t.changes_trim_due(now_ms, None) {
            Ok(true) => match t.changes_size_keep_from() {
                Ok(Some(keep_from)) => ChangesStep::TrimTo { now_ms, keep_from },
                Ok(None) => ChangesStep::Trim { now_ms },
                Err(e) => {
                    tracing::warn!(keyspace = %ks.spec.name, error = %e, "cannot read the change log");
                    continue;
                }
            },
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(keyspace = %ks.spec.name, error = %e, "cannot read the change log");
                continue;
            }
        };
        if let Err(e) = engine
            .changes_config(&table, step, 0, Vec::new(), None)
            .await
        {
            tracing::debug!(keyspace = %ks.spec.name, error = %e, "change-log trim not applied");
        }
    }
}

/// For each Raft group in `due`: the clock below which its consumer groups let the retention
/// trim (`None`: no group holds it back), read from its keyspace's first shard.
async fn pins_of(
    keyspaces: &[Arc<Keyspace>],
    due: &[GroupId],
    now_ms: u64,
) -> HashMap<GroupId, capdb_types::Result<Option<Timestamp>>> {
    let mut out = HashMap::new();
    for ks in keyspaces {
        let shards = ks.shard_groups();
        if !shards.iter().any(|g| due.contains(g)) {
            continue;
        }
        let positions = ks.changes_positions(now_ms, Consistency::default()).await;
        let oldest = match &positions {
            Ok(p) if !p.is_empty() => oldest_held(ks, shards.len(), now_ms).await,
            _ => Ok(Vec::new()),
        };
        match positions.and_then(|p| oldest.map(|o| (p, o))) {
            Ok((positions, oldest)) => {
                let name = ks.spec.name.to_string();
                let per_shard = pins_by_shard(&name, shards.len(), &positions, &oldest, now_ms);
                for (s, g) in shards.iter().enumerate() {
                    out.insert(*g, Ok(per_shard[s]));
                }
            }
            Err(e) => {
                for g in shards {
                    out.insert(g, Err(e.clone()));
                }
            }
        }
    }
    out
}

/// The clock of each shard's oldest held event (`None`: it holds none).
async fn oldest_held(
    ks: &Keyspace,
    shards: usize,
    now_ms: u64,
) -> capdb_types::Result<Vec<Option<Timestamp>>> {
    let c = Consistency::default();
    let mut out = Vec::with_capacity(shards);
    for s in 0..shards as u32 {
        let at = ks
            .changes_read(s, (StreamId::MAX, StreamId::MAX), 0, false, now_ms, c)
            .await?;
        let from = if at.floor == StreamId::MIN {
            StreamId::MIN
        } else {
            at.floor.successor()
        };
        let first = ks
            .changes_read(s, (from, StreamId::MAX), 1, false, now_ms, c)
            .await?;
        out.push(
            first
                .entries
                .first()
                .and_then(super::prefixed::entry_id)
                .map(StreamId::clock),
        );
    }
    Ok(out)
}

/// Each shard's pin from the groups' positions (`stream` names as `groups.rs` keeps them:
/// `<ks>` or `<ks>#<n>`, either with `:<prefix>`): the smallest clock of a position on a
/// stream that reads the shard (a merged stream reads every shard). A pin lapses once what
/// it holds is older than [`PIN_AGE_MAX_MS`]: its position's clock, or the shard's oldest
/// held event's (`oldest`) when the position is older (a group created at `0`). Entries at
/// or above it stay.
fn pins_by_shard(
    keyspace: &str,
    shards: usize,
    positions: &[(bytes::Bytes, StreamId)],
    oldest: &[Option<Timestamp>],
    now_ms: u64,
) -> Vec<Option<Timestamp>> {
    let mut pins: Vec<Option<Timestamp>> = vec![None; shards];
    for (stream, pos) in positions {
        let Some(rest) = stream.strip_prefix(keyspace.as_bytes()) else {
            continue;
        };
        let (targets, clock): (Vec<usize>, Timestamp) = match rest {
            [] | [b':', ..] => ((0..shards).collect(), merged::parts(*pos).0),
            [b'#', after @ ..] => {
                let digits: Vec<u8> = after
                    .iter()
                    .copied()
                    .take_while(u8::is_ascii_digit)
                    .collect();
                let Some(n) = std::str::from_utf8(&digits)
                    .ok()
                    .and_then(|d| d.parse::<usize>().ok())
                    .filter(|n| *n < shards)
                else {
                    continue;
                };
                (vec![n], pos.clock())
            }
            // Another keyspace whose name starts with this one's.
            _ => continue,
        };
        for s in targets {
            let held_from = clock.max(oldest.get(s).copied().flatten().unwrap_or(clock));
            if held_from.physical_ms() + PIN_AGE_MAX_MS < now_ms {
                continue;
            }
            pins[s] = Some(pins[s].map_or(clock, |p| p.min(clock)));
        }
    }
    pins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64) -> StreamId {
        StreamId::of_event(Timestamp::from_parts(ms, 0), 0)
    }

    #[test]
    fn a_merged_streams_group_pins_every_shard_and_a_shards_group_its_own() {
        let now = 10 * PIN_AGE_MAX_MS;
        let positions = vec![
            (
                bytes::Bytes::from("users"),
                merged::id(Timestamp::from_parts(now - 50, 0), 1, 0),
            ),
            (bytes::Bytes::from("users#2"), id(now - 90)),
            (bytes::Bytes::from("users#1:u:"), id(now - 10)),
            // Another keyspace, an abandoned group, a shard that is not there.
            (bytes::Bytes::from("users2"), id(now - 900)),
            (bytes::Bytes::from("users#0"), id(now - PIN_AGE_MAX_MS - 1)),
            (bytes::Bytes::from("users#7"), id(now - 900)),
        ];
        let pins = pins_by_shard("users", 3, &positions, &[], now);
        let at = |ms| Some(Timestamp::from_parts(ms, 0));
        assert_eq!(pins, vec![at(now - 50), at(now - 50), at(now - 90)]);
        assert_eq!(pins_by_shard("users", 2, &[], &[], now), vec![None, None]);
        // A group at `0` holds what the shard holds, for as long as that is recent.
        let from_start = vec![(bytes::Bytes::from("users"), StreamId::MIN)];
        let recent = vec![at(now - 10), None];
        assert_eq!(
            pins_by_shard("users", 2, &from_start, &recent, now),
            vec![Some(Timestamp::ZERO), None]
        );
    }
}
