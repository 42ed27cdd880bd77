//! Reference spaces: [`MapSpace`] (ordered maps, what family tests and property tests run on,
//! and what engines are checked against) and [`EmptySpace`] (nothing stored, read-only: running
//! a command on it surfaces its argument errors without touching data).

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Error, Result, Value};

use crate::meta::CollMeta;
use crate::space::{Coll, ElRange, Space};

/// Every record in ordered maps; reclaims a replaced collection's elements at once.
#[derive(Debug, Default, Clone)]
pub struct MapSpace {
    pub now_ms: u64,
    pub top: BTreeMap<Bytes, Value>,
    pub elements: BTreeMap<(u64, Vec<u8>), Bytes>,
    pub next_id: u64,
}

impl MapSpace {
    pub fn new(now_ms: u64) -> MapSpace {
        MapSpace {
            now_ms,
            ..MapSpace::default()
        }
    }

    fn reclaim_replaced(&mut self, key: &[u8], new_id: Option<u64>) -> Result<()> {
        let Some(old) = self.top.get(key) else {
            return Ok(());
        };
        if let Some(meta) = CollMeta::of(old)?
            && Some(meta.id) != new_id
        {
            self.elements.retain(|(id, _), _| *id != meta.id);
        }
        Ok(())
    }
}

impl Space for MapSpace {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        Ok(self
            .top
            .get(key)
            .filter(|v| v.is_live(self.now_ms))
            .cloned())
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        let new_id = CollMeta::of(&value)?.map(|m| m.id);
        self.reclaim_replaced(key, new_id)?;
        self.top.insert(Bytes::copy_from_slice(key), value);
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        self.reclaim_replaced(key, None)?;
        self.top.remove(key);
        Ok(())
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        let Some(value) = self.get(from)? else {
            return Err(Error::Io("rename of a key without a live record".into()));
        };
        if from == to {
            return Ok(());
        }
        // Elements are stored under the collection's id, not its key: moving the top-level
        // record moves them.
        let id = CollMeta::of(&value)?.map(|m| m.id);
        self.reclaim_replaced(to, id)?;
        self.top.remove(from);
        self.top.insert(Bytes::copy_from_slice(to), value);
        Ok(())
    }

    fn new_id(&mut self) -> Result<u64> {
        self.next_id += 1;
        Ok(self.next_id)
    }

    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.elements.get(&(c.id, sub.to_vec())).cloned())
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.elements
            .insert((c.id, sub.to_vec()), Bytes::copy_from_slice(value));
        Ok(())
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        self.elements.remove(&(c.id, sub.to_vec()));
        Ok(())
    }

    fn el_range(&mut self, c: &Coll, r: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        let lo = match r.lo {
            Bound::Included(s) => Bound::Included((c.id, s.to_vec())),
            Bound::Excluded(s) => Bound::Excluded((c.id, s.to_vec())),
            Bound::Unbounded => Bound::Included((c.id, Vec::new())),
        };
        let hi = match r.hi {
            Bound::Included(s) => Bound::Included((c.id, s.to_vec())),
            Bound::Excluded(s) => Bound::Excluded((c.id, s.to_vec())),
            Bound::Unbounded => Bound::Excluded((c.id + 1, Vec::new())),
        };
        if matches!((&lo, &hi), (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) if a > b)
        {
            return Ok(Vec::new());
        }
        let it = self.elements.range((lo, hi));
        let pick = |(k, v): (&(u64, Vec<u8>), &Bytes)| (Bytes::copy_from_slice(&k.1), v.clone());
        Ok(if r.rev {
            it.rev().take(r.limit).map(pick).collect()
        } else {
            it.take(r.limit).map(pick).collect()
        })
    }
}

/// No data, no writes: a command run on it fails at its first argument error, or at the first
/// write, or answers as for missing keys.
pub struct EmptySpace;

fn read_only() -> Error {
    Error::Io("read-only space".into())
}

impl Space for EmptySpace {
    fn get(&mut self, _: &[u8]) -> Result<Option<Value>> {
        Ok(None)
    }
    fn put(&mut self, _: &[u8], _: Value) -> Result<()> {
        Err(read_only())
    }
    fn remove(&mut self, _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn rename(&mut self, _: &[u8], _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn new_id(&mut self) -> Result<u64> {
        Err(read_only())
    }
    fn el_get(&mut self, _: &Coll, _: &[u8]) -> Result<Option<Bytes>> {
        Ok(None)
    }
    fn el_put(&mut self, _: &Coll, _: &[u8], _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn el_remove(&mut self, _: &Coll, _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn el_range(&mut self, _: &Coll, _: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        Ok(Vec::new())
    }
}

/// Helpers of the families' unit tests: commands written as words, one clock, one seed.
#[cfg(test)]
pub(crate) mod words {
    use bytes::Bytes;
    use capdb_types::{Reply, Result, Timestamp};

    use super::MapSpace;
    use crate::command::Ctx;

    /// The clock of every test: the space's and the command's.
    pub const NOW: u64 = 1_000_000;

    pub fn cx() -> Ctx {
        Ctx {
            now_ms: NOW,
            timestamp: Timestamp(1),
            seed: 7,
            value_bytes_max: 1 << 20,
        }
    }

    pub fn space() -> MapSpace {
        MapSpace::new(NOW)
    }

    /// Runs a command given as words (split on whitespace; `\xNN` escapes allowed).
    pub fn run(space: &mut MapSpace, cmd: &str) -> Result<Reply> {
        run_with(space, cmd, &cx())
    }

    pub fn run_with(space: &mut MapSpace, cmd: &str, cx: &Ctx) -> Result<Reply> {
        let args: Vec<Bytes> = cmd.split_whitespace().map(unescape).collect();
        crate::execute(&args, space, cx)
    }

    pub fn unescape(word: &str) -> Bytes {
        let mut out = Vec::new();
        let b = word.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 3 < b.len() {
                let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        Bytes::from(out)
    }
}
