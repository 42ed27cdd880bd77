//! One conformance suite for every [`KeyspaceStore`]: the disk engine (with and without
//! tombstones) and the in-memory cache store must behave the same to a reader.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::disk::DiskEngine;
use capdb_storage::memory::MemStore;
use capdb_storage::{KeyspaceStore, ScanRange};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, EvictionPolicy, Hlc, Mutation, Reply};

const VALUE_MAX: usize = 1 << 20;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn set(k: &str, v: &str, expiry: ExpiryUpdate) -> Mutation {
    Mutation::Set {
        key: b(k),
        value: b(v),
        condition: Condition::Always,
        expiry,
        return_old: false,
    }
}

async fn suite<S: KeyspaceStore>(store: &S) {
    let now = 1_000_000;
    // Writes and reads.
    let r = store
        .apply(
            vec![
                set("a", "1", ExpiryUpdate::Clear),
                set("b", "2", ExpiryUpdate::At(now + 10)),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Ok(Reply::Ok), Ok(Reply::Ok)]);
    assert_eq!(store.get(b"a", now).unwrap().unwrap().data, b("1"));
    assert_eq!(
        store
            .get(b"b", now + 9)
            .unwrap()
            .unwrap()
            .header
            .expire_at_ms,
        Some(now + 10)
    );
    // Expiry hides the value at the deadline.
    assert_eq!(store.get(b"b", now + 10).unwrap(), None);
    // A failing mutation fails alone.
    let r = store
        .apply(
            vec![
                Mutation::IncrBy {
                    key: b("a"),
                    delta: 41,
                },
                set("x", "y", ExpiryUpdate::Clear),
                Mutation::IncrBy {
                    key: b("x"),
                    delta: 1,
                },
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(r[0], Ok(Reply::Integer(42)));
    assert_eq!(r[1], Ok(Reply::Ok));
    assert_eq!(r[2], Err(Error::NotAnInteger));
    // Deletes.
    let r = store
        .apply(
            vec![
                Mutation::Delete { key: b("x") },
                Mutation::Delete { key: b("x") },
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Ok(Reply::Integer(1)), Ok(Reply::Integer(0))]);
    assert_eq!(store.get(b"x", now).unwrap(), None);
    // Ordered scans with a cursor, a prefix and an end bound.
    let muts = (0..25)
        .map(|i| set(&format!("k{i:02}"), "v", ExpiryUpdate::Clear))
        .collect();
    store.apply(muts, now).await.unwrap();
    let mut seen = Vec::new();
    let mut range = ScanRange {
        prefix: Some(b("k")),
        ..Default::default()
    };
    loop {
        let page = store.scan(&range, 10, now).unwrap();
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.into_iter().map(|(k, _)| k));
        match page.next_after {
            Some(next) => range.after = Some(next),
            None => break,
        }
    }
    let expected: Vec<Bytes> = (0..25).map(|i| b(&format!("k{i:02}"))).collect();
    assert_eq!(seen, expected);
    let bounded = ScanRange {
        after: Some(b("k05")),
        end: Some(b("k08")),
        prefix: None,
    };
    let page = store.scan(&bounded, 100, now).unwrap();
    let keys: Vec<_> = page.entries.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![b("k06"), b("k07")]);
    // Clear.
    store.clear().await.unwrap();
    assert_eq!(store.len().unwrap(), 0);
    assert_eq!(store.get(b"a", now).unwrap(), None);
}

#[tokio::test]
async fn disk_table_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    engine
        .create_table("t", "keyspace/t", b"{}".to_vec())
        .await
        .unwrap();
    suite(&engine.table("t", false)).await;
    engine
        .create_table("ap", "keyspace/ap", b"{}".to_vec())
        .await
        .unwrap();
    suite(&engine.table("ap", true)).await;
}

#[tokio::test]
async fn memory_store_conforms() {
    let store = MemStore::new(
        64 << 20,
        EvictionPolicy::Lru,
        Arc::new(Hlc::new()),
        VALUE_MAX,
    );
    suite(&store).await;
}

#[tokio::test]
async fn disk_writes_survive_reopen_and_meta_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
        engine
            .create_table("t", "keyspace/t", b"spec".to_vec())
            .await
            .unwrap();
        let t = engine.table("t", false);
        t.apply(vec![set("durable", "yes", ExpiryUpdate::Clear)], 0)
            .await
            .unwrap();
    }
    // The writer thread exits when the last handle drops; give it a moment to release the file.
    let engine = loop {
        match DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX) {
            Ok(e) => break e,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    assert_eq!(
        engine.meta_list("keyspace/").unwrap(),
        vec![("keyspace/t".into(), b"spec".to_vec())]
    );
    assert_eq!(
        engine
            .table("t", false)
            .get(b"durable", 0)
            .unwrap()
            .unwrap()
            .data,
        b("yes")
    );
}

#[tokio::test]
async fn ap_deletes_leave_tombstones_invisible_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    engine
        .create_table("ap", "keyspace/ap", vec![])
        .await
        .unwrap();
    let t = engine.table("ap", true);
    t.apply(
        vec![
            set("k", "v", ExpiryUpdate::Clear),
            Mutation::Delete { key: b("k") },
        ],
        0,
    )
    .await
    .unwrap();
    assert_eq!(t.get(b"k", 0).unwrap(), None);
    assert_eq!(t.len().unwrap(), 0);
    assert!(
        t.scan(&ScanRange::default(), 10, 0)
            .unwrap()
            .entries
            .is_empty()
    );
}

#[tokio::test]
async fn disk_active_expiry_removes_expired_keys() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    engine
        .create_table("t", "keyspace/t", vec![])
        .await
        .unwrap();
    let t = engine.table("t", false);
    t.apply(
        vec![
            set("gone", "v", ExpiryUpdate::At(100)),
            set("kept", "v", ExpiryUpdate::Clear),
        ],
        0,
    )
    .await
    .unwrap();
    assert_eq!(t.len().unwrap(), 2);
    let (_, removed) = t.sweep_expired(None, 100, 200).await.unwrap();
    assert_eq!(removed, 1);
    assert_eq!(t.len().unwrap(), 1);
}

#[tokio::test]
async fn a_cache_never_evicts_the_writes_it_just_answered_while_older_entries_remain() {
    // Every write at the same millisecond, as a pipeline on a busy node: LRU cannot tell old
    // from new by access time, and Redis (which evicts before running a command) would keep
    // each batch's keys.
    for policy in [EvictionPolicy::Lru, EvictionPolicy::Lfu] {
        let limit = 1 << 20;
        let store = MemStore::new(limit, policy, Arc::new(Hlc::new()), VALUE_MAX);
        let value = "x".repeat(1000);
        for batch in 0..10 {
            let writes = (0..400)
                .map(|i| set(&format!("b{batch}k{i}"), &value, ExpiryUpdate::Clear))
                .collect();
            store.apply(writes, 7).await.unwrap();
            for i in 0..400 {
                let key = format!("b{batch}k{i}");
                assert!(
                    store.get(key.as_bytes(), 7).unwrap().is_some(),
                    "{policy:?}: {key} of the last batch was evicted by its own batch"
                );
            }
        }
        assert!(store.used_bytes() <= limit);
    }
}

#[tokio::test]
async fn memory_store_evicts_under_its_limit_and_expires_actively() {
    for policy in [EvictionPolicy::Lru, EvictionPolicy::Lfu] {
        let limit = 1 << 20;
        let store = MemStore::new(limit, policy, Arc::new(Hlc::new()), VALUE_MAX);
        let value = "x".repeat(1000);
        for i in 0..5_000 {
            store
                .apply(
                    vec![set(&format!("key{i}"), &value, ExpiryUpdate::Clear)],
                    0,
                )
                .await
                .unwrap();
            assert!(
                store.used_bytes() <= limit,
                "{policy:?}: over the limit after write {i}"
            );
        }
        assert!(
            store
                .stats()
                .evicted_keys
                .load(std::sync::atomic::Ordering::Relaxed)
                > 3_000
        );
        assert!(store.len().unwrap() < 1_100);
        // An entry larger than the whole limit is refused, not evicted into.
        let huge = "y".repeat(limit as usize + 1);
        assert!(matches!(
            store
                .apply(vec![set("huge", &huge, ExpiryUpdate::Clear)], 0)
                .await,
            Err(Error::OutOfMemory(_))
        ));
    }
    let store = MemStore::new(
        64 << 20,
        EvictionPolicy::Lru,
        Arc::new(Hlc::new()),
        VALUE_MAX,
    );
    let muts = (0..1_000)
        .map(|i| set(&format!("t{i}"), "v", ExpiryUpdate::At(50)))
        .collect();
    store.apply(muts, 0).await.unwrap();
    store
        .apply(vec![set("forever", "v", ExpiryUpdate::Clear)], 0)
        .await
        .unwrap();
    let mut removed = 0;
    for _ in 0..100 {
        removed += store.expire_cycle(100);
    }
    assert_eq!(
        removed, 1_000,
        "active expiry must find every expired key without reads"
    );
    assert_eq!(store.len().unwrap(), 1);
}

fn exec(words: &str) -> Mutation {
    let args: Vec<Bytes> = words.split_whitespace().map(b).collect();
    Mutation::Exec {
        key: args[1].clone(),
        args,
    }
}

fn query(words: &str) -> Vec<Bytes> {
    words.split_whitespace().map(b).collect()
}

/// Collections behave the same on both engines: writes, reads, WRONGTYPE, overwrite by SET,
/// RENAME moving elements, and deletion of a collection too big to free inline.
async fn collections_suite<S: KeyspaceStore>(store: &S) {
    let now = 1_000_000;
    let r = store
        .apply(
            vec![
                exec("HSET h a 1 b 2"),
                exec("RPUSH l x y z"),
                exec("SADD s m n"),
                exec("ZADD z 1 a 2 b"),
                set("str", "v", ExpiryUpdate::Clear),
                exec("HSET str f v"),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(r[0], Ok(Reply::Integer(2)));
    assert_eq!(r[1], Ok(Reply::Integer(3)));
    assert_eq!(r[5], Err(Error::WrongType));
    assert_eq!(
        store.query(&query("HGET h b"), now, 0).unwrap(),
        Reply::Bulk(b("2"))
    );
    assert_eq!(
        store.query(&query("LRANGE l 0 -1"), now, 0).unwrap(),
        Reply::Array(vec![
            Reply::Bulk(b("x")),
            Reply::Bulk(b("y")),
            Reply::Bulk(b("z"))
        ])
    );
    assert_eq!(
        store.query(&query("ZSCORE z b"), now, 0).unwrap(),
        Reply::Double("2".into())
    );
    // RENAME moves the hash with its fields; SET over a list replaces it whole.
    store
        .apply(
            vec![exec("RENAME h h2"), set("l", "s", ExpiryUpdate::Clear)],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        store.query(&query("HGET h2 a"), now, 0).unwrap(),
        Reply::Bulk(b("1"))
    );
    assert_eq!(store.get(b"l", now).unwrap().unwrap().data, b("s"));
    assert_eq!(
        store.query(&query("LLEN l"), now, 0).unwrap_err(),
        Error::WrongType
    );
    // A big hash, deleted in one command, then recreated: no old field shows through.
    let fields: Vec<String> = (0..500).map(|i| format!("f{i} v{i}")).collect();
    store
        .apply(vec![exec(&format!("HSET big {}", fields.join(" ")))], now)
        .await
        .unwrap();
    let del = store
        .apply(
            vec![Mutation::Delete { key: b("big") }, exec("HSET big only 1")],
            now,
        )
        .await
        .unwrap();
    assert_eq!(del[0], Ok(Reply::Integer(1)));
    assert_eq!(
        store.query(&query("HLEN big"), now, 0).unwrap(),
        Reply::Integer(1)
    );
    assert_eq!(
        store.query(&query("HGET big f7"), now, 0).unwrap(),
        Reply::Nil
    );
}

#[tokio::test]
async fn collections_conform_on_both_engines_and_big_deletes_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    engine
        .create_table("c", "keyspace/c", b"{}".to_vec())
        .await
        .unwrap();
    let table = engine.table("c", false);
    collections_suite(&table).await;
    // The 500-field hash was queued for reclaim, not deleted inline: bounded steps free it.
    let mut freed = 0;
    loop {
        let n = table.reclaim_step().await.unwrap();
        if n == 0 {
            break;
        }
        freed += n;
    }
    assert_eq!(freed, 500, "every element of the deleted hash is reclaimed");
    let dump = engine.dump_table("c", &[], "none/").unwrap();
    // Left: the live collections' elements and the id counter; nothing of the big hash.
    let live_elements = 2 + 2 + 2 * 2 + 1; // h2, s, z (two records per member), big
    assert_eq!(
        dump.elements.len(),
        live_elements + 1,
        "{:?}",
        dump.elements.len()
    );

    let store = MemStore::new(
        64 << 20,
        EvictionPolicy::Lru,
        Arc::new(Hlc::new()),
        VALUE_MAX,
    );
    collections_suite(&store).await;
}
