//! A worker: one thread, one `mio::Poll`, its own listeners, and the sessions it accepted.
//!
//! Each turn of the loop waits for readiness events (or the next timer, or not at all when
//! work is left over from the previous turn), then
//!
//! 1. records readiness and runs the sessions the events concern;
//! 2. accepts new clients from listeners that are ready, at most `ACCEPT_BATCH` per listener
//!    per turn so a connection storm cannot starve live sessions (a drain takes the whole
//!    backlog), each only with a descriptor in reserve for its backend socket;
//! 3. runs sessions that used up their byte budget last turn;
//! 4. places queued clients while backends have room;
//! 5. fires expired timers (connect, idle, backend and queue timeouts, drain closes, and
//!    lingering sockets' looks).
//!
//! Nothing here blocks, and nothing takes a lock: the backend set is an immutable snapshot
//! swapped in by a control message, and the only shared writes are relaxed atomic counters.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;
use socket2::SockRef;

use crate::backend::{BackendSet, Failure, RateLimit};
use crate::balance::Picker;
use crate::config::{Algorithm, Config};
use crate::health::{Command, HealthLink};
use crate::listener::tune_socket;
use crate::relay::{self, Outcome, Pools, Pump, Readiness};
use crate::session::{CloseReason, LINGER_CHECK, LINGER_TIMEOUT, Phase, Session, Upstream};
use crate::stats::Counters;
use crate::sys;
use crate::timer::{Timer, TimerKind, Timers};
use crate::token::{Side, Target};

/// Most connections accepted from one listener in one turn.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM before it is tried again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a worker at `--max-conns` looks again whether there is room.
const MAX_CONNS_RECHECK: Duration = Duration::from_millis(20);
/// How often a worker with queued clients looks for room. Room can appear in another worker
/// (a session closes there) or with time (rate tokens), neither of which wakes this one.
const QUEUE_RECHECK: Duration = Duration::from_millis(5);
/// Most queued clients one turn tries to place.
const QUEUE_SCAN: usize = 256;
/// Below this many entries the queue is never compacted.
const QUEUE_COMPACT_MIN: usize = 1024;

/// Messages from the control plane.
pub enum Control {
    /// Use this backend set for new connections from now on.
    Backends(Arc<BackendSet>),
    /// Graceful shutdown: close the listeners now, let sessions end on their own for
    /// `timeout`, then close the rest evenly over `spread`, and exit when none is left.
    Drain { timeout: Duration, spread: Duration },
    /// A drained backend's drain timeout passed: close its sessions evenly over `spread`.
    CloseBackend { addr: SocketAddr, spread: Duration },
    /// Close everything and exit.
    Shutdown,
}

pub struct Worker {
    id: usize,
    config: Arc<Config>,
    poll: Poll,
    control: Receiver<Control>,
    /// `None` once closed (by a drain).
    listeners: Vec<Option<TcpListener>>,
    /// A listener got a readiness event and has not yet returned `WouldBlock`.
    listener_ready: Vec<bool>,
    /// Accepting is paused until then (after running out of descriptors or memory).
    accept_paused_until: Option<Instant>,
    /// A descriptor held in reserve for the backend socket of the next client (an unbound UDP
    /// socket): a client is accepted only while one is held, and it is closed just before a
    /// backend socket is made. So holdfast never accepts a client it has no descriptor to
    /// serve with. Refilled before each accept.
    spare: Option<socket2::Socket>,
    backends: Arc<BackendSet>,
    counters: Arc<Counters>,
    sessions: Slab<Session>,
    /// Sessions to run again next turn (they stopped early on the byte budget).
    again: Vec<usize>,
    /// Clients waiting for a backend with room, oldest first: (slab key, session id). An
    /// entry whose session has gone (or whose key now holds another session) is skipped.
    queue: VecDeque<(usize, u64)>,
    /// The queue length at which its stale entries are next dropped.
    queue_compact_at: usize,
    rate: Option<RateLimit>,
    health: HealthLink,
    timers: Timers,
    pools: Pools,
    picker: Picker,
    next_id: u64,
    now: Instant,
    accept_error_log: LogLimiter,
    no_backend_log: LogLimiter,
    queue_log: LogLimiter,
    /// A graceful shutdown is under way: listeners close once their backlog is taken, and
    /// the worker exits when they are closed and the last session has ended.
    draining: bool,
    /// The listen address of each listener, for session logs (kept after a drain closes them).
    listen_addrs: Vec<SocketAddr>,
}

impl Worker {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        listeners: Vec<TcpListener>,
        backends: Arc<BackendSet>,
        counters: Arc<Counters>,
        health: HealthLink,
    ) -> io::Result<(Worker, Sender<Control>, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), Target::Waker.token())?);
        let mut listeners = listeners;
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, Target::Listener(i).token(), Interest::READABLE)?;
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let listener_ready = vec![false; listeners.len()];
        let listen_addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let listeners = listeners.into_iter().map(Some).collect();
        let worker = Worker {
            id,
            picker: Picker::new(config.algorithm, id),
            rate: RateLimit::new(config.limits.max_connect_rate),
            config,
            poll,
            control: rx,
            listeners,
            listener_ready,
            accept_paused_until: None,
            spare: reserve_descriptor().ok(),
            backends,
            pools: Pools::new(Arc::clone(&counters)),
            counters,
            sessions: Slab::new(),
            again: Vec::new(),
            queue: VecDeque::new(),
            queue_compact_at: QUEUE_COMPACT_MIN,
            health,
            timers: Timers::default(),
            next_id: 0,
            now: Instant::now(),
            accept_error_log: LogLimiter::default(),
            no_backend_log: LogLimiter::default(),
            queue_log: LogLimiter::default(),
            draining: false,
            listen_addrs,
        };
        Ok((worker, tx, waker))
    }

    /// The event loop. Returns when told to shut down (or if the poller itself fails).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("worker {}: poll failed: {e}; stopping this worker", self.id);
                break;
            }
            self.now = Instant::now();
            let mut shutdown = false;
            for event in events.iter() {
                match Target::from_token(event.token()) {
                    Target::Waker => shutdown |= self.handle_control(),
                    Target::Listener(i) => {
                        if let Some(ready) = self.listener_ready.get_mut(i) {
                            *ready = true;
                        }
                    }
                    Target::Session(key, side) => self.handle_event(key, side, event),
                }
            }
            if shutdown {
                break;
            }
            self.accept_all();
            if self.draining {
                self.close_drained_listeners();
            }
            self.run_again();
            if !self.queue.is_empty() {
                self.service_queue();
            }
            self.fire_timers();
            // Checked last: the turn may have closed the last session (a drain timer, a
            // peer's FIN), and with nothing left to wait for the poll would never wake.
            if self.draining && self.sessions.is_empty() && self.listeners.is_empty() {
                log::info!("worker {}: drained", self.id);
                break;
            }
        }
        self.close_all();
    }

    /// Sleep until the next timer, or not at all if work is waiting.
    fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut timeout = self.timers.next_timeout(now);
        if self.listener_ready.iter().any(|&r| r) {
            let wait = match self.accept_paused_until {
                Some(until) => until.saturating_duration_since(now),
                None if self.at_max_conns() && !self.draining => MAX_CONNS_RECHECK,
                None => Duration::ZERO,
            };
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        if !self.queue.is_empty() {
            timeout = Some(timeout.map_or(QUEUE_RECHECK, |t| t.min(QUEUE_RECHECK)));
        }
        timeout
    }

    /// Drains the control channel. Returns true on shutdown.
    fn handle_control(&mut self) -> bool {
        loop {
            match self.control.try_recv() {
                // Round-robin keeps its credits across sets that list the same backends in the
                // same places: restarting on every publish (32 times per slow-start window,
                // every state change) would hand every tie to the first backend. A set that
                // moved backends around gets a fresh rotation.
                Ok(Control::Backends(set)) => {
                    if !set.same_places(&self.backends) {
                        self.picker.reset();
                    }
                    self.backends = set;
                }
                Ok(Control::Drain { timeout, spread }) => self.start_drain(timeout, spread),
                Ok(Control::CloseBackend { addr, spread }) => {
                    let keys: Vec<usize> = self
                        .sessions
                        .iter()
                        .filter(|(_, s)| {
                            s.upstream()
                                .is_some_and(|u| s.set.backends[u.index].spec.addr == addr)
                        })
                        .map(|(k, _)| k)
                        .collect();
                    self.schedule_closes(keys, self.now, spread);
                }
                Ok(Control::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    // ---- accepting ------------------------------------------------------------------------

    fn at_max_conns(&self) -> bool {
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

    fn accept_all(&mut self) {
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
    fn accept_from(&mut self, i: usize) {
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
    fn resources_exhausted(&mut self, e: io::Error) {
        self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
        if let Some(suppressed) = self.accept_error_log.allow(self.now) {
            log::warn!(
                "worker {}: {e}; pausing accepts for {ACCEPT_BACKOFF:?} \
                 ({suppressed} similar messages suppressed)",
                self.id
            );
        }
    }

    fn start_session(&mut self, client: TcpStream, client_addr: SocketAddr, listener: usize) {
        // On Linux the accepted socket already carries the listener's options.
        if !sys::ACCEPT_INHERITS_SOCKET_OPTIONS {
            tune_socket(SockRef::from(&client), self.config.tcp_keepalive);
        }
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let id = self.next_id;
        self.next_id += 1;
        let mut session = Session {
            id,
            client,
            client_addr,
            client_ready: Readiness::default(),
            set: Arc::clone(&self.backends),
            phase: Phase::Accepted,
            started: self.now,
            last_active: self.now,
            scheduled: false,
            listener,
            connect_attempts: 0,
        };
        if let Err(e) = self.poll.registry().register(
            &mut session.client,
            Target::Session(key, Side::Client).token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("worker {}: cannot register client socket: {e}", self.id);
            Counters::decr(&self.counters.active);
            Counters::incr(&self.counters.closed);
            return;
        }
        entry.insert(session);
        if let Placement::Full(tried) | Placement::Starved(tried) = self.place(key, Vec::new()) {
            self.enqueue(key, tried);
        }
    }

    /// Finds the session a backend and starts connecting to it. `tried` lists backends that
    /// already failed for this client. On `Full` the session is left as it was and `tried`
    /// (with any backend that failed at once added) is handed back for the queue to keep; on
    /// `Closed` it is gone.
    fn place(&mut self, key: usize, mut tried: Vec<usize>) -> Placement {
        let Some(session) = self.sessions.get(key) else {
            return Placement::Closed;
        };
        let set = Arc::clone(&session.set);
        let (ip, client_addr, id) = (session.client_addr.ip(), session.client_addr, session.id);
        match self.connect_next(&set, ip, &mut tried) {
            Ok((index, mut socket)) => {
                let registered = self.poll.registry().register(
                    &mut socket,
                    Target::Session(key, Side::Backend).token(),
                    Interest::READABLE | Interest::WRITABLE,
                );
                let Some(session) = self.sessions.get_mut(key) else {
                    set.backends[index].stats.release();
                    return Placement::Closed;
                };
                // Numbered by the session's own counter, which only goes up, so a connect
                // timer armed for an earlier attempt is told apart, even one armed before a
                // stay in the queue that forgot the backends tried.
                session.connect_attempts += 1;
                let attempt = session.connect_attempts;
                session.phase = Phase::Connecting {
                    upstream: Upstream {
                        socket,
                        ready: Readiness::default(),
                        index,
                        connect_started: self.now,
                    },
                    attempt,
                    tried,
                };
                if let Err(e) = registered {
                    log::warn!("worker {}: cannot register backend socket: {e}", self.id);
                    self.close(key, CloseReason::Exhausted);
                    return Placement::Closed;
                }
                self.timers.push(Timer {
                    at: self.now + self.config.connect_timeout,
                    key,
                    id,
                    kind: TimerKind::Connect { attempt },
                });
                Placement::Connecting
            }
            Err(NoConnect::Full) => Placement::Full(tried),
            // Out of descriptors for the backend socket: the client waits, like a client
            // waiting for room (closing it, with its request unread, would reset it).
            Err(NoConnect::Exhausted) => Placement::Starved(tried),
            Err(NoConnect::NoBackend) => {
                self.no_backend(client_addr);
                self.close(key, CloseReason::NoBackend);
                Placement::Closed
            }
        }
    }

    /// Picks the next candidate and starts a non-blocking connect to it.
    ///
    /// A backend at `--max-conns-per-backend` or out of `--max-connect-rate` tokens is passed
    /// over (for source-hash, the client waits for its own backend instead: `Full`). A connect
    /// that fails at once counts as a failed attempt and the next candidate is tried, within
    /// `--retries`. Running out of local descriptors or memory is not the backend's fault: it
    /// is not counted against the backend, and accepting pauses. The chosen backend's active
    /// count is raised here, so least-conn in every worker sees it before the connect ends.
    fn connect_next(
        &mut self,
        set: &BackendSet,
        ip: IpAddr,
        tried: &mut Vec<usize>,
    ) -> Result<(usize, TcpStream), NoConnect> {
        let max = self.config.limits.max_conns_per_backend;
        let sticky = self.config.algorithm == Algorithm::SourceHash;
        // Backends without room right now; allocated only when one is found.
        let mut full: Vec<usize> = Vec::new();
        while tried.len() <= self.config.retries as usize {
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
            // The reserved descriptor is given up just before the socket is made, so the
            // socket gets its number (the lowest free one) unless another thread takes it in
            // between; then the client waits for descriptors instead of being closed.
            self.spare = None;
            match TcpStream::connect(backend.spec.addr) {
                Ok(stream) => return Ok((index, stream)),
                Err(e) if is_resource_exhaustion(&e) => {
                    backend.stats.release();
                    Counters::incr(&self.counters.accept_errors);
                    self.resources_exhausted(e);
                    return Err(NoConnect::Exhausted);
                }
                Err(e) => {
                    log::debug!("connect to {} failed at once: {e}", backend.spec.addr);
                    backend.stats.release();
                    self.backend_failed(set, index, Failure::Connect);
                    tried.push(index);
                }
            }
        }
        let no_room = !full.is_empty()
            || (max > 0
                && (0..set.len()).any(|i| {
                    set.is_eligible(i) && !tried.contains(&i) && set.backends[i].stats.is_full(max)
                }));
        if no_room && tried.len() <= self.config.retries as usize {
            Err(NoConnect::Full)
        } else {
            Err(NoConnect::NoBackend)
        }
    }

    /// Counts a failure against a backend, and tells the health thread when it is the one that
    /// makes `--observe-errors` consecutive failures.
    fn backend_failed(&self, set: &BackendSet, index: usize, failure: Failure) {
        let backend = &set.backends[index];
        if failure == Failure::Connect {
            Counters::incr(&self.counters.connect_failures);
        }
        let consecutive = backend.stats.record_failure(failure);
        let threshold = u64::from(self.config.health.observe_errors);
        if threshold > 0 && consecutive == threshold {
            self.health.send(Command::Failing(backend.spec.addr));
        }
    }

    fn no_backend(&mut self, client_addr: SocketAddr) {
        Counters::incr(&self.counters.no_backend);
        if let Some(suppressed) = self.no_backend_log.allow(self.now) {
            log::warn!(
                "no backend available for client {client_addr}; closing it \
                 ({suppressed} similar messages suppressed)"
            );
        }
    }

    // ---- the queue ------------------------------------------------------------------------

    /// No backend has room: the client waits (it costs its socket and nothing else) until one
    /// has, or until the queue timeout. A full queue closes the client at once.
    fn enqueue(&mut self, key: usize, tried: Vec<usize>) {
        let max = self.config.limits.max_queue as u64;
        let admitted = self
            .counters
            .queued
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if !admitted {
            Counters::incr(&self.counters.queue_full);
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
        let deadline = self.now + self.config.limits.queue_timeout;
        session.phase = Phase::Queued { deadline, tried };
        Counters::incr(&self.counters.queued_total);
        self.queue.push_back((key, session.id));
        self.timers.push(Timer {
            at: deadline,
            key,
            id: session.id,
            kind: TimerKind::Queue,
        });
        if self.queue.len() >= self.queue_compact_at {
            // Entries of clients that left while waiting stay until the scan reaches them;
            // behind a client that waits long they could pile up. Drop them in one pass
            // whenever the queue has doubled since the last one.
            let sessions = &self.sessions;
            self.queue.retain(|&(k, id)| {
                sessions
                    .get(k)
                    .is_some_and(|s| s.id == id && matches!(s.phase, Phase::Queued { .. }))
            });
            self.queue_compact_at = (2 * self.queue.len()).max(QUEUE_COMPACT_MIN);
        }
    }

    /// Places waiting clients, oldest first, while backends have room. With source-hash each
    /// client waits for its own backend, so one blocked client must not hold up the others:
    /// the whole queue is tried (up to a bound per turn). Otherwise, once the oldest finds no
    /// room, nobody behind it would.
    fn service_queue(&mut self) {
        let sticky = self.config.algorithm == Algorithm::SourceHash;
        let mut budget = self.queue.len().min(QUEUE_SCAN);
        while budget > 0 {
            budget -= 1;
            let Some((key, id)) = self.queue.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.id != id {
                continue; // closed while waiting, and the key reused
            }
            let Phase::Queued { deadline, tried } = &mut session.phase else {
                continue; // cannot happen: a queue entry's session is queued
            };
            let (deadline, mut tried) = (*deadline, std::mem::take(tried));
            session.phase = Phase::Accepted;
            // Out of the queue while it tries; back in (same place, same deadline) if there
            // is no room. Backends that already failed for this client stay excluded and
            // count against --retries: a refusing backend with room must not be hammered by
            // a client that keeps coming back from the queue. A set that moved backends
            // around (a reload or a DNS answer) invalidates their indices: a fresh start.
            if !session.set.same_places(&self.backends) {
                tried.clear();
            }
            session.set = Arc::clone(&self.backends);
            Counters::decr(&self.counters.queued);
            let (tried, starved) = match self.place(key, tried) {
                Placement::Full(tried) => (tried, false),
                Placement::Starved(tried) => (tried, true),
                Placement::Connecting | Placement::Closed => continue,
            };
            if let Some(session) = self.sessions.get_mut(key) {
                session.phase = Phase::Queued { deadline, tried };
                Counters::incr(&self.counters.queued);
            }
            if sticky && !starved {
                self.queue.push_back((key, id));
            } else {
                // No room for it, so none for those behind it; or no descriptor for anyone.
                self.queue.push_front((key, id));
                break;
            }
        }
    }

    // ---- events ---------------------------------------------------------------------------

    fn handle_event(&mut self, key: usize, side: Side, event: &Event) {
        let Some(session) = self.sessions.get_mut(key) else {
            return; // an event for a session closed earlier in this turn
        };
        if session.is_lingering() {
            // Closed, its sockets waiting for the peers to take the FIN: discard what came.
            self.linger(key);
            return;
        }
        let ready = match side {
            Side::Client => &mut session.client_ready,
            Side::Backend => match session.upstream_mut() {
                Some(upstream) => &mut upstream.ready,
                None => return,
            },
        };
        // Errors and hang-ups are surfaced by the next read or write, which is where they are
        // handled; marking the socket ready makes sure that call happens.
        let failed = event.is_error();
        ready.readable |= event.is_readable() || event.is_read_closed() || failed;
        ready.writable |= event.is_writable() || event.is_write_closed() || failed;
        ready.hung_up |= event.is_read_closed() || failed;

        match session.phase {
            Phase::Connecting { .. } if side == Side::Backend => {
                // A plain writable event, with no error or hang-up beside it.
                let clean = event.is_writable()
                    && !failed
                    && !event.is_read_closed()
                    && !event.is_write_closed();
                self.check_connect(key, clean)
            }
            // A client that waits (queued, or for its backend connect) is read nothing until
            // it is relaying; but a hang-up or an error may mean it has left, and then it
            // gives up its place: no backend slot or rate token is spent on it.
            Phase::Queued { .. } | Phase::Connecting { .. }
                if side == Side::Client && (failed || event.is_read_closed()) =>
            {
                if let Some(reason) = session.client_left() {
                    log::debug!("client {} left while waiting", session.client_addr);
                    self.close(key, reason);
                }
            }
            // Client bytes wait until the backend is connected.
            Phase::Accepted | Phase::Queued { .. } | Phase::Connecting { .. } => {}
            Phase::Relaying { .. } => self.relay(key),
            Phase::Lingering { .. } => {} // handled above
        }
    }

    /// The backend socket of a connecting session changed readiness: did the connect succeed?
    /// `clean` says the event was writable with no error or hang-up flagged beside it.
    fn check_connect(&mut self, key: usize, clean: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Connecting { upstream, .. } = &mut session.phase else {
            return;
        };
        if !upstream.ready.writable {
            return;
        }
        // Where the platform promises a clean writable event only for an established
        // connection, that event is proof enough and costs no syscall.
        if clean && sys::WRITABLE_MEANS_CONNECTED {
            self.connected(key);
            return;
        }
        // mio's recipe: a writable event ends the connect; SO_ERROR says how. If there is no
        // error yet the peer address is unknown (ENOTCONN), the event was spurious.
        let result = match upstream.socket.take_error() {
            Ok(None) => match upstream.socket.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    upstream.ready.writable = false;
                    return;
                }
                Err(e) => Err(e),
            },
            Ok(Some(e)) | Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.connected(key),
            Err(e) => {
                log::debug!(
                    "connect to {} failed: {e}",
                    session.set.backends[upstream.index].spec.addr
                );
                self.retry(key);
            }
        }
    }

    fn connected(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let phase = std::mem::replace(&mut session.phase, Phase::Accepted);
        let Phase::Connecting { upstream, .. } = phase else {
            session.phase = phase;
            return;
        };
        session.set.backends[upstream.index]
            .stats
            .record_established(self.now.saturating_duration_since(upstream.connect_started));
        tune_socket(SockRef::from(&upstream.socket), self.config.tcp_keepalive);
        // Bytes that arrived on either side while connecting are not lost: both sockets were
        // registered before (a registration reports readiness already there), and every
        // event since was recorded in their Readiness. So only a side known to be readable
        // is read, and a backend that has said nothing yet costs no EAGAIN read.
        session.phase = Phase::Relaying {
            upstream,
            client_to_backend: Pump::new(self.config.relay),
            backend_to_client: Pump::new(self.config.relay),
            first_eof: None,
            established: self.now,
            unanswered_since: None,
            backend_timer: false,
        };
        session.last_active = self.now;
        if let Some(idle) = self.config.idle_timeout {
            self.timers.push(Timer {
                at: self.now + idle,
                key,
                id: session.id,
                kind: TimerKind::Idle,
            });
        }
        self.relay(key);
    }

    /// The current connect attempt failed or timed out: try the next candidate, wait in the
    /// queue if only full backends are left, or give up.
    fn retry(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Connecting {
            upstream, tried, ..
        } = &mut session.phase
        else {
            return;
        };
        let failed = upstream.index;
        let mut tried = std::mem::take(tried);
        tried.push(failed);
        let set = Arc::clone(&session.set);
        set.backends[failed].stats.release();
        self.backend_failed(&set, failed, Failure::Connect);
        if let Some(session) = self.sessions.get_mut(key) {
            // The failed socket is closed (and leaves the poller) before the next one is
            // made, so a retry needs no descriptor more than the session had. Its slot was
            // given back above; a session with no upstream holds none.
            session.phase = Phase::Accepted;
        }
        if let Placement::Full(tried) | Placement::Starved(tried) = self.place(key, tried) {
            self.enqueue(key, tried);
        }
    }

    /// Runs both pumps of a relaying session and closes it when it is finished.
    fn relay(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Relaying {
            upstream,
            client_to_backend,
            backend_to_client,
            first_eof,
            established,
            unanswered_since,
            backend_timer,
        } = &mut session.phase
        else {
            return;
        };
        let (up, up_bytes) = client_to_backend.run(
            &session.client,
            &mut session.client_ready,
            &upstream.socket,
            &mut upstream.ready,
            &mut self.pools,
            backend_to_client.is_done(),
        );
        let (down, down_bytes) = backend_to_client.run(
            &upstream.socket,
            &mut upstream.ready,
            &session.client,
            &mut session.client_ready,
            &mut self.pools,
            client_to_backend.is_done(),
        );
        let mut backend_quit = false;
        if first_eof.is_none() {
            if backend_to_client.is_done() {
                *first_eof = Some(Side::Backend);
                backend_quit = true;
            } else if client_to_backend.is_done() {
                *first_eof = Some(Side::Client);
            }
        }
        let both_done = client_to_backend.is_done() && backend_to_client.is_done();
        let moved = (up_bytes + down_bytes) as u64;
        if moved > 0 {
            session.last_active = self.now;
            if down_bytes > 0 && backend_to_client.bytes == down_bytes as u64 {
                // The first bytes the backend sent back: it is serving, so its run of
                // consecutive failures is over. Bytes written to it prove nothing (only
                // that its kernel took them), so they do not count.
                session.set.backends[upstream.index].stats.reset_streak();
            }
            if up_bytes > 0 {
                self.counters
                    .bytes_client_to_backend
                    .fetch_add(up_bytes as u64, Relaxed);
            }
            if down_bytes > 0 {
                self.counters
                    .bytes_backend_to_client
                    .fetch_add(down_bytes as u64, Relaxed);
            }
            session.set.backends[upstream.index]
                .stats
                .add_bytes(up_bytes as u64, down_bytes as u64);
        }
        if let Some(limit) = self.config.backend_timeout {
            // The clock runs from the first client byte after the backend's last answer
            // (bytes both ways in one run count as answered). A backend that ended its side
            // can answer no more: it is not waited for.
            if down_bytes > 0 {
                *unanswered_since = None;
            } else if up_bytes > 0 && unanswered_since.is_none() && !backend_to_client.is_done() {
                *unanswered_since = Some(self.now);
                if !*backend_timer {
                    *backend_timer = true;
                    self.timers.push(Timer {
                        at: self.now + limit,
                        key,
                        id: session.id,
                        kind: TimerKind::Backend,
                    });
                }
            }
        }
        // The backend ended its side (EOF) without having answered a byte, soon after the
        // session began: a passive failure, counted when it happens (the client may keep its
        // side open for long after).
        let passive = (backend_quit
            && backend_to_client.bytes == 0
            && self.now.saturating_duration_since(*established) <= self.config.connect_timeout)
            .then(|| (Arc::clone(&session.set), upstream.index));
        let failed = match (up, down) {
            (Outcome::SourceFailed, _) | (_, Outcome::DestinationFailed) => Some(Side::Client),
            (Outcome::DestinationFailed, _) | (_, Outcome::SourceFailed) => Some(Side::Backend),
            _ => None,
        };
        if let Some(side) = failed {
            self.close(key, CloseReason::Reset(side));
        } else if both_done {
            self.close(key, CloseReason::Done);
        } else if (up == Outcome::Yield || down == Outcome::Yield) && !session.scheduled {
            session.scheduled = true;
            self.again.push(key);
        }
        if let Some((set, index)) = passive {
            self.backend_failed(&set, index, Failure::Passive);
        }
    }

    fn run_again(&mut self) {
        let keys = std::mem::take(&mut self.again);
        for &key in &keys {
            if let Some(session) = self.sessions.get_mut(key) {
                session.scheduled = false;
                self.relay(key);
            }
        }
        // Reuse the allocation when nothing was queued meanwhile.
        if self.again.is_empty() {
            self.again = keys;
            self.again.clear();
        }
    }

    fn fire_timers(&mut self) {
        if self.timers.needs_compaction() {
            // Drop the entries of closed sessions (see timer.rs). A live session keeps all of
            // its entries; ones armed for an earlier attempt are few and expire soon.
            let sessions = &self.sessions;
            self.timers.compact(|t| {
                matches!(t.kind, TimerKind::DrainDeadline { .. })
                    || sessions.get(t.key).is_some_and(|s| s.id == t.id)
            });
        }
        while let Some(timer) = self.timers.pop_expired(self.now) {
            if let TimerKind::DrainDeadline { spread } = timer.kind {
                // A backlog still not taken for want of descriptors is given up now.
                self.listeners.clear();
                self.listener_ready.clear();
                let keys: Vec<usize> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| !s.is_lingering())
                    .map(|(k, _)| k)
                    .collect();
                if !keys.is_empty() {
                    log::info!(
                        "worker {}: drain timeout; closing {} session(s) over {spread:?}",
                        self.id,
                        keys.len()
                    );
                }
                self.schedule_closes(keys, self.now, spread);
                continue;
            }
            let Some(session) = self.sessions.get(timer.key) else {
                continue;
            };
            if session.id != timer.id {
                continue; // the session it was armed for is gone
            }
            match (timer.kind, &session.phase) {
                (
                    TimerKind::Connect { attempt },
                    Phase::Connecting {
                        attempt: current,
                        upstream,
                        ..
                    },
                ) if attempt == *current => {
                    log::debug!(
                        "connect to {} timed out",
                        session.set.backends[upstream.index].spec.addr
                    );
                    self.retry(timer.key);
                }
                (TimerKind::Idle, Phase::Relaying { .. }) => {
                    let Some(idle) = self.config.idle_timeout else {
                        continue;
                    };
                    let deadline = session.last_active + idle;
                    if deadline <= self.now {
                        Counters::incr(&self.counters.idle_timeouts);
                        self.close(timer.key, CloseReason::IdleTimeout);
                    } else {
                        self.timers.push(Timer {
                            at: deadline,
                            ..timer
                        });
                    }
                }
                (TimerKind::Backend, Phase::Relaying { .. }) => {
                    let (
                        Some(limit),
                        Some(Phase::Relaying {
                            unanswered_since,
                            backend_timer,
                            backend_to_client,
                            ..
                        }),
                    ) = (
                        self.config.backend_timeout,
                        self.sessions.get_mut(timer.key).map(|s| &mut s.phase),
                    )
                    else {
                        continue;
                    };
                    *backend_timer = false;
                    let Some(since) = *unanswered_since else {
                        continue; // answered meanwhile; the next client byte re-arms it
                    };
                    if backend_to_client.is_done() {
                        continue;
                    }
                    let deadline = since + limit;
                    if deadline <= self.now {
                        Counters::incr(&self.counters.backend_timeouts);
                        self.close(timer.key, CloseReason::BackendTimeout);
                    } else {
                        *backend_timer = true;
                        self.timers.push(Timer {
                            at: deadline,
                            ..timer
                        });
                    }
                }
                (TimerKind::DrainClose, phase) if !matches!(phase, Phase::Lingering { .. }) => {
                    Counters::incr(&self.counters.closed_by_drain);
                    self.close(timer.key, CloseReason::Drain);
                }
                (TimerKind::Linger, Phase::Lingering { until, .. }) => {
                    let next = (self.now + LINGER_CHECK).min(*until);
                    self.linger(timer.key);
                    if self.sessions.contains(timer.key) {
                        self.timers.push(Timer { at: next, ..timer });
                    }
                }
                (TimerKind::Queue, Phase::Queued { deadline, .. }) if timer.at == *deadline => {
                    Counters::incr(&self.counters.queue_timeouts);
                    self.close(timer.key, CloseReason::QueueTimeout);
                }
                _ => {} // armed for an earlier phase or attempt
            }
        }
    }

    // ---- closing --------------------------------------------------------------------------

    /// Ends a session: releases its pipes and buffers and its counts, and closes both sockets
    /// (dropping a mio socket closes it and removes it from the poller).
    fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.is_lingering() {
            // Closed already in every respect but its sockets (see `linger`): drop them now.
            self.sessions.remove(key);
            return;
        }
        session.release(&mut self.pools);
        let session = &self.sessions[key];
        if let Some(upstream) = session.upstream() {
            if session.holds_backend_slot() {
                session.set.backends[upstream.index].stats.release();
            }
            if session.backend_gave_up(reason, self.now, self.config.connect_timeout) {
                self.backend_failed(&session.set, upstream.index, Failure::Passive);
            }
            if let CloseReason::Reset(side) = reason {
                Counters::incr(&self.counters.resets);
                // Pass the abort on: the other peer sees a reset, not a clean end of stream.
                let other = match side {
                    Side::Client => &upstream.socket,
                    Side::Backend => &session.client,
                };
                let _ = SockRef::from(other).set_linger(Some(Duration::ZERO));
            }
        }
        if matches!(session.phase, Phase::Queued { .. }) {
            Counters::decr(&self.counters.queued);
        }
        if self.config.log_sessions {
            self.log_session(session, reason);
        } else {
            log::debug!(
                "session {} from {} closed: {reason:?}",
                session.id,
                session.client_addr
            );
        }
        Counters::decr(&self.counters.active);
        Counters::incr(&self.counters.closed);
        if reason.ends_with_fin() {
            self.start_lingering(key);
        } else {
            // Dropping a mio socket closes it and removes it from the poller.
            self.sessions.remove(key);
        }
    }

    /// Ends a session holdfast itself decided to close (a drain, a timeout) with a clean end
    /// of stream on both sides, never a reset, so clients reconnect with their own back-off
    /// rather than treating it as an error.
    ///
    /// `close()` of a socket whose receive queue holds unread bytes makes the kernel send a
    /// RST instead of a FIN, dropping whatever it still had to send (the FIN included); and
    /// bytes arriving after the close are answered with a RST too. A peer still sending
    /// (or a backlog of bytes holdfast stopped reading, by backpressure) is therefore reset,
    /// and if our FIN had not gone out yet, its read sees ECONNRESET instead of EOF. So the
    /// write side is shut down (the FIN queues behind the bytes already sent) and the sockets
    /// stay open, reading and discarding what arrives, until each peer has acknowledged our
    /// FIN (nothing unacknowledged is left: it has read, or will read, EOF whatever follows)
    /// or has ended its own stream, or until [`LINGER_TIMEOUT`]. Only then are they closed.
    /// A backend connect still under way is simply dropped: there is no stream to end.
    fn start_lingering(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let backend = match std::mem::replace(&mut session.phase, Phase::Accepted) {
            Phase::Relaying { upstream, .. } => Some(upstream.socket),
            _ => None,
        };
        let _ = session.client.shutdown(Shutdown::Write);
        if let Some(socket) = &backend {
            let _ = socket.shutdown(Shutdown::Write);
        }
        session.phase = Phase::Lingering {
            backend_done: backend.is_none(),
            backend,
            client_done: false,
            until: self.now + LINGER_TIMEOUT,
        };
        self.timers.push(Timer {
            at: self.now + LINGER_CHECK,
            key,
            id: session.id,
            kind: TimerKind::Linger,
        });
        self.linger(key);
    }

    /// A lingering session's sockets: discard what arrived, and close both once each is
    /// finished with (see [`Worker::start_lingering`]) or the linger time is up.
    fn linger(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Lingering {
            backend,
            client_done,
            backend_done,
            until,
        } = &mut session.phase
        else {
            return;
        };
        if !*client_done {
            *client_done = relay::linger(&session.client, &mut self.pools);
        }
        if !*backend_done && let Some(socket) = backend {
            *backend_done = relay::linger(socket, &mut self.pools);
        }
        if (*client_done && *backend_done) || self.now >= *until {
            self.sessions.remove(key);
        }
    }

    /// Stops accepting: everything already in the kernel's accept queue is taken (those
    /// clients connected before the drain began, and are promised service), then each
    /// listener closes, so the kernel refuses new connections or, with SO_REUSEPORT, hands
    /// them to another process on the same port. Taking the queue is bounded only by
    /// descriptors (not by `--max-conns` or the accept batch): a listener whose backlog is
    /// not empty for want of descriptors stays open, and is drained as they free up, until
    /// its backlog is empty or the drain timeout passes.
    fn start_drain(&mut self, timeout: Duration, spread: Duration) {
        if self.draining {
            return;
        }
        self.draining = true;
        for ready in &mut self.listener_ready {
            *ready = true;
        }
        self.accept_all();
        self.close_drained_listeners();
        self.timers.push(Timer {
            at: self.now + timeout,
            key: usize::MAX,
            id: u64::MAX,
            kind: TimerKind::DrainDeadline { spread },
        });
    }

    /// During a drain: closes every listener whose backlog has been taken (its last accept
    /// said `WouldBlock`). With none left open, the vectors are emptied.
    fn close_drained_listeners(&mut self) {
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

    /// Closes `keys` one by one, oldest first, evenly over `spread` from `from`, so their
    /// clients reconnect at a steady rate rather than all in the same instant. Every worker
    /// spreads its own sessions over the whole window, each shifted by its share of one slot,
    /// so together they close at a steady rate too.
    fn schedule_closes(&mut self, mut keys: Vec<usize>, from: Instant, spread: Duration) {
        keys.sort_by_key(|&k| self.sessions[k].id);
        let n = keys.len().max(1) as f64;
        let shift = self.id as f64 / self.config.workers as f64;
        for (i, key) in keys.into_iter().enumerate() {
            self.timers.push(Timer {
                at: from + spread.mul_f64((i as f64 + shift) / n),
                key,
                id: self.sessions[key].id,
                kind: TimerKind::DrainClose,
            });
        }
    }

    /// The L4 equivalent of HAProxy's tcplog: who, through which listener, to which backend,
    /// for how long, how many bytes each way, and how it ended.
    fn log_session(&self, session: &Session, reason: CloseReason) {
        let backend = session.upstream().map_or_else(
            || "-".to_string(),
            |u| session.set.backends[u.index].spec.addr.to_string(),
        );
        let (up, down) = match &session.phase {
            Phase::Relaying {
                client_to_backend,
                backend_to_client,
                ..
            } => (client_to_backend.bytes, backend_to_client.bytes),
            _ => (0, 0),
        };
        let listen = self
            .listen_addrs
            .get(session.listener)
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        log::info!(
            target: "holdfast::session",
            "session client={} listen={listen} backend={backend} duration={:.3}s \
             bytes_client_to_backend={up} bytes_backend_to_client={down} end={}",
            session.client_addr,
            self.now.saturating_duration_since(session.started).as_secs_f64(),
            session.end_label(reason),
        );
    }

    fn close_all(&mut self) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, CloseReason::Shutdown);
        }
        self.timers.clear();
    }
}

/// Why no backend connect could be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoConnect {
    /// No eligible backend is left to try.
    NoBackend,
    /// Eligible backends exist, but none has room now (connection cap or rate limit).
    Full,
    /// This process is out of descriptors or memory.
    Exhausted,
}

/// What became of a session that was given a backend to connect to.
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    Connecting,
    /// No backend has room; the session is unchanged. Carries the backends already tried.
    Full(Vec<usize>),
    /// No descriptor for a backend socket; the session is unchanged. Carries the backends
    /// already tried.
    Starved(Vec<usize>),
    Closed,
}

/// A descriptor to hold in reserve (see `Worker::spare`): an unbound UDP socket, which needs
/// no file system path and costs the kernel little.
fn reserve_descriptor() -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    Socket::new(Domain::IPV4, Type::DGRAM, None)
        .or_else(|_| Socket::new(Domain::IPV6, Type::DGRAM, None))
}

/// Errors that say this process or machine is out of descriptors or memory.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// At most one message a second for a condition that can repeat thousands of times a second.
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(n)` if a message may be logged now, `n` being how many were suppressed since the
    /// last one.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
