//! Measures the in-kernel relay of issue #16 against holdfast's user-space relays.
//!
//! ```text
//! cargo build --release --bin holdfast --example sockmap_bench
//! target/release/examples/sockmap_bench --holdfast target/release/holdfast [--sessions 1000]
//!     [--round-trips 20000] [--size 64] [--bulk-mib 1024] [--rounds 5] [--proxy-sndbuf BYTES]
//! ```
//! (`scripts/bench-sockmap.sh` does both.) Needs root (CAP_BPF + CAP_NET_ADMIN) for the
//! sockmap variants; without it they are reported as unavailable and the rest still runs.
//!
//! Variants, each a path from a client to one echo backend on loopback:
//! - `direct`: the client talks to the backend (the floor every relay adds to);
//! - `sockmap`, `sockmap-v`: this process accepts the client, connects to the backend and
//!   inserts the pair into a [`SockRelay`] (stream-verdict and verdict-only attachments), then
//!   never touches the sockets again;
//! - `copy`, `splice`: `holdfast --workers 1 --relay copy|splice` child processes (one in front
//!   of the echo backend, one in front of the bulk sink).
//!
//! Every variant keeps `--sessions` sessions open the whole time (so all of them, every
//! variant's, sit idle while one is measured). One run of the small-message case sends
//! `--round-trips` messages of `--size` bytes one at a time, each on the next session in turn,
//! and waits for its echo (closed loop: one round trip in flight, so latency is not queueing).
//! One run of the bulk case streams `--bulk-mib` MiB over one extra session to a sink that
//! answers with 8 bytes once it has them all. Around each run the whole machine's CPU time is
//! read from /proc/stat (everything but idle and iowait: user, system, softirq ... of every
//! process, including other people's builds on a shared machine), and "our" CPU: this
//! process's (client, echo backend, sink), the holdfast children's and the kernel's worker
//! threads' (kworker, ksoftirqd: the in-kernel relay defers work to them) from /proc/PID/stat.
//! (This kernel has no CONFIG_IRQ_TIME_ACCOUNTING: softirq work done on the way out of a
//! system call is charged to the process that made it.) Then the "many sessions at once" case:
//! the same small round trips again while one more session of the same path (the same holdfast,
//! the same sockhash) streams 128 KiB writes to the echo backend the whole time, its echo read
//! by another thread: does a busy session slow the others? (The echo backend is one thread for
//! every session, so `direct` shows what the harness itself adds.) Before each run the machine's busy
//! cores over 300 ms of our idleness are printed: that is the other tenants' load. Variants alternate within a round, the order rotating
//! each round; the report gives medians and the spread over rounds.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use holdfast::sockmap::{Attach, PairHandle, SockRelay};
use mio::net::{TcpListener as MioListener, TcpStream as MioStream};
use mio::{Events, Interest, Poll, Token};

struct Opts {
    holdfast: Option<String>,
    sessions: usize,
    round_trips: usize,
    size: usize,
    bulk_mib: usize,
    rounds: usize,
    /// SO_SNDBUF for the in-process relay's two sockets (0: the kernel's autotuning).
    proxy_sndbuf: usize,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        holdfast: None,
        sessions: 1000,
        round_trips: 20_000,
        size: 64,
        bulk_mib: 1024,
        rounds: 5,
        proxy_sndbuf: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--bench" {
            continue; // passed by `cargo bench`-style runners
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{flag}: not a positive number: {value}"))
        };
        match flag.as_str() {
            "--holdfast" => o.holdfast = Some(value.clone()),
            "--sessions" => o.sessions = num()?,
            "--round-trips" => o.round_trips = num()?,
            "--size" => o.size = num()?.min(64 * 1024),
            "--bulk-mib" => o.bulk_mib = num()?,
            "--rounds" => o.rounds = num()?,
            "--proxy-sndbuf" => o.proxy_sndbuf = num()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sockmap_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("sockmap_bench: {e}");
        std::process::exit(1);
    }
}

/// Ticks of the whole machine: (busy, all) from the first line of /proc/stat.
fn machine_ticks() -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((all - idle, all))
}

/// utime + stime of a process, in ticks.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the ")" that closes the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// utime + stime of the kernel's worker threads (kworker/*, ksoftirqd/*), in ticks: where the
/// in-kernel relay's deferred work (a psock's backlog) and overflowing softirqs are charged,
/// which no user process's counters show.
fn kthread_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut sum = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(c, _)| c)
            .unwrap_or("");
        if comm.starts_with("kworker") || comm.starts_with("ksoftirqd") {
            sum += process_ticks(pid);
        }
    }
    sum
}

fn ticks_per_second() -> f64 {
    // getconf CLK_TCK; 100 on every Linux this runs on, asked anyway.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The echo backend: one mio loop echoing every connection, pending bytes kept per socket.
/// A connection is served at most [`ECHO_TURN`] bytes a turn, then again after the others'
/// events (as holdfast's own workers do): a streaming neighbour must not starve the rest.
fn spawn_echo() -> io::Result<SocketAddr> {
    let std_listener = TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let mut listener = MioListener::from_std(std_listener);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, Token(0), Interest::READABLE)?;
    thread::spawn(move || {
        let mut conns: HashMap<usize, (MioStream, Vec<u8>)> = HashMap::new();
        let mut next = 1usize;
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 256 * 1024];
        // Connections that stopped on the turn's budget, served again next turn.
        let mut again: Vec<usize> = Vec::new();
        loop {
            let timeout = (!again.is_empty()).then_some(Duration::ZERO);
            if poll.poll(&mut events, timeout).is_err() {
                return;
            }
            let mut due = std::mem::take(&mut again);
            for ev in events.iter() {
                if ev.token() == Token(0) {
                    while let Ok((mut s, _)) = listener.accept() {
                        let _ = s.set_nodelay(true);
                        let t = Token(next);
                        next += 1;
                        if poll
                            .registry()
                            .register(&mut s, t, Interest::READABLE | Interest::WRITABLE)
                            .is_ok()
                        {
                            conns.insert(t.0, (s, Vec::new()));
                        }
                    }
                    continue;
                }
                if !due.contains(&ev.token().0) {
                    due.push(ev.token().0);
                }
            }
            for token in due {
                let Some((s, pending)) = conns.get_mut(&token) else {
                    continue;
                };
                let mut closed = false;
                let mut served = 0;
                loop {
                    // Flush first; read only while nothing is pending (backpressure).
                    while !pending.is_empty() {
                        match s.write(pending) {
                            Ok(n) => {
                                pending.drain(..n);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if closed || !pending.is_empty() {
                        break;
                    }
                    if served >= ECHO_TURN {
                        again.push(token);
                        break;
                    }
                    match s.read(&mut buf) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => {
                            served += n;
                            pending.extend_from_slice(&buf[..n]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if closed {
                    conns.remove(&token);
                }
            }
        }
    });
    Ok(addr)
}

/// Most bytes the echo backend reads from one connection in a turn.
const ECHO_TURN: usize = 256 * 1024;

/// The bulk sink: per connection, reads `total` bytes, then answers with their count.
fn spawn_sink(total: usize) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let mut got = 0usize;
                    while got < total {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got += n,
                        }
                    }
                    if s.write_all(&(got as u64).to_le_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// How clients reach the backends in one variant, and what holds that path up.
struct Variant {
    name: &'static str,
    echo_target: SocketAddr,
    sink_target: SocketAddr,
    children: Vec<Child>,
    relay: Option<SockRelay>,
    pairs: Vec<(TcpStream, TcpStream, PairHandle)>,
    sessions: Vec<TcpStream>,
    bulk: Option<TcpStream>,
    neighbour: Option<TcpStream>,
    insert_us: Vec<f64>,
}

impl Drop for Variant {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `holdfast --workers 1 --relay MODE` in front of `backend`; its listening address.
fn spawn_holdfast(bin: &str, mode: &str, backend: SocketAddr) -> io::Result<(Child, SocketAddr)> {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--workers", "1", "--relay", mode])
        .arg("--backend")
        .arg(backend.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| io::Error::other("no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or_else(|| io::Error::other("holdfast exited before listening"))??;
        if let Some(rest) = line.split("listening on ").nth(1) {
            let a = rest.split_whitespace().next().unwrap_or_default();
            break a
                .parse::<SocketAddr>()
                .map_err(|e| io::Error::other(format!("{a}: {e}")))?;
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    thread::spawn(move || for _ in lines {});
    Ok((child, addr))
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

impl Variant {
    fn new(
        name: &'static str,
        o: &Opts,
        echo: SocketAddr,
        sink: SocketAddr,
    ) -> io::Result<Variant> {
        let mut v = Variant {
            name,
            echo_target: echo,
            sink_target: sink,
            children: Vec::new(),
            relay: None,
            pairs: Vec::new(),
            sessions: Vec::new(),
            bulk: None,
            neighbour: None,
            insert_us: Vec::new(),
        };
        match name {
            "direct" => {}
            "sockmap" | "sockmap-v" => {
                let attach = if name == "sockmap" {
                    Attach::StreamVerdict
                } else {
                    Attach::Verdict
                };
                v.relay = Some(SockRelay::with(attach, (o.sessions + 16) as u32)?);
            }
            "copy" | "splice" => {
                let bin = o.holdfast.as_deref().ok_or_else(|| {
                    io::Error::other("--holdfast PATH is needed for copy and splice")
                })?;
                // One holdfast per backend: given both, it would balance between them.
                let (child, addr) = spawn_holdfast(bin, name, echo)?;
                v.children.push(child);
                v.echo_target = addr;
                let (child, addr) = spawn_holdfast(bin, name, sink)?;
                v.children.push(child);
                v.sink_target = addr;
            }
            _ => return Err(io::Error::other(format!("unknown variant {name}"))),
        }
        Ok(v)
    }

    /// One session: with the in-process relay, a client of `proxy`'s, whose accepted socket
    /// is paired with a new connection to `target`; otherwise a plain connection to `target`.
    fn open(
        &mut self,
        target: SocketAddr,
        proxy: &TcpListener,
        sndbuf: usize,
    ) -> io::Result<TcpStream> {
        let Some(relay) = &self.relay else {
            return connect(target);
        };
        let client = connect(proxy.local_addr()?)?;
        let (a, _) = proxy.accept()?;
        a.set_nodelay(true)?;
        let b = connect(target)?;
        if sndbuf > 0 {
            socket2::SockRef::from(&a).set_send_buffer_size(sndbuf)?;
            socket2::SockRef::from(&b).set_send_buffer_size(sndbuf)?;
        }
        let t = Instant::now();
        let h = relay.insert_pair(&a, &b)?;
        self.insert_us.push(t.elapsed().as_secs_f64() * 1e6);
        self.pairs.push((a, b, h));
        Ok(client)
    }

    fn setup(&mut self, o: &Opts) -> io::Result<()> {
        let proxy = TcpListener::bind("127.0.0.1:0")?;
        for _ in 0..o.sessions {
            let mut s = self.open(self.echo_target, &proxy, o.proxy_sndbuf)?;
            // Prove the session with one round trip.
            s.write_all(&[7u8])?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            self.sessions.push(s);
        }
        self.bulk = Some(self.open(self.sink_target, &proxy, o.proxy_sndbuf)?);
        // The busy neighbour: one more session to the echo backend, through the same path
        // (the same holdfast, the same sockhash) as the small-message sessions.
        self.neighbour = Some(self.open(self.echo_target, &proxy, o.proxy_sndbuf)?);
        Ok(())
    }

    fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.children.iter().map(|c| c.id())
    }
}

#[derive(Default, Clone)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    machine_us_per_rt: f64,
    procs_us_per_rt: f64,
    bulk_gbps: f64,
    bulk_machine_s_per_gib: f64,
    bulk_procs_s_per_gib: f64,
    nb_p50_us: f64,
    nb_p99_us: f64,
}

struct Cpu {
    machine: (u64, u64),
    procs: u64,
    kthreads: u64,
}

fn cpu(pids: &[u32]) -> io::Result<Cpu> {
    Ok(Cpu {
        machine: machine_ticks()?,
        procs: pids.iter().map(|&p| process_ticks(p)).sum(),
        kthreads: kthread_ticks(),
    })
}

/// An error of one variant's run, saying which variant and which phase (a 30 s read timeout
/// otherwise reads as a bare "Resource temporarily unavailable").
fn phase(variant: &str, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{variant}, {what}: {e}"))
}

fn measure(v: &mut Variant, o: &Opts, tck: f64, hf_pids: &[u32]) -> io::Result<Sample> {
    let mut pids = vec![std::process::id()];
    pids.extend(hf_pids);
    let msg = vec![0x5au8; o.size];
    let mut back = vec![0u8; o.size];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let c0 = cpu(&pids)?;
    let n = v.sessions.len();
    for i in 0..o.round_trips {
        let s = &mut v.sessions[i % n];
        let t = Instant::now();
        s.write_all(&msg)
            .and_then(|()| s.read_exact(&mut back))
            .map_err(|e| phase(v.name, "round trips", e))?;
        let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
    }
    let c1 = cpu(&pids)?;
    let rts = o.round_trips as f64;
    let mut sample = Sample {
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        machine_us_per_rt: (c1.machine.0 - c0.machine.0) as f64 / tck * 1e6 / rts,
        procs_us_per_rt: (c1.procs - c0.procs + c1.kthreads.saturating_sub(c0.kthreads)) as f64
            / tck
            * 1e6
            / rts,
        ..Sample::default()
    };

    // Bulk: one stream, `bulk_mib` MiB, then the sink's 8-byte answer.
    let total = o.bulk_mib * 1024 * 1024;
    let chunk = vec![0xa5u8; 128 * 1024];
    let bulk = v
        .bulk
        .as_mut()
        .ok_or_else(|| io::Error::other("no bulk session"))?;
    let c0 = cpu(&pids)?;
    let t = Instant::now();
    let mut left = total;
    while left > 0 {
        let k = left.min(chunk.len());
        bulk.write_all(&chunk[..k])
            .map_err(|e| phase(v.name, "bulk to the sink", e))?;
        left -= k;
    }
    let mut answer = [0u8; 8];
    bulk.read_exact(&mut answer)
        .map_err(|e| phase(v.name, "bulk to the sink", e))?;
    let secs = t.elapsed().as_secs_f64();
    let c1 = cpu(&pids)?;
    if u64::from_le_bytes(answer) != total as u64 {
        return Err(io::Error::other("the sink counted a different byte total"));
    }
    sample.bulk_gbps = total as f64 / secs / 1e9;
    let gib = total as f64 / (1u64 << 30) as f64;
    sample.bulk_machine_s_per_gib = (c1.machine.0 - c0.machine.0) as f64 / tck / gib;
    sample.bulk_procs_s_per_gib =
        (c1.procs - c0.procs + c1.kthreads.saturating_sub(c0.kthreads)) as f64 / tck / gib;

    // Many sessions at once: the same small round trips while one neighbour session streams
    // bulk through the same path (echoed back, read by a second thread).
    let (p50, p99) = with_neighbour(v, o).map_err(|e| phase(v.name, "busy neighbour", e))?;
    sample.nb_p50_us = p50;
    sample.nb_p99_us = p99;
    Ok(sample)
}

/// Small round trips on the sessions while the neighbour session streams 128 KiB writes to
/// the echo backend the whole time; returns their p50 and p99 in µs.
fn with_neighbour(v: &mut Variant, o: &Opts) -> io::Result<(f64, f64)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let nb = v
        .neighbour
        .as_ref()
        .ok_or_else(|| io::Error::other("no neighbour session"))?;
    let (mut tx, mut rx) = (nb.try_clone()?, nb.try_clone()?);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer_done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, written, done) = (stop.clone(), written.clone(), writer_done.clone());
        thread::spawn(move || -> io::Result<()> {
            let chunk = vec![0x3cu8; 128 * 1024];
            let r = (|| {
                while !stop.load(Ordering::Relaxed) {
                    tx.write_all(&chunk)?;
                    written.fetch_add(chunk.len() as u64, Ordering::Release);
                }
                Ok(())
            })();
            done.store(true, Ordering::Release);
            r
        })
    };
    let reader = {
        let (written, done) = (written.clone(), writer_done.clone());
        thread::spawn(move || -> io::Result<u64> {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            // Until the writer is done and every byte it wrote came back.
            while !(done.load(Ordering::Acquire) && got >= written.load(Ordering::Acquire)) {
                match rx.read(&mut buf) {
                    Ok(0) => return Err(io::Error::other("the neighbour's echo ended")),
                    Ok(n) => got += n as u64,
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        })
    };
    // Measure only once the neighbour is streaming.
    while written.load(Ordering::Acquire) == 0 && !writer_done.load(Ordering::Acquire) {
        thread::yield_now();
    }
    let msg = vec![0x5au8; o.size];
    let mut back = vec![0u8; o.size];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let n = v.sessions.len();
    let mut result = Ok(());
    for i in 0..o.round_trips {
        let s = &mut v.sessions[i % n];
        let t = Instant::now();
        if let Err(e) = s.write_all(&msg).and_then(|()| s.read_exact(&mut back)) {
            result = Err(e);
            break;
        }
        let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
    }
    stop.store(true, Ordering::Relaxed);
    let w = writer
        .join()
        .map_err(|_| io::Error::other("the neighbour's writer panicked"))?;
    let r = reader
        .join()
        .map_err(|_| io::Error::other("the neighbour's reader panicked"))?;
    result?;
    w?;
    r?;
    Ok((
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn run(o: &Opts) -> io::Result<()> {
    let tck = ticks_per_second();
    let echo = spawn_echo()?;
    let sink = spawn_sink(o.bulk_mib * 1024 * 1024)?;
    println!(
        "# sockmap_bench: kernel {}, {} sessions per variant, {} round trips of {} B per run, bulk {} MiB, {} rounds",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        o.sessions,
        o.round_trips,
        o.size,
        o.bulk_mib,
        o.rounds
    );
    let mut variants = Vec::new();
    let mut names = vec!["direct", "sockmap", "sockmap-v"];
    if o.holdfast.is_some() {
        names.extend(["copy", "splice"]);
    }
    let mut holdfast_pids = Vec::new();
    for name in names {
        match Variant::new(name, o, echo, sink).and_then(|mut v| {
            v.setup(o)?;
            Ok(v)
        }) {
            Ok(v) => {
                holdfast_pids.extend(v.pids());
                variants.push(v);
            }
            Err(e) => println!("# {name}: unavailable: {e}"),
        }
    }
    for v in &variants {
        if !v.insert_us.is_empty() {
            let (m, lo, hi) = median(v.insert_us.clone());
            println!(
                "# {}: insert_pair {m:.1} µs median ({lo:.1}..{hi:.1})",
                v.name
            );
        }
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    println!(
        "# round variant p50_us p99_us machine_us/rt ours_us/rt bulk_GB/s machine_s/GiB ours_s/GiB nb_p50_us nb_p99_us others_busy_cores_before"
    );
    for r in 0..o.rounds {
        for k in 0..variants.len() {
            let i = (k + r) % variants.len();
            // The machine's busy cores just before, while we do nothing: the noise floor.
            let m0 = machine_ticks()?;
            thread::sleep(Duration::from_millis(300));
            let m1 = machine_ticks()?;
            let busy_cores = (m1.0 - m0.0) as f64 / ((m1.1 - m0.1).max(1) as f64)
                * thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
            let s = measure(&mut variants[i], o, tck, &holdfast_pids)?;
            println!(
                "{r} {:<9} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>6.2} {:>6.2} {:>6.2} {:>7.1} {:>7.1} {busy_cores:.2}",
                variants[i].name,
                s.p50_us,
                s.p99_us,
                s.machine_us_per_rt,
                s.procs_us_per_rt,
                s.bulk_gbps,
                s.bulk_machine_s_per_gib,
                s.bulk_procs_s_per_gib,
                s.nb_p50_us,
                s.nb_p99_us
            );
            samples[i].push(s);
        }
    }
    println!();
    println!(
        "| variant | p50 µs | p99 µs | added p50 over direct µs | machine CPU µs/rt | our CPU µs/rt | bulk GB/s | machine CPU s/GiB | our CPU s/GiB | p50 µs, bulk neighbour | p99 µs, bulk neighbour |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let direct_p50 = samples
        .first()
        .map(|s| median(s.iter().map(|x| x.p50_us).collect()).0)
        .unwrap_or(f64::NAN);
    for (v, s) in variants.iter().zip(&samples) {
        let col = |f: fn(&Sample) -> f64| {
            let (m, lo, hi) = median(s.iter().map(f).collect());
            format!("{m:.2} ({lo:.2}..{hi:.2})")
        };
        let p50 = median(s.iter().map(|x| x.p50_us).collect()).0;
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            col(|x| x.p50_us),
            col(|x| x.p99_us),
            p50 - direct_p50,
            col(|x| x.machine_us_per_rt),
            col(|x| x.procs_us_per_rt),
            col(|x| x.bulk_gbps),
            col(|x| x.bulk_machine_s_per_gib),
            col(|x| x.bulk_procs_s_per_gib),
            col(|x| x.nb_p50_us),
            col(|x| x.nb_p99_us)
        );
    }
    // Removal cost, then everything closes.
    for v in &mut variants {
        if let Some(relay) = &v.relay {
            let t = Instant::now();
            let n = v.pairs.len();
            for (_, _, h) in &v.pairs {
                relay.remove_pair(*h)?;
            }
            if n > 0 {
                println!(
                    "# {}: remove_pair {:.1} µs mean",
                    v.name,
                    t.elapsed().as_secs_f64() * 1e6 / n as f64
                );
            }
        }
    }
    drop(variants);
    Ok(())
}
