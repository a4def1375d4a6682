//! How the admin endpoint shows a backend, for `/backends` (JSON) and `/metrics` (Prometheus)
//! alike: its state as a word, its effective weight in units of weight, and the JSON object.
//! Both `routes.rs` and `metrics.rs` import this; it imports neither.

use std::net::SocketAddr;

use serde::Serialize;

use crate::backend::{BackendState, BackendStatsSnapshot, WEIGHT_SCALE};
use crate::balance::rebalance::{Member, targets};

/// One backend as `/backends` shows it: the facts of [`BackendStatsSnapshot`], with the state
/// as a word and the effective weight in units of weight (it is below `weight` only while slow
/// start ramps the backend up).
#[derive(Debug, Serialize)]
pub(super) struct BackendView {
    pub addr: SocketAddr,
    /// `up`, `down` or `drain`.
    pub state: &'static str,
    /// The health verdict, also while drained (`state` then says only `drain`).
    pub healthy: bool,
    pub weight: u32,
    pub effective_weight: f64,
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub connect_failures: u64,
    pub passive_failures: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub connect_latency_p50_us: u64,
    pub connect_latency_p99_us: u64,
    pub connect_latency_max_us: u64,
    /// Sessions closed by a rebalance to make room on it.
    pub rebalance_closed: u64,
    /// Its weighted share of the sessions on backends that are up (effective weights; 0 for
    /// one that is not up): what a rebalance moves sessions towards.
    pub target_share: f64,
    /// That share of the sessions held now by backends that are up.
    pub target_sessions: f64,
}

/// Every backend as `/backends` shows it, each with its target share.
pub(super) fn views(all: &[BackendStatsSnapshot]) -> Vec<BackendView> {
    let members: Vec<Member> = all
        .iter()
        .map(|b| Member {
            weight: b.effective_weight,
            eligible: b.state == BackendState::Up,
            sessions: b.active,
        })
        .collect();
    let total: u64 = members
        .iter()
        .filter(|m| m.eligible)
        .map(|m| m.sessions)
        .sum();
    all.iter()
        .zip(targets(&members))
        .map(|(b, target)| {
            let mut view = BackendView::from(b);
            view.target_sessions = target.unwrap_or(0.0);
            view.target_share = match total {
                0 => share(b, all),
                n => view.target_sessions / n as f64,
            };
            view
        })
        .collect()
}

/// `b`'s weighted share among the backends that are up, when none holds a session.
fn share(b: &BackendStatsSnapshot, all: &[BackendStatsSnapshot]) -> f64 {
    let up = |b: &&BackendStatsSnapshot| b.state == BackendState::Up;
    let weights: u64 = all
        .iter()
        .filter(up)
        .map(|b| u64::from(b.effective_weight))
        .sum();
    match (b.state == BackendState::Up, weights) {
        (true, w) if w > 0 => f64::from(b.effective_weight) / w as f64,
        _ => 0.0,
    }
}

impl From<&BackendStatsSnapshot> for BackendView {
    fn from(b: &BackendStatsSnapshot) -> BackendView {
        BackendView {
            addr: b.addr,
            state: state_name(b.state),
            healthy: b.healthy,
            weight: b.weight,
            effective_weight: effective_weight(b),
            sessions_active: b.active,
            sessions_total: b.total,
            connect_failures: b.connect_failures,
            passive_failures: b.passive_failures,
            bytes_client_to_backend: b.bytes_client_to_backend,
            bytes_backend_to_client: b.bytes_backend_to_client,
            connect_latency_p50_us: b.connect_latency_p50_us,
            connect_latency_p99_us: b.connect_latency_p99_us,
            connect_latency_max_us: b.connect_latency_max_us,
            rebalance_closed: b.rebalance_closed,
            target_share: 0.0,
            target_sessions: 0.0,
        }
    }
}

/// A backend state as one lower-case word, as `/backends` and `/metrics` show it.
pub(super) fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Drain => "drain",
    }
}

/// Every state, in the order `/metrics` lists them.
pub(super) const STATES: [BackendState; 3] =
    [BackendState::Up, BackendState::Down, BackendState::Drain];

/// The weight new connections see, in units of weight.
pub(super) fn effective_weight(b: &BackendStatsSnapshot) -> f64 {
    f64::from(b.effective_weight) / f64::from(WEIGHT_SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A healthy backend on 127.0.0.1:`port` at full weight, with `active` sessions.
    fn backend(port: u16, weight: u32, state: BackendState, active: u64) -> BackendStatsSnapshot {
        BackendStatsSnapshot {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            weight,
            effective_weight: weight * WEIGHT_SCALE,
            state,
            healthy: true,
            active,
            total: 0,
            connect_failures: 0,
            passive_failures: 0,
            bytes_client_to_backend: 0,
            bytes_backend_to_client: 0,
            connect_latency_p50_us: 0,
            connect_latency_p99_us: 0,
            connect_latency_max_us: 0,
            rebalance_closed: 0,
        }
    }

    #[test]
    fn effective_weight_is_in_units_of_weight() {
        let snapshot = BackendStatsSnapshot {
            healthy: false,
            ..backend(1, 2, BackendState::Drain, 0)
        };
        let view = BackendView::from(&snapshot);
        assert_eq!(view.effective_weight, 2.0);
        assert_eq!(view.state, "drain");
        assert!(!view.healthy);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["addr"], "127.0.0.1:1");
        assert_eq!(json["effective_weight"], 2.0);
    }

    #[test]
    fn the_target_share_follows_the_weights_of_backends_that_are_up() {
        let all = [
            backend(1, 1, BackendState::Up, 300),
            backend(2, 1, BackendState::Up, 300),
            backend(3, 2, BackendState::Up, 0),
            backend(4, 1, BackendState::Drain, 50),
        ];
        let shares: Vec<(f64, f64)> = views(&all)
            .iter()
            .map(|v| (v.target_share, v.target_sessions))
            .collect();
        assert_eq!(
            shares,
            [(0.25, 150.0), (0.25, 150.0), (0.5, 300.0), (0.0, 0.0)]
        );
        // With no sessions yet, the share is the weights'.
        let idle = [
            backend(1, 1, BackendState::Up, 0),
            backend(2, 3, BackendState::Up, 0),
        ];
        let shares: Vec<f64> = views(&idle).iter().map(|v| v.target_share).collect();
        assert_eq!(shares, [0.25, 0.75]);
    }
}
