//! The worker's backend choice: the configured algorithm applied to a [`BackendSet`].
//!
//! A `Picker` belongs to one worker. Least-conn reads the shared per-backend active counts
//! (so it balances across every worker) and starts its scan at a random index drawn from
//! the picker's own xorshift state, so ties do not send every worker to the same backend;
//! source-hash looks the client IP up in the set's Maglev table; round-robin keeps its
//! rotation here, per worker. No I/O, no allocation per pick.

use std::net::IpAddr;

use crate::backend::BackendSet;
use crate::balance::{Load, SmoothRoundRobin, least_conn};
use crate::config::Algorithm;

/// Chooses backends for one worker. Least-conn and source-hash are stateless here; round-robin
/// keeps its rotation per worker.
pub struct Picker {
    algorithm: Algorithm,
    round_robin: SmoothRoundRobin,
    /// xorshift state: a random start for least-conn's scan, so ties do not send every worker
    /// to the same backend.
    rng: u64,
}

impl Picker {
    pub fn new(algorithm: Algorithm, worker: usize) -> Picker {
        let seed =
            (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
        Picker {
            algorithm,
            round_robin: SmoothRoundRobin::default(),
            rng: seed | 1,
        }
    }

    /// Starts the round-robin rotation afresh (the set moved backends to other places).
    pub fn reset(&mut self) {
        self.round_robin = SmoothRoundRobin::default();
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The algorithm's choice among eligible backends for which `skip` is false.
    pub fn pick(
        &mut self,
        set: &BackendSet,
        ip: IpAddr,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let usable = |i: usize| set.is_eligible(i) && !skip(i);
        let n = set.len();
        match self.algorithm {
            Algorithm::LeastConn => {
                let start = self.next_random() as usize;
                least_conn(n, start, |i| {
                    usable(i).then(|| Load {
                        active: set.backends[i].stats.active(),
                        weight: set.backends[i].effective_weight,
                    })
                })
            }
            // Slow start does not apply: moving sticky clients around would defeat the point.
            Algorithm::SourceHash => set.pick_by_source(ip, skip),
            Algorithm::RoundRobin => self
                .round_robin
                .pick(n, |i| usable(i).then_some(set.backends[i].effective_weight)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn set(algorithm: Algorithm) -> BackendSet {
        let specs: Vec<BackendSpec> = (1..=3)
            .map(|port| BackendSpec::new(([127, 0, 0, 1], port).into()))
            .collect();
        BackendSet::build(&specs, None, algorithm)
    }

    #[test]
    fn least_conn_takes_the_least_loaded_not_skipped() {
        let set = set(Algorithm::LeastConn);
        let mut picker = Picker::new(Algorithm::LeastConn, 0);
        for (i, n) in [(0, 2), (1, 1)] {
            for _ in 0..n {
                assert!(set.backends[i].stats.try_acquire(0));
            }
        }
        let ip = [10, 0, 0, 1].into();
        for _ in 0..10 {
            assert_eq!(picker.pick(&set, ip, |_| false), Some(2));
            assert_eq!(picker.pick(&set, ip, |i| i == 2), Some(1));
        }
        assert_eq!(picker.pick(&set, ip, |_| true), None);
    }

    #[test]
    fn source_hash_is_sticky_and_falls_through_a_skipped_backend() {
        let set = set(Algorithm::SourceHash);
        let mut picker = Picker::new(Algorithm::SourceHash, 0);
        let ip = [10, 0, 0, 7].into();
        let first = picker.pick(&set, ip, |_| false);
        assert!(first.is_some());
        assert_eq!(picker.pick(&set, ip, |_| false), first);
        let other = picker.pick(&set, ip, |i| Some(i) == first);
        assert!(other.is_some() && other != first);
    }

    #[test]
    fn round_robin_rotates_and_reset_starts_over() {
        let set = set(Algorithm::RoundRobin);
        let mut picker = Picker::new(Algorithm::RoundRobin, 0);
        let ip = [10, 0, 0, 1].into();
        let picks: Vec<_> = (0..6)
            .filter_map(|_| picker.pick(&set, ip, |_| false))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        picker.pick(&set, ip, |_| false);
        picker.reset();
        assert_eq!(picker.pick(&set, ip, |_| false), Some(0));
    }
}
