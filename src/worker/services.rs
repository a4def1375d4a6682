//! Services added and removed while running (a reload of a `--config` file): a new service's
//! listeners join this worker's (its number is the next one), and a removed service's
//! listeners close at once while its sessions drain with the usual timeouts.
//!
//! A removed service keeps its number and its `Served` (its sessions still use its settings
//! and its last backend set until they end); numbers are never reused.

use std::time::Duration;

use mio::Interest;

use super::{Served, ServiceInit, Worker};
use crate::session::Tag;
use crate::timer::{Timer, TimerKind};
use crate::token::{MAX_LISTENERS, Target};

impl Worker {
    /// Serves a new service as number `number` on `start`'s listeners (the ones of this
    /// worker). During a drain the listeners are closed at once: nothing new is accepted.
    pub(super) fn add_service(&mut self, number: usize, start: ServiceInit) {
        if number != self.services.len() {
            log::error!(
                "worker {}: service {number} added, expected {}; not served here",
                self.id,
                self.services.len()
            );
            return;
        }
        let Ok(tag) = u16::try_from(number) else {
            log::error!("worker {}: more than 65536 services; not served", self.id);
            return;
        };
        let (served, listeners) = Served::new(self.id, start, &self.counters);
        self.services.push(served);
        if self.draining {
            return;
        }
        for mut listener in listeners {
            let addr = match listener.local_addr() {
                Ok(addr) => addr,
                Err(e) => {
                    log::warn!("worker {}: a new listener: {e}; not served", self.id);
                    continue;
                }
            };
            // A free slot (a removed service's), or a new one.
            let slot = match self.listeners.iter().position(Option::is_none) {
                Some(i) if self.listeners.len() >= MAX_LISTENERS => i,
                _ if self.listeners.len() < MAX_LISTENERS => {
                    self.listeners.push(None);
                    self.listener_ready.push(false);
                    self.listener_service.push(tag);
                    self.listen_addrs.push(addr);
                    self.listeners.len() - 1
                }
                _ => {
                    log::error!(
                        "worker {}: {MAX_LISTENERS} listeners already; {addr} not served",
                        self.id
                    );
                    continue;
                }
            };
            if !self.listeners_given
                && let Err(e) = self.poll.registry().register(
                    &mut listener,
                    Target::Listener(slot).token(),
                    Interest::READABLE,
                )
            {
                log::warn!("worker {}: cannot register {addr}: {e}", self.id);
                continue;
            }
            self.listeners[slot] = Some(listener);
            // Clients may have connected before it was registered.
            self.listener_ready[slot] = true;
            self.listener_service[slot] = tag;
            self.listen_addrs[slot] = addr;
        }
    }

    /// Stops serving service `number`: what its listeners' backlogs hold is taken (those
    /// clients connected before the reload), then they close; its sessions go on until
    /// `timeout`, then the rest are closed over `spread`.
    pub(super) fn remove_service(&mut self, number: usize, timeout: Duration, spread: Duration) {
        let Ok(tag) = u16::try_from(number) else {
            return;
        };
        if let Some(served) = self.services.get_mut(number) {
            served.removed = true;
        }
        for i in 0..self.listeners.len() {
            if self.listener_service[i] != tag || self.listeners[i].is_none() {
                continue;
            }
            if !self.listeners_given {
                self.accept_from(i);
            }
            if let Some(mut listener) = self.listeners[i].take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            self.listener_ready[i] = false;
        }
        if self.draining {
            return; // the drain's own deadline closes everything
        }
        self.timers.push(Timer {
            at: self.now + timeout,
            key: usize::MAX,
            id: number as u64,
            kind: TimerKind::ServiceDeadline,
        });
        self.removed_spread = spread;
    }

    /// A removed service's drain timeout passed: its sessions left here are closed over
    /// `--close-spread`.
    pub(super) fn service_deadline(&mut self, number: u64) {
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| u64::from(s.service) == number && s.state.tag() != Tag::Lingering)
            .map(|(k, _)| k)
            .collect();
        if !keys.is_empty() {
            log::info!(
                "worker {}: removed service's drain timeout; closing {} session(s) over {:?}",
                self.id,
                keys.len(),
                self.removed_spread
            );
        }
        self.schedule_closes(keys, self.now, self.removed_spread);
    }
}
