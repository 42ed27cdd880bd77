//! Exact numbers: fixed point with 9 decimals in an `i128` (units of 10⁻⁹).
//!
//! # Why not `f64`
//!
//! A job's partial results are merged in whatever order tasks finish, and a view subtracts
//! what a changed key contributed before. Floating-point sums depend on their order and drift
//! under add-then-subtract; integers do neither. So numbers are parsed from their decimal text
//! (never through `f64`), sums are exact, and any split and merge order gives the same bits.
//! Range: about ±1.7 × 10²⁹ (an overflow is an error naming the group, never a wrap). More
//! than 9 decimals round half to even, and the caller counts it (`rounded`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Units per 1.
pub const SCALE: i128 = 1_000_000_000;
const DECIMALS: i32 = 9;

/// A decimal number in units of 10⁻⁹.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Fixed(pub i128);

/// Why a text is not a number [`Fixed`] can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumError {
    /// Not a JSON number (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`).
    Syntax,
    /// Outside ±1.7 × 10²⁹.
    Overflow,
}

impl fmt::Display for NumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumError::Syntax => f.write_str("not a number"),
            NumError::Overflow => f.write_str("number out of range (about ±1.7e29)"),
        }
    }
}

/// A parsed number and whether digits past the 9th decimal were rounded away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub value: Fixed,
    pub rounded: bool,
}

impl Fixed {
    pub const ZERO: Fixed = Fixed(0);

    /// The integer `n`.
    pub fn from_int(n: i64) -> Fixed {
        Fixed(i128::from(n) * SCALE)
    }

    /// Parses a JSON number's text exactly (half to even past 9 decimals).
    pub fn parse(text: &[u8]) -> Result<Parsed, NumError> {
        match Fixed::parse_short(text) {
            Some(p) => Ok(p),
            None => Fixed::parse_any(text),
        }
    }

    /// The common number, parsed with no allocation and one `i128` multiplication: at most
    /// 18 digits, at most 9 of them after the point, no exponent (exact in a `u64`, nothing
    /// to round). `None` for anything else, valid or not: [`Fixed::parse_any`] judges it.
    fn parse_short(text: &[u8]) -> Option<Parsed> {
        let (negative, body) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        if body.is_empty() || body.len() > 19 {
            return None;
        }
        let mut units: u64 = 0;
        let mut point: Option<usize> = None;
        for (at, &c) in body.iter().enumerate() {
            match c {
                b'0'..=b'9' => units = units * 10 + u64::from(c - b'0'),
                b'.' if point.is_none() && at > 0 => point = Some(at),
                _ => return None,
            }
        }
        let int_len = point.unwrap_or(body.len());
        let frac_len = body.len() - point.map_or(body.len(), |p| p + 1);
        let digits = int_len + frac_len;
        // JSON's syntax: no leading zero before more digits, a digit after the point.
        if (int_len > 1 && body[0] == b'0') || (point.is_some() && frac_len == 0) {
            return None;
        }
        if digits > 18 || frac_len > DECIMALS as usize {
            return None;
        }
        let units = i128::from(units) * 10i128.pow(DECIMALS as u32 - frac_len as u32);
        Some(Parsed {
            value: Fixed(if negative { -units } else { units }),
            rounded: false,
        })
    }

    /// [`Fixed::parse`] for any number: exponents, long digit runs, rounding.
    fn parse_any(text: &[u8]) -> Result<Parsed, NumError> {
        let mut i = 0;
        let negative = text.first() == Some(&b'-');
        if negative {
            i += 1;
        }
        let int_start = i;
        while text.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let int_digits = &text[int_start..i];
        if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
            return Err(NumError::Syntax);
        }
        let mut frac_digits: &[u8] = &[];
        if text.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while text.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            frac_digits = &text[start..i];
            if frac_digits.is_empty() {
                return Err(NumError::Syntax);
            }
        }
        // The exponent, saturated (the digits of a value are far fewer than 2⁶²).
        let mut exp: i64 = 0;
        if matches!(text.get(i), Some(b'e' | b'E')) {
            i += 1;
            let exp_negative = match text.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let start = i;
            while let Some(d) = text.get(i).filter(|d| d.is_ascii_digit()) {
                exp = exp.saturating_mul(10).saturating_add(i64::from(d - b'0'));
                i += 1;
            }
            if i == start {
                return Err(NumError::Syntax);
            }
            if exp_negative {
                exp = -exp;
            }
        }
        if i != text.len() {
            return Err(NumError::Syntax);
        }
        // The digits as one integer D, the value D × 10^shift units.
        let digits = int_digits.iter().chain(frac_digits).copied();
        let frac_len = i64::try_from(frac_digits.len()).unwrap_or(i64::MAX);
        let shift = exp
            .saturating_sub(frac_len)
            .saturating_add(i64::from(DECIMALS));
        let significant: Vec<u8> = digits.skip_while(|d| *d == b'0').collect();
        if significant.is_empty() {
            return Ok(Parsed {
                value: Fixed::ZERO,
                rounded: false,
            });
        }
        let (kept, dropped): (&[u8], &[u8]) = if shift >= 0 {
            (&significant, &[])
        } else {
            let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
            if drop >= significant.len() {
                (&[], &significant)
            } else {
                significant.split_at(significant.len() - drop)
            }
        };
        let mut units: i128 = 0;
        for d in kept {
            units = units
                .checked_mul(10)
                .and_then(|u| u.checked_add(i128::from(d - b'0')))
                .ok_or(NumError::Overflow)?;
        }
        if shift > 0 {
            let pow = u32::try_from(shift).map_err(|_| NumError::Overflow)?;
            units = 10i128
                .checked_pow(pow)
                .and_then(|p| units.checked_mul(p))
                .ok_or(NumError::Overflow)?;
        }
        let rounded = dropped.iter().any(|d| *d != b'0');
        if rounded {
            // Half to even. When more digits were dropped than there are, the first dropped
            // digit is an implied 0: below half.
            let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
            let first = if drop > significant.len() {
                0
            } else {
                dropped[0] - b'0'
            };
            let rest_nonzero = drop <= significant.len() && dropped[1..].iter().any(|d| *d != b'0');
            let up = first > 5 || (first == 5 && (rest_nonzero || units % 2 == 1));
            if up {
                units = units.checked_add(1).ok_or(NumError::Overflow)?;
            }
        }
        Ok(Parsed {
            value: Fixed(if negative { -units } else { units }),
            rounded,
        })
    }

    pub fn checked_add(self, other: Fixed) -> Option<Fixed> {
        self.0.checked_add(other.0).map(Fixed)
    }

    pub fn checked_sub(self, other: Fixed) -> Option<Fixed> {
        self.0.checked_sub(other.0).map(Fixed)
    }

    /// `self / n`, rounded half to even (`None` when `n` is 0).
    pub fn div_round(self, n: i64) -> Option<Fixed> {
        if n == 0 {
            return None;
        }
        let n = i128::from(n);
        // Only i128::MIN / -1 has no quotient.
        let (q, r) = (self.0.checked_div(n)?, self.0.checked_rem(n)?);
        // Compare 2|r| with |n| without overflow: |r| < |n| <= 2^63.
        let twice = r.unsigned_abs() * 2;
        let away = match twice.cmp(&n.unsigned_abs()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => q % 2 != 0,
            std::cmp::Ordering::Less => false,
        };
        let toward = if (self.0 < 0) != (n < 0) { -1 } else { 1 };
        Some(Fixed(if away { q + toward } else { q }))
    }

    /// The nearest `f64` (correctly rounded from the exact decimal).
    pub fn to_f64(self) -> f64 {
        if self.0.unsigned_abs() < 1 << 53 {
            // Both exact in f64, so the one division rounds once.
            self.0 as f64 / SCALE as f64
        } else {
            self.to_string().parse().unwrap_or(f64::NAN)
        }
    }

    /// As a JSON number: an integer when it has no decimals and fits an `i64`, else the
    /// nearest `f64` (what JSON readers parse numbers into anyway). The exact decimal is
    /// [`Fixed`]'s `Display`.
    pub fn to_json(self) -> serde_json::Value {
        if self.0 % SCALE == 0
            && let Ok(n) = i64::try_from(self.0 / SCALE)
        {
            return serde_json::Value::from(n);
        }
        serde_json::Number::from_f64(self.to_f64())
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A sum of [`Fixed`] numbers that never fails midway: the low 128 bits wrap and `carry`
/// counts the wraps, so the total is `lo + carry × 2¹²⁸` whatever the order of the additions
/// and subtractions. The sum is a [`Fixed`] when `carry` ends at 0 ([`WideSum::value`]);
/// otherwise it is out of range, in any order. (A job that makes 2⁶³ wraps is not possible.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WideSum {
    lo: i128,
    carry: i64,
}

impl WideSum {
    pub fn add(&mut self, x: Fixed) {
        let (lo, wrapped) = self.lo.overflowing_add(x.0);
        self.lo = lo;
        if wrapped {
            self.carry = self.carry.wrapping_add(if x.0 > 0 { 1 } else { -1 });
        }
    }

    pub fn sub(&mut self, x: Fixed) {
        let (lo, wrapped) = self.lo.overflowing_sub(x.0);
        self.lo = lo;
        if wrapped {
            self.carry = self.carry.wrapping_add(if x.0 > 0 { -1 } else { 1 });
        }
    }

    pub fn merge(&mut self, other: &WideSum) {
        self.add(Fixed(other.lo));
        self.carry = self.carry.wrapping_add(other.carry);
    }

    /// The sum, or `None` when it is out of [`Fixed`]'s range.
    pub fn value(&self) -> Option<Fixed> {
        (self.carry == 0).then_some(Fixed(self.lo))
    }
}

impl fmt::Display for Fixed {
    /// The shortest exact decimal: `3`, `-12.5`, `0.000000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let scale = SCALE as u128;
        let (int, frac) = (abs / scale, abs % scale);
        if frac == 0 {
            return write!(f, "{sign}{int}");
        }
        let frac = format!("{frac:09}");
        write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<(String, bool), NumError> {
        Fixed::parse(s.as_bytes()).map(|p| (p.value.to_string(), p.rounded))
    }

    #[test]
    fn the_short_path_parses_as_the_general_one() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet = b"0123456789.-e+0099";
        let mut short = 0;
        for _ in 0..200_000 {
            let len = 1 + (next() % 24) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| match next() % 8 {
                    0 => alphabet[(next() % alphabet.len() as u64) as usize],
                    _ => b'0' + (next() % 10) as u8,
                })
                .collect();
            let general = Fixed::parse_any(&text);
            if let Some(fast) = Fixed::parse_short(&text) {
                short += 1;
                assert_eq!(Ok(fast), general, "{:?}", String::from_utf8_lossy(&text));
            }
            assert_eq!(Fixed::parse(&text), general);
        }
        for text in [
            "0",
            "-0",
            "7",
            "-12.5",
            "999999999999999999",
            "0.000000001",
            "1.5",
        ] {
            assert!(Fixed::parse_short(text.as_bytes()).is_some(), "{text}");
            assert_eq!(
                Fixed::parse_short(text.as_bytes()).map(Ok),
                Some(Fixed::parse_any(text.as_bytes()))
            );
        }
        assert!(short > 10_000, "the short path was taken {short} times");
    }

    #[test]
    fn parses_json_numbers_exactly() {
        assert_eq!(p("0"), Ok(("0".into(), false)));
        assert_eq!(p("-0"), Ok(("0".into(), false)));
        assert_eq!(p("12.50"), Ok(("12.5".into(), false)));
        assert_eq!(p("-3.000000001"), Ok(("-3.000000001".into(), false)));
        assert_eq!(p("1e3"), Ok(("1000".into(), false)));
        assert_eq!(p("1.5E-3"), Ok(("0.0015".into(), false)));
        assert_eq!(p("123456789e-9"), Ok(("0.123456789".into(), false)));
        assert_eq!(p("0.1"), Ok(("0.1".into(), false)), "no binary rounding");
    }

    #[test]
    fn rounds_half_to_even_past_nine_decimals() {
        assert_eq!(p("0.0000000005"), Ok(("0".into(), true)));
        assert_eq!(p("0.0000000015"), Ok(("0.000000002".into(), true)));
        assert_eq!(p("0.00000000150001"), Ok(("0.000000002".into(), true)));
        assert_eq!(p("0.0000000025"), Ok(("0.000000002".into(), true)));
        assert_eq!(p("0.00000000250001"), Ok(("0.000000003".into(), true)));
        assert_eq!(p("-0.0000000035"), Ok(("-0.000000004".into(), true)));
        assert_eq!(p("1e-20"), Ok(("0".into(), true)));
        assert_eq!(
            p("0.0000000010"),
            Ok(("0.000000001".into(), false)),
            "a dropped 0 is exact"
        );
    }

    #[test]
    fn refuses_what_json_refuses_and_what_does_not_fit() {
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "1e+", "+1", "1 ", "0x10", "NaN", "1.2.3",
        ] {
            assert_eq!(p(bad), Err(NumError::Syntax), "{bad:?}");
        }
        assert_eq!(p("1e30"), Err(NumError::Overflow));
        assert_eq!(
            p("100000000000000000000000000000"),
            Ok(("100000000000000000000000000000".into(), false))
        );
        assert_eq!(p("1e999999999999999"), Err(NumError::Overflow));
        assert_eq!(p("0e999999999999999"), Ok(("0".into(), false)));
        // A long fraction and a large exponent that cancel out.
        let long = format!("0.{}1e1000010", "0".repeat(1_000_005));
        assert_eq!(p(&long), Ok(("10000".into(), false)));
    }

    #[test]
    fn divides_with_half_even_rounding() {
        let f = |s: &str| Fixed::parse(s.as_bytes()).unwrap().value;
        assert_eq!(f("10").div_round(4), Some(f("2.5")));
        assert_eq!(f("0.000000005").div_round(2), Some(f("0.000000002")));
        assert_eq!(f("0.000000007").div_round(2), Some(f("0.000000004")));
        assert_eq!(f("-0.000000007").div_round(2), Some(f("-0.000000004")));
        assert_eq!(f("1").div_round(3), Some(f("0.333333333")));
        assert_eq!(f("2").div_round(3), Some(f("0.666666667")));
        assert_eq!(f("1").div_round(0), None);
        assert_eq!(Fixed(i128::MIN).div_round(-1), None);
    }

    #[test]
    fn a_wide_sum_is_out_of_range_only_when_its_total_is() {
        let big = Fixed(i128::MAX / 2 + 1);
        // big + big overflows midway, big + big - big does not in the end.
        let mut s = WideSum::default();
        s.add(big);
        s.add(big);
        assert_eq!(s.value(), None);
        s.sub(big);
        assert_eq!(s.value(), Some(big));
        let mut a = WideSum::default();
        a.add(big);
        a.add(big);
        let mut b = WideSum::default();
        b.sub(big);
        b.sub(big);
        b.sub(big);
        a.merge(&b);
        assert_eq!(a.value(), Some(Fixed(-big.0)));
    }

    #[test]
    fn prints_as_json_numbers() {
        assert_eq!(Fixed::from_int(7).to_json(), serde_json::json!(7));
        assert_eq!(Fixed(SCALE / 2).to_json(), serde_json::json!(0.5));
    }
}
