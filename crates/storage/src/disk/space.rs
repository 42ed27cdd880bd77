//! Data-type commands on redb: the [`Space`] of one keyspace table and its element table.
//!
//! A collection's meta record lives in the keyspace table like any value; its elements live in
//! the element table ([`crate::layout::element_table`]) under `u64be(id) ‖ subkey`, each value
//! prefixed with its CRC-32 (so corrupt elements are refused like corrupt values). The id range
//! 0 is reserved for the table's own rows: `0 ‖ "next-id"` (the id counter: written only by
//! applying commands, so it is replicated state in a `cp` shard) and `0 ‖ "gc" ‖ u64be(id)` (a
//! dead collection whose elements are reclaimed later, in bounded steps).
//!
//! [`TxnSpace`] runs writes inside the writer's transaction; [`ReadSpace`] runs queries on one
//! read transaction (one MVCC snapshot, so a query sees one consistent state).

use std::ops::Bound;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_data::meta::CollMeta;
use capdb_data::{Coll, ElRange, Space};
use capdb_types::{Error, Result, Value};
use redb::{ReadableTable, WriteTransaction};

use super::overlay::Redo;
use super::{EngineStats, io_err, table_def};

type RawTable<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;
type Guard<'a> = redb::AccessGuard<'a, &'static [u8]>;
type RangeItem<'a> = std::result::Result<(Guard<'a>, Guard<'a>), redb::StorageError>;

/// Collections with at most this many elements are reclaimed in the command that drops them;
/// bigger ones are queued (Redis's lazyfree threshold), so one DEL never stalls the writer.
pub const RECLAIM_INLINE_MAX: u64 = 64;
/// Elements one reclaim step deletes at most.
pub const RECLAIM_STEP_MAX: usize = 4_096;

const RESERVED: [u8; 8] = [0; 8];

fn reserved(name: &[u8]) -> Vec<u8> {
    let mut k = RESERVED.to_vec();
    k.extend_from_slice(name);
    k
}

fn gc_row(id: u64) -> Vec<u8> {
    let mut k = reserved(b"gc");
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn element_key(id: u64, sub: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + sub.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(sub);
    k
}

fn seal(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + value.len());
    out.extend_from_slice(&crc32fast::hash(value).to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn unseal(raw: &[u8], stats: &EngineStats) -> Result<Bytes> {
    let ok = raw.len() >= 4 && raw[..4] == crc32fast::hash(&raw[4..]).to_le_bytes();
    if !ok {
        stats.corruptions.fetch_add(1, Ordering::Relaxed);
        return Err(Error::Corruption("element checksum mismatch".into()));
    }
    Ok(Bytes::copy_from_slice(&raw[4..]))
}

/// The live top-level record of `key` (corrupt records are counted and refused).
fn live_in<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
    now_ms: u64,
    stats: &EngineStats,
) -> Result<Option<Value>> {
    let Some(raw) = t.get(key).map_err(io_err)? else {
        return Ok(None);
    };
    let v = Value::decode(raw.value()).inspect_err(|_| {
        stats.corruptions.fetch_add(1, Ordering::Relaxed);
    })?;
    Ok(v.is_live(now_ms).then_some(v))
}

fn el_get_in<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    c: &Coll,
    sub: &[u8],
    stats: &EngineStats,
) -> Result<Option<Bytes>> {
    match t.get(&element_key(c.id, sub)[..]).map_err(io_err)? {
        Some(raw) => unseal(raw.value(), stats).map(Some),
        None => Ok(None),
    }
}

fn el_range_in<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    c: &Coll,
    r: ElRange<'_>,
    stats: &EngineStats,
) -> Result<Vec<(Bytes, Bytes)>> {
    let bound = |b: Bound<&[u8]>, end: bool| match b {
        Bound::Included(s) => Bound::Included(element_key(c.id, s)),
        Bound::Excluded(s) => Bound::Excluded(element_key(c.id, s)),
        Bound::Unbounded if end => Bound::Excluded(element_key(c.id + 1, b"")),
        Bound::Unbounded => Bound::Included(element_key(c.id, b"")),
    };
    let (lo, hi) = (bound(r.lo, false), bound(r.hi, true));
    if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
        (&lo, &hi)
        && (a > b || (a == b && !matches!((&lo, &hi), (Bound::Included(_), Bound::Included(_)))))
    {
        return Ok(Vec::new());
    }
    fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        match b {
            Bound::Included(v) => Bound::Included(&v[..]),
            Bound::Excluded(v) => Bound::Excluded(&v[..]),
            Bound::Unbounded => Bound::Unbounded,
        }
    }
    let range = t
        .range::<&[u8]>((as_ref(&lo), as_ref(&hi)))
        .map_err(io_err)?;
    let mut out = Vec::new();
    let mut push = |e: RangeItem<'_>| -> Result<()> {
        let (k, v) = e.map_err(io_err)?;
        out.push((
            Bytes::copy_from_slice(&k.value()[8..]),
            unseal(v.value(), stats)?,
        ));
        Ok(())
    };
    if r.rev {
        for e in range.rev().take(r.limit) {
            push(e)?;
        }
    } else {
        for e in range.take(r.limit) {
            push(e)?;
        }
    }
    Ok(out)
}

/// A keyspace table and its element table inside the writer's transaction.
pub(super) struct TxnSpace<'a, 'txn> {
    pub(super) txn: &'txn WriteTransaction,
    pub(super) top: &'a mut RawTable<'txn>,
    pub(super) el_name: String,
    pub(super) el: Option<RawTable<'txn>>,
    pub(super) now_ms: u64,
    pub(super) stats: &'a EngineStats,
}

impl<'a, 'txn> TxnSpace<'a, 'txn> {
    /// The space of `table` (whose open handle is `top`) and its element table, opened on
    /// first use, in the batch's transaction.
    pub(super) fn new(
        x: &'a super::ops::Exec<'txn>,
        table: &str,
        top: &'a mut RawTable<'txn>,
        now_ms: u64,
    ) -> TxnSpace<'a, 'txn> {
        TxnSpace {
            txn: x.txn,
            top,
            el_name: crate::layout::element_table(table),
            el: None,
            now_ms,
            stats: x.stats,
        }
    }

    fn el(&mut self) -> Result<&mut RawTable<'txn>> {
        if self.el.is_none() {
            self.el = Some(
                self.txn
                    .open_table(table_def(&self.el_name))
                    .map_err(io_err)?,
            );
        }
        Ok(self.el.as_mut().expect("opened above"))
    }

    /// The collection the stored record of `key` (live or expired) holds, if any.
    fn stored_collection(&self, key: &[u8]) -> Result<Option<CollMeta>> {
        let Some(raw) = self.top.get(key).map_err(io_err)? else {
            return Ok(None);
        };
        match Value::decode(raw.value()) {
            Ok(v) => CollMeta::of(&v),
            // A corrupt record being replaced: its elements (if any) cannot be found.
            Err(_) => Ok(None),
        }
    }

    /// Reclaims a dead collection's elements: now when small, else queued (see module doc).
    pub(super) fn reclaim(&mut self, meta: CollMeta) -> Result<()> {
        let el = self.el()?;
        let lo = element_key(meta.id, b"");
        let hi = element_key(meta.id + 1, b"");
        let mut keys = Vec::new();
        for e in el
            .range::<&[u8]>(&lo[..]..&hi[..])
            .map_err(io_err)?
            .take(RECLAIM_INLINE_MAX as usize + 1)
        {
            keys.push(e.map_err(io_err)?.0.value().to_vec());
        }
        if keys.len() as u64 > RECLAIM_INLINE_MAX {
            el.insert(&gc_row(meta.id)[..], &[][..]).map_err(io_err)?;
            return Ok(());
        }
        for k in keys {
            el.remove(&k[..]).map_err(io_err)?;
        }
        Ok(())
    }

    /// Reclaims the collection `key` holds unless `keep_id` (the new record's) is its id.
    pub(super) fn replacing(&mut self, key: &[u8], keep_id: Option<u64>) -> Result<()> {
        if let Some(old) = self.stored_collection(key)?
            && Some(old.id) != keep_id
        {
            self.reclaim(old)?;
        }
        Ok(())
    }
}

impl TxnSpace<'_, '_> {
    /// Applies a cross-shard transaction's [`Redo`] (`overlay.rs`) at its commit: its records,
    /// then its elements, then reclaims the collections its records replaced (unless one of
    /// them still holds it: RENAME moves a collection).
    pub(super) fn apply_redo(&mut self, redo: &Redo) -> Result<()> {
        let kept = redo.kept_collections()?;
        let mut dropped = Vec::new();
        for (key, value) in &redo.top {
            if let Some(old) = self.stored_collection(key)?
                && !kept.contains(&old.id)
            {
                dropped.push(old);
            }
            match value {
                Some(raw) => {
                    self.top.insert(&key[..], &raw[..]).map_err(io_err)?;
                }
                None => {
                    self.top.remove(&key[..]).map_err(io_err)?;
                }
            }
        }
        for (id, subs) in &redo.elements {
            let el = self.el()?;
            for (sub, value) in subs {
                let k = element_key(*id, sub);
                match value {
                    Some(v) => {
                        el.insert(&k[..], &seal(v)[..]).map_err(io_err)?;
                    }
                    None => {
                        el.remove(&k[..]).map_err(io_err)?;
                    }
                }
            }
        }
        for old in dropped {
            self.reclaim(old)?;
        }
        Ok(())
    }
}

impl Space for TxnSpace<'_, '_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        live_in(&*self.top, key, self.now_ms, self.stats)
    }

    fn put(&mut self, key: &[u8], value: Value) -> Result<()> {
        let keep = CollMeta::of(&value)?.map(|m| m.id);
        self.replacing(key, keep)?;
        self.top.insert(key, &value.encode()[..]).map_err(io_err)?;
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        self.replacing(key, None)?;
        self.top.remove(key).map_err(io_err)?;
        Ok(())
    }

    fn new_id(&mut self) -> Result<u64> {
        let row = reserved(b"next-id");
        let el = self.el()?;
        let next =
            match el.get(&row[..]).map_err(io_err)? {
                Some(raw) => u64::from_le_bytes(raw.value().try_into().map_err(|_| {
                    Error::Corruption("collection id counter is not 8 bytes".into())
                })?),
                None => 1,
            };
        el.insert(&row[..], &(next + 1).to_le_bytes()[..])
            .map_err(io_err)?;
        Ok(next)
    }

    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        let stats = self.stats;
        el_get_in(self.el()?, c, sub, stats)
    }

    fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<()> {
        self.el()?
            .insert(&element_key(c.id, sub)[..], &seal(value)[..])
            .map_err(io_err)?;
        Ok(())
    }

    fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> Result<()> {
        self.el()?
            .remove(&element_key(c.id, sub)[..])
            .map_err(io_err)?;
        Ok(())
    }

    fn el_insert(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> Result<bool> {
        let old = self
            .el()?
            .insert(&element_key(c.id, sub)[..], &seal(value)[..])
            .map_err(io_err)?;
        Ok(old.is_none())
    }

    fn el_delete(&mut self, c: &Coll, sub: &[u8]) -> Result<bool> {
        let old = self
            .el()?
            .remove(&element_key(c.id, sub)[..])
            .map_err(io_err)?;
        Ok(old.is_some())
    }

    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        let stats = self.stats;
        el_range_in(self.el()?, c, range, stats)
    }

    fn rename(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        let Some(raw) = self
            .top
            .get(from)
            .map_err(io_err)?
            .map(|r| r.value().to_vec())
        else {
            return Ok(());
        };
        let value = Value::decode(&raw)?;
        if !value.is_live(self.now_ms) {
            return Ok(());
        }
        let moved = CollMeta::of(&value)?.map(|m| m.id);
        self.replacing(to, moved)?;
        self.top.insert(to, &raw[..]).map_err(io_err)?;
        self.top.remove(from).map_err(io_err)?;
        Ok(())
    }
}

/// Whether any dead collection waits to be reclaimed.
pub(super) fn reclaim_queued<T: ReadableTable<&'static [u8], &'static [u8]>>(
    el: &T,
) -> Result<bool> {
    let lo = reserved(b"gc");
    let mut hi = lo.clone();
    *hi.last_mut().expect("non-empty") += 1;
    Ok(el
        .range::<&[u8]>(&lo[..]..&hi[..])
        .map_err(io_err)?
        .next()
        .is_some())
}

/// Deletes up to [`RECLAIM_STEP_MAX`] elements of queued dead collections; returns how many.
pub(super) fn reclaim_step(el: &mut RawTable<'_>) -> Result<u64> {
    let lo = reserved(b"gc");
    let mut hi = lo.clone();
    *hi.last_mut().expect("non-empty") += 1;
    let mut queued = Vec::new();
    for e in el
        .range::<&[u8]>(&lo[..]..&hi[..])
        .map_err(io_err)?
        .take(16)
    {
        queued.push(e.map_err(io_err)?.0.value().to_vec());
    }
    let mut deleted = 0u64;
    for row in queued {
        let id = u64::from_be_bytes(row[row.len() - 8..].try_into().expect("8 bytes"));
        let (from, to) = (element_key(id, b""), element_key(id + 1, b""));
        let mut keys = Vec::new();
        for e in el
            .range::<&[u8]>(&from[..]..&to[..])
            .map_err(io_err)?
            .take(RECLAIM_STEP_MAX - deleted as usize)
        {
            keys.push(e.map_err(io_err)?.0.value().to_vec());
        }
        let done = keys.len() < RECLAIM_STEP_MAX - deleted as usize;
        for k in &keys {
            el.remove(&k[..]).map_err(io_err)?;
        }
        deleted += keys.len() as u64;
        if done {
            el.remove(&row[..]).map_err(io_err)?;
        }
        if deleted as usize >= RECLAIM_STEP_MAX {
            break;
        }
    }
    Ok(deleted)
}

/// A keyspace table and its element table in one read transaction (queries).
pub(super) struct ReadSpace<'a> {
    pub(super) top: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    pub(super) el: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    pub(super) now_ms: u64,
    pub(super) stats: &'a EngineStats,
}

fn read_only() -> Error {
    Error::Io("a query tried to write (an engine bug)".into())
}

impl Space for ReadSpace<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Value>> {
        match &self.top {
            Some(top) => live_in(top, key, self.now_ms, self.stats),
            None => Ok(None),
        }
    }
    fn put(&mut self, _: &[u8], _: Value) -> Result<()> {
        Err(read_only())
    }
    fn remove(&mut self, _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn new_id(&mut self) -> Result<u64> {
        Err(read_only())
    }
    fn el_get(&mut self, c: &Coll, sub: &[u8]) -> Result<Option<Bytes>> {
        match &self.el {
            Some(t) => el_get_in(t, c, sub, self.stats),
            None => Ok(None),
        }
    }
    fn el_put(&mut self, _: &Coll, _: &[u8], _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn el_remove(&mut self, _: &Coll, _: &[u8]) -> Result<()> {
        Err(read_only())
    }
    fn el_range(&mut self, c: &Coll, range: ElRange<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        match &self.el {
            Some(t) => el_range_in(t, c, range, self.stats),
            None => Ok(Vec::new()),
        }
    }
    fn rename(&mut self, _: &[u8], _: &[u8]) -> Result<()> {
        Err(read_only())
    }
}
