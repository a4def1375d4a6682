//! Linux: passing file descriptors between processes over a UNIX stream socket
//! (`sendmsg`/`recvmsg` with `SCM_RIGHTS`), for the live upgrade.
//!
//! On a stream socket the descriptors travel attached to the first byte of the data sent with
//! them, and one `recvmsg` never returns the descriptors of two `sendmsg` calls, so a reader
//! that queues what arrives, in order, hands every descriptor to the message it came with.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::platform::Pipe;

/// At most this many descriptors per message (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Room for the control message of `MAX_FDS_PER_MESSAGE` descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; 1100]);

fn control_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` with `fds` attached to its first byte. Blocks until all of `data` is written
/// (on a blocking socket). `fds` stay open here: the receiver gets duplicates.
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MESSAGE} descriptors per message"),
        ));
    }
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte to travel with",
        ));
    }
    let mut control = ControlBuf([0; 1100]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control_space(fds.len()) as _;
        // SAFETY: msg_control points at `control`, which outlives `msg` and is large enough
        // (checked: control_space(253) < 1100) and aligned for cmsghdr; CMSG_FIRSTHDR is
        // non-null because msg_controllen covers one header; CMSG_DATA has room for
        // `fds.len()` descriptors by construction of msg_controllen.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    let sent = loop {
        // SAFETY: `msg` points at live iovec/control memory for the duration of the call and
        // the socket is borrowed.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // The descriptors went with the first byte; the rest is plain data.
    let mut rest = &data[sent..];
    while !rest.is_empty() {
        match io::Write::write(&mut &*sock, rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes; descriptors that came with them are appended to `fds`
/// (close-on-exec, owned). `Ok(0)` is EOF. A control message cut short by the kernel (more
/// descriptors than fit, which a well-behaved peer never sends) is an error; the descriptors
/// that did arrive are closed.
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut control = ControlBuf([0; 1100]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control_space(MAX_FDS_PER_MESSAGE) as _;
    let n = loop {
        // SAFETY: `msg` points at `buf` and `control`, both live and writable for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut received = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed cmsghdrs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk within it. Each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors that are now open in this process
    // and owned by nobody else, so wrapping each in an OwnedFd is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    received.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut short in transit",
        ));
    }
    fds.extend(received);
    Ok(n)
}

impl Pipe {
    /// The two ends, read then write, to send to another process.
    pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd;
        [self.read.as_fd(), self.write.as_fd()]
    }

    /// A pipe from its two ends as received from another process (made non-blocking again:
    /// the flag belongs to the open file, which both processes share, so it is kept, but a
    /// sender may have been anything).
    pub fn from_fds(read: OwnedFd, write: OwnedFd) -> io::Result<Pipe> {
        for fd in [&read, &write] {
            set_nonblocking(fd.as_raw_fd())?;
        }
        Ok(Pipe { read, write })
    }

    /// Bytes in the pipe now (`FIONREAD`).
    pub fn bytes_held(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, which lives across the call.
        let r = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_and_a_socket_are_usable_on_the_other_side() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let pipe = Pipe::new().unwrap();
        // Bytes already in the pipe travel inside it.
        let n = unsafe_free_write(&pipe, b"in flight");
        assert_eq!(n, 9);
        let [r, w] = pipe.fds();
        send_with_fds(&a, b"hello", &[server.as_fd(), r, w]).unwrap();
        drop((server, pipe));

        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 3);
        let mut fds = fds.into_iter();
        let mut server = TcpStream::from(fds.next().unwrap());
        let pipe = Pipe::from_fds(fds.next().unwrap(), fds.next().unwrap()).unwrap();
        assert_eq!(pipe.bytes_held().unwrap(), 9);
        // The pipe's bytes go out on the received socket.
        assert_eq!(
            super::super::platform::splice_out(&pipe, &server, 64).unwrap(),
            9
        );
        let mut got = [0u8; 9];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"in flight");
        client.write_all(b"back").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"back");
    }

    #[test]
    fn descriptors_are_close_on_exec_and_stay_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let p1 = Pipe::new().unwrap();
        let p2 = Pipe::new().unwrap();
        send_with_fds(&a, b"one", &p1.fds()).unwrap();
        send_with_fds(&a, b"two", &p2.fds()[..1]).unwrap();
        send_with_fds(&a, b"three", &[]).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let mut got = Vec::new();
        let mut counts = Vec::new();
        while got.len() < 11 {
            let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
            got.extend_from_slice(&buf[..n]);
            counts.push((got.len(), fds.len()));
        }
        assert_eq!(got, b"onetwothree");
        assert_eq!(fds.len(), 3);
        // One recvmsg never carries the descriptors of two messages.
        assert_eq!(counts[0], (3, 2));
        for fd in &fds {
            // SAFETY: F_GETFD on a descriptor owned by `fds`; no memory is passed.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }

    #[test]
    fn too_many_descriptors_is_an_error_and_253_is_fine() {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<Pipe> = (0..127).map(|_| Pipe::new().unwrap()).collect();
        let all: Vec<BorrowedFd<'_>> = pipes.iter().flat_map(|p| p.fds()).collect();
        assert_eq!(all.len(), 254);
        let e = send_with_fds(&a, b"x", &all).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        send_with_fds(&a, b"x", &all[..253]).unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 1);
        assert_eq!(fds.len(), 253);
        drop(a);
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), 0, "EOF");
    }

    fn unsafe_free_write(pipe: &Pipe, data: &[u8]) -> usize {
        let mut w = std::fs::File::from(pipe.write.try_clone().unwrap());
        w.write(data).unwrap()
    }
}
