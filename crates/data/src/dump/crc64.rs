//! Redis's CRC-64 (`src/crc64.c`): the Jones polynomial `0xad93d23594c935a9`, reflected input
//! and output, initial value 0, no final xor. It seals every DUMP payload (and RDB file).
//!
//! A byte-at-a-time table, built at compile time: DUMP and RESTORE checksum one payload each,
//! so the slicing-by-8 tables Redis uses for whole RDB files would buy nothing here.

/// The Jones polynomial, bit-reversed (the form a reflected CRC shifts right with).
const POLY_REFLECTED: u64 = 0x95ac_9329_ac4b_c9b5;

const TABLE: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY_REFLECTED
            } else {
                crc >> 1
            };
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

const _: () = assert!(POLY_REFLECTED == 0xad93_d235_94c9_35a9_u64.reverse_bits());

/// Continues `crc` over `bytes` (`crc64(0, data)` is Redis's `crc64(0, data, len)`).
pub fn crc64(mut crc: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        crc = TABLE[((crc ^ b as u64) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_redis_test_vector() {
        // redis/src/crc64.c's own test: crc64(0, "123456789", 9) == 0xe9c6d914c4b8d9ca.
        assert_eq!(crc64(0, b"123456789"), 0xe9c6_d914_c4b8_d9ca);
        assert_eq!(crc64(0, b""), 0);
        // Continuing over a split input gives the same result.
        assert_eq!(crc64(crc64(0, b"1234"), b"56789"), 0xe9c6_d914_c4b8_d9ca);
    }
}
