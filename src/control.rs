//! The control plane's handle: what an operator (the admin endpoint, a signal handler, a test)
//! may read and change while the balancer runs.
//!
//! A [`Controller`] is cheap to clone and safe to share between threads. Reads come from the
//! shared counters and the last published backend set; changes are commands to the health
//! thread (the only owner of backend state) or control messages to the workers. None of it
//! touches a worker's hot path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::backend::{BackendSet, BackendStatsSnapshot};
use crate::config::{BackendSpec, Config, MAX_WEIGHT};
use crate::error::ConfigError;
use crate::plane::{
    BackendChange, Command, Control, ControlError, HealthLink, Published, WorkerLink,
};
use crate::sources::Sources;
use crate::stats::{Counters, StatsSnapshot};

/// How long an operator's request waits for the health thread to apply it. The health thread
/// never blocks, so this only guards a caller (the admin endpoint) against a stalled one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn answer<T>(rx: &crossbeam_channel::Receiver<T>) -> Result<T, ControlError> {
    rx.recv_timeout(ANSWER_TIMEOUT).map_err(|e| match e {
        crossbeam_channel::RecvTimeoutError::Timeout => ControlError::Timeout,
        crossbeam_channel::RecvTimeoutError::Disconnected => ControlError::ShuttingDown,
    })
}

/// A handle on a running balancer's control plane. Clone it freely.
#[derive(Clone)]
pub struct Controller {
    pub(crate) counters: Arc<Counters>,
    pub(crate) published: Published,
    pub(crate) health: HealthLink,
    pub(crate) workers: Arc<[WorkerLink]>,
    pub(crate) listen_addrs: Arc<[SocketAddr]>,
    pub(crate) config: Arc<Config>,
    pub(crate) sources: Arc<Mutex<Sources>>,
}

impl Controller {
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
        Arc::clone(
            &self
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The addresses the balancer accepts on.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Replaces the backend list. Backends that stay keep their state and counters; new ones
    /// start up (with slow start when configured); removed ones are drained and leave once
    /// their last session ends. The list is the configuration: a backend whose weight in it
    /// changed takes that weight, replacing one set with [`BackendChange::Weight`]; one whose
    /// weight did not change keeps it; a [`BackendChange::Drain`] stays. Returns once the
    /// workers have been sent the new list.
    pub fn set_backends(&self, specs: Vec<BackendSpec>) -> Result<(), ConfigError> {
        let mut check = Config::new(self.listen_addrs.to_vec(), specs);
        check.workers = 1;
        check.algorithm = self.config.algorithm;
        check.validate()?;
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.health
            .send(Command::SetBackends(check.backends, done_tx));
        done_rx
            .recv()
            .map_err(|_| ConfigError::Invalid(ControlError::ShuttingDown.to_string()))
    }

    /// Re-reads `--backends-file` and applies the difference (see [`Controller::set_backends`]).
    /// An invalid file changes nothing; the error names the file and line.
    pub fn reload(&self) -> Result<(), String> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.file.is_none() {
            return Err("no --backends-file to reload".into());
        }
        let previous = sources.file_specs.clone();
        sources.reload_file()?;
        let backends = sources.backends();
        if let Err(e) = self.set_backends(backends) {
            sources.file_specs = previous;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Resolves the `--backend-dns` names again and applies any change. Names that fail to
    /// resolve keep their last answer; their errors are returned.
    pub fn refresh_dns(&self) -> Vec<String> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let (changed, mut errors) = sources.refresh_dns();
        if changed && let Err(e) = self.set_backends(sources.backends()) {
            errors.push(e.to_string());
        }
        errors
    }

    /// Drains a backend, puts it back in rotation, or changes its weight. Returns once the
    /// workers have been sent the result.
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
        self.health.send(Command::Backend(addr, change, done_tx));
        answer(&done_rx)?
    }

    /// Graceful shutdown: stop accepting at once (listeners close, so new connections go to
    /// another instance), let sessions end on their own for `--drain-timeout`, then close the
    /// rest spread evenly over `--close-spread`. The workers exit when their last session ends.
    pub fn drain(&self) {
        let timeout = self.config.drain_timeout;
        let spread = self.config.close_spread;
        for w in self.workers.iter() {
            w.send(Control::Drain { timeout, spread });
        }
    }

    /// Immediate shutdown: listeners and every session are closed now.
    pub fn shutdown(&self) {
        self.health.send(Command::Shutdown);
        for w in self.workers.iter() {
            w.send(Control::Shutdown);
        }
    }

    /// How long a drain may take at most before every session is closed (and its sockets'
    /// FIN taken or given up on).
    pub fn drain_budget(&self) -> Duration {
        self.config.drain_timeout + self.config.close_spread + crate::session::LINGER_TIMEOUT
    }
}
