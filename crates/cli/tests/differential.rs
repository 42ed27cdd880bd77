//! Replies compared with a real `redis-server`: the same commands, in the same order, sent to
//! Redis and to capdb (a `cp`, a `cache` and a one-node `ap` keyspace, and a 4-shard `cp`
//! keyspace with transactions spread over its shards), and every reply, error
//! texts included, must be the same. Scripted cases for the commands whose semantics are easy to get
//! subtly wrong; a seeded generator over every command comes with the data types.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{RedisServer, Server};
use redis::Value;

/// Sends `script` (one command per line, words split on spaces) to both, and fails on the
/// first reply that differs, naming the command.
fn same_replies(redis: &mut redis::Connection, capdb: &mut redis::Connection, script: &str) {
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut cmd = redis::Cmd::new();
        for word in line.split(' ') {
            cmd.arg(word);
        }
        let theirs: Value = cmd.query(redis).unwrap_or_else(error_value);
        let ours: Value = cmd.query(capdb).unwrap_or_else(error_value);
        assert_eq!(
            ours, theirs,
            "`{line}`: capdb answered {ours:?}, Redis {theirs:?}"
        );
    }
}

/// An error reply as a value, so errors compare by code and text.
fn error_value(e: redis::RedisError) -> Value {
    Value::SimpleString(format!("error: {e}"))
}

/// EXPIRE and its variants with NX/XX/GT/LT: which deadline wins, a key without a deadline
/// counting as never expiring, the option errors (checked before the time), a deadline in the
/// past deleting the key, and PING's arity.
const EXPIRE_SCRIPT: &str = "
    expire k 10 foo
    expire k 10 nx xx
    expire k 10 gt lt
    expire k abc foo
    expire k abc nx
    expire missing 10 nx
    set k v
    expire k 10 gt
    expire k 100 lt
    expire k 50 gt
    expire k 200 gt
    expire k 100 nx
    expire k 300 xx lt
    expire k 10 xx lt
    persist k
    expire k 10 xx
    pexpire k 100000 nx
    pexpireat k 1 gt
    expireat k 4000000000 gt
    expire k -1 lt
    exists k
    set j v
    expire j 10 NX
    expire j 10 Nx
    ping a b c
    ping a
    ping
";

#[test]
fn expire_options_answer_as_redis_does_in_every_mode() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = Server::start();
    let (status, body) = common::http(
        capdb.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"1","mode":"cache","max_memory_bytes":1048576}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let (status, body) = common::http(
        capdb.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(br#"{"name":"2","mode":"ap"}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    for db in ["0", "1", "2"] {
        let mut ours = redis::Client::open(format!("redis://{}/{db}", capdb.resp))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
        same_replies(&mut redis, &mut ours, EXPIRE_SCRIPT);
    }
}

/// A SADD of a member already present changes nothing for Redis, so a WATCH of the set lets
/// EXEC run; `cp` and `cache` agree. In `ap` the SADD writes the add again (so that it wins over
/// a concurrent SREM on another side: add-wins) and the WATCH aborts, as the README says.
const WATCH_PRESENT_ADD_SCRIPT: &str = "
    sadd s 4 hello 10
    watch s
    sadd s 10
    multi
    ping
    exec
";

/// WATCH, a write by the same client, then MULTI/EXEC: a write Redis signals as a change
/// aborts EXEC (an SREM that leaves members, an LTRIM that keeps every element, an HSET of the
/// same value), a write that changes nothing does not (ZINCRBY by 0, SMOVE within one set); a
/// key created and deleted again since WATCH counts as changed. Found by `capdb difftest`
/// (`ap`: an SREM, an LTRIM and a create-then-delete did not abort, nor did an LTRIM on `cp`
/// and `cache`).
const WATCH_SCRIPT: &str = "
    sadd s 4 hello 10
    watch s
    srem s 4
    multi
    ping
    exec
    watch s
    srem s nothere
    multi
    ping
    exec
    watch s
    smove s s hello
    multi
    ping
    exec
    rpush l a b
    watch l
    ltrim l 0 -1
    multi
    ping
    exec
    watch l
    lrem l 0 nothere
    multi
    ping
    exec
    hset h f v g w
    watch h
    hset h f v
    multi
    ping
    exec
    watch h
    hdel h nothere
    multi
    ping
    exec
    watch h
    hdel h g
    multi
    ping
    exec
    zadd z 1 m 2 n
    watch z
    zadd z 1 m
    multi
    ping
    exec
    watch z
    zincrby z 0 m
    multi
    ping
    exec
    watch z
    zrem z n
    multi
    ping
    exec
    set k v
    watch k
    set k v
    multi
    ping
    exec
    watch k
    persist k
    multi
    ping
    exec
    watch gone
    rpush gone a
    del gone
    multi
    ping
    exec
";

/// FLUSHDB aborts the WATCH of a key it deletes, not of a key that did not exist (Redis 7.0's
/// `touchAllWatchedKeysInDb`; found by `capdb difftest`, cache seed 21). `cp` aborts both (a
/// documented conservative choice), so this runs on `cache` and `ap`.
const FLUSHDB_WATCH_SCRIPT: &str = "
    watch missing
    flushdb
    multi
    ping
    exec
    set k v
    watch k
    flushdb
    multi
    ping
    exec
";

#[test]
fn watch_aborts_exactly_where_redis_signals_a_change_in_every_mode() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = Server::start();
    for body in [
        &br#"{"name":"1","mode":"cache","max_memory_bytes":1048576}"#[..],
        &br#"{"name":"2","mode":"ap"}"#[..],
    ] {
        let (status, answer) =
            common::http(capdb.http, "POST", "/v1/keyspaces", &[], Some(body)).unwrap();
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    }
    for db in ["0", "1", "2"] {
        let mut ours = redis::Client::open(format!("redis://{}/{db}", capdb.resp))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
        same_replies(&mut redis, &mut ours, WATCH_SCRIPT);
        if db != "0" {
            same_replies(&mut redis, &mut ours, FLUSHDB_WATCH_SCRIPT);
        }
        let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
        let _: () = redis::cmd("FLUSHDB").query(&mut ours).unwrap();
        if db == "2" {
            // ap: the re-add is a write, and the WATCH sees it (documented).
            let _: i64 = redis::cmd("SADD")
                .arg("s")
                .arg("10")
                .query(&mut ours)
                .unwrap();
            let _: () = redis::cmd("WATCH").arg("s").query(&mut ours).unwrap();
            let _: i64 = redis::cmd("SADD")
                .arg("s")
                .arg("10")
                .query(&mut ours)
                .unwrap();
            let ran: Option<Vec<String>> =
                redis::pipe().atomic().cmd("PING").query(&mut ours).unwrap();
            assert_eq!(ran, None, "ap: a re-add aborts the WATCH");
        } else {
            same_replies(&mut redis, &mut ours, WATCH_PRESENT_ADD_SCRIPT);
        }
    }
}

/// The thresholds of Redis 7.0's compact encodings, which OBJECT ENCODING and the SCAN family's
/// paging follow (`hash-max-listpack-entries` was 128 in capdb, 512 in redis-server 7.0.15).
const ENCODING_CONFIG_SCRIPT: &str = "
    config get hash-max-listpack-entries
    config get hash-max-ziplist-entries
    config get hash-max-listpack-value
    config get set-max-intset-entries
    config get zset-max-listpack-entries
    config get zset-max-listpack-value
    config get zset-max-ziplist-value
    config get list-max-listpack-size
    config get list-max-ziplist-size
    config get list-compress-depth
";

#[test]
fn encoding_thresholds_read_as_redis_7_0s() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = Server::start();
    let mut ours = redis::Client::open(format!("redis://{}/0", capdb.resp))
        .unwrap()
        .get_connection()
        .unwrap();
    same_replies(&mut redis, &mut ours, ENCODING_CONFIG_SCRIPT);
}

/// Writes `request` on a new connection and returns every byte answered until the server
/// closes the connection or stays silent for half a second.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Requests Redis parses in a particular way (inline quoting, lengths out of range, frames
/// that are not RESP), and what it answers, byte for byte.
const RAW_REQUESTS: &[&[u8]] = &[
    b"set \"\"\"k\"\"\" v\r\n",
    b"set \"k v\r\n",
    b"set 'k v\r\n",
    b"set \"a\"b v\r\n",
    b"echo \"a\\x41\\tb\" 'c\\'d'\r\n",
    b"echo a\"b c\"\r\n",
    b"echo \"\"\r\n",
    b"*1\r\n$2000000000\r\n",
    b"*2\r\n$3\r\nget\r\n$-5\r\n",
    b"*abc\r\n",
    b"*1\r\n$abc\r\n",
    b"*1\r\nxyz\r\n",
    b"*3000000000\r\n",
    b"*0\r\nping\r\n",
];

#[test]
fn protocol_edge_cases_answer_byte_for_byte_as_redis_does() {
    let mut redis = RedisServer::start_with(&[]);
    let _ = redis.client();
    let capdb = Server::start();
    let theirs = SocketAddr::from(([127, 0, 0, 1], redis.port));
    for request in RAW_REQUESTS {
        assert_eq!(
            String::from_utf8_lossy(&raw_exchange(capdb.resp, request)),
            String::from_utf8_lossy(&raw_exchange(theirs, request)),
            "request {:?}",
            String::from_utf8_lossy(request)
        );
    }
}

#[test]
fn before_authentication_both_refuse_large_commands_alike() {
    let mut redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let _ = redis.client();
    let capdb = Server::start_with(&["--password", "s3cret"]);
    let theirs = SocketAddr::from(([127, 0, 0, 1], redis.port));
    for request in [
        &b"*11\r\n"[..],
        b"*2\r\n$4\r\nauth\r\n$16385\r\n",
        b"*1\r\n$4\r\nping\r\n",
    ] {
        assert_eq!(
            String::from_utf8_lossy(&raw_exchange(capdb.resp, request)),
            String::from_utf8_lossy(&raw_exchange(theirs, request)),
            "request {:?}",
            String::from_utf8_lossy(request)
        );
    }
}

/// Sends each chunk on one connection and returns what the server answered to each (until it
/// stays silent for half a second).
fn raw_session(addr: SocketAddr, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answers = Vec::new();
    for chunk in chunks {
        stream.write_all(chunk).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        answers.push(out);
    }
    answers
}

/// Subscribed mode as Redis defines it: confirmations and their counts, what a subscribed RESP2
/// client may send (and the error for the rest), PING's shape, leaving the mode, PUBSUB, and
/// the RESP3 push frames. One channel at a time: "unsubscribe from all" answers in the order of
/// Redis's dictionary, which no client relies on.
const PUBSUB_SESSION: &[u8] = b"SUBSCRIBE a\r\nget x\r\nPING\r\nPING hi\r\nPSUBSCRIBE p*\r\nSUBSCRIBE a\r\n\
UNSUBSCRIBE\r\nPUNSUBSCRIBE\r\nUNSUBSCRIBE\r\nSSUBSCRIBE s\r\nSUNSUBSCRIBE\r\nSUNSUBSCRIBE\r\n\
PUBSUB NUMSUB a\r\nPUBSUB NUMPAT\r\nPUBSUB CHANNELS\r\nPUBSUB foo\r\nPUBLISH a x\r\nSUBSCRIBE\r\nPING\r\n";

#[test]
fn subscribed_mode_answers_byte_for_byte_as_redis_does_in_resp2_and_resp3() {
    let mut redis = RedisServer::start_with(&[]);
    let _ = redis.client();
    let capdb = Server::start();
    let theirs = SocketAddr::from(([127, 0, 0, 1], redis.port));
    for chunks in [
        vec![PUBSUB_SESSION],
        // The HELLO reply names the server, so only what follows it is compared.
        vec![&b"HELLO 3\r\n"[..], PUBSUB_SESSION],
    ] {
        let ours = raw_session(capdb.resp, &chunks);
        let expected = raw_session(theirs, &chunks);
        assert_eq!(
            String::from_utf8_lossy(ours.last().unwrap()),
            String::from_utf8_lossy(expected.last().unwrap()),
        );
    }
}

#[test]
fn a_subscriber_receives_messages_and_patterns_in_publish_order() {
    let capdb = Server::start();
    let mut sub = TcpStream::connect(capdb.resp).unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sub.write_all(b"SUBSCRIBE news\r\nPSUBSCRIBE n*\r\n")
        .unwrap();
    let confirmations = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n";
    read_exactly(&mut sub, confirmations);
    let mut publisher = capdb.client();
    for i in 0..50 {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg("news")
            .arg(format!("m{i}"))
            .query(&mut publisher)
            .unwrap();
        assert_eq!(receivers, 2, "one channel and one pattern subscription");
    }
    for i in 0..50 {
        let m = format!("m{i}");
        let message = format!(
            "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n${}\r\n{m}\r\n",
            m.len()
        );
        let pmessage = format!(
            "*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n${}\r\n{m}\r\n",
            m.len()
        );
        read_exactly(&mut sub, message.as_bytes());
        read_exactly(&mut sub, pmessage.as_bytes());
    }
}

/// Reads `expected.len()` bytes and checks they are `expected`.
fn read_exactly(stream: &mut TcpStream, expected: &[u8]) {
    let mut got = vec![0u8; expected.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// The seeded differential tester's options for a CI run: this build's `capdb`, Redis from
/// PATH, the command list written under the test's target directory on a difference.
fn difftest_options(
    mode: capdb_difftest::Mode,
    seed: u64,
    commands: u64,
) -> capdb_difftest::Options {
    capdb_difftest::Options {
        redis_server: common::need_tool("redis-server"),
        capdb: common::BIN.into(),
        out_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("difftest"),
        ..capdb_difftest::Options::new(mode, seed, commands)
    }
}

/// Runs a short seed in `mode` and fails on any difference, printing it whole.
fn no_difference(mode: capdb_difftest::Mode, seed: u64, commands: u64) {
    let options = difftest_options(mode, seed, commands);
    let outcome = capdb_difftest::run(&options, &mut std::io::stderr())
        .unwrap_or_else(|e| panic!("the differential tester could not run: {e}"));
    if let Some(d) = outcome.difference {
        panic!(
            "capdb and Redis answered differently (mode {mode}, seed {seed}; replay with `capdb difftest --mode {mode} --seed {seed} --commands {commands} --minimize`):\n{d}"
        );
    }
    // A transaction block the list would end in is run to its end (`command_list`).
    assert!(
        outcome.compared >= commands,
        "{} of {commands} commands compared",
        outcome.compared
    );
}

#[test]
fn seeded_commands_answer_as_redis_does_in_cp() {
    no_difference(capdb_difftest::Mode::Cp, 1, 3_000);
}

#[test]
fn seeded_commands_answer_as_redis_does_in_cache() {
    no_difference(capdb_difftest::Mode::Cache, 1, 5_000);
}

#[test]
fn seeded_commands_answer_as_redis_does_in_ap() {
    no_difference(capdb_difftest::Mode::Ap, 1, 5_000);
}

/// The harness can fail: with `--debug-plant-difference` (HLEN one too many at exactly 3
/// fields) it finds the difference within 20,000 commands and minimises it to a handful.
#[test]
fn the_differential_tester_finds_a_planted_difference() {
    let mut options = difftest_options(capdb_difftest::Mode::Cp, 1, 20_000);
    options.capdb_args = vec!["--debug-plant-difference".into()];
    options.minimize = true;
    let outcome = capdb_difftest::run(&options, &mut std::io::stderr())
        .unwrap_or_else(|e| panic!("the differential tester could not run: {e}"));
    let d = outcome
        .difference
        .expect("the planted HLEN difference was not found in 20,000 commands");
    assert_eq!(d.step.name(), "hlen", "{d}");
    let min = d.minimized.expect("minimised");
    assert!(min.len() <= 5, "minimised to {} commands", min.len());
    assert!(d.file.is_some_and(|f| f.exists()));
}

/// After an SPOP, the harness copies capdb's set into Redis (the members are random); when
/// capdb's rebuilt set is an intset and Redis's is not, it rebuilds Redis's key, and the key
/// keeps its TTL, as both servers' SPOP does (difftest cache seed 11 found Redis's PTTL at -1
/// after such a rebuild dropped it). An SPOP of all but one of 3 integers and 4 words leaves
/// an integer on one side only about one time in four: 40 rounds meet the rebuild.
#[test]
fn the_harness_keeps_a_ttl_when_it_resynchronises_an_spop() {
    let step = |words: &str| capdb_difftest::r#gen::Step {
        args: words.split(' ').map(|w| w.as_bytes().to_vec()).collect(),
        walk: false,
        block: false,
    };
    let mut list = Vec::new();
    for round in 0..40 {
        let key = format!("s{round}");
        for cmd in [
            format!("SADD {key} 1 2 3 a b c d"),
            format!("EXPIRE {key} 100"),
            format!("SPOP {key} 6"),
            format!("PTTL {key}"),
        ] {
            list.push((step(&cmd), false));
        }
    }
    let options = difftest_options(capdb_difftest::Mode::Cache, 0, 0);
    let outcome = capdb_difftest::run_list(&options, list, &mut std::io::stderr())
        .unwrap_or_else(|e| panic!("the differential tester could not run: {e}"));
    if let Some(d) = outcome.difference {
        panic!("capdb and Redis answered differently:\n{d}");
    }
    assert_eq!(outcome.compared, 160);
}

/// Cross-shard MULTI/EXEC on `cp` (two-phase commit), reply for reply: mode `cp-shards` runs
/// on a 4-shard keyspace, each queued command under one shard's hash tag, WATCHes over several
/// shards. The node's counters show the run did commit, and WATCH-abort, cross-shard
/// transactions.
#[test]
fn seeded_cross_shard_transactions_answer_as_redis_does_in_cp_shards() {
    let (mode, seed, commands) = (capdb_difftest::Mode::CpShards, 1, 3_000);
    let options = difftest_options(mode, seed, commands);
    let outcome = capdb_difftest::run(&options, &mut std::io::stderr())
        .unwrap_or_else(|e| panic!("the differential tester could not run: {e}"));
    if let Some(d) = outcome.difference {
        panic!(
            "capdb and Redis answered differently (mode {mode}, seed {seed}; replay with `capdb difftest --mode {mode} --seed {seed} --commands {commands} --minimize`):\n{d}"
        );
    }
    // The list runs on to the end of a transaction block.
    assert!(outcome.compared >= commands, "{}", outcome.compared);
    let count = |outcome_name: &str| outcome.cross_shard.get(outcome_name).copied();
    assert!(
        count("committed") >= Some(20) && count("watch_aborted") >= Some(1),
        "cross-shard transactions: {:?}",
        outcome.cross_shard
    );
}

/// The mode can fail: with `--debug-unsafe-txn` (a cross-shard transaction's commands applied
/// one by one, its WATCH guards ignored) a transaction whose watched key changed runs where
/// Redis answers nil, and the run finds it and minimises it to a handful of commands.
#[test]
fn the_differential_tester_finds_unsafe_cross_shard_transactions() {
    let mut options = difftest_options(capdb_difftest::Mode::CpShards, 1, 3_000);
    options.capdb_args = vec!["--debug-unsafe-txn".into()];
    options.minimize = true;
    let outcome = capdb_difftest::run(&options, &mut std::io::stderr())
        .unwrap_or_else(|e| panic!("the differential tester could not run: {e}"));
    let d = outcome
        .difference
        .expect("no difference with --debug-unsafe-txn in 3,000 commands");
    assert_eq!(d.step.name(), "exec", "{d}");
    assert!(
        ["*-1\\r\\n", "_\\r\\n"].contains(&d.redis.as_str()),
        "Redis aborted the watched transaction (nil): {d}"
    );
    let min = d.minimized.expect("minimised");
    assert!(min.len() <= 8, "minimised to {} commands", min.len());
}
