//! What goes into a session's state machine and what comes out: the [`Event`]s the worker
//! feeds it, the [`Action`]s it answers with (in a fixed-size [`Actions`], so the hot path
//! never allocates), why a session ends ([`CloseReason`]), and the settings its transitions
//! depend on ([`Rules`]). The transitions themselves are in `state.rs`.

use std::time::{Duration, Instant};

use crate::backend::Failure;
use crate::config::Config;
use crate::timer::TimerKind;
use crate::token::Side;

/// The settings the transitions depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// `--connect-timeout`; also the window of the passive-failure rule.
    pub connect_timeout: Duration,
    /// `--idle-timeout` (`None`: off).
    pub idle_timeout: Option<Duration>,
    /// `--backend-timeout` (`None`: off).
    pub backend_timeout: Option<Duration>,
    /// `--queue-timeout`.
    pub queue_timeout: Duration,
    /// With `--accept-proxy`: `--proxy-header-timeout` (`None`: clients send no header).
    pub header_timeout: Option<Duration>,
    /// With `--tcp-keepalive`: how old a relaying session is when keepalive is turned on on
    /// its backend socket (`None`: never). See [`keepalive_after`].
    pub keepalive_after: Option<Duration>,
}

/// When keepalive is turned on on a backend socket: once the session has relayed for half
/// the keepalive idle time. A short connection (most of them) never pays the three
/// `setsockopt` calls. A long one loses nothing: setting `TCP_KEEPIDLE` on a socket with
/// keepalive on makes Linux count the idle time from the last segment received
/// (`keepalive_time_elapsed`), so the first probe goes out when it would have had keepalive
/// been on from the connect.
pub fn keepalive_after(tcp_keepalive: Option<Duration>) -> Option<Duration> {
    tcp_keepalive.map(|idle| idle / 2)
}

impl Rules {
    pub fn new(config: &Config) -> Rules {
        Rules {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            backend_timeout: config.backend_timeout,
            queue_timeout: config.limits.queue_timeout,
            header_timeout: config
                .client_ip
                .accept_proxy
                .then_some(config.client_ip.proxy_header_timeout),
            keepalive_after: keepalive_after(config.tcp_keepalive),
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF, or a waiting client closed with nothing to relay.
    Done,
    /// A socket failed (reset, broken pipe); `Side` is where.
    Reset(Side),
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The backend left the client's bytes unanswered for the backend timeout.
    BackendTimeout,
    /// No backend could be connected, or the queue was full.
    NoBackend,
    /// Waited in the queue longer than the queue timeout.
    QueueTimeout,
    /// Out of descriptors or memory.
    Exhausted,
    /// Closed by a drain (holdfast's own, or a backend's drain timeout).
    Drain,
    /// Closed by a rebalance, to make room on an over-loaded backend.
    Rebalance,
    /// Reached `--max-session-age` (with its jitter).
    MaxAge,
    /// The worker is shutting down.
    Shutdown,
    /// The client's PROXY header was invalid, or it closed before sending all of it.
    BadHeader,
    /// The client's PROXY header was not complete within `--proxy-header-timeout`.
    HeaderTimeout,
    /// Refused by `--allow`/`--deny` or a per-IP limit (the address in its PROXY header).
    Refused,
}

impl CloseReason {
    /// Holdfast itself decided to end a session that was fine as far as TCP goes: it ends
    /// with a FIN on both sides, never a reset (see [`Phase::Lingering`](super::state::Phase::Lingering)).
    pub fn ends_with_fin(self) -> bool {
        matches!(
            self,
            CloseReason::Drain
                | CloseReason::Rebalance
                | CloseReason::MaxAge
                | CloseReason::IdleTimeout
                | CloseReason::BackendTimeout
        )
    }
}

/// What the worker saw or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The client was just accepted (and admitted): it sends its PROXY header first, or is
    /// placed at once.
    Accepted,
    /// The client's PROXY header is read (and its address admitted): place it.
    HeaderDone,
    /// The client's PROXY header is invalid, or it closed before sending all of it.
    HeaderFailed,
    /// A readiness event on one of the session's sockets (already recorded in its readiness
    /// flags). `hung_up`: the peer's FIN or an error was flagged. `plain_writable`: writable
    /// with no error or hang-up beside it (on Linux, proof that a connect succeeded).
    Ready {
        side: Side,
        hung_up: bool,
        plain_writable: bool,
    },
    /// The worker started a connect to backend `index`: its slot is taken, its socket
    /// registered.
    ConnectStarted { index: usize },
    /// Eligible backends exist but none has room (`--max-conns-per-backend`,
    /// `--max-connect-rate`), or no descriptor is free for a backend socket: the client
    /// waits.
    NoRoom,
    /// No backend is left to try (none eligible, or `--retries` spent).
    NoBackend,
    /// The worker's queue took the client in.
    Admitted,
    /// The worker's queue scan took the client out to place it again (the worker places it
    /// next). `fresh`: the client now picks from a set with backends in other places, so
    /// the indices of those it tried mean nothing.
    Dequeued { fresh: bool },
    /// The backend connect succeeded.
    Connected,
    /// The backend connect failed (refused, reset, unreachable).
    ConnectFailed,
    /// The pumps ran.
    Relayed(Relayed),
    /// A timer armed for this session fired (`at` is the deadline it was armed with).
    Timer { kind: TimerKind, at: Instant },
    /// The worker looked at a lingering session's sockets: whether each is finished with
    /// (the peer ended its stream, failed, or has acknowledged our FIN).
    Lingered {
        client_done: bool,
        backend_done: bool,
    },
    /// The worker is closing the session (it has counted and logged it already).
    Close(CloseReason),
}

/// What one run of a relaying session's two pumps did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes written to the backend, and to the client, in this run.
    pub up: u64,
    pub down: u64,
    /// Whether each direction has finished (its EOF forwarded), in this run or before.
    pub up_done: bool,
    pub down_done: bool,
    /// Where a socket failed, if one did.
    pub failed: Option<Side>,
    /// A pump stopped on its byte budget with bytes still waiting.
    pub yielded: bool,
}

/// What the worker must do for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Push a timer for this session.
    ArmTimer { kind: TimerKind, at: Instant },
    /// Look for the client's PROXY header (the result comes back as `HeaderDone` or
    /// `HeaderFailed`, or nothing while it is incomplete).
    ReadHeader,
    /// Pick a backend and start a connect (the result comes back as `ConnectStarted`,
    /// `NoRoom` or `NoBackend`).
    Place,
    /// Join the back of the queue if it has room (`Admitted`), or close the client.
    Enqueue,
    /// Back in the queue, with the deadline it had: count it as waiting again.
    Requeue,
    /// Out of the queue: count it as waiting no more.
    LeaveQueue,
    /// Give back the slot this session held in backend `index`'s active count.
    ReleaseSlot(usize),
    /// Count a failure against backend `index` (and tell the health thread if it makes
    /// `--observe-errors` in a row).
    CountFailure(usize, Failure),
    /// The backend answered: its streak of consecutive failures is over.
    ResetStreak(usize),
    /// Close the backend socket (it leaves the poller), before the next attempt.
    DropBackend,
    /// The connection to backend `index` is established `latency` after its connect began:
    /// record it, tune the socket, make the pumps.
    Established { index: usize, latency: Duration },
    /// The session has relayed for [`Rules::keepalive_after`]: turn TCP keepalive on on the
    /// backend socket.
    KeepAlive,
    /// Look whether the connect finished (a writable backend socket while connecting).
    CheckConnect { plain_writable: bool },
    /// Look whether a waiting client has left: it reset, or (with `eof_is_gone`) it closed
    /// with nothing sent. See [`super::Session::client_left`].
    CheckClient { eof_is_gone: bool },
    /// Run the pumps.
    Relay,
    /// Run the pumps again next turn (they stopped on the byte budget).
    RunAgain,
    /// Close the session for this reason.
    Close(CloseReason),
    /// Shut down the write side of each socket the session has (the FIN of a close
    /// holdfast decided).
    ShutdownWrites,
    /// Read and discard what arrived on these sockets, and say which are finished with
    /// (`Lingered`).
    Linger { client: bool, backend: bool },
    /// Drop the sockets and the slab entry.
    Remove,
}

/// The most actions one event yields (a close with a FIN: release the slot, count a failure
/// or drop a connecting socket, shut the writes, arm the linger timer, linger).
pub const MAX_ACTIONS: usize = 5;

/// The actions of one event, in order; a fixed array, so the hot path never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Actions {
    list: [Action; MAX_ACTIONS],
    len: usize,
}

impl Default for Actions {
    fn default() -> Actions {
        Actions {
            list: [Action::Remove; MAX_ACTIONS],
            len: 0,
        }
    }
}

impl Actions {
    pub(super) fn push(&mut self, action: Action) {
        debug_assert!(self.len < MAX_ACTIONS, "more than {MAX_ACTIONS} actions");
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = action;
            self.len += 1;
        }
    }

    #[cfg(test)]
    pub fn as_slice(&self) -> &[Action] {
        &self.list[..self.len]
    }
}

impl IntoIterator for Actions {
    type Item = Action;
    type IntoIter = std::iter::Take<std::array::IntoIter<Action, MAX_ACTIONS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.into_iter().take(self.len)
    }
}
