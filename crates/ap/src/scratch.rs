//! Data-type string and key commands (GETEX, SETRANGE, BITFIELD, RENAME, ...) in `ap`
//! keyspaces: evaluated at the coordinator on the versions it read, like every `ap`
//! read-modify-write.
//!
//! The coordinator reads each key the command names at the request's level, runs the command
//! on a [`Scratch`] space holding those values, and replicates what the command wrote (each
//! key to its own shard) as new versions stamped with one timestamp. As for APPEND or SET GET,
//! a concurrent writer can win (last writer wins); nothing is atomic across keys.
//!
//! Hashes, lists, sets and sorted sets are refused here ([`collections_refused`]): their
//! elements need per-element merge rules across replicas that are not built yet.

use std::collections::HashMap;

use bytes::Bytes;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Error, Result, Value};

/// The answer to a hash, list, set or sorted-set command on an `ap` keyspace: nothing applied.
pub fn collections_refused() -> Error {
    Error::Command(
        "ERR hashes, lists, sets and sorted sets are not available on ap keyspaces yet (they need conflict-free merging across replicas); use a cp or cache keyspace".into(),
    )
}

/// The values a command may read, and what it wrote, in order.
pub(crate) struct Scratch {
    pub(crate) values: HashMap<Bytes, Option<Value>>,
    pub(crate) writes: Vec<(Bytes, Option<Value>)>,
}

impl Space for Scratch {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        Ok(self.values.get(key).cloned().flatten())
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        if !value.is_string() {
            return Err(collections_refused());
        }
        let key = Bytes::copy_from_slice(key);
        self.values.insert(key.clone(), Some(value.clone()));
        self.writes.push((key, Some(value)));
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        let key = Bytes::copy_from_slice(key);
        self.values.insert(key.clone(), None);
        self.writes.push((key, None));
        Ok(())
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        let Some(v) = self.get(from)? else {
            return Ok(());
        };
        self.put(to, v)?;
        self.remove(from)
    }

    fn new_id(&mut self) -> Result<u64> {
        Err(collections_refused())
    }

    fn el_get(&mut self, _: &Coll, _: &[u8]) -> Result<Option<Bytes>> {
        Err(collections_refused())
    }

    fn el_put(&mut self, _: &Coll, _: &[u8], _: &[u8]) -> Result<()> {
        Err(collections_refused())
    }

    fn el_remove(&mut self, _: &Coll, _: &[u8]) -> Result<()> {
        Err(collections_refused())
    }

    fn el_range(&mut self, _: &Coll, _: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        Err(collections_refused())
    }
}
