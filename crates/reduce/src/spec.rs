//! The job spec: parsed from JSON with an error that names the field, checked, and written
//! back in one canonical form (how a resubmission with the same id is told apart from
//! another job).
//!
//! ```json
//! {"id": "sales-2026-12",
//!  "input": {"keyspace": "orders", "prefix": "o:", "match": "o:*:2026-*", "expired": "skip"},
//!  "map": {"group": [{"json": "$.country"}], "values": {"amount": {"json": "$.total"}}},
//!  "reduce": {"n": "count", "revenue": {"sum": "amount"}, "mean": {"avg": "amount"},
//!             "products": {"topk": {"of": {"json": "$.sku"}, "k": 10}},
//!             "buyers": {"distinct": {"json": "$.user"}}},
//!  "output": {"to": "result", "order_by": "revenue", "desc": true, "limit": 1000},
//!  "limits": {"max_s": 3600, "scan_keys_per_s": null, "groups_max": 1000000}}
//! ```
//!
//! Extractors: `{"key": true}`, `{"key_part": {"sep": ":", "index": 1}}` (negative: from the
//! end), `{"json": "$.a.b[0]"}`, `{"value": "string"|"number"}`, `{"words": <extractor>}`,
//! `{"const": <scalar>}`. Reducers: `"count"`, `{"sum"|"min"|"max"|"avg"|"stats": "<value
//! name>"}`, `{"topk": {"of": <extractor>, "k": n}}`, `{"distinct": <extractor>}`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::acc::Reducer;
use crate::extract::{Extractor, Scalar, ValueAs};
use crate::json_path::JsonPath;
use crate::num::Fixed;
use crate::sketch::K_MAX;

/// Longest job id.
pub const ID_BYTES_MAX: usize = 64;
/// Groups a job may hold unless its spec says otherwise, and the most it may say.
pub const GROUPS_MAX_DEFAULT: u64 = 1_000_000;
pub const GROUPS_MAX_CAP: u64 = 4_000_000;
/// Longest a job may run unless its spec says otherwise, and the most it may say (s).
pub const MAX_S_DEFAULT: u64 = 3_600;
pub const MAX_S_CAP: u64 = 7 * 24 * 3_600;
/// Most extractors in a group, named values, and reducers.
pub const GROUP_PARTS_MAX: usize = 8;
pub const VALUES_MAX: usize = 32;
pub const REDUCERS_MAX: usize = 32;
/// Longest spec accepted, in bytes of JSON.
pub const SPEC_BYTES_MAX: usize = 64 * 1024;

/// What to do with keys that have expired but are not yet removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Skip,
    Include,
}

/// One index per shard for the whole job (`strict`), or per task (`per-task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    Strict,
    PerTask,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub keyspace: String,
    /// Scanned on every shard.
    pub prefix: Vec<u8>,
    /// A glob applied after the prefix (its literal head narrows the scan).
    pub pattern: Option<Vec<u8>>,
    pub expired: Expired,
    pub snapshot: Snapshot,
}

impl Input {
    /// The prefix to scan: the longer of `prefix` and the pattern's literal head.
    pub fn scan_prefix(&self) -> &[u8] {
        match &self.pattern {
            Some(p) => {
                let head = capdb_data::glob::literal_prefix(p);
                if head.len() > self.prefix.len() {
                    head
                } else {
                    &self.prefix
                }
            }
            None => &self.prefix,
        }
    }

    /// Whether a key under the scan prefix is the job's.
    pub fn wants(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix)
            && self
                .pattern
                .as_ref()
                .is_none_or(|p| capdb_data::glob::matches(p, key))
    }
}

/// Where the final result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Kept with the job, read with `JOB RESULT`.
    Result,
    /// One key per group under `prefix` in `keyspace`, holding its row as JSON.
    Keyspace { keyspace: String, prefix: Vec<u8> },
}

/// How result rows are ordered: by a reducer's number, or by group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub to: Destination,
    /// A reducer's name; `None`: by group.
    pub order_by: Option<String>,
    pub desc: bool,
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_s: u64,
    pub scan_keys_per_s: Option<u64>,
    pub groups_max: u64,
}

/// A user map function in Lua (`map.lua`): `function(key, value)` calling
/// `emit(group, {name = number, ...})` any number of times; the names it may emit are
/// declared in `map.values` (what the reducers read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaMap {
    /// The chunk defining the function (at most [`LUA_SOURCE_MAX`] bytes).
    pub source: String,
    /// The global the chunk defines (default `map`).
    pub function: String,
}

/// Longest Lua source in a spec, in bytes.
pub const LUA_SOURCE_MAX: usize = 48 * 1024;

/// A checked job spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub id: Option<String>,
    pub input: Input,
    /// The group: a composite of these (none: one group for everything).
    pub group: Vec<Extractor>,
    /// Named numbers the reducers take (with `lua`: the names its emits carry; the
    /// extractors are unused placeholders).
    pub values: BTreeMap<String, Extractor>,
    /// A Lua map instead of the extractors (`group` is then empty).
    pub lua: Option<LuaMap>,
    pub reduce: BTreeMap<String, Reducer>,
    pub output: Output,
    pub limits: Limits,
}

/// A spec error: the field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(at: &str, why: impl std::fmt::Display) -> Result<T, SpecError> {
    Err(SpecError(format!("{at}: {why}")))
}

fn object<'a>(v: &'a Value, at: &str, known: &[&str]) -> Result<&'a Map<String, Value>, SpecError> {
    let Some(m) = v.as_object() else {
        return err(at, "must be an object");
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return err(
            at,
            format!("unknown field {k:?} (known: {})", known.join(", ")),
        );
    }
    Ok(m)
}

fn string<'a>(v: &'a Value, at: &str) -> Result<&'a str, SpecError> {
    v.as_str().map_or_else(|| err(at, "must be a string"), Ok)
}

fn uint(v: &Value, at: &str, min: u64, max: u64) -> Result<u64, SpecError> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => err(at, format!("must be an integer from {min} to {max}")),
    }
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= ID_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl JobSpec {
    /// Parses and checks a spec's JSON text.
    pub fn parse(text: &[u8]) -> Result<JobSpec, SpecError> {
        if text.len() > SPEC_BYTES_MAX {
            return err("spec", format!("longer than {SPEC_BYTES_MAX} bytes"));
        }
        let v: Value =
            serde_json::from_slice(text).map_err(|e| SpecError(format!("spec: not JSON: {e}")))?;
        JobSpec::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<JobSpec, SpecError> {
        let top = object(
            v,
            "spec",
            &["id", "input", "map", "reduce", "output", "limits"],
        )?;
        let id = match top.get("id") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let id = string(v, "id")?;
                if !name_ok(id) {
                    return err("id", format!("1 to {ID_BYTES_MAX} of A-Z a-z 0-9 _ -"));
                }
                Some(id.to_string())
            }
        };
        let input = parse_input(top.get("input").unwrap_or(&Value::Null))?;
        let (group, values, lua) = parse_map(top.get("map").unwrap_or(&json!({})))?;
        if lua.is_some()
            && let Some((name, _)) = reduce_json_kinds(top.get("reduce"))
                .into_iter()
                .find(|(_, kind)| kind == "topk" || kind == "distinct")
        {
            return err(
                &format!("reduce.{name}"),
                "a Lua map's job reduces its emitted numbers (count, sum, min, max, avg, stats)",
            );
        }
        let reduce = parse_reduce(top.get("reduce").unwrap_or(&Value::Null), &values)?;
        // A value no reducer reads would still skip the keys it is missing from.
        for name in values.keys() {
            let used = reduce.values().any(|r| {
                matches!(r, Reducer::Sum(v) | Reducer::Min(v) | Reducer::Max(v) | Reducer::Avg(v) | Reducer::Stats(v) if v == name)
            });
            if !used {
                return err(&format!("map.values.{name}"), "no reducer reads it");
            }
        }
        // Words in the group and in a top-k or distinct would multiply per key.
        if group.iter().any(Extractor::is_multi)
            && reduce.values().any(|r| {
                matches!(r, Reducer::TopK { of, .. } | Reducer::Distinct { of } if of.is_multi())
            })
        {
            return err(
                "reduce",
                "words in both map.group and a topk or distinct: one of them only",
            );
        }
        let output = parse_output(top.get("output").unwrap_or(&json!({})), &reduce)?;
        let limits = parse_limits(top.get("limits").unwrap_or(&json!({})))?;
        Ok(JobSpec {
            id,
            input,
            group,
            values,
            lua,
            reduce,
            output,
            limits,
        })
    }

    /// The spec in canonical form: every default written out, fields in one order. Two
    /// submissions are the same job when these are equal (the id aside).
    pub fn canonical(&self) -> Value {
        let bytes = |b: &[u8]| Value::String(String::from_utf8_lossy(b).into_owned());
        let mut input = Map::new();
        input.insert("keyspace".into(), json!(self.input.keyspace));
        input.insert("prefix".into(), bytes(&self.input.prefix));
        input.insert(
            "match".into(),
            self.input.pattern.as_deref().map_or(Value::Null, bytes),
        );
        input.insert(
            "expired".into(),
            json!(match self.input.expired {
                Expired::Skip => "skip",
                Expired::Include => "include",
            }),
        );
        input.insert(
            "snapshot".into(),
            json!(match self.input.snapshot {
                Snapshot::Strict => "strict",
                Snapshot::PerTask => "per-task",
            }),
        );
        let mut values = Map::new();
        for (k, e) in &self.values {
            values.insert(k.clone(), extractor_json(e));
        }
        let mut reduce = Map::new();
        for (k, r) in &self.reduce {
            reduce.insert(k.clone(), reducer_json(r));
        }
        let mut output = Map::new();
        match &self.output.to {
            Destination::Result => {
                output.insert("to".into(), json!("result"));
            }
            Destination::Keyspace { keyspace, prefix } => {
                output.insert("to".into(), json!("keyspace"));
                output.insert("keyspace".into(), json!(keyspace));
                output.insert("prefix".into(), bytes(prefix));
            }
        }
        output.insert("order_by".into(), json!(self.output.order_by));
        output.insert("desc".into(), json!(self.output.desc));
        output.insert("limit".into(), json!(self.output.limit));
        let group: Vec<Value> = self.group.iter().map(extractor_json).collect();
        json!({
            "id": self.id,
            "input": input,
            "map": match &self.lua {
                None => json!({"group": group, "values": values}),
                Some(l) => json!({
                    "lua": {"source": l.source, "function": l.function},
                    "values": self.values.keys().collect::<Vec<_>>(),
                }),
            },
            "reduce": reduce,
            "output": output,
            "limits": {"max_s": self.limits.max_s, "scan_keys_per_s": self.limits.scan_keys_per_s,
                       "groups_max": self.limits.groups_max},
        })
    }

    /// Whether a synchronous view can keep this spec current (`docs/design/mapreduce.md`
    /// §10): reducers `count`, `sum`, `avg`, `min`, `max` (retractable, or kept as multisets);
    /// no `words` (a key's groups are bounded by one); no job-only fields (`id`, `output`,
    /// `limits`). A view counts every key its shard holds until the log removes it, so it is
    /// checked with `expired: include` (a job with that input recomputes it).
    pub fn check_view(&self) -> Result<(), SpecError> {
        if self.id.is_some() {
            return err("id", "a view is named by VIEW CREATE, not by its spec");
        }
        if self.input.expired != Expired::Include {
            return err(
                "input.expired",
                "a view counts every key until it is removed: \"include\"",
            );
        }
        if self
            .group
            .iter()
            .chain(self.values.values())
            .any(Extractor::is_multi)
        {
            return err("map", "a view cannot group by words (a job can)");
        }
        if let Some((name, _)) = self.reduce.iter().find(|(_, r)| {
            !matches!(
                r,
                Reducer::Count
                    | Reducer::Sum(_)
                    | Reducer::Avg(_)
                    | Reducer::Min(_)
                    | Reducer::Max(_)
            )
        }) {
            return err(
                &format!("reduce.{name}"),
                "a view keeps count, sum, avg, min and max (stats, topk and distinct: a job)",
            );
        }
        if self.limits
            != (Limits {
                max_s: MAX_S_DEFAULT,
                scan_keys_per_s: None,
                groups_max: GROUPS_MAX_DEFAULT,
            })
        {
            return err(
                "limits",
                "a view has no limits of its own: it keeps up to 1,000,000 groups per shard",
            );
        }
        let plain = Output {
            to: Destination::Result,
            order_by: None,
            desc: false,
            limit: None,
        };
        if self.output != plain {
            return err("output", "a view is read with VIEW GET; it has no output");
        }
        Ok(())
    }

    /// Whether every reducer can retract (what a synchronous view needs).
    pub fn is_retractable(&self) -> bool {
        self.reduce
            .values()
            .all(|r| matches!(r, Reducer::Count | Reducer::Sum(_) | Reducer::Avg(_)))
    }
}

fn parse_input(v: &Value) -> Result<Input, SpecError> {
    let m = object(
        v,
        "input",
        &["keyspace", "prefix", "match", "expired", "snapshot"],
    )?;
    let keyspace = string(m.get("keyspace").unwrap_or(&Value::Null), "input.keyspace")?;
    if keyspace.is_empty() {
        return err("input.keyspace", "must not be empty");
    }
    let prefix = match m.get("prefix") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => string(v, "input.prefix")?.as_bytes().to_vec(),
    };
    let pattern = match m.get("match") {
        None | Some(Value::Null) => None,
        Some(v) => Some(string(v, "input.match")?.as_bytes().to_vec()),
    };
    if let Some(p) = &pattern {
        let head = capdb_data::glob::literal_prefix(p);
        if !head.starts_with(&prefix) && !prefix.starts_with(head) {
            return err("input.match", "can never match a key under input.prefix");
        }
    }
    let expired = match m
        .get("expired")
        .map(|v| string(v, "input.expired"))
        .transpose()?
    {
        None | Some("skip") => Expired::Skip,
        Some("include") => Expired::Include,
        Some(_) => return err("input.expired", "\"skip\" or \"include\""),
    };
    let snapshot = match m
        .get("snapshot")
        .map(|v| string(v, "input.snapshot"))
        .transpose()?
    {
        None | Some("strict") => Snapshot::Strict,
        Some("per-task") => Snapshot::PerTask,
        Some(_) => return err("input.snapshot", "\"strict\" or \"per-task\""),
    };
    Ok(Input {
        keyspace: keyspace.to_string(),
        prefix,
        pattern,
        expired,
        snapshot,
    })
}

/// An extractor's JSON form.
pub fn parse_extractor(v: &Value, at: &str) -> Result<Extractor, SpecError> {
    let Some(m) = v.as_object().filter(|m| m.len() == 1) else {
        return err(
            at,
            "an extractor is an object with one field: key, key_part, json, value, words or const",
        );
    };
    let (kind, arg) = m
        .iter()
        .next()
        .map(|(k, v)| (k.as_str(), v))
        .unwrap_or(("", &Value::Null));
    let at = format!("{at}.{kind}");
    Ok(match kind {
        "key" => match arg {
            Value::Bool(true) => Extractor::Key,
            _ => return err(&at, "must be true"),
        },
        "key_part" => {
            let p = object(arg, &at, &["sep", "index"])?;
            let sep = string(p.get("sep").unwrap_or(&Value::Null), &format!("{at}.sep"))?;
            if sep.is_empty() {
                return err(&format!("{at}.sep"), "must not be empty");
            }
            let Some(index) = p
                .get("index")
                .and_then(Value::as_i64)
                .filter(|i| i.unsigned_abs() <= 1024)
            else {
                return err(&format!("{at}.index"), "an integer from -1024 to 1024");
            };
            Extractor::KeyPart {
                sep: sep.as_bytes().to_vec(),
                index,
            }
        }
        "json" => Extractor::Json(
            JsonPath::parse(string(arg, &at)?).map_err(|e| SpecError(format!("{at}: {e}")))?,
        ),
        "value" => match string(arg, &at)? {
            "string" => Extractor::Value(ValueAs::String),
            "number" => Extractor::Value(ValueAs::Number),
            _ => return err(&at, "\"string\" or \"number\""),
        },
        "words" => {
            let inner = parse_extractor(arg, &at)?;
            if inner.is_multi() {
                return err(&at, "words of words");
            }
            Extractor::Words(Box::new(inner))
        }
        "const" => Extractor::Const(match arg {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::String(s) => Scalar::Str(s.as_bytes().to_vec()),
            // Integers only: a JSON decimal has already been through f64 here.
            Value::Number(n) => match n.as_i64() {
                Some(i) => Scalar::Num(Fixed::from_int(i)),
                None => {
                    return err(
                        &at,
                        "a number constant is an integer (write decimals as strings)",
                    );
                }
            },
            _ => return err(&at, "a string, integer, boolean or null"),
        }),
        "lua" => {
            return err(
                &at,
                "user functions (Lua) are not available in this version",
            );
        }
        other => return err(&at, format!("unknown extractor {other:?}")),
    })
}

fn extractor_json(e: &Extractor) -> Value {
    match e {
        Extractor::Key => json!({"key": true}),
        Extractor::KeyPart { sep, index } => {
            json!({"key_part": {"sep": String::from_utf8_lossy(sep), "index": index}})
        }
        Extractor::Json(p) => json!({"json": p.text()}),
        Extractor::Value(ValueAs::String) => json!({"value": "string"}),
        Extractor::Value(ValueAs::Number) => json!({"value": "number"}),
        Extractor::Words(inner) => json!({"words": extractor_json(inner)}),
        Extractor::Const(s) => json!({"const": s.to_json()}),
    }
}

/// Each reducer's name and kind (`count`, `sum`, `topk`, ...) as written, for checks made
/// before the reducers are parsed.
fn reduce_json_kinds(v: Option<&Value>) -> Vec<(String, String)> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(name, r)| {
                    let kind = match r {
                        Value::String(s) => s.clone(),
                        Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                        _ => String::new(),
                    };
                    (name.clone(), kind)
                })
                .collect()
        })
        .unwrap_or_default()
}

type ParsedMap = (Vec<Extractor>, BTreeMap<String, Extractor>, Option<LuaMap>);

fn parse_map(v: &Value) -> Result<ParsedMap, SpecError> {
    let m = object(v, "map", &["group", "values", "lua"])?;
    if let Some(l) = m.get("lua").filter(|l| !l.is_null()) {
        if m.get("group").is_some_and(|g| !g.is_null()) {
            return err(
                "map.group",
                "a Lua map gives the group itself (emit's first argument)",
            );
        }
        let lm = object(l, "map.lua", &["source", "function"])?;
        let source = string(lm.get("source").unwrap_or(&Value::Null), "map.lua.source")?;
        if source.len() > LUA_SOURCE_MAX {
            return err(
                "map.lua.source",
                format!("longer than {LUA_SOURCE_MAX} bytes"),
            );
        }
        let function = match lm.get("function") {
            None | Some(Value::Null) => "map",
            Some(f) => string(f, "map.lua.function")?,
        };
        if function.is_empty()
            || !function
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || function.as_bytes()[0].is_ascii_digit()
        {
            return err("map.lua.function", "a Lua global name");
        }
        let mut values = BTreeMap::new();
        match m.get("values") {
            None | Some(Value::Null) => {}
            Some(Value::Array(names)) => {
                if names.len() > VALUES_MAX {
                    return err("map.values", format!("at most {VALUES_MAX}"));
                }
                for (i, n) in names.iter().enumerate() {
                    let at = format!("map.values[{i}]");
                    let name = string(n, &at)?;
                    if !name_ok(name) {
                        return err(&at, "a name is 1 to 64 of A-Z a-z 0-9 _ -");
                    }
                    values.insert(name.to_string(), Extractor::Const(Scalar::Null));
                }
            }
            Some(_) => {
                return err(
                    "map.values",
                    "with a Lua map: the names its emits carry, as an array",
                );
            }
        }
        let lua = LuaMap {
            source: source.to_string(),
            function: function.to_string(),
        };
        return Ok((Vec::new(), values, Some(lua)));
    }
    let group = match m.get("group") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| parse_extractor(p, &format!("map.group[{i}]")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(one) => vec![parse_extractor(one, "map.group")?],
    };
    if group.len() > GROUP_PARTS_MAX {
        return err("map.group", format!("at most {GROUP_PARTS_MAX} parts"));
    }
    if group.iter().filter(|e| e.is_multi()).count() > 1 {
        return err(
            "map.group",
            "at most one part may give several values per key (words)",
        );
    }
    let mut values = BTreeMap::new();
    if let Some(v) = m.get("values").filter(|v| !v.is_null()) {
        let vs = v
            .as_object()
            .map_or_else(|| err("map.values", "must be an object"), Ok)?;
        if vs.len() > VALUES_MAX {
            return err("map.values", format!("at most {VALUES_MAX}"));
        }
        for (name, e) in vs {
            let at = format!("map.values.{name}");
            if !name_ok(name) {
                return err(&at, "a name is 1 to 64 of A-Z a-z 0-9 _ -");
            }
            let e = parse_extractor(e, &at)?;
            if e.is_multi() {
                return err(&at, "a value is one number per key (words gives several)");
            }
            values.insert(name.clone(), e);
        }
    }
    Ok((group, values, None))
}

fn parse_reduce(
    v: &Value,
    values: &BTreeMap<String, Extractor>,
) -> Result<BTreeMap<String, Reducer>, SpecError> {
    let Some(m) = v.as_object().filter(|m| !m.is_empty()) else {
        return err("reduce", "an object naming at least one reducer");
    };
    if m.len() > REDUCERS_MAX {
        return err("reduce", format!("at most {REDUCERS_MAX} reducers"));
    }
    let mut out = BTreeMap::new();
    for (name, r) in m {
        let at = format!("reduce.{name}");
        if !name_ok(name) {
            return err(&at, "a name is 1 to 64 of A-Z a-z 0-9 _ -");
        }
        if name == "group" {
            return err(
                &at,
                "\"group\" names the group column of each row; choose another name",
            );
        }
        let value_of = |arg: &Value, at: &str| -> Result<String, SpecError> {
            let n = string(arg, at)?;
            if !values.contains_key(n) {
                return err(at, format!("{n:?} is not a name in map.values"));
            }
            Ok(n.to_string())
        };
        let reducer = match r {
            Value::String(s) if s == "count" => Reducer::Count,
            Value::Object(o) if o.len() == 1 => {
                let (kind, arg) = o
                    .iter()
                    .next()
                    .map(|(k, v)| (k.as_str(), v))
                    .unwrap_or(("", &Value::Null));
                let at = format!("{at}.{kind}");
                match kind {
                    "count" if matches!(arg, Value::Bool(true) | Value::Null) => Reducer::Count,
                    "count" => return err(&at, "\"count\" takes no argument (true)"),
                    "sum" => Reducer::Sum(value_of(arg, &at)?),
                    "min" => Reducer::Min(value_of(arg, &at)?),
                    "max" => Reducer::Max(value_of(arg, &at)?),
                    "avg" => Reducer::Avg(value_of(arg, &at)?),
                    "stats" => Reducer::Stats(value_of(arg, &at)?),
                    "topk" => {
                        let t = object(arg, &at, &["of", "k"])?;
                        let of = parse_extractor(
                            t.get("of").unwrap_or(&Value::Null),
                            &format!("{at}.of"),
                        )?;
                        let k = uint(
                            t.get("k").unwrap_or(&json!(10)),
                            &format!("{at}.k"),
                            1,
                            u64::from(K_MAX),
                        )?;
                        Reducer::TopK { of, k: k as u32 }
                    }
                    "distinct" => Reducer::Distinct {
                        of: parse_extractor(arg, &at)?,
                    },
                    "lua" => {
                        return err(
                            &at,
                            "user functions (Lua) are not available in this version",
                        );
                    }
                    other => return err(&at, format!("unknown reducer {other:?}")),
                }
            }
            _ => return err(&at, "\"count\" or an object with one reducer"),
        };
        out.insert(name.clone(), reducer);
    }
    Ok(out)
}

fn reducer_json(r: &Reducer) -> Value {
    match r {
        Reducer::Count => json!("count"),
        Reducer::Sum(v) => json!({"sum": v}),
        Reducer::Min(v) => json!({"min": v}),
        Reducer::Max(v) => json!({"max": v}),
        Reducer::Avg(v) => json!({"avg": v}),
        Reducer::Stats(v) => json!({"stats": v}),
        Reducer::TopK { of, k } => json!({"topk": {"of": extractor_json(of), "k": k}}),
        Reducer::Distinct { of } => json!({"distinct": extractor_json(of)}),
    }
}

fn parse_output(v: &Value, reduce: &BTreeMap<String, Reducer>) -> Result<Output, SpecError> {
    let m = object(
        v,
        "output",
        &["to", "keyspace", "prefix", "order_by", "desc", "limit"],
    )?;
    let to = match m.get("to").map(|v| string(v, "output.to")).transpose()? {
        None | Some("result") => {
            if m.contains_key("keyspace") || m.contains_key("prefix") {
                return err("output", "keyspace and prefix go with \"to\": \"keyspace\"");
            }
            Destination::Result
        }
        Some("keyspace") => {
            let keyspace = string(m.get("keyspace").unwrap_or(&Value::Null), "output.keyspace")?;
            if keyspace.is_empty() {
                return err("output.keyspace", "must not be empty");
            }
            let prefix = match m.get("prefix") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => string(v, "output.prefix")?.as_bytes().to_vec(),
            };
            Destination::Keyspace {
                keyspace: keyspace.to_string(),
                prefix,
            }
        }
        Some(_) => return err("output.to", "\"result\" or \"keyspace\""),
    };
    let order_by = match m.get("order_by") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let name = string(v, "output.order_by")?;
            if name != "group" && !reduce.contains_key(name) {
                return err(
                    "output.order_by",
                    format!("{name:?} is neither \"group\" nor a reducer"),
                );
            }
            (name != "group").then(|| name.to_string())
        }
    };
    let desc = match m.get("desc") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return err("output.desc", "must be true or false"),
    };
    let limit = match m.get("limit") {
        None | Some(Value::Null) => None,
        Some(v) => Some(uint(v, "output.limit", 1, GROUPS_MAX_CAP)?),
    };
    Ok(Output {
        to,
        order_by,
        desc,
        limit,
    })
}

fn parse_limits(v: &Value) -> Result<Limits, SpecError> {
    let m = object(v, "limits", &["max_s", "scan_keys_per_s", "groups_max"])?;
    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    Ok(Limits {
        max_s: get("max_s").map_or(Ok(MAX_S_DEFAULT), |v| uint(v, "limits.max_s", 1, MAX_S_CAP))?,
        scan_keys_per_s: get("scan_keys_per_s")
            .map(|v| uint(v, "limits.scan_keys_per_s", 1, u64::MAX))
            .transpose()?,
        groups_max: get("groups_max").map_or(Ok(GROUPS_MAX_DEFAULT), |v| {
            uint(v, "limits.groups_max", 1, GROUPS_MAX_CAP)
        })?,
    })
}
