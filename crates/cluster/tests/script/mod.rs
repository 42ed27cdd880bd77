//! The script runner both script tests share (`placement_scripts.rs`, `lease_scripts.rs`):
//! blocks of command lines, a `---` line, then the expected output; see either file's doc.

use std::collections::BTreeMap;
use std::path::Path;

use capdb_cluster::NodeId;

/// Nodes by the names scripts give them: a name is numbered (1, 2, 3...) where it first appears.
#[derive(Default)]
pub struct Names(BTreeMap<String, NodeId>);

impl Names {
    pub fn id(&mut self, name: &str) -> NodeId {
        let next = self.0.len() as NodeId + 1;
        *self.0.entry(name.to_string()).or_insert(next)
    }

    pub fn name(&self, id: NodeId) -> String {
        let name = self.0.iter().find(|(_, i)| **i == id).map(|(n, _)| n);
        name.cloned().unwrap_or_else(|| format!("#{id}"))
    }
}

/// Runs one command line, appending its output lines; `Err` for a malformed command.
pub type Run<'r> = dyn FnMut(&str, &mut Vec<String>) -> Result<(), String> + 'r;

/// Runs a script with `run` (one runner per file); returns its text with the actual outputs,
/// and the mismatches.
fn run_script(path: &Path, text: &str, run: &mut Run<'_>) -> (String, Vec<String>) {
    let (mut rewritten, mut failures) = (String::new(), Vec::new());
    let mut commands: Vec<(usize, &str)> = Vec::new();
    // The `---` line's number and the expected lines, once in a block's output.
    let mut expected: Option<(usize, Vec<&str>)> = None;
    let mut lines = text.lines().zip(1..).peekable();
    while let Some((line, n)) = lines.next() {
        let blank = line.trim().is_empty();
        match &mut expected {
            Some((_, exp)) => exp.push(line),
            None => {
                rewritten.push_str(line);
                rewritten.push('\n');
                if line == "---" {
                    expected = Some((n, Vec::new()));
                } else if blank && !commands.is_empty() {
                    panic!("{}:{n}: commands without a --- line", path.display());
                } else if !blank && !line.trim_start().starts_with('#') {
                    commands.push((n, line.trim()));
                }
            }
        }
        let block_ends = lines.peek().is_none_or(|(l, _)| l.trim().is_empty());
        if let (Some((dashes, exp)), true) = (&expected, block_ends) {
            let mut actual = Vec::new();
            for (n, command) in commands.drain(..) {
                if let Err(e) = run(command, &mut actual) {
                    panic!("{}:{n}: {e}", path.display());
                }
            }
            if *exp != actual {
                failures.push(format!(
                    "{}:{dashes}: output differs\n--- expected\n{}\n--- actual\n{}\n",
                    path.display(),
                    exp.join("\n"),
                    actual.join("\n"),
                ));
            }
            for line in actual {
                rewritten.push_str(&line);
                rewritten.push('\n');
            }
            expected = None;
        }
    }
    if let Some((n, _)) = commands.first() {
        panic!("{}:{n}: commands without a --- line", path.display());
    }
    (rewritten, failures)
}

/// Runs every `*.txt` script of `tests/<dir>`, each with a new runner from `runner`, and fails
/// with every mismatch; with `UPDATE_SCRIPTS=1`, writes the actual outputs over the expected.
pub fn run_scripts<R>(dir: &str, mut runner: impl FnMut() -> R)
where
    R: FnMut(&str, &mut Vec<String>) -> Result<(), String>,
{
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("the scripts' directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no scripts in {}", dir.display());
    let update = std::env::var_os("UPDATE_SCRIPTS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("read script");
        let mut run = runner();
        let (rewritten, mismatches) = run_script(&path, &text, &mut run);
        if update && rewritten != text {
            std::fs::write(&path, rewritten).expect("write script");
        } else if !update {
            failures.extend(mismatches);
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
