//! One proxied connection: its sockets and pumps (here), and its phase and transitions
//! ([`state`]).
//!
//! A [`Session`] is what the worker keeps in its slab: the client socket, the backend socket
//! once there is one, what is known of each socket's readiness, the two pumps while
//! relaying, and a [`State`]. The I/O on those sockets is here (relay, look at a connect,
//! look whether a waiting client left, linger); deciding what happens next is the state's,
//! and carrying it out (timers, the queue, counters, the poller) is the worker's.
//!
//! The state is small and explicit (the sockets, a phase enum carrying its data, the bytes in
//! flight inside the pumps) so that it could one day be handed to another process intact.

pub mod events;
#[allow(dead_code)] // wired into the worker with the handover (issue #12)
pub mod pack;
pub mod state;

use std::io::{self, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use socket2::SockRef;

use crate::backend::BackendSet;
use crate::client_ip::Ticket;
use crate::config::{ProxyVersion, RelayMode};
use crate::listener::{set_keepalive, tune_socket};
use crate::proxy_protocol::{self, Command, Parse, ProxyHeader, Tlvs};
use crate::relay::{self, Outcome, Pools, Pump, Readiness};
use crate::sys;
use crate::token::Side;

pub use events::{Action, Actions, CloseReason, Event, Relayed, Rules};
pub use state::{LINGER_TIMEOUT, State, Tag};

pub struct Session {
    /// Unique within the worker; tells a live timer or queue entry from one left by an earlier
    /// session that had the same slab key.
    pub id: u64,
    pub state: State,
    /// The set the backend is picked from (retries pick from the same set).
    pub set: Arc<BackendSet>,
    pub client: TcpStream,
    pub client_ready: Readiness,
    pub client_addr: SocketAddr,
    /// Connecting, relaying, or lingering after relaying.
    backend: Option<TcpStream>,
    backend_ready: Readiness,
    /// Relaying only: client to backend, and backend to client.
    pumps: Option<[Pump; 2]>,
    pub started: Instant,
    /// Which of the worker's listeners accepted it.
    pub listener: usize,
    /// Already in the worker's list of sessions to run again next turn.
    pub scheduled: bool,
    /// The number of its service in the worker (beside `scheduled`, in what was padding).
    pub service: u16,
    /// What only the client-address features use (`--send-proxy`, `--accept-proxy`, the
    /// per-IP limits): boxed and made on first use, so a session without them carries one
    /// pointer instead of about 110 bytes (idle memory is what 10,000 WebSockets cost).
    extras: Option<Box<Extras>>,
}

/// See [`Session::extras`](Session).
#[derive(Default)]
struct Extras {
    /// The address the client connected to (the listener's, or the one its PROXY header
    /// names): the destination of the header sent on with `--send-proxy`.
    local_addr: Option<SocketAddr>,
    /// TLVs of the client's v2 PROXY header, passed on with `--send-proxy v2`.
    tlvs: Tlvs,
    /// With `--send-proxy`: the part of the header not yet written to the backend. Client
    /// bytes wait until it is empty.
    proxy_out: Vec<u8>,
    /// The session's place under the per-IP limits, given back at close.
    ticket: Option<Ticket>,
}

/// What looking for a client's PROXY header found.
pub enum HeaderRead {
    /// Not complete yet: wait for more bytes (or the header timeout).
    Pending,
    /// A valid header, consumed from the socket (nothing after it was read).
    Done(ProxyHeader),
    /// Not a valid header, or the client closed or failed first: the label of
    /// `holdfast_proxy_header_errors_total`.
    Invalid(&'static str),
}

impl Session {
    pub fn new(
        id: u64,
        client: TcpStream,
        client_addr: SocketAddr,
        listener: usize,
        set: Arc<BackendSet>,
        now: Instant,
    ) -> Session {
        Session {
            id,
            state: State::new(now),
            set,
            client,
            client_ready: Readiness::default(),
            client_addr,
            backend: None,
            backend_ready: Readiness::default(),
            pumps: None,
            started: now,
            listener,
            service: 0,
            scheduled: false,
            extras: None,
        }
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// The address the client connected to, for the header sent on with `--send-proxy`.
    pub fn set_local_addr(&mut self, addr: SocketAddr) {
        self.extras().local_addr = Some(addr);
    }

    /// The TLVs of the client's v2 PROXY header, passed on with `--send-proxy v2`.
    pub fn set_tlvs(&mut self, tlvs: Tlvs) {
        self.extras().tlvs = tlvs;
    }

    /// The session's place under the per-IP limits (`None`: no limits, nothing is kept).
    pub fn set_ticket(&mut self, ticket: Option<Ticket>) {
        if ticket.is_some() {
            self.extras().ticket = ticket;
        }
    }

    /// Takes the session's place under the per-IP limits, to give it back.
    pub fn take_ticket(&mut self) -> Option<Ticket> {
        self.extras.as_mut().and_then(|e| e.ticket.take())
    }

    /// The readiness flags of one side's socket (`None`: no backend socket).
    pub fn ready_mut(&mut self, side: Side) -> Option<&mut Readiness> {
        match side {
            Side::Client => Some(&mut self.client_ready),
            Side::Backend => self.backend.as_ref().map(|_| &mut self.backend_ready),
        }
    }

    /// A backend connect under way (registered already).
    pub fn attach_backend(&mut self, socket: TcpStream) {
        self.backend = Some(socket);
        self.backend_ready = Readiness::default();
    }

    /// Closes the backend socket (dropping a mio socket closes it and removes it from the
    /// poller).
    pub fn drop_backend(&mut self) {
        self.backend = None;
    }

    /// The connection is established: TCP_NODELAY and TCP_USER_TIMEOUT on the backend socket
    /// (the client's were inherited from the listener on Linux, or set at accept), and the
    /// pumps. Keepalive waits until the session proves long-lived ([`Session::keep_alive`]). With `--send-proxy` the header is written now, before any
    /// client byte; what the socket did not take waits in `proxy_out` for the next relay.
    pub fn start_relay(
        &mut self,
        mode: RelayMode,
        user_timeout: Option<Duration>,
        send_proxy: Option<ProxyVersion>,
    ) {
        if let Some(socket) = &self.backend {
            tune_socket(SockRef::from(socket), None);
            set_user_timeout(socket, user_timeout);
        }
        if let Some(version) = send_proxy {
            // Set at accept whenever --send-proxy is on; the socket is asked only if not.
            let client_addr = self.client_addr;
            let asked = self.client.local_addr().ok();
            let extras = self.extras();
            if let Some(local) = extras.local_addr.or(asked) {
                let addresses = Some((client_addr, local));
                extras.proxy_out = match version {
                    ProxyVersion::V1 => proxy_protocol::encode_v1(client_addr, local),
                    ProxyVersion::V2 => {
                        proxy_protocol::encode_v2(Command::Proxy, addresses, &extras.tlvs)
                    }
                };
            }
        }
        self.pumps = Some([Pump::new(mode), Pump::new(mode)]);
    }

    /// TCP keepalive on the backend socket, once the session has relayed for
    /// [`events::keepalive_after`] (the client's is inherited from the listener on Linux, or
    /// set at accept).
    pub fn keep_alive(&self, keepalive: Option<Duration>) {
        if let (Some(socket), Some(idle)) = (&self.backend, keepalive) {
            set_keepalive(SockRef::from(socket), idle);
        }
    }

    /// Writes what is left of the PROXY header to the backend. `Ok(true)`: all of it is out.
    fn flush_proxy_header(&mut self) -> io::Result<bool> {
        let (Some(backend), Some(extras)) = (&self.backend, &mut self.extras) else {
            return Ok(true);
        };
        let proxy_out = &mut extras.proxy_out;
        while !proxy_out.is_empty() {
            if !self.backend_ready.writable {
                return Ok(false);
            }
            match io::Write::write(&mut &*backend, proxy_out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    proxy_out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.backend_ready.writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        *proxy_out = Vec::new();
        Ok(true)
    }

    /// Looks for the client's PROXY header: peeks at what has arrived (the kernel keeps it),
    /// parses it, and once it is complete consumes exactly the header, so the stream behind
    /// it stays in the socket for the relay.
    pub fn read_header(&mut self) -> HeaderRead {
        let mut buf = [0u8; proxy_protocol::V2_MAX_LEN];
        let n = loop {
            match self.client.peek(&mut buf) {
                Ok(0) => return HeaderRead::Invalid("closed"),
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.client_ready.readable = false;
                    return HeaderRead::Pending;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return HeaderRead::Invalid("closed"),
            }
        };
        let (header, len) = match proxy_protocol::parse(&buf[..n]) {
            Parse::Incomplete { .. } => {
                // Everything there was peeked: the next segment brings a new event.
                self.client_ready.readable = false;
                return HeaderRead::Pending;
            }
            Parse::Invalid(reason) => return HeaderRead::Invalid(reason.as_str()),
            Parse::Done { header, len } => (header, len),
        };
        let mut consumed = 0;
        while consumed < len {
            match io::Read::read(&mut &self.client, &mut buf[consumed..len]) {
                Ok(0) => return HeaderRead::Invalid("closed"),
                Ok(n) => consumed += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The bytes were peeked, so they are there: anything else is a failure.
                Err(_) => return HeaderRead::Invalid("closed"),
            }
        }
        HeaderRead::Done(header)
    }

    /// Whether the backend connect has finished, and how; `None` while it has not (the
    /// socket is not writable, or the event was spurious). `plain_writable` says the event
    /// was writable with no error or hang-up beside it: where the platform promises that only
    /// for an established connection, it is proof enough and costs no syscall.
    pub fn connect_result(&mut self, plain_writable: bool) -> Option<io::Result<()>> {
        let socket = self.backend.as_ref()?;
        if !self.backend_ready.writable {
            return None;
        }
        if plain_writable && sys::WRITABLE_MEANS_CONNECTED {
            return Some(Ok(()));
        }
        // mio's recipe: a writable event ends the connect; SO_ERROR says how. If there is no
        // error yet the peer address is unknown (ENOTCONN), the event was spurious.
        match socket.take_error() {
            Ok(None) => match socket.peer_addr() {
                Ok(_) => Some(Ok(())),
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    self.backend_ready.writable = false;
                    None
                }
                Err(e) => Some(Err(e)),
            },
            Ok(Some(e)) | Err(e) => Some(Err(e)),
        }
    }

    /// Runs both pumps (`None` if the session is not relaying). Only a side known to be
    /// readable is read, so a backend that has said nothing yet costs no EAGAIN read.
    pub fn relay(&mut self, pools: &mut Pools) -> Option<Relayed> {
        // The PROXY header goes first: client bytes wait until it is all written.
        let header_out = match self.flush_proxy_header() {
            Ok(done) => done,
            Err(_) => {
                return Some(Relayed {
                    failed: Some(Side::Backend),
                    ..Relayed::default()
                });
            }
        };
        let (Some(backend), Some([up, down])) = (&self.backend, &mut self.pumps) else {
            return None;
        };
        let (up_outcome, up_bytes) = if !header_out {
            (Outcome::Blocked, 0)
        } else {
            up.run(
                &self.client,
                &mut self.client_ready,
                backend,
                &mut self.backend_ready,
                pools,
                down.is_done(),
            )
        };
        let (down_outcome, down_bytes) = down.run(
            backend,
            &mut self.backend_ready,
            &self.client,
            &mut self.client_ready,
            pools,
            up.is_done(),
        );
        let failed = match (up_outcome, down_outcome) {
            (Outcome::SourceFailed, _) | (_, Outcome::DestinationFailed) => Some(Side::Client),
            (Outcome::DestinationFailed, _) | (_, Outcome::SourceFailed) => Some(Side::Backend),
            _ => None,
        }
        .or_else(|| {
            // A reset on a socket whose stream already ended, with nothing waiting to be
            // written to it (a backend that sent its FIN and then died): no pump touches that
            // socket again, so the reset would otherwise go unnoticed until the other side
            // closed. Asked once per error event, never on the per-byte path.
            let reset = |ready: &mut Readiness, socket: &TcpStream| {
                std::mem::take(&mut ready.error) && !matches!(socket.take_error(), Ok(None))
            };
            if reset(&mut self.client_ready, &self.client) {
                Some(Side::Client)
            } else if reset(&mut self.backend_ready, backend) {
                Some(Side::Backend)
            } else {
                None
            }
        });
        Some(Relayed {
            up: up_bytes as u64,
            down: down_bytes as u64,
            up_done: up.is_done(),
            down_done: down.is_done(),
            failed,
            yielded: up_outcome == Outcome::Yield || down_outcome == Outcome::Yield,
        })
    }

    /// Whether a client that is not relaying yet (queued, or waiting for its backend connect)
    /// has gone: it reset the connection (`Reset`), or, when `eof_is_gone`, it closed it with
    /// nothing sent that is still to be relayed (`Done`). Looks with `SO_ERROR` and a one-byte
    /// `MSG_PEEK`; consumes nothing.
    ///
    /// At L4 a client that closed and one that only shut down its write side look the same
    /// (an EOF). A client that half-closed after sending its request (EOF with bytes pending)
    /// has never gone: the request is still to be served. With nothing pending, it depends on
    /// the phase. A queued client may wait long for room, so an EOF gives up its place (like
    /// HAProxy's `option abortonclose`): otherwise a flood of connect-and-close clients would
    /// fill the queue and later be handed backend slots. A connecting client already holds its
    /// slot, and the backend may be one that speaks first (a banner, a greeting) to a client
    /// that has nothing to say, so only a reset ends it there.
    pub fn client_left(&self, eof_is_gone: bool) -> Option<CloseReason> {
        match self.client.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Some(CloseReason::Reset(Side::Client)),
        }
        let mut byte = [0u8; 1];
        match self.client.peek(&mut byte) {
            Ok(0) => eof_is_gone.then_some(CloseReason::Done),
            Ok(_) => None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => None,
            Err(_) => Some(CloseReason::Reset(Side::Client)),
        }
    }

    /// Sets TCP_USER_TIMEOUT on the client socket (at accept; the listener's value is not
    /// relied on).
    pub fn set_client_user_timeout(&self, user_timeout: Option<Duration>) {
        set_user_timeout(&self.client, user_timeout);
    }

    /// Gives back the pumps' pipes and buffers (the session is closing). A pipe with bytes
    /// still in it is closed, never reused.
    pub fn release(&mut self, pools: &mut Pools) {
        if let Some(pumps) = &mut self.pumps {
            for pump in pumps.iter_mut() {
                pump.release(pools);
            }
        }
        self.pumps = None;
    }

    /// A reset on `side` is passed on: the other peer sees a reset (SO_LINGER 0 at close),
    /// not a clean end of stream. Only for a session with a backend socket; says whether it
    /// had one.
    pub fn pass_reset(&self, side: Side) -> bool {
        let Some(backend) = &self.backend else {
            return false;
        };
        let other = match side {
            Side::Client => backend,
            Side::Backend => &self.client,
        };
        let _ = SockRef::from(other).set_linger(Some(Duration::ZERO));
        true
    }

    /// Shuts down the write side of each socket: the FIN of a close holdfast decided itself
    /// (a drain, a timeout), which must end with a clean end of stream on both sides, never
    /// a reset, so clients reconnect with their own back-off rather than treating it as an
    /// error.
    ///
    /// `close()` of a socket whose receive queue holds unread bytes makes the kernel send a
    /// RST instead of a FIN, dropping whatever it still had to send (the FIN included); and
    /// bytes arriving after the close are answered with a RST too. A peer still sending
    /// (or a backlog of bytes holdfast stopped reading, by backpressure) is therefore reset,
    /// and if our FIN had not gone out yet, its read sees ECONNRESET instead of EOF. So the
    /// write side is shut down (the FIN queues behind the bytes already sent) and the sockets
    /// stay open, reading and discarding what arrives ([`Session::linger`]), until each peer
    /// has acknowledged our FIN (nothing unacknowledged is left: it has read, or will read,
    /// EOF whatever follows) or has ended its own stream, or until [`LINGER_TIMEOUT`]. Only
    /// then are they closed.
    pub fn shutdown_writes(&self) {
        // The backend first: it learns that the session ends, and can finish what it was
        // sending, before the client sees its FIN.
        if let Some(socket) = &self.backend {
            let _ = socket.shutdown(Shutdown::Write);
        }
        let _ = self.client.shutdown(Shutdown::Write);
    }

    /// A lingering session's sockets (those asked for): discards what arrived, and says
    /// whether each is finished with. A socket not asked for, or absent, counts as finished.
    pub fn linger(&self, pools: &mut Pools, client: bool, backend: bool) -> (bool, bool) {
        let client_done = !client || relay::linger(&self.client, pools);
        let backend_done = match &self.backend {
            Some(socket) if backend => relay::linger(socket, pools),
            _ => true,
        };
        (client_done, backend_done)
    }
}

/// TCP_USER_TIMEOUT (`--tcp-user-timeout`): a peer that leaves sent bytes unacknowledged for
/// this long is dropped, even while data is queued (keepalive probes only an idle socket).
fn set_user_timeout(sock: &impl std::os::fd::AsFd, user_timeout: Option<Duration>) {
    if let Some(timeout) = user_timeout
        && let Err(e) = sys::set_tcp_user_timeout(sock, timeout)
    {
        log::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

#[cfg(test)]
mod size {
    /// An idle WebSocket costs its session (plus two sockets in the kernel): the client-address
    /// features live behind one pointer so that they cost nothing when off (unboxed, they took
    /// the benchmark's RSS per idle connection from 403 to 516 bytes). The bound is today's size; growing it is a decision, not an accident.
    #[test]
    fn a_session_stays_small() {
        let size = std::mem::size_of::<super::Session>();
        let state = std::mem::size_of::<super::State>();
        assert!(size <= 312, "Session is {size} bytes (its State {state})");
    }
}
