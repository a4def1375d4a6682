//! `hold`: many established, idle connections.
//!
//! Opens N connections with at most `--in-flight` handshakes pending at a
//! time (so a listen backlog is not overrun: use `storm` for that), proves
//! each one end to end with a 1-byte round trip, then keeps them open and
//! idle. When all are settled it prints `holding N` (flushed) so a script
//! can measure the target's memory with exactly N connections through it.
//! The hold lasts `--hold` or, by default, until SIGINT/SIGTERM; the
//! summary is printed either way. Connections the target closes during
//! the hold are counted as dropped.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::common::{
    EVENTS_CAPACITY, ErrorCounts, Gate, Percentiles, Report, SourceIps, announce, connect,
    connect_outcome, effective_threads, interrupted, io_reason, merge, millis, new_histogram,
    record, run_threads, secs, share, stopped, would_block,
};

const SCAN_EVERY: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub target: SocketAddr,
    #[arg(long, value_parser = crate::positive)]
    pub conns: usize,
    /// How long to hold (default: until SIGINT/SIGTERM).
    #[arg(long, value_parser = crate::parse_duration_zero)]
    pub hold: Option<Duration>,
    #[arg(long, value_name = "K", default_value_t = 16, value_parser = crate::source_ips)]
    pub source_ips: usize,
    /// Handshakes pending at once while establishing.
    #[arg(long, default_value_t = 512, value_parser = crate::positive)]
    pub in_flight: usize,
    /// A connection not established and echoing within this fails.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
    /// `--json`, filled in from the global flag.
    #[arg(skip)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct HoldReport {
    pub mode: &'static str,
    pub target: String,
    pub threads: usize,
    pub conns: usize,
    pub source_ips: usize,
    /// Connections that completed the 1-byte round trip.
    pub established: u64,
    pub failed: u64,
    pub error_kinds: ErrorCounts,
    /// From the first connect to the last connection settled.
    pub time_to_establish_ms: f64,
    /// connect() to echoed byte, per connection, microseconds.
    pub establish_latency_us: Percentiles,
    pub held_s: f64,
    /// Established connections the target closed or reset while held.
    pub dropped: u64,
}

impl Report for HoldReport {
    fn text(&self) -> String {
        format!(
            "hold {}: {} conns over {} source IP(s), {} thread(s)\n\
             \x20 established {}  failed {}  in {} ms\n\
             \x20 establish {}\n\
             \x20 held {:.1}s, dropped by target {}\n\
             \x20 failure reasons: {}",
            self.target,
            self.conns,
            self.source_ips,
            self.threads,
            self.established,
            self.failed,
            self.time_to_establish_ms,
            self.establish_latency_us.text(),
            self.held_s,
            self.dropped,
            self.error_kinds.text(),
        )
    }

    fn ok(&self) -> bool {
        self.established > 0
    }
}

struct Tally {
    established: u64,
    failed: u64,
    dropped: u64,
    error_kinds: ErrorCounts,
    latency: Histogram<u64>,
    settled_at: Option<Instant>,
    held: Duration,
    source_ips: usize,
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<HoldReport, String> {
    let threads = effective_threads(args.threads, args.conns);
    // First gate: all threads settled (main thread takes part, to print
    // `holding N` exactly once). No second gate is needed: each thread then
    // holds for `--hold` from its own settle time.
    let settled = Gate::new(threads + 1);
    let established = AtomicU64::new(0);
    let start = Instant::now();
    let tallies = run_threads(
        "hold",
        threads,
        || settled.abandon(),
        || {
            if settled.wait(stop) {
                announce(
                    &format!("holding {}", established.load(Ordering::SeqCst)),
                    args.json,
                );
            }
        },
        |t| worker(args, t, threads, &settled, &established, stop),
    )?;

    let mut latency = new_histogram();
    let mut error_kinds = ErrorCounts::default();
    let (mut est, mut failed, mut dropped) = (0, 0, 0);
    let mut settled_at = start;
    let mut held = Duration::ZERO;
    let mut source_ips = 0;
    for t in &tallies {
        est += t.established;
        failed += t.failed;
        dropped += t.dropped;
        error_kinds.merge(&t.error_kinds);
        merge(&mut latency, &t.latency);
        settled_at = settled_at.max(t.settled_at.unwrap_or(start));
        held = held.max(t.held);
        source_ips = t.source_ips;
    }
    Ok(HoldReport {
        mode: "hold",
        target: args.target.to_string(),
        threads,
        conns: args.conns,
        source_ips,
        established: est,
        failed,
        error_kinds,
        time_to_establish_ms: millis(settled_at - start),
        establish_latency_us: Percentiles::from_ns(&latency),
        held_s: secs(held),
        dropped,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Connecting,
    Echoing,
    Held,
    Done,
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    started: Instant,
    written: bool,
}

struct Worker<'a> {
    args: &'a Args,
    conns: Vec<Conn>,
    sources: SourceIps,
    poll: Poll,
    buf: [u8; 64],
    tally: Tally,
    /// Connections currently connecting or echoing.
    active: usize,
    /// Index of the next connection to open.
    next: usize,
    in_flight: usize,
}

fn worker(
    args: &Args,
    index: usize,
    threads: usize,
    settled: &Gate,
    established: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<Tally> {
    let n = share(args.conns, threads, index);
    let poll = settled.poll()?;
    let start = Instant::now();
    let sources = SourceIps::for_target(args.target, args.source_ips, index);
    let mut w = Worker {
        args,
        conns: (0..n)
            .map(|_| Conn {
                stream: None,
                state: State::Waiting,
                started: start,
                written: false,
            })
            .collect(),
        poll,
        buf: [0; 64],
        tally: Tally {
            established: 0,
            failed: 0,
            dropped: 0,
            error_kinds: ErrorCounts::default(),
            latency: new_histogram(),
            settled_at: None,
            held: Duration::ZERO,
            source_ips: sources.len(),
        },
        sources,
        active: 0,
        next: 0,
        in_flight: share(args.in_flight, threads, index).max(1),
    };
    let mut events = Events::with_capacity(EVENTS_CAPACITY);

    // Phase 1: establish, keeping at most `in_flight` handshakes open.
    let mut next_scan = start + SCAN_EVERY;
    loop {
        w.open_more();
        if w.active == 0 || stopped(stop) {
            break;
        }
        let now = Instant::now();
        if now >= next_scan {
            w.expire(now);
            next_scan = now + SCAN_EVERY;
            continue;
        }
        match w
            .poll
            .poll(&mut events, Some(MAX_POLL.min(next_scan - now)))
        {
            Ok(()) => {}
            Err(e) if interrupted(&e) => {}
            Err(e) => {
                settled.abandon();
                return Err(e);
            }
        }
        for ev in events.iter() {
            w.ready(ev.token().0);
        }
    }
    w.tally.settled_at = Some(Instant::now());
    established.fetch_add(w.tally.established, Ordering::SeqCst);
    if !settled.wait(stop) {
        return Ok(w.tally);
    }

    // Phase 2: hold. Only closes by the target produce events now.
    let hold_start = Instant::now();
    let hold_until = args.hold.map(|d| hold_start + d);
    loop {
        let now = Instant::now();
        if stopped(stop) || hold_until.is_some_and(|t| now >= t) {
            break;
        }
        let timeout = hold_until.map_or(MAX_POLL, |t| (t - now).min(MAX_POLL));
        match w.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            w.ready(ev.token().0);
        }
    }
    w.tally.held = hold_start.elapsed();
    Ok(w.tally)
}

impl Worker<'_> {
    fn open_more(&mut self) {
        while self.active < self.in_flight && self.next < self.conns.len() {
            let i = self.next;
            self.next += 1;
            let now = Instant::now();
            let opened =
                connect(self.args.target, self.sources.next_ip(), false).and_then(|mut s| {
                    self.poll.registry().register(
                        &mut s,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    Ok(s)
                });
            let conn = &mut self.conns[i];
            conn.started = now;
            match opened {
                Ok(s) => {
                    conn.stream = Some(s);
                    conn.state = State::Connecting;
                    self.active += 1;
                }
                Err(e) => {
                    conn.state = State::Done;
                    self.tally.failed += 1;
                    self.tally.error_kinds.add_io(&e);
                }
            }
        }
    }

    fn ready(&mut self, i: usize) {
        let Some(conn) = self.conns.get_mut(i) else {
            return;
        };
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        if conn.state == State::Connecting {
            match connect_outcome(stream) {
                None => return,
                Some(Err(e)) => return self.fail(i, &io_reason(&e)),
                Some(Ok(())) => conn.state = State::Echoing,
            }
        }
        match conn.state {
            State::Echoing => {
                if !conn.written {
                    match stream.write(b"h") {
                        Ok(1) => conn.written = true,
                        Ok(_) => return self.fail(i, "write_zero"),
                        Err(e) if would_block(&e) || interrupted(&e) => return,
                        Err(e) => return self.fail(i, &io_reason(&e)),
                    }
                }
                match stream.read(&mut self.buf) {
                    Ok(1) => {
                        conn.state = State::Held;
                        self.active -= 1;
                        self.tally.established += 1;
                        record(&mut self.tally.latency, conn.started.elapsed());
                    }
                    Ok(0) => self.fail(i, "eof"),
                    Ok(_) => self.fail(i, "unexpected_bytes"),
                    Err(e) if would_block(&e) || interrupted(&e) => {}
                    Err(e) => self.fail(i, &io_reason(&e)),
                }
            }
            State::Held => {
                // Idle connections should stay silent; drain anything that
                // arrives and notice closes.
                loop {
                    match stream.read(&mut self.buf) {
                        Ok(0) => return self.drop_held(i, "eof"),
                        Ok(_) => {}
                        Err(e) if would_block(&e) => return,
                        Err(e) if interrupted(&e) => {}
                        Err(e) => return self.drop_held(i, &io_reason(&e)),
                    }
                }
            }
            State::Waiting | State::Connecting | State::Done => {}
        }
    }

    /// A connection failed before it was established.
    fn fail(&mut self, i: usize, reason: &str) {
        let conn = &mut self.conns[i];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.state = State::Done;
        self.active -= 1;
        self.tally.failed += 1;
        self.tally.error_kinds.add(reason);
    }

    /// An established connection was closed by the target during the hold.
    fn drop_held(&mut self, i: usize, reason: &str) {
        let conn = &mut self.conns[i];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.state = State::Done;
        self.tally.dropped += 1;
        self.tally.error_kinds.add(&format!("dropped_{reason}"));
    }

    fn expire(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if matches!(c.state, State::Connecting | State::Echoing)
                && now.saturating_duration_since(c.started) > self.args.timeout
            {
                self.fail(i, "timeout");
            }
        }
    }
}
