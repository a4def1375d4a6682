//! Events to sessions, and their actions carried out.
//!
//! A readiness event, a timer or a finished piece of I/O becomes an [`Event`] for the
//! session's [`State`](crate::session::State), which answers with [`Action`]s; [`Worker::apply`]
//! carries them out on the worker's shared resources (poller, timers, queue, pools,
//! counters) and the session's sockets. Closing is here too: it counts and logs the session,
//! then lets its state say what to give back.

use std::sync::atomic::Ordering::Relaxed;

use super::Worker;
use crate::session::{Action, Actions, CloseReason, Event, HeaderRead, Tag};
use crate::timer::{Timer, TimerKind};
use crate::token::Side;

impl Worker {
    /// A readiness event for a session's socket: recorded in its readiness flags, then
    /// handed to its state.
    pub(super) fn handle_event(&mut self, key: usize, side: Side, event: &mio::event::Event) {
        if self.batches.is_frozen(key) {
            return; // deregistered in this turn: it is marked ready when resumed
        }
        let Some(session) = self.sessions.get_mut(key) else {
            return; // an event for a session closed earlier in this turn
        };
        let Some(ready) = session.ready_mut(side) else {
            return;
        };
        // Errors and hang-ups are surfaced by the next read or write, which is where they are
        // handled; marking the socket ready makes sure that call happens.
        let failed = event.is_error();
        ready.readable |= event.is_readable() || event.is_read_closed() || failed;
        ready.writable |= event.is_writable() || event.is_write_closed() || failed;
        ready.hung_up |= event.is_read_closed() || failed;
        ready.error |= failed;
        let hung_up = failed || event.is_read_closed();
        let readiness = Event::Ready {
            side,
            hung_up,
            plain_writable: event.is_writable() && !hung_up && !event.is_write_closed(),
        };
        let actions = session.state.on(
            readiness,
            self.now,
            &self.services[usize::from(session.service)].rules,
        );
        self.apply(key, actions);
    }

    /// Carries out a session's actions, in order. Once the session is gone (closed, or its
    /// lingering ended), what is left concerned it only and is dropped.
    pub(super) fn apply(&mut self, key: usize, actions: Actions) {
        let Some(id) = self.sessions.get(key).map(|s| s.id) else {
            return;
        };
        for action in actions {
            let Some(session) = self.sessions.get_mut(key).filter(|s| s.id == id) else {
                return;
            };
            match action {
                Action::ArmTimer { kind, at } => self.timers.push(Timer { at, key, id, kind }),
                Action::ReadHeader => self.read_header(key),
                Action::Place => {
                    self.place(key);
                }
                Action::Enqueue => self.enqueue(key),
                Action::Requeue => count!(self, usize::from(session.service), queued),
                Action::LeaveQueue => count!(self, usize::from(session.service), queued, -),
                Action::ReleaseSlot(index) => session.set.backends[index].stats.release(),
                Action::CountFailure(index, failure) => {
                    let backend = &session.set.backends[index];
                    self.services[usize::from(session.service)]
                        .placer
                        .backend_failed(backend, failure);
                }
                Action::ResetStreak(index) => session.set.backends[index].stats.reset_streak(),
                Action::DropBackend => session.drop_backend(),
                Action::Established { index, latency } => {
                    session.set.backends[index]
                        .stats
                        .record_established(latency);
                    let config = &self.services[usize::from(session.service)].config;
                    session.start_relay(
                        config.relay,
                        config.tcp_user_timeout,
                        config.client_ip.send_proxy,
                    );
                }
                Action::KeepAlive => {
                    let config = &self.services[usize::from(session.service)].config;
                    session.keep_alive(config.tcp_keepalive);
                }
                Action::CheckConnect { plain_writable } => self.check_connect(key, plain_writable),
                Action::CheckClient { eof_is_gone } => {
                    if let Some(reason) = session.client_left(eof_is_gone) {
                        log::debug!("client {} left while waiting", session.client_addr);
                        self.close(key, reason);
                    }
                }
                // A session waiting to run again (it used its budget) runs once this turn,
                // in `run_again`, with this readiness too: a bulk stream gets one budget a
                // turn, not one per event.
                Action::Relay if session.scheduled => {}
                Action::Relay => self.relay(key),
                Action::RunAgain => {
                    if !session.scheduled {
                        session.scheduled = true;
                        self.again.push(key);
                    }
                }
                Action::Close(reason) => self.close(key, reason),
                Action::ShutdownWrites => session.shutdown_writes(),
                Action::Linger { client, backend } => {
                    let (client_done, backend_done) =
                        session.linger(&mut self.pools, client, backend);
                    let lingered = Event::Lingered {
                        client_done,
                        backend_done,
                    };
                    let actions = session.state.on(
                        lingered,
                        self.now,
                        &self.services[usize::from(session.service)].rules,
                    );
                    self.apply(key, actions);
                }
                // Dropping a mio socket closes it and removes it from the poller.
                Action::Remove => drop(self.sessions.try_remove(key)),
            }
        }
    }

    /// Runs both pumps of a relaying session. The hot path: the byte counters are added here
    /// directly, and the state's answer is usually no action at all (no allocation either
    /// way).
    pub(super) fn relay(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let Some(run) = session.relay(&mut self.pools) else {
            return;
        };
        if run.up + run.down > 0 {
            let own = &self.services[usize::from(session.service)].counters;
            if run.up > 0 {
                self.counters
                    .bytes_client_to_backend
                    .fetch_add(run.up, Relaxed);
                own.bytes_client_to_backend.fetch_add(run.up, Relaxed);
            }
            if run.down > 0 {
                self.counters
                    .bytes_backend_to_client
                    .fetch_add(run.down, Relaxed);
                own.bytes_backend_to_client.fetch_add(run.down, Relaxed);
            }
            if let Some(index) = session.state.backend() {
                session.set.backends[index]
                    .stats
                    .add_bytes(run.up, run.down);
            }
        }
        let actions = session.state.on(
            Event::Relayed(run),
            self.now,
            &self.services[usize::from(session.service)].rules,
        );
        self.apply(key, actions);
    }

    /// Looks for a client's PROXY header. Once it is read, the client's address (and the
    /// address it connected to) are the header's from then on (a `LOCAL` header or an
    /// unknown family keeps the connection's own), and that address is what is admitted.
    fn read_header(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let event = match session.read_header() {
            HeaderRead::Pending => return,
            HeaderRead::Invalid(reason) => {
                let (addr, service) = (session.client_addr, usize::from(session.service));
                self.proxy_header_error(service, addr, reason);
                Event::HeaderFailed
            }
            HeaderRead::Done(header) => {
                if let Some((source, destination)) = header.addresses {
                    session.client_addr = source;
                    session.set_local_addr(destination);
                }
                session.set_tlvs(header.tlvs);
                let (addr, service) = (session.client_addr, usize::from(session.service));
                match self.admit(service, addr) {
                    Ok(ticket) => {
                        if let Some(session) = self.sessions.get_mut(key) {
                            session.set_ticket(ticket);
                        }
                        Event::HeaderDone
                    }
                    Err(()) => {
                        self.close(key, CloseReason::Refused);
                        return;
                    }
                }
            }
        };
        if let Some(session) = self.sessions.get_mut(key) {
            let actions = session.state.on(
                event,
                self.now,
                &self.services[usize::from(session.service)].rules,
            );
            self.apply(key, actions);
        }
    }

    /// The backend socket of a connecting session is writable: did the connect succeed?
    fn check_connect(&mut self, key: usize, plain_writable: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let event = match session.connect_result(plain_writable) {
            None => return,
            Some(Ok(())) => Event::Connected,
            Some(Err(e)) => {
                if let Some(index) = session.state.backend() {
                    let addr = session.set.backends[index].spec.addr;
                    log::debug!("connect to {addr} failed: {e}");
                }
                Event::ConnectFailed
            }
        };
        let actions = session.state.on(
            event,
            self.now,
            &self.services[usize::from(session.service)].rules,
        );
        self.apply(key, actions);
    }

    pub(super) fn run_again(&mut self) {
        let keys = std::mem::take(&mut self.again);
        for &key in &keys {
            if let Some(session) = self.sessions.get_mut(key) {
                session.scheduled = false;
                // A frozen session is run when resumed.
                if !self.batches.is_frozen(key) {
                    self.relay(key);
                }
            }
        }
        // Reuse the allocation when nothing was queued meanwhile.
        if self.again.is_empty() {
            self.again = keys;
            self.again.clear();
        }
    }

    pub(super) fn fire_timers(&mut self) {
        if self.timers.needs_compaction() {
            // Drop the entries of closed sessions (see timer.rs). A live session keeps all of
            // its entries; ones armed for an earlier attempt are few and expire soon.
            let sessions = &self.sessions;
            self.timers.compact(|t| {
                matches!(
                    t.kind,
                    TimerKind::DrainDeadline
                        | TimerKind::RebalanceTick
                        | TimerKind::ServiceDeadline
                ) || sessions.get(t.key).is_some_and(|s| s.id == t.id)
            });
        }
        while let Some(timer) = self.timers.pop_expired(self.now) {
            if timer.kind == TimerKind::DrainDeadline {
                self.drain_deadline();
                continue;
            }
            if timer.kind == TimerKind::ServiceDeadline {
                self.service_deadline(timer.id);
                continue;
            }
            if timer.kind == TimerKind::RebalanceTick {
                self.rebalance_tick(timer.id);
                continue;
            }
            let Some(session) = self.sessions.get_mut(timer.key) else {
                continue;
            };
            if session.id != timer.id {
                continue; // the session it was armed for is gone
            }
            if self.batches.is_frozen(timer.key) {
                self.batches.hold(timer); // armed again if the session is resumed
                continue;
            }
            if let TimerKind::Connect { attempt } = timer.kind
                && session.state.connect_attempt() == Some(attempt)
                && let Some(index) = session.state.backend()
            {
                let addr = session.set.backends[index].spec.addr;
                log::debug!("connect to {addr} timed out");
            }
            let fired = Event::Timer {
                kind: timer.kind,
                at: timer.at,
            };
            let actions = session.state.on(
                fired,
                self.now,
                &self.services[usize::from(session.service)].rules,
            );
            self.apply(timer.key, actions);
        }
    }

    /// Ends a session: its pipes and buffers go back to the pools, a reset is passed on, it
    /// is counted and logged, and its state says what else to give back and whether its
    /// sockets close now or linger (a close holdfast decided ends with a FIN).
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        // A lingering session was counted and logged when it closed; it only drops its
        // sockets now.
        if session.state.tag() != Tag::Lingering {
            session.release(&mut self.pools);
            // Its place under the per-IP limits is given back now, not after lingering.
            if let Some(ticket) = session.take_ticket() {
                ticket.close(self.now);
            }
            let s = usize::from(session.service);
            if let CloseReason::Reset(side) = reason
                && session.pass_reset(side)
            {
                count!(self, s, resets);
            }
            match reason {
                CloseReason::IdleTimeout => count!(self, s, idle_timeouts),
                CloseReason::BackendTimeout => count!(self, s, backend_timeouts),
                CloseReason::QueueTimeout => count!(self, s, queue_timeouts),
                CloseReason::Drain => count!(self, s, closed_by_drain),
                CloseReason::MaxAge => count!(self, s, sessions_closed_by_age),
                _ => {}
            }
            let (client_addr, id, service) = (session.client_addr, session.id, session.service);
            let log_sessions = self.services[usize::from(session.service)]
                .config
                .log_sessions;
            if reason == CloseReason::HeaderTimeout {
                self.proxy_header_error(s, client_addr, "timeout");
            }
            if log_sessions {
                self.log_session(key, reason);
            } else {
                log::debug!("session {id} from {client_addr} closed: {reason:?}");
            }
            count!(self, usize::from(service), active, -);
            count!(self, usize::from(service), closed);
        }
        if let Some(session) = self.sessions.get_mut(key) {
            let actions = session.state.on(
                Event::Close(reason),
                self.now,
                &self.services[usize::from(session.service)].rules,
            );
            self.apply(key, actions);
        }
    }

    /// The L4 equivalent of HAProxy's tcplog: who, through which listener, to which backend,
    /// for how long, how many bytes each way, and how it ended.
    fn log_session(&self, key: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get(key) else {
            return;
        };
        let backend = session.state.backend().map_or_else(
            || "-".to_string(),
            |index| session.set.backends[index].spec.addr.to_string(),
        );
        let (up, down) = session.state.bytes();
        let listen = self
            .listen_addrs
            .get(session.listener)
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        log::info!(
            target: "holdfast::session",
            "session client={} listen={listen} backend={backend} duration={:.3}s \
             bytes_client_to_backend={up} bytes_backend_to_client={down} end={}",
            session.client_addr,
            self.now.saturating_duration_since(session.started).as_secs_f64(),
            session.state.end_label(reason),
        );
    }
}
