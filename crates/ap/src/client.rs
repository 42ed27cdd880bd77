//! The operations clients ask for (GET/MGET, writes, INCR, SCAN, FLUSHDB), coordinated across
//! the replicas of each key's shard. Plain SETs are blind writes (a version without reading);
//! other commands read at the write's level first (see the crate doc).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_cluster::NodeId;
use capdb_cluster::state::{KeyspaceEntry, ShardInfo};
use capdb_types::mutation::Condition;
use capdb_types::{Effect, Error, KeyspaceName, Mutation, Reply, Result, Value};

use super::{
    Ap, ApRequest, ApResponse, CallError, Level, MERGE_BATCH_KEYS, REPLICA_TIMEOUT, shard_index,
};

impl Ap {
    /// Live values of `keys` (counters rendered as their totals), at `level`.
    pub async fn get_many(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        keys: &[Bytes],
        level: Level,
        now_ms: u64,
    ) -> Result<Vec<Option<Value>>> {
        let entry = self.entry(keyspace)?;
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_shard.entry(shard_index(&entry, k)).or_default().push(i);
        }
        let mut out = vec![None; keys.len()];
        let calls = by_shard.into_iter().map(|(s, idx)| {
            let shard_keys: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
            let shard = entry.shards[s].clone();
            async move {
                let v = self
                    .read_versions(keyspace, &shard, shard_keys, level)
                    .await;
                (idx, v)
            }
        });
        for (idx, values) in futures::future::join_all(calls).await {
            for (i, v) in idx.into_iter().zip(values?) {
                out[i] = match v.filter(|v| v.is_live(now_ms)) {
                    Some(v) => Some(capdb_types::merge::render(v)?),
                    None => None,
                };
            }
        }
        Ok(out)
    }

    /// WATCH's marks of `keys` at `level`: per key, `None` when no version of it is stored,
    /// else its [`capdb_types::composite::watch_stamp`] (also for a tombstone). A key changed
    /// between two reads the way Redis counts a change iff its mark differs.
    pub async fn watch_stamps(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        keys: &[Bytes],
        level: Level,
        now_ms: u64,
    ) -> Result<Vec<Option<u64>>> {
        let entry = self.entry(keyspace)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let shard = entry.shards[shard_index(&entry, k)].clone();
            let v = self
                .read_versions(keyspace, &shard, vec![k.clone()], level)
                .await?
                .pop()
                .flatten();
            out.push(match v {
                Some(v) => Some(capdb_types::composite::watch_stamp(&v, now_ms)?),
                None => None,
            });
        }
        Ok(out)
    }

    /// Applies client mutations at `level`, in order. See the module docs for which commands
    /// are blind writes, counters or read-modify-writes.
    pub async fn apply(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        mutations: Vec<Mutation>,
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
    ) -> Result<Vec<Result<Reply>>> {
        let entry = self.entry(keyspace)?;
        let mut replies: Vec<Option<Result<Reply>>> = vec![None; mutations.len()];
        // Consecutive blind writes (plain SETs) travel together, one batch per shard; any other
        // command first waits for the writes queued before it, so a pipeline keeps its order.
        let mut pending = BlindBatches::new();
        for (i, m) in mutations.into_iter().enumerate() {
            let s = shard_index(&entry, m.key());
            if let Some(version) = self.blind_version(&m, now_ms) {
                let e = pending.entry(s).or_default();
                e.0.push(i);
                e.1.push((m.key().clone(), version));
                continue;
            }
            self.flush_blind(keyspace, &entry, &mut pending, &mut replies, level)
                .await;
            if let Mutation::Exec { args, .. } = &m {
                let r = self
                    .exec(keyspace, &entry, args, level, now_ms, value_bytes_max, true)
                    .await;
                replies[i] = Some(r);
                continue;
            }
            let shard = entry.shards[s].clone();
            replies[i] = Some(
                self.apply_one(keyspace, &shard, m, level, now_ms, value_bytes_max)
                    .await,
            );
        }
        self.flush_blind(keyspace, &entry, &mut pending, &mut replies, level)
            .await;
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Io("missing reply".into()))))
            .collect())
    }

    /// Runs a data-type string or key command (see `scratch.rs`): reads its keys at `level`,
    /// evaluates it here, and (`write`) replicates what it wrote.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        entry: &KeyspaceEntry,
        args: &[Bytes],
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
        write: bool,
    ) -> Result<Reply> {
        // An argument error needs no data: answer it without reading.
        let keys = capdb_data::command::command_keys(args)?;
        if let [key] = &keys[..]
            && let Some((kind, subs)) = capdb_data::point::elements(args)
            && let Some(reply) = self
                .exec_point(
                    keyspace,
                    entry,
                    args,
                    (key, kind as u8, subs),
                    level,
                    now_ms,
                    value_bytes_max,
                    write,
                )
                .await?
        {
            return Ok(reply);
        }
        let mut values = std::collections::HashMap::new();
        for k in keys {
            if values.contains_key(&k) {
                continue;
            }
            let shard = &entry.shards[shard_index(entry, &k)];
            let current = self.read_raw(keyspace, shard, &k, level).await?;
            values.insert(k, current);
        }
        let (t_reset, t_write) = (self.hlc.now(), self.hlc.now());
        let mut view = crate::view::View::new(self.me, t_reset, t_write, now_ms, values)?;
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: t_write,
            seed: t_write.0.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15,
            value_bytes_max,
        };
        let reply = capdb_data::execute(args, &mut view, &cx)?;
        if !write {
            return Ok(reply);
        }
        for (k, version) in view.into_writes(value_bytes_max)? {
            let shard = entry.shards[shard_index(entry, &k)].clone();
            self.write_versions(keyspace, &shard, vec![(k, version)], level)
                .await?;
        }
        Ok(reply)
    }

    /// [`Ap::exec`] of a command that names the elements it reads (`capdb_data::point`): reads
    /// only those of a big collection (plus its head and one visible element), runs the
    /// command over them, and replicates its writes. `None` when that is not enough: the
    /// replicas' answers do not settle what the key shows (they hold different first
    /// elements, another kind competes, the collection is small) or the command read past
    /// them; nothing was written then, and the caller runs the command over the whole state.
    #[allow(clippy::too_many_arguments)]
    async fn exec_point(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        entry: &KeyspaceEntry,
        args: &[Bytes],
        (key, kind, subs): (&Bytes, u8, Vec<Vec<u8>>),
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
        write: bool,
    ) -> Result<Option<Reply>> {
        let subs: Vec<Bytes> = subs.into_iter().map(Bytes::from).collect();
        let shard = &entry.shards[shard_index(entry, key)];
        // A failed part read (no level met, or a replica of an older version that does not
        // know the request) is left to the whole read, which answers what it can.
        let Ok(read) = self
            .read_part(keyspace, shard, key.clone(), kind, subs.clone(), level)
            .await
        else {
            self.point_reads.fallback.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        if let Some(v) = &read.value {
            self.hlc.observe(v.header.timestamp);
        }
        let whole = read.parts.iter().all(|(whole, _)| *whole);
        let mut loaded = None;
        if !whole {
            let state = match &read.value {
                Some(v) => capdb_types::composite::Composite::of(v)?,
                None => capdb_types::composite::Composite::default(),
            };
            if !partial_settles(&state, kind, &subs, &read.parts) {
                self.point_reads.fallback.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            // What every replica sent: the named elements and a common witness (a replica
            // that answered whole sent more, which the others' versions may not cover).
            let mut known: std::collections::BTreeSet<Bytes> = subs.into_iter().collect();
            if read.parts.windows(2).all(|w| w[0].1 == w[1].1) {
                known.extend(read.parts.first().and_then(|(_, w)| w.clone()));
            }
            loaded = Some(known);
        }
        let (t_reset, t_write) = (self.hlc.now(), self.hlc.now());
        let values = [(key.clone(), read.value)].into_iter().collect();
        let mut view = crate::view::View::new(self.me, t_reset, t_write, now_ms, values)?;
        if let Some(known) = loaded {
            view.restrict(key, known);
        }
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: t_write,
            seed: t_write.0.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15,
            value_bytes_max,
        };
        let reply = capdb_data::execute(args, &mut view, &cx);
        if view.missed() {
            self.point_reads.fallback.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if !whole {
            self.point_reads.partial.fetch_add(1, Ordering::Relaxed);
        }
        let reply = reply?;
        if write {
            for (k, version) in view.into_writes(value_bytes_max)? {
                self.write_versions(keyspace, shard, vec![(k, version)], level)
                    .await?;
            }
        }
        Ok(Some(reply))
    }

    /// The stored version of `key` read at `level` (merged across the replicas that answered),
    /// whatever its state; this node's clock moves past it, so that what it writes next is
    /// later.
    async fn read_raw(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        key: &Bytes,
        level: Level,
    ) -> Result<Option<Value>> {
        let v = self
            .read_versions(keyspace, shard, vec![key.clone()], level)
            .await?
            .pop()
            .flatten();
        if let Some(v) = &v {
            self.hlc.observe(v.header.timestamp);
        }
        Ok(v)
    }

    /// A read-only data-type command (GETRANGE, BITCOUNT, ...), read at `level`.
    pub async fn query(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        args: &[Bytes],
        level: Level,
        now_ms: u64,
    ) -> Result<Reply> {
        let entry = self.entry(keyspace)?;
        self.exec(keyspace, &entry, args, level, now_ms, usize::MAX, false)
            .await
    }

    /// The version a plain SET writes without reading (None for every other command).
    fn blind_version(&self, m: &Mutation, now_ms: u64) -> Option<Value> {
        use capdb_types::mutation::ExpiryUpdate;
        let Mutation::Set {
            value,
            condition: Condition::Always,
            expiry,
            return_old: false,
            ..
        } = m
        else {
            return None;
        };
        let expire = match expiry {
            ExpiryUpdate::Keep => return None,
            ExpiryUpdate::At(at) => Some(*at),
            ExpiryUpdate::Clear => None,
        };
        Some(match expire {
            Some(at) if at <= now_ms => Value::tombstone(self.hlc.now()),
            _ => Value::new(value.clone(), self.hlc.now(), expire),
        })
    }

    /// Writes the queued blind writes, shards in parallel, and fills in their replies.
    async fn flush_blind(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        entry: &KeyspaceEntry,
        pending: &mut BlindBatches,
        replies: &mut [Option<Result<Reply>>],
        level: Level,
    ) {
        if pending.is_empty() {
            return;
        }
        let batches = std::mem::take(pending);
        let calls = batches.into_iter().map(|(s, (idx, entries))| {
            let shard = entry.shards[s].clone();
            async move {
                let mut result = Ok(());
                for chunk in entries.chunks(MERGE_BATCH_KEYS) {
                    result = self
                        .write_versions(keyspace, &shard, chunk.to_vec(), level)
                        .await;
                    if result.is_err() {
                        break;
                    }
                }
                (idx, result)
            }
        });
        for (idx, result) in futures::future::join_all(calls).await {
            for i in idx {
                replies[i] = Some(result.clone().map(|()| Reply::Ok));
            }
        }
    }

    async fn apply_one(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        m: Mutation,
        level: Level,
        now_ms: u64,
        value_bytes_max: usize,
    ) -> Result<Reply> {
        let key = m.key().clone();
        match &m {
            Mutation::IncrBy { delta, .. } => {
                self.counter_add(keyspace, shard, key, *delta, level, now_ms)
                    .await
            }
            _ => {
                let raw = self.read_raw(keyspace, shard, &key, level).await?;
                let current = raw
                    .clone()
                    .filter(|v| v.is_live(now_ms))
                    .map(capdb_types::merge::render)
                    .transpose()?;
                let (t_reset, timestamp) = (self.hlc.now(), self.hlc.now());
                let (effect, reply) =
                    m.apply(current.as_ref(), now_ms, timestamp, value_bytes_max)?;
                let version = match effect {
                    Effect::Unchanged => return Ok(reply),
                    // EXPIRE or PERSIST of a key holding a collection: its TTL register.
                    Effect::Put(v) if !v.is_string() => {
                        let mut view = crate::view::View::new(
                            self.me,
                            t_reset,
                            timestamp,
                            now_ms,
                            [(key.clone(), raw)].into_iter().collect(),
                        )?;
                        view.set_ttl(&key, v.header.expire_at_ms)?;
                        match view.into_writes(usize::MAX)?.pop() {
                            Some((_, version)) => version,
                            None => return Ok(reply),
                        }
                    }
                    Effect::Put(v) => v,
                    Effect::Remove(ts) => Value::tombstone(ts),
                };
                self.write_versions(keyspace, shard, vec![(key, version)], level)
                    .await?;
                Ok(reply)
            }
        }
    }

    /// INCRBY: one replica (this node when it is one) adds to its own slot of the key's
    /// PN-counter, then the new version goes to the other replicas like any write.
    async fn counter_add(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard: &ShardInfo,
        key: Bytes,
        delta: i64,
        level: Level,
        now_ms: u64,
    ) -> Result<Reply> {
        // One owner only: a failed call may still have counted the increment there, so trying
        // another replica could count it twice. The caller sees an error with an unknown
        // outcome instead (like any write that times out).
        let mut order: Vec<NodeId> = shard.replicas.clone();
        order.sort_by_key(|&n| (n != self.me, n));
        let Some(owner) = order.into_iter().find(|&n| !self.detector.is_down(n)) else {
            return Err(Error::Unavailable(
                "no replica of the counter's shard is reachable; the increment was not applied"
                    .into(),
            ));
        };
        let timestamp = self.hlc.now();
        let req = ApRequest::CounterAdd {
            keyspace: keyspace.to_string(),
            key: key.clone(),
            delta,
            timestamp,
            now_ms,
        };
        match self.call(owner, req, REPLICA_TIMEOUT).await {
            Ok(ApResponse::Value(v)) => {
                let total = capdb_types::merge::render(v.clone())?;
                let total = capdb_types::mutation::parse_i64_strict(&total.data)
                    .ok_or(Error::NotAnInteger)?;
                // The owner already holds the new version: one acknowledgement.
                let others: Vec<NodeId> = shard
                    .replicas
                    .iter()
                    .copied()
                    .filter(|&n| n != owner)
                    .collect();
                let needed = level.required(shard.replicas.len()) - 1;
                if let Err(e) = self
                    .replicate(keyspace, others, vec![(key, v)], needed, level)
                    .await
                {
                    // Counted already: a retry would count it twice.
                    return Err(Error::OutcomeUnknown(format!(
                        "the increment was counted on node {owner} but did not reach the level {} ({e}); it will reach the other replicas later: do not retry it",
                        level.as_str()
                    )));
                }
                Ok(Reply::Integer(total))
            }
            Ok(other) => Err(Error::Io(format!("unexpected answer {other:?}"))),
            // A definite refusal (not an integer, overflow) is final.
            Err(CallError::Refused(
                e @ (Error::NotAnInteger | Error::Overflow | Error::WrongType),
            )) => Err(e),
            Err(e) => Err(Error::OutcomeUnknown(format!(
                "the increment's outcome is unknown ({e}); it may have been counted: read before retrying"
            ))),
        }
    }

    /// A page of live keys of one shard, from one replica (this node when it is one).
    #[allow(clippy::too_many_arguments)]
    pub async fn scan_shard(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        shard_index: usize,
        after: Option<Bytes>,
        prefix: Option<Bytes>,
        limit: u32,
        now_ms: u64,
    ) -> Result<(Vec<(Bytes, Value)>, Option<Bytes>)> {
        let entry = self.entry(keyspace)?;
        let shard = entry
            .shards
            .get(shard_index)
            .ok_or_else(|| Error::InvalidInput("scan position past the last shard".into()))?;
        let mut order = shard.replicas.clone();
        order.sort_by_key(|&n| (n != self.me, self.detector.is_down(n), n));
        let mut last_err = String::from("no replica reachable");
        for node in order {
            let req = ApRequest::Scan {
                keyspace: keyspace.to_string(),
                slots: shard.slots,
                after: after.clone(),
                prefix: prefix.clone(),
                limit,
                now_ms,
            };
            match self.call(node, req, REPLICA_TIMEOUT).await {
                Ok(ApResponse::Page(entries, next)) => return Ok((entries, next)),
                Ok(other) => last_err = format!("unexpected answer {other:?}"),
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(Error::Unavailable(format!(
            "no replica of shard {shard_index} answered the scan ({last_err})"
        )))
    }

    pub fn shard_count(&self, keyspace: &KeyspaceName) -> Result<usize> {
        Ok(self.entry(keyspace)?.shards.len())
    }

    /// Deletes every key (FLUSHDB): writes a tombstone for each live key, shard by shard.
    pub async fn clear(
        self: &Arc<Self>,
        keyspace: &KeyspaceName,
        level: Level,
        now_ms: u64,
    ) -> Result<()> {
        let entry = self.entry(keyspace)?;
        for (i, shard) in entry.shards.iter().enumerate() {
            let mut after = None;
            loop {
                let (page, next) = self
                    .scan_shard(keyspace, i, after.clone(), None, 1000, now_ms)
                    .await?;
                let ts = self.hlc.now();
                let entries: Vec<(Bytes, Value)> = page
                    .into_iter()
                    .map(|(k, _)| (k, Value::tombstone(ts)))
                    .collect();
                self.write_versions(keyspace, shard, entries, level).await?;
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Reconciliation statistics of this node, as JSON, with each local `ap` table's element
    /// records and queued reclaims (`storage`: counted on each call, a walk of the element
    /// table; diagnostics, not a hot path).
    pub fn stats_json(&self) -> serde_json::Value {
        let mut json = self.stats.to_json(&self.hints);
        let state = self.state();
        for (name, entry) in &state.keyspaces {
            if entry.spec.mode != capdb_types::Mode::Ap {
                continue;
            }
            let Ok((elements, queued)) = self.table(name.as_str()).ap_element_stats() else {
                continue;
            };
            json["keyspaces"][name.as_str()]["storage"] = serde_json::json!({
                "element_records": elements,
                "reclaim_queued": queued,
            });
        }
        json["point_reads"] = serde_json::json!({
            "partial": self.point_reads.partial.load(Ordering::Relaxed),
            "fallback": self.point_reads.fallback.load(Ordering::Relaxed),
        });
        json
    }
}

/// Whether a partial read merged into `state` settles what the key shows, so a point command
/// can run over it (see `capdb_storage::disk::DiskTable::ap_get_part`): the head holds only
/// a big collection of `kind`, and its emptiness is known from elements every replica sent:
///
/// - a named element visible once merged (every replica sent its version of it): not empty;
/// - no replica saw any visible element: merging invisible versions shows none (LWW removals
///   stay removed, a set's merged adds never outrun its merged removals): empty;
/// - every replica named the same witness and it is still visible once merged: not empty.
///
/// Otherwise (replicas showing different first elements, removals crossing) the collection
/// is read whole.
fn partial_settles(
    state: &capdb_types::composite::Composite,
    kind: u8,
    subs: &[Bytes],
    parts: &[crate::replicate::Part],
) -> bool {
    if !capdb_storage::disk::partial_fits(state, kind) {
        return false;
    }
    let visible = |sub: &Bytes| {
        state
            .colls
            .get(&kind)
            .and_then(|c| c.entries.get(sub))
            .is_some_and(|e| e.visible(kind))
    };
    if subs.iter().any(visible) || parts.iter().all(|(_, w)| w.is_none()) {
        return true;
    }
    let agree = parts.windows(2).all(|w| w[0].1 == w[1].1);
    agree
        && parts
            .first()
            .and_then(|(_, w)| w.as_ref())
            .is_some_and(visible)
}

/// Blind writes waiting to go out: per shard index, the positions of their commands in the
/// batch and the versions.
type BlindBatches = BTreeMap<usize, (Vec<usize>, Vec<(Bytes, Value)>)>;

#[cfg(test)]
mod point_reads {
    use bytes::Bytes;
    use capdb_types::composite::{CollState, Composite, Entry};
    use capdb_types::{Timestamp, ValueKind};

    use super::partial_settles;

    const HASH: u8 = ValueKind::Hash as u8;

    /// A big hash's merged partial state holding `fields` (name, visible).
    fn state(fields: &[(&str, bool)]) -> Composite {
        let mut c = CollState {
            created: Timestamp(1),
            big: Timestamp(1),
            ..CollState::default()
        };
        for (f, visible) in fields {
            c.entries.insert(
                Bytes::copy_from_slice(f.as_bytes()),
                Entry {
                    ts: Timestamp(5),
                    origin: 1,
                    value: visible.then(|| Bytes::from_static(b"v")),
                    ..Entry::default()
                },
            );
        }
        let mut s = Composite::default();
        s.colls.insert(HASH, c);
        s
    }

    fn part(witness: Option<&str>) -> (bool, Option<Bytes>) {
        (false, witness.map(|w| Bytes::copy_from_slice(w.as_bytes())))
    }

    fn named(n: &[&str]) -> Vec<Bytes> {
        n.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn a_partial_read_settles_emptiness_only_from_elements_every_replica_sent() {
        // A named field visible once merged: not empty, whatever the witnesses say.
        let s = state(&[("a", true), ("w1", true)]);
        assert!(partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("a")), part(Some("w1"))]
        ));
        // No replica saw anything visible: empty.
        let s = state(&[("a", false)]);
        assert!(partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(None), part(None)]
        ));
        // One common witness, still visible merged: not empty.
        let s = state(&[("a", false), ("w", true)]);
        assert!(partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("w")), part(Some("w"))]
        ));
        // Different witnesses: each was read on one replica only.
        let s = state(&[("a", false), ("w1", true), ("w2", true)]);
        assert!(!partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("w1")), part(Some("w2"))]
        ));
        // A witness on one side, none on the other.
        let s = state(&[("a", false), ("w", true)]);
        assert!(!partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("w")), part(None)]
        ));
        // The common witness hidden once merged (removals crossing): unknown.
        let s = state(&[("a", false), ("w", false)]);
        assert!(!partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("w")), part(Some("w"))]
        ));
        // A small hash (not big): whole.
        let mut s = state(&[("a", true)]);
        s.colls.get_mut(&HASH).unwrap().big = Timestamp::ZERO;
        assert!(!partial_settles(
            &s,
            HASH,
            &named(&["a"]),
            &[part(Some("a"))]
        ));
    }
}
