//! Every state change a client can request, as data, and the one function that applies it.
//!
//! Engines (the durable redb engine, the in-memory cache, and later Raft state machines) look up
//! the current live value of the key, call [`Mutation::apply`], and store the returned
//! [`Effect`]. Redis semantics (NX/XX, GET, KEEPTTL, INCR's integer rules, EXPIRE in the past)
//! therefore exist exactly once, here, and are unit-tested without any I/O.
//!
//! A mutation carries absolute times only (expiry in Unix milliseconds), never "now": applying
//! the same mutation to the same state gives the same result, which a replicated log needs.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Timestamp, Value};

/// When a SET takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Always,
    /// `NX`: only when the key does not exist.
    IfAbsent,
    /// `XX`: only when the key exists.
    IfPresent,
    /// `IFEQ v` (Redis 8.4): only when the key exists and holds exactly `v`: a compare-and-set.
    IfEqual(Bytes),
    /// `IFNE v` (Redis 8.4): when the key is absent or holds anything but `v`.
    IfNotEqual(Bytes),
}

/// What a SET does to the key's time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpiryUpdate {
    /// No TTL option: the key lives forever (Redis clears any previous TTL).
    Clear,
    /// `KEEPTTL`.
    Keep,
    /// `EX`/`PX`/`EXAT`/`PXAT`, resolved to absolute Unix milliseconds.
    At(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    Set {
        key: Bytes,
        value: Bytes,
        condition: Condition,
        expiry: ExpiryUpdate,
        /// `GET`: reply with the previous value instead of OK.
        return_old: bool,
    },
    /// `DEL`/`UNLINK`/HTTP DELETE: replies 1 when a live key was removed, else 0.
    Delete { key: Bytes },
    /// `GETDEL`: replies with the removed value, or nil.
    GetDel { key: Bytes },
    /// `INCR`/`INCRBY`/`DECR`/`DECRBY`: replies with the new value. Keeps the TTL.
    IncrBy { key: Bytes, delta: i64 },
    /// `APPEND`: replies with the new length. Keeps the TTL.
    Append { key: Bytes, data: Bytes },
    /// `EXPIRE`/`PEXPIRE`/`EXPIREAT`/`PEXPIREAT` (`Some`) and `PERSIST` (`None`).
    /// Replies 1 when the TTL changed, 0 otherwise. A deadline not after `now` deletes the key.
    Expire { key: Bytes, at_ms: Option<u64> },
    /// `EXPIRE ... NX|XX|GT|LT` (and the other three): sets the deadline only when `when`
    /// holds for the key's current one; replies 1 when it did, 0 otherwise (also for a missing
    /// key). A new variant rather than a field of `Expire`, so logs written before it still
    /// decode.
    ExpireIf {
        key: Bytes,
        at_ms: u64,
        when: ExpireWhen,
    },
    /// A data-type command (hashes, lists, sets, sorted sets, and the string and key commands
    /// added with them) as its whole argument list, name first, parsed and run by `capdb-data`
    /// inside the engine. The log carries the command, as Redis replicates commands, so adding a
    /// command never changes the shape of anything stored. `key` is the command's first key,
    /// which routes it; a command never spans shards (the server refuses that with CROSSSLOT).
    /// Any relative time in the arguments was resolved to an absolute one before queueing.
    Exec { key: Bytes, args: Vec<Bytes> },
}

/// When a conditional EXPIRE applies, judged against the key's current deadline. As in Redis,
/// a key without a deadline counts as expiring never (infinitely late).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireWhen {
    /// `NX`: only when the key has no deadline.
    pub nx: bool,
    /// `XX`: only when it has one.
    pub xx: bool,
    /// `GT`: only when the new deadline is later than the current one.
    pub gt: bool,
    /// `LT`: only when the new deadline is earlier than the current one.
    pub lt: bool,
}

impl ExpireWhen {
    /// Whether a new deadline `at_ms` may replace `current` (`None`: the key has none).
    pub fn allows(self, current: Option<u64>, at_ms: u64) -> bool {
        !(self.nx && current.is_some()
            || self.xx && current.is_none()
            || self.gt && current.is_none_or(|c| at_ms <= c)
            || self.lt && current.is_some_and(|c| at_ms >= c))
    }
}

/// The answer to one mutation, independent of any wire protocol. Variants are only ever
/// appended: replies are remembered on disk (exactly-once sessions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Nil,
    Integer(i64),
    Bulk(Bytes),
    /// An array (RESP `*`).
    Array(Vec<Reply>),
    /// The null array (RESP2 `*-1`, RESP3 `_`), e.g. BLPOP timing out, LMPOP on empty lists.
    NilArray,
    /// A map (RESP3 `%`, a flat array in RESP2), e.g. HGETALL.
    Map(Vec<(Reply, Reply)>),
    /// A set (RESP3 `~`, an array in RESP2), e.g. SMEMBERS.
    Set(Vec<Reply>),
    /// A double already formatted as Redis formats it (RESP3 `,`, a bulk string in RESP2).
    Double(String),
    /// A status line (RESP `+`), e.g. TYPE's answer.
    Status(String),
    /// Pairs that RESP3 nests (`[[a, 1], [b, 2]]`) and RESP2 flattens (`[a, 1, b, 2]`), as
    /// Redis replies to ZRANGE WITHSCORES and HRANDFIELD WITHVALUES.
    Pairs(Vec<(Reply, Reply)>),
}

/// What the engine must store after applying a mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing changes.
    Unchanged,
    /// The key now holds this value.
    Put(Value),
    /// The key is deleted (an `ap` engine writes a tombstone with the given timestamp).
    Remove(Timestamp),
}

impl Mutation {
    pub fn key(&self) -> &Bytes {
        match self {
            Mutation::Set { key, .. }
            | Mutation::Delete { key }
            | Mutation::GetDel { key }
            | Mutation::IncrBy { key, .. }
            | Mutation::Append { key, .. }
            | Mutation::Expire { key, .. }
            | Mutation::ExpireIf { key, .. }
            | Mutation::Exec { key, .. } => key,
        }
    }

    /// Short name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Mutation::Set { .. } => "set",
            Mutation::Delete { .. } => "delete",
            Mutation::GetDel { .. } => "getdel",
            Mutation::IncrBy { .. } => "incrby",
            Mutation::Append { .. } => "append",
            Mutation::Expire { .. } | Mutation::ExpireIf { .. } => "expire",
            Mutation::Exec { .. } => "exec",
        }
    }

    /// Applies the mutation to `current`, the key's value if it is live at `now_ms` (engines
    /// pass `None` for absent, expired and tombstoned keys). `timestamp` stamps any new value.
    /// `value_bytes_max` bounds values that grow (APPEND).
    pub fn apply(
        &self,
        current: Option<&Value>,
        now_ms: u64,
        timestamp: Timestamp,
        value_bytes_max: usize,
    ) -> Result<(Effect, Reply)> {
        debug_assert!(
            current.is_none_or(|v| v.is_live(now_ms)),
            "engines pass live values only"
        );
        let string_only = match self {
            Mutation::Set {
                return_old,
                condition,
                ..
            } => {
                *return_old || matches!(condition, Condition::IfEqual(_) | Condition::IfNotEqual(_))
            }
            Mutation::GetDel { .. } | Mutation::IncrBy { .. } | Mutation::Append { .. } => true,
            Mutation::Delete { .. }
            | Mutation::Expire { .. }
            | Mutation::ExpireIf { .. }
            | Mutation::Exec { .. } => false,
        };
        if string_only && current.is_some_and(|v| !v.is_string()) {
            return Err(Error::WrongType);
        }
        Ok(match self {
            Mutation::Exec { .. } => {
                return Err(Error::Io(
                    "a data-type command reached the string evaluator (an engine bug)".into(),
                ));
            }
            Mutation::Set {
                value,
                condition,
                expiry,
                return_old,
                ..
            } => apply_set(
                current,
                now_ms,
                timestamp,
                value,
                condition,
                *expiry,
                *return_old,
            ),
            Mutation::Delete { .. } => match current {
                Some(_) => (Effect::Remove(timestamp), Reply::Integer(1)),
                None => (Effect::Unchanged, Reply::Integer(0)),
            },
            Mutation::GetDel { .. } => match current {
                Some(_) => (Effect::Remove(timestamp), old_bulk(current)),
                None => (Effect::Unchanged, Reply::Nil),
            },
            Mutation::IncrBy { delta, .. } => {
                let old = match current {
                    Some(v) => parse_i64_strict(&v.data).ok_or(Error::NotAnInteger)?,
                    None => 0,
                };
                let new = old.checked_add(*delta).ok_or(Error::Overflow)?;
                let expire = current.and_then(|v| v.header.expire_at_ms);
                let data = Bytes::from(new.to_string());
                (
                    Effect::Put(Value::new(data, timestamp, expire)),
                    Reply::Integer(new),
                )
            }
            Mutation::Append { data, .. } => {
                let old = current.map_or(&[][..], |v| &v.data[..]);
                let len = old.len() + data.len();
                if len > value_bytes_max {
                    return Err(Error::TooLarge {
                        what: "value after APPEND".into(),
                        size: len,
                        limit: value_bytes_max,
                    });
                }
                let mut joined = BytesMut::with_capacity(len);
                joined.extend_from_slice(old);
                joined.extend_from_slice(data);
                let expire = current.and_then(|v| v.header.expire_at_ms);
                (
                    Effect::Put(Value::new(joined.freeze(), timestamp, expire)),
                    Reply::Integer(len as i64),
                )
            }
            Mutation::ExpireIf { key, at_ms, when } => {
                let deadline = current.and_then(|v| v.header.expire_at_ms);
                if current.is_none() || !when.allows(deadline, *at_ms) {
                    return Ok((Effect::Unchanged, Reply::Integer(0)));
                }
                let expire = Mutation::Expire {
                    key: key.clone(),
                    at_ms: Some(*at_ms),
                };
                return expire.apply(current, now_ms, timestamp, value_bytes_max);
            }
            Mutation::Expire { at_ms, .. } => match (current, at_ms) {
                (None, _) => (Effect::Unchanged, Reply::Integer(0)),
                (Some(_), Some(at)) if *at <= now_ms => {
                    (Effect::Remove(timestamp), Reply::Integer(1))
                }
                (Some(v), Some(at)) => (
                    Effect::Put(Value::of_kind(
                        v.header.kind,
                        v.data.clone(),
                        timestamp,
                        Some(*at),
                    )),
                    Reply::Integer(1),
                ),
                (Some(v), None) if v.header.expire_at_ms.is_some() => (
                    Effect::Put(Value::of_kind(
                        v.header.kind,
                        v.data.clone(),
                        timestamp,
                        None,
                    )),
                    Reply::Integer(1),
                ),
                (Some(_), None) => (Effect::Unchanged, Reply::Integer(0)),
            },
        })
    }
}

/// The previous value as a bulk reply (`Nil` when absent), for `GET` and `GETDEL`.
fn old_bulk(current: Option<&Value>) -> Reply {
    current.map_or(Reply::Nil, |v| Reply::Bulk(v.data.clone()))
}

/// Applies a SET of `value` to `current` (see [`Mutation::apply`]).
fn apply_set(
    current: Option<&Value>,
    now_ms: u64,
    timestamp: Timestamp,
    value: &Bytes,
    condition: &Condition,
    expiry: ExpiryUpdate,
    return_old: bool,
) -> (Effect, Reply) {
    let allowed = match condition {
        Condition::Always => true,
        Condition::IfAbsent => current.is_none(),
        Condition::IfPresent => current.is_some(),
        Condition::IfEqual(expected) => current.is_some_and(|v| v.data == *expected),
        Condition::IfNotEqual(unwanted) => current.is_none_or(|v| v.data != *unwanted),
    };
    let reply = match (return_old, allowed) {
        (true, _) => old_bulk(current),
        (false, true) => Reply::Ok,
        (false, false) => Reply::Nil,
    };
    if !allowed {
        return (Effect::Unchanged, reply);
    }
    let expire_at_ms = match expiry {
        ExpiryUpdate::Clear => None,
        ExpiryUpdate::Keep => current.and_then(|v| v.header.expire_at_ms),
        ExpiryUpdate::At(at) => Some(at),
    };
    let effect = match expire_at_ms {
        Some(at) if at <= now_ms => Effect::Remove(timestamp),
        _ => Effect::Put(Value::new(value.clone(), timestamp, expire_at_ms)),
    };
    (effect, reply)
}

/// Parses a base-10 `i64` the way Redis does: optional `-`, no `+`, no leading zeros, no spaces.
pub fn parse_i64_strict(raw: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(raw).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || (s.starts_with('-') && digits == "0")
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn val(s: &str, exp: Option<u64>) -> Value {
        Value::new(Bytes::from(s.to_string()), Timestamp(1), exp)
    }

    fn set(cond: Condition, expiry: ExpiryUpdate, get: bool) -> Mutation {
        Mutation::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"new"),
            condition: cond,
            expiry,
            return_old: get,
        }
    }

    #[test]
    fn set_nx_xx_and_get() {
        let ts = Timestamp(9);
        let old = val("old", None);
        let (e, r) = set(Condition::IfAbsent, ExpiryUpdate::Clear, false)
            .apply(Some(&old), 0, ts, MAX)
            .unwrap();
        assert_eq!((e, r), (Effect::Unchanged, Reply::Nil));
        let (e, r) = set(Condition::IfPresent, ExpiryUpdate::Clear, true)
            .apply(Some(&old), 0, ts, MAX)
            .unwrap();
        assert!(matches!(e, Effect::Put(_)));
        assert_eq!(r, Reply::Bulk(Bytes::from_static(b"old")));
        let (e, r) = set(Condition::IfPresent, ExpiryUpdate::Clear, false)
            .apply(None, 0, ts, MAX)
            .unwrap();
        assert_eq!((e, r), (Effect::Unchanged, Reply::Nil));
    }

    #[test]
    fn set_ifeq_is_compare_and_set_and_ifne_its_opposite() {
        let ts = Timestamp(9);
        let old = val("old", None);
        let eq = |v: &'static str| Condition::IfEqual(Bytes::from_static(v.as_bytes()));
        let ne = |v: &'static str| Condition::IfNotEqual(Bytes::from_static(v.as_bytes()));
        let run = |c: Condition, cur: Option<&Value>| {
            set(c, ExpiryUpdate::Clear, false)
                .apply(cur, 0, ts, MAX)
                .unwrap()
                .1
        };
        assert_eq!(run(eq("old"), Some(&old)), Reply::Ok);
        assert_eq!(run(eq("other"), Some(&old)), Reply::Nil);
        assert_eq!(run(eq("old"), None), Reply::Nil, "IFEQ never creates a key");
        assert_eq!(run(ne("old"), Some(&old)), Reply::Nil);
        assert_eq!(run(ne("other"), Some(&old)), Reply::Ok);
        assert_eq!(
            run(ne("old"), None),
            Reply::Ok,
            "IFNE creates an absent key"
        );
    }

    #[test]
    fn set_keepttl_keeps_and_plain_set_clears() {
        let old = val("old", Some(500));
        let (e, _) = set(Condition::Always, ExpiryUpdate::Keep, false)
            .apply(Some(&old), 0, Timestamp(2), MAX)
            .unwrap();
        let Effect::Put(v) = e else { panic!() };
        assert_eq!(v.header.expire_at_ms, Some(500));
        let (e, _) = set(Condition::Always, ExpiryUpdate::Clear, false)
            .apply(Some(&old), 0, Timestamp(2), MAX)
            .unwrap();
        let Effect::Put(v) = e else { panic!() };
        assert_eq!(v.header.expire_at_ms, None);
    }

    #[test]
    fn incr_rules() {
        let k = Bytes::from_static(b"k");
        let m = Mutation::IncrBy {
            key: k.clone(),
            delta: 5,
        };
        assert_eq!(
            m.apply(None, 0, Timestamp(1), MAX).unwrap().1,
            Reply::Integer(5)
        );
        let (e, r) = m
            .apply(Some(&val("-7", Some(99))), 0, Timestamp(1), MAX)
            .unwrap();
        assert_eq!(r, Reply::Integer(-2));
        let Effect::Put(v) = e else { panic!() };
        assert_eq!(v.header.expire_at_ms, Some(99), "INCR keeps the TTL");
        for bad in ["abc", "01", "+1", " 1", "", "-0", "1.5"] {
            assert_eq!(
                m.apply(Some(&val(bad, None)), 0, Timestamp(1), MAX),
                Err(Error::NotAnInteger),
                "{bad:?}"
            );
        }
        let big = Mutation::IncrBy { key: k, delta: 1 };
        assert_eq!(
            big.apply(
                Some(&val(&i64::MAX.to_string(), None)),
                0,
                Timestamp(1),
                MAX
            ),
            Err(Error::Overflow)
        );
    }

    #[test]
    fn append_is_bounded() {
        let m = Mutation::Append {
            key: Bytes::from_static(b"k"),
            data: Bytes::from(vec![b'x'; 600]),
        };
        let old = Value::new(Bytes::from(vec![b'y'; 600]), Timestamp(1), None);
        assert!(matches!(
            m.apply(Some(&old), 0, Timestamp(2), MAX),
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(
            m.apply(None, 0, Timestamp(2), MAX).unwrap().1,
            Reply::Integer(600)
        );
    }

    #[test]
    fn expire_in_the_past_deletes_and_persist_clears() {
        let k = Bytes::from_static(b"k");
        let past = Mutation::Expire {
            key: k.clone(),
            at_ms: Some(10),
        };
        let (e, r) = past
            .apply(Some(&val("v", None)), 10, Timestamp(3), MAX)
            .unwrap();
        assert_eq!((e, r), (Effect::Remove(Timestamp(3)), Reply::Integer(1)));
        let persist = Mutation::Expire {
            key: k.clone(),
            at_ms: None,
        };
        assert_eq!(
            persist
                .apply(Some(&val("v", None)), 0, Timestamp(3), MAX)
                .unwrap()
                .1,
            Reply::Integer(0)
        );
        assert_eq!(
            persist
                .apply(Some(&val("v", Some(50))), 0, Timestamp(3), MAX)
                .unwrap()
                .1,
            Reply::Integer(1)
        );
        assert_eq!(
            past.apply(None, 0, Timestamp(3), MAX).unwrap(),
            (Effect::Unchanged, Reply::Integer(0))
        );
    }
}
