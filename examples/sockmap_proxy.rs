//! A minimal TCP proxy that relays through the kernel (issue #16): a **benchmark instrument,
//! not a holdfast feature**. It exists so that the same clients (`holdfast-load`) measure the
//! in-kernel relay exactly as they measure holdfast and HAProxy (`scripts/bench-vs-haproxy.sh
//! --with-sockmap`, `scripts/splice-threshold.sh --with-sockmap`). holdfast has no
//! `--relay sockmap`; see docs/sockmap.md for why.
//!
//! ```text
//! cargo build --release --example sockmap_proxy
//! target/release/examples/sockmap_proxy --listen 127.0.0.1:0 --backend 127.0.0.1:6379
//!     [--attach stream|verdict] [--max-pairs N]
//! ```
//! Needs CAP_BPF and CAP_NET_ADMIN (root). One thread, one mio loop. Per client:
//! 1. accept (nonblocking) and connect to the backend (nonblocking; wait until writable);
//! 2. the switch: read both sockets dry in user space and write what was read to the other
//!    side (waiting for writability if need be), and only when nothing is pending and both
//!    reads said `EAGAIN`, insert the pair into the sockhash; then `relay_queued` on both
//!    (bytes that slipped in between the last read and the insertion are relayed at once
//!    instead of waiting for the next bytes) and a last `SIOCINQ` look, forwarding anything
//!    that the kernel left to user space;
//! 3. from then on the kernel relays the bytes; the proxy is woken only for a FIN, a reset or
//!    an error. On a FIN from one side it waits until every byte from that side is in the
//!    peer's send queue (`TCP_INFO`/`SIOCOUTQ` counts: the kernel's relay queue has no other
//!    signal, so this is polled every millisecond) and then `shutdown(peer, SHUT_WR)`; when
//!    both directions are shut it removes the pair and closes both; on a reset or an error it
//!    removes the pair and resets the other side too.
//!
//! If a pair cannot be inserted (map full, kernel refusal) that session is relayed in user
//! space by the same code that does the switch (read, write, backpressure), and counted.
//! It prints one line on stderr when ready (`sockmap_proxy listening on ADDR ...`) and its
//! counters on SIGTERM/SIGINT.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::sockmap::{
    Attach, DEFAULT_MAX_PAIRS, PairHandle, SockRelay, relay_queued, stream_counts, unread_bytes,
};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// At most this much is held in user space per direction before reading that side stops.
const PENDING_MAX: usize = 256 * 1024;
/// How often a FIN waiting for the kernel's relay queue to empty looks again.
const DRAIN_TICK: Duration = Duration::from_millis(1);
/// A FIN that cannot be passed on after this long (the kernel never relayed the bytes ahead
/// of it) ends the session with resets, counted as `drain_timeouts`.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// What the proxy did, printed at exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub backend_failed: u64,
    pub inserted: u64,
    /// Refused by the kernel (map full; a FIN arrived just before the insertion: the
    /// socket is no longer ESTABLISHED): relayed in user space.
    pub insert_failed: u64,
    /// A side sent its FIN before the switch was done: relayed in user space.
    pub ended_in_switch: u64,
    /// Bytes user space moved during the switch, before the insertion.
    pub switch_bytes: u64,
    /// Bytes user space moved after the insertion (left to it by the kernel, or a session
    /// whose insertion failed).
    pub late_bytes: u64,
    pub fins_passed: u64,
    /// FINs that had to wait for the kernel's relay queue before being passed on.
    pub fin_waits: u64,
    pub drain_timeouts: u64,
    /// `EPIPE` reported on a socket after its peer's FIN went through the relay.
    pub fin_epipes: u64,
    pub resets: u64,
    pub closed: u64,
    pub peak_sessions: u64,
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted={} backend_failed={} inserted={} insert_failed={} ended_in_switch={} switch_bytes={} \
             late_bytes={} fins_passed={} fin_waits={} drain_timeouts={} fin_epipes={} resets={} closed={} \
             peak_sessions={}",
            self.accepted,
            self.backend_failed,
            self.inserted,
            self.insert_failed,
            self.ended_in_switch,
            self.switch_bytes,
            self.late_bytes,
            self.fins_passed,
            self.fin_waits,
            self.drain_timeouts,
            self.fin_epipes,
            self.resets,
            self.closed,
            self.peak_sessions
        )
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub attach: Attach,
    pub max_pairs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The backend connection is under way.
    Connecting,
    /// Both connected; user space moves bytes until it can insert the pair.
    Switching,
    /// In the sockhash (or, with `None`, relayed in user space after a failed insertion).
    Relayed(Option<PairHandle>),
}

/// One client session: side 0 is the client's socket, side 1 the backend's. Direction `d`
/// carries bytes from side `d` to side `1 - d`.
struct Session {
    socks: [TcpStream; 2],
    interest: [Interest; 2],
    state: State,
    pending: [Vec<u8>; 2],
    /// Side `d` said EOF (its FIN arrived).
    eof: [bool; 2],
    /// `shutdown(Write)` done on side `1 - d` for direction `d`.
    shut: [bool; 2],
    /// `written` of each side when the backend connected, before anything was written to it.
    base_written: [u64; 2],
    /// Bytes user space wrote to each side (during the switch, or later).
    user_written: [u64; 2],
    /// Since when direction `d`'s FIN waits for the kernel's queue, if it does.
    draining: [Option<Instant>; 2],
}

pub struct Proxy {
    poll: Poll,
    listener: TcpListener,
    backend: SocketAddr,
    relay: SockRelay,
    sessions: HashMap<usize, Session>,
    /// Sessions with a FIN waiting for the kernel's relay queue.
    waiting: HashSet<usize>,
    next: usize,
    waker: Arc<Waker>,
    buf: Vec<u8>,
    pub counters: Counters,
    insert_error_said: bool,
}

fn token(id: usize, side: usize) -> Token {
    Token(id * 2 + side)
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl Proxy {
    /// Loads the relay (fails without privilege) and binds the listener.
    pub fn bind(cfg: &Config) -> io::Result<Proxy> {
        let relay = SockRelay::with(cfg.attach, cfg.max_pairs)?;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(cfg.listen),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        sock.bind(&cfg.listen.into())?;
        sock.listen(4096)?;
        sock.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(std::net::TcpListener::from(sock));
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Proxy {
            poll,
            listener,
            backend: cfg.backend,
            relay,
            sessions: HashMap::new(),
            waiting: HashSet::new(),
            next: 0,
            waker,
            buf: vec![0u8; 64 * 1024],
            counters: Counters::default(),
            insert_error_said: false,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waking this ends [`Proxy::run`].
    pub fn stopper(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Serves until the stopper is woken; then closes every session and returns the counters.
    pub fn run(&mut self) -> io::Result<Counters> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = (!self.waiting.is_empty()).then_some(DRAIN_TICK);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                return Err(e);
            }
            let mut touched = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {
                        self.sessions.clear();
                        return Ok(self.counters.clone());
                    }
                    LISTENER => self.accept(),
                    t => touched.push(t.0 / 2),
                }
            }
            // Sessions whose FIN waits for the kernel are looked at on every tick.
            touched.extend(self.waiting.iter().copied());
            touched.sort_unstable();
            touched.dedup();
            for id in touched {
                self.step(id);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let client = match self.listener.accept() {
                Ok((c, _)) => c,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) => {
                    // EMFILE and the like: say so, leave the rest in the backlog.
                    eprintln!("sockmap_proxy: accept: {e}");
                    return;
                }
            };
            self.counters.accepted += 1;
            let backend = match TcpStream::connect(self.backend) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("sockmap_proxy: connecting to {}: {e}", self.backend);
                    self.counters.backend_failed += 1;
                    continue;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = backend.set_nodelay(true);
            let id = self.next;
            self.next += 1;
            let mut s = Session {
                socks: [client, backend],
                interest: [Interest::READABLE, Interest::READABLE | Interest::WRITABLE],
                state: State::Connecting,
                pending: [Vec::new(), Vec::new()],
                eof: [false; 2],
                shut: [false; 2],
                base_written: [0; 2],
                user_written: [0; 2],
                draining: [None; 2],
            };
            let registry = self.poll.registry();
            let ok = registry
                .register(&mut s.socks[0], token(id, 0), s.interest[0])
                .and_then(|()| registry.register(&mut s.socks[1], token(id, 1), s.interest[1]));
            if let Err(e) = ok {
                eprintln!("sockmap_proxy: epoll: {e}");
                continue;
            }
            self.sessions.insert(id, s);
            self.counters.peak_sessions =
                self.counters.peak_sessions.max(self.sessions.len() as u64);
        }
    }

    /// Moves a session on as far as it can go now.
    fn step(&mut self, id: usize) {
        let Some(mut s) = self.sessions.remove(&id) else {
            return;
        };
        match self.advance(&mut s) {
            Ok(true) => match update_interest(self.poll.registry(), id, &mut s) {
                Ok(()) => {
                    if s.draining.iter().any(Option::is_some) {
                        self.waiting.insert(id);
                    } else {
                        self.waiting.remove(&id);
                    }
                    self.sessions.insert(id, s);
                    return;
                }
                Err(e) => {
                    eprintln!("sockmap_proxy: epoll: {e}");
                    self.close(s, true);
                }
            },
            Ok(false) => self.close(s, false),
            Err(_) => self.close(s, true),
        }
        self.waiting.remove(&id);
    }

    /// Ok(true): the session goes on; Ok(false): it is over (both directions shut); Err: it
    /// failed (reset, error) and is to be reset on both sides.
    fn advance(&mut self, s: &mut Session) -> io::Result<bool> {
        if s.state == State::Connecting {
            if let Some(e) = s.socks[1].take_error()? {
                self.counters.backend_failed += 1;
                return Err(e);
            }
            match s.socks[1].peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(true),
                Err(e) => {
                    self.counters.backend_failed += 1;
                    return Err(e);
                }
            }
            s.base_written = [
                stream_counts(&s.socks[0])?.written,
                stream_counts(&s.socks[1])?.written,
            ];
            s.state = State::Switching;
        }
        // Move what user space has to move, in both directions.
        let mut dry = true;
        for d in 0..2 {
            dry &= self.pump(s, d)?;
        }
        if s.state == State::Switching && dry && (s.eof[0] || s.eof[1]) {
            // A side already sent its FIN: the session is ending; finish it in user space
            // (the kernel refuses a socket past ESTABLISHED anyway).
            self.counters.ended_in_switch += 1;
            s.state = State::Relayed(None);
        } else if s.state == State::Switching && dry {
            self.insert(s)?;
            // Anything the kernel left to user space after all (SIOCINQ counts the relay's
            // own queue for user space): move it.
            for d in 0..2 {
                if unread_bytes(&s.socks[d])? > 0 {
                    self.pump(s, d)?;
                }
            }
        }
        for d in 0..2 {
            if s.eof[d] && !s.shut[d] && s.pending[d].is_empty() {
                self.pass_fin(s, d)?;
            }
        }
        Ok(!(s.shut[0] && s.shut[1]))
    }

    fn insert(&mut self, s: &mut Session) -> io::Result<()> {
        match self.relay.insert_pair(&s.socks[0], &s.socks[1]) {
            Ok(h) => {
                self.counters.inserted += 1;
                s.state = State::Relayed(Some(h));
                // Bytes that arrived after the last read and before the insertion.
                relay_queued(&s.socks[0])?;
                relay_queued(&s.socks[1])?;
            }
            Err(e) => {
                if !self.insert_error_said {
                    eprintln!("sockmap_proxy: relaying in user space: {e}");
                    self.insert_error_said = true;
                }
                self.counters.insert_failed += 1;
                s.state = State::Relayed(None);
            }
        }
        Ok(())
    }

    /// Direction `d` in user space: flush what is pending to side `1 - d`, read side `d`
    /// while there is room. Ok(true) when side `d` read dry (EAGAIN or EOF) and nothing is
    /// pending.
    fn pump(&mut self, s: &mut Session, d: usize) -> io::Result<bool> {
        let to = 1 - d;
        loop {
            while !s.pending[d].is_empty() {
                match s.socks[to].write(&s.pending[d]) {
                    Ok(n) => {
                        s.pending[d].drain(..n);
                        s.user_written[to] += n as u64;
                        if s.state == State::Switching {
                            self.counters.switch_bytes += n as u64;
                        } else {
                            self.counters.late_bytes += n as u64;
                        }
                    }
                    Err(e) if would_block(&e) => return Ok(false),
                    Err(e) if interrupted(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if s.eof[d] {
                return Ok(true);
            }
            match s.socks[d].read(&mut self.buf) {
                Ok(0) => {
                    s.eof[d] = true;
                    return Ok(true);
                }
                Ok(n) => {
                    s.pending[d].extend_from_slice(&self.buf[..n]);
                    if s.pending[d].len() >= PENDING_MAX {
                        continue; // flush before reading more
                    }
                }
                Err(e) if would_block(&e) => return Ok(s.pending[d].is_empty()),
                Err(e) if interrupted(&e) => {}
                // Seen when the peer's FIN goes through the relay: the kernel reports EPIPE on
                // this socket once (docs/sockmap.md); the read itself lost nothing. Had the
                // relay into this socket really stopped early, the FIN check below would
                // never see the bytes arrive and the session ends in resets.
                Err(e)
                    if e.raw_os_error() == Some(libc::EPIPE)
                        && matches!(s.state, State::Relayed(Some(_))) =>
                {
                    self.counters.fin_epipes += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Side `d` sent its FIN: once every byte from `d` is in side `1 - d`'s send queue (the
    /// kernel's relay queue has nothing left of it), `shutdown(1 - d, Write)`.
    fn pass_fin(&mut self, s: &mut Session, d: usize) -> io::Result<()> {
        let to = 1 - d;
        if matches!(s.state, State::Relayed(Some(_))) {
            // A FIN can overtake bytes still in the receive queue: have them relayed.
            relay_queued(&s.socks[d])?;
            let from = stream_counts(&s.socks[d])?;
            let into = stream_counts(&s.socks[to])?;
            // `received` counts the FIN (one sequence number); `written` since the backend
            // connected counts what user space and the kernel put into the send queue.
            let arrived = from.received.saturating_sub(1);
            let queued = into.written.saturating_sub(s.base_written[to]);
            if queued < arrived {
                let since = *s.draining[d].get_or_insert_with(|| {
                    self.counters.fin_waits += 1;
                    Instant::now()
                });
                if since.elapsed() > DRAIN_LIMIT {
                    self.counters.drain_timeouts += 1;
                    return Err(io::Error::other(
                        "the kernel never relayed the bytes ahead of a FIN",
                    ));
                }
                return Ok(());
            }
        }
        s.draining[d] = None;
        match s.socks[to].shutdown(Shutdown::Write) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => return Err(e),
        }
        s.shut[d] = true;
        self.counters.fins_passed += 1;
        Ok(())
    }

    fn close(&mut self, s: Session, reset: bool) {
        if let State::Relayed(Some(h)) = s.state {
            let _ = self.relay.remove_pair(h);
        }
        if reset {
            self.counters.resets += 1;
            for sock in &s.socks {
                // SO_LINGER 0: close() sends a reset, as the peer that failed did.
                let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
            }
        } else {
            self.counters.closed += 1;
        }
        drop(s);
    }
}

/// READABLE on both sides always (FIN, reset, bytes left to user space); WRITABLE on the side
/// that has bytes waiting for it, and on the backend while it connects.
fn update_interest(registry: &Registry, id: usize, s: &mut Session) -> io::Result<()> {
    for side in 0..2 {
        let mut want = Interest::READABLE;
        if !s.pending[1 - side].is_empty() || (side == 1 && s.state == State::Connecting) {
            want |= Interest::WRITABLE;
        }
        if want != s.interest[side] {
            registry.reregister(&mut s.socks[side], token(id, side), want)?;
            s.interest[side] = want;
        }
    }
    Ok(())
}

fn parse_args() -> Result<Config, String> {
    let mut listen = None;
    let mut backend = None;
    let mut attach = Attach::StreamVerdict;
    let mut max_pairs = DEFAULT_MAX_PAIRS;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(
                "usage: sockmap_proxy --listen ADDR --backend ADDR [--attach stream|verdict] [--max-pairs N]"
                    .into(),
            );
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let addr = || {
            value
                .parse::<SocketAddr>()
                .map_err(|e| format!("{flag}: {value}: {e}"))
        };
        match flag.as_str() {
            "--listen" => listen = Some(addr()?),
            "--backend" => backend = Some(addr()?),
            "--attach" => {
                attach = match value.as_str() {
                    "stream" => Attach::StreamVerdict,
                    "verdict" => Attach::Verdict,
                    _ => return Err(format!("--attach: stream or verdict, not {value}")),
                }
            }
            "--max-pairs" => {
                max_pairs = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--max-pairs: not a positive number: {value}"))?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(Config {
        listen: listen.ok_or("--listen ADDR is required")?,
        backend: backend.ok_or("--backend ADDR is required")?,
        attach,
        max_pairs,
    })
}

fn main() {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockmap_proxy: {e}");
            std::process::exit(2);
        }
    };
    let mut proxy = match Proxy::bind(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sockmap_proxy: {e}");
            std::process::exit(1);
        }
    };
    let stop = proxy.stopper();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = stop.wake();
                }
            });
        }
        Err(e) => eprintln!("sockmap_proxy: no signal handling: {e}"),
    }
    match proxy.local_addr() {
        Ok(addr) => eprintln!(
            "sockmap_proxy listening on {addr} backend {} attach {:?}",
            cfg.backend, cfg.attach
        ),
        Err(e) => {
            eprintln!("sockmap_proxy: {e}");
            std::process::exit(1);
        }
    }
    match proxy.run() {
        Ok(c) => eprintln!("sockmap_proxy: counters {c}"),
        Err(e) => {
            eprintln!("sockmap_proxy: {e}; counters {}", proxy.counters);
            std::process::exit(1);
        }
    }
}
