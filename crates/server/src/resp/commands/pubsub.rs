//! Pub/sub commands: SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE and their UNSUBSCRIBE forms, PUBLISH,
//! SPUBLISH and PUBSUB. The registry and cross-node delivery are the node's
//! (`node/pubsub.rs`); this file keeps the connection's own subscriptions and answers in Redis's
//! shapes (push frames in RESP3).

use bytes::Bytes;

use super::Outcome;
use crate::node::pubsub::{CHANNELS_PER_CONNECTION_MAX, Kind, Message, Subscriber};
use crate::resp::{Connection, Subscriptions};

/// Commands a RESP2 connection may send while subscribed.
pub(super) const ALLOWED_WHILE_SUBSCRIBED: &[&str] = &[
    "ping",
    "psubscribe",
    "punsubscribe",
    "quit",
    "reset",
    "ssubscribe",
    "subscribe",
    "sunsubscribe",
    "unsubscribe",
];

fn subscriptions(conn: &mut Connection) -> &mut Subscriptions {
    conn.subs.get_or_insert_with(|| {
        let (sub, rx) = Subscriber::new();
        Box::new(Subscriptions {
            sub,
            rx,
            channels: Default::default(),
            patterns: Default::default(),
            shard: Default::default(),
        })
    })
}

/// Redis's subscription count for a confirmation: channels and patterns together, shard
/// channels on their own.
fn count(conn: &Connection, kind: Kind) -> i64 {
    conn.subs.as_ref().map_or(0, |s| match kind {
        Kind::Shard => s.shard.len() as i64,
        Kind::Channel | Kind::Pattern => (s.channels.len() + s.patterns.len()) as i64,
    })
}

fn confirm(conn: &mut Connection, what: &str, name: Option<&[u8]>, kind: Kind) {
    let n = count(conn, kind);
    conn.out.push(3);
    conn.out.bulk(what.as_bytes());
    match name {
        Some(n) => conn.out.bulk(n),
        None => conn.out.null(),
    }
    conn.out.int(n);
}

fn subscribe_to(conn: &mut Connection, args: &[Bytes], kind: Kind, what: &str) -> Outcome {
    let (node, id) = (conn.node.clone(), conn.id);
    for name in &args[1..] {
        let s = subscriptions(conn);
        let total = s.channels.len() + s.patterns.len() + s.shard.len();
        let set = s.set(kind);
        if !set.contains(name) {
            if total >= CHANNELS_PER_CONNECTION_MAX {
                return Err(format!(
                    "ERR this connection already holds {CHANNELS_PER_CONNECTION_MAX} subscriptions; use another connection"
                ));
            }
            set.insert(name.clone());
            node.pubsub.subscribe(kind, name.clone(), id, &s.sub);
        }
        confirm(conn, what, Some(name), kind);
    }
    Ok(())
}

fn unsubscribe_from(conn: &mut Connection, args: &[Bytes], kind: Kind, what: &str) -> Outcome {
    let (node, id) = (conn.node.clone(), conn.id);
    let names: Vec<Bytes> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        conn.subs
            .as_mut()
            .map(|s| s.set(kind).iter().cloned().collect())
            .unwrap_or_default()
    };
    if names.is_empty() {
        confirm(conn, what, None, kind);
        return Ok(());
    }
    for name in names {
        if let Some(s) = conn.subs.as_mut()
            && s.set(kind).remove(&name)
        {
            node.pubsub.unsubscribe(kind, &name, id);
        }
        confirm(conn, what, Some(&name), kind);
    }
    Ok(())
}

/// `SUBSCRIBE channel [channel ...]`.
pub(super) fn subscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    subscribe_to(conn, args, Kind::Channel, "subscribe")
}

/// `PSUBSCRIBE pattern [pattern ...]`.
pub(super) fn psubscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    subscribe_to(conn, args, Kind::Pattern, "psubscribe")
}

/// `SSUBSCRIBE shardchannel [shardchannel ...]`.
pub(super) fn ssubscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    subscribe_to(conn, args, Kind::Shard, "ssubscribe")
}

/// `UNSUBSCRIBE [channel ...]`.
pub(super) fn unsubscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    unsubscribe_from(conn, args, Kind::Channel, "unsubscribe")
}

/// `PUNSUBSCRIBE [pattern ...]`.
pub(super) fn punsubscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    unsubscribe_from(conn, args, Kind::Pattern, "punsubscribe")
}

/// `SUNSUBSCRIBE [shardchannel ...]`.
pub(super) fn sunsubscribe(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    unsubscribe_from(conn, args, Kind::Shard, "sunsubscribe")
}

fn publish_to(conn: &mut Connection, args: &[Bytes], shard: bool) -> Outcome {
    let m = Message {
        shard,
        channel: args[1].clone(),
        payload: args[2].clone(),
    };
    let n = conn.node.pubsub.deliver_local(&m);
    conn.node
        .pubsub
        .broadcast(&conn.node, crate::node::pubsub::Item::Publish(m));
    conn.out.int(n);
    Ok(())
}

/// `PUBLISH channel message`: the receivers on this node (as Redis Cluster answers); the
/// message also goes to every other node's subscribers.
pub(super) fn publish(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    publish_to(conn, args, false)
}

/// `SPUBLISH shardchannel message`.
pub(super) fn spublish(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    publish_to(conn, args, true)
}

/// `PUBSUB CHANNELS [pattern] | NUMSUB [channel ...] | NUMPAT | SHARDCHANNELS [pattern] |
/// SHARDNUMSUB [channel ...]`, for this node.
pub(super) fn pubsub(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    let ps = conn.node.pubsub.clone();
    let wrong = || format!("ERR wrong number of arguments for 'pubsub|{sub}' command");
    match sub.as_str() {
        "channels" | "shardchannels" => {
            if args.len() > 3 {
                return Err(wrong());
            }
            let kind = if sub == "channels" {
                Kind::Channel
            } else {
                Kind::Shard
            };
            let names = ps.channels(kind, args.get(2).map(|p| &p[..]));
            conn.out.array(names.len());
            for n in names {
                conn.out.bulk(&n);
            }
        }
        "numsub" | "shardnumsub" => {
            let kind = if sub == "numsub" {
                Kind::Channel
            } else {
                Kind::Shard
            };
            // A flat array in RESP3 too, as Redis 7.0 answers.
            conn.out.array(2 * (args.len() - 2));
            for c in &args[2..] {
                conn.out.bulk(c);
                conn.out.int(ps.count(kind, c) as i64);
            }
        }
        "numpat" => {
            if args.len() != 2 {
                return Err(wrong());
            }
            conn.out.int(ps.patterns() as i64);
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try PUBSUB HELP.",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}
