//! The one DNS thread: re-resolves every service's `--backend-dns` names, each service every
//! its own `--dns-interval`.
//!
//! It starts with the first service that names DNS backends (at start or when a reload adds
//! one), so a process without them has no such thread, and services added later add none.
//! Resolving blocks (the system resolver), so services are refreshed one after the other;
//! a refresh that fails keeps the last answer.

use std::io;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::control::Controller;

enum Message {
    /// Refresh this service (a handle on it) from one interval on.
    Add(Controller),
    /// Stop refreshing service number N (a reload removed it).
    Remove(usize),
}

/// A handle on the DNS thread. Dropping it stops the thread after the refresh under way.
pub(crate) struct DnsThread {
    tx: Sender<Message>,
}

impl DnsThread {
    pub(crate) fn spawn() -> io::Result<(DnsThread, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("holdfast-dns".into())
            .spawn(move || run(rx))?;
        Ok((DnsThread { tx }, thread))
    }

    /// Refreshes `control`'s service every its `--dns-interval` from now on.
    pub(crate) fn add(&self, control: Controller) {
        // The thread only ends once this handle is dropped.
        let _ = self.tx.send(Message::Add(control));
    }

    /// Stops refreshing service `number`.
    pub(crate) fn remove(&self, number: usize) {
        let _ = self.tx.send(Message::Remove(number));
    }
}

fn run(rx: Receiver<Message>) {
    // Each service with the time of its next refresh.
    let mut services: Vec<(Instant, Controller)> = Vec::new();
    loop {
        let next = services.iter().map(|(at, _)| *at).min();
        let message = match next {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match message {
            Ok(Message::Add(control)) => {
                services.push((Instant::now() + control.config().dns_interval, control));
            }
            Ok(Message::Remove(number)) => services.retain(|(_, c)| c.number() != number),
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                for (at, control) in &mut services {
                    let now = Instant::now();
                    if *at > now {
                        continue;
                    }
                    for e in control.refresh_dns() {
                        log::warn!("{e}; keeping the last answer");
                    }
                    *at = now + control.config().dns_interval;
                }
            }
        }
    }
}
