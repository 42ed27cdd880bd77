//! The capdb nodes under test: real `capdb server` processes, each started inside its own
//! network namespace, with its data directory and log file under the run's output directory.
//! They are started through `capdb-launch` (under `ip netns exec`, which execs the node in
//! place), so they die with the harness, even when it is killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capdb_launch::{LocalNode, NodeCommand};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::HarnessError;
use crate::net::Topology;

pub const RESP_PORT: u16 = 6379;
pub const HTTP_PORT: u16 = 8080;
pub const PEER_PORT: u16 = 7380;

/// A node process's state as the harness left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    /// SIGSTOPped.
    Paused,
    /// SIGKILLed (or exited).
    Down,
}

struct Proc {
    child: Option<LocalNode>,
    status: Status,
}

pub struct Nodes {
    topo: Arc<Topology>,
    binary: PathBuf,
    dir: PathBuf,
    extra_args: Vec<String>,
    procs: Mutex<Vec<Proc>>,
}

impl Nodes {
    /// Prepares (does not start) the nodes. `extra_args` go to every `capdb server`.
    pub fn new(topo: Arc<Topology>, binary: PathBuf, dir: &Path, extra_args: Vec<String>) -> Nodes {
        let n = topo.nodes() as usize;
        Nodes {
            topo,
            binary,
            dir: dir.to_path_buf(),
            extra_args,
            procs: Mutex::new(
                (0..n)
                    .map(|_| Proc {
                        child: None,
                        status: Status::Down,
                    })
                    .collect(),
            ),
        }
    }

    pub fn count(&self) -> u32 {
        self.topo.nodes()
    }

    pub fn resp_addr(&self, i: u32) -> String {
        format!("{}:{RESP_PORT}", self.topo.ip(i))
    }

    pub fn http_addr(&self, i: u32) -> String {
        format!("{}:{HTTP_PORT}", self.topo.ip(i))
    }

    pub fn status(&self, i: u32) -> Status {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())[i as usize - 1].status
    }

    /// Starts node `i` (a no-op when it runs). Output is appended to `DIR/nodes/node-i.log`.
    pub fn start(&self, i: u32) -> Result<(), HarnessError> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let p = &mut procs[i as usize - 1];
        if p.status != Status::Down {
            return Ok(());
        }
        if let Some(mut old) = p.child.take() {
            let _ = old.wait();
        }
        let data = self.dir.join("nodes").join(format!("node-{i}"));
        std::fs::create_dir_all(&data)
            .map_err(|e| HarnessError(format!("{}: {e}", data.display())))?;
        let log_path = self.dir.join("nodes").join(format!("node-{i}.log"));
        let initial: Vec<String> = (1..=self.count())
            .map(|j| format!("{j}={}:{PEER_PORT}", self.topo.ip(j)))
            .collect();
        let ip = self.topo.ip(i);
        let child = NodeCommand::new(&self.binary)
            .wrapper(["ip", "netns", "exec", &self.topo.namespace(i)])
            .node_id(i.into())
            .data_dir(&data)
            .resp_addr(format!("{ip}:{RESP_PORT}"))
            .http_addr(format!("{ip}:{HTTP_PORT}"))
            .peer_addr(format!("{ip}:{PEER_PORT}"))
            .initial_cluster(initial.join(","))
            .args(["--label", &format!("zone=z{}", (i - 1) % 3 + 1)])
            .args(["--debug-fault-injection"])
            .args(&self.extra_args)
            .log_file(&log_path)
            // Its own process group: a Ctrl-C at the terminal reaches only the harness, which
            // then stops the nodes itself (a node stopping on its own counts as a crash).
            .own_process_group()
            .spawn()
            .map_err(|e| HarnessError(format!("starting node {i}: {e}")))?;
        p.child = Some(child);
        p.status = Status::Running;
        Ok(())
    }

    /// SIGKILLs node `i` (also when paused) and reaps it.
    pub fn kill(&self, i: u32) {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let p = &mut procs[i as usize - 1];
        if let Some(mut child) = p.child.take() {
            let _ = child.kill();
        }
        p.status = Status::Down;
    }

    /// SIGSTOP or SIGCONT to node `i` when it is in state `from`.
    fn signal(&self, i: u32, stop: bool, from: Status, to: Status) -> Result<(), HarnessError> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let p = &mut procs[i as usize - 1];
        if p.status != from {
            return Ok(());
        }
        let child = p.child.as_mut().expect("a running node has a child");
        let sent = if stop { child.pause() } else { child.resume() };
        sent.map_err(|e| HarnessError(format!("node {i}: {e}")))?;
        p.status = to;
        Ok(())
    }

    pub fn pause(&self, i: u32) -> Result<(), HarnessError> {
        self.signal(i, true, Status::Running, Status::Paused)
    }

    pub fn resume(&self, i: u32) -> Result<(), HarnessError> {
        self.signal(i, false, Status::Paused, Status::Running)
    }

    /// Notices nodes that exited on their own (a crash is a finding, reported by the run).
    pub fn exited(&self) -> Vec<(u32, String)> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (idx, p) in procs.iter_mut().enumerate() {
            if p.status == Status::Down {
                continue;
            }
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(code)) = child.try_wait()
            {
                out.push((idx as u32 + 1, code.to_string()));
                p.child = None;
                p.status = Status::Down;
            }
        }
        out
    }

    /// Kills every node; used at the end and on interruption.
    pub fn kill_all(&self) {
        for i in 1..=self.count() {
            let _ = self.resume(i);
            self.kill(i);
        }
    }

    /// Waits until every running node answers `/readyz` with 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        for i in 1..=self.count() {
            if self.status(i) != Status::Running {
                continue;
            }
            loop {
                if let Ok((200, _)) = http(&self.http_addr(i), "GET", "/readyz", None).await {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(HarnessError(format!(
                        "node {i} was not ready within {} s; see nodes/node-{i}.log",
                        timeout.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The leader of the first shard of keyspace `default`, asked of any node that answers.
    pub async fn leader(&self) -> Option<u32> {
        for i in 1..=self.count() {
            if self.status(i) != Status::Running {
                continue;
            }
            let Ok((200, body)) = http(&self.http_addr(i), "GET", "/v1/cluster", None).await else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Json>(&body) else {
                continue;
            };
            let leader = v["keyspaces"]
                .as_array()
                .and_then(|ks| ks.iter().find(|k| k["name"] == "default"))
                .and_then(|k| k["shards"][0]["leader"].as_u64());
            if let Some(l) = leader {
                return Some(l as u32);
            }
        }
        None
    }

    /// The shards of keyspace `default` with their leaders and replicas, asked of any node
    /// that answers.
    pub async fn shards(&self) -> Option<Vec<crate::route::Shard>> {
        for i in 1..=self.count() {
            if self.status(i) != Status::Running {
                continue;
            }
            let Ok((200, body)) = http(&self.http_addr(i), "GET", "/v1/cluster", None).await else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Json>(&body) else {
                continue;
            };
            let Some(shards) = v["keyspaces"]
                .as_array()
                .and_then(|ks| ks.iter().find(|k| k["name"] == "default"))
                .and_then(|k| k["shards"].as_array())
            else {
                continue;
            };
            let node = |v: &Json| v.as_u64().map(|n| n as u32);
            return Some(
                shards
                    .iter()
                    .map(|s| crate::route::Shard {
                        slots: (
                            s["slots"][0].as_u64().unwrap_or(0) as u16,
                            s["slots"][1].as_u64().unwrap_or(16383) as u16,
                        ),
                        leader: node(&s["leader"]),
                        replicas: s["replicas"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(node)
                            .collect(),
                    })
                    .collect(),
            );
        }
        None
    }

    /// The leader of the shard holding `slot` in keyspace `default`.
    pub async fn leader_of_slot(&self, slot: u16) -> Option<u32> {
        self.shards()
            .await?
            .into_iter()
            .find(|s| s.slots.0 <= slot && slot <= s.slots.1)?
            .leader
    }

    /// Sets node `i`'s wall-clock offset (its `/v1/debug/clock` route).
    pub async fn set_clock(&self, i: u32, offset_ms: i64) -> Result<(), HarnessError> {
        let body = format!("{{\"offset_ms\":{offset_ms}}}");
        match http(&self.http_addr(i), "POST", "/v1/debug/clock", Some(&body)).await {
            Ok((200, _)) => Ok(()),
            Ok((code, body)) => Err(HarnessError(format!(
                "node {i} refused the clock offset: {code} {body}"
            ))),
            Err(e) => Err(HarnessError(format!("node {i} clock offset: {e}"))),
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A minimal HTTP/1.1 request (Connection: close) with a 3 s bound; returns status and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // Bounded: our own server's answers are small; refuse anything over 16 MiB.
        (&mut s)
            .take(16 << 20)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or("malformed HTTP response")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        // Our server may answer chunked; strip chunk framing when present.
        let body = if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
