//! The control plane's handle: what an operator (the admin endpoint, a signal handler, a
//! library user, a test) may read and change while the balancer runs.
//!
//! A [`Controller`] is cheap to clone and safe to share between threads. Reads come from the
//! shared counters and the last published backend set; changes are commands to the health
//! thread (the only owner of backend state) or control messages to the workers (the types
//! are in `plane.rs`). None of it touches a worker's hot path. A call that waits for the
//! health thread waits at most a bounded time and then returns [`ControlError::Timeout`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::backend::{BackendSet, BackendStatsSnapshot};
use crate::config::{BackendSpec, Config, MAX_WEIGHT};
use crate::plane::{
    BackendChange, Command, Control, ControlError, HealthLink, Published, RebalanceStart,
    WorkerLink,
};
use crate::sources::Sources;
use crate::stats::{
    Counters, RebalanceSnapshot, ServiceCounters, ServiceStatsSnapshot, StatsSnapshot,
};

/// How long an operator's request waits for the health thread to apply it. The health thread
/// never blocks, so this only guards a caller (the admin endpoint) against a stalled one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// More time a new list may take per backend in it: the health thread builds the new set
/// (and a Maglev table) in time linear in its size, which for 100,000 backends in a debug
/// build on a loaded machine is seconds, not milliseconds.
const ANSWER_TIMEOUT_PER_BACKEND: Duration = Duration::from_micros(100);

/// Waits at most `timeout` for the health thread's answer.
fn answer<T>(rx: &Receiver<T>, timeout: Duration) -> Result<T, ControlError> {
    rx.recv_timeout(timeout).map_err(|e| match e {
        RecvTimeoutError::Timeout => ControlError::Timeout,
        RecvTimeoutError::Disconnected => ControlError::ShuttingDown,
    })
}

/// One service's part of the control plane: its health thread, the set it last published,
/// its settings and its backend sources.
pub(crate) struct ServiceControl {
    pub(crate) name: String,
    pub(crate) published: Published,
    /// Its own counters (the workers count into them).
    pub(crate) counters: Arc<ServiceCounters>,
    pub(crate) health: HealthLink,
    pub(crate) listen_addrs: Vec<SocketAddr>,
    pub(crate) config: Arc<Config>,
    pub(crate) sources: Mutex<Sources>,
}

/// The services by number (`None`: removed by a reload; numbers are never reused).
pub(crate) type Services = RwLock<Vec<Option<Arc<ServiceControl>>>>;

/// The threads of the control plane, joined when the balancer stops: the one health thread
/// (with the handle that adds services to it; dropping it lets the thread end once every
/// service has shut down), and the one DNS thread once a service names DNS backends (with
/// the handle whose drop stops it).
#[derive(Default)]
pub(crate) struct ServiceThreads {
    pub(crate) health: Option<(crate::health::HealthThread, JoinHandle<()>)>,
    pub(crate) dns: Option<(crate::dns::DnsThread, JoinHandle<()>)>,
}

/// A handle on a running balancer's control plane. Clone it freely.
///
/// A balancer runs one or more services
/// ([`Holdfast::start_services`](crate::Holdfast::start_services)); the handle's per-service
/// calls (backends, reloads, listen addresses, rebalancing) act on one of them, the first
/// unless the handle came from [`Controller::service`]. Counters, drains and shutdown are the
/// process's. A handle on a service a reload removed keeps answering reads from its last
/// state; changes to it fail ([`ControlError::ShuttingDown`]).
#[derive(Clone)]
pub struct Controller {
    counters: Arc<Counters>,
    pub(crate) services: Arc<Services>,
    /// The service this handle's per-service calls act on, and its number.
    this: Arc<ServiceControl>,
    number: usize,
    /// The process-wide settings (the first service's at start).
    pub(crate) first: Arc<Config>,
    pub(crate) workers: Arc<[WorkerLink]>,
    /// Set by the first [`Controller::drain`] or [`Controller::shutdown`]; never cleared.
    draining: Arc<AtomicBool>,
    pub(crate) threads: Arc<Mutex<ServiceThreads>>,
    /// Held while services are added or removed, so that two reloads do not interleave.
    pub(crate) reloading: Arc<Mutex<()>>,
}

impl Controller {
    /// A handle on threads that [`Holdfast::start`](crate::Holdfast::start) has started
    /// (`services` not empty).
    pub(crate) fn new(
        counters: Arc<Counters>,
        services: Vec<ServiceControl>,
        workers: Vec<WorkerLink>,
        threads: ServiceThreads,
    ) -> Controller {
        let services: Vec<Arc<ServiceControl>> = services.into_iter().map(Arc::new).collect();
        let this = Arc::clone(&services[0]);
        Controller {
            counters,
            first: Arc::clone(&this.config),
            this,
            number: 0,
            services: Arc::new(RwLock::new(services.into_iter().map(Some).collect())),
            workers: workers.into(),
            draining: Arc::new(AtomicBool::new(false)),
            threads: Arc::new(Mutex::new(threads)),
            reloading: Arc::new(Mutex::new(())),
        }
    }

    fn this(&self) -> &ServiceControl {
        &self.this
    }

    /// The services running now, by number.
    pub(crate) fn live(&self) -> Vec<(usize, Arc<ServiceControl>)> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .enumerate()
            .filter_map(|(n, s)| s.as_ref().map(|s| (n, Arc::clone(s))))
            .collect()
    }

    /// A handle on service `number`.
    pub(crate) fn on(&self, number: usize, service: Arc<ServiceControl>) -> Controller {
        Controller {
            this: service,
            number,
            ..self.clone()
        }
    }

    /// The services' names, in the order they were started.
    pub fn service_names(&self) -> Vec<String> {
        self.live()
            .into_iter()
            .map(|(_, s)| s.name.clone())
            .collect()
    }

    /// The number of the service this handle's per-service calls act on.
    pub(crate) fn number(&self) -> usize {
        self.number
    }

    /// The name of the service this handle's per-service calls act on.
    pub fn service_name(&self) -> &str {
        &self.this().name
    }

    /// A handle whose per-service calls act on the service named `name` (`None`: no such
    /// service runs).
    pub fn service(&self, name: &str) -> Option<Controller> {
        let (number, service) = self.live().into_iter().find(|(_, s)| s.name == name)?;
        Some(self.on(number, service))
    }

    /// One handle per service running, in the order they were started.
    pub fn services(&self) -> Vec<Controller> {
        self.live()
            .into_iter()
            .map(|(number, service)| self.on(number, service))
            .collect()
    }

    /// The settings of this handle's service.
    pub fn config(&self) -> &Config {
        &self.this().config
    }

    /// The workers' links, for the live upgrade's batches (`upgrade/local.rs`).
    pub(crate) fn worker_links(&self) -> &[WorkerLink] {
        &self.workers
    }

    /// Global counters, read now.
    pub fn stats(&self) -> StatsSnapshot {
        self.counters.snapshot()
    }

    /// This handle's service's own counters, read now ([`Controller::stats`] counts every
    /// service together).
    pub fn service_stats(&self) -> ServiceStatsSnapshot {
        self.this().counters.snapshot()
    }

    /// Per-backend counters of the current backend set, read now.
    pub fn backend_stats(&self) -> Vec<BackendStatsSnapshot> {
        self.current_backends().stats_snapshot()
    }

    /// The backend set the workers were last given.
    pub(crate) fn current_backends(&self) -> Arc<BackendSet> {
        Arc::clone(
            &self
                .this()
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The addresses the balancer accepts on.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.this().listen_addrs
    }

    /// Replaces the backend list. Backends that stay keep their state and counters; new ones
    /// start up (with slow start when configured); removed ones are drained and leave once
    /// their last session ends. The list is the configuration: a backend whose weight in it
    /// changed takes that weight, replacing one set with [`BackendChange::Weight`]; one whose
    /// weight did not change keeps it; a [`BackendChange::Drain`] stays. Returns once the
    /// workers have been sent the new list.
    ///
    /// A list that is not acceptable (a backend twice, too many for source-hash, none at all)
    /// is [`ControlError::Invalid`] and changes nothing. The wait for the health thread is
    /// bounded (5 s, plus 100 µs per backend in the list): then [`ControlError::Timeout`],
    /// and the list is still applied.
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), ControlError> {
        let mut check = Config::new(self.this().listen_addrs.clone(), specs);
        check.workers = 1;
        check.algorithm = self.this().config.algorithm;
        check.validate()?;
        let size = u32::try_from(check.backends.len()).unwrap_or(u32::MAX);
        let timeout =
            ANSWER_TIMEOUT.saturating_add(ANSWER_TIMEOUT_PER_BACKEND.saturating_mul(size));
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.this()
            .health
            .send(Command::SetBackends(check.backends, done_tx));
        answer(&done_rx, timeout)
    }

    /// Re-reads `--backends-file` and applies the difference (see [`Controller::set_backends`]).
    /// A file that cannot be read or parsed, or whose list is not acceptable, changes nothing;
    /// the error ([`ControlError::Source`] or [`ControlError::Invalid`]) names the file and
    /// line. Without a backends file: [`SourceError::NoFile`](crate::SourceError::NoFile).
    pub fn reload(&self) -> Result<(), ControlError> {
        let mut sources = self
            .this()
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let previous = sources.file_specs.clone();
        sources.reload_file()?;
        let result = self.set_backends(sources.backends());
        // Refused: the file's list is not in force, and must not come into force with the
        // next DNS refresh, which applies the union. (After a timeout the list is on its way
        // and will be in force.)
        if let Err(ControlError::Invalid(_)) = result {
            sources.file_specs = previous;
        }
        result
    }

    /// The settings in which `config` differs from the running one, besides backends (see
    /// [`Config::differences`]).
    pub fn config_differences(&self, config: &Config) -> Vec<&'static str> {
        self.this().config.differences(config)
    }

    /// A configuration file's reload: `fixed` replaces the backends the configuration lists
    /// itself (the `--backend` flags' part, or a `--config` file's `backend` key), the
    /// backends file is re-read if there is one, and the union is applied as
    /// [`Controller::set_backends`] applies a list. Anything refused changes nothing.
    pub fn reload_with(&self, fixed: Vec<BackendSpec>) -> Result<(), ControlError> {
        let mut sources = self
            .this()
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let previous = (sources.fixed.clone(), sources.file_specs.clone());
        if sources.file.is_some() {
            sources.reload_file()?;
        }
        sources.fixed = fixed;
        let result = self.set_backends(sources.backends());
        if let Err(ControlError::Invalid(_)) = result {
            (sources.fixed, sources.file_specs) = previous;
        }
        result
    }

    /// Resolves the `--backend-dns` names again and applies any change. Names that fail to
    /// resolve keep their last answer; their errors ([`ControlError::Source`]) are returned,
    /// with the error of applying the new list, if any.
    pub fn refresh_dns(&self) -> Vec<ControlError> {
        let mut sources = self
            .this()
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let previous = sources.dns_specs.clone();
        let (changed, errors) = sources.refresh_dns();
        let mut errors: Vec<ControlError> = errors.into_iter().map(ControlError::from).collect();
        if changed && let Err(e) = self.set_backends(sources.backends()) {
            // As for a reload: a refused answer is not in force, must not come into force with
            // the next reload, and is tried again by the next refresh.
            if let ControlError::Invalid(_) = e {
                sources.dns_specs = previous;
            }
            errors.push(e);
        }
        errors
    }

    /// Drains a backend, puts it back in rotation, or changes its weight. Returns once the
    /// workers have been sent the result, or [`ControlError::Timeout`] after 5 s.
    pub fn change_backend(
        &self,
        addr: SocketAddr,
        change: BackendChange,
    ) -> Result<(), ControlError> {
        if let BackendChange::Weight(w) = change
            && !(1..=MAX_WEIGHT).contains(&w)
        {
            return Err(ControlError::BadWeight(w));
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.this()
            .health
            .send(Command::Backend(addr, change, done_tx));
        answer(&done_rx, ANSWER_TIMEOUT)?
    }

    /// Counts a live upgrade that failed before any handover began: the new binary could not
    /// be started, or it exited before taking over (`holdfast_upgrades_total{result="failed"}`).
    pub fn count_failed_upgrade(&self) {
        Counters::incr(&self.counters.upgrades_failed);
    }

    /// The live counters (the live upgrade counts itself in them).
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The listed backends' running state (live upgrade: the old process sends it to the
    /// new one). Empty if the health thread does not answer in time.
    pub(crate) fn backend_snapshot(&self) -> Vec<crate::upgrade::wire::BackendInfo> {
        let mut all = Vec::new();
        for (_, service) in self.live() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            service.health.send(Command::Snapshot(tx));
            let mut infos = rx.recv_timeout(ANSWER_TIMEOUT).unwrap_or_default();
            for info in &mut infos {
                info.service.clone_from(&service.name);
            }
            all.extend(infos);
        }
        all
    }

    /// Graceful shutdown: stop accepting at once (listeners close, so new connections go to
    /// another instance), let sessions end on their own for `--drain-timeout`, then close the
    /// rest spread evenly over `--close-spread`. The workers exit when their last session ends.
    /// Returns at once.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let timeout = self.first.drain_timeout;
        let spread = self.first.close_spread;
        for w in self.workers.iter() {
            w.send(Control::Drain { timeout, spread });
        }
    }

    /// Moves sessions off over-loaded backends until every backend holds its weighted share,
    /// spread over `window` (and never faster than `--rebalance-max-rate`), as
    /// `--rebalance-on-join` does when a backend joins. Replaces a rebalance under way.
    /// Returns at once; [`Controller::rebalance_status`] follows it.
    pub fn rebalance(&self, window: Duration) {
        let start = RebalanceStart::new(window);
        // Begun here too, so that a status asked for at once shows it.
        let config = &self.this().config;
        let by_source = config.algorithm == crate::config::Algorithm::SourceHash;
        self.counters
            .rebalance
            .begin(start.generation, start.deadline, by_source, config.workers);
        for w in self.workers.iter() {
            w.send(Control::Rebalance(self.number, start));
        }
    }

    /// The rebalance under way, or the last one.
    pub fn rebalance_status(&self) -> RebalanceSnapshot {
        self.counters.rebalance.snapshot(Instant::now())
    }

    /// Immediate shutdown: listeners and every session are closed now. Returns at once.
    pub fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for (_, service) in self.live() {
            service.health.send(Command::Shutdown);
        }
        for w in self.workers.iter() {
            w.send(Control::Shutdown);
        }
    }

    /// Whether a drain or shutdown has begun: this instance no longer takes new clients
    /// (`GET /healthz` answers 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// How long a drain may take at most before every session is closed (and its sockets'
    /// FIN taken or given up on).
    pub fn drain_budget(&self) -> Duration {
        let config = &self.first;
        config.drain_timeout + config.close_spread + crate::session::LINGER_TIMEOUT
    }

    /// Stops the DNS and health threads (once the workers have exited) and waits for them.
    pub(crate) fn stop_threads(&self) -> Vec<JoinHandle<()>> {
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let mut handles = Vec::new();
        if let Some((stop, thread)) = threads.dns {
            drop(stop);
            handles.push(thread);
        }
        for (_, service) in self.live() {
            service.health.send(Command::Shutdown);
        }
        if let Some((adds, thread)) = threads.health {
            drop(adds);
            handles.push(thread);
        }
        handles
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use crate::{Algorithm, Config, ControlError, HealthCheck, Holdfast, Resolver, SourceError};

    /// `n` distinct addresses in 10.0.0.0/8 (never connected to: no probes, no clients).
    fn addrs(n: u32) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                let [_, b, c, d] = i.to_be_bytes();
                SocketAddr::from(([10, b, c, d], 9))
            })
            .collect()
    }

    /// A DNS answer the balancer refuses (more backends than source-hash's Maglev table has
    /// slots) is not in force, so every refresh reports it again until the answer changes,
    /// rather than once and then never.
    #[test]
    fn a_refused_dns_answer_is_reported_at_every_refresh_until_it_changes() {
        let answer = Arc::new(Mutex::new(addrs(1)));
        let given = Arc::clone(&answer);
        let mut config = Config::new(vec!["127.0.0.1:0".parse().unwrap()], vec![]);
        config.workers = 1;
        config.algorithm = Algorithm::SourceHash;
        config.health.check = HealthCheck::None;
        config.backend_dns = vec!["pool.test:9".parse().unwrap()];
        // Only the refreshes below.
        config.dns_interval = std::time::Duration::from_secs(3600);
        config.resolver = Resolver::new(move |_, _| Ok(given.lock().unwrap().clone()));
        let lb = Holdfast::start(config).unwrap();
        let control = lb.controller();

        *answer.lock().unwrap() = addrs(70_000);
        for refresh in 1..=2 {
            let errors = control.refresh_dns();
            assert!(
                matches!(&errors[..], [ControlError::Invalid(e)] if e.to_string().contains("source-hash")),
                "refresh {refresh}: {errors:?}"
            );
            assert_eq!(control.backend_stats().len(), 1, "refresh {refresh}");
        }
        *answer.lock().unwrap() = addrs(2);
        let errors = control.refresh_dns();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(control.backend_stats().len(), 2);
        // No backends file: a reload says so.
        assert!(matches!(
            control.reload(),
            Err(ControlError::Source(SourceError::NoFile))
        ));
    }
}
