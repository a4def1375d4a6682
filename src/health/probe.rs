//! One health probe: a non-blocking TCP connect, and for `websocket:/PATH` an upgrade request
//! that must be answered `HTTP/1.1 101`.
//!
//! This is the only place holdfast speaks HTTP, and only to its own backends: the data plane
//! never parses a byte. The probe reads no more than the response head (at most 4 KiB) and
//! looks only at the status code.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::config::HealthCheck;

/// Most bytes of a response head the probe reads before giving up on it.
const MAX_RESPONSE_HEAD: usize = 4096;

pub struct Probe {
    pub addr: SocketAddr,
    pub deadline: Instant,
    stream: TcpStream,
    stage: Stage,
}

enum Stage {
    Connecting { upgrade: Option<Vec<u8>> },
    Sending { request: Vec<u8>, written: usize },
    Receiving { head: Vec<u8> },
}

/// Where a probe stands after an event.
pub enum ProbeStep {
    Pending,
    /// Finished: `true` if the backend passed.
    Done(bool),
}

impl Probe {
    /// Starts the connect and registers the socket under `token`.
    pub fn start(
        addr: SocketAddr,
        check: &HealthCheck,
        deadline: Instant,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Probe> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let upgrade = match check {
            HealthCheck::WebSocket { path } => Some(upgrade_request(path, addr)),
            HealthCheck::Tcp | HealthCheck::None => None,
        };
        Ok(Probe {
            addr,
            deadline,
            stream,
            stage: Stage::Connecting { upgrade },
        })
    }

    /// Makes what progress the socket allows (edge-triggered: until `WouldBlock`).
    pub fn advance(&mut self) -> ProbeStep {
        loop {
            let next = match &mut self.stage {
                Stage::Connecting { upgrade } => match connected(&self.stream) {
                    Ok(false) => return ProbeStep::Pending,
                    Err(_) => return ProbeStep::Done(false),
                    Ok(true) => match upgrade.take() {
                        None => return ProbeStep::Done(true),
                        Some(request) => Stage::Sending {
                            request,
                            written: 0,
                        },
                    },
                },
                Stage::Sending { request, written } => {
                    match (&self.stream).write(&request[*written..]) {
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return ProbeStep::Pending;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return ProbeStep::Done(false),
                    }
                    if *written < request.len() {
                        continue;
                    }
                    Stage::Receiving {
                        head: Vec::with_capacity(512),
                    }
                }
                Stage::Receiving { head } => {
                    let mut buf = [0u8; 1024];
                    match (&self.stream).read(&mut buf) {
                        Ok(0) => return ProbeStep::Done(is_switching_protocols(head)),
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return ProbeStep::Pending;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return ProbeStep::Done(false),
                    }
                    if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_RESPONSE_HEAD
                    {
                        return ProbeStep::Done(is_switching_protocols(head));
                    }
                    continue;
                }
            };
            self.stage = next;
        }
    }
}

/// mio's recipe for a non-blocking connect: SO_ERROR tells a failure; without one, a known
/// peer address means connected, ENOTCONN means not yet.
fn connected(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

fn upgrade_request(path: &str, addr: SocketAddr) -> Vec<u8> {
    // The key only has to be 16 bytes in base64 (RFC 6455 §4.1); the probe does not check
    // the server's Sec-WebSocket-Accept, only that it agreed to switch protocols.
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {addr}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: aG9sZGZhc3QtcHJvYmUtMQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         User-Agent: holdfast-health-check\r\n\
         \r\n"
    )
    .into_bytes()
}

/// `HTTP/1.1 101 ...` (or HTTP/1.0): the status code is the second word of the first line.
fn is_switching_protocols(head: &[u8]) -> bool {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let mut words = head[..line_end].split(|&b| b == b' ');
    matches!(words.next(), Some(v) if v.starts_with(b"HTTP/1.")) && words.next() == Some(b"101")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_must_say_101() {
        assert!(is_switching_protocols(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
        ));
        assert!(is_switching_protocols(b"HTTP/1.1 101\r\n"));
        assert!(!is_switching_protocols(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!is_switching_protocols(b"HTTP/1.1 1010 Nope\r\n"));
        assert!(!is_switching_protocols(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!is_switching_protocols(b""));
    }

    #[test]
    fn request_names_path_and_host() {
        let req = upgrade_request("/live", "127.0.0.1:80".parse().unwrap());
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("GET /live HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
