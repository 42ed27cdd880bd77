//! Accumulators: one per reducer per group, merged in any order with the same result.
//!
//! Count, sum and average are also *retractable* (a view subtracts what a key contributed
//! before it changed); min, max, stats, top-k and distinct are not (a view keeps min and max
//! as multisets instead, `docs/design/mapreduce.md` §10).

use capdb_data::hll::HyperLogLog;
use serde::{Deserialize, Serialize};

use crate::num::{Fixed, WideSum};
use crate::sketch::TopK;

/// A reducer of a spec (its inputs resolved to value slots by [`crate::spec::Plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reducer {
    Count,
    Sum(String),
    Min(String),
    Max(String),
    Avg(String),
    /// count, sum, min, max, mean and (population) standard deviation.
    Stats(String),
    TopK {
        of: crate::extract::Extractor,
        k: u32,
    },
    Distinct {
        of: crate::extract::Extractor,
    },
}

/// What one key gives one reducer.
#[derive(Debug, Clone, Copy)]
pub enum Contribution<'a> {
    /// Count: the key itself.
    One,
    /// Sum, min, max, avg, stats: its number.
    Number(Fixed),
    /// Top-k, distinct: its elements (canonical bytes of each).
    Elements(&'a [Vec<u8>]),
}

/// An accumulator's state.
///
/// 64 bytes: the statistics of a `stats` reducer (128 bytes) are boxed, so the common
/// reducers are held inline in a partial's table (`partial::Accs`) without an allocation
/// per group. Boxing does not change the stored form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    Count(i64),
    Sum(WideSum),
    Min(Option<Fixed>),
    Max(Option<Fixed>),
    Avg { sum: WideSum, n: i64 },
    Stats(Box<Stats>),
    TopK(TopK),
    Distinct(Distinct),
}

// A partial's table holds one inline (`partial::Accs`): keep the rare big states boxed.
const _: () = assert!(std::mem::size_of::<Acc>() <= 64);

/// A distinct count: an HLL, carried in PFADD's bytes (checked whole when read back).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Distinct(pub HyperLogLog);

impl Serialize for Distinct {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Distinct {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Distinct, D::Error> {
        let bytes: Vec<u8> = serde_bytes_vec(d)?;
        HyperLogLog::from_bytes(&bytes)
            .map(Distinct)
            .map_err(|e| serde::de::Error::custom(format!("distinct sketch: {e}")))
    }
}

/// Reads a byte string however the format wrote it (postcard: a length-prefixed sequence).
fn serde_bytes_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_bytes(V)
}

/// Running statistics: exact count, sum, min and max; the mean and the sum of squared
/// deviations in `f64` (Welford's update, Chan et al.'s merge: stable where the naive sum of
/// squares cancels), used only for the standard deviation, which alone may differ in its last
/// bits between merge orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub n: i64,
    pub sum: WideSum,
    pub min: Option<Fixed>,
    pub max: Option<Fixed>,
    pub mean: f64,
    pub m2: f64,
}

/// Why accumulating failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccError {
    /// A sum passed the range of [`Fixed`] (±1.7 × 10²⁹).
    Overflow,
    /// Two partials disagree on a group's reducers (a bug or a corrupt partial).
    Mismatch,
    /// This reducer cannot take a contribution back.
    NotRetractable,
    /// A partial's accumulator is corrupt (a distinct-count sketch that does not read, a
    /// count past `i64`).
    Corrupt,
}

impl std::fmt::Display for AccError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccError::Overflow => "a sum is out of range (about ±1.7e29)",
            AccError::Mismatch => "partials of different specs",
            AccError::NotRetractable => "this reducer cannot retract a contribution",
            AccError::Corrupt => "a corrupt accumulator",
        })
    }
}

/// Counts add exactly; past `i64` only a corrupt partial gets.
fn count(a: i64, b: i64) -> Result<i64, AccError> {
    a.checked_add(b).ok_or(AccError::Corrupt)
}

fn opt(a: Option<Fixed>, b: Option<Fixed>, pick: fn(Fixed, Fixed) -> Fixed) -> Option<Fixed> {
    match (a, b) {
        (Some(x), Some(y)) => Some(pick(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Acc {
    /// The empty accumulator of `r`.
    pub fn new(r: &Reducer) -> Acc {
        match r {
            Reducer::Count => Acc::Count(0),
            Reducer::Sum(_) => Acc::Sum(WideSum::default()),
            Reducer::Min(_) => Acc::Min(None),
            Reducer::Max(_) => Acc::Max(None),
            Reducer::Avg(_) => Acc::Avg {
                sum: WideSum::default(),
                n: 0,
            },
            Reducer::Stats(_) => Acc::Stats(Box::new(Stats {
                n: 0,
                sum: WideSum::default(),
                min: None,
                max: None,
                mean: 0.0,
                m2: 0.0,
            })),
            Reducer::TopK { k, .. } => Acc::TopK(TopK::new(*k)),
            Reducer::Distinct { .. } => Acc::Distinct(Distinct::default()),
        }
    }

    /// Adds one key's contribution.
    pub fn add(&mut self, c: Contribution<'_>) -> Result<(), AccError> {
        match (self, c) {
            (Acc::Count(n), Contribution::One) => *n = count(*n, 1)?,
            (Acc::Sum(s), Contribution::Number(x)) => s.add(x),
            (Acc::Min(m), Contribution::Number(x)) => *m = opt(*m, Some(x), Fixed::min),
            (Acc::Max(m), Contribution::Number(x)) => *m = opt(*m, Some(x), Fixed::max),
            (Acc::Avg { sum, n }, Contribution::Number(x)) => {
                sum.add(x);
                *n = count(*n, 1)?;
            }
            (Acc::Stats(s), Contribution::Number(x)) => {
                s.n = count(s.n, 1)?;
                s.sum.add(x);
                s.min = opt(s.min, Some(x), Fixed::min);
                s.max = opt(s.max, Some(x), Fixed::max);
                let x = x.to_f64();
                let delta = x - s.mean;
                s.mean += delta / s.n as f64;
                s.m2 += delta * (x - s.mean);
            }
            (Acc::TopK(t), Contribution::Elements(es)) => {
                for e in es {
                    t.add(e);
                }
            }
            (Acc::Distinct(d), Contribution::Elements(es)) => {
                for e in es {
                    d.0.add(e).map_err(|_| AccError::Corrupt)?;
                }
            }
            _ => return Err(AccError::Mismatch),
        }
        Ok(())
    }

    /// Takes back a contribution added before (count, sum, avg only).
    pub fn retract(&mut self, c: Contribution<'_>) -> Result<(), AccError> {
        match (self, c) {
            (Acc::Count(n), Contribution::One) => *n = count(*n, -1)?,
            (Acc::Sum(s), Contribution::Number(x)) => s.sub(x),
            (Acc::Avg { sum, n }, Contribution::Number(x)) => {
                sum.sub(x);
                *n = count(*n, -1)?;
            }
            (Acc::Count(_) | Acc::Sum(_) | Acc::Avg { .. }, _) => return Err(AccError::Mismatch),
            _ => return Err(AccError::NotRetractable),
        }
        Ok(())
    }

    /// Whether `other` is the same kind of accumulator (what [`Acc::merge`] needs).
    pub fn same_kind(&self, other: &Acc) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    /// Adds `other` (the same reducer's accumulator from another partial).
    pub fn merge(&mut self, other: &Acc) -> Result<(), AccError> {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => *a = count(*a, *b)?,
            (Acc::Sum(a), Acc::Sum(b)) => a.merge(b),
            (Acc::Min(a), Acc::Min(b)) => *a = opt(*a, *b, Fixed::min),
            (Acc::Max(a), Acc::Max(b)) => *a = opt(*a, *b, Fixed::max),
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                sum.merge(s2);
                *n = count(*n, *n2)?;
            }
            (Acc::Stats(a), Acc::Stats(b)) => {
                if b.n > 0 {
                    let n = count(a.n, b.n)?;
                    let (na, nb, nn) = (a.n as f64, b.n as f64, n as f64);
                    let delta = b.mean - a.mean;
                    a.mean += delta * nb / nn;
                    a.m2 += b.m2 + delta * delta * na * nb / nn;
                    a.n = n;
                    a.sum.merge(&b.sum);
                    a.min = opt(a.min, b.min, Fixed::min);
                    a.max = opt(a.max, b.max, Fixed::max);
                }
            }
            (Acc::TopK(a), Acc::TopK(b)) => a.merge(b),
            (Acc::Distinct(a), Acc::Distinct(b)) => {
                a.0.merge(&b.0).map_err(|_| AccError::Corrupt)?;
            }
            _ => return Err(AccError::Mismatch),
        }
        Ok(())
    }

    /// What a result row shows for this accumulator; `Overflow` when a sum is out of range
    /// (the same in any merge order: [`WideSum`]).
    pub fn to_json(&self) -> Result<serde_json::Value, AccError> {
        use serde_json::{Value, json};
        let num = |f: Option<Fixed>| f.map_or(Value::Null, Fixed::to_json);
        let sum = |s: &WideSum| s.value().ok_or(AccError::Overflow);
        Ok(match self {
            Acc::Count(n) => json!(n),
            Acc::Sum(s) => sum(s)?.to_json(),
            Acc::Min(m) | Acc::Max(m) => num(*m),
            Acc::Avg { sum: s, n } => num(sum(s)?.div_round(*n)),
            Acc::Stats(s) => {
                let total = sum(&s.sum)?;
                let stddev = (s.n > 0).then(|| (s.m2 / s.n as f64).max(0.0).sqrt());
                json!({"count": s.n, "sum": total.to_json(), "min": num(s.min), "max": num(s.max),
                       "mean": num(total.div_round(s.n)), "stddev": stddev})
            }
            Acc::TopK(t) => {
                let top: Vec<Value> = t
                    .top()
                    .into_iter()
                    .map(|r| {
                        let value = crate::extract::Scalar::decode_all(&r.value)
                            .and_then(|mut v| (v.len() == 1).then(|| v.remove(0)))
                            .map_or(Value::Null, |s| s.to_json());
                        if t.is_approximate() {
                            json!({"value": value, "count": r.count, "error": r.error})
                        } else {
                            json!({"value": value, "count": r.count})
                        }
                    })
                    .collect();
                if t.is_approximate() {
                    json!({"top": top, "approximate": true})
                } else {
                    json!({"top": top})
                }
            }
            Acc::Distinct(d) => json!(d.0.count().map_err(|_| AccError::Corrupt)?),
        })
    }

    /// A number to order rows by: counts, sums, min/max, averages; stats by their sum; top-k
    /// by its first count; distinct by its estimate.
    pub fn sort_key(&self) -> Option<Fixed> {
        match self {
            Acc::Count(n) => Some(Fixed::from_int(*n)),
            Acc::Sum(s) => s.value(),
            Acc::Min(m) | Acc::Max(m) => *m,
            Acc::Avg { sum, n } => sum.value().and_then(|s| s.div_round(*n)),
            Acc::Stats(s) => s.sum.value(),
            Acc::TopK(t) => t
                .top()
                .first()
                .map(|r| Fixed::from_int(i64::try_from(r.count).unwrap_or(i64::MAX))),
            Acc::Distinct(d) => {
                d.0.count()
                    .ok()
                    .map(|n| Fixed::from_int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        }
    }

    /// About how many bytes this accumulator holds (the coordinator's memory bound).
    pub fn size_estimate(&self) -> usize {
        std::mem::size_of::<Acc>()
            + match self {
                Acc::TopK(t) => t.bytes(),
                Acc::Distinct(d) => d.0.as_bytes().len(),
                _ => 0,
            }
    }
}
