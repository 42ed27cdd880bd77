//! Running one task: the keys of its range, a page at a time from the pinned snapshot,
//! through the job's plan into one partial result, which alone leaves the node.
//!
//! Blocking (it reads storage and computes): the node runs it on a thread that may block,
//! never on the async runtime's workers.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use capdb_reduce::{JobSpec, Plan};
use capdb_types::jobs::{PARTIAL_CHUNK_MAX, PARTIAL_CHUNKS_MAX};

use crate::{TaskError, TaskOrder, TaskOutput};

/// Keys a worker asks for per page.
pub const PAGE_KEYS: usize = 4_096;

/// One page of a task's range: string keys and their values, and where the next page starts
/// (`None`: the range is done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<(Bytes, Bytes)>,
    pub next: Option<Bytes>,
}

/// Runs `order`: `page(after)` reads the page after `after` (`None`: from the range's start)
/// from the pin; `cancelled` is checked between pages. A page that cannot be read fails the
/// attempt (another replica may hold the pin); a limit of the spec fails the job.
pub fn run(
    order: &TaskOrder,
    mut page: impl FnMut(Option<&[u8]>) -> Result<Page, String>,
    cancelled: &AtomicBool,
) -> Result<TaskOutput, TaskError> {
    let spec = JobSpec::parse(order.spec.as_bytes())
        .map_err(|e| TaskError::User(format!("the job's spec: {e}")))?;
    // `limits.scan_keys_per_s`, per task (a node-wide limit driven by foreground latency is
    // the design's next step): after each page the task sleeps until it is within the rate.
    let rate = spec.limits.scan_keys_per_s;
    let max_run = std::time::Duration::from_secs(spec.limits.max_s);
    // A Lua map: one VM for the task, the source compiled once.
    let mut lua = match &spec.lua {
        Some(map) => Some(
            crate::lua::LuaMapper::new(map, spec.values.keys().cloned().collect())
                .map_err(TaskError::User)?,
        ),
        None => None,
    };
    let plan = Plan::new(spec).map_err(|e| TaskError::User(e.to_string()))?;
    let mut partial = plan.partial();
    let mut after: Option<Bytes> = None;
    let started = std::time::Instant::now();
    let mut read: u64 = 0;
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(TaskError::Failed("the attempt was cancelled".into()));
        }
        let p = page(after.as_deref()).map_err(TaskError::Failed)?;
        read += p.entries.len() as u64;
        if let Some(rate) = rate {
            let due = std::time::Duration::from_secs_f64(read as f64 / rate as f64);
            // In slices, so that a cancel is heard within one.
            while let Some(ahead) = due.checked_sub(started.elapsed()) {
                if cancelled.load(Ordering::Relaxed) {
                    return Err(TaskError::Failed("the attempt was cancelled".into()));
                }
                std::thread::sleep(ahead.min(std::time::Duration::from_millis(100)));
            }
        }
        let at = |key: &[u8], e: String| {
            TaskError::User(format!("key {:?}: {e}", String::from_utf8_lossy(key)))
        };
        for (key, value) in &p.entries {
            match lua.as_mut() {
                None => plan
                    .add(&mut partial, key, value)
                    .map_err(|e| at(key, e.to_string()))?,
                Some(m) => {
                    // A Lua call may take up to a second: a page of them, an hour. Between
                    // keys, the attempt hears a cancel and the job's own time limit.
                    if cancelled.load(Ordering::Relaxed) {
                        return Err(TaskError::Failed("the attempt was cancelled".into()));
                    }
                    if started.elapsed() > max_run {
                        return Err(TaskError::User(format!(
                            "limits.max_s: the task ran past {} s",
                            max_run.as_secs()
                        )));
                    }
                    if !plan.read_key(&mut partial, key, value) {
                        continue;
                    }
                    // A user-code error fails the job at once, naming the key.
                    for (group, numbers, rounded) in m.call(key, value).map_err(|e| at(key, e))? {
                        plan.add_emit(&mut partial, &group, &numbers, rounded)
                            .map_err(|e| at(key, e.to_string()))?;
                    }
                }
            }
        }
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let keys = partial.keys;
    let bytes = partial.encode();
    let most = PARTIAL_CHUNK_MAX * PARTIAL_CHUNKS_MAX as usize;
    if bytes.len() > most {
        return Err(TaskError::User(format!(
            "a task's partial result is {} bytes, over the {most} a task may send: fewer groups (limits.groups_max) or a narrower input",
            bytes.len()
        )));
    }
    Ok(TaskOutput {
        keys,
        partial: Bytes::from(bytes),
    })
}
