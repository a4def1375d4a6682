//! Live upgrade: a new holdfast process takes over the listeners and the live sessions of the
//! running one, over a UNIX stream socket carrying descriptors (`sys::send_with_fds`) and the
//! messages of [`wire`].
//!
//! The invariant: every listener and every session has exactly one owner at every instant,
//! and only the owner reads or writes its sockets (see `docs/architecture.md`).

pub mod handover;
pub mod local;
pub mod wire;
