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
    /// Bytes of capacity of grown pipes (a proven bulk stream's, see `--pipe-memory`) that
    /// exist right now, in use or pooled, all workers together.
    pipe_memory,
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
    // The client's address (issue #11). PROXY headers refused, by reason (the parser's
    // reasons, then holdfast's own: an untrusted source, the header timeout, a client that
    // closed or reset before its header was complete).
    /// PROXY header errors: neither `PROXY ` nor the v2 signature.
    proxy_header_signature,
    /// PROXY header errors: v2 version other than 2.
    proxy_header_version,
    /// PROXY header errors: v2 command other than LOCAL and PROXY.
    proxy_header_command,
    /// PROXY header errors: unknown protocol or family.
    proxy_header_family,
    /// PROXY header errors: v2 length shorter than the address block.
    proxy_header_length,
    /// PROXY header errors: v1 line structure.
    proxy_header_syntax,
    /// PROXY header errors: v1 address or port.
    proxy_header_address,
    /// PROXY header errors: longer than the limit.
    proxy_header_too_long,
    /// PROXY header errors: malformed v2 TLVs.
    proxy_header_tlv,
    /// PROXY header errors: a v2 CRC32C that does not match.
    proxy_header_checksum,
    /// PROXY header errors: a source not in `--trusted-proxy`.
    proxy_header_untrusted,
    /// PROXY header errors: not complete within `--proxy-header-timeout`.
    proxy_header_timeout,
    /// PROXY header errors: the client closed or reset before its header was complete.
    proxy_header_closed,
    /// Clients closed at once by `--deny` / `--allow`.
    refused_deny,
    /// Clients closed at once by `--max-conns-per-ip`.
    refused_max_conns_per_ip,
    /// Clients closed at once by `--max-conn-rate-per-ip`.
    refused_max_conn_rate_per_ip,
    /// Client addresses the per-IP table holds (as of its last sweep, every few seconds).
    ip_table_entries,
    /// Clients served untracked because the per-IP table was full (as of its last sweep).
    ip_table_untracked,
}

impl Counters {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }
}

impl Counters {
    /// The PROXY header error counter for `reason` (a label of
    /// `holdfast_proxy_header_errors_total`).
    pub(crate) fn proxy_header_error(&self, reason: &str) -> &AtomicU64 {
        match reason {
            "signature" => &self.proxy_header_signature,
            "version" => &self.proxy_header_version,
            "command" => &self.proxy_header_command,
            "family" => &self.proxy_header_family,
            "length" => &self.proxy_header_length,
            "syntax" => &self.proxy_header_syntax,
            "address" => &self.proxy_header_address,
            "too_long" => &self.proxy_header_too_long,
            "tlv" => &self.proxy_header_tlv,
            "checksum" => &self.proxy_header_checksum,
            "untrusted" => &self.proxy_header_untrusted,
            "timeout" => &self.proxy_header_timeout,
            _ => &self.proxy_header_closed,
        }
    }
}

impl StatsSnapshot {
    /// `(reason label, count)` of every PROXY header error reason.
    pub fn proxy_header_errors(&self) -> [(&'static str, u64); 13] {
        [
            ("signature", self.proxy_header_signature),
            ("version", self.proxy_header_version),
            ("command", self.proxy_header_command),
            ("family", self.proxy_header_family),
            ("length", self.proxy_header_length),
            ("syntax", self.proxy_header_syntax),
            ("address", self.proxy_header_address),
            ("too_long", self.proxy_header_too_long),
            ("tlv", self.proxy_header_tlv),
            ("checksum", self.proxy_header_checksum),
            ("untrusted", self.proxy_header_untrusted),
            ("timeout", self.proxy_header_timeout),
            ("closed", self.proxy_header_closed),
        ]
    }

    /// `(reason label, count)` of clients refused by per-IP policy.
    pub fn clients_refused(&self) -> [(&'static str, u64); 3] {
        [
            ("deny", self.refused_deny),
            ("max_conns_per_ip", self.refused_max_conns_per_ip),
            ("max_conn_rate_per_ip", self.refused_max_conn_rate_per_ip),
        ]
    }
}
