//! The backend set: an immutable snapshot that workers read on the hot path.
//!
//! A new set is built whenever the list or a backend's state changes (by `set_backends` today,
//! by the health thread and reloads later) and published to every worker as an `Arc`. The only
//! mutable parts are the per-backend atomic counters, which survive from one set to the next
//! for a backend whose address stays, so least-conn keeps counting live sessions correctly
//! across a change.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::balance::{self, Maglev};
use crate::config::{Algorithm, BackendSpec};

/// Whether a backend may receive new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Eligible for new connections.
    Up,
    /// Failing; skipped until it recovers.
    Down,
    /// Taken out by an operator; live sessions continue, no new ones.
    Drain,
}

/// Counters for one backend, shared by all workers.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Sessions assigned to this backend now (connecting or relaying). Least-conn reads this.
    pub active: AtomicU64,
    /// Sessions ever established to this backend.
    pub total: AtomicU64,
    /// Connects that failed: refused, reset or timed out.
    pub connect_failures: AtomicU64,
    /// Consecutive connect failures, reset by a success: the seam for passive health checks.
    pub consecutive_failures: AtomicU64,
}

/// One backend in a set.
#[derive(Debug)]
pub struct Backend {
    pub spec: BackendSpec,
    pub state: BackendState,
    pub stats: Arc<BackendStats>,
}

/// Per-backend counters, read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatsSnapshot {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
    pub active: u64,
    pub total: u64,
    pub connect_failures: u64,
}

/// An immutable set of backends plus what the algorithms precompute from it.
#[derive(Debug)]
pub struct BackendSet {
    pub backends: Vec<Backend>,
    /// For source-hash: the Maglev table over every configured backend. A backend that is
    /// not eligible stays in the table and is skipped at lookup, so its clients fall through
    /// to their next slot while everyone else keeps their backend; when it returns, its own
    /// clients come back.
    maglev: Option<Maglev>,
}

impl BackendSet {
    /// Builds a set from `specs`. Backends present in `previous` (same address) keep their
    /// counters and state.
    pub fn build(
        specs: &[BackendSpec],
        previous: Option<&BackendSet>,
        algorithm: Algorithm,
    ) -> BackendSet {
        let backends: Vec<Backend> = specs
            .iter()
            .map(|spec| {
                let old =
                    previous.and_then(|p| p.backends.iter().find(|b| b.spec.addr == spec.addr));
                Backend {
                    spec: spec.clone(),
                    state: old.map_or(BackendState::Up, |b| b.state),
                    stats: old.map_or_else(Default::default, |b| Arc::clone(&b.stats)),
                }
            })
            .collect();
        let maglev = (algorithm == Algorithm::SourceHash).then(|| {
            let entries: Vec<(SocketAddr, u32)> = backends
                .iter()
                .map(|b| (b.spec.addr, b.spec.weight))
                .collect();
            Maglev::new(&entries, balance::maglev::DEFAULT_TABLE_SIZE)
        });
        BackendSet { backends, maglev }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn is_eligible(&self, i: usize) -> bool {
        self.backends[i].state == BackendState::Up
    }

    /// The consistent-hash choice for `ip`, skipping ineligible backends and those in `tried`.
    pub(crate) fn pick_by_source(&self, ip: IpAddr, tried: &[usize]) -> Option<usize> {
        let maglev = self.maglev.as_ref()?;
        maglev.pick(balance::hash::hash_ip(ip), |i| {
            !self.is_eligible(i) || tried.contains(&i)
        })
    }

    pub fn stats_snapshot(&self) -> Vec<BackendStatsSnapshot> {
        self.backends
            .iter()
            .map(|b| BackendStatsSnapshot {
                addr: b.spec.addr,
                weight: b.spec.weight,
                state: b.state,
                active: b.stats.active.load(Relaxed),
                total: b.stats.total.load(Relaxed),
                connect_failures: b.stats.connect_failures.load(Relaxed),
            })
            .collect()
    }
}
