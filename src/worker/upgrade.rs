//! The live upgrade's batches in a worker (`upgrade/local.rs` drives them).
//!
//! Old side: `Freeze` deregisters queued, connecting and relaying sessions (their sockets)
//! and packs them with duplicates of their descriptors; they stay in the slab, whole but
//! frozen: no event, run, queue scan or timer touches them (a queued one leaves the queue; a
//! timer that fires meanwhile is held back). `Release` drops them once the new process owns
//! them: their pipes are closed, never pooled, their backend slot, place in the queue count
//! and place under the per-IP limits given back, and they leave the active count without
//! being counted as closed. `Resume` registers them again and carries on: a relaying one
//! runs, a connecting one looks at its connect, a queued one goes back to the front of the
//! queue. Sessions still reading a PROXY header (`--accept-proxy`) are not handed over: they
//! finish here, during the drain.
//!
//! Queued sessions go last (a second round over the workers), once every session that holds
//! a backend slot has gone and been counted by the new process (at rebuild), so the new
//! process never hands a queued client a slot that a session still on its way holds.
//!
//! New side: `Rebuild` unpacks a batch (not registered, nothing read) and counts the slots
//! its sessions hold on their backends (given back if discarded); `Adopt` counts each
//! session as active, registers it and carries on where it was: a
//! relaying one gets its idle and backend timers and runs; a connecting one gets its connect
//! timer (the deadline it had) and its connect is looked at, as if the backend socket had
//! become writable (a failure retries on the next backend, its attempt count carried); a
//! queued one joins this worker's queue, behind those waiting already, with its queue timer
//! at the deadline it had (counted in the queue even beyond `--max-queue`: it was admitted
//! already). `Discard` drops what was rebuilt.
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
use std::time::{Duration, Instant};

use super::Worker;
use crate::backend::{BackendSet, BackendState};
use crate::config::BackendSpec;
use crate::session::pack::Adopt;
use crate::session::{CloseReason, Event, Session, Tag};
use crate::stats::Counters;
use crate::timer::{Timer, TimerKind};
use crate::token::Side;
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
    /// New side: batches rebuilt and not yet adopted, each queued or connecting session with
    /// its queue or connect deadline.
    rebuilt: HashMap<u32, Vec<(Session, Instant)>>,
    /// New side: sessions in the batch adopted last.
    adopted_last: u64,
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
    /// Freezes connecting and relaying sessions, and with `queued` queued ones too.
    pub(super) fn freeze(&mut self, id: u32, max_fds: usize, queued: bool) -> Frozen {
        let mut frozen = Frozen {
            sessions: Vec::new(),
            fds: Vec::new(),
        };
        let candidates: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(key, s)| {
                // The second round takes whatever is left, queued or not.
                let wanted = match s.state.tag() {
                    Tag::Queued => queued,
                    Tag::Relaying | Tag::Connecting => true,
                    _ => false,
                };
                wanted && !self.batches.is_frozen(*key)
            })
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
            let registry = self.poll.registry();
            let packed = session.deregister(registry).and_then(|()| {
                let rules = &self.services[usize::from(session.service)].rules;
                session.pack(now, rules.connect_timeout)
            });
            match packed {
                Ok((mut packed, fds)) => {
                    let served = &self.services[usize::from(session.service)];
                    packed.service = served.name.to_string();
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
                        self.carry_on(key);
                    }
                }
            }
        }
        // Queued ones leave the queue: no scan may place a frozen session.
        if !keys.is_empty() {
            let frozen = &self.batches.frozen_keys;
            for served in &mut self.services {
                served.queue.retain(|(key, _)| !frozen.contains(key));
            }
        }
        if !keys.is_empty() {
            self.batches.frozen.insert(id, keys);
        }
        frozen
    }

    /// A session registered again (or adopted) carries on where it was: relaying, it runs;
    /// connecting, its connect is looked at as if the backend socket were writable (a
    /// spurious look costs one `SO_ERROR`; a connect not done yet waits for its event).
    fn carry_on(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        match session.state.tag() {
            Tag::Relaying => self.relay(key),
            Tag::Connecting => {
                let ready = Event::Ready {
                    side: Side::Backend,
                    hung_up: false,
                    plain_writable: false,
                };
                let actions = session.state.on(
                    ready,
                    self.now,
                    &self.services[usize::from(session.service)].rules,
                );
                self.apply(key, actions);
            }
            _ => {}
        }
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
            if session.state.tag() == Tag::Queued {
                count!(self, usize::from(session.service), queued, -);
            }
            // Pipes with bytes are closed, never pooled (the new process has those bytes).
            session.release(&mut self.pools);
            if let Some(ticket) = session.take_ticket() {
                ticket.close(self.now);
            }
            if let Some(index) = session.state.backend() {
                session.set.backends[index].stats.release();
            }
            count!(self, usize::from(session.service), active, -);
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
        let mut requeue = Vec::new();
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
            if session.state.tag() == Tag::Queued {
                requeue.push((usize::from(session.service), (key, session.id)));
            } else {
                self.carry_on(key);
            }
        }
        // Back at the front, in their order: they waited longer than those who came since.
        for (service, entry) in requeue.into_iter().rev() {
            self.services[service].queue.push_front(entry);
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
            let listener = self
                .listen_addrs
                .iter()
                .position(|l| {
                    l.port() == p.local_addr.port()
                        && (l.ip() == p.local_addr.ip() || l.ip().is_unspecified())
                })
                .unwrap_or(0);
            // Its service: the one of the same name here; if none has it (the service is not
            // in this process's configuration), the one listening where it connected; else
            // the first. Its backend, if not in that service's set, is counted under a
            // drained set of its own (see `adoption_set`).
            let by_name = self
                .services
                .iter()
                .position(|s| !s.removed && *s.name == *p.service)
                .and_then(|s| u16::try_from(s).ok());
            let service = by_name
                .or_else(|| self.listener_service.get(listener).copied())
                .unwrap_or(0);
            let s = usize::from(service);
            let (set, index) = match p.backend {
                Some(backend) => self.adoption_set(s, backend),
                None => (Arc::clone(&self.services[s].backends), 0),
            };
            let tried = p
                .tried
                .iter()
                .filter_map(|addr| set.backends.iter().position(|b| b.spec.addr == *addr))
                .collect();
            let adopt = Adopt {
                id: self.next_id,
                listener,
                set,
                index,
                mode: self.services[s].config.relay,
                tried,
            };
            self.next_id += 1;
            let mut session = Session::unpack(p, &mut fds, adopt, &mut self.pools, now)
                .map_err(|e| format!("session from {} not rebuilt: {e}", p.client_addr))?;
            session.service = service;
            // The same instant unpack gave a queued session, which its queue timer must match.
            let deadline = now + Duration::from_millis(p.deadline_in_ms.unwrap_or(0));
            sessions.push((session, deadline));
        }
        if fds.next().is_some() {
            return Err("more descriptors than the sessions name".into());
        }
        // Their backend slots are counted now, whatever the cap (the sessions exist already),
        // not at adoption: a queued session of a later batch, adopted by another worker, must
        // not be given a slot this batch's sessions hold.
        for (session, _) in &sessions {
            if let Some(index) = session.state.backend() {
                session.set.backends[index].stats.try_acquire(0);
            }
        }
        self.batches.rebuilt.insert(id, sessions);
        Ok(())
    }

    /// The set and index an adopted session of `service` on `backend` is counted under: this
    /// worker's set of the service if it lists the backend, otherwise a set of that backend alone, drained.
    fn adoption_set(
        &self,
        service: usize,
        backend: std::net::SocketAddr,
    ) -> (Arc<BackendSet>, usize) {
        let served = &self.services[service];
        if let Some(index) = served
            .backends
            .backends
            .iter()
            .position(|b| b.spec.addr == backend)
        {
            return (Arc::clone(&served.backends), index);
        }
        let mut own =
            BackendSet::build(&[BackendSpec::new(backend)], None, served.config.algorithm);
        for b in &mut own.backends {
            b.state = BackendState::Drain;
        }
        (Arc::new(own), 0)
    }

    /// Also records the batch's pause (since `paused_since`, to its last session's first
    /// run here) in `upgrade_pause_max_us` if it is the longest so far.
    pub(super) fn adopt(&mut self, id: u32, paused_since: Instant) {
        let Some(sessions) = self.batches.rebuilt.remove(&id) else {
            return;
        };
        self.adopt_sessions(sessions);
        let pause = u64::try_from(paused_since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters
            .upgrade_pause_max_us
            .fetch_max(pause, std::sync::atomic::Ordering::Relaxed);
        self.counters.sessions_handed_over.fetch_add(
            self.batches.adopted_last,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn adopt_sessions(&mut self, sessions: Vec<(Session, Instant)>) {
        self.batches.adopted_last = sessions.len() as u64;
        self.now = Instant::now();
        for (session, deadline) in sessions {
            Counters::incr(&self.counters.active);
            if let Some(served) = self.services.get(usize::from(session.service)) {
                Counters::incr(&served.counters.active);
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
            match session.state.tag() {
                Tag::Relaying => {}
                Tag::Connecting => {
                    let attempt = session.state.connect_attempt().unwrap_or(0);
                    self.timers.push(Timer {
                        at: deadline,
                        key,
                        id: sid,
                        kind: TimerKind::Connect { attempt },
                    });
                    self.carry_on(key);
                    continue;
                }
                _ => {
                    // Queued: behind those waiting here already, until the deadline it had.
                    self.timers.push(Timer {
                        at: deadline,
                        key,
                        id: sid,
                        kind: TimerKind::Queue,
                    });
                    count!(self, usize::from(session.service), queued);
                    self.services[usize::from(session.service)]
                        .queue
                        .push_back((key, sid));
                    continue;
                }
            }
            // Fired at once, each timer finds the deadline the session has by now (or closes
            // a session that was already past it).
            let rules = &self.services[usize::from(session.service)].rules;
            let (idle, backend) = (rules.idle_timeout, rules.backend_timeout);
            if idle.is_some() {
                self.timers.push(Timer {
                    at: self.now,
                    key,
                    id: sid,
                    kind: TimerKind::Idle,
                });
            }
            if backend.is_some() {
                self.timers.push(Timer {
                    at: self.now,
                    key,
                    id: sid,
                    kind: TimerKind::Backend,
                });
            }
            // The old process may not have turned keepalive on yet (it does so once a
            // session is old enough): set it now, at three setsockopt per session handed over.
            let service = self
                .sessions
                .get(key)
                .map_or(0, |session| usize::from(session.service));
            if self
                .services
                .get(service)
                .is_some_and(|served| served.rules.keepalive_after.is_some())
            {
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
            for (mut session, _) in sessions {
                // Duplicates: closing them sends nothing; the old process keeps the sessions.
                session.release(&mut self.pools);
                if let Some(index) = session.state.backend() {
                    session.set.backends[index].stats.release();
                }
            }
        }
    }
}

impl Worker {
    /// Duplicates of the open listeners, with their addresses: the same sockets, for the new
    /// process.
    pub(super) fn listener_copies(&self) -> Vec<(String, SocketAddr, OwnedFd)> {
        let mut copies = Vec::new();
        for (i, (listener, addr)) in self.listeners.iter().zip(&self.listen_addrs).enumerate() {
            let Some(listener) = listener else { continue };
            let service = self
                .listener_service
                .get(i)
                .and_then(|&s| self.services.get(usize::from(s)))
                .map_or_else(String::new, |s| s.name.to_string());
            match listener.as_fd().try_clone_to_owned() {
                Ok(fd) => copies.push((service, *addr, fd)),
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
