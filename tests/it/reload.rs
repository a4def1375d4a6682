//! Reloading the backends file (the real binary, SIGHUP) when the file is not what it should
//! be, when reloads come in a storm, and when it changes what an operator set at run time.
//!
//! A reload must never hang holdfast or eat its memory: whatever the path names, the error is
//! logged, the backends in force stay, clients are served, and SIGTERM still stops the
//! process with exit status 0.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use crate::util::*;

const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Sends SIGTERM and checks that the process exits 0 within [`STOP_WITHIN`].
#[track_caller]
fn stop_with_sigterm(child: &mut Child) {
    let status = child.signal_and_wait(libc::SIGTERM, STOP_WITHIN);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", child.stderr());
}

/// Sends SIGHUP and waits until stderr holds a line with every one of `want` in it.
#[track_caller]
fn sighup_until_logged(child: &Child, want: &[&str]) -> String {
    sighup_until_logged_within(child, want, Duration::from_secs(5))
}

#[track_caller]
fn sighup_until_logged_within(child: &Child, want: &[&str], within: Duration) -> String {
    child.signal(libc::SIGHUP);
    let mut found = String::new();
    wait_until_ok(within, || {
        let err = child.stderr();
        match err.lines().find(|l| want.iter().all(|w| l.contains(w))) {
            Some(line) => {
                found = line.to_string();
                Ok(())
            }
            None => Err(format!("no line with {want:?} on stderr:\n{err}")),
        }
    });
    found
}

/// Starts the binary on a backends file naming one echo backend, lets `spoil` replace the
/// file, sends SIGHUP, and checks that the reload fails with `why` in its log line while
/// clients are still served, and that SIGTERM then stops holdfast at once with status 0.
#[track_caller]
fn reload_fails_and_changes_nothing(spoil: impl FnOnce(&Path), why: &str) {
    let echo = EchoBackend::start();
    let file = TempFile::new("backends", &format!("{}\n", echo.addr()));
    let path = file.path().to_str().unwrap().to_string();
    let mut child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-check",
        "none",
        "--workers",
        "1",
        "--drain-timeout",
        "1s",
    ]);
    spoil(file.path());
    let line = sighup_until_logged(&child, &["reload failed", why]);
    assert!(
        line.contains(&path),
        "the error does not name {path}: {line}"
    );
    let mut c = client(child.addr());
    round_trip(&mut c, b"the backend in force before the reload");
    drop(c);
    stop_with_sigterm(&mut child);
}

#[test]
fn a_fifo_as_the_backends_file_does_not_hang_the_reload() {
    reload_fails_and_changes_nothing(
        |path| {
            std::fs::remove_file(path).unwrap();
            let made = Command::new("mkfifo")
                .arg(path)
                .status()
                .expect("run mkfifo");
            assert!(made.success(), "mkfifo {} failed", path.display());
        },
        "not a regular file",
    );
}

#[test]
fn a_symlink_to_dev_zero_is_not_read() {
    reload_fails_and_changes_nothing(
        |path| {
            std::fs::remove_file(path).unwrap();
            std::os::unix::fs::symlink("/dev/zero", path).unwrap();
        },
        "not a regular file",
    );
}

#[test]
fn a_deleted_backends_file_fails_the_reload() {
    reload_fails_and_changes_nothing(|path| std::fs::remove_file(path).unwrap(), "No such file");
}

#[test]
fn a_backends_file_over_the_size_cap_is_not_read() {
    reload_fails_and_changes_nothing(
        |path| {
            // Sparse: 17 MiB long, no disk used.
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(17 << 20).unwrap();
        },
        "larger than 16 MiB",
    );
}

/// Replaces the file's contents in one step (a rename), so a reload never reads half of it.
fn replace(file: &TempFile, contents: &str) {
    let tmp = file.path().with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, file.path()).unwrap();
}

#[test]
fn a_storm_of_sighups_while_clients_connect() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let both = format!("{}\n{}\n", a.addr(), b.addr());
    let only_a = format!("{}\n", a.addr());
    let file = TempFile::new("backends", &both);
    let path = file.path().to_str().unwrap().to_string();
    let mut child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-check",
        "none",
        "--drain-timeout",
        "1s",
    ]);
    let target = child.addr();

    // Clients visit one after another for as long as the storm lasts; every visit must work.
    let stop = Arc::new(AtomicBool::new(false));
    let visiting = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(SeqCst) {
                match visit_tagged("127.0.0.1", target, Duration::from_secs(5)) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };

    // 100 SIGHUPs in ten bursts of ten (one `kill` each), the file changing between bursts.
    let pid = child.pid().to_string();
    for burst in 0..10 {
        replace(&file, if burst % 2 == 0 { &only_a } else { &both });
        let sent = Command::new("kill")
            .arg("-HUP")
            .args(std::iter::repeat_n(&pid, 10))
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -HUP failed");
    }
    // The last burst left both backends in the file: once that is read, b takes clients again.
    wait_until_ok(Duration::from_secs(10), || {
        let tags = tags_of_new_clients(target, 4);
        if count_tag(&tags, "b") > 0 {
            Ok(())
        } else {
            Err(format!("no new client reached b after the storm: {tags:?}"))
        }
    });
    stop.store(true, SeqCst);
    let (ok, failed) = visiting.join().expect("the client thread");
    assert!(
        failed.is_empty(),
        "{} of {} visits failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0, "no client visited during the storm");
    let err = child.stderr();
    assert!(
        err.lines().any(|l| l.contains("SIGHUP: backends reloaded")),
        "no reload logged:\n{err}"
    );
    assert!(!err.contains("reload failed"), "a reload failed:\n{err}");

    stop_with_sigterm(&mut child);
}

/// `n` distinct backend lines that refuse connections (127.0.x.y, all on `closed`'s port,
/// where nothing listens).
fn refusing_lines(closed: &ClosedPort, n: usize) -> String {
    let port = closed.addr().port();
    (0..n)
        .map(|i| {
            format!(
                "127.{}.{}.{}:{port}\n",
                1 + i / 62_500,
                i / 250 % 250,
                1 + i % 250
            )
        })
        .collect()
}

#[test]
fn a_backends_file_of_100k_lines_starts_and_reloads() {
    const LINES: usize = 100_000;
    let echo = EchoBackend::start();
    let closed = closed_port();
    // The echo backend's weight makes it least-conn's first choice over the idle others.
    let contents = format!(
        "{},weight=256\n{}",
        echo.addr(),
        refusing_lines(&closed, LINES - 1)
    );
    let file = TempFile::new("backends", &contents);
    let path = file.path().to_str().unwrap().to_string();
    // Child::spawn waits a bounded time for the port to accept: with a parse or a set build
    // that is quadratic in the lines, it does not in time.
    let mut child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-check",
        "none",
        "--workers",
        "1",
    ]);
    let mut c = client(child.addr());
    round_trip(&mut c, b"one backend among 100k");
    drop(c);
    // A reload of the same size, one backend fewer.
    let fewer: String = contents
        .lines()
        .take(LINES - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    replace(&file, &fewer);
    // Generous: a debug build on a loaded machine, not a measure of speed.
    sighup_until_logged_within(
        &child,
        &["SIGHUP: backends reloaded"],
        Duration::from_secs(30),
    );
    let mut c = client(child.addr());
    round_trip(&mut c, b"after the reload");
    drop(c);
    stop_with_sigterm(&mut child);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

#[test]
fn five_thousand_backends_cost_little_memory() {
    let closed = closed_port();
    let file = TempFile::new("backends", &refusing_lines(&closed, 5000));
    let path = file.path().to_str().unwrap().to_string();
    let mut child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-check",
        "none",
        "--workers",
        "1",
    ]);
    // Logged once the backend set is built and the workers run.
    child.wait_for_stderr("holdfast listening on", Duration::from_secs(10));
    // About 22 KB a backend (110 MB) before the connect-latency histograms were made small and
    // allocated only when a backend gets its first connection.
    let rss = rss_kib(child.pid());
    assert!(
        rss < 40 * 1024,
        "{rss} KiB resident with 5000 idle backends"
    );
    stop_with_sigterm(&mut child);
}

#[test]
fn probes_of_a_large_pool_leave_descriptors_for_clients() {
    // 1000 backends that never answer a probe, each probe holding a socket for its whole
    // timeout, and an open-file limit of 512: unless the probes in flight are capped, they
    // take every descriptor and a client is never accepted.
    const BACKENDS: usize = 1000;
    const INTERVAL: Duration = Duration::from_millis(500);
    // On 0.0.0.0: any 127.x.y.z on its port is a backend that never answers a probe.
    let hole = BlackholeBackend::start_on("0.0.0.0:0".parse().expect("an address"));
    let echo = EchoBackend::start();
    let lines: String = (0..BACKENDS)
        .map(|i| {
            format!(
                "127.0.{}.{}:{}\n",
                1 + i / 250,
                1 + i % 250,
                hole.addr().port()
            )
        })
        .collect();
    // The echo backend's weight makes it least-conn's first choice over the idle others.
    let file = TempFile::new("backends", &format!("{},weight=256\n{lines}", echo.addr()));
    let path = file.path().to_str().unwrap().to_string();
    let child = Child::quiet().nofile(512).spawn(&[
        "--backends-file",
        &path,
        "--workers",
        "1",
        "--health-interval",
        "500ms",
        "--health-timeout",
        "30s",
    ]);
    let target = child.addr();
    let started = std::time::Instant::now();
    // The first probes of every backend are due within one interval of the start; wait for
    // probes to be under way, then until all of them have been due for a while. (Nothing to
    // wait for: the check is that no more start.)
    wait_until_ok(Duration::from_secs(10), || {
        let fds = fd_count(child.pid());
        if fds >= 256 {
            Ok(())
        } else {
            Err(format!("{fds} descriptors open; probes not under way"))
        }
    });
    sleep_until(started + 3 * INTERVAL);
    let fds = fd_count(child.pid());
    assert!(
        fds < 300,
        "{fds} descriptors open with {BACKENDS} hung probes:\n{}",
        child.stderr()
    );
    let mut c = client(target);
    round_trip(&mut c, b"a client among a thousand hung probes");
}

#[test]
fn a_reload_that_changes_a_weight_in_the_file_overrides_the_runtime_weight() {
    use holdfast::{BackendChange, BackendState};
    let a = EchoBackend::start();
    let b = EchoBackend::start();
    let c = EchoBackend::start();
    let (aa, ba, ca) = (a.addr(), b.addr(), c.addr());
    let file = TempFile::new("backends", &format!("{aa}\n{ba},weight=2\n{ca}\n"));
    let mut cfg = config(&[]);
    cfg.backends_file = Some(file.path().to_path_buf());
    let lb = start_balancer(cfg);
    let reload = || {
        lb.controller()
            .reload()
            .unwrap_or_else(|e| panic!("reload: {e}"))
    };
    let weight = |addr| backend_stat(&lb, addr).weight;

    // Set at run time: a's and b's weights, and c drained.
    lb.change_backend(aa, BackendChange::Weight(5)).unwrap();
    lb.change_backend(ba, BackendChange::Weight(7)).unwrap();
    lb.change_backend(ca, BackendChange::Drain).unwrap();

    // The file changes b's weight only: b takes it, a keeps its runtime weight.
    file.write(&format!("{aa}\n{ba},weight=3\n{ca}\n"));
    reload();
    assert_eq!(weight(ba), 3, "the file changed b's weight");
    assert_eq!(weight(aa), 5, "a's weight is unchanged in the file");
    assert_eq!(
        backend_stat(&lb, ca).state,
        BackendState::Drain,
        "a drain is an operation, not configuration: it survives a reload"
    );

    // An unchanged file changes nothing either.
    reload();
    assert_eq!((weight(aa), weight(ba)), (5, 3));

    // A runtime weight set after the file's change holds until the file changes it again.
    lb.change_backend(ba, BackendChange::Weight(9)).unwrap();
    reload();
    assert_eq!(weight(ba), 9);
    file.write(&format!("{aa},weight=4\n{ba},weight=3\n{ca}\n"));
    reload();
    assert_eq!((weight(aa), weight(ba)), (4, 9));
}

/// How many backends stderr reports DOWN: one per `is DOWN` line, plus the counts in summary
/// lines (`... not logged one by one ...: 480 DOWN, 3 UP`).
fn reported_down(stderr: &str) -> usize {
    stderr
        .lines()
        .map(|l| {
            if l.contains("not logged one by one") {
                let counts = l.rsplit(": ").next().unwrap_or_default();
                counts
                    .split(", ")
                    .filter_map(|c| c.strip_suffix(" DOWN"))
                    .filter_map(|n| n.trim().parse::<usize>().ok())
                    .sum()
            } else {
                usize::from(l.contains(" is DOWN"))
            }
        })
        .sum()
}

#[test]
fn many_backends_going_down_at_once_log_a_summary() {
    const BACKENDS: usize = 500;
    let closed = closed_port();
    let file = TempFile::new("backends", &refusing_lines(&closed, BACKENDS));
    let path = file.path().to_str().unwrap().to_string();
    let mut child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-interval",
        "100ms",
        "--fall",
        "1",
        "--workers",
        "1",
    ]);
    wait_until_ok(Duration::from_secs(20), || {
        let err = child.stderr();
        let down = reported_down(&err);
        if down >= BACKENDS {
            Ok(())
        } else {
            Err(format!(
                "{down} of {BACKENDS} backends reported DOWN:\n{err}"
            ))
        }
    });
    let err = child.stderr();
    assert_eq!(reported_down(&err), BACKENDS, "{err}");
    let lines = err.lines().filter(|l| l.contains("DOWN")).count();
    assert!(
        lines <= 50,
        "{lines} lines to say that {BACKENDS} backends are down:\n{err}"
    );
    stop_with_sigterm(&mut child);
}

#[test]
fn source_hash_refuses_a_list_larger_than_its_table() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.algorithm = holdfast::Algorithm::SourceHash;
    let lb = start_balancer(cfg);
    let closed = closed_port();
    let too_many: Vec<holdfast::BackendSpec> = refusing_lines(&closed, 70_000)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let err = lb
        .set_backends(too_many)
        .expect_err("70,000 backends for a 65,537-slot table");
    assert!(err.to_string().contains("source-hash"), "{err}");
    // Nothing changed, and nothing broke.
    let mut c = client(lb_addr(&lb));
    round_trip(&mut c, b"still the one backend");
    assert_eq!(lb.backend_stats().len(), 1);
}

#[test]
fn source_hash_survives_a_new_list_while_the_old_one_drains() {
    // Two lists of 35,000, each within source-hash's limit; removed backends stay in the set
    // while they drain, so for a moment it holds 70,000: more than the table's 65,537 slots.
    let first_port = closed_port();
    let second_port = closed_port();
    let list = |closed: &ClosedPort| -> Vec<holdfast::BackendSpec> {
        refusing_lines(closed, 35_000)
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let echo = EchoBackend::start();
    let mut cfg = config(&[]);
    cfg.backends = list(&first_port);
    cfg.algorithm = holdfast::Algorithm::SourceHash;
    let lb = start_balancer(cfg);
    lb.set_backends(list(&second_port))
        .unwrap_or_else(|e| panic!("a second list of 35,000: {e}"));
    lb.set_backends(vec![holdfast::BackendSpec::new(echo.addr())])
        .unwrap_or_else(|e| panic!("back to one backend: {e}"));
    let mut c = client(lb_addr(&lb));
    round_trip(&mut c, b"served after two large lists");
}
