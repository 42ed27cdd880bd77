//! RESP2/RESP3 frames as raw bytes: a scanner that finds where one reply ends, and a tree view
//! of it for the comparison classes that must look inside (unordered, random).
//!
//! Replies are compared as the bytes the server wrote, so the scanner never re-encodes: a
//! [`Frame`] keeps the byte range of every node, and [`Frame::raw`] of the root is exactly what
//! came off the wire.

/// One reply, parsed: its type byte, its scalar text (`+`, `-`, `:`, `$`, `,`, `#`, `(`, `!`,
/// `=`: the payload; aggregates: empty), its children (`*`, `%`, `~`, `>`, `|`: a map's keys and
/// values alternate), and its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub text: Vec<u8>,
    pub children: Vec<Frame>,
    /// `$-1`, `*-1` and `_`.
    pub null: bool,
    pub raw: Vec<u8>,
}

impl Frame {
    pub fn is_error(&self) -> bool {
        self.kind == b'-' || self.kind == b'!'
    }

    pub fn is_aggregate(&self) -> bool {
        matches!(self.kind, b'*' | b'%' | b'~' | b'>' | b'|')
    }

    /// An integer reply's value.
    pub fn int(&self) -> Option<i64> {
        (self.kind == b':')
            .then(|| std::str::from_utf8(&self.text).ok()?.parse().ok())
            .flatten()
    }
}

/// Why a buffer does not hold a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanError {
    /// More bytes are needed.
    Incomplete,
    /// Not RESP: the server wrote something this scanner cannot frame.
    Invalid(String),
}

/// Parses one frame at the start of `buf`: the frame and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<(Frame, usize), ScanError> {
    let mut at = 0;
    let f = parse_at(buf, &mut at, 0)?;
    Ok((f, at))
}

fn line(buf: &[u8], at: &mut usize) -> Result<Vec<u8>, ScanError> {
    let rest = &buf[*at..];
    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Err(ScanError::Incomplete);
    };
    let l = rest[..end].to_vec();
    *at += end + 2;
    Ok(l)
}

fn number(text: &[u8]) -> Result<i64, ScanError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ScanError::Invalid(format!("bad length {:?}", String::from_utf8_lossy(text)))
        })
}

fn parse_at(buf: &[u8], at: &mut usize, depth: usize) -> Result<Frame, ScanError> {
    if depth > 64 {
        return Err(ScanError::Invalid("nested deeper than 64".into()));
    }
    let start = *at;
    let Some(&kind) = buf.get(*at) else {
        return Err(ScanError::Incomplete);
    };
    *at += 1;
    let head = line(buf, at)?;
    let mut frame = Frame {
        kind,
        text: Vec::new(),
        children: Vec::new(),
        null: false,
        raw: Vec::new(),
    };
    match kind {
        b'+' | b'-' | b':' | b',' | b'#' | b'(' => frame.text = head,
        b'_' => frame.null = true,
        b'$' | b'!' | b'=' => {
            let n = number(&head)?;
            if n < 0 {
                frame.null = true;
            } else {
                let n = n as usize;
                if buf.len() < *at + n + 2 {
                    return Err(ScanError::Incomplete);
                }
                frame.text = buf[*at..*at + n].to_vec();
                if &buf[*at + n..*at + n + 2] != b"\r\n" {
                    return Err(ScanError::Invalid(
                        "bulk string not followed by CRLF".into(),
                    ));
                }
                *at += n + 2;
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = number(&head)?;
            if n < 0 {
                frame.null = true;
            } else {
                let items = if matches!(kind, b'%' | b'|') {
                    2 * n
                } else {
                    n
                };
                for _ in 0..items {
                    frame.children.push(parse_at(buf, at, depth + 1)?);
                }
            }
        }
        other => {
            return Err(ScanError::Invalid(format!(
                "unknown type byte {:?}",
                other as char
            )));
        }
    }
    frame.raw = buf[start..*at].to_vec();
    Ok(frame)
}

/// Bytes as a readable, unambiguous string: printable ASCII as is, `\r`, `\n`, `\t`, `\\`,
/// `\"` and `\xNN` for the rest.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// A command as one line: each argument quoted and escaped (`"SET" "k" "\x00"`).
pub fn command_line(args: &[Vec<u8>]) -> String {
    args.iter()
        .map(|a| format!("\"{}\"", escape(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The request frame of a command (an array of bulk strings).
pub fn encode(args: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_whole_and_kept_raw() {
        let wire = b"*2\r\n$1\r\na\r\n%1\r\n+k\r\n:5\r\n_\r\n";
        let (f, n) = parse(wire).unwrap();
        assert_eq!(n, wire.len() - 3);
        assert_eq!(f.raw, &wire[..n]);
        assert_eq!(f.children[1].children[1].int(), Some(5));
        assert_eq!(parse(&wire[..6]), Err(ScanError::Incomplete));
        let (null, _) = parse(b"_\r\n").unwrap();
        assert!(null.null);
        assert!(matches!(parse(b"?x\r\n"), Err(ScanError::Invalid(_))));
    }

    #[test]
    fn escaping_is_unambiguous() {
        assert_eq!(escape(b"a\x00\"\r\n"), "a\\x00\\\"\\r\\n");
        assert_eq!(
            command_line(&[b"SET".to_vec(), b"k".to_vec()]),
            "\"SET\" \"k\""
        );
    }
}
