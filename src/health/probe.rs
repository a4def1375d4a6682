//! One health probe: a non-blocking TCP connect, then, depending on the check, one exchange:
//! bytes written, and an answer read (at most [`MAX_PROBE_BYTES`]) until it is judged.
//!
//! - `websocket:/PATH`: an upgrade request; the status line must say `101`. This is the only
//!   place holdfast speaks HTTP, and only to its own backends: the data plane never parses a
//!   byte.
//! - `send:`/`expect:`: the send bytes (if any); the expect bytes (if any) must appear in the
//!   answer before the backend closes, the cap is reached, or the probe times out (a server
//!   that answers something else and keeps the connection open fails at the timeout).
//! - `redis`: `PING\r\n`; the answer must start with `+PONG` (any other first bytes, such as
//!   `-LOADING` or `-NOAUTH`, fail at once).
//! - `postgres`: a StartupMessage; the answer must start with `R` (an authentication
//!   request), not `E` (an error such as "the database system is shutting down"). The answer
//!   is never searched for `R`: an ErrorResponse holds one (its routine field,
//!   `RProcessStartupPacket`).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::config::{HealthCheck, MAX_PROBE_BYTES};

/// The PostgreSQL protocol version a StartupMessage asks for: 3.0.
const POSTGRES_PROTOCOL_3_0: u32 = 3 << 16;

pub struct Probe {
    pub addr: SocketAddr,
    pub deadline: Instant,
    stream: TcpStream,
    /// What follows the connect; `None`: the connect alone decides.
    exchange: Option<Exchange>,
    stage: Stage,
}

/// What a probe writes once connected, and what it wants back.
struct Exchange {
    request: Vec<u8>,
    answer: Answer,
}

/// How the backend's answer is judged.
#[derive(Debug)]
enum Answer {
    /// Nothing is awaited: the probe passes if, once the request is written, the backend has
    /// neither closed nor reset the connection.
    Nothing,
    /// An HTTP status line that says `101`.
    SwitchingProtocols,
    /// These bytes appear somewhere in the answer.
    Contains(Vec<u8>),
    /// The answer starts with these bytes: decided by its first bytes, so a wrong answer
    /// fails at once rather than at the timeout.
    StartsWith(&'static [u8]),
}

enum Stage {
    Connecting,
    Sending { written: usize },
    Receiving { got: Vec<u8> },
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
        send_proxy: bool,
        deadline: Instant,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Probe> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Probe {
            addr,
            deadline,
            stream,
            exchange: Exchange::for_check(check, addr, send_proxy),
            stage: Stage::Connecting,
        })
    }

    /// Makes what progress the socket allows (edge-triggered: until `WouldBlock`).
    pub fn advance(&mut self) -> ProbeStep {
        loop {
            let next = match &mut self.stage {
                Stage::Connecting => match connected(&self.stream) {
                    Ok(false) => return ProbeStep::Pending,
                    Err(_) => return ProbeStep::Done(false),
                    Ok(true) => match &self.exchange {
                        None => return ProbeStep::Done(true),
                        Some(x) if x.request.is_empty() => Stage::Receiving { got: Vec::new() },
                        Some(_) => Stage::Sending { written: 0 },
                    },
                },
                Stage::Sending { written } => {
                    let Some(x) = &self.exchange else {
                        return ProbeStep::Done(true);
                    };
                    match (&self.stream).write(&x.request[*written..]) {
                        Ok(0) => return ProbeStep::Done(false),
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return ProbeStep::Pending;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return ProbeStep::Done(false),
                    }
                    if *written < x.request.len() {
                        continue;
                    }
                    Stage::Receiving {
                        got: Vec::with_capacity(512),
                    }
                }
                Stage::Receiving { got } => {
                    let Some(x) = &self.exchange else {
                        return ProbeStep::Done(true);
                    };
                    let mut buf = [0u8; 1024];
                    let room = (MAX_PROBE_BYTES - got.len()).min(buf.len());
                    let finished = match (&self.stream).read(&mut buf[..room]) {
                        Ok(0) => true,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            got.len() >= MAX_PROBE_BYTES
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if matches!(x.answer, Answer::Nothing) {
                                return ProbeStep::Done(true);
                            }
                            return ProbeStep::Pending;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return ProbeStep::Done(false),
                    };
                    match x.answer.verdict(got, finished) {
                        Some(passed) => return ProbeStep::Done(passed),
                        None => continue,
                    }
                }
            };
            self.stage = next;
        }
    }
}

impl Exchange {
    /// `send_proxy` (`--health-send-proxy`): a v2 `LOCAL` header goes first, so backends
    /// that require a PROXY header can be probed (HAProxy's `check-send-proxy`); a plain TCP
    /// probe then passes if the backend takes the header without closing.
    fn for_check(check: &HealthCheck, addr: SocketAddr, send_proxy: bool) -> Option<Exchange> {
        let mut exchange = Exchange::plain(check, addr);
        if send_proxy {
            let x = exchange.get_or_insert_with(|| Exchange {
                request: Vec::new(),
                answer: Answer::Nothing,
            });
            let mut request = crate::proxy_protocol::encode_v2_local();
            request.extend_from_slice(&x.request);
            x.request = request;
        }
        exchange
    }

    fn plain(check: &HealthCheck, addr: SocketAddr) -> Option<Exchange> {
        let (request, answer) = match check {
            HealthCheck::Tcp | HealthCheck::None => return None,
            HealthCheck::WebSocket { path } => {
                (upgrade_request(path, addr), Answer::SwitchingProtocols)
            }
            HealthCheck::SendExpect(se) => (
                se.send().to_vec(),
                if se.expect().is_empty() {
                    Answer::Nothing
                } else {
                    Answer::Contains(se.expect().to_vec())
                },
            ),
            HealthCheck::Redis => (b"PING\r\n".to_vec(), Answer::StartsWith(b"+PONG")),
            HealthCheck::Postgres { user, database } => (
                startup_message(user, database.as_deref()),
                Answer::StartsWith(b"R"),
            ),
        };
        Some(Exchange { request, answer })
    }
}

impl Answer {
    /// The verdict on the answer so far: `None` while more bytes could change it. `finished`:
    /// no more bytes will be read (the backend closed, or the cap is reached).
    fn verdict(&self, got: &[u8], finished: bool) -> Option<bool> {
        match self {
            Answer::Nothing if got.is_empty() => finished.then_some(false),
            Answer::Nothing => Some(true),
            Answer::StartsWith(prefix) => {
                let n = got.len().min(prefix.len());
                if got[..n] != prefix[..n] {
                    Some(false)
                } else if n == prefix.len() {
                    Some(true)
                } else {
                    finished.then_some(false)
                }
            }
            Answer::SwitchingProtocols => (finished || got.windows(4).any(|w| w == b"\r\n\r\n"))
                .then(|| is_switching_protocols(got)),
            Answer::Contains(needle) => {
                if contains(got, needle) {
                    Some(true)
                } else {
                    finished.then_some(false)
                }
            }
        }
    }
}

/// Whether `needle` occurs in `haystack` (an empty needle does).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A PostgreSQL StartupMessage (protocol 3.0) for `user`, and `database` if given (the server
/// takes the user name otherwise). `application_name` tells the server's logs and
/// `pg_stat_activity` who is asking.
fn startup_message(user: &str, database: Option<&str>) -> Vec<u8> {
    let mut msg = vec![0; 4];
    msg.extend_from_slice(&POSTGRES_PROTOCOL_3_0.to_be_bytes());
    let params = [
        ("user", Some(user)),
        ("database", database),
        ("application_name", Some("holdfast-health-check")),
    ];
    for (key, value) in params {
        if let Some(value) = value {
            for s in [key, value] {
                msg.extend_from_slice(s.as_bytes());
                msg.push(0);
            }
        }
    }
    msg.push(0);
    // The length counts itself; names are short (a flag value), so it fits.
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    msg[..4].copy_from_slice(&len.to_be_bytes());
    msg
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
    fn contains_waits_for_the_needle_across_reads_and_fails_at_the_end() {
        let a = Answer::Contains(b"+PONG".to_vec());
        assert_eq!(a.verdict(b"", false), None);
        assert_eq!(a.verdict(b"+PO", false), None);
        assert_eq!(a.verdict(b"+PONG\r\n", false), Some(true));
        assert_eq!(a.verdict(b"banner\r\n+PONG", false), Some(true));
        assert_eq!(a.verdict(b"+PO", true), Some(false), "closed half-way");
        assert_eq!(a.verdict(b"-ERR shutting down\r\n", true), Some(false));
        assert_eq!(a.verdict(b"", true), Some(false));
    }

    #[test]
    fn starts_with_is_not_a_search_and_fails_on_the_first_wrong_byte() {
        let redis = Answer::StartsWith(b"+PONG");
        assert_eq!(redis.verdict(b"+PO", false), None);
        assert_eq!(redis.verdict(b"+PONG", false), Some(true));
        assert_eq!(
            redis.verdict(b"-", false),
            Some(false),
            "no need to wait for more"
        );
        assert_eq!(redis.verdict(b"-NOAUTH x +PONG\r\n", false), Some(false));
        assert_eq!(redis.verdict(b"+PO", true), Some(false), "closed half-way");
        let a = Answer::StartsWith(b"R");
        assert_eq!(a.verdict(b"", false), None);
        assert_eq!(a.verdict(b"R\0\0\0\x08\0\0\0\0", false), Some(true));
        // PostgreSQL 15's answer to a StartupMessage during a smart shutdown: it holds an
        // 'R' (the routine field), and still fails.
        let shutting_down = b"E\0\0\0jSFATAL\0VFATAL\0C57P03\0Mthe database system is \
            shutting down\0Fpostmaster.c\0L2432\0RProcessStartupPacket\0\0";
        assert_eq!(a.verdict(shutting_down, false), Some(false));
        assert_eq!(a.verdict(b"", true), Some(false));
    }

    #[test]
    fn nothing_awaited_passes_on_data_and_fails_on_close() {
        assert_eq!(Answer::Nothing.verdict(b"", false), None);
        assert_eq!(Answer::Nothing.verdict(b"hi", false), Some(true));
        assert_eq!(Answer::Nothing.verdict(b"", true), Some(false));
    }

    #[test]
    fn upgrade_waits_for_the_end_of_the_head() {
        let a = Answer::SwitchingProtocols;
        assert_eq!(a.verdict(b"HTTP/1.1 101 Switching", false), None);
        assert_eq!(a.verdict(b"HTTP/1.1 101 OK\r\n\r\n", false), Some(true));
        assert_eq!(a.verdict(b"HTTP/1.1 503 Busy\r\n\r\n", false), Some(false));
        assert_eq!(a.verdict(b"HTTP/1.1 101 OK\r\n", true), Some(true));
    }

    #[test]
    fn startup_message_is_what_postgres_expects() {
        let msg = startup_message("app", Some("shop"));
        let len = u32::from_be_bytes(msg[..4].try_into().unwrap()) as usize;
        assert_eq!(len, msg.len());
        assert_eq!(msg[4..8], [0, 3, 0, 0], "protocol 3.0");
        assert_eq!(
            &msg[8..],
            b"user\0app\0database\0shop\0application_name\0holdfast-health-check\0\0"
        );
        let msg = startup_message("holdfast", None);
        assert_eq!(
            &msg[8..],
            b"user\0holdfast\0application_name\0holdfast-health-check\0\0"
        );
    }

    #[test]
    fn request_names_path_and_host() {
        let req = upgrade_request("/live", "127.0.0.1:80".parse().unwrap());
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("GET /live HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }
}
