//! Jobs on a real 3-node cluster (issue 15): submitted over RESP and HTTP, run where the data
//! is, and answered exactly as one pass over the data would; the `_jobs` keyspace that holds
//! their state is the system's.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Server;
use redis::Value;
use serde_json::json;

fn create_keyspace(http: std::net::SocketAddr, spec: &[u8]) {
    let (code, body) = common::http(http, "POST", "/v1/keyspaces", &[], Some(spec)).unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// `JOB STATUS id` as field -> value.
fn status(c: &mut redis::Connection, id: &str) -> BTreeMap<String, String> {
    let v: Value = redis::cmd("JOB").arg("STATUS").arg(id).query(c).unwrap();
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
        .map(|(k, v)| {
            let v = match v {
                Value::Int(n) => n.to_string(),
                Value::Nil => "nil".into(),
                other => text(&other),
            };
            (text(&k), v)
        })
        .collect()
}

/// Waits (bounded) until job `id` has ended; its status.
fn wait_ended(c: &mut redis::Connection, id: &str) -> BTreeMap<String, String> {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(c, id);
        if ["done", "failed", "cancelled"].contains(&s["state"].as_str()) {
            return s;
        }
        assert!(Instant::now() < until, "job {id} did not end: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Every entry of a stream key: (ID, fields).
fn stream(c: &mut redis::Connection, key: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let v: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(c)
        .unwrap();
    let Value::Array(entries) = v else {
        panic!("{v:?}")
    };
    entries
        .into_iter()
        .map(|e| {
            let Value::Array(mut parts) = e else { panic!() };
            let Value::Array(fields) = parts.remove(1) else {
                panic!()
            };
            let fields = fields
                .chunks(2)
                .map(|p| (text(&p[0]), text(&p[1])))
                .collect();
            (text(&parts[0]), fields)
        })
        .collect()
}

#[test]
fn a_job_over_four_shards_answers_as_one_pass_over_the_data() {
    let nodes = common::start_founders(3, |_| Vec::new());
    create_keyspace(
        nodes[0].http,
        br#"{"name": "orders", "mode": "cp", "shards": 4}"#,
    );
    let mut c = nodes[1].client();
    redis::cmd("SELECT")
        .arg("orders")
        .query::<()>(&mut c)
        .unwrap();
    // What one pass gives: per country, the count and the sum of totals.
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut pipe = redis::pipe();
    for i in 0..2_000i64 {
        let country = format!("c{}", i % 7);
        let total = (i * 37) % 1_000;
        let e = expected.entry(country.clone()).or_default();
        e.0 += 1;
        e.1 += total;
        pipe.cmd("SET")
            .arg(format!("o:{i:05}"))
            .arg(json!({"country": country, "total": total}).to_string())
            .ignore();
    }
    // Keys the job's prefix leaves out, and a value that is not JSON (skipped, counted).
    pipe.cmd("SET")
        .arg("x:1")
        .arg(r#"{"country":"zz","total":1}"#)
        .ignore();
    pipe.cmd("SET").arg("o:bad").arg("not json").ignore();
    pipe.query::<()>(&mut c).unwrap();

    let spec = json!({
        "id": "sales",
        "input": {"keyspace": "orders", "prefix": "o:"},
        "map": {"group": {"json": "$.country"}, "values": {"t": {"json": "$.total"}}},
        "reduce": {"n": "count", "revenue": {"sum": "t"}},
        "output": {"order_by": "revenue", "desc": true}
    })
    .to_string();
    // Submitted through a node that leads nothing in particular.
    let mut other = nodes[2].client();
    let v: Vec<Value> = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(&spec)
        .query(&mut other)
        .unwrap();
    assert_eq!(
        (text(&v[0]), text(&v[1])),
        ("sales".into(), "created".into())
    );
    // The same spec again (a client that lost the answer): the same job.
    let v: Vec<Value> = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(&spec)
        .query(&mut c)
        .unwrap();
    assert_eq!(text(&v[1]), "exists");
    // Another spec under that id is refused.
    let other_spec = spec.replace("\"desc\":true", "\"desc\":false");
    let e = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(&other_spec)
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("exists with another spec"), "{e}");

    let s = wait_ended(&mut c, "sales");
    assert_eq!(s["state"], "done", "{s:?}");
    assert_eq!(s["tasks_done"], s["tasks_total"]);
    assert_eq!(s["shards"], "4");
    // Every key under the prefix was read once (2,000 orders and the bad value).
    assert_eq!(s["keys_scanned"], "2001");

    let raw: String = redis::cmd("JOB")
        .arg("RESULT")
        .arg("sales")
        .query(&mut c)
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&raw).unwrap();
    let mut want: Vec<(String, i64, i64)> =
        expected.into_iter().map(|(k, (n, t))| (k, n, t)).collect();
    want.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["group"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
                r["revenue"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // The same over HTTP, from another node.
    let (code, body) =
        common::http(nodes[0].http, "GET", "/v1/jobs/sales/result", &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(common::json(&body)["rows"], serde_json::Value::Array(rows));
    let (code, body) = common::http(nodes[0].http, "GET", "/v1/jobs/sales", &[], None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(common::json(&body)["state"], "done");
    // Its stream: submitted, partial results with their coverage (never complete), then the
    // final entry; readable with XRANGE and XREAD from any node.
    let entries: Vec<(String, BTreeMap<String, String>)> = stream(&mut other, "__job:sales");
    assert_eq!(entries[0].1["type"], "submitted");
    let last = entries.last().unwrap();
    assert_eq!(
        (last.1["type"].as_str(), last.1["complete"].as_str()),
        ("final", "1")
    );
    assert_eq!(last.1["tasks_done"], "4");
    let final_result: serde_json::Value = serde_json::from_str(&last.1["result"]).unwrap();
    assert_eq!(final_result["groups_total"], 7);
    let partials: Vec<&BTreeMap<String, String>> = entries
        .iter()
        .filter(|(_, f)| f["type"] == "partial")
        .map(|(_, f)| f)
        .collect();
    assert!(
        !partials.is_empty(),
        "a partial result before the end: {entries:?}"
    );
    let mut seen = 0;
    for p in &partials {
        assert_eq!(p["complete"], "0");
        let done: u64 = p["tasks_done"].parse().unwrap();
        assert!(
            done >= seen && done < 4,
            "coverage rises and is never complete: {p:?}"
        );
        seen = done;
    }
    let ids: Vec<&String> = entries.iter().map(|(id, _)| id).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| parse_id(id));
    assert_eq!(ids, sorted, "IDs rise");
    let len: i64 = redis::cmd("XLEN").arg("__job:sales").query(&mut c).unwrap();
    assert_eq!(len as usize, entries.len());
    // XREAD after the submitted entry gets the rest; after the last one, BLOCK times out.
    let v: Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("__job:sales")
        .arg(&entries[0].0)
        .query(&mut c)
        .unwrap();
    assert!(format!("{v:?}").contains(&entries[1].0), "{v:?}");
    let v: Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(200)
        .arg("STREAMS")
        .arg("__job:sales")
        .arg("$")
        .query(&mut c)
        .unwrap();
    assert_eq!(v, Value::Nil);
    // Over HTTP: NDJSON, and SSE that ends after the closing entry (resumable by ID).
    let (code, body) =
        common::http(nodes[2].http, "GET", "/v1/jobs/sales/events", &[], None).unwrap();
    assert_eq!(code, 200);
    let lines: Vec<serde_json::Value> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), entries.len());
    assert_eq!(lines.last().unwrap()["type"], "final");
    assert_eq!(lines.last().unwrap()["result"]["groups_total"], 7);
    let (code, body) = common::http(
        nodes[2].http,
        "GET",
        "/v1/jobs/sales/events",
        &[
            ("Accept", "text/event-stream"),
            ("Last-Event-ID", &entries[0].0),
        ],
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    let sse = String::from_utf8(body).unwrap();
    assert!(!sse.contains("event: submitted"), "resumed after it: {sse}");
    assert!(
        sse.contains("event: partial") && sse.contains("event: final"),
        "{sse}"
    );
    // Cancelling an ended job changes nothing.
    let cancelled: i64 = redis::cmd("JOB")
        .arg("CANCEL")
        .arg("sales")
        .query(&mut c)
        .unwrap();
    assert_eq!(cancelled, 0);
    let ids: Vec<String> = redis::cmd("JOB").arg("LIST").query(&mut c).unwrap();
    assert!(ids.contains(&"sales".to_string()));
    // Jobs at once: each pins every shard on every replica; all of them end done.
    for n in 0..6 {
        let spec =
            json!({"id": format!("many{n}"), "input": {"keyspace": "orders", "prefix": "o:"},
                          "reduce": {"n": "count"}})
            .to_string();
        redis::cmd("JOB")
            .arg("SUBMIT")
            .arg(spec)
            .query::<Value>(&mut c)
            .unwrap();
    }
    for n in 0..6 {
        let id = format!("many{n}");
        let s = wait_ended(&mut c, &id);
        assert_eq!(s["state"], "done", "{id}: {s:?}");
        let raw: String = redis::cmd("JOB")
            .arg("RESULT")
            .arg(&id)
            .query(&mut c)
            .unwrap();
        assert_eq!(raw, r#"[{"group":null,"n":2001}]"#);
    }
    drop(nodes);
}

#[test]
fn bad_specs_and_the_system_keyspace_are_refused_with_clear_errors() {
    let s = Server::start();
    let mut c = s.client();
    let err = |c: &mut redis::Connection, args: &[&str]| -> String {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query::<Value>(c).unwrap_err().to_string()
    };
    let e = err(
        &mut c,
        &[
            "JOB",
            "SUBMIT",
            r#"{"input": {"keyspace": "default"}, "reduce": {"x": {"sum": "v"}}}"#,
        ],
    );
    assert!(
        e.contains(r#"reduce.x.sum: "v" is not a name in map.values"#),
        "{e}"
    );
    let e = err(
        &mut c,
        &[
            "JOB",
            "SUBMIT",
            r#"{"input": {"keyspace": "nope"}, "reduce": {"n": "count"}}"#,
        ],
    );
    assert!(e.contains("nope"), "{e}");
    let e = err(&mut c, &["JOB", "SUBMIT", "{"]);
    assert!(e.contains("not JSON"), "{e}");
    let e = err(&mut c, &["JOB", "STATUS", "missing"]);
    assert!(e.contains("NOJOB"), "{e}");
    let e = err(&mut c, &["XRANGE", "__job:missing", "-", "+"]);
    assert!(e.contains("NOJOB"), "{e}");
    // A job on the default keyspace creates `_jobs`; users cannot touch it.
    let v: Vec<Value> = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(r#"{"id": "empty", "input": {"keyspace": "default"}, "reduce": {"n": "count"}}"#)
        .query(&mut c)
        .unwrap();
    assert_eq!(text(&v[0]), "empty");
    let done = wait_ended(&mut c, "empty");
    assert_eq!(done["state"], "done", "{done:?}");
    let raw: String = redis::cmd("JOB")
        .arg("RESULT")
        .arg("empty")
        .query(&mut c)
        .unwrap();
    assert_eq!(raw, "[]", "no keys, no groups");
    let e = err(&mut c, &["SELECT", "_jobs"]);
    assert!(e.contains("system keyspace"), "{e}");
    let (code, body) = common::http(
        s.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name": "_mine", "mode": "cp"}"#),
    )
    .unwrap();
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let (code, _) = common::http(s.http, "DELETE", "/v1/keyspaces/_jobs", &[], None).unwrap();
    assert_eq!(code, 400);
    // FLUSHALL leaves jobs alone.
    redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
    assert_eq!(status(&mut c, "empty")["state"], "done");
    let (code, body) = common::http(s.http, "GET", "/v1/jobs/nope/result", &[], None).unwrap();
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
}

/// `JOB TASKS id`: per task, its attempts as (node, outcome).
fn tasks(c: &mut redis::Connection, id: &str) -> Vec<Vec<(u64, String)>> {
    let v: Value = redis::cmd("JOB").arg("TASKS").arg(id).query(c).unwrap();
    let Value::Array(rows) = v else {
        panic!("{v:?}")
    };
    rows.into_iter()
        .map(|row| {
            let Value::Array(parts) = row else { panic!() };
            let Value::Array(attempts) = &parts[3] else {
                panic!()
            };
            attempts
                .iter()
                .map(|a| {
                    let Value::Array(a) = a else { panic!() };
                    let Value::Int(node) = a[1] else { panic!() };
                    (node as u64, text(&a[2]))
                })
                .collect()
        })
        .collect()
}

/// A 3-node cluster holding `orders` (4 shards, every node a replica of each) with 16,000
/// orders, and the rows one pass over them gives for [`slow_spec`].
fn loaded_cluster() -> (Vec<Server>, Vec<(String, i64, i64)>) {
    let nodes = common::start_founders(3, |_| Vec::new());
    create_keyspace(
        nodes[0].http,
        br#"{"name": "orders", "mode": "cp", "shards": 4}"#,
    );
    let mut c = nodes[0].client();
    redis::cmd("SELECT")
        .arg("orders")
        .query::<()>(&mut c)
        .unwrap();
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut pipe = redis::pipe();
    for i in 0..16_000i64 {
        let country = format!("c{}", i % 5);
        let total = i % 100;
        let e = expected.entry(country.clone()).or_default();
        e.0 += 1;
        e.1 += total;
        pipe.cmd("SET")
            .arg(format!("o:{i:06}"))
            .arg(json!({"country": country, "total": total}).to_string())
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    let rows = expected.into_iter().map(|(k, (n, t))| (k, n, t)).collect();
    (nodes, rows)
}

/// A job over every order, grouped by country, slowed so that each task (about 4,000 keys)
/// takes about 2.5 s: long enough to kill a node while it runs.
fn slow_spec(id: &str) -> String {
    spec_at_rate(id, 1_600)
}

fn spec_at_rate(id: &str, keys_per_s: u64) -> String {
    json!({"id": id, "input": {"keyspace": "orders", "prefix": "o:"},
           "map": {"group": {"json": "$.country"}, "values": {"t": {"json": "$.total"}}},
           "reduce": {"n": "count", "revenue": {"sum": "t"}},
           "limits": {"scan_keys_per_s": keys_per_s}})
    .to_string()
}

fn result_rows(c: &mut redis::Connection, id: &str) -> Vec<(String, i64, i64)> {
    let raw: String = redis::cmd("JOB").arg("RESULT").arg(id).query(c).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&raw).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["group"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
                r["revenue"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Waits (bounded) until `check` holds for job `id`'s tasks; them.
fn wait_tasks(
    c: &mut redis::Connection,
    id: &str,
    what: &str,
    check: impl Fn(&[Vec<(u64, String)>]) -> bool,
) -> Vec<Vec<(u64, String)>> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let t = tasks(c, id);
        if check(&t) {
            return t;
        }
        assert!(Instant::now() < until, "{what}: {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_job_survives_the_kill_of_a_node_running_its_tasks_and_only_its_tasks_run_again() {
    let (mut nodes, expected) = loaded_cluster();
    let mut c = nodes[0].client();
    redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(slow_spec("k1"))
        .query::<Value>(&mut c)
        .unwrap();
    let coordinator: u64 = {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(n) = status(&mut c, "k1")["coordinator"].parse() {
                break n;
            }
            assert!(Instant::now() < until, "the coordinator is known");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A node running an attempt that does not coordinate: it dies mid-task.
    let running = wait_tasks(
        &mut c,
        "k1",
        "an attempt running off the coordinator",
        |t| {
            t.iter()
                .flatten()
                .any(|(n, e)| e == "running" && *n != coordinator)
        },
    );
    let victim = running
        .iter()
        .flatten()
        .find(|(n, e)| e == "running" && *n != coordinator)
        .map(|(n, _)| *n)
        .unwrap();
    nodes[(victim - 1) as usize].kill9();
    let survivor = if victim == 1 { 2 } else { 1 };
    let mut c = nodes[survivor - 1].client();
    let s = wait_ended(&mut c, "k1");
    assert_eq!(s["state"], "done", "{s:?}");
    let mut got = result_rows(&mut c, "k1");
    got.sort();
    assert_eq!(got, expected);
    // The task log: what ran again is what ran on the killed node, and nothing else.
    let log = tasks(&mut c, "k1");
    assert!(
        log.iter()
            .flatten()
            .any(|(n, e)| *n == victim && e.starts_with("lost")),
        "the killed node's attempt is recorded lost: {log:?}"
    );
    for (task, attempts) in log.iter().enumerate() {
        let dones = attempts.iter().filter(|(_, e)| e == "done").count();
        assert_eq!(dones, 1, "task {task}: one output: {attempts:?}");
        for (n, e) in attempts {
            if e != "done" && e != "superseded" {
                assert_eq!(
                    *n, victim,
                    "task {task} re-ran for another reason: {attempts:?}"
                );
            }
        }
    }
}

#[test]
fn a_node_stopped_mid_task_is_found_by_heartbeats_and_only_its_tasks_run_again() {
    // SIGSTOP, not kill: the connection stays open and the node answers nothing, as when it
    // hangs or is cut off. Only heartbeats tell (the task call itself would wait minutes).
    let (mut nodes, expected) = loaded_cluster();
    let mut c = nodes[0].client();
    // About 5 s a task: the attempt seen running is still running when the node stops.
    redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(spec_at_rate("s1", 800))
        .query::<Value>(&mut c)
        .unwrap();
    let coordinator: u64 = {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(n) = status(&mut c, "s1")["coordinator"].parse() {
                break n;
            }
            assert!(Instant::now() < until, "the coordinator is known");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let running = wait_tasks(
        &mut c,
        "s1",
        "an attempt running off the coordinator",
        |t| {
            t.iter()
                .flatten()
                .any(|(n, e)| e == "running" && *n != coordinator)
        },
    );
    let victim = running
        .iter()
        .flatten()
        .find(|(n, e)| e == "running" && *n != coordinator)
        .map(|(n, _)| *n)
        .unwrap();
    nodes[(victim - 1) as usize]
        .child
        .as_mut()
        .unwrap()
        .pause()
        .unwrap();
    let survivor = if victim == 1 { 2 } else { 1 };
    let mut c = nodes[survivor - 1].client();
    let s = wait_ended(&mut c, "s1");
    nodes[(victim - 1) as usize]
        .child
        .as_mut()
        .unwrap()
        .resume()
        .unwrap();
    assert_eq!(s["state"], "done", "{s:?}");
    let mut got = result_rows(&mut c, "s1");
    got.sort();
    assert_eq!(got, expected);
    let log = tasks(&mut c, "s1");
    assert!(
        log.iter()
            .flatten()
            .any(|(n, e)| *n == victim && e.starts_with("lost") && e.contains("heartbeats")),
        "the stopped node's attempt is recorded lost for its silence: {log:?}"
    );
    for (task, attempts) in log.iter().enumerate() {
        let dones = attempts.iter().filter(|(_, e)| e == "done").count();
        assert_eq!(dones, 1, "task {task}: one output: {attempts:?}");
        for (n, e) in attempts {
            if e != "done" {
                assert_eq!(
                    *n, victim,
                    "task {task} re-ran for another reason: {attempts:?}"
                );
            }
        }
    }
}

#[test]
fn a_job_survives_the_kill_of_its_coordinator_and_redoes_only_what_was_in_flight() {
    let (mut nodes, expected) = loaded_cluster();
    let mut c = nodes[0].client();
    redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(slow_spec("k2"))
        .query::<Value>(&mut c)
        .unwrap();
    // Once a task is done and others still run, the coordinator dies.
    let before = wait_tasks(&mut c, "k2", "one task done, one running", |t| {
        t.iter().flatten().any(|(_, e)| e == "done")
            && t.iter().flatten().any(|(_, e)| e == "running")
    });
    let s = status(&mut c, "k2");
    let coordinator: usize = s["coordinator"].parse().unwrap();
    let epoch_before: u64 = s["epoch"].parse().unwrap();
    nodes[coordinator - 1].kill9();
    let survivor = if coordinator == 1 { 2 } else { 1 };
    let mut c = nodes[survivor - 1].client();
    let s = wait_ended(&mut c, "k2");
    assert_eq!(s["state"], "done", "{s:?}");
    assert!(
        s["epoch"].parse::<u64>().unwrap() > epoch_before,
        "another coordinator: {s:?}"
    );
    let mut got = result_rows(&mut c, "k2");
    got.sort();
    assert_eq!(got, expected);
    // Tasks done before the kill were not run again.
    let after = tasks(&mut c, "k2");
    for (task, attempts) in before.iter().enumerate() {
        if attempts.iter().any(|(_, e)| e == "done") {
            assert_eq!(
                after[task].len(),
                attempts.len(),
                "task {task} was done before the kill and ran again: {:?}",
                after[task]
            );
        }
    }
}

#[test]
fn capdb_job_run_follows_a_job_to_its_result_and_says_how_it_ended_in_its_exit_code() {
    let s = Server::start();
    let mut c = s.client();
    for i in 0..300 {
        redis::cmd("SET")
            .arg(format!("u:{i}"))
            .arg(json!({"plan": if i % 3 == 0 { "pro" } else { "free" }}).to_string())
            .query::<()>(&mut c)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        json!({"input": {"keyspace": "default", "prefix": "u:"},
               "map": {"group": {"json": "$.plan"}}, "reduce": {"users": "count"}})
        .to_string(),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_capdb"))
            .args(args)
            .args(["--addr", &s.http.to_string()])
            .output()
            .unwrap()
    };
    let out = run(&["job", "run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows,
        json!([{"group": "free", "users": 200}, {"group": "pro", "users": 100}])
    );
    // The progress went to standard error, one line a second at most off a terminal.
    assert!(String::from_utf8_lossy(&out.stderr).contains("submitted"));
    // As a table.
    let out = run(&["job", "run", spec.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("group") && table.contains("free") && table.contains("(2 rows)"),
        "{table}"
    );
    // A bad spec: exit code 2 and the field named.
    std::fs::write(
        &spec,
        r#"{"input": {"keyspace": "default"}, "reduce": {"x": "median"}}"#,
    )
    .unwrap();
    let out = run(&["job", "run", spec.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reduce.x"));
}

/// Submits `spec` as job `id` and waits for it to end: its status.
fn run_job(
    c: &mut redis::Connection,
    id: &str,
    spec: serde_json::Value,
) -> BTreeMap<String, String> {
    let mut spec = spec;
    spec["id"] = json!(id);
    let _: Value = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(spec.to_string())
        .query(c)
        .unwrap();
    wait_ended(c, id)
}

#[test]
fn a_lua_map_answers_as_the_built_ins_and_user_code_that_fails_fails_the_job_cleanly() {
    let nodes = common::start_founders(3, |_| Vec::new());
    create_keyspace(
        nodes[0].http,
        br#"{"name": "orders", "mode": "cp", "shards": 2}"#,
    );
    let mut c = nodes[0].client();
    redis::cmd("SELECT")
        .arg("orders")
        .query::<()>(&mut c)
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..3_000i64 {
        pipe.cmd("SET")
            .arg(format!("o:{i:05}"))
            .arg(json!({"country": format!("c{}", i % 5), "total": (i * 37) % 1_000}).to_string())
            .ignore();
    }
    pipe.cmd("SET").arg("o:bad").arg("not json").ignore();
    pipe.query::<()>(&mut c).unwrap();
    let input = json!({"keyspace": "orders", "prefix": "o:"});
    let reduce = json!({"n": "count", "revenue": {"sum": "t"}, "top": {"max": "t"}});
    // The same job with built-in extractors and with a Lua map: the same rows.
    let built_in = run_job(
        &mut c,
        "builtin",
        json!({"input": input, "map": {"group": {"json": "$.country"}, "values": {"t": {"json": "$.total"}}}, "reduce": reduce}),
    );
    assert_eq!(built_in["state"], "done", "{built_in:?}");
    let lua = r#"
        function map(key, value)
          local order = capdb.json_decode(value)
          if order then emit(order.country, {t = order.total}) end
        end"#;
    let with_lua = run_job(
        &mut c,
        "lua",
        json!({"input": input, "map": {"lua": {"source": lua}, "values": ["t"]}, "reduce": reduce}),
    );
    assert_eq!(with_lua["state"], "done", "{with_lua:?}");
    let rows = |c: &mut redis::Connection, id: &str| -> serde_json::Value {
        let raw: String = redis::cmd("JOB").arg("RESULT").arg(id).query(c).unwrap();
        serde_json::from_str(&raw).unwrap()
    };
    let (a, b) = (rows(&mut c, "builtin"), rows(&mut c, "lua"));
    assert_eq!(a, b);
    assert_eq!(a.as_array().unwrap().len(), 5);
    // User code that fails: the job fails at once, saying why, with the key and the line.
    let error =
        "function map(key, value)\n  if key == 'o:00042' then\n    error('bad order')\n  end\nend";
    let looping = "function map(key, value) while true do end end";
    let bomb = "function map(key, value) local t = {} while true do t[#t + 1] = string.rep('x', 1000000) end end";
    for (id, source, want) in [
        ("lua-error", error, vec!["o:00042", "bad order", ":3:"]),
        ("lua-loop", looping, vec!["budget"]),
        ("lua-bomb", bomb, vec!["memory"]),
    ] {
        let started = Instant::now();
        let s = run_job(
            &mut c,
            id,
            json!({"input": input, "map": {"lua": {"source": source}, "values": ["t"]}, "reduce": reduce}),
        );
        assert_eq!(s["state"], "failed", "{id}: {s:?}");
        for w in want {
            assert!(
                s["reason"].contains(w),
                "{id}: {w} not in {:?}",
                s["reason"]
            );
        }
        eprintln!("{id}: failed in {:?}: {}", started.elapsed(), s["reason"]);
        // The node serves on, and a built-in job still runs to its end.
        let v: String = redis::cmd("GET").arg("o:00001").query(&mut c).unwrap();
        assert!(v.contains("country"));
    }
    let after = run_job(
        &mut c,
        "builtin-after",
        json!({"input": input, "map": {"group": {"json": "$.country"}, "values": {"t": {"json": "$.total"}}}, "reduce": reduce}),
    );
    assert_eq!(after["state"], "done");
    assert_eq!(rows(&mut c, "builtin-after"), a);
    // The same map loaded once as a library (as Redis's FUNCTION LOAD), named by jobs and
    // views as "library.function"; each keeps the source it started with.
    let library = format!("#!lua name=shop\n{lua}\nfunction other(k, v) end");
    let name: String = redis::cmd("JOB")
        .arg("LIBRARY")
        .arg("LOAD")
        .arg(&library)
        .query(&mut c)
        .unwrap();
    assert_eq!(name, "shop");
    let again = redis::cmd("JOB")
        .arg("LIBRARY")
        .arg("LOAD")
        .arg(&library)
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(
        again.to_string().contains("Library 'shop' already exists"),
        "{again}"
    );
    for (bad, why) in [
        ("function map() end", "Missing library metadata"),
        ("#!lua name=broken\nfunction map(", "Error compiling"),
        ("#!lua name=empty\nlocal x = 1", "No functions"),
    ] {
        let e = redis::cmd("JOB")
            .arg("LIBRARY")
            .arg("LOAD")
            .arg(bad)
            .query::<Value>(&mut c)
            .unwrap_err();
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    let listed: Value = redis::cmd("JOB")
        .arg("LIBRARY")
        .arg("LIST")
        .query(&mut c)
        .unwrap();
    let Value::Array(libs) = listed else {
        panic!("{listed:?}")
    };
    assert_eq!(libs.len(), 1, "{libs:?}");
    let Value::Array(shop) = &libs[0] else {
        panic!()
    };
    assert_eq!(
        shop[1],
        Value::Array(vec![
            Value::BulkString(b"map".to_vec()),
            Value::BulkString(b"other".to_vec())
        ])
    );
    let from_library = run_job(
        &mut c,
        "lua-library",
        json!({"input": input, "map": {"lua": "shop.map", "values": ["t"]}, "reduce": reduce}),
    );
    assert_eq!(from_library["state"], "done", "{from_library:?}");
    assert_eq!(rows(&mut c, "lua-library"), a);
    let missing = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(
            json!({"input": input, "map": {"lua": "shop.nope", "values": ["t"]}, "reduce": reduce})
                .to_string(),
        )
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(
        missing.to_string().contains("no function 'nope'"),
        "{missing}"
    );
    // Replaced and deleted: the job already submitted keeps its copy.
    let changed = "#!lua name=shop\nfunction map(k, v) emit('x', {t = 1}) end";
    let _: String = redis::cmd("JOB")
        .arg("LIBRARY")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(changed)
        .query(&mut c)
        .unwrap();
    assert_eq!(rows(&mut c, "lua-library"), a);
    let deleted: i64 = redis::cmd("JOB")
        .arg("LIBRARY")
        .arg("DELETE")
        .arg("shop")
        .query(&mut c)
        .unwrap();
    assert_eq!(deleted, 1);
    let gone = redis::cmd("JOB")
        .arg("SUBMIT")
        .arg(
            json!({"input": input, "map": {"lua": "shop.map", "values": ["t"]}, "reduce": reduce})
                .to_string(),
        )
        .query::<Value>(&mut c)
        .unwrap_err();
    assert!(gone.to_string().contains("no library 'shop'"), "{gone}");
    // Over HTTP, the path names it.
    let (code, body) = common::http(
        nodes[1].http,
        "PUT",
        "/v1/jobs/libraries/geo",
        &[],
        Some(b"function map(k, v) emit(k, {t = 1}) end"),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let (code, body) = common::http(nodes[2].http, "GET", "/v1/jobs/libraries", &[], None).unwrap();
    assert_eq!(code, 200);
    let listed = common::json(&body);
    assert_eq!(listed["libraries"][0]["name"], "geo", "{listed}");
    assert_eq!(listed["libraries"][0]["functions"], json!(["map"]));
}
