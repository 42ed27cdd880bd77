//! Key commands over any kind of value: EXPIRETIME, PEXPIRETIME, TOUCH, RENAME, RENAMENX, COPY
//! and OBJECT, with Redis 7's replies and errors.
//!
//! A key is one top-level record (a string, or a collection's meta record whose elements live
//! under the collection's id, see [`crate::meta`]). RENAME moves that record with
//! [`Space::rename`], which carries the elements along without copying them (O(1), as in
//! Redis); COPY gives the copy a new id and copies the elements under it in bounded chunks
//! (O(N), as in Redis). capdb has one database per keyspace, so COPY's `DB` can only be 0.

use std::ops::Bound;

use bytes::Bytes;
use capdb_types::{Reply, Result, Value, ValueKind};

use crate::command::{Ctx, Keys, Run, Spec, err, not_integer, syntax, wrong_args};
use crate::format::parse_int;
use crate::meta::CollMeta;
use crate::space::{Coll, ElRange, Space};

const KEY: Keys = Keys::Range(1, 1, 1);
const TWO_KEYS: Keys = Keys::Range(1, 2, 1);

/// Elements COPY moves per `el_range` call.
const COPY_CHUNK: usize = 512;

/// Sorted by name.
#[rustfmt::skip]
pub const COMMANDS: &[Spec] = &[
    Spec { name: "copy",        arity: -3, flags: &["write", "denyoom"], keys: TWO_KEYS, run: Run::Write(copy) },
    Spec { name: "expiretime",  arity: 2,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(expiretime) },
    Spec { name: "object",      arity: -2, flags: &["readonly"], keys: Keys::Range(2, 2, 1), run: Run::Read(object) },
    Spec { name: "pexpiretime", arity: 2,  flags: &["readonly", "fast"], keys: KEY, run: Run::Read(pexpiretime) },
    Spec { name: "rename",      arity: 3,  flags: &["write"], keys: TWO_KEYS, run: Run::Write(rename) },
    Spec { name: "renamenx",    arity: 3,  flags: &["write", "fast"], keys: TWO_KEYS, run: Run::Write(renamenx) },
    Spec { name: "touch",       arity: -2, flags: &["readonly", "fast"], keys: Keys::Range(1, -1, 1), run: Run::Read(touch) },
];

/// A key's deadline: -2 when the key is missing, -1 when it has none.
fn deadline_ms(args: &[Bytes], space: &mut dyn Space) -> Result<Option<i64>> {
    Ok(space
        .get(&args[1])?
        .map(|v| v.header.expire_at_ms.map_or(-1, |at| at as i64)))
}

/// `EXPIRETIME key`: the deadline in Unix seconds (rounded to the nearest, as Redis does), -1
/// without one, -2 for a missing key.
fn expiretime(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(match deadline_ms(args, space)? {
        None => -2,
        Some(-1) => -1,
        // Rounded half up without overflow: a deadline near i64::MAX ms (PEXPIREAT accepts
        // one) is 9223372036854776 s, as Redis answers.
        Some(ms) => ((ms as i128 + 500) / 1000) as i64,
    }))
}

/// `PEXPIRETIME key`: the deadline in Unix milliseconds, -1 without one, -2 for a missing key.
fn pexpiretime(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    Ok(Reply::Integer(deadline_ms(args, space)?.unwrap_or(-2)))
}

/// `TOUCH key [key ...]`: how many of the keys exist (a key named twice counts twice). capdb
/// keeps no access times, so nothing else happens.
fn touch(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let mut n = 0;
    for key in &args[1..] {
        n += space.get(key)?.is_some() as i64;
    }
    Ok(Reply::Integer(n))
}

/// `RENAME key newkey`: moves the value (with its TTL and elements) to `newkey`, replacing
/// whatever that held.
fn rename(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    rename_generic(args, space, cx, false)
}

/// `RENAMENX key newkey`: RENAME when `newkey` does not exist; 1 when it renamed, else 0.
fn renamenx(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    rename_generic(args, space, cx, true)
}

fn rename_generic(args: &[Bytes], space: &mut dyn Space, cx: &Ctx, nx: bool) -> Result<Reply> {
    let done = if nx { Reply::Integer(1) } else { Reply::Ok };
    let (from, to) = (&args[1], &args[2]);
    let Some(value) = space.get(from)? else {
        return Err(err("ERR no such key"));
    };
    if from == to {
        return Ok(if nx { Reply::Integer(0) } else { Reply::Ok });
    }
    if nx && space.get(to)?.is_some() {
        return Ok(Reply::Integer(0));
    }
    let restamped = Value::of_kind(
        value.header.kind,
        value.data.clone(),
        cx.timestamp,
        value.header.expire_at_ms,
    );
    if value.is_string() {
        space.put(to, restamped)?;
        space.remove(from)?;
    } else {
        // The elements move with the record; the meta record is rewritten only to stamp it.
        space.rename(from, to)?;
        space.put(to, restamped)?;
    }
    Ok(done)
}

/// COPY's `DB` argument: Redis's integer errors, and only database 0 exists (a Redis started
/// with `databases 1` answers the same).
fn copy_db(raw: &[u8]) -> Result<()> {
    let n = parse_int(raw).ok_or_else(not_integer)?;
    if i32::try_from(n).is_err() {
        return Err(err(
            "ERR value is out of range, value must between -2147483648 and 2147483647",
        ));
    }
    if n != 0 {
        return Err(err("ERR DB index is out of range"));
    }
    Ok(())
}

/// `COPY source destination [DB 0] [REPLACE]`: copies the value (with its TTL; a collection's
/// elements under a new id) unless `destination` exists and REPLACE is not given; 1 when it
/// copied, else 0.
fn copy(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let mut replace = false;
    let mut j = 3;
    while j < args.len() {
        if args[j].eq_ignore_ascii_case(b"REPLACE") {
            replace = true;
        } else if args[j].eq_ignore_ascii_case(b"DB") && j + 1 < args.len() {
            copy_db(&args[j + 1])?;
            j += 1;
        } else {
            return Err(syntax());
        }
        j += 1;
    }
    let (src, dst) = (&args[1], &args[2]);
    if src == dst {
        return Err(err("ERR source and destination objects are the same"));
    }
    let Some(value) = space.get(src)? else {
        return Ok(Reply::Integer(0));
    };
    if space.get(dst)?.is_some() {
        if !replace {
            return Ok(Reply::Integer(0));
        }
        space.remove(dst)?;
    }
    let expire = value.header.expire_at_ms;
    let data = match CollMeta::of(&value)? {
        None => value.data.clone(),
        Some(meta) => {
            let id = space.new_id()?;
            space.creating(dst, value.header.kind)?;
            let from = Coll {
                key: src.clone(),
                id: meta.id,
                kind: value.header.kind,
            };
            let to = Coll {
                key: dst.clone(),
                id,
                kind: value.header.kind,
            };
            copy_elements(space, &from, &to)?;
            CollMeta { id, ..meta }.encode()
        }
    };
    space.put(
        dst,
        Value::of_kind(value.header.kind, data, cx.timestamp, expire),
    )?;
    Ok(Reply::Integer(1))
}

/// Copies every element of `from` into `to`, [`COPY_CHUNK`] at a time.
fn copy_elements(space: &mut dyn Space, from: &Coll, to: &Coll) -> Result<()> {
    let mut after: Option<Bytes> = None;
    loop {
        let chunk = space.el_range(
            from,
            ElRange {
                lo: after.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                hi: Bound::Unbounded,
                rev: false,
                limit: COPY_CHUNK,
            },
        )?;
        for (sub, value) in &chunk {
            space.el_put(to, sub, value)?;
        }
        if chunk.len() < COPY_CHUNK {
            return Ok(());
        }
        after = chunk.last().map(|(sub, _)| sub.clone());
    }
}

/// What `OBJECT ENCODING` answers, as Redis 7.0 names it. A string's encoding is decided from
/// its bytes as Redis decides it on SET (`int` for a 64-bit integer of at most 20 characters,
/// `embstr` up to 44 bytes, else `raw`); Redis also answers `raw` for a short string that
/// APPEND, SETRANGE, SETBIT or BITOP produced, which capdb cannot tell apart.
pub fn encoding(value: &Value) -> Result<&'static str> {
    let big = || CollMeta::of(value).map(|m| m.is_some_and(|m| m.big));
    Ok(match value.header.kind {
        ValueKind::String => {
            let data = &value.data;
            if data.len() <= 20 && parse_int(data).is_some() {
                "int"
            } else if data.len() <= 44 {
                "embstr"
            } else {
                "raw"
            }
        }
        ValueKind::Hash if big()? => "hashtable",
        ValueKind::Hash => "listpack",
        ValueKind::Set if big()? => "hashtable",
        ValueKind::Set => "intset",
        ValueKind::ZSet if big()? => "skiplist",
        ValueKind::ZSet => "listpack",
        ValueKind::List => "quicklist",
    })
}

const OBJECT_HELP: &[&str] = &[
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return the kind of internal representation used in order to store the value",
    "    associated with a <key>.",
    "FREQ <key>",
    "    Return the access frequency index of the <key>. The returned integer is",
    "    proportional to the logarithm of the recent access frequency of the key.",
    "IDLETIME <key>",
    "    Return the idle time of the <key>, that is the approximated number of",
    "    seconds elapsed since the last access to the key.",
    "REFCOUNT <key>",
    "    Return the number of references of the value associated with the specified",
    "    <key>.",
    "HELP",
    "    Prints this help.",
];

/// `OBJECT ENCODING|FREQ|IDLETIME|REFCOUNT key` and `OBJECT HELP`. capdb keeps no access
/// times or counts, so IDLETIME answers 0, REFCOUNT 1, and FREQ Redis's error for a server
/// whose eviction policy is not LFU (Redis's default); a missing key is nil.
fn object(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let sub = args[1].to_ascii_lowercase();
    let sub_name = String::from_utf8_lossy(&sub).into_owned();
    match &sub[..] {
        b"help" => {
            if args.len() != 2 {
                return Err(wrong_args("object|help"));
            }
            Ok(Reply::Array(
                OBJECT_HELP
                    .iter()
                    .map(|l| Reply::Status((*l).to_string()))
                    .collect(),
            ))
        }
        b"encoding" | b"freq" | b"idletime" | b"refcount" => {
            if args.len() != 3 {
                return Err(wrong_args(&format!("object|{sub_name}")));
            }
            let Some(value) = space.get(&args[2])? else {
                return Ok(Reply::Nil);
            };
            match &sub[..] {
                b"encoding" => Ok(Reply::Bulk(Bytes::from_static(
                    encoding(&value)?.as_bytes(),
                ))),
                b"idletime" => Ok(Reply::Integer(0)),
                b"refcount" => Ok(Reply::Integer(1)),
                _ => Err(err(
                    "ERR An LFU maxmemory policy is not selected, access frequency not tracked. Please note that when switching between policies at runtime LRU and LFU data will take some time to adjust.",
                )),
            }
        }
        _ => {
            let raw = String::from_utf8_lossy(&args[1]);
            let shown: String = raw.chars().take(128).collect();
            Err(err(format!(
                "ERR unknown subcommand '{shown}'. Try OBJECT HELP."
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings::tests::{
        NOW, bulk, data, deadline_of, error, get, int, run, set, space, with_string_and_hash,
    };
    use crate::testing::MapSpace;

    #[test]
    fn table_is_sorted() {
        assert!(crate::command::sorted(COMMANDS));
    }

    /// The (field, value) pairs of the hash at `key`, read through HGETALL.
    fn fields(s: &mut MapSpace, key: &str) -> Vec<(Reply, Reply)> {
        match run(s, &format!("HGETALL {key}")).unwrap() {
            Reply::Map(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn coll_id(s: &mut MapSpace, key: &str) -> u64 {
        CollMeta::of(&get(s, key).unwrap()).unwrap().unwrap().id
    }

    #[test]
    fn expiretime_answers_absolute_deadlines() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "EXPIRETIME nokey").unwrap(), int(-2));
        assert_eq!(run(&mut s, "PEXPIRETIME nokey").unwrap(), int(-2));
        assert_eq!(run(&mut s, "EXPIRETIME s").unwrap(), int(-1));
        assert_eq!(run(&mut s, "PEXPIRETIME h").unwrap(), int(-1));
        set(&mut s, "t", b"v", Some(99_999_999_999_500));
        assert_eq!(run(&mut s, "EXPIRETIME t").unwrap(), int(100_000_000_000));
        assert_eq!(
            run(&mut s, "PEXPIRETIME t").unwrap(),
            int(99_999_999_999_500)
        );
        set(&mut s, "t", b"v", Some(99_999_999_999_499));
        assert_eq!(run(&mut s, "EXPIRETIME t").unwrap(), int(99_999_999_999));
        set(&mut s, "gone", b"v", Some(NOW));
        assert_eq!(run(&mut s, "EXPIRETIME gone").unwrap(), int(-2));
        // redis-server 7.0.15 after PEXPIREAT t 9223372036854775807 (and ...307, ...308).
        for (at, want) in [
            (i64::MAX as u64, 9_223_372_036_854_776),
            (9_223_372_036_854_775_307, 9_223_372_036_854_775),
            (9_223_372_036_854_775_308, 9_223_372_036_854_775),
        ] {
            set(&mut s, "far", b"v", Some(at));
            assert_eq!(run(&mut s, "EXPIRETIME far").unwrap(), int(want), "{at}");
        }
        assert_eq!(
            error(&mut s, "EXPIRETIME a b"),
            "ERR wrong number of arguments for 'expiretime' command"
        );
    }

    #[test]
    fn touch_counts_existing_keys_each_time_named() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "TOUCH s h nokey s").unwrap(), int(3));
        assert_eq!(
            error(&mut s, "TOUCH"),
            "ERR wrong number of arguments for 'touch' command"
        );
    }

    #[test]
    fn rename_moves_a_string_with_its_ttl() {
        let mut s = space();
        set(&mut s, "a", b"v", Some(NOW + 500));
        assert_eq!(run(&mut s, "RENAME a b").unwrap(), Reply::Ok);
        assert_eq!(get(&mut s, "a"), None);
        assert_eq!(data(&mut s, "b"), b"v");
        assert_eq!(deadline_of(&mut s, "b"), Some(NOW + 500));
    }

    #[test]
    fn rename_of_a_hash_moves_its_fields_without_copying_them() {
        let mut s = space();
        run(&mut s, "HSET h a 1 b 2").unwrap();
        let id = coll_id(&mut s, "h");
        let elements = s.elements.clone();
        assert_eq!(run(&mut s, "RENAME h h2").unwrap(), Reply::Ok);
        assert_eq!(get(&mut s, "h"), None);
        assert_eq!(coll_id(&mut s, "h2"), id, "same collection, same elements");
        assert_eq!(s.elements, elements);
        assert_eq!(
            fields(&mut s, "h2"),
            vec![(bulk(b"a"), bulk(b"1")), (bulk(b"b"), bulk(b"2"))]
        );
    }

    #[test]
    fn rename_replaces_the_destination_and_reclaims_its_elements() {
        let mut s = space();
        run(&mut s, "HSET old x 1").unwrap();
        set(&mut s, "a", b"v", None);
        assert_eq!(run(&mut s, "RENAME a old").unwrap(), Reply::Ok);
        assert_eq!(data(&mut s, "old"), b"v");
        assert!(
            s.elements.is_empty(),
            "the replaced hash's fields are reclaimed"
        );
        run(&mut s, "HSET h f v").unwrap();
        run(&mut s, "HSET dst g w").unwrap();
        run(&mut s, "RENAME h dst").unwrap();
        assert_eq!(fields(&mut s, "dst"), vec![(bulk(b"f"), bulk(b"v"))]);
        assert_eq!(s.elements.len(), 1);
    }

    #[test]
    fn rename_errors_and_same_key() {
        let mut s = with_string_and_hash();
        assert_eq!(error(&mut s, "RENAME nokey x"), "ERR no such key");
        assert_eq!(error(&mut s, "RENAME nokey nokey"), "ERR no such key");
        assert_eq!(error(&mut s, "RENAMENX nokey nokey"), "ERR no such key");
        assert_eq!(run(&mut s, "RENAME s s").unwrap(), Reply::Ok);
        assert_eq!(run(&mut s, "RENAMENX s s").unwrap(), int(0));
        assert_eq!(data(&mut s, "s"), b"hello");
        assert_eq!(
            error(&mut s, "RENAME a b c"),
            "ERR wrong number of arguments for 'rename' command"
        );
    }

    #[test]
    fn renamenx_renames_only_onto_a_missing_key() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "RENAMENX s h").unwrap(), int(0));
        assert_eq!(data(&mut s, "s"), b"hello");
        assert_eq!(run(&mut s, "RENAMENX h h2").unwrap(), int(1));
        assert_eq!(fields(&mut s, "h2"), vec![(bulk(b"f"), bulk(b"v"))]);
        // An expired destination counts as missing.
        set(&mut s, "gone", b"x", Some(NOW));
        assert_eq!(run(&mut s, "RENAMENX s gone").unwrap(), int(1));
        assert_eq!(data(&mut s, "gone"), b"hello");
    }

    #[test]
    fn copy_of_a_string_keeps_its_ttl() {
        let mut s = space();
        set(&mut s, "a", b"1", Some(NOW + 500));
        assert_eq!(run(&mut s, "COPY a b").unwrap(), int(1));
        assert_eq!(data(&mut s, "b"), b"1");
        assert_eq!(deadline_of(&mut s, "b"), Some(NOW + 500));
        assert_eq!(data(&mut s, "a"), b"1");
        assert_eq!(run(&mut s, "COPY a b").unwrap(), int(0));
        assert_eq!(run(&mut s, "COPY nokey b").unwrap(), int(0));
        assert_eq!(run(&mut s, "COPY a b DB 0").unwrap(), int(0));
        assert_eq!(
            run(&mut s, "COPY a b REPLACE replace DB 0").unwrap(),
            int(1)
        );
    }

    #[test]
    fn copy_of_a_hash_copies_its_fields_under_a_new_id() {
        let mut s = space();
        for i in 0..1_200 {
            run(&mut s, &format!("HSET h f{i} v{i}")).unwrap();
        }
        set(&mut s, "dst", b"x", None);
        assert_eq!(run(&mut s, "COPY h dst").unwrap(), int(0));
        assert_eq!(run(&mut s, "COPY h dst REPLACE").unwrap(), int(1));
        assert_ne!(coll_id(&mut s, "h"), coll_id(&mut s, "dst"));
        assert_eq!(fields(&mut s, "dst"), fields(&mut s, "h"));
        assert_eq!(s.elements.len(), 2_400);
        // The copy is independent of its source.
        run(&mut s, "HDEL h f0").unwrap();
        assert_eq!(run(&mut s, "HGET dst f0").unwrap(), bulk(b"v0"));
        assert_eq!(run(&mut s, "HLEN dst").unwrap(), int(1_200));
        // REPLACE over a collection reclaims it.
        run(&mut s, "COPY h dst REPLACE").unwrap();
        assert_eq!(s.elements.len(), 2 * 1_199);
        assert_eq!(
            get(&mut s, "dst").unwrap().header.kind,
            ValueKind::Hash,
            "the copy keeps the kind"
        );
    }

    #[test]
    fn copy_errors_follow_redis() {
        let mut s = with_string_and_hash();
        let same = "ERR source and destination objects are the same";
        assert_eq!(error(&mut s, "COPY s s"), same);
        assert_eq!(error(&mut s, "COPY nokey nokey"), same);
        assert_eq!(error(&mut s, "COPY s s foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "COPY nokey b foo"), "ERR syntax error");
        assert_eq!(error(&mut s, "COPY s b DB"), "ERR syntax error");
        assert_eq!(error(&mut s, "COPY s b DB 0 foo"), "ERR syntax error");
        assert_eq!(
            error(&mut s, "COPY s b DB x"),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            error(&mut s, "COPY s b DB 99999999999"),
            "ERR value is out of range, value must between -2147483648 and 2147483647"
        );
        for db in ["1", "-1", "16"] {
            assert_eq!(
                error(&mut s, &format!("COPY s b DB {db}")),
                "ERR DB index is out of range"
            );
        }
        assert_eq!(get(&mut s, "b"), None);
    }

    #[test]
    fn object_encoding_of_strings_follows_redis_7_0() {
        let mut s = space();
        for (value, want) in [
            (&b"123"[..], "int"),
            (b"-1", "int"),
            (b"9223372036854775807", "int"),
            (b"12345678901234567890", "embstr"),
            (b"01", "embstr"),
            (b"", "embstr"),
            (&[b'a'; 44], "embstr"),
            (&[b'a'; 45], "raw"),
        ] {
            set(&mut s, "s", value, None);
            assert_eq!(
                run(&mut s, "OBJECT ENCODING s").unwrap(),
                bulk(want.as_bytes()),
                "{value:?}"
            );
        }
        assert_eq!(run(&mut s, "object encoding nokey").unwrap(), Reply::Nil);
    }

    #[test]
    fn object_encoding_of_collections_follows_big() {
        let mut s = space();
        let put = |s: &mut MapSpace, key: &str, kind: ValueKind, big: bool| {
            let meta = CollMeta {
                id: 1,
                len: 1,
                head: 0,
                tail: 1,
                big,
                field_expiry: false,
            };
            s.put(
                key.as_bytes(),
                Value::of_kind(kind, meta.encode(), capdb_types::Timestamp(1), None),
            )
            .unwrap();
        };
        for (kind, small, large) in [
            (ValueKind::Hash, "listpack", "hashtable"),
            (ValueKind::Set, "intset", "hashtable"),
            (ValueKind::ZSet, "listpack", "skiplist"),
            (ValueKind::List, "quicklist", "quicklist"),
        ] {
            put(&mut s, "small", kind, false);
            put(&mut s, "large", kind, true);
            assert_eq!(encoding(&s.get(b"small").unwrap().unwrap()).unwrap(), small);
            assert_eq!(encoding(&s.get(b"large").unwrap().unwrap()).unwrap(), large);
        }
    }

    #[test]
    fn object_other_subcommands_and_errors() {
        let mut s = with_string_and_hash();
        assert_eq!(run(&mut s, "OBJECT REFCOUNT s").unwrap(), int(1));
        assert_eq!(run(&mut s, "OBJECT IDLETIME s").unwrap(), int(0));
        assert_eq!(run(&mut s, "OBJECT refcount nokey").unwrap(), Reply::Nil);
        assert_eq!(run(&mut s, "OBJECT FREQ nokey").unwrap(), Reply::Nil);
        assert!(
            error(&mut s, "OBJECT FREQ s")
                .starts_with("ERR An LFU maxmemory policy is not selected")
        );
        let Reply::Array(help) = run(&mut s, "OBJECT HELP").unwrap() else {
            panic!()
        };
        assert_eq!(help.len(), 15);
        assert_eq!(help[1], Reply::Status("ENCODING <key>".into()));
        assert_eq!(
            error(&mut s, "OBJECT foo"),
            "ERR unknown subcommand 'foo'. Try OBJECT HELP."
        );
        assert_eq!(
            error(&mut s, "OBJECT ENCODING"),
            "ERR wrong number of arguments for 'object|encoding' command"
        );
        assert_eq!(
            error(&mut s, "OBJECT encoding a b"),
            "ERR wrong number of arguments for 'object|encoding' command"
        );
        assert_eq!(
            error(&mut s, "OBJECT HELP extra"),
            "ERR wrong number of arguments for 'object|help' command"
        );
        assert_eq!(
            error(&mut s, "OBJECT"),
            "ERR wrong number of arguments for 'object' command"
        );
    }

    #[test]
    fn key_positions_match_redis() {
        let words = |s: &str| -> Vec<Bytes> {
            s.split(' ')
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect()
        };
        let keys = |cmd: &str| {
            let args = words(cmd);
            let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
            crate::lookup(&name).unwrap().key_indices(&args).unwrap()
        };
        assert_eq!(keys("RENAME a b"), vec![1, 2]);
        assert_eq!(keys("COPY a b DB 0 REPLACE"), vec![1, 2]);
        assert_eq!(keys("TOUCH a b c"), vec![1, 2, 3]);
        assert_eq!(keys("OBJECT ENCODING k"), vec![2]);
        assert_eq!(keys("OBJECT HELP"), Vec::<usize>::new());
    }
}
