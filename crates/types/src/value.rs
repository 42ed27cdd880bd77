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
//!             PN-counter, see `merge.rs`); other bits must be 0
//! 2      8    HLC timestamp
//! 10     8    expiry, Unix milliseconds (0 when the flag is clear)
//! 18     4    CRC-32 (IEEE) of bytes [0..18) ++ payload
//! 22     n    payload
//! ```
//!
//! The checksum covers the header and the payload, so a flipped bit anywhere is caught by
//! [`Value::decode`] and reported as [`Error::Corruption`]: corrupt data is never served.

use bytes::Bytes;

use crate::{Error, Timestamp};

const FORMAT_VERSION: u8 = 1;
const FLAG_TOMBSTONE: u8 = 0b01;
const FLAG_EXPIRES: u8 = 0b10;
const FLAG_COUNTER: u8 = 0b100;
/// Size of the encoded header, including the checksum.
pub const HEADER_LEN: usize = 22;

/// Metadata stored in front of every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// When the write was issued, by the issuing node's hybrid logical clock.
    pub timestamp: Timestamp,
    /// A delete that must replicate (`ap` keyspaces); readers treat it as absent.
    pub tombstone: bool,
    /// Absolute expiry in Unix milliseconds; `None` lives forever.
    pub expire_at_ms: Option<u64>,
    /// The payload is a conflict-free counter (`ap` INCR/DECR), not the user's bytes.
    #[serde(default)]
    pub counter: bool,
}

/// A value with its header, as engines store it and mutations see it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
            },
            data,
        }
    }

    pub fn tombstone(timestamp: Timestamp) -> Value {
        Value {
            header: Header {
                timestamp,
                tombstone: true,
                expire_at_ms: None,
                counter: false,
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
        if flags & !(FLAG_TOMBSTONE | FLAG_EXPIRES | FLAG_COUNTER) != 0 {
            return Err(Error::Corruption(format!(
                "unknown value flags {flags:#04x}"
            )));
        }
        let timestamp = Timestamp(u64::from_le_bytes(raw[2..10].try_into().expect("8 bytes")));
        let expire = u64::from_le_bytes(raw[10..18].try_into().expect("8 bytes"));
        Ok(Value {
            header: Header {
                timestamp,
                tombstone: flags & FLAG_TOMBSTONE != 0,
                expire_at_ms: (flags & FLAG_EXPIRES != 0).then_some(expire),
                counter: flags & FLAG_COUNTER != 0,
            },
            data: Bytes::copy_from_slice(&raw[HEADER_LEN..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trips(data: Vec<u8>, ts: u64, tomb: bool, exp: Option<u64>, counter: bool) {
            let v = Value {
                header: Header { timestamp: Timestamp(ts), tombstone: tomb, expire_at_ms: exp, counter },
                data: Bytes::from(data),
            };
            prop_assert_eq!(Value::decode(&v.encode()).unwrap(), v);
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
