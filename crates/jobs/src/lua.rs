//! User map functions in Lua 5.4 (issue 15, `docs/design/mapreduce.md` §9), run by a task's
//! worker thread, never on the apply path (`capdb-storage` does not depend on this crate).
//!
//! # The sandbox
//!
//! - Only the `string`, `table`, `math` and `utf8` libraries, without `string.dump`,
//!   `math.random`/`randomseed` (a retried or speculative task must compute what the first
//!   attempt did), and no `load`, `loadfile`, `dofile`, `require`, `collectgarbage`, `print`.
//!   No `io`, `os`, `debug` or coroutines: the function sees its key and value and nothing
//!   else. No `pcall`/`xpcall` (they would catch the budget's error and run on) and no
//!   metatables (`setmetatable`, `getmetatable`, `rawset`...: a `__len`, `__index` or `__gc`
//!   runs code where no budget reaches, and the string metatable would reach the unbounded
//!   pattern functions). Once a call's budget is spent, every later hook fails it again.
//! - Memory: [`MEMORY_MAX`] per VM (the allocator refuses past it: the call fails with a
//!   memory error, the process is untouched).
//! - Time: a hook every [`HOOK_EVERY`] instructions fails the call past
//!   [`INSTRUCTIONS_MAX`] instructions or [`CALL_WALL_MAX`] of wall time; the job's `max_s`
//!   bounds the rest.
//! - Output: at most [`EMITS_PER_KEY_MAX`] emits per key.
//!
//! C functions run without hooks, so the ones that can loop long are bounded by their
//! arguments: `string.rep` and `table.move` at [`REPEAT_MAX`] (and the memory cap), the
//! pattern functions (`find`, `match`, `gmatch`, `gsub`) at subjects of
//! [`PATTERN_SUBJECT_MAX`] bytes and patterns of at most one quantifier (their
//! backtracking grows as the subject's length to the power of the quantifiers), and the
//! given functions at their inputs ([`HELPER_INPUT_MAX`]). What Rust keeps of a call is
//! bounded too: group parts of at most [`GROUP_PART_BYTES_MAX`] bytes, [`GROUP_PARTS_MAX`]
//! parts, and an error message of at most [`ERROR_BYTES_MAX`] bytes.
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
pub const PATTERN_SUBJECT_MAX: usize = 8 * 1024;
/// Most repetitions `string.rep` makes and elements `table.move` moves.
pub const REPEAT_MAX: i64 = 1 << 24;
/// Longest input `capdb.json_decode` and `capdb.key_part` take (and separator: 64 bytes).
pub const HELPER_INPUT_MAX: usize = 1 << 20;
/// A group part's bytes, and parts per group.
pub const GROUP_PART_BYTES_MAX: usize = 1_024;
pub const GROUP_PARTS_MAX: usize = 8;
/// A user error's message, as far as the job records it.
pub const ERROR_BYTES_MAX: usize = 512;
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
    let mut s = text_whole(e);
    if s.len() > ERROR_BYTES_MAX {
        let mut cut = ERROR_BYTES_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn text_whole(e: &mlua::Error) -> String {
    match e {
        mlua::Error::MemoryError(_) => format!(
            "memory: past the {} MiB a Lua VM may hold",
            MEMORY_MAX >> 20
        ),
        mlua::Error::CallbackError { cause, .. } => text_whole(cause),
        other => {
            // The message with its `[string "map"]:LINE:` position, without the traceback.
            let s = other.to_string();
            s.lines().next().unwrap_or_default().to_string()
        }
    }
}

/// The functions a library's chunk defines (global functions the sandbox does not give),
/// sorted: `Err` when it does not compile or fails as it runs (under a call's budget).
pub fn library_functions(source: &str) -> Result<Vec<String>, String> {
    let names = |lua: &Lua| -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for pair in lua.globals().pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| format!("Lua: {}", text(&e)))?;
            if let (Value::String(k), Value::Function(_)) = (k, v) {
                out.push(k.to_string_lossy());
            }
        }
        out.sort();
        Ok(out)
    };
    let given = names(&LuaMapper::load("", Vec::new())?.0)?;
    let (lua, ..) = LuaMapper::load(source, Vec::new())?;
    Ok(names(&lua)?
        .into_iter()
        .filter(|n| given.binary_search(n).is_err())
        .collect())
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
        let (lua, emitted, instructions, deadline) = Self::load(&map.source, names)?;
        let setup = |e: mlua::Error| format!("Lua: {}", text(&e));
        let function: Function = match lua
            .globals()
            .get::<Value>(map.function.as_str())
            .map_err(setup)?
        {
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

    /// A sandboxed VM with `source` run in it (under a call's budget).
    #[allow(clippy::type_complexity)]
    fn load(
        source: &str,
        names: Vec<String>,
    ) -> Result<
        (
            Lua,
            Rc<RefCell<Vec<Emit>>>,
            Rc<Cell<u64>>,
            Rc<Cell<Instant>>,
        ),
        String,
    > {
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
            "pcall",
            "xpcall",
            "setmetatable",
            "getmetatable",
            "rawset",
            "rawget",
            "rawequal",
            "rawlen",
        ] {
            g.raw_set(name, Value::Nil).map_err(setup)?;
        }
        let string: Table = g.get("string").map_err(setup)?;
        string.raw_set("dump", Value::Nil).map_err(setup)?;
        let math: Table = g.get("math").map_err(setup)?;
        math.raw_set("random", Value::Nil).map_err(setup)?;
        math.raw_set("randomseed", Value::Nil).map_err(setup)?;
        // The pattern functions, behind bounds on their subject and pattern.
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
                    let plain =
                        f == "find" && args.get(3).is_some_and(|p| p.as_boolean() == Some(true));
                    if let (Some(Value::String(p)), false) = (args.get(1), plain)
                        && quantifiers(&p.as_bytes()) > 1
                    {
                        return Err(mlua::Error::runtime(format!(
                            "string.{f}: a pattern with more than one quantifier (* + - ?)"
                        )));
                    }
                    inner.call::<mlua::MultiValue>(args)
                })
                .map_err(setup)?;
            string.raw_set(f, bounded).map_err(setup)?;
        }
        // `string.rep` and `table.move` loop in C over counts the caller chooses.
        let rep: Function = string.get("rep").map_err(setup)?;
        let bounded_rep = lua
            .create_function(
                move |_, (s, n, sep): (mlua::LuaString, i64, Option<mlua::LuaString>)| {
                    let unit = s.as_bytes().len() + sep.as_ref().map_or(0, |x| x.as_bytes().len());
                    if n > REPEAT_MAX || (n > 0 && unit.saturating_mul(n as usize) > MEMORY_MAX) {
                        return Err(mlua::Error::runtime(format!(
                            "string.rep: more than {REPEAT_MAX} repetitions or {} MiB",
                            MEMORY_MAX >> 20
                        )));
                    }
                    rep.call::<Value>((s, n, sep))
                },
            )
            .map_err(setup)?;
        string.raw_set("rep", bounded_rep).map_err(setup)?;
        let table: Table = g.get("table").map_err(setup)?;
        let mv: Function = table.get("move").map_err(setup)?;
        let bounded_move = lua
            .create_function(move |_, args: mlua::MultiValue| {
                let int = |i: usize| match args.get(i) {
                    Some(Value::Integer(n)) => Some(*n),
                    _ => None,
                };
                if let (Some(f), Some(e)) = (int(1), int(2))
                    && e.saturating_sub(f) >= REPEAT_MAX
                {
                    return Err(mlua::Error::runtime(format!(
                        "table.move: more than {REPEAT_MAX} elements"
                    )));
                }
                mv.call::<Value>(args)
            })
            .map_err(setup)?;
        table.raw_set("move", bounded_move).map_err(setup)?;
        let emitted: Rc<RefCell<Vec<Emit>>> = Rc::default();
        let sink = emitted.clone();
        let emit = lua
            .create_function(move |_, (group, values): (Value, Option<Table>)| {
                if sink.borrow().len() >= EMITS_PER_KEY_MAX {
                    return Err(mlua::Error::runtime(format!(
                        "emit: more than {EMITS_PER_KEY_MAX} emits for one key"
                    )));
                }
                // Raw reads only (no metatables run here), every part up to the array's
                // length, nil parts as null.
                let parts = match group {
                    Value::Table(t) => {
                        let n = t.raw_len();
                        if n > GROUP_PARTS_MAX {
                            return Err(mlua::Error::runtime(format!(
                                "emit: a group of more than {GROUP_PARTS_MAX} parts"
                            )));
                        }
                        (1..=n)
                            .map(|i| t.raw_get::<Value>(i).and_then(|v| scalar(&v)))
                            .collect::<mlua::Result<Vec<_>>>()?
                    }
                    other => vec![scalar(&other)?],
                };
                let mut rounded = false;
                let mut numbers = Vec::with_capacity(names.len());
                for n in &names {
                    let v = match &values {
                        Some(t) => t.raw_get::<Value>(n.as_str())?,
                        None => Value::Nil,
                    };
                    numbers.push(number(&v).map(|(x, r)| {
                        rounded |= r;
                        x
                    }));
                }
                sink.borrow_mut().push((parts, numbers, rounded));
                Ok(())
            })
            .map_err(setup)?;
        g.raw_set("emit", emit).map_err(setup)?;
        let capdb = lua.create_table().map_err(setup)?;
        capdb
            .raw_set(
                "json_decode",
                lua.create_function(|lua, s: mlua::LuaString| {
                    if s.as_bytes().len() > HELPER_INPUT_MAX {
                        return Err(mlua::Error::runtime(format!(
                            "capdb.json_decode: a text longer than {HELPER_INPUT_MAX} bytes"
                        )));
                    }
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
                        if key.as_bytes().len() > HELPER_INPUT_MAX || sep.as_bytes().len() > 64 {
                            return Err(mlua::Error::runtime(format!(
                                "capdb.key_part: a key longer than {HELPER_INPUT_MAX} bytes or a separator longer than 64"
                            )));
                        }
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
        // Once spent, the budget stays spent for the rest of the call: every later hook fails
        // it again (nothing in the sandbox can catch an error, but a finalizer's is dropped).
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
        lua.load(source)
            .set_name("map")
            .set_mode(mlua::chunk::ChunkMode::Text)
            .exec()
            .map_err(setup)?;
        drop(g);
        Ok((lua, emitted, instructions, deadline))
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

/// How many quantifiers (`*`, `+`, `-`, `?` after an item) a Lua pattern has.
fn quantifiers(p: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    let mut in_set = false;
    while i < p.len() {
        match p[i] {
            b'%' => i += 1,
            b'[' if !in_set => in_set = true,
            b']' if in_set => in_set = false,
            b'*' | b'+' | b'-' | b'?' if !in_set && i > 0 => n += 1,
            _ => {}
        }
        i += 1;
    }
    n
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
        Value::String(s) if s.as_bytes().len() > GROUP_PART_BYTES_MAX => {
            return Err(mlua::Error::runtime(format!(
                "emit: a group part longer than {GROUP_PART_BYTES_MAX} bytes"
            )));
        }
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
            ("string.find(string.rep('a', 8000), '.-.-x')", "quantifier"),
            ("string.rep('', math.maxinteger)", "repetitions"),
            ("table.move({}, 1, math.maxinteger, 1)", "elements"),
            ("pcall(function() end)", "pcall"),
            ("setmetatable({}, {})", "setmetatable"),
            ("emit(string.rep('x', 2000), {})", "longer than"),
            ("emit({1, 2, 3, 4, 5, 6, 7, 8, 9}, {})", "parts"),
            ("error(string.rep('e', 100000))", "eee"),
        ] {
            let mut m = mapper(&format!("function map(k, v) {code} end"), &[]).unwrap();
            let e = m.call(b"k", b"v").unwrap_err();
            assert!(
                e.contains(what)
                    || what == "os"
                    || what == "io"
                    || what == "load"
                    || what == "require"
                    || what == "random"
                    || what == "dump",
                "{what}: {e}"
            );
            assert!(
                e.len() <= ERROR_BYTES_MAX + 3,
                "{what}: an error of {} bytes",
                e.len()
            );
        }
        // Budgets cannot be caught: a call that loops under any construct ends.
        let mut m = mapper(
            "function map(k, v) while true do local ok = string.find('abc', 'b') end end",
            &[],
        )
        .unwrap();
        assert!(m.call(b"k", b"v").unwrap_err().contains("budget"));
        // One quantifier is fine (word counting).
        let mut m = mapper(
            "function map(k, v) for w in string.gmatch(v, '%a+') do emit(w, {}) end end",
            &[],
        )
        .unwrap();
        assert_eq!(m.call(b"k", b"to be or not").unwrap().len(), 4);
        assert!(
            mapper("function map(k, v)", &[])
                .unwrap_err()
                .contains("Lua")
        );
        assert!(mapper("x = 1", &[]).unwrap_err().contains("no function"));
    }
}
