//! Moving bytes: one [`Pump`] per direction of a session, and the worker's [`Pools`].
//!
//! A pump reads from its source socket and writes to its destination socket, either
//!
//! - **copying** through the worker's one scratch buffer: read, then write at once; only when
//!   the destination takes part of it does the pump borrow a buffer from the pool to hold the
//!   rest until the destination is writable again; or
//! - **splicing** (Linux): `splice(2)` moves the bytes socket → pipe → socket inside the
//!   kernel. The pump takes a pipe from the pool for the read and gives it back as soon as the
//!   pipe is empty again. When no pipe can be made (out of descriptors), that burst (the rest
//!   of this run of the pump) is copied, and the next one tries a pipe again.
//!
//! Either way the pump owns memory only while a write is incomplete: an idle connection holds
//! no pipe and no buffer, which is what keeps 8000 idle WebSockets cheap.
//!
//! A direction that proves to be a bulk stream ([`GROW_AFTER`] splices in a row that each
//! filled at least half a default pipe) splices through *grown* pipes of [`GROWN_PIPE_SIZE`]
//! from then on: four times the bytes per splice call and per wake-up. Grown pipes are pooled
//! apart from the default ones (so a small session never holds one) and their capacity, pooled
//! or in use, is charged to one budget shared by every worker (`--pipe-memory`, the
//! `pipe_memory` counter). When the budget is spent, or the kernel refuses to grow a pipe
//! (EPERM above `pipe-user-pages-soft`, ENOMEM), the stream simply splices through 64 KiB
//! pipes as before.
//!
//! Backpressure falls out of the rule "never read while bytes are in flight": a pump whose
//! destination is full stops reading its source, the source's kernel buffer fills, and TCP
//! flow control slows the sender. Memory per session is bounded by one buffer or one pipe per
//! direction whatever the peers do.
//!
//! Readiness is edge-triggered, so a pump runs until its source or destination says
//! `WouldBlock` (and records that in the [`Readiness`] flags), or until it has moved its
//! budget for this turn, in which case it says [`Outcome::Yield`] and the worker runs it again
//! on the next turn without waiting for an event that would never come.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mio::net::TcpStream;

use crate::config::RelayMode;
use crate::stats::Counters;
use crate::sys::{self, Pipe, is_resource_exhaustion};

/// Size of the worker's scratch buffer and of a pooled partial-write buffer.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Most bytes one splice call asks for: the default capacity of a Linux pipe.
pub const PIPE_SIZE: usize = 64 * 1024;
/// Bytes one pump may move per turn before yielding to other sessions (fairness): one grown
/// pipe's worth at most, since a splice is not cut short to fit it. A bulk stream sharing a
/// worker with small sessions delays each of their messages by about one turn of it (at
/// 512 KiB a turn, a 64 B round trip beside an echoed bulk stream took milliseconds).
pub const TURN_BUDGET: usize = 128 * 1024;
/// Free pipes a worker keeps for reuse; more are closed.
pub const MAX_POOLED_PIPES: usize = 16;
/// Capacity of the pipe of a proven bulk stream (`F_SETPIPE_SZ`).
pub const GROWN_PIPE_SIZE: usize = 256 * 1024;
/// Splices in a row that each filled at least half a default pipe, after which a direction
/// is a proven bulk stream and gets grown pipes.
pub const GROW_AFTER: u8 = 4;
/// Free grown pipes a worker keeps for reuse; more are closed (giving their budget back).
pub const MAX_POOLED_GROWN_PIPES: usize = 4;
/// Default of `--pipe-memory`: 16 MiB, 64 grown pipes. A quarter of Linux's default
/// `pipe-user-pages-soft` (16384 pages, 64 MiB per user), the line above which an
/// unprivileged user's new pipes get 2 pages instead of 16 and cannot grow: the other three
/// quarters stay for the default pipes of busy sessions (768 at once) and the user's other
/// processes.
pub const DEFAULT_PIPE_MEMORY: usize = 16 * 1024 * 1024;
/// Free buffers a worker keeps for reuse; more are freed.
pub const MAX_POOLED_BUFFERS: usize = 16;
/// In `auto` mode, a copy read at least this large marks the direction as a bulk stream and
/// switches it to splice; [`AUTO_SMALL_SPLICES`] splices in a row of less than a quarter of it
/// switch back.
pub const AUTO_SPLICE_THRESHOLD: usize = 16 * 1024;
/// In `auto` mode, this many splices in a row of less than a quarter of the threshold switch a
/// direction back to copying. One is not enough: a stream that the proxy keeps up with often
/// finds only a few KB waiting, and with one a bulk echo stream flipped to copying and back
/// 25–75 times a second (only ~0.1% of its bytes were copied, but each flip costs a copy
/// read). With four it never flipped; in an interleaved A/B of six 3-second runs the median
/// went from 7.5 to 7.8 Gbit/s with ~7% less CPU per GB, within this machine's noise.
pub const AUTO_SMALL_SPLICES: u8 = 4;

/// What is known about one socket's readiness, under edge-triggered notification: set by an
/// event, cleared when a call returns `WouldBlock` (or a short read shows the socket drained).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// An event reported the peer's FIN (EPOLLRDHUP) or an error. Their wakeup may already
    /// have been spent on the event that also reported the last data, so from then on reads
    /// continue until they say EOF or fail: a short read proves nothing.
    pub hung_up: bool,
    /// An event reported an error (EPOLLERR: a reset, most often) that no read or write has
    /// surfaced yet. Usually the next call on the socket fails and the pump reports it; but a
    /// socket whose stream has ended (EOF read) and to which nothing is waiting to be written
    /// sees no further call, so the session checks `SO_ERROR` once (see `Session::relay`).
    pub error: bool,
}

/// The worker's shared relay resources.
pub struct Pools {
    scratch: Box<[u8]>,
    pipes: Vec<Pipe>,
    /// Free pipes of [`GROWN_PIPE_SIZE`], their capacity still charged to the budget.
    grown: Vec<Pipe>,
    /// The budget for grown pipes, all workers together (`--pipe-memory`).
    pipe_memory: u64,
    /// The kernel refused to grow a pipe at least once (logged once).
    grow_refused: bool,
    buffers: Vec<Box<[u8]>>,
    /// Cleared the first time the kernel says splice cannot be used; then everyone copies.
    splice_works: bool,
    counters: Arc<Counters>,
}

impl Pools {
    pub fn new(counters: Arc<Counters>) -> Pools {
        Pools {
            scratch: vec![0; BUFFER_SIZE].into_boxed_slice(),
            pipes: Vec::new(),
            grown: Vec::new(),
            pipe_memory: DEFAULT_PIPE_MEMORY as u64,
            grow_refused: false,
            buffers: Vec::new(),
            splice_works: sys::SPLICE_AVAILABLE,
            counters,
        }
    }

    /// The budget for grown pipes, shared through the counters by every worker's pools
    /// (`--pipe-memory`; 0: pipes never grow).
    pub fn with_pipe_memory(mut self, bytes: usize) -> Pools {
        self.pipe_memory = bytes as u64;
        self
    }

    /// The kernel says splice cannot be used here at all (ENOSYS, EINVAL): everyone copies
    /// from now on.
    fn splice_unusable(&mut self, e: &io::Error) {
        if self.splice_works {
            log::warn!("splice is not usable here ({e}); copying instead");
            self.splice_works = false;
        }
    }

    /// A pipe for one read: a grown one if `grow` and one is pooled or the budget and the
    /// kernel allow it, else a default one. Says which it is, and whether the kernel refused
    /// to grow one (the caller then stops asking).
    fn take_pipe(&mut self, grow: bool) -> io::Result<(Pipe, PipeKind, bool)> {
        if grow {
            if let Some(pipe) = self.grown.pop() {
                Counters::incr(&self.counters.pipes_in_use);
                return Ok((pipe, PipeKind::Grown, false));
            }
            let size = GROWN_PIPE_SIZE as u64;
            if reserve(&self.counters.pipe_memory, self.pipe_memory, size) {
                let pipe = match Pipe::new() {
                    Ok(pipe) => pipe,
                    Err(e) => {
                        release(&self.counters.pipe_memory, size);
                        return Err(e);
                    }
                };
                match pipe.set_capacity(GROWN_PIPE_SIZE) {
                    Ok(got) if got == GROWN_PIPE_SIZE => {
                        Counters::incr(&self.counters.pipes_in_use);
                        return Ok((pipe, PipeKind::Grown, false));
                    }
                    result => {
                        release(&self.counters.pipe_memory, size);
                        if !self.grow_refused {
                            self.grow_refused = true;
                            let why = match &result {
                                Ok(got) => format!("it got {got} bytes"),
                                Err(e) => e.to_string(),
                            };
                            log::info!(
                                "cannot grow a pipe to {GROWN_PIPE_SIZE} bytes ({why}); bulk \
                                 streams splice through default pipes"
                            );
                        }
                        // A pipe that did not grow to the size asked for (a kernel rounding
                        // differently) is closed: a default pipe's pool must hold only
                        // default pipes.
                        let pipe = match result {
                            Ok(_) => Pipe::new()?,
                            Err(_) => pipe,
                        };
                        Counters::incr(&self.counters.pipes_in_use);
                        return Ok((pipe, PipeKind::Default, true));
                    }
                }
            }
        }
        let pipe = match self.pipes.pop() {
            Some(p) => p,
            None => Pipe::new()?,
        };
        Counters::incr(&self.counters.pipes_in_use);
        Ok((pipe, PipeKind::Default, false))
    }

    /// Returns an *empty* pipe for reuse.
    fn put_pipe(&mut self, pipe: Pipe, kind: PipeKind) {
        Counters::decr(&self.counters.pipes_in_use);
        match kind {
            PipeKind::Default if self.pipes.len() < MAX_POOLED_PIPES => self.pipes.push(pipe),
            PipeKind::Grown if self.grown.len() < MAX_POOLED_GROWN_PIPES => self.grown.push(pipe),
            _ => self.close_pipe(pipe, kind),
        }
    }

    /// Closes a pipe that still holds bytes: they can never be delivered, and a pipe with
    /// stale bytes must never be reused.
    fn discard_pipe(&mut self, pipe: Pipe, kind: PipeKind) {
        Counters::decr(&self.counters.pipes_in_use);
        self.close_pipe(pipe, kind);
    }

    /// Closes a pipe, giving a grown one's capacity back to the budget.
    fn close_pipe(&mut self, pipe: Pipe, kind: PipeKind) {
        drop(pipe);
        if kind == PipeKind::Grown {
            release(&self.counters.pipe_memory, GROWN_PIPE_SIZE as u64);
        }
    }

    fn take_buffer(&mut self) -> Box<[u8]> {
        Counters::incr(&self.counters.buffers_in_use);
        self.buffers
            .pop()
            .unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
    }

    fn put_buffer(&mut self, buf: Box<[u8]>) {
        Counters::decr(&self.counters.buffers_in_use);
        if self.buffers.len() < MAX_POOLED_BUFFERS {
            self.buffers.push(buf);
        }
    }
}

impl Drop for Pools {
    /// The worker is gone: its pooled grown pipes give their budget back (another worker, or
    /// a balancer started later in this process, may use it).
    fn drop(&mut self) {
        for pipe in std::mem::take(&mut self.grown) {
            self.close_pipe(pipe, PipeKind::Grown);
        }
    }
}

/// Takes `size` bytes from the budget `limit` of which `used` are taken; false, taking
/// nothing, if they do not fit. Lock-free: every worker's pools share `used`.
pub fn reserve(used: &AtomicU64, limit: u64, size: u64) -> bool {
    used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        now.checked_add(size).filter(|after| *after <= limit)
    })
    .is_ok()
}

/// Gives back `size` bytes taken with [`reserve`].
pub fn release(used: &AtomicU64, size: u64) {
    let _ = used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        Some(now.saturating_sub(size))
    });
}

/// Which pool a pipe belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PipeKind {
    /// The kernel's default capacity, [`PIPE_SIZE`].
    Default,
    /// Grown to [`GROWN_PIPE_SIZE`], charged to the budget.
    Grown,
    /// Handed over by another process (a live upgrade), of a capacity not known to be the
    /// default: used until empty, then closed, never pooled.
    Foreign,
}

/// Bytes read from the source and not yet written to the destination.
enum InFlight {
    Empty,
    Pipe {
        pipe: Pipe,
        len: usize,
        kind: PipeKind,
    },
    Buffer {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

/// Where a pump is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Relaying.
    Open,
    /// The source said EOF; what is in flight is still to be written, then the destination's
    /// write side is shut down (half-close).
    Flushing,
    /// The destination's write side is shut down; this direction is finished.
    Done,
}

/// How a pump's turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Waiting for an event (source empty or destination full).
    Blocked,
    /// Budget used up with work left: run again next turn.
    Yield,
    /// This direction is finished (EOF forwarded as a half-close).
    Done,
    /// Reading the source failed (typically a reset).
    SourceFailed,
    /// Writing the destination failed (typically a reset or broken pipe).
    DestinationFailed,
}

/// How a pump moves bytes right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Copy,
    Splice,
}

/// Whether a direction has proved to be a bulk stream (see [`GROW_AFTER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Growth {
    /// This many splices in a row have filled at least half a default pipe.
    Unproven(u8),
    /// A bulk stream: it asks for grown pipes.
    Proven,
    /// The kernel refused to grow a pipe for it: default pipes for the rest of its life.
    Refused,
}

/// One direction of a session.
pub struct Pump {
    method: Method,
    /// `auto` mode: the method follows the size of the reads.
    adaptive: bool,
    /// `auto` mode, splicing: small splices in a row so far (see [`AUTO_SMALL_SPLICES`]).
    small_splices: u8,
    /// Splicing, but this burst found no descriptor free for a pipe: it copies until the
    /// end of this run, and the next run tries a pipe again.
    pipe_short: bool,
    growth: Growth,
    stage: Stage,
    in_flight: InFlight,
}

impl Pump {
    pub fn new(mode: RelayMode) -> Pump {
        let (method, adaptive) = match mode {
            RelayMode::Copy => (Method::Copy, false),
            RelayMode::Splice => (Method::Splice, false),
            RelayMode::Auto => (Method::Copy, true),
        };
        Pump {
            method,
            adaptive,
            small_splices: 0,
            pipe_short: false,
            growth: Growth::Unproven(0),
            stage: Stage::Open,
            in_flight: InFlight::Empty,
        }
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Moves bytes from `src` to `dst` until one of them would block, the source ends, the
    /// budget is spent, or a socket fails. Returns how the turn ended and the bytes written.
    /// `other_done` says the opposite direction has finished, so this one's end closes the
    /// session.
    pub fn run(
        &mut self,
        src: &TcpStream,
        src_ready: &mut Readiness,
        dst: &TcpStream,
        dst_ready: &mut Readiness,
        pools: &mut Pools,
        other_done: bool,
    ) -> (Outcome, usize) {
        let mut moved = 0;
        // A pipe shortage lasts one burst: descriptors may have been freed since.
        self.pipe_short = false;
        let outcome = loop {
            // 1. Anything in flight goes out first: never read while the destination is behind.
            if !matches!(self.in_flight, InFlight::Empty) {
                if !dst_ready.writable {
                    break Outcome::Blocked;
                }
                match self.flush(dst, pools) {
                    Ok(n) => {
                        moved += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst_ready.writable = false;
                        break Outcome::Blocked;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break Outcome::DestinationFailed,
                }
            }
            debug_assert!(matches!(self.in_flight, InFlight::Empty));

            // 2. Nothing in flight: forward EOF, or read more.
            match self.stage {
                Stage::Done => break Outcome::Done,
                Stage::Flushing => {
                    // Forward the EOF. When the other direction is done too, the session is
                    // about to close the sockets, and close() sends the FIN itself (the
                    // destination's receive queue is empty: it said EOF), so the shutdown
                    // call is saved. The peer may already be gone (ENOTCONN); the other
                    // direction finds out on its own, so there is nothing to report here.
                    if !other_done {
                        let _ = dst.shutdown(Shutdown::Write);
                    }
                    self.stage = Stage::Done;
                    break Outcome::Done;
                }
                Stage::Open => {}
            }
            if moved >= TURN_BUDGET {
                break if src_ready.readable {
                    Outcome::Yield
                } else {
                    Outcome::Blocked
                };
            }
            if !src_ready.readable {
                break Outcome::Blocked;
            }
            let read = match self.method {
                Method::Splice if pools.splice_works && !self.pipe_short => {
                    self.splice_in(src, pools)
                }
                _ => self.copy_in(src, src_ready, dst, dst_ready, pools),
            };
            match read {
                Ok(Step::Eof) => self.stage = Stage::Flushing,
                Ok(Step::Moved(n)) => moved += n,
                Ok(Step::Again) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src_ready.readable = false;
                    break Outcome::Blocked;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(ReadError::Destination) => break Outcome::DestinationFailed,
                Err(_) => break Outcome::SourceFailed,
            }
        };
        (outcome, moved)
    }

    /// Writes what is in flight; returns the bytes written (the caller loops until empty).
    fn flush(&mut self, dst: &TcpStream, pools: &mut Pools) -> io::Result<usize> {
        match &mut self.in_flight {
            InFlight::Empty => Ok(0),
            InFlight::Pipe { pipe, len, .. } => {
                let n = sys::splice_out(pipe, dst, *len)?;
                *len -= n;
                if *len == 0
                    && let InFlight::Pipe { pipe, kind, .. } =
                        std::mem::replace(&mut self.in_flight, InFlight::Empty)
                {
                    pools.put_pipe(pipe, kind);
                }
                Ok(n)
            }
            InFlight::Buffer { buf, start, end } => {
                let n = (&*dst).write(&buf[*start..*end])?;
                *start += n;
                if start == end
                    && let InFlight::Buffer { buf, .. } =
                        std::mem::replace(&mut self.in_flight, InFlight::Empty)
                {
                    pools.put_buffer(buf);
                }
                Ok(n)
            }
        }
    }

    /// Splices from the socket into a pipe from the pool. The bytes are written out by the
    /// next `flush`.
    fn splice_in(&mut self, src: &TcpStream, pools: &mut Pools) -> Result<Step, ReadError> {
        let (pipe, kind, refused) = match pools.take_pipe(self.growth == Growth::Proven) {
            Ok(p) => p,
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of descriptors (or memory) for a pipe: this burst copies instead, and
                // the pump keeps splicing as its method, so the next burst tries again.
                // Switching the method for good made one EMFILE cost the session splice for
                // the rest of its life.
                self.pipe_short = true;
                return Ok(Step::Again);
            }
            Err(e) if sys::is_splice_unsupported(&e) => {
                pools.splice_unusable(&e);
                return Ok(Step::Again);
            }
            Err(e) => return Err(ReadError::Source(e)),
        };
        if refused {
            self.growth = Growth::Refused;
        }
        // Up to the pipe's capacity: a grown pipe takes four default pipes' worth per call.
        let capacity = match kind {
            PipeKind::Grown => GROWN_PIPE_SIZE,
            PipeKind::Default | PipeKind::Foreign => PIPE_SIZE,
        };
        match sys::splice_in(src, &pipe, capacity) {
            Ok(0) => {
                pools.put_pipe(pipe, kind);
                Ok(Step::Eof)
            }
            Ok(n) => {
                if let Growth::Unproven(fills) = self.growth {
                    self.growth = if n < PIPE_SIZE / 2 {
                        Growth::Unproven(0)
                    } else if fills + 1 >= GROW_AFTER {
                        Growth::Proven
                    } else {
                        Growth::Unproven(fills + 1)
                    };
                }
                if self.adaptive {
                    if n >= AUTO_SPLICE_THRESHOLD / 4 {
                        self.small_splices = 0;
                    } else {
                        self.small_splices += 1;
                        if self.small_splices >= AUTO_SMALL_SPLICES {
                            self.small_splices = 0;
                            self.method = Method::Copy;
                        }
                    }
                }
                self.in_flight = InFlight::Pipe { pipe, len: n, kind };
                Ok(Step::Moved(0))
            }
            Err(e) => {
                pools.put_pipe(pipe, kind);
                if is_resource_exhaustion(&e) {
                    // A shortage, not a property of the kernel: copy this burst only.
                    self.pipe_short = true;
                    Ok(Step::Again)
                } else if sys::is_splice_unsupported(&e) {
                    pools.splice_unusable(&e);
                    Ok(Step::Again)
                } else {
                    Err(ReadError::Source(e))
                }
            }
        }
    }

    /// Reads into the scratch buffer and writes straight on; keeps a pooled buffer only for
    /// what the destination did not take.
    fn copy_in(
        &mut self,
        src: &TcpStream,
        src_ready: &mut Readiness,
        dst: &TcpStream,
        dst_ready: &mut Readiness,
        pools: &mut Pools,
    ) -> Result<Step, ReadError> {
        let n = (&*src)
            .read(&mut pools.scratch)
            .map_err(ReadError::Source)?;
        if n == 0 {
            return Ok(Step::Eof);
        }
        if n < pools.scratch.len() && !src_ready.hung_up {
            // A TCP read returns less than asked only when it emptied the receive queue, and
            // under edge-triggered readiness any byte (or FIN) arriving after that raises a
            // new event. So the socket is drained: skip the read that would only say EAGAIN
            // (haproxy's raw_sock does the same, and likewise trusts it only without RDHUP).
            // Not for splice: a socket-to-pipe splice can stop short when the pipe's slots
            // fill with small segments.
            src_ready.readable = false;
        }
        if self.adaptive && n >= AUTO_SPLICE_THRESHOLD {
            self.method = Method::Splice;
        }
        let mut written = 0;
        while written < n {
            match (&*dst).write(&pools.scratch[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst_ready.writable = false;
                    break;
                }
                Err(_) => return Err(ReadError::Destination),
            }
        }
        if written < n {
            let mut buf = pools.take_buffer();
            buf[..n - written].copy_from_slice(&pools.scratch[written..n]);
            self.in_flight = InFlight::Buffer {
                buf,
                start: 0,
                end: n - written,
            };
        }
        Ok(Step::Moved(written))
    }

    /// Gives back whatever the pump holds; called once when the session closes.
    pub fn release(&mut self, pools: &mut Pools) {
        match std::mem::replace(&mut self.in_flight, InFlight::Empty) {
            InFlight::Empty => {}
            InFlight::Pipe { pipe, len, kind } => {
                if len == 0 {
                    pools.put_pipe(pipe, kind);
                } else {
                    pools.discard_pipe(pipe, kind);
                }
            }
            InFlight::Buffer { buf, .. } => pools.put_buffer(buf),
        }
    }
}

#[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
/// What a pump holds, seen from outside (the live upgrade packs it): bytes read from the
/// source and not yet written, in a pipe or in a partial write's buffer.
pub enum HeldRef<'a> {
    Nothing,
    Pipe(&'a Pipe, usize),
    Bytes(&'a [u8]),
}

#[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
/// What a pump handed over by another process holds.
pub enum Held {
    Nothing,
    /// A pipe with this many bytes in it.
    Pipe(Pipe, usize),
    Bytes(Vec<u8>),
}

#[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
impl Pump {
    /// Where this direction is.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// What this pump holds, untouched: a frozen session is packed from this and stays
    /// whole until the handover commits (then it is released, its pipe never pooled) or
    /// aborts (then it simply runs again).
    pub fn held(&self) -> HeldRef<'_> {
        match &self.in_flight {
            InFlight::Empty => HeldRef::Nothing,
            InFlight::Pipe { pipe, len, .. } => HeldRef::Pipe(pipe, *len),
            InFlight::Buffer { buf, start, end } => HeldRef::Bytes(&buf[*start..*end]),
        }
    }

    /// A pump resumed where another process left it: what it held is written first, before
    /// anything more is read. The method starts from `mode` (this process's).
    pub fn resumed(mode: RelayMode, stage: Stage, held: Held, pools: &mut Pools) -> Pump {
        let mut pump = Pump::new(mode);
        pump.stage = stage;
        pump.in_flight = match held {
            Held::Nothing => InFlight::Empty,
            Held::Pipe(pipe, 0) => {
                drop(pipe);
                InFlight::Empty
            }
            Held::Pipe(pipe, len) => {
                Counters::incr(&pools.counters.pipes_in_use);
                InFlight::Pipe {
                    pipe,
                    len,
                    kind: PipeKind::Foreign,
                }
            }
            Held::Bytes(bytes) if bytes.is_empty() => InFlight::Empty,
            Held::Bytes(bytes) => {
                let mut buf = pools.take_buffer();
                if buf.len() < bytes.len() {
                    // Not from a holdfast's pump (they hold at most one buffer), but kept
                    // whole rather than cut: a larger buffer serves the pool as well.
                    buf = vec![0; bytes.len()].into_boxed_slice();
                }
                buf[..bytes.len()].copy_from_slice(&bytes);
                InFlight::Buffer {
                    buf,
                    start: 0,
                    end: bytes.len(),
                }
            }
        };
        pump
    }
}

/// One socket of a lingering session (one holdfast closes with a FIN, see
/// `Session::shutdown_writes`), its write side already shut down: reads and discards what has
/// arrived (at most [`TURN_BUDGET`] bytes a call), and says whether the socket is finished
/// with: the peer ended its stream or failed, or it has acknowledged everything we sent, our
/// FIN included, so closing the socket can no longer cost it its EOF. Where that cannot be
/// known, the socket is finished with once nothing is left to read.
pub fn linger(socket: &TcpStream, pools: &mut Pools) -> bool {
    let mut discarded = 0;
    while discarded < TURN_BUDGET {
        match (&*socket).read(&mut pools.scratch) {
            Ok(0) => return true,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return sys::unacked_bytes(socket).map_or(true, |n| n == 0);
            }
            Err(_) => return true,
        }
    }
    false // more to discard: the next look goes on
}

/// What one read step did.
enum Step {
    /// The source is at EOF.
    Eof,
    /// Bytes were read; this many were also written to the destination already.
    Moved(usize),
    /// Nothing happened, try again (e.g. the method changed).
    Again,
}

/// A read step failed on the source socket, or the write that followed failed on the
/// destination.
enum ReadError {
    Source(io::Error),
    Destination,
}

impl ReadError {
    fn kind(&self) -> io::ErrorKind {
        match self {
            ReadError::Source(e) => e.kind(),
            ReadError::Destination => io::ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROWN: u64 = GROWN_PIPE_SIZE as u64;

    #[test]
    fn the_budget_gives_what_fits_and_takes_back_what_is_released() {
        let used = AtomicU64::new(0);
        let limit = 2 * GROWN;
        assert!(reserve(&used, limit, GROWN));
        assert!(reserve(&used, limit, GROWN));
        assert!(
            !reserve(&used, limit, GROWN),
            "a third pipe is over the budget"
        );
        assert_eq!(
            used.load(Ordering::Relaxed),
            limit,
            "a refusal takes nothing"
        );
        release(&used, GROWN);
        assert!(
            reserve(&used, limit, GROWN),
            "a released pipe's room is given again"
        );
        assert!(!reserve(&used, limit, 1));
    }

    #[test]
    fn a_zero_budget_gives_nothing() {
        let used = AtomicU64::new(0);
        assert!(!reserve(&used, 0, GROWN));
        assert!(!reserve(&used, 0, 1));
        assert_eq!(used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_budget_never_overflows_or_underflows() {
        let used = AtomicU64::new(u64::MAX - 1);
        assert!(!reserve(&used, u64::MAX, GROWN), "no wrap-around");
        let used = AtomicU64::new(0);
        release(&used, GROWN);
        assert_eq!(used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn workers_sharing_a_budget_never_exceed_it() {
        let used = Arc::new(AtomicU64::new(0));
        let limit = 5 * GROWN;
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (used, peak) = (Arc::clone(&used), Arc::clone(&peak));
                std::thread::spawn(move || {
                    let mut held = 0;
                    for i in 0..20_000 {
                        if i % 3 != 2 && reserve(&used, limit, GROWN) {
                            held += 1;
                            peak.fetch_max(used.load(Ordering::Relaxed), Ordering::Relaxed);
                        } else if held > 0 {
                            held -= 1;
                            release(&used, GROWN);
                        }
                    }
                    for _ in 0..held {
                        release(&used, GROWN);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Relaxed) <= limit);
        assert_eq!(used.load(Ordering::Relaxed), 0, "everything given back");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn grown_pipes_are_charged_pooled_apart_and_given_back() {
        let counters = Arc::new(Counters::default());
        let charged = |c: &Counters| c.pipe_memory.load(Ordering::Relaxed);
        let mut pools = Pools::new(Arc::clone(&counters)).with_pipe_memory(GROWN_PIPE_SIZE);
        let (big, kind, refused) = pools.take_pipe(true).expect("pipe");
        assert_eq!((kind, refused), (PipeKind::Grown, false));
        assert_eq!(charged(&counters), GROWN);
        // The budget holds one: the next bulk read gets a default pipe, and that is not a
        // refusal by the kernel.
        let (small, kind, refused) = pools.take_pipe(true).expect("pipe");
        assert_eq!((kind, refused), (PipeKind::Default, false));
        pools.put_pipe(small, PipeKind::Default);
        pools.put_pipe(big, PipeKind::Grown);
        assert_eq!(
            charged(&counters),
            GROWN,
            "a pooled grown pipe stays charged"
        );
        // A small read never gets the pooled grown pipe.
        let (small, kind, _) = pools.take_pipe(false).expect("pipe");
        assert_eq!(kind, PipeKind::Default);
        pools.put_pipe(small, kind);
        assert_eq!((pools.pipes.len(), pools.grown.len()), (1, 1));
        // A grown pipe closed with bytes in it gives its budget back.
        let (big, kind, _) = pools.take_pipe(true).expect("pipe");
        assert_eq!(kind, PipeKind::Grown);
        pools.discard_pipe(big, kind);
        assert_eq!(charged(&counters), 0);
        let (big, kind, _) = pools.take_pipe(true).expect("pipe");
        pools.put_pipe(big, kind);
        drop(pools);
        assert_eq!(
            charged(&counters),
            0,
            "the worker's pool gave its pipes' budget back"
        );
        assert_eq!(counters.pipes_in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn with_no_budget_pipes_never_grow() {
        let counters = Arc::new(Counters::default());
        let mut pools = Pools::new(Arc::clone(&counters)).with_pipe_memory(0);
        let (pipe, kind, refused) = pools.take_pipe(true).expect("pipe");
        assert_eq!((kind, refused), (PipeKind::Default, false));
        pools.put_pipe(pipe, kind);
        assert_eq!(counters.pipe_memory.load(Ordering::Relaxed), 0);
    }
}
