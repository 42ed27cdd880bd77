//! A keyspace's table: reads and scans on the caller's thread, writes through the writer.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use capdb_types::{Error, Mutation, Reply, Result, Value};
use redb::{ReadableTable, ReadableTableMetadata, TableError};

use super::ops::Op;
use super::space::ReadSpace;
use super::{DiskTable, io_err, table_def};
use crate::{BatchReplies, KeyspaceStore, ScanPage, ScanRange};

/// Most stored entries a scan page examines (live or not) before returning, so a range full of
/// expired keys or tombstones cannot make one call unbounded.
pub const SCAN_EXAMINE_MAX: usize = 100_000;

impl DiskTable {
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T>,
    ) -> Result<Option<T>> {
        let txn = self.begin_read()?;
        match txn.open_table(table_def(&self.table)) {
            Ok(t) => f(&t).map(Some),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    pub(super) fn decode(&self, raw: &[u8]) -> Result<Value> {
        Value::decode(raw).inspect_err(|e| {
            self.engine
                .stats
                .corruptions
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(table = %self.table, error = %e, "corrupt value refused");
        })
    }

    /// Active expiry: examines up to `examine` keys after `after` and deletes those that have
    /// expired. Returns where to continue (`None`: wrapped around to the start).
    pub async fn sweep_expired(
        &self,
        after: Option<Bytes>,
        examine: usize,
        now_ms: u64,
    ) -> Result<(Option<Bytes>, u64)> {
        let found = self.read(|t| {
            let mut expired = Vec::new();
            let mut last = None;
            let iter = match &after {
                Some(a) => t.range::<&[u8]>((
                    std::ops::Bound::Excluded(&a[..]),
                    std::ops::Bound::Unbounded,
                )),
                None => t.range::<&[u8]>(..),
            }
            .map_err(io_err)?;
            for entry in iter.take(examine) {
                let (k, v) = entry.map_err(io_err)?;
                let key = Bytes::copy_from_slice(k.value());
                if let Ok(value) = Value::decode(v.value())
                    && value.is_expired(now_ms)
                {
                    expired.push(key.clone());
                }
                last = Some(key);
            }
            Ok((expired, last))
        })?;
        let Some((expired, last)) = found else {
            return Ok((None, 0));
        };
        let removed = if expired.is_empty() {
            0
        } else {
            self.engine
                .submit(Op::RemoveExpired {
                    table: self.table.clone(),
                    keys: expired,
                    now_ms,
                    tombstones: self.tombstones,
                })
                .await?
                .into_count()?
        };
        Ok((last, removed))
    }
}

/// `ap` replica operations: raw versions (tombstones and expired values included), merges.
impl DiskTable {
    /// Calls `f` on every stored version in key order (tombstones included) until it returns
    /// false. Corrupt records are reported and skipped.
    pub fn for_each_raw(&self, f: impl FnMut(&[u8], Value) -> bool) -> Result<()> {
        self.for_each_raw_after(None, f)
    }

    /// Like [`DiskTable::for_each_raw`], starting after `after` (exclusive).
    pub fn for_each_raw_after(
        &self,
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], Value) -> bool,
    ) -> Result<()> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.read(|t| {
            for entry in t
                .range::<&[u8]>((lower, Bound::Unbounded))
                .map_err(io_err)?
            {
                let (k, v) = entry.map_err(io_err)?;
                if let Ok(value) = self.decode(v.value())
                    && !f(k.value(), value)
                {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// This node's increment of a counter; returns the new version. Durable when it returns.
    pub async fn counter_add(
        &self,
        key: Bytes,
        node: u64,
        delta: i64,
        timestamp: capdb_types::Timestamp,
        now_ms: u64,
    ) -> Result<Value> {
        self.engine
            .submit(Op::CounterAdd {
                table: self.table.clone(),
                key,
                node,
                delta,
                timestamp,
                now_ms,
            })
            .await?
            .into_value()
    }

    /// Removes tombstones every replica is known to hold (`entries`: keys; `elements`: element
    /// records of `ap` collections, see `ap.rs`); returns how many went.
    pub async fn purge_tombstones(
        &self,
        entries: Vec<(Bytes, capdb_types::Timestamp)>,
        elements: Vec<(Bytes, capdb_types::Timestamp)>,
    ) -> Result<u64> {
        self.engine
            .submit(Op::PurgeTombstones {
                table: self.table.clone(),
                entries,
                elements,
            })
            .await?
            .into_count()
    }
}

impl DiskTable {
    /// Deletes up to [`super::space::RECLAIM_STEP_MAX`] elements of dead collections (see
    /// `space.rs`); returns how many, 0 when nothing is queued.
    pub async fn reclaim_step(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let queued = match txn.open_table(table_def(&crate::layout::element_table(&self.table))) {
            Ok(el) => super::space::reclaim_queued(&el)?,
            Err(TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(io_err(e)),
        };
        drop(txn);
        if !queued {
            return Ok(0);
        }
        self.engine
            .submit(Op::Reclaim {
                table: self.table.clone(),
            })
            .await?
            .into_count()
    }
}

impl DiskTable {
    /// Reads the table's element table in one snapshot (`None`: it does not exist yet).
    fn read_elements<T>(
        &self,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static [u8], &'static [u8]>) -> Result<T>,
    ) -> Result<Option<T>> {
        let txn = self.begin_read()?;
        match txn.open_table(table_def(&crate::layout::element_table(&self.table))) {
            Ok(el) => f(&el).map(Some),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }

    /// The cross-shard transaction that holds a write lock on one of `keys` (a linearizable
    /// read of them waits until it is gone: `txn.rs`).
    pub fn write_locked(&self, keys: &[Bytes]) -> Result<Option<capdb_types::txn::TxnId>> {
        Ok(self
            .read_elements(|el| super::txn::read_blocker(el, keys))?
            .flatten())
    }

    /// `keys`' live values, read from one snapshot (one read transaction: a linearizable GET's
    /// whole storage cost), or the cross-shard transaction that holds a write lock on one of
    /// them in that snapshot (the read then waits: `txn.rs`).
    pub fn get_unless_locked(
        &self,
        keys: &[Bytes],
        now_ms: u64,
    ) -> Result<std::result::Result<Vec<Option<Value>>, capdb_types::txn::TxnId>> {
        let txn = self.begin_read()?;
        match txn.open_table(table_def(&crate::layout::element_table(&self.table))) {
            Ok(el) => {
                if let Some(holder) = super::txn::read_blocker(&el, keys)? {
                    return Ok(Err(holder));
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(io_err(e)),
        }
        let t = match txn.open_table(table_def(&self.table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Ok(vec![None; keys.len()])),
            Err(e) => return Err(io_err(e)),
        };
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let v = match t.get(&k[..]).map_err(io_err)? {
                Some(raw) => Some(self.decode(raw.value())?),
                None => None,
            };
            out.push(v.filter(|v| v.is_live(now_ms)));
        }
        Ok(Ok(out))
    }

    /// The change-log events with IDs in `from..=to`, ascending (descending when `rev`), at
    /// most `count` (and [`super::CHANGES_READ_MAX`]), from one snapshot (`changes.rs`).
    pub fn changes(
        &self,
        from: capdb_types::changes::StreamId,
        to: capdb_types::changes::StreamId,
        count: usize,
        rev: bool,
    ) -> Result<Vec<capdb_types::changes::Change>> {
        let txn = self.begin_read()?;
        super::changes::read(&txn, &self.table, from, to, count, rev)
    }

    /// [`super::CHANGES_QUERY`] `shard from to count rev [whole]`: the change log read as a
    /// query, so that it is routed, fenced and forwarded like any read of the shard. Answers
    /// `[on (0|1), events held, last ID, [[id, [field, value, ...]], ...], closed clock,
    /// more (0|1), floor ID]` (`more`: it stopped at a bound; `closed`: every event logged later gets a
    /// clock above it).
    fn changes_query(&self, args: &[Bytes]) -> Result<Reply> {
        let bad = || Error::InvalidInput("malformed change-log query".into());
        // `whole` (optional): never stop inside an entry (a merged reader's page).
        let (shard, from, to, count, rev, whole) = match args {
            [_, shard, from, to, count, rev] => (shard, from, to, count, rev, false),
            [_, shard, from, to, count, rev, whole] => {
                (shard, from, to, count, rev, whole.as_ref() == b"1")
            }
            _ => return Err(bad()),
        };
        let number = |b: &Bytes| -> Result<u64> {
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        let id = |b: &Bytes| capdb_types::changes::StreamId::parse_with(b, 0);
        let shard = u32::try_from(number(shard)?).map_err(|_| bad())?;
        let txn = self.begin_read()?;
        let info = super::changes::info(&txn, &self.table)?;
        // Off: no rows to read (the caller says the changes are off).
        let (changes, more) = if info.on {
            super::changes::read_page(
                &txn,
                &self.table,
                id(from)?,
                id(to)?,
                usize::try_from(number(count)?).unwrap_or(usize::MAX),
                number(rev)? == 1,
                whole,
            )?
        } else {
            (Vec::new(), false)
        };
        Ok(Reply::Array(vec![
            Reply::Integer(i64::from(info.on)),
            Reply::Integer(i64::try_from(info.events).unwrap_or(i64::MAX)),
            Reply::Bulk(Bytes::from(info.last.to_string())),
            Reply::Array(changes.iter().map(|c| c.to_reply(shard)).collect()),
            Reply::Bulk(Bytes::from(info.closed.0.to_string())),
            Reply::Integer(i64::from(more)),
            Reply::Bulk(Bytes::from(info.floor.unwrap_or_default().to_string())),
        ]))
    }

    /// [`super::CHANGES_SNAPSHOT_QUERY`] `from|after key prefix count`: the live keys from
    /// the first (`from`, `key` ignored) or after `key` that start with `prefix`, at most
    /// `count` (and [`super::SNAPSHOT_PAGE_MAX`], about [`super::CHANGES_READ_BYTES_MAX`],
    /// examining at most [`super::SNAPSHOT_EXAMINE_MAX`] rows), read from one snapshot
    /// together with where the change log stood in it. Answers `[on, clock, closed, [[key,
    /// type, data, expire_at_ms|""], ...], next]`: `on` whether the log is on, `clock` the
    /// last logged entry's stream clock (every later change logs above it), `closed` the
    /// shard's closed clock, `data` a string's value or a collection's DUMP payload (Redis's
    /// format, RESTORE-able), `next` the last key examined when more may follow (else nil).
    fn changes_snapshot_query(&self, args: &[Bytes], now_ms: u64) -> Result<Reply> {
        use std::ops::Bound;
        let bad = || Error::InvalidInput("malformed change-log snapshot query".into());
        let [_, mode, after, prefix, count] = args else {
            return Err(bad());
        };
        let after: Option<&Bytes> = match mode.as_ref() {
            b"from" => None,
            b"after" => Some(after),
            _ => return Err(bad()),
        };
        let count = std::str::from_utf8(count)
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .ok_or_else(bad)?
            .clamp(1, super::SNAPSHOT_PAGE_MAX);
        let txn = self.begin_read()?;
        let info = super::changes::info(&txn, &self.table)?;
        let open = |name: &str| match txn.open_table(table_def(name)) {
            Ok(t) => Ok(Some(t)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        };
        let keys = open(&self.table)?;
        let mut space = ReadSpace {
            top: open(&self.table)?,
            el: open(&crate::layout::element_table(&self.table))?,
            now_ms,
            stats: &self.engine.stats,
        };
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: capdb_types::Timestamp::ZERO,
            seed: 0,
            value_bytes_max: self.engine.value_bytes_max,
        };
        let lower = match after {
            Some(a) if a[..] >= prefix[..] => Bound::Excluded(&a[..]),
            _ => Bound::Included(&prefix[..]),
        };
        let mut rows = Vec::new();
        let (mut bytes, mut examined, mut next) = (0usize, 0usize, None);
        if let Some(t) = keys {
            for entry in t
                .range::<&[u8]>((lower, Bound::Unbounded))
                .map_err(io_err)?
            {
                let (k, v) = entry.map_err(io_err)?;
                let key = k.value();
                if !key.starts_with(prefix) {
                    break;
                }
                examined += 1;
                let value = self.decode(v.value())?;
                if value.header.tombstone || !value.is_live(now_ms) {
                    if examined >= super::SNAPSHOT_EXAMINE_MAX {
                        next = Some(Bytes::copy_from_slice(key));
                        break;
                    }
                    continue;
                }
                let key = Bytes::copy_from_slice(key);
                let data = if value.header.kind == capdb_types::ValueKind::String {
                    value.data.clone()
                } else {
                    let dump = [Bytes::from_static(b"dump"), key.clone()];
                    match capdb_data::execute(&dump, &mut space, &cx)? {
                        Reply::Bulk(payload) => payload,
                        // A collection its commands see as empty.
                        _ => continue,
                    }
                };
                bytes += key.len() + data.len();
                rows.push(Reply::Array(vec![
                    Reply::Bulk(key.clone()),
                    Reply::Bulk(Bytes::from_static(value.header.kind.type_name().as_bytes())),
                    Reply::Bulk(data),
                    Reply::Bulk(Bytes::from(
                        value
                            .header
                            .expire_at_ms
                            .map_or(String::new(), |at| at.to_string()),
                    )),
                ]));
                if rows.len() >= count
                    || bytes >= super::CHANGES_READ_BYTES_MAX
                    || examined >= super::SNAPSHOT_EXAMINE_MAX
                {
                    next = Some(key);
                    break;
                }
            }
        }
        Ok(Reply::Array(vec![
            Reply::Integer(i64::from(info.on)),
            Reply::Bulk(Bytes::from(info.last.clock().0.to_string())),
            Reply::Bulk(Bytes::from(info.closed.0.to_string())),
            Reply::Array(rows),
            next.map_or(Reply::Nil, Reply::Bulk),
        ]))
    }

    /// [`super::CHANGES_TXN_QUERY`] `shard id`: a cross-shard transaction's part in this
    /// shard's change log (`id`: its 24 stored bytes). Answers `[state, clock, entries]`:
    /// state 1 logged (at `clock`, the stream clock, with its entries), 0 pending (still
    /// prepared here), 2 gone (trimmed or never logged).
    fn changes_txn_query(&self, args: &[Bytes]) -> Result<Reply> {
        let bad = || Error::InvalidInput("malformed change-log transaction query".into());
        let [_, shard, id] = args else {
            return Err(bad());
        };
        let shard = std::str::from_utf8(shard)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(bad)?;
        let txn = self.begin_read()?;
        let prepared = match txn.open_table(table_def(&crate::layout::element_table(&self.table))) {
            Ok(el) => super::txn::is_open(&el, id)?,
            Err(TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(io_err(e)),
        };
        let (state, clock, entries) =
            match super::changes::txn_part(&txn, &self.table, id, prepared)? {
                super::TxnPartAt::Logged(clock, events) => (
                    1,
                    clock.0,
                    events.iter().map(|c| c.to_reply(shard)).collect(),
                ),
                super::TxnPartAt::Pending => (0, 0, Vec::new()),
                super::TxnPartAt::Gone => (2, 0, Vec::new()),
            };
        Ok(Reply::Array(vec![
            Reply::Integer(state),
            Reply::Bulk(Bytes::from(clock.to_string())),
            Reply::Array(entries),
        ]))
    }

    /// Whether rows of this shard's change log are past its retention at `now_ms` (its
    /// leader then proposes a trim).
    pub fn changes_trim_due(
        &self,
        now_ms: u64,
        pinned: Option<capdb_types::Timestamp>,
    ) -> Result<bool> {
        let txn = self.begin_read()?;
        super::changes::trim_due(&txn, &self.table, now_ms, pinned)
    }

    /// Retention by size: the clock of the first entry to keep (`None`: everything fits).
    pub fn changes_size_keep_from(&self) -> Result<Option<capdb_types::Timestamp>> {
        let txn = self.begin_read()?;
        super::changes::size_keep_from(&txn, &self.table)
    }

    /// Whether this shard logs its changes, how many it holds and the last one's ID.
    pub fn changes_info(&self) -> Result<super::ChangeInfo> {
        let txn = self.begin_read()?;
        super::changes::info(&txn, &self.table)
    }

    /// The cross-shard transactions prepared on this shard and not decided yet (a
    /// linearizable scan waits for those prepared before it: `txn.rs`).
    pub fn prepared_txns(&self) -> Result<Vec<capdb_types::txn::TxnId>> {
        Ok(self
            .read_elements(super::txn::prepared_ids)?
            .unwrap_or_default())
    }

    /// The keys of a data-type command (`args[0]` its name; none for an unknown command).
    pub fn command_keys(&self, args: &[Bytes]) -> Vec<Bytes> {
        capdb_data::command::command_keys(args).unwrap_or_default()
    }

    /// The transactions prepared on this shard and not decided, with those past their lock
    /// deadline at `now_ms` (`txn.rs`).
    pub fn open_txns(&self, now_ms: u64) -> Result<super::OpenTxns> {
        Ok(self
            .read_elements(|el| super::txn::open_txns(el, now_ms))?
            .unwrap_or_default())
    }
}

impl KeyspaceStore for DiskTable {
    fn query(&self, args: &[Bytes], now_ms: u64, seed: u64) -> Result<Reply> {
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::CHANGES_QUERY.as_bytes())
        {
            return self.changes_query(args);
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::CHANGES_TXN_QUERY.as_bytes())
        {
            return self.changes_txn_query(args);
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::CHANGES_SNAPSHOT_QUERY.as_bytes())
        {
            return self.changes_snapshot_query(args, now_ms);
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::groups::CHANGES_PINS_QUERY.as_bytes())
        {
            // `[[stream, position], ...]`: see `groups::positions`.
            let rows = self
                .read_elements(super::groups::positions)?
                .unwrap_or_default();
            return Ok(Reply::Array(
                rows.into_iter()
                    .map(|(stream, pos)| {
                        Reply::Array(vec![
                            Reply::Bulk(stream),
                            Reply::Bulk(Bytes::from(pos.to_string())),
                        ])
                    })
                    .collect(),
            ));
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::VIEWS_QUERY.as_bytes())
        {
            // See `views::query`; `verify name` reads the data and the rows in one snapshot.
            if let [_, sub, name] = args
                && sub.as_ref() == b"verify"
            {
                let txn = self.begin_read()?;
                let el = match txn.open_table(table_def(&crate::layout::element_table(&self.table)))
                {
                    Ok(el) => el,
                    Err(TableError::TableDoesNotExist(_)) => {
                        return Err(Error::Command(format!(
                            "NOVIEW no view '{}'",
                            String::from_utf8_lossy(name)
                        )));
                    }
                    Err(e) => return Err(io_err(e)),
                };
                let t = match txn.open_table(table_def(&self.table)) {
                    Ok(t) => Some(t),
                    Err(TableError::TableDoesNotExist(_)) => None,
                    Err(e) => return Err(io_err(e)),
                };
                return super::views::verify(t.as_ref(), &el, name);
            }
            // An async view's updater and verification read the data and the change log
            // from one snapshot (`views::async_read`, `async_scan`, `verify_with`).
            match &args[1..] {
                [sub, name] if sub.as_ref() == b"async" => {
                    let txn = self.begin_read()?;
                    return super::views::async_read(&txn, &self.table, name);
                }
                [sub, name, after] if sub.as_ref() == b"scan" => {
                    let txn = self.begin_read()?;
                    return super::views::async_scan(&txn, &self.table, name, after);
                }
                [sub, name, clock, delta] if sub.as_ref() == b"verify-with" => {
                    let clock = std::str::from_utf8(clock)
                        .ok()
                        .and_then(|c| c.parse::<u64>().ok())
                        .ok_or_else(|| Error::InvalidInput("malformed views query".into()))?;
                    return self
                        .read_elements(|el| super::views::verify_with(el, name, clock, delta))?
                        .ok_or_else(|| {
                            Error::Command(format!(
                                "NOVIEW no view '{}'",
                                String::from_utf8_lossy(name)
                            ))
                        });
                }
                _ => {}
            }
            return Ok(self
                .read_elements(|el| super::views::query(el, args))?
                .unwrap_or(match args.get(1).map(|s| &s[..]) {
                    Some(b"rows" | b"groups") => Reply::Array(vec![Reply::Nil]),
                    _ => Reply::Array(Vec::new()),
                }));
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::JOBS_QUERY.as_bytes())
        {
            // See `jobs::query`; a shard that never held a job answers as an empty one.
            return Ok(self
                .read_elements(|el| super::jobs::query(el, args))?
                .unwrap_or(match args.get(1).map(|s| &s[..]) {
                    Some(b"record" | b"result") => Reply::Nil,
                    _ => Reply::Array(Vec::new()),
                }));
        }
        if args
            .first()
            .is_some_and(|n| n.as_ref() == super::CHANGES_GROUP_QUERY.as_bytes())
        {
            // `stream [group [from count]]`: see `groups::query`.
            let bad = || Error::InvalidInput("malformed consumer-group query".into());
            let (stream, group, page) = match args {
                [_, stream] => (stream, None, None),
                [_, stream, group] => (stream, Some(&group[..]), None),
                [_, stream, group, from, count] => {
                    let from = capdb_types::changes::StreamId::parse_with(from, 0)?;
                    let count = std::str::from_utf8(count)
                        .ok()
                        .and_then(|c| c.parse::<usize>().ok())
                        .ok_or_else(bad)?;
                    (stream, Some(&group[..]), Some((from, count)))
                }
                _ => return Err(bad()),
            };
            return Ok(self
                .read_elements(|el| super::groups::query(el, stream, group, page))?
                .unwrap_or(match group {
                    Some(_) => Reply::Array(vec![Reply::Nil, Reply::Array(Vec::new())]),
                    None => Reply::Array(Vec::new()),
                }));
        }
        let txn = self.begin_read()?;
        let open = |name: &str| match txn.open_table(table_def(name)) {
            Ok(t) => Ok(Some(t)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        };
        let mut space = ReadSpace {
            top: open(&self.table)?,
            el: open(&crate::layout::element_table(&self.table))?,
            now_ms,
            stats: &self.engine.stats,
        };
        let cx = capdb_data::Ctx {
            now_ms,
            timestamp: capdb_types::Timestamp::ZERO,
            seed,
            value_bytes_max: self.engine.value_bytes_max,
        };
        capdb_data::execute(args, &mut space, &cx)
    }

    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Value>> {
        let found = self.read(|t| match t.get(key).map_err(io_err)? {
            Some(raw) => self.decode(raw.value()).map(Some),
            None => Ok(None),
        })?;
        Ok(found.flatten().filter(|v| v.is_live(now_ms)))
    }

    async fn apply(&self, mutations: Vec<Mutation>, now_ms: u64) -> Result<BatchReplies> {
        self.engine
            .submit(Op::Apply {
                table: self.table.clone(),
                tombstones: self.tombstones,
                mutations,
                now_ms,
            })
            .await?
            .into_replies()
    }

    fn scan(&self, range: &ScanRange, limit: usize, now_ms: u64) -> Result<ScanPage> {
        use std::ops::Bound;
        // The lower bound is the greater of `after` (exclusive) and `prefix` (inclusive).
        let lower = match (&range.after, &range.prefix) {
            (Some(a), Some(p)) if p[..] > a[..] => Bound::Included(&p[..]),
            (Some(a), _) => Bound::Excluded(&a[..]),
            (None, Some(p)) => Bound::Included(&p[..]),
            (None, None) => Bound::Unbounded,
        };
        let upper = match &range.end {
            Some(e) => Bound::Excluded(&e[..]),
            None => Bound::Unbounded,
        };
        if let (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u)) = (lower, upper)
            && l >= u
        {
            return Ok(ScanPage::default());
        }
        let page = self.read(|t| {
            let mut page = ScanPage::default();
            let mut examined = 0usize;
            for entry in t.range::<&[u8]>((lower, upper)).map_err(io_err)? {
                let (k, v) = entry.map_err(io_err)?;
                let key = k.value();
                if let Some(p) = &range.prefix
                    && !key.starts_with(p)
                {
                    return Ok(page_done(page));
                }
                examined += 1;
                let value = self.decode(v.value())?;
                if value.is_live(now_ms) {
                    page.entries.push((Bytes::copy_from_slice(key), value));
                }
                if page.entries.len() >= limit || examined >= SCAN_EXAMINE_MAX {
                    page.next_after = Some(Bytes::copy_from_slice(key));
                    return Ok(page);
                }
            }
            Ok(page_done(page))
        })?;
        Ok(page.unwrap_or_default())
    }

    fn len(&self) -> Result<u64> {
        let n = self.read(|t| {
            if !self.tombstones {
                return t.len().map_err(io_err);
            }
            let mut live = 0;
            for entry in t.iter().map_err(io_err)? {
                let (_, v) = entry.map_err(io_err)?;
                if !self.decode(v.value())?.header.tombstone {
                    live += 1;
                }
            }
            Ok(live)
        })?;
        Ok(n.unwrap_or(0))
    }

    async fn clear(&self) -> Result<()> {
        self.engine
            .submit(Op::Clear {
                table: self.table.clone(),
            })
            .await?
            .into_done()
    }
}

fn page_done(mut page: ScanPage) -> ScanPage {
    page.next_after = None;
    page
}
