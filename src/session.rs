//! One proxied connection: a client socket, a backend socket, and where the two stand.
//!
//! ```text
//!   accept ──► Connecting ──(connected)──► Relaying ──(both directions done, error,
//!                 │  ▲                                  idle timeout, shutdown)──► closed
//!                 └──┘ connect failed or timed out: next candidate, up to --retries
//! ```
//!
//! The session always has a backend socket: while connecting, the one being connected (a
//! retry replaces it); while relaying, the connected one. The state is small and explicit (two
//! sockets, a phase, the bytes in flight inside the pumps) so that it could one day be handed
//! to another process intact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::backend::{BackendSet, BackendStats};
use crate::relay::{Pools, Pump, Readiness};

pub struct Session {
    /// Unique within the worker; tells a live timer from one left by an earlier session that
    /// had the same slab key.
    pub id: u64,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    pub client_ready: Readiness,
    pub backend: TcpStream,
    pub backend_ready: Readiness,
    /// Index of the backend in `set`.
    pub backend_index: usize,
    /// The set the backend was picked from (retries pick from the same set).
    pub set: Arc<BackendSet>,
    pub phase: Phase,
    /// Last time a byte moved either way (for the idle timeout).
    pub last_active: Instant,
    /// Already in the worker's list of sessions to run again next turn.
    pub queued: bool,
}

pub enum Phase {
    Connecting {
        /// Counts connect attempts, so a timer armed for an earlier attempt is ignored.
        attempt: u32,
        /// Backends that already failed for this client.
        tried: Vec<usize>,
    },
    Relaying {
        client_to_backend: Pump,
        backend_to_client: Pump,
    },
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF.
    Done,
    /// A socket failed (reset, broken pipe); `Side` is where.
    Reset(crate::token::Side),
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// No backend could be connected.
    NoBackend,
    /// The worker is shutting down.
    Shutdown,
}

impl Session {
    pub fn backend_stats(&self) -> &BackendStats {
        &self.set.backends[self.backend_index].stats
    }

    /// Gives back the pumps' pipes and buffers.
    pub fn release(&mut self, pools: &mut Pools) {
        if let Phase::Relaying {
            client_to_backend,
            backend_to_client,
        } = &mut self.phase
        {
            client_to_backend.release(pools);
            backend_to_client.release(pools);
        }
    }
}
