//! Moving bytes: bulk integrity in every relay mode, half-close, server-speaks-first, resets,
//! and idle sessions holding no pipe or buffer.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use holdfast::RelayMode;

use crate::util::*;

const MIB: usize = 1 << 20;

fn bulk_one_connection(mode: RelayMode) {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.relay = mode;
    let lb = start_balancer(cfg);
    let data = &shared_random()[..64 * MIB];
    let stream = client(lb_addr(&lb));
    if let Err(e) = echo_stream(stream, data) {
        panic!("64 MiB through one {mode} connection: {e}");
    }
    let want = data.len() as u64;
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        if st.bytes_client_to_backend >= want && st.bytes_backend_to_client >= want {
            Ok(())
        } else {
            Err(format!(
                "byte counters do not cover the 64 MiB each way: {st:?}"
            ))
        }
    });
}

#[test]
fn bulk_64mib_splice() {
    bulk_one_connection(RelayMode::Splice);
}

#[test]
fn bulk_64mib_copy() {
    bulk_one_connection(RelayMode::Copy);
}

#[test]
fn bulk_64mib_auto() {
    bulk_one_connection(RelayMode::Auto);
}

/// One 32 MiB echo stream through `--relay splice` with `--pipe-memory` at `pipe_memory`:
/// what comes back has the SHA-256 of what was sent. Returns the bytes of grown pipes the
/// balancer holds afterwards (pooled for the next bulk stream).
fn bulk_through_splice(pipe_memory: usize) -> u64 {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.relay = RelayMode::Splice;
    cfg.pipe_memory = pipe_memory;
    cfg.workers = 1;
    let lb = start_balancer(cfg);
    let data = &shared_random()[..32 * MIB];
    let stream = client(lb_addr(&lb));
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        writer.write_all(data).expect("write");
        writer.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut got = Vec::with_capacity(data.len());
    let mut reader = stream;
    reader.read_to_end(&mut got).expect("read the echo to EOF");
    sender.join().expect("writer");
    assert_eq!(
        (got.len(), sha256_hex(&got)),
        (data.len(), sha256_hex(data)),
        "the echo (length, sha256) with --pipe-memory {pipe_memory}"
    );
    lb.stats().pipe_memory
}

#[test]
fn a_bulk_stream_grows_its_pipes_and_arrives_intact() {
    let held = bulk_through_splice(holdfast::Config::new(vec![], vec![]).pipe_memory);
    assert!(
        held > 0,
        "a 32 MiB stream never got a grown pipe (none is pooled after it)"
    );
}

#[test]
fn a_bulk_stream_with_no_pipe_memory_arrives_intact_through_default_pipes() {
    assert_eq!(bulk_through_splice(0), 0, "a pipe grew with a budget of 0");
}

/// With `--defer-accept` a client that connects and sends is served as ever, while one that
/// connects and says nothing is not even accepted (no backend connection is made for it).
#[test]
fn defer_accept_serves_a_client_that_speaks_and_ignores_a_silent_one() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    // Long enough that the silent client is still waiting when the test looks, however
    // loaded the machine: the kernel hands it over only after this and a SYN-ACK resent.
    cfg.defer_accept = Some(Duration::from_secs(30));
    let lb = start_balancer(cfg);
    let silent = client(lb_addr(&lb));
    let mut talker = client(lb_addr(&lb));
    round_trip(&mut talker, b"GET / HTTP/1.1\r\n\r\n");
    let st = lb.stats();
    assert_eq!(
        (st.accepted, echo.accepted()),
        (1, 1),
        "only the client that spoke was accepted and connected on"
    );
    drop(silent);
}

/// Whether holdfast's socket to `backend` (the one established connection to that address)
/// has a keepalive timer, as `ss` shows it: `Err` while there is no such connection.
fn backend_socket_keepalive(backend: std::net::SocketAddr) -> Result<bool, String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", "dst", &backend.to_string()])
        .output()
        .map_err(|e| format!("ss: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.as_slice() {
        [line] => Ok(line.contains("timer:(keepalive")),
        other => Err(format!(
            "{} connections to {backend}: {other:?}",
            other.len()
        )),
    }
}

/// A short session never pays for TCP keepalive on its backend socket (three setsockopt
/// calls); one that lives for half the keepalive time gets it. The client's socket has it
/// from the listener all along.
#[test]
fn backend_keepalive_is_set_only_once_a_session_proves_long_lived() {
    // Keepalive 60s: a session a moment old has none on its backend socket.
    let echo = EchoBackend::start();
    let lb = start_balancer(config(&[echo.addr()]));
    let mut c = client(lb_addr(&lb));
    round_trip(&mut c, b"short");
    assert_eq!(
        backend_socket_keepalive(echo.addr()),
        Ok(false),
        "keepalive was set on the backend socket of a session a moment old"
    );
    drop(c);
    // Keepalive 2s: the session gets it after 1s of relaying.
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.tcp_keepalive = Some(Duration::from_secs(2));
    let lb = start_balancer(cfg);
    let mut c = client(lb_addr(&lb));
    round_trip(&mut c, b"long");
    wait_until_ok(Duration::from_secs(10), || {
        match backend_socket_keepalive(echo.addr()) {
            Ok(true) => Ok(()),
            other => Err(format!("no keepalive on the backend socket yet: {other:?}")),
        }
    });
    round_trip(&mut c, b"still relaying");
}

/// 64 connections at once, 2 MiB each way, each with its own bytes (a slice of the shared
/// random buffer), so crossed wires between sessions would show.
fn bulk_concurrent(mode: RelayMode) {
    const CONNS: usize = 64;
    const EACH: usize = 2 * MIB;
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.relay = mode;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let data = shared_random();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNS)
            .map(|i| {
                s.spawn(move || {
                    let stream = client(target);
                    echo_stream(stream, &data[i * EACH..(i + 1) * EACH])
                        .map_err(|e| format!("connection {i}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().err())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {CONNS} {mode} connections failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if st.active == 0 && st.closed >= CONNS as u64 {
            Ok(())
        } else {
            Err(format!("sessions not all closed: {st:?}"))
        }
    });
}

#[test]
fn concurrent_64x2mib_splice() {
    bulk_concurrent(RelayMode::Splice);
}

#[test]
fn concurrent_64x2mib_copy() {
    bulk_concurrent(RelayMode::Copy);
}

#[test]
fn concurrent_64x2mib_auto() {
    bulk_concurrent(RelayMode::Auto);
}

/// Client finishes its request with shutdown(Write); the backend reads to EOF, only then
/// replies and closes; the client gets the whole reply and then EOF.
#[test]
fn half_close_client_first() {
    let request = random_bytes(300 * 1024, 1);
    let reply = random_bytes(200 * 1024, 2);
    let backend = {
        let reply = reply.clone();
        OneShotBackend::start(move |mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .expect("backend: read request to EOF");
            s.write_all(&reply).expect("backend: write reply");
            got
        })
    };
    let lb = start_balancer(config(&[backend.addr()]));
    let mut c = client(lb_addr(&lb));
    c.write_all(&request).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client: read reply to EOF after its own shutdown(Write)");
    assert!(
        got == reply,
        "reply differs ({} of {} bytes)",
        got.len(),
        reply.len()
    );
    let seen = backend.result(IO_TIMEOUT);
    assert!(
        seen == request,
        "backend saw {} of {} request bytes",
        seen.len(),
        request.len()
    );
}

/// Backend sends, then shuts down its write side; the client reads that and EOF, and can
/// still send afterwards: the backend receives it.
#[test]
fn half_close_backend_first() {
    let greeting = random_bytes(150 * 1024, 3);
    let late = random_bytes(250 * 1024, 4);
    let backend = {
        let greeting = greeting.clone();
        OneShotBackend::start(move |mut s| {
            s.write_all(&greeting).expect("backend: write");
            s.shutdown(Shutdown::Write)
                .expect("backend: shutdown(Write)");
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .expect("backend: read after its shutdown(Write)");
            got
        })
    };
    let lb = start_balancer(config(&[backend.addr()]));
    let mut c = client(lb_addr(&lb));
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client: read to EOF after the backend's shutdown(Write)");
    assert!(
        got == greeting,
        "client got {} of {} bytes",
        got.len(),
        greeting.len()
    );
    c.write_all(&late)
        .expect("client: write after the backend half-closed");
    c.shutdown(Shutdown::Write).unwrap();
    let seen = backend.result(IO_TIMEOUT);
    assert_eq!(
        (seen.len(), sha256_hex(&seen)),
        (late.len(), sha256_hex(&late)),
        "bytes sent after the backend's half-close, at the backend (length, sha256)"
    );
}

#[test]
fn server_speaks_first() {
    let tagged = TaggedBackend::start("hello-from-backend");
    let lb = start_balancer(config(&[tagged.addr()]));
    let mut c = client(lb_addr(&lb));
    // Nothing is sent: the greeting must arrive anyway.
    assert_eq!(read_line(&mut c), "hello-from-backend");
    round_trip(&mut c, b"and then an echo");
}

/// The client resets in the middle of a stream: the backend's connection is closed promptly
/// and the session is gone from the counters.
#[test]
fn client_reset_mid_stream_closes_backend() {
    let received = Arc::new(AtomicUsize::new(0));
    let backend = {
        let received = Arc::clone(&received);
        OneShotBackend::start(move |mut s| {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(n) => {
                        received.fetch_add(n, SeqCst);
                    }
                }
            }
        })
    };
    let lb = start_balancer(config(&[backend.addr()]));
    let mut c = client(lb_addr(&lb));
    let chunk = random_bytes(256 * 1024, 5);
    c.write_all(&chunk).unwrap();
    wait_until(IO_TIMEOUT, || received.load(SeqCst) > 0);
    c.write_all(&chunk).unwrap();
    let reset_at = Instant::now();
    reset(c);
    let closed_at = backend.result(IO_TIMEOUT);
    let took = closed_at.saturating_duration_since(reset_at);
    assert!(
        took < Duration::from_secs(2),
        "backend connection closed {took:?} after the client reset"
    );
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        if st.active == 0 {
            Ok(())
        } else {
            Err(format!("active sessions after reset: {st:?}"))
        }
    });
}

/// The backend resets in the middle of a stream: the client sees the close promptly. The
/// client sends exactly what the backend waits for and then only reads, so nothing but the
/// backend's reset can end the session.
#[test]
fn backend_reset_mid_stream_closes_client() {
    const BEFORE_RESET: usize = 64 * 1024;
    let backend = ResetBackend::start(BEFORE_RESET);
    let lb = start_balancer(config(&[backend.addr()]));
    let mut c = client(lb_addr(&lb));
    let start = Instant::now();
    c.write_all(&random_bytes(BEFORE_RESET, 6)).unwrap();
    let (how, _) = expect_closed(&mut c, Duration::from_secs(2));
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "client saw the close ({how:?}) only after {took:?}"
    );
    wait_until(Duration::from_secs(2), || lb.stats().active == 0);
}

/// `shutdown` + `join` close live sessions (both sides) and the listener.
#[test]
fn shutdown_closes_sessions_and_listener() {
    let silent = SilentBackend::start();
    let lb = start_balancer(config(&[silent.addr()]));
    let addr = lb_addr(&lb);
    let mut c = client(addr);
    c.write_all(b"anyone there?").unwrap();
    silent.wait_for_accepted(1, IO_TIMEOUT);
    lb.shutdown();
    lb.join();
    expect_closed(&mut c, Duration::from_secs(2));
    silent.wait_for_open(0, Duration::from_secs(2));
    let refused = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    assert!(refused.is_err(), "{addr} still accepts after shutdown");
}

/// In-process, splice mode: 200 sessions that each moved some bytes and are now idle hold
/// no pipe and no copy buffer.
#[test]
fn idle_sessions_hold_no_pipe_or_buffer() {
    const CONNS: usize = 200;
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.relay = RelayMode::Splice;
    let lb = start_balancer(cfg);
    let payload = random_bytes(4096, 7);
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let mut c = client(lb_addr(&lb));
            round_trip(&mut c, &payload);
            c
        })
        .collect();
    wait_until_ok(Duration::from_secs(5), || {
        let st = lb.stats();
        if st.active == CONNS as u64 && st.pipes_in_use == 0 && st.buffers_in_use == 0 {
            Ok(())
        } else {
            Err(format!(
                "want {CONNS} idle sessions holding nothing: {st:?}"
            ))
        }
    });
    // Every session is still open at the backend.
    echo.wait_for_open(CONNS, Duration::from_secs(2));
    drop(clients);
}

/// The real binary, splice mode, 2 workers: 300 sessions that each did a 1 KiB round trip
/// and are now idle. Pipes come from a small per-worker pool (at most 16 free pipes, i.e. 32
/// fds, per worker), so the process holds at most 64 pipe fds, far fewer than one pipe per
/// session.
#[test]
fn binary_idle_sessions_hold_few_pipes() {
    const CONNS: usize = 300;
    let echo = EchoBackend::start();
    let backend = echo.addr().to_string();
    let child = Child::spawn(&["--relay", "splice", "--workers", "2", "--backend", &backend]);
    let payload = random_bytes(1024, 8);
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let mut c = client(child.addr());
            round_trip(&mut c, &payload);
            c
        })
        .collect();
    wait_until_ok(Duration::from_secs(5), || {
        let pipes = pipe_fds(child.pid());
        if pipes <= 64 {
            Ok(())
        } else {
            Err(format!(
                "holdfast holds {pipes} pipe fds for {CONNS} idle sessions"
            ))
        }
    });
    // The sessions are really still there (the count above is not about closed sessions).
    echo.wait_for_open(CONNS, Duration::from_secs(2));
    let mut last = clients.into_iter().last().unwrap();
    round_trip(&mut last, b"still alive");
}
