//! Incremental views on a real 3-node cluster (issue 15): built in the background while
//! writes go on, kept current by every write through any node, and always equal to what a
//! job with the same spec computes from the data, through the kill of a shard leader.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use redis::Value;
use serde_json::json;

const SPEC: &str = r#"{"input": {"prefix": "o:"},
  "map": {"group": [{"json": "$.c"}], "values": {"a": {"json": "$.a"}}},
  "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"},
             "low": {"min": "a"}, "high": {"max": "a"}}}"#;

/// The same view with a Lua map: kept asynchronously from the change log.
const LUA_SPEC: &str = r#"{"input": {"prefix": "o:"},
  "map": {"lua": {"source": "function map(key, value)\n  local o = capdb.json_decode(value)\n  if type(o) == 'table' and o.c ~= nil and type(o.a) == 'number' then emit(o.c, {a = o.a}) end\nend"},
          "values": ["a"]},
  "reduce": {"n": "count", "total": {"sum": "a"}, "mean": {"avg": "a"},
             "low": {"min": "a"}, "high": {"max": "a"}}}"#;

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        Value::Nil => "nil".into(),
        other => format!("{other:?}"),
    }
}

fn map(v: Value) -> BTreeMap<String, String> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(flat) => flat
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect(),
        other => panic!("{other:?}"),
    };
    pairs
        .into_iter()
        .map(|(k, v)| (text(&k), text(&v)))
        .collect()
}

fn client(s: &Server) -> redis::Connection {
    let mut c = s.client();
    redis::cmd("SELECT")
        .arg("orders")
        .query::<()>(&mut c)
        .unwrap();
    c
}

fn view_get(c: &mut redis::Connection, name: &str) -> BTreeMap<String, String> {
    map(redis::cmd("VIEW").arg("GET").arg(name).query(c).unwrap())
}

/// Waits (bounded) until every shard has built view `name`.
fn wait_ready(c: &mut redis::Connection, name: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let info = map(redis::cmd("VIEW").arg("INFO").arg(name).query(c).unwrap());
        if info["state"] == "ready" {
            return;
        }
        assert!(Instant::now() < until, "view {name} not built: {info:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rows a job with a view's spec computes (`expired: include`, as a view counts).
fn job_rows(c: &mut redis::Connection, view_spec: &str) -> serde_json::Value {
    let mut spec: serde_json::Value = serde_json::from_str(view_spec).unwrap();
    spec["input"]["keyspace"] = json!("orders");
    spec["input"]["expired"] = json!("include");
    let v: Value = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(spec.to_string())
        .query(c)
        .unwrap();
    let Value::Array(parts) = v else {
        panic!("{v:?}")
    };
    let id = text(&parts[0]);
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let st = map(redis::cmd("JOB").arg("STATUS").arg(&id).query(c).unwrap());
        match st["state"].as_str() {
            "done" => break,
            "failed" | "cancelled" => panic!("the job ended {st:?}"),
            _ => {}
        }
        assert!(Instant::now() < until, "the job did not end: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rows: String = redis::cmd("JOB").arg("RESULT").arg(&id).query(c).unwrap();
    serde_json::from_str(&rows).unwrap()
}

/// The node leading the most shards of `orders` among `among` (per node `via`).
fn busiest_leader(via: &Server, among: &[u64]) -> (u64, usize) {
    let (_, body) = common::http(via.http, "GET", "/v1/cluster", &[], None).unwrap();
    let st = common::json(&body);
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for s in st["keyspaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "orders")
        .flat_map(|ks| ks["shards"].as_array().unwrap().iter())
    {
        if let Some(l) = s["leader"].as_u64() {
            *led.entry(l).or_default() += 1;
        }
    }
    among
        .iter()
        .map(|n| (*n, led.get(n).copied().unwrap_or(0)))
        .max_by_key(|(_, k)| *k)
        .unwrap()
}

/// A random write to the view's keys (and others): JSON orders in 7 countries with amounts
/// (decimals, negatives), non-JSON values, deletions, short expiries, counters, and now and
/// then a transaction across shards.
fn write_one(c: &mut redis::Connection, rng: &mut fastrand::Rng) -> redis::RedisResult<()> {
    let k = format!("o:{:05}", rng.u32(0..5_000));
    let order = || {
        json!({"c": format!("c{}", fastrand::u8(0..7)), "a": fastrand::i32(-1_000..100_000)})
            .to_string()
    };
    match rng.u8(0..12) {
        0 => redis::cmd("DEL").arg(&k).query(c),
        1 => redis::cmd("SET").arg(&k).arg("not json").query(c),
        2 => redis::cmd("SET")
            .arg(&k)
            .arg(order())
            .arg("PX")
            .arg(300)
            .query(c),
        3 => redis::cmd("INCR")
            .arg(format!("o:n{}", rng.u8(0..10)))
            .query(c),
        4 => redis::cmd("SET")
            .arg(&k)
            .arg(format!(
                r#"{{"c":"c{}","a":{}.25}}"#,
                rng.u8(0..7),
                rng.i32(-50..50)
            ))
            .query(c),
        5 => {
            // MULTI/EXEC over keys of several shards: one transaction, all or nothing.
            let mut p = redis::pipe();
            p.atomic();
            for _ in 0..3 {
                p.cmd("SET")
                    .arg(format!("o:{:05}", rng.u32(0..5_000)))
                    .arg(order())
                    .ignore();
            }
            p.cmd("DEL")
                .arg(format!("o:{:05}", rng.u32(0..5_000)))
                .ignore();
            p.query(c)
        }
        _ => redis::cmd("SET").arg(&k).arg(order()).query(c),
    }
}

#[test]
fn a_view_equals_a_fresh_job_under_writes_through_a_shard_leader_kill() {
    let mut nodes = common::start_founders(3, |_| Vec::new());
    let (code, body) = common::http(
        nodes[0].http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name": "orders", "mode": "cp", "shards": 4}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let mut c = client(&nodes[0]);
    let mut pipe = redis::pipe();
    for i in 0..20_000u32 {
        pipe.cmd("SET")
            .arg(format!("o:{i:05}"))
            .arg(json!({"c": format!("c{}", i % 7), "a": i % 1_000}).to_string())
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    // Writers through every node (leaders and followers) from before the view exists until
    // after the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let url = nodes[w].redis_url();
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w as u64);
                let connect = || {
                    let mut c = redis::Client::open(url.as_str())
                        .unwrap()
                        .get_connection_with_timeout(Duration::from_secs(5))?;
                    redis::cmd("SELECT").arg("orders").query::<()>(&mut c)?;
                    Ok::<_, redis::RedisError>(c)
                };
                let mut c = connect().ok();
                while !stop.load(Ordering::Relaxed) {
                    let Some(conn) = c.as_mut() else {
                        // This writer's node was killed: it stops.
                        return;
                    };
                    // Errors (a leader change, a refused transaction) are fine: the check
                    // compares the view with the data, whatever was written.
                    if write_one(conn, &mut rng).is_ok() {
                        written.fetch_add(1, Ordering::Relaxed);
                    } else if connect().map(|n| c = Some(n)).is_err() {
                        c = None;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let created: Value = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("sales")
        .arg(SPEC)
        .query(&mut c)
        .unwrap();
    let Value::Array(parts) = created else {
        panic!("{created:?}")
    };
    assert_eq!(text(&parts[1]), "created");
    // The same view with a Lua map, kept from the change log by each shard leader's node.
    let created: Value = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("lua_sales")
        .arg(LUA_SPEC)
        .query(&mut c)
        .unwrap();
    let Value::Array(parts) = created else {
        panic!("{created:?}")
    };
    assert_eq!(text(&parts[1]), "created");
    // While it builds, a read says so.
    let early = view_get(&mut c, "sales");
    eprintln!(
        "while building: complete {} shards ready {}",
        early["complete"], early["shards_ready"]
    );
    wait_ready(&mut c, "sales");
    wait_ready(&mut c, "lua_sales");
    // Kill the node leading most shards; read on through the others.
    std::thread::sleep(Duration::from_secs(2));
    let (victim, led) = busiest_leader(&nodes[0], &[1, 2, 3]);
    eprintln!("killing node {victim}, leader of {led} shards");
    assert!(led > 0, "no node leads a shard of orders");
    nodes[(victim - 1) as usize].kill9();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != (victim - 1) as usize).collect();
    let mut c = client(&nodes[survivors[0]]);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let n = written.load(Ordering::Relaxed);
    assert!(n > 500, "only {n} writes");
    // Keys written with a short expiry leave through the log (counted until then): compare
    // once two reads of the view around the job agree.
    let mut last = None;
    for attempt in 0..20 {
        let before = view_get(&mut c, "sales");
        let job = job_rows(&mut c, SPEC);
        let after = view_get(&mut c, "sales");
        assert_eq!(before["complete"], "1");
        if before["rows"] == after["rows"] {
            let rows: serde_json::Value = serde_json::from_str(&after["rows"]).unwrap();
            assert_eq!(rows, job, "the view against a job over the same data");
            assert_eq!(rows.as_array().unwrap().len(), 7);
            eprintln!("{n} writes; equal after {attempt} retries: {rows}");
            last = Some(rows);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(last.is_some(), "the view never settled");
    let verify = map(redis::cmd("VIEW")
        .arg("VERIFY")
        .arg("sales")
        .query(&mut c)
        .unwrap());
    assert_eq!(verify["drift"], "0", "{verify:?}");
    // The Lua view, read once it has caught up with every change (FRESH), equals a job with
    // its own spec and the built-in view: each event counted once across the leader change.
    let mut settled = None;
    for attempt in 0..20 {
        let fresh = |c: &mut redis::Connection| {
            map(redis::cmd("VIEW")
                .arg("GET")
                .arg("lua_sales")
                .arg("FRESH")
                .arg(10_000)
                .query(c)
                .unwrap())
        };
        // Both views read around the job, and compared only when neither moved meanwhile:
        // keys written with PX 300 may still be leaving through the log, and the built-in view
        // counts a removal at once, the Lua view once it reads it.
        let before = fresh(&mut c);
        let built_in_before = view_get(&mut c, "sales")["rows"].clone();
        assert_eq!(before["caught_up"], "1", "{before:?}");
        assert_eq!(before["complete"], "1", "{before:?}");
        let job = job_rows(&mut c, LUA_SPEC);
        let after = fresh(&mut c);
        let built_in_after = view_get(&mut c, "sales")["rows"].clone();
        if before["rows"] == after["rows"] && built_in_before == built_in_after {
            let rows: serde_json::Value = serde_json::from_str(&after["rows"]).unwrap();
            assert_eq!(rows, job, "the Lua view against a job with its spec");
            let built_in: serde_json::Value = serde_json::from_str(&built_in_after).unwrap();
            assert_eq!(rows, built_in, "the Lua view against the built-in one");
            eprintln!("Lua view equal after {attempt} retries");
            settled = Some(rows);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(settled.is_some(), "the Lua view never settled");
    // VERIFY of a Lua view compares a quiet shard: while keys written with PX 300 still leave
    // through the log it answers -TRYAGAIN (nothing done), and is asked again.
    let until = Instant::now() + Duration::from_secs(30);
    let verify = loop {
        match redis::cmd("VIEW")
            .arg("VERIFY")
            .arg("lua_sales")
            .query::<redis::Value>(&mut c)
        {
            Ok(v) => break map(v),
            Err(e) if e.code() == Some("TRYAGAIN") && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("VIEW VERIFY lua_sales: {e}"),
        }
    };
    assert_eq!(verify["drift"], "0", "{verify:?}");
    // One group read alone, through a follower: the same answer as the whole view read just
    // after it. Keys written with PX 300 may still be leaving through the log (a CI run saw
    // n 2798 then 2795), so the pair is read again until nothing changed between the two.
    let mut c2 = client(&nodes[survivors[1]]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let one = map(redis::cmd("VIEW")
            .arg("GET")
            .arg("sales")
            .arg("GROUP")
            .arg("c3")
            .query(&mut c2)
            .unwrap());
        let one: serde_json::Value = serde_json::from_str(&one["rows"]).unwrap();
        let all: serde_json::Value =
            serde_json::from_str(&view_get(&mut c, "sales")["rows"]).unwrap();
        let c3 = all
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["group"] == "c3")
            .unwrap()
            .clone();
        if one == json!([c3]) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the group read alone {one} and in the whole view {c3} differ for 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn views_are_paged_dropped_and_refuse_what_they_cannot_keep() {
    let nodes = common::start_founders(3, |_| Vec::new());
    let (code, _) = common::http(
        nodes[0].http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name": "orders", "mode": "cp", "shards": 3}"#),
    )
    .unwrap();
    assert_eq!(code, 201);
    let mut c = client(&nodes[1]);
    let mut pipe = redis::pipe();
    for i in 0..3_000u32 {
        pipe.cmd("SET")
            .arg(format!("u:{i:05}"))
            .arg(json!({"g": i % 250}).to_string())
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    let spec = r#"{"input": {"prefix": "u:"}, "map": {"group": [{"json": "$.g"}]}, "reduce": {"n": "count"}}"#;
    let _: Value = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("by_g")
        .arg(spec)
        .query(&mut c)
        .unwrap();
    // The same spec again: found; another: refused.
    let again: Value = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("by_g")
        .arg(spec)
        .query(&mut c)
        .unwrap();
    let Value::Array(parts) = again else { panic!() };
    assert_eq!(text(&parts[1]), "exists");
    let other = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("by_g")
        .arg(spec.replace("u:", "v:"))
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(other.to_string().contains("another spec"), "{other}");
    for (bad, why) in [
        (
            r#"{"map": {"group": [{"words": {"json": "$.t"}}]}, "reduce": {"n": "count"}}"#,
            "words",
        ),
        (
            r#"{"reduce": {"d": {"distinct": {"json": "$.u"}}}}"#,
            "count, sum, avg, min and max",
        ),
        (
            r#"{"input": {"keyspace": "other"}, "reduce": {"n": "count"}}"#,
            "not 'orders'",
        ),
        ("not json", "not JSON"),
    ] {
        let e = redis::cmd("VIEW")
            .arg("CREATE")
            .arg("bad")
            .arg(bad)
            .query::<Value>(&mut c)
            .unwrap_err();
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    wait_ready(&mut c, "by_g");
    // Pages of 40 groups: every group once, in order, counts right.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut cmd = redis::cmd("VIEW");
        cmd.arg("GET").arg("by_g").arg("COUNT").arg(40);
        if let Some(a) = &after {
            cmd.arg("AFTER").arg(a.as_bytes());
        }
        let page: Value = cmd.query(&mut c).unwrap();
        let page = match page {
            Value::Map(m) => m,
            Value::Array(flat) => flat
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect(),
            other => panic!("{other:?}"),
        };
        let get = |k: &str| page.iter().find(|(f, _)| text(f) == k).unwrap().1.clone();
        let rows: serde_json::Value = serde_json::from_str(&text(&get("rows"))).unwrap();
        assert!(rows.as_array().unwrap().len() <= 40, "a page past COUNT");
        for r in rows.as_array().unwrap() {
            assert_eq!(r["n"], 12, "{r}");
            seen.push(r["group"].as_i64().unwrap());
        }
        match get("next") {
            Value::Nil => break,
            Value::BulkString(b) => after = Some(String::from_utf8_lossy(&b).into_owned()),
            other => panic!("{other:?}"),
        }
        assert!(seen.len() <= 250, "pages repeat groups");
    }
    seen.sort();
    assert_eq!(seen, (0..250).collect::<Vec<_>>());
    let list: Value = redis::cmd("VIEW").arg("LIST").query(&mut c).unwrap();
    assert!(format!("{list:?}").contains("by_g"), "{list:?}");
    let dropped: i64 = redis::cmd("VIEW")
        .arg("DROP")
        .arg("by_g")
        .query(&mut c)
        .unwrap();
    assert_eq!(dropped, 1);
    let e = redis::cmd("VIEW")
        .arg("GET")
        .arg("by_g")
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("no view"), "{e}");
    // The same over HTTP.
    let h = nodes[2].http;
    let (code, body) = common::http(
        h,
        "PUT",
        "/v1/views/orders/by_g2",
        &[],
        Some(spec.as_bytes()),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let (code, _) = common::http(
        h,
        "PUT",
        "/v1/views/orders/by_g2",
        &[],
        Some(spec.as_bytes()),
    )
    .unwrap();
    assert_eq!(code, 200, "the same spec again");
    let (code, _) = common::http(
        h,
        "PUT",
        "/v1/views/orders/by_g2",
        &[],
        Some(spec.replace("u:", "w:").as_bytes()),
    )
    .unwrap();
    assert_eq!(code, 409, "another spec");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) =
            common::http(h, "GET", "/v1/views/orders/by_g2?group=7", &[], None).unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v = common::json(&body);
        if v["complete"] == json!(true) {
            assert_eq!(v["rows"], json!([{"group": 7, "n": 12}]), "{v}");
            assert_eq!(v["keys"], json!(3_000));
            break;
        }
        assert!(Instant::now() < until, "not built: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = common::http(h, "POST", "/v1/views/orders/by_g2/verify", &[], None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(common::json(&body)["drift"], json!(0));
    let (code, body) = common::http(h, "GET", "/v1/views/orders", &[], None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        common::json(&body)["views"][0]["name"],
        json!("by_g2"),
        "by_g was dropped"
    );
    // And from the CLI.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_capdb"))
            .args(args)
            .args(["--addr", &h.to_string()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["view", "get", "orders", "by_g2", "--group", "7", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), r#"[{"group":7,"n":12}]"#);
    assert!(err.contains("complete"), "{err}");
    let (code, out, _) = cli(&["view", "get", "orders", "by_g2"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("(250 rows)"), "{out}");
    let (code, out, err) = cli(&["view", "verify", "orders", "by_g2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("drift 0"), "{out}");
    let (code, _) = common::http(h, "DELETE", "/v1/views/orders/by_g2", &[], None).unwrap();
    assert_eq!(code, 204);
    let (code, _) = common::http(h, "GET", "/v1/views/orders/by_g2", &[], None).unwrap();
    assert_eq!(code, 404);
    // Views are for cp keyspaces.
    let (code, _) = common::http(
        nodes[0].http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name": "sessions", "mode": "cache"}"#),
    )
    .unwrap();
    assert_eq!(code, 201);
    // The new keyspace reaches node 2's catalog through the cluster's log: wait for it.
    let until = Instant::now() + Duration::from_secs(30);
    while redis::cmd("SELECT")
        .arg("sessions")
        .query::<()>(&mut c)
        .is_err()
    {
        assert!(
            Instant::now() < until,
            "keyspace sessions never reached node 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = redis::cmd("VIEW")
        .arg("CREATE")
        .arg("v")
        .arg(r#"{"reduce": {"n": "count"}}"#)
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("cp keyspaces"), "{e}");
}
