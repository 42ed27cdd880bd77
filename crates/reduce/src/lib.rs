//! What a job or a view computes, independent of where it runs (issue 15,
//! `docs/design/mapreduce.md` §2–§3): the spec ([`spec`]), extractors over keys and JSON values
//! ([`extract`], [`json_path`]), exact numbers ([`num`]), accumulators that merge in any order
//! ([`acc`], [`sketch`]) and the partial results tasks send ([`partial`]).
//!
//! # Why a crate of its own
//!
//! It is pure: no storage, no Raft, no network, no user code. So the apply path (views, later)
//! can link it without linking Lua, a simulation can run jobs without a cluster, and the
//! algebra the design stands on (any split and merge order gives the one-pass answer; a
//! retraction undoes an addition) is checked here by property tests.

pub mod acc;
pub mod extract;
pub mod group_key;
pub mod json_path;
pub mod num;
pub mod partial;
pub mod sketch;
pub mod spec;

pub use group_key::GroupKey;
pub use partial::{Accs, JobError, Mapped, Merged, Partial, Plan, Run};
pub use spec::{JobSpec, SpecError};
