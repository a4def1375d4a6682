//! Lifecycle: the graceful drain (on SIGTERM, and through the library), draining one backend,
//! reloading the backends file on SIGHUP, following a DNS name, the session log, and the
//! recipes of docs/operations.md.
//!
//! Every test checks what a user of holdfast sees on the wire (refused connects, echoes, EOFs
//! and when they come), on stderr, or in the counters, so it fails if the feature breaks.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use holdfast::{Algorithm, BackendChange, BackendState, Resolver};

use crate::util::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// Graceful drain of the whole process (the real binary, SIGTERM)
// ---------------------------------------------------------------------------------------------

/// `n` clients of `target`, each with one echoed message (so each is relaying).
fn echo_sessions(target: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("session {i} says hello").as_bytes());
            c
        })
        .collect()
}

#[test]
fn sigterm_refuses_at_once_then_closes_sessions_spread_over_the_window() {
    const SESSIONS: usize = 20;
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
    const SPREAD: Duration = Duration::from_secs(2);
    const BUCKETS: u32 = 10;
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&[
        "--backend",
        &b,
        "--health-check",
        "none",
        "--workers",
        "2",
        "--drain-timeout",
        "1s",
        "--close-spread",
        "2s",
    ]);
    let target = child.addr();
    let sessions = echo_sessions(target, SESSIONS);

    let signalled = child.signal(libc::SIGTERM);
    // Listeners close at once: a new client is refused, not queued.
    let refused = wait_refused(target, Duration::from_secs(2)).saturating_duration_since(signalled);
    assert!(
        refused <= ms(200),
        "new connections were still accepted {refused:?} after SIGTERM (want <= 200ms)"
    );

    // Every session keeps relaying during the drain timeout, then sees a clean end of stream.
    // One thread per session records when its close arrives.
    let readers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                round_trip(
                    &mut s,
                    format!("session {i}, early in the drain").as_bytes(),
                );
                sleep_until(signalled + ms(600));
                round_trip(&mut s, format!("session {i}, late in the drain").as_bytes());
                let (how, _) = expect_closed(&mut s, Duration::from_secs(6));
                (how, Instant::now())
            })
        })
        .collect();
    let mut closes = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        let (how, at) = r
            .join()
            .unwrap_or_else(|_| panic!("session {i} stopped echoing during the drain timeout"));
        assert!(
            matches!(how, Closed::Eof),
            "session {i} ended with {how:?}, not a clean EOF"
        );
        closes.push(at.saturating_duration_since(signalled));
    }
    closes.sort();
    let (first, last) = (closes[0], closes[SESSIONS - 1]);
    assert!(
        first >= DRAIN_TIMEOUT - ms(50),
        "a session was closed {first:?} after SIGTERM, before the 1s drain timeout; \
         closes: {closes:?}"
    );
    assert!(
        last <= DRAIN_TIMEOUT + SPREAD + ms(500),
        "the last session was closed {last:?} after SIGTERM, past 1s + 2s spread; \
         closes: {closes:?}"
    );
    // Spread evenly: no 200 ms slot of the window holds much more than its share (2), and the
    // second half of the window holds a fair part of the closes.
    let slot = SPREAD / BUCKETS;
    let mut buckets = [0usize; BUCKETS as usize];
    for c in &closes {
        let i = (c.saturating_sub(DRAIN_TIMEOUT).as_nanos() / slot.as_nanos()) as usize;
        buckets[i.min(BUCKETS as usize - 1)] += 1;
    }
    let fair = SESSIONS / BUCKETS as usize;
    assert!(
        buckets.iter().all(|&n| n <= 2 * fair + 1),
        "closes are bunched: per 200ms slot {buckets:?}; closes: {closes:?}"
    );
    let second_half = closes
        .iter()
        .filter(|&&c| c >= DRAIN_TIMEOUT + SPREAD / 2)
        .count();
    assert!(
        second_half >= SESSIONS / 4,
        "only {second_half} of {SESSIONS} closes in the second half of the spread window; \
         per 200ms slot {buckets:?}"
    );

    // The process exits 0 once the last session has ended.
    let status = child.wait_exit(Duration::from_secs(8));
    let exited = signalled.elapsed();
    let Some(status) = status else {
        panic!(
            "holdfast still running {exited:?} after SIGTERM, although its last session closed \
             {last:?} after it; stderr:\n{}",
            child.stderr()
        );
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit after the drain: {status}; stderr:\n{}",
        child.stderr()
    );
    assert!(
        exited <= last + Duration::from_secs(1),
        "holdfast exited {exited:?} after SIGTERM, {:?} after its last session closed (want it \
         to exit when the last session ends); stderr:\n{}",
        exited.saturating_sub(last),
        child.stderr()
    );
}

#[test]
fn second_sigterm_closes_every_session_at_once() {
    const SESSIONS: usize = 10;
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&[
        "--backend",
        &b,
        "--health-check",
        "none",
        "--workers",
        "2",
        "--drain-timeout",
        "10s",
        "--close-spread",
        "10s",
    ]);
    let target = child.addr();
    let mut sessions = echo_sessions(target, SESSIONS);

    child.signal(libc::SIGTERM);
    // The drain has begun (the listeners are closed), and the sessions still relay.
    wait_refused(target, Duration::from_secs(2));
    for (i, s) in sessions.iter_mut().enumerate() {
        round_trip(s, format!("session {i}, draining").as_bytes());
    }
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let (how, _) = expect_closed(&mut s, Duration::from_secs(5));
                (how, Instant::now())
            })
        })
        .collect();

    let before_second = Instant::now();
    let second = child.signal(libc::SIGTERM);
    for (i, r) in readers.into_iter().enumerate() {
        let (how, at) = r
            .join()
            .unwrap_or_else(|_| panic!("session {i} not closed within 5s of the second SIGTERM"));
        assert!(
            at >= before_second,
            "session {i} closed ({how:?}) before the second SIGTERM, during a 10s drain timeout"
        );
        let after = at.saturating_duration_since(second);
        assert!(
            after <= ms(500),
            "session {i} closed ({how:?}) {after:?} after the second SIGTERM (want <= 500ms)"
        );
    }
    let status = child.wait_exit(Duration::from_secs(2)).unwrap_or_else(|| {
        panic!(
            "holdfast still running 2s after the second SIGTERM; stderr:\n{}",
            child.stderr()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit after the second SIGTERM: {status}; stderr:\n{}",
        child.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful drain through the library
// ---------------------------------------------------------------------------------------------

#[test]
fn library_drain_counts_only_the_sessions_it_closed() {
    const DRAIN_TIMEOUT: Duration = Duration::from_millis(300);
    const SPREAD: Duration = Duration::from_millis(300);
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.workers = 2;
    cfg.drain_timeout = DRAIN_TIMEOUT;
    cfg.close_spread = SPREAD;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let leavers = echo_sessions(target, 3);
    let mut stayers = echo_sessions(target, 4);
    let control = lb.controller().clone();

    let drained = Instant::now();
    lb.drain();
    // The joiner tells when `join` returned (it must, once the last session has ended).
    let (joined_tx, joined) = mpsc::channel();
    std::thread::spawn(move || {
        lb.join();
        let _ = joined_tx.send(Instant::now());
    });

    // Three sessions end on their own during the drain timeout: the client half-closes, the
    // echo backend closes, the client sees EOF.
    for (i, mut s) in leavers.into_iter().enumerate() {
        s.shutdown(Shutdown::Write).unwrap();
        let (how, _) = expect_closed(&mut s, Duration::from_secs(2));
        assert!(matches!(how, Closed::Eof), "leaver {i} ended with {how:?}");
    }
    let left = drained.elapsed();
    assert!(
        left < DRAIN_TIMEOUT,
        "the sessions that ended on their own took {left:?}, past the drain timeout: the test \
         cannot tell them from drained ones"
    );
    // The others still relay, then are closed by the drain after the timeout, within the
    // spread.
    for (i, s) in stayers.iter_mut().enumerate() {
        round_trip(s, format!("stayer {i}, during the drain").as_bytes());
    }
    for (i, s) in stayers.iter_mut().enumerate() {
        let (how, _) = expect_closed(s, Duration::from_secs(3));
        let at = drained.elapsed();
        assert!(matches!(how, Closed::Eof), "stayer {i} ended with {how:?}");
        assert!(
            at >= DRAIN_TIMEOUT,
            "stayer {i} closed {at:?} after drain(), before the 300ms drain timeout"
        );
        assert!(
            at <= DRAIN_TIMEOUT + SPREAD + ms(400),
            "stayer {i} closed {at:?} after drain(), past 300ms + 300ms spread"
        );
    }
    let all_closed = drained.elapsed();

    match joined.recv_timeout(Duration::from_secs(3)) {
        Ok(at) => {
            let took = at.saturating_duration_since(drained);
            assert!(
                took <= all_closed + Duration::from_secs(1),
                "join() returned {took:?} after drain(), although every session had ended \
                 {all_closed:?} after it"
            );
        }
        Err(_) => panic!(
            "join() had not returned 3s after every session ended ({all_closed:?} after \
             drain()); stats: {:?}",
            control.stats()
        ),
    }
    let st = control.stats();
    assert_eq!(
        st.closed_by_drain, 4,
        "closed_by_drain counts the 4 sessions the drain closed, not the 3 that ended on their \
         own: {st:?}"
    );
    assert_eq!(st.active, 0, "{st:?}");
}

// ---------------------------------------------------------------------------------------------
// Draining one backend (library API)
// ---------------------------------------------------------------------------------------------

/// A round-robin balancer with one worker (so the rotation is predictable) over `backends`.
fn round_robin_config(backends: &[SocketAddr]) -> holdfast::Config {
    let mut cfg = config(backends);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg
}

#[test]
fn drained_backend_gets_no_new_sessions_and_ready_restores_it() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let lb = start_balancer(round_robin_config(&[a.addr(), b.addr()]));
    let target = lb_addr(&lb);
    let first = connect_tagged(target);
    let second = connect_tagged(target);
    let (mut on_a, mut on_b) = match (first.0.as_str(), second.0.as_str()) {
        ("a", "b") => (first.1, second.1),
        ("b", "a") => (second.1, first.1),
        other => panic!("round-robin over a and b gave {other:?}"),
    };

    lb.change_backend(a.addr(), BackendChange::Drain).unwrap();
    assert_eq!(backend_stat(&lb, a.addr()).state, BackendState::Drain);
    let tags = tags_of_new_clients(target, 6);
    assert_eq!(
        count_tag(&tags, "b"),
        6,
        "new clients reached a drained backend: {tags:?}"
    );
    // Its live session is untouched.
    round_trip(&mut on_a, b"a is draining, but I am still served");
    round_trip(&mut on_b, b"b as usual");
    assert_eq!(backend_stat(&lb, a.addr()).active, 1);

    lb.change_backend(a.addr(), BackendChange::Ready).unwrap();
    assert_eq!(backend_stat(&lb, a.addr()).state, BackendState::Up);
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(
        count_tag(&tags, "a"),
        2,
        "after Ready, round-robin should share new clients again: {tags:?}"
    );
    round_trip(&mut on_a, b"still here after ready");
}

#[test]
fn backend_drain_timeout_closes_only_that_backends_sessions_spread_out() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    const SPREAD: Duration = Duration::from_millis(300);
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let mut cfg = round_robin_config(&[a.addr(), b.addr()]);
    cfg.backend_drain_timeout = Some(TIMEOUT);
    cfg.close_spread = SPREAD;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        match connect_tagged(target) {
            (t, s) if t == "a" => on_a.push(s),
            (t, s) if t == "b" => on_b.push(s),
            (t, _) => panic!("unexpected tag {t}"),
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (3, 3), "round-robin split");

    let drained = Instant::now();
    lb.change_backend(a.addr(), BackendChange::Drain).unwrap();
    for s in &mut on_a {
        round_trip(s, b"draining, not yet closed");
    }
    for (i, s) in on_a.iter_mut().enumerate() {
        let (how, _) = expect_closed(s, Duration::from_secs(3));
        let at = drained.elapsed();
        assert!(
            matches!(how, Closed::Eof),
            "a's session {i} ended with {how:?}"
        );
        assert!(
            at >= TIMEOUT,
            "a's session {i} closed {at:?} after the drain, before the 300ms drain timeout"
        );
        assert!(
            at <= TIMEOUT + SPREAD + ms(400),
            "a's session {i} closed {at:?} after the drain, past 300ms + 300ms spread"
        );
    }
    // Past the whole window, b's sessions are still open and relaying.
    sleep_until(drained + TIMEOUT + SPREAD + ms(200));
    for (i, s) in on_b.iter_mut().enumerate() {
        round_trip(s, format!("b's session {i} outlived a's drain").as_bytes());
    }
    wait_until_ok(Duration::from_secs(2), || {
        let st = backend_stat(&lb, a.addr());
        if st.active == 0 {
            Ok(())
        } else {
            Err(format!("a still counts {} active sessions", st.active))
        }
    });
    assert_eq!(backend_stat(&lb, b.addr()).active, 3);
    assert_eq!(lb.stats().closed_by_drain, 3, "{:?}", lb.stats());
}

// ---------------------------------------------------------------------------------------------
// Reloading the backends file (the real binary, SIGHUP)
// ---------------------------------------------------------------------------------------------

/// Sends SIGHUP and waits until stderr shows that it was handled (`want` handled SIGHUPs in
/// all, successful or not).
fn sighup(child: &Child, want: usize) {
    child.signal(libc::SIGHUP);
    wait_until_ok(Duration::from_secs(5), || {
        let err = child.stderr();
        let handled = err
            .lines()
            .filter(|l| l.contains("SIGHUP: backends reloaded") || l.contains("SIGHUP: reload"))
            .count();
        if handled >= want {
            Ok(())
        } else {
            Err(format!(
                "{handled} SIGHUPs handled, want {want}; stderr:\n{err}"
            ))
        }
    });
}

#[test]
fn sighup_reload_adds_removes_reweights_and_rejects_a_bad_file() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let c = TaggedBackend::start("c");
    let (aa, ba, ca) = (a.addr(), b.addr(), c.addr());
    let file = TempFile::new("backends", &format!("# the pool\n{aa}\n{ba}\n"));
    let path = file.path().to_str().unwrap().to_string();
    let child = Child::spawn(&[
        "--backends-file",
        &path,
        "--health-check",
        "none",
        "--algorithm",
        "round-robin",
        "--workers",
        "1",
    ]);
    let target = child.addr();
    let first = connect_tagged(target);
    let second = connect_tagged(target);
    let (mut live_a, mut live_b) = match (first.0.as_str(), second.0.as_str()) {
        ("a", "b") => (first.1, second.1),
        ("b", "a") => (second.1, first.1),
        other => panic!("round-robin over the file's a and b gave {other:?}"),
    };

    // Add c.
    file.write(&format!("{aa}\n{ba}\n{ca}\n"));
    sighup(&child, 1);
    wait_until_ok(Duration::from_secs(2), || {
        let (tag, _) = connect_tagged(target);
        if tag == "c" {
            Ok(())
        } else {
            Err(format!("a new client reached {tag}, not the added c"))
        }
    });

    // Remove b: new clients never reach it; its live session stays and keeps echoing.
    file.write(&format!("{aa}\n# b is gone\n{ca}\n"));
    sighup(&child, 2);
    let tags = tags_of_new_clients(target, 8);
    assert_eq!(
        count_tag(&tags, "b"),
        0,
        "new clients reached the removed b: {tags:?}"
    );
    assert_eq!(count_tag(&tags, "a"), 4, "a and c share: {tags:?}");
    round_trip(&mut live_b, b"b was removed, but this session lives on");
    round_trip(&mut live_a, b"a stays");

    // Reweight: a at 3 gets 3 of every 4 new clients.
    file.write(&format!("{aa},weight=3\n{ca}\n"));
    sighup(&child, 3);
    let tags = tags_of_new_clients(target, 8);
    assert_eq!(
        (count_tag(&tags, "a"), count_tag(&tags, "c")),
        (6, 2),
        "a at weight 3, c at 1, over 8 clients: {tags:?}"
    );

    // An invalid file changes nothing (not even its valid lines: b would come back, a's weight
    // would drop to 1) and the error names the file and the line.
    file.write(&format!("{aa}\n{ba}\n{ca},weight=2\nnot a backend\n"));
    sighup(&child, 4);
    let err = child.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_else(|| panic!("no 'reload failed' line on stderr:\n{err}"));
    assert!(
        line.contains(&format!("{path}:4")),
        "the reload error does not name {path}:4:\n{line}"
    );
    let tags = tags_of_new_clients(target, 8);
    assert_eq!(
        (
            count_tag(&tags, "a"),
            count_tag(&tags, "b"),
            count_tag(&tags, "c")
        ),
        (6, 0, 2),
        "after a rejected reload, clients must go where they went (a:3, c:1): {tags:?}"
    );

    // No reload dropped a live session.
    round_trip(&mut live_a, b"a, after four reloads");
    round_trip(&mut live_b, b"b, after four reloads");
    assert_eq!(b.open(), 1, "the removed b holds exactly its live session");
}

// ---------------------------------------------------------------------------------------------
// Following a DNS name (library, with a test resolver)
// ---------------------------------------------------------------------------------------------

/// The test resolver: `Config::resolver` replaces getaddrinfo for `backend_dns` names. It
/// answers whatever the test last stored (`Err`: the name does not resolve) and counts the
/// lookups, so a test can wait for a refresh instead of sleeping. The fake backends share
/// 127.0.0.1 and differ by port, so the answer carries whole socket addresses and the name's
/// port is ignored.
struct FakeDns {
    answer: Arc<Mutex<io::Result<Vec<SocketAddr>>>>,
    lookups: Arc<AtomicUsize>,
}

impl FakeDns {
    const NAME: &'static str = "pool.example.test";

    fn new(first: Vec<SocketAddr>) -> FakeDns {
        FakeDns {
            answer: Arc::new(Mutex::new(Ok(first))),
            lookups: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Points `cfg` at this resolver for `pool.example.test:7000`, refreshed every 100 ms.
    fn configure(&self, cfg: &mut holdfast::Config) {
        cfg.backend_dns = vec![format!("{}:7000", Self::NAME).parse().unwrap()];
        cfg.dns_interval = ms(100);
        let (answer, lookups) = (Arc::clone(&self.answer), Arc::clone(&self.lookups));
        cfg.resolver = Resolver::new(move |host, _port| {
            assert_eq!(host, Self::NAME);
            lookups.fetch_add(1, SeqCst);
            match &*answer.lock().unwrap() {
                Ok(addrs) => Ok(addrs.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            }
        });
    }

    /// The answer from the next lookup on.
    fn answer(&self, new: io::Result<Vec<SocketAddr>>) {
        *self.answer.lock().unwrap() = new;
    }

    /// The answer from the next lookup on, and waits for two lookups: at least one whole
    /// refresh has seen it.
    fn answer_and_wait(&self, new: io::Result<Vec<SocketAddr>>) {
        self.answer(new);
        let seen = self.lookups.load(SeqCst);
        wait_until(Duration::from_secs(2), || {
            self.lookups.load(SeqCst) >= seen + 2
        });
    }
}

#[test]
fn dns_name_follows_answers_and_keeps_the_last_one() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let dns = FakeDns::new(vec![a.addr()]);
    let mut cfg = round_robin_config(&[]);
    dns.configure(&mut cfg);
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    // The name resolves to a: every new client reaches a.
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(count_tag(&tags, "a"), 4, "{tags:?}");
    let (_, mut live_a) = connect_tagged(target);

    // Now to b: new clients reach b within about a second; a's live session survives.
    dns.answer(Ok(vec![b.addr()]));
    let changed = Instant::now();
    wait_until_ok(Duration::from_secs(1), || match connect_tagged(target).0 {
        t if t == "b" => Ok(()),
        t => Err(format!(
            "a new client reached {t}, {:?} after the name moved to b",
            changed.elapsed()
        )),
    });
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(count_tag(&tags, "b"), 4, "{tags:?}");
    round_trip(&mut live_a, b"a left the answer, this session stays");

    // Then to nothing, then to an error: the last answer (b) is kept.
    dns.answer_and_wait(Ok(Vec::new()));
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(
        count_tag(&tags, "b"),
        4,
        "after an empty answer, the last one (b) should be kept: {tags:?}"
    );
    dns.answer_and_wait(Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no such name (test resolver)",
    )));
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(
        count_tag(&tags, "b"),
        4,
        "after a failed lookup, the last answer (b) should be kept: {tags:?}"
    );
    round_trip(&mut live_a, b"still here");
    assert_eq!(backend_stat(&lb, b.addr()).state, BackendState::Up);

    // a, out of the answer, was kept (drained) only for its live session: once that ends, a
    // leaves the set.
    assert_eq!(backend_stat(&lb, a.addr()).state, BackendState::Drain);
    drop(live_a);
    wait_until_ok(Duration::from_secs(2), || {
        let left: Vec<SocketAddr> = lb.backend_stats().iter().map(|s| s.addr).collect();
        if left == [b.addr()] {
            Ok(())
        } else {
            Err(format!("backends {left:?}, want only b {}", b.addr()))
        }
    });
}

/// The tag of the backend a new client of `target` reaches, or why it reached none.
fn try_tag(target: SocketAddr) -> Result<String, String> {
    let mut c = client(target);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match std::io::Read::read(&mut c, &mut byte) {
            Ok(0) => return Err("closed before a backend spoke: no backend took it".into()),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("no backend spoke: {e}")),
        }
    }
}

/// The same as `dns_name_follows_answers_and_keeps_the_last_one`, with one more backend in the
/// list that takes no clients (a `--backend` drained by the operator). With the name as the
/// only source, an empty or failed answer could never be applied (a list with no backend is
/// rejected), so the name's last answer would survive even if holdfast dropped it; here it
/// must survive on its own.
#[test]
fn dns_keeps_the_last_answer_beside_other_backends() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let standby = TaggedBackend::start("standby");
    let dns = FakeDns::new(vec![a.addr()]);
    let mut cfg = round_robin_config(&[standby.addr()]);
    dns.configure(&mut cfg);
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    lb.change_backend(standby.addr(), BackendChange::Drain)
        .unwrap();

    let tags = tags_of_new_clients(target, 4);
    assert_eq!(count_tag(&tags, "a"), 4, "{tags:?}");
    dns.answer_and_wait(Ok(vec![b.addr()]));
    let tags = tags_of_new_clients(target, 4);
    assert_eq!(count_tag(&tags, "b"), 4, "{tags:?}");

    for (what, new) in [
        (
            "a failed lookup",
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
        ),
        ("an empty answer", Ok(Vec::new())),
    ] {
        dns.answer_and_wait(new);
        let got: Vec<Result<String, String>> = (0..4).map(|_| try_tag(target)).collect();
        assert!(
            got.iter().all(|t| t.as_deref() == Ok("b")),
            "after {what}, new clients should still reach the last answer (b): {got:?}; \
             backends: {:?}",
            lb.backend_stats()
                .iter()
                .map(|s| (s.addr, s.state))
                .collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The session log (the real binary, --log-sessions)
// ---------------------------------------------------------------------------------------------

/// Waits for the one session log line of the client at `client_addr` and returns it.
fn session_log_line(child: &Child, client_addr: SocketAddr) -> String {
    let field = format!("client={client_addr}");
    let mut found = String::new();
    wait_until_ok(Duration::from_secs(3), || {
        let err = child.stderr();
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == field))
            .collect();
        match lines.as_slice() {
            [line] => {
                found = line.to_string();
                Ok(())
            }
            [] => Err(format!("no line with {field} on stderr:\n{err}")),
            more => Err(format!("{} lines with {field}: {more:#?}", more.len())),
        }
    });
    found
}

/// The value of `key=` in a session log line.
fn log_field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in the session log line:\n{line}"))
}

/// The `duration=` of a session log line, in seconds.
fn log_duration(line: &str) -> f64 {
    let d = log_field(line, "duration");
    d.strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("duration={d} is not seconds:\n{line}"))
}

#[test]
fn session_log_line_for_a_client_close() {
    let tagged = TaggedBackend::start("hi"); // sends "hi\n" first: 3 bytes
    let b = tagged.addr().to_string();
    let child = Child::spawn(&[
        "--backend",
        &b,
        "--health-check",
        "none",
        "--workers",
        "1",
        "--log-sessions",
    ]);
    let mut c = client(child.addr());
    let me = c.local_addr().unwrap();
    assert_eq!(read_line(&mut c), "hi");
    let payload = random_bytes(1234, 6);
    round_trip(&mut c, &payload);
    c.write_all(b"bye").unwrap();
    let mut echo = [0u8; 3];
    std::io::Read::read_exact(&mut c, &mut echo).unwrap();
    // The client ends the session.
    c.shutdown(Shutdown::Write).unwrap();
    let (how, _) = expect_closed(&mut c, Duration::from_secs(2));
    assert!(matches!(how, Closed::Eof), "{how:?}");

    let line = session_log_line(&child, me);
    assert_eq!(
        log_field(&line, "listen"),
        child.addr().to_string(),
        "{line}"
    );
    assert_eq!(log_field(&line, "backend"), b, "{line}");
    assert_eq!(
        log_field(&line, "bytes_client_to_backend"),
        "1237",
        "1234 + 3 bytes sent: {line}"
    );
    assert_eq!(
        log_field(&line, "bytes_backend_to_client"),
        "1240",
        "3 bytes of tag + 1237 echoed: {line}"
    );
    assert_eq!(log_field(&line, "end"), "client-close", "{line}");
    let d = log_duration(&line);
    assert!((0.0..10.0).contains(&d), "duration={d}s: {line}");
}

#[test]
fn session_log_line_for_an_idle_timeout() {
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let child = Child::spawn(&[
        "--backend",
        &b,
        "--health-check",
        "none",
        "--workers",
        "1",
        "--idle-timeout",
        "200ms",
        "--log-sessions",
    ]);
    let mut c = client(child.addr());
    let me = c.local_addr().unwrap();
    round_trip(&mut c, b"then silence");
    let (how, took) = expect_closed(&mut c, Duration::from_secs(3));
    assert!(
        took >= ms(150),
        "closed ({how:?}) after {took:?}, before the idle timeout"
    );

    let line = session_log_line(&child, me);
    assert_eq!(log_field(&line, "end"), "idle-timeout", "{line}");
    assert_eq!(log_field(&line, "backend"), b, "{line}");
    assert_eq!(log_field(&line, "bytes_client_to_backend"), "12", "{line}");
    assert_eq!(log_field(&line, "bytes_backend_to_client"), "12", "{line}");
    let d = log_duration(&line);
    assert!(d >= 0.19, "duration={d}s for a 200ms idle timeout: {line}");
}

// ---------------------------------------------------------------------------------------------
// The recipes in docs/operations.md
// ---------------------------------------------------------------------------------------------

/// The `/backends` JSON body, fetched with a plain HTTP/1.1 GET.
fn backends_json(admin: SocketAddr) -> serde_json::Value {
    let mut s = client(admin);
    write!(
        s,
        "GET /backends HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .expect("write the request");
    let mut raw = String::new();
    io::Read::read_to_string(&mut s, &mut raw).expect("read the response");
    let (_, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// The field names (`.name`) a `jq '...'` filter in `text` reads.
fn jq_fields(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    for filter in text.split("jq '").skip(1) {
        let filter = filter.split('\'').next().unwrap_or_default();
        // Without the string literals ("10.0.0.2:8080" is no field).
        let code: String = filter.split('"').step_by(2).collect();
        for part in code.split('.').skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                fields.push(name);
            }
        }
    }
    fields
}

#[test]
fn the_operations_guide_reads_fields_that_backends_json_has() {
    let doc = include_str!("../../docs/operations.md");
    let fields = jq_fields(doc);
    assert!(
        !fields.is_empty(),
        "no jq filter found in docs/operations.md"
    );
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.admin = Some(localhost0());
    let lb = start_balancer(cfg);
    let json = backends_json(lb.admin_addr().expect("admin endpoint configured"));
    let backend = &json[0];
    assert!(
        backend.is_object(),
        "/backends is not a list of objects: {json}"
    );
    for field in &fields {
        assert!(
            backend.get(field).is_some(),
            "docs/operations.md reads .{field} with jq, but /backends has no such field: {backend}"
        );
    }
}
