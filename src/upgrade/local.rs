//! The handover's [`Giver`] and [`Taker`] over a running balancer's workers: each call is a
//! control message to one worker (`plane::Control`), answered over a channel where an answer
//! is needed.
//!
//! Wired so far: queued, connecting and relaying sessions (frozen, released or resumed on the
//! old side; rebuilt, adopted or discarded on the new one) and, between two processes ([`give_over`],
//! [`take_over`]), the listeners: the new process starts its balancer on them. Between two
//! balancers in one process ([`LocalGiver::new`], [`LocalTaker`]) the listeners stay. (The
//! binary drives [`give_over`] from `--upgrade-socket` and SIGUSR2.) Between two processes the
//! backends' running state goes too, applied to the new balancer's first set.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use std::os::unix::net::UnixStream;

use super::handover::{Channel, Frozen, Giver, HandoverError, Report, Taken, Taker, give, take};
use super::wire::{BackendInfo, ListenerInfo, PackedSession};
use crate::Holdfast;
use crate::Service;
use crate::control::Controller;
use crate::error::StartError;
use crate::plane::Control;
use crate::stats::Counters;
use std::sync::atomic::Ordering::Relaxed;

/// How long a worker may take to answer a freeze or a rebuild (it answers within one turn
/// of its loop unless it is gone).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The old process's side, over its workers.
pub struct LocalGiver {
    control: Controller,
    /// The worker asked first for the next batch (those before it had nothing left).
    next: usize,
    /// The second round: queued sessions, once every worker has given its connecting and
    /// relaying ones (which hold backend slots the new process must count first).
    queued_round: bool,
    /// Which worker froze each batch.
    batches: HashMap<u32, usize>,
    /// Whether the listeners go too (to a new process; a balancer already running in the same
    /// process keeps its own).
    listeners: bool,
}

impl LocalGiver {
    /// Gives the sessions only; the listeners stay.
    pub fn new(control: Controller) -> LocalGiver {
        LocalGiver {
            control,
            next: 0,
            queued_round: false,
            batches: HashMap::new(),
            listeners: false,
        }
    }

    /// Gives the listeners, then the sessions.
    pub fn with_listeners(control: Controller) -> LocalGiver {
        LocalGiver {
            listeners: true,
            ..LocalGiver::new(control)
        }
    }

    fn send(&self, id: u32, msg: impl FnOnce(u32) -> Control) {
        if let Some(&worker) = self.batches.get(&id)
            && let Some(link) = self.control.worker_links().get(worker)
        {
            link.send(msg(id));
        }
    }
}

impl Giver for LocalGiver {
    /// The backends' state, to a new process (a balancer in the same process keeps its own).
    fn backends(&mut self) -> Vec<BackendInfo> {
        if self.listeners {
            self.control.backend_snapshot()
        } else {
            Vec::new()
        }
    }

    /// Every worker's listeners, duplicated (the originals stay until this process exits);
    /// none from [`LocalGiver::new`].
    fn listeners(&mut self) -> io::Result<(Vec<ListenerInfo>, Vec<OwnedFd>)> {
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        if !self.listeners {
            return Ok((infos, fds));
        }
        for (worker, link) in self.control.worker_links().iter().enumerate() {
            let (reply, answer) = crossbeam_channel::bounded(1);
            link.send(Control::Listeners { reply });
            let copies = answer.recv_timeout(ANSWER_TIMEOUT).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("worker {worker} did not give its listeners"),
                )
            })?;
            for (service, addr, fd) in copies {
                infos.push(ListenerInfo {
                    worker: u16::try_from(worker).unwrap_or(u16::MAX),
                    addr,
                    service,
                });
                fds.push(fd);
            }
        }
        Ok((infos, fds))
    }

    fn stop_accepting(&mut self) {
        if !self.listeners {
            return;
        }
        for link in self.control.worker_links() {
            link.send(Control::Accepting(false));
        }
    }

    fn resume_accepting(&mut self) {
        if !self.listeners {
            return;
        }
        for link in self.control.worker_links() {
            link.send(Control::Accepting(true));
        }
    }

    fn freeze(&mut self, id: u32, max_fds: usize) -> Option<Frozen> {
        let links = self.control.worker_links();
        loop {
            let Some(link) = links.get(self.next) else {
                if self.queued_round {
                    return None;
                }
                self.queued_round = true;
                self.next = 0;
                continue;
            };
            let (reply, answer) = crossbeam_channel::bounded(1);
            link.send(Control::Freeze {
                id,
                max_fds,
                queued: self.queued_round,
                reply,
            });
            match answer.recv_timeout(ANSWER_TIMEOUT) {
                Ok(frozen) if !frozen.sessions.is_empty() => {
                    self.batches.insert(id, self.next);
                    return Some(frozen);
                }
                // Nothing left there. (A worker that answers too late finds nobody waiting
                // and resumes what it froze.)
                Ok(_) => {}
                Err(_) => log::warn!("upgrade: worker {} did not freeze a batch", self.next),
            }
            self.next += 1;
        }
    }

    fn commit(&mut self, id: u32) {
        self.send(id, |id| Control::Release { id });
        self.batches.remove(&id);
    }

    fn resume(&mut self, id: u32) {
        self.send(id, |id| Control::Resume { id });
        self.batches.remove(&id);
    }
}

/// The new process's side, over its workers: batches go to them in turn.
pub struct LocalTaker {
    control: Controller,
    next: usize,
    /// Which worker rebuilt each batch.
    batches: HashMap<u32, usize>,
    /// Since when each batch's sessions have been paused (frozen in the old process).
    paused_since: HashMap<u32, Instant>,
}

impl LocalTaker {
    pub fn new(control: Controller) -> LocalTaker {
        LocalTaker {
            control,
            next: 0,
            batches: HashMap::new(),
            paused_since: HashMap::new(),
        }
    }

    fn send(&mut self, id: u32, msg: impl FnOnce(u32) -> Control) {
        if let Some(worker) = self.batches.remove(&id)
            && let Some(link) = self.control.worker_links().get(worker)
        {
            link.send(msg(id));
        }
    }
}

impl Taker for LocalTaker {
    fn hello(&mut self, _version: u16, _pid: u32) -> Result<(), String> {
        Ok(())
    }

    fn listeners(&mut self, infos: Vec<ListenerInfo>, fds: Vec<OwnedFd>) -> Result<(), String> {
        if infos.is_empty() && fds.is_empty() {
            Ok(())
        } else {
            Err("taking over listeners is not supported yet".into())
        }
    }

    fn rebuild(
        &mut self,
        id: u32,
        frozen: Duration,
        sessions: Vec<PackedSession>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let now = Instant::now();
        self.paused_since
            .insert(id, now.checked_sub(frozen).unwrap_or(now));
        let links = self.control.worker_links();
        if links.is_empty() {
            return Err("no worker to take the sessions".into());
        }
        let worker = self.next % links.len();
        self.next = self.next.wrapping_add(1);
        let (reply, answer) = crossbeam_channel::bounded(1);
        links[worker].send(Control::Rebuild {
            id,
            sessions,
            fds,
            reply,
        });
        match answer.recv_timeout(ANSWER_TIMEOUT) {
            Ok(Ok(())) => {
                self.batches.insert(id, worker);
                Ok(())
            }
            Ok(Err(reason)) => Err(reason),
            // A late answer finds nobody waiting, and the worker discards the batch.
            Err(_) => Err(format!("worker {worker} did not rebuild batch {id}")),
        }
    }

    fn commit(&mut self, id: u32) {
        let paused_since = self.paused_since.remove(&id).unwrap_or_else(Instant::now);
        self.send(id, |id| Control::Adopt { id, paused_since });
    }

    fn abort(&mut self, id: u32) {
        self.paused_since.remove(&id);
        self.send(id, |id| Control::Discard { id });
    }
}

/// The old process's whole handover over `sock` (a connection to its upgrade socket): every
/// relaying session goes to the process at the other end, or, on failure, stays here.
pub fn give_over(
    sock: UnixStream,
    control: &Controller,
    timeout: Duration,
) -> Result<Report, HandoverError> {
    let mut giver = LocalGiver::with_listeners(control.clone());
    let result = give(
        &mut Channel::new(sock),
        &mut giver,
        std::process::id(),
        timeout,
    );
    let counters = control.counters();
    match &result {
        Ok(report) => {
            Counters::incr(&counters.upgrades_ok);
            counters
                .sessions_handed_over
                .fetch_add(report.sessions as u64, Relaxed);
            let pause = u64::try_from(report.longest_pause.as_micros()).unwrap_or(u64::MAX);
            counters.upgrade_pause_max_us.store(pause, Relaxed);
        }
        Err(_) => Counters::incr(&counters.upgrades_failed),
    }
    result
}

/// How [`take_over`] ended.
pub enum TakeOver {
    /// Started on the old process's listeners; how the rest of the handover went (on
    /// failure, what was committed is this process's and the rest stayed with the old one).
    Started(Holdfast, Result<Taken, HandoverError>),
    /// The handover ended before the listeners came: nothing started; the services back.
    NotStarted(Vec<Service>, HandoverError),
    /// The balancer could not start on the listeners (the old process keeps them).
    Failed(StartError),
}

/// The new process's whole take over `sock` (connected to the old process's upgrade
/// socket): the balancer starts on the listeners it receives (each given to the service that
/// lists its address, as [`Holdfast::start_services`] would), then takes the sessions.
pub fn take_over(sock: UnixStream, services: Vec<Service>) -> TakeOver {
    let mut taker = ProcessTaker {
        config: Some(services),
        started: None,
        failed: None,
    };
    let outcome = take(&mut Channel::new(sock), &mut taker);
    match (taker.started, taker.failed, taker.config) {
        (Some((balancer, _)), _, _) => {
            if outcome.is_ok() {
                Counters::incr(&balancer.controller().counters().upgrades_ok);
            }
            TakeOver::Started(balancer, outcome)
        }
        (None, Some(e), _) => TakeOver::Failed(e),
        (None, None, Some(services)) => TakeOver::NotStarted(
            services,
            outcome
                .err()
                .unwrap_or(HandoverError::Unexpected("no listeners")),
        ),
        (None, None, None) => {
            TakeOver::NotStarted(Vec::new(), HandoverError::Unexpected("no configuration"))
        }
    }
}

/// The new process: starts its balancer when the listeners arrive, then hands the batches to
/// its workers.
struct ProcessTaker {
    config: Option<Vec<Service>>,
    started: Option<(Holdfast, LocalTaker)>,
    failed: Option<StartError>,
}

impl Taker for ProcessTaker {
    fn hello(&mut self, _version: u16, _pid: u32) -> Result<(), String> {
        Ok(())
    }

    /// Kept for the first backend set of the balancer, started when the listeners come
    /// (each service takes the state its namesake in the old process had for the backends
    /// it lists; a service new in this process starts afresh).
    fn backends(&mut self, backends: Vec<BackendInfo>) {
        for service in self.config.iter_mut().flatten() {
            service.config.inherited_backends = backends
                .iter()
                .filter(|b| b.service == service.name)
                .cloned()
                .collect();
        }
    }

    fn listeners(&mut self, infos: Vec<ListenerInfo>, fds: Vec<OwnedFd>) -> Result<(), String> {
        let Some(services) = self.config.take() else {
            return Err("listeners sent twice".into());
        };
        log::info!(
            "upgrade: starting on the old process's {} listeners",
            fds.len()
        );
        let inherited = infos.into_iter().map(|i| i.addr).zip(fds).collect();
        match Holdfast::start_services_inheriting(services, inherited) {
            Ok(balancer) => {
                let taker = LocalTaker::new(balancer.controller().clone());
                self.started = Some((balancer, taker));
                Ok(())
            }
            Err(e) => {
                let reason = format!("the new process cannot start: {e}");
                self.failed = Some(e);
                Err(reason)
            }
        }
    }

    fn rebuild(
        &mut self,
        id: u32,
        frozen: Duration,
        sessions: Vec<PackedSession>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        match &mut self.started {
            Some((_, taker)) => taker.rebuild(id, frozen, sessions, fds),
            None => Err("sessions before listeners".into()),
        }
    }

    fn commit(&mut self, id: u32) {
        if let Some((_, taker)) = &mut self.started {
            taker.commit(id);
        }
    }

    fn abort(&mut self, id: u32) {
        if let Some((_, taker)) = &mut self.started {
            taker.abort(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::thread;
    use std::time::Instant;

    use super::*;
    use crate::Service;
    use crate::config::{BackendSpec, Config, RelayMode};

    const CLIENTS: usize = 24;
    const WAIT: Duration = Duration::from_secs(30);

    /// Polls `cond` until it holds, failing the test after `WAIT`.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let give_up = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < give_up, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A backend that echoes every byte on every connection until its client's EOF, then
    /// ends its side.
    fn echo_backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn start(backend: SocketAddr, mode: RelayMode) -> Holdfast {
        let mut config = Config::new(
            vec!["127.0.0.1:0".parse().unwrap()],
            vec![BackendSpec::new(backend)],
        );
        config.workers = 2;
        config.relay = mode;
        Holdfast::start(config).unwrap()
    }

    /// Message `n` of client `c`: distinct, of varying lengths.
    fn message(c: usize, n: usize) -> Vec<u8> {
        let len = 1 + (c * 7919 + n * 104_729) % 40_000;
        (0..len).map(|i| (c * 31 + n * 17 + i) as u8).collect()
    }

    fn exchange(client: &mut TcpStream, c: usize, n: usize) {
        let sent = message(c, n);
        client.write_all(&sent).unwrap();
        let mut got = vec![0u8; sent.len()];
        client.read_exact(&mut got).unwrap();
        assert!(got == sent, "client {c}: message {n} came back altered");
    }

    /// Clients relaying through a first balancer are handed, every one, to a second one
    /// through `give` and `take` over a UNIX socket; each had a message in flight (sent,
    /// its echo not yet read), and afterwards each gets exactly that echo and then keeps
    /// exchanging messages both ways until it ends the session. The first balancer holds no
    /// session once the handover is done, the second holds them all.
    fn hands_every_relaying_session_over(mode: RelayMode) {
        let backend = echo_backend();
        let old = start(backend, mode);
        let new = start(backend, mode);
        let mut clients: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| TcpStream::connect(old.listen_addrs()[0]).unwrap())
            .collect();
        for (c, client) in clients.iter_mut().enumerate() {
            client.set_read_timeout(Some(WAIT)).unwrap();
            exchange(client, c, 0);
        }
        assert_eq!(old.stats().active, CLIENTS as u64);
        // In flight across the handover: sent now, read back after it.
        for (c, client) in clients.iter_mut().enumerate() {
            client.write_all(&message(c, 1)).unwrap();
        }

        hand_over(&old, &new, CLIENTS);

        wait_until("the old balancer to let go", || old.stats().active == 0);
        wait_until("the new balancer to count the sessions", || {
            new.stats().active == CLIENTS as u64
        });
        assert_eq!(old.backend_stats()[0].active, 0);
        assert_eq!(new.backend_stats()[0].active, CLIENTS as u64);

        for (c, client) in clients.iter_mut().enumerate() {
            let sent = message(c, 1);
            let mut got = vec![0u8; sent.len()];
            client.read_exact(&mut got).unwrap();
            assert!(
                got == sent,
                "client {c}: the message in flight came back altered"
            );
        }
        for n in 2..6 {
            for (c, client) in clients.iter_mut().enumerate() {
                exchange(client, c, n);
            }
        }
        // Nothing more than was sent: each session ends with the backend's EOF after the
        // client's.
        for (c, client) in clients.iter_mut().enumerate() {
            client.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "client {c}: {} bytes too many", rest.len());
        }
        wait_until("the sessions to end", || new.stats().active == 0);
        assert_eq!(old.stats().closed, 0, "the old balancer closed a session");
    }

    /// Two services, `a` and `b`, each with a backend of its own.
    fn two_services(a: SocketAddr, b: Option<SocketAddr>) -> Holdfast {
        let service = |name: &str, backend| {
            let mut config = Config::new(
                vec!["127.0.0.1:0".parse().unwrap()],
                vec![BackendSpec::new(backend)],
            );
            config.workers = 2;
            config.health.check = crate::config::HealthCheck::None;
            Service::new(name, config)
        };
        let mut services = vec![service("a", a)];
        services.extend(b.map(|b| service("b", b)));
        Holdfast::start_services(services).unwrap()
    }

    /// Hands every session of `old` to `new` (no listeners: each keeps its own).
    fn hand_over(old: &Holdfast, new: &Holdfast, sessions: usize) {
        let (a, b) = UnixStream::pair().unwrap();
        let giver_control = old.controller().clone();
        let giving = thread::spawn(move || {
            let mut giver = LocalGiver::new(giver_control);
            give(&mut Channel::new(a), &mut giver, 1, WAIT)
        });
        let taker_control = new.controller().clone();
        let taking = thread::spawn(move || {
            let mut taker = LocalTaker::new(taker_control);
            take(&mut Channel::new(b), &mut taker)
        });
        assert_eq!(giving.join().unwrap().unwrap().sessions, sessions);
        assert_eq!(taking.join().unwrap().unwrap(), Taken::Done);
    }

    /// Sessions go to the service of the same name in the new process, even where their
    /// address names no listener there (here the new process listens elsewhere, as it would
    /// behind a PROXY header's destination); a session whose service the new process lacks
    /// goes on under the first service, on a drained set of its own backend.
    #[test]
    fn sessions_go_to_the_service_of_the_same_name() {
        let (x, y) = (echo_backend(), echo_backend());
        let old = two_services(x, Some(y));
        let new = two_services(x, Some(y));
        let connect = |lb: &Holdfast, name: &str, n: usize| -> Vec<TcpStream> {
            let addr = lb.service(name).unwrap().listen_addrs()[0];
            (0..n)
                .map(|c| {
                    let mut s = TcpStream::connect(addr).unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    exchange(&mut s, c, 0);
                    s
                })
                .collect()
        };
        let mut on_a = connect(&old, "a", 2);
        let mut on_b = connect(&old, "b", 3);
        hand_over(&old, &new, 5);
        let active =
            |lb: &Holdfast, name: &str| lb.service(name).unwrap().backend_stats()[0].active;
        wait_until("the new balancer to count them", || {
            active(&new, "a") == 2 && active(&new, "b") == 3
        });
        assert_eq!(new.service("b").unwrap().service_stats().active, 3);
        assert_eq!(old.service("b").unwrap().service_stats().active, 0);
        for (c, s) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
            exchange(s, c, 1);
        }

        // The new process has no service `b`: its sessions go on under `a`, not counted on
        // `a`'s backend (theirs is not in `a`'s set), and no new client is sent to `y`.
        let newer = two_services(x, None);
        hand_over(&new, &newer, 5);
        wait_until("the newer balancer to count them", || {
            newer.stats().active == 5
        });
        assert_eq!(active(&newer, "a"), 2);
        for (c, s) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
            exchange(s, c, 2);
        }
    }

    #[test]
    fn every_relaying_session_moves_to_another_balancer_through_splice() {
        hands_every_relaying_session_over(RelayMode::Splice);
    }

    #[test]
    fn every_relaying_session_moves_to_another_balancer_through_copy() {
        hands_every_relaying_session_over(RelayMode::Copy);
    }

    #[cfg(target_os = "linux")]
    /// The inode of this process's TCP socket from `local` to `remote` (IPv4), from
    /// /proc/net/tcp.
    fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
        let hex = |a: SocketAddr| match a {
            SocketAddr::V4(v4) => format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            ),
            SocketAddr::V6(_) => String::new(),
        };
        let (local, remote) = (hex(local), hex(remote));
        let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
        table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
                .then(|| f.get(9)?.parse().ok())?
        })
    }

    #[cfg(target_os = "linux")]
    /// How many epoll instances of this process watch the socket with inode `inode`
    /// (/proc/self/fdinfo lists each epoll's targets as `tfd: .. ino:HEX`).
    fn epoll_watches(inode: u64) -> usize {
        let needle = format!(" ino:{inode:x} ");
        let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
            return 0;
        };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .map(|info| {
                info.lines()
                    .filter(|l| l.starts_with("tfd:") && format!("{l} ").contains(&needle))
                    .count()
            })
            .sum()
    }

    /// Deregister before pack: once a session is handed over, only the new balancer's poller
    /// watches its sockets. The old worker's copy of a descriptor is closed on commit, but a
    /// registration lives as long as the socket does (the new process holds it), so a
    /// frozen session left registered would keep waking the old worker with its events, under
    /// a slab key that another session may take next.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_handed_over_session_is_watched_by_the_new_poller_alone() {
        let backend = echo_backend();
        let old = start(backend, RelayMode::Copy);
        let new = start(backend, RelayMode::Copy);
        let listen = old.listen_addrs()[0];
        let mut client = TcpStream::connect(listen).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        exchange(&mut client, 0, 0);
        let inode = socket_inode(listen, client.local_addr().unwrap())
            .expect("the balancer's socket of the client in /proc/self/net/tcp");
        assert_eq!(epoll_watches(inode), 1, "before: the old worker's poller");

        let (a, b) = UnixStream::pair().unwrap();
        let giver_control = old.controller().clone();
        let giving = thread::spawn(move || {
            give(
                &mut Channel::new(a),
                &mut LocalGiver::new(giver_control),
                1,
                WAIT,
            )
        });
        let taker_control = new.controller().clone();
        let taken = take(&mut Channel::new(b), &mut LocalTaker::new(taker_control));
        assert_eq!(giving.join().unwrap().unwrap().sessions, 1);
        assert_eq!(taken.unwrap(), Taken::Done);
        wait_until("the new balancer to adopt the session", || {
            new.stats().active == 1 && old.stats().active == 0
        });
        exchange(&mut client, 0, 1);
        assert_eq!(
            epoll_watches(inode),
            1,
            "after: the new worker's poller alone"
        );
    }
}
