//! `bulk`: throughput of long-lived streams.
//!
//! Every stream writes the same preallocated chunk over and over and reads
//! whatever comes back into a shared scratch buffer, both until WouldBlock
//! (edge-triggered). Bytes are counted per direction during the measured
//! window; Gbit/s is payload bytes × 8 / window length.
//!
//! `--mode echo` then stops writing and waits (up to the drain time) for
//! the echo to catch up, and checks that every stream got back exactly as
//! many bytes as it sent. `--mode oneway` only cares about the sending
//! direction; it still reads, because an echo target that cannot write
//! stops reading too and the stream would stall.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Poll};
use serde::Serialize;

use crate::common::{
    EVENTS_CAPACITY, ErrorCounts, Gate, IO_BUDGET, Report, SourceIps, connect_all,
    effective_threads, gbit_per_s, interrupted, io_reason, run_threads, secs, share, stopped,
    would_block,
};

const MAX_POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    /// Write continuously, read the echo back and verify the byte count.
    Echo,
    /// Only the sending direction matters; echoed bytes are drained.
    Oneway,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
    #[arg(long, value_name = "ADDR", value_parser = crate::parse_addr)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 1, value_parser = crate::positive)]
    pub streams: usize,
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// echo: read the echo back and verify byte counts; oneway: only the
    /// sending direction counts (echoed bytes are drained).
    #[arg(long = "mode", value_name = "MODE", value_enum, default_value_t = Transfer::Echo)]
    pub transfer: Transfer,
    /// Bytes per write() call.
    #[arg(long, default_value_t = 128 * 1024, value_parser = crate::buffer_size)]
    pub chunk: usize,
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub connect_timeout: Duration,
    /// Echo mode: how long to wait for the echo to catch up at the end.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration_zero)]
    pub drain: Duration,
    /// `--threads`, filled in from the global flag.
    #[arg(skip)]
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct BulkReport {
    pub mode: &'static str,
    pub target: String,
    pub transfer: Transfer,
    pub threads: usize,
    pub streams: usize,
    pub chunk: usize,
    pub duration_s: f64,
    /// Payload bytes written during the measured window.
    pub tx_bytes: u64,
    /// Payload bytes read during the measured window.
    pub rx_bytes: u64,
    pub tx_gbit_per_s: f64,
    pub rx_gbit_per_s: f64,
    /// Streams that failed to connect, broke, or (echo mode) did not get
    /// back exactly what they sent.
    pub errors: u64,
    /// Echo mode: every stream got back exactly what it sent. Absent
    /// (null) in oneway mode.
    pub verified: Option<bool>,
    pub error_kinds: ErrorCounts,
}

impl Report for BulkReport {
    fn text(&self) -> String {
        let verified = match self.verified {
            Some(true) => "byte counts verified",
            Some(false) => "BYTE COUNT MISMATCH",
            None => "not verified (oneway)",
        };
        format!(
            "bulk {} ({:?}): {} stream(s), {} B chunks, {:.2}s, {} thread(s)\n\
             \x20 sent     {} bytes  {} Gbit/s\n\
             \x20 received {} bytes  {} Gbit/s\n\
             \x20 errors {} ({}), {}",
            self.target,
            self.transfer,
            self.streams,
            self.chunk,
            self.duration_s,
            self.threads,
            self.tx_bytes,
            self.tx_gbit_per_s,
            self.rx_bytes,
            self.rx_gbit_per_s,
            self.errors,
            self.error_kinds.text(),
            verified,
        )
    }

    fn ok(&self) -> bool {
        self.tx_bytes > 0
    }
}

#[derive(Default)]
struct Tally {
    tx: u64,
    rx: u64,
    errors: u64,
    mismatched: u64,
    error_kinds: ErrorCounts,
    elapsed: Duration,
}

pub fn run(args: &Args, stop: &AtomicBool) -> Result<BulkReport, String> {
    let threads = effective_threads(args.threads, args.streams);
    let gate = Gate::new(threads);
    let mut total = Tally::default();
    let tallies = run_threads(
        "bulk",
        threads,
        || gate.abandon(),
        || {},
        |t| worker(args, share(args.streams, threads, t), &gate, stop),
    )?;
    for t in tallies {
        total.tx += t.tx;
        total.rx += t.rx;
        total.errors += t.errors;
        total.mismatched += t.mismatched;
        total.error_kinds.merge(&t.error_kinds);
        total.elapsed = total.elapsed.max(t.elapsed);
    }

    let window = total.elapsed.as_secs_f64();
    Ok(BulkReport {
        mode: "bulk",
        target: args.target.to_string(),
        transfer: args.transfer,
        threads,
        streams: args.streams,
        chunk: args.chunk,
        duration_s: secs(total.elapsed),
        tx_bytes: total.tx,
        rx_bytes: total.rx,
        tx_gbit_per_s: gbit_per_s(total.tx, window),
        rx_gbit_per_s: gbit_per_s(total.rx, window),
        errors: total.errors,
        verified: match args.transfer {
            Transfer::Echo => Some(total.errors == 0 && total.mismatched == 0),
            Transfer::Oneway => None,
        },
        error_kinds: total.error_kinds,
    })
}

struct Stream {
    stream: Option<TcpStream>,
    /// Totals over the whole run, for the echo check.
    sent: u64,
    received: u64,
}

enum Next {
    Wait,
    Again,
}

impl Stream {
    /// Writes (if `writing`) and reads until WouldBlock or the budget is
    /// spent. On failure the stream is dropped and the reason returned.
    fn drive(&mut self, chunk: &[u8], buf: &mut [u8], writing: bool) -> Result<Next, String> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(Next::Wait);
        };
        let mut more = false;
        if writing {
            more |= budgeted("write_zero", &mut self.sent, || stream.write(chunk))?;
        }
        more |= budgeted("eof", &mut self.received, || stream.read(buf))?;
        Ok(if more { Next::Again } else { Next::Wait })
    }
}

/// Repeats `op` (a read or a write), adding what it moves to `counter`, until it would block
/// (`false`) or `IO_BUDGET` attempts are spent (`true`: there may be more). A zero-byte result
/// is the error `zero`.
fn budgeted(
    zero: &str,
    counter: &mut u64,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Result<bool, String> {
    for _ in 0..IO_BUDGET {
        match op() {
            Ok(0) => return Err(zero.to_owned()),
            Ok(n) => *counter += n as u64,
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(io_reason(&e)),
        }
    }
    Ok(true)
}

fn worker(args: &Args, n: usize, gate: &Gate, stop: &AtomicBool) -> io::Result<Tally> {
    let mut poll = gate.poll()?;
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut no_sources = SourceIps::for_target(args.target, 0, 0);
    let (streams, connect_errors) = match connect_all(
        &mut poll,
        &mut events,
        args.target,
        n,
        &mut no_sources,
        args.connect_timeout,
        stop,
    ) {
        Ok(x) => x,
        Err(e) => {
            gate.abandon();
            return Err(e);
        }
    };
    let mut tally = Tally {
        errors: connect_errors.total(),
        ..Tally::default()
    };
    tally.error_kinds = connect_errors;
    let streams = streams.into_iter().map(|stream| Stream {
        stream,
        sent: 0,
        received: 0,
    });
    let mut lp = Loop {
        streams: streams.collect(),
        chunk: (0..args.chunk).map(|i| (i % 251) as u8).collect(),
        buf: vec![0u8; args.chunk.max(64 * 1024)],
        again: Vec::new(),
        visiting: Vec::new(),
        poll,
        tally,
    };
    if !gate.wait(stop) {
        return Ok(lp.tally);
    }

    // Measured phase. Every stream starts with a visit: the connect's
    // writable edge was consumed by `connect_all`, so no event would come.
    let start = Instant::now();
    let deadline = start + args.duration;
    lp.again = (0..lp.streams.len()).collect();
    let mut now = start;
    while now < deadline && !stopped(stop) {
        lp.round(&mut events, deadline - now, true)?;
        now = Instant::now();
    }
    lp.tally.elapsed = now - start;
    lp.tally.tx = lp.streams.iter().map(|s| s.sent).sum();
    lp.tally.rx = lp.streams.iter().map(|s| s.received).sum();

    if args.transfer == Transfer::Echo {
        // Stop writing, let the echo catch up, then compare counts.
        let drain_until = Instant::now() + args.drain;
        lp.again = (0..lp.streams.len()).collect();
        loop {
            let behind = lp
                .streams
                .iter()
                .any(|s| s.stream.is_some() && s.received < s.sent);
            let now = Instant::now();
            if !behind || now >= drain_until || stopped(stop) {
                break;
            }
            lp.round(&mut events, drain_until - now, false)?;
        }
        for s in &lp.streams {
            if s.stream.is_some() && s.received != s.sent {
                lp.tally.mismatched += 1;
                lp.tally.errors += 1;
                lp.tally.error_kinds.add("echo_mismatch");
            }
        }
    }
    for s in &mut lp.streams {
        if let Some(mut stream) = s.stream.take() {
            let _ = lp.poll.registry().deregister(&mut stream);
        }
    }
    Ok(lp.tally)
}

/// One thread's streams and buffers.
struct Loop {
    streams: Vec<Stream>,
    /// The payload written over and over (allocated once).
    chunk: Vec<u8>,
    /// Scratch space for reads, shared by all streams.
    buf: Vec<u8>,
    /// Streams that used up their I/O budget and must be revisited even
    /// without a new edge.
    again: Vec<usize>,
    visiting: Vec<usize>,
    poll: Poll,
    tally: Tally,
}

impl Loop {
    /// One poll plus a visit to every stream that is ready or owed a visit.
    fn round(&mut self, events: &mut Events, left: Duration, writing: bool) -> io::Result<()> {
        let timeout = if self.again.is_empty() {
            left.min(MAX_POLL)
        } else {
            Duration::ZERO
        };
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if interrupted(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut self.again, &mut self.visiting);
        let mut visiting = std::mem::take(&mut self.visiting);
        for i in visiting.drain(..).chain(events.iter().map(|e| e.token().0)) {
            let Some(s) = self.streams.get_mut(i) else {
                continue;
            };
            match s.drive(&self.chunk, &mut self.buf, writing) {
                Ok(Next::Wait) => {}
                Ok(Next::Again) => self.again.push(i),
                Err(reason) => {
                    if let Some(mut stream) = s.stream.take() {
                        let _ = self.poll.registry().deregister(&mut stream);
                    }
                    self.tally.errors += 1;
                    self.tally.error_kinds.add(&reason);
                }
            }
        }
        // Hand the (now empty) vector back so its capacity is reused.
        self.visiting = visiting;
        Ok(())
    }
}
