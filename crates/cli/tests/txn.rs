//! MULTI/EXEC/DISCARD/WATCH/UNWATCH against the real binary, with the `redis` crate and
//! redis-cli: Redis's rules in every keyspace mode, SELECT inside MULTI, the one-shard rule,
//! bounds, and on a 3-node cluster a transaction through a follower, a WATCH broken through
//! another node, and a retried EXEC whose answer was lost.
//!
//! Byte-for-byte agreement with redis-server over random transactions is the differential
//! tester's job (`capdb difftest`, the transaction family); these tests name each rule.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, http, need_tool, raw_resp};
use redis::{Commands, Value};

/// Cluster tests run one at a time (a 2-core machine).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cmd(c: &mut redis::Connection, line: &str) -> redis::RedisResult<Value> {
    let mut q = redis::cmd(line.split(' ').next().unwrap());
    for a in line.split(' ').skip(1) {
        q.arg(a);
    }
    q.query(c)
}

fn ok(c: &mut redis::Connection, line: &str) -> Value {
    cmd(c, line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// The error line a command answers (`CODE detail`).
fn err(c: &mut redis::Connection, line: &str) -> String {
    match cmd(c, line) {
        Err(e) => format!("{} {}", e.code().unwrap_or("?"), e.detail().unwrap_or("")),
        Ok(v) => panic!("{line}: expected an error, got {v:?}"),
    }
}

/// A connection that returns replies as they are, errors inside arrays included (the `redis`
/// crate turns an array holding an error into an error).
struct Raw {
    stream: std::net::TcpStream,
    parser: redis::Parser,
}

impl Raw {
    fn new(s: &Server, keyspace: &str) -> Raw {
        let stream = std::net::TcpStream::connect(s.resp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut raw = Raw {
            stream,
            parser: redis::Parser::new(),
        };
        assert_eq!(raw.call(&format!("SELECT {keyspace}")), Value::Okay);
        raw
    }

    fn call(&mut self, line: &str) -> Value {
        let mut q = redis::cmd(line.split(' ').next().unwrap());
        for a in line.split(' ').skip(1) {
            q.arg(a);
        }
        self.stream.write_all(&q.get_packed_command()).unwrap();
        self.parser.parse_value(&mut self.stream).unwrap()
    }
}

fn queued(c: &mut redis::Connection, line: &str) {
    assert_eq!(
        ok(c, line),
        Value::SimpleString("QUEUED".into()),
        "{line} is queued"
    );
}

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

/// Creates a keyspace and waits until this node's catalog has it.
fn create_keyspace(s: &Server, spec: &str, name: &str) {
    let (code, body) = http(s.http, "POST", "/v1/keyspaces", &[], Some(spec.as_bytes())).unwrap();
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let mut c = s.client();
    let deadline = Instant::now() + Duration::from_secs(15);
    while cmd(&mut c, &format!("SELECT {name}")).is_err() {
        assert!(Instant::now() < deadline, "keyspace {name} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection to `keyspace` on `s`.
fn client_in(s: &Server, keyspace: &str) -> redis::Connection {
    let mut c = s.client();
    ok(&mut c, &format!("SELECT {keyspace}"));
    c
}

/// One node with a keyspace of each mode: `default` (cp), `ap1` (ap), `c1` (cache).
fn node_with_every_mode() -> Server {
    let s = Server::start();
    create_keyspace(
        &s,
        r#"{"name":"ap1","mode":"ap","replication_factor":1}"#,
        "ap1",
    );
    create_keyspace(
        &s,
        r#"{"name":"c1","mode":"cache","max_memory_bytes":16777216}"#,
        "c1",
    );
    s
}

const MODES: [&str; 3] = ["default", "ap1", "c1"];

#[test]
fn queued_commands_run_in_order_and_reads_see_the_writes_before_them_in_every_mode() {
    let s = node_with_every_mode();
    for ks in MODES {
        let mut c = client_in(&s, ks);
        let _: () = c.del(&["{t}a", "{t}l"]).unwrap();
        ok(&mut c, "MULTI");
        queued(&mut c, "SET {t}a 5");
        queued(&mut c, "INCR {t}a");
        queued(&mut c, "GET {t}a");
        queued(&mut c, "RPUSH {t}l x y");
        queued(&mut c, "LRANGE {t}l 0 -1");
        queued(&mut c, "TYPE {t}l");
        queued(&mut c, "PING");
        let replies = ok(&mut c, "EXEC");
        assert_eq!(
            replies,
            Value::Array(vec![
                Value::Okay,
                Value::Int(6),
                bulk("6"),
                Value::Int(2),
                Value::Array(vec![bulk("x"), bulk("y")]),
                Value::SimpleString("list".into()),
                Value::SimpleString("PONG".into()),
            ]),
            "keyspace {ks}"
        );
        // A plain GET after EXEC's reply sees its writes.
        let a: String = c.get("{t}a").unwrap();
        assert_eq!(a, "6", "keyspace {ks}");
    }
}

#[test]
fn a_queue_time_error_discards_the_whole_transaction_and_a_run_time_error_fails_only_its_command() {
    let s = node_with_every_mode();
    for ks in MODES {
        let mut c = client_in(&s, ks);
        let _: () = c.set("{t}n", "1").unwrap();
        ok(&mut c, "MULTI");
        queued(&mut c, "SET {t}n 2");
        assert!(err(&mut c, "NOSUCHCOMMAND x").contains("unknown command"));
        assert!(err(&mut c, "GET").contains("wrong number of arguments"));
        let e = err(&mut c, "EXEC");
        assert!(
            e.contains("EXECABORT") && e.contains("previous errors"),
            "{ks}: {e}"
        );
        let n: String = c.get("{t}n").unwrap();
        assert_eq!(n, "1", "{ks}: nothing of a dirty transaction ran");

        let _: () = c.del("{t}h").unwrap();
        let mut raw = Raw::new(&s, ks);
        raw.call("MULTI");
        raw.call("HSET {t}h f v");
        raw.call("INCR {t}h");
        raw.call("INCRBY {t}n notanumber");
        raw.call("SET {t}n 3");
        let Value::Array(replies) = raw.call("EXEC") else {
            panic!("{ks}: EXEC answers an array");
        };
        assert_eq!(replies.len(), 4);
        assert_eq!(replies[0], Value::Int(1));
        assert!(
            matches!(&replies[1], Value::ServerError(e) if e.code() == "WRONGTYPE"),
            "{ks}: {:?}",
            replies[1]
        );
        assert!(matches!(&replies[2], Value::ServerError(_)), "{ks}");
        assert_eq!(replies[3], Value::Okay);
        let n: String = c.get("{t}n").unwrap();
        assert_eq!(n, "3", "{ks}: the commands around the failed ones ran");
    }
}

#[test]
fn misplaced_transaction_commands_answer_redis_errors() {
    let s = Server::start();
    let mut c = s.client();
    assert_eq!(err(&mut c, "EXEC"), "ERR EXEC without MULTI");
    assert_eq!(err(&mut c, "DISCARD"), "ERR DISCARD without MULTI");
    ok(&mut c, "MULTI");
    assert!(err(&mut c, "MULTI").contains("MULTI calls can not be nested"));
    assert!(err(&mut c, "WATCH k").contains("WATCH inside MULTI is not allowed"));
    queued(&mut c, "SET k 1");
    // Neither error made the transaction dirty.
    assert_eq!(ok(&mut c, "EXEC"), Value::Array(vec![Value::Okay]));
    // EXEC with an argument discards the transaction, with Redis's wording.
    ok(&mut c, "MULTI");
    queued(&mut c, "SET k 2");
    let e = err(&mut c, "EXEC now");
    assert!(e.contains("EXECABORT") && e.contains("wrong number of arguments for 'exec'"));
    assert!(err(&mut c, "EXEC").contains("EXEC without MULTI"));
    let k: String = c.get("k").unwrap();
    assert_eq!(k, "1");
    // DISCARD drops the queue.
    ok(&mut c, "MULTI");
    queued(&mut c, "SET k 3");
    assert_eq!(ok(&mut c, "DISCARD"), Value::Okay);
    let k: String = c.get("k").unwrap();
    assert_eq!(k, "1");
}

/// What a transaction guarded by `WATCH key` answers after `between` ran on another
/// connection (`None`: nothing ran).
fn exec_after(s: &Server, ks: &str, key: &str, prepare: &[&str], between: &[&str]) -> Value {
    let mut c = client_in(s, ks);
    let mut other = client_in(s, ks);
    let _: () = c.del(key).unwrap();
    for line in prepare {
        ok(&mut c, line);
    }
    ok(&mut c, &format!("WATCH {key}"));
    for line in between {
        ok(&mut other, line);
    }
    ok(&mut c, "MULTI");
    queued(&mut c, "PING");
    ok(&mut c, "EXEC")
}

#[test]
fn any_change_to_a_watched_key_makes_exec_answer_nil_in_every_mode() {
    let s = node_with_every_mode();
    let ran = Value::Array(vec![Value::SimpleString("PONG".into())]);
    for ks in MODES {
        let w = "{t}w";
        assert_eq!(exec_after(&s, ks, w, &[], &[]), ran, "{ks}: unchanged");
        assert_eq!(
            exec_after(&s, ks, w, &[], &["SET {t}other 1"]),
            ran,
            "{ks}: another key changed"
        );
        assert_eq!(
            exec_after(&s, ks, w, &["SET {t}w same"], &["SET {t}w same"]),
            Value::Nil,
            "{ks}: a SET of the same value is a change"
        );
        assert_eq!(
            exec_after(&s, ks, w, &["SET {t}w 1"], &["DEL {t}w", "SET {t}w 1"]),
            Value::Nil,
            "{ks}: deleted and re-created"
        );
        if ks != "ap1" {
            // ap compares versions (best effort): an absent key written and deleted again
            // looks unchanged there (the README says so).
            assert_eq!(
                exec_after(&s, ks, w, &[], &["SET {t}w 1", "DEL {t}w"]),
                Value::Nil,
                "{ks}: absent, written, absent again"
            );
            assert_eq!(
                exec_after(&s, ks, w, &["HSET {t}w f 1"], &["HSET {t}w f 2"]),
                Value::Nil,
                "{ks}: a field of a hash changed"
            );
        }
        // This client's own write counts too, and EXEC ends the watch either way.
        let mut c = client_in(&s, ks);
        ok(&mut c, "WATCH {t}w");
        ok(&mut c, "SET {t}w mine");
        ok(&mut c, "MULTI");
        queued(&mut c, "SET {t}w lost");
        assert_eq!(ok(&mut c, "EXEC"), Value::Nil, "{ks}: own write");
        let v: String = c.get("{t}w").unwrap();
        assert_eq!(v, "mine", "{ks}: an aborted transaction ran nothing");
        ok(&mut c, "SET {t}w again");
        ok(&mut c, "MULTI");
        queued(&mut c, "GET {t}w");
        assert_eq!(
            ok(&mut c, "EXEC"),
            Value::Array(vec![bulk("again")]),
            "{ks}: EXEC ended the watch"
        );
        // DISCARD and UNWATCH end watches.
        for end in ["DISCARD", "UNWATCH"] {
            ok(&mut c, "WATCH {t}w");
            ok(&mut c, "SET {t}w changed");
            if end == "DISCARD" {
                ok(&mut c, "MULTI");
            }
            ok(&mut c, end);
            ok(&mut c, "MULTI");
            queued(&mut c, "PING");
            assert_eq!(ok(&mut c, "EXEC"), ran, "{ks}: {end} ended the watch");
        }
    }
}

#[test]
fn a_watched_key_that_expires_after_watch_aborts_exec() {
    let s = node_with_every_mode();
    for ks in ["default", "c1"] {
        let mut c = client_in(&s, ks);
        ok(&mut c, "SET {t}e v PX 300");
        ok(&mut c, "WATCH {t}e");
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.exists::<_, bool>("{t}e").unwrap() {
            assert!(Instant::now() < deadline, "{ks}: the key never expired");
            std::thread::sleep(Duration::from_millis(50));
        }
        ok(&mut c, "MULTI");
        queued(&mut c, "PING");
        assert_eq!(ok(&mut c, "EXEC"), Value::Nil, "{ks}: expired after WATCH");
    }
}

#[test]
fn a_watch_abort_is_a_null_array_in_resp2_and_a_null_in_resp3() {
    let s = Server::start();
    let script = |hello: &str| format!("{hello}WATCH x\r\nSET x 1\r\nMULTI\r\nGET x\r\nEXEC\r\n");
    let resp2 = raw_resp(s.resp, script("").as_bytes(), Duration::from_secs(2));
    assert!(
        resp2.ends_with(b"+QUEUED\r\n*-1\r\n"),
        "{}",
        String::from_utf8_lossy(&resp2)
    );
    let resp3 = raw_resp(
        s.resp,
        script("HELLO 3\r\n").as_bytes(),
        Duration::from_secs(2),
    );
    assert!(
        resp3.ends_with(b"+QUEUED\r\n_\r\n"),
        "{}",
        String::from_utf8_lossy(&resp3)
    );
}

#[test]
fn select_inside_multi_addresses_the_selected_keyspace_and_modes_do_not_mix() {
    let s = node_with_every_mode();
    create_keyspace(
        &s,
        r#"{"name":"cp2","mode":"cp","replication_factor":1}"#,
        "cp2",
    );
    let mut c = s.client();
    let _: () = c.del("sel").unwrap();
    let mut raw = Raw::new(&s, "0");
    raw.call("MULTI");
    raw.call("SELECT cp2");
    raw.call("SET sel there");
    raw.call("SELECT nosuchkeyspace");
    raw.call("GET sel");
    let Value::Array(r) = raw.call("EXEC") else {
        panic!("an array")
    };
    assert_eq!(r[0], Value::Okay);
    assert_eq!(r[1], Value::Okay);
    assert!(matches!(&r[2], Value::ServerError(_)), "{:?}", r[2]);
    assert_eq!(r[3], bulk("there"), "the failed SELECT changed nothing");
    // The connection stays in the keyspace selected inside the transaction.
    assert_eq!(raw.call("GET sel"), bulk("there"));
    let v: Option<String> = c.get("sel").unwrap();
    assert_eq!(v, None, "default never saw it");

    // A cp key then a cache key: modes do not mix (queue-time error: EXECABORT).
    ok(&mut c, "MULTI");
    queued(&mut c, "SET {t}m 1");
    queued(&mut c, "SELECT c1");
    let e = err(&mut c, "SET {t}m 2");
    assert!(e.contains("cannot mix keyspaces of different modes"), "{e}");
    assert!(err(&mut c, "EXEC").contains("EXECABORT"));
    // Two cp keyspaces: one transaction over both (a cross-shard commit).
    ok(&mut c, "SELECT 0");
    ok(&mut c, "MULTI");
    queued(&mut c, "SET {t}m 1");
    queued(&mut c, "SELECT cp2");
    queued(&mut c, "SET {t}m 2");
    assert_eq!(
        ok(&mut c, "EXEC"),
        Value::Array(vec![Value::Okay, Value::Okay, Value::Okay])
    );
    let v: String = c.get("{t}m").unwrap();
    assert_eq!(v, "2", "the connection stays in cp2");
    ok(&mut c, "SELECT 0");
    let v: String = c.get("{t}m").unwrap();
    assert_eq!(v, "1");
}

/// Two keys of `c`'s keyspace (4 shards) on different shards.
fn keys_on_two_shards(c: &mut redis::Connection) -> (String, String) {
    let slot = |c: &mut redis::Connection, k: &str| -> i64 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query(c)
            .unwrap()
    };
    let a = "{a}k".to_string();
    let b = (0..100)
        .map(|i| format!("{{b{i}}}k"))
        .find(|k| slot(c, k) / 4096 != slot(c, &a) / 4096)
        .unwrap();
    (a, b)
}

/// One node with a keyspace `name` of `mode` and 4 shards; a client in it, and two keys on
/// different shards.
fn four_shards(mode: &str, name: &str) -> (Server, redis::Connection, String, String) {
    let s = Server::start();
    create_keyspace(
        &s,
        &format!(r#"{{"name":"{name}","mode":"{mode}","shards":4,"replication_factor":1}}"#),
        name,
    );
    let mut c = client_in(&s, name);
    let (a, b) = keys_on_two_shards(&mut c);
    (s, c, a, b)
}

#[test]
fn a_cp_transaction_over_several_shards_commits_on_every_shard_or_on_none() {
    let (s, mut c, a, b) = four_shards("cp", "four");
    ok(&mut c, "MULTI");
    queued(&mut c, &format!("SET {a} 1"));
    queued(&mut c, &format!("INCRBY {b} 5"));
    queued(&mut c, &format!("GET {a}"));
    queued(&mut c, &format!("RPUSH {b}l x y"));
    queued(&mut c, &format!("INCR {a}"));
    assert_eq!(
        ok(&mut c, "EXEC"),
        Value::Array(vec![
            Value::Okay,
            Value::Int(5),
            bulk("1"),
            Value::Int(2),
            Value::Int(2)
        ]),
        "replies in command order, each shard's reads seeing its writes before them"
    );
    let got: (String, String) = (c.get(&a).unwrap(), c.get(&b).unwrap());
    assert_eq!(got, ("2".into(), "5".into()));
    // A run-time error fails its command only, on any shard.
    let mut raw = Raw::new(&s, "four");
    raw.call("MULTI");
    raw.call(&format!("INCR {b}l"));
    raw.call(&format!("INCR {a}"));
    let Value::Array(r) = raw.call("EXEC") else {
        panic!("an array")
    };
    assert!(matches!(&r[0], Value::ServerError(_)), "{:?}", r[0]);
    assert_eq!(r[1], Value::Int(3));
    // A watched key changed on one shard aborts the writes on every shard.
    let mut other = client_in(&s, "four");
    ok(&mut c, &format!("WATCH {a} {b}"));
    let _: () = other.set(&b, "changed").unwrap();
    ok(&mut c, "MULTI");
    queued(&mut c, &format!("SET {a} from-txn"));
    queued(&mut c, &format!("SET {b} from-txn"));
    assert_eq!(ok(&mut c, "EXEC"), Value::Nil);
    let got: (String, String) = (c.get(&a).unwrap(), c.get(&b).unwrap());
    assert_eq!(got, ("3".into(), "changed".into()), "nothing applied");
    // Unchanged, the same transaction commits everywhere.
    ok(&mut c, &format!("WATCH {a} {b}"));
    ok(&mut c, "MULTI");
    queued(&mut c, &format!("SET {a} from-txn"));
    queued(&mut c, &format!("SET {b} from-txn"));
    assert_eq!(
        ok(&mut c, "EXEC"),
        Value::Array(vec![Value::Okay, Value::Okay])
    );
    let got: (String, String) = (other.get(&a).unwrap(), other.get(&b).unwrap());
    assert_eq!(got, ("from-txn".into(), "from-txn".into()));
    // One command's keys must still be on one shard (Redis Cluster's rule for a command).
    ok(&mut c, "MULTI");
    let e = err(&mut c, &format!("MSET {a} 1 {b} 1"));
    assert!(e.starts_with("CROSSSLOT"), "{e}");
    assert!(err(&mut c, "EXEC").contains("EXECABORT"));
}

#[test]
fn ap_keyspaces_keep_the_one_shard_rule() {
    let (_s, mut c, a, b) = four_shards("ap", "apfour");
    ok(&mut c, "MULTI");
    queued(&mut c, &format!("SET {a} 1"));
    let e = err(&mut c, &format!("SET {b} 1"));
    assert!(e.starts_with("CROSSSLOT"), "{e}");
    assert!(err(&mut c, "EXEC").contains("EXECABORT"));
    let got: (Option<String>, Option<String>) = (c.get(&a).unwrap(), c.get(&b).unwrap());
    assert_eq!(got, (None, None), "nothing applied");
    assert!(err(&mut c, &format!("WATCH {a} {b}")).starts_with("CROSSSLOT"));
    ok(&mut c, &format!("WATCH {b}"));
    ok(&mut c, "MULTI");
    queued(&mut c, &format!("SET {a} 1"));
    assert!(err(&mut c, "EXEC").starts_with("CROSSSLOT"));
    let v: Option<String> = c.get(&a).unwrap();
    assert_eq!(v, None);
}

#[test]
fn blocking_pops_inside_multi_do_not_block() {
    let s = node_with_every_mode();
    for ks in MODES {
        let mut c = client_in(&s, ks);
        let _: () = c.del(&["{t}q", "{t}z"]).unwrap();
        ok(&mut c, "MULTI");
        queued(&mut c, "BLPOP {t}q 0");
        queued(&mut c, "BRPOPLPUSH {t}q {t}q2 0");
        queued(&mut c, "BZPOPMIN {t}z 0");
        queued(&mut c, "RPUSH {t}q a");
        queued(&mut c, "BLPOP {t}q 0");
        assert_eq!(
            ok(&mut c, "EXEC"),
            Value::Array(vec![
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Int(1),
                Value::Array(vec![bulk("{t}q"), bulk("a")]),
            ]),
            "{ks}"
        );
    }
}

#[test]
fn a_transaction_queues_at_most_ten_thousand_commands() {
    let s = Server::start();
    let mut c = s.client();
    let mut p = redis::pipe();
    p.cmd("MULTI");
    for i in 0..10_001 {
        p.cmd("SET").arg("bounded").arg(i);
    }
    let replies: Vec<redis::RedisResult<Value>> = {
        p.cmd("EXEC");
        // Each reply on its own: the bound's error is one of them.
        let packed = p.get_packed_pipeline();
        let mut raw = std::net::TcpStream::connect(s.resp).unwrap();
        raw.write_all(&packed).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut parser = redis::Parser::new();
        (0..10_003)
            .map(|_| parser.parse_value(&mut raw).and_then(|v| v.extract_error()))
            .collect()
    };
    assert!(replies[10_000].is_ok(), "the ten thousandth is queued");
    let e = replies[10_001].as_ref().unwrap_err();
    assert!(
        e.detail()
            .is_some_and(|d| d.contains("too many commands in one transaction")),
        "{e}"
    );
    let e = replies[10_002].as_ref().unwrap_err();
    assert_eq!(e.code(), Some("EXECABORT"), "{e}");
    let v: Option<String> = c.get("bounded").unwrap();
    assert_eq!(v, None);
}

#[test]
fn redis_cli_runs_a_transaction() {
    let cli = need_tool("redis-cli");
    let s = Server::start();
    let mut child = Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &s.resp.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"MULTI\nSET cli 1\nINCR cli\nGET cli\nEXEC\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "OK\nQUEUED\nQUEUED\nQUEUED\nOK\n2\n2\n", "{text}");
}

// ---- on a 3-node cluster ----

struct Cluster {
    nodes: Vec<Server>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    fn start(extra: &[&str]) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let nodes = common::start_founders(3, |id| {
            let mut args = vec!["--label".to_string(), format!("zone=z{id}")];
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        });
        Cluster { nodes, _turn: turn }
    }

    fn node(&self, id: u64) -> &Server {
        &self.nodes[id as usize - 1]
    }

    /// The leader of the shard of `default` holding `key` (waits for one).
    fn leader_of(&self, key: &str) -> u64 {
        self.leader_in("default", key)
    }

    /// The leader of the shard of keyspace `ks` holding `key` (waits for one).
    fn leader_in(&self, ks: &str, key: &str) -> u64 {
        let mut c = self.node(1).client();
        let slot: u64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, body) = http(self.node(1).http, "GET", "/v1/cluster", &[], None).unwrap();
            let st = common::json(&body);
            let leader = st["keyspaces"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| k["name"] == ks)
                .flat_map(|ks| ks["shards"].as_array().unwrap().iter())
                .find(|s| {
                    s["slots"][0].as_u64() <= Some(slot) && Some(slot) <= s["slots"][1].as_u64()
                })
                .filter(|s| s["voters"].as_array().is_some_and(|v| v.len() == 3))
                .and_then(|s| s["leader"].as_u64());
            if let Some(l) = leader {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader for {key}: {st:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_transaction_through_a_follower_applies_and_a_plain_read_after_it_sees_it_everywhere() {
    let c = Cluster::start(&[]);
    let leader = c.leader_of("{f}a");
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut via = c.node(follower).client();
    ok(&mut via, "MULTI");
    queued(&mut via, "SET {f}a 1");
    queued(&mut via, "INCRBY {f}a 9");
    queued(&mut via, "RPUSH {f}l x");
    queued(&mut via, "GET {f}a");
    assert_eq!(
        ok(&mut via, "EXEC"),
        Value::Array(vec![Value::Okay, Value::Int(10), Value::Int(1), bulk("10")])
    );
    for n in 1..=3 {
        let mut conn = c.node(n).client();
        let v: String = conn.get("{f}a").unwrap();
        assert_eq!(v, "10", "a linearizable GET through node {n}");
        let l: Vec<String> = conn.lrange("{f}l", 0, -1).unwrap();
        assert_eq!(l, ["x"]);
    }
}

#[test]
fn a_watch_is_broken_by_a_write_through_another_node() {
    let c = Cluster::start(&[]);
    let leader = c.leader_of("{w}k");
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let other = (1..=3).find(|&n| n != leader && n != follower).unwrap();
    let mut watcher = c.node(follower).client();
    let mut writer = c.node(other).client();
    let _: () = watcher.set("{w}k", "0").unwrap();
    ok(&mut watcher, "WATCH {w}k");
    let _: () = writer.set("{w}k", "1").unwrap();
    ok(&mut watcher, "MULTI");
    queued(&mut watcher, "SET {w}k from-watcher");
    assert_eq!(ok(&mut watcher, "EXEC"), Value::Nil);
    let v: String = watcher.get("{w}k").unwrap();
    assert_eq!(v, "1");
    // Without the interfering write, the same transaction commits.
    ok(&mut watcher, "WATCH {w}k");
    ok(&mut watcher, "MULTI");
    queued(&mut watcher, "SET {w}k from-watcher");
    assert_eq!(ok(&mut watcher, "EXEC"), Value::Array(vec![Value::Okay]));
    let v: String = writer.get("{w}k").unwrap();
    assert_eq!(v, "from-watcher");
}

#[test]
fn a_forwarded_exec_whose_answer_is_lost_is_applied_once() {
    let c = Cluster::start(&["--debug-fault-injection"]);
    let leader = c.leader_of("{x}c");
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut via = c.node(follower).client();
    let _: () = via.del(&["{x}c", "{x}l"]).unwrap();
    ok(&mut via, "WATCH {x}c");
    ok(&mut via, "MULTI");
    queued(&mut via, "INCRBY {x}c 5");
    queued(&mut via, "RPUSH {x}l once");
    let (code, body) = http(
        c.node(follower).http,
        "POST",
        "/v1/debug/lose-write-answers",
        &[],
        Some(br#"{"count":1}"#),
    )
    .unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // The follower retries after the lost answer; the retry is answered with the first
    // outcome (the guard held then), not applied again (it would now fail its guard).
    assert_eq!(
        ok(&mut via, "EXEC"),
        Value::Array(vec![Value::Int(5), Value::Int(1)])
    );
    let mut on_leader = c.node(leader).client();
    let n: i64 = on_leader.get("{x}c").unwrap();
    assert_eq!(n, 5, "applied once");
    let l: Vec<String> = on_leader.lrange("{x}l", 0, -1).unwrap();
    assert_eq!(l, ["once"]);
    let dropped = c
        .node(follower)
        .log()
        .matches("fault injection: the leader's answer is dropped")
        .count();
    assert_eq!(dropped, 1, "the answer really was lost");
}

/// The value of `capdb_transactions_total{outcome="..."}` in `/metrics` (0 when absent).
fn transactions_counted(s: &Server, outcome: &str) -> u64 {
    let (code, body) = http(s.http, "GET", "/metrics", &[], None).unwrap();
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    let prefix = format!("capdb_transactions_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn every_exec_is_counted_by_how_it_ended() {
    let s = Server::start();
    let mut c = s.client();
    ok(&mut c, "MULTI");
    queued(&mut c, "SET {m}a 1");
    ok(&mut c, "EXEC");
    // A watched key this client changes: nil.
    ok(&mut c, "WATCH {m}a");
    ok(&mut c, "SET {m}a 2");
    ok(&mut c, "MULTI");
    queued(&mut c, "SET {m}a 3");
    assert_eq!(ok(&mut c, "EXEC"), Value::Nil);
    // A queue-time error: EXECABORT.
    ok(&mut c, "MULTI");
    assert!(err(&mut c, "NOSUCHCOMMAND x").contains("unknown command"));
    assert!(err(&mut c, "EXEC").starts_with("EXECABORT"));
    // Not a transaction: not counted.
    assert!(err(&mut c, "EXEC").contains("EXEC without MULTI"));
    assert_eq!(transactions_counted(&s, "committed"), 1);
    assert_eq!(transactions_counted(&s, "watch_aborted"), 1);
    assert_eq!(transactions_counted(&s, "discarded"), 1);
    assert_eq!(transactions_counted(&s, "failed"), 0);
}

// ---- cross-shard transactions on a 3-node cluster: a coordinator that dies ----

/// A 3-node cluster where node 3 dies (on purpose) in the middle of the first cross-shard
/// transaction it coordinates, at `crash`; a keyspace `four` (4 shards, 3 replicas each).
fn cluster_with_a_dying_coordinator(crash: &str) -> Cluster {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let nodes = common::start_founders(3, |id| {
        let mut args = vec!["--label".to_string(), format!("zone=z{id}")];
        if id == 3 {
            args.extend(["--debug-txn-crash".to_string(), crash.to_string()]);
        }
        args
    });
    let c = Cluster { nodes, _turn: turn };
    create_keyspace(
        c.node(1),
        r#"{"name":"four","mode":"cp","shards":4,"replication_factor":3}"#,
        "four",
    );
    c
}

/// Retries `f` until it answers without an error (a key locked, a shard electing).
fn eventually<T>(what: &str, mut f: impl FnMut() -> redis::RedisResult<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: still failing: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Runs `MULTI; SET a 1; SET b 1; EXEC` through node 3, which dies in it; then, through node
/// 1, waits for both keys to be readable and writable again. Returns (a, b) as read then,
/// and how long the locks outlived the coordinator.
fn transaction_whose_coordinator_dies(crash: &str) -> (Option<String>, Option<String>, Duration) {
    let mut c = cluster_with_a_dying_coordinator(crash);
    let mut via1 = client_in(c.node(1), "four");
    let (a, b) = keys_on_two_shards(&mut via1);
    // Every shard has a leader and takes writes through node 3 before the test starts.
    let mut via3 = client_in(c.node(3), "four");
    for k in [&a, &b] {
        eventually("a first write", || {
            redis::cmd("SET").arg(k).arg("0").query::<()>(&mut via3)
        });
        eventually("a first delete", || {
            redis::cmd("DEL").arg(k).query::<i64>(&mut via3)
        });
    }
    ok(&mut via3, "MULTI");
    queued(&mut via3, &format!("SET {a} 1"));
    queued(&mut via3, &format!("SET {b} 1"));
    assert!(cmd(&mut via3, "EXEC").is_err(), "the coordinator died");
    let died = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.nodes[2].is_running() {
        assert!(Instant::now() < deadline, "node 3 did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.node(3).log().contains("TESTING: the coordinator dies"));
    // Plain reads of the locked keys wait for the locks; both see the same outcome.
    let got_a: Option<String> = eventually("GET a", || via1.get(&a));
    let got_b: Option<String> = eventually("GET b", || via1.get(&b));
    let released = died.elapsed();
    // And the keys take plain writes again.
    let _: () = eventually("SET a", || via1.set(&a, "after"));
    let _: () = eventually("SET b", || via1.set(&b, "after"));
    (got_a, got_b, released)
}

#[test]
fn a_coordinator_that_dies_after_every_prepare_is_committed_by_the_cluster() {
    let (a, b, released) = transaction_whose_coordinator_dies("after-prepares");
    // Every shard voted yes: the transaction is committed, on every shard.
    assert_eq!((a.as_deref(), b.as_deref()), (Some("1"), Some("1")));
    eprintln!("locks released {released:?} after the coordinator died");
}

#[test]
fn a_coordinator_that_dies_after_one_prepare_is_aborted_by_the_cluster() {
    let (a, b, released) = transaction_whose_coordinator_dies("after-one-prepare");
    // One shard prepared, the other never heard: the recovery prevents it and aborts.
    assert_eq!((a, b), (None, None));
    eprintln!("locks released {released:?} after the coordinator died");
}

/// Cross-shard transactions keep running while the leader of one participant shard is killed
/// (kill -9, whatever is in flight then) and comes back: each one commits on both shards or
/// on neither (the two counters stay equal), every EXEC answered with replies counted, none
/// applied twice.
#[test]
fn cross_shard_transactions_stay_all_or_nothing_when_a_participant_leader_is_killed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut c = Cluster::start(&[]);
    create_keyspace(
        c.node(1),
        r#"{"name":"four","mode":"cp","shards":4,"replication_factor":3}"#,
        "four",
    );
    let mut probe = client_in(c.node(1), "four");
    let (a, b) = keys_on_two_shards(&mut probe);
    let victim = c.leader_in("four", &a);
    let via = (1..=3).find(|&n| n != victim).unwrap();
    let mut client = client_in(c.node(via), "four");
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (a, b, done, stop) = (a.clone(), b.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut committed, mut maybe) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                ok(&mut client, "MULTI");
                queued(&mut client, &format!("INCR {a}"));
                queued(&mut client, &format!("INCR {b}"));
                match cmd(&mut client, "EXEC") {
                    Ok(Value::Array(r)) => {
                        assert_eq!(r.len(), 2, "{r:?}");
                        assert_eq!(r[0], r[1], "the two counters move together: {r:?}");
                        committed += 1;
                    }
                    // -TRYAGAIN: certainly not applied; anything else may have been.
                    Err(e) if e.code() == Some("TRYAGAIN") => {}
                    Err(_) => maybe += 1,
                    Ok(other) => panic!("EXEC answered {other:?}"),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (client, committed, maybe)
        })
    };
    let after = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let from = done.load(Ordering::Relaxed);
        while done.load(Ordering::Relaxed) < from + n {
            assert!(Instant::now() < deadline, "transactions stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    after(20);
    c.nodes[victim as usize - 1].kill9();
    after(40);
    c.nodes[victim as usize - 1].spawn();
    after(20);
    stop.store(true, Ordering::Relaxed);
    let (mut client, committed, maybe) = load.join().unwrap();
    let got_a: Option<i64> = eventually("GET a", || client.get(&a));
    let got_b: Option<i64> = eventually("GET b", || client.get(&b));
    let (got_a, got_b) = (got_a.unwrap_or(0) as u64, got_b.unwrap_or(0) as u64);
    assert_eq!(got_a, got_b, "all or nothing on both shards");
    assert!(
        committed <= got_a && got_a <= committed + maybe,
        "{committed} committed and {maybe} unknown, but the counters say {got_a}"
    );
    assert!(committed >= 40, "most transactions commit: {committed}");
}

// ---- HTTP: POST /v1/txn ----

fn post_txn(s: &Server, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (code, out) = http(
        s.http,
        "POST",
        "/v1/txn",
        &[],
        Some(body.to_string().as_bytes()),
    )
    .unwrap();
    (code, common::json(&out))
}

#[test]
fn http_transactions_run_every_operation_when_every_guard_holds_and_none_otherwise() {
    let (s, mut c, a, b) = four_shards("cp", "four");
    let _: () = c.set(&a, "1").unwrap();
    // Guards hold: every operation runs, on both shards, results in order.
    let (code, out) = post_txn(
        &s,
        serde_json::json!({"keyspace": "four",
            "guards": [{"key": a, "value": "1"}, {"key": b, "exists": false}],
            "ops": [{"op": "put", "key": b, "value": "2"}, {"op": "get", "key": a},
                    {"op": "delete", "key": a}, {"op": "get", "key": b}]}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(
        out,
        serde_json::json!({"committed": true, "results": [
            {"written": true}, {"value": "1"}, {"deleted": 1}, {"value": "2"}]})
    );
    let got: (Option<String>, String) = (c.get(&a).unwrap(), c.get(&b).unwrap());
    assert_eq!(got, (None, "2".into()));
    // A guard fails: nothing runs, and the answer names it with what the key holds.
    let (code, out) = post_txn(
        &s,
        serde_json::json!({"keyspace": "four",
            "guards": [{"key": a, "exists": false}, {"key": b, "value": "9"}],
            "ops": [{"op": "put", "key": a, "value": "x"}]}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["committed"], false);
    assert_eq!(out["failed_guard"]["index"], 1);
    assert_eq!(out["failed_guard"]["value"], "2");
    let version = out["failed_guard"]["version"].as_str().unwrap().to_string();
    let v: Option<String> = c.get(&a).unwrap();
    assert_eq!(v, None, "nothing ran");
    // A version guard: the key's timestamp as last seen.
    let (code, out) = post_txn(
        &s,
        serde_json::json!({"keyspace": "four",
            "guards": [{"key": b, "version": version}],
            "ops": [{"op": "put", "key": b, "value": "3"}]}),
    );
    assert_eq!(
        (code, &out["committed"]),
        (200, &serde_json::json!(true)),
        "{out}"
    );
    let (_, out) = post_txn(
        &s,
        serde_json::json!({"keyspace": "four",
            "guards": [{"key": b, "version": version}],
            "ops": [{"op": "put", "key": b, "value": "4"}]}),
    );
    assert_eq!(out["committed"], false, "the version moved on");
    // Bad input is a 400 with a reason.
    let (code, out) = post_txn(
        &s,
        serde_json::json!({"ops": [{"op": "frobnicate", "key": "k"}]}),
    );
    assert_eq!(code, 400, "{out}");
}
