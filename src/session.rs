//! One proxied connection: a client socket, and where it stands with its backend.
//!
//! ```text
//!        no backend has room (--max-conns-per-backend, --max-connect-rate),
//!        or no descriptor for a backend socket
//!   accept ──► Accepted ──────────► Queued ──room appears──┐   queue timeout, or the
//!                 │                   ▲                    │   client left ──► closed
//!                 │                   └──only full left────┤
//!                 │                                        ▼
//!                 └───────────────────────────────────► Connecting ──connected──► Relaying
//!                                                        │  ▲                       │
//!       connect failed or timed out: next candidate, ────┘  │                       │
//!       up to --retries (the client left ──► closed) ───────┘                       │
//!                                                                                   │
//!   Relaying ──both directions done, a reset, shutdown──────────────────────────► closed
//!            ──drain, idle timeout, backend timeout──► Lingering ──FIN taken──► closed
//! ```
//!
//! `Accepted` lasts only while the worker looks for a backend (within one call). `Queued`
//! holds the client socket alone: no backend socket, no pipe, no buffer; a queued or
//! connecting client that resets, or closes with nothing sent, is closed at once. Each
//! connect attempt is numbered by a per-session counter that only goes up, so a timer armed
//! for an earlier attempt never matches a later one. `Lingering` is a session already closed
//! (counted, logged, its backend slot and pumps given back) whose sockets stay open, write
//! sides shut down, until the peers have taken the FIN (see `Worker::start_lingering`);
//! a second signal or the worker's end drops them at once.
//!
//! The state is small and explicit (the sockets, a phase enum carrying its data, the bytes in
//! flight inside the pumps) so that it could one day be handed to another process intact.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::backend::BackendSet;
use crate::relay::{Pools, Pump, Readiness};
use crate::token::Side;

pub struct Session {
    /// Unique within the worker; tells a live timer or queue entry from one left by an earlier
    /// session that had the same slab key.
    pub id: u64,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    pub client_ready: Readiness,
    /// The set the backend is picked from (retries pick from the same set).
    pub set: Arc<BackendSet>,
    pub phase: Phase,
    pub started: Instant,
    /// Last time a byte moved either way (for the idle timeout).
    pub last_active: Instant,
    /// Already in the worker's list of sessions to run again next turn.
    pub scheduled: bool,
    /// Which of the worker's listeners accepted it.
    pub listener: usize,
    /// Backend connects started so far. It numbers the attempts (see `Phase::Connecting`) and
    /// only goes up: a stay in the queue may forget the backends tried, never this count.
    pub connect_attempts: u32,
}

/// The backend side of a session that has one.
pub struct Upstream {
    pub socket: TcpStream,
    pub ready: Readiness,
    /// Index of the backend in the session's set.
    pub index: usize,
    pub connect_started: Instant,
}

pub enum Phase {
    /// Just accepted (or between two connect attempts); no backend socket.
    Accepted,
    /// Waiting in the worker's queue for a backend with room, until `deadline` (the queue
    /// timeout from when it joined). A client that is placed, fails its connect and is queued
    /// again waits a whole new timeout, and the first wait's timer no longer matches.
    /// `tried` lists the backends that already failed for it (excluded, and counted
    /// against `--retries`, when it is placed).
    Queued {
        deadline: Instant,
        tried: Vec<usize>,
    },
    Connecting {
        upstream: Upstream,
        /// This attempt's number (`Session::connect_attempts` when it started), so a timer
        /// armed for an earlier attempt is ignored.
        attempt: u32,
        /// Backends that already failed for this client.
        tried: Vec<usize>,
    },
    Relaying {
        upstream: Upstream,
        client_to_backend: Pump,
        backend_to_client: Pump,
        /// Which side ended its stream first, once one has.
        first_eof: Option<Side>,
        /// When the backend connection was established.
        established: Instant,
        /// With `--backend-timeout`: when the client first sent bytes that the backend has not
        /// answered since (`None` while nothing is waiting for an answer).
        unanswered_since: Option<Instant>,
        /// A backend-timeout timer is armed for this session (one at a time; it re-arms
        /// itself lazily, like the idle timer).
        backend_timer: bool,
    },
    /// Closed (counted, logged, its slot and pumps given back) by holdfast itself, with a FIN:
    /// the sockets' write sides are shut down, and they stay open only to discard what still
    /// arrives until each peer has acknowledged the FIN or ended its stream, or until
    /// `until` (see `Worker::start_lingering`). The backend socket is there if the session
    /// was relaying.
    Lingering {
        backend: Option<TcpStream>,
        client_done: bool,
        backend_done: bool,
        until: Instant,
    },
}

/// How long holdfast keeps the sockets of a session it closed itself (a drain, a timeout)
/// open after shutting down their write sides, for the peers to receive the FIN (see
/// `Phase::Lingering`). A peer that has not acknowledged it by then is closed on regardless.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a lingering session looks whether its peers have acknowledged the FIN (no
/// event says so).
pub const LINGER_CHECK: Duration = Duration::from_millis(10);

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF.
    Done,
    /// A socket failed (reset, broken pipe); `Side` is where.
    Reset(Side),
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The backend left the client's bytes unanswered for the backend timeout.
    BackendTimeout,
    /// No backend could be connected.
    NoBackend,
    /// Waited in the queue longer than the queue timeout.
    QueueTimeout,
    /// Out of descriptors or memory.
    Exhausted,
    /// Closed by a drain (holdfast's own, or a backend's drain timeout).
    Drain,
    /// The worker is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Holdfast itself decided to end a session that was fine as far as TCP goes: it ends
    /// with a FIN on both sides, never a reset (see `Phase::Lingering`).
    pub fn ends_with_fin(self) -> bool {
        matches!(
            self,
            CloseReason::Drain | CloseReason::IdleTimeout | CloseReason::BackendTimeout
        )
    }
}

impl Session {
    pub fn upstream(&self) -> Option<&Upstream> {
        match &self.phase {
            Phase::Accepted | Phase::Queued { .. } | Phase::Lingering { .. } => None,
            Phase::Connecting { upstream, .. } | Phase::Relaying { upstream, .. } => Some(upstream),
        }
    }

    pub fn upstream_mut(&mut self) -> Option<&mut Upstream> {
        match &mut self.phase {
            Phase::Accepted | Phase::Queued { .. } | Phase::Lingering { .. } => None,
            Phase::Connecting { upstream, .. } | Phase::Relaying { upstream, .. } => Some(upstream),
        }
    }

    /// Closed already, its sockets waiting for the peers to take the FIN.
    pub fn is_lingering(&self) -> bool {
        matches!(self.phase, Phase::Lingering { .. })
    }

    /// Whether the session holds a slot in its backend's active count: one is taken with the
    /// backend socket and given back with it (a failed connect's socket is dropped, its slot
    /// released, before the next attempt), so exactly the sessions with an upstream hold one.
    pub fn holds_backend_slot(&self) -> bool {
        self.upstream().is_some()
    }

    /// The backend has not sent a single byte back, and the session is at most `window` old
    /// (counted from the backend connection being established). A backend that ends the
    /// session now (reset or EOF) has failed the client: a failure seen on live traffic.
    /// Bytes the client sent do not matter: that the backend's kernel took them proves
    /// nothing, and a client that speaks first (a WebSocket upgrade) always sends some.
    pub fn backend_silent_within(&self, now: Instant, window: Duration) -> bool {
        match &self.phase {
            Phase::Relaying {
                backend_to_client,
                established,
                ..
            } => {
                backend_to_client.bytes == 0
                    && now.saturating_duration_since(*established) <= window
            }
            _ => false,
        }
    }

    /// The session is closing for a reason that is a passive failure of its backend: a reset
    /// from the backend, which had answered nothing and reset within `window` of the start
    /// (a backend that ended with EOF instead was judged when the EOF arrived, so it is not
    /// counted twice); or the backend timeout, on a session the backend never answered a
    /// single byte (a backend that accepts and hangs).
    pub fn backend_gave_up(&self, reason: CloseReason, now: Instant, window: Duration) -> bool {
        match &self.phase {
            Phase::Relaying {
                first_eof,
                backend_to_client,
                ..
            } => match reason {
                CloseReason::Reset(Side::Backend) => {
                    *first_eof != Some(Side::Backend) && self.backend_silent_within(now, window)
                }
                CloseReason::BackendTimeout => backend_to_client.bytes == 0,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether a client that is not relaying yet (queued, or waiting for its backend connect)
    /// has gone: it reset the connection (`Reset`), or it closed it with nothing sent that is
    /// still to be relayed (`Done`). A client that half-closed after sending its request (EOF
    /// with bytes pending) has not gone: the request is still to be served, as HAProxy would
    /// without `abortonclose`. Looks with `SO_ERROR` and a one-byte `MSG_PEEK`; consumes
    /// nothing.
    pub fn client_left(&self) -> Option<CloseReason> {
        match self.client.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Some(CloseReason::Reset(Side::Client)),
        }
        let mut byte = [0u8; 1];
        match self.client.peek(&mut byte) {
            Ok(0) => Some(CloseReason::Done),
            Ok(_) => None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => None,
            Err(_) => Some(CloseReason::Reset(Side::Client)),
        }
    }

    /// How the session ended, in the words of the session log.
    pub fn end_label(&self, reason: CloseReason) -> &'static str {
        match reason {
            CloseReason::Done => match &self.phase {
                Phase::Relaying {
                    first_eof: Some(Side::Backend),
                    ..
                } => "backend-close",
                _ => "client-close",
            },
            CloseReason::Reset(Side::Client) => "client-reset",
            CloseReason::Reset(Side::Backend) => "backend-reset",
            CloseReason::IdleTimeout => "idle-timeout",
            CloseReason::BackendTimeout => "backend-timeout",
            CloseReason::NoBackend => "connect-failure",
            CloseReason::QueueTimeout => "queue-timeout",
            CloseReason::Exhausted => "out-of-resources",
            CloseReason::Drain => "drain",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// Gives back the pumps' pipes and buffers.
    pub fn release(&mut self, pools: &mut Pools) {
        if let Phase::Relaying {
            client_to_backend,
            backend_to_client,
            ..
        } = &mut self.phase
        {
            client_to_backend.release(pools);
            backend_to_client.release(pools);
        }
    }
}
