//! Extractors: what a job or view takes from each key and value (group-by fields, numbers to
//! sum, elements to count).
//!
//! A key whose extractor finds nothing (a missing field, a value that is not JSON, a key with
//! too few parts) is *skipped* by the job and counted as such, never an error: a keyspace
//! holding a few odd values still gets its answer, with the count of what did not fit.

use serde::{Deserialize, Serialize};

use crate::json_path::{Found, JsonPath};
use crate::num::Fixed;

/// Most words [`Extractor::Words`] takes from one value (the rest are ignored).
pub const WORDS_PER_VALUE_MAX: usize = 10_000;
/// Longest word, in bytes (longer runs are cut at a character boundary).
pub const WORD_BYTES_MAX: usize = 64;

/// One extracted scalar: a group's part, or an element to count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scalar {
    Null,
    Bool(bool),
    Num(Fixed),
    /// Bytes (a key's part may not be UTF-8); JSON strings are UTF-8.
    Str(Vec<u8>),
}

impl Scalar {
    /// As a number: a number, or a string holding a JSON number's text.
    pub fn to_number(&self) -> Option<(Fixed, bool)> {
        self.as_ref().to_number()
    }

    /// Borrowed.
    pub fn as_ref(&self) -> ScalarRef<'_> {
        match self {
            Scalar::Null => ScalarRef::Null,
            Scalar::Bool(b) => ScalarRef::Bool(*b),
            Scalar::Num(n) => ScalarRef::Num(*n),
            Scalar::Str(s) => ScalarRef::Str(s),
        }
    }

    /// As JSON (non-UTF-8 bytes are replaced by U+FFFD).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Scalar::Null => serde_json::Value::Null,
            Scalar::Bool(b) => serde_json::Value::Bool(*b),
            Scalar::Num(n) => n.to_json(),
            Scalar::Str(s) => serde_json::Value::String(String::from_utf8_lossy(s).into_owned()),
        }
    }

    /// Appends this scalar's canonical bytes (self-delimiting, so a list of them is a key).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(out)
    }

    /// Whether `b` is scalars [`Scalar::encode`] wrote one after another
    /// ([`Scalar::decode_all`] would read it), found without building them.
    pub fn reads_all(mut b: &[u8]) -> bool {
        while let Some((&tag, rest)) = b.split_first() {
            let len = match tag {
                0 => 0,
                1 => 1,
                2 => 16,
                3 => match rest.get(..4) {
                    Some(l) => 4 + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize,
                    None => return false,
                },
                _ => return false,
            };
            match rest.get(len..) {
                Some(next) => b = next,
                None => return false,
            }
        }
        true
    }

    /// Reads the scalars [`Scalar::encode`] wrote one after another.
    pub fn decode_all(mut b: &[u8]) -> Option<Vec<Scalar>> {
        let mut out = Vec::new();
        while let Some((&tag, rest)) = b.split_first() {
            let (s, rest) = match tag {
                0 => (Scalar::Null, rest),
                1 => (Scalar::Bool(*rest.first()? != 0), rest.get(1..)?),
                2 => {
                    let raw: [u8; 16] = rest.get(..16)?.try_into().ok()?;
                    (Scalar::Num(Fixed(i128::from_be_bytes(raw))), &rest[16..])
                }
                3 => {
                    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                    let end = 4usize.checked_add(len)?;
                    (Scalar::Str(rest.get(4..end)?.to_vec()), &rest[end..])
                }
                _ => return None,
            };
            out.push(s);
            b = rest;
        }
        Some(out)
    }
}

/// A [`Scalar`] borrowed: what a key's scan reads without an allocation of its own (a JSON
/// field's text stays in the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarRef<'a> {
    Null,
    Bool(bool),
    Num(Fixed),
    Str(&'a [u8]),
}

/// Where canonical bytes are written: a `Vec`, or a buffer on the stack.
pub trait ByteSink {
    fn put(&mut self, bytes: &[u8]);
}

impl ByteSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl<A: smallvec::Array<Item = u8>> ByteSink for smallvec::SmallVec<A> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl ScalarRef<'_> {
    /// Appends the canonical bytes (self-delimiting, so a list of them is a key): the same
    /// as [`Scalar::encode`] of the owned scalar.
    pub fn encode(self, out: &mut impl ByteSink) {
        match self {
            ScalarRef::Null => out.put(&[0]),
            ScalarRef::Bool(b) => out.put(&[1, u8::from(b)]),
            ScalarRef::Num(n) => {
                out.put(&[2]);
                out.put(&n.0.to_be_bytes());
            }
            ScalarRef::Str(s) => {
                out.put(&[3]);
                out.put(&(s.len() as u32).to_be_bytes());
                out.put(s);
            }
        }
    }

    /// As a number: a number, or a string holding a JSON number's text (with whether it was
    /// rounded to 9 decimals).
    pub fn to_number(self) -> Option<(Fixed, bool)> {
        match self {
            ScalarRef::Num(n) => Some((n, false)),
            ScalarRef::Str(s) => Fixed::parse(s).ok().map(|p| (p.value, p.rounded)),
            ScalarRef::Null | ScalarRef::Bool(_) => None,
        }
    }

    pub fn to_owned(self) -> Scalar {
        match self {
            ScalarRef::Null => Scalar::Null,
            ScalarRef::Bool(b) => Scalar::Bool(b),
            ScalarRef::Num(n) => Scalar::Num(n),
            ScalarRef::Str(s) => Scalar::Str(s.to_vec()),
        }
    }
}

/// How a whole value is read by [`Extractor::Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueAs {
    String,
    Number,
}

/// What to take from a key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extractor {
    /// The whole key.
    Key,
    /// The `index`-th part of the key split at `sep` (from the end when negative: -1 is the
    /// last).
    KeyPart { sep: Vec<u8>, index: i64 },
    /// A field of a JSON value.
    Json(JsonPath),
    /// The whole value, as a string or as a number.
    Value(ValueAs),
    /// The words of what the inner extractor finds: runs of Unicode letters and digits,
    /// lowercased, at most [`WORDS_PER_VALUE_MAX`] of [`WORD_BYTES_MAX`] bytes each.
    Words(Box<Extractor>),
    /// The same scalar for every key (one group for everything).
    Const(Scalar),
}

/// What extracting left in a key's record of numbers (a number past 9 decimals was rounded).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Notes {
    pub rounded: bool,
}

impl Extractor {
    /// Whether it may find more than one scalar per key.
    pub fn is_multi(&self) -> bool {
        matches!(self, Extractor::Words(_))
    }

    /// Appends what this extractor finds in `key`/`value` to `out`; `false` when it finds
    /// nothing (the key is skipped).
    pub fn extract(
        &self,
        key: &[u8],
        value: &[u8],
        out: &mut Vec<Scalar>,
        notes: &mut Notes,
    ) -> bool {
        match self {
            Extractor::Key => out.push(Scalar::Str(key.to_vec())),
            Extractor::KeyPart { sep, index } => match key_part(key, sep, *index) {
                Some(part) => out.push(Scalar::Str(part.to_vec())),
                None => return false,
            },
            Extractor::Json(path) => match crate::json_path::find(value, path) {
                Ok(Some(found)) => match found_scalar(found, notes) {
                    Some(s) => out.push(s),
                    None => return false,
                },
                _ => return false,
            },
            Extractor::Value(ValueAs::String) => out.push(Scalar::Str(value.to_vec())),
            Extractor::Value(ValueAs::Number) => match Fixed::parse(value) {
                Ok(p) => {
                    notes.rounded |= p.rounded;
                    out.push(Scalar::Num(p.value));
                }
                Err(_) => return false,
            },
            Extractor::Words(inner) => {
                let mut found = Vec::new();
                if !inner.extract(key, value, &mut found, notes) {
                    return false;
                }
                let mut n = 0;
                for s in &found {
                    if let Scalar::Str(text) = s {
                        words(&String::from_utf8_lossy(text), &mut |w| {
                            if n < WORDS_PER_VALUE_MAX {
                                out.push(Scalar::Str(w.into_bytes()));
                                n += 1;
                            }
                        });
                    }
                }
            }
            Extractor::Const(s) => out.push(s.clone()),
        }
        true
    }
}

impl Extractor {
    /// What a `Json` extractor gives when its path's answer was found already (a pass over
    /// the value for several paths): as [`Extractor::extract`] would.
    pub fn take_found(
        &self,
        found: Option<Found<'_>>,
        out: &mut Vec<Scalar>,
        notes: &mut Notes,
    ) -> bool {
        debug_assert!(
            matches!(self, Extractor::Json(_)),
            "only a Json extractor takes a found field"
        );
        match found.and_then(|f| found_scalar(f, notes)) {
            Some(s) => {
                out.push(s);
                true
            }
            None => false,
        }
    }
}

fn found_scalar(found: Found<'_>, notes: &mut Notes) -> Option<Scalar> {
    match found {
        Found::String(s) => Some(Scalar::Str(s.into_owned().into_bytes())),
        other => found_ref(&other, notes).map(ScalarRef::to_owned),
    }
}

/// The scalar a JSON field found gives, borrowed from it (`None`: a number that does not
/// parse). A number past 9 decimals is rounded, and noted.
pub fn found_ref<'f>(found: &'f Found<'_>, notes: &mut Notes) -> Option<ScalarRef<'f>> {
    Some(match found {
        Found::Null => ScalarRef::Null,
        Found::Bool(b) => ScalarRef::Bool(*b),
        Found::Number(text) => {
            let p = Fixed::parse(text.as_bytes()).ok()?;
            notes.rounded |= p.rounded;
            ScalarRef::Num(p.value)
        }
        Found::String(s) => ScalarRef::Str(s.as_bytes()),
        Found::Object(raw) | Found::Array(raw) => ScalarRef::Str(raw.as_bytes()),
    })
}

/// The `index`-th part of `key` split at `sep` (negative: from the end).
pub fn key_part<'k>(key: &'k [u8], sep: &[u8], index: i64) -> Option<&'k [u8]> {
    if sep.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    let mut rest = key;
    loop {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + sep.len()..];
            }
            None => {
                parts.push(rest);
                break;
            }
        }
        if index >= 0 && parts.len() > index as usize {
            break;
        }
    }
    if index >= 0 {
        parts.get(usize::try_from(index).ok()?).copied()
    } else {
        let back = usize::try_from(index.unsigned_abs()).ok()?;
        parts.len().checked_sub(back).map(|i| parts[i])
    }
}

/// Calls `each` with the lowercased runs of letters and digits of `text`, each cut to
/// [`WORD_BYTES_MAX`] bytes at a character boundary.
pub fn words(text: &str, each: &mut impl FnMut(String)) {
    let mut word = String::new();
    // Set once a character did not fit: the rest of the run is dropped, never a later,
    // shorter character (the word stays a prefix of the run).
    let mut full = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                if !full && word.len() + l.len_utf8() <= WORD_BYTES_MAX {
                    word.push(l);
                } else {
                    full = true;
                }
            }
        } else {
            if !word.is_empty() {
                each(std::mem::take(&mut word));
            }
            full = false;
        }
    }
    if !word.is_empty() {
        each(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(e: &Extractor, key: &str, value: &str) -> Option<Vec<Scalar>> {
        let mut out = Vec::new();
        let mut notes = Notes::default();
        e.extract(key.as_bytes(), value.as_bytes(), &mut out, &mut notes)
            .then_some(out)
    }

    fn s(x: &str) -> Scalar {
        Scalar::Str(x.as_bytes().to_vec())
    }

    #[test]
    fn key_parts_count_from_either_end() {
        let part = |i| key_part(b"o:17:2026-12", b":", i).map(|p| p.to_vec());
        assert_eq!(part(0), Some(b"o".to_vec()));
        assert_eq!(part(2), Some(b"2026-12".to_vec()));
        assert_eq!(part(3), None);
        assert_eq!(part(-1), Some(b"2026-12".to_vec()));
        assert_eq!(part(-3), Some(b"o".to_vec()));
        assert_eq!(part(-4), None);
        assert_eq!(key_part(b"a::b", b"::", 1), Some(&b"b"[..]));
        assert_eq!(key_part(b"ab", b"", 0), None);
    }

    #[test]
    fn extractors_find_or_skip() {
        let json = Extractor::Json(JsonPath::parse("$.c").unwrap());
        assert_eq!(run(&json, "k", r#"{"c":"fr"}"#), Some(vec![s("fr")]));
        assert_eq!(run(&json, "k", r#"{"d":1}"#), None);
        assert_eq!(run(&json, "k", "not json"), None);
        let num = Extractor::Value(ValueAs::Number);
        assert_eq!(
            run(&num, "k", "12.5"),
            Some(vec![Scalar::Num(Fixed(12_500_000_000))])
        );
        assert_eq!(run(&num, "k", "12 "), None);
        let w = Extractor::Words(Box::new(Extractor::Value(ValueAs::String)));
        assert_eq!(
            run(&w, "k", "Hello, wörld! x2 ÉCOLE"),
            Some(vec![s("hello"), s("wörld"), s("x2"), s("école")])
        );
        let long = "a".repeat(100);
        assert_eq!(
            run(&w, "k", &long),
            Some(vec![s(&"a".repeat(WORD_BYTES_MAX))])
        );
        let cut = format!("{}éb c", "a".repeat(63));
        assert_eq!(
            run(&w, "k", &cut),
            Some(vec![s(&"a".repeat(63)), s("c")]),
            "no b after the cut"
        );
        let many = "w ".repeat(WORDS_PER_VALUE_MAX + 5);
        assert_eq!(run(&w, "k", &many).unwrap().len(), WORDS_PER_VALUE_MAX);
    }

    #[test]
    fn scalars_round_trip_their_canonical_bytes() {
        let all = vec![
            Scalar::Null,
            Scalar::Bool(true),
            Scalar::Num(Fixed(-5)),
            Scalar::Str(vec![0xff, 0]),
            s(""),
        ];
        let mut b = Vec::new();
        for x in &all {
            x.encode(&mut b);
        }
        assert_eq!(Scalar::decode_all(&b), Some(all));
        assert_eq!(Scalar::decode_all(&[3, 0, 0, 0, 9, b'x']), None);
        assert_eq!(Scalar::decode_all(&[7]), None);
    }

    #[test]
    fn numbers_come_from_numbers_and_numeric_strings() {
        assert_eq!(s("4.5").to_number(), Some((Fixed(4_500_000_000), false)));
        assert_eq!(s("x").to_number(), None);
        assert_eq!(Scalar::Bool(true).to_number(), None);
    }
}
