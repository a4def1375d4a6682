//! The real client address (issue #11): the PROXY header sent to backends (`--send-proxy`,
//! `--health-send-proxy`), read from clients (`--accept-proxy`), and the per-IP policy
//! (`--allow`/`--deny`, `--max-conns-per-ip`, `--max-conn-rate-per-ip`). Clients are bound
//! to chosen 127.x.y.z addresses, so what a backend sees can be told from holdfast's own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use holdfast::Cidr;
use holdfast::ProxyVersion;
use holdfast::fuzzing::{Command, Parse, ProxyHeader, Tlvs, encode_v1, encode_v2, parse};
use holdfast::{Config, Holdfast};

use crate::util::*;

/// What a backend got: the PROXY header and the bytes after it.
type HeaderAndBody = Result<(ProxyHeader, Vec<u8>), String>;

/// Reads one PROXY header (v1 or v2) from the start of `stream`, byte by byte so that nothing
/// after it is consumed, then `rest` more bytes.
fn read_header_and(stream: &mut TcpStream, rest: usize) -> HeaderAndBody {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let header = loop {
        match parse(&got) {
            Parse::Done { header, .. } => break header,
            Parse::Invalid(r) => return Err(format!("invalid header ({r}): {got:?}")),
            Parse::Incomplete { .. } => {}
        }
        stream
            .read_exact(&mut byte)
            .map_err(|e| format!("reading the header after {got:?}: {e}"))?;
        got.push(byte[0]);
    };
    let mut body = vec![0u8; rest];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("reading {rest} bytes after the header: {e}"))?;
    Ok((header, body))
}

/// The first `n` bytes a backend's first connection receives, raw.
fn first_bytes(stream: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn trusted(config: &mut Config, cidr: &str) {
    config.client_ip.accept_proxy = true;
    config
        .client_ip
        .trusted_proxies
        .push(cidr.parse::<Cidr>().expect("CIDR"));
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn send_proxy_v1_names_the_client_and_the_address_it_connected_to() {
    let backend = OneShotBackend::start(|mut s| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte).map_err(|e| e.to_string())?;
            line.push(byte[0]);
        }
        let body = first_bytes(&mut s, 5)?;
        Ok::<_, String>((String::from_utf8_lossy(&line).into_owned(), body))
    });
    let mut config = config(&[backend.addr()]);
    config.client_ip.send_proxy = Some(ProxyVersion::V1);
    let lb = start_balancer(config);
    let mut c = client_from("127.0.0.2", lb_addr(&lb));
    // Written at once: the header must still come before these bytes.
    c.write_all(b"hello").unwrap();
    let (line, body) = backend.result(IO_TIMEOUT).expect("backend read");
    let me = c.local_addr().unwrap();
    let lb_port = lb_addr(&lb).port();
    assert_eq!(
        line,
        format!("PROXY TCP4 127.0.0.2 127.0.0.1 {} {lb_port}\r\n", me.port())
    );
    assert_eq!(body, b"hello");
}

#[test]
fn send_proxy_v2_names_the_client_and_the_address_it_connected_to() {
    let backend = OneShotBackend::start(|mut s| {
        let got = read_header_and(&mut s, 5);
        if got.is_ok() {
            let _ = s.write_all(b"pong!");
        }
        got
    });
    let mut config = config(&[backend.addr()]);
    config.client_ip.send_proxy = Some(ProxyVersion::V2);
    let lb = start_balancer(config);
    let mut c = client_from("127.0.0.3", lb_addr(&lb));
    c.write_all(b"ping!").unwrap();
    let (header, body) = backend.result(IO_TIMEOUT).expect("backend read");
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(
        header.addresses,
        Some((c.local_addr().unwrap(), lb_addr(&lb)))
    );
    assert_eq!(body, b"ping!");
    // And the backend's answer reaches the client: the relay works behind the header.
    let mut answer = [0u8; 5];
    c.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong!");
}

#[test]
fn health_send_proxy_probes_start_with_a_v2_local_header() {
    let backend = OneShotBackend::start(|mut s| first_bytes(&mut s, 16));
    let mut config = config(&[backend.addr()]);
    config.health.check = holdfast::HealthCheck::Tcp;
    config.health.interval = Duration::from_millis(100);
    config.client_ip.health_send_proxy = true;
    let _lb = start_balancer(config);
    let got = backend.result(IO_TIMEOUT).expect("probe bytes");
    assert_eq!(got, holdfast::fuzzing::encode_v2_local());
}

/// A balancer that accepts PROXY headers from 127.0.0.1 and sends v1 on, in front of a
/// backend that reports the header it gets and the next `rest` bytes.
fn accept_and_send(
    rest: usize,
    version: ProxyVersion,
) -> (Holdfast, OneShotBackend<HeaderAndBody>) {
    let backend = OneShotBackend::start(move |mut s| read_header_and(&mut s, rest));
    let mut config = config(&[backend.addr()]);
    trusted(&mut config, "127.0.0.1/32");
    config.client_ip.send_proxy = Some(version);
    (start_balancer(config), backend)
}

#[test]
fn accept_proxy_v1_split_across_segments_is_the_client_from_then_on() {
    let (lb, backend) = accept_and_send(7, ProxyVersion::V1);
    let mut c = client_from("127.0.0.1", lb_addr(&lb));
    c.set_nodelay(true).unwrap();
    let header = encode_v1(addr("203.0.113.7:5555"), addr("198.51.100.1:443"));
    // Three segments; the last carries the end of the header and the first stream bytes.
    // The pauses let each go out on its own (there is no condition to wait for).
    c.write_all(&header[..3]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    c.write_all(&header[3..20]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let mut last = header[20..].to_vec();
    last.extend_from_slice(b"payload");
    c.write_all(&last).unwrap();
    let (got, body) = backend.result(IO_TIMEOUT).expect("backend read");
    assert_eq!(
        got.addresses,
        Some((addr("203.0.113.7:5555"), addr("198.51.100.1:443")))
    );
    assert_eq!(
        body, b"payload",
        "the bytes after the header, relayed intact"
    );
}

#[test]
fn accept_proxy_v2_with_tlvs_passes_them_on_in_v2() {
    let (lb, backend) = accept_and_send(4, ProxyVersion::V2);
    let mut c = client_from("127.0.0.1", lb_addr(&lb));
    // An ALPN TLV (type 1) and a NOOP (type 4).
    let tlvs = Tlvs::new(vec![0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]).unwrap();
    let src = addr("[2001:db8::7]:40000");
    let dst = addr("[2001:db8::1]:443");
    let mut bytes = encode_v2(Command::Proxy, Some((src, dst)), &tlvs);
    bytes.extend_from_slice(b"data");
    // One byte at a time: every split of the header must do.
    c.set_nodelay(true).unwrap();
    for b in &bytes {
        c.write_all(std::slice::from_ref(b)).unwrap();
    }
    let (got, body) = backend.result(IO_TIMEOUT).expect("backend read");
    assert_eq!(got.addresses, Some((src, dst)));
    assert_eq!(got.tlvs, tlvs);
    assert_eq!(body, b"data");
}

#[test]
fn accept_proxy_local_uses_the_connections_own_addresses() {
    let backend = OneShotBackend::start(|mut s| read_header_and(&mut s, 2));
    let mut config = config(&[backend.addr()]);
    trusted(&mut config, "127.0.0.0/8");
    config.client_ip.send_proxy = Some(ProxyVersion::V1);
    let lb = start_balancer(config);
    let mut c = client_from("127.0.0.4", lb_addr(&lb));
    let mut bytes = holdfast::fuzzing::encode_v2_local();
    bytes.extend_from_slice(b"hi");
    c.write_all(&bytes).unwrap();
    let (got, body) = backend.result(IO_TIMEOUT).expect("backend read");
    assert_eq!(got.addresses, Some((c.local_addr().unwrap(), lb_addr(&lb))));
    assert_eq!(body, b"hi");
}

/// A balancer with `--accept-proxy` (trusting 127.0.0.1 only) in front of an echo backend.
fn accepting(timeout: Duration) -> (Holdfast, EchoBackend) {
    let backend = EchoBackend::start();
    let mut config = config(&[backend.addr()]);
    trusted(&mut config, "127.0.0.1/32");
    config.client_ip.proxy_header_timeout = timeout;
    (start_balancer(config), backend)
}

fn header_errors(lb: &Holdfast, reason: &str) -> u64 {
    lb.stats()
        .proxy_header_errors()
        .iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no reason {reason}"))
}

#[test]
fn accept_proxy_closes_a_malformed_header_and_counts_it() {
    let (lb, backend) = accepting(Duration::from_secs(3));
    let mut c = client(lb_addr(&lb));
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_closed(&mut c, IO_TIMEOUT);
    wait_until(IO_TIMEOUT, || header_errors(&lb, "signature") == 1);
    // A v1 line with a bad address.
    let mut c = client(lb_addr(&lb));
    c.write_all(b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n").unwrap();
    expect_closed(&mut c, IO_TIMEOUT);
    wait_until(IO_TIMEOUT, || header_errors(&lb, "address") == 1);
    assert_eq!(
        backend.accepted(),
        0,
        "no backend connection for a bad header"
    );
    // A good client is still served.
    let mut c = client(lb_addr(&lb));
    let mut bytes = encode_v1(addr("192.0.2.1:1000"), addr("192.0.2.2:80"));
    bytes.extend_from_slice(b"echo");
    c.write_all(&bytes).unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"echo");
}

#[test]
fn accept_proxy_closes_an_untrusted_source() {
    let (lb, backend) = accepting(Duration::from_secs(3));
    let mut c = client_from("127.0.0.2", lb_addr(&lb));
    let _ = c.write_all(&encode_v1(addr("192.0.2.1:1000"), addr("192.0.2.2:80")));
    expect_closed(&mut c, IO_TIMEOUT);
    wait_until(IO_TIMEOUT, || header_errors(&lb, "untrusted") == 1);
    assert_eq!(backend.accepted(), 0);
}

#[test]
fn accept_proxy_closes_a_header_that_does_not_complete_in_time() {
    let (lb, backend) = accepting(Duration::from_millis(300));
    let mut c = client(lb_addr(&lb));
    c.write_all(b"PROXY TCP4 192.0.2.1").unwrap();
    let (_, took) = expect_closed(&mut c, IO_TIMEOUT);
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    wait_until(IO_TIMEOUT, || header_errors(&lb, "timeout") == 1);
    assert_eq!(backend.accepted(), 0);
    assert_eq!(lb.stats().active, 0);
}

#[test]
fn deny_and_allow_close_refused_clients_at_once() {
    let backend = EchoBackend::start();
    let mut config = config(&[backend.addr()]);
    config.client_ip.access.allow = vec!["127.0.0.0/24".parse().unwrap()];
    config.client_ip.access.deny = vec!["127.0.0.2/32".parse().unwrap()];
    let lb = start_balancer(config);
    let mut denied = client_from("127.0.0.2", lb_addr(&lb));
    expect_closed(&mut denied, IO_TIMEOUT);
    let mut not_allowed = client_from("127.0.1.2", lb_addr(&lb));
    expect_closed(&mut not_allowed, IO_TIMEOUT);
    let mut ok = client_from("127.0.0.3", lb_addr(&lb));
    round_trip(&mut ok, b"fine");
    wait_until(IO_TIMEOUT, || lb.stats().refused_deny == 2);
    assert_eq!(
        backend.accepted(),
        1,
        "refused clients never reach a backend"
    );
}

#[test]
fn deny_checks_the_proxy_headers_address() {
    let backend = EchoBackend::start();
    let mut config = config(&[backend.addr()]);
    trusted(&mut config, "127.0.0.1/32");
    config.client_ip.access.deny = vec!["203.0.113.0/24".parse().unwrap()];
    let lb = start_balancer(config);
    let mut c = client(lb_addr(&lb));
    c.write_all(&encode_v1(addr("203.0.113.9:1"), addr("192.0.2.2:80")))
        .unwrap();
    expect_closed(&mut c, IO_TIMEOUT);
    let mut c = client(lb_addr(&lb));
    let mut bytes = encode_v1(addr("198.51.100.9:1"), addr("192.0.2.2:80"));
    bytes.extend_from_slice(b"ok");
    c.write_all(&bytes).unwrap();
    let mut back = [0u8; 2];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ok");
    assert_eq!(lb.stats().refused_deny, 1);
}

#[test]
fn max_conns_per_ip_over_many_source_addresses() {
    const CLIENTS: usize = 200;
    let backend = EchoBackend::start();
    let mut config = config(&[backend.addr()]);
    config.client_ip.limits.max_conns = 2;
    let lb = start_balancer(config);
    let ip = |i: usize| format!("127.1.{}.{}", i / 200, 1 + i % 200);
    let mut held = Vec::new();
    for i in 0..CLIENTS {
        for _ in 0..2 {
            let mut c = client_from(&ip(i), lb_addr(&lb));
            round_trip(&mut c, b"x");
            held.push(c);
        }
    }
    // A third from each is refused; everyone's two are still served.
    for i in 0..CLIENTS {
        let mut c = client_from(&ip(i), lb_addr(&lb));
        expect_closed(&mut c, IO_TIMEOUT);
    }
    wait_until(IO_TIMEOUT, || {
        lb.stats().refused_max_conns_per_ip == CLIENTS as u64
    });
    // The table's size is published at its sweep (every 5 s): one entry per source address.
    wait_until(Duration::from_secs(15), || {
        lb.stats().ip_table_entries == CLIENTS as u64
    });
    assert_eq!(lb.stats().ip_table_untracked, 0);
    for c in held.iter_mut().step_by(7) {
        round_trip(c, b"still");
    }
    // A closed session gives its place back.
    drop(held.swap_remove(0));
    wait_until_ok(IO_TIMEOUT, || {
        let mut c = client_from(&ip(0), lb_addr(&lb));
        c.write_all(b"y").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(1) => Ok(()),
            other => Err(format!("not served yet: {other:?}")),
        }
    });
}

#[test]
fn max_conn_rate_per_ip_refuses_a_burst() {
    let backend = EchoBackend::start();
    let mut config = config(&[backend.addr()]);
    config.client_ip.limits.max_rate = 2;
    let lb = start_balancer(config);
    let start = Instant::now();
    let mut served = 0;
    for _ in 0..10 {
        let mut c = client_from("127.0.0.9", lb_addr(&lb));
        let _ = c.write_all(b"z");
        let mut b = [0u8; 1];
        if let Ok(1) = c.read(&mut b) {
            served += 1;
        }
    }
    let elapsed = start.elapsed();
    // A bucket of 2, refilled at 2 a second.
    let most = 2 + 2 * (elapsed.as_secs() as usize + 1);
    assert!(served <= most, "{served} served in {elapsed:?}");
    assert!(served >= 2, "the first two are served: {served}");
    assert_eq!(lb.stats().refused_max_conn_rate_per_ip, 10 - served as u64);
    // Another address has its own bucket.
    let mut other = client_from("127.0.0.10", lb_addr(&lb));
    round_trip(&mut other, b"ok");
}

/// `--tcp-user-timeout`: a backend that stops acknowledging while holdfast has bytes for it is
/// given up after the timeout, and the client learns at once; without the flag the session
/// hangs on in retransmission. The scenario runs in a network namespace of its own
/// (`unshare -n`, which needs root), where the backend's address can leave the routes without
/// touching anyone else's loopback: see `tests/it/scripts/unreachable-backend.sh`.
#[test]
fn tcp_user_timeout_drops_a_backend_that_stops_acknowledging() {
    let namespaces = std::process::Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !namespaces {
        eprintln!("SKIPPED: cannot make a network namespace (unshare -n needs root)");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/scripts/unreachable-backend.sh"
    );
    let run = |flags: &[&str]| -> String {
        let out = std::process::Command::new("unshare")
            .args(["-n", "bash", script])
            .arg(env!("CARGO_BIN_EXE_holdfast"))
            .arg(env!("CARGO_BIN_EXE_holdfast-load"))
            .arg("4")
            .args(flags)
            .output()
            .expect("run the namespace script");
        assert!(
            out.status.success(),
            "the scenario failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let with = run(&["--tcp-user-timeout", "1s"]);
    let ms: u64 = with
        .strip_prefix("closed after ")
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("with --tcp-user-timeout 1s: {with}"));
    assert!(
        (900..3500).contains(&ms),
        "closed {ms} ms after the backend stopped acknowledging, want about 1 s"
    );
    let without = run(&[]);
    assert!(
        without.starts_with("still open after"),
        "without --tcp-user-timeout: {without}"
    );
}
