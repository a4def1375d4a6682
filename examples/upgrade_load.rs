//! Load for `scripts/bench-upgrade.sh`: N long-lived sessions to an echo service (through a
//! proxy), each sending a 32-byte message every `--interval` (phases spread evenly), each echo
//! checked byte for byte and in order, each round trip timed.
//!
//! Control on stdin, one word a line: `mark` opens the measured window (the upgrade or reload
//! happens inside it), `end` closes it; sending then stops, echoes still owed are awaited (up
//! to `--drain`), the report is printed on stdout and the program exits. `holding N` goes to
//! stderr once every session is established.
//!
//! A session's pause is the largest send-to-echo time of a message sent or echoed inside the
//! window; the report gives p50/p99/max over sessions. A session is kept if it never closed or
//! failed and every message it sent came back.
//!
//! ```text
//! upgrade_load --target 127.0.0.1:8080 --conns 5000 [--interval 100ms] [--threads 2] [--drain 10s]
//! ```

use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const MSG: usize = 32;
const BEFORE: u8 = 0;
const WINDOW: u8 = 1;
const STOP: u8 = 2;

struct Opts {
    target: SocketAddr,
    conns: usize,
    interval: Duration,
    threads: usize,
    drain: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("bad duration {s:?}")),
    }
}

fn parse_opts() -> Result<Opts, String> {
    let mut opts = Opts {
        target: "127.0.0.1:0".parse().map_err(|_| "unreachable")?,
        conns: 0,
        interval: Duration::from_millis(100),
        threads: 2,
        drain: Duration::from_secs(10),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = format!("bad value {value:?} for {flag}");
        match flag.as_str() {
            "--target" => opts.target = value.parse().map_err(|_| bad.clone())?,
            "--conns" => opts.conns = value.parse().map_err(|_| bad.clone())?,
            "--threads" => opts.threads = value.parse().map_err(|_| bad.clone())?,
            "--interval" => opts.interval = parse_duration(&value)?,
            "--drain" => opts.drain = parse_duration(&value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if opts.conns == 0 || opts.threads == 0 || opts.target.port() == 0 {
        return Err("--target and --conns are required; --threads >= 1".into());
    }
    Ok(opts)
}

/// Message `seq` of session `id`: its id, its number, and bytes that depend on both.
fn message(id: u32, seq: u64) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    m[..4].copy_from_slice(&id.to_le_bytes());
    m[4..12].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in m[12..].iter_mut().enumerate() {
        *b = (id as u64 * 31 + seq * 7 + i as u64) as u8;
    }
    m
}

struct Session {
    id: u32,
    stream: TcpStream,
    next_seq: u64,
    /// Sent, echo not yet read: (seq, sent at, sent inside the window).
    owed: VecDeque<(u64, Instant, bool)>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    failed: Option<String>,
    /// When `failed` was set.
    failed_at: Option<Instant>,
    pause: Duration,
    verified: u64,
}

#[derive(Default)]
struct Totals {
    kept: usize,
    cut: usize,
    failures: Vec<String>,
    verified_bytes: u64,
    messages: u64,
    before_rtt_us: Vec<u64>,
    pauses_us: Vec<u64>,
    /// When sessions failed (including a failed write when sending).
    cut_at: Vec<Instant>,
}

fn run_thread(
    mut sessions: Vec<Session>,
    interval: Duration,
    drain: Duration,
    phase: &AtomicU8,
    totals: &Mutex<Totals>,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    for (i, s) in sessions.iter_mut().enumerate() {
        poll.registry().register(
            &mut s.stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
    }
    let start = Instant::now();
    let n = sessions.len().max(1) as u32;
    let mut due: BinaryHeap<std::cmp::Reverse<(Instant, usize)>> = (0..sessions.len())
        .map(|i| std::cmp::Reverse((start + interval * i as u32 / n, i)))
        .collect();
    let mut before_rtt = Vec::new();
    let mut stop_at = None;
    loop {
        let now = Instant::now();
        let ph = phase.load(Ordering::SeqCst);
        if ph == STOP && stop_at.is_none() {
            stop_at = Some(now);
        }
        if let Some(at) = stop_at
            && (now >= at + drain
                || sessions
                    .iter()
                    .all(|s| s.owed.is_empty() || s.failed.is_some()))
        {
            break;
        }
        // Send what is due.
        while stop_at.is_none() {
            match due.peek() {
                Some(std::cmp::Reverse((t, _))) if *t <= now => {}
                _ => break,
            }
            let Some(std::cmp::Reverse((t, i))) = due.pop() else {
                break;
            };
            let s = &mut sessions[i];
            if s.failed.is_some() {
                continue;
            }
            s.out.extend_from_slice(&message(s.id, s.next_seq));
            s.owed.push_back((s.next_seq, now, ph == WINDOW));
            s.next_seq += 1;
            flush(s);
            if s.failed.is_some() {
                s.failed_at = Some(now);
            }
            due.push(std::cmp::Reverse((t + interval, i)));
        }
        let timeout = due
            .peek()
            .map(|std::cmp::Reverse((t, _))| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(10))
            .min(Duration::from_millis(10));
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(e);
        }
        for ev in events.iter() {
            let s = &mut sessions[ev.token().0];
            if s.failed.is_some() {
                continue;
            }
            if ev.is_writable() {
                flush(s);
            }
            read_echoes(s, phase, &mut before_rtt);
            if s.failed.is_some() && s.failed_at.is_none() {
                s.failed_at = Some(Instant::now());
            }
        }
    }
    let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
    for s in &sessions {
        t.verified_bytes += s.verified * MSG as u64;
        t.messages += s.verified;
        match &s.failed {
            None if s.owed.is_empty() => t.kept += 1,
            None => {
                t.cut += 1;
                t.failures.push(format!(
                    "session {}: {} echoes never came",
                    s.id,
                    s.owed.len()
                ));
            }
            Some(why) => {
                t.cut += 1;
                t.failures.push(why.clone());
                t.cut_at.extend(s.failed_at);
            }
        }
        t.pauses_us.push(s.pause.as_micros() as u64);
    }
    t.before_rtt_us.extend(before_rtt);
    Ok(())
}

fn flush(s: &mut Session) {
    while !s.out.is_empty() {
        match s.stream.write(&s.out) {
            Ok(0) => {
                s.failed = Some(format!("session {}: write returned 0", s.id));
                return;
            }
            Ok(n) => {
                s.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                s.failed = Some(format!("session {}: write: {e}", s.id));
                return;
            }
        }
    }
}

fn read_echoes(s: &mut Session, phase: &AtomicU8, before_rtt: &mut Vec<u64>) {
    let mut buf = [0u8; 4096];
    loop {
        match s.stream.read(&mut buf) {
            Ok(0) => {
                s.failed = Some(format!("session {}: closed by the proxy", s.id));
                return;
            }
            Ok(n) => s.inbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                s.failed = Some(format!("session {}: read: {e}", s.id));
                return;
            }
        }
    }
    let now = Instant::now();
    let in_window = phase.load(Ordering::SeqCst) == WINDOW;
    let mut used = 0;
    while s.inbuf.len() - used >= MSG {
        let Some((seq, sent, sent_in_window)) = s.owed.pop_front() else {
            s.failed = Some(format!("session {}: an echo nobody sent", s.id));
            return;
        };
        if s.inbuf[used..used + MSG] != message(s.id, seq) {
            s.failed = Some(format!("session {}: echo of message {seq} altered", s.id));
            return;
        }
        used += MSG;
        s.verified += 1;
        let rtt = now - sent;
        if sent_in_window || in_window {
            s.pause = s.pause.max(rtt);
        } else {
            before_rtt.push(rtt.as_micros() as u64);
        }
    }
    s.inbuf.drain(..used);
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut sessions = Vec::with_capacity(opts.conns);
    for id in 0..opts.conns {
        let std_stream =
            match std::net::TcpStream::connect_timeout(&opts.target, Duration::from_secs(10))
                .and_then(|s| s.set_nodelay(true).map(|()| s))
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: connect {id}: {e}");
                    std::process::exit(1);
                }
            };
        sessions.push(Session {
            id: id as u32,
            stream: TcpStream::from_std(std_stream),
            next_seq: 0,
            owed: VecDeque::new(),
            out: Vec::new(),
            inbuf: Vec::new(),
            failed: None,
            failed_at: None,
            pause: Duration::ZERO,
            verified: 0,
        });
    }
    eprintln!("holding {}", opts.conns);
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let per = opts.conns.div_ceil(opts.threads);
    let mut threads = Vec::new();
    while !sessions.is_empty() {
        let rest = sessions.split_off(per.min(sessions.len()));
        let mine = std::mem::replace(&mut sessions, rest);
        let (phase, totals) = (Arc::clone(&phase), Arc::clone(&totals));
        let (interval, drain) = (opts.interval, opts.drain);
        threads.push(std::thread::spawn(move || {
            run_thread(mine, interval, drain, &phase, &totals)
        }));
    }
    let mut window = (None, None);
    for line in io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("mark") => {
                window.0 = Some(Instant::now());
                phase.store(WINDOW, Ordering::SeqCst);
            }
            Ok("end") | Err(_) => break,
            _ => {}
        }
    }
    window.1 = Some(Instant::now());
    phase.store(STOP, Ordering::SeqCst);
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("error: a load thread: {e}"),
            Err(_) => eprintln!("error: a load thread panicked"),
        }
    }
    let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
    t.before_rtt_us.sort_unstable();
    t.pauses_us.sort_unstable();
    let span = match window {
        (Some(a), Some(b)) => format!("{:.1} s", (b - a).as_secs_f64()),
        _ => "none".into(),
    };
    println!("sessions: {}", opts.conns);
    println!("sessions kept: {}", t.kept);
    println!("sessions cut: {}", t.cut);
    println!("messages verified: {}", t.messages);
    println!("bytes verified: {}", t.verified_bytes);
    println!("window: {span}");
    println!(
        "round trip before the window: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} messages)",
        pct(&t.before_rtt_us, 0.5),
        pct(&t.before_rtt_us, 0.99),
        pct(&t.before_rtt_us, 1.0),
        t.before_rtt_us.len()
    );
    println!(
        "pause in the window (largest send-to-echo per session): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&t.pauses_us, 0.5),
        pct(&t.pauses_us, 0.99),
        pct(&t.pauses_us, 1.0)
    );
    if let (Some(mark), Some(first), Some(last)) =
        (window.0, t.cut_at.iter().min(), t.cut_at.iter().max())
    {
        let since = |at: &Instant| at.saturating_duration_since(mark).as_secs_f64();
        println!(
            "cut {:.2} s to {:.2} s after the window opened",
            since(first),
            since(last)
        );
    }
    for f in t.failures.iter().take(3) {
        println!("  {f}");
    }
}
