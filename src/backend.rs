//! The backend set: an immutable snapshot that workers read on the hot path.
//!
//! The health thread builds a new set whenever the list, a backend's state or a slow-start
//! weight changes, and publishes it to every worker as an `Arc`. The only mutable parts are
//! the per-backend atomic counters, which survive from one set to the next for a backend whose
//! address stays, so least-conn keeps counting live sessions correctly across a change, and the
//! per-backend limits hold across workers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

use crate::balance::{self, Maglev};
use crate::config::{Algorithm, BackendSpec};

/// Effective weights are kept in 1/64ths of a configured weight, so slow start can ramp a
/// weight-1 backend smoothly. Least-conn and round-robin only compare weights with each other,
/// so the scale cancels out.
pub const WEIGHT_SCALE: u32 = 64;

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

/// A failure seen on live traffic (passive detection, see docs/health.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connect was refused, reset or timed out.
    Connect,
    /// The backend ended a session (reset or EOF) without having sent a byte back, within
    /// `--connect-timeout` of its start; or, with `--backend-timeout`, left a session it never
    /// answered until that timeout closed it.
    Passive,
}

/// Counters for one backend, shared by all workers (relaxed atomics). The fields are private:
/// the methods below are the only ways to change them, so the slot count that least-conn and
/// `--max-conns-per-backend` rely on only moves by acquire and release.
#[derive(Debug)]
pub struct BackendStats {
    /// Sessions assigned to this backend now (connecting or relaying). Least-conn reads this,
    /// and `--max-conns-per-backend` caps it.
    active: AtomicU64,
    /// Sessions ever established to this backend.
    total: AtomicU64,
    /// Connects that failed: refused, reset or timed out.
    connect_failures: AtomicU64,
    /// Passive failures (see [`Failure::Passive`]).
    passive_failures: AtomicU64,
    /// Consecutive failures of either kind, reset by the first byte a session receives from
    /// the backend (and by the health thread when it acts on a streak). Crossing
    /// `--observe-errors` marks the backend down.
    consecutive_failures: AtomicU64,
    /// Bytes relayed client to backend, and backend to client.
    bytes_client_to_backend: AtomicU64,
    bytes_backend_to_client: AtomicU64,
    /// Time from starting the connect to the connection being established, in microseconds;
    /// `None` until the first connection (a backend that never gets one costs nothing here).
    /// Locked once per established connection (never per event or byte); the workers rarely
    /// establish a connection to the same backend in the same few nanoseconds.
    connect_latency: Mutex<Option<Histogram<u64>>>,
    /// The rate limiter's "theoretical arrival time" (GCRA), in nanoseconds since `epoch`.
    next_connect_at: AtomicU64,
    epoch: Instant,
    /// Sessions closed by a rebalance to make room.
    rebalance_closed: AtomicU64,
}

impl Default for BackendStats {
    fn default() -> BackendStats {
        BackendStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            passive_failures: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            bytes_client_to_backend: AtomicU64::new(0),
            bytes_backend_to_client: AtomicU64::new(0),
            connect_latency: Mutex::new(None),
            next_connect_at: AtomicU64::new(0),
            epoch: Instant::now(),
            rebalance_closed: AtomicU64::new(0),
        }
    }
}

impl BackendStats {
    /// Sessions assigned to this backend now (connecting or relaying), all workers together.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Whether the backend is at `max` sessions (`--max-conns-per-backend`; 0 is unlimited).
    pub fn is_full(&self, max: u64) -> bool {
        max > 0 && self.active() >= max
    }

    /// Takes one of the backend's connection slots: always when `max` is 0 (unlimited),
    /// otherwise only below `max`. The compare-and-swap makes the cap exact across workers.
    pub fn try_acquire(&self, max: u64) -> bool {
        if max == 0 {
            self.active.fetch_add(1, Relaxed);
            return true;
        }
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a slot taken by [`BackendStats::try_acquire`].
    pub fn release(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// A connection was established `latency` after its connect started.
    pub fn record_established(&self, latency: Duration) {
        self.total.fetch_add(1, Relaxed);
        self.record_connect_latency(latency);
    }

    /// Counts a failure on live traffic; returns the streak of consecutive failures it makes.
    pub fn record_failure(&self, failure: Failure) -> u64 {
        match failure {
            Failure::Connect => self.connect_failures.fetch_add(1, Relaxed),
            Failure::Passive => self.passive_failures.fetch_add(1, Relaxed),
        };
        self.consecutive_failures.fetch_add(1, Relaxed) + 1
    }

    /// Ends the streak of consecutive failures: the backend answered a session, or the
    /// health thread acted on the streak.
    pub fn reset_streak(&self) {
        self.consecutive_failures.store(0, Relaxed);
    }

    /// Bytes relayed: `up` client to backend, `down` backend to client.
    pub fn add_bytes(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes_client_to_backend.fetch_add(up, Relaxed);
        }
        if down > 0 {
            self.bytes_backend_to_client.fetch_add(down, Relaxed);
        }
    }

    /// A rebalance closed one of this backend's sessions.
    pub fn record_rebalance_close(&self) {
        self.rebalance_closed.fetch_add(1, Relaxed);
    }

    fn record_connect_latency(&self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_MICROS);
        let mut h = self
            .connect_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Within the bounds by the clamp above, so recording cannot fail.
        let _ = h.get_or_insert_with(latency_histogram).record(micros);
    }

    /// Connect latency quantiles (p50, p99, max) in microseconds; zeros before any connect.
    pub fn connect_latency_micros(&self) -> (u64, u64, u64) {
        let h = self
            .connect_latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match h.as_ref() {
            Some(h) if !h.is_empty() => {
                (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
            }
            _ => (0, 0, 0),
        }
    }

    /// The connect-rate limiter, a GCRA (the "virtual scheduling" form of a token bucket) in
    /// one atomic: each connect pushes the next permitted time forward by `interval`; a
    /// connect is allowed while that time is at most `burst` ahead of now. Lock-free and
    /// shared by every worker. `Err` says how long until the next connect is allowed.
    pub fn try_rate(&self, now: Instant, limit: &RateLimit) -> Result<(), Duration> {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut tat = self.next_connect_at.load(Relaxed);
        loop {
            let base = tat.max(now);
            let ahead = base - now;
            if ahead > limit.burst_ns {
                return Err(Duration::from_nanos(ahead - limit.burst_ns));
            }
            match self.next_connect_at.compare_exchange_weak(
                tat,
                base + limit.interval_ns,
                Relaxed,
                Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// Connect latencies above a minute are recorded as a minute.
const MAX_LATENCY_MICROS: u64 = 60_000_000;

fn latency_histogram() -> Histogram<u64> {
    // One significant figure from 1 µs to a minute: a value is off by at most 1/16 (6 %), in
    // 368 counters (under 3 KiB). Two figures (1/128) took 2560 counters, 20 KiB per backend:
    // 110 MB for a pool of 5000.
    match Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 1) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e:?}"),
    }
}

/// The Maglev table size for `n` backends: the default, unless the set is larger (validation
/// keeps configured lists below it, but removed backends stay in the set while they drain), then
/// the first prime above `n`, as the table must have more slots than backends.
fn maglev_table_size(n: usize) -> usize {
    let default = balance::maglev::DEFAULT_TABLE_SIZE;
    if n < default {
        return default;
    }
    let is_prime = |m: usize| {
        (2..)
            .take_while(|d| d * d <= m)
            .all(|d| !m.is_multiple_of(d))
    };
    (n + 1..).find(|&m| is_prime(m)).unwrap_or(default)
}

/// `--max-connect-rate` as the GCRA sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    interval_ns: u64,
    burst_ns: u64,
}

impl RateLimit {
    /// `per_second` connects a second, with a burst of about a twentieth of a second's worth
    /// (at least one), so a storm is spread out rather than let through.
    pub fn new(per_second: u32) -> Option<RateLimit> {
        (per_second > 0).then(|| {
            let interval_ns = 1_000_000_000 / u64::from(per_second);
            let burst = u64::from((per_second / 20).max(1));
            RateLimit {
                interval_ns,
                burst_ns: interval_ns * (burst - 1),
            }
        })
    }
}

/// One backend in a set.
#[derive(Debug)]
pub struct Backend {
    pub spec: BackendSpec,
    pub state: BackendState,
    /// The health checks' (and passive detection's) verdict, whatever an operator's drain
    /// says: a drained backend can be healthy or not, and its `state` shows only `Drain`.
    pub healthy: bool,
    /// The weight new connections see, in `WEIGHT_SCALE` units: `spec.weight * WEIGHT_SCALE`
    /// except while slow start ramps it up.
    pub effective_weight: u32,
    pub stats: Arc<BackendStats>,
}

impl Backend {
    pub fn new(spec: BackendSpec, stats: Arc<BackendStats>) -> Backend {
        Backend {
            effective_weight: spec.weight * WEIGHT_SCALE,
            spec,
            state: BackendState::Up,
            healthy: true,
            stats,
        }
    }
}

/// Per-backend counters, read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatsSnapshot {
    pub addr: SocketAddr,
    pub weight: u32,
    /// In 1/64ths of `weight` (full weight is `weight * 64`).
    pub effective_weight: u32,
    pub state: BackendState,
    /// False while health checks or passive detection hold it down, even if drained.
    pub healthy: bool,
    pub active: u64,
    pub total: u64,
    pub connect_failures: u64,
    pub passive_failures: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// Time to establish a connection, in microseconds: median, 99th percentile, maximum.
    pub connect_latency_p50_us: u64,
    pub connect_latency_p99_us: u64,
    pub connect_latency_max_us: u64,
    /// Sessions closed by a rebalance to make room.
    pub rebalance_closed: u64,
}

/// An immutable set of backends plus what the algorithms precompute from it.
#[derive(Debug)]
pub struct BackendSet {
    pub backends: Vec<Backend>,
    /// For source-hash: the Maglev table over every configured backend. A backend that is
    /// not eligible stays in the table and is skipped at lookup, so its clients fall through
    /// to their next slot while everyone else keeps their backend; when it returns, its own
    /// clients come back. Shared with the previous set when only states or slow-start weights
    /// changed, since the table depends on addresses and configured weights alone.
    maglev: Option<Arc<Maglev>>,
    /// Different for every set made in this process: how a picker that keeps state about a
    /// set (the heaps of `balance::large`) knows it has a new one.
    generation: u64,
}

/// The next [`BackendSet::generation`].
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl BackendSet {
    /// Names this set among all sets made in this process (see the field).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `other` lists the same backends (by address) in the same places, so that an
    /// index into one names the same backend in the other.
    pub fn same_places(&self, other: &BackendSet) -> bool {
        self.len() == other.len()
            && self
                .backends
                .iter()
                .zip(&other.backends)
                .all(|(a, b)| a.spec.addr == b.spec.addr)
    }

    /// Builds a set from `backends`, reusing `previous`'s Maglev table when the addresses and
    /// configured weights are the same.
    pub fn new(
        backends: Vec<Backend>,
        previous: Option<&BackendSet>,
        algorithm: Algorithm,
    ) -> BackendSet {
        let maglev = (algorithm == Algorithm::SourceHash).then(|| {
            let same_specs = previous.is_some_and(|p| {
                p.backends.len() == backends.len()
                    && p.backends
                        .iter()
                        .zip(&backends)
                        .all(|(a, b)| a.spec == b.spec)
            });
            match previous.and_then(|p| p.maglev.as_ref()) {
                Some(table) if same_specs => Arc::clone(table),
                _ => {
                    let entries: Vec<(SocketAddr, u32)> = backends
                        .iter()
                        .map(|b| (b.spec.addr, b.spec.weight))
                        .collect();
                    Arc::new(Maglev::new(&entries, maglev_table_size(entries.len())))
                }
            }
        });
        BackendSet {
            backends,
            maglev,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// A set of `specs`, all up at full weight, with fresh counters except for backends
    /// present in `previous` (same address), which keep theirs.
    pub fn build(
        specs: &[BackendSpec],
        previous: Option<&BackendSet>,
        algorithm: Algorithm,
    ) -> BackendSet {
        let previous_by_addr = previous.map(BackendSet::by_addr).unwrap_or_default();
        let backends = specs
            .iter()
            .map(|spec| {
                let stats = previous_by_addr
                    .get(&spec.addr)
                    .map_or_else(Default::default, |b| Arc::clone(&b.stats));
                Backend::new(spec.clone(), stats)
            })
            .collect();
        BackendSet::new(backends, previous, algorithm)
    }

    pub fn find(&self, addr: SocketAddr) -> Option<&Backend> {
        self.backends.iter().find(|b| b.spec.addr == addr)
    }

    /// Every backend by address, for looking many up ([`BackendSet::find`] is a linear search).
    pub fn by_addr(&self) -> HashMap<SocketAddr, &Backend> {
        self.backends.iter().map(|b| (b.spec.addr, b)).collect()
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_eligible(&self, i: usize) -> bool {
        self.backends[i].state == BackendState::Up
    }

    /// The consistent-hash choice for `ip`, skipping ineligible backends and those `skip`
    /// names.
    pub(crate) fn pick_by_source(&self, ip: IpAddr, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let maglev = self.maglev.as_ref()?;
        maglev.pick(balance::hash::hash_ip(ip), |i| {
            !self.is_eligible(i) || skip(i)
        })
    }

    pub fn stats_snapshot(&self) -> Vec<BackendStatsSnapshot> {
        self.backends
            .iter()
            .map(|b| {
                let (p50, p99, max) = b.stats.connect_latency_micros();
                BackendStatsSnapshot {
                    addr: b.spec.addr,
                    weight: b.spec.weight,
                    effective_weight: b.effective_weight,
                    state: b.state,
                    healthy: b.healthy,
                    active: b.stats.active(),
                    total: b.stats.total.load(Relaxed),
                    connect_failures: b.stats.connect_failures.load(Relaxed),
                    passive_failures: b.stats.passive_failures.load(Relaxed),
                    bytes_client_to_backend: b.stats.bytes_client_to_backend.load(Relaxed),
                    bytes_backend_to_client: b.stats.bytes_backend_to_client.load(Relaxed),
                    connect_latency_p50_us: p50,
                    connect_latency_p99_us: p99,
                    connect_latency_max_us: max,
                    rebalance_closed: b.stats.rebalance_closed.load(Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_stop_at_the_cap() {
        let stats = BackendStats::default();
        assert!(stats.try_acquire(2));
        assert!(stats.try_acquire(2));
        assert!(!stats.try_acquire(2));
        stats.release();
        assert!(stats.try_acquire(2));
        assert!(stats.try_acquire(0), "0 means unlimited");
        assert_eq!(stats.active(), 3);
        assert!(stats.is_full(3) && !stats.is_full(4) && !stats.is_full(0));
    }

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let stats = BackendStats::default();
        let limit = RateLimit::new(200).unwrap(); // 5 ms apart, burst of 10
        let t0 = stats.epoch + Duration::from_secs(1);
        let allowed = (0..50)
            .filter(|_| stats.try_rate(t0, &limit).is_ok())
            .count();
        assert_eq!(allowed, 10, "the burst");
        let wait = stats.try_rate(t0, &limit).unwrap_err();
        assert_eq!(wait, Duration::from_millis(5));
        // One second later: 200 more, not 210 (the burst is spent) and not fewer.
        let mut admitted = 0;
        for ms in 0..1000u64 {
            let t = t0 + Duration::from_millis(ms) + Duration::from_micros(1);
            while stats.try_rate(t, &limit).is_ok() {
                admitted += 1;
            }
        }
        assert!((199..=201).contains(&admitted), "{admitted} in one second");
    }

    #[test]
    fn connect_latency_is_small_until_used_and_within_a_sixteenth() {
        let stats = BackendStats::default();
        assert_eq!(stats.connect_latency_micros(), (0, 0, 0));
        assert!(
            stats.connect_latency.lock().unwrap().is_none(),
            "allocated before use"
        );
        for micros in 1..=1000 {
            stats.record_connect_latency(Duration::from_micros(micros));
        }
        let (p50, p99, max) = stats.connect_latency_micros();
        let near = |got: u64, want: u64| got >= want && got <= want + want / 16;
        assert!(
            near(p50, 500) && near(p99, 990) && near(max, 1000),
            "{p50} {p99} {max}"
        );
        // The bounds hold for any latency, and the counters stay few.
        stats.record_connect_latency(Duration::from_secs(3600));
        assert!(near(stats.connect_latency_micros().2, MAX_LATENCY_MICROS));
        assert!(latency_histogram().distinct_values() <= 400);
    }

    #[test]
    fn failures_make_a_streak_that_an_answer_ends() {
        let spec = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        let set = BackendSet::build(&[spec], None, Algorithm::LeastConn);
        let stats = &set.backends[0].stats;
        assert_eq!(stats.record_failure(Failure::Connect), 1);
        assert_eq!(stats.record_failure(Failure::Passive), 2);
        stats.reset_streak();
        assert_eq!(stats.record_failure(Failure::Passive), 1);
        stats.add_bytes(3, 0);
        stats.add_bytes(4, 5);
        stats.record_established(Duration::from_micros(100));
        let snapshot = &set.stats_snapshot()[0];
        assert_eq!(
            (
                snapshot.connect_failures,
                snapshot.passive_failures,
                snapshot.total,
                snapshot.bytes_client_to_backend,
                snapshot.bytes_backend_to_client,
            ),
            (1, 2, 1, 7, 5)
        );
        assert!(snapshot.connect_latency_max_us >= 100);
    }

    #[test]
    fn a_maglev_table_always_has_more_slots_than_backends() {
        let default = balance::maglev::DEFAULT_TABLE_SIZE;
        assert_eq!(maglev_table_size(0), default);
        assert_eq!(maglev_table_size(default - 1), default);
        assert_eq!(maglev_table_size(default), 65539, "the next prime");
        assert_eq!(maglev_table_size(100_000), 100_003);
    }

    #[test]
    fn no_rate_limit_for_zero() {
        assert!(RateLimit::new(0).is_none());
        let one = RateLimit::new(1).unwrap();
        assert_eq!(one.burst_ns, 0);
    }
}
