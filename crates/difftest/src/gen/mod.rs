//! The generator: one seeded command list over every family's command table.
//!
//! # Why it looks like this
//!
//! - **Open loop.** A command depends only on the RNG, never on a reply, so one seed names one
//!   command list (given the same set of commands served, printed at the start of a run), and a
//!   difference replays from `--seed` alone. The only reply-dependent steps are SCAN walks (the
//!   harness follows cursors) and the resyncs after random commands, both done by the harness,
//!   not the generator.
//! - **One file per family**, each a table of [`CommandGen`] rows (name, weight, generator), so
//!   families land in parallel: a new family is a file and a line in [`FAMILIES`]. A row whose
//!   command capdb does not serve yet is dropped at start (the harness probes every name), so a
//!   family can list commands before they land.
//! - **Small pools** ([`Gen::key`], [`Gen::field`], ...) so that keys collide across types
//!   (`WRONGTYPE`), fields repeat, and collections grow and empty out. All keys share the hash
//!   tag `{d}`, so multi-key commands never meet `CROSSSLOT`. In mode `cp-shards`
//!   ([`Generator::spreading_txn`]) a step may have its `{d}` rewritten to another of
//!   [`txn::TAGS`], all its keys alike, so transactions span shards.
//! - **Invalid forms** on purpose (wrong arity, unknown options, bad numbers, out-of-range
//!   indexes): error texts are replies too.
//! - **Time**: expiries are far in the future or in the past, relative ones at least 100 s,
//!   and `GT`/`LT` only compare absolute deadlines, so no reply depends on when a command ran
//!   except `TTL`-like ones (compared approximately, see `compare.rs`).

pub mod bits;
pub mod hash;
pub mod keys;
pub mod list;
pub mod set;
pub mod strings;
pub mod txn;
pub mod zset;

use crate::rng::Rng;

/// One command to send to both servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The command, its name first.
    pub args: Vec<Vec<u8>>,
    /// A SCAN-family walk: `args` is the first call (cursor `0`); the harness follows cursors
    /// on each server until 0 and compares what the walks returned.
    pub walk: bool,
    /// More steps of a transaction block follow (`txn.rs`): they go over the same connection.
    pub block: bool,
}

impl Step {
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.args[0]).to_ascii_lowercase()
    }
}

/// One generated command: its name (lowercase, as probed on the servers), its weight within
/// its family, and its generator.
pub struct CommandGen {
    pub name: &'static str,
    pub weight: u32,
    /// Called with the row's name (rows may share a generator).
    pub make: fn(&mut Gen, &str) -> Step,
}

/// A family: a name and its table.
pub struct Family {
    pub name: &'static str,
    /// Share of the whole mix, relative to the other families.
    pub weight: u32,
    /// The keys this family draws most of the time (`first..first + len` of the pool,
    /// wrapping), overlapping its neighbours': enough collisions for `WRONGTYPE`, few enough
    /// that collections grow.
    pub home: (u64, u64),
    pub commands: &'static [CommandGen],
}

/// Every family.
pub const FAMILIES: &[&Family] = &[
    &strings::FAMILY,
    &keys::FAMILY,
    &hash::FAMILY,
    &list::FAMILY,
    &set::FAMILY,
    &zset::FAMILY,
    &bits::FAMILY,
    &txn::FAMILY,
];

/// Number of keys in the pool.
pub const KEYS: usize = 16;

/// Text longer than 64 bytes: past Redis's listpack value limit (changes the encoding).
pub(crate) const LONG: &[u8] =
    b"a-value-longer-than-sixty-four-bytes-so-that-redis-converts-the-encoding-0123456789";

/// The generator's state and the pools every family draws from.
pub struct Gen {
    pub rng: Rng,
    /// The calling family's [`Family::home`].
    home: (u64, u64),
}

/// Builds a [`Step`] from anything that reads as bytes.
#[macro_export]
macro_rules! step {
    ($($a:expr),* $(,)?) => {
        $crate::r#gen::Step { args: vec![$($crate::r#gen::arg($a)),*], walk: false, block: false }
    };
}

/// Anything that reads as an argument.
pub fn arg(a: impl AsRef<[u8]>) -> Vec<u8> {
    a.as_ref().to_vec()
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            rng: Rng::new(seed),
            home: (0, KEYS as u64),
        }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.rng.chance(percent)
    }

    /// Whether to generate an invalid form (about one command in ten).
    pub fn invalid(&mut self) -> bool {
        self.rng.chance(10)
    }

    /// A key from the pool of [`KEYS`], all under the hash tag `{d}`: four times in five one
    /// of the family's home keys.
    pub fn key(&mut self) -> Vec<u8> {
        let i = if self.rng.chance(80) {
            (self.home.0 + self.rng.below(self.home.1)) % KEYS as u64
        } else {
            self.rng.below(KEYS as u64)
        };
        format!("{{d}}:{i}").into_bytes()
    }

    /// `n` keys (repetitions allowed).
    pub fn keys(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|_| self.key()).collect()
    }

    /// A hash field: a small pool, rarely empty or long.
    pub fn field(&mut self) -> Vec<u8> {
        match self.rng.below(100) {
            0 => Vec::new(),
            1 => LONG.to_vec(),
            2..=9 => self.rng.pick(&["1", "2", "-3"]).as_bytes().to_vec(),
            _ => format!("f{}", self.rng.below(10)).into_bytes(),
        }
    }

    /// A set member or list element: integers (Redis keeps all-integer sets as intsets),
    /// short strings, rarely empty, binary or long.
    pub fn member(&mut self) -> Vec<u8> {
        match self.rng.below(100) {
            0 => Vec::new(),
            1 => LONG.to_vec(),
            2 => b"\x00\xff\r\n".to_vec(),
            3..=44 => self
                .rng
                .pick(&["1", "2", "3", "4", "10", "-5", "100", "65536"])
                .as_bytes()
                .to_vec(),
            _ => self
                .rng
                .pick(&["a", "b", "c", "d", "e", "f", "g", "hello"])
                .as_bytes()
                .to_vec(),
        }
    }

    /// A set member: [`Gen::member`], with `hello` for its long text. A set is a ZUNIONSTORE
    /// source, and a sorted set built from a member longer than 64 bytes is a Redis `skiplist`,
    /// which keeps `-0` scores that capdb stores as `0` (see `zset.rs`): pool keys must only
    /// ever hold small sorted sets. (A long member changes nothing else for a set in 7.0: any
    /// non-integer member already makes it a `hashtable`.)
    pub fn set_member(&mut self) -> Vec<u8> {
        let m = self.member();
        if m.len() > 64 { b"hello".to_vec() } else { m }
    }

    /// `n` set members (repetitions allowed).
    pub fn set_members(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|_| self.set_member()).collect()
    }

    /// `n` members (repetitions allowed).
    pub fn members(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|_| self.member()).collect()
    }

    /// A string or field value: integers (incl. the extremes), floats exact in binary, text,
    /// empty, binary, long.
    pub fn value(&mut self) -> Vec<u8> {
        match self.rng.below(100) {
            0..=29 => self.int_text(),
            30..=39 => self.float_text(),
            40..=44 => Vec::new(),
            45..=47 => b"\x00bin\xff\r\n".to_vec(),
            48..=51 => LONG.to_vec(),
            _ => self
                .rng
                .pick(&["v", "hello", "world", "abc", "x y", "ZZ"])
                .as_bytes()
                .to_vec(),
        }
    }

    /// An integer as text: small ones mostly, the 64-bit extremes sometimes.
    pub fn int_text(&mut self) -> Vec<u8> {
        match self.rng.below(20) {
            0 => b"9223372036854775807".to_vec(),
            1 => b"-9223372036854775808".to_vec(),
            2 => b"9223372036854775806".to_vec(),
            _ => self.rng.range(-20, 120).to_string().into_bytes(),
        }
    }

    /// A small integer as text, for increments.
    pub fn small_int(&mut self) -> Vec<u8> {
        self.rng.range(-10, 10).to_string().into_bytes()
    }

    /// A float exact in binary (halves and quarters), so sums agree between Redis's `long
    /// double` and capdb's `f64`.
    pub fn float_text(&mut self) -> Vec<u8> {
        self.rng
            .pick(&[
                "0.5", "1.25", "-2.75", "3", "0", "-0.5", "10.5", "1e2", "2.5e-1", "-1.5", "7.75",
            ])
            .as_bytes()
            .to_vec()
    }

    /// Text that is not a valid 64-bit integer for Redis.
    pub fn bad_int(&mut self) -> Vec<u8> {
        self.rng
            .pick(&[
                "abc",
                "1.5",
                " 1",
                "1 ",
                "",
                "99999999999999999999",
                "-9223372036854775809",
                "1e3",
                "+1",
                "01",
                "-",
                "0x10",
            ])
            .as_bytes()
            .to_vec()
    }

    /// Text that is not a valid float for Redis (NaN, overflow, spaces, junk).
    pub fn bad_float(&mut self) -> Vec<u8> {
        self.rng
            .pick(&[
                "abc", "", " 1", "1 ", "1.5x", "nan", "1e309", "-1e309", "--1",
            ])
            .as_bytes()
            .to_vec()
    }

    /// Text INCRBYFLOAT/HINCRBYFLOAT must refuse: [`Gen::bad_float`] without the values past
    /// `f64`'s range, which Redis's 80-bit `long double` accepts (`1e309`) and capdb's `f64`
    /// cannot hold (a documented difference, `crates/data/src/format.rs`).
    pub fn bad_long_double(&mut self) -> Vec<u8> {
        self.rng
            .pick(&["abc", "", " 1", "1 ", "1.5x", "nan", "--1"])
            .as_bytes()
            .to_vec()
    }

    /// An index into a list: near the ends, either sign, sometimes far out of range.
    pub fn index(&mut self) -> Vec<u8> {
        match self.rng.below(10) {
            0 => self
                .rng
                .pick(&["100", "-100", "9223372036854775807", "-9223372036854775808"])
                .as_bytes()
                .to_vec(),
            _ => self.rng.range(-6, 6).to_string().into_bytes(),
        }
    }

    /// A count: mostly small and positive, sometimes zero or negative.
    pub fn count(&mut self) -> Vec<u8> {
        match self.rng.below(12) {
            0 => b"0".to_vec(),
            1 => self.rng.range(-5, -1).to_string().into_bytes(),
            2 => b"100".to_vec(),
            _ => self.rng.range(1, 6).to_string().into_bytes(),
        }
    }

    /// The first cursor of a walk: `0`, or now and then another spelling of it.
    pub fn cursor_zero(&mut self) -> Vec<u8> {
        if self.rng.chance(5) {
            return self.rng.pick(&["", "+0", "-0", "00"]).as_bytes().to_vec();
        }
        b"0".to_vec()
    }

    /// A MATCH pattern over keys or members.
    pub fn pattern(&mut self) -> Vec<u8> {
        self.rng
            .pick(&[
                "*",
                "{d}:1*",
                "{d}:?",
                "{d}:[0-3]",
                "*5",
                "{d}:[^1]*",
                "f*",
                "?",
                "[a-c]",
                "1*",
                "nomatch*",
                "*\\:*",
                "h*o",
            ])
            .as_bytes()
            .to_vec()
    }

    /// A command's name (`name` lowercase) in capitals, its case scrambled now and then.
    pub fn name(&mut self, name: &str) -> Vec<u8> {
        self.word(&name.to_ascii_uppercase())
    }

    /// `s` with its letters' case scrambled now and then (commands and options are
    /// case-insensitive; error texts echo some of them).
    pub fn word(&mut self, s: &str) -> Vec<u8> {
        if !self.rng.chance(5) {
            return s.as_bytes().to_vec();
        }
        s.bytes()
            .map(|b| {
                if self.rng.chance(50) {
                    b.to_ascii_lowercase()
                } else {
                    b.to_ascii_uppercase()
                }
            })
            .collect()
    }
}

/// The whole mix for one run: the rows allowed (by mode and by what capdb serves), weighted.
pub struct Generator {
    state: Gen,
    rows: Vec<(u64, (u64, u64), &'static CommandGen)>,
    total: u64,
    /// The rest of a transaction block, sent before anything else.
    pending: std::collections::VecDeque<Step>,
    /// Mode `cp-shards`: spread transactions over [`txn::TAGS`].
    spread: bool,
}

impl Generator {
    /// `served`: whether capdb serves a command (rows it does not are left out).
    pub fn new(seed: u64, served: &dyn Fn(&str) -> bool) -> Generator {
        let mut rows = Vec::new();
        for fam in FAMILIES {
            let fam_total: u64 = fam.commands.iter().map(|c| c.weight as u64).sum();
            for c in fam.commands {
                if served(c.name) {
                    // Scale so each family keeps its share whatever its table's size.
                    let w = (c.weight as u64 * fam.weight as u64 * 1000) / fam_total.max(1);
                    rows.push((w.max(1), fam.home, c));
                }
            }
        }
        let total = rows.iter().map(|r| r.0).sum();
        Generator {
            state: Gen::new(seed),
            rows,
            total,
            pending: std::collections::VecDeque::new(),
            spread: false,
        }
    }

    /// Spreads transactions over the shards of a 4-shard keyspace (mode `cp-shards`): each
    /// command queued in a block gets its own one of [`txn::TAGS`] for all its keys, the
    /// WATCHes of a block's prelude and WATCH alone watch keys under several tags, and one
    /// command in four outside blocks gets a tag too (so what transactions wrote there is read
    /// and changed outside them as well); blocks come three times as often. Another command
    /// list than without, as determined by the seed.
    pub fn spreading_txn(mut self) -> Generator {
        self.spread = true;
        // Blocks three times as often: they are what the mode is for.
        for r in &mut self.rows {
            if r.2.name == "multi" {
                r.0 *= 3;
            }
        }
        self.total = self.rows.iter().map(|r| r.0).sum();
        self
    }

    /// The names of the commands in the mix.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.rows.iter().map(|r| r.2.name).collect();
        v.dedup();
        v
    }

    pub fn next_step(&mut self) -> Step {
        if let Some(s) = self.pending.pop_front() {
            return s;
        }
        let (mut step, row) = self.draw();
        if row != "multi" {
            if self.spread {
                if row == "watch" {
                    for a in step.args.iter_mut().skip(1) {
                        let t = txn::tag(&mut self.state);
                        *a = txn::retag_arg(a, t);
                    }
                } else if self.state.chance(25) {
                    let t = txn::tag(&mut self.state);
                    txn::retag(&mut step, t);
                }
            }
            return step;
        }
        // A transaction block (see `txn.rs`).
        let mut block = txn::prelude(&mut self.state, self.spread);
        block.push(step);
        let queued = self.state.rng.below(7);
        for _ in 0..queued {
            let mut s = if self.state.chance(6) {
                txn::odd_one(&mut self.state)
            } else {
                // Only commands whose replies compare exactly go inside EXEC's array.
                loop {
                    let (s, row) = self.draw();
                    if exact_inside_exec(&s, row) {
                        break s;
                    }
                }
            };
            if self.spread {
                let t = txn::tag(&mut self.state);
                txn::retag(&mut s, t);
            }
            block.push(s);
        }
        block.push(txn::end(&mut self.state));
        let last = block.len() - 1;
        for (i, s) in block.iter_mut().enumerate() {
            s.block = i < last;
        }
        self.pending.extend(block);
        self.pending.pop_front().expect("a block has steps")
    }

    /// One step from a row drawn by weight, and the row's name. Spreading, a step whose keys
    /// may not all be under its tag is drawn again ([`txn::keys_tagged`]).
    fn draw(&mut self) -> (Step, &'static str) {
        loop {
            let (s, row) = self.draw_any();
            if !self.spread || txn::keys_tagged(&s) {
                return (s, row);
            }
        }
    }

    fn draw_any(&mut self) -> (Step, &'static str) {
        let mut at = self.state.rng.below(self.total);
        for (w, home, c) in &self.rows {
            if at < *w {
                self.state.home = *home;
                return ((c.make)(&mut self.state, c.name), c.name);
            }
            at -= w;
        }
        unreachable!("the weights sum to total")
    }
}

/// Whether a step may be queued inside a generated transaction: not a walk, compared exactly
/// (see `compare.rs`), nothing to resync, not a transaction command itself.
fn exact_inside_exec(s: &Step, row: &str) -> bool {
    !s.walk
        && !matches!(row, "multi" | "exec" | "discard" | "watch" | "unwatch")
        && crate::compare::class_of(row) == crate::compare::Class::Exact
        && !crate::needs_resync(s)
}

/// Every command name any family generates (probed on the servers at start).
pub fn all_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FAMILIES
        .iter()
        .flat_map(|f| f.commands.iter().map(|c| c.name))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_commands() {
        let all = |_: &str| true;
        let a: Vec<Step> = {
            let mut g = Generator::new(7, &all);
            (0..2000).map(|_| g.next_step()).collect()
        };
        let mut g = Generator::new(7, &all);
        let b: Vec<Step> = (0..2000).map(|_| g.next_step()).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|s| !s.args.is_empty()));
    }

    /// Spread: the same seed gives the same list; the queued commands of blocks use several
    /// tags, each command one tag for all its arguments.
    #[test]
    fn spread_blocks_span_the_tags_one_tag_per_command() {
        let all = |_: &str| true;
        let list = |seed| -> Vec<Step> {
            let mut g = Generator::new(seed, &all).spreading_txn();
            (0..5000).map(|_| g.next_step()).collect()
        };
        let a = list(7);
        assert_eq!(a, list(7));
        let tags_of = |s: &Step| -> std::collections::BTreeSet<&'static str> {
            txn::TAGS
                .iter()
                .copied()
                .filter(|t| {
                    s.args[1..]
                        .iter()
                        .any(|a| a.windows(t.len()).any(|w| w == t.as_bytes()))
                })
                .collect()
        };
        let (mut spanning, mut in_multi) = (0, false);
        let mut block_tags = std::collections::BTreeSet::new();
        for s in &a {
            let name = s.name();
            let tags = tags_of(s);
            if name != "watch" {
                assert!(tags.len() <= 1, "one tag per command: {s:?}");
            }
            if name == "multi" && !in_multi {
                in_multi = true;
                block_tags.clear();
            } else if in_multi && !s.block {
                in_multi = false;
                spanning += usize::from(block_tags.len() > 1);
            } else if in_multi {
                block_tags.extend(tags);
            }
        }
        assert!(spanning > 50, "{spanning} blocks over several tags");
    }
}
