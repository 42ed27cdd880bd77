//! The algebra jobs and views stand on, checked on random data: any split of the keys into
//! tasks and any merge order give the one-pass answer; a retraction undoes an addition; the
//! JSON scanner agrees with serde_json; partials survive their stored form.

use capdb_reduce::acc::{Acc, Contribution, Reducer};
use capdb_reduce::json_path::{Found, JsonPath, find, find_all};
use capdb_reduce::num::Fixed;
use capdb_reduce::{JobSpec, Merged, Partial, Plan, Run};
use proptest::prelude::*;
use serde_json::{Value, json};

fn plan() -> Plan {
    let spec = json!({
        "input": {"keyspace": "orders"},
        "map": {"group": [{"json": "$.c"}],
                "values": {"amount": {"json": "$.a"}, "units": {"json": "$.u"}}},
        "reduce": {"n": "count", "total": {"sum": "amount"}, "low": {"min": "amount"},
                   "high": {"max": "amount"}, "mean": {"avg": "amount"},
                   "units": {"stats": "units"},
                   "tags": {"topk": {"of": {"words": {"json": "$.t"}}, "k": 3}},
                   "users": {"distinct": {"json": "$.user"}}},
        "output": {"order_by": "total", "desc": true}
    });
    Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap()
}

/// The rows with each standard deviation (computed in f64, so merge order may move its last
/// bits) taken out, and the deviations apart.
fn exact_rows(plan: &Plan, p: &Partial) -> (Vec<Value>, Vec<f64>) {
    without_devs(plan.rows(p).unwrap())
}

/// `rows` with each standard deviation taken out, and the deviations apart.
fn without_devs(mut rows: Vec<Value>) -> (Vec<Value>, Vec<f64>) {
    let mut devs = Vec::new();
    for r in &mut rows {
        if let Some(Value::Object(stats)) = r.get_mut("units") {
            devs.push(
                stats
                    .remove("stddev")
                    .and_then(|d| d.as_f64())
                    .unwrap_or(-1.0),
            );
        }
    }
    (rows, devs)
}

/// A record: country, an amount with up to 9 decimals, an integer count of units, words, a
/// user; sometimes a value with a field missing or not JSON at all (skipped keys).
fn record() -> impl Strategy<Value = (String, String)> {
    (
        0u32..1000,
        0usize..5,
        -10_000_000_000i64..10_000_000_000,
        0i64..100_000,
        prop::collection::vec(
            prop::sample::select(vec!["red", "Blue", "green", "x", "y"]),
            0..4,
        ),
        0u32..50,
        0u8..20,
    )
        .prop_map(|(id, c, a, u, words, user, odd)| {
            let amount = Fixed(i128::from(a) * 1000).to_string();
            let value = match odd {
                0 => "not json".to_string(),
                1 => format!(r#"{{"c":"c{c}","u":{u},"t":"","user":{user}}}"#),
                _ => format!(
                    r#"{{"c":"c{c}","a":{amount},"u":{u},"t":"{}","user":"u{user}"}}"#,
                    words.join(" ")
                ),
            };
            (format!("o:{id}"), value)
        })
}

/// Deviations equal but for their last bits (merge order moves them).
fn assert_devs_close(devs: &[f64], whole: &[f64]) {
    assert_eq!(devs.len(), whole.len());
    for (a, b) in devs.iter().zip(whole) {
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "stddev {a} vs {b}"
        );
    }
}

/// `records` cut at `cuts` (clamped, in any order), each piece's one-pass partial: what the
/// tasks of a job over them send.
fn pieces(plan: &Plan, records: &[(String, String)], cuts: Vec<usize>) -> Vec<Partial> {
    let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(records.len())).collect();
    bounds.push(0);
    bounds.push(records.len());
    bounds.sort();
    bounds
        .windows(2)
        .map(|w| one_pass(plan, &records[w[0]..w[1]]))
        .collect()
}

fn one_pass(plan: &Plan, records: &[(String, String)]) -> Partial {
    let mut p = plan.partial();
    for (k, v) in records {
        plan.add(&mut p, k.as_bytes(), v.as_bytes()).unwrap();
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_split_and_merge_order_gives_the_one_pass_answer(
        records in prop::collection::vec(record(), 0..300),
        cuts in prop::collection::vec(0usize..300, 0..6),
        order_seed in any::<u64>(),
    ) {
        let plan = plan();
        let whole = one_pass(&plan, &records);
        let mut parts = pieces(&plan, &records, cuts);
        // Through their stored form, as tasks send them: the same partial back.
        for p in &parts {
            prop_assert_eq!(&Partial::decode(&p.encode()).unwrap(), p);
        }
        parts = parts.iter().map(|p| Partial::decode(&p.encode()).unwrap()).collect();
        let mut rng = fastrand_like(order_seed);
        let mut merged = plan.partial();
        while !parts.is_empty() {
            let i = (rng() % parts.len() as u64) as usize;
            let p = parts.swap_remove(i);
            // Copied or moved in: the same.
            if rng().is_multiple_of(2) {
                plan.merge(&mut merged, &p).unwrap();
            } else {
                plan.merge_owned(&mut merged, p).unwrap();
            }
        }
        let (rows, devs) = exact_rows(&plan, &merged);
        let (whole_rows, whole_devs) = exact_rows(&plan, &whole);
        prop_assert_eq!(rows, whole_rows);
        assert_devs_close(&devs, &whole_devs);
        prop_assert_eq!((merged.keys, merged.skipped), (whole.keys, whole.skipped));
        // The result's text, written directly, is the rows' own JSON, byte for byte.
        let texts: Vec<String> = plan.rows(&merged).unwrap().iter().map(|r| r.to_string()).collect();
        prop_assert_eq!(plan.rows_text(&merged).unwrap(), texts);
    }

    /// A coordinator's merge: outputs taken in their stored form as sorted runs, in any
    /// order and sizes (so runs stack and merge at every depth), give the one-pass answer.
    #[test]
    fn outputs_merged_as_sorted_runs_give_the_one_pass_answer(
        records in prop::collection::vec(record(), 0..400),
        cuts in prop::collection::vec(0usize..400, 0..12),
        order_seed in any::<u64>(),
    ) {
        let plan = plan();
        let whole = one_pass(&plan, &records);
        let mut runs: Vec<Run> = pieces(&plan, &records, cuts)
            .iter()
            .map(|p| Run::decode(&p.encode()).unwrap())
            .collect();
        let mut rng = fastrand_like(order_seed);
        let mut merged = Merged::default();
        while !runs.is_empty() {
            let i = (rng() % runs.len() as u64) as usize;
            plan.merge_run(&mut merged, runs.swap_remove(i)).unwrap();
        }
        prop_assert_eq!((merged.keys, merged.skipped), (whole.keys, whole.skipped));
        let (rows, devs) = without_devs(plan.merged_rows(&mut merged).unwrap());
        let (whole_rows, whole_devs) = exact_rows(&plan, &whole);
        prop_assert_eq!(rows, whole_rows);
        assert_devs_close(&devs, &whole_devs);
        prop_assert_eq!(plan.merged_groups(&mut merged).unwrap(), whole.groups());
        let texts: Vec<String> = plan.merged_rows(&mut merged).unwrap().iter().map(|r| r.to_string()).collect();
        prop_assert_eq!(plan.merged_rows_text(&mut merged).unwrap(), texts);
    }

    /// A task that moves its table out as sorted runs whenever it likes (bounded memory in
    /// cache) sends what it would have sent with one table (the same bytes but for the
    /// last bits of a deviation, which merge order moves).
    #[test]
    fn spilling_the_table_at_any_points_stores_the_same_partial(
        records in prop::collection::vec(record(), 0..400),
        spills in prop::collection::vec(0usize..400, 0..8),
    ) {
        let plan = plan();
        let whole = one_pass(&plan, &records);
        let mut p = plan.partial();
        let mut spilled = Merged::default();
        for (i, (k, v)) in records.iter().enumerate() {
            plan.add(&mut p, k.as_bytes(), v.as_bytes()).unwrap();
            for _ in spills.iter().filter(|s| **s == i) {
                plan.spill(&mut p, &mut spilled).unwrap();
            }
        }
        let sent = Partial::decode(&plan.encode_spilled(p, spilled).unwrap()).unwrap();
        prop_assert_eq!((sent.keys, sent.skipped, sent.groups()), (whole.keys, whole.skipped, whole.groups()));
        let (rows, devs) = exact_rows(&plan, &sent);
        let (whole_rows, whole_devs) = exact_rows(&plan, &whole);
        prop_assert_eq!(rows, whole_rows);
        assert_devs_close(&devs, &whole_devs);
        if spills.is_empty() {
            prop_assert_eq!(sent, whole);
        }
    }

    #[test]
    fn a_retraction_undoes_an_addition(
        base in prop::collection::vec(-1_000_000_000_000i64..1_000_000_000_000, 0..50),
        extra in -1_000_000_000_000i64..1_000_000_000_000,
    ) {
        for r in [Reducer::Count, Reducer::Sum("v".into()), Reducer::Avg("v".into())] {
            let c = |x: i64| match r {
                Reducer::Count => Contribution::One,
                _ => Contribution::Number(Fixed(i128::from(x))),
            };
            let mut acc = Acc::new(&r);
            for x in &base {
                acc.add(c(*x)).unwrap();
            }
            let before = acc.clone();
            acc.add(c(extra)).unwrap();
            acc.retract(c(extra)).unwrap();
            prop_assert_eq!(acc, before);
        }
    }

    #[test]
    fn the_scanner_agrees_with_serde_json(doc in json_value(), pick in any::<u64>(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&doc).unwrap() } else { doc.to_string() };
        let mut paths = vec![String::from("$")];
        collect_paths(&doc, "$", &mut paths);
        paths.push("$.missing".into());
        paths.push("$[7]".into());
        let path = &paths[(pick % paths.len() as u64) as usize];
        let found = find(text.as_bytes(), &JsonPath::parse(path).unwrap()).unwrap();
        let expected = lookup(&doc, &JsonPath::parse(path).unwrap());
        match (found, expected) {
            // A number as written: the text serde_json wrote for it (parsing it back through
            // serde_json's fast float parser could move its last bit).
            (Some(Found::Number(t)), Some(e @ Value::Number(_))) => prop_assert_eq!(t, e.to_string()),
            // Composites through the same parser on both sides, for the same reason.
            (found, expected) => prop_assert_eq!(
                found.map(found_value),
                expected.map(|e| serde_json::from_str::<Value>(&e.to_string()).unwrap())
            ),
        }
    }

    #[test]
    fn one_pass_for_several_paths_answers_as_one_pass_for_each(
        doc in json_value(),
        picks in prop::collection::vec(any::<u64>(), 0..=8),
        repeat in any::<bool>(),
        damage in any::<Option<(usize, u8)>>(),
    ) {
        let mut text = doc.to_string();
        // A repeated key (the last counts) and, sometimes, a damaged document.
        if repeat && text.starts_with('{') && text.len() > 2 {
            text = format!("{{\"dup\":1,{},\"dup\":{{\"x\":2}}}}", &text[1..text.len() - 1]);
            if text.contains("{,") { text = text.replace("{,", "{"); }
        }
        let mut bytes = text.into_bytes();
        if let Some((at, byte)) = damage {
            let i = at % (bytes.len() + 1);
            bytes.insert(i, byte);
        }
        let mut paths = vec![String::from("$"), "$.dup".into(), "$.dup.x".into(), "$.missing".into(), "$[1]".into()];
        collect_paths(&doc, "$", &mut paths);
        let chosen: Vec<JsonPath> = picks
            .iter()
            .map(|p| JsonPath::parse(&paths[(*p % paths.len() as u64) as usize]).unwrap())
            .collect();
        match find_all(&bytes, &chosen) {
            Ok(all) => {
                for (i, p) in chosen.iter().enumerate() {
                    prop_assert_eq!(&all[i], &find(&bytes, p).unwrap());
                }
                prop_assert!(all[chosen.len()..].iter().all(Option::is_none));
            }
            Err(_) => prop_assert!(find(&bytes, &JsonPath::parse("$").unwrap()).is_err()),
        }
    }

    #[test]
    fn a_key_maps_the_same_whether_its_fields_are_read_in_one_pass_or_alone(
        field in prop_oneof![
            json_value(),
            "-?[0-9]{1,12}(\\.[0-9]{0,14})?(e[0-9])?".prop_map(Value::String),
        ],
    ) {
        // Group and value read from two fields holding the same JSON (one pass over the
        // value reads both), or the value read from the group's own field (one path, read
        // alone): the same groups, numbers and rounding, or the same skip.
        let spec = |value_path: &str| {
            let spec = json!({
                "input": {"keyspace": "k"},
                "map": {"group": {"json": "$.x"}, "values": {"v": {"json": value_path}}},
                "reduce": {"s": {"sum": "v"}}
            });
            Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap()
        };
        let doc = json!({"x": field, "y": field}).to_string();
        let two_fields = spec("$.y").map_key(b"key", doc.as_bytes());
        let one_field = spec("$.x").map_key(b"key", doc.as_bytes());
        prop_assert_eq!(two_fields, one_field);
    }

    #[test]
    fn the_scanner_refuses_what_serde_json_refuses(doc in json_value(), at in any::<usize>(), byte in any::<u8>()) {
        let mut text = doc.to_string().into_bytes();
        let i = at % (text.len() + 1);
        text.insert(i, byte);
        let ours = find(&text, &JsonPath::parse("$").unwrap());
        let theirs = serde_json::from_slice::<Value>(&text);
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?}: {:?}", String::from_utf8_lossy(&text), theirs.err());
    }
}

/// A small deterministic generator for merge orders.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "[a-z\"\\\\\u{e9}\u{1F600}\n ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z.\" ]{0,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn collect_paths(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = format!("{at}[{}]", serde_json::to_string(k).unwrap());
                out.push(p.clone());
                collect_paths(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{at}[{i}]");
                out.push(p.clone());
                collect_paths(child, &p, out);
            }
        }
        _ => {}
    }
}

fn lookup(v: &Value, path: &JsonPath) -> Option<Value> {
    use capdb_reduce::json_path::Segment;
    let mut cur = v;
    for s in path.segments() {
        cur = match (s, cur) {
            (Segment::Field(f), Value::Object(m)) => m.get(f)?,
            (Segment::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur.clone())
}

fn found_value(f: Found<'_>) -> Value {
    match f {
        Found::Null => Value::Null,
        Found::Bool(b) => Value::Bool(b),
        Found::Number(t) | Found::Object(t) | Found::Array(t) => serde_json::from_str(t).unwrap(),
        Found::String(s) => Value::String(s.into_owned()),
    }
}

#[test]
fn a_job_over_a_few_orders_gives_the_expected_rows() {
    let plan = plan();
    let records = [
        (
            "o:1",
            r#"{"c":"fr","a":10.5,"u":2,"t":"red blue","user":"ann"}"#,
        ),
        ("o:2", r#"{"c":"fr","a":4.5,"u":4,"t":"Red","user":"bob"}"#),
        ("o:3", r#"{"c":"de","a":1,"u":1,"t":"green","user":"ann"}"#),
        ("o:4", r#"{"c":"de"}"#),
        ("o:5", "garbage"),
        ("x:6", r#"{"c":"it","a":1,"u":1,"t":"","user":"z"}"#),
    ];
    let mut p = plan.partial();
    for (k, v) in records {
        plan.add(&mut p, k.as_bytes(), v.as_bytes()).unwrap();
    }
    assert_eq!((p.keys, p.skipped), (6, 2));
    let rows = plan.rows(&p).unwrap();
    assert_eq!(
        rows[0],
        json!({"group": "fr", "n": 2, "total": 15, "low": 4.5, "high": 10.5, "mean": 7.5,
               "units": {"count": 2, "sum": 6, "min": 2, "max": 4, "mean": 3, "stddev": 1.0},
               "tags": {"top": [{"value": "red", "count": 2}, {"value": "blue", "count": 1}]},
               "users": 2})
    );
    assert_eq!(
        rows.iter().map(|r| r["group"].clone()).collect::<Vec<_>>(),
        vec![json!("fr"), json!("de"), json!("it")]
    );
}

#[test]
fn too_many_groups_ends_the_job_with_the_limit_named() {
    let spec = json!({"input": {"keyspace": "k"}, "map": {"group": {"key": true}},
                      "reduce": {"n": "count"}, "limits": {"groups_max": 2}});
    let plan = Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap();
    let mut p = plan.partial();
    plan.add(&mut p, b"a", b"").unwrap();
    plan.add(&mut p, b"b", b"").unwrap();
    plan.add(&mut p, b"a", b"").unwrap();
    let e = plan.add(&mut p, b"c", b"").unwrap_err();
    assert!(e.to_string().contains("more than 2 groups"), "{e}");
}

/// Groups repeated across spilled runs or merged outputs count once; distinct groups past
/// the bound end the job, however they arrive.
#[test]
fn the_groups_bound_counts_distinct_groups_across_runs() {
    let spec = json!({"input": {"keyspace": "k"}, "map": {"group": {"key": true}},
                      "reduce": {"n": "count"}, "limits": {"groups_max": 2}});
    let plan = Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap();
    let table = |keys: &[&[u8]]| {
        let mut p = plan.partial();
        for k in keys {
            plan.add(&mut p, k, b"").unwrap();
        }
        p
    };
    // A task spilling: {a, b} twice is two groups; then c is a third.
    let mut spilled = Merged::default();
    plan.spill(&mut table(&[b"a", b"b"]), &mut spilled).unwrap();
    plan.spill(&mut table(&[b"a", b"b"]), &mut spilled).unwrap();
    let e = plan.spill(&mut table(&[b"c"]), &mut spilled).unwrap_err();
    assert!(e.to_string().contains("more than 2 groups"), "{e}");
    // A coordinator merging outputs: the same, at the latest when the result is read.
    let mut merged = Merged::default();
    for keys in [&[&b"a"[..], b"b"][..], &[b"b", b"a"], &[b"a"], &[b"c"]] {
        let run = Run::decode(&table(keys).encode()).unwrap();
        if let Err(e) = plan.merge_run(&mut merged, run) {
            assert!(e.to_string().contains("more than 2 groups"), "{e}");
            return;
        }
    }
    let e = plan.merged_rows(&mut merged).unwrap_err();
    assert!(e.to_string().contains("more than 2 groups"), "{e}");
}

#[test]
fn a_sum_out_of_range_names_its_group_and_reducer() {
    let spec = json!({"input": {"keyspace": "k"}, "map": {"group": {"const": "all"}, "values": {"v": {"value": "number"}}},
                      "reduce": {"s": {"sum": "v"}}});
    let plan = Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap();
    let mut p = plan.partial();
    plan.add(&mut p, b"a", b"1e29").unwrap();
    plan.add(&mut p, b"b", b"1e29").unwrap();
    let e = plan.rows(&p).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"reducer "s" of group ["all"]: a sum out of range (about ±1.7e29)"#
    );
    // Back in range by the end: an answer, whatever the order of the parts.
    plan.add(&mut p, b"c", b"-1e29").unwrap();
    assert_eq!(plan.rows(&p).unwrap()[0]["s"], json!(1e29));
}

#[test]
fn groups_order_by_their_values_and_ties_by_group() {
    let spec = json!({"input": {"keyspace": "k"}, "map": {"group": {"json": "$.g"}},
                      "reduce": {"n": "count"}, "output": {"order_by": "n", "desc": true}});
    let plan = Plan::new(JobSpec::from_json(&spec).unwrap()).unwrap();
    let mut p = plan.partial();
    for (k, g) in [
        ("1", r#""aa""#),
        ("2", r#""b""#),
        ("3", "-1"),
        ("4", "2"),
        ("5", "10"),
        ("6", r#""b""#),
    ] {
        plan.add(&mut p, k.as_bytes(), format!(r#"{{"g":{g}}}"#).as_bytes())
            .unwrap();
    }
    let groups: Vec<Value> = plan
        .rows(&p)
        .unwrap()
        .iter()
        .map(|r| r["group"].clone())
        .collect();
    // "b" twice first; then the ties by group, ascending: numbers by value, then strings.
    assert_eq!(
        groups,
        vec![json!("b"), json!(-1), json!(2), json!(10), json!("aa")]
    );
    // Ordered by group alone, `desc` reverses the groups.
    let by_group = json!({"input": {"keyspace": "k"}, "map": {"group": {"json": "$.g"}},
                          "reduce": {"n": "count"}, "output": {"order_by": "group", "desc": true}});
    let plan = Plan::new(JobSpec::from_json(&by_group).unwrap()).unwrap();
    let mut p = plan.partial();
    for (k, g) in [("1", "3"), ("2", "-1"), ("3", r#""x""#)] {
        plan.add(&mut p, k.as_bytes(), format!(r#"{{"g":{g}}}"#).as_bytes())
            .unwrap();
    }
    let groups: Vec<Value> = plan
        .rows(&p)
        .unwrap()
        .iter()
        .map(|r| r["group"].clone())
        .collect();
    assert_eq!(groups, vec![json!("x"), json!(3), json!(-1)]);
}

#[test]
fn a_partial_of_another_spec_is_refused_whole() {
    let plan = plan();
    let other = Plan::new(
        JobSpec::from_json(&json!({"input": {"keyspace": "k"}, "map": {"group": {"json": "$.c"}}, "reduce": {"n": "count"}}))
            .unwrap(),
    )
    .unwrap();
    let mut theirs = other.partial();
    other.add(&mut theirs, b"o:1", br#"{"c":"fr"}"#).unwrap();
    let mut mine = plan.partial();
    plan.add(
        &mut mine,
        b"o:2",
        br#"{"c":"fr","a":1,"u":1,"t":"","user":"a"}"#,
    )
    .unwrap();
    let before = mine.clone();
    assert!(plan.merge(&mut mine, &theirs).is_err());
    assert_eq!(mine, before, "nothing of it merged");
    assert!(plan.rows(&theirs).is_err());
}

#[test]
fn a_damaged_partial_is_refused() {
    let plan = plan();
    let mut p = plan.partial();
    plan.add(
        &mut p,
        b"o:1",
        br#"{"c":"fr","a":1,"u":1,"t":"","user":"a"}"#,
    )
    .unwrap();
    let mut raw = p.encode();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    assert!(
        Partial::decode(&raw)
            .unwrap_err()
            .to_string()
            .contains("checksum")
    );
    assert!(Partial::decode(&raw[..3]).is_err());
}
