//! WATCH's change tracking in both engines: a `cp` shard's touched rows (judged inside the
//! transaction's own apply, identical on every replica, carried by snapshots) and the cache's
//! per-shard change log (judged under the transaction's locks).

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{DiskEngine, WatchGuard, horizon_row};
use capdb_storage::memory::MemStore;
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{EvictionPolicy, Hlc, Mutation, Reply, Timestamp};

const VALUE_MAX: usize = 1 << 20;
const TABLE: &str = "shard/9";

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn set(k: &str, v: &str) -> Mutation {
    set_expiring(k, v, ExpiryUpdate::Clear)
}

fn set_expiring(k: &str, v: &str, expiry: ExpiryUpdate) -> Mutation {
    Mutation::Set {
        key: b(k),
        value: b(v),
        condition: Condition::Always,
        expiry,
        return_old: false,
    }
}

fn exec(args: &[&str]) -> Mutation {
    Mutation::Exec {
        key: b(args[1]),
        args: args.iter().map(|a| b(a)).collect(),
    }
}

fn open() -> (tempfile::TempDir, DiskEngine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    (dir, engine)
}

/// Applies `mutations` as the entry at log `index`.
async fn write(e: &DiskEngine, index: u64, mutations: Vec<Mutation>) {
    let m = mutations
        .into_iter()
        .map(|m| (m, Timestamp(index), 1_000, index))
        .collect();
    e.apply_replicated(TABLE, m, Vec::new(), Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap();
}

/// A WATCH's point in the log at `index` (recording starts there).
async fn watch_point(e: &DiskEngine, index: u64) {
    e.apply_replicated(
        TABLE,
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        vec![index],
    )
    .await
    .unwrap();
}

fn guard(key: &str, index: u64) -> WatchGuard {
    WatchGuard {
        key: b(key),
        index,
        since_ms: 1_000,
        until_ms: 1_000,
    }
}

/// Runs a guarded transaction (one `SET t x`) at `index`: whether it committed.
async fn commits(e: &DiskEngine, index: u64, guards: Vec<WatchGuard>) -> bool {
    let until = guards.first().map_or(1_000, |g| g.until_ms);
    let m = vec![(set("t", "x"), Timestamp(index), until, index)];
    let replies = e
        .apply_replicated(TABLE, m, Vec::new(), Vec::new(), guards, Vec::new())
        .await
        .unwrap();
    match replies.first() {
        Some(Ok(Reply::Ok)) => {
            assert_eq!(replies.len(), 2, "the verdict, then one reply per mutation");
            true
        }
        Some(Ok(Reply::NilArray)) => {
            assert_eq!(
                replies.len(),
                1,
                "an aborted transaction answers its verdict alone"
            );
            false
        }
        other => panic!("not a verdict: {other:?}"),
    }
}

#[tokio::test]
async fn a_cp_guard_fails_exactly_when_its_key_changed_after_the_watch() {
    let (_d, e) = open();
    watch_point(&e, 1).await;
    write(&e, 5, vec![set("k", "1")]).await;
    assert!(
        commits(&e, 6, vec![guard("k", 5)]).await,
        "no change after 5"
    );
    assert!(
        !commits(&e, 7, vec![guard("k", 4)]).await,
        "changed at 5 > 4"
    );
    assert!(commits(&e, 8, vec![guard("never", 1)]).await);
    // The transaction at 6 wrote `t`: a watch of `t` from before it fails.
    assert!(!commits(&e, 9, vec![guard("t", 5)]).await);

    // Absent, written, deleted: absent again, but changed.
    write(&e, 10, vec![set("gone", "v")]).await;
    write(&e, 11, vec![Mutation::Delete { key: b("gone") }]).await;
    assert!(!commits(&e, 12, vec![guard("gone", 9)]).await);
    // Deleting what is not there changes nothing.
    write(&e, 13, vec![Mutation::Delete { key: b("nothing") }]).await;
    assert!(commits(&e, 14, vec![guard("nothing", 12)]).await);

    // Data-type commands: a new member changes the key, a present one does not.
    write(&e, 15, vec![exec(&["SADD", "s", "a"])]).await;
    assert!(!commits(&e, 16, vec![guard("s", 14)]).await);
    write(&e, 17, vec![exec(&["SADD", "s", "a"])]).await;
    assert!(commits(&e, 18, vec![guard("s", 16)]).await);
    // ... and HSET of the same value does (Redis signals it).
    write(&e, 19, vec![exec(&["HSET", "h", "f", "v"])]).await;
    write(&e, 20, vec![exec(&["HSET", "h", "f", "v"])]).await;
    assert!(!commits(&e, 21, vec![guard("h", 19)]).await);
}

#[tokio::test]
async fn a_cp_guard_fails_when_its_key_expired_after_the_watch() {
    let (_d, e) = open();
    watch_point(&e, 1).await;
    write(&e, 3, vec![set_expiring("e", "v", ExpiryUpdate::At(1_500))]).await;
    let watched = |since_ms, until_ms| WatchGuard {
        key: b("e"),
        index: 3,
        since_ms,
        until_ms,
    };
    assert!(
        commits(&e, 4, vec![watched(1_000, 1_400)]).await,
        "still live"
    );
    assert!(
        !commits(&e, 5, vec![watched(1_000, 1_600)]).await,
        "expired since WATCH"
    );
    assert!(
        commits(&e, 6, vec![watched(1_500, 1_600)]).await,
        "already expired at WATCH: not a change"
    );
}

#[tokio::test]
async fn replicas_and_snapshots_judge_guards_alike_and_flushdb_aborts_older_watches() {
    let (_a, a) = open();
    let (_b, b_engine) = open();
    for e in [&a, &b_engine] {
        watch_point(e, 1).await;
        write(e, 2, vec![set("k", "1"), exec(&["RPUSH", "l", "x"])]).await;
        write(e, 3, vec![Mutation::Delete { key: b("k") }]).await;
    }
    // A third replica installs a snapshot of the first.
    let (_c, c) = open();
    let dump = a.dump_table(TABLE, &[], "none/").unwrap();
    c.replace_table(TABLE, dump.entries, dump.elements, None, Vec::new(), None)
        .await
        .unwrap();
    for (name, e) in [("a", &a), ("b", &b_engine), ("c", &c)] {
        assert!(!commits(e, 4, vec![guard("k", 2)]).await, "replica {name}");
        assert!(!commits(e, 5, vec![guard("l", 1)]).await, "replica {name}");
        assert!(commits(e, 6, vec![guard("l", 2)]).await, "replica {name}");
    }
    // FLUSHDB at 7 leaves the horizon: every watch from before it aborts, and recording
    // stays off until the next watch point.
    a.replace_table(
        TABLE,
        Vec::new(),
        vec![horizon_row(7)],
        None,
        Vec::new(),
        Some(7),
    )
    .await
    .unwrap();
    assert!(!commits(&a, 8, vec![guard("untouched", 6)]).await);
    assert!(
        !commits(&a, 9, vec![guard("untouched", 7)]).await,
        "recording is off until the next watch point"
    );
    watch_point(&a, 10).await;
    assert!(commits(&a, 11, vec![guard("untouched", 10)]).await);
}

#[tokio::test]
async fn changes_are_recorded_only_from_a_watch_point_on() {
    let (_d, e) = open();
    write(&e, 2, vec![set("k", "1")]).await;
    assert!(
        !commits(&e, 3, vec![guard("k", 2)]).await,
        "no watch point: nothing is known"
    );
    watch_point(&e, 4).await;
    assert!(
        !commits(&e, 5, vec![guard("k", 3)]).await,
        "older than the first watch point"
    );
    assert!(commits(&e, 6, vec![guard("k", 4)]).await);
    // A watch point and a change in one batch: the change after it is recorded.
    let m = vec![(set("k", "2"), Timestamp(8), 1_000, 8)];
    e.apply_replicated(TABLE, m, Vec::new(), Vec::new(), Vec::new(), vec![7])
        .await
        .unwrap();
    assert!(!commits(&e, 9, vec![guard("k", 7)]).await);
}

#[tokio::test]
async fn a_cache_transaction_aborts_exactly_when_a_watched_key_changed() {
    let store = Arc::new(MemStore::new(
        1 << 20,
        EvictionPolicy::Lru,
        Arc::new(Hlc::new()),
        VALUE_MAX,
    ));
    let now = 1_000;
    store.apply(vec![set("k", "1")], now).await.unwrap();
    let run = |store: &Arc<MemStore>, ticket: &capdb_storage::memory::WatchTicket| {
        store
            .apply_guarded(vec![set("t", "x")], &[ticket], now)
            .unwrap()
            .is_some()
    };
    let w = store.watch(&b("k"), now);
    assert!(run(&store, &w), "unchanged");
    let w = store.watch(&b("k"), now);
    store.apply(vec![set("k", "1")], now).await.unwrap();
    assert!(!run(&store, &w), "a SET of the same value");
    let w = store.watch(&b("absent"), now);
    store.apply(vec![set("absent", "1")], now).await.unwrap();
    store
        .apply(vec![Mutation::Delete { key: b("absent") }], now)
        .await
        .unwrap();
    assert!(!run(&store, &w), "written and deleted");
    store
        .apply(vec![exec(&["SADD", "s", "a"])], now)
        .await
        .unwrap();
    let w = store.watch(&b("s"), now);
    store
        .apply(vec![exec(&["SADD", "s", "a"])], now)
        .await
        .unwrap();
    assert!(run(&store, &w), "SADD of a present member changes nothing");
    let w = store.watch(&b("s"), now);
    store
        .apply(vec![exec(&["SADD", "s", "b"])], now)
        .await
        .unwrap();
    assert!(!run(&store, &w), "a new member");
    // Expiry after WATCH.
    store
        .apply(
            vec![set_expiring("e", "v", ExpiryUpdate::At(now + 100))],
            now,
        )
        .await
        .unwrap();
    let w = store.watch(&b("e"), now);
    let later = store
        .apply_guarded(vec![set("t", "y")], &[&w], now + 200)
        .unwrap();
    assert!(later.is_none(), "expired since WATCH");
    // FLUSHDB aborts the watches of the keys it deletes, and only those (Redis 7.0's
    // `touchAllWatchedKeysInDb`; found by `capdb difftest`, cache seed 21).
    store
        .apply(
            vec![
                set_expiring("x", "v", ExpiryUpdate::At(now + 100)),
                set_expiring("y", "v", ExpiryUpdate::At(now + 100)),
            ],
            now,
        )
        .await
        .unwrap();
    let w = store.watch(&b("k"), now);
    let missing = store.watch(&b("missing"), now);
    let expired_before = store.watch(&b("y"), now + 200);
    let expired_after = store.watch(&b("x"), now);
    store.clear().await.unwrap();
    assert!(!run(&store, &w), "a deleted key");
    assert!(run(&store, &missing), "a key that did not exist");
    assert!(
        store
            .apply_guarded(vec![set("t", "z")], &[&expired_before], now + 200)
            .unwrap()
            .is_some(),
        "a key that had expired at WATCH"
    );
    assert!(
        store
            .apply_guarded(vec![set("t", "z")], &[&expired_after], now + 200)
            .unwrap()
            .is_none(),
        "a key that expired after WATCH"
    );
}
