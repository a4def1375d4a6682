//! The live upgrade's message format: pure functions from messages to bytes and back.
//!
//! Every message is one frame: a 9-byte header (`u32` body length, `u8` kind, `u32` number of
//! descriptors sent with the frame) and a body. All integers are little-endian. Descriptors
//! travel beside the bytes (SCM_RIGHTS, attached to the frame's first byte); the body says
//! which is which by order: a listener frame has one per listener, a session batch has, per
//! session, the client socket, then the backend socket (if the phase has one), then the read
//! and write ends of each direction's pipe that holds bytes (client to backend first).
//!
//! Decoding is total: any input, truncated or garbage, gives a [`WireError`], never a panic,
//! and no length read from the input makes it allocate more than the input holds.
//!
//! The first message (old to new) is a [`Message::Hello`] carrying [`MAGIC`] and the
//! sender's [`VERSION`]; a process that does not speak that version refuses, and the old one
//! keeps everything. A new version of this format bumps [`VERSION`]. Version 2 added the
//! backends' state ([`Message::Backends`], after ready), queued and connecting sessions'
//! tried backends and connect start, and each batch's freeze time. Version 3 added the
//! service (by name) of each listener, backend and session, so that a process running several
//! services gives each session to the service of the same name. The new process still reads
//! version 2 ([`OLDEST_VERSION`]: every service name empty, so each session goes to the
//! service listening where it connected), so an older build can hand over to this one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// Eight bytes at the start of a hello, so that a stranger on the socket is refused at once.
pub const MAGIC: [u8; 8] = *b"HFUPGRD\0";
/// This format's version.
pub const VERSION: u16 = 3;
/// The oldest version a new process still reads ([`decode_version`]).
pub const OLDEST_VERSION: u16 = 2;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest body accepted: a batch of sessions each holding up to two 64 KiB partial writes.
pub const MAX_BODY: usize = 64 << 20;
/// Longest text (a refusal's or abort's reason) accepted.
pub const MAX_TEXT: usize = 4096;

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends early")]
    Truncated,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("a frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("bad value in field {0}")]
    BadValue(&'static str),
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("the message names {named} descriptors but {sent} came with it")]
    FdCount { named: usize, sent: usize },
    #[error("not a holdfast upgrade peer")]
    BadMagic,
}

/// One listening socket: the worker that owns it (its index) and the address it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    pub worker: u16,
    pub addr: SocketAddr,
    /// The name of the service it serves.
    pub service: String,
}

/// One backend's running state in the old process, for the new one to carry on with (it
/// applies it to a backend its own configuration lists at the same address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// The name of the service that lists it (a backend two services list is sent twice).
    pub service: String,
    pub addr: SocketAddr,
    /// Down (by probes or passive detection): it stays down until probed up.
    pub down: bool,
    /// Drained by an operator.
    pub drained: bool,
    /// The weight in the old process's configuration, and the operator's weight replacing it
    /// (the new process keeps the operator's only while its own configured weight is the same).
    pub configured_weight: u32,
    pub operator_weight: Option<u32>,
    /// Under slow start: milliseconds since its ramp began.
    pub ramp_ms: Option<u64>,
}

/// A session's phase as it travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WirePhase {
    /// In the queue: the client socket alone.
    Queued,
    /// A backend connect under way: both sockets.
    Connecting,
    /// Relaying: both sockets and the two pumps.
    Relaying,
}

/// The side that ended its stream first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireSide {
    Client,
    Backend,
}

/// Where one direction's pump is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PumpStage {
    Open,
    /// The source ended; what is held is still to be written, then the half-close.
    Flushing,
    /// Finished: the destination's write side is shut down.
    Done,
}

/// The bytes a pump holds, read from its source and not yet written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    Nothing,
    /// In a pipe, which travels as two descriptors with its bytes inside; `len` of them.
    Pipe {
        len: u32,
    },
    /// In user space (a partial write's buffer): the bytes themselves.
    Bytes(Vec<u8>),
}

/// One direction of a relaying session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedPump {
    pub stage: PumpStage,
    pub held: Held,
}

/// A session, frozen: everything the new process needs to resume it, times as offsets from
/// the moment it was packed (the two processes' monotonic clocks need not agree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedSession {
    pub phase: WirePhase,
    pub client_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// The backend's address (connecting, relaying): the new process finds it in its own set.
    pub backend: Option<SocketAddr>,
    /// Connect attempts made so far.
    pub attempts: u32,
    /// Queued, connecting: the backends that already failed for this client (by address:
    /// the new process's set may list them elsewhere, or not at all), counted against
    /// `--retries`.
    pub tried: Vec<SocketAddr>,
    /// Connecting: milliseconds since this attempt's connect started.
    pub connect_started_ms: Option<u64>,
    /// Milliseconds since the session started, since its last activity.
    pub age_ms: u64,
    pub idle_ms: u64,
    /// Queued: until the queue timeout; connecting: until the connect timeout.
    pub deadline_in_ms: Option<u64>,
    /// Relaying, with `--backend-timeout`: milliseconds since client bytes went unanswered.
    pub unanswered_ms: Option<u64>,
    /// Relaying: bytes written to the backend and to the client so far.
    pub up: u64,
    pub down: u64,
    pub first_eof: Option<WireSide>,
    /// Relaying: client to backend, then backend to client.
    pub pumps: Option<[PackedPump; 2]>,
    /// With `--send-proxy`: the part of the PROXY header not yet written to the backend.
    pub proxy_out: Vec<u8>,
    /// The name of its service.
    pub service: String,
}

impl PackedSession {
    /// The descriptors that travel with this session, in order.
    pub fn fd_count(&self) -> usize {
        let sockets = match self.phase {
            WirePhase::Queued => 1,
            WirePhase::Connecting | WirePhase::Relaying => 2,
        };
        let pipes = self
            .pumps
            .iter()
            .flatten()
            .filter(|p| matches!(p.held, Held::Pipe { .. }));
        sockets + 2 * pipes.count()
    }
}

/// One message of the handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Old to new, first: who is speaking, which version, and the old process's id.
    Hello { version: u16, pid: u32 },
    /// New to old: the version is understood and the configuration is valid; send.
    Ready,
    /// Either way: no handover (a version not understood, an invalid configuration); the old
    /// process keeps everything.
    Refuse { reason: String },
    /// Old to new, after ready: the backends' running state.
    Backends(Vec<BackendInfo>),
    /// Old to new: the listening sockets (one descriptor each, in order).
    Listeners(Vec<ListenerInfo>),
    /// New to old: the listeners are registered; the old process stops accepting.
    Accepting,
    /// Old to new: a batch of frozen sessions, frozen `frozen_us` microseconds before it was
    /// sent (the first part of their pause; the new process measures the rest).
    Batch {
        id: u32,
        frozen_us: u64,
        sessions: Vec<PackedSession>,
    },
    /// New to old: batch `id` is rebuilt (not yet registered, nothing read).
    Received { id: u32 },
    /// Old to new: batch `id` is the new process's now; the old one has closed its copies.
    Commit { id: u32 },
    /// Old to new: batch `id` stays with the old process; the new one closes what it got.
    Abort { id: u32, reason: String },
    /// Old to new: nothing more; the old process exits.
    Done,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Ready => 2,
            Message::Refuse { .. } => 3,
            Message::Listeners(_) => 4,
            Message::Accepting => 5,
            Message::Batch { .. } => 6,
            Message::Received { .. } => 7,
            Message::Commit { .. } => 8,
            Message::Abort { .. } => 9,
            Message::Done => 10,
            Message::Backends(_) => 11,
        }
    }

    /// The descriptors that must be sent with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Listeners(l) => l.len(),
            Message::Batch { sessions, .. } => sessions.iter().map(PackedSession::fd_count).sum(),
            _ => 0,
        }
    }
}

/// The frame of `msg`: header and body.
pub fn encode(msg: &Message) -> Vec<u8> {
    encode_version(msg, VERSION)
}

/// The frame of `msg` in format `version` (from [`OLDEST_VERSION`]; before 3 the service
/// names are left out).
pub fn encode_version(msg: &Message, version: u16) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64), version >= 3);
    w.u32(0);
    w.u8(msg.kind());
    w.u32(msg.fd_count() as u32);
    match msg {
        Message::Hello { version, pid } => {
            w.0.extend_from_slice(&MAGIC);
            w.u16(*version);
            w.u32(*pid);
        }
        Message::Ready | Message::Accepting | Message::Done => {}
        Message::Refuse { reason } => w.text(reason),
        Message::Listeners(listeners) => {
            w.u32(listeners.len() as u32);
            for l in listeners {
                w.u16(l.worker);
                w.addr(l.addr);
                w.service(&l.service);
            }
        }
        Message::Batch {
            id,
            frozen_us,
            sessions,
        } => {
            w.u32(*id);
            w.u64(*frozen_us);
            w.u32(sessions.len() as u32);
            for s in sessions {
                w.session(s);
            }
        }
        Message::Received { id } | Message::Commit { id } => w.u32(*id),
        Message::Backends(backends) => {
            w.u32(backends.len() as u32);
            for b in backends {
                w.service(&b.service);
                w.addr(b.addr);
                w.u8(u8::from(b.down) | (u8::from(b.drained) << 1));
                w.u32(b.configured_weight);
                w.opt_u64(b.operator_weight.map(u64::from));
                w.opt_u64(b.ramp_ms);
            }
        }
        Message::Abort { id, reason } => {
            w.u32(*id);
            w.text(reason);
        }
    }
    let body = (w.0.len() - HEADER_LEN) as u32;
    w.0[..4].copy_from_slice(&body.to_le_bytes());
    w.0
}

/// A frame's header: the body's length, its kind and the descriptors sent with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub body_len: usize,
    pub kind: u8,
    pub fds: usize,
}

/// Reads a frame header (the first [`HEADER_LEN`] bytes of `bytes`).
pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
    let mut r = Reader(bytes, true);
    let body_len = r.u32()? as usize;
    let kind = r.u8()?;
    let fds = r.u32()? as usize;
    if body_len > MAX_BODY {
        return Err(WireError::TooLarge(body_len));
    }
    if !(1..=11).contains(&kind) {
        return Err(WireError::UnknownKind(kind));
    }
    Ok(Header {
        body_len,
        kind,
        fds,
    })
}

/// Decodes one whole frame (exactly: trailing bytes are an error). The descriptor count in
/// the header must be the one the body implies.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    decode_version(frame, VERSION)
}

/// [`decode`] for a peer speaking format `version` (from [`OLDEST_VERSION`]): before 3 no
/// service names travel, and they are read as empty.
pub fn decode_version(frame: &[u8], version: u16) -> Result<Message, WireError> {
    let header = decode_header(frame)?;
    let body = &frame[HEADER_LEN.min(frame.len())..];
    if body.len() < header.body_len {
        return Err(WireError::Truncated);
    }
    if body.len() > header.body_len {
        return Err(WireError::Trailing(body.len() - header.body_len));
    }
    let mut r = Reader(body, version >= 3);
    let msg = match header.kind {
        1 => {
            if r.take(MAGIC.len())? != MAGIC {
                return Err(WireError::BadMagic);
            }
            Message::Hello {
                version: r.u16()?,
                pid: r.u32()?,
            }
        }
        2 => Message::Ready,
        3 => Message::Refuse { reason: r.text()? },
        4 => {
            let n = r.count(2 + 7 + r.name_len())?;
            let mut listeners = Vec::with_capacity(n);
            for _ in 0..n {
                listeners.push(ListenerInfo {
                    worker: r.u16()?,
                    addr: r.addr()?,
                    service: r.service()?,
                });
            }
            Message::Listeners(listeners)
        }
        5 => Message::Accepting,
        6 => {
            let id = r.u32()?;
            let frozen_us = r.u64()?;
            let n = r.count(40)?;
            let mut sessions = Vec::with_capacity(n);
            for _ in 0..n {
                sessions.push(r.session()?);
            }
            Message::Batch {
                id,
                frozen_us,
                sessions,
            }
        }
        7 => Message::Received { id: r.u32()? },
        8 => Message::Commit { id: r.u32()? },
        9 => Message::Abort {
            id: r.u32()?,
            reason: r.text()?,
        },
        10 => Message::Done,
        11 => {
            let n = r.count(r.name_len() + 7 + 1 + 4 + 2)?;
            let mut backends = Vec::with_capacity(n);
            for _ in 0..n {
                let service = r.service()?;
                let addr = r.addr()?;
                let flags = r.u8()?;
                if flags > 3 {
                    return Err(WireError::BadValue("backend flags"));
                }
                let configured_weight = r.u32()?;
                let operator_weight = match r.opt_u64("operator weight")? {
                    None => None,
                    Some(w) => {
                        Some(u32::try_from(w).map_err(|_| WireError::BadValue("operator weight"))?)
                    }
                };
                backends.push(BackendInfo {
                    service,
                    addr,
                    down: flags & 1 != 0,
                    drained: flags & 2 != 0,
                    configured_weight,
                    operator_weight,
                    ramp_ms: r.opt_u64("ramp")?,
                });
            }
            Message::Backends(backends)
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    if msg.fd_count() != header.fds {
        return Err(WireError::FdCount {
            named: msg.fd_count(),
            sent: header.fds,
        });
    }
    Ok(msg)
}

/// The bytes so far, and whether service names are written (version 3 on).
struct Writer(Vec<u8>, bool);

impl Writer {
    fn service(&mut self, name: &str) {
        if self.1 {
            self.text(name);
        }
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn text(&mut self, s: &str) {
        // A reason longer than allowed is cut (at a character boundary), never refused.
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(&s.as_bytes()[..end]);
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
        }
    }
    fn addr(&mut self, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(a) => {
                self.u8(4);
                self.0.extend_from_slice(&a.ip().octets());
                self.u16(a.port());
            }
            SocketAddr::V6(a) => {
                self.u8(6);
                self.0.extend_from_slice(&a.ip().octets());
                self.u16(a.port());
                self.u32(a.flowinfo());
                self.u32(a.scope_id());
            }
        }
    }
    fn session(&mut self, s: &PackedSession) {
        self.u8(match s.phase {
            WirePhase::Queued => 0,
            WirePhase::Connecting => 1,
            WirePhase::Relaying => 2,
        });
        self.addr(s.client_addr);
        self.addr(s.local_addr);
        match s.backend {
            None => self.u8(0),
            Some(a) => {
                self.u8(1);
                self.addr(a);
            }
        }
        self.u32(s.attempts);
        self.u32(s.tried.len() as u32);
        for a in &s.tried {
            self.addr(*a);
        }
        self.opt_u64(s.connect_started_ms);
        self.u64(s.age_ms);
        self.u64(s.idle_ms);
        self.opt_u64(s.deadline_in_ms);
        self.opt_u64(s.unanswered_ms);
        self.u64(s.up);
        self.u64(s.down);
        self.u8(match s.first_eof {
            None => 0,
            Some(WireSide::Client) => 1,
            Some(WireSide::Backend) => 2,
        });
        match &s.pumps {
            None => self.u8(0),
            Some(pumps) => {
                self.u8(1);
                for p in pumps {
                    self.u8(match p.stage {
                        PumpStage::Open => 0,
                        PumpStage::Flushing => 1,
                        PumpStage::Done => 2,
                    });
                    match &p.held {
                        Held::Nothing => self.u8(0),
                        Held::Pipe { len } => {
                            self.u8(1);
                            self.u32(*len);
                        }
                        Held::Bytes(b) => {
                            self.u8(2);
                            self.bytes(b);
                        }
                    }
                }
            }
        }
        self.bytes(&s.proxy_out);
        self.service(&s.service);
    }
}

/// The bytes left, and whether service names are there (version 3 on).
struct Reader<'a>(&'a [u8], bool);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count of items of at least `min_size` bytes each: never more than the input holds.
    fn count(&mut self, min_size: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.0.len() {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// The least bytes a service name takes (its length, when names travel).
    fn name_len(&self) -> usize {
        if self.1 { 4 } else { 0 }
    }
    fn service(&mut self) -> Result<String, WireError> {
        match self.1 {
            true => self.text(),
            false => Ok(String::new()),
        }
    }
    fn text(&mut self) -> Result<String, WireError> {
        let b = self.bytes()?;
        if b.len() > MAX_TEXT {
            return Err(WireError::BadValue("text length"));
        }
        String::from_utf8(b).map_err(|_| WireError::BadValue("text"))
    }
    fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(WireError::BadValue(field)),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(SocketAddr::new(IpAddr::V4(ip), self.u16()?))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let flowinfo = self.u32()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope)))
            }
            _ => Err(WireError::BadValue("address family")),
        }
    }
    fn session(&mut self) -> Result<PackedSession, WireError> {
        let phase = match self.u8()? {
            0 => WirePhase::Queued,
            1 => WirePhase::Connecting,
            2 => WirePhase::Relaying,
            _ => return Err(WireError::BadValue("phase")),
        };
        let client_addr = self.addr()?;
        let local_addr = self.addr()?;
        let backend = match self.u8()? {
            0 => None,
            1 => Some(self.addr()?),
            _ => return Err(WireError::BadValue("backend")),
        };
        let attempts = self.u32()?;
        let n = self.count(7)?;
        let mut tried = Vec::with_capacity(n);
        for _ in 0..n {
            tried.push(self.addr()?);
        }
        let connect_started_ms = self.opt_u64("connect started")?;
        let age_ms = self.u64()?;
        let idle_ms = self.u64()?;
        let deadline_in_ms = self.opt_u64("deadline")?;
        let unanswered_ms = self.opt_u64("unanswered")?;
        let up = self.u64()?;
        let down = self.u64()?;
        let first_eof = match self.u8()? {
            0 => None,
            1 => Some(WireSide::Client),
            2 => Some(WireSide::Backend),
            _ => return Err(WireError::BadValue("first_eof")),
        };
        let pumps = match self.u8()? {
            0 => None,
            1 => Some([self.pump()?, self.pump()?]),
            _ => return Err(WireError::BadValue("pumps")),
        };
        let proxy_out = self.bytes()?;
        let service = self.service()?;
        // What the phase implies must be there (and nothing else), or the fds do not line up.
        let consistent = match phase {
            WirePhase::Queued => backend.is_none() && pumps.is_none(),
            WirePhase::Connecting => backend.is_some() && pumps.is_none(),
            WirePhase::Relaying => backend.is_some() && pumps.is_some(),
        };
        if !consistent {
            return Err(WireError::BadValue("phase and its parts"));
        }
        Ok(PackedSession {
            phase,
            client_addr,
            local_addr,
            backend,
            attempts,
            tried,
            connect_started_ms,
            age_ms,
            idle_ms,
            deadline_in_ms,
            unanswered_ms,
            up,
            down,
            first_eof,
            pumps,
            proxy_out,
            service,
        })
    }
    fn pump(&mut self) -> Result<PackedPump, WireError> {
        let stage = match self.u8()? {
            0 => PumpStage::Open,
            1 => PumpStage::Flushing,
            2 => PumpStage::Done,
            _ => return Err(WireError::BadValue("pump stage")),
        };
        let held = match self.u8()? {
            0 => Held::Nothing,
            1 => Held::Pipe { len: self.u32()? },
            2 => Held::Bytes(self.bytes()?),
            _ => return Err(WireError::BadValue("held")),
        };
        Ok(PackedPump { stage, held })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
                |(ip, port, flow, scope)| SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(ip),
                    port,
                    flow,
                    scope
                ))
            ),
        ]
    }

    fn pump() -> impl Strategy<Value = PackedPump> {
        let stage = prop_oneof![
            Just(PumpStage::Open),
            Just(PumpStage::Flushing),
            Just(PumpStage::Done)
        ];
        let held = prop_oneof![
            Just(Held::Nothing),
            any::<u32>().prop_map(|len| Held::Pipe { len }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Held::Bytes),
        ];
        (stage, held).prop_map(|(stage, held)| PackedPump { stage, held })
    }

    fn session() -> impl Strategy<Value = PackedSession> {
        (session_in_no_service(), text()).prop_map(|(s, service)| PackedSession { service, ..s })
    }

    fn session_in_no_service() -> impl Strategy<Value = PackedSession> {
        let phase = prop_oneof![
            Just(WirePhase::Queued),
            Just(WirePhase::Connecting),
            Just(WirePhase::Relaying)
        ];
        let side =
            proptest::option::of(prop_oneof![Just(WireSide::Client), Just(WireSide::Backend)]);
        (
            (phase, addr(), addr(), addr(), any::<u32>()),
            (
                proptest::collection::vec(addr(), 0..4),
                any::<Option<u64>>(),
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<Option<u64>>(),
                any::<Option<u64>>(),
            ),
            (any::<u64>(), any::<u64>(), side, pump(), pump()),
            proptest::collection::vec(any::<u8>(), 0..100),
        )
            .prop_map(
                |(
                    (phase, client_addr, local_addr, backend, attempts),
                    (tried, connect_started_ms),
                    (age_ms, idle_ms, deadline_in_ms, unanswered_ms),
                    (up, down, first_eof, p0, p1),
                    proxy_out,
                )| PackedSession {
                    phase,
                    client_addr,
                    local_addr,
                    backend: (phase != WirePhase::Queued).then_some(backend),
                    attempts,
                    tried,
                    connect_started_ms,
                    age_ms,
                    idle_ms,
                    deadline_in_ms,
                    unanswered_ms,
                    up,
                    down,
                    first_eof,
                    pumps: (phase == WirePhase::Relaying).then_some([p0, p1]),
                    proxy_out,
                    service: String::new(),
                },
            )
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..50).prop_map(|c| c.into_iter().collect())
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), any::<u32>()).prop_map(|(version, pid)| Message::Hello { version, pid }),
            Just(Message::Ready),
            text().prop_map(|reason| Message::Refuse { reason }),
            proptest::collection::vec(
                (any::<u16>(), addr(), text()).prop_map(|(worker, addr, service)| {
                    ListenerInfo {
                        worker,
                        addr,
                        service,
                    }
                }),
                0..10
            )
            .prop_map(Message::Listeners),
            Just(Message::Accepting),
            (
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(session(), 0..5)
            )
                .prop_map(|(id, frozen_us, sessions)| Message::Batch {
                    id,
                    frozen_us,
                    sessions
                }),
            any::<u32>().prop_map(|id| Message::Received { id }),
            any::<u32>().prop_map(|id| Message::Commit { id }),
            (any::<u32>(), text()).prop_map(|(id, reason)| Message::Abort { id, reason }),
            Just(Message::Done),
            proptest::collection::vec(
                (
                    text(),
                    addr(),
                    any::<(bool, bool)>(),
                    any::<u32>(),
                    any::<Option<u32>>(),
                    any::<Option<u64>>()
                )
                    .prop_map(
                        |(
                            service,
                            addr,
                            (down, drained),
                            configured_weight,
                            operator_weight,
                            ramp_ms,
                        )| {
                            BackendInfo {
                                service,
                                addr,
                                down,
                                drained,
                                configured_weight,
                                operator_weight,
                                ramp_ms,
                            }
                        }
                    ),
                0..6
            )
            .prop_map(Message::Backends),
        ]
    }

    proptest! {
        #[test]
        fn a_version_2_frame_reads_back_without_service_names(msg in message()) {
            let mut plain = msg.clone();
            match &mut plain {
                Message::Listeners(l) => l.iter_mut().for_each(|l| l.service.clear()),
                Message::Backends(b) => b.iter_mut().for_each(|b| b.service.clear()),
                Message::Batch { sessions, .. } => {
                    sessions.iter_mut().for_each(|s| s.service.clear())
                }
                _ => {}
            }
            prop_assert_eq!(decode_version(&encode_version(&msg, 2), 2), Ok(plain.clone()));
            // Version 3 writes the names: the same message is longer unless none has one.
            prop_assert!(encode(&msg).len() >= encode_version(&msg, 2).len());
        }

        #[test]
        fn every_message_round_trips(msg in message()) {
            let frame = encode(&msg);
            let header = decode_header(&frame).unwrap();
            prop_assert_eq!(header.body_len + HEADER_LEN, frame.len());
            prop_assert_eq!(header.fds, msg.fd_count());
            prop_assert_eq!(decode(&frame), Ok(msg));
        }

        #[test]
        fn a_truncated_frame_is_an_error(msg in message(), cut in any::<prop::sample::Index>()) {
            let frame = encode(&msg);
            let cut = cut.index(frame.len());
            prop_assert!(decode(&frame[..cut]).is_err());
        }

        #[test]
        fn a_frame_with_bytes_after_it_is_an_error(msg in message(), extra in 1usize..10) {
            let mut frame = encode(&msg);
            frame.extend(std::iter::repeat_n(0, extra));
            prop_assert!(decode(&frame).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
            let _ = decode_header(&bytes);
        }

        #[test]
        fn a_flipped_byte_never_panics(msg in message(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut frame = encode(&msg);
            let at = at.index(frame.len());
            frame[at] ^= x;
            let _ = decode(&frame);
        }
    }

    #[test]
    fn a_stranger_is_refused_and_a_lying_fd_count_too() {
        let mut frame = encode(&Message::Hello { version: 1, pid: 7 });
        frame[HEADER_LEN] = b'X';
        assert_eq!(decode(&frame), Err(WireError::BadMagic));
        let mut frame = encode(&Message::Ready);
        frame[5] = 3;
        assert_eq!(
            decode(&frame),
            Err(WireError::FdCount { named: 0, sent: 3 })
        );
        let mut frame = encode(&Message::Done);
        frame[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_header(&frame), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn a_huge_count_does_not_allocate() {
        // A batch that claims four billion sessions in twelve bytes.
        let mut frame = encode(&Message::Batch {
            id: 1,
            frozen_us: 0,
            sessions: vec![],
        });
        let n = frame.len();
        frame[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&frame), Err(WireError::Truncated));
    }

    #[test]
    fn descriptors_follow_the_phase_and_the_pipes() {
        let relaying = PackedSession {
            phase: WirePhase::Relaying,
            client_addr: "127.0.0.1:1".parse().unwrap(),
            local_addr: "127.0.0.1:2".parse().unwrap(),
            backend: Some("127.0.0.1:3".parse().unwrap()),
            attempts: 1,
            tried: vec![],
            connect_started_ms: None,
            age_ms: 0,
            idle_ms: 0,
            deadline_in_ms: None,
            unanswered_ms: None,
            up: 0,
            down: 0,
            first_eof: None,
            pumps: Some([
                PackedPump {
                    stage: PumpStage::Open,
                    held: Held::Pipe { len: 10 },
                },
                PackedPump {
                    stage: PumpStage::Open,
                    held: Held::Bytes(vec![1, 2]),
                },
            ]),
            proxy_out: vec![],
            service: String::new(),
        };
        assert_eq!(relaying.fd_count(), 4);
        let queued = PackedSession {
            phase: WirePhase::Queued,
            backend: None,
            pumps: None,
            ..relaying.clone()
        };
        assert_eq!(queued.fd_count(), 1);
        let msg = Message::Batch {
            id: 2,
            frozen_us: 0,
            sessions: vec![relaying, queued],
        };
        assert_eq!(msg.fd_count(), 5);
    }
}
