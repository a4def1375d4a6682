//! How the admin endpoint shows a backend, for `/backends` (JSON) and `/metrics` (Prometheus)
//! alike: its state as a word, its effective weight in units of weight, and the JSON object.
//! Both `routes.rs` and `metrics.rs` import this; it imports neither.

use std::net::SocketAddr;

use serde::Serialize;

use crate::backend::{BackendState, BackendStatsSnapshot, WEIGHT_SCALE};

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

    #[test]
    fn effective_weight_is_in_units_of_weight() {
        let snapshot = BackendStatsSnapshot {
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 2,
            effective_weight: 2 * WEIGHT_SCALE,
            state: BackendState::Drain,
            healthy: false,
            active: 0,
            total: 0,
            connect_failures: 0,
            passive_failures: 0,
            bytes_client_to_backend: 0,
            bytes_backend_to_client: 0,
            connect_latency_p50_us: 0,
            connect_latency_p99_us: 0,
            connect_latency_max_us: 0,
        };
        let view = BackendView::from(&snapshot);
        assert_eq!(view.effective_weight, 2.0);
        assert_eq!(view.state, "drain");
        assert!(!view.healthy);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["addr"], "127.0.0.1:1");
        assert_eq!(json["effective_weight"], 2.0);
    }
}
