//! End-to-end tests of the `holdfast-load` binary: a real echo-server on an
//! ephemeral loopback port, every mode run briefly against it with
//! `--json`, and assertions on what a user would read in the report.
//! Every child process is owned by a guard that kills it on drop, so a
//! failing assertion never leaves a server behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast-load");

/// Longest any single invocation may take before the test gives up.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// Kills (SIGKILL) and reaps the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running echo-server and the address it reported.
struct Echo {
    guard: Guard,
    stdout: BufReader<ChildStdout>,
    addr: String,
}

fn echo_server(extra: &[&str]) -> Echo {
    let mut child = Command::new(BIN)
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn echo-server");
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = Guard(child);
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from echo-server: {line:?}"))
        .to_owned();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "bad address {addr}"
    );
    Echo {
        guard,
        stdout,
        addr,
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary to completion (bounded by RUN_LIMIT).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holdfast-load");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let mut guard = Guard(child);
    // Drain both pipes concurrently so a chatty child cannot block.
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_for(&mut guard, RUN_LIMIT)
        .unwrap_or_else(|| panic!("holdfast-load {args:?} did not finish within {RUN_LIMIT:?}"));
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

fn wait_for(guard: &mut Guard, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = guard.0.try_wait().expect("try_wait") {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Runs a mode with `--json`, expects success and one JSON object on stdout.
fn run_json(args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let out = run(&all);
    assert!(
        out.status.success(),
        "holdfast-load {all:?} failed ({}): {}\n{}",
        out.status,
        out.stderr,
        out.stdout
    );
    parse_json(&out.stdout)
}

fn parse_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not an integer in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"))
}

fn sigterm(guard: &Guard) {
    let status = Command::new("kill")
        .args(["-TERM", &guard.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// A loopback port with nothing listening on it, for as long as the socket lives: bound but
/// never listening, so connects are refused as to a closed port, and no other test's port-0
/// bind can take the port meanwhile (as it could after a bind, a look and a close).
fn closed_port() -> (Socket, String) {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    sock.bind(&any.into()).expect("bind");
    let addr = sock
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("an IPv4 address");
    (sock, addr.to_string())
}

#[test]
fn echo_server_echoes_and_summarises_on_sigterm() {
    let mut echo = echo_server(&[]);
    let mut conn = TcpStream::connect(&echo.addr).expect("connect to echo-server");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(b"holdfast").expect("write");
    let mut back = [0u8; 8];
    conn.read_exact(&mut back).expect("read echo");
    assert_eq!(&back, b"holdfast");
    drop(conn);

    sigterm(&echo.guard);
    let status = wait_for(&mut echo.guard, Duration::from_secs(5)).expect("exit after SIGTERM");
    assert!(status.success(), "echo-server exited with {status}");
    let mut summary = String::new();
    echo.stdout
        .read_to_string(&mut summary)
        .expect("read summary");
    assert!(
        summary.contains("accepted 1 connections"),
        "summary: {summary:?}"
    );
}

#[test]
fn echo_server_banner_comes_before_the_echo() {
    let echo = echo_server(&["--banner", "backend A"]);
    let mut conn = TcpStream::connect(&echo.addr).expect("connect to echo-server");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut banner = [0u8; 10];
    conn.read_exact(&mut banner)
        .expect("read banner without sending");
    assert_eq!(&banner, b"backend A\n");
    conn.write_all(b"ping").expect("write");
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).expect("read echo");
    assert_eq!(&back, b"ping");
}

#[test]
fn latency_completes_every_scheduled_request() {
    let echo = echo_server(&[]);
    let r = run_json(&[
        "latency",
        "--target",
        &echo.addr,
        "--conns",
        "4",
        "--rate",
        "2000",
        "--size",
        "64",
        "--duration",
        "300ms",
        "--warmup",
        "50ms",
    ]);
    assert_eq!(r["mode"], "latency");
    let completed = u(&r, "completed");
    assert!(completed > 0, "{r}");
    assert_eq!(u(&r, "errors"), 0, "{r}");
    assert_eq!(u(&r, "timed_out"), 0, "{r}");
    assert_eq!(u(&r, "scheduled"), completed, "{r}");
    assert_eq!(u(&r, "sent"), completed, "{r}");
    assert!(f(&r, "achieved_rate") > 0.0, "{r}");
    let lat = &r["latency_us"];
    assert!(f(lat, "p50") > 0.0, "{r}");
    assert!(
        f(lat, "p50") <= f(lat, "p90") && f(lat, "p90") <= f(lat, "p99"),
        "{r}"
    );
    assert!(
        f(lat, "p99") <= f(lat, "p99_9") && f(lat, "p99_9") <= f(lat, "max"),
        "{r}"
    );
}

#[test]
fn latency_large_requests_over_two_threads() {
    // 100 kB requests cannot go out in one write: exercises partial writes
    // in the generator and pending buffers in the echo-server.
    let echo = echo_server(&["--threads", "2"]);
    let r = run_json(&[
        "latency",
        "--target",
        &echo.addr,
        "--conns",
        "4",
        "--rate",
        "200",
        "--size",
        "100000",
        "--duration",
        "300ms",
        "--threads",
        "2",
        "--no-spin",
    ]);
    assert_eq!(u(&r, "threads"), 2);
    assert!(u(&r, "completed") > 0, "{r}");
    assert_eq!(u(&r, "errors"), 0, "{r}");
    assert_eq!(u(&r, "conn_errors"), 0, "{r}");
}

#[test]
fn bulk_echo_and_oneway_move_bytes() {
    let echo = echo_server(&[]);
    let r = run_json(&[
        "bulk",
        "--target",
        &echo.addr,
        "--streams",
        "2",
        "--duration",
        "300ms",
    ]);
    assert_eq!(r["transfer"], "echo");
    assert!(u(&r, "tx_bytes") > 0 && u(&r, "rx_bytes") > 0, "{r}");
    assert!(f(&r, "tx_gbit_per_s") > 0.0, "{r}");
    assert_eq!(u(&r, "errors"), 0, "{r}");
    assert_eq!(r["verified"], true, "{r}");

    let r = run_json(&[
        "bulk",
        "--target",
        &echo.addr,
        "--duration",
        "300ms",
        "--mode",
        "oneway",
    ]);
    assert_eq!(r["transfer"], "oneway");
    assert!(u(&r, "tx_bytes") > 0, "{r}");
    assert!(r["verified"].is_null(), "{r}");
}

#[test]
fn connect_rate_cycles_with_fin_and_rst() {
    let echo = echo_server(&[]);
    for extra in [None, Some("--rst")] {
        let mut args = vec![
            "connect-rate",
            "--target",
            &echo.addr,
            "--concurrency",
            "8",
            "--duration",
            "300ms",
        ];
        args.extend(extra);
        let r = run_json(&args);
        assert!(u(&r, "completed") > 0, "{r}");
        assert_eq!(u(&r, "failures"), 0, "{r}");
        assert_eq!(u(&r, "source_ips"), 16, "{r}");
        assert!(f(&r, "conns_per_sec") > 0.0, "{r}");
        assert!(f(&r["connect_latency_us"], "p50") > 0.0, "{r}");
        assert!(
            f(&r["cycle_latency_us"], "p99") >= f(&r["cycle_latency_us"], "p50"),
            "{r}"
        );
    }
}

#[test]
fn hold_establishes_every_connection() {
    let echo = echo_server(&[]);
    let r = run_json(&[
        "hold", "--target", &echo.addr, "--conns", "64", "--hold", "200ms",
    ]);
    assert_eq!(u(&r, "established"), 64, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert_eq!(u(&r, "dropped"), 0, "{r}");
    assert!(f(&r, "held_s") >= 0.2, "{r}");
}

#[test]
fn hold_announces_then_reports_on_sigterm() {
    let echo = echo_server(&[]);
    let mut child = Command::new(BIN)
        .args(["hold", "--target", &echo.addr, "--conns", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hold");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut guard = Guard(child);
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read holding line");
    assert_eq!(line.trim(), "holding 20");

    sigterm(&guard);
    let status = wait_for(&mut guard, Duration::from_secs(5)).expect("exit after SIGTERM");
    assert!(status.success(), "hold exited with {status}");
    let mut summary = String::new();
    stdout.read_to_string(&mut summary).expect("read summary");
    assert!(
        summary.contains("established 20  failed 0"),
        "summary: {summary:?}"
    );
}

#[test]
fn storm_connects_all_and_reads_backend_report() {
    let report =
        std::env::temp_dir().join(format!("holdfast-load-storm-{}.json", std::process::id()));
    let report_path = report.to_string_lossy().into_owned();
    let echo = echo_server(&["--report-file", &report_path]);
    let r = run_json(&[
        "storm",
        "--target",
        &echo.addr,
        "--conns",
        "200",
        "--report-files",
        &report_path,
    ]);
    let _ = std::fs::remove_file(&report);
    assert_eq!(u(&r, "connected"), 200, "{r}");
    assert_eq!(u(&r, "failures"), 0, "{r}");
    assert_eq!(r["all_connected"], true, "{r}");
    assert!(f(&r, "time_to_all_ms") > 0.0, "{r}");
    assert!(f(&r["connect_latency_us"], "max") > 0.0, "{r}");
    let backend = &r["backends"][0];
    assert!(backend["error"].is_null(), "{r}");
    assert_eq!(u(backend, "accepted"), 200, "{r}");
    // The storm may straddle a one-second boundary, but not evenly twice.
    assert!(u(backend, "peak_accepts_per_sec") >= 100, "{r}");
}

#[test]
fn unreachable_target_is_counted_not_fatal() {
    let (_reserved, target) = closed_port();
    let out = run(&[
        "connect-rate",
        "--target",
        &target,
        "--concurrency",
        "4",
        "--duration",
        "200ms",
        "--json",
    ]);
    // A report is still printed; exit status 1 says nothing succeeded.
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    let r = parse_json(&out.stdout);
    assert_eq!(u(&r, "completed"), 0, "{r}");
    assert!(u(&r, "failures") > 0, "{r}");
    assert!(u(&r["error_kinds"], "ConnectionRefused") > 0, "{r}");

    let out = run(&[
        "latency",
        "--target",
        &target,
        "--conns",
        "3",
        "--rate",
        "100",
        "--duration",
        "100ms",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
    let r = parse_json(&out.stdout);
    assert_eq!(u(&r, "completed"), 0, "{r}");
    assert_eq!(u(&r, "conn_errors"), 3, "{r}");
    assert_eq!(u(&r, "errors"), u(&r, "scheduled"), "{r}");
}

#[test]
fn bad_flags_fail_with_one_line_error() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["latency"],
        &["latency", "--target", "127.0.0.1:9", "--rate", "0"],
        &["latency", "--target", "127.0.0.1:9", "--duration", "soon"],
        &["bulk", "--target", "not-an-address", "--duration", "1s"],
        &["bulk", "--target", "127.0.0.1:9", "--mode", "sideways"],
        &[
            "storm",
            "--target",
            "127.0.0.1:9",
            "--conns",
            "5",
            "--source-ips",
            "300",
        ],
        &[
            "hold",
            "--target",
            "127.0.0.1:9",
            "--conns",
            "5",
            "--unknown-flag",
        ],
        // More connections than the open-file limit can hold.
        &["hold", "--target", "127.0.0.1:9", "--conns", "2000000000"],
    ];
    for args in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed to stdout: {:?}",
            out.stdout
        );
        let err = out.stderr.trim_end();
        assert_eq!(
            err.lines().count(),
            1,
            "{args:?} should print one line, got {err:?}"
        );
        assert!(err.starts_with("error:"), "{args:?}: {err:?}");
    }
}
