//! The one health thread: every service's checks run on it, on one `mio::Poll`.
//!
//! Each service keeps its own [`Health`] (its backends, probes, commands and published set);
//! what they share is this thread, its poll and its waker. A probe's token carries the slot
//! of its service above [`PROBE_BITS`] and its probe's key below, so one poll serves them
//! all. A service joins with [`HealthThread::add`] (at start, or when a reload adds it) and
//! leaves when it takes its `Command::Shutdown`; the thread ends once the last
//! [`HealthThread`] handle is gone and every service has left. Adding services adds no
//! thread.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::{Events, Poll, Token, Waker};
use slab::Slab;

use super::Health;

/// Wakes the thread: a command for some service, a service to add, or the handle dropped.
const WAKER: Token = Token(0);
/// A probe's key (plus one) fits below this many bits of its token; the service's slot sits
/// above. Probe keys stay under [`super::MAX_PROBES_IN_FLIGHT`].
pub(super) const PROBE_BITS: u32 = 16;
const _: () = assert!(super::MAX_PROBES_IN_FLIGHT < 1 << PROBE_BITS);

/// The token of probe `key` of the service in `slot`.
pub(super) fn probe_token(slot: usize, key: usize) -> Token {
    Token((slot << PROBE_BITS) | (key + 1))
}

/// The service slot and probe key a token names (`None` for the waker).
fn split(token: Token) -> Option<(usize, usize)> {
    let low = token.0 & ((1 << PROBE_BITS) - 1);
    (low != 0).then(|| (token.0 >> PROBE_BITS, low - 1))
}

/// A handle on the running health thread: adds services to it. Dropping the last one lets
/// the thread end once every service has shut down.
pub(crate) struct HealthThread {
    adds: Option<Sender<Health>>,
    waker: Arc<Waker>,
}

impl HealthThread {
    /// Starts the thread (named `holdfast-health`) with no service yet.
    pub(crate) fn spawn() -> io::Result<(HealthThread, JoinHandle<()>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("holdfast-health".into())
            .spawn(move || run(poll, rx))?;
        Ok((
            HealthThread {
                adds: Some(tx),
                waker,
            },
            thread,
        ))
    }

    /// The waker a service's [`HealthLink`](crate::plane::HealthLink) rings with each command.
    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Hands a service's checks to the thread, which runs them from its next turn.
    pub(crate) fn add(&self, health: Health) -> io::Result<()> {
        let sent = self.adds.as_ref().is_some_and(|tx| tx.send(health).is_ok());
        if !sent {
            return Err(io::Error::other("the health thread has stopped"));
        }
        self.waker.wake()
    }
}

impl Drop for HealthThread {
    fn drop(&mut self) {
        // Disconnect first, then wake: the thread must see the channel closed when it looks.
        drop(self.adds.take());
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the health thread: {e}");
        }
    }
}

fn run(mut poll: Poll, adds: Receiver<Health>) {
    let mut services: Slab<Health> = Slab::new();
    let mut events = Events::with_capacity(256);
    let mut closing = false;
    let mut woken = true;
    loop {
        let now = Instant::now();
        if woken {
            loop {
                match adds.try_recv() {
                    Ok(mut health) => {
                        let slot = services.vacant_entry();
                        health.slot = slot.key();
                        slot.insert(health);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closing = true;
                        break;
                    }
                }
            }
            // A command may be for any service: each looks at its own channel.
            services.retain(|_, health| !health.take_commands(now));
        }
        for (_, health) in services.iter_mut() {
            health.turn(now, poll.registry());
        }
        if closing && services.is_empty() {
            return;
        }
        let timeout = services
            .iter()
            .filter_map(|(_, health)| health.next_deadline())
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                woken = false;
                continue;
            }
            log::error!("health thread: poll failed: {e}; health checks stop");
            return;
        }
        woken = false;
        let now = Instant::now();
        for event in events.iter() {
            match split(event.token()) {
                None => woken = true,
                Some((slot, key)) => {
                    if let Some(health) = services.get_mut(slot) {
                        health.advance_probe(key, now);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_token_names_its_service_and_probe() {
        for slot in [0, 1, 7, 1000] {
            for key in [0, 1, super::super::MAX_PROBES_IN_FLIGHT - 1] {
                let token = probe_token(slot, key);
                assert_ne!(token, WAKER);
                assert_eq!(split(token), Some((slot, key)));
            }
        }
        assert_eq!(split(WAKER), None);
    }
}
