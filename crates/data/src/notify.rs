//! Keyspace notifications: which events (Redis's `notify-keyspace-events`) a write emits.
//!
//! # Where events are decided
//!
//! Redis calls `notifyKeyspaceEvent` inside each command, where it sees the data. capdb runs a
//! command where the data is (a `cp` shard's state machine on every replica, an `ap`
//! coordinator's view, the cache under its shard locks), but emits its events once, from the
//! node that received the command. So the node that wants events wraps the command:
//! [`wrap`] turns `hdel h f` into `capdb.notify hdel h f`, an internal command (clients cannot
//! send it) that travels and applies exactly as the command would, and whose reply carries the
//! events next to the command's own reply ([`unwrap`] separates them). Inside it, [`run`] reads
//! the command's keys before and after running it, and [`exec_events`] decides the events from
//! the arguments, the reply and those two pictures: whether a pop emptied (and so deleted) a
//! list, whether SETBIT changed a bit, whether a STORE command's empty result deleted a key that
//! existed. The decision is a pure function, the same on every replica; only the receiving node
//! publishes.
//!
//! Commands capdb's front end evaluates itself as [`Mutation`]s (SET, DEL, EXPIRE, INCR, ...)
//! need no wrapper: their reply says everything ([`mutation_events`]).
//!
//! Each rule was checked against redis-server 7.0.15 (`crates/cli/tests/notify.rs` compares
//! the message streams); the hash field expiry commands (Redis 7.4) follow redis.io's
//! description of their events.
//!
//! # Not emitted
//!
//! - `new` (class `n`, a key created) and key-miss events (class `m`, a read of a missing key):
//!   the flags are accepted, no event is emitted.
//! - `expired` when a key is read after its deadline: capdb hides it at once, and the event
//!   comes when the key is actually removed (the `cp` sweep, the cache's expiry).

use bytes::Bytes;
use capdb_types::{Mutation, Reply, Result, Value};

use crate::command::{Ctx, command_keys, execute};
use crate::space::Space;

/// The internal command a notified write travels as (see the module doc).
pub const NOTIFY_COMMAND: &str = "capdb.notify";

/// An event class: Redis's `NOTIFY_*` bit of `notify-keyspace-events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Class {
    /// `g`: DEL, EXPIRE, RENAME, ...
    Generic = 1 << 2,
    /// `$`
    String = 1 << 3,
    /// `l`
    List = 1 << 4,
    /// `s`
    Set = 1 << 5,
    /// `h`
    Hash = 1 << 6,
    /// `z`
    Zset = 1 << 7,
    /// `x`: a key removed at its deadline.
    Expired = 1 << 8,
    /// `e`: a key removed to free memory.
    Evicted = 1 << 9,
}

impl Class {
    pub fn bit(self) -> u32 {
        self as u32
    }

    fn of_code(code: i64) -> Option<Class> {
        [
            Class::Generic,
            Class::String,
            Class::List,
            Class::Set,
            Class::Hash,
            Class::Zset,
            Class::Expired,
            Class::Evicted,
        ]
        .into_iter()
        .find(|c| c.bit() as i64 == code)
    }
}

/// One keyspace event: published as `event` on `__keyspace@<db>__:<key>` and as `key` on
/// `__keyevent@<db>__:<event>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub class: Class,
    pub name: &'static str,
    pub key: Bytes,
}

impl Event {
    pub fn new(class: Class, name: &'static str, key: &Bytes) -> Event {
        Event {
            class,
            name,
            key: key.clone(),
        }
    }
}

/// `args` (a data-type write, name first) as the notified command [`run`] answers.
pub fn wrap(args: Vec<Bytes>) -> Vec<Bytes> {
    let mut wrapped = Vec::with_capacity(args.len() + 1);
    wrapped.push(Bytes::from_static(NOTIFY_COMMAND.as_bytes()));
    wrapped.extend(args);
    wrapped
}

/// Whether `args` is a notified command.
pub fn is_wrapped(args: &[Bytes]) -> bool {
    args.first()
        .is_some_and(|n| n.eq_ignore_ascii_case(NOTIFY_COMMAND.as_bytes()))
}

/// The reply of a notified command split into the command's own reply and its events. A reply
/// of another shape (which [`run`] never gives) is returned as is, without events.
pub fn unwrap(reply: Reply) -> (Reply, Vec<Event>) {
    let Reply::Array(mut parts) = reply else {
        return (reply, Vec::new());
    };
    if parts.len() != 2 || !matches!(parts[1], Reply::Array(_)) {
        return (Reply::Array(parts), Vec::new());
    }
    let Some(Reply::Array(encoded)) = parts.pop() else {
        return (Reply::Array(parts), Vec::new());
    };
    let inner = parts.pop().unwrap_or(Reply::Nil);
    let events = encoded
        .into_iter()
        .filter_map(|e| match e {
            Reply::Array(mut f) if f.len() == 3 => {
                let (Some(Reply::Bulk(key)), Some(Reply::Bulk(name)), Some(Reply::Integer(c))) =
                    (f.pop(), f.pop(), f.pop())
                else {
                    return None;
                };
                Some(Event {
                    class: Class::of_code(c)?,
                    name: event_name(&name)?,
                    key,
                })
            }
            _ => None,
        })
        .collect();
    (inner, events)
}

/// Runs `capdb.notify <command...>`: the command, and the events it emits (see the module
/// doc). Its keys are read before and after; a command that fails emits nothing.
pub fn run(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    let inner = &args[1..];
    let keys = command_keys(inner)?;
    let mut facts = Facts {
        keys: Vec::with_capacity(keys.len()),
        probe: None,
    };
    for k in keys {
        if !facts.keys.iter().any(|(known, _, _)| *known == k) {
            let before = space.get(&k)?;
            facts.keys.push((k, before, None));
        }
    }
    let probe = probe_of(inner);
    let probe_before = match &probe {
        Some(p) => Some(execute(p, space, cx)?),
        None => None,
    };
    let reply = execute(inner, space, cx)?;
    for (k, _, after) in facts.keys.iter_mut() {
        *after = space.get(k)?;
    }
    if let (Some(p), Some(before)) = (&probe, probe_before) {
        facts.probe = Some((before, execute(p, space, cx)?));
    }
    let events = exec_events(inner, &reply, &facts);
    let encoded = events
        .into_iter()
        .map(|e| {
            Reply::Array(vec![
                Reply::Integer(e.class.bit() as i64),
                Reply::Bulk(Bytes::from_static(e.name.as_bytes())),
                Reply::Bulk(e.key),
            ])
        })
        .collect();
    Ok(Reply::Array(vec![reply, Reply::Array(encoded)]))
}

/// What a notified command's rules may look at besides its arguments and reply.
#[derive(Debug, Default)]
pub struct Facts {
    /// Each key of the command: its record before and after the command.
    pub keys: Vec<(Bytes, Option<Value>, Option<Value>)>,
    /// The reply of the command's probe ([`probe_of`]) before and after it.
    pub probe: Option<(Reply, Reply)>,
}

impl Facts {
    fn entry(&self, key: &[u8]) -> Option<&(Bytes, Option<Value>, Option<Value>)> {
        self.keys.iter().find(|(k, _, _)| k == key)
    }

    fn existed(&self, key: &[u8]) -> bool {
        self.entry(key).is_some_and(|(_, b, _)| b.is_some())
    }

    fn exists(&self, key: &[u8]) -> bool {
        self.entry(key).is_some_and(|(_, _, a)| a.is_some())
    }

    /// The key existed and the command removed it (a pop or a removal emptied it).
    fn emptied(&self, key: &[u8]) -> bool {
        self.existed(key) && !self.exists(key)
    }

    /// The key's value bytes or deadline differ before and after (or it was created).
    fn changed(&self, key: &[u8]) -> bool {
        self.entry(key).is_some_and(|(_, b, a)| match (b, a) {
            (Some(b), Some(a)) => b.data != a.data,
            (None, None) => false,
            _ => true,
        })
    }

    fn deadline(&self, key: &[u8]) -> (Option<u64>, Option<u64>) {
        self.entry(key).map_or((None, None), |(_, b, a)| {
            (
                b.as_ref().and_then(|v| v.header.expire_at_ms),
                a.as_ref().and_then(|v| v.header.expire_at_ms),
            )
        })
    }
}

/// A read command whose answer before and after tells whether a write changed anything its
/// reply does not show: ZADD without CH answers only how many members it added, yet emits
/// `zadd` when it changed a score.
fn probe_of(args: &[Bytes]) -> Option<Vec<Bytes>> {
    if !args[0].eq_ignore_ascii_case(b"zadd") || args.len() < 4 {
        return None;
    }
    let mut i = 2;
    while i < args.len() && is_zadd_option(&args[i]) {
        i += 1;
    }
    let mut probe = vec![Bytes::from_static(b"zmscore"), args[1].clone()];
    probe.extend(args[i..].iter().skip(1).step_by(2).cloned());
    (probe.len() > 2).then_some(probe)
}

fn is_zadd_option(arg: &[u8]) -> bool {
    [&b"nx"[..], b"xx", b"gt", b"lt", b"ch", b"incr"]
        .iter()
        .any(|o| arg.eq_ignore_ascii_case(o))
}

/// Whether a reply carries nothing: a pop of a missing key, `count 0`, a failed condition.
fn nothing(reply: &Reply) -> bool {
    match reply {
        Reply::Nil | Reply::NilArray => true,
        Reply::Array(a) | Reply::Set(a) => a.is_empty(),
        Reply::Pairs(a) => a.is_empty(),
        _ => false,
    }
}

fn positive(reply: &Reply) -> bool {
    matches!(reply, Reply::Integer(n) if *n > 0)
}

fn arg_is(args: &[Bytes], i: usize, word: &[u8]) -> bool {
    args.get(i).is_some_and(|a| a.eq_ignore_ascii_case(word))
}

/// Redis's events for a data-type write that succeeded with `reply` (see the module doc).
/// `args[0]` is the command's name; `None` for a command no rule knows (a test checks every
/// write command has one).
pub fn exec_events(args: &[Bytes], reply: &Reply, facts: &Facts) -> Vec<Event> {
    rule(args, reply, facts).unwrap_or_default()
}

fn rule(args: &[Bytes], reply: &Reply, f: &Facts) -> Option<Vec<Event>> {
    use Class::*;
    let name = std::string::String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let key = args.get(1).cloned().unwrap_or_default();
    let mut out = Vec::new();
    let one = |class, event| vec![Event::new(class, event, &key)];
    // A removal: its event when it removed something, then `del` when it emptied the key.
    let removal = |class, event: &'static str, removed: bool| {
        let mut v = Vec::new();
        if removed {
            v.push(Event::new(class, event, &key));
            if f.emptied(&key) {
                v.push(Event::new(Generic, "del", &key));
            }
        }
        v
    };
    // A STORE command: its event when the result was stored, `del` when an empty result
    // deleted a key that existed.
    let store = |dest: &Bytes, class, event: &'static str| {
        if f.exists(dest) {
            vec![Event::new(class, event, dest)]
        } else if f.existed(dest) {
            vec![Event::new(Generic, "del", dest)]
        } else {
            Vec::new()
        }
    };
    let events = match name.as_str() {
        // Strings.
        "getset" => one(String, "set"),
        "incrbyfloat" => one(String, "incrbyfloat"),
        "setrange" => {
            if args.get(3).is_some_and(|v| !v.is_empty()) {
                one(String, "setrange")
            } else {
                Vec::new()
            }
        }
        "msetnx" => {
            if positive(reply) {
                args.get(1..)
                    .unwrap_or_default()
                    .iter()
                    .step_by(2)
                    .map(|k| Event::new(String, "set", k))
                    .collect()
            } else {
                Vec::new()
            }
        }
        "getex" => {
            let expiry = args.get(2..).unwrap_or_default().iter().any(|a| {
                [&b"ex"[..], b"px", b"exat", b"pxat"]
                    .iter()
                    .any(|o| a.eq_ignore_ascii_case(o))
            });
            let persist = args
                .get(2..)
                .unwrap_or_default()
                .iter()
                .any(|a| a.eq_ignore_ascii_case(b"persist"));
            let (before, after) = f.deadline(&key);
            if !f.existed(&key) {
                Vec::new()
            } else if expiry && f.emptied(&key) {
                one(Generic, "del")
            } else if expiry {
                one(Generic, "expire")
            } else if persist && before.is_some() && after.is_none() {
                one(Generic, "persist")
            } else {
                Vec::new()
            }
        }
        // Bits and HyperLogLogs (string values).
        "setbit" | "bitfield" => {
            if f.changed(&key) {
                one(String, "setbit")
            } else {
                Vec::new()
            }
        }
        "bitop" => {
            let dest = args.get(2).cloned().unwrap_or_default();
            if f.exists(&dest) {
                vec![Event::new(String, "set", &dest)]
            } else if f.existed(&dest) {
                vec![Event::new(Generic, "del", &dest)]
            } else {
                Vec::new()
            }
        }
        "pfadd" => {
            if positive(reply) {
                one(String, "pfadd")
            } else {
                Vec::new()
            }
        }
        "pfmerge" => one(String, "pfadd"),
        "pfcount" | "pfdebug" => Vec::new(),
        // Hashes.
        "hset" | "hmset" => one(Hash, "hset"),
        "hsetnx" => {
            if positive(reply) {
                one(Hash, "hset")
            } else {
                Vec::new()
            }
        }
        "hincrby" => one(Hash, "hincrby"),
        "hincrbyfloat" => one(Hash, "hincrbyfloat"),
        "hdel" => removal(Hash, "hdel", positive(reply)),
        "hexpire" | "hpexpire" | "hexpireat" | "hpexpireat" | "hpersist" => {
            let codes: Vec<i64> = match reply {
                Reply::Array(a) => a
                    .iter()
                    .filter_map(|r| match r {
                        Reply::Integer(n) => Some(*n),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if name == "hpersist" {
                if codes.contains(&1) {
                    out.push(Event::new(Hash, "hpersist", &key));
                }
            } else {
                if codes.contains(&1) {
                    out.push(Event::new(Hash, "hexpire", &key));
                }
                out.extend(removal(Hash, "hdel", codes.contains(&2)));
            }
            std::mem::take(&mut out)
        }
        // Lists.
        "lpush" | "lpushx" => {
            if positive(reply) {
                one(List, "lpush")
            } else {
                Vec::new()
            }
        }
        "rpush" | "rpushx" => {
            if positive(reply) {
                one(List, "rpush")
            } else {
                Vec::new()
            }
        }
        "linsert" => {
            if positive(reply) {
                one(List, "linsert")
            } else {
                Vec::new()
            }
        }
        "lset" => one(List, "lset"),
        "lrem" => removal(List, "lrem", positive(reply)),
        "ltrim" => removal(List, "ltrim", f.existed(&key)),
        "lpop" => removal(List, "lpop", !nothing(reply)),
        "rpop" => removal(List, "rpop", !nothing(reply)),
        "lmove" | "rpoplpush" => {
            if nothing(reply) {
                return Some(Vec::new());
            }
            let dest = args.get(2).cloned().unwrap_or_default();
            let (pop, push) = if name == "rpoplpush" {
                ("rpop", "lpush")
            } else {
                (
                    if arg_is(args, 3, b"left") {
                        "lpop"
                    } else {
                        "rpop"
                    },
                    if arg_is(args, 4, b"left") {
                        "lpush"
                    } else {
                        "rpush"
                    },
                )
            };
            out.push(Event::new(List, push, &dest));
            out.extend(removal(List, pop, true));
            std::mem::take(&mut out)
        }
        "lmpop" | "zmpop" => {
            let Reply::Array(parts) = reply else {
                return Some(Vec::new());
            };
            let Some(Reply::Bulk(popped)) = parts.first() else {
                return Some(Vec::new());
            };
            let numkeys = args
                .get(1)
                .and_then(|n| crate::format::parse_int(n))
                .unwrap_or(0)
                .max(0) as usize;
            let side = args.get(2 + numkeys);
            let first = side
                .is_some_and(|s| s.eq_ignore_ascii_case(b"left") || s.eq_ignore_ascii_case(b"min"));
            let (class, event) = match (name.as_str(), first) {
                ("lmpop", true) => (List, "lpop"),
                ("lmpop", false) => (List, "rpop"),
                (_, true) => (Zset, "zpopmin"),
                (_, false) => (Zset, "zpopmax"),
            };
            out.push(Event::new(class, event, popped));
            if f.emptied(popped) {
                out.push(Event::new(Generic, "del", popped));
            }
            std::mem::take(&mut out)
        }
        // Sets.
        "sadd" => {
            if positive(reply) {
                one(Set, "sadd")
            } else {
                Vec::new()
            }
        }
        "srem" => removal(Set, "srem", positive(reply)),
        "spop" => removal(Set, "spop", !nothing(reply)),
        "smove" => {
            let dest = args.get(2).cloned().unwrap_or_default();
            if !positive(reply) || dest == key {
                return Some(Vec::new());
            }
            out.extend(removal(Set, "srem", true));
            out.push(Event::new(Set, "sadd", &dest));
            std::mem::take(&mut out)
        }
        "sinterstore" | "sunionstore" | "sdiffstore" => store(&key, Set, static_name(&name)?),
        // Sorted sets.
        "zadd" => {
            if args
                .get(2..)
                .unwrap_or_default()
                .iter()
                .any(|a| a.eq_ignore_ascii_case(b"incr"))
            {
                if nothing(reply) {
                    Vec::new()
                } else {
                    one(Zset, "zincr")
                }
            } else {
                let changed = match &f.probe {
                    Some((before, after)) => before != after,
                    None => positive(reply),
                };
                if changed {
                    one(Zset, "zadd")
                } else {
                    Vec::new()
                }
            }
        }
        "zincrby" => one(Zset, "zincr"),
        "zrem" | "zremrangebyscore" | "zremrangebyrank" | "zremrangebylex" => {
            removal(Zset, static_name(&name)?, positive(reply))
        }
        "zpopmin" | "zpopmax" => removal(Zset, static_name(&name)?, !nothing(reply)),
        "zunionstore" | "zinterstore" | "zdiffstore" | "zrangestore" => {
            store(&key, Zset, static_name(&name)?)
        }
        // Keys.
        "copy" => {
            if positive(reply) {
                vec![Event::new(
                    Generic,
                    "copy_to",
                    &args.get(2).cloned().unwrap_or_default(),
                )]
            } else {
                Vec::new()
            }
        }
        // A deadline already past restores nothing (REPLACE still deleted the old value).
        "restore" if matches!(reply, Reply::Ok) => {
            if f.exists(&key) {
                one(Generic, "restore")
            } else if f.emptied(&key) {
                one(Generic, "del")
            } else {
                Vec::new()
            }
        }
        "restore" => Vec::new(),
        "rename" | "renamenx" => {
            let dest = args.get(2).cloned().unwrap_or_default();
            let renamed = match reply {
                Reply::Ok => true,
                r => positive(r),
            };
            if renamed && dest != key {
                vec![
                    Event::new(Generic, "rename_from", &key),
                    Event::new(Generic, "rename_to", &dest),
                ]
            } else {
                Vec::new()
            }
        }
        _ => return None,
    };
    Some(events)
}

/// Every event name a rule emits, so a decoded name is `'static` (and an unknown one dropped).
const EVENT_NAMES: &[&str] = &[
    "append",
    "copy_to",
    "del",
    "evicted",
    "expire",
    "expired",
    "hdel",
    "hexpire",
    "hincrby",
    "hincrbyfloat",
    "hpersist",
    "hset",
    "incrby",
    "incrbyfloat",
    "linsert",
    "lpop",
    "lpush",
    "lrem",
    "lset",
    "ltrim",
    "persist",
    "pfadd",
    "rename_from",
    "rename_to",
    "restore",
    "rpop",
    "rpush",
    "sadd",
    "sdiffstore",
    "set",
    "setbit",
    "setrange",
    "sinterstore",
    "spop",
    "srem",
    "sunionstore",
    "zadd",
    "zdiffstore",
    "zincr",
    "zinterstore",
    "zpopmax",
    "zpopmin",
    "zrangestore",
    "zrem",
    "zremrangebylex",
    "zremrangebyrank",
    "zremrangebyscore",
    "zunionstore",
];

fn static_name(name: &str) -> Option<&'static str> {
    EVENT_NAMES.iter().copied().find(|n| *n == name)
}

fn event_name(raw: &[u8]) -> Option<&'static str> {
    EVENT_NAMES.iter().copied().find(|n| n.as_bytes() == raw)
}

/// Redis's events for one of the front end's own writes (SET and its variants, MSET, DEL,
/// GETDEL, INCR/DECR, APPEND, EXPIRE and its variants, PERSIST) that answered `reply`.
/// `now_ms` is the clock the write was applied with: an EXPIRE to a deadline not after it
/// deleted the key (`del`, as Redis).
pub fn mutation_events(m: &Mutation, reply: &Reply, now_ms: u64) -> Vec<Event> {
    use Class::*;
    use capdb_types::mutation::{Condition, ExpiryUpdate};
    let key = m.key();
    match m {
        Mutation::Set {
            condition,
            expiry,
            return_old,
            ..
        } => {
            let set = if !return_old {
                *reply == Reply::Ok
            } else {
                match condition {
                    Condition::Always => true,
                    Condition::IfAbsent => *reply == Reply::Nil,
                    Condition::IfPresent => *reply != Reply::Nil,
                    Condition::IfEqual(v) => *reply == Reply::Bulk(v.clone()),
                    Condition::IfNotEqual(v) => *reply != Reply::Bulk(v.clone()),
                }
            };
            let mut out = Vec::new();
            if set {
                out.push(Event::new(String, "set", key));
                if matches!(expiry, ExpiryUpdate::At(_)) {
                    out.push(Event::new(Generic, "expire", key));
                }
            }
            out
        }
        Mutation::Delete { .. } if positive(reply) => vec![Event::new(Generic, "del", key)],
        Mutation::GetDel { .. } if !nothing(reply) => vec![Event::new(Generic, "del", key)],
        Mutation::IncrBy { .. } => vec![Event::new(String, "incrby", key)],
        Mutation::Append { .. } => vec![Event::new(String, "append", key)],
        Mutation::Expire { at_ms, .. } if positive(reply) => expire_events(*at_ms, key, now_ms),
        Mutation::ExpireIf { at_ms, .. } if positive(reply) => {
            expire_events(Some(*at_ms), key, now_ms)
        }
        _ => Vec::new(),
    }
}

/// EXPIRE that changed a deadline: `expire`, or `del` for a deadline that has passed; PERSIST
/// (`None`) that removed one: `persist`.
fn expire_events(at_ms: Option<u64>, key: &Bytes, now_ms: u64) -> Vec<Event> {
    match at_ms {
        None => vec![Event::new(Class::Generic, "persist", key)],
        Some(at) if at <= now_ms => vec![Event::new(Class::Generic, "del", key)],
        Some(_) => vec![Event::new(Class::Generic, "expire", key)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MapSpace;
    use crate::testing::words::{cx, run, space};

    /// Runs `cmd` notified; its reply and its events as `event:key` words.
    fn notified(s: &mut MapSpace, cmd: &str) -> (Reply, Vec<std::string::String>) {
        let args: Vec<Bytes> = cmd
            .split_whitespace()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect();
        let reply = crate::execute(&wrap(args), s, &cx()).unwrap();
        let (reply, events) = unwrap(reply);
        let words = events
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e.name,
                    std::string::String::from_utf8_lossy(&e.key)
                )
            })
            .collect();
        (reply, words)
    }

    fn events(s: &mut MapSpace, cmd: &str) -> Vec<std::string::String> {
        notified(s, cmd).1
    }

    #[test]
    fn every_write_command_has_a_rule() {
        for spec in crate::command::all().filter(|s| s.is_write()) {
            let args = vec![Bytes::from_static(spec.name.as_bytes())];
            assert!(
                rule(&args, &Reply::Nil, &Facts::default()).is_some(),
                "{} has no event rule",
                spec.name
            );
        }
    }

    #[test]
    fn the_wrapped_command_answers_as_the_command_does() {
        let mut s = space();
        let (reply, _) = notified(&mut s, "hset h a 1 b 2");
        assert_eq!(reply, Reply::Integer(2));
        assert_eq!(run(&mut s, "hlen h").unwrap(), Reply::Integer(2));
        let args: Vec<Bytes> = ["capdb.notify", "hset", "h"]
            .map(|w| Bytes::from_static(w.as_bytes()))
            .to_vec();
        assert!(
            crate::execute(&args, &mut s, &cx()).is_err(),
            "arity is the command's"
        );
    }

    #[test]
    fn a_removal_that_empties_the_key_also_emits_del() {
        let mut s = space();
        run(&mut s, "rpush l a b").unwrap();
        assert_eq!(events(&mut s, "lpop l"), ["lpop:l"]);
        assert_eq!(events(&mut s, "lpop l"), ["lpop:l", "del:l"]);
        assert!(events(&mut s, "lpop l").is_empty(), "nothing popped");
        run(&mut s, "hset h a 1").unwrap();
        assert!(events(&mut s, "hdel h nope").is_empty());
        assert_eq!(events(&mut s, "hdel h a"), ["hdel:h", "del:h"]);
    }

    #[test]
    fn moves_emit_the_push_first_then_the_pop() {
        let mut s = space();
        run(&mut s, "rpush l a b").unwrap();
        assert_eq!(
            events(&mut s, "lmove l m left right"),
            ["rpush:m", "lpop:l"]
        );
        assert_eq!(
            events(&mut s, "lmove l m left left"),
            ["lpush:m", "lpop:l", "del:l"]
        );
        run(&mut s, "sadd s a").unwrap();
        assert_eq!(events(&mut s, "smove s t a"), ["srem:s", "del:s", "sadd:t"]);
    }

    #[test]
    fn an_empty_store_result_deletes_only_a_key_that_existed() {
        let mut s = space();
        run(&mut s, "sadd a x").unwrap();
        assert_eq!(events(&mut s, "sunionstore d a"), ["sunionstore:d"]);
        assert_eq!(events(&mut s, "sinterstore d a nope"), ["del:d"]);
        assert!(events(&mut s, "sinterstore d a nope").is_empty());
    }

    #[test]
    fn zadd_emits_when_a_score_changes_even_if_nothing_was_added() {
        let mut s = space();
        assert_eq!(events(&mut s, "zadd z 1 a"), ["zadd:z"]);
        assert!(events(&mut s, "zadd z 1 a").is_empty());
        let (reply, ev) = notified(&mut s, "zadd z 2 a");
        assert_eq!((reply, ev), (Reply::Integer(0), vec!["zadd:z".to_string()]));
        assert_eq!(events(&mut s, "zadd z incr 1 a"), ["zincr:z"]);
        assert!(events(&mut s, "zadd z nx incr 1 a").is_empty());
    }

    #[test]
    fn setbit_emits_only_when_the_string_changes() {
        let mut s = space();
        assert_eq!(events(&mut s, "setbit b 5 0"), ["setbit:b"], "created");
        assert!(events(&mut s, "setbit b 5 0").is_empty());
        assert_eq!(events(&mut s, "setbit b 5 1"), ["setbit:b"]);
    }

    #[test]
    fn front_end_writes_are_judged_by_their_reply() {
        use capdb_types::mutation::{Condition, ExpiryUpdate};
        let key = Bytes::from_static(b"k");
        let set = |condition, expiry, return_old| Mutation::Set {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            condition,
            expiry,
            return_old,
        };
        let names = |m: &Mutation, r: Reply| {
            mutation_events(m, &r, 100)
                .into_iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
        };
        let plain = set(Condition::Always, ExpiryUpdate::Clear, false);
        assert_eq!(names(&plain, Reply::Ok), ["set"]);
        let ex = set(Condition::Always, ExpiryUpdate::At(500), false);
        assert_eq!(names(&ex, Reply::Ok), ["set", "expire"]);
        let nx = set(Condition::IfAbsent, ExpiryUpdate::Clear, false);
        assert!(names(&nx, Reply::Nil).is_empty());
        let nx_get = set(Condition::IfAbsent, ExpiryUpdate::Clear, true);
        assert_eq!(
            names(&nx_get, Reply::Nil),
            ["set"],
            "absent: set, old value nil"
        );
        assert!(names(&nx_get, Reply::Bulk(Bytes::from_static(b"o"))).is_empty());
        let expire = |at| Mutation::Expire {
            key: key.clone(),
            at_ms: at,
        };
        assert_eq!(names(&expire(Some(500)), Reply::Integer(1)), ["expire"]);
        assert_eq!(names(&expire(Some(100)), Reply::Integer(1)), ["del"]);
        assert_eq!(names(&expire(None), Reply::Integer(1)), ["persist"]);
        assert!(names(&expire(None), Reply::Integer(0)).is_empty());
        let del = Mutation::Delete { key: key.clone() };
        assert!(names(&del, Reply::Integer(0)).is_empty());
    }
}
