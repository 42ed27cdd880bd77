//! The data-type commands: one table per family, lookup, key positions, and [`execute`].
//!
//! Each family file owns a sorted `COMMANDS` slice of [`Spec`] rows (what `COMMAND` reports,
//! and the function that runs it). The server lists these rows next to its own, so a command is
//! known in exactly one place.

use bytes::Bytes;
use capdb_types::{Error, Reply, Result, Timestamp};

use crate::space::Space;

/// What a command may depend on besides its arguments and the data: the same for every replica
/// that runs it (a `cp` entry's leader clock, timestamp and seed).
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Unix milliseconds: what counts as expired.
    pub now_ms: u64,
    /// Stamps every record the command writes.
    pub timestamp: Timestamp,
    /// Seeds every random choice of a write (SPOP, ...), so replicas choose alike.
    pub seed: u64,
    /// Largest element or value a write may create.
    pub value_bytes_max: usize,
}

/// A command's function: the arguments (name first), the space, the context.
pub type CommandFn = fn(&[Bytes], &mut dyn Space, &Ctx) -> Result<Reply>;

/// Whether a command changes data (replicated, queued with the connection's writes) or only
/// reads (evaluated where the data is, after a read barrier in `cp`).
#[derive(Clone, Copy)]
pub enum Run {
    Write(CommandFn),
    Read(CommandFn),
}

/// Where a command's keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// First key, last key (negative: from the end), step, as `COMMAND` reports them.
    Range(i64, i64, i64),
    /// A `numkeys` argument at this index followed by that many keys, plus, when `dest` is
    /// set, a destination key at index 1 (ZUNIONSTORE, SINTERCARD, LMPOP, ...).
    NumKeys { at: usize, dest: bool },
}

/// One command: what `COMMAND` reports about it, and what runs it.
pub struct Spec {
    /// Lowercase; each family table is sorted by it.
    pub name: &'static str,
    /// Arguments counting the name; negative: at least |arity|.
    pub arity: i64,
    pub flags: &'static [&'static str],
    pub keys: Keys,
    pub run: Run,
}

impl Spec {
    pub fn is_write(&self) -> bool {
        matches!(self.run, Run::Write(_))
    }

    pub fn arity_ok(&self, argc: usize) -> bool {
        if self.arity >= 0 {
            argc == self.arity as usize
        } else {
            argc >= self.arity.unsigned_abs() as usize
        }
    }

    /// The first, last and step `COMMAND` reports (numkeys commands: the first key only).
    pub fn key_range(&self) -> (i64, i64, i64) {
        match self.keys {
            Keys::Range(f, l, s) => (f, l, s),
            Keys::NumKeys { dest: true, .. } => (1, 1, 1),
            Keys::NumKeys { at, dest: false } => (at as i64 + 1, at as i64 + 1, 1),
        }
    }

    /// The indices of the keys in `args`, or Redis's error when `numkeys` is not valid.
    pub fn key_indices(&self, args: &[Bytes]) -> Result<Vec<usize>> {
        let mut v = Vec::new();
        self.each_key_index(args, |i| v.push(i))?;
        Ok(v)
    }

    /// [`Spec::key_indices`] without collecting them: `f` gets each index in order (this runs
    /// for every data-type command an engine applies; it must not allocate).
    pub fn each_key_index(&self, args: &[Bytes], mut f: impl FnMut(usize)) -> Result<()> {
        match self.keys {
            Keys::Range(0, _, _) => {}
            Keys::Range(first, last, step) => {
                let n = args.len() as i64;
                let last = if last < 0 { n + last } else { last.min(n - 1) };
                for i in (first..=last).step_by(step.max(1) as usize) {
                    f(i as usize);
                }
            }
            Keys::NumKeys { at, dest } => {
                let n = numkeys(args, at)?;
                if dest {
                    f(1);
                }
                (at + 1..at + 1 + n).for_each(f);
            }
        }
        Ok(())
    }
}

/// The `numkeys` argument at `at`, checked against the arguments that follow it.
pub fn numkeys(args: &[Bytes], at: usize) -> Result<usize> {
    let raw = args.get(at).ok_or_else(syntax)?;
    let n =
        crate::format::parse_int(raw).ok_or_else(|| err("ERR numkeys should be greater than 0"))?;
    if n <= 0 {
        return Err(err("ERR numkeys should be greater than 0"));
    }
    if n as usize > args.len() - at - 1 {
        return Err(err(
            "ERR Number of keys can't be greater than number of args",
        ));
    }
    Ok(n as usize)
}

/// The row of the command `args[0]` names (any case), without allocating: this runs for every
/// data-type command, twice in some engines. Internal commands included.
fn spec_of(args: &[Bytes]) -> Option<&'static Spec> {
    let name = args.first()?;
    lookup_any_case(name).or_else(|| {
        INTERNAL
            .iter()
            .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
    })
}

/// Names up to this long are found by [`packed_name`]; longer ones by a walk of every table.
const PACKED_NAME_MAX: usize = 16;

/// A command name up to [`PACKED_NAME_MAX`] bytes, lowercased, as one big-endian integer
/// (zero-padded: names have no zero bytes, so two names are equal exactly when their integers
/// are). A lookup compares integers instead of calling `memcmp` for every row it passes.
fn packed_name(name: &[u8]) -> Option<u128> {
    if name.len() > PACKED_NAME_MAX {
        return None;
    }
    let mut b = [0u8; PACKED_NAME_MAX];
    b[..name.len()].copy_from_slice(name);
    b.make_ascii_lowercase();
    Some(u128::from_be_bytes(b))
}

/// The row of a client data-type command by its name in any case.
fn lookup_any_case(name: &[u8]) -> Option<&'static Spec> {
    // Every family's rows in one table sorted by packed name: one binary search over integers
    // per lookup instead of a string search per family (this runs several times for every
    // data-type command).
    static SORTED: std::sync::OnceLock<Vec<(u128, &'static Spec)>> = std::sync::OnceLock::new();
    let Some(packed) = packed_name(name) else {
        return all().find(|s| s.name.as_bytes().eq_ignore_ascii_case(name));
    };
    let sorted = SORTED.get_or_init(|| {
        let mut v: Vec<(u128, &'static Spec)> = all()
            .filter_map(|s| Some((packed_name(s.name.as_bytes())?, s)))
            .collect();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    });
    sorted
        .binary_search_by_key(&packed, |(p, _)| *p)
        .ok()
        .map(|i| sorted[i].1)
}

/// Commands the nodes themselves log, never listed nor accepted from clients (`lookup` does not
/// find them): the active expiry of replicated keyspaces, and the server's own key reads (GET,
/// MGET, STRLEN, EXISTS, TTL, PTTL, TYPE) in the form a transaction carries them (MULTI/EXEC
/// runs every keyed command of a transaction in one atomic step of the engine: see
/// `crate::txn_reads`).
const INTERNAL: &[Spec] = &[
    Spec {
        name: EXPIRED_COMMAND,
        arity: -2,
        flags: &["write"],
        keys: Keys::Range(1, -1, 1),
        run: Run::Write(remove_expired),
    },
    Spec {
        name: "capdb.exists",
        arity: -2,
        flags: &["readonly"],
        keys: Keys::Range(1, -1, 1),
        run: Run::Read(crate::txn_reads::exists),
    },
    Spec {
        name: "capdb.get",
        arity: 2,
        flags: &["readonly"],
        keys: Keys::Range(1, 1, 1),
        run: Run::Read(crate::txn_reads::get),
    },
    Spec {
        name: "capdb.mget",
        arity: -2,
        flags: &["readonly"],
        keys: Keys::Range(1, -1, 1),
        run: Run::Read(crate::txn_reads::mget),
    },
    Spec {
        name: "capdb.pttl",
        arity: 2,
        flags: &["readonly"],
        keys: Keys::Range(1, 1, 1),
        run: Run::Read(crate::txn_reads::pttl),
    },
    Spec {
        name: "capdb.strlen",
        arity: 2,
        flags: &["readonly"],
        keys: Keys::Range(1, 1, 1),
        run: Run::Read(crate::txn_reads::strlen),
    },
    Spec {
        name: "capdb.ttl",
        arity: 2,
        flags: &["readonly"],
        keys: Keys::Range(1, 1, 1),
        run: Run::Read(crate::txn_reads::ttl),
    },
    Spec {
        name: "capdb.type",
        arity: 2,
        flags: &["readonly"],
        keys: Keys::Range(1, 1, 1),
        run: Run::Read(crate::txn_reads::key_type),
    },
];

/// `capdb.expired key [key ...]`: deletes each key whose record has expired at the entry's
/// clock (a shard leader proposes it for keys it found expired; a key written again since is
/// live and kept). Reclaims an expired collection's elements. Replies with the keys it
/// removed, for their `expired` keyspace events (the proposing leader publishes them). A key a
/// client deleted between the leader's look and this entry is among them too: whether a record
/// existed is not visible through a [`Space`].
pub const EXPIRED_COMMAND: &str = "capdb.expired";

fn remove_expired(args: &[Bytes], space: &mut dyn Space, _: &Ctx) -> Result<Reply> {
    let mut removed = Vec::new();
    for key in &args[1..] {
        if space.get(key)?.is_none() {
            space.remove(key)?;
            removed.push(Reply::Bulk(key.clone()));
        }
    }
    Ok(Reply::Array(removed))
}

/// Every family's table.
const FAMILIES: &[&[Spec]] = &[
    crate::hash::COMMANDS,
    crate::hll::COMMANDS,
    crate::list::COMMANDS,
    crate::set::COMMANDS,
    crate::strings::COMMANDS,
    crate::bits::COMMANDS,
    crate::keys::COMMANDS,
    crate::zset::COMMANDS,
    crate::dump::COMMANDS,
];

/// The row of a data-type command by its lowercase name.
pub fn lookup(name: &str) -> Option<&'static Spec> {
    lookup_any_case(name.as_bytes())
}

/// The keys of a data-type command (`args[0]` its name), in argument order; an unknown command
/// has none, and an invalid `numkeys` is Redis's error.
pub fn command_keys(args: &[Bytes]) -> Result<Vec<Bytes>> {
    if crate::notify::is_wrapped(args) {
        return command_keys(&args[1..]);
    }
    let Some(spec) = spec_of(args) else {
        return Ok(Vec::new());
    };
    Ok(spec
        .key_indices(args)?
        .into_iter()
        .filter_map(|i| args.get(i).cloned())
        .collect())
}

/// Whether a data-type command (`args[0]` its name) may change its keys: by its table row,
/// and for a command no row knows, yes (what a caller guarding data must assume).
pub fn writes(args: &[Bytes]) -> bool {
    if crate::notify::is_wrapped(args) {
        return writes(&args[1..]);
    }
    spec_of(args).is_none_or(Spec::is_write)
}

/// [`command_keys`] without collecting them: `f` gets each key in argument order.
pub fn each_command_key(args: &[Bytes], mut f: impl FnMut(&Bytes)) -> Result<()> {
    if crate::notify::is_wrapped(args) {
        return each_command_key(&args[1..], f);
    }
    let Some(spec) = spec_of(args) else {
        return Ok(());
    };
    spec.each_key_index(args, |i| {
        if let Some(k) = args.get(i) {
            f(k)
        }
    })
}

/// Whether a command belongs to the hash, list, set or sorted-set families (its data are
/// element records).
pub fn is_collection_command(name: &str) -> bool {
    [
        crate::hash::COMMANDS,
        crate::list::COMMANDS,
        crate::set::COMMANDS,
        crate::zset::COMMANDS,
    ]
    .iter()
    .any(|t| t.binary_search_by_key(&name, |c| c.name).is_ok())
}

/// Every data-type command row.
pub fn all() -> impl Iterator<Item = &'static Spec> {
    FAMILIES.iter().flat_map(|t| t.iter())
}

/// Runs a data-type command (`args[0]` is its name, any case). Engines call this for
/// [`capdb_types::Mutation::Exec`] and for queries; a malformed argument list (from a log
/// written by a different version, say) is an error reply, never a panic.
pub fn execute(args: &[Bytes], space: &mut dyn Space, cx: &Ctx) -> Result<Reply> {
    // `capdb.notify <command>`: the command and its keyspace events (`notify.rs`).
    if crate::notify::is_wrapped(args) && args.len() > 1 && !crate::notify::is_wrapped(&args[1..]) {
        return crate::notify::run(args, space, cx);
    }
    let Some(spec) = spec_of(args) else {
        let name = args
            .first()
            .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
            .unwrap_or_default();
        return Err(err(format!("ERR unknown command '{name}'")));
    };
    if !spec.arity_ok(args.len()) {
        return Err(wrong_args(spec.name));
    }
    match spec.run {
        Run::Write(f) | Run::Read(f) => f(args, space, cx),
    }
}

/// A Redis error line (`ERR ...`, `WRONGTYPE ...`).
pub fn err(line: impl Into<String>) -> Error {
    Error::Command(line.into())
}

pub fn syntax() -> Error {
    err("ERR syntax error")
}

pub fn not_integer() -> Error {
    err("ERR value is not an integer or out of range")
}

pub fn wrong_args(name: &str) -> Error {
    err(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// `args[i]` as an integer, or Redis's integer error.
pub fn int_arg(args: &[Bytes], i: usize) -> Result<i64> {
    args.get(i)
        .and_then(|a| crate::format::parse_int(a))
        .ok_or_else(not_integer)
}

/// Whether a table is sorted by name without duplicates (checked by each family's test).
pub fn sorted(table: &[Spec]) -> bool {
    table.windows(2).all(|w| w[0].name < w[1].name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_table_is_sorted_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for t in FAMILIES {
            assert!(sorted(t));
            for c in t.iter() {
                assert!(names.insert(c.name), "{} listed twice", c.name);
                assert_eq!(c.name, c.name.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn lookup_finds_every_row_by_its_name_in_any_case_and_nothing_else() {
        for spec in all() {
            assert!(std::ptr::eq(lookup(spec.name).unwrap(), spec));
            let upper = Bytes::from(spec.name.to_ascii_uppercase());
            assert!(std::ptr::eq(spec_of(&[upper]).unwrap(), spec));
        }
        assert!(lookup("hsetx").is_none());
        assert!(lookup("zrevrangebyscorex").is_none());
        assert!(lookup("").is_none());
        // Internal commands run from the log but are never found for a client.
        assert!(lookup(EXPIRED_COMMAND).is_none());
        let internal = Bytes::from_static(EXPIRED_COMMAND.as_bytes());
        assert_eq!(spec_of(&[internal]).unwrap().name, EXPIRED_COMMAND);
    }
}
