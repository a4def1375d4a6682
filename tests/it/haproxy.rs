//! Interoperability of the PROXY protocol with a real peer, HAProxy (when `haproxy` is
//! installed; each test says so and passes when it is not): HAProxy `send-proxy-v2` in front
//! of holdfast `--accept-proxy`, and holdfast `--send-proxy v1`/`v2` in front of an HAProxy
//! frontend that `accept-proxy`s. The client address seen at the end must be the original one.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use holdfast::ProxyVersion;

use crate::util::*;

/// An `haproxy -db` child with the given configuration; killed on drop. `None` (with a
/// message) when haproxy is not installed.
struct HaProxy {
    child: std::process::Child,
    _config: TempFile,
}

impl HaProxy {
    fn start(config: &str) -> Option<HaProxy> {
        let file = TempFile::new("haproxy.cfg", config);
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(file.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(HaProxy {
                child,
                _config: file,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
                None
            }
            Err(e) => panic!("cannot start haproxy: {e}"),
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const DEFAULTS: &str = "defaults\n    timeout connect 5s\n    timeout client 10s\n    \
                        timeout server 10s\n";

/// A free loopback port, held (bound, not listening) until the guard is dropped; HAProxy
/// binds with SO_REUSEADDR beside it.
fn reserve_port() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    sock.set_reuse_address(true).expect("SO_REUSEADDR");
    sock.bind(&SockAddr::from(localhost0())).expect("bind");
    let addr = sock
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("IPv4");
    (sock, addr)
}

/// holdfast `--send-proxy VERSION` in front of an HAProxy frontend with `accept-proxy` that
/// answers every HTTP request with the client address it sees (`%[src]:%[src_port]`).
fn holdfast_sends_to_haproxy(version: ProxyVersion) {
    let (_guard, frontend) = reserve_port();
    let Some(_haproxy) = HaProxy::start(&format!(
        "{DEFAULTS}frontend fe\n    mode http\n    bind {frontend} accept-proxy\n    \
         http-request return status 200 content-type text/plain lf-string \
         \"%[src]:%[src_port]\"\n"
    )) else {
        return;
    };
    let mut config = config(&[frontend]);
    config.client_ip.send_proxy = Some(version);
    let lb = start_balancer(config);
    let mut answer = String::new();
    let mut me = None;
    wait_until_ok(IO_TIMEOUT, || {
        let mut c = client_from("127.0.0.5", lb_addr(&lb));
        me = Some(c.local_addr().map_err(|e| e.to_string())?);
        c.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        answer.clear();
        c.read_to_string(&mut answer).map_err(|e| e.to_string())?;
        if answer.starts_with("HTTP/1.") {
            Ok(())
        } else {
            Err(format!("haproxy not answering yet: {answer:?}"))
        }
    });
    let me = me.expect("set by the wait");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body, format!("{}:{}", me.ip(), me.port()), "{answer}");
}

#[test]
fn haproxy_accept_proxy_sees_the_client_behind_holdfast_send_proxy_v1() {
    holdfast_sends_to_haproxy(ProxyVersion::V1);
}

#[test]
fn haproxy_accept_proxy_sees_the_client_behind_holdfast_send_proxy_v2() {
    holdfast_sends_to_haproxy(ProxyVersion::V2);
}

#[test]
fn holdfast_accept_proxy_sees_the_client_behind_haproxy_send_proxy_v2() {
    let backend = OneShotBackend::start(|mut s| {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte).map_err(|e| e.to_string())?;
            line.push(byte[0]);
        }
        let mut body = [0u8; 5];
        s.read_exact(&mut body).map_err(|e| e.to_string())?;
        s.write_all(b"world").map_err(|e| e.to_string())?;
        Ok::<_, String>((String::from_utf8_lossy(&line).into_owned(), body))
    });
    let mut config = config(&[backend.addr()]);
    config.client_ip.accept_proxy = true;
    config.client_ip.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.client_ip.send_proxy = Some(ProxyVersion::V1);
    let lb = start_balancer(config);
    let (_guard, frontend) = reserve_port();
    let Some(_haproxy) = HaProxy::start(&format!(
        "{DEFAULTS}listen fe\n    mode tcp\n    bind {frontend}\n    \
         server holdfast {} send-proxy-v2\n",
        lb_addr(&lb)
    )) else {
        return;
    };
    let mut c = None;
    wait_until_ok(IO_TIMEOUT, || {
        match try_client_from("127.0.0.6", frontend) {
            Ok(s) => {
                c = Some(s);
                Ok(())
            }
            Err(e) => Err(format!("haproxy not listening yet: {e}")),
        }
    });
    let mut c = c.expect("set by the wait");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello").unwrap();
    let mut answer = [0u8; 5];
    c.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"world");
    let (line, body) = backend.result(IO_TIMEOUT).expect("backend read");
    let me = c.local_addr().unwrap();
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            me.ip(),
            frontend.ip(),
            me.port(),
            frontend.port()
        )
    );
    assert_eq!(&body, b"hello");
    assert_eq!(lb.stats().proxy_header_signature, 0);
}
