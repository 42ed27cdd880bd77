//! One router for keyspaces: a key goes to its keyspace, the keyspace to its store, and the
//! store (one per mode) to wherever the data lives.
//!
//! | mode | store | where the data lives |
//! |---|---|---|
//! | `cp` | [`Store::Cp`] | keys hash to slots, slots to shards, each shard a Raft group; requests go to the shard's leader (forwarded when elsewhere) |
//! | `ap` | [`Store::Ap`] | leaderless replicas (`capdb_ap`): this node coordinates each request across the shard's replicas at the request's level, and holds a durable table for the shards it replicates |
//! | `cache` | [`Store::Cache`] | in memory on this node (the spec is cluster-wide, the data per node) |
//!
//! Front ends (RESP, HTTP) and metrics only ask a [`Keyspace`] for what they need (values,
//! writes, pages, counts, its shard layout, its memory use); none of them knows the store kinds,
//! which are private to this file. A fourth mode is a new [`Store`] variant here and nothing
//! else. The `cp` per-shard fan-out is [`by_shard`] (the `ap` coordinator fans out inside
//! `capdb_ap`, because its pipelines keep order across shards).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use capdb_ap::{Ap, Level};
use capdb_cluster::state::{KeyspaceEntry, ShardInfo};
use capdb_raft::Groups;
use capdb_storage::disk::DiskEngine;
use capdb_storage::memory::MemStore;
use capdb_storage::{BatchReplies, KeyspaceStore, ScanRange, layout};
use capdb_types::changes::StreamId;
use capdb_types::{
    Error, Hlc, KeyspaceName, KeyspaceSpec, Mode, Mutation, NodeId, ReadMode, Reply, Result, Value,
};

use crate::keyscan::{ScanPosition, ShardScope, walk_shards};

/// How strongly a request must be confirmed, per keyspace mode: `cp` reads are linearizable
/// or stale (`READONLY`), `ap` reads and writes wait for one, a quorum or all replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consistency {
    pub cp_read: ReadMode,
    pub ap_read: Level,
    pub ap_write: Level,
}

impl Default for Consistency {
    fn default() -> Self {
        Consistency {
            cp_read: ReadMode::Linearizable,
            // ap keyspaces put availability first: a single replica (or a hint) answers, so
            // every side of a partition keeps working. QUORUM for both gives
            // read-your-writes (R + W > N).
            ap_read: Level::One,
            ap_write: Level::One,
        }
    }
}

impl Consistency {
    /// Stale `cp` reads, `one` for `ap`: what internal best-effort reads (INFO, metrics) use.
    pub const RELAXED: Consistency = Consistency {
        cp_read: ReadMode::Stale,
        ap_read: Level::One,
        ap_write: Level::One,
    };
}

/// What a keyspace store needs from its node.
#[derive(Clone)]
pub struct Services {
    pub me: NodeId,
    pub engine: DiskEngine,
    pub hlc: Arc<Hlc>,
    pub groups: Arc<Groups>,
    pub txns: Arc<super::txns::TxnCoordinator>,
    pub ap: Arc<Ap>,
    pub value_bytes_max: usize,
}

/// Where a keyspace's data lives (see the module doc).
enum Store {
    Cp {
        entry: KeyspaceEntry,
        groups: Arc<Groups>,
        engine: DiskEngine,
        me: NodeId,
    },
    Ap {
        ap: Arc<Ap>,
        engine: DiskEngine,
        value_bytes_max: usize,
    },
    Cache(Arc<MemStore>),
}

/// A page of one shard's change log (`Keyspace::changes_read`).
#[derive(Debug, Clone)]
pub struct ChangesPage {
    /// Whether the shard logs its changes now.
    pub on: bool,
    /// Events the shard's log holds.
    pub events: u64,
    /// The last event's ID (`0-0`: none).
    pub last: Bytes,
    /// The entries, each `[id, [field, value, ...]]` as XRANGE answers them.
    pub entries: Vec<Reply>,
    /// Every event the shard logs after this read gets a stream clock above this.
    pub closed: capdb_types::Timestamp,
    /// The read stopped at a bound (count or bytes) before the end of its range.
    pub more: bool,
    /// The last ID trimmed by the retention or never held here (`0-0`: none).
    pub floor: StreamId,
}

/// Where a cross-shard transaction's part on one shard stands (`Keyspace::changes_txn`).
#[derive(Debug, Clone)]
pub enum TxnPartPage {
    /// Logged at this stream clock, with these entries (as XRANGE answers them).
    Logged(capdb_types::Timestamp, Vec<Reply>),
    /// Not logged yet: still prepared on the shard.
    Pending,
    /// Trimmed, or never logged.
    Gone,
}

impl ChangesPage {
    fn from_reply(reply: Reply) -> Result<ChangesPage> {
        let bad = || Error::Io("unexpected answer to a change-log read".into());
        let Reply::Array(parts) = reply else {
            return Err(bad());
        };
        let [
            Reply::Integer(on),
            Reply::Integer(events),
            Reply::Bulk(last),
            Reply::Array(entries),
            Reply::Bulk(closed),
            Reply::Integer(more),
            floor,
        ] = <[Reply; 7]>::try_from(parts)
            // A node from before the floor was answered: none known.
            .or_else(|parts| {
                <[Reply; 6]>::try_from(parts).map(|[a, b, c, d, e, f]| {
                    [a, b, c, d, e, f, Reply::Bulk(Bytes::from_static(b"0-0"))]
                })
            })
            .map_err(|_| bad())?
        else {
            return Err(bad());
        };
        let Reply::Bulk(floor) = floor else {
            return Err(bad());
        };
        let floor = StreamId::parse_with(&floor, 0).map_err(|_| bad())?;
        let closed = std::str::from_utf8(&closed)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok(ChangesPage {
            on: on == 1,
            events: u64::try_from(events).unwrap_or(0),
            last,
            entries,
            closed: capdb_types::Timestamp(closed),
            more: more == 1,
            floor,
        })
    }
}

/// A read of a `cache` keyspace's change ring on this node, as a shard's page: a `gap` entry
/// first when the read began at or below what went (its ID: the last that went).
fn ring_page(
    ring: &capdb_storage::memory::ring::ChangeRing,
    (from, to): (StreamId, StreamId),
    count: usize,
    rev: bool,
) -> ChangesPage {
    let count = count.min(capdb_storage::disk::CHANGES_READ_MAX);
    // A `gap` entry counts toward the count (XREAD COUNT 1 answers one entry).
    let gap_first = !rev && from <= to && ring.gap_before(from);
    let count = if gap_first {
        count.saturating_sub(1)
    } else {
        count
    };
    let page = ring.read(
        from,
        to,
        count,
        capdb_storage::disk::CHANGES_READ_BYTES_MAX,
        rev,
    );
    let mut entries = Vec::with_capacity(page.changes.len() + 1);
    if let Some(gone) = page.gap.filter(|g| *g <= to) {
        let text = |s: String| Reply::Bulk(Bytes::from(s));
        entries.push(Reply::Array(vec![
            text(gone.to_string()),
            Reply::Array(vec![
                text("op".into()),
                text("gap".into()),
                text("from".into()),
                text(from.to_string()),
                text("to".into()),
                text(gone.to_string()),
            ]),
        ]));
    }
    entries.extend(page.changes.iter().map(|c| c.to_reply(0)));
    ChangesPage {
        on: page.on,
        events: page.events,
        last: Bytes::from(page.last.to_string()),
        entries,
        closed: capdb_types::Timestamp::ZERO,
        more: page.more,
        floor: page.floor,
    }
}

fn no_cache_groups(name: &KeyspaceName) -> Error {
    Error::Command(format!(
        "ERR consumer groups need a cp keyspace: '{name}' streams each node's own changes (read them with XREAD)"
    ))
}

fn not_streamed(name: &KeyspaceName) -> Error {
    Error::Command(format!(
        "ERR this needs a cp keyspace's change logs (sharded, through Raft); '{name}' is not one"
    ))
}

/// Memory a keyspace uses on this node, and what its limit made it do.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryUse {
    pub used_bytes: u64,
    pub expired_keys: u64,
    pub evicted_keys: u64,
}

/// One keyspace: its specification and its store.
pub struct Keyspace {
    pub spec: KeyspaceSpec,
    store: Store,
    dropped: AtomicBool,
}

/// A key watched by WATCH, as its keyspace's mode checks it at EXEC ([`Keyspace::watch`]).
pub struct Watched {
    pub keyspace: KeyspaceName,
    /// See [`Keyspace::txn_shard`].
    pub shard: u64,
    mark: WatchMark,
}

enum WatchMark {
    Cp(capdb_raft::command::TxnGuard),
    /// Dropping it stops the cache recording changes for it.
    Cache(capdb_storage::memory::WatchTicket),
    /// The key's `capdb_types::composite::watch_stamp` at WATCH (`None`: it showed nothing).
    Ap {
        key: Bytes,
        stamp: Option<u64>,
    },
}

/// Groups `items` by the shard `shard_of` names, keeping each item's index; shards in order.
pub fn by_shard<T>(
    items: impl IntoIterator<Item = T>,
    shard_of: impl Fn(&T) -> u64,
) -> BTreeMap<u64, (Vec<usize>, Vec<T>)> {
    let mut out: BTreeMap<u64, (Vec<usize>, Vec<T>)> = BTreeMap::new();
    for (i, item) in items.into_iter().enumerate() {
        let e = out.entry(shard_of(&item)).or_default();
        e.0.push(i);
        e.1.push(item);
    }
    out
}

/// Puts per-shard answers back in the order of the items they answer: `answers` holds, per
/// shard, the item indexes and either one answer per item or the shard's error (which then
/// answers each of its items).
pub fn reassemble<A: Clone>(
    n: usize,
    answers: impl IntoIterator<Item = (Vec<usize>, Result<Vec<A>>)>,
) -> Vec<Result<A>> {
    let mut out: Vec<Option<Result<A>>> = vec![None; n];
    for (idx, answer) in answers {
        match answer {
            Ok(values) => {
                assert_eq!(values.len(), idx.len(), "one answer per item of a shard");
                for (i, v) in idx.into_iter().zip(values) {
                    out[i] = Some(Ok(v));
                }
            }
            Err(e) => {
                for i in idx {
                    out[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Io("missing answer".into()))))
        .collect()
}

impl Keyspace {
    /// Opens the store of a keyspace of the map (creating its local table when it has one).
    pub async fn open(entry: &KeyspaceEntry, s: &Services) -> Result<Keyspace> {
        let spec = entry.spec.clone();
        let store = match spec.mode {
            Mode::Cache => Store::Cache(Arc::new(MemStore::new(
                spec.max_memory_bytes
                    .expect("cache specs carry a memory limit"),
                spec.eviction.unwrap_or_default(),
                s.hlc.clone(),
                s.value_bytes_max,
            ))),
            Mode::Ap => {
                let name = spec.name.as_str();
                s.engine
                    .create_table(
                        &layout::ap_table(name),
                        &layout::keyspace_marker(name),
                        Vec::new(),
                    )
                    .await?;
                Store::Ap {
                    ap: s.ap.clone(),
                    engine: s.engine.clone(),
                    value_bytes_max: s.value_bytes_max,
                }
            }
            Mode::Cp => Store::Cp {
                entry: entry.clone(),
                groups: s.groups.clone(),
                engine: s.engine.clone(),
                me: s.me,
            },
        };
        Ok(Keyspace {
            spec,
            store,
            dropped: AtomicBool::new(false),
        })
    }

    /// Whether this keyspace can keep serving `entry` (same spec, same shard groups).
    pub fn serves(&self, entry: &KeyspaceEntry) -> bool {
        self.spec == entry.spec
            && match &self.store {
                Store::Cp { entry: mine, .. } => mine
                    .shards
                    .iter()
                    .map(|s| s.group)
                    .eq(entry.shards.iter().map(|s| s.group)),
                Store::Ap { .. } | Store::Cache(_) => true,
            }
    }

    /// The keyspace left the map: refuse further requests and free what this node held.
    pub async fn close(&self) {
        self.dropped.store(true, Ordering::Release);
        match &self.store {
            Store::Cache(m) => {
                let _ = m.clear().await;
            }
            Store::Ap { engine, .. } => {
                let name = self.spec.name.as_str();
                let _ = engine
                    .drop_table(&layout::ap_table(name), &layout::keyspace_marker(name))
                    .await;
            }
            // Raft groups are dropped by the control loop once this node leaves them.
            Store::Cp { .. } => {}
        }
    }

    /// Fails once the keyspace has been dropped (connections may still hold it selected).
    pub fn check_live(&self) -> Result<()> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(Error::KeyspaceNotFound(self.spec.name.to_string()));
        }
        Ok(())
    }

    fn name(&self) -> &KeyspaceName {
        &self.spec.name
    }

    /// Whether reads are served from this node's memory without any network hop.
    pub fn is_local(&self) -> bool {
        matches!(self.store, Store::Cache(_))
    }

    /// The shards of a keyspace whose shards have leaders that cluster-aware clients route to
    /// (`cp`); `None` for the others.
    pub fn led_shards(&self) -> Option<&[ShardInfo]> {
        match &self.store {
            Store::Cp { entry, .. } => Some(&entry.shards),
            Store::Ap { .. } | Store::Cache(_) => None,
        }
    }

    /// The shard of `key`, when this keyspace's shards have leaders (see [`Keyspace::led_shards`]).
    pub fn led_shard_for_key(&self, key: &[u8]) -> Option<&ShardInfo> {
        match &self.store {
            Store::Cp { entry, .. } => Some(entry.shard_for_key(key)),
            Store::Ap { .. } | Store::Cache(_) => None,
        }
    }

    /// Turns the change log of every shard of this (`cp`) keyspace on or off, shard after
    /// shard, each through its log. An error part-way leaves the shards before it switched:
    /// the command is safe to repeat.
    pub async fn changes_config(
        &self,
        on: bool,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
        prev: Option<bool>,
    ) -> Result<()> {
        self.check_live()?;
        match &self.store {
            Store::Cp { entry, groups, .. } => {
                for shard in &entry.shards {
                    // `prev` first: the first events logged after the switch carry it.
                    if let Some(prev) = prev {
                        groups.changes_prev(shard.group, prev).await?;
                    }
                    groups.changes_config(shard.group, on).await?;
                    if let Some(ms) = retention_ms {
                        groups.changes_retention(shard.group, ms).await?;
                    }
                    if let Some(bytes) = retention_bytes {
                        groups.changes_retention_bytes(shard.group, bytes).await?;
                    }
                }
                Ok(())
            }
            Store::Cache(m) => {
                if retention_ms.is_some() || prev.is_some() {
                    return Err(Error::Command(format!(
                        "ERR cache keyspace '{}' keeps its changes in a ring on each node, bounded by RETENTION-BYTES only (no RETENTION-MS, no PREV)",
                        self.name()
                    )));
                }
                m.changes_ring().configure(on, retention_bytes);
                Ok(())
            }
            Store::Ap { engine, .. } => {
                // This node's replica only: each replica logs the merges that changed it.
                if prev.is_some() {
                    return Err(Error::Command(format!(
                        "ERR ap keyspace '{}' logs each replica's merges; PREV is not kept",
                        self.name()
                    )));
                }
                let table = capdb_storage::layout::ap_table(&self.name().to_string());
                let steps = [
                    Some(capdb_storage::disk::ChangesStep::Switch(on)),
                    retention_ms.map(capdb_storage::disk::ChangesStep::Retention),
                    retention_bytes.map(capdb_storage::disk::ChangesStep::RetentionBytes),
                ];
                for step in steps.into_iter().flatten() {
                    engine
                        .changes_config(&table, step, 0, Vec::new(), None)
                        .await??;
                }
                Ok(())
            }
        }
    }

    /// Reads shard `shard`'s change log (`cp` only) through the shard's read path (routed and
    /// fenced like any read at consistency `c`).
    pub async fn changes_read(
        &self,
        shard: u32,
        range: (StreamId, StreamId),
        count: usize,
        rev: bool,
        now_ms: u64,
        c: Consistency,
    ) -> Result<ChangesPage> {
        self.changes_read_page(shard, range, count, rev, false, now_ms, c)
            .await
    }

    /// [`Keyspace::changes_read`]; `whole`: never stop inside a log entry (a merged
    /// reader's page: every event up to the last one's clock is in it).
    #[allow(clippy::too_many_arguments)]
    pub async fn changes_read_page(
        &self,
        shard: u32,
        range: (StreamId, StreamId),
        count: usize,
        rev: bool,
        whole: bool,
        now_ms: u64,
        c: Consistency,
    ) -> Result<ChangesPage> {
        self.check_live()?;
        if self.streams_per_node() && shard != 0 {
            return Err(Error::Command(format!(
                "ERR keyspace '{}' has one change stream per node (__changes:{}); there is no shard {shard}",
                self.name(),
                self.name()
            )));
        }
        if let Store::Cache(m) = &self.store {
            return Ok(ring_page(m.changes_ring(), range, count, rev));
        }
        if let Store::Ap { engine, .. } = &self.store {
            // This node's replica's log, read here (no routing: each replica has its own).
            let table = capdb_storage::layout::ap_table(&self.name().to_string());
            let args = vec![
                Bytes::from_static(capdb_storage::disk::CHANGES_QUERY.as_bytes()),
                Bytes::from_static(b"0"),
                Bytes::from(range.0.to_string()),
                Bytes::from(range.1.to_string()),
                Bytes::from(count.to_string()),
                Bytes::from_static(if rev { b"1" } else { b"0" }),
                Bytes::from_static(if whole { b"1" } else { b"0" }),
            ];
            let reply = engine.table(&table, true).query(&args, now_ms, 0)?;
            return ChangesPage::from_reply(reply);
        }
        let Store::Cp { entry, groups, .. } = &self.store else {
            return Err(not_streamed(self.name()));
        };
        let Some(info) = entry.shards.get(shard as usize) else {
            return Err(Error::Command(format!(
                "ERR keyspace '{}' has {} shards (0 to {}); there is no shard {shard}",
                self.name(),
                entry.shards.len(),
                entry.shards.len().saturating_sub(1)
            )));
        };
        let text = |s: String| Bytes::from(s);
        let args = vec![
            Bytes::from_static(capdb_storage::disk::CHANGES_QUERY.as_bytes()),
            text(shard.to_string()),
            text(range.0.to_string()),
            text(range.1.to_string()),
            text(count.to_string()),
            text(u8::from(rev).to_string()),
            text(u8::from(whole).to_string()),
        ];
        let reply = groups.query(info.group, args, c.cp_read, now_ms, 0).await?;
        ChangesPage::from_reply(reply)
    }

    /// The Raft group of each shard, in shard order (`cp` only).
    pub fn shard_groups(&self) -> Vec<capdb_cluster::GroupId> {
        match &self.store {
            Store::Cp { entry, .. } => entry.shards.iter().map(|s| s.group).collect(),
            _ => Vec::new(),
        }
    }

    /// Runs an internal read query (`capdb.changes-*`) on shard `shard` of this `cp`
    /// keyspace, routed and fenced like any read of the shard at consistency `c`.
    async fn shard_query(
        &self,
        shard: u32,
        args: Vec<Bytes>,
        now_ms: u64,
        c: Consistency,
    ) -> Result<Reply> {
        self.check_live()?;
        let Store::Cp { entry, groups, .. } = &self.store else {
            return Err(not_streamed(self.name()));
        };
        let Some(info) = entry.shards.get(shard as usize) else {
            return Err(Error::Io(format!("no shard {shard}")));
        };
        groups.query(info.group, args, c.cp_read, now_ms, 0).await
    }

    /// Cross-shard transaction `id`'s (24 stored bytes) part in shard `shard`'s change log,
    /// read through the shard's read path like [`Keyspace::changes_read`].
    pub async fn changes_txn(
        &self,
        shard: u32,
        id: &[u8],
        now_ms: u64,
        c: Consistency,
    ) -> Result<TxnPartPage> {
        let args = vec![
            Bytes::from_static(capdb_storage::disk::CHANGES_TXN_QUERY.as_bytes()),
            Bytes::from(shard.to_string()),
            Bytes::copy_from_slice(id),
        ];
        let reply = self.shard_query(shard, args, now_ms, c).await?;
        let bad = || Error::Io("unexpected answer to a change-log transaction query".into());
        let Reply::Array(parts) = reply else {
            return Err(bad());
        };
        let [
            Reply::Integer(state),
            Reply::Bulk(clock),
            Reply::Array(entries),
        ] = <[Reply; 3]>::try_from(parts).map_err(|_| bad())?
        else {
            return Err(bad());
        };
        Ok(match state {
            1 => {
                let clock = std::str::from_utf8(&clock)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?;
                TxnPartPage::Logged(capdb_types::Timestamp(clock), entries)
            }
            0 => TxnPartPage::Pending,
            _ => TxnPartPage::Gone,
        })
    }

    /// Applies a consumer-group command through the Raft log of this keyspace's first shard,
    /// which keeps every group of its change streams; its answer (an error inside: refused).
    pub async fn changes_group(
        &self,
        cmd: capdb_types::changes::groups::GroupCommand,
    ) -> Result<Result<Reply>> {
        self.check_live()?;
        if self.streams_per_node() {
            return Err(no_cache_groups(self.name()));
        }
        let Store::Cp { entry, groups, .. } = &self.store else {
            return Err(not_streamed(self.name()));
        };
        let Some(first) = entry.shards.first() else {
            return Err(Error::Io("a keyspace without shards".into()));
        };
        groups.changes_group(first.group, cmd).await
    }

    /// A page of shard `shard`'s data for a change-stream snapshot (`node/snapshot.rs`): the
    /// live keys after `after` starting with `prefix`, read from one storage snapshot with
    /// where the shard's change log stood in it.
    pub async fn changes_snapshot_page(
        &self,
        shard: u32,
        after: Option<&Bytes>,
        prefix: &[u8],
        now_ms: u64,
        c: Consistency,
    ) -> Result<super::snapshot::Page> {
        let args = vec![
            Bytes::from_static(capdb_storage::disk::CHANGES_SNAPSHOT_QUERY.as_bytes()),
            Bytes::from_static(if after.is_some() { b"after" } else { b"from" }),
            after.cloned().unwrap_or_default(),
            Bytes::copy_from_slice(prefix),
            Bytes::from(capdb_storage::disk::SNAPSHOT_PAGE_MAX.to_string()),
        ];
        let reply = self.shard_query(shard, args, now_ms, c).await?;
        super::snapshot::Page::from_reply(shard, after.cloned(), reply)
    }

    /// Every consumer group's position that holds history back (`groups::positions` in
    /// `capdb_storage::disk`): `(stream name, position)`, read through the first shard's read
    /// path at consistency `c`.
    pub async fn changes_positions(
        &self,
        now_ms: u64,
        c: Consistency,
    ) -> Result<Vec<(Bytes, StreamId)>> {
        let args = vec![Bytes::from_static(
            capdb_storage::disk::CHANGES_PINS_QUERY.as_bytes(),
        )];
        // Groups live in the first shard.
        let reply = self.shard_query(0, args, now_ms, c).await?;
        let bad = || Error::Io("unexpected answer to a consumer-group positions query".into());
        let Reply::Array(rows) = reply else {
            return Err(bad());
        };
        rows.into_iter()
            .map(|r| match r {
                Reply::Array(pair) => match <[Reply; 2]>::try_from(pair) {
                    Ok([Reply::Bulk(stream), Reply::Bulk(pos)]) => {
                        Ok((stream, StreamId::parse_with(&pos, 0).map_err(|_| bad())?))
                    }
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            })
            .collect()
    }

    /// The consumer groups of change stream `stream` (see `capdb_storage::disk`'s
    /// `groups::query`), read through the first shard's read path at consistency `c`.
    pub async fn changes_group_query(
        &self,
        stream: &[u8],
        group: Option<&[u8]>,
        page: Option<(StreamId, usize)>,
        now_ms: u64,
        c: Consistency,
    ) -> Result<Reply> {
        self.check_live()?;
        if self.streams_per_node() {
            // A cache or ap keyspace's stream (one per node) has no groups.
            return match group {
                Some(_) => Err(no_cache_groups(self.name())),
                None => Ok(Reply::Array(Vec::new())),
            };
        }
        let Store::Cp { entry, groups, .. } = &self.store else {
            return Err(not_streamed(self.name()));
        };
        let Some(first) = entry.shards.first() else {
            return Err(Error::Io("a keyspace without shards".into()));
        };
        let mut args = vec![
            Bytes::from_static(capdb_storage::disk::CHANGES_GROUP_QUERY.as_bytes()),
            Bytes::copy_from_slice(stream),
        ];
        args.extend(group.map(Bytes::copy_from_slice));
        if let Some((from, count)) = page {
            args.push(Bytes::from(from.to_string()));
            args.push(Bytes::from(count.to_string()));
        }
        groups.query(first.group, args, c.cp_read, now_ms, 0).await
    }

    /// Closes shard `shard`'s change stream up to this node's clock and at least `at_least`,
    /// through its log (coalesced: at most one proposal per `min_gap` per shard from this
    /// node, unless it must reach further).
    pub async fn changes_progress(
        &self,
        shard: u32,
        min_gap: std::time::Duration,
        at_least: capdb_types::Timestamp,
    ) -> Result<()> {
        let Store::Cp { entry, groups, .. } = &self.store else {
            return Err(not_streamed(self.name()));
        };
        let Some(info) = entry.shards.get(shard as usize) else {
            return Err(Error::Io(format!("no shard {shard}")));
        };
        groups
            .changes_progress(info.group, min_gap, at_least)
            .await?;
        Ok(())
    }

    /// Where this node's replica of shard `shard` stands (see `Groups::applied_mark`); `None`
    /// when it holds none (or the keyspace is not `cp`).
    pub fn changes_mark(&self, shard: u32) -> Option<u64> {
        if let Store::Cache(m) = &self.store {
            return Some(m.changes_ring().mark());
        }
        let Store::Cp { entry, groups, .. } = &self.store else {
            return None;
        };
        groups.applied_mark(entry.shards.get(shard as usize)?.group)
    }

    /// Waits until shard `shard` applied past `mark` here, or `max` passed.
    pub async fn wait_changes(&self, shard: u32, mark: Option<u64>, max: std::time::Duration) {
        if let Store::Cache(m) = &self.store {
            m.changes_ring().wait_past(mark.unwrap_or(0), max).await;
            return;
        }
        let group = match &self.store {
            Store::Cp { entry, groups, .. } => entry
                .shards
                .get(shard as usize)
                .map(|s| (groups.clone(), s.group)),
            _ => None,
        };
        match group {
            Some((groups, g)) => groups.wait_applied_past(g, mark, max).await,
            None => tokio::time::sleep(max.min(std::time::Duration::from_millis(10))).await,
        }
    }

    /// Whether this keyspace's change stream is each node's own (`cache`: its ring; `ap`:
    /// its replica's log of the merges that changed it), read as shard 0 of the node asked.
    pub fn streams_per_node(&self) -> bool {
        matches!(self.store, Store::Cache(_) | Store::Ap { .. })
    }

    /// An `ap` keyspace's replica table here, for its change log's retention.
    pub fn ap_changes_table(&self) -> Option<(capdb_storage::disk::DiskEngine, String)> {
        match &self.store {
            Store::Ap { engine, .. } => Some((
                engine.clone(),
                capdb_storage::layout::ap_table(&self.name().to_string()),
            )),
            _ => None,
        }
    }

    /// The number of shards of a `cp` keyspace (`None` for other modes).
    pub fn shard_count(&self) -> Option<usize> {
        self.led_shards().map(<[ShardInfo]>::len)
    }

    /// Memory this keyspace uses on this node (in-memory keyspaces only).
    pub fn memory(&self) -> Option<MemoryUse> {
        match &self.store {
            Store::Cache(m) => Some(MemoryUse {
                used_bytes: m.used_bytes(),
                expired_keys: m.stats().expired_keys.load(Ordering::Relaxed),
                evicted_keys: m.stats().evicted_keys.load(Ordering::Relaxed),
            }),
            Store::Cp { .. } | Store::Ap { .. } => None,
        }
    }

    /// Whether every key of `rest` is in the shard of `first` (always, for a cache: one node
    /// holds all of it).
    pub fn same_shard(&self, first: &[u8], rest: &[&Bytes]) -> bool {
        match &self.store {
            Store::Cp { entry, .. } => {
                let group = entry.shard_for_key(first).group;
                rest.iter().all(|k| entry.shard_for_key(k).group == group)
            }
            Store::Ap { .. } | Store::Cache(_) => true,
        }
    }

    /// A random live key (RANDOMKEY), or `None` when the keyspace is empty. Replicated
    /// keyspaces take the first key after a random position (not uniform, as Redis's is not).
    pub async fn random_key(&self, now_ms: u64, c: Consistency) -> Result<Option<Bytes>> {
        self.check_live()?;
        if let Store::Cache(m) = &self.store {
            return Ok(m.random_key(now_ms));
        }
        let floor = Bytes::from(fastrand::u64(..).to_be_bytes().to_vec());
        for floor in [Some(floor), None] {
            let (found, _) = self
                .scan(ScanPosition::default(), floor, None, None, 1, now_ms, c)
                .await?;
            if let Some((k, _)) = found.into_iter().next() {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Keys stored on this node (in the replicas it holds), for metrics.
    pub fn local_len(&self) -> Option<u64> {
        match &self.store {
            Store::Ap { engine, .. } => {
                // A key's head alone does not say whether its collection has elements: count
                // what each key shows (see `capdb_storage`'s `disk/ap.rs`).
                let mut live = 0;
                engine
                    .table(&layout::ap_table(self.name().as_str()), true)
                    .ap_for_each_key(None, |_, v| {
                        live += u64::from(!v.header.tombstone);
                        true
                    })
                    .ok()
                    .map(|()| live)
            }
            Store::Cache(m) => KeyspaceStore::len(&**m).ok(),
            Store::Cp {
                entry, engine, me, ..
            } => Some(
                entry
                    .shards
                    .iter()
                    .filter(|s| s.replicas.contains(me))
                    .filter_map(|s| {
                        engine
                            .table(&layout::shard_table(s.group), false)
                            .len()
                            .ok()
                    })
                    .sum(),
            ),
        }
    }

    /// A cache keyspace's memory limit and eviction policy on this node (`None`: not a cache).
    pub fn cache_limits(&self) -> Option<(u64, capdb_types::EvictionPolicy)> {
        match &self.store {
            Store::Cache(m) => Some((m.max_bytes(), m.policy())),
            _ => None,
        }
    }

    /// Changes a cache keyspace's limit and policy on this node (`CONFIG SET`).
    pub fn set_cache_limits(
        &self,
        max_bytes: u64,
        policy: capdb_types::EvictionPolicy,
        now_ms: u64,
    ) -> Result<()> {
        match &self.store {
            Store::Cache(m) => m.set_limits(max_bytes, policy, now_ms),
            _ => Err(Error::InvalidInput(
                "only cache keyspaces have a memory limit".into(),
            )),
        }
    }

    /// Whether a cache keyspace records the keys it removes by expiry or eviction (for their
    /// keyspace events); other modes have nothing to switch.
    pub fn notice_cache_removals(&self, on: bool) {
        if let Store::Cache(m) = &self.store {
            m.notice_removals(on);
        }
    }

    /// A cache keyspace's keys removed by expiry or eviction since the last call (for their
    /// keyspace events), while `notice` is on; other modes have none here (`cp` reports its
    /// sweep through [`Keyspace::expire_step`]).
    pub fn cache_removals(&self, notice: bool) -> Vec<(Bytes, capdb_storage::memory::Removal)> {
        match &self.store {
            Store::Cache(m) => {
                m.notice_removals(notice);
                m.drain_removals()
            }
            _ => Vec::new(),
        }
    }

    /// One step of active expiry on this node's data, at `now`. `cursor` carries a durable
    /// table's sweep position between steps; `sweep`: whether durable tables sweep this step.
    /// Raft-replicated keyspaces hide expired keys from readers; each shard's leader deletes
    /// those it finds through the log (`capdb.expired`), and every replica reclaims the elements
    /// of big collections that were deleted (see `storage/src/disk/space.rs`). The keys a `cp`
    /// shard's leader removed are added to `removed` (their `expired` keyspace events).
    pub async fn expire_step(
        &self,
        now: u64,
        sweep: bool,
        cursor: Option<Bytes>,
        sweep_keys: usize,
        removed: &mut Vec<Bytes>,
    ) -> Result<Option<Bytes>> {
        match &self.store {
            Store::Cache(m) => {
                m.expire_cycle(now);
                Ok(None)
            }
            Store::Ap { engine, .. } if sweep => {
                let t = engine.table(&layout::ap_table(self.name().as_str()), true);
                Ok(t.sweep_expired(cursor, sweep_keys, now).await?.0)
            }
            Store::Cp {
                entry,
                engine,
                me,
                groups,
                ..
            } => {
                for s in entry.shards.iter().filter(|s| s.replicas.contains(me)) {
                    let t = engine.table(&layout::shard_table(s.group), false);
                    // Free the elements of dropped big collections, one bounded step per
                    // shard. Local, not through the log: nothing can read them any more.
                    t.reclaim_step().await?;
                    // Active expiry through the log: the shard's leader proposes deleting keys
                    // it finds expired (from a random point), so DBSIZE stops counting them and
                    // their space (a collection's elements too) is freed on every replica.
                    if sweep && groups.leader_of(s.group) == Some(*me) {
                        let expired = expired_sample(&t, now)?;
                        if let Some(first) = expired.first().cloned() {
                            let mut args = vec![Bytes::from_static(
                                capdb_data::command::EXPIRED_COMMAND.as_bytes(),
                            )];
                            args.extend(expired);
                            let m = Mutation::Exec { key: first, args };
                            // Best effort, bounded: a sweep that fails or times out is
                            // retried by a later step (deleting an expired key twice is
                            // harmless), and never holds up the other keyspaces' expiry.
                            let written = tokio::time::timeout(
                                CP_EXPIRE_WAIT,
                                groups.write_mutations(s.group, vec![m], now),
                            )
                            .await;
                            if let Ok(Ok(mut replies)) = written
                                && let Some(Ok(Reply::Array(keys))) = replies.pop()
                            {
                                removed.extend(keys.into_iter().filter_map(|k| match k {
                                    Reply::Bulk(k) => Some(k),
                                    _ => None,
                                }));
                            }
                        }
                    }
                }
                Ok(cursor)
            }
            Store::Ap { .. } => Ok(cursor),
        }
    }

    /// Calls `f` with the live value of `key` (local stores only; see [`Keyspace::is_local`]).
    pub fn read_with<R>(
        &self,
        key: &[u8],
        now_ms: u64,
        f: impl FnOnce(Option<&Value>) -> R,
    ) -> Result<R> {
        self.check_live()?;
        match &self.store {
            Store::Cache(m) => m.read_with(key, now_ms, f),
            Store::Cp { .. } | Store::Ap { .. } => Err(Error::InvalidInput(
                "read_with on a replicated keyspace".into(),
            )),
        }
    }

    /// The live values of `keys`, in order; fails whole when the read of any key failed.
    pub async fn get_many(
        &self,
        keys: &[Bytes],
        now_ms: u64,
        c: Consistency,
    ) -> Result<Vec<Option<Value>>> {
        self.get_each(keys, now_ms, c).await.into_iter().collect()
    }

    /// The live value of each of `keys`, in order, each with its own outcome: the keys of a
    /// shard that could not be read carry that shard's error, the others their values (the
    /// reads of a pipeline of GETs, gathered into one call, each answer as if run alone).
    pub async fn get_each(
        &self,
        keys: &[Bytes],
        now_ms: u64,
        c: Consistency,
    ) -> Vec<Result<Option<Value>>> {
        if let Err(e) = self.check_live() {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        match &self.store {
            Store::Ap { ap, .. } => {
                match ap.get_many(self.name(), keys, c.ap_read, now_ms).await {
                    Ok(values) => values.into_iter().map(Ok).collect(),
                    // The coordinator answers a batch whole: when it failed, each key is read
                    // alone so that a shard out of reach fails only its own keys.
                    Err(_) if keys.len() > 1 => {
                        let each = keys.iter().map(|k| async move {
                            let one = std::slice::from_ref(k);
                            let mut v = ap.get_many(self.name(), one, c.ap_read, now_ms).await?;
                            v.pop().ok_or_else(|| Error::Io("missing answer".into()))
                        });
                        futures::future::join_all(each).await
                    }
                    Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
                }
            }
            Store::Cache(m) => keys.iter().map(|k| m.get(k, now_ms)).collect(),
            Store::Cp { entry, groups, .. } => {
                // One request per shard, in parallel; answers put back in key order.
                let shards = by_shard(keys.iter().cloned(), |k| entry.shard_for_key(k).group);
                let calls = shards.into_iter().map(|(group, (idx, keys))| async move {
                    (idx, groups.read(group, keys, c.cp_read, now_ms).await)
                });
                let answers = futures::future::join_all(calls).await;
                reassemble(keys.len(), answers)
            }
        }
    }

    pub async fn get(&self, key: &[u8], now_ms: u64, c: Consistency) -> Result<Option<Value>> {
        let mut v = self
            .get_many(&[Bytes::copy_from_slice(key)], now_ms, c)
            .await?;
        Ok(v.pop().flatten())
    }

    /// Runs a read-only data-type command (HGET, LRANGE, ...): where the data is, at the
    /// connection's consistency. Every key of the command is in one shard (the RESP layer
    /// refuses others with CROSSSLOT).
    pub async fn query(&self, args: Vec<Bytes>, now_ms: u64, c: Consistency) -> Result<Reply> {
        self.check_live()?;
        let seed = fastrand::u64(..);
        match &self.store {
            Store::Cache(m) => m.query(&args, now_ms, seed),
            Store::Ap { ap, .. } => ap.query(self.name(), &args, c.ap_read, now_ms).await,
            Store::Cp { entry, groups, .. } => {
                let keys = capdb_data::command::command_keys(&args)?;
                let Some(first) = keys.first() else {
                    // No key: the command can only answer an argument error.
                    let cx = capdb_data::Ctx {
                        now_ms,
                        timestamp: capdb_types::Timestamp::ZERO,
                        seed,
                        value_bytes_max: 0,
                    };
                    return capdb_data::execute(&args, &mut capdb_data::testing::EmptySpace, &cx);
                };
                let group = entry.shard_for_key(first).group;
                groups.query(group, args, c.cp_read, now_ms, seed).await
            }
        }
    }

    /// [`Keyspace::apply`] for the mutations of a run of commands (`sizes`: how many each
    /// has): the cache applies command after command, each atomic alone and under its own
    /// keys' locks only, as Redis runs a pipeline; the replicated modes apply the run as
    /// `apply` does (one log entry per shard).
    pub async fn apply_commands(
        &self,
        mutations: Vec<Mutation>,
        sizes: &[usize],
        now_ms: u64,
        c: Consistency,
    ) -> Result<BatchReplies> {
        match &self.store {
            Store::Cache(m) => {
                self.check_live()?;
                Ok(m.apply_commands(mutations, sizes, now_ms))
            }
            _ => self.apply(mutations, now_ms, c).await,
        }
    }

    /// Applies mutations. Within one shard they apply atomically and in order; across shards
    /// of a replicated keyspace each shard applies its part (cross-shard atomicity is the job of
    /// transactions, a later feature).
    pub async fn apply(
        &self,
        mutations: Vec<Mutation>,
        now_ms: u64,
        c: Consistency,
    ) -> Result<BatchReplies> {
        self.check_live()?;
        match &self.store {
            Store::Ap {
                ap,
                value_bytes_max,
                ..
            } => {
                ap.apply(self.name(), mutations, c.ap_write, now_ms, *value_bytes_max)
                    .await
            }
            Store::Cache(m) => m.apply(mutations, now_ms).await,
            Store::Cp { entry, groups, .. } => {
                let n = mutations.len();
                let shards = by_shard(mutations, |m| entry.shard_for_key(m.key()).group);
                let calls = shards.into_iter().map(|(group, (idx, muts))| async move {
                    (idx, groups.write_mutations(group, muts, now_ms).await)
                });
                let answers = futures::future::join_all(calls).await;
                // A shard that failed fails its own mutations only: the others may have been
                // applied, and each command's reply must say what happened to it.
                Ok(reassemble::<Result<Reply>>(n, answers)
                    .into_iter()
                    .map(|r| r.and_then(|r| r))
                    .collect())
            }
        }
    }

    /// The shard a transaction touching `key` runs on (MULTI/EXEC: every key of one
    /// transaction must be on one shard of one keyspace): a `cp` key's Raft group, an `ap` key's
    /// shard index, and 0 for a cache (one node holds all of it, under one lock scope).
    pub fn txn_shard(&self, key: &[u8]) -> u64 {
        match &self.store {
            Store::Cp { entry, .. } => entry.shard_for_key(key).group,
            Store::Ap { ap, .. } => {
                let shards = ap.shard_count(self.name()).unwrap_or(1).max(1) as u32;
                let slot = capdb_cluster::slots::key_slot(key);
                capdb_cluster::slots::shard_of_slot(slot, shards) as u64
            }
            Store::Cache(_) => 0,
        }
    }

    /// Starts watching `keys` (WATCH; every key on one shard, see [`Keyspace::txn_shard`]):
    /// what EXEC needs to tell whether any of them changed since now. `cp`: a point in the
    /// shard's log (one entry through it, `Groups::watch_point`); `cache`: the shard's change
    /// count (`MemStore::watch`); `ap`: each key's watch stamp as read now
    /// (`capdb_types::composite::watch_stamp`; best effort: see [`Keyspace::transact`]).
    pub async fn watch(&self, keys: &[Bytes], now_ms: u64, c: Consistency) -> Result<Vec<Watched>> {
        self.check_live()?;
        let Some(first) = keys.first() else {
            return Ok(Vec::new());
        };
        let shard = self.txn_shard(first);
        let marks: Vec<WatchMark> = match &self.store {
            Store::Cp { groups, .. } => {
                let index = groups.watch_point(shard).await?;
                keys.iter()
                    .map(|k| {
                        WatchMark::Cp(capdb_raft::command::TxnGuard {
                            key: k.clone(),
                            index,
                            since_ms: now_ms,
                        })
                    })
                    .collect()
            }
            Store::Cache(m) => keys
                .iter()
                .map(|k| WatchMark::Cache(m.watch(k, now_ms)))
                .collect(),
            Store::Ap { ap, .. } => {
                let stamps = ap
                    .watch_stamps(self.name(), keys, c.ap_read, now_ms)
                    .await?;
                keys.iter()
                    .zip(stamps)
                    .map(|(k, stamp)| WatchMark::Ap {
                        key: k.clone(),
                        stamp,
                    })
                    .collect()
            }
        };
        Ok(marks
            .into_iter()
            .map(|mark| Watched {
                keyspace: self.spec.name.clone(),
                shard,
                mark,
            })
            .collect())
    }

    /// Runs a MULTI/EXEC transaction's keyed commands (`mutations`, reads included as
    /// read-only data-type commands; every key on one shard) unless a watched key changed:
    /// `None` then, and nothing ran.
    ///
    /// - `cp`: one log entry (`Request::Txn`), the guards checked while applying it: atomic,
    ///   isolated, exactly once.
    /// - `cache`: one lock scope over every shard the keys (and watched keys) hash to.
    /// - `ap`: the watched keys are read again and compared with their stamps at WATCH,
    ///   then the commands run in order at this coordinator: nothing is isolated from
    ///   concurrent writers (as for every `ap` read-modify-write), and a change between that
    ///   check and the writes is not seen (best effort, as the README says).
    pub async fn transact(
        &self,
        mutations: Vec<Mutation>,
        watches: &[&Watched],
        now_ms: u64,
        c: Consistency,
    ) -> Result<Option<BatchReplies>> {
        self.check_live()?;
        match &self.store {
            Store::Cp { groups, entry, .. } => {
                let group = match (mutations.first(), watches.first()) {
                    (Some(m), _) => entry.shard_for_key(m.key()).group,
                    (None, Some(w)) => w.shard,
                    (None, None) => return Ok(Some(Vec::new())),
                };
                let guards = watches
                    .iter()
                    .filter_map(|w| match &w.mark {
                        WatchMark::Cp(g) => Some(g.clone()),
                        _ => None,
                    })
                    .collect();
                groups.write_txn(group, mutations, guards, now_ms).await
            }
            Store::Cache(m) => {
                let tickets: Vec<_> = watches
                    .iter()
                    .filter_map(|w| match &w.mark {
                        WatchMark::Cache(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                m.apply_guarded(mutations, &tickets, now_ms)
            }
            Store::Ap {
                ap,
                value_bytes_max,
                ..
            } => {
                let watched: Vec<(&Bytes, Option<u64>)> = watches
                    .iter()
                    .filter_map(|w| match &w.mark {
                        WatchMark::Ap { key, stamp } => Some((key, *stamp)),
                        _ => None,
                    })
                    .collect();
                if !watched.is_empty() {
                    let keys: Vec<Bytes> = watched.iter().map(|(k, _)| (*k).clone()).collect();
                    let now = ap
                        .watch_stamps(self.name(), &keys, c.ap_read, now_ms)
                        .await?;
                    let same = watched
                        .iter()
                        .zip(now)
                        .all(|((_, before), stamp)| *before == stamp);
                    if !same {
                        return Ok(None);
                    }
                }
                if mutations.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                ap.apply(self.name(), mutations, c.ap_write, now_ms, *value_bytes_max)
                    .await
                    .map(Some)
            }
        }
    }

    /// Runs a transaction's keyed commands over several `cp` shards, of one or several `cp`
    /// keyspaces (each command with its Raft group), atomically: every shard commits or none
    /// does, and a watched key that changed on any shard aborts it all (`None`, nothing ran).
    /// See `crate::node::txns` for the protocol and what each error means.
    pub async fn transact_across(
        txns: &super::txns::TxnCoordinator,
        commands: Vec<(u64, Mutation)>,
        watches: &[&Watched],
        now_ms: u64,
    ) -> Result<Option<BatchReplies>> {
        let guards = watches
            .iter()
            .filter_map(|w| match &w.mark {
                WatchMark::Cp(g) => Some((w.shard, g.clone())),
                _ => None,
            })
            .collect();
        let plan = super::txns::plan(commands, guards);
        super::txns::execute(txns, plan, now_ms).await
    }

    /// One page of keys in order, continuing from `pos`; returns the next position (`None`:
    /// done). Replicated keyspaces are scanned shard after shard (keys are ordered within a
    /// shard); `floor` (exclusive) bounds every shard from below.
    #[allow(clippy::too_many_arguments)]
    pub async fn scan(
        &self,
        pos: ScanPosition,
        floor: Option<Bytes>,
        prefix: Option<Bytes>,
        end: Option<Bytes>,
        limit: usize,
        now_ms: u64,
        c: Consistency,
    ) -> Result<(Vec<(Bytes, Value)>, Option<ScanPosition>)> {
        self.scan_in(&ShardScope::All, pos, floor, prefix, end, limit, now_ms, c)
            .await
    }

    /// [`Keyspace::scan`] over the shards of `scope` only (replicated keyspaces).
    #[allow(clippy::too_many_arguments)]
    pub async fn scan_in(
        &self,
        scope: &ShardScope,
        pos: ScanPosition,
        floor: Option<Bytes>,
        prefix: Option<Bytes>,
        end: Option<Bytes>,
        limit: usize,
        now_ms: u64,
        c: Consistency,
    ) -> Result<(Vec<(Bytes, Value)>, Option<ScanPosition>)> {
        self.check_live()?;
        let name = self.name();
        match &self.store {
            Store::Cache(m) => {
                let range = ScanRange {
                    after: pos.after.clone().or_else(|| floor.clone()),
                    end: end.clone(),
                    prefix: prefix.clone(),
                };
                let page = m.scan(&range, limit, now_ms)?;
                let next = page.next_after.map(|after| ScanPosition {
                    shard: 0,
                    after: Some(after),
                });
                Ok((page.entries, next))
            }
            Store::Ap { ap, .. } => {
                // Shard after shard, each from one replica (scans are best effort in ap).
                let shards = ap.shard_count(name)? as u32;
                walk_shards(
                    shards,
                    &ShardScope::All,
                    pos,
                    floor,
                    end,
                    limit,
                    |shard, after, want| {
                        let prefix = prefix.clone();
                        Box::pin(async move {
                            ap.scan_shard(name, shard as usize, after, prefix, want, now_ms)
                                .await
                        })
                    },
                )
                .await
            }
            Store::Cp { entry, groups, .. } => {
                let shards = entry.shards.len() as u32;
                walk_shards(
                    shards,
                    scope,
                    pos,
                    floor,
                    end,
                    limit,
                    |shard, after, want| {
                        let group = entry.shards[shard as usize].group;
                        let prefix = prefix.clone();
                        Box::pin(async move {
                            groups
                                .scan(group, after, prefix, want, c.cp_read, now_ms)
                                .await
                        })
                    },
                )
                .await
            }
        }
    }

    /// Number of keys (DBSIZE).
    pub async fn len(&self, c: Consistency) -> Result<u64> {
        self.len_in(&ShardScope::All, c).await
    }

    /// Number of keys in the shards of `scope` (replicated keyspaces; the others count all).
    pub async fn len_in(&self, scope: &ShardScope, c: Consistency) -> Result<u64> {
        self.check_live()?;
        match &self.store {
            Store::Ap { ap, .. } => {
                let mut n = 0u64;
                for shard in 0..ap.shard_count(self.name())? {
                    let mut after = None;
                    loop {
                        let now = capdb_types::unix_now_ms();
                        let (page, next) = ap
                            .scan_shard(self.name(), shard, after, None, 10_000, now)
                            .await?;
                        n += page.len() as u64;
                        match next {
                            Some(k) => after = Some(k),
                            None => break,
                        }
                    }
                }
                Ok(n)
            }
            Store::Cache(m) => m.len(),
            Store::Cp { entry, groups, .. } => {
                let calls = entry
                    .shards
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| scope.contains(*i as u32))
                    .map(|(_, s)| groups.count(s.group, c.cp_read));
                let counts = futures::future::join_all(calls).await;
                counts.into_iter().sum()
            }
        }
    }

    /// Deletes every key (FLUSHDB).
    pub async fn clear(&self, c: Consistency) -> Result<()> {
        self.check_live()?;
        match &self.store {
            Store::Ap { ap, .. } => {
                ap.clear(self.name(), c.ap_write, capdb_types::unix_now_ms())
                    .await
            }
            Store::Cache(m) => m.clear().await,
            Store::Cp { entry, groups, .. } => {
                for (i, s) in entry.shards.iter().enumerate() {
                    match groups.clear(s.group).await {
                        Ok(()) => {}
                        // Earlier shards were cleared: not "certainly nothing happened".
                        Err(e) if i > 0 && e.is_retryable() => {
                            return Err(Error::OutcomeUnknown(format!(
                                "{i} of {} shards were cleared, then: {e}",
                                entry.shards.len()
                            )));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }
}

/// Keys examined per shard per active-expiry step of a replicated keyspace, and most expired
/// keys deleted by one step.
const CP_EXPIRE_EXAMINE: usize = 2_000;
const CP_EXPIRE_BATCH: usize = 128;
/// How long one step waits for its deletion to commit.
const CP_EXPIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Expired keys of a shard's local replica, examined from a random point.
fn expired_sample(t: &capdb_storage::disk::DiskTable, now: u64) -> Result<Vec<Bytes>> {
    let start = fastrand::u64(..).to_be_bytes();
    let mut found = Vec::new();
    let mut examined = 0;
    t.for_each_raw_after(Some(&start), |k, v| {
        examined += 1;
        if v.is_expired(now) && !v.header.tombstone {
            found.push(Bytes::copy_from_slice(k));
        }
        examined < CP_EXPIRE_EXAMINE && found.len() < CP_EXPIRE_BATCH
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::{by_shard, reassemble};
    use capdb_types::Error;

    #[test]
    fn items_are_grouped_by_shard_in_shard_order_keeping_their_positions() {
        let groups = by_shard(["b1", "a1", "b2", "c1"], |s| match &s[..1] {
            "a" => 1,
            "b" => 2,
            _ => 3,
        });
        let got: Vec<_> = groups.into_iter().collect();
        assert_eq!(
            got,
            vec![
                (1, (vec![1], vec!["a1"])),
                (2, (vec![0, 2], vec!["b1", "b2"])),
                (3, (vec![3], vec!["c1"])),
            ]
        );
    }

    #[test]
    fn answers_return_to_their_items_and_a_failed_shard_fails_only_its_items() {
        let out = reassemble(
            4,
            vec![
                (vec![0, 2], Ok(vec!["x", "z"])),
                (vec![1, 3], Err(Error::Unavailable("down".into()))),
            ],
        );
        assert_eq!(out[0], Ok("x"));
        assert_eq!(out[2], Ok("z"));
        assert!(matches!(out[1], Err(Error::Unavailable(_))));
        assert!(matches!(out[3], Err(Error::Unavailable(_))));
    }
}
