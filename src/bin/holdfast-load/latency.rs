//! `latency`: open-loop request/response latency, corrected for
//! coordinated omission.
//!
//! The total rate R is spread over the N connections as one fixed
//! schedule: send number `s` of a thread is due at `t0 + offset + s/r`
//! (r = the thread's share of R) and goes to connection `s mod n`, so each
//! connection sends every N/R seconds and consecutive sends are evenly
//! interleaved across connections. A connection has at most one request
//! on the wire. When a send falls due while the previous reply is still
//! outstanding, the request waits in that connection's queue (just a
//! counter: intended times are recomputed from the schedule) and is sent
//! as soon as the reply arrives. Latency is always measured from the
//! *intended* send time, so a stall in the target shows up in every
//! request that was due during it, instead of silently lowering the
//! request rate the way a closed-loop client would ("coordinated
//! omission").
//!
//! Timer precision: epoll timeouts are whole milliseconds, far coarser
//! than loopback round trips. By default the loop therefore sleeps in
//! epoll only until about 1 ms before the next due send and then polls
//! with a zero timeout (spins) — precise, at the price of a busy core at
//! high rates. `--no-spin` keeps the CPU idle between events but sends can
//! then be up to ~1 ms late; the reported `send_lag_us` shows how late
//! the generator itself was, so its precision is never a guess.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Poll};
use serde::Serialize;

use crate::common::{
    EVENTS_CAPACITY, ErrorCounts, Gate, Percentiles, Report, SourceIps, connect_all,
    effective_threads, interrupted, merge, new_histogram, record, round1, run_threads, secs, share,
    stopped, would_block,
};

/// Below this much time to the next send, poll without sleeping (see the
/// module comment). One epoll tick.
const SPIN_WINDOW: Duration = Duration::from_millis(1);

/// Longest single poll, so the stop flag is noticed promptly.
const MAX_POLL: Duration = Duration::from_millis(100);

/// After SIGINT/SIGTERM, how long outstanding replies may still arrive.
const STOP_GRACE: Duration = Duration::from_millis(100);

/// Receive scratch space per thread; one request is at most `size` bytes
/// but reading more per call is harmless.
const READ_BUF: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub target: SocketAddr,
    /// Connections; each carries one request at a time.
    #[arg(long, default_value_t = 10, value_parser = crate::positive)]
    pub conns: usize,
    /// Total requests per second, spread evenly over the connections.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// Request size in bytes (the echo is the same size).
    #[arg(long, default_value_t = 64, value_parser = crate::buffer_size)]
    pub size: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Unmeasured run-in before `--duration`.
    #[arg(long, default_value = "0s", value_parser = crate::parse_duration_zero)]
    pub warmup: Duration,
    /// Sleep in epoll right up to each send instead of spinning the last
    /// millisecond: saves a core, but sends can be up to ~1 ms late.
    #[arg(long)]
    pub no_spin: bool,
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub connect_timeout: Duration,
    /// After the schedule ends, how long to wait for outstanding replies
    /// before counting them as timed out.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration_zero)]
    pub drain: Duration,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct LatencyReport {
    pub mode: &'static str,
    pub target: String,
    pub threads: usize,
    pub conns: usize,
    pub rate: u64,
    pub size: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub spin: bool,
    /// Requests whose intended send time fell in the measured window.
    pub scheduled: u64,
    /// Of those, fully written.
    pub sent: u64,
    /// Of those, fully echoed back (these make up the histogram).
    pub completed: u64,
    /// Of those, lost to a broken connection (including ones that never
    /// connected).
    pub errors: u64,
    /// Of those, still unanswered when the drain time after the run ended.
    pub timed_out: u64,
    /// Connections that failed to connect or broke during the run.
    pub conn_errors: u64,
    pub error_kinds: ErrorCounts,
    /// Completed requests per second of measured time.
    pub achieved_rate: f64,
    /// Intended send time to last echoed byte, microseconds.
    pub latency_us: Percentiles,
    /// How late the generator wrote requests that found their connection
    /// idle (pure generator/scheduler delay), microseconds.
    pub send_lag_us: Percentiles,
}

impl Report for LatencyReport {
    fn text(&self) -> String {
        format!(
            "latency {}: {} conns, target {} req/s, {} B, {:.1}s (+{:.1}s warmup), {} thread(s)\n\
             \x20 scheduled {}  sent {}  completed {}  errors {}  timed out {}  achieved {} req/s\n\
             \x20 latency   {}\n\
             \x20 send lag  {}\n\
             \x20 connection errors: {} ({})",
            self.target,
            self.conns,
            self.rate,
            self.size,
            self.duration_s,
            self.warmup_s,
            self.threads,
            self.scheduled,
            self.sent,
            self.completed,
            self.errors,
            self.timed_out,
            self.achieved_rate,
            self.latency_us.text(),
            self.send_lag_us.text(),
            self.conn_errors,
            self.error_kinds.text(),
        )
    }

    fn ok(&self) -> bool {
        self.completed > 0
    }
}

/// Per-thread tallies, merged at the end.
struct Tally {
    scheduled: u64,
    sent: u64,
    completed: u64,
    errors: u64,
    timed_out: u64,
    conn_errors: u64,
    error_kinds: ErrorCounts,
    hist: Histogram<u64>,
    lag: Histogram<u64>,
    measured: Duration,
}

impl Tally {
    fn new() -> Self {
        Tally {
            scheduled: 0,
            sent: 0,
            completed: 0,
            errors: 0,
            timed_out: 0,
            conn_errors: 0,
            error_kinds: ErrorCounts::default(),
            hist: new_histogram(),
            lag: new_histogram(),
            measured: Duration::ZERO,
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.completed += o.completed;
        self.errors += o.errors;
        self.timed_out += o.timed_out;
        self.conn_errors += o.conn_errors;
        self.error_kinds.merge(&o.error_kinds);
        merge(&mut self.hist, &o.hist);
        merge(&mut self.lag, &o.lag);
        self.measured = self.measured.max(o.measured);
    }
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<LatencyReport, String> {
    let threads = effective_threads(args.threads, args.conns);
    let gate = Gate::new(threads);
    let mut total = Tally::new();
    let tallies = run_threads(
        "latency",
        threads,
        || gate.abandon(),
        || {},
        |t| worker(args, t, threads, &gate, stop),
    )?;
    for tally in &tallies {
        total.merge(tally);
    }

    let measured = total.measured.as_secs_f64();
    Ok(LatencyReport {
        mode: "latency",
        target: args.target.to_string(),
        threads,
        conns: args.conns,
        rate: args.rate,
        size: args.size,
        duration_s: secs(total.measured),
        warmup_s: secs(args.warmup),
        spin: !args.no_spin,
        scheduled: total.scheduled,
        sent: total.sent,
        completed: total.completed,
        errors: total.errors,
        timed_out: total.timed_out,
        conn_errors: total.conn_errors,
        error_kinds: total.error_kinds,
        achieved_rate: if measured > 0.0 {
            round1(total.completed as f64 / measured)
        } else {
            0.0
        },
        latency_us: Percentiles::from_ns(&total.hist),
        send_lag_us: Percentiles::from_ns(&total.lag),
    })
}

/// The fixed send schedule of one thread.
struct Schedule {
    t0: Instant,
    /// This thread's phase within the global interleaving, nanoseconds.
    offset_ns: u128,
    /// Send `s` is due `offset_ns + s * num / den` ns after `t0`; kept as
    /// an exact fraction so long runs do not accumulate rounding drift.
    num: u128,
    den: u128,
    /// Connections on this thread.
    n: u64,
    measure_from: Instant,
    end: Instant,
}

impl Schedule {
    fn at(&self, seq: u64) -> Instant {
        let ns = self.offset_ns + u128::from(seq) * self.num / self.den;
        self.t0 + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Intended send time of request `k` of connection `conn`.
    fn of(&self, conn: usize, k: u64) -> Instant {
        self.at(k * self.n + conn as u64)
    }

    fn measured(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.end
    }
}

struct Conn {
    /// `None` once the connection failed.
    stream: Option<TcpStream>,
    /// Requests that have fallen due (sent, in flight or queued).
    due: u64,
    /// Requests finished (answered, or written off when the connection
    /// died). `done` is also the index of the request on the wire.
    done: u64,
    in_flight: bool,
    written: usize,
    received: usize,
}

/// Why a connection was given up.
enum Broken {
    Io(io::Error),
    Eof,
    Unexpected,
}

impl Conn {
    /// Writes as much of the current request as the socket takes.
    /// Returns Ok(true) when the request is now fully written.
    fn write_more(&mut self, payload: &[u8]) -> Result<bool, Broken> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(false);
        };
        let was_complete = self.written == payload.len();
        while self.written < payload.len() {
            match stream.write(&payload[self.written..]) {
                Ok(0) => return Err(Broken::Eof),
                Ok(n) => self.written += n,
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(Broken::Io(e)),
            }
        }
        Ok(!was_complete)
    }
}

struct Worker<'a> {
    sched: Schedule,
    conns: Vec<Conn>,
    payload: Vec<u8>,
    buf: Vec<u8>,
    poll: Poll,
    tally: Tally,
    stop: &'a AtomicBool,
    spin: bool,
}

fn worker(
    args: &Args,
    index: usize,
    threads: usize,
    gate: &Gate,
    stop: &AtomicBool,
) -> io::Result<Tally> {
    let n = share(args.conns, threads, index);
    let mut poll = gate.poll()?;
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    // Latency runs use few connections: no source-address rotation needed.
    let mut no_sources = SourceIps::for_target(args.target, 0, 0);
    let connected = connect_all(
        &mut poll,
        &mut events,
        args.target,
        n,
        &mut no_sources,
        args.connect_timeout,
        stop,
    );
    let (streams, connect_errors) = match connected {
        Ok(x) => x,
        Err(e) => {
            gate.abandon();
            return Err(e);
        }
    };
    let mut tally = Tally::new();
    tally.conn_errors = connect_errors.total();
    tally.error_kinds = connect_errors;
    let conns = streams
        .into_iter()
        .map(|stream| Conn {
            stream,
            due: 0,
            done: 0,
            in_flight: false,
            written: 0,
            received: 0,
        })
        .collect();
    if !gate.wait(stop) {
        return Ok(tally);
    }

    // Every thread starts its clock after the gate; the skew between
    // threads is a few hundred microseconds at most.
    let t0 = Instant::now();
    let rate = u128::from(args.rate);
    let sched = Schedule {
        t0,
        offset_ns: index as u128 * 1_000_000_000 / rate,
        num: 1_000_000_000 * args.conns as u128,
        den: rate * n as u128,
        n: n as u64,
        measure_from: t0 + args.warmup,
        end: t0 + args.warmup + args.duration,
    };
    let mut w = Worker {
        sched,
        conns,
        payload: (0..args.size).map(|i| (i % 251) as u8).collect(),
        buf: vec![0u8; READ_BUF],
        poll,
        tally,
        stop,
        spin: !args.no_spin,
    };
    w.run(&mut events, args.drain)?;
    Ok(w.tally)
}

impl Worker<'_> {
    fn run(&mut self, events: &mut Events, drain: Duration) -> io::Result<()> {
        let mut seq: u64 = 0;
        let mut next = self.sched.at(0);
        let mut end = self.sched.end;
        let mut drain_until = end + drain;
        loop {
            let now = Instant::now();
            if stopped(self.stop) && now < end {
                // Interrupted: end the schedule here, give replies already on
                // their way a brief grace, and report what we have.
                end = now;
                self.sched.end = now;
                drain_until = now + drain.min(STOP_GRACE);
            }
            // Issue every send that has fallen due.
            while next <= now && next < end {
                self.due(seq, next);
                seq += 1;
                next = self.sched.at(seq);
            }
            let issuing = next < end;
            if !issuing {
                let outstanding = self
                    .conns
                    .iter()
                    .any(|c| c.stream.is_some() && c.done < c.due);
                if !outstanding || now >= drain_until {
                    break;
                }
            }
            let wake = if issuing { next } else { drain_until };
            let wait = wake.saturating_duration_since(now);
            let timeout = if self.spin {
                wait.saturating_sub(SPIN_WINDOW)
            } else {
                wait
            };
            match self.poll.poll(events, Some(timeout.min(MAX_POLL))) {
                Ok(()) => {}
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let c = ev.token().0;
                if c < self.conns.len() {
                    self.ready(c);
                }
            }
        }
        // Whatever is still unanswered in the window timed out.
        for (c, conn) in self.conns.iter().enumerate() {
            if conn.stream.is_some() {
                for k in conn.done..conn.due {
                    if self.sched.measured(self.sched.of(c, k)) {
                        self.tally.timed_out += 1;
                    }
                }
            }
        }
        self.tally.measured = end.saturating_duration_since(self.sched.measure_from);
        Ok(())
    }

    /// Send `seq` (intended at `at`) has fallen due.
    fn due(&mut self, seq: u64, at: Instant) {
        let c = (seq % self.sched.n) as usize;
        let measured = self.sched.measured(at);
        if measured {
            self.tally.scheduled += 1;
        }
        let conn = &mut self.conns[c];
        conn.due += 1;
        if conn.stream.is_none() {
            conn.done = conn.due;
            if measured {
                self.tally.errors += 1;
            }
        } else if !conn.in_flight {
            // The connection is idle, so any delay from here to the write is
            // the generator's own: record it as send lag.
            if measured {
                record(&mut self.tally.lag, at.elapsed());
            }
            self.start(c);
        }
        // Otherwise the request waits behind the one in flight; `ready`
        // sends it when that reply is in.
    }

    /// Puts the next request of connection `c` on the wire.
    fn start(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        conn.in_flight = true;
        conn.written = 0;
        conn.received = 0;
        self.write(c);
    }

    fn write(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        match conn.write_more(&self.payload) {
            Ok(true) => {
                if self.sched.measured(self.sched.of(c, conn.done)) {
                    self.tally.sent += 1;
                }
            }
            Ok(false) => {}
            Err(b) => self.kill(c, b),
        }
    }

    /// Readiness on connection `c`: continue a partial write, then read
    /// replies until WouldBlock (edge-triggered).
    fn ready(&mut self, c: usize) {
        if self.conns[c].stream.is_none() {
            return;
        }
        if self.conns[c].in_flight && self.conns[c].written < self.payload.len() {
            self.write(c);
        }
        let size = self.payload.len();
        loop {
            let result = match self.conns[c].stream.as_mut() {
                Some(stream) => stream.read(&mut self.buf),
                None => return,
            };
            let n = match result {
                Ok(0) => return self.kill(c, Broken::Eof),
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) => return self.kill(c, Broken::Io(e)),
            };
            let conn = &mut self.conns[c];
            // With one request on the wire at a time, anything beyond its
            // size (or data while idle) means the target is not echoing.
            if !conn.in_flight || conn.received + n > size {
                return self.kill(c, Broken::Unexpected);
            }
            conn.received += n;
            if conn.received == size {
                self.complete(c);
            }
        }
    }

    fn complete(&mut self, c: usize) {
        let now = Instant::now();
        let conn = &mut self.conns[c];
        let intended = self.sched.of(c, conn.done);
        if self.sched.measured(intended) {
            self.tally.completed += 1;
            record(
                &mut self.tally.hist,
                now.saturating_duration_since(intended),
            );
        }
        conn.done += 1;
        conn.in_flight = false;
        if conn.done < conn.due {
            // A queued request: its latency already includes the wait.
            self.start(c);
        }
    }

    /// Gives up connection `c`; everything it still owed in the window
    /// counts as an error.
    fn kill(&mut self, c: usize, why: Broken) {
        let conn = &mut self.conns[c];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        for k in conn.done..conn.due {
            if self.sched.measured(self.sched.of(c, k)) {
                self.tally.errors += 1;
            }
        }
        conn.done = conn.due;
        conn.in_flight = false;
        self.tally.conn_errors += 1;
        match why {
            Broken::Io(e) => self.tally.error_kinds.add_io(&e),
            Broken::Eof => self.tally.error_kinds.add("eof"),
            Broken::Unexpected => self.tally.error_kinds.add("unexpected_bytes"),
        }
    }
}
