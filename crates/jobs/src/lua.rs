//! User map functions in Lua 5.4 (issue 15, `docs/design/mapreduce.md` §9), run by a task's
//! worker thread, never on the apply path (`capdb-storage` does not depend on this crate).
//!
//! # The sandbox
//!
//! - Only the `string`, `table`, `math` and `utf8` libraries, without `string.dump`,
//!   `math.random`/`randomseed` (a retried or speculative task must compute what the first
//!   attempt did), and no `load`, `loadfile`, `dofile`, `require`, `collectgarbage`, `print`.
//!   No `io`, `os` or `debug`: the function sees its key and value and nothing else.
//! - Memory: [`MEMORY_MAX`] per VM (the allocator refuses past it: the call fails with a
//!   memory error, the process is untouched).
//! - Time: a hook every [`HOOK_EVERY`] instructions fails the call past
//!   [`INSTRUCTIONS_MAX`] instructions or [`CALL_WALL_MAX`] of wall time; the job's `max_s`
//!   bounds the rest.
//! - Output: at most [`EMITS_PER_KEY_MAX`] emits per key.
//!
//! C functions run without hooks: `string.rep` and `table.concat` are bounded by the memory
//! cap; the pattern functions (`find`, `match`, `gmatch`, `gsub`) refuse subjects longer than
//! [`PATTERN_SUBJECT_MAX`], which bounds their backtracking.
//!
//! # What the function does
//!
//! `function map(key, value)` (the name is the spec's `map.lua.function`) calls
//! `emit(group, {name = number, ...})` any number of times. The group is a string, number,
//! boolean or nil, or an array of them (a composite group); the names are those the spec
//! declares in `map.values`. Given: `capdb.json_decode(text)` (nil when not JSON; depth at
//! most 64) and `capdb.key_part(key, sep, index)`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capdb_reduce::extract::Scalar;
use capdb_reduce::num::Fixed;
use capdb_reduce::spec::LuaMap;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

/// Memory one VM may hold.
pub const MEMORY_MAX: usize = 64 << 20;
/// Instructions one call may run.
pub const INSTRUCTIONS_MAX: u64 = 100_000_000;
/// How often the hook looks at the budget, in instructions.
pub const HOOK_EVERY: u32 = 10_000;
/// Wall time one call may take.
pub const CALL_WALL_MAX: Duration = Duration::from_secs(1);
/// Emits one call may make.
pub const EMITS_PER_KEY_MAX: usize = 10_000;
/// Longest subject the pattern functions accept.
pub const PATTERN_SUBJECT_MAX: usize = 64 * 1024;
/// Deepest JSON `capdb.json_decode` turns into tables.
pub const JSON_DEPTH_MAX: usize = 64;

/// One emit: the group's parts, a number per value slot (`None`: missing), whether a number
/// was rounded to 9 decimals.
pub type Emit = (Vec<Scalar>, Vec<Option<Fixed>>, bool);

/// A loaded map function and its VM.
pub struct LuaMapper {
    lua: Lua,
    function: Function,
    emitted: Rc<RefCell<Vec<Emit>>>,
    /// Instructions run by the current call (in steps of [`HOOK_EVERY`]).
    instructions: Rc<Cell<u64>>,
    deadline: Rc<Cell<Instant>>,
}

fn text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::MemoryError(_) => format!(
            "memory: past the {} MiB a Lua VM may hold",
            MEMORY_MAX >> 20
        ),
        mlua::Error::CallbackError { cause, .. } => text(cause),
        other => {
            // The message with its `[string "map"]:LINE:` position, without the traceback.
            let s = other.to_string();
            s.lines().next().unwrap_or_default().to_string()
        }
    }
}

impl std::fmt::Debug for LuaMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LuaMapper")
    }
}

impl LuaMapper {
    /// A sandboxed VM with `map`'s chunk loaded; `names` are the value slots (`map.values`,
    /// in order). `Err`: the source does not compile or define the function.
    pub fn new(map: &LuaMap, names: Vec<String>) -> Result<LuaMapper, String> {
        let setup = |e: mlua::Error| format!("Lua: {}", text(&e));
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )
        .map_err(setup)?;
        lua.set_memory_limit(MEMORY_MAX).map_err(setup)?;
        let g = lua.globals();
        for name in [
            "dofile",
            "loadfile",
            "load",
            "require",
            "collectgarbage",
            "print",
        ] {
            g.raw_set(name, Value::Nil).map_err(setup)?;
        }
        let string: Table = g.get("string").map_err(setup)?;
        string.raw_set("dump", Value::Nil).map_err(setup)?;
        let math: Table = g.get("math").map_err(setup)?;
        math.raw_set("random", Value::Nil).map_err(setup)?;
        math.raw_set("randomseed", Value::Nil).map_err(setup)?;
        // The pattern functions, behind a bound on their subject.
        for f in ["find", "match", "gmatch", "gsub"] {
            let inner: Function = string.get(f).map_err(setup)?;
            let bounded = lua
                .create_function(move |_, args: mlua::MultiValue| {
                    if let Some(Value::String(s)) = args.front()
                        && s.as_bytes().len() > PATTERN_SUBJECT_MAX
                    {
                        return Err(mlua::Error::runtime(format!(
                            "string.{f}: a subject longer than {PATTERN_SUBJECT_MAX} bytes"
                        )));
                    }
                    inner.call::<mlua::MultiValue>(args)
                })
                .map_err(setup)?;
            string.raw_set(f, bounded).map_err(setup)?;
        }
        let emitted: Rc<RefCell<Vec<Emit>>> = Rc::default();
        let sink = emitted.clone();
        let emit = lua
            .create_function(move |_, (group, values): (Value, Option<Table>)| {
                let mut out = sink.borrow_mut();
                if out.len() >= EMITS_PER_KEY_MAX {
                    return Err(mlua::Error::runtime(format!(
                        "emit: more than {EMITS_PER_KEY_MAX} emits for one key"
                    )));
                }
                let parts = match group {
                    Value::Table(t) => t
                        .sequence_values::<Value>()
                        .map(|v| v.and_then(|v| scalar(&v)))
                        .collect::<mlua::Result<Vec<_>>>()?,
                    other => vec![scalar(&other)?],
                };
                let mut rounded = false;
                let mut numbers = Vec::with_capacity(names.len());
                for n in &names {
                    let v = match &values {
                        Some(t) => t.get::<Value>(n.as_str())?,
                        None => Value::Nil,
                    };
                    numbers.push(number(&v).map(|(x, r)| {
                        rounded |= r;
                        x
                    }));
                }
                out.push((parts, numbers, rounded));
                Ok(())
            })
            .map_err(setup)?;
        g.raw_set("emit", emit).map_err(setup)?;
        let capdb = lua.create_table().map_err(setup)?;
        capdb
            .raw_set(
                "json_decode",
                lua.create_function(|lua, s: mlua::LuaString| {
                    match serde_json::from_slice::<serde_json::Value>(&s.as_bytes()) {
                        Ok(v) => to_lua(lua, &v, 0),
                        Err(_) => Ok(Value::Nil),
                    }
                })
                .map_err(setup)?,
            )
            .map_err(setup)?;
        capdb
            .raw_set(
                "key_part",
                lua.create_function(
                    |lua, (key, sep, index): (mlua::LuaString, mlua::LuaString, i64)| {
                        match capdb_reduce::extract::key_part(
                            &key.as_bytes(),
                            &sep.as_bytes(),
                            index,
                        ) {
                            Some(p) => lua.create_string(p).map(Value::String),
                            None => Ok(Value::Nil),
                        }
                    },
                )
                .map_err(setup)?,
            )
            .map_err(setup)?;
        g.raw_set("capdb", capdb).map_err(setup)?;
        let instructions = Rc::new(Cell::new(0u64));
        let deadline = Rc::new(Cell::new(Instant::now() + CALL_WALL_MAX));
        let (count, until) = (instructions.clone(), deadline.clone());
        // Loading the chunk runs under the same budget as a call.
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                count.set(count.get() + u64::from(HOOK_EVERY));
                if count.get() > INSTRUCTIONS_MAX {
                    return Err(mlua::Error::runtime(format!(
                        "instruction budget: more than {INSTRUCTIONS_MAX} instructions in one call"
                    )));
                }
                if Instant::now() > until.get() {
                    return Err(mlua::Error::runtime(format!(
                        "wall-time budget: one call ran past {} ms",
                        CALL_WALL_MAX.as_millis()
                    )));
                }
                Ok(VmState::Continue)
            },
        )
        .map_err(setup)?;
        lua.load(&map.source)
            .set_name("map")
            .exec()
            .map_err(setup)?;
        let function: Function = match g.get::<Value>(map.function.as_str()).map_err(setup)? {
            Value::Function(f) => f,
            _ => {
                return Err(format!(
                    "Lua: the source defines no function '{}'",
                    map.function
                ));
            }
        };
        Ok(LuaMapper {
            lua,
            function,
            emitted,
            instructions,
            deadline,
        })
    }

    /// Calls the function on one key: what it emitted. `Err`: the call failed (the message
    /// names the line, for errors the code raised).
    pub fn call(&mut self, key: &[u8], value: &[u8]) -> Result<Vec<Emit>, String> {
        self.emitted.borrow_mut().clear();
        self.instructions.set(0);
        self.deadline.set(Instant::now() + CALL_WALL_MAX);
        let k = self.lua.create_string(key).map_err(|e| text(&e))?;
        let v = self.lua.create_string(value).map_err(|e| text(&e))?;
        self.function.call::<()>((k, v)).map_err(|e| text(&e))?;
        Ok(std::mem::take(&mut *self.emitted.borrow_mut()))
    }
}

/// A group part from Lua.
fn scalar(v: &Value) -> mlua::Result<Scalar> {
    Ok(match v {
        Value::Nil => Scalar::Null,
        Value::Boolean(b) => Scalar::Bool(*b),
        Value::Integer(i) => Scalar::Num(Fixed::from_int(*i)),
        Value::Number(_) => match number(v) {
            Some((n, _)) => Scalar::Num(n),
            None => {
                return Err(mlua::Error::runtime(
                    "emit: a group number that is not finite",
                ));
            }
        },
        Value::String(s) => Scalar::Str(s.as_bytes().to_vec()),
        other => {
            return Err(mlua::Error::runtime(format!(
                "emit: a group part is a string, number, boolean or nil, not a {}",
                other.type_name()
            )));
        }
    })
}

/// A number from Lua (an integer, a float, or a string holding a number): exact, or rounded
/// to 9 decimals (the flag).
fn number(v: &Value) -> Option<(Fixed, bool)> {
    match v {
        Value::Integer(i) => Some((Fixed::from_int(*i), false)),
        Value::Number(f) if f.is_finite() => {
            // The shortest text that reads back as this float, parsed exactly.
            let p = Fixed::parse(format!("{f:?}").as_bytes()).ok()?;
            Some((p.value, p.rounded))
        }
        Value::String(s) => {
            let p = Fixed::parse(&s.as_bytes()).ok()?;
            Some((p.value, p.rounded))
        }
        _ => None,
    }
}

/// JSON as Lua values (objects and arrays as tables, null as nil).
fn to_lua(lua: &Lua, v: &serde_json::Value, depth: usize) -> mlua::Result<Value> {
    if depth > JSON_DEPTH_MAX {
        return Err(mlua::Error::runtime(format!(
            "capdb.json_decode: deeper than {JSON_DEPTH_MAX}"
        )));
    }
    Ok(match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
        serde_json::Value::Object(m) => {
            let t = lua.create_table_with_capacity(0, m.len())?;
            for (k, item) in m {
                t.raw_set(k.as_str(), to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper(source: &str, names: &[&str]) -> Result<LuaMapper, String> {
        LuaMapper::new(
            &LuaMap {
                source: source.into(),
                function: "map".into(),
            },
            names.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn a_map_emits_groups_and_named_numbers() {
        let mut m = mapper(
            r#"function map(k, v)
                 local d = capdb.json_decode(v)
                 if d then emit(d.c, {a = d.a}) end
                 emit({capdb.key_part(k, ":", 1), true}, {a = "2.5"})
               end"#,
            &["a"],
        )
        .unwrap();
        let out = m.call(b"o:7", br#"{"c": "de", "a": 3}"#).unwrap();
        assert_eq!(
            out,
            vec![
                (
                    vec![Scalar::Str(b"de".to_vec())],
                    vec![Some(Fixed::from_int(3))],
                    false
                ),
                (
                    vec![Scalar::Str(b"7".to_vec()), Scalar::Bool(true)],
                    vec![Some(Fixed(2_500_000_000))],
                    false
                ),
            ]
        );
        // Not JSON: the first emit is not made, the second is.
        assert_eq!(m.call(b"o:8", b"text").unwrap().len(), 1);
    }

    #[test]
    fn errors_name_their_line_and_budgets_hold() {
        let mut m = mapper(
            "function map(k, v)\n  local x = 1\n  error('bad ' .. k)\nend",
            &[],
        )
        .unwrap();
        let e = m.call(b"k1", b"v").unwrap_err();
        assert!(e.contains(":3:") && e.contains("bad k1"), "{e}");
        let mut m = mapper("function map(k, v) while true do end end", &[]).unwrap();
        let started = Instant::now();
        let e = m.call(b"k", b"v").unwrap_err();
        assert!(e.contains("budget"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut m = mapper(
            "function map(k, v) local t = {} while true do t[#t + 1] = string.rep('x', 1e6) end end",
            &[],
        )
        .unwrap();
        let e = m.call(b"k", b"v").unwrap_err();
        assert!(e.contains("memory"), "{e}");
        // The VM is still usable after a failed call.
        let e = m.call(b"k", b"v").unwrap_err();
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn the_sandbox_has_no_way_out() {
        for (code, what) in [
            ("os.exit(1)", "os"),
            ("io.open('/etc/passwd')", "io"),
            ("load('return 1')()", "load"),
            ("require('os')", "require"),
            ("math.random()", "random"),
            ("string.dump(map)", "dump"),
            ("string.find(string.rep('a', 70000), '(.-)*b')", "subject"),
        ] {
            let mut m = mapper(&format!("function map(k, v) {code} end"), &[]).unwrap();
            let e = m.call(b"k", b"v").unwrap_err();
            assert!(!e.is_empty(), "{what}: {e}");
        }
        assert!(
            mapper("function map(k, v)", &[])
                .unwrap_err()
                .contains("Lua")
        );
        assert!(mapper("x = 1", &[]).unwrap_err().contains("no function"));
    }
}
