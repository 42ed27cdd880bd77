//! `JOB LIBRARY`: Lua libraries loaded once and named by jobs and views (issue 15,
//! `docs/design/mapreduce.md` §9), as Redis's `FUNCTION LOAD` loads them for `FCALL`.
//!
//! # Where they live, and why a job copies its library
//!
//! A library is one key, `__lib:<name>`, in the system keyspace `_jobs` (a `cp` keyspace:
//! replicated by Raft, durable, readable from any node), holding the code as it was loaded,
//! `#!lua name=<name>` first line and all. A job or view spec names a function of one as
//! `"map": {"lua": "<library>.<function>"}`; at submission the node replaces the name with
//! the library's source, so the job's record (and a view's definition) keeps the code it
//! started with: a `REPLACE` or `DELETE` later changes no job already submitted and no view
//! already created, and every task, retry and replica runs the same code.
//!
//! # Bounds
//!
//! [`LIBRARIES_MAX`] libraries of at most [`capdb_reduce::spec::LUA_SOURCE_MAX`] bytes each
//! (the source travels in the spec: one bound for both ways of giving it). A library must
//! compile and define at least one function, checked in the same sandbox and under the same
//! budget as a job's map before it is stored.

use std::sync::Arc;

use bytes::Bytes;
use capdb_reduce::spec::LUA_SOURCE_MAX;
use capdb_types::mutation::{Condition, ExpiryUpdate};
use capdb_types::{Error, Mutation, Reply, Result};
use serde_json::Value;

use super::Node;
use super::jobs::JOBS_KEYSPACE;
use super::router::Consistency;
use crate::keyscan::ScanPosition;

/// Libraries a cluster keeps.
pub const LIBRARIES_MAX: usize = 64;
const KEY_PREFIX: &str = "__lib:";

/// One loaded library, as `JOB LIBRARY LIST` shows it.
#[derive(Debug, Clone)]
pub struct Library {
    pub name: String,
    pub functions: Vec<String>,
    pub code: Bytes,
}

/// The name a library's code gives itself on its first line (`#!lua name=<name>`), checked.
pub fn library_name(code: &[u8]) -> Result<String> {
    let first = code.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = std::str::from_utf8(first)
        .unwrap_or_default()
        .trim_end_matches('\r');
    let Some(rest) = first.strip_prefix("#!lua") else {
        return Err(Error::Command(
            "ERR Missing library metadata: the code starts with '#!lua name=<library name>'".into(),
        ));
    };
    let mut name = None;
    for part in rest.split_whitespace() {
        match part.strip_prefix("name=") {
            Some(n) => name = Some(n.to_string()),
            None => {
                return Err(Error::Command(format!(
                    "ERR Invalid metadata value given: {part}"
                )));
            }
        }
    }
    let name = name.ok_or_else(|| Error::Command("ERR Library name was not given".into()))?;
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Error::Command(
            "ERR Library names can only contain letters, numbers, or underscores(_) and must be at least one character long (at most 64)".into(),
        ));
    }
    Ok(name)
}

/// The chunk Lua runs for a library's code: its metadata line made a comment (`lua_load` of
/// a string does not skip a `#` line as a file's loader does), so line numbers hold.
pub fn library_chunk(code: &[u8]) -> String {
    let text = String::from_utf8_lossy(code);
    match text.strip_prefix("#!") {
        Some(rest) => format!("--{rest}"),
        None => text.into_owned(),
    }
}

/// The functions `code` defines, checked in the jobs' sandbox (off the async runtime).
async fn functions_of(code: &[u8]) -> Result<Vec<String>> {
    let chunk = library_chunk(code);
    let found = tokio::task::spawn_blocking(move || capdb_jobs::lua::library_functions(&chunk))
        .await
        .map_err(|e| Error::Io(format!("the library check: {e}")))?;
    match found {
        Ok(f) if f.is_empty() => Err(Error::Command(
            "ERR No functions registered: the library defines no global function".into(),
        )),
        Ok(f) => Ok(f),
        Err(e) => Err(Error::Command(format!(
            "ERR Error compiling the library: {e}"
        ))),
    }
}

impl Node {
    fn jobs_keyspace(&self) -> Result<Arc<super::router::Keyspace>> {
        let name = capdb_types::keyspace::KeyspaceName::new(JOBS_KEYSPACE)?;
        self.read_catalog().get(&name).cloned().ok_or_else(|| {
            Error::Unavailable("the _jobs keyspace is not open on this node yet: retry".into())
        })
    }

    /// `_jobs` as this node has it: `None` when the cluster has none (no library then); else
    /// waited for (at most 10 s) until this node opened it, so that a node that just started
    /// answers `Unavailable` (retry), never "no library".
    async fn jobs_keyspace_opened(&self) -> Result<Option<Arc<super::router::Keyspace>>> {
        let name = capdb_types::keyspace::KeyspaceName::new(JOBS_KEYSPACE)?;
        if !self.cluster().keyspaces.contains_key(&name) {
            return Ok(None);
        }
        self.jobs_keyspace_waited().await.map(Some)
    }

    /// `_jobs`, created if needed and waited for (at most 10 s) until this node opened it.
    async fn jobs_keyspace_made(&self) -> Result<Arc<super::router::Keyspace>> {
        self.ensure_jobs_keyspace().await?;
        self.jobs_keyspace_waited().await
    }

    async fn jobs_keyspace_waited(&self) -> Result<Arc<super::router::Keyspace>> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self.jobs_keyspace() {
                Ok(ks) => return Ok(ks),
                Err(e) if std::time::Instant::now() >= until => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// `JOB LIBRARY LOAD [REPLACE] <code>`: the library's name. Refused: bad metadata, code
    /// that does not compile or defines no function, a name taken (without `REPLACE`), more
    /// than [`LIBRARIES_MAX`] libraries, code past [`LUA_SOURCE_MAX`].
    pub async fn job_library_load(&self, code: &[u8], replace: bool) -> Result<String> {
        let name = library_name(code)?;
        if code.len() > LUA_SOURCE_MAX {
            return Err(Error::Command(format!(
                "ERR a library is at most {LUA_SOURCE_MAX} bytes (this one {})",
                code.len()
            )));
        }
        functions_of(code).await?;
        let ks = self.jobs_keyspace_made().await?;
        let existing = self.job_libraries().await?;
        let here = existing.iter().any(|l| l.name == name);
        if here && !replace {
            return Err(Error::Command(format!(
                "ERR Library '{name}' already exists"
            )));
        }
        if !here && existing.len() >= LIBRARIES_MAX {
            return Err(Error::Command(format!(
                "ERR at most {LIBRARIES_MAX} libraries (JOB LIBRARY DELETE one)"
            )));
        }
        let set = Mutation::Set {
            key: Bytes::from(format!("{KEY_PREFIX}{name}")),
            value: Bytes::copy_from_slice(code),
            // Without REPLACE, a concurrent load of the same name loses here.
            condition: if replace {
                Condition::Always
            } else {
                Condition::IfAbsent
            },
            expiry: ExpiryUpdate::Clear,
            return_old: false,
        };
        let reply = ks
            .apply(
                vec![set],
                capdb_types::unix_now_ms(),
                Consistency::default(),
            )
            .await?
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Error::Io("no answer to a library write".into())))?;
        if matches!(reply, Reply::Nil | Reply::NilArray) {
            return Err(Error::Command(format!(
                "ERR Library '{name}' already exists"
            )));
        }
        Ok(name)
    }

    /// `JOB LIBRARY DELETE <name>`: whether it was there.
    pub async fn job_library_delete(&self, name: &str) -> Result<bool> {
        let Some(ks) = self.jobs_keyspace_opened().await? else {
            return Ok(false);
        };
        let del = Mutation::Delete {
            key: Bytes::from(format!("{KEY_PREFIX}{name}")),
        };
        let reply = ks
            .apply(
                vec![del],
                capdb_types::unix_now_ms(),
                Consistency::default(),
            )
            .await?
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Error::Io("no answer to a library delete".into())))?;
        Ok(matches!(reply, Reply::Integer(n) if n > 0))
    }

    /// Every library, by name (read linearizably).
    pub async fn job_libraries(&self) -> Result<Vec<Library>> {
        let Some(ks) = self.jobs_keyspace_opened().await? else {
            return Ok(Vec::new());
        };
        let (rows, _) = ks
            .scan(
                ScanPosition::default(),
                None,
                Some(Bytes::from_static(KEY_PREFIX.as_bytes())),
                None,
                LIBRARIES_MAX + 1,
                capdb_types::unix_now_ms(),
                Consistency::default(),
            )
            .await?;
        let mut out = Vec::new();
        for (key, value) in rows {
            let Some(name) = key.strip_prefix(KEY_PREFIX.as_bytes()) else {
                continue;
            };
            out.push(Library {
                name: String::from_utf8_lossy(name).into_owned(),
                functions: functions_of(&value.data).await.unwrap_or_default(),
                code: value.data,
            });
        }
        Ok(out)
    }

    /// `spec` with a `"map": {"lua": "<library>.<function>"}` replaced by the library's
    /// source and the function's name (what a job's record and a view's definition keep);
    /// any other spec as it is.
    pub async fn resolve_lua_library(&self, spec: &[u8]) -> Result<Vec<u8>> {
        let Ok(mut v) = serde_json::from_slice::<Value>(spec) else {
            // The parser says what is wrong with it.
            return Ok(spec.to_vec());
        };
        let Some(Value::String(named)) = v.pointer("/map/lua").cloned() else {
            return Ok(spec.to_vec());
        };
        let Some((library, function)) = named.rsplit_once('.') else {
            return Err(Error::InvalidInput(format!(
                "map.lua: \"{named}\" is not \"<library>.<function>\" (or give {{\"source\": ...}})"
            )));
        };
        let found = self
            .job_libraries()
            .await?
            .into_iter()
            .find(|l| l.name == library)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "map.lua: no library '{library}' (JOB LIBRARY LOAD it first)"
                ))
            })?;
        if !found.functions.iter().any(|f| f == function) {
            return Err(Error::InvalidInput(format!(
                "map.lua: library '{library}' defines no function '{function}' (it defines {})",
                found.functions.join(", ")
            )));
        }
        v["map"]["lua"] = serde_json::json!({
            "source": library_chunk(&found.code),
            "function": function,
        });
        Ok(v.to_string().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_names_itself_on_its_first_line_as_redis_functions_do() {
        assert_eq!(
            library_name(b"#!lua name=geo\nfunction f() end").unwrap(),
            "geo"
        );
        assert_eq!(library_name(b"#!lua name=a_1\r\n").unwrap(), "a_1");
        let no_header = library_name(b"function f() end").unwrap_err().to_string();
        assert!(
            no_header.contains("Missing library metadata"),
            "{no_header}"
        );
        let bad = library_name(b"#!lua name=a-b\n").unwrap_err().to_string();
        assert!(bad.contains("Library names"), "{bad}");
        let unknown = library_name(b"#!lua name=a engine=x\n")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("Invalid metadata"), "{unknown}");
        assert!(library_name(b"#!lua\n").is_err());
    }

    #[test]
    fn the_metadata_line_becomes_a_comment_so_lines_keep_their_numbers() {
        let chunk = library_chunk(b"#!lua name=x\nfunction f() error('at line 2') end");
        assert_eq!(chunk, "--lua name=x\nfunction f() error('at line 2') end");
        assert_eq!(
            capdb_jobs::lua::library_functions(&chunk).unwrap(),
            vec!["f".to_string()]
        );
    }
}
