//! Platforms other than Linux: no live upgrade (descriptor passing is not wired up here).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::platform::Pipe;

pub const MAX_FDS_PER_MESSAGE: usize = 253;

pub fn send_with_fds(_sock: &UnixStream, _data: &[u8], _fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    Err(unsupported())
}

pub fn recv_with_fds(
    _sock: &UnixStream,
    _buf: &mut [u8],
    _fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    Err(unsupported())
}

impl Pipe {
    pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
        match *self {}
    }

    pub fn from_fds(_read: OwnedFd, _write: OwnedFd) -> io::Result<Pipe> {
        Err(unsupported())
    }

    pub fn bytes_held(&self) -> io::Result<usize> {
        match *self {}
    }
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "live upgrade is only available on Linux",
    )
}
