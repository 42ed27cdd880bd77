//! Settings a node changes at run time (`CONFIG SET`), as opposed to its [`crate::config::Config`],
//! fixed at start.
//!
//! They are per node, as in Redis Cluster (where `CONFIG SET` changes only the node it is sent
//! to): nothing here is replicated, and a restart returns to the defaults (capdb has no `CONFIG
//! REWRITE`). Each setting is an atomic, so the request path reads it without a lock.

use std::sync::atomic::{AtomicU32, Ordering};

/// The node's run-time settings.
#[derive(Debug, Default)]
pub struct Settings {
    /// `notify-keyspace-events`: the classes of keyspace events published (see
    /// [`KeyspaceEvents`]); 0 (the default, as Redis's) publishes nothing.
    notify_keyspace_events: AtomicU32,
}

impl Settings {
    pub fn keyspace_events(&self) -> KeyspaceEvents {
        KeyspaceEvents(self.notify_keyspace_events.load(Ordering::Relaxed))
    }

    pub fn set_keyspace_events(&self, events: KeyspaceEvents) {
        self.notify_keyspace_events
            .store(events.0, Ordering::Relaxed);
    }
}

/// Which keyspace events are published: Redis's `notify-keyspace-events` flags, bit for bit
/// (`server.h`, `NOTIFY_*`), so the string round trip matches Redis's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyspaceEvents(pub u32);

impl KeyspaceEvents {
    /// `K`: publish to `__keyspace@<db>__:<key>`.
    pub const KEYSPACE: u32 = 1 << 0;
    /// `E`: publish to `__keyevent@<db>__:<event>`.
    pub const KEYEVENT: u32 = 1 << 1;
    pub const GENERIC: u32 = 1 << 2;
    pub const STRING: u32 = 1 << 3;
    pub const LIST: u32 = 1 << 4;
    pub const SET: u32 = 1 << 5;
    pub const HASH: u32 = 1 << 6;
    pub const ZSET: u32 = 1 << 7;
    pub const EXPIRED: u32 = 1 << 8;
    pub const EVICTED: u32 = 1 << 9;
    pub const STREAM: u32 = 1 << 10;
    pub const KEY_MISS: u32 = 1 << 11;
    pub const MODULE: u32 = 1 << 12;
    pub const NEW: u32 = 1 << 13;
    /// `A`: every class but key misses and new keys (`g$lshzxetd`).
    pub const ALL: u32 = Self::GENERIC
        | Self::STRING
        | Self::LIST
        | Self::SET
        | Self::HASH
        | Self::ZSET
        | Self::EXPIRED
        | Self::EVICTED
        | Self::STREAM
        | Self::MODULE;

    /// The class letters, in the order Redis prints them when not all of `A` is set.
    const CLASSES: [(u8, u32); 11] = [
        (b'g', Self::GENERIC),
        (b'$', Self::STRING),
        (b'l', Self::LIST),
        (b's', Self::SET),
        (b'h', Self::HASH),
        (b'z', Self::ZSET),
        (b'x', Self::EXPIRED),
        (b'e', Self::EVICTED),
        (b't', Self::STREAM),
        (b'd', Self::MODULE),
        (b'n', Self::NEW),
    ];

    /// Parses a flag string as Redis does (`keyspaceEventsStringToFlags`): any order, repeats
    /// allowed, case-sensitive; `None` for any other character.
    pub fn parse(flags: &[u8]) -> Option<KeyspaceEvents> {
        let mut bits = 0;
        for &c in flags {
            bits |= match c {
                b'A' => Self::ALL,
                b'K' => Self::KEYSPACE,
                b'E' => Self::KEYEVENT,
                b'm' => Self::KEY_MISS,
                c => Self::CLASSES.iter().find(|(l, _)| *l == c)?.1,
            };
        }
        Some(KeyspaceEvents(bits))
    }

    /// The normalised flag string Redis answers (`keyspaceEventsFlagsToString`): `A` when every
    /// class of `A` is set (then `n` is not shown), else the classes in a fixed order; then
    /// `K`, `E`, `m`. `KEA` reads back as `AKE`.
    pub fn to_flag_string(self) -> String {
        let mut out = String::new();
        if self.0 & Self::ALL == Self::ALL {
            out.push('A');
        } else {
            for (letter, bit) in Self::CLASSES {
                if self.0 & bit != 0 {
                    out.push(letter as char);
                }
            }
        }
        for (letter, bit) in [
            ('K', Self::KEYSPACE),
            ('E', Self::KEYEVENT),
            ('m', Self::KEY_MISS),
        ] {
            if self.0 & bit != 0 {
                out.push(letter);
            }
        }
        out
    }

    pub fn has(self, bits: u32) -> bool {
        self.0 & bits != 0
    }

    /// Whether any event would be published: a destination (`K` or `E`) and a class. When not,
    /// writes skip everything notifications cost (one atomic read per write).
    pub fn active(self) -> bool {
        self.has(Self::KEYSPACE | Self::KEYEVENT)
            && self.has(Self::ALL | Self::NEW | Self::KEY_MISS)
    }
}

// The classes `capdb_data::notify` decides are these flags' bits.
const _: () = {
    use capdb_data::notify::Class;
    assert!(Class::Generic as u32 == KeyspaceEvents::GENERIC);
    assert!(Class::String as u32 == KeyspaceEvents::STRING);
    assert!(Class::List as u32 == KeyspaceEvents::LIST);
    assert!(Class::Set as u32 == KeyspaceEvents::SET);
    assert!(Class::Hash as u32 == KeyspaceEvents::HASH);
    assert!(Class::Zset as u32 == KeyspaceEvents::ZSET);
    assert!(Class::Expired as u32 == KeyspaceEvents::EXPIRED);
    assert!(Class::Evicted as u32 == KeyspaceEvents::EVICTED);
};

#[cfg(test)]
mod tests {
    use super::KeyspaceEvents;

    fn normalised(flags: &str) -> Option<String> {
        KeyspaceEvents::parse(flags.as_bytes()).map(KeyspaceEvents::to_flag_string)
    }

    #[test]
    fn flag_strings_read_back_as_redis_prints_them() {
        // Each pair checked against redis-server 7.0.15 (CONFIG SET, then CONFIG GET).
        for (set, get) in [
            ("KEA", "AKE"),
            ("Kg", "gK"),
            ("Ex", "xE"),
            ("g$lshzxetd", "A"),
            ("g$lshzxetdn", "A"),
            ("Am", "Am"),
            ("nmKEl", "lnKEm"),
            ("d", "d"),
            ("K", "K"),
            ("AAA", "A"),
            ("gg", "g"),
            ("", ""),
        ] {
            assert_eq!(normalised(set).as_deref(), Some(get), "{set}");
        }
    }

    #[test]
    fn unknown_letters_are_refused() {
        for bad in ["ke", "Z", "xyz", "K E"] {
            assert_eq!(normalised(bad), None, "{bad}");
        }
    }
}
