//! The worker's backend choice: the configured algorithm applied to a [`BackendSet`].
//!
//! A `Picker` belongs to one worker. Least-conn reads the shared per-backend active counts
//! (so it balances across every worker) and starts its scan at a random index drawn from
//! the picker's own xorshift state, so ties do not send every worker to the same backend;
//! source-hash looks the client IP up in the set's Maglev table; round-robin keeps its
//! rotation here, per worker. Past `balance::large::LINEAR_MAX` backends, least-conn and
//! round-robin keep a heap per worker instead of scanning every backend (O(log n) a pick;
//! the heap is rebuilt, an allocation, when the set changes and, for least-conn, at most
//! every 50 ms). No I/O; no allocation on other picks.

use std::net::IpAddr;

use std::time::Instant;

use crate::backend::BackendSet;
use crate::balance::large::{DeadlineRoundRobin, LINEAR_MAX, LeastConnHeap};
use crate::balance::{Load, SmoothRoundRobin, least_conn};
use crate::config::Algorithm;

/// Chooses backends for one worker. Least-conn and source-hash are stateless here; round-robin
/// keeps its rotation per worker.
pub struct Picker {
    algorithm: Algorithm,
    round_robin: SmoothRoundRobin,
    /// Past [`LINEAR_MAX`] backends: O(log n) picks instead of a scan (`balance::large`).
    least_conn_heap: LeastConnHeap,
    deadline_round_robin: DeadlineRoundRobin,
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
            least_conn_heap: LeastConnHeap::new(seed),
            deadline_round_robin: DeadlineRoundRobin::default(),
            rng: seed | 1,
        }
    }

    /// Starts the round-robin rotation afresh (the set moved backends to other places).
    pub fn reset(&mut self) {
        self.round_robin = SmoothRoundRobin::default();
        self.deadline_round_robin.reset();
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
        let load = |i: usize| Load {
            active: set.backends[i].stats.active(),
            weight: set.backends[i].effective_weight,
        };
        match self.algorithm {
            Algorithm::LeastConn if n > LINEAR_MAX => {
                self.least_conn_heap
                    .pick(n, set.generation(), Instant::now(), load, usable)
            }
            Algorithm::RoundRobin if n > LINEAR_MAX => self.deadline_round_robin.pick(
                n,
                set.generation(),
                |i| set.backends[i].effective_weight,
                usable,
            ),
            Algorithm::LeastConn => {
                let start = self.next_random() as usize;
                least_conn(n, start, |i| usable(i).then(|| load(i)))
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
        set_of(3, algorithm)
    }

    fn set_of(n: u16, algorithm: Algorithm) -> BackendSet {
        let specs: Vec<BackendSpec> = (1..=n)
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

    /// Past LINEAR_MAX backends the heaps pick: least-conn still finds the least loaded
    /// (and counts the slots taken), round-robin still gives every backend its turn.
    #[test]
    fn large_sets_pick_as_small_ones_do() {
        let n = 3 * super::LINEAR_MAX as u16;
        let ip = [10, 0, 0, 1].into();
        let set = set_of(n, Algorithm::LeastConn);
        for b in &set.backends {
            assert!(b.stats.try_acquire(0));
        }
        let mut picker = Picker::new(Algorithm::LeastConn, 0);
        // Every backend holds one session; 17 and 99 hold none once theirs end.
        set.backends[17].stats.release();
        set.backends[99].stats.release();
        let fresh = BackendSet::build(
            &set.backends
                .iter()
                .map(|b| b.spec.clone())
                .collect::<Vec<_>>(),
            Some(&set),
            Algorithm::LeastConn,
        );
        let mut first = Vec::new();
        for _ in 0..2 {
            let i = picker.pick(&fresh, ip, |_| false).expect("a pick");
            assert!(fresh.backends[i].stats.try_acquire(0));
            first.push(i);
        }
        first.sort_unstable();
        assert_eq!(first, [17, 99]);
        assert_eq!(picker.pick(&fresh, ip, |i| i != 5), Some(5));

        let set = set_of(n, Algorithm::RoundRobin);
        let mut picker = Picker::new(Algorithm::RoundRobin, 0);
        let mut seen = vec![0u32; usize::from(n)];
        for _ in 0..2 * n {
            seen[picker.pick(&set, ip, |_| false).expect("a pick")] += 1;
        }
        assert!(seen.iter().all(|&c| c == 2), "{seen:?}");
        assert_eq!(picker.pick(&set, ip, |_| true), None);
    }
}
