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
mod listener;
mod relay;
mod session;
pub mod stats;
mod sys;
mod timer;
mod token;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

pub use backend::{BackendSet, BackendState, BackendStatsSnapshot};
pub use config::{
    Algorithm, BackendSpec, Config, HealthCheck, HealthConfig, LimitsConfig, RelayMode,
};
pub use error::{ConfigError, StartError};
pub use stats::StatsSnapshot;
/// For clients that bind many sockets to 127.0.0.x: choose the local port at connect time.
pub use sys::bind_address_no_port;

use stats::Counters;
use worker::{Control, Worker};

/// A running balancer. Dropping it shuts it down and waits for the workers.
pub struct Holdfast {
    listen_addrs: Vec<SocketAddr>,
    workers: Vec<WorkerHandle>,
    counters: Arc<Counters>,
    /// The backend set most recently published to the workers (control plane only).
    backends: Mutex<Arc<BackendSet>>,
    algorithm: Algorithm,
}

struct WorkerHandle {
    control: Sender<Control>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, msg: Control) {
        // A worker that already exited has dropped its receiver; nothing is left to tell.
        if self.control.send(msg).is_ok()
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake worker: {e}");
        }
    }
}

impl Holdfast {
    /// Validates `config`, binds every listener (one SO_REUSEPORT socket per worker and listen
    /// address) and starts the workers. Fails without starting anything if a listener cannot
    /// be bound.
    pub fn start(config: Config) -> Result<Holdfast, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let backends = Arc::new(BackendSet::build(&config.backends, None, config.algorithm));

        let (listen_addrs, mut listeners) = listener::bind_all(&config)?;

        let mut workers = Vec::with_capacity(config.workers);
        for (id, worker_listeners) in listeners.drain(..).enumerate() {
            let (worker, control, waker) = Worker::new(
                id,
                Arc::clone(&config),
                worker_listeners,
                Arc::clone(&backends),
                Arc::clone(&counters),
            )
            .map_err(StartError::Worker)?;
            let thread = std::thread::Builder::new()
                .name(format!("holdfast-worker-{id}"))
                .spawn(move || worker.run())
                .map_err(StartError::Worker)?;
            workers.push(WorkerHandle {
                control,
                waker,
                thread: Some(thread),
            });
        }
        log::info!(
            "holdfast listening on {} with {} worker(s), {} backend(s), algorithm {}, relay {}",
            listen_addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.workers,
            config.backends.len(),
            config.algorithm,
            config.relay,
        );
        Ok(Holdfast {
            listen_addrs,
            workers,
            counters,
            backends: Mutex::new(backends),
            algorithm: config.algorithm,
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

    /// Replaces the backend list. Backends that stay keep their counters; new connections use
    /// the new list at once; live sessions are untouched.
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), ConfigError> {
        if specs.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one backend is required".into(),
            ));
        }
        let mut current = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        let next = Arc::new(BackendSet::build(&specs, Some(&current), self.algorithm));
        *current = Arc::clone(&next);
        for w in &self.workers {
            w.send(Control::Backends(Arc::clone(&next)));
        }
        Ok(())
    }

    /// Asks every worker to stop: listeners and sessions are closed. Returns at once; call
    /// [`Holdfast::join`] to wait.
    pub fn shutdown(&self) {
        for w in &self.workers {
            w.send(Control::Shutdown);
        }
    }

    /// Waits for every worker to exit.
    pub fn join(mut self) {
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for w in &mut self.workers {
            if let Some(t) = w.thread.take()
                && t.join().is_err()
            {
                log::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.shutdown();
            self.join_workers();
        }
    }
}
