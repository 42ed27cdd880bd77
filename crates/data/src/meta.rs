//! Meta records: a collection's top-level record, and the one place `WRONGTYPE` and empty-key
//! deletion are decided.
//!
//! Every family command starts with [`open`] (or [`open_or_create`]) and ends a write with
//! [`finish`], which deletes a collection left empty (Redis never keeps an empty hash, list,
//! set or sorted set) and otherwise rewrites the meta record (count, list ends), keeping the
//! key's TTL.

use bytes::{BufMut, Bytes, BytesMut};
use capdb_types::{Error, Result, Value, ValueKind};

use crate::command::Ctx;
use crate::space::{Coll, Space};

const META_VERSION: u8 = 1;
const META_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// What a collection's top-level record holds besides its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollMeta {
    /// The element prefix; unique in its space, never reused.
    pub id: u64,
    /// Number of elements.
    pub len: u64,
    /// Lists: positions of the first element and one past the last (`tail - head == len`).
    pub head: i64,
    pub tail: i64,
    /// Sticky: Redis would have converted this collection from its compact encoding
    /// (listpack/intset) to the general one, which changes `OBJECT ENCODING` and makes the
    /// SCAN family page instead of answering everything at once.
    pub big: bool,
    /// Sticky, hashes only: the hash has had a field with an expiry (HEXPIRE), so each field's
    /// stored value starts with its expiry (see `hash.rs`). Hashes that never had one store
    /// values as they are, as every hash written before field expiry existed does.
    pub field_expiry: bool,
}

impl CollMeta {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(META_LEN);
        b.put_u8(META_VERSION);
        b.put_u64_le(self.id);
        b.put_u64_le(self.len);
        b.put_i64_le(self.head);
        b.put_i64_le(self.tail);
        // One byte of flags: bit 0 `big`, bit 1 `field_expiry` (older records: 0 or 1).
        b.put_u8(self.big as u8 | (self.field_expiry as u8) << 1);
        b.freeze()
    }

    pub fn decode(raw: &[u8]) -> Result<CollMeta> {
        if raw.len() != META_LEN || raw[0] != META_VERSION {
            return Err(Error::Corruption(format!(
                "collection record of {} bytes, version {:?}",
                raw.len(),
                raw.first()
            )));
        }
        let u = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        Ok(CollMeta {
            id: u(1),
            len: u(9),
            head: u(17) as i64,
            tail: u(25) as i64,
            big: raw[33] & 1 != 0,
            field_expiry: raw[33] & 2 != 0,
        })
    }

    /// The meta of a collection record, `None` for a string.
    pub fn of(value: &Value) -> Result<Option<CollMeta>> {
        if value.is_string() || value.header.tombstone {
            return Ok(None);
        }
        CollMeta::decode(&value.data).map(Some)
    }
}

/// An open collection: its handle, meta, kind and TTL.
#[derive(Debug, Clone)]
pub struct Open {
    pub coll: Coll,
    pub meta: CollMeta,
    pub kind: ValueKind,
    pub expire_at_ms: Option<u64>,
}

/// The live collection of `kind` at `key`: `None` when absent (or expired), `WrongType` when
/// the key holds anything else.
pub fn open(space: &mut dyn Space, key: &Bytes, kind: ValueKind) -> Result<Option<Open>> {
    let Some(value) = space.get(key)? else {
        return Ok(None);
    };
    if value.header.kind != kind {
        return Err(Error::WrongType);
    }
    let meta = CollMeta::decode(&value.data)?;
    Ok(Some(Open {
        coll: Coll {
            key: key.clone(),
            id: meta.id,
            kind,
        },
        meta,
        kind,
        expire_at_ms: value.header.expire_at_ms,
    }))
}

/// A new, empty collection of `kind` (not stored until [`finish`]; a command that adds nothing
/// leaves no key behind).
pub fn create(space: &mut dyn Space, key: &Bytes, kind: ValueKind) -> Result<Open> {
    let id = space.new_id()?;
    space.creating(key, kind)?;
    Ok(Open {
        coll: Coll {
            key: key.clone(),
            id,
            kind,
        },
        meta: CollMeta {
            id,
            ..CollMeta::default()
        },
        kind,
        expire_at_ms: None,
    })
}

/// [`open`], or a new collection when the key is absent.
pub fn open_or_create(space: &mut dyn Space, key: &Bytes, kind: ValueKind) -> Result<Open> {
    match open(space, key, kind)? {
        Some(o) => Ok(o),
        None => create(space, key, kind),
    }
}

/// Stores the collection's meta after a write: deletes the key when it is empty, else writes the
/// meta record (keeping the TTL), stamped with the step's timestamp.
pub fn finish(space: &mut dyn Space, open: &Open, cx: &Ctx) -> Result<()> {
    debug_assert!(
        open.kind != ValueKind::List || open.meta.tail - open.meta.head == open.meta.len as i64,
        "a list's ends match its length"
    );
    if open.meta.len == 0 {
        // Also covers a created collection that never got an element: nothing was stored.
        if space
            .get(&open.coll.key)?
            .is_some_and(|v| v.header.kind == open.kind)
        {
            space.remove(&open.coll.key)?;
        }
        return Ok(());
    }
    space.put(
        &open.coll.key,
        Value::of_kind(
            open.kind,
            open.meta.encode(),
            cx.timestamp,
            open.expire_at_ms,
        ),
    )
}

/// A stable 64-bit hash of a member (FNV-1a, then a SplitMix64 finaliser). Hashes, sets and
/// sorted sets store members under `hash ‖ member`, so SCAN's cursor is a position in hash
/// space, as Redis's is: an element present for a whole scan is returned at least once, however
/// the collection changes meanwhile. It must never change (it orders stored data).
pub fn member_hash(member: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in member {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    // Cursors are positive and 0 means "done": keep hashes in [1, 2^63).
    (h >> 1).max(1)
}

/// The subkey of a member in a hashed layout: `tag ‖ u64be(hash) ‖ member`.
pub fn hashed_sub(tag: u8, member: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(9 + member.len());
    s.push(tag);
    s.extend_from_slice(&member_hash(member).to_be_bytes());
    s.extend_from_slice(member);
    s
}

/// The member of a hashed subkey (see [`hashed_sub`]).
pub fn member_of_hashed(sub: &[u8]) -> Result<Bytes> {
    if sub.len() < 9 {
        return Err(Error::Corruption(format!(
            "element key of {} bytes",
            sub.len()
        )));
    }
    Ok(Bytes::copy_from_slice(&sub[9..]))
}

/// The hash position of a hashed subkey.
pub fn hash_of_hashed(sub: &[u8]) -> u64 {
    sub.get(1..9)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_garbage() {
        let m = CollMeta {
            id: 7,
            len: 3,
            head: -2,
            tail: 1,
            big: true,
            field_expiry: true,
        };
        assert_eq!(CollMeta::decode(&m.encode()).unwrap(), m);
        let plain = CollMeta {
            field_expiry: false,
            ..m
        };
        assert_eq!(CollMeta::decode(&plain.encode()).unwrap(), plain);
        // A record written before field expiry existed (flags byte 1) reads as big, no expiry.
        let mut old = m.encode().to_vec();
        old[33] = 1;
        assert_eq!(CollMeta::decode(&old).unwrap(), plain);
        assert!(CollMeta::decode(b"x").is_err());
    }

    #[test]
    fn member_hashes_are_stable_positive_and_spread() {
        // Stored data is ordered by this hash: these values must never change.
        assert_eq!(member_hash(b""), member_hash(b""));
        let a = member_hash(b"a");
        assert!((1..1 << 63).contains(&a));
        assert_ne!(member_hash(b"a"), member_hash(b"b"));
    }
}
