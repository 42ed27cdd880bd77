//! Incremental views (issue 15, `docs/design/mapreduce.md` §10): creating, reading,
//! dropping and verifying them across a keyspace's shards, and the background work that
//! builds and purges them. The rows themselves are kept by each shard's apply
//! (`capdb_storage::disk` `views.rs`; why and how: `capdb_types::views`).
//!
//! # The catalog is the shards' own definitions
//!
//! `VIEW CREATE` proposes the definition to every shard of the keyspace, one after another;
//! each shard's log decides (the same spec again is found, another refused), so a create
//! interrupted part-way is completed by repeating it, and there is no second place whose
//! state could disagree with the shards'. A read asks every shard and refuses to answer
//! (`-VIEWINCOMPLETE`) when a shard lacks the view or holds another spec under its name:
//! never a silently partial answer. A shard still building answers `complete: false`.
//!
//! # Background work
//!
//! Every [`VIEW_WORK_PERIOD`] each node looks, on the shards it leads (a local read), for
//! views being built and dropped generations with rows left, and proposes the next
//! `Backfill` (≤ 1,024 keys each, applied on every replica) or `Purge` step. A step carries
//! the cursor it continues from, so a leader change or a repeated proposal changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_reduce::extract::Scalar;
use capdb_reduce::num::Fixed;
use capdb_reduce::{JobSpec, Plan};
use capdb_storage::disk::{VIEWS_QUERY, ViewCounts, ViewRow};
use capdb_types::keyspace::Mode;
use capdb_types::views::{VIEWS_MAX, ViewCommand, ViewDef, ViewState, name_is_valid};
use capdb_types::{Error, ReadMode, Reply, Result};
use serde_json::{Map, Value};

use super::Node;

/// How often a node looks for views to build or purge on the shards it leads.
pub const VIEW_WORK_PERIOD: Duration = Duration::from_millis(500);
/// The least pause after each round of steps (one per view and shard being built or
/// purged; the pause is at least three times the round): a build goes at most 1,024 keys
/// per pause per shard (about 200,000 keys/s), and takes at most a quarter of the time.
pub const STEP_PAUSE: Duration = Duration::from_millis(5);
/// The pause after a round in which an async view moved (it may have more to read at
/// once): how far its lag can grow between rounds under a steady write load.
pub const ASYNC_PAUSE: Duration = Duration::from_millis(20);
/// The longest wait before a failed step is tried again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Groups one `VIEW GET` answers at most (a page; `AFTER` reads on).
pub const GET_COUNT_MAX: usize = 10_000;

/// What `VIEW GET` answers.
#[derive(Debug, Clone)]
pub struct ViewRead {
    /// Rows as a job's result rows: `{"group": …, "<reducer>": …}`, ordered by group within
    /// the page; pages follow the byte order of the groups' encoding (`next`), so each group
    /// is on exactly one page, but a later page may hold a smaller number.
    pub rows: Vec<Value>,
    /// Every shard is ready (the rows count every key).
    pub complete: bool,
    pub shards_ready: usize,
    pub shards_total: usize,
    pub keys: i64,
    pub skipped: i64,
    pub rounded: i64,
    /// Where the next page starts (`AFTER`); `None`: this was the last.
    pub next: Option<Bytes>,
}

/// One shard's `VIEW VERIFY` answer, summed.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub drift: i64,
    pub groups_checked: i64,
    /// `shard group: view … recomputed …`, at most 100 per shard.
    pub examples: Vec<String>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn incomplete(name: &[u8], why: impl std::fmt::Display) -> Error {
    Error::Command(format!(
        "VIEWINCOMPLETE view '{}' {why} (VIEW CREATE it again with the same spec, or VIEW DROP it)",
        text(name)
    ))
}

/// The canonical spec of a view of keyspace `ks` from what a client gave: `input.keyspace`
/// defaults to `ks` and `input.expired` to `include` (what a view counts).
pub fn view_spec(ks: &str, json: &[u8]) -> Result<String> {
    let bad = |why: String| Error::Command(format!("ERR view spec: {why}"));
    let mut v: Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("spec: not JSON: {e}")))?;
    let top = v
        .as_object_mut()
        .ok_or_else(|| bad("spec: must be an object".into()))?;
    let input = top
        .entry("input")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| bad("input: must be an object".into()))?;
    match input.get("keyspace") {
        None | Some(Value::Null) => {
            input.insert("keyspace".into(), Value::String(ks.to_string()));
        }
        Some(Value::String(k)) if k == ks => {}
        Some(other) => {
            return Err(bad(format!(
                "input.keyspace: {other} is not '{ks}', the keyspace the view is created in"
            )));
        }
    }
    input
        .entry("expired")
        .or_insert_with(|| Value::String("include".into()));
    let spec = JobSpec::from_json(&v).map_err(|e| bad(e.to_string()))?;
    spec.check_view().map_err(|e| bad(e.to_string()))?;
    Ok(spec.canonical().to_string())
}

/// A group as `VIEW GET … GROUP` names it: JSON (a string needs no quotes unless it would
/// read as something else), an array for a group of several parts.
pub fn group_bytes(plan: &Plan, arg: &[u8]) -> Result<Vec<u8>> {
    let parts = plan.spec().group.len();
    let value: Value = serde_json::from_slice(arg).unwrap_or_else(|_| Value::String(text(arg)));
    let values = match (parts, value) {
        (0, _) => Vec::new(),
        (1, v) => vec![v],
        (n, Value::Array(vs)) if vs.len() == n => vs,
        (n, _) => {
            return Err(Error::Command(format!(
                "ERR the view's group has {n} parts: name one as a JSON array of {n}"
            )));
        }
    };
    let mut out = Vec::new();
    for v in values {
        let s = match v {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(b),
            Value::Number(n) => Scalar::Num(
                Fixed::parse(n.to_string().as_bytes())
                    .map_err(|e| Error::Command(format!("ERR group {n}: {e}")))?
                    .value,
            ),
            Value::String(s) => Scalar::Str(s.into_bytes()),
            other => {
                return Err(Error::Command(format!(
                    "ERR a group part is a string, number, boolean or null, not {other}"
                )));
            }
        };
        s.encode(&mut out);
    }
    Ok(out)
}

impl Node {
    /// The `cp` keyspace a view lives in, and its shards' Raft groups.
    fn view_keyspace(&self, ks: &str) -> Result<Vec<capdb_cluster::GroupId>> {
        let keyspace = self.keyspace(ks)?;
        if keyspace.spec.mode != Mode::Cp {
            return Err(Error::Command(format!(
                "ERR views are kept in cp keyspaces; '{ks}' is {}",
                keyspace.spec.mode.as_str()
            )));
        }
        Ok(keyspace.shard_groups())
    }

    async fn view_command(&self, group: capdb_cluster::GroupId, cmd: ViewCommand) -> Result<Reply> {
        self.groups.view(group, cmd).await?
    }

    async fn views_query(&self, group: capdb_cluster::GroupId, args: &[&[u8]]) -> Result<Reply> {
        let mut a = vec![Bytes::from_static(VIEWS_QUERY.as_bytes())];
        a.extend(args.iter().map(|x| Bytes::copy_from_slice(x)));
        self.groups
            .query(
                group,
                a,
                ReadMode::Linearizable,
                capdb_types::unix_now_ms(),
                0,
            )
            .await
    }

    /// Defines view `name` on every shard of `ks`: `(generation, created)`; `created` is
    /// false when every shard already had it with this spec. Safe to repeat after `TRYAGAIN` or `UNCERTAIN` (it
    /// completes what was done); a refusal changes no shard (checked on all first) unless a
    /// concurrent create or drop raced it (`VIEWINCOMPLETE` says which shards took it).
    pub async fn view_create(&self, ks: &str, name: &[u8], json: &[u8]) -> Result<(u64, bool)> {
        if !name_is_valid(name) {
            return Err(Error::Command(
                "ERR a view name is 1 to 64 of A-Z a-z 0-9 _ -".into(),
            ));
        }
        let json = &self.resolve_lua_library(json).await?;
        let spec = view_spec(ks, json)?;
        let groups = self.view_keyspace(ks)?;
        // What every shard would refuse, refused before any shard is changed.
        let defs = self.view_defs(ks).await?;
        if let Some((_, shards)) = defs.iter().find(|(n, _)| n == name)
            && shards.iter().any(|(_, d)| d.spec != spec)
        {
            return Err(Error::Command(format!(
                "ERR view '{}' exists with another spec (VIEW DROP it first)",
                text(name)
            )));
        }
        if !defs.iter().any(|(n, _)| n == name) && defs.len() >= VIEWS_MAX {
            return Err(Error::Command(format!(
                "ERR at most {VIEWS_MAX} views per keyspace (VIEW DROP one)"
            )));
        }
        // A Lua view is kept from the change log, with each event's previous value: turned
        // on first (safe to repeat; CHANGES CONFIG can turn it off again, which stops it).
        if JobSpec::parse(spec.as_bytes())
            .map_err(|e| Error::Corruption(format!("a view spec: {e}")))?
            .lua
            .is_some()
        {
            self.keyspace(ks)?
                .changes_config(true, None, None, Some(true))
                .await?;
        }
        // The first shard's generation is every shard's (a new one: this node's clock).
        let mut generation = capdb_types::unix_now_ms();
        let mut created = false;
        for (i, g) in groups.iter().enumerate() {
            let define = ViewCommand::Define {
                name: Bytes::copy_from_slice(name),
                generation,
                spec: spec.clone(),
            };
            let reply = match self.groups.view(*g, define).await? {
                Ok(r) => r,
                // Refused here after earlier shards took it (a race with another create or
                // a drop): say what holds now, not a plain error that means "nothing".
                Err(e) if i > 0 => {
                    let why = match &e {
                        Error::Command(line) => line.clone(),
                        other => other.to_string(),
                    };
                    return Err(incomplete(
                        name,
                        format!(
                            "was defined on shards 0 to {} but shard {i} refused: {why}",
                            i - 1
                        ),
                    ));
                }
                Err(e) => return Err(e),
            };
            match reply {
                Reply::Array(v) => match &v[..] {
                    [Reply::Integer(gen_here), Reply::Bulk(what)] => {
                        generation = *gen_here as u64;
                        created |= &what[..] == b"created";
                    }
                    _ => return Err(Error::Io(format!("unexpected view answer {v:?}"))),
                },
                other => return Err(Error::Io(format!("unexpected view answer {other:?}"))),
            }
        }
        Ok((generation, created))
    }

    /// Drops view `name` from every shard of `ks` (its rows go in the background): whether
    /// some shard had it.
    pub async fn view_drop(&self, ks: &str, name: &[u8]) -> Result<bool> {
        let mut had = false;
        for g in self.view_keyspace(ks)? {
            let reply = self
                .view_command(
                    g,
                    ViewCommand::Drop {
                        name: Bytes::copy_from_slice(name),
                    },
                )
                .await?;
            had |= reply == Reply::Integer(1);
        }
        Ok(had)
    }

    /// Every shard's definition of each view of `ks`: `name → [(shard, def)]`.
    pub async fn view_defs(&self, ks: &str) -> Result<Vec<(Bytes, Vec<(usize, ViewDef)>)>> {
        let mut out: Vec<(Bytes, Vec<(usize, ViewDef)>)> = Vec::new();
        for (shard, g) in self.view_keyspace(ks)?.into_iter().enumerate() {
            let Reply::Array(rows) = self.views_query(g, &[b"defs"]).await? else {
                return Err(Error::Io("a views query answered no array".into()));
            };
            for r in rows {
                let Reply::Array(v) = r else { continue };
                let [Reply::Bulk(name), Reply::Bulk(def)] = &v[..] else {
                    continue;
                };
                let def: ViewDef = postcard::from_bytes(def)
                    .map_err(|e| Error::Corruption(format!("a view definition: {e}")))?;
                match out.iter_mut().find(|(n, _)| n == name) {
                    Some((_, defs)) => defs.push((shard, def)),
                    None => out.push((name.clone(), vec![(shard, def)])),
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Reads view `name` of `ks`: the given `groups`, or a page of `count` groups after
    /// `after` (empty: from the first), merged across shards.
    pub async fn view_get(
        &self,
        ks: &str,
        name: &[u8],
        groups: &[Bytes],
        after: &[u8],
        count: usize,
    ) -> Result<ViewRead> {
        let shards = self.view_keyspace(ks)?;
        let count = count.clamp(1, GET_COUNT_MAX);
        // A group named twice is read once (merging it twice would count it twice).
        let mut unique: Vec<Bytes> = Vec::with_capacity(groups.len());
        for g in groups {
            if !unique.contains(g) {
                unique.push(g.clone());
            }
            if unique.len() > GET_COUNT_MAX {
                break;
            }
        }
        let groups = &unique[..];
        if groups.len() > GET_COUNT_MAX {
            return Err(Error::Command(format!(
                "ERR at most {GET_COUNT_MAX} groups per VIEW GET"
            )));
        }
        if shards.is_empty() {
            return Err(Error::Command(format!("ERR keyspace '{ks}' has no shards")));
        }
        let mut plan: Option<(String, Plan)> = None;
        let mut merged = None;
        let mut read = ViewRead {
            rows: Vec::new(),
            complete: true,
            shards_ready: 0,
            shards_total: shards.len(),
            keys: 0,
            skipped: 0,
            rounded: 0,
            next: None,
        };
        // The smallest last group of a shard that filled its page: groups past it may be
        // on that shard's next page, so the merged page ends there.
        let mut cut: Option<Vec<u8>> = None;
        // Groups asked for are encoded as the view's spec says (read from the first shard).
        let encoded: Option<Vec<Bytes>> = if groups.is_empty() {
            None
        } else {
            let Reply::Array(parts) = self
                .views_query(shards[0], &[b"groups", name, b"0"])
                .await?
            else {
                return Err(Error::Io("a views query answered no array".into()));
            };
            let Some(Reply::Bulk(def)) = parts.first() else {
                return Err(Error::Command(format!(
                    "NOVIEW no view '{}' in '{ks}'",
                    text(name)
                )));
            };
            let def: ViewDef = postcard::from_bytes(def)
                .map_err(|e| Error::Corruption(format!("a view definition: {e}")))?;
            let p = Plan::new(
                JobSpec::parse(def.spec.as_bytes())
                    .map_err(|e| Error::Corruption(format!("a view spec: {e}")))?,
            )
            .map_err(|e| Error::Corruption(format!("a view spec: {e}")))?;
            Some(
                groups
                    .iter()
                    .map(|a| group_bytes(&p, a).map(Bytes::from))
                    .collect::<Result<Vec<_>>>()
                    .map(|mut gs| {
                        // `5` and `"5"`... may name one group twice once encoded.
                        gs.sort();
                        gs.dedup();
                        gs
                    })?,
            )
        };
        let mut shard_rows = Vec::with_capacity(shards.len());
        for g in &shards {
            let reply = match &encoded {
                Some(gs) => {
                    let mut args: Vec<&[u8]> = vec![b"groups", name, b"0"];
                    args.extend(gs.iter().map(|b| &b[..]));
                    self.views_query(*g, &args).await?
                }
                None => {
                    let count = count.to_string();
                    self.views_query(*g, &[b"rows", name, b"0", after, count.as_bytes()])
                        .await?
                }
            };
            let Reply::Array(parts) = reply else {
                return Err(Error::Io("a views query answered no array".into()));
            };
            let def: ViewDef = match parts.first() {
                Some(Reply::Bulk(def)) => postcard::from_bytes(def)
                    .map_err(|e| Error::Corruption(format!("a view definition: {e}")))?,
                _ => {
                    return Err(if g == &shards[0] {
                        Error::Command(format!("NOVIEW no view '{}' in '{ks}'", text(name)))
                    } else {
                        incomplete(name, "is missing on a shard")
                    });
                }
            };
            match &plan {
                Some((spec, _)) if *spec != def.spec => {
                    return Err(incomplete(name, "has another spec on a shard"));
                }
                Some(_) => {}
                None => {
                    let spec = JobSpec::parse(def.spec.as_bytes())
                        .map_err(|e| Error::Corruption(format!("a view spec: {e}")))?;
                    let p = Plan::new(spec)
                        .map_err(|e| Error::Corruption(format!("a view spec: {e}")))?;
                    merged = Some(p.partial());
                    plan = Some((def.spec.clone(), p));
                }
            }
            match &def.state {
                ViewState::Ready => read.shards_ready += 1,
                ViewState::Building { .. } => read.complete = false,
                ViewState::Overflow { why } => {
                    return Err(Error::Command(format!(
                        "VIEWOVERFLOW view '{}' is no longer kept: {why} (VIEW DROP it)",
                        text(name)
                    )));
                }
            }
            if let Some(Reply::Bulk(c)) = parts.get(1) {
                let c: ViewCounts = postcard::from_bytes(c)
                    .map_err(|e| Error::Corruption(format!("a view's counts: {e}")))?;
                read.keys += c.keys;
                read.skipped += c.skipped;
                read.rounded += c.rounded;
            }
            let Some(Reply::Array(rows)) = parts.get(2) else {
                return Err(Error::Io("a views query answered no rows".into()));
            };
            if groups.is_empty()
                && rows.len() >= count
                && let Some(Reply::Array(last)) = rows.last()
                && let Some(Reply::Bulk(gb)) = last.first()
                && cut.as_ref().is_none_or(|c| gb[..] < c[..])
            {
                cut = Some(gb.to_vec());
            }
            shard_rows.push(rows.clone());
        }
        let (Some((_, plan)), Some(mut merged)) = (plan, merged) else {
            return Err(Error::Io("no shard answered the view".into()));
        };
        // The page: the first `count` groups (in the byte order of their encoding, the
        // order shards page in) of those no shard's next page can come before.
        let mut page: Vec<Vec<u8>> = shard_rows
            .iter()
            .flatten()
            .filter_map(|r| match r {
                Reply::Array(gr) => match gr.first() {
                    Some(Reply::Bulk(g)) => Some(g.to_vec()),
                    _ => None,
                },
                _ => None,
            })
            .filter(|g| cut.as_ref().is_none_or(|c| g <= c))
            .collect();
        page.sort();
        page.dedup();
        let more = cut.is_some() || page.len() > count;
        page.truncate(count);
        let last = page.last().cloned();
        for rows in shard_rows {
            for r in rows {
                let Reply::Array(gr) = r else { continue };
                let [Reply::Bulk(group), Reply::Bulk(row)] = &gr[..] else {
                    continue;
                };
                if last.as_ref().is_some_and(|l| group[..] > l[..]) {
                    continue;
                }
                let row: ViewRow = postcard::from_bytes(row)
                    .map_err(|e| Error::Corruption(format!("a view row: {e}")))?;
                let mut one = plan.partial();
                one.insert_group(group.to_vec(), row.accs);
                plan.merge(&mut merged, &one).map_err(|e| match e {
                    capdb_reduce::JobError::Corrupt(why) => Error::Corruption(why),
                    other => Error::Command(format!("ERR {other}")),
                })?;
            }
        }
        read.next = if more { last.map(Bytes::from) } else { None };
        read.rows = plan
            .rows(&merged)
            .map_err(|e| Error::Command(format!("ERR {e}")))?;
        Ok(read)
    }

    /// Recomputes view `name` on every shard from the same snapshot as its rows.
    pub async fn view_verify(&self, ks: &str, name: &[u8]) -> Result<Verified> {
        let mut out = Verified::default();
        // A Lua view is recomputed by this node (storage runs no Lua).
        let lua_spec = self
            .view_defs(ks)
            .await?
            .into_iter()
            .find(|(n, _)| &n[..] == name)
            .and_then(|(_, shards)| shards.first().map(|(_, d)| d.spec.clone()))
            .filter(|spec| JobSpec::parse(spec.as_bytes()).is_ok_and(|s| s.lua.is_some()));
        for (shard, g) in self.view_keyspace(ks)?.into_iter().enumerate() {
            let reply = match &lua_spec {
                Some(spec) => self.view_verify_async(g, name, spec).await?,
                None => self.views_query(g, &[b"verify", name]).await?,
            };
            let Reply::Array(v) = reply else {
                return Err(Error::Io("a verify query answered no array".into()));
            };
            let [
                Reply::Integer(drift),
                Reply::Integer(checked),
                Reply::Array(examples),
            ] = &v[..]
            else {
                return Err(Error::Io("a verify query answered no drift".into()));
            };
            out.drift += drift;
            out.groups_checked += checked;
            for e in examples {
                let line = match e {
                    Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                };
                out.examples.push(format!("shard {shard}: {line}"));
            }
        }
        Ok(out)
    }
}

/// Builds and purges the views of the shards this node leads, forever (see the module doc).
pub async fn view_work(node: Arc<Node>) {
    // A step that failed (no quorum, refused) waits before it is tried again, longer each
    // time, so that one stuck shard neither costs an entry every few ms nor slows the others.
    let mut backoff: std::collections::HashMap<
        (capdb_cluster::GroupId, Bytes),
        (Instant, Duration),
    > = std::collections::HashMap::new();
    loop {
        if node.is_shutting_down() {
            return;
        }
        // Read from the shards each time: a step's successor is in the stored cursor, and a
        // shard whose leadership moved drops out here.
        let now = Instant::now();
        // Async (Lua) views: a round each (`view_update.rs`), with the same backoff.
        let mut moved = false;
        for (group, name) in node.groups.views_async_led() {
            let key = (group, name.clone());
            if backoff.get(&key).is_some_and(|(until, _)| *until > now) {
                continue;
            }
            match super::view_update::advance(&node, group, &name).await {
                Ok(m) => {
                    moved |= m;
                    backoff.remove(&key);
                }
                Err(e) => {
                    tracing::debug!(group, error = %e, "async view update not applied");
                    let wait = backoff
                        .get(&key)
                        .map_or(VIEW_WORK_PERIOD, |(_, d)| (*d * 2).min(BACKOFF_MAX));
                    backoff.insert(key, (Instant::now() + wait, wait));
                }
            }
        }
        let work: Vec<_> = node
            .groups
            .views_work_led()
            .into_iter()
            .filter(|(g, cmd)| {
                backoff
                    .get(&(*g, cmd.name().clone()))
                    .is_none_or(|(until, _)| *until <= now)
            })
            .collect();
        if work.is_empty() {
            // An async view that moved may have more to read: soon again, else a period.
            let pause = if moved { ASYNC_PAUSE } else { VIEW_WORK_PERIOD };
            tokio::time::sleep(pause).await;
            continue;
        }
        // One step per view and shard, then a pause of at least three times what the
        // successful steps took: the writes the shards serve come first (a step is 1,024 keys
        // or rows in one storage transaction, on every replica, and the writer is the node's).
        let mut busy = Duration::ZERO;
        for (group, cmd) in work {
            let key = (group, cmd.name().clone());
            let started = Instant::now();
            let failed = match node.groups.view(group, cmd).await {
                Ok(Ok(_)) => false,
                Ok(Err(e)) => {
                    tracing::debug!(group, error = %e, "view step refused");
                    true
                }
                Err(e) => {
                    tracing::debug!(group, error = %e, "view step not applied");
                    true
                }
            };
            if failed {
                let wait = backoff
                    .get(&key)
                    .map_or(VIEW_WORK_PERIOD, |(_, d)| (*d * 2).min(BACKOFF_MAX));
                backoff.insert(key, (Instant::now() + wait, wait));
            } else {
                backoff.remove(&key);
                busy += started.elapsed();
            }
        }
        // Bounded: an entry goes one wait after its wait is over (a step retried then that
        // fails again doubles it; a view that no longer needs work leaves no entry).
        let now = Instant::now();
        backoff.retain(|_, (until, wait)| *until + *wait > now);
        tokio::time::sleep(STEP_PAUSE.max(busy * 3)).await;
    }
}
