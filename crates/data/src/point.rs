//! Which elements a *point* command reads: the subkeys a hash, set or sorted-set command
//! addresses by name (HSET's fields, SADD's members, ZADD's members), so that an engine that
//! must fetch elements before running a command (`ap`'s coordinator reads them from replicas)
//! can fetch those and not the whole collection.
//!
//! The answer is a prediction, not a contract: an engine that runs the command over the
//! predicted elements must still notice any element read outside them (and any range read)
//! and then fetch the whole collection (`capdb-ap`'s `View` does). A wrong prediction costs a
//! second read, never a wrong answer.
//!
//! ### The rule for commands listed here
//!
//! Their replies and their writes depend only on the elements they name, the collection's
//! registers (kind, TTL, encoding flag) and whether it is empty, never on its element count:
//! a partial view knows those but not the count. (HLEN, SCARD, ZCARD, SPOP, ranges and the
//! like are not listed.)

use bytes::Bytes;
use capdb_types::ValueKind;

use crate::meta::hashed_sub;

/// The subkeys `args` addresses (one key, the command's first argument), and the kind of
/// collection they belong to; `None` for any command that is not a point command (or whose
/// arguments do not parse: running it answers the error).
pub fn elements(args: &[Bytes]) -> Option<(ValueKind, Vec<Vec<u8>>)> {
    let name = args.first()?;
    if name.len() > 16 || args.len() < 3 {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let (kind, tag, names): (ValueKind, u8, Vec<&Bytes>) = match &lower[..] {
        b"hset" | b"hmset" => (ValueKind::Hash, 0, pairs(&args[2..])?),
        b"hsetnx" | b"hget" | b"hexists" | b"hstrlen" | b"hincrby" | b"hincrbyfloat" => {
            (ValueKind::Hash, 0, vec![&args[2]])
        }
        b"hmget" | b"hdel" => (ValueKind::Hash, 0, args[2..].iter().collect()),
        b"sadd" | b"srem" | b"smismember" => (ValueKind::Set, 0, args[2..].iter().collect()),
        b"sismember" => (ValueKind::Set, 0, vec![&args[2]]),
        b"zscore" => (ValueKind::ZSet, 0, vec![&args[2]]),
        b"zmscore" | b"zrem" => (ValueKind::ZSet, 0, args[2..].iter().collect()),
        b"zincrby" => (ValueKind::ZSet, 0, vec![args.get(3)?]),
        b"zadd" => (ValueKind::ZSet, 0, zadd_members(args)?),
        _ => return None,
    };
    // Every family keeps its named elements under tag 0 (hash FIELD, set MEMBER, sorted-set
    // SCORE): asserted by the tests below against the families' own writes.
    Some((
        kind,
        names.into_iter().map(|n| hashed_sub(tag, n)).collect(),
    ))
}

/// The names of `name value` pairs.
fn pairs(args: &[Bytes]) -> Option<Vec<&Bytes>> {
    if args.is_empty() || !args.len().is_multiple_of(2) {
        return None;
    }
    Some(args.iter().step_by(2).collect())
}

/// ZADD's members: after its flags, `score member` pairs.
fn zadd_members(args: &[Bytes]) -> Option<Vec<&Bytes>> {
    let mut at = 2;
    while at < args.len()
        && [&b"nx"[..], b"xx", b"ch", b"incr", b"gt", b"lt"]
            .iter()
            .any(|f| args[at].eq_ignore_ascii_case(f))
    {
        at += 1;
    }
    let rest = &args[at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return None;
    }
    Some(rest.iter().skip(1).step_by(2).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::testing::{MapSpace, words};
    use crate::{Coll, ElRange, Space};

    fn args(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    /// Records every element subkey a command reads or writes by name.
    struct Recording<'a> {
        inner: &'a mut MapSpace,
        named: BTreeSet<Vec<u8>>,
        ranged: bool,
    }

    impl Space for Recording<'_> {
        fn get(&mut self, key: &[u8]) -> capdb_types::Result<Option<capdb_types::Value>> {
            self.inner.get(key)
        }
        fn put(&mut self, key: &[u8], value: capdb_types::Value) -> capdb_types::Result<()> {
            self.inner.put(key, value)
        }
        fn remove(&mut self, key: &[u8]) -> capdb_types::Result<()> {
            self.inner.remove(key)
        }
        fn rename(&mut self, from: &[u8], to: &[u8]) -> capdb_types::Result<()> {
            self.inner.rename(from, to)
        }
        fn new_id(&mut self) -> capdb_types::Result<u64> {
            self.inner.new_id()
        }
        fn el_get(&mut self, c: &Coll, sub: &[u8]) -> capdb_types::Result<Option<Bytes>> {
            self.named.insert(sub.to_vec());
            self.inner.el_get(c, sub)
        }
        fn el_put(&mut self, c: &Coll, sub: &[u8], value: &[u8]) -> capdb_types::Result<()> {
            if !c.is_order_only(sub) {
                self.named.insert(sub.to_vec());
            }
            self.inner.el_put(c, sub, value)
        }
        fn el_remove(&mut self, c: &Coll, sub: &[u8]) -> capdb_types::Result<()> {
            if !c.is_order_only(sub) {
                self.named.insert(sub.to_vec());
            }
            self.inner.el_remove(c, sub)
        }
        fn el_range(
            &mut self,
            c: &Coll,
            range: ElRange<'_>,
        ) -> capdb_types::Result<Vec<(Bytes, Bytes)>> {
            self.ranged = true;
            self.inner.el_range(c, range)
        }
    }

    #[test]
    fn a_point_command_touches_exactly_the_elements_predicted() {
        let setup = ["HSET h a 1 b 2 c 3", "SADD s a b c", "ZADD z 1 a 2 b 3 c"];
        let cases = [
            "HSET h a 9 d 4",
            "HMSET h a 9",
            "HSETNX h e 5",
            "HGET h a",
            "HMGET h a x",
            "HEXISTS h b",
            "HSTRLEN h c",
            "HINCRBY h n 2",
            "HINCRBYFLOAT h f 1.5",
            "HDEL h a x",
            "SADD s d a",
            "SREM s a x",
            "SISMEMBER s b",
            "SMISMEMBER s b x",
            "ZADD z 5 a 6 d",
            "ZADD z xx ch gt 9 b",
            "ZADD z incr 2 c",
            "ZINCRBY z 2 e",
            "ZSCORE z a",
            "ZMSCORE z a x",
            "ZREM z b x",
        ];
        for case in cases {
            let mut space = words::space();
            let cx = words::cx();
            for line in setup {
                crate::execute(&args(line), &mut space, &cx).expect("setup runs");
            }
            let a = args(case);
            let (_, predicted) = elements(&a).expect("a point command");
            let mut rec = Recording {
                inner: &mut space,
                named: BTreeSet::new(),
                ranged: false,
            };
            crate::execute(&a, &mut rec, &cx).expect("the command runs");
            assert!(!rec.ranged, "{case} read a range");
            let predicted: BTreeSet<Vec<u8>> = predicted.into_iter().collect();
            assert_eq!(rec.named, predicted, "{case}");
        }
    }

    #[test]
    fn other_commands_and_unparsable_arguments_are_not_point_commands() {
        for line in [
            "HLEN h",
            "HGETALL h",
            "SCARD s",
            "SPOP s",
            "ZRANGE z 0 -1",
            "HSET h a",
            "ZADD z nx 1",
            "ZADD z",
            "GET k",
        ] {
            assert!(elements(&args(line)).is_none(), "{line}");
        }
    }
}
