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

pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod error;
mod health;
mod listener;
mod relay;
mod session;
pub mod stats;
mod sys;
mod timer;
mod token;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

pub use backend::{BackendSet, BackendState, BackendStatsSnapshot};
pub use config::{
    Algorithm, BackendSpec, Config, HealthCheck, HealthConfig, LimitsConfig, RelayMode,
};
pub use error::{ConfigError, StartError};
pub use stats::StatsSnapshot;
/// For clients that bind many sockets to 127.0.0.x: choose the local port at connect time.
pub use sys::bind_address_no_port;

use health::{Command, Health, HealthLink, Published, WorkerLink};
use stats::Counters;
use worker::{Control, Worker};

/// A running balancer. Dropping it shuts it down and waits for the threads.
pub struct Holdfast {
    listen_addrs: Vec<SocketAddr>,
    workers: Vec<WorkerLink>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    health: HealthLink,
    /// The backend set the health thread last published (read here for stats only).
    backends: Published,
}

impl Holdfast {
    /// Validates `config`, binds every listener (one SO_REUSEPORT socket per worker and listen
    /// address), and starts the health thread and the workers. Fails without starting anything
    /// if a listener cannot be bound.
    pub fn start(config: Config) -> Result<Holdfast, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let (listen_addrs, mut listeners) = listener::bind_all(&config)?;
        let (mut health, health_link, backends) =
            Health::new(Arc::clone(&config)).map_err(StartError::Worker)?;
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
        match std::thread::Builder::new()
            .name("holdfast-health".into())
            .spawn(move || health.run())
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_and_join(&workers, &health_link, threads);
                return Err(StartError::Worker(e));
            }
        }
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
        Ok(Holdfast {
            listen_addrs,
            workers,
            threads,
            counters,
            health: health_link,
            backends,
        })
    }

    /// The addresses the balancer accepts on, one per configured listen address, with the
    /// real port where port 0 was asked for.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Global counters, read now.
    pub fn stats(&self) -> StatsSnapshot {
        self.counters.snapshot()
    }

    /// Per-backend counters of the current backend set, read now.
    pub fn backend_stats(&self) -> Vec<BackendStatsSnapshot> {
        self.current_backends().stats_snapshot()
    }

    /// The backend set the workers were last given.
    pub fn current_backends(&self) -> Arc<BackendSet> {
        Arc::clone(&self.backends.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the backend list. Backends that stay keep their state and counters; new ones
    /// start up (with slow start when configured). Returns once the workers have been sent the
    /// new list: connections accepted from then on use it. Live sessions are untouched.
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), ConfigError> {
        let mut probe = Config::new(self.listen_addrs.clone(), specs);
        probe.workers = 1;
        probe.validate()?;
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.health
            .send(Command::SetBackends(probe.backends, done_tx));
        done_rx
            .recv()
            .map_err(|_| ConfigError::Invalid("the balancer is shutting down".into()))
    }

    /// Asks every thread to stop: listeners and sessions are closed. Returns at once; call
    /// [`Holdfast::join`] to wait.
    pub fn shutdown(&self) {
        self.health.send(Command::Shutdown);
        for w in &self.workers {
            w.send(Control::Shutdown);
        }
    }

    /// Waits for every thread to exit.
    pub fn join(mut self) {
        join_all(std::mem::take(&mut self.threads));
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            join_all(std::mem::take(&mut self.threads));
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
