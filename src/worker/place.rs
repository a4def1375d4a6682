//! Placing a client: pick a backend with room, start a non-blocking connect, retry on the
//! next candidate when one fails at once, and queue the client when every eligible backend
//! is full (or no descriptor is free for a backend socket) until one has room or its queue
//! timeout passes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::Worker;
use super::accept::Spare;
use crate::backend::{Backend, BackendSet, Failure, RateLimit};
use crate::balance::Picker;
use crate::config::{Algorithm, Config};
use crate::plane::{Command, HealthLink};
use crate::session::{CloseReason, Event, Tag};
use crate::stats::{Counters, ServiceCounters};
use crate::sys::is_resource_exhaustion;
use crate::token::{Side, Target};

/// How often a worker with queued clients looks for room. Room can appear in another worker
/// (a session closes there) or with time (rate tokens), neither of which wakes this one.
pub(super) const QUEUE_RECHECK: Duration = Duration::from_millis(5);
/// Most queued clients one turn tries to place.
const QUEUE_SCAN: usize = 256;
/// Below this many entries the queue is never compacted.
pub(super) const QUEUE_COMPACT_MIN: usize = 1024;

/// Why no backend connect could be started.
#[derive(Debug)]
pub(super) enum NoConnect {
    /// No eligible backend is left to try.
    NoBackend,
    /// Eligible backends exist, but none has room now (connection cap or rate limit).
    Full,
    /// This process is out of descriptors or memory.
    Exhausted(io::Error),
}

/// Where a client went when the worker tried to place it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    Connecting,
    /// Waiting in the queue (or closed, if the queue was full). `starved`: for want of a
    /// descriptor rather than of a backend with room.
    Waiting {
        starved: bool,
    },
    Closed,
}

/// The worker's backend choice and connects: the algorithm, the limits, and the failure
/// counting that feeds passive health detection. Its own struct so that it can be borrowed
/// beside the session being placed.
pub(super) struct Placer {
    picker: Picker,
    rate: Option<RateLimit>,
    config: Arc<Config>,
    counters: Arc<Counters>,
    /// The service's own counters.
    own: Arc<ServiceCounters>,
    health: HealthLink,
}

impl Placer {
    pub(super) fn new(
        worker: usize,
        config: Arc<Config>,
        counters: Arc<Counters>,
        own: Arc<ServiceCounters>,
        health: HealthLink,
    ) -> Placer {
        Placer {
            picker: Picker::new(config.algorithm, worker),
            rate: RateLimit::new(config.limits.max_connect_rate),
            config,
            counters,
            own,
            health,
        }
    }

    /// The set moved backends to other places: round-robin starts a fresh rotation.
    pub(super) fn reset(&mut self) {
        self.picker.reset();
    }

    /// Picks the next candidate and starts a non-blocking connect to it. `tried` lists the
    /// backends that already failed for this client; one whose connect fails at once is
    /// added.
    ///
    /// A backend at `--max-conns-per-backend` or out of `--max-connect-rate` tokens is passed
    /// over (for source-hash, the client waits for its own backend instead: `Full`). A connect
    /// that fails at once counts as a failed attempt and the next candidate is tried, within
    /// `--retries`. Running out of local descriptors or memory is not the backend's fault: it
    /// is not counted against the backend. The chosen backend's active count is raised here,
    /// so least-conn in every worker sees it before the connect ends. `spare`, the descriptor
    /// held in reserve, is given up just before the socket is made.
    fn connect_next(
        &mut self,
        set: &BackendSet,
        ip: IpAddr,
        tried: &mut Vec<usize>,
        spare: &mut Option<Spare>,
    ) -> Result<(usize, TcpStream), NoConnect> {
        let max = self.config.limits.max_conns_per_backend;
        let retries = self.config.retries as usize;
        let sticky = self.config.algorithm == Algorithm::SourceHash;
        // Backends without room right now; allocated only when one is found.
        let mut full: Vec<usize> = Vec::new();
        while tried.len() <= retries {
            let Some(index) = self.picker.pick(set, ip, |i| {
                tried.contains(&i)
                    || full.contains(&i)
                    || (!sticky && set.backends[i].stats.is_full(max))
            }) else {
                break;
            };
            let backend = &set.backends[index];
            if !backend.stats.try_acquire(max) {
                full.push(index);
                if sticky {
                    break;
                }
                continue;
            }
            // A fresh clock, not the turn's cached one: a long turn would otherwise release
            // tokens against a stale time and let connects bunch up.
            if let Some(limit) = &self.rate
                && backend.stats.try_rate(Instant::now(), limit).is_err()
            {
                backend.stats.release();
                full.push(index);
                if sticky {
                    break;
                }
                continue;
            }
            // The reserved descriptor is the backend socket when the family matches; else it
            // is given up just before the socket is made, so the socket gets its number (the
            // lowest free one) unless another thread takes it in between; then the client
            // waits for descriptors instead of being closed.
            match connect_from(spare.take(), backend.spec.addr) {
                Ok(stream) => return Ok((index, stream)),
                Err(e) if is_resource_exhaustion(&e) => {
                    backend.stats.release();
                    return Err(NoConnect::Exhausted(e));
                }
                Err(e) => {
                    log::debug!("connect to {} failed at once: {e}", backend.spec.addr);
                    backend.stats.release();
                    self.backend_failed(backend, Failure::Connect);
                    tried.push(index);
                }
            }
        }
        let no_room = !full.is_empty()
            || (max > 0
                && (0..set.len()).any(|i| {
                    set.is_eligible(i) && !tried.contains(&i) && set.backends[i].stats.is_full(max)
                }));
        if no_room && tried.len() <= retries {
            Err(NoConnect::Full)
        } else {
            Err(NoConnect::NoBackend)
        }
    }

    /// Counts a failure against a backend, and tells the health thread when it is the one that
    /// makes `--observe-errors` consecutive failures.
    pub(super) fn backend_failed(&self, backend: &Backend, failure: Failure) {
        if failure == Failure::Connect {
            Counters::incr(&self.counters.connect_failures);
            Counters::incr(&self.own.connect_failures);
        }
        let consecutive = backend.stats.record_failure(failure);
        let threshold = u64::from(self.config.health.observe_errors);
        if threshold > 0 && consecutive == threshold {
            self.health.send(Command::Failing(backend.spec.addr));
        }
    }
}

impl Worker {
    /// Finds a placing session a backend and starts connecting to it; with no room it waits
    /// in the queue, with no backend left it is closed.
    pub(super) fn place(&mut self, key: usize) -> Placement {
        let now = self.now;
        let Some(session) = self.sessions.get_mut(key) else {
            return Placement::Closed;
        };
        let Some(tried) = session.state.tried_mut() else {
            return Placement::Closed; // not placing: cannot happen
        };
        let ip = session.client_addr.ip();
        let service = usize::from(session.service);
        let connect =
            self.services[service]
                .placer
                .connect_next(&session.set, ip, tried, &mut self.spare);
        let (event, placement) = match connect {
            Ok((index, mut socket)) => {
                let registered = self.poll.registry().register(
                    &mut socket,
                    Target::Session(key, Side::Backend).token(),
                    Interest::READABLE | Interest::WRITABLE,
                );
                session.attach_backend(socket);
                let actions = session.state.on(
                    Event::ConnectStarted { index },
                    now,
                    &self.services[usize::from(session.service)].rules,
                );
                if let Err(e) = registered {
                    log::warn!("worker {}: cannot register backend socket: {e}", self.id);
                    self.close(key, CloseReason::Exhausted);
                    return Placement::Closed;
                }
                self.apply(key, actions);
                return Placement::Connecting;
            }
            Err(NoConnect::Full) => (Event::NoRoom, Placement::Waiting { starved: false }),
            // Out of descriptors for the backend socket: the client waits, like a client
            // waiting for room (closing it, with its request unread, would reset it).
            Err(NoConnect::Exhausted(e)) => {
                Counters::incr(&self.counters.accept_errors);
                self.resources_exhausted(e);
                (Event::NoRoom, Placement::Waiting { starved: true })
            }
            Err(NoConnect::NoBackend) => {
                let client_addr = session.client_addr;
                count!(self, service, no_backend);
                self.no_backend(client_addr);
                (Event::NoBackend, Placement::Closed)
            }
        };
        if let Some(session) = self.sessions.get_mut(key) {
            let actions = session.state.on(
                event,
                now,
                &self.services[usize::from(session.service)].rules,
            );
            self.apply(key, actions);
        }
        placement
    }

    fn no_backend(&mut self, client_addr: SocketAddr) {
        if let Some(suppressed) = self.no_backend_log.allow(self.now) {
            log::warn!(
                "no backend available for client {client_addr}; closing it \
                 ({suppressed} similar messages suppressed)"
            );
        }
    }

    /// No backend has room: the client waits (it costs its socket and nothing else) until one
    /// has, or until the queue timeout. A full queue closes the client at once.
    pub(super) fn enqueue(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let service = usize::from(session.service);
        let max = self.services[service].config.limits.max_queue as u64;
        let admitted = self
            .counters
            .queued
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        if !admitted {
            count!(self, service, queue_full);
            if let Some(suppressed) = self.queue_log.allow(self.now) {
                log::warn!(
                    "queue full ({max} clients waiting); closing client {} \
                     ({suppressed} similar messages suppressed)",
                    session.client_addr
                );
            }
            self.close(key, CloseReason::NoBackend);
            return;
        }
        let actions = session.state.on(
            Event::Admitted,
            self.now,
            &self.services[usize::from(session.service)].rules,
        );
        Counters::incr(&self.counters.queued_total);
        let served = &mut self.services[service];
        Counters::incr(&served.counters.queued_total);
        Counters::incr(&served.counters.queued);
        served.queue.push_back((key, session.id));
        if served.queue.len() >= served.queue_compact_at {
            // Entries of clients that left while waiting stay until the scan reaches them;
            // behind a client that waits long they could pile up. Drop them in one pass
            // whenever the queue has doubled since the last one.
            let sessions = &self.sessions;
            served.queue.retain(|&(k, id)| {
                sessions
                    .get(k)
                    .is_some_and(|s| s.id == id && s.state.tag() == Tag::Queued)
            });
            served.queue_compact_at = (2 * served.queue.len()).max(QUEUE_COMPACT_MIN);
        }
        self.apply(key, actions);
    }

    /// Places waiting clients, oldest first, while backends have room. With source-hash each
    /// client waits for its own backend, so one blocked client must not hold up the others:
    /// the whole queue is tried (up to a bound per turn). Otherwise, once the oldest finds no
    /// room, nobody behind it would.
    pub(super) fn service_queue(&mut self) {
        for service in 0..self.services.len() {
            if !self.services[service].queue.is_empty() {
                self.service_queue_of(service);
            }
        }
    }

    /// [`Worker::service_queue`] for one service's queue.
    fn service_queue_of(&mut self, service: usize) {
        let sticky = self.services[service].config.algorithm == Algorithm::SourceHash;
        let mut budget = self.services[service].queue.len().min(QUEUE_SCAN);
        while budget > 0 {
            budget -= 1;
            let Some((key, id)) = self.services[service].queue.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.id != id || session.state.tag() != Tag::Queued {
                continue; // closed while waiting, and the key reused
            }
            // Out of the queue while it tries (back in, same place, same deadline, if there
            // is no room), picking from the current set.
            let current = &self.services[service].backends;
            let fresh = !session.set.same_places(current);
            session.set = Arc::clone(current);
            let actions = session.state.on(
                Event::Dequeued { fresh },
                self.now,
                &self.services[usize::from(session.service)].rules,
            );
            self.apply(key, actions);
            let starved = match self.place(key) {
                Placement::Waiting { starved } => starved,
                Placement::Connecting | Placement::Closed => continue,
            };
            if sticky && !starved {
                self.services[service].queue.push_back((key, id));
            } else {
                // No room for it, so none for those behind it; or no descriptor for anyone.
                self.services[service].queue.push_front((key, id));
                break;
            }
        }
    }
}

/// Starts a non-blocking connect to `addr` on the reserved socket if its family is `addr`'s,
/// else on a new socket (the reserve closed first).
fn connect_from(spare: Option<Spare>, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match spare {
        Some(spare) if spare.v6 == addr.is_ipv6() => spare.socket,
        other => {
            drop(other);
            return TcpStream::connect(addr);
        }
    };
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
}
