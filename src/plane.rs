//! The control plane's vocabulary: the messages its threads send each other, the links they
//! send them on, and what an operator's request can ask for and fail with.
//!
//! ```text
//!  Controller ──Command: SetBackends, Backend, Shutdown──► health thread
//!      │                                                     │      ▲
//!      │                                  Control: Backends, │      │ Command: Failing
//!      │                           CloseBackend, Rebalance   ▼      │
//!      └──Control: Drain, Rebalance, Shutdown──────────────► workers
//!                                                            ▲
//!  upgrade/local.rs ──Control: Freeze, Release, Resume,──────┘
//!                     Rebuild, Adopt, Discard (live upgrade)
//! ```
//!
//! - [`Command`] goes to the health thread, the one owner of backend state, over a
//!   [`HealthLink`]: a new list, an operator's change, a worker's report of a failing backend,
//!   shutdown. A command that changes the set carries a sender for the answer.
//! - [`Control`] goes to a worker over a [`WorkerLink`]: the set to use from now on, a drain,
//!   a drained backend's closes, shutdown; and the live upgrade's batches (freeze, release
//!   or resume on the old side; rebuild, adopt or discard on the new one: `upgrade/local.rs`).
//! - [`Published`] is the set the health thread last sent, for readers off the data plane.
//!
//! Every sender is a channel plus a `mio::Waker`, so a message wakes its thread's poll at
//! once. This module only defines the types: the health thread (`health/`), the workers
//! (`worker/`) and the handle (`control.rs`) all import it, and it imports none of them.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::Waker;

use crate::backend::BackendSet;
use crate::config::{BackendSpec, ConfigError, MAX_REBALANCE_WINDOW, MAX_WEIGHT};
use crate::sources::SourceError;
use crate::upgrade::handover::Frozen;
use crate::upgrade::wire::{BackendInfo, PackedSession};

/// A change to one backend requested by an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChange {
    /// No new connections; live sessions continue (closed, spread out, after
    /// `--backend-drain-timeout` if one is set).
    Drain,
    /// Back in rotation after a drain.
    Ready,
    /// A new weight (1..=256) for new connections, until a new list
    /// ([`Controller::set_backends`](crate::Controller::set_backends), a reload) changes this
    /// backend's configured weight.
    Weight(u32),
}

/// Why a request to the running balancer (a [`Controller`](crate::Controller) call) failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No backend has this address (or it was removed from the list and is leaving).
    #[error("no backend {0}")]
    UnknownBackend(SocketAddr),
    /// A weight outside 1..=256.
    #[error("weight must be from 1 to {MAX_WEIGHT}, not {0}")]
    BadWeight(u32),
    /// The new list is not acceptable (nothing was changed).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The backends file or a DNS name gave no usable list (nothing was changed).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The balancer is shutting down: the change was not made.
    #[error("the balancer is shutting down")]
    ShuttingDown,
    /// The health thread did not confirm in time. The change was sent and will still be
    /// made, unless the balancer shuts down first: the health thread takes commands in order
    /// and drops none.
    #[error("the health thread did not answer in time")]
    Timeout,
}

/// Messages to the health thread.
pub(crate) enum Command {
    /// Replace the backend list; the sender is told once the new set is published.
    SetBackends(Vec<BackendSpec>, Sender<()>),
    /// A worker saw `--observe-errors` consecutive failures on this backend.
    Failing(SocketAddr),
    /// An operator's change to one backend; the sender is told the outcome once published.
    Backend(SocketAddr, BackendChange, Sender<Result<(), ControlError>>),
    /// Live upgrade: the listed backends' running state, for the new process.
    Snapshot(Sender<Vec<BackendInfo>>),
    Shutdown,
}

/// Messages to a worker.
pub(crate) enum Control {
    /// Use this backend set for new connections of this service (its number) from now on.
    Backends(usize, Arc<BackendSet>),
    /// Graceful shutdown: close the listeners now, let sessions end on their own for
    /// `timeout`, then close the rest evenly over `spread`, and exit when none is left.
    Drain { timeout: Duration, spread: Duration },
    /// A drained backend's drain timeout passed: close its sessions (those of this service)
    /// evenly over `spread`.
    CloseBackend {
        service: usize,
        addr: SocketAddr,
        spread: Duration,
    },
    /// Start this rebalance of this service, replacing any older one (of any service).
    Rebalance(usize, RebalanceStart),
    /// Close everything and exit.
    Shutdown,
    /// Live upgrade, old side: freeze connecting and relaying sessions as batch `id`, at
    /// most `max_fds` descriptors' worth (deregistered from the poller first, then packed
    /// with duplicates of their descriptors). The answer is the batch, empty when none is
    /// left to freeze. `queued`: queued sessions too (the last round, once every session
    /// holding a backend slot has gone, so the new process does not give their slots away).
    Freeze {
        id: u32,
        max_fds: usize,
        queued: bool,
        reply: Sender<Frozen>,
    },
    /// Batch `id` belongs to the new process: drop the old copies, uncounted here.
    Release { id: u32 },
    /// Batch `id` stays: register its sessions again and run them.
    Resume { id: u32 },
    /// Live upgrade, new side: rebuild batch `id` (not registered, nothing read), answering
    /// whether it could.
    Rebuild {
        id: u32,
        sessions: Vec<PackedSession>,
        fds: Vec<OwnedFd>,
        reply: Sender<Result<(), String>>,
    },
    /// Batch `id` is ours: count, register and run its sessions, arm their timers. Its
    /// sessions have been paused since `paused_since` (the old process froze them then).
    Adopt {
        id: u32,
        paused_since: std::time::Instant,
    },
    /// Batch `id` stays with the old process: close what was rebuilt.
    Discard { id: u32 },
    /// Live upgrade, old side: duplicates of this worker's open listeners, with their
    /// services' names and their addresses (the originals stay here).
    Listeners {
        reply: Sender<Vec<(String, SocketAddr, OwnedFd)>>,
    },
    /// Live upgrade, old side: `false` stops accepting (the listeners are deregistered and
    /// left to the new process, which holds the same sockets); `true` accepts again.
    Accepting(bool),
    /// A service added while running (a reload): serve it from now on as service `number`
    /// (the next number: services are told in order), on these listeners of this worker.
    AddService { number: usize, start: ServiceStart },
    /// A service removed while running: close its listeners now, let its sessions end on
    /// their own for `timeout`, then close the rest evenly over `spread`.
    RemoveService {
        number: usize,
        timeout: Duration,
        spread: Duration,
    },
}

/// What a worker is given of one service: its settings, its listeners in this worker, the
/// first set, a link to its health thread, and its per-IP table (shared by every worker).
pub(crate) struct ServiceStart {
    /// Its name (for the live upgrade, which gives each session to the service of the same
    /// name).
    pub(crate) name: Arc<str>,
    pub(crate) config: Arc<crate::config::Config>,
    pub(crate) listeners: Vec<mio::net::TcpListener>,
    pub(crate) backends: Arc<BackendSet>,
    pub(crate) health: HealthLink,
    pub(crate) ip_limits: Option<Arc<crate::client_ip::IpLimits>>,
    /// Its own counters, shared by every worker.
    pub(crate) counters: Arc<crate::stats::ServiceCounters>,
}

/// A rebalance to start (see `worker/rebalance.rs`): until `deadline`, close sessions that
/// were relaying at `started` on over-loaded backends. Its generation is unique in the
/// process and increasing, whichever thread starts it (the health thread on a join, the
/// handle on request), so a worker can tell which of two is newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RebalanceStart {
    pub(crate) generation: u64,
    pub(crate) started: Instant,
    pub(crate) deadline: Instant,
}

impl RebalanceStart {
    /// A new rebalance, from now over `window` (at most [`MAX_REBALANCE_WINDOW`]).
    pub(crate) fn new(window: Duration) -> RebalanceStart {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let started = Instant::now();
        RebalanceStart {
            generation: NEXT.fetch_add(1, Relaxed),
            started,
            deadline: started + window.min(MAX_REBALANCE_WINDOW),
        }
    }
}

/// The set last published, shared by the health thread (which replaces it) and the handle
/// (which reads it for stats). Control plane only: workers never touch the lock.
pub(crate) type Published = Arc<Mutex<Arc<BackendSet>>>;

/// How workers and the handle reach the health thread.
#[derive(Clone)]
pub(crate) struct HealthLink {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

impl HealthLink {
    /// The health thread receives what is sent on `tx`, and `waker` wakes its poll.
    pub(crate) fn new(tx: Sender<Command>, waker: Arc<Waker>) -> HealthLink {
        HealthLink { tx, waker }
    }

    pub(crate) fn send(&self, command: Command) {
        // If the thread has exited there is nobody left to tell.
        if self.tx.send(command).is_ok()
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake the health thread: {e}");
        }
    }
}

/// How the health thread and the handle reach one worker.
#[derive(Clone)]
pub(crate) struct WorkerLink {
    pub(crate) tx: Sender<Control>,
    pub(crate) waker: Arc<Waker>,
}

impl WorkerLink {
    pub(crate) fn send(&self, msg: Control) {
        if self.tx.send(msg).is_ok()
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake worker: {e}");
        }
    }
}
