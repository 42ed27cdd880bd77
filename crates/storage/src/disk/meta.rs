//! The `_meta` table: small per-node and per-group records (see [`crate::layout`]).

use capdb_types::Result;
use redb::{ReadableDatabase, ReadableTable};

use super::ops::Op;
use super::{DiskEngine, META_TABLE, io_err};

/// A `_meta` change: put (`Some`) or delete (`None`).
pub type MetaItem = (String, Option<Vec<u8>>);

impl DiskEngine {
    /// Every `(key, value)` of the meta table whose key starts with `prefix`.
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META_TABLE).map_err(io_err)?;
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Puts or deletes `_meta` entries; waits for durability when `durable`.
    pub async fn meta_put(
        &self,
        items: Vec<(String, Option<Vec<u8>>)>,
        durable: bool,
    ) -> Result<()> {
        self.submit(Op::MetaPut { items, durable })
            .await?
            .into_done()
    }

    /// Puts or deletes `_meta` entries with whatever batch the writer commits next, without a
    /// commit (or a wait) of their own: for hints that a crash may lose and a later put
    /// supersedes, such as a Raft group's committed index (re-learned from the leader).
    /// [`DiskEngine::meta_get`] sees them at once (except while the batch that took them
    /// commits); [`DiskEngine::meta_list`] only once committed. A later deferred put of the same key replaces an
    /// earlier one still waiting, so at most one value per key waits (bounded by the keys the
    /// callers use: one per Raft group for the committed index).
    pub fn meta_put_deferred(&self, items: Vec<MetaItem>) {
        let mut waiting = self.deferred_meta.lock();
        for (k, v) in items {
            waiting.insert(k, v);
        }
    }

    /// One `_meta` entry (a deferred put still waiting included).
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(waiting) = self.deferred_meta.lock().get(key) {
            return Ok(waiting.clone());
        }
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META_TABLE).map_err(io_err)?;
        Ok(table.get(key).map_err(io_err)?.map(|v| v.value().to_vec()))
    }
}

/// Applies `_meta` puts and deletes.
pub(super) fn put_meta(mt: &mut redb::Table<&str, &[u8]>, items: &[MetaItem]) -> Result<()> {
    for (k, v) in items {
        match v {
            Some(v) => {
                mt.insert(k.as_str(), &v[..]).map_err(io_err)?;
            }
            None => {
                mt.remove(k.as_str()).map_err(io_err)?;
            }
        }
    }
    Ok(())
}

/// Deletes every `_meta` entry whose key starts with `prefix`.
pub(super) fn remove_meta_prefix(mt: &mut redb::Table<&str, &[u8]>, prefix: &str) -> Result<()> {
    let mut doomed = Vec::new();
    for entry in mt.range(prefix..).map_err(io_err)? {
        let (k, _) = entry.map_err(io_err)?;
        if !k.value().starts_with(prefix) {
            break;
        }
        doomed.push(k.value().to_string());
    }
    for k in doomed {
        mt.remove(k.as_str()).map_err(io_err)?;
    }
    Ok(())
}
