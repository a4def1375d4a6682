//! The balancer in process: a configuration for fake backends, starting it, and what it
//! reports about each backend.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use holdfast::{BackendSpec, Config, Holdfast};

use super::{localhost0, wait_until_ok};

/// A configuration listening on 127.0.0.1:0 with `backends` at weight 1.
///
/// Active health probes are off: they would add connections to the fake backends' counts.
/// Tests of health checking turn them on.
pub fn config(backends: &[SocketAddr]) -> Config {
    let mut config = Config::new(
        vec![localhost0()],
        backends.iter().map(|a| BackendSpec::new(*a)).collect(),
    );
    config.health.check = holdfast::HealthCheck::None;
    config
}

#[track_caller]
pub fn start_balancer(config: Config) -> Holdfast {
    Holdfast::start(config).unwrap_or_else(|e| panic!("Holdfast::start: {e}"))
}

/// The balancer's (first) listen address.
pub fn lb_addr(lb: &Holdfast) -> SocketAddr {
    lb.listen_addrs()[0]
}

/// The balancer's per-backend counters for `addr`.
#[track_caller]
pub fn backend_stat(lb: &Holdfast, addr: SocketAddr) -> holdfast::BackendStatsSnapshot {
    lb.backend_stats()
        .into_iter()
        .find(|b| b.addr == addr)
        .unwrap_or_else(|| panic!("no backend_stats entry for {addr}"))
}

/// The state `lb` reports for backend `addr` now.
#[track_caller]
pub fn backend_state(lb: &Holdfast, addr: SocketAddr) -> holdfast::BackendState {
    backend_stat(lb, addr).state
}

/// Waits until `lb` reports backend `addr` in `state`; returns when that was seen.
#[track_caller]
pub fn wait_for_state(
    lb: &Holdfast,
    addr: SocketAddr,
    state: holdfast::BackendState,
    within: Duration,
) -> Instant {
    wait_until_ok(within, || {
        let s = backend_stat(lb, addr);
        if s.state == state {
            Ok(())
        } else {
            Err(format!("{addr} is {:?}, want {state:?}: {s:?}", s.state))
        }
    });
    Instant::now()
}

/// Sessions the backend ended (reset or EOF) without answering a byte, soon after they
/// began, as counted by passive health checking.
#[track_caller]
pub fn passive_failures(lb: &Holdfast, addr: SocketAddr) -> u64 {
    backend_stat(lb, addr).passive_failures
}

/// The weight new connections see for backend `addr` now, in 1/64 of its configured weight.
#[track_caller]
pub fn effective_weight(lb: &Holdfast, addr: SocketAddr) -> u32 {
    backend_stat(lb, addr).effective_weight
}
