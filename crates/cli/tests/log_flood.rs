//! A dead replica must not flood the survivors' logs (issue 10).
//!
//! With one of three nodes killed, openraft warns on every failed heartbeat to it, and every
//! linearizable read's ReadIndex round is a heartbeat: unlimited, the shard leader writes
//! thousands of lines in a few seconds of reads (this test, with `CAPDB_LOG_RATE_LIMIT=off`:
//! 3,878 lines in 6 s). Rate-limited (`crates/cli/src/log_limit.rs`), a handful.

mod common;

use std::time::{Duration, Instant};

use common::{Server, http, json};
use redis::Commands;

fn status(node: &Server) -> serde_json::Value {
    let (code, body) = http(node.http, "GET", "/v1/cluster", &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

/// Starts three founding nodes and waits until the default keyspace's shard has three voters
/// and a leader.
fn three_nodes() -> Vec<Server> {
    let nodes = common::start_founders(3, |id| vec!["--label".into(), format!("zone=z{}", id - 1)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&nodes[0]);
        let shard = &st["keyspaces"][0]["shards"][0];
        if shard["leader"].is_u64() && shard["voters"].as_array().is_some_and(|v| v.len() == 3) {
            return nodes;
        }
        assert!(
            Instant::now() < deadline,
            "not replicated after 30 s: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dead_replica_does_not_flood_the_log_under_linearizable_reads() {
    let mut nodes = three_nodes();
    let st = status(&nodes[0]);
    let leader = st["keyspaces"][0]["shards"][0]["leader"].as_u64().unwrap() as usize;
    // A node that leads no group: its death leaves every leader in place.
    let victim = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["leading"].as_u64() == Some(0))
        .and_then(|n| n["id"].as_u64())
        .expect("three nodes, at most two groups: one leads nothing") as usize;
    assert_ne!(victim, leader);
    nodes[leader - 1]
        .client()
        .set::<_, _, ()>("k", "v")
        .unwrap();

    let lines_before = nodes[leader - 1].log().lines().count();
    nodes[victim - 1].kill9();
    let reads_until = Instant::now() + Duration::from_secs(4);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut conn = nodes[leader - 1].client();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < reads_until {
                    let v: Option<String> = conn.get("k").unwrap();
                    assert_eq!(v.as_deref(), Some("v"));
                    n += 1;
                }
                n
            })
        })
        .collect();
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    // Unlimited, idle heartbeats alone add ~16 warnings a second per group the node leads.
    std::thread::sleep(Duration::from_secs(2));
    let log = nodes[leader - 1].log();
    let written = log.lines().count() - lines_before;
    eprintln!("{written} log lines in 6 s after a replica died ({reads} reads)");
    assert!(reads > 100, "only {reads} reads: the test measured nothing");
    assert!(
        written < 60,
        "{written} log lines in 6 s after a replica died ({reads} reads):\n{log}"
    );

    // Suppressed lines are not silent: once the window ends, a summary says how many.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = nodes[leader - 1].log();
        if log.lines().any(|l| {
            l.contains("capdb::log_limit: suppressed")
                && l.contains("from openraft::core::heartbeat::worker")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no summary line:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
