//! Hash slots, as Redis Cluster defines them, so cluster-aware Redis clients route correctly.
//!
//! A key maps to one of [`SLOTS`] slots by CRC16 (XMODEM) of the key, or of its *hash tag*: the
//! part between the first `{` and the next `}` when that part is non-empty, so `{user:1}:name`
//! and `{user:1}:email` share a slot. A keyspace's shards own contiguous slot ranges.

/// Number of hash slots (Redis Cluster's 16384).
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for key slots.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key (honouring `{hash tags}`).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

/// The slot range `[start, end]` (inclusive, as CLUSTER SLOTS reports) of shard `index` of
/// `shards`: the slots are split as evenly as possible, lower shards taking the remainder.
pub fn shard_slot_range(index: u32, shards: u32) -> (u16, u16) {
    assert!(shards > 0 && index < shards, "shard {index} of {shards}");
    let total = SLOTS as u32;
    let base = total / shards;
    let extra = total % shards;
    let start = index * base + index.min(extra);
    let len = base + u32::from(index < extra);
    (start as u16, (start + len - 1) as u16)
}

/// Which of `shards` shards owns `slot`.
pub fn shard_of_slot(slot: u16, shards: u32) -> u32 {
    let (mut lo, mut hi) = (0u32, shards - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if shard_slot_range(mid, shards).1 < slot {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), crc16(b"{bar") % SLOTS);
    }

    #[test]
    fn shards_cover_every_slot_once() {
        for shards in [1, 2, 3, 7, 16, 1024] {
            let mut next = 0u32;
            for i in 0..shards {
                let (s, e) = shard_slot_range(i, shards);
                assert_eq!(s as u32, next);
                assert!(e >= s);
                next = e as u32 + 1;
                assert_eq!(shard_of_slot(s, shards), i);
                assert_eq!(shard_of_slot(e, shards), i);
            }
            assert_eq!(next, SLOTS as u32);
        }
    }
}
