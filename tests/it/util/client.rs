//! Clients: sockets connected from chosen source IPs with timeouts set, reading a line,
//! echoing, telling how a connection ended, and visiting [`TaggedBackend`]s.
//!
//! [`TaggedBackend`]: super::TaggedBackend

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::IO_TIMEOUT;

pub fn localhost0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Sets [`IO_TIMEOUT`] for reads and writes.
pub fn set_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// A client connected to `target` from 127.0.0.1, with timeouts set.
#[track_caller]
pub fn client(target: SocketAddr) -> TcpStream {
    client_from("127.0.0.1", target)
}

/// A client bound to source address `ip` (any of 127.0.0.0/8, port chosen by the kernel)
/// and connected to `target`, with timeouts set.
#[track_caller]
pub fn client_from(ip: &str, target: SocketAddr) -> TcpStream {
    let ip: IpAddr = ip.parse().expect("client_from: bad IP");
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .expect("socket");
    // Choose the port at connect time, not at bind: connect can share a local port between
    // different destinations, while bind(port 0) takes a port of its own, and thousands of
    // those (plus their TIME_WAITs) would exhaust the ephemeral range over a few runs.
    holdfast::bind_address_no_port(&sock).expect("IP_BIND_ADDRESS_NO_PORT");
    sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
        .unwrap_or_else(|e| panic!("cannot bind client to {ip}: {e}"));
    sock.connect_timeout(&SockAddr::from(target), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("client {ip} cannot connect to {target}: {e}"));
    let stream: TcpStream = sock.into();
    set_timeouts(&stream);
    stream
}

/// Writes `payload` and reads back exactly as many bytes, which must be equal (an echo).
#[track_caller]
pub fn round_trip(stream: &mut TcpStream, payload: &[u8]) {
    stream.write_all(payload).expect("round trip: write");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).expect("round trip: read echo");
    assert!(
        back == payload,
        "round trip: echo differs from what was sent"
    );
}

/// Reads one `\n`-terminated line byte by byte (so nothing after it is consumed) and returns
/// it without the newline.
#[track_caller]
pub fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => panic!("read_line: EOF after {:?}", String::from_utf8_lossy(&line)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read_line: {e} after {:?}", String::from_utf8_lossy(&line)),
        }
        assert!(line.len() < 1024, "read_line: no newline in 1 KiB");
    }
    String::from_utf8(line).expect("read_line: not UTF-8")
}

/// How a read-until-closed ended.
#[derive(Debug)]
pub enum Closed {
    Eof,
    #[allow(
        dead_code,
        reason = "read through Debug, in the assertion messages that show how a connection ended"
    )]
    Error(io::ErrorKind),
}

/// Reads (discarding data) until the peer closes: EOF or a non-timeout error. Panics if that
/// has not happened `within` the given time. Returns how it closed and how long it took.
#[track_caller]
pub fn expect_closed(stream: &mut TcpStream, within: Duration) -> (Closed, Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            panic!("connection still open after {within:?}");
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (Closed::Eof, start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Closed::Error(e.kind()), start.elapsed()),
        }
    }
}

/// Sets SO_LINGER 0 and drops the stream: the peer gets a RST instead of a FIN.
pub fn reset(stream: TcpStream) {
    Socket::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// Sends `data` on one thread while reading the echo on this one (no lock-step deadlock),
/// checks the echo byte for byte as it arrives, then expects EOF: the writer half-closes after
/// the last byte, and the echo backend closes when it reads that EOF.
///
/// Integrity is checked by comparing each received chunk with the bytes sent at that offset,
/// not by SHA-256: in an unoptimised test build sha2 runs at ~25 MB/s, which would make the
/// bulk tests (over 1 GiB echoed in all) CPU-bound for tens of seconds. The comparison is at
/// least as strict (lost, duplicated, reordered or altered bytes all show) and reports where
/// the streams first differ.
pub fn echo_stream(stream: TcpStream, data: &'static [u8]) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|e| format!("clone: {e}"))?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        for chunk in data.chunks(256 * 1024) {
            writer
                .write_all(chunk)
                .map_err(|e| format!("write failed: {e}"))?;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown(Write) failed: {e}"))
    });
    let mut reader = stream;
    let mut at = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) if at == data.len() => break Ok(()),
            Ok(0) => break Err(format!("EOF after {at} of {} bytes", data.len())),
            Ok(n) if at + n > data.len() => {
                break Err(format!(
                    "{} bytes more than the {} sent",
                    at + n - data.len(),
                    data.len()
                ));
            }
            Ok(n) if buf[..n] != data[at..at + n] => {
                let first = (0..n).find(|&i| buf[i] != data[at + i]).unwrap();
                break Err(format!(
                    "echo differs from what was sent at byte {}",
                    at + first
                ));
            }
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(format!("read failed after {at} bytes: {e}")),
        }
    };
    if result.is_err() {
        // Unblock the writer at once instead of waiting for its write timeout.
        let _ = reader.shutdown(Shutdown::Both);
    }
    let sent = sender.join().map_err(|_| "writer panicked".to_string())?;
    result.and(sent)
}

/// Like [`client_from`], but a failure to connect is returned, not a panic: for client loops
/// that must count failed connections instead of dying on the first one.
pub fn try_client_from(ip: &str, target: SocketAddr) -> io::Result<TcpStream> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{ip}: {e}")))?;
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    holdfast::bind_address_no_port(&sock)?;
    sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    sock.connect_timeout(&SockAddr::from(target), IO_TIMEOUT)?;
    let stream: TcpStream = sock.into();
    set_timeouts(&stream);
    Ok(stream)
}

/// One complete visit to a [`TaggedBackend`] through the balancer, as a user would make it:
/// connect from `ip`, read the tag line, echo one byte, close. `Ok(tag)` only if all of that
/// worked; otherwise what went wrong. Never panics, and every read is bounded by `within`.
pub fn visit_tagged(ip: &str, target: SocketAddr, within: Duration) -> Result<String, String> {
    let mut stream = try_client_from(ip, target).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "EOF before the tag line (after {:?})",
                    String::from_utf8_lossy(&line)
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= 256 => return Err("tag line longer than 256 bytes".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the tag: {e}")),
        }
    }
    let tag = String::from_utf8(line).map_err(|_| "tag not UTF-8".to_string())?;
    stream
        .write_all(b"x")
        .map_err(|e| format!("tag {tag}: write: {e}"))?;
    stream
        .read_exact(&mut byte)
        .map_err(|e| format!("tag {tag}: echo: {e}"))?;
    if byte[0] != b'x' {
        return Err(format!("tag {tag}: echo was {:?}", byte[0]));
    }
    Ok(tag)
}

/// What a client socket has for the reader right now, looked at without blocking or
/// consuming anything.
#[derive(Debug, PartialEq, Eq)]
pub enum Pending {
    /// Nothing yet; the connection is open.
    Nothing,
    /// Bytes are waiting.
    Data,
    /// The peer closed (EOF) or reset the connection.
    Closed,
}

pub fn pending(stream: &TcpStream) -> Pending {
    stream.set_nonblocking(true).expect("set_nonblocking");
    let mut byte = [0u8; 1];
    let result = loop {
        match stream.peek(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other,
        }
    };
    stream.set_nonblocking(false).expect("set_nonblocking");
    match result {
        Ok(0) => Pending::Closed,
        Ok(_) => Pending::Data,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pending::Nothing,
        Err(_) => Pending::Closed,
    }
}

/// Whether a connect to `addr` is refused (ECONNREFUSED) now. A connect that succeeds is
/// closed at once.
pub fn connect_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// A new client of `target` and the tag of the [`TaggedBackend`] it reached.
#[track_caller]
pub fn connect_tagged(target: SocketAddr) -> (String, TcpStream) {
    let mut c = client(target);
    let tag = read_line(&mut c);
    (tag, c)
}

/// The tags reached by `n` new clients of `target`, one after another (each closed before
/// the next connects).
#[track_caller]
pub fn tags_of_new_clients(target: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| connect_tagged(target).0).collect()
}

/// How many of `tags` are `tag`.
pub fn count_tag(tags: &[String], tag: &str) -> usize {
    tags.iter().filter(|t| *t == tag).count()
}
