//! The commands that walk or count a whole keyspace: `SCAN`, `KEYS` and `DBSIZE`.
//!
//! Each covers the connection's keyspace, or in Redis Cluster mode only the slots this node
//! serves (`resp/cluster.rs::scope`), so that a cluster client asking every master gets each key once.
//!
//! `SCAN` cursors are numbers (as clients expect) naming a server-side position: the last key
//! returned, in key order, and the shards the scan covers (`keyscan::ScanCursor`). A key present
//! for the whole iteration is returned exactly once, even while other keys are written, and any
//! connection to the same node may continue a cursor. The shard set is fixed by `SCAN 0`, so a
//! leadership change mid-scan does not change what the scan covers (see `resp/cluster.rs`).
//!
//! `KEYS` collects every match before it answers, as Redis does, and is bounded:
//! [`KEYS_REPLY_MAX`] keys or [`KEYS_REPLY_BYTES_MAX`] bytes of keys, beyond which it answers an
//! error that points to `SCAN`.

use bytes::Bytes;
use capdb_types::limits::SCAN_COUNT_MAX;
use capdb_types::mutation::parse_i64_strict;

use super::{Outcome, error_line, syntax};
use crate::node::{ScanCursor, ScanPosition};
use crate::resp::{Connection, cluster};
use capdb_data::glob;

/// Most keys one `KEYS` reply may carry.
pub const KEYS_REPLY_MAX: usize = 1_000_000;
/// Most key bytes one `KEYS` reply may carry.
pub const KEYS_REPLY_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The literal start of a `MATCH` pattern, which bounds the key range to read.
fn pattern_prefix(pattern: Option<&Bytes>) -> Option<Bytes> {
    pattern
        .map(|p| Bytes::copy_from_slice(glob::literal_prefix(p)))
        .filter(|p| !p.is_empty())
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE t]`.
pub(super) async fn scan(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (ks, now) = (conn.keyspace.clone(), conn.now_ms);
    let cursor = capdb_data::scan::parse_cursor(&args[1]).map_err(|e| error_line(&e))?;
    let mut pattern: Option<Bytes> = None;
    let mut count = 10usize;
    let mut wanted_type: Option<Vec<u8>> = None;
    let mut i = 2;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        let Some(v) = args.get(i + 1) else {
            return Err(syntax());
        };
        match &opt[..] {
            b"MATCH" => pattern = Some(v.clone()),
            b"COUNT" => {
                let n = parse_i64_strict(v).ok_or("ERR value is not an integer or out of range")?;
                if n < 1 {
                    return Err(syntax());
                }
                count = (n as usize).min(SCAN_COUNT_MAX);
            }
            b"TYPE" => wanted_type = Some(v.to_ascii_lowercase()),
            _ => return Err(syntax()),
        }
        i += 2;
    }
    let (scope, pos) = if cursor == 0 {
        (cluster::scope(conn, &ks), ScanPosition::default())
    } else {
        match conn.node.scan_cursors.get(cursor, &ks.spec.name) {
            Some(c) => (c.scope, c.pos),
            None => return Err("ERR invalid cursor".into()),
        }
    };
    let prefix = pattern_prefix(pattern.as_ref());
    let (entries, next) = ks
        .scan_in(
            &scope,
            pos,
            None,
            prefix,
            None,
            count,
            now,
            conn.consistency,
        )
        .await
        .map_err(|e| error_line(&e))?;
    let keys: Vec<&Bytes> = entries
        .iter()
        .filter(|(_, v)| {
            wanted_type
                .as_deref()
                .is_none_or(|t| t == v.header.kind.type_name().as_bytes())
        })
        .map(|(k, _)| k)
        .filter(|k| pattern.as_ref().is_none_or(|p| glob::matches(p, k)))
        .collect();
    let next = match next {
        Some(pos) => conn.node.scan_cursors.put(ScanCursor {
            keyspace: ks.spec.name.clone(),
            scope,
            pos,
        }),
        None => 0,
    };
    conn.out.array(2);
    conn.out.bulk(next.to_string().as_bytes());
    conn.out.array(keys.len());
    for k in keys {
        conn.out.bulk(k);
    }
    Ok(())
}

/// `KEYS pattern`: every matching key, read page by page.
pub(super) async fn keys(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let (ks, now, pattern) = (conn.keyspace.clone(), conn.now_ms, &args[1]);
    let scope = cluster::scope(conn, &ks);
    let prefix = pattern_prefix(Some(pattern));
    let mut pos = Some(ScanPosition::default());
    let (mut found, mut bytes) = (Vec::new(), 0usize);
    while let Some(p) = pos {
        let (entries, next) = ks
            .scan_in(
                &scope,
                p,
                None,
                prefix.clone(),
                None,
                SCAN_COUNT_MAX,
                now,
                conn.consistency,
            )
            .await
            .map_err(|e| error_line(&e))?;
        for (k, _) in entries {
            if glob::matches(pattern, &k) {
                bytes += k.len();
                found.push(k);
            }
        }
        if found.len() > KEYS_REPLY_MAX || bytes > KEYS_REPLY_BYTES_MAX {
            return Err(format!(
                "ERR KEYS matches more than {KEYS_REPLY_MAX} keys or {KEYS_REPLY_BYTES_MAX} bytes of keys; use SCAN with MATCH"
            ));
        }
        pos = next;
    }
    conn.out.array(found.len());
    for k in &found {
        conn.out.bulk(k);
    }
    Ok(())
}

/// `DBSIZE`: the number of keys.
pub(super) async fn dbsize(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    let ks = conn.keyspace.clone();
    let scope = cluster::scope(conn, &ks);
    let n = ks
        .len_in(&scope, conn.consistency)
        .await
        .map_err(|e| error_line(&e))?;
    conn.out.int(n as i64);
    Ok(())
}
