//! The `_meta` table: small per-node and per-group records (see [`crate::layout`]).

use capdb_types::Result;
use redb::ReadableTable;

use super::ops::Op;
use super::{DiskEngine, META_TABLE, io_err};

/// A `_meta` change: put (`Some`) or delete (`None`).
pub type MetaItem = (String, Option<Vec<u8>>);

impl DiskEngine {
    /// Every `(key, value)` of the meta table whose key starts with `prefix`.
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META_TABLE).map_err(io_err)?;
        meta_prefixed(&table, prefix)
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

    /// One `_meta` entry.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.begin_read()?;
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

/// Every `(key, value)` of an open meta table whose key starts with `prefix`, in key order.
pub(super) fn meta_prefixed(
    table: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
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
