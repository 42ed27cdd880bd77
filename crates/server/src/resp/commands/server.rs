//! Server commands: INFO, COMMAND, TIME, FLUSHDB, FLUSHALL.
//!
//! These answer what tools and client libraries ask at connect time (redis-cli, redis-benchmark,
//! cluster clients): the wording and the fields they read follow Redis; what capdb adds is
//! prefixed `capdb_`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::{COMMANDS, Outcome, error_line, syntax};
use crate::node::{Consistency, Keyspace, Node};
use crate::resp::{Connection, cluster};

/// `INFO [section ...]`: the sections asked for (none, `all`, `everything` or `default`: all;
/// `default` leaves out `commandstats`, which capdb does not have).
pub(super) async fn info(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let text = info_text(conn, &args[1..]).await;
    conn.out.verbatim(&text);
    Ok(())
}

async fn info_text(conn: &Connection, sections: &[Bytes]) -> String {
    let node = &conn.node;
    let wanted = |s: &str| {
        sections.is_empty()
            || sections.iter().any(|a| {
                a.eq_ignore_ascii_case(s.as_bytes())
                    || a.eq_ignore_ascii_case(b"all")
                    || a.eq_ignore_ascii_case(b"everything")
                    || (a.eq_ignore_ascii_case(b"default") && s != "commandstats")
            })
    };
    let mut out = String::new();
    if wanted("server") {
        server_section(&mut out, node, conn.cluster_mode);
    }
    if wanted("clients") {
        let _ = write!(
            out,
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:{}\r\n\r\n",
            node.metrics.connections.get(),
            node.config.limits.connections_max,
            node.blocking.blocked_clients()
        );
    }
    let keyspaces = node.keyspaces();
    if wanted("memory") {
        memory_section(&mut out, &keyspaces);
    }
    if wanted("persistence") {
        persistence_section(&mut out, node);
    }
    if wanted("stats") {
        stats_section(&mut out, node, &keyspaces);
    }
    if wanted("cpu") {
        cpu_section(&mut out);
    }
    if wanted("replication") {
        out.push_str("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n");
    }
    if wanted("cluster") {
        out.push_str(&cluster::info_section(conn));
    }
    if wanted("keyspace") {
        keyspace_section(&mut out, conn, &keyspaces).await;
    }
    out
}

fn server_section(out: &mut String, node: &Node, cluster_mode: bool) {
    let uptime = node.started.elapsed().as_secs();
    let _ = write!(
        out,
        "# Server\r\nredis_version:{}\r\ncapdb_version:{}\r\nredis_mode:{}\r\nos:{} {}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nuptime_in_days:{}\r\nexecutable:capdb\r\n\r\n",
        crate::REDIS_COMPAT_VERSION,
        env!("CARGO_PKG_VERSION"),
        if cluster_mode {
            "cluster"
        } else {
            "standalone"
        },
        std::env::consts::OS,
        std::env::consts::ARCH,
        std::process::id(),
        node.config.resp_addr.port(),
        uptime,
        uptime / 86_400
    );
}

fn memory_section(out: &mut String, keyspaces: &[Arc<Keyspace>]) {
    let used: u64 = keyspaces
        .iter()
        .filter_map(|k| k.memory().map(|m| m.used_bytes))
        .sum();
    let max: u64 = keyspaces
        .iter()
        .filter_map(|k| k.spec.max_memory_bytes)
        .sum();
    let _ = write!(
        out,
        "# Memory\r\nused_memory:{used}\r\nused_memory_human:{:.2}M\r\nused_memory_rss:{rss}\r\nmaxmemory:{max}\r\nmem_allocator:libc\r\n\r\n",
        used as f64 / 1048576.0,
        rss = process_rss_bytes(),
    );
}

/// Resident memory of this process (`/proc/self/statm`), 0 where unknown.
fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// CPU seconds this process (and its reaped children) spent in system and user mode, from
/// `/proc/self/stat` (in clock ticks of 1/100 s, Linux's `USER_HZ`): `(sys, user, sys
/// children, user children)`, zeros where unknown.
fn cpu_seconds(stat: &str) -> (f64, f64, f64, f64) {
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse::<f64>().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    let tick = |i: usize| fields.get(i).copied().unwrap_or(0.0) / 100.0;
    // state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    (tick(12), tick(11), tick(14), tick(13))
}

fn cpu_section(out: &mut String) {
    let process = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let main_thread =
        std::fs::read_to_string(format!("/proc/self/task/{}/stat", std::process::id()))
            .unwrap_or_default();
    let (sys, user, sys_children, user_children) = cpu_seconds(&process);
    let (main_sys, main_user, _, _) = cpu_seconds(&main_thread);
    let _ = write!(
        out,
        "# CPU\r\nused_cpu_sys:{sys:.6}\r\nused_cpu_user:{user:.6}\r\nused_cpu_sys_children:{sys_children:.6}\r\nused_cpu_user_children:{user_children:.6}\r\nused_cpu_sys_main_thread:{main_sys:.6}\r\nused_cpu_user_main_thread:{main_user:.6}\r\n\r\n"
    );
}

fn persistence_section(out: &mut String, node: &Node) {
    let s = node.engine.stats();
    let _ = write!(
        out,
        "# Persistence\r\nloading:0\r\nrdb_changes_since_last_save:0\r\naof_enabled:0\r\ncapdb_storage:redb\r\ncapdb_group_commits:{}\r\ncapdb_committed_writes:{}\r\ncapdb_storage_file_bytes:{}\r\n\r\n",
        s.commits.load(Relaxed),
        s.jobs.load(Relaxed),
        node.engine.file_bytes()
    );
}

fn stats_section(out: &mut String, node: &Node, keyspaces: &[Arc<Keyspace>]) {
    let (mut expired, mut evicted) = (0, 0);
    for k in keyspaces {
        if let Some(m) = k.memory() {
            expired += m.expired_keys;
            evicted += m.evicted_keys;
        }
    }
    let _ = write!(
        out,
        "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\nexpired_keys:{expired}\r\nevicted_keys:{evicted}\r\n\r\n",
        node.metrics.connections_total.get(),
        node.commands_processed.load(Relaxed),
        node.metrics.connections_rejected.get(),
    );
}

/// One line per keyspace holding keys (in cluster mode, keys of this node's slots): the RESP
/// keyspace is `db0`, numeric names `db<n>`, others `keyspace_<name>`.
async fn keyspace_section(out: &mut String, conn: &Connection, keyspaces: &[Arc<Keyspace>]) {
    out.push_str("# Keyspace\r\n");
    for k in keyspaces {
        let name = k.spec.name.as_str();
        let label = if name == conn.node.config.resp_keyspace.as_str() {
            "db0".to_string()
        } else if name.bytes().all(|b| b.is_ascii_digit()) {
            format!("db{name}")
        } else {
            format!("keyspace_{name}")
        };
        let scope = cluster::scope(conn, k);
        let keys = k.len_in(&scope, Consistency::RELAXED).await.unwrap_or(0);
        if keys > 0 {
            let _ = write!(out, "{label}:keys={keys},mode={}\r\n", k.spec.mode.as_str());
        }
    }
}

/// What `COMMAND` reports about one command, from either table.
struct Described {
    name: &'static str,
    arity: i64,
    flags: Vec<&'static str>,
    keys: (i64, i64, i64),
}

/// Every command the server answers, sorted by name: its own table and the data-type commands.
fn described() -> Vec<Described> {
    let mut all: Vec<Described> = COMMANDS
        .iter()
        .map(|c| Described {
            name: c.name,
            arity: c.arity,
            flags: c.flags.to_vec(),
            keys: c.keys,
        })
        .collect();
    all.extend(capdb_data::command::all().map(|s| {
        let movable = matches!(s.keys, capdb_data::command::Keys::NumKeys { .. });
        let mut flags = s.flags.to_vec();
        if movable {
            // As Redis: key positions depend on `numkeys`; clients ask COMMAND GETKEYS.
            flags.push("movablekeys");
        }
        Described {
            name: s.name,
            arity: s.arity,
            flags,
            keys: if movable { (0, 0, 0) } else { s.key_range() },
        }
    }));
    all.sort_by_key(|d| d.name);
    all
}

/// Redis 7's 10-element entry: name, arity, flags, first/last/step, ACL categories, tips, key
/// specifications and subcommands (the last four empty: capdb has no ACL categories, and
/// first/last/step plus `movablekeys` with COMMAND GETKEYS locate every key).
fn write_command_info(conn: &mut Connection, cmd: &Described) {
    let (first, last, step) = cmd.keys;
    conn.out.array(10);
    conn.out.bulk(cmd.name.as_bytes());
    conn.out.int(cmd.arity);
    conn.out.set(cmd.flags.len());
    for f in &cmd.flags {
        conn.out.simple(f);
    }
    conn.out.int(first);
    conn.out.int(last);
    conn.out.int(step);
    conn.out.set(0);
    conn.out.set(0);
    conn.out.array(0);
    conn.out.array(0);
}

/// `COMMAND [COUNT|LIST|INFO name ...|GETKEYS cmd args...|DOCS [name ...]]`, from the command
/// tables (DOCS: `docs.rs`).
pub(super) fn command(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    let all = described();
    let Some(sub) = args.get(1) else {
        conn.out.array(all.len());
        for cmd in &all {
            write_command_info(conn, cmd);
        }
        return Ok(());
    };
    let sub = sub.to_ascii_lowercase();
    match &sub[..] {
        b"count" => conn.out.int(all.len() as i64),
        b"list" => {
            conn.out.array(all.len());
            for cmd in &all {
                conn.out.bulk(cmd.name.as_bytes());
            }
        }
        b"info" => {
            conn.out.array(args.len() - 2);
            for a in &args[2..] {
                let a = a.to_ascii_lowercase();
                match all.iter().find(|c| c.name.as_bytes() == &a[..]) {
                    Some(cmd) => write_command_info(conn, cmd),
                    None => conn.out.null_array(),
                }
            }
        }
        b"getkeys" => {
            let Some(name) = args.get(2) else {
                return Err("ERR wrong number of arguments for 'command|getkeys' command".into());
            };
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            let call = &args[2..];
            let keys: Vec<Bytes> = if name == "blmpop" || name == "bzmpop" {
                // BLMPOP timeout numkeys key ...: the keys of LMPOP numkeys key ...
                let form = if name == "blmpop" { "lmpop" } else { "zmpop" };
                let mut attempt = vec![Bytes::from_static(form.as_bytes())];
                attempt.extend(call.iter().skip(2).cloned());
                capdb_data::command::command_keys(&attempt)
                    .map_err(|_| "ERR Invalid arguments specified for command".to_string())?
            } else if let Some(spec) = capdb_data::lookup(&name) {
                if !spec.arity_ok(call.len()) {
                    return Err("ERR Invalid number of arguments specified for command".into());
                }
                spec.key_indices(call)
                    .map_err(|_| "ERR Invalid arguments specified for command".to_string())?
                    .into_iter()
                    .filter_map(|i| call.get(i).cloned())
                    .collect()
            } else if let Some(cmd) = all.iter().find(|c| c.name == name) {
                let (first, last, step) = cmd.keys;
                let n = call.len() as i64;
                let last = if last < 0 { n + last } else { last.min(n - 1) };
                if first == 0 {
                    Vec::new()
                } else {
                    (first..=last)
                        .step_by(step.max(1) as usize)
                        .filter_map(|i| call.get(i as usize).cloned())
                        .collect()
                }
            } else {
                return Err("ERR Invalid command specified".into());
            };
            if keys.is_empty() {
                return Err("ERR The command has no key arguments".into());
            }
            conn.out.array(keys.len());
            for k in keys {
                conn.out.bulk(&k);
            }
        }
        b"docs" => super::docs::command_docs(&mut conn.out, &args[2..]),
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(&args[1])
            ));
        }
    }
    Ok(())
}

/// `TIME`: Unix seconds and microseconds.
pub(super) fn time(conn: &mut Connection, _args: &[Bytes]) -> Outcome {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    conn.out.array(2);
    conn.out.bulk(d.as_secs().to_string().as_bytes());
    conn.out.bulk(d.subsec_micros().to_string().as_bytes());
    Ok(())
}

/// `FLUSHDB [SYNC|ASYNC]`: deletes every key of the connection's keyspace.
pub(super) async fn flushdb(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    check_flush_args(&args[1..])?;
    let ks = conn.keyspace.clone();
    ks.clear(conn.consistency)
        .await
        .map_err(|e| error_line(&e))?;
    conn.out.ok();
    Ok(())
}

/// `FLUSHALL [SYNC|ASYNC]`: deletes every key of every keyspace.
pub(super) async fn flushall(conn: &mut Connection, args: &[Bytes]) -> Outcome {
    check_flush_args(&args[1..])?;
    for ks in conn.node.keyspaces() {
        ks.clear(conn.consistency)
            .await
            .map_err(|e| error_line(&e))?;
    }
    conn.out.ok();
    Ok(())
}

fn check_flush_args(args: &[Bytes]) -> Result<(), String> {
    match args {
        [] => Ok(()),
        [m] if m.eq_ignore_ascii_case(b"sync") || m.eq_ignore_ascii_case(b"async") => Ok(()),
        _ => Err(syntax()),
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_seconds;

    #[test]
    fn cpu_times_come_from_the_fields_after_the_command_name() {
        // pid (comm with spaces) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime ...
        let stat = "42 (capdb (x) y) S 1 42 42 0 -1 4194560 10 0 0 0 250 75 3 1 20 0";
        assert_eq!(cpu_seconds(stat), (0.75, 2.5, 0.01, 0.03));
        assert_eq!(cpu_seconds(""), (0.0, 0.0, 0.0, 0.0));
    }
}
