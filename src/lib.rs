//! holdfast: an L4 TCP load balancer for long-lived connections.
//!
//! The binary is a thin shell over this library. A program (or a test) builds a [`Config`],
//! starts the balancer with [`Holdfast::start`], learns where it listens with
//! [`Holdfast::listen_addrs`], and stops it with [`Holdfast::shutdown`] and [`Holdfast::join`]
//! (dropping the handle does both).
//!
//! ```no_run
//! use holdfast::{BackendSpec, Config, Holdfast};
//! let config = Config::new(
//!     vec!["127.0.0.1:0".parse().unwrap()],
//!     vec![BackendSpec::new("127.0.0.1:6379".parse().unwrap())],
//! );
//! let lb = Holdfast::start(config).unwrap();
//! println!("listening on {:?}", lb.listen_addrs());
//! lb.shutdown();
//! lb.join();
//! ```
//!
//! See `docs/architecture.md` for the threads, the life of one connection, and what is shared.

pub mod admin;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod control;
pub mod error;
mod health;
mod listener;
mod plane;
mod proxy_protocol;
mod relay;
mod session;
pub mod sources;
pub mod stats;
mod sys;
mod timer;
mod token;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};

use crossbeam_channel::Sender;
use std::thread::JoinHandle;

pub use backend::{BackendSet, BackendState, BackendStatsSnapshot};
pub use config::ConfigError;
pub use config::{
    Algorithm, BackendSpec, Config, DnsName, HealthCheck, HealthConfig, LimitsConfig, RelayMode,
    Resolver, SendExpect,
};
pub use control::Controller;
pub use error::StartError;
pub use plane::{BackendChange, ControlError};
pub use sources::SourceError;
pub use stats::StatsSnapshot;
/// For clients that bind many sockets to 127.0.0.x: choose the local port at connect time.
pub use sys::bind_address_no_port;
/// For the binary's signal thread: counts signal deliveries that signal-hook's iterator folds.
#[doc(hidden)]
pub use sys::count_deliveries;

/// Entry points for the `cargo fuzz` targets in `fuzz/`. Not an API.
#[doc(hidden)]
pub mod fuzzing;

use admin::AdminServer;
use health::Health;
use plane::{Command, Control, HealthLink, WorkerLink};
use sources::Sources;
use stats::Counters;
use worker::Worker;

/// A running balancer. Dropping it shuts it down and waits for the threads.
pub struct Holdfast {
    control: Controller,
    workers: Vec<JoinHandle<()>>,
    health: Option<JoinHandle<()>>,
    admin: Option<AdminServer>,
    /// The DNS refresh thread and the sender whose drop stops it.
    dns: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Holdfast {
    /// Validates `config`, binds every listener (one SO_REUSEPORT socket per worker and listen
    /// address), and starts the health thread and the workers. Fails without starting anything
    /// if a listener cannot be bound.
    pub fn start(mut config: Config) -> Result<Holdfast, StartError> {
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
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let (listen_addrs, mut listeners) = listener::bind_all(&config)?;
        let (mut health, health_link, backends) =
            Health::new(Arc::clone(&config)).map_err(StartError::Health)?;
        let initial = Arc::clone(&backends.lock().unwrap_or_else(PoisonError::into_inner));

        let mut workers = Vec::with_capacity(config.workers);
        let mut for_health = Vec::with_capacity(config.workers);
        let mut threads = Vec::with_capacity(config.workers + 1);
        for (id, worker_listeners) in listeners.drain(..).enumerate() {
            let (worker, control, waker) = Worker::new(
                id,
                Arc::clone(&config),
                worker_listeners,
                Arc::clone(&initial),
                Arc::clone(&counters),
                health_link.clone(),
            )
            .map_err(StartError::Worker)?;
            for_health.push(WorkerLink {
                tx: control.clone(),
                waker: Arc::clone(&waker),
            });
            workers.push(WorkerLink { tx: control, waker });
            let spawned = std::thread::Builder::new()
                .name(format!("holdfast-worker-{id}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_and_join(&workers, &health_link, threads);
                    return Err(StartError::Worker(e));
                }
            }
        }
        health.attach(for_health);
        let health_thread = match std::thread::Builder::new()
            .name("holdfast-health".into())
            .spawn(move || health.run())
        {
            Ok(t) => t,
            Err(e) => {
                stop_and_join(&workers, &health_link, threads);
                return Err(StartError::Health(e));
            }
        };
        log::info!(
            "holdfast listening on {} with {} worker(s), {} backend(s), algorithm {}, relay {}, \
             health check {}",
            listen_addrs
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
        let mut balancer = Holdfast {
            control: Controller::new(
                counters,
                backends,
                health_link,
                workers,
                listen_addrs,
                Arc::clone(&config),
                sources,
            ),
            workers: threads,
            health: Some(health_thread),
            admin: None,
            dns: None,
        };
        if !config.backend_dns.is_empty() {
            let control = balancer.control.clone();
            let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
            let interval = config.dns_interval;
            let thread = std::thread::Builder::new()
                .name("holdfast-dns".into())
                .spawn(move || {
                    // Wakes every interval until the sender is dropped at shutdown.
                    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(interval)
                    {
                        for e in control.refresh_dns() {
                            log::warn!("{e}; keeping the last answer");
                        }
                    }
                })
                .map_err(StartError::Dns)?;
            balancer.dns = Some((stop, thread));
        }
        if let Some(addr) = config.admin {
            // On failure, dropping `balancer` stops everything started so far.
            let admin = AdminServer::start(addr, balancer.control.clone())
                .map_err(|source| StartError::Admin { addr, source })?;
            log::info!("admin endpoint on http://{}", admin.local_addr());
            balancer.admin = Some(admin);
        }
        Ok(balancer)
    }

    /// Where the admin endpoint listens, if `--admin` was given.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// A cloneable handle on the control plane (stats, backend changes, drain, shutdown), for
    /// other threads: the admin endpoint, a signal handler.
    pub fn controller(&self) -> &Controller {
        &self.control
    }

    /// The addresses the balancer accepts on, one per configured listen address, with the
    /// real port where port 0 was asked for.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        self.control.listen_addrs()
    }

    /// Global counters, read now.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.stats()
    }

    /// Per-backend counters of the current backend set, read now.
    pub fn backend_stats(&self) -> Vec<BackendStatsSnapshot> {
        self.control.backend_stats()
    }

    /// The backend set the workers were last given.
    pub fn current_backends(&self) -> Arc<BackendSet> {
        self.control.current_backends()
    }

    /// Replaces the backend list; see [`Controller::set_backends`].
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), ControlError> {
        self.control.set_backends(specs)
    }

    /// Drains, readies or reweights one backend; see [`Controller::change_backend`].
    pub fn change_backend(
        &self,
        addr: SocketAddr,
        change: BackendChange,
    ) -> Result<(), ControlError> {
        self.control.change_backend(addr, change)
    }

    /// Graceful shutdown; see [`Controller::drain`]. [`Holdfast::join`] returns when the last
    /// session has ended.
    pub fn drain(&self) {
        self.control.drain();
    }

    /// Asks every thread to stop: listeners and sessions are closed. Returns at once; call
    /// [`Holdfast::join`] to wait.
    pub fn shutdown(&self) {
        self.control.shutdown();
    }

    /// Waits for the workers to exit (after [`Holdfast::shutdown`], or once a
    /// [`Holdfast::drain`] has seen the last session end), then stops the health thread.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        join_all(std::mem::take(&mut self.workers));
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
        if let Some((stop, thread)) = self.dns.take() {
            drop(stop);
            join_all(vec![thread]);
        }
        self.control.stop_health();
        join_all(self.health.take().into_iter().collect());
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if self.health.is_some() {
            self.shutdown();
            self.join_threads();
        }
    }
}

fn stop_and_join(workers: &[WorkerLink], health: &HealthLink, threads: Vec<JoinHandle<()>>) {
    health.send(Command::Shutdown);
    for w in workers {
        w.send(Control::Shutdown);
    }
    join_all(threads);
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            log::error!("a holdfast thread panicked");
        }
    }
}
