//! `capdb playground` end to end: the real binary, redis-cli, and the playground's own
//! control commands from "another terminal".

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, need_tool};

/// A base port whose whole range (RESP P+i, HTTP P+100+i, peers P+200+i, control P+100) is free.
fn free_base(nodes: u16) -> u16 {
    let start = 21000 + (std::process::id() % 40) as u16 * 200;
    for base in (start..29000).step_by(310) {
        let ports = (1..=nodes)
            .flat_map(|i| [base + i, base + 100 + i, base + 200 + i])
            .chain([base + 100]);
        let free = ports
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect::<Result<Vec<_>, _>>()
            .is_ok();
        if free {
            return base;
        }
    }
    panic!("no free port range for the playground");
}

/// Sends commands to redis-cli on stdin (as a user would pipe them); returns stdout.
fn redis_cli(port: u16, script: &str) -> String {
    let mut child = Command::new(need_tool("redis-cli"))
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn control(base: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("playground")
        .args(args)
        .args(["--base-port", &base.to_string()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn playground_partition_refuses_cp_on_the_minority_and_keeps_ap_writable() {
    let base = free_base(3);
    let mut pg = Command::new(BIN)
        .args(["playground", "--base-port", &base.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the welcome text, which is printed once the keyspaces exist on every node.
    let stdout = pg.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut welcome = String::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !welcome.contains("Ctrl-C stops everything") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => welcome += &(line + "\n"),
            Err(_) => {
                let _ = pg.kill();
                panic!("playground never became ready; printed:\n{welcome}");
            }
        }
    }
    let data_dir = welcome
        .lines()
        .next()
        .and_then(|l| l.split("data in ").nth(1))
        .and_then(|r| r.split(' ').next())
        .map(std::path::PathBuf::from)
        .expect("the welcome names the data directory");
    assert!(data_dir.exists());
    let (n1, n2) = (base + 1, base + 2);

    // Every keyspace takes writes through redis-cli.
    let out = redis_cli(
        n1,
        "SELECT cp\nSET c v1\nSELECT ap\nSET a v1\nSELECT cache\nSET m v1\nGET m\n",
    );
    assert_eq!(out, "OK\nOK\nOK\nOK\nOK\nOK\nv1\n", "{out}");

    // Cut node 1 off, with the playground's own command.
    let (ok, text) = control(base, &["partition", "1"]);
    assert!(ok && text.contains("partitioned: {1} | {2,3}"), "{text}");
    let (ok, text) = control(base, &["status"]);
    assert!(
        ok && text.contains("links: partitioned {1} | {2,3}"),
        "{text}"
    );

    // The cp write on the minority side is refused (in bounded time), never acknowledged.
    let started = Instant::now();
    let out = redis_cli(n1, "SELECT cp\nSET c minority\n");
    // -TRYAGAIN: certainly not applied. -UNCERTAIN when node 1 led the shard and took the write
    // in the instant before it noticed the cut: it cannot be committed by the majority, which
    // has moved on (checked after the heal), but node 1 cannot know that in time.
    assert!(
        out.starts_with("OK\nTRYAGAIN") || out.starts_with("OK\nUNCERTAIN"),
        "cp on the minority: {out}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The majority side keeps writing cp.
    let out = redis_cli(n2, "SELECT cp\nSET c majority\nGET c\n");
    assert_eq!(out, "OK\nOK\nmajority\n", "{out}");
    // The ap write on the minority side is accepted (ap keyspaces default to CONSISTENCY ONE).
    let out = redis_cli(n1, "SELECT ap\nSET a minority\nGET a\n");
    assert_eq!(out, "OK\nOK\nminority\n", "ap on the minority: {out}");
    // And the majority side writes another key meanwhile.
    let out = redis_cli(n2, "SELECT ap\nSET b majority\n");
    assert_eq!(out, "OK\nOK\n", "ap on the majority: {out}");

    // Heal; cp converges on the majority's value everywhere (the refused write never appears).
    let (ok, text) = control(base, &["heal"]);
    assert!(ok && text.contains("healed"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = redis_cli(n1, "SELECT cp\nGET c\n");
        if out == "OK\nmajority\n" {
            break;
        }
        assert!(Instant::now() < deadline, "cp after heal on node 1: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The ap data converges: every node sees both sides' writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in [base + 1, base + 2, base + 3] {
        loop {
            let out = redis_cli(port, "SELECT ap\nCONSISTENCY ALL\nGET a\nGET b\n");
            if out == "OK\nOK\nminority\nmajority\n" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ap did not converge on {port}: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Kill and restart a node through the playground.
    let (ok, text) = control(base, &["kill", "3"]);
    assert!(ok && text.contains("node 3 killed"), "{text}");
    let (ok, text) = control(base, &["restart", "3"]);
    assert!(ok && text.contains("node 3 restarting"), "{text}");
    let (ok, text) = control(base, &["kill", "9"]);
    assert!(!ok && text.contains("node 9 does not exist"), "{text}");

    // Ctrl-C stops everything and removes the temporary data.
    Command::new("kill")
        .args(["-INT", &pg.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = pg.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "playground did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(!data_dir.exists(), "temporary data removed");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", n1)).is_ok(),
        "node 1 stopped"
    );
}
