//! A worker's timers: each session's connect, idle, backend and queue timeouts, its
//! spread-out drain close and its lingering looks, plus the worker's own drain deadline.
//!
//! A min-heap of deadlines, each naming a session by slab key *and* session id, so an entry
//! for a session that has since closed (and whose slab slot may be reused) is recognised as
//! stale and ignored. Nothing is removed one by one: cancelling is free, and a stale entry
//! costs one pop. An entry for a live session that no longer applies (a connect timer of an
//! earlier attempt, a queue timer of an earlier stay) is told apart by the session's state
//! (`session/state.rs`), which ignores it. But a closed session's idle entry would otherwise
//! stay for the whole idle timeout (an hour by default): at 10,000 short connections a second
//! that is 36 million entries, 2 GB. So when the heap has doubled since it was last
//! compacted, the worker drops every stale entry in one O(n) pass ([`Timers::compact`]), which
//! costs O(1) per push amortized and keeps the heap within twice its live size (or
//! [`COMPACT_MIN`]).
//!
//! The idle and backend timeouts are lazy, as in the kernel's keepalive: a session records
//! when it last moved a byte (`last_active`) and, with `--backend-timeout`, since when the
//! client's bytes are unanswered; its single entry of each kind, when it fires, either closes
//! the session or is pushed back to the deadline it has by then. A busy connection therefore
//! costs no timer work per byte, only one heap operation per idle period.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The backend connect of this attempt has taken too long.
    Connect { attempt: u32 },
    /// Check whether the session has been idle for the idle timeout.
    Idle,
    /// Check whether the backend has left the client's bytes unanswered for the backend
    /// timeout.
    Backend,
    /// The client has waited in the queue for the queue timeout.
    Queue,
    /// The worker's drain timeout passed: close what is left over `--close-spread` (not a
    /// session's timer: its key and id are unused).
    DrainDeadline,
    /// Close this session as part of a spread-out drain.
    DrainClose,
    /// The drain timeout of a service removed by a reload passed: close what is left of it
    /// over `--close-spread` (not a session's timer: its id is the service's number).
    ServiceDeadline,
    /// The session reached `--max-session-age` (with its jitter): close it gently.
    MaxAge,
    /// The worker's next look at the rebalance under way (not a session's timer: its id is
    /// the rebalance's generation).
    RebalanceTick,
    /// Look again whether a lingering session's sockets can be closed.
    Linger,
    /// The client's PROXY header has taken `--proxy-header-timeout`.
    Header,
    /// The session has relayed long enough to need TCP keepalive on its backend socket.
    KeepAlive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at: Instant,
    pub key: usize,
    pub id: u64,
    pub kind: TimerKind,
}

/// Below this many entries the heap is never compacted (a few hundred KB at most).
pub const COMPACT_MIN: usize = 4096;

#[derive(Debug)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
    /// The size at which the next compaction is due.
    compact_at: usize,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            heap: BinaryHeap::new(),
            compact_at: COMPACT_MIN,
        }
    }
}

impl Timers {
    pub fn push(&mut self, timer: Timer) {
        self.heap.push(Reverse(timer));
    }

    /// How long the event loop may sleep before the next deadline.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse(t)| t.at.saturating_duration_since(now))
    }

    /// The earliest timer whose deadline has passed, if any.
    pub fn pop_expired(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse(t)) if t.at <= now => self.heap.pop().map(|Reverse(t)| t),
            _ => None,
        }
    }

    pub fn clear(&mut self) {
        self.heap.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether the heap has grown enough since the last compaction to call [`Timers::compact`].
    pub fn needs_compaction(&self) -> bool {
        self.heap.len() >= self.compact_at
    }

    /// Keeps only the entries `live` accepts, and sets the next compaction at twice what is
    /// left (at least [`COMPACT_MIN`]).
    pub fn compact(&mut self, mut live: impl FnMut(&Timer) -> bool) {
        self.heap.retain(|Reverse(t)| live(t));
        self.compact_at = (2 * self.heap.len()).max(COMPACT_MIN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_deadline_order() {
        let now = Instant::now();
        let mut timers = Timers::default();
        for (ms, key) in [(30, 3), (10, 1), (20, 2)] {
            timers.push(Timer {
                at: now + Duration::from_millis(ms),
                key,
                id: key as u64,
                kind: TimerKind::Idle,
            });
        }
        assert_eq!(timers.next_timeout(now), Some(Duration::from_millis(10)));
        assert!(timers.pop_expired(now).is_none());
        let later = now + Duration::from_millis(25);
        assert_eq!(timers.pop_expired(later).map(|t| t.key), Some(1));
        assert_eq!(timers.pop_expired(later).map(|t| t.key), Some(2));
        assert!(timers.pop_expired(later).is_none());
        assert_eq!(timers.next_timeout(later), Some(Duration::from_millis(5)));
    }

    /// Short sessions that each leave a long idle entry behind: compacting whenever it is due
    /// keeps the heap within twice the live entries, does so a logarithmic number of times
    /// when the live set grows, keeps every live entry and still fires in deadline order.
    #[test]
    fn compaction_bounds_stale_entries() {
        let now = Instant::now();
        let mut timers = Timers::default();
        let idle = |key: usize, id: u64| Timer {
            at: now + Duration::from_secs(3600) + Duration::from_millis(id),
            key,
            id,
            kind: TimerKind::Idle,
        };
        // 10 live sessions (ids 0..10) and a stream of closed ones (ids >= 10).
        let live = |t: &Timer| t.id < 10;
        for id in 0..10 {
            timers.push(idle(id as usize, id));
        }
        let mut compactions = 0;
        let mut peak = 0;
        for id in 10..1_000_000u64 {
            timers.push(idle(id as usize, id));
            peak = peak.max(timers.len());
            if timers.needs_compaction() {
                timers.compact(live);
                compactions += 1;
                assert_eq!(timers.len(), 10);
            }
        }
        assert!(peak <= COMPACT_MIN, "peak {peak}");
        assert!(compactions >= 1_000_000 / COMPACT_MIN - 1, "{compactions}");

        // A growing live set: compactions happen at doublings, not on every push.
        let mut timers = Timers::default();
        let mut compactions = 0;
        for id in 0..100_000u64 {
            timers.push(idle(id as usize, id));
            if timers.needs_compaction() {
                timers.compact(|_| true);
                compactions += 1;
            }
        }
        assert_eq!(timers.len(), 100_000);
        assert!(compactions <= 6, "{compactions} compactions");
        let later = now + Duration::from_secs(7200);
        let fired: Vec<u64> = std::iter::from_fn(|| timers.pop_expired(later).map(|t| t.id))
            .take(5)
            .collect();
        assert_eq!(fired, [0, 1, 2, 3, 4]);
    }
}
