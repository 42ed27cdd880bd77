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
//! - A **release** (the meta leader's, before a promotion) comes after the epoch's fence is
//!   committed (`MetaCommand::CacheFence`): a voter that has applied the fence refuses the
//!   epoch's renewals for good (the map is durable: a restart cannot forget it, as it could
//!   forget a release held in memory), and answers the release once its own promise has passed.
//!   A majority of released voters ([`ReleaseTally`]) intersects the majority of the old
//!   primary's last lease, so that lease has ended before the promotion commits: no two
//!   primaries write in overlapping time.
//!
//! Time is the caller's monotonic clock as a [`Duration`] since any origin (one per process: a
//! voter's and a primary's are never compared, only their rates are bounded by ρ). Nothing here
//! reads a clock, so the rules run in scripts (`tests/lease/*.txt`).
//!
//! # What the callers must add (not here yet)
//!
//! - The voter sets: a primary counts grants against the sets it is given, and a voter grants
//!   whatever its map allows. A renewal must carry the primary's view of the meta membership,
//!   and a voter refuse one that differs from its own or once it is no voter; a new meta leader
//!   must count the previous set for one promise after its election.
//! - The WAIT floor lives in the voters' memory only: a voter's restart forgets it. The freeze
//!   (replicas' own offsets) must back it before a promotion relies on it.

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

    /// Whether the rules are safe with these figures: a promise outlasts, in real time, any
    /// lease a grant extends (`promise ≥ lease·(1 + ρ)/(1 − ρ)`, with a margin above 0), and
    /// the rounds kept cover a lease.
    pub fn is_safe(&self) -> bool {
        let drift_ok = self.drift.is_finite() && (0.0..0.5).contains(&self.drift);
        drift_ok
            && !self.margin.is_zero()
            && self.renew_every < self.lease
            && self.promise().as_secs_f64()
                >= self.lease.as_secs_f64() * (1.0 + self.drift) / (1.0 - self.drift)
            && self.renew_every * ROUNDS_KEPT_MAX as u32 >= self.lease
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
    /// The voter's map has this epoch fenced: a promotion is under way.
    Fenced,
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
    /// The voter has not applied the epoch's fence yet (or knows no such shard).
    NotFenced,
}

/// One shard's state at a voter.
#[derive(Debug, Clone, PartialEq)]
struct Promise {
    epoch: u64,
    primary: NodeId,
    /// The grant holds until then (the voter's clock).
    until: Duration,
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
    /// When this voter first saw each shard's current epoch without a promise for it: the
    /// start of the wait before it suspects a primary that never renewed ([`Self::expired`]).
    unrenewed_since: BTreeMap<ShardRef, (u64, Duration)>,
}

impl VoterTable {
    /// A voter's table, started at `now`.
    pub fn new(config: LeaseConfig, now: Duration) -> VoterTable {
        assert!(config.is_safe(), "unsafe lease config: {config:?}");
        VoterTable {
            config,
            started: now,
            shards: BTreeMap::new(),
            unrenewed_since: BTreeMap::new(),
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
        if named.fenced >= r.epoch {
            return Err(RenewRefusal::Fenced);
        }
        let until = now + self.config.promise();
        let fresh = Promise {
            epoch: r.epoch,
            primary: r.primary,
            until,
            offset: r.offset,
            floor: r.floor,
            lag_ms: r.lag_ms,
        };
        let p = self
            .shards
            .entry((r.keyspace.clone(), r.shard))
            .or_insert_with(|| fresh.clone());
        if p.epoch != r.epoch {
            // A new epoch: what an older one reported says nothing of it (a lossy failover
            // restarts the stream below the old primary's last offset).
            *p = fresh;
        }
        p.until = p.until.max(until);
        p.offset = p.offset.max(r.offset);
        p.floor = p.floor.max(r.floor);
        p.lag_ms = r.lag_ms;
        Ok(())
    }

    /// Answers the meta leader's release of `shard` in `epoch` at `now`, judged by this
    /// voter's applied `map` (which must hold the epoch's fence): the epoch's last reported
    /// offsets, once no promise of this voter's may still hold.
    pub fn release(
        &mut self,
        now: Duration,
        map: &ClusterState,
        shard: &ShardRef,
        epoch: u64,
    ) -> Result<Released, ReleaseRefusal> {
        let named = map
            .cache_shard(&shard.0, shard.1 as usize)
            .ok_or(ReleaseRefusal::NotFenced)?;
        if named.epoch > epoch {
            return Err(ReleaseRefusal::Superseded { epoch: named.epoch });
        }
        if named.fenced < epoch {
            return Err(ReleaseRefusal::NotFenced);
        }
        let just_started = self.started + self.config.promise();
        if now < just_started {
            return Err(ReleaseRefusal::JustStarted {
                for_ms: millis_until(now, just_started),
            });
        }
        match self.shards.get(shard) {
            Some(p) if p.epoch == epoch && now < p.until => Err(ReleaseRefusal::Held {
                for_ms: millis_until(now, p.until),
            }),
            Some(p) if p.epoch == epoch => Ok(Released {
                last_offset: p.offset,
                floor: p.floor,
                lag_ms: p.lag_ms,
            }),
            _ => Ok(Released {
                last_offset: 0,
                floor: 0,
                lag_ms: 0,
            }),
        }
    }

    /// Ends this voter's promise to `primary` for `shard` in `epoch` at once: the primary gave
    /// its lease up ([`PrimaryLease::give_up`]) for a hand-off or a graceful shutdown. A
    /// relinquish of another primary or epoch changes nothing.
    pub fn relinquish(&mut self, now: Duration, shard: &ShardRef, epoch: u64, primary: NodeId) {
        if let Some(p) = self.shards.get_mut(shard)
            && p.epoch == epoch
            && p.primary == primary
        {
            p.until = p.until.min(now);
        }
    }

    /// The primaries this voter suspects at `now`, by its applied `map`: `(shard, epoch,
    /// primary)` of every cache shard whose current primary holds no live promise here, and
    /// has held none for one promise's length (since its last grant ended, or since this voter
    /// first saw the epoch unrenewed, or started). Fenced epochs are being ended already.
    pub fn expired(&mut self, now: Duration, map: &ClusterState) -> Vec<(ShardRef, u64, NodeId)> {
        let mut out = Vec::new();
        let mut unrenewed = BTreeMap::new();
        for (ks, shards) in &map.cache {
            for (i, c) in shards.iter().enumerate() {
                if c.fenced >= c.epoch {
                    continue;
                }
                let shard = (ks.clone(), i as u32);
                let suspect = match self.shards.get(&shard) {
                    Some(p) if p.epoch == c.epoch && p.primary == c.primary => p.until <= now,
                    _ => {
                        let since = match self.unrenewed_since.get(&shard) {
                            Some(&(epoch, since)) if epoch == c.epoch => since,
                            _ => now.max(self.started),
                        };
                        unrenewed.insert(shard.clone(), (c.epoch, since));
                        since + self.config.promise() <= now
                    }
                };
                if suspect {
                    out.push((shard, c.epoch, c.primary));
                }
            }
        }
        self.unrenewed_since = unrenewed;
        out
    }

    /// Forgets shards the map no longer has (a dropped keyspace): the table stays bounded by the
    /// map's cache shards.
    pub fn retain_mapped(&mut self, map: &ClusterState) {
        self.shards
            .retain(|(ks, i), _| map.cache_shard(ks, *i as usize).is_some());
        self.unrenewed_since
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

/// Round numbers, unique in the process: a late grant of another lease's round (an earlier
/// epoch's, or a lease given up and taken again) never counts for this one.
static NEXT_ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A primary's lease on one shard in one epoch.
#[derive(Debug, Clone)]
pub struct PrimaryLease {
    config: LeaseConfig,
    epoch: u64,
    /// May write while `now <` this (the primary's clock).
    until: Option<Duration>,
    /// Rounds sent and not yet granted: `round -> (sent at, voters that granted)`.
    rounds: BTreeMap<u64, (Duration, BTreeSet<NodeId>)>,
    /// Given up: no round counts any more, for good.
    given_up: bool,
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
            rounds: BTreeMap::new(),
            given_up: false,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Starts a renewal round sent at `now`: its number, to match grants with. At most
    /// [`ROUNDS_KEPT_MAX`] rounds wait; older ones are dropped (their grants would come late).
    pub fn start_round(&mut self, now: Duration) -> u64 {
        let round = NEXT_ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.given_up {
            return round;
        }
        self.rounds.insert(round, (now, BTreeSet::new()));
        while self.rounds.len() > ROUNDS_KEPT_MAX {
            self.rounds.pop_first();
        }
        round
    }

    /// Counts `voter`'s grant of `round` of `epoch`. Once a majority of every set in
    /// `voter_sets` (the voter sets in force: the old and new one while the set changes)
    /// granted it, the lease runs to the round's send plus a lease, and the round and older
    /// ones are done. A grant of another epoch, or after [`Self::give_up`], counts nothing.
    pub fn granted(
        &mut self,
        epoch: u64,
        round: u64,
        voter: NodeId,
        voter_sets: &[BTreeSet<NodeId>],
    ) {
        if epoch != self.epoch || self.given_up {
            return;
        }
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

    /// Stops writing at once and for good (before a hand-off's `Relinquish`, or a graceful
    /// shutdown): no round counts any more, sent before or after.
    pub fn give_up(&mut self) {
        self.until = None;
        self.rounds.clear();
        self.given_up = true;
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
        for unsafe_config in [
            LeaseConfig {
                renew_every: Duration::from_millis(600),
                ..c
            },
            LeaseConfig {
                margin: Duration::ZERO,
                ..c
            },
            LeaseConfig { drift: 0.5, ..c },
            LeaseConfig {
                drift: f64::INFINITY,
                ..c
            },
            LeaseConfig {
                drift: f64::NAN,
                ..c
            },
            // Rounds kept (16) must cover a lease.
            LeaseConfig {
                renew_every: Duration::from_millis(10),
                ..c
            },
        ] {
            assert!(!unsafe_config.is_safe(), "{unsafe_config:?}");
        }
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
