//! The live upgrade's batches in a worker (`upgrade/local.rs` drives them).
//!
//! Old side: `Freeze` deregisters relaying sessions (both sockets) and packs them with
//! duplicates of their descriptors; they stay in the slab, whole but frozen: no event, run or
//! timer touches them (a timer that fires meanwhile is held back). `Release` drops them once
//! the new process owns them: their pipes are closed, never pooled, their backend slot and
//! place under the per-IP limits given back, and they leave the active count without being
//! counted as closed. `Resume` registers them again and runs them.
//!
//! New side: `Rebuild` unpacks a batch (not registered, nothing read); `Adopt` counts each
//! session (active, and a slot on its backend), registers it, arms its idle and backend
//! timers and runs it; `Discard` drops what was rebuilt.
//!
//! A session whose backend this worker's set does not list keeps relaying, on a set of its
//! own holding that backend alone, drained: it is counted and seen nowhere (not in the
//! metrics, not by the health thread), and ends on its own. Adopted sessions hold no place
//! under the per-IP limits.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use mio::Interest;
use std::time::Instant;

use super::Worker;
use crate::backend::{BackendSet, BackendState};
use crate::config::BackendSpec;
use crate::session::pack::Adopt;
use crate::session::{CloseReason, Session, Tag};
use crate::stats::Counters;
use crate::timer::{Timer, TimerKind};
use crate::token::Target;
use crate::upgrade::handover::Frozen;
use crate::upgrade::wire::PackedSession;

/// The most descriptors one session takes: two sockets and two pipes.
const MAX_FDS_PER_SESSION: usize = 6;

/// A worker's batches under way.
#[derive(Default)]
pub(super) struct Batches {
    /// Old side: the slab keys of each frozen batch.
    frozen: HashMap<u32, Vec<usize>>,
    /// Old side: every frozen key, for the checks on the hot paths.
    frozen_keys: HashSet<usize>,
    /// Old side: timers of frozen sessions that fired, armed again on resume.
    held_timers: Vec<Timer>,
    /// New side: batches rebuilt and not yet adopted.
    rebuilt: HashMap<u32, Vec<Session>>,
}

impl Batches {
    /// Whether the session at `key` is frozen (nothing may touch it).
    pub(super) fn is_frozen(&self, key: usize) -> bool {
        !self.frozen_keys.is_empty() && self.frozen_keys.contains(&key)
    }

    /// A timer of a frozen session: kept for its resume.
    pub(super) fn hold(&mut self, timer: Timer) {
        self.held_timers.push(timer);
    }
}

impl Worker {
    pub(super) fn freeze(&mut self, id: u32, max_fds: usize) -> Frozen {
        let mut frozen = Frozen {
            sessions: Vec::new(),
            fds: Vec::new(),
        };
        let candidates: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(key, s)| s.state.tag() == Tag::Relaying && !self.batches.is_frozen(*key))
            .map(|(key, _)| key)
            .collect();
        let mut keys = Vec::new();
        let now = Instant::now();
        for key in candidates {
            if frozen.fds.len() + MAX_FDS_PER_SESSION > max_fds {
                break;
            }
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            let Some(index) = session.state.backend() else {
                continue;
            };
            let backend = session.set.backends[index].spec.addr;
            let registry = self.poll.registry();
            let packed = session
                .deregister(registry)
                .and_then(|()| session.pack(backend, now));
            match packed {
                Ok((packed, fds)) => {
                    frozen.sessions.push(packed);
                    frozen.fds.extend(fds);
                    keys.push(key);
                    self.batches.frozen_keys.insert(key);
                }
                Err(e) => {
                    log::warn!("worker {}: session {} not frozen: {e}", self.id, session.id);
                    // It goes on here, registered again.
                    let _ = session.deregister(registry);
                    let registered = session.register(registry, key);
                    if let Err(e) = registered {
                        log::warn!("worker {}: cannot register a session again: {e}", self.id);
                        self.close(key, CloseReason::Exhausted);
                    } else {
                        self.relay(key);
                    }
                }
            }
        }
        if !keys.is_empty() {
            self.batches.frozen.insert(id, keys);
        }
        frozen
    }

    pub(super) fn release_frozen(&mut self, id: u32) {
        let Some(keys) = self.batches.frozen.remove(&id) else {
            return;
        };
        for key in &keys {
            self.batches.frozen_keys.remove(key);
            let Some(mut session) = self.sessions.try_remove(*key) else {
                continue;
            };
            // Pipes with bytes are closed, never pooled (the new process has those bytes).
            session.release(&mut self.pools);
            if let Some(ticket) = session.take_ticket() {
                ticket.close(self.now);
            }
            if let Some(index) = session.state.backend() {
                session.set.backends[index].stats.release();
            }
            Counters::decr(&self.counters.active);
            log::debug!(
                "worker {}: session {} from {} handed over",
                self.id,
                session.id,
                session.client_addr
            );
            // Dropping the duplicates sends nothing: the connections live on over there.
        }
        let gone: HashSet<usize> = keys.into_iter().collect();
        self.batches.held_timers.retain(|t| !gone.contains(&t.key));
    }

    pub(super) fn resume_frozen(&mut self, id: u32) {
        let Some(keys) = self.batches.frozen.remove(&id) else {
            return;
        };
        for &key in &keys {
            self.batches.frozen_keys.remove(&key);
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if let Err(e) = session.register(self.poll.registry(), key) {
                log::warn!("worker {}: cannot register a resumed session: {e}", self.id);
                self.close(key, CloseReason::Exhausted);
                continue;
            }
            self.relay(key);
        }
        let held = std::mem::take(&mut self.batches.held_timers);
        for timer in held {
            if self.batches.is_frozen(timer.key) {
                self.batches.held_timers.push(timer);
            } else {
                self.timers.push(timer);
            }
        }
    }

    pub(super) fn rebuild(
        &mut self,
        id: u32,
        packed: Vec<PackedSession>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        let mut fds = fds.into_iter();
        let mut sessions = Vec::with_capacity(packed.len());
        let now = Instant::now();
        for p in &packed {
            let Some(backend) = p.backend else {
                return Err("a relaying session without its backend".into());
            };
            let (set, index) = self.adoption_set(backend);
            let listener = self
                .listen_addrs
                .iter()
                .position(|l| {
                    l.port() == p.local_addr.port()
                        && (l.ip() == p.local_addr.ip() || l.ip().is_unspecified())
                })
                .unwrap_or(0);
            let adopt = Adopt {
                id: self.next_id,
                listener,
                set,
                index,
                mode: self.config.relay,
            };
            self.next_id += 1;
            let session = Session::unpack(p, &mut fds, adopt, &mut self.pools, now)
                .map_err(|e| format!("session from {} not rebuilt: {e}", p.client_addr))?;
            sessions.push(session);
        }
        if fds.next().is_some() {
            return Err("more descriptors than the sessions name".into());
        }
        self.batches.rebuilt.insert(id, sessions);
        Ok(())
    }

    /// The set and index an adopted session on `backend` is counted under: this worker's set
    /// if it lists the backend, otherwise a set of that backend alone, drained.
    fn adoption_set(&self, backend: std::net::SocketAddr) -> (Arc<BackendSet>, usize) {
        if let Some(index) = self
            .backends
            .backends
            .iter()
            .position(|b| b.spec.addr == backend)
        {
            return (Arc::clone(&self.backends), index);
        }
        let mut own = BackendSet::build(&[BackendSpec::new(backend)], None, self.config.algorithm);
        for b in &mut own.backends {
            b.state = BackendState::Drain;
        }
        (Arc::new(own), 0)
    }

    pub(super) fn adopt(&mut self, id: u32) {
        let Some(sessions) = self.batches.rebuilt.remove(&id) else {
            return;
        };
        self.now = Instant::now();
        for session in sessions {
            Counters::incr(&self.counters.active);
            if let Some(index) = session.state.backend() {
                // Counted, whatever the cap: the session exists already.
                session.set.backends[index].stats.try_acquire(0);
            }
            let (sid, entry) = (session.id, self.sessions.vacant_entry());
            let key = entry.key();
            let session = entry.insert(session);
            if let Err(e) = session.register(self.poll.registry(), key) {
                log::warn!(
                    "worker {}: cannot register an adopted session: {e}",
                    self.id
                );
                self.close(key, CloseReason::Exhausted);
                continue;
            }
            // Fired at once, each timer finds the deadline the session has by now (or closes
            // a session that was already past it).
            if self.rules.idle_timeout.is_some() {
                self.timers.push(Timer {
                    at: self.now,
                    key,
                    id: sid,
                    kind: TimerKind::Idle,
                });
            }
            if self.rules.backend_timeout.is_some() {
                self.timers.push(Timer {
                    at: self.now,
                    key,
                    id: sid,
                    kind: TimerKind::Backend,
                });
            }
            // The old process may not have turned keepalive on yet (it does so once a
            // session is old enough): set it now, at three setsockopt per session handed over.
            if self.rules.keepalive_after.is_some() {
                self.timers.push(Timer {
                    at: self.now,
                    key,
                    id: sid,
                    kind: TimerKind::KeepAlive,
                });
            }
            self.relay(key);
        }
    }

    pub(super) fn discard(&mut self, id: u32) {
        if let Some(sessions) = self.batches.rebuilt.remove(&id) {
            for mut session in sessions {
                // Duplicates: closing them sends nothing; the old process keeps the sessions.
                session.release(&mut self.pools);
            }
        }
    }
}

impl Worker {
    /// Duplicates of the open listeners, with their addresses: the same sockets, for the new
    /// process.
    pub(super) fn listener_copies(&self) -> Vec<(SocketAddr, OwnedFd)> {
        let mut copies = Vec::new();
        for (listener, addr) in self.listeners.iter().zip(&self.listen_addrs) {
            let Some(listener) = listener else { continue };
            match listener.as_fd().try_clone_to_owned() {
                Ok(fd) => copies.push((*addr, fd)),
                Err(e) => log::warn!("worker {}: cannot duplicate a listener: {e}", self.id),
            }
        }
        copies
    }

    /// Stops accepting (the new process accepts from the same sockets) or starts again.
    pub(super) fn set_accepting(&mut self, on: bool) {
        if self.listeners_given != on {
            return;
        }
        self.listeners_given = !on;
        for (i, listener) in self.listeners.iter_mut().enumerate() {
            let Some(listener) = listener else { continue };
            let result = if on {
                self.poll.registry().register(
                    listener,
                    Target::Listener(i).token(),
                    Interest::READABLE,
                )
            } else {
                self.poll.registry().deregister(listener)
            };
            if let Err(e) = result {
                log::warn!("worker {}: listener {i}: {e}", self.id);
            }
        }
        if on {
            // Whatever queued meanwhile is taken at once.
            for ready in &mut self.listener_ready {
                *ready = true;
            }
            self.accept_all();
        }
    }
}
