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
    // Service two still uses both of its backends, the shared one too.
    let tags = tags_of_new_clients(two_addr, 8);
    assert_eq!(
        count_tag(&tags, "shared") + count_tag(&tags, "steady"),
        8,
        "{tags:?}"
    );
    assert!(count_tag(&tags, "shared") >= 2, "{tags:?}");
    assert!(count_tag(&tags, "steady") >= 2, "{tags:?}");
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
