//! Process-wide counters, shared by every worker as relaxed atomics.
//!
//! Relaxed ordering is enough: each counter is independent, and a reader only needs a value
//! that was true at some recent instant, never a consistent cut across counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The live counters.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// The rebalance under way or last run (not a counter: see [`RebalanceStatus`]).
            pub rebalance: RebalanceStatus,
        }

        /// The counters, read at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Client connections accepted.
    accepted,
    /// Live upgrades: given by this process (old side) or the one that started it (new
    /// side), and ones that failed here (the old process kept its sessions).
    upgrades_ok,
    upgrades_failed,
    /// Sessions handed over: given (old side) or received (new side).
    sessions_handed_over,
    /// The longest session pause of the last upgrade, in microseconds: from the old process's
    /// freeze to the session's first run in the new one (new side), or to the commit (old
    /// side).
    upgrade_pause_max_us,
    /// When this process started, in milliseconds since the Unix epoch.
    start_time_ms,
    /// Sessions open now: accepted and not yet closed (waiting in the queue, connecting or
    /// relaying; one that holdfast closed with a FIN, waiting for the peers to take it, is
    /// closed already).
    active,
    /// Sessions closed, for any reason.
    closed,
    /// Clients closed because no backend was eligible (or every candidate failed).
    no_backend,
    /// Backend connects that failed (refused, reset, timed out), retried or not.
    connect_failures,
    /// Sessions closed by the idle timeout.
    idle_timeouts,
    /// Sessions closed by the backend timeout (the backend left the client's bytes
    /// unanswered).
    backend_timeouts,
    /// Sessions that ended with a reset or socket error on either side.
    resets,
    /// Sessions closed by a drain (holdfast's graceful shutdown or a backend's drain timeout).
    closed_by_drain,
    /// Pipes held by sessions right now (bytes in flight through splice).
    pipes_in_use,
    /// Bytes of capacity of grown pipes (a proven bulk stream's, see `--pipe-memory`) that
    /// exist right now, in use or pooled, all workers together.
    pipe_memory,
    /// Per-session copy buffers held right now (a write to a peer was partial).
    buffers_in_use,
    /// Times descriptors, memory or local ports ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM,
    /// EADDRNOTAVAIL) in accept(2), when holding a descriptor in reserve for a client's backend
    /// socket, or when opening or connecting a backend socket; accepting pauses briefly each
    /// time, and the client waits in the queue instead of being closed.
    accept_errors,
    /// Clients waiting for a backend with room right now (all workers).
    queued,
    /// Clients that ever had to wait in the queue.
    queued_total,
    /// Clients closed because they waited longer than the queue timeout.
    queue_timeouts,
    /// Clients closed at once because the queue was full.
    queue_full,
    /// Bytes relayed client to backend.
    bytes_client_to_backend,
    /// Bytes relayed backend to client.
    bytes_backend_to_client,
    // The client's address (issue #11). PROXY headers refused, by reason (the parser's
    // reasons, then holdfast's own: an untrusted source, the header timeout, a client that
    // closed or reset before its header was complete).
    /// PROXY header errors: neither `PROXY ` nor the v2 signature.
    proxy_header_signature,
    /// PROXY header errors: v2 version other than 2.
    proxy_header_version,
    /// PROXY header errors: v2 command other than LOCAL and PROXY.
    proxy_header_command,
    /// PROXY header errors: unknown protocol or family.
    proxy_header_family,
    /// PROXY header errors: v2 length shorter than the address block.
    proxy_header_length,
    /// PROXY header errors: v1 line structure.
    proxy_header_syntax,
    /// PROXY header errors: v1 address or port.
    proxy_header_address,
    /// PROXY header errors: longer than the limit.
    proxy_header_too_long,
    /// PROXY header errors: malformed v2 TLVs.
    proxy_header_tlv,
    /// PROXY header errors: a v2 CRC32C that does not match.
    proxy_header_checksum,
    /// PROXY header errors: a source not in `--trusted-proxy`.
    proxy_header_untrusted,
    /// PROXY header errors: not complete within `--proxy-header-timeout`.
    proxy_header_timeout,
    /// PROXY header errors: the client closed or reset before its header was complete.
    proxy_header_closed,
    /// Sessions closed because they reached `--max-session-age` (with their jitter).
    sessions_closed_by_age,
    /// Clients closed at once by `--deny` / `--allow`.
    refused_deny,
    /// Clients closed at once by `--max-conns-per-ip`.
    refused_max_conns_per_ip,
    /// Clients closed at once by `--max-conn-rate-per-ip`.
    refused_max_conn_rate_per_ip,
    /// Client addresses the per-IP table holds (as of its last sweep, every few seconds).
    ip_table_entries,
    /// Clients served untracked because the per-IP table was full (as of its last sweep).
    ip_table_untracked,
}

impl Counters {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }
}

impl Counters {
    /// The PROXY header error counter for `reason` (a label of
    /// `holdfast_proxy_header_errors_total`).
    pub(crate) fn proxy_header_error(&self, reason: &str) -> &AtomicU64 {
        match reason {
            "signature" => &self.proxy_header_signature,
            "version" => &self.proxy_header_version,
            "command" => &self.proxy_header_command,
            "family" => &self.proxy_header_family,
            "length" => &self.proxy_header_length,
            "syntax" => &self.proxy_header_syntax,
            "address" => &self.proxy_header_address,
            "too_long" => &self.proxy_header_too_long,
            "tlv" => &self.proxy_header_tlv,
            "checksum" => &self.proxy_header_checksum,
            "untrusted" => &self.proxy_header_untrusted,
            "timeout" => &self.proxy_header_timeout,
            _ => &self.proxy_header_closed,
        }
    }
}

impl StatsSnapshot {
    /// `(reason label, count)` of every PROXY header error reason.
    pub fn proxy_header_errors(&self) -> [(&'static str, u64); 13] {
        [
            ("signature", self.proxy_header_signature),
            ("version", self.proxy_header_version),
            ("command", self.proxy_header_command),
            ("family", self.proxy_header_family),
            ("length", self.proxy_header_length),
            ("syntax", self.proxy_header_syntax),
            ("address", self.proxy_header_address),
            ("too_long", self.proxy_header_too_long),
            ("tlv", self.proxy_header_tlv),
            ("checksum", self.proxy_header_checksum),
            ("untrusted", self.proxy_header_untrusted),
            ("timeout", self.proxy_header_timeout),
            ("closed", self.proxy_header_closed),
        ]
    }

    /// `(reason label, count)` of clients refused by per-IP policy.
    pub fn clients_refused(&self) -> [(&'static str, u64); 3] {
        refused_by_reason(
            self.refused_deny,
            self.refused_max_conns_per_ip,
            self.refused_max_conn_rate_per_ip,
        )
    }
}

/// Most workers whose share of a rebalance is kept apart (`--workers` is at most 1024).
const MAX_WORKERS: usize = 1024;

/// A worker's slot before its first look at a rebalance: not known yet.
const UNPLANNED: u64 = u64::MAX;

/// The rebalance under way (or the last one), shared by the workers that carry it out and
/// the handle that reports it (`GET /rebalance`). Each rebalance has a generation, unique in
/// the process and increasing; the first worker to see a new one resets what is counted per
/// rebalance. Relaxed atomics like every counter here: a reader gets values that were true at
/// some recent instant.
#[derive(Debug)]
pub struct RebalanceStatus {
    epoch: Instant,
    generation: AtomicU64,
    /// Milliseconds since `epoch` at which the window ends.
    deadline_ms: AtomicU64,
    /// Source-hash: each worker's count of sessions to move is its own; otherwise every
    /// worker computes the same global count from the shared per-backend counters.
    by_source: AtomicBool,
    /// Stopped before its window ended (SIGTERM), or found nothing left to move.
    ended: AtomicBool,
    closed: AtomicU64,
    /// Each worker's view of what is left (`UNPLANNED` until it looked).
    left: Box<[AtomicU64]>,
    /// The close-rate limiter shared by every worker (a GCRA: the "theoretical arrival time"
    /// of the next close, in nanoseconds since `epoch`).
    next_close_at: AtomicU64,
}

impl Default for RebalanceStatus {
    fn default() -> RebalanceStatus {
        RebalanceStatus {
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            deadline_ms: AtomicU64::new(0),
            by_source: AtomicBool::new(false),
            ended: AtomicBool::new(true),
            closed: AtomicU64::new(0),
            left: (0..MAX_WORKERS).map(|_| AtomicU64::new(0)).collect(),
            next_close_at: AtomicU64::new(0),
        }
    }
}

/// `GET /rebalance`: the rebalance under way, or the last one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebalanceSnapshot {
    /// Whether one is under way.
    pub running: bool,
    /// Sessions it has closed so far (the last one's, once it ended).
    pub closed: u64,
    /// Sessions still to move; `None` while the workers have not all looked yet.
    pub left: Option<u64>,
    /// Time left in its window.
    pub window_left: Duration,
}

impl RebalanceStatus {
    /// A worker (or the handle) was told of rebalance `generation`, whose window ends at
    /// `deadline`, carried out by `workers` workers. The first to see it resets the counts;
    /// returns whether this call did.
    pub fn begin(
        &self,
        generation: u64,
        deadline: Instant,
        by_source: bool,
        workers: usize,
    ) -> bool {
        if self.generation.fetch_max(generation, Relaxed) >= generation {
            return false;
        }
        self.closed.store(0, Relaxed);
        for (i, slot) in self.left.iter().enumerate() {
            slot.store(if i < workers { UNPLANNED } else { 0 }, Relaxed);
        }
        self.by_source.store(by_source, Relaxed);
        self.deadline_ms.store(self.millis(deadline), Relaxed);
        self.ended.store(false, Relaxed);
        true
    }

    /// Whether `generation` is the latest.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Relaxed) == generation
    }

    /// Worker `worker` sees `left` sessions still to move (its own with source-hash, the
    /// global count otherwise). Returns the total over every worker, or `None` while one has
    /// not looked yet.
    pub fn set_left(&self, worker: usize, left: u64) -> Option<u64> {
        if let Some(slot) = self.left.get(worker) {
            slot.store(left, Relaxed);
        }
        self.left()
    }

    fn left(&self) -> Option<u64> {
        let by_source = self.by_source.load(Relaxed);
        let mut total = 0u64;
        for slot in self.left.iter() {
            match slot.load(Relaxed) {
                UNPLANNED => return None,
                n if by_source => total = total.saturating_add(n),
                n => total = total.max(n),
            }
        }
        Some(total)
    }

    /// The rebalance is over (nothing left to move, or holdfast is draining).
    pub fn end(&self) {
        self.ended.store(true, Relaxed);
    }

    /// One more session closed by the rebalance.
    pub fn count_close(&self) {
        self.closed.fetch_add(1, Relaxed);
    }

    /// May a rebalance close one more session now, at `per_second` closes a second for all
    /// workers together (bursts of at most `burst`' worth)? A GCRA in one atomic, as the
    /// backends' connect-rate limiter.
    pub fn try_close(&self, now: Instant, per_second: f64, burst: Duration) -> bool {
        if per_second <= 0.0 {
            return false;
        }
        let interval = (1e9 / per_second) as u64;
        let burst = burst.as_nanos() as u64;
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut tat = self.next_close_at.load(Relaxed);
        loop {
            let base = tat.max(now);
            if base - now > burst {
                return false;
            }
            match self.next_close_at.compare_exchange_weak(
                tat,
                base.saturating_add(interval),
                Relaxed,
                Relaxed,
            ) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }

    pub fn snapshot(&self, now: Instant) -> RebalanceSnapshot {
        let deadline = Duration::from_millis(self.deadline_ms.load(Relaxed));
        let window_left = deadline.saturating_sub(now.saturating_duration_since(self.epoch));
        let left = self.left();
        RebalanceSnapshot {
            running: !self.ended.load(Relaxed) && !window_left.is_zero() && left != Some(0),
            closed: self.closed.load(Relaxed),
            left,
            window_left,
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_rebalance_resets_the_counts_once() {
        let status = RebalanceStatus::default();
        let now = Instant::now();
        assert!(!status.snapshot(now).running);
        assert!(status.begin(1, now + Duration::from_secs(10), false, 3));
        assert!(
            !status.begin(1, now + Duration::from_secs(10), false, 3),
            "seen"
        );
        let snapshot = status.snapshot(now);
        assert!(snapshot.running && snapshot.left.is_none());
        status.count_close();
        status.set_left(0, 7);
        status.set_left(1, 7);
        assert_eq!(status.snapshot(now).left, None, "worker 2 has not looked");
        status.set_left(2, 7);
        assert_eq!(status.snapshot(now).left, Some(7), "the global count, once");
        assert_eq!(status.snapshot(now).closed, 1);
        assert!(status.begin(2, now + Duration::from_secs(10), true, 3));
        assert_eq!(status.snapshot(now).closed, 0);
        assert!(
            !status.begin(1, now, false, 3),
            "an older one is not started again"
        );
        for worker in 0..3 {
            status.set_left(worker, 1);
        }
        assert_eq!(
            status.snapshot(now).left,
            Some(3),
            "each worker's own, summed"
        );
        for worker in 0..3 {
            status.set_left(worker, 0);
        }
        assert!(!status.snapshot(now).running, "nothing left");
    }

    #[test]
    fn closes_are_paced_for_all_callers_together() {
        let status = RebalanceStatus::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let burst = Duration::from_millis(50);
        // 100 a second with a 50 ms burst: 6 at once (the first, and 5 within the burst).
        let allowed = (0..50)
            .filter(|_| status.try_close(t0, 100.0, burst))
            .count();
        assert_eq!(allowed, 6);
        let mut admitted = 0;
        for ms in 1..=1000u64 {
            while status.try_close(t0 + Duration::from_millis(ms), 100.0, burst) {
                admitted += 1;
            }
        }
        assert!((99..=101).contains(&admitted), "{admitted} in one second");
        assert!(!status.try_close(t0, 0.0, burst));
    }
}

macro_rules! service_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// One service's own counters, shared by every worker. Each has the name of the
        /// process's counter (in [`Counters`]) that counts the same thing for all services
        /// together; the worker counts both (`count!` in `worker/mod.rs`).
        #[derive(Debug, Default)]
        pub struct ServiceCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A service's counters, read at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct ServiceStatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl ServiceCounters {
            pub fn snapshot(&self) -> ServiceStatsSnapshot {
                ServiceStatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

/// Clients refused at once, labelled by reason (`holdfast_clients_refused_total` and its
/// per-service family).
fn refused_by_reason(deny: u64, conns: u64, rate: u64) -> [(&'static str, u64); 3] {
    [
        ("deny", deny),
        ("max_conns_per_ip", conns),
        ("max_conn_rate_per_ip", rate),
    ]
}

impl ServiceStatsSnapshot {
    /// The service's clients refused at once, by the label `holdfast_service_clients_refused_total`
    /// gives each reason (the same as the process's `clients_refused`).
    pub fn clients_refused(&self) -> [(&'static str, u64); 3] {
        refused_by_reason(
            self.refused_deny,
            self.refused_max_conns_per_ip,
            self.refused_max_conn_rate_per_ip,
        )
    }
}

service_counters! {
    /// Client connections accepted on its listeners.
    accepted,
    /// Its sessions open now (reading a PROXY header, placing, queued, connecting or
    /// relaying).
    active,
    /// Its sessions closed, for any reason (clients refused at once included).
    closed,
    /// Its clients closed because no backend was available.
    no_backend,
    /// Connects to its backends that failed, retried or not.
    connect_failures,
    /// Its clients waiting in the queue now.
    queued,
    /// Its clients that ever had to wait in the queue.
    queued_total,
    /// Its clients closed after waiting longer than its queue timeout.
    queue_timeouts,
    /// Its clients closed at once because the queue was full.
    queue_full,
    /// Its sessions closed by a drain.
    closed_by_drain,
    /// Its sessions closed at `--max-session-age`.
    sessions_closed_by_age,
    /// Its sessions closed by the idle timeout.
    idle_timeouts,
    /// Its sessions closed by the backend timeout.
    backend_timeouts,
    /// Its sessions that ended with a reset or socket error on either side.
    resets,
    /// Bytes relayed from its clients to its backends.
    bytes_client_to_backend,
    /// Bytes relayed from its backends to its clients.
    bytes_backend_to_client,
    /// Its clients refused by a PROXY header error (every reason together).
    proxy_header_errors,
    /// Its clients closed at once by `--deny` / `--allow`.
    refused_deny,
    /// Its clients closed at once by `--max-conns-per-ip`.
    refused_max_conns_per_ip,
    /// Its clients closed at once by `--max-conn-rate-per-ip`.
    refused_max_conn_rate_per_ip,
    /// Client addresses its per-IP table holds (as of the last sweep).
    ip_table_entries,
    /// Its clients served untracked because its per-IP table was full (as of the last sweep).
    ip_table_untracked,
}
