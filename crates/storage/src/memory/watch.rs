//! WATCH on a cache keyspace: which keys changed since a point, per shard.
//!
//! Redis aborts EXEC when a watched key was modified in any way after WATCH (a write by anyone,
//! this client included, a SET of the same value, a delete then a re-create, expiry, eviction).
//! A value cannot tell that (a delete leaves nothing behind), so each shard counts its changes
//! and remembers, per key, the count at the key's last change ([`ChangeLog`]). A watch is the
//! count when it began; EXEC, holding the shard's lock, aborts if the key changed after it.
//!
//! Cost when nobody watches: nothing is recorded (one relaxed atomic load per change, in
//! [`super::MemStore::changed`]): changes before a watch begins never matter to it.
//!
//! Bound: at most [`TOUCHED_PER_SHARD_MAX`] keys per shard are remembered; past that the shard
//! forgets them all and raises its horizon, and every watch that began before the horizon counts
//! as changed (a conservative abort, which Redis's rule allows: never the reverse).

use std::collections::HashMap;

use super::Key;

/// Keys remembered per shard at most (64 shards: about four million keys in all).
pub const TOUCHED_PER_SHARD_MAX: usize = 65_536;

/// A shard's changes (see the module doc).
#[derive(Default)]
pub(super) struct ChangeLog {
    /// Changes recorded so far; a watch starts at this count.
    count: u64,
    /// Watches that began before this count are judged changed (their keys were forgotten).
    horizon: u64,
    /// Key -> the count just after its last recorded change.
    touched: HashMap<Key, u64, foldhash::fast::RandomState>,
}

impl ChangeLog {
    pub(super) fn record(&mut self, key: &[u8]) {
        if self.touched.len() >= TOUCHED_PER_SHARD_MAX && !self.touched.contains_key(key) {
            self.touched = HashMap::default();
            self.horizon = self.count + 1;
        }
        self.count += 1;
        self.touched.insert(Key::from_slice(key), self.count);
    }

    /// Every watch of this shard counts as changed (a flush of more keys than are remembered).
    pub(super) fn forget_all(&mut self) {
        self.count += 1;
        self.horizon = self.count;
        self.touched = HashMap::default();
    }

    pub(super) fn mark(&self) -> u64 {
        self.count
    }

    /// Whether `key` changed after the watch that began at `mark`.
    pub(super) fn changed_since(&self, key: &[u8], mark: u64) -> bool {
        mark < self.horizon || self.touched.get(key).is_some_and(|&at| at > mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_after_the_mark_is_seen_and_one_before_is_not() {
        let mut log = ChangeLog::default();
        log.record(b"a");
        let mark = log.mark();
        assert!(!log.changed_since(b"a", mark));
        log.record(b"b");
        assert!(!log.changed_since(b"a", mark));
        log.record(b"a");
        assert!(log.changed_since(b"a", mark));
    }

    #[test]
    fn forgetting_keys_makes_older_watches_changed() {
        let mut log = ChangeLog::default();
        let mark = log.mark();
        for i in 0..=TOUCHED_PER_SHARD_MAX {
            log.record(format!("k{i}").as_bytes());
        }
        assert!(log.changed_since(b"never-written", mark));
        let later = log.mark();
        assert!(!log.changed_since(b"never-written", later));
        log.forget_all();
        assert!(log.changed_since(b"never-written", later));
    }
}
