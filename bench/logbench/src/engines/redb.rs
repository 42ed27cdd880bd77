//! redb as capdb uses it today (crates/storage/src/disk/{writer,log}.rs): one table per group
//! (`raftlog/{g}`, u64 -> record with a CRC-32), one write transaction per batch,
//! `Durability::Immediate`. The purge of old entries rides in the same transaction (capdb gives
//! it a durable transaction of its own, so this is kind to redb).

use std::path::Path;

use redb::{Database, Durability, TableDefinition};

use super::{GROUPS_MAX, KEEP, PURGE_EVERY};
use crate::{Entry, LogEngine, Result, ctx};

pub struct RedbLog {
    db: Database,
    names: Vec<String>,
    next: [u64; GROUPS_MAX],
    record: Vec<u8>,
}

impl RedbLog {
    pub fn open(dir: &Path) -> Result<RedbLog> {
        std::fs::create_dir_all(dir).map_err(ctx(format!("create {}", dir.display())))?;
        let path = dir.join("capdb.redb");
        // A fresh file per bench process, as a node's file is after its first minutes.
        if path.exists() {
            std::fs::remove_file(&path).map_err(ctx(format!("remove {}", path.display())))?;
        }
        let db = Database::create(&path).map_err(ctx(format!("create {}", path.display())))?;
        Ok(RedbLog {
            db,
            names: (0..GROUPS_MAX).map(|g| format!("raftlog/{g}")).collect(),
            next: [1; GROUPS_MAX],
            record: Vec::with_capacity(512),
        })
    }
}

impl LogEngine for RedbLog {
    fn next_index(&self, group: u64) -> u64 {
        self.next[group as usize]
    }

    fn append(&mut self, batch: &[Entry<'_>]) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(ctx("redb begin_write"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(ctx("redb set_durability"))?;
        let mut i = 0;
        while i < batch.len() {
            let g = batch[i].group as usize;
            let def: TableDefinition<'_, u64, &[u8]> = TableDefinition::new(&self.names[g]);
            let mut t = txn.open_table(def).map_err(ctx("redb open_table"))?;
            while i < batch.len() && batch[i].group as usize == g {
                let e = &batch[i];
                self.record.clear();
                self.record.extend_from_slice(e.payload);
                let crc = crc32fast::hash(&self.record);
                self.record.extend_from_slice(&crc.to_le_bytes());
                t.insert(e.index, self.record.as_slice())
                    .map_err(ctx("redb insert"))?;
                if e.index % PURGE_EVERY == 0 && e.index > KEEP {
                    t.retain_in(..e.index - KEEP, |_, _| false)
                        .map_err(ctx("redb purge"))?;
                }
                self.next[g] = e.index + 1;
                i += 1;
            }
        }
        txn.commit().map_err(ctx("redb commit"))?;
        Ok(())
    }
}
