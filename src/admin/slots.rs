//! The admin endpoint's connection slots, and which connection gives its slot up when they
//! are all taken.
//!
//! A client that connects and never finishes its request (a slowloris) must not keep the
//! others out, and one that keeps reconnecting must not either. So when every slot is taken,
//! a new connection is let in and an old one is closed in its place: of the connections
//! *waiting on their client* (for a request, or the rest of one), one from the peer address
//! that has the most of them, and of those the one that has waited longest. A connection
//! whose request is being answered is never closed for another; only when every connection is
//! being answered is the new one turned away.
//!
//! The rule favours the newcomer: a scrape that sends its request at once is answered even
//! while the house is full of connections that send nothing, and one peer's flood costs other
//! peers nothing. A flood from the scraper's own address can still close a scrape's connection
//! before its request arrives, but only by opening as many connections as there are slots in
//! that time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::oneshot;

/// The slots, shared by the accept loop and the connections.
pub(super) struct Slots {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

struct Entry {
    peer: IpAddr,
    /// Since when the connection has been waiting on its client; `None` while a request of
    /// its is being answered.
    waiting_since: Option<Instant>,
    /// Dropping it tells the connection to close.
    _close: oneshot::Sender<()>,
}

/// What [`Slots::admit`] decided for a new connection.
pub(super) enum Admission {
    /// The connection has a slot. `closed_other` says whether another connection was closed
    /// to make room; `close` resolves when this one must close in turn.
    Admitted {
        slot: Slot,
        close: oneshot::Receiver<()>,
        closed_other: bool,
    },
    /// Every connection is being answered: the new one is turned away.
    Full,
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Slots> {
        Arc::new(Slots {
            capacity,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives a new connection from `peer` a slot, closing a waiting one if they are all taken
    /// (see the module's documentation for which).
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Admission {
        let mut inner = self.lock();
        let mut closed_other = false;
        if inner.open.len() >= self.capacity {
            match victim(&inner.open) {
                Some(id) => {
                    // Dropping the entry drops its sender: the connection closes.
                    inner.open.remove(&id);
                    closed_other = true;
                }
                None => return Admission::Full,
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = oneshot::channel();
        inner.open.insert(
            id,
            Entry {
                peer,
                waiting_since: Some(now),
                _close: tx,
            },
        );
        Admission::Admitted {
            slot: Slot {
                slots: Arc::clone(self),
                id,
            },
            close: rx,
            closed_other,
        }
    }

    /// Connections holding a slot.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().open.len()
    }
}

/// The waiting connection to close: from the peer with the most waiting connections, the one
/// that has waited longest. Ties go to the earlier connection.
fn victim(open: &HashMap<u64, Entry>) -> Option<u64> {
    let mut waiting_per_peer: HashMap<IpAddr, usize> = HashMap::new();
    for entry in open.values() {
        if entry.waiting_since.is_some() {
            *waiting_per_peer.entry(entry.peer).or_default() += 1;
        }
    }
    open.iter()
        .filter_map(|(&id, e)| e.waiting_since.map(|since| (id, e.peer, since)))
        .max_by_key(|&(id, peer, since)| {
            (
                waiting_per_peer.get(&peer).copied().unwrap_or(0),
                std::cmp::Reverse(since),
                std::cmp::Reverse(id),
            )
        })
        .map(|(id, _, _)| id)
}

/// One connection's slot; dropping it frees the slot.
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slot {
    /// A handle that marks the connection busy while a request is answered.
    pub fn tracker(&self) -> Tracker {
        Tracker {
            slots: Arc::clone(&self.slots),
            id: self.id,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Already gone if this connection was closed to make room for another.
        self.slots.lock().open.remove(&self.id);
    }
}

/// See [`Slot::tracker`].
#[derive(Clone)]
pub(super) struct Tracker {
    slots: Arc<Slots>,
    id: u64,
}

impl Tracker {
    /// The connection's request is being answered until the guard is dropped; it then waits
    /// on its client again, from that moment.
    pub fn busy(&self) -> Busy {
        self.set_waiting_since(None);
        Busy {
            tracker: self.clone(),
        }
    }

    fn set_waiting_since(&self, since: Option<Instant>) {
        if let Some(entry) = self.slots.lock().open.get_mut(&self.id) {
            entry.waiting_since = since;
        }
    }
}

/// See [`Tracker::busy`].
pub(super) struct Busy {
    tracker: Tracker,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.tracker.set_waiting_since(Some(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    struct Admitted {
        slot: Slot,
        close: oneshot::Receiver<()>,
        closed_other: bool,
    }

    impl Admitted {
        fn closed(&mut self) -> bool {
            self.close.try_recv() != Err(oneshot::error::TryRecvError::Empty)
        }
    }

    #[track_caller]
    fn admit(slots: &Arc<Slots>, peer: &str, at: Instant) -> Admitted {
        match slots.admit(ip(peer), at) {
            Admission::Admitted {
                slot,
                close,
                closed_other,
            } => Admitted {
                slot,
                close,
                closed_other,
            },
            Admission::Full => panic!("{peer} turned away"),
        }
    }

    #[test]
    fn a_full_house_closes_the_longest_waiting_connection() {
        let slots = Slots::new(3);
        // In the past: a connection done with a request waits again from `Instant::now()`.
        let t0 = Instant::now()
            .checked_sub(Duration::from_secs(100))
            .expect("a clock that has run for 100 s");
        let s = |n| t0 + Duration::from_secs(n);
        let mut a = admit(&slots, "127.0.0.1", s(0));
        let mut b = admit(&slots, "127.0.0.1", s(1));
        let mut c = admit(&slots, "127.0.0.1", s(2));
        assert!(!a.closed_other && !b.closed_other && !c.closed_other);
        // A is answering a request: B has waited longest.
        let busy = a.slot.tracker().busy();
        let mut d = admit(&slots, "127.0.0.1", s(3));
        assert!(d.closed_other);
        assert!(!a.closed() && b.closed() && !c.closed() && !d.closed());
        assert_eq!(slots.len(), 3);
        // B's slot was taken from it: dropping it frees nothing more.
        drop(b);
        assert_eq!(slots.len(), 3);
        // A is done: it waits again from now, after C and D.
        drop(busy);
        let e = admit(&slots, "127.0.0.1", s(4));
        assert!(e.closed_other && c.closed() && !a.closed() && !d.closed());
        // A connection that closes on its own frees its slot.
        drop(d);
        let f = admit(&slots, "127.0.0.1", s(5));
        assert!(!f.closed_other);
        assert!(!a.closed());
    }

    #[test]
    fn the_peer_with_the_most_waiting_connections_gives_one_up() {
        let slots = Slots::new(4);
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut scraper = admit(&slots, "10.0.0.1", s(0));
        let mut flood: Vec<Admitted> = (1..=3).map(|n| admit(&slots, "10.0.0.2", s(n))).collect();
        // The scraper has waited longest, but its peer has one waiting connection, the other
        // three: the flood's oldest goes.
        let mut next = admit(&slots, "10.0.0.2", s(10));
        assert!(next.closed_other);
        assert!(!scraper.closed());
        assert!(flood[0].closed() && !flood[1].closed() && !flood[2].closed());
        assert!(!next.closed());
        // One of the flood's connections closes on its own, the scraper opens a second: two
        // waiting each, and the longest waiting of all goes, the scraper's first.
        flood.remove(1);
        let second = admit(&slots, "10.0.0.1", s(11));
        assert!(!second.closed_other);
        let _other = admit(&slots, "10.0.0.3", s(12));
        assert!(scraper.closed());
        assert!(!flood[1].closed() && !next.closed());
    }

    #[test]
    fn when_every_connection_is_answered_the_new_one_is_turned_away() {
        let slots = Slots::new(2);
        let now = Instant::now();
        let a = admit(&slots, "127.0.0.1", now);
        let b = admit(&slots, "127.0.0.1", now);
        let busy = [a.slot.tracker().busy(), b.slot.tracker().busy()];
        assert!(matches!(slots.admit(ip("127.0.0.1"), now), Admission::Full));
        drop(busy);
        assert!(admit(&slots, "127.0.0.1", now).closed_other);
    }
}
