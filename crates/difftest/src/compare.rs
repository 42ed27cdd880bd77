//! How replies are compared: exact bytes by default, and a short table of reviewed exceptions,
//! each with its reason ([`CLASSES`]). A difference not covered by a row here is a bug in
//! capdb (or in this harness), never something to wave through.

use crate::resp::{Frame, escape};

/// A comparison rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The bytes must be equal (errors included).
    Exact,
    /// Equal once the elements (a map's pairs) are sorted.
    Unordered,
    /// Equal once the elements are grouped in (field, value) pairs and sorted: HGETALL, whose
    /// RESP2 reply is a flat array.
    UnorderedPairs,
    /// A whole SCAN-family walk: the union of every page, deduplicated and sorted.
    Walk,
    /// Random choices: checked by properties (type, count, distinctness, the whole collection
    /// when it all fits); a write (SPOP) is then copied from capdb into Redis.
    Random,
    /// Integers within a tolerance (milliseconds or seconds of clock skew between the two
    /// servers' readings); `-1`/`-2` exact.
    Approx(i64),
    /// INCRBYFLOAT/HINCRBYFLOAT: equal bytes, or the same number to 12 significant digits, and
    /// then capdb's value is written into Redis.
    LongDouble,
    /// OBJECT: equal bytes, or two string encodings (`int`, `embstr`, `raw`), or two
    /// reference counts of 1 and 2147483647 (Redis's shared integers).
    ObjectString,
}

/// One reviewed exception: the class, the commands it covers, and why.
pub struct ClassRow {
    pub class: Class,
    pub commands: &'static [&'static str],
    pub reason: &'static str,
}

/// Every exception to exact comparison. Keep it short; each row needs its reason.
pub const CLASSES: &[ClassRow] = &[
    ClassRow {
        class: Class::Unordered,
        commands: &[
            "hkeys", "hvals", "smembers", "sinter", "sunion", "sdiff", "keys",
        ],
        reason: "Redis leaves the order undefined (its small encodings keep insertion order, \
                 its hashtables bucket order); capdb keeps members in hash order",
    },
    ClassRow {
        class: Class::UnorderedPairs,
        commands: &["hgetall"],
        reason: "as above, for field/value pairs",
    },
    ClassRow {
        class: Class::Walk,
        commands: &["scan", "hscan", "sscan", "zscan"],
        reason: "cursors are each server's own positions and pages split differently; what a \
                 whole walk returns must be the same set",
    },
    ClassRow {
        class: Class::Random,
        commands: &[
            "spop",
            "srandmember",
            "hrandfield",
            "randomkey",
            "zrandmember",
        ],
        reason: "the servers choose at random; the reply's shape, size and distinctness must \
                 agree, and SPOP's key is then resynchronised from capdb into Redis",
    },
    ClassRow {
        class: Class::Approx(1),
        commands: &["ttl", "expiretime"],
        reason: "each server reads its own clock when it sets and reads a relative deadline: \
                 within 1 s",
    },
    ClassRow {
        class: Class::Approx(1500),
        commands: &["pttl", "pexpiretime"],
        reason: "as TTL, in milliseconds (1.5 s: a cp write waits for its group commit)",
    },
    ClassRow {
        class: Class::LongDouble,
        commands: &["incrbyfloat", "hincrbyfloat"],
        reason: "Redis adds in 80-bit long double, capdb in f64 (crates/data/src/format.rs); \
                 sums of halves and quarters agree, big integers may differ in the last digits",
    },
    ClassRow {
        class: Class::ObjectString,
        commands: &["object"],
        reason: "a Redis string's encoding (and whether it is a shared integer, REFCOUNT \
                 2147483647) depends on the command that wrote it (APPEND, SETRANGE, SETBIT, \
                 BITOP and INCRBYFLOAT write `raw`/`embstr` text where SET writes `int`); capdb \
                 decides from the bytes alone and keeps no reference counts \
                 (crates/data/src/keys.rs). Collection encodings compare exactly",
    },
];

/// The class of a command (lowercase name).
pub fn class_of(name: &str) -> Class {
    CLASSES
        .iter()
        .find(|r| r.commands.contains(&name))
        .map_or(Class::Exact, |r| r.class)
}

/// Compares a reply pair under `class`: `Err(why)` on a difference.
pub fn compare(class: Class, args: &[Vec<u8>], redis: &Frame, capdb: &Frame) -> Result<(), String> {
    if redis.raw == capdb.raw {
        return Ok(());
    }
    if redis.is_error() || capdb.is_error() {
        return Err("the bytes differ (an error reply is always compared exactly)".into());
    }
    match class {
        Class::Exact | Class::Walk => Err("the bytes differ".into()),
        Class::Unordered => same_sorted(redis, capdb, 1),
        Class::UnorderedPairs => same_sorted(redis, capdb, 2),
        Class::Random => random(args, redis, capdb),
        Class::Approx(tol) => match (redis.int(), capdb.int()) {
            (Some(a), Some(b)) if a >= 0 && b >= 0 && (a - b).abs() <= tol => Ok(()),
            _ => Err(format!("not the same integer within {tol}")),
        },
        Class::ObjectString => {
            let is = |f: &Frame, set: &[&[u8]]| f.kind == b'$' && set.contains(&&f.text[..]);
            let strings: &[&[u8]] = &[b"int", b"embstr", b"raw"];
            let counts: &[&[u8]] = &[b"1", b"2147483647"];
            let both = |set: &[&[u8]], kind: u8| {
                let k = |f: &Frame| f.kind == kind && set.contains(&&f.text[..]);
                k(redis) && k(capdb)
            };
            if (is(redis, strings) && is(capdb, strings)) || both(counts, b':') {
                Ok(())
            } else {
                Err("the bytes differ (beyond a string's encoding or refcount)".into())
            }
        }
        Class::LongDouble => {
            let num = |f: &Frame| -> Option<f64> {
                (f.kind == b'$' && !f.null)
                    .then(|| std::str::from_utf8(&f.text).ok()?.parse().ok())
                    .flatten()
            };
            match (num(redis), num(capdb)) {
                (Some(a), Some(b)) if (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0) => {
                    Ok(())
                }
                _ => Err("not the same number to 12 significant digits".into()),
            }
        }
    }
}

/// The elements of an aggregate in groups of `n`, sorted by their bytes.
fn sorted_groups(f: &Frame, n: usize) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = f
        .children
        .chunks(n)
        .map(|c| c.iter().flat_map(|x| x.raw.clone()).collect())
        .collect();
    v.sort();
    v
}

fn same_sorted(redis: &Frame, capdb: &Frame, n: usize) -> Result<(), String> {
    if redis.kind != capdb.kind || redis.null != capdb.null || !redis.is_aggregate() {
        return Err("not the same reply type".into());
    }
    if sorted_groups(redis, n) == sorted_groups(capdb, n) {
        Ok(())
    } else {
        Err("not the same elements (compared unordered)".into())
    }
}

/// The properties of a random reply both servers must share.
fn random(args: &[Vec<u8>], redis: &Frame, capdb: &Frame) -> Result<(), String> {
    if redis.kind != capdb.kind || redis.null != capdb.null {
        return Err("not the same reply type".into());
    }
    if !redis.is_aggregate() {
        // One member, or nil: both are one of the same kind.
        return Ok(());
    }
    if redis.children.len() != capdb.children.len() {
        return Err("not the same number of elements".into());
    }
    let count: Option<i64> = args
        .get(2)
        .and_then(|c| std::str::from_utf8(c).ok()?.parse().ok());
    let with_values = args.len() > 3;
    // HRANDFIELD WITHVALUES: RESP2 flat pairs, RESP3 an array of pairs.
    let group = if with_values && redis.children.first().is_some_and(|c| !c.is_aggregate()) {
        2
    } else {
        1
    };
    let firsts = |f: &Frame| -> Vec<Vec<u8>> {
        f.children
            .chunks(group)
            .map(|c| match c[0].children.first() {
                Some(inner) => inner.raw.clone(),
                None => c[0].raw.clone(),
            })
            .collect()
    };
    if let Some(n) = count
        && n > 0
    {
        for (who, f) in [("Redis", redis), ("capdb", capdb)] {
            let mut m = firsts(f);
            let len = m.len();
            m.sort();
            m.dedup();
            if m.len() != len {
                return Err(format!(
                    "{who} repeated a member though the count is positive"
                ));
            }
        }
        // Fewer than asked: the whole collection, the same on both.
        if (firsts(redis).len() as i64) < n
            && sorted_groups(redis, group) != sorted_groups(capdb, group)
        {
            return Err("the whole collection (count above its size) differs".into());
        }
    }
    Ok(())
}

/// A walk's items (keys, or field/value pairs), deduplicated and sorted.
pub fn walk_items(pages: &[Frame], pairs: bool) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = Vec::new();
    for p in pages {
        if let Some(items) = p.children.get(1) {
            all.extend(sorted_groups(items, if pairs { 2 } else { 1 }));
        }
    }
    all.sort();
    all.dedup();
    all
}

/// A walk's items as one readable line.
pub fn show_items(items: &[Vec<u8>]) -> String {
    items
        .iter()
        .map(|i| escape(i))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::parse;

    fn f(b: &[u8]) -> Frame {
        parse(b).unwrap().0
    }

    #[test]
    fn unordered_replies_compare_as_sets_and_errors_exactly() {
        let a = f(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n");
        let b = f(b"*2\r\n$1\r\nb\r\n$1\r\na\r\n");
        assert!(compare(Class::Unordered, &[], &a, &b).is_ok());
        assert!(compare(Class::Exact, &[], &a, &b).is_err());
        let e1 = f(b"-ERR x\r\n");
        let e2 = f(b"-ERR y\r\n");
        assert!(compare(Class::Unordered, &[], &e1, &e2).is_err());
        let ttl1 = f(b":100\r\n");
        let ttl2 = f(b":99\r\n");
        assert!(compare(Class::Approx(1), &[], &ttl1, &ttl2).is_ok());
        assert!(compare(Class::Approx(1), &[], &f(b":-1\r\n"), &f(b":0\r\n")).is_err());
    }

    #[test]
    fn random_replies_must_agree_on_shape_and_distinctness() {
        let args = [b"srandmember".to_vec(), b"k".to_vec(), b"2".to_vec()];
        let a = f(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n");
        let b = f(b"*2\r\n$1\r\nc\r\n$1\r\nb\r\n");
        let dup = f(b"*2\r\n$1\r\nb\r\n$1\r\nb\r\n");
        assert!(compare(Class::Random, &args, &a, &b).is_ok());
        assert!(compare(Class::Random, &args, &a, &dup).is_err());
        let one = f(b"*1\r\n$1\r\na\r\n");
        assert!(compare(Class::Random, &args, &one, &f(b"*1\r\n$1\r\nz\r\n")).is_err());
    }
}
