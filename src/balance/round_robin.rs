//! Smooth weighted round-robin (nginx's algorithm).
//!
//! Plain weighted round-robin sends bursts (`a a a a a b c` for weights
//! 5, 1, 1); the smooth variant interleaves (`a a b a c a a`) so a light
//! backend is never starved for long and a heavy one never gets a long
//! burst. Each pick, every candidate's `current += weight`; the largest
//! `current` wins (first index on ties) and the winner's
//! `current -= total weight of candidates`. Over any `sum(weights)`
//! consecutive picks with a fixed candidate set starting from zero, each
//! backend is picked exactly `weight` times.

/// Per-backend running credit for smooth weighted round-robin.
#[derive(Clone, Debug, Default)]
pub struct SmoothRoundRobin {
    /// Each pick adds `total` across candidates and subtracts `total` from
    /// the winner, so the values always sum to zero. Each stays within
    /// `n * max_weight` of zero (also observed under random skipping), far
    /// inside `i64` for `u32` weights, so plain arithmetic cannot overflow.
    current: Vec<i64>,
}

impl SmoothRoundRobin {
    /// State for `n` backends, all credits zero.
    pub fn new(n: usize) -> SmoothRoundRobin {
        SmoothRoundRobin {
            current: vec![0; n],
        }
    }

    /// `weight(i)` is `None` for a backend that must not be picked (down,
    /// drained or already tried); `Some(0)` is treated the same way (holdfast
    /// never passes it), so it neither wins nor accrues credit. A skipped backend's credit is left
    /// as it was, so when it returns it resumes its place in the rotation.
    ///
    /// If `n` differs from the state's length the backend list changed and
    /// old credits belong to other backends, so the state resets to `n`
    /// zeros first. `None` if there is no candidate (state unchanged).
    /// O(n), no allocation unless `n` changed.
    pub fn pick(
        &mut self,
        n: usize,
        mut weight: impl FnMut(usize) -> Option<u32>,
    ) -> Option<usize> {
        if self.current.len() != n {
            self.current.clear();
            self.current.resize(n, 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, cur) in self.current.iter_mut().enumerate() {
            let w = match weight(i) {
                Some(w) if w > 0 => i64::from(w),
                _ => continue,
            };
            *cur += w;
            total += w;
            // Strict `>`: the first index keeps a tie, as in nginx.
            if best.is_none_or(|(_, bc)| *cur > bc) {
                best = Some((i, *cur));
            }
        }
        let (i, _) = best?;
        self.current[i] -= total;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn picks(rr: &mut SmoothRoundRobin, weights: &[Option<u32>], count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| rr.pick(weights.len(), |i| weights[i]).expect("a candidate"))
            .collect()
    }

    #[test]
    fn nginx_sequence_5_1_1() {
        let mut rr = SmoothRoundRobin::new(3);
        let w = [Some(5), Some(1), Some(1)];
        // a a b a c a a, the sequence from nginx's commit introducing it,
        // and again for the next cycle (state returns to all zeros).
        let want = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(picks(&mut rr, &w, 7), want);
        assert_eq!(rr.current, vec![0, 0, 0]);
        assert_eq!(picks(&mut rr, &w, 7), want);
    }

    #[test]
    fn no_candidate() {
        let mut rr = SmoothRoundRobin::new(2);
        assert_eq!(rr.pick(0, |_| Some(1)), None);
        assert_eq!(rr.pick(2, |_| None), None);
        assert_eq!(rr.pick(2, |_| Some(0)), None);
        assert_eq!(rr.current, vec![0, 0]);
    }

    #[test]
    fn skipped_never_picked_and_keep_credit() {
        let mut rr = SmoothRoundRobin::new(3);
        let w = [Some(2), None, Some(1)];
        let got = picks(&mut rr, &w, 30);
        assert!(!got.contains(&1));
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 20);
        assert_eq!(rr.current[1], 0);
    }

    #[test]
    fn resize_resets() {
        let mut rr = SmoothRoundRobin::new(3);
        let w3 = [Some(5), Some(1), Some(1)];
        let _ = picks(&mut rr, &w3, 3);
        assert_ne!(rr.current, vec![0, 0, 0]);
        let w4 = [Some(1), Some(1), Some(1), Some(1)];
        let mut fresh = SmoothRoundRobin::new(4);
        assert_eq!(picks(&mut rr, &w4, 6), picks(&mut fresh, &w4, 6));
        assert_eq!(rr.current.len(), 4);
        // Default is an empty state that sizes itself on first use.
        let mut d = SmoothRoundRobin::default();
        assert_eq!(d.pick(2, |i| Some(i as u32 + 1)), Some(1));
    }

    proptest! {
        #[test]
        fn prop_exact_counts_per_cycle(
            weights in proptest::collection::vec(prop::option::weighted(0.8, 0u32..10), 1..12),
            cycles in 1usize..3,
        ) {
            let live: Vec<u32> = weights.iter().map(|w| w.unwrap_or(0)).collect();
            let total: u32 = live.iter().sum();
            let mut rr = SmoothRoundRobin::new(weights.len());
            if total == 0 {
                prop_assert_eq!(rr.pick(weights.len(), |i| weights[i]), None);
                return Ok(());
            }
            for _ in 0..cycles {
                let got = picks(&mut rr, &weights, total as usize);
                for (i, &w) in live.iter().enumerate() {
                    prop_assert_eq!(got.iter().filter(|&&g| g == i).count(), w as usize);
                }
                // Skipped and zero-weight backends never appear.
                prop_assert!(got.iter().all(|&g| live[g] > 0));
            }
        }
    }
}
