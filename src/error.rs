//! Why the balancer could not start: [`StartError`], the one error that gathers the others.
//!
//! Each error a person reads is defined next to what produces it, and re-exported at the
//! crate root: [`ConfigError`] (a value or a combination of values is not acceptable) in
//! `config/`, [`SourceError`] (a backends file or a DNS name gave no usable list) in
//! `sources.rs`, [`ControlError`](crate::ControlError) (a request to the running balancer
//! failed) in `plane.rs`. The per-event path never builds one of these; it works with
//! `io::Error` and small result enums, and a failure there closes one session, never the
//! process.

use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::sources::SourceError;

/// The balancer could not start. Nothing is left running when [`Holdfast::start`] returns
/// one.
///
/// [`Holdfast::start`]: crate::Holdfast::start
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is not acceptable (the binary exits 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backends file or a `--backend-dns` name gave no usable list (the binary exits 2).
    #[error(transparent)]
    Sources(#[from] SourceError),
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
    /// A worker's poller could not be made, or its thread could not be spawned.
    #[error("cannot start worker: {0}")]
    Worker(#[source] io::Error),
    /// The health thread's poller could not be made, or the thread could not be spawned.
    #[error("cannot start the health thread: {0}")]
    Health(#[source] io::Error),
    /// The thread that re-resolves `--backend-dns` names could not be spawned.
    #[error("cannot start the DNS thread: {0}")]
    Dns(#[source] io::Error),
}
