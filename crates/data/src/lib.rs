//! Redis's data types as commands over a [`Space`]: hashes, lists, sets and sorted sets, with
//! Redis's replies, error texts, `WRONGTYPE` and empty-key deletion written once.
//!
//! It must not depend on storage, Raft, `ap` or the network: engines implement [`Space`] and
//! call [`execute`]; this crate only decides what a command means.
//!
//! # Why commands, and why element records
//!
//! - **The log carries the command** ([`capdb_types::Mutation::Exec`]: its argument list), as
//!   Redis replicates commands. A `cp` state machine runs it with the entry's clock and seed
//!   ([`Ctx`]) against its own data, so every replica computes the same result, and adding a
//!   command never changes the shape of anything in a log or snapshot.
//! - **A collection is a meta record plus one record per element.** The key's top-level record
//!   (a [`capdb_types::Value`] whose kind is hash/list/set/zset) holds the TTL and a small
//!   [`meta::CollMeta`] (element count, a collection id, list ends). Each field, member or list
//!   item is its own record in an element space under `id ‖ subkey`, so changing one field of a
//!   million-field hash writes two small records, never the whole hash. SCAN, DBSIZE, TYPE, TTL
//!   and EXPIRE see the meta record as one key, unchanged.
//! - **Ids, not key names, prefix elements**, and an id is never reused: a key deleted and
//!   re-created (even within one command) can never see old elements, and an engine can reclaim
//!   a dead collection's elements whenever it likes (see [`Space::put`]).
//!
//! # Layout
//!
//! - [`space`]: the contract engines implement ([`Space`]) and [`testing::MapSpace`], the
//!   reference implementation the family tests run on;
//! - [`meta`]: meta records, and the one place `WRONGTYPE` and empty-key deletion are decided;
//! - [`command`]: the command table (arity, flags, key positions, read or write), lookup, and
//!   [`execute`];
//! - [`format`]: numbers as Redis parses and prints them; [`glob`]: Redis's MATCH patterns;
//!   [`scan`]: HSCAN/SSCAN/ZSCAN cursors; [`rng`]: the seeded generator random commands use;
//! - families: [`hash`], [`list`], [`set`], [`zset`], [`strings`], [`bits`], [`hll`], [`keys`];
//! - [`point`]: which elements a command names (what `ap` fetches instead of a whole collection);
//! - [`dump`]: DUMP and RESTORE in Redis's payload format (its RDB codec in [`dump::rdb`]).

pub mod bits;
pub mod command;
pub mod dump;
pub mod format;
pub mod glob;
pub mod hash;
pub mod hll;
pub mod keys;
pub mod list;
pub mod meta;
pub mod notify;
pub mod point;
pub mod rng;
pub mod scan;
pub mod set;
pub mod space;
pub mod strings;
pub mod testing;
pub mod txn_reads;
pub mod zset;

pub use command::{Ctx, Run, Spec, execute, lookup};
pub use space::{Coll, ElRange, Space};
