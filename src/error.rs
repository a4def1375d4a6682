//! Errors a person reads: configuration and start-up.
//!
//! The per-event path never builds one of these; it works with `io::Error` and small result
//! enums, and a failure there closes one session, never the process.

use std::io;
use std::net::SocketAddr;

/// A value in the configuration is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid backend '{value}': {why}")]
    Backend { value: String, why: String },
    #[error(
        "invalid algorithm '{0}' (expected least-conn, source-hash, ip-hash, source or round-robin)"
    )]
    Algorithm(String),
    #[error("invalid relay mode '{0}' (expected auto, splice or copy)")]
    Relay(String),
    #[error("invalid health check '{value}': {why}")]
    HealthCheck { value: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

/// The balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start worker: {0}")]
    Worker(#[source] io::Error),
}
