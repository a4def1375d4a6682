//! Listening sockets: one per worker and listen address, bound with `SO_REUSEPORT` so the
//! kernel spreads incoming connections across the workers' accept queues.
//!
//! Port 0 is resolved once: the first worker's socket gets a port from the kernel and every
//! other worker binds that same port, so all of them share one address.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use mio::net::TcpListener;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::Config;
use crate::error::StartError;

/// Binds every listener, first using `inherited` listeners (a live upgrade's: the old process's
/// sockets, with their addresses). Those of a listen address are spread over the workers (a
/// worker may get several); a worker that gets none binds its own with `SO_REUSEPORT` on the
/// same address. Inherited listeners on an address this configuration does not list are
/// closed. Returns the real addresses (one per `config.listen` entry) and, for each worker,
/// its listeners in the same order.
pub fn bind_or_inherit(
    config: &Config,
    inherited: Vec<(SocketAddr, OwnedFd)>,
) -> Result<(Vec<SocketAddr>, Vec<Vec<TcpListener>>), StartError> {
    let mut per_worker: Vec<Vec<TcpListener>> = (0..config.workers)
        .map(|_| Vec::with_capacity(config.listen.len()))
        .collect();
    let mut inherited: Vec<Option<(SocketAddr, OwnedFd)>> =
        inherited.into_iter().map(Some).collect();
    let mut addrs = Vec::with_capacity(config.listen.len());
    for &requested in &config.listen {
        let mut addr = requested;
        let mut given: Vec<TcpListener> = Vec::new();
        for slot in inherited.iter_mut() {
            let matches = slot.as_ref().is_some_and(|(at, _)| {
                *at == requested || (requested.port() == 0 && at.ip() == requested.ip())
            });
            if matches && let Some((at, fd)) = slot.take() {
                addr = at;
                given.push(TcpListener::from_std(std::net::TcpListener::from(fd)));
            }
        }
        for (k, listener) in given.into_iter().enumerate() {
            per_worker[k % config.workers].push(listener);
        }
        for listeners in per_worker.iter_mut() {
            if listeners
                .iter()
                .any(|l| l.local_addr().is_ok_and(|a| a == addr))
            {
                continue;
            }
            let listener = bind_one(addr, config.backlog, config.tcp_keepalive)
                .and_then(|l| defer_accept(&l, config.defer_accept).map(|()| l))
                .map_err(|source| StartError::Listen {
                    addr: requested,
                    source,
                })?;
            if addr.port() == 0 {
                addr = listener.local_addr().map_err(|source| StartError::Listen {
                    addr: requested,
                    source,
                })?;
            }
            listeners.push(listener);
        }
        addrs.push(addr);
    }
    Ok((addrs, per_worker))
}

fn bind_one(
    addr: SocketAddr,
    backlog: i32,
    keepalive: Option<Duration>,
) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]:443` should not also claim the IPv4 port; users list `0.0.0.0:443` for that.
        socket.set_only_v6(true)?;
    }
    // SO_REUSEADDR lets a restarted holdfast bind while old connections sit in TIME_WAIT.
    // SO_REUSEPORT lets every worker (and a second holdfast during an upgrade) bind the same
    // port. Neither lets us steal a port from a process that did not opt in: binding a port
    // held by such a process still fails with EADDRINUSE.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Set once here rather than on every accepted socket: on Linux an accepted socket is a
    // clone of its listener and inherits them (see sys::ACCEPT_INHERITS_SOCKET_OPTIONS).
    tune_socket(SockRef::from(&socket), keepalive);
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// `--defer-accept`: TCP_DEFER_ACCEPT in whole seconds, rounded up. Where the platform has
/// none the flag is ignored, with a warning.
pub(crate) fn defer_accept(
    listener: &impl std::os::fd::AsFd,
    defer: Option<Duration>,
) -> std::io::Result<()> {
    let Some(d) = defer else {
        return Ok(());
    };
    let secs = u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(u32::MAX);
    match crate::sys::set_defer_accept(listener, secs) {
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            log::warn!("--defer-accept is not supported on this platform; ignored");
            Ok(())
        }
        other => other,
    }
}

/// TCP_NODELAY (a proxy must not add Nagle delay to small messages) and keepalive (so a peer
/// that vanished is noticed on an otherwise idle long-lived connection).
pub(crate) fn tune_socket(sock: SockRef<'_>, keepalive: Option<Duration>) {
    if let Err(e) = sock.set_tcp_nodelay(true) {
        log::debug!("cannot set TCP_NODELAY: {e}");
    }
    if let Some(idle) = keepalive {
        set_keepalive(sock, idle);
    }
}

/// SO_KEEPALIVE, TCP_KEEPIDLE `idle` and TCP_KEEPINTVL (`idle` within 1..=10 s): three
/// `setsockopt` calls.
pub(crate) fn set_keepalive(sock: SockRef<'_>, idle: Duration) {
    let interval = idle.clamp(Duration::from_secs(1), Duration::from_secs(10));
    let ka = TcpKeepalive::new().with_time(idle).with_interval(interval);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        log::debug!("cannot set TCP keepalive: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker skips tuning accepted sockets where the platform says they inherit the
    /// listener's options; this checks the platform really does.
    #[test]
    fn accepted_sockets_carry_the_listeners_options() {
        let keepalive = Duration::from_secs(37);
        let listener = bind_one("127.0.0.1:0".parse().unwrap(), 16, Some(keepalive)).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("accept: {e}"),
            }
        };
        let sock = SockRef::from(&accepted);
        if crate::sys::ACCEPT_INHERITS_SOCKET_OPTIONS {
            assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY inherited");
            assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE inherited");
            assert_eq!(
                sock.tcp_keepalive_time().unwrap(),
                keepalive,
                "TCP_KEEPIDLE inherited"
            );
        }
    }
}
