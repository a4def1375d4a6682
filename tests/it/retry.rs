//! Failed backend connects: retries onto another backend, closing the client when none is
//! left, and the connect timeout.

use std::time::{Duration, Instant};

use holdfast::Algorithm;

use crate::util::*;

/// Round-robin on one worker, so the refusing backend is certainly tried first for half of
/// the clients (least-conn's tie-break could legitimately always pick the echo backend).
#[test]
fn refused_backend_is_retried_on_another() {
    let refusing = closed_port();
    let echo = EchoBackend::start();
    let mut cfg = config(&[refusing.addr(), echo.addr()]);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.retries = 2;
    let lb = start_balancer(cfg);
    for i in 0..20 {
        let mut c = client(lb_addr(&lb));
        round_trip(&mut c, format!("client {i}").as_bytes());
    }
    assert_eq!(
        echo.accepted(),
        20,
        "every client served by the echo backend"
    );
    let failures = backend_stat(&lb, refusing.addr()).connect_failures;
    assert!(failures > 0, "refusing backend shows no connect failures");
    assert_eq!(backend_stat(&lb, echo.addr()).connect_failures, 0);
}

#[test]
fn all_backends_refusing_closes_client() {
    let (one, two) = (closed_port(), closed_port());
    let mut cfg = config(&[one.addr(), two.addr()]);
    cfg.retries = 2;
    let lb = start_balancer(cfg);
    let mut c = client(lb_addr(&lb));
    let (how, took) = expect_closed(&mut c, Duration::from_secs(2));
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        if st.no_backend >= 1 && st.active == 0 {
            Ok(())
        } else {
            Err(format!(
                "closed ({how:?} after {took:?}) but stats say {st:?}"
            ))
        }
    });
}

/// A backend whose connect hangs is given up on after the connect timeout, and with no
/// retries the client is closed then: not at once, not much later.
#[test]
fn connect_timeout_closes_client() {
    let hole = BlackholeBackend::start();
    let mut cfg = config(&[hole.addr()]);
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.retries = 0;
    let lb = start_balancer(cfg);
    let start = Instant::now();
    let mut c = client(lb_addr(&lb));
    let (how, _) = expect_closed(&mut c, Duration::from_secs(3));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "client closed ({how:?}) after {took:?}, before the 300ms connect timeout"
    );
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        let b = backend_stat(&lb, hole.addr());
        if st.no_backend >= 1 && st.connect_failures >= 1 && b.connect_failures >= 1 {
            Ok(())
        } else {
            Err(format!("timeout not counted: {st:?} {b:?}"))
        }
    });
}

/// With a retry left, a client whose first pick times out is served by the other backend.
#[test]
fn connect_timeout_then_retry_serves_client() {
    let hole = BlackholeBackend::start();
    let echo = EchoBackend::start();
    let mut cfg = config(&[hole.addr(), echo.addr()]);
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.workers = 1;
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.retries = 1;
    let lb = start_balancer(cfg);
    // Round-robin over two: one of the two clients starts with the black hole.
    for i in 0..2 {
        let mut c = client(lb_addr(&lb));
        round_trip(&mut c, format!("client {i}").as_bytes());
    }
    assert_eq!(echo.accepted(), 2);
    let b = backend_stat(&lb, hole.addr());
    assert!(
        b.connect_failures >= 1,
        "black hole connect not timed out: {b:?}"
    );
}
