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
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::BackendSpec;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::util::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// Backends of this file
// ---------------------------------------------------------------------------------------------

/// A backend whose connects hang (its accept queue is full, so the kernel drops SYNs) until
/// [`GatedBackend::open`], after which it accepts everything and echoes. A connect that was
/// hanging completes at the client's next SYN retransmission after the gate opens.
struct GatedBackend {
    addr: SocketAddr,
    listener: Option<Socket>,
    fillers: Vec<Socket>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GatedBackend {
    fn start() -> GatedBackend {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener.bind(&SockAddr::from(localhost0())).unwrap();
        // Backlog 0 still queues one connection; the fillers take the queue.
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            let f = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            f.set_nonblocking(true).unwrap();
            let _ = f.connect(&SockAddr::from(addr)); // EINPROGRESS
            fillers.push(f);
            if fillers.len() < 2 {
                continue;
            }
            if let Err(e) = TcpStream::connect_timeout(&addr, ms(200))
                && e.kind() == io::ErrorKind::TimedOut
            {
                return GatedBackend {
                    addr,
                    listener: Some(listener),
                    fillers,
                    stop: Arc::new(AtomicBool::new(false)),
                    thread: None,
                };
            }
        }
        panic!("could not make connects to {addr} hang by filling its accept queue");
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, accept everything (the fillers too) and echo.
    fn open(&mut self) {
        let listener: TcpListener = self.listener.take().expect("opened once").into();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::clone(&self.stop);
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || echo_until_eof(stream));
                    }
                    Err(_) => std::thread::sleep(ms(2)),
                }
            }
        }));
    }
}

impl Drop for GatedBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fillers.clear();
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
