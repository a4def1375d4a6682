//! A session's life as data: the phase it is in, what that phase carries, and what each event
//! does to it. One idea (the state machine), so one file a little over 600 lines; its
//! vocabulary is in `events.rs` and its table of transitions in `state/tests.rs`.
//!
//! Pure: no sockets, no poller, no clock of its own (the caller passes `now`), no shared
//! counters. [`State::on`] takes an [`Event`] (something the worker saw or did) and returns
//! the [`Action`]s the worker must carry out, in order; the worker owns the sockets, the
//! poller, the timers, the queue and the pools, and is the only one that touches them. So
//! every transition is tested without a socket.
//!
//! ```text
//!            ConnectStarted               Connected
//!  accept ─► Placing ───────────► Connecting ───────► Relaying ─both directions done, a reset,
//!             │  ▲ ▲                  │                   │     shutdown ─► Closed
//!             │  │ └──ConnectFailed, ─┘                   └─drain, idle or backend timeout
//!             │  │    or this attempt's connect timer             ─► Lingering ─► Closed
//!             │  │    (next candidate; none left: NoBackend ─► Closed)
//!             │  └──Dequeued── Queued ─this stay's queue timer, or the client left─► Closed
//!             │                  ▲
//!             └─NoRoom─► Enqueue ┘ Admitted: a new deadline (from the queue: Requeue, back
//!                                  in with the deadline it had)
//! ```
//!
//! With `--accept-proxy`, `Accepted` leads to `Header` first: the client's PROXY header is
//! read (`ReadHeader`, again on each readable event) until it is complete (`HeaderDone` ─►
//! `Placing`), invalid (`HeaderFailed` ─► Closed) or late (its `Header` timer ─► Closed).
//! Without it, `Accepted` places the client at once.
//!
//! `Placing` lasts within one call of the worker: it is the session while the worker picks a
//! backend and starts its connect, and carries the backends that already failed for this
//! client (and, for a client taken out of the queue, the deadline it goes back in with).
//! Each connect attempt is numbered by a counter that only goes up, so a connect timer armed
//! for an earlier attempt (even one before a stay in the queue that forgot the backends
//! tried) never matches a later one; a queue timer matches only the deadline of the current
//! stay. `Lingering` is a session already closed (counted, logged, its backend slot given
//! back) whose sockets stay open, write sides shut down, until the peers have taken the FIN
//! or [`LINGER_TIMEOUT`] has passed. Any phase can be closed (a drain, shutdown, the client
//! leaving): what it holds is given back by the actions of [`Event::Close`].
//!
//! Relaying is the hot path: one [`Event::Relayed`] per run of the pumps. It costs no
//! allocation ([`Actions`] is a fixed array) and usually returns no action at all.

use std::time::{Duration, Instant};

use super::events::{Action, Actions, CloseReason, Event, Relayed, Rules};
use crate::backend::Failure;
use crate::timer::TimerKind;
use crate::token::Side;

/// How long holdfast keeps the sockets of a session it closed itself (a drain, a timeout)
/// open after shutting down their write sides, for the peers to receive the FIN (see
/// [`Phase::Lingering`]). A peer that has not acknowledged it by then is closed on regardless.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a lingering session looks whether its peers have acknowledged the FIN (no
/// event says so).
pub const LINGER_CHECK: Duration = Duration::from_millis(10);

/// Where a session is, with what that phase needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// With `--accept-proxy`: reading the client's PROXY header, until `deadline`. Holds the
    /// client socket alone; nothing is placed, no limit is taken, until the header says who
    /// the client is.
    Header { deadline: Instant },
    /// The worker is finding a backend and starting its connect (within one call).
    Placing {
        /// Backends that already failed for this client (excluded, and counted against
        /// `--retries`).
        tried: Vec<usize>,
        /// Taken out of the queue to be placed: if no backend has room it goes back in with
        /// this deadline. `None` for a new client or one whose connect failed: it would join
        /// the queue afresh, with a whole new timeout.
        requeue: Option<Instant>,
    },
    /// Waiting in the worker's queue for a backend with room, until `deadline`. Holds the
    /// client socket alone: no backend socket, no pipe, no buffer.
    Queued {
        deadline: Instant,
        tried: Vec<usize>,
    },
    /// A non-blocking connect to backend `index` is under way; the backend's slot is held.
    Connecting {
        index: usize,
        /// This attempt's number, so a timer armed for an earlier attempt is ignored.
        attempt: u32,
        tried: Vec<usize>,
        /// When the connect started (its latency is recorded when it succeeds).
        started: Instant,
    },
    /// Connected; the worker's pumps move bytes both ways. The backend's slot is held.
    Relaying {
        index: usize,
        /// When the backend connection was established.
        established: Instant,
        /// Which side ended its stream first, once one has.
        first_eof: Option<Side>,
        /// Bytes written to the backend and to the client so far.
        up: u64,
        down: u64,
        /// With `--backend-timeout`: when the client first sent bytes that the backend has
        /// not answered since (`None` while nothing is waiting for an answer).
        unanswered_since: Option<Instant>,
        /// A backend-timeout timer is armed (one at a time; it re-arms itself lazily, like
        /// the idle timer).
        backend_timer: bool,
    },
    /// Closed (counted, logged, its slot given back) by holdfast itself, with a FIN: the
    /// sockets' write sides are shut down, and they stay open only to discard what still
    /// arrives until each peer has acknowledged the FIN or ended its stream, or until
    /// `until`. `backend_done` starts true when there is no backend stream to end.
    Lingering {
        until: Instant,
        client_done: bool,
        backend_done: bool,
    },
    /// Gone: the worker drops the sockets and the slab entry.
    Closed,
}

/// A phase without its data, for routing and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Header,
    Placing,
    Queued,
    Connecting,
    Relaying,
    Lingering,
    Closed,
}

/// A session's phase, its attempt counter and its last activity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    phase: Phase,
    /// Backend connects started so far. It numbers the attempts and only goes up: a stay in
    /// the queue may forget the backends tried, never this count.
    attempts: u32,
    /// Last time a byte moved either way (for the idle timeout).
    last_active: Instant,
}

#[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
/// What a relaying session's state is, with times as offsets (see [`State::relaying_parts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayingParts {
    pub index: usize,
    pub attempts: u32,
    pub first_eof: Option<Side>,
    pub up: u64,
    pub down: u64,
    /// Since the last byte moved.
    pub idle: Duration,
    /// Since client bytes went unanswered (`--backend-timeout`).
    pub unanswered: Option<Duration>,
}

/// What a queued or connecting session's state is, with times as offsets (see
/// [`State::waiting_parts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingParts {
    pub attempts: u32,
    /// Backends that already failed for this client.
    pub tried: Vec<usize>,
    /// Connecting: the backend, and how long ago this attempt's connect started.
    pub connecting: Option<(usize, Duration)>,
    /// Queued: until the queue timeout.
    pub queue_deadline_in: Option<Duration>,
}

impl State {
    /// A client just accepted: the worker places it next.
    pub fn new(now: Instant) -> State {
        State {
            phase: Phase::Placing {
                tried: Vec::new(),
                requeue: None,
            },
            attempts: 0,
            last_active: now,
        }
    }

    #[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
    /// A relaying session's state as the live upgrade packs it (`None` in any other phase):
    /// its times become offsets from `now`.
    pub fn relaying_parts(&self, now: Instant) -> Option<RelayingParts> {
        let Phase::Relaying {
            index,
            first_eof,
            up,
            down,
            unanswered_since,
            ..
        } = self.phase
        else {
            return None;
        };
        Some(RelayingParts {
            index,
            attempts: self.attempts,
            first_eof,
            up,
            down,
            idle: now.saturating_duration_since(self.last_active),
            unanswered: unanswered_since.map(|t| now.saturating_duration_since(t)),
        })
    }

    #[allow(dead_code)] // used by session/pack.rs, wired with the handover (issue #12)
    /// A relaying session handed over by another process, its offsets turned back into times
    /// on this clock. No timer is armed yet (`backend_timer` is false): the worker arms the
    /// idle and backend timers when it adopts the session.
    pub fn resumed_relaying(parts: &RelayingParts, established: Instant, now: Instant) -> State {
        let ago = |d: Duration| now.checked_sub(d).unwrap_or(now);
        State {
            phase: Phase::Relaying {
                index: parts.index,
                established,
                first_eof: parts.first_eof,
                up: parts.up,
                down: parts.down,
                unanswered_since: parts.unanswered.map(ago),
                backend_timer: false,
            },
            attempts: parts.attempts,
            last_active: ago(parts.idle),
        }
    }

    /// A queued or connecting session's state as the live upgrade packs it (`None` in any
    /// other phase), its times as offsets from `now`.
    pub fn waiting_parts(&self, now: Instant) -> Option<WaitingParts> {
        match &self.phase {
            Phase::Queued { deadline, tried } => Some(WaitingParts {
                attempts: self.attempts,
                tried: tried.clone(),
                connecting: None,
                queue_deadline_in: Some(deadline.saturating_duration_since(now)),
            }),
            Phase::Connecting {
                index,
                tried,
                started,
                ..
            } => Some(WaitingParts {
                attempts: self.attempts,
                tried: tried.clone(),
                connecting: Some((*index, now.saturating_duration_since(*started))),
                queue_deadline_in: None,
            }),
            _ => None,
        }
    }

    /// A queued session handed over by another process: in the queue until `deadline` (the
    /// worker arms its queue timer for exactly that instant and puts it in its queue).
    pub fn resumed_queued(
        attempts: u32,
        tried: Vec<usize>,
        deadline: Instant,
        now: Instant,
    ) -> State {
        State {
            phase: Phase::Queued { deadline, tried },
            attempts,
            last_active: now,
        }
    }

    /// A connecting session handed over by another process: attempt number `attempts` to
    /// backend `index`, started at `started` (the worker arms its connect timer for that
    /// attempt and looks at the connect).
    pub fn resumed_connecting(
        index: usize,
        attempts: u32,
        tried: Vec<usize>,
        started: Instant,
        now: Instant,
    ) -> State {
        State {
            phase: Phase::Connecting {
                index,
                attempt: attempts,
                tried,
                started,
            },
            attempts,
            last_active: now,
        }
    }

    pub fn tag(&self) -> Tag {
        match self.phase {
            Phase::Header { .. } => Tag::Header,
            Phase::Placing { .. } => Tag::Placing,
            Phase::Queued { .. } => Tag::Queued,
            Phase::Connecting { .. } => Tag::Connecting,
            Phase::Relaying { .. } => Tag::Relaying,
            Phase::Lingering { .. } => Tag::Lingering,
            Phase::Closed => Tag::Closed,
        }
    }

    /// The backend this session holds a slot in (connecting or relaying).
    pub fn backend(&self) -> Option<usize> {
        match self.phase {
            Phase::Connecting { index, .. } | Phase::Relaying { index, .. } => Some(index),
            _ => None,
        }
    }

    /// While placing: the backends that already failed for this client, for the worker's
    /// pick to skip and to add those whose connect fails at once.
    pub fn tried_mut(&mut self) -> Option<&mut Vec<usize>> {
        match &mut self.phase {
            Phase::Placing { tried, .. } => Some(tried),
            _ => None,
        }
    }

    /// The number of the connect under way, if one is.
    pub fn connect_attempt(&self) -> Option<u32> {
        match self.phase {
            Phase::Connecting { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    /// Bytes relayed so far, client to backend and backend to client.
    pub fn bytes(&self) -> (u64, u64) {
        match self.phase {
            Phase::Relaying { up, down, .. } => (up, down),
            _ => (0, 0),
        }
    }

    /// How the session ended, in the words of the session log (asked before the close).
    pub fn end_label(&self, reason: CloseReason) -> &'static str {
        match reason {
            CloseReason::Done => match self.phase {
                Phase::Relaying {
                    first_eof: Some(Side::Backend),
                    ..
                } => "backend-close",
                _ => "client-close",
            },
            CloseReason::Reset(Side::Client) => "client-reset",
            CloseReason::Reset(Side::Backend) => "backend-reset",
            CloseReason::IdleTimeout => "idle-timeout",
            CloseReason::BackendTimeout => "backend-timeout",
            CloseReason::NoBackend => "connect-failure",
            CloseReason::QueueTimeout => "queue-timeout",
            CloseReason::Exhausted => "out-of-resources",
            CloseReason::Drain => "drain",
            CloseReason::Rebalance => "rebalance",
            CloseReason::MaxAge => "max-age",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BadHeader => "proxy-header-error",
            CloseReason::HeaderTimeout => "proxy-header-timeout",
            CloseReason::Refused => "refused",
        }
    }

    /// Applies `event` and returns what the worker must do. An event that does not concern
    /// the current phase (a timer armed for an earlier phase or attempt, a readiness event
    /// that has to wait) changes nothing and asks for nothing.
    pub fn on(&mut self, event: Event, now: Instant, rules: &Rules) -> Actions {
        let mut out = Actions::default();
        match event {
            Event::Accepted => self.accepted(now, rules, &mut out),
            Event::HeaderDone => {
                if let Phase::Header { .. } = self.phase {
                    self.phase = Phase::Placing {
                        tried: Vec::new(),
                        requeue: None,
                    };
                    out.push(Action::Place);
                }
            }
            Event::HeaderFailed => {
                if let Phase::Header { .. } = self.phase {
                    out.push(Action::Close(CloseReason::BadHeader));
                }
            }
            Event::Ready {
                side,
                hung_up,
                plain_writable,
            } => self.ready(side, hung_up, plain_writable, &mut out),
            Event::ConnectStarted { index } => self.connect_started(index, now, rules, &mut out),
            Event::NoRoom => self.no_room(&mut out),
            Event::NoBackend => {
                if let Phase::Placing { .. } = self.phase {
                    out.push(Action::Close(CloseReason::NoBackend));
                }
            }
            Event::Admitted => self.admitted(now, rules, &mut out),
            Event::Dequeued { fresh } => self.dequeued(fresh, &mut out),
            Event::Connected => self.connected(now, rules, &mut out),
            Event::ConnectFailed => self.connect_failed(&mut out),
            Event::Relayed(relayed) => self.relayed(relayed, now, rules, &mut out),
            Event::Timer { kind, at } => self.on_timer(kind, at, now, rules, &mut out),
            Event::Lingered {
                client_done,
                backend_done,
            } => self.lingered(client_done, backend_done, now, &mut out),
            Event::Close(reason) => self.close(reason, now, rules, &mut out),
        }
        out
    }

    /// Routes a readiness event: a relaying session runs its pumps; a connecting one looks
    /// at its connect; a waiting client that hung up is looked at (it gives up its place if
    /// it has left: no backend slot or rate token is spent on it); client bytes otherwise
    /// wait until the backend is connected; a lingering session discards what came.
    fn ready(&self, side: Side, hung_up: bool, plain_writable: bool, out: &mut Actions) {
        match (&self.phase, side) {
            (Phase::Relaying { .. }, _) => out.push(Action::Relay),
            (Phase::Header { .. }, Side::Client) => out.push(Action::ReadHeader),
            (Phase::Connecting { .. }, Side::Backend) => {
                out.push(Action::CheckConnect { plain_writable });
            }
            (Phase::Queued { .. }, Side::Client) if hung_up => {
                out.push(Action::CheckClient { eof_is_gone: true });
            }
            (Phase::Connecting { .. }, Side::Client) if hung_up => {
                out.push(Action::CheckClient { eof_is_gone: false });
            }
            (
                Phase::Lingering {
                    client_done,
                    backend_done,
                    ..
                },
                _,
            ) => out.push(Action::Linger {
                client: !client_done,
                backend: !backend_done,
            }),
            _ => {}
        }
    }

    /// A new client: with `--accept-proxy` it must send its header first (read at once:
    /// it is often there already), within the header timeout; otherwise it is placed.
    fn accepted(&mut self, now: Instant, rules: &Rules, out: &mut Actions) {
        let Phase::Placing { tried, requeue } = &self.phase else {
            return;
        };
        if !tried.is_empty() || requeue.is_some() || self.attempts > 0 {
            return; // not a new client
        }
        match rules.header_timeout {
            Some(timeout) => {
                let deadline = now + timeout;
                self.phase = Phase::Header { deadline };
                out.push(Action::ArmTimer {
                    kind: TimerKind::Header,
                    at: deadline,
                });
                out.push(Action::ReadHeader);
            }
            None => out.push(Action::Place),
        }
    }

    fn connect_started(&mut self, index: usize, now: Instant, rules: &Rules, out: &mut Actions) {
        let Phase::Placing { tried, .. } = &mut self.phase else {
            return;
        };
        let tried = std::mem::take(tried);
        self.attempts += 1;
        let attempt = self.attempts;
        self.phase = Phase::Connecting {
            index,
            attempt,
            tried,
            started: now,
        };
        out.push(Action::ArmTimer {
            kind: TimerKind::Connect { attempt },
            at: now + rules.connect_timeout,
        });
    }

    fn no_room(&mut self, out: &mut Actions) {
        let Phase::Placing { tried, requeue } = &mut self.phase else {
            return;
        };
        match *requeue {
            // Back in the queue (same place, same deadline): its timer is still armed.
            Some(deadline) => {
                let tried = std::mem::take(tried);
                self.phase = Phase::Queued { deadline, tried };
                out.push(Action::Requeue);
            }
            None => out.push(Action::Enqueue),
        }
    }

    fn admitted(&mut self, now: Instant, rules: &Rules, out: &mut Actions) {
        let Phase::Placing { tried, .. } = &mut self.phase else {
            return;
        };
        let deadline = now + rules.queue_timeout;
        let tried = std::mem::take(tried);
        self.phase = Phase::Queued { deadline, tried };
        out.push(Action::ArmTimer {
            kind: TimerKind::Queue,
            at: deadline,
        });
    }

    /// Out of the queue while it tries; back in with the same deadline if there is no room.
    /// Backends that already failed for this client stay excluded and count against
    /// `--retries`: a refusing backend with room must not be hammered by a client that keeps
    /// coming back from the queue. A set that moved backends around (a reload or a DNS
    /// answer) invalidates their indices: a fresh start.
    fn dequeued(&mut self, fresh: bool, out: &mut Actions) {
        let Phase::Queued { deadline, tried } = &mut self.phase else {
            return;
        };
        let mut tried = std::mem::take(tried);
        if fresh {
            tried.clear();
        }
        self.phase = Phase::Placing {
            tried,
            requeue: Some(*deadline),
        };
        out.push(Action::LeaveQueue);
    }

    /// Bytes that arrived on either side while connecting are not lost: both sockets were
    /// registered before, and their readiness recorded since, so the first relay reads them.
    fn connected(&mut self, now: Instant, rules: &Rules, out: &mut Actions) {
        let Phase::Connecting { index, started, .. } = self.phase else {
            return;
        };
        self.phase = Phase::Relaying {
            index,
            established: now,
            first_eof: None,
            up: 0,
            down: 0,
            unanswered_since: None,
            backend_timer: false,
        };
        self.last_active = now;
        out.push(Action::Established {
            index,
            latency: now.saturating_duration_since(started),
        });
        // Keepalive on the backend socket is due at `now + keepalive_after`. When that comes
        // before the idle timeout, the idle timer's first look is brought forward to it and
        // does both (see `on_timer`): one timer entry per session instead of two, which is
        // what an idle session's memory is made of.
        let keepalive_at = rules.keepalive_after.map(|after| now + after);
        match (rules.idle_timeout.map(|idle| now + idle), keepalive_at) {
            (Some(idle_at), Some(at)) if at < idle_at => out.push(Action::ArmTimer {
                kind: TimerKind::Idle,
                at,
            }),
            (idle_at, keepalive_at) => {
                if let Some(at) = idle_at {
                    out.push(Action::ArmTimer {
                        kind: TimerKind::Idle,
                        at,
                    });
                }
                if let Some(at) = keepalive_at {
                    out.push(Action::ArmTimer {
                        kind: TimerKind::KeepAlive,
                        at,
                    });
                }
            }
        }
        out.push(Action::Relay);
    }

    /// The attempt failed or timed out: its slot is given back, the failure counted, the
    /// socket closed (so a retry needs no descriptor more than the session had), and the
    /// next candidate tried; only-full backends left send it to the queue afresh.
    fn connect_failed(&mut self, out: &mut Actions) {
        let Phase::Connecting { index, tried, .. } = &mut self.phase else {
            return;
        };
        let index = *index;
        let mut tried = std::mem::take(tried);
        tried.push(index);
        self.phase = Phase::Placing {
            tried,
            requeue: None,
        };
        out.push(Action::ReleaseSlot(index));
        out.push(Action::CountFailure(index, Failure::Connect));
        out.push(Action::DropBackend);
        out.push(Action::Place);
    }

    fn relayed(&mut self, run: Relayed, now: Instant, rules: &Rules, out: &mut Actions) {
        let Phase::Relaying {
            index,
            established,
            first_eof,
            up,
            down,
            unanswered_since,
            backend_timer,
        } = &mut self.phase
        else {
            return;
        };
        let index = *index;
        let mut backend_quit = false;
        if first_eof.is_none() {
            if run.down_done {
                *first_eof = Some(Side::Backend);
                backend_quit = true;
            } else if run.up_done {
                *first_eof = Some(Side::Client);
            }
        }
        if run.up + run.down > 0 {
            self.last_active = now;
            if run.down > 0 && *down == 0 {
                // The first bytes the backend sent back: it is serving, so its run of
                // consecutive failures is over. Bytes written to it prove nothing (only
                // that its kernel took them), so they do not count.
                out.push(Action::ResetStreak(index));
            }
        }
        *up += run.up;
        *down += run.down;
        if let Some(limit) = rules.backend_timeout {
            // The clock runs from the first client byte after the backend's last answer
            // (bytes both ways in one run count as answered). A backend that ended its side
            // can answer no more: it is not waited for.
            if run.down > 0 {
                *unanswered_since = None;
            } else if run.up > 0 && unanswered_since.is_none() && !run.down_done {
                *unanswered_since = Some(now);
                if !*backend_timer {
                    *backend_timer = true;
                    out.push(Action::ArmTimer {
                        kind: TimerKind::Backend,
                        at: now + limit,
                    });
                }
            }
        }
        // The backend ended its side (EOF) without having answered a byte, soon after the
        // session began: a passive failure, counted when it happens (the client may keep its
        // side open for long after).
        if backend_quit
            && *down == 0
            && now.saturating_duration_since(*established) <= rules.connect_timeout
        {
            out.push(Action::CountFailure(index, Failure::Passive));
        }
        if let Some(side) = run.failed {
            out.push(Action::Close(CloseReason::Reset(side)));
        } else if run.up_done && run.down_done {
            out.push(Action::Close(CloseReason::Done));
        } else if run.yielded {
            out.push(Action::RunAgain);
        }
    }

    fn on_timer(
        &mut self,
        kind: TimerKind,
        at: Instant,
        now: Instant,
        rules: &Rules,
        out: &mut Actions,
    ) {
        match (kind, &mut self.phase) {
            (TimerKind::Header, Phase::Header { deadline }) if at == *deadline => {
                out.push(Action::Close(CloseReason::HeaderTimeout));
            }
            (
                TimerKind::Connect { attempt },
                Phase::Connecting {
                    attempt: current, ..
                },
            ) if attempt == *current => {
                self.connect_failed(out);
            }
            // Lazy: one entry per session, which either closes it or is pushed back to the
            // deadline it has by now, so a busy session costs no timer work per byte.
            (TimerKind::Idle, Phase::Relaying { established, .. }) => {
                let Some(idle) = rules.idle_timeout else {
                    return;
                };
                // The first look, brought forward to when keepalive is due (`connected`).
                if rules
                    .keepalive_after
                    .is_some_and(|after| at == *established + after)
                {
                    out.push(Action::KeepAlive);
                }
                let deadline = self.last_active + idle;
                if deadline <= now {
                    out.push(Action::Close(CloseReason::IdleTimeout));
                } else {
                    out.push(Action::ArmTimer {
                        kind: TimerKind::Idle,
                        at: deadline,
                    });
                }
            }
            (
                TimerKind::Backend,
                Phase::Relaying {
                    first_eof,
                    unanswered_since,
                    backend_timer,
                    ..
                },
            ) => {
                let Some(limit) = rules.backend_timeout else {
                    return;
                };
                *backend_timer = false;
                let Some(since) = *unanswered_since else {
                    return; // answered meanwhile; the next client byte re-arms it
                };
                if *first_eof == Some(Side::Backend) {
                    return; // the backend ended its side: it is not waited for
                }
                let deadline = since + limit;
                if deadline <= now {
                    out.push(Action::Close(CloseReason::BackendTimeout));
                } else {
                    *backend_timer = true;
                    out.push(Action::ArmTimer {
                        kind: TimerKind::Backend,
                        at: deadline,
                    });
                }
            }
            // Only the timer of the current stay: a client that was placed, failed its
            // connect and was queued again has a new deadline.
            (TimerKind::Queue, Phase::Queued { deadline, .. }) if at == *deadline => {
                out.push(Action::Close(CloseReason::QueueTimeout));
            }
            (TimerKind::KeepAlive, Phase::Relaying { .. }) => out.push(Action::KeepAlive),
            (TimerKind::DrainClose, Phase::Lingering { .. } | Phase::Closed) => {}
            (TimerKind::DrainClose, _) => out.push(Action::Close(CloseReason::Drain)),
            (TimerKind::MaxAge, Phase::Lingering { .. } | Phase::Closed) => {}
            (TimerKind::MaxAge, _) => out.push(Action::Close(CloseReason::MaxAge)),
            (
                TimerKind::Linger,
                Phase::Lingering {
                    until,
                    client_done,
                    backend_done,
                },
            ) => {
                out.push(Action::Linger {
                    client: !*client_done,
                    backend: !*backend_done,
                });
                // Skipped by the worker if that look ended the session.
                out.push(Action::ArmTimer {
                    kind: TimerKind::Linger,
                    at: (now + LINGER_CHECK).min(*until),
                });
            }
            _ => {} // armed for an earlier phase or attempt
        }
    }

    fn lingered(&mut self, client: bool, backend: bool, now: Instant, out: &mut Actions) {
        let Phase::Lingering {
            until,
            client_done,
            backend_done,
        } = &mut self.phase
        else {
            return;
        };
        *client_done |= client;
        *backend_done |= backend;
        if (*client_done && *backend_done) || now >= *until {
            self.phase = Phase::Closed;
            out.push(Action::Remove);
        }
    }

    /// The session ends: what it holds is given back, and its sockets are closed, or, for a
    /// close holdfast decided itself, shut down and left to linger (see `Session` for why).
    fn close(&mut self, reason: CloseReason, now: Instant, rules: &Rules, out: &mut Actions) {
        let relaying = matches!(self.phase, Phase::Relaying { .. });
        match &self.phase {
            Phase::Lingering { .. } => {
                // Closed already in every respect but its sockets: drop them now.
                self.phase = Phase::Closed;
                out.push(Action::Remove);
                return;
            }
            Phase::Closed => return,
            Phase::Header { .. } | Phase::Placing { .. } => {}
            Phase::Queued { .. } => out.push(Action::LeaveQueue),
            Phase::Connecting { index, .. } => {
                out.push(Action::ReleaseSlot(*index));
                if reason.ends_with_fin() {
                    out.push(Action::DropBackend); // no stream to end
                }
            }
            Phase::Relaying { index, .. } => {
                out.push(Action::ReleaseSlot(*index));
                if self.backend_gave_up(reason, now, rules) {
                    out.push(Action::CountFailure(*index, Failure::Passive));
                }
            }
        }
        if reason.ends_with_fin() {
            self.phase = Phase::Lingering {
                until: now + LINGER_TIMEOUT,
                client_done: false,
                backend_done: !relaying,
            };
            out.push(Action::ShutdownWrites);
            out.push(Action::ArmTimer {
                kind: TimerKind::Linger,
                at: now + LINGER_CHECK,
            });
            out.push(Action::Linger {
                client: true,
                backend: relaying,
            });
        } else {
            self.phase = Phase::Closed;
            out.push(Action::Remove);
        }
    }

    /// The session is closing for a reason that is a passive failure of its backend: a reset
    /// from the backend, which had answered nothing and reset within `--connect-timeout` of
    /// the start (a backend that ended with EOF instead was judged when the EOF arrived, so
    /// it is not counted twice); or the backend timeout, on a session the backend never
    /// answered a single byte (a backend that accepts and hangs). Bytes the client sent do
    /// not matter: that the backend's kernel took them proves nothing, and a client that
    /// speaks first (a WebSocket upgrade) always sends some.
    fn backend_gave_up(&self, reason: CloseReason, now: Instant, rules: &Rules) -> bool {
        let Phase::Relaying {
            first_eof,
            down,
            established,
            ..
        } = self.phase
        else {
            return false;
        };
        match reason {
            CloseReason::Reset(Side::Backend) => {
                first_eof != Some(Side::Backend)
                    && down == 0
                    && now.saturating_duration_since(established) <= rules.connect_timeout
            }
            CloseReason::BackendTimeout => down == 0,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
