//! Rebalancing long-lived sessions after a scale-out, and `--max-session-age`.
//!
//! A rebalance (`Control::Rebalance`: a backend joined or came back up with
//! `--rebalance-on-join`, or `POST /rebalance`) has a generation, a start and a window. Every
//! worker carries out its part on its own sessions, but the plan and the pace are global:
//!
//! - **the plan** is made again at every look (every [`TICK`]) from the shared per-backend
//!   session counts and the worker's current backend set (`balance::rebalance`), so it
//!   follows reconnects, other workers' closes and backend changes as they happen. With
//!   least-conn and round-robin a backend above its weighted share plus the tolerance sheds
//!   down to its share, its sessions chosen at random; with source-hash exactly the sessions
//!   whose client IP now maps to another (eligible) backend move;
//! - **the pace**: what is left is spread evenly over what is left of the window, never
//!   faster than `--rebalance-max-rate` closes a second for all workers together (one rate
//!   limiter shared by every worker, in
//!   [`RebalanceStatus`](crate::stats::RebalanceStatus)).
//!
//! Only sessions that were relaying when the rebalance started are candidates, so a client
//! it closed reconnects as a new session that the same rebalance never picks. A session is
//! closed as a drain closes it (`CloseReason::Rebalance` ends with a FIN on both sides, the
//! backend's first), and the client's reconnect is placed as usual. A worker's part ends
//! when nothing is left to move, when the window ends, when a newer rebalance replaces it,
//! or when holdfast drains.
//!
//! `--max-session-age`: each session gets a timer at its age limit, moved by up to ±10% at
//! random so that sessions opened together do not close together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Worker;
use crate::backend::BackendSet;
use crate::balance::rebalance::{self, Member};
use crate::config::Algorithm;
use crate::plane::RebalanceStart;
use crate::session::{CloseReason, Tag};
use crate::timer::{Timer, TimerKind};

/// How often a worker looks at the rebalance under way; also the burst the close-rate limiter
/// allows, so each look may close what a tick's worth of the rate allows.
const TICK: Duration = Duration::from_millis(50);

/// The most a look that comes late (a busy machine) may catch up on: what is left is paced
/// anew at each look, but a short window would otherwise end with sessions unmoved.
const MAX_CATCH_UP: Duration = Duration::from_millis(250);

/// This worker's part of a rebalance.
#[derive(Debug)]
pub(super) struct Rebalancing {
    generation: u64,
    /// The service whose sessions it moves.
    service: usize,
    /// Sessions opened from then on are never candidates.
    started: Instant,
    deadline: Instant,
    /// The closes are spread so as to be done by then.
    paced_until: Instant,
    /// This worker's last look.
    last_look: Instant,
}

impl Worker {
    /// Takes part in rebalance `generation`, which started at `started` and ends at
    /// `deadline` (replacing any older one).
    pub(super) fn start_rebalance(&mut self, service: usize, start: RebalanceStart) {
        let RebalanceStart {
            generation,
            started,
            deadline,
        } = start;
        // A message older than one already taken (two senders: the health thread and the
        // handle) is ignored.
        if self.draining
            || self
                .rebalance
                .as_ref()
                .is_some_and(|r| r.generation >= generation)
            || service >= self.services.len()
        {
            return;
        }
        let by_source = self.services[service].config.algorithm == Algorithm::SourceHash;
        self.counters
            .rebalance
            .begin(generation, deadline, by_source, self.config.workers);
        self.rebalance = Some(Rebalancing {
            generation,
            service,
            started,
            deadline,
            // The last tenth of the window is slack, for a machine too busy to keep pace.
            paced_until: deadline - deadline.saturating_duration_since(started) / 10,
            last_look: self.now,
        });
        self.rebalance_tick(generation);
    }

    /// Stops this worker's part (its window ended, or holdfast drains: the drain takes over).
    /// What it last saw left stays in the status.
    pub(super) fn stop_rebalance(&mut self) {
        if let Some(r) = self.rebalance.take()
            && self.counters.rebalance.is_current(r.generation)
        {
            self.counters.rebalance.end();
        }
    }

    /// A look at the rebalance: plan again, close what the pace allows now, look again
    /// soon (or stop).
    pub(super) fn rebalance_tick(&mut self, generation: u64) {
        let Some(r) = self
            .rebalance
            .as_ref()
            .filter(|r| r.generation == generation)
        else {
            return; // a look armed for an older rebalance
        };
        let status = &self.counters.rebalance;
        if !status.is_current(generation) {
            self.rebalance = None;
            return;
        }
        if self.now >= r.deadline {
            log::info!(
                "worker {}: rebalance window ended; {} session(s) still over their share",
                self.id,
                status.snapshot(self.now).left.unwrap_or(0)
            );
            self.stop_rebalance();
            return;
        }
        let (service, started, deadline, paced_until) =
            (r.service, r.started, r.deadline, r.paced_until);
        let burst = self
            .now
            .saturating_duration_since(r.last_look)
            .clamp(TICK, MAX_CATCH_UP);
        let config = Arc::clone(&self.services[service].config);
        let set = Arc::clone(&self.services[service].backends);
        let by_source = config.algorithm == Algorithm::SourceHash;
        let mut candidates = self.candidates(service, &set, started, by_source);
        let mine_left = if by_source {
            candidates.len() as u64
        } else {
            plan(&set).iter().sum()
        };
        let left = status.set_left(self.id, mine_left);
        if left == Some(0) {
            log::info!("worker {}: rebalance done", self.id);
            self.counters.rebalance.end();
            self.rebalance = None;
            return;
        }
        if mine_left == 0 && by_source {
            // Nothing of ours moves; the other workers finish theirs.
            self.rebalance = None;
            return;
        }
        // What is left, spread over what is left of the window, within the global cap.
        let remaining = paced_until.saturating_duration_since(self.now).max(TICK);
        let mut total_left = left.unwrap_or(mine_left).max(1) as f64;
        if config.algorithm == Algorithm::RoundRobin {
            // Round-robin sends a reconnect anywhere by weight, over-loaded backends too: it
            // takes this many closes for one to land where there is room.
            total_left *= round_robin_closes_per_move(&set);
        }
        let rate = (total_left / remaining.as_secs_f64()).min(f64::from(config.rebalance_max_rate));
        let mut excess = if by_source { Vec::new() } else { plan(&set) };
        while !candidates.is_empty() {
            let pick = (self.rebalance_rng.next() % candidates.len() as u64) as usize;
            let (key, index) = candidates.swap_remove(pick);
            if !by_source {
                // Other workers close too: the plan is made again from the shared counts
                // before each close, so together they never go below a share.
                if excess.get(index).is_none_or(|&e| e == 0) {
                    continue;
                }
            }
            if !self.counters.rebalance.try_close(self.now, rate, burst) {
                break;
            }
            set.backends[index].stats.record_rebalance_close();
            self.counters.rebalance.count_close();
            self.close(key, CloseReason::Rebalance);
            if !by_source {
                excess = plan(&set);
            }
        }
        if let Some(r) = self.rebalance.as_mut() {
            r.last_look = self.now;
        }
        self.timers.push(Timer {
            at: (self.now + TICK).min(deadline),
            key: usize::MAX,
            id: generation,
            kind: TimerKind::RebalanceTick,
        });
    }

    /// This worker's sessions that may be closed: relaying since before the rebalance
    /// started, on a backend of `set` that must shed (least-conn, round-robin) or whose
    /// client IP now maps elsewhere (source-hash). With the index of their backend in `set`.
    fn candidates(
        &self,
        service: usize,
        set: &BackendSet,
        started: Instant,
        by_source: bool,
    ) -> Vec<(usize, usize)> {
        let shedding = if by_source {
            Vec::new()
        } else {
            plan(set).into_iter().map(|e| e > 0).collect()
        };
        let index_of: HashMap<SocketAddr, usize> = set
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.spec.addr, i))
            .collect();
        let mut out = Vec::new();
        for (key, session) in &self.sessions {
            if session.started >= started
                || usize::from(session.service) != service
                || session.state.tag() != Tag::Relaying
                || self.batches.is_frozen(key)
            {
                continue;
            }
            let Some(addr) = session
                .state
                .backend()
                .and_then(|i| session.set.backends.get(i))
                .map(|b| b.spec.addr)
            else {
                continue;
            };
            let Some(&index) = index_of.get(&addr) else {
                continue; // its backend was removed: it leaves with it
            };
            let moves = if by_source {
                let now = set.pick_by_source(session.client_addr.ip(), |_| false);
                rebalance::moves_by_source(index, now)
            } else {
                shedding.get(index).copied().unwrap_or(false)
            };
            if moves {
                out.push((key, index));
            }
        }
        out
    }

    /// `--max-session-age` of service `service`: the session at `key` (id `id`, opened now) closes at its age
    /// limit, moved by up to ±10% at random.
    pub(super) fn arm_max_age(&mut self, service: usize, key: usize, id: u64) {
        if let Some(age) = self.services[service].config.max_session_age {
            // The clock now, not the turn's: a turn that accepts hundreds of clients takes
            // long enough that a session would otherwise close before its age.
            if let Some(at) = Instant::now().checked_add(jittered(age, self.rebalance_rng.next())) {
                self.timers.push(Timer {
                    at,
                    key,
                    id,
                    kind: TimerKind::MaxAge,
                });
            }
        }
    }
}

/// Each backend of `set` as the rebalancing arithmetic sees it: its effective weight, whether
/// new sessions may reach it, and its sessions from the shared counts.
fn members(set: &BackendSet) -> Vec<Member> {
    set.backends
        .iter()
        .enumerate()
        .map(|(i, b)| Member {
            weight: b.effective_weight,
            eligible: set.is_eligible(i),
            sessions: b.stats.active(),
        })
        .collect()
}

/// How many sessions each backend of `set` must shed, from the shared session counts.
fn plan(set: &BackendSet) -> Vec<u64> {
    rebalance::excess(&members(set))
}

/// Round-robin: how many closes it takes, on average, for one reconnect to land on a backend
/// below its share (the weights of all over those of the backends below their share).
fn round_robin_closes_per_move(set: &BackendSet) -> f64 {
    let members = members(set);
    let (mut all, mut below) = (0.0, 0.0);
    for (m, target) in members.iter().zip(rebalance::targets(&members)) {
        if let Some(t) = target {
            all += f64::from(m.weight);
            if (m.sessions as f64) < t {
                below += f64::from(m.weight);
            }
        }
    }
    if below > 0.0 {
        (all / below).min(100.0)
    } else {
        1.0
    }
}

/// `age` moved by a random amount within ±10%, from `random`.
fn jittered(age: Duration, random: u64) -> Duration {
    let unit = (random >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    age.mul_f64(0.9 + 0.2 * unit)
}

/// A small random generator (xorshift64*) for choosing victims and jitter: no dependency,
/// and nothing here needs more than "not the same clients every time".
#[derive(Debug)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Seeds a worker's generator from the clock and its id.
pub(super) fn seed(id: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ ((id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads() {
        let age = Duration::from_secs(100);
        let mut rng = Rng::new(7);
        let ages: Vec<Duration> = (0..10_000).map(|_| jittered(age, rng.next())).collect();
        assert!(
            ages.iter()
                .all(|a| *a >= Duration::from_secs(90) && *a < Duration::from_secs(110))
        );
        let (lo, hi) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(
            *lo < Duration::from_secs(91) && *hi > Duration::from_secs(109),
            "{lo:?} {hi:?}"
        );
        assert_eq!(jittered(age, 0), Duration::from_secs(90));
    }
}
