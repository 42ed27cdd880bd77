//! Cache primaries' leases as specifications: scripts under `tests/lease/*.txt` drive the lease
//! rules (`capdb_cluster::lease`) over a scripted clock and state what they decide.
//!
//! # Script format
//!
//! As `placement_scripts.rs`: blocks of command lines, a `---` line, then the expected output
//! (ending at a blank line or the end of the file); `#` starts a comment line; the state carries
//! through the file. Nodes are named, and numbered where they first appear. Times are
//! milliseconds of one scripted clock (every node's: the rules never compare two nodes' clocks).
//!
//! - `cluster <node>... cache=<keyspace> shards=N`: the map every voter starts from: the nodes,
//!   and a cache keyspace whose every shard has all the nodes as replicas, adopted (the first
//!   node primary, epoch 1). Prints nothing.
//! - `voters <node>...`: those nodes' voter tables, started at time 0; they are also the voter
//!   set in force. Prints nothing.
//! - `voter-sets <node>,<node>... [<node>,...]`: the voter sets in force (during a change, the
//!   old and the new). Prints nothing.
//! - `at <ms> restart <voter>`: the voter's table is new (its promises forgotten), started then.
//! - `fence <ks>/<shard> [at <voter>,...]`: `MetaCommand::CacheFence` of the current epoch,
//!   applied to the maps of the voters named (default: all); the others apply it later with
//!   `catch-up`. Prints an error if refused.
//! - `promote <ks>/<shard> <node> [at <voter>,...]`: `MetaCommand::CachePromote` to the next
//!   epoch, the same way.
//! - `catch-up <voter>`: the voter's map becomes the log's. Prints nothing.
//! - `primary <node> <ks>/<shard>`: the node takes a `PrimaryLease` of the shard in the epoch
//!   the first voter's map gives it (as a node does on seeing itself primary). Prints nothing.
//! - `at <ms> round <node> <ks>/<shard> to <voter>,... [offset=O] [floor=F] [lag=L]`: the
//!   primary sends a renewal round then, which the voters named receive then; prints each
//!   voter's answer (`v: granted` or `v: refused <why>`), then `lease until <ms>` or `no lease`.
//! - `at <ms> may-write <node> <ks>/<shard>`: `yes` or `no`.
//! - `give-up <node> <ks>/<shard>`: the primary stops writing (`PrimaryLease::give_up`).
//!   Prints nothing.
//! - `at <ms> release <ks>/<shard> epoch=N from <voter>,...`: the meta leader's release; prints
//!   each answer, then the tally over the voter sets in force: `waiting`, `held` or
//!   `released offset=O floor=F lag=L`.
//! - `at <ms> relinquish <ks>/<shard> epoch=N primary=<node> at <voter>,...`: prints nothing.
//! - `at <ms> expired <voter>`: the primaries the voter suspects by its map (`<ks>/<shard>
//!   epoch=N primary=<node>`, one a line), or `none`.
//!
//! Run with `UPDATE_SCRIPTS=1` to write the actual output over the expected one instead of
//! comparing (then review the diff).

mod script;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use capdb_cluster::lease::{
    LeaseConfig, PrimaryLease, ReleaseOutcome, ReleaseTally, Renewal, VoterTable,
};
use capdb_cluster::{ClusterState, MetaCommand, MetaResponse, NodeId, NodeInfo};
use capdb_types::{KeyspaceName, KeyspaceSpec, Mode};

#[derive(Default)]
struct Runner {
    ids: script::Names,
    /// Each voter's applied map and table.
    voters: BTreeMap<NodeId, (ClusterState, VoterTable)>,
    sets: Vec<BTreeSet<NodeId>>,
    map: ClusterState,
    primaries: BTreeMap<(NodeId, KeyspaceName, u32), PrimaryLease>,
}

fn ms(t: u64) -> Duration {
    Duration::from_millis(t)
}

fn show_ms(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1000) {
        format!("{}", us / 1000)
    } else {
        format!("{}.{:03}", us / 1000, us % 1000)
    }
}

impl Runner {
    fn id(&mut self, name: &str) -> NodeId {
        self.ids.id(name)
    }

    fn name(&self, id: NodeId) -> String {
        self.ids.name(id)
    }

    fn list(&mut self, arg: &str) -> Vec<NodeId> {
        arg.split(',').map(|n| self.id(n)).collect()
    }

    fn shard(arg: &str) -> Result<(KeyspaceName, u32), String> {
        let (ks, i) = arg.split_once('/').ok_or("expected <keyspace>/<shard>")?;
        let ks = KeyspaceName::new(ks).map_err(|e| e.to_string())?;
        Ok((ks, i.parse().map_err(|_| "bad shard index")?))
    }

    fn voter(&mut self, id: NodeId) -> Result<&mut (ClusterState, VoterTable), String> {
        self.voters
            .get_mut(&id)
            .ok_or_else(|| format!("node {id} is no voter"))
    }

    /// The shard's current epoch in the log's map.
    fn epoch(&self, keyspace: &KeyspaceName, shard: u32) -> Result<u64, String> {
        let c = self.map.cache_shard(keyspace, shard as usize);
        Ok(c.ok_or("no such cache shard")?.epoch)
    }

    /// Applies `cmd` to the log's map and, if it takes it, to the maps of the voters `rest`
    /// names (`at <voter>,...`; all without).
    fn commit(
        &mut self,
        cmd: MetaCommand,
        rest: &[&str],
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        let targets = match rest {
            [] => self.voters.keys().copied().collect(),
            ["at", voters] => self.list(voters),
            _ => return Err("expected `at <voter>,...`".into()),
        };
        if let MetaResponse::Refused(e) = self.map.apply(&cmd) {
            out.push(format!("error: {e}"));
            return Ok(());
        }
        // A voter applies the log in order: the maps named catch up to the log's.
        let map = self.map.clone();
        for v in targets {
            self.voter(v)?.0 = map.clone();
        }
        Ok(())
    }

    fn run(&mut self, line: &str, out: &mut Vec<String>) -> Result<(), String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (now, words) = match words.as_slice() {
            ["at", t, rest @ ..] => (Some(ms(t.parse().map_err(|_| "bad time")?)), rest),
            rest => (None, rest),
        };
        let at = || now.ok_or_else(|| format!("'{line}' needs `at <ms>`"));
        let named = |words: &[&str], key: &str| -> Result<Option<u64>, String> {
            words
                .iter()
                .find_map(|w| w.strip_prefix(key))
                .map(|v| v.parse::<u64>().map_err(|_| format!("bad {key}")))
                .transpose()
        };
        match words {
            ["cluster", rest @ ..] => {
                let mut nodes = Vec::new();
                let (mut cache, mut shards) = (None, 1);
                for w in rest {
                    if let Some(ks) = w.strip_prefix("cache=") {
                        cache = Some(KeyspaceName::new(ks).map_err(|e| e.to_string())?);
                    } else if let Some(n) = w.strip_prefix("shards=") {
                        shards = n.parse().map_err(|_| "bad shards")?;
                    } else {
                        nodes.push(self.id(w));
                    }
                }
                for &id in &nodes {
                    self.map.apply(&MetaCommand::UpsertNode(NodeInfo {
                        id,
                        peer_addr: String::new(),
                        resp_addr: String::new(),
                        http_addr: String::new(),
                        labels: BTreeMap::new(),
                        draining: false,
                    }));
                }
                let name = cache.ok_or("expected cache=<keyspace>")?;
                let rf = nodes.len() as u32;
                let spec = KeyspaceSpec::new(name, Mode::Cache, Some(rf), Some(shards), None, None)
                    .map_err(|e| e.to_string())?;
                let replicas = vec![nodes.clone(); shards as usize];
                let keyspace = spec.name.clone();
                let r = self
                    .map
                    .apply(&MetaCommand::CreateKeyspace { spec, replicas });
                assert_eq!(r, MetaResponse::Ok);
                let r = self.map.apply(&MetaCommand::CacheAdopt { keyspace });
                assert_eq!(r, MetaResponse::Ok);
            }
            ["voters", names @ ..] => {
                let ids: Vec<NodeId> = names.iter().map(|n| self.id(n)).collect();
                for &id in &ids {
                    let table = VoterTable::new(LeaseConfig::default(), Duration::ZERO);
                    self.voters.insert(id, (self.map.clone(), table));
                }
                self.sets = vec![ids.into_iter().collect()];
            }
            ["voter-sets", sets @ ..] => {
                self.sets = sets
                    .iter()
                    .map(|s| self.list(s).into_iter().collect())
                    .collect();
            }
            ["restart", voter] => {
                let (id, now) = (self.id(voter), at()?);
                self.voter(id)?.1 = VoterTable::new(LeaseConfig::default(), now);
            }
            ["fence", shard, rest @ ..] => {
                let (keyspace, i) = Self::shard(shard)?;
                let epoch = self.epoch(&keyspace, i)?;
                let cmd = MetaCommand::CacheFence {
                    keyspace,
                    shard: i,
                    epoch,
                };
                self.commit(cmd, rest, out)?;
            }
            ["promote", shard, node, rest @ ..] => {
                let (keyspace, i) = Self::shard(shard)?;
                let primary = self.id(node);
                let epoch = self.epoch(&keyspace, i)?;
                let cmd = MetaCommand::CachePromote {
                    keyspace,
                    shard: i,
                    epoch: epoch + 1,
                    primary,
                    start_offset: 0,
                    lost_at_least: 0,
                    lag_ms_before: 0,
                };
                self.commit(cmd, rest, out)?;
            }
            ["catch-up", voter] => {
                let id = self.id(voter);
                let map = self.map.clone();
                self.voter(id)?.0 = map;
            }
            ["primary", node, shard] => {
                let id = self.id(node);
                let (ks, i) = Self::shard(shard)?;
                let first = self.voters.values().next().ok_or("no voters")?;
                // A shard the map lacks: epoch 1, as a primary that read a map its voters lack.
                let epoch = first.0.cache_shard(&ks, i as usize).map_or(1, |c| c.epoch);
                let lease = PrimaryLease::new(LeaseConfig::default(), epoch);
                self.primaries.insert((id, ks, i), lease);
            }
            ["round", node, shard, "to", voters, rest @ ..] => {
                let now = at()?;
                let id = self.id(node);
                let (ks, i) = Self::shard(shard)?;
                let voters = self.list(voters);
                let key = (id, ks.clone(), i);
                let lease = self.primaries.get_mut(&key).ok_or("no such primary")?;
                let round = lease.start_round(now);
                let renewal = Renewal {
                    keyspace: ks,
                    shard: i,
                    epoch: lease.epoch(),
                    primary: id,
                    offset: named(rest, "offset=")?.unwrap_or(0),
                    floor: named(rest, "floor=")?.unwrap_or(0),
                    lag_ms: named(rest, "lag=")?.unwrap_or(0),
                };
                let mut granted = Vec::new();
                for v in voters {
                    let (map, table) = self.voter(v)?;
                    let answer = table.renew(now, &map.clone(), &renewal);
                    let name = self.name(v);
                    match answer {
                        Ok(()) => {
                            out.push(format!("{name}: granted"));
                            granted.push(v);
                        }
                        Err(why) => out.push(format!("{name}: refused {why:?}")),
                    }
                }
                let sets = self.sets.clone();
                let lease = self.primaries.get_mut(&key).ok_or("no such primary")?;
                for v in granted {
                    lease.granted(renewal.epoch, round, v, &sets);
                }
                out.push(match lease.until() {
                    Some(u) => format!("lease until {}", show_ms(u)),
                    None => "no lease".into(),
                });
            }
            ["give-up", node, shard] => {
                let id = self.id(node);
                let (ks, i) = Self::shard(shard)?;
                let lease = self
                    .primaries
                    .get_mut(&(id, ks, i))
                    .ok_or("no such primary")?;
                lease.give_up();
            }
            ["may-write", node, shard] => {
                let now = at()?;
                let id = self.id(node);
                let (ks, i) = Self::shard(shard)?;
                let lease = self.primaries.get(&(id, ks, i)).ok_or("no such primary")?;
                out.push(if lease.may_write(now) { "yes" } else { "no" }.into());
            }
            ["release", shard, epoch, "from", voters] => {
                let now = at()?;
                let shard = Self::shard(shard)?;
                let epoch = named(&[epoch], "epoch=")?.ok_or("expected epoch=")?;
                let mut tally = ReleaseTally::default();
                for v in self.list(voters) {
                    let (map, table) = self.voter(v)?;
                    let answer = table.release(now, &map.clone(), &shard, epoch);
                    let name = self.name(v);
                    match &answer {
                        Ok(r) => out.push(format!(
                            "{name}: released offset={} floor={} lag={}",
                            r.last_offset, r.floor, r.lag_ms
                        )),
                        Err(why) => out.push(format!("{name}: refused {why:?}")),
                    }
                    tally.answer(v, answer);
                }
                out.push(match tally.outcome(&self.sets) {
                    ReleaseOutcome::Waiting => "waiting".into(),
                    ReleaseOutcome::Held => "held".into(),
                    ReleaseOutcome::Released(r) => format!(
                        "released offset={} floor={} lag={}",
                        r.last_offset, r.floor, r.lag_ms
                    ),
                });
            }
            ["relinquish", shard, epoch, primary, "at", voters] => {
                let now = at()?;
                let shard = Self::shard(shard)?;
                let epoch = named(&[epoch], "epoch=")?.ok_or("expected epoch=")?;
                let primary = primary
                    .strip_prefix("primary=")
                    .ok_or("expected primary=")?;
                let primary = self.id(primary);
                for v in self.list(voters) {
                    self.voter(v)?.1.relinquish(now, &shard, epoch, primary);
                }
            }
            ["expired", voter] => {
                let now = at()?;
                let id = self.id(voter);
                let (map, table) = self.voter(id)?;
                let expired = table.expired(now, &map.clone());
                if expired.is_empty() {
                    out.push("none".into());
                }
                for ((ks, i), epoch, primary) in expired {
                    let primary = self.name(primary);
                    out.push(format!("{ks}/{i} epoch={epoch} primary={primary}"));
                }
            }
            _ => return Err(format!("unknown command or bad arguments: '{line}'")),
        }
        Ok(())
    }
}

#[test]
fn lease_scripts() {
    script::run_scripts("lease", || {
        let mut runner = Runner::default();
        move |line: &str, out: &mut Vec<String>| runner.run(line, out)
    });
}
