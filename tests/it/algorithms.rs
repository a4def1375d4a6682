//! Which backend a new client gets: least-conn, source-hash (Maglev) and round-robin.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use holdfast::{Algorithm, BackendSpec, Config, Holdfast};

use crate::util::*;

/// Connects from `ip` and returns the tag of the backend reached, with the stream.
#[track_caller]
fn tagged_conn(ip: &str, target: SocketAddr) -> (String, TcpStream) {
    let mut c = client_from(ip, target);
    let tag = read_line(&mut c);
    (tag, c)
}

/// Connects from `ip`, reads the tag, closes.
#[track_caller]
fn tag_for(ip: &str, target: SocketAddr) -> String {
    tagged_conn(ip, target).0
}

fn counts<'a>(tags: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in tags {
        *m.entry(t.clone()).or_insert(0) += 1;
    }
    m
}

fn weighted_config(algorithm: Algorithm, backends: &[(SocketAddr, u32)]) -> Config {
    let mut cfg = Config::new(
        vec![localhost0()],
        backends
            .iter()
            .map(|&(a, w)| BackendSpec::with_weight(a, w))
            .collect(),
    );
    cfg.algorithm = algorithm;
    cfg.health.check = holdfast::HealthCheck::None;
    cfg
}

// ---------------------------------------------------------------------------------------------
// least-conn
// ---------------------------------------------------------------------------------------------

/// Opens a connection, confirms it with a tag read and a round trip (so the balancer has
/// assigned it before the next one), and keeps it.
#[track_caller]
fn held(target: SocketAddr) -> (String, TcpStream) {
    let (tag, mut c) = tagged_conn("127.0.0.1", target);
    round_trip(&mut c, b"ping");
    (tag, c)
}

#[test]
fn least_conn_balances_and_prefers_the_emptier() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let mut cfg = config(&[a.addr(), b.addr()]);
    cfg.algorithm = Algorithm::LeastConn;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    let mut conns: Vec<(String, TcpStream)> = (0..10).map(|_| held(target)).collect();
    assert_eq!(
        (a.open(), b.open()),
        (5, 5),
        "10 held connections over 2 backends"
    );

    // Close 4 of A's connections; wait until both A and the balancer see them gone.
    let mut closed = 0;
    conns.retain(|(tag, _)| {
        if tag == "a" && closed < 4 {
            closed += 1;
            false
        } else {
            true
        }
    });
    a.wait_for_open(1, Duration::from_secs(2));
    wait_until_ok(Duration::from_secs(2), || {
        let s = backend_stat(&lb, a.addr());
        if s.active == 1 {
            Ok(())
        } else {
            Err(format!("balancer still counts {} sessions on A", s.active))
        }
    });

    let next: Vec<String> = (0..4)
        .map(|_| {
            let (tag, c) = held(target);
            conns.push((tag.clone(), c));
            tag
        })
        .collect();
    assert_eq!(
        next,
        ["a", "a", "a", "a"],
        "new connections go to the emptier backend"
    );
    assert_eq!((a.open(), b.open()), (5, 5));
}

#[test]
fn least_conn_respects_weights() {
    let light = TaggedBackend::start("light");
    let heavy = TaggedBackend::start("heavy");
    let lb = start_balancer(weighted_config(
        Algorithm::LeastConn,
        &[(light.addr(), 1), (heavy.addr(), 3)],
    ));
    let conns: Vec<_> = (0..40).map(|_| held(lb_addr(&lb))).collect();
    let (l, h) = (light.open(), heavy.open());
    assert_eq!(l + h, 40);
    assert!(
        (8..=12).contains(&l),
        "weights 1:3 over 40 held connections gave {l}/{h}, want about 10/30"
    );
    drop(conns);
}

// ---------------------------------------------------------------------------------------------
// source-hash
// ---------------------------------------------------------------------------------------------

fn source_hash_lb(backends: &[&TaggedBackend]) -> Holdfast {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let mut cfg = config(&addrs);
    cfg.algorithm = Algorithm::SourceHash;
    cfg.retries = 2;
    start_balancer(cfg)
}

/// For each IP, the backend it reaches; asserts it is the same on `rounds` connections.
#[track_caller]
fn sticky_map(ips: &[String], target: SocketAddr, rounds: usize) -> HashMap<String, String> {
    ips.iter()
        .map(|ip| {
            let first = tag_for(ip, target);
            for _ in 1..rounds {
                let again = tag_for(ip, target);
                assert_eq!(again, first, "{ip} is not sticky");
            }
            (ip.clone(), first)
        })
        .collect()
}

fn ip_range(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// Sticky per source IP; when a backend stops accepting, only its clients move (and stay put
/// where they land); when it accepts again, they come back.
#[test]
fn source_hash_sticky_and_survives_backend_outage() {
    let backends = [
        TaggedBackend::start("b0"),
        TaggedBackend::start("b1"),
        TaggedBackend::start("b2"),
    ];
    let lb = source_hash_lb(&backends.iter().collect::<Vec<_>>());
    let target = lb_addr(&lb);
    let ips = ip_range("127.0.0.", 2..=41);

    let before = sticky_map(&ips, target, 3);
    let per_backend = counts(before.values());
    assert_eq!(
        per_backend.len(),
        3,
        "not every backend used: {per_backend:?}"
    );

    // Take down the backend with the most clients: its port now refuses.
    let (x_tag, _) = per_backend.iter().max_by_key(|(_, n)| **n).unwrap();
    let x = backends.iter().find(|b| b.tag() == x_tag).unwrap();
    x.set_refusing(true);

    let during = sticky_map(&ips, target, 2);
    for ip in &ips {
        let (was, now) = (&before[ip], &during[ip]);
        if was == x_tag {
            assert_ne!(now, x_tag, "{ip} reached the stopped backend");
        } else {
            assert_eq!(
                now, was,
                "{ip} moved off a healthy backend during the outage"
            );
        }
    }

    // Back up on the same port: its clients come back, everyone else stays.
    x.set_refusing(false);
    let probe = ips.iter().find(|ip| before[*ip] == *x_tag).unwrap();
    wait_until(Duration::from_secs(5), || tag_for(probe, target) == *x_tag);
    let after = sticky_map(&ips, target, 1);
    assert_eq!(
        after, before,
        "the mapping after recovery differs from the original"
    );
}

/// Removing a backend from the list (`set_backends`) moves its clients elsewhere and keeps
/// nearly every other client where it was (Maglev's rebuild is near-minimal, not exact).
#[test]
fn source_hash_set_backends_removal_keeps_most_clients() {
    let backends = [
        TaggedBackend::start("r0"),
        TaggedBackend::start("r1"),
        TaggedBackend::start("r2"),
    ];
    let lb = source_hash_lb(&backends.iter().collect::<Vec<_>>());
    let target = lb_addr(&lb);
    let ips = ip_range("127.0.3.", 1..=100);
    let before = sticky_map(&ips, target, 2);
    assert_eq!(counts(before.values()).len(), 3, "not every backend used");

    let removed = &backends[1];
    lb.set_backends(vec![
        BackendSpec::new(backends[0].addr()),
        BackendSpec::new(backends[2].addr()),
    ])
    .unwrap();
    // A removed backend is drained at once (no new sessions) and leaves the set once its
    // last session has ended; these clients closed theirs.
    let removed_now = lb
        .backend_stats()
        .into_iter()
        .find(|b| b.addr == removed.addr());
    assert!(
        removed_now
            .as_ref()
            .is_none_or(|b| b.state == holdfast::BackendState::Drain),
        "the removed backend is still eligible: {removed_now:?}"
    );
    wait_until(Duration::from_secs(2), || lb.backend_stats().len() == 2);

    let mut others = 0;
    let mut kept = 0;
    for ip in &ips {
        if before[ip] == removed.tag() {
            // New connections use the new list; allow the workers a moment to receive it.
            wait_until_ok(Duration::from_secs(2), || {
                let now = tag_for(ip, target);
                if now != removed.tag() {
                    Ok(())
                } else {
                    Err(format!("{ip} still reaches the removed backend"))
                }
            });
        } else {
            others += 1;
            if tag_for(ip, target) == before[ip] {
                kept += 1;
            }
        }
    }
    assert!(
        kept * 10 >= others * 9,
        "only {kept} of {others} clients of the remaining backends kept their backend"
    );
}

#[test]
fn source_hash_respects_weights() {
    let light = TaggedBackend::start("light");
    let heavy = TaggedBackend::start("heavy");
    let mut cfg = weighted_config(
        Algorithm::SourceHash,
        &[(light.addr(), 1), (heavy.addr(), 3)],
    );
    cfg.retries = 2;
    let lb = start_balancer(cfg);
    let mut ips = ip_range("127.0.1.", 1..=100);
    ips.extend(ip_range("127.0.2.", 1..=100));
    let heavy_count = ips
        .iter()
        .filter(|ip| tag_for(ip, lb_addr(&lb)) == "heavy")
        .count();
    assert!(
        (120..=180).contains(&heavy_count),
        "weight-3 backend got {heavy_count} of 200 source IPs, want about 150 (60%..90%)"
    );
}

// ---------------------------------------------------------------------------------------------
// round-robin
// ---------------------------------------------------------------------------------------------

fn round_robin_counts(backends: &[(&TaggedBackend, u32)], conns: usize) -> BTreeMap<String, usize> {
    let specs: Vec<(SocketAddr, u32)> = backends.iter().map(|(b, w)| (b.addr(), *w)).collect();
    let mut cfg = weighted_config(Algorithm::RoundRobin, &specs);
    cfg.workers = 1; // rotation is per worker
    let lb = start_balancer(cfg);
    let tags: Vec<String> = (0..conns)
        .map(|_| tag_for("127.0.0.1", lb_addr(&lb)))
        .collect();
    counts(&tags)
}

#[test]
fn round_robin_even() {
    let b = [
        TaggedBackend::start("x"),
        TaggedBackend::start("y"),
        TaggedBackend::start("z"),
    ];
    let got = round_robin_counts(&[(&b[0], 1), (&b[1], 1), (&b[2], 1)], 30);
    let want: BTreeMap<String, usize> = [("x", 10), ("y", 10), ("z", 10)]
        .map(|(t, n)| (t.to_string(), n))
        .into();
    assert_eq!(got, want);
}

#[test]
fn round_robin_weighted() {
    let one = TaggedBackend::start("one");
    let two = TaggedBackend::start("two");
    let got = round_robin_counts(&[(&one, 1), (&two, 2)], 30);
    let want: BTreeMap<String, usize> = [("one", 10), ("two", 20)]
        .map(|(t, n)| (t.to_string(), n))
        .into();
    assert_eq!(got, want);
}
