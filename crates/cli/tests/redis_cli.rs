//! The real `redis-cli` (Debian redis-tools) against the real binary.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Server, need_tool};

fn cli(s: &Server, args: &[&str]) -> String {
    let out = Command::new(need_tool("redis-cli"))
        .arg("-p")
        .arg(s.resp.port().to_string())
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
