//! `holdfast-load`: load generator and echo backend for exercising an L4
//! TCP load balancer on one machine.
//!
//! Every mode is a set of mio event loops (one per `--threads`) over
//! non-blocking, TCP_NODELAY sockets with buffers allocated up front, so
//! the generator itself is rarely the bottleneck. Failed connections are
//! counted and reported, never fatal. Each mode prints a plain-text summary,
//! or with `--json` exactly one JSON object on stdout.
//!
//! Exit status: 0 when the run produced a report with at least one success,
//! 1 when it produced a report but nothing succeeded (or could not start),
//! 2 for a usage error.

#![forbid(unsafe_code)]

mod bulk;
mod common;
mod connect_rate;
mod echo_server;
mod hold;
mod latency;
mod storm;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::common::{SourceIps, check_fd_budget, emit, stop_flag};

/// Largest `--size` / `--chunk`: one buffer per thread is allocated for it.
const MAX_BUFFER: usize = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "holdfast-load",
    version,
    about = "Load generator and echo backend for holdfast (TCP, loopback-friendly)",
    propagate_version = true
)]
struct Cli {
    /// Print a single JSON object on stdout instead of the text summary
    /// (readiness lines such as `listening on` then go to stderr).
    #[arg(long, global = true)]
    json: bool,

    /// Event-loop threads; connections are split evenly between them.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,

    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Echo backend. Prints `listening on ADDR` (on stderr with --json) and
    /// runs until SIGINT/SIGTERM.
    EchoServer {
        /// Address to listen on; port 0 picks a free port (printed).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        listen: SocketAddr,
        /// Rewrite this JSON file every second with accept statistics
        /// (read by `storm --report-files`).
        #[arg(long, value_name = "PATH")]
        report_file: Option<PathBuf>,
        /// Listen backlog (capped by net.core.somaxconn).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(i32).range(1..=65535))]
        backlog: i32,
        /// A line sent to every client on accept, before echoing (server speaks first).
        #[arg(long, value_name = "TEXT")]
        banner: Option<String>,
    },

    /// Open-loop request/response latency at a fixed rate, corrected for
    /// coordinated omission.
    Latency {
        /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        target: SocketAddr,
        /// Connections; each carries one request at a time.
        #[arg(long, default_value_t = 10, value_parser = positive)]
        conns: usize,
        /// Total requests per second, spread evenly over the connections.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: u64,
        /// Request size in bytes (the echo is the same size).
        #[arg(long, default_value_t = 64, value_parser = buffer_size)]
        size: usize,
        /// Measured time.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Unmeasured run-in before `--duration`.
        #[arg(long, default_value = "0s", value_parser = parse_duration_zero)]
        warmup: Duration,
        /// Sleep in epoll right up to each send instead of spinning the last
        /// millisecond: saves a core, but sends can be up to ~1 ms late.
        #[arg(long)]
        no_spin: bool,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// After the schedule ends, how long to wait for outstanding replies
        /// before counting them as timed out.
        #[arg(long, default_value = "2s", value_parser = parse_duration_zero)]
        drain: Duration,
    },

    /// Bulk throughput over long-lived streams.
    Bulk {
        /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1, value_parser = positive)]
        streams: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// echo: read the echo back and verify byte counts; oneway: only the
        /// sending direction counts (echoed bytes are drained).
        #[arg(long, value_enum, default_value_t = bulk::Transfer::Echo)]
        mode: bulk::Transfer,
        /// Bytes per write() call.
        #[arg(long, default_value_t = 128 * 1024, value_parser = buffer_size)]
        chunk: usize,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// Echo mode: how long to wait for the echo to catch up at the end.
        #[arg(long, default_value = "5s", value_parser = parse_duration_zero)]
        drain: Duration,
    },

    /// Short connections: connect, 64 B round trip, close; N in flight.
    ConnectRate {
        /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        target: SocketAddr,
        #[arg(long, default_value_t = 16, value_parser = positive)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Rotate over source addresses 127.0.0.2..=127.0.0.(K+1) when the
        /// target is on 127.0.0.0/8 (0: let the kernel choose).
        #[arg(long, value_name = "K", default_value_t = 16, value_parser = source_ips)]
        source_ips: usize,
        /// Close with RST (SO_LINGER 0) instead of FIN: no TIME_WAIT.
        #[arg(long)]
        rst: bool,
        /// A cycle taking longer than this fails.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },

    /// Open N connections, prove each with a 1-byte round trip, then hold
    /// them idle. Prints `holding N` once they are established (on stderr
    /// with --json).
    Hold {
        /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        target: SocketAddr,
        #[arg(long, value_parser = positive)]
        conns: usize,
        /// How long to hold (default: until SIGINT/SIGTERM).
        #[arg(long, value_parser = parse_duration_zero)]
        hold: Option<Duration>,
        #[arg(long, value_name = "K", default_value_t = 16, value_parser = source_ips)]
        source_ips: usize,
        /// Handshakes pending at once while establishing.
        #[arg(long, default_value_t = 512, value_parser = positive)]
        in_flight: usize,
        /// A connection not established and echoing within this fails.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },

    /// Reconnect storm: N connects issued at once, each then does a 1-byte
    /// round trip.
    Storm {
        /// Where to connect: HOST:PORT (an echo server or a proxy in front of one).
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        target: SocketAddr,
        #[arg(long, value_parser = positive)]
        conns: usize,
        /// Comma-separated `echo-server --report-file` paths; each backend's
        /// peak accepts/s during the storm is reported.
        #[arg(long, value_name = "PATH,...", value_delimiter = ',')]
        report_files: Vec<PathBuf>,
        #[arg(long, value_name = "K", default_value_t = 16, value_parser = source_ips)]
        source_ips: usize,
        /// A connection not established and echoing within this fails.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap renders them; real usage errors are
/// folded into a single line (clap's own spans several).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "error: a mode is required: echo-server, latency, bulk, connect-rate, hold or storm \
             (see --help)"
        );
        return ExitCode::from(2);
    }
    let rendered = e.to_string();
    let first_paragraph: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = first_paragraph.join(" ");
    let line = if line.is_empty() {
        "error: invalid arguments".to_owned()
    } else {
        line
    };
    eprintln!("{line} (see --help)");
    ExitCode::from(2)
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let threads = usize::from(cli.threads);
    let json = cli.json;
    let stop = stop_flag().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let code = match cli.mode {
        Mode::EchoServer {
            listen,
            report_file,
            backlog,
            banner,
        } => {
            let args = echo_server::Args {
                listen,
                threads,
                backlog,
                report_file,
                json,
                banner: banner
                    .map(|b| format!("{b}\n").into_bytes())
                    .unwrap_or_default(),
            };
            emit(&echo_server::run(&args, &stop)?, json)
        }
        Mode::Latency {
            target,
            conns,
            rate,
            size,
            duration,
            warmup,
            no_spin,
            connect_timeout,
            drain,
        } => {
            check_fd_budget("--conns", conns, threads)?;
            let args = latency::Args {
                target,
                conns,
                rate,
                size,
                duration,
                warmup,
                threads,
                spin: !no_spin,
                connect_timeout,
                drain,
            };
            emit(&latency::run(&args, &stop)?, json)
        }
        Mode::Bulk {
            target,
            streams,
            duration,
            mode,
            chunk,
            connect_timeout,
            drain,
        } => {
            check_fd_budget("--streams", streams, threads)?;
            let args = bulk::Args {
                target,
                streams,
                duration,
                transfer: mode,
                chunk,
                threads,
                connect_timeout,
                drain,
            };
            emit(&bulk::run(&args, &stop)?, json)
        }
        Mode::ConnectRate {
            target,
            concurrency,
            duration,
            source_ips,
            rst,
            timeout,
        } => {
            check_fd_budget("--concurrency", concurrency, threads)?;
            let args = connect_rate::Args {
                target,
                concurrency,
                duration,
                source_ips,
                rst,
                timeout,
                threads,
            };
            emit(&connect_rate::run(&args, &stop)?, json)
        }
        Mode::Hold {
            target,
            conns,
            hold,
            source_ips,
            in_flight,
            timeout,
        } => {
            check_fd_budget("--conns", conns, threads)?;
            let args = hold::Args {
                target,
                conns,
                hold,
                source_ips,
                in_flight,
                timeout,
                threads,
                json,
            };
            emit(&hold::run(&args, &stop)?, json)
        }
        Mode::Storm {
            target,
            conns,
            report_files,
            source_ips,
            timeout,
        } => {
            check_fd_budget("--conns", conns, threads)?;
            let args = storm::Args {
                target,
                conns,
                report_files,
                source_ips,
                timeout,
                threads,
            };
            emit(&storm::run(&args, &stop)?, json)
        }
    };
    Ok(code)
}

// ---------------------------------------------------------------------------
// Value parsers (their messages end up in the one-line usage error)
// ---------------------------------------------------------------------------

/// `HOST:PORT`; literal addresses parse directly, names (`localhost:80`)
/// go through the resolver and the first address wins.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// humantime duration (`500ms`, `10s`, `1m`), strictly positive.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_zero(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

/// humantime duration; zero allowed (`0s`).
fn parse_duration_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 500ms or 10s ({e})"))
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("'{s}' is not a count ({e})")),
    }
}

fn buffer_size(s: &str) -> Result<usize, String> {
    let n = positive(s)?;
    if n > MAX_BUFFER {
        return Err(format!("at most {MAX_BUFFER} bytes"));
    }
    Ok(n)
}

fn source_ips(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("'{s}' is not a count ({e})"))?;
    if n > SourceIps::MAX {
        return Err(format!(
            "at most {} (127.0.0.2..=127.0.0.254)",
            SourceIps::MAX
        ));
    }
    Ok(n)
}
