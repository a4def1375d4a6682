use std::cell::RefCell;

use proptest::prelude::*;

use super::*;
use crate::balance::{SmoothRoundRobin, least_conn};

fn key(l: Load) -> (u64, u32) {
    (l.active + 1, l.weight)
}

/// `a/b < c/d`, exactly.
fn less(a: (u64, u32), c: (u64, u32)) -> bool {
    u128::from(a.0) * u128::from(c.1) < u128::from(c.0) * u128::from(a.1)
}

fn min_key(loads: &[Load], usable: impl Fn(usize) -> bool) -> Option<(u64, u32)> {
    least_conn(loads.len(), 0, |i| usable(i).then_some(loads[i])).map(|i| key(loads[i]))
}

#[test]
fn least_conn_heap_takes_the_least_loaded_and_counts_its_own_picks() {
    let loads = RefCell::new(vec![
        Load {
            active: 4,
            weight: 1,
        },
        Load {
            active: 0,
            weight: 1,
        },
        Load {
            active: 1,
            weight: 2,
        },
    ]);
    let mut heap = LeastConnHeap::new(7);
    let now = Instant::now();
    let mut picks = Vec::new();
    for _ in 0..6 {
        let i = heap
            .pick(3, 1, now, |i| loads.borrow()[i], |_| true)
            .expect("a pick");
        loads.borrow_mut()[i].active += 1;
        picks.push(i);
    }
    // Ratios (a+1)/w: 5, 1, 1 → index 1 or 2 first; weight 2 takes twice the share.
    let at = |i| picks.iter().filter(|&&p| p == i).count();
    assert_eq!(at(0), 0, "{picks:?}");
    assert_eq!(loads.borrow()[1].active, 2, "{picks:?}");
    assert_eq!(loads.borrow()[2].active, 5, "{picks:?}");
}

#[test]
fn least_conn_heap_sees_ended_sessions_at_the_next_rebuild() {
    let loads = RefCell::new(vec![
        Load {
            active: 10,
            weight: 1,
        },
        Load {
            active: 5,
            weight: 1,
        },
    ]);
    let mut heap = LeastConnHeap::new(1);
    let t0 = Instant::now();
    assert_eq!(
        heap.pick(2, 1, t0, |i| loads.borrow()[i], |_| true),
        Some(1)
    );
    loads.borrow_mut()[1].active += 1;
    // Every session on backend 0 ends; within REBUILD_EVERY the heap has not looked again.
    loads.borrow_mut()[0].active = 0;
    assert_eq!(
        heap.pick(2, 1, t0, |i| loads.borrow()[i], |_| true),
        Some(1)
    );
    loads.borrow_mut()[1].active += 1;
    let later = t0 + REBUILD_EVERY;
    assert_eq!(
        heap.pick(2, 1, later, |i| loads.borrow()[i], |_| true),
        Some(0)
    );
    // A new set is read at once, whatever the time.
    loads.borrow_mut()[0].active = 100;
    assert_eq!(
        heap.pick(2, 2, later, |i| loads.borrow()[i], |_| true),
        Some(1)
    );
}

#[test]
fn least_conn_heap_skips_without_losing_places() {
    let loads = vec![
        Load {
            active: 0,
            weight: 1
        };
        100
    ];
    let mut heap = LeastConnHeap::new(3);
    let now = Instant::now();
    assert_eq!(heap.pick(100, 1, now, |i| loads[i], |_| false), None);
    assert_eq!(heap.pick(100, 1, now, |i| loads[i], |i| i == 42), Some(42));
    assert_eq!(heap.heap.len(), 100, "every backend is still in the heap");
    let zero = [Load {
        active: 0,
        weight: 0,
    }; 3];
    assert_eq!(heap.pick(3, 2, now, |i| zero[i], |_| true), None);
}

#[test]
fn deadline_round_robin_spreads_5_1_1() {
    let weights = [5, 1, 1];
    let mut rr = DeadlineRoundRobin::default();
    let picks: Vec<usize> = (0..14)
        .map(|_| rr.pick(3, 1, |i| weights[i], |_| true).expect("a pick"))
        .collect();
    assert_eq!(picks, [0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2, 0, 0]);
    rr.reset();
    assert_eq!(rr.pick(3, 1, |i| weights[i], |_| true), Some(0));
}

#[test]
fn a_skipped_backend_returns_without_a_burst() {
    let weights = [1, 1, 1];
    let mut rr = DeadlineRoundRobin::default();
    // Backend 2 is refused for 30 picks, then comes back.
    for _ in 0..30 {
        assert_ne!(rr.pick(3, 1, |i| weights[i], |i| i != 2), Some(2));
    }
    let picks: Vec<usize> = (0..6)
        .map(|_| rr.pick(3, 1, |i| weights[i], |_| true).expect("a pick"))
        .collect();
    let twos = picks.iter().filter(|&&p| p == 2).count();
    assert_eq!(twos, 2, "no catch-up burst: {picks:?}");
}

fn loads() -> impl Strategy<Value = Vec<Load>> {
    proptest::collection::vec(
        (0u64..50, 1u32..5).prop_map(|(active, weight)| Load { active, weight }),
        1..200,
    )
}

proptest! {
    /// One worker alone (the counts change only by its own picks): every pick has the least
    /// ratio among usable backends, as the linear scan's does.
    #[test]
    fn least_conn_heap_is_exact_for_one_worker(
        start in loads(),
        refused in proptest::collection::vec(any::<bool>(), 200),
        picks in 1usize..100,
        salt in any::<u64>(),
    ) {
        let n = start.len();
        let mut loads = start;
        let usable = |i: usize| !refused[i];
        let mut heap = LeastConnHeap::new(salt);
        let now = Instant::now();
        for _ in 0..picks {
            let want = min_key(&loads, usable);
            let got = heap.pick(n, 1, now, |i| loads[i], usable);
            prop_assert_eq!(got.is_some(), want.is_some());
            let (Some(i), Some(want)) = (got, want) else { break };
            // The same ratio (the index may differ among equals).
            let k = key(loads[i]);
            prop_assert!(!less(k, want) && !less(want, k), "picked {:?}, least {:?}", k, want);
            prop_assert!(usable(i));
            loads[i].active += 1;
        }
    }

    /// Other workers' picks (counts that grow under it) are always seen: the pick is never
    /// busier than the least busy usable backend.
    #[test]
    fn least_conn_heap_sees_counts_that_grew(
        start in loads(),
        bumps in proptest::collection::vec((any::<proptest::sample::Index>(), 1u64..5), 0..300),
        salt in any::<u64>(),
    ) {
        let n = start.len();
        let mut loads = start;
        let mut heap = LeastConnHeap::new(salt);
        let now = Instant::now();
        for (at, by) in bumps {
            loads[at.index(n)].active += by;
            let want = min_key(&loads, |_| true).expect("all usable");
            let i = heap.pick(n, 1, now, |i| loads[i], |_| true).expect("a pick");
            prop_assert!(!less(want, key(loads[i])), "picked {:?}, least {:?}", key(loads[i]), want);
            loads[i].active += 1;
        }
    }

    /// From a fresh start, any `sum(w)` picks give each backend exactly its weight, and every
    /// backend's count stays within 2 of its exact share at every point.
    #[test]
    fn deadline_round_robin_gives_exact_shares_evenly(
        weights in proptest::collection::vec(1u32..10, 1..40),
        cycles in 1usize..3,
    ) {
        let n = weights.len();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut rr = DeadlineRoundRobin::default();
        let mut count = vec![0u64; n];
        for t in 1..=(total as usize * cycles) {
            let i = rr.pick(n, 1, |i| weights[i], |_| true).expect("a pick");
            count[i] += 1;
            for (j, &w) in weights.iter().enumerate() {
                let exact = t as f64 * f64::from(w) / total as f64;
                prop_assert!((count[j] as f64 - exact).abs() <= 2.0,
                    "backend {j} (w {w}) has {} after {t} picks, share {exact:.2}", count[j]);
            }
            if (t as u64).is_multiple_of(total) {
                for (j, &w) in weights.iter().enumerate() {
                    prop_assert_eq!(count[j], u64::from(w) * (t as u64 / total));
                }
            }
        }
    }

    /// Refused backends are never picked, and a pick fails only when none is usable.
    #[test]
    fn deadline_round_robin_respects_refusals(
        weights in proptest::collection::vec(0u32..4, 1..40),
        refusals in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 40), 1..50),
    ) {
        let n = weights.len();
        let mut rr = DeadlineRoundRobin::default();
        for refused in refusals {
            let usable = |i: usize| !refused[i];
            let any = (0..n).any(|i| usable(i) && weights[i] > 0);
            match rr.pick(n, 1, |i| weights[i], usable) {
                Some(i) => prop_assert!(usable(i) && weights[i] > 0),
                None => prop_assert!(!any),
            }
        }
    }
}

/// The heap and the smooth algorithm agree on long-run shares with weights.
#[test]
fn deadline_and_smooth_round_robin_agree_on_shares() {
    let weights = [3u32, 1, 2, 5];
    let mut rr = DeadlineRoundRobin::default();
    let mut smooth = SmoothRoundRobin::default();
    let (mut a, mut b) = ([0u32; 4], [0u32; 4]);
    for _ in 0..(11 * 7) {
        a[rr.pick(4, 1, |i| weights[i], |_| true).expect("a pick")] += 1;
        b[smooth.pick(4, |i| Some(weights[i])).expect("a pick")] += 1;
    }
    assert_eq!(a, b);
}
