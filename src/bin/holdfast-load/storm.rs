//! `storm`: a reconnect storm.
//!
//! All N sockets are created and bound up front (spread over loopback
//! source addresses), the threads line up at a gate, and then every
//! connect() is issued back to back with nothing else in between. Each
//! connection then does a 1-byte round trip. The storm is over when every
//! connection has echoed or failed; connections stay open until then so
//! the target really carries N at the peak.
//!
//! With `--report-files` (written by `echo-server --report-file`), the
//! storm waits for each backend to publish the one-second window in which
//! the storm ended, then reports the busiest second of accepts each
//! backend saw during the storm — how evenly a balancer spread the storm.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use socket2::Socket;

use crate::common::{
    EVENTS_CAPACITY, ErrorCounts, Gate, Percentiles, Report, SourceIps, connect_outcome,
    effective_threads, interrupted, io_reason, merge, millis, new_histogram, new_socket, record,
    run_threads, share, start_connect, stopped, would_block,
};
use crate::echo_server::{ReportFile, unix_ms};

const SCAN_EVERY: Duration = Duration::from_millis(100);

/// Connects issued between two zero-timeout polls during the storm.
const ISSUE_BATCH: usize = 64;

/// How long to wait for a backend to publish the second the storm ended in
/// (it writes once per second).
const REPORT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub target: SocketAddr,
    #[arg(long, value_parser = crate::positive)]
    pub conns: usize,
    /// Comma-separated `echo-server --report-file` paths; each backend's
    /// peak accepts/s during the storm is reported.
    #[arg(long, value_name = "PATH,...", value_delimiter = ',')]
    pub report_files: Vec<PathBuf>,
    #[arg(long, value_name = "K", default_value_t = 16, value_parser = crate::source_ips)]
    pub source_ips: usize,
    /// A connection not established and echoing within this fails.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct Backend {
    pub file: String,
    /// Busiest one-second window of accepts overlapping the storm.
    pub peak_accepts_per_sec: Option<u64>,
    /// Accepts in the windows overlapping the storm.
    pub accepted: Option<u64>,
    /// The file's own all-time peak.
    pub lifetime_peak_accepts_per_sec: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub mode: &'static str,
    pub target: String,
    pub threads: usize,
    pub conns: usize,
    pub source_ips: usize,
    /// Connections that connected and echoed their byte.
    pub connected: u64,
    pub failures: u64,
    pub all_connected: bool,
    pub error_kinds: ErrorCounts,
    /// From the first connect() to the last connection echoing (or failing).
    pub time_to_all_ms: f64,
    /// Time the connect() loop itself took.
    pub issue_ms: f64,
    /// connect() to established, microseconds.
    pub connect_latency_us: Percentiles,
    /// connect() to echoed byte, microseconds.
    pub ready_latency_us: Percentiles,
    pub backends: Vec<Backend>,
}

impl Report for StormReport {
    fn text(&self) -> String {
        let mut s = format!(
            "storm {}: {} conns over {} source IP(s), {} thread(s)\n\
             \x20 connected {}  failures {}  all connected in {} ms (connects issued in {} ms)\n\
             \x20 connect {}\n\
             \x20 ready   {}\n\
             \x20 failure reasons: {}",
            self.target,
            self.conns,
            self.source_ips,
            self.threads,
            self.connected,
            self.failures,
            self.time_to_all_ms,
            self.issue_ms,
            self.connect_latency_us.text(),
            self.ready_latency_us.text(),
            self.error_kinds.text(),
        );
        for b in &self.backends {
            match (&b.error, b.peak_accepts_per_sec, b.accepted) {
                (Some(e), _, _) => s.push_str(&format!("\n  backend {}: {e}", b.file)),
                (None, Some(peak), Some(acc)) => s.push_str(&format!(
                    "\n  backend {}: peak {peak} accepts/s, {acc} accepted during the storm",
                    b.file
                )),
                _ => {}
            }
        }
        s
    }

    fn ok(&self) -> bool {
        self.connected > 0
    }
}

struct Tally {
    connected: u64,
    failures: u64,
    error_kinds: ErrorCounts,
    connect: Histogram<u64>,
    ready: Histogram<u64>,
    start: Option<Instant>,
    issued: Option<Instant>,
    end: Option<Instant>,
    source_ips: usize,
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<StormReport, String> {
    let threads = effective_threads(args.threads, args.conns);
    // The main thread is a party too: it opens the gate, after lining the
    // storm up with the first backend's sampling tick when there is one.
    let gate = Gate::new(threads + 1);
    let mut start_ms = unix_ms();
    let tallies = run_threads(
        "storm",
        threads,
        || gate.abandon(),
        || {
            // Sockets are being created meanwhile; sleeping here costs nothing.
            if let Some(wait) = args.report_files.first().and_then(|p| until_next_window(p)) {
                thread::sleep(wait);
            }
            start_ms = unix_ms();
            gate.wait(stop);
        },
        |t| worker(args, t, threads, &gate, stop),
    )?;
    let end_ms = unix_ms();

    let mut connect = new_histogram();
    let mut ready = new_histogram();
    let mut error_kinds = ErrorCounts::default();
    let (mut connected, mut failures) = (0, 0);
    let (mut start, mut issued, mut end): (Option<Instant>, Option<Instant>, Option<Instant>) =
        (None, None, None);
    let mut source_ips = 0;
    for t in &tallies {
        connected += t.connected;
        failures += t.failures;
        error_kinds.merge(&t.error_kinds);
        merge(&mut connect, &t.connect);
        merge(&mut ready, &t.ready);
        start = earliest(start, t.start);
        issued = latest(issued, t.issued);
        end = latest(end, t.end);
        source_ips = t.source_ips;
    }
    let span = |to: Option<Instant>| match (start, to) {
        (Some(a), Some(b)) => millis(b.saturating_duration_since(a)),
        _ => 0.0,
    };
    let backends = args
        .report_files
        .iter()
        .map(|p| read_backend(p, start_ms, end_ms, stop))
        .collect();
    Ok(StormReport {
        mode: "storm",
        target: args.target.to_string(),
        threads,
        conns: args.conns,
        source_ips,
        connected,
        failures,
        all_connected: connected == args.conns as u64,
        error_kinds,
        time_to_all_ms: span(end),
        issue_ms: span(issued),
        connect_latency_us: Percentiles::from_ns(&connect),
        ready_latency_us: Percentiles::from_ns(&ready),
        backends,
    })
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn latest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Time until just after the backend behind `path` starts a new
/// one-second accept window. Starting the storm there keeps a storm shorter
/// than a second inside one window, so that window's count is the storm's
/// alone instead of being split over two or mixed with earlier traffic.
fn until_next_window(path: &Path) -> Option<Duration> {
    /// Margin for the backend's sampling and file write.
    const AFTER_TICK_MS: u64 = 20;
    let bytes = std::fs::read(path).ok()?;
    let report: ReportFile = serde_json::from_slice(&bytes).ok()?;
    if report.updated_unix_ms == 0 {
        return None;
    }
    let now = unix_ms();
    let since = now.saturating_sub(report.updated_unix_ms) % 1000;
    let wait = (1000 - since + AFTER_TICK_MS) % 1000;
    Some(Duration::from_millis(wait))
}

/// Reads one backend's report file once it covers the end of the storm,
/// and sums/maxes the one-second windows that overlap [start_ms, end_ms].
fn read_backend(path: &Path, start_ms: u64, end_ms: u64, stop: &AtomicBool) -> Backend {
    let mut backend = Backend {
        file: path.display().to_string(),
        peak_accepts_per_sec: None,
        accepted: None,
        lifetime_peak_accepts_per_sec: None,
        error: None,
    };
    let give_up = Instant::now() + REPORT_WAIT;
    let report = loop {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ReportFile>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(r) if r.updated_unix_ms >= end_ms => break Ok(r),
            Ok(_) if Instant::now() < give_up && !stopped(stop) => {}
            Ok(r) => {
                break Err(format!(
                    "report not updated since the storm (last {} ms)",
                    r.updated_unix_ms
                ));
            }
            Err(_) if Instant::now() < give_up && !stopped(stop) => {}
            Err(e) => break Err(e),
        }
        thread::sleep(Duration::from_millis(50));
    };
    match report {
        Ok(r) => {
            let len = r.accepts_per_sec.len() as u64;
            let mut peak = 0;
            let mut sum = 0;
            for (i, &count) in r.accepts_per_sec.iter().enumerate() {
                // Window i ends (len-1-i) seconds before the last update.
                let window_end = r
                    .updated_unix_ms
                    .saturating_sub((len - 1 - i as u64) * 1000);
                let window_start = window_end.saturating_sub(1000);
                if window_end >= start_ms && window_start <= end_ms {
                    peak = peak.max(count);
                    sum += count;
                }
            }
            backend.peak_accepts_per_sec = Some(peak);
            backend.accepted = Some(sum);
            backend.lifetime_peak_accepts_per_sec = Some(r.peak_accepts_per_sec);
        }
        Err(e) => backend.error = Some(e),
    }
    backend
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Echoing,
    Ready,
    Failed,
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    issued: Instant,
    written: bool,
}

fn worker(
    args: &Args,
    index: usize,
    threads: usize,
    gate: &Gate,
    stop: &AtomicBool,
) -> io::Result<Tally> {
    let n = share(args.conns, threads, index);
    let poll = gate.poll()?;
    let mut sources = SourceIps::for_target(args.target, args.source_ips, index);
    let mut tally = Tally {
        connected: 0,
        failures: 0,
        error_kinds: ErrorCounts::default(),
        connect: new_histogram(),
        ready: new_histogram(),
        start: None,
        issued: None,
        end: None,
        source_ips: sources.len(),
    };
    // Everything expensive (socket(), bind(), options) happens before the
    // gate, so the storm itself is nothing but connect() calls.
    let mut sockets: Vec<Socket> = Vec::with_capacity(n);
    for _ in 0..n {
        match new_socket(args.target, sources.next_ip(), false) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                tally.failures += 1;
                tally.error_kinds.add_io(&e);
            }
        }
    }
    let mut w = Worker {
        conns: Vec::with_capacity(sockets.len()),
        poll,
        buf: [0; 64],
        tally,
    };
    if !gate.wait(stop) {
        return Ok(w.tally);
    }

    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut pending = 0usize;
    let start = Instant::now();
    w.tally.start = Some(start);
    for (n, socket) in sockets.into_iter().enumerate() {
        // Every so often, take a zero-timeout look at what completed, so a
        // connection's latency is not inflated by the whole issue loop
        // (on loopback the handshake finishes inside connect() itself).
        if n % ISSUE_BATCH == ISSUE_BATCH - 1 {
            pending -= w.poll_once(&mut events, Duration::ZERO)?;
        }
        let i = w.conns.len();
        let issued = Instant::now();
        let opened = start_connect(socket, args.target).and_then(|mut s| {
            w.poll.registry().register(
                &mut s,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(s)
        });
        match opened {
            Ok(s) => {
                w.conns.push(Conn {
                    stream: Some(s),
                    state: State::Connecting,
                    issued,
                    written: false,
                });
                pending += 1;
            }
            Err(e) => {
                w.tally.failures += 1;
                w.tally.error_kinds.add_io(&e);
                w.conns.push(Conn {
                    stream: None,
                    state: State::Failed,
                    issued,
                    written: false,
                });
            }
        }
    }
    w.tally.issued = Some(Instant::now());

    let mut next_scan = Instant::now() + SCAN_EVERY;
    while pending > 0 && !stopped(stop) {
        let now = Instant::now();
        if now >= next_scan {
            pending -= w.expire(now, args.timeout);
            next_scan = now + SCAN_EVERY;
            continue;
        }
        pending -= w.poll_once(&mut events, next_scan - now)?;
    }
    w.tally.end = Some(Instant::now());
    // Only now close everything, so the peak load really was N connections.
    for c in &mut w.conns {
        if let Some(mut s) = c.stream.take() {
            let _ = w.poll.registry().deregister(&mut s);
        }
    }
    Ok(w.tally)
}

struct Worker {
    conns: Vec<Conn>,
    poll: Poll,
    buf: [u8; 64],
    tally: Tally,
}

impl Worker {
    /// One poll and the handling of its events; returns how many
    /// connections settled.
    fn poll_once(&mut self, events: &mut Events, timeout: Duration) -> io::Result<usize> {
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => return Ok(0),
            Err(e) => return Err(e),
        }
        Ok(events.iter().filter(|ev| self.ready(ev.token().0)).count())
    }

    /// Handles readiness of connection `i`; true when it just settled
    /// (echoed or failed).
    fn ready(&mut self, i: usize) -> bool {
        let Some(conn) = self.conns.get_mut(i) else {
            return false;
        };
        let Some(stream) = conn.stream.as_mut() else {
            return false;
        };
        if conn.state == State::Connecting {
            match connect_outcome(stream) {
                None => return false,
                Some(Err(e)) => return self.fail(i, &io_reason(&e)),
                Some(Ok(())) => {
                    record(&mut self.tally.connect, conn.issued.elapsed());
                    conn.state = State::Echoing;
                }
            }
        }
        if conn.state != State::Echoing {
            return false;
        }
        if !conn.written {
            match stream.write(b"s") {
                Ok(1) => conn.written = true,
                Ok(_) => return self.fail(i, "write_zero"),
                Err(e) if would_block(&e) || interrupted(&e) => return false,
                Err(e) => return self.fail(i, &io_reason(&e)),
            }
        }
        match stream.read(&mut self.buf) {
            Ok(1) => {
                conn.state = State::Ready;
                record(&mut self.tally.ready, conn.issued.elapsed());
                self.tally.connected += 1;
                true
            }
            Ok(0) => self.fail(i, "eof"),
            Ok(_) => self.fail(i, "unexpected_bytes"),
            Err(e) if would_block(&e) || interrupted(&e) => false,
            Err(e) => self.fail(i, &io_reason(&e)),
        }
    }

    fn fail(&mut self, i: usize, reason: &str) -> bool {
        let conn = &mut self.conns[i];
        if let Some(mut s) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        conn.state = State::Failed;
        self.tally.failures += 1;
        self.tally.error_kinds.add(reason);
        true
    }

    /// Fails connections older than `timeout`; returns how many.
    fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let mut expired = 0;
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if matches!(c.state, State::Connecting | State::Echoing)
                && now.saturating_duration_since(c.issued) > timeout
            {
                self.fail(i, "timeout");
                expired += 1;
            }
        }
        expired
    }
}
