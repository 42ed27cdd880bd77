//! `capdb chaos`: Jepsen-style testing of capdb.
//!
//! A run starts real `capdb server` processes, each in its own network namespace on a shared
//! bridge ([`net`], [`cluster`]); drives workloads through real Redis-protocol clients while
//! recording every operation ([`workload`], [`history`]), mostly through followers of the keys'
//! shard so writes take the forwarding path ([`route`]); injects faults planned from a seed
//! ([`nemesis`]); heals, lets the cluster recover and reads everything back; then checks the
//! history ([`check`]: linearizability of registers, counters, sets; transactions: list-append
//! and bank) and writes a report with a timeline picture ([`report`]). [`run::run`] ties it
//! together.
//!
//! Why real processes and namespaces rather than simulation: they exercise the binary users
//! run, its real sockets, fsyncs and timers, which is what a Jepsen test is for. The price is
//! nondeterministic timing: the seed replays the fault plan and the workload's choices, not the
//! exact interleaving.

pub mod check;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod route;
pub mod run;
pub mod stream;
pub mod view;
pub mod workload;

/// The harness itself failed (could not build namespaces, start nodes, write files): the
/// run says nothing about capdb. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);
