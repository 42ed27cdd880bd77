//! A cross-shard transaction's commands, run at its prepare with their writes held aside.
//!
//! # Why
//!
//! A participant answers its commands' replies with its YES vote, so a client hears EXEC's
//! answer once every shard has prepared (one round of log entries), not after the commits too
//! (a second round): once every vote is YES the transaction is committed whoever finishes it
//! (the parallel-commit rule, `capdb_types::txn`). For that the commands must run at the
//! prepare. They run on an [`Overlay`]: reads see the shard's state with the transaction's own
//! earlier writes on top, writes stay in the overlay. What they would change is kept in the
//! transaction's record as a [`Redo`], and the commit applies it.
//!
//! # Why the redo is what running the commands at the commit would do
//!
//! From the prepare to the commit every key the commands touch is locked: nothing outside the
//! transaction changes them (writes are refused, `txn.rs`), so the state the redo was computed
//! on is the state it is applied to. The rest of what a command depends on is fixed at the
//! prepare: its clock and timestamp (the prepare entry's, so TTLs and random choices are the
//! same on every replica), and the collection ids it allocates, which come from the shard's
//! counter at once (ids are never reused: one allocated by a transaction that then aborts is
//! skipped, nothing more). The replies answered with the vote are therefore the commit's.
//!
//! # Costs and bounds
//!
//! The overlay holds what the transaction writes, at most [`REDO_BYTES_MAX`] per shard (a
//! command that would write more fails alone), plus, for a range read of a collection it has
//! changed, the elements that range returns. Dropping a collection is a removal of its record here; its elements are reclaimed
//! when the commit applies the redo, as any drop does ([`super::space`]).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use capdb_data::meta::CollMeta;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Result, Value};
use serde::{Deserialize, Serialize};

/// The shard's state (a [`Space`] of the writer's transaction, used only to read and to
/// allocate ids) with a transaction's writes on top.
pub(super) struct Overlay<'s> {
    base: &'s mut dyn Space,
    now_ms: u64,
    /// Top-level records written: the new value, or `None` once removed.
    top: BTreeMap<Bytes, Option<Value>>,
    /// Elements written, by collection id: subkey -> value, or `None` once removed.
    elements: BTreeMap<u64, BTreeMap<Bytes, Option<Bytes>>>,
    /// Ids allocated here: a collection created and dropped again inside the transaction
    /// leaves no elements behind (nothing would ever reclaim them).
    allocated: HashSet<u64>,
    /// Bytes written so far (keys and values, never decreasing), against [`REDO_BYTES_MAX`].
    bytes: usize,
    /// Undo records of the command running now (see [`Overlay::command`]).
    undo: Vec<Undo>,
}

/// What one write replaced in the overlay.
enum Undo {
    Top(Bytes, Option<Option<Value>>),
    Element(u64, Bytes, Option<Option<Bytes>>),
}

/// Most bytes a transaction's commands may write on one shard (the redo is kept in one record
/// row until the commit). A command that would pass it fails with a clear error and leaves
/// nothing in the overlay; the commands before it keep their effects, as in any transaction
/// where one command fails at run time. Equal to the MULTI queue's argument bytes, so only
/// commands that write far more than they were sent (COPY or *STORE of big collections) meet
/// it.
pub const REDO_BYTES_MAX: usize = 64 << 20;

/// What a transaction's commands change on one shard, as the commit applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Redo {
    /// Top-level records: the encoded value to store, or `None` to remove the key.
    pub(super) top: Vec<(Bytes, Option<Bytes>)>,
    /// Element records by collection id: (subkey, the value or `None` to remove it).
    pub(super) elements: Vec<(u64, Vec<ElementWrite>)>,
}

/// An element's subkey and its new value (`None`: removed).
pub(super) type ElementWrite = (Bytes, Option<Bytes>);

impl Redo {
    /// The ids of the collections the redo's records hold after it (a collection moved by
    /// RENAME is one of them: its elements stay).
    pub(super) fn kept_collections(&self) -> Result<HashSet<u64>> {
        let mut kept = HashSet::new();
        for (_, v) in &self.top {
            if let Some(raw) = v
                && let Some(meta) = CollMeta::of(&Value::decode(raw)?)?
            {
                kept.insert(meta.id);
            }
        }
        Ok(kept)
    }
}

impl<'s> Overlay<'s> {
    /// An empty overlay over `base`, whose reads are at `now_ms` (the prepare's clock).
    pub(super) fn new(base: &'s mut dyn Space, now_ms: u64) -> Overlay<'s> {
        Overlay {
            base,
            now_ms,
            top: BTreeMap::new(),
            elements: BTreeMap::new(),
            allocated: HashSet::new(),
            bytes: 0,
            undo: Vec::new(),
        }
    }

    /// Runs one command on the overlay (`Err` outside: a storage failure; inside: the
    /// command's error): if it fails, what it wrote is undone (commands fail before they
    /// write, except at the overlay's own bound).
    pub(super) fn command<T>(
        &mut self,
        run: impl FnOnce(&mut Overlay<'s>) -> Result<Result<T>>,
    ) -> Result<Result<T>> {
        self.undo.clear();
        let ran = run(self);
        if !matches!(ran, Ok(Ok(_))) {
            for undo in std::mem::take(&mut self.undo).into_iter().rev() {
                match undo {
                    Undo::Top(key, Some(before)) => {
                        self.top.insert(key, before);
                    }
                    Undo::Top(key, None) => {
                        self.top.remove(&key);
                    }
                    Undo::Element(id, sub, Some(before)) => {
                        self.element_writes(id).insert(sub, before);
                    }
                    Undo::Element(id, sub, None) => {
                        self.element_writes(id).remove(&sub);
                    }
                }
            }
        }
        self.undo.clear();
        ran
    }

    fn count(&mut self, bytes: usize) -> Result<()> {
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > REDO_BYTES_MAX {
            return Err(capdb_types::Error::InvalidInput(format!(
                "a cross-shard transaction may write at most {REDO_BYTES_MAX} bytes on one shard"
            )));
        }
        Ok(())
    }

    fn write_top(&mut self, key: &[u8], value: Option<Value>) -> Result<()> {
        self.count(key.len() + value.as_ref().map_or(0, |v| v.encoded_len()))?;
        let key = Bytes::copy_from_slice(key);
        let before = self.top.insert(key.clone(), value);
        self.undo.push(Undo::Top(key, before));
        Ok(())
    }

    fn write_element(&mut self, id: u64, sub: &[u8], value: Option<&[u8]>) -> Result<()> {
        self.count(sub.len() + value.map_or(0, <[u8]>::len))?;
        let sub = Bytes::copy_from_slice(sub);
        let before = self
            .element_writes(id)
            .insert(sub.clone(), value.map(Bytes::copy_from_slice));
        self.undo.push(Undo::Element(id, sub, before));
        Ok(())
    }

    /// What the commands run on this overlay change.
    pub(super) fn into_redo(self) -> Result<Redo> {
        let top: Vec<(Bytes, Option<Bytes>)> = self
            .top
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| Bytes::from(v.encode()))))
            .collect();
        let mut redo = Redo {
            top,
            elements: Vec::new(),
        };
        // Elements of collections born here that no record holds at the end are dropped
        // (one from before is reclaimed whole by the commit when its record goes).
        let kept = redo.kept_collections()?;
        redo.elements = self
            .elements
            .into_iter()
            .filter(|(id, _)| !self.allocated.contains(id) || kept.contains(id))
            .map(|(id, subs)| (id, subs.into_iter().collect()))
            .collect();
        Ok(redo)
    }

    fn element_writes(&mut self, id: u64) -> &mut BTreeMap<Bytes, Option<Bytes>> {
        self.elements.entry(id).or_default()
    }
}

impl Space for Overlay<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        match self.top.get(key) {
            Some(written) => Ok(written.clone().filter(|v| v.is_live(self.now_ms))),
            None => self.base.get(key),
        }
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        self.write_top(key, Some(value))
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        self.write_top(key, None)
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        // The record moves with its header and collection id; the elements stay under the id.
        let Some(value) = self.get(from)? else {
            return Ok(());
        };
        self.write_top(to, Some(value))?;
        self.write_top(from, None)
    }

    fn new_id(&mut self) -> Result<u64> {
        let id = self.base.new_id()?;
        self.allocated.insert(id);
        Ok(id)
    }

    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        match self.elements.get(&c.id).and_then(|subs| subs.get(sub)) {
            Some(written) => Ok(written.clone()),
            None => self.base.el_get(c, sub),
        }
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.write_element(c.id, sub, Some(value))
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        self.write_element(c.id, sub, None)
    }

    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        let Some(written) = self.elements.get(&c.id) else {
            return self.base.el_range(c, range);
        };
        // The base's first `limit` entries may include ones removed here: ask for as many
        // more as there are removals, so at least `limit` of those returned are still there.
        let removed = written.values().filter(|v| v.is_none()).count();
        let asked = range.limit.saturating_add(removed);
        let from_base = self.base.el_range(
            c,
            ElRange {
                limit: asked,
                ..range
            },
        )?;
        // A base answer cut at `asked` covers the range only up to its last subkey: a write
        // here beyond it could pass base entries that were not fetched.
        let edge = (from_base.len() >= asked)
            .then(|| from_base.last().map(|(s, _)| s.clone()))
            .flatten();
        let mut merged: BTreeMap<Bytes, Bytes> = from_base.into_iter().collect();
        for (sub, value) in written {
            if !range.contains(sub) {
                continue;
            }
            let beyond = edge
                .as_ref()
                .is_some_and(|e| if range.rev { sub < e } else { sub > e });
            match value {
                Some(v) if !beyond => {
                    merged.insert(sub.clone(), v.clone());
                }
                Some(_) => {}
                None => {
                    merged.remove(sub);
                }
            }
        }
        Ok(if range.rev {
            merged.into_iter().rev().take(range.limit).collect()
        } else {
            merged.into_iter().take(range.limit).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capdb_types::ValueKind;
    use std::ops::Bound;

    /// A plain in-memory space: the reference the overlay must agree with.
    #[derive(Default, Clone)]
    struct Mem {
        top: BTreeMap<Bytes, Value>,
        el: BTreeMap<(u64, Bytes), Bytes>,
        next: u64,
    }

    impl Space for Mem {
        fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
            Ok(self.top.get(key).cloned())
        }
        fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
            self.top.insert(Bytes::copy_from_slice(key), value);
            Ok(())
        }
        fn remove(&mut self, key: &[u8]) -> Result<()> {
            self.top.remove(key);
            Ok(())
        }
        fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
            if let Some(v) = self.top.remove(from) {
                self.top.insert(Bytes::copy_from_slice(to), v);
            }
            Ok(())
        }
        fn new_id(&mut self) -> Result<u64> {
            self.next += 1;
            Ok(self.next)
        }
        fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
            Ok(self.el.get(&(c.id, Bytes::copy_from_slice(sub))).cloned())
        }
        fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
            self.el.insert(
                (c.id, Bytes::copy_from_slice(sub)),
                Bytes::copy_from_slice(value),
            );
            Ok(())
        }
        fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
            self.el.remove(&(c.id, Bytes::copy_from_slice(sub)));
            Ok(())
        }
        fn el_range(&mut self, c: &Coll, r: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
            let all = self
                .el
                .iter()
                .filter(|((id, s), _)| *id == c.id && r.contains(s))
                .map(|((_, s), v)| (s.clone(), v.clone()));
            Ok(if r.rev {
                all.rev().take(r.limit).collect()
            } else {
                all.take(r.limit).collect()
            })
        }
    }

    fn coll() -> Coll {
        Coll {
            key: Bytes::from_static(b"h"),
            id: 7,
            kind: ValueKind::Hash,
        }
    }

    fn sub(i: u32) -> Vec<u8> {
        format!("f{i:03}").into_bytes()
    }

    /// Every range read through an overlay equals the same read of a space the writes were
    /// applied to, whatever mix of removals and additions the overlay holds.
    #[test]
    fn range_reads_see_the_writes_on_top_of_the_base() {
        let c = coll();
        for seed in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut base = Mem::default();
            for i in 0..40 {
                if rng.bool() {
                    base.el_put(&c, &sub(i), b"base").unwrap();
                }
            }
            let mut reference = base.clone();
            let mut overlay = Overlay::new(&mut base, 0);
            for _ in 0..rng.usize(0..30) {
                let s = sub(rng.u32(0..40));
                if rng.bool() {
                    overlay.el_put(&c, &s, b"new").unwrap();
                    reference.el_put(&c, &s, b"new").unwrap();
                } else {
                    overlay.el_remove(&c, &s).unwrap();
                    reference.el_remove(&c, &s).unwrap();
                }
            }
            for _ in 0..20 {
                let (a, b) = (sub(rng.u32(0..40)), sub(rng.u32(0..40)));
                let lo = match rng.u8(0..3) {
                    0 => Bound::Included(&a[..]),
                    1 => Bound::Excluded(&a[..]),
                    _ => Bound::Unbounded,
                };
                let hi = match rng.u8(0..3) {
                    0 => Bound::Included(&b[..]),
                    1 => Bound::Excluded(&b[..]),
                    _ => Bound::Unbounded,
                };
                let r = ElRange {
                    lo,
                    hi,
                    rev: rng.bool(),
                    limit: if rng.bool() {
                        usize::MAX
                    } else {
                        rng.usize(0..12)
                    },
                };
                assert_eq!(
                    overlay.el_range(&c, r).unwrap(),
                    reference.el_range(&c, r).unwrap(),
                    "seed {seed}, range {r:?}"
                );
            }
        }
    }

    #[test]
    fn writes_stay_in_the_overlay_and_come_out_as_the_redo() {
        let mut base = Mem::default();
        base.put(
            b"a",
            Value::new(Bytes::from_static(b"1"), Default::default(), None),
        )
        .unwrap();
        let mut overlay = Overlay::new(&mut base, 0);
        overlay.rename(b"a", b"b").unwrap();
        assert_eq!(overlay.get(b"a").unwrap(), None);
        assert!(overlay.get(b"b").unwrap().is_some());
        let redo = overlay.into_redo().unwrap();
        assert_eq!(redo.top.len(), 2);
        assert_eq!(redo.top[0], (Bytes::from_static(b"a"), None));
        assert!(base.get(b"a").unwrap().is_some(), "the base is untouched");
        assert!(base.get(b"b").unwrap().is_none());
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[test]
    fn a_command_past_the_bound_fails_and_leaves_nothing_and_dropped_new_collections_leave_no_elements()
     {
        struct Empty(u64);
        impl Space for Empty {
            fn get(&mut self, _: &[u8]) -> Result<Option<Value>> {
                Ok(None)
            }
            fn put(&mut self, _: &[u8], _: Value) -> Result<()> {
                unreachable!("the overlay never writes its base")
            }
            fn remove(&mut self, _: &[u8]) -> Result<()> {
                unreachable!("the overlay never writes its base")
            }
            fn rename(&mut self, _: &[u8], _: &[u8]) -> Result<()> {
                unreachable!("the overlay never writes its base")
            }
            fn new_id(&mut self) -> Result<u64> {
                self.0 += 1;
                Ok(self.0)
            }
            fn el_get(&mut self, _: &Coll, _: &[u8]) -> Result<Option<Bytes>> {
                Ok(None)
            }
            fn el_put(&mut self, _: &Coll, _: &[u8], _: &[u8]) -> Result<()> {
                unreachable!("the overlay never writes its base")
            }
            fn el_remove(&mut self, _: &Coll, _: &[u8]) -> Result<()> {
                unreachable!("the overlay never writes its base")
            }
            fn el_range(&mut self, _: &Coll, _: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
                Ok(Vec::new())
            }
        }
        let mut base = Empty(0);
        let mut o = Overlay::new(&mut base, 0);
        let id = o.new_id().unwrap();
        let c = Coll {
            key: Bytes::from_static(b"tmp"),
            id,
            kind: capdb_types::ValueKind::Set,
        };
        o.command(|o| Ok(o.el_put(&c, b"m", b""))).unwrap().unwrap();
        let big = vec![0u8; REDO_BYTES_MAX / 2];
        o.command(|o| Ok(o.el_put(&c, b"a", &big)))
            .unwrap()
            .unwrap();
        let failed = o
            .command(|o| {
                Ok(o.el_put(&c, b"b", b"1")
                    .and_then(|()| o.el_put(&c, b"c", &big)))
            })
            .unwrap();
        assert!(failed.is_err(), "past the bound");
        assert_eq!(
            o.el_get(&c, b"b").unwrap(),
            None,
            "the failed command left nothing"
        );
        assert!(
            o.el_get(&c, b"a").unwrap().is_some(),
            "earlier commands keep theirs"
        );
        // `tmp` never got a record: its elements do not reach the redo.
        assert!(o.into_redo().unwrap().elements.is_empty());
    }
}
