//! Replica placement as specifications: scripts under `tests/placement/*.txt` drive the
//! placement functions on a cluster map and state what they decide.
//!
//! # Script format
//!
//! A script is a sequence of blocks separated by blank lines; one map carries through all the
//! blocks of a file. A block is command lines (one command each, `#` starts a comment line),
//! then a line `---`, then the expected output, which ends at the next blank line or at the end
//! of the file (commands never print blank lines). A paragraph of comments only is no block.
//!
//! ```text
//! nodes a(zone=1) b(zone=2) c(zone=3)
//! create ks shards=2 rf=3
//! show
//! ---
//! ks/0: a b c
//! ks/1: a b c
//! ```
//!
//! Nodes are named in scripts; a name gets the next id (1, 2, 3...) where it first appears, in
//! any command, so `a` is node 1 above.
//!
//! - `nodes <node>...`: registers nodes (`MetaCommand::UpsertNode`). A node is `name` or
//!   `name(key=value,...)` with placement labels, e.g. `a(zone=1)`. Prints nothing.
//! - `add <node>...`: the same, for nodes that join a running cluster.
//! - `drain <name>`: `MetaCommand::DrainNode`. Prints nothing.
//! - `remove <name>`: `MetaCommand::RemoveNode` (refused while it holds replicas).
//! - `create <keyspace> shards=N rf=R [mode=cp|cache]`: replica sets from
//!   `placement::place_keyspace`, applied as `MetaCommand::CreateKeyspace` (mode cp unless
//!   given). Prints nothing.
//! - `step`: `placement::next_move`, printed and applied. A `SetReplicas` prints as
//!   `<kind> <keyspace>/<shard>: <old replicas> -> <new replicas>`, where kind is `add` (the new
//!   set only adds nodes), `remove` (it only removes) or `move`; a `CacheAdopt` as
//!   `adopt <keyspace>: a b c` (the primaries, by shard); a `CacheFence` as `fence
//!   <keyspace>/<shard> (epoch N)`; a `CachePromote` as `hand-off <keyspace>/<shard>: <old
//!   primary> -> <new primary> (epoch N)`; no move prints `none`.
//! - `adopt <keyspace>`: `MetaCommand::CacheAdopt`. Prints nothing.
//! - `fence <keyspace>/<shard> epoch=N`: `MetaCommand::CacheFence`. Prints nothing.
//! - `promote <keyspace>/<shard> <node> epoch=N`: `MetaCommand::CachePromote`. Prints nothing.
//! - `set-replicas <keyspace>/<shard> <node>...`: `MetaCommand::SetReplicas`. Prints nothing.
//! - `steps`: `step` until it prints `none` (printed too), at most 100 times.
//! - `show`: every shard's replicas, as stored, one line per shard: `<keyspace>/<shard>: a b c`;
//!   a cache shard's primary is marked `*`, and its epoch follows: `c/0: a* b (epoch 1)`.
//! - `load`: replicas per node, then the difference between the most and least loaded
//!   non-draining nodes: `a=2 b=2 c=1 d=0(draining) max-min=1`.
//! - `meta-voters current=a,b,c`: `placement::meta_target_voters` for these current voters
//!   (`current=` for none), printed by id.
//!
//! A refused apply prints `error: <message>`; a malformed command fails the test.
//!
//! Run with `UPDATE_SCRIPTS=1` to write the actual output over the expected one instead of
//! comparing (then review the diff).

mod script;

use std::collections::BTreeSet;

use capdb_cluster::placement;
use capdb_cluster::{ClusterState, MetaCommand, MetaResponse, NodeId, NodeInfo};
use capdb_types::{KeyspaceName, KeyspaceSpec, Mode};

#[derive(Default)]
struct Runner {
    state: ClusterState,
    ids: script::Names,
}

impl Runner {
    fn id(&mut self, name: &str) -> NodeId {
        self.ids.id(name)
    }

    fn name(&self, id: NodeId) -> String {
        self.ids.name(id)
    }

    fn names(&self, ids: impl IntoIterator<Item = NodeId>) -> String {
        let names: Vec<String> = ids.into_iter().map(|i| self.name(i)).collect();
        names.join(" ")
    }

    fn apply(&mut self, cmd: &MetaCommand, out: &mut Vec<String>) {
        match self.state.apply(cmd) {
            MetaResponse::Ok => {}
            MetaResponse::Error(e) => out.push(format!("error: {e}")),
            MetaResponse::Refused(e) => out.push(format!("error: {e}")),
        }
    }

    /// Runs one command line, appending its output lines to `out`.
    fn run(&mut self, line: &str, out: &mut Vec<String>) -> Result<(), String> {
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        match (command, args.as_slice()) {
            ("nodes" | "add", nodes) if !nodes.is_empty() => {
                for node in nodes {
                    let (name, labels) = match node.strip_suffix(')') {
                        Some(rest) => rest.split_once('(').ok_or("bad node")?,
                        None => (*node, ""),
                    };
                    let labels = labels
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(|l| l.split_once('=').ok_or(format!("bad label '{l}'")))
                        .map(|kv| kv.map(|(k, v)| (k.to_string(), v.to_string())))
                        .collect::<Result<_, _>>()?;
                    let info = NodeInfo {
                        id: self.id(name),
                        peer_addr: String::new(),
                        resp_addr: String::new(),
                        http_addr: String::new(),
                        labels,
                        draining: false,
                    };
                    self.apply(&MetaCommand::UpsertNode(info), out);
                }
            }
            ("drain", [name]) => {
                let id = self.id(name);
                self.apply(&MetaCommand::DrainNode(id), out);
            }
            ("remove", [name]) => {
                let id = self.id(name);
                self.apply(&MetaCommand::RemoveNode(id), out);
            }
            ("create", [name, shards, rf, rest @ ..]) if rest.len() <= 1 => {
                let mode = match rest {
                    [] => Mode::Cp,
                    [mode] => mode
                        .strip_prefix("mode=")
                        .ok_or("expected mode=")?
                        .parse::<Mode>()
                        .map_err(|e| e.to_string())?,
                    _ => unreachable!("at most one argument more"),
                };
                let number = |arg: &str, key: &str| {
                    let v = arg.strip_prefix(key).ok_or(format!("expected {key}N"))?;
                    v.parse::<u32>().map_err(|e| e.to_string())
                };
                let (shards, rf) = (number(shards, "shards=")?, number(rf, "rf=")?);
                let name = KeyspaceName::new(*name).map_err(|e| e.to_string())?;
                let spec = KeyspaceSpec::new(name, mode, Some(rf), Some(shards), None, None)
                    .map_err(|e| e.to_string())?;
                let replicas = placement::place_keyspace(&self.state, shards, rf);
                self.apply(&MetaCommand::CreateKeyspace { spec, replicas }, out);
            }
            ("step", []) => {
                self.step(out);
            }
            ("steps", []) => {
                let mut moved = 0;
                while self.step(out) {
                    moved += 1;
                    if moved == 100 {
                        out.push("(still moving after 100 steps)".into());
                        break;
                    }
                }
            }
            ("promote", [shard, node, epoch]) => {
                let (keyspace, shard) = self.shard(shard)?;
                let epoch = epoch.strip_prefix("epoch=").ok_or("expected epoch=")?;
                let cmd = MetaCommand::CachePromote {
                    keyspace,
                    shard,
                    epoch: epoch.parse().map_err(|_| "bad epoch")?,
                    primary: self.id(node),
                    start_offset: 0,
                    lost_at_least: 0,
                    lag_ms_before: 0,
                };
                self.apply(&cmd, out);
            }
            ("adopt", [keyspace]) => {
                let keyspace = KeyspaceName::new(*keyspace).map_err(|e| e.to_string())?;
                self.apply(&MetaCommand::CacheAdopt { keyspace }, out);
            }
            ("fence", [shard, epoch]) => {
                let (keyspace, shard) = self.shard(shard)?;
                let epoch = epoch.strip_prefix("epoch=").ok_or("expected epoch=")?;
                let epoch = epoch.parse().map_err(|_| "bad epoch")?;
                let cmd = MetaCommand::CacheFence {
                    keyspace,
                    shard,
                    epoch,
                };
                self.apply(&cmd, out);
            }
            ("set-replicas", [shard, nodes @ ..]) => {
                let (keyspace, shard) = self.shard(shard)?;
                let replicas = nodes.iter().map(|n| self.id(n)).collect();
                let cmd = MetaCommand::SetReplicas {
                    keyspace,
                    shard,
                    replicas,
                };
                self.apply(&cmd, out);
            }
            ("show", []) => {
                for (name, i, shard) in self.state.all_shards() {
                    let cache = self.state.cache_shard(name, i);
                    let replicas: Vec<String> = shard
                        .replicas
                        .iter()
                        .map(|&r| {
                            let mark = if cache.is_some_and(|c| c.primary == r) {
                                "*"
                            } else {
                                ""
                            };
                            format!("{}{mark}", self.name(r))
                        })
                        .collect();
                    let epoch = cache
                        .map(|c| format!(" (epoch {})", c.epoch))
                        .unwrap_or_default();
                    out.push(format!("{name}/{i}: {}{epoch}", replicas.join(" ")));
                }
            }
            ("load", []) => {
                let mut line = Vec::new();
                let mut eligible = Vec::new();
                for (id, load) in self.state.load() {
                    let draining = self.state.nodes[&id].draining;
                    let mark = if draining { "(draining)" } else { "" };
                    line.push(format!("{}={load}{mark}", self.name(id)));
                    if !draining {
                        eligible.push(load);
                    }
                }
                let (max, min) = (eligible.iter().max(), eligible.iter().min());
                let diff = max.zip(min).map_or(0, |(max, min)| max - min);
                out.push(format!("{} max-min={diff}", line.join(" ")));
            }
            ("meta-voters", [current]) => {
                let current = current
                    .strip_prefix("current=")
                    .ok_or("expected current=")?;
                let current: BTreeSet<NodeId> = current
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(|n| self.id(n))
                    .collect();
                let target = placement::meta_target_voters(&self.state, current);
                out.push(self.names(target));
            }
            _ => return Err(format!("unknown command or bad arguments: '{line}'")),
        }
        Ok(())
    }

    /// `keyspace/shard` as the map names it.
    fn shard(&self, arg: &str) -> Result<(KeyspaceName, u32), String> {
        let (keyspace, shard) = arg.split_once('/').ok_or("expected keyspace/shard")?;
        let keyspace = KeyspaceName::new(keyspace).map_err(|e| e.to_string())?;
        Ok((keyspace, shard.parse().map_err(|_| "bad shard index")?))
    }

    /// One `next_move`, printed and applied; false when there was none.
    fn step(&mut self, out: &mut Vec<String>) -> bool {
        let Some(cmd) = placement::next_move(&self.state) else {
            out.push("none".into());
            return false;
        };
        let line = match &cmd {
            MetaCommand::SetReplicas {
                keyspace,
                shard,
                replicas,
            } => {
                let old = &self.state.keyspaces[keyspace].shards[*shard as usize].replicas;
                let kind = if old.iter().all(|n| replicas.contains(n)) {
                    "add"
                } else if replicas.iter().all(|n| old.contains(n)) {
                    "remove"
                } else {
                    "move"
                };
                let (old, new) = (self.names(old.clone()), self.names(replicas.clone()));
                format!("{kind} {keyspace}/{shard}: {old} -> {new}")
            }
            MetaCommand::CacheAdopt { keyspace } => {
                let ks = &self.state.keyspaces[keyspace];
                let primaries: Vec<NodeId> = ks.shards.iter().map(|s| s.replicas[0]).collect();
                format!("adopt {keyspace}: {}", self.names(primaries))
            }
            MetaCommand::CacheFence {
                keyspace,
                shard,
                epoch,
            } => format!("fence {keyspace}/{shard} (epoch {epoch})"),
            MetaCommand::CachePromote {
                keyspace,
                shard,
                epoch,
                primary,
                ..
            } => {
                let old = self.state.cache[keyspace][*shard as usize].primary;
                let (old, new) = (self.name(old), self.name(*primary));
                format!("hand-off {keyspace}/{shard}: {old} -> {new} (epoch {epoch})")
            }
            other => format!("{other:?}"),
        };
        out.push(line);
        self.apply(&cmd, out);
        true
    }
}

#[test]
fn placement_scripts() {
    script::run_scripts("placement", || {
        let mut runner = Runner::default();
        move |line: &str, out: &mut Vec<String>| runner.run(line, out)
    });
}
