//! A `cp` shard's change log in the engine (`disk/changes.rs`): written with the apply, the
//! same rows on replicas that apply the same entries, kept through FLUSHDB, and a replica that
//! installed a snapshot refusing reads below it (`HISTORYLOST`) instead of answering a gap.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::disk::{ChangesStep, DiskEngine, horizon_row};
use capdb_types::changes::{ChangeOp, StreamId};
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

fn open() -> (tempfile::TempDir, DiskEngine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), VALUE_MAX).unwrap();
    (dir, engine)
}

/// Applies `mutations` as the entry at log `index`, stamped with timestamp `index`.
async fn write(e: &DiskEngine, index: u64, mutations: Vec<Mutation>) {
    let m = mutations
        .into_iter()
        .map(|m| (m, Timestamp(index << 16), 1_000, index))
        .collect();
    e.apply_replicated(TABLE, m, Vec::new(), Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap();
}

/// Every event the replica holds: (id, key, value of a set).
/// A read from a position (not from the start, which begins at whatever is held): the error
/// it gets below what is held.
fn lost_read(e: &DiskEngine) -> String {
    e.table(TABLE, false)
        .changes(StreamId { ms: 1, seq: 0 }, StreamId::MAX, usize::MAX, false)
        .unwrap_err()
        .to_string()
}

fn log(e: &DiskEngine) -> capdb_types::Result<Vec<(StreamId, String, Option<String>)>> {
    Ok(e.table(TABLE, false)
        .changes(StreamId::MIN, StreamId::MAX, usize::MAX, false)?
        .into_iter()
        .map(|c| {
            let value = match &c.event.op {
                ChangeOp::Set { value, .. } => Some(String::from_utf8_lossy(value).into_owned()),
                _ => None,
            };
            (
                c.id,
                String::from_utf8_lossy(&c.event.key).into_owned(),
                value,
            )
        })
        .collect())
}

#[tokio::test]
async fn replicas_applying_the_same_entries_write_the_same_log() {
    let ((_a, a), (_b, b)) = (open(), open());
    for e in [&a, &b] {
        write(e, 1, vec![set("before", "x")]).await;
        e.changes_config(TABLE, ChangesStep::Switch(true), 2, Vec::new(), None)
            .await
            .unwrap()
            .unwrap();
        write(e, 3, vec![set("k", "1"), set("j", "2")]).await;
        write(
            e,
            4,
            vec![Mutation::Delete {
                key: Bytes::from_static(b"k"),
            }],
        )
        .await;
        // Changes nothing: logs nothing.
        write(
            e,
            5,
            vec![Mutation::Delete {
                key: Bytes::from_static(b"nosuch"),
            }],
        )
        .await;
    }
    let got = log(&a).unwrap();
    assert_eq!(got, log(&b).unwrap(), "same entries, same rows and IDs");
    let keys: Vec<(&str, Option<&str>)> = got
        .iter()
        .map(|(_, k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(keys, [("k", Some("1")), ("j", Some("2")), ("k", None)]);
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "IDs increase: {got:?}"
    );
    let info = a.table(TABLE, false).changes_info().unwrap();
    assert_eq!((info.on, info.events, info.last), (true, 3, got[2].0));

    // FLUSHDB keeps the log on at its clock: the next event's ID is larger.
    a.replace_table(
        TABLE,
        Vec::new(),
        vec![horizon_row(6)],
        None,
        Vec::new(),
        Some(6),
    )
    .await
    .unwrap();
    write(&a, 7, vec![set("after", "1")]).await;
    let after = log(&a).unwrap();
    assert_eq!(after.len(), 5, "{after:?}");
    assert_eq!(after[3].1, "", "the flush event names no key");
    assert!(after[3].0 > got[2].0 && after[4].0 > after[3].0);

    // Off deletes the rows: a reader at an older position is told so once the log is back,
    // and what follows has larger IDs.
    a.changes_config(TABLE, ChangesStep::Switch(false), 8, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    a.changes_config(TABLE, ChangesStep::Switch(true), 9, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    write(&a, 10, vec![set("again", "1")]).await;
    let lost = lost_read(&a);
    assert!(lost.contains("HISTORYLOST"), "{lost}");
    let again = a
        .table(TABLE, false)
        .changes(after[4].0.successor(), StreamId::MAX, usize::MAX, false)
        .unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].id > after[4].0, "IDs never go back");
}

#[tokio::test]
async fn a_replica_that_installed_a_snapshot_refuses_reads_below_it() {
    let ((_a, a), (_c, c)) = (open(), open());
    a.changes_config(TABLE, ChangesStep::Switch(true), 1, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    write(&a, 2, vec![set("k", "1")]).await;
    write(&a, 3, vec![set("k", "2")]).await;
    let dump = a.dump_table(TABLE, &[], "none/").unwrap();
    c.replace_table(TABLE, dump.entries, dump.elements, None, Vec::new(), None)
        .await
        .unwrap();
    write(&a, 4, vec![set("k", "3")]).await;
    write(&c, 4, vec![set("k", "3")]).await;
    let lost = lost_read(&c);
    assert!(lost.contains("HISTORYLOST"), "{lost}");
    // From the position after the snapshot on, it serves what the others serve.
    let theirs = log(&a).unwrap();
    let from = theirs[2].0;
    let mine = c
        .table(TABLE, false)
        .changes(from, StreamId::MAX, usize::MAX, false)
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, from);
}

#[tokio::test]
async fn a_trim_drops_what_is_past_the_retention_and_reads_below_it_say_so() {
    let (_a, a) = open();
    a.changes_config(TABLE, ChangesStep::Switch(true), 1, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    a.changes_config(TABLE, ChangesStep::Retention(60_000), 2, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    // Timestamps of entry i are (i << 16): physical ms 0 to 5, long past.
    write(&a, 3, vec![set("k", "1")]).await;
    write(&a, 4, vec![set("k", "2")]).await;
    let before = log(&a).unwrap();
    assert_eq!(before.len(), 2);
    // A trim at a clock before the retention ran out removes nothing.
    a.changes_config(
        TABLE,
        ChangesStep::Trim { now_ms: 30_000 },
        5,
        Vec::new(),
        None,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(log(&a).unwrap(), before);
    // Past it, everything goes; a read from the start names where the log now begins.
    a.changes_config(
        TABLE,
        ChangesStep::Trim { now_ms: 120_000 },
        6,
        Vec::new(),
        None,
    )
    .await
    .unwrap()
    .unwrap();
    let lost = lost_read(&a);
    assert!(lost.contains("HISTORYLOST"), "{lost}");
    assert_eq!(a.table(TABLE, false).changes_info().unwrap().events, 0);
    write(&a, 7, vec![set("k", "3")]).await;
    let after = a
        .table(TABLE, false)
        .changes(before[1].0.successor(), StreamId::MAX, usize::MAX, false)
        .unwrap();
    assert_eq!(after.len(), 1, "what came after the trimmed rows is there");
}

#[tokio::test]
async fn replicas_that_batched_entries_differently_trim_the_same_events() {
    let ((_a, a), (_b, b)) = (open(), open());
    for e in [&a, &b] {
        e.changes_config(TABLE, ChangesStep::Switch(true), 1, Vec::new(), None)
            .await
            .unwrap()
            .unwrap();
        e.changes_config(TABLE, ChangesStep::Retention(1_000), 2, Vec::new(), None)
            .await
            .unwrap()
            .unwrap();
    }
    // Entries 3 and 4 (physical ms 3 and 4): one storage job on `a`, two on `b`.
    let entry = |i: u64, v: &str| (set("k", v), Timestamp::from_parts(i, 0), 1_000, i);
    a.apply_replicated(
        TABLE,
        vec![entry(3, "x"), entry(4, "y")],
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    )
    .await
    .unwrap();
    for (i, v) in [(3, "x"), (4, "y")] {
        b.apply_replicated(
            TABLE,
            vec![entry(i, v)],
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap();
    }
    assert_eq!(log(&a).unwrap(), log(&b).unwrap());
    let all = log(&a).unwrap();
    // The cutoff falls between the two entries: physical ms 4 at now 1,004.
    for e in [&a, &b] {
        e.changes_config(
            TABLE,
            ChangesStep::Trim { now_ms: 1_004 },
            5,
            Vec::new(),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    }
    for e in [&a, &b] {
        let t = e.table(TABLE, false);
        let kept = t
            .changes(all[0].0.successor(), StreamId::MAX, usize::MAX, false)
            .unwrap();
        assert_eq!(kept.len(), 1, "the second entry stays on every replica");
        assert_eq!(kept[0].id, all[1].0);
        assert_eq!(t.changes_info().unwrap().events, 1);
        let lost = t
            .changes(StreamId { ms: 1, seq: 0 }, StreamId::MAX, usize::MAX, false)
            .unwrap_err()
            .to_string();
        // Named: the position right after the last event that went.
        assert!(lost.contains(&all[0].0.successor().to_string()), "{lost}");
    }
    // Everything trimmed: `$` (the last ID) stays where it was, and reading after it is fine.
    for e in [&a, &b] {
        e.changes_config(
            TABLE,
            ChangesStep::Trim { now_ms: 100_000 },
            6,
            Vec::new(),
            None,
        )
        .await
        .unwrap()
        .unwrap();
        let t = e.table(TABLE, false);
        let info = t.changes_info().unwrap();
        assert_eq!((info.events, info.last), (0, all[1].0));
        assert!(
            t.changes(info.last.successor(), StreamId::MAX, usize::MAX, false)
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn retention_by_size_drops_the_oldest_entries_until_the_rest_fits() {
    let (_a, a) = open();
    let step = |s| a.changes_config(TABLE, s, 1, Vec::new(), None);
    step(ChangesStep::Switch(true)).await.unwrap().unwrap();
    // Each event is a 1-byte key and a 10-byte value: 11 bytes. Keep 25: the last two.
    step(ChangesStep::RetentionBytes(25))
        .await
        .unwrap()
        .unwrap();
    for (i, v) in ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc", "dddddddddd"]
        .into_iter()
        .enumerate()
    {
        write(&a, 3 + i as u64, vec![set("k", v)]).await;
    }
    let table = a.table(TABLE, false);
    assert!(
        table.changes_trim_due(0, None).unwrap(),
        "44 bytes held, 25 kept"
    );
    // Not old at all (now_ms 0): only the size is past its bound. The leader decides where
    // the kept part begins, and the entry carries it.
    let keep_from = table
        .changes_size_keep_from()
        .unwrap()
        .expect("over the bound");
    let trim = ChangesStep::TrimTo {
        now_ms: 0,
        keep_from,
    };
    a.changes_config(TABLE, trim, 8, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    // A reverse read stops where the log now begins.
    let left: Vec<String> = table
        .changes(StreamId::MIN, StreamId::MAX, usize::MAX, true)
        .unwrap()
        .into_iter()
        .rev()
        .map(|c| match c.event.op {
            ChangeOp::Set { value, .. } => String::from_utf8_lossy(&value).into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(left, ["cccccccccc", "dddddddddd"]);
    assert!(!table.changes_trim_due(0, None).unwrap(), "22 bytes fit");
    assert_eq!(table.changes_info().unwrap().events, 2);
    // A bound smaller than the newest entry still keeps it.
    step(ChangesStep::RetentionBytes(1)).await.unwrap().unwrap();
    let keep_from = table
        .changes_size_keep_from()
        .unwrap()
        .expect("over the bound");
    let trim = ChangesStep::TrimTo {
        now_ms: 0,
        keep_from,
    };
    a.changes_config(TABLE, trim, 9, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(table.changes_info().unwrap().events, 1, "the newest stays");
    assert!(
        !table.changes_trim_due(0, None).unwrap(),
        "nothing more can go"
    );
}
