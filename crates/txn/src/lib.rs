//! `capdb-txn`: the coordinator of transactions that span several `cp` shards.
//!
//! The protocol is two-phase commit over the shards' Raft groups with the parallel-commit
//! decision rule (`ARCHITECTURE.md`, "Transactions"; the pure rules are
//! `capdb_types::txn`): the coordinator sends every participant shard its part of the
//! transaction as a *prepare* (one log entry there: locks, guards, staged writes and the
//! replies computed under the locks), and the transaction is committed exactly when every
//! participant holds a YES vote. It then answers the client and commits everywhere in the
//! background. A participant it cannot hear from is resolved by *preventing* it: once a
//! prevent is applied there, a late prepare can only vote NO, so the answer becomes certain.
//! The same resolution, run by the anchor shard's leader, finishes the transactions of a
//! coordinator that died ([`Coordinator::recover`]).
//!
//! What the client learns, and what it means ([`Finished`]):
//! - `Committed`: applied on every shard (replies in command order);
//! - `WatchFailed`: a watched key changed; nothing was applied (EXEC answers nil);
//! - `Conflict`: the keys stayed locked by other transactions through every retry; nothing
//!   was applied (`-TRYAGAIN`);
//! - `Unknown`: a participant stayed unreachable past the resolution deadline; the
//!   transaction may or may not commit, and the anchor's recovery decides it.
//!
//! # Boundaries
//!
//! This crate knows transactions, not transport or storage: it reaches participant shards
//! through the [`Participants`] trait (in the node: a proposal routed to the shard leader, with
//! the routing loop's retries) and must not depend on the server, Raft or storage crates.
//! That keeps the protocol testable on its own: `tests/simulation.rs` runs thousands of
//! concurrent transactions against simulated shards that lose requests and replies, and
//! checks that every transaction ends all-or-nothing.

pub mod coordinator;

pub use coordinator::{
    Answer, Config, Coordinator, CrashPoint, Finished, Metrics, Participants, Plan, PlanOf,
    PlannedCommand, Prepare, ShardStep, Step, Unreachable,
};
