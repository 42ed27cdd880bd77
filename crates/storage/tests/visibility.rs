//! Raft applies are answered before the storage commits them (`disk/visible.rs`): whatever a
//! caller was told is applied, every read after that sees, and a clean close keeps it.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::DiskEngine;
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Hlc, Mutation, Timestamp};

const VALUE_MAX: usize = 1 << 20;
const TABLE: &str = "shard/3";

fn set(k: &str, v: &str) -> Mutation {
    Mutation::Set {
        key: Bytes::from(k.to_string()),
        value: Bytes::from(v.to_string()),
        condition: Condition::Always,
        expiry: ExpiryUpdate::Clear,
        return_old: false,
    }
}

fn open(dir: &std::path::Path) -> DiskEngine {
    DiskEngine::open(dir, Arc::new(Hlc::new()), VALUE_MAX).unwrap()
}

/// Applies `SET key value` as the entry at log `index`, with the applied index in `_meta`.
async fn apply(e: &DiskEngine, index: u64, key: &str, value: &str) {
    e.apply_replicated(
        TABLE,
        vec![(set(key, value), Timestamp(index), 1_000, index)],
        vec![("applied/3".to_string(), Some(index.to_le_bytes().to_vec()))],
        Vec::new(),
        Vec::new(),
        Vec::new(),
    )
    .await
    .unwrap();
}

fn read(e: &DiskEngine, key: &str) -> Option<String> {
    e.table(TABLE, false)
        .get(key.as_bytes(), 1_000)
        .unwrap()
        .map(|v| String::from_utf8(v.data.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_apply_is_seen_by_the_next_read() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    for i in 1..=300u64 {
        let value = format!("v{i}");
        apply(&e, i, "k", &value).await;
        // Half the reads wait first without blocking (as the Raft read path does), half
        // rely on the read itself waiting.
        if i % 2 == 0 {
            e.visible().await.unwrap();
        }
        assert_eq!(read(&e, "k").as_deref(), Some(value.as_str()), "entry {i}");
        let applied = e.meta_get("applied/3").unwrap().unwrap();
        assert_eq!(applied, i.to_le_bytes().to_vec(), "entry {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_other_tasks_see_every_apply_answered_before_they_began() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let reader = {
        let e = e.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let mut checked = 0;
            while rx.changed().await.is_ok() {
                let answered = *rx.borrow_and_update();
                let seen = e
                    .meta_get("applied/3")
                    .unwrap()
                    .map(|raw| u64::from_le_bytes(raw.try_into().unwrap()));
                assert!(
                    seen.unwrap_or(0) >= answered,
                    "applied {answered} was answered, a later read saw {seen:?}"
                );
                checked += 1;
            }
            checked
        })
    };
    for i in 1..=500u64 {
        apply(&e, i, &format!("k{i}"), "x").await;
        tx.send(i).unwrap();
    }
    drop(tx);
    assert!(reader.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_applies_are_kept_by_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(dir.path());
    for i in 1..=50u64 {
        apply(&e, i, &format!("k{i}"), &format!("v{i}")).await;
    }
    let closed = e.closed();
    drop(e);
    assert!(closed.wait(std::time::Duration::from_secs(30)));
    let e = open(dir.path());
    for i in 1..=50u64 {
        assert_eq!(read(&e, &format!("k{i}")), Some(format!("v{i}")));
    }
}
