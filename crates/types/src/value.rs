//! A stored value: a small header plus the user's bytes, and its checksummed on-disk encoding.
//!
//! The header is the one choice that serves every mode (see DESIGN.md): the HLC timestamp orders
//! writes for last-writer-wins in `ap` keyspaces and change streams, the tombstone flag lets `ap`
//! deletes replicate, and the expiry gives Redis TTL semantics in every mode.
//!
//! # Encoding (version 1), all integers little-endian
//!
//! ```text
//! offset size field
//! 0      1    format version (1)
//! 1      1    flags: bit 0 = tombstone, bit 1 = has expiry, bit 2 = counter (the payload is a
//!             PN-counter, see `merge.rs`), bits 3-5 = the value's kind ([`ValueKind`]: 0 is a
//!             string, so every record written before kinds existed reads as one); bits 6-7
//!             must be 0
//! 2      8    HLC timestamp
//! 10     8    expiry, Unix milliseconds (0 when the flag is clear)
//! 18     4    CRC-32 (IEEE) of bytes [0..18) ++ payload
//! 22     n    payload
//! ```
//!
//! The checksum covers the header and the payload, so a flipped bit anywhere is caught by
//! [`Value::decode`] and reported as [`Error::Corruption`]: corrupt data is never served.
//!
//! # Serde
//!
//! Messages and hint records carry a value as these same bytes (one byte string), not as a
//! derived structure: header changes then never change a serde shape (postcard is not
//! self-describing, so an added field would silently misread older records), and a value is
//! checksummed on the wire too.

use bytes::Bytes;

use crate::{Error, Timestamp};

const FORMAT_VERSION: u8 = 1;
const FLAG_TOMBSTONE: u8 = 0b01;
const FLAG_EXPIRES: u8 = 0b10;
const FLAG_COUNTER: u8 = 0b100;
const KIND_SHIFT: u8 = 3;
const KIND_MASK: u8 = 0b111 << KIND_SHIFT;
/// Size of the encoded header, including the checksum.
pub const HEADER_LEN: usize = 22;

/// What a key holds, as Redis's `TYPE` names it. A collection's top-level record (its *meta
/// record*, see `capdb-data`) carries the collection's kind; its elements live in a separate
/// element table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(u8)]
pub enum ValueKind {
    #[default]
    String = 0,
    Hash = 1,
    List = 2,
    Set = 3,
    ZSet = 4,
}

impl ValueKind {
    /// The name `TYPE` answers.
    pub fn type_name(self) -> &'static str {
        match self {
            ValueKind::String => "string",
            ValueKind::Hash => "hash",
            ValueKind::List => "list",
            ValueKind::Set => "set",
            ValueKind::ZSet => "zset",
        }
    }

    pub(crate) fn from_bits(bits: u8) -> Option<ValueKind> {
        Some(match bits {
            0 => ValueKind::String,
            1 => ValueKind::Hash,
            2 => ValueKind::List,
            3 => ValueKind::Set,
            4 => ValueKind::ZSet,
            _ => return None,
        })
    }
}

/// Metadata stored in front of every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// When the write was issued, by the issuing node's hybrid logical clock.
    pub timestamp: Timestamp,
    /// A delete that must replicate (`ap` keyspaces); readers treat it as absent.
    pub tombstone: bool,
    /// Absolute expiry in Unix milliseconds; `None` lives forever.
    pub expire_at_ms: Option<u64>,
    /// The payload is a conflict-free counter (`ap` INCR/DECR), not the user's bytes.
    pub counter: bool,
    /// What the key holds; a collection's payload is its meta record.
    pub kind: ValueKind,
}

/// A value with its header, as engines store it and mutations see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Value {
    pub header: Header,
    pub data: Bytes,
}

impl Value {
    pub fn new(data: Bytes, timestamp: Timestamp, expire_at_ms: Option<u64>) -> Value {
        Value {
            header: Header {
                timestamp,
                tombstone: false,
                expire_at_ms,
                counter: false,
                kind: ValueKind::String,
            },
            data,
        }
    }

    /// A value of `kind` (a collection's meta record when not a string).
    pub fn of_kind(
        kind: ValueKind,
        data: Bytes,
        timestamp: Timestamp,
        expire_at_ms: Option<u64>,
    ) -> Value {
        let mut v = Value::new(data, timestamp, expire_at_ms);
        v.header.kind = kind;
        v
    }

    /// Whether the key holds a string (every value written before kinds existed does).
    pub fn is_string(&self) -> bool {
        self.header.kind == ValueKind::String
    }

    pub fn tombstone(timestamp: Timestamp) -> Value {
        Value {
            header: Header {
                timestamp,
                tombstone: true,
                expire_at_ms: None,
                counter: false,
                kind: ValueKind::String,
            },
            data: Bytes::new(),
        }
    }

    /// Whether the value has expired at `now_ms` (Redis semantics: expired at the deadline).
    pub fn is_expired(&self, now_ms: u64) -> bool {
        matches!(self.header.expire_at_ms, Some(at) if at <= now_ms)
    }

    /// Whether a reader at `now_ms` sees this value (not a tombstone, not expired).
    pub fn is_live(&self, now_ms: u64) -> bool {
        !self.header.tombstone && !self.is_expired(now_ms)
    }

    /// Bytes this value occupies when encoded.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Encodes the value with its header and checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        let mut flags = 0;
        if self.header.tombstone {
            flags |= FLAG_TOMBSTONE;
        }
        if self.header.expire_at_ms.is_some() {
            flags |= FLAG_EXPIRES;
        }
        if self.header.counter {
            flags |= FLAG_COUNTER;
        }
        flags |= (self.header.kind as u8) << KIND_SHIFT;
        out.push(FORMAT_VERSION);
        out.push(flags);
        out.extend_from_slice(&self.header.timestamp.0.to_le_bytes());
        out.extend_from_slice(&self.header.expire_at_ms.unwrap_or(0).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[..18]);
        crc.update(&self.data);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&self.data);
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }

    /// Decodes and verifies a value written by [`Value::encode`].
    pub fn decode(raw: &[u8]) -> Result<Value, Error> {
        if raw.len() < HEADER_LEN {
            return Err(Error::Corruption(format!(
                "value record is {} bytes, shorter than its {HEADER_LEN}-byte header",
                raw.len()
            )));
        }
        let stored_crc = u32::from_le_bytes(raw[18..22].try_into().expect("4 bytes"));
        let mut crc = crc32fast::Hasher::new();
        crc.update(&raw[..18]);
        crc.update(&raw[HEADER_LEN..]);
        let computed = crc.finalize();
        if stored_crc != computed {
            return Err(Error::Corruption(format!(
                "value checksum mismatch (stored {stored_crc:08x}, computed {computed:08x})"
            )));
        }
        if raw[0] != FORMAT_VERSION {
            return Err(Error::Corruption(format!(
                "unknown value format version {}",
                raw[0]
            )));
        }
        let flags = raw[1];
        let kind = ValueKind::from_bits((flags & KIND_MASK) >> KIND_SHIFT);
        let Some(kind) = kind
            .filter(|_| flags & !(FLAG_TOMBSTONE | FLAG_EXPIRES | FLAG_COUNTER | KIND_MASK) == 0)
        else {
            return Err(Error::Corruption(format!(
                "unknown value flags {flags:#04x}"
            )));
        };
        let timestamp = Timestamp(u64::from_le_bytes(raw[2..10].try_into().expect("8 bytes")));
        let expire = u64::from_le_bytes(raw[10..18].try_into().expect("8 bytes"));
        Ok(Value {
            header: Header {
                timestamp,
                tombstone: flags & FLAG_TOMBSTONE != 0,
                expire_at_ms: (flags & FLAG_EXPIRES != 0).then_some(expire),
                counter: flags & FLAG_COUNTER != 0,
                kind,
            },
            data: Bytes::copy_from_slice(&raw[HEADER_LEN..]),
        })
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.encode())
    }
}

impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct Encoded;
        impl<'v> serde::de::Visitor<'v> for Encoded {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an encoded value")
            }
            fn visit_bytes<E: serde::de::Error>(self, raw: &[u8]) -> Result<Value, E> {
                Value::decode(raw).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'v>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut raw = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    raw.push(b);
                }
                Value::decode(&raw).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_bytes(Encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trips(data: Vec<u8>, ts: u64, tomb: bool, exp: Option<u64>, counter: bool, kind in 0u8..5) {
            let kind = ValueKind::from_bits(kind).unwrap();
            let v = Value {
                header: Header { timestamp: Timestamp(ts), tombstone: tomb, expire_at_ms: exp, counter, kind },
                data: Bytes::from(data),
            };
            prop_assert_eq!(Value::decode(&v.encode()).unwrap(), v.clone());
            let wire = postcard::to_stdvec(&v).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Value>(&wire).unwrap(), v.clone());
            let json = serde_json_like(&v);
            prop_assert_eq!(json, v);
        }

        #[test]
        fn any_single_bit_flip_is_detected(data: Vec<u8>, ts: u64, bit in 0usize..10_000) {
            let v = Value::new(Bytes::from(data), Timestamp(ts), Some(42));
            let mut raw = v.encode();
            let bit = bit % (raw.len() * 8);
            raw[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(matches!(Value::decode(&raw), Err(Error::Corruption(_))));
        }
    }

    /// A round trip through a serializer that writes bytes as a sequence (as JSON does).
    fn serde_json_like(v: &Value) -> Value {
        let d: serde::de::value::SeqDeserializer<_, serde::de::value::Error> =
            serde::de::value::SeqDeserializer::new(v.encode().into_iter());
        <Value as serde::Deserialize>::deserialize(d).unwrap()
    }

    #[test]
    fn a_record_written_before_kinds_reads_as_a_string_and_unknown_kinds_are_corruption() {
        let v = Value::new(Bytes::from_static(b"x"), Timestamp(1), None);
        let raw = v.encode();
        assert_eq!(
            raw[1], 0,
            "a string's flags are what they were before kinds"
        );
        assert_eq!(Value::decode(&raw).unwrap().header.kind, ValueKind::String);
        let hash = Value::of_kind(ValueKind::Hash, Bytes::new(), Timestamp(1), None);
        assert_eq!(
            Value::decode(&hash.encode()).unwrap().header.kind,
            ValueKind::Hash
        );
        let mut bad = hash.encode();
        bad[1] = 7 << KIND_SHIFT;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bad[..18]);
        crc.update(&bad[HEADER_LEN..]);
        bad[18..22].copy_from_slice(&crc.finalize().to_le_bytes());
        assert!(matches!(Value::decode(&bad), Err(Error::Corruption(_))));
    }

    #[test]
    fn truncated_record_is_corruption() {
        assert!(matches!(
            Value::decode(&[1, 0, 0]),
            Err(Error::Corruption(_))
        ));
    }

    #[test]
    fn expiry_is_inclusive_of_the_deadline() {
        let v = Value::new(Bytes::from_static(b"x"), Timestamp(1), Some(100));
        assert!(!v.is_expired(99));
        assert!(v.is_expired(100));
        assert!(!v.is_live(100));
    }
}
