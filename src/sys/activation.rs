//! systemd socket activation (sd_listen_fds(3)): the listening sockets systemd passed this
//! process, as descriptors 3, 4, ... (`LISTEN_FDS` of them) when `LISTEN_PID` is our pid.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Set once the descriptors have been taken: a second call must not own them again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the descriptors systemd passed, each with its number, marked close-on-exec, and
/// unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` so that no child (a live upgrade's
/// new process) believes they are its own. Empty when the variables are absent, name another
/// process, or when called a second time. An error for variables that are present and for
/// us but malformed, or a descriptor that is not open.
///
/// Call it before any thread is started (holdfast's `main` does so first thing): it changes
/// the environment, which another thread reading it at that moment would race with.
pub fn take_listen_fds() -> Result<Vec<(RawFd, OwnedFd)>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    if pid.is_none() && count.is_none() {
        return Ok(Vec::new());
    }
    if only_thread() {
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: this process has one thread (checked just above, where the platform
            // can tell; holdfast's main calls this before it starts any), so nothing reads
            // or writes the environment concurrently.
            unsafe { std::env::remove_var(name) };
        }
    } else {
        log::warn!("socket activation: other threads run; LISTEN_* left in the environment");
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Err("socket activation: LISTEN_PID and LISTEN_FDS must be set together".into());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("socket activation: LISTEN_PID={pid:?} is not a process id"))?;
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("socket activation: LISTEN_FDS={count:?} is not a count"))?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let mut fds = Vec::with_capacity(n as usize);
    for fd in FIRST_FD..FIRST_FD + n {
        // SAFETY: fcntl on any integer is sound; it only reports EBADF for one not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(format!(
                "socket activation: LISTEN_FDS={n} but descriptor {fd} is not open"
            ));
        }
        // SAFETY: as above; FD_CLOEXEC keeps the descriptor out of any program we exec.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(format!(
                "socket activation: descriptor {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the descriptor is open (checked above) and, by systemd's protocol with
        // LISTEN_PID naming this process, was passed to this process to own; TAKEN makes
        // this the only place that takes ownership of it, once.
        fds.push((fd, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(fds)
}

/// Whether this process runs a single thread. Where that cannot be read (no /proc), true:
/// the caller's contract (call it before starting threads) stands alone.
fn only_thread() -> bool {
    match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => tasks.count() == 1,
        Err(_) => true,
    }
}

/// Whether the socket `fd` listens (SO_ACCEPTCONN).
pub fn is_listening(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<bool> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given, and live across the
    // call; getsockopt on a descriptor that is not a socket fails with ENOTSOCK, no more.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value != 0)
}
