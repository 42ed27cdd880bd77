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
//! - Snapshots are built from one consistent read of the table (an MVCC snapshot), so applies
//!   can continue while a snapshot is being built. The latest snapshot is kept in memory only;
//!   after a restart a new one is built on demand from the (durable) table.

use std::io;
use std::sync::{Arc, Mutex};

use capdb_cluster::{ClusterState, GroupId, MetaResponse};
use capdb_storage::disk::DiskEngine;
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::io;
use crate::log_store::meta_key;
use crate::types::{
    LogId, Request, Response, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

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

#[derive(Serialize, Deserialize)]
enum SnapshotPayload {
    Data { entries: Vec<(Vec<u8>, Vec<u8>)> },
    Meta { state: ClusterState },
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
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

/// The latest snapshot: its meta and encoded payload.
type StoredSnapshot = (SnapshotMeta, Vec<u8>);

struct SmState {
    applied: Applied,
    cluster: ClusterState,
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> io::Result<T> {
    postcard::from_bytes(raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {e}")))
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
                Some(raw) => decode(&raw, "cluster state")?,
                None => ClusterState::default(),
            },
            Kind::Data { .. } => ClusterState::default(),
        };
        if let Kind::Meta { published } = &kind {
            published.send_replace(Arc::new(meta_state.clone()));
        }
        Ok(StateMachine {
            engine,
            group,
            kind,
            state: Arc::new(Mutex::new(SmState {
                applied,
                cluster: meta_state,
            })),
            current: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied(&self) -> Applied {
        self.lock().applied.clone()
    }

    fn applied_meta(&self, applied: &Applied) -> (String, Vec<u8>) {
        (meta_key(self.group, "applied"), encode(applied))
    }

    /// Applies a run of data writes in one engine transaction; returns one response per entry.
    async fn apply_data_writes(
        &self,
        table: &str,
        batch: &[(usize, Request)],
        applied: &Applied,
    ) -> io::Result<Vec<Response>> {
        let mut mutations = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        for (_, req) in batch {
            if let Request::Write {
                mutations: m,
                timestamp,
                now_ms,
            } = req
            {
                counts.push(m.len());
                mutations.extend(m.iter().cloned().map(|m| (m, *timestamp, *now_ms)));
            }
        }
        let replies = self
            .engine
            .apply_replicated(table, mutations, vec![self.applied_meta(applied)])
            .await
            .map_err(io)?;
        let mut it = replies.into_iter();
        Ok(counts
            .into_iter()
            .map(|n| Response::Replies(it.by_ref().take(n).collect()))
            .collect())
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
        let (mut applied, mut cluster) = {
            let st = self.lock();
            let cluster = match self.kind {
                Kind::Meta { .. } => st.cluster.clone(),
                Kind::Data { .. } => ClusterState::default(),
            };
            (st.applied.clone(), cluster)
        };
        // Data writes are gathered and applied together; anything else flushes them first.
        let mut writes: Vec<(usize, Request)> = Vec::new();
        let mut responders = Vec::new();
        let mut responses: Vec<Option<Response>> = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            applied.last_applied = Some(entry.log_id);
            let slot = responses.len();
            responses.push(None);
            responders.push(responder);
            match entry.payload {
                EntryPayload::Blank => responses[slot] = Some(Response::Empty),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses[slot] = Some(Response::Empty);
                }
                EntryPayload::Normal(req) => match (&self.kind, req) {
                    (Kind::Data { .. }, req @ Request::Write { .. }) => writes.push((slot, req)),
                    (Kind::Data { table }, Request::Clear) => {
                        if !writes.is_empty() {
                            let table = table.clone();
                            for ((s, _), r) in writes
                                .iter()
                                .zip(self.apply_data_writes(&table, &writes, &applied).await?)
                            {
                                responses[*s] = Some(r);
                            }
                            writes.clear();
                        }
                        self.engine
                            .replace_table(table, Vec::new(), vec![self.applied_meta(&applied)])
                            .await
                            .map_err(io)?;
                        responses[slot] = Some(Response::Replies(Vec::new()));
                    }
                    (Kind::Meta { .. }, Request::Meta(cmd)) => {
                        let r = cluster.apply(&cmd);
                        tracing::debug!(
                            index = entry.log_id.index,
                            ?cmd,
                            ?r,
                            version = cluster.version,
                            "meta command applied"
                        );
                        responses[slot] = Some(Response::Meta(r));
                    }
                    (Kind::Meta { .. }, other) => {
                        responses[slot] = Some(Response::Meta(MetaResponse::Error(format!(
                            "not a meta command: {other}"
                        ))));
                    }
                    (Kind::Data { .. }, Request::Meta(_)) => {
                        responses[slot] = Some(Response::Meta(MetaResponse::Error(
                            "meta command sent to a data shard".into(),
                        )));
                    }
                },
            }
        }
        match &self.kind {
            Kind::Data { table } => {
                if writes.is_empty() {
                    // Record progress (blank/membership entries) with the data table untouched.
                    self.engine
                        .apply_replicated(table, Vec::new(), vec![self.applied_meta(&applied)])
                        .await
                        .map_err(io)?;
                } else {
                    let table = table.clone();
                    for ((s, _), r) in writes
                        .iter()
                        .zip(self.apply_data_writes(&table, &writes, &applied).await?)
                    {
                        responses[*s] = Some(r);
                    }
                }
            }
            Kind::Meta { published } => {
                self.engine
                    .meta_put(
                        vec![
                            (meta_key(self.group, "state"), Some(encode(&cluster))),
                            (meta_key(self.group, "applied"), Some(encode(&applied))),
                        ],
                        false,
                    )
                    .await
                    .map_err(io)?;
                published.send_replace(Arc::new(cluster.clone()));
            }
        }
        {
            let mut st = self.lock();
            st.applied = applied;
            if let Kind::Meta { .. } = self.kind {
                st.cluster = cluster;
            }
        }
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(r) = responder {
                r.send(response.unwrap_or_default());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let bytes = snapshot.into_inner();
        let payload: SnapshotPayload = decode(&bytes, "snapshot")?;
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        match (&self.kind, payload) {
            (Kind::Data { table }, SnapshotPayload::Data { entries }) => {
                self.engine
                    .replace_table(table, entries, vec![self.applied_meta(&applied)])
                    .await
                    .map_err(io)?;
            }
            (Kind::Meta { published }, SnapshotPayload::Meta { state }) => {
                self.engine
                    .meta_put(
                        vec![
                            (meta_key(self.group, "state"), Some(encode(&state))),
                            (meta_key(self.group, "applied"), Some(encode(&applied))),
                        ],
                        true,
                    )
                    .await
                    .map_err(io)?;
                self.lock().cluster = state.clone();
                published.send_replace(Arc::new(state));
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "snapshot of the wrong kind of group",
                ));
            }
        }
        tracing::info!(
            group = self.group,
            last_log = ?meta.last_log_id.map(|l| l.index),
            bytes = bytes.len(),
            "installed a snapshot"
        );
        self.lock().applied = applied;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        Ok(self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: std::io::Cursor::new(bytes.clone()),
            }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let applied_key = meta_key(self.group, "applied");
        let (payload, applied) = match &self.kind {
            Kind::Data { table } => {
                let (entries, meta) = self.engine.dump_table(table, &[applied_key]).map_err(io)?;
                let applied: Applied = match &meta[0] {
                    Some(raw) => decode(raw, "applied state")?,
                    None => Applied::default(),
                };
                (SnapshotPayload::Data { entries }, applied)
            }
            Kind::Meta { .. } => {
                let st = self.lock();
                (
                    SnapshotPayload::Meta {
                        state: st.cluster.clone(),
                    },
                    st.applied.clone(),
                )
            }
        };
        let bytes = encode(&payload);
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: std::io::Cursor::new(bytes),
        })
    }
}
