//! Redis Cluster mode (`--redis-cluster`) with the real cluster tools and clients: redis-py's
//! `RedisCluster` scanning every master of a 3-node cluster, `redis-cli --cluster check|info`,
//! `redis-benchmark --cluster`; a scan cursor that outlives a leadership change; and reply
//! shapes compared with a real `redis-server` running in cluster mode.
//!
//! The nodes start with `--resp-keyspace kv`, a keyspace of three shards, because the
//! `default` keyspace has one shard and so one master. capdb does not balance leaderships yet,
//! and elections can put all three leaderships on one node; the launcher then drops and
//! recreates the keyspace until two nodes or more are masters (a bounded number of times), so
//! that "each key once" is tested across several masters.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{RedisServer, Server, free_port, http, need_tool};
use redis::Commands;

/// Tests in this file start clusters; on a 2-core machine they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The keyspace Redis Cluster clients see (`--resp-keyspace`).
const KEYSPACE: &str = "kv";

struct Cluster {
    nodes: Vec<Server>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Three founding nodes in Redis Cluster mode, with `kv` led by two nodes or more.
    fn start() -> Cluster {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let nodes = common::start_founders(3, |_| {
            vec![
                "--redis-cluster".into(),
                "--resp-keyspace".into(),
                KEYSPACE.into(),
            ]
        });
        let c = Cluster { nodes, _turn: turn };
        c.create_keyspace_with_several_masters();
        c
    }

    /// Creates `kv` (3 shards) and waits until every node lists the same masters, covering
    /// every slot; recreates it while elections put every leadership on one node.
    fn create_keyspace_with_several_masters(&self) {
        let body = format!(r#"{{"name":"{KEYSPACE}","mode":"cp","shards":3}}"#);
        for attempt in 0..10 {
            let (code, out) = http(
                self.nodes[0].http,
                "POST",
                "/v1/keyspaces",
                &[],
                Some(body.as_bytes()),
            )
            .unwrap();
            assert_eq!(code, 201, "{}", String::from_utf8_lossy(&out));
            let masters = self.wait_for_agreement();
            if masters.len() >= 2 {
                return;
            }
            eprintln!(
                "attempt {attempt}: every leadership of '{KEYSPACE}' is on one node; recreating it"
            );
            let (code, out) = http(
                self.nodes[0].http,
                "DELETE",
                &format!("/v1/keyspaces/{KEYSPACE}"),
                &[],
                None,
            )
            .unwrap();
            assert!(code < 300, "{}", String::from_utf8_lossy(&out));
        }
        panic!("10 keyspaces in a row were led by one node");
    }

    /// Waits (bounded) until every node's `CLUSTER NODES` lists the same masters with the same
    /// slots, covering all 16384 and every shard led; returns master id -> slot ranges.
    fn wait_for_agreement(&self) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let views: Vec<Option<BTreeMap<String, String>>> = self
                .nodes
                .iter()
                .map(|s| {
                    let mut c = redis::Client::open(s.redis_url())
                        .ok()?
                        .get_connection()
                        .ok()?;
                    let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).ok()?;
                    Some(masters(&text))
                })
                .collect();
            let led = self.every_shard_led();
            if led
                && let Some(Some(first)) = views.first()
                && views.iter().all(|v| v.as_ref() == Some(first))
                && slots_covered(first) == 16384
            {
                return first.clone();
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not agree on the masters of '{KEYSPACE}': {views:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether every node reports a leader for every shard of `kv`.
    fn every_shard_led(&self) -> bool {
        self.nodes.iter().all(|s| {
            let Ok((200, body)) = http(s.http, "GET", "/v1/cluster", &[], None) else {
                return false;
            };
            let st = common::json(&body);
            st["keyspaces"].as_array().is_some_and(|all| {
                all.iter().any(|ks| {
                    ks["name"] == KEYSPACE
                        && ks["shards"]
                            .as_array()
                            .is_some_and(|sh| sh.iter().all(|s| s["leader"].is_u64()))
                })
            })
        })
    }

    /// The node serving RESP on `port`.
    fn by_port(&self, port: u16) -> &Server {
        self.nodes.iter().find(|s| s.resp.port() == port).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, s) in self.nodes.iter().enumerate() {
                let log = s.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- node {} log (last 30 lines) ----", i + 1);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// `CLUSTER NODES` text -> (master id -> its slot ranges as listed).
fn masters(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 8 && f[2].contains("master")).then(|| (f[0].to_string(), f[8..].join(" ")))
        })
        .collect()
}

/// One `CLUSTER NODES` line.
struct Listed {
    id: String,
    port: u16,
    myself: bool,
    master: bool,
    /// The master's id for a replica.
    of: String,
    ranges: String,
}

fn listing(text: &str) -> Vec<Listed> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Listed {
                id: f[0].to_string(),
                port: f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap(),
                myself: f[2].contains("myself"),
                master: f[2].contains("master"),
                of: f[3].to_string(),
                ranges: f[8..].join(" "),
            }
        })
        .collect()
}

/// How many slots the listed ranges cover.
fn slots_covered(masters: &BTreeMap<String, String>) -> usize {
    masters
        .values()
        .flat_map(|r| r.split(' '))
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// The Redis Cluster hash slot of a key, as the server computes it (`CLUSTER KEYSLOT`).
fn key_slot(conn: &mut redis::Connection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(conn)
        .unwrap()
}

/// Whether slot `slot` is in `ranges` (`CLUSTER NODES` form: `a-b c d-e`).
fn in_ranges(ranges: &str, slot: u16) -> bool {
    ranges.split(' ').filter(|r| !r.is_empty()).any(|r| {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&slot)
    })
}

fn dbsize(c: &mut redis::Connection) -> i64 {
    redis::cmd("DBSIZE").query(c).unwrap()
}

fn conn(s: &Server) -> redis::Connection {
    s.client()
}

/// A connection that forwards instead of answering `-MOVED` (writes from any node).
fn forwarding_conn(s: &Server) -> redis::Connection {
    let mut c = s.client();
    let _: () = redis::cmd("CLUSTER")
        .arg("REDIRECT")
        .arg("OFF")
        .query(&mut c)
        .unwrap();
    c
}

/// The Python that has redis-py (Debian's python3-redis lives in the system interpreter).
fn python_with_redis_cluster() -> Option<String> {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import redis.cluster"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py.to_string());
        }
    }
    None
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const SCAN_PY: &str = r#"
import json, sys
from redis.cluster import RedisCluster
rc = RedisCluster(host="127.0.0.1", port=int(sys.argv[1]), decode_responses=True)
print(json.dumps({
    "scan": list(rc.scan_iter(count=25)),
    "scan_match": list(rc.scan_iter(match="user:1*", count=7)),
    "dbsize": rc.dbsize(target_nodes=RedisCluster.PRIMARIES),
    "keys": rc.keys(target_nodes=RedisCluster.PRIMARIES),
    "primaries": sorted(n.name for n in rc.get_primaries()),
    "get": rc.get("user:42"),
}))
"#;

#[test]
fn cluster_clients_and_tools_see_each_key_on_exactly_one_master() {
    let c = Cluster::start();
    let n = 500;
    let mut expected = BTreeSet::new();
    let mut w = forwarding_conn(&c.nodes[0]);
    let mut pipe = redis::pipe();
    for i in 0..n {
        let key = if i % 10 == 0 {
            format!("{{tag}}:user:{i}")
        } else {
            format!("user:{i}")
        };
        pipe.set(&key, i).ignore();
        expected.insert(key);
    }
    let _: () = pipe.query(&mut w).unwrap();

    // Every master counts its own slots; a replica answers for its master's, as in Redis.
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut conn(&c.nodes[0]))
        .unwrap();
    let nodes = listing(&text);
    let size_of = |port: u16| -> i64 { dbsize(&mut conn(c.by_port(port))) };
    let per_master: BTreeMap<&str, i64> = nodes
        .iter()
        .filter(|l| l.master)
        .map(|l| (l.id.as_str(), size_of(l.port)))
        .collect();
    assert_eq!(
        per_master.values().sum::<i64>(),
        n,
        "DBSIZE over masters:\n{text}"
    );
    for l in nodes.iter().filter(|l| !l.master) {
        assert_eq!(
            size_of(l.port),
            per_master[l.of.as_str()],
            "replica {}",
            l.id
        );
    }

    // A key led elsewhere answers -MOVED with its slot and its master, as Redis Cluster does.
    let slot_of_42 = key_slot(&mut conn(&c.nodes[0]), "user:42");
    let owner = nodes
        .iter()
        .find(|l| l.master && in_ranges(&l.ranges, slot_of_42))
        .unwrap();
    let other = nodes.iter().find(|l| l.id != owner.id).unwrap();
    let e = conn(c.by_port(other.port))
        .get::<_, Option<String>>("user:42")
        .unwrap_err();
    assert_eq!(e.code(), Some("MOVED"), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{slot_of_42} 127.0.0.1:{}", owner.port)),
        "{e}"
    );
    let mut at_owner = conn(c.by_port(owner.port));
    assert_eq!(at_owner.get::<_, String>("user:42").unwrap(), "42");

    // redis-py's RedisCluster: SCAN on every primary, united; DBSIZE and KEYS summed.
    match python_with_redis_cluster() {
        None => eprintln!(
            "SKIPPED the redis-py part: no python3 with redis-py (Debian: apt-get install python3-redis; .ci/run installs it)"
        ),
        Some(py) => {
            let out = Command::new(py)
                .args(["-c", SCAN_PY, &c.nodes[2].resp.port().to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "redis-py: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v = common::json(&out.stdout);
            let scanned: Vec<String> = serde_json::from_value(v["scan"].clone()).unwrap();
            let unique: BTreeSet<String> = scanned.iter().cloned().collect();
            assert_eq!(scanned.len(), unique.len(), "a key came back twice");
            assert_eq!(unique, expected, "scan_iter over the primaries");
            let matched: BTreeSet<String> =
                serde_json::from_value(v["scan_match"].clone()).unwrap();
            let want: BTreeSet<String> = expected
                .iter()
                .filter(|k| k.starts_with("user:1"))
                .cloned()
                .collect();
            assert_eq!(matched, want, "scan_iter(match=...)");
            assert_eq!(v["dbsize"], n, "{v}");
            let keys: Vec<String> = serde_json::from_value(v["keys"].clone()).unwrap();
            assert_eq!(keys.len(), n as usize);
            assert_eq!(keys.into_iter().collect::<BTreeSet<_>>(), expected);
            assert!(v["primaries"].as_array().unwrap().len() >= 2, "{v}");
            assert_eq!(v["get"], "42");
        }
    }

    // redis-cli --cluster check|info, from a master and from every other node.
    let cli = need_tool("redis-cli");
    for s in &c.nodes {
        let addr = s.resp.to_string();
        let (ok, text) = run(Command::new(&cli).args(["--cluster", "check", &addr]));
        assert!(
            ok && !text.contains("[ERR]"),
            "--cluster check {addr}:\n{text}"
        );
        assert!(text.contains("[OK] All 16384 slots covered"), "{text}");
        assert!(text.contains("[OK] All nodes agree"), "{text}");
        let (ok, text) = run(Command::new(&cli).args(["--cluster", "info", &addr]));
        assert!(
            ok && !text.contains("[ERR]"),
            "--cluster info {addr}:\n{text}"
        );
        assert!(text.contains(&format!("[OK] {n} keys in")), "{text}");
    }

    // redis-benchmark --cluster: finds the masters, sends each its own slots' keys, and any
    // error reply (other than -MOVED/-ASK) would make it exit 1.
    let port = c.nodes[1].resp.port().to_string();
    let (ok, text) = run(Command::new(need_tool("redis-benchmark")).args([
        "--cluster",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        "set,get",
        "-n",
        "2000",
        "-q",
    ]));
    assert!(ok, "redis-benchmark --cluster:\n{text}");
    assert!(text.contains("master nodes"), "{text}");
    for test in ["SET", "GET"] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("{test}: ")) && l.contains("requests per second")),
            "no {test} result:\n{text}"
        );
    }
}

/// Keys of `expected` whose slot is in `ranges`.
fn keys_in(
    conn: &mut redis::Connection,
    expected: &BTreeSet<String>,
    ranges: &str,
) -> BTreeSet<String> {
    expected
        .iter()
        .filter(|k| in_ranges(ranges, key_slot(conn, k)))
        .cloned()
        .collect()
}

fn scan_page(conn: &mut redis::Connection, cursor: u64) -> (u64, Vec<String>) {
    let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
        .arg(cursor)
        .arg("COUNT")
        .arg(20)
        .query(conn)
        .unwrap();
    (next.parse().unwrap(), keys)
}

#[test]
fn a_scan_cursor_finishes_the_slots_it_began_with_after_a_leadership_change() {
    let c = Cluster::start();
    let mut w = forwarding_conn(&c.nodes[0]);
    let expected: BTreeSet<String> = (0..300).map(|i| format!("k{i}")).collect();
    for k in &expected {
        let _: () = w.set(k, 1).unwrap();
    }
    // Several masters, as the cluster started; an election on a loaded machine can gather
    // every leadership on one node for a while (then that node's slots are all of them,
    // and the scan must finish them just the same).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, nodes) = loop {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut w).unwrap();
        let nodes = listing(&text);
        if nodes.iter().filter(|l| l.master).count() >= 2 || Instant::now() > deadline {
            break (text, nodes);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let first = nodes.iter().find(|l| l.master).unwrap();
    let master = c.by_port(first.port);
    let mine = keys_in(&mut w, &expected, &first.ranges);
    assert!(!mine.is_empty(), "{text}");

    // First page while it leads, then it hands every leadership away.
    let mut m = conn(master);
    let (mut cursor, mut seen) = scan_page(&mut m, 0);
    assert_ne!(cursor, 0);
    let (code, body) = http(master.http, "POST", "/v1/cluster/step-down", &[], None).unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: String = redis::cmd("CLUSTER").arg("NODES").query(&mut m).unwrap();
        if listing(&now).iter().any(|l| l.myself && !l.master) {
            break;
        }
        assert!(Instant::now() < deadline, "still a master:\n{now}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The cursor continues over the slots it began with, each key once.
    while cursor != 0 {
        let (next, keys) = scan_page(&mut m, cursor);
        seen.extend(keys);
        cursor = next;
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "a key came back twice");
    assert_eq!(unique, mine);

    // A new scan on the node, now a replica, covers its new master's slots, as DBSIZE does.
    c.wait_for_agreement();
    let now: String = redis::cmd("CLUSTER").arg("NODES").query(&mut m).unwrap();
    let nodes = listing(&now);
    let me = nodes.iter().find(|l| l.myself).unwrap();
    assert!(!me.master, "{now}");
    let new_master = nodes.iter().find(|l| l.id == me.of).unwrap();
    let theirs = keys_in(&mut m, &expected, &new_master.ranges);
    let (mut cursor, mut seen) = scan_page(&mut m, 0);
    while cursor != 0 {
        let (next, keys) = scan_page(&mut m, cursor);
        seen.extend(keys);
        cursor = next;
    }
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), theirs);
    assert_eq!(dbsize(&mut m), theirs.len() as i64);
    let mut keys: Vec<String> = m.keys("k*").unwrap();
    keys.sort();
    assert_eq!(keys.into_iter().collect::<BTreeSet<_>>(), theirs);
}

/// A real `redis-server` in cluster mode serving all 16384 slots alone.
fn redis_cluster_node() -> RedisServer {
    let bus = free_port();
    let mut r = RedisServer::start_with(&[
        "--cluster-port",
        &bus.to_string(),
        "--cluster-enabled",
        "yes",
    ]);
    let mut c = r.client();
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query(&mut c)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
        if info.contains("cluster_state:ok") {
            return r;
        }
        assert!(Instant::now() < deadline, "redis-server cluster: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shape of a reply: types and lengths, with every string and integer blanked, so replies
/// of two servers with different addresses and ids compare.
fn shape(v: &redis::Value) -> String {
    match v {
        redis::Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(shape).collect::<Vec<_>>().join(",")
            )
        }
        redis::Value::Map(items) => format!(
            "{{{}}}",
            items
                .iter()
                .map(|(k, v)| format!("{}:{}", shape(k), shape(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        redis::Value::Int(_) => "i".into(),
        redis::Value::BulkString(_) | redis::Value::SimpleString(_) => "s".into(),
        redis::Value::Nil => "nil".into(),
        other => format!("{other:?}"),
    }
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
}

/// HELLO 2's `mode` field.
fn hello_mode(c: &mut redis::Connection) -> String {
    let v: Vec<redis::Value> = redis::cmd("HELLO").arg(2).query(c).unwrap();
    let at = v
        .iter()
        .position(|x| matches!(x, redis::Value::BulkString(b) if b == b"mode"))
        .unwrap();
    redis::from_redis_value(v[at + 1].clone()).unwrap()
}

#[test]
fn cluster_mode_replies_have_the_shapes_of_a_redis_cluster_node() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut redis = redis_cluster_node();
    let capdb = Server::start_with(&["--redis-cluster"]);
    let plain = Server::start();
    let mut r = redis.client();
    let mut c = capdb.client();
    for conn in [&mut r, &mut c] {
        let _: () = conn.set("foo", "bar").unwrap();
    }

    // What redis-cli --cluster, redis-benchmark and redis-py check first.
    for conn in [&mut r, &mut c] {
        let info: String = redis::cmd("INFO").query(conn).unwrap();
        assert_eq!(
            info_field(&info, "cluster_enabled").as_deref(),
            Some("1"),
            "{info}"
        );
        assert_eq!(info_field(&info, "redis_mode").as_deref(), Some("cluster"));
        assert_eq!(hello_mode(conn), "cluster");
    }

    // CLUSTER NODES: one line, same fields (id, addr@bus, flags, master, pings, epoch, link,
    // slots); Redis leaves the host empty until it has met another node.
    let line = |conn: &mut redis::Connection| -> Vec<String> {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(conn).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n'), "{text:?}");
        text.trim_end().split(' ').map(String::from).collect()
    };
    let (rl, cl) = (line(&mut r), line(&mut c));
    assert_eq!(rl.len(), cl.len(), "{rl:?} vs {cl:?}");
    assert_eq!(cl[0].len(), 40);
    assert!(
        cl[1].contains(&format!(":{}@", capdb.resp.port())),
        "{cl:?}"
    );
    for i in [2, 3, 4, 7, 8] {
        assert_eq!(rl[i], cl[i], "field {i}: {rl:?} vs {cl:?}");
    }

    // CLUSTER INFO: the fields capdb answers are Redis's, with the same values here.
    let fields = |conn: &mut redis::Connection| -> BTreeMap<String, String> {
        let text: String = redis::cmd("CLUSTER").arg("INFO").query(conn).unwrap();
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    };
    let (rf, cf) = (fields(&mut r), fields(&mut c));
    for (k, v) in &cf {
        assert!(rf.contains_key(k), "CLUSTER INFO field {k} is not Redis's");
        if !k.contains("epoch") {
            assert_eq!(&rf[k], v, "CLUSTER INFO {k}");
        }
    }

    // Reply shapes: the slot map, and the keyspace commands on a node serving every slot.
    let both = |args: &[&str], r: &mut redis::Connection, c: &mut redis::Connection| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let (rv, cv): (redis::Value, redis::Value) = (cmd.query(r).unwrap(), cmd.query(c).unwrap());
        (rv, cv)
    };
    for args in [&["CLUSTER", "SLOTS"][..], &["CLUSTER", "SHARDS"]] {
        let (rv, cv) = both(args, &mut r, &mut c);
        assert_eq!(shape(&rv), shape(&cv), "{args:?}: {rv:?} vs {cv:?}");
    }
    for args in [
        &["DBSIZE"][..],
        &["SCAN", "0"],
        &["SCAN", "0", "MATCH", "f*", "COUNT", "100"],
        &["KEYS", "*"],
        &["KEYS", "nomatch*"],
        &["CLUSTER", "KEYSLOT", "foo"],
    ] {
        let (rv, cv) = both(args, &mut r, &mut c);
        assert_eq!(rv, cv, "{args:?}");
    }

    // One connection can leave cluster mode; a server without --redis-cluster never is in it.
    let _: () = redis::cmd("CLUSTER")
        .arg("REDIRECT")
        .arg("OFF")
        .query(&mut c)
        .unwrap();
    let mut p = plain.client();
    for conn in [&mut c, &mut p] {
        let info: String = redis::cmd("INFO").arg("cluster").query(conn).unwrap();
        assert_eq!(
            info_field(&info, "cluster_enabled").as_deref(),
            Some("0"),
            "{info}"
        );
        assert_eq!(hello_mode(conn), "standalone");
    }
    for i in 0..25 {
        let _: () = p.set(format!("plain:{i}"), i).unwrap();
    }
    let mut keys: Vec<String> = p.keys("plain:1*").unwrap();
    keys.sort();
    let mut want: Vec<String> = (0..25)
        .map(|i| format!("plain:{i}"))
        .filter(|k| k.starts_with("plain:1"))
        .collect();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(dbsize(&mut p), 25);
}
