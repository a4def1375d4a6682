//! An in-kernel relay between two TCP sockets (issue #16, exploratory half): a BPF `sk_skb`
//! verdict program attached to a `BPF_MAP_TYPE_SOCKHASH` redirects every segment that arrives
//! on one socket of a pair to the send side of the other, so the process is never woken for
//! the bytes. Not wired into the session state machine yet; see `docs/sockmap.md`.
//!
//! The program is hand-assembled here (no clang, no BPF toolchain, no file at run time) and
//! loaded with `bpf(2)` through `libc::syscall`. It is twelve instructions:
//!
//! ```text
//! r6 = r1                       ; the __sk_buff
//! call get_socket_cookie        ; r0 = cookie of the socket the bytes arrived on
//! *(u64 *)(r10 - 8) = r0        ; the key, on the stack
//! r1 = r6
//! r2 = map                      ; ld_imm64 with BPF_PSEUDO_MAP_FD
//! r3 = r10 ; r3 += -8           ; &key
//! r4 = 0                        ; flags: 0 = egress (the peer's send queue)
//! call sk_redirect_hash         ; sets the redirect if the key is in the map
//! r0 = SK_PASS                  ; redirected, or (key gone) kept on this socket
//! exit
//! ```
//!
//! The sockhash maps the *cookie of the receiving socket* to its *peer*: a pair (a, b) is two
//! entries, `cookie(a) → b` and `cookie(b) → a`. The cookie is the kernel's own 64-bit id of
//! a socket (`SO_COOKIE` from user space, `bpf_get_socket_cookie` in the program), so there is
//! no byte-order question as there would be with the 4-tuple fields of `__sk_buff`. Returning
//! `SK_PASS` when the lookup failed (half a pair already removed) leaves the bytes on the
//! receiving socket for user space instead of dropping them.
//!
//! Linux only; every `unsafe` block below has its `// SAFETY:` comment.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

// bpf(2) commands, map, program and attach types, from <linux/bpf.h> (uapi: stable numbers).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_ANY: u64 = 0;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
const BPF_SK_SKB_VERDICT: u32 = 38;
const BPF_NOEXIST: u64 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_GET_SOCKET_COOKIE: i32 = 46;
const BPF_FUNC_SK_REDIRECT_HASH: i32 = 72;
const SK_PASS: i32 = 1;
/// `SO_COOKIE` (asm-generic/socket.h; the same on x86 and arm).
const SO_COOKIE: libc::c_int = 57;

/// Entries in the sockhash by default: two per pair.
pub const DEFAULT_MAX_PAIRS: u32 = 32 * 1024;

/// How the verdict program is attached to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// `BPF_SK_SKB_STREAM_VERDICT`: the strparser path (with no parser program: each skb as it
    /// comes), run from the socket's `data_ready`.
    StreamVerdict,
    /// `BPF_SK_SKB_VERDICT` (Linux 5.13+): the verdict without the strparser, reading the
    /// receive queue through `read_skb`.
    Verdict,
}

impl Attach {
    fn attach_type(self) -> u32 {
        match self {
            Attach::StreamVerdict => BPF_SK_SKB_STREAM_VERDICT,
            Attach::Verdict => BPF_SK_SKB_VERDICT,
        }
    }
}

/// One BPF instruction (`struct bpf_insn`): opcode, the dst and src registers in one byte (the
/// kernel's bitfields put dst in the low nibble on little-endian, the high one on big-endian),
/// offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    let regs = if cfg!(target_endian = "little") {
        (src << 4) | (dst & 0x0f)
    } else {
        (dst << 4) | (src & 0x0f)
    };
    Insn {
        code,
        regs,
        off,
        imm,
    }
}

// Opcodes used below (class | op | source).
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW (imm BPF_ADD = 0)
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u8 = 0x25; // BPF_JMP | BPF_JGT | BPF_K

/// The verdict program for a sockhash whose descriptor is `map_fd` (see the module comment).
fn program(map_fd: RawFd) -> [Insn; 12] {
    [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(MOV64_X, 1, 6, 0, 0),
        insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_REDIRECT_HASH),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The backpressure experiment (docs/sockmap.md, "A byte budget"): as [`program`], but first
/// adds the segment's length to the receiving socket's counter in `budget_fd` (a hash map,
/// cookie → u64, reset by user space) and, once the counter is over `budget`, returns
/// `SK_PASS` without a redirect, so the bytes stay on the receiving socket for user space.
/// A socket without a counter is redirected as before.
fn budget_program(map_fd: RawFd, budget_fd: RawFd, budget: i32) -> [Insn; 22] {
    [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, budget_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -8),
        insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, 4, 0), // no counter: redirect (13)
        insn(LDX_W, 1, 6, 0, 0), // skb->len
        insn(ATOMIC_DW, 0, 1, 0, 0),
        insn(LDX_DW, 1, 0, 0, 0),
        insn(JGT_K, 1, 0, 7, budget), // over budget: SK_PASS, no redirect (20)
        insn(MOV64_X, 1, 6, 0, 0),
        insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_SK_REDIRECT_HASH),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

// The parts of `union bpf_attr` each command reads. The kernel accepts an attr shorter than
// its own as long as the missing tail would be zero, so each is exactly what is used.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `bpf(cmd, attr, sizeof attr)`, -1 and errno as an `io::Error`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] prefix of `union bpf_attr`
    // for `cmd`, and its exact size is passed; any pointer inside it (instructions, license,
    // log buffer, key, value) is set by the caller to memory that outlives this call.
    let res = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if res < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

/// A BPF map keyed by a socket cookie (u64), with values of `value_size` bytes; `what` names
/// the step in an error.
fn create_map(map_type: u32, value_size: usize, entries: u32, what: &str) -> io::Result<OwnedFd> {
    let mut create = MapCreateAttr {
        map_type,
        key_size: size_of::<u64>() as u32,
        value_size: value_size as u32,
        max_entries: entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut create)
        .and_then(owned)
        .map_err(|e| context(e, what))
}

/// Takes ownership of a descriptor `bpf(2)` just returned.
fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let raw = RawFd::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned a bad fd"))?;
    // SAFETY: bpf(2) succeeded and returned a new descriptor (maps and programs are created
    // close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The kernel's cookie of a socket (`SO_COOKIE`), its key in the sockhash.
pub fn socket_cookie(sock: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals; the kernel writes at most `len` bytes.
    let res = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// Bytes in a TCP socket's receive queue not yet read (`SIOCINQ`), counted by sequence numbers,
/// so it also sees bytes that a sockhash's hooks hold back from `read` (see docs/sockmap.md).
pub fn unread_bytes(sock: &impl AsFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int into the live local `n`.
    let res = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// Makes the kernel hand a socket's receive queue to the relay now (`SO_RCVLOWAT` set to 1,
/// its default value: `tcp_set_rcvlowat` ends by running the socket's `data_ready`, which for
/// a socket in the sockhash is the verdict hook). Bytes that arrived after user space's last
/// read and before [`SockRelay::insert_pair`] would otherwise wait, hidden, until the next
/// bytes arrive on that socket (docs/sockmap.md); call this on both sockets right after the
/// insertion. Harmless on a socket that is not in a map.
pub fn relay_queued(sock: &impl AsFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: SO_RCVLOWAT reads one int from the live local `one`; its size is passed.
    let res = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &one as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What a TCP socket has carried so far, by sequence numbers, whoever moved the bytes (user
/// space or the in-kernel relay): both counts include a FIN once there was one, and `written`
/// may include the SYN; compare differences, not absolute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamCounts {
    /// `tcpi_bytes_received`: bytes that arrived in order (read or not).
    pub received: u64,
    /// `tcpi_bytes_acked` + `SIOCOUTQ`: bytes put into the send queue so far, sent or not.
    /// Read in that order, so an acknowledgement arriving in between makes it low, never high.
    pub written: u64,
}

/// [`StreamCounts`] of a TCP socket (`TCP_INFO`, then `SIOCOUTQ`).
pub fn stream_counts(sock: &impl AsFd) -> io::Result<StreamCounts> {
    let fd = sock.as_fd().as_raw_fd();
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are live locals; the kernel writes at most `len` bytes.
    let res = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if res == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one int into the live local `outq`.
    let res = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) };
    if res == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(StreamCounts {
        received: info.tcpi_bytes_received,
        written: info.tcpi_bytes_acked + u64::try_from(outq).unwrap_or(0),
    })
}

/// A sockhash with the redirect program attached: sockets inserted as a pair relay to each
/// other in the kernel until removed (or closed, which removes them).
#[derive(Debug)]
pub struct SockRelay {
    map: OwnedFd,
    // Kept open for clarity; the attachment holds its own reference to the program.
    _prog: OwnedFd,
    attach: Attach,
    /// The byte-budget experiment's counters, if this relay has them.
    budget: Option<OwnedFd>,
}

/// The two keys of an inserted pair, to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairHandle {
    a: u64,
    b: u64,
}

impl SockRelay {
    /// A relay with the stream-verdict attachment and room for [`DEFAULT_MAX_PAIRS`].
    pub fn new() -> io::Result<SockRelay> {
        SockRelay::with(Attach::StreamVerdict, DEFAULT_MAX_PAIRS)
    }

    /// A relay attached as `attach`, with room for `max_pairs` pairs. Errors say what was
    /// refused: without CAP_BPF/CAP_NET_ADMIN, `EPERM`; when the verifier rejects the
    /// program, its log.
    pub fn with(attach: Attach, max_pairs: u32) -> io::Result<SockRelay> {
        SockRelay::build(attach, max_pairs, None)
    }

    /// The backpressure experiment: a relay whose program stops redirecting a socket's bytes
    /// once `budget` bytes have arrived on it since its counter was last reset
    /// ([`SockRelay::reset_budget`]); past that they stay on the socket for user space.
    /// Not for use beyond the tests (docs/sockmap.md).
    pub fn with_budget(attach: Attach, max_pairs: u32, budget: u32) -> io::Result<SockRelay> {
        let budget = i32::try_from(budget)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "budget over 2 GiB"))?;
        SockRelay::build(attach, max_pairs, Some(budget))
    }

    fn build(attach: Attach, max_pairs: u32, budget: Option<i32>) -> io::Result<SockRelay> {
        // Two entries a pair, keyed by socket cookie (u64).
        let entries = max_pairs.saturating_mul(2).max(2);
        let map = create_map(
            BPF_MAP_TYPE_SOCKHASH,
            size_of::<u32>(),
            entries,
            "creating the sockhash (bpf BPF_MAP_CREATE)",
        )?;
        let (prog, budget_map) = match budget {
            None => (load(&program(map.as_raw_fd()))?, None),
            Some(limit) => {
                let counters = create_map(
                    BPF_MAP_TYPE_HASH,
                    size_of::<u64>(),
                    entries,
                    "creating the budget map",
                )?;
                let insns = budget_program(map.as_raw_fd(), counters.as_raw_fd(), limit);
                (load(&insns)?, Some(counters))
            }
        };
        let mut attr = ProgAttachAttr {
            target_fd: map.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type: attach.attach_type(),
            attach_flags: 0,
        };
        bpf(BPF_PROG_ATTACH, &mut attr)
            .map_err(|e| context(e, &format!("attaching the program as {attach:?}")))?;
        Ok(SockRelay {
            map,
            _prog: prog,
            attach,
            budget: budget_map,
        })
    }

    pub fn attach(&self) -> Attach {
        self.attach
    }

    /// Relays `a` and `b` to each other from now on. Both must be established TCP sockets.
    /// Bytes already in either's receive queue are not moved by this (see docs/sockmap.md).
    pub fn insert_pair(&self, a: &impl AsFd, b: &impl AsFd) -> io::Result<PairHandle> {
        let handle = PairHandle {
            a: socket_cookie(a)?,
            b: socket_cookie(b)?,
        };
        if self.budget.is_some() {
            self.reset_budget(handle)?;
        }
        self.update(handle.a, b.as_fd().as_raw_fd())?;
        if let Err(e) = self.update(handle.b, a.as_fd().as_raw_fd()) {
            // Best effort: the first entry alone would relay one direction only.
            let _ = self.delete(handle.a);
            return Err(e);
        }
        Ok(handle)
    }

    /// Stops relaying the pair; bytes that arrive afterwards stay on the socket they arrived
    /// on, for user space. An entry already gone (its socket was closed) is not an error.
    pub fn remove_pair(&self, pair: PairHandle) -> io::Result<()> {
        let first = self.delete(pair.a);
        let second = self.delete(pair.b);
        first.and(second)
    }

    /// The budget experiment: sets both sockets' counters back to 0.
    pub fn reset_budget(&self, pair: PairHandle) -> io::Result<()> {
        let Some(counters) = &self.budget else {
            return Ok(());
        };
        for key in [pair.a, pair.b] {
            let zero: u64 = 0;
            let mut attr = MapElemAttr {
                map_fd: counters.as_raw_fd() as u32,
                key: &key as *const u64 as u64,
                value: &zero as *const u64 as u64,
                flags: BPF_ANY,
                ..MapElemAttr::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
                .map_err(|e| context(e, "resetting a budget counter"))?;
        }
        Ok(())
    }

    /// The budget experiment: the counters of (a, b), bytes that arrived on each since the
    /// last reset; `None` without a budget.
    pub fn budget_used(&self, pair: PairHandle) -> io::Result<Option<(u64, u64)>> {
        let Some(counters) = &self.budget else {
            return Ok(None);
        };
        let mut out = [0u64; 2];
        for (key, slot) in [pair.a, pair.b].into_iter().zip(out.iter_mut()) {
            let mut attr = MapElemAttr {
                map_fd: counters.as_raw_fd() as u32,
                key: &key as *const u64 as u64,
                value: slot as *mut u64 as u64,
                ..MapElemAttr::default()
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)
                .map_err(|e| context(e, "reading a budget counter"))?;
        }
        Ok(Some((out[0], out[1])))
    }

    fn update(&self, key: u64, fd: RawFd) -> io::Result<()> {
        let value = fd as u32;
        let mut attr = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            value: &value as *const u32 as u64,
            flags: BPF_NOEXIST,
            ..MapElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
            .map(|_| ())
            .map_err(|e| context(e, "inserting a socket into the sockhash"))
    }

    fn delete(&self, key: u64) -> io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: self.map.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            ..MapElemAttr::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(context(e, "removing a socket from the sockhash")),
        }
    }
}

/// Loads the verdict program; on refusal, loads it again with the verifier's log and puts the
/// log in the error.
fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL"; // sk_redirect_hash is a GPL-only helper
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_SKB,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    let name = b"holdfast_relay";
    attr.prog_name[..name.len()].copy_from_slice(name);
    match bpf(BPF_PROG_LOAD, &mut attr).and_then(owned) {
        Ok(fd) => Ok(fd),
        Err(first) if first.raw_os_error() == Some(libc::EPERM) => {
            Err(context(first, "loading the sk_skb program"))
        }
        Err(first) => {
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let again = bpf(BPF_PROG_LOAD, &mut attr).and_then(owned);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            match again {
                Ok(fd) => Ok(fd),
                Err(_) => Err(io::Error::new(
                    first.kind(),
                    format!(
                        "the kernel refused the sk_skb program: {first}; verifier log:\n{}",
                        text.trim_end()
                    ),
                )),
            }
        }
    }
}

/// `e` with what was being done; a refusal for want of privilege says which are needed.
fn context(e: io::Error, what: &str) -> io::Error {
    if e.raw_os_error() == Some(libc::EPERM) {
        io::Error::new(
            e.kind(),
            format!("{what}: {e} (the in-kernel relay needs CAP_BPF and CAP_NET_ADMIN, or root)"),
        )
    } else {
        io::Error::new(e.kind(), format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_eight_bytes_and_registers_pack_as_the_kernel_reads_them() {
        assert_eq!(size_of::<Insn>(), 8);
        let i = insn(MOV64_X, 6, 1, 0, 0);
        if cfg!(target_endian = "little") {
            assert_eq!(i.regs, 0x16);
        }
    }

    /// A program the verifier refuses (it does not end in `exit`) comes back as an error that
    /// carries the verifier's log. Needs the privilege to load programs; skipped without it.
    #[test]
    fn a_refused_program_reports_the_verifier_log() {
        let bad = [insn(MOV64_K, 0, 0, 0, SK_PASS)];
        match load(&bad) {
            Ok(_) => panic!("the verifier accepted a program without exit"),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("SKIPPED: no privilege to load BPF programs: {e}")
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("verifier log:"), "{text}");
                assert!(text.lines().count() > 1, "the log itself is there: {text}");
            }
        }
    }
}
