//! A minimal HTTP/1.1 client for the CLI, on hyper (already in the tree through axum), so the
//! binary needs no second HTTP stack. One connection per request; the CLI makes few requests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// How long one CLI request may take, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response the CLI reads (a value is at most 512 MiB by server configuration).
const RESPONSE_BYTES_MAX: usize = 600 * 1024 * 1024;

pub struct HttpClient {
    addr: String,
    password: Option<String>,
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn kv_path(keyspace: &str, key: &str) -> String {
    format!("/v1/kv/{}/{}", encode(keyspace), encode(key))
}

impl HttpClient {
    pub fn new(addr: &str, password: Option<String>) -> Result<HttpClient, String> {
        let addr = addr
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        if addr.is_empty() || addr.contains('/') {
            return Err(format!("--addr '{addr}' must be HOST:PORT"));
        }
        Ok(HttpClient { addr, password })
    }

    /// Sends a request and returns the JSON body; an error status becomes its error message.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<serde_json::Value, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                format!(
                    "no answer from {} within {}s",
                    self.addr,
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<serde_json::Value, String> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to capdb at {}: {e} (is `capdb server` running? set --addr)",
                    self.addr
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {} failed: {e}", self.addr))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr);
        if let Some(p) = &self.password {
            req = req.header("authorization", format!("Bearer {p}"));
        }
        if body.is_some() && path.starts_with("/v1/keyspaces") {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("invalid request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request to {} failed: {e}", self.addr))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            format!(
                "unexpected non-JSON answer ({status}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        if !status.is_success() {
            let msg = json["error"]["message"].as_str().unwrap_or("unknown error");
            let code = json["error"]["code"].as_str().unwrap_or("?");
            return Err(format!("{msg} ({code}, HTTP {})", status.as_u16()));
        }
        Ok(json)
    }
}
