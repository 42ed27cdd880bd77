//! Fields of JSON values, read without building a document: a path (`$.a.b[0]`) and a
//! scanner that walks the raw bytes once, borrowing what it finds.
//!
//! # Why not serde_json's `Value`
//!
//! A job reads every value of a keyspace and usually wants one or two fields of each. Building
//! a tree allocates per node; walking the bytes and skipping what the path does not name costs
//! about a pass over them. The scanner still checks the **whole** value (UTF-8, grammar,
//! escapes, nesting, nothing after it), so "is this JSON" has one answer: serde_json's.
//! Where an object repeats a key, the last one counts, as in serde_json. [`find_all`] reads
//! several paths in the same pass (a job grouping by one field and summing another checks
//! each value once: a third less time than a pass per path on small documents).
//!
//! # Bounds
//!
//! Nesting deeper than [`DEPTH_MAX`] (as deep as serde_json goes) is an error, so a hostile value
//! cannot exhaust the stack; paths have at most [`PATH_SEGMENTS_MAX`] segments.

use std::borrow::Cow;

/// Deepest nesting of arrays and objects a value may have (serde_json refuses the 128th level).
pub const DEPTH_MAX: usize = 127;
/// Most segments a path may have.
pub const PATH_SEGMENTS_MAX: usize = 32;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Field(String),
    Index(usize),
}

/// A parsed path: `$` then `.name`, `["name"]` (a JSON string, for names with `.` or `[`) or
/// `[n]` steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segments: Vec<Segment>,
    text: String,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let bad = |why: &str| format!("JSON path {text:?}: {why}");
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| bad("must start with $"))?;
        let b = rest.as_bytes();
        let mut segments = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'.' => {
                    let start = i + 1;
                    let mut end = start;
                    while end < b.len() && b[end] != b'.' && b[end] != b'[' {
                        end += 1;
                    }
                    if end == start {
                        return Err(bad("empty field name after '.'"));
                    }
                    segments.push(Segment::Field(rest[start..end].to_string()));
                    i = end;
                }
                b'[' if b.get(i + 1) == Some(&b'"') => {
                    // A JSON string up to its closing quote, then ']'.
                    let mut end = i + 2;
                    while end < b.len() && b[end] != b'"' {
                        end += if b[end] == b'\\' { 2 } else { 1 };
                    }
                    if end >= b.len() || b.get(end + 1) != Some(&b']') {
                        return Err(bad("unterminated [\"name\"]"));
                    }
                    let name: String = serde_json::from_str(&rest[i + 1..=end])
                        .map_err(|e| bad(&format!("bad name: {e}")))?;
                    segments.push(Segment::Field(name));
                    i = end + 2;
                }
                b'[' => {
                    let close = rest[i..]
                        .find(']')
                        .map(|c| i + c)
                        .ok_or_else(|| bad("unterminated [index]"))?;
                    let digits = &rest[i + 1..close];
                    if digits.is_empty() || !digits.bytes().all(|d| d.is_ascii_digit()) {
                        return Err(bad("an index is a non-negative integer"));
                    }
                    let index: usize = digits
                        .parse()
                        .map_err(|_| bad("an index is a non-negative integer"))?;
                    segments.push(Segment::Index(index));
                    i = close + 1;
                }
                _ => return Err(bad("expected '.' or '[' after a step")),
            }
            if segments.len() > PATH_SEGMENTS_MAX {
                return Err(bad(&format!("more than {PATH_SEGMENTS_MAX} steps")));
            }
        }
        Ok(JsonPath {
            segments,
            text: text.to_string(),
        })
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The path as written.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// What a path found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<'a> {
    Null,
    Bool(bool),
    /// A number's text, as written (parse it with [`crate::num::Fixed::parse`]).
    Number(&'a str),
    /// A string, unescaped (borrowed when it had no escapes).
    String(Cow<'a, str>),
    /// An object's or array's raw text.
    Object(&'a str),
    Array(&'a str),
}

/// Why a value is not JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson {
    pub at: usize,
    pub why: &'static str,
}

/// What `path` names in the JSON value `doc`: `Ok(None)` when it names nothing there,
/// `Err` when `doc` is not JSON.
pub fn find<'a>(doc: &'a [u8], path: &JsonPath) -> Result<Option<Found<'a>>, NotJson> {
    let text = std::str::from_utf8(doc).map_err(|e| NotJson {
        at: e.valid_up_to(),
        why: "not UTF-8",
    })?;
    let mut s = Scanner {
        text,
        b: doc,
        i: 0,
        depth: 0,
    };
    s.ws();
    let found = s.value(Some(path.segments()))?;
    s.ws();
    if s.i != doc.len() {
        return Err(s.err("trailing characters"));
    }
    Ok(found)
}

/// Most paths [`find_all`] reads in one pass.
pub const PATHS_PER_PASS_MAX: usize = 8;

/// What each of `paths` (at most [`PATHS_PER_PASS_MAX`]) names in `doc`, in one pass over it:
/// answer `i` is what [`find`] answers for `paths[i]` (a job reading two fields of each value
/// checks it once, not twice). Answers past `paths.len()` are `None`.
pub fn find_all<'a>(
    doc: &'a [u8],
    paths: &[JsonPath],
) -> Result<[Option<Found<'a>>; PATHS_PER_PASS_MAX], NotJson> {
    assert!(
        paths.len() <= PATHS_PER_PASS_MAX,
        "find_all reads at most {PATHS_PER_PASS_MAX} paths"
    );
    let text = std::str::from_utf8(doc).map_err(|e| NotJson {
        at: e.valid_up_to(),
        why: "not UTF-8",
    })?;
    let mut s = Scanner {
        text,
        b: doc,
        i: 0,
        depth: 0,
    };
    let mut wants: [(usize, &[Segment]); PATHS_PER_PASS_MAX] = [(0, &[]); PATHS_PER_PASS_MAX];
    for (i, p) in paths.iter().enumerate() {
        wants[i] = (i, p.segments());
    }
    let mut out: [Option<Found<'a>>; PATHS_PER_PASS_MAX] = Default::default();
    s.ws();
    s.value_multi(&wants[..paths.len()], &mut out)?;
    s.ws();
    if s.i != doc.len() {
        return Err(s.err("trailing characters"));
    }
    Ok(out)
}

/// An object's key as read: raw (no escapes: its bytes are its text) or unescaped.
enum Key<'a> {
    Raw(&'a [u8]),
    Unescaped(Cow<'a, str>),
}

impl Key<'_> {
    fn is(&self, name: &str) -> bool {
        match self {
            Key::Raw(b) => *b == name.as_bytes(),
            Key::Unescaped(s) => s == name,
        }
    }
}

/// The first index from `i` on where `b` holds `"`, `\` or a control character (below
/// 0x20), or `b.len()`: the plain run of a string, 8 bytes per step. Each test below is
/// exact for the lowest byte it flags (a borrow can flag a byte above a true one, never
/// below), and only the lowest is used. Bytes of multi-byte characters (0x80 and up) are
/// never flagged.
#[inline]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    while let Some(chunk) = b.get(i..i + 8).and_then(|c| <[u8; 8]>::try_from(c).ok()) {
        let x = u64::from_le_bytes(chunk);
        let hits = zero_in(x ^ (ONES * u64::from(b'"')))
            | zero_in(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGHS);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b
        .get(i)
        .is_some_and(|c| *c != b'"' && *c != b'\\' && *c >= 0x20)
    {
        i += 1;
    }
    i
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl<'a> Scanner<'a> {
    fn err(&self, why: &'static str) -> NotJson {
        NotJson { at: self.i, why }
    }

    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8, why: &'static str) -> Result<(), NotJson> {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(why))
        }
    }

    /// Reads one value. `want`: `Some(rest)` when the path leads here (`rest` empty: this
    /// value is the answer), `None` when it is only skipped (and checked).
    fn value(&mut self, want: Option<&[Segment]>) -> Result<Option<Found<'a>>, NotJson> {
        let here = want.is_some_and(<[Segment]>::is_empty);
        let start = self.i;
        match self.b.get(self.i) {
            Some(b'{') => {
                let inner = self.object(want.filter(|_| !here))?;
                Ok(if here {
                    Some(Found::Object(&self.text[start..self.i]))
                } else {
                    inner
                })
            }
            Some(b'[') => {
                let inner = self.array(want.filter(|_| !here))?;
                Ok(if here {
                    Some(Found::Array(&self.text[start..self.i]))
                } else {
                    inner
                })
            }
            Some(b'"') => {
                let s = self.string()?;
                Ok(here.then_some(Found::String(s)))
            }
            Some(b't') => self.literal(b"true", Found::Bool(true), here),
            Some(b'f') => self.literal(b"false", Found::Bool(false), here),
            Some(b'n') => self.literal(b"null", Found::Null, here),
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Ok(here.then(|| Found::Number(&self.text[start..self.i])))
            }
            _ => Err(self.err("expected a value")),
        }
    }

    /// Reads one value for several paths: `wants` holds (answer slot, segments left) of each
    /// path that leads here; a slot whose segments are used up is answered by this value.
    /// Where an object repeats a key, each path through it is answered by the last one.
    fn value_multi(
        &mut self,
        wants: &[(usize, &[Segment])],
        out: &mut [Option<Found<'a>>],
    ) -> Result<(), NotJson> {
        if wants.is_empty() {
            return self.skip();
        }
        let start = self.i;
        let composite = match self.b.get(self.i) {
            Some(b'{') => {
                self.object_multi(wants, out)?;
                true
            }
            Some(b'[') => {
                self.array_multi(wants, out)?;
                true
            }
            _ => false,
        };
        let found = if composite {
            let raw = &self.text[start..self.i];
            Some(if self.b[start] == b'{' {
                Found::Object(raw)
            } else {
                Found::Array(raw)
            })
        } else {
            // A scalar: only the paths that end here find anything.
            self.value(Some(&[]))?
        };
        for (slot, rest) in wants {
            if rest.is_empty() {
                out[*slot] = found.clone();
            }
        }
        Ok(())
    }

    fn object_multi(
        &mut self,
        wants: &[(usize, &[Segment])],
        out: &mut [Option<Found<'a>>],
    ) -> Result<(), NotJson> {
        self.enter()?;
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        let mut sub: [(usize, &[Segment]); PATHS_PER_PASS_MAX] = [(0, &[]); PATHS_PER_PASS_MAX];
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a key"));
            }
            let key = self.key()?;
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            let mut n = 0;
            for (slot, rest) in wants {
                if let [Segment::Field(name), tail @ ..] = rest
                    && key.is(name)
                {
                    sub[n] = (*slot, tail);
                    n += 1;
                    // The last of repeated keys counts: an earlier one's answer goes.
                    out[*slot] = None;
                }
            }
            self.value_multi(&sub[..n], out)?;
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array_multi(
        &mut self,
        wants: &[(usize, &[Segment])],
        out: &mut [Option<Found<'a>>],
    ) -> Result<(), NotJson> {
        self.enter()?;
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        let mut sub: [(usize, &[Segment]); PATHS_PER_PASS_MAX] = [(0, &[]); PATHS_PER_PASS_MAX];
        let mut at = 0usize;
        loop {
            self.ws();
            let mut n = 0;
            for (slot, rest) in wants {
                if let [Segment::Index(i), tail @ ..] = rest
                    && *i == at
                {
                    sub[n] = (*slot, tail);
                    n += 1;
                }
            }
            self.value_multi(&sub[..n], out)?;
            at += 1;
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    /// Reads (and checks) one value no path wants: nothing is built.
    fn skip(&mut self) -> Result<(), NotJson> {
        match self.b.get(self.i) {
            Some(b'{') => self.object(None).map(drop),
            Some(b'[') => self.array(None).map(drop),
            Some(b'"') => self.string_span().map(drop),
            Some(b't') => self.literal(b"true", Found::Null, false).map(drop),
            Some(b'f') => self.literal(b"false", Found::Null, false).map(drop),
            Some(b'n') => self.literal(b"null", Found::Null, false).map(drop),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("expected a value")),
        }
    }

    /// An object's key at `"`: its raw span, unescaped only when it has escapes.
    fn key(&mut self) -> Result<Key<'a>, NotJson> {
        let at = self.i;
        let (start, end, escaped) = self.string_span()?;
        if !escaped {
            return Ok(Key::Raw(&self.b[start..end]));
        }
        self.i = at;
        self.string().map(Key::Unescaped)
    }

    /// Checks the string at `"` and ends past its closing quote: (start, end) of what is
    /// between the quotes, and whether it holds escapes (each checked as `string` reads it).
    fn string_span(&mut self) -> Result<(usize, usize, bool), NotJson> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = plain_run(self.b, self.i);
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok((start, self.i - 1, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    self.i += 1;
                    match self.b.get(self.i) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            self.unicode_escape()?;
                        }
                        _ => return Err(self.err("bad escape")),
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unterminated string")),
            }
        }
    }

    fn literal(
        &mut self,
        word: &'static [u8],
        found: Found<'a>,
        here: bool,
    ) -> Result<Option<Found<'a>>, NotJson> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(here.then_some(found))
        } else {
            Err(self.err("expected a value"))
        }
    }

    fn enter(&mut self) -> Result<(), NotJson> {
        self.depth += 1;
        if self.depth > DEPTH_MAX {
            return Err(self.err("nested too deep"));
        }
        self.i += 1;
        Ok(())
    }

    fn object(&mut self, want: Option<&[Segment]>) -> Result<Option<Found<'a>>, NotJson> {
        self.enter()?;
        let field = match want {
            Some([Segment::Field(name), rest @ ..]) => Some((name.as_str(), rest)),
            _ => None,
        };
        let mut found = None;
        self.ws();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(None);
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a key"));
            }
            let key = self.key()?;
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            match field {
                // The last of repeated keys counts (serde_json's map keeps the last insert).
                Some((name, rest)) if key.is(name) => found = self.value(Some(rest))?,
                _ => self.skip()?,
            }
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(found);
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, want: Option<&[Segment]>) -> Result<Option<Found<'a>>, NotJson> {
        self.enter()?;
        let index = match want {
            Some([Segment::Index(n), rest @ ..]) => Some((*n, rest)),
            _ => None,
        };
        let mut found = None;
        self.ws();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(None);
        }
        let mut n = 0usize;
        loop {
            self.ws();
            match index {
                Some((at, rest)) if at == n => found = self.value(Some(rest))?,
                _ => self.skip()?,
            }
            n += 1;
            self.ws();
            match self.b.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(found);
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn number(&mut self) -> Result<(), NotJson> {
        let start = self.i;
        let digits = |s: &mut Self| {
            let start = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            s.i - start
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return Err(self.err("bad number"));
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(self.err("bad number"));
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.err("bad number"));
            }
        }
        // serde_json refuses numbers beyond f64's range ("number out of range"); only those
        // with an exponent or many digits can be.
        let token = &self.text[start..self.i];
        if (token.len() > 300 || token.contains(['e', 'E']))
            && !token.parse::<f64>().is_ok_and(f64::is_finite)
        {
            return Err(self.err("number out of range"));
        }
        Ok(())
    }

    /// A string at `"`, unescaped; the scanner ends past its closing quote.
    fn string(&mut self) -> Result<Cow<'a, str>, NotJson> {
        // The fast path: no escapes.
        let (start, end, escaped) = self.string_span()?;
        if !escaped {
            return Ok(Cow::Borrowed(&self.text[start..end]));
        }
        self.i = start;
        while self.b[self.i] != b'\\' {
            self.i += 1;
        }
        let mut out = String::from(&self.text[start..self.i]);
        loop {
            match self.b.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = match self.b.get(self.i) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.i += 1;
                            let code = self.unicode_escape()?;
                            out.push(char::from_u32(code).ok_or_else(|| self.err("bad escape"))?);
                            continue;
                        }
                        _ => return Err(self.err("bad escape")),
                    };
                    out.push(c);
                    self.i += 1;
                }
                Some(c) if *c < 0x20 => return Err(self.err("control character in a string")),
                Some(_) => {
                    // Copy a run of plain characters (the text is UTF-8: split at ASCII bytes).
                    let run = self.i;
                    while self
                        .b
                        .get(self.i)
                        .is_some_and(|c| *c != b'"' && *c != b'\\' && *c >= 0x20)
                    {
                        self.i += 1;
                    }
                    out.push_str(&self.text[run..self.i]);
                }
                None => return Err(self.err("unterminated string")),
            }
        }
    }

    /// The character of a `\u` escape (the scanner just past the `u`): four hex digits, and
    /// a second escape after a high surrogate; the scanner ends past them.
    fn unicode_escape(&mut self) -> Result<u32, NotJson> {
        let hi = self.hex4()?;
        if (0xD800..0xDC00).contains(&hi) {
            if !self.b[self.i..].starts_with(b"\\u") {
                return Err(self.err("lone surrogate"));
            }
            self.i += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(self.err("lone surrogate"));
            }
            Ok(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
        } else if (0xDC00..0xE000).contains(&hi) {
            Err(self.err("lone surrogate"))
        } else {
            Ok(hi)
        }
    }

    /// Four hex digits (after `\u`); the scanner ends past them.
    fn hex4(&mut self) -> Result<u32, NotJson> {
        let digits = self
            .b
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("bad \\u escape"))?;
        let mut v = 0u32;
        for d in digits {
            v = v * 16
                + char::from(*d)
                    .to_digit(16)
                    .ok_or_else(|| self.err("bad \\u escape"))?;
        }
        self.i += 4;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(doc: &'a str, path: &str) -> Result<Option<Found<'a>>, NotJson> {
        find(doc.as_bytes(), &JsonPath::parse(path).unwrap())
    }

    #[test]
    fn finds_fields_and_elements() {
        let doc = r#"{"a": {"b": [10, {"c": "x\ny"}]}, "n": -1.5e3, "t": true, "z": null}"#;
        assert_eq!(at(doc, "$.a.b[0]"), Ok(Some(Found::Number("10"))));
        assert_eq!(
            at(doc, "$.a.b[1].c"),
            Ok(Some(Found::String("x\ny".into())))
        );
        assert_eq!(at(doc, "$.n"), Ok(Some(Found::Number("-1.5e3"))));
        assert_eq!(at(doc, "$.t"), Ok(Some(Found::Bool(true))));
        assert_eq!(at(doc, "$.z"), Ok(Some(Found::Null)));
        assert_eq!(
            at(doc, "$.a.b"),
            Ok(Some(Found::Array(r#"[10, {"c": "x\ny"}]"#)))
        );
        assert_eq!(at(doc, "$.missing"), Ok(None));
        assert_eq!(at(doc, "$.a.b[2]"), Ok(None));
        assert_eq!(at(doc, "$.n.deeper"), Ok(None));
        assert_eq!(
            at(r#"{"a.b": 1}"#, r#"$["a.b"]"#),
            Ok(Some(Found::Number("1")))
        );
        assert_eq!(
            at(r#"{"k": 1, "k": 2}"#, "$.k"),
            Ok(Some(Found::Number("2"))),
            "last wins"
        );
        assert_eq!(
            at(r#""\ud83d\ude00""#, "$"),
            Ok(Some(Found::String("😀".into())))
        );
    }

    #[test]
    fn checks_the_whole_value() {
        for bad in [
            r#"{"a": 1,}"#,
            r#"{"a": 1} x"#,
            r#"{"a": 1, "b": [1 2]}"#,
            r#"{"a": "\ud800"}"#,
            "{\"a\": \"tab\there\"}",
            r#"[01]"#,
            r#"{"a": tru}"#,
            r#"{"a": 1, "b": 1e400}"#,
            "",
        ] {
            assert!(at(bad, "$.a").is_err(), "{bad:?}");
        }
        let deep = "[".repeat(DEPTH_MAX + 1) + &"]".repeat(DEPTH_MAX + 1);
        assert_eq!(at(&deep, "$").unwrap_err().why, "nested too deep");
        let ok = "[".repeat(DEPTH_MAX) + &"]".repeat(DEPTH_MAX);
        assert!(at(&ok, "$").is_ok());
    }

    #[test]
    fn a_plain_run_stops_where_a_byte_by_byte_scan_stops() {
        let naive = |b: &[u8], mut i: usize| {
            while i < b.len() && b[i] != b'"' && b[i] != b'\\' && b[i] >= 0x20 {
                i += 1;
            }
            i
        };
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet = [
            b'a', b'"', b'\\', 0x00, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0xff, 0x5c, 0x22,
        ];
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let plain = next() % 8;
            let b: Vec<u8> = (0..len)
                .map(|_| match next() % 10 < plain {
                    true => alphabet[(next() % alphabet.len() as u64) as usize],
                    false => b'a' + (next() % 26) as u8,
                })
                .collect();
            for from in 0..=len {
                assert_eq!(plain_run(&b, from), naive(&b, from), "{b:?} from {from}");
            }
        }
    }

    /// Not a check: the scanner's speed on a job's typical value (`cargo test --release -p
    /// capdb-reduce --lib -- --ignored --nocapture scan_speed`).
    #[test]
    #[ignore]
    fn scan_speed() {
        let docs: Vec<String> = (0..1_000)
            .map(|i| {
                format!(
                    r#"{{"c": "c{}", "a": {}, "g": {}, "t": "w{} w{} w{} w{} w{}"}}"#,
                    i % 100,
                    i * 7919 % 100_000,
                    i * 31,
                    i % 1000,
                    i * 3 % 1000,
                    i * 7 % 1000,
                    i * 11 % 1000,
                    i * 13 % 1000
                )
            })
            .collect();
        let paths = [
            JsonPath::parse("$.c").unwrap(),
            JsonPath::parse("$.a").unwrap(),
        ];
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let mut found = 0usize;
            for _ in 0..1_000 {
                for d in &docs {
                    let r = find_all(d.as_bytes(), &paths).unwrap();
                    found += r.iter().flatten().count();
                }
            }
            let ns = started.elapsed().as_nanos() as f64 / 1e6;
            println!("find_all: {ns:.1} ns per value ({found} found)");
        }
    }

    #[test]
    fn parses_paths() {
        assert!(JsonPath::parse("a.b").is_err());
        assert!(JsonPath::parse("$.").is_err());
        assert!(JsonPath::parse("$[x]").is_err());
        assert!(JsonPath::parse("$[-1]").is_err());
        assert!(JsonPath::parse("$[+1]").is_err());
        assert_eq!(
            JsonPath::parse(r#"$.a["b\"c"][3]"#).unwrap().segments(),
            &[
                Segment::Field("a".into()),
                Segment::Field("b\"c".into()),
                Segment::Index(3)
            ]
        );
    }
}
