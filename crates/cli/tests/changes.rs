//! Change streams (issue 14) against the real binary with the `redis` crate: a `cp` shard's
//! change log read as the stream key `__changes:<keyspace>#<shard>`, and a keyspace's merged
//! stream `__changes:<keyspace>`, with Redis's stream commands. Every change in log order with its value, IDs that increase and are the same
//! through every node, Redis's reply shapes for XRANGE/XREVRANGE/XLEN/XREAD (blocking too),
//! key-prefix streams, and clear errors for what is off, read-only or not built yet.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use redis::Value;

/// Cluster tests run one at a time (a 2-core machine).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cmd(c: &mut redis::Connection, line: &str) -> redis::RedisResult<Value> {
    let mut parts = line.split(' ');
    let mut command = redis::cmd(parts.next().unwrap());
    for p in parts {
        command.arg(p);
    }
    command.query(c)
}

fn ok(c: &mut redis::Connection, line: &str) -> Value {
    cmd(c, line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

fn err(c: &mut redis::Connection, line: &str) -> String {
    match cmd(c, line) {
        Ok(v) => panic!("{line} answered {v:?}, not an error"),
        Err(e) => e.to_string(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

/// One stream entry: its ID and fields.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: (u64, u64),
    fields: Vec<(String, String)>,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `op key [value]`, what the tests compare.
    fn short(&self) -> String {
        let mut s = format!(
            "{} {}",
            self.field("op").unwrap(),
            self.field("key").unwrap_or_default()
        );
        if let Some(v) = self.field("value") {
            s.push(' ');
            s.push_str(v);
        }
        if let Some(c) = self.field("cmd") {
            s.push(' ');
            s.push_str(c);
        }
        s
    }
}

fn parse_id(s: &str) -> (u64, u64) {
    let (ms, seq) = s.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        panic!("not an array: {v:?}")
    };
    items
        .iter()
        .map(|e| {
            let Value::Array(pair) = e else {
                panic!("not an entry: {e:?}")
            };
            let Value::Array(fv) = &pair[1] else {
                panic!("no fields: {e:?}")
            };
            Entry {
                id: parse_id(&text(&pair[0])),
                fields: fv.chunks(2).map(|p| (text(&p[0]), text(&p[1]))).collect(),
            }
        })
        .collect()
}

/// The entries of the first stream in an XREAD reply (RESP2: `[[key, entries], ...]`).
fn first_stream(reply: &Value) -> Vec<Entry> {
    let Value::Array(per_key) = reply else {
        panic!("XREAD answered {reply:?}")
    };
    let Value::Array(kv) = &per_key[0] else {
        panic!("{per_key:?}")
    };
    entries(&kv[1])
}

/// The stream key of the shard of `default` holding `key` (the one whose log has events on it).
fn stream_of(c: &mut redis::Connection, key: &str) -> String {
    let Value::Array(keys) = ok(c, "CHANGES SHARDS default") else {
        panic!("CHANGES SHARDS answered no array")
    };
    for k in keys.iter().map(text) {
        let found = entries(&ok(c, &format!("XRANGE {k} - +")));
        if found.iter().any(|e| e.field("key") == Some(key)) {
            return k;
        }
    }
    panic!("no shard logged {key}")
}

#[test]
fn a_shards_change_log_lists_every_change_in_order_as_a_redis_stream() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start();
    let mut c = s.client();
    let off = err(&mut c, "XRANGE __changes:default#0 - +");
    assert!(off.contains("are off"), "{off}");
    ok(&mut c, "SET {t}before 1");
    assert_eq!(ok(&mut c, "CHANGES CONFIG default on"), Value::Okay);

    ok(&mut c, "SET {t}a 1");
    ok(&mut c, "INCR {t}a");
    ok(&mut c, "SET {t}b x EX 100");
    ok(&mut c, "DEL {t}b");
    ok(&mut c, "DEL {t}nosuch");
    ok(&mut c, "HSET {t}h f v");
    ok(&mut c, "RPUSH {t}l x y");
    ok(&mut c, "MULTI");
    ok(&mut c, "SET {t}a 5");
    ok(&mut c, "DEL {t}a");
    ok(&mut c, "EXEC");

    let key = stream_of(&mut c, "{t}a");
    let all = entries(&ok(&mut c, &format!("XRANGE {key} - +")));
    let shorts: Vec<String> = all.iter().map(Entry::short).collect();
    assert_eq!(
        shorts,
        [
            "set {t}a 1",
            "incr {t}a 2",
            "set {t}b x",
            "del {t}b",
            "cmd {t}h hset",
            "cmd {t}l rpush",
            "set {t}a 5",
            "del {t}a",
        ],
        "what changed before the log was on, and what changed nothing, is not there"
    );
    assert_eq!(all[1].field("delta"), Some("1"), "{:?}", all[1]);
    assert!(all[2].field("expire_at_ms").is_some(), "{:?}", all[2]);
    assert_eq!(all[4].field("type"), Some("hash"));
    let args: Vec<&str> = all[5]
        .fields
        .iter()
        .filter(|(k, _)| k == "arg")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(args, ["{t}l", "x", "y"]);
    for pair in all.windows(2) {
        assert!(pair[0].id < pair[1].id, "IDs increase: {pair:?}");
        let index = |e: &Entry| e.field("index").unwrap().parse::<u64>().unwrap();
        assert!(index(&pair[0]) <= index(&pair[1]), "log order: {pair:?}");
    }
    // The transaction's two events are one entry's: the same log index.
    assert_eq!(all[6].field("index"), all[7].field("index"));

    // XREVRANGE, COUNT, exclusive starts, XLEN.
    let rev = entries(&ok(&mut c, &format!("XREVRANGE {key} + -")));
    let mut back = all.clone();
    back.reverse();
    assert_eq!(rev, back);
    let two = entries(&ok(&mut c, &format!("XRANGE {key} - + COUNT 2")));
    assert_eq!(two, all[..2]);
    // Redis's edges: COUNT 0 (or less) is the null reply for XRANGE, no limit for XREAD.
    assert_eq!(ok(&mut c, &format!("XRANGE {key} - + COUNT 0")), Value::Nil);
    let unlimited = ok(&mut c, &format!("XREAD COUNT 0 STREAMS {key} 0"));
    assert_eq!(first_stream(&unlimited), all);
    let (ms, seq) = all[1].id;
    let after = entries(&ok(&mut c, &format!("XRANGE {key} ({ms}-{seq} +")));
    assert_eq!(after, all[2..]);
    assert_eq!(
        ok(&mut c, &format!("XLEN {key}")),
        Value::Int(all.len() as i64)
    );

    // XREAD from an ID (exclusive), and XREAD BLOCK woken by a write through another
    // connection.
    let read = ok(&mut c, &format!("XREAD COUNT 3 STREAMS {key} {ms}-{seq}"));
    let Value::Array(per_key) = &read else {
        panic!("XREAD answered {read:?}")
    };
    assert!(matches!(&per_key[0], Value::Array(kv) if text(&kv[0]) == key));
    assert_eq!(first_stream(&read), all[2..5]);
    assert_eq!(
        ok(&mut c, &format!("XREAD STREAMS {key} $")),
        Value::Nil,
        "nothing after the last ID"
    );
    let url = s.redis_url();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut w = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(&mut w, "SET {t}late now");
    });
    let started = Instant::now();
    let woke = ok(&mut c, &format!("XREAD BLOCK 20000 STREAMS {key} $"));
    writer.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "woken by the write"
    );
    assert_eq!(
        first_stream(&woke)
            .iter()
            .map(Entry::short)
            .collect::<Vec<_>>(),
        ["set {t}late now"]
    );
    assert_eq!(
        ok(&mut c, &format!("XREAD BLOCK 50 STREAMS {key} $")),
        Value::Nil,
        "a block that runs out answers the null reply"
    );

    // FLUSHDB keeps the log on and says so with a `flush` event (no key); later changes keep
    // coming with larger IDs.
    let last = entries(&ok(&mut c, &format!("XREVRANGE {key} + - COUNT 1")))[0].id;
    ok(&mut c, "FLUSHDB");
    ok(&mut c, "SET {t}after 1");
    let tail = entries(&ok(
        &mut c,
        &format!("XRANGE {key} ({}-{} +", last.0, last.1),
    ));
    assert_eq!(
        tail.iter().map(Entry::short).collect::<Vec<_>>(),
        ["flush ", "set {t}after 1"]
    );
    assert_eq!(tail[0].field("key"), None);

    // A transaction over two keys of different hash tags (two shards when they land apart:
    // then each shard logs its part at the commit).
    ok(&mut c, "MULTI");
    ok(&mut c, "SET {p}x 1");
    ok(&mut c, "SET {q}y 2");
    ok(&mut c, "EXEC");
    for (k, v) in [("{p}x", "1"), ("{q}y", "2")] {
        let stream = stream_of(&mut c, k);
        let found = entries(&ok(&mut c, &format!("XRANGE {stream} - +")));
        let e = found.iter().find(|e| e.field("key") == Some(k)).unwrap();
        assert_eq!(e.short(), format!("set {k} {v}"));
    }

    // Read-only, not built yet, unknown: clear errors.
    assert!(err(&mut c, &format!("XADD {key} * f v")).contains("read-only"));
    assert!(err(&mut c, "XRANGE __changes:nosuch#0 - +").contains("nosuch"));
    assert!(err(&mut c, "XRANGE __changes:default#99 - +").contains("no shard 99"));
    assert!(err(&mut c, "XRANGE plainkey - +").contains("no stream type"));

    // The CLI follows the same streams.
    let tail = std::process::Command::new(env!("CARGO_BIN_EXE_capdb"))
        .args(["changes", "tail", "default", "--from", "0", "--count", "2"])
        .args(["--prefix", "{t}a", "--resp", &s.resp.to_string()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&tail.stdout);
    assert!(
        tail.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&tail.stderr)
    );
    let lines: Vec<&str> = printed
        .lines()
        .map(|l| l.split_once(' ').unwrap().1)
        .map(|rest| rest.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(lines, ["set {t}a 1", "incr {t}a 2"], "{printed}");
    // From now on (`$`), idle for longer than a client's default timeout, then woken.
    let tail = std::process::Command::new(env!("CARGO_BIN_EXE_capdb"))
        .args(["changes", "tail", "default", "--count", "1", "--json"])
        .args(["--resp", &s.resp.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2_000));
    ok(&mut c, "RPUSH {t}tail x y");
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success());
    let event: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(event["key"], "{t}tail");
    assert_eq!(event["args"], serde_json::json!(["{t}tail", "x", "y"]));

    // Off deletes the log.
    ok(&mut c, "CHANGES CONFIG default off");
    assert!(err(&mut c, &format!("XRANGE {key} - +")).contains("are off"));
}

#[test]
fn every_node_serves_the_same_ids_for_a_shards_changes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let nodes = common::start_founders(3, |_| Vec::new());
    let mut c1 = nodes[0].client();
    ok(&mut c1, "CHANGES CONFIG default on");
    for i in 0..20 {
        // Through every node in turn: followers forward, the log is one.
        let mut c = nodes[i % 3].client();
        ok(&mut c, &format!("SET {{s}}k{i} v{i}"));
    }
    let key = stream_of(&mut c1, "{s}k0");
    let first = ok(&mut c1, &format!("XRANGE {key} - +"));
    let events = entries(&first);
    assert_eq!(events.len(), 20, "{events:?}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.short(), format!("set {{s}}k{i} v{i}"));
    }
    // A reader blocked on node 2 wakes on a write through node 3.
    let last = events.last().unwrap().id;
    let url = nodes[2].redis_url();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut w = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(&mut w, "SET {s}late now");
    });
    let mut c2 = nodes[1].client();
    let woke = ok(
        &mut c2,
        &format!("XREAD BLOCK 20000 STREAMS {key} {}-{}", last.0, last.1),
    );
    writer.join().unwrap();
    assert_eq!(
        first_stream(&woke)
            .iter()
            .map(Entry::short)
            .collect::<Vec<_>>(),
        ["set {s}late now"]
    );
    let first = ok(&mut c1, &format!("XRANGE {key} - +"));
    for n in &nodes[1..] {
        let mut c = n.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = ok(&mut c, &format!("XRANGE {key} - +"));
            if got == first {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {:?} answered {got:?}",
                n.resp
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads an SSE response from a raw socket until `want` events arrived: their (id, data).
fn sse_events(
    addr: std::net::SocketAddr,
    path: &str,
    last_id: Option<&str>,
    want: usize,
) -> Vec<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    if let Some(id) = last_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        let events: Vec<(String, String)> = text
            .split("\n\n")
            .filter_map(|block| {
                let id = block.lines().find_map(|l| l.strip_prefix("id: "))?;
                let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((id.trim().to_string(), data.trim().to_string()))
            })
            .collect();
        if events.len() >= want {
            return events;
        }
        let n = s
            .read(&mut buf)
            .expect("the stream stayed open and delivered");
        assert!(n > 0, "the stream ended early: {text}");
        raw.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_shards_changes_over_http_as_ndjson_and_server_sent_events() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start();
    let mut c = s.client();
    let (code, body) = common::http(s.http, "GET", "/v1/changes/default/0", &[], None).unwrap();
    assert_eq!(code, 400, "changes off: {}", String::from_utf8_lossy(&body));
    ok(&mut c, "CHANGES CONFIG default on");
    ok(&mut c, "SET {h}a 1");
    ok(&mut c, "SET {h}b 2");
    ok(&mut c, "HSET {h}h f v");
    let key = stream_of(&mut c, "{h}a");
    let shard: u32 = key.rsplit('#').next().unwrap().parse().unwrap();
    let path = format!("/v1/changes/default/{shard}");

    let (code, body) = common::http(s.http, "GET", &path, &[], None).unwrap();
    assert_eq!(code, 200);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ours: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["key"].as_str().is_some_and(|k| k.starts_with("{h}")))
        .collect();
    assert_eq!(ours.len(), 3, "{lines:?}");
    assert_eq!(
        (ours[0]["op"].as_str(), ours[0]["value"].as_str()),
        (Some("set"), Some("1"))
    );
    assert_eq!(ours[2]["cmd"], "hset");
    assert_eq!(ours[2]["args"], serde_json::json!(["{h}h", "f", "v"]));
    // The same IDs as XRANGE.
    let xrange = entries(&ok(&mut c, &format!("XRANGE {key} - +")));
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    let xids: Vec<String> = xrange
        .iter()
        .map(|e| format!("{}-{}", e.id.0, e.id.1))
        .collect();
    assert_eq!(ids, xids);
    // After an ID, with a limit.
    let (_, body) = common::http(
        s.http,
        "GET",
        &format!("{path}?after={}&limit=1", ids[0]),
        &[],
        None,
    )
    .unwrap();
    let next: serde_json::Value =
        serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(next["id"].as_str(), Some(ids[1].as_str()));

    // SSE: everything from the start, then what comes while it is open.
    let url = s.redis_url();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let mut w = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(&mut w, "SET {h}live yes");
    });
    let events = sse_events(s.http, &path, None, ids.len() + 1);
    writer.join().unwrap();
    assert_eq!(
        events[..ids.len()]
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    let live: serde_json::Value = serde_json::from_str(&events[ids.len()].1).unwrap();
    assert_eq!(live["key"], "{h}live");
    // Resuming with Last-Event-ID starts right after it.
    let resumed = sse_events(s.http, &path, Some(&ids[1]), 1);
    assert_eq!(resumed[0].0, ids[2]);
}

#[test]
fn retention_trims_the_log_and_a_reader_below_it_is_told_where_it_begins() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start();
    let mut c = s.client();
    assert!(err(&mut c, "CHANGES CONFIG default on RETENTION-MS 0").contains("at least 1"));
    ok(&mut c, "CHANGES CONFIG default on RETENTION-MS 1000");
    ok(&mut c, "SET {r}a 1");
    let key = stream_of(&mut c, "{r}a");
    // The shard's leader trims rows past the retention (looked for every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        // From a position (`-` would begin at whatever is held).
        match cmd(&mut c, &format!("XRANGE {key} 1 +")) {
            Err(e) if e.to_string().contains("HISTORYLOST") => break e.to_string(),
            Ok(v) => assert!(Instant::now() < deadline, "never trimmed: {v:?}"),
            Err(e) => panic!("XRANGE: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(ok(&mut c, &format!("XLEN {key}")), Value::Int(0));
    let shard = key.rsplit('#').next().unwrap();
    let (code, body) = common::http(
        s.http,
        "GET",
        &format!("/v1/changes/default/{shard}?after=1-0"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(code, 410, "{}", String::from_utf8_lossy(&body));
    // A reader from the start gets whatever is held (nothing yet).
    assert_eq!(
        ok(&mut c, &format!("XRANGE {key} - +")),
        Value::Array(Vec::new())
    );
    assert_eq!(common::json(&body)["error"]["code"], "history_lost");
    // `CHANGES LAST` still knows the last ID (what `$` means): reading after it is fine.
    let Value::Array(lasts) = ok(&mut c, "CHANGES LAST default") else {
        panic!("CHANGES LAST answered no array")
    };
    let shard_no: usize = shard.parse().unwrap();
    let last = text(&lasts[shard_no]);
    assert_ne!(last, "0-0");
    assert_eq!(
        ok(&mut c, &format!("XREAD STREAMS {key} {last}")),
        Value::Nil
    );
    // Reading backwards asks for the newest: it ends where the log begins, no error.
    assert_eq!(
        ok(&mut c, &format!("XREVRANGE {key} + - COUNT 1")),
        Value::Array(Vec::new())
    );
    let oldest = lost.rsplit("read from ").next().unwrap().trim().to_string();
    ok(&mut c, "SET {r}b 2");
    let after = entries(&ok(&mut c, &format!("XRANGE {key} {oldest} +")));
    assert_eq!(
        after.iter().map(Entry::short).collect::<Vec<_>>(),
        ["set {r}b 2"],
        "{lost}"
    );

    // A group created at a position that went: it reads on from the oldest held, as in
    // Redis.
    ok(&mut c, "XGROUP CREATE __changes:default late 0");
    let read = first_stream(&ok(
        &mut c,
        "XREADGROUP GROUP late c1 STREAMS __changes:default >",
    ));
    assert_eq!(
        read.iter().map(Entry::short).collect::<Vec<_>>(),
        ["set {r}b 2"]
    );

    // XINFO STREAM says what is held and where the retention cut, with Redis's fields.
    let info = xinfo_stream(&mut c, &key);
    let held = format!("{}-{}", after[0].id.0, after[0].id.1);
    assert_eq!(info["length"], Value::Int(1), "{info:?}");
    assert_eq!(text(&info["last-generated-id"]), held);
    assert_eq!(text(&info["recorded-first-entry-id"]), held);
    assert_eq!(
        entries(&Value::Array(vec![info["first-entry"].clone()]))[0],
        after[0]
    );
    assert_eq!(
        entries(&Value::Array(vec![info["last-entry"].clone()]))[0],
        after[0]
    );
    let cut = parse_id(&text(&info["max-deleted-entry-id"]));
    assert!(cut > (0, 0) && cut < parse_id(&oldest), "{info:?}");
    assert_eq!(info["groups"], Value::Int(0));
    let merged = xinfo_stream(&mut c, "__changes:default");
    assert_eq!(merged["groups"], Value::Int(1));
    assert_eq!(merged["length"], Value::Int(1), "{merged:?}");
    assert_eq!(
        entries(&Value::Array(vec![merged["first-entry"].clone()]))[0].short(),
        "set {r}b 2"
    );
    assert!(merged.contains_key("resolved-id"));
    assert!(err(&mut c, "XINFO STREAM __changes:default FULL").contains("not supported"));
    // A prefix stream over a trimmed log counts and reads back what is held.
    assert_eq!(ok(&mut c, "XLEN __changes:default:{r}"), Value::Int(1));
    let newest = entries(&ok(&mut c, "XREVRANGE __changes:default:{r} + - COUNT 5"));
    assert_eq!(
        newest.iter().map(Entry::short).collect::<Vec<_>>(),
        ["set {r}b 2"]
    );
}

/// `XINFO STREAM key` (RESP2: field, value, ...) as a map.
fn xinfo_stream(c: &mut redis::Connection, key: &str) -> std::collections::HashMap<String, Value> {
    let Value::Array(flat) = ok(c, &format!("XINFO STREAM {key}")) else {
        panic!("XINFO STREAM answered no array")
    };
    flat.chunks(2)
        .map(|p| (text(&p[0]), p[1].clone()))
        .collect()
}

/// The leader of the shard of `default` holding `key`, per node `via`'s cluster view.
fn leader_of(via: &Server, key: &str) -> u64 {
    let mut c = via.client();
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut c)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = common::http(via.http, "GET", "/v1/cluster", &[], None).unwrap();
        let st = common::json(&body);
        let leader = st["keyspaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["name"] == "default")
            .flat_map(|ks| ks["shards"].as_array().unwrap().iter())
            .find(|s| s["slots"][0].as_u64() <= Some(slot) && Some(slot) <= s["slots"][1].as_u64())
            .and_then(|s| s["leader"].as_u64());
        if let Some(l) = leader {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader for {key}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_consumer_sees_every_acknowledged_write_once_across_a_leader_kill() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut nodes = common::start_founders(3, |_| Vec::new());
    let leader = leader_of(&nodes[0], "{f}k") as usize;
    let followers: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    let (writer_node, reader_node) = (followers[0], followers[1]);
    let mut w = nodes[writer_node - 1].client();
    ok(&mut w, "CHANGES CONFIG default on");
    ok(&mut w, "SET {f}probe 0");
    let key = stream_of(&mut w, "{f}probe");
    let shard: usize = key.rsplit('#').next().unwrap().parse().unwrap();
    let Value::Array(lasts) = ok(&mut w, "CHANGES LAST default") else {
        panic!("CHANGES LAST answered no array")
    };
    let start = text(&lasts[shard]);

    // The consumer: follows the shard's stream through the other follower, retrying a read
    // that fails (an election) from the same position, until it sees the end marker.
    let url = nodes[reader_node - 1].redis_url();
    let stream = key.clone();
    let consumer = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut from = start;
        let mut seen: Vec<Entry> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match cmd(
                &mut c,
                &format!("XREAD COUNT 500 BLOCK 1000 STREAMS {stream} {from}"),
            ) {
                Ok(Value::Nil) => {}
                Ok(reply) => {
                    for e in first_stream(&reply) {
                        from = format!("{}-{}", e.id.0, e.id.1);
                        let end = e.field("key") == Some("{f}end");
                        seen.push(e);
                        if end {
                            return seen;
                        }
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        panic!("the end marker never arrived; saw {} events", seen.len());
    });

    // The writer: each value once; an error leaves that write uncertain (never retried with
    // the same value, so a second copy in the stream would be the log's doing).
    let (mut acked, mut uncertain) = (Vec::new(), Vec::new());
    for i in 0..300 {
        if i == 100 {
            nodes[leader - 1].kill9();
        }
        let v = format!("v{i}");
        match cmd(&mut w, &format!("SET {{f}}k{i} {v}")) {
            Ok(_) => acked.push(v),
            Err(_) => {
                uncertain.push(v);
                std::thread::sleep(Duration::from_millis(50));
                w = nodes[writer_node - 1].client();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while cmd(&mut w, "SET {f}end 1").is_err() {
        assert!(
            Instant::now() < deadline,
            "the end marker was never written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = consumer.join().unwrap();

    assert!(seen.windows(2).all(|p| p[0].id < p[1].id), "IDs increase");
    let count = |v: &str| {
        seen.iter()
            .filter(|e| e.field("op") == Some("set") && e.field("value") == Some(v))
            .count()
    };
    for v in &acked {
        assert_eq!(count(v), 1, "acknowledged {v} appears exactly once");
    }
    for v in &uncertain {
        assert!(count(v) <= 1, "uncertain {v} appears at most once");
    }
    assert!(acked.len() >= 200, "most writes succeeded: {}", acked.len());
}

/// The merged stream of a 4-shard keyspace, followed while writers on every shard and
/// cross-shard transactions run: every acknowledged write once, each key's writes in order,
/// each transaction's events together and complete, the same entries as XRANGE and the HTTP
/// stream give afterwards, and a resolved ID that never goes back. The last write lands on
/// one shard while the others are idle: only their progress entries release it.
#[test]
fn the_merged_stream_orders_every_shard_with_transactions_together() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&["--default-shards", "4"]);
    let mut c = s.client();
    ok(&mut c, "CHANGES CONFIG default on");
    let start = text(&ok(&mut c, "CHANGES RESOLVED default"));
    assert_eq!(
        ok(&mut c, &format!("XRANGE __changes:default ({start} +")),
        Value::Array(Vec::new()),
        "nothing after the resolved ID yet"
    );

    let url = s.redis_url();
    let from = start.clone();
    let consumer = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let (mut from, mut seen) = (from, Vec::<Entry>::new());
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let reply = ok(
                &mut c,
                &format!("XREAD COUNT 50 BLOCK 2000 STREAMS __changes:default {from}"),
            );
            if reply == Value::Nil {
                continue;
            }
            for e in first_stream(&reply) {
                from = format!("{}-{}", e.id.0, e.id.1);
                let end = e.field("key") == Some("end");
                seen.push(e);
                if end {
                    return seen;
                }
            }
        }
        panic!("the end marker never arrived; saw {} events", seen.len());
    });

    // Writers: each owns its keys (so a key's order is its writer's), spread over shards.
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let url = s.redis_url();
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                for i in 0..40 {
                    if i % 5 == 0 {
                        // A transaction over keys of (most likely) two shards, one of them
                        // a key the plain writes also change.
                        let _: () = redis::pipe()
                            .atomic()
                            .set(format!("w{w}k{}", i % 8), i)
                            .ignore()
                            .set(format!("tx{w}_{i}"), i)
                            .ignore()
                            .query(&mut c)
                            .unwrap();
                    } else {
                        ok(&mut c, &format!("SET w{w}k{} {i}", i % 8));
                    }
                }
            })
        })
        .collect();
    let mut resolved = Vec::new();
    for w in writers {
        resolved.push(text(&ok(&mut c, "CHANGES RESOLVED default")));
        w.join().unwrap();
    }
    // Everything idle, then one write to one shard.
    std::thread::sleep(Duration::from_millis(300));
    ok(&mut c, "SET end 1");
    let seen = consumer.join().unwrap();
    resolved.push(text(&ok(&mut c, "CHANGES RESOLVED default")));

    assert!(seen.windows(2).all(|p| p[0].id < p[1].id), "IDs increase");
    let resolved: Vec<(u64, u64)> = resolved.iter().map(|r| parse_id(r)).collect();
    assert!(
        resolved.windows(2).all(|p| p[0] <= p[1]),
        "the resolved ID never goes back: {resolved:?}"
    );
    assert!(
        seen.iter().all(|e| e.id <= *resolved.last().unwrap()),
        "everything seen is at or below what is resolved afterwards"
    );
    // Every write once, each key's in its writer's order.
    for w in 0..3 {
        for k in 0..8 {
            let key = format!("w{w}k{k}");
            let values: Vec<u32> = seen
                .iter()
                .filter(|e| e.field("key") == Some(&key))
                .map(|e| e.field("value").unwrap().parse().unwrap())
                .collect();
            let written: Vec<u32> = (0..40).filter(|i| i % 8 == k).collect();
            assert_eq!(values, written, "{key}'s writes, once each, in order");
        }
    }
    // Transactions: both keys there once, and a cross-shard one's events side by side.
    let mut cross = 0;
    for w in 0..3 {
        for i in (0..40).step_by(5) {
            let (a, b) = (format!("w{w}k{}", i % 8), format!("tx{w}_{i}"));
            let value = i.to_string();
            let at: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    (e.field("key") == Some(&a) || e.field("key") == Some(&b))
                        && e.field("value") == Some(&value)
                })
                .map(|(n, _)| n)
                .collect();
            assert_eq!(at.len(), 2, "{a} and {b} once each");
            if let Some(txn) = seen[at[0]].field("txn") {
                cross += 1;
                assert_eq!(seen[at[1]].field("txn"), Some(txn), "one transaction");
                assert_eq!(at[1], at[0] + 1, "{a} and {b} arrive together");
                assert_eq!(seen[at[0]].id.0, seen[at[1]].id.0, "placed at one position");
            }
        }
    }
    assert!(cross > 0, "some transactions spanned two shards");
    assert!(
        seen.iter().all(|e| e.field("txn-groups").is_none()),
        "the merged stream keeps its internals to itself"
    );

    // The same entries again, by XRANGE and over HTTP.
    let last = format!(
        "{}-{}",
        seen.last().unwrap().id.0,
        seen.last().unwrap().id.1
    );
    let again = entries(&ok(
        &mut c,
        &format!("XRANGE __changes:default ({start} {last} COUNT 10000"),
    ));
    assert_eq!(again, seen, "XRANGE gives what XREAD gave");
    let newest = entries(&ok(
        &mut c,
        &format!("XREVRANGE __changes:default {last} ({start} COUNT 7"),
    ));
    let expect: Vec<Entry> = seen.iter().rev().take(7).cloned().collect();
    assert_eq!(newest, expect, "XREVRANGE gives the newest, newest first");
    let all_rev = entries(&ok(
        &mut c,
        &format!("XREVRANGE __changes:default {last} ({start}"),
    ));
    assert_eq!(all_rev.len(), seen.len());
    let (status, body) = common::http(
        s.http,
        "GET",
        &format!("/v1/changes/default?after={start}&limit=1000"),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let lines: Vec<serde_json::Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(common::json)
        .collect();
    let http_ids: Vec<String> = lines
        .iter()
        .filter_map(|l| l["id"].as_str().map(str::to_string))
        .collect();
    let ids: Vec<String> = seen
        .iter()
        .map(|e| format!("{}-{}", e.id.0, e.id.1))
        .collect();
    assert_eq!(http_ids, ids, "HTTP gives the same events");
    let progress = lines.last().unwrap()["progress"].as_str().unwrap();
    assert!(parse_id(progress) >= seen.last().unwrap().id, "{progress}");
    // Server-Sent Events resume after Last-Event-ID; once idle, they announce progress.
    let resume = &ids[9];
    let sse = sse_events(s.http, "/v1/changes/default", Some(resume), 5);
    let sse_ids: Vec<&str> = sse.iter().take(5).map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        sse_ids,
        ids[10..15].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let idle = sse_events(s.http, "/v1/changes/default", Some(ids.last().unwrap()), 1);
    assert!(idle[0].1.contains("progress"), "{idle:?}");
    assert!(parse_id(&idle[0].0) >= seen.last().unwrap().id);
}

/// The IDs of an XREADGROUP/XREAD reply's first stream (none for the null reply).
fn ids_of(reply: &Value) -> Vec<String> {
    if *reply == Value::Nil {
        return Vec::new();
    }
    first_stream(reply)
        .iter()
        .map(|e| format!("{}-{}", e.id.0, e.id.1))
        .collect()
}

/// Consumer groups: two consumers of one group through different nodes share the entries
/// (each once), acknowledgements and pending entries survive a kill -9 of the leader that
/// keeps them, a new consumer claims what a dead one held, and a blocked XREADGROUP wakes on
/// a write.
#[test]
fn consumer_groups_deliver_each_entry_once_and_survive_a_leader_kill() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut nodes = common::start_founders(3, |_| Vec::new());
    let leader = leader_of(&nodes[0], "{g}k") as usize;
    let others: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    let mut a = nodes[others[0] - 1].client();
    let mut b = nodes[others[1] - 1].client();
    let key = "__changes:default";
    ok(&mut a, "CHANGES CONFIG default on");
    assert_eq!(ok(&mut a, &format!("XGROUP CREATE {key} g $")), Value::Okay);
    assert!(err(&mut a, &format!("XGROUP CREATE {key} g $")).contains("BUSYGROUP"));
    let e = err(
        &mut a,
        &format!("XREADGROUP GROUP nosuch c STREAMS {key} >"),
    );
    assert!(
        e.contains("NOGROUP")
            && e.contains(
                "No such key '__changes:default' or consumer group 'nosuch' in XREADGROUP with GROUP option"
            ),
        "{e}"
    );
    for i in 0..20 {
        ok(&mut a, &format!("SET {{g}}k{i} {i}"));
    }

    // Two consumers through two nodes, in turns: every entry to exactly one of them.
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    loop {
        let ra = ids_of(&ok(
            &mut a,
            &format!("XREADGROUP GROUP g ca COUNT 3 STREAMS {key} >"),
        ));
        let rb = ids_of(&ok(
            &mut b,
            &format!("XREADGROUP GROUP g cb COUNT 3 STREAMS {key} >"),
        ));
        if ra.is_empty() && rb.is_empty() {
            break;
        }
        got_a.extend(ra);
        got_b.extend(rb);
    }
    let mut all: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort_by_key(|id| parse_id(id));
    all.dedup();
    assert_eq!(all.len(), got_a.len() + got_b.len(), "no entry twice");
    assert_eq!(all.len(), 20, "every entry once");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both consumers got some"
    );
    let acked = ok(&mut a, &format!("XACK {key} g {}", got_a.join(" ")));
    assert_eq!(acked, Value::Int(got_a.len() as i64));
    let Value::Array(summary) = ok(&mut a, &format!("XPENDING {key} g")) else {
        panic!("XPENDING answered no array")
    };
    assert_eq!(summary[0], Value::Int(got_b.len() as i64));

    // The leader keeping the group dies; its state is still there on the others.
    nodes[leader - 1].kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        match cmd(&mut a, &format!("XPENDING {key} g - + 100")) {
            Ok(Value::Array(rows)) => break rows,
            _ if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
                a = nodes[others[0] - 1].client();
            }
            other => panic!("XPENDING after the leader's death: {other:?}"),
        }
    };
    let pending_ids: Vec<String> = pending
        .iter()
        .map(|r| match r {
            Value::Array(f) => text(&f[0]),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        pending_ids, got_b,
        "cb's entries are still pending, in order"
    );
    // A new consumer claims what cb held (cb "died"), with the entries.
    let claimed = ok(&mut a, &format!("XAUTOCLAIM {key} g cc 0 0-0 COUNT 100"));
    let Value::Array(parts) = claimed else {
        panic!("XAUTOCLAIM answered {claimed:?}")
    };
    let claimed_ids: Vec<String> = entries(&parts[1])
        .iter()
        .map(|e| format!("{}-{}", e.id.0, e.id.1))
        .collect();
    assert_eq!(claimed_ids, got_b, "cc claims every entry cb held");
    assert_eq!(text(&parts[0]), "0-0", "nothing left to scan");
    // Its history shows them; acknowledging empties the list.
    let history = ids_of(&ok(
        &mut a,
        &format!("XREADGROUP GROUP g cc STREAMS {key} 0"),
    ));
    assert_eq!(history, got_b);
    let acked = ok(&mut a, &format!("XACK {key} g {}", got_b.join(" ")));
    assert_eq!(acked, Value::Int(got_b.len() as i64));
    let Value::Array(summary) = ok(&mut a, &format!("XPENDING {key} g")) else {
        panic!("XPENDING answered no array")
    };
    assert_eq!(summary[0], Value::Int(0));

    // Nothing old is delivered again; a blocked reader wakes on the next write.
    let url = nodes[others[1] - 1].redis_url();
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(
            &mut c,
            "XREADGROUP GROUP g ca COUNT 10 BLOCK 20000 STREAMS __changes:default >",
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    ok(&mut a, "SET {g}after 1");
    let woke = first_stream(&reader.join().unwrap());
    assert_eq!(
        woke.iter().map(Entry::short).collect::<Vec<_>>(),
        ["set {g}after 1"]
    );
    let Value::Array(groups) = ok(&mut a, &format!("XINFO GROUPS {key}")) else {
        panic!("XINFO GROUPS answered no array")
    };
    assert_eq!(groups.len(), 1);
}

/// Creates a keyspace over HTTP (`spec`: its JSON).
fn create_keyspace(http: std::net::SocketAddr, spec: &[u8]) {
    let (code, body) = common::http(http, "POST", "/v1/keyspaces", &[], Some(spec)).unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
}

fn id_text(e: &Entry) -> String {
    format!("{}-{}", e.id.0, e.id.1)
}

#[test]
fn a_key_prefix_stream_keeps_only_the_events_on_its_keys_with_the_whole_streams_ids() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&["--default-shards", "4"]);
    let mut c = s.client();
    ok(&mut c, "CHANGES CONFIG default on");
    let start = text(&ok(&mut c, "CHANGES RESOLVED default"));
    for i in 0..12 {
        ok(&mut c, &format!("SET user:{i} u{i}"));
        ok(&mut c, &format!("SET order:{i} o{i}"));
    }
    // A collection command on another key, and a transaction over both kinds of keys.
    ok(&mut c, "RPUSH order:list a b");
    ok(&mut c, "MULTI");
    ok(&mut c, "SET user:tx 1");
    ok(&mut c, "SET order:tx 2");
    ok(&mut c, "EXEC");
    let matching = |all: &[Entry]| -> Vec<Entry> {
        all.iter()
            .filter(|e| {
                e.fields
                    .iter()
                    .any(|(k, v)| (k == "key" || k == "also") && v.starts_with("user:"))
            })
            .cloned()
            .collect()
    };

    // The merged stream: the whole stream's entries on `user:` keys, same IDs, same fields.
    // The transaction's commit reaches its shards after EXEC answers: the merged stream
    // shows it once every part is logged.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = loop {
        let whole = entries(&ok(&mut c, &format!("XRANGE __changes:default ({start} +")));
        let want = matching(&whole);
        if want.len() == 13 {
            break want;
        }
        assert!(Instant::now() < deadline, "{whole:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let got = entries(&ok(
        &mut c,
        &format!("XRANGE __changes:default:user: ({start} +"),
    ));
    assert_eq!(got, want);
    // Paged with COUNT, each page continuing after the last: the same entries.
    let mut paged: Vec<Entry> = Vec::new();
    let mut from = format!("({start}");
    loop {
        let page = entries(&ok(
            &mut c,
            &format!("XRANGE __changes:default:user: {from} + COUNT 5"),
        ));
        let Some(last) = page.last() else { break };
        from = format!("({}", id_text(last));
        paged.extend(page);
    }
    assert_eq!(paged, want);
    let newest = entries(&ok(&mut c, "XREVRANGE __changes:default:user: + - COUNT 3"));
    let mut expect: Vec<Entry> = want[want.len() - 3..].to_vec();
    expect.reverse();
    assert_eq!(newest, expect);
    let len = ok(&mut c, "XLEN __changes:default:user:");
    let all_user = matching(&entries(&ok(&mut c, "XRANGE __changes:default - +")));
    assert_eq!(len, Value::Int(all_user.len() as i64));
    let info = xinfo_stream(&mut c, "__changes:default:user:");
    assert_eq!(info["length"], len);
    assert_eq!(
        entries(&Value::Array(vec![info["last-entry"].clone()]))[0],
        want[want.len() - 1]
    );

    // Each shard's stream filters the same way.
    let Value::Array(shards) = ok(&mut c, "CHANGES SHARDS default") else {
        panic!("CHANGES SHARDS answered no array")
    };
    let mut per_shard = 0;
    for k in shards.iter().map(text) {
        let whole = entries(&ok(&mut c, &format!("XRANGE {k} - +")));
        let got = entries(&ok(&mut c, &format!("XRANGE {k}:user: - +")));
        assert_eq!(got, matching(&whole), "{k}");
        assert_eq!(
            ok(&mut c, &format!("XLEN {k}:user:")),
            Value::Int(got.len() as i64)
        );
        per_shard += got.len();
    }
    assert_eq!(per_shard, all_user.len());

    // A prefix stream's consumer groups are its own: the whole stream's group of the same
    // name is another one, and each delivers what its stream holds.
    ok(
        &mut c,
        &format!("XGROUP CREATE __changes:default:user: g {start}"),
    );
    ok(
        &mut c,
        &format!("XGROUP CREATE __changes:default g {start}"),
    );
    let users = first_stream(&ok(
        &mut c,
        "XREADGROUP GROUP g c1 COUNT 1000 STREAMS __changes:default:user: >",
    ));
    assert_eq!(users, want);
    let everything = first_stream(&ok(
        &mut c,
        "XREADGROUP GROUP g c1 COUNT 1000 STREAMS __changes:default >",
    ));
    assert_eq!(matching(&everything), want);
    assert!(everything.len() > want.len());
    assert!(err(&mut c, "XGROUP CREATE __changes:default:user: g 0").contains("BUSYGROUP"));

    // A blocked XREAD on the filtered stream sleeps through other keys' writes and wakes on
    // a matching one.
    let resolved = text(&ok(&mut c, "CHANGES RESOLVED default"));
    let url = s.redis_url();
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(
            &mut c,
            &format!("XREAD BLOCK 60000 STREAMS __changes:default:user: {resolved}"),
        )
    });
    for i in 0..20 {
        ok(&mut c, &format!("SET order:late{i} x"));
    }
    std::thread::sleep(Duration::from_millis(300));
    ok(&mut c, "SET user:late 1");
    let woke = first_stream(&reader.join().unwrap());
    let keys: Vec<&str> = woke.iter().filter_map(|e| e.field("key")).collect();
    assert_eq!(keys, ["user:late"], "{woke:?}");

    // HTTP takes the prefix as a parameter: the same entries as NDJSON.
    let path = format!("/v1/changes/default?prefix=user:&after={start}");
    let (code, body) = common::http(s.http, "GET", &path, &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let ids: Vec<String> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l["id"].as_str().map(str::to_string))
        .collect();
    let mut expect: Vec<String> = want.iter().map(id_text).collect();
    expect.push(id_text(&woke[0]));
    assert_eq!(ids, expect);
    // Any bytes as hex ("user:"), the same entries; not both forms at once.
    let path = format!("/v1/changes/default?prefix_hex=757365723a&after={start}");
    let (code, hex_body) = common::http(s.http, "GET", &path, &[], None).unwrap();
    assert_eq!(code, 200);
    let hex_ids: Vec<String> = String::from_utf8_lossy(&hex_body)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(hex_ids, expect);
    let path = "/v1/changes/default?prefix=user:&prefix_hex=75";
    assert_eq!(common::http(s.http, "GET", path, &[], None).unwrap().0, 400);
    // A shard's filtered stream with nothing matching after a position says how far it
    // looked, so a client resuming there skips nothing and scans nothing again.
    let shard_key = stream_of(&mut c, "order:late0");
    let shard: u32 = shard_key.rsplit('#').next().unwrap().parse().unwrap();
    let newest = entries(&ok(&mut c, &format!("XREVRANGE {shard_key} + - COUNT 1")));
    let path = format!("/v1/changes/default/{shard}?prefix=nothing:&after={start}");
    let (code, body) = common::http(s.http, "GET", &path, &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [serde_json::json!({ "progress": id_text(&newest[0]) })]
    );

    // FLUSHDB: every shard logs a `flush` event (no key), which every prefix stream shows.
    ok(&mut c, "FLUSHDB");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = entries(&ok(
            &mut c,
            &format!("XRANGE __changes:default:user: ({} +", id_text(&woke[0])),
        ));
        let flushes: Vec<&str> = after
            .iter()
            .filter(|e| e.field("op") == Some("flush"))
            .filter_map(|e| e.field("shard"))
            .collect();
        if flushes.len() == 4 {
            assert!(after.iter().all(|e| e.field("key").is_none()), "{after:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{after:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_prev_on_each_event_carries_the_value_its_key_held_before() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&["--default-shards", "2"]);
    let mut c = s.client();
    assert!(err(&mut c, "CHANGES CONFIG default on PREV maybe").contains("yes or no"));
    ok(&mut c, "CHANGES CONFIG default on PREV yes");
    let start = text(&ok(&mut c, "CHANGES RESOLVED default"));
    ok(&mut c, "SET {a}k v1");
    ok(&mut c, "SET {a}k v2");
    ok(&mut c, "APPEND {a}k +");
    ok(&mut c, "SET {a}n 5");
    ok(&mut c, "INCR {a}n");
    ok(&mut c, "RPUSH {a}list x");
    ok(&mut c, "DEL {a}k");
    // A transaction over both shards: its commit's events carry what the keys held.
    ok(&mut c, "SET {b}t old");
    ok(&mut c, "MULTI");
    ok(&mut c, "SET {a}t new-a");
    ok(&mut c, "SET {b}t new-b");
    ok(&mut c, "EXEC");
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = entries(&ok(&mut c, &format!("XRANGE __changes:default ({start} +")));
        if seen.len() >= 10 {
            break seen;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let described: Vec<String> = seen
        .iter()
        .map(|e| format!("{} prev={}", e.short(), e.field("prev").unwrap_or("-")))
        .collect();
    assert_eq!(
        described[..8],
        [
            "set {a}k v1 prev=-",
            "set {a}k v2 prev=v1",
            "set {a}k v2+ prev=v2",
            "set {a}n 5 prev=-",
            "incr {a}n 6 prev=5",
            "cmd {a}list rpush prev=-",
            "del {a}k prev=v2+",
            "set {b}t old prev=-",
        ]
    );
    let mut txn: Vec<String> = described[8..].to_vec();
    txn.sort();
    assert_eq!(txn, ["set {a}t new-a prev=-", "set {b}t new-b prev=old"]);

    // An expiry's event carries the value that expired.
    ok(&mut c, "SET {a}e gone PX 50");
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        let all = entries(&ok(&mut c, &format!("XRANGE __changes:default ({start} +")));
        if let Some(e) = all
            .iter()
            .find(|e| e.field("op") == Some("expire") && e.field("key") == Some("{a}e"))
        {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "{all:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(expired.field("prev"), Some("gone"));

    // PREV no: the next events carry none.
    ok(&mut c, "CHANGES CONFIG default on PREV no");
    ok(&mut c, "SET {a}n 7");
    let key = stream_of(&mut c, "{a}n");
    let last = entries(&ok(&mut c, &format!("XREVRANGE {key} + - COUNT 1")));
    assert_eq!(last[0].short(), "set {a}n 7");
    assert_eq!(last[0].field("prev"), None);
}

#[test]
fn a_consumer_groups_position_holds_the_retention_back() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&["--default-shards", "2"]);
    let mut c = s.client();
    // A keyspace without groups, to see the retention at work.
    create_keyspace(s.http, br#"{"name":"plain","mode":"cp","shards":1}"#);
    for ks in ["default", "plain"] {
        ok(&mut c, &format!("CHANGES CONFIG {ks} on RETENTION-MS 1000"));
    }
    let start = text(&ok(&mut c, "CHANGES RESOLVED default"));
    // A group from the start holds everything held.
    ok(&mut c, "XGROUP CREATE __changes:default g0 0");
    ok(&mut c, "SET {p}a 1");
    ok(&mut c, "SET {q}b 2");
    let mut plain = s.client();
    ok(&mut plain, "SELECT plain");
    // The other keyspace's log is trimmed, entry after entry: the leaders looked, several
    // times, past the retention of the group's entries.
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..3 {
        ok(&mut plain, "SET x 1");
        let newest = entries(&ok(&mut c, "XREVRANGE __changes:plain#0 + - COUNT 1"));
        loop {
            let info = xinfo_stream(&mut c, "__changes:plain#0");
            if parse_id(&text(&info["max-deleted-entry-id"])) >= newest[0].id {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the plain keyspace's log was never trimmed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Meanwhile the group's entries stayed, on both shards.
    let from_start = first_stream(&ok(
        &mut c,
        "XREADGROUP GROUP g0 c1 COUNT 10 STREAMS __changes:default >",
    ));
    assert_eq!(
        from_start.iter().map(Entry::short).collect::<Vec<_>>(),
        ["set {p}a 1", "set {q}b 2"]
    );
    // A group at a position holds what follows it.
    ok(
        &mut c,
        &format!("XGROUP CREATE __changes:default g {start}"),
    );
    ok(&mut c, "XGROUP DESTROY __changes:default g0");
    let got = first_stream(&ok(
        &mut c,
        "XREADGROUP GROUP g c1 COUNT 10 STREAMS __changes:default >",
    ));
    assert_eq!(got, from_start);
    // Acknowledged and moved on, the group lets them go.
    for e in &got {
        ok(&mut c, &format!("XACK __changes:default g {}", id_text(e)));
    }
    ok(&mut c, "SET {p}later 3");
    let lost = |c: &mut redis::Connection, key: &str| match cmd(c, &format!("XRANGE {key} 1 +")) {
        Err(e) => e.to_string().contains("HISTORYLOST"),
        Ok(_) => false,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lost(&mut c, "__changes:default") {
        assert!(
            Instant::now() < deadline,
            "never trimmed after the group moved on"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_snapshot_then_its_events_then_the_stream_rebuild_the_keyspace_exactly() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start_with(&["--default-shards", "2"]);
    let mut c = s.client();
    let (code, _) = common::http(s.http, "GET", "/v1/changes/default/snapshot", &[], None).unwrap();
    assert_eq!(code, 400, "changes off");
    ok(&mut c, "CHANGES CONFIG default on");
    // Enough keys for several pages per shard, a collection and a deadline.
    for chunk in 0..6 {
        let mut pipe = redis::pipe();
        for i in 0..500 {
            pipe.set(format!("k{}", chunk * 500 + i), format!("v{i}"))
                .ignore();
        }
        let _: () = pipe.query(&mut c).unwrap();
    }
    ok(&mut c, "HSET h f1 a f2 b");
    ok(&mut c, "SET ttl x PX 600000");
    // Writes go on while the snapshot is read: single keys, counters, transactions.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = s.redis_url();
    let writing = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut n = 0u64;
        while !writing.load(std::sync::atomic::Ordering::Relaxed) || n < 200 {
            let k = (n * 7919) % 3000;
            match n % 4 {
                0 => {
                    ok(&mut c, &format!("SET k{k} w{n}"));
                }
                1 => {
                    ok(&mut c, &format!("INCR n{}", n % 5));
                }
                2 => {
                    ok(&mut c, &format!("DEL k{k}"));
                }
                _ => {
                    let _: () = redis::pipe()
                        .atomic()
                        .set(format!("k{k}"), format!("t{n}"))
                        .ignore()
                        .set(format!("k{}", (k + 1) % 3000), format!("t{n}"))
                        .ignore()
                        .query(&mut c)
                        .unwrap();
                }
            }
            n += 1;
        }
        ok(&mut c, "SET end 1");
    });
    std::thread::sleep(Duration::from_millis(100));
    let (code, body) =
        common::http(s.http, "GET", "/v1/changes/default/snapshot", &[], None).unwrap();
    assert_eq!(code, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut state: std::collections::BTreeMap<String, String> = Default::default();
    let apply = |state: &mut std::collections::BTreeMap<String, String>, e: &serde_json::Value| {
        let key = e["key"].as_str().unwrap().to_string();
        match e["op"].as_str().unwrap() {
            "set" | "incr" => {
                state.insert(key, e["value"].as_str().unwrap().to_string());
            }
            "del" | "expire" => {
                state.remove(&key);
            }
            other => panic!("unexpected {other}: {e}"),
        }
    };
    let (mut rows, mut replayed) = (0, 0);
    let mut resume = None;
    for l in &lines {
        assert!(l.get("error").is_none(), "{l}");
        if let Some(r) = l["resume"].as_str() {
            resume = Some(r.to_string());
        } else if l.get("op").is_some() {
            replayed += 1;
            if l["key"] != "h" {
                apply(&mut state, l);
            }
        } else {
            rows += 1;
            let key = l["key"].as_str().unwrap().to_string();
            match l["type"].as_str().unwrap() {
                "string" => {
                    state.insert(key, l["value"].as_str().unwrap().to_string());
                }
                "hash" => {
                    // Redis's DUMP payload: RESTORE gives the same hash back.
                    let payload: Vec<u8> = (0..l["dump_hex"].as_str().unwrap().len())
                        .step_by(2)
                        .map(|i| {
                            u8::from_str_radix(&l["dump_hex"].as_str().unwrap()[i..i + 2], 16)
                                .unwrap()
                        })
                        .collect();
                    let _: () = redis::cmd("RESTORE")
                        .arg("h2")
                        .arg(0)
                        .arg(payload)
                        .query(&mut c)
                        .unwrap();
                    assert_eq!(ok(&mut c, "HGETALL h2"), ok(&mut c, "HGETALL h"), "{l}");
                }
                other => panic!("unexpected type {other}"),
            }
            if l["key"] == "ttl" {
                assert!(l["expire_at_ms"].as_u64().is_some(), "{l}");
            }
        }
    }
    assert!(rows >= 2000, "{rows} rows");
    eprintln!("snapshot: {rows} rows, {replayed} events replayed");
    let mut from = resume.expect("no resume line");
    writer.join().unwrap();
    // Every string key as the keyspace holds it, once the writer is done.
    let held = |c: &mut redis::Connection| {
        let Value::Array(keys) = ok(c, "KEYS *") else {
            panic!("KEYS answered no array")
        };
        let mut actual: std::collections::BTreeMap<String, String> = Default::default();
        for k in keys.iter().map(text) {
            if k != "h" && k != "h2" {
                actual.insert(k.clone(), text(&ok(c, &format!("GET {k}"))));
            }
        }
        actual
    };
    // The stream after the resume position, until the rebuilt keyspace is the one held (a
    // transaction's commit may be logged after the writer's last answer).
    let deadline = Instant::now() + Duration::from_secs(60);
    let actual = loop {
        let reply = ok(
            &mut c,
            &format!("XREAD COUNT 1000 BLOCK 500 STREAMS __changes:default {from}"),
        );
        if reply != Value::Nil {
            for e in first_stream(&reply) {
                from = id_text(&e);
                let json: serde_json::Value = serde_json::Value::Object(
                    e.fields
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect(),
                );
                if e.field("key") != Some("h2") {
                    apply(&mut state, &json);
                }
            }
            continue;
        }
        let actual = held(&mut c);
        if actual == state || Instant::now() > deadline {
            break actual;
        }
    };
    let differ: Vec<String> = state
        .keys()
        .chain(actual.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| state.get(*k) != actual.get(*k))
        .map(|k| format!("{k}: rebuilt {:?}, held {:?}", state.get(k), actual.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "{replayed} events replayed; {} keys differ: {differ:?}",
        differ.len()
    );
}

#[test]
fn a_cache_keyspaces_changes_are_a_bounded_ring_on_each_node_with_explicit_gaps() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = Server::start();
    let mut c = s.client();
    create_keyspace(
        s.http,
        br#"{"name":"hot","mode":"cache","max_memory_bytes":1048576}"#,
    );
    assert!(err(&mut c, "XRANGE __changes:hot - +").contains("are off"));
    assert!(
        err(&mut c, "CHANGES CONFIG hot on RETENTION-MS 1000").contains("RETENTION-BYTES only")
    );
    ok(&mut c, "CHANGES CONFIG hot on");
    ok(&mut c, "SELECT hot");
    ok(&mut c, "SET a 1");
    ok(&mut c, "SET b 2");
    ok(&mut c, "HSET h f v");
    ok(&mut c, "INCR n");
    ok(&mut c, "DEL a");
    ok(&mut c, "SET t x PX 30");
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = entries(&ok(&mut c, "XRANGE __changes:hot - +"));
        if seen.iter().any(|e| e.field("op") == Some("expire")) {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the expiry never showed: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        seen.iter().map(Entry::short).collect::<Vec<_>>(),
        [
            "set a 1",
            "set b 2",
            "cmd h hset",
            "incr n 1",
            "del a",
            "set t x",
            "expire t"
        ]
    );
    assert!(seen.windows(2).all(|p| p[0].id < p[1].id));
    assert_eq!(ok(&mut c, "XLEN __changes:hot"), Value::Int(7));
    let last = text(&ok(&mut c, "CHANGES RESOLVED hot"));
    assert_eq!(parse_id(&last), seen[6].id);

    // XREAD BLOCK wakes on the next write.
    let url = s.redis_url();
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(
            &mut c,
            &format!("XREAD BLOCK 60000 STREAMS __changes:hot {last}"),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    ok(&mut c, "SET woke 1");
    let woke = first_stream(&reader.join().unwrap());
    assert_eq!(woke[0].short(), "set woke 1");

    // A small ring: the oldest go, and a reader from before them is told.
    ok(&mut c, "CHANGES CONFIG hot on RETENTION-BYTES 100");
    for i in 0..20 {
        ok(&mut c, &format!("SET k{i} 0123456789"));
    }
    let held = entries(&ok(&mut c, "XRANGE __changes:hot - +"));
    assert_eq!(held[0].field("op"), Some("gap"), "{held:?}");
    let gone = held[0].field("to").unwrap().to_string();
    assert_eq!(held[0].id, parse_id(&gone));
    assert!(held[1].id > held[0].id);
    assert_eq!(held.last().unwrap().short(), "set k19 0123456789");
    let from_start = first_stream(&ok(&mut c, "XREAD STREAMS __changes:hot 0"));
    assert_eq!(from_start[0].field("op"), Some("gap"));
    let after_gap = first_stream(&ok(&mut c, &format!("XREAD STREAMS __changes:hot {gone}")));
    assert_ne!(after_gap[0].field("op"), Some("gap"));

    // Eviction is an event too; consumer groups need a cp keyspace.
    ok(&mut c, "CONFIG SET maxmemory 2000");
    for i in 0..40 {
        ok(&mut c, &format!("SET big{i} {}", "x".repeat(100)));
    }
    let newest = entries(&ok(&mut c, "XREVRANGE __changes:hot + - COUNT 20"));
    assert!(
        newest.iter().any(|e| e.field("op") == Some("evict")),
        "{newest:?}"
    );
    assert!(err(&mut c, "XGROUP CREATE __changes:hot g 0").contains("need a cp keyspace"));
    // FLUSHDB empties the cache: one `flush` event says so.
    ok(&mut c, "FLUSHDB");
    let newest = entries(&ok(&mut c, "XREVRANGE __changes:hot + - COUNT 1"));
    assert_eq!(newest[0].field("op"), Some("flush"));
    // Off and on again: a reader from before is told changes went unrecorded.
    let before = id_text(&newest[0]);
    ok(&mut c, "CHANGES CONFIG hot off");
    ok(&mut c, "SET unseen 1");
    ok(&mut c, "CHANGES CONFIG hot on");
    ok(&mut c, "SET seen 1");
    let read = first_stream(&ok(
        &mut c,
        &format!("XREAD COUNT 1 STREAMS __changes:hot {before}"),
    ));
    assert_eq!(read.len(), 1, "COUNT counts the gap entry: {read:?}");
    assert_eq!(read[0].field("op"), Some("gap"));

    // HTTP serves the same ring.
    let (code, body) = common::http(s.http, "GET", "/v1/changes/hot?limit=5", &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("\"op\":"));
}

#[test]
fn each_ap_replica_logs_the_merges_that_changed_it_in_per_key_order() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let nodes = common::start_founders(3, |_| Vec::new());
    create_keyspace(
        nodes[0].http,
        br#"{"name":"events","mode":"ap","replication_factor":3}"#,
    );
    // Each node's replica logs its own changes: switched on node by node.
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in &nodes {
        let mut c = n.client();
        while cmd(&mut c, "CHANGES CONFIG events on").is_err() {
            assert!(
                Instant::now() < deadline,
                "the keyspace never reached a node"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(err(&mut nodes[0].client(), "CHANGES CONFIG events on PREV yes").contains("PREV"));
    let mut w = nodes[0].client();
    ok(&mut w, "SELECT events");
    ok(&mut w, "CONSISTENCY all");
    ok(&mut w, "SET k v1");
    ok(&mut w, "SET k v2");
    ok(&mut w, "INCR n");
    ok(&mut w, "INCR n");
    ok(&mut w, "SADD s a");
    ok(&mut w, "DEL k");
    // Every replica's stream holds every change, each key's in order.
    for n in &nodes {
        let mut c = n.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        let seen = loop {
            let seen = entries(&ok(&mut c, "XRANGE __changes:events - +"));
            if seen.iter().any(|e| e.short() == "del k") {
                break seen;
            }
            assert!(Instant::now() < deadline, "{seen:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let of = |key: &str| -> Vec<String> {
            seen.iter()
                .filter(|e| e.field("key") == Some(key))
                .map(Entry::short)
                .collect()
        };
        assert_eq!(of("k"), ["set k v1", "set k v2", "del k"], "{seen:?}");
        assert_eq!(of("n"), ["set n 1", "set n 2"], "{seen:?}");
        assert_eq!(of("s").len(), 1, "{seen:?}");
        assert!(seen.windows(2).all(|p| p[0].id < p[1].id));
    }
    // XREAD BLOCK on a replica wakes on a write through another node.
    let mut r = nodes[2].client();
    let last = text(&ok(&mut r, "CHANGES RESOLVED events"));
    let url = nodes[2].redis_url();
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        ok(
            &mut c,
            &format!("XREAD BLOCK 60000 STREAMS __changes:events {last}"),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    ok(&mut w, "SET later 1");
    let woke = first_stream(&reader.join().unwrap());
    assert_eq!(woke[0].short(), "set later 1");
    assert!(err(&mut r, "XGROUP CREATE __changes:events g 0").contains("need a cp keyspace"));
}
