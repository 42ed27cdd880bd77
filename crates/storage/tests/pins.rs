//! Pins (`disk/pins.rs`): a read transaction held at exactly the log index of the pin's
//! entry, whatever is applied after it, until released or expired; bounded per node.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{DiskEngine, PINS_MAX};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Hlc, Mutation, Timestamp};

const VALUE_MAX: usize = 1 << 20;
const TABLE: &str = "shard/3";
const APPLIED: &str = "applied/3";

fn set(k: &str, v: &str, expire_at_ms: Option<u64>) -> Mutation {
    Mutation::Set {
        key: Bytes::from(k.to_string()),
        value: Bytes::from(v.to_string()),
        condition: Condition::Always,
        expiry: expire_at_ms.map_or(ExpiryUpdate::Clear, ExpiryUpdate::At),
        return_old: false,
    }
}

fn applied(index: u64) -> Vec<(String, Option<Vec<u8>>)> {
    vec![(APPLIED.to_string(), Some(index.to_le_bytes().to_vec()))]
}

/// Applies `mutations` as the entry at log `index`.
async fn apply(e: &DiskEngine, index: u64, mutations: Vec<Mutation>) {
    let m = mutations
        .into_iter()
        .map(|m| (m, Timestamp(index), 1_000, index))
        .collect();
    e.apply_replicated(TABLE, m, applied(index), Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap();
}

fn keys(page: &capdb_storage::disk::PinnedPage) -> Vec<String> {
    page.entries
        .iter()
        .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_holds_the_shard_as_of_its_entry_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    for i in 1..=100u64 {
        apply(
            &e,
            i,
            vec![set(&format!("k{i:03}"), &format!("v{i}"), None)],
        )
        .await;
    }
    let t = e.table(TABLE, false);
    let info = t
        .pin(b"job-a", 101, 1_000, applied(101), APPLIED)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.index, 101);
    assert_eq!(info.keys, 100);
    assert_eq!(info.first_key.as_deref(), Some(&b"k001"[..]));
    assert_eq!(info.last_key.as_deref(), Some(&b"k100"[..]));
    assert!(info.held);
    // Applied after the pin: overwrites, deletes, new keys. The pin sees none of them.
    for i in 102..=150u64 {
        let late = format!("late{i}");
        apply(
            &e,
            i,
            vec![set("k001", &late, None), set(&format!("n{i}"), "x", None)],
        )
        .await;
    }
    apply(
        &e,
        151,
        vec![Mutation::Delete {
            key: Bytes::from("k002"),
        }],
    )
    .await;
    let page = t
        .pinned_scan(b"job-a", 101, None, None, None, 1_000, false)
        .unwrap();
    assert_eq!(page.entries.len(), 100);
    assert_eq!(page.next, None);
    assert_eq!(&page.entries[0].1.data[..], b"v1");
    assert_eq!(keys(&page)[1], "k002");
    // Another index of the same owner (a replica that missed a re-pin) is refused.
    assert!(matches!(
        t.pinned_scan(b"job-a", 100, None, None, None, 1_000, false),
        Err(Error::Unavailable(_))
    ));
    // The live table has moved on.
    assert_eq!(
        &t.get(b"k001", 1_000).unwrap().unwrap().data[..],
        b"late150"
    );
    assert!(t.get(b"k002", 1_000).unwrap().is_none());
    // Ranges and paging: [k010, k020) in pages of 4, each after the last key of the one before.
    let mut after: Option<Bytes> = None;
    let mut seen = Vec::new();
    loop {
        let page = t
            .pinned_scan(
                b"job-a",
                101,
                Some(b"k010"),
                Some(b"k020"),
                after.as_deref(),
                4,
                false,
            )
            .unwrap();
        seen.extend(keys(&page));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (10..20).map(|i| format!("k{i:03}")).collect::<Vec<_>>()
    );
    // Released: a scan is refused as retryable elsewhere, never answered from live data.
    assert!(!t.unpin(b"job-a", 100), "a release names the pin's index");
    assert!(t.unpin(b"job-a", 101));
    assert!(matches!(
        t.pinned_scan(b"job-a", 101, None, None, None, 10, false),
        Err(Error::Unavailable(_))
    ));
    assert!(!t.unpin(b"job-a", 101));
    assert_eq!(e.pins_held(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_judged_at_the_pins_clock() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    apply(&e, 1, vec![set("a", "1", Some(5_000)), set("b", "2", None)]).await;
    let t = e.table(TABLE, false);
    t.pin(b"late", 2, 6_000, applied(2), APPLIED)
        .await
        .unwrap()
        .unwrap();
    let skip = t
        .pinned_scan(b"late", 2, None, None, None, 10, false)
        .unwrap();
    assert_eq!((keys(&skip), skip.passed), (vec!["b".to_string()], 1));
    let include = t
        .pinned_scan(b"late", 2, None, None, None, 10, true)
        .unwrap();
    assert_eq!(keys(&include), vec!["a".to_string(), "b".to_string()]);
    t.pin(b"early", 3, 4_000, applied(3), APPLIED)
        .await
        .unwrap()
        .unwrap();
    let before = t
        .pinned_scan(b"early", 3, None, None, None, 10, false)
        .unwrap();
    assert_eq!(keys(&before).len(), 2, "not yet expired at 4 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_a_bounded_number_of_pins() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    apply(&e, 1, vec![set("a", "1", None)]).await;
    let t = e.table(TABLE, false);
    let mut index = 2;
    for n in 0..PINS_MAX {
        let owner = format!("job{n}");
        let info = t
            .pin(owner.as_bytes(), index, 0, applied(index), APPLIED)
            .await;
        assert!(info.unwrap().unwrap().held);
        index += 1;
    }
    let refused = t
        .pin(b"one-too-many", index, 0, applied(index), APPLIED)
        .await;
    let refused = refused.unwrap().unwrap();
    assert!(!refused.held, "a full node says it holds no pin");
    assert_eq!(refused.index, index, "the entry still applied");
    index += 1;
    // Re-pinning an owner replaces its pin (at the new index) rather than taking a slot.
    let again = t.pin(b"job0", index, 0, applied(index), APPLIED).await;
    let again = again.unwrap().unwrap();
    assert!(again.held && again.index == index);
    assert_eq!(t.pinned(b"job0").unwrap().index, index);
    assert_eq!(e.pins_held(), PINS_MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_without_its_applied_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    let t = e.table(TABLE, false);
    assert!(matches!(
        t.pin(b"j", 1, 0, Vec::new(), APPLIED).await,
        Ok(Err(Error::InvalidInput(_)))
    ));
    assert_eq!(e.pins_held(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_installed_or_a_table_dropped_releases_its_pins_but_flushdb_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    apply(&e, 1, vec![set("a", "1", None)]).await;
    let t = e.table(TABLE, false);
    t.pin(b"j", 2, 0, applied(2), APPLIED)
        .await
        .unwrap()
        .unwrap();
    // FLUSHDB (the shard's own entry): the pin still holds the state before it.
    e.replace_table(TABLE, Vec::new(), Vec::new(), None, applied(3), Some(3))
        .await
        .unwrap();
    let page = t.pinned_scan(b"j", 2, None, None, None, 10, false).unwrap();
    assert_eq!(keys(&page), vec!["a".to_string()]);
    // A snapshot installed: this replica no longer holds the shard as of the pin.
    e.replace_table(TABLE, Vec::new(), Vec::new(), None, applied(9), None)
        .await
        .unwrap();
    assert!(t.pinned_scan(b"j", 2, None, None, None, 10, false).is_err());
    t.pin(b"k", 10, 0, applied(10), APPLIED)
        .await
        .unwrap()
        .unwrap();
    e.drop_group(vec![TABLE.to_string()], Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap();
    assert_eq!(e.pins_held(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_lapses_after_its_lease_unless_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    e.set_pin_lease(std::time::Duration::from_secs(2));
    apply(&e, 1, vec![set("a", "1", None)]).await;
    let t = e.table(TABLE, false);
    for (owner, index) in [(&b"renewed"[..], 2), (&b"left"[..], 3)] {
        let info = t.pin(owner, index, 0, applied(index), APPLIED).await;
        assert!(info.unwrap().unwrap().held);
    }
    assert!(
        !t.renew_pin(b"renewed", 3),
        "a renewal names the pin's index"
    );
    // The one nobody renews lapses; the renewed one is held past its first lease.
    let started = std::time::Instant::now();
    while t.pinned(b"left").is_some() {
        assert!(t.renew_pin(b"renewed", 2));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the pin never lapsed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert!(t.renew_pin(b"renewed", 2));
    assert!(!t.renew_pin(b"left", 3), "a lapsed pin is not brought back");
    let page = t
        .pinned_scan(b"renewed", 2, None, None, None, 10, false)
        .unwrap();
    assert_eq!(keys(&page), vec!["a"]);
    assert!(
        t.pinned_scan(b"left", 3, None, None, None, 10, false)
            .is_err()
    );
    assert_eq!(e.pins_held(), 1);
}
