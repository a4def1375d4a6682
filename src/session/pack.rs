//! A relaying session frozen into a [`PackedSession`] and its descriptors (the live upgrade's
//! old side), and a [`Session`] rebuilt from them (the new side).
//!
//! Packing changes nothing: the descriptors are duplicates, and the pumps keep what they
//! hold. So until the handover commits, the old process still owns a whole session, which it
//! resumes by registering it again; once it commits, it deregisters (already done at freeze)
//! and drops its copy, whose pipes are closed, never pooled, as a pipe with bytes always is
//! (`Pump::release`). Closing a duplicate of a socket sends nothing: the connection lives on
//! in the descriptor the new process holds.
//!
//! Descriptors travel in the order of `wire`: the client socket, the backend socket, then the
//! read and write ends of each pump's pipe that holds bytes (client to backend first).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::Session;
use super::state::{RelayingParts, State};
use crate::backend::BackendSet;
use crate::config::RelayMode;
use crate::relay::{self, HeldRef, Pools, Pump, Readiness, Stage};
use crate::sys::Pipe;
use crate::token::{Side, Target};
use crate::upgrade::wire::{Held, PackedPump, PackedSession, PumpStage, WirePhase, WireSide};

/// Where a session to rebuild comes from on this side: its id, the listener it is counted
/// under, the set and the index of its backend in it.
pub struct Adopt {
    pub id: u64,
    pub listener: usize,
    pub set: Arc<BackendSet>,
    pub index: usize,
    pub mode: RelayMode,
    /// Queued, connecting: the backends of `set` that already failed for this client.
    pub tried: Vec<usize>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn dup(fd: impl AsFd) -> io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

fn not_packable(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

impl Session {
    /// Packs this session (queued, connecting or relaying) as it stands at `now`, with
    /// duplicates of its descriptors; a connect's deadline is where `connect_timeout` after
    /// its start puts it. The caller has deregistered it first, so nothing moves while it is
    /// frozen.
    pub fn pack(
        &self,
        now: Instant,
        connect_timeout: Duration,
    ) -> io::Result<(PackedSession, Vec<OwnedFd>)> {
        let addr_of = |index: usize| {
            self.set
                .backends
                .get(index)
                .map(|b| b.spec.addr)
                .ok_or_else(|| not_packable("a backend index outside the set"))
        };
        let Some(parts) = self.state.relaying_parts(now) else {
            let waiting = self
                .state
                .waiting_parts(now)
                .ok_or_else(|| not_packable("only a queued, connecting or relaying session"))?;
            let mut fds = vec![dup(&self.client)?];
            let (phase, backend, deadline_in, connect_started) = match waiting.connecting {
                Some((index, since)) => {
                    let socket = self
                        .backend
                        .as_ref()
                        .ok_or_else(|| not_packable("a connecting session without its socket"))?;
                    fds.push(dup(socket)?);
                    let left = connect_timeout.saturating_sub(since);
                    let addr = addr_of(index)?;
                    (
                        WirePhase::Connecting,
                        Some(addr),
                        Some(ms(left)),
                        Some(ms(since)),
                    )
                }
                None => (
                    WirePhase::Queued,
                    None,
                    waiting.queue_deadline_in.map(ms),
                    None,
                ),
            };
            let tried = waiting
                .tried
                .iter()
                .filter_map(|&i| addr_of(i).ok())
                .collect();
            let session = PackedSession {
                phase,
                client_addr: self.client_addr,
                local_addr: local_addr_of(self),
                backend,
                attempts: waiting.attempts,
                tried,
                connect_started_ms: connect_started,
                age_ms: ms(now.saturating_duration_since(self.started)),
                idle_ms: 0,
                deadline_in_ms: deadline_in,
                unanswered_ms: None,
                up: 0,
                down: 0,
                first_eof: None,
                pumps: None,
                proxy_out: Vec::new(),
                service: String::new(),
            };
            return Ok((session, fds));
        };
        let backend = addr_of(parts.index)?;
        let (Some(backend_socket), Some(pumps)) = (&self.backend, &self.pumps) else {
            return Err(not_packable("a relaying session without its sockets"));
        };
        let mut fds = vec![dup(&self.client)?, dup(backend_socket)?];
        let mut packed = Vec::with_capacity(2);
        for pump in pumps {
            let held = match pump.held() {
                HeldRef::Nothing | HeldRef::Pipe(_, 0) => Held::Nothing,
                HeldRef::Pipe(pipe, len) => {
                    let [read, write] = pipe.fds();
                    fds.push(dup(read)?);
                    fds.push(dup(write)?);
                    let len = u32::try_from(len).map_err(|_| not_packable("pipe too full"))?;
                    Held::Pipe { len }
                }
                HeldRef::Bytes(bytes) => Held::Bytes(bytes.to_vec()),
            };
            let stage = match pump.stage() {
                Stage::Open => PumpStage::Open,
                Stage::Flushing => PumpStage::Flushing,
                Stage::Done => PumpStage::Done,
            };
            packed.push(PackedPump { stage, held });
        }
        let [up, down] = [packed.remove(0), packed.remove(0)];
        let session = PackedSession {
            phase: WirePhase::Relaying,
            client_addr: self.client_addr,
            local_addr: local_addr_of(self),
            backend: Some(backend),
            attempts: parts.attempts,
            tried: Vec::new(),
            connect_started_ms: None,
            age_ms: ms(now.saturating_duration_since(self.started)),
            idle_ms: ms(parts.idle),
            deadline_in_ms: None,
            unanswered_ms: parts.unanswered.map(ms),
            up: parts.up,
            down: parts.down,
            first_eof: parts.first_eof.map(|side| match side {
                Side::Client => WireSide::Client,
                Side::Backend => WireSide::Backend,
            }),
            pumps: Some([up, down]),
            proxy_out: proxy_out_of(self).to_vec(),
            service: String::new(),
        };
        Ok((session, fds))
    }

    /// Rebuilds a session from what another process packed, taking its descriptors from the
    /// front of `fds` (in the order of `wire`). Not registered, nothing read: the worker
    /// registers it and runs it (both sockets are marked ready, so the first run writes what
    /// the pumps hold and reads what arrived meanwhile; a spurious EAGAIN costs one call).
    /// Its timers (and, queued, its place in the queue) are the worker's to arm.
    pub fn unpack(
        packed: &PackedSession,
        fds: &mut impl Iterator<Item = OwnedFd>,
        adopt: Adopt,
        pools: &mut Pools,
        now: Instant,
    ) -> io::Result<Session> {
        let mut next = || {
            fds.next()
                .ok_or_else(|| not_packable("descriptors missing"))
        };
        let (WirePhase::Relaying, Some(pumps)) = (packed.phase, &packed.pumps) else {
            return unpack_waiting(packed, &mut next, adopt, now);
        };
        let client = socket(next()?)?;
        let backend = socket(next()?)?;
        let mut resumed = Vec::with_capacity(2);
        for pump in pumps {
            let held = match &pump.held {
                Held::Nothing => relay::Held::Nothing,
                Held::Pipe { len } => {
                    let pipe = Pipe::from_fds(next()?, next()?)?;
                    let len = *len as usize;
                    let inside = pipe.bytes_held()?;
                    if inside != len {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("a pipe said to hold {len} bytes holds {inside}"),
                        ));
                    }
                    relay::Held::Pipe(pipe, len)
                }
                Held::Bytes(bytes) => relay::Held::Bytes(bytes.clone()),
            };
            let stage = match pump.stage {
                PumpStage::Open => Stage::Open,
                PumpStage::Flushing => Stage::Flushing,
                PumpStage::Done => Stage::Done,
            };
            resumed.push((stage, held));
        }
        let age = Duration::from_millis(packed.age_ms);
        let started = now.checked_sub(age).unwrap_or(now);
        let parts = RelayingParts {
            index: adopt.index,
            attempts: packed.attempts,
            first_eof: packed.first_eof.map(|side| match side {
                WireSide::Client => Side::Client,
                WireSide::Backend => Side::Backend,
            }),
            up: packed.up,
            down: packed.down,
            idle: Duration::from_millis(packed.idle_ms),
            unanswered: packed.unanswered_ms.map(Duration::from_millis),
        };
        let mut session = Session::new(
            adopt.id,
            client,
            packed.client_addr,
            adopt.listener,
            adopt.set,
            now,
        );
        session.state = State::resumed_relaying(&parts, started, now);
        session.started = started;
        session.attach_backend(backend);
        let ready = Readiness {
            readable: true,
            writable: true,
            hung_up: false,
            error: false,
        };
        session.client_ready = ready;
        session.backend_ready = ready;
        let mut pumps = resumed
            .into_iter()
            .map(|(stage, held)| Pump::resumed(adopt.mode, stage, held, pools));
        let (Some(up), Some(down)) = (pumps.next(), pumps.next()) else {
            return Err(not_packable("a relaying session without two pumps"));
        };
        session.pumps = Some([up, down]);
        set_proxy_out(&mut session, packed.proxy_out.clone());
        Ok(session)
    }
}

impl Session {
    /// Takes both sockets out of the poller (a frozen session hears nothing: the descriptors
    /// sent are duplicates, and epoll would keep reporting them under this worker's token).
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.client)?;
        if let Some(backend) = &mut self.backend {
            registry.deregister(backend)?;
        }
        Ok(())
    }

    /// Registers both sockets under slab key `key`, and marks them ready, so the next run
    /// writes what the pumps hold and reads what arrived meanwhile.
    pub fn register(&mut self, registry: &Registry, key: usize) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(
            &mut self.client,
            Target::Session(key, Side::Client).token(),
            interest,
        )?;
        if let Some(backend) = &mut self.backend {
            registry.register(
                backend,
                Target::Session(key, Side::Backend).token(),
                interest,
            )?;
        }
        let ready = Readiness {
            readable: true,
            writable: true,
            hung_up: false,
            error: false,
        };
        self.client_ready = ready;
        self.backend_ready = ready;
        Ok(())
    }
}

/// A queued or connecting session rebuilt (see [`Session::unpack`]): the queue deadline and
/// the connect deadline are the worker's, from `deadline_in_ms`.
fn unpack_waiting(
    packed: &PackedSession,
    next: &mut impl FnMut() -> io::Result<OwnedFd>,
    adopt: Adopt,
    now: Instant,
) -> io::Result<Session> {
    let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
    let client = socket(next()?)?;
    let mut session = Session::new(
        adopt.id,
        client,
        packed.client_addr,
        adopt.listener,
        adopt.set,
        now,
    );
    session.started = ago(packed.age_ms);
    // The address the client connected to, if it is not the socket's own (a PROXY header
    // named another): what --send-proxy passes on.
    if session.client.local_addr().ok() != Some(packed.local_addr) {
        session.set_local_addr(packed.local_addr);
    }
    match packed.phase {
        WirePhase::Queued => {
            let deadline = now + Duration::from_millis(packed.deadline_in_ms.unwrap_or(0));
            session.state = State::resumed_queued(packed.attempts, adopt.tried, deadline, now);
        }
        WirePhase::Connecting => {
            let started = ago(packed.connect_started_ms.unwrap_or(0));
            session.state =
                State::resumed_connecting(adopt.index, packed.attempts, adopt.tried, started, now);
            session.attach_backend(socket(next()?)?);
        }
        WirePhase::Relaying => return Err(not_packable("a relaying session without pumps")),
    }
    Ok(session)
}

/// A received TCP socket, non-blocking (the flag is the open file's, shared with the sender,
/// but a sender may have been anything).
fn socket(fd: OwnedFd) -> io::Result<TcpStream> {
    let socket = std::net::TcpStream::from(fd);
    socket.set_nonblocking(true)?;
    Ok(TcpStream::from_std(socket))
}

// The session's rarely used fields, read and written in these three places only.

fn local_addr_of(session: &Session) -> SocketAddr {
    match session.extras.as_ref().and_then(|e| e.local_addr) {
        Some(addr) => addr,
        // Without --send-proxy nothing keeps it: the socket knows.
        None => session
            .client
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
    }
}

fn proxy_out_of(session: &Session) -> &[u8] {
    session.extras.as_ref().map_or(&[], |e| &e.proxy_out)
}

fn set_proxy_out(session: &mut Session, bytes: Vec<u8>) {
    if !bytes.is_empty() {
        session.extras().proxy_out = bytes;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::os::unix::net::UnixStream;
    use std::thread;

    use socket2::SockRef;

    use super::*;
    use crate::backend::BackendSet;
    use crate::config::{Algorithm, BackendSpec};
    use crate::session::{Event, Rules, Tag};
    use crate::stats::Counters;
    use crate::upgrade::handover::Channel;
    use crate::upgrade::wire::Message;

    const DATA: usize = 8 << 20;

    fn rules() -> Rules {
        Rules {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: None,
            backend_timeout: None,
            queue_timeout: Duration::from_secs(5),
            header_timeout: None,
            keepalive_after: None,
        }
    }

    fn data() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..DATA)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A connected pair on loopback: (ours, non-blocking for mio; the peer's, blocking).
    fn pair(small_buffers: bool) -> (TcpStream, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        if small_buffers {
            SockRef::from(&listener).set_recv_buffer_size(4096).unwrap();
        }
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        if small_buffers {
            SockRef::from(&ours).set_send_buffer_size(4096).unwrap();
        }
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours), peer)
    }

    fn set() -> Arc<BackendSet> {
        let spec = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        Arc::new(BackendSet::build(&[spec], None, Algorithm::LeastConn))
    }

    /// Runs the pumps once as if both sockets had raised events, and gives the state the run.
    fn run(session: &mut Session, pools: &mut Pools) -> relay_run::Run {
        let all = Readiness {
            readable: true,
            writable: true,
            hung_up: true,
            error: false,
        };
        session.client_ready = all;
        session.backend_ready = all;
        let relayed = session.relay(pools).unwrap();
        let done = relayed.up_done && relayed.down_done;
        let up = relayed.up;
        session
            .state
            .on(Event::Relayed(relayed), Instant::now(), &rules());
        relay_run::Run { up, done }
    }

    mod relay_run {
        pub struct Run {
            pub up: u64,
            pub done: bool,
        }
    }

    /// A session with client bytes held (in a pipe, or a partial write's buffer) and the
    /// backend's side half-closed is packed, its descriptors sent over a UNIX socket, the old
    /// copy dropped, and the rebuilt session relays on: the backend receives every client byte
    /// once and in order, and the client has seen the backend's bytes and its EOF once.
    fn moves_intact(mode: RelayMode) {
        let (client, mut client_peer) = pair(false);
        let (backend, mut backend_peer) = pair(true);
        let client_addr = client.peer_addr().unwrap();
        let local_addr = client.local_addr().unwrap();
        let now = Instant::now();
        let mut old = Session::new(1, client, client_addr, 0, set(), now);
        old.set_local_addr(local_addr);
        old.state
            .on(Event::ConnectStarted { index: 0 }, now, &rules());
        old.state.on(Event::Connected, now, &rules());
        old.attach_backend(backend);
        old.start_relay(mode, None, None);
        let mut pools = Pools::new(Arc::new(Counters::default()));

        backend_peer.write_all(b"backend said this").unwrap();
        backend_peer.shutdown(Shutdown::Write).unwrap();
        let sent = data();
        let to_send = sent.clone();
        let mut writer_peer = client_peer.try_clone().unwrap();
        let writer = thread::spawn(move || {
            writer_peer.write_all(&to_send).unwrap();
            writer_peer.shutdown(Shutdown::Write).unwrap();
        });

        // Relay until the backend (not reading) is full and the pump holds client bytes.
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < give_up, "the client bytes never backed up");
            let ran = run(&mut old, &mut pools);
            let [up, down] = old.pumps.as_ref().unwrap();
            if ran.up == 0 && down.is_done() && !matches!(up.held(), HeldRef::Nothing) {
                break;
            }
        }
        let (packed, fds) = old.pack(Instant::now(), rules().connect_timeout).unwrap();
        assert_eq!(packed.first_eof, Some(WireSide::Backend));
        let [up, down] = packed.pumps.as_ref().unwrap();
        assert_eq!(down.stage, PumpStage::Done);
        match mode {
            RelayMode::Splice => assert!(matches!(up.held, Held::Pipe { len } if len > 0)),
            _ => assert!(matches!(&up.held, Held::Bytes(b) if !b.is_empty())),
        }

        // Over a real UNIX socket, as the handover sends it; then the old copy goes.
        let (a, b) = UnixStream::pair().unwrap();
        let sender = Channel::new(a);
        let mut receiver = Channel::new(b);
        let batch = Message::Batch {
            id: 1,
            frozen_us: 0,
            sessions: vec![packed],
        };
        sender.send(&batch, &fds).unwrap();
        drop(fds);
        old.release(&mut pools);
        drop(old);
        let (Message::Batch { sessions, .. }, fds) = receiver.recv(None).unwrap() else {
            panic!("not a batch");
        };

        let mut new_pools = Pools::new(Arc::new(Counters::default()));
        let adopt = Adopt {
            id: 7,
            listener: 0,
            set: set(),
            index: 0,
            mode,
            tried: Vec::new(),
        };
        let mut fds = fds.into_iter();
        let mut new = Session::unpack(
            &sessions[0],
            &mut fds,
            adopt,
            &mut new_pools,
            Instant::now(),
        )
        .unwrap();
        assert!(fds.next().is_none());
        assert_eq!(new.state.bytes(), (sessions[0].up, sessions[0].down));

        let reader = thread::spawn(move || {
            let mut got = Vec::new();
            backend_peer.read_to_end(&mut got).unwrap();
            got
        });
        let give_up = Instant::now() + Duration::from_secs(60);
        while !run(&mut new, &mut new_pools).done {
            assert!(Instant::now() < give_up, "the rebuilt session stalled");
        }
        new.release(&mut new_pools);
        drop(new);
        writer.join().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the backend's bytes differ from the client's");
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"backend said this");
    }

    /// A queued session travels as its client socket and its queue deadline; a connecting
    /// one as both sockets, its attempt, the backends it tried and its connect's deadline;
    /// each is rebuilt in the same phase.
    #[test]
    fn queued_and_connecting_sessions_are_packed_and_rebuilt_in_their_phase() {
        let now = Instant::now();
        let (client, _client_peer) = pair(false);
        let addr = client.peer_addr().unwrap();
        let mut queued = Session::new(1, client, addr, 0, set(), now);
        queued.state.on(Event::Admitted, now, &rules());
        let (packed, fds) = queued.pack(now, rules().connect_timeout).unwrap();
        assert_eq!(packed.phase, WirePhase::Queued);
        assert_eq!(packed.deadline_in_ms, Some(5000));
        assert_eq!((packed.backend, fds.len()), (None, 1));
        let adopt = |tried| Adopt {
            id: 2,
            listener: 0,
            set: set(),
            index: 0,
            mode: RelayMode::Copy,
            tried,
        };
        let mut pools = Pools::new(Arc::new(Counters::default()));
        let rebuilt = Session::unpack(
            &packed,
            &mut fds.into_iter(),
            adopt(vec![]),
            &mut pools,
            now,
        )
        .unwrap();
        assert_eq!(rebuilt.state.tag(), Tag::Queued);

        let (client, _client_peer) = pair(false);
        let (backend, _backend_peer) = pair(false);
        let mut connecting = Session::new(3, client, addr, 0, set(), now);
        connecting
            .state
            .on(Event::ConnectStarted { index: 0 }, now, &rules());
        connecting.attach_backend(backend);
        let later = now + Duration::from_millis(1500);
        let (packed, fds) = connecting.pack(later, rules().connect_timeout).unwrap();
        assert_eq!(packed.phase, WirePhase::Connecting);
        assert_eq!(packed.backend, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(packed.attempts, 1);
        assert_eq!(packed.connect_started_ms, Some(1500));
        assert_eq!(packed.deadline_in_ms, Some(3500));
        assert_eq!(fds.len(), 2);
        let rebuilt = Session::unpack(
            &packed,
            &mut fds.into_iter(),
            adopt(vec![]),
            &mut pools,
            now,
        )
        .unwrap();
        assert_eq!(rebuilt.state.tag(), Tag::Connecting);
        assert_eq!(rebuilt.state.connect_attempt(), Some(1));
    }

    #[test]
    fn a_session_with_bytes_in_a_pipe_and_a_half_close_moves_intact() {
        moves_intact(RelayMode::Splice);
    }

    #[test]
    fn a_session_with_a_partial_write_and_a_half_close_moves_intact() {
        moves_intact(RelayMode::Copy);
    }
}
