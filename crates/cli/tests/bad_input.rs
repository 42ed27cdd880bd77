//! Bad input gets a clear error, never a panic, hang or unbounded allocation, and every other
//! client keeps being served.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Server, http, json, raw_resp};
use redis::{Commands, RedisResult};

fn still_serving(s: &Server) {
    let mut c = s.client();
    assert_eq!(redis::cmd("PING").query::<String>(&mut c).unwrap(), "PONG");
    let _: () = c.set("alive", "yes").unwrap();
    assert_eq!(c.get::<_, String>("alive").unwrap(), "yes");
}

#[test]
fn malformed_resp_gets_a_protocol_error_and_only_that_connection_closes() {
    let s = Server::start();
    let mut bystander = s.client();
    for (bad, expect) in [
        (&b"*1\r\n:3\r\n"[..], "Protocol error: expected '$'"),
        (b"*x\r\n", "Protocol error: invalid multibulk length"),
        (b"*1\r\n$-7\r\n", "Protocol error: invalid bulk length"),
        (
            b"*1\r\n$3\r\nGETxx",
            "Protocol error: bulk string not terminated",
        ),
        (
            b"*99999999999\r\n",
            "Protocol error: invalid multibulk length",
        ),
        (b"*1\r\n$999999999999\r\n", "Protocol error"),
    ] {
        let reply =
            String::from_utf8_lossy(&raw_resp(s.resp, bad, Duration::from_secs(5))).to_string();
        assert!(
            reply.starts_with("-ERR ") && reply.contains(expect),
            "{bad:?} -> {reply:?}"
        );
    }
    // A too-long inline line and a too-long header line.
    let reply = raw_resp(s.resp, &vec![b'a'; 70 * 1024], Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&reply).contains("too big inline request"));
    let mut long_header = b"*1\r\n$".to_vec();
    long_header.extend(vec![b'9'; 100]);
    let reply = raw_resp(s.resp, &long_header, Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&reply).contains("Protocol error"));
    // Commands before the garbage in the same packet are answered first.
    let reply = raw_resp(s.resp, b"PING\r\n*1\r\n:1\r\n", Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&reply).starts_with("+PONG\r\n-ERR Protocol error"));
    // Inline commands from a terminal work.
    let reply = raw_resp(
        s.resp,
        b"SET inline value\r\nGET inline\r\nQUIT\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(&reply[..], b"+OK\r\n$5\r\nvalue\r\n+OK\r\n");
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut bystander).unwrap(),
        "PONG"
    );
    still_serving(&s);
}

#[test]
fn truncated_frames_and_vanishing_clients_do_not_disturb_others() {
    let s = Server::start();
    let mut bystander = s.client();
    let mut conns = Vec::new();
    for i in 0..50 {
        let mut c = TcpStream::connect(s.resp).unwrap();
        // Half a command, including a declared-but-never-sent large value.
        let partial: &[u8] = match i % 3 {
            0 => b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nabc",
            1 => b"*2\r\n$3\r\nGET",
            _ => b"GET half-an-inline-comm",
        };
        c.write_all(partial).unwrap();
        conns.push(c);
    }
    assert_eq!(
        redis::cmd("PING").query::<String>(&mut bystander).unwrap(),
        "PONG"
    );
    drop(conns); // every one of them vanishes mid-frame
    std::thread::sleep(Duration::from_millis(200));
    let _: () = bystander.set("k", "v").unwrap();
    assert_eq!(
        bystander.get::<_, String>("k").unwrap(),
        "v",
        "a half-sent SET must not have applied"
    );
    let (_, metrics) = http(s.http, "GET", "/metrics", &[], None).unwrap();
    assert!(
        String::from_utf8_lossy(&metrics).contains("capdb_connections 1"),
        "vanished clients are cleaned up"
    );
    still_serving(&s);
}

#[test]
fn random_bytes_never_crash_the_server() {
    let s = Server::start();
    // A fixed-seed xorshift so a failure can be replayed.
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let len = (next() % 512) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half of the cases start like a real frame, to get past the first check.
        if next() % 2 == 0 && !bytes.is_empty() {
            bytes[0] = b'*';
        }
        raw_resp(s.resp, &bytes, Duration::from_millis(50));
    }
    still_serving(&s);
}

#[test]
fn oversized_keys_values_and_frames_are_refused() {
    let s = Server::start_with(&["--value-bytes-max", "1024", "--frame-bytes-max", "70000"]);
    let mut c = s.client();
    let e: RedisResult<()> = c.set("k", "x".repeat(2000));
    let msg = e.unwrap_err().to_string();
    assert!(
        msg.contains("value is 2000 bytes, over the limit of 1024 bytes"),
        "{msg}"
    );
    let e: RedisResult<()> = c.set("k".repeat(65 * 1024), "v");
    assert!(e.unwrap_err().to_string().contains("key is 66560 bytes"));
    let _: () = c.set("k", "x".repeat(1000)).unwrap();
    let e: RedisResult<i64> = c.append("k", "y".repeat(100));
    assert!(e.unwrap_err().to_string().contains("value after APPEND"));
    let e: RedisResult<()> = redis::cmd("SET").arg("").arg("v").query(&mut c);
    assert!(e.unwrap_err().to_string().contains("key must not be empty"));
    // A frame larger than the frame limit is refused from its declared size.
    let reply = raw_resp(
        s.resp,
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$80000\r\n",
        Duration::from_secs(5),
    );
    assert!(String::from_utf8_lossy(&reply).contains("frame limit"));
    // HTTP: same value limit, and a body over the HTTP limit gets 413.
    let (status, body) = http(
        s.http,
        "PUT",
        "/v1/kv/default/big",
        &[],
        Some(&vec![b'x'; 2000]),
    )
    .unwrap();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["error"]["code"], "too_large");
    let (status, body) = http(
        s.http,
        "PUT",
        "/v1/kv/default/big",
        &[],
        Some(&vec![b'x'; 200_000]),
    )
    .unwrap();
    assert_eq!(status, 413);
    assert_eq!(json(&body)["error"]["code"], "too_large");
    still_serving(&s);
}

#[test]
fn junk_http_gets_json_errors() {
    let s = Server::start();
    for (method, path, body, status, code) in [
        (
            "POST",
            "/v1/keyspaces",
            &b"{not json"[..],
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"x"}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"x","mode":"cp","colour":"red"}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"a/b","mode":"cp"}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"c","mode":"cp","max_memory_bytes":5}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"c","mode":"cache","max_memory_bytes":5}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"c","mode":"cp","replication_factor":0}"#,
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/v1/keyspaces",
            br#"{"name":"default","mode":"cp"}"#,
            409,
            "keyspace_exists",
        ),
        (
            "PUT",
            "/v1/kv/default/k?ttl_ms=soon",
            b"v",
            400,
            "invalid_input",
        ),
        (
            "PUT",
            "/v1/kv/default/k?if=maybe",
            b"v",
            400,
            "invalid_input",
        ),
        (
            "PUT",
            "/v1/kv/default/k?ttl_ms=0",
            b"v",
            400,
            "invalid_input",
        ),
        ("GET", "/v1/kv/default?limit=0", b"", 400, "invalid_input"),
        ("GET", "/v1/kv/default?cursor=zz", b"", 400, "invalid_input"),
        ("GET", "/v1/kv/nope/k", b"", 404, "keyspace_not_found"),
        ("DELETE", "/v1/keyspaces/default", b"", 400, "invalid_input"),
        ("GET", "/nothing/here", b"", 404, "not_found"),
    ] {
        let (got, resp) = http(s.http, method, path, &[], Some(body)).unwrap();
        assert_eq!(
            got,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_eq!(json(&resp)["error"]["code"], code, "{method} {path}");
    }
    // A client that sends half a request and vanishes.
    let mut half = TcpStream::connect(s.http).unwrap();
    half.write_all(b"PUT /v1/kv/default/k HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    drop(half);
    still_serving(&s);
}

#[test]
fn connection_limit_is_enforced_with_an_error() {
    let s = Server::start_with(&["--connections-max", "3"]);
    let held: Vec<redis::Connection> = (0..3).map(|_| s.client()).collect();
    let reply = raw_resp(s.resp, b"PING\r\n", Duration::from_secs(5));
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "-ERR max number of clients reached\r\n"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    still_serving(&s);
}

#[test]
fn bad_configuration_is_refused_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capdb.toml");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("server")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("d"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} should be refused");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    std::fs::write(&file, "resp_addr = 6380\n").unwrap();
    let err = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(
        err.contains("invalid type: integer `6380`, expected a string"),
        "{err}"
    );
    std::fs::write(&file, "[limits]\nvalue_bytes_mx = 5\n").unwrap();
    let err = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(err.contains("unknown field `value_bytes_mx`"), "{err}");
    std::fs::write(&file, "this is not toml").unwrap();
    let err = run(&["--config", file.to_str().unwrap()], &[]);
    assert!(err.contains("config file"), "{err}");
    let err = run(&["--config", "/does/not/exist.toml"], &[]);
    assert!(err.contains("cannot read config file"), "{err}");
    let err = run(&["--resp-addr", "localhost"], &[]);
    assert!(
        err.contains("resp_addr = 'localhost' is not a HOST:PORT"),
        "{err}"
    );
    let err = run(&[], &[("CAPDB_HTTP_ADDR", "300.1.1.1:80")]);
    assert!(err.contains("http_addr = '300.1.1.1:80'"), "{err}");
    let err = run(&["--connections-max", "lots"], &[]);
    assert!(
        err.contains("invalid value 'lots' for '--connections-max <N>'"),
        "{err}"
    );
    let err = run(&["--connections-max", "0"], &[]);
    assert!(err.contains("connections_max must be 1 to"), "{err}");
    let err = run(&["--value-bytes-max", "0"], &[]);
    assert!(err.contains("value_bytes_max must be between"), "{err}");
    let err = run(
        &["--resp-addr", "127.0.0.1:1", "--http-addr", "127.0.0.1:1"],
        &[],
    );
    assert!(err.contains("different ports"), "{err}");
    // A port that is taken is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let err = run(
        &[
            "--resp-addr",
            &format!("127.0.0.1:{port}"),
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(
        err.contains(&format!("cannot listen on resp_addr 127.0.0.1:{port}")),
        "{err}"
    );
    // Flags beat environment variables, which beat the file.
    std::fs::write(&file, "resp_addr = \"not an address\"\n").unwrap();
    let err = run(
        &["--config", file.to_str().unwrap()],
        &[("CAPDB_RESP_ADDR", "still bad")],
    );
    assert!(
        err.contains("'still bad'"),
        "env must override the file: {err}"
    );
    let err = run(
        &[
            "--config",
            file.to_str().unwrap(),
            "--resp-addr",
            "flag bad",
        ],
        &[("CAPDB_RESP_ADDR", "still bad")],
    );
    assert!(
        err.contains("'flag bad'"),
        "the flag must override env: {err}"
    );
}
