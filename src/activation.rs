//! systemd socket activation: holdfast serves on listening sockets systemd passed it
//! (`LISTEN_FDS`, `LISTEN_PID`; sd_listen_fds(3)), each matched to the `--listen` address it
//! is bound to.
//!
//! Each passed socket is shared by every worker: each gets its own duplicate of the
//! descriptor (one socket, one accept queue) and registers it with its own poller. A
//! connection wakes the workers waiting on it; one accepts it and the others find nothing
//! (`WouldBlock`) and go back to sleep. That is correct without `EPOLLEXCLUSIVE`, and needs no
//! `SO_REUSEPORT` on the passed socket (systemd's `ReusePort=` may stay off). A `--listen`
//! address no socket was passed for is bound as usual; a passed socket that matches no
//! `--listen` is an error.

use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};

use socket2::{SockRef, Type};

use crate::config::{Config, ConfigError};
use crate::listener::tune_socket;

/// A listening socket passed by systemd.
#[derive(Debug)]
pub struct ActivatedListener {
    /// The descriptor number it was passed as (3, 4, ...), for messages.
    pub fd: RawFd,
    /// The address it is bound to.
    pub addr: SocketAddr,
    socket: OwnedFd,
}

/// The listening sockets systemd passed this process, if any (empty when `LISTEN_PID` is
/// unset or names another process), and `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`
/// unset so that children do not inherit them. Call it before starting any thread (it
/// changes the environment); holdfast's binary does so first thing.
///
/// An error for malformed variables, or a descriptor that is not a listening TCP socket.
pub fn listen_fds_from_systemd() -> Result<Vec<ActivatedListener>, ConfigError> {
    let invalid = ConfigError::Invalid;
    let fds = crate::sys::take_listen_fds().map_err(invalid)?;
    let mut listeners = Vec::with_capacity(fds.len());
    for (fd, socket) in fds {
        let not_tcp = || {
            ConfigError::Invalid(format!(
                "socket activation: descriptor {fd} is not a listening TCP socket"
            ))
        };
        let sock = SockRef::from(&socket);
        if !matches!(sock.r#type(), Ok(t) if t == Type::STREAM)
            || !crate::sys::is_listening(&socket).unwrap_or(false)
        {
            return Err(not_tcp());
        }
        let addr = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(not_tcp)?;
        listeners.push(ActivatedListener { fd, addr, socket });
    }
    Ok(listeners)
}

/// Each passed socket matched to the `--listen` address it is bound to, made non-blocking,
/// tuned as holdfast's own listeners are, and duplicated once per worker: the inherited
/// listeners for `listener::bind_or_inherit`.
pub(crate) fn assign(
    config: &Config,
    passed: Vec<ActivatedListener>,
) -> Result<Vec<(SocketAddr, OwnedFd)>, ConfigError> {
    let mut seen: Vec<SocketAddr> = Vec::with_capacity(passed.len());
    let mut inherited = Vec::with_capacity(passed.len() * config.workers);
    for listener in passed {
        let ActivatedListener { fd, addr, socket } = listener;
        if !config.listen.contains(&addr) {
            return Err(ConfigError::Invalid(format!(
                "socket activation: descriptor {fd} listens on {addr}, which no --listen names \
                 (--listen {addr} to serve it)"
            )));
        }
        if seen.contains(&addr) {
            return Err(ConfigError::Invalid(format!(
                "socket activation: descriptor {fd} listens on {addr}, as an earlier one does"
            )));
        }
        seen.push(addr);
        log::info!("socket activation: serving {addr} from descriptor {fd}");
        let io_error = |e: std::io::Error| {
            ConfigError::Invalid(format!("socket activation: descriptor {fd} ({addr}): {e}"))
        };
        let sock = SockRef::from(&socket);
        sock.set_nonblocking(true).map_err(io_error)?;
        tune_socket(sock, config.tcp_keepalive);
        crate::listener::defer_accept(&socket, config.defer_accept).map_err(io_error)?;
        for _ in 1..config.workers {
            inherited.push((addr, socket.try_clone().map_err(io_error)?));
        }
        inherited.push((addr, socket));
    }
    Ok(inherited)
}
