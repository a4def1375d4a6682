//! Shared helpers: fake backends on real loopback sockets, clients bound to chosen source IPs,
//! polling waits, deterministic data, the balancer in process and the real `holdfast` binary.
//!
//! Rules the helpers enforce so that a broken balancer fails a test instead of hanging it:
//! every client socket has read and write timeouts ([`IO_TIMEOUT`] unless a test asks for
//! less), every wait is a bounded poll ([`wait_until`]), and every fake backend stops and
//! closes its listener when dropped, so its port refuses afterwards.
//!
//! One module per concern; test modules `use crate::util::*` and find every helper here,
//! re-exported under `util::NAME`:
//!
//! | module | what |
//! |---|---|
//! | `wait` | bounded polls for a condition; the one sleep, for when there is none |
//! | `client` | client sockets from chosen source IPs; reads, echoes, closes, tags |
//! | `backends` | fake backends: echo, tagged, silent, reset, blackhole (a hung listener), one-shot, scripted, closed port |
//! | `counting` | the counting echo backend (peak open, arrival times), for pacing and caps |
//! | `websocket` | a real WebSocket server, and the EINTR wrapper tungstenite needs |
//! | `balancer` | the balancer in process: config, start, per-backend stats and states |
//! | `binary` | the real `holdfast` binary: a guard for a running one (quiet, `ulimit -n`), a run, its descriptors, temp files |
//! | `data` | deterministic test data and its digest |
//!
//! A new helper goes into the module of its concern and gets a `pub use` line here. Building
//! blocks for a new fake backend ([`backends::Server`]'s `start`, `echo_loop`, `backend_read`,
//! `port_guard`) and [`lock`] are visible to util's modules, not to the tests.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

mod backends;
mod balancer;
mod binary;
mod client;
mod counting;
mod data;
mod wait;
mod websocket;

pub use backends::{
    BlackholeBackend, ClosedPort, EchoBackend, OneShotBackend, ResetBackend, ScriptedBackend,
    SilentBackend, TaggedBackend, closed_port, hung_listener,
};
pub use balancer::{
    backend_stat, backend_state, config, effective_weight, lb_addr, passive_failures,
    start_balancer, wait_for_state,
};
pub use binary::{Child, TempFile, fd_count, pipe_fds, run_binary};
pub use client::{
    Closed, Pending, client, client_from, connect_refused, connect_tagged, count_tag, echo_stream,
    expect_closed, localhost0, pending, read_line, reset, round_trip, set_timeouts,
    tags_of_new_clients, try_client_from, visit_tagged,
};
pub use counting::{CountingBackend, busiest_window};
pub use data::{random_bytes, sha256_hex, shared_random};
pub use wait::{sleep_until, wait_refused, wait_until, wait_until_ok};
pub use websocket::{NoEintr, WebSocketBackend};

/// Read/write timeout on every client socket: generous, but never forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a fake backend's connection thread blocks in one read before it checks whether
/// the backend was dropped. Held-idle connections are kept open across these wake-ups.
const BACKEND_READ_TICK: Duration = Duration::from_millis(500);

/// Locks, ignoring poison: a panicking test must not turn a backend's `Drop` into a second
/// panic (which would abort the whole test process).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
