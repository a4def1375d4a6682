//! `echo-server`: an efficient echo backend.
//!
//! Each worker thread owns a listener (SO_REUSEPORT when there are several,
//! so the kernel spreads new connections across threads without a shared
//! accept lock) and a mio event loop. Connections are registered
//! edge-triggered for both directions. On every event a connection first
//! flushes whatever a previous short write left behind, then reads and
//! writes back until the socket says WouldBlock. Bytes that could not be
//! written go into a per-connection pending buffer that exists only while
//! the peer is slower than we are; while it is non-empty we stop reading,
//! so a client that does not read its echo is throttled by TCP flow control
//! instead of growing our memory.
//!
//! The main thread samples the accept counter once per second, keeps the
//! last 60 samples and, with `--report-file`, rewrites a small JSON file
//! that `storm` reads to learn each backend's peak accept rate.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::common::{
    EVENTS_CAPACITY, IO_BUDGET, Report, announce, interrupted, secs, stopped, would_block,
};

/// Size of each worker's read buffer. Big reads mean few syscalls when
/// echoing bulk traffic; the buffer is shared by all of the worker's
/// connections, so it costs nothing per connection.
const READ_BUF: usize = 256 * 1024;

/// Token of the worker's listener; a connection's token is its slab key.
const LISTENER: Token = Token(usize::MAX);

/// After EMFILE/ENFILE the pending connection stays in the backlog and no
/// new edge will arrive for it, so accept is retried on this period.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Samples kept for the report file (one per second).
const HISTORY: usize = 60;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub listen: SocketAddr,
    /// Rewrite this JSON file every second with accept statistics
    /// (read by `storm --report-files`).
    #[arg(long, value_name = "PATH")]
    pub report_file: Option<PathBuf>,
    /// Listen backlog (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(i32).range(1..=65535))]
    pub backlog: i32,
    /// A line sent to every client on accept, before echoing (server speaks first).
    #[arg(long, value_name = "TEXT")]
    pub banner: Option<String>,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
    /// `--json`, filled in from the global flag.
    #[arg(skip)]
    pub json: bool,
}

/// Counters shared between the workers and the sampling thread.
#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    closed: AtomicU64,
    accept_errors: AtomicU64,
    bytes: AtomicU64,
}

/// Contents of `--report-file`; `storm` deserialises the same struct.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ReportFile {
    pub accepted_total: u64,
    pub active: u64,
    pub peak_accepts_per_sec: u64,
    /// Accepts in each of the last (up to) 60 one-second windows, oldest
    /// first; the last window ends at `updated_unix_ms`.
    pub accepts_per_sec: Vec<u64>,
    #[serde(default)]
    pub updated_unix_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct EchoReport {
    pub mode: &'static str,
    pub listen: String,
    pub threads: usize,
    pub uptime_s: f64,
    pub accepted_total: u64,
    pub active: u64,
    pub peak_accepts_per_sec: u64,
    pub accept_errors: u64,
    pub bytes_echoed: u64,
}

impl Report for EchoReport {
    fn text(&self) -> String {
        format!(
            "echo-server {}: up {:.1}s, accepted {} connections ({} still open), peak {} accepts/s, \
             {} accept errors, echoed {} bytes",
            self.listen,
            self.uptime_s,
            self.accepted_total,
            self.active,
            self.peak_accepts_per_sec,
            self.accept_errors,
            self.bytes_echoed
        )
    }

    fn ok(&self) -> bool {
        true
    }
}

/// Runs until `stop` is set (SIGINT/SIGTERM), then returns the summary.
pub fn run(args: &Args, stop: &AtomicBool) -> Result<EchoReport, String> {
    let reuse_port = args.threads > 1;
    let first = bind_listener(args.listen, args.backlog, reuse_port)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    // With port 0 the first bind picks the port; the other threads' listeners
    // join the same concrete port through SO_REUSEPORT.
    let local = first
        .local_addr()
        .map_err(|e| format!("cannot read local address: {e}"))?;
    let mut listeners = vec![first];
    for _ in 1..args.threads {
        listeners.push(
            bind_listener(local, args.backlog, true)
                .map_err(|e| format!("cannot listen on {local}: {e}"))?,
        );
    }

    let stats = Arc::new(Stats::default());
    for (i, listener) in listeners.into_iter().enumerate() {
        let stats = Arc::clone(&stats);
        // The banner line, so a client can tell which backend it reached (empty: none).
        let banner = args
            .banner
            .as_ref()
            .map(|b| format!("{b}\n").into_bytes())
            .unwrap_or_default();
        thread::Builder::new()
            .name(format!("echo-{i}"))
            .spawn(move || {
                if let Err(e) = worker(listener, &stats, &banner) {
                    eprintln!("warning: echo worker {i} stopped: {e}");
                }
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
    }

    announce(&format!("listening on {local}"), args.json);

    // Sampling loop. Ticks are anchored to `start` so they do not drift; the
    // 50 ms sleep granularity keeps signal response prompt.
    let start = Instant::now();
    let mut history: VecDeque<u64> = VecDeque::with_capacity(HISTORY);
    let mut peak = 0;
    let mut last_total = 0;
    let mut tick: u32 = 1;
    let mut warned = false;
    while !stopped(stop) {
        let due = start + Duration::from_secs(u64::from(tick));
        let now = Instant::now();
        if now < due {
            thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        tick = tick.saturating_add(1);
        let total = stats.accepted.load(Ordering::Relaxed);
        let delta = total - last_total;
        last_total = total;
        peak = peak.max(delta);
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(delta);
        if let Some(path) = &args.report_file {
            let file = ReportFile {
                accepted_total: total,
                active: total.saturating_sub(stats.closed.load(Ordering::Relaxed)),
                peak_accepts_per_sec: peak,
                accepts_per_sec: history.iter().copied().collect(),
                updated_unix_ms: unix_ms(),
            };
            if let Err(e) = write_report_file(path, &file) {
                // Warn once; the server itself keeps working.
                if !warned {
                    eprintln!("warning: cannot write {}: {e}", path.display());
                    warned = true;
                }
            }
        }
    }

    let accepted = stats.accepted.load(Ordering::Relaxed);
    Ok(EchoReport {
        mode: "echo-server",
        listen: local.to_string(),
        threads: args.threads,
        uptime_s: secs(start.elapsed()),
        accepted_total: accepted,
        active: accepted.saturating_sub(stats.closed.load(Ordering::Relaxed)),
        peak_accepts_per_sec: peak,
        accept_errors: stats.accept_errors.load(Ordering::Relaxed),
        bytes_echoed: stats.bytes.load(Ordering::Relaxed),
    })
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes to a temporary file and renames it over `path`, so a reader never
/// sees a half-written JSON document.
fn write_report_file(path: &Path, file: &ReportFile) -> io::Result<()> {
    let json = serde_json::to_vec(file).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

fn bind_listener(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // socket2 sets close-on-exec itself; SOCK_NONBLOCK at creation is Linux-only.
    socket.set_nonblocking(true)?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    // mio's own `bind` uses a backlog of 1024; storms need more (the kernel
    // still caps it at net.core.somaxconn).
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

struct Conn {
    stream: TcpStream,
    /// Echo bytes the socket did not take yet. Empty (no allocation) except
    /// while the peer is not reading fast enough.
    pending: Vec<u8>,
    pending_off: usize,
}

enum Next {
    /// Everything drained to WouldBlock; wait for the next edge.
    Wait,
    /// The I/O budget ran out with work possibly left: revisit soon.
    Again,
    Close,
}

impl Conn {
    /// Flushes pending bytes, then echoes until WouldBlock or the budget
    /// runs out. Adds the bytes written to `echoed`.
    fn drive(&mut self, buf: &mut [u8], echoed: &mut u64) -> Next {
        // 1. Leftovers first. While they cannot go out we do not read at all:
        //    that is the backpressure.
        while self.pending_off < self.pending.len() {
            match self.stream.write(&self.pending[self.pending_off..]) {
                Ok(0) => return Next::Close,
                Ok(n) => {
                    self.pending_off += n;
                    *echoed += n as u64;
                }
                Err(e) if would_block(&e) => return Next::Wait,
                Err(e) if interrupted(&e) => {}
                Err(_) => return Next::Close,
            }
        }
        if !self.pending.is_empty() {
            // Caught up: give the memory back, it is only needed while slow.
            self.pending = Vec::new();
            self.pending_off = 0;
        }

        // 2. Read and echo straight from the shared buffer.
        for _ in 0..IO_BUDGET {
            let n = match self.stream.read(buf) {
                // EOF: everything the peer sent has been echoed (nothing is
                // pending here), so we are done.
                Ok(0) => return Next::Close,
                Ok(n) => n,
                Err(e) if would_block(&e) => return Next::Wait,
                Err(e) if interrupted(&e) => continue,
                Err(_) => return Next::Close,
            };
            let mut off = 0;
            while off < n {
                match self.stream.write(&buf[off..n]) {
                    Ok(0) => return Next::Close,
                    Ok(w) => off += w,
                    Err(e) if would_block(&e) => break,
                    Err(e) if interrupted(&e) => {}
                    Err(_) => return Next::Close,
                }
            }
            *echoed += off as u64;
            if off < n {
                // Send buffer full: park the rest and stop reading until a
                // writable edge lets us flush it.
                self.pending.extend_from_slice(&buf[off..n]);
                return Next::Wait;
            }
        }
        Next::Again
    }
}

fn worker(mut listener: TcpListener, stats: &Stats, banner: &[u8]) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Slab<Conn> = Slab::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut again: Vec<usize> = Vec::new();
    let mut again_next: Vec<usize> = Vec::new();
    let mut accept_blocked = false;

    loop {
        let timeout = if !again.is_empty() {
            Some(Duration::ZERO)
        } else if accept_blocked {
            Some(ACCEPT_RETRY)
        } else {
            None
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(e),
        }
        if accept_blocked {
            accept_blocked = accept_all(&listener, &poll, &mut conns, stats, banner);
        }
        let mut echoed = 0;
        // Connections that used up their budget last round go first.
        std::mem::swap(&mut again, &mut again_next);
        again.clear();
        let revisits = again_next.drain(..);
        let tokens = revisits.chain(events.iter().map(|ev| ev.token().0));
        for token in tokens {
            if token == LISTENER.0 {
                accept_blocked = accept_all(&listener, &poll, &mut conns, stats, banner);
                continue;
            }
            let Some(conn) = conns.get_mut(token) else {
                continue;
            };
            match conn.drive(&mut buf, &mut echoed) {
                Next::Wait => {}
                Next::Again => again.push(token),
                Next::Close => {
                    if let Some(mut conn) = conns.try_remove(token) {
                        let _ = poll.registry().deregister(&mut conn.stream);
                    }
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // A token may sit in `again` and also have been closed later in the
        // same round; `conns.get_mut` skips it next time. Duplicates are
        // harmless (the second visit just sees WouldBlock).
        if echoed > 0 {
            stats.bytes.fetch_add(echoed, Ordering::Relaxed);
        }
    }
}

/// Accepts until WouldBlock. Returns true when accepting had to stop on a
/// resource error (EMFILE and friends) and must be retried by timer.
fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Slab<Conn>,
    stats: &Stats,
    banner: &[u8],
) -> bool {
    loop {
        match listener.accept() {
            Ok((mut stream, _peer)) => {
                // Echo replies are small and latency-sensitive.
                let _ = stream.set_nodelay(true);
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                // Registered under the key the connection is about to get. Registration is
                // edge-triggered but reports the current state, so data that already
                // arrived still produces an event.
                let entry = conns.vacant_entry();
                let registered = poll.registry().register(
                    &mut stream,
                    Token(entry.key()),
                    Interest::READABLE | Interest::WRITABLE,
                );
                if registered.is_err() {
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // The banner starts out as pending bytes: the first writable edge sends it.
                entry.insert(Conn {
                    stream,
                    pending: banner.to_vec(),
                    pending_off: 0,
                });
            }
            Err(e) if would_block(&e) => return false,
            // The peer gave up before we accepted: nothing to do.
            Err(e) if interrupted(&e) || e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(_) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
    }
}
