//! Synchronous views (`disk/views.rs`): rows kept inside the apply, built behind a cursor
//! while writes go on, equal to a recomputation from the data, identical on every replica.

use std::sync::Arc;

use bytes::Bytes;
use capdb_reduce::extract::Scalar;
use capdb_reduce::num::Fixed;
use capdb_reduce::{JobSpec, Plan};
use capdb_storage::KeyspaceStore;
use capdb_storage::disk::{
    ChangesStep, DiskEngine, VIEWS_QUERY, ViewCounts, ViewDeltaBuilder, ViewRow,
};
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::views::{AsyncAt, ViewCommand, ViewDef, ViewState};
use capdb_types::{Error, Hlc, Mutation, Reply, Timestamp};

const TABLE: &str = "shard/4";
const APPLIED: &str = "applied/4";

const SPEC: &str = r#"{"input": {"keyspace": "orders", "prefix": "o:", "expired": "include"},
  "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
  "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"},
             "low": {"min": "a"}, "high": {"max": "a"}}}"#;

fn canonical_spec() -> String {
    JobSpec::parse(SPEC.as_bytes())
        .unwrap()
        .canonical()
        .to_string()
}

/// One replica of a shard, fed entries in log order.
struct Replica {
    e: DiskEngine,
    index: u64,
}

impl Replica {
    fn open(dir: &std::path::Path) -> Replica {
        Replica {
            e: DiskEngine::open(dir, Arc::new(Hlc::new()), 1 << 20).unwrap(),
            index: 0,
        }
    }

    async fn write(&mut self, ms: Vec<Mutation>) {
        self.index += 1;
        let index = self.index;
        let m = ms
            .into_iter()
            .map(|m| (m, Timestamp(index), 1_000, index))
            .collect();
        let applied = vec![(APPLIED.to_string(), Some(index.to_le_bytes().to_vec()))];
        self.e
            .apply_replicated(TABLE, m, applied, Vec::new(), Vec::new(), Vec::new())
            .await
            .unwrap();
    }

    async fn view(&mut self, cmd: ViewCommand) -> Result<Reply, Error> {
        self.index += 1;
        self.e
            .changes_config(TABLE, ChangesStep::View(cmd), self.index, Vec::new(), None)
            .await
            .unwrap()
    }

    fn query(&self, args: &[&[u8]]) -> Result<Reply, Error> {
        let mut a = vec![Bytes::from_static(VIEWS_QUERY.as_bytes())];
        a.extend(args.iter().map(|s| Bytes::copy_from_slice(s)));
        self.e.table(TABLE, false).query(&a, 0, 0)
    }

    fn def(&self, name: &str) -> Option<ViewDef> {
        let Reply::Array(defs) = self.query(&[b"defs"]).unwrap() else {
            panic!()
        };
        defs.into_iter().find_map(|d| match d {
            Reply::Array(v) if v[0] == Reply::Bulk(Bytes::from(name.to_string())) => match &v[1] {
                Reply::Bulk(b) => Some(postcard::from_bytes(b).unwrap()),
                _ => None,
            },
            _ => None,
        })
    }

    /// Backfills view `name` until it is ready, running `between` before each step.
    async fn build(&mut self, name: &str, mut between: impl AsyncFnMut(&mut Replica)) {
        for _ in 0..10_000 {
            let def = self.def(name).expect("defined");
            let ViewState::Building { cursor, .. } = def.state else {
                return;
            };
            between(self).await;
            self.view(ViewCommand::Backfill {
                name: Bytes::from(name.to_string()),
                generation: def.generation,
                after: cursor,
            })
            .await
            .unwrap();
        }
        panic!("the build never ended");
    }

    /// Defines view `name` (generation `generation`, [`SPEC`]) and builds it with no writes
    /// between the steps.
    async fn define_built(&mut self, name: &str, generation: u64) {
        self.view(ViewCommand::Define {
            name: Bytes::from(name.to_string()),
            generation,
            spec: canonical_spec(),
        })
        .await
        .unwrap();
        self.build(name, async |_: &mut Replica| {}).await;
    }

    /// The view's rows as a job's result rows (the same JSON a job gives), and its counts.
    fn rows(&self, name: &str, generation: u64) -> (Vec<serde_json::Value>, ViewCounts) {
        let plan = Plan::new(JobSpec::parse(SPEC.as_bytes()).unwrap()).unwrap();
        let mut partial = plan.partial();
        let mut after = Vec::new();
        let mut counts;
        loop {
            let reply = self
                .query(&[
                    b"rows",
                    name.as_bytes(),
                    generation.to_string().as_bytes(),
                    &after,
                    b"100",
                ])
                .unwrap();
            let Reply::Array(mut parts) = reply else {
                panic!()
            };
            let Reply::Array(rows) = parts.remove(2) else {
                panic!()
            };
            let Reply::Bulk(c) = &parts[1] else { panic!() };
            counts = Some(postcard::from_bytes::<ViewCounts>(c).unwrap());
            if rows.is_empty() {
                break;
            }
            for r in rows {
                let Reply::Array(gr) = r else { panic!() };
                let (Reply::Bulk(g), Reply::Bulk(row)) = (&gr[0], &gr[1]) else {
                    panic!()
                };
                let row: ViewRow = postcard::from_bytes(row).unwrap();
                partial.insert_group(g.to_vec(), row.accs);
                after = g.to_vec();
            }
        }
        (plan.rows(&partial).unwrap(), counts.unwrap())
    }

    /// What a job over the shard's current data answers (expired keys included).
    fn recomputed(&self) -> (Vec<serde_json::Value>, u64, u64) {
        let plan = Plan::new(JobSpec::parse(SPEC.as_bytes()).unwrap()).unwrap();
        let mut partial = plan.partial();
        let dump = self.e.dump_table(TABLE, &[], "none/").unwrap();
        for (k, raw) in &dump.entries {
            let v = capdb_types::value::Value::decode(raw).unwrap();
            if k.starts_with(b"o:") && v.is_string() && !v.header.tombstone {
                plan.add(&mut partial, k, &v.data).unwrap();
            }
        }
        (plan.rows(&partial).unwrap(), partial.keys, partial.skipped)
    }

    fn verify(&self, name: &str) -> (i64, i64) {
        match self.query(&[b"verify", name.as_bytes()]).unwrap() {
            Reply::Array(v) => match (&v[0], &v[1]) {
                (Reply::Integer(d), Reply::Integer(c)) => {
                    assert_eq!(*d, 0, "drift: {:?}", v[2]);
                    (*d, *c)
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}

fn set(k: &str, v: &str) -> Mutation {
    Mutation::Set {
        key: Bytes::from(k.to_string()),
        value: Bytes::from(v.to_string()),
        condition: Condition::Always,
        expiry: ExpiryUpdate::Clear,
        return_old: false,
    }
}

fn del(k: &str) -> Mutation {
    Mutation::Delete {
        key: Bytes::from(k.to_string()),
    }
}

/// A random write among the view's keys and others: JSON orders in 7 countries, amounts with
/// decimals and negatives, non-JSON values, deletions, counters, appends.
fn random_write(rng: &mut fastrand::Rng) -> Mutation {
    let k = format!("o:{:05}", rng.u32(0..20_000));
    match rng.u8(0..10) {
        0 => del(&k),
        1 => set(&k, "not json"),
        2 => set(&format!("p:{}", rng.u32(0..100)), r#"{"c":"x","a":1}"#),
        3 => Mutation::Append {
            key: Bytes::from(k),
            data: Bytes::from_static(b" "),
        },
        4 => set(&k, &format!(r#"{{"c":"c{}"}}"#, rng.u8(0..7))),
        // A multi-key write naming keys more than once (counted once each), or a deletion
        // among its keys, so that it sometimes finds them all absent and writes.
        5 if rng.bool() => del(&format!("o:n{:03}", rng.u32(0..200))),
        5 => {
            // A narrow window repeats keys among a few, a wide one among more than eight.
            let window = if rng.bool() { 5 } else { 16 };
            let base = rng.u32(0..200 - window);
            let mut args = vec![Bytes::from_static(b"MSETNX")];
            for _ in 0..rng.usize(1..12) {
                args.push(Bytes::from(format!("o:n{:03}", base + rng.u32(0..window))));
                args.push(Bytes::from(format!(
                    r#"{{"c":"c{}","a":{}}}"#,
                    rng.u8(0..7),
                    rng.i32(-100..100)
                )));
            }
            Mutation::Exec {
                key: args[1].clone(),
                args,
            }
        }
        _ => set(
            &k,
            &format!(
                r#"{{"c":"c{}","a":{}.{}}}"#,
                rng.u8(0..7),
                rng.i32(-1_000..100_000),
                rng.u8(0..100)
            ),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_built_while_writes_go_on_equals_a_recomputation_on_every_replica() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Replica::open(da.path());
    let mut b = Replica::open(db.path());
    let mut rng = fastrand::Rng::with_seed(7);
    // The same log for both replicas: 20,000 writes before the view, the definition, a build
    // with writes between its steps (keys before and after the cursor), writes after.
    let mut log: Vec<Vec<Mutation>> = Vec::new();
    for _ in 0..2_000 {
        log.push((0..10).map(|_| random_write(&mut rng)).collect());
    }
    for r in [&mut a, &mut b] {
        for ms in &log {
            r.write(ms.clone()).await;
        }
    }
    let define = ViewCommand::Define {
        name: Bytes::from_static(b"sales"),
        generation: 1,
        spec: canonical_spec(),
    };
    for r in [&mut a, &mut b] {
        let created = r.view(define.clone()).await.unwrap();
        assert_eq!(
            created,
            Reply::Array(vec![
                Reply::Integer(1),
                Reply::Bulk(Bytes::from_static(b"created"))
            ])
        );
    }
    // Building: writes between the steps, recorded so the second replica gets the same.
    let mut between: Vec<Vec<Mutation>> = Vec::new();
    let mut rng2 = fastrand::Rng::with_seed(8);
    a.build("sales", async |r: &mut Replica| {
        let ms: Vec<Mutation> = (0..50).map(|_| random_write(&mut rng2)).collect();
        between.push(ms.clone());
        r.write(ms).await;
    })
    .await;
    let mut steps = between.into_iter();
    b.build("sales", async |r: &mut Replica| {
        r.write(steps.next().expect("the same number of steps"))
            .await;
    })
    .await;
    for _ in 0..200 {
        let ms: Vec<Mutation> = (0..10).map(|_| random_write(&mut rng)).collect();
        a.write(ms.clone()).await;
        b.write(ms).await;
    }
    assert_eq!(a.def("sales").unwrap().state, ViewState::Ready);
    let (rows, counts) = a.rows("sales", 1);
    let (want, keys, skipped) = a.recomputed();
    assert_eq!(rows, want, "the view against a job over the same data");
    assert_eq!((counts.keys as u64, counts.skipped as u64), (keys, skipped));
    assert!(
        rows.len() == 7 && keys > 1_000 && skipped > 100,
        "{rows:?} {keys} {skipped}"
    );
    a.verify("sales");
    // The same view on both replicas. (Not the same bytes: a replica writes a view's changes
    // at its own commits, so its unfolded rows and folds differ; what they sum to does not.)
    let (rows_b, counts_b) = b.rows("sales", 1);
    assert_eq!(rows_b, rows);
    assert_eq!(
        (counts_b.keys, counts_b.skipped, counts_b.rounded),
        (counts.keys, counts.skipped, counts.rounded)
    );
    b.verify("sales");
    // The same definition again is found, another refused.
    assert_eq!(
        a.view(define).await.unwrap(),
        Reply::Array(vec![
            Reply::Integer(1),
            Reply::Bulk(Bytes::from_static(b"exists"))
        ])
    );
    let other = ViewCommand::Define {
        name: Bytes::from_static(b"sales"),
        generation: 2,
        spec: canonical_spec().replace("\"a\"", "\"b\""),
    };
    assert!(a.view(other).await.is_err());
}

/// Min and max are read from multisets whose changes are kept unfolded for up to 256 commits
/// (each read here asks for one): a read merges them. Writes here replace and delete the
/// current extremes of few groups over few amounts, so a change often empties a row or adds
/// a number only the unfolded changes hold; after every write the view equals a
/// recomputation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_and_max_stay_exact_between_and_across_folds_of_their_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::open(dir.path());
    let mut rng = fastrand::Rng::with_seed(11);
    a.define_built("sales", 1).await;
    let write = |rng: &mut fastrand::Rng| {
        let k = format!("o:{}", rng.u8(0..12));
        match rng.u8(0..5) {
            0 => del(&k),
            _ => set(
                &k,
                &format!(r#"{{"c":"c{}","a":{}}}"#, rng.u8(0..2), rng.i8(-3..4)),
            ),
        }
    };
    // Past two folds (at 256 and 512 unfolded rows).
    for step in 0..600 {
        let n = 1 + rng.usize(0..3);
        a.write((0..n).map(|_| write(&mut rng)).collect()).await;
        let (rows, _) = a.rows("sales", 1);
        let (want, _, _) = a.recomputed();
        assert_eq!(rows, want, "after write {step}");
    }
    a.verify("sales");
}

/// Min/max multisets are kept in chunks of at most 64 numbers (`CHUNK_NUMBERS_MAX`), each
/// stored under its first. Writes here give two groups hundreds of distinct amounts (chunks
/// split, new extremes go into the first and last chunks, which are then stored under another
/// number), churn them through folds (each fold's changes fall into every chunk), then delete
/// and replace most keys (chunks empty and go, extremes move inwards); after every write the
/// view equals a recomputation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_and_max_stay_exact_as_their_chunks_split_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::open(dir.path());
    let mut rng = fastrand::Rng::with_seed(12);
    a.define_built("sales", 1).await;
    let keys = 600;
    let order = |rng: &mut fastrand::Rng, spread: i32| {
        set(
            &format!("o:{}", rng.u16(0..keys)),
            &format!(
                r#"{{"c":"c{}","a":{}.{}}}"#,
                rng.u8(0..2),
                rng.i32(-spread..spread),
                rng.u8(0..10)
            ),
        )
    };
    let mut most_numbers = 0;
    // Each read commits: a fold comes at the 256th (`UNFOLDED_MM_ROWS_MAX`).
    for step in 0..300 {
        // Wider and wider: each step brings new extremes.
        let ms = (0..15).map(|_| order(&mut rng, 3 * (step + 1))).collect();
        a.write(ms).await;
        let (rows, counts) = a.rows("sales", 1);
        let (want, _, _) = a.recomputed();
        assert_eq!(rows, want, "after write {step}");
        most_numbers = most_numbers.max(counts.minmax_rows);
    }
    // Two groups holding more than twice a chunk's numbers: some chunk was split.
    assert!(most_numbers > 2 * 64, "{most_numbers} numbers");
    // Churn over multisets of several chunks each, through folds (one per 256 commits):
    // changes fall into every chunk, and some remove a group's extremes.
    for step in 0..600 {
        let ms = (0..20)
            .map(|_| match rng.bool() {
                true => order(&mut rng, 4_500),
                false => del(&format!("o:{}", rng.u16(0..keys))),
            })
            .collect();
        a.write(ms).await;
        let (rows, _) = a.rows("sales", 1);
        let (want, _, _) = a.recomputed();
        assert_eq!(rows, want, "after churn {step}");
    }
    for step in 0..300 {
        let ms = (0..10)
            .map(|_| match rng.u8(0..4) {
                0 => order(&mut rng, 5),
                _ => del(&format!("o:{}", rng.u16(0..keys))),
            })
            .collect();
        a.write(ms).await;
        let (rows, _) = a.rows("sales", 1);
        let (want, _, _) = a.recomputed();
        assert_eq!(rows, want, "after deletion {step}");
    }
    a.verify("sales");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_snapshots_and_drop_keep_a_view_whole() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Replica::open(da.path());
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..300 {
        a.write((0..10).map(|_| random_write(&mut rng)).collect())
            .await;
    }
    a.define_built("sales", 5).await;
    a.verify("sales");
    // A snapshot carries the view: the installed replica answers the same.
    let b = Replica::open(db.path());
    let dump = a.e.dump_table(TABLE, &[], "none/").unwrap();
    b.e.replace_table(TABLE, dump.entries, dump.elements, None, Vec::new(), None)
        .await
        .unwrap();
    assert_eq!(b.rows("sales", 5), a.rows("sales", 5));
    b.verify("sales");
    // FLUSHDB: the view stays, ready and empty, and counts what comes next.
    a.index += 1;
    a.e.replace_table(
        TABLE,
        Vec::new(),
        Vec::new(),
        None,
        Vec::new(),
        Some(a.index),
    )
    .await
    .unwrap();
    assert_eq!(a.def("sales").unwrap().state, ViewState::Ready);
    assert_eq!(a.rows("sales", 5).0, Vec::<serde_json::Value>::new());
    a.write(vec![set("o:1", r#"{"c":"de","a":2.5}"#)]).await;
    let (rows, _) = a.rows("sales", 5);
    assert_eq!(
        rows,
        vec![
            serde_json::json!({"group": "de", "n": 1, "total": 2.5, "mean": 2.5, "low": 2.5, "high": 2.5})
        ]
    );
    a.verify("sales");
    // Past its bounds (judged by the leader, applied by all): it stops, saying why.
    let over = |generation| ViewCommand::Overflow {
        name: Bytes::from_static(b"sales"),
        generation,
        why: "more than 1000000 groups on a shard".into(),
    };
    assert!(a.view(over(4)).await.is_err(), "another generation");
    a.view(over(5)).await.unwrap();
    assert_eq!(
        a.def("sales").unwrap().state,
        ViewState::Overflow {
            why: "more than 1000000 groups on a shard".into()
        }
    );
    assert_eq!(a.query(&[b"over"]).unwrap(), Reply::Array(Vec::new()));
    // Drop: the definition goes at once, the rows by purges.
    assert_eq!(
        a.view(ViewCommand::Drop {
            name: Bytes::from_static(b"sales")
        })
        .await
        .unwrap(),
        Reply::Integer(1)
    );
    assert!(a.def("sales").is_none());
    let gone = a.query(&[b"gone"]).unwrap();
    assert_eq!(
        gone,
        Reply::Array(vec![Reply::Array(vec![
            Reply::Bulk(Bytes::from_static(b"sales")),
            Reply::Integer(5)
        ])])
    );
    loop {
        let purge = ViewCommand::Purge {
            name: Bytes::from_static(b"sales"),
            generation: 5,
        };
        if a.view(purge).await.unwrap() == Reply::Integer(0) {
            break;
        }
    }
    assert_eq!(a.query(&[b"gone"]).unwrap(), Reply::Array(Vec::new()));
    let left = a.e.dump_table(TABLE, &[], "none/").unwrap().elements;
    assert!(left.is_empty(), "rows left after the purge: {}", left.len());
}

/// The views' changes of applies wait in memory for their transaction's commit
/// (`views::Deferred`). A FLUSHDB or a drop queued right behind writes, in the same
/// transaction, must find them written first: else the rows would count keys the FLUSHDB
/// removed, or keep rows of a dropped view that no purge deletes. (Writes and command are
/// queued together, so they nearly always share a transaction; when the commit window
/// passes between them the round proves nothing, and others do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_behind_writes_finds_their_view_changes_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::open(dir.path());
    let sales = || Bytes::from_static(b"sales");
    for round in 0..20u64 {
        let generation = round + 1;
        a.define_built("sales", generation).await;
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let m = set(
                    &format!("o:{round}:{i}"),
                    &format!(r#"{{"c":"c{}","a":{i}.5}}"#, i % 7),
                );
                (m, Timestamp(a.index + 1), 1_000, a.index + 1)
            })
            .collect();
        let applied = vec![(
            APPLIED.to_string(),
            Some((a.index + 1).to_le_bytes().to_vec()),
        )];
        a.index += 2;
        let flush_at = a.index;
        // FLUSHDB right behind the writes: the view is left empty.
        let (written, flushed) = tokio::join!(
            a.e.apply_replicated(TABLE, writes, applied, Vec::new(), Vec::new(), Vec::new()),
            a.e.replace_table(
                TABLE,
                Vec::new(),
                Vec::new(),
                None,
                Vec::new(),
                Some(flush_at)
            ),
        );
        written.unwrap();
        flushed.unwrap();
        assert_eq!(
            a.rows("sales", generation).0,
            Vec::<serde_json::Value>::new(),
            "round {round}: rows counting keys FLUSHDB removed"
        );
        a.verify("sales");
        // A drop right behind writes, then its purges: nothing of the view is left.
        a.index += 1;
        let writes = vec![(
            set(&format!("o:{round}"), r#"{"c":"de","a":1}"#),
            Timestamp(a.index),
            1_000,
            a.index,
        )];
        let applied = vec![(APPLIED.to_string(), Some(a.index.to_le_bytes().to_vec()))];
        a.index += 1;
        let (written, dropped) = tokio::join!(
            a.e.apply_replicated(TABLE, writes, applied, Vec::new(), Vec::new(), Vec::new()),
            a.e.changes_config(
                TABLE,
                ChangesStep::View(ViewCommand::Drop { name: sales() }),
                a.index,
                Vec::new(),
                None,
            ),
        );
        written.unwrap();
        assert_eq!(dropped.unwrap().unwrap(), Reply::Integer(1));
        loop {
            let purge = ViewCommand::Purge {
                name: sales(),
                generation,
            };
            if a.view(purge).await.unwrap() == Reply::Integer(0) {
                break;
            }
        }
        let left = a.e.dump_table(TABLE, &[], "none/").unwrap().elements;
        assert!(
            left.is_empty(),
            "round {round}: rows left after the purge: {}",
            left.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_a_view_cannot_keep_is_refused_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Replica::open(d.path());
    let topk =
        canonical_spec().replace(r#"{"max":"a"}"#, r#"{"topk":{"of":{"json":"$.c"},"k":3}}"#);
    assert_ne!(topk, canonical_spec());
    let e = a
        .view(ViewCommand::Define {
            name: Bytes::from_static(b"v"),
            generation: 1,
            spec: topk,
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("a view keeps count, sum, avg, min and max"),
        "{e}"
    );
    let e = a
        .view(ViewCommand::Define {
            name: Bytes::from_static(b"no spaces"),
            generation: 1,
            spec: canonical_spec(),
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("view name"), "{e}");
    assert!(a.def("v").is_none());
}

/// A Lua view's spec: storage keeps it from the change log and never runs its map (the
/// node's updater does; here [`emits`] plays that part, mapping as the source says).
const LUA_SPEC: &str = r#"{"input": {"keyspace": "orders", "prefix": "o:", "expired": "include"},
  "map": {"lua": {"source": "function map(k, v) local o = capdb.json_decode(v) if type(o) == 'table' and o.c and o.a then emit(o.c, {a = o.a}) end end"},
          "values": ["a"]},
  "reduce": {"n": "count", "total": {"sum": "a"}, "low": {"min": "a"}, "high": {"max": "a"}}}"#;

fn lua_spec() -> String {
    JobSpec::parse(LUA_SPEC.as_bytes())
        .unwrap()
        .canonical()
        .to_string()
}

/// What the Lua map of [`LUA_SPEC`] emits for `value`.
fn emits(value: &[u8]) -> Vec<(Vec<Scalar>, Vec<Option<Fixed>>, bool)> {
    let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(value)
    else {
        return Vec::new();
    };
    match (o.get("c"), o.get("a")) {
        (Some(serde_json::Value::String(c)), Some(a @ serde_json::Value::Number(_))) => {
            let n = Fixed::parse(a.to_string().as_bytes()).unwrap();
            vec![(
                vec![Scalar::Str(c.clone().into_bytes())],
                vec![Some(n.value)],
                n.rounded,
            )]
        }
        _ => Vec::new(),
    }
}

fn bulk_or_none(r: &Reply) -> Option<Bytes> {
    match r {
        Reply::Bulk(b) => Some(b.clone()),
        _ => None,
    }
}

/// One updater round for view `name`, as the node runs it: the `Advance` it proposes, or
/// `None` when nothing is due.
fn next_advance(r: &Replica, name: &str) -> Option<ViewCommand> {
    let Reply::Array(parts) = r.query(&[b"async", name.as_bytes()]).unwrap() else {
        panic!()
    };
    let at =
        |i: usize| -> AsyncAt { postcard::from_bytes(&bulk_or_none(&parts[i]).unwrap()).unwrap() };
    let (from, to) = (at(1), at(2));
    let mut delta = ViewDeltaBuilder::new(&lua_spec()).unwrap();
    if parts[0] == Reply::Bulk(Bytes::from_static(b"ok")) {
        let (Reply::Array(changes), Reply::Array(page)) = (&parts[3], &parts[4]) else {
            panic!()
        };
        if changes.is_empty() && page.is_empty() && from == to {
            return None;
        }
        for c in changes.iter().chain(page) {
            let Reply::Array(c) = c else { panic!() };
            let (before, after) = match &c[..] {
                [_, before, after] => (bulk_or_none(before), bulk_or_none(after)),
                [_, value] => (None, bulk_or_none(value)),
                other => panic!("{other:?}"),
            };
            if let Some(b) = before {
                delta.key(&emits(&b), -1).unwrap();
            }
            if let Some(a) = after {
                delta.key(&emits(&a), 1).unwrap();
            }
        }
    }
    Some(ViewCommand::Advance {
        name: Bytes::from(name.to_string()),
        from,
        to,
        delta: Bytes::from(delta.finish().encode().unwrap()),
    })
}

impl Replica {
    /// Runs updater rounds until view `name` has nothing left to count.
    async fn catch_up(&mut self, name: &str) {
        for _ in 0..10_000 {
            let Some(advance) = next_advance(self, name) else {
                return;
            };
            self.view(advance).await.unwrap();
        }
        panic!("the updater never caught up");
    }

    /// The Lua view against a recomputation from the shard's data (drift 0 expected).
    fn verify_lua(&self, name: &str) -> i64 {
        let Reply::Array(pos) = self.query(&[b"pos", name.as_bytes()]).unwrap() else {
            panic!()
        };
        let Reply::Integer(clock) = pos[1] else {
            panic!()
        };
        let mut fresh = ViewDeltaBuilder::new(&lua_spec()).unwrap();
        let dump = self.e.dump_table(TABLE, &[], "none/").unwrap();
        for (k, raw) in &dump.entries {
            let v = capdb_types::value::Value::decode(raw).unwrap();
            if k.starts_with(b"o:") && v.is_string() && !v.header.tombstone {
                fresh.key(&emits(&v.data), 1).unwrap();
            }
        }
        let delta = fresh.finish().encode().unwrap();
        match self
            .query(&[
                b"verify-with",
                name.as_bytes(),
                clock.to_string().as_bytes(),
                &delta,
            ])
            .unwrap()
        {
            Reply::Array(v) => match (&v[0], &v[1]) {
                (Reply::Integer(d), Reply::Integer(checked)) => {
                    assert_eq!(*d, 0, "drift: {:?}", v[2]);
                    assert!(*checked > 1, "nothing checked");
                    *d
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lua_view_counts_each_change_once_from_the_change_log_whatever_the_updates_race() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Replica::open(d.path());
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..300 {
        a.write((0..10).map(|_| random_write(&mut rng)).collect())
            .await;
    }
    let define = ViewCommand::Define {
        name: Bytes::from_static(b"lua"),
        generation: 3,
        spec: lua_spec(),
    };
    // Kept from the change log: refused until it is on with previous values.
    let refused = a.view(define.clone()).await.unwrap_err();
    assert!(refused.to_string().contains("PREV yes"), "{refused}");
    a.index += 1;
    a.e.changes_config(TABLE, ChangesStep::Prev(true), a.index, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    a.index += 1;
    a.e.changes_config(TABLE, ChangesStep::Switch(true), a.index, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    a.view(define).await.unwrap();
    // The apply never counts it: the build and every change come from its updater, whose
    // rounds interleave with writes (to keys before and after the build's cursor).
    for _ in 0..200 {
        for _ in 0..3 {
            a.write((0..5).map(|_| random_write(&mut rng)).collect())
                .await;
        }
        let Some(advance) = next_advance(&a, "lua") else {
            break;
        };
        a.view(advance.clone()).await.unwrap();
        // The same update again (a retry, or a stale leader's) counts nothing.
        a.view(advance).await.unwrap();
    }
    // Two updaters racing (after a leader change): computed from the same read, only the
    // first to apply counts.
    a.write((0..10).map(|_| random_write(&mut rng)).collect())
        .await;
    let first = next_advance(&a, "lua").unwrap();
    let second = next_advance(&a, "lua").unwrap();
    a.view(first).await.unwrap();
    a.write(vec![set("o:x", r#"{"c":"late","a":1}"#)]).await;
    a.view(second).await.unwrap();
    a.catch_up("lua").await;
    assert_eq!(a.def("lua").unwrap().state, ViewState::Ready);
    a.verify_lua("lua");
    // A value written with a deadline already past: the view agrees with the data (a
    // transaction committed late keeps it until the sweep, which `capdb chaos --workload
    // view` exercises; a SET removes it at once).
    a.write(vec![Mutation::Set {
        key: Bytes::from_static(b"o:late"),
        value: Bytes::from_static(br#"{"c":"late","a":3}"#),
        condition: Condition::Always,
        expiry: ExpiryUpdate::At(500),
        return_old: false,
    }])
    .await;
    a.catch_up("lua").await;
    a.verify_lua("lua");
    a.write(vec![set("o:late", r#"{"c":"late","a":4}"#)]).await;
    a.catch_up("lua").await;
    a.verify_lua("lua");
    // A deleted key's contribution is taken back (its event carries the value).
    a.write(vec![set("o:y", r#"{"c":"gone","a":7}"#)]).await;
    a.catch_up("lua").await;
    a.write(vec![Mutation::Delete {
        key: Bytes::from_static(b"o:y"),
    }])
    .await;
    a.catch_up("lua").await;
    a.verify_lua("lua");
    // FLUSHDB empties it; it counts what comes next, not what came before the flush.
    a.write(vec![set("o:z", r#"{"c":"pre","a":1}"#)]).await;
    a.index += 1;
    a.e.replace_table(
        TABLE,
        Vec::new(),
        Vec::new(),
        None,
        Vec::new(),
        Some(a.index),
    )
    .await
    .unwrap();
    a.write(vec![set("o:1", r#"{"c":"de","a":2.5}"#)]).await;
    a.catch_up("lua").await;
    let (Reply::Array(parts), _) = (a.query(&[b"rows", b"lua", b"0", b"", b"100"]).unwrap(), ())
    else {
        panic!()
    };
    let Reply::Array(rows) = &parts[2] else {
        panic!()
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    a.verify_lua("lua");
    // Events without previous values (or none at all) cannot keep it: it stops in the very
    // entry that turns them off, so no update reads past the gap.
    a.index += 1;
    a.e.changes_config(TABLE, ChangesStep::Prev(false), a.index, Vec::new(), None)
        .await
        .unwrap()
        .unwrap();
    match a.def("lua").unwrap().state {
        ViewState::Overflow { why } => assert!(why.contains("PREV no"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// Not a check: what a view adds to the apply, on one replica with no Raft or network
/// around it (`cargo test --release -p capdb-storage --test views -- --ignored --nocapture
/// apply_cost`). Batches of 256 new keys of JSON orders (`CAPDB_APPLY_COST_BATCH`), as `capdb
/// bench views` writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn apply_cost() {
    // `CAPDB_APPLY_COST_BATCH=16`: writes per storage job (a cluster under load applies
    // smaller batches than 256, so per-job costs weigh more).
    let batch: usize = std::env::var("CAPDB_APPLY_COST_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .filter(|b| (1..=102_400).contains(b))
        .unwrap_or(256);
    let batches_n = 102_400 / batch;
    let specs: [(&str, Option<&str>); 3] = [
        ("no view", None),
        (
            "sums",
            Some(
                r#"{"input": {"keyspace": "orders", "prefix": "o:", "expired": "include"}, "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
                "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"}}}"#,
            ),
        ),
        (
            "min/max",
            Some(
                r#"{"input": {"keyspace": "orders", "prefix": "o:", "expired": "include"}, "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
                "reduce": {"low": {"min": "a"}, "high": {"max": "a"}}}"#,
            ),
        ),
    ];
    // The process's CPU time, all threads (the writer's is the one that counts): unlike the
    // elapsed time, not moved by how long the disk takes to sync.
    fn process_cpu_s() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }
    for round in 0..3 {
        for (label, spec) in specs {
            // `CAPDB_APPLY_COST_ONLY=sums`: one setting (to profile it).
            if std::env::var("CAPDB_APPLY_COST_ONLY").is_ok_and(|only| only != label) {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let mut r = Replica::open(dir.path());
            if let Some(spec) = spec {
                let spec = JobSpec::parse(spec.as_bytes())
                    .unwrap()
                    .canonical()
                    .to_string();
                r.view(ViewCommand::Define {
                    name: Bytes::from_static(b"v"),
                    generation: 1,
                    spec,
                })
                .await
                .unwrap();
                r.build("v", async |_: &mut Replica| {}).await;
            }
            let mut rng = fastrand::Rng::with_seed(round);
            let batches: Vec<Vec<Mutation>> = (0..batches_n)
                .map(|b| {
                    (0..batch)
                        .map(|i| {
                            set(
                                &format!("o:{b}:{i}"),
                                &format!(
                                    r#"{{"c":"c{}","a":{}.5,"sku":"s{}","note":"bench order padding"}}"#,
                                    rng.u8(0..100),
                                    rng.u32(0..1_000),
                                    rng.u16(0..1_000)
                                ),
                            )
                        })
                        .collect()
                })
                .collect();
            let (started, cpu) = (std::time::Instant::now(), process_cpu_s());
            for ms in batches {
                r.write(ms).await;
            }
            let n = (batches_n * batch) as f64;
            println!(
                "round {round}, {label}: {:.2} µs per write, {:.2} µs of CPU",
                started.elapsed().as_secs_f64() * 1e6 / n,
                (process_cpu_s() - cpu) * 1e6 / n
            );
        }
    }
}
