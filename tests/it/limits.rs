//! Resource limits: running out of descriptors degrades and recovers; `--max-conns` holds
//! clients in the backlog instead of refusing them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

/// One round trip with a short read timeout: `true` if the echo came back.
fn served(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut back = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut back).is_ok() && &back == b"ping"
}

#[test]
fn running_out_of_descriptors_degrades_and_recovers() {
    let echo = EchoBackend::start();
    // 48 descriptors: the process's own handful, then room for about 20 sessions of two
    // sockets each. 40 clients cannot all be served at once.
    let mut lb = Child::quiet().nofile(48).spawn(&[
        "--backend",
        &echo.addr().to_string(),
        "--workers",
        "1",
        "--relay",
        "copy",
    ]);

    let mut clients: Vec<TcpStream> = (0..40).map(|_| client(lb.addr())).collect();
    let mut ok = 0;
    for c in &mut clients {
        ok += usize::from(served(c, Duration::from_millis(500)));
    }
    assert!(ok >= 10, "only {ok} of 40 clients served below the limit");
    assert!(
        ok < 40,
        "all 40 clients served: the descriptor limit was never reached"
    );
    assert!(lb.is_running(), "holdfast died at the descriptor limit");
    assert!(
        lb.stderr().contains("Too many open files"),
        "running out of descriptors was not logged:\n{}",
        lb.stderr()
    );

    // Once the clients go away, every new client is served again.
    drop(clients);
    for i in 0..40 {
        let mut ok = false;
        wait_until(IO_TIMEOUT, || {
            let mut c = client(lb.addr());
            ok = served(&mut c, Duration::from_secs(2));
            ok
        });
        assert!(ok, "client {i} not served after recovery");
    }
    assert!(lb.is_running());
}

#[test]
fn max_conns_holds_clients_in_the_backlog_until_there_is_room() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.max_conns = 2;
    cfg.workers = 2;
    let lb = start_balancer(cfg);
    let addr = lb_addr(&lb);

    let mut a = client(addr);
    let mut b = client(addr);
    round_trip(&mut a, b"a");
    round_trip(&mut b, b"b");

    // The third client's connect succeeds (the kernel completes the handshake into the
    // backlog) but holdfast does not take it while two sessions are live.
    let mut c = client(addr);
    assert!(
        !served(&mut c, Duration::from_millis(300)),
        "a third session was admitted"
    );
    assert_eq!(lb.stats().active, 2);

    // Room appears: the waiting client is served without reconnecting.
    drop(a);
    let started = Instant::now();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back)
        .expect("the waiting client is served once there is room");
    assert_eq!(&back, b"ping", "the bytes sent while waiting arrive intact");
    assert!(started.elapsed() < Duration::from_secs(2));
    round_trip(&mut c, b"more");
    round_trip(&mut b, b"still here");
    assert!(lb.stats().active <= 2);
}
