//! Listening sockets: one per worker and listen address, bound with `SO_REUSEPORT` so the
//! kernel spreads incoming connections across the workers' accept queues.
//!
//! Port 0 is resolved once: the first worker's socket gets a port from the kernel and every
//! other worker binds that same port, so all of them share one address.

use std::net::SocketAddr;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::error::StartError;

/// Binds every listener. Returns the real addresses (one per `config.listen` entry) and, for
/// each worker, its listeners in the same order.
pub fn bind_all(config: &Config) -> Result<(Vec<SocketAddr>, Vec<Vec<TcpListener>>), StartError> {
    let mut per_worker: Vec<Vec<TcpListener>> = (0..config.workers)
        .map(|_| Vec::with_capacity(config.listen.len()))
        .collect();
    let mut addrs = Vec::with_capacity(config.listen.len());
    for &requested in &config.listen {
        let mut addr = requested;
        for listeners in per_worker.iter_mut() {
            let listener = bind_one(addr, config.backlog).map_err(|source| StartError::Listen {
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

fn bind_one(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
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
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}
