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
    EchoServer(echo_server::Args),

    /// Open-loop request/response latency at a fixed rate, corrected for
    /// coordinated omission.
    Latency(latency::Args),

    /// Bulk throughput over long-lived streams.
    Bulk(bulk::Args),

    /// Short connections: connect, 64 B round trip, close; N in flight.
    ConnectRate(connect_rate::Args),

    /// Open N connections, prove each with a 1-byte round trip, then hold
    /// them idle. Prints `holding N` once they are established (on stderr
    /// with --json).
    Hold(hold::Args),

    /// Reconnect storm: N connects issued at once, each then does a 1-byte
    /// round trip.
    Storm(storm::Args),
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
    // Each mode's `Args` is its subcommand's flags plus the global ones, filled in here.
    let code = match cli.mode {
        Mode::EchoServer(mut args) => {
            (args.threads, args.json) = (threads, json);
            emit(&echo_server::run(&args, &stop)?, json)
        }
        Mode::Latency(mut args) => {
            check_fd_budget("--conns", args.conns, threads)?;
            args.threads = threads;
            emit(&latency::run(&args, &stop)?, json)
        }
        Mode::Bulk(mut args) => {
            check_fd_budget("--streams", args.streams, threads)?;
            args.threads = threads;
            emit(&bulk::run(&args, &stop)?, json)
        }
        Mode::ConnectRate(mut args) => {
            check_fd_budget("--concurrency", args.concurrency, threads)?;
            args.threads = threads;
            emit(&connect_rate::run(&args, &stop)?, json)
        }
        Mode::Hold(mut args) => {
            check_fd_budget("--conns", args.conns, threads)?;
            (args.threads, args.json) = (threads, json);
            emit(&hold::run(&args, &stop)?, json)
        }
        Mode::Storm(mut args) => {
            check_fd_budget("--conns", args.conns, threads)?;
            args.threads = threads;
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
