//! Numbers as Redis parses and prints them.
//!
//! The reference is the Redis these commands are tested against (Debian's 7.0): doubles print
//! as C's `%.17g` (`3.3` is `3.2999999999999998`), `inf`/`-inf` by name.

use capdb_types::mutation::parse_i64_strict;

/// Redis's integer rule (`string2ll`): optional `-`, digits, no `+`, spaces or leading zeros.
pub fn parse_int(raw: &[u8]) -> Option<i64> {
    parse_i64_strict(raw)
}

/// Redis's double rule (`strtod` over the whole argument): no leading space, no trailing
/// characters, `inf`/`-inf`/`infinity` accepted, NaN refused.
pub fn parse_double(raw: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(raw).ok()?;
    let first = *s.as_bytes().first()?;
    if first.is_ascii_whitespace() || s.len() > 5_000 {
        return None;
    }
    let lower = s.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if body.starts_with("nan") {
        return None;
    }
    // Rust accepts "inf"/"infinity" like strtod; it refuses hex floats, which strtod accepts:
    // a documented difference nobody relies on.
    let v: f64 = lower.parse().ok()?;
    (!v.is_nan()).then_some(v)
}

/// Redis's `getDoubleFromObject` (ZADD and ZINCRBY scores, WEIGHTS): [`parse_double`], and
/// what `strtod` flags with `ERANGE` refused too: a finite text too large for a double (`1e309`,
/// which `strtod` rounds to infinity) and a non-zero one too small (`1e-400`, rounded to 0).
/// Spelled-out infinities, zeros and subnormals (`5e-324`) are accepted, as in Redis.
pub fn parse_double_in_range(raw: &[u8]) -> Option<f64> {
    let v = parse_double(raw)?;
    // `raw` is UTF-8 once parse_double accepted it.
    let lower = String::from_utf8_lossy(raw).to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if v.is_infinite() && !body.starts_with("inf") {
        return None;
    }
    let mantissa = body.split('e').next().unwrap_or(body);
    if v == 0.0 && mantissa.bytes().any(|c| (b'1'..=b'9').contains(&c)) {
        return None;
    }
    Some(v)
}

/// C's `printf("%.17g", x)`, with `inf`/`-inf` as Redis prints them.
pub fn format_double(x: f64) -> String {
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // 17 significant digits: d.dddddddddddddddd e X
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::with_capacity(24);
    if negative {
        out.push('-');
    }
    if !(-4..17).contains(&exp) {
        let trimmed = digits.trim_end_matches('0');
        out.push_str(&trimmed[..1]);
        if trimmed.len() > 1 {
            out.push('.');
            out.push_str(&trimmed[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
        return out;
    }
    // Fixed notation with 17 significant digits, trailing zeros (and a bare point) removed.
    let point = exp + 1; // digits before the decimal point
    let (int_part, frac_part) = if point <= 0 {
        (
            "0".to_string(),
            format!("{}{}", "0".repeat((-point) as usize), digits),
        )
    } else {
        let p = point as usize;
        (digits[..p].to_string(), digits[p..].to_string())
    };
    out.push_str(&int_part);
    let frac = frac_part.trim_end_matches('0');
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// Redis 7.0's `d2string`, the text a score is stored as in a listpack (and what ZSCAN of a
/// compact sorted set answers): an integral value within ±2^62 as an integer
/// (`123456789012345680`, where `%.17g` is `1.2345678901234568e+17`), anything else as
/// [`format_double`].
pub fn format_double_listpack(x: f64) -> String {
    const LIMIT: f64 = 4_611_686_018_427_387_904.0; // (double)(LLONG_MAX / 2)
    if x != 0.0 && (-LIMIT..=LIMIT).contains(&x) && x.fract() == 0.0 {
        // In range and integral: the cast is exact.
        return (x as i64).to_string();
    }
    format_double(x)
}

/// How Redis prints the result of INCRBYFLOAT/HINCRBYFLOAT (`%.17Lf`, trailing zeros removed).
///
/// Redis computes these in C `long double` (80-bit on x86-64), whose 17 printed decimals of a
/// short decimal sum are that sum (`10.5 + 0.1` prints `10.6`). capdb computes in `f64` and
/// prints the shortest decimal that reads back as the same `f64`, in fixed notation: the same
/// text whenever the `f64` sum is the nearest double to the decimal one, but not always
/// (`0.1 + 0.2` is `0.3` in Redis, `0.30000000000000004` here). Documented in the README.
pub fn format_long_double_human(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    format!("{x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_print_like_percent_17g() {
        // Each pair was printed by redis-server 7.0.15 (ZSCORE / ZRANGE WITHSCORES).
        for (x, want) in [
            (3.3, "3.2999999999999998"),
            (1e21, "1e+21"),
            (0.0001, "0.0001"),
            (0.00001, "1.0000000000000001e-05"),
            (1e17, "1e+17"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (10.0, "10"),
            (-2.5, "-2.5"),
            (1.5, "1.5"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (0.0, "0"),
            (12345678901234567.0, "12345678901234568"),
        ] {
            assert_eq!(format_double(x), want, "{x}");
        }
    }

    #[test]
    fn doubles_parse_like_strtod_over_the_whole_argument() {
        assert_eq!(parse_double(b"1.5"), Some(1.5));
        assert_eq!(parse_double(b"-inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_double(b"+inf"), Some(f64::INFINITY));
        assert_eq!(parse_double(b"1e3"), Some(1000.0));
        for bad in [&b" 1"[..], b"1 ", b"", b"nan", b"abc", b"1.5x"] {
            assert_eq!(parse_double(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn listpack_scores_print_integers_whole_like_d2string() {
        // Each pair was answered by redis-server 7.0.15 (ZSCAN of a listpack sorted set).
        for (x, want) in [
            (123456789012345678.0, "123456789012345680"),
            (4611686018427387904.0, "4611686018427387904"),
            (-4611686018427387904.0, "-4611686018427387904"),
            (9223372036854775807.0, "9.2233720368547758e+18"),
            (1e17, "100000000000000000"),
            (100.0, "100"),
            (-2.5, "-2.5"),
            (0.1, "0.10000000000000001"),
            (1e300, "1.0000000000000001e+300"),
            (5e-324, "4.9406564584124654e-324"),
            (0.0, "0"),
            (-0.0, "-0"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(format_double_listpack(x), want, "{x}");
        }
    }

    #[test]
    fn doubles_out_of_range_are_refused_where_redis_checks_erange() {
        // Each verdict was given by redis-server 7.0.15 (ZADD).
        for bad in [&b"1e309"[..], b"-1e309", b"1e-400", b"-2e-999", b"0.1e-400"] {
            assert!(parse_double(bad).is_some(), "{bad:?}");
            assert_eq!(parse_double_in_range(bad), None, "{bad:?}");
        }
        for (good, v) in [
            (&b"inf"[..], f64::INFINITY),
            (b"-Infinity", f64::NEG_INFINITY),
            (b"1.7976931348623157e308", f64::MAX),
            (b"5e-324", 5e-324),
            (b"0e-400", 0.0),
            (b"-0", -0.0),
            (b"0.000", 0.0),
            (b"2.5", 2.5),
        ] {
            assert_eq!(parse_double_in_range(good), Some(v), "{good:?}");
        }
        assert_eq!(parse_double_in_range(b"nan"), None);
    }

    #[test]
    fn long_doubles_print_fixed_without_trailing_zeros() {
        assert_eq!(format_long_double_human(10.6), "10.6");
        assert_eq!(format_long_double_human(3.0), "3");
        assert_eq!(format_long_double_human(-0.5), "-0.5");
    }
}
