//! The health thread: the one owner of each backend's state.
//!
//! One thread runs the checks of every service ([`HealthThread`], in `thread.rs`); each
//! service's [`Health`] keeps its own backends, probes, commands and published set.
//! Everything that changes which backends new clients may reach comes here, and only this
//! thread publishes new [`BackendSet`]s to the workers:
//!
//! - **active probes**: every `--health-interval`, each backend is probed (a TCP connect, a
//!   WebSocket upgrade that must be answered `101`, or a send/expect exchange) with
//!   `--health-timeout`. Probes run concurrently on this thread's `mio::Poll`, so one
//!   backend that never answers cannot delay the others; at most [`MAX_PROBES_IN_FLIGHT`] at
//!   once, the rest waiting in a queue ordered by due time, so a large pool cannot take every
//!   descriptor. Probe start times are spread over the interval with a little jitter, so a
//!   large pool is not probed in one burst. `--rise` consecutive successes bring a down
//!   backend up, `--fall` consecutive failures take an up backend down (HAProxy's defaults).
//!   Backends start up and are confirmed by the first probes.
//! - **passive detection**: workers count failures seen on real traffic in the backend's shared
//!   `consecutive_failures`; the worker whose failure crosses `--observe-errors` sends
//!   [`Command::Failing`], and the backend goes down at once, without waiting for probes.
//! - **slow start**: a backend that comes up ramps its effective weight from 1/20 to full over
//!   `--slow-start`; while any backend ramps, a new set is published every few percent of the
//!   window.
//! - **the backend list**: [`Command::SetBackends`] replaces it (backends that stay keep their
//!   state and counters; new ones start up, with slow start; removed ones are drained and
//!   leave the set once their last session has ended);
//! - **operators**: [`Command::Backend`] drains a backend (no new sessions; with
//!   `--backend-drain-timeout`, its remaining sessions are closed, spread out, after the
//!   timeout), puts it back in rotation, or changes its weight.
//!
//! Workers never wait for this thread: they read the last set they were sent.

mod probe;
mod thread;

pub(crate) use thread::HealthThread;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use mio::{Registry, Waker};
use slab::Slab;

use crate::backend::{Backend, BackendSet, BackendState};
use crate::config::{BackendSpec, Config, HealthCheck};
use crate::plane::{
    BackendChange, Command, Control, ControlError, HealthLink, Published, RebalanceStart,
    WorkerLink,
};
use crate::sys::is_resource_exhaustion;
use crate::upgrade::wire::BackendInfo;
use probe::{Probe, ProbeStep};

/// Slow start begins at this fraction of the full weight.
const SLOW_START_FLOOR: u32 = 20;
/// While a backend ramps, the set is republished this many times over the window.
const SLOW_START_STEPS: u32 = 32;
/// How often a removed backend is checked for its last session having ended.
const LEAVER_RECHECK: Duration = Duration::from_millis(100);
/// Most probes in flight at once, each holding a socket until it ends or times out. Probes
/// due beyond it wait for a slot, the longest overdue first: a pool of thousands of backends
/// that do not answer must not take the descriptors clients need.
const MAX_PROBES_IN_FLIGHT: usize = 256;
/// A set changed by probes or passive detection is published at most this often, plus
/// [`PUBLISH_GAP_PER_BACKEND`] per backend: building and sending a set costs time in its size,
/// and a large pool whose backends change state one by one would otherwise be rebuilt
/// hundreds of times a second. Operators' changes and new lists are published at once.
const PUBLISH_GAP: Duration = Duration::from_millis(10);
const PUBLISH_GAP_PER_BACKEND: Duration = Duration::from_micros(1);
/// Per-backend changes are logged one line each, up to [`CHANGE_LINES`] per
/// [`CHANGE_WINDOW`]; the rest are counted and summed up in one line when the window ends.
const CHANGE_WINDOW: Duration = Duration::from_secs(1);
const CHANGE_LINES: usize = 10;

/// What the health thread knows of one backend.
struct Tracked {
    state: BackendState,
    /// Consecutive successful probes.
    successes: u32,
    /// Consecutive failed probes.
    failures: u32,
    next_probe: Instant,
    /// A probe is under way (its slab key).
    probe: Option<usize>,
    /// Slow start began then; `None` once at full weight.
    ramp_from: Option<Instant>,
    /// When it went down (without probes, a passively failed backend is retried after a while).
    down_since: Option<Instant>,
    /// Drained: by an operator, or because it was removed from the list.
    drained: bool,
    /// Removed from the list; leaves the set once its last session ends.
    leaving: bool,
    /// The operator's weight, replacing the configured one.
    weight: Option<u32>,
    /// With `--backend-drain-timeout`: when the drained backend's remaining sessions are closed.
    close_at: Option<Instant>,
}

pub struct Health {
    config: Arc<Config>,
    /// The number of the service whose backends these are (in every worker's list).
    service: usize,
    /// Its place on the health thread, which its probes' tokens carry.
    slot: usize,
    commands: Receiver<Command>,
    workers: Vec<WorkerLink>,
    current: Published,
    /// The configured list, then the removed backends still draining.
    specs: Vec<BackendSpec>,
    leaving: Vec<BackendSpec>,
    tracked: HashMap<SocketAddr, Tracked>,
    probes: Slab<Probe>,
    /// When each backend without a probe in flight is due for one, soonest first. An entry
    /// whose time is not its backend's `next_probe` (or whose backend is gone, leaving, or
    /// being probed) is stale and skipped. Kept only when probing.
    due: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    /// A new set must be published (a state changed).
    dirty: bool,
    last_publish: Instant,
    changes: ChangeLog,
    next_ramp_publish: Option<Instant>,
    rng: u64,
}

impl Health {
    /// Prepares a service's checks and its first backend set (with `--slow-start-on-boot`,
    /// every backend starts its ramp now); `waker` is the health thread's. Workers are
    /// attached with [`Health::attach`] before the checks join the thread
    /// ([`HealthThread::add`]).
    pub fn new(config: Arc<Config>, waker: Arc<Waker>) -> (Health, HealthLink, Published) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let now = Instant::now();
        let ramp_from =
            (config.health.slow_start.is_some() && config.health.slow_start_on_boot).then_some(now);
        let n = config.backends.len().max(1) as u32;
        let tracked: HashMap<SocketAddr, Tracked> = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                // The first probes are spread evenly over the first interval.
                let offset = config.health.interval * i as u32 / n;
                (spec.addr, Tracked::up(now + offset, ramp_from))
            })
            .collect();
        let current = Arc::new(Mutex::new(Arc::new(BackendSet::build(
            &config.backends,
            None,
            config.algorithm,
        ))));
        let mut health = Health {
            specs: config.backends.clone(),
            leaving: Vec::new(),
            config,
            service: 0,
            slot: 0,
            commands: rx,
            workers: Vec::new(),
            current: Arc::clone(&current),
            due: BinaryHeap::new(),
            tracked,
            probes: Slab::new(),
            dirty: false,
            last_publish: now,
            changes: ChangeLog::default(),
            next_ramp_publish: None,
            rng: u64::from(std::process::id()) | 1,
        };
        let due: Vec<(SocketAddr, Instant)> = health
            .tracked
            .iter()
            .map(|(a, t)| (*a, t.next_probe))
            .collect();
        for (addr, at) in due {
            health.queue_probe(addr, at);
        }
        let inherited = health.inherit(now);
        // Apply the boot ramp's starting weights (and what an old process handed over) before
        // any worker sees the set.
        if ramp_from.is_some() || inherited {
            health.publish(now);
        }
        (health, HealthLink::new(tx, waker), current)
    }

    /// Live upgrade, old side: the running state of the listed backends.
    fn snapshot(&self, now: Instant) -> Vec<BackendInfo> {
        self.specs
            .iter()
            .filter_map(|spec| {
                let t = self.tracked.get(&spec.addr)?;
                Some(BackendInfo {
                    // Named by the handle, which knows the service's name.
                    service: String::new(),
                    addr: spec.addr,
                    down: t.state == BackendState::Down,
                    drained: t.drained,
                    configured_weight: spec.weight,
                    operator_weight: t.weight,
                    ramp_ms: t.ramp_from.map(|from| {
                        u64::try_from(now.saturating_duration_since(from).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                })
            })
            .collect()
    }

    /// Live upgrade, new side: the old process's state of each backend this configuration
    /// lists too (by address). A down backend stays down until probed up (`--rise` probes;
    /// without probes, retried as one that failed just now); a drained one stays drained (its
    /// `--backend-drain-timeout` starts again); an operator's weight stays while the
    /// configured weight is the one it replaced; slow start carries on where it was (a backend
    /// that had finished its ramp does not start one again). Says whether anything applied.
    fn inherit(&mut self, now: Instant) -> bool {
        let configured: HashMap<SocketAddr, u32> =
            self.specs.iter().map(|s| (s.addr, s.weight)).collect();
        let slow_start = self.config.health.slow_start.is_some();
        let (fall, drain_timeout) = (self.config.health.fall, self.config.backend_drain_timeout);
        let mut applied = false;
        for info in &self.config.inherited_backends {
            let Some(t) = self.tracked.get_mut(&info.addr) else {
                continue;
            };
            applied = true;
            if slow_start {
                t.ramp_from = info
                    .ramp_ms
                    .and_then(|ms| now.checked_sub(Duration::from_millis(ms)));
            }
            if info.down {
                t.mark_down(now, fall);
            }
            if info.drained {
                t.start_drain(now, drain_timeout);
            }
            if configured.get(&info.addr) == Some(&info.configured_weight) {
                t.weight = info.operator_weight;
            }
        }
        applied
    }

    pub fn attach(&mut self, service: usize, workers: Vec<WorkerLink>) {
        self.service = service;
        self.workers = workers;
    }

    /// Takes the commands sent to this service; true once it is told to shut down (its
    /// checks are over and it leaves the thread).
    fn take_commands(&mut self, now: Instant) -> bool {
        let stop = self.handle_commands(now);
        if stop {
            self.changes.flush();
        }
        stop
    }

    /// Everything due by `now`: expired probes, due probes started (registered on the
    /// thread's poll), backends recovered, drains ended, and a changed set published.
    fn turn(&mut self, now: Instant, registry: &Registry) {
        self.expire_probes(now);
        self.start_due_probes(now, registry);
        self.recover_unprobed(now);
        self.drain_deadlines(now);
        self.forget_empty_leavers(now);
        self.changes.tick(now);
        if self.publish_due(now) || self.next_ramp_publish.is_some_and(|at| at <= now) {
            self.publish(now);
        }
    }

    /// Returns true on shutdown.
    fn handle_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::SetBackends(specs, done)) => {
                    self.set_backends(specs, now);
                    self.publish(now);
                    let _ = done.send(());
                }
                Ok(Command::Failing(addr)) => self.passive_failure(addr, now),
                Ok(Command::Backend(addr, change, done)) => {
                    let result = self.change_backend(addr, change, now);
                    if result.is_ok() {
                        self.publish(now);
                    }
                    let _ = done.send(result);
                }
                Ok(Command::Snapshot(reply)) => {
                    let _ = reply.send(self.snapshot(now));
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    fn set_backends(&mut self, specs: Vec<BackendSpec>, now: Instant) {
        let ramp = self.config.health.slow_start.map(|_| now);
        let interval = self.config.health.interval;
        let n = specs.len().max(1) as u32;
        // The list is the configuration; an operator's weight changes only the running state.
        // A backend whose configured weight changes takes it, dropping the operator's; one
        // whose configured weight stays keeps the operator's. An operator's drain is an
        // operation, not configuration, and stays.
        let configured: HashMap<SocketAddr, u32> =
            self.specs.iter().map(|s| (s.addr, s.weight)).collect();
        for (i, spec) in specs.iter().enumerate() {
            match self.tracked.get_mut(&spec.addr) {
                Some(t) if t.leaving => {
                    let addr = spec.addr;
                    self.changes
                        .log(now, Change::Added, || format!("backend {addr} added back"));
                    t.leaving = false;
                    t.drained = false;
                    t.close_at = None;
                    t.weight = None;
                    let at = t.next_probe;
                    self.queue_probe(spec.addr, at);
                }
                Some(t) => {
                    if let Some(w) = t.weight
                        && configured.get(&spec.addr) != Some(&spec.weight)
                    {
                        t.weight = None;
                        let (addr, weight) = (spec.addr, spec.weight);
                        self.changes.log(now, Change::Reweighted, || {
                            format!(
                                "backend {addr}: weight {weight} from the new list replaces the \
                                 weight {w} set at run time"
                            )
                        });
                    }
                }
                None => {
                    let addr = spec.addr;
                    self.changes
                        .log(now, Change::Added, || format!("backend {addr} added"));
                    let at = now + interval * i as u32 / n;
                    self.tracked.insert(spec.addr, Tracked::up(at, ramp));
                    self.queue_probe(spec.addr, at);
                }
            }
        }
        let listed: HashSet<SocketAddr> = specs.iter().map(|s| s.addr).collect();
        let removed: Vec<BackendSpec> = self
            .specs
            .iter()
            .chain(&self.leaving)
            .filter(|old| !listed.contains(&old.addr))
            .cloned()
            .collect();
        for spec in &removed {
            if let Some(t) = self.tracked.get_mut(&spec.addr)
                && !t.leaving
            {
                let addr = spec.addr;
                self.changes.log(now, Change::Removed, || {
                    format!("backend {addr} removed: draining until its last session ends")
                });
                t.leaving = true;
                t.start_drain(now, self.config.backend_drain_timeout);
                if let Some(key) = t.probe.take() {
                    self.probes.try_remove(key);
                }
            }
        }
        self.leaving = removed;
        self.specs = specs;
    }

    fn change_backend(
        &mut self,
        addr: SocketAddr,
        change: BackendChange,
        now: Instant,
    ) -> Result<(), ControlError> {
        let drain_timeout = self.config.backend_drain_timeout;
        let t = self
            .tracked
            .get_mut(&addr)
            .filter(|t| !t.leaving)
            .ok_or(ControlError::UnknownBackend(addr))?;
        match change {
            BackendChange::Drain if !t.drained => {
                log::info!("backend {addr} set to DRAIN by an operator");
                t.start_drain(now, drain_timeout);
            }
            BackendChange::Ready if t.drained => {
                log::info!("backend {addr} set to READY by an operator");
                t.drained = false;
                t.close_at = None;
            }
            BackendChange::Weight(w) => {
                log::info!("backend {addr} weight set to {w} by an operator");
                t.weight = Some(w);
            }
            BackendChange::Drain | BackendChange::Ready => {}
        }
        Ok(())
    }

    /// `--backend-drain-timeout` has passed for a drained backend: its workers close its
    /// remaining sessions, spread over `--close-spread`.
    fn drain_deadlines(&mut self, now: Instant) {
        for (addr, t) in &mut self.tracked {
            if t.close_at.is_some_and(|at| at <= now) {
                t.close_at = None;
                log::info!(
                    "backend {addr}: drain timeout reached; closing its remaining sessions over {:?}",
                    self.config.close_spread
                );
                for w in &self.workers {
                    w.send(Control::CloseBackend {
                        service: self.service,
                        addr: *addr,
                        spread: self.config.close_spread,
                    });
                }
            }
        }
    }

    /// A removed backend leaves the set once it holds no session.
    fn forget_empty_leavers(&mut self, now: Instant) {
        if self.leaving.is_empty() {
            return;
        }
        let current = self.current_set();
        let current = current.by_addr();
        let before = self.leaving.len();
        self.leaving.retain(|spec| {
            current
                .get(&spec.addr)
                .is_some_and(|b| b.stats.active() > 0)
        });
        if self.leaving.len() != before {
            let listed: HashSet<SocketAddr> = self
                .specs
                .iter()
                .chain(&self.leaving)
                .map(|s| s.addr)
                .collect();
            let changes = &mut self.changes;
            self.tracked.retain(|addr, _| {
                let keep = listed.contains(addr);
                if !keep {
                    changes.log(now, Change::Left, || {
                        format!("backend {addr} has no sessions left and leaves the set")
                    });
                }
                keep
            });
            self.dirty = true;
        }
    }

    /// A worker saw `--observe-errors` consecutive failures on live traffic.
    fn passive_failure(&mut self, addr: SocketAddr, now: Instant) {
        let fall = self.config.health.fall;
        // The next run of failures is counted from zero.
        if let Some(b) = self.current_set().find(addr) {
            b.stats.reset_streak();
        }
        let Some(t) = self.tracked.get_mut(&addr) else {
            return;
        };
        if t.state == BackendState::Up {
            t.mark_down(now, fall);
            self.dirty = true;
            let observe = self.config.health.observe_errors;
            self.changes.log(now, Change::Down, || {
                format!("backend {addr} is DOWN: {observe} consecutive failures on live traffic")
            });
        }
    }

    /// Without probes nothing would ever bring a passively failed backend back: retry it after
    /// `interval × rise` (it goes down again at once if it still fails).
    fn recover_unprobed(&mut self, now: Instant) {
        if self.config.health.check != HealthCheck::None {
            return;
        }
        let wait = self.config.health.interval * self.config.health.rise;
        let ramp = self.config.health.slow_start.map(|_| now);
        for (addr, t) in &mut self.tracked {
            if t.state == BackendState::Down && t.down_since.is_some_and(|d| now >= d + wait) {
                t.mark_up(ramp);
                self.dirty = true;
                self.changes.log(now, Change::Up, || {
                    format!("backend {addr} is UP again (retried after {wait:?} without probes)")
                });
            }
        }
    }

    // ---- probes ---------------------------------------------------------------------------

    fn start_due_probes(&mut self, now: Instant, registry: &Registry) {
        if self.config.health.check == HealthCheck::None {
            return;
        }
        let room = MAX_PROBES_IN_FLIGHT.saturating_sub(self.probes.len());
        if room == 0 {
            return;
        }
        let interval = self.config.health.interval;
        let mut started = 0;
        while started < room {
            let Some(&Reverse((at, addr))) = self.due.peek() else {
                break;
            };
            if at > now {
                break;
            }
            self.due.pop();
            let current = self
                .tracked
                .get(&addr)
                .is_some_and(|t| !t.leaving && t.probe.is_none() && t.next_probe == at);
            if !current {
                continue;
            }
            started += 1;
            let jitter = self.jitter(interval);
            let key = self.probes.vacant_entry().key();
            let token = thread::probe_token(self.slot, key);
            let probe = Probe::start(
                addr,
                &self.config.health.check,
                self.config.client_ip.health_send_proxy,
                now + self.config.health.timeout,
                registry,
                token,
            );
            let Some(t) = self.tracked.get_mut(&addr) else {
                continue;
            };
            let next = now + interval + jitter;
            t.next_probe = next;
            match probe {
                Ok(probe) => {
                    let inserted = self.probes.insert(probe);
                    debug_assert_eq!(inserted, key, "the probe's token names its slab key");
                    t.probe = Some(key);
                }
                // Out of descriptors is our problem, not the backend's: try next time.
                Err(e) if is_resource_exhaustion(&e) => {
                    self.changes.log(now, Change::Unprobed, || {
                        format!("cannot probe {addr}: {e}")
                    });
                    self.queue_probe(addr, next);
                }
                Err(e) => {
                    log::debug!("probe of {addr} failed at once: {e}");
                    self.queue_probe(addr, next);
                    self.record(addr, false, now);
                }
            }
        }
    }

    /// Up to a tenth of the interval either way, so probes of many backends drift apart.
    fn jitter(&mut self, interval: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let tenth = interval / 10;
        let nanos = tenth.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        // Subtracting is done by shortening: at most a tenth early, never negative.
        Duration::from_nanos(self.rng % (2 * nanos)).saturating_sub(tenth)
    }

    fn advance_probe(&mut self, key: usize, now: Instant) {
        let Some(probe) = self.probes.get_mut(key) else {
            return;
        };
        match probe.advance() {
            ProbeStep::Pending => {}
            ProbeStep::Done(ok) => {
                let probe = self.probes.remove(key);
                self.finish_probe(probe, ok, now);
            }
        }
    }

    fn expire_probes(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .probes
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            let probe = self.probes.remove(key);
            log::debug!("probe of {} timed out", probe.addr);
            self.finish_probe(probe, false, now);
        }
    }

    fn finish_probe(&mut self, probe: Probe, ok: bool, now: Instant) {
        if let Some(t) = self.tracked.get_mut(&probe.addr) {
            t.probe = None;
            let at = t.next_probe;
            self.queue_probe(probe.addr, at);
        }
        self.record(probe.addr, ok, now);
    }

    /// `addr` is due for a probe `at` (pushed whenever it has no probe in flight).
    fn queue_probe(&mut self, addr: SocketAddr, at: Instant) {
        if self.config.health.check != HealthCheck::None {
            self.due.push(Reverse((at, addr)));
        }
    }

    fn record(&mut self, addr: SocketAddr, ok: bool, now: Instant) {
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let ramp = self.config.health.slow_start.map(|_| now);
        let Some(t) = self.tracked.get_mut(&addr) else {
            return;
        };
        if ok {
            t.failures = 0;
            t.successes = t.successes.saturating_add(1);
            if t.state == BackendState::Down && t.successes >= rise {
                self.changes.log(now, Change::Up, || {
                    format!("backend {addr} is UP: {rise} consecutive successful probes")
                });
                t.mark_up(ramp);
                self.dirty = true;
            }
        } else {
            t.successes = 0;
            t.failures = t.failures.saturating_add(1);
            if t.state == BackendState::Up && t.failures >= fall {
                self.changes.log(now, Change::Down, || {
                    format!("backend {addr} is DOWN: {fall} consecutive failed probes")
                });
                t.mark_down(now, fall);
                self.dirty = true;
            }
        }
    }

    // ---- publishing -----------------------------------------------------------------------

    fn current_set(&self) -> Arc<BackendSet> {
        Arc::clone(&self.current.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Builds the set from the list, the states and the slow-start weights, and sends it to
    /// every worker.
    fn publish(&mut self, now: Instant) {
        let previous = self.current_set();
        // Backends are mostly where they were in the last set; the map is built only if not.
        let mut previous_by_addr = None;
        let slow_start = self.config.health.slow_start;
        let mut ramping = false;
        let backends = self
            .specs
            .iter()
            .chain(&self.leaving)
            .enumerate()
            .map(|(i, spec)| {
                let before = match previous.backends.get(i) {
                    Some(b) if b.spec.addr == spec.addr => Some(b),
                    _ => previous_by_addr
                        .get_or_insert_with(|| previous.by_addr())
                        .get(&spec.addr)
                        .copied(),
                };
                let stats = before.map_or_else(Default::default, |b| Arc::clone(&b.stats));
                let mut spec = spec.clone();
                let tracked = self.tracked.get_mut(&spec.addr);
                if let Some(w) = tracked.as_ref().and_then(|t| t.weight) {
                    spec.weight = w;
                }
                let mut backend = Backend::new(spec, stats);
                if let Some(t) = tracked {
                    backend.state = if t.drained {
                        BackendState::Drain
                    } else {
                        t.state
                    };
                    backend.healthy = t.state != BackendState::Down;
                    if let (Some(from), Some(window)) = (t.ramp_from, slow_start) {
                        match ramp_weight(backend.effective_weight, now - from, window) {
                            Some(w) => {
                                backend.effective_weight = w;
                                ramping = true;
                            }
                            None => t.ramp_from = None,
                        }
                    }
                }
                backend
            })
            .collect();
        let set = Arc::new(BackendSet::new(
            backends,
            Some(&previous),
            self.config.algorithm,
        ));
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&set);
        for w in &self.workers {
            w.send(Control::Backends(self.service, Arc::clone(&set)));
        }
        // `--rebalance-on-join`: a backend joined, or came back up (probes, or an operator's
        // `ready`): the workers move sessions off over-loaded backends over the window.
        if let Some(window) = self.config.rebalance_on_join
            && joined(&previous, &set)
        {
            log::info!("a backend joined: rebalancing over {window:?}");
            let start = RebalanceStart::new(window);
            for w in &self.workers {
                w.send(Control::Rebalance(self.service, start));
            }
        }
        self.dirty = false;
        self.last_publish = now;
        self.next_ramp_publish = match (ramping, slow_start) {
            (true, Some(window)) => {
                Some(now + (window / SLOW_START_STEPS).max(Duration::from_millis(10)))
            }
            _ => None,
        };
    }

    /// When a set changed by probes or passive detection is published.
    fn publish_at(&self) -> Option<Instant> {
        let size = self.specs.len() + self.leaving.len();
        let gap = PUBLISH_GAP + PUBLISH_GAP_PER_BACKEND * size.try_into().unwrap_or(u32::MAX);
        self.dirty.then_some(self.last_publish + gap)
    }

    fn publish_due(&self, now: Instant) -> bool {
        self.publish_at().is_some_and(|at| at <= now)
    }

    /// When the loop must wake up even without events.
    fn next_deadline(&self) -> Option<Instant> {
        let probing = self.config.health.check != HealthCheck::None;
        // With every probe slot taken, a due probe waits for a probe to end (an event, or its
        // deadline below), not for its own due time, which has passed.
        let slots_free = self.probes.len() < MAX_PROBES_IN_FLIGHT;
        let next_probe = (probing && slots_free)
            .then(|| self.due.peek().map(|Reverse((at, _))| *at))
            .flatten();
        let retry_after = self.config.health.interval * self.config.health.rise;
        let retry = if probing {
            None
        } else {
            self.tracked
                .values()
                .filter_map(|t| t.down_since.map(|d| d + retry_after))
                .min()
        };
        let probes = self.probes.iter().map(|(_, p)| p.deadline);
        let closes = self.tracked.values().filter_map(|t| t.close_at);
        // A removed backend is looked at now and then, to see whether its last session ended.
        let leavers = (!self.leaving.is_empty()).then(|| Instant::now() + LEAVER_RECHECK);
        next_probe
            .into_iter()
            .chain(retry)
            .chain(probes)
            .chain(closes)
            .chain(leavers)
            .chain(self.publish_at())
            .chain(self.changes.deadline())
            .chain(self.next_ramp_publish)
            .min()
    }
}

/// A kind of per-backend change, as counted in a summary line.
#[derive(Clone, Copy)]
enum Change {
    Down,
    Up,
    Added,
    Removed,
    Left,
    Reweighted,
    Unprobed,
}

impl Change {
    const ALL: [Change; 7] = [
        Change::Down,
        Change::Up,
        Change::Added,
        Change::Removed,
        Change::Left,
        Change::Reweighted,
        Change::Unprobed,
    ];

    fn level(self) -> log::Level {
        match self {
            Change::Down | Change::Unprobed => log::Level::Warn,
            _ => log::Level::Info,
        }
    }

    /// How a summary line counts it: `480 DOWN`.
    fn summary(self) -> &'static str {
        match self {
            Change::Down => "DOWN",
            Change::Up => "UP",
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Left => "left the set",
            Change::Reweighted => "runtime weight replaced by the list's",
            Change::Unprobed => "not probed for lack of descriptors",
        }
    }
}

/// The log of per-backend changes: one line each, up to [`CHANGE_LINES`] in a
/// [`CHANGE_WINDOW`]; beyond that they are counted, and one line sums them up when the window
/// ends. A pool of thousands that changes at once (a network split, a file of dead
/// addresses, a reload) then logs a dozen lines, not thousands. `/backends` and `/metrics`
/// show every backend's state.
#[derive(Default)]
struct ChangeLog {
    window_end: Option<Instant>,
    logged: usize,
    held: [usize; Change::ALL.len()],
}

impl ChangeLog {
    fn log(&mut self, now: Instant, change: Change, line: impl FnOnce() -> String) {
        self.tick(now);
        if self.window_end.is_none() {
            self.window_end = Some(now + CHANGE_WINDOW);
            self.logged = 0;
        }
        if self.logged < CHANGE_LINES {
            self.logged += 1;
            log::log!(change.level(), "{}", line());
        } else {
            self.held[change as usize] += 1;
        }
    }

    /// Ends the window once its time is up, with the summary if any change was held.
    fn tick(&mut self, now: Instant) {
        if self.window_end.is_some_and(|end| end <= now) {
            self.flush();
        }
    }

    /// Logs the summary of what was held, if anything, and ends the window.
    fn flush(&mut self) {
        self.window_end = None;
        let held = std::mem::take(&mut self.held);
        let total: usize = held.iter().sum();
        if total == 0 {
            return;
        }
        let counts: Vec<String> = Change::ALL
            .iter()
            .filter(|c| held[**c as usize] > 0)
            .map(|c| format!("{} {}", held[*c as usize], c.summary()))
            .collect();
        let level = Change::ALL
            .iter()
            .filter(|c| held[**c as usize] > 0)
            .map(|c| c.level())
            .min()
            .unwrap_or(log::Level::Info);
        log::log!(
            level,
            "{total} more backend changes in the last {CHANGE_WINDOW:?}, not logged one by one \
             (see /backends): {}",
            counts.join(", ")
        );
    }

    /// When the loop must wake up to log a summary.
    fn deadline(&self) -> Option<Instant> {
        self.held
            .iter()
            .any(|&n| n > 0)
            .then_some(self.window_end)
            .flatten()
    }
}

impl Tracked {
    fn up(next_probe: Instant, ramp_from: Option<Instant>) -> Tracked {
        Tracked {
            state: BackendState::Up,
            successes: 0,
            failures: 0,
            next_probe,
            probe: None,
            ramp_from,
            down_since: None,
            drained: false,
            leaving: false,
            weight: None,
            close_at: None,
        }
    }

    fn start_drain(&mut self, now: Instant, timeout: Option<Duration>) {
        self.drained = true;
        self.close_at = timeout.map(|t| now + t);
    }

    fn mark_up(&mut self, ramp_from: Option<Instant>) {
        self.state = BackendState::Up;
        self.ramp_from = ramp_from;
        self.down_since = None;
    }

    fn mark_down(&mut self, now: Instant, fall: u32) {
        self.state = BackendState::Down;
        self.successes = 0;
        self.failures = fall;
        self.ramp_from = None;
        self.down_since = Some(now);
    }
}

/// The slow-start weight `elapsed` into a `window`, linear from 1/20 of `full` to `full`;
/// `None` once the window is over.
fn ramp_weight(full: u32, elapsed: Duration, window: Duration) -> Option<u32> {
    if elapsed >= window {
        return None;
    }
    let floor = (full / SLOW_START_FLOOR).max(1);
    let progress = elapsed.as_secs_f64() / window.as_secs_f64();
    Some(floor + ((full - floor) as f64 * progress) as u32)
}

/// Whether `set` has a backend up that was not up in `previous` (absent, down or drained).
fn joined(previous: &BackendSet, set: &BackendSet) -> bool {
    let before = previous.by_addr();
    set.backends.iter().any(|b| {
        b.state == BackendState::Up
            && before
                .get(&b.spec.addr)
                .is_none_or(|p| p.state != BackendState::Up)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::WEIGHT_SCALE;

    #[test]
    fn slow_start_ramps_linearly_from_a_twentieth() {
        let full = 2 * WEIGHT_SCALE;
        let w = Duration::from_secs(10);
        assert_eq!(ramp_weight(full, Duration::ZERO, w), Some(full / 20));
        let half = ramp_weight(full, Duration::from_secs(5), w).unwrap();
        assert!((full / 2..=full / 2 + full / 40).contains(&half), "{half}");
        assert_eq!(ramp_weight(full, w, w), None);
        assert_eq!(ramp_weight(1, Duration::ZERO, w), Some(1), "never zero");
    }
}
