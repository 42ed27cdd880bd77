//! Applying committed commands, and snapshots.
//!
//! A data shard's state machine is its table `ks/{keyspace}/{shard}` in the storage engine; the
//! meta group's is the [`ClusterState`], kept in memory, persisted in `_meta` and published to the
//! node through a watch channel.
//!
//! ### To ensure correctness
//!
//! - The applied log id and membership are written in the **same transaction** as the data they
//!   describe (`raft/{group}/applied`), so after a crash `applied_state` never claims more than
//!   the table holds. Applies are not fsync'd on their own: the log is durable, and openraft
//!   re-applies `(applied, committed]` at start.
//! - Every entry with a responder gets a response, including blank and membership entries.
//! - A snapshot is one consistent read of the table (an MVCC read transaction) with the
//!   applied state and session rows, so applies continue meanwhile. Nothing is copied when
//!   openraft builds one: its rows are read page by page only if it is sent, and the snapshot
//!   sent is read at that moment (`crate::snapshot`). So no snapshot is kept anywhere: the
//!   (durable) table is the snapshot.
//! - **Exactly once**: an identified request ([`Request::Identified`]) is applied only the first
//!   time it is committed; later copies (retries by the routing node after a lost answer) get
//!   the first copy's reply ([`crate::sessions`]). The session table and the remembered
//!   replies are `_meta` rows written in the same transaction as the entries that changed
//!   them, and travel in snapshots, so every replica decides the same way after restarts,
//!   snapshot installs and leader changes.

use std::io;
use std::sync::{Arc, Mutex};

use capdb_cluster::{ClusterState, GroupId, MetaResponse};
use std::collections::HashMap;

use capdb_storage::disk::{ChangesStep, DiskEngine, MetaItem, RememberReplies};
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{
    LogId, Request, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::io;
use crate::log_store::meta_key;
use crate::sessions::{Decision, RequestId, SessionTable, row};
use crate::snapshot::{LocalSnapshot, SnapshotPart};

/// What a group's state machine holds.
#[derive(Clone)]
pub enum Kind {
    /// A data shard stored in this table.
    Data { table: String },
    /// The meta group: the cluster map, published to the node.
    Meta {
        published: watch::Sender<Arc<ClusterState>>,
    },
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// One group's state machine. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct StateMachine {
    engine: DiskEngine,
    group: GroupId,
    kind: Kind,
    /// The applied state and (meta group only) the cluster map, changed together under one
    /// lock so a snapshot never pairs a map with the wrong applied id.
    state: Arc<Mutex<SmState>>,
    /// Applied request ids and where their replies are (see [`crate::sessions`]). Only `apply`
    /// and `install_snapshot` use it, and openraft never runs them at once.
    sessions: Arc<Mutex<SessionTable>>,
    /// TESTING ONLY: apply every copy of an identified request (see
    /// [`StateMachine::apply_duplicates`]).
    apply_duplicates: bool,
}

struct SmState {
    applied: Applied,
    cluster: ClusterState,
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> io::Result<T> {
    postcard::from_bytes(raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {e}")))
}

/// The stored cluster map, in its current layout or the one before (`ClusterState::decode`).
fn decode_cluster(raw: &[u8]) -> io::Result<ClusterState> {
    ClusterState::decode(raw).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt cluster state: {e}"),
        )
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("state machine types always encode")
}

impl StateMachine {
    /// Opens a group's state machine from its durable state.
    pub fn open(engine: DiskEngine, group: GroupId, kind: Kind) -> io::Result<StateMachine> {
        let applied: Applied = match engine.meta_get(&meta_key(group, "applied")).map_err(io)? {
            Some(raw) => decode(&raw, "applied state")?,
            None => Applied::default(),
        };
        let meta_state: ClusterState = match &kind {
            Kind::Meta { .. } => match engine.meta_get(&meta_key(group, "state")).map_err(io)? {
                Some(raw) => decode_cluster(&raw)?,
                None => ClusterState::default(),
            },
            Kind::Data { .. } => ClusterState::default(),
        };
        if let Kind::Meta { published } = &kind {
            published.send_replace(Arc::new(meta_state.clone()));
        }
        let rows = engine
            .meta_list(&SessionTable::prefix_of(group))
            .map_err(io)?;
        let sessions = SessionTable::load(group, &rows)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(StateMachine {
            engine,
            group,
            kind,
            state: Arc::new(Mutex::new(SmState {
                applied,
                cluster: meta_state,
            })),
            sessions: Arc::new(Mutex::new(sessions)),
            apply_duplicates: false,
        })
    }

    /// TESTING ONLY (`--debug-apply-duplicates`): applies every copy of a retried request
    /// again, as capdb did before exactly-once, so the chaos harness can show it catches
    /// double application.
    pub fn apply_duplicates(mut self, yes: bool) -> StateMachine {
        self.apply_duplicates = yes;
        self
    }

    fn take_sessions(&self) -> SessionTable {
        std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn put_sessions(&self, table: SessionTable) {
        *self.sessions.lock().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// The remembered reply of an applied request, from `_meta`. A reply that is gone or
    /// unreadable answers "outcome unknown": the copy is not applied either way, and only its
    /// proposer is waiting, so this never stops the state machine.
    fn remembered_reply(&self, key: &str) -> Response {
        let decoded = match self.engine.meta_get(key) {
            Ok(Some(raw)) => match raw.get(8..) {
                Some([row::REPLIES, payload @ ..]) => {
                    decode(payload, "remembered replies").map(Response::Replies)
                }
                Some([row::RESPONSE, payload @ ..]) => decode(payload, "remembered response"),
                _ => Err(io(format!(
                    "remembered reply {key} is truncated or of unknown kind"
                ))),
            },
            // Forgotten (never expected while a copy can still arrive): do not guess.
            Ok(None) => return Response::Expired,
            Err(e) => Err(io(e)),
        };
        decoded.unwrap_or_else(|e| {
            tracing::warn!(key, error = %e, "cannot read a remembered reply; answering outcome unknown");
            Response::Expired
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied(&self) -> Applied {
        self.lock().applied.clone()
    }

    fn applied_meta(&self, applied: &Applied) -> MetaItem {
        (meta_key(self.group, "applied"), Some(encode(applied)))
    }

    /// The `_meta` rows of an entry applied alone (its storage transaction holds nothing else):
    /// the applied state, the session changes and the replies remembered so far.
    fn alone_meta(&self, b: &mut ApplyBatch, sessions: &mut SessionTable) -> Vec<MetaItem> {
        let mut meta = vec![self.applied_meta(&b.applied)];
        meta.extend(sessions.take_changes());
        meta.append(&mut b.remembered);
        meta
    }

    /// Applies a run of data writes in one engine transaction, remembering the replies of
    /// identified ones, with `meta` (applied state, session changes); one response per write.
    async fn apply_data_writes(
        &self,
        table: &str,
        batch: &[PendingWrite],
        meta: Vec<MetaItem>,
        watch_points: Vec<u64>,
    ) -> io::Result<Vec<Response>> {
        let mut mutations = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        let mut remember = Vec::new();
        for w in batch {
            if let Request::Write {
                mutations: m,
                timestamp,
                now_ms,
            }
            | Request::Txn {
                mutations: m,
                timestamp,
                now_ms,
                ..
            } = &w.request
            {
                if let Some((key, sent_ms)) = &w.remember {
                    remember.push(RememberReplies {
                        key: key.clone(),
                        prefix: row::prefix(*sent_ms, row::REPLIES),
                        first: mutations.len(),
                        count: m.len(),
                    });
                }
                counts.push(m.len());
                mutations.extend(m.iter().cloned().map(|m| (m, *timestamp, *now_ms, w.index)));
            }
        }
        let replies = self
            .engine
            .apply_replicated(table, mutations, meta, remember, Vec::new(), watch_points)
            .await
            .map_err(io)?;
        let mut it = replies.into_iter();
        Ok(counts
            .into_iter()
            .map(|n| Response::Replies(it.by_ref().take(n).collect()))
            .collect())
    }

    /// Applies the queued data writes of `b`, recording `upto` as the applied state.
    async fn flush_writes(
        &self,
        table: &str,
        b: &mut ApplyBatch,
        sessions: &mut SessionTable,
        upto: &Applied,
    ) -> io::Result<()> {
        let mut meta = vec![self.applied_meta(upto)];
        meta.extend(sessions.take_changes());
        meta.append(&mut b.remembered);
        let watch_points = std::mem::take(&mut b.watch_points);
        let writes = std::mem::take(&mut b.writes);
        if writes.is_empty() {
            // Record progress (blank/membership entries) with the data table untouched.
            self.engine
                .apply_replicated(
                    table,
                    Vec::new(),
                    meta,
                    Vec::new(),
                    Vec::new(),
                    watch_points,
                )
                .await
                .map_err(io)?;
            return Ok(());
        }
        let responses = self
            .apply_data_writes(table, &writes, meta, watch_points)
            .await?;
        for (w, r) in writes.iter().zip(responses) {
            b.responses[w.slot] = Some(r);
        }
        Ok(())
    }

    /// Waits for the transaction steps queued in the storage writer and takes their answers.
    async fn collect_steps(&self, b: &mut ApplyBatch) -> io::Result<()> {
        for (slot, queued) in std::mem::take(&mut b.steps) {
            let answer = match queued.await {
                // A protocol violation, or a record that cannot be read: refused, nothing
                // changed (the engine logged it).
                Err(
                    e @ (capdb_types::Error::InvalidInput(_) | capdb_types::Error::Corruption(_)),
                ) => Err(e),
                // Storage failed: as for any entry, applying stops here.
                other => Ok(other.map_err(io)?),
            };
            b.responses[slot] = Some(Response::Txn(answer));
        }
        Ok(())
    }

    /// Applies a change-log step (`Request::ChangesConfig` and friends) alone, after
    /// everything before it: the log starts, stops or is trimmed exactly at this entry.
    #[allow(clippy::too_many_arguments)]
    async fn apply_changes_step(
        &self,
        table: &str,
        b: &mut ApplyBatch,
        sessions: &mut SessionTable,
        slot: usize,
        remember: Option<(String, u64)>,
        index: u64,
        step: ChangesStep,
    ) -> io::Result<()> {
        // The answer is remembered in the step's own storage transaction.
        let remember = remember.map(|(key, sent_ms)| {
            let encode_answer: capdb_storage::disk::RememberReply = Box::new(move |answer| {
                let mut value = row::prefix(sent_ms, row::REPLIES);
                value.extend(encode(&vec![answer.clone()]));
                value
            });
            (key, encode_answer)
        });
        let meta = self.alone_meta(b, sessions);
        let answer = self
            .engine
            .changes_config(table, step, index, meta, remember)
            .await
            .map_err(io)?;
        b.responses[slot] = Some(Response::Replies(vec![answer]));
        Ok(())
    }

    /// Writes `meta` rows (applied state, sessions, remembered replies) in a storage job of
    /// their own on `table`'s shard, changing no data.
    async fn record_meta(&self, table: &str, meta: Vec<MetaItem>) -> io::Result<()> {
        self.engine
            .apply_replicated(table, Vec::new(), meta, Vec::new(), Vec::new(), Vec::new())
            .await
            .map_err(io)?;
        Ok(())
    }

    /// Applies a [`Request::JobPin`] alone (`capdb_storage::disk` `pins.rs`): its storage job
    /// records the applied state, then the replica holds a read transaction of exactly that,
    /// before anything after it is applied. Its answer, the same on every replica, is
    /// remembered by a second job right after (it is known only once the pin is held); a
    /// snapshot built or a crash in between leaves a duplicate of the request answered as
    /// expired, and no pin survives a crash anyway: the job pins again.
    #[allow(clippy::too_many_arguments)]
    async fn apply_pin(
        &self,
        table: &str,
        b: &mut ApplyBatch,
        sessions: &mut SessionTable,
        slot: usize,
        remember: Option<(String, u64)>,
        index: u64,
        owner: bytes::Bytes,
        now_ms: u64,
    ) -> io::Result<()> {
        use capdb_types::Reply;
        let meta = self.alone_meta(b, sessions);
        let applied_key = meta_key(self.group, "applied");
        // A storage failure stops the apply here, as for any entry.
        let pinned = self
            .engine
            .table(table, false)
            .pin(&owner, index, now_ms, meta, &applied_key)
            .await
            .map_err(io)?;
        let reply = pinned.map(|info| {
            let key = |k: Option<bytes::Bytes>| k.map_or(Reply::Nil, Reply::Bulk);
            if !info.held {
                tracing::warn!(
                    table,
                    "this replica holds the most pins it may: it holds none for this job"
                );
            }
            Reply::Array(vec![
                Reply::Integer(i64::try_from(info.index).unwrap_or(i64::MAX)),
                Reply::Integer(i64::try_from(info.keys).unwrap_or(i64::MAX)),
                key(info.first_key),
                key(info.last_key),
            ])
        });
        let reply = vec![reply];
        if let Some((key, sent_ms)) = remember {
            let mut value = row::prefix(sent_ms, row::REPLIES);
            value.extend(encode(&reply));
            self.record_meta(table, vec![(key, Some(value))]).await?;
        }
        b.responses[slot] = Some(Response::Replies(reply));
        Ok(())
    }

    /// Applies one normal entry of a data shard (queued, or at once for FLUSHDB).
    async fn apply_data_entry(
        &self,
        table: &str,
        b: &mut ApplyBatch,
        sessions: &mut SessionTable,
        slot: usize,
        request: Request,
    ) -> io::Result<()> {
        let (id, request) = unwrap_identified(request);
        let index = b.applied.last_applied.map_or(0, |l| l.index);
        let guarded = matches!(&request, Request::Txn { guards, .. } if !guards.is_empty());
        let alone = guarded
            || matches!(
                request,
                Request::Clear
                    | Request::TxnStep { .. }
                    | Request::ChangesConfig { .. }
                    | Request::ChangesRetention { .. }
                    | Request::ChangesTrim { .. }
                    | Request::ChangesProgress { .. }
                    | Request::ChangesGroup(_)
                    | Request::ChangesRetentionBytes { .. }
                    | Request::ChangesTrimTo { .. }
                    | Request::ChangesPrev { .. }
                    | Request::ChangesTrimPinned { .. }
                    | Request::JobPin { .. }
                    | Request::JobUnpin { .. }
                    | Request::Job(_)
                    | Request::View(_)
            );
        let pending =
            !(b.writes.is_empty() && b.watch_points.is_empty() && b.remembered.is_empty());
        if alone && pending {
            // Everything before this entry is applied first, and recorded as applied up to the
            // previous entry, so a crash in between never claims the clear happened. (With
            // nothing pending, the entry's own storage transaction records the progress: one
            // storage job per transaction step when they come back to back.)
            let upto = Applied {
                last_applied: b.previous,
                membership: b.applied.membership.clone(),
            };
            self.flush_writes(table, b, sessions, &upto).await?;
        }
        let remember = match id {
            Some(id) => match b.decide(sessions, slot, &id) {
                Some(key) => Some((key, id.sent_ms)),
                None => return Ok(()),
            },
            None => None,
        };
        match request {
            Request::Write { .. } | Request::Txn { .. } if !guarded => {
                b.writes.push(PendingWrite {
                    slot,
                    request,
                    remember,
                    index,
                })
            }
            Request::Txn {
                mutations,
                timestamp,
                now_ms,
                guards,
            } => {
                // Alone in its storage transaction, after everything before it: its guards
                // are judged on the state the entries before it left.
                let meta = self.alone_meta(b, sessions);
                let remember = remember
                    .map(|(key, sent_ms)| RememberReplies {
                        key,
                        prefix: row::prefix(sent_ms, row::REPLIES),
                        first: 0,
                        count: mutations.len() + 1,
                    })
                    .into_iter()
                    .collect();
                let guards = guards.into_iter().map(|g| g.judged_at(now_ms)).collect();
                let mutations = mutations
                    .into_iter()
                    .map(|m| (m, timestamp, now_ms, index))
                    .collect();
                let replies = self
                    .engine
                    .apply_replicated(table, mutations, meta, remember, guards, Vec::new())
                    .await
                    .map_err(io)?;
                b.responses[slot] = Some(Response::Replies(replies));
            }
            Request::TxnStep {
                txn,
                step,
                timestamp,
                now_ms,
            } => {
                // Alone, after everything before it: its locks and guards are judged on the
                // state the entries before it left.
                let meta = self.alone_meta(b, sessions);
                let step = match step {
                    capdb_types::txn::ShardStep::Prepare(p) => {
                        capdb_types::txn::ShardStep::Prepare(capdb_types::txn::Prepare {
                            anchor: p.anchor,
                            participants: p.participants,
                            commands: p.commands,
                            keys: p.keys,
                            guards: p.guards.into_iter().map(|g| g.judged_at(now_ms)).collect(),
                            deadline_ms: p.deadline_ms,
                            committed_first: p.committed_first,
                        })
                    }
                    capdb_types::txn::ShardStep::Commit { ts } => {
                        capdb_types::txn::ShardStep::Commit { ts }
                    }
                    capdb_types::txn::ShardStep::Abort => capdb_types::txn::ShardStep::Abort,
                    capdb_types::txn::ShardStep::Prevent => capdb_types::txn::ShardStep::Prevent,
                };
                let job = capdb_storage::disk::TxnJob {
                    txn,
                    step,
                    timestamp,
                    now_ms,
                    index,
                };
                let remember = remember.map(|(key, sent_ms)| {
                    let encode_answer: capdb_storage::disk::RememberAnswer =
                        Box::new(move |answer| {
                            let mut value = row::prefix(sent_ms, row::RESPONSE);
                            value.extend(encode(&Response::Txn(answer.clone())));
                            value
                        });
                    (key, encode_answer)
                });
                // Queued, not awaited: the steps of a run of entries share the writer's
                // transactions; their answers are collected when the batch ends.
                let queued = self
                    .engine
                    .txn_step_queued(table, job, meta, remember)
                    .await
                    .map_err(io)?;
                b.steps.push((slot, queued));
            }
            Request::WatchPoint => {
                let reply = vec![Ok(capdb_types::Reply::Integer(index as i64))];
                if let Some((key, sent_ms)) = remember {
                    let mut value = row::prefix(sent_ms, row::REPLIES);
                    value.extend(encode(&reply));
                    b.remembered.push((key, Some(value)));
                }
                // Recording touched keys starts here (`storage/src/disk/touched.rs`).
                b.watch_points.push(index);
                b.responses[slot] = Some(Response::Replies(reply));
            }
            Request::ChangesConfig { on } => {
                self.apply_changes_step(
                    table,
                    b,
                    sessions,
                    slot,
                    remember,
                    index,
                    ChangesStep::Switch(on),
                )
                .await?;
            }
            Request::ChangesRetention { retention_ms } => {
                let step = ChangesStep::Retention(retention_ms);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesTrim { now_ms } => {
                let step = ChangesStep::Trim { now_ms };
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesProgress { ts } => {
                let step = ChangesStep::Progress { ts };
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesTrimTo { now_ms, keep_from } => {
                let step = ChangesStep::TrimTo { now_ms, keep_from };
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesRetentionBytes { bytes } => {
                let step = ChangesStep::RetentionBytes(bytes);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesTrimPinned {
                now_ms,
                keep_from,
                pinned,
            } => {
                let step = ChangesStep::TrimPinned {
                    now_ms,
                    keep_from,
                    pinned,
                };
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesPrev { on } => {
                let step = ChangesStep::Prev(on);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::ChangesGroup(cmd) => {
                let step = ChangesStep::Group(cmd);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::Job(cmd) => {
                let step = ChangesStep::Job(cmd);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::View(cmd) => {
                let step = ChangesStep::View(cmd);
                self.apply_changes_step(table, b, sessions, slot, remember, index, step)
                    .await?;
            }
            Request::JobPin { owner, now_ms } => {
                self.apply_pin(table, b, sessions, slot, remember, index, owner, now_ms)
                    .await?;
            }
            Request::JobUnpin { owner, index } => {
                // Alone like the pin (a release between two pins of a batch is in order).
                let released = self.engine.table(table, false).unpin(&owner, index);
                tracing::debug!(table, released, "job pin released");
                let reply = vec![Ok(capdb_types::Reply::Ok)];
                let mut meta = self.alone_meta(b, sessions);
                if let Some((key, sent_ms)) = remember {
                    let mut value = row::prefix(sent_ms, row::REPLIES);
                    value.extend(encode(&reply));
                    meta.push((key, Some(value)));
                }
                self.record_meta(table, meta).await?;
                b.responses[slot] = Some(Response::Replies(reply));
            }
            Request::Clear => {
                // Not while a cross-shard transaction is prepared here: it may have answered
                // its client already, and a recovery that then found no prepare here would
                // abort it on the other shards. Refused whole (nothing changes); the routing
                // node retries, as for a write refused by a lock. The prepared set is applied
                // state (the steps queued before this entry are collected first), so every
                // replica decides the same.
                self.collect_steps(b).await?;
                let prepared = self
                    .engine
                    .table(table, false)
                    .prepared_txns()
                    .map_err(io)?;
                let reply: Vec<Result<capdb_types::Reply, capdb_types::Error>> =
                    match prepared.first() {
                        Some(txn) => vec![Err(capdb_types::Error::Locked(txn.to_string()))],
                        None => Vec::new(),
                    };
                let mut meta = vec![self.applied_meta(&b.applied)];
                meta.extend(sessions.take_changes());
                if let Some((key, sent_ms)) = remember {
                    let mut value = row::prefix(sent_ms, row::REPLIES);
                    value.extend(encode(&reply));
                    meta.push((key, Some(value)));
                }
                meta.append(&mut b.remembered);
                if !prepared.is_empty() {
                    self.record_meta(table, meta).await?;
                    b.responses[slot] = Some(Response::Replies(reply));
                    return Ok(());
                }
                // Every WATCH older than the FLUSHDB aborts (`touched.rs`).
                let elements = vec![capdb_storage::disk::horizon_row(index)];
                self.engine
                    .replace_table(table, Vec::new(), elements, None, meta, Some(index))
                    .await
                    .map_err(io)?;
                b.responses[slot] = Some(Response::Replies(reply));
            }
            other => {
                b.responses[slot] = Some(Response::Meta(MetaResponse::Error(format!(
                    "not a data shard command: {other}"
                ))));
            }
        }
        Ok(())
    }

    /// Applies one normal entry of the meta group to `cluster`; the remembered reply (if any)
    /// joins `rows`, written with the new map.
    fn apply_meta_entry(
        b: &mut ApplyBatch,
        sessions: &mut SessionTable,
        cluster: &mut ClusterState,
        rows: &mut Vec<MetaItem>,
        slot: usize,
        request: Request,
    ) {
        let (id, request) = unwrap_identified(request);
        let remember = match id {
            Some(id) => match b.decide(sessions, slot, &id) {
                Some(key) => Some((key, id.sent_ms)),
                None => return,
            },
            None => None,
        };
        let response = match request {
            Request::Meta(cmd) => {
                let r = cluster.apply(&cmd);
                tracing::debug!(?cmd, ?r, version = cluster.version, "meta command applied");
                Response::Meta(r)
            }
            other => Response::Meta(MetaResponse::Error(format!("not a meta command: {other}"))),
        };
        if let Some((key, sent_ms)) = remember {
            let mut value = row::prefix(sent_ms, row::RESPONSE);
            value.extend(encode(&response));
            rows.push((key, Some(value)));
        }
        b.responses[slot] = Some(response);
    }

    /// The state after applying `entries` (see [`RaftStateMachine::apply`]).
    async fn apply_entries<Strm>(
        &self,
        entries: &mut Strm,
        sessions: &mut SessionTable,
    ) -> io::Result<()>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let (applied, mut cluster) = {
            let st = self.lock();
            let cluster = match self.kind {
                Kind::Meta { .. } => st.cluster.clone(),
                Kind::Data { .. } => ClusterState::default(),
            };
            (st.applied.clone(), cluster)
        };
        let mut b = ApplyBatch::new(applied, self.apply_duplicates);
        let mut meta_rows: Vec<MetaItem> = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            if let Some(prev) = b.applied.last_applied {
                assert!(
                    prev < entry.log_id,
                    "group {}: applied log ids must strictly increase ({prev} then {})",
                    self.group,
                    entry.log_id
                );
            }
            b.previous = b.applied.last_applied;
            b.applied.last_applied = Some(entry.log_id);
            let slot = b.responses.len();
            b.responses.push(None);
            b.responders.push(responder);
            match entry.payload {
                EntryPayload::Blank => b.responses[slot] = Some(Response::Empty),
                EntryPayload::Membership(m) => {
                    b.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    b.responses[slot] = Some(Response::Empty);
                }
                EntryPayload::Normal(req) => match &self.kind {
                    Kind::Data { table } => {
                        self.apply_data_entry(table, &mut b, sessions, slot, req)
                            .await?
                    }
                    Kind::Meta { .. } => Self::apply_meta_entry(
                        &mut b,
                        sessions,
                        &mut cluster,
                        &mut meta_rows,
                        slot,
                        req,
                    ),
                },
            }
        }
        match &self.kind {
            Kind::Data { table } => {
                let upto = b.applied.clone();
                self.flush_writes(table, &mut b, sessions, &upto).await?;
                self.collect_steps(&mut b).await?;
            }
            Kind::Meta { published } => {
                let mut items = vec![
                    (meta_key(self.group, "state"), Some(encode(&cluster))),
                    (meta_key(self.group, "applied"), Some(encode(&b.applied))),
                ];
                // Replies first: a reply remembered and forgotten in this batch stays deleted.
                items.extend(meta_rows);
                items.extend(sessions.take_changes());
                self.engine.meta_put(items, false).await.map_err(io)?;
                published.send_replace(Arc::new(cluster.clone()));
            }
        }
        for (slot, key) in std::mem::take(&mut b.duplicates) {
            // Only the node that proposed the copy has someone waiting for the answer.
            if b.responders[slot].is_none() {
                b.responses[slot] = Some(Response::Empty);
                continue;
            }
            b.responses[slot] = Some(match b.rows.get(&key) {
                Some(&first) => b.responses[first].clone().unwrap_or_default(),
                None => self.remembered_reply(&key),
            });
        }
        {
            let mut st = self.lock();
            st.applied = b.applied.clone();
            if let Kind::Meta { .. } = self.kind {
                st.cluster = cluster;
            }
        }
        assert_eq!(b.responders.len(), b.responses.len());
        for (responder, response) in b.responders.into_iter().zip(b.responses) {
            if let Some(r) = responder {
                debug_assert!(response.is_some(), "every entry gets a response");
                r.send(response.unwrap_or_default());
            }
        }
        Ok(())
    }
}

/// A data write waiting to be applied with the rest of its batch.
struct PendingWrite {
    slot: usize,
    request: Request,
    /// Where to remember its replies, and when it was sent (identified writes).
    remember: Option<(String, u64)>,
    /// Its entry's log index (WATCH's touched rows).
    index: u64,
}

type Responder = Option<openraft::storage::ApplyResponder<TypeConfig>>;

/// The entries of one `apply` call, in progress.
struct ApplyBatch {
    /// The applied state as of the last entry taken.
    applied: Applied,
    /// The log id of the entry before it.
    previous: Option<LogId>,
    writes: Vec<PendingWrite>,
    /// Remembered replies of entries answered without a storage write of their own (watch
    /// points), written with the next one.
    remembered: Vec<MetaItem>,
    /// Log indexes of the watch points taken, applied with the next storage write.
    watch_points: Vec<u64>,
    responses: Vec<Option<Response>>,
    responders: Vec<Responder>,
    /// Identified entries applied in this batch: row key -> slot.
    rows: HashMap<String, usize>,
    /// Copies of applied entries: (slot, row key of the reply to give).
    duplicates: Vec<(usize, String)>,
    /// See [`StateMachine::apply_duplicates`].
    apply_duplicates: bool,
    /// Transaction steps queued in the storage writer, answered when the batch ends.
    steps: Vec<(
        usize,
        capdb_storage::disk::Queued<capdb_storage::disk::TxnAnswer>,
    )>,
}

impl ApplyBatch {
    fn new(applied: Applied, apply_duplicates: bool) -> ApplyBatch {
        ApplyBatch {
            previous: applied.last_applied,
            applied,
            writes: Vec::new(),
            steps: Vec::new(),
            remembered: Vec::new(),
            watch_points: Vec::new(),
            responses: Vec::new(),
            responders: Vec::new(),
            rows: HashMap::new(),
            duplicates: Vec::new(),
            apply_duplicates,
        }
    }

    /// Decides an identified entry: `Some(row key)` to apply it and remember its reply there;
    /// `None` when it is answered without being applied (a copy, or expired).
    fn decide(
        &mut self,
        sessions: &mut SessionTable,
        slot: usize,
        id: &RequestId,
    ) -> Option<String> {
        let key = sessions.row_key(id);
        let index = self.applied.last_applied.map_or(0, |l| l.index);
        match sessions.decide(id, index) {
            _ if self.apply_duplicates => {
                self.rows.insert(key.clone(), slot);
                Some(key)
            }
            Decision::Apply => {
                self.rows.insert(key.clone(), slot);
                Some(key)
            }
            Decision::Duplicate => {
                tracing::debug!(?id, "a copy of an applied request: answered, not applied");
                self.duplicates.push((slot, key));
                None
            }
            Decision::Expired => {
                tracing::info!(
                    ?id,
                    "a copy of a request whose outcome is forgotten: not applied"
                );
                self.responses[slot] = Some(Response::Expired);
                None
            }
        }
    }
}

fn unwrap_identified(request: Request) -> (Option<RequestId>, Request) {
    match request {
        Request::Identified { id, request } => (Some(id), *request),
        other => (None, other),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let a = self.applied();
        Ok((a.last_applied, a.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut sessions = self.take_sessions();
        let result = self.apply_entries(&mut entries, &mut sessions).await;
        self.put_sessions(sessions);
        result
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let spooled = match &snapshot {
            SnapshotData::Spooled(s) => (s.parts, s.bytes),
            SnapshotData::Local(_) => (0, 0),
        };
        let corrupt = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        // Opening the spool and reading its head are blocking reads.
        let (mut parts, head) = tokio::task::spawn_blocking(move || {
            let mut parts = snapshot.into_parts()?;
            let head = parts.next().transpose()?;
            Ok::<_, io::Error>((parts, head))
        })
        .await
        .map_err(io)??;
        let (sessions, state) = match head {
            Some(SnapshotPart::Head { sessions, state }) => (sessions, state),
            _ => return Err(corrupt("a snapshot that does not start with its head")),
        };
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let prefix = SessionTable::prefix_of(self.group);
        let session_rows: Vec<(String, Vec<u8>)> = sessions
            .into_iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect();
        let table_of_sessions = SessionTable::load(self.group, &session_rows)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut meta_items: Vec<MetaItem> = vec![self.applied_meta(&applied)];
        meta_items.extend(session_rows.into_iter().map(|(k, v)| (k, Some(v))));
        match (&self.kind, state) {
            (Kind::Data { table }, None) => {
                // Read from the spool batch by batch inside the storage transaction.
                let rows = parts.map(|p| match p {
                    Ok(SnapshotPart::Rows(which, rows)) => Ok((which, rows)),
                    Ok(SnapshotPart::Head { .. }) => Err(capdb_types::Error::Corruption(
                        "a snapshot with two heads".into(),
                    )),
                    Err(e) => Err(capdb_types::Error::Io(format!("snapshot spool: {e}"))),
                });
                self.engine
                    .replace_table_from(
                        table,
                        Box::new(rows),
                        spooled.1 as usize,
                        Some(prefix),
                        meta_items,
                        None,
                    )
                    .await
                    .map_err(io)?;
            }
            (Kind::Meta { published }, Some(state)) => {
                // Only a spool's end is left to read: at most one small read.
                if parts.next().is_some() {
                    return Err(corrupt("a meta group snapshot with rows"));
                }
                let mut items: Vec<MetaItem> = self
                    .engine
                    .meta_list(&prefix)
                    .map_err(io)?
                    .into_iter()
                    .map(|(k, _)| (k, None))
                    .collect();
                items.push((meta_key(self.group, "state"), Some(encode(&state))));
                items.extend(meta_items);
                self.engine.meta_put(items, true).await.map_err(io)?;
                self.lock().cluster = state.clone();
                published.send_replace(Arc::new(state));
            }
            _ => return Err(corrupt("snapshot of the wrong kind of group")),
        }
        tracing::info!(
            group = self.group,
            last_log = ?meta.last_log_id.map(|l| l.index),
            parts = spooled.0,
            bytes = spooled.1,
            "installed a snapshot"
        );
        self.lock().applied = applied;
        self.put_sessions(table_of_sessions);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let snapshot = self.local_snapshot()?;
        Ok(snapshot.meta.last_log_id.is_some().then_some(snapshot))
    }
}

impl StateMachine {
    /// The group's state as of now, as a snapshot whose rows are read only if it is sent: one
    /// read transaction holding the table, the applied state (the snapshot's meta), the map
    /// (meta group) and the session rows, all written together.
    fn local_snapshot(&self) -> io::Result<Snapshot> {
        let applied_key = meta_key(self.group, "applied");
        let state_key = meta_key(self.group, "state");
        let prefix = SessionTable::prefix_of(self.group);
        let table = match &self.kind {
            Kind::Data { table } => table.clone(),
            Kind::Meta { .. } => format!("raft/{}/no-table", self.group),
        };
        let rows = self
            .engine
            .table_snapshot(&table, &[applied_key, state_key], &prefix)
            .map_err(io)?;
        let applied: Applied = match &rows.meta[0] {
            Some(raw) => decode(raw, "applied state")?,
            None => Applied::default(),
        };
        let state = match &self.kind {
            Kind::Data { .. } => None,
            Kind::Meta { .. } => Some(match &rows.meta[1] {
                Some(raw) => decode_cluster(raw)?,
                None => ClusterState::default(),
            }),
        };
        let sessions: Vec<(String, Vec<u8>)> = rows
            .meta_prefixed
            .iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
            .collect();
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            },
            snapshot: SnapshotData::Local(Arc::new(LocalSnapshot {
                rows,
                sessions,
                state,
            })),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// Records nothing and copies nothing: the table is the snapshot (module docs), and the
    /// one sent is read when it is sent. openraft then purges the log up to this meta, which
    /// the log store makes safe by a durable commit first (`crate::log_store`).
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        self.local_snapshot()
    }
}
