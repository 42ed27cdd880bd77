//! DUMP and RESTORE against a real `redis-server` (Debian's 7.0): what Redis dumps restores
//! into capdb (`cp`, `cache` and one-node `ap` keyspaces) with the same contents and
//! encodings, what capdb dumps restores into Redis with the same contents, and the refusals
//! (bad payloads, options, TTL, BUSYKEY) answer Redis's error texts. The payload bytes are not
//! compared: capdb writes other (simpler) encodings of the same values.

mod common;

use common::{RedisServer, Server};
use redis::Value;

/// The keyspaces of a capdb node, by database number: 0 `cp` (the default), 1 `cache`, 2 `ap`.
const DBS: [&str; 3] = ["0", "1", "2"];

fn with_keyspaces() -> Server {
    let capdb = Server::start();
    for body in [
        &br#"{"name":"1","mode":"cache","max_memory_bytes":67108864}"#[..],
        br#"{"name":"2","mode":"ap"}"#,
    ] {
        let (status, answer) =
            common::http(capdb.http, "POST", "/v1/keyspaces", &[], Some(body)).unwrap();
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    }
    capdb
}

fn connect(capdb: &Server, db: &str) -> redis::Connection {
    redis::Client::open(format!("redis://{}/{db}", capdb.resp))
        .unwrap()
        .get_connection()
        .unwrap()
}

fn run(c: &mut redis::Connection, args: &[&[u8]]) -> Value {
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(*a);
    }
    cmd.query(c)
        .unwrap_or_else(|e| Value::SimpleString(format!("error: {e}")))
}

fn words(args: &str) -> Vec<Vec<u8>> {
    args.split(' ').map(|w| w.as_bytes().to_vec()).collect()
}

fn run_words(c: &mut redis::Connection, args: &str) -> Value {
    let w = words(args);
    run(c, &w.iter().map(|a| &a[..]).collect::<Vec<_>>())
}

/// Writes a value of every type and of every encoding Redis 7.0 dumps: integer, short, long
/// (LZF-compressed) and incompressible strings; a quicklist of one and of many nodes (Redis
/// compresses big nodes with LZF); intset and hashtable sets; listpack and hashtable hashes
/// (by count, and by a long value); listpack and skiplist sorted sets; an HLL.
fn fill(c: &mut redis::Connection) {
    let mut put = |args: Vec<String>| {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let v = run(c, &args);
        assert!(
            !matches!(&v, Value::SimpleString(s) if s.starts_with("error")),
            "{v:?}"
        );
    };
    let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    put(w("SET str hello"));
    put(w("SET int 12345"));
    put(w("SET bigint 300000000000"));
    put(vec![
        "SET".into(),
        "lzf".into(),
        format!("{}{}", "a".repeat(200), "bc".repeat(40)),
    ]);
    let noise: String = (0..3000u32)
        .map(|i| char::from(b'!' + (i.wrapping_mul(2654435761) >> 7) as u8 % 90))
        .collect();
    put(vec!["SET".into(), "noise".into(), noise]);
    put(w("RPUSH list a b 1 -300 70000"));
    let mut big = w("RPUSH biglist");
    big.extend((0..5000).map(|i| format!("element-{i}-{}", "x".repeat(i % 50))));
    put(big);
    put(w("SADD intset 1 2 3 -7"));
    put(w("SADD set a b c"));
    let mut big = w("SADD bigset");
    big.extend((0..700).map(|i| format!("m{i}")));
    put(big);
    put(w("HSET hash f v f2 123"));
    let mut big = w("HSET bighash");
    big.extend((0..600).flat_map(|i| [format!("f{i}"), format!("{i}")]));
    put(big);
    put(vec![
        "HSET".into(),
        "longhash".into(),
        "f".into(),
        "v".repeat(100),
    ]);
    put(w("ZADD zset 1.5 a 2 b -inf c 0.1 d"));
    let mut big = w("ZADD bigzset");
    big.extend((0..300).flat_map(|i| [format!("{}", i as f64 / 7.0), format!("m{i}")]));
    put(big);
    put(w("PFADD hll a b c d"));
}

const KEYS: &[&str] = &[
    "str", "int", "bigint", "lzf", "noise", "list", "biglist", "intset", "set", "bigset", "hash",
    "bighash", "longhash", "zset", "bigzset", "hll",
];

/// A key's type, its contents in a comparable order, and (collections only) its encoding:
/// Redis decides a string's encoding by the command that wrote it, capdb by its bytes.
fn contents(c: &mut redis::Connection, key: &str) -> (Value, Vec<Value>, Value) {
    let k = key.as_bytes();
    let kind = run(c, &[b"TYPE", k]);
    let items = |v: Value| match v {
        Value::Array(v) => v,
        other => panic!("{key}: {other:?}"),
    };
    let sorted = |mut v: Vec<Value>| {
        v.sort_by_key(|x| format!("{x:?}"));
        v
    };
    let Value::SimpleString(name) = &kind else {
        panic!("{key}: {kind:?}")
    };
    let body = match name.as_str() {
        "string" => vec![run(c, &[b"GET", k])],
        "list" => items(run(c, &[b"LRANGE", k, b"0", b"-1"])),
        "set" => sorted(items(run(c, &[b"SMEMBERS", k]))),
        "hash" => {
            let flat = items(run(c, &[b"HGETALL", k]));
            sorted(flat.chunks(2).map(|p| Value::Array(p.to_vec())).collect())
        }
        "zset" => items(run(c, &[b"ZRANGE", k, b"0", b"-1", b"WITHSCORES"])),
        other => panic!("{key}: type {other}"),
    };
    let encoding = if name == "string" {
        Value::Nil
    } else {
        run(c, &[b"OBJECT", b"ENCODING", k])
    };
    (kind, body, encoding)
}

fn bulk(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        other => panic!("expected a payload, got {other:?}"),
    }
}

#[test]
fn what_redis_dumps_restores_into_capdb_with_the_same_contents_in_every_mode() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    fill(&mut redis);
    let capdb = with_keyspaces();
    for db in DBS {
        let mut ours = connect(&capdb, db);
        for key in KEYS {
            let payload = bulk(run(&mut redis, &[b"DUMP", key.as_bytes()]));
            let reply = run(&mut ours, &[b"RESTORE", key.as_bytes(), b"0", &payload]);
            assert_eq!(reply, Value::Okay, "db {db}, {key}");
            assert_eq!(
                contents(&mut ours, key),
                contents(&mut redis, key),
                "db {db}, {key}"
            );
            assert_eq!(run_words(&mut ours, &format!("TTL {key}")), Value::Int(-1));
        }
        assert_eq!(
            run_words(&mut ours, "PFCOUNT hll"),
            run_words(&mut redis, "PFCOUNT hll")
        );
        // TTLs: relative (made absolute by the node that took the command), absolute, none.
        let payload = bulk(run(&mut redis, &[b"DUMP", b"bighash"]));
        let reply = run(&mut ours, &[b"RESTORE", b"rel", b"100000", &payload]);
        assert_eq!(reply, Value::Okay);
        let Value::Int(pttl) = run_words(&mut ours, "PTTL rel") else {
            panic!("PTTL")
        };
        assert!((90_000..=100_000).contains(&pttl), "db {db}: {pttl}");
        let reply = run(
            &mut ours,
            &[b"RESTORE", b"abs", b"4000000000000", &payload, b"ABSTTL"],
        );
        assert_eq!(reply, Value::Okay);
        assert_eq!(
            run_words(&mut ours, "PEXPIRETIME abs"),
            Value::Int(4_000_000_000_000)
        );
        // A deadline in the past restores nothing; with REPLACE the old value goes too.
        let reply = run(
            &mut ours,
            &[b"RESTORE", b"abs", b"1", &payload, b"ABSTTL", b"REPLACE"],
        );
        assert_eq!(reply, Value::Okay);
        assert_eq!(run_words(&mut ours, "EXISTS abs"), Value::Int(0));
    }
}

#[test]
fn what_capdb_dumps_restores_into_redis_with_the_same_contents() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = with_keyspaces();
    for db in DBS {
        let mut ours = connect(&capdb, db);
        fill(&mut ours);
        for key in KEYS {
            let payload = bulk(run(&mut ours, &[b"DUMP", key.as_bytes()]));
            let copy = format!("{db}-{key}");
            let reply = run(&mut redis, &[b"RESTORE", copy.as_bytes(), b"0", &payload]);
            assert_eq!(reply, Value::Okay, "db {db}, {key}");
            let (theirs, ours_now) = (contents(&mut redis, &copy), contents(&mut ours, key));
            assert_eq!(theirs, ours_now, "db {db}, {key}");
            // And back again: capdb restores its own payload.
            let back = format!("back-{key}");
            let reply = run(&mut ours, &[b"RESTORE", back.as_bytes(), b"0", &payload]);
            assert_eq!(reply, Value::Okay, "db {db}, {key}");
            assert_eq!(contents(&mut ours, &back), ours_now, "db {db}, {key}");
        }
        assert_eq!(
            run_words(&mut redis, &format!("PFCOUNT {db}-hll")),
            run_words(&mut ours, "PFCOUNT hll")
        );
        assert_eq!(run_words(&mut ours, "DUMP nokey"), Value::Nil);
    }
}

/// Payloads in Redis 6's ziplist encodings (no Redis 6 here: made by hand, `crates/data`'s
/// unit tests build them): a list (type 10), a quicklist of two ziplists (14), a hash (13) and
/// a sorted set (12).
const ZIPLIST_PAYLOADS: &[&str] = &[
    "0a1b1b0000001600000005000001610302626204f102fe8003c00080ff0a0038cff31ab1b578bf",
    "0e021b1b0000001600000005000001610302626204f102fe8003c00080ff0e0e0000000a000000010000017aff0a00fe73b51816593a8c",
    "0d161600000013000000040000016603017603016e03f3ff0a0087779a750a7f0404",
    "0c18180000001500000004000001610303312e3505016203f3ff0a002ebc3de57303ed72",
];

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn redis_6_ziplist_payloads_restore_as_in_redis_7_0() {
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = with_keyspaces();
    for db in DBS {
        let mut ours = connect(&capdb, db);
        for (i, hex) in ZIPLIST_PAYLOADS.iter().enumerate() {
            let payload = unhex(hex);
            let key = format!("zl{i}");
            let args: [&[u8]; 5] = [b"RESTORE", key.as_bytes(), b"0", &payload, b"REPLACE"];
            assert_eq!(run(&mut redis, &args), Value::Okay, "{key}");
            assert_eq!(run(&mut ours, &args), Value::Okay, "db {db}, {key}");
            assert_eq!(
                contents(&mut ours, &key),
                contents(&mut redis, &key),
                "db {db}, {key}"
            );
        }
    }
}

/// Redis's CRC-64 (Jones, reflected), to seal hand-made payloads.
fn crc64(bytes: &[u8]) -> u64 {
    let mut crc = 0u64;
    for &b in bytes {
        crc ^= b as u64;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x95ac_9329_ac4b_c9b5
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A value followed by an RDB version and a correct checksum.
fn sealed(value: &[u8], version: u16) -> Vec<u8> {
    let mut v = value.to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    let crc = crc64(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

#[test]
fn refusals_answer_as_redis_does_in_every_mode() {
    assert_eq!(crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
    let mut redis_server = RedisServer::start_with(&[]);
    let mut redis = redis_server.client();
    let capdb = with_keyspaces();
    run_words(&mut redis, "SET k v");
    let good = bulk(run_words(&mut redis, "DUMP k"));
    let value = &good[..good.len() - 10];
    let mut flipped = good.clone();
    flipped[2] ^= 1;
    let mut huge_string = vec![0u8, 0x81];
    huge_string.extend_from_slice(&u64::MAX.to_be_bytes());
    let mut huge_list = vec![18u8, 0x80];
    huge_list.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut huge_lzf = vec![0u8, 0xc3, 0x02, 0x81];
    huge_lzf.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge_lzf.extend_from_slice(&[0x00, b'a']);
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("good", good.clone()),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("short", good[..5].to_vec()),
        ("empty", Vec::new()),
        ("flipped", flipped),
        ("version 11", sealed(value, 11)),
        ("version 9", sealed(value, 9)),
        ("empty hash", sealed(&[4, 0], 10)),
        ("empty list", sealed(&[18, 0], 10)),
        ("unknown type", sealed(&[200, 0], 10)),
        ("stream", sealed(&[15, 0], 10)),
        ("cut value", sealed(&value[..3], 10)),
        ("huge string", sealed(&huge_string, 10)),
        ("huge list", sealed(&huge_list, 10)),
        ("huge lzf", sealed(&huge_lzf, 10)),
        ("duplicate set", sealed(&[2, 2, 1, b'a', 1, b'a'], 10)),
        ("nan zset", sealed(&[3, 1, 1, b'a', 253], 10)),
    ];
    let options: &[&str] = &[
        "",
        "REPLACE",
        "foo",
        "replace idletime",
        "idletime -1",
        "idletime abc",
        "idletime 10 replace",
        "freq 256",
        "freq -1",
        "freq 3",
        "freq 1 idletime 1",
        "idletime 1 freq 1",
        "absttl replace",
    ];
    for db in DBS {
        let mut ours = connect(&capdb, db);
        run_words(&mut ours, "SET k v");
        run_words(&mut redis, "SELECT 0");
        for (what, payload) in &payloads {
            for key in ["k", "new"] {
                for ttl in ["0", "-1", "abc", "100000"] {
                    for opts in options {
                        let mut args: Vec<&[u8]> =
                            vec![b"RESTORE", key.as_bytes(), ttl.as_bytes(), payload];
                        args.extend(opts.split(' ').filter(|o| !o.is_empty()).map(str::as_bytes));
                        let theirs = run(&mut redis, &args);
                        let mine = run(&mut ours, &args);
                        assert_eq!(mine, theirs, "db {db}: {what}, {key} {ttl} {opts}");
                        // Put both back where they were.
                        for c in [&mut redis, &mut ours] {
                            run_words(c, "DEL new");
                            run_words(c, "SET k v");
                        }
                    }
                }
            }
        }
        for args in ["DUMP", "DUMP a b", "RESTORE", "RESTORE k 0", "DUMP nokey"] {
            assert_eq!(
                run_words(&mut ours, args),
                run_words(&mut redis, args),
                "db {db}: {args}"
            );
        }
    }
}

#[test]
fn dump_and_restore_run_inside_transactions() {
    let capdb = with_keyspaces();
    for db in DBS {
        let mut c = connect(&capdb, db);
        run_words(&mut c, "RPUSH src a b c");
        let payload = bulk(run_words(&mut c, "DUMP src"));
        let reply: Vec<Value> = redis::pipe()
            .atomic()
            .cmd("RESTORE")
            .arg("dst")
            .arg(0)
            .arg(&payload)
            .cmd("DUMP")
            .arg("dst")
            .cmd("RESTORE")
            .arg("dst")
            .arg(0)
            .arg(&payload)
            .arg("REPLACE")
            .cmd("LRANGE")
            .arg("dst")
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap();
        assert_eq!(reply.len(), 4, "db {db}: {reply:?}");
        assert_eq!(reply[0], Value::Okay, "db {db}");
        assert_eq!(reply[1], Value::BulkString(payload.clone()), "db {db}");
        assert_eq!(reply[2], Value::Okay, "db {db}");
        assert_eq!(
            reply[3],
            Value::Array(vec![
                Value::BulkString(b"a".to_vec()),
                Value::BulkString(b"b".to_vec()),
                Value::BulkString(b"c".to_vec())
            ]),
            "db {db}"
        );
    }
}
