//! `connect-rate`: short connections, closed loop at fixed concurrency.
//!
//! Each of the N slots runs cycles back to back: create a socket (bound
//! to the next loopback source address), connect, write 64 bytes, read
//! the 64-byte echo, close — then immediately start the next cycle. The
//! rate is whatever the target sustains with N cycles in flight.
//!
//! Why source addresses: every cycle leaves a TIME_WAIT socket on the
//! closing side (the client, unless `--rst`). Those pin the (source
//! address, port) pair for a minute, and one address only has ~28k
//! ephemeral ports; spreading over K addresses multiplies that by K.
//! `--rst` closes with SO_LINGER 0 instead, which leaves no TIME_WAIT at
//! all (and tests the target's handling of resets).
//!
//! Slots are reused for successive connections, so the mio token carries
//! a generation: an event that belonged to a slot's previous connection
//! is recognised and ignored.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::common::{
    EVENTS_CAPACITY, ErrorCounts, Gate, Percentiles, Report, SourceIps, connect, connect_outcome,
    effective_threads, interrupted, merge, new_histogram, record, round1, run_threads, secs, share,
    stopped, would_block,
};

/// Bytes exchanged per cycle.
const PAYLOAD: usize = 64;

/// Low bits of a token hold the slot index, the rest its generation.
const SLOT_BITS: u32 = 24;
const SLOT_MASK: usize = (1 << SLOT_BITS) - 1;

/// How often slots are checked for `--timeout`.
const SCAN_EVERY: Duration = Duration::from_millis(100);

const MAX_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 16, value_parser = crate::positive)]
    pub concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Rotate over source addresses 127.0.0.2..=127.0.0.(K+1) when the
    /// target is on 127.0.0.0/8 (0: let the kernel choose).
    #[arg(long, value_name = "K", default_value_t = 16, value_parser = crate::source_ips)]
    pub source_ips: usize,
    /// Close with RST (SO_LINGER 0) instead of FIN: no TIME_WAIT.
    #[arg(long)]
    pub rst: bool,
    /// A cycle taking longer than this fails.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct ConnectRateReport {
    pub mode: &'static str,
    pub target: String,
    pub threads: usize,
    pub concurrency: usize,
    /// Source addresses actually rotated over (0: kernel's choice).
    pub source_ips: usize,
    pub rst: bool,
    pub duration_s: f64,
    /// Full cycles (connect, 64 B round trip, close) finished in the window.
    pub completed: u64,
    /// Cycles that failed (connect error, reset, early EOF, timeout).
    pub failures: u64,
    pub error_kinds: ErrorCounts,
    pub conns_per_sec: f64,
    /// Socket creation + connect() to established, microseconds.
    pub connect_latency_us: Percentiles,
    /// Socket creation to close after the echo, microseconds.
    pub cycle_latency_us: Percentiles,
}

impl Report for ConnectRateReport {
    fn text(&self) -> String {
        format!(
            "connect-rate {}: concurrency {}, {} source IP(s), {} close, {:.2}s, {} thread(s)\n\
             \x20 completed {}  failures {}  {} conns/s\n\
             \x20 connect  {}\n\
             \x20 cycle    {}\n\
             \x20 failure reasons: {}",
            self.target,
            self.concurrency,
            self.source_ips,
            if self.rst { "RST" } else { "FIN" },
            self.duration_s,
            self.threads,
            self.completed,
            self.failures,
            self.conns_per_sec,
            self.connect_latency_us.text(),
            self.cycle_latency_us.text(),
            self.error_kinds.text(),
        )
    }

    fn ok(&self) -> bool {
        self.completed > 0
    }
}

struct Tally {
    completed: u64,
    failures: u64,
    error_kinds: ErrorCounts,
    connect: Histogram<u64>,
    cycle: Histogram<u64>,
    elapsed: Duration,
    source_ips: usize,
}

impl Tally {
    fn new() -> Self {
        Tally {
            completed: 0,
            failures: 0,
            error_kinds: ErrorCounts::default(),
            connect: new_histogram(),
            cycle: new_histogram(),
            elapsed: Duration::ZERO,
            source_ips: 0,
        }
    }

    fn fail(&mut self, reason: &str) {
        self.failures += 1;
        self.error_kinds.add(reason);
    }
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<ConnectRateReport, String> {
    let threads = effective_threads(args.threads, args.concurrency);
    let gate = Gate::new(threads);
    let mut total = Tally::new();
    let tallies = run_threads(
        "connect",
        threads,
        || gate.abandon(),
        || {},
        |t| worker(args, t, threads, &gate, stop),
    )?;
    for t in tallies {
        total.completed += t.completed;
        total.failures += t.failures;
        total.error_kinds.merge(&t.error_kinds);
        merge(&mut total.connect, &t.connect);
        merge(&mut total.cycle, &t.cycle);
        total.elapsed = total.elapsed.max(t.elapsed);
        total.source_ips = t.source_ips;
    }
    let window = total.elapsed.as_secs_f64();
    Ok(ConnectRateReport {
        mode: "connect-rate",
        target: args.target.to_string(),
        threads,
        concurrency: args.concurrency,
        source_ips: total.source_ips,
        rst: args.rst,
        duration_s: secs(total.elapsed),
        completed: total.completed,
        failures: total.failures,
        error_kinds: total.error_kinds,
        conns_per_sec: if window > 0.0 {
            round1(total.completed as f64 / window)
        } else {
            0.0
        },
        connect_latency_us: Percentiles::from_ns(&total.connect),
        cycle_latency_us: Percentiles::from_ns(&total.cycle),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    Exchanging,
}

struct Slot {
    stream: Option<TcpStream>,
    generation: usize,
    phase: Phase,
    started: Instant,
    written: usize,
    received: usize,
}

struct Worker<'a> {
    args: &'a Args,
    slots: Vec<Slot>,
    sources: SourceIps,
    poll: Poll,
    payload: [u8; PAYLOAD],
    buf: Vec<u8>,
    /// Slots to start a new cycle in, at the top of the next round.
    restart: Vec<usize>,
    tally: Tally,
}

fn worker(
    args: &Args,
    index: usize,
    threads: usize,
    gate: &Gate,
    stop: &AtomicBool,
) -> io::Result<Tally> {
    let n = share(args.concurrency, threads, index);
    let poll = gate.poll()?;
    let now = Instant::now();
    let slots = (0..n)
        .map(|_| Slot {
            stream: None,
            generation: 0,
            phase: Phase::Idle,
            started: now,
            written: 0,
            received: 0,
        })
        .collect();
    let sources = SourceIps::for_target(args.target, args.source_ips, index);
    let mut w = Worker {
        args,
        slots,
        poll,
        payload: [b'x'; PAYLOAD],
        buf: vec![0u8; 4096],
        restart: (0..n).collect(),
        tally: Tally::new(),
        sources,
    };
    w.tally.source_ips = w.sources.len();
    if !gate.wait(stop) {
        return Ok(w.tally);
    }
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut next_scan = start + SCAN_EVERY;
    let mut starting: Vec<usize> = Vec::with_capacity(n);
    let mut now = start;
    while now < deadline && !stopped(stop) {
        // New cycles for slots that finished or failed last round. A slot
        // that fails right away is retried next round, not in a tight loop.
        std::mem::swap(&mut starting, &mut w.restart);
        for i in starting.drain(..) {
            w.begin(i);
        }
        if now >= next_scan {
            w.expire(now);
            next_scan = now + SCAN_EVERY;
        }
        let timeout = if w.restart.is_empty() {
            (deadline - now).min(MAX_POLL)
        } else {
            Duration::ZERO
        };
        match w.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let token = ev.token().0;
            let i = token & SLOT_MASK;
            // Stale event from the slot's previous connection?
            if w.slots
                .get(i)
                .is_some_and(|s| s.generation == token >> SLOT_BITS)
            {
                w.ready(i);
            }
        }
        now = Instant::now();
    }
    // Cycles still in flight at the deadline are neither counted nor failed.
    w.tally.elapsed = now - start;
    Ok(w.tally)
}

impl Worker<'_> {
    fn begin(&mut self, i: usize) {
        let generation = (self.slots[i].generation + 1) & (usize::MAX >> SLOT_BITS);
        let now = Instant::now();
        let slot = &mut self.slots[i];
        slot.generation = generation;
        slot.started = now;
        slot.written = 0;
        slot.received = 0;
        let token = Token((generation << SLOT_BITS) | i);
        let opened =
            connect(self.args.target, self.sources.next_ip(), self.args.rst).and_then(|mut s| {
                self.poll.registry().register(
                    &mut s,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(s)
            });
        match opened {
            Ok(s) => {
                slot.stream = Some(s);
                slot.phase = Phase::Connecting;
            }
            Err(e) => {
                slot.phase = Phase::Idle;
                self.tally.fail(&crate::common::io_reason(&e));
                self.restart.push(i);
            }
        }
    }

    fn ready(&mut self, i: usize) {
        if self.slots[i].phase == Phase::Connecting {
            let Some(stream) = self.slots[i].stream.as_ref() else {
                return;
            };
            match connect_outcome(stream) {
                None => return,
                Some(Err(e)) => return self.fail(i, &crate::common::io_reason(&e)),
                Some(Ok(())) => {
                    let slot = &mut self.slots[i];
                    record(&mut self.tally.connect, slot.started.elapsed());
                    slot.phase = Phase::Exchanging;
                }
            }
        }
        if self.slots[i].phase == Phase::Exchanging {
            self.exchange(i);
        }
    }

    /// Writes the rest of the payload, then reads the echo.
    fn exchange(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(stream) = slot.stream.as_mut() else {
            return;
        };
        while slot.written < PAYLOAD {
            match stream.write(&self.payload[slot.written..]) {
                Ok(0) => return self.fail(i, "write_zero"),
                Ok(n) => slot.written += n,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => {}
                Err(e) => return self.fail(i, &crate::common::io_reason(&e)),
            }
        }
        loop {
            match stream.read(&mut self.buf) {
                Ok(0) => return self.fail(i, "eof"),
                Ok(n) => {
                    slot.received += n;
                    if slot.received > PAYLOAD {
                        return self.fail(i, "unexpected_bytes");
                    }
                    if slot.received == PAYLOAD {
                        return self.finish(i);
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => {}
                Err(e) => return self.fail(i, &crate::common::io_reason(&e)),
            }
        }
    }

    fn finish(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        // Dropping closes the socket, which also removes it from epoll
        // (saving a deregister syscall per cycle); late events for it are
        // filtered by the token generation.
        slot.stream = None;
        slot.phase = Phase::Idle;
        record(&mut self.tally.cycle, slot.started.elapsed());
        self.tally.completed += 1;
        self.restart.push(i);
    }

    fn fail(&mut self, i: usize, reason: &str) {
        let slot = &mut self.slots[i];
        slot.stream = None;
        slot.phase = Phase::Idle;
        self.tally.fail(reason);
        self.restart.push(i);
    }

    /// Fails cycles that have been running longer than `--timeout`.
    fn expire(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.phase != Phase::Idle
                && now.saturating_duration_since(slot.started) > self.args.timeout
            {
                self.fail(i, "timeout");
            }
        }
    }
}
