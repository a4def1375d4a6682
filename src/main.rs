//! The `holdfast` binary: flags → config → a running balancer, until SIGTERM or SIGINT.
//!
//! Flag parsing (`cli.rs`) is the binary's own; everything else goes through the library's
//! public API, like any other program that embeds holdfast.

mod cli;

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use crossbeam_channel::TrySendError;
use holdfast::{ControlError, Holdfast, StartError, TakeOver};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use cli::Args;

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
    let upgrade_socket = config.upgrade_socket.clone();
    let take_over = config.take_over.clone();
    let upgrade_timeout = config.upgrade_timeout;
    // Install the handlers before starting, so a signal that arrives during start-up is not
    // lost and does not kill the process the default way.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                EXIT_RUNTIME,
                &format!("cannot install signal handlers: {e}"),
            );
        }
    };
    // The iterator below folds deliveries that arrive before it looks into one; this counts
    // each, so a second SIGTERM sent right after the first still closes everything.
    let stops = Arc::new(AtomicUsize::new(0));
    for signal in [SIGTERM, SIGINT] {
        if let Err(e) = holdfast::count_deliveries(signal, Arc::clone(&stops)) {
            return fail(
                EXIT_RUNTIME,
                &format!("cannot install signal handlers: {e}"),
            );
        }
    }
    // With --take-over, the balancer starts on the old process's listeners (the same
    // sockets), then takes its sessions; the old one stops accepting once this one accepts.
    let started = match take_over {
        Some(path) => match UnixStream::connect(&path) {
            Ok(sock) => match holdfast::take_over(sock, config) {
                TakeOver::Started(balancer, outcome) => {
                    match outcome {
                        Ok(how) => {
                            log::info!("upgrade: took over from {} ({how:?})", path.display())
                        }
                        Err(e) => log::error!(
                            "upgrade: take-over from {} failed part way, serving what was \
                             taken: {e}",
                            path.display()
                        ),
                    }
                    Ok(balancer)
                }
                TakeOver::NotStarted(config, e) => {
                    log::error!(
                        "upgrade: take-over from {} failed ({e}); starting on new listeners",
                        path.display()
                    );
                    Holdfast::start(*config)
                }
                TakeOver::Failed(e) => Err(e),
            },
            Err(e) => {
                log::error!(
                    "upgrade: cannot connect to {} ({e}); starting on new listeners",
                    path.display()
                );
                Holdfast::start(config)
            }
        },
        None => Holdfast::start(config),
    };
    let balancer = match started {
        Ok(b) => b,
        Err(e @ (StartError::Config(_) | StartError::Sources(_))) => return fail(EXIT_USAGE, &e),
        Err(e) => return fail(EXIT_RUNTIME, &e),
    };
    // SIGHUP reloads on a thread of its own, so that a reload that takes long (a large file,
    // a slow host-name lookup) never delays SIGTERM. SIGHUPs that arrive while a reload is
    // pending are folded into it: the pending reload reads the file as it is by then.
    let (reload_tx, reload_rx) = crossbeam_channel::bounded::<()>(1);
    let control = balancer.controller().clone();
    let reloader = std::thread::Builder::new()
        .name("holdfast-reload".into())
        .spawn(move || {
            for () in reload_rx {
                match control.reload() {
                    Ok(()) => log::info!("SIGHUP: backends reloaded"),
                    Err(e @ ControlError::Timeout) => {
                        log::warn!("SIGHUP: {e}; the reloaded backends will still be applied")
                    }
                    Err(e) => log::error!("SIGHUP: reload failed, backends unchanged: {e}"),
                }
            }
        });
    if let Err(e) = reloader {
        balancer.shutdown();
        return fail(
            EXIT_RUNTIME,
            &format!("cannot start the reload thread: {e}"),
        );
    }
    // The first SIGTERM/SIGINT drains: listeners close at once, sessions end on their own
    // until --drain-timeout, the rest are closed spread over --close-spread. A second one
    // closes everything now.
    let control = balancer.controller().clone();
    let spawned = std::thread::Builder::new()
        .name("holdfast-signals".into())
        .spawn(move || {
            let mut draining = false;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    // Full: a reload is pending already and will see the file as it is now.
                    if let Err(TrySendError::Disconnected(())) = reload_tx.try_send(()) {
                        log::error!("SIGHUP: the reload thread is gone; not reloaded");
                    }
                    continue;
                }
                if draining || stops.load(Ordering::SeqCst) >= 2 {
                    log::warn!("signal {signal} received again; closing every session now");
                    control.shutdown();
                    return;
                }
                log::info!(
                    "signal {signal} received; draining (at most {:?}; send it again to close \
                     every session now)",
                    control.drain_budget()
                );
                control.drain();
                draining = true;
            }
        });
    if let Err(e) = spawned {
        balancer.shutdown();
        return fail(
            EXIT_RUNTIME,
            &format!("cannot start the signal thread: {e}"),
        );
    }
    if let Some(path) = upgrade_socket {
        // A file left there by a process that is gone (or by the one just taken over from).
        let _ = std::fs::remove_file(&path);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                balancer.shutdown();
                return fail(
                    EXIT_RUNTIME,
                    &format!("cannot listen on upgrade socket {}: {e}", path.display()),
                );
            }
        };
        let control = balancer.controller().clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-upgrade".into())
            .spawn(move || serve_upgrades(&listener, &control, upgrade_timeout));
        if let Err(e) = spawned {
            balancer.shutdown();
            return fail(
                EXIT_RUNTIME,
                &format!("cannot start the upgrade thread: {e}"),
            );
        }
    }
    balancer.join();
    log::info!("holdfast stopped");
    ExitCode::SUCCESS
}

/// One upgrade at a time (the next connection waits until this one is over): a handover that
/// fails leaves this process with everything it had not given and listening for the next;
/// one that succeeds closes the listeners and drains what is left (sessions not relaying
/// yet), and the process exits 0.
fn serve_upgrades(
    listener: &UnixListener,
    control: &holdfast::Controller,
    timeout: std::time::Duration,
) {
    for sock in listener.incoming() {
        let sock = match sock {
            Ok(sock) => sock,
            Err(e) => {
                log::warn!("upgrade socket: accept failed: {e}");
                continue;
            }
        };
        log::info!("upgrade: a new process connected; handing over");
        match holdfast::give_over(sock, control, timeout) {
            Ok(report) => {
                log::info!(
                    "upgrade: handed {} sessions over in {} batches (longest pause {:?}); \
                     exiting",
                    report.sessions,
                    report.batches,
                    report.longest_pause
                );
                // The socket file stays: the new process may be binding the same path now.
                control.drain();
                return;
            }
            Err(e) => log::error!("upgrade failed, keeping every session not handed over: {e}"),
        }
    }
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
