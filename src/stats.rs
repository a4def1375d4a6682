//! Process-wide counters, shared by every worker as relaxed atomics.
//!
//! Relaxed ordering is enough: each counter is independent, and a reader only needs a value
//! that was true at some recent instant, never a consistent cut across counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The live counters.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// The counters, read at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Client connections accepted.
    accepted,
    /// Sessions open now: accepted and not yet closed (waiting in the queue, connecting or
    /// relaying; one that holdfast closed with a FIN, waiting for the peers to take it, is
    /// closed already).
    active,
    /// Sessions closed, for any reason.
    closed,
    /// Clients closed because no backend was eligible (or every candidate failed).
    no_backend,
    /// Backend connects that failed (refused, reset, timed out), retried or not.
    connect_failures,
    /// Sessions closed by the idle timeout.
    idle_timeouts,
    /// Sessions closed by the backend timeout (the backend left the client's bytes
    /// unanswered).
    backend_timeouts,
    /// Sessions that ended with a reset or socket error on either side.
    resets,
    /// Sessions closed by a drain (holdfast's graceful shutdown or a backend's drain timeout).
    closed_by_drain,
    /// Pipes held by sessions right now (bytes in flight through splice).
    pipes_in_use,
    /// Per-session copy buffers held right now (a write to a peer was partial).
    buffers_in_use,
    /// Times descriptors or memory ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM) in accept(2),
    /// when holding a descriptor in reserve for a client's backend socket, or when opening a
    /// backend socket; accepting pauses briefly each time.
    accept_errors,
    /// Clients waiting for a backend with room right now (all workers).
    queued,
    /// Clients that ever had to wait in the queue.
    queued_total,
    /// Clients closed because they waited longer than the queue timeout.
    queue_timeouts,
    /// Clients closed at once because the queue was full.
    queue_full,
    /// Bytes relayed client to backend.
    bytes_client_to_backend,
    /// Bytes relayed backend to client.
    bytes_backend_to_client,
}

impl Counters {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }
}
