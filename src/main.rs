//! The `holdfast` binary: flags → config → a running balancer, until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use holdfast::cli::Args;
use holdfast::{Holdfast, StartError};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Exit status for a usage or configuration error (as clap uses).
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure at start (a port in use, no permission).
const EXIT_RUNTIME: u8 = 1;

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_default_env()
        .format_target(false)
        .init();

    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    // Install the handlers before starting, so a signal that arrives during start-up is not
    // lost and does not kill the process the default way.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                EXIT_RUNTIME,
                &format!("cannot install signal handlers: {e}"),
            );
        }
    };
    let balancer = match Holdfast::start(config) {
        Ok(b) => b,
        Err(e @ StartError::Config(_)) => return fail(EXIT_USAGE, &e),
        Err(e) => return fail(EXIT_RUNTIME, &e),
    };
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal} received; shutting down");
    }
    balancer.shutdown();
    balancer.join();
    ExitCode::SUCCESS
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
