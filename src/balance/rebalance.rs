//! Rebalancing long-lived sessions: how many sessions each backend must shed so that every
//! backend holds its weighted share. Pure: the caller passes in each backend's weight,
//! whether it takes new sessions, and how many sessions it holds (all workers together); the
//! worker (`worker/rebalance.rs`) chooses which sessions to close and when.
//!
//! With least-conn and round-robin the excess on each over-loaded backend moves: a backend
//! sheds only when it holds more than its share plus a tolerance (`max(1, 5%)` of the share),
//! and then down to its share (rounded up), never below it. With source-hash the rule is not
//! a count at all: exactly the sessions whose client IP now maps to another backend move
//! ([`moves_by_source`]).

/// One backend as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The weight new sessions see (any scale; only ratios matter). 0 takes no share.
    pub weight: u32,
    /// Takes new sessions (up). A backend that does not (down, drained) neither sheds nor
    /// counts towards the shares: its sessions leave by other means.
    pub eligible: bool,
    /// Sessions it holds now.
    pub sessions: u64,
}

/// Each member's weighted share of the sessions held by eligible members (`None` for one
/// that is not eligible).
pub fn targets(members: &[Member]) -> Vec<Option<f64>> {
    let total: u64 = members
        .iter()
        .filter(|m| m.eligible)
        .map(|m| m.sessions)
        .sum();
    let weights: u64 = members
        .iter()
        .filter(|m| m.eligible)
        .map(|m| u64::from(m.weight))
        .sum();
    members
        .iter()
        .map(|m| {
            m.eligible.then(|| match weights {
                0 => 0.0,
                w => total as f64 * f64::from(m.weight) / w as f64,
            })
        })
        .collect()
}

/// How far above its share a backend may be before it sheds: 5% of the share, at least one
/// session.
pub fn tolerance(target: f64) -> f64 {
    (target * 0.05).max(1.0)
}

/// How many sessions each member must shed: for an eligible member holding more than its
/// share plus the tolerance, down to its share rounded up; 0 for every other.
pub fn excess(members: &[Member]) -> Vec<u64> {
    members
        .iter()
        .zip(targets(members))
        .map(|(m, target)| match target {
            Some(t) if m.sessions as f64 > t + tolerance(t) => {
                m.sessions.saturating_sub(t.ceil() as u64)
            }
            _ => 0,
        })
        .collect()
}

/// Source-hash: whether a session on backend `current` must move, `now` being where its
/// client IP maps in the table today (`None`: no eligible backend, so nowhere to go).
pub fn moves_by_source<T: PartialEq>(current: T, now: Option<T>) -> bool {
    now.is_some_and(|now| now != current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn up(weight: u32, sessions: u64) -> Member {
        Member {
            weight,
            eligible: true,
            sessions,
        }
    }

    #[test]
    fn a_new_backend_takes_a_third_from_two() {
        let plan = excess(&[up(1, 300), up(1, 300), up(1, 0)]);
        assert_eq!(plan, vec![100, 100, 0]);
    }

    #[test]
    fn weights_set_the_shares() {
        // 1:1:2 over 600: 150, 150, 300.
        assert_eq!(
            excess(&[up(1, 300), up(1, 300), up(2, 0)]),
            vec![150, 150, 0]
        );
        assert_eq!(
            targets(&[up(1, 300), up(1, 300), up(2, 0)]),
            vec![Some(150.0), Some(150.0), Some(300.0)]
        );
    }

    #[test]
    fn within_the_tolerance_nothing_moves() {
        // Share 100, tolerance 5: 105 stays, 106 sheds down to 100.
        assert_eq!(excess(&[up(1, 105), up(1, 95)]), vec![0, 0]);
        assert_eq!(excess(&[up(1, 106), up(1, 94)]), vec![6, 0]);
        // Small counts: a tolerance of one session.
        assert_eq!(excess(&[up(1, 2), up(1, 1)]), vec![0, 0]);
        assert_eq!(excess(&[up(1, 3), up(1, 0)]), vec![1, 0]);
    }

    #[test]
    fn backends_that_take_no_sessions_neither_shed_nor_share() {
        let down = Member {
            weight: 1,
            eligible: false,
            sessions: 500,
        };
        assert_eq!(excess(&[down, up(1, 100), up(1, 0)]), vec![0, 50, 0]);
        assert_eq!(targets(&[down])[0], None);
        assert_eq!(excess(&[up(0, 10)]), vec![10], "no weight, no share");
        assert_eq!(excess(&[]), Vec::<u64>::new());
    }

    #[test]
    fn source_hash_moves_only_what_maps_elsewhere() {
        assert!(moves_by_source(1, Some(2)));
        assert!(!moves_by_source(1, Some(1)));
        assert!(!moves_by_source(1, None), "nowhere to go: stays");
    }

    proptest! {
        #[test]
        fn a_plan_never_sheds_below_the_share_and_leaves_no_one_over(
            members in proptest::collection::vec(
                (1u32..=256, any::<bool>(), 0u64..100_000)
                    .prop_map(|(weight, eligible, sessions)| Member { weight, eligible, sessions }),
                0..20,
            )
        ) {
            let plan = excess(&members);
            let targets = targets(&members);
            for ((m, shed), target) in members.iter().zip(&plan).zip(&targets) {
                prop_assert!(*shed <= m.sessions);
                match target {
                    None => prop_assert_eq!(*shed, 0, "an ineligible backend sheds nothing"),
                    Some(t) => {
                        let left = (m.sessions - shed) as f64;
                        if *shed > 0 {
                            prop_assert!(m.sessions as f64 > t + tolerance(*t));
                            prop_assert!(left >= *t, "shed below its share: {left} < {t}");
                            prop_assert!(left < t + 1.0);
                        } else {
                            prop_assert!(left <= t + tolerance(*t));
                        }
                    }
                }
            }
            // What is shed fits on the backends under their share: the reconnects have room.
            let shed: u64 = plan.iter().sum();
            let room: f64 = members
                .iter()
                .zip(&targets)
                .filter_map(|(m, t)| t.map(|t| (t - m.sessions as f64).max(0.0)))
                .sum();
            prop_assert!(shed as f64 <= room + 1e-6 * (1.0 + room));
        }
    }
}
