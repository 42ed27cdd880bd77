//! A job's stream, `__job:<id>` (issue 15, design §7): its progress, partial results with
//! their coverage, task events and final result, read with XRANGE, XREVRANGE is not served,
//! XLEN and XREAD (BLOCK too) like a Redis stream, from any node. Entries are answered as
//! Redis answers stream entries; their IDs rise across coordinators.
//!
//! XREAD reads job streams alone (not with change streams in one call).

use std::time::Duration;

use bytes::Bytes;
use capdb_types::Reply;
use capdb_types::changes::{StreamId, range_bounds};

use super::{Outcome, error_line};
use crate::resp::Connection;

/// The prefix of job stream keys.
pub const JOB_STREAM_PREFIX: &[u8] = b"__job:";
/// How often a blocked XREAD on job streams looks again.
const POLL: Duration = Duration::from_millis(100);
/// Entries one page of a job stream read holds at most (the storage page bound).
const PAGE: usize = capdb_storage::disk::STREAM_PAGE_MAX;

/// The job id a job stream key names.
pub(super) fn job_of(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(JOB_STREAM_PREFIX)
}

fn no_job(key: &[u8]) -> String {
    format!(
        "NOJOB no job stream '{}' (its job does not exist)",
        String::from_utf8_lossy(key)
    )
}

fn entry_id(e: &Reply) -> Option<StreamId> {
    match e {
        Reply::Array(v) => match v.first() {
            Some(Reply::Bulk(b)) => StreamId::parse_with(b, 0).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// Entries with IDs in `[start, end]`, at most `count`.
async fn range(
    conn: &Connection,
    key: &[u8],
    start: StreamId,
    end: StreamId,
    count: usize,
) -> Result<Vec<Reply>, String> {
    let id = job_of(key).unwrap_or_default();
    let mut out = Vec::new();
    let mut after = if start == StreamId::MIN {
        StreamId::MIN
    } else {
        start.predecessor()
    };
    let mut first = true;
    while out.len() < count {
        let page = conn
            .node
            .job_stream(id, after, PAGE.min(count - out.len()))
            .await
            .map_err(|e| error_line(&e))?;
        let Some(page) = page else {
            return Err(no_job(key));
        };
        // `after` is exclusive: the very first entry (0-0 cannot be one) is read from MIN.
        let page: Vec<Reply> = if first && start == StreamId::MIN {
            page
        } else {
            page.into_iter()
                .filter(|e| entry_id(e).is_some_and(|i| i >= start))
                .collect()
        };
        first = false;
        let Some(last) = page.last().and_then(entry_id) else {
            break;
        };
        for e in page {
            if entry_id(&e).is_some_and(|i| i <= end) && out.len() < count {
                out.push(e);
            }
        }
        // A page may be cut short by its byte bound: only an empty one ends the stream.
        if last >= end {
            break;
        }
        after = last;
    }
    Ok(out)
}

/// `XRANGE __job:<id> start end [COUNT n]`.
pub(super) async fn xrange(conn: &mut Connection, args: &[Bytes], count: Option<usize>) -> Outcome {
    let bounds = range_bounds(&args[2], &args[3]).map_err(|e| error_line(&e))?;
    let entries = match (bounds, count) {
        (_, Some(0)) | (None, _) => {
            // The key must still name a job.
            let id = job_of(&args[1]).unwrap_or_default();
            conn.node
                .job_record(id)
                .await
                .map_err(|e| error_line(&e))?
                .ok_or_else(|| no_job(&args[1]))?;
            if count == Some(0) {
                conn.out.reply(&Reply::NilArray);
                return Ok(());
            }
            Vec::new()
        }
        (Some((start, end)), count) => {
            range(conn, &args[1], start, end, count.unwrap_or(usize::MAX)).await?
        }
    };
    conn.out.reply(&Reply::Array(entries));
    Ok(())
}

/// `XLEN __job:<id>`: the entries its stream holds.
pub(super) async fn xlen(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let id = job_of(&args[1]).unwrap_or_default();
    let rec = conn
        .node
        .job_record(id)
        .await
        .map_err(|e| error_line(&e))?
        .ok_or_else(|| no_job(&args[1]))?;
    conn.out
        .int(i64::try_from(rec.stream_entries).unwrap_or(i64::MAX));
    Ok(())
}

/// `XREAD [COUNT n] [BLOCK ms] STREAMS __job:<id> ... <id|$> ...` over job streams only.
pub(super) async fn xread(
    conn: &mut Connection,
    keys: &[Bytes],
    ids: &[Bytes],
    count: usize,
    block: Option<u64>,
) -> Outcome {
    if let Some(k) = keys.iter().find(|k| job_of(k).is_none()) {
        return Err(format!(
            "ERR XREAD reads job streams alone: '{}' is not one (read it in another call)",
            String::from_utf8_lossy(k)
        ));
    }
    let mut after = Vec::with_capacity(keys.len());
    for (k, id) in keys.iter().zip(ids) {
        let job = job_of(k).unwrap_or_default();
        let start = if id.as_ref() == b"$" {
            conn.node
                .job_record(job)
                .await
                .map_err(|e| error_line(&e))?
                .ok_or_else(|| no_job(k))?
                .stream_last
        } else {
            super::streams::parse_id(id)?
        };
        after.push(start);
    }
    let deadline =
        block.map(|ms| (ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms)));
    let mut probe = super::blocking::ClosedProbe::new(conn.socket_fd);
    let mut shutdown = conn.shutdown.clone();
    loop {
        let mut found = Vec::new();
        for (k, from) in keys.iter().zip(&after) {
            let entries = range(conn, k, from.successor(), StreamId::MAX, count).await?;
            if !entries.is_empty() {
                found.push((k.clone(), entries));
            }
        }
        if !found.is_empty() {
            conn.out
                .reply(&super::streams::per_key_reply(conn.out.resp3, found));
            return Ok(());
        }
        let wait = match deadline {
            None => break,
            Some(Some(at)) if tokio::time::Instant::now() >= at => break,
            Some(Some(at)) => at
                .saturating_duration_since(tokio::time::Instant::now())
                .min(POLL),
            Some(None) => POLL,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = probe.closed() => return Ok(()),
            _ = shutdown.changed() => return Err("TRYAGAIN server is shutting down".into()),
        }
    }
    conn.out.reply(&Reply::NilArray);
    Ok(())
}
