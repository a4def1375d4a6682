//! Fake backends on real loopback sockets. Those built on [`Server`] (echo, tagged, silent,
//! reset) run one thread per connection, count accepted and open connections, and keep their
//! port for their whole life; the others are a blackhole (connects hang) and the hung
//! listener it is made of, a closed port (connects are refused), a one-shot backend whose
//! single connection the test scripts and a scripted one that runs a closure per connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{BACKEND_READ_TICK, IO_TIMEOUT, localhost0, lock, reset, set_timeouts, wait_until_ok};

/// What a fake backend does with one accepted connection.
pub(super) type Handler = Arc<dyn Fn(TcpStream, &ConnCtx) + Send + Sync>;

/// Passed to a handler: lets it notice that the backend was dropped.
pub struct ConnCtx {
    stop: Arc<AtomicBool>,
}

impl ConnCtx {
    pub fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
}

/// Reserves a loopback port for a fake backend's lifetime: a socket with SO_REUSEADDR, bound
/// to 127.0.0.1:0 and never listening. It receives no connections (connects are refused
/// while no listener shares the port), but it keeps the kernel from handing the port to
/// anyone else in between listeners: port-0 binds and connect()'s ephemeral ports skip a
/// port held by bind(). So [`TaggedBackend::set_refusing`] can always listen again on the
/// same port, even while other tests open thousands of connections.
pub(super) fn port_guard() -> io::Result<(Socket, SocketAddr)> {
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

/// The accept loop and bookkeeping shared by the thread-per-connection fake backends, which
/// deref to it for their address and connection counts.
pub struct Server {
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
    pub(super) fn start(handler: Handler) -> Server {
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

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    /// Connections open now (accepted and not yet closed by either side).
    pub fn open(&self) -> usize {
        self.open.load(SeqCst)
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
pub(super) fn backend_read(
    stream: &mut TcpStream,
    buf: &mut [u8],
    ctx: &ConnCtx,
) -> io::Result<usize> {
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
pub(super) fn echo_loop(mut stream: TcpStream, ctx: &ConnCtx) {
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

/// `EchoBackend::addr()`, `accepted()`, `open()` and the waits for them are [`Server`]'s.
macro_rules! deref_to_server {
    ($($backend:ty),*) => {$(
        impl Deref for $backend {
            type Target = Server;
            fn deref(&self) -> &Server {
                &self.server
            }
        }
    )*};
}

deref_to_server!(EchoBackend, TaggedBackend, SilentBackend, ResetBackend);

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
}

/// A listener on `bind` (port 0) with backlog 0 that never accepts, its accept queue
/// pre-filled so that connects to it hang: Linux drops a SYN when the listener's accept queue
/// is full; the client retransmits and its connect never completes. Returns the listener, the
/// fillers (drop them and the queue has room again) and the address to connect to (on
/// 127.0.0.1 when `bind` is the unspecified address, which every 127.x.y.z reaches).
/// Verifies that a connect really hangs.
pub fn hung_listener(bind: SocketAddr) -> (Socket, Vec<Socket>, SocketAddr) {
    let tcp = || Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP));
    let listener = tcp().expect("hung listener socket");
    listener
        .bind(&SockAddr::from(bind))
        .unwrap_or_else(|e| panic!("bind a hung listener on {bind}: {e}"));
    listener.listen(0).expect("listen with backlog 0");
    let mut addr = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("hung listener address");
    if addr.ip().is_unspecified() {
        addr.set_ip(localhost0().ip());
    }
    let mut fillers = Vec::new();
    for _ in 0..8 {
        // Backlog 0 still queues one connection; each filler takes a queue place (or sits in
        // SYN-SENT once the queue is full).
        let f = tcp().expect("filler socket");
        f.set_nonblocking(true).expect("non-blocking filler");
        let _ = f.connect(&SockAddr::from(addr)); // EINPROGRESS
        fillers.push(f);
        if fillers.len() < 2 {
            continue;
        }
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            && e.kind() == io::ErrorKind::TimedOut
        {
            return (listener, fillers, addr);
        }
        // Still room in the queue: add another filler.
    }
    panic!("could not make connects to {addr} hang by filling its accept queue");
}

/// A backend whose connects hang: a [`hung_listener`]. Used to exercise the connect timeout.
pub struct BlackholeBackend {
    _listener: Socket,
    _fillers: Vec<Socket>,
    addr: SocketAddr,
}

impl BlackholeBackend {
    /// On 127.0.0.1.
    pub fn start() -> BlackholeBackend {
        BlackholeBackend::start_on(localhost0())
    }

    /// On `bind` (port 0). On 0.0.0.0:0, connects to the port hang on every 127.x.y.z, so one
    /// blackhole serves as any number of backends that never answer.
    pub fn start_on(bind: SocketAddr) -> BlackholeBackend {
        let (listener, fillers, addr) = hung_listener(bind);
        BlackholeBackend {
            _listener: listener,
            _fillers: fillers,
            addr,
        }
    }

    /// The address to connect to (on 127.0.0.1 for a blackhole on 0.0.0.0).
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

/// A backend that runs `handle` on every connection it accepts, each on a thread of its own
/// (blocking, no Nagle delay, read and write timeouts of [`IO_TIMEOUT`]), until dropped: then
/// its listener closes. A connection's thread ends when its handler returns.
pub struct ScriptedBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedBackend {
    /// On a new listener on 127.0.0.1.
    pub fn start(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> ScriptedBackend {
        let listener = TcpListener::bind(localhost0()).expect("bind scripted backend");
        ScriptedBackend::serve(listener, handle)
    }

    /// On `listener`, which may have connections waiting already.
    pub fn serve(
        listener: TcpListener,
        handle: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> ScriptedBackend {
        let addr = listener.local_addr().expect("scripted backend address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(handle);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_nodelay(true);
                            set_timeouts(&stream);
                            let handle = Arc::clone(&handle);
                            std::thread::spawn(move || handle(stream));
                        }
                        // Nothing to accept: a short nap, then a look at `stop` again.
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        ScriptedBackend {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
