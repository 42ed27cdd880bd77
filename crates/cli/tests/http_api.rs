//! The HTTP/JSON API with `curl` and the `capdb` CLI, plus /metrics.

mod common;

use std::process::Command;

use common::{BIN, Server, http, json, need_tool};

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new(need_tool("curl"))
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn kv_routes_with_curl() {
    let s = Server::start();
    let base = format!("http://{}", s.http);
    let (code, body) = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "hello",
        &format!("{base}/v1/kv/default/greeting"),
    ]);
    assert_eq!((code, body.as_str()), (200, r#"{"written":true}"#));
    let (code, body) = curl(&[&format!("{base}/v1/kv/default/greeting")]);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["value"], "hello");
    assert_eq!(v["ttl_ms"], serde_json::Value::Null);
    // Keys with slashes and spaces; raw bytes; TTL; conditional writes.
    let (code, _) = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "x",
        &format!("{base}/v1/kv/default/a%2Fb%20c?ttl_ms=60000"),
    ]);
    assert_eq!(code, 200);
    let (_, body) = curl(&[&format!("{base}/v1/kv/default/a%2Fb%20c")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["key"], "a/b c");
    assert!(v["ttl_ms"].as_u64().unwrap() > 59_000);
    let (_, body) = curl(&[
        "-H",
        "Accept: application/octet-stream",
        &format!("{base}/v1/kv/default/greeting"),
    ]);
    assert_eq!(body, "hello");
    let (code, body) = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "new",
        &format!("{base}/v1/kv/default/greeting?if=absent"),
    ]);
    assert_eq!((code, body.as_str()), (200, r#"{"written":false}"#));
    // Binary values come back hex-encoded in JSON.
    let (status, _) = http(
        s.http,
        "PUT",
        "/v1/kv/default/bin",
        &[],
        Some(&[0xff, 0x00, 0x80]),
    )
    .unwrap();
    assert_eq!(status, 200);
    let (_, body) = http(s.http, "GET", "/v1/kv/default/bin", &[], None).unwrap();
    assert_eq!(json(&body)["value_hex"], "ff0080");
    // Delete and 404.
    let (code, body) = curl(&["-X", "DELETE", &format!("{base}/v1/kv/default/greeting")]);
    assert_eq!((code, body.as_str()), (200, r#"{"deleted":true}"#));
    let (code, body) = curl(&[&format!("{base}/v1/kv/default/greeting")]);
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["code"],
        "key_not_found"
    );
    let (code, body) = curl(&[&format!("{base}/v1/kv/nope/k")]);
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["code"],
        "keyspace_not_found"
    );
}

#[test]
fn range_scans_page_with_a_cursor() {
    let s = Server::start();
    let mut c = s.client();
    let pairs: Vec<(String, String)> = (0..250)
        .map(|i| (format!("item:{i:03}"), format!("v{i}")))
        .collect();
    let _: () = redis::Commands::mset(&mut c, &pairs).unwrap();
    let _: () = redis::Commands::set(&mut c, "other", "x").unwrap();
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/kv/default?prefix=item:&limit=60".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = http(s.http, "GET", &path, &[], None).unwrap();
        assert_eq!(status, 200);
        let v = json(&body);
        for e in v["entries"].as_array().unwrap() {
            keys.push(e["key"].as_str().unwrap().to_string());
        }
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        keys,
        pairs.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
    );
    // start (inclusive) / end (exclusive)
    let (_, body) = http(
        s.http,
        "GET",
        "/v1/kv/default?start=item:010&end=item:013",
        &[],
        None,
    )
    .unwrap();
    let got: Vec<String> = json(&body)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, vec!["item:010", "item:011", "item:012"]);
}

#[test]
fn keyspace_admin_and_cli() {
    let s = Server::start();
    let addr = s.http.to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--addr")
            .arg(&addr)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = run(&[
        "keyspace",
        "create",
        "sessions",
        "--mode",
        "cache",
        "--max-memory-bytes",
        "4194304",
        "--eviction",
        "lfu",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"eviction\": \"lfu\""), "{out}");
    let (ok, _, err) = run(&["keyspace", "create", "sessions", "--mode", "cp"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = run(&["keyspace", "create", "bad", "--mode", "eventual"]);
    assert!(!ok && err.contains("unknown keyspace mode"), "{err}");
    let (ok, out, _) = run(&["keyspace", "list"]);
    assert!(
        ok && out.contains("sessions") && out.contains("default"),
        "{out}"
    );
    let (ok, out, _) = run(&["keyspace", "describe", "sessions"]);
    assert!(ok && out.contains("\"max_memory_bytes\": 4194304"), "{out}");
    let (ok, out, _) = run(&[
        "kv", "put", "tok", "abc", "-k", "sessions", "--ttl-ms", "60000",
    ]);
    assert!(ok && out.trim() == "OK", "{out}");
    let (ok, out, _) = run(&["kv", "get", "tok", "-k", "sessions"]);
    assert!(ok && out.trim() == "abc", "{out}");
    for i in 0..5 {
        run(&["kv", "put", &format!("s{i}"), "v", "-k", "sessions"]);
    }
    let (ok, out, _) = run(&[
        "kv", "scan", "-k", "sessions", "--prefix", "s", "--limit", "3",
    ]);
    assert!(ok && out.lines().count() == 3, "{out}");
    let (ok, out, _) = run(&["kv", "del", "tok", "-k", "sessions"]);
    assert!(ok && out.trim() == "1");
    let (ok, _, err) = run(&["kv", "get", "tok", "-k", "sessions"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, _, err) = run(&["keyspace", "drop", "default"]);
    assert!(!ok && err.contains("cannot be dropped"), "{err}");
    let (ok, _, _) = run(&["keyspace", "drop", "sessions"]);
    assert!(ok);
    let (ok, _, err) = run(&["kv", "get", "s1", "-k", "sessions"]);
    assert!(
        !ok && err.contains("keyspace 'sessions' does not exist"),
        "{err}"
    );
    // Keyspaces survive a restart; their mode and settings too.
    run(&[
        "keyspace",
        "create",
        "events",
        "--mode",
        "ap",
        "--replication-factor",
        "5",
        "--shards",
        "8",
    ]);
    let mut s = s;
    s.restart();
    let (_, body) = http(s.http, "GET", "/v1/keyspaces/events", &[], None).unwrap();
    let v = json(&body);
    assert_eq!(
        (
            v["mode"].as_str(),
            v["replication_factor"].as_u64(),
            v["shards"].as_u64()
        ),
        (Some("ap"), Some(5), Some(8))
    );
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("capdb "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
}

#[test]
fn metrics_and_health() {
    let s = Server::start();
    let mut c = s.client();
    for _ in 0..3 {
        let _: () = redis::Commands::set(&mut c, "k", "v").unwrap();
    }
    let _: Option<String> = redis::Commands::get(&mut c, "k").unwrap();
    let _: redis::RedisResult<()> = redis::cmd("INCR").arg("k").query(&mut c);
    http(s.http, "GET", "/v1/kv/default/k", &[], None).unwrap();
    let (status, body) = http(s.http, "GET", "/metrics", &[], None).unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("capdb_command_duration_seconds_count{command=\"set\"} 3"),
        "{text}"
    );
    assert!(text.contains("capdb_command_duration_seconds_count{command=\"get\"} 1"));
    assert!(text.contains("capdb_command_errors_total{command=\"incr\"} 1"));
    assert!(text.contains("capdb_http_request_duration_seconds_count{route=\"/v1/kv/{keyspace}/{key}\",method=\"GET\",status=\"200\"} 1"), "{text}");
    assert!(text.contains("capdb_connections 1"));
    assert!(text.contains("capdb_keyspace_keys{keyspace=\"default\",mode=\"cp\"} 1"));
    assert!(text.contains("capdb_storage_commits"));
    let (status, body) = http(s.http, "GET", "/healthz", &[], None).unwrap();
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    let (status, _) = http(s.http, "GET", "/readyz", &[], None).unwrap();
    assert_eq!(status, 200);
}
