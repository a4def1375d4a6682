//! Reliability (issue #9): what clients see, and what holdfast holds afterwards, when backends
//! misbehave, when clients give up while they wait, when descriptors run out, and when
//! holdfast is stopped under load.
//!
//! Each test asserts what a user of holdfast would see on the wire (an echo, an EOF, no
//! reset) and, where resources are at stake, that holdfast's own counters (and, for the real
//! binary, its descriptors) return to where they were.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::{Algorithm, BackendSpec};
use socket2::Socket;

use crate::util::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// Backends of this file
// ---------------------------------------------------------------------------------------------

/// A backend whose connects hang (a [`hung_listener`]) until [`GatedBackend::open`], after
/// which it accepts everything and echoes. A connect that was hanging completes at the
/// client's next SYN retransmission after the gate opens.
struct GatedBackend {
    addr: SocketAddr,
    listener: Option<Socket>,
    /// Declared before the fillers: dropped first, it stops accepting before they close.
    serving: Option<ScriptedBackend>,
    _fillers: Vec<Socket>,
}

impl GatedBackend {
    fn start() -> GatedBackend {
        let (listener, fillers, addr) = hung_listener(localhost0());
        GatedBackend {
            addr,
            listener: Some(listener),
            serving: None,
            _fillers: fillers,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, accept everything (the fillers too) and echo.
    fn open(&mut self) {
        self.open_with(echo_until_eof);
    }

    /// From now on, accept everything (the fillers too) and run `handle` on each connection.
    fn open_with(&mut self, handle: fn(TcpStream)) {
        let listener = self.listener.take().expect("opened once");
        self.serving = Some(ScriptedBackend::serve(listener.into(), handle));
    }
}

/// Echoes on a blocking stream until EOF or an error (bounded by read timeouts).
fn echo_until_eof(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    set_timeouts(&stream);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Item 5: a connect timer armed before a stay in the queue
// ---------------------------------------------------------------------------------------------

/// B's first connect (to a refusing backend) arms a connect timer, fails, and B waits in the
/// queue (the other backend is full). The backend list then changes, so B's failed backends
/// are forgotten, and B is placed on Y, whose connect is slow (its SYN is dropped once).
/// The timer of the first attempt must not cut Y's connect short and count a failure
/// against Y: once Y lets the connect through, B is served by it.
#[test]
fn a_connect_timer_from_before_the_queue_does_not_fail_the_next_backend() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
    let refusing = closed_port();
    let z = EchoBackend::start();
    let mut y = GatedBackend::start();
    let mut cfg = config(&[refusing.addr(), z.addr()]);
    cfg.workers = 1;
    cfg.connect_timeout = CONNECT_TIMEOUT;
    cfg.retries = 2;
    cfg.limits.max_conns_per_backend = 1;
    cfg.limits.queue_timeout = Duration::from_secs(20);
    cfg.health.observe_errors = 0;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    // The holder takes Z's only slot (after a refusal, if the refusing backend came first).
    let mut holder = client(target);
    round_trip(&mut holder, b"holder");
    assert_eq!(z.accepted(), 1);

    // B: its first attempt goes to the refusing backend (Z is full), arming a connect timer
    // due at t0 + CONNECT_TIMEOUT; refused, it waits in the queue.
    let failures_before = backend_stat(&lb, refusing.addr()).connect_failures;
    let t0 = Instant::now();
    let mut b = client(target);
    b.write_all(b"B's request").unwrap();
    wait_until_ok(Duration::from_secs(3), || {
        let st = lb.stats();
        let failures = backend_stat(&lb, refusing.addr()).connect_failures;
        if st.queued == 1 && failures == failures_before + 1 {
            Ok(())
        } else {
            Err(format!(
                "refusals {failures} (before {failures_before}): {st:?}"
            ))
        }
    });

    // 1.5 s later the list changes: [Y, Z]. B is placed on Y at t1 ~ t0 + 1.5 s; Y drops the
    // SYN, so the connect hangs until a retransmission gets through.
    sleep_until(t0 + ms(1500));
    lb.set_backends(vec![BackendSpec::new(y.addr()), BackendSpec::new(z.addr())])
        .unwrap();
    wait_until_ok(Duration::from_secs(3), || {
        let st = lb.stats();
        if st.queued == 0 && backend_stat(&lb, y.addr()).active == 1 {
            Ok(())
        } else {
            Err(format!("B not connecting to Y: {st:?}"))
        }
    });

    // Past the first attempt's deadline (t0 + 4 s), well before Y's own (t1 + 4 s): nothing
    // may have happened to the connect. Then Y lets it through (the SYN retransmitted about
    // t1 + 3 s completes it).
    sleep_until(t0 + CONNECT_TIMEOUT + ms(300));
    let y_stat = backend_stat(&lb, y.addr());
    y.open();
    let mut back = [0u8; 11];
    let served = b.read_exact(&mut back);
    assert_eq!(
        y_stat.connect_failures, 0,
        "Y's connect was failed by the first attempt's timer: {y_stat:?}"
    );
    served.expect("B served by Y once its connect completes");
    assert_eq!(&back, b"B's request");
    assert_eq!(backend_stat(&lb, y.addr()).connect_failures, 0);
    drop(holder);
}

// ---------------------------------------------------------------------------------------------
// The real binary's descriptors
// ---------------------------------------------------------------------------------------------

/// The real binary in front of `echo` (one worker, relaying with `relay`, no health checks),
/// started with [`Child::quiet`]: no connection is made to it before the test's own.
fn quiet_in_front_of(echo: &EchoBackend, relay: &str) -> Child {
    Child::quiet().spawn(&[
        "--backend",
        &echo.addr().to_string(),
        "--workers",
        "1",
        "--relay",
        relay,
        "--health-check",
        "none",
    ])
}

/// Sends `sig` to process `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

/// Sets process `pid`'s soft RLIMIT_NOFILE to `n` while it runs (the hard limit stays: raising
/// it again would need a privilege the test may not have).
fn set_nofile(pid: u32, n: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: with a null new limit, prlimit only writes the current one into `limit`, which
    // lives across the call.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut limit,
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}): {}", io::Error::last_os_error());
    limit.rlim_cur = (n as libc::rlim_t).min(limit.rlim_max);
    // SAFETY: prlimit reads the one rlimit passed by reference for the duration of the call
    // and writes nothing (the old-limit pointer is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        rc,
        0,
        "prlimit({pid}, NOFILE, {n}): {}",
        io::Error::last_os_error()
    );
}

/// Waits until process `pid` has exactly `n` descriptors open.
#[track_caller]
fn wait_for_fds(pid: u32, n: usize) {
    wait_until_ok(IO_TIMEOUT, || {
        let got = fd_count(pid);
        if got == n {
            Ok(())
        } else {
            Err(format!("holdfast has {got} descriptors open, want {n}"))
        }
    });
}

/// Lowers process `pid`'s descriptor limit so that exactly `free` more descriptors can be
/// opened (descriptor numbers, not counts, are what the limit bounds).
fn leave_free_fds(pid: u32, free: usize) {
    let used: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let limit = (0..)
        .find(|&l| l - used.iter().filter(|&&fd| fd < l).count() == free)
        .expect("some limit leaves that many free");
    set_nofile(pid, limit);
}

/// A client that sends `ping` (and then counts itself in `sent`), reads the echo, then holds
/// its session until `release` is set. `Err` if the echo did not come back (a reset, an EOF,
/// or nothing within `within`).
fn ping_and_hold(
    target: SocketAddr,
    sent: &AtomicUsize,
    release: &AtomicBool,
    within: Duration,
) -> Result<(), String> {
    let mut c = try_client_from("127.0.0.1", target).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    c.write_all(b"ping").map_err(|e| format!("write: {e}"))?;
    sent.fetch_add(1, SeqCst);
    let mut back = [0u8; 4];
    c.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
    if &back != b"ping" {
        return Err(format!("echo was {back:?}"));
    }
    while !release.load(SeqCst) {
        std::thread::sleep(ms(5));
    }
    Ok(())
}

/// Starts `n` [`ping_and_hold`] clients of `target` at once; `sent` counts those that have
/// sent their `ping`.
fn ping_and_hold_all(
    target: SocketAddr,
    n: usize,
    sent: &Arc<AtomicUsize>,
    release: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Result<(), String>>> {
    (0..n)
        .map(|_| {
            let (sent, release) = (Arc::clone(sent), Arc::clone(release));
            std::thread::spawn(move || {
                ping_and_hold(target, &sent, &release, Duration::from_secs(20))
            })
        })
        .collect()
}

/// Joins the clients of [`ping_and_hold_all`]; panics naming every one that was not served.
#[track_caller]
fn expect_all_served(clients: Vec<JoinHandle<Result<(), String>>>, log: impl Fn() -> String) {
    let failures: Vec<String> = clients
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| match t.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("client {i}: {e}")),
            Err(_) => Some(format!("client {i} panicked")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} clients not served: {failures:?}\nholdfast's log:\n{}",
        failures.len(),
        log()
    );
}

// ---------------------------------------------------------------------------------------------
// Item 3: at the descriptor limit, clients wait in the backlog
// ---------------------------------------------------------------------------------------------

/// Room for about ten sessions (an odd number of descriptors free, so a client can be
/// accepted with the very last one), then 30 clients at once, each sending its request
/// immediately. None is reset: those that do not fit wait in the backlog, and are served
/// once the first ones leave. Afterwards holdfast holds exactly the descriptors it started
/// with.
#[test]
fn at_the_descriptor_limit_clients_wait_instead_of_being_reset() {
    let echo = EchoBackend::start();
    let lb = quiet_in_front_of(&echo, "copy");
    let pid = lb.pid();
    let baseline = fd_count(pid);
    leave_free_fds(pid, 2 * 10 + 1);

    let release = Arc::new(AtomicBool::new(false));
    let clients = ping_and_hold_all(lb.addr(), 30, &Arc::default(), &release);
    lb.wait_for_stderr("Too many open files", IO_TIMEOUT);
    release.store(true, SeqCst);
    expect_all_served(clients, || lb.stderr());
    wait_for_fds(pid, baseline);
}

// ---------------------------------------------------------------------------------------------
// Item 7: a pipe that cannot be made costs one burst its splice, not the session's life
// ---------------------------------------------------------------------------------------------

/// With `--relay splice`, a session whose pump cannot get a pipe (no descriptor free) copies
/// that burst, and the client is served all the same; once descriptors are free again the
/// next burst is spliced (a pipe is made: holdfast holds pipe descriptors).
///
/// The binary is started without a test connection, so its pipe pool starts empty.
#[test]
fn a_pipe_shortage_falls_back_to_copying_for_one_burst_only() {
    let echo = EchoBackend::start();
    let lb = quiet_in_front_of(&echo, "splice");
    let pid = lb.pid();
    let mut c = client(lb.addr());
    echo.wait_for_accepted(1, IO_TIMEOUT);
    // Pipe descriptors it did not make (inherited ones, if any).
    let inherited = pipe_fds(pid);

    // Not one descriptor free: the burst is copied.
    set_nofile(pid, fd_count(pid));
    let burst = random_bytes(200 * 1024, 7);
    round_trip(&mut c, &burst);
    assert_eq!(
        pipe_fds(pid),
        inherited,
        "a pipe was made with no descriptor free"
    );

    // Descriptors free again: the next burst is spliced (the pipe stays open in the pool).
    set_nofile(pid, 20_000);
    round_trip(&mut c, &burst);
    assert!(
        pipe_fds(pid) > inherited,
        "the session kept copying after descriptors were free again"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 2: clients that leave the queue
// ---------------------------------------------------------------------------------------------

/// Waits until `lb` reports `n` clients waiting in the queue.
#[track_caller]
fn wait_for_queued(lb: &holdfast::Holdfast, n: u64) {
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if st.queued == n {
            Ok(())
        } else {
            Err(format!("{} clients waiting, want {n}: {st:?}", st.queued))
        }
    });
}

/// Both slots of the backend are taken and 100 clients wait (the queue is full). 99 of them
/// leave (half reset, half close without sending anything): they leave the queue at once, a
/// new client is queued instead of refused "queue full", and when slots free up the backend
/// sees only the clients still there. The one that half-closed after sending its request
/// (EOF with bytes pending) has not left: it is served, in its turn.
#[test]
fn clients_that_leave_the_queue_give_up_their_place() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.workers = 1;
    cfg.limits.max_conns_per_backend = 2;
    cfg.limits.max_queue = 100;
    cfg.limits.queue_timeout = Duration::from_secs(30);
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let mut holders: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("holder {i}").as_bytes());
            c
        })
        .collect();

    let mut half_closer = client(target);
    half_closer.write_all(b"my request").unwrap();
    half_closer.shutdown(std::net::Shutdown::Write).unwrap();
    let leavers: Vec<TcpStream> = (0..99).map(|_| client(target)).collect();
    wait_for_queued(&lb, 100);
    for (i, c) in leavers.into_iter().enumerate() {
        if i % 2 == 0 {
            reset(c);
        } else {
            drop(c);
        }
    }
    wait_for_queued(&lb, 1);

    // Room in the queue again: a new client waits rather than being closed.
    let mut late = client(target);
    late.write_all(b"late").unwrap();
    wait_for_queued(&lb, 2);
    assert_eq!(lb.stats().queue_full, 0, "{:?}", lb.stats());

    // A slot frees: the half-closer is served (its request echoed, then EOF), and when its
    // session ends the late client is.
    drop(holders.remove(0));
    let mut back = Vec::new();
    half_closer
        .read_to_end(&mut back)
        .expect("the half-closed client is served");
    assert_eq!(back, b"my request");
    let mut got = [0u8; 4];
    late.read_exact(&mut got)
        .expect("the late client is served");
    assert_eq!(&got, b"late");
    round_trip(&mut late, b"and more");

    assert_eq!(
        echo.accepted(),
        4,
        "the backend saw connections other than the 2 holders, the half-closer and the late \
         client"
    );
    let st = lb.stats();
    assert_eq!(
        (st.queued, st.queue_full, st.queue_timeouts),
        (0, 0, 0),
        "{st:?}"
    );
}

/// A client that says nothing and shuts down its write side while its backend connect is
/// still under way has not left: an EOF with nothing sent looks the same whether the client
/// closed or only half-closed, and a backend that speaks first (a banner) may be what it
/// waits for. Only in the queue does such an EOF give up the client's place.
#[test]
fn a_silent_half_closed_client_still_gets_a_slow_backend_banner() {
    let mut gated = GatedBackend::start();
    let mut cfg = config(&[gated.addr()]);
    cfg.connect_timeout = Duration::from_secs(20);
    let lb = start_balancer(cfg);
    let mut c = client(lb_addr(&lb));
    wait_until(IO_TIMEOUT, || lb.stats().active == 1);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    // Holdfast sees the hang-up within a turn of its loop; a client it took for gone would
    // read EOF now.
    c.set_read_timeout(Some(ms(300))).unwrap();
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the half-closed client was closed while connecting: {other:?}"),
    }
    gated.open_with(|mut stream| {
        let _ = stream.write_all(b"220 banner\r\n");
    });
    set_timeouts(&c);
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("the banner, then EOF, once the connect completes");
    assert_eq!(got, b"220 banner\r\n");
    assert_eq!(lb.stats().connect_failures, 0, "{:?}", lb.stats());
}

// ---------------------------------------------------------------------------------------------
// Item 1: passive detection of backends that end sessions without answering
// ---------------------------------------------------------------------------------------------

/// One client that speaks first (as a WebSocket client does): connect, send a request, read
/// its echo. `Ok` only if the echo came back whole.
fn speak_first(target: SocketAddr, i: usize) -> Result<(), String> {
    let mut c = try_client_from("127.0.0.1", target).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET /chat/{i} HTTP/1.1");
    c.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; request.len()];
    c.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == request.as_bytes() {
        Ok(())
    } else {
        Err("wrong echo".into())
    }
}

/// Clients that speak first, against an echo backend, one that reads the request and then
/// resets, and one that resets at once. Both bad backends end every session without
/// answering a byte, soon after it began: `--observe-errors` such sessions in a row take each
/// of them down, and from then on every client is served.
#[test]
fn backends_that_reset_after_reading_the_request_are_taken_out() {
    let good = EchoBackend::start();
    let reads_then_resets = ResetBackend::start(1);
    let resets_at_once = ResetBackend::start(0);
    let bad = [reads_then_resets.addr(), resets_at_once.addr()];
    let mut cfg = config(&[good.addr(), bad[0], bad[1]]);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.retries = 0;
    cfg.health.observe_errors = 3;
    // No probes: a backend taken down passively is tried again after rise x interval.
    cfg.health.interval = Duration::from_secs(30);
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    let down = |addr| backend_state(&lb, addr) == holdfast::BackendState::Down;
    let mut visits = 0;
    while !bad.iter().all(|&a| down(a)) {
        assert!(
            visits < 60,
            "after {visits} clients: {:?} {:?}",
            backend_stat(&lb, bad[0]),
            backend_stat(&lb, bad[1])
        );
        let _ = speak_first(target, visits);
        visits += 1;
    }
    for addr in bad {
        let stat = backend_stat(&lb, addr);
        assert!(stat.passive_failures >= 3, "{stat:?}");
    }
    for i in 0..20 {
        speak_first(target, 1000 + i).unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    assert_eq!(backend_stat(&lb, good.addr()).passive_failures, 0);
}

/// The other side of the rule: a backend that answered (a byte came back) before it reset
/// is failing the application, not refusing service, and is not counted; nor is one that
/// closes a session without answering only after the window (here the 300 ms connect
/// timeout) has passed, as a server that times out a silent client does.
#[test]
fn passive_detection_ignores_answered_sessions_and_late_silent_closes() {
    let answers_then_resets = ScriptedBackend::start(|mut s| {
        let mut buf = [0u8; 64];
        if s.read(&mut buf).is_ok() && s.write_all(b"!").is_ok() {
            reset(s);
        }
    });
    let closes_late = ScriptedBackend::start(|s| {
        std::thread::sleep(ms(900));
        drop(s);
    });
    let mut cfg = config(&[answers_then_resets.addr(), closes_late.addr()]);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.connect_timeout = ms(300);
    cfg.health.observe_errors = 2;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    let clients: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = client(target);
                c.write_all(format!("request {i}").as_bytes()).unwrap();
                let (how, took) = expect_closed(&mut c, Duration::from_secs(5));
                (how, took)
            })
        })
        .collect();
    for c in clients {
        c.join().expect("every client sees its session end");
    }
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if st.active == 0 && st.closed == 6 {
            Ok(())
        } else {
            Err(format!("sessions not all closed: {st:?}"))
        }
    });
    for addr in [answers_then_resets.addr(), closes_late.addr()] {
        let stat = backend_stat(&lb, addr);
        assert_eq!(stat.passive_failures, 0, "{stat:?}");
        assert_eq!(stat.state, holdfast::BackendState::Up, "{stat:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Item 4: a drain serves the whole backlog, and ends sessions with a FIN
// ---------------------------------------------------------------------------------------------

/// Connects `n` clients of `target` (the kernel completes each handshake into the backlog
/// whether holdfast accepts or not) and has each send `client i`.
fn backlog_clients(target: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = client(target);
            c.write_all(format!("client {i:04}").as_bytes()).unwrap();
            c
        })
        .collect()
}

/// Reads each client's echo of `client i`; panics naming the clients that did not get it.
#[track_caller]
fn expect_backlog_served(clients: &mut [TcpStream]) {
    let failed: Vec<String> = clients
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| {
            let mut back = [0u8; 11];
            match c.read_exact(&mut back) {
                Ok(()) if back == *format!("client {i:04}").as_bytes() => None,
                Ok(()) => Some(format!("client {i}: wrong echo {back:?}")),
                Err(e) => Some(format!("client {i}: {e}")),
            }
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} clients not served: {:?}",
        failed.len(),
        clients.len(),
        &failed[..failed.len().min(10)]
    );
}

/// The real binary is stopped (SIGSTOP) while 600 clients connect: they sit in the kernel's
/// accept queue. SIGTERM, then SIGCONT: every one of them connected before the drain, so
/// every one is served, and holdfast exits 0 once they have left.
#[test]
fn sigterm_serves_every_client_already_in_the_backlog() {
    let echo = CountingBackend::start();
    let mut child = Child::spawn(&[
        "--backend",
        &echo.addr().to_string(),
        "--workers",
        "1",
        "--health-check",
        "none",
    ]);
    child.signal(libc::SIGSTOP);
    let mut clients = backlog_clients(child.addr(), 600);
    child.signal(libc::SIGTERM);
    child.signal(libc::SIGCONT);
    expect_backlog_served(&mut clients);
    drop(clients);
    let status = child.wait_exit(IO_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "holdfast still running after its clients left; stderr:\n{}",
            child.stderr()
        )
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", child.stderr());
}

/// At `--max-conns`, clients wait in the backlog; a drain still takes them (they connected
/// before it), beyond the cap, and serves them, while the sessions already live go on.
#[test]
fn a_drain_at_max_conns_still_serves_the_backlog() {
    let echo = CountingBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.workers = 1;
    cfg.max_conns = 4;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let mut live: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("live {i}").as_bytes());
            c
        })
        .collect();
    let mut waiting = backlog_clients(target, 20);
    wait_until_ok(Duration::from_secs(3), || {
        let st = lb.stats();
        if st.active == 4 && st.accepted == 4 {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    });

    let control = lb.controller().clone();
    lb.drain();
    let joined = std::thread::spawn(move || lb.join());
    expect_backlog_served(&mut waiting);
    for (i, c) in live.iter_mut().enumerate() {
        round_trip(c, format!("live {i}, draining").as_bytes());
    }
    drop(waiting);
    drop(live);
    joined
        .join()
        .expect("join returns once every session has ended");
    let st = control.stats();
    assert_eq!((st.accepted, st.active), (24, 0), "{st:?}");
}

/// Fills every buffer between a client and an echo backend: the client writes without
/// reading until its writes would block.
fn flood(c: &mut TcpStream) {
    c.set_nonblocking(true).unwrap();
    let chunk = vec![0x5a; 64 * 1024];
    let mut idle_since = Instant::now();
    // Writes block for good once every buffer on the path is full; a short wait after the
    // first WouldBlock makes sure the proxy and the backend have caught up.
    while idle_since.elapsed() < ms(300) {
        match c.write(&chunk) {
            Ok(_) => idle_since = Instant::now(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ms(10)),
            Err(e) => panic!("flood: {e}"),
        }
    }
    c.set_nonblocking(false).unwrap();
}

/// A session in full flow at the drain timeout (the client has sent more than anyone has
/// read, and has not read what was sent back either): the drain closes it, and the client
/// reads what was in flight and then a clean EOF, not ECONNRESET. So does the backend.
#[test]
fn a_session_in_full_flow_at_the_drain_timeout_ends_with_eof_not_a_reset() {
    let (backend_saw_tx, backend_saw) = std::sync::mpsc::channel();
    let backend = ScriptedBackend::start(move |mut s| {
        // An echo that stops reading while its writes block (so every buffer fills), and
        // reports how its stream ended. Once holdfast has closed, a write may fail (that is
        // TCP for a peer that keeps writing after the other side is gone); what matters is
        // that the stream read to its end shows EOF, not a reset.
        let mut buf = vec![0u8; 64 * 1024];
        let mut echoing = true;
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => echoing = echoing && s.write_all(&buf[..n]).is_ok(),
                Err(e) => break format!("read: {e}"),
            }
        };
        let _ = backend_saw_tx.send(end);
    });
    let mut cfg = config(&[backend.addr()]);
    cfg.workers = 1;
    cfg.relay = holdfast::RelayMode::Copy;
    cfg.drain_timeout = ms(200);
    cfg.close_spread = ms(10);
    let lb = start_balancer(cfg);
    let mut c = client(lb_addr(&lb));
    flood(&mut c);

    let control = lb.controller().clone();
    lb.drain();
    let joined = std::thread::spawn(move || lb.join());
    wait_until_ok(Duration::from_secs(3), || {
        let st = control.stats();
        if st.closed_by_drain == 1 {
            Ok(())
        } else {
            Err(format!("not closed by the drain yet: {st:?}"))
        }
    });
    // Now the client reads everything that reaches it, then must see EOF.
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match c.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    assert!(end.is_ok(), "the client saw {end:?} instead of EOF");
    let backend_end = backend_saw.recv_timeout(IO_TIMEOUT).expect("backend done");
    assert_eq!(
        backend_end, "eof",
        "the backend's stream ended with {backend_end}"
    );
    drop(c);
    joined.join().expect("join returns");
    let st = control.stats();
    assert_eq!((st.active, st.resets), (0, 0), "{st:?}");
}

// ---------------------------------------------------------------------------------------------
// Item 12: --backend-timeout
// ---------------------------------------------------------------------------------------------

/// One balancer with `--backend-timeout 300ms` in front of `backend`.
fn with_backend_timeout(backend: SocketAddr) -> holdfast::Holdfast {
    let mut cfg = config(&[backend]);
    cfg.workers = 1;
    cfg.backend_timeout = Some(ms(300));
    start_balancer(cfg)
}

/// A client that keeps sending to a backend that never answers (it reads and discards) is
/// closed, with a FIN, about 300 ms after its first byte, although bytes keep moving (the
/// idle timeout, an hour, never would).
#[test]
fn backend_timeout_closes_a_session_whose_backend_never_answers() {
    let hung = SilentBackend::start();
    let lb = with_backend_timeout(hung.addr());
    let mut c = client(lb_addr(&lb));
    let started = Instant::now();
    let mut writer = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // A byte every 20 ms until the write fails (the session is gone) or 3 s pass.
        while started.elapsed() < Duration::from_secs(3) {
            if writer.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(ms(20));
        }
    });
    let (how, _) = expect_closed(&mut c, Duration::from_secs(3));
    let took = started.elapsed();
    assert!(matches!(how, Closed::Eof), "closed with {how:?}, not EOF");
    assert!(took >= ms(250), "closed after only {took:?}");
    let _ = sender.join();
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        if st.backend_timeouts == 1 && st.active == 0 {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    });
    // It never answered a byte: a backend that hangs counts as failing.
    assert_eq!(passive_failures(&lb, hung.addr()), 1);
}

/// What the backend timeout leaves alone: a download (the client silent, the backend
/// sending a byte every 50 ms for 1.2 s), and a conversation whose answers come within the
/// timeout (a request every 100 ms, each echoed) for 1.2 s.
#[test]
fn backend_timeout_spares_downloads_and_answered_conversations() {
    let download = ScriptedBackend::start(|mut s| {
        for _ in 0..24 {
            if s.write_all(b"d").is_err() {
                return;
            }
            std::thread::sleep(ms(50));
        }
    });
    let lb = with_backend_timeout(download.addr());
    let mut c = client(lb_addr(&lb));
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("the download ends with the backend's EOF");
    assert_eq!(got, [b'd'; 24], "the download was cut short");

    let echo = EchoBackend::start();
    let lb2 = with_backend_timeout(echo.addr());
    let mut c = client(lb_addr(&lb2));
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < ms(1200) {
        round_trip(&mut c, format!("request {i}").as_bytes());
        i += 1;
        std::thread::sleep(ms(100));
    }
    round_trip(&mut c, b"still here");
    assert_eq!(
        lb.stats().backend_timeouts + lb2.stats().backend_timeouts,
        0
    );
}

/// A bad `--backend-timeout` is a usage error: exit 2, and an `error:` line naming it.
#[test]
fn a_bad_backend_timeout_is_a_usage_error() {
    let out = run_binary(
        &[
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:1",
            "--backend-timeout",
            "soon",
        ],
        IO_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let first_line = stderr.lines().next().unwrap_or_default();
    assert!(
        first_line.starts_with("error:") && first_line.contains("soon"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fault classes: hung backends, a killed backend, descriptors running out during a drain,
// SIGTERM under load
// ---------------------------------------------------------------------------------------------

/// A backend that accepts and then does nothing at all with its connections (never reads,
/// never writes) until `thaw` is set.
fn frozen_backend() -> (ScriptedBackend, Arc<AtomicBool>) {
    let thaw = Arc::new(AtomicBool::new(false));
    let t = Arc::clone(&thaw);
    let backend = ScriptedBackend::start(move |s| {
        while !t.load(SeqCst) {
            std::thread::sleep(ms(10));
        }
        drop(s);
    });
    (backend, thaw)
}

/// Backends that hang, each way a backend can: its connects hang (the connect timeout closes
/// the client), or it accepts and then never reads nor writes (a silent client is closed by
/// the idle timeout, one that keeps sending by the backend timeout, both with an EOF). Every
/// client sees its session end, and afterwards holdfast holds exactly the descriptors it
/// started with.
#[test]
fn hung_backends_cost_clients_a_timeout_and_holdfast_nothing() {
    let hole = BlackholeBackend::start();
    let (frozen, thaw) = frozen_backend();
    let connects = Child::quiet().spawn(&[
        "--backend",
        &hole.addr().to_string(),
        "--connect-timeout",
        "300ms",
        "--retries",
        "0",
        "--workers",
        "1",
        "--health-check",
        "none",
    ]);
    let timeouts = Child::quiet().spawn(&[
        "--backend",
        &frozen.addr().to_string(),
        "--idle-timeout",
        "600ms",
        "--backend-timeout",
        "300ms",
        "--relay",
        "copy",
        "--workers",
        "1",
        "--health-check",
        "none",
    ]);
    let baselines = [fd_count(connects.pid()), fd_count(timeouts.pid())];

    let mut clients = Vec::new();
    for i in 0..10 {
        // Waits for a connect that never completes.
        let mut c = client(connects.addr());
        c.write_all(b"hello?").unwrap();
        clients.push(("connect", c));
        // Silent, in front of a backend that never answers.
        clients.push(("idle", client(timeouts.addr())));
        // Sends more than any buffer holds, to a backend that never reads.
        let c = client(timeouts.addr());
        let mut writer = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![i as u8; 64 * 1024];
            while writer.write_all(&chunk).is_ok() {}
        });
        clients.push(("backend", c));
    }
    let ends: Vec<_> = clients
        .into_iter()
        .map(|(kind, mut c)| {
            std::thread::spawn(move || (kind, expect_closed(&mut c, Duration::from_secs(5)).0))
        })
        .collect();
    for end in ends {
        let (kind, how) = end.join().expect("every client sees its session end");
        if kind != "connect" {
            assert!(
                matches!(how, Closed::Eof),
                "{kind} timeout ended with {how:?}"
            );
        }
    }
    wait_for_fds(connects.pid(), baselines[0]);
    wait_for_fds(timeouts.pid(), baselines[1]);
    thaw.store(true, SeqCst);
}

/// An echo backend whose every socket (listener and connections) can be closed abruptly at
/// once, with SO_LINGER 0: the backend process dying.
struct KillableBackend {
    addr: SocketAddr,
    kill: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl KillableBackend {
    fn start() -> KillableBackend {
        let listener = TcpListener::bind(localhost0()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let kill = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (kill, accepted) = (Arc::clone(&kill), Arc::clone(&accepted));
            std::thread::spawn(move || {
                let mut conns: Vec<TcpStream> = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                while !kill.load(SeqCst) {
                    while let Ok((c, _)) = listener.accept() {
                        accepted.fetch_add(1, SeqCst);
                        c.set_nonblocking(true).unwrap();
                        conns.push(c);
                    }
                    // Small messages only: an echo that fits the send buffer is written whole.
                    conns.retain_mut(|c| match c.read(&mut buf) {
                        Ok(0) => false,
                        Ok(n) => c.write_all(&buf[..n]).is_ok(),
                        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    });
                    std::thread::sleep(ms(1));
                }
                for c in conns {
                    reset(c);
                }
                drop(listener);
            })
        };
        KillableBackend {
            addr,
            kill,
            accepted,
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        self.kill.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("backend thread");
        }
    }
}

impl Drop for KillableBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// 300 live sessions over two backends; one backend dies (every socket reset at once). Each
/// of its clients sees its session end; the others go on; new clients all go to the
/// survivor; and once everyone has left, holdfast's counters are back to zero.
#[test]
fn a_backend_killed_under_hundreds_of_sessions() {
    let mut victim = KillableBackend::start();
    let survivor = CountingBackend::start();
    let mut cfg = config(&[victim.addr, survivor.addr()]);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 2;
    cfg.health.observe_errors = 0;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let mut clients: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("client {i}").as_bytes());
            c
        })
        .collect();
    let on_victim = victim.accepted.load(SeqCst);
    assert!(on_victim >= 100, "only {on_victim} sessions on the victim");

    victim.kill();
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if st.active == (300 - on_victim) as u64 {
            Ok(())
        } else {
            Err(format!("{on_victim} sessions were on the victim: {st:?}"))
        }
    });
    let mut ended = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let msg = format!("client {i} again");
        let mut back = vec![0u8; msg.len()];
        let alive = c.write_all(msg.as_bytes()).is_ok() && c.read_exact(&mut back).is_ok();
        if alive {
            assert_eq!(back, msg.as_bytes());
        } else {
            ended += 1;
        }
    }
    assert_eq!(
        ended, on_victim,
        "sessions that ended vs sessions the victim held"
    );

    let before = survivor.accepted();
    for i in 0..50 {
        let mut c = client(target);
        round_trip(&mut c, format!("newcomer {i}").as_bytes());
    }
    // The survivor counts an accept a moment after it has echoed on it.
    wait_until_ok(Duration::from_secs(2), || {
        match survivor.accepted() - before {
            50 => Ok(()),
            n => Err(format!("{n} of 50 newcomers on the survivor")),
        }
    });

    drop(clients);
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if (st.active, st.pipes_in_use, st.buffers_in_use, st.queued) == (0, 0, 0, 0) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    });
}

/// Descriptors run short while a drain is taking the backlog: the listener stays open until
/// every client that had connected is taken, as descriptors free up. All are served, none
/// reset, and holdfast exits 0.
#[test]
fn descriptors_running_out_during_a_drain_reset_nobody() {
    let echo = EchoBackend::start();
    let mut lb = quiet_in_front_of(&echo, "copy");
    let pid = lb.pid();
    leave_free_fds(pid, 2 * 10 + 1);
    signal(pid, libc::SIGSTOP);
    let (sent, release) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let clients = ping_and_hold_all(lb.addr(), 30, &sent, &release);
    wait_until(IO_TIMEOUT, || sent.load(SeqCst) == 30);
    signal(pid, libc::SIGTERM);
    signal(pid, libc::SIGCONT);
    lb.wait_for_stderr("Too many open files", IO_TIMEOUT);
    release.store(true, SeqCst);
    expect_all_served(clients, || lb.stderr());
    let status = lb
        .wait_exit(IO_TIMEOUT)
        .unwrap_or_else(|| panic!("holdfast still running:\n{}", lb.stderr()));
    assert_eq!(status.code(), Some(0), "{}", lb.stderr());
}

/// SIGTERM while 16 sessions stream 4 MiB each way: every stream completes intact (the drain
/// timeout is far away), and holdfast exits 0 once they have ended.
#[test]
fn sigterm_under_load_lets_every_session_finish() {
    let echo = EchoBackend::start();
    let mut child = Child::spawn(&[
        "--backend",
        &echo.addr().to_string(),
        "--workers",
        "2",
        "--health-check",
        "none",
    ]);
    let data = &shared_random()[..4 << 20];
    let target = child.addr();
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let c = client(target);
            std::thread::spawn(move || echo_stream(c, data))
        })
        .collect();
    wait_until(IO_TIMEOUT, || echo.accepted() >= 17); // the 16, and Child's probe
    child.signal(libc::SIGTERM);
    for (i, s) in streams.into_iter().enumerate() {
        s.join()
            .expect("stream thread")
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    let status = child.wait_exit(IO_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "holdfast still running after its sessions ended; stderr:\n{}",
            child.stderr()
        )
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{}", child.stderr());
}
