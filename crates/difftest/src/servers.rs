//! The two servers under test, started by the harness and killed when dropped: a
//! `redis-server` without persistence, and one `capdb` node with the keyspace of the mode under
//! test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capdb_launch::{LocalNode, NodeCommand, free_port, launch};

use crate::Mode;
use crate::exec::Conn;

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "capdb-difftest-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create {}: {e}; set TMPDIR to a writable directory",
                dir.display()
            )
        })?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn port() -> Result<u16, String> {
    free_port().map_err(|e| format!("no free loopback port: {e}"))
}

/// Waits until `ready` says yes, the process is still running, for at most `within`.
fn wait_until(
    node: &mut LocalNode,
    what: &str,
    log: &Path,
    within: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return Ok(());
        }
        if !node.is_running() {
            return Err(format!(
                "{what} exited during start; its log ({}):\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} was not ready after {} s; see its log {}",
                within.as_secs(),
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Redis {
    _node: LocalNode,
    pub addr: SocketAddr,
    _dir: Scratch,
}

impl Redis {
    pub fn start(binary: &Path) -> Result<Redis, String> {
        let dir = Scratch::new("redis")?;
        let port = port()?;
        let log = dir.0.join("redis.log");
        let mut cmd = Command::new(binary);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut node = launch(cmd).map_err(|e| {
            format!(
                "cannot start {}: {e}; install it (Debian: apt-get install redis-server) or pass --redis-server PATH",
                binary.display()
            )
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(
            &mut node,
            "redis-server",
            &log,
            Duration::from_secs(30),
            || {
                Conn::connect("redis-server", addr)
                    .and_then(|mut c| c.call_ok(&["PING"]))
                    .is_ok()
            },
        )?;
        Ok(Redis {
            _node: node,
            addr,
            _dir: dir,
        })
    }
}

pub struct Capdb {
    _node: LocalNode,
    pub resp: SocketAddr,
    pub http: SocketAddr,
    /// What SELECT picks the keyspace under test.
    pub db: &'static str,
    pub log: PathBuf,
    _dir: Scratch,
}

impl Capdb {
    pub fn start(binary: &Path, mode: Mode, extra: &[String]) -> Result<Capdb, String> {
        let dir = Scratch::new("capdb")?;
        let resp = SocketAddr::from(([127, 0, 0, 1], port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], port()?));
        let peer = SocketAddr::from(([127, 0, 0, 1], port()?));
        let log = dir.0.join("capdb.log");
        let mut node = NodeCommand::new(binary)
            .data_dir(dir.0.join("data"))
            .resp_addr(resp)
            .http_addr(http)
            .peer_addr(peer)
            .args(extra)
            .env("CAPDB_LOG", "warn")
            .stderr_log_file(&log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e}; build it (cargo build -p capdb-cli) or pass --capdb PATH",
                    binary.display()
                )
            })?;
        wait_until(&mut node, "capdb", &log, Duration::from_secs(60), || {
            matches!(http_request(http, "GET", "/readyz", None), Ok((200, _)))
        })?;
        let (db, body): (&'static str, Option<&str>) = match mode {
            Mode::Cp => ("0", None),
            Mode::Cache => (
                "1",
                Some(r#"{"name":"1","mode":"cache","max_memory_bytes":268435456}"#),
            ),
            Mode::Ap => ("2", Some(r#"{"name":"2","mode":"ap"}"#)),
            Mode::CpShards => (
                "3",
                Some(r#"{"name":"3","mode":"cp","shards":4,"replication_factor":1}"#),
            ),
        };
        if let Some(body) = body {
            let (status, answer) = http_request(http, "POST", "/v1/keyspaces", Some(body))?;
            if status != 201 {
                return Err(format!(
                    "capdb refused to create the keyspace ({status}): {}; see {}",
                    String::from_utf8_lossy(&answer),
                    log.display()
                ));
            }
        }
        if mode == Mode::CpShards {
            wait_until(&mut node, "capdb", &log, Duration::from_secs(60), || {
                shards_ready(resp, db).is_ok()
            })
            .map_err(|e| match shards_ready(resp, db) {
                Err(why) => format!("{e}; the 4-shard keyspace: {why}"),
                Ok(()) => e,
            })?;
        }
        Ok(Capdb {
            _node: node,
            resp,
            http,
            db,
            log,
            _dir: dir,
        })
    }
}

impl Capdb {
    /// The node's `capdb_cross_shard_transactions` counters by outcome (from `/metrics`):
    /// what a `cp-shards` run made the coordinator do.
    pub fn cross_shard_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, String> {
        let (status, body) = http_request(self.http, "GET", "/metrics", None)?;
        if status != 200 {
            return Err(format!("GET /metrics answered {status}"));
        }
        let prefix = "capdb_cross_shard_transactions{outcome=\"";
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| {
                let (outcome, n) = l.strip_prefix(prefix)?.split_once("\"} ")?;
                Some((outcome.to_string(), n.trim().parse().ok()?))
            })
            .collect())
    }
}

/// Whether the 4-shard keyspace `db` serves every shard: SELECT works, a write under each of
/// [`crate::gen::txn::TAGS`] succeeds (each shard has a leader), and `CLUSTER KEYSLOT` puts
/// the tags on the four shards (quarters of the slots), in order.
fn shards_ready(resp: SocketAddr, db: &str) -> Result<(), String> {
    let mut c = Conn::connect("capdb", resp)?;
    c.call_ok(&["SELECT", db])?;
    for (shard, tag) in crate::r#gen::txn::TAGS.iter().enumerate() {
        let key = format!("{tag}:ready");
        let slot = c
            .call_ok(&["CLUSTER", "KEYSLOT", &key])?
            .int()
            .unwrap_or(-1);
        if slot / 4096 != shard as i64 {
            return Err(format!(
                "{key} is in slot {slot}, not on shard {shard} of 4: the tags must be one per shard"
            ));
        }
        c.call_ok(&["SET", &key, "1"])?;
        c.call_ok(&["DEL", &key])?;
    }
    Ok(())
}

/// A one-shot HTTP/1.1 request; (status, body).
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let io = |e: std::io::Error| format!("HTTP {method} {path} to capdb at {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(Vec::new(), |(_, b)| b.as_bytes().to_vec());
    Ok((status, body))
}
