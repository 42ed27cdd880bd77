//! The Redis protocol, driven by the real `redis` crate against the real binary.

mod common;

use common::Server;
use redis::{Commands, RedisResult, Value};

/// Creates a keyspace over HTTP (`body`: its JSON spec), which must succeed.
fn create_keyspace(s: &Server, body: &[u8]) {
    let (status, answer) = common::http(
        s.http,
        "POST",
        "/v1/keyspaces",
        &[("content-type", "application/json")],
        Some(body),
    )
    .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
}

#[test]
fn strings_counters_and_conditional_sets() {
    let s = Server::start();
    let mut c = s.client();
    let _: () = c.set("k", "v").unwrap();
    assert_eq!(c.get::<_, String>("k").unwrap(), "v");
    assert_eq!(c.get::<_, Option<String>>("missing").unwrap(), None);
    // NX / XX / GET
    let r: Option<String> = redis::cmd("SET")
        .arg("k")
        .arg("w")
        .arg("NX")
        .query(&mut c)
        .unwrap();
    assert_eq!(r, None);
    let r: Option<String> = redis::cmd("SET")
        .arg("k")
        .arg("w")
        .arg("XX")
        .arg("GET")
        .query(&mut c)
        .unwrap();
    assert_eq!(r.as_deref(), Some("v"));
    assert_eq!(c.get::<_, String>("k").unwrap(), "w");
    let r: String = redis::cmd("SET")
        .arg("fresh")
        .arg("1")
        .arg("NX")
        .query(&mut c)
        .unwrap();
    assert_eq!(r, "OK");
    // Counters
    assert_eq!(c.incr::<_, _, i64>("n", 1).unwrap(), 1);
    assert_eq!(c.incr::<_, _, i64>("n", 41).unwrap(), 42);
    assert_eq!(c.decr::<_, _, i64>("n", 2).unwrap(), 40);
    assert_eq!(
        redis::cmd("DECR").arg("n").query::<i64>(&mut c).unwrap(),
        39
    );
    let e: RedisResult<i64> = c.incr("k", 1);
    assert!(e.unwrap_err().to_string().contains("not an integer"));
    let _: () = c.set("big", i64::MAX).unwrap();
    let e: RedisResult<i64> = c.incr("big", 1);
    assert!(e.unwrap_err().to_string().contains("overflow"));
    // APPEND, STRLEN, GETDEL, EXISTS, DEL, MSET/MGET
    assert_eq!(c.append::<_, _, i64>("s", "ab").unwrap(), 2);
    assert_eq!(c.append::<_, _, i64>("s", "cd").unwrap(), 4);
    assert_eq!(c.strlen::<_, i64>("s").unwrap(), 4);
    assert_eq!(
        redis::cmd("GETDEL")
            .arg("s")
            .query::<String>(&mut c)
            .unwrap(),
        "abcd"
    );
    assert_eq!(c.exists::<_, i64>("s").unwrap(), 0);
    let _: () = c.mset(&[("a", "1"), ("b", "2"), ("c", "3")]).unwrap();
    let v: Vec<Option<String>> = c.mget(&["a", "nope", "c"]).unwrap();
    assert_eq!(v, vec![Some("1".into()), None, Some("3".into())]);
    assert_eq!(
        redis::cmd("EXISTS")
            .arg("a")
            .arg("b")
            .arg("a")
            .arg("zz")
            .query::<i64>(&mut c)
            .unwrap(),
        3
    );
    assert_eq!(c.del::<_, i64>(&["a", "b", "zz"]).unwrap(), 2);
    assert_eq!(
        redis::cmd("UNLINK").arg("c").query::<i64>(&mut c).unwrap(),
        1
    );
    assert_eq!(
        redis::cmd("TYPE").arg("k").query::<String>(&mut c).unwrap(),
        "string"
    );
}

#[test]
fn expiry_commands_follow_redis() {
    let s = Server::start();
    let mut c = s.client();
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("v")
        .arg("EX")
        .arg(100)
        .query(&mut c)
        .unwrap();
    let ttl: i64 = c.ttl("t").unwrap();
    assert!((99..=100).contains(&ttl), "{ttl}");
    let pttl: i64 = c.pttl("t").unwrap();
    assert!(pttl > 98_000 && pttl <= 100_000, "{pttl}");
    // KEEPTTL keeps it, a plain SET clears it.
    let _: () = redis::cmd("SET")
        .arg("t")
        .arg("v2")
        .arg("KEEPTTL")
        .query(&mut c)
        .unwrap();
    assert!(c.ttl::<_, i64>("t").unwrap() > 0);
    let _: () = c.set("t", "v3").unwrap();
    assert_eq!(c.ttl::<_, i64>("t").unwrap(), -1);
    assert_eq!(c.ttl::<_, i64>("missing").unwrap(), -2);
    // EXPIRE / PERSIST / PEXPIRE
    assert_eq!(c.expire::<_, i64>("t", 50).unwrap(), 1);
    assert_eq!(c.persist::<_, i64>("t").unwrap(), 1);
    assert_eq!(c.persist::<_, i64>("t").unwrap(), 0);
    assert_eq!(c.expire::<_, i64>("missing", 5).unwrap(), 0);
    assert_eq!(c.pexpire::<_, i64>("t", 150).unwrap(), 1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        c.get::<_, Option<String>>("t").unwrap(),
        None,
        "expired keys are never served"
    );
    // EXPIRE with a non-positive time deletes at once; bad times are errors.
    let _: () = c.set("d", "v").unwrap();
    assert_eq!(c.expire::<_, i64>("d", -1).unwrap(), 1);
    assert_eq!(c.exists::<_, i64>("d").unwrap(), 0);
    let e: RedisResult<()> = redis::cmd("SET")
        .arg("x")
        .arg("v")
        .arg("EX")
        .arg(0)
        .query(&mut c);
    assert!(e.unwrap_err().to_string().contains("invalid expire time"));
    let e: RedisResult<()> = redis::cmd("SET")
        .arg("x")
        .arg("v")
        .arg("EX")
        .arg("soon")
        .query(&mut c);
    assert!(e.is_err());
    let _: () = redis::cmd("SETEX")
        .arg("se")
        .arg(100)
        .arg("v")
        .query(&mut c)
        .unwrap();
    assert!(c.ttl::<_, i64>("se").unwrap() > 0);
    assert_eq!(
        redis::cmd("SETNX")
            .arg("se")
            .arg("w")
            .query::<i64>(&mut c)
            .unwrap(),
        0
    );
}

#[test]
fn pipelines_keep_order_and_errors_in_place() {
    let s = Server::start();
    let mut c = s.client();
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("SET").arg(format!("p{i}")).arg(i);
        p.cmd("INCR").arg(format!("p{i}"));
        if i % 100 == 0 {
            p.cmd("GET").arg(format!("p{i}"));
            p.cmd("INCR").arg("not-a-number-holder");
            p.cmd("APPEND").arg("not-a-number-holder").arg("x");
        }
    }
    // Single error replies must not abort the pipeline: each command gets its own reply.
    let results: Vec<RedisResult<Value>> = p.ignore_errors().query(&mut c).unwrap();
    let mut idx = 0;
    for i in 0..500 {
        assert_eq!(results[idx].as_ref().unwrap(), &Value::Okay);
        assert_eq!(results[idx + 1].as_ref().unwrap(), &Value::Int(i + 1));
        idx += 2;
        if i % 100 == 0 {
            assert_eq!(
                results[idx].as_ref().unwrap(),
                &Value::BulkString((i + 1).to_string().into_bytes())
            );
            if i == 0 {
                assert_eq!(results[idx + 1].as_ref().unwrap(), &Value::Int(1));
            } else {
                let e = results[idx + 1].as_ref().unwrap_err().to_string();
                assert!(e.contains("not an integer"), "{e}");
            }
            assert!(results[idx + 2].is_ok());
            idx += 3;
        }
    }
    assert_eq!(idx, results.len());
    assert_eq!(c.get::<_, i64>("p499").unwrap(), 500);
}

/// A pipeline's GETs of a `cp` keyspace are read together (one barrier, one storage read per
/// shard); each must still answer as if it ran alone, in order, around the writes between them.
#[test]
fn gathered_gets_answer_each_in_order_around_writes() {
    let s = Server::start();
    let mut c = s.client();
    let mut p = redis::pipe();
    p.cmd("GET").arg("g-a");
    p.cmd("SET").arg("g-a").arg("1");
    p.cmd("GET").arg("g-a");
    p.cmd("RPUSH").arg("g-list").arg("x");
    p.cmd("GET").arg("g-list");
    p.cmd("GET").arg("g-missing");
    p.cmd("INCR").arg("g-a");
    p.cmd("GET").arg("g-a");
    // More GETs than one gather holds, over keys of every shard, each after its own SET.
    for i in 0..150 {
        p.cmd("SET").arg(format!("g{i}")).arg(i);
    }
    for i in 0..150 {
        p.cmd("GET").arg(format!("g{i}"));
    }
    p.cmd("DEL").arg("g7");
    p.cmd("GET").arg("g7");
    let results: Vec<RedisResult<Value>> = p.ignore_errors().query(&mut c).unwrap();
    let bulk = |v: &str| Value::BulkString(v.as_bytes().to_vec());
    assert_eq!(results[0].as_ref().unwrap(), &Value::Nil);
    assert_eq!(results[1].as_ref().unwrap(), &Value::Okay);
    assert_eq!(results[2].as_ref().unwrap(), &bulk("1"));
    assert_eq!(results[3].as_ref().unwrap(), &Value::Int(1));
    let wrong = results[4].as_ref().unwrap_err().to_string();
    assert!(wrong.contains("WRONGTYPE"), "{wrong}");
    assert_eq!(results[5].as_ref().unwrap(), &Value::Nil);
    assert_eq!(results[6].as_ref().unwrap(), &Value::Int(2));
    assert_eq!(results[7].as_ref().unwrap(), &bulk("2"));
    for i in 0..150 {
        assert_eq!(results[8 + i].as_ref().unwrap(), &Value::Okay);
        assert_eq!(results[158 + i].as_ref().unwrap(), &bulk(&i.to_string()));
    }
    assert_eq!(results[308].as_ref().unwrap(), &Value::Int(1));
    assert_eq!(results[309].as_ref().unwrap(), &Value::Nil);
    assert_eq!(results.len(), 310);
    // A gathered GET after a keyspace switch reads the keyspace selected when it was sent.
    create_keyspace(&s, br#"{"name":"9","mode":"cache"}"#);
    let mut p = redis::pipe();
    p.cmd("GET").arg("g-a");
    p.cmd("SELECT").arg(9);
    p.cmd("GET").arg("g-a");
    p.cmd("SELECT").arg(0);
    p.cmd("GET").arg("g-a");
    let results: Vec<Value> = p.query(&mut c).unwrap();
    assert_eq!(
        results,
        vec![bulk("2"), Value::Okay, Value::Nil, Value::Okay, bulk("2")]
    );
}

/// A pipeline's data-type reads of a `cp` keyspace run together with its GETs; each still
/// answers in order, after the writes before it and before the writes after it.
#[test]
fn gathered_data_type_reads_answer_in_order_around_writes() {
    let s = Server::start();
    let mut c = s.client();
    let mut p = redis::pipe();
    p.cmd("RPUSH").arg("dl").arg("a").arg("b").arg("c");
    p.cmd("HSET").arg("dh").arg("f").arg("v");
    p.cmd("SET").arg("ds").arg("x");
    p.cmd("LRANGE").arg("dl").arg(0).arg(-1);
    p.cmd("GET").arg("ds");
    p.cmd("HGET").arg("dh").arg("f");
    p.cmd("LLEN").arg("dl");
    p.cmd("HGET").arg("dl").arg("f");
    p.cmd("GET").arg("dl");
    p.cmd("RPUSH").arg("dl").arg("d");
    p.cmd("LLEN").arg("dl");
    p.cmd("LINDEX").arg("dl").arg(-1);
    p.cmd("HDEL").arg("dh").arg("f");
    p.cmd("HGET").arg("dh").arg("f");
    p.cmd("EXISTS").arg("dh");
    let results: Vec<RedisResult<Value>> = p.ignore_errors().query(&mut c).unwrap();
    let bulk = |v: &str| Value::BulkString(v.as_bytes().to_vec());
    assert_eq!(results[0].as_ref().unwrap(), &Value::Int(3));
    assert_eq!(results[1].as_ref().unwrap(), &Value::Int(1));
    assert_eq!(results[2].as_ref().unwrap(), &Value::Okay);
    assert_eq!(
        results[3].as_ref().unwrap(),
        &Value::Array(vec![bulk("a"), bulk("b"), bulk("c")])
    );
    assert_eq!(results[4].as_ref().unwrap(), &bulk("x"));
    assert_eq!(results[5].as_ref().unwrap(), &bulk("v"));
    assert_eq!(results[6].as_ref().unwrap(), &Value::Int(3));
    for i in [7, 8] {
        let wrong = results[i].as_ref().unwrap_err().to_string();
        assert!(wrong.contains("WRONGTYPE"), "{i}: {wrong}");
    }
    assert_eq!(results[9].as_ref().unwrap(), &Value::Int(4));
    assert_eq!(results[10].as_ref().unwrap(), &Value::Int(4));
    assert_eq!(results[11].as_ref().unwrap(), &bulk("d"));
    assert_eq!(results[12].as_ref().unwrap(), &Value::Int(1));
    assert_eq!(results[13].as_ref().unwrap(), &Value::Nil);
    assert_eq!(results[14].as_ref().unwrap(), &Value::Int(0));
    assert_eq!(results.len(), 15);
}

/// A cache keyspace runs a pipeline's single-key commands one at a time (each under its own
/// key's lock): each answers alone, and a command too big for the keyspace fails alone, as in
/// Redis; a multi-key command (MSET) still applies whole.
#[test]
fn a_cache_pipeline_answers_each_command_alone() {
    let s = Server::start();
    create_keyspace(
        &s,
        br#"{"name":"5","mode":"cache","max_memory_bytes":1048576}"#,
    );
    let mut c = s.client();
    let _: () = redis::cmd("SELECT").arg(5).query(&mut c).unwrap();
    let mut p = redis::pipe();
    p.cmd("SET").arg("a").arg("1");
    p.cmd("SET").arg("huge").arg(vec![b'x'; 2_000_000]);
    p.cmd("INCR").arg("a");
    p.cmd("RPUSH").arg("l").arg("x").arg("y");
    p.cmd("INCR").arg("l");
    p.cmd("MSET").arg("m1").arg("1").arg("m2").arg("2");
    p.cmd("GET").arg("a");
    let results: Vec<RedisResult<Value>> = p.ignore_errors().query(&mut c).unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &Value::Okay);
    let oom = results[1].as_ref().unwrap_err().to_string();
    assert!(oom.contains("OOM") || oom.contains("exceeds"), "{oom}");
    assert_eq!(results[2].as_ref().unwrap(), &Value::Int(2));
    assert_eq!(results[3].as_ref().unwrap(), &Value::Int(2));
    let wrong = results[4].as_ref().unwrap_err().to_string();
    assert!(wrong.contains("WRONGTYPE"), "{wrong}");
    assert_eq!(results[5].as_ref().unwrap(), &Value::Okay);
    assert_eq!(
        results[6].as_ref().unwrap(),
        &Value::BulkString(b"2".to_vec())
    );
    assert_eq!(c.get::<_, Option<String>>("huge").unwrap(), None);
    assert_eq!(c.mget::<_, Vec<String>>(&["m1", "m2"]).unwrap(), ["1", "2"]);
}

#[test]
fn keyspaces_are_selected_by_name_or_number_and_isolated() {
    let s = Server::start();
    create_keyspace(&s, br#"{"name":"7","mode":"cache"}"#);
    let mut c = s.client();
    let _: () = c.set("shared", "in-default").unwrap();
    let _: () = redis::cmd("SELECT").arg(7).query(&mut c).unwrap();
    assert_eq!(c.get::<_, Option<String>>("shared").unwrap(), None);
    let _: () = c.set("shared", "in-cache").unwrap();
    let _: () = redis::cmd("SELECT").arg("default").query(&mut c).unwrap();
    assert_eq!(c.get::<_, String>("shared").unwrap(), "in-default");
    let _: () = redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
    assert_eq!(c.get::<_, String>("shared").unwrap(), "in-default");
    let e: RedisResult<()> = redis::cmd("SELECT").arg("nope").query(&mut c);
    assert!(e.unwrap_err().to_string().contains("does not exist"));
    // Numbered databases through the client URL work the same way.
    let mut c7 = redis::Client::open(format!("redis://{}/7", s.resp))
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(c7.get::<_, String>("shared").unwrap(), "in-cache");
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut c7).unwrap(), 1);
    let _: () = redis::cmd("FLUSHDB").query(&mut c7).unwrap();
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut c7).unwrap(), 0);
    assert_eq!(c.get::<_, String>("shared").unwrap(), "in-default");
}

#[test]
fn scan_visits_every_key_once_across_connections() {
    let s = Server::start();
    let mut c = s.client();
    let pairs: Vec<(String, i32)> = (0..1234).map(|i| (format!("user:{i:05}"), i)).collect();
    let _: () = c.mset(&pairs).unwrap();
    let _: () = c.set("other", 1).unwrap();
    let mut c2 = s.client();
    let mut cursor = 0u64;
    let mut seen = Vec::new();
    let mut calls = 0;
    loop {
        // Alternate connections: cursors are server-wide, as with connection pools.
        let conn = if calls % 2 == 0 { &mut c } else { &mut c2 };
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("user:*")
            .arg("COUNT")
            .arg(100)
            .query(conn)
            .unwrap();
        seen.extend(keys);
        calls += 1;
        if next == 0 {
            break;
        }
        cursor = next;
        assert!(calls < 1000);
    }
    seen.sort();
    let expected: Vec<String> = pairs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(seen, expected);
    let all: Vec<String> = c.scan().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 1235);
    let e: RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN").arg(987654321u64).query(&mut c);
    assert!(e.unwrap_err().to_string().contains("invalid cursor"));
}

#[test]
fn resp3_hello_and_introspection() {
    let s = Server::start();
    let client = redis::Client::open(format!("redis://{}/?protocol=resp3", s.resp)).unwrap();
    let mut c = client.get_connection().unwrap();
    let _: () = c.set("k", "v").unwrap();
    assert_eq!(c.get::<_, Option<String>>("nope").unwrap(), None);
    let hello: Value = redis::cmd("HELLO").arg(3).query(&mut c).unwrap();
    let Value::Map(pairs) = hello else {
        panic!("HELLO 3 answers a RESP3 map: {hello:?}")
    };
    assert!(
        pairs
            .iter()
            .any(|(k, v)| *k == Value::BulkString(b"proto".to_vec()) && *v == Value::Int(3))
    );
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).unwrap();
    assert!(info.contains("redis_version:"), "{info}");
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        redis::cmd("CLIENT")
            .arg("GETNAME")
            .query::<String>(&mut c)
            .unwrap(),
        "tester"
    );
    assert!(redis::cmd("CLIENT").arg("ID").query::<i64>(&mut c).unwrap() > 0);
    let count: i64 = redis::cmd("COMMAND").arg("COUNT").query(&mut c).unwrap();
    assert!(count > 30);
    let e: RedisResult<()> = redis::cmd("HELLO").arg(4).query(&mut c);
    assert!(e.unwrap_err().to_string().contains("NOPROTO"));
    assert_eq!(redis::cmd("PING").query::<String>(&mut c).unwrap(), "PONG");
    assert_eq!(
        redis::cmd("ECHO")
            .arg("hi")
            .query::<String>(&mut c)
            .unwrap(),
        "hi"
    );
}

#[test]
fn errors_match_redis_wording() {
    let s = Server::start();
    let mut c = s.client();
    let e: RedisResult<()> = redis::cmd("GET").query(&mut c);
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("wrong number of arguments for 'get' command")
    );
    let e: RedisResult<()> = redis::cmd("NOSUCHCMD").arg("l").arg("x").query(&mut c);
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("unknown command 'NOSUCHCMD'")
    );
    let _: () = redis::cmd("SET").arg("s").arg("v").query(&mut c).unwrap();
    let e: RedisResult<()> = redis::cmd("LPUSH").arg("s").arg("x").query(&mut c);
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("Operation against a key holding the wrong kind of value")
    );
    let e: RedisResult<()> = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("NX")
        .arg("XX")
        .query(&mut c);
    assert!(e.unwrap_err().to_string().contains("syntax error"));
    let e: RedisResult<()> = redis::cmd("MSET").arg("a").arg("1").arg("b").query(&mut c);
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("wrong number of arguments")
    );
    // The connection is still usable after errors.
    assert_eq!(redis::cmd("PING").query::<String>(&mut c).unwrap(), "PONG");
}

#[test]
fn password_protects_both_protocols() {
    let s = Server::start_with(&["--password", "s3cret"]);
    let mut c = redis::Client::open(format!("redis://{}/", s.resp))
        .unwrap()
        .get_connection()
        .unwrap();
    let e: RedisResult<Option<String>> = c.get("k");
    assert!(e.unwrap_err().to_string().contains("NOAUTH"));
    let e: RedisResult<()> = redis::cmd("AUTH").arg("wrong").query(&mut c);
    assert!(e.unwrap_err().to_string().contains("WRONGPASS"));
    let _: () = redis::cmd("AUTH").arg("s3cret").query(&mut c).unwrap();
    let _: () = c.set("k", "v").unwrap();
    let mut authed = redis::Client::open(format!("redis://:s3cret@{}/", s.resp))
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(authed.get::<_, String>("k").unwrap(), "v");
    let (status, _) = common::http(s.http, "GET", "/v1/kv/default/k", &[], None).unwrap();
    assert_eq!(status, 401);
    let (status, body) = common::http(
        s.http,
        "GET",
        "/v1/kv/default/k",
        &[("authorization", "Bearer s3cret")],
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(common::json(&body)["value"], "v");
    let (status, _) = common::http(s.http, "GET", "/healthz", &[], None).unwrap();
    assert_eq!(status, 200, "health checks need no password");
}

#[test]
fn cache_keyspace_evicts_under_its_memory_limit() {
    let s = Server::start();
    let (status, _) = common::http(
        s.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"3","mode":"cache","max_memory_bytes":2097152,"eviction":"lru"}"#),
    )
    .unwrap();
    assert_eq!(status, 201);
    let mut c = redis::Client::open(format!("redis://{}/3", s.resp))
        .unwrap()
        .get_connection()
        .unwrap();
    let value = "v".repeat(1000);
    let mut p = redis::pipe();
    for i in 0..10_000 {
        p.cmd("SET").arg(format!("k{i}")).arg(&value).ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    let keys: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert!(
        keys > 500 && keys < 2200,
        "2 MiB holds ~1900 1 KB entries, found {keys}"
    );
    // Recently written keys survive LRU eviction; the first ones are gone.
    assert!(c.exists::<_, bool>("k9999").unwrap());
    let info: String = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
    let evicted: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(evicted >= 10_000 - 2200, "{info}");
    // Keys with a TTL disappear without being read (active expiry).
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("SET")
            .arg(format!("ttl{i}"))
            .arg("x")
            .arg("PX")
            .arg(100)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    let _: () = redis::cmd("FLUSHDB").query(&mut c).unwrap();
    let mut p = redis::pipe();
    for i in 0..500 {
        p.cmd("SET")
            .arg(format!("ttl{i}"))
            .arg("x")
            .arg("PX")
            .arg(100)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut c).unwrap(), 500);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis::cmd("DBSIZE").query::<i64>(&mut c).unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "active expiry did not collect expired keys"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn expired_keys_of_a_cp_keyspace_leave_dbsize() {
    let s = Server::start();
    let mut c = s.client();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .arg("PX")
            .arg(50)
            .query(&mut c)
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg("h")
        .arg(50)
        .query(&mut c)
        .unwrap();
    let _: () = c.set("stays", "v").unwrap();
    // Expired keys are invisible at once; the shard's leader deletes them through the log, so
    // DBSIZE stops counting them within a few active-expiry steps.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
        if n == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "DBSIZE still {n} 30 s after every key but one expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let v: Option<String> = c.get("stays").unwrap();
    assert_eq!(v.as_deref(), Some("v"));
}

/// The error a command answers, as its text.
fn error_of(c: &mut redis::Connection, cmd: &mut redis::Cmd) -> String {
    cmd.query::<Value>(c).unwrap_err().to_string()
}

#[test]
fn config_get_and_set_follow_redis() {
    // Replies and error texts checked against redis-server 7.0.15.
    let s = Server::start();
    let mut c = s.client();
    let config = |args: &[&str]| {
        let mut cmd = redis::cmd("CONFIG");
        for a in args {
            cmd.arg(*a);
        }
        cmd
    };
    let get = |c: &mut redis::Connection, args: &[&str]| -> Vec<String> {
        let mut all = vec!["GET"];
        all.extend_from_slice(args);
        config(&all).query(c).unwrap()
    };
    let ok = |c: &mut redis::Connection, args: &[&str]| {
        let mut all = vec!["SET"];
        all.extend_from_slice(args);
        let _: () = config(&all).query(c).unwrap();
    };
    let set_err = |c: &mut redis::Connection, args: &[&str]| {
        let mut all = vec!["SET"];
        all.extend_from_slice(args);
        error_of(c, &mut config(&all))
    };

    // Keyspace events read back normalised; a bad letter changes nothing.
    assert_eq!(
        get(&mut c, &["notify-keyspace-events"]),
        ["notify-keyspace-events", ""]
    );
    ok(&mut c, &["notify-keyspace-events", "KEA"]);
    assert_eq!(
        get(&mut c, &["notify-keyspace-events"]),
        ["notify-keyspace-events", "AKE"]
    );
    let e = set_err(&mut c, &["notify-keyspace-events", "ke"]);
    assert!(
        e.contains("CONFIG SET failed (possibly related to argument 'notify-keyspace-events') - Invalid event class character. Use 'Ag$lshzxeKEtmdn'."),
        "{e}"
    );
    assert_eq!(get(&mut c, &["notify-keyspace-events"])[1], "AKE");

    // A durable keyspace has no memory limit and never evicts.
    assert_eq!(
        get(&mut c, &["maxmemory*"]),
        [
            "maxmemory",
            "0",
            "maxmemory-policy",
            "noeviction",
            "maxmemory-samples",
            "5"
        ]
    );
    // Patterns without glob characters answer the name as typed; each setting once.
    assert_eq!(
        get(&mut c, &["MAXMEMORY", "maxmemory", "maxmemory"]),
        ["MAXMEMORY", "0"]
    );
    assert!(get(&mut c, &["nosuch"]).is_empty());
    ok(
        &mut c,
        &["maxmemory", "0", "maxmemory-policy", "NOEVICTION"],
    );
    let e = set_err(&mut c, &["maxmemory", "1.5mb"]);
    assert!(
        e.contains("CONFIG SET failed (possibly related to argument 'maxmemory') - argument must be a memory value"),
        "{e}"
    );
    let e = set_err(&mut c, &["maxmemory-policy", "foo"]);
    assert!(e.contains("argument(s) must be one of the following: volatile-lru, volatile-lfu, volatile-random, volatile-ttl, allkeys-lru, allkeys-lfu, allkeys-random, noeviction"), "{e}");
    let e = set_err(&mut c, &["maxmemory", "100mb"]);
    assert!(e.contains("has no memory limit"), "{e}");

    // Several pairs: names are checked first (the first problem wins), then values, then
    // everything applies, or nothing does.
    let e = set_err(&mut c, &["maxmemory", "x", "foo", "bar"]);
    assert!(
        e.contains("Unknown option or number of arguments for CONFIG SET - 'foo'"),
        "{e}"
    );
    let e = set_err(&mut c, &["DAEMONIZE", "yes"]);
    assert!(
        e.contains("Unknown option or number of arguments for CONFIG SET - 'DAEMONIZE'"),
        "{e}"
    );
    let e = set_err(&mut c, &["APPENDONLY", "yes", "foo", "bar"]);
    assert!(
        e.contains("(possibly related to argument 'APPENDONLY') - can't set immutable config"),
        "{e}"
    );
    let e = set_err(&mut c, &["maxmemory", "1", "maxmemory", "2"]);
    assert!(
        e.contains("(possibly related to argument 'maxmemory') - duplicate parameter"),
        "{e}"
    );
    let e = set_err(
        &mut c,
        &["notify-keyspace-events", "E", "maxmemory-policy", "bad"],
    );
    assert!(e.contains("argument 'maxmemory-policy'"), "{e}");
    assert_eq!(
        get(&mut c, &["notify-keyspace-events"])[1],
        "AKE",
        "nothing applied"
    );
    ok(&mut c, &["notify-keyspace-events", "Ex", "maxmemory", "0"]);
    assert_eq!(get(&mut c, &["notify-keyspace-events"])[1], "xE");

    let e = set_err(&mut c, &["maxmemory", "1", "foo"]);
    assert!(e.contains("syntax error"), "{e}");
    let e = set_err(&mut c, &["maxmemory"]);
    assert!(
        e.contains("wrong number of arguments for 'config|set' command"),
        "{e}"
    );
    let e = error_of(&mut c, &mut config(&["GET"]));
    assert!(
        e.contains("wrong number of arguments for 'config|get' command"),
        "{e}"
    );
    let e = error_of(&mut c, &mut config(&["FOO"]));
    assert!(
        e.contains("unknown subcommand 'FOO'. Try CONFIG HELP."),
        "{e}"
    );
    let e = error_of(&mut c, &mut config(&["RESETSTAT"]));
    assert!(e.contains("not supported"), "{e}");
    let help: Vec<String> = config(&["HELP"]).query(&mut c).unwrap();
    assert_eq!(
        help[0],
        "CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
    );

    // A cache keyspace reports its own limit and policy, and CONFIG SET changes them (on this
    // node).
    let (status, _) = common::http(
        s.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"3","mode":"cache","max_memory_bytes":2097152,"eviction":"lfu"}"#),
    )
    .unwrap();
    assert_eq!(status, 201);
    let _: () = redis::cmd("SELECT").arg(3).query(&mut c).unwrap();
    assert_eq!(
        get(&mut c, &["maxmemory", "maxmemory-policy"]),
        ["maxmemory", "2097152", "maxmemory-policy", "allkeys-lfu"]
    );
    ok(
        &mut c,
        &["maxmemory", "2mb", "maxmemory-policy", "allkeys-lfu"],
    );
    let e = set_err(&mut c, &["maxmemory-policy", "volatile-ttl"]);
    assert!(e.contains("allkeys-lru or allkeys-lfu only"), "{e}");
    // 1.5 MB under a 2 MB limit, then a 1 MB limit: evicted down at once.
    let value = "v".repeat(10_000);
    for i in 0..150 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(&value)
            .query(&mut c)
            .unwrap();
    }
    let before: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(before, 150);
    ok(
        &mut c,
        &["maxmemory", "1mb", "maxmemory-policy", "allkeys-lru"],
    );
    assert_eq!(
        get(&mut c, &["maxmemory", "maxmemory-policy"]),
        ["maxmemory", "1048576", "maxmemory-policy", "allkeys-lru"]
    );
    let after: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert!(
        after < 105,
        "a lower limit evicts at once: {after} keys left"
    );
    let e = set_err(&mut c, &["maxmemory", "0"]);
    assert!(e.contains("needs a memory limit"), "{e}");
}
