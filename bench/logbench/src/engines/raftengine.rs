//! raft-engine 0.4.2 (TiKV): `Engine::write(batch, sync = true)` per batch, one region per
//! group, log recycling on with prefilled files, no compression (the other engines do not
//! compress either). Old entries are compacted and expired files purged (then recycled) as the
//! log grows, as TiKV does after its Raft log GC.

use std::path::Path;

use protobuf::well_known_types::BytesValue;
use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize};

use super::{GROUPS_MAX, KEEP, PURGE_EVERY};
use crate::{Entry, LogEngine, Result, ctx};

/// Entries are protobuf messages for raft-engine; a `BytesValue` whose first 8 bytes are the
/// index stands in for a Raft entry.
#[derive(Clone)]
pub struct M;

impl MessageExt for M {
    type Entry = BytesValue;

    fn index(e: &BytesValue) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&e.value[..8]);
        u64::from_le_bytes(b)
    }
}

pub struct RaftEngineLog {
    engine: Engine,
    next: [u64; GROUPS_MAX],
    entries: Vec<BytesValue>,
}

impl RaftEngineLog {
    pub fn open(dir: &Path) -> Result<RaftEngineLog> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(ctx(format!("remove {}", dir.display())))?;
        }
        std::fs::create_dir_all(dir).map_err(ctx(format!("create {}", dir.display())))?;
        let cfg = Config {
            dir: dir.to_str().ok_or("non-UTF-8 path")?.to_string(),
            target_file_size: ReadableSize::mb(32),
            purge_threshold: ReadableSize::mb(128),
            enable_log_recycle: true,
            prefill_for_recycle: true,
            batch_compression_threshold: ReadableSize(0),
            ..Config::default()
        };
        let engine = Engine::open(cfg).map_err(ctx("raft-engine open"))?;
        Ok(RaftEngineLog {
            engine,
            next: [1; GROUPS_MAX],
            entries: Vec::with_capacity(64),
        })
    }
}

impl LogEngine for RaftEngineLog {
    fn next_index(&self, group: u64) -> u64 {
        self.next[group as usize]
    }

    fn append(&mut self, batch: &[Entry<'_>]) -> Result<()> {
        let mut lb = LogBatch::with_capacity(batch.len());
        let mut purge = Vec::new();
        let mut i = 0;
        while i < batch.len() {
            let g = batch[i].group;
            self.entries.clear();
            while i < batch.len() && batch[i].group == g {
                let e = &batch[i];
                let mut value = Vec::with_capacity(8 + e.payload.len());
                value.extend_from_slice(&e.index.to_le_bytes());
                value.extend_from_slice(e.payload);
                let mut m = BytesValue::new();
                m.value = value;
                self.entries.push(m);
                if e.index % PURGE_EVERY == 0 && e.index > KEEP {
                    purge.push((g + 1, e.index - KEEP));
                }
                self.next[g as usize] = e.index + 1;
                i += 1;
            }
            lb.add_entries::<M>(g + 1, &self.entries)
                .map_err(ctx("raft-engine add_entries"))?;
        }
        self.engine
            .write(&mut lb, true)
            .map_err(ctx("raft-engine write"))?;
        if !purge.is_empty() {
            for (region, to) in purge {
                self.engine.compact_to(region, to);
            }
            self.engine
                .purge_expired_files()
                .map_err(ctx("raft-engine purge"))?;
        }
        Ok(())
    }
}
