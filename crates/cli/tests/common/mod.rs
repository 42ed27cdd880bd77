//! Test harness: starts the real `capdb` binary (through `capdb-launch`) on free loopback
//! ports with its own data directory, and stops it (SIGKILL) when dropped, or when the test
//! process dies.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use capdb_launch::{LocalNode, NodeCommand};

pub const BIN: &str = env!("CARGO_BIN_EXE_capdb");

/// A port free right now, never handed out before in this test process (the OS may offer a
/// just-released port again, and two nodes of one cluster must not get the same one).
pub fn free_port() -> u16 {
    capdb_launch::free_port().expect("a free loopback port")
}

pub struct Server {
    pub child: Option<LocalNode>,
    pub resp: SocketAddr,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
    /// Extra environment variables of the process (e.g. HOSTNAME).
    pub env: Vec<(String, String)>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        let mut s = Server::prepare(free_port(), extra);
        s.spawn();
        s
    }

    /// A server with its ports and data directory chosen, not started yet.
    pub fn prepare(peer_port: u16, extra: &[&str]) -> Server {
        Server {
            child: None,
            resp: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            http: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            peer: format!("127.0.0.1:{peer_port}").parse().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("capdb exited during start:\n{log}");
        }
    }

    /// Starts the server; `Err(log)` if it exits before becoming ready.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        self.spawn_no_wait();
        self.wait_ready()
    }

    /// Starts the process without waiting for it to be ready.
    pub fn spawn_no_wait(&mut self) {
        assert!(self.child.is_none());
        let mut command = NodeCommand::new(BIN)
            .data_dir(self.data_dir())
            .resp_addr(self.resp)
            .http_addr(self.http)
            .peer_addr(self.peer)
            .args(&self.extra)
            .env("CAPDB_LOG", "info,openraft=warn")
            .stderr_log_file(self.dir.path().join("server.log"));
        for (k, v) in &self.env {
            command = command.env(k, v);
        }
        let child = command.spawn().expect("start capdb");
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Waits until the HTTP readiness probe answers 200 (bounded: 30 s).
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exit {status}:\n{}", self.log()));
            }
            if let Ok((200, _)) = http(self.http, "GET", "/readyz", &[], None) {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "capdb not ready after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
        }
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        c.terminate(Duration::from_secs(30))
            .unwrap()
            .expect("no exit 30 s after SIGTERM")
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.resp)
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.redis_url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

/// Founding members of one cluster on loopback, started together (each waits for the others
/// to form a quorum), then each waited for until ready. Node i (1-based) is `nodes[i - 1]`
/// and runs with `--node-id i --initial-cluster ...` followed by `extra(i)`.
pub fn start_founders(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Server> {
    let peers: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let initial = initial.join(",");
    let mut nodes: Vec<Server> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let id = (i + 1).to_string();
            let more = extra(i + 1);
            let mut args = vec!["--node-id", &id, "--initial-cluster", &initial];
            args.extend(more.iter().map(String::as_str));
            Server::prepare(*p, &args)
        })
        .collect();
    for s in &mut nodes {
        s.spawn_no_wait();
    }
    for s in &mut nodes {
        s.wait_ready()
            .unwrap_or_else(|log| panic!("node did not become ready: {log}"));
    }
    nodes
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A one-shot HTTP/1.1 request over a plain socket; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or(&[]);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Sends raw bytes on a fresh RESP connection and returns everything read until the server
/// closes or `wait` passes.
pub fn raw_resp(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

pub fn need_tool(name: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "this test needs `{name}` on PATH (Debian: apt-get install redis-tools curl); .ci/run installs it"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// A real `redis-server` (the reference for differential tests), without persistence, with
/// `extra` arguments, stopped when dropped.
#[allow(dead_code)] // not every test binary uses it
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl RedisServer {
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(need_tool("redis-server"))
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// A connection, once the server listens (bounded wait).
    pub fn client(&mut self) -> redis::Connection {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
                .unwrap()
                .get_connection()
            {
                return c;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "redis-server exited"
            );
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
