//! Walking a keyspace's keys shard by shard, and the table behind numeric `SCAN` cursors.
//!
//! A replicated keyspace keeps its keys in order within each shard, so a scan is a walk over
//! the shards in index order, each from the last key returned ([`ScanPosition`]). A walk covers
//! every shard or, in Redis Cluster mode, the shards this node serves ([`ShardScope`],
//! `resp/cluster.rs`). RESP clients pass cursors around as numbers; [`ScanCursors`] maps each to
//! the keyspace, the scope and the position, so a key present for the whole scan is returned
//! exactly once, any connection to the node may continue a cursor, and a scan keeps the scope
//! it began with whatever leaderships do meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use capdb_types::{KeyspaceName, Result, Value};

/// A position in a scan over a keyspace's shards: shard index and last key returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPosition {
    pub shard: u32,
    pub after: Option<Bytes>,
}

/// Which shards of a replicated keyspace a scan or a count covers.
///
/// Redis Cluster mode answers `SCAN`/`DBSIZE`/`KEYS` for the slots this node serves only
/// (`resp/cluster.rs`); a scan fixes that set when it begins and keeps it in its cursor, so a
/// leadership change mid-scan neither ends it early nor hands it new shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ShardScope {
    /// Every shard (and every key of `ap` and `cache` keyspaces, which ignore the scope).
    #[default]
    All,
    /// These shard indexes, in ascending order.
    Only(Arc<[u32]>),
}

impl ShardScope {
    pub fn contains(&self, shard: u32) -> bool {
        match self {
            ShardScope::All => true,
            ShardScope::Only(s) => s.binary_search(&shard).is_ok(),
        }
    }
}

/// One page of one shard: entries in key order and the last key returned when more follow.
type ShardPage = (Vec<(Bytes, Value)>, Option<Bytes>);

/// Walks the shards of `scope` in order from `pos`, asking `page(shard, after, want)` for each
/// page, until `limit` entries are gathered; keys at or past `end` are dropped and each shard
/// restarts after `floor`. Returns the entries and where the next page starts (`None`: done).
pub(crate) async fn walk_shards<'a>(
    shards: u32,
    scope: &ShardScope,
    pos: ScanPosition,
    floor: Option<Bytes>,
    end: Option<Bytes>,
    limit: usize,
    mut page: impl FnMut(u32, Option<Bytes>, u32) -> futures::future::BoxFuture<'a, Result<ShardPage>>,
) -> Result<(Vec<(Bytes, Value)>, Option<ScanPosition>)> {
    // The first shard of the scope at or after `from` (`shards`: none left).
    let next_in_scope = |from: u32| {
        (from..shards)
            .find(|s| scope.contains(*s))
            .unwrap_or(shards)
    };
    let mut shard = pos.shard.min(shards);
    let mut after = pos.after.or_else(|| floor.clone());
    if shard < shards && !scope.contains(shard) {
        shard = next_in_scope(shard);
        after = floor.clone();
    }
    let mut entries = Vec::new();
    while shard < shards && entries.len() < limit {
        let want = (limit - entries.len()) as u32;
        let (got, next) = page(shard, after.clone(), want).await?;
        entries.extend(
            got.into_iter()
                .filter(|(k, _)| end.as_ref().is_none_or(|e| k < e)),
        );
        match next {
            Some(n) => after = Some(n),
            None => {
                shard = next_in_scope(shard + 1);
                after = floor.clone();
            }
        }
    }
    let next = (shard < shards).then_some(ScanPosition { shard, after });
    Ok((entries, next))
}

/// Most SCAN cursors remembered; the oldest is forgotten first (its next use gets
/// `ERR invalid cursor` and the client restarts from 0).
pub const SCAN_CURSORS_MAX: usize = 100_000;

/// What a SCAN cursor names: the keyspace, the shards the scan covers, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanCursor {
    pub keyspace: KeyspaceName,
    pub scope: ShardScope,
    pub pos: ScanPosition,
}

/// Cursor id -> cursor, and ids oldest first.
type CursorTable = (
    std::collections::HashMap<u64, ScanCursor>,
    std::collections::VecDeque<u64>,
);

/// Server-side SCAN positions behind the numeric cursors RESP clients pass around.
pub struct ScanCursors {
    inner: std::sync::Mutex<CursorTable>,
    next: AtomicU64,
}

impl ScanCursors {
    pub(crate) fn new() -> ScanCursors {
        // Start at a random point so that cursors from before a restart do not name new positions.
        let start =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
                >> 16;
        ScanCursors {
            inner: std::sync::Mutex::new(Default::default()),
            next: AtomicU64::new(start.max(1)),
        }
    }

    /// Remembers a scan's position and returns its cursor (never 0).
    pub fn put(&self, cursor: ScanCursor) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed).max(1);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if order.len() >= SCAN_CURSORS_MAX
            && let Some(old) = order.pop_front()
        {
            map.remove(&old);
        }
        map.insert(id, cursor);
        order.push_back(id);
        id
    }

    /// A cursor, if it is known and belongs to this keyspace. Cursors stay valid after use, so
    /// a client may retry a page.
    pub fn get(&self, cursor: u64, keyspace: &KeyspaceName) -> Option<ScanCursor> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(&cursor)
            .filter(|c| &c.keyspace == keyspace)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four shards of five keys each (`s<shard>k<i>`), read a page at a time.
    async fn walk(scope: &ShardScope, limit: usize) -> Vec<Bytes> {
        let mut pos = Some(ScanPosition::default());
        let mut keys = Vec::new();
        while let Some(p) = pos {
            let (entries, next) =
                walk_shards(4, scope, p, None, None, limit, |shard, after, want| {
                    Box::pin(async move {
                        let all: Vec<Bytes> = (0..5)
                            .map(|i| Bytes::from(format!("s{shard}k{i}")))
                            .filter(|k| after.as_ref().is_none_or(|a| k > a))
                            .collect();
                        let page: Vec<(Bytes, Value)> = all
                            .iter()
                            .take(want as usize)
                            .map(|k| (k.clone(), Value::default()))
                            .collect();
                        let more = (all.len() > page.len()).then(|| page.last().unwrap().0.clone());
                        Ok((page, more))
                    })
                })
                .await
                .unwrap();
            keys.extend(entries.into_iter().map(|(k, _)| k));
            pos = next;
        }
        keys
    }

    #[test]
    fn a_scoped_walk_visits_exactly_the_shards_of_its_scope_once() {
        futures::executor::block_on(async {
            assert_eq!(walk(&ShardScope::All, 3).await.len(), 20);
            for limit in [1, 2, 5, 7, 100] {
                let only = ShardScope::Only(Arc::from(vec![1, 3]));
                let keys = walk(&only, limit).await;
                let want: Vec<Bytes> = [1, 3]
                    .iter()
                    .flat_map(|s| (0..5).map(move |i| Bytes::from(format!("s{s}k{i}"))))
                    .collect();
                assert_eq!(keys, want, "page size {limit}");
            }
            let none = ShardScope::Only(Arc::from(Vec::new()));
            assert!(walk(&none, 10).await.is_empty());
        });
    }
}
