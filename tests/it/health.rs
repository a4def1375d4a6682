//! Health checking: active probes (TCP, WebSocket, send/expect, Redis, PostgreSQL) take a
//! failing backend out and bring it back, passive detection reacts to failures on real
//! traffic, and slow start ramps a backend that comes back.
//!
//! Probe connections are real connections to the fake backends, so these tests count what
//! the clients see (tags, echoes) and the balancer's per-backend state, not raw accepts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::{Algorithm, BackendState, Config, HealthCheck};

use crate::util::*;

/// Probe interval used by most tests here: short, so a state change takes a few hundred ms.
const INTERVAL: Duration = Duration::from_millis(100);
/// Added to every "within about N probe intervals" wait: scheduling on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// `backends` with TCP probes every `interval`, the given rise and fall, and a probe timeout
/// of 300 ms.
fn probed(backends: &[SocketAddr], interval: Duration, rise: u32, fall: u32) -> Config {
    let mut cfg = config(backends);
    cfg.health.check = HealthCheck::Tcp;
    cfg.health.interval = interval;
    cfg.health.timeout = Duration::from_millis(300);
    cfg.health.rise = rise;
    cfg.health.fall = fall;
    cfg
}

/// One visit made by a [`ClientLoop`].
struct Visit {
    at: Instant,
    result: Result<String, String>,
}

/// A client that keeps making short visits to tagged backends (connect, read the tag, echo
/// one byte, close) on its own thread until stopped, recording each.
struct ClientLoop {
    visits: Arc<Mutex<Vec<Visit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClientLoop {
    fn start(target: SocketAddr) -> ClientLoop {
        let visits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (visits, stop) = (Arc::clone(&visits), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let at = Instant::now();
                    let result = visit_tagged("127.0.0.1", target, Duration::from_secs(3));
                    visits.lock().unwrap().push(Visit { at, result });
                    // A steady trickle (about 100 visits a second), not a storm.
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        ClientLoop {
            visits,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.visits.lock().unwrap().len()
    }

    /// Whether a visit that started after `since` was served by `tag`.
    fn served_by_since(&self, tag: &str, since: Instant) -> bool {
        self.visits
            .lock()
            .unwrap()
            .iter()
            .any(|v| v.at >= since && v.result.as_deref() == Ok(tag))
    }

    /// Stops the loop and returns every visit.
    fn finish(mut self) -> Vec<Visit> {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("client loop panicked");
        }
        std::mem::take(&mut *self.visits.lock().unwrap())
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend that stops listening is taken out by the TCP probes within about
/// `interval * fall`; clients never notice (a retry covers the connects that still go to it
/// before that, and afterwards it is not even tried); when it listens again the probes bring
/// it back within about `interval * rise` and it gets new clients again.
#[test]
fn stopped_backend_is_marked_down_and_back_up_without_failing_a_client() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (rise, fall) = (2, 3);
    let mut cfg = probed(&[a.addr(), b.addr()], INTERVAL, rise, fall);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.retries = 2;
    // Only the probes may take it down here (passive detection has tests of its own).
    cfg.health.observe_errors = 0;
    let lb = start_balancer(cfg);
    let clients = ClientLoop::start(lb_addr(&lb));
    let started = Instant::now();
    wait_until(Duration::from_secs(3), || {
        clients.served_by_since("a", started) && clients.served_by_since("b", started)
    });

    a.set_refusing(true);
    let stopped = Instant::now();
    wait_for_state(&lb, a.addr(), BackendState::Down, INTERVAL * fall + SLACK);
    let took = stopped.elapsed();
    assert_eq!(backend_state(&lb, b.addr()), BackendState::Up);

    // Down means not tried: while the clients keep coming, connects to A stop (one already
    // under way when it went down may still fail).
    let failures_at_down = backend_stat(&lb, a.addr()).connect_failures;
    let visits_at_down = clients.count();
    wait_until(Duration::from_secs(5), || {
        clients.count() >= visits_at_down + 40
    });
    let failures_later = backend_stat(&lb, a.addr()).connect_failures;
    assert!(
        failures_later <= failures_at_down + 1,
        "connects to A went on after it was marked down: {failures_at_down} failures at \
         that moment, {failures_later} after 40 more clients"
    );

    a.set_refusing(false);
    let restarted = Instant::now();
    wait_for_state(&lb, a.addr(), BackendState::Up, INTERVAL * rise + SLACK);
    let took_up = restarted.elapsed();
    wait_until(Duration::from_secs(2), || {
        clients.served_by_since("a", restarted)
    });

    let visits = clients.finish();
    let failed: Vec<&String> = visits
        .iter()
        .filter_map(|v| v.result.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} client connections failed (down after {took:?}, up after {took_up:?}); \
         first: {:?}",
        failed.len(),
        visits.len(),
        failed.first()
    );
}

/// Source-hash: while one backend is stopped, marked down and restarted, the clients of the
/// other backends keep their backend on every single connection; the stopped backend's
/// clients are served elsewhere meanwhile (no connection fails), and come back to it once it
/// is up again.
#[test]
fn source_hash_moves_only_the_down_backends_clients_and_gives_them_back() {
    let backends = [
        TaggedBackend::start("a"),
        TaggedBackend::start("b"),
        TaggedBackend::start("c"),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let (rise, fall) = (2, 2);
    let mut cfg = probed(&addrs, INTERVAL, rise, fall);
    cfg.algorithm = Algorithm::SourceHash;
    // The probes must find it (connect failures on live traffic would otherwise do it).
    cfg.health.observe_errors = 0;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let ips: Vec<String> = (2..=31).map(|i| format!("127.0.0.{i}")).collect();

    // One visit from every client IP; every one must be served.
    let pass = |when: &str| -> Vec<String> {
        ips.iter()
            .map(|ip| {
                visit_tagged(ip, target, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("{when}: client {ip} not served: {e}"))
            })
            .collect()
    };
    let baseline = pass("before");
    let victim_backend = ["a", "b", "c"]
        .iter()
        .max_by_key(|t| baseline.iter().filter(|b| b == t).count())
        .map(|t| backends.iter().find(|b| b.tag() == *t).unwrap())
        .unwrap();
    let victim = victim_backend.tag().to_string();
    let victims: Vec<&String> = ips
        .iter()
        .zip(&baseline)
        .filter(|(_, t)| **t == victim)
        .map(|(ip, _)| ip)
        .collect();
    assert!(!victims.is_empty(), "no client hashes to {victim}");

    // Clients of live backends keep theirs; the victim's clients are served by another
    // while it is stopped (once it listens again they may be back already).
    let check = |tags: &[String], when: &str, victim_listens: bool| {
        for ((ip, now), before) in ips.iter().zip(tags).zip(&baseline) {
            if *before == victim {
                if victim_listens {
                    continue;
                }
                assert_ne!(
                    *now, victim,
                    "{when}: {ip} reached the stopped backend {victim}"
                );
            } else {
                assert_eq!(
                    now, before,
                    "{when}: {ip} moved from live backend {before} to {now}"
                );
            }
        }
    };

    victim_backend.set_refusing(true);
    let stopped = Instant::now();
    // Keep every client visiting while the probes notice.
    let mut passes = 0;
    while backend_state(&lb, victim_backend.addr()) != BackendState::Down {
        assert!(
            stopped.elapsed() < INTERVAL * fall + SLACK,
            "{victim} not marked down within {:?}",
            INTERVAL * fall + SLACK
        );
        check(&pass("while stopping"), "while stopping", false);
        passes += 1;
    }
    for _ in 0..2 {
        check(&pass("while down"), "while down", false);
    }

    victim_backend.set_refusing(false);
    let restarted = Instant::now();
    let mut back = false;
    while restarted.elapsed() < INTERVAL * rise + SLACK {
        let tags = pass("while restarting");
        if tags == baseline {
            back = true;
            break;
        }
        // Until it is back, the others must still keep their clients.
        check(&tags, "while restarting", true);
    }
    assert!(
        back,
        "{victim}'s clients {victims:?} did not come back within {:?} ({passes} passes \
         while stopping)",
        INTERVAL * rise + SLACK
    );
    assert_eq!(backend_state(&lb, victim_backend.addr()), BackendState::Up);
    assert_eq!(pass("after"), baseline, "the mapping did not stay restored");
}

/// Round-robin over [ResetBackend, tagged] on one worker, with TCP probes every 200 ms and a
/// rise of 5 (so a backend taken down passively stays down about a second), and the given
/// `observe_errors`.
fn resetting_pair(observe_errors: u32) -> (holdfast::Holdfast, ResetBackend, TaggedBackend) {
    let reset = ResetBackend::start(0);
    let good = TaggedBackend::start("good");
    let mut cfg = probed(
        &[reset.addr(), good.addr()],
        Duration::from_millis(200),
        5,
        2,
    );
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.health.observe_errors = observe_errors;
    (start_balancer(cfg), reset, good)
}

/// A backend that accepts and at once resets every connection passes a TCP probe, but real
/// clients get nothing from it: `observe_errors` such connections in a row take it down at
/// once, new clients then all go to the healthy backend, and the probes bring it back after
/// `rise` successes.
#[test]
fn passive_detection_takes_down_a_backend_that_resets_every_connection() {
    let observe = 3;
    let (lb, reset, _good) = resetting_pair(observe);
    let target = lb_addr(&lb);
    // The clients send nothing: the backend resets before any byte moves either way.
    let mut visits = 0;
    while backend_state(&lb, reset.addr()) == BackendState::Up {
        assert!(
            visits < 40,
            "still up after {visits} clients, half of them reset: {:?}",
            backend_stat(&lb, reset.addr())
        );
        let _ = visit_tagged("127.0.0.1", target, Duration::from_secs(2));
        visits += 1;
    }
    let stat = backend_stat(&lb, reset.addr());
    assert_eq!(stat.state, BackendState::Down);
    let passive = passive_failures(&lb, reset.addr());
    assert!(
        passive >= u64::from(observe),
        "down with passive_failures = {passive} < observe_errors = {observe}: {stat:?}"
    );

    // While it is down, every new client is served, and none is sent to it.
    for i in 0..5 {
        assert_eq!(
            visit_tagged("127.0.0.1", target, Duration::from_secs(2)).as_deref(),
            Ok("good"),
            "client {i} after the backend was taken down"
        );
    }
    assert_eq!(
        backend_stat(&lb, reset.addr()).total,
        stat.total,
        "sessions were sent to the backend while it was down"
    );
    assert_eq!(backend_state(&lb, reset.addr()), BackendState::Down);

    // Its TCP probes pass: they bring it back after `rise` successes.
    wait_for_state(
        &lb,
        reset.addr(),
        BackendState::Up,
        Duration::from_millis(200) * 5 + SLACK,
    );
}

/// The control for the test above: the same backend under the same traffic, with passive
/// detection off, stays up (the TCP probe alone passes it), so it is the passive detection
/// that takes it down there.
#[test]
fn without_passive_detection_a_resetting_backend_stays_up() {
    let (lb, reset, _good) = resetting_pair(0);
    let target = lb_addr(&lb);
    for i in 0..16 {
        let _ = visit_tagged("127.0.0.1", target, Duration::from_secs(2));
        assert_eq!(
            backend_state(&lb, reset.addr()),
            BackendState::Up,
            "down after {} clients with observe_errors = 0",
            i + 1
        );
    }
    let stat = backend_stat(&lb, reset.addr());
    assert!(
        stat.total >= 6,
        "the resetting backend got only {} sessions: {stat:?}",
        stat.total
    );
    // Three more probes (nothing else connects now) and it is still up.
    let accepted = reset.accepted();
    wait_until_ok(Duration::from_millis(200) * 3 + SLACK, || {
        let state = backend_state(&lb, reset.addr());
        assert_eq!(state, BackendState::Up, "taken down by its TCP probes");
        if reset.accepted() >= accepted + 3 {
            Ok(())
        } else {
            Err(format!("{} probes so far", reset.accepted() - accepted))
        }
    });
}

/// The WebSocket probe asks for an upgrade on the configured path and wants `101`: a plain
/// TCP echo server (which accepts the connection, and answers with the request itself) is
/// marked down, a real WebSocket server is up and stays up.
#[test]
fn websocket_probe_needs_a_real_upgrade() {
    let plain = EchoBackend::start();
    let ws = WebSocketBackend::start();
    let fall = 2;
    let mut cfg = probed(&[plain.addr(), ws.addr()], INTERVAL, 2, fall);
    cfg.health.check = HealthCheck::WebSocket {
        path: "/health".into(),
    };
    cfg.health.timeout = Duration::from_millis(500);
    let lb = start_balancer(cfg);

    wait_for_state(
        &lb,
        plain.addr(),
        BackendState::Down,
        INTERVAL * fall + SLACK,
    );
    assert!(
        plain.accepted() >= fall as usize,
        "the plain server was marked down without being probed ({} connections)",
        plain.accepted()
    );
    // The WebSocket server keeps passing: five more upgrades, up all along.
    let before = ws.paths().len();
    wait_until_ok(Duration::from_secs(2), || {
        assert_eq!(
            backend_state(&lb, ws.addr()),
            BackendState::Up,
            "the WebSocket server was marked down"
        );
        let upgrades = ws.paths().len() - before;
        if upgrades >= 5 {
            Ok(())
        } else {
            Err(format!("{upgrades} upgrades so far"))
        }
    });
    let paths = ws.paths();
    assert!(
        paths.iter().all(|p| p == "/health"),
        "probe paths: {paths:?}"
    );
    assert_eq!(
        ws.failed_handshakes(),
        0,
        "a probe sent an invalid upgrade request"
    );
    assert_eq!(backend_state(&lb, plain.addr()), BackendState::Down);
}

/// A probe whose connect hangs is given up after the probe timeout, and meanwhile the other
/// backends keep being probed at their interval: with [blackhole, echo], the blackhole is
/// marked down (not before the timeout), and the echo backend is probed about every 100 ms
/// throughout and stays up.
#[test]
fn a_hanging_probe_does_not_delay_the_other_probes() {
    let hole = BlackholeBackend::start();
    let echo = EchoBackend::start();
    let mut cfg = probed(&[hole.addr(), echo.addr()], INTERVAL, 2, 1);
    cfg.health.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let lb = start_balancer(cfg);
    let (lb_ref, echo_ref) = (&lb, &echo);

    // The first second covers the first probe of the blackhole hanging for 500 ms.
    let echo_probed = |since: usize| {
        move || {
            assert_eq!(
                backend_state(lb_ref, echo_ref.addr()),
                BackendState::Up,
                "the echo backend was marked down"
            );
            let probes = echo_ref.accepted() - since;
            if probes >= 5 {
                Ok(())
            } else {
                Err(format!("the echo backend was probed {probes} times"))
            }
        }
    };
    wait_until_ok(Duration::from_secs(1), echo_probed(0));

    let down_at = wait_for_state(
        &lb,
        hole.addr(),
        BackendState::Down,
        Duration::from_millis(600) + SLACK,
    );
    let took = down_at.duration_since(started);
    assert!(
        took >= Duration::from_millis(400),
        "the blackhole was marked down after {took:?}, before its 500 ms probe timeout"
    );
    // Later probes of the blackhole hang too; the echo backend is still probed on time.
    wait_until_ok(Duration::from_secs(1), echo_probed(echo.accepted()));
}

/// Slow start: a backend that comes back gets a small share of new connections at first
/// and about its fair share by the end of the window, as its effective weight rises from
/// about 1/20 to full (64) over the window.
#[test]
fn slow_start_ramps_up_a_returning_backend() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let window = Duration::from_secs(2);
    let mut cfg = probed(&[a.addr(), b.addr()], INTERVAL, 2, 2);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.health.slow_start = Some(window);
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    assert_eq!(
        (
            effective_weight(&lb, a.addr()),
            effective_weight(&lb, b.addr())
        ),
        (64, 64),
        "full weight at start without slow_start_on_boot"
    );

    b.set_refusing(true);
    wait_for_state(&lb, b.addr(), BackendState::Down, INTERVAL * 2 + SLACK);
    b.set_refusing(false);
    let up = wait_for_state(&lb, b.addr(), BackendState::Up, INTERVAL * 2 + SLACK);

    // Short connections, one after another, over the whole window.
    let mut visits: Vec<(Duration, bool)> = Vec::new(); // (when, went to b)
    let mut weights: Vec<(Duration, u32, u32)> = Vec::new(); // (when, a, b)
    while up.elapsed() < window {
        let at = up.elapsed();
        let tag = visit_tagged("127.0.0.1", target, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("client at {at:?} not served: {e}"));
        visits.push((at, tag == "b"));
        weights.push((
            up.elapsed(),
            effective_weight(&lb, a.addr()),
            effective_weight(&lb, b.addr()),
        ));
    }
    let share = |from: Duration, to: Duration| {
        let in_window: Vec<bool> = visits
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|&(_, to_b)| to_b)
            .collect();
        assert!(
            in_window.len() >= 15,
            "only {} connections between {from:?} and {to:?}",
            in_window.len()
        );
        in_window.iter().filter(|&&b| b).count() as f64 / in_window.len() as f64
    };
    let ms = Duration::from_millis;
    let early = share(ms(0), ms(300));
    let late = share(window - ms(300), window);
    assert!(
        early < 0.25,
        "B got {:.0}% of new connections in the first 300 ms after coming back",
        early * 100.0
    );
    assert!(
        late > 0.35,
        "B got only {:.0}% of new connections in the last 300 ms of its slow start",
        late * 100.0
    );

    // The effective weight: low at first, never falling, about half-way at mid-window, and
    // full at the end; A stays at full weight throughout.
    let (_, _, first_b) = weights[0];
    assert!(
        first_b <= 16,
        "B's effective weight right after up: {first_b}"
    );
    for pair in weights.windows(2) {
        let ((t0, _, w0), (t1, _, w1)) = (pair[0], pair[1]);
        assert!(
            w1 >= w0 && w1 <= 64,
            "B's effective weight went from {w0} at {t0:?} to {w1} at {t1:?}"
        );
    }
    for &(t, wa, wb) in &weights {
        assert_eq!(wa, 64, "A's effective weight at {t:?}");
        if (ms(900)..ms(1100)).contains(&t) {
            assert!(
                (16..=48).contains(&wb),
                "B's effective weight at {t:?} is {wb}: not a linear ramp"
            );
        }
    }
    wait_until_ok(ms(500), || match effective_weight(&lb, b.addr()) {
        64 => Ok(()),
        w => Err(format!(
            "B's effective weight is {w} at the end of the window"
        )),
    });
}

/// `slow_start_on_boot` ramps every backend from the start too; without it they start at
/// full weight.
#[test]
fn slow_start_on_boot_ramps_every_backend() {
    let a = EchoBackend::start();
    let b = EchoBackend::start();
    let window = Duration::from_secs(1);
    let with_boot = |on_boot: bool| {
        let mut cfg = probed(&[a.addr(), b.addr()], INTERVAL, 2, 2);
        cfg.health.slow_start = Some(window);
        cfg.health.slow_start_on_boot = on_boot;
        start_balancer(cfg)
    };

    let lb = with_boot(true);
    let early = [a.addr(), b.addr()].map(|addr| effective_weight(&lb, addr));
    assert!(
        early.iter().all(|&w| w < 64),
        "effective weights right after start with slow_start_on_boot: {early:?}"
    );
    wait_until_ok(window + SLACK, || {
        let now = [a.addr(), b.addr()].map(|addr| effective_weight(&lb, addr));
        if now == [64, 64] {
            Ok(())
        } else {
            Err(format!("effective weights {now:?}"))
        }
    });

    let lb = with_boot(false);
    let early = [a.addr(), b.addr()].map(|addr| effective_weight(&lb, addr));
    assert_eq!(
        early,
        [64, 64],
        "ramped at start without slow_start_on_boot"
    );
}

// ---------------------------------------------------------------------------------------------
// Send/expect probes: a backend that accepts, and then refuses at the application level
// ---------------------------------------------------------------------------------------------

/// Reads until `stream` has sent `want` (or more), EOF or an error; returns what it sent.
fn read_until_contains(stream: &mut TcpStream, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(want.len()).any(|w| w == want) {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

/// A Redis look-alike that answers every `PING\r\n` with `reply` and counts the answers.
fn pinger(reply: &'static [u8]) -> (ScriptedBackend, Arc<AtomicUsize>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&answered);
    let backend = ScriptedBackend::start(move |mut stream| {
        let mut pending = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            pending.extend_from_slice(&buf[..n]);
            while let Some(at) = pending.windows(6).position(|w| w == b"PING\r\n") {
                pending.drain(..at + 6);
                if stream.write_all(reply).is_err() {
                    return;
                }
                counter.fetch_add(1, SeqCst);
            }
        }
    });
    (backend, answered)
}

/// Probes every 100 ms with `check`, a probe timeout of `timeout`, rise 2 and the given fall,
/// round-robin on one worker.
fn checked(backends: &[SocketAddr], check: &str, timeout: Duration, fall: u32) -> Config {
    let mut cfg = probed(backends, INTERVAL, 2, fall);
    cfg.health.check = check.parse().expect("a valid health check");
    cfg.health.timeout = timeout;
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg
}

/// Waits until `answered` has grown by `n` (that many more probes were answered), checking
/// all along that `lb` keeps backend `addr` up.
#[track_caller]
fn stays_up_while_probed(
    lb: &holdfast::Holdfast,
    addr: SocketAddr,
    answered: impl Fn() -> usize,
    n: usize,
) {
    let before = answered();
    wait_until_ok(Duration::from_secs(10), || {
        assert_eq!(
            backend_state(lb, addr),
            BackendState::Up,
            "{addr} was marked down although it answered its probes"
        );
        let more = answered() - before;
        if more >= n {
            Ok(())
        } else {
            Err(format!("{addr} answered {more} more probes, want {n}"))
        }
    });
}

/// What a Redis client sees through `lb`: the answer line to one `PING`.
fn ping_through(lb: &holdfast::Holdfast) -> String {
    let mut c = client(lb_addr(lb));
    c.write_all(b"PING\r\n").expect("write PING");
    read_line(&mut c).trim_end().to_string()
}

/// The `redis` probe: a backend that answers `PING` with an error (here Redis's own answer
/// while it loads its data set) accepts connections and sends bytes, so the TCP probe and
/// passive detection both keep it; the `redis` probe takes it down, keeps the one that
/// answers `+PONG`, and every client then gets `+PONG`.
#[test]
fn redis_probe_takes_down_a_backend_that_answers_ping_with_an_error() {
    let (good, good_answers) = pinger(b"+PONG\r\n");
    let (sick, _) = pinger(b"-LOADING Redis is loading the dataset in memory\r\n");
    let fall = 2;
    let lb = start_balancer(checked(
        &[good.addr(), sick.addr()],
        "redis",
        Duration::from_secs(1),
        fall,
    ));
    wait_for_state(
        &lb,
        sick.addr(),
        BackendState::Down,
        INTERVAL * fall + SLACK,
    );
    stays_up_while_probed(&lb, good.addr(), || good_answers.load(SeqCst), 5);

    let sessions_to_sick = backend_stat(&lb, sick.addr()).total;
    for i in 0..10 {
        assert_eq!(ping_through(&lb), "+PONG", "client {i}");
    }
    assert_eq!(
        backend_stat(&lb, sick.addr()).total,
        sessions_to_sick,
        "clients were sent to the backend that is down"
    );
}

/// PostgreSQL 15's ErrorResponse to a StartupMessage during a smart shutdown, byte for byte
/// (it holds an `R`: the routine field).
const PG_SHUTTING_DOWN: &[u8] = b"E\0\0\0jSFATAL\0VFATAL\0C57P03\0Mthe database system is \
    shutting down\0Fpostmaster.c\0L2432\0RProcessStartupPacket\0\0";
/// PostgreSQL 15's answer to a StartupMessage when the user must authenticate with
/// SCRAM-SHA-256.
const PG_SASL_REQUEST: &[u8] = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0";

/// A StartupMessage: the protocol version and the parameters.
type Startup = (u32, Vec<(String, String)>);

/// One StartupMessage read from `stream`.
fn read_startup(stream: &mut TcpStream) -> Option<Startup> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    stream.read_exact(&mut body).ok()?;
    let version = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let words: Vec<String> = body[4..]
        .split(|&b| b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let params = words
        .chunks(2)
        .filter(|kv| kv.len() == 2 && !kv[0].is_empty())
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect();
    Some((version, params))
}

/// A PostgreSQL look-alike: reads a StartupMessage, records it, answers `reply`, then waits
/// for the peer to go away.
fn fake_postgres(reply: &'static [u8]) -> (ScriptedBackend, Arc<Mutex<Vec<Startup>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let backend = ScriptedBackend::start(move |mut stream| {
        let Some(startup) = read_startup(&mut stream) else {
            return;
        };
        record.lock().unwrap().push(startup);
        if stream.write_all(reply).is_ok() {
            let _ = stream.read(&mut [0u8; 64]);
        }
    });
    (backend, seen)
}

/// The `postgres` probe: a server in shutdown still accepts connections (and answers an
/// SSLRequest), but refuses the StartupMessage with an error; the probe takes it down and
/// keeps the one that asks the user to authenticate. The probe starts up as the user and
/// database it was given, and clients then only reach the server that lets them log in.
#[test]
fn postgres_probe_takes_down_a_server_that_refuses_to_start_a_session() {
    let (good, good_seen) = fake_postgres(PG_SASL_REQUEST);
    let (sick, sick_seen) = fake_postgres(PG_SHUTTING_DOWN);
    let fall = 2;
    let lb = start_balancer(checked(
        &[good.addr(), sick.addr()],
        "postgres:app/shop",
        Duration::from_secs(1),
        fall,
    ));
    wait_for_state(
        &lb,
        sick.addr(),
        BackendState::Down,
        INTERVAL * fall + SLACK,
    );
    stays_up_while_probed(&lb, good.addr(), || good_seen.lock().unwrap().len(), 5);

    let expected = vec![
        ("user".to_string(), "app".to_string()),
        ("database".to_string(), "shop".to_string()),
        (
            "application_name".to_string(),
            "holdfast-health-check".to_string(),
        ),
    ];
    for (version, params) in good_seen
        .lock()
        .unwrap()
        .iter()
        .chain(&*sick_seen.lock().unwrap())
    {
        assert_eq!(*version, 196608, "protocol 3.0");
        assert_eq!(*params, expected);
    }

    // A client's own StartupMessage gets the authentication request every time.
    let startup = b"\0\0\0\x14\0\x03\0\0user\0alice\0\0";
    for i in 0..10 {
        let mut c = client(lb_addr(&lb));
        c.write_all(startup).expect("write StartupMessage");
        let mut first = [0u8; 1];
        c.read_exact(&mut first).expect("read the answer");
        assert_eq!(
            first[0], b'R',
            "client {i} got message type {:?}",
            first[0] as char
        );
    }
}

/// An `expect:` that arrives in pieces (three writes, each its own segment, the search
/// string split across them) is found: the backend stays up. The probe writes exactly the
/// unescaped `send:` bytes.
#[test]
fn expect_finds_an_answer_split_over_several_segments() {
    let received = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let backend = {
        let (received, answered) = (Arc::clone(&received), Arc::clone(&answered));
        ScriptedBackend::start(move |mut stream| {
            let got = read_until_contains(&mut stream, b"\r\n");
            received.lock().unwrap().push(got);
            for piece in [&b"+READY TO"[..], b" SER", b"VE\r\n"] {
                if stream.write_all(piece).is_err() {
                    return;
                }
                // Apart in time, so each piece is a segment (and a read) of its own.
                std::thread::sleep(Duration::from_millis(20));
            }
            answered.fetch_add(1, SeqCst);
            let _ = stream.read(&mut [0u8; 64]);
        })
    };
    let lb = start_balancer(checked(
        &[backend.addr()],
        r"send:HELLO\x00\,\t\\\r\n,expect:READY TO SERVE",
        Duration::from_secs(2),
        1,
    ));
    stays_up_while_probed(&lb, backend.addr(), || answered.load(SeqCst), 5);
    let received = received.lock().unwrap();
    assert!(
        received.iter().all(|r| r == b"HELLO\0,\t\\\r\n"),
        "the probe sent {received:?}"
    );
}

/// A backend that closes (FIN) or resets before the whole expected answer has arrived is
/// down at once: the probe does not wait for its (here 5 s) timeout, and a healthy backend
/// beside them keeps serving every client.
#[test]
fn a_backend_that_closes_or_resets_before_the_answer_is_down() {
    // Half an answer, then a clean close.
    let closer = ScriptedBackend::start(|mut stream| {
        read_until_contains(&mut stream, b"PING\r\n");
        let _ = stream.write_all(b"+PO");
    });
    // Reads the PING, then resets.
    let resetter = ResetBackend::start(1);
    let (good, good_answers) = pinger(b"+PONG\r\n");
    let timeout = Duration::from_secs(5);
    let fall = 2;
    let lb = start_balancer(checked(
        &[closer.addr(), resetter.addr(), good.addr()],
        "redis",
        timeout,
        fall,
    ));
    // Well before a single probe could time out.
    let within = INTERVAL * fall + SLACK;
    assert!(within < timeout);
    wait_for_state(&lb, closer.addr(), BackendState::Down, within);
    wait_for_state(&lb, resetter.addr(), BackendState::Down, within);
    stays_up_while_probed(&lb, good.addr(), || good_answers.load(SeqCst), 3);
    for i in 0..6 {
        assert_eq!(ping_through(&lb), "+PONG", "client {i}");
    }
}

/// `expect:` alone is a banner check (SSH, SMTP): nothing is sent, the greeting must hold
/// the bytes. A server that greets with a refusal is down.
#[test]
fn banner_check_wants_the_banner() {
    let ssh_greeted = Arc::new(AtomicUsize::new(0));
    let ssh = {
        let greeted = Arc::clone(&ssh_greeted);
        ScriptedBackend::start(move |mut stream| {
            if stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").is_ok() {
                greeted.fetch_add(1, SeqCst);
                // Nothing is sent to a banner check: this read ends at the probe's close.
                let _ = stream.read(&mut [0u8; 64]);
            }
        })
    };
    // An SMTP server over its connection limit: a refusal, and the connection closed.
    let busy = ScriptedBackend::start(|mut stream| {
        let _ = stream.write_all(b"421 4.3.2 Service not available, closing channel\r\n");
    });
    let fall = 2;
    let lb = start_balancer(checked(
        &[ssh.addr(), busy.addr()],
        "expect:SSH-2.0-",
        Duration::from_secs(1),
        fall,
    ));
    wait_for_state(
        &lb,
        busy.addr(),
        BackendState::Down,
        INTERVAL * fall + SLACK,
    );
    stays_up_while_probed(&lb, ssh.addr(), || ssh_greeted.load(SeqCst), 5);
}

/// `send:` alone writes the bytes and passes if the backend has not closed the connection.
#[test]
fn send_only_check_writes_its_bytes() {
    let received = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let backend = {
        let received = Arc::clone(&received);
        ScriptedBackend::start(move |mut stream| {
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got);
            received.lock().unwrap().push(got);
        })
    };
    let lb = start_balancer(checked(
        &[backend.addr()],
        r"send:QUIT\r\n",
        Duration::from_secs(1),
        1,
    ));
    stays_up_while_probed(&lb, backend.addr(), || received.lock().unwrap().len(), 5);
    let received = received.lock().unwrap();
    assert!(
        received.iter().all(|r| r == b"QUIT\r\n"),
        "the probe sent {received:?}"
    );
}

/// A malformed `--health-check` is a one-line usage error naming the problem, exit 2.
#[test]
fn bad_send_expect_flag_is_a_usage_error() {
    for (value, needle) in [
        (r"send:PING\q", r"unknown escape '\q'"),
        ("send:a,b", "neither send:BYTES nor expect:BYTES"),
        ("expect:", "expect: is empty"),
        ("postgres:", "postgres:USER"),
    ] {
        let out = run_binary(
            &[
                "-l",
                "127.0.0.1:0",
                "-b",
                "127.0.0.1:1",
                "--health-check",
                value,
            ],
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && first.contains(needle),
            "{value}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real Redis, when `redis-server` is installed
// ---------------------------------------------------------------------------------------------

/// A `redis-server` child on a reserved loopback port, without persistence. Killed on drop.
struct RedisServer {
    child: std::process::Child,
    addr: SocketAddr,
    /// Connections this test made itself (to configure or inspect it).
    own: AtomicUsize,
    /// Holds the port (bound, never listening) so no other test takes it before Redis
    /// listens; Redis binds with SO_REUSEADDR as well, which Linux allows beside it.
    _port: socket2::Socket,
}

impl RedisServer {
    /// `None` if `redis-server` is not installed.
    fn start() -> Option<RedisServer> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let port = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
        port.set_reuse_address(true).ok()?;
        port.bind(&SockAddr::from(localhost0())).ok()?;
        let addr = port.local_addr().ok()?.as_socket()?;
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let server = RedisServer {
            child,
            addr,
            own: AtomicUsize::new(0),
            _port: port,
        };
        wait_until_ok(Duration::from_secs(10), || match server.command("PING") {
            Ok(answer) if answer == "+PONG" => Ok(()),
            Ok(answer) => Err(format!("PING answered {answer:?}")),
            Err(e) => Err(format!("redis-server not answering yet: {e}")),
        });
        Some(server)
    }

    /// Sends one inline command on a new connection and returns the first answer line.
    fn command(&self, command: &str) -> std::io::Result<String> {
        let mut c = self.connect()?;
        c.write_all(format!("{command}\r\n").as_bytes())?;
        let got = read_until_contains(&mut c, b"\r\n");
        Ok(String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// A connection of the test's own, with timeouts set.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let c = TcpStream::connect(self.addr)?;
        self.own.fetch_add(1, SeqCst);
        set_timeouts(&c);
        Ok(c)
    }

    /// Connections Redis has accepted from others (the probes, clients through holdfast)
    /// so far, from `INFO stats`.
    fn others_connections(&self) -> usize {
        let mut c = self.connect().expect("connect to redis-server");
        c.write_all(b"INFO stats\r\n").expect("INFO");
        let got = read_until_contains(&mut c, b"total_commands_processed");
        let text = String::from_utf8_lossy(&got);
        text.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no total_connections_received in {text:?}"))
            - self.own.load(SeqCst)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `redis` probe against a real Redis: up while it answers `PING`; down once it requires
/// a password (`-NOAUTH` to an unauthenticated `PING`: a Redis that accepts connections and
/// serves nobody), during which clients all reach the other backend; up again once the
/// password is removed. Skipped (with a message) without `redis-server`.
#[test]
fn real_redis_is_down_while_it_refuses_ping() {
    let Some(redis) = RedisServer::start() else {
        eprintln!(
            "SKIPPED real_redis_is_down_while_it_refuses_ping: redis-server is not installed \
             (apt-get install redis-server)"
        );
        return;
    };
    let (other, _) = pinger(b"+PONG\r\n");
    let fall = 2;
    let lb = start_balancer(checked(
        &[redis.addr, other.addr()],
        "redis",
        Duration::from_secs(1),
        fall,
    ));
    // Each probe is a connection (nothing else goes through holdfast yet).
    stays_up_while_probed(&lb, redis.addr, || redis.others_connections(), 3);

    let set = redis
        .command("CONFIG SET requirepass hunter2")
        .expect("CONFIG SET");
    assert_eq!(set, "+OK");
    wait_for_state(&lb, redis.addr, BackendState::Down, INTERVAL * fall + SLACK);
    for i in 0..6 {
        assert_eq!(
            ping_through(&lb),
            "+PONG",
            "client {i} while Redis wants a password"
        );
    }

    let mut admin = redis.connect().expect("connect to redis-server");
    admin
        .write_all(b"AUTH hunter2\r\nCONFIG SET requirepass \"\"\r\n")
        .expect("AUTH");
    let answers = read_until_contains(&mut admin, b"+OK\r\n+OK\r\n");
    assert_eq!(answers, b"+OK\r\n+OK\r\n");
    wait_for_state(&lb, redis.addr, BackendState::Up, INTERVAL * 2 + SLACK);
}
