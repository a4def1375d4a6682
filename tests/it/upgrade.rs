//! Live upgrade between two real `holdfast` processes: `--upgrade-socket` on the running one,
//! `--take-over` on the new one (issue #12).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

const SESSIONS: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

/// Message `n` of client `c`: distinct, of varying lengths.
fn message(c: usize, n: usize) -> Vec<u8> {
    let len = 1 + (c * 7919 + n * 104_729) % 30_000;
    (0..len).map(|i| (c * 31 + n * 17 + i) as u8).collect()
}

fn exchange(client: &mut TcpStream, c: usize, n: usize) {
    let sent = message(c, n);
    client.write_all(&sent).unwrap();
    let mut got = vec![0u8; sent.len()];
    client.read_exact(&mut got).unwrap();
    assert!(got == sent, "client {c}: message {n} came back altered");
}

/// After an upgrade: each client's echo of its message `in_flight` (sent before the
/// upgrade, not read yet) arrives whole and once; round trips `more` then work on every
/// session; and a new client on `addr` is served.
fn expect_sessions_kept(
    clients: &mut [TcpStream],
    in_flight: usize,
    more: std::ops::Range<usize>,
    addr: std::net::SocketAddr,
) {
    for (c, cl) in clients.iter_mut().enumerate() {
        let sent = message(c, in_flight);
        let mut got = vec![0u8; sent.len()];
        cl.read_exact(&mut got).unwrap();
        assert!(
            got == sent,
            "client {c}: the message in flight came back altered"
        );
    }
    for n in more {
        for (c, cl) in clients.iter_mut().enumerate() {
            exchange(cl, c, n);
        }
    }
    let mut fresh = client(addr);
    exchange(&mut fresh, clients.len(), 0);
}

/// Clients relaying through a running holdfast, each with a message in flight, keep their
/// sessions when a new holdfast started with `--take-over` takes them: the echo of the
/// message in flight arrives once, later round trips work, the new process listens on the
/// old one's sockets, the old process exits 0, and new clients on the same port are served
/// (by the new process).
#[test]
fn take_over_moves_every_relaying_session_to_a_new_process() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let backend_arg = backend.addr().to_string();
    let mut old = Child::spawn(&[
        "--backend",
        &backend_arg,
        "--workers",
        "2",
        "--upgrade-socket",
        &path,
    ]);
    old.wait_for_stderr("listening on", IO_TIMEOUT);
    let addr = old.addr();
    let mut clients: Vec<TcpStream> = (0..SESSIONS).map(|_| client(addr)).collect();
    for (c, cl) in clients.iter_mut().enumerate() {
        exchange(cl, c, 0);
        exchange(cl, c, 1);
    }
    // In flight across the handover: sent now, read back after it.
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.write_all(&message(c, 2)).unwrap();
    }

    let mut new = Child::spawn_on(
        addr,
        &[
            "--backend",
            &backend_arg,
            "--workers",
            "2",
            "--take-over",
            &path,
        ],
    );
    new.wait_for_stderr("upgrade: took over", WAIT);
    // The same sockets: one per old worker.
    assert!(
        new.stderr()
            .contains("starting on the old process's 2 listeners"),
        "new stderr:\n{}",
        new.stderr()
    );
    let status = old
        .wait_exit(WAIT)
        .expect("the old process exits after the handover");
    assert!(
        status.success(),
        "old process: {status}; stderr:\n{}",
        old.stderr()
    );
    assert!(
        old.stderr()
            .contains(&format!("handed {SESSIONS} sessions over")),
        "old stderr:\n{}",
        old.stderr()
    );

    // The old process is gone: a new client on the same port is served by the new one.
    expect_sessions_kept(&mut clients, 2, 3..6, addr);
    // Nothing more than was sent.
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        cl.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "client {c}: {} bytes too many", rest.len());
    }
    assert!(new.is_running(), "new stderr:\n{}", new.stderr());
}

/// A process that is not the test's child (the one SIGUSR2 started), killed on drop.
struct Orphan(u32);

impl Drop for Orphan {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until the pid file names a process for which `wanted` holds; returns that pid.
/// The file is written once the process serves, which may be just after its port accepts.
fn wait_for_pid(path: &std::path::Path, wanted: impl Fn(u32) -> bool) -> u32 {
    let mut found = None;
    wait_until_ok(WAIT, || {
        found = read_pid(path).filter(|&pid| wanted(pid));
        found
            .map(|_| ())
            .ok_or(format!("the pid file says {:?}", read_pid(path)))
    });
    found.expect("set when the wait succeeded")
}

/// `--pid-file` names the running process, and is gone once it has exited cleanly.
#[test]
fn pid_file_names_the_process_and_goes_at_exit() {
    let backend = EchoBackend::start();
    let pid_file = TempFile::new("pid", "");
    let mut hf = Child::spawn(&[
        "--backend",
        &backend.addr().to_string(),
        "--pid-file",
        pid_file.path().to_str().unwrap(),
    ]);
    let pid = hf.pid();
    wait_for_pid(pid_file.path(), |p| p == pid);
    let status = hf.signal_and_wait(libc::SIGTERM, WAIT);
    assert!(status.success(), "stderr:\n{}", hf.stderr());
    assert!(!pid_file.path().exists(), "the pid file is left behind");
}

/// `kill -USR2` on a holdfast with `--upgrade-socket` starts the same binary with the same
/// arguments, which takes every session over: the old process exits 0, every session keeps
/// working (a message in flight arrives once), the pid file names the new process.
#[test]
fn sigusr2_starts_the_same_binary_which_takes_over() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let pid_file = TempFile::new("pid", "");
    let backend_arg = backend.addr().to_string();
    let mut old = Child::spawn(&[
        "--backend",
        &backend_arg,
        "--workers",
        "2",
        "--upgrade-socket",
        socket.path().to_str().unwrap(),
        "--pid-file",
        pid_file.path().to_str().unwrap(),
    ]);
    let old_pid = old.pid();
    wait_for_pid(pid_file.path(), |p| p == old_pid);
    let addr = old.addr();
    let mut clients: Vec<TcpStream> = (0..SESSIONS).map(|_| client(addr)).collect();
    for (c, cl) in clients.iter_mut().enumerate() {
        exchange(cl, c, 0);
    }
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.write_all(&message(c, 1)).unwrap();
    }

    old.signal(libc::SIGUSR2);
    let status = old
        .wait_exit(WAIT)
        .expect("the old process exits after the handover");
    // The new process logs to the same stderr.
    let log = old.stderr();
    assert!(status.success(), "old process: {status}; stderr:\n{log}");
    assert!(log.contains("upgrade: took over"), "stderr:\n{log}");
    assert!(
        log.contains(&format!("handed {SESSIONS} sessions over")),
        "stderr:\n{log}"
    );
    // The new process writes it once it serves, which may be just after the old one left.
    let new_pid = wait_for_pid(pid_file.path(), |p| p != old_pid);
    let _new = Orphan(new_pid);
    assert!(
        std::path::Path::new(&format!("/proc/{new_pid}")).exists(),
        "the pid file names no running process"
    );

    expect_sessions_kept(&mut clients, 1, 2..4, addr);
}

/// Waits for `needle` followed by a pid in the log; returns the pid.
fn pid_after(hf: &Child, needle: &str) -> u32 {
    let mut pid = None;
    wait_until_ok(WAIT, || {
        let log = hf.stderr();
        pid = log
            .split(needle)
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|n| n.trim().parse().ok());
        pid.map(|_| ())
            .ok_or(format!("no {needle:?} on stderr:\n{log}"))
    });
    pid.expect("set when the wait succeeded")
}

/// SIGUSR2 starts the binary at the path this process was started from: when that is a
/// program that never takes over, a second SIGUSR2 is refused while it runs; when it exits,
/// and when nothing can be started there at all, the running holdfast says why and keeps
/// serving its sessions and new ones.
#[test]
fn sigusr2_upgrade_that_cannot_happen_keeps_serving() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("usr2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("holdfast");
    let _ = std::fs::remove_file(&exe);
    // A link, not a copy: no file open for writing that a parallel fork could hold (ETXTBSY).
    if std::fs::hard_link(env!("CARGO_BIN_EXE_holdfast"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_holdfast"), &exe).unwrap();
    }
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let mut old = Child::spawn_exe(
        &exe,
        &[
            "--backend",
            &backend.addr().to_string(),
            "--upgrade-socket",
            socket.path().to_str().unwrap(),
        ],
    );
    let mut cl = client(old.addr());
    exchange(&mut cl, 0, 0);

    // The "new build": a program that never connects.
    let script = dir.join("holdfast.new");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&script, &exe).unwrap();

    old.signal(libc::SIGUSR2);
    let sleeper = pid_after(&old, "to take over (pid ");
    let guard = Orphan(sleeper);
    old.signal(libc::SIGUSR2);
    old.wait_for_stderr("an upgrade is under way already; refused", WAIT);
    exchange(&mut cl, 0, 1);
    drop(guard);
    old.wait_for_stderr("exited (signal: 9", WAIT);
    assert!(
        old.stderr().contains("before taking over"),
        "stderr:\n{}",
        old.stderr()
    );
    exchange(&mut cl, 0, 2);

    // Nothing at that path: the next SIGUSR2 is accepted, and fails at once.
    std::fs::remove_file(&exe).unwrap();
    old.signal(libc::SIGUSR2);
    old.wait_for_stderr("upgrade failed, still serving: cannot start", WAIT);
    exchange(&mut cl, 0, 3);
    let mut fresh = client(old.addr());
    exchange(&mut fresh, 1, 0);
    assert!(old.is_running(), "stderr:\n{}", old.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Sessions not relaying yet, backend state and metrics across an upgrade
// ---------------------------------------------------------------------------------------------

/// One request to the admin endpoint: the status line's code and the body.
fn admin_request(admin: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&admin, IO_TIMEOUT).unwrap();
    set_timeouts(&s);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of the `/metrics` sample named exactly `sample` (labels included).
fn sample(admin: std::net::SocketAddr, sample: &str) -> Option<f64> {
    let (_, body) = admin_request(admin, "GET", "/metrics");
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.trim().parse().ok())?
    })
}

/// Waits until `/metrics` says `sample` is `value`.
fn wait_for_sample(admin: std::net::SocketAddr, name: &str, value: f64) {
    wait_until_ok(WAIT, || match sample(admin, name) {
        Some(v) if v == value => Ok(()),
        other => Err(format!("{name} is {other:?}, waiting for {value}")),
    });
}

/// `--take-over` from `old` with `args`; waits until the old process has exited 0 and says
/// it handed `sessions` over.
fn take_over_from(old: &mut Child, path: &str, args: &[&str], sessions: usize) -> Child {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--take-over", path]);
    let new = Child::spawn_on(old.addr(), &all);
    new.wait_for_stderr("upgrade: took over", WAIT);
    let Some(status) = old.wait_exit(WAIT) else {
        panic!(
            "the old process did not exit after the handover; stderr:\n{}\nnew stderr:\n{}",
            old.stderr(),
            new.stderr()
        );
    };
    assert!(
        status.success(),
        "old process: {status}; stderr:\n{}",
        old.stderr()
    );
    assert!(
        old.stderr()
            .contains(&format!("handed {sessions} sessions over")),
        "old stderr:\n{}",
        old.stderr()
    );
    new
}

/// A client waiting in the queue (`--max-conns-per-backend 1`, the one slot held by another
/// client) when a new process takes over moves with it, its request bytes unread: the old
/// process exits at once (it keeps nothing), the queued client is still waiting in the new
/// process while the slot is held, and is served there, its bytes relayed once, as soon as
/// the slot frees.
#[test]
fn a_queued_session_is_served_by_the_new_process_once_a_slot_frees() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let backend_arg = backend.addr().to_string();
    let args = [
        "--backend",
        &backend_arg,
        "--workers",
        "2",
        "--max-conns-per-backend",
        "1",
        "--max-queue",
        "10",
        "--queue-timeout",
        "60s",
        "--admin",
        "127.0.0.1:0",
    ];
    let mut old_args = args.to_vec();
    old_args.extend(["--upgrade-socket", &path]);
    // No readiness probe: its connection would be a session of its own.
    let mut old = Child::quiet().spawn(&old_args);
    let admin = old.admin_addr(WAIT);
    let addr = old.addr();
    let mut holder = client(addr);
    exchange(&mut holder, 0, 0);
    let mut waiting = client(addr);
    waiting.write_all(&message(1, 0)).unwrap();
    wait_for_sample(admin, "holdfast_queue_length", 1.0);

    let new = take_over_from(&mut old, &path, &args, 2);
    let new_admin = new.admin_addr(WAIT);
    // Adopted by a worker of the new process just after the handover's last message.
    wait_for_sample(new_admin, "holdfast_queue_length", 1.0);
    // Still waiting: the slot is the holder's, in the new process too.
    waiting.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.peek(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the queued client got {early:?} while the slot was held"
    );
    waiting.set_nonblocking(false).unwrap();
    exchange(&mut holder, 0, 1);

    drop(holder);
    let sent = message(1, 0);
    let mut got = vec![0u8; sent.len()];
    waiting.read_exact(&mut got).unwrap();
    assert!(got == sent, "the queued client's bytes came back altered");
    exchange(&mut waiting, 1, 1);
    assert_eq!(sample(new_admin, "holdfast_queue_length"), Some(0.0));

    // The new process counts the take-over that started it and the sessions it received.
    assert_eq!(
        sample(new_admin, "holdfast_upgrades_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(new_admin, "holdfast_upgrades_total{result=\"failed\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(new_admin, "holdfast_sessions_handed_over_total"),
        Some(2.0)
    );
    let pause = sample(new_admin, "holdfast_upgrade_pause_seconds_max").unwrap_or(0.0);
    assert!(pause > 0.0 && pause < 30.0, "pause {pause}");
    let started = sample(new_admin, "holdfast_start_time_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 600.0 && started <= now,
        "start {started}, now {now}"
    );
    let version = format!(
        "holdfast_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(new_admin, &version), Some(1.0));
}

/// A new process that hangs up in the middle of the handover fails the upgrade: the old
/// process keeps serving, and counts it under `holdfast_upgrades_total{result="failed"}`.
#[test]
fn a_failed_upgrade_is_counted_by_the_old_process() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let backend_arg = backend.addr().to_string();
    let old = Child::quiet().spawn(&[
        "--backend",
        &backend_arg,
        "--admin",
        "127.0.0.1:0",
        "--upgrade-socket",
        socket.path().to_str().unwrap(),
    ]);
    let admin = old.admin_addr(WAIT);
    let mut cl = client(old.addr());
    exchange(&mut cl, 0, 0);
    // A stand-in new process: reads the hello, then hangs up without an answer.
    let mut stand_in = std::os::unix::net::UnixStream::connect(socket.path()).unwrap();
    stand_in.set_read_timeout(Some(WAIT)).unwrap();
    let mut hello = [0u8; 9];
    stand_in.read_exact(&mut hello).unwrap();
    drop(stand_in);
    wait_for_sample(admin, "holdfast_upgrades_total{result=\"failed\"}", 1.0);
    assert_eq!(
        sample(admin, "holdfast_upgrades_total{result=\"ok\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(admin, "holdfast_sessions_handed_over_total"),
        Some(0.0)
    );
    exchange(&mut cl, 0, 1);
}

/// A client whose backend connect is under way (the backend's accept queue is full, so the
/// SYN goes unanswered) when a new process takes over moves with both sockets: the old
/// process exits at once, and once the backend has room the connect completes in the new
/// process, which relays the bytes the client sent before the upgrade.
#[test]
fn a_connecting_session_completes_in_the_new_process() {
    let (listener, fillers, backend_addr) = hung_listener(localhost0());
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let backend_arg = backend_addr.to_string();
    let args = [
        "--backend",
        &backend_arg,
        "--workers",
        "2",
        "--connect-timeout",
        "60s",
        "--health-check",
        "none",
        "--admin",
        "127.0.0.1:0",
    ];
    let mut old_args = args.to_vec();
    old_args.extend(["--upgrade-socket", &path]);
    // No readiness probe: its connection would be a session of its own.
    let mut old = Child::quiet().spawn(&old_args);
    let admin = old.admin_addr(WAIT);
    let mut cl = client(old.addr());
    cl.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    cl.write_all(b"sent while connecting").unwrap();
    let active = format!(
        "holdfast_backend_sessions_active{{service=\"default\",backend=\"{backend_addr}\"}}"
    );
    wait_for_sample(admin, &active, 1.0);

    let new = take_over_from(&mut old, &path, &args, 1);
    wait_for_sample(new.admin_addr(WAIT), &active, 1.0);
    // Room in the backend's queue: the retransmitted SYN is answered, and served (the
    // fillers' connections too, echoed to nobody).
    std::thread::spawn(move || {
        let _fillers = fillers;
        while let Ok((conn, _)) = listener.accept() {
            let mut conn: TcpStream = conn.into();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut got = [0u8; 21];
    cl.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"sent while connecting");
    exchange(&mut cl, 2, 0);
}

/// The backends' running state moves with the sessions: a backend drained through the old
/// process's admin API is still drained in the new one (no new client reaches it), one that
/// probes marked down there is down in the new one right after the take-over (whose own
/// first probe of it is twenty seconds away), and a weight set at run time is kept.
#[test]
fn backend_state_survives_the_upgrade() {
    let drained = TaggedBackend::start("drained");
    let serving = TaggedBackend::start("serving");
    let down = closed_port();
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let (d, s, x) = (
        drained.addr().to_string(),
        serving.addr().to_string(),
        down.addr().to_string(),
    );
    let backends = ["--backend", &d, "--backend", &x, "--backend", &s];
    let mut old_args = backends.to_vec();
    old_args.extend([
        "--health-interval",
        "50ms",
        "--fall",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--upgrade-socket",
        &path,
    ]);
    let mut old = Child::quiet().spawn(&old_args);
    let admin = old.admin_addr(WAIT);
    let (code, body) = admin_request(admin, "POST", &format!("/backends/{d}/drain"));
    assert_eq!(code, 200, "{body}");
    let mut s_weight = TcpStream::connect_timeout(&admin, IO_TIMEOUT).unwrap();
    set_timeouts(&s_weight);
    s_weight
        .write_all(
            format!(
                "POST /backends/{s}/weight HTTP/1.1\r\nHost: admin\r\nContent-Length: 1\r\n\
                 Connection: close\r\n\r\n7"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut answer = String::new();
    s_weight.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let state = |addr: &str, state: &str| {
        format!(
            "holdfast_backend_state{{service=\"default\",backend=\"{addr}\",state=\"{state}\"}}"
        )
    };
    wait_for_sample(admin, &state(&x, "down"), 1.0);
    wait_for_sample(admin, &state(&d, "drain"), 1.0);

    let mut new_args = backends.to_vec();
    new_args.extend(["--health-interval", "60s", "--admin", "127.0.0.1:0"]);
    let new = take_over_from(&mut old, &path, &new_args, 0);
    let new_admin = new.admin_addr(WAIT);
    assert_eq!(sample(new_admin, &state(&x, "down")), Some(1.0));
    assert_eq!(sample(new_admin, &state(&d, "drain")), Some(1.0));
    assert_eq!(
        sample(
            new_admin,
            &format!("holdfast_backend_weight{{service=\"default\",backend=\"{s}\"}}")
        ),
        Some(7.0)
    );
    let tags = tags_of_new_clients(old.addr(), 6);
    assert_eq!(count_tag(&tags, "serving"), 6, "{tags:?}");
}

/// A connect handed over and then refused (the backend went away meanwhile) is retried by
/// the new process on another backend of its own configuration, and the client is served
/// there with the bytes it sent before the upgrade.
#[test]
fn a_connecting_session_retries_on_another_backend_in_the_new_process() {
    let (listener, fillers, hung) = hung_listener(localhost0());
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let (hung_arg, echo_arg) = (hung.to_string(), backend.addr().to_string());
    let common = [
        "--workers",
        "2",
        "--connect-timeout",
        "60s",
        "--health-check",
        "none",
        "--admin",
        "127.0.0.1:0",
    ];
    let mut old_args = vec!["--backend", &hung_arg];
    old_args.extend(common);
    old_args.extend(["--upgrade-socket", &path]);
    let mut old = Child::quiet().spawn(&old_args);
    let admin = old.admin_addr(WAIT);
    let mut cl = client(old.addr());
    cl.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    cl.write_all(b"sent while connecting").unwrap();
    let active =
        format!("holdfast_backend_sessions_active{{service=\"default\",backend=\"{hung}\"}}");
    wait_for_sample(admin, &active, 1.0);

    let mut new_args = vec!["--backend", &hung_arg, "--backend", &echo_arg];
    new_args.extend(common);
    let new = take_over_from(&mut old, &path, &new_args, 1);
    let new_admin = new.admin_addr(WAIT);
    wait_for_sample(new_admin, &active, 1.0);
    // The backend goes away: its next SYN is refused.
    drop((listener, fillers));
    let mut got = [0u8; 21];
    cl.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"sent while connecting");
    exchange(&mut cl, 3, 0);
    assert_eq!(
        sample(new_admin, "holdfast_connect_failures_total"),
        Some(1.0)
    );
}

/// Two services from a `--config` file, both relaying to the same backend, sessions on both
/// with a message in flight: SIGUSR2's new process takes every session, each to the service
/// of the same name (its counts say so), and both ports serve new clients.
#[test]
fn an_upgrade_keeps_the_sessions_of_every_service() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let pid_file = TempFile::new("pid", "");
    let (_held, second) = crate::config_file::reserved_port();
    let service = |name: &str, listen: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [\"{}\"]\n\n",
            backend.addr()
        )
    };
    let text = format!(
        "workers = 2\nadmin = \"127.0.0.1:0\"\nupgrade_socket = \"{}\"\npid_file = \"{}\"\n\n{}{}",
        socket.path().display(),
        pid_file.path().display(),
        service("ws", "{listen}"),
        service("db", &second.to_string()),
    );
    let (mut old, _file) = Child::spawn_config(&text);
    let old_pid = old.pid();
    wait_for_pid(pid_file.path(), |p| p == old_pid);
    let first = old.addr();
    let mut on_ws: Vec<TcpStream> = (0..3).map(|_| client(first)).collect();
    let mut on_db: Vec<TcpStream> = (0..2).map(|_| client(second)).collect();
    for (c, cl) in on_ws.iter_mut().chain(on_db.iter_mut()).enumerate() {
        exchange(cl, c, 0);
        cl.write_all(&message(c, 1)).unwrap();
    }

    old.signal(libc::SIGUSR2);
    let status = old
        .wait_exit(WAIT)
        .expect("the old process exits after the handover");
    let log = old.stderr();
    assert!(status.success(), "old process: {status}; stderr:\n{log}");
    assert!(log.contains("handed 5 sessions over"), "stderr:\n{log}");
    let new_pid = wait_for_pid(pid_file.path(), |p| p != old_pid);
    let _new = Orphan(new_pid);

    // Every session goes on, in both services.
    for (c, cl) in on_ws.iter_mut().chain(on_db.iter_mut()).enumerate() {
        let sent = message(c, 1);
        let mut got = vec![0u8; sent.len()];
        cl.read_exact(&mut got).unwrap();
        assert!(
            got == sent,
            "client {c}: the message in flight came back altered"
        );
        exchange(cl, c, 2);
    }
    // Each counted under its own service in the new process.
    let log = old.stderr();
    let admin: std::net::SocketAddr = log
        .rsplit("admin endpoint on http://")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin address:\n{log}"));
    let active = |service: &str| {
        format!(
            "holdfast_backend_sessions_active{{service=\"{service}\",backend=\"{}\"}}",
            backend.addr()
        )
    };
    wait_for_sample(admin, &active("ws"), 3.0);
    wait_for_sample(admin, &active("db"), 2.0);
    // Both ports serve new clients.
    for addr in [first, second] {
        let mut fresh = client(addr);
        exchange(&mut fresh, 9, 0);
    }
}
