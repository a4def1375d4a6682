//! Platforms without `splice(2)`: the same items as `linux.rs`, all reporting `Unsupported`, so
//! the relay copies through user space.

use std::io;
use std::os::fd::AsFd;

pub const SPLICE_AVAILABLE: bool = false;

/// Not relied on elsewhere: accepted sockets are tuned one by one.
pub const ACCEPT_INHERITS_SOCKET_OPTIONS: bool = false;

/// Not promised by every poller (kqueue, for one, is not documented to): a connect is
/// confirmed with SO_ERROR and the peer address.
pub const WRITABLE_MEANS_CONNECTED: bool = false;

/// Never constructed on this platform.
#[derive(Debug)]
pub enum Pipe {}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        Err(unsupported())
    }

    pub fn set_capacity(&self, _bytes: usize) -> io::Result<usize> {
        match *self {}
    }
}

/// No TCP_DEFER_ACCEPT here: `--defer-accept` has no effect.
pub fn set_defer_accept(_socket: &impl AsFd, _secs: u32) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

pub fn splice_in(_src: &impl AsFd, pipe: &Pipe, _len: usize) -> io::Result<usize> {
    match *pipe {}
}

pub fn splice_out(pipe: &Pipe, _dst: &impl AsFd, _len: usize) -> io::Result<usize> {
    match *pipe {}
}

/// Elsewhere the port of a socket bound to port 0 is chosen at bind time; nothing to set.
pub fn bind_address_no_port(_socket: &impl AsFd) -> io::Result<()> {
    Ok(())
}

/// Not known here: a lingering close then ends once what is pending has been read.
pub fn unacked_bytes(_socket: &impl AsFd) -> io::Result<usize> {
    Err(unsupported())
}

pub fn set_tcp_user_timeout(_socket: &impl AsFd, _timeout: std::time::Duration) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

pub fn is_splice_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "splice is only available on Linux",
    )
}

/// A non-blocking TCP socket of `domain` (`SOCK_NONBLOCK` is not everywhere: a second call).
pub fn nonblocking_tcp_socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    use socket2::{Protocol, Socket, Type};
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
