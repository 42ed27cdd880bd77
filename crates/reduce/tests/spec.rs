//! Job specs: defaults, the canonical form, and errors that name the field to fix.

use capdb_reduce::JobSpec;
use serde_json::json;

fn error(spec: serde_json::Value) -> String {
    JobSpec::from_json(&spec).unwrap_err().to_string()
}

#[test]
fn the_canonical_form_writes_every_default_and_parses_back_to_the_same_spec() {
    let spec = JobSpec::from_json(&json!({
        "input": {"keyspace": "orders", "prefix": "o:"},
        "map": {"group": {"key_part": {"sep": ":", "index": 1}}, "values": {"a": {"json": "$.total"}}},
        "reduce": {"n": "count", "s": {"sum": "a"}}
    }))
    .unwrap();
    let canonical = spec.canonical();
    assert_eq!(canonical["input"]["expired"], "skip");
    assert_eq!(canonical["input"]["snapshot"], "strict");
    assert_eq!(canonical["output"]["to"], "result");
    assert_eq!(canonical["limits"]["groups_max"], 1_000_000);
    assert_eq!(canonical["limits"]["max_s"], 3600);
    assert_eq!(JobSpec::from_json(&canonical).unwrap(), spec);
    assert_eq!(
        JobSpec::from_json(&canonical).unwrap().canonical(),
        canonical
    );
}

#[test]
fn errors_name_the_field() {
    let base = |reduce: serde_json::Value| json!({"input": {"keyspace": "k"}, "map": {"values": {"a": {"value": "number"}}}, "reduce": reduce});
    assert_eq!(
        error(json!({"input": {}})),
        "input.keyspace: must be a string"
    );
    assert_eq!(
        error(base(json!({"s": {"sum": "b"}}))),
        r#"reduce.s.sum: "b" is not a name in map.values"#
    );
    assert_eq!(
        error(base(json!({}))),
        "reduce: an object naming at least one reducer"
    );
    assert_eq!(
        error(base(json!({"t": {"topk": {"of": {"key": true}, "k": 0}}}))),
        "reduce.t.topk.k: must be an integer from 1 to 10000"
    );
    assert_eq!(
        error(base(json!({"x": {"median": "a"}}))),
        r#"reduce.x.median: unknown reducer "median""#
    );
    assert_eq!(
        error(json!({"input": {"keyspace": "k"}, "reduce": {"n": "count"}, "extra": 1})),
        r#"spec: unknown field "extra" (known: id, input, map, reduce, output, limits)"#
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k", "prefix": "a:", "match": "b:*"}, "reduce": {"n": "count"}})
        ),
        "input.match: can never match a key under input.prefix"
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k"}, "map": {"group": {"json": "a"}}, "reduce": {"n": "count"}})
        ),
        r#"map.group.json: JSON path "a": must start with $"#
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k"}, "map": {"group": [{"words": {"key": true}}, {"words": {"key": true}}]}, "reduce": {"n": "count"}})
        ),
        "map.group: at most one part may give several values per key (words)"
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k"}, "reduce": {"n": "count"}, "output": {"order_by": "m"}})
        ),
        r#"output.order_by: "m" is neither "group" nor a reducer"#
    );
    assert_eq!(
        error(json!({"id": "a b", "input": {"keyspace": "k"}, "reduce": {"n": "count"}})),
        "id: 1 to 64 of A-Z a-z 0-9 _ -"
    );
    assert!(error(json!({"input": {"keyspace": "k"}, "map": {"group": {"lua": "lib.f"}}, "reduce": {"n": "count"}})).contains("not available"));
    assert_eq!(
        error(json!({"input": {"keyspace": "k"}, "reduce": {"group": "count"}})),
        r#"reduce.group: "group" names the group column of each row; choose another name"#
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k"}, "map": {"values": {"a": {"value": "number"}}}, "reduce": {"n": "count"}})
        ),
        "map.values.a: no reducer reads it"
    );
    assert_eq!(
        error(
            json!({"input": {"keyspace": "k"}, "map": {"group": {"const": 1.5}}, "reduce": {"n": "count"}})
        ),
        "map.group.const: a number constant is an integer (write decimals as strings)"
    );
    assert!(
        error(
            json!({"input": {"keyspace": "k"}, "map": {"group": {"words": {"key": true}}},
                         "reduce": {"t": {"topk": {"of": {"words": {"value": "string"}}, "k": 3}}}})
        )
        .contains("words in both")
    );
    assert!(
        JobSpec::parse(b"{")
            .unwrap_err()
            .to_string()
            .starts_with("spec: not JSON")
    );
    assert!(
        JobSpec::parse(&vec![b' '; 70_000])
            .unwrap_err()
            .to_string()
            .contains("longer than")
    );
}

#[test]
fn a_pattern_narrows_the_scan_and_filters_keys() {
    let spec = JobSpec::from_json(&json!({"input": {"keyspace": "k", "prefix": "o:", "match": "o:1*:x"}, "reduce": {"n": "count"}})).unwrap();
    assert_eq!(spec.input.scan_prefix(), b"o:1");
    assert!(spec.input.wants(b"o:12:x"));
    assert!(!spec.input.wants(b"o:12:y"));
}
