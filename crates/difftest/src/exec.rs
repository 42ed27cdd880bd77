//! Raw RESP over blocking TCP: commands written as bulk-string arrays, replies read back as the
//! exact bytes the server wrote (see [`crate::resp`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::resp::{Frame, ScanError, encode, parse};

/// How long one reply may take before the run is abandoned.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to one server.
pub struct Conn {
    pub who: &'static str,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out.
    at: usize,
}

impl Conn {
    pub fn connect(who: &'static str, addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| {
            format!("cannot connect to {who} at {addr}: {e}; is it running and listening there?")
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|_| stream.set_nodelay(true))
            .map_err(|e| format!("cannot configure the socket to {who}: {e}"))?;
        Ok(Conn {
            who,
            stream,
            buf: Vec::new(),
            at: 0,
        })
    }

    /// Writes every command (one pipeline) without reading.
    pub fn send(&mut self, cmds: &[&[Vec<u8>]]) -> Result<(), String> {
        let mut out = Vec::new();
        for c in cmds {
            encode(c, &mut out);
        }
        self.stream.write_all(&out).map_err(|e| {
            format!(
                "{} closed the connection or failed ({e}); see its log",
                self.who
            )
        })
    }

    /// Reads the next reply.
    pub fn read(&mut self) -> Result<Frame, String> {
        loop {
            match parse(&self.buf[self.at..]) {
                Ok((frame, n)) => {
                    self.at += n;
                    if self.at == self.buf.len() {
                        self.buf.clear();
                        self.at = 0;
                    }
                    return Ok(frame);
                }
                Err(ScanError::Invalid(why)) => {
                    return Err(format!(
                        "{} wrote something that is not RESP ({why}): {:?}; this is a protocol bug in it",
                        self.who,
                        crate::resp::escape(&self.buf[self.at..self.buf.len().min(self.at + 200)])
                    ));
                }
                Err(ScanError::Incomplete) => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "{} closed the connection while a reply was due; see its log",
                        self.who
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    return Err(format!(
                        "no reply from {} within {} s ({e}); is the machine overloaded, or is it stuck? see its log",
                        self.who,
                        REPLY_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[Vec<u8>]) -> Result<Frame, String> {
        self.send(&[args])?;
        self.read()
    }

    /// [`Conn::call`] that must not answer an error.
    pub fn call_ok(&mut self, args: &[&str]) -> Result<Frame, String> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        let f = self.call(&args)?;
        if f.is_error() {
            return Err(format!(
                "{} refused {}: {}",
                self.who,
                crate::resp::command_line(&args),
                String::from_utf8_lossy(&f.raw).trim_end()
            ));
        }
        Ok(f)
    }
}
