//! The session state machine's transitions, as a table: (state, event, time) → (state,
//! actions), plus a few sequences. No sockets, no poller: this is what `state.rs` being pure
//! buys. Long because it is a table, one row per transition worth pinning down.

use super::*;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

fn rules() -> Rules {
    Rules {
        connect_timeout: 5 * S,
        idle_timeout: Some(60 * S),
        backend_timeout: Some(10 * S),
        queue_timeout: 3 * S,
        header_timeout: None,
        keepalive_after: None,
    }
}

fn state(phase: Phase, attempts: u32, last_active: Instant) -> State {
    State {
        phase,
        attempts,
        last_active,
    }
}

fn placing(tried: &[usize], requeue: Option<Instant>) -> Phase {
    Phase::Placing {
        tried: tried.to_vec(),
        requeue,
    }
}

fn queued(deadline: Instant, tried: &[usize]) -> Phase {
    Phase::Queued {
        deadline,
        tried: tried.to_vec(),
    }
}

fn connecting(index: usize, attempt: u32, tried: &[usize], started: Instant) -> Phase {
    Phase::Connecting {
        index,
        attempt,
        tried: tried.to_vec(),
        started,
    }
}

/// Relaying with backend 1 since `established`, with these bytes so far.
fn relaying(established: Instant, up: u64, down: u64) -> Phase {
    Phase::Relaying {
        index: 1,
        established,
        first_eof: None,
        up,
        down,
        unanswered_since: None,
        backend_timer: false,
    }
}

fn with(mut phase: Phase, f: impl FnOnce(&mut Phase)) -> Phase {
    f(&mut phase);
    phase
}

fn eof(phase: Phase, side: Side) -> Phase {
    with(phase, |p| {
        if let Phase::Relaying { first_eof, .. } = p {
            *first_eof = Some(side);
        }
    })
}

fn waiting_answer(phase: Phase, since: Instant, timer: bool) -> Phase {
    with(phase, |p| {
        if let Phase::Relaying {
            unanswered_since,
            backend_timer,
            ..
        } = p
        {
            *unanswered_since = Some(since);
            *backend_timer = timer;
        }
    })
}

fn lingering(until: Instant, client_done: bool, backend_done: bool) -> Phase {
    Phase::Lingering {
        until,
        client_done,
        backend_done,
    }
}

fn run(up: u64, down: u64) -> Relayed {
    Relayed {
        up,
        down,
        ..Relayed::default()
    }
}

fn timer(kind: TimerKind, at: Instant) -> Event {
    Event::Timer { kind, at }
}

struct Case {
    name: &'static str,
    from: State,
    event: Event,
    now: Instant,
    to: State,
    actions: Vec<Action>,
}

/// Every transition that matters, as (state, event, time) → (state, actions).
#[test]
fn transitions() {
    use Action::*;
    let t0 = Instant::now();
    let r = rules();
    let linger_from = |now: Instant| ArmTimer {
        kind: TimerKind::Linger,
        at: now + LINGER_CHECK,
    };
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    let cases = vec![
        // ---- placing ----
        Case {
            name: "a connect started: attempt numbered, connect timer armed",
            from: state(placing(&[], None), 0, t0),
            event: Event::ConnectStarted { index: 2 },
            now: t(1),
            to: state(connecting(2, 1, &[], t(1)), 1, t0),
            actions: vec![ArmTimer {
                kind: TimerKind::Connect { attempt: 1 },
                at: t(1) + 5 * S,
            }],
        },
        Case {
            name: "a retry's connect keeps the tried backends and counts on",
            from: state(placing(&[0, 1], None), 2, t0),
            event: Event::ConnectStarted { index: 2 },
            now: t(9),
            to: state(connecting(2, 3, &[0, 1], t(9)), 3, t0),
            actions: vec![ArmTimer {
                kind: TimerKind::Connect { attempt: 3 },
                at: t(9) + 5 * S,
            }],
        },
        Case {
            name: "retries exhausted (or none eligible): closed as no backend",
            from: state(placing(&[0, 1, 2], None), 3, t0),
            event: Event::NoBackend,
            now: t(1),
            to: state(placing(&[0, 1, 2], None), 3, t0),
            actions: vec![Close(CloseReason::NoBackend)],
        },
        Case {
            name: "all full: a new client asks to join the queue",
            from: state(placing(&[], None), 0, t0),
            event: Event::NoRoom,
            now: t(1),
            to: state(placing(&[], None), 0, t0),
            actions: vec![Enqueue],
        },
        Case {
            name: "admitted to the queue: deadline and queue timer from now",
            from: state(placing(&[1], None), 1, t0),
            event: Event::Admitted,
            now: t(20),
            to: state(queued(t(20) + 3 * S, &[1]), 1, t0),
            actions: vec![ArmTimer {
                kind: TimerKind::Queue,
                at: t(20) + 3 * S,
            }],
        },
        Case {
            name: "all full for a client from the queue: back in, same deadline, no timer",
            from: state(placing(&[1], Some(t(500))), 1, t0),
            event: Event::NoRoom,
            now: t(100),
            to: state(queued(t(500), &[1]), 1, t0),
            actions: vec![Requeue],
        },
        Case {
            name: "a place failed on a closed session: nothing",
            from: state(Phase::Closed, 1, t0),
            event: Event::ConnectStarted { index: 0 },
            now: t(1),
            to: state(Phase::Closed, 1, t0),
            actions: vec![],
        },
        // ---- queued ----
        Case {
            name: "taken out of the queue: keeps its tried backends and its deadline",
            from: state(queued(t(500), &[1]), 1, t0),
            event: Event::Dequeued { fresh: false },
            now: t(100),
            to: state(placing(&[1], Some(t(500))), 1, t0),
            actions: vec![LeaveQueue],
        },
        Case {
            name: "taken out to a set that moved backends: tried forgotten",
            from: state(queued(t(500), &[1]), 1, t0),
            event: Event::Dequeued { fresh: true },
            now: t(100),
            to: state(placing(&[], Some(t(500))), 1, t0),
            actions: vec![LeaveQueue],
        },
        Case {
            name: "the queue timer of this stay closes it",
            from: state(queued(t(500), &[]), 0, t0),
            event: timer(TimerKind::Queue, t(500)),
            now: t(501),
            to: state(queued(t(500), &[]), 0, t0),
            actions: vec![Close(CloseReason::QueueTimeout)],
        },
        Case {
            name: "a queue timer of an earlier stay is ignored",
            from: state(queued(t(900), &[1]), 1, t0),
            event: timer(TimerKind::Queue, t(500)),
            now: t(501),
            to: state(queued(t(900), &[1]), 1, t0),
            actions: vec![],
        },
        Case {
            name: "a queued client that hung up is looked at",
            from: state(queued(t(500), &[]), 0, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: true,
                plain_writable: false,
            },
            now: t(1),
            to: state(queued(t(500), &[]), 0, t0),
            actions: vec![CheckClient { eof_is_gone: true }],
        },
        Case {
            name: "a queued client's bytes wait",
            from: state(queued(t(500), &[]), 0, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: false,
                plain_writable: true,
            },
            now: t(1),
            to: state(queued(t(500), &[]), 0, t0),
            actions: vec![],
        },
        Case {
            name: "a queued client closed: out of the queue, sockets closed",
            from: state(queued(t(500), &[]), 0, t0),
            event: Event::Close(CloseReason::QueueTimeout),
            now: t(501),
            to: state(Phase::Closed, 0, t0),
            actions: vec![LeaveQueue, Remove],
        },
        // ---- connecting ----
        Case {
            name: "connected: established, idle timer armed, relay at once",
            from: state(connecting(1, 1, &[0], t(10)), 1, t0),
            event: Event::Connected,
            now: t(15),
            to: state(relaying(t(15), 0, 0), 1, t(15)),
            actions: vec![
                Established {
                    index: 1,
                    latency: 5 * MS,
                },
                ArmTimer {
                    kind: TimerKind::Idle,
                    at: t(15) + 60 * S,
                },
                Relay,
            ],
        },
        Case {
            name: "connect failed: slot back, failure counted, socket closed, next candidate",
            from: state(connecting(1, 2, &[0], t(10)), 2, t0),
            event: Event::ConnectFailed,
            now: t(15),
            to: state(placing(&[0, 1], None), 2, t0),
            actions: vec![
                ReleaseSlot(1),
                CountFailure(1, Failure::Connect),
                DropBackend,
                Place,
            ],
        },
        Case {
            name: "this attempt's connect timer: a failed connect",
            from: state(connecting(1, 2, &[], t(10)), 2, t0),
            event: timer(TimerKind::Connect { attempt: 2 }, t(10) + 5 * S),
            now: t(10) + 5 * S,
            to: state(placing(&[1], None), 2, t0),
            actions: vec![
                ReleaseSlot(1),
                CountFailure(1, Failure::Connect),
                DropBackend,
                Place,
            ],
        },
        Case {
            name: "an earlier attempt's connect timer is ignored (tried reset by the queue)",
            from: state(connecting(1, 2, &[], t(10)), 2, t0),
            event: timer(TimerKind::Connect { attempt: 1 }, t(5) + 5 * S),
            now: t(5) + 5 * S,
            to: state(connecting(1, 2, &[], t(10)), 2, t0),
            actions: vec![],
        },
        Case {
            name: "a connect timer while queued is ignored",
            from: state(queued(t(900), &[1]), 1, t0),
            event: timer(TimerKind::Connect { attempt: 1 }, t(800)),
            now: t(800),
            to: state(queued(t(900), &[1]), 1, t0),
            actions: vec![],
        },
        Case {
            name: "a writable backend socket while connecting: look at the connect",
            from: state(connecting(1, 1, &[], t(10)), 1, t0),
            event: Event::Ready {
                side: Side::Backend,
                hung_up: false,
                plain_writable: true,
            },
            now: t(11),
            to: state(connecting(1, 1, &[], t(10)), 1, t0),
            actions: vec![CheckConnect {
                plain_writable: true,
            }],
        },
        Case {
            name: "a connecting client that hung up is looked at",
            from: state(connecting(1, 1, &[], t(10)), 1, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: true,
                plain_writable: false,
            },
            now: t(11),
            to: state(connecting(1, 1, &[], t(10)), 1, t0),
            actions: vec![CheckClient { eof_is_gone: false }],
        },
        Case {
            name: "a connecting session reset by its client: slot back, no failure",
            from: state(connecting(1, 1, &[], t(10)), 1, t0),
            event: Event::Close(CloseReason::Reset(Side::Client)),
            now: t(11),
            to: state(Phase::Closed, 1, t0),
            actions: vec![ReleaseSlot(1), Remove],
        },
        // ---- relaying ----
        Case {
            name: "relay readiness runs the pumps",
            from: state(relaying(t(10), 0, 0), 1, t(10)),
            event: Event::Ready {
                side: Side::Client,
                hung_up: false,
                plain_writable: false,
            },
            now: t(11),
            to: state(relaying(t(10), 0, 0), 1, t(10)),
            actions: vec![Relay],
        },
        Case {
            name: "client bytes: activity, and the backend timeout starts",
            from: state(relaying(t(10), 0, 0), 1, t(10)),
            event: Event::Relayed(run(100, 0)),
            now: t(20),
            to: state(
                waiting_answer(relaying(t(10), 100, 0), t(20), true),
                1,
                t(20),
            ),
            actions: vec![ArmTimer {
                kind: TimerKind::Backend,
                at: t(20) + 10 * S,
            }],
        },
        Case {
            name: "more client bytes while unanswered: no second timer",
            from: state(
                waiting_answer(relaying(t(10), 100, 0), t(20), true),
                1,
                t(20),
            ),
            event: Event::Relayed(run(50, 0)),
            now: t(30),
            to: state(
                waiting_answer(relaying(t(10), 150, 0), t(20), true),
                1,
                t(30),
            ),
            actions: vec![],
        },
        Case {
            name: "the backend's first byte ends its failure streak and answers",
            from: state(
                waiting_answer(relaying(t(10), 100, 0), t(20), true),
                1,
                t(20),
            ),
            event: Event::Relayed(run(0, 7)),
            now: t(30),
            to: state(
                with(relaying(t(10), 100, 7), |p| {
                    if let Phase::Relaying { backend_timer, .. } = p {
                        *backend_timer = true; // it fires, finds nothing unanswered
                    }
                }),
                1,
                t(30),
            ),
            actions: vec![ResetStreak(1)],
        },
        Case {
            name: "later backend bytes: no streak reset",
            from: state(relaying(t(10), 100, 7), 1, t(20)),
            event: Event::Relayed(run(0, 7)),
            now: t(30),
            to: state(relaying(t(10), 100, 14), 1, t(30)),
            actions: vec![],
        },
        Case {
            name: "the backend's EOF with nothing answered, soon: a passive failure",
            from: state(relaying(t(10), 100, 0), 1, t(10)),
            event: Event::Relayed(Relayed {
                down_done: true,
                ..run(0, 0)
            }),
            now: t(10) + 5 * S,
            to: state(eof(relaying(t(10), 100, 0), Side::Backend), 1, t(10)),
            actions: vec![CountFailure(1, Failure::Passive)],
        },
        Case {
            name: "the backend's EOF with nothing answered, after the window: not counted",
            from: state(relaying(t(10), 100, 0), 1, t(10)),
            event: Event::Relayed(Relayed {
                down_done: true,
                ..run(0, 0)
            }),
            now: t(11) + 5 * S,
            to: state(eof(relaying(t(10), 100, 0), Side::Backend), 1, t(10)),
            actions: vec![],
        },
        Case {
            name: "the backend's EOF after answering: not counted",
            from: state(relaying(t(10), 100, 3), 1, t(10)),
            event: Event::Relayed(Relayed {
                down_done: true,
                ..run(0, 0)
            }),
            now: t(20),
            to: state(eof(relaying(t(10), 100, 3), Side::Backend), 1, t(10)),
            actions: vec![],
        },
        Case {
            name: "the client's EOF first: half-close, nothing else",
            from: state(relaying(t(10), 100, 3), 1, t(10)),
            event: Event::Relayed(Relayed {
                up_done: true,
                ..run(0, 0)
            }),
            now: t(20),
            to: state(eof(relaying(t(10), 100, 3), Side::Client), 1, t(10)),
            actions: vec![],
        },
        Case {
            name: "both directions done: closed",
            from: state(eof(relaying(t(10), 100, 3), Side::Client), 1, t(10)),
            event: Event::Relayed(Relayed {
                up_done: true,
                down_done: true,
                ..run(0, 2)
            }),
            now: t(20),
            to: state(eof(relaying(t(10), 100, 5), Side::Client), 1, t(20)),
            actions: vec![Close(CloseReason::Done)],
        },
        Case {
            name: "a socket failed: closed as a reset on that side",
            from: state(relaying(t(10), 100, 3), 1, t(10)),
            event: Event::Relayed(Relayed {
                failed: Some(Side::Backend),
                ..run(0, 0)
            }),
            now: t(20),
            to: state(relaying(t(10), 100, 3), 1, t(10)),
            actions: vec![Close(CloseReason::Reset(Side::Backend))],
        },
        Case {
            name: "the byte budget spent: run again next turn",
            from: state(relaying(t(10), 0, 0), 1, t(10)),
            event: Event::Relayed(Relayed {
                yielded: true,
                ..run(600_000, 0)
            }),
            now: t(20),
            to: state(
                waiting_answer(relaying(t(10), 600_000, 0), t(20), true),
                1,
                t(20),
            ),
            actions: vec![
                ArmTimer {
                    kind: TimerKind::Backend,
                    at: t(20) + 10 * S,
                },
                RunAgain,
            ],
        },
        Case {
            name: "a silent backend's reset within the window: a passive failure",
            from: state(relaying(t(10), 100, 0), 1, t(10)),
            event: Event::Close(CloseReason::Reset(Side::Backend)),
            now: t(20),
            to: state(Phase::Closed, 1, t(10)),
            actions: vec![ReleaseSlot(1), CountFailure(1, Failure::Passive), Remove],
        },
        Case {
            name: "a reset after the backend's EOF was judged already: not counted twice",
            from: state(eof(relaying(t(10), 100, 0), Side::Backend), 1, t(10)),
            event: Event::Close(CloseReason::Reset(Side::Backend)),
            now: t(20),
            to: state(Phase::Closed, 1, t(10)),
            actions: vec![ReleaseSlot(1), Remove],
        },
        Case {
            name: "a backend's reset after it answered: not a failure",
            from: state(relaying(t(10), 100, 1), 1, t(10)),
            event: Event::Close(CloseReason::Reset(Side::Backend)),
            now: t(20),
            to: state(Phase::Closed, 1, t(10)),
            actions: vec![ReleaseSlot(1), Remove],
        },
        Case {
            name: "a client's reset: not the backend's failure",
            from: state(relaying(t(10), 100, 0), 1, t(10)),
            event: Event::Close(CloseReason::Reset(Side::Client)),
            now: t(20),
            to: state(Phase::Closed, 1, t(10)),
            actions: vec![ReleaseSlot(1), Remove],
        },
        // ---- idle and backend timeouts ----
        Case {
            name: "idle timer, bytes moved since: pushed back to the new deadline",
            from: state(relaying(t(10), 5, 5), 1, t(10) + 30 * S),
            event: timer(TimerKind::Idle, t(10) + 60 * S),
            now: t(10) + 60 * S,
            to: state(relaying(t(10), 5, 5), 1, t(10) + 30 * S),
            actions: vec![ArmTimer {
                kind: TimerKind::Idle,
                at: t(10) + 90 * S,
            }],
        },
        Case {
            name: "idle timer, idle for the whole timeout: closed",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: timer(TimerKind::Idle, t(10) + 60 * S),
            now: t(10) + 60 * S,
            to: state(relaying(t(10), 5, 5), 1, t(10)),
            actions: vec![Close(CloseReason::IdleTimeout)],
        },
        Case {
            name: "backend timer, still unanswered at the deadline: closed",
            from: state(waiting_answer(relaying(t(10), 5, 0), t(20), true), 1, t(20)),
            event: timer(TimerKind::Backend, t(20) + 10 * S),
            now: t(20) + 10 * S,
            to: state(
                waiting_answer(relaying(t(10), 5, 0), t(20), false),
                1,
                t(20),
            ),
            actions: vec![Close(CloseReason::BackendTimeout)],
        },
        Case {
            name: "backend timer, answered and asked again since: re-armed",
            from: state(
                waiting_answer(relaying(t(10), 5, 3), t(4000), true),
                1,
                t(4000),
            ),
            event: timer(TimerKind::Backend, t(20) + 10 * S),
            now: t(20) + 10 * S,
            to: state(
                waiting_answer(relaying(t(10), 5, 3), t(4000), true),
                1,
                t(4000),
            ),
            actions: vec![ArmTimer {
                kind: TimerKind::Backend,
                at: t(4000) + 10 * S,
            }],
        },
        Case {
            name: "backend timer, nothing unanswered: disarmed",
            from: state(
                with(relaying(t(10), 5, 3), |p| {
                    if let Phase::Relaying { backend_timer, .. } = p {
                        *backend_timer = true;
                    }
                }),
                1,
                t(30),
            ),
            event: timer(TimerKind::Backend, t(20) + 10 * S),
            now: t(20) + 10 * S,
            to: state(relaying(t(10), 5, 3), 1, t(30)),
            actions: vec![],
        },
        Case {
            name: "backend timer after the backend ended its side: not waited for",
            from: state(
                eof(
                    waiting_answer(relaying(t(10), 5, 0), t(20), true),
                    Side::Backend,
                ),
                1,
                t(20),
            ),
            event: timer(TimerKind::Backend, t(20) + 10 * S),
            now: t(20) + 10 * S,
            to: state(
                eof(
                    waiting_answer(relaying(t(10), 5, 0), t(20), false),
                    Side::Backend,
                ),
                1,
                t(20),
            ),
            actions: vec![],
        },
        Case {
            name: "closed by the backend timeout, never answered: a passive failure, a FIN",
            from: state(
                waiting_answer(relaying(t(10), 5, 0), t(20), false),
                1,
                t(20),
            ),
            event: Event::Close(CloseReason::BackendTimeout),
            now: t(20) + 10 * S,
            to: state(lingering(t(20) + 12 * S, false, false), 1, t(20)),
            actions: vec![
                ReleaseSlot(1),
                CountFailure(1, Failure::Passive),
                ShutdownWrites,
                linger_from(t(20) + 10 * S),
                Linger {
                    client: true,
                    backend: true,
                },
            ],
        },
        Case {
            name: "closed by the backend timeout after some answer: no failure",
            from: state(
                waiting_answer(relaying(t(10), 5, 2), t(20), false),
                1,
                t(20),
            ),
            event: Event::Close(CloseReason::BackendTimeout),
            now: t(20) + 10 * S,
            to: state(lingering(t(20) + 12 * S, false, false), 1, t(20)),
            actions: vec![
                ReleaseSlot(1),
                ShutdownWrites,
                linger_from(t(20) + 10 * S),
                Linger {
                    client: true,
                    backend: true,
                },
            ],
        },
        // ---- drain ----
        Case {
            name: "a drain close timer closes a relaying session",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: timer(TimerKind::DrainClose, t(50)),
            now: t(50),
            to: state(relaying(t(10), 5, 5), 1, t(10)),
            actions: vec![Close(CloseReason::Drain)],
        },
        Case {
            name: "a drain close timer for a session lingering already: nothing",
            from: state(lingering(t(900), false, false), 1, t(10)),
            event: timer(TimerKind::DrainClose, t(50)),
            now: t(50),
            to: state(lingering(t(900), false, false), 1, t(10)),
            actions: vec![],
        },
        Case {
            name: "a drain closes a relaying session with a FIN: it lingers",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: Event::Close(CloseReason::Drain),
            now: t(50),
            to: state(lingering(t(50) + LINGER_TIMEOUT, false, false), 1, t(10)),
            actions: vec![
                ReleaseSlot(1),
                ShutdownWrites,
                linger_from(t(50)),
                Linger {
                    client: true,
                    backend: true,
                },
            ],
        },
        Case {
            name: "a drain closes a connecting session: its connect is dropped, no stream",
            from: state(connecting(2, 1, &[], t(10)), 1, t0),
            event: Event::Close(CloseReason::Drain),
            now: t(50),
            to: state(lingering(t(50) + LINGER_TIMEOUT, false, true), 1, t0),
            actions: vec![
                ReleaseSlot(2),
                DropBackend,
                ShutdownWrites,
                linger_from(t(50)),
                Linger {
                    client: true,
                    backend: false,
                },
            ],
        },
        Case {
            name: "a drain closes a queued client: out of the queue, with a FIN",
            from: state(queued(t(900), &[]), 0, t0),
            event: Event::Close(CloseReason::Drain),
            now: t(50),
            to: state(lingering(t(50) + LINGER_TIMEOUT, false, true), 0, t0),
            actions: vec![
                LeaveQueue,
                ShutdownWrites,
                linger_from(t(50)),
                Linger {
                    client: true,
                    backend: false,
                },
            ],
        },
        // ---- rebalance and --max-session-age ----
        Case {
            name: "a rebalance closes a relaying session with a FIN: it lingers",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: Event::Close(CloseReason::Rebalance),
            now: t(50),
            to: state(lingering(t(50) + LINGER_TIMEOUT, false, false), 1, t(10)),
            actions: vec![
                ReleaseSlot(1),
                ShutdownWrites,
                linger_from(t(50)),
                Linger {
                    client: true,
                    backend: true,
                },
            ],
        },
        Case {
            name: "the max-age timer closes a relaying session",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: timer(TimerKind::MaxAge, t(50)),
            now: t(50),
            to: state(relaying(t(10), 5, 5), 1, t(10)),
            actions: vec![Close(CloseReason::MaxAge)],
        },
        Case {
            name: "the max-age timer of a session lingering already: nothing",
            from: state(lingering(t(900), false, false), 1, t(10)),
            event: timer(TimerKind::MaxAge, t(50)),
            now: t(50),
            to: state(lingering(t(900), false, false), 1, t(10)),
            actions: vec![],
        },
        Case {
            name: "max age closes a relaying session with a FIN: it lingers",
            from: state(relaying(t(10), 5, 5), 1, t(10)),
            event: Event::Close(CloseReason::MaxAge),
            now: t(50),
            to: state(lingering(t(50) + LINGER_TIMEOUT, false, false), 1, t(10)),
            actions: vec![
                ReleaseSlot(1),
                ShutdownWrites,
                linger_from(t(50)),
                Linger {
                    client: true,
                    backend: true,
                },
            ],
        },
        // ---- lingering ----
        Case {
            name: "linger timer: look at the sockets not finished, look again soon",
            from: state(lingering(t(900), true, false), 1, t0),
            event: timer(TimerKind::Linger, t(50)),
            now: t(50),
            to: state(lingering(t(900), true, false), 1, t0),
            actions: vec![
                Linger {
                    client: false,
                    backend: true,
                },
                linger_from(t(50)),
            ],
        },
        Case {
            name: "linger timer near the end: the next look is at the end",
            from: state(lingering(t(55), false, false), 1, t0),
            event: timer(TimerKind::Linger, t(50)),
            now: t(50),
            to: state(lingering(t(55), false, false), 1, t0),
            actions: vec![
                Linger {
                    client: true,
                    backend: true,
                },
                ArmTimer {
                    kind: TimerKind::Linger,
                    at: t(55),
                },
            ],
        },
        Case {
            name: "a lingering socket's event: discard what came",
            from: state(lingering(t(900), false, true), 1, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: false,
                plain_writable: false,
            },
            now: t(50),
            to: state(lingering(t(900), false, true), 1, t0),
            actions: vec![Linger {
                client: true,
                backend: false,
            }],
        },
        Case {
            name: "one peer took the FIN: still lingering for the other",
            from: state(lingering(t(900), false, false), 1, t0),
            event: Event::Lingered {
                client_done: true,
                backend_done: false,
            },
            now: t(50),
            to: state(lingering(t(900), true, false), 1, t0),
            actions: vec![],
        },
        Case {
            name: "both peers took the FIN: gone",
            from: state(lingering(t(900), true, false), 1, t0),
            event: Event::Lingered {
                client_done: false,
                backend_done: true,
            },
            now: t(50),
            to: state(Phase::Closed, 1, t0),
            actions: vec![Remove],
        },
        Case {
            name: "the linger time is up: gone whatever the peers did",
            from: state(lingering(t(900), false, false), 1, t0),
            event: Event::Lingered {
                client_done: false,
                backend_done: false,
            },
            now: t(900),
            to: state(Phase::Closed, 1, t0),
            actions: vec![Remove],
        },
        Case {
            name: "a lingering session closed (shutdown): its sockets dropped",
            from: state(lingering(t(900), false, false), 1, t0),
            event: Event::Close(CloseReason::Shutdown),
            now: t(50),
            to: state(Phase::Closed, 1, t0),
            actions: vec![Remove],
        },
        Case {
            name: "an idle timer of a session that lingers: ignored",
            from: state(lingering(t(900), false, false), 1, t0),
            event: timer(TimerKind::Idle, t(50)),
            now: t(50) + 120 * S,
            to: state(lingering(t(900), false, false), 1, t0),
            actions: vec![],
        },
    ];
    for case in cases {
        let mut state = case.from.clone();
        let actions = state.on(case.event, case.now, &r);
        assert_eq!(
            actions.as_slice(),
            &case.actions[..],
            "{}: actions (from {:?})",
            case.name,
            case.from.tag()
        );
        assert_eq!(state, case.to, "{}: state", case.name);
    }
}

/// `--accept-proxy`: the header phase before placing, as (state, event, time) → (state,
/// actions), with a 2 s header timeout (and without one, for `Accepted`).
#[test]
fn header_phase_transitions() {
    use Action::*;
    let t0 = Instant::now();
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    let header = |deadline: Instant| Phase::Header { deadline };
    let with_header = Rules {
        header_timeout: Some(2 * S),
        ..rules()
    };
    let cases = vec![
        Case {
            name: "accepted with --accept-proxy: header timer armed, header looked for at once",
            from: State::new(t0),
            event: Event::Accepted,
            now: t(1),
            to: state(header(t(1) + 2 * S), 0, t0),
            actions: vec![
                ArmTimer {
                    kind: TimerKind::Header,
                    at: t(1) + 2 * S,
                },
                ReadHeader,
            ],
        },
        Case {
            name: "readable while reading the header: look again",
            from: state(header(t(2000)), 0, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: false,
                plain_writable: false,
            },
            now: t(5),
            to: state(header(t(2000)), 0, t0),
            actions: vec![ReadHeader],
        },
        Case {
            name: "a hang-up while reading the header: look (the peek says how it ended)",
            from: state(header(t(2000)), 0, t0),
            event: Event::Ready {
                side: Side::Client,
                hung_up: true,
                plain_writable: false,
            },
            now: t(5),
            to: state(header(t(2000)), 0, t0),
            actions: vec![ReadHeader],
        },
        Case {
            name: "header read: placed as a new client",
            from: state(header(t(2000)), 0, t0),
            event: Event::HeaderDone,
            now: t(5),
            to: state(placing(&[], None), 0, t0),
            actions: vec![Place],
        },
        Case {
            name: "invalid header: closed",
            from: state(header(t(2000)), 0, t0),
            event: Event::HeaderFailed,
            now: t(5),
            to: state(header(t(2000)), 0, t0),
            actions: vec![Close(CloseReason::BadHeader)],
        },
        Case {
            name: "the header timer: closed as a header timeout",
            from: state(header(t(2000)), 0, t0),
            event: timer(TimerKind::Header, t(2000)),
            now: t(2000),
            to: state(header(t(2000)), 0, t0),
            actions: vec![Close(CloseReason::HeaderTimeout)],
        },
        Case {
            name: "a header timer of another deadline changes nothing",
            from: state(header(t(2000)), 0, t0),
            event: timer(TimerKind::Header, t(1000)),
            now: t(1000),
            to: state(header(t(2000)), 0, t0),
            actions: vec![],
        },
        Case {
            name: "a header timer after the header was read changes nothing",
            from: state(placing(&[], None), 0, t0),
            event: timer(TimerKind::Header, t(2000)),
            now: t(2000),
            to: state(placing(&[], None), 0, t0),
            actions: vec![],
        },
        Case {
            name: "closed while reading the header: nothing to give back",
            from: state(header(t(2000)), 0, t0),
            event: Event::Close(CloseReason::Refused),
            now: t(5),
            to: state(Phase::Closed, 0, t0),
            actions: vec![Remove],
        },
        Case {
            name: "HeaderDone outside the header phase changes nothing",
            from: state(connecting(1, 1, &[], t0), 1, t0),
            event: Event::HeaderDone,
            now: t(5),
            to: state(connecting(1, 1, &[], t0), 1, t0),
            actions: vec![],
        },
        Case {
            name: "Accepted again (not a new client) changes nothing",
            from: state(placing(&[1], None), 1, t0),
            event: Event::Accepted,
            now: t(5),
            to: state(placing(&[1], None), 1, t0),
            actions: vec![],
        },
    ];
    for case in cases {
        let mut state = case.from.clone();
        let actions = state.on(case.event, case.now, &with_header);
        assert_eq!(
            actions.as_slice(),
            &case.actions[..],
            "{}: actions",
            case.name
        );
        assert_eq!(state, case.to, "{}: state", case.name);
    }
    // Without --accept-proxy a new client is placed at once.
    let mut state = State::new(t0);
    let actions = state.on(Event::Accepted, t(1), &rules());
    assert_eq!(actions.as_slice(), &[Place]);
    assert_eq!(state, State::new(t0));
}

/// Feeds events in order, checking each one's actions.
fn feed(state: &mut State, steps: &[(Event, Instant, &[Action])]) {
    for (i, (event, now, expected)) in steps.iter().enumerate() {
        let actions = state.on(*event, *now, &rules());
        assert_eq!(actions.as_slice(), *expected, "step {i}: {event:?}");
    }
}

/// A client whose first connect times out, that waits in the queue (where a reload
/// forgets the backends it tried), and is placed again: the old connect timer and the old
/// queue timer never touch the new attempt, whose number is 2 although `tried` is empty.
#[test]
fn stale_timers_after_a_stay_in_the_queue() {
    use Action::*;
    let t0 = Instant::now();
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    let mut state = State::new(t0);
    feed(
        &mut state,
        &[
            (
                Event::ConnectStarted { index: 0 },
                t(0),
                &[ArmTimer {
                    kind: TimerKind::Connect { attempt: 1 },
                    at: t(5000),
                }],
            ),
            (
                Event::ConnectFailed,
                t(10),
                &[
                    ReleaseSlot(0),
                    CountFailure(0, Failure::Connect),
                    DropBackend,
                    Place,
                ],
            ),
            (Event::NoRoom, t(10), &[Enqueue]),
            (
                Event::Admitted,
                t(10),
                &[ArmTimer {
                    kind: TimerKind::Queue,
                    at: t(3010),
                }],
            ),
            (Event::Dequeued { fresh: true }, t(100), &[LeaveQueue]),
            (
                Event::ConnectStarted { index: 0 },
                t(100),
                &[ArmTimer {
                    kind: TimerKind::Connect { attempt: 2 },
                    at: t(5100),
                }],
            ),
            // The first attempt's timer, armed before the queue, fires: ignored.
            (
                timer(TimerKind::Connect { attempt: 1 }, t(5000)),
                t(5000),
                &[],
            ),
            // It fails; no room: queued afresh, with a new deadline.
            (
                Event::ConnectFailed,
                t(5010),
                &[
                    ReleaseSlot(0),
                    CountFailure(0, Failure::Connect),
                    DropBackend,
                    Place,
                ],
            ),
            (Event::NoRoom, t(5010), &[Enqueue]),
            (
                Event::Admitted,
                t(5010),
                &[ArmTimer {
                    kind: TimerKind::Queue,
                    at: t(8010),
                }],
            ),
            // The first stay's queue timer: ignored; this stay's closes it.
            (timer(TimerKind::Queue, t(3010)), t(5020), &[]),
            (
                timer(TimerKind::Queue, t(8010)),
                t(8010),
                &[Close(CloseReason::QueueTimeout)],
            ),
        ],
    );
    assert_eq!(state.tag(), Tag::Queued);
    assert_eq!(state.attempts, 2);
}

/// Without `--idle-timeout` or `--backend-timeout`, no timer of either is armed.
#[test]
fn timeouts_off_arm_nothing() {
    let t0 = Instant::now();
    let off = Rules {
        idle_timeout: None,
        backend_timeout: None,
        ..rules()
    };
    let mut s = state(connecting(1, 1, &[], t0), 1, t0);
    let actions = s.on(Event::Connected, t0 + MS, &off);
    assert_eq!(
        actions.as_slice(),
        &[
            Action::Established {
                index: 1,
                latency: MS
            },
            Action::Relay
        ]
    );
    let actions = s.on(Event::Relayed(run(10, 0)), t0 + 2 * MS, &off);
    assert_eq!(actions.as_slice(), &[]);
    let actions = s.on(timer(TimerKind::Idle, t0), t0 + 3600 * S, &off);
    assert_eq!(actions.as_slice(), &[]);
}

#[test]
fn session_log_labels() {
    let t0 = Instant::now();
    let backend_first = state(eof(relaying(t0, 1, 1), Side::Backend), 1, t0);
    assert_eq!(backend_first.end_label(CloseReason::Done), "backend-close");
    let client_first = state(eof(relaying(t0, 1, 1), Side::Client), 1, t0);
    assert_eq!(client_first.end_label(CloseReason::Done), "client-close");
    assert_eq!(
        client_first.end_label(CloseReason::NoBackend),
        "connect-failure"
    );
    assert_eq!(client_first.bytes(), (1, 1));
    assert_eq!(client_first.backend(), Some(1));
    assert_eq!(
        client_first.end_label(CloseReason::BadHeader),
        "proxy-header-error"
    );
    assert_eq!(
        client_first.end_label(CloseReason::HeaderTimeout),
        "proxy-header-timeout"
    );
    assert_eq!(client_first.end_label(CloseReason::Refused), "refused");
}

/// With `--tcp-keepalive`, a session that has relayed for `keepalive_after` has keepalive
/// turned on on its backend socket; one that ended before never does.
#[test]
fn keepalive_waits_until_the_session_proves_long_lived() {
    let t0 = Instant::now();
    let ka = Rules {
        keepalive_after: Some(30 * S),
        ..rules()
    };
    let mut s = state(connecting(1, 1, &[], t0), 1, t0);
    let actions = s.on(Event::Connected, t0 + MS, &ka);
    assert_eq!(
        actions.as_slice(),
        &[
            Action::Established {
                index: 1,
                latency: MS
            },
            Action::ArmTimer {
                kind: TimerKind::Idle,
                at: t0 + MS + 30 * S
            },
            Action::Relay
        ],
        "no keepalive at the connect; the idle timer's first look comes when it is due"
    );
    // Bytes moved at 20 s; at 30 s keepalive goes on, and the idle timer goes on to the
    // deadline the session has by then.
    s.on(Event::Relayed(run(10, 0)), t0 + 20 * S, &ka);
    let fired = s.on(timer(TimerKind::Idle, t0 + MS + 30 * S), t0 + 31 * S, &ka);
    assert_eq!(
        fired.as_slice(),
        &[
            Action::KeepAlive,
            Action::ArmTimer {
                kind: TimerKind::Idle,
                at: t0 + 80 * S
            }
        ]
    );
    // That later look is only an idle check.
    let fired = s.on(timer(TimerKind::Idle, t0 + 80 * S), t0 + 81 * S, &ka);
    assert_eq!(fired.as_slice(), &[Action::Close(CloseReason::IdleTimeout)]);
    // Without an idle timeout, or with one shorter than the wait, keepalive has its own timer.
    for (idle, idle_timer) in [(None, None), (Some(20 * S), Some(t0 + 20 * S))] {
        let rules = Rules {
            idle_timeout: idle,
            backend_timeout: None,
            ..ka
        };
        let mut s = state(connecting(1, 1, &[], t0), 1, t0);
        let mut want = vec![Action::Established {
            index: 1,
            latency: Duration::ZERO,
        }];
        if let Some(at) = idle_timer {
            want.push(Action::ArmTimer {
                kind: TimerKind::Idle,
                at,
            });
        }
        want.push(Action::ArmTimer {
            kind: TimerKind::KeepAlive,
            at: t0 + 30 * S,
        });
        want.push(Action::Relay);
        assert_eq!(
            s.on(Event::Connected, t0, &rules).as_slice(),
            want.as_slice()
        );
        let fired = s.on(
            timer(TimerKind::KeepAlive, t0 + 30 * S),
            t0 + 30 * S,
            &rules,
        );
        assert_eq!(fired.as_slice(), &[Action::KeepAlive]);
    }
    // A session that has ended by then (lingering, closed) is left alone.
    let mut ended = state(lingering(t0 + 40 * S, false, false), 1, t0);
    let fired = ended.on(timer(TimerKind::KeepAlive, t0 + 30 * S), t0 + 30 * S, &ka);
    assert_eq!(fired.as_slice(), &[]);
    let mut closed = state(Phase::Closed, 1, t0);
    let fired = closed.on(timer(TimerKind::KeepAlive, t0 + 30 * S), t0 + 30 * S, &ka);
    assert_eq!(fired.as_slice(), &[]);
}

#[test]
fn keepalive_is_turned_on_at_half_its_idle_time() {
    assert_eq!(
        crate::session::events::keepalive_after(Some(60 * S)),
        Some(30 * S)
    );
    assert_eq!(crate::session::events::keepalive_after(None), None);
}
