//! The real `holdfast` binary: a guard for a running one (signals, exits, its output; started
//! with or without a connection to it, under a lower open-file limit if asked), a run to
//! completion, its descriptors, and temporary files to hand it.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{IO_TIMEOUT, localhost0, wait_until_ok};

/// Runs the binary with `args` to completion (stdin closed), killing it and panicking if it
/// has not exited within `timeout`.
#[track_caller]
pub fn run_binary(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "holdfast {args:?} still running after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// The real `holdfast` binary, running. Killed on drop.
///
/// [`Child::spawn`] reserves the listen port rather than guessing it: a socket with
/// SO_REUSEPORT is bound (not listening) to 127.0.0.1:0, and the child is told to listen on
/// that address. Linux lets the child's SO_REUSEPORT listeners (same user) bind it too, while
/// no other test's port-0 bind can take it meanwhile; a bound socket that does not listen
/// receives no connections. It then connects once, to know the port accepts.
///
/// [`Child::quiet`] makes no connection before the test's own: the child listens on
/// 127.0.0.1:0 and the address is read back from its start-up log line. It can also lower
/// the child's open-file limit (`ulimit -n`).
pub struct Child {
    child: std::process::Child,
    addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    _reservation: Option<Socket>,
}

/// How [`Child::quiet`] starts the binary.
pub struct QuietStart {
    nofile: Option<u32>,
}

impl QuietStart {
    /// Under `ulimit -n nofile` (run by `sh`, which then execs the binary).
    pub fn nofile(self, nofile: u32) -> QuietStart {
        QuietStart {
            nofile: Some(nofile),
        }
    }

    /// Starts `holdfast --listen 127.0.0.1:0 <args>` and waits until it logs the address it
    /// listens on.
    #[track_caller]
    pub fn spawn(self, args: &[&str]) -> Child {
        let mut me = Child::start(localhost0(), self.nofile, args, None);
        let mut addr = None;
        wait_until_ok(IO_TIMEOUT, || {
            me.exited_at_start(args);
            let log = me.stderr();
            addr = log
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.trim_end_matches(',').parse().ok());
            addr.map(|_| ())
                .ok_or(format!("no listen address in the log yet:\n{log}"))
        });
        me.addr = addr.expect("set when the wait succeeded");
        me
    }
}

impl Child {
    /// Starts `holdfast --listen <reserved addr> <args>` and waits until the port accepts.
    #[track_caller]
    pub fn spawn(args: &[&str]) -> Child {
        let reservation = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        reservation.set_reuse_port(true).unwrap();
        reservation.bind(&SockAddr::from(localhost0())).unwrap();
        let addr = reservation.local_addr().unwrap().as_socket().unwrap();
        Child::spawn_reserved(
            env!("CARGO_BIN_EXE_holdfast").as_ref(),
            addr,
            reservation,
            args,
        )
    }

    /// [`Child::spawn`] of the binary at `exe` (a copy of holdfast, to replace under it).
    #[track_caller]
    pub fn spawn_exe(exe: &std::path::Path, args: &[&str]) -> Child {
        let reservation = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        reservation.set_reuse_port(true).unwrap();
        reservation.bind(&SockAddr::from(localhost0())).unwrap();
        let addr = reservation.local_addr().unwrap().as_socket().unwrap();
        Child::spawn_reserved(exe.as_os_str(), addr, reservation, args)
    }

    #[track_caller]
    fn spawn_reserved(
        exe: &std::ffi::OsStr,
        addr: SocketAddr,
        reservation: Socket,
        args: &[&str],
    ) -> Child {
        let mut me = Child::start_exe(exe, addr, None, args, Some(reservation));
        wait_until_ok(IO_TIMEOUT, || {
            me.exited_at_start(args);
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "holdfast {args:?} does not accept on {addr} ({e}); stderr:\n{}",
                    me.stderr()
                )),
            }
        });
        me
    }

    /// Starts `holdfast --listen <addr> <args>` on an address another process may hold too
    /// (SO_REUSEPORT, as a live upgrade does), and waits until it logs that it listens.
    #[track_caller]
    pub fn spawn_on(addr: SocketAddr, args: &[&str]) -> Child {
        let mut me = Child::start(addr, None, args, None);
        wait_until_ok(IO_TIMEOUT, || {
            me.exited_at_start(args);
            let log = me.stderr();
            if log.contains("listening on ") {
                Ok(())
            } else {
                Err(format!("not listening yet:\n{log}"))
            }
        });
        me
    }

    /// A start that makes no connection to the child: see [`QuietStart`].
    pub fn quiet() -> QuietStart {
        QuietStart { nofile: None }
    }

    /// Runs `holdfast --listen <listen> <args>`, under `ulimit -n nofile` if asked.
    #[track_caller]
    fn start(
        listen: SocketAddr,
        nofile: Option<u32>,
        args: &[&str],
        reservation: Option<Socket>,
    ) -> Child {
        let exe: &std::ffi::OsStr = env!("CARGO_BIN_EXE_holdfast").as_ref();
        Child::start_exe(exe, listen, nofile, args, reservation)
    }

    #[track_caller]
    fn start_exe(
        exe: &std::ffi::OsStr,
        listen: SocketAddr,
        nofile: Option<u32>,
        args: &[&str],
        reservation: Option<Socket>,
    ) -> Child {
        let stdout = temp_path("stdout");
        let stderr = temp_path("stderr");
        let mut command = match nofile {
            None => Command::new(exe),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(exe);
                sh
            }
        };
        let child = command
            .arg("--listen")
            .arg(listen.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn holdfast");
        Child {
            child,
            addr: listen,
            stdout,
            stderr,
            _reservation: reservation,
        }
    }

    /// Panics (with its stderr) if the process has exited.
    #[track_caller]
    fn exited_at_start(&mut self, args: &[&str]) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "holdfast {args:?} exited at start with {status}; stderr:\n{}",
                self.stderr()
            );
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `signal` without waiting for anything; returns the instant just after `kill`
    /// returned (the signal has been sent by then), to measure reactions from.
    #[track_caller]
    pub fn signal(&self, signal: i32) -> Instant {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
        Instant::now()
    }

    /// Sends `signal` and waits (up to `timeout`) for the process to exit.
    #[track_caller]
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        self.signal(signal);
        let mut exited = None;
        wait_until_ok(timeout, || {
            exited = self.child.try_wait().unwrap();
            match exited {
                Some(_) => Ok(()),
                None => Err(format!(
                    "holdfast did not exit after signal {signal}; stderr:\n{}",
                    self.stderr()
                )),
            }
        });
        exited.expect("wait_until_ok returns only once the check passed")
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` until stderr contains `text`.
    #[track_caller]
    pub fn wait_for_stderr(&self, text: &str, timeout: Duration) {
        wait_until_ok(timeout, || {
            let err = self.stderr();
            if err.contains(text) {
                Ok(())
            } else {
                Err(format!("no {text:?} on stderr:\n{err}"))
            }
        });
    }

    /// The admin address a child started with `--admin 127.0.0.1:0` logged (waits up to
    /// `timeout` for the line).
    #[track_caller]
    pub fn admin_addr(&self, timeout: Duration) -> SocketAddr {
        let mut addr = None;
        wait_until_ok(timeout, || {
            let log = self.stderr();
            addr = log
                .split("admin endpoint on http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            addr.map(|_| ())
                .ok_or_else(|| format!("no admin address logged yet:\n{log}"))
        });
        addr.expect("set once the wait succeeded")
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}

/// Open descriptors of process `pid` now.
pub fn fd_count(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .count()
}

/// Number of open file descriptors of process `pid` that are pipe ends.
pub fn pipe_fds(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

pub(super) fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "holdfast-it-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    ))
}

/// A file in the temporary directory, removed on drop (a `--backends-file`, say).
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    #[track_caller]
    pub fn new(what: &str, contents: &str) -> TempFile {
        let file = TempFile {
            path: temp_path(what),
        };
        file.write(contents);
        file
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Replaces the contents.
    #[track_caller]
    pub fn write(&self, contents: &str) {
        fs::write(&self.path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.path.display()));
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Child {
    /// Starts `holdfast --config <file>` on a reserved port: `{listen}` in `text` becomes the
    /// reserved address. Waits until the port accepts. The file stays as long as the child.
    #[track_caller]
    pub fn spawn_config(text: &str) -> (Child, TempFile) {
        let reservation = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        reservation.set_reuse_port(true).unwrap();
        reservation.bind(&SockAddr::from(localhost0())).unwrap();
        let addr = reservation.local_addr().unwrap().as_socket().unwrap();
        let file = TempFile::new("config.toml", &text.replace("{listen}", &addr.to_string()));
        let stdout = temp_path("stdout");
        let stderr = temp_path("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("--config")
            .arg(file.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn holdfast");
        let mut me = Child {
            child,
            addr,
            stdout,
            stderr,
            _reservation: Some(reservation),
        };
        wait_until_ok(IO_TIMEOUT, || {
            me.exited_at_start(&["--config"]);
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(|_| ())
                .map_err(|e| format!("no accept on {addr} ({e}); stderr:\n{}", me.stderr()))
        });
        (me, file)
    }
}
