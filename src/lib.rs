//! holdfast: an L4 TCP load balancer for long-lived connections.
//!
//! The binary is a thin shell over this library: flags become a [`Config`], and the rest is
//! what any program can do with it. Build a [`Config`] (the listen addresses, the backends,
//! and any setting that differs from the defaults), start the balancer with
//! [`Holdfast::start`], and keep the [`Holdfast`] handle: it knows where the balancer listens,
//! and it is a [`Controller`] (through `Deref`), the control plane's handle, for reading
//! counters, changing backends and stopping; clone [`Holdfast::controller`] for other
//! threads. Dropping the handle shuts everything down and waits for the threads.
//!
//! ```
//! use holdfast::{BackendChange, BackendSpec, BackendState, Config, Holdfast};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A backend address where nothing listens: the balancer starts all the same.
//! let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
//! let mut config = Config::new(vec!["127.0.0.1:0".parse()?], vec![BackendSpec::new(closed)]);
//! config.workers = 1;
//! let lb = Holdfast::start(config)?;
//! // Port 0 asked for a free port; this is the one each listener got.
//! let addr = lb.listen_addrs()[0];
//! assert_ne!(addr.port(), 0);
//!
//! // The control plane: counters, and changes that return once the workers have them.
//! assert_eq!(lb.stats().accepted, 0);
//! lb.change_backend(closed, BackendChange::Drain)?;
//! assert_eq!(lb.backend_stats()[0].state, BackendState::Drain);
//!
//! lb.shutdown();
//! lb.join();
//! # Ok(())
//! # }
//! ```
//!
//! Several services (each its own listeners, backends, algorithm, health checks and limits)
//! run in one process on the same workers with [`Holdfast::start_services`]; a handle acts on
//! one of them ([`Controller::service`]), and [`Controller::reload_services`] adds, removes
//! and changes them while running.
//!
//! The public API: [`Holdfast`] and [`Controller`], [`Service`], [`ServicesReload`]; [`Config`] and its parts
//! ([`BackendSpec`], [`DnsName`], [`Resolver`], [`HealthConfig`], [`HealthCheck`],
//! [`LimitsConfig`], [`Algorithm`], [`RelayMode`]) with the parsers that read them as the flags
//! do (`FromStr`, [`parse_duration`], [`resolve_addr`]); the snapshots [`StatsSnapshot`] and
//! [`BackendStatsSnapshot`]; the errors [`StartError`], [`ConfigError`], [`SourceError`] and
//! [`ControlError`]; and [`AdminServer`], to serve the admin endpoint for a controller.
//!
//! See `docs/architecture.md` for the threads, the module map, the life of one connection,
//! and what is shared.

#[doc(hidden)]
mod activation;
mod admin;
mod backend;
#[doc(hidden)]
pub mod balance; // public only for benches/balance.rs: not an API
pub mod client_ip; // public only for benches/client_ip.rs: not an API
mod config;
mod control;
mod dns;
mod error;
#[doc(hidden)]
pub mod fuzzing; // the entry points of the `cargo fuzz` targets in fuzz/: not an API
mod health;
mod listener;
mod plane;
mod proxy_protocol;
mod relay;
mod session;
mod sources;
mod stats;
mod sys;
#[cfg(target_os = "linux")]
#[doc(hidden)]
pub use sys::sockmap; // public only for tests/sockmap.rs and examples/sockmap_bench.rs: not an API
mod timer;
mod token;
#[allow(dead_code)] // wired into the worker and main in later commits (issue #12)
mod upgrade;
mod worker;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

pub use activation::{ActivatedListener, listen_fds_from_systemd};
pub use admin::AdminServer;
pub use backend::{BackendState, BackendStatsSnapshot, WEIGHT_SCALE};
pub use client_ip::{AccessList, Cidr, IpLimitsConfig};
/// A `--config` file's shape, read into flag-shaped entries (the binary parses the values).
pub use config::file as config_file;
pub use config::{
    Algorithm, BackendSpec, ClientIpConfig, Config, ConfigError, DnsName, HealthCheck,
    HealthConfig, LimitsConfig, MAX_WEIGHT, ProxyVersion, RelayMode, Resolver, SendExpect,
    parse_duration, resolve_addr,
};
pub use control::Controller;
pub use error::StartError;
pub use plane::{BackendChange, ControlError};
pub use sources::SourceError;
pub use stats::{RebalanceSnapshot, ServiceStatsSnapshot, StatsSnapshot};
/// For clients that bind many sockets to 127.0.0.x: choose the local port at connect time.
pub use sys::bind_address_no_port;
/// For the binary's signal thread: counts signal deliveries that signal-hook's iterator folds.
#[doc(hidden)]
pub use sys::count_deliveries;
pub use upgrade::handover::{HandoverError, Report as UpgradeReport, Taken};
pub use upgrade::local::{TakeOver, give_over, take_over};

use control::ServiceThreads;
use health::{Health, HealthThread};
use plane::{Command, Control, HealthLink, WorkerLink};
use sources::Sources;
use stats::Counters;
use worker::Worker;

/// Validates `config` (logging its warnings), reads the backends file and resolves the names;
/// `config.backends` becomes the union.
fn load_sources(config: &mut Config) -> Result<Sources, StartError> {
    config.validate()?;
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    let sources = Sources::load(
        config.backends.clone(),
        config.backends_file.clone(),
        config.backend_dns.clone(),
        config.resolver.clone(),
    )?;
    config.backends = sources.backends();
    if config.backends.is_empty() {
        return Err(
            ConfigError::Invalid("no backends: the file and names gave none".into()).into(),
        );
    }
    config.validate()?;
    Ok(sources)
}

/// One service of a balancer started with [`Holdfast::start_services`]: its name (unique
/// within the balancer; `default` for [`Holdfast::start`]'s) and its settings (listen
/// addresses, backends, algorithm, health checks, limits, timeouts, client-IP settings).
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub config: Config,
}

impl Service {
    pub fn new(name: impl Into<String>, config: Config) -> Service {
        Service {
            name: name.into(),
            config,
        }
    }
}

/// A running balancer. It derefs to its [`Controller`], so `lb.stats()`, `lb.drain()` and
/// the rest are the controller's; what is its own is starting, the admin address, and
/// waiting for the threads. Dropping it shuts the balancer down and waits for the threads.
pub struct Holdfast {
    control: Controller,
    workers: Vec<JoinHandle<()>>,
    admin: Option<AdminServer>,
    /// Not yet shut down and joined.
    running: bool,
}

/// A service validated and its sources read, before anything is bound.
struct Prepared {
    name: String,
    config: Arc<Config>,
    sources: Sources,
}

/// Whether an inherited listener on `at` serves the listen address `requested` (as
/// `listener::bind_or_inherit` matches them).
fn serves(requested: SocketAddr, at: SocketAddr) -> bool {
    at == requested || (requested.port() == 0 && at.ip() == requested.ip())
}

/// Validates every service (names unique, listen addresses distinct across services),
/// reads their sources; the process-wide settings are the first's.
fn prepare(services: Vec<Service>) -> Result<Vec<Prepared>, StartError> {
    let Some(workers) = services.first().map(|s| s.config.workers) else {
        return Err(ConfigError::Invalid("no services".into()).into());
    };
    let total: usize = services.iter().map(|s| s.config.listen.len()).sum();
    if total > token::MAX_LISTENERS {
        return Err(ConfigError::Invalid(format!(
            "{total} listen addresses in all; at most {}",
            token::MAX_LISTENERS
        ))
        .into());
    }
    let mut prepared: Vec<Prepared> = Vec::with_capacity(services.len());
    for mut service in services {
        let name = &service.name;
        if prepared.iter().any(|p| p.name == *name) {
            return Err(ConfigError::Invalid(format!("two services are named '{name}'")).into());
        }
        for other in &prepared {
            if let Some(addr) = service
                .config
                .listen
                .iter()
                .find(|a| a.port() != 0 && other.config.listen.contains(a))
            {
                return Err(ConfigError::Invalid(format!(
                    "services '{}' and '{name}' both listen on {addr}",
                    other.name
                ))
                .into());
            }
        }
        service.config.workers = workers;
        let named = !prepared.is_empty();
        prepared.push(prepare_one(service, named)?);
    }
    Ok(prepared)
}

/// Validates one service and reads its sources; `named`: its errors name it.
fn prepare_one(service: Service, named: bool) -> Result<Prepared, StartError> {
    let Service { name, mut config } = service;
    if name.is_empty() {
        return Err(ConfigError::Invalid("a service needs a name".into()).into());
    }
    let sources = load_sources(&mut config).map_err(|e| match e {
        StartError::Config(e) if named => {
            StartError::Config(ConfigError::Invalid(format!("service '{name}': {e}")))
        }
        e => e,
    })?;
    Ok(Prepared {
        name,
        config: Arc::new(config),
        sources,
    })
}

impl Holdfast {
    /// Validates `config`, reads the backends file and resolves the DNS names (if any), binds
    /// every listener (one SO_REUSEPORT socket per worker and listen address), and starts the
    /// health thread, the workers and, if configured, the DNS and admin threads. On error
    /// nothing is left running: a listener that cannot be bound fails the start before any
    /// thread does. The one service is named `default`.
    pub fn start(config: Config) -> Result<Holdfast, StartError> {
        Holdfast::start_inheriting(config, Vec::new())
    }

    /// As [`Holdfast::start`], for several services in one process: each has its own
    /// listeners, backend set, algorithm, health thread and state, limits, timeouts and
    /// client-IP settings; the workers (one event loop per core) serve every service, so
    /// more services add no worker threads. The process-wide settings are the first
    /// service's: `workers`, `admin`, `max_conns`, the drain and the upgrade settings (the
    /// others' are ignored). Names must be unique and listen addresses distinct across
    /// services ([`StartError::Config`] otherwise).
    pub fn start_services(services: Vec<Service>) -> Result<Holdfast, StartError> {
        Holdfast::start_services_inheriting(services, Vec::new())
    }

    /// As [`Holdfast::start`], serving on the sockets systemd passed (from
    /// [`listen_fds_from_systemd`]) for the `--listen` addresses they are bound to; every
    /// worker shares each of them (a duplicate of the descriptor each). Listen addresses none
    /// was passed for are bound as usual. A passed socket whose address no listen address
    /// names is an error ([`StartError::Config`]).
    pub fn start_activated(
        config: Config,
        passed: Vec<ActivatedListener>,
    ) -> Result<Holdfast, StartError> {
        Holdfast::start_services_activated(vec![Service::new("default", config)], passed)
    }

    /// [`Holdfast::start_activated`] for several services ([`Holdfast::start_services`]):
    /// each passed socket serves the service that lists its address.
    pub fn start_services_activated(
        services: Vec<Service>,
        passed: Vec<ActivatedListener>,
    ) -> Result<Holdfast, StartError> {
        let Some(first) = services.first() else {
            return Err(ConfigError::Invalid("no services".into()).into());
        };
        let mut all = first.config.clone();
        all.listen = services
            .iter()
            .flat_map(|s| s.config.listen.iter().copied())
            .collect();
        for service in &services {
            service.config.validate()?;
        }
        let inherited = activation::assign(&all, passed)?;
        Holdfast::start_services_inheriting(services, inherited)
    }

    /// As [`Holdfast::start`], on `inherited` listeners first (a live upgrade's).
    pub(crate) fn start_inheriting(
        config: Config,
        inherited: Vec<(SocketAddr, std::os::fd::OwnedFd)>,
    ) -> Result<Holdfast, StartError> {
        Holdfast::start_services_inheriting(vec![Service::new("default", config)], inherited)
    }

    /// As [`Holdfast::start_services`], on `inherited` listeners first (a live upgrade's, or
    /// socket activation's), each given to the service that lists its address.
    pub(crate) fn start_services_inheriting(
        services: Vec<Service>,
        inherited: Vec<(SocketAddr, std::os::fd::OwnedFd)>,
    ) -> Result<Holdfast, StartError> {
        let prepared = prepare(services)?;
        let first = Arc::clone(&prepared[0].config);
        let counters = Arc::new(Counters::default());
        counters.start_time_ms.store(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            std::sync::atomic::Ordering::Relaxed,
        );
        // Every service's listeners are bound before any thread starts.
        let mut pool: Vec<Option<(SocketAddr, std::os::fd::OwnedFd)>> =
            inherited.into_iter().map(Some).collect();
        let mut bound = Vec::with_capacity(prepared.len());
        for service in &prepared {
            let mine: Vec<_> = pool
                .iter_mut()
                .filter(|slot| {
                    slot.as_ref().is_some_and(|(at, _)| {
                        service.config.listen.iter().any(|&l| serves(l, *at))
                    })
                })
                .filter_map(Option::take)
                .collect();
            let (addrs, per_worker) = listener::bind_or_inherit(&service.config, mine)?;
            bound.push((addrs, per_worker.into_iter()));
        }
        drop(pool); // inherited listeners no service lists are closed
        // One health thread runs every service's checks. Each service's checks and first
        // set, and its per-IP table (one for all workers: a client's connections land on
        // every worker).
        let (health_thread, health_handle) = HealthThread::spawn().map_err(StartError::Health)?;
        let mut healths = Vec::with_capacity(prepared.len());
        for service in &prepared {
            let (health, link, published) =
                Health::new(Arc::clone(&service.config), health_thread.waker());
            let initial = Arc::clone(&published.lock().unwrap_or_else(PoisonError::into_inner));
            let ip_limits = ip_limits_of(&service.config)?;
            let counters = Arc::new(stats::ServiceCounters::default());
            healths.push((health, link, published, initial, ip_limits, counters));
        }
        let health_links: Vec<HealthLink> = healths.iter().map(|h| h.1.clone()).collect();

        let mut workers = Vec::with_capacity(first.workers);
        let mut for_health: Vec<Vec<WorkerLink>> = prepared.iter().map(|_| Vec::new()).collect();
        let mut threads = Vec::with_capacity(first.workers);
        for id in 0..first.workers {
            let inits = prepared
                .iter()
                .zip(bound.iter_mut())
                .zip(&healths)
                .map(|((service, (_, per_worker)), health)| worker::ServiceInit {
                    name: Arc::from(service.name.as_str()),
                    config: Arc::clone(&service.config),
                    listeners: per_worker.next().unwrap_or_default(),
                    backends: Arc::clone(&health.3),
                    health: health.1.clone(),
                    ip_limits: health.4.clone(),
                    counters: Arc::clone(&health.5),
                })
                .collect();
            let made = Worker::new(id, Arc::clone(&first), inits, Arc::clone(&counters));
            let (worker, control, waker) = match made {
                Ok(made) => made,
                Err(e) => {
                    stop_and_join(&workers, &health_links, threads);
                    return Err(StartError::Worker(e));
                }
            };
            for links in &mut for_health {
                links.push(WorkerLink {
                    tx: control.clone(),
                    waker: Arc::clone(&waker),
                });
            }
            workers.push(WorkerLink { tx: control, waker });
            let spawned = std::thread::Builder::new()
                .name(format!("holdfast-worker-{id}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_and_join(&workers, &health_links, threads);
                    return Err(StartError::Worker(e));
                }
            }
        }
        let mut controls = Vec::with_capacity(prepared.len());
        for (number, ((service, (addrs, _)), (mut health, link, published, _, _, counters))) in
            prepared.into_iter().zip(bound).zip(healths).enumerate()
        {
            health.attach(number, std::mem::take(&mut for_health[number]));
            if let Err(e) = health_thread.add(health) {
                stop_and_join(&workers, &health_links, threads);
                return Err(StartError::Health(e));
            }
            let config = &service.config;
            let named = match number {
                0 if service.name == "default" => String::new(),
                _ => format!(" (service '{}')", service.name),
            };
            log::info!(
                "holdfast listening on {} with {} worker(s), {} backend(s), algorithm {}, relay \
                 {}, health check {}{named}",
                addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                config.workers,
                config.backends.len(),
                config.algorithm,
                config.relay,
                config.health.check,
            );
            controls.push(control::ServiceControl {
                name: service.name,
                published,
                health: link,
                counters,
                listen_addrs: addrs,
                config: service.config,
                sources: std::sync::Mutex::new(service.sources),
            });
        }
        let mut balancer = Holdfast {
            control: Controller::new(
                counters,
                controls,
                workers,
                ServiceThreads {
                    health: Some((health_thread, health_handle)),
                    dns: None,
                },
            ),
            workers: threads,
            admin: None,
            running: true,
        };
        for (number, service) in balancer.control.live() {
            start_dns(&balancer.control.on(number, service))?;
        }
        if let Some(addr) = first.admin {
            // On failure, dropping `balancer` stops everything started so far.
            let admin = AdminServer::start(addr, balancer.control.clone())
                .map_err(|source| StartError::Admin { addr, source })?;
            log::info!("admin endpoint on http://{}", admin.local_addr());
            balancer.admin = Some(admin);
        }
        Ok(balancer)
    }

    /// What [`Holdfast::start`] checks before it binds or starts anything: `config` is
    /// validated, the backends file read and the names resolved. Returns the configuration
    /// as a start would run it (its backends the union of all three sources); nothing is
    /// bound, nothing started (`holdfast --check`).
    pub fn check(mut config: Config) -> Result<Config, StartError> {
        load_sources(&mut config)?;
        Ok(config)
    }

    /// Where the admin endpoint listens, if [`Config::admin`] was set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// The control plane's handle; clone it for other threads (a signal handler, an admin
    /// endpoint of your own). `Holdfast` derefs to it as well.
    pub fn controller(&self) -> &Controller {
        &self.control
    }

    /// Waits for the workers to exit (after [`Controller::shutdown`], or once a
    /// [`Controller::drain`] has seen the last session end), then stops the admin endpoint,
    /// the DNS thread and the health thread.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        join_all(std::mem::take(&mut self.workers));
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
        join_all(self.control.stop_threads());
        self.running = false;
    }
}

impl Deref for Holdfast {
    type Target = Controller;

    fn deref(&self) -> &Controller {
        &self.control
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if self.running {
            self.shutdown();
            self.join_threads();
        }
    }
}

/// Has the one DNS thread (started with the first service that needs it) re-resolve
/// `control`'s service if it follows names; the thread is joined when the balancer stops.
fn start_dns(control: &Controller) -> Result<(), StartError> {
    if control.config().backend_dns.is_empty() {
        return Ok(());
    }
    let mut threads = control
        .threads
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // The one DNS thread starts with the first service that needs it.
    if threads.dns.is_none() {
        threads.dns = Some(dns::DnsThread::spawn().map_err(StartError::Dns)?);
    }
    if let Some((dns, _)) = &threads.dns {
        dns.add(control.clone());
    }
    Ok(())
}

fn stop_and_join(workers: &[WorkerLink], health: &[HealthLink], threads: Vec<JoinHandle<()>>) {
    for link in health {
        link.send(Command::Shutdown);
    }
    for w in workers {
        w.send(Control::Shutdown);
    }
    join_all(threads);
}

/// A service's per-IP table, shared by every worker (a client's connections land on every
/// worker), when it sets per-IP limits.
fn ip_limits_of(config: &Config) -> Result<Option<Arc<client_ip::IpLimits>>, StartError> {
    if !config.client_ip.limits_on() {
        return Ok(None);
    }
    client_ip::IpLimits::new(config.client_ip.limits)
        .map(Some)
        .map_err(|e| StartError::Config(ConfigError::Invalid(e)))
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            log::error!("a holdfast thread panicked");
        }
    }
}

/// What [`Controller::reload_services`] did.
#[derive(Debug, Default)]
pub struct ServicesReload {
    /// Services started (new in the list).
    pub added: Vec<String>,
    /// Services stopped (gone from the list): listeners closed, sessions draining.
    pub removed: Vec<String>,
    /// Services whose listen addresses changed: stopped and started again (a remove plus an
    /// add).
    pub replaced: Vec<String>,
    /// Services kept, with the settings besides backends and listen addresses that changed
    /// and wait for the next upgrade or restart ([`Config::differences`]).
    pub waiting: Vec<(String, Vec<&'static str>)>,
    /// Kept services whose new backends were not applied, and why (the rest was done).
    pub failed: Vec<(String, ControlError)>,
}

/// A service's new listeners, bound before anything changes.
struct Bound {
    prepared: Prepared,
    addrs: Vec<SocketAddr>,
    per_worker: Vec<Vec<mio::net::TcpListener>>,
}

impl Controller {
    /// Makes the running services those of `services` (a `--config` file read again):
    /// services not in the list are removed (their listeners closed now, their sessions
    /// drained with their own `drain_timeout` and `close_spread`), new ones are started, a service
    /// whose listen addresses changed is removed and started again, and each kept service
    /// gets its new backends as [`Controller::reload_with`] applies them. Other changed
    /// settings of a kept service wait for the next upgrade or restart (listed in the
    /// answer). The process-wide settings are not changed.
    ///
    /// Everything that can fail is checked first (each new service validated, its sources
    /// read, its listeners bound; names unique, listen addresses distinct): on error
    /// nothing changed. Sessions of services that did not change are not touched.
    pub fn reload_services(&self, services: Vec<Service>) -> Result<ServicesReload, StartError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.is_draining() {
            return Err(ConfigError::Invalid("draining: services are not changed".into()).into());
        }
        if services.is_empty() {
            return Err(ConfigError::Invalid("no services".into()).into());
        }
        let live = self.live();
        let mut report = ServicesReload::default();
        let mut kept = Vec::new();
        let mut fresh = Vec::new();
        for (i, service) in services.iter().enumerate() {
            if services[..i].iter().any(|s| s.name == service.name) {
                return Err(ConfigError::Invalid(format!(
                    "two services are named '{}'",
                    service.name
                ))
                .into());
            }
            match live.iter().find(|(_, s)| s.name == service.name) {
                Some((number, running)) if running.config.listen == service.config.listen => {
                    kept.push((*number, service));
                }
                Some((number, _)) => {
                    report.replaced.push(service.name.clone());
                    fresh.push((Some(*number), service.clone()));
                }
                None => {
                    report.added.push(service.name.clone());
                    fresh.push((None, service.clone()));
                }
            }
        }
        let leaving: Vec<usize> = live
            .iter()
            .filter(|(_, s)| !services.iter().any(|n| n.name == s.name))
            .map(|(n, s)| {
                report.removed.push(s.name.clone());
                *n
            })
            .chain(fresh.iter().filter_map(|(n, _)| *n))
            .collect();
        // Listen addresses: distinct across what will run (kept services and new ones).
        let mut taken: Vec<(SocketAddr, &str)> = kept
            .iter()
            .flat_map(|(_, s)| s.config.listen.iter().map(|a| (*a, s.name.as_str())))
            .collect();
        for (_, service) in &fresh {
            for addr in &service.config.listen {
                if let Some((_, other)) = taken.iter().find(|(a, _)| a == addr && a.port() != 0) {
                    return Err(ConfigError::Invalid(format!(
                        "services '{other}' and '{}' both listen on {addr}",
                        service.name
                    ))
                    .into());
                }
                taken.push((*addr, service.name.as_str()));
            }
        }
        if taken.len() > token::MAX_LISTENERS {
            return Err(ConfigError::Invalid(format!(
                "{} listen addresses in all; at most {}",
                taken.len(),
                token::MAX_LISTENERS
            ))
            .into());
        }
        // New services: validated, sources read, listeners bound (beside a leaving service's
        // on the same address, which SO_REUSEPORT allows), before anything changes.
        let mut bound = Vec::with_capacity(fresh.len());
        for (_, service) in fresh {
            let mut service = service;
            service.config.workers = self.first.workers;
            let prepared = prepare_one(service, true)?;
            let (addrs, per_worker) = listener::bind_or_inherit(&prepared.config, Vec::new())?;
            bound.push(Bound {
                prepared,
                addrs,
                per_worker,
            });
        }
        // Kept services: their new backends, and what waits.
        for (number, service) in kept {
            let control = match live.iter().find(|(n, _)| *n == number) {
                Some((n, s)) => self.on(*n, Arc::clone(s)),
                None => continue,
            };
            let waiting = control.config_differences(&service.config);
            if !waiting.is_empty() {
                report.waiting.push((service.name.clone(), waiting));
            }
            if let Err(e) = control.reload_with(service.config.backends.clone()) {
                report.failed.push((service.name.clone(), e));
            }
        }
        for number in leaving {
            self.remove_number(number);
        }
        for bound in bound {
            self.add_bound(bound)?;
        }
        Ok(report)
    }

    /// Stops service `number`: no longer listed, its listeners closed in every worker, its
    /// sessions drained; its checks leave the health thread and the DNS thread forgets it.
    fn remove_number(&self, number: usize) {
        let removed = {
            let mut services = self
                .services
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            services.get_mut(number).and_then(Option::take)
        };
        let Some(service) = removed else {
            return;
        };
        for w in self.workers.iter() {
            w.send(Control::RemoveService {
                number,
                timeout: service.config.drain_timeout,
                spread: service.config.close_spread,
            });
        }
        service.health.send(Command::Shutdown);
        if let Some((dns, _)) = &self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dns
        {
            dns.remove(number);
        }
        log::info!(
            "service '{}' removed: its listeners closed, its sessions draining",
            service.name
        );
    }

    /// Runs `f` on the handle of the one health thread; an error once the balancer has begun
    /// to stop (the handle is gone).
    fn on_health_thread<T>(
        &self,
        f: impl FnOnce(&HealthThread) -> std::io::Result<T>,
    ) -> Result<T, StartError> {
        match &self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .health
        {
            Some((thread, _)) => f(thread).map_err(StartError::Health),
            None => Err(StartError::Health(std::io::Error::other(
                "the balancer is stopping",
            ))),
        }
    }

    /// Starts a new service on listeners already bound: the workers are told first, then
    /// its checks join the health thread (its first publish finds the workers serving it).
    fn add_bound(&self, bound: Bound) -> Result<(), StartError> {
        let Bound {
            prepared,
            addrs,
            per_worker,
        } = bound;
        let config = Arc::clone(&prepared.config);
        let waker = self.on_health_thread(|thread| Ok(thread.waker()))?;
        let (mut health, link, published) = Health::new(Arc::clone(&config), waker);
        let initial = Arc::clone(&published.lock().unwrap_or_else(PoisonError::into_inner));
        let ip_limits = ip_limits_of(&config)?;
        let control = Arc::new(control::ServiceControl {
            name: prepared.name,
            published,
            counters: Arc::new(stats::ServiceCounters::default()),
            health: link.clone(),
            listen_addrs: addrs,
            config: Arc::clone(&config),
            sources: std::sync::Mutex::new(prepared.sources),
        });
        let number = {
            let mut services = self
                .services
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            services.push(Some(Arc::clone(&control)));
            services.len() - 1
        };
        let mut per_worker = per_worker.into_iter();
        for w in self.workers.iter() {
            w.send(Control::AddService {
                number,
                start: worker::ServiceInit {
                    name: Arc::from(control.name.as_str()),
                    config: Arc::clone(&config),
                    listeners: per_worker.next().unwrap_or_default(),
                    backends: Arc::clone(&initial),
                    health: link.clone(),
                    ip_limits: ip_limits.clone(),
                    counters: Arc::clone(&control.counters),
                },
            });
        }
        health.attach(number, self.workers.to_vec());
        // Its checks join the one health thread.
        self.on_health_thread(|thread| thread.add(health))?;
        log::info!(
            "holdfast listening on {} with {} backend(s), algorithm {}, relay {}, health check \
             {} (service '{}' added)",
            control
                .listen_addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.backends.len(),
            config.algorithm,
            config.relay,
            config.health.check,
            control.name,
        );
        start_dns(&self.on(number, control))
    }
}
