//! Fault injection (issue #9, "Reliability"): each test breaks something on purpose, over real
//! loopback sockets, and asserts
//!
//! 1. what the clients see: bytes verified byte for byte, EOF or reset, and within what time;
//! 2. that nothing is lost that should not be (and where loss is expected, that what arrived
//!    is an intact prefix of what was sent);
//! 3. that holdfast's resources come back to where they were: sessions, pipes and buffers in
//!    use, queued clients, and its sockets.
//!
//! Descriptors of an in-process balancer: the tests of this binary run in parallel in one
//! process, so the raw number of entries in `/proc/self/fd` moves with every other test.
//! [`Watch`] counts only the sockets of one balancer: the entries of `/proc/self/fd` whose TCP
//! socket has that balancer's listen port as its local port (its listeners and accepted
//! clients) or one of its fake backends' ports as its remote port (its backend connections and
//! probes). A session that still holds a socket the kernel has already unhashed (after a
//! reset) is not in `/proc/net/tcp`, but it is in the `active` counter, which is checked too.
//! Whole-process figures (every descriptor, pipe ends, RSS) come from the real binary, through
//! `/proc/<pid>` and its admin endpoint.
//!
//! Randomness is seeded: each test prints its seed (the harness shows it when the test fails)
//! and `HOLDFAST_FAULT_SEED=N` replays a run.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use holdfast::{BackendState, Config, Holdfast, RelayMode};

use crate::util::*;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const MODES: [RelayMode; 3] = [RelayMode::Splice, RelayMode::Copy, RelayMode::Auto];
/// How long resources may take to come back after the last client is gone.
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

/// The seed of this run of `test`: `HOLDFAST_FAULT_SEED` if set, else the clock. Printed, so a
/// failure can be replayed.
fn seed_for(test: &str) -> u64 {
    let seed = match std::env::var("HOLDFAST_FAULT_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("HOLDFAST_FAULT_SEED={s} is not a u64")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    eprintln!("{test}: seed {seed} (replay with HOLDFAST_FAULT_SEED={seed})");
    seed
}

/// `n` bytes of the shared random buffer, at an offset picked by `seed`: random data of any
/// size up to 128 MiB without generating it (which costs about 8 ns a byte in a test build).
fn random_slice(n: usize, seed: u64) -> &'static [u8] {
    let data = shared_random();
    let start = (Rng::new(seed).next() % (data.len() - n + 1) as u64) as usize;
    &data[start..start + n]
}

/// xorshift64*: small, fast, and the same sequence for the same seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A size in `0..=max`, spread over the orders of magnitude: as many tiny sizes as huge.
    fn size(&mut self, max: usize) -> usize {
        let bits = self.below(max.max(1).ilog2() as usize + 2);
        let cap = (1usize << bits).min(max + 1);
        self.below(cap)
    }

    /// A chunk size in `1..=max`.
    fn chunk(&mut self, max: usize) -> usize {
        self.size(max - 1) + 1
    }
}

// ---------------------------------------------------------------------------------------------
// What an in-process balancer holds
// ---------------------------------------------------------------------------------------------

/// Local and remote port of every TCP socket in this network namespace, by inode.
fn tcp_ports_by_inode() -> HashMap<u64, (u16, u16)> {
    let mut map = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(local), Some(remote), Ok(inode)) =
                (port(f[1]), port(f[2]), f[9].parse::<u64>())
                && inode != 0
            {
                map.insert(inode, (local, remote));
            }
        }
    }
    map
}

/// Inodes of the sockets this process has open.
fn own_socket_inodes() -> Vec<u64> {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// One in-process balancer, and how to tell its sockets from everyone else's.
struct Watch<'a> {
    lb: &'a Holdfast,
    port: u16,
    backend_ports: Vec<u16>,
    /// Its sockets with no client: one listener per worker.
    listeners: usize,
}

impl<'a> Watch<'a> {
    /// Checks that `lb` (started with `workers` workers in front of `backends`) holds nothing
    /// but its listeners yet.
    #[track_caller]
    fn new(lb: &'a Holdfast, workers: usize, backends: &[SocketAddr]) -> Watch<'a> {
        let watch = Watch {
            lb,
            port: lb_addr(lb).port(),
            backend_ports: backends.iter().map(SocketAddr::port).collect(),
            listeners: workers * lb.listen_addrs().len(),
        };
        watch.assert_back_to_baseline("start");
        watch
    }

    /// The balancer's sockets, counted in /proc/self/fd.
    fn sockets(&self) -> usize {
        let ports = tcp_ports_by_inode();
        own_socket_inodes()
            .iter()
            .filter_map(|inode| ports.get(inode))
            .filter(|(local, remote)| *local == self.port || self.backend_ports.contains(remote))
            .count()
    }

    fn check(&self) -> Result<(), String> {
        let st = self.lb.stats();
        if st.active != 0 || st.pipes_in_use != 0 || st.buffers_in_use != 0 || st.queued != 0 {
            return Err(format!(
                "active {}, pipes in use {}, buffers in use {}, queued {} (want all 0)",
                st.active, st.pipes_in_use, st.buffers_in_use, st.queued
            ));
        }
        let sockets = self.sockets();
        if sockets != self.listeners {
            return Err(format!(
                "holdfast holds {sockets} sockets, want its {} listeners only",
                self.listeners
            ));
        }
        Ok(())
    }

    /// Waits until no session, pipe, buffer or queued client is left and the balancer's
    /// sockets are its listeners again.
    #[track_caller]
    fn assert_back_to_baseline(&self, after: &str) {
        wait_until_ok(SETTLE, || {
            self.check().map_err(|e| format!("after {after}: {e}"))
        });
    }
}

/// An in-process balancer in front of `backends`: two workers, relaying in `mode`, then `tune`.
fn balancer(backends: &[SocketAddr], mode: RelayMode, tune: impl FnOnce(&mut Config)) -> Holdfast {
    let mut cfg = config(backends);
    cfg.workers = 2;
    cfg.relay = mode;
    tune(&mut cfg);
    start_balancer(cfg)
}

// ---------------------------------------------------------------------------------------------
// A fake backend whose per-connection behaviour each test writes
// ---------------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts on 127.0.0.1:0 and runs `handler` on each connection in a thread of its own
/// (blocking socket, [`IO_TIMEOUT`] on reads and writes). Counts accepted and open connections;
/// when dropped, stops accepting and shuts down the connections still open.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<HashMap<usize, TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        let listener = TcpListener::bind(localhost0()).expect("bind a fake backend");
        let addr = listener.local_addr().expect("fake backend address");
        let handler = Arc::new(handler);
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(HashMap::new()));
        let thread = {
            let (accepted, open, stop, live) = (
                Arc::clone(&accepted),
                Arc::clone(&open),
                Arc::clone(&stop),
                Arc::clone(&live),
            );
            std::thread::spawn(move || {
                for (id, conn) in listener.incoming().enumerate() {
                    if stop.load(SeqCst) {
                        return;
                    }
                    let Ok(stream) = conn else { continue };
                    accepted.fetch_add(1, SeqCst);
                    open.fetch_add(1, SeqCst);
                    set_timeouts(&stream);
                    if let Ok(clone) = stream.try_clone() {
                        lock(&live).insert(id, clone);
                    }
                    let (handler, open, live) =
                        (Arc::clone(&handler), Arc::clone(&open), Arc::clone(&live));
                    std::thread::spawn(move || {
                        handler(stream);
                        lock(&live).remove(&id);
                        open.fetch_sub(1, SeqCst);
                    });
                }
            })
        };
        Backend {
            addr,
            accepted,
            open,
            stop,
            live,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until every connection it accepted has ended at its end.
    #[track_caller]
    fn wait_all_closed(&self, within: Duration) {
        wait_until_ok(within, || match self.open.load(SeqCst) {
            0 => Ok(()),
            n => Err(format!(
                "backend {} still has {n} of {} connections open",
                self.addr,
                self.accepted.load(SeqCst)
            )),
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in lock(&self.live).values() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Reads until EOF, retrying EINTR. `Err` for anything else (a reset, a timeout).
fn read_to_eof(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        match stream.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `data` in chunks of random sizes up to `max_chunk`.
fn write_chunked(
    stream: &mut TcpStream,
    data: &[u8],
    rng: &mut Rng,
    max_chunk: usize,
) -> io::Result<()> {
    let mut at = 0;
    while at < data.len() {
        let n = rng.chunk(max_chunk).min(data.len() - at);
        stream.write_all(&data[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Reads in random sizes up to `max_chunk` and compares each piece with `expected` at its
/// offset, then requires EOF: exactly `expected`, nothing lost, altered, reordered or added.
fn expect_exactly(
    stream: &mut TcpStream,
    expected: &[u8],
    rng: &mut Rng,
    max_chunk: usize,
) -> Result<(), String> {
    let mut buf = vec![0u8; max_chunk];
    let mut at = 0;
    loop {
        let want = rng.chunk(max_chunk);
        match stream.read(&mut buf[..want]) {
            Ok(0) if at == expected.len() => return Ok(()),
            Ok(0) => return Err(format!("EOF after {at} of {} bytes", expected.len())),
            Ok(n) if at + n > expected.len() => {
                return Err(format!(
                    "{} bytes more than the {} expected",
                    at + n - expected.len(),
                    expected.len()
                ));
            }
            Ok(n) => {
                if let Some(i) = (0..n).find(|&i| buf[i] != expected[at + i]) {
                    return Err(format!("byte {} of {} differs", at + i, expected.len()));
                }
                at += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read failed after {at} of {} bytes: {e}",
                    expected.len()
                ));
            }
        }
    }
}

/// How a connection that was read until it ended ended, and what arrived before that.
struct Ending {
    /// Bytes received before the end.
    received: usize,
    /// `None` for a clean EOF, else the error.
    error: Option<io::ErrorKind>,
    /// The received bytes matched `expected` at their offsets (the first mismatch otherwise).
    mismatch: Option<usize>,
}

/// Reads until EOF or an error (not a timeout: that panics after `within`), checking that what
/// arrives is a prefix of `expected`.
fn read_until_end(stream: &mut TcpStream, expected: &[u8], within: Duration) -> Ending {
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * KIB];
    let mut received = 0;
    let mut mismatch = None;
    loop {
        let left = within.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "connection still open {within:?} later ({received} bytes received)"
        );
        stream
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        match stream.read(&mut buf) {
            Ok(0) => {
                return Ending {
                    received,
                    error: None,
                    mismatch,
                };
            }
            Ok(n) => {
                if mismatch.is_none() {
                    let end = (received + n).min(expected.len());
                    let ok = received < end && buf[..end - received] == expected[received..end];
                    if !ok || received + n > expected.len() {
                        mismatch = Some(received);
                    }
                }
                received += n;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return Ending {
                    received,
                    error: Some(e.kind()),
                    mismatch,
                };
            }
        }
    }
}

/// The 8-byte little-endian header a client sends first, from which both ends derive the plan
/// of a connection.
fn read_header(stream: &mut TcpStream) -> io::Result<u64> {
    let mut h = [0u8; 8];
    stream.read_exact(&mut h)?;
    Ok(u64::from_le_bytes(h))
}

// ---------------------------------------------------------------------------------------------
// The real binary: whole-process figures
// ---------------------------------------------------------------------------------------------

/// The unlabelled `holdfast_*` samples of `GET /metrics`.
fn metrics(admin: SocketAddr) -> Result<HashMap<String, f64>, String> {
    let mut s = TcpStream::connect_timeout(&admin, IO_TIMEOUT).map_err(|e| e.to_string())?;
    set_timeouts(&s);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("holdfast_") && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

/// One metric, or an error naming it.
fn metric(m: &HashMap<String, f64>, name: &str) -> Result<u64, String> {
    m.get(name)
        .map(|v| *v as u64)
        .ok_or_else(|| format!("no {name} in /metrics"))
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Open descriptors of `pid` that are not pipe ends.
fn non_pipe_fds(pid: u32) -> usize {
    let all = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .count();
    all - pipe_fds(pid)
}

// ---------------------------------------------------------------------------------------------
// Backends that close mid-stream
// ---------------------------------------------------------------------------------------------

/// The plan of one mid-stream-close connection: how much the backend sends before it closes.
fn close_plan(seed: u64) -> usize {
    Rng::new(seed).size(2 * MIB)
}

/// A backend reads the client's header, sends part of a stream in random chunks and closes
/// (FIN: it has read everything the client sent). Every client gets exactly those bytes, then
/// EOF; the sessions end and holdfast lets go of everything.
#[test]
fn backend_closing_mid_stream_delivers_what_it_sent_then_eof() {
    const CLIENTS: usize = 24;
    let seed = seed_for("backend_closing_mid_stream");
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || {
                let backend = Backend::start(|mut stream| {
                    let Ok(conn_seed) = read_header(&mut stream) else {
                        return;
                    };
                    let data = random_slice(close_plan(conn_seed), conn_seed);
                    let mut rng = Rng::new(conn_seed ^ 1);
                    let _ = write_chunked(&mut stream, data, &mut rng, 128 * KIB);
                    // Dropped here: close() with nothing unread sends a FIN.
                });
                let lb = balancer(&[backend.addr()], mode, |_| {});
                let watch = Watch::new(&lb, 2, &[backend.addr()]);
                let target = lb_addr(&lb);
                let failures: Vec<String> = std::thread::scope(|s| {
                    let clients: Vec<_> = (0..CLIENTS)
                        .map(|i| {
                            let conn_seed = seed ^ ((i as u64) << 32) ^ mode as u64;
                            s.spawn(move || {
                                let mut c = client(target);
                                c.write_all(&conn_seed.to_le_bytes()).expect("write header");
                                let want = random_slice(close_plan(conn_seed), conn_seed);
                                let mut rng = Rng::new(conn_seed ^ 2);
                                expect_exactly(&mut c, want, &mut rng, 64 * KIB).map_err(|e| {
                                    format!("{mode} client {i} ({} bytes): {e}", want.len())
                                })
                            })
                        })
                        .collect();
                    clients
                        .into_iter()
                        .filter_map(|h| h.join().expect("client thread").err())
                        .collect()
                });
                assert!(
                    failures.is_empty(),
                    "seed {seed}: {} of {CLIENTS} clients did not get the stream then EOF:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
                backend.wait_all_closed(SETTLE);
                watch.assert_back_to_baseline(&format!("{mode}: backends closing mid-stream"));
                let st = lb.stats();
                assert_eq!(
                    (st.accepted, st.closed, st.resets),
                    (CLIENTS as u64, CLIENTS as u64, 0),
                    "{mode}: (accepted, closed, resets): a FIN is not a reset"
                );
            });
        }
    });
}

/// A backend sends part of its stream, then closes while the client is still uploading: it
/// closes with unread bytes, so its kernel resets the connection. The client sees its
/// connection end (EOF or reset) promptly, and what it received before is an intact prefix of
/// what the backend sent; nothing stays behind in holdfast.
#[test]
fn backend_closing_during_an_upload_ends_the_client_promptly() {
    const CLIENTS: usize = 16;
    let seed = seed_for("backend_closing_during_an_upload");
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || {
                let backend = Backend::start(|mut stream| {
                    let Ok(conn_seed) = read_header(&mut stream) else {
                        return;
                    };
                    let mut rng = Rng::new(conn_seed);
                    let data = random_slice(close_plan(conn_seed), conn_seed);
                    if write_chunked(&mut stream, data, &mut rng, 128 * KIB).is_err() {
                        return;
                    }
                    // Read a little of the upload (always leaving some unread), then close.
                    let mut buf = vec![0u8; 64 * KIB];
                    let mut left = rng.size(MIB);
                    while left > 0 {
                        match stream.read(&mut buf[..left.min(64 * KIB)]) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => left -= n,
                        }
                    }
                });
                let lb = balancer(&[backend.addr()], mode, |_| {});
                let watch = Watch::new(&lb, 2, &[backend.addr()]);
                let target = lb_addr(&lb);
                let upload = &shared_random()[..16 * MIB];
                let failures: Vec<String> = std::thread::scope(|s| {
                    let clients: Vec<_> = (0..CLIENTS)
                        .map(|i| {
                            let conn_seed = seed ^ ((i as u64) << 32) ^ mode as u64;
                            s.spawn(move || {
                                let mut c = client(target);
                                c.write_all(&conn_seed.to_le_bytes()).expect("write header");
                                // Upload until the connection breaks (16 MiB is far more than
                                // the backend reads and the buffers on the way hold).
                                let mut w = c.try_clone().expect("clone");
                                let uploader = std::thread::spawn(move || {
                                    let _ = w.write_all(upload);
                                });
                                let want = random_slice(close_plan(conn_seed), conn_seed);
                                let end = read_until_end(&mut c, want, Duration::from_secs(5));
                                drop(c);
                                let _ = uploader.join();
                                match end.mismatch {
                                    Some(at) => Err(format!(
                                        "{mode} client {i}: received bytes differ at {at} \
                                         (of {} received, {} sent by the backend, ended by {:?})",
                                        end.received,
                                        want.len(),
                                        end.error
                                    )),
                                    None => Ok(()),
                                }
                            })
                        })
                        .collect();
                    clients
                        .into_iter()
                        .filter_map(|h| h.join().expect("client thread").err())
                        .collect()
                });
                assert!(
                    failures.is_empty(),
                    "seed {seed}: {} of {CLIENTS} clients:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
                backend.wait_all_closed(SETTLE);
                watch.assert_back_to_baseline(&format!("{mode}: backends closing mid-upload"));
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Flapping backends under continuous connects
// ---------------------------------------------------------------------------------------------

/// Two of three backends flap (stop listening, listen again) every few hundred milliseconds
/// for 5 s while clients connect continuously, with active probes and passive detection
/// taking them down and up all along. No client notices: every visit (connect, read the
/// backend's tag, echo a byte) succeeds, because a refused connect is retried on another
/// backend. Sessions opened on the flapping backends before the flapping keep working (a
/// backend that stops accepting does not lose its live connections). Afterwards holdfast holds
/// only its listeners.
#[test]
fn flapping_backends_under_continuous_connects_cost_clients_nothing() {
    const FLAP_FOR: Duration = Duration::from_secs(5);
    const VISITORS: usize = 4;
    let stable = TaggedBackend::start("a");
    let flappers = [TaggedBackend::start("b"), TaggedBackend::start("c")];
    let addrs = [stable.addr(), flappers[0].addr(), flappers[1].addr()];
    let lb = balancer(&addrs, RelayMode::Auto, |cfg| {
        cfg.health.check = holdfast::HealthCheck::Tcp;
        cfg.health.interval = Duration::from_millis(100);
        cfg.health.timeout = Duration::from_millis(100);
        cfg.health.rise = 2;
        cfg.health.fall = 2;
    });
    let watch = Watch::new(&lb, 2, &addrs);
    let target = lb_addr(&lb);

    // Live sessions on every backend, opened before the flapping starts.
    let mut held: Vec<(String, TcpStream)> = Vec::new();
    wait_until_ok(IO_TIMEOUT, || {
        held.push(connect_tagged(target));
        let tags: Vec<String> = held.iter().map(|(t, _)| t.clone()).collect();
        if ["a", "b", "c"].iter().all(|t| count_tag(&tags, t) >= 1) {
            Ok(())
        } else {
            Err(format!("held sessions reach only {tags:?}"))
        }
    });

    let stop = AtomicBool::new(false);
    let visits = Mutex::new(Vec::<Result<String, String>>::new());
    std::thread::scope(|s| {
        for v in 0..VISITORS {
            let (stop, visits) = (&stop, &visits);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(SeqCst) {
                    // Rotate over 16 source addresses: thousands of short connections from one
                    // address would crowd its ephemeral ports with TIME_WAITs.
                    let ip = format!("127.0.0.{}", 2 + (v * 7 + n) % 16);
                    let r = visit_tagged(&ip, target, Duration::from_secs(5));
                    lock(visits).push(r);
                    n += 1;
                }
            });
        }
        // Flap: b is down 300 ms of every 700, c 400 ms of every 900, out of step.
        let start = Instant::now();
        let schedule = [
            (Duration::from_millis(700), Duration::from_millis(300)),
            (Duration::from_millis(900), Duration::from_millis(400)),
        ];
        let mut down = [false, false];
        while start.elapsed() < FLAP_FOR {
            let t = start.elapsed();
            for (i, (period, off)) in schedule.iter().enumerate() {
                let want_down = t.as_millis() % period.as_millis() < off.as_millis();
                if want_down != down[i] {
                    flappers[i].set_refusing(want_down);
                    down[i] = want_down;
                }
            }
            std::thread::sleep(Duration::from_millis(10)); // the fault schedule's tick
        }
        for f in &flappers {
            f.set_refusing(false);
        }
        stop.store(true, SeqCst);
    });

    let visits = visits.into_inner().unwrap_or_else(PoisonError::into_inner);
    let failed: Vec<&String> = visits.iter().filter_map(|r| r.as_ref().err()).collect();
    let tags: Vec<String> = visits.iter().filter_map(|r| r.clone().ok()).collect();
    eprintln!(
        "{} visits while flapping: a {}, b {}, c {}; {} failed",
        visits.len(),
        count_tag(&tags, "a"),
        count_tag(&tags, "b"),
        count_tag(&tags, "c"),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} visits failed while backends flapped, e.g. {:?}",
        failed.len(),
        visits.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        visits.len() >= 50,
        "only {} visits in {FLAP_FOR:?}: the connects were not continuous",
        visits.len()
    );
    let st = lb.stats();
    assert!(
        st.connect_failures > 0,
        "no connect was refused: the backends did not really flap ({st:?})"
    );
    for t in ["a", "b", "c"] {
        assert!(
            count_tag(&tags, t) > 0,
            "backend {t} served none of the {} visits during the flapping",
            tags.len()
        );
    }
    for (i, (tag, s)) in held.iter_mut().enumerate() {
        round_trip(
            s,
            format!("held session {i} on {tag}, after the flapping").as_bytes(),
        );
    }
    drop(held);
    watch.assert_back_to_baseline("flapping backends");
}

// ---------------------------------------------------------------------------------------------
// Clients that never read: bounded memory (the real binary)
// ---------------------------------------------------------------------------------------------

/// The backend streams 50 MB to each of two clients that do not read. Backpressure stops the
/// backend (it cannot write all 50 MB) while holdfast's RSS grows by less than 4 MiB, holding
/// at most one pipe or buffer per stalled direction. When the clients finally read, each gets
/// its 50 MB intact, then EOF; afterwards the process is back to its baseline: the same
/// descriptors (pipe ends aside, which the per-worker pool may keep: at most 16 pipes per
/// worker), no session, pipe or buffer in use, and RSS still within the bound.
#[test]
fn clients_that_never_read_cost_bounded_memory() {
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || never_reading_clients(mode));
        }
    });
}

fn never_reading_clients(mode: RelayMode) {
    const STREAM: usize = 50_000_000;
    const CLIENTS: usize = 2;
    const RSS_BOUND_KIB: u64 = 4 * 1024;
    let written = Arc::new(AtomicU64::new(0));
    let backend = {
        let written = Arc::clone(&written);
        Backend::start(move |mut stream| {
            let Ok(offset) = read_header(&mut stream) else {
                return;
            };
            // The client does not read for a while: a write may block far longer than usual.
            let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
            let data = &shared_random()[offset as usize..offset as usize + STREAM];
            for chunk in data.chunks(256 * KIB) {
                if stream.write_all(chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len() as u64, SeqCst);
            }
        })
    };
    let b = backend.addr().to_string();
    let child = Child::spawn(&[
        "--backend",
        &b,
        "--relay",
        &mode.to_string(),
        "--workers",
        "2",
        "--health-check",
        "none",
        "--admin",
        "127.0.0.1:0",
    ]);
    let (pid, admin) = (child.pid(), child.admin_addr(IO_TIMEOUT));
    // Warm up: one stream in each direction through each worker's pools, so the baseline
    // includes what any first session allocates once (scratch buffers, pooled pipes).
    for i in 0..4 {
        let mut c = client(child.addr());
        let offset = (i * MIB) as u64;
        c.write_all(&offset.to_le_bytes()).expect("warm-up header");
        // Read just 1 MiB of it and go.
        let mut got = vec![0u8; MIB];
        c.read_exact(&mut got).expect("warm-up read");
        assert!(
            got == shared_random()[offset as usize..offset as usize + MIB],
            "{mode}: warm-up bytes differ"
        );
        reset(c);
    }
    let settled = |want_rss_below: Option<u64>| -> Result<(u64, usize), String> {
        let m = metrics(admin)?;
        let (active, pipes, buffers) = (
            metric(&m, "holdfast_sessions_active")?,
            metric(&m, "holdfast_pipes_in_use")?,
            metric(&m, "holdfast_buffers_in_use")?,
        );
        if (active, pipes, buffers) != (0, 0, 0) {
            return Err(format!(
                "{mode}: active {active}, pipes in use {pipes}, buffers in use {buffers}"
            ));
        }
        let rss = rss_kib(pid);
        if let Some(bound) = want_rss_below
            && rss > bound
        {
            return Err(format!("{mode}: RSS {rss} KiB, want at most {bound} KiB"));
        }
        Ok((rss, non_pipe_fds(pid)))
    };
    backend.wait_all_closed(SETTLE);
    let mut baseline = (0, 0);
    wait_until_ok(SETTLE, || {
        baseline = settled(None)?;
        Ok(())
    });
    let (rss0, fds0) = baseline;
    written.store(0, SeqCst);

    let clients: Vec<(TcpStream, u64)> = (0..CLIENTS)
        .map(|i| {
            let mut c = client(child.addr());
            let offset = ((i + 1) * 7 * MIB) as u64;
            c.write_all(&offset.to_le_bytes()).expect("header");
            (c, offset)
        })
        .collect();
    // Wait until the backend is stuck: nothing more written for half a second.
    let mut last = (0, Instant::now());
    wait_until_ok(Duration::from_secs(30), || {
        let w = written.load(SeqCst);
        if w != last.0 {
            last = (w, Instant::now());
        }
        if w > 0 && last.1.elapsed() >= Duration::from_millis(500) {
            Ok(())
        } else {
            Err(format!(
                "{mode}: the backend is still writing ({w} bytes so far)"
            ))
        }
    });
    let stalled = written.load(SeqCst);
    let rss = rss_kib(pid);
    let m = metrics(admin).expect("metrics while stalled");
    let (pipes, buffers) = (
        metric(&m, "holdfast_pipes_in_use").expect("pipes"),
        metric(&m, "holdfast_buffers_in_use").expect("buffers"),
    );
    eprintln!(
        "{mode}: backend stalled after {stalled} of {} bytes; RSS {rss0} -> {rss} KiB; {pipes} \
         pipes and {buffers} buffers in use",
        CLIENTS * STREAM
    );
    assert!(
        stalled < (CLIENTS * STREAM) as u64,
        "{mode}: the backend wrote all {stalled} bytes to clients that read nothing: no \
         backpressure"
    );
    assert!(
        rss <= rss0 + RSS_BOUND_KIB,
        "{mode}: RSS grew from {rss0} KiB to {rss} KiB with {CLIENTS} clients not reading \
         ({stalled} bytes written by the backend, stalled)"
    );
    assert!(
        pipes <= CLIENTS as u64 && buffers <= CLIENTS as u64,
        "{mode}: {pipes} pipes and {buffers} buffers in use for {CLIENTS} stalled directions"
    );

    // Now read: every byte arrives, in order, then EOF.
    std::thread::scope(|s| {
        for (i, (mut c, offset)) in clients.into_iter().enumerate() {
            s.spawn(move || {
                let want = &shared_random()[offset as usize..offset as usize + STREAM];
                let mut rng = Rng::new(offset);
                if let Err(e) = expect_exactly(&mut c, want, &mut rng, 256 * KIB) {
                    panic!("{mode}: client {i}, after not reading: {e}");
                }
            });
        }
    });
    backend.wait_all_closed(SETTLE);
    wait_until_ok(SETTLE, || {
        let (_, fds) = settled(Some(rss0 + RSS_BOUND_KIB))?;
        let pipes = pipe_fds(pid);
        if fds != fds0 {
            return Err(format!(
                "{mode}: {fds} descriptors besides pipes, was {fds0}"
            ));
        }
        if pipes > 2 * 16 * 2 {
            return Err(format!(
                "{mode}: {pipes} pipe ends, more than two full pools"
            ));
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Clients that half-close
// ---------------------------------------------------------------------------------------------

/// Sizes of one half-close request and its reply.
fn half_close_plan(seed: u64) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    (rng.size(512 * KIB), rng.size(4 * MIB))
}

/// Clients send a request of random size (some send nothing at all) and shut down their write
/// side at once, often before holdfast has even reached the backend; the backend answers only
/// after it has read the request to EOF. Every backend gets the exact request then EOF, every
/// client the exact reply then EOF.
#[test]
fn half_closing_clients_get_the_whole_reply() {
    const CLIENTS: usize = 24;
    const EMPTY_REPLY: usize = 100 * KIB;
    let seed = seed_for("half_closing_clients");
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || {
                let bad_requests = Arc::new(Mutex::new(Vec::<String>::new()));
                let backend = {
                    let bad = Arc::clone(&bad_requests);
                    Backend::start(move |mut stream| {
                        let mut request = Vec::new();
                        if let Err(e) = stream.read_to_end(&mut request) {
                            lock(&bad).push(format!("reading the request: {e}"));
                            return;
                        }
                        let reply = if request.is_empty() {
                            random_slice(EMPTY_REPLY, 0)
                        } else if request.len() < 8 {
                            lock(&bad).push(format!("a {}-byte request", request.len()));
                            return;
                        } else {
                            let conn_seed = u64::from_le_bytes(request[..8].try_into().unwrap());
                            let (req_len, reply_len) = half_close_plan(conn_seed);
                            if request[8..] != *random_slice(req_len, conn_seed) {
                                lock(&bad).push(format!(
                                    "seed {conn_seed}: request of {} bytes, want {req_len} as sent",
                                    request.len() - 8
                                ));
                                return;
                            }
                            random_slice(reply_len, !conn_seed)
                        };
                        let _ = stream.write_all(reply);
                    })
                };
                let lb = balancer(&[backend.addr()], mode, |_| {});
                let watch = Watch::new(&lb, 2, &[backend.addr()]);
                let target = lb_addr(&lb);
                let failures: Vec<String> = std::thread::scope(|s| {
                    let clients: Vec<_> = (0..CLIENTS)
                        .map(|i| {
                            let conn_seed = seed ^ ((i as u64) << 32) ^ mode as u64;
                            s.spawn(move || {
                                let mut c = client(target);
                                let want = if i % 4 == 0 {
                                    random_slice(EMPTY_REPLY, 0)
                                } else {
                                    let (req_len, reply_len) = half_close_plan(conn_seed);
                                    let mut req = conn_seed.to_le_bytes().to_vec();
                                    req.extend_from_slice(random_slice(req_len, conn_seed));
                                    let mut rng = Rng::new(conn_seed ^ 3);
                                    write_chunked(&mut c, &req, &mut rng, 64 * KIB)
                                        .expect("write request");
                                    random_slice(reply_len, !conn_seed)
                                };
                                c.shutdown(Shutdown::Write).expect("shutdown(Write)");
                                let mut rng = Rng::new(conn_seed ^ 4);
                                expect_exactly(&mut c, want, &mut rng, 64 * KIB)
                                    .map_err(|e| format!("{mode} client {i}: {e}"))
                            })
                        })
                        .collect();
                    clients
                        .into_iter()
                        .filter_map(|h| h.join().expect("client thread").err())
                        .collect()
                });
                assert!(
                    failures.is_empty(),
                    "seed {seed}: {} of {CLIENTS} half-closing clients:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
                let bad = lock(&bad_requests).clone();
                assert!(bad.is_empty(), "seed {seed}: {mode} backend saw: {bad:?}");
                backend.wait_all_closed(SETTLE);
                watch.assert_back_to_baseline(&format!("{mode}: half-closing clients"));
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Clients that reset
// ---------------------------------------------------------------------------------------------

/// Bytes a resetting client of kind 2 reads from the backend before it uploads and resets.
const ANSWER: usize = 64 * KIB;

/// Clients reset their connection (SO_LINGER 0) at different points: at once; after an
/// upload; after reading the backend's whole answer and uploading; after reading part of an
/// 8 MiB stream the backend is still sending (bytes in flight towards the client). Holdfast
/// passes each reset on: every backend connection ends with a reset, never a clean EOF (which
/// would tell the backend the client finished: where holdfast holds no unread bytes from the
/// backend, only `SO_LINGER 0` makes its close a reset). Every session is counted as a reset,
/// and the next client is served normally.
#[test]
fn resetting_clients_are_passed_on_as_resets() {
    const CLIENTS: usize = 24;
    let seed = seed_for("resetting_clients");
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || {
                let clean_eofs = Arc::new(AtomicUsize::new(0));
                let backend = {
                    let clean_eofs = Arc::clone(&clean_eofs);
                    // One thread per connection, never two: a reset is reported once, to
                    // whichever call comes first, and a second thread could then read a
                    // plain EOF after its partner's write took the ECONNRESET.
                    Backend::start(move |mut stream| {
                        let mut buf = vec![0u8; 64 * KIB];
                        let kind = match stream.read(&mut buf[..1]) {
                            Ok(0) => {
                                clean_eofs.fetch_add(1, SeqCst);
                                return;
                            }
                            Ok(_) => buf[0],
                            Err(_) => return, // the reset, passed on
                        };
                        let answer: &[u8] = match kind {
                            2 => &shared_random()[..ANSWER],
                            3 => &shared_random()[..8 * MIB],
                            _ => &[],
                        };
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                        if read_to_eof(&mut stream, &mut buf).is_ok() {
                            clean_eofs.fetch_add(1, SeqCst);
                        }
                    })
                };
                let lb = balancer(&[backend.addr()], mode, |_| {});
                let watch = Watch::new(&lb, 2, &[backend.addr()]);
                let target = lb_addr(&lb);
                std::thread::scope(|s| {
                    for i in 0..CLIENTS {
                        s.spawn(move || {
                            let mut rng = Rng::new(seed ^ ((i as u64) << 32) ^ mode as u64);
                            let mut c = client(target);
                            let kind = (i % 4) as u8;
                            if kind > 0 {
                                c.write_all(&[kind]).expect("write the kind");
                            }
                            match kind {
                                1 => {
                                    let n = rng.size(2 * MIB);
                                    let _ = c.write_all(&shared_random()[..n]);
                                }
                                2 => {
                                    let mut answer = vec![0u8; ANSWER];
                                    c.read_exact(&mut answer).expect("read the answer");
                                    let n = rng.size(2 * MIB);
                                    let _ = c.write_all(&shared_random()[..n]);
                                }
                                3 => {
                                    let mut part = vec![0u8; rng.size(2 * MIB)];
                                    c.read_exact(&mut part).expect("read part of the stream");
                                }
                                _ => {}
                            }
                            reset(c);
                        });
                    }
                });
                backend.wait_all_closed(SETTLE);
                assert_eq!(
                    clean_eofs.load(SeqCst),
                    0,
                    "seed {seed}: {mode}: backend connections ended with a clean EOF although \
                     their clients reset"
                );
                wait_until_ok(SETTLE, || {
                    let st = lb.stats();
                    if st.closed == CLIENTS as u64 && st.resets == CLIENTS as u64 {
                        Ok(())
                    } else {
                        Err(format!(
                            "{mode}: want {CLIENTS} sessions closed as resets: {st:?}"
                        ))
                    }
                });
                watch.assert_back_to_baseline(&format!("{mode}: resetting clients"));
                // And the next client is served.
                let mut c = client(target);
                c.write_all(&[2]).expect("write");
                let mut answer = vec![0u8; ANSWER];
                c.read_exact(&mut answer).expect("read the answer");
                assert!(
                    answer == shared_random()[..ANSWER],
                    "{mode}: answer differs"
                );
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Slowloris: a flood of idle connects
// ---------------------------------------------------------------------------------------------

/// `n` clients of `target`, spread over 8 source addresses from 127.0.0.`first_ip`.
fn clients_from_8_ips(target: SocketAddr, n: usize, first_ip: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| client_from(&format!("127.0.0.{}", first_ip + i % 8), target))
        .collect()
}

/// 300 clients connect and send nothing. Holdfast holds them cheaply: each costs its two
/// sockets and no pipe or buffer, and a real client is still served among them. Once they
/// go, holdfast holds nothing.
#[test]
fn slowloris_idle_connects_are_held_cheaply() {
    const IDLE_CLIENTS: usize = 300;
    let echo = CountingBackend::start();
    let lb = balancer(&[echo.addr()], RelayMode::Auto, |_| {});
    let watch = Watch::new(&lb, 2, &[echo.addr()]);
    let target = lb_addr(&lb);
    let idle = clients_from_8_ips(target, IDLE_CLIENTS, 2);
    wait_until_ok(IO_TIMEOUT, || {
        let st = lb.stats();
        let open = echo.open();
        if st.active == IDLE_CLIENTS as u64 && open == IDLE_CLIENTS {
            Ok(())
        } else {
            Err(format!("{open} open at the backend: {st:?}"))
        }
    });
    let st = lb.stats();
    assert_eq!(
        (st.pipes_in_use, st.buffers_in_use),
        (0, 0),
        "idle connections hold pipes or buffers"
    );
    // Two sockets a session, and the count of them sees every one.
    wait_until_ok(IO_TIMEOUT, || {
        let (sockets, want) = (watch.sockets(), watch.listeners + 2 * IDLE_CLIENTS);
        if sockets == want {
            Ok(())
        } else {
            Err(format!("holdfast holds {sockets} sockets, want {want}"))
        }
    });
    let mut c = client(target);
    round_trip(&mut c, b"a real client, among the idle ones");
    drop(c);
    drop(idle);
    wait_until(SETTLE, || echo.open() == 0);
    watch.assert_back_to_baseline("a slowloris flood");
}

/// 100 clients connect and drip a byte every 200 ms, 100 connect and go quiet. The idle
/// timeout (2 s) closes exactly the silent ones (each sees EOF) and leaves the dripping ones
/// open; once those stop, they are closed too. Every one is counted as an idle timeout, and
/// holdfast holds nothing afterwards.
#[test]
fn slowloris_idle_connects_are_timed_out_and_drips_are_not() {
    const SILENT: usize = 100;
    const DRIPPING: usize = 100;
    const IDLE: Duration = Duration::from_secs(2);
    let echo = CountingBackend::start();
    let lb = balancer(&[echo.addr()], RelayMode::Auto, |cfg| {
        cfg.idle_timeout = Some(IDLE);
    });
    let watch = Watch::new(&lb, 2, &[echo.addr()]);
    let target = lb_addr(&lb);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The drippers start dripping at once, before the silent ones connect: their idle
        // clocks must not run out while the others are being set up.
        let dripping = clients_from_8_ips(target, DRIPPING, 10);
        let dripper = s.spawn(|| {
            let mut dripping = dripping;
            while !stop.load(SeqCst) {
                for (i, c) in dripping.iter_mut().enumerate() {
                    if let Err(e) = c.write_all(b".") {
                        panic!("dripping client {i} was cut while it kept sending: {e}");
                    }
                }
                std::thread::sleep(Duration::from_millis(200)); // the drip rate itself
            }
            dripping
        });
        let mut silent = clients_from_8_ips(target, SILENT, 2);
        for (i, c) in silent.iter_mut().enumerate() {
            let (how, _) = expect_closed(c, IDLE * 3);
            assert!(
                matches!(how, Closed::Eof),
                "silent client {i} ended with {how:?}, want EOF"
            );
        }
        stop.store(true, SeqCst);
        let dripping = dripper.join().expect("dripper");
        for (i, c) in dripping.iter().enumerate() {
            assert_ne!(
                pending(c),
                Pending::Closed,
                "dripping client {i} was closed although it kept sending"
            );
        }
        for (i, mut c) in dripping.into_iter().enumerate() {
            let (how, _) = expect_closed(&mut c, IDLE * 3);
            assert!(
                matches!(how, Closed::Eof),
                "dripping client {i} ended with {how:?} once it stopped, want EOF"
            );
        }
    });
    wait_until_ok(SETTLE, || {
        let st = lb.stats();
        if st.idle_timeouts == (SILENT + DRIPPING) as u64 {
            Ok(())
        } else {
            Err(format!("want {} idle timeouts: {st:?}", SILENT + DRIPPING))
        }
    });
    wait_until(SETTLE, || echo.open() == 0);
    watch.assert_back_to_baseline("idle timeouts");
}

// ---------------------------------------------------------------------------------------------
// Connect-and-close floods
// ---------------------------------------------------------------------------------------------

/// 600 clients connect and close at once, half with a FIN and half with a reset, most of them
/// before holdfast has even reached the backend, while one real client keeps doing round
/// trips. The real client never fails; every session ends; none counts against the backend
/// (the clients left, not the backend), so it stays up; holdfast holds nothing afterwards.
#[test]
fn connect_and_close_floods_leave_nothing_behind() {
    const THREADS: usize = 4;
    const EACH: usize = 150;
    let echo = CountingBackend::start();
    let lb = balancer(&[echo.addr()], RelayMode::Auto, |_| {});
    let watch = Watch::new(&lb, 2, &[echo.addr()]);
    let target = lb_addr(&lb);
    let flooding = AtomicUsize::new(THREADS);
    let round_trips = std::thread::scope(|s| {
        for t in 0..THREADS {
            let flooding = &flooding;
            s.spawn(move || {
                for i in 0..EACH {
                    let ip = format!("127.0.0.{}", 2 + (t * EACH + i) % 16);
                    let c = client_from(&ip, target);
                    if i % 2 == 0 {
                        drop(c);
                    } else {
                        reset(c);
                    }
                }
                flooding.fetch_sub(1, SeqCst);
            });
        }
        let mut real = client(target);
        let mut n = 0u64;
        while flooding.load(SeqCst) > 0 || n < 10 {
            round_trip(
                &mut real,
                format!("round trip {n} during the flood").as_bytes(),
            );
            n += 1;
        }
        n
    });
    let flood = (THREADS * EACH) as u64;
    wait_until_ok(SETTLE, || {
        let st = lb.stats();
        if st.accepted == flood + 1 && st.closed == st.accepted && st.active == 0 {
            Ok(())
        } else {
            Err(format!(
                "want {} sessions accepted and closed: {st:?}",
                flood + 1
            ))
        }
    });
    let b = backend_stat(&lb, echo.addr());
    assert_eq!(
        (b.state, b.passive_failures, b.connect_failures),
        (BackendState::Up, 0, 0),
        "clients that left counted against the backend: {b:?}"
    );
    assert!(round_trips >= 10);
    wait_until(SETTLE, || echo.open() == 0);
    watch.assert_back_to_baseline("a connect-and-close flood");
}

// ---------------------------------------------------------------------------------------------
// SIGTERM twice
// ---------------------------------------------------------------------------------------------

/// Whether `got` is what an endless repetition of `data` holds at `offset`.
fn cyclic_match(data: &[u8], offset: usize, got: &[u8]) -> bool {
    let mut at = offset % data.len();
    let mut rest = got;
    while !rest.is_empty() {
        let n = rest.len().min(data.len() - at);
        if rest[..n] != data[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = 0;
    }
    true
}

/// Runs the real binary under load: bulk streams in flight (splice, so pipes hold bytes),
/// idle sessions, clients queued behind `--max-conns-per-backend`, and a client that keeps
/// connecting; then sends SIGTERM twice, the second once the drain has visibly begun (the
/// listeners refuse). Two signals sent back to back, before the process has run, can be merged
/// into one by the kernel (a standard signal is pending at most once), so no test can promise
/// anything of those. The second signal must close everything at once
/// despite a 30 s drain timeout: every client sees its connection end within 5 s, what the
/// bulk clients received is an intact prefix of what they sent, the backend's connections all
/// end, and holdfast exits 0 without a panic.
fn sigterm_twice_under_load() {
    const BULK: usize = 4;
    const IDLE: usize = 8;
    const QUEUED: usize = 6;
    let echo = EchoBackend::start();
    let b = echo.addr().to_string();
    let mut child = Child::spawn(&[
        "--backend",
        &b,
        "--relay",
        "splice",
        "--workers",
        "2",
        "--health-check",
        "none",
        "--drain-timeout",
        "30s",
        "--close-spread",
        "10s",
        "--max-conns-per-backend",
        &(BULK + IDLE).to_string(),
        "--queue-timeout",
        "60s",
        "--admin",
        "127.0.0.1:0",
    ]);
    let (target, admin) = (child.addr(), child.admin_addr(IO_TIMEOUT));
    let data = &shared_random()[..64 * MIB];

    // Bulk echo streams: a writer that only stops when the connection breaks, a reader that
    // checks what comes back.
    let progress: Arc<Vec<AtomicUsize>> =
        Arc::new((0..BULK).map(|_| AtomicUsize::new(0)).collect());
    let bulk: Vec<JoinHandle<Ending>> = (0..BULK)
        .map(|i| {
            let progress = Arc::clone(&progress);
            let mut c = client(target);
            let mut w = c.try_clone().expect("clone");
            std::thread::spawn(move || {
                // Round and round the data until the connection breaks: the streams must
                // still be flowing when the signals come.
                let writer = std::thread::spawn(move || {
                    for chunk in data.chunks(64 * KIB).cycle() {
                        if w.write_all(chunk).is_err() {
                            return;
                        }
                    }
                });
                // Echoed bytes are counted as they arrive, so the test knows the streams run.
                let mut buf = vec![0u8; 256 * KIB];
                let mut received = 0;
                let mut mismatch = None;
                let error = loop {
                    match c.read(&mut buf) {
                        Ok(0) => break None,
                        Ok(n) => {
                            if mismatch.is_none() && !cyclic_match(data, received, &buf[..n]) {
                                mismatch = Some(received);
                            }
                            received += n;
                            progress[i].store(received, SeqCst);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Some(e.kind()),
                    }
                };
                drop(c);
                let _ = writer.join();
                Ending {
                    received,
                    error,
                    mismatch,
                }
            })
        })
        .collect();
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("idle session {i}").as_bytes());
            c
        })
        .collect();
    idle.extend((0..QUEUED).map(|_| client(target)));
    wait_until_ok(IO_TIMEOUT, || {
        let m = metrics(admin)?;
        let queued = metric(&m, "holdfast_queue_length")?;
        let streaming = progress.iter().all(|p| p.load(SeqCst) >= MIB);
        if queued == QUEUED as u64 && streaming {
            Ok(())
        } else {
            Err(format!("{queued} queued, bulk progress {progress:?}"))
        }
    });

    // A client that keeps connecting through both signals; it keeps what it got.
    let stop = Arc::new(AtomicBool::new(false));
    let connector = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            while !stop.load(SeqCst) && kept.len() < 200 {
                if let Ok(c) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                    kept.push(c);
                }
            }
            kept
        })
    };

    child.signal(libc::SIGTERM);
    wait_refused(target, Duration::from_secs(5));
    let second = child.signal(libc::SIGTERM);
    let within = Duration::from_secs(5);
    let status = child.wait_exit(within).unwrap_or_else(|| {
        panic!(
            "holdfast still running {within:?} after the second SIGTERM (drain timeout \
             30s); stderr:\n{}",
            child.stderr()
        )
    });
    let exited = second.elapsed();
    stop.store(true, SeqCst);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; stderr:\n{}",
        child.stderr()
    );
    let stderr = child.stderr();
    assert!(!stderr.contains("panicked"), "a thread panicked:\n{stderr}");

    // Every client's connection has ended.
    for (i, h) in bulk.into_iter().enumerate() {
        let end = h.join().expect("bulk client");
        assert_eq!(
            end.mismatch, None,
            "bulk client {i} received {} bytes that are not what it sent (ended by \
             {:?})",
            end.received, end.error
        );
    }
    for mut c in idle {
        expect_closed(&mut c, Duration::from_secs(1));
    }
    for mut c in connector.join().expect("connector") {
        expect_closed(&mut c, Duration::from_secs(1));
    }
    echo.wait_for_open(0, Duration::from_secs(5));
    assert!(exited <= within, "exit {exited:?} after the second SIGTERM");
}

#[test]
fn sigterm_twice_under_load_closes_everything_at_once() {
    sigterm_twice_under_load();
}

// ---------------------------------------------------------------------------------------------
// Random data, random sizes, random chunks, through splice, copy and auto at once
// ---------------------------------------------------------------------------------------------

/// What one connection of the random-data test does, derived from its seed by both ends.
#[derive(Debug)]
struct RandomPlan {
    /// The backend echoes; otherwise it sends its own stream first and half-closes, while the
    /// client uploads.
    echo: bool,
    upload: usize,
    download: usize,
    client_chunk: usize,
    backend_chunk: usize,
}

fn random_plan(seed: u64) -> RandomPlan {
    let mut rng = Rng::new(seed);
    let big = rng.below(4) == 0;
    let size = |rng: &mut Rng| {
        if big {
            rng.below(8 * MIB + 1)
        } else {
            rng.size(MIB)
        }
    };
    let (upload, download) = (size(&mut rng), size(&mut rng));
    // Chunks as small as one byte, but not a million calls for one stream: the largest chunk
    // is at least 1/256 of the larger transfer.
    let floor = upload.max(download) / 256;
    RandomPlan {
        echo: rng.below(2) == 0,
        upload,
        download,
        client_chunk: (1 + rng.size(256 * KIB)).max(floor),
        backend_chunk: (1 + rng.size(256 * KIB)).max(floor),
    }
}

/// The random-data backend: reads the 8-byte seed, then follows the plan. Echo: echoes in
/// random chunks until EOF, then closes. Otherwise: sends `download` bytes in random chunks,
/// shuts down its write side, reads the upload to EOF and checks it, recording the verdict.
fn random_backend(verdicts: Arc<Mutex<Vec<Result<u64, String>>>>) -> Backend {
    Backend::start(move |mut stream| {
        // A connection that sends nothing at all is not one of this test's clients: tests run
        // in parallel, and another test's balancer, probing or retrying a backend of its own
        // that has gone, reaches this one when the kernel gave it that backend's old port.
        let mut h = [0u8; 8];
        if !matches!(stream.read(&mut h[..1]), Ok(1)) {
            return;
        }
        if let Err(e) = stream.read_exact(&mut h[1..]) {
            lock(&verdicts).push(Err(format!("a partial header: {e}")));
            return;
        }
        let seed = u64::from_le_bytes(h);
        let plan = random_plan(seed);
        let mut rng = Rng::new(seed ^ 5);
        if plan.echo {
            let mut buf = vec![0u8; plan.backend_chunk];
            loop {
                let want = rng.chunk(plan.backend_chunk);
                match stream.read(&mut buf[..want]) {
                    Ok(0) => return,
                    Ok(n) => {
                        if write_chunked(&mut stream, &buf[..n], &mut rng, plan.backend_chunk)
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        }
        let mut w = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                lock(&verdicts).push(Err(format!("seed {seed}: clone: {e}")));
                return;
            }
        };
        let mut wrng = Rng::new(seed ^ 6);
        let sender = std::thread::spawn(move || {
            let data = random_slice(plan.download, seed ^ 7);
            write_chunked(&mut w, data, &mut wrng, plan.backend_chunk)?;
            w.shutdown(Shutdown::Write)
        });
        let want = random_slice(plan.upload, seed ^ 8);
        let verdict = expect_exactly(&mut stream, want, &mut rng, plan.backend_chunk)
            .map(|()| seed)
            .map_err(|e| format!("seed {seed} {plan:?}: the backend's view of the upload: {e}"));
        let sent = sender.join();
        let verdict = match (verdict, sent) {
            (Ok(s), Ok(Ok(()))) => Ok(s),
            (Err(e), _) => Err(e),
            (_, Ok(Err(e))) => Err(format!("seed {seed}: the backend's send failed: {e}")),
            (_, Err(_)) => Err(format!("seed {seed}: the backend's sender panicked")),
        };
        lock(&verdicts).push(verdict);
    })
}

/// One client of the random-data test: uploads in random chunks and half-closes while it reads
/// (in random sizes) and verifies what comes back, then requires EOF.
fn random_client(target: SocketAddr, seed: u64) -> Result<(), String> {
    let plan = random_plan(seed);
    let mut c = client(target);
    c.write_all(&seed.to_le_bytes())
        .map_err(|e| format!("header: {e}"))?;
    let mut w = c.try_clone().map_err(|e| format!("clone: {e}"))?;
    let upload_seed = if plan.echo { seed } else { seed ^ 8 };
    let chunk = plan.client_chunk;
    let uploader = std::thread::spawn(move || -> io::Result<()> {
        let data = random_slice(plan.upload, upload_seed);
        let mut rng = Rng::new(upload_seed ^ 9);
        write_chunked(&mut w, data, &mut rng, chunk)?;
        w.shutdown(Shutdown::Write)
    });
    let want = if plan.echo {
        random_slice(plan.upload, seed)
    } else {
        random_slice(plan.download, seed ^ 7)
    };
    let mut rng = Rng::new(seed ^ 10);
    let result = expect_exactly(&mut c, want, &mut rng, chunk);
    if result.is_err() {
        let _ = c.shutdown(Shutdown::Both);
    }
    let sent = uploader
        .join()
        .map_err(|_| "uploader panicked".to_string())?;
    result
        .and(sent.map_err(|e| format!("upload: {e}")))
        .map_err(|e| format!("seed {seed} {plan:?}: {e}"))
}

/// Three balancers, one per relay mode, each with 24 clients at once: random sizes (0 to
/// 8 MiB), random write and read chunks (1 byte to 256 KiB) on both ends, half-closes in
/// both orders (the client after its upload; the backend after its own stream, while the
/// client still uploads). Every byte arrives, in order, in both directions, then EOF.
#[test]
fn random_data_in_random_chunks_through_every_relay_mode_at_once() {
    const CLIENTS: usize = 24;
    let seed = seed_for("random_data");
    std::thread::scope(|s| {
        for mode in MODES {
            s.spawn(move || {
                let verdicts = Arc::new(Mutex::new(Vec::new()));
                let backend = random_backend(Arc::clone(&verdicts));
                let lb = balancer(&[backend.addr()], mode, |_| {});
                let watch = Watch::new(&lb, 2, &[backend.addr()]);
                let target = lb_addr(&lb);
                let mut rng = Rng::new(seed ^ mode as u64);
                let seeds: Vec<u64> = (0..CLIENTS).map(|_| rng.next()).collect();
                let failures: Vec<String> = std::thread::scope(|s| {
                    let clients: Vec<_> = seeds
                        .iter()
                        .map(|&conn_seed| s.spawn(move || random_client(target, conn_seed)))
                        .collect();
                    clients
                        .into_iter()
                        .filter_map(|h| h.join().expect("client thread").err())
                        .collect()
                });
                assert!(
                    failures.is_empty(),
                    "seed {seed}: {mode}: {} of {CLIENTS} connections:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
                let uploads = seeds.iter().filter(|&&s| !random_plan(s).echo).count();
                wait_until_ok(SETTLE, || {
                    let v = lock(&verdicts);
                    if let Some(Err(e)) = v.iter().find(|r| r.is_err()) {
                        panic!("seed {seed}: {mode}: {e}");
                    }
                    if v.len() == uploads {
                        Ok(())
                    } else {
                        Err(format!("{} of {uploads} backend verdicts", v.len()))
                    }
                });
                backend.wait_all_closed(SETTLE);
                watch.assert_back_to_baseline(&format!("{mode}: random data"));
                let st = lb.stats();
                assert_eq!(
                    (st.closed, st.resets),
                    (CLIENTS as u64, 0),
                    "{mode}: (closed, resets)"
                );
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// A backend process killed with SIGKILL under hundreds of sessions
// ---------------------------------------------------------------------------------------------

/// A real backend process (`holdfast-load echo-server`), killed with SIGKILL while it holds a
/// share of 300 live sessions: the kernel closes its sockets behind its back. Every client of
/// the dead backend sees its session end promptly (the backend's FIN is passed on, and the
/// client's next bytes meet the dead socket's reset); the others keep echoing; every new client
/// is served by the survivor (connects to the dead port are refused and retried); and once
/// everyone has left, holdfast's counters are back to zero.
#[test]
fn a_backend_process_killed_with_sigkill_under_hundreds_of_sessions() {
    const CLIENTS: usize = 300;
    let mut victim = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast-load"))
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn holdfast-load echo-server");
    let victim_addr: SocketAddr = {
        let stdout = victim.stdout.take().expect("piped stdout");
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line)
            .expect("read the listening line");
        line.trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from echo-server: {line:?}"))
    };
    let survivor = EchoBackend::start();
    let mut cfg = config(&[victim_addr, survivor.addr()]);
    cfg.algorithm = holdfast::Algorithm::RoundRobin;
    cfg.workers = 2;
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut c = client(target);
            round_trip(&mut c, format!("client {i}").as_bytes());
            c
        })
        .collect();
    let on_victim = backend_stat(&lb, victim_addr).active as usize;
    assert!(
        on_victim >= CLIENTS / 3,
        "only {on_victim} of {CLIENTS} sessions on the victim"
    );

    let killed = Instant::now();
    victim.kill().expect("SIGKILL the backend");
    victim.wait().expect("reap the backend");
    let mut ended = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        let probe = format!("still there {i}");
        let alive = c.write_all(probe.as_bytes()).is_ok() && {
            let mut back = vec![0u8; probe.len()];
            c.read_exact(&mut back).is_ok() && back == probe.as_bytes()
        };
        if !alive {
            ended += 1;
        }
    }
    assert_eq!(
        ended, on_victim,
        "every session on the killed backend ends, and only those"
    );
    wait_until_ok(Duration::from_secs(5), || {
        let active = lb.stats().active as usize;
        if active == CLIENTS - on_victim {
            Ok(())
        } else {
            Err(format!("{active} active, want {}", CLIENTS - on_victim))
        }
    });
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "sessions took {:?} to end",
        killed.elapsed()
    );
    for i in 0..50 {
        let mut c = client(target);
        round_trip(&mut c, format!("after the kill {i}").as_bytes());
    }
    drop(clients);
    wait_until(Duration::from_secs(5), || lb.stats().active == 0);
    let st = lb.stats();
    assert_eq!(
        (st.active, st.pipes_in_use, st.buffers_in_use),
        (0, 0, 0),
        "{st:?}"
    );
}
