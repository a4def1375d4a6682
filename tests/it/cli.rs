//! The `holdfast` binary as a user runs it: help, usage errors, start failures, a relayed
//! round trip and a clean exit on SIGTERM.

use std::net::TcpListener;
use std::time::Duration;

use crate::util::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether `help` mentions the short flag `-x` on its own (not as part of `--x...`).
fn mentions_short(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        before != Some('-') && !after.is_some_and(|c| c.is_alphanumeric() || c == '-')
    })
}

#[test]
fn help_lists_every_flag() {
    let out = run_binary(&["--help"], RUN_TIMEOUT);
    assert!(out.status.success(), "--help exited with {}", out.status);
    let help = text(&out.stdout) + &text(&out.stderr);
    for long in [
        "--listen",
        "--backend",
        "--algorithm",
        "--workers",
        "--relay",
        "--connect-timeout",
        "--retries",
        "--idle-timeout",
        "--tcp-keepalive",
        "--defer-accept",
        "--pipe-memory",
        "--max-conns",
        "--backlog",
        "--log-level",
        "--send-proxy",
        "--health-send-proxy",
        "--accept-proxy",
        "--trusted-proxy",
        "--proxy-header-timeout",
        "--allow",
        "--deny",
        "--max-conns-per-ip",
        "--max-conn-rate-per-ip",
        "--ipv6-prefix",
        "--tcp-user-timeout",
    ] {
        assert!(
            help.contains(long),
            "--help does not mention {long}:\n{help}"
        );
    }
    for short in ["-l", "-b", "-a"] {
        assert!(
            mentions_short(&help, short),
            "--help does not mention {short}:\n{help}"
        );
    }
}

/// Runs with `args`, expects exit code 2 and a one-line `error:` message on stderr that
/// mentions `needle`; returns stderr.
#[track_caller]
fn usage_error(args: &[&str], needle: &str) -> String {
    let out = run_binary(args, RUN_TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "holdfast {args:?} exited with {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.starts_with("error:"),
        "stderr does not start with 'error:':\n{stderr}"
    );
    let first_line = stderr.lines().next().unwrap_or_default();
    assert!(
        first_line.contains(needle),
        "the error line does not name {needle:?}:\n{stderr}"
    );
    assert!(out.stdout.is_empty(), "usage error printed on stdout");
    stderr
}

/// A backend address for runs that must fail before connecting anywhere.
fn backend_arg() -> (ClosedPort, String) {
    let closed = closed_port();
    let arg = closed.addr().to_string();
    (closed, arg)
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(
        &["--listen", "127.0.0.1:0", "--backend", &b, "--frobnicate"],
        "frobnicate",
    );
}

#[test]
fn accept_proxy_without_a_trusted_proxy_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(
        &["--listen", "127.0.0.1:0", "--backend", &b, "--accept-proxy"],
        "--trusted-proxy",
    );
}

#[test]
fn bad_cidr_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &b,
            "--deny",
            "10.0.0/8",
        ],
        "10.0.0/8",
    );
}

#[test]
fn bad_listen_address_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(&["--listen", "nonsense", "--backend", &b], "nonsense");
}

#[test]
fn bad_duration_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &b,
            "--idle-timeout",
            "5 parsecs",
        ],
        "5 parsecs",
    );
}

#[test]
fn bad_algorithm_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    usage_error(
        &["-l", "127.0.0.1:0", "-b", &b, "--algorithm", "random"],
        "random",
    );
}

#[test]
fn zero_weight_is_a_usage_error() {
    let (_closed, b) = backend_arg();
    let b = format!("{b},weight=0");
    usage_error(&["-l", "127.0.0.1:0", "-b", &b], "weight=0");
}

#[test]
fn port_in_use_is_a_runtime_error() {
    // A plain std listener: no SO_REUSEPORT, so holdfast's bind must fail.
    let taken = TcpListener::bind(localhost0()).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_closed, b) = backend_arg();
    let out = run_binary(&["--listen", &addr, "--backend", &b], RUN_TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exited with {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&addr),
        "stderr does not say it cannot listen on {addr}:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "printed on stdout:\n{}",
        text(&out.stdout)
    );
}

#[test]
fn relays_and_exits_cleanly_on_sigterm() {
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&[
        "--backend",
        &b,
        "--workers",
        "2",
        "--drain-timeout",
        "200ms",
        "--close-spread",
        "200ms",
    ]);
    let mut c = client(child.addr());
    round_trip(&mut c, b"through the real binary");
    let status = child.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}; stderr:\n{}",
        child.stderr()
    );
    assert_eq!(child.stdout(), "", "holdfast printed on stdout");
    // The session outlived the signal until the drain timeout, then ended with a clean FIN.
    let (how, _) = expect_closed(&mut c, Duration::from_secs(2));
    assert!(
        matches!(how, Closed::Eof),
        "the drained session ended with {how:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Values that used to be accepted silently, and errors that did not say enough
// ---------------------------------------------------------------------------------------------

#[test]
fn rise_fall_and_probe_timing_are_checked_even_without_probes() {
    // Without probes, --rise and --health-interval still time the retry of a backend taken
    // down by passive detection: --rise 0 brought it straight back.
    let (_closed, b) = backend_arg();
    for (flag, value) in [
        ("--rise", "0"),
        ("--fall", "0"),
        ("--health-interval", "0"),
        ("--health-timeout", "0"),
    ] {
        usage_error(
            &[
                "-l",
                "127.0.0.1:0",
                "-b",
                &b,
                "--health-check",
                "none",
                flag,
                value,
            ],
            flag,
        );
    }
}

#[test]
fn backend_port_zero_is_a_usage_error() {
    usage_error(&["-l", "127.0.0.1:0", "-b", "127.0.0.1:0"], "port 0");
    usage_error(
        &["-l", "127.0.0.1:0", "--backend-dns", "localhost:0"],
        "port 0",
    );
    let file = TempFile::new(
        "backends",
        "# one good, one not\n127.0.0.1:9\n127.0.0.1:0\n",
    );
    let path = file.path().to_str().unwrap();
    let err = usage_error(&["-l", "127.0.0.1:0", "--backends-file", path], "port 0");
    assert!(
        err.contains(&format!("{path}:3")),
        "the error does not name {path}:3:\n{err}"
    );
}

#[test]
fn the_same_listen_address_twice_is_a_usage_error() {
    // A port nobody listens on: were the duplicate not caught, the bind would fail instead
    // (exit 1), or both listeners would share the port.
    let (_closed, b) = backend_arg();
    let (_listen, l) = backend_arg();
    usage_error(&["-l", &l, "-l", &l, "-b", &b], "twice");
}

#[test]
fn a_negative_duration_says_so() {
    let (_closed, b) = backend_arg();
    let err = usage_error(
        &["-l", "127.0.0.1:0", "-b", &b, "--connect-timeout", "-1s"],
        "--connect-timeout",
    );
    let line = err.lines().next().unwrap_or_default();
    assert!(
        line.contains("-1s") && line.contains("negative"),
        "the error does not say that '-1s' is negative:\n{err}"
    );
}

#[test]
fn a_bad_log_level_lists_the_valid_ones() {
    let (_closed, b) = backend_arg();
    let err = usage_error(
        &["-l", "127.0.0.1:0", "-b", &b, "--log-level", "loud"],
        "loud",
    );
    let line = err.lines().next().unwrap_or_default();
    for level in ["off", "error", "warn", "info", "debug", "trace"] {
        assert!(
            line.contains(level),
            "the error does not list {level}:\n{err}"
        );
    }
}

#[test]
fn no_backend_source_names_all_three() {
    let err = usage_error(&["-l", "127.0.0.1:0"], "--backend");
    let line = err.lines().next().unwrap_or_default();
    for flag in ["--backends-file", "--backend-dns"] {
        assert!(
            line.contains(flag),
            "the error does not name {flag}:\n{err}"
        );
    }
}

#[test]
fn far_more_workers_than_cores_is_warned_about() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = (2 * cores + 1).to_string();
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&["-b", &b, "--workers", &workers]);
    wait_until_ok(Duration::from_secs(5), || {
        let err = child.stderr();
        if err
            .lines()
            .any(|l| l.contains("WARN") && l.contains("--workers") && l.contains(&workers))
        {
            Ok(())
        } else {
            Err(format!("no warning about --workers {workers}:\n{err}"))
        }
    });
    // It is a warning, not an error: holdfast runs.
    let mut c = client(child.addr());
    round_trip(&mut c, b"many workers");
    drop(c);
    let status = child.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", child.stderr());
}

/// `--defer-accept` as `--check` prints it is taken back unchanged, with or without its
/// optional duration, and `--pipe-memory` likewise; a bad value is a one-line error, exit 2.
#[test]
fn defer_accept_and_pipe_memory_round_trip_through_check() {
    let check = |extra: &[&str]| {
        let mut args = vec!["--check", "-l", "127.0.0.1:0", "-b", "127.0.0.1:7000"];
        args.extend_from_slice(extra);
        let out = run_binary(&args, RUN_TIMEOUT);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let value = |printed: &str, key: &str| -> String {
        let prefix = format!("{key} = ");
        printed
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {key} line in:\n{printed}"))
            .to_string()
    };
    let defaults = check(&[]);
    assert_eq!(value(&defaults, "defer-accept"), "0", "off by default");
    assert_eq!(value(&defaults, "pipe-memory"), "16MiB");
    let bare = check(&["--defer-accept"]);
    assert_eq!(value(&bare, "defer-accept"), "1s", "no value means 1s");
    for (flags, defer, memory) in [
        (
            ["--defer-accept", "5s", "--pipe-memory", "512KiB"],
            "5s",
            "512KiB",
        ),
        (["--defer-accept", "2m", "--pipe-memory", "0"], "2m", "0"),
    ] {
        let printed = check(&flags);
        assert_eq!(
            (
                value(&printed, "defer-accept"),
                value(&printed, "pipe-memory")
            ),
            (defer.to_string(), memory.to_string())
        );
        let d = value(&printed, "defer-accept");
        let m = value(&printed, "pipe-memory");
        let again = check(&["--defer-accept", &d, "--pipe-memory", &m]);
        assert_eq!(again, printed, "--check's values given back change nothing");
    }
    for bad in [
        ["--defer-accept", "soon"],
        ["--defer-accept", "11m"],
        ["--pipe-memory", "lots"],
    ] {
        let mut args = vec!["-l", "127.0.0.1:0", "-b", "127.0.0.1:7000"];
        args.extend_from_slice(&bad);
        let out = run_binary(&args, RUN_TIMEOUT);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(
            err.starts_with("error:") && err.trim_end().lines().count() <= 3,
            "{bad:?}: not a short error:\n{err}"
        );
    }
}
