//! Accepting clients: a batch per listener per turn, a slot under `--max-conns` reserved
//! before each accept, a descriptor held in reserve for each client's backend socket, and a
//! pause when descriptors or memory run out.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mio::Interest;
use mio::net::TcpStream;
use socket2::SockRef;

use super::Worker;
use crate::client_ip::{Refusal, Ticket};
use crate::listener::tune_socket;
use crate::session::{Event, Session};
use crate::stats::Counters;
use crate::sys::{self, is_resource_exhaustion};
use crate::token::{Side, Target};

/// Most connections accepted from one listener in one turn.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM before it is tried again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a worker at `--max-conns` looks again whether there is room.
pub(super) const MAX_CONNS_RECHECK: Duration = Duration::from_millis(20);

impl Worker {
    pub(super) fn at_max_conns(&self) -> bool {
        self.config.max_conns > 0
            && self.counters.active.load(Relaxed) >= self.config.max_conns as u64
    }

    /// Reserves a slot under `--max-conns` before accepting, so workers together never
    /// exceed it. Without a cap it only counts; so does a drain, which takes the clients
    /// already in the backlog whatever the cap (they connected before it began, and it
    /// promises to serve them), so the cap may be exceeded by at most the backlog.
    fn reserve_slot(&self) -> bool {
        let max = self.config.max_conns as u64;
        if max == 0 || self.draining {
            Counters::incr(&self.counters.active);
            return true;
        }
        self.counters
            .active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    pub(super) fn accept_all(&mut self) {
        if self.listeners_given {
            // The new process accepts from these sockets: nothing to take here (and a drain
            // closes them at once).
            for ready in &mut self.listener_ready {
                *ready = false;
            }
            return;
        }
        if let Some(until) = self.accept_paused_until {
            if self.now < until {
                return;
            }
            self.accept_paused_until = None;
        }
        for i in 0..self.listeners.len() {
            if self.listener_ready[i] {
                self.accept_from(i);
            }
        }
    }

    /// Accepts from listener `i` until it is empty (`WouldBlock`), or the batch is done, or
    /// descriptors or `--max-conns` run short. A drain takes the whole backlog in one go.
    pub(super) fn accept_from(&mut self, i: usize) {
        let batch = if self.draining {
            usize::MAX
        } else {
            ACCEPT_BATCH
        };
        for _ in 0..batch {
            // A client is accepted only with a descriptor in reserve for its backend socket
            // (accept itself needs the other one): otherwise it would be accepted and then
            // closed, with its request unread, which is a reset. Short, it waits in the
            // kernel's backlog instead.
            if !self.refill_spare() {
                return;
            }
            // At the cap the connection stays in the kernel's backlog (the client waits)
            // rather than being accepted and closed.
            if !self.reserve_slot() {
                return;
            }
            let Some(listener) = &self.listeners[i] else {
                Counters::decr(&self.counters.active);
                return;
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    Counters::incr(&self.counters.accepted);
                    self.start_session(stream, addr, i);
                    if self.accept_paused_until.is_some() {
                        return; // that session ran short of descriptors: so would the next
                    }
                }
                Err(e) => {
                    Counters::decr(&self.counters.active);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => self.listener_ready[i] = false,
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                        _ => {
                            Counters::incr(&self.counters.accept_errors);
                            self.resources_exhausted(e);
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Makes sure a descriptor is held in reserve for the next backend socket; `false` if
    /// none can be had (out of descriptors: accepting pauses).
    fn refill_spare(&mut self) -> bool {
        if self.spare.is_some() {
            return true;
        }
        match reserve_descriptor() {
            Ok(fd) => {
                self.spare = Some(fd);
                true
            }
            Err(e) if is_resource_exhaustion(&e) => {
                Counters::incr(&self.counters.accept_errors);
                self.resources_exhausted(e);
                false
            }
            Err(e) => {
                // Not a shortage (no UDP here?): go on without a reserve, as before.
                log::debug!("worker {}: cannot reserve a descriptor: {e}", self.id);
                true
            }
        }
    }

    /// EMFILE and friends, from accept or from creating a backend socket: waiting clients
    /// stay in the backlog; accepting resumes shortly rather than spinning on an error that
    /// will repeat until descriptors are freed.
    pub(super) fn resources_exhausted(&mut self, e: io::Error) {
        self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
        if let Some(suppressed) = self.accept_error_log.allow(self.now) {
            log::warn!(
                "worker {}: {e}; pausing accepts for {ACCEPT_BACKOFF:?} \
                 ({suppressed} similar messages suppressed)",
                self.id
            );
        }
    }

    /// A new session for an accepted client of listener `listener`'s service, placed at once (or queued, or closed); with
    /// `--accept-proxy`, once its PROXY header is read. A client refused by its address (an
    /// untrusted proxy, `--deny`, a per-IP limit) is closed at once, with no session.
    fn start_session(&mut self, client: TcpStream, client_addr: SocketAddr, listener: usize) {
        let service = self.listener_service.get(listener).copied().unwrap_or(0);
        let s = usize::from(service);
        let config = Arc::clone(&self.services[s].config);
        Counters::incr(&self.services[s].counters.accepted);
        let ticket = if config.client_ip.accept_proxy {
            // Its address is the header's: admitted once the header is read.
            if !crate::client_ip::any_contains(&config.client_ip.trusted_proxies, client_addr.ip())
            {
                self.proxy_header_error(s, client_addr, "untrusted");
                self.refused_at_accept(s);
                return;
            }
            None
        } else {
            match self.admit(s, client_addr) {
                Ok(ticket) => ticket,
                Err(()) => {
                    self.refused_at_accept(s);
                    return;
                }
            }
        };
        // On Linux the accepted socket already carries the listener's options.
        if !sys::ACCEPT_INHERITS_SOCKET_OPTIONS {
            tune_socket(SockRef::from(&client), config.tcp_keepalive);
        }
        // The address the client connected to: the destination of the header sent on (a
        // wildcard listener's own address would not do).
        let local_addr = config
            .client_ip
            .send_proxy
            .map(|_| client.local_addr().unwrap_or(self.listen_addrs[listener]));
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let id = self.next_id;
        self.next_id += 1;
        let set = Arc::clone(&self.services[s].backends);
        let mut session = Session::new(id, client, client_addr, listener, set, self.now);
        session.service = service;
        session.set_ticket(ticket);
        if let Some(addr) = local_addr {
            session.set_local_addr(addr);
        }
        session.set_client_user_timeout(config.tcp_user_timeout);
        if let Err(e) = self.poll.registry().register(
            &mut session.client,
            Target::Session(key, Side::Client).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("worker {}: cannot register client socket: {e}", self.id);
            self.refused_at_accept(s);
            return;
        }
        let session = entry.insert(session);
        Counters::incr(&self.services[s].counters.active);
        let actions = session
            .state
            .on(Event::Accepted, self.now, &self.services[s].rules);
        self.arm_max_age(s, key, id);
        self.apply(key, actions);
    }

    /// A client of service `s` closed before it had a session: the slot `reserve_slot` took
    /// is given back, and the service's count of accepted clients stays equal to its active
    /// plus its closed ones.
    fn refused_at_accept(&self, s: usize) {
        Counters::decr(&self.counters.active);
        Counters::incr(&self.counters.closed);
        if let Some(served) = self.services.get(s) {
            Counters::incr(&served.counters.closed);
        }
    }

    /// Whether a client at `addr` may be served (`--allow`/`--deny`, then the per-IP
    /// limits), with its place under the limits; a refused one is counted and logged (at
    /// most once a second), and the caller closes it.
    pub(super) fn admit(&mut self, service: usize, addr: SocketAddr) -> Result<Option<Ticket>, ()> {
        let ip = addr.ip();
        let served = &self.services[service];
        let why = if !served.config.client_ip.access.permits(ip) {
            count!(self, service, refused_deny);
            "it is denied by --allow/--deny"
        } else {
            let Some(limits) = &served.ip_limits else {
                return Ok(None);
            };
            match limits.try_open(ip, self.now) {
                Ok(ticket) => return Ok(Some(ticket)),
                Err(Refusal::TooManyConns) => {
                    count!(self, service, refused_max_conns_per_ip);
                    "it is at --max-conns-per-ip"
                }
                Err(Refusal::RateLimited) => {
                    count!(self, service, refused_max_conn_rate_per_ip);
                    "it is over --max-conn-rate-per-ip"
                }
            }
        };
        if let Some(suppressed) = self.client_ip_log.allow(self.now) {
            log::warn!("closing client {addr}: {why} ({suppressed} similar messages suppressed)");
        }
        Err(())
    }

    /// Counts a PROXY header error of a client of service `s` (`reason` is its metrics
    /// label) and logs it, at most once a second.
    pub(super) fn proxy_header_error(&mut self, s: usize, addr: SocketAddr, reason: &str) {
        Counters::incr(self.counters.proxy_header_error(reason));
        if let Some(served) = self.services.get(s) {
            Counters::incr(&served.counters.proxy_header_errors);
        }
        if let Some(suppressed) = self.client_ip_log.allow(self.now) {
            log::warn!(
                "closing client {addr}: PROXY header error ({reason}) \
                 ({suppressed} similar messages suppressed)"
            );
        }
    }
}

/// The descriptor held in reserve (see `Worker::spare`): a non-blocking TCP socket, unbound
/// and unconnected, which the next backend connect uses as its socket when the backend's
/// address family matches (one `socket` and one `close` fewer per connection than closing a
/// placeholder and opening a new socket); otherwise it is closed and a socket of the right
/// family is made in its place.
pub(super) struct Spare {
    pub(super) socket: socket2::Socket,
    pub(super) v6: bool,
}

pub(super) fn reserve_descriptor() -> io::Result<Spare> {
    use crate::sys::nonblocking_tcp_socket;
    use socket2::Domain;
    match nonblocking_tcp_socket(Domain::IPV4) {
        Ok(socket) => Ok(Spare { socket, v6: false }),
        Err(_) => nonblocking_tcp_socket(Domain::IPV6).map(|socket| Spare { socket, v6: true }),
    }
}
