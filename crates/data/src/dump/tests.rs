use super::rdb::tests::{REDIS, hex};
use super::*;
use crate::strings::tests::{NOW, bulk, cx, data, deadline_of, get, int, run, set, space};
use crate::testing::MapSpace;

#[test]
fn table_is_sorted() {
    assert!(crate::command::sorted(COMMANDS));
}

fn exec(s: &mut MapSpace, args: &[&[u8]]) -> Result<Reply> {
    let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
    execute(&args, s, &cx())
}

fn error_of(s: &mut MapSpace, args: &[&[u8]]) -> String {
    match exec(s, args) {
        Err(Error::Command(line)) => line,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn dump_of(s: &mut MapSpace, key: &str) -> Vec<u8> {
    match exec(s, &[b"DUMP", key.as_bytes()]).unwrap() {
        Reply::Bulk(b) => b.to_vec(),
        other => panic!("DUMP {key}: {other:?}"),
    }
}

fn words(reply: Reply) -> Vec<String> {
    let flat = match reply {
        Reply::Array(v) | Reply::Set(v) => v,
        Reply::Map(p) | Reply::Pairs(p) => p.into_iter().flat_map(|(a, b)| [a, b]).collect(),
        other => panic!("{other:?}"),
    };
    flat.into_iter()
        .map(|r| match r {
            Reply::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
            Reply::Double(d) => d,
            other => panic!("{other:?}"),
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Each type read back through its own commands, in a comparable form.
fn contents(s: &mut MapSpace, key: &str) -> (String, Vec<String>) {
    let kind = match run(s, &format!("capdb.type {key}")).unwrap() {
        Reply::Status(t) => t,
        other => panic!("{other:?}"),
    };
    let v = match kind.as_str() {
        "string" => vec![String::from_utf8_lossy(&data(s, key)).into_owned()],
        "list" => words(run(s, &format!("LRANGE {key} 0 -1")).unwrap()),
        "set" => sorted(words(run(s, &format!("SMEMBERS {key}")).unwrap())),
        "hash" => {
            let mut pairs: Vec<String> = words(run(s, &format!("HGETALL {key}")).unwrap())
                .chunks(2)
                .map(|p| format!("{}={}", p[0], p[1]))
                .collect();
            pairs.sort();
            pairs
        }
        "zset" => words(run(s, &format!("ZRANGE {key} 0 -1 WITHSCORES")).unwrap()),
        other => panic!("{other}"),
    };
    (kind, v)
}

fn encoding(s: &mut MapSpace, key: &str) -> Reply {
    run(s, &format!("OBJECT ENCODING {key}")).unwrap()
}

#[test]
fn restores_what_redis_dumped() {
    let mut s = space();
    for (name, payload) in REDIS {
        let payload = hex(payload);
        let reply = exec(&mut s, &[b"RESTORE", name.as_bytes(), b"0", &payload]);
        assert_eq!(reply.unwrap(), Reply::Ok, "{name}");
    }
    let lz = format!("{}{}", "a".repeat(59), "bcabcabcabc");
    let want: &[(&str, &str, Vec<&str>)] = &[
        ("s", "string", vec!["hello"]),
        ("i", "string", vec!["12345"]),
        ("big", "string", vec!["300000000000"]),
        ("neg", "string", vec!["-5"]),
        ("lz", "string", vec![&lz]),
        ("l", "list", vec!["a", "b", "1", "-300", "70000"]),
        ("si", "set", vec!["-7", "1", "2", "3"]),
        ("ss", "set", vec!["a", "b", "c"]),
        ("h", "hash", vec!["f2=123", "f=v"]),
        ("z", "zset", vec!["c", "-inf", "a", "1.5", "b", "2"]),
    ];
    for (key, kind, v) in want {
        let v: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert_eq!(contents(&mut s, key), (kind.to_string(), v), "{key}");
    }
    // The encodings Redis reports for the same values.
    assert_eq!(encoding(&mut s, "si"), bulk(b"intset"));
    assert_eq!(encoding(&mut s, "ss"), bulk(b"hashtable"));
    assert_eq!(encoding(&mut s, "h"), bulk(b"listpack"));
    assert_eq!(encoding(&mut s, "z"), bulk(b"listpack"));
    assert_eq!(deadline_of(&mut s, "l"), None);
}

/// A space with one value of each type, some past Redis's compact-encoding thresholds.
fn every_type() -> MapSpace {
    let mut s = space();
    set(&mut s, "str", b"hello world", None);
    set(&mut s, "num", b"-123456", Some(NOW + 5_000));
    run(&mut s, "RPUSH list a b c 1 2 a").unwrap();
    run(&mut s, "SADD ints 1 2 3").unwrap();
    run(&mut s, "SADD words x y z").unwrap();
    run(&mut s, "HSET hash f 1 g two").unwrap();
    run(&mut s, "ZADD zset 1 a 2.5 b -inf c 0.1 d").unwrap();
    let many: Vec<String> = (0..300).map(|i| format!("m{i} {i}")).collect();
    run(&mut s, &format!("HSET bighash {}", many.join(" "))).unwrap();
    let scored: Vec<String> = (0..300).map(|i| format!("{i} m{i}")).collect();
    run(&mut s, &format!("ZADD bigzset {}", scored.join(" "))).unwrap();
    let ints: Vec<String> = (0..600).map(|i| i.to_string()).collect();
    run(&mut s, &format!("SADD bigints {}", ints.join(" "))).unwrap();
    run(&mut s, "PFADD hll a b c").unwrap();
    s
}

const KEYS: &[&str] = &[
    "str", "num", "list", "ints", "words", "hash", "zset", "bighash", "bigzset", "bigints", "hll",
];

#[test]
fn dump_then_restore_gives_the_same_value_and_encoding() {
    let mut s = every_type();
    for key in KEYS {
        let payload = dump_of(&mut s, key);
        let before = (contents(&mut s, key), encoding(&mut s, key));
        let copy = format!("{key}-copy");
        let reply = exec(&mut s, &[b"RESTORE", copy.as_bytes(), b"0", &payload]);
        assert_eq!(reply.unwrap(), Reply::Ok, "{key}");
        assert_eq!(
            (contents(&mut s, &copy), encoding(&mut s, &copy)),
            before,
            "{key}"
        );
        assert_eq!(deadline_of(&mut s, &copy), None);
    }
    // An HLL is its bytes, so PFCOUNT agrees.
    assert_eq!(run(&mut s, "PFCOUNT hll-copy").unwrap(), int(3));
}

#[test]
fn ttl_is_relative_unless_absttl_and_zero_means_none() {
    let mut s = every_type();
    let payload = dump_of(&mut s, "hash");
    exec(&mut s, &[b"RESTORE", b"rel", b"2500", &payload]).unwrap();
    assert_eq!(deadline_of(&mut s, "rel"), Some(NOW + 2_500));
    let at = (NOW + 9_000).to_string();
    exec(
        &mut s,
        &[b"RESTORE", b"abs", at.as_bytes(), &payload, b"ABSTTL"],
    )
    .unwrap();
    assert_eq!(deadline_of(&mut s, "abs"), Some(NOW + 9_000));
    exec(&mut s, &[b"RESTORE", b"none", b"0", &payload, b"absttl"]).unwrap();
    assert_eq!(deadline_of(&mut s, "none"), None);
    let str_payload = dump_of(&mut s, "str");
    exec(&mut s, &[b"RESTORE", b"s2", b"10", &str_payload]).unwrap();
    assert_eq!(deadline_of(&mut s, "s2"), Some(NOW + 10));
    // DUMP carries no TTL.
    assert_eq!(dump_of(&mut s, "rel"), payload);
}

#[test]
fn a_deadline_already_past_restores_nothing_and_replace_still_deletes() {
    let mut s = every_type();
    let payload = dump_of(&mut s, "str");
    let past = (NOW - 1).to_string();
    let now = NOW.to_string();
    for at in [&past, &now] {
        let reply = exec(
            &mut s,
            &[b"RESTORE", b"gone", at.as_bytes(), &payload, b"ABSTTL"],
        );
        assert_eq!(reply.unwrap(), Reply::Ok);
        assert_eq!(get(&mut s, "gone"), None);
    }
    let reply = exec(
        &mut s,
        &[
            b"RESTORE",
            b"hash",
            past.as_bytes(),
            &payload,
            b"ABSTTL",
            b"REPLACE",
        ],
    );
    assert_eq!(reply.unwrap(), Reply::Ok);
    assert_eq!(get(&mut s, "hash"), None);
    // A relative TTL that overflows is in the past, as Redis's wrapped sum is.
    let huge = i64::MAX.to_string();
    let reply = exec(&mut s, &[b"RESTORE", b"gone", huge.as_bytes(), &payload]);
    assert_eq!(reply.unwrap(), Reply::Ok);
    assert_eq!(get(&mut s, "gone"), None);
}

#[test]
fn replace_overwrites_any_type() {
    let mut s = every_type();
    let payload = dump_of(&mut s, "zset");
    assert_eq!(
        error_of(&mut s, &[b"RESTORE", b"hash", b"0", &payload]),
        "BUSYKEY Target key name already exists."
    );
    exec(&mut s, &[b"RESTORE", b"hash", b"0", &payload, b"REPLACE"]).unwrap();
    assert_eq!(contents(&mut s, "hash"), contents(&mut s, "zset"));
    // An expired key is not in the way.
    set(&mut s, "old", b"x", Some(NOW));
    exec(&mut s, &[b"RESTORE", b"old", b"0", &payload]).unwrap();
    assert_eq!(contents(&mut s, "old"), contents(&mut s, "zset"));
}

#[test]
fn dump_of_a_missing_key_is_nil() {
    let mut s = space();
    assert_eq!(exec(&mut s, &[b"DUMP", b"nokey"]).unwrap(), Reply::Nil);
}

#[test]
fn dump_of_a_hash_with_field_expiry_carries_its_live_fields() {
    let mut s = space();
    run(&mut s, "HSET h a 1 b 2 c 3").unwrap();
    run(&mut s, "HPEXPIRE h 100 FIELDS 1 a").unwrap();
    let payload = dump_of(&mut s, "h");
    exec(&mut s, &[b"RESTORE", b"h2", b"0", &payload]).unwrap();
    assert_eq!(contents(&mut s, "h2").1, ["a=1", "b=2", "c=3"]);
    assert_eq!(
        run(&mut s, "HTTL h2 FIELDS 1 a").unwrap(),
        crate::strings::tests::ints(&[-1])
    );
    // Once the field has expired, it is not dumped.
    let later = Ctx {
        now_ms: NOW + 200,
        ..cx()
    };
    let Reply::Bulk(payload) = execute(
        &[Bytes::from_static(b"DUMP"), Bytes::from_static(b"h")],
        &mut s,
        &later,
    )
    .unwrap() else {
        panic!("a payload")
    };
    assert_eq!(
        rdb::decode(&payload).unwrap().sorted_for_test(),
        Object::Hash(vec![
            (Bytes::from_static(b"b"), Bytes::from_static(b"2")),
            (Bytes::from_static(b"c"), Bytes::from_static(b"3"))
        ])
        .sorted_for_test()
    );
}

impl Object {
    fn sorted_for_test(self) -> Object {
        match self {
            Object::Hash(mut v) => {
                v.sort();
                Object::Hash(v)
            }
            other => other,
        }
    }
}

#[test]
fn errors_are_redis_7_0s_in_redis_order() {
    // Each line checked against redis-server 7.0.15 (the integration test compares them live).
    let mut s = every_type();
    let good = dump_of(&mut s, "str");
    let cases: &[(&[&[u8]], &str)] = &[
        (
            &[b"RESTORE", b"str", b"0", b"x"],
            "BUSYKEY Target key name already exists.",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x"],
            "ERR DUMP payload version or checksum are wrong",
        ),
        (
            &[b"RESTORE", b"new", b"-1", b"x"],
            "ERR Invalid TTL value, must be >= 0",
        ),
        (
            &[b"RESTORE", b"new", b"abc", b"x"],
            "ERR value is not an integer or out of range",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"foo"],
            "ERR syntax error",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"replace", b"idletime"],
            "ERR syntax error",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"idletime", b"-1"],
            "ERR Invalid IDLETIME value, must be >= 0",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"idletime", b"abc"],
            "ERR value is not an integer or out of range",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"freq", b"256"],
            "ERR Invalid FREQ value, must be >= 0 and <= 255",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"freq", b"-1"],
            "ERR Invalid FREQ value, must be >= 0 and <= 255",
        ),
        (
            &[
                b"RESTORE",
                b"new",
                b"0",
                b"x",
                b"freq",
                b"1",
                b"idletime",
                b"1",
            ],
            "ERR syntax error",
        ),
        (
            &[
                b"RESTORE",
                b"new",
                b"0",
                b"x",
                b"idletime",
                b"1",
                b"freq",
                b"1",
            ],
            "ERR syntax error",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"x", b"absttl", b"replace"],
            "ERR DUMP payload version or checksum are wrong",
        ),
        (
            &[b"RESTORE", b"str", b"-1", b"x"],
            "BUSYKEY Target key name already exists.",
        ),
        (
            &[b"RESTORE", b"str", b"-1", b"x", b"replace"],
            "ERR Invalid TTL value, must be >= 0",
        ),
        (
            &[b"RESTORE", b"new", b"0", b""],
            "ERR DUMP payload version or checksum are wrong",
        ),
        (
            &[b"RESTORE", b"new", b"0", b"1234567890"],
            "ERR DUMP payload version or checksum are wrong",
        ),
        (
            &[b"RESTORE"],
            "ERR wrong number of arguments for 'restore' command",
        ),
        (
            &[b"DUMP"],
            "ERR wrong number of arguments for 'dump' command",
        ),
        (
            &[b"DUMP", b"a", b"b"],
            "ERR wrong number of arguments for 'dump' command",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(error_of(&mut s, args), *want, "{args:?}");
    }
    // A good payload with options that are fine.
    let reply = exec(
        &mut s,
        &[
            b"RESTORE",
            b"new",
            b"0",
            &good,
            b"IDLETIME",
            b"5",
            b"IDLETIME",
            b"0",
            b"REPLACE",
        ],
    );
    assert_eq!(reply.unwrap(), Reply::Ok);
    let reply = exec(
        &mut s,
        &[
            b"RESTORE", b"new2", b"0", &good, b"FREQ", b"255", b"FREQ", b"0",
        ],
    );
    assert_eq!(reply.unwrap(), Reply::Ok);
    // A sound footer over a bad value.
    let bad = rdb::seal(vec![0x04, 0x00]);
    assert_eq!(
        error_of(&mut s, &[b"RESTORE", b"new3", b"0", &bad]),
        "ERR Bad data format"
    );
    assert_eq!(get(&mut s, "new3"), None);
    // A failed RESTORE ... REPLACE leaves the old value alone.
    assert_eq!(
        error_of(&mut s, &[b"RESTORE", b"str", b"0", &bad, b"REPLACE"]),
        "ERR Bad data format"
    );
    assert_eq!(data(&mut s, "str"), b"hello world");
}

#[test]
fn elements_past_the_value_limit_are_refused_before_anything_changes() {
    let mut s = space();
    let long = Bytes::from(vec![b'x'; 100]);
    let payload = rdb::encode(&Object::List(vec![Bytes::from_static(b"a"), long]));
    let small = Ctx {
        value_bytes_max: 99,
        ..cx()
    };
    set(&mut s, "l", b"old", None);
    let args = [
        Bytes::from_static(b"RESTORE"),
        Bytes::from_static(b"l"),
        Bytes::from_static(b"0"),
        Bytes::from(payload),
        Bytes::from_static(b"REPLACE"),
    ];
    match execute(&args, &mut s, &small) {
        Err(Error::Command(line)) => {
            assert_eq!(
                line,
                "ERR string exceeds maximum allowed size (proto-max-bulk-len)"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(data(&mut s, "l"), b"old");
}

/// The reviewer's two triggers, past the element cap: a QUICKLIST_2 list of one packed node
/// whose listpack is ~24 KB of LZF for ~1M entries, and a type 1 list of empty strings.
fn over_the_element_cap() -> [Vec<u8>; 2] {
    let n = 1 + 132 * rdb::ELEMENTS_MAX.div_ceil(132);
    let (stream, len) = rdb::tests::lzf_listpack_of_zeros(n);
    // Type 18, one node, packed (2), an LZF string (0xc3), its lengths (32-bit), the stream.
    let mut node = vec![18, 1, 2, 0xc3, 0x80];
    node.extend_from_slice(&(stream.len() as u32).to_be_bytes());
    node.push(0x80);
    node.extend_from_slice(&(len as u32).to_be_bytes());
    node.extend_from_slice(&stream);
    let mut list = vec![1, 0x80];
    list.extend_from_slice(&(rdb::ELEMENTS_MAX as u32 + 1).to_be_bytes());
    list.resize(list.len() + rdb::ELEMENTS_MAX + 1, 0);
    [rdb::seal(node), rdb::seal(list)]
}

const TOO_MANY: &str = "ERR DUMP payload has more than 1048574 elements, capdb's limit";

#[test]
fn payloads_past_the_budget_are_refused_before_anything_changes() {
    let mut s = space();
    set(&mut s, "l", b"old", None);
    for payload in over_the_element_cap() {
        assert_eq!(
            error_of(&mut s, &[b"RESTORE", b"l", b"0", &payload, b"REPLACE"]),
            TOO_MANY
        );
        assert_eq!(data(&mut s, "l"), b"old");
        assert_eq!(
            error_of(&mut s, &[b"RESTORE", b"new", b"0", &payload]),
            TOO_MANY
        );
        assert_eq!(get(&mut s, "new"), None);
        // Redis's order still holds when the command runs: BUSYKEY first.
        assert_eq!(
            error_of(&mut s, &[b"RESTORE", b"l", b"0", &payload]),
            "BUSYKEY Target key name already exists."
        );
    }
    // Past the bytes: an LZF string declaring more than 256 MiB (possible for 3 MiB of LZF).
    let mut v = vec![0x00, 0xc3, 0x80];
    v.extend_from_slice(&(3u32 << 20).to_be_bytes());
    v.push(0x80);
    v.extend_from_slice(&(260u32 << 20).to_be_bytes());
    v.resize(v.len() + (3 << 20), 0xff);
    let payload = rdb::seal(v);
    assert_eq!(
        error_of(&mut s, &[b"RESTORE", b"new", b"0", &payload]),
        "ERR DUMP payload decodes into more than 256 MiB (elements' bytes plus 64 per \
         element), capdb's limit"
    );
}

#[test]
fn check_limits_refuses_only_payloads_past_the_budget() {
    let b = |s: &[u8]| Bytes::copy_from_slice(s);
    let restore = |ttl: &[u8], payload: &[u8], more: &[&[u8]]| -> Vec<Bytes> {
        let mut args = vec![b(b"RESTORE"), b(b"k"), b(ttl), b(payload)];
        args.extend(more.iter().map(|a| b(a)));
        args
    };
    let line = |r: Result<()>| match r {
        Err(Error::Command(line)) => line,
        other => panic!("{other:?}"),
    };
    for payload in over_the_element_cap() {
        assert_eq!(line(check_limits(&restore(b"0", &payload, &[]))), TOO_MANY);
        assert_eq!(
            line(check_limits(&restore(b"100", &payload, &[b"REPLACE"]))),
            TOO_MANY
        );
        // What Redis answers first is left to the command: a bad option or TTL.
        assert!(check_limits(&restore(b"0", &payload, &[b"bogus"])).is_ok());
        assert!(check_limits(&restore(b"-1", &payload, &[])).is_ok());
        assert!(check_limits(&restore(b"x", &payload, &[])).is_ok());
        // A bad footer is the command's error too.
        let mut bad = payload.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(check_limits(&restore(b"0", &bad, &[])).is_ok());
        // Not RESTORE.
        let mut set = restore(b"0", &payload, &[]);
        set[0] = b(b"SET");
        assert!(check_limits(&set).is_ok());
    }
    // A sound payload within the budget, long enough to be decoded here.
    let mut s = space();
    let items: Vec<Bytes> = (0..20_000).map(|i| Bytes::from(i.to_string())).collect();
    let payload = rdb::encode(&Object::List(items));
    assert!(payload.len() > rdb::WITHIN_LIMITS_LEN_MAX);
    assert!(check_limits(&restore(b"0", &payload, &[])).is_ok());
    assert!(check_limits(&[b(b"RESTORE"), b(b"k")]).is_ok());
    let reply = exec(&mut s, &[b"RESTORE", b"k", b"0", &payload]);
    assert_eq!(reply.unwrap(), Reply::Ok);
}

#[test]
fn absolutize_makes_relative_ttls_absolute_and_leaves_the_rest() {
    let w = |s: &str| -> Vec<Bytes> { s.split(' ').map(|x| Bytes::from(x.to_string())).collect() };
    assert_eq!(
        absolutize(&w("RESTORE k 100 P REPLACE"), 5_000),
        Some(w("RESTORE k 5100 P ABSTTL REPLACE"))
    );
    assert_eq!(
        absolutize(&w("restore k 1 P IDLETIME"), 0),
        Some(w("restore k 1 P ABSTTL IDLETIME"))
    );
    for unchanged in [
        "RESTORE k 0 P",
        "RESTORE k -5 P",
        "RESTORE k x P",
        "RESTORE k 100 P absttl",
        "RESTORE k 9223372036854775807 P",
        "RESTOREX k 100 P",
        "RESTORE k 100",
    ] {
        assert_eq!(absolutize(&w(unchanged), 5_000), None, "{unchanged}");
    }
    // The rewritten command answers as the original did, given the same clock.
    let mut s = every_type();
    let payload = dump_of(&mut s, "list");
    let original = [
        Bytes::from_static(b"RESTORE"),
        Bytes::from_static(b"k"),
        Bytes::from_static(b"700"),
        Bytes::from(payload),
    ];
    let rewritten = absolutize(&original, NOW).unwrap();
    execute(&rewritten, &mut s, &cx()).unwrap();
    assert_eq!(deadline_of(&mut s, "k"), Some(NOW + 700));
}

#[test]
fn keys_are_the_first_argument() {
    for (cmd, want) in [("DUMP a", vec![1]), ("RESTORE a 0 p REPLACE", vec![1])] {
        let args: Vec<Bytes> = cmd.split(' ').map(|x| Bytes::from(x.to_string())).collect();
        let spec = crate::lookup(&cmd.split(' ').next().unwrap().to_ascii_lowercase()).unwrap();
        assert_eq!(spec.key_indices(&args).unwrap(), want);
    }
}

#[test]
fn keyspace_events_are_redis_s() {
    // redis-server 7.0.15, `__keyevent@0__:*`: restore, restore, del, nothing.
    let mut s = every_type();
    let payload = dump_of(&mut s, "str");
    let mut events = |args: &[&[u8]]| -> Vec<&'static str> {
        let args = crate::notify::wrap(args.iter().map(|a| Bytes::copy_from_slice(a)).collect());
        let (reply, events) = crate::notify::unwrap(execute(&args, &mut s, &cx()).unwrap());
        assert_eq!(reply, Reply::Ok);
        events.iter().map(|e| e.name).collect()
    };
    assert_eq!(events(&[b"RESTORE", b"new", b"0", &payload]), ["restore"]);
    assert_eq!(
        events(&[b"RESTORE", b"str", b"0", &payload, b"REPLACE"]),
        ["restore"]
    );
    assert_eq!(
        events(&[b"RESTORE", b"str", b"1", &payload, b"ABSTTL", b"REPLACE"]),
        ["del"]
    );
    assert!(events(&[b"RESTORE", b"none", b"1", &payload, b"ABSTTL"]).is_empty());
}
