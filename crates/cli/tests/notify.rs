//! Keyspace notifications compared with a real `redis-server`: a subscriber to `__key*__:*` on
//! each server, the same commands sent to both, and the two message streams (pattern, channel,
//! payload, in order) must be the same. capdb runs the script on a `cp`, a `cache` and an `ap`
//! keyspace, selected by number as Redis's databases are (`__keyspace@1__:...`).

mod common;

use std::time::Duration;

use common::{RedisServer, Server};

/// Every family, the generic commands, and writes that change nothing (which emit nothing):
/// DEL of a missing key, a failed SET NX, a pop from a missing list, ZADD of an unchanged
/// score, SMOVE to the same set, RENAME to itself, a STORE whose empty result has nothing to
/// delete. No deadline here is short enough to pass during the run (`expired` is timing; see
/// the next test).
const SCRIPT: &str = "
    set s 1
    set s 2 ex 100
    set s 3 keepttl
    set s 4 nx
    set s 5 xx get
    set t 1 nx get
    setex t 100 v
    psetex t 100000 v
    setnx t v
    setnx u v
    mset a 1 b 2
    msetnx x 1 y 2
    msetnx x 1 z 2
    getset a 9
    getdel a
    getdel a
    incr n
    decr n
    incrby n 5
    decrby n 5
    incrbyfloat n 1.5
    append str abc
    setrange str 1 zz
    getex str ex 100
    getex str persist
    getex str
    getex nope ex 10
    expire n 100
    expire n 100 nx
    pexpire n 100000
    persist n
    persist n
    expire n 0
    expire missing 10
    del missing
    del x y missing
    unlink z
    set r 1
    rename r r2
    rename r2 r2
    renamenx r2 r3
    set r 1
    renamenx r r3
    copy r3 r4
    copy r3 r4
    setbit bits 1 1
    setbit bits 1 1
    setbit bits 9 0
    pfadd hll a b
    pfadd hll a
    hset h f 1 g 2
    hset h f 1
    hsetnx h f 1
    hsetnx h k 1
    hincrby h n 1
    hincrbyfloat h n 1.5
    hdel h nope
    hdel h f g
    hdel h k n
    hdel h k
    lpush l a b c
    rpush l d
    lpushx nolist a
    rpushx l e
    linsert l before a x
    linsert l before nope x
    lset l 0 y
    lrem l 0 nope
    lrem l 1 y
    ltrim l 0 100
    ltrim l 1 1
    lpop l
    lpop l
    rpush l a b c d
    lpop l 2
    rpop l 5
    rpush l a b
    lmove l l2 left right
    lmove l l2 left left
    rpoplpush l2 l3
    rpush m a
    lmpop 2 nolist m left count 5
    sadd set a b c
    sadd set a
    srem set nope
    srem set a
    spop set 5
    sadd set a b
    smove set set2 a
    smove set set2 nope
    smove set set2 b
    smove set2 set2 a
    sadd set3 x
    sinterstore dest set2 set3
    sunionstore dest set2 set3
    sdiffstore dest set2 set2
    sdiffstore dest set2 set2
    zadd z 1 a 2 b 3 c
    zadd z 1 a
    zadd z 5 a
    zadd z xx 5 nope
    zadd z incr 1 a
    zincrby z 1 a
    zrem z nope
    zrem z a
    zremrangebyscore z 100 200
    zremrangebyscore z 2 2
    zadd z 1 a 2 b
    zremrangebyrank z 0 0
    zremrangebylex z [a [b
    zadd z 1 a 2 b 3 c
    zpopmin z
    zpopmax z 5
    zadd z 1 a 2 b
    zunionstore zd 1 z
    zinterstore zd 2 z nope
    zinterstore zd 2 z nope
    zrangestore zd2 z 0 -1
    zmpop 1 z min count 10
    get s
    hget h f
";

const END: &str = "end-of-script";

/// Subscribes `conn` to every keyspace event (`__key*__:*`) and to a channel marking the end.
fn subscribe(conn: &mut redis::Connection) -> redis::PubSub<'_> {
    let mut ps = conn.as_pubsub();
    ps.psubscribe("__key*__:*").unwrap();
    ps.subscribe(END).unwrap();
    ps.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    ps
}

/// Every message until `END`: `pattern channel payload` per keyspace message.
fn until_end(ps: &mut redis::PubSub<'_>) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let m = ps.get_message().expect("a message before the end marker");
        let channel = m.get_channel_name().to_string();
        if channel == END {
            return out;
        }
        let pattern: String = m.get_pattern().unwrap_or_default();
        let payload: String = m.get_payload().unwrap();
        out.push(format!("{pattern} {channel} {payload}"));
    }
}

fn run(c: &mut redis::Connection, line: &str) {
    let mut cmd = redis::Cmd::new();
    for word in line.split(' ') {
        cmd.arg(word);
    }
    let _: redis::Value = cmd.query(c).unwrap_or(redis::Value::Nil);
}

fn config_set_events(c: &mut redis::Connection, flags: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(flags)
        .query(c)
        .unwrap();
}

fn create_keyspace(capdb: &Server, body: &str) {
    let (status, body) = common::http(
        capdb.http,
        "POST",
        "/v1/keyspaces",
        &[],
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
}

fn connect(url: String) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// The messages `script` causes on one server, database `db`, with `flags`.
fn stream(url: &str, db: &str, flags: &str, script: &str) -> Vec<String> {
    let mut c = connect(format!("{url}/{db}"));
    let _: () = redis::cmd("FLUSHDB").query(&mut c).unwrap();
    config_set_events(&mut c, flags);
    let mut sub_conn = connect(format!("{url}/{db}"));
    let mut sub = subscribe(&mut sub_conn);
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        run(&mut c, line);
    }
    let _: i64 = redis::cmd("PUBLISH")
        .arg(END)
        .arg("")
        .query(&mut c)
        .unwrap();
    let out = until_end(&mut sub);
    config_set_events(&mut c, "");
    out
}

fn first_difference(ours: &[String], theirs: &[String]) -> String {
    let i = ours
        .iter()
        .zip(theirs)
        .position(|(a, b)| a != b)
        .unwrap_or(ours.len().min(theirs.len()));
    format!(
        "first difference at message {i}: capdb {:?}, Redis {:?}\ncapdb: {ours:#?}\nRedis: {theirs:#?}",
        ours.get(i),
        theirs.get(i)
    )
}

#[test]
fn keyspace_events_match_redis_in_every_mode() {
    let mut redis_server = RedisServer::start_with(&[]);
    drop(redis_server.client());
    let theirs_url = format!("redis://127.0.0.1:{}", redis_server.port);
    let capdb = Server::start();
    create_keyspace(
        &capdb,
        r#"{"name":"1","mode":"cache","max_memory_bytes":16777216}"#,
    );
    create_keyspace(&capdb, r#"{"name":"2","mode":"ap"}"#);
    let ours_url = format!("redis://{}", capdb.resp);
    for db in ["0", "1", "2"] {
        let theirs = stream(&theirs_url, db, "KEA", SCRIPT);
        assert!(theirs.len() > 100, "Redis emitted {theirs:?}");
        let ours = stream(&ours_url, db, "KEA", SCRIPT);
        assert!(
            ours == theirs,
            "db {db}: {}",
            first_difference(&ours, &theirs)
        );
    }
}

#[test]
fn flags_choose_the_classes_and_the_channels() {
    let mut redis_server = RedisServer::start_with(&[]);
    drop(redis_server.client());
    let theirs_url = format!("redis://127.0.0.1:{}", redis_server.port);
    let capdb = Server::start();
    let ours_url = format!("redis://{}", capdb.resp);
    // Keyspace channels only for lists; key-event channels only for generic commands; no
    // destination (no K or E): nothing at all.
    for flags in ["Kl", "Eg", "A", "K$h"] {
        let theirs = stream(&theirs_url, "0", flags, SCRIPT);
        let ours = stream(&ours_url, "0", flags, SCRIPT);
        assert!(
            ours == theirs,
            "{flags}: {}",
            first_difference(&ours, &theirs)
        );
    }
}

/// The first `n` keyspace messages `ps` receives, as `channel payload`.
fn next_messages(ps: &mut redis::PubSub<'_>, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let m = ps.get_message().expect("a keyspace event");
            let payload: String = m.get_payload().unwrap();
            format!("{} {payload}", m.get_channel_name())
        })
        .collect()
}

#[test]
fn an_expired_key_is_announced_in_cp_and_cache_keyspaces() {
    let mut redis_server = RedisServer::start_with(&[]);
    drop(redis_server.client());
    let theirs_url = format!("redis://127.0.0.1:{}", redis_server.port);
    let capdb = Server::start();
    create_keyspace(
        &capdb,
        r#"{"name":"1","mode":"cache","max_memory_bytes":16777216}"#,
    );
    let ours_url = format!("redis://{}", capdb.resp);
    // The deadline passes during the run; `expired` comes when the key is removed (Redis's
    // active expiry; capdb's shard leader sweep in `cp`, the cache's expiry cycle), so the
    // script waits for it (the read timeout bounds a failure, not a pass).
    for (url, db) in [
        (&theirs_url, "0"),
        (&ours_url, "0"),
        (&theirs_url, "1"),
        (&ours_url, "1"),
    ] {
        let mut c = connect(format!("{url}/{db}"));
        let _: () = redis::cmd("FLUSHDB").query(&mut c).unwrap();
        config_set_events(&mut c, "Egx");
        let mut sub = connect(format!("{url}/{db}"));
        let mut ps = sub.as_pubsub();
        ps.psubscribe("__key*__:*").unwrap();
        ps.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        run(&mut c, "set gone v px 100");
        assert_eq!(
            next_messages(&mut ps, 2),
            [
                format!("__keyevent@{db}__:expire gone"),
                format!("__keyevent@{db}__:expired gone")
            ],
            "{url} db {db}"
        );
        config_set_events(&mut c, "");
    }
}

#[test]
fn a_cache_keyspace_announces_the_keys_it_evicts() {
    let capdb = Server::start();
    create_keyspace(
        &capdb,
        r#"{"name":"1","mode":"cache","max_memory_bytes":1048576}"#,
    );
    let mut c = connect(format!("redis://{}/1", capdb.resp));
    config_set_events(&mut c, "Ee");
    let mut sub = connect(format!("redis://{}/1", capdb.resp));
    let mut ps = sub.as_pubsub();
    ps.psubscribe("__keyevent@1__:*").unwrap();
    ps.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let value = "v".repeat(20_000);
    for i in 0..100 {
        run(&mut c, &format!("set key{i} {value}"));
    }
    // 2 MB into 1 MiB: keys were evicted, each announced once it is gone.
    let first = next_messages(&mut ps, 1).remove(0);
    let key = first
        .strip_prefix("__keyevent@1__:evicted ")
        .unwrap_or_else(|| panic!("{first}"));
    let exists: i64 = redis::cmd("EXISTS").arg(key).query(&mut c).unwrap();
    assert_eq!(exists, 0, "{key} was announced as evicted");
}
