//! Parsing client requests from the RESP wire format.
//!
//! Clients send commands as RESP arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), or,
//! from a terminal (`nc`, `telnet`), as an *inline* line of space-separated words (`GET k\r\n`).
//! Redis accepts exactly these two shapes from clients and so do we; any other type byte is a
//! protocol error, after which the connection is closed (the stream can no longer be trusted).
//!
//! The parser is a pure function over a byte slice: it returns the command's argument ranges and
//! how many bytes it used, or `Incomplete` to wait for more. It never allocates in proportion to
//! a *declared* length (only to bytes actually received) and rejects declared sizes above the
//! configured limits before buffering them, so a hostile client cannot make the server allocate.

use capdb_types::limits::FRAME_ELEMENTS_MAX;

/// Longest inline command line (Redis `PROTO_INLINE_MAX_SIZE`).
pub const INLINE_BYTES_MAX: usize = 64 * 1024;
/// Longest `*<n>` or `$<n>` header line.
const HEADER_LINE_MAX: usize = 32;

/// Why a request could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// More bytes are needed.
    Incomplete,
    /// The stream is not valid RESP; reply with this message and close the connection.
    Protocol(String),
}

/// A parsed command: argument byte ranges into the parsed buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub args: Vec<(usize, usize)>,
    /// An inline command whose words had quotes or escapes: the decoded words (then `args` is
    /// empty). Plain inline words and multibulk arguments are ranges of the buffer instead.
    pub decoded: Option<Vec<Vec<u8>>>,
    /// Bytes of the buffer the command occupied.
    pub consumed: usize,
}

/// Longest bulk string Redis accepts at all (`proto-max-bulk-len`); longer declared lengths
/// are "invalid", as in Redis, while lengths between the frame limit and this one are refused
/// with the frame limit's own message.
const REDIS_BULK_BYTES_MAX: i64 = 512 * 1024 * 1024;
/// Before authentication (when a password is required), Redis accepts at most this many
/// arguments per command and this long a bulk string.
pub const UNAUTHENTICATED_ARGS_MAX: i64 = 10;
pub const UNAUTHENTICATED_BULK_BYTES_MAX: i64 = 16 * 1024;

fn protocol(msg: impl Into<String>) -> ParseError {
    ParseError::Protocol(format!("Protocol error: {}", msg.into()))
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
fn find_crlf(buf: &[u8], from: usize, max_len: usize) -> Result<usize, ParseError> {
    let window_end = buf.len().min(from.saturating_add(max_len + 2));
    match buf[from..window_end].windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(from + i),
        None if buf.len() - from > max_len + 1 => Err(protocol("header line too long")),
        None => Err(ParseError::Incomplete),
    }
}

fn parse_len(line: &[u8], what: &str) -> Result<i64, ParseError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| protocol(format!("invalid {what} length")))
}

/// Parses one command from the front of `buf`.
///
/// `frame_bytes_max` bounds the whole command (the sum of its bulk lengths).
/// `unauthenticated`: the client must still authenticate, so only small commands are read
/// (Redis's bounds, so a stranger cannot make the server buffer much).
pub fn parse_command(
    buf: &[u8],
    frame_bytes_max: usize,
    unauthenticated: bool,
) -> Result<Parsed, ParseError> {
    match buf.first() {
        None => Err(ParseError::Incomplete),
        Some(b'*') => parse_multibulk(buf, frame_bytes_max, unauthenticated),
        Some(_) => parse_inline(buf),
    }
}

fn parse_multibulk(
    buf: &[u8],
    frame_bytes_max: usize,
    unauthenticated: bool,
) -> Result<Parsed, ParseError> {
    let end = find_crlf(buf, 1, HEADER_LINE_MAX)?;
    let count = parse_len(&buf[1..end], "multibulk")?;
    if count > FRAME_ELEMENTS_MAX as i64 {
        return Err(protocol("invalid multibulk length"));
    }
    if unauthenticated && count > UNAUTHENTICATED_ARGS_MAX {
        return Err(protocol("unauthenticated multibulk length"));
    }
    let mut pos = end + 2;
    if count <= 0 {
        // `*0` / `*-1`: an empty command, ignored as Redis does.
        return Ok(Parsed {
            args: Vec::new(),
            decoded: None,
            consumed: pos,
        });
    }
    // Capacity bounded by what can actually be present in the buffer (each bulk >= 4 bytes).
    let mut args = Vec::with_capacity((count as usize).min((buf.len() - pos) / 4 + 1));
    let mut total = 0usize;
    for _ in 0..count {
        match buf.get(pos) {
            None => return Err(ParseError::Incomplete),
            Some(b'$') => {}
            Some(&other) => {
                return Err(protocol(format!(
                    "expected '$', got '{}'",
                    (other as char).escape_default()
                )));
            }
        }
        let line_end = find_crlf(buf, pos + 1, HEADER_LINE_MAX)?;
        let len = parse_len(&buf[pos + 1..line_end], "bulk")?;
        if !(0..=REDIS_BULK_BYTES_MAX).contains(&len) {
            return Err(protocol("invalid bulk length"));
        }
        if unauthenticated && len > UNAUTHENTICATED_BULK_BYTES_MAX {
            return Err(protocol("unauthenticated bulk length"));
        }
        let len = len as usize;
        total = total.saturating_add(len);
        if len > frame_bytes_max || total > frame_bytes_max {
            return Err(protocol(format!(
                "command larger than the {frame_bytes_max}-byte frame limit"
            )));
        }
        let start = line_end + 2;
        let stop = start + len;
        if buf.len() < stop + 2 {
            return Err(ParseError::Incomplete);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(protocol("bulk string not terminated by CRLF"));
        }
        args.push((start, stop));
        pos = stop + 2;
    }
    Ok(Parsed {
        args,
        decoded: None,
        consumed: pos,
    })
}

fn parse_inline(buf: &[u8]) -> Result<Parsed, ParseError> {
    let Some(nl) = buf
        .iter()
        .take(INLINE_BYTES_MAX + 1)
        .position(|&b| b == b'\n')
    else {
        return if buf.len() > INLINE_BYTES_MAX {
            Err(protocol("too big inline request"))
        } else {
            Err(ParseError::Incomplete)
        };
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let line = &buf[..line_end];
    if line.iter().any(|&b| b == b'"' || b == b'\'' || b == 0) {
        return Ok(Parsed {
            args: Vec::new(),
            decoded: Some(split_quoted(line)?),
            consumed: nl + 1,
        });
    }
    let mut args = Vec::new();
    let mut i = 0;
    while i < line_end {
        while i < line_end && is_space(buf[i]) {
            i += 1;
        }
        let start = i;
        while i < line_end && !is_space(buf[i]) {
            i += 1;
        }
        if i > start {
            args.push((start, i));
        }
    }
    Ok(Parsed {
        args,
        decoded: None,
        consumed: nl + 1,
    })
}

/// C's `isspace`, which Redis's inline parser splits on.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Splits an inline line with quotes the way Redis does (`sdssplitargs`): `"..."` with the
/// escapes `\n \r \t \b \a \xHH` and `\<any>`, `'...'` with `\'` only; a closing quote must
/// end the word; quotes may start mid-word. Anything else is "unbalanced quotes".
fn split_quoted(line: &[u8]) -> Result<Vec<Vec<u8>>, ParseError> {
    // Redis splits a C string: a NUL byte ends the line.
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    let unbalanced = || protocol("unbalanced quotes in request");
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut words = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Ok(words);
        }
        let (mut in_double, mut in_single) = (false, false);
        let mut word = Vec::new();
        loop {
            let c = line.get(p).copied();
            let next = line.get(p + 1).copied();
            if in_double {
                let c = c.ok_or_else(unbalanced)?;
                match (c, next) {
                    (b'\\', Some(b'x'))
                        if line.get(p + 2).and_then(|&h| hex(h)).is_some()
                            && line.get(p + 3).and_then(|&h| hex(h)).is_some() =>
                    {
                        let hi = hex(line[p + 2]).unwrap_or(0);
                        let lo = hex(line[p + 3]).unwrap_or(0);
                        word.push(hi * 16 + lo);
                        p += 3;
                    }
                    (b'\\', Some(e)) => {
                        word.push(match e {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                        p += 1;
                    }
                    (b'"', next) => {
                        if next.is_some_and(|n| !is_space(n)) {
                            return Err(unbalanced());
                        }
                        p += 1;
                        break;
                    }
                    (c, _) => word.push(c),
                }
            } else if in_single {
                let c = c.ok_or_else(unbalanced)?;
                match (c, next) {
                    (b'\\', Some(b'\'')) => {
                        word.push(b'\'');
                        p += 1;
                    }
                    (b'\'', next) => {
                        if next.is_some_and(|n| !is_space(n)) {
                            return Err(unbalanced());
                        }
                        p += 1;
                        break;
                    }
                    (c, _) => word.push(c),
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t' | 0) => break,
                    Some(b'"') => in_double = true,
                    Some(b'\'') => in_single = true,
                    Some(c) => word.push(c),
                }
            }
            p += 1;
        }
        words.push(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn args<'a>(buf: &'a [u8], p: &Parsed) -> Vec<&'a [u8]> {
        p.args.iter().map(|&(s, e)| &buf[s..e]).collect()
    }

    fn encode(cmd: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", cmd.len()).into_bytes();
        for a in cmd {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn multibulk_and_inline() {
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        let p = parse_command(buf, MAX, false).unwrap();
        assert_eq!(args(buf, &p), vec![&b"GET"[..], b"k"]);
        let rest = &buf[p.consumed..];
        let p2 = parse_command(rest, MAX, false).unwrap();
        assert_eq!(args(rest, &p2), vec![&b"PING"[..]]);
        assert_eq!(p2.consumed, rest.len());
    }

    #[test]
    fn truncated_frames_are_incomplete() {
        let full = b"*2\r\n$3\r\nSET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_command(&full[..cut], MAX, false),
                Err(ParseError::Incomplete),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        for bad in [
            &b"*1\r\n:3\r\n"[..],
            b"*x\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*99999999999\r\n",
        ] {
            assert!(
                matches!(parse_command(bad, MAX, false), Err(ParseError::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    fn inline_words(line: &[u8]) -> Result<Vec<Vec<u8>>, ParseError> {
        let p = parse_command(line, MAX, false)?;
        Ok(match p.decoded {
            Some(words) => words,
            None => args(line, &p).into_iter().map(|a| a.to_vec()).collect(),
        })
    }

    #[test]
    fn inline_quotes_and_escapes_split_as_redis_does() {
        let words = |w: &[&[u8]]| Ok(w.iter().map(|x| x.to_vec()).collect::<Vec<_>>());
        assert_eq!(inline_words(b"set k v\r\n"), words(&[b"set", b"k", b"v"]));
        assert_eq!(
            inline_words(b"set \"a b\" 'c d'\r\n"),
            words(&[b"set", b"a b", b"c d"])
        );
        assert_eq!(
            inline_words(b"echo \"a\\x41\\n\\\"\"\r\n"),
            words(&[b"echo", b"aA\n\""])
        );
        assert_eq!(inline_words(b"echo 'it\\'s'\n"), words(&[b"echo", b"it's"]));
        assert_eq!(inline_words(b"echo a\"b c\"\n"), words(&[b"echo", b"ab c"]));
        assert_eq!(inline_words(b"echo \"\"\n"), words(&[b"echo", b""]));
        // A NUL ends the line, as in Redis's C-string splitter.
        assert_eq!(inline_words(b"echo a\0b c\n"), words(&[b"echo", b"a"]));
        for bad in [
            &b"set \"\"\"k\"\"\" v\r\n"[..],
            b"set \"k v\r\n",
            b"set 'k v\r\n",
            b"set \"a\"b v\r\n",
        ] {
            assert_eq!(
                inline_words(bad),
                Err(ParseError::Protocol(
                    "Protocol error: unbalanced quotes in request".into()
                )),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn before_authentication_only_small_commands_are_read() {
        let many = b"*11\r\n";
        assert_eq!(
            parse_command(many, MAX, true),
            Err(ParseError::Protocol(
                "Protocol error: unauthenticated multibulk length".into()
            ))
        );
        assert_eq!(parse_command(many, MAX, false), Err(ParseError::Incomplete));
        let long = b"*1\r\n$16385\r\n";
        assert_eq!(
            parse_command(long, MAX, true),
            Err(ParseError::Protocol(
                "Protocol error: unauthenticated bulk length".into()
            ))
        );
    }

    #[test]
    fn bulk_lengths_beyond_what_redis_accepts_are_invalid() {
        assert_eq!(
            parse_command(b"*1\r\n$2000000000\r\n", MAX, false),
            Err(ParseError::Protocol(
                "Protocol error: invalid bulk length".into()
            ))
        );
    }

    #[test]
    fn declared_sizes_over_the_limit_are_refused_before_buffering() {
        let r = parse_command(b"*1\r\n$2000000\r\n", MAX, false);
        assert!(matches!(r, Err(ParseError::Protocol(m)) if m.contains("frame limit")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            match parse_command(&data, 1024, false) {
                Ok(p) => {
                    prop_assert!(p.consumed <= data.len());
                    for (s, e) in p.args { prop_assert!(s <= e && e <= p.consumed); }
                }
                Err(ParseError::Incomplete) | Err(ParseError::Protocol(_)) => {}
            }
        }

        #[test]
        fn encoded_commands_round_trip_under_any_split(
            cmd in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
            split in 0usize..400,
        ) {
            let wire = encode(&cmd);
            let split = split % (wire.len() + 1);
            if split < wire.len() {
                prop_assert_eq!(parse_command(&wire[..split], MAX, false), Err(ParseError::Incomplete));
            }
            let p = parse_command(&wire, MAX, false).unwrap();
            prop_assert_eq!(p.consumed, wire.len());
            let got: Vec<Vec<u8>> = args(&wire, &p).into_iter().map(|a| a.to_vec()).collect();
            prop_assert_eq!(got, cmd);
        }

        #[test]
        fn mutated_frames_never_panic(
            cmd in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..4),
            pos in 0usize..200, byte: u8,
        ) {
            let mut wire = encode(&cmd);
            let pos = pos % wire.len();
            wire[pos] = byte;
            let _ = parse_command(&wire, 64, false);
        }
    }
}
