//! Nemeses: the faults a run injects, planned from the seed before the run starts so a run can
//! be replayed (`--seed`). The plan alternates quiet periods, which let the cluster recover,
//! with fault windows; a window holds one fault or, one time in four, two at once.
//!
//! Faults: partitions (random halves, isolating the shard leader, a bridge node that sees both
//! sides, a ring where each node sees only its neighbours), kill -9 then restart (of the leader,
//! a minority, or, one time in six, every node at once), SIGSTOP then
//! SIGCONT, lossy links (nftables random drop: this kernel has no netem), and wall-clock
//! offsets. "Leader" targets are resolved when the window opens and written to the history.
//! `partition-leader` is the partition that always isolates the leader: the check that broken
//! reads are caught uses it, because the other shapes may leave every node in a majority (a
//! ring of five) and then a run can pass by luck.
//!
//! `kill-leader` is aimed: it kills (SIGKILL) the leader of the shard holding the workload's
//! keys (the `{cas}` slot; with one shard, every key) at a moment when writes sent through
//! other nodes are in flight, i.e. being forwarded to that leader. That is the moment a
//! forwarding node must decide what a broken connection means: the leader may have committed
//! the write before dying, so sending it again to the next leader can apply it twice. A plain
//! `kill` picks its victim blindly and rarely lands there.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::cluster::{Nodes, Status};
use crate::net::Topology;

/// A kind of fault, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Partition,
    Kill,
    Pause,
    Loss,
    Clock,
    KillLeader,
    /// A partition that always cuts the workload shard's leader off from everyone else: the
    /// one shape certain to leave a node that believes it leads while a majority moves on,
    /// which is what a check for stale reads needs to see.
    PartitionLeader,
}

/// How long `kill-leader` waits for a forwarded write to be in flight before it kills anyway.
const AIM_WAIT: Duration = Duration::from_secs(2);

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Partition,
        Kind::Kill,
        Kind::Pause,
        Kind::Loss,
        Kind::Clock,
        Kind::KillLeader,
    ];

    pub fn parse(s: &str) -> Result<Kind, String> {
        Ok(match s {
            "partition" => Kind::Partition,
            "kill" => Kind::Kill,
            "pause" => Kind::Pause,
            "loss" => Kind::Loss,
            "clock" => Kind::Clock,
            "kill-leader" => Kind::KillLeader,
            "partition-leader" => Kind::PartitionLeader,
            other => {
                return Err(format!(
                    "unknown nemesis '{other}': expected partition, partition-leader, kill, pause, loss, clock, kill-leader or all"
                ));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Halves,
    IsolateLeader,
    Bridge,
    Ring,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Leader,
    Nodes(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `order` is a seeded permutation of the nodes that the shape carves up.
    Partition {
        shape: Shape,
        order: Vec<u32>,
    },
    Kill(Target),
    Pause(Target),
    Loss {
        nodes: Vec<u32>,
        per_mille: u32,
    },
    Clock {
        offsets: Vec<(u32, i64)>,
    },
    /// Kill -9 the workload shard's leader while forwarded writes are in flight.
    KillLeader,
}

/// What an aimed fault needs to know about the workload.
pub struct Aim<'a> {
    /// Writes sent through non-leaders and not yet answered.
    pub forwarded_in_flight: &'a AtomicU64,
    /// The slot whose shard leader `kill-leader` kills.
    pub slot: u16,
}

#[derive(Debug, Clone)]
pub struct Window {
    pub number: u32,
    pub start: Duration,
    pub end: Duration,
    pub faults: Vec<Fault>,
}

/// Plans the fault windows for a run of `duration`.
pub fn plan(
    seed: u64,
    duration: Duration,
    kinds: &[Kind],
    nodes: u32,
    quiet: Duration,
    fault: (Duration, Duration),
) -> Vec<Window> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x6e656d65736973);
    let mut windows = Vec::new();
    let mut t = quiet;
    if kinds.is_empty() {
        return windows;
    }
    while t + fault.0 <= duration {
        let len =
            Duration::from_millis(rng.u64(fault.0.as_millis() as u64..=fault.1.as_millis() as u64));
        let end = (t + len).min(duration);
        let mut chosen = vec![kinds[rng.usize(0..kinds.len())]];
        if kinds.len() > 1 && rng.u8(0..4) == 0 {
            let second = kinds[rng.usize(0..kinds.len())];
            if second != chosen[0] {
                chosen.push(second);
            }
        }
        let faults = chosen
            .into_iter()
            .map(|k| fault_of(k, nodes, &mut rng))
            .collect();
        windows.push(Window {
            number: windows.len() as u32 + 1,
            start: t,
            end,
            faults,
        });
        t = end + quiet;
    }
    windows
}

fn fault_of(kind: Kind, n: u32, rng: &mut fastrand::Rng) -> Fault {
    let mut order: Vec<u32> = (1..=n).collect();
    rng.shuffle(&mut order);
    let minority = |rng: &mut fastrand::Rng, order: &[u32]| {
        let k = rng.usize(1..=((n as usize - 1) / 2).max(1));
        let mut v = order[..k].to_vec();
        v.sort();
        v
    };
    match kind {
        Kind::Partition => {
            let shape = match rng.u8(0..4) {
                0 => Shape::Halves,
                1 => Shape::IsolateLeader,
                2 if n >= 3 => Shape::Bridge,
                3 if n >= 4 => Shape::Ring,
                _ => Shape::Halves,
            };
            Fault::Partition { shape, order }
        }
        Kind::Kill | Kind::Pause => {
            let target = match rng.u8(0..6) {
                0 | 1 => Target::Leader,
                // A power loss: every node dies at once and comes back with only what it had
                // fsync'd. No majority is left to elect, so the old leaders come back first:
                // the fault that caught leaders restored with a stale state machine.
                2 if kind == Kind::Kill => Target::Nodes((1..=n).collect()),
                _ => Target::Nodes(minority(rng, &order)),
            };
            if kind == Kind::Kill {
                Fault::Kill(target)
            } else {
                Fault::Pause(target)
            }
        }
        Kind::Loss => {
            let k = rng.usize(1..=n as usize);
            let mut nodes = order[..k].to_vec();
            nodes.sort();
            Fault::Loss {
                nodes,
                per_mille: rng.u32(200..=400),
            }
        }
        Kind::KillLeader => Fault::KillLeader,
        Kind::PartitionLeader => Fault::Partition {
            shape: Shape::IsolateLeader,
            order,
        },
        Kind::Clock => {
            let mut offsets: Vec<(u32, i64)> = Vec::new();
            for &i in &order {
                if rng.bool() {
                    let ms = rng.i64(100..=120_000);
                    offsets.push((i, if rng.bool() { ms } else { -ms }));
                }
            }
            if offsets.is_empty() {
                offsets.push((order[0], rng.i64(100..=120_000)));
            }
            offsets.sort();
            Fault::Clock { offsets }
        }
    }
}

/// What must be undone when a window closes.
#[derive(Debug, Default)]
pub struct Undo {
    heal_links: bool,
    restart: Vec<u32>,
    resume: Vec<u32>,
    clear_loss: Vec<u32>,
    reset_clock: Vec<u32>,
}

fn set_text(nodes: &[u32]) -> String {
    let v: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    format!("{{{}}}", v.join(","))
}

async fn resolve(target: &Target, nodes: &Nodes, rng: &mut fastrand::Rng) -> (Vec<u32>, String) {
    match target {
        Target::Nodes(v) => (v.clone(), set_text(v)),
        Target::Leader => match nodes.leader().await {
            Some(l) => (vec![l], format!("leader {l}")),
            None => {
                let pick = rng.u32(1..=nodes.count());
                (vec![pick], format!("leader unknown, so node {pick}"))
            }
        },
    }
}

/// Applies a window's faults; returns what was done (for the history) and how to undo it.
pub async fn apply(
    window: &Window,
    topo: &Topology,
    nodes: &Nodes,
    rng: &mut fastrand::Rng,
    aim: &Aim<'_>,
) -> Result<(String, Undo), HarnessError> {
    let mut undo = Undo::default();
    let mut text = String::new();
    for fault in &window.faults {
        if !text.is_empty() {
            text.push_str(" + ");
        }
        match fault {
            Fault::Partition { shape, order } => {
                let (desc, sides) = partition_sides(shape, order, nodes).await;
                topo.set_links(|a, b| sides.iter().any(|s| s.contains(&a) && s.contains(&b)))?;
                undo.heal_links = true;
                text.push_str(&desc);
            }
            Fault::Kill(target) => {
                let (victims, desc) = resolve(target, nodes, rng).await;
                for &v in &victims {
                    nodes.kill(v);
                }
                undo.restart.extend(&victims);
                let _ = write!(text, "kill -9 {desc}");
            }
            Fault::Pause(target) => {
                let (victims, desc) = resolve(target, nodes, rng).await;
                for &v in &victims {
                    nodes.pause(v)?;
                }
                undo.resume.extend(&victims);
                let _ = write!(text, "pause (SIGSTOP) {desc}");
            }
            Fault::Loss {
                nodes: lossy,
                per_mille,
            } => {
                for &me in lossy {
                    let others: Vec<u32> = (1..=nodes.count()).filter(|&o| o != me).collect();
                    topo.set_loss(me, &others, *per_mille)?;
                }
                undo.clear_loss.extend(lossy);
                let _ = write!(
                    text,
                    "lossy links: {} drop {}% of peer packets",
                    set_text(lossy),
                    per_mille / 10
                );
            }
            Fault::KillLeader => text.push_str(&kill_leader(nodes, aim, &mut undo).await),
            Fault::Clock { offsets } => {
                let mut parts = Vec::new();
                for &(i, ms) in offsets {
                    // A node that is down or paused keeps its clock; that is fine.
                    if nodes.status(i) == Status::Running && nodes.set_clock(i, ms).await.is_ok() {
                        parts.push(format!("{i}:{ms:+}ms"));
                        undo.reset_clock.push(i);
                    }
                }
                let _ = write!(text, "clock offsets {}", parts.join(" "));
            }
        }
    }
    Ok((text, undo))
}

/// The sides of a partition of `order` into `shape` (a node talks only to nodes on a side
/// it is on), with its description for the history.
async fn partition_sides(shape: &Shape, order: &[u32], nodes: &Nodes) -> (String, Vec<Vec<u32>>) {
    let n = order.len();
    match shape {
        Shape::Halves => {
            let (a, b) = order.split_at(n / 2);
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort();
            b.sort();
            (
                format!("partition halves {} | {}", set_text(&a), set_text(&b)),
                vec![a, b],
            )
        }
        Shape::IsolateLeader => {
            let leader = nodes.leader().await.unwrap_or(order[0]);
            let rest: Vec<u32> = (1..=n as u32).filter(|&i| i != leader).collect();
            (
                format!(
                    "partition isolating leader {leader} from {}",
                    set_text(&rest)
                ),
                vec![vec![leader], rest],
            )
        }
        Shape::Bridge => {
            let bridge = order[0];
            let (a, b) = order[1..].split_at((n - 1) / 2);
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort();
            b.sort();
            let desc = format!(
                "partition bridge {bridge} between {} and {}",
                set_text(&a),
                set_text(&b)
            );
            a.push(bridge);
            b.push(bridge);
            (desc, vec![a, b])
        }
        Shape::Ring => {
            let ring: Vec<String> = order.iter().map(|i| i.to_string()).collect();
            let sides = (0..n)
                .map(|k| vec![order[(k + n - 1) % n], order[k], order[(k + 1) % n]])
                .collect();
            (format!("partition ring {}", ring.join("-")), sides)
        }
    }
}

/// `kill-leader`: kills the leader of the workload's shard once a forwarded write is in
/// flight (or after [`AIM_WAIT`]); returns what was done, for the history.
async fn kill_leader(nodes: &Nodes, aim: &Aim<'_>, undo: &mut Undo) -> String {
    // Resolve the leader first: the strike itself must follow the wait at once.
    let Some(leader) = nodes.leader_of_slot(aim.slot).await else {
        return "kill-leader: no leader known, nothing killed".to_string();
    };
    let deadline = Instant::now() + AIM_WAIT;
    let mut in_flight = aim.forwarded_in_flight.load(Ordering::SeqCst);
    while in_flight == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
        in_flight = aim.forwarded_in_flight.load(Ordering::SeqCst);
    }
    nodes.kill(leader);
    undo.restart.push(leader);
    format!(
        "kill -9 leader {leader} of the workload's shard with {in_flight} forwarded writes in flight"
    )
}

/// Undoes a window's faults: heal links, resume, restart, reset clocks.
pub async fn revert(undo: Undo, topo: &Topology, nodes: &Nodes) -> Result<(), HarnessError> {
    if undo.heal_links {
        topo.set_links(|_, _| true)?;
    }
    for i in undo.clear_loss {
        topo.set_loss(i, &[], 0)?;
    }
    for i in undo.resume {
        nodes.resume(i)?;
    }
    for i in undo.restart {
        nodes.start(i)?;
    }
    for i in undo.reset_clock {
        let _ = nodes.set_clock(i, 0).await;
    }
    Ok(())
}

/// Ends every fault: the final heal before the recovery period.
pub async fn heal_all(topo: &Topology, nodes: &Nodes) -> Result<(), HarnessError> {
    topo.heal()?;
    for i in 1..=nodes.count() {
        nodes.resume(i)?;
        nodes.start(i)?;
    }
    Ok(())
}

/// Resets every node's clock once they answer again (after [`heal_all`]).
pub async fn reset_clocks(nodes: &Nodes) {
    for i in 1..=nodes.count() {
        for _ in 0..20 {
            if nodes.set_clock(i, 0).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_plans_the_same_faults() {
        let p = |seed| {
            plan(
                seed,
                Duration::from_secs(300),
                &Kind::ALL,
                5,
                Duration::from_secs(5),
                (Duration::from_secs(5), Duration::from_secs(15)),
            )
        };
        let a: Vec<_> = p(7)
            .into_iter()
            .map(|w| (w.start, w.end, w.faults))
            .collect();
        let b: Vec<_> = p(7)
            .into_iter()
            .map(|w| (w.start, w.end, w.faults))
            .collect();
        let c: Vec<_> = p(8)
            .into_iter()
            .map(|w| (w.start, w.end, w.faults))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() >= 10);
        // Windows never overlap and leave quiet time between them.
        for pair in a.windows(2) {
            assert!(pair[1].0 >= pair[0].1 + Duration::from_secs(5));
        }
        // Every kind shows up in a long enough plan.
        let all: Vec<_> = a.iter().flat_map(|w| w.2.iter()).collect();
        assert!(all.iter().any(|f| matches!(f, Fault::Partition { .. })));
        assert!(all.iter().any(|f| matches!(f, Fault::Kill(_))));
        assert!(all.iter().any(|f| matches!(f, Fault::Pause(_))));
        assert!(all.iter().any(|f| matches!(f, Fault::Loss { .. })));
        assert!(all.iter().any(|f| matches!(f, Fault::Clock { .. })));
        assert!(all.iter().any(|f| matches!(f, Fault::KillLeader)));
    }

    #[test]
    fn kills_strike_the_leader_a_minority_or_every_node_and_pauses_never_every_node() {
        let mut seen_all = false;
        for seed in 0..64 {
            let windows = plan(
                seed,
                Duration::from_secs(600),
                &[Kind::Kill, Kind::Pause],
                5,
                Duration::from_secs(5),
                (Duration::from_secs(5), Duration::from_secs(15)),
            );
            for fault in windows.iter().flat_map(|w| &w.faults) {
                match fault {
                    Fault::Kill(Target::Nodes(v)) if v.len() == 5 => seen_all = true,
                    Fault::Kill(Target::Nodes(v)) | Fault::Pause(Target::Nodes(v)) => {
                        assert!(!v.is_empty() && v.len() <= 2, "{fault:?}")
                    }
                    Fault::Kill(Target::Leader) | Fault::Pause(Target::Leader) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(seen_all, "no power loss planned in 64 seeds");
    }
}
