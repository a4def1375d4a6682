//! Rebalancing long-lived sessions after a scale-out (`--rebalance-on-join`, `POST
//! /rebalance`) and `--max-session-age`, with hundreds of clients that reconnect when closed.
//!
//! The clients and the backends each run on one thread of their own (a mio loop), not a
//! thread per connection: 600 clients and their 600 backend connections cost two threads.
//! A backend greets each connection with its tag line and closes when the other side does;
//! a client reads the greeting, and when it reads EOF (or a reset) records it and connects
//! again at once, as a WebSocket client would.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast::{BackendChange, BackendSpec, Config};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::util::*;

/// Clients per test: the 600 (about 2,400 descriptors with their backend
/// connections and the balancer's; a few of these tests run at once under a 20,000 limit).
const CLIENTS: usize = 600;

/// The window the tests rebalance over: short, to keep the suite fast, but long enough for a
/// loaded machine to keep the pace (a rebalance stops at the end of its window, done or not).
const WINDOW: Duration = Duration::from_secs(4);

/// A backend that writes `TAG\n` to each connection, then reads and discards until the other
/// side closes, and closes too. Its connections live on one mio loop.
struct HoldBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HoldBackend {
    fn start(tag: &str) -> HoldBackend {
        let mut listener = TcpListener::bind(localhost0()).expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{tag}\n").into_bytes();
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut poll = Poll::new().expect("poll");
            poll.registry()
                .register(&mut listener, Token(usize::MAX), Interest::READABLE)
                .expect("register listener");
            let mut conns: HashMap<usize, TcpStream> = HashMap::new();
            let mut next = 0usize;
            let mut events = Events::with_capacity(1024);
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(50))) {
                    assert_eq!(e.kind(), io::ErrorKind::Interrupted, "backend poll: {e}");
                    continue;
                }
                for event in &events {
                    if event.token() == Token(usize::MAX) {
                        while let Ok((mut conn, _)) = listener.accept() {
                            // A fresh socket's send buffer takes a few bytes whole.
                            if conn.write(&greeting).ok() != Some(greeting.len()) {
                                continue;
                            }
                            next += 1;
                            if poll
                                .registry()
                                .register(&mut conn, Token(next), Interest::READABLE)
                                .is_ok()
                            {
                                conns.insert(next, conn);
                            }
                        }
                        continue;
                    }
                    let key = event.token().0;
                    let Some(conn) = conns.get_mut(&key) else {
                        continue;
                    };
                    let done = loop {
                        match conn.read(&mut buf) {
                            Ok(0) => break true,
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break true,
                        }
                    };
                    if done {
                        conns.remove(&key);
                    }
                }
            }
        });
        HoldBackend {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HoldBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How one connection of a client ended.
#[derive(Clone, Debug)]
struct Ended {
    client: usize,
    at: Instant,
    /// How long it had been open.
    age: Duration,
    /// The tag of the backend it was on (`None`: closed before the whole greeting came).
    tag: Option<String>,
    /// Read returned an error (a reset) rather than 0.
    reset: bool,
}

#[derive(Default)]
struct Seen {
    /// Each client's backend now (`None` while it connects or waits for the greeting).
    tags: Vec<Option<String>>,
    ended: Vec<Ended>,
    connect_errors: Vec<String>,
}

/// `n` clients, each bound to its source IP, connected through the balancer and connecting
/// again whenever a connection ends, all on one mio loop.
struct Clients {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Conn {
    stream: TcpStream,
    opened: Instant,
    line: Vec<u8>,
    tag: Option<String>,
}

/// A blocking connection from `ip` (port chosen at connect) to `target`.
fn connect_std(ip: IpAddr, target: SocketAddr) -> io::Result<StdStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    holdfast::bind_address_no_port(&sock)?;
    sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    sock.connect_timeout(&SockAddr::from(target), Duration::from_secs(10))?;
    Ok(sock.into())
}

/// As [`connect_std`], non-blocking, for the clients' loop.
fn connect(ip: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let stream = connect_std(ip, target)?;
    stream.set_nonblocking(true)?;
    Ok(TcpStream::from_std(stream))
}

impl Clients {
    fn start(target: SocketAddr, ips: Vec<IpAddr>) -> Clients {
        let n = ips.len();
        let seen = Arc::new(Mutex::new(Seen {
            tags: vec![None; n],
            ..Seen::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut poll = Poll::new().expect("poll");
            let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
            let open = |i: usize, poll: &Poll, conns: &mut Vec<Option<Conn>>| {
                for _ in 0..20 {
                    // Before the connect: the session cannot be older than this.
                    let opened = Instant::now();
                    match connect(ips[i], target) {
                        Ok(mut stream) => {
                            poll.registry()
                                .register(&mut stream, Token(i), Interest::READABLE)
                                .expect("register client");
                            conns[i] = Some(Conn {
                                stream,
                                opened,
                                line: Vec::new(),
                                tag: None,
                            });
                            return;
                        }
                        Err(e) => seen2.lock().unwrap().connect_errors.push(e.to_string()),
                    }
                }
            };
            for i in 0..n {
                open(i, &poll, &mut conns);
            }
            let mut events = Events::with_capacity(1024);
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) {
                if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(50))) {
                    assert_eq!(e.kind(), io::ErrorKind::Interrupted, "client poll: {e}");
                    continue;
                }
                for event in &events {
                    let i = event.token().0;
                    let Some(conn) = conns[i].as_mut() else {
                        continue;
                    };
                    let end = loop {
                        match conn.stream.read(&mut buf) {
                            Ok(0) => break Some(false),
                            Ok(k) => {
                                if conn.tag.is_none() {
                                    conn.line.extend_from_slice(&buf[..k]);
                                    if let Some(nl) = conn.line.iter().position(|&b| b == b'\n') {
                                        let tag = String::from_utf8_lossy(&conn.line[..nl]);
                                        conn.tag = Some(tag.to_string());
                                        seen2.lock().unwrap().tags[i] = conn.tag.clone();
                                    }
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break Some(true),
                        }
                    };
                    if let Some(reset) = end {
                        let now = Instant::now();
                        {
                            let mut seen = seen2.lock().unwrap();
                            seen.tags[i] = None;
                            seen.ended.push(Ended {
                                client: i,
                                at: now,
                                age: now - conn.opened,
                                tag: conn.tag.clone(),
                                reset,
                            });
                        }
                        conns[i] = None; // closed (and deregistered) here
                        open(i, &poll, &mut conns);
                    }
                }
            }
        });
        Clients {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until every client has its greeting.
    #[track_caller]
    fn wait_all_connected(&self, within: Duration) {
        wait_until_ok(within, || {
            let seen = self.seen.lock().unwrap();
            let waiting = seen.tags.iter().filter(|t| t.is_none()).count();
            match waiting {
                0 => Ok(()),
                n => Err(format!(
                    "{n} client(s) without a backend; {:?}",
                    seen.connect_errors.last()
                )),
            }
        });
    }

    /// How many clients each tag has now.
    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for tag in self.seen.lock().unwrap().tags.iter().flatten() {
            *counts.entry(tag.clone()).or_default() += 1;
        }
        counts
    }

    fn tags(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().tags.clone()
    }

    fn ended(&self) -> Vec<Ended> {
        self.seen.lock().unwrap().ended.clone()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` client addresses: all 127.0.0.1, or spread over 127.0.0.2 onwards (`ips` of them).
fn addresses(n: usize, ips: Option<usize>) -> Vec<IpAddr> {
    (0..n)
        .map(|i| match ips {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(k) => IpAddr::from([127, 0, 0, 2 + (i % k) as u8]),
        })
        .collect()
}

/// Waits until the clients on each tag are within ±10% of `shares` (of all clients).
#[track_caller]
fn wait_for_shares(clients: &Clients, shares: &[(&str, f64)], within: Duration) {
    wait_until_ok(within, || {
        let counts = clients.counts();
        let total: usize = counts.values().sum();
        for &(tag, share) in shares {
            let want = share * CLIENTS as f64;
            let got = counts.get(tag).copied().unwrap_or(0) as f64;
            if total < CLIENTS || (got - want).abs() > 0.1 * want {
                return Err(format!("{counts:?}, want {shares:?} of {CLIENTS}"));
            }
        }
        Ok(())
    });
}

/// What every rebalance must show: each client closed at most once, every close a FIN after
/// the whole greeting, and no second with more than twice the average rate of closes.
#[track_caller]
fn check_closes(ended: &[Ended]) {
    check_closed_once_with_a_fin(ended);
    let first = ended.iter().map(|e| e.at).min().unwrap();
    let last = ended.iter().map(|e| e.at).max().unwrap();
    let seconds = ((last - first).as_secs_f64().ceil() as usize).max(1);
    let mut per_second = vec![0usize; seconds + 1];
    for e in ended {
        per_second[((e.at - first).as_secs_f64() as usize).min(seconds)] += 1;
    }
    let average = ended.len() as f64 / seconds as f64;
    let peak = *per_second.iter().max().unwrap();
    assert!(
        peak as f64 <= 2.0 * average,
        "closes not spread: {per_second:?} per second, average {average:.1}"
    );
}

/// Each client closed at most once, every close a FIN after the whole greeting.
#[track_caller]
fn check_closed_once_with_a_fin(ended: &[Ended]) {
    assert!(!ended.is_empty(), "nothing was closed");
    let mut by_client = HashSet::new();
    for e in ended {
        assert!(
            by_client.insert(e.client),
            "client {} closed twice: {e:?}",
            e.client
        );
        assert!(
            !e.reset,
            "client {} was reset, not closed with a FIN",
            e.client
        );
        assert!(
            e.tag.is_some(),
            "client {} closed before its greeting: {e:?}",
            e.client
        );
    }
}

fn rebalance_config(backends: &[SocketAddr]) -> Config {
    let mut config = config(backends);
    config.workers = 2;
    config.rebalance_on_join = Some(WINDOW);
    // 1:1:2 moves 300 sessions: more than the default 100 a second allows in the window.
    config.rebalance_max_rate = 300;
    config
}

/// Until the window ends plus slack: the rebalance has ended by then.
const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn a_third_backend_joining_gets_its_share_and_closed_clients_reconnect_once() {
    let (a, b, c) = (
        HoldBackend::start("a"),
        HoldBackend::start("b"),
        HoldBackend::start("c"),
    );
    let lb = start_balancer(rebalance_config(&[a.addr, b.addr]));
    let clients = Clients::start(lb_addr(&lb), addresses(CLIENTS, None));
    clients.wait_all_connected(Duration::from_secs(30));
    assert_eq!(clients.counts().get("c"), None);

    // The backends file (or DNS) now lists a third one.
    lb.set_backends([a.addr, b.addr, c.addr].map(BackendSpec::new).to_vec())
        .expect("set_backends");
    wait_for_shares(
        &clients,
        &[("a", 1.0 / 3.0), ("b", 1.0 / 3.0), ("c", 1.0 / 3.0)],
        SETTLE,
    );
    wait_until(SETTLE, || !lb.rebalance_status().running);

    let ended = clients.ended();
    check_closes(&ended);
    assert!(
        ended.iter().all(|e| e.tag.as_deref() != Some("c")),
        "only over-loaded backends shed"
    );
    // Every closed client is back, and the balancer counted exactly those closes.
    clients.wait_all_connected(SETTLE);
    let status = lb.rebalance_status();
    assert_eq!(status.closed, ended.len() as u64, "{status:?}");
    let by_backend: u64 = lb.backend_stats().iter().map(|s| s.rebalance_closed).sum();
    assert_eq!(by_backend, ended.len() as u64);
}

/// Round-robin sends a third of the reconnects back to the backends that shed them: those
/// are new sessions, which the same rebalance must not close again. (Getting every backend to
/// its share takes about every old session's close, each landing on the new backend one time
/// in three: how close it gets within the window depends on timing, so only the rule is
/// checked here.)
#[test]
fn round_robin_reconnects_that_land_back_are_not_closed_again() {
    let (a, b, c) = (
        HoldBackend::start("a"),
        HoldBackend::start("b"),
        HoldBackend::start("c"),
    );
    let mut config = rebalance_config(&[a.addr, b.addr]);
    config.algorithm = holdfast::Algorithm::RoundRobin;
    let lb = start_balancer(config);
    let clients = Clients::start(lb_addr(&lb), addresses(CLIENTS, None));
    clients.wait_all_connected(Duration::from_secs(30));

    lb.set_backends([a.addr, b.addr, c.addr].map(BackendSpec::new).to_vec())
        .expect("set_backends");
    wait_until(SETTLE, || {
        clients.counts().get("c").copied().unwrap_or(0) >= CLIENTS / 6
    });
    wait_until(SETTLE, || !lb.rebalance_status().running);
    let ended = clients.ended();
    check_closed_once_with_a_fin(&ended);
    assert!(
        ended
            .iter()
            .filter(|e| e.tag.as_deref() == Some("a"))
            .count()
            > 100,
        "round-robin needs more closes than the excess: {} in all",
        ended.len()
    );
}

#[test]
fn weights_1_1_2_when_an_operator_readies_the_third() {
    let (a, b, c) = (
        HoldBackend::start("a"),
        HoldBackend::start("b"),
        HoldBackend::start("c"),
    );
    let mut config = rebalance_config(&[a.addr, b.addr, c.addr]);
    config.backends[2].weight = 2;
    let lb = start_balancer(config);
    lb.change_backend(c.addr, BackendChange::Drain)
        .expect("drain c");
    let clients = Clients::start(lb_addr(&lb), addresses(CLIENTS, None));
    clients.wait_all_connected(Duration::from_secs(30));
    assert_eq!(clients.counts().get("c"), None, "c is drained");

    lb.change_backend(c.addr, BackendChange::Ready)
        .expect("ready c");
    wait_for_shares(&clients, &[("a", 0.25), ("b", 0.25), ("c", 0.5)], SETTLE);
    wait_until(SETTLE, || !lb.rebalance_status().running);
    check_closes(&clients.ended());
}

#[test]
fn source_hash_moves_exactly_the_clients_whose_address_now_maps_to_another_backend() {
    let (a, b, c) = (
        HoldBackend::start("a"),
        HoldBackend::start("b"),
        HoldBackend::start("c"),
    );
    let mut config = rebalance_config(&[a.addr, b.addr]);
    config.algorithm = holdfast::Algorithm::SourceHash;
    let lb = start_balancer(config);
    let ips = addresses(CLIENTS, Some(200));
    let clients = Clients::start(lb_addr(&lb), ips.clone());
    clients.wait_all_connected(Duration::from_secs(30));
    let before = clients.tags();

    lb.set_backends([a.addr, b.addr, c.addr].map(BackendSpec::new).to_vec())
        .expect("set_backends");
    wait_until(SETTLE, || !lb.rebalance_status().running);
    let status = lb.rebalance_status();
    assert_eq!(
        status.left,
        Some(0),
        "not done within the window: {status:?}"
    );
    clients.wait_all_connected(SETTLE);

    // Where each address maps now: a new connection from it says.
    let mut now_maps: HashMap<IpAddr, String> = HashMap::new();
    for ip in ips.iter().collect::<HashSet<_>>() {
        let tag = visit_tagged_from(*ip, lb_addr(&lb));
        now_maps.insert(*ip, tag);
    }
    let ended = clients.ended();
    check_closes(&ended);
    let closed: HashSet<usize> = ended.iter().map(|e| e.client).collect();
    let after = clients.tags();
    for (i, ip) in ips.iter().enumerate() {
        let (was, maps) = (before[i].as_deref(), now_maps[ip].as_str());
        assert_eq!(
            closed.contains(&i),
            was != Some(maps),
            "client {i} from {ip} was on {was:?}, maps to {maps} now"
        );
        assert_eq!(after[i].as_deref(), Some(maps), "client {i} from {ip}");
    }
    assert!(closed.len() > CLIENTS / 10, "only {} moved", closed.len());
}

/// Connects from `ip`, reads the backend's tag, closes.
fn visit_tagged_from(ip: IpAddr, target: SocketAddr) -> String {
    let mut stream = connect_std(ip, target).expect("probe connect");
    set_timeouts(&stream);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("probe read") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("tag")
}

#[test]
fn max_session_age_closes_sessions_around_the_age_spread_out_and_they_reconnect() {
    const N: usize = 200;
    let age = Duration::from_secs(2);
    let a = HoldBackend::start("a");
    let mut config = config(&[a.addr]);
    config.workers = 2;
    config.max_session_age = Some(age);
    let lb = start_balancer(config);
    let clients = Clients::start(lb_addr(&lb), addresses(N, None));
    clients.wait_all_connected(Duration::from_secs(30));
    // Every first session ends, by age, and its client connects again.
    wait_until_ok(Duration::from_secs(20), || {
        let done: HashSet<usize> = clients.ended().iter().map(|e| e.client).collect();
        match done.len() {
            N => Ok(()),
            n => Err(format!("{n} of {N} sessions closed by age")),
        }
    });
    clients.wait_all_connected(Duration::from_secs(20));
    let ended = clients.ended();
    for e in &ended {
        assert!(!e.reset && e.tag.is_some(), "{e:?}");
        // Never before 90% of the age; the upper bound allows for a loaded machine.
        assert!(
            e.age >= age.mul_f64(0.9),
            "closed at {:?}, before 90% of {age:?}",
            e.age
        );
        assert!(e.age <= age.mul_f64(1.1) + Duration::from_secs(2), "{e:?}");
    }
    // Jittered: sessions opened together do not close together.
    let first: Vec<&Ended> = {
        let mut seen = HashSet::new();
        ended.iter().filter(|e| seen.insert(e.client)).collect()
    };
    let spread =
        first.iter().map(|e| e.at).max().unwrap() - first.iter().map(|e| e.at).min().unwrap();
    assert!(
        spread >= age.mul_f64(0.1),
        "closes within {spread:?}: not jittered"
    );
    assert!(lb.stats().sessions_closed_by_age >= N as u64);
}

#[test]
fn a_drain_stops_a_rebalance_under_way() {
    const N: usize = 200;
    let (a, b) = (HoldBackend::start("a"), HoldBackend::start("b"));
    let mut config = config(&[a.addr]);
    config.workers = 2;
    config.rebalance_on_join = Some(Duration::from_secs(60));
    let lb = start_balancer(config);
    let clients = Clients::start(lb_addr(&lb), addresses(N, None));
    clients.wait_all_connected(Duration::from_secs(30));
    lb.set_backends([a.addr, b.addr].map(BackendSpec::new).to_vec())
        .expect("set_backends");
    // 100 to move over 54 s: a couple a second.
    wait_until(SETTLE, || lb.rebalance_status().closed >= 1);
    assert!(lb.rebalance_status().running);

    lb.drain();
    wait_until(SETTLE, || !lb.rebalance_status().running);
    let closed = lb.rebalance_status().closed;
    assert!(closed < 50, "{closed} closed: the rebalance went on");
}

/// One request to the admin endpoint; the status and the body.
fn admin(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let mut s = StdStream::connect(addr).expect("admin connect");
    set_timeouts(&s);
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("admin write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("admin read");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[test]
fn post_rebalance_moves_sessions_on_request_and_get_reports_it() {
    const N: usize = 200;
    let (a, b) = (HoldBackend::start("a"), HoldBackend::start("b"));
    let mut config = config(&[a.addr]);
    config.workers = 2;
    config.admin = Some(localhost0());
    let lb = start_balancer(config);
    let admin_addr = lb.admin_addr().expect("admin address");
    let clients = Clients::start(lb_addr(&lb), addresses(N, None));
    clients.wait_all_connected(Duration::from_secs(30));
    // Without --rebalance-on-join a new backend gets only new sessions.
    lb.set_backends([a.addr, b.addr].map(BackendSpec::new).to_vec())
        .expect("set_backends");

    assert_eq!(admin(admin_addr, "POST", "/rebalance?window=0s").0, 400);
    assert_eq!(admin(admin_addr, "POST", "/rebalance?windw=2s").0, 400);
    let (status, body) = admin(admin_addr, "POST", "/rebalance?window=4s");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["running"], true, "{body}");

    wait_until_ok(SETTLE, || {
        let counts = clients.counts();
        let on_b = counts.get("b").copied().unwrap_or(0);
        if (on_b as f64 - N as f64 / 2.0).abs() <= 0.1 * N as f64 / 2.0 {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    });
    wait_until(SETTLE, || !lb.rebalance_status().running);
    let ended = clients.ended();
    check_closes(&ended);
    let (status, body) = admin(admin_addr, "GET", "/rebalance");
    assert_eq!(status, 200);
    let report = json(&body);
    assert_eq!(report["running"], false, "{body}");
    assert_eq!(report["closed"], ended.len() as u64, "{body}");
    assert_eq!(report["left"], 0, "{body}");

    // /backends shows each backend's target share; /metrics what each shed.
    let backends = json(&admin(admin_addr, "GET", "/backends").1);
    for backend in backends.as_array().expect("an array") {
        assert_eq!(backend["target_share"], 0.5, "{backend}");
    }
    let metrics = admin(admin_addr, "GET", "/metrics").1;
    let line = format!(
        "holdfast_rebalance_closed_total{{service=\"default\",backend=\"{}\"}} {}",
        a.addr,
        ended.len()
    );
    assert!(metrics.contains(&line), "no {line:?} in the metrics");
}

#[test]
fn the_flags_are_in_the_help_and_a_zero_rate_is_a_one_line_error() {
    let out = run_binary(&["--help"], Duration::from_secs(10));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--rebalance-on-join",
        "--rebalance-max-rate",
        "--max-session-age",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    let out = run_binary(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:1",
            "--rebalance-max-rate",
            "0",
        ],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: --rebalance-max-rate must be at least 1"
    );
}
