//! What an operator packaging holdfast relies on: completions and a man page built from the
//! same definitions as `--help`, `--check`, JSON logs, `/healthz` and socket activation.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `holdfast <args>`, which must exit 0; returns its stdout.
#[track_caller]
fn stdout_of(args: &[&str]) -> String {
    let out = run_binary(args, RUN_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "holdfast {args:?} exited with {}; stderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn completions_name_the_flags_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(&["completions", shell]);
        for flag in ["backend", "listen", "drain-timeout", "log-level"] {
            assert!(
                script.contains(flag),
                "{shell} completions do not mention --{flag}:\n{script}"
            );
        }
    }
}

#[test]
fn completions_for_an_unknown_shell_are_a_usage_error() {
    let out = run_binary(&["completions", "tcsh"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("error:") && err.contains("tcsh"), "{err}");
}

#[test]
fn man_page_is_roff_with_every_flag() {
    let page = stdout_of(&["man"]);
    assert!(
        page.lines().any(|l| l.starts_with(".TH holdfast 1")),
        "no .TH header:\n{page}"
    );
    assert!(page.contains(".SH OPTIONS"), "no OPTIONS section:\n{page}");
    for flag in [r"\-\-backend", r"\-\-listen", r"\-\-drain\-timeout"] {
        assert!(page.contains(flag), "the man page lacks {flag}");
    }
    // Where groff is installed, the page must also render without a complaint.
    let Ok(mut groff) = Command::new("groff")
        .args(["-man", "-Tascii", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("groff not installed: the man page is not rendered");
        return;
    };
    let mut stdin = groff.stdin.take().expect("piped");
    std::io::Write::write_all(&mut stdin, page.as_bytes()).expect("write to groff");
    drop(stdin);
    let out = groff.wait_with_output().expect("groff runs");
    assert!(out.status.success(), "groff failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "groff warns about the page");
    let rendered = text(&out.stdout);
    assert!(
        rendered.contains("--backend"),
        "the rendered page lacks --backend:\n{rendered}"
    );
}

#[test]
fn a_subcommand_does_not_mix_with_flags() {
    let out = run_binary(&["--listen", "127.0.0.1:0", "man"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("error:"));
}

/// Every stderr line, parsed as a JSON object with the four keys every line has.
#[track_caller]
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nstderr:\n{stderr}"));
            for key in ["ts", "level", "target", "msg"] {
                assert!(v[key].is_string(), "no string {key:?} in {line}");
            }
            let ts = v["ts"].as_str().unwrap_or_default();
            assert!(
                humantime::parse_rfc3339(ts).is_ok() && ts.ends_with('Z') && ts.len() == 24,
                "ts is not RFC 3339 UTC with milliseconds: {ts}"
            );
            v
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&["-b", &b, "--log-format", "json", "--log-sessions"]);
    let mut c = client(child.addr());
    round_trip(&mut c, b"logged");
    drop(c);
    // (Child::spawn's own probe connection logs a session with no bytes first.)
    child.wait_for_stderr("bytes_client_to_backend=6 ", RUN_TIMEOUT);
    let status = child.signal_and_wait(libc::SIGTERM, RUN_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", child.stderr());
    let lines = json_lines(&child.stderr());
    assert!(
        lines.iter().any(|v| v["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("holdfast listening on"))),
        "no start-up line: {lines:?}"
    );
    // The session line keeps its text and carries its pairs as fields.
    let session = lines
        .iter()
        .find(|v| {
            v["target"] == "holdfast::session" && v["fields"]["bytes_client_to_backend"] == "6"
        })
        .unwrap_or_else(|| panic!("no session line: {lines:?}"));
    assert_eq!(session["level"], "INFO");
    assert_eq!(session["fields"]["backend"], b.as_str());
    assert_eq!(session["fields"]["end"], "client-close");
    assert!(
        session["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("session client="))
    );
}

#[test]
fn json_logs_carry_the_final_error_too() {
    let out = run_binary(
        &[
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:1",
            "--log-format",
            "json",
            "--workers",
            "0",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    let lines = json_lines(&text(&out.stderr));
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["msg"]
            .as_str()
            .is_some_and(|m| m.contains("--workers")),
        "{last}"
    );
}

#[test]
fn a_bad_log_format_is_a_usage_error() {
    let out = run_binary(
        &[
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:1",
            "--log-format",
            "xml",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("error:") && err.contains("xml"), "{err}");
}

/// `GET path` on `addr`: the status code and the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    set_timeouts(&s);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {raw:?}")))?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

#[test]
fn healthz_is_200_while_serving_and_503_once_draining() {
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&["-b", &b, "--admin", "127.0.0.1:0", "--drain-timeout", "1m"]);
    let admin = child.admin_addr(RUN_TIMEOUT);
    let (status, body) = http_get(admin, "/healthz").expect("GET /healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    // A live session keeps the draining process (and its admin endpoint) up.
    let mut c = client(child.addr());
    round_trip(&mut c, b"held");
    child.signal(libc::SIGTERM);
    wait_until_ok(RUN_TIMEOUT, || match http_get(admin, "/healthz") {
        Ok((503, body)) if body.trim() == "draining" => Ok(()),
        other => Err(format!("GET /healthz: {other:?}")),
    });
    // Draining, not gone: the session still relays.
    round_trip(&mut c, b"still here");
    drop(c);
    let status = child
        .wait_exit(RUN_TIMEOUT)
        .expect("exits once the session ends");
    assert_eq!(status.code(), Some(0), "{}", child.stderr());
}

#[test]
fn check_prints_the_effective_configuration_and_binds_nothing() {
    // Held without SO_REUSEPORT: a real start on this address fails, so --check must not
    // try to bind it.
    let held = std::net::TcpListener::bind(localhost0()).expect("bind");
    let addr = held.local_addr().expect("local_addr").to_string();
    let file = TempFile::new("backends", "# pool\n127.0.0.1:7001,weight=4\n");
    let path = file.path().to_str().expect("utf-8 path");
    let args = [
        "--check",
        "-l",
        &addr,
        "-b",
        "127.0.0.1:7000",
        "--backends-file",
        path,
        "--idle-timeout",
        "2m",
    ];
    let out = run_binary(&args, RUN_TIMEOUT);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for expected in [
        format!("listen = {addr}"),
        "backend = 127.0.0.1:7000".to_string(),
        "backend = 127.0.0.1:7001,weight=4".to_string(),
        format!("backends-file = {path}"),
        "idle-timeout = 2m".to_string(),
        // Defaults filled in.
        "algorithm = least-conn".to_string(),
        "drain-timeout = 30s".to_string(),
        "log-format = text".to_string(),
    ] {
        assert!(
            stdout.lines().any(|l| l == expected),
            "no line {expected:?} in:\n{stdout}"
        );
    }
    // The same flags give the same text: the order is stable.
    let again = run_binary(&args, RUN_TIMEOUT);
    assert_eq!(text(&again.stdout), stdout);
    // Exit 0 while `held` has the port proves that nothing tried to bind it: a start fails.
    let start = run_binary(&["-l", &addr, "-b", "127.0.0.1:7000"], RUN_TIMEOUT);
    assert_eq!(start.status.code(), Some(1), "{}", text(&start.stderr));
    drop(held);
}

#[test]
fn check_fails_with_exit_2_naming_the_error() {
    let file = TempFile::new("backends", "127.0.0.1:7001\nnot-an-address\n");
    let path = file.path().to_str().expect("utf-8 path");
    let out = run_binary(
        &[
            "--check",
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:7000",
            "--backends-file",
            path,
        ],
        RUN_TIMEOUT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error:"), "{err}");
    assert!(
        err.contains(path) && err.contains("not-an-address"),
        "the error names neither the file nor the line:\n{err}"
    );
    assert_eq!(
        text(&out.stdout),
        "",
        "a failed check prints no configuration"
    );
    // A flag error is one too.
    let out = run_binary(
        &[
            "--check",
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:7000",
            "--workers",
            "0",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--workers"));
}

/// holdfast started the way systemd starts a socket-activated service: `listener` (bound and
/// listening, without SO_REUSEPORT) as descriptor 3, `LISTEN_FDS=1`, and `LISTEN_PID` the
/// process's own pid (a shell sets both, moves the socket to 3, then execs holdfast). Killed
/// on drop.
struct Activated {
    child: std::process::Child,
    stderr: TempFile,
}

impl Activated {
    #[track_caller]
    fn spawn(listener: &socket2::Socket, args: &[&str]) -> Activated {
        use std::os::fd::AsRawFd;
        let stderr = TempFile::new("activated-stderr", "");
        let n = listener.as_raw_fd();
        let to_3 = if n == 3 {
            String::new()
        } else {
            format!("exec 3<&{n} {n}<&-; ")
        };
        let script = format!("{to_3}LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"");
        // Inheritable only while the shell is spawned: other tests' children must not get it.
        listener.set_cloexec(false).expect("clear FD_CLOEXEC");
        // bash, not sh: dash (Debian's sh) takes only one-digit descriptors in a redirection,
        // and with other tests' sockets open the listener is often 10 or above ("Bad fd
        // number", and holdfast never started).
        let spawned = Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_holdfast"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr.path()).expect("stderr file"))
            .spawn();
        listener.set_cloexec(true).expect("set FD_CLOEXEC");
        Activated {
            child: spawned.expect("spawn sh"),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listening socket on 127.0.0.1:0 as systemd makes one by default: no SO_REUSEPORT, so
/// nothing else can bind its address while it is open.
fn systemd_socket() -> (socket2::Socket, std::net::SocketAddr) {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.bind(&localhost0().into()).expect("bind");
    socket.listen(128).expect("listen");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("an inet address");
    (socket, addr)
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let (socket, addr) = systemd_socket();
    let a = addr.to_string();
    let mut lb = Activated::spawn(&socket, &["-l", &a, "-b", &b, "--workers", "2"]);
    // The socket is ours until holdfast takes it: a client may connect (and wait in its
    // queue) before holdfast runs. holdfast cannot have bound the address itself.
    let mut clients: Vec<_> = (0..4).map(|_| client(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        round_trip(c, format!("through the passed socket {i}").as_bytes());
    }
    // Logged at start, which may be written just after the first sessions are served.
    let want = format!("socket activation: serving {a} from descriptor 3");
    wait_until_ok(Duration::from_secs(10), || {
        let log = lb.stderr();
        if log.contains(&want) {
            Ok(())
        } else {
            Err(format!("no {want:?} in:\n{log}"))
        }
    });
    drop(clients);
    // And it drains and exits as usual.
    let pid = lb.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let mut status = None;
    wait_until_ok(RUN_TIMEOUT, || {
        status = lb.child.try_wait().ok().flatten();
        status.map(|_| ()).ok_or("still running".to_string())
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", lb.stderr());
}

#[test]
fn a_passed_socket_no_listen_names_is_an_error() {
    let (socket, addr) = systemd_socket();
    let mut lb = Activated::spawn(&socket, &["-l", "127.0.0.1:0", "-b", "127.0.0.1:1"]);
    let mut status = None;
    wait_until_ok(RUN_TIMEOUT, || {
        status = lb.child.try_wait().ok().flatten();
        status.map(|_| ()).ok_or("still running".to_string())
    });
    let err = lb.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(
        err.starts_with("error:")
            && err.contains("descriptor 3")
            && err.contains(&addr.to_string()),
        "the error does not name the descriptor and its address:\n{err}"
    );
}

#[test]
fn malformed_activation_variables_are_a_usage_error() {
    let mut out = Command::new("sh")
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=many exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_holdfast"))
        .args(["-l", "127.0.0.1:0", "-b", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sh");
    // Bounded: a holdfast that ignored the variables would run until killed.
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    while matches!(out.try_wait(), Ok(None)) {
        if std::time::Instant::now() >= deadline {
            let _ = out.kill();
            let _ = out.wait();
            panic!("holdfast still runs with LISTEN_FDS=many");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = out.wait_with_output().expect("wait for holdfast");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error:") && err.contains("LISTEN_FDS"),
        "{err}"
    );
}
