//! Writing replies in RESP2 or RESP3, straight into the connection's output buffer.
//!
//! Replies are encoded as they are produced (no intermediate tree), which keeps the hot path of
//! GET/SET allocation-free. The few shapes that differ between protocol versions (null, maps,
//! sets, doubles) are handled here, so command code never checks the version.

use bytes::{BufMut, BytesMut};
use capdb_types::Reply;

/// The reply side of one connection.
pub struct ReplyWriter {
    pub out: BytesMut,
    pub resp3: bool,
}

impl ReplyWriter {
    pub fn new() -> ReplyWriter {
        ReplyWriter {
            out: BytesMut::with_capacity(16 * 1024),
            resp3: false,
        }
    }

    fn int_line(&mut self, prefix: u8, n: i64) {
        self.out.put_u8(prefix);
        let mut buf = itoa_buf(n);
        self.out.extend_from_slice(buf.as_bytes_mut());
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn simple(&mut self, s: &str) {
        debug_assert!(!s.contains(['\r', '\n']));
        self.out.put_u8(b'+');
        self.out.extend_from_slice(s.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn ok(&mut self) {
        self.out.extend_from_slice(b"+OK\r\n");
    }

    /// An error reply; `msg` starts with its code (`ERR ...`, `WRONGTYPE ...`). Line breaks in
    /// the message are replaced so the reply stays one line.
    pub fn error(&mut self, msg: &str) {
        self.out.put_u8(b'-');
        for b in msg.bytes() {
            self.out
                .put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
        }
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn int(&mut self, n: i64) {
        self.int_line(b':', n);
    }

    pub fn bulk(&mut self, data: &[u8]) {
        self.int_line(b'$', data.len() as i64);
        self.out.extend_from_slice(data);
        self.out.extend_from_slice(b"\r\n");
    }

    /// The null bulk string (`$-1` in RESP2, `_` in RESP3).
    pub fn null(&mut self) {
        if self.resp3 {
            self.out.extend_from_slice(b"_\r\n");
        } else {
            self.out.extend_from_slice(b"$-1\r\n");
        }
    }

    /// The null array (`*-1` in RESP2, `_` in RESP3).
    pub fn null_array(&mut self) {
        if self.resp3 {
            self.out.extend_from_slice(b"_\r\n");
        } else {
            self.out.extend_from_slice(b"*-1\r\n");
        }
    }

    pub fn array(&mut self, len: usize) {
        self.int_line(b'*', len as i64);
    }

    /// A map of `len` pairs (RESP3 `%`, a flat array of 2×len in RESP2).
    pub fn map(&mut self, len: usize) {
        if self.resp3 {
            self.int_line(b'%', len as i64);
        } else {
            self.int_line(b'*', 2 * len as i64);
        }
    }

    /// A set (RESP3 `~`, an array in RESP2).
    pub fn set(&mut self, len: usize) {
        if self.resp3 {
            self.int_line(b'~', len as i64);
        } else {
            self.int_line(b'*', len as i64);
        }
    }

    /// Any [`Reply`], in this connection's protocol version.
    pub fn reply(&mut self, r: &Reply) {
        match r {
            Reply::Ok => self.ok(),
            Reply::Nil => self.null(),
            Reply::Integer(n) => self.int(*n),
            Reply::Bulk(b) => self.bulk(b),
            Reply::Array(items) => {
                self.array(items.len());
                items.iter().for_each(|i| self.reply(i));
            }
            Reply::NilArray => self.null_array(),
            Reply::Map(pairs) => {
                self.map(pairs.len());
                for (k, v) in pairs {
                    self.reply(k);
                    self.reply(v);
                }
            }
            Reply::Set(items) => {
                self.set(items.len());
                items.iter().for_each(|i| self.reply(i));
            }
            Reply::Double(text) => self.double(text),
            Reply::Status(s) => self.simple(s),
            Reply::Pairs(pairs) => {
                if self.resp3 {
                    self.array(pairs.len());
                    for (a, b) in pairs {
                        self.array(2);
                        self.reply(a);
                        self.reply(b);
                    }
                } else {
                    self.array(2 * pairs.len());
                    for (a, b) in pairs {
                        self.reply(a);
                        self.reply(b);
                    }
                }
            }
        }
    }

    /// A double as Redis formatted it (RESP3 `,`, a bulk string in RESP2).
    pub fn double(&mut self, text: &str) {
        if self.resp3 {
            self.out.put_u8(b',');
            self.out.extend_from_slice(text.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }

    /// The header of an out-of-band message of `len` elements (RESP3 push `>`, an array in
    /// RESP2), as pub/sub messages and subscription confirmations are.
    pub fn push(&mut self, len: usize) {
        if self.resp3 {
            self.int_line(b'>', len as i64);
        } else {
            self.int_line(b'*', len as i64);
        }
    }

    /// A verbatim text (RESP3 `=` with format `txt`, a bulk string in RESP2), as INFO uses.
    pub fn verbatim(&mut self, text: &str) {
        if self.resp3 {
            self.int_line(b'=', text.len() as i64 + 4);
            self.out.extend_from_slice(b"txt:");
            self.out.extend_from_slice(text.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }
}

impl Default for ReplyWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Formats an integer without allocating.
struct ItoaBuf {
    buf: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    fn as_bytes_mut(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(n: i64) -> ItoaBuf {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    ItoaBuf { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_nulls_by_version() {
        let mut w = ReplyWriter::new();
        w.int(i64::MIN);
        w.int(0);
        w.null();
        w.resp3 = true;
        w.null();
        w.map(1);
        assert_eq!(
            &w.out[..],
            b":-9223372036854775808\r\n:0\r\n$-1\r\n_\r\n%1\r\n"
        );
    }

    #[test]
    fn errors_stay_on_one_line() {
        let mut w = ReplyWriter::new();
        w.error("ERR bad\r\nthing");
        assert_eq!(&w.out[..], b"-ERR bad  thing\r\n");
    }
}
