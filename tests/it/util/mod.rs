//! Shared helpers: fake backends on real loopback sockets, clients bound to chosen source IPs,
//! polling waits, deterministic data, and a guard for the real `holdfast` binary.
//!
//! Rules the helpers enforce so that a broken balancer fails a test instead of hanging it:
//! every client socket has read and write timeouts ([`IO_TIMEOUT`] unless a test asks for
//! less), every wait is a bounded poll ([`wait_until`]), and every fake backend stops and
//! closes its listener when dropped, so its port refuses afterwards.

#![allow(dead_code)] // Each test module uses its own subset.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::{BackendSpec, Config, Holdfast};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Read/write timeout on every client socket: generous, but never forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a fake backend's connection thread blocks in one read before it checks whether
/// the backend was dropped. Held-idle connections are kept open across these wake-ups.
const BACKEND_READ_TICK: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every few milliseconds until it is true; panics (at the caller's line) if it
/// is still false after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Like [`wait_until`], but the check explains itself: it returns `Err(why)` while not yet
/// satisfied, and the last `why` is in the panic message.
#[track_caller]
pub fn wait_until_ok(timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check() {
            Ok(()) => return,
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}: {why}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// `n` pseudo-random bytes from `seed` (xorshift64*): deterministic, incompressible enough,
/// and different for different seeds.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = vec![0u8; n];
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&next().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = next().to_le_bytes();
    let len = rest.len();
    rest.copy_from_slice(&last[..len]);
    out
}

/// 128 MiB of random bytes, generated once per test process and shared by the bulk tests
/// (generating it in an unoptimised test build costs about a second).
pub fn shared_random() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| random_bytes(128 << 20, 0x686f_6c64_6661_7374))
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

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

/// A stream wrapper that retries reads and writes interrupted by a signal (EINTR).
///
/// Sockets with SO_RCVTIMEO/SO_SNDTIMEO are not restarted after a signal, and this test
/// process does get signals: a child (the `holdfast` binary) exiting raises SIGCHLD, which
/// can wake a thread of a multi-threaded parent even though its default action is to ignore
/// it. std's `read_exact`/`write_all`/`read_to_end` retry EINTR themselves; libraries that
/// call `read`/`write` directly (tungstenite) need this wrapper.
pub struct NoEintr<S>(pub S);

impl<S: Read> Read for NoEintr<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl<S: Write> Write for NoEintr<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// Fake backends
// ---------------------------------------------------------------------------------------------

/// What a fake backend does with one accepted connection.
type Handler = Arc<dyn Fn(TcpStream, &ConnCtx) + Send + Sync>;

/// Passed to a handler: lets it notice that the backend was dropped.
pub struct ConnCtx {
    stop: Arc<AtomicBool>,
}

impl ConnCtx {
    pub fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
}

/// Locks, ignoring poison: a panicking test must not turn a backend's `Drop` into a second
/// panic (which would abort the whole test process).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reserves a loopback port for a fake backend's lifetime: a socket with SO_REUSEADDR, bound
/// to 127.0.0.1:0 and never listening. It receives no connections (connects are refused
/// while no listener shares the port), but it keeps the kernel from handing the port to
/// anyone else in between listeners: port-0 binds and connect()'s ephemeral ports skip a
/// port held by bind(). So [`TaggedBackend::set_refusing`] can always listen again on the
/// same port, even while other tests open thousands of connections.
fn port_guard() -> io::Result<(Socket, SocketAddr)> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&SockAddr::from(localhost0()))?;
    let addr = sock.local_addr()?.as_socket().expect("IPv4 address");
    Ok((sock, addr))
}

/// A non-blocking listener on `addr` with SO_REUSEADDR, so it can share the port with the
/// port guard and with connections accepted by an earlier listener.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&SockAddr::from(addr))?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// The accept loop and bookkeeping shared by every fake backend.
struct Server {
    addr: SocketAddr,
    _guard: Socket,
    listener: Arc<Mutex<Option<TcpListener>>>,
    /// Asks the accept thread to close the listener once its accept queue is empty.
    close_request: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// Clones of live connections, to shut them down when the backend is dropped.
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(handler: Handler) -> Server {
        let (guard, addr) = port_guard().expect("reserve a port for a fake backend");
        let listener = bind_listener(addr).expect("bind fake backend");
        let listener = Arc::new(Mutex::new(Some(listener)));
        let close_request = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let thread = {
            let (listener, close_request, stop, accepted, open, conns) = (
                Arc::clone(&listener),
                Arc::clone(&close_request),
                Arc::clone(&stop),
                Arc::clone(&accepted),
                Arc::clone(&open),
                Arc::clone(&conns),
            );
            std::thread::spawn(move || {
                let next_id = AtomicU64::new(0);
                while !stop.load(SeqCst) {
                    let accepted_conn = {
                        let mut guard = lock(&listener);
                        // The listener is non-blocking: nothing to accept means a short
                        // nap outside the lock, then a look at `stop` again.
                        match guard.as_ref().map(|l| l.accept()) {
                            Some(Ok(conn)) => Some(conn),
                            // Closing a listener resets the connections still waiting in
                            // its accept queue, which a client of the proxy would see as
                            // a failure after a successful connect. A stop asked for by
                            // the test closes it right after the queue was found empty.
                            Some(Err(_)) if close_request.swap(false, SeqCst) => {
                                *guard = None;
                                None
                            }
                            _ => {
                                drop(guard);
                                std::thread::sleep(Duration::from_millis(2));
                                None
                            }
                        }
                    };
                    let Some((stream, _)) = accepted_conn else {
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    accepted.fetch_add(1, SeqCst);
                    open.fetch_add(1, SeqCst);
                    let id = next_id.fetch_add(1, SeqCst);
                    if let Ok(clone) = stream.try_clone() {
                        lock(&conns).insert(id, clone);
                    }
                    let _ = stream.set_read_timeout(Some(BACKEND_READ_TICK));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    let (handler, open, conns) =
                        (Arc::clone(&handler), Arc::clone(&open), Arc::clone(&conns));
                    let ctx = ConnCtx {
                        stop: Arc::clone(&stop),
                    };
                    std::thread::spawn(move || {
                        handler(stream, &ctx);
                        lock(&conns).remove(&id);
                        open.fetch_sub(1, SeqCst);
                    });
                }
            })
        };
        Server {
            addr,
            _guard: guard,
            listener,
            close_request,
            stop,
            accepted,
            open,
            conns,
            thread: Some(thread),
        }
    }

    fn set_refusing(&self, refusing: bool) {
        if refusing {
            // The accept thread closes the listening socket (connects are then refused)
            // once everything already in its accept queue has been taken in.
            if lock(&self.listener).is_none() {
                return;
            }
            self.close_request.store(true, SeqCst);
            wait_until_ok(Duration::from_secs(5), || match *lock(&self.listener) {
                None => Ok(()),
                Some(_) => Err(format!(
                    "the accept thread of {} has not closed its listener",
                    self.addr
                )),
            });
            return;
        }
        let mut slot = lock(&self.listener);
        if slot.is_some() {
            return;
        }
        // Listen again on the same port (held meanwhile by the port guard). Retry briefly in
        // case the kernel has not finished with the old listener.
        let deadline = Instant::now() + Duration::from_secs(2);
        let result = loop {
            match bind_listener(self.addr) {
                Ok(l) => break Ok(l),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        match result {
            Ok(l) => *slot = Some(l),
            Err(e) => {
                drop(slot);
                panic!("cannot listen again on {}: {e}", self.addr);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *lock(&self.listener) = None;
        for c in lock(&self.conns).values() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Reads with the backend's short read tick, retrying on timeouts until the backend is
/// dropped. `Ok(0)` is EOF; `Err` is a real error (or the backend being dropped).
fn backend_read(stream: &mut TcpStream, buf: &mut [u8], ctx: &ConnCtx) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if ctx.stopped() {
                    return Err(io::Error::other("backend stopped"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Echoes until EOF, then closes.
fn echo_loop(mut stream: TcpStream, ctx: &ConnCtx) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match backend_read(&mut stream, &mut buf, ctx) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

macro_rules! server_accessors {
    () => {
        pub fn addr(&self) -> SocketAddr {
            self.server.addr
        }
        /// Connections accepted so far.
        pub fn accepted(&self) -> usize {
            self.server.accepted.load(SeqCst)
        }
        /// Connections open now (accepted and not yet closed by either side).
        pub fn open(&self) -> usize {
            self.server.open.load(SeqCst)
        }
        #[track_caller]
        pub fn wait_for_accepted(&self, n: usize, timeout: Duration) {
            wait_until_ok(timeout, || {
                let got = self.accepted();
                if got >= n {
                    Ok(())
                } else {
                    Err(format!("{} accepted {got}, want >= {n}", self.addr()))
                }
            });
        }
        #[track_caller]
        pub fn wait_for_open(&self, n: usize, timeout: Duration) {
            wait_until_ok(timeout, || {
                let got = self.open();
                if got == n {
                    Ok(())
                } else {
                    Err(format!(
                        "{} has {got} open connections, want {n}",
                        self.addr()
                    ))
                }
            });
        }
    };
}

/// Echoes every byte back; counts accepted and open connections.
pub struct EchoBackend {
    server: Server,
}

impl EchoBackend {
    pub fn start() -> EchoBackend {
        EchoBackend {
            server: Server::start(Arc::new(echo_loop)),
        }
    }
    server_accessors!();
}

/// Speaks first: writes `tag\n` on accept, then echoes. A client learns which backend it
/// reached by reading one line.
pub struct TaggedBackend {
    server: Server,
    tag: String,
}

impl TaggedBackend {
    pub fn start(tag: &str) -> TaggedBackend {
        let line = format!("{tag}\n");
        TaggedBackend {
            server: Server::start(Arc::new(move |mut stream: TcpStream, ctx: &ConnCtx| {
                if stream.write_all(line.as_bytes()).is_ok() {
                    echo_loop(stream, ctx);
                }
            })),
            tag: tag.to_string(),
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `true` closes the listener (connects are refused; open connections stay); `false`
    /// listens again on the same port.
    pub fn set_refusing(&self, refusing: bool) {
        self.server.set_refusing(refusing);
    }
    server_accessors!();
}

/// Accepts and holds connections; reads and discards, never writes.
pub struct SilentBackend {
    server: Server,
}

impl SilentBackend {
    pub fn start() -> SilentBackend {
        SilentBackend {
            server: Server::start(Arc::new(|mut stream: TcpStream, ctx: &ConnCtx| {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = backend_read(&mut stream, &mut buf, ctx) {
                    if n == 0 {
                        return;
                    }
                }
            })),
        }
    }
    server_accessors!();
}

/// Accepts, reads until it has received at least `after` bytes (0: at once), then resets the
/// connection (SO_LINGER 0 and close).
pub struct ResetBackend {
    server: Server,
}

impl ResetBackend {
    pub fn start(after: usize) -> ResetBackend {
        ResetBackend {
            server: Server::start(Arc::new(move |mut stream: TcpStream, ctx: &ConnCtx| {
                let mut got = 0;
                let mut buf = vec![0u8; 64 * 1024];
                while got < after {
                    match backend_read(&mut stream, &mut buf, ctx) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                reset(stream);
            })),
        }
    }
    server_accessors!();
}

/// A backend whose connects hang: a listener with backlog 0 that never accepts, its accept
/// queue pre-filled, so the kernel drops further SYNs (Linux drops a SYN when the listener's
/// accept queue is full; the client retransmits and its connect never completes). Used to
/// exercise the connect timeout. `start` verifies that a connect really hangs.
pub struct BlackholeBackend {
    _listener: Socket,
    _fillers: Vec<Socket>,
    addr: SocketAddr,
}

impl BlackholeBackend {
    pub fn start() -> BlackholeBackend {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener.bind(&SockAddr::from(localhost0())).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            // Backlog 0 still queues one connection; each filler takes a queue place (or
            // sits in SYN-SENT once the queue is full).
            let f = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            f.set_nonblocking(true).unwrap();
            let _ = f.connect(&SockAddr::from(addr)); // EINPROGRESS
            fillers.push(f);
            if fillers.len() < 2 {
                continue;
            }
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return BlackholeBackend {
                        _listener: listener,
                        _fillers: fillers,
                        addr,
                    };
                }
                _ => {} // still room in the queue: add another filler
            }
        }
        panic!("could not make connects to {addr} hang by filling its accept queue");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// An address that refuses connections, for as long as this value lives.
///
/// A socket bound to 127.0.0.1:0 that never listens: a connect to it is refused exactly as to
/// a closed port, but unlike "bind, take the port, close", the port cannot be handed to
/// another test's listener meanwhile (which would make it accept).
pub struct ClosedPort {
    _sock: Socket,
    addr: SocketAddr,
}

impl ClosedPort {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

pub fn closed_port() -> ClosedPort {
    let (sock, addr) = port_guard().expect("reserve a closed port");
    ClosedPort { _sock: sock, addr }
}

/// A backend for a single connection whose behaviour the test writes: `handle` runs on the
/// first accepted connection (read timeout [`IO_TIMEOUT`]) and its result is collected with
/// [`OneShotBackend::result`].
pub struct OneShotBackend<T> {
    addr: SocketAddr,
    rx: mpsc::Receiver<T>,
}

impl<T: Send + 'static> OneShotBackend<T> {
    pub fn start(handle: impl FnOnce(TcpStream) -> T + Send + 'static) -> OneShotBackend<T> {
        let listener = TcpListener::bind(localhost0()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let deadline = Instant::now() + IO_TIMEOUT;
            listener.set_nonblocking(true).unwrap();
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if Instant::now() >= deadline => return, // result() reports it
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            };
            drop(listener);
            stream.set_nonblocking(false).unwrap();
            set_timeouts(&stream);
            let _ = tx.send(handle(stream));
        });
        OneShotBackend { addr, rx }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[track_caller]
    pub fn result(&self, timeout: Duration) -> T {
        self.rx
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("one-shot backend gave no result within {timeout:?}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The balancer, in process
// ---------------------------------------------------------------------------------------------

/// A configuration listening on 127.0.0.1:0 with `backends` at weight 1.
///
/// Active health probes are off: they would add connections to the fake backends' counts.
/// Tests of health checking turn them on.
pub fn config(backends: &[SocketAddr]) -> Config {
    let mut config = Config::new(
        vec![localhost0()],
        backends.iter().map(|a| BackendSpec::new(*a)).collect(),
    );
    config.health.check = holdfast::HealthCheck::None;
    config
}

#[track_caller]
pub fn start_balancer(config: Config) -> Holdfast {
    Holdfast::start(config).unwrap_or_else(|e| panic!("Holdfast::start: {e}"))
}

/// The balancer's (first) listen address.
pub fn lb_addr(lb: &Holdfast) -> SocketAddr {
    lb.listen_addrs()[0]
}

/// The balancer's per-backend counters for `addr`.
#[track_caller]
pub fn backend_stat(lb: &Holdfast, addr: SocketAddr) -> holdfast::BackendStatsSnapshot {
    lb.backend_stats()
        .into_iter()
        .find(|b| b.addr == addr)
        .unwrap_or_else(|| panic!("no backend_stats entry for {addr}"))
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

/// Number of open file descriptors of process `pid` that are pipe ends.
pub fn pipe_fds(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "holdfast-it-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    ))
}

/// Runs the binary with `args` to completion (stdin closed), killing it and panicking if it
/// has not exited within `timeout`.
#[track_caller]
pub fn run_binary(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "holdfast {args:?} still running after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// The real `holdfast` binary, running. Killed on drop.
///
/// The listen port is reserved rather than guessed: a socket with SO_REUSEPORT is bound (not
/// listening) to 127.0.0.1:0, and the child is told to listen on that address. Linux lets
/// the child's SO_REUSEPORT listeners (same user) bind it too, while no other test's port-0
/// bind can take it meanwhile; a bound socket that does not listen receives no connections.
pub struct Child {
    child: std::process::Child,
    addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    _reservation: Socket,
}

impl Child {
    /// Starts `holdfast --listen <reserved addr> <args>` and waits until the port accepts.
    #[track_caller]
    pub fn spawn(args: &[&str]) -> Child {
        let reservation = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        reservation.set_reuse_port(true).unwrap();
        reservation.bind(&SockAddr::from(localhost0())).unwrap();
        let addr = reservation.local_addr().unwrap().as_socket().unwrap();
        let stdout = temp_path("stdout");
        let stderr = temp_path("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn holdfast");
        let mut me = Child {
            child,
            addr,
            stdout,
            stderr,
            _reservation: reservation,
        };
        wait_until_ok(IO_TIMEOUT, || {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!(
                    "holdfast {args:?} exited at start with {status}; stderr:\n{}",
                    me.stderr()
                );
            }
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "holdfast {args:?} does not accept on {addr} ({e}); stderr:\n{}",
                    me.stderr()
                )),
            }
        });
        me
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `signal` and waits (up to `timeout`) for the process to exit.
    #[track_caller]
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        self.signal(signal);
        let mut exited = None;
        wait_until_ok(timeout, || {
            exited = self.child.try_wait().unwrap();
            match exited {
                Some(_) => Ok(()),
                None => Err(format!(
                    "holdfast did not exit after signal {signal}; stderr:\n{}",
                    self.stderr()
                )),
            }
        });
        exited.expect("wait_until_ok returns only once the check passed")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}

// ---------------------------------------------------------------------------------------------
// Health checking and pacing
// ---------------------------------------------------------------------------------------------

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

/// Counts of one [`CountingBackend`].
#[derive(Default)]
struct CountingState {
    /// For each accepted connection: it was established after the first instant and before
    /// the second (see [`CountingBackend::arrivals`]).
    arrivals: Vec<(Instant, Instant)>,
    open: usize,
    peak: usize,
}

/// An echo backend that knows exactly how many connections are open at its end, and when
/// each was accepted.
///
/// One thread owns every socket (non-blocking): each turn it accepts what is pending, then
/// reads every connection (echoing data, dropping those at EOF or reset), and only then
/// counts. A connection closed by the balancer before it opened the next one is therefore
/// never counted together with it: on loopback the FIN is queued on the old socket before
/// the new connection's handshake completes, so the sweep after the accept sees it. (A
/// thread-per-connection backend only notices the EOF when that thread next runs, and could
/// briefly count one connection too many.)
pub struct CountingBackend {
    addr: SocketAddr,
    state: Arc<Mutex<CountingState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingBackend {
    pub fn start() -> CountingBackend {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.bind(&SockAddr::from(localhost0())).unwrap();
        sock.listen(1024).unwrap();
        sock.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let listener: TcpListener = sock.into();
        let state = Arc::new(Mutex::new(CountingState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || counting_loop(listener, &state, &stop))
        };
        CountingBackend {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        lock(&self.state).arrivals.len()
    }

    /// When each connection arrived, in order, as an interval that surely contains it:
    /// after the last look at the listener that found nothing, and before the accept that
    /// returned it. Normally under a millisecond wide; wider where this backend's thread was
    /// not scheduled for a while, which a bare accept timestamp would silently shift (and
    /// bunch up) instead.
    pub fn arrivals(&self) -> Vec<(Instant, Instant)> {
        lock(&self.state).arrivals.clone()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.state).open
    }

    /// Most connections ever open at once.
    pub fn peak(&self) -> usize {
        lock(&self.state).peak
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn counting_loop(listener: TcpListener, state: &Mutex<CountingState>, stop: &AtomicBool) {
    // Each connection with the bytes it still has to echo.
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // When the listener was last found empty: anything accepted later arrived after this.
    let mut empty_at = Instant::now();
    while !stop.load(SeqCst) {
        let mut busy = false;
        let mut accepted = Vec::new();
        loop {
            let looked_at = Instant::now();
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted.push((empty_at, Instant::now()));
                    if stream.set_nonblocking(true).is_ok() {
                        conns.push((stream, Vec::new()));
                    }
                }
                Err(_) => {
                    empty_at = looked_at;
                    break;
                }
            }
        }
        busy |= !accepted.is_empty();
        conns.retain_mut(|(stream, out)| {
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => {
                        busy = true;
                        out.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            while !out.is_empty() {
                match stream.write(out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            true
        });
        {
            let mut st = lock(state);
            st.arrivals.extend(accepted);
            st.open = conns.len();
            st.peak = st.peak.max(conns.len());
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A real WebSocket server (tungstenite's `accept` on each connection, one thread per
/// connection) that records the request path of every upgrade it completes, then reads
/// frames until the peer goes away.
pub struct WebSocketBackend {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebSocketBackend {
    pub fn start() -> WebSocketBackend {
        let listener = TcpListener::bind(localhost0()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (paths, failed, stop) =
                (Arc::clone(&paths), Arc::clone(&failed), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let (paths, failed, stop) =
                        (Arc::clone(&paths), Arc::clone(&failed), Arc::clone(&stop));
                    std::thread::spawn(move || websocket_conn(stream, &paths, &failed, &stop));
                }
            })
        };
        WebSocketBackend {
            addr,
            paths,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Request paths of the upgrades completed so far.
    pub fn paths(&self) -> Vec<String> {
        lock(&self.paths).clone()
    }

    /// Connections whose upgrade request was not a valid WebSocket handshake.
    pub fn failed_handshakes(&self) -> usize {
        self.failed.load(SeqCst)
    }
}

impl Drop for WebSocketBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn websocket_conn(
    stream: TcpStream,
    paths: &Mutex<Vec<String>>,
    failed: &AtomicUsize,
    stop: &AtomicBool,
) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(BACKEND_READ_TICK));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut path = String::new();
    // The callback's signature is tungstenite's, large error variant and all.
    #[allow(clippy::result_large_err)]
    let handshake = tungstenite::accept_hdr(
        NoEintr(stream),
        |req: &tungstenite::handshake::server::Request,
         resp: tungstenite::handshake::server::Response| {
            path = req.uri().path().to_string();
            Ok(resp)
        },
    );
    let mut ws = match handshake {
        Ok(ws) => ws,
        Err(_) => {
            failed.fetch_add(1, SeqCst);
            return;
        }
    };
    lock(paths).push(path);
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// The largest number of `arrivals` (intervals as from [`CountingBackend::arrivals`], in
/// order) that surely fell within one window of length `window`: those whose whole interval
/// lies inside it. A lower bound of the true busiest window, and equal to it when the
/// intervals are narrow, so a bound asserted on it cannot fail because the observer was
/// slow.
pub fn busiest_window(arrivals: &[(Instant, Instant)], window: Duration) -> usize {
    arrivals
        .iter()
        .map(|&(start, _)| {
            arrivals
                .iter()
                .filter(|&&(after, before)| after >= start && before < start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The state `lb` reports for backend `addr` now.
#[track_caller]
pub fn backend_state(lb: &Holdfast, addr: SocketAddr) -> holdfast::BackendState {
    backend_stat(lb, addr).state
}

/// Waits until `lb` reports backend `addr` in `state`; returns when that was seen.
#[track_caller]
pub fn wait_for_state(
    lb: &Holdfast,
    addr: SocketAddr,
    state: holdfast::BackendState,
    within: Duration,
) -> Instant {
    wait_until_ok(within, || {
        let s = backend_stat(lb, addr);
        if s.state == state {
            Ok(())
        } else {
            Err(format!("{addr} is {:?}, want {state:?}: {s:?}", s.state))
        }
    });
    Instant::now()
}

/// Sessions the backend ended (reset or EOF) without answering a byte, soon after they
/// began, as counted by passive health checking.
#[track_caller]
pub fn passive_failures(lb: &Holdfast, addr: SocketAddr) -> u64 {
    backend_stat(lb, addr).passive_failures
}

/// The weight new connections see for backend `addr` now, in 1/64 of its configured weight.
#[track_caller]
pub fn effective_weight(lb: &Holdfast, addr: SocketAddr) -> u32 {
    backend_stat(lb, addr).effective_weight
}

// ---------------------------------------------------------------------------------------------
// Lifecycle: signals, exits, refusals, tags and backend files
// ---------------------------------------------------------------------------------------------

impl Child {
    /// Sends `signal` without waiting for anything; returns the instant just after `kill`
    /// returned (the signal has been sent by then), to measure reactions from.
    #[track_caller]
    pub fn signal(&self, signal: i32) -> Instant {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
        Instant::now()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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

/// Polls connects to `addr` until one is refused; returns when that was. Panics if connects
/// are still not refused after `timeout`.
#[track_caller]
pub fn wait_refused(addr: SocketAddr, timeout: Duration) -> Instant {
    let mut refused_at = None;
    wait_until_ok(timeout, || {
        if connect_refused(addr) {
            refused_at = Some(Instant::now());
            Ok(())
        } else {
            Err(format!("{addr} still accepts connections"))
        }
    });
    refused_at.expect("set when the wait succeeded")
}

/// Sleeps until `at` (at once if it has passed). For tests that check that nothing happens
/// before a moment, where there is no condition to wait for.
pub fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
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

/// A file in the temporary directory, removed on drop (a `--backends-file`, say).
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    #[track_caller]
    pub fn new(what: &str, contents: &str) -> TempFile {
        let file = TempFile {
            path: temp_path(what),
        };
        file.write(contents);
        file
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Replaces the contents.
    #[track_caller]
    pub fn write(&self, contents: &str) {
        fs::write(&self.path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.path.display()));
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
