//! Sorted-set specifications. Every reply and error text here was checked against redis-server
//! 7.0.15 (RESP2 and, for shapes, `redis-cli -3`).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use capdb_types::{Error, Reply, Timestamp, Value};
use proptest::prelude::*;

use super::*;
use crate::testing::MapSpace;

use crate::testing::words::{cx, run};

fn ok(s: &mut MapSpace, cmd: &str) -> Reply {
    run(s, cmd).unwrap_or_else(|e| panic!("{cmd}: {e:?}"))
}

fn fails(s: &mut MapSpace, cmd: &str) -> String {
    match run(s, cmd) {
        Err(Error::Command(line)) => line,
        Err(Error::WrongType) => "WRONGTYPE".into(),
        other => panic!("{cmd}: expected an error, got {other:?}"),
    }
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

fn dbl(s: &str) -> Reply {
    Reply::Double(s.into())
}

fn int(n: i64) -> Reply {
    Reply::Integer(n)
}

fn members(list: &str) -> Reply {
    Reply::Array(list.split_whitespace().map(bulk).collect())
}

/// `"a 1 b 2"` as WITHSCORES pairs.
fn pairs(list: &str) -> Reply {
    let w: Vec<&str> = list.split_whitespace().collect();
    Reply::Pairs(w.chunks(2).map(|p| (bulk(p[0]), dbl(p[1]))).collect())
}

fn with_string(s: &mut MapSpace) {
    s.put(
        b"str",
        Value::new(Bytes::from_static(b"x"), Timestamp(1), None),
    )
    .unwrap();
}

fn meta_of(s: &mut MapSpace, key: &str) -> crate::meta::CollMeta {
    let v = s.get(key.as_bytes()).unwrap().expect("key exists");
    crate::meta::CollMeta::of(&v)
        .unwrap()
        .expect("a collection")
}

#[test]
fn table_is_sorted() {
    assert!(crate::command::sorted(COMMANDS));
}

#[test]
fn sortable_bytes_order_like_the_numbers() {
    let xs = [
        f64::NEG_INFINITY,
        -1e300,
        -2.5,
        -1.0,
        -f64::MIN_POSITIVE,
        0.0,
        f64::MIN_POSITIVE,
        1.0,
        3.3,
        1e300,
        f64::INFINITY,
    ];
    for w in xs.windows(2) {
        assert!(sortable(w[0]) < sortable(w[1]), "{} < {}", w[0], w[1]);
    }
    for x in xs {
        assert_eq!(unsortable(sortable(x)), x);
    }
    assert_eq!(sortable(-0.0), sortable(0.0));
}

#[test]
fn zadd_counts_new_members_and_ch_counts_changes() {
    let mut s = MapSpace::new(0);
    assert_eq!(ok(&mut s, "ZADD z 1 a 2 b"), int(2));
    assert_eq!(ok(&mut s, "ZADD z 5 a 3 c"), int(1));
    assert_eq!(ok(&mut s, "ZADD z CH 6 a 3 c 4 d"), int(2));
    assert_eq!(ok(&mut s, "ZADD z 1 x 2 x"), int(1), "the last score wins");
    assert_eq!(ok(&mut s, "ZSCORE z x"), dbl("2"));
    assert_eq!(ok(&mut s, "ZCARD z"), int(5));
}

#[test]
fn zadd_option_conflicts_use_redis_texts_in_redis_order() {
    let mut s = MapSpace::new(0);
    assert_eq!(
        fails(&mut s, "ZADD z NX XX 1 a"),
        "ERR XX and NX options at the same time are not compatible"
    );
    for cmd in ["ZADD z GT LT 1 a", "ZADD z NX GT 1 a", "ZADD z LT NX 1 a"] {
        assert_eq!(
            fails(&mut s, cmd),
            "ERR GT, LT, and/or NX options at the same time are not compatible"
        );
    }
    assert_eq!(
        fails(&mut s, "ZADD z INCR 1 a 2 b"),
        "ERR INCR option supports a single increment-element pair"
    );
    // Pairs are checked before conflicts; scores after.
    assert_eq!(fails(&mut s, "ZADD z NX XX 1 a 2"), "ERR syntax error");
    assert_eq!(fails(&mut s, "ZADD z CH 1 a CH"), "ERR syntax error");
    assert_eq!(
        fails(&mut s, "ZADD z 1"),
        "ERR wrong number of arguments for 'zadd' command"
    );
    assert_eq!(
        fails(&mut s, "ZADD z x a"),
        "ERR value is not a valid float"
    );
    assert_eq!(
        fails(&mut s, "ZADD z nan a"),
        "ERR value is not a valid float"
    );
    with_string(&mut s);
    assert_eq!(
        fails(&mut s, "ZADD str x a"),
        "ERR value is not a valid float"
    );
    assert_eq!(
        fails(&mut s, "ZADD str NX XX 1 a"),
        "ERR XX and NX options at the same time are not compatible"
    );
    assert_eq!(fails(&mut s, "ZADD str 1 a"), "WRONGTYPE");
    assert!(s.top.len() == 1, "no sorted set was created");
}

#[test]
fn scores_and_weights_past_a_doubles_range_are_not_valid_floats() {
    // redis-server 7.0.15 refuses what strtod flags with ERANGE (`1e309` overflows to inf,
    // `1e-400` underflows to 0), before looking at the key's type; spelled-out infinities and
    // subnormals are scores.
    let mut s = MapSpace::new(0);
    with_string(&mut s);
    for cmd in [
        "ZADD str 1 a 1e309 b",
        "ZADD z -1e309 a",
        "ZADD z 1e-400 a",
        "ZINCRBY z 1e309 a",
        "ZADD z INCR -2e-999 a",
    ] {
        assert_eq!(
            fails(&mut s, cmd),
            "ERR value is not a valid float",
            "{cmd}"
        );
    }
    assert_eq!(s.top.len(), 1, "no sorted set was created");
    assert_eq!(
        ok(&mut s, "ZADD z 5e-324 a inf b -Infinity c 0e-400 d"),
        int(4)
    );
    assert_eq!(ok(&mut s, "ZSCORE z a"), dbl("4.9406564584124654e-324"));
    assert_eq!(ok(&mut s, "ZSCORE z d"), dbl("0"));
    for w in ["1e309", "-1e309", "1e-400"] {
        assert_eq!(
            fails(&mut s, &format!("ZUNIONSTORE d 1 z WEIGHTS {w}")),
            "ERR weight value is not a float",
            "{w}"
        );
    }
    assert_eq!(ok(&mut s, "ZUNIONSTORE d 1 z WEIGHTS inf"), int(4));
    // Range bounds are C's strtod without the ERANGE check: 1e309 is +inf there.
    assert_eq!(ok(&mut s, "ZCOUNT z -1e309 1e309"), int(4));
}

#[test]
fn zscan_of_a_compact_sorted_set_prints_integral_scores_whole() {
    // redis-server 7.0.15: ZSCAN answers a listpack's stored score texts (d2string), a
    // skiplist's `%.17g`; ZSCORE prints `%.17g` either way.
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 123456789012345678 a 1e17 b 2.5 c 1e300 d");
    let Reply::Array(page) = ok(&mut s, "ZSCAN z 0") else {
        panic!("ZSCAN answers an array");
    };
    let mut items: Vec<(Reply, Reply)> = match &page[1] {
        Reply::Array(v) => v.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect(),
        other => panic!("{other:?}"),
    };
    items.sort_by_key(|(m, _)| format!("{m:?}"));
    assert_eq!(
        items,
        vec![
            (bulk("a"), bulk("123456789012345680")),
            (bulk("b"), bulk("100000000000000000")),
            (bulk("c"), bulk("2.5")),
            (bulk("d"), bulk("1.0000000000000001e+300")),
        ]
    );
    assert_eq!(ok(&mut s, "ZSCORE z a"), dbl("1.2345678901234568e+17"));
    // Past 128 members the sorted set is big: `%.17g`.
    for i in 0..130 {
        ok(&mut s, &format!("ZADD z {i} m{i}"));
    }
    let mut cursor = "0".to_string();
    let mut a_score = None;
    loop {
        let Reply::Array(page) = ok(&mut s, &format!("ZSCAN z {cursor} COUNT 50")) else {
            panic!("ZSCAN answers an array");
        };
        if let Reply::Array(v) = &page[1] {
            for p in v.chunks(2) {
                if p[0] == bulk("a") {
                    a_score = Some(p[1].clone());
                }
            }
        }
        cursor = match &page[0] {
            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("{other:?}"),
        };
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(a_score, Some(bulk("1.2345678901234568e+17")));
}

#[test]
fn zpop_counts_that_are_not_integers_are_out_of_range() {
    // redis-server 7.0.15 answers these with the negative count's text, before the type check.
    let mut s = MapSpace::new(0);
    with_string(&mut s);
    for cmd in [
        "ZPOPMIN z abc",
        "ZPOPMIN z +1",
        "ZPOPMAX z 1.5",
        "ZPOPMIN z 99999999999999999999",
        "ZPOPMAX z -1",
        "ZPOPMIN str abc",
    ] {
        assert_eq!(
            fails(&mut s, cmd),
            "ERR value is out of range, must be positive",
            "{cmd}"
        );
    }
}

#[test]
fn zadd_gt_never_lowers_a_score_and_lt_never_raises_one() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 5 a");
    assert_eq!(ok(&mut s, "ZADD z GT CH 3 a"), int(0));
    assert_eq!(ok(&mut s, "ZSCORE z a"), dbl("5"));
    assert_eq!(ok(&mut s, "ZADD z GT CH 7 a"), int(1));
    assert_eq!(ok(&mut s, "ZADD z LT CH 9 a"), int(0));
    assert_eq!(ok(&mut s, "ZADD z LT CH 1 a"), int(1));
    assert_eq!(ok(&mut s, "ZSCORE z a"), dbl("1"));
    // GT/LT still add new members.
    assert_eq!(ok(&mut s, "ZADD z GT 1 b"), int(1));
    assert_eq!(ok(&mut s, "ZADD z XX GT 10 b 10 c"), int(0));
    assert_eq!(ok(&mut s, "ZSCORE z b"), dbl("10"));
    assert_eq!(ok(&mut s, "ZSCORE z c"), Reply::Nil);
}

#[test]
fn zadd_nx_and_xx_and_incr_reply_nil_when_not_applied() {
    let mut s = MapSpace::new(0);
    assert_eq!(ok(&mut s, "ZADD z XX 1 a"), int(0));
    assert_eq!(ok(&mut s, "ZADD z XX INCR 1 a"), Reply::Nil);
    assert!(s.top.is_empty(), "XX on a missing key creates nothing");
    assert_eq!(ok(&mut s, "ZADD z INCR 1.5 a"), dbl("1.5"));
    assert_eq!(ok(&mut s, "ZADD z NX INCR 1 a"), Reply::Nil);
    assert_eq!(ok(&mut s, "ZADD z GT INCR -1 a"), Reply::Nil);
    assert_eq!(ok(&mut s, "ZADD z INCR 0 a"), dbl("1.5"));
    assert_eq!(ok(&mut s, "ZINCRBY z 2 a"), dbl("3.5"));
    assert_eq!(ok(&mut s, "ZINCRBY z 3.3 n"), dbl("3.2999999999999998"));
    assert_eq!(
        fails(&mut s, "ZINCRBY z x a"),
        "ERR value is not a valid float"
    );
}

#[test]
fn an_increment_producing_nan_is_refused_and_changes_nothing() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z inf a");
    assert_eq!(
        fails(&mut s, "ZINCRBY z -inf a"),
        "ERR resulting score is not a number (NaN)"
    );
    assert_eq!(
        fails(&mut s, "ZADD z INCR -inf a"),
        "ERR resulting score is not a number (NaN)"
    );
    assert_eq!(ok(&mut s, "ZSCORE z a"), dbl("inf"));
}

#[test]
fn negative_zero_is_stored_as_zero() {
    let mut s = MapSpace::new(0);
    // redis-server answers `-0` for the increment of a new member, then stores 0.
    assert_eq!(ok(&mut s, "ZADD q INCR -0 a"), dbl("-0"));
    assert_eq!(ok(&mut s, "ZSCORE q a"), dbl("0"));
    ok(&mut s, "ZADD z -0 a 0 b");
    assert_eq!(ok(&mut s, "ZRANGE z 0 -1 WITHSCORES"), pairs("a 0 b 0"));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z -0 0"), members("a b"));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z (-0 +inf"), members(""));
}

#[test]
fn scores_print_as_percent_17g() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 3.3 a 1e21 b -inf c 10 d");
    assert_eq!(
        ok(&mut s, "ZRANGE z 0 -1 WITHSCORES"),
        pairs("c -inf a 3.2999999999999998 d 10 b 1e+21")
    );
    assert_eq!(
        ok(&mut s, "ZMSCORE z a nope"),
        Reply::Array(vec![dbl("3.2999999999999998"), Reply::Nil])
    );
    assert_eq!(
        ok(&mut s, "ZMSCORE missing a"),
        Reply::Array(vec![Reply::Nil])
    );
}

#[test]
fn a_string_key_is_the_wrong_type_for_every_command() {
    let mut s = MapSpace::new(0);
    with_string(&mut s);
    for cmd in [
        "ZSCORE str a",
        "ZMSCORE str a",
        "ZCARD str",
        "ZRANK str a",
        "ZREVRANK str a",
        "ZRANGE str 0 -1",
        "ZRANGEBYSCORE str 0 1",
        "ZRANGEBYLEX str - +",
        "ZRANGESTORE d str 0 -1",
        "ZCOUNT str 0 1",
        "ZLEXCOUNT str - +",
        "ZREM str a",
        "ZREMRANGEBYRANK str 0 1",
        "ZREMRANGEBYSCORE str 0 1",
        "ZREMRANGEBYLEX str - +",
        "ZPOPMIN str",
        "ZPOPMAX str 0",
        "ZMPOP 1 str MIN",
        "ZUNION 1 str",
        "ZINTERSTORE d 1 str",
        "ZDIFF 1 str",
        "ZINTERCARD 1 str",
        "ZRANDMEMBER str",
        "ZRANDMEMBER str 1",
        "ZSCAN str 0",
        "ZINCRBY str 1 a",
    ] {
        assert_eq!(fails(&mut s, cmd), "WRONGTYPE", "{cmd}");
    }
}

#[test]
fn argument_errors_come_before_wrongtype() {
    let mut s = MapSpace::new(0);
    with_string(&mut s);
    assert_eq!(
        fails(&mut s, "ZCOUNT str 1 x"),
        "ERR min or max is not a float"
    );
    assert_eq!(
        fails(&mut s, "ZLEXCOUNT str a b"),
        "ERR min or max not valid string range item"
    );
    assert_eq!(
        fails(&mut s, "ZREMRANGEBYRANK str x 1"),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(fails(&mut s, "ZSCAN str x"), "ERR invalid cursor");
    assert_eq!(fails(&mut s, "ZRANDMEMBER str 1 foo"), "ERR syntax error");
    assert_eq!(
        fails(&mut s, "ZPOPMIN str -1"),
        "ERR value is out of range, must be positive"
    );
}

#[test]
fn zrange_by_rank_and_reverse() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2 b 3 c 4 d 5 e");
    assert_eq!(ok(&mut s, "ZRANGE z 0 -1"), members("a b c d e"));
    assert_eq!(ok(&mut s, "ZRANGE z 1 2"), members("b c"));
    assert_eq!(ok(&mut s, "ZRANGE z -2 100"), members("d e"));
    assert_eq!(ok(&mut s, "ZRANGE z 3 1"), members(""));
    assert_eq!(ok(&mut s, "ZRANGE z 0 1 REV"), members("e d"));
    assert_eq!(ok(&mut s, "ZREVRANGE z 1 3"), members("d c b"));
    assert_eq!(ok(&mut s, "ZREVRANGE z 0 0 WITHSCORES"), pairs("e 5"));
    assert_eq!(ok(&mut s, "ZRANGE nokey 0 -1"), members(""));
    // LIMIT with a rank range is an error, except LIMIT x -1 (Redis's "no limit" sentinel).
    assert_eq!(
        fails(&mut s, "ZRANGE z 0 -1 LIMIT 0 1"),
        "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"
    );
    assert_eq!(ok(&mut s, "ZRANGE z 0 1 LIMIT 3 -1"), members("a b"));
    assert_eq!(
        fails(&mut s, "ZRANGE z 0 1 LIMIT x 1 WITHSCORES"),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        fails(&mut s, "ZRANGE z a 1"),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        fails(&mut s, "ZRANGE z 0 -1 BYLEX BYLEX"),
        "ERR syntax error"
    );
    assert_eq!(fails(&mut s, "ZRANGEBYSCORE z 0 1 REV"), "ERR syntax error");
    assert_eq!(fails(&mut s, "ZREVRANGE z 0 1 REV"), "ERR syntax error");
}

#[test]
fn rank_ranges_of_a_big_set_read_from_the_nearer_end() {
    let mut s = MapSpace::new(0);
    for i in 0..1000 {
        ok(&mut s, &format!("ZADD z {i} m{i:04}"));
    }
    assert!(meta_of(&mut s, "z").big);
    assert_eq!(ok(&mut s, "ZRANGE z 998 1200"), members("m0998 m0999"));
    assert_eq!(ok(&mut s, "ZRANGE z 300 301"), members("m0300 m0301"));
    assert_eq!(ok(&mut s, "ZREVRANGE z 0 1"), members("m0999 m0998"));
    assert_eq!(ok(&mut s, "ZREVRANGE z 700 701"), members("m0299 m0298"));
    assert_eq!(ok(&mut s, "ZRANK z m0700"), int(700));
    assert_eq!(ok(&mut s, "ZREVRANK z m0700"), int(299));
    let Reply::Array(all) = ok(&mut s, "ZRANGE z 0 -1") else {
        panic!()
    };
    assert_eq!(all.len(), 1000);
    assert_eq!(ok(&mut s, "ZCOUNT z (10 +inf"), int(989));
}

#[test]
fn zrangebyscore_with_exclusive_bounds_and_limit() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2 b 3 c 4 d");
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z (1 3"), members("b c"));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z (1 (3"), members("b"));
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z -inf +inf LIMIT 1 2"),
        members("b c")
    );
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z -inf +inf LIMIT 1 -1"),
        members("b c d")
    );
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z -inf +inf LIMIT -1 2"),
        members("")
    );
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z -inf +inf LIMIT 4 2"),
        members("")
    );
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z -inf +inf LIMIT 0 0"),
        members("")
    );
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z 3 1"), members(""));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z (2 2"), members(""));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z 2 2"), members("b"));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z ( 1"), members("a"), "`(` is (0");
    assert_eq!(
        ok(&mut s, "ZRANGEBYSCORE z 2 3 WITHSCORES"),
        pairs("b 2 c 3")
    );
    assert_eq!(
        ok(&mut s, "ZREVRANGEBYSCORE z 4 (1 LIMIT 1 2 WITHSCORES"),
        pairs("c 3 b 2")
    );
    assert_eq!(ok(&mut s, "ZRANGE z (1 3 BYSCORE REV"), members(""));
    assert_eq!(ok(&mut s, "ZRANGE z 3 (1 BYSCORE REV"), members("c b"));
    assert_eq!(ok(&mut s, "ZRANGEBYSCORE z (inf +inf"), members(""));
    for bad in ["x 1", "[1 3", "nan 3", "1 (nan", "1 ", "(1x 2"] {
        let cmd = format!("ZRANGEBYSCORE z {bad}");
        if bad.split_whitespace().count() < 2 {
            continue;
        }
        assert_eq!(
            fails(&mut s, &cmd),
            "ERR min or max is not a float",
            "{cmd}"
        );
    }
    assert_eq!(
        fails(&mut s, "ZRANGEBYSCORE z (1 3 LIMIT 1"),
        "ERR syntax error"
    );
}

#[test]
fn lex_ranges_over_one_score() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 0 a 0 b 0 c 0 d 0 e");
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z - +"), members("a b c d e"));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z [b (d"), members("b c"));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z (b [d"), members("c d"));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z + -"), members(""));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z [ +"), members("a b c d e"));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z - + LIMIT 1 2"), members("b c"));
    assert_eq!(ok(&mut s, "ZREVRANGEBYLEX z + [c"), members("e d c"));
    assert_eq!(
        ok(&mut s, "ZREVRANGEBYLEX z (d - LIMIT 1 5"),
        members("b a")
    );
    assert_eq!(ok(&mut s, "ZRANGE z [e (a BYLEX REV"), members("e d c b"));
    assert_eq!(ok(&mut s, "ZLEXCOUNT z [b +"), int(4));
    assert_eq!(ok(&mut s, "ZLEXCOUNT z (c (c"), int(0));
    assert_eq!(ok(&mut s, "ZLEXCOUNT z [c [c"), int(1));
    for bad in ["a b", "+x -", "[a x"] {
        assert_eq!(
            fails(&mut s, &format!("ZRANGEBYLEX z {bad}")),
            "ERR min or max not valid string range item"
        );
    }
    assert_eq!(
        fails(&mut s, "ZRANGE z a b BYLEX WITHSCORES"),
        "ERR syntax error, WITHSCORES not supported in combination with BYLEX"
    );
    assert_eq!(ok(&mut s, "ZREMRANGEBYLEX z (a [c"), int(2));
    assert_eq!(ok(&mut s, "ZRANGE z 0 -1"), members("a d e"));
}

#[test]
fn lex_ranges_over_mixed_scores_walk_like_a_listpack() {
    let mut s = MapSpace::new(0);
    // Order: (1,c) (2,a) (3,d) (4,b). A listpack walk starts at the first member >= min and
    // goes on while members are <= max.
    ok(&mut s, "ZADD z 1 c 2 a 3 d 4 b");
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z [b [z"), members("c a d b"));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z [b [c"), members("c a"));
    // The walk only starts when the last member is >= min and the first <= max.
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z [d +"), members(""));
    assert_eq!(ok(&mut s, "ZLEXCOUNT z [b [c"), int(2));
    assert_eq!(ok(&mut s, "ZREVRANGEBYLEX z [c -"), members("b d a c"));
}

#[test]
fn zcount_and_zrank_answer_for_missing_keys_and_members() {
    let mut s = MapSpace::new(0);
    assert_eq!(ok(&mut s, "ZCOUNT nokey -inf +inf"), int(0));
    assert_eq!(ok(&mut s, "ZLEXCOUNT nokey - +"), int(0));
    assert_eq!(ok(&mut s, "ZRANK nokey a"), Reply::Nil);
    ok(&mut s, "ZADD z 1 a 1 b 2 c");
    assert_eq!(ok(&mut s, "ZRANK z x"), Reply::Nil);
    assert_eq!(ok(&mut s, "ZRANK z b"), int(1));
    assert_eq!(ok(&mut s, "ZREVRANK z b"), int(1));
    assert_eq!(ok(&mut s, "ZREVRANK z c"), int(0));
    assert_eq!(ok(&mut s, "ZCOUNT z 1 1"), int(2));
    assert_eq!(ok(&mut s, "ZCOUNT z (1 2"), int(1));
    assert_eq!(
        fails(&mut s, "ZRANK z a WITHSCORE"),
        "ERR wrong number of arguments for 'zrank' command"
    );
}

#[test]
fn the_last_removal_deletes_the_key_and_its_elements() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2 b 3 c");
    assert_eq!(ok(&mut s, "ZREM z a nope"), int(1));
    assert_eq!(ok(&mut s, "ZREM z b c a"), int(2));
    assert!(s.top.is_empty() && s.elements.is_empty());
    assert_eq!(ok(&mut s, "ZREM z a"), int(0));
    ok(&mut s, "ZADD z 1 a 2 b 3 c 4 d");
    assert_eq!(ok(&mut s, "ZREMRANGEBYRANK z -3 -2"), int(2));
    assert_eq!(ok(&mut s, "ZRANGE z 0 -1"), members("a d"));
    assert_eq!(ok(&mut s, "ZREMRANGEBYRANK z 5 10"), int(0));
    assert_eq!(ok(&mut s, "ZREMRANGEBYSCORE z (1 +inf"), int(1));
    assert_eq!(ok(&mut s, "ZREMRANGEBYSCORE z -inf 1"), int(1));
    assert!(s.top.is_empty() && s.elements.is_empty());
    assert_eq!(ok(&mut s, "ZREMRANGEBYSCORE z -inf 1"), int(0));
}

#[test]
fn zpop_replies_flat_without_count_and_pairs_with_one() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2 b 3 c 4 d");
    assert_eq!(
        ok(&mut s, "ZPOPMIN z"),
        Reply::Array(vec![bulk("a"), dbl("1")])
    );
    assert_eq!(ok(&mut s, "ZPOPMAX z 2"), pairs("d 4 c 3"));
    assert_eq!(ok(&mut s, "ZPOPMAX z 0"), Reply::Array(vec![]));
    assert_eq!(ok(&mut s, "ZPOPMIN z 99999999999"), pairs("b 2"));
    assert!(s.top.is_empty());
    assert_eq!(ok(&mut s, "ZPOPMIN z"), Reply::Array(vec![]));
    assert_eq!(ok(&mut s, "ZPOPMIN z 3"), Reply::Array(vec![]));
    assert_eq!(
        fails(&mut s, "ZPOPMIN z x"),
        "ERR value is out of range, must be positive"
    );
    assert_eq!(fails(&mut s, "ZPOPMIN z 1 2"), "ERR syntax error");
}

#[test]
fn zmpop_pops_from_the_first_existing_key() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2 b 3 c");
    let nested = |key: &str, list: &str| {
        let w: Vec<&str> = list.split_whitespace().collect();
        Reply::Array(vec![
            bulk(key),
            Reply::Array(
                w.chunks(2)
                    .map(|p| Reply::Array(vec![bulk(p[0]), dbl(p[1])]))
                    .collect(),
            ),
        ])
    };
    assert_eq!(ok(&mut s, "ZMPOP 2 nokey z MIN"), nested("z", "a 1"));
    assert_eq!(ok(&mut s, "ZMPOP 1 z max COUNT 5"), nested("z", "c 3 b 2"));
    assert!(s.top.is_empty());
    assert_eq!(ok(&mut s, "ZMPOP 2 nokey z MIN"), Reply::NilArray);
    assert_eq!(
        fails(&mut s, "ZMPOP 0 z MIN"),
        "ERR numkeys should be greater than 0"
    );
    assert_eq!(
        fails(&mut s, "ZMPOP x z MIN"),
        "ERR numkeys should be greater than 0"
    );
    assert_eq!(fails(&mut s, "ZMPOP 5 z MIN"), "ERR syntax error");
    assert_eq!(fails(&mut s, "ZMPOP 1 z foo"), "ERR syntax error");
    assert_eq!(
        fails(&mut s, "ZMPOP 1 z MIN COUNT 0"),
        "ERR count should be greater than 0"
    );
    assert_eq!(
        fails(&mut s, "ZMPOP 1 z MIN COUNT 1 COUNT 1"),
        "ERR syntax error"
    );
    with_string(&mut s);
    ok(&mut s, "ZADD z 1 a");
    assert_eq!(fails(&mut s, "ZMPOP 2 str z MIN"), "WRONGTYPE");
    assert_eq!(ok(&mut s, "ZMPOP 2 z str MIN"), nested("z", "a 1"));
}

#[test]
fn zunion_zinter_zdiff_with_weights_and_aggregates() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD a 1 x 2 y 3 z");
    ok(&mut s, "ZADD b 10 y 20 z 30 w");
    assert_eq!(
        ok(&mut s, "ZUNION 2 a b WITHSCORES"),
        pairs("x 1 y 12 z 23 w 30")
    );
    assert_eq!(
        ok(&mut s, "ZINTER 2 a b WEIGHTS 2 0.5 WITHSCORES"),
        pairs("y 9 z 16")
    );
    assert_eq!(
        ok(
            &mut s,
            "ZINTER 2 a b AGGREGATE MAX AGGREGATE MIN WITHSCORES"
        ),
        pairs("y 2 z 3")
    );
    assert_eq!(ok(&mut s, "ZUNION 2 a b AGGREGATE max"), members("x y z w"));
    assert_eq!(ok(&mut s, "ZDIFF 2 a b WITHSCORES"), pairs("x 1"));
    assert_eq!(ok(&mut s, "ZDIFF 2 nokey a"), members(""));
    assert_eq!(ok(&mut s, "ZINTER 2 a nokey"), members(""));
    assert_eq!(ok(&mut s, "ZINTERCARD 2 a b"), int(2));
    assert_eq!(ok(&mut s, "ZINTERCARD 2 a b LIMIT 1"), int(1));
    assert_eq!(ok(&mut s, "ZINTERCARD 2 a b LIMIT 0"), int(2));
    // inf * 0 and inf + -inf count as 0.
    ok(&mut s, "ZADD i inf m");
    ok(&mut s, "ZADD j -inf m");
    assert_eq!(ok(&mut s, "ZUNION 1 i WEIGHTS 0 WITHSCORES"), pairs("m 0"));
    assert_eq!(ok(&mut s, "ZINTER 2 i j WITHSCORES"), pairs("m 0"));
    // ZINTER turns only the first (smallest) source's NaN product into 0; a later source's
    // NaN goes into the aggregate as it is (SUM: inf + NaN is NaN, so 0; MIN and MAX: a NaN
    // never wins). ZUNION turns every source's NaN product into 0. Replies of redis-server
    // 7.0.15.
    ok(&mut s, "ZADD ii inf m 1 n -inf o");
    ok(&mut s, "ZADD kk 1 m 1 n 1 o");
    assert_eq!(
        ok(&mut s, "ZINTER 2 ii ii WITHSCORES WEIGHTS 2 0"),
        pairs("m 0 o 0 n 2")
    );
    assert_eq!(
        ok(&mut s, "ZINTER 2 ii kk WITHSCORES WEIGHTS 0 1"),
        pairs("m 1 n 1 o 1")
    );
    assert_eq!(
        ok(&mut s, "ZINTER 2 kk ii WITHSCORES WEIGHTS 1 0"),
        pairs("m 0 o 0 n 1")
    );
    assert_eq!(
        ok(
            &mut s,
            "ZINTER 2 kk ii WITHSCORES WEIGHTS 1 0 AGGREGATE MIN"
        ),
        pairs("n 0 m 1 o 1")
    );
    assert_eq!(
        ok(
            &mut s,
            "ZINTER 2 kk ii WITHSCORES WEIGHTS 1 0 AGGREGATE MAX"
        ),
        pairs("m 1 n 1 o 1")
    );
    assert_eq!(
        ok(
            &mut s,
            "ZUNION 2 kk ii WITHSCORES WEIGHTS 1 0 AGGREGATE MIN"
        ),
        pairs("m 0 n 0 o 0")
    );
    // A weight of -1 on 0 answers -0, as redis-server does when nothing is stored.
    ok(&mut s, "ZADD zero 0 m");
    assert_eq!(
        ok(&mut s, "ZUNION 1 zero WEIGHTS -1 WITHSCORES"),
        pairs("m -0")
    );
}

#[test]
fn set_sources_score_one() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 5 a 6 b");
    // A set as the sets family stores it: hashed members with empty values.
    let mut set = crate::meta::create(&mut s, &Bytes::from_static(b"s"), ValueKind::Set).unwrap();
    for m in ["a", "c"] {
        s.el_put(&set.coll, &hashed_sub(0, m.as_bytes()), &[])
            .unwrap();
        set.meta.len += 1;
    }
    crate::meta::finish(&mut s, &set, &cx()).unwrap();
    assert_eq!(ok(&mut s, "ZUNION 2 z s WITHSCORES"), pairs("c 1 a 6 b 6"));
    assert_eq!(ok(&mut s, "ZINTER 2 s z WITHSCORES"), pairs("a 6"));
    assert_eq!(ok(&mut s, "ZDIFF 2 s z WITHSCORES"), pairs("c 1"));
}

#[test]
fn numkeys_errors_follow_redis() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD w 0 a");
    with_string(&mut s);
    assert_eq!(
        fails(&mut s, "ZUNION 0 a"),
        "ERR at least 1 input key is needed for 'zunion' command"
    );
    assert_eq!(
        fails(&mut s, "ZUNIONSTORE d 0 a"),
        "ERR at least 1 input key is needed for 'zunionstore' command"
    );
    assert_eq!(
        fails(&mut s, "ZINTERCARD -1 a"),
        "ERR at least 1 input key is needed for 'zintercard' command"
    );
    assert_eq!(fails(&mut s, "ZUNION 3 a"), "ERR syntax error");
    assert_eq!(
        fails(&mut s, "ZUNION x a"),
        "ERR value is not an integer or out of range"
    );
    assert_eq!(
        fails(&mut s, "ZUNION 1 w WEIGHTS x"),
        "ERR weight value is not a float"
    );
    assert_eq!(fails(&mut s, "ZUNION 2 w w WEIGHTS 1"), "ERR syntax error");
    assert_eq!(fails(&mut s, "ZDIFF 1 w WEIGHTS 1"), "ERR syntax error");
    assert_eq!(
        fails(&mut s, "ZUNION 1 w AGGREGATE foo"),
        "ERR syntax error"
    );
    assert_eq!(
        fails(&mut s, "ZUNIONSTORE d 1 w WITHSCORES"),
        "ERR syntax error"
    );
    assert_eq!(
        fails(&mut s, "ZINTERCARD 1 w WITHSCORES"),
        "ERR syntax error"
    );
    assert_eq!(
        fails(&mut s, "ZINTERCARD 1 w LIMIT -1"),
        "ERR LIMIT can't be negative"
    );
    assert_eq!(
        fails(&mut s, "ZINTERCARD 1 w LIMIT x"),
        "ERR LIMIT can't be negative"
    );
    // Sources are checked before options.
    assert_eq!(fails(&mut s, "ZUNION 2 w str foo"), "WRONGTYPE");
}

#[test]
fn store_commands_replace_the_destination_or_delete_it() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD a 1 x 2 y");
    with_string(&mut s);
    assert_eq!(ok(&mut s, "ZUNIONSTORE str 1 a WEIGHTS 3"), int(2));
    assert_eq!(ok(&mut s, "ZRANGE str 0 -1 WITHSCORES"), pairs("x 3 y 6"));
    assert_eq!(ok(&mut s, "ZINTERSTORE str 2 a nokey"), int(0));
    assert!(s.get(b"str").unwrap().is_none());
    assert_eq!(
        ok(&mut s, "ZDIFFSTORE a 1 a"),
        int(2),
        "a source may be the destination"
    );
    assert_eq!(ok(&mut s, "ZRANGESTORE d a 0 -1 REV"), int(2));
    assert_eq!(ok(&mut s, "ZRANGE d 0 -1 WITHSCORES"), pairs("x 1 y 2"));
    assert_eq!(ok(&mut s, "ZRANGESTORE d a (1 3 BYSCORE LIMIT 0 1"), int(1));
    assert_eq!(ok(&mut s, "ZRANGE d 0 -1 WITHSCORES"), pairs("y 2"));
    assert_eq!(ok(&mut s, "ZRANGESTORE d nokey 0 -1"), int(0));
    assert!(s.get(b"d").unwrap().is_none());
    assert_eq!(
        fails(&mut s, "ZRANGESTORE d a 0 -1 WITHSCORES"),
        "ERR syntax error"
    );
    // A stored -0 is 0.
    ok(&mut s, "ZADD zero 0 m");
    ok(&mut s, "ZUNIONSTORE d 1 zero WEIGHTS -1");
    assert_eq!(ok(&mut s, "ZSCORE d m"), dbl("0"));
}

#[test]
fn encoding_turns_big_past_128_members_or_a_64_byte_member_and_stays() {
    let mut s = MapSpace::new(0);
    for i in 0..128 {
        ok(&mut s, &format!("ZADD z {i} m{i}"));
    }
    assert!(!meta_of(&mut s, "z").big);
    ok(&mut s, "ZADD z 0 m128");
    assert!(meta_of(&mut s, "z").big);
    ok(&mut s, "ZREMRANGEBYRANK z 0 100");
    assert!(meta_of(&mut s, "z").big, "sticky");
    ok(&mut s, &format!("ZADD l 1 {}", "x".repeat(64)));
    assert!(!meta_of(&mut s, "l").big);
    ok(&mut s, &format!("ZADD l 1 {}", "x".repeat(65)));
    assert!(meta_of(&mut s, "l").big);
    // A store builds a new sorted set: compact again when small.
    ok(&mut s, "ZRANGESTORE small z 0 9");
    assert!(!meta_of(&mut s, "small").big);
    ok(&mut s, "ZUNIONSTORE copy 1 z");
    assert!(!meta_of(&mut s, "copy").big);
    ok(&mut s, "ZUNIONSTORE copy2 1 l");
    assert!(meta_of(&mut s, "copy2").big);
}

#[test]
fn zscan_answers_a_compact_set_at_once_and_pages_a_big_one() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 1 a 2.5 b 3.3 c");
    assert_eq!(
        ok(&mut s, "ZSCAN z 0 MATCH *b* COUNT 1"),
        Reply::Array(vec![bulk("0"), Reply::Array(vec![bulk("b"), bulk("2.5")])])
    );
    assert_eq!(
        ok(&mut s, "ZSCAN nokey 0"),
        Reply::Array(vec![bulk("0"), Reply::Array(vec![])])
    );
    assert_eq!(fails(&mut s, "ZSCAN z 0 COUNT 0"), "ERR syntax error");
    for i in 0..300 {
        ok(&mut s, &format!("ZADD big {i} m{i}"));
    }
    let mut cursor = "0".to_string();
    let mut seen = HashSet::new();
    loop {
        let Reply::Array(parts) = ok(&mut s, &format!("ZSCAN big {cursor} COUNT 7")) else {
            panic!()
        };
        let (Reply::Bulk(c), Reply::Array(items)) = (&parts[0], &parts[1]) else {
            panic!()
        };
        for p in items.chunks(2) {
            let (Reply::Bulk(m), Reply::Bulk(score)) = (&p[0], &p[1]) else {
                panic!()
            };
            assert_eq!(&m[1..], &score[..], "member m<i> scores i");
            assert!(seen.insert(m.clone()), "returned twice");
        }
        cursor = String::from_utf8(c.to_vec()).unwrap();
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(seen.len(), 300);
}

#[test]
fn zrandmember_counts_and_ranges() {
    let mut s = MapSpace::new(0);
    assert_eq!(ok(&mut s, "ZRANDMEMBER nokey"), Reply::Nil);
    assert_eq!(ok(&mut s, "ZRANDMEMBER nokey 5"), Reply::Array(vec![]));
    ok(&mut s, "ZADD z 1 a 2 b 3 c");
    let Reply::Bulk(one) = ok(&mut s, "ZRANDMEMBER z") else {
        panic!()
    };
    assert!(["a", "b", "c"].contains(&std::str::from_utf8(&one).unwrap()));
    let Reply::Array(v) = ok(&mut s, "ZRANDMEMBER z 5") else {
        panic!()
    };
    assert_eq!(v.len(), 3);
    let Reply::Array(v) = ok(&mut s, "ZRANDMEMBER z -5") else {
        panic!()
    };
    assert_eq!(v.len(), 5);
    let Reply::Pairs(v) = ok(&mut s, "ZRANDMEMBER z 2 WITHSCORES") else {
        panic!()
    };
    assert_eq!(v.len(), 2);
    for (m, score) in v {
        let Reply::Bulk(m) = m else { panic!() };
        let want = match &m[..] {
            b"a" => "1",
            b"b" => "2",
            _ => "3",
        };
        assert_eq!(score, dbl(want));
    }
    assert_eq!(
        ok(&mut s, "ZRANDMEMBER z 0 WITHSCORES"),
        Reply::Array(vec![])
    );
    assert_eq!(
        fails(&mut s, "ZRANDMEMBER z -9223372036854775808"),
        "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807"
    );
    assert_eq!(
        fails(&mut s, "ZRANDMEMBER z 4611686018427387904 WITHSCORES"),
        "ERR value is out of range"
    );
    assert_eq!(
        fails(&mut s, "ZRANDMEMBER z 1 WITHSCORES x"),
        "ERR syntax error"
    );
    assert_eq!(
        fails(&mut s, "ZRANDMEMBER z x"),
        "ERR value is not an integer or out of range"
    );
    assert!(fails(&mut s, "ZRANDMEMBER z -4611686018427387903").contains("over the limit"));
}

#[test]
fn key_positions() {
    let spec = |n: &str| crate::command::lookup(n).unwrap();
    let args = |s: &str| -> Vec<Bytes> {
        s.split_whitespace()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    };
    assert_eq!(
        spec("zunionstore")
            .key_indices(&args("ZUNIONSTORE d 2 a b WEIGHTS 1 2"))
            .unwrap(),
        vec![1, 3, 4]
    );
    assert_eq!(
        spec("zmpop").key_indices(&args("ZMPOP 2 a b MIN")).unwrap(),
        vec![2, 3]
    );
    assert_eq!(
        spec("zrangestore")
            .key_indices(&args("ZRANGESTORE d s 0 -1"))
            .unwrap(),
        vec![1, 2]
    );
    assert!(spec("zadd").is_write() && !spec("zrange").is_write());
}

// ---- Model -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Add(u8, i8),
    Incr(u8, i8),
    Rem(u8),
    PopMin(u8),
    RemRangeByScore(i8, i8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..20, -5i8..5).prop_map(|(m, s)| Op::Add(m, s)),
        2 => (0u8..20, -3i8..3).prop_map(|(m, s)| Op::Incr(m, s)),
        1 => (0u8..20).prop_map(Op::Rem),
        1 => (0u8..3).prop_map(Op::PopMin),
        1 => (-6i8..6, -6i8..6).prop_map(|(a, b)| Op::RemRangeByScore(a, b)),
    ]
}

/// The model's members in Redis order.
fn model_order(m: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = m.iter().map(|(k, s)| (k.clone(), *s)).collect();
    v.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap().then(a.0.cmp(&b.0)));
    v
}

proptest! {
    #[test]
    fn random_writes_match_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut s = MapSpace::new(0);
        let mut model: BTreeMap<String, f64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Add(m, sc) => {
                    ok(&mut s, &format!("ZADD z {sc} m{m}"));
                    model.insert(format!("m{m}"), sc as f64);
                }
                Op::Incr(m, d) => {
                    ok(&mut s, &format!("ZINCRBY z {d} m{m}"));
                    *model.entry(format!("m{m}")).or_insert(0.0) += d as f64;
                }
                Op::Rem(m) => {
                    ok(&mut s, &format!("ZREM z m{m}"));
                    model.remove(&format!("m{m}"));
                }
                Op::PopMin(n) => {
                    ok(&mut s, &format!("ZPOPMIN z {n}"));
                    for (k, _) in model_order(&model).into_iter().take(n as usize) {
                        model.remove(&k);
                    }
                }
                Op::RemRangeByScore(a, b) => {
                    ok(&mut s, &format!("ZREMRANGEBYSCORE z {a} {b}"));
                    model.retain(|_, v| !(*v >= a as f64 && *v <= b as f64));
                }
            }
            let order = model_order(&model);
            let want = Reply::Pairs(
                order
                    .iter()
                    .map(|(k, v)| (bulk(k), dbl(&crate::format::format_double(*v))))
                    .collect(),
            );
            prop_assert_eq!(ok(&mut s, "ZRANGE z 0 -1 WITHSCORES"), want);
            prop_assert_eq!(ok(&mut s, "ZCARD z"), int(order.len() as i64));
            for (rank, (k, _)) in order.iter().enumerate() {
                prop_assert_eq!(ok(&mut s, &format!("ZRANK z {k}")), int(rank as i64));
            }
            let in_range = order.iter().filter(|(_, v)| *v > -2.0 && *v <= 3.0).count();
            prop_assert_eq!(ok(&mut s, "ZCOUNT z (-2 3"), int(in_range as i64));
            let mid: Vec<&str> = order.iter().skip(1).take(3).map(|(k, _)| k.as_str()).collect();
            prop_assert_eq!(ok(&mut s, "ZRANGE z 1 3"), members(&mid.join(" ")));
            if order.is_empty() {
                prop_assert!(s.top.is_empty() && s.elements.is_empty());
            } else {
                // Two element records per member, nothing else.
                prop_assert_eq!(s.elements.len(), 2 * order.len());
            }
        }
    }
}

#[test]
fn repeated_options_follow_redis() {
    let mut s = MapSpace::new(0);
    ok(&mut s, "ZADD z 0 a 0 b 0 c");
    assert_eq!(fails(&mut s, "ZRANGE z 0 -1 REV REV"), "ERR syntax error");
    assert_eq!(
        ok(&mut s, "ZRANGE z 0 0 WITHSCORES WITHSCORES"),
        pairs("a 0")
    );
    assert_eq!(
        ok(
            &mut s,
            "ZRANGEBYSCORE z 0 0 WITHSCORES LIMIT 1 1 WITHSCORES"
        ),
        pairs("b 0")
    );
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z - + LIMIT -1 2"), members(""));
    assert_eq!(ok(&mut s, "ZRANGEBYLEX z - + LIMIT 1 -1"), members("b c"));
    assert_eq!(ok(&mut s, "ZRANGE z (a + BYLEX LIMIT 0 1"), members("b"));
    assert_eq!(ok(&mut s, "ZADD z CH 0 a"), int(0));
    assert_eq!(ok(&mut s, "ZADD z INCR 0 a"), dbl("0"));
    assert_eq!(ok(&mut s, "ZREMRANGEBYRANK z 1 0"), int(0));
}
