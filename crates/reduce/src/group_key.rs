//! A group's canonical bytes ([`crate::extract::Scalar::encode`] of each part) as the key of
//! a partial result's table.
//!
//! # Why not `Vec<u8>`
//!
//! A job grouping by a field with a million values hashes, compares and sorts a million keys
//! on every task and again where the tasks' outputs merge (issue 15's J2). As `Vec<u8>` each
//! key is an allocation, its hash goes through the byte-slice path and each comparison is a
//! `memcmp` call: together most of such a job's time. Almost every group is short (a number
//! is 17 bytes, a word 7 plus its letters), so a key of up to [`INLINE_MAX`] bytes is held
//! inline, zero-padded, with its length in the last byte: equality, hashing and ordering then
//! work on a few machine words, and only longer keys live on the heap.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

/// The longest key held inline.
pub const INLINE_MAX: usize = 23;

/// A group's key. Ordered as its bytes are (shorter first when one is a prefix of the other),
/// which is the order partials are stored in.
#[derive(Clone)]
pub struct GroupKey(Repr);

#[derive(Clone)]
enum Repr {
    /// `bytes[..len]` is the key, the rest zero, and `bytes[INLINE_MAX] == len`.
    Inline([u8; INLINE_MAX + 1]),
    /// Longer than [`INLINE_MAX`] (so never equal to an inline key).
    Heap(Box<[u8]>),
}

impl GroupKey {
    pub fn new(bytes: &[u8]) -> GroupKey {
        if bytes.len() <= INLINE_MAX {
            let mut inline = [0u8; INLINE_MAX + 1];
            inline[..bytes.len()].copy_from_slice(bytes);
            inline[INLINE_MAX] = bytes.len() as u8;
            GroupKey(Repr::Inline(inline))
        } else {
            GroupKey(Repr::Heap(bytes.into()))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline(b) => &b[..usize::from(b[INLINE_MAX])],
            Repr::Heap(b) => b,
        }
    }
}

impl From<&[u8]> for GroupKey {
    fn from(bytes: &[u8]) -> GroupKey {
        GroupKey::new(bytes)
    }
}

/// Three big-endian words of an inline key: comparing them in turn compares the padded
/// bytes, then the length.
fn words(b: &[u8; INLINE_MAX + 1]) -> [u64; 3] {
    let w = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_be_bytes(x)
    };
    [w(0), w(1), w(2)]
}

impl PartialEq for GroupKey {
    fn eq(&self, other: &GroupKey) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline(a), Repr::Inline(b)) => a == b,
            (Repr::Heap(a), Repr::Heap(b)) => a == b,
            // Inline keys are shorter than heap keys.
            _ => false,
        }
    }
}

impl Eq for GroupKey {}

impl Hash for GroupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match &self.0 {
            Repr::Inline(b) => {
                for w in words(b) {
                    state.write_u64(w);
                }
            }
            Repr::Heap(b) => state.write(b),
        }
    }
}

impl Ord for GroupKey {
    fn cmp(&self, other: &GroupKey) -> Ordering {
        match (&self.0, &other.0) {
            // Padding with zeros keeps the bytes' order: where one key is a prefix of the
            // other, the longer one's next bytes are ≥ the zeros, and equal padded bytes
            // leave the length (the last byte) to decide.
            (Repr::Inline(a), Repr::Inline(b)) => words(a).cmp(&words(b)),
            _ => self.as_bytes().cmp(other.as_bytes()),
        }
    }
}

impl PartialOrd for GroupKey {
    fn partial_cmp(&self, other: &GroupKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Read from a byte string as [`crate::partial::Partial::encode`] writes it, straight into
/// the key (no `Vec` on the way).
/// Written as a byte string: the bytes a `Vec<u8>` of the same key gives in postcard (its
/// length, then the bytes), so a stored form may hold either.
impl serde::Serialize for GroupKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> serde::Deserialize<'de> for GroupKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GroupKey, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = GroupKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a group's bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<GroupKey, E> {
                Ok(GroupKey::new(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<GroupKey, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(GroupKey::new(&v))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupKey({:?})", self.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys around the inline bound, with zero bytes where padding is, and prefixes of each
    /// other: every pair must compare and be equal as their bytes are.
    #[test]
    fn keys_order_and_compare_as_their_bytes_do() {
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        for len in [1usize, 2, 16, 17, 22, 23, 24, 25, 40] {
            keys.push(vec![0; len]);
            keys.push(vec![7; len]);
            let mut v = vec![0; len];
            v[len - 1] = 1;
            keys.push(v);
            keys.push((0..len as u8).collect());
            keys.push((0..len as u8).rev().collect());
            keys.push(vec![255; len]);
        }
        for a in &keys {
            let ka = GroupKey::new(a);
            assert_eq!(ka.as_bytes(), &a[..]);
            for b in &keys {
                let kb = GroupKey::new(b);
                assert_eq!(ka.cmp(&kb), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(ka == kb, a == b, "{a:?} vs {b:?}");
            }
        }
    }

    /// Stored forms written with `Vec<u8>` groups (partials, views' unfolded changes) read
    /// as keys, and keys write the same bytes.
    #[test]
    fn a_key_is_stored_as_its_bytes_in_a_vec_are() {
        for len in [0usize, 1, 23, 24, 300] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let as_vec = postcard::to_allocvec(&(7u8, bytes.clone(), 9i64)).unwrap();
            let as_key = postcard::to_allocvec(&(7u8, GroupKey::new(&bytes), 9i64)).unwrap();
            assert_eq!(as_key, as_vec, "{len} bytes");
            let back: (u8, GroupKey, i64) = postcard::from_bytes(&as_vec).unwrap();
            assert_eq!(back.1.as_bytes(), &bytes[..]);
        }
    }

    #[test]
    fn equal_keys_hash_alike() {
        use std::hash::BuildHasher;
        let s = foldhash::fast::FixedState::default();
        for len in [0usize, 5, 23, 24, 30] {
            let bytes: Vec<u8> = (0..len as u8).collect();
            assert_eq!(
                s.hash_one(GroupKey::new(&bytes)),
                s.hash_one(GroupKey::new(&bytes.clone()))
            );
        }
    }
}
