//! `ap` tables store a collection element by element (`disk/ap.rs`): a head record per key and
//! a record per element. These tests pin what that buys and what it must keep: a write of one
//! field stores a few bytes whatever the hash's size, a delete writes the head only and its
//! hidden elements are reclaimed in bounded steps, and reads see exactly the merged state.

use std::sync::Arc;

use bytes::Bytes;
use capdb_storage::disk::{AP_RECLAIM_STEP_MAX, DiskEngine, DiskTable};
use capdb_types::composite::{CollState, Composite, Entry};
use capdb_types::{Hlc, Timestamp, Value, ValueKind};

const HASH: u8 = ValueKind::Hash as u8;

fn at(ms: u64) -> Timestamp {
    Timestamp::from_parts(ms, 0)
}

/// A hash delta: `fields` (name, written at ms), created at `created` ms.
fn hash_delta(fields: &[(String, u64)], created: u64) -> Value {
    let mut c = CollState {
        created: at(created),
        ..CollState::default()
    };
    for (f, ms) in fields {
        c.entries.insert(
            Bytes::from(f.clone()),
            Entry {
                ts: at(*ms),
                origin: 1,
                value: Some(Bytes::from_static(b"value")),
                ..Entry::default()
            },
        );
    }
    let mut comp = Composite::default();
    comp.colls.insert(HASH, c);
    comp.to_value()
}

fn fields(n: usize, ms: u64) -> Vec<(String, u64)> {
    (0..n).map(|i| (format!("f{i:05}"), ms)).collect()
}

/// The visible fields of `key`, read whole.
fn visible_fields(t: &DiskTable, key: &[u8]) -> Vec<String> {
    let Some(v) = t.ap_get(key).unwrap() else {
        return Vec::new();
    };
    let c = Composite::of(&v).unwrap();
    c.colls
        .get(&HASH)
        .map(|h| {
            h.entries
                .iter()
                .filter(|(_, e)| e.visible(HASH))
                .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn table(dir: &tempfile::TempDir) -> (DiskEngine, DiskTable) {
    let engine = DiskEngine::open(dir.path(), Arc::new(Hlc::new()), 1 << 20).unwrap();
    engine
        .create_table("ks/t", "keyspace/t", b"{}".to_vec())
        .await
        .unwrap();
    let t = engine.table("ks/t", true);
    (engine, t)
}

#[tokio::test]
async fn a_field_write_stores_little_whatever_the_hash_size_and_a_delete_is_reclaimed_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let n = 2 * AP_RECLAIM_STEP_MAX + 10;
    let whole = t
        .ap_merge(vec![(
            Bytes::from_static(b"h"),
            hash_delta(&fields(n, 1_000), 1_000),
        )])
        .await
        .unwrap();
    assert_eq!(t.ap_element_count(b"h").unwrap(), n as u64);
    assert_eq!(visible_fields(&t, b"h").len(), n);

    let one = t
        .ap_merge(vec![(
            Bytes::from_static(b"h"),
            hash_delta(&[("f00005".into(), 2_000)], 1_000),
        )])
        .await
        .unwrap();
    assert!(
        one.stored_bytes > 0 && one.stored_bytes < 200,
        "one field stored {} bytes (the whole hash took {})",
        one.stored_bytes,
        whole.stored_bytes
    );

    // DEL: the head alone, whatever the size.
    let del = t
        .ap_merge(vec![(
            Bytes::from_static(b"h"),
            Value::tombstone(at(3_000)),
        )])
        .await
        .unwrap();
    assert!(
        del.stored_bytes < 100,
        "a delete stored {}",
        del.stored_bytes
    );
    assert_eq!(visible_fields(&t, b"h"), Vec::<String>::new());
    assert!(!t.ap_get(b"h").unwrap().unwrap().is_live(0));
    let mut shown = Vec::new();
    t.ap_for_each_key(None, |k, v| {
        shown.push((k.to_vec(), v.is_live(0)));
        true
    })
    .unwrap();
    assert_eq!(shown, vec![(b"h".to_vec(), false)]);

    // Its tombstone is not collected while hidden elements are left (they would show again).
    let purged = t
        .purge_tombstones(vec![(Bytes::from_static(b"h"), at(3_000))], vec![])
        .await
        .unwrap();
    assert_eq!(purged, 0);
    assert!(t.ap_get(b"h").unwrap().is_some());

    let mut steps = 0;
    while t.ap_reclaim_step().await.unwrap() > 0 {
        steps += 1;
        assert!(steps <= n, "reclaiming never ends");
    }
    assert!(steps >= 3, "{n} elements went in {steps} bounded steps");
    assert_eq!(t.ap_element_count(b"h").unwrap(), 0);
    assert_eq!(t.ap_element_stats().unwrap(), (0, 0));

    let purged = t
        .purge_tombstones(vec![(Bytes::from_static(b"h"), at(3_000))], vec![])
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(t.ap_get(b"h").unwrap(), None);
}

#[tokio::test]
async fn a_field_written_after_a_delete_survives_it_and_an_older_one_arriving_late_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let key = Bytes::from_static(b"h");
    t.ap_merge(vec![(key.clone(), hash_delta(&fields(3, 1_000), 1_000))])
        .await
        .unwrap();
    // The delete, and a field written after it, then a field older than it arriving late.
    t.ap_merge(vec![
        (key.clone(), Value::tombstone(at(2_000))),
        (
            key.clone(),
            hash_delta(&[("late-new".into(), 2_500)], 1_000),
        ),
        (
            key.clone(),
            hash_delta(&[("late-old".into(), 1_500)], 1_000),
        ),
    ])
    .await
    .unwrap();
    assert_eq!(visible_fields(&t, &key), vec!["late-new".to_string()]);
    while t.ap_reclaim_step().await.unwrap() > 0 {}
    assert_eq!(
        t.ap_element_count(&key).unwrap(),
        1,
        "only the live field is stored"
    );
    let mut shown = Vec::new();
    t.ap_for_each_key(None, |k, v| {
        shown.push((k.to_vec(), v.is_live(0), v.header.kind));
        true
    })
    .unwrap();
    assert_eq!(shown, vec![(b"h".to_vec(), true, ValueKind::Hash)]);
}

#[tokio::test]
async fn element_removals_are_collected_only_once_older_than_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let key = Bytes::from_static(b"h");
    t.ap_merge(vec![(key.clone(), hash_delta(&fields(2, 1_000), 1_000))])
        .await
        .unwrap();
    // HDEL f00000 at 2_000.
    let mut removal = Composite::default();
    removal.colls.entry(HASH).or_default().entries.insert(
        Bytes::from_static(b"f00000"),
        Entry {
            ts: at(2_000),
            origin: 1,
            value: None,
            ..Entry::default()
        },
    );
    t.ap_merge(vec![(key.clone(), removal.to_value())])
        .await
        .unwrap();
    assert_eq!(visible_fields(&t, &key), vec!["f00001".to_string()]);
    let record = capdb_storage::layout::ap_element_key(&key, HASH, b"f00000");
    let live = capdb_storage::layout::ap_element_key(&key, HASH, b"f00001");
    let purge = |h: u64| {
        vec![
            (Bytes::from(record.clone()), at(h)),
            (Bytes::from(live.clone()), at(h)),
        ]
    };
    assert_eq!(t.purge_tombstones(vec![], purge(1_500)).await.unwrap(), 0);
    assert_eq!(t.purge_tombstones(vec![], purge(5_000)).await.unwrap(), 1);
    assert_eq!(t.ap_element_count(&key).unwrap(), 1);
    assert_eq!(visible_fields(&t, &key), vec!["f00001".to_string()]);
}

#[tokio::test]
async fn a_hash_written_over_a_concurrent_string_counts_one_type_conflict_and_shows_the_later() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let key = Bytes::from_static(b"k");
    let string = Value::new(Bytes::from_static(b"s"), at(1_000), None);
    let first = t.ap_merge(vec![(key.clone(), string)]).await.unwrap();
    assert_eq!(first.conflicts.type_conflicts, 0);
    let hash = t
        .ap_merge(vec![(
            key.clone(),
            hash_delta(&[("f".into(), 2_000)], 2_000),
        )])
        .await
        .unwrap();
    assert_eq!(hash.conflicts.type_conflicts, 1);
    let mut shown = Vec::new();
    t.ap_for_each_key(None, |_, v| {
        shown.push(v.header.kind);
        true
    })
    .unwrap();
    assert_eq!(shown, vec![ValueKind::Hash], "the hash was written last");
    // More fields of the hash are no new conflict.
    let more = t
        .ap_merge(vec![(
            key.clone(),
            hash_delta(&[("g".into(), 3_000)], 2_000),
        )])
        .await
        .unwrap();
    assert_eq!(more.conflicts.type_conflicts, 0);
}

/// A point read (`ap_get_part`, what HSET/HGET/SADD/ZADD of named elements read) of a big hash
/// holds the head, the fields asked for (removed ones too: their versions matter to the
/// merge) and the first visible field, the witness that the hash is not empty, and nothing
/// else. A small hash is read whole, as is a key where another type competes.
#[tokio::test]
async fn a_point_read_of_a_big_hash_fetches_the_named_fields_and_one_visible_witness() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let big = |v: Value| {
        let mut c = Composite::of(&v).unwrap();
        c.colls.get_mut(&HASH).unwrap().big = at(1_000);
        c.to_value()
    };
    t.ap_merge(vec![(
        Bytes::from_static(b"h"),
        big(hash_delta(&fields(1_000, 1_000), 1_000)),
    )])
    .await
    .unwrap();
    // The first ten fields removed (HDEL): the witness is the first one left.
    let mut removed = Composite::default();
    let c = removed.colls.entry(HASH).or_default();
    for (f, _) in fields(10, 0) {
        c.entries.insert(
            Bytes::from(f),
            Entry {
                ts: at(2_000),
                origin: 1,
                value: None,
                ..Entry::default()
            },
        );
    }
    t.ap_merge(vec![(Bytes::from_static(b"h"), removed.to_value())])
        .await
        .unwrap();

    let asked: Vec<Bytes> = [&b"f00500"[..], b"f00003", b"nope"]
        .into_iter()
        .map(Bytes::from_static)
        .collect();
    let whole = Composite::of(&t.ap_get(b"h").unwrap().unwrap()).unwrap();
    // A named field is visible: it is the witness, nothing else is read.
    let part = t.ap_get_part(b"h", HASH, &asked).unwrap();
    assert!(!part.whole);
    assert_eq!(part.witness.as_deref(), Some(&b"f00500"[..]));
    let got = Composite::of(&part.value.unwrap()).unwrap();
    let entries = &got.colls[&HASH].entries;
    let subs: Vec<&[u8]> = entries.keys().map(|k| &k[..]).collect();
    assert_eq!(subs, vec![&b"f00003"[..], b"f00500"]);
    assert!(!entries[&b"f00003"[..]].visible(HASH));
    for (sub, e) in entries {
        assert_eq!(Some(e), whole.colls[&HASH].entries.get(sub), "{sub:?}");
    }
    assert!(capdb_storage::disk::partial_fits(&got, HASH));
    // None is: the first visible field in order, past the removed ones.
    let part = t.ap_get_part(b"h", HASH, &asked[1..]).unwrap();
    assert!(!part.whole);
    assert_eq!(part.witness.as_deref(), Some(&b"f00010"[..]));
    let got = Composite::of(&part.value.unwrap()).unwrap();
    let subs: Vec<&[u8]> = got.colls[&HASH].entries.keys().map(|k| &k[..]).collect();
    assert_eq!(subs, vec![&b"f00003"[..], b"f00010"]);

    // Two named fields visible: the least is the witness (replicas holding the same fields
    // name the same one, whatever order a command names them in).
    let two = [Bytes::from_static(b"f00700"), Bytes::from_static(b"f00600")];
    let part = t.ap_get_part(b"h", HASH, &two).unwrap();
    assert_eq!(part.witness.as_deref(), Some(&b"f00600"[..]));

    // A small hash: whole.
    t.ap_merge(vec![(
        Bytes::from_static(b"small"),
        hash_delta(&fields(5, 1_000), 1_000),
    )])
    .await
    .unwrap();
    let part = t.ap_get_part(b"small", HASH, &asked).unwrap();
    assert!(part.whole);
    assert_eq!(
        part.witness.as_deref(),
        Some(&b"f00003"[..]),
        "the named one"
    );
    let got = Composite::of(&part.value.unwrap()).unwrap();
    assert_eq!(got.colls[&HASH].entries.len(), 5);

    // A string written over the big hash concurrently (a type conflict): whole.
    let mut s = Value::new(Bytes::from_static(b"str"), at(1_500), None);
    s.header.timestamp = at(1_500);
    t.ap_merge(vec![(Bytes::from_static(b"h"), s)])
        .await
        .unwrap();
    let part = t.ap_get_part(b"h", HASH, &asked).unwrap();
    assert!(part.whole);
}

/// A hash field written after a delete it did not see outlives the hash's registers (the
/// delete pruned them): a big set created later at the same key has the head to itself, but
/// the field still competes for what the key shows, so a point read of the set is whole.
#[tokio::test]
async fn a_point_read_is_whole_when_another_kinds_elements_outlive_its_registers() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    const SET: u8 = ValueKind::Set as u8;
    let key = Bytes::from_static(b"k");
    t.ap_merge(vec![(
        key.clone(),
        hash_delta(&[("f".into(), 3_000)], 1_000),
    )])
    .await
    .unwrap();
    t.ap_merge(vec![(key.clone(), Value::tombstone(at(2_000)))])
        .await
        .unwrap();
    let mut set = Composite::default();
    let c = set.colls.entry(SET).or_default();
    c.created = at(2_500);
    c.big = at(2_500);
    let mut m = Entry {
        ts: at(2_500),
        origin: 1,
        value: Some(Bytes::new()),
        ..Entry::default()
    };
    m.adds.insert(1, at(2_500));
    c.entries.insert(Bytes::from_static(b"m"), m);
    t.ap_merge(vec![(key.clone(), set.to_value())])
        .await
        .unwrap();

    let head = Composite::of(&t.ap_get(b"k").unwrap().unwrap()).unwrap();
    assert!(
        head.colls[&HASH].entries.contains_key(&b"f"[..]),
        "the field survives the delete"
    );
    let part = t
        .ap_get_part(b"k", SET, &[Bytes::from_static(b"m")])
        .unwrap();
    assert!(part.whole, "the hash field competes with the set");
}

/// Finding a witness past removed fields is bounded: with more than `AP_WITNESS_SCAN_MAX`
/// removed fields before the first visible one, the point read is whole; with fewer, it finds
/// it.
#[tokio::test]
async fn the_witness_scan_past_removed_fields_is_bounded() {
    use capdb_storage::disk::AP_WITNESS_SCAN_MAX;
    let dir = tempfile::tempdir().unwrap();
    let (_engine, t) = table(&dir).await;
    let n = AP_WITNESS_SCAN_MAX + 10;
    for (key, removed) in [
        (&b"over"[..], AP_WITNESS_SCAN_MAX + 1),
        (b"under", AP_WITNESS_SCAN_MAX - 1),
    ] {
        let mut v = Composite::of(&hash_delta(&fields(n, 1_000), 1_000)).unwrap();
        v.colls.get_mut(&HASH).unwrap().big = at(1_000);
        t.ap_merge(vec![(Bytes::copy_from_slice(key), v.to_value())])
            .await
            .unwrap();
        let mut gone = Composite::default();
        let c = gone.colls.entry(HASH).or_default();
        for (f, _) in fields(removed, 0) {
            c.entries.insert(
                Bytes::from(f),
                Entry {
                    ts: at(2_000),
                    origin: 1,
                    value: None,
                    ..Entry::default()
                },
            );
        }
        t.ap_merge(vec![(Bytes::copy_from_slice(key), gone.to_value())])
            .await
            .unwrap();
    }
    let asked = [Bytes::from_static(b"nope")];
    let over = t.ap_get_part(b"over", HASH, &asked).unwrap();
    assert!(over.whole, "past the bound: whole");
    let under = t.ap_get_part(b"under", HASH, &asked).unwrap();
    assert!(!under.whole);
    let first = format!("f{:05}", AP_WITNESS_SCAN_MAX - 1);
    assert_eq!(under.witness.as_deref(), Some(first.as_bytes()));
}
