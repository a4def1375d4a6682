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
//! - `rebalance.rs`: moving sessions off over-loaded backends after a scale-out, and
//!   `--max-session-age`;
//! - `upgrade.rs`: the live upgrade's batches (frozen and released or resumed; rebuilt and
//!   adopted or discarded).
//!
//! Nothing here blocks, and nothing takes a lock: the backend set is an immutable snapshot
//! swapped in by a control message, and the only shared writes are relaxed atomic counters.

/// Counts one event of service number `$s` in the process's counter and in the service's own,
/// both named `$field` (`-` after the field: takes one off a gauge instead).
macro_rules! count {
    ($worker:expr, $s:expr, $field:ident) => {{
        let s: usize = $s;
        crate::stats::Counters::incr(&$worker.counters.$field);
        if let Some(served) = $worker.services.get(s) {
            crate::stats::Counters::incr(&served.counters.$field);
        }
    }};
    ($worker:expr, $s:expr, $field:ident, -) => {{
        let s: usize = $s;
        crate::stats::Counters::decr(&$worker.counters.$field);
        if let Some(served) = $worker.services.get(s) {
            crate::stats::Counters::decr(&served.counters.$field);
        }
    }};
}

mod accept;
mod dispatch;
mod drain;
mod place;
mod rebalance;
mod services;
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
use crate::plane::Control;
use crate::relay::Pools;
use crate::session::{Rules, Session};
use crate::stats::{Counters, ServiceCounters};
use crate::timer::Timers;
use crate::token::Target;

use place::{Placer, QUEUE_COMPACT_MIN, QUEUE_RECHECK};

/// A service as one worker serves it: its settings, the backend set it was last sent, its
/// picker, its queue and its per-IP table. Indexed by the service's number, which is the same
/// in every worker and in the health thread that publishes its sets.
pub struct Served {
    name: Arc<str>,
    /// Removed by a reload: its sessions drain, and it takes no new ones.
    removed: bool,
    config: Arc<Config>,
    /// The settings its sessions' transitions depend on (from `config`).
    rules: Rules,
    backends: Arc<BackendSet>,
    /// Picks its backends and starts connects; counts their failures.
    placer: Placer,
    /// Its clients waiting for a backend with room, oldest first: (slab key, session id). An
    /// entry whose session has gone (or whose key now holds another session) is skipped.
    queue: VecDeque<(usize, u64)>,
    /// The queue length at which its stale entries are next dropped.
    queue_compact_at: usize,
    /// Its per-IP limits' table, shared by every worker (`None`: no per-IP limit).
    ip_limits: Option<Arc<IpLimits>>,
    /// Its own counters, shared by every worker.
    counters: Arc<ServiceCounters>,
}

pub(crate) use crate::plane::ServiceStart as ServiceInit;

impl Served {
    /// Worker `worker`'s part of a service, and its listeners (not registered yet).
    fn new(
        worker: usize,
        start: ServiceInit,
        counters: &Arc<Counters>,
    ) -> (Served, Vec<TcpListener>) {
        let served = Served {
            name: start.name,
            removed: false,
            rules: Rules::new(&start.config),
            placer: Placer::new(
                worker,
                Arc::clone(&start.config),
                Arc::clone(counters),
                Arc::clone(&start.counters),
                start.health,
            ),
            config: start.config,
            backends: start.backends,
            queue: VecDeque::new(),
            queue_compact_at: QUEUE_COMPACT_MIN,
            ip_limits: start.ip_limits,
            counters: start.counters,
        };
        (served, start.listeners)
    }
}

pub struct Worker {
    id: usize,
    /// The process-wide settings (`--workers`, `--max-conns`): the first service's.
    config: Arc<Config>,
    /// Every service this worker serves, by number.
    services: Vec<Served>,
    poll: Poll,
    control: Receiver<Control>,
    /// `None` once closed (by a drain).
    listeners: Vec<Option<TcpListener>>,
    /// The service of each listener.
    listener_service: Vec<u16>,
    /// A listener got a readiness event and has not yet returned `WouldBlock`.
    listener_ready: Vec<bool>,
    /// Accepting is paused until then (after running out of descriptors or memory).
    accept_paused_until: Option<Instant>,
    /// A descriptor held in reserve for the backend socket of the next client (a TCP socket,
    /// `accept::Spare`): a client is accepted only while one is held, and the backend connect
    /// uses it (or closes it just before making its socket). So holdfast never accepts a
    /// client it has no descriptor to serve with. Refilled before each accept.
    spare: Option<accept::Spare>,
    counters: Arc<Counters>,
    sessions: Slab<Session>,
    /// Sessions to run again next turn (they stopped early on the byte budget).
    again: Vec<usize>,
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
    /// The `--close-spread` of the last service removed, for its deadline.
    removed_spread: Duration,
    /// The listen address of each listener, for session logs (kept after a drain closes them).
    listen_addrs: Vec<SocketAddr>,
    /// When worker 0 next sweeps the per-IP table.
    next_sweep: Instant,
    /// PROXY header errors and refused clients, logged at most once a second.
    client_ip_log: LogLimiter,
    /// The live upgrade's batches under way.
    batches: upgrade::Batches,
    /// Live upgrade: the listeners were given to a new process, which accepts now; this
    /// worker does not (until the handover fails).
    listeners_given: bool,
    /// This worker's part of the rebalance under way, if one is.
    rebalance: Option<rebalance::Rebalancing>,
    /// Chooses a rebalance's victims and each session's age jitter.
    rebalance_rng: rebalance::Rng,
}

impl Worker {
    /// A worker serving `services` (numbered in this order); `config` holds the process-wide
    /// settings.
    pub(crate) fn new(
        id: usize,
        config: Arc<Config>,
        services: Vec<ServiceInit>,
        counters: Arc<Counters>,
    ) -> io::Result<(Worker, Sender<Control>, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), Target::Waker.token())?);
        let mut listeners = Vec::new();
        let mut listener_service = Vec::new();
        let mut served = Vec::with_capacity(services.len());
        for (number, service) in services.into_iter().enumerate() {
            let number =
                u16::try_from(number).map_err(|_| io::Error::other("more than 65536 services"))?;
            let (service, own) = Served::new(id, service, &counters);
            listener_service.extend(own.iter().map(|_| number));
            listeners.extend(own);
            served.push(service);
        }
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
            config,
            services: served,
            poll,
            control: rx,
            listeners,
            listener_service,
            listener_ready,
            accept_paused_until: None,
            spare: accept::reserve_descriptor().ok(),
            pools,
            counters,
            sessions: Slab::new(),
            again: Vec::new(),
            timers: Timers::default(),
            next_id: 0,
            now: Instant::now(),
            accept_error_log: LogLimiter::default(),
            no_backend_log: LogLimiter::default(),
            queue_log: LogLimiter::default(),
            draining: false,
            close_spread: Duration::ZERO,
            removed_spread: Duration::ZERO,
            listen_addrs,
            next_sweep: Instant::now() + IP_SWEEP_INTERVAL,
            client_ip_log: LogLimiter::default(),
            batches: upgrade::Batches::default(),
            listeners_given: false,
            rebalance: None,
            rebalance_rng: rebalance::Rng::new(rebalance::seed(id)),
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
            // While a handover to a new process is under way its queue waits: the slots its
            // sessions free as they leave are the new process's (until it drains after a
            // handover, or accepts again after a failed one).
            let handing_over = self.listeners_given && !self.draining;
            if !handing_over && self.services.iter().any(|s| !s.queue.is_empty()) {
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
        if self.services.iter().any(|s| !s.queue.is_empty()) {
            timeout = Some(timeout.map_or(QUEUE_RECHECK, |t| t.min(QUEUE_RECHECK)));
        }
        // Worker 0 sweeps the per-IP table on time even when it has nothing else to do (the
        // table's entries belong to every worker's clients).
        if self.id == 0 && self.services.iter().any(|s| s.ip_limits.is_some()) {
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
                Ok(Control::Backends(service, set)) => {
                    if let Some(served) = self.services.get_mut(service) {
                        if !set.same_places(&served.backends) {
                            served.placer.reset();
                        }
                        served.backends = set;
                    }
                }
                Ok(Control::Drain { timeout, spread }) => self.start_drain(timeout, spread),
                Ok(Control::CloseBackend {
                    service,
                    addr,
                    spread,
                }) => self.close_backend(service, addr, spread),
                Ok(Control::Rebalance(service, start)) => self.start_rebalance(service, start),
                Ok(Control::Freeze {
                    id,
                    max_fds,
                    queued,
                    reply,
                }) => {
                    let frozen = self.freeze(id, max_fds, queued);
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
                Ok(Control::Adopt { id, paused_since }) => self.adopt(id, paused_since),
                Ok(Control::Discard { id }) => self.discard(id),
                Ok(Control::Listeners { reply }) => {
                    let _ = reply.send(self.listener_copies());
                }
                Ok(Control::Accepting(on)) => self.set_accepting(on),
                Ok(Control::AddService { number, start }) => self.add_service(number, start),
                Ok(Control::RemoveService {
                    number,
                    timeout,
                    spread,
                }) => self.remove_service(number, timeout, spread),
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
        let (mut entries, mut untracked) = (0, 0);
        for served in &self.services {
            let Some(limits) = &served.ip_limits else {
                continue;
            };
            limits.sweep(self.now);
            let (mine, unmine) = (limits.len() as u64, limits.untracked_total());
            served.counters.ip_table_entries.store(mine, Relaxed);
            served.counters.ip_table_untracked.store(unmine, Relaxed);
            entries += mine;
            untracked += unmine;
        }
        self.counters.ip_table_entries.store(entries, Relaxed);
        self.counters.ip_table_untracked.store(untracked, Relaxed);
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
