//! Draining: holdfast's graceful shutdown (take the backlog, close the listeners, let
//! sessions end on their own until the deadline, then close the rest spread out over a
//! window, each with a FIN), a drained backend's spread-out closes, and the final close of
//! everything.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Worker;
use crate::session::{CloseReason, Tag};
use crate::timer::{Timer, TimerKind};

impl Worker {
    /// Stops accepting: everything already in the kernel's accept queue is taken (those
    /// clients connected before the drain began, and are promised service), then each
    /// listener closes, so the kernel refuses new connections or, with SO_REUSEPORT, hands
    /// them to another process on the same port. Taking the queue is bounded only by
    /// descriptors (not by `--max-conns` or the accept batch): a listener whose backlog is
    /// not empty for want of descriptors stays open, and is drained as they free up, until
    /// its backlog is empty or the drain timeout passes.
    pub(super) fn start_drain(&mut self, timeout: Duration, spread: Duration) {
        if self.draining {
            return;
        }
        self.draining = true;
        self.close_spread = spread;
        self.stop_rebalance();
        for ready in &mut self.listener_ready {
            *ready = true;
        }
        self.accept_all();
        self.close_drained_listeners();
        self.timers.push(Timer {
            at: self.now + timeout,
            key: usize::MAX,
            id: u64::MAX,
            kind: TimerKind::DrainDeadline,
        });
    }

    /// During a drain: closes every listener whose backlog has been taken (its last accept
    /// said `WouldBlock`). With none left open, the vectors are emptied.
    pub(super) fn close_drained_listeners(&mut self) {
        for (listener, ready) in self.listeners.iter_mut().zip(&self.listener_ready) {
            if !ready {
                *listener = None;
            }
        }
        if self.listeners.iter().all(Option::is_none) {
            self.listeners.clear();
            self.listener_ready.clear();
        }
    }

    /// The drain timeout passed: a backlog still not taken for want of descriptors is given
    /// up, and the sessions left are closed over `--close-spread`.
    pub(super) fn drain_deadline(&mut self) {
        self.listeners.clear();
        self.listener_ready.clear();
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.state.tag() != Tag::Lingering)
            .map(|(k, _)| k)
            .collect();
        let spread = self.close_spread;
        if !keys.is_empty() {
            log::info!(
                "worker {}: drain timeout; closing {} session(s) over {spread:?}",
                self.id,
                keys.len()
            );
        }
        self.schedule_closes(keys, self.now, spread);
    }

    /// A drained backend's drain timeout passed: its sessions here are closed over `spread`.
    pub(super) fn close_backend(&mut self, service: usize, addr: SocketAddr, spread: Duration) {
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                usize::from(s.service) == service
                    && s.state
                        .backend()
                        .is_some_and(|index| s.set.backends[index].spec.addr == addr)
            })
            .map(|(k, _)| k)
            .collect();
        self.schedule_closes(keys, self.now, spread);
    }

    /// Closes `keys` one by one, oldest first, evenly over `spread` from `from`, so their
    /// clients reconnect at a steady rate rather than all in the same instant. Every worker
    /// spreads its own sessions over the whole window, each shifted by its share of one slot,
    /// so together they close at a steady rate too.
    pub(super) fn schedule_closes(&mut self, keys: Vec<usize>, from: Instant, spread: Duration) {
        let mut sessions: Vec<(u64, usize)> = keys
            .into_iter()
            .filter_map(|k| self.sessions.get(k).map(|s| (s.id, k)))
            .collect();
        sessions.sort_unstable();
        let n = sessions.len().max(1) as f64;
        let shift = self.id as f64 / self.config.workers as f64;
        for (i, (id, key)) in sessions.into_iter().enumerate() {
            self.timers.push(Timer {
                at: from + spread.mul_f64((i as f64 + shift) / n),
                key,
                id,
                kind: TimerKind::DrainClose,
            });
        }
    }

    /// The worker is stopping: every session is closed now, lingering ones too.
    pub(super) fn close_all(&mut self) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, CloseReason::Shutdown);
        }
        self.timers.clear();
    }
}
