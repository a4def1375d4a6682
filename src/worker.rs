//! A worker: one thread, one `mio::Poll`, its own listeners, and the sessions it accepted.
//!
//! Each turn of the loop waits for readiness events (or the next timer, or not at all when
//! work is left over from the previous turn), then
//!
//! 1. records readiness and runs the sessions the events concern;
//! 2. accepts new clients from listeners that are ready, at most `ACCEPT_BATCH` per listener
//!    per turn so a connection storm cannot starve live sessions;
//! 3. runs sessions that used up their byte budget last turn;
//! 4. fires expired timers (connect and idle timeouts).
//!
//! Nothing here blocks, and nothing takes a lock: the backend set is an immutable snapshot
//! swapped in by a control message, and the only shared writes are relaxed atomic counters.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;
use socket2::{SockRef, TcpKeepalive};

use crate::backend::BackendSet;
use crate::balance::{Load, SmoothRoundRobin, least_conn};
use crate::config::{Algorithm, Config};
use crate::relay::{Outcome, Pools, Pump, Readiness};
use crate::session::{CloseReason, Phase, Session};
use crate::stats::Counters;
use crate::timer::{Timer, TimerKind, Timers};
use crate::token::{Side, Target};

/// Most connections accepted from one listener in one turn.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM before it is tried again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a worker at `--max-conns` looks again whether there is room.
const MAX_CONNS_RECHECK: Duration = Duration::from_millis(20);

/// Messages from the control plane.
pub enum Control {
    /// Use this backend set for new connections from now on.
    Backends(Arc<BackendSet>),
    /// Close everything and exit.
    Shutdown,
}

pub struct Worker {
    id: usize,
    config: Arc<Config>,
    poll: Poll,
    control: Receiver<Control>,
    listeners: Vec<TcpListener>,
    /// A listener got a readiness event and has not yet returned `WouldBlock`.
    listener_ready: Vec<bool>,
    /// Accepting is paused until then (after running out of descriptors or memory).
    accept_paused_until: Option<Instant>,
    backends: Arc<BackendSet>,
    counters: Arc<Counters>,
    sessions: Slab<Session>,
    /// Sessions to run again next turn (they stopped early on the byte budget).
    again: Vec<usize>,
    timers: Timers,
    pools: Pools,
    picker: Picker,
    next_id: u64,
    now: Instant,
    accept_error_log: LogLimiter,
    no_backend_log: LogLimiter,
}

impl Worker {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        listeners: Vec<TcpListener>,
        backends: Arc<BackendSet>,
        counters: Arc<Counters>,
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
        let worker = Worker {
            id,
            picker: Picker::new(config.algorithm, id),
            config,
            poll,
            control: rx,
            listeners,
            listener_ready,
            accept_paused_until: None,
            backends,
            pools: Pools::new(Arc::clone(&counters)),
            counters,
            sessions: Slab::new(),
            again: Vec::new(),
            timers: Timers::default(),
            next_id: 0,
            now: Instant::now(),
            accept_error_log: LogLimiter::default(),
            no_backend_log: LogLimiter::default(),
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
            self.run_again();
            self.fire_timers();
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
                None if self.at_max_conns() => MAX_CONNS_RECHECK,
                None => Duration::ZERO,
            };
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        timeout
    }

    /// Drains the control channel. Returns true on shutdown.
    fn handle_control(&mut self) -> bool {
        loop {
            match self.control.try_recv() {
                Ok(Control::Backends(set)) => {
                    self.backends = set;
                    self.picker.reset();
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
    /// exceed it. Without a cap it only counts.
    fn reserve_slot(&self) -> bool {
        let max = self.config.max_conns as u64;
        if max == 0 {
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

    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            // At the cap the connection stays in the kernel's backlog (the client waits)
            // rather than being accepted and closed.
            if !self.reserve_slot() {
                return;
            }
            match self.listeners[i].accept() {
                Ok((stream, addr)) => {
                    Counters::incr(&self.counters.accepted);
                    self.start_session(stream, addr);
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

    fn start_session(&mut self, client: TcpStream, client_addr: SocketAddr) {
        tune_socket(&client, self.config.tcp_keepalive);
        let set = Arc::clone(&self.backends);
        let mut tried = Vec::new();
        let (index, backend) = match self.connect_next(&set, client_addr.ip(), &mut tried) {
            Ok(chosen) => chosen,
            Err(why) => {
                self.reject(client_addr, client, why);
                return;
            }
        };
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let id = self.next_id;
        self.next_id += 1;
        let mut session = Session {
            id,
            client,
            client_addr,
            client_ready: Readiness::default(),
            backend,
            backend_ready: Readiness::default(),
            backend_index: index,
            set,
            phase: Phase::Connecting { attempt: 0, tried },
            last_active: self.now,
            queued: false,
        };
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        let registered = registry
            .register(
                &mut session.client,
                Target::Session(key, Side::Client).token(),
                both,
            )
            .and_then(|()| {
                registry.register(
                    &mut session.backend,
                    Target::Session(key, Side::Backend).token(),
                    both,
                )
            });
        if let Err(e) = registered {
            log::warn!("worker {}: cannot register session: {e}", self.id);
            Counters::decr(&session.backend_stats().active);
            Counters::decr(&self.counters.active);
            Counters::incr(&self.counters.closed);
            return;
        }
        entry.insert(session);
        self.timers.push(Timer {
            at: self.now + self.config.connect_timeout,
            key,
            id,
            kind: TimerKind::Connect { attempt: 0 },
        });
    }

    /// Picks the next candidate not in `tried` and starts a non-blocking connect to it. A
    /// connect that fails at once (no route, refused by a local firewall) counts as a failed
    /// attempt and the next candidate is tried, within `--retries`. Running out of local
    /// descriptors or memory is not the backend's fault: it is not counted against the
    /// backend, accepting pauses, and the client is closed. The chosen backend's active count
    /// is raised here, so least-conn in every worker sees it before the connect completes.
    fn connect_next(
        &mut self,
        set: &BackendSet,
        ip: IpAddr,
        tried: &mut Vec<usize>,
    ) -> Result<(usize, TcpStream), NoConnect> {
        while tried.len() <= self.config.retries as usize {
            let index = self
                .picker
                .pick(set, ip, tried)
                .ok_or(NoConnect::NoBackend)?;
            let backend = &set.backends[index];
            match TcpStream::connect(backend.spec.addr) {
                Ok(stream) => {
                    Counters::incr(&backend.stats.active);
                    return Ok((index, stream));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    Counters::incr(&self.counters.accept_errors);
                    self.resources_exhausted(e);
                    return Err(NoConnect::Exhausted);
                }
                Err(e) => {
                    log::debug!("connect to {} failed at once: {e}", backend.spec.addr);
                    Counters::incr(&backend.stats.active);
                    self.connect_failed(set, index);
                    tried.push(index);
                }
            }
        }
        Err(NoConnect::NoBackend)
    }

    fn connect_failed(&self, set: &BackendSet, index: usize) {
        let stats = &set.backends[index].stats;
        Counters::decr(&stats.active);
        Counters::incr(&stats.connect_failures);
        Counters::incr(&stats.consecutive_failures);
        Counters::incr(&self.counters.connect_failures);
    }

    /// No backend could take this client: close it at once.
    fn reject(&mut self, client_addr: SocketAddr, client: TcpStream, why: NoConnect) {
        Counters::decr(&self.counters.active);
        Counters::incr(&self.counters.closed);
        if why == NoConnect::NoBackend {
            self.no_backend(client_addr);
        }
        drop(client);
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

    // ---- events ---------------------------------------------------------------------------

    fn handle_event(&mut self, key: usize, side: Side, event: &Event) {
        let Some(session) = self.sessions.get_mut(key) else {
            return; // an event for a session closed earlier in this turn
        };
        let ready = match side {
            Side::Client => &mut session.client_ready,
            Side::Backend => &mut session.backend_ready,
        };
        // Errors and hang-ups are surfaced by the next read or write, which is where they are
        // handled; marking the socket ready makes sure that call happens.
        let failed = event.is_error();
        ready.readable |= event.is_readable() || event.is_read_closed() || failed;
        ready.writable |= event.is_writable() || event.is_write_closed() || failed;

        match session.phase {
            Phase::Connecting { .. } if side == Side::Backend => self.check_connect(key),
            Phase::Connecting { .. } => {} // client bytes wait until the backend is connected
            Phase::Relaying { .. } => self.relay(key),
        }
    }

    /// The backend socket of a connecting session changed readiness: did the connect succeed?
    fn check_connect(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if !session.backend_ready.writable {
            return;
        }
        // mio's recipe: a writable event ends the connect; SO_ERROR says how. If there is no
        // error yet the peer address is unknown (ENOTCONN), the event was spurious.
        let result = match session.backend.take_error() {
            Ok(None) => match session.backend.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    session.backend_ready.writable = false;
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
                    session.set.backends[session.backend_index].spec.addr
                );
                self.retry(key);
            }
        }
    }

    fn connected(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let stats = session.backend_stats();
        Counters::incr(&stats.total);
        stats.consecutive_failures.store(0, Relaxed);
        tune_socket(&session.backend, self.config.tcp_keepalive);
        session.phase = Phase::Relaying {
            client_to_backend: Pump::new(self.config.relay),
            backend_to_client: Pump::new(self.config.relay),
        };
        // Bytes may have arrived on either side while connecting, and under edge-triggered
        // readiness their event may already be spent: look once.
        session.client_ready.readable = true;
        session.backend_ready.readable = true;
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

    /// The current connect attempt failed or timed out: try the next candidate or give up.
    fn retry(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Connecting { attempt, tried } = &mut session.phase else {
            return;
        };
        let set = Arc::clone(&session.set);
        let failed = session.backend_index;
        let ip = session.client_addr.ip();
        let mut tried = std::mem::take(tried);
        let attempt = *attempt + 1;
        self.connect_failed(&set, failed);
        tried.push(failed);
        match self.connect_next(&set, ip, &mut tried) {
            Ok((index, mut backend)) => {
                let registered = self.poll.registry().register(
                    &mut backend,
                    Target::Session(key, Side::Backend).token(),
                    Interest::READABLE | Interest::WRITABLE,
                );
                let Some(session) = self.sessions.get_mut(key) else {
                    return;
                };
                // Dropping the old socket closes it, which also removes it from the poller.
                session.backend = backend;
                session.backend_ready = Readiness::default();
                session.backend_index = index;
                session.phase = Phase::Connecting { attempt, tried };
                let id = session.id;
                if let Err(e) = registered {
                    log::warn!("worker {}: cannot register backend socket: {e}", self.id);
                    self.close(key, CloseReason::NoBackend);
                    return;
                }
                self.timers.push(Timer {
                    at: self.now + self.config.connect_timeout,
                    key,
                    id,
                    kind: TimerKind::Connect { attempt },
                });
            }
            Err(why) => {
                let Some(session) = self.sessions.get_mut(key) else {
                    return;
                };
                // `tried` now holds the current backend too, which tells `close` that no
                // backend slot is held any more.
                session.phase = Phase::Connecting { attempt, tried };
                let client_addr = session.client_addr;
                if why == NoConnect::NoBackend {
                    self.no_backend(client_addr);
                }
                self.close(key, CloseReason::NoBackend);
            }
        }
    }

    /// Runs both pumps of a relaying session and closes it when it is finished.
    fn relay(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Phase::Relaying {
            client_to_backend,
            backend_to_client,
        } = &mut session.phase
        else {
            return;
        };
        let (up, up_bytes) = client_to_backend.run(
            &session.client,
            &mut session.client_ready,
            &session.backend,
            &mut session.backend_ready,
            &mut self.pools,
        );
        let (down, down_bytes) = backend_to_client.run(
            &session.backend,
            &mut session.backend_ready,
            &session.client,
            &mut session.client_ready,
            &mut self.pools,
        );
        let both_done = client_to_backend.is_done() && backend_to_client.is_done();
        if up_bytes + down_bytes > 0 {
            session.last_active = self.now;
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
        }
        let failed = match (up, down) {
            (Outcome::SourceFailed, _) | (_, Outcome::DestinationFailed) => Some(Side::Client),
            (Outcome::DestinationFailed, _) | (_, Outcome::SourceFailed) => Some(Side::Backend),
            _ => None,
        };
        if let Some(side) = failed {
            self.close(key, CloseReason::Reset(side));
        } else if both_done {
            self.close(key, CloseReason::Done);
        } else if (up == Outcome::Yield || down == Outcome::Yield) && !session.queued {
            session.queued = true;
            self.again.push(key);
        }
    }

    fn run_again(&mut self) {
        let keys = std::mem::take(&mut self.again);
        for &key in &keys {
            if let Some(session) = self.sessions.get_mut(key) {
                session.queued = false;
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
        while let Some(timer) = self.timers.pop_expired(self.now) {
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
                        attempt: current, ..
                    },
                ) if attempt == *current => {
                    log::debug!(
                        "connect to {} timed out",
                        session.set.backends[session.backend_index].spec.addr
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
                _ => {} // armed for an earlier phase or attempt
            }
        }
    }

    // ---- closing --------------------------------------------------------------------------

    /// Ends a session: releases its pipes and buffers and its counts, and closes both sockets
    /// (dropping a mio socket closes it and removes it from the poller).
    fn close(&mut self, key: usize, reason: CloseReason) {
        if !self.sessions.contains(key) {
            return;
        }
        let mut session = self.sessions.remove(key);
        session.release(&mut self.pools);
        // A session holds a slot in its backend's active count unless its current backend is
        // one that already failed for it (the failure gave the slot back).
        let holds_slot = match &session.phase {
            Phase::Connecting { tried, .. } => !tried.contains(&session.backend_index),
            Phase::Relaying { .. } => true,
        };
        if holds_slot {
            Counters::decr(&session.backend_stats().active);
        }
        if let CloseReason::Reset(side) = reason {
            Counters::incr(&self.counters.resets);
            // Pass the abort on: the other peer sees a reset, not a clean end of stream.
            let other = match side {
                Side::Client => &session.backend,
                Side::Backend => &session.client,
            };
            let _ = SockRef::from(other).set_linger(Some(Duration::ZERO));
        }
        log::debug!(
            "session {} from {} closed: {reason:?}",
            session.id,
            session.client_addr
        );
        Counters::decr(&self.counters.active);
        Counters::incr(&self.counters.closed);
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
    /// This process is out of descriptors or memory.
    Exhausted,
}

/// Errors that say this process or machine is out of descriptors or memory.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// TCP_NODELAY (a proxy must not add Nagle delay to small messages) and keepalive (so a peer
/// that vanished is noticed on an otherwise idle long-lived connection).
fn tune_socket(stream: &TcpStream, keepalive: Option<Duration>) {
    let sock = SockRef::from(stream);
    let mut result = sock.set_tcp_nodelay(true);
    if let Some(idle) = keepalive {
        let ka = TcpKeepalive::new().with_time(idle).with_interval(
            idle.min(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
        );
        result = result.and_then(|()| sock.set_tcp_keepalive(&ka));
    }
    if let Err(e) = result {
        log::debug!("cannot set socket options: {e}");
    }
}

/// Chooses backends for one worker. Least-conn and source-hash are stateless here; round-robin
/// keeps its rotation per worker.
struct Picker {
    algorithm: Algorithm,
    round_robin: SmoothRoundRobin,
    /// xorshift state: a random start for least-conn's scan, so ties do not send every worker
    /// to the same backend.
    rng: u64,
}

impl Picker {
    fn new(algorithm: Algorithm, worker: usize) -> Picker {
        let seed =
            (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
        Picker {
            algorithm,
            round_robin: SmoothRoundRobin::default(),
            rng: seed | 1,
        }
    }

    fn reset(&mut self) {
        self.round_robin = SmoothRoundRobin::default();
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pick(&mut self, set: &BackendSet, ip: IpAddr, tried: &[usize]) -> Option<usize> {
        let usable = |i: usize| set.is_eligible(i) && !tried.contains(&i);
        let n = set.len();
        match self.algorithm {
            Algorithm::LeastConn => {
                let start = self.next_random() as usize;
                least_conn(n, start, |i| {
                    usable(i).then(|| Load {
                        active: set.backends[i].stats.active.load(Relaxed),
                        weight: set.backends[i].spec.weight,
                    })
                })
            }
            Algorithm::SourceHash => set.pick_by_source(ip, tried),
            Algorithm::RoundRobin => self
                .round_robin
                .pick(n, |i| usable(i).then_some(set.backends[i].spec.weight)),
        }
    }
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
