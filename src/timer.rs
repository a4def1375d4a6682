//! A worker's timers: connect, idle and queue timeouts.
//!
//! A min-heap of deadlines, each naming a session by slab key *and* session id, so an entry
//! for a session that has since closed (and whose slab slot may be reused) is recognised as
//! stale and ignored. Nothing is ever removed early: cancelling is free, and a stale entry
//! costs one pop.
//!
//! Idle timeouts are lazy, as in the kernel's keepalive: a session records when it last moved
//! a byte, and its single timer entry, when it fires, either closes the session or is pushed
//! back to `last_activity + idle`. A busy connection therefore costs no timer work per byte,
//! only one heap operation per idle period.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The backend connect of this attempt has taken too long.
    Connect { attempt: u32 },
    /// Check whether the session has been idle for the idle timeout.
    Idle,
    /// The client has waited in the queue for the queue timeout.
    Queue,
    /// The worker's drain timeout passed: close what is left over `spread` (not a session's
    /// timer: its key and id are unused).
    DrainDeadline { spread: Duration },
    /// Close this session as part of a spread-out drain.
    DrainClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at: Instant,
    pub key: usize,
    pub id: u64,
    pub kind: TimerKind,
}

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
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
}
