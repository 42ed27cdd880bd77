//! Primary leases of cache shards, as pure rules (issue 16, `docs/design/cache-cluster.md` §4).
//!
//! A cache shard's primary may write only while it holds a **lease**, and the meta leader may
//! promote another replica only once the old primary's lease has certainly ended. Leases are
//! granted by a **majority of the meta group's voters**, each holding a promise in memory, not by
//! the meta leader: while the meta group elects, primaries keep renewing, and a new meta leader
//! need not wait out leases its predecessor granted (§4.1).
//!
//! - A **primary** sends a renewal round every [`LeaseConfig::renew_every`] to every voter
//!   ([`PrimaryLease::start_round`]). Once a majority of every voter set in force grants a round
//!   sent at `t`, it may write until `t + lease` ([`PrimaryLease::granted`],
//!   [`PrimaryLease::may_write`]). Measured from the send, so a slow answer shortens the lease and
//!   never stretches it.
//! - A **voter** ([`VoterTable`]) grants `(shard, epoch, primary)` only if its applied map names
//!   that primary in that epoch and it has not released the epoch; it then promises not to
//!   release before `t_recv + lease·(1 + 2ρ) + δ` ([`LeaseConfig::promise`]): later, in real
//!   time, than any lease the grant can extend, whatever the two clocks' rates within ρ. A voter
//!   that (re)started has forgotten its promises: it releases nothing for one promise's length.
//! - A **release** (the meta leader's, before a promotion) is answered by a voter whose promise
//!   has passed; the voter then refuses every renewal of that epoch. A majority of released
//!   voters ([`ReleaseTally`]) intersects the majority of the old primary's last lease, so that
//!   lease has ended before the promotion commits: no two primaries write in overlapping time.
//!
//! Time is the caller's monotonic clock as a [`Duration`] since any origin (one per process: a
//! voter's and a primary's are never compared, only their rates are bounded by ρ). Nothing here
//! reads a clock, so the rules run in scripts (`tests/lease/*.txt`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use capdb_types::KeyspaceName;
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, NodeId};

/// The lease's timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseConfig {
    /// How often a primary sends a renewal round.
    pub renew_every: Duration,
    /// How long a granted round lets its primary write, from the round's send.
    pub lease: Duration,
    /// Bound on the relative rate difference of two nodes' monotonic clocks (0.01: 1 %).
    pub drift: f64,
    /// Added to every promise: a voter's time between receiving a renewal and holding it.
    pub margin: Duration,
}

impl Default for LeaseConfig {
    /// The design's targets: renew every 100 ms, leases of 500 ms, clocks within 1 %, 50 ms of
    /// margin: a promise of 560 ms.
    fn default() -> LeaseConfig {
        LeaseConfig {
            renew_every: Duration::from_millis(100),
            lease: Duration::from_millis(500),
            drift: 0.01,
            margin: Duration::from_millis(50),
        }
    }
}

impl LeaseConfig {
    /// How long a voter holds a grant: `lease·(1 + 2ρ) + δ`.
    pub fn promise(&self) -> Duration {
        self.lease.mul_f64(1.0 + 2.0 * self.drift) + self.margin
    }

    /// Whether the primary's lease ends before any voter's promise: what makes the rules safe.
    pub fn is_safe(&self) -> bool {
        self.drift >= 0.0 && self.renew_every < self.lease && self.promise() > self.lease
    }
}

/// A cache shard: its keyspace and index.
pub type ShardRef = (KeyspaceName, u32);

/// A primary's renewal of one shard's lease, with what it reports to the voters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub keyspace: KeyspaceName,
    pub shard: u32,
    pub epoch: u64,
    pub primary: NodeId,
    /// The primary's stream offset (its last applied entry).
    pub offset: u64,
    /// The highest offset a WAIT was answered for: a promotion never picks a copy below it.
    pub floor: u64,
    /// How far the slowest in-sync replica lags, in ms.
    pub lag_ms: u64,
}

/// Why a voter refused a renewal: the primary must not count it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenewRefusal {
    /// The voter's map names no such cache shard (yet: it may lag the primary's).
    UnknownShard,
    /// The voter's map has the shard in another epoch, or with another primary.
    NotPrimary { epoch: u64, primary: NodeId },
    /// The voter released this epoch: a promotion may be under way.
    Released,
}

/// What a voter answers a release with: the end of the shard's epoch as its renewals reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub last_offset: u64,
    pub floor: u64,
    pub lag_ms: u64,
}

/// Why a voter refused a release: the meta leader must not promote yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseRefusal {
    /// The voter holds a live promise for this epoch: the primary is alive for it.
    Held { for_ms: u64 },
    /// The voter started less than a promise ago: it may have held one it forgot.
    JustStarted { for_ms: u64 },
    /// The shard is in a later epoch at this voter: the release is stale.
    Superseded { epoch: u64 },
}

/// One shard's state at a voter.
#[derive(Debug, Clone, PartialEq)]
struct Promise {
    epoch: u64,
    /// The primary granted in `epoch` (none: the voter only released the epoch).
    primary: Option<NodeId>,
    /// The grant holds until then (the voter's clock).
    until: Duration,
    /// Epochs up to this one are released: renewals of them are refused.
    released_through: u64,
    offset: u64,
    floor: u64,
    lag_ms: u64,
}

/// A voter's promises, one per cache shard. In memory only: a restart forgets them, which is
/// why a new table releases nothing for one promise's length.
#[derive(Debug, Clone)]
pub struct VoterTable {
    config: LeaseConfig,
    started: Duration,
    shards: BTreeMap<ShardRef, Promise>,
}

impl VoterTable {
    /// A voter's table, started at `now`.
    pub fn new(config: LeaseConfig, now: Duration) -> VoterTable {
        assert!(config.is_safe(), "unsafe lease config: {config:?}");
        VoterTable {
            config,
            started: now,
            shards: BTreeMap::new(),
        }
    }

    /// Grants or refuses a renewal received at `now`, judged by this voter's applied `map`.
    pub fn renew(
        &mut self,
        now: Duration,
        map: &ClusterState,
        r: &Renewal,
    ) -> Result<(), RenewRefusal> {
        let named = map
            .cache_shard(&r.keyspace, r.shard as usize)
            .ok_or(RenewRefusal::UnknownShard)?;
        if named.epoch != r.epoch || named.primary != r.primary {
            return Err(RenewRefusal::NotPrimary {
                epoch: named.epoch,
                primary: named.primary,
            });
        }
        let until = now + self.config.promise();
        let p = self
            .shards
            .entry((r.keyspace.clone(), r.shard))
            .or_insert(Promise {
                epoch: r.epoch,
                primary: Some(r.primary),
                until,
                released_through: 0,
                offset: 0,
                floor: 0,
                lag_ms: 0,
            });
        if r.epoch <= p.released_through {
            return Err(RenewRefusal::Released);
        }
        if r.epoch != p.epoch {
            // A new epoch: the offsets go on (one stream per shard), the lag is the new one's.
            p.lag_ms = 0;
        }
        p.epoch = r.epoch;
        p.primary = Some(r.primary);
        p.until = p.until.max(until);
        p.offset = p.offset.max(r.offset);
        p.floor = p.floor.max(r.floor);
        p.lag_ms = r.lag_ms;
        Ok(())
    }

    /// Answers the meta leader's release of `shard` in `epoch` at `now`: the epoch's last
    /// reported offsets once no promise of this voter's may still hold; from then on the voter
    /// refuses the epoch's renewals.
    pub fn release(
        &mut self,
        now: Duration,
        shard: &ShardRef,
        epoch: u64,
    ) -> Result<Released, ReleaseRefusal> {
        let promise = self.config.promise();
        let just_started = self.started + promise;
        if now < just_started {
            return Err(ReleaseRefusal::JustStarted {
                for_ms: millis_until(now, just_started),
            });
        }
        let p = self.shards.entry(shard.clone()).or_insert(Promise {
            epoch,
            primary: None,
            until: now,
            released_through: 0,
            offset: 0,
            floor: 0,
            lag_ms: 0,
        });
        if p.epoch > epoch {
            return Err(ReleaseRefusal::Superseded { epoch: p.epoch });
        }
        if p.epoch == epoch && now < p.until {
            return Err(ReleaseRefusal::Held {
                for_ms: millis_until(now, p.until),
            });
        }
        p.released_through = p.released_through.max(epoch);
        Ok(Released {
            last_offset: p.offset,
            floor: p.floor,
            lag_ms: p.lag_ms,
        })
    }

    /// Ends this voter's promise for `shard` in `epoch` at once: its primary stopped writing (a
    /// hand-off, a graceful shutdown, or a restarted process giving up its predecessor's epochs).
    pub fn relinquish(&mut self, now: Duration, shard: &ShardRef, epoch: u64) {
        if let Some(p) = self.shards.get_mut(shard)
            && p.epoch == epoch
        {
            p.until = p.until.min(now);
        }
    }

    /// Shards whose promise ran out at `now` without a renewal and was not released:
    /// `(shard, epoch, primary)`, the primaries the meta leader suspects.
    pub fn expired(&self, now: Duration) -> Vec<(ShardRef, u64, NodeId)> {
        self.shards
            .iter()
            .filter(|(_, p)| p.until <= now && p.released_through < p.epoch)
            .filter_map(|(s, p)| Some((s.clone(), p.epoch, p.primary?)))
            .collect()
    }

    /// Forgets shards the map no longer has (a dropped keyspace): the table stays bounded by the
    /// map's cache shards.
    pub fn retain_mapped(&mut self, map: &ClusterState) {
        self.shards
            .retain(|(ks, i), _| map.cache_shard(ks, *i as usize).is_some());
    }
}

fn millis_until(now: Duration, until: Duration) -> u64 {
    let left = until.saturating_sub(now);
    // Rounded up: "for 0 ms" would read as over.
    left.as_millis() as u64 + u64::from(!left.subsec_nanos().is_multiple_of(1_000_000))
}

/// Whether `granted` holds a majority of every set in `sets` (none: never).
fn majority_of_each(sets: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !sets.is_empty()
        && sets
            .iter()
            .all(|set| 2 * set.intersection(granted).count() > set.len())
}

/// Renewal rounds kept waiting for grants: a round older than a lease can extend nothing.
pub const ROUNDS_KEPT_MAX: usize = 16;

/// A primary's lease on one shard in one epoch.
#[derive(Debug, Clone)]
pub struct PrimaryLease {
    config: LeaseConfig,
    epoch: u64,
    /// May write while `now <` this (the primary's clock).
    until: Option<Duration>,
    next_round: u64,
    /// Rounds sent and not yet granted: `round -> (sent at, voters that granted)`.
    rounds: BTreeMap<u64, (Duration, BTreeSet<NodeId>)>,
}

impl PrimaryLease {
    /// The lease of a primary in `epoch`, held by no round yet: it writes nothing until a
    /// majority grants one.
    pub fn new(config: LeaseConfig, epoch: u64) -> PrimaryLease {
        assert!(config.is_safe(), "unsafe lease config: {config:?}");
        PrimaryLease {
            config,
            epoch,
            until: None,
            next_round: 1,
            rounds: BTreeMap::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Starts a renewal round sent at `now`: its number, to match grants with. At most
    /// [`ROUNDS_KEPT_MAX`] rounds wait; older ones are dropped (their grants would come late).
    pub fn start_round(&mut self, now: Duration) -> u64 {
        let round = self.next_round;
        self.next_round += 1;
        self.rounds.insert(round, (now, BTreeSet::new()));
        while self.rounds.len() > ROUNDS_KEPT_MAX {
            self.rounds.pop_first();
        }
        round
    }

    /// Counts `voter`'s grant of `round`. Once a majority of every set in `voter_sets` (the
    /// voter sets in force: the old and new one while the set changes) granted it, the lease
    /// runs to the round's send plus a lease, and the round and older ones are done.
    pub fn granted(&mut self, round: u64, voter: NodeId, voter_sets: &[BTreeSet<NodeId>]) {
        let Some((sent, grants)) = self.rounds.get_mut(&round) else {
            return;
        };
        grants.insert(voter);
        if majority_of_each(voter_sets, grants) {
            let until = *sent + self.config.lease;
            self.until = Some(self.until.map_or(until, |u| u.max(until)));
            self.rounds = self.rounds.split_off(&(round + 1));
        }
    }

    /// Whether the primary may apply a write at `now` (checked under the lock shard, and again
    /// before replying: a lease that ended between answers `-UNCERTAIN`).
    pub fn may_write(&self, now: Duration) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Stops writing at once (before a hand-off's `Relinquish`, or a graceful shutdown): no
    /// round sent before counts any more.
    pub fn give_up(&mut self) {
        self.until = None;
        self.rounds.clear();
    }

    /// Until when the lease holds, if a round was granted.
    pub fn until(&self) -> Option<Duration> {
        self.until
    }
}

/// The meta leader's count of the voters' answers to a release of one shard's epoch.
#[derive(Debug, Clone, Default)]
pub struct ReleaseTally {
    released: BTreeMap<NodeId, Released>,
    held: BTreeSet<NodeId>,
}

/// Where a release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// Not yet a majority of every voter set either way.
    Waiting,
    /// A voter holds a live promise: the primary is alive for someone; no promotion.
    Held,
    /// A majority of every voter set released: the old primary's lease has ended. The highest
    /// floor and last offset they reported, and the lag of the one with the last offset.
    Released(Released),
}

impl ReleaseTally {
    /// Counts one voter's answer (a refusal other than `Held` counts as no answer).
    pub fn answer(&mut self, voter: NodeId, answer: Result<Released, ReleaseRefusal>) {
        match answer {
            Ok(r) => {
                self.released.insert(voter, r);
            }
            Err(ReleaseRefusal::Held { .. }) => {
                self.held.insert(voter);
            }
            Err(_) => {}
        }
    }

    /// The outcome over the voter sets in force during the last promise's length.
    pub fn outcome(&self, voter_sets: &[BTreeSet<NodeId>]) -> ReleaseOutcome {
        if !self.held.is_empty() {
            return ReleaseOutcome::Held;
        }
        let voters: BTreeSet<NodeId> = self.released.keys().copied().collect();
        if !majority_of_each(voter_sets, &voters) {
            return ReleaseOutcome::Waiting;
        }
        let last = self
            .released
            .values()
            .max_by_key(|r| r.last_offset)
            .copied()
            .unwrap_or(Released {
                last_offset: 0,
                floor: 0,
                lag_ms: 0,
            });
        let floor = self.released.values().map(|r| r.floor).max().unwrap_or(0);
        ReleaseOutcome::Released(Released { floor, ..last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_promise_outlasts_the_lease_by_its_drift_and_margin() {
        let c = LeaseConfig::default();
        assert_eq!(c.promise(), Duration::from_millis(560));
        assert!(c.is_safe());
        let unsafe_config = LeaseConfig {
            renew_every: Duration::from_millis(600),
            ..c
        };
        assert!(!unsafe_config.is_safe());
    }

    #[test]
    fn majorities_are_of_every_set_in_force() {
        let set = |v: &[NodeId]| v.iter().copied().collect::<BTreeSet<NodeId>>();
        assert!(majority_of_each(&[set(&[1, 2, 3])], &set(&[1, 3])));
        assert!(!majority_of_each(&[set(&[1, 2, 3])], &set(&[3])));
        // Changing from {1,2,3} to {2,3,4}: {1,2} is a majority of the old set only.
        let both = [set(&[1, 2, 3]), set(&[2, 3, 4])];
        assert!(!majority_of_each(&both, &set(&[1, 2])));
        assert!(majority_of_each(&both, &set(&[2, 3])));
        assert!(
            !majority_of_each(&[], &set(&[1, 2, 3])),
            "no set: no majority"
        );
        assert!(
            !majority_of_each(&[set(&[1, 2])], &set(&[1])),
            "half is no majority"
        );
    }
}
