//! Linux: `splice(2)` through a pipe, socket → pipe → socket, with no copy to user space.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

pub const SPLICE_AVAILABLE: bool = true;

/// An accepted TCP socket is cloned from its listener and keeps TCP_NODELAY and the keepalive
/// settings, so they are set once on the listener (checked by a test in listener.rs).
pub const ACCEPT_INHERITS_SOCKET_OPTIONS: bool = true;

/// epoll reports a connecting TCP socket writable only once the handshake is done
/// (`tcp_poll` withholds EPOLLOUT in SYN_SENT unless TCP_FASTOPEN_CONNECT defers the
/// connect, which holdfast never asks for); a failed connect comes with EPOLLERR. So a
/// writable event without error or hang-up means connected, with no SO_ERROR or
/// getpeername call to confirm it.
pub const WRITABLE_MEANS_CONNECTED: bool = true;

/// Turns the C convention (-1 and errno) into an `io::Result`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each call site passes file descriptors it borrows for the duration of the
        // call and pointers to live, correctly sized memory; see the comment at the call.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// A kernel pipe used as the in-flight buffer of one splice pump.
#[derive(Debug)]
pub struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe (`pipe2(O_NONBLOCK | O_CLOEXEC)`).
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [-1 as libc::c_int; 2];
        // pipe2 writes exactly two descriptors into the array it is given.
        syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Asks the kernel to make this pipe hold `bytes` (`fcntl(F_SETPIPE_SZ)`); returns the
    /// capacity it got (a power-of-two number of pages, at least `bytes`). Fails with EPERM
    /// when the size is above `/proc/sys/fs/pipe-max-size` or this user's pipe pages are
    /// over `pipe-user-pages-soft` (for an unprivileged process), ENOMEM when the kernel
    /// cannot allocate the slots, EBUSY when the pipe holds more than the new size.
    pub fn set_capacity(&self, bytes: usize) -> io::Result<usize> {
        let want =
            libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // F_SETPIPE_SZ takes an int by value and touches no memory of ours.
        let got = syscall!(fcntl(self.write.as_raw_fd(), libc::F_SETPIPE_SZ, want))?;
        Ok(usize::try_from(got).unwrap_or(bytes))
    }

    /// The pipe's capacity in bytes (`fcntl(F_GETPIPE_SZ)`).
    #[cfg(test)]
    pub fn capacity(&self) -> io::Result<usize> {
        // F_GETPIPE_SZ takes no argument and touches no memory of ours.
        let got = syscall!(fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ))?;
        Ok(usize::try_from(got).unwrap_or(0))
    }
}

const FLAGS: libc::c_uint = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// Moves up to `len` bytes from the socket `src` into `pipe`.
///
/// As haproxy's raw_sock.c notes, `EAGAIN` from a socket → pipe splice is ambiguous: the socket
/// may be empty or the pipe may be full. Callers here only splice into an empty pipe, so
/// `WouldBlock` always means the socket has nothing to read.
pub fn splice_in(src: &impl AsFd, pipe: &Pipe, len: usize) -> io::Result<usize> {
    // Null offsets: both ends are streams, read and written at their current position.
    let n = syscall!(splice(
        src.as_fd().as_raw_fd(),
        std::ptr::null_mut(),
        pipe.write.as_raw_fd(),
        std::ptr::null_mut(),
        len,
        FLAGS,
    ))?;
    Ok(n as usize)
}

/// Moves up to `len` bytes from `pipe` to the socket `dst`.
pub fn splice_out(pipe: &Pipe, dst: &impl AsFd, len: usize) -> io::Result<usize> {
    let n = syscall!(splice(
        pipe.read.as_raw_fd(),
        std::ptr::null_mut(),
        dst.as_fd().as_raw_fd(),
        std::ptr::null_mut(),
        len,
        FLAGS,
    ))?;
    Ok(n as usize)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket that is about to be bound to a source address
/// with port 0: the port is then chosen at connect time, so one local port can serve many
/// destinations. Load generators and tests that bind clients to 127.0.0.x need this to open
/// thousands of connections without exhausting the ephemeral range.
pub fn bind_address_no_port(socket: &impl AsFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // The option value is a c_int that lives across the call; its size is passed with it.
    syscall!(setsockopt(
        socket.as_fd().as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ))?;
    Ok(())
}

/// `TCP_DEFER_ACCEPT` on a listening socket: a connection is handed to `accept` only once
/// the client has sent its first bytes (or, with none, after about `secs` seconds and a
/// retransmitted SYN-ACK). 0 turns it off.
pub fn set_defer_accept(socket: &impl AsFd, secs: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // The option value is a c_int that lives across the call; its size is passed with it.
    syscall!(setsockopt(
        socket.as_fd().as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        (&value as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    ))?;
    Ok(())
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet, the FIN included
/// (`ioctl(SIOCOUTQ)`: the send sequence minus the first unacknowledged one). After a
/// `shutdown(Write)`, 0 means the peer has received everything, our FIN too.
pub fn unacked_bytes(socket: &impl AsFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SIOCOUTQ (the same request number as TIOCOUTQ) writes one c_int, which lives across
    // the call.
    syscall!(ioctl(
        socket.as_fd().as_raw_fd(),
        libc::TIOCOUTQ,
        &mut n as *mut libc::c_int,
    ))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// ENOSYS (no splice in this kernel or sandbox) and EINVAL (this pair of files cannot be
/// spliced) mean: copy instead. EMFILE/ENFILE from `pipe2` mean: no pipe for now, copy instead.
/// TCP_USER_TIMEOUT: how long sent bytes may stay unacknowledged before the kernel drops
/// the connection.
pub fn set_tcp_user_timeout(socket: &impl AsFd, timeout: std::time::Duration) -> io::Result<()> {
    socket2::SockRef::from(socket).set_tcp_user_timeout(Some(timeout))
}

pub fn is_splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::EMFILE | libc::ENFILE)
    )
}

/// A non-blocking TCP socket of `domain`, made so in the `socket` call itself
/// (`SOCK_NONBLOCK`): one system call.
pub fn nonblocking_tcp_socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    use socket2::{Protocol, Socket, Type};
    Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn tcp_user_timeout_is_set_on_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let timeout = std::time::Duration::from_millis(2500);
        set_tcp_user_timeout(&a, timeout).unwrap();
        let got = socket2::SockRef::from(&a).tcp_user_timeout().unwrap();
        assert_eq!(got, Some(timeout));
    }

    #[test]
    fn a_pipe_grows_to_the_capacity_asked_for() {
        let pipe = Pipe::new().unwrap();
        assert_eq!(pipe.capacity().unwrap(), 64 * 1024, "the default capacity");
        assert_eq!(pipe.set_capacity(256 * 1024).unwrap(), 256 * 1024);
        assert_eq!(pipe.capacity().unwrap(), 256 * 1024);
    }

    #[test]
    fn defer_accept_is_set_on_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_defer_accept(&listener, 3).unwrap();
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, which lives across the
        // call, and the descriptor is borrowed from the listener for the call.
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        // The kernel keeps a number of SYN-ACK retransmissions and reports the seconds they
        // cover, which is at least what was asked.
        assert!(value >= 3, "TCP_DEFER_ACCEPT reads back as {value}");
    }

    #[test]
    fn bytes_cross_a_pipe_between_two_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let c_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(c_listener.local_addr().unwrap()).unwrap();
        let (mut d, _) = c_listener.accept().unwrap();

        a.write_all(b"hello, splice").unwrap();
        let pipe = Pipe::new().unwrap();
        let mut moved = 0;
        while moved < 13 {
            moved += splice_in(&b, &pipe, 65536).unwrap();
        }
        assert_eq!(splice_out(&pipe, &c, 65536).unwrap(), 13);
        let mut got = [0u8; 13];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, splice");

        drop(a);
        assert_eq!(splice_in(&b, &pipe, 65536).unwrap(), 0, "EOF reads as 0");
    }

    #[test]
    fn unacked_bytes_reach_zero_once_the_peer_has_our_fin() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut b, _) = listener.accept().unwrap();
        (&a).write_all(b"bye").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        // Loopback acknowledges at once, but give the ACK a moment to be processed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while unacked_bytes(&a).unwrap() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "FIN never acknowledged"
            );
            std::thread::yield_now();
        }
    }
}
