//! The `holdfast` binary: flags → config → a running balancer, until SIGTERM or SIGINT.
//!
//! Flag parsing (`cli.rs`) is the binary's own; everything else goes through the library's
//! public API, like any other program that embeds holdfast.

mod check;
mod cli;
mod config_file;
mod logging;

use std::ffi::OsString;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clap::{CommandFactory, FromArgMatches};
use crossbeam_channel::TrySendError;
use holdfast::{ControlError, Holdfast, Service, StartError, TakeOver};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook::iterator::Signals;

use cli::Args;

/// Exit status for a usage or configuration error (as clap uses).
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure at start (a port in use, no permission).
const EXIT_RUNTIME: u8 = 1;

fn main() -> ExitCode {
    // Taken now, before an upgrade could replace the file: SIGUSR2 starts the binary found at
    // this path then (the new build), with these arguments.
    let exe = std::env::current_exe();
    // First, while this is the only thread: the sockets systemd passed, if any (socket
    // activation), with LISTEN_* unset so that a new process started by SIGUSR2 does not
    // take them for its own.
    let activated = holdfast::listen_fds_from_systemd();
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (mut args, matches) = parse_args();
    if let Some(tool) = args.command.take() {
        return print_tool(&tool);
    }
    let check = args.check;
    let config_path = args.config.clone();
    let read = match &config_path {
        None => {
            logging::init(args.log_level, args.log_format);
            let (pid_file, log_level, log_format) =
                (args.pid_file.clone(), args.log_level, args.log_format);
            match args.into_config() {
                Ok(config) => Settings {
                    services: vec![Service::new("default", config)],
                    pid_file,
                    log_level,
                    log_format,
                    from_file: false,
                },
                Err(e) => return fail(EXIT_USAGE, &e),
            }
        }
        Some(path) => match from_file(path, &args, &matches) {
            Ok(read) => {
                logging::init(read.log_level, read.log_format);
                read
            }
            Err(e) => return fail(EXIT_USAGE, &e),
        },
    };
    if check {
        let binary = check::BinarySettings {
            log_level: read.log_level,
            log_format: read.log_format,
            pid_file: read.pid_file.clone(),
        };
        // Validates what a start would before binding: the backends file, the names.
        let several = read.services.len() > 1;
        let mut out = String::new();
        for service in read.services {
            match Holdfast::check(service.config) {
                Ok(config) => {
                    if several {
                        out.push_str(&format!("# service '{}'\n", service.name));
                    }
                    out.push_str(&check::describe(&config, &binary));
                }
                Err(e) if several => {
                    return fail(EXIT_USAGE, &format!("service '{}': {e}", service.name));
                }
                Err(e) => return fail(EXIT_USAGE, &e),
            }
        }
        print!("{out}");
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &config_path
        && read.from_file
    {
        for service in &read.services {
            log::info!("service '{}' from {}", service.name, path.display());
        }
    }
    let Settings {
        services, pid_file, ..
    } = read;
    let config = &services[0].config;
    let activated = match activated {
        Ok(activated) => activated,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let upgrade_socket = config.upgrade_socket.clone();
    let take_over = config.take_over.clone();
    let upgrade_timeout = config.upgrade_timeout;
    // Install the handlers before starting, so a signal that arrives during start-up is not
    // lost and does not kill the process the default way.
    let mut wanted = vec![SIGTERM, SIGINT, SIGHUP];
    if upgrade_socket.is_some() {
        wanted.push(SIGUSR2);
    }
    let mut signals = match Signals::new(wanted) {
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
    let took_over = take_over.is_some();
    let started = match take_over {
        Some(path) => match UnixStream::connect(&path) {
            Ok(sock) => match holdfast::take_over(sock, services) {
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
                TakeOver::NotStarted(services, e) => {
                    log::error!(
                        "upgrade: take-over from {} failed ({e}); starting on new listeners",
                        path.display()
                    );
                    Holdfast::start_services(services)
                }
                TakeOver::Failed(e) => Err(e),
            },
            Err(e) => {
                log::error!(
                    "upgrade: cannot connect to {} ({e}); starting on new listeners",
                    path.display()
                );
                Holdfast::start_services(services)
            }
        },
        None if activated.is_empty() => Holdfast::start_services(services),
        None => Holdfast::start_services_activated(services, activated),
    };
    let balancer = match started {
        Ok(b) => b,
        Err(e @ (StartError::Config(_) | StartError::Sources(_))) => return fail(EXIT_USAGE, &e),
        Err(e) => return fail(EXIT_RUNTIME, &e),
    };
    // Written once this process serves: after a take-over, it names the new process.
    if let Some(path) = &pid_file
        && let Err(e) = write_pid_file(path)
    {
        let e = format!("cannot write pid file {}: {e}", path.display());
        if took_over {
            // The sessions are here now; losing them over a pid file would be worse.
            log::error!("{e}");
        } else {
            balancer.shutdown();
            return fail(EXIT_RUNTIME, &e);
        }
    }
    // Set once a handover succeeded: the pid file is the new process's from then on.
    let handed_over = Arc::new(AtomicBool::new(false));
    // Set while a new process started by SIGUSR2 has not exited (or taken over).
    let upgrading = Arc::new(AtomicBool::new(false));
    // SIGHUP reloads on a thread of its own, so that a reload that takes long (a large file,
    // a slow host-name lookup) never delays SIGTERM. SIGHUPs that arrive while a reload is
    // pending are folded into it: the pending reload reads the file as it is by then.
    let (reload_tx, reload_rx) = crossbeam_channel::bounded::<()>(1);
    let control = balancer.controller().clone();
    let reloader = std::thread::Builder::new()
        .name("holdfast-reload".into())
        .spawn(move || {
            for () in reload_rx {
                let reloaded = match &config_path {
                    Some(path) => reload_file(path, &control),
                    None => control.reload(),
                };
                match reloaded {
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
    let upgrade = upgrade_socket.clone().map(|socket| Reexec {
        exe,
        args: reexec_args(&argv, &socket),
        upgrading: Arc::clone(&upgrading),
        handed_over: Arc::clone(&handed_over),
        control: control.clone(),
    });
    let spawned = std::thread::Builder::new()
        .name("holdfast-signals".into())
        .spawn(move || {
            let mut draining = false;
            for signal in signals.forever() {
                if signal == SIGUSR2 {
                    match &upgrade {
                        Some(upgrade) if !draining => upgrade.start(),
                        Some(_) => log::warn!("SIGUSR2: draining; no upgrade"),
                        None => {}
                    }
                    continue;
                }
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
        let handed_over = Arc::clone(&handed_over);
        let spawned = std::thread::Builder::new()
            .name("holdfast-upgrade".into())
            .spawn(move || serve_upgrades(&listener, &control, upgrade_timeout, &handed_over));
        if let Err(e) = spawned {
            balancer.shutdown();
            return fail(
                EXIT_RUNTIME,
                &format!("cannot start the upgrade thread: {e}"),
            );
        }
    }
    balancer.join();
    if let Some(path) = &pid_file
        && !handed_over.load(Ordering::SeqCst)
    {
        remove_pid_file(path);
    }
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
    handed_over: &AtomicBool,
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
                handed_over.store(true, Ordering::SeqCst);
                // The socket file stays: the new process may be binding the same path now.
                control.drain();
                return;
            }
            Err(e) => log::error!("upgrade failed, keeping every session not handed over: {e}"),
        }
    }
}

/// What SIGUSR2 starts: this binary with this process's arguments, taking over from it.
struct Reexec {
    exe: std::io::Result<PathBuf>,
    args: Vec<OsString>,
    upgrading: Arc<AtomicBool>,
    handed_over: Arc<AtomicBool>,
    control: holdfast::Controller,
}

impl Reexec {
    /// Starts the new process, unless one is under way already; a thread waits for it, so
    /// that one which exits before taking over is reported and the next SIGUSR2 is accepted.
    fn start(&self) {
        if self.upgrading.swap(true, Ordering::SeqCst) {
            log::warn!("SIGUSR2: an upgrade is under way already; refused");
            return;
        }
        let exe = match &self.exe {
            Ok(exe) => exe,
            Err(e) => {
                log::error!(
                    "SIGUSR2: upgrade failed, still serving: path of this binary unknown ({e})"
                );
                self.control.count_failed_upgrade();
                self.upgrading.store(false, Ordering::SeqCst);
                return;
            }
        };
        let spawned = Command::new(exe)
            .args(&self.args)
            .stdin(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                log::error!(
                    "SIGUSR2: upgrade failed, still serving: cannot start {}: {e}",
                    exe.display()
                );
                self.control.count_failed_upgrade();
                self.upgrading.store(false, Ordering::SeqCst);
                return;
            }
        };
        let pid = child.id();
        log::info!(
            "SIGUSR2: started {} to take over (pid {pid})",
            exe.display()
        );
        let upgrading = Arc::clone(&self.upgrading);
        let handed_over = Arc::clone(&self.handed_over);
        let control = self.control.clone();
        let waiter = std::thread::Builder::new()
            .name("holdfast-upgrade-child".into())
            .spawn(move || {
                let status = child.wait();
                if handed_over.load(Ordering::SeqCst) {
                    return;
                }
                match status {
                    Ok(status) => log::error!(
                        "upgrade failed, still serving: the new process (pid {pid}) exited \
                         ({status}) before taking over"
                    ),
                    Err(e) => log::error!(
                        "upgrade failed, still serving: cannot wait for the new process \
                         (pid {pid}): {e}"
                    ),
                }
                control.count_failed_upgrade();
                upgrading.store(false, Ordering::SeqCst);
            });
        if let Err(e) = waiter {
            // The upgrade goes on; only its failure would not be noticed.
            log::warn!("SIGUSR2: cannot watch the new process (pid {pid}): {e}");
        }
    }
}

/// This process's arguments without any `--take-over X` of its own, plus `--take-over
/// <socket>`.
fn reexec_args(argv: &[OsString], socket: &Path) -> Vec<OsString> {
    let mut args = Vec::with_capacity(argv.len() + 2);
    let mut skip_next = false;
    for arg in argv {
        if skip_next {
            skip_next = false;
            continue;
        }
        if arg == "--take-over" {
            skip_next = true;
            continue;
        }
        if arg.as_encoded_bytes().starts_with(b"--take-over=") {
            continue;
        }
        args.push(arg.clone());
    }
    args.push("--take-over".into());
    args.push(socket.as_os_str().to_owned());
    args
}

/// Writes this process's pid to `path` atomically: to `path.tmp-<pid>`, then renamed.
fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{pid}"));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes the pid file if it still names this process (a new one may have written its own).
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours && let Err(e) = std::fs::remove_file(path) {
        log::warn!("cannot remove pid file {}: {e}", path.display());
    }
}

/// The flags, as clap reads them (exit 2 with clap's message on a bad one).
fn parse_args() -> (Args, clap::ArgMatches) {
    let matches = Args::command().get_matches();
    match Args::from_arg_matches(&matches) {
        Ok(args) => (args, matches),
        Err(e) => e.exit(),
    }
}

/// What the process runs with, from the flags or a `--config` file.
struct Settings {
    /// The services to run: the flags' one (`default`), or every service of the file. The
    /// process-wide settings are the first's.
    services: Vec<Service>,
    pid_file: Option<PathBuf>,
    log_level: log::LevelFilter,
    log_format: logging::LogFormat,
    /// Read from `--config`.
    from_file: bool,
}

/// `--config FILE`: the file's services, its pid file and log settings. Besides
/// `--config`, only `--check` and `--take-over` (which SIGUSR2 adds) may be on the command
/// line.
fn from_file(path: &Path, args: &Args, matches: &clap::ArgMatches) -> Result<Settings, String> {
    let command = Args::command();
    let given = command.get_arguments().find(|arg| {
        let id = arg.get_id().as_str();
        !["config", "take_over", "check"].contains(&id)
            && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    });
    if let Some(arg) = given {
        return Err(format!(
            "--{} cannot be given with --config: set it in {}",
            arg.get_long().unwrap_or(arg.get_id().as_str()),
            path.display()
        ));
    }
    let loaded = config_file::load(path)?;
    let mut services: Vec<Service> = loaded
        .services
        .into_iter()
        .map(|s| Service::new(s.name, s.config))
        .collect();
    let Some(first) = services.first_mut() else {
        return Err(format!("{}: no [[service]]", path.display()));
    };
    first.config.take_over = args.take_over.clone();
    Ok(Settings {
        services,
        pid_file: loaded.pid_file,
        log_level: loaded.log_level,
        log_format: loaded.log_format,
        from_file: true,
    })
}

/// SIGHUP with `--config`: the file is read again and the running services become its
/// services: new ones start, removed ones stop (their sessions drain), a service whose listen
/// addresses changed restarts, and each kept service gets its new backends (and its backends
/// file's). Other changes wait for the next upgrade or restart, and the log says which. An
/// invalid file (or a new service that cannot start) changes nothing.
fn reload_file(path: &Path, control: &holdfast::Controller) -> Result<(), ControlError> {
    let invalid = |e: String| ControlError::Invalid(holdfast::ConfigError::Invalid(e));
    let loaded = config_file::load(path).map_err(invalid)?;
    let services = loaded
        .services
        .into_iter()
        .map(|s| Service::new(s.name, s.config))
        .collect();
    let report = control
        .reload_services(services)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let several = control.service_names().len() > 1;
    for name in &report.added {
        log::info!("SIGHUP: service '{name}' added from {}", path.display());
    }
    for name in &report.removed {
        log::info!("SIGHUP: service '{name}' removed; its sessions drain");
    }
    for name in &report.replaced {
        log::info!("SIGHUP: service '{name}' restarted on its new listen addresses");
    }
    for (name, changed) in &report.waiting {
        let named = match several {
            true => format!(" (service '{name}')"),
            false => String::new(),
        };
        log::warn!(
            "SIGHUP: {} changed in {}{named}; that takes effect at the next upgrade (SIGUSR2) \
             or restart, the backends now",
            changed.join(", "),
            path.display(),
        );
    }
    let mut first = None;
    for (name, e) in report.failed {
        log::error!("SIGHUP: service '{name}': backends not reloaded: {e}");
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}

/// `holdfast completions SHELL` or `holdfast man`: the text on stdout, nothing started.
fn print_tool(tool: &cli::Tool) -> ExitCode {
    let written = tool
        .render()
        .and_then(|text| std::io::Write::write_all(&mut std::io::stdout().lock(), &text));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_RUNTIME, &format!("cannot write to stdout: {e}")),
    }
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{}", logging::error_line(e));
    ExitCode::from(code)
}
