//! `cp` keyspaces on real 3- and 5-node clusters of the real binary on loopback: replication,
//! linearizable reads from every node, leader failure, catch-up after restart, joining nodes,
//! minority failures and partitions.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{BIN, Server, free_port, http, json};
use redis::{Commands, RedisResult};

/// Cluster tests run one at a time: each starts several nodes, and on a 2-core machine five
/// clusters at once would measure the scheduler, not capdb.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A cluster of real processes; node i is `nodes[i - 1]`.
struct Cluster {
    nodes: Vec<Server>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let nodes = common::start_founders(n, |id| {
            let mut args = vec!["--label".to_string(), format!("zone=z{}", (id - 1) % 3)];
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        });
        let c = Cluster { nodes, _turn: turn };
        c.wait_replicated(n.min(3));
        c
    }

    fn node(&self, id: u64) -> &Server {
        &self.nodes[id as usize - 1]
    }

    fn node_mut(&mut self, id: u64) -> &mut Server {
        &mut self.nodes[id as usize - 1]
    }

    fn status_from(&self, id: u64) -> serde_json::Value {
        let (code, body) = http(self.node(id).http, "GET", "/v1/cluster", &[], None).unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        json(&body)
    }

    fn alive(&self) -> impl Iterator<Item = (u64, &Server)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.child.is_some())
            .map(|(i, s)| (i as u64 + 1, s))
    }

    fn status(&self) -> serde_json::Value {
        let (id, _) = self.alive().next().expect("a live node");
        self.status_from(id)
    }

    /// Waits until every shard of `default` has `rf` voters and a leader.
    fn wait_replicated(&self, rf: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status();
            let ok = st["keyspaces"].as_array().unwrap().iter().all(|ks| {
                ks["shards"].as_array().unwrap().iter().all(|s| {
                    s["leader"].is_u64() && s["voters"].as_array().is_some_and(|v| v.len() == rf)
                })
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not replicated after 30 s: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The leader of the default keyspace's first shard.
    fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let st = self.status();
            if let Some(l) = st["keyspaces"][0]["shards"][0]["leader"].as_u64() {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader: {st:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // CAPDB_TEST_LOGS=<dir> keeps every node's whole log of a failed test.
            let keep = std::env::var_os("CAPDB_TEST_LOGS").map(std::path::PathBuf::from);
            for (i, s) in self.nodes.iter().enumerate() {
                let log = s.log();
                if let Some(dir) = &keep {
                    let _ = std::fs::create_dir_all(dir);
                    let _ = std::fs::write(dir.join(format!("node{}.log", i + 1)), &log);
                }
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- node {} log (last 40 lines) ----", i + 1);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Retries a write until it succeeds (elections), bounded.
fn set_retrying(c: &mut redis::Connection, k: &str, v: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: RedisResult<()> = c.set(k, v);
        match r {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "write {k} kept failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn writes_on_one_node_are_read_linearizably_from_every_node() {
    let c = Cluster::start(3);
    let mut conns: Vec<redis::Connection> = c.nodes.iter().map(|s| s.client()).collect();
    for i in 0..60 {
        let writer = i % 3;
        let key = format!("k{i}");
        let _: () = conns[writer].set(&key, i).unwrap();
        // Immediately after the acknowledgement, every node must see the write.
        for (n, conn) in conns.iter_mut().enumerate() {
            assert_eq!(
                conn.get::<_, Option<i64>>(&key).unwrap(),
                Some(i as i64),
                "node {} missed {key}",
                n + 1
            );
        }
    }
    let _: () = conns[1].incr("counter", 5).unwrap();
    assert_eq!(conns[2].incr::<_, _, i64>("counter", 1).unwrap(), 6);
    // Cluster-aware clients see the slot map.
    let slots: Vec<(u16, u16, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut conns[0])
        .map(|v: redis::Value| {
            let redis::Value::Array(shards) = v else {
                panic!("array")
            };
            shards
                .into_iter()
                .map(|s| {
                    let redis::Value::Array(parts) = s else {
                        panic!("array")
                    };
                    let n = |v: &redis::Value| {
                        if let redis::Value::Int(i) = v {
                            *i as u16
                        } else {
                            panic!()
                        }
                    };
                    (n(&parts[0]), n(&parts[1]), parts[2..].to_vec())
                })
                .collect()
        })
        .unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].0, slots[0].1), (0, 16383));
    assert_eq!(slots[0].2.len(), 3, "leader + 2 replicas");
    assert_eq!(
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg("foo")
            .query::<i64>(&mut conns[0])
            .unwrap(),
        12182
    );
    // -MOVED on request, from a node that is not the leader.
    let leader = c.leader();
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut fc = c.node(follower).client();
    let _: () = redis::cmd("CLUSTER")
        .arg("REDIRECT")
        .arg("ON")
        .query(&mut fc)
        .unwrap();
    let e: RedisResult<Option<String>> = fc.get("k1");
    let e = e.unwrap_err();
    assert_eq!(e.code(), Some("MOVED"), "{e}");
    assert!(
        e.to_string().contains(&c.node(leader).resp.to_string()),
        "{e}"
    );
}

#[test]
fn kill_the_leader_and_keep_writing_then_restart_and_catch_up() {
    let mut c = Cluster::start(3);
    let leader = c.leader();
    let others: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    let mut conn = c.node(others[0]).client();
    for i in 0..100 {
        let _: () = conn.set(format!("before{i}"), i).unwrap();
    }
    c.node_mut(leader).kill9();
    let killed_at = Instant::now();
    set_retrying(&mut conn, "after-failover", "yes");
    let gap = killed_at.elapsed();
    assert!(
        gap < Duration::from_secs(10),
        "writes resumed only after {gap:?}"
    );
    let new_leader = c.leader();
    assert_ne!(new_leader, leader);
    let mut other = c.node(others[1]).client();
    for i in 0..100 {
        let _: () = other.set(format!("during{i}"), i).unwrap();
    }
    for i in 0..100 {
        assert_eq!(
            conn.get::<_, Option<i64>>(format!("before{i}")).unwrap(),
            Some(i)
        );
    }
    // The killed node restarts and catches up: its own replica (stale read) gets every write.
    c.node_mut(leader).spawn();
    let mut back = c.node(leader).client();
    let _: () = redis::cmd("READONLY").query(&mut back).unwrap();
    // Until the restarted node runs its replica again, READONLY reads are served by another
    // replica; so wait for the condition itself: every write readable through this node.
    let expected: Vec<(String, i64)> = (0..100)
        .flat_map(|i| [(format!("during{i}"), i), (format!("before{i}"), i)])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let wrong: Vec<&str> = expected
            .iter()
            .filter(|(k, v)| back.get::<_, Option<i64>>(k).ok().flatten() != Some(*v))
            .map(|(k, _)| k.as_str())
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node did not catch up; still wrong: {:?}",
            &wrong[..wrong.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And its own replica holds them (keys stored on this node, from its metrics); the
    // failover write and nothing else was written besides.
    let local = "capdb_keyspace_keys{keyspace=\"default\",mode=\"cp\"} 201";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http(c.node(leader).http, "GET", "/metrics", &[], None).unwrap();
        if String::from_utf8_lossy(&body).contains(local) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node's replica does not hold every write: {}",
            String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| l.starts_with("capdb_keyspace_keys"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_leader_cut_off_from_its_quorum_refuses_writes_as_certainly_not_applied() {
    let c = Cluster::start(3);
    let leader = c.leader();
    let mut on_leader = c.node(leader).client();
    set_retrying(&mut on_leader, "before", "x");
    let others: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    partition(&c, &[&[leader], &others]);
    // Once the majority has a new leader, the old one has been cut off for longer than an
    // election takes. It may still believe it leads; it must not take writes it cannot commit
    // (their outcome would be unknown) but refuse them: -TRYAGAIN, certainly not applied.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = c.status_from(others[0]);
        let new_leader = st["keyspaces"][0]["shards"][0]["leader"].as_u64();
        if new_leader.is_some_and(|l| l != leader) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the majority elected no leader: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = on_leader
        .set::<_, _, ()>("cut-off", "x")
        .expect_err("a leader without a quorum must not acknowledge");
    assert_eq!(e.code(), Some("TRYAGAIN"), "{e}");
    partition(&c, &[&[1, 2, 3]]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut any = c.node(others[0]).client();
        if let Ok(v) = any.get::<_, Option<String>>("cut-off") {
            assert_eq!(v, None, "a refused write must never appear");
            if any
                .get::<_, Option<String>>("before")
                .ok()
                .flatten()
                .is_some()
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the cluster did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_minority_side_of_a_partition_refuses_in_bounded_time() {
    let c = Cluster::start(3);
    for i in 0..20 {
        let _: () = c.node(1).client().set(format!("p{i}"), i).unwrap();
    }
    // Cut node 1 off from 2 and 3 (both directions, as a network partition would).
    let cut = |node: u64, blocked: &str| {
        let body = format!("{{\"blocked\":[{blocked}]}}");
        let (code, _) = http(
            c.node(node).http,
            "POST",
            "/v1/cluster/partition",
            &[],
            Some(body.as_bytes()),
        )
        .unwrap();
        assert_eq!(code, 200);
    };
    cut(1, "2,3");
    cut(2, "1");
    cut(3, "1");
    // Node 1 may have led the shard: once the majority has a leader, it has been cut off for
    // longer than an election takes, and refuses instead of taking writes it cannot commit.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status_from(2)["keyspaces"][0]["shards"][0]["leader"]
        .as_u64()
        .is_none_or(|l| l == 1)
    {
        assert!(Instant::now() < deadline, "the majority elected no leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut minority = c.node(1).client();
    let started = Instant::now();
    let w: RedisResult<()> = minority.set("minority-write", "x");
    let took = started.elapsed();
    let e = w.expect_err("the minority side must not accept writes");
    assert_eq!(e.code(), Some("TRYAGAIN"), "{e}");
    assert!(took < Duration::from_secs(8), "refusal took {took:?}");
    let started = Instant::now();
    let r: RedisResult<Option<i64>> = minority.get("p1");
    assert!(
        r.is_err(),
        "a linearizable read on the minority side must fail, got {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    // A stale read is still served from the local replica.
    let _: () = redis::cmd("READONLY").query(&mut minority).unwrap();
    assert_eq!(minority.get::<_, Option<i64>>("p1").unwrap(), Some(1));
    // The majority keeps working.
    let mut majority = c.node(2).client();
    set_retrying(&mut majority, "majority-write", "ok");
    // Heal: node 1 serves again, and never saw its refused write applied.
    cut(1, "");
    cut(2, "");
    cut(3, "");
    let mut healed = c.node(1).client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match healed.get::<_, Option<String>>("majority-write") {
            Ok(Some(v)) => {
                assert_eq!(v, "ok");
                break;
            }
            _ => assert!(
                Instant::now() < deadline,
                "node 1 did not recover after the heal"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let gone: Option<String> = healed.get("minority-write").unwrap();
    assert_eq!(
        gone, None,
        "a write refused on the minority side must not appear later"
    );
}

#[test]
fn a_joining_node_gets_replicas_and_a_removed_node_drains() {
    let mut c = Cluster::start(3);
    // A keyspace with several shards so there is something to move.
    let (code, body) = http(
        c.node(1).http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"sharded","mode":"cp","shards":4,"replication_factor":3}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let mut conn = redis::Client::open(format!("redis://{}/", c.node(1).resp))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SELECT")
        .arg("sharded")
        .query(&mut conn)
        .unwrap();
    for i in 0..200 {
        let _: () = conn.set(format!("s{i}"), i).unwrap();
    }
    // Node 4 joins through node 2.
    let seed = c.node(2).peer.to_string();
    let mut joiner = Server::prepare(
        free_port(),
        &["--node-id", "4", "--join", &seed, "--label", "zone=z3"],
    );
    joiner.spawn();
    c.nodes.push(joiner);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = c.status();
        let n4 = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == 4)
            .cloned();
        if n4
            .as_ref()
            .is_some_and(|n| n["replicas"].as_u64().unwrap_or(0) >= 2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 got no replicas: {st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its replicas hold the data: read every key from node 4 (linearizable, any shard).
    let mut c4 = redis::Client::open(format!("redis://{}/", c.node(4).resp))
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SELECT").arg("sharded").query(&mut c4).unwrap();
    for i in 0..200 {
        assert_eq!(c4.get::<_, Option<i64>>(format!("s{i}")).unwrap(), Some(i));
    }
    // Remove node 3: its replicas move away first, then it leaves.
    let out = std::process::Command::new(BIN)
        .args([
            "cluster",
            "remove",
            "3",
            "--addr",
            &c.node(1).http.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = c.status_from(1);
    assert!(
        st["nodes"].as_array().unwrap().iter().all(|n| n["id"] != 3),
        "{st:#}"
    );
    for ks in st["keyspaces"].as_array().unwrap() {
        for s in ks["shards"].as_array().unwrap() {
            assert!(
                !s["replicas"]
                    .as_array()
                    .unwrap()
                    .contains(&serde_json::json!(3)),
                "{st:#}"
            );
        }
    }
    for i in 0..200 {
        assert_eq!(
            conn.get::<_, Option<i64>>(format!("s{i}")).unwrap(),
            Some(i),
            "key s{i} lost during the move"
        );
    }
}

#[test]
fn acknowledged_writes_survive_kill_9_of_a_minority_of_five() {
    let mut c = Cluster::start(5);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let url = c.node(w % 5 + 1).redis_url();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            let Ok(mut conn) = redis::Client::open(url).unwrap().get_connection() else {
                return acked;
            };
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}:{i}");
                let r: RedisResult<()> = conn.set(&key, i);
                if r.is_ok() {
                    acked.insert(key, i);
                }
                i += 1;
            }
            acked
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Two of five nodes die at once; writers on them start failing, the others continue.
    c.node_mut(4).kill9();
    c.node_mut(5).kill9();
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.join().unwrap());
    }
    assert!(
        acked.len() > 200,
        "only {} writes acknowledged",
        acked.len()
    );
    // Bring the killed nodes back (with RF 3 on 5 nodes two of them may have held two of a
    // shard's three replicas), then every acknowledged write must be there.
    c.node_mut(4).spawn();
    c.node_mut(5).spawn();
    let mut conn = c.node(1).client();
    let keys: Vec<&String> = acked.keys().collect();
    for chunk in keys.chunks(200) {
        let got: Vec<Option<u64>> = conn.mget(chunk).unwrap();
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(g, Some(acked[*k]), "acknowledged write {k} lost");
        }
    }
}

/// Applies are not fsync'd (the log is): a node restarted by kill -9 has a state machine behind
/// what it acknowledged until it re-applies its log. A leader that came back as leader without
/// an election (openraft's "leader restore") would answer linearizable reads from that stale
/// state: the CI run of `acknowledged_writes_survive_kill_9_of_a_minority_of_five` once read
/// `None` for an acknowledged key this way. Every node dies at once, so the old leader is the
/// likeliest to lead again; reads start the moment the nodes answer.
#[test]
fn acknowledged_writes_are_read_back_at_once_after_kill_9_of_every_node() {
    let mut c = Cluster::start(3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 1..=3u64 {
        let url = c.node(w).redis_url();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}:{i}");
                if conn.set::<_, _, ()>(&key, i).is_ok() {
                    acked.insert(key, i);
                }
                i += 1;
            }
            acked
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    for n in 1..=3 {
        c.node_mut(n).kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.join().unwrap());
    }
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );
    for n in 1..=3 {
        c.node_mut(n).spawn_no_wait();
    }
    for n in 1..=3 {
        c.node_mut(n).wait_ready().unwrap();
    }
    // Errors while the groups elect are fine (retried); an answer must be the acknowledged one.
    let mut conns: Vec<redis::Connection> = (1..=3).map(|n| c.node(n).client()).collect();
    let keys: Vec<&String> = acked.keys().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, chunk) in keys.chunks(50).enumerate() {
        let conn = &mut conns[i % 3];
        let got: Vec<Option<u64>> = loop {
            match conn.mget(chunk) {
                Ok(got) => break got,
                Err(e) => assert!(Instant::now() < deadline, "reads kept failing: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (k, g) in chunk.iter().zip(got) {
            assert_eq!(
                g,
                Some(acked[*k]),
                "acknowledged write {k} read back as {g:?}"
            );
        }
    }
}

#[test]
fn a_node_far_behind_catches_up_from_a_snapshot() {
    // Snapshots every 50 entries: a node that misses hundreds of writes finds the log it
    // needs purged, and must be sent the leader's snapshot. With MiBs of values per shard the
    // snapshot travels in several parts (`capdb_raft::snapshot::SNAPSHOT_PART_BYTES`).
    let mut c = Cluster::start_with(3, &["--raft-snapshot-logs", "50"]);
    let leader = c.leader();
    let lagging = (1..=3).find(|&n| n != leader).unwrap();
    let mut conn = c.node(leader).client();
    for i in 0..50 {
        let _: () = conn.set(format!("early{i}"), i).unwrap();
    }
    c.node_mut(lagging).kill9();
    for i in 0..600 {
        let _: () = conn.set(format!("late{i}"), i).unwrap();
    }
    let big = |i: usize| format!("{i}:{}", "x".repeat(32 << 10));
    for i in 0..400 {
        let _: () = conn.set(format!("big{i}"), big(i)).unwrap();
    }
    let _: () = conn.del("early0").unwrap();
    // Collections travel in snapshots too (their elements are a second table): a hash big
    // enough to be reclaimed in the background when replaced, a list and a set.
    for i in 0..200 {
        let _: () = conn.hset("{c}hash", format!("f{i}"), i).unwrap();
    }
    let _: () = conn.rpush("{c}list", &["a", "b", "c"]).unwrap();
    let _: () = conn.sadd("{c}set", &["x", "y"]).unwrap();
    c.node_mut(lagging).spawn();
    let mut back = c.node(lagging).client();
    let _: () = redis::cmd("READONLY").query(&mut back).unwrap();
    // The keys live on several shards, each catching up on its own: wait until the local
    // replica (READONLY reads it) holds every write, the delete included.
    let expected: Vec<(String, Option<i64>)> = (0..600)
        .map(|i| (format!("late{i}"), Some(i)))
        .chain((1..50).map(|i| (format!("early{i}"), Some(i))))
        .chain([("early0".to_string(), None)])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<&str> = expected
            .iter()
            .filter(|(k, v)| back.get::<_, Option<i64>>(k).ok().as_ref() != Some(v))
            .map(|(k, _)| k.as_str())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lagging node did not catch up within 60 s; still wrong: {:?}",
            &missing[..missing.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..400 {
        loop {
            let got: Option<String> = back.get(format!("big{i}")).unwrap_or(None);
            if got.as_deref() == Some(&big(i)[..]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the lagging node's big{i} did not catch up: {} bytes",
                got.map_or(0, |g| g.len())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let log = c.node(lagging).log();
    let parts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("installed a snapshot"))
        .filter_map(|l| {
            l.split("parts=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !parts.is_empty(),
        "the lagging node should have caught up from a snapshot:\n{log}"
    );
    assert!(
        parts.iter().any(|&p| p >= 4),
        "some shard's snapshot should have come in several parts (its head, two or more pages \
         of keys, its element rows), got {parts:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fields: Result<std::collections::HashMap<String, i64>, _> = back.hgetall("{c}hash");
        let list: Result<Vec<String>, _> = back.lrange("{c}list", 0, -1);
        let set: Result<std::collections::BTreeSet<String>, _> = back.smembers("{c}set");
        if let (Ok(f), Ok(l), Ok(s)) = (&fields, &list, &set)
            && f.len() == 200
            && (0..200).all(|i| f.get(&format!("f{i}")) == Some(&i))
            && l == &["a", "b", "c"]
            && s.iter().map(String::as_str).eq(["x", "y"])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lagging node's collections did not catch up: {fields:?} {list:?} {set:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_message_published_through_any_node_reaches_subscribers_on_every_node() {
    use std::io::{Read, Write};
    let c = Cluster::start(3);
    let mut on2 = c.node(2).client();
    let mut channel_sub = on2.as_pubsub();
    channel_sub.subscribe("news").unwrap();
    channel_sub
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut on3 = c.node(3).client();
    let mut pattern_sub = on3.as_pubsub();
    pattern_sub.psubscribe("n*").unwrap();
    pattern_sub
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A sharded subscriber on node 1, over raw RESP3 (push frames).
    let mut shard_sub = std::net::TcpStream::connect(c.node(1).resp).unwrap();
    shard_sub
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    shard_sub
        .write_all(b"HELLO 3\r\nSSUBSCRIBE orders\r\n")
        .unwrap();
    let confirmation = b">3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n";
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(confirmation) {
        let n = shard_sub.read(&mut buf).unwrap();
        assert!(n > 0, "node 1 closed the subscriber");
        seen.extend_from_slice(&buf[..n]);
    }

    // Published through node 1, where nobody subscribed: PUBLISH answers 0 (the receivers on
    // the node asked, as Redis Cluster answers), and both remote subscribers get every message
    // in publish order.
    let mut publisher = c.node(1).client();
    for i in 0..20 {
        let here: i64 = redis::cmd("PUBLISH")
            .arg("news")
            .arg(format!("m{i}"))
            .query(&mut publisher)
            .unwrap();
        assert_eq!(here, 0);
    }
    for i in 0..20 {
        let m = channel_sub.get_message().unwrap();
        assert_eq!(m.get_channel_name(), "news");
        assert_eq!(m.get_payload::<String>().unwrap(), format!("m{i}"));
        let p = pattern_sub.get_message().unwrap();
        assert_eq!(p.get_pattern::<String>().unwrap(), "n*");
        assert_eq!(p.get_payload::<String>().unwrap(), format!("m{i}"));
    }

    // A sharded message published through node 3 reaches node 1's subscriber as a push.
    let mut on3_publisher = c.node(3).client();
    let _: i64 = redis::cmd("SPUBLISH")
        .arg("orders")
        .arg("o1")
        .query(&mut on3_publisher)
        .unwrap();
    let expected = b">3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$2\r\no1\r\n";
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let n = shard_sub.read(&mut buf).unwrap();
        assert!(n > 0, "node 1 closed the subscriber");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// Cuts links with the nodes' own filter (both directions), like a network partition.
fn partition(c: &Cluster, sides: &[&[u64]]) {
    let side_of = |n: u64| sides.iter().position(|s| s.contains(&n));
    for (id, s) in c.alive() {
        let blocked: Vec<String> = c
            .alive()
            .map(|(o, _)| o)
            .filter(|&o| o != id && side_of(o) != side_of(id))
            .map(|o| o.to_string())
            .collect();
        let body = format!("{{\"blocked\":[{}]}}", blocked.join(","));
        let (code, _) = http(
            s.http,
            "POST",
            "/v1/cluster/partition",
            &[],
            Some(body.as_bytes()),
        )
        .unwrap();
        assert_eq!(code, 200);
    }
}

fn ap_conn(c: &Cluster, node: u64, level: &str) -> redis::Connection {
    let mut conn = c.node(node).client();
    let _: () = redis::cmd("SELECT").arg("events").query(&mut conn).unwrap();
    let _: () = redis::cmd("CONSISTENCY")
        .arg(level)
        .query(&mut conn)
        .unwrap();
    conn
}

/// Every node's replica digest of `events`, shard by shard.
fn digests(c: &Cluster) -> Vec<serde_json::Value> {
    c.alive()
        .map(|(_, s)| {
            let (code, body) =
                http(s.http, "GET", "/v1/keyspaces/events/digest", &[], None).unwrap();
            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
            json(&body)["shards"].clone()
        })
        .collect()
}

/// Waits (at most 30 s) until every node's replica digest of `events` is the same.
fn wait_until_replicas_converge(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = digests(c);
        if d.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge: {d:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Creates the `ap` keyspace `events` (3 replicas) and returns a connection to node 1 using it
/// at `level`, once the keyspace has reached node 1's catalog.
fn create_events_keyspace(c: &Cluster, level: &str) -> redis::Connection {
    let (code, body) = http(
        c.node(1).http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"events","mode":"ap","replication_factor":3}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The keyspace reaches every node's catalog shortly after creation.
        let mut conn = c.node(1).client();
        if redis::cmd("SELECT")
            .arg("events")
            .query::<()>(&mut conn)
            .is_ok()
        {
            let _: () = redis::cmd("CONSISTENCY")
                .arg(level)
                .query(&mut conn)
                .unwrap();
            return conn;
        }
        assert!(Instant::now() < deadline, "keyspace never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ap_keyspaces_write_on_both_sides_of_a_partition_and_converge() {
    let c = Cluster::start_with(3, &["--ap-anti-entropy-interval-ms", "1000"]);
    // Before the partition: quorum writes, a key to delete later, a counter.
    let mut q = create_events_keyspace(&c, "quorum");
    for i in 0..50 {
        let _: () = q.set(format!("acked:{i}"), i).unwrap();
    }
    let _: () = q.set("doomed", "x").unwrap();
    let _: i64 = q.incr("visits", 10).unwrap();

    // Partition: node 1 alone, nodes 2 and 3 together.
    partition(&c, &[&[1], &[2, 3]]);
    std::thread::sleep(Duration::from_secs(2)); // let the failure detectors notice
    let mut left = ap_conn(&c, 1, "one");
    let mut right = ap_conn(&c, 2, "one");
    // Both sides accept writes at `one`.
    for i in 0..30 {
        let _: () = left.set(format!("left:{i}"), i).unwrap();
        let _: () = right.set(format!("right:{i}"), i).unwrap();
    }
    let _: () = left.set("contested", "from-left").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let _: () = right.set("contested", "from-right").unwrap();
    // Concurrent increments on both sides all count.
    for _ in 0..7 {
        let _: i64 = left.incr("visits", 1).unwrap();
    }
    for _ in 0..5 {
        let _: i64 = right.incr("visits", 2).unwrap();
    }
    // A delete on the minority side.
    let _: i64 = left.del("doomed").unwrap();
    // On the minority side a quorum write cannot be acknowledged. It is not refused either:
    // node 1 stored it, so the client hears that the outcome is unknown (not -TRYAGAIN, which
    // clients retry on their own), and it reaches the other replicas after the heal.
    let mut left_quorum = ap_conn(&c, 1, "quorum");
    let e = left_quorum
        .set::<_, _, ()>("needs-quorum", 1)
        .expect_err("one node of three cannot form a quorum");
    assert_eq!(e.code(), Some("UNCERTAIN"), "{e}");
    // The majority side can.
    let mut right_quorum = ap_conn(&c, 3, "quorum");
    let _: () = right_quorum.set("quorum-right", "ok").unwrap();

    // Heal; every replica of every key converges.
    partition(&c, &[&[1, 2, 3]]);
    wait_until_replicas_converge(&c);
    for node in 1..=3 {
        let mut r = ap_conn(&c, node, "all");
        assert_eq!(
            r.get::<_, Option<i64>>("needs-quorum").unwrap(),
            Some(1),
            "the write whose outcome was unknown took effect where it arrived"
        );
        for i in 0..30 {
            assert_eq!(
                r.get::<_, Option<i64>>(format!("left:{i}")).unwrap(),
                Some(i)
            );
            assert_eq!(
                r.get::<_, Option<i64>>(format!("right:{i}")).unwrap(),
                Some(i)
            );
        }
        for i in 0..50 {
            assert_eq!(
                r.get::<_, Option<i64>>(format!("acked:{i}")).unwrap(),
                Some(i),
                "a quorum-acknowledged write was lost"
            );
        }
        assert_eq!(r.get::<_, i64>("visits").unwrap(), 10 + 7 + 10);
        assert_eq!(
            r.get::<_, Option<String>>("doomed").unwrap(),
            None,
            "deleted stays deleted"
        );
        assert_eq!(
            r.get::<_, Option<String>>("contested").unwrap().as_deref(),
            Some("from-right"),
            "last writer wins"
        );
        assert_eq!(
            r.get::<_, Option<String>>("quorum-right")
                .unwrap()
                .as_deref(),
            Some("ok")
        );
    }
    // The reconciliation report accounts for it.
    let (code, body) = http(
        c.node(2).http,
        "GET",
        "/v1/cluster/reconcile-report",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    let report = json(&body);
    let t = &report["keyspaces"]["events"]["totals"];
    let moved = t["hints_delivered"].as_u64().unwrap()
        + t["keys_repaired"].as_u64().unwrap()
        + t["conflicts"].as_u64().unwrap();
    assert!(moved > 0, "nothing reconciled? {report:#}");
    let out = std::process::Command::new(BIN)
        .args([
            "cluster",
            "reconcile-report",
            "--addr",
            &c.node(1).http.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("keyspace events:"),
        "{text}"
    );
}

/// The cluster's reconcile report, asked of node 1.
fn reconcile_report(c: &Cluster) -> serde_json::Value {
    let (code, body) = http(
        c.node(1).http,
        "GET",
        "/v1/cluster/reconcile-report",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

/// The reconcile report's sum over every node of bytes that merges stored in `events`.
fn merge_bytes_stored(c: &Cluster) -> u64 {
    let report = reconcile_report(c);
    assert_eq!(report["unreachable_nodes"], serde_json::json!([]));
    report["keyspaces"]["events"]["totals"]["merge_bytes_stored"]
        .as_u64()
        .unwrap_or(0)
}

/// Element records of `events` stored on each node.
fn element_records(c: &Cluster) -> Vec<u64> {
    let report = reconcile_report(c);
    (1..=3)
        .map(|n| {
            report["nodes"][n.to_string()]["keyspaces"]["events"]["storage"]["element_records"]
                .as_u64()
                .unwrap_or_else(|| panic!("node {n} reports no element records: {report:#}"))
        })
        .collect()
}

/// Bytes that merges stored in `events` on node `n`, from the reconcile report.
fn merge_bytes_stored_on(c: &Cluster, n: u64) -> u64 {
    let report = reconcile_report(c);
    report["nodes"][n.to_string()]["keyspaces"]["events"]["totals"]["merge_bytes_stored"]
        .as_u64()
        .unwrap_or_else(|| panic!("node {n} reports no merge bytes: {report:#}"))
}

/// A pipeline sent to a follower (its reads are forwarded to the leader, gathered) answers
/// each command in order: reads see the writes before them in the pipeline and every write
/// acknowledged to another client before it was sent, and writes after them stay unseen.
#[test]
fn a_pipeline_of_reads_through_a_follower_answers_each_in_order() {
    let c = Cluster::start(3);
    let leader = c.leader();
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut on_leader = c.node(leader).client();
    let mut on_follower = c.node(follower).client();
    for i in 0..100 {
        let _: () = on_leader.set(format!("p{i}"), i).unwrap();
    }
    let _: i64 = redis::cmd("HSET")
        .arg("ph")
        .arg("f")
        .arg("v")
        .query(&mut on_leader)
        .unwrap();
    let mut p = redis::pipe();
    for i in 0..100 {
        p.cmd("GET").arg(format!("p{i}"));
    }
    p.cmd("HGET").arg("ph").arg("f");
    p.cmd("SET").arg("p5").arg("changed");
    p.cmd("GET").arg("p5");
    p.cmd("INCR").arg("p6");
    p.cmd("GET").arg("p6");
    p.cmd("GET").arg("ph");
    p.cmd("GET").arg("p-missing");
    let results: Vec<RedisResult<redis::Value>> =
        p.ignore_errors().query(&mut on_follower).unwrap();
    let bulk = |v: &str| redis::Value::BulkString(v.as_bytes().to_vec());
    for (i, got) in results.iter().take(100).enumerate() {
        assert_eq!(got.as_ref().unwrap(), &bulk(&i.to_string()), "p{i}");
    }
    assert_eq!(results[100].as_ref().unwrap(), &bulk("v"));
    assert_eq!(results[101].as_ref().unwrap(), &redis::Value::Okay);
    assert_eq!(results[102].as_ref().unwrap(), &bulk("changed"));
    assert_eq!(results[103].as_ref().unwrap(), &redis::Value::Int(7));
    assert_eq!(results[104].as_ref().unwrap(), &bulk("7"));
    let wrong = results[105].as_ref().unwrap_err().to_string();
    assert!(wrong.contains("WRONGTYPE"), "{wrong}");
    assert_eq!(results[106].as_ref().unwrap(), &redis::Value::Nil);
    assert_eq!(results.len(), 107);
}

/// An `ap` pipeline's GETs are read together, shard by shard: when one shard cannot meet the
/// level (a replica cut off, level `all`), only the GETs of that shard fail; the others answer.
#[test]
fn ap_pipelined_gets_fail_only_on_the_shard_out_of_reach() {
    let c = Cluster::start(5);
    let (code, body) = http(
        c.node(1).http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"events","mode":"ap","replication_factor":3,"shards":4}"#),
    )
    .unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    // Every shard's replicas, by slot range, once the keyspace is in the map.
    let deadline = Instant::now() + Duration::from_secs(15);
    let shards: Vec<((u64, u64), Vec<u64>)> = loop {
        let st = c.status();
        let found = st["keyspaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "events")
            .map(|k| {
                k["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| {
                        let slots = (
                            s["slots"][0].as_u64().unwrap(),
                            s["slots"][1].as_u64().unwrap(),
                        );
                        let replicas: Vec<u64> = s["replicas"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|r| r.as_u64().unwrap())
                            .collect();
                        (slots, replicas)
                    })
                    .collect::<Vec<_>>()
            });
        if let Some(found) = found.filter(|f| f.len() == 4 && f.iter().all(|(_, r)| r.len() == 3)) {
            break found;
        }
        assert!(Instant::now() < deadline, "keyspace not placed: {st:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // A node (not the coordinator) holding some shards but not all.
    let cut = (2..=5)
        .find(|n| {
            let holds = shards.iter().filter(|(_, r)| r.contains(n)).count();
            holds > 0 && holds < shards.len()
        })
        .expect("5 nodes, 4 shards of 3 replicas: some node holds some but not all");
    let mut q = ap_conn(&c, 1, "all");
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    for k in &keys {
        let _: () = q.set(k, k).unwrap();
    }
    let held_by_cut = |k: &str| {
        let slot: u64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query(&mut c.node(1).client())
            .unwrap();
        shards
            .iter()
            .find(|((lo, hi), _)| (*lo..=*hi).contains(&slot))
            .unwrap()
            .1
            .contains(&cut)
    };
    let expect_fail: Vec<bool> = keys.iter().map(|k| held_by_cut(k)).collect();
    assert!(expect_fail.iter().any(|f| *f) && expect_fail.iter().any(|f| !*f));

    let others: Vec<u64> = (1..=5).filter(|&n| n != cut).collect();
    partition(&c, &[&others, &[cut]]);
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("GET").arg(k);
    }
    let results: Vec<RedisResult<Option<String>>> = p.ignore_errors().query(&mut q).unwrap();
    for ((k, r), fail) in keys.iter().zip(&results).zip(&expect_fail) {
        match (r, fail) {
            (Ok(v), false) => assert_eq!(v.as_deref(), Some(k.as_str())),
            (Err(e), true) => assert!(e.to_string().contains("replicas"), "{k}: {e}"),
            (r, _) => panic!("{k} (shard holds node {cut}: {fail}): {r:?}"),
        }
    }
}

/// (partial, fallback) point reads coordinated by node `n` since it started (see
/// `capdb_data::point`: commands naming their elements read only those of a big collection).
fn point_reads_on(c: &Cluster, n: u64) -> (u64, u64) {
    let report = reconcile_report(c);
    let p = &report["nodes"][n.to_string()]["point_reads"];
    let get = |what: &str| {
        p[what]
            .as_u64()
            .unwrap_or_else(|| panic!("node {n} reports no point reads: {report:#}"))
    };
    (get("partial"), get("fallback"))
}

/// Commands that name their elements (HSET, HGET, HDEL, SADD, SISMEMBER, ZADD, ZSCORE, ...) on
/// a big `ap` collection read those elements, the collection's head and one visible element,
/// not the collection: every one below is answered from such a partial read, with Redis's
/// replies, through two different coordinators, and what they wrote reads back whole. A set
/// emptied member by member that way is gone, and comes back as a new, compact set.
#[test]
fn ap_point_commands_on_a_big_collection_read_only_the_elements_they_name() {
    let c = Cluster::start(3);
    let mut q = create_events_keyspace(&c, "quorum");
    let value = "v".repeat(100);
    let mut hset = redis::cmd("HSET");
    hset.arg("h");
    let mut sadd = redis::cmd("SADD");
    sadd.arg("s");
    let mut zadd = redis::cmd("ZADD");
    zadd.arg("z");
    for i in 0..300 {
        hset.arg(format!("f{i:03}")).arg(&value);
        sadd.arg(format!("m{i:03}"));
        zadd.arg(i).arg(format!("m{i:03}"));
    }
    let _: i64 = hset.query(&mut q).unwrap();
    let _: i64 = sadd.query(&mut q).unwrap();
    let _: i64 = zadd.query(&mut q).unwrap();
    let mut emptied = redis::cmd("SADD");
    emptied.arg("gone");
    for i in 0..200 {
        emptied.arg(format!("x{i:03}"));
    }
    let _: i64 = emptied.query(&mut q).unwrap();
    wait_until_replicas_converge(&c);

    let before = [point_reads_on(&c, 2), point_reads_on(&c, 3)];
    let mut on_2 = ap_conn(&c, 2, "quorum");
    let mut on_3 = ap_conn(&c, 3, "quorum");
    type Case = (&'static str, redis::Value);
    use redis::Value::{Array, BulkString as B, Int, Nil};
    let b = |s: &str| B(s.as_bytes().to_vec());
    let cases: Vec<Case> = vec![
        ("HSET h new x", Int(1)),
        ("HGET h new", b("x")),
        ("HGET h f007", b(&value)),
        ("HMGET h f001 nope", Array(vec![b(&value), Nil])),
        ("HINCRBY h n 5", Int(5)),
        ("HINCRBYFLOAT h n 1.5", b("6.5")),
        ("HEXISTS h f003", Int(1)),
        ("HSTRLEN h f003", Int(100)),
        ("HSETNX h new y", Int(0)),
        ("HDEL h new nope", Int(1)),
        ("SADD s m001 extra", Int(1)),
        ("SISMEMBER s m005", Int(1)),
        ("SMISMEMBER s m006 zz", Array(vec![Int(1), Int(0)])),
        ("SREM s extra m007", Int(2)),
        ("ZADD z 5 m001 1000 newm", Int(1)),
        ("ZADD z xx ch gt 9999 m002", Int(1)),
        ("ZSCORE z m001", b("5")),
        ("ZINCRBY z 2 m001", b("7")),
        ("ZMSCORE z m002 nope", Array(vec![b("9999"), Nil])),
        ("ZREM z newm m003", Int(2)),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let conn = if i % 2 == 0 { &mut on_2 } else { &mut on_3 };
        let words: Vec<&str> = line.split(' ').collect();
        let got: redis::Value = redis::cmd(words[0]).arg(&words[1..]).query(conn).unwrap();
        assert_eq!(&got, want, "{line}");
    }
    for i in 0..200 {
        let removed: i64 = redis::cmd("SREM")
            .arg("gone")
            .arg(format!("x{i:03}"))
            .query(&mut on_3)
            .unwrap();
        assert_eq!(removed, 1, "x{i:03}");
    }
    let after = [point_reads_on(&c, 2), point_reads_on(&c, 3)];
    let partial = after[0].0 - before[0].0 + after[1].0 - before[1].0;
    let fallback = after[0].1 - before[0].1 + after[1].1 - before[1].1;
    assert_eq!(
        (partial, fallback),
        (cases.len() as u64 + 200, 0),
        "every command read only what it names"
    );

    // What they wrote, read whole.
    let len: i64 = redis::cmd("HLEN").arg("h").query(&mut q).unwrap();
    assert_eq!(len, 301, "300 fields and n");
    let n: String = redis::cmd("HGET").arg("h").arg("n").query(&mut q).unwrap();
    assert_eq!(n, "6.5");
    let card: i64 = redis::cmd("SCARD").arg("s").query(&mut q).unwrap();
    assert_eq!(card, 299);
    let top: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("z")
        .arg(-2)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut q)
        .unwrap();
    assert_eq!(top, vec![("m299".into(), 299.0), ("m002".into(), 9999.0)]);
    let rank: i64 = redis::cmd("ZRANK")
        .arg("z")
        .arg("m001")
        .query(&mut q)
        .unwrap();
    assert_eq!(
        rank, 4,
        "after m000, m004, m005 and m006 (m003 is gone), m001 scores 7"
    );
    let exists: i64 = redis::cmd("EXISTS").arg("gone").query(&mut q).unwrap();
    assert_eq!(exists, 0, "a set emptied member by member is gone");
    let _: i64 = redis::cmd("SADD")
        .arg("gone")
        .arg(1)
        .query(&mut on_2)
        .unwrap();
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg("gone")
        .query(&mut q)
        .unwrap();
    assert_eq!(encoding, "intset", "a new incarnation starts compact");
}

/// A replica partitioned away while one field of a big hash was written is repaired with that
/// field (and the hash's small head), not the hash.
#[test]
fn ap_a_replica_that_missed_one_field_of_a_big_hash_is_repaired_with_that_field_alone() {
    let c = Cluster::start_with(3, &["--ap-anti-entropy-interval-ms", "1000"]);
    let mut q = create_events_keyspace(&c, "all");
    let value = "v".repeat(100);
    for batch in 0..10 {
        let mut cmd = redis::cmd("HSET");
        cmd.arg("big");
        for i in batch * 40..(batch + 1) * 40 {
            cmd.arg(format!("f{i:04}")).arg(&value);
        }
        let _: i64 = cmd.query(&mut q).unwrap();
    }
    wait_until_replicas_converge(&c);
    let before = merge_bytes_stored_on(&c, 3);

    partition(&c, &[&[1, 2], &[3]]);
    let mut majority = ap_conn(&c, 1, "quorum");
    let added: i64 = redis::cmd("HSET")
        .arg("big")
        .arg("late")
        .arg("x")
        .query(&mut majority)
        .unwrap();
    assert_eq!(added, 1);
    let mut minority = ap_conn(&c, 3, "one");
    let missed: Option<String> = redis::cmd("HGET")
        .arg("big")
        .arg("late")
        .query(&mut minority)
        .unwrap();
    assert_eq!(missed, None, "node 3 really missed the write");
    partition(&c, &[&[1, 2, 3]]);
    wait_until_replicas_converge(&c);

    let repaired = merge_bytes_stored_on(&c, 3) - before;
    assert!(
        repaired > 0 && repaired < 2048,
        "node 3 stored {repaired} bytes to catch up one field (the hash is over 40,000)"
    );
    let mut on_3 = ap_conn(&c, 3, "one");
    let late: Option<String> = redis::cmd("HGET")
        .arg("big")
        .arg("late")
        .query(&mut on_3)
        .unwrap();
    assert_eq!(late.as_deref(), Some("x"));
    let len: i64 = redis::cmd("HLEN").arg("big").query(&mut on_3).unwrap();
    assert_eq!(len, 401);
}

/// An `ap` hash is stored field by field: it may hold ten times the value limit, writing one
/// field of it stores a few hundred bytes per replica (not the hash), and after DEL every
/// replica shows nothing and reclaims its field records.
#[test]
fn ap_hash_bigger_than_the_value_limit_is_stored_per_field_and_reclaimed_after_del() {
    const VALUE_LIMIT: usize = 4096;
    const FIELDS: usize = 400;
    let c = Cluster::start_with(
        3,
        &[
            "--value-bytes-max",
            "4096",
            "--frame-bytes-max",
            "70000",
            "--ap-anti-entropy-interval-ms",
            "1000",
        ],
    );
    let mut q = create_events_keyspace(&c, "all");
    let value = "v".repeat(100);
    for batch in 0..FIELDS / 40 {
        let mut cmd = redis::cmd("HSET");
        cmd.arg("big");
        for i in batch * 40..(batch + 1) * 40 {
            cmd.arg(format!("f{i:04}")).arg(&value);
        }
        let added: i64 = cmd.query(&mut q).unwrap();
        assert_eq!(added, 40);
    }
    let hash_bytes = FIELDS * (5 + value.len());
    assert!(hash_bytes > 9 * VALUE_LIMIT);
    for node in 1..=3 {
        let mut r = ap_conn(&c, node, "one");
        let all: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg("big").query(&mut r).unwrap();
        assert_eq!(all.len(), FIELDS, "node {node}");
        assert!(all.values().all(|v| *v == value), "node {node}");
        let len: i64 = redis::cmd("HLEN").arg("big").query(&mut r).unwrap();
        assert_eq!(len, FIELDS as i64, "node {node}");
    }
    wait_until_replicas_converge(&c);

    let before = merge_bytes_stored(&c);
    let added: i64 = redis::cmd("HSET")
        .arg("big")
        .arg("f0000")
        .arg("changed")
        .query(&mut q)
        .unwrap();
    assert_eq!(added, 0);
    let stored = merge_bytes_stored(&c) - before;
    assert!(
        stored > 0 && stored < 3 * 1024,
        "writing one field stored {stored} bytes over three replicas (the hash is {hash_bytes} bytes)"
    );
    let got: Option<String> = redis::cmd("HGET")
        .arg("big")
        .arg("f0000")
        .query(&mut q)
        .unwrap();
    assert_eq!(got.as_deref(), Some("changed"));
    assert!(
        element_records(&c).iter().all(|&n| n >= FIELDS as u64),
        "every replica stores the fields as records"
    );

    let deleted: i64 = redis::cmd("DEL").arg("big").query(&mut q).unwrap();
    assert_eq!(deleted, 1);
    for node in 1..=3 {
        let mut r = ap_conn(&c, node, "one");
        let exists: i64 = redis::cmd("EXISTS").arg("big").query(&mut r).unwrap();
        let len: i64 = redis::cmd("HLEN").arg("big").query(&mut r).unwrap();
        assert_eq!((exists, len), (0, 0), "node {node} still shows the hash");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = element_records(&c);
        if left.iter().all(|&n| n == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "field records never reclaimed: {left:?} per node"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let size: i64 = redis::cmd("DBSIZE").query(&mut q).unwrap();
    assert_eq!(size, 0, "element records are never keys");
}

/// Issue 12's merge rules for `ap` collections, through a partition: hash fields last writer
/// wins per field, sets add-wins, sorted-set members last writer wins per member (one score
/// each), a list is one register (the later side's version wins whole and the report counts
/// the loss), a DEL loses to a field written after it, and a type conflict goes to the later
/// type.
#[test]
fn ap_collections_merge_by_their_rules_after_a_partition() {
    let c = Cluster::start_with(3, &["--ap-anti-entropy-interval-ms", "1000"]);
    let mut q = create_events_keyspace(&c, "all");
    let run = |conn: &mut redis::Connection, args: &[&str]| -> redis::Value {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(conn).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    // Before the partition, on every replica.
    run(&mut q, &["HSET", "h", "a", "1", "b", "2", "c", "3"]);
    run(&mut q, &["SADD", "s", "m1", "m2"]);
    run(&mut q, &["ZADD", "z", "1", "x", "2", "y"]);
    run(&mut q, &["RPUSH", "l", "base"]);
    run(&mut q, &["HSET", "doomed", "old", "v"]);

    partition(&c, &[&[1], &[2, 3]]);
    std::thread::sleep(Duration::from_secs(2)); // let the failure detectors notice
    let mut left = ap_conn(&c, 1, "one");
    let mut right = ap_conn(&c, 2, "one");
    // Left first, right a little later: where the rules are last-writer-wins, right wins.
    run(&mut left, &["HSET", "h", "a", "left", "d", "left-d"]);
    run(&mut left, &["HDEL", "h", "b"]);
    run(&mut left, &["SREM", "s", "m1", "m2"]);
    run(&mut left, &["SADD", "s", "l1"]);
    run(&mut left, &["ZADD", "z", "10", "x"]);
    run(&mut left, &["ZREM", "z", "y"]);
    run(&mut left, &["RPUSH", "l", "L1"]);
    run(&mut left, &["DEL", "doomed"]);
    run(&mut left, &["SET", "t", "a-string"]);
    std::thread::sleep(Duration::from_millis(20));
    run(&mut right, &["HSET", "h", "a", "right", "e", "right-e"]);
    // Right never saw left's SREM: its add of m1 survives it; m2 it did not touch stays removed.
    run(&mut right, &["SADD", "s", "m1", "r1"]);
    run(&mut right, &["ZADD", "z", "20", "x", "5", "w"]);
    run(&mut right, &["RPUSH", "l", "R1", "R2"]);
    run(&mut right, &["HSET", "doomed", "new", "v"]);
    run(&mut right, &["HSET", "t", "f", "v"]);
    // The sides really diverged: each sees only its own writes.
    let e_on_left: Option<String> = redis::cmd("HGET")
        .arg("h")
        .arg("e")
        .query(&mut left)
        .unwrap();
    let d_on_right: Option<String> = redis::cmd("HGET")
        .arg("h")
        .arg("d")
        .query(&mut right)
        .unwrap();
    assert_eq!((e_on_left, d_on_right), (None, None));

    partition(&c, &[&[1, 2, 3]]);
    wait_until_replicas_converge(&c);
    for node in 1..=3 {
        let mut r = ap_conn(&c, node, "one");
        let mut h: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg("h")
            .query::<std::collections::HashMap<String, String>>(&mut r)
            .unwrap()
            .into_iter()
            .collect();
        h.sort();
        let want = [
            ("a", "right"),
            ("c", "3"),
            ("d", "left-d"),
            ("e", "right-e"),
        ];
        assert_eq!(
            h,
            want.map(|(f, v)| (f.to_string(), v.to_string())).to_vec(),
            "node {node}: per-field last writer wins, the delete of b kept"
        );
        let mut s: Vec<String> = redis::cmd("SMEMBERS").arg("s").query(&mut r).unwrap();
        s.sort();
        assert_eq!(
            s,
            ["l1", "m1", "r1"],
            "node {node}: add wins over a remove that did not see it"
        );
        let z: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg("z")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut r)
            .unwrap();
        assert_eq!(
            z,
            vec![("w".to_string(), 5.0), ("x".to_string(), 20.0)],
            "node {node}: one score per member, the later write's"
        );
        let zcard: i64 = redis::cmd("ZCARD").arg("z").query(&mut r).unwrap();
        assert_eq!(zcard, 2);
        let l: Vec<String> = redis::cmd("LRANGE")
            .arg("l")
            .arg(0)
            .arg(-1)
            .query(&mut r)
            .unwrap();
        assert_eq!(
            l,
            ["base", "R1", "R2"],
            "node {node}: the later list version wins whole"
        );
        let mut doomed: Vec<String> = redis::cmd("HKEYS").arg("doomed").query(&mut r).unwrap();
        doomed.sort();
        assert_eq!(
            doomed,
            ["new"],
            "node {node}: a field written after the DEL survives it"
        );
        let t: String = redis::cmd("TYPE").arg("t").query(&mut r).unwrap();
        assert_eq!(t, "hash", "node {node}: the type written last wins");
    }
    // Blocking pops work on ap too: a client blocked on node 2 is served by a push through
    // node 3.
    let waiter = {
        let mut on2 = ap_conn(&c, 2, "all");
        std::thread::spawn(move || -> (String, String) {
            redis::cmd("BLPOP")
                .arg("jobs")
                .arg(30)
                .query(&mut on2)
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut on3 = ap_conn(&c, 3, "all");
    run(&mut on3, &["RPUSH", "jobs", "job-1"]);
    assert_eq!(
        waiter.join().unwrap(),
        ("jobs".to_string(), "job-1".to_string())
    );
    let left: i64 = redis::cmd("LLEN").arg("jobs").query(&mut on3).unwrap();
    assert_eq!(left, 0);

    // Field expiry cannot merge field by field: refused, nothing applied.
    let mut r = ap_conn(&c, 1, "all");
    let e = redis::cmd("HEXPIRE")
        .arg("h")
        .arg(100)
        .arg("FIELDS")
        .arg(1)
        .arg("a")
        .query::<redis::Value>(&mut r)
        .expect_err("HEXPIRE on ap");
    assert!(
        e.to_string().contains("not available on ap keyspaces"),
        "{e}"
    );
    let a: Option<String> = redis::cmd("HGET").arg("h").arg("a").query(&mut r).unwrap();
    assert_eq!(a.as_deref(), Some("right"));
    // The report says what was lost.
    let (code, body) = http(
        c.node(1).http,
        "GET",
        "/v1/cluster/reconcile-report",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    let report = json(&body);
    let t = &report["keyspaces"]["events"]["totals"];
    assert!(
        t["list_versions_lost"].as_u64().unwrap() >= 1,
        "the discarded list version is reported: {report:#}"
    );
    assert!(
        t["type_conflicts"].as_u64().unwrap() >= 1,
        "the type conflict is reported: {report:#}"
    );
}

/// The Kubernetes StatefulSet recipe (deploy/kubernetes/statefulset.yaml): every pod gets the
/// same flags, takes its node id from its host name, and names the founders by DNS name; the
/// first three pods found the cluster, later ones join. Whatever order they start in, there is
/// exactly one cluster.
#[test]
fn statefulset_pods_form_one_cluster_whatever_order_they_start_in() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let peers: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let initial: Vec<String> = (0..3)
        .map(|i| format!("{}=localhost:{}", i + 1, peers[i]))
        .collect();
    let initial = initial.join(",");
    let mut pods: Vec<Server> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let advertise = format!("localhost:{p}");
            let mut s = Server::prepare(
                *p,
                &[
                    "--node-id-from-hostname",
                    "--initial-cluster",
                    &initial,
                    "--advertise-addr",
                    &advertise,
                ],
            );
            s.env.push(("HOSTNAME".into(), format!("capdb-{i}")));
            s
        })
        .collect();
    // The last pod first, founders in reverse, with pauses: the worst order.
    for i in [3, 1, 2, 0] {
        pods[i].spawn_no_wait();
        std::thread::sleep(Duration::from_millis(700));
    }
    for p in &mut pods {
        p.wait_ready()
            .unwrap_or_else(|log| panic!("pod did not become ready: {log}"));
    }
    // One cluster: every pod sees the same four members and the same meta leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<(Vec<u64>, Option<u64>)> = pods
            .iter()
            .map(|p| {
                let (_, body) = http(p.http, "GET", "/v1/cluster", &[], None).unwrap();
                let v = json(&body);
                let ids = v["nodes"]
                    .as_array()
                    .map(|n| n.iter().filter_map(|n| n["id"].as_u64()).collect())
                    .unwrap_or_default();
                (ids, v["meta_leader"].as_u64())
            })
            .collect();
        let one_cluster = views
            .iter()
            .all(|(ids, leader)| *ids == vec![1, 2, 3, 4] && leader.is_some())
            && views.windows(2).all(|w| w[0].1 == w[1].1);
        if one_cluster {
            break;
        }
        assert!(Instant::now() < deadline, "not one cluster: {views:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // And it works as one: a write through the joined pod is read through a founder.
    let mut c4 = pods[3].client();
    set_retrying(&mut c4, "hello", "statefulset");
    let v: Option<String> = pods[0].client().get("hello").unwrap();
    assert_eq!(v.as_deref(), Some("statefulset"));
}

/// Tombstones go once every replica holds them and they are older than the grace period; the
/// deleted keys stay deleted and the replicas stay identical.
#[test]
fn ap_tombstones_are_collected_once_every_replica_holds_them() {
    let c = Cluster::start_with(
        3,
        &[
            "--ap-anti-entropy-interval-ms",
            "300",
            "--ap-tombstone-grace-ms",
            "1000",
        ],
    );
    let (code, _) = http(
        c.node(1).http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"events","mode":"ap","replication_factor":3}"#),
    )
    .unwrap();
    assert_eq!(code, 201);
    std::thread::sleep(Duration::from_millis(500));
    let mut all = ap_conn(&c, 1, "all");
    for i in 0..20 {
        let _: () = all.set(format!("k{i}"), i).unwrap();
    }
    for i in 0..10 {
        let _: i64 = all.del(format!("k{i}")).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http(
            c.node(2).http,
            "GET",
            "/v1/cluster/reconcile-report",
            &[],
            None,
        )
        .unwrap();
        let purged = json(&body)["keyspaces"]["events"]["totals"]["tombstones_purged"]
            .as_u64()
            .unwrap_or(0);
        if purged >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tombstones not collected on every replica: {purged} of 30"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in 1..=3 {
        let mut r = ap_conn(&c, node, "all");
        for i in 0..10 {
            assert_eq!(r.get::<_, Option<i64>>(format!("k{i}")).unwrap(), None);
        }
        for i in 10..20 {
            assert_eq!(r.get::<_, Option<i64>>(format!("k{i}")).unwrap(), Some(i));
        }
    }
    let d = digests(&c);
    assert!(d.windows(2).all(|w| w[0] == w[1]), "{d:?}");
}

/// The leader of the `default` shard holding `key`, as the cluster map reports it.
fn shard_leader_of(c: &Cluster, conn: &mut redis::Connection, key: &str) -> u64 {
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(conn)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = c.status();
        let leader = st["keyspaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|ks| ks["name"] == "default")
            .flat_map(|ks| ks["shards"].as_array().unwrap().iter())
            .find(|s| s["slots"][0].as_u64() <= Some(slot) && Some(slot) <= s["slots"][1].as_u64())
            .and_then(|s| s["leader"].as_u64());
        if let Some(l) = leader {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader for {key}: {st:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a client heard and what the cluster holds after writes sent through a follower whose
/// answers from the leader are lost once each (the leader applied them; the follower retries).
struct LostAnswers {
    /// The reply to `SET k v2 IFEQ v1` (the register held v1).
    cas_reply: Option<String>,
    /// The register afterwards, read on the leader.
    register: Option<String>,
    /// The reply to `INCRBY c 5` (the counter did not exist).
    incr_reply: i64,
    /// The counter afterwards, read on the leader.
    counter: Option<i64>,
}

fn writes_through_a_follower_losing_answers(extra: &[&str]) -> LostAnswers {
    let mut args = vec!["--debug-fault-injection"];
    args.extend_from_slice(extra);
    let c = Cluster::start_with(3, &args);
    let key = "{eo}register";
    let counter = "{eo}counter";
    let mut any = c.node(1).client();
    let leader = shard_leader_of(&c, &mut any, key);
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut via_follower = c.node(follower).client();
    set_retrying(&mut via_follower, key, "v1");
    let lose_next_answer = || {
        let (code, body) = http(
            c.node(follower).http,
            "POST",
            "/v1/debug/lose-write-answers",
            &[],
            Some(br#"{"count":1}"#),
        )
        .unwrap();
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    };
    lose_next_answer();
    let cas_reply: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg("v2")
        .arg("IFEQ")
        .arg("v1")
        .query(&mut via_follower)
        .unwrap();
    lose_next_answer();
    let incr_reply: i64 = via_follower.incr(counter, 5).unwrap();
    let mut on_leader = c.node(leader).client();
    let out = LostAnswers {
        cas_reply,
        register: on_leader.get(key).unwrap(),
        incr_reply,
        counter: on_leader.get(counter).unwrap(),
    };
    // Both answers really were dropped (neither test passes vacuously).
    let dropped = c
        .node(follower)
        .log()
        .matches("fault injection: the leader's answer is dropped")
        .count();
    assert_eq!(
        dropped, 2,
        "the follower forwarded both writes and lost both answers"
    );
    out
}

#[test]
fn a_forwarded_write_whose_answer_is_lost_is_applied_once_and_answered_truthfully() {
    let r = writes_through_a_follower_losing_answers(&[]);
    // The retried compare-and-set is answered with its first outcome: it took effect.
    assert_eq!(
        r.cas_reply.as_deref(),
        Some("OK"),
        "the client must hear the true outcome"
    );
    assert_eq!(r.register.as_deref(), Some("v2"));
    // The retried increment is counted once, and the client hears that count.
    assert_eq!(r.incr_reply, 5);
    assert_eq!(r.counter, Some(5));
}

#[test]
fn with_exactly_once_off_the_same_lost_answers_double_apply() {
    // The deliberately broken mode shows what the test above guards against.
    let r = writes_through_a_follower_losing_answers(&["--debug-apply-duplicates"]);
    assert_eq!(r.cas_reply, None, "the second copy fails its own check");
    assert_eq!(
        r.register.as_deref(),
        Some("v2"),
        "although the first took effect"
    );
    assert_eq!(r.incr_reply, 10);
    assert_eq!(r.counter, Some(10), "counted twice");
}

#[test]
fn a_client_blocked_on_one_node_is_served_by_a_push_through_another() {
    let c = Cluster::start(3);
    // BLPOP on node 2 waits; the push goes through node 3 (the shard's leader may be any of
    // the three): the blocked client gets the element, and the list is left empty.
    let waiter = {
        let mut on2 = c.node(2).client();
        std::thread::spawn(move || -> (String, String) {
            redis::cmd("BLPOP")
                .arg("jobs")
                .arg(30)
                .query(&mut on2)
                .unwrap()
        })
    };
    // The push must come after the client blocked: wait until node 2 reports it blocked (or,
    // at worst, the element is popped by the first attempt, which the assertion accepts too).
    std::thread::sleep(Duration::from_millis(300));
    let mut on3 = c.node(3).client();
    let _: i64 = on3.rpush("jobs", "job-1").unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        ("jobs".to_string(), "job-1".to_string())
    );
    let left: i64 = on3.llen("jobs").unwrap();
    assert_eq!(left, 0, "the element was popped exactly once");

    // A sorted set and BLMOVE, the same way.
    let waiter = {
        let mut on1 = c.node(1).client();
        std::thread::spawn(move || -> (String, String, f64) {
            redis::cmd("BZPOPMIN")
                .arg("{q}z")
                .arg(30)
                .query(&mut on1)
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let _: i64 = on3.zadd("{q}z", "m", 2.5).unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        ("{q}z".to_string(), "m".to_string(), 2.5)
    );

    // A client that disconnects while blocked takes nothing.
    {
        let mut gone = std::net::TcpStream::connect(c.node(2).resp).unwrap();
        std::io::Write::write_all(&mut gone, b"BLPOP gone 0\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    let _: i64 = on3.rpush("gone", "kept").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let kept: Vec<String> = on3.lrange("gone", 0, -1).unwrap();
    assert_eq!(kept, ["kept"], "nothing is popped for a client that left");
}
