//! Plumbing shared by every mode: socket setup, source-address rotation,
//! the open-file budget, histograms, error tallies, signals and output.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

/// Events fetched per `epoll_wait`. Large enough that a busy loop rarely
/// needs a second syscall to see everything that became ready.
pub const EVENTS_CAPACITY: usize = 1024;

/// How many reads or writes one connection may do per readiness event
/// before yielding to the others. With edge-triggered readiness a
/// connection that stops early must be revisited by hand (see the
/// `again` lists in the modes), otherwise one fast peer could starve the
/// rest of the loop.
pub const IO_BUDGET: usize = 16;

/// File descriptors a run needs besides its connections: stdio, one epoll
/// instance per thread, the listener, and slack for whatever the runtime
/// or a report file opens.
const FD_OVERHEAD: usize = 32;

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

/// Creates a non-blocking TCP socket for `target`, with TCP_NODELAY (every
/// mode cares about latency of small writes), optionally bound to a
/// source address and optionally set to close with RST (SO_LINGER 0).
///
/// Binding to `source` with port 0 lets the kernel pick a port from that
/// address's own ephemeral range, so K source addresses give K times the
/// ports: that is what lets thousands of connections (and the TIME_WAIT
/// sockets left by short ones) coexist against a single target.
pub fn new_socket(
    target: SocketAddr,
    source: Option<IpAddr>,
    linger_zero: bool,
) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // socket2 sets close-on-exec itself; SOCK_NONBLOCK at creation is Linux-only.
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if linger_zero {
        socket.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(socket)
}

/// Starts a non-blocking connect and hands the socket over to mio. The
/// connect usually returns EINPROGRESS; completion is then signalled by a
/// writable event and checked with [`connect_outcome`].
pub fn start_connect(socket: Socket, target: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&target.into()) {
        Ok(()) => {}
        // The only errno constant we need from libc; std keeps
        // `ErrorKind::InProgress` unstable.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Convenience: [`new_socket`] + [`start_connect`].
pub fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    linger_zero: bool,
) -> io::Result<TcpStream> {
    start_connect(new_socket(target, source, linger_zero)?, target)
}

/// Result of a non-blocking connect after a readiness event:
/// `Some(Ok)` established, `Some(Err)` failed, `None` still in progress
/// (a spurious wakeup). This is the check mio documents for `connect`.
///
/// The library's worker and health probe use the same recipe, privately.
/// This binary uses nothing of the library (it measures any TCP balancer),
/// and ten lines are not worth a public library API of their own.
pub fn connect_outcome(stream: &TcpStream) -> Option<io::Result<()>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Some(Err(e)),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
        Err(e) => Some(Err(e)),
    }
}

/// Rotating list of loopback source addresses 127.0.0.2, 127.0.0.3, ...
///
/// Only used when the target itself is on 127.0.0.0/8: every such address
/// is routable to any other loopback address without configuration, while
/// binding to them for a remote target would fail.
#[derive(Clone, Debug)]
pub struct SourceIps {
    ips: Vec<IpAddr>,
    next: usize,
}

impl SourceIps {
    /// Largest `--source-ips` value: 127.0.0.2 ..= 127.0.0.254.
    pub const MAX: usize = 253;

    /// `count` addresses starting at 127.0.0.2 when `target` is IPv4
    /// loopback, none otherwise. `start` staggers threads so they do not
    /// all begin on the same address.
    pub fn for_target(target: SocketAddr, count: usize, start: usize) -> Self {
        let ips: Vec<IpAddr> = match target.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => (0..count.min(Self::MAX))
                .filter_map(|i| u8::try_from(i + 2).ok())
                .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
                .collect(),
            _ => Vec::new(),
        };
        let next = if ips.is_empty() { 0 } else { start % ips.len() };
        SourceIps { ips, next }
    }

    /// The next address to bind to, or `None` to let the kernel choose.
    pub fn next_ip(&mut self) -> Option<IpAddr> {
        let ip = *self.ips.get(self.next)?;
        self.next = (self.next + 1) % self.ips.len();
        Some(ip)
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }
}

// ---------------------------------------------------------------------------
// Limits and work splitting
// ---------------------------------------------------------------------------

/// Soft RLIMIT_NOFILE, read from /proc so no `unsafe` getrlimit is needed.
/// `None` when unlimited or unreadable.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// Refuses a run whose connections cannot fit under the open-file limit,
/// instead of discovering it halfway through as a pile of EMFILE errors.
pub fn check_fd_budget(flag: &str, conns: usize, threads: usize) -> Result<(), String> {
    let needed = conns.saturating_add(FD_OVERHEAD + 2 * threads);
    match open_file_limit() {
        Some(limit) if needed as u64 > limit => Err(format!(
            "{flag} {conns} needs about {needed} file descriptors but the open-file limit is {limit}"
        )),
        _ => Ok(()),
    }
}

/// Runs `work(t)` for t in 0..threads, each on a scoped thread named `{name}-{t}`, calls
/// `between` once every thread has started (a mode's own synchronisation: announcing, gating
/// the start), and returns each thread's result in order. If a thread cannot be started,
/// `abandon` releases the ones already waiting on a gate before the error is returned.
pub fn run_threads<T: Send, E: Send + std::fmt::Display>(
    name: &str,
    threads: usize,
    abandon: impl FnOnce(),
    between: impl FnOnce(),
    work: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<T>, String> {
    std::thread::scope(|s| {
        let work = &work;
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{t}"))
                .spawn_scoped(s, move || work(t));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    abandon();
                    return Err(format!("cannot start worker thread: {e}"));
                }
            }
        }
        between();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(format!("event loop failed: {e}")),
                Err(_) => Err("worker thread panicked".to_owned()),
            })
            .collect()
    })
}

/// Size of part `index` when `total` is split as evenly as possible into
/// `parts` (the first `total % parts` parts get one more).
pub fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

/// Threads actually worth starting: never more than there are units of
/// work, never zero.
pub fn effective_threads(threads: usize, work: usize) -> usize {
    threads.min(work).max(1)
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// A histogram of nanoseconds from 1 ns to one hour at 3 significant
/// digits (~0.1% error), allocated once per thread and merged at the end.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration; values past the top are clamped instead of lost.
pub fn record(hist: &mut Histogram<u64>, d: Duration) {
    hist.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
}

/// Adds `from` into `into`. Both come from [`new_histogram`], so the only
/// possible failure (incompatible bounds) cannot happen; fall back to
/// value-by-value recording anyway rather than panic.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// Summary of a nanosecond histogram, reported in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn from_ns(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| round1(ns as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            min: us(h.min()),
            mean: round1(h.mean() / 1000.0),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }

    /// One-line rendering for the plain-text summaries.
    pub fn text(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (us)",
            self.p50, self.p90, self.p99, self.p99_9, self.max
        )
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Per-reason failure counts ("ConnectionRefused": 12, "timeout": 3, ...),
/// so a report says why, not just how many.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(transparent)]
pub struct ErrorCounts(BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, reason: &str) {
        self.add_n(reason, 1);
    }

    pub fn add_n(&mut self, reason: &str, n: u64) {
        if n == 0 {
            return;
        }
        match self.0.get_mut(reason) {
            Some(count) => *count += n,
            None => {
                self.0.insert(reason.to_owned(), n);
            }
        }
    }

    pub fn add_io(&mut self, e: &io::Error) {
        self.add(&io_reason(e));
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (reason, n) in &other.0 {
            self.add_n(reason, *n);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn text(&self) -> String {
        if self.0.is_empty() {
            return "none".to_owned();
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(", ")
    }
}

/// Short, stable name for an I/O error: the `ErrorKind` when std knows
/// one, otherwise the raw errno.
pub fn io_reason(e: &io::Error) -> String {
    // `ErrorKind::Uncategorized` cannot be named on stable, hence the string.
    let kind = format!("{:?}", e.kind());
    match e.raw_os_error() {
        Some(code) if kind == "Uncategorized" || kind == "Other" => format!("os_error_{code}"),
        _ => kind,
    }
}

/// True for errors that only mean "try again later".
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

// ---------------------------------------------------------------------------
// Signals and output
// ---------------------------------------------------------------------------

/// A flag set by SIGINT/SIGTERM. Loops poll it (their poll timeouts are
/// bounded) and wind down cleanly, so an interrupted run still prints its
/// summary. A second signal exits at once.
pub fn stop_flag() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Order matters: the conditional exit must be registered first so
        // that the first signal only arms it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

pub fn stopped(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Relaxed)
}

/// What every mode's summary provides.
pub trait Report: Serialize {
    /// Plain-text summary (may span several lines).
    fn text(&self) -> String;
    /// False when nothing at all succeeded (the target never answered);
    /// the process then exits with status 1 after printing the report.
    fn ok(&self) -> bool;
}

/// Prints the report (plain text, or one JSON object with `--json`) and
/// picks the exit status.
pub fn emit<R: Report>(report: &R, json: bool) -> ExitCode {
    let out = if json {
        match serde_json::to_string(report) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot serialise report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        report.text()
    };
    let mut stdout = io::stdout().lock();
    // A closed stdout (e.g. `| head`) is not worth a panic.
    let _ = writeln!(stdout, "{out}");
    let _ = stdout.flush();
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints a readiness line (`listening on ...`, `holding N`) and flushes so
/// a script blocked on it wakes immediately. With `--json` it goes to
/// stderr, keeping stdout a single JSON object.
pub fn announce(line: &str, json: bool) {
    if json {
        let mut err = io::stderr().lock();
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    } else {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Bits per second expressed in Gbit/s, three decimals.
pub fn gbit_per_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    round3(bytes as f64 * 8.0 / secs / 1e9)
}

/// `Duration` as seconds for reports.
pub fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}

/// `Duration` as milliseconds for reports.
pub fn millis(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------
// Thread coordination and bulk connects
// ---------------------------------------------------------------------------

/// A start line for worker threads: everybody connects first, then all
/// start measuring together. Unlike `std::sync::Barrier` it can be
/// abandoned, so a thread that failed to spawn cannot leave the others
/// waiting forever.
pub struct Gate {
    arrived: AtomicUsize,
    parties: usize,
    abandoned: AtomicBool,
}

impl Gate {
    pub fn new(parties: usize) -> Self {
        Gate {
            arrived: AtomicUsize::new(0),
            parties,
            abandoned: AtomicBool::new(false),
        }
    }

    /// A new `Poll` for a worker that will wait at this gate; if it cannot be made, the gate
    /// is abandoned first so the other workers do not wait for this one.
    pub fn poll(&self) -> io::Result<Poll> {
        Poll::new().inspect_err(|_| self.abandon())
    }

    /// Blocks until all parties arrived (true) or the gate was abandoned
    /// or `stop` was set (false). Waiting is a short sleep loop: it runs
    /// once per run, before any measurement, so its cost is irrelevant.
    pub fn wait(&self, stop: &AtomicBool) -> bool {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        loop {
            if self.abandoned.load(Ordering::SeqCst) || stopped(stop) {
                return false;
            }
            if self.arrived.load(Ordering::SeqCst) >= self.parties {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }
}

/// Opens `n` connections at once and waits until each one is established
/// or has failed (or `timeout` passes). Stream `i` stays registered with
/// `Token(i)` for both directions; failed slots are `None` and their
/// reasons are tallied in the returned counts.
pub fn connect_all(
    poll: &mut Poll,
    events: &mut Events,
    target: SocketAddr,
    n: usize,
    sources: &mut SourceIps,
    timeout: Duration,
    stop: &AtomicBool,
) -> io::Result<(Vec<Option<TcpStream>>, ErrorCounts)> {
    let mut errors = ErrorCounts::default();
    let mut streams: Vec<Option<TcpStream>> = Vec::with_capacity(n);
    let mut resolved = vec![false; n];
    let mut pending = 0usize;
    for (i, done) in resolved.iter_mut().enumerate() {
        let opened = connect(target, sources.next_ip(), false).and_then(|mut s| {
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        match opened {
            Ok(s) => {
                streams.push(Some(s));
                pending += 1;
            }
            Err(e) => {
                errors.add_io(&e);
                streams.push(None);
                *done = true;
            }
        }
    }
    let deadline = Instant::now() + timeout;
    while pending > 0 && !stopped(stop) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match poll.poll(
            events,
            Some((deadline - now).min(Duration::from_millis(100))),
        ) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            if resolved.get(i) != Some(&false) {
                continue;
            }
            let Some(stream) = streams.get(i).and_then(Option::as_ref) else {
                continue;
            };
            match connect_outcome(stream) {
                None => continue,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    errors.add_io(&e);
                    streams[i] = None;
                }
            }
            resolved[i] = true;
            pending -= 1;
        }
    }
    for (i, done) in resolved.iter().enumerate() {
        if !done {
            errors.add("connect_timeout");
            streams[i] = None;
        }
    }
    Ok((streams, errors))
}
