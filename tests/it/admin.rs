//! The admin endpoint over real HTTP: `/metrics` parsed as Prometheus text and checked against
//! the traffic sent, `/backends`, the runtime API (drain, ready, weight), its errors, slow
//! clients, floods of connections, slow changes, and stopping.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::{AdminServer, Algorithm, Holdfast};
use prometheus_parse::{Scrape, Value};

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client: one request per connection (`Connection: close`), read to EOF.
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// An error answer: the status, and a reason on exactly one line of plain text.
    #[track_caller]
    fn assert_error(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: body {:?}", self.body);
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{what}: content-type {:?}",
            self.header("content-type")
        );
        assert!(
            self.body.ends_with('\n') && self.body.lines().count() == 1 && self.body.len() > 5,
            "{what}: want a one-line reason, got {:?}",
            self.body
        );
    }

    #[track_caller]
    fn json(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "body {:?}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"));
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// Parses a whole response; the body is framed by Content-Length (never chunked here).
#[track_caller]
fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8(raw.to_vec()).expect("response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: body.to_string(),
    };
    let length: usize = response
        .header("content-length")
        .expect("content-length")
        .parse()
        .unwrap();
    assert_eq!(length, response.body.len(), "body length");
    response
}

#[track_caller]
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    send(client(addr), method, path, body)
}

/// Sends one request on `s` and reads its whole response.
#[track_caller]
fn send(mut s: TcpStream, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    let addr = s.peer_addr().expect("peer address");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write request head");
    s.write_all(body).expect("write request body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

#[track_caller]
fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    request(addr, "GET", path, b"")
}

#[track_caller]
fn post(addr: SocketAddr, path: &str, body: &str) -> HttpResponse {
    request(addr, "POST", path, body.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// Fetches and parses `/metrics`, checking that every sample line parsed, that every family
/// has HELP and TYPE, and that counters end in `_total`.
#[track_caller]
fn scrape(admin: SocketAddr) -> Scrape {
    parse_scrape(&get(admin, "/metrics"))
}

/// A scrape from source address `ip` that must be answered `within` (a read timeout, so a
/// scrape kept waiting fails rather than hangs).
#[track_caller]
fn scrape_from(ip: &str, admin: SocketAddr, within: Duration) -> Scrape {
    let s = client_from(ip, admin);
    s.set_read_timeout(Some(within)).unwrap();
    parse_scrape(&send(s, "GET", "/metrics", b""))
}

#[track_caller]
fn parse_scrape(r: &HttpResponse) -> Scrape {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let scrape = Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).expect("parse");
    let sample_lines = r
        .body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "every sample line parses:\n{}",
        r.body
    );
    for s in &scrape.samples {
        assert!(s.metric.starts_with("holdfast_"), "{}", s.metric);
        assert!(
            scrape.docs.contains_key(&s.metric),
            "no HELP for {}",
            s.metric
        );
        match s.value {
            Value::Counter(_) => assert!(s.metric.ends_with("_total"), "{}", s.metric),
            Value::Gauge(_) => assert!(!s.metric.ends_with("_total"), "{}", s.metric),
            ref other => panic!("{}: no TYPE, or an unexpected one: {other:?}", s.metric),
        }
    }
    scrape
}

/// The value of the sample `name` with exactly `labels` (besides `service`, unless asked
/// for); panics if there is none.
#[track_caller]
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape.samples.iter().find(|s| {
        s.metric == name
            && s.labels
                .keys()
                .filter(|k| *k != "service" || labels.iter().any(|(l, _)| *l == "service"))
                .count()
                == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    });
    match found.map(|s| &s.value) {
        Some(Value::Counter(v) | Value::Gauge(v)) => *v,
        _ => panic!("no sample {name}{labels:?}"),
    }
}

#[track_caller]
fn per_backend(scrape: &Scrape, name: &str, backend: SocketAddr) -> f64 {
    value(scrape, name, &[("backend", &backend.to_string())])
}

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// One worker and round-robin, so which backend a new session reaches is deterministic; the
/// admin endpoint on a free loopback port.
fn balancer_with_admin(backends: &[SocketAddr]) -> (Holdfast, SocketAddr) {
    let mut cfg = config(backends);
    cfg.workers = 1;
    cfg.algorithm = Algorithm::RoundRobin;
    cfg.admin = Some(localhost0());
    let lb = start_balancer(cfg);
    let admin = lb.admin_addr().expect("admin endpoint configured");
    (lb, admin)
}

/// Opens a session and returns the tag of the backend it reached, with the stream.
#[track_caller]
fn tagged(lb: &Holdfast) -> (String, TcpStream) {
    let mut c = client(lb_addr(lb));
    let tag = read_line(&mut c);
    (tag, c)
}

/// Opens `n` sessions one after another (each closed once its backend is known) and counts
/// the backends reached.
#[track_caller]
fn reached(lb: &Holdfast, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        *m.entry(tagged(lb).0).or_insert(0) += 1;
    }
    m
}

fn count(m: &BTreeMap<String, usize>, tag: &str) -> usize {
    m.get(tag).copied().unwrap_or(0)
}

#[track_caller]
fn backend_json(admin: SocketAddr, addr: SocketAddr) -> serde_json::Value {
    let all = get(admin, "/backends").json();
    all.as_array()
        .expect("an array")
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("{addr} not in {all}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_count_the_traffic_sent() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (lb, admin) = balancer_with_admin(&[a.addr(), b.addr()]);

    let before = scrape(admin);
    assert_eq!(value(&before, "holdfast_accepted_total", &[]), 0.0);
    for backend in [a.addr(), b.addr()] {
        assert_eq!(per_backend(&before, "holdfast_backend_up", backend), 1.0);
        assert_eq!(
            per_backend(&before, "holdfast_backend_weight", backend),
            1.0
        );
        assert_eq!(
            per_backend(&before, "holdfast_backend_effective_weight", backend),
            1.0
        );
        assert_eq!(
            per_backend(
                &before,
                "holdfast_backend_connect_latency_p99_seconds",
                backend
            ),
            0.0,
            "no connect yet"
        );
    }

    // 5 sessions, each a different size: the tag line comes back, then an echo.
    let mut sessions = Vec::new();
    let mut expect: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new(); // sessions, c2b, b2c
    for i in 0..5u64 {
        let (tag, mut c) = tagged(&lb);
        let payload = random_bytes(1000 + 300 * i as usize, i);
        round_trip(&mut c, &payload);
        let e = expect.entry(tag.clone()).or_default();
        e.0 += 1;
        e.1 += payload.len() as u64;
        e.2 += tag.len() as u64 + 1 + payload.len() as u64;
        sessions.push(c);
    }
    assert_eq!(expect.len(), 2, "round-robin reached both backends");

    let open = scrape(admin);
    assert_eq!(value(&open, "holdfast_sessions_active", &[]), 5.0);
    assert_eq!(
        per_backend(&open, "holdfast_backend_sessions_active", a.addr())
            + per_backend(&open, "holdfast_backend_sessions_active", b.addr()),
        5.0
    );

    drop(sessions);
    let addr_of = |tag: &str| if tag == "a" { a.addr() } else { b.addr() };
    wait_until_ok(Duration::from_secs(5), || {
        let s = scrape(admin);
        let active = value(&s, "holdfast_sessions_active", &[]);
        if active != 0.0 {
            return Err(format!("{active} sessions still active"));
        }
        for (tag, &(_, c2b, b2c)) in &expect {
            let got = (
                per_backend(&s, "holdfast_backend_sessions_active", addr_of(tag)),
                per_backend(
                    &s,
                    "holdfast_backend_bytes_client_to_backend_total",
                    addr_of(tag),
                ),
                per_backend(
                    &s,
                    "holdfast_backend_bytes_backend_to_client_total",
                    addr_of(tag),
                ),
            );
            if got != (0.0, c2b as f64, b2c as f64) {
                return Err(format!("{tag}: (active, c2b, b2c) = {got:?}"));
            }
        }
        Ok(())
    });

    let s = scrape(admin);
    assert_eq!(value(&s, "holdfast_accepted_total", &[]), 5.0);
    assert_eq!(value(&s, "holdfast_sessions_closed_total", &[]), 5.0);
    for name in [
        "holdfast_no_backend_total",
        "holdfast_connect_failures_total",
        "holdfast_queue_length",
        "holdfast_queued_total",
        "holdfast_queue_timeouts_total",
        "holdfast_queue_full_total",
        "holdfast_sessions_closed_by_drain_total",
        "holdfast_idle_timeouts_total",
        "holdfast_resets_total",
        "holdfast_accept_errors_total",
        "holdfast_pipes_in_use",
        "holdfast_buffers_in_use",
    ] {
        assert_eq!(value(&s, name, &[]), 0.0, "{name}");
    }
    let total = |i: fn(&(u64, u64, u64)) -> u64| expect.values().map(i).sum::<u64>() as f64;
    assert_eq!(
        value(&s, "holdfast_bytes_client_to_backend_total", &[]),
        total(|e| e.1)
    );
    assert_eq!(
        value(&s, "holdfast_bytes_backend_to_client_total", &[]),
        total(|e| e.2)
    );
    for (tag, &(n, _, _)) in &expect {
        let addr = addr_of(tag);
        assert_eq!(
            per_backend(&s, "holdfast_backend_sessions_total", addr),
            n as f64,
            "{tag}"
        );
        for name in [
            "holdfast_backend_connect_failures_total",
            "holdfast_backend_passive_failures_total",
        ] {
            assert_eq!(per_backend(&s, name, addr), 0.0, "{tag} {name}");
        }
        let p50 = per_backend(&s, "holdfast_backend_connect_latency_p50_seconds", addr);
        let p99 = per_backend(&s, "holdfast_backend_connect_latency_p99_seconds", addr);
        let max = per_backend(&s, "holdfast_backend_connect_latency_max_seconds", addr);
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= max && max < 1.0,
            "{tag}: p50 {p50} p99 {p99} max {max}"
        );
        assert_eq!(per_backend(&s, "holdfast_backend_up", addr), 1.0);
        let state = |st: &str| {
            value(
                &s,
                "holdfast_backend_state",
                &[("backend", &addr.to_string()), ("state", st)],
            )
        };
        assert_eq!(
            (state("up"), state("down"), state("drain")),
            (1.0, 0.0, 0.0)
        );
    }
}

#[test]
fn backends_json_lists_every_backend() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (lb, admin) = balancer_with_admin(&[a.addr(), b.addr()]);
    let (_, mut c) = tagged(&lb);
    round_trip(&mut c, b"hello");

    // A worker counts bytes after it has written them, so the client may see the echo a
    // moment before the counters do: wait for the tag line and the echo (2 + 5 bytes) back,
    // and the 5 bytes sent.
    let mut all = serde_json::Value::Null;
    wait_until_ok(Duration::from_secs(3), || {
        all = get(admin, "/backends").json();
        let sum = |key: &str| -> u64 {
            all.as_array()
                .map(|v| v.iter().filter_map(|b| b[key].as_u64()).sum())
                .unwrap_or(0)
        };
        match (
            sum("bytes_client_to_backend"),
            sum("bytes_backend_to_client"),
        ) {
            (5, 7) => Ok(()),
            other => Err(format!("bytes counted so far {other:?}: {all}")),
        }
    });
    let all = all.as_array().expect("an array");
    assert_eq!(all.len(), 2, "{all:?}");
    for (json, addr) in all.iter().zip([a.addr(), b.addr()]) {
        assert_eq!(json["addr"], addr.to_string());
        assert_eq!(json["state"], "up");
        assert_eq!(json["healthy"], true);
        assert_eq!(json["weight"], 1);
        assert_eq!(json["effective_weight"], 1.0);
        for key in [
            "sessions_active",
            "sessions_total",
            "connect_failures",
            "passive_failures",
            "bytes_client_to_backend",
            "bytes_backend_to_client",
            "connect_latency_p50_us",
            "connect_latency_p99_us",
            "connect_latency_max_us",
        ] {
            assert!(json[key].is_u64(), "{key} in {json}");
        }
    }
    let sessions: u64 = all
        .iter()
        .map(|b| b["sessions_active"].as_u64().unwrap())
        .sum();
    assert_eq!(sessions, 1);

    // One backend by address, plain or percent-encoded.
    let one = get(admin, &format!("/backends/{}", a.addr())).json();
    assert_eq!(one, all[0]);
    let encoded = a.addr().to_string().replace(':', "%3A");
    assert_eq!(
        get(admin, &format!("/backends/{encoded}")).json()["addr"],
        a.addr().to_string()
    );
    assert_eq!(lb.backend_stats().len(), 2);
}

#[test]
fn drain_ready_and_weight_through_the_admin_api() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (lb, admin) = balancer_with_admin(&[a.addr(), b.addr()]);

    // A session to A, opened before the drain.
    let mut on_a = loop {
        let (tag, c) = tagged(&lb);
        if tag == "a" {
            break c;
        }
    };
    round_trip(&mut on_a, b"before the drain");

    let r = post(admin, &format!("/backends/{}/drain", a.addr()), "");
    assert_eq!(r.json()["state"], "drain");
    assert_eq!(backend_json(admin, a.addr())["state"], "drain");
    let s = scrape(admin);
    assert_eq!(per_backend(&s, "holdfast_backend_up", a.addr()), 0.0);
    assert_eq!(
        value(
            &s,
            "holdfast_backend_state",
            &[("backend", &a.addr().to_string()), ("state", "drain")]
        ),
        1.0
    );
    let drained = reached(&lb, 6);
    assert_eq!(
        count(&drained, "b"),
        6,
        "every new session goes to B: {drained:?}"
    );
    round_trip(&mut on_a, b"the session opened before the drain lives on");
    // Draining twice is not an error.
    assert_eq!(
        post(admin, &format!("/backends/{}/drain", a.addr()), "").status,
        200
    );

    let r = post(admin, &format!("/backends/{}/ready", a.addr()), "");
    assert_eq!(r.json()["state"], "up");
    // Round-robin keeps its credits across backend sets, so from wherever it stood it gives
    // each of two equal backends its share within one.
    let ready = reached(&lb, 8);
    assert!(
        (3..=5).contains(&count(&ready, "a")),
        "back in the rotation: {ready:?}"
    );
    round_trip(&mut on_a, b"still alive");
    drop(on_a);

    // Weight 3 against 1: three new sessions in four go to A.
    let r = post(admin, &format!("/backends/{}/weight", a.addr()), "3");
    let json = r.json();
    assert_eq!(
        (json["weight"].clone(), json["effective_weight"].clone()),
        (3.into(), 3.0.into())
    );
    assert_eq!(backend_json(admin, a.addr())["weight"], 3);
    assert_eq!(
        per_backend(&scrape(admin), "holdfast_backend_weight", a.addr()),
        3.0
    );
    let weighted = reached(&lb, 12);
    // Smooth weighted round-robin: over 12 picks, 9 to A and 3 to B, within one.
    assert!(
        (8..=10).contains(&count(&weighted, "a")),
        "weight 3 to 1: {weighted:?}"
    );
    // A newline after the number (as `curl --data-binary @file` sends) is fine.
    let r = post(admin, &format!("/backends/{}/weight", a.addr()), "1\n");
    assert_eq!(r.json()["weight"], 1);
}

/// A drained backend that then stops answering its health checks still says `drain` as its
/// state, but `healthy` (JSON and /metrics) shows it is down, and shows it back up once it
/// answers again; a backend that is only down says so in both.
#[test]
fn a_drained_backend_still_shows_its_health() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let mut cfg = config(&[a.addr(), b.addr()]);
    cfg.workers = 1;
    cfg.admin = Some(localhost0());
    cfg.health.check = holdfast::HealthCheck::Tcp;
    cfg.health.interval = Duration::from_millis(50);
    cfg.health.timeout = Duration::from_millis(300);
    cfg.health.rise = 1;
    cfg.health.fall = 1;
    let lb = start_balancer(cfg);
    let admin = lb.admin_addr().expect("admin endpoint configured");

    let health = |addr: SocketAddr| {
        let json = backend_json(admin, addr);
        let gauge = per_backend(&scrape(admin), "holdfast_backend_healthy", addr);
        (
            json["state"].as_str().unwrap_or("?").to_string(),
            json["healthy"].clone(),
            gauge,
        )
    };
    let wait_for = |addr: SocketAddr, want: (&str, bool)| {
        wait_until_ok(Duration::from_secs(5), || {
            let (state, healthy, gauge) = health(addr);
            let want_gauge = if want.1 { 1.0 } else { 0.0 };
            if state == want.0 && healthy == want.1 && gauge == want_gauge {
                Ok(())
            } else {
                Err(format!(
                    "{addr}: state {state}, healthy {healthy}, gauge {gauge}"
                ))
            }
        })
    };
    wait_for(a.addr(), ("up", true));

    assert_eq!(
        post(admin, &format!("/backends/{}/drain", a.addr()), "").status,
        200
    );
    wait_for(a.addr(), ("drain", true));
    a.set_refusing(true);
    wait_for(a.addr(), ("drain", false));
    a.set_refusing(false);
    wait_for(a.addr(), ("drain", true));

    b.set_refusing(true);
    wait_for(b.addr(), ("down", false));
    b.set_refusing(false);
    wait_for(b.addr(), ("up", true));
}

#[test]
fn bad_requests_get_a_status_and_a_one_line_reason() {
    let a = TaggedBackend::start("a");
    let (lb, admin) = balancer_with_admin(&[a.addr()]);
    let unknown = closed_port().addr(); // an address no backend has
    let path = |action: &str| format!("/backends/{}/{action}", a.addr());

    get(admin, "/nope").assert_error(404, "unknown path");
    get(admin, "/metrics/").assert_error(404, "trailing slash");
    post(admin, &path("frobnicate"), "").assert_error(404, "unknown action");

    let r = post(admin, "/metrics", "");
    r.assert_error(405, "POST /metrics");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = get(admin, &path("drain"));
    r.assert_error(405, "GET .../drain");
    assert_eq!(r.header("allow"), Some("POST"));
    request(admin, "DELETE", "/backends", b"").assert_error(405, "DELETE /backends");

    post(admin, "/backends/not-an-address/drain", "").assert_error(400, "bad address");
    post(admin, "/backends/127.0.0.1/drain", "").assert_error(400, "no port");
    post(admin, &format!("/backends/{unknown}/drain"), "").assert_error(404, "unknown backend");
    get(admin, &format!("/backends/{unknown}")).assert_error(404, "unknown backend");
    // IPv6, raw and percent-encoded: parsed, and not a backend here.
    post(admin, "/backends/[::1]:1/ready", "").assert_error(404, "raw IPv6");
    post(admin, "/backends/%5B%3A%3A1%5D%3A1/ready", "").assert_error(404, "encoded IPv6");

    for bad in ["0", "257", "abc", "", "-1", "2.5"] {
        post(admin, &path("weight"), bad).assert_error(400, &format!("weight {bad:?}"));
    }
    let r = post(admin, &format!("/backends/{unknown}/weight"), "2");
    r.assert_error(404, "weight for an unknown backend");
    let big = "1".repeat(2048);
    post(admin, &path("weight"), &big).assert_error(413, "a body over 1 KiB");

    // Nothing above changed anything.
    let json = backend_json(admin, a.addr());
    assert_eq!(
        (json["state"].clone(), json["weight"].clone()),
        ("up".into(), 1.into())
    );
    assert_eq!(lb.backend_stats()[0].weight, 1);
    // The index lists the endpoints.
    assert!(get(admin, "/").body.contains("/metrics"));
}

#[test]
fn slow_clients_block_neither_others_nor_stop() {
    let a = TaggedBackend::start("a");
    let (lb, admin) = balancer_with_admin(&[a.addr()]);

    // A head that never ends, and a body that never comes.
    let mut half_head = client(admin);
    half_head.write_all(b"GET /metr").unwrap();
    let mut half_body = client(admin);
    half_body
        .write_all(
            format!(
                "POST /backends/{}/weight HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n2",
                a.addr()
            )
            .as_bytes(),
        )
        .unwrap();
    // A keep-alive connection left idle after a request.
    let mut idle = client(admin);
    idle.write_all(b"GET /backends HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    let start = Instant::now();
    assert_eq!(get(admin, "/metrics").status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        lb.backend_stats()[0].weight,
        1,
        "half a body is not a weight"
    );

    // A second endpoint on the same controller: stop() is prompt, the port then refuses.
    let extra = AdminServer::start(localhost0(), lb.controller().clone()).unwrap();
    let extra_addr = extra.local_addr();
    assert_ne!(extra_addr.port(), 0);
    assert_eq!(get(extra_addr, "/backends").status, 200);
    let mut extra_idle = client(extra_addr);
    extra_idle.write_all(b"GET /").unwrap();
    let start = Instant::now();
    extra.stop();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "stop took {:?}",
        start.elapsed()
    );
    assert_refused(extra_addr);
    expect_closed(&mut extra_idle, Duration::from_secs(2));

    // The balancer's own: shut down with three slow clients connected.
    let start = Instant::now();
    lb.shutdown();
    lb.join();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "join took {:?}",
        start.elapsed()
    );
    assert_refused(admin);
    for c in [&mut half_head, &mut half_body, &mut idle] {
        expect_closed(c, Duration::from_secs(2));
    }
    assert_eq!(
        a.accepted(),
        0,
        "the admin endpoint never touches a backend"
    );
}

#[track_caller]
fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("{addr} should refuse connections: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Floods of connections
// ---------------------------------------------------------------------------------------------

/// A connection that sends the start of a request and nothing more.
#[track_caller]
fn half_request(admin: SocketAddr) -> TcpStream {
    let mut s = client(admin);
    s.write_all(b"GET /metr").expect("write half a request");
    s
}

/// 200 connections that send half a request each and stop (more than the endpoint's 64
/// slots): a scrape is still answered, long before the 10 s head timeout would free a slot,
/// because each new connection takes the slot of the one that has waited longest.
#[test]
fn half_requests_do_not_keep_a_scrape_out() {
    let a = TaggedBackend::start("a");
    let (_lb, admin) = balancer_with_admin(&[a.addr()]);
    let mut half: Vec<TcpStream> = (0..200).map(|_| half_request(admin)).collect();

    let s = scrape_from("127.0.0.1", admin, Duration::from_secs(3));
    assert_eq!(value(&s, "holdfast_accepted_total", &[]), 0.0);
    assert_eq!(
        get(admin, "/backends").json().as_array().map(Vec::len),
        Some(1)
    );

    // The oldest were closed to make room; the newest still wait (their 10 s are not up).
    expect_closed(&mut half[0], Duration::from_secs(3));
    let newest = half.last().expect("200 connections");
    assert_eq!(
        pending(newest),
        Pending::Nothing,
        "the newest connection is open"
    );
}

/// Connections from one address that send half a request each and reconnect as soon as they
/// are closed, as fast as they can: scrapes from another address keep being answered.
#[test]
fn a_reconnecting_flood_does_not_lock_out_scrapes() {
    let a = TaggedBackend::start("a");
    let (_lb, admin) = balancer_with_admin(&[a.addr()]);
    let flood = Flood::start(admin, "127.0.0.77", 100);
    wait_until_ok(IO_TIMEOUT, || match flood.connected() {
        100.. => Ok(()),
        n => Err(format!("{n} flood connections so far")),
    });

    let before = flood.reconnects();
    for _ in 0..10 {
        scrape_from("127.0.0.1", admin, Duration::from_secs(3));
        assert_eq!(get(admin, "/backends").status, 200);
    }
    let (reconnects, errors) = flood.stop();
    assert!(
        reconnects > before,
        "the flood kept reconnecting while the scrapes were answered ({before} before, \
         {reconnects} after; connect errors {errors})"
    );
}

/// Keeps `n` connections from one source address open, each having sent half a request, and
/// opens a new one whenever one is closed, until stopped. One thread, non-blocking sockets.
struct Flood {
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicUsize>,
    reconnects: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    fn start(admin: SocketAddr, from: &'static str, n: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicUsize::new(0));
        let reconnects = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, connected, reconnects, errors) = (
                Arc::clone(&stop),
                Arc::clone(&connected),
                Arc::clone(&reconnects),
                Arc::clone(&errors),
            );
            std::thread::spawn(move || {
                let open = || -> std::io::Result<mio::net::TcpStream> {
                    let mut s = try_client_from(from, admin)?;
                    s.write_all(b"GET /metr")?;
                    s.set_nonblocking(true)?;
                    Ok(mio::net::TcpStream::from_std(s))
                };
                let mut poll = mio::Poll::new().expect("poll");
                let mut events = mio::Events::with_capacity(256);
                let mut conns: Vec<Option<mio::net::TcpStream>> = (0..n).map(|_| None).collect();
                let mut first = vec![true; n];
                while !stop.load(SeqCst) {
                    // (Re)open every closed one.
                    for (i, slot) in conns.iter_mut().enumerate() {
                        if slot.is_some() {
                            continue;
                        }
                        match open() {
                            Ok(mut s) => {
                                poll.registry()
                                    .register(&mut s, mio::Token(i), mio::Interest::READABLE)
                                    .expect("register");
                                *slot = Some(s);
                                if std::mem::take(&mut first[i]) {
                                    connected.fetch_add(1, SeqCst);
                                } else {
                                    reconnects.fetch_add(1, SeqCst);
                                }
                            }
                            Err(_) => {
                                errors.fetch_add(1, SeqCst);
                            }
                        }
                    }
                    match poll.poll(&mut events, Some(Duration::from_millis(20))) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => panic!("flood: poll: {e}"),
                    }
                    for event in events.iter() {
                        let i = event.token().0;
                        let Some(s) = conns[i].as_mut() else { continue };
                        // Read to the end of what is there: an answer (a 503), EOF or reset.
                        let mut buf = [0u8; 1024];
                        let closed = loop {
                            match s.read(&mut buf) {
                                Ok(0) => break true,
                                Ok(_) => {}
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                                Err(_) => break true,
                            }
                        };
                        if closed && let Some(mut s) = conns[i].take() {
                            let _ = poll.registry().deregister(&mut s);
                        }
                    }
                }
            })
        };
        Flood {
            stop,
            connected,
            reconnects,
            errors,
            thread: Some(thread),
        }
    }

    /// Connections opened for the first time.
    fn connected(&self) -> usize {
        self.connected.load(SeqCst)
    }

    /// Connections opened again after being closed.
    fn reconnects(&self) -> usize {
        self.reconnects.load(SeqCst)
    }

    /// Stops the flood (closing its connections); returns the reconnections and the failed
    /// connects.
    fn stop(mut self) -> (usize, usize) {
        self.stop_thread();
        (self.reconnects(), self.errors.load(SeqCst))
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the flood thread panicked");
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

// ---------------------------------------------------------------------------------------------
// Slow changes
// ---------------------------------------------------------------------------------------------

/// A change waits for the health thread. Here the health thread is stuck the way a real one
/// gets stuck: its log goes to a pipe nobody reads any more (a stopped log reader, a terminal
/// paused with Ctrl-S), so it blocks writing the line that records the change, before it
/// answers. Meanwhile `/metrics` and `/backends` are answered at once; the change is answered
/// once the log flows again.
#[test]
fn a_slow_change_delays_neither_metrics_nor_reads() {
    let a = TaggedBackend::start("a");
    let mut lb = LoggingToPipe::spawn(&[
        "--backend",
        &a.addr().to_string(),
        "--health-check",
        "none",
        "--workers",
        "1",
    ]);
    let admin = lb.admin;
    assert_eq!(backend_json(admin, a.addr())["state"], "up");

    lb.stall_log();
    let mut change = client(admin);
    change
        .write_all(
            format!(
                "POST /backends/{}/drain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Length: 0\r\n\r\n",
                a.addr()
            )
            .as_bytes(),
        )
        .expect("write the drain request");
    lb.wait_for_health_thread_stuck_in_log();

    // The health thread holds the change; the admin endpoint answers everything else.
    let s = scrape(admin);
    assert_eq!(per_backend(&s, "holdfast_backend_up", a.addr()), 1.0);
    assert_eq!(
        backend_json(admin, a.addr())["state"],
        "up",
        "not drained yet"
    );
    assert_eq!(
        pending(&change),
        Pending::Nothing,
        "the drain is still waiting for the health thread"
    );

    lb.resume_log();
    let mut raw = Vec::new();
    change
        .read_to_end(&mut raw)
        .expect("read the drain's answer");
    assert_eq!(parse_response(&raw).json()["state"], "drain");
    assert_eq!(backend_json(admin, a.addr())["state"], "drain");
}

/// The real binary, with `--listen 127.0.0.1:0 --admin 127.0.0.1:0` and its stderr (the log)
/// on a pipe that this test reads, or stops reading. Killed on drop.
struct LoggingToPipe {
    child: std::process::Child,
    admin: SocketAddr,
    /// The log's read end, while nobody reads it.
    log: Option<std::io::PipeReader>,
}

impl LoggingToPipe {
    #[track_caller]
    fn spawn(args: &[&str]) -> LoggingToPipe {
        let (mut log, log_writer) = std::io::pipe().expect("pipe");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_writer)
            .spawn()
            .expect("spawn holdfast");
        // Read the log up to the line that says where the admin endpoint listens, and no
        // further, on a thread: a holdfast that never says it is waited for boundedly.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            let found = loop {
                match log.read(&mut byte) {
                    Ok(0) | Err(_) => break None,
                    Ok(_) if byte[0] == b'\n' => {
                        let text = String::from_utf8_lossy(&line).into_owned();
                        if let Some((_, addr)) = text.split_once("admin endpoint on http://") {
                            break addr.trim().parse::<SocketAddr>().ok();
                        }
                        line.clear();
                    }
                    Ok(_) => line.push(byte[0]),
                }
            };
            let _ = tx.send((found, log));
        });
        let mut me = LoggingToPipe {
            child,
            admin: localhost0(),
            log: None,
        };
        match rx.recv_timeout(IO_TIMEOUT) {
            Ok((Some(admin), log)) => {
                me.admin = admin;
                me.log = Some(log);
            }
            Ok((None, _)) => panic!(
                "holdfast ended its log without an admin address: {:?}",
                me.child.try_wait()
            ),
            Err(e) => panic!("holdfast did not log its admin address: {e}"),
        }
        me
    }

    /// Fills the log pipe: the next thread of holdfast's that logs blocks until
    /// [`LoggingToPipe::resume_log`]. Written through a second, non-blocking opening of the
    /// pipe, so that it stops exactly when the pipe is full; holdfast's own stays blocking.
    fn stall_log(&self) {
        let mut pipe = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{}/fd/2", self.child.id()))
            .expect("open holdfast's stderr pipe");
        let chunk = [b'#'; 4096];
        for size in [chunk.len(), 1] {
            loop {
                match pipe.write(&chunk[..size]) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("filling the log pipe: {e}"),
                }
            }
        }
    }

    /// Reads the log again (to its end, on a thread), unblocking whoever waits to write it.
    fn resume_log(&mut self) {
        if let Some(mut log) = self.log.take() {
            std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        }
    }

    /// Waits until holdfast's health thread is blocked in a write to stderr, as
    /// `/proc/PID/task/TID/syscall` shows it (write or writev, first argument 2).
    #[track_caller]
    fn wait_for_health_thread_stuck_in_log(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        wait_until_ok(IO_TIMEOUT, || {
            // A thread takes its name once it runs: look for it each time.
            let health = std::fs::read_dir(&tasks)
                .map_err(|e| format!("{tasks}: {e}"))?
                .filter_map(|t| t.ok().map(|t| t.path()))
                .find(|t| {
                    std::fs::read_to_string(t.join("comm"))
                        .is_ok_and(|c| c.trim() == "holdfast-health")
                })
                .ok_or("no thread named holdfast-health yet")?;
            let syscall = std::fs::read_to_string(health.join("syscall")).unwrap_or_default();
            let mut fields = syscall.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some("1" | "20"), Some("0x2")) => Ok(()),
                _ => Err(format!(
                    "the health thread is in syscall {:?}",
                    syscall.trim()
                )),
            }
        });
    }
}

impl Drop for LoggingToPipe {
    fn drop(&mut self) {
        self.resume_log();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /clients` shows what was done with client addresses, by reason: here two clients
/// refused by `--deny` and one by `--max-conns-per-ip`, and the per-IP table once swept.
#[test]
fn clients_json_counts_refusals_by_reason() {
    let backend = EchoBackend::start();
    let mut cfg = config(&[backend.addr()]);
    cfg.admin = Some(localhost0());
    cfg.client_ip.access.deny = vec!["127.0.0.2/32".parse().unwrap()];
    cfg.client_ip.limits.max_conns = 1;
    let lb = start_balancer(cfg);
    let admin = lb.admin_addr().expect("admin endpoint configured");
    for _ in 0..2 {
        let mut denied = client_from("127.0.0.2", lb_addr(&lb));
        expect_closed(&mut denied, IO_TIMEOUT);
    }
    let mut held = client_from("127.0.0.3", lb_addr(&lb));
    round_trip(&mut held, b"mine");
    let mut second = client_from("127.0.0.3", lb_addr(&lb));
    expect_closed(&mut second, IO_TIMEOUT);
    wait_until_ok(Duration::from_secs(15), || {
        let clients = get(admin, "/clients").json();
        let want = serde_json::json!({
            "refused": {"deny": 2, "max_conns_per_ip": 1, "max_conn_rate_per_ip": 0},
            "ip_table_entries": 1,
            "ip_table_untracked": 0,
        });
        let same = ["refused", "ip_table_entries", "ip_table_untracked"]
            .iter()
            .all(|k| clients[k] == want[k]);
        let no_header_errors = clients["proxy_header_errors"]
            .as_object()
            .is_some_and(|m| m.len() == 13 && m.values().all(|v| v == 0));
        if same && no_header_errors {
            Ok(())
        } else {
            Err(format!("GET /clients: {clients}"))
        }
    });
}
