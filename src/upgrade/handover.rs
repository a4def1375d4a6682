//! The handover protocol: both ends of the UNIX socket, as two drivers over traits, so that
//! the ordering and the two-phase commit are tested without a worker (the worker implements
//! [`Giver`] in the old process and [`Taker`] in the new one).
//!
//! ```text
//! old (give)                                  new (take)
//!  hello(version, pid) ─────────────────────► version understood, configuration valid?
//!  ◄───────────────────────────── ready | refuse(why)     (refuse: old keeps everything)
//!  backends(state) ─────────────────────────► kept for its balancer's first set
//!  listeners + fds ─────────────────────────► registers them, accepts from now on
//!  ◄──────────────────────────────────── accepting        old stops accepting
//!  per batch: freeze, pack
//!  batch(id) + fds ─────────────────────────► rebuilds (not registered, nothing read)
//!  ◄────────────────────────────────── received(id)
//!  commit(id), close old copies ────────────► registers, resumes
//!  done ────────────────────────────────────► the new process owns everything
//! ```
//!
//! Until `commit(id)` the old process owns batch `id`; on a timeout, a refusal, garbage or a
//! broken socket it sends `abort(id)` (if it can), resumes the batch and accepts again, and the
//! new process closes what it received. If the socket ends with no `abort`, the old process is
//! gone, and the new one takes what it received.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::wire::{self, BackendInfo, ListenerInfo, Message, PackedSession, WireError};
use crate::sys;

/// Why a handover did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the other process refused: {0}")]
    Refused(String),
    #[error("no answer within the upgrade timeout")]
    Timeout,
    #[error("the other process closed the upgrade socket")]
    Closed,
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("bad message: {0}")]
    Wire(#[from] WireError),
    #[error("the upgrade socket failed: {0}")]
    Io(io::Error),
    #[error("the old process aborted: {0}")]
    Aborted(String),
}

impl From<io::Error> for HandoverError {
    fn from(e: io::Error) -> HandoverError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandoverError::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => HandoverError::Closed,
            _ => HandoverError::Io(e),
        }
    }
}

/// One end of the upgrade socket: whole messages with their descriptors.
pub struct Channel {
    sock: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// The format the peer speaks ([`wire::VERSION`] until its hello says otherwise).
    version: u16,
}

impl Channel {
    pub fn new(sock: UnixStream) -> Channel {
        Channel {
            sock,
            buf: Vec::new(),
            fds: VecDeque::new(),
            version: wire::VERSION,
        }
    }

    /// Sends `msg` with `fds` (as many as the message names, at most
    /// [`sys::MAX_FDS_PER_MESSAGE`]).
    pub fn send(&self, msg: &Message, fds: &[OwnedFd]) -> io::Result<()> {
        if fds.len() != msg.fd_count() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors do not match the message",
            ));
        }
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let frame = wire::encode_version(msg, self.version);
        sys::send_with_fds(&self.sock, &frame, &borrowed)
    }

    /// Receives one message and its descriptors, waiting until `deadline` at most (`None`:
    /// as long as it takes).
    pub fn recv(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
        let header = self.fill(wire::HEADER_LEN, deadline)?;
        let header = wire::decode_header(header)?;
        let total = wire::HEADER_LEN + header.body_len;
        self.fill(total, deadline)?;
        let msg = wire::decode_version(&self.buf[..total], self.version)?;
        self.buf.drain(..total);
        if self.fds.len() < header.fds {
            return Err(WireError::FdCount {
                named: header.fds,
                sent: self.fds.len(),
            }
            .into());
        }
        let fds = self.fds.drain(..header.fds).collect();
        Ok((msg, fds))
    }

    /// Reads until `n` bytes are buffered.
    fn fill(&mut self, n: usize, deadline: Option<Instant>) -> Result<&[u8], HandoverError> {
        let mut chunk = vec![0u8; 64 * 1024];
        while self.buf.len() < n {
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(HandoverError::Timeout),
                },
            };
            self.sock.set_read_timeout(timeout)?;
            let mut fds = Vec::new();
            let got = match sys::recv_with_fds(&self.sock, &mut chunk, &mut fds) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.fds.extend(fds);
            if got == 0 {
                return Err(HandoverError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(&self.buf[..n])
    }
}

/// A batch of frozen sessions and their descriptors, in the order of [`wire`].
pub struct Frozen {
    pub sessions: Vec<PackedSession>,
    pub fds: Vec<OwnedFd>,
}

/// The old process's side: what it hands over, and what it takes back on failure.
pub trait Giver {
    /// The backends' running state (health, drains, operators' weights, slow start).
    fn backends(&mut self) -> Vec<BackendInfo> {
        Vec::new()
    }
    /// The listening sockets (duplicates: the originals stay until the process exits).
    fn listeners(&mut self) -> io::Result<(Vec<ListenerInfo>, Vec<OwnedFd>)>;
    /// The new process accepts now: stop accepting (keep the sockets open).
    fn stop_accepting(&mut self);
    /// The handover failed after `stop_accepting`: accept again.
    fn resume_accepting(&mut self);
    /// Freezes the next batch (batch `id`), with at most `max_fds` descriptors: deregistered,
    /// pumps stopped where they stand, packed. `None`: nothing left to hand over.
    fn freeze(&mut self, id: u32, max_fds: usize) -> Option<Frozen>;
    /// Batch `id` belongs to the new process: close the old copies (pipes are not reused).
    fn commit(&mut self, id: u32);
    /// Batch `id` stays here: register its sessions again and resume them.
    fn resume(&mut self, id: u32);
}

/// The new process's side.
pub trait Taker {
    /// The old process said hello: is its version understood, and is this process's own
    /// configuration valid? `Err`: the reason for refusing.
    fn hello(&mut self, version: u16, pid: u32) -> Result<(), String>;
    /// The old process's backend state, before the listeners: applied to the backends this
    /// process's own configuration lists.
    fn backends(&mut self, _backends: Vec<BackendInfo>) {}
    /// Registers the listeners (the same sockets as the old process's) and accepts.
    fn listeners(&mut self, infos: Vec<ListenerInfo>, fds: Vec<OwnedFd>) -> Result<(), String>;
    /// Rebuilds batch `id` without registering it or reading anything.
    /// Rebuilds batch `id`, whose sessions the old process froze `frozen` before sending it.
    fn rebuild(
        &mut self,
        id: u32,
        frozen: Duration,
        sessions: Vec<PackedSession>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String>;
    /// Batch `id` is this process's now: register and resume it.
    fn commit(&mut self, id: u32);
    /// Batch `id` stays with the old process: close what was received.
    fn abort(&mut self, id: u32);
}

/// What a completed handover moved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub sessions: usize,
    pub batches: u32,
    /// The longest time a batch was frozen on the old side (freeze to commit).
    pub longest_pause: Duration,
}

/// The old process's driver. Everything not committed when it returns `Err` has been taken
/// back (resumed), and accepting resumed if it had stopped.
pub fn give(
    chan: &mut Channel,
    giver: &mut impl Giver,
    pid: u32,
    timeout: Duration,
) -> Result<Report, HandoverError> {
    let deadline = Instant::now() + timeout;
    chan.send(
        &Message::Hello {
            version: wire::VERSION,
            pid,
        },
        &[],
    )?;
    match chan.recv(Some(deadline))?.0 {
        Message::Ready => {}
        Message::Refuse { reason } => return Err(HandoverError::Refused(reason)),
        _ => return Err(HandoverError::Unexpected("expected ready")),
    }
    chan.send(&Message::Backends(giver.backends()), &[])?;
    let (infos, fds) = giver.listeners()?;
    chan.send(&Message::Listeners(infos), &fds)?;
    drop(fds);
    match chan.recv(Some(deadline))?.0 {
        Message::Accepting => {}
        Message::Refuse { reason } => return Err(HandoverError::Refused(reason)),
        _ => return Err(HandoverError::Unexpected("expected accepting")),
    }
    giver.stop_accepting();
    let mut report = Report::default();
    let mut id = 0u32;
    loop {
        id = id.wrapping_add(1);
        // The pause starts when the freeze is asked for (the worker freezes at its next turn).
        let frozen_at = Instant::now();
        let Some(frozen) = giver.freeze(id, sys::MAX_FDS_PER_MESSAGE) else {
            break;
        };
        let count = frozen.sessions.len();
        let msg = Message::Batch {
            id,
            frozen_us: u64::try_from(frozen_at.elapsed().as_micros()).unwrap_or(u64::MAX),
            sessions: frozen.sessions,
        };
        let answer = chan
            .send(&msg, &frozen.fds)
            .map_err(HandoverError::from)
            .and_then(|()| chan.recv(Some(deadline)));
        drop(frozen.fds);
        let err = match answer {
            Ok((Message::Received { id: got }, _)) if got == id => {
                giver.commit(id);
                if let Err(e) = chan.send(&Message::Commit { id }, &[]) {
                    // Committed here: the new process owns the batch. It sees the socket
                    // end with no abort and takes what it received.
                    log::warn!("upgrade: commit of batch {id} not sent ({e})");
                }
                report.sessions += count;
                report.batches += 1;
                report.longest_pause = report.longest_pause.max(frozen_at.elapsed());
                continue;
            }
            Ok((Message::Refuse { reason }, _)) => HandoverError::Refused(reason),
            Ok(_) => HandoverError::Unexpected("expected received"),
            Err(e) => e,
        };
        giver.resume(id);
        let _ = chan.send(
            &Message::Abort {
                id,
                reason: err.to_string(),
            },
            &[],
        );
        giver.resume_accepting();
        return Err(err);
    }
    chan.send(&Message::Done, &[])?;
    Ok(report)
}

/// How the take ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// The old process said done.
    Done,
    /// The socket ended with no abort: the old process is gone; what was received is ours.
    OldGone,
}

/// The new process's driver. On `Err`, batches received and not committed have been aborted
/// (closed here); listeners taken stay taken (the caller decides: usually exit).
pub fn take(chan: &mut Channel, taker: &mut impl Taker) -> Result<Taken, HandoverError> {
    match chan.recv(None)?.0 {
        Message::Hello { version, pid } => {
            // An older sender's messages are read in its format (this side sends only ready,
            // refuse, accepting and received, which every version spells the same).
            let answer = if !(wire::OLDEST_VERSION..=wire::VERSION).contains(&version) {
                Err(format!(
                    "upgrade format version {version} not understood (this build speaks {} to \
                     {})",
                    wire::OLDEST_VERSION,
                    wire::VERSION
                ))
            } else {
                chan.version = version;
                taker.hello(version, pid)
            };
            if let Err(reason) = answer {
                return Err(refuse(chan, reason));
            }
            chan.send(&Message::Ready, &[])?;
        }
        _ => return Err(HandoverError::Unexpected("expected hello")),
    }
    let mut pending: Vec<u32> = Vec::new();
    let result = take_rest(chan, taker, &mut pending);
    match &result {
        Ok(Taken::OldGone) => {
            for id in pending.drain(..) {
                taker.commit(id);
            }
        }
        Ok(Taken::Done) => {}
        Err(_) => {
            for id in pending.drain(..) {
                taker.abort(id);
            }
        }
    }
    result
}

/// Tells the old process why this one refuses, and says the same to the caller.
fn refuse(chan: &mut Channel, reason: String) -> HandoverError {
    match chan.send(
        &Message::Refuse {
            reason: reason.clone(),
        },
        &[],
    ) {
        Ok(()) => HandoverError::Refused(reason),
        Err(e) => e.into(),
    }
}

fn take_rest(
    chan: &mut Channel,
    taker: &mut impl Taker,
    pending: &mut Vec<u32>,
) -> Result<Taken, HandoverError> {
    loop {
        let (msg, fds) = match chan.recv(None) {
            Ok(m) => m,
            Err(HandoverError::Closed) => return Ok(Taken::OldGone),
            Err(e) => return Err(e),
        };
        match msg {
            Message::Backends(backends) => taker.backends(backends),
            Message::Listeners(infos) => {
                if let Err(reason) = taker.listeners(infos, fds) {
                    return Err(refuse(chan, reason));
                }
                chan.send(&Message::Accepting, &[])?;
            }
            Message::Batch {
                id,
                frozen_us,
                sessions,
            } => {
                let frozen = Duration::from_micros(frozen_us);
                if let Err(reason) = taker.rebuild(id, frozen, sessions, fds) {
                    return Err(refuse(chan, reason));
                }
                pending.push(id);
                chan.send(&Message::Received { id }, &[])?;
            }
            Message::Commit { id } => {
                if let Some(at) = pending.iter().position(|&p| p == id) {
                    pending.remove(at);
                    taker.commit(id);
                }
            }
            Message::Abort { id, reason } => {
                if let Some(at) = pending.iter().position(|&p| p == id) {
                    pending.remove(at);
                    taker.abort(id);
                }
                return Err(HandoverError::Aborted(reason));
            }
            Message::Done => return Ok(Taken::Done),
            _ => return Err(HandoverError::Unexpected("out of order")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use wire::WirePhase;

    const ADDR: &str = "127.0.0.1:9";

    fn queued() -> PackedSession {
        let addr: SocketAddr = ADDR.parse().unwrap();
        PackedSession {
            phase: WirePhase::Queued,
            client_addr: addr,
            local_addr: addr,
            backend: None,
            attempts: 0,
            tried: Vec::new(),
            connect_started_ms: None,
            age_ms: 5,
            idle_ms: 5,
            deadline_in_ms: Some(1000),
            unanswered_ms: None,
            up: 0,
            down: 0,
            first_eof: None,
            pumps: None,
            proxy_out: Vec::new(),
            service: "default".into(),
        }
    }

    /// An old process whose sessions are one socket each; the test keeps the peers.
    #[derive(Default)]
    struct FakeGiver {
        live: Vec<UnixStream>,
        frozen: HashMap<u32, Vec<UnixStream>>,
        accepting: bool,
        committed: usize,
        events: Vec<String>,
    }

    impl FakeGiver {
        fn with(n: usize) -> (FakeGiver, Vec<UnixStream>) {
            let (live, peers) = (0..n).map(|_| UnixStream::pair().unwrap()).unzip();
            let giver = FakeGiver {
                live,
                accepting: true,
                ..FakeGiver::default()
            };
            (giver, peers)
        }
    }

    impl Giver for FakeGiver {
        fn listeners(&mut self) -> io::Result<(Vec<ListenerInfo>, Vec<OwnedFd>)> {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            let info = ListenerInfo {
                worker: 0,
                addr: l.local_addr()?,
                service: "default".into(),
            };
            Ok((vec![info], vec![OwnedFd::from(l)]))
        }
        fn stop_accepting(&mut self) {
            self.accepting = false;
            self.events.push("stop".into());
        }
        fn resume_accepting(&mut self) {
            self.accepting = true;
            self.events.push("accept again".into());
        }
        fn freeze(&mut self, id: u32, max_fds: usize) -> Option<Frozen> {
            if self.live.is_empty() {
                return None;
            }
            let n = self.live.len().min(max_fds);
            let batch: Vec<UnixStream> = self.live.drain(..n).collect();
            let fds = batch
                .iter()
                .map(|s| OwnedFd::from(s.try_clone().unwrap()))
                .collect();
            self.frozen.insert(id, batch);
            Some(Frozen {
                sessions: vec![queued(); n],
                fds,
            })
        }
        fn commit(&mut self, id: u32) {
            self.committed += self.frozen.remove(&id).map_or(0, |b| b.len());
        }
        fn resume(&mut self, id: u32) {
            self.events.push(format!("resume {id}"));
            self.live
                .extend(self.frozen.remove(&id).into_iter().flatten());
        }
    }

    #[derive(Default)]
    struct FakeTaker {
        refuse: Option<String>,
        listeners: Vec<OwnedFd>,
        received: HashMap<u32, Vec<OwnedFd>>,
        owned: Vec<OwnedFd>,
        aborted: Vec<u32>,
    }

    impl Taker for FakeTaker {
        fn hello(&mut self, _version: u16, _pid: u32) -> Result<(), String> {
            self.refuse.clone().map_or(Ok(()), Err)
        }
        fn listeners(&mut self, infos: Vec<ListenerInfo>, fds: Vec<OwnedFd>) -> Result<(), String> {
            assert_eq!(infos.len(), fds.len());
            self.listeners = fds;
            Ok(())
        }
        fn rebuild(
            &mut self,
            id: u32,
            _frozen: Duration,
            s: Vec<PackedSession>,
            fds: Vec<OwnedFd>,
        ) -> Result<(), String> {
            assert_eq!(s.len(), fds.len());
            self.received.insert(id, fds);
            Ok(())
        }
        fn commit(&mut self, id: u32) {
            self.owned
                .extend(self.received.remove(&id).into_iter().flatten());
        }
        fn abort(&mut self, id: u32) {
            self.aborted.push(id);
            self.received.remove(&id);
        }
    }

    fn channels() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), Channel::new(b))
    }

    #[test]
    fn every_session_moves_in_batches_and_stays_usable() {
        let (mut old, mut new) = channels();
        let (mut giver, mut peers) = FakeGiver::with(300);
        let taker = std::thread::spawn(move || {
            let mut taker = FakeTaker::default();
            let taken = take(&mut new, &mut taker).unwrap();
            (taken, taker)
        });
        let report = give(&mut old, &mut giver, 1, Duration::from_secs(30)).unwrap();
        let (taken, taker) = taker.join().unwrap();
        assert_eq!(taken, Taken::Done);
        assert_eq!(report.sessions, 300);
        assert_eq!(report.batches, 2, "253 descriptors per message at most");
        assert_eq!(giver.committed, 300);
        assert!(giver.live.is_empty() && giver.frozen.is_empty());
        assert_eq!(giver.events, ["stop"]);
        assert_eq!(taker.owned.len(), 300);
        assert_eq!(taker.listeners.len(), 1);
        // The new process's copy is the same socket: what a peer writes, it reads.
        peers[299].write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        UnixStream::from(taker.owned.into_iter().next_back().unwrap())
            .read_exact(&mut got)
            .unwrap();
        assert_eq!(&got, b"still here");
        peers.clear();
    }

    #[test]
    fn a_refusal_leaves_everything_with_the_old_process() {
        let (mut old, mut new) = channels();
        let (mut giver, _peers) = FakeGiver::with(3);
        let taker = std::thread::spawn(move || {
            let mut taker = FakeTaker {
                refuse: Some("bad flag --frob".into()),
                ..FakeTaker::default()
            };
            take(&mut new, &mut taker).map(|_| ())
        });
        let err = give(&mut old, &mut giver, 1, Duration::from_secs(30)).unwrap_err();
        assert!(
            matches!(&err, HandoverError::Refused(r) if r == "bad flag --frob"),
            "{err}"
        );
        assert!(taker.join().unwrap().is_err());
        assert!(giver.accepting);
        assert_eq!(giver.live.len(), 3);
    }

    /// A stand-in new process that follows the protocol up to the first batch, then stops.
    fn new_process_that_stops_after_a_batch(mut new: Channel, then_close: bool) -> Channel {
        assert!(matches!(new.recv(None).unwrap().0, Message::Hello { .. }));
        new.send(&Message::Ready, &[]).unwrap();
        assert!(matches!(new.recv(None).unwrap().0, Message::Backends(_)));
        assert!(matches!(new.recv(None).unwrap().0, Message::Listeners(_)));
        new.send(&Message::Accepting, &[]).unwrap();
        let (msg, fds) = new.recv(None).unwrap();
        assert!(matches!(msg, Message::Batch { id: 1, .. }));
        assert_eq!(fds.len(), 2);
        if then_close {
            drop(new);
            let (a, _) = UnixStream::pair().unwrap();
            return Channel::new(a);
        }
        new
    }

    #[test]
    fn a_new_process_that_never_confirms_gives_everything_back_at_the_timeout() {
        let (mut old, new) = channels();
        let (mut giver, _peers) = FakeGiver::with(2);
        let stand_in = std::thread::spawn(move || {
            let mut new = new_process_that_stops_after_a_batch(new, false);
            // Holds the socket open, silent, until the old process gives up and says why.
            new.recv(None).map(|(m, _)| m)
        });
        let err = give(&mut old, &mut giver, 1, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, HandoverError::Timeout), "{err}");
        assert!(matches!(
            stand_in.join().unwrap(),
            Ok(Message::Abort { id: 1, .. })
        ));
        assert_eq!(giver.live.len(), 2, "the frozen batch is resumed");
        assert_eq!(giver.committed, 0);
        assert!(giver.accepting);
        assert_eq!(giver.events, ["stop", "resume 1", "accept again"]);
    }

    #[test]
    fn a_new_process_that_exits_mid_batch_gives_everything_back() {
        let (mut old, new) = channels();
        let (mut giver, _peers) = FakeGiver::with(2);
        let stand_in = std::thread::spawn(move || new_process_that_stops_after_a_batch(new, true));
        let err = give(&mut old, &mut giver, 1, Duration::from_secs(30)).unwrap_err();
        drop(stand_in.join().unwrap());
        assert!(matches!(err, HandoverError::Closed), "{err}");
        assert_eq!(giver.live.len(), 2);
        assert!(giver.accepting);
    }

    /// A stand-in old process: hello, listeners, one batch of `n` sockets, then `last`.
    fn old_process_sends_a_batch(old: &mut Channel, n: usize) -> Vec<UnixStream> {
        old.send(
            &Message::Hello {
                version: old.version,
                pid: 1,
            },
            &[],
        )
        .unwrap();
        assert_eq!(old.recv(None).unwrap().0, Message::Ready);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = ListenerInfo {
            worker: 0,
            addr: l.local_addr().unwrap(),
            service: "default".into(),
        };
        old.send(&Message::Listeners(vec![info]), &[OwnedFd::from(l)])
            .unwrap();
        assert_eq!(old.recv(None).unwrap().0, Message::Accepting);
        let (mine, theirs): (Vec<_>, Vec<_>) = (0..n).map(|_| UnixStream::pair().unwrap()).unzip();
        let fds: Vec<OwnedFd> = mine.into_iter().map(OwnedFd::from).collect();
        let batch = Message::Batch {
            id: 1,
            frozen_us: 0,
            sessions: vec![queued(); n],
        };
        old.send(&batch, &fds).unwrap();
        assert_eq!(old.recv(None).unwrap().0, Message::Received { id: 1 });
        theirs
    }

    #[test]
    fn when_the_old_process_vanishes_after_sending_the_new_one_takes_what_it_received() {
        let (mut old, mut new) = channels();
        let taker = std::thread::spawn(move || {
            let mut taker = FakeTaker::default();
            (take(&mut new, &mut taker).unwrap(), taker)
        });
        let _peers = old_process_sends_a_batch(&mut old, 3);
        drop(old);
        let (taken, taker) = taker.join().unwrap();
        assert_eq!(taken, Taken::OldGone);
        assert_eq!(taker.owned.len(), 3);
    }

    #[test]
    fn an_abort_makes_the_new_process_close_what_it_received() {
        let (mut old, mut new) = channels();
        let taker = std::thread::spawn(move || {
            let mut taker = FakeTaker::default();
            (take(&mut new, &mut taker), taker)
        });
        let _peers = old_process_sends_a_batch(&mut old, 3);
        old.send(
            &Message::Abort {
                id: 1,
                reason: "timeout".into(),
            },
            &[],
        )
        .unwrap();
        let (result, taker) = taker.join().unwrap();
        assert!(matches!(result, Err(HandoverError::Aborted(r)) if r == "timeout"));
        assert!(taker.owned.is_empty());
        assert_eq!(taker.aborted, [1]);
    }

    /// An old process of the previous build (format version 2, no service names) hands over
    /// to this one: its messages are read in its format.
    #[test]
    fn a_version_2_sender_is_understood() {
        let (mut old, mut new) = channels();
        old.version = 2;
        let taker = std::thread::spawn(move || {
            let mut taker = FakeTaker::default();
            (take(&mut new, &mut taker).unwrap(), taker)
        });
        let _peers = old_process_sends_a_batch(&mut old, 3);
        old.send(&Message::Commit { id: 1 }, &[]).unwrap();
        old.send(&Message::Done, &[]).unwrap();
        let (taken, taker) = taker.join().unwrap();
        assert_eq!(taken, Taken::Done);
        assert_eq!(taker.owned.len(), 3);
        assert_eq!(taker.listeners.len(), 1);
    }

    #[test]
    fn a_version_not_understood_is_refused() {
        for version in [wire::VERSION + 1, wire::OLDEST_VERSION - 1] {
            let (mut old, mut new) = channels();
            let taker = std::thread::spawn(move || take(&mut new, &mut FakeTaker::default()));
            old.send(&Message::Hello { version, pid: 1 }, &[]).unwrap();
            assert!(matches!(old.recv(None).unwrap().0, Message::Refuse { .. }));
            assert!(matches!(
                taker.join().unwrap(),
                Err(HandoverError::Refused(_))
            ));
        }
    }

    #[test]
    fn garbage_on_the_socket_is_an_error_not_a_panic() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut new = Channel::new(b);
        (&a).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(a);
        assert!(matches!(new.recv(None), Err(HandoverError::Wire(_))));
    }
}
