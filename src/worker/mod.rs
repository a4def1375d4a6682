//! A worker: one thread, one `mio::Poll`, its own listeners, and the sessions it accepted.
//!
//! Each turn of the loop waits for readiness events (or the next timer, or not at all when
//! work is left over from the previous turn), then
//!
//! 1. records readiness and hands each event to the session it concerns;
//! 2. accepts new clients from listeners that are ready, at most `ACCEPT_BATCH` per listener
//!    per turn so a connection storm cannot starve live sessions (a drain takes the whole
//!    backlog), each only with a descriptor in reserve for its backend socket;
//! 3. runs sessions that used up their byte budget last turn;
//! 4. places queued clients while backends have room;
//! 5. fires expired timers (connect, idle, backend and queue timeouts, the drain deadline and
//!    drain closes, and lingering sockets' looks).
//!
//! A session decides what happens to it (`session/state.rs`: an event in, actions out); the
//! worker owns what sessions share (the poller, the slab, the queue, the timers, the pools,
//! the picker) and carries the actions out. The files, one concern each:
//!
//! - `mod.rs`: the loop, control messages, and the worker's fields;
//! - `dispatch.rs`: events to sessions, their actions carried out, closing;
//! - `accept.rs`: accepting, `--max-conns`, the descriptor held in reserve;
//! - `place.rs`: picking a backend, connecting, retrying, the queue;
//! - `drain.rs`: holdfast's graceful shutdown and a drained backend's spread-out closes;
//! - `upgrade.rs`: the live upgrade's batches (frozen and released or resumed; rebuilt and
//!   adopted or discarded).
//!
//! Nothing here blocks, and nothing takes a lock: the backend set is an immutable snapshot
//! swapped in by a control message, and the only shared writes are relaxed atomic counters.

mod accept;
mod dispatch;
mod drain;
mod place;
mod upgrade;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use crate::backend::BackendSet;
use crate::client_ip::IpLimits;
use crate::config::Config;
use crate::plane::{Control, HealthLink};
use crate::relay::Pools;
use crate::session::{Rules, Session};
use crate::stats::Counters;
use crate::timer::Timers;
use crate::token::Target;

use place::{Placer, QUEUE_COMPACT_MIN, QUEUE_RECHECK};

pub struct Worker {
    id: usize,
    config: Arc<Config>,
    /// The settings sessions' transitions depend on (from `config`).
    rules: Rules,
    poll: Poll,
    control: Receiver<Control>,
    /// `None` once closed (by a drain).
    listeners: Vec<Option<TcpListener>>,
    /// A listener got a readiness event and has not yet returned `WouldBlock`.
    listener_ready: Vec<bool>,
    /// Accepting is paused until then (after running out of descriptors or memory).
    accept_paused_until: Option<Instant>,
    /// A descriptor held in reserve for the backend socket of the next client (a TCP socket,
    /// `accept::Spare`): a client is accepted only while one is held, and the backend connect
    /// uses it (or closes it just before making its socket). So holdfast never accepts a
    /// client it has no descriptor to serve with. Refilled before each accept.
    spare: Option<accept::Spare>,
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
    /// Picks backends and starts connects; counts their failures.
    placer: Placer,
    timers: Timers,
    pools: Pools,
    next_id: u64,
    now: Instant,
    accept_error_log: LogLimiter,
    no_backend_log: LogLimiter,
    queue_log: LogLimiter,
    /// A graceful shutdown is under way: listeners close once their backlog is taken, and
    /// the worker exits when they are closed and the last session has ended.
    draining: bool,
    /// The drain's `--close-spread`, for its deadline.
    close_spread: Duration,
    /// The listen address of each listener, for session logs (kept after a drain closes them).
    listen_addrs: Vec<SocketAddr>,
    /// The per-IP limits' table, shared by every worker (`None`: no per-IP limit).
    ip_limits: Option<Arc<IpLimits>>,
    /// When worker 0 next sweeps the per-IP table.
    next_sweep: Instant,
    /// PROXY header errors and refused clients, logged at most once a second.
    client_ip_log: LogLimiter,
    /// The live upgrade's batches under way.
    batches: upgrade::Batches,
    /// Live upgrade: the listeners were given to a new process, which accepts now; this
    /// worker does not (until the handover fails).
    listeners_given: bool,
}

impl Worker {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        listeners: Vec<TcpListener>,
        backends: Arc<BackendSet>,
        counters: Arc<Counters>,
        health: HealthLink,
        ip_limits: Option<Arc<IpLimits>>,
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
        let pools = Pools::new(Arc::clone(&counters)).with_pipe_memory(config.pipe_memory);
        let worker = Worker {
            id,
            rules: Rules::new(&config),
            placer: Placer::new(id, Arc::clone(&config), Arc::clone(&counters), health),
            config,
            poll,
            control: rx,
            listeners,
            listener_ready,
            accept_paused_until: None,
            spare: accept::reserve_descriptor().ok(),
            backends,
            pools,
            counters,
            sessions: Slab::new(),
            again: Vec::new(),
            queue: VecDeque::new(),
            queue_compact_at: QUEUE_COMPACT_MIN,
            timers: Timers::default(),
            next_id: 0,
            now: Instant::now(),
            accept_error_log: LogLimiter::default(),
            no_backend_log: LogLimiter::default(),
            queue_log: LogLimiter::default(),
            draining: false,
            close_spread: Duration::ZERO,
            listen_addrs,
            ip_limits,
            next_sweep: Instant::now() + IP_SWEEP_INTERVAL,
            client_ip_log: LogLimiter::default(),
            batches: upgrade::Batches::default(),
            listeners_given: false,
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
            self.sweep_ip_limits();
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
                None if self.at_max_conns() && !self.draining => accept::MAX_CONNS_RECHECK,
                None => Duration::ZERO,
            };
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        if !self.queue.is_empty() {
            timeout = Some(timeout.map_or(QUEUE_RECHECK, |t| t.min(QUEUE_RECHECK)));
        }
        // Worker 0 sweeps the per-IP table on time even when it has nothing else to do (the
        // table's entries belong to every worker's clients).
        if self.id == 0 && self.ip_limits.is_some() {
            let wait = self.next_sweep.saturating_duration_since(now);
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
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
                        self.placer.reset();
                    }
                    self.backends = set;
                }
                Ok(Control::Drain { timeout, spread }) => self.start_drain(timeout, spread),
                Ok(Control::CloseBackend { addr, spread }) => self.close_backend(addr, spread),
                Ok(Control::Freeze { id, max_fds, reply }) => {
                    let frozen = self.freeze(id, max_fds);
                    if let Err(e) = reply.send(frozen) {
                        // Nobody waits for it: the batch stays here.
                        log::warn!("worker {}: frozen batch not taken; resuming it", self.id);
                        drop(e);
                        self.resume_frozen(id);
                    }
                }
                Ok(Control::Release { id }) => self.release_frozen(id),
                Ok(Control::Resume { id }) => self.resume_frozen(id),
                Ok(Control::Rebuild {
                    id,
                    sessions,
                    fds,
                    reply,
                }) => {
                    let result = self.rebuild(id, sessions, fds);
                    if reply.send(result).is_err() {
                        self.discard(id);
                    }
                }
                Ok(Control::Adopt { id }) => self.adopt(id),
                Ok(Control::Discard { id }) => self.discard(id),
                Ok(Control::Listeners { reply }) => {
                    let _ = reply.send(self.listener_copies());
                }
                Ok(Control::Accepting(on)) => self.set_accepting(on),
                Ok(Control::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }
}

/// How often worker 0 removes idle entries from the per-IP table.
const IP_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

impl Worker {
    /// Worker 0 sweeps the shared per-IP table every few seconds, so entries of clients
    /// gone quiet do not wait for an insert into a full shard to be removed.
    fn sweep_ip_limits(&mut self) {
        if self.id != 0 || self.now < self.next_sweep {
            return;
        }
        self.next_sweep = self.now + IP_SWEEP_INTERVAL;
        if let Some(limits) = &self.ip_limits {
            limits.sweep(self.now);
            self.counters
                .ip_table_entries
                .store(limits.len() as u64, Relaxed);
            self.counters
                .ip_table_untracked
                .store(limits.untracked_total(), Relaxed);
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
