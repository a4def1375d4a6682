//! Several services in one process (issue #14): each with its own listeners, backends,
//! algorithm and health state, served by the same workers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use holdfast::{
    Algorithm, BackendChange, BackendSpec, BackendState, Config, HealthCheck, Holdfast, Service,
};

use crate::util::*;

const WITHIN: Duration = Duration::from_secs(10);

fn service_config(backends: &[SocketAddr], algorithm: Algorithm) -> Config {
    let mut config = Config::new(
        vec![localhost0()],
        backends.iter().map(|a| BackendSpec::new(*a)).collect(),
    );
    config.algorithm = algorithm;
    config.health.check = HealthCheck::None;
    config
}

/// The state service `name` of `lb` reports for backend `addr`.
fn state_in(lb: &Holdfast, name: &str, addr: SocketAddr) -> BackendState {
    let service = lb.service(name).expect("the service runs");
    service
        .backend_stats()
        .into_iter()
        .find(|b| b.addr == addr)
        .unwrap_or_else(|| panic!("{name} has no backend {addr}"))
        .state
}

/// Two services, round-robin over two tagged backends on one port and source-hash over two
/// others on another: each client reaches only its own service's backends, each service by
/// its own algorithm, and the workers are shared (two of them for both services).
#[test]
fn two_services_serve_their_own_pools_by_their_own_algorithms() {
    let ws = [TaggedBackend::start("ws-1"), TaggedBackend::start("ws-2")];
    let db = [TaggedBackend::start("db-1"), TaggedBackend::start("db-2")];
    let mut first = service_config(&[ws[0].addr(), ws[1].addr()], Algorithm::RoundRobin);
    first.workers = 2;
    let second = service_config(&[db[0].addr(), db[1].addr()], Algorithm::SourceHash);
    let lb = Holdfast::start_services(vec![Service::new("ws", first), Service::new("db", second)])
        .expect("start");
    assert_eq!(lb.service_names(), vec!["ws", "db"]);
    let ws_addr = lb.service("ws").unwrap().listen_addrs()[0];
    let db_addr = lb.service("db").unwrap().listen_addrs()[0];
    assert_ne!(ws_addr, db_addr);

    // Round-robin: each of ws's backends gets turns, and only those. (Each worker keeps its
    // own rotation and the kernel picks the worker, so the split is not exact.)
    let tags = tags_of_new_clients(ws_addr, 8);
    assert_eq!(
        count_tag(&tags, "ws-1") + count_tag(&tags, "ws-2"),
        8,
        "{tags:?}"
    );
    assert!(count_tag(&tags, "ws-1") >= 2, "{tags:?}");
    assert!(count_tag(&tags, "ws-2") >= 2, "{tags:?}");

    // Source-hash: a client address always reaches the same backend, one of db's; over a
    // few addresses both are used.
    let mut seen = HashSet::new();
    for i in 1..=16 {
        let ip = format!("127.0.0.{i}");
        let first = visit_tagged(&ip, db_addr, WITHIN).unwrap_or_else(|e| panic!("{ip}: {e}"));
        assert!(first.starts_with("db-"), "{ip} reached {first}");
        for _ in 0..2 {
            let again = visit_tagged(&ip, db_addr, WITHIN).unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(again, first, "{ip} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "source-hash used only {seen:?}");

    // Each service counts its own backends' sessions.
    let ws_sessions: u64 = lb
        .service("ws")
        .unwrap()
        .backend_stats()
        .iter()
        .map(|b| b.total)
        .sum();
    assert_eq!(ws_sessions, 8);
    // And its own session counters: what each service's clients did, nothing of the other's.
    wait_until(WITHIN, || {
        let (ws, db) = (
            lb.service("ws").unwrap().service_stats(),
            lb.service("db").unwrap().service_stats(),
        );
        ws.active == 0 && db.active == 0 && ws.closed == 8 && db.closed == 48
    });
    assert_eq!(lb.service("ws").unwrap().service_stats().accepted, 8);
    assert_eq!(lb.service("db").unwrap().service_stats().accepted, 48);
    assert_eq!(lb.stats().accepted, 56);
}

/// A backend listed by both services, drained in one of them, still serves the other; and a
/// backend that goes down under one service's health checks leaves the other service's state
/// and clients alone.
#[test]
fn a_backend_down_in_one_service_does_not_affect_the_other() {
    let shared = TaggedBackend::start("shared");
    let flaky = TaggedBackend::start("flaky");
    let steady = TaggedBackend::start("steady");
    let mut first = service_config(&[shared.addr(), flaky.addr()], Algorithm::RoundRobin);
    first.health.check = HealthCheck::Tcp;
    first.health.interval = Duration::from_millis(50);
    first.health.fall = 1;
    first.health.rise = 1;
    let mut second = service_config(&[shared.addr(), steady.addr()], Algorithm::RoundRobin);
    second.health.check = HealthCheck::Tcp;
    second.health.interval = Duration::from_millis(50);
    let lb = Holdfast::start_services(vec![
        Service::new("one", first),
        Service::new("two", second),
    ])
    .expect("start");
    let one = lb.service("one").unwrap();
    let two = lb.service("two").unwrap();
    let (one_addr, two_addr) = (one.listen_addrs()[0], two.listen_addrs()[0]);

    // Down in one: flaky refuses connects; service one's probes mark it down.
    flaky.set_refusing(true);
    wait_until(WITHIN, || {
        state_in(&lb, "one", flaky.addr()) == BackendState::Down
    });
    // Drained in one: the operator's change is service one's alone.
    one.change_backend(shared.addr(), BackendChange::Drain)
        .expect("drain in one");
    assert_eq!(state_in(&lb, "one", shared.addr()), BackendState::Drain);
    assert_eq!(state_in(&lb, "two", shared.addr()), BackendState::Up);
    assert_eq!(state_in(&lb, "two", steady.addr()), BackendState::Up);

    // Service one has no backend left: its clients are closed.
    let mut c = client(one_addr);
    expect_closed(&mut c, WITHIN);
    assert_eq!(one.service_stats().no_backend, 1);
    // Service two still uses both of its backends, the shared one too.
    let tags = tags_of_new_clients(two_addr, 8);
    assert_eq!(
        count_tag(&tags, "shared") + count_tag(&tags, "steady"),
        8,
        "{tags:?}"
    );
    assert!(count_tag(&tags, "shared") >= 2, "{tags:?}");
    assert!(count_tag(&tags, "steady") >= 2, "{tags:?}");
    assert_eq!(two.service_stats().no_backend, 0);
}

/// Names must be unique and listen addresses distinct across services: refused at start.
#[test]
fn duplicate_names_and_shared_listen_addresses_are_refused() {
    let backend = closed_port();
    let taken = std::net::TcpListener::bind(localhost0()).unwrap();
    let addr = taken.local_addr().unwrap();
    drop(taken);
    let mut a = service_config(&[backend.addr()], Algorithm::RoundRobin);
    a.listen = vec![addr];
    let b = a.clone();
    let e = Holdfast::start_services(vec![Service::new("x", a.clone()), Service::new("y", b)])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("both listen on"), "{e}");
    let mut c = a.clone();
    c.listen = vec![localhost0()];
    let e = Holdfast::start_services(vec![Service::new("x", a), Service::new("x", c)])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("two services are named 'x'"), "{e}");
    assert!(Holdfast::start_services(Vec::new()).is_err());
}

/// One HTTP/1.1 request to the admin endpoint: its status and body.
fn http(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = client(admin);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

fn json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http(admin, "GET", path, "");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"))
}

/// The admin endpoint of two services: `GET /services` lists them; each service's backends
/// and changes are under `/services/NAME`; the metrics carry a `service` label; the routes
/// without a service are refused, naming the ones to use, while several services run.
#[test]
fn the_admin_api_names_the_service() {
    let shared = TaggedBackend::start("shared");
    let other = TaggedBackend::start("other");
    let mut first = service_config(&[shared.addr(), other.addr()], Algorithm::RoundRobin);
    first.admin = Some(localhost0());
    first.workers = 1;
    let second = service_config(&[shared.addr()], Algorithm::LeastConn);
    let lb = Holdfast::start_services(vec![Service::new("ws", first), Service::new("db", second)])
        .expect("start");
    let admin = lb.admin_addr().expect("an admin endpoint");
    let db_addr = lb.service("db").unwrap().listen_addrs()[0];

    let services = json(admin, "/services");
    let services = services.as_array().expect("an array");
    assert_eq!(services.len(), 2, "{services:?}");
    assert_eq!(services[0]["name"], "ws");
    assert_eq!(services[0]["backends"], 2);
    assert_eq!(services[0]["algorithm"], "round-robin");
    assert_eq!(
        services[0]["listen"][0],
        lb.service("ws").unwrap().listen_addrs()[0].to_string()
    );
    assert_eq!(services[1]["name"], "db");
    assert_eq!(services[1]["backends"], 1);
    assert_eq!(services[1]["listen"][0], db_addr.to_string());

    let ws_backends = json(admin, "/services/ws/backends");
    assert_eq!(
        ws_backends.as_array().map(Vec::len),
        Some(2),
        "{ws_backends}"
    );
    let db_backends = json(admin, "/services/db/backends");
    assert_eq!(
        db_backends.as_array().map(Vec::len),
        Some(1),
        "{db_backends}"
    );

    // Draining the shared backend in ws leaves it up in db.
    let (status, body) = http(
        admin,
        "POST",
        &format!("/services/ws/backends/{}/drain", shared.addr()),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let in_ws = json(admin, &format!("/services/ws/backends/{}", shared.addr()));
    assert_eq!(in_ws["state"], "drain", "{in_ws}");
    let in_db = json(admin, &format!("/services/db/backends/{}", shared.addr()));
    assert_eq!(in_db["state"], "up", "{in_db}");
    assert_eq!(tags_of_new_clients(db_addr, 2), vec!["shared"; 2]);
    let (_, _held_open) = connect_tagged(db_addr);
    wait_until(WITHIN, || {
        json(admin, "/services")[1]["sessions_active"] == 1
    });
    let (status, body) = http(
        admin,
        "POST",
        &format!("/services/ws/backends/{}/weight", other.addr()),
        "5",
    );
    assert_eq!(status, 200, "{body}");

    let (_, metrics) = http(admin, "GET", "/metrics", "");
    for line in [
        format!(
            "holdfast_backend_state{{service=\"ws\",backend=\"{}\",state=\"drain\"}} 1",
            shared.addr()
        ),
        format!(
            "holdfast_backend_state{{service=\"db\",backend=\"{}\",state=\"up\"}} 1",
            shared.addr()
        ),
        format!(
            "holdfast_backend_weight{{service=\"ws\",backend=\"{}\"}} 5",
            other.addr()
        ),
        "holdfast_service_backends{service=\"ws\",state=\"drain\"} 1".to_string(),
        "holdfast_service_backends{service=\"db\",state=\"up\"} 1".to_string(),
        "holdfast_service_sessions_active{service=\"db\"} 1".to_string(),
        "holdfast_service_accepted_total{service=\"db\"} 3".to_string(),
        "holdfast_service_sessions_active{service=\"ws\"} 0".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }

    // Without a service: refused while two run, naming the route to use.
    let (status, body) = http(admin, "GET", "/backends", "");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("/services/NAME/backends"), "{body}");
    let (status, body) = http(
        admin,
        "POST",
        &format!("/backends/{}/ready", shared.addr()),
        "",
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(state_in(&lb, "ws", shared.addr()), BackendState::Drain);
    let (status, body) = http(admin, "GET", "/services/nope/backends", "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no service"), "{body}");
}

/// With one service the routes without a service keep working, and `/services` lists it as
/// `default`.
#[test]
fn one_service_keeps_the_plain_routes() {
    let a = TaggedBackend::start("a");
    let mut config = service_config(&[a.addr()], Algorithm::RoundRobin);
    config.admin = Some(localhost0());
    let lb = Holdfast::start(config).expect("start");
    let admin = lb.admin_addr().expect("an admin endpoint");
    assert_eq!(json(admin, "/services")[0]["name"], "default");
    assert_eq!(json(admin, "/backends").as_array().map(Vec::len), Some(1));
    let (status, body) = http(
        admin,
        "POST",
        &format!("/services/default/backends/{}/drain", a.addr()),
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(admin, "/backends")[0]["state"], "drain");
}

/// A reload of the services with live sessions on each: a kept service gets its new
/// backends and its sessions go on; a removed service's listener closes at once and its
/// session goes on until its drain timeout, then is closed; a new service serves; a service
/// whose listen address changed serves on the new one only. A reload that cannot be done
/// (a new service on an address another process holds) changes nothing.
#[test]
fn reloading_services_adds_removes_and_keeps_live_sessions() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let c = TaggedBackend::start("c");
    let d = TaggedBackend::start("d");
    let mut kept = service_config(&[a.addr()], Algorithm::RoundRobin);
    kept.workers = 2;
    let mut leaving = service_config(&[c.addr()], Algorithm::RoundRobin);
    leaving.drain_timeout = Duration::from_millis(300);
    leaving.close_spread = Duration::ZERO;
    let moving = service_config(&[d.addr()], Algorithm::RoundRobin);
    let lb = Holdfast::start_services(vec![
        Service::new("kept", kept.clone()),
        Service::new("leaving", leaving),
        Service::new("moving", moving.clone()),
    ])
    .expect("start");
    let kept_addr = lb.service("kept").unwrap().listen_addrs()[0];
    let leaving_addr = lb.service("leaving").unwrap().listen_addrs()[0];
    let moving_addr = lb.service("moving").unwrap().listen_addrs()[0];
    let (tag, mut on_kept) = connect_tagged(kept_addr);
    assert_eq!(tag, "a");
    let (tag, mut on_leaving) = connect_tagged(leaving_addr);
    assert_eq!(tag, "c");
    let (tag, mut on_moving) = connect_tagged(moving_addr);
    assert_eq!(tag, "d");

    // Cannot be done: the new service's address is held by a listener of another process
    // (no SO_REUSEPORT), so nothing changes.
    let squatter = std::net::TcpListener::bind(localhost0()).unwrap();
    let mut blocked = service_config(&[b.addr()], Algorithm::RoundRobin);
    blocked.listen = vec![squatter.local_addr().unwrap()];
    let mut kept_b = kept.clone();
    kept_b.backends = vec![BackendSpec::new(b.addr())];
    let e = lb
        .reload_services(vec![
            Service::new("kept", kept_b.clone()),
            Service::new("blocked", blocked),
        ])
        .expect_err("a listener that cannot be bound");
    assert!(
        e.to_string()
            .contains(&squatter.local_addr().unwrap().to_string()),
        "{e}"
    );
    assert_eq!(lb.service_names(), vec!["kept", "leaving", "moving"]);
    assert_eq!(tags_of_new_clients(kept_addr, 2), vec!["a"; 2]);
    round_trip(&mut on_leaving, b"still there");

    // kept: backends a -> b; leaving: gone; moving: to a new address; added: new.
    let mut moved = moving;
    let spare = std::net::TcpListener::bind(localhost0()).unwrap();
    moved.listen = vec![spare.local_addr().unwrap()];
    drop(spare);
    // The added service probes its pool (on the health thread the others use): its dead
    // backend goes down.
    let dead = closed_port();
    let mut added = service_config(&[c.addr(), dead.addr()], Algorithm::LeastConn);
    added.health.check = HealthCheck::Tcp;
    added.health.interval = Duration::from_millis(50);
    added.health.fall = 1;
    let report = lb
        .reload_services(vec![
            Service::new("kept", kept_b),
            Service::new("moving", moved),
            Service::new("added", added),
        ])
        .expect("reload");
    assert_eq!(report.added, vec!["added"]);
    assert_eq!(report.removed, vec!["leaving"]);
    assert_eq!(report.replaced, vec!["moving"]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(lb.service_names(), vec!["kept", "moving", "added"]);

    // Nothing dropped on the kept service; new clients reach its new backend.
    round_trip(&mut on_kept, b"kept across the reload");
    assert_eq!(tags_of_new_clients(kept_addr, 3), vec!["b"; 3]);
    // The removed service takes no new client, and its session is closed at its drain
    // timeout (it was still relaying after the reload).
    wait_refused(leaving_addr, WITHIN);
    expect_closed(&mut on_leaving, WITHIN);
    // The moved service: its old address refuses, the new one serves; its session on the
    // old listener drains like any removed service's (still relaying now).
    wait_refused(moving_addr, WITHIN);
    round_trip(&mut on_moving, b"drains on the old one");
    let moved_addr = lb.service("moving").unwrap().listen_addrs()[0];
    assert_eq!(tags_of_new_clients(moved_addr, 2), vec!["d"; 2]);
    let added_addr = lb.service("added").unwrap().listen_addrs()[0];
    assert_eq!(tags_of_new_clients(added_addr, 2), vec!["c"; 2]);
    wait_until(WITHIN, || {
        state_in(&lb, "added", dead.addr()) == BackendState::Down
    });
    round_trip(&mut on_kept, b"and still");
}

/// Each service counts its own sessions' fates (issue #14): bytes, idle timeouts and refused
/// clients land on the service they happened to, the process's counters on both, and a
/// service's accepted clients stay equal to its open plus its closed ones, refused ones too.
#[test]
fn each_service_counts_its_own_sessions() {
    let a = EchoBackend::start();
    let b = EchoBackend::start();
    let mut quick = service_config(&[a.addr()], Algorithm::RoundRobin);
    quick.idle_timeout = Some(Duration::from_millis(200));
    quick.admin = Some(localhost0());
    let mut denying = service_config(&[b.addr()], Algorithm::RoundRobin);
    denying.client_ip.access.deny = vec!["127.0.0.0/8".parse().expect("a CIDR")];
    let lb = Holdfast::start_services(vec![
        Service::new("quick", quick),
        Service::new("denying", denying),
    ])
    .expect("start");
    let quick_addr = lb.service("quick").unwrap().listen_addrs()[0];
    let denying_addr = lb.service("denying").unwrap().listen_addrs()[0];

    let mut c = client(quick_addr);
    round_trip(&mut c, b"0123456789");
    expect_closed(&mut c, WITHIN); // the idle timeout
    for _ in 0..2 {
        let mut refused = client(denying_addr);
        expect_closed(&mut refused, WITHIN);
    }

    let stats = |name: &str| lb.service(name).expect("the service").service_stats();
    wait_until(WITHIN, || {
        stats("quick").closed == 1 && stats("denying").closed == 2
    });
    let (q, d) = (stats("quick"), stats("denying"));
    assert_eq!((q.accepted, q.active, q.idle_timeouts), (1, 0, 1));
    assert_eq!(q.bytes_client_to_backend, 10);
    assert_eq!(q.bytes_backend_to_client, 10);
    assert_eq!(q.refused_deny, 0);
    assert_eq!((d.accepted, d.active, d.refused_deny), (2, 0, 2));
    assert_eq!((d.idle_timeouts, d.bytes_client_to_backend), (0, 0));
    let all = lb.stats();
    assert_eq!((all.accepted, all.closed), (3, 3));
    assert_eq!((all.idle_timeouts, all.refused_deny), (1, 2));

    // The metrics carry the same, labelled by service.
    let (status, text) = http(
        lb.admin_addr().expect("an admin endpoint"),
        "GET",
        "/metrics",
        "",
    );
    assert_eq!(status, 200);
    for line in [
        "holdfast_service_idle_timeouts_total{service=\"quick\"} 1",
        "holdfast_service_bytes_client_to_backend_total{service=\"quick\"} 10",
        "holdfast_service_clients_refused_total{service=\"denying\",reason=\"deny\"} 2",
        "holdfast_service_idle_timeouts_total{service=\"denying\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
}
