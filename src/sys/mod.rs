//! Everything platform-specific, behind one boundary.
//!
//! Exactly one of the files below is compiled, picked by the `#[cfg_attr(path)]` here; the rest
//! of the crate has no `cfg`. Each platform file provides the same items with the same
//! signatures:
//!
//! - `SPLICE_AVAILABLE: bool`, whether zero-copy relaying can work at all on this platform;
//! - `ACCEPT_INHERITS_SOCKET_OPTIONS: bool`, whether an accepted socket keeps the listener's
//!   TCP_NODELAY and keepalive settings (so they need not be set again per connection);
//! - `WRITABLE_MEANS_CONNECTED: bool`, whether a writable event with no error or hang-up on a
//!   connecting socket proves the connect succeeded (so SO_ERROR need not be asked);
//! - `Pipe`, a non-blocking, close-on-exec kernel pipe, closed on drop;
//! - `Pipe::new() -> io::Result<Pipe>`;
//! - `splice_in(src, &Pipe, len) -> io::Result<usize>`: move up to `len` bytes from a socket
//!   into the pipe without copying to user space; `Ok(0)` is EOF on the socket;
//! - `splice_out(&Pipe, dst, len) -> io::Result<usize>`: move up to `len` bytes from the pipe
//!   to a socket;
//! - `Pipe::set_capacity(bytes) -> io::Result<usize>`: grow a pipe (Linux's
//!   `F_SETPIPE_SZ`), returning the capacity it got;
//! - `set_defer_accept(&listener, secs) -> io::Result<()>`: Linux's `TCP_DEFER_ACCEPT`
//!   (`Unsupported` elsewhere);
//! - `bind_address_no_port(&socket) -> io::Result<()>`: choose the local port at connect
//!   rather than at bind (Linux's `IP_BIND_ADDRESS_NO_PORT`; a no-op elsewhere);
//! - `unacked_bytes(&socket) -> io::Result<usize>`: bytes sent on a TCP socket (its FIN
//!   included) that the peer has not acknowledged (Linux's `SIOCOUTQ`; `Unsupported`
//!   elsewhere);
//! - `set_tcp_user_timeout(&socket, Duration) -> io::Result<()>`: Linux's TCP_USER_TIMEOUT
//!   (`Unsupported` elsewhere);
//! - `is_splice_unsupported(&io::Error) -> bool`: the error says splicing cannot be used here
//!   (as opposed to a failure of this one connection), so the caller should copy instead.
//!
//! On a platform without splice, `Pipe::new` and both splice functions return
//! `ErrorKind::Unsupported`, which `is_splice_unsupported` recognises, so callers fall back to
//! copying through the same code path they use when splice fails at run time on Linux.
//!
//! Two items are the same on every platform and live here: [`count_deliveries`] and
//! [`is_resource_exhaustion`]. Socket activation's (`take_listen_fds`, `is_listening`) are
//! the same on every Unix and live in `activation.rs`.

#[cfg_attr(target_os = "linux", path = "linux.rs")]
#[cfg_attr(not(target_os = "linux"), path = "portable.rs")]
mod platform;

pub use platform::*;

// Descriptor passing for the live upgrade (`send_with_fds`, `recv_with_fds`,
// `MAX_FDS_PER_MESSAGE`, `Pipe::{fds, from_fds, bytes_held}`).
#[cfg_attr(target_os = "linux", path = "fds_linux.rs")]
#[cfg_attr(not(target_os = "linux"), path = "fds_portable.rs")]
#[allow(dead_code)] // used by upgrade/ from its next commit
mod fds;
#[allow(unused_imports)] // used by upgrade/ from its next commit
pub use fds::*;

// systemd socket activation: the passed listening sockets (`take_listen_fds`).
mod activation;
pub use activation::{is_listening, take_listen_fds};

// The in-kernel relay of issue #16 (exploratory; not used by the sessions yet).
#[cfg(target_os = "linux")]
pub mod sockmap;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The error says this process or machine is out of descriptors, memory or local ports
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM; EADDRNOTAVAIL from a connect: every ephemeral port to
/// that backend is in use or in TIME_WAIT): a shortage of holdfast's own, not a fault of the
/// peer it was dealing with. Callers back off and try again rather than blame a client or a
/// backend.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Counts every delivery of `signal` in `counter`, from inside the signal handler.
///
/// signal-hook's iterator reports a signal once however many times it was delivered before
/// the iterating thread looked, so two SIGTERMs sent back to back (`kill -TERM $pid $pid`)
/// read as one. A counter tells them apart. (Two signals of the same number that arrive while
/// the first is still pending in the kernel are merged there, before any handler runs: no
/// process can count those.)
pub fn count_deliveries(signal: libc::c_int, counter: Arc<AtomicUsize>) -> io::Result<()> {
    let action = move || {
        counter.fetch_add(1, Ordering::SeqCst);
    };
    // SAFETY: the action only increments an atomic integer: no allocation, no lock, nothing
    // that is not async-signal-safe. It captures an `Arc` that the registration keeps alive
    // for as long as the handler can run.
    unsafe { signal_hook::low_level::register(signal, action) }.map(|_| ())
}
