//! A task's partial result: group → accumulators, with what it scanned; how a task adds keys
//! to one, how partials merge, their wire and storage form, and the final rows.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::acc::{Acc, AccError, Contribution, Reducer};
use crate::extract::{Extractor, Notes, Scalar, found_ref};
use crate::group_key::GroupKey;
use crate::json_path::{JsonPath, PATHS_PER_PASS_MAX, find_all};
use crate::sketch::VALUE_BYTES_MAX;
use crate::spec::JobSpec;

/// Why a job cannot go on (each ends it; the message names what to change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// More groups than `limits.groups_max`.
    GroupsMax { max: u64 },
    /// A reducer's sum left the range of exact numbers, in this group.
    Overflow { group: String, reducer: String },
    /// A partial that does not decode or whose accumulators do not fit the spec.
    Corrupt(String),
    /// A spec a plan cannot be made of (built by hand, not by [`JobSpec::parse`]).
    Spec(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::GroupsMax { max } => {
                write!(
                    f,
                    "more than {max} groups (raise limits.groups_max, up to 4000000)"
                )
            }
            JobError::Overflow { group, reducer } => {
                write!(
                    f,
                    "reducer {reducer:?} of group {group}: a sum out of range (about ±1.7e29)"
                )
            }
            JobError::Corrupt(why) => write!(f, "corrupt partial result: {why}"),
            JobError::Spec(why) => write!(f, "spec: {why}"),
        }
    }
}

/// What a reducer takes from a key.
#[derive(Debug, Clone)]
enum Feed {
    One,
    /// The number in this value slot.
    Value(usize),
    /// The elements this extractor finds: for a top-k, canonical scalar bytes (strings cut
    /// to [`VALUE_BYTES_MAX`]); for a distinct count, a string's own bytes (so the HLL
    /// agrees with one PFADD built from the same strings) and other scalars' canonical bytes.
    Elements {
        of: Extractor,
        raw_strings: bool,
    },
}

/// A spec compiled for scanning: value slots resolved, reducers in a fixed order.
#[derive(Debug, Clone)]
pub struct Plan {
    spec: JobSpec,
    values: Vec<Extractor>,
    reducers: Vec<(String, Reducer, Feed)>,
    /// The distinct JSON paths the group and value extractors read, when there are two to
    /// [`PATHS_PER_PASS_MAX`] of them: each value is then scanned once for all
    /// (`json_path::find_all`), and each extractor takes its answer by slot.
    one_pass: Vec<JsonPath>,
    group_slots: Vec<Option<usize>>,
    value_slots: Vec<Option<usize>>,
}

/// A partial result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Partial {
    /// Canonical group bytes ([`Scalar::encode`] of each part) → one accumulator per reducer,
    /// in the plan's order.
    groups: HashMap<GroupKey, Accs, foldhash::fast::FixedState>,
    /// Keys read (under the scan prefix, matching the pattern).
    pub keys: u64,
    /// Keys some extractor found nothing in.
    pub skipped: u64,
    /// Keys with a number past 9 decimals (rounded half to even).
    pub rounded: u64,
    /// Bytes of keys and values read.
    pub bytes: u64,
}

/// What one key gives a view ([`Plan::map_key`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// Canonical group bytes: one, or one per word when the group has words in it.
    pub groups: smallvec::SmallVec<[GroupKey; 1]>,
    /// One number per value slot, in the plan's order.
    pub numbers: smallvec::SmallVec<[crate::num::Fixed; 2]>,
    /// Some number had more than 9 decimals (rounded half to even).
    pub rounded: bool,
}

/// A group's accumulators, one per reducer in the plan's order: inline for one reducer (the
/// common job), so a group of a million costs no allocation of its own.
pub type Accs = smallvec::SmallVec<[Acc; 1]>;

/// The stored form's version.
const FORMAT: u8 = 1;

/// A partial's stored form, written from borrowed groups: the bytes an owned
/// `Vec<(Vec<u8>, Vec<Acc>)>` of groups gives (a slice serializes as a `Vec` does).
#[derive(Serialize)]
struct WireRef<'a> {
    keys: u64,
    skipped: u64,
    rounded: u64,
    bytes: u64,
    groups: Vec<(ByteStr<'a>, &'a [Acc])>,
}

/// A group's bytes, written at once: postcard writes a byte string as it writes a `Vec<u8>`
/// (its length, then the bytes), but the sequence path takes each byte through the
/// serializer in turn.
struct ByteStr<'a>(&'a [u8]);

impl Serialize for ByteStr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// The least bytes a group takes in the stored form (its key's length, its accumulators'
/// count, an accumulator's variant and value): what bounds the room reserved for a count
/// read from the stored form.
const GROUP_BYTES_MIN: usize = 4;

impl Plan {
    pub fn new(spec: JobSpec) -> Result<Plan, JobError> {
        let names: Vec<String> = spec.values.keys().cloned().collect();
        let values: Vec<Extractor> = spec.values.values().cloned().collect();
        let slot = |n: &String| {
            names
                .iter()
                .position(|x| x == n)
                .ok_or_else(|| JobError::Spec(format!("{n:?} is not a name in map.values")))
        };
        let mut reducers = Vec::with_capacity(spec.reduce.len());
        for (name, r) in &spec.reduce {
            let feed = match r {
                Reducer::Count => Feed::One,
                Reducer::Sum(v)
                | Reducer::Min(v)
                | Reducer::Max(v)
                | Reducer::Avg(v)
                | Reducer::Stats(v) => Feed::Value(slot(v)?),
                Reducer::TopK { of, .. } => Feed::Elements {
                    of: of.clone(),
                    raw_strings: false,
                },
                Reducer::Distinct { of } => Feed::Elements {
                    of: of.clone(),
                    raw_strings: true,
                },
            };
            reducers.push((name.clone(), r.clone(), feed));
        }
        let mut one_pass: Vec<JsonPath> = Vec::new();
        let mut slot_of = |e: &Extractor| match e {
            Extractor::Json(path) => Some(match one_pass.iter().position(|p| p == path) {
                Some(i) => i,
                None => {
                    one_pass.push(path.clone());
                    one_pass.len() - 1
                }
            }),
            _ => None,
        };
        let mut group_slots: Vec<Option<usize>> = spec.group.iter().map(&mut slot_of).collect();
        let mut value_slots: Vec<Option<usize>> = values.iter().map(&mut slot_of).collect();
        if !(2..=PATHS_PER_PASS_MAX).contains(&one_pass.len()) {
            one_pass.clear();
            group_slots.iter_mut().for_each(|s| *s = None);
            value_slots.iter_mut().for_each(|s| *s = None);
        }
        Ok(Plan {
            spec,
            values,
            reducers,
            one_pass,
            group_slots,
            value_slots,
        })
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// An empty partial of this plan.
    pub fn partial(&self) -> Partial {
        Partial::default()
    }

    /// Adds one key and its (string) value to `p`. The caller has checked that the key is
    /// under the scan prefix; keys the pattern rejects are ignored here.
    pub fn add(&self, p: &mut Partial, key: &[u8], value: &[u8]) -> Result<(), JobError> {
        if !self.spec.input.wants(key) {
            return Ok(());
        }
        p.keys += 1;
        p.bytes += (key.len() + value.len()) as u64;
        let Some(mapped) = self.map_key(key, value) else {
            p.skipped += 1;
            return Ok(());
        };
        let mut notes = Notes {
            rounded: mapped.rounded,
        };
        let mut elements: Vec<Vec<Vec<u8>>> = Vec::new();
        for (_, _, feed) in &self.reducers {
            if let Feed::Elements { of, raw_strings } = feed {
                let mut found = Vec::new();
                if !of.extract(key, value, &mut found, &mut notes) {
                    p.skipped += 1;
                    return Ok(());
                }
                elements.push(
                    found
                        .into_iter()
                        .map(|s| match s {
                            Scalar::Str(raw) if *raw_strings => raw,
                            Scalar::Str(mut text) => {
                                text.truncate(VALUE_BYTES_MAX);
                                let mut b = Vec::with_capacity(text.len() + 5);
                                Scalar::Str(text).encode(&mut b);
                                b
                            }
                            other => {
                                let mut b = Vec::new();
                                other.encode(&mut b);
                                b
                            }
                        })
                        .collect(),
                );
            }
        }
        if notes.rounded {
            p.rounded += 1;
        }
        for group in &mapped.groups {
            self.add_to_group(p, group, &mapped.numbers, &elements)?;
        }
        Ok(())
    }

    /// With a Lua map: counts one key read (the pattern judged here, as in [`Plan::add`]);
    /// whether the map is to be called for it.
    pub fn read_key(&self, p: &mut Partial, key: &[u8], value: &[u8]) -> bool {
        if !self.spec.input.wants(key) {
            return false;
        }
        p.keys += 1;
        p.bytes += (key.len() + value.len()) as u64;
        true
    }

    /// The value slot of a name in `map.values` (what a Lua emit's numbers are matched to).
    pub fn value_slot(&self, name: &str) -> Option<usize> {
        self.spec.values.keys().position(|n| n == name)
    }

    /// Adds one emit of a Lua map: its group's parts and a number per value slot (`None`:
    /// the emit lacked it, and is skipped, counted as a key is).
    pub fn add_emit(
        &self,
        p: &mut Partial,
        group: &[Scalar],
        numbers: &[Option<crate::num::Fixed>],
        rounded: bool,
    ) -> Result<(), JobError> {
        let Some(numbers) = numbers.iter().copied().collect::<Option<Vec<_>>>() else {
            p.skipped += 1;
            return Ok(());
        };
        if rounded {
            p.rounded += 1;
        }
        let mut encoded = Vec::new();
        for s in group {
            s.encode(&mut encoded);
        }
        self.add_to_group(p, &GroupKey::new(&encoded), &numbers, &[])
    }

    /// The groups and numbers one key gives (what a view keeps; top-k and distinct elements
    /// aside), or `None` when an extractor of the group or of a value finds nothing (the key
    /// is skipped). The caller has checked [`crate::spec::Input::wants`].
    ///
    /// Every key of a job or a view write passes here: in the common shape (one group part
    /// that is not words, JSON fields read in one pass) it allocates nothing.
    pub fn map_key(&self, key: &[u8], value: &[u8]) -> Option<Mapped> {
        let mut notes = Notes::default();
        // Every JSON field the extractors read, from one pass over the value (a value that is
        // not JSON fails every one of them).
        let pre = if self.one_pass.is_empty() {
            None
        } else {
            Some(find_all(value, &self.one_pass).ok()?)
        };
        let mut found: Vec<Scalar> = Vec::new();
        let mut numbers = smallvec::SmallVec::new();
        for (e, slot) in self.values.iter().zip(&self.value_slots) {
            let (n, rounded) = match (slot, &pre) {
                (Some(i), Some(pre)) => found_ref(pre[*i].as_ref()?, &mut notes)?.to_number()?,
                _ => {
                    found.clear();
                    if !e.extract(key, value, &mut found, &mut notes) {
                        return None;
                    }
                    found.first()?.to_number()?
                }
            };
            notes.rounded |= rounded;
            numbers.push(n);
        }
        // The common shape, one part that is not words (one scalar): its bytes are the group,
        // with no list of parts to build.
        if let [only] = self.spec.group.as_slice()
            && !matches!(only, Extractor::Words(_))
        {
            let mut bytes: smallvec::SmallVec<[u8; 32]> = smallvec::SmallVec::new();
            match (self.group_slots[0], &pre) {
                (Some(i), Some(pre)) => found_ref(pre[i].as_ref()?, &mut notes)?.encode(&mut bytes),
                _ => {
                    found.clear();
                    if !only.extract(key, value, &mut found, &mut notes) {
                        return None;
                    }
                    found.first()?.as_ref().encode(&mut bytes);
                }
            }
            return Some(Mapped {
                groups: smallvec::smallvec![GroupKey::new(&bytes)],
                numbers,
                rounded: notes.rounded,
            });
        }
        // The group's parts; one of them may give several scalars (words).
        let mut parts: Vec<Vec<Scalar>> = Vec::with_capacity(self.spec.group.len());
        for (e, slot) in self.spec.group.iter().zip(&self.group_slots) {
            let mut found = Vec::new();
            let got = match (slot, &pre) {
                (Some(i), Some(pre)) => e.take_found(pre[*i].clone(), &mut found, &mut notes),
                _ => e.extract(key, value, &mut found, &mut notes),
            };
            if !got || found.is_empty() {
                return None;
            }
            parts.push(found);
        }
        // One group per scalar of the multi-valued part (the others have one each).
        let fan = parts.iter().map(Vec::len).max().unwrap_or(1);
        let mut groups = smallvec::SmallVec::with_capacity(fan);
        let mut group = Vec::new();
        for i in 0..fan {
            group.clear();
            for part in &parts {
                part[i.min(part.len() - 1)].encode(&mut group);
            }
            groups.push(GroupKey::new(&group));
        }
        Some(Mapped {
            groups,
            numbers,
            rounded: notes.rounded,
        })
    }

    /// Each reducer in the plan's order: its name, and the value slot it reads (`None`: a
    /// count, or a top-k or distinct, which read elements).
    pub fn reducers(&self) -> impl Iterator<Item = (&str, &Reducer, Option<usize>)> {
        self.reducers.iter().map(|(name, r, feed)| {
            let slot = match feed {
                Feed::Value(slot) => Some(*slot),
                Feed::One | Feed::Elements { .. } => None,
            };
            (name.as_str(), r, slot)
        })
    }

    /// One empty accumulator per reducer, in the plan's order.
    pub fn empty_accs(&self) -> Vec<Acc> {
        self.reducers.iter().map(|(_, r, _)| Acc::new(r)).collect()
    }

    fn add_to_group(
        &self,
        p: &mut Partial,
        group: &GroupKey,
        numbers: &[crate::num::Fixed],
        elements: &[Vec<Vec<u8>>],
    ) -> Result<(), JobError> {
        let accs = match p.groups.get_mut(group) {
            Some(accs) => accs,
            None => {
                if p.groups.len() as u64 >= self.spec.limits.groups_max {
                    return Err(JobError::GroupsMax {
                        max: self.spec.limits.groups_max,
                    });
                }
                let fresh = self.reducers.iter().map(|(_, r, _)| Acc::new(r)).collect();
                p.groups.entry(group.clone()).or_insert(fresh)
            }
        };
        let mut next_elements = elements.iter();
        for ((_, _, feed), acc) in self.reducers.iter().zip(accs.iter_mut()) {
            let c = match feed {
                Feed::One => Contribution::One,
                Feed::Value(slot) => Contribution::Number(numbers[*slot]),
                Feed::Elements { .. } => {
                    Contribution::Elements(next_elements.next().map_or(&[][..], |v| &v[..]))
                }
            };
            acc.add(c).map_err(|e| JobError::Corrupt(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether `p` has this plan's shape: one accumulator of each reducer's kind per group.
    pub fn check(&self, p: &Partial) -> Result<(), JobError> {
        let empty: Vec<Acc> = self.reducers.iter().map(|(_, r, _)| Acc::new(r)).collect();
        for accs in p.groups.values() {
            if accs.len() != empty.len() || accs.iter().zip(&empty).any(|(a, e)| !a.same_kind(e)) {
                return Err(JobError::Corrupt("a partial of another spec".into()));
            }
        }
        Ok(())
    }

    /// Adds `other` into `into`. Checked first (shape, the group limit), so an error leaves
    /// `into` as it was; only a corrupt accumulator found while merging (a sketch that does
    /// not read) leaves it half merged, and that ends the job.
    pub fn merge(&self, into: &mut Partial, other: &Partial) -> Result<(), JobError> {
        self.admit(into, other)?;
        if into.groups.is_empty() {
            into.groups = other.groups.clone();
            return Ok(());
        }
        for (group, accs) in &other.groups {
            match into.groups.get_mut(group) {
                Some(mine) => {
                    for (a, b) in mine.iter_mut().zip(accs) {
                        a.merge(b).map_err(|e| JobError::Corrupt(e.to_string()))?;
                    }
                }
                None => {
                    into.groups.insert(group.clone(), accs.clone());
                }
            }
        }
        Ok(())
    }

    /// Before a merge of `other` into `into`: checks `other`'s shape and the group limit (an
    /// error changes nothing), then adds its counts; answers how many of its groups are new.
    fn admit(&self, into: &mut Partial, other: &Partial) -> Result<usize, JobError> {
        self.check(other)?;
        let new_groups = other
            .groups
            .keys()
            .filter(|g| !into.groups.contains_key(*g))
            .count();
        if (into.groups.len() + new_groups) as u64 > self.spec.limits.groups_max {
            return Err(JobError::GroupsMax {
                max: self.spec.limits.groups_max,
            });
        }
        into.keys += other.keys;
        into.skipped += other.skipped;
        into.rounded += other.rounded;
        into.bytes += other.bytes;
        Ok(new_groups)
    }

    /// [`Plan::merge`], taking `other`: its groups move into `into` rather than being copied
    /// (the coordinator's merge of a task's output of a million groups).
    pub fn merge_owned(&self, into: &mut Partial, other: Partial) -> Result<(), JobError> {
        let new_groups = self.admit(into, &other)?;
        if into.groups.is_empty() {
            into.groups = other.groups;
            return Ok(());
        }
        into.groups.reserve(new_groups);
        for (group, accs) in other.groups {
            match into.groups.entry(group) {
                std::collections::hash_map::Entry::Occupied(mut mine) => {
                    for (a, b) in mine.get_mut().iter_mut().zip(&accs) {
                        a.merge(b).map_err(|e| JobError::Corrupt(e.to_string()))?;
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(accs);
                }
            }
        }
        Ok(())
    }

    /// The result rows, ordered and limited as the spec's output says: each
    /// `{"group": …, "<reducer>": …}`, the group a scalar (one part), an array (several) or
    /// `null` (none). Groups order by their values (numbers as numbers, strings by bytes;
    /// null, then booleans, numbers, strings), ascending also as the tie-break of `order_by`
    /// and of `desc`. A sum
    /// out of range ends the job here, naming its group and reducer.
    pub fn rows(&self, p: &Partial) -> Result<Vec<Value>, JobError> {
        self.check(p)?;
        self.rows_of(p.groups.iter())
    }

    /// [`Plan::rows`] of a merged result (its runs merged first).
    pub fn merged_rows(&self, m: &mut Merged) -> Result<Vec<Value>, JobError> {
        let run = self.collapse(m)?;
        self.rows_of(run.iter().map(|(g, a)| (g, a)))
    }

    fn rows_of<'p>(
        &self,
        groups: impl ExactSizeIterator<Item = (&'p GroupKey, &'p Accs)>,
    ) -> Result<Vec<Value>, JobError> {
        let order = self.ordered(groups);
        let mut rows = Vec::with_capacity(order.len());
        for (parts, accs) in order {
            let mut row = Map::new();
            row.insert("group".into(), group_json(&parts));
            for ((name, _, _), value) in self.reducers.iter().zip(self.values(&parts, accs)?) {
                row.insert(name.clone(), value);
            }
            rows.push(Value::Object(row));
        }
        Ok(rows)
    }

    /// The rows of [`Plan::rows`] as JSON texts, the same bytes `Value::to_string` gives
    /// (keys in byte order), written without building each row: a result of a million
    /// groups is written in a fraction of the time.
    pub fn rows_text(&self, p: &Partial) -> Result<Vec<String>, JobError> {
        self.check(p)?;
        self.rows_text_of(p.groups.iter())
    }

    /// [`Plan::rows_text`] of a merged result (its runs merged first).
    pub fn merged_rows_text(&self, m: &mut Merged) -> Result<Vec<String>, JobError> {
        let run = self.collapse(m)?;
        self.rows_text_of(run.iter().map(|(g, a)| (g, a)))
    }

    fn rows_text_of<'p>(
        &self,
        groups: impl ExactSizeIterator<Item = (&'p GroupKey, &'p Accs)>,
    ) -> Result<Vec<String>, JobError> {
        // `None`: the group; `Some(i)`: reducer i. In the order a JSON object's keys print.
        let mut keys: Vec<(&str, Option<usize>)> = vec![("group", None)];
        keys.extend(
            self.reducers
                .iter()
                .enumerate()
                .map(|(i, (name, _, _))| (name.as_str(), Some(i))),
        );
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let keys: Vec<(String, Option<usize>)> = keys
            .into_iter()
            .map(|(k, i)| (Value::String(k.to_string()).to_string(), i))
            .collect();
        let order = self.ordered(groups);
        let mut rows = Vec::with_capacity(order.len());
        for (parts, accs) in order {
            let values = self.values(&parts, accs)?;
            let mut row = String::from("{");
            for (n, (key, slot)) in keys.iter().enumerate() {
                if n > 0 {
                    row.push(',');
                }
                row.push_str(key);
                row.push(':');
                let text = match slot {
                    None => group_json(&parts).to_string(),
                    Some(i) => values[*i].to_string(),
                };
                row.push_str(&text);
            }
            row.push('}');
            rows.push(row);
        }
        Ok(rows)
    }

    /// `groups` (checked by the caller), ordered and limited as the spec's output says.
    fn ordered<'p>(
        &self,
        groups: impl ExactSizeIterator<Item = (&'p GroupKey, &'p Accs)>,
    ) -> Vec<Row<'p>> {
        let by = self
            .spec
            .output
            .order_by
            .as_ref()
            .and_then(|name| self.reducers.iter().position(|(n, _, _)| n == name));
        let mut order: Vec<(Option<crate::num::Fixed>, Vec<Scalar>, &Accs)> = groups
            .map(|(g, accs)| {
                let key = by.and_then(|i| accs.get(i)).and_then(Acc::sort_key);
                (
                    key,
                    Scalar::decode_all(g.as_bytes()).unwrap_or_default(),
                    accs,
                )
            })
            .collect();
        // By the reducer (descending when asked), then by group, ascending; ordered by group
        // alone, `desc` reverses the groups.
        // Groups are distinct, so any sort orders them the same; a stable one finds runs
        // already in order (a merged result is in byte order, which is the groups' order
        // for numbers that are not negative) and does not sort them again.
        order.sort_by(|a, b| {
            if by.is_none() {
                let groups = a.1.cmp(&b.1);
                return if self.spec.output.desc {
                    groups.reverse()
                } else {
                    groups
                };
            }
            let primary = a.0.cmp(&b.0);
            let primary = if self.spec.output.desc {
                primary.reverse()
            } else {
                primary
            };
            primary.then_with(|| a.1.cmp(&b.1))
        });
        let limit = self.spec.output.limit.map_or(usize::MAX, |l| l as usize);
        order
            .into_iter()
            .take(limit)
            .map(|(_, parts, accs)| (parts, accs))
            .collect()
    }

    /// One row's reducer values, in the plan's order (a sum out of range names its group).
    fn values(&self, parts: &[Scalar], accs: &[Acc]) -> Result<Vec<Value>, JobError> {
        self.reducers
            .iter()
            .zip(accs)
            .map(|((name, _, _), acc)| {
                acc.to_json().map_err(|e| match e {
                    AccError::Overflow => JobError::Overflow {
                        group: Value::Array(parts.iter().map(Scalar::to_json).collect())
                            .to_string(),
                        reducer: name.clone(),
                    },
                    other => JobError::Corrupt(other.to_string()),
                })
            })
            .collect()
    }
}

/// A result row before it is written: its group's parts and its accumulators.
type Row<'p> = (Vec<Scalar>, &'p Accs);

/// A row's group: a scalar (one part), an array (several) or `null` (none).
fn group_json(parts: &[Scalar]) -> Value {
    match parts.len() {
        0 => Value::Null,
        1 => parts[0].to_json(),
        _ => Value::Array(parts.iter().map(Scalar::to_json).collect()),
    }
}

impl Partial {
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Sets one group's accumulators (a view's merged row; [`Plan::check`] judges the shape).
    pub fn insert_group(&mut self, group: Vec<u8>, accs: Vec<Acc>) {
        self.groups
            .insert(GroupKey::new(&group), Accs::from_vec(accs));
    }

    /// The accumulators of one group.
    pub fn group(&self, group: &[u8]) -> Option<&[Acc]> {
        self.groups.get(&GroupKey::new(group)).map(|a| a.as_slice())
    }

    /// About how many bytes it holds in memory.
    pub fn size_estimate(&self) -> usize {
        self.groups
            .iter()
            .map(|(g, accs)| {
                56 + g.as_bytes().len() + accs.iter().map(Acc::size_estimate).sum::<usize>()
            })
            .sum()
    }

    /// `[format u8] [crc32 LE of what follows] postcard(...)`, groups in key order.
    ///
    /// Written from borrowed groups into one buffer sized from [`Partial::size_estimate`]
    /// (above the stored size), so a partial of a million groups is neither copied nor
    /// regrown while it is written.
    pub fn encode(&self) -> Vec<u8> {
        let mut sorted: Vec<(&GroupKey, &Accs)> = self.groups.iter().collect();
        // Keys are distinct: an unstable sort gives the one order.
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        self.encode_groups(sorted.into_iter(), self.size_estimate())
    }

    /// The stored form of `sorted` (groups in key order, each once) with this partial's
    /// counts, in one buffer of `capacity` (above the stored size).
    fn encode_groups<'g>(
        &self,
        sorted: impl Iterator<Item = (&'g GroupKey, &'g Accs)>,
        capacity: usize,
    ) -> Vec<u8> {
        let groups = sorted
            .map(|(g, a)| (ByteStr(g.as_bytes()), a.as_slice()))
            .collect();
        let wire = WireRef {
            keys: self.keys,
            skipped: self.skipped,
            rounded: self.rounded,
            bytes: self.bytes,
            groups,
        };
        let mut out = Vec::with_capacity(64 + capacity);
        out.push(FORMAT);
        out.extend_from_slice(&[0; 4]);
        // Encoding plain data into a Vec cannot fail.
        let mut out = postcard::to_extend(&wire, out).unwrap_or_default();
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The partial `raw` holds, checked (format, checksum, shape).
    pub fn decode(raw: &[u8]) -> Result<Partial, JobError> {
        let [format, c0, c1, c2, c3, body @ ..] = raw else {
            return Err(JobError::Corrupt(format!("{} bytes", raw.len())));
        };
        if *format != FORMAT {
            return Err(JobError::Corrupt(format!("unknown format {format}")));
        }
        if crc32fast::hash(body) != u32::from_le_bytes([*c0, *c1, *c2, *c3]) {
            return Err(JobError::Corrupt("checksum mismatch".into()));
        }
        let run = Run::decode(raw)?;
        let mut groups = HashMap::with_capacity_and_hasher(
            run.groups.len(),
            foldhash::fast::FixedState::default(),
        );
        groups.extend(run.groups);
        Ok(Partial {
            groups,
            keys: run.keys,
            skipped: run.skipped,
            rounded: run.rounded,
            bytes: run.bytes,
        })
    }
}

/// A partial result as it is stored: its groups in key order. What a coordinator merges
/// (into a [`Merged`]) without building a table of it first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    groups: Vec<(GroupKey, Accs)>,
    pub keys: u64,
    pub skipped: u64,
    pub rounded: u64,
    pub bytes: u64,
}

impl Run {
    /// The run `raw` ([`Partial::encode`]) holds, checked: format, checksum, group keys that
    /// read, in strictly ascending order (what a linear merge needs).
    pub fn decode(raw: &[u8]) -> Result<Run, JobError> {
        let [format, c0, c1, c2, c3, body @ ..] = raw else {
            return Err(JobError::Corrupt(format!("{} bytes", raw.len())));
        };
        if *format != FORMAT {
            return Err(JobError::Corrupt(format!("unknown format {format}")));
        }
        if crc32fast::hash(body) != u32::from_le_bytes([*c0, *c1, *c2, *c3]) {
            return Err(JobError::Corrupt("checksum mismatch".into()));
        }
        // `WireRef`'s fields in order (a sequence's length is written as a u64 is), then the
        // groups one by one: serde's `Vec` would reserve at most 1 MiB up front and regrow a
        // million groups' worth of memory several times.
        let corrupt = |e: postcard::Error| JobError::Corrupt(e.to_string());
        let ((keys, skipped, rounded, bytes, count), mut rest): ((u64, u64, u64, u64, u64), _) =
            postcard::take_from_bytes(body).map_err(corrupt)?;
        let count = usize::try_from(count).map_err(|_| JobError::Corrupt("group count".into()))?;
        let mut groups: Sorted = Vec::with_capacity(count.min(rest.len() / GROUP_BYTES_MIN));
        for _ in 0..count {
            let ((key, accs), next): ((GroupKey, Accs), _) =
                postcard::take_from_bytes(rest).map_err(corrupt)?;
            rest = next;
            if !Scalar::reads_all(key.as_bytes()) {
                return Err(JobError::Corrupt("a group key that does not decode".into()));
            }
            if groups.last().is_some_and(|(last, _)| *last >= key) {
                return Err(JobError::Corrupt("groups out of order".into()));
            }
            groups.push((key, accs));
        }
        Ok(Run {
            groups,
            keys,
            skipped,
            rounded,
            bytes,
        })
    }

    pub fn groups(&self) -> usize {
        self.groups.len()
    }
}

/// Sorted groups, each once.
type Sorted = Vec<(GroupKey, Accs)>;

/// Many partial results merged: a coordinator's answer so far.
///
/// # Why runs, not one table
///
/// A task's output is already sorted by group (its stored form), so two outputs merge in one
/// pass over both, comparing keys in order: no hashing, no table to grow, memory read in
/// sequence. Merging each output into one growing result would cost the result's size per
/// task, so the result is kept as sorted runs, each more than twice the size of the next
/// (a run that grows past that merges with the one before it): merging `n` groups in any
/// shape of outputs costs `O(n log n)`, and a job whose tasks each see most groups (the
/// worst case for combining) merges each output once into the result. [`Plan::merged_rows`]
/// merges the runs into one first.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    runs: Vec<Sorted>,
    /// Groups added (a group once per run) since the runs were last merged into one.
    added: usize,
    pub keys: u64,
    pub skipped: u64,
    pub rounded: u64,
    pub bytes: u64,
}

impl Merged {
    /// The groups held over all runs: exact when there is one run, else an upper bound (a
    /// group may be in several).
    pub fn groups_at_most(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    /// About how many bytes it holds in memory (as [`Partial::size_estimate`]).
    pub fn size_estimate(&self) -> usize {
        self.runs
            .iter()
            .flatten()
            .map(|(g, accs)| {
                56 + g.as_bytes().len() + accs.iter().map(Acc::size_estimate).sum::<usize>()
            })
            .sum()
    }
}

/// `a` and `b` as one sorted run, the accumulators of a group in both merged.
fn merge_sorted(a: Sorted, b: Sorted) -> Result<Sorted, JobError> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
        match x.0.cmp(&y.0) {
            std::cmp::Ordering::Less => out.extend(a.next()),
            std::cmp::Ordering::Greater => out.extend(b.next()),
            std::cmp::Ordering::Equal => {
                if let (Some((key, mut mine)), Some((_, theirs))) = (a.next(), b.next()) {
                    for (m, t) in mine.iter_mut().zip(&theirs) {
                        m.merge(t).map_err(|e| JobError::Corrupt(e.to_string()))?;
                    }
                    out.push((key, mine));
                }
            }
        }
    }
    out.extend(a);
    out.extend(b);
    Ok(out)
}

impl Plan {
    /// Whether `r` has this plan's shape ([`Plan::check`]).
    pub fn check_run(&self, r: &Run) -> Result<(), JobError> {
        let empty = self.empty_accs();
        for (_, accs) in &r.groups {
            if accs.len() != empty.len() || accs.iter().zip(&empty).any(|(a, e)| !a.same_kind(e)) {
                return Err(JobError::Corrupt("a partial of another spec".into()));
            }
        }
        Ok(())
    }

    /// Adds `run` into `into`. Its shape is checked first (an error changes nothing); more
    /// groups than `limits.groups_max`, or an accumulator that does not merge (a corrupt
    /// sketch), leaves `into` part merged, and ends the job.
    pub fn merge_run(&self, into: &mut Merged, run: Run) -> Result<(), JobError> {
        self.check_run(&run)?;
        into.keys += run.keys;
        into.skipped += run.skipped;
        into.rounded += run.rounded;
        into.bytes += run.bytes;
        if !run.groups.is_empty() {
            into.added += run.groups.len();
            into.runs.push(run.groups);
        }
        while let [.., below, top] = into.runs.as_slice()
            && top.len() * 2 > below.len()
        {
            self.merge_top_two(into)?;
        }
        self.judge_groups_max(into)
    }

    /// Past `limits.groups_max` groups held (a group counted once per run), merges the runs
    /// into one to count them exactly (more distinct groups end the job); at most once per
    /// a quarter of the bound added, so that a result just under the bound is not merged
    /// again on every addition.
    fn judge_groups_max(&self, m: &mut Merged) -> Result<(), JobError> {
        let max = self.spec.limits.groups_max;
        if m.groups_at_most() as u64 > max && m.added as u64 * 4 >= max {
            self.collapse(m)?;
        }
        Ok(())
    }

    fn merge_top_two(&self, m: &mut Merged) -> Result<(), JobError> {
        if let (Some(top), Some(below)) = (m.runs.pop(), m.runs.pop()) {
            m.runs.push(merge_sorted(below, top)?);
        }
        Ok(())
    }

    /// `m`'s runs merged into one (smallest first), checked against `limits.groups_max`.
    fn collapse<'m>(&self, m: &'m mut Merged) -> Result<&'m Sorted, JobError> {
        while m.runs.len() > 1 {
            self.merge_top_two(m)?;
        }
        m.added = 0;
        if m.groups_at_most() as u64 > self.spec.limits.groups_max {
            return Err(JobError::GroupsMax {
                max: self.spec.limits.groups_max,
            });
        }
        if m.runs.is_empty() {
            m.runs.push(Vec::new());
        }
        Ok(&m.runs[0])
    }

    /// How many groups `m` holds (its runs merged into one first).
    pub fn merged_groups(&self, m: &mut Merged) -> Result<usize, JobError> {
        Ok(self.collapse(m)?.len())
    }

    /// Moves `p`'s groups, sorted, into `spilled` as a run; its counts stay in `p`.
    ///
    /// What a task does when its table passes a bound: a table that fits in the processor's
    /// caches adds a key in a few nanoseconds, one of a million groups misses memory on
    /// nearly every key. On input whose groups repeat within a task the table never grows
    /// that far and nothing spills; on input whose groups barely repeat (each task sees
    /// most of a million groups), the runs are merged once, at the end, in one pass over
    /// all of them ([`Plan::encode_spilled`]).
    ///
    /// The bound `limits.groups_max` is judged as [`Plan::merge_run`] judges it.
    pub fn spill(&self, p: &mut Partial, spilled: &mut Merged) -> Result<(), JobError> {
        let mut run: Sorted = p.groups.drain().collect();
        run.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if !run.is_empty() {
            spilled.added += run.len();
            spilled.runs.push(run);
        }
        self.judge_groups_max(spilled)
    }

    /// The stored form of `p` together with the groups it spilled into `spilled`
    /// ([`Partial::encode`] of the one partial they make): the runs merged in one pass,
    /// written as they merge.
    pub fn encode_spilled(&self, mut p: Partial, mut spilled: Merged) -> Result<Vec<u8>, JobError> {
        if spilled.runs.is_empty() {
            return Ok(p.encode());
        }
        self.spill(&mut p, &mut spilled)?;
        let max = self.spec.limits.groups_max;
        let mut count: u64 = 0;
        let mut groups = Vec::with_capacity(spilled.groups_at_most() * 32);
        merge_runs(std::mem::take(&mut spilled.runs), |key, accs| {
            count += 1;
            if count > max {
                return Err(JobError::GroupsMax { max });
            }
            // Encoding plain data into a Vec cannot fail.
            groups = postcard::to_extend(
                &(ByteStr(key.as_bytes()), accs.as_slice()),
                std::mem::take(&mut groups),
            )
            .unwrap_or_default();
            Ok(())
        })?;
        // The fields of `WireRef` in order, then the groups' count (a sequence's length is
        // written as a u64 is) and the groups.
        let mut out = Vec::with_capacity(64 + groups.len());
        out.push(FORMAT);
        out.extend_from_slice(&[0; 4]);
        let mut out = postcard::to_extend(&(p.keys, p.skipped, p.rounded, p.bytes, count), out)
            .unwrap_or_default();
        out.extend_from_slice(&groups);
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }
}

/// Merges sorted `runs` in one pass (a heap of the runs by their next key), calling `emit`
/// for each group in key order, its accumulators from every run merged.
fn merge_runs(
    runs: Vec<Sorted>,
    mut emit: impl FnMut(GroupKey, Accs) -> Result<(), JobError>,
) -> Result<(), JobError> {
    let mut rest: Vec<std::vec::IntoIter<(GroupKey, Accs)>> =
        runs.into_iter().map(Vec::into_iter).collect();
    let mut heads: Vec<Option<(GroupKey, Accs)>> = rest.iter_mut().map(Iterator::next).collect();
    // Indices of runs with a next group, as a binary min-heap by that group's key.
    let mut heap: Vec<usize> = (0..heads.len()).filter(|i| heads[*i].is_some()).collect();
    fn key(heads: &[Option<(GroupKey, Accs)>], i: usize) -> Option<&GroupKey> {
        heads[i].as_ref().map(|h| &h.0)
    }
    fn sift_down(heap: &mut [usize], heads: &[Option<(GroupKey, Accs)>], mut at: usize) {
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if l < heap.len() && key(heads, heap[l]) < key(heads, heap[least]) {
                least = l;
            }
            if r < heap.len() && key(heads, heap[r]) < key(heads, heap[least]) {
                least = r;
            }
            if least == at {
                return;
            }
            heap.swap(at, least);
            at = least;
        }
    }
    for at in (0..heap.len() / 2).rev() {
        sift_down(&mut heap, &heads, at);
    }
    let mut pending: Option<(GroupKey, Accs)> = None;
    while let Some(&top) = heap.first() {
        let Some((group, accs)) = heads[top].take() else {
            // Every run in the heap has a head.
            heap.swap_remove(0);
            sift_down(&mut heap, &heads, 0);
            continue;
        };
        heads[top] = rest[top].next();
        if heads[top].is_none() {
            heap.swap_remove(0);
        }
        sift_down(&mut heap, &heads, 0);
        match &mut pending {
            Some((held, mine)) if *held == group => {
                for (m, t) in mine.iter_mut().zip(&accs) {
                    m.merge(t).map_err(|e| JobError::Corrupt(e.to_string()))?;
                }
            }
            _ => {
                if let Some((held, mine)) = pending.replace((group, accs)) {
                    emit(held, mine)?;
                }
            }
        }
    }
    if let Some((held, mine)) = pending {
        emit(held, mine)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form of partials already in `_jobs`: owned groups.
    #[derive(Serialize)]
    struct Wire {
        keys: u64,
        skipped: u64,
        rounded: u64,
        bytes: u64,
        groups: Vec<(Vec<u8>, Vec<Acc>)>,
    }

    /// The stored form is written from borrowed groups: it must be the bytes of the owned
    /// [`Wire`] (partials already in `_jobs` stay readable).
    #[test]
    fn the_stored_form_is_the_wire_form_of_the_groups_in_key_order() {
        let spec = crate::JobSpec::parse(
            br#"{"id":"w","input":{"keyspace":"k"},"map":{"group":{"json":"$.c"},"values":{"a":{"json":"$.a"}}},"reduce":{"n":"count","s":{"sum":"a"},"m":{"max":"a"}}}"#,
        )
        .unwrap();
        let plan = Plan::new(spec).unwrap();
        let mut p = plan.partial();
        for i in 0..500 {
            let v = format!("{{\"c\":\"g{}\",\"a\":{}}}", i % 37, i);
            plan.add(&mut p, format!("k{i}").as_bytes(), v.as_bytes())
                .unwrap();
        }
        let mut groups: Vec<(Vec<u8>, Vec<Acc>)> = p
            .groups
            .iter()
            .map(|(g, a)| (g.as_bytes().to_vec(), a.to_vec()))
            .collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        let body = postcard::to_stdvec(&Wire {
            keys: p.keys,
            skipped: p.skipped,
            rounded: p.rounded,
            bytes: p.bytes,
            groups,
        })
        .unwrap();
        let encoded = p.encode();
        assert_eq!(encoded[0], FORMAT);
        assert_eq!(encoded[1..5], crc32fast::hash(&body).to_le_bytes());
        assert_eq!(encoded[5..], body[..]);
        assert_eq!(Partial::decode(&encoded).unwrap(), p);
    }

    /// A coordinator merges runs in one pass over sorted keys: a stored form whose groups are
    /// not strictly ascending (repeated or out of order) is refused, never merged wrong.
    #[test]
    fn a_run_out_of_order_is_refused() {
        let g = |n: i128| {
            let mut b = Vec::new();
            Scalar::Num(crate::num::Fixed(n)).encode(&mut b);
            b
        };
        let acc = vec![Acc::Count(1)];
        for order in [vec![2, 1], vec![1, 1], vec![1, 3, 2]] {
            let groups: Vec<(Vec<u8>, Vec<Acc>)> =
                order.iter().map(|n| (g(*n), acc.clone())).collect();
            let body = postcard::to_stdvec(&Wire {
                keys: 3,
                skipped: 0,
                rounded: 0,
                bytes: 0,
                groups,
            })
            .unwrap();
            let mut raw = vec![FORMAT];
            raw.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            raw.extend_from_slice(&body);
            assert_eq!(
                Run::decode(&raw),
                Err(JobError::Corrupt("groups out of order".into())),
                "{order:?}"
            );
        }
    }
}
