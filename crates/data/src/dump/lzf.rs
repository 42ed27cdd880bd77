//! LZF decompression (Marc Lehmann's format, as Redis's `lzf_d.c` reads it): the compression
//! Redis applies to strings longer than 20 bytes in RDB files and DUMP payloads.
//!
//! The stream is a sequence of instructions, each starting with a control byte `c`:
//!
//! - `c < 32`: a literal run, the next `c + 1` bytes copied as they are;
//! - otherwise a back reference: length `c >> 5` (7 means "add the next byte"), plus 2; offset
//!   `(c & 31) << 8` plus the next byte, plus 1, counted back from the end of the output so far.
//!   The copy may overlap what it produces (a run of one byte repeated), so it goes byte by byte.
//!
//! Every read and write is bounds-checked: a malformed stream is `None`, never a panic, and the
//! output never grows past the length the caller declared (which the caller has bounded).
//! Nothing is reserved for that declared length: the output grows as the stream produces it
//! (from at most [`INITIAL_CAPACITY`] bytes, then doubling), so a short garbage stream that
//! declares a long output allocates about as much as it really produces before it is refused.

/// The output's first allocation, at most: small enough that a stream refused after a few
/// instructions costs next to nothing, large enough that Redis's usual strings (a few KiB) take
/// one allocation.
const INITIAL_CAPACITY: usize = 4096;

/// Decompresses `input` into exactly `out_len` bytes; `None` when the stream is malformed or
/// does not produce exactly `out_len` bytes.
pub fn decompress(input: &[u8], out_len: usize) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(out_len.min(INITIAL_CAPACITY));
    let mut ip = 0;
    while ip < input.len() {
        let ctrl = input[ip] as usize;
        ip += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            let literal = input.get(ip..ip + run)?;
            if out.len() + run > out_len {
                return None;
            }
            out.extend_from_slice(literal);
            ip += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += *input.get(ip)? as usize;
                ip += 1;
            }
            let back = ((ctrl & 0x1f) << 8) + *input.get(ip)? as usize + 1;
            ip += 1;
            len += 2;
            if back > out.len() || out.len() + len > out_len {
                return None;
            }
            let from = out.len() - back;
            for i in 0..len {
                let b = out[from + i];
                out.push(b);
            }
        }
    }
    (out.len() == out_len).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompresses_what_redis_compressed() {
        // redis-server 7.0.15: DUMP of "a" x 59 + "bcabcabcabc" (70 bytes), the LZF part.
        let compressed = [
            0x01, 0x61, 0x61, 0xe0, 0x30, 0x00, 0x01, 0x62, 0x63, 0xa0, 0x02, 0x01, 0x62, 0x63,
        ];
        let want = format!("{}{}", "a".repeat(59), "bcabcabcabc");
        assert_eq!(decompress(&compressed, 70).unwrap(), want.as_bytes());
    }

    #[test]
    fn refuses_malformed_streams() {
        // Wrong declared length, either way.
        assert_eq!(decompress(&[0x01, b'a', b'b'], 3), None);
        assert_eq!(decompress(&[0x01, b'a', b'b'], 1), None);
        // A literal run past the input's end.
        assert_eq!(decompress(&[0x05, b'a'], 6), None);
        // A back reference before the output's start.
        assert_eq!(decompress(&[0x00, b'a', 0x20, 0x05], 4), None);
        // A back reference missing its offset byte, or its length byte.
        assert_eq!(decompress(&[0x00, b'a', 0x20], 4), None);
        assert_eq!(decompress(&[0x00, b'a', 0xe0], 4), None);
        // A back reference that would grow the output past the declared length.
        assert_eq!(decompress(&[0x00, b'a', 0xe0, 0xff, 0x00], 10), None);
        assert_eq!(decompress(&[], 0), Some(Vec::new()));
    }

    #[test]
    fn a_garbage_stream_reserves_nothing_for_its_declared_length() {
        // 3 MiB of garbage declaring 256 MiB of output: a back reference before the start on
        // the first instruction. The declared length is never reserved.
        let mut garbage = vec![0x00, b'a'];
        garbage.resize(3 << 20, 0xff);
        assert_eq!(decompress(&garbage, 256 << 20), None);
        // A valid stream still grows past the first allocation: 1 literal, then back
        // references of 264 bytes, 26,401 bytes in all.
        let mut stream = vec![0x00, b'a'];
        for _ in 0..100 {
            stream.extend_from_slice(&[0xe0, 0xff, 0x00]);
        }
        let out = decompress(&stream, 26_401).unwrap();
        assert!(out.len() == 26_401 && out.iter().all(|&c| c == b'a'));
        // The first allocation is bounded whatever the declared length; a stream that stops
        // short of it is refused.
        assert_eq!(decompress(&stream, usize::MAX), None);
    }
}
