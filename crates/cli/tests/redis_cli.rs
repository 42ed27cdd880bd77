//! The real `redis-cli` (Debian redis-tools) against the real binary.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{RedisServer, Server, need_tool};

fn cli(s: &Server, args: &[&str]) -> String {
    cli_at(s.resp.port(), args)
}

fn cli_at(port: u16, args: &[&str]) -> String {
    let out = Command::new(need_tool("redis-cli"))
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn redis_cli_commands_scan_and_numbered_keyspaces() {
    let s = Server::start();
    assert_eq!(cli(&s, &["PING"]), "PONG\n");
    assert_eq!(cli(&s, &["SET", "greeting", "hello world"]), "OK\n");
    assert_eq!(cli(&s, &["GET", "greeting"]), "hello world\n");
    assert_eq!(cli(&s, &["INCRBY", "n", "5"]), "5\n");
    assert_eq!(cli(&s, &["GET", "missing"]), "\n");
    assert!(cli(&s, &["FOO"]).contains("unknown command 'FOO'"));
    assert!(cli(&s, &["INFO"]).contains("# Keyspace"));
    for i in 0..50 {
        cli(&s, &["SET", &format!("scan:{i}"), "x"]);
    }
    let keys = cli(&s, &["--scan", "--pattern", "scan:*"]);
    assert_eq!(keys.lines().count(), 50, "{keys}");
    // -n N selects the keyspace named N.
    let (status, _) = common::http(
        s.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"2","mode":"ap"}"#),
    )
    .unwrap();
    assert_eq!(status, 201);
    assert_eq!(cli(&s, &["-n", "2", "SET", "greeting", "other"]), "OK\n");
    assert_eq!(cli(&s, &["-n", "2", "GET", "greeting"]), "other\n");
    assert_eq!(cli(&s, &["GET", "greeting"]), "hello world\n");
    let hello = cli(&s, &["-3", "HELLO", "3"]);
    assert!(hello.lines().any(|l| l.contains("proto")), "{hello}");
}

#[test]
fn redis_cli_pipe_mode_bulk_loads() {
    let s = Server::start();
    let mut input = Vec::new();
    for i in 0..5_000 {
        let (k, v) = (format!("bulk:{i}"), format!("value-{i}"));
        input.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    let mut child = Command::new(need_tool("redis-cli"))
        .args(["-p", &s.resp.port().to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("errors: 0, replies: 5000"), "{text}");
    assert_eq!(cli(&s, &["DBSIZE"]), "5000\n");
    assert_eq!(cli(&s, &["GET", "bulk:4999"]), "value-4999\n");
}

/// Every data type through the real `redis-cli`, in every keyspace mode, printed exactly as
/// redis-cli prints the same commands against a real redis-server. Replies whose order Redis
/// leaves undefined (HGETALL, SMEMBERS, ...) are compared as sorted lines.
#[test]
fn redis_cli_shows_every_type_as_it_does_against_redis() {
    let mut redis_server = RedisServer::start_with(&[]);
    drop(redis_server.client());
    let s = Server::start();
    for (name, mode) in [("1", "cache"), ("2", "ap")] {
        let body = format!(r#"{{"name":"{name}","mode":"{mode}"}}"#);
        let (status, _) =
            common::http(s.http, "POST", "/v1/keyspaces", &[], Some(body.as_bytes())).unwrap();
        assert_eq!(status, 201);
    }
    // (command, whether its output's order is undefined)
    let script: &[(&[&str], bool)] = &[
        (
            &["HSET", "user:1", "name", "ada", "lang", "rust", "age", "36"],
            false,
        ),
        (&["HGET", "user:1", "name"], false),
        (&["HINCRBY", "user:1", "age", "1"], false),
        (&["HGETALL", "user:1"], true),
        (&["HDEL", "user:1", "lang", "nope"], false),
        (&["HLEN", "user:1"], false),
        (&["RPUSH", "queue", "a", "b", "c", "d"], false),
        (&["LPUSH", "queue", "z"], false),
        (&["LRANGE", "queue", "0", "-1"], false),
        (&["LPOP", "queue", "2"], false),
        (&["LINSERT", "queue", "BEFORE", "c", "bb"], false),
        (&["LRANGE", "queue", "0", "-1"], false),
        (&["SADD", "tags", "db", "rust", "redis"], false),
        (&["SISMEMBER", "tags", "rust"], false),
        (&["SMEMBERS", "tags"], true),
        (&["SREM", "tags", "redis"], false),
        (&["SCARD", "tags"], false),
        (
            &["ZADD", "board", "10", "ada", "7", "bob", "12", "cy"],
            false,
        ),
        (&["ZRANGE", "board", "0", "-1", "WITHSCORES"], false),
        (&["ZINCRBY", "board", "0.5", "bob"], false),
        (&["ZREVRANK", "board", "bob"], false),
        (
            &[
                "ZRANGE", "board", "(7", "+inf", "BYSCORE", "LIMIT", "0", "2",
            ],
            false,
        ),
        (&["PFADD", "visitors", "a", "b", "c"], false),
        (&["PFCOUNT", "visitors"], false),
        (&["TYPE", "board"], false),
        (&["GET", "board"], false),
        (&["EXPIRE", "user:1", "100", "NX"], false),
        (&["TTL", "user:1"], false),
        (&["DEL", "queue", "tags"], false),
        (&["EXISTS", "queue", "tags", "board"], false),
    ];
    let run = |port: u16, db: &str| -> Vec<String> {
        let _ = cli_at(port, &["-n", db, "FLUSHDB"]);
        script
            .iter()
            .map(|(args, unordered)| {
                let mut all = vec!["-n", db];
                all.extend_from_slice(args);
                let out = cli_at(port, &all);
                if *unordered {
                    let mut lines: Vec<&str> = out.lines().collect();
                    lines.sort();
                    lines.join("\n")
                } else {
                    out
                }
            })
            .collect()
    };
    let theirs = run(redis_server.port, "0");
    for db in ["0", "1", "2"] {
        let ours = run(s.resp.port(), db);
        for ((args, _), (o, t)) in script.iter().zip(ours.iter().zip(&theirs)) {
            assert_eq!(o, t, "db {db}: redis-cli {args:?}");
        }
    }
}

#[test]
fn redis_cli_follows_a_keyspaces_change_stream() {
    let s = Server::start_with(&["--default-shards", "2"]);
    assert_eq!(cli(&s, &["CHANGES", "CONFIG", "default", "on"]), "OK\n");
    // A blocked XREAD, as a user types it, wakes on the next write.
    let reader = Command::new(need_tool("redis-cli"))
        .args(["-p", &s.resp.port().to_string()])
        .args([
            "XREAD",
            "BLOCK",
            "30000",
            "STREAMS",
            "__changes:default",
            "$",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(cli(&s, &["SET", "watched", "v1"]), "OK\n");
    let out = reader.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines[0], "__changes:default", "{printed}");
    for expected in ["op", "set", "key", "watched", "value", "v1"] {
        assert!(lines.contains(&expected), "{expected} in {printed}");
    }
    // XRANGE, XLEN and XINFO STREAM read the same stream.
    let range = cli(&s, &["XRANGE", "__changes:default", "-", "+"]);
    assert!(range.lines().any(|l| l == "watched"), "{range}");
    assert_eq!(cli(&s, &["XLEN", "__changes:default"]), "1\n");
    let info = cli(&s, &["XINFO", "STREAM", "__changes:default"]);
    assert!(info.lines().any(|l| l == "resolved-id"), "{info}");
    assert!(
        cli(&s, &["XADD", "__changes:default", "*", "f", "v"]).contains("read-only"),
        "writes are refused"
    );
}
