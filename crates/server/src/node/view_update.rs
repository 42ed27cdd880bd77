//! Async (Lua) views' updater, catch-up reads and verification (issue 15,
//! `docs/design/mapreduce.md` §10.3; the replicated side: `capdb_types::views`).
//!
//! # Why here, and why it cannot count twice
//!
//! A Lua map cannot run inside the apply (user code on every replica's write path), so the
//! node that leads a shard keeps the shard's Lua views from its change log: each round it
//! reads, from one snapshot of its replica (`capdb.views async`), where the view stands, the
//! events after its position with each key's value before and after, and while the view
//! builds the next keys; maps them on the Lua thread; and proposes
//! [`ViewCommand::Advance`] from where the view stood to where it goes. The apply takes it
//! only if the view still stands exactly there, so a repeated proposal, a stale leader's or
//! two nodes racing after a leader change count nothing twice, and a proposal lost with a
//! leader is computed again by the next one.
//!
//! # The Lua thread
//!
//! `mlua`'s VMs are not `Send`: one thread per process holds them ([`LUA_VMS_MAX`] of them,
//! one per view spec, least recently used first out) and maps one batch at a time; a batch
//! waits in a queue of [`LUA_QUEUE_MAX`]. The sandbox and budgets are the jobs' (`capdb_jobs::lua`).
//! A map that fails on a key (an error, the instruction or wall budget, the memory cap)
//! stops the view: it turns `overflow` with the key and the error, which reads report
//! (`VIEWOVERFLOW`); VIEW DROP and CREATE with a fixed map are the way out.

use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capdb_jobs::lua::LuaMapper;
use capdb_reduce::JobSpec;
use capdb_storage::disk::{VIEWS_QUERY, ViewDelta, ViewDeltaBuilder};
use capdb_types::views::{ADVANCE_DELTA_BYTES_MAX, AsyncAt, ViewCommand, ViewState};
use capdb_types::{Error, ReadMode, Reply, Result};

use super::Node;

/// Lua VMs the thread keeps (a view spec each).
pub const LUA_VMS_MAX: usize = 32;
/// Batches waiting for the Lua thread; past it a round waits for a slot.
pub const LUA_QUEUE_MAX: usize = 64;
/// How often a `FRESH` read looks again whether a view caught up.
const FRESH_POLL: Duration = Duration::from_millis(20);
/// The longest `FRESH` wait a read may ask for.
pub const FRESH_MAX: Duration = Duration::from_secs(60);

/// One key's change as the view counts it: what it held before and after (strings).
type KeyChange = (Bytes, Option<Bytes>, Option<Bytes>);

struct Batch {
    spec: String,
    changes: Vec<KeyChange>,
    reply: tokio::sync::oneshot::Sender<std::result::Result<ViewDelta, String>>,
}

fn lua_thread() -> &'static SyncSender<Batch> {
    static LUA: OnceLock<SyncSender<Batch>> = OnceLock::new();
    LUA.get_or_init(|| {
        let (tx, rx) = sync_channel::<Batch>(LUA_QUEUE_MAX);
        // The thread lives as long as the process (its queue's sender is static).
        let spawned = std::thread::Builder::new()
            .name("capdb-view-lua".into())
            .spawn(move || {
                let mut vms: Vec<(String, LuaMapper)> = Vec::new();
                while let Ok(b) = rx.recv() {
                    let out = map_batch(&mut vms, &b.spec, &b.changes);
                    let _ = b.reply.send(out);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the Lua views thread: Lua views stay behind");
        }
        tx
    })
}

/// Maps one batch with the view's VM (made and kept when missing).
fn map_batch(
    vms: &mut Vec<(String, LuaMapper)>,
    spec: &str,
    changes: &[KeyChange],
) -> std::result::Result<ViewDelta, String> {
    let i = match vms.iter().position(|(s, _)| s == spec) {
        Some(i) => i,
        None => {
            let parsed = JobSpec::parse(spec.as_bytes()).map_err(|e| e.to_string())?;
            let map = parsed.lua.as_ref().ok_or("not a Lua view")?;
            let mapper = LuaMapper::new(map, parsed.values.keys().cloned().collect())?;
            if vms.len() >= LUA_VMS_MAX {
                vms.remove(0);
            }
            vms.push((spec.to_string(), mapper));
            vms.len() - 1
        }
    };
    // Most recently used last.
    let entry = vms.remove(i);
    vms.push(entry);
    let mapper = &mut vms.last_mut().ok_or("no VM")?.1;
    let mut delta = ViewDeltaBuilder::new(spec).map_err(|e| e.to_string())?;
    let at = |key: &[u8], e: String| format!("key {:?}: {e}", String::from_utf8_lossy(key));
    for (key, before, after) in changes {
        for (value, sign) in [(before, -1), (after, 1)] {
            if let Some(v) = value {
                let emits = mapper.call(key, v).map_err(|e| at(key, e))?;
                delta
                    .key(&emits, sign)
                    .map_err(|e| at(key, e.to_string()))?;
            }
        }
    }
    Ok(delta.finish())
}

fn bad(what: &str) -> Error {
    Error::Io(format!("unexpected answer to a views query ({what})"))
}

fn at_of(r: Option<&Reply>) -> Result<AsyncAt> {
    match r {
        Some(Reply::Bulk(b)) => {
            postcard::from_bytes(b).map_err(|e| Error::Corruption(format!("a view's place: {e}")))
        }
        _ => Err(bad("place")),
    }
}

/// The key changes of an `async` answer's list (`[[key, before|nil, after|nil], ...]`), or
/// its page (`[[key, value], ...]`, each an addition).
fn key_changes(r: Option<&Reply>) -> Result<Vec<KeyChange>> {
    let Some(Reply::Array(rows)) = r else {
        return Err(bad("changes"));
    };
    let opt = |r: &Reply| match r {
        Reply::Bulk(b) => Some(b.clone()),
        _ => None,
    };
    rows.iter()
        .map(|row| match row {
            Reply::Array(v) => match &v[..] {
                [Reply::Bulk(k), before, after] => Ok((k.clone(), opt(before), opt(after))),
                [Reply::Bulk(k), Reply::Bulk(value)] => Ok((k.clone(), None, Some(value.clone()))),
                _ => Err(bad("change")),
            },
            _ => Err(bad("change")),
        })
        .collect()
}

/// Maps `changes` for a view of `spec` on the Lua thread.
async fn map(
    spec: &str,
    changes: Vec<KeyChange>,
) -> Result<std::result::Result<ViewDelta, String>> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    let batch = Batch {
        spec: spec.to_string(),
        changes,
        reply,
    };
    let tx = lua_thread().clone();
    tokio::task::spawn_blocking(move || tx.send(batch))
        .await
        .map_err(|e| Error::Io(format!("the Lua views thread: {e}")))?
        .map_err(|_| Error::Io("the Lua views thread stopped".into()))?;
    rx.await
        .map_err(|_| Error::Io("the Lua views thread dropped a batch".into()))
}

/// One round of view `name` on shard group `g`, which this node leads: reads, maps and
/// proposes the next [`ViewCommand::Advance`]. `Ok(true)`: it moved; `Ok(false)`: nothing
/// was due.
pub(super) async fn advance(node: &Node, g: capdb_cluster::GroupId, name: &Bytes) -> Result<bool> {
    let args = [
        Bytes::from_static(VIEWS_QUERY.as_bytes()),
        Bytes::from_static(b"async"),
        name.clone(),
    ];
    let Reply::Array(parts) = node.groups.query_replica(g, &args)? else {
        return Err(bad("async"));
    };
    let from = at_of(parts.get(1))?;
    let (to, delta) = match parts.first() {
        Some(Reply::Bulk(kind)) if &kind[..] == b"ok" => {
            let mut to = at_of(parts.get(2))?;
            let mut changes = key_changes(parts.get(3))?;
            changes.extend(key_changes(parts.get(4))?);
            if changes.is_empty() && to == from {
                return Ok(false);
            }
            let spec = node_spec(node, g, name)?;
            let delta = match map(&spec, changes).await? {
                Ok(d) => {
                    let bytes = d.encode()?;
                    if bytes.len() > ADVANCE_DELTA_BYTES_MAX {
                        to.state = ViewState::Overflow {
                            why: format!(
                                "one update's rows took {} bytes, over {ADVANCE_DELTA_BYTES_MAX} (a map emitting that much per key is no view)",
                                bytes.len()
                            ),
                        };
                        Bytes::new()
                    } else {
                        Bytes::from(bytes)
                    }
                }
                Err(why) => {
                    tracing::warn!(view = ?name, why, "a Lua view's map failed: no longer kept");
                    to.state = ViewState::Overflow {
                        why: format!("its Lua map failed: {why}"),
                    };
                    Bytes::new()
                }
            };
            (to, delta)
        }
        Some(Reply::Bulk(kind)) if &kind[..] == b"lost" => {
            tracing::warn!(view = ?name, group = g, "a Lua view's change-log position went: rebuilding it");
            (at_of(parts.get(2))?, Bytes::new())
        }
        Some(Reply::Bulk(kind)) if &kind[..] == b"off" => {
            let why = match parts.get(2) {
                Some(Reply::Bulk(w)) => String::from_utf8_lossy(w).into_owned(),
                _ => "the change log is off".into(),
            };
            let mut to = from.clone();
            to.state = ViewState::Overflow { why };
            (to, Bytes::new())
        }
        _ => return Err(bad("async kind")),
    };
    let delta = if delta.is_empty() {
        Bytes::from(ViewDelta::default().encode()?)
    } else {
        delta
    };
    node.groups
        .view(
            g,
            ViewCommand::Advance {
                name: name.clone(),
                from,
                to,
                delta,
            },
        )
        .await??;
    Ok(true)
}

/// The spec of view `name` as this replica of `g` holds it.
fn node_spec(node: &Node, g: capdb_cluster::GroupId, name: &Bytes) -> Result<String> {
    let args = [
        Bytes::from_static(VIEWS_QUERY.as_bytes()),
        Bytes::from_static(b"groups"),
        name.clone(),
        Bytes::from_static(b"0"),
    ];
    match node.groups.query_replica(g, &args)? {
        Reply::Array(parts) => match parts.first() {
            Some(Reply::Bulk(def)) => {
                let def: capdb_types::views::ViewDef = postcard::from_bytes(def)
                    .map_err(|e| Error::Corruption(format!("a view definition: {e}")))?;
                Ok(def.spec)
            }
            _ => Err(Error::Command(format!(
                "NOVIEW no view '{}'",
                String::from_utf8_lossy(name)
            ))),
        },
        _ => Err(bad("groups")),
    }
}

/// Where an async view stands on shard `g` against its change log: `(position, clock)`,
/// `None` for a synchronous view (always caught up).
async fn position(
    node: &Node,
    g: capdb_cluster::GroupId,
    name: &[u8],
) -> Result<Option<(u64, u64)>> {
    let reply = node
        .groups
        .query(
            g,
            vec![
                Bytes::from_static(VIEWS_QUERY.as_bytes()),
                Bytes::from_static(b"pos"),
                Bytes::copy_from_slice(name),
            ],
            ReadMode::Linearizable,
            capdb_types::unix_now_ms(),
            0,
        )
        .await?;
    match reply {
        Reply::Array(v) => match &v[..] {
            [Reply::Integer(pos), Reply::Integer(clock)] => Ok(Some((*pos as u64, *clock as u64))),
            [Reply::Nil, Reply::Integer(_)] => Ok(None),
            [Reply::Nil] => Err(Error::Command(format!(
                "NOVIEW no view '{}'",
                String::from_utf8_lossy(name)
            ))),
            _ => Err(bad("pos")),
        },
        _ => Err(bad("pos")),
    }
}

impl Node {
    /// Waits until view `name` of `ks` has counted, on every shard, every change logged
    /// before this call (a synchronous view always has), at most `wait`: whether it did.
    pub async fn view_wait_fresh(&self, ks: &str, name: &[u8], wait: Duration) -> Result<bool> {
        let deadline = Instant::now() + wait.min(FRESH_MAX);
        let keyspace = self.keyspace(ks)?;
        let mut targets = Vec::new();
        for g in keyspace.shard_groups() {
            if let Some((pos, clock)) = position(self, g, name).await? {
                targets.push((g, pos, clock));
            }
        }
        for (g, mut pos, clock) in targets {
            while pos < clock {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                tokio::time::sleep(FRESH_POLL).await;
                pos = match position(self, g, name).await? {
                    Some((p, _)) => p,
                    None => clock,
                };
            }
        }
        Ok(true)
    }

    /// `VIEW VERIFY` of an async view on shard `g`: waits (≤ 10 s) until it has caught up,
    /// recomputes it from the shard's keys with its Lua map, page by page, checking no change
    /// was logged meanwhile, then asks the shard to compare (`verify-with`): an answer for a
    /// quiet shard, `TRYAGAIN` for a busy one; never a wrong one.
    pub(super) async fn view_verify_async(
        &self,
        g: capdb_cluster::GroupId,
        name: &[u8],
        spec: &str,
    ) -> Result<Reply> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let clock = loop {
            match position(self, g, name).await? {
                Some((pos, clock)) if pos >= clock => break clock,
                Some(_) if Instant::now() < deadline => tokio::time::sleep(FRESH_POLL).await,
                Some(_) => {
                    return Err(Error::Command(
                        "TRYAGAIN the Lua view has not caught up with its shard's changes".into(),
                    ));
                }
                None => return Err(Error::Command("ERR not a Lua view".into())),
            }
        };
        let busy = || {
            Error::Command(
                "TRYAGAIN the shard changed while its Lua view was recomputed (VIEW VERIFY of a Lua view compares a quiet shard)".into(),
            )
        };
        let mut after = Bytes::new();
        // Page by page: memory holds the recomputed rows, not the shard's keys.
        let mut recomputed = ViewDelta::default();
        loop {
            let reply = self
                .groups
                .query(
                    g,
                    vec![
                        Bytes::from_static(VIEWS_QUERY.as_bytes()),
                        Bytes::from_static(b"scan"),
                        Bytes::copy_from_slice(name),
                        after.clone(),
                    ],
                    ReadMode::Linearizable,
                    capdb_types::unix_now_ms(),
                    0,
                )
                .await?;
            let Reply::Array(parts) = reply else {
                return Err(bad("scan"));
            };
            let [Reply::Integer(at), rows, next] = &parts[..] else {
                return Err(bad("scan"));
            };
            if *at as u64 != clock {
                return Err(busy());
            }
            let page = map(spec, key_changes(Some(rows))?)
                .await?
                .map_err(|why| Error::Command(format!("ERR the view's Lua map failed: {why}")))?;
            recomputed.absorb(page)?;
            match next {
                Reply::Bulk(n) => after = n.clone(),
                _ => break,
            }
        }
        let delta = recomputed;
        self.groups
            .query(
                g,
                vec![
                    Bytes::from_static(VIEWS_QUERY.as_bytes()),
                    Bytes::from_static(b"verify-with"),
                    Bytes::copy_from_slice(name),
                    Bytes::from(clock.to_string()),
                    Bytes::from(delta.encode()?),
                ],
                ReadMode::Linearizable,
                capdb_types::unix_now_ms(),
                0,
            )
            .await
    }
}
