//! Live upgrade, the proof (issue #12): what a user would see across real upgrades between
//! real `holdfast` processes. WebSockets through three take-overs in a row, a 256 MiB stream
//! through each relay mode, half-closed sessions, a connect storm, and new processes that fail
//! (a bad flag; a peer on the upgrade socket that never answers).
//!
//! The basics (sessions with a message in flight, SIGUSR2, the pid file, a new binary that
//! exits or never connects) are in `upgrade.rs`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tungstenite::Message;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(60);

/// A running holdfast that can be taken over: `--upgrade-socket` on a path of its own.
struct Upgradable {
    hf: Child,
    socket: TempFile,
    args: Vec<String>,
}

impl Upgradable {
    /// `holdfast <args> --workers 2 --upgrade-socket <temp path>`.
    fn start(args: &[&str]) -> Upgradable {
        let socket = TempFile::new("upgrade-sock", "");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--workers".into(), "2".into()]);
        let mut all = args.clone();
        all.extend(["--upgrade-socket".into(), path_of(&socket)]);
        let hf = Child::spawn(&all.iter().map(String::as_str).collect::<Vec<_>>());
        hf.wait_for_stderr("listening on", IO_TIMEOUT);
        Upgradable { hf, socket, args }
    }

    fn addr(&self) -> SocketAddr {
        self.hf.addr()
    }

    fn path(&self) -> String {
        path_of(&self.socket)
    }

    /// Starts a new process with the same arguments plus `--take-over` and `--upgrade-socket`
    /// on the same path (as docs/operations.md shows), waits until it says it took over and
    /// the old one has exited 0 after handing `sessions` sessions over; the new one is
    /// returned, ready for the next upgrade.
    fn upgrade(mut self, sessions: usize) -> Upgradable {
        let path = self.path();
        let mut args = self.args.clone();
        args.extend([
            "--take-over".into(),
            path.clone(),
            "--upgrade-socket".into(),
            path,
        ]);
        let new = Child::spawn_on(
            self.addr(),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        new.wait_for_stderr("upgrade: took over", WAIT);
        let status = self
            .hf
            .wait_exit(WAIT)
            .expect("the old process exits after the handover");
        let log = self.hf.stderr();
        assert!(status.success(), "old process: {status}; stderr:\n{log}");
        assert!(
            log.contains(&format!("handed {sessions} sessions over")),
            "old stderr:\n{log}"
        );
        Upgradable {
            hf: new,
            socket: self.socket,
            args: self.args,
        }
    }
}

fn path_of(file: &TempFile) -> String {
    file.path()
        .to_str()
        .expect("temp paths are UTF-8")
        .to_owned()
}

/// A WebSocket server that echoes every data message and counts, per connection, the
/// messages it received (so a duplicate or a reconnect would show).
struct WsEcho {
    server: ScriptedBackend,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<usize>>>,
}

impl WsEcho {
    fn start() -> WsEcho {
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let (accepted, received) = (Arc::clone(&accepted), Arc::clone(&received));
            ScriptedBackend::start(move |stream| {
                let Ok(mut ws) = tungstenite::accept(NoEintr(stream)) else {
                    return;
                };
                accepted.fetch_add(1, SeqCst);
                let me = {
                    let mut r = received.lock().unwrap();
                    r.push(0);
                    r.len() - 1
                };
                loop {
                    match ws.read() {
                        Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                            received.lock().unwrap()[me] += 1;
                            if ws.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(Message::Close(_)) => {
                            let _ = ws.flush();
                            return;
                        }
                        Ok(_) => {}
                        // A read timeout is an idle client, not an end.
                        Err(tungstenite::Error::Io(e))
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        WsEcho {
            server,
            accepted,
            received,
        }
    }
}

/// Message `n` of WebSocket client `c`.
fn ws_message(c: usize, n: usize) -> String {
    format!(
        "client {c} message {n} {}",
        "x".repeat((c * 131 + n * 37) % 2000)
    )
}

/// Real WebSocket clients keep exchanging messages (four in flight each, so bytes are in
/// transit at every moment) while the process serving them is replaced three times in a row
/// (1 -> 2 -> 3 -> 4, each taking over from the one before): no session closes, none
/// reconnects, every echo arrives once and in order, and the server got each message once.
#[test]
fn websockets_keep_exchanging_through_three_upgrades_in_a_row() {
    const CLIENTS: usize = 8;
    const AHEAD: usize = 4;
    let backend = WsEcho::start();
    let backend_arg = backend.server.addr().to_string();
    let mut hf = Upgradable::start(&["--backend", &backend_arg]);
    let addr = hf.addr();

    let stop = Arc::new(AtomicBool::new(false));
    let echoed: Arc<Vec<AtomicUsize>> =
        Arc::new((0..CLIENTS).map(|_| AtomicUsize::new(0)).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let stream = client(addr);
            let (mut ws, _) = tungstenite::client(format!("ws://{addr}/c{c}"), NoEintr(stream))
                .expect("WebSocket handshake through holdfast");
            let (stop, echoed) = (Arc::clone(&stop), Arc::clone(&echoed));
            std::thread::spawn(move || -> Result<usize, String> {
                let mut sent = 0;
                for _ in 0..AHEAD {
                    ws.send(Message::text(ws_message(c, sent)))
                        .map_err(|e| format!("client {c}: send {sent}: {e}"))?;
                    sent += 1;
                }
                let mut got = 0;
                while got < sent {
                    let m = ws
                        .read()
                        .map_err(|e| format!("client {c}: read of echo {got}: {e}"))?;
                    let Message::Text(text) = m else {
                        return Err(format!("client {c}: {m:?} instead of echo {got}"));
                    };
                    if text.as_str() != ws_message(c, got) {
                        return Err(format!(
                            "client {c}: echo {got} is {:?}",
                            &text.as_str()[..text.len().min(40)]
                        ));
                    }
                    got += 1;
                    echoed[c].store(got, SeqCst);
                    if !stop.load(SeqCst) {
                        ws.send(Message::text(ws_message(c, sent)))
                            .map_err(|e| format!("client {c}: send {sent}: {e}"))?;
                        sent += 1;
                    }
                }
                ws.close(None)
                    .map_err(|e| format!("client {c}: close: {e}"))?;
                // The close handshake completes: the session was never cut.
                loop {
                    match ws.read() {
                        Ok(_) => {}
                        Err(tungstenite::Error::ConnectionClosed) => return Ok(got),
                        Err(e) => return Err(format!("client {c}: after close: {e}")),
                    }
                }
            })
        })
        .collect();

    // Every client makes progress in every process generation.
    let progressed = |since: &[usize]| {
        wait_until_ok(WAIT, || {
            match (0..CLIENTS).find(|&c| echoed[c].load(SeqCst) < since[c] + 20) {
                None => Ok(()),
                Some(c) => Err(format!("client {c} stalled at {}", echoed[c].load(SeqCst))),
            }
        })
    };
    let snapshot = || {
        (0..CLIENTS)
            .map(|c| echoed[c].load(SeqCst))
            .collect::<Vec<_>>()
    };
    progressed(&[0; CLIENTS]);
    for _ in 0..3 {
        hf = hf.upgrade(CLIENTS);
        progressed(&snapshot());
    }
    stop.store(true, SeqCst);
    let mut totals = Vec::new();
    for (c, t) in clients.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(n)) => totals.push(n),
            Ok(Err(e)) => panic!("{e}; holdfast stderr:\n{}", hf.hf.stderr()),
            Err(_) => panic!("client {c} panicked"),
        }
    }
    assert_eq!(
        backend.accepted.load(SeqCst),
        CLIENTS,
        "a client reconnected or a session was opened twice"
    );
    let mut received = backend.received.lock().unwrap().clone();
    received.sort_unstable();
    totals.sort_unstable();
    assert_eq!(
        received, totals,
        "the server got a message twice or not at all"
    );
}

/// 256 MiB: the shared random data twice.
const STREAM: usize = 256 << 20;

fn stream_byte_chunks() -> impl Iterator<Item = &'static [u8]> {
    let data = shared_random();
    std::iter::repeat_n(data, STREAM / data.len()).flat_map(|d| d.chunks(1 << 20))
}

/// A 256 MiB stream echoed through holdfast with `--relay <relay>`, replaced by a new process
/// once 64 MiB have come back. The writer holds its last 64 MiB until the upgrade is over, so
/// the upgrade happens with the stream in full flow, not after it: the echo is the same 256
/// MiB byte for byte (sha256).
fn stream_across_an_upgrade(relay: &str) {
    // One 256 MiB stream at a time: two at once would take both cores of a small machine
    // from the timing-sensitive tests running beside them.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let expected = {
        static DIGEST: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DIGEST.get_or_init(|| {
            let mut h = Sha256::new();
            stream_byte_chunks().for_each(|c| h.update(c));
            h.finalize().to_vec()
        })
    };
    let backend = EchoBackend::start();
    let backend_arg = backend.addr().to_string();
    let hf = Upgradable::start(&["--backend", &backend_arg, "--relay", relay]);
    let mut up = client(hf.addr());
    let mut down = up.try_clone().unwrap();
    let upgraded = Arc::new(AtomicBool::new(false));
    let read_back = Arc::new(AtomicUsize::new(0));

    let writer = {
        let upgraded = Arc::clone(&upgraded);
        std::thread::spawn(move || -> io::Result<()> {
            let mut written = 0;
            for chunk in stream_byte_chunks() {
                if written == STREAM - (64 << 20) {
                    wait_until(WAIT, || upgraded.load(SeqCst));
                }
                up.write_all(chunk)?;
                written += chunk.len();
            }
            up.shutdown(Shutdown::Write)
        })
    };
    let reader = {
        let read_back = Arc::clone(&read_back);
        std::thread::spawn(move || -> io::Result<(usize, Vec<u8>)> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            loop {
                let n = down.read(&mut buf)?;
                if n == 0 {
                    return Ok((total, h.finalize().to_vec()));
                }
                h.update(&buf[..n]);
                total += n;
                read_back.store(total, SeqCst);
            }
        })
    };

    wait_until_ok(WAIT, || {
        let n = read_back.load(SeqCst);
        if n >= 64 << 20 {
            Ok(())
        } else {
            Err(format!("{n} bytes read back"))
        }
    });
    let at_upgrade = read_back.load(SeqCst);
    let hf = hf.upgrade(1);
    upgraded.store(true, SeqCst);
    writer
        .join()
        .expect("writer panicked")
        .unwrap_or_else(|e| panic!("writing: {e}; stderr:\n{}", hf.hf.stderr()));
    let (total, digest) = reader
        .join()
        .expect("reader panicked")
        .unwrap_or_else(|e| panic!("reading: {e}; stderr:\n{}", hf.hf.stderr()));
    assert!(
        at_upgrade < STREAM,
        "the stream was over before the upgrade"
    );
    assert_eq!(total, STREAM, "bytes echoed");
    assert!(&digest == expected, "the echo differs from what was sent");
}

#[test]
fn a_256_mib_stream_arrives_intact_across_an_upgrade_with_splice() {
    stream_across_an_upgrade("splice");
}

#[test]
fn a_256_mib_stream_arrives_intact_across_an_upgrade_with_copy() {
    stream_across_an_upgrade("copy");
}

/// Reads exactly `n` bytes.
fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Reads to the end (the peer's FIN).
fn read_rest(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    rest
}

/// Sessions half-closed before the upgrade stay so after it, in both directions.
/// Session A: the client shut its write side; the backend, which saw that EOF, sends more
/// after the upgrade, which arrives, then its own FIN. Session B: the backend shut its write
/// side (the client saw EOF); the client sends more after the upgrade, which the backend
/// receives before the client's FIN.
#[test]
fn half_closed_sessions_stay_half_closed_across_an_upgrade() {
    let upgraded = Arc::new(AtomicBool::new(false));
    let backend_got = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let backend = {
        let (upgraded, backend_got) = (Arc::clone(&upgraded), Arc::clone(&backend_got));
        ScriptedBackend::start(move |mut s| {
            let mut hello = [0u8; 1];
            if s.read_exact(&mut hello).is_err() {
                return;
            }
            match hello[0] {
                // A: read to the client's EOF, answer, wait for the upgrade, answer more.
                b'A' => {
                    let mut got = Vec::new();
                    if s.read_to_end(&mut got).is_err() || s.write_all(b"before").is_err() {
                        return;
                    }
                    wait_until(WAIT, || upgraded.load(SeqCst));
                    let _ = s.write_all(b" and after the upgrade");
                    let _ = s.shutdown(Shutdown::Write);
                }
                // B: shut our write side at once, then read what the client still sends.
                _ => {
                    let _ = s.write_all(b"bye");
                    let _ = s.shutdown(Shutdown::Write);
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got);
                    backend_got.lock().unwrap().push(got);
                }
            }
        })
    };
    let backend_arg = backend.addr().to_string();
    let hf = Upgradable::start(&["--backend", &backend_arg]);

    let mut a = client(hf.addr());
    a.write_all(b"Ahello").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut a, 6), b"before");

    let mut b = client(hf.addr());
    b.write_all(b"B").unwrap();
    assert_eq!(
        read_rest(&mut b),
        b"bye",
        "the backend's FIN reaches the client"
    );
    b.write_all(b"still talking").unwrap();

    let hf = hf.upgrade(2);
    upgraded.store(true, SeqCst);
    assert_eq!(
        read_rest(&mut a),
        b" and after the upgrade",
        "session A after the upgrade"
    );
    b.write_all(b" after the upgrade").unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    wait_until_ok(WAIT, || match backend_got.lock().unwrap().first() {
        Some(got) if got == b"still talking after the upgrade" => Ok(()),
        other => Err(format!(
            "the backend got {:?}; stderr:\n{}",
            other.map(|g| String::from_utf8_lossy(g).into_owned()),
            hf.hf.stderr()
        )),
    });
}

/// Four threads connect in a loop (each connection one round trip, then closed) before,
/// during and after an upgrade: every one of them, at least 500, is accepted and served, by
/// the old process or the new one; none is refused or reset.
#[test]
fn a_connect_storm_during_an_upgrade_loses_no_connection() {
    const THREADS: usize = 4;
    const AT_LEAST: usize = 500;
    let backend = EchoBackend::start();
    let backend_arg = backend.addr().to_string();
    let hf = Upgradable::start(&["--backend", &backend_arg]);
    let addr = hf.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let storm: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || -> Result<usize, String> {
                let mut n = 0;
                while !stop.load(SeqCst) {
                    let msg = format!("thread {t} connection {n}");
                    let mut s = TcpStream::connect(addr)
                        .map_err(|e| format!("connect {n} of thread {t}: {e}"))?;
                    set_timeouts(&s);
                    s.write_all(msg.as_bytes())
                        .and_then(|()| s.shutdown(Shutdown::Write))
                        .map_err(|e| format!("write {n} of thread {t}: {e}"))?;
                    let mut got = Vec::new();
                    s.read_to_end(&mut got)
                        .map_err(|e| format!("read {n} of thread {t}: {e}"))?;
                    if got != msg.as_bytes() {
                        return Err(format!("thread {t} connection {n}: echo {got:?}"));
                    }
                    n += 1;
                    served.fetch_add(1, SeqCst);
                }
                Ok(n)
            })
        })
        .collect();
    let at_least = |n: usize| {
        wait_until_ok(WAIT, || {
            let s = served.load(SeqCst);
            if s >= n || storm.iter().any(|t| t.is_finished()) {
                Ok(())
            } else {
                Err(format!("{s} served"))
            }
        })
    };
    at_least(100);
    let before = served.load(SeqCst);
    // Sessions of the storm may be open in the old process: it hands over what it holds.
    let socket_path = hf.path();
    let mut args = hf.args.clone();
    args.extend(["--take-over".into(), socket_path]);
    let new = Child::spawn_on(addr, &args.iter().map(String::as_str).collect::<Vec<_>>());
    new.wait_for_stderr("upgrade: took over", WAIT);
    let mut old = hf.hf;
    let status = old.wait_exit(WAIT).expect("the old process exits");
    assert!(status.success(), "old: {status}; stderr:\n{}", old.stderr());
    let after = served.load(SeqCst);
    at_least((after + 100).max(AT_LEAST));
    stop.store(true, SeqCst);
    let mut total = 0;
    for t in storm {
        match t.join().expect("storm thread panicked") {
            Ok(n) => total += n,
            Err(e) => panic!(
                "{e}\n(served {before} before the upgrade, {after} by its end)\nold stderr:\n{}\nnew stderr:\n{}",
                old.stderr(),
                new.stderr()
            ),
        }
    }
    assert!(total >= AT_LEAST, "only {total} connections");
    assert!(after > before, "no connection during the upgrade");
}

fn exchange(s: &mut TcpStream, what: &str) {
    s.write_all(what.as_bytes()).unwrap();
    assert_eq!(read_n(s, what.len()), what.as_bytes(), "echo of {what:?}");
}

/// Every session of `clients` still echoes, and a new client is served.
fn still_serving(clients: &mut [TcpStream], addr: SocketAddr, round: &str) {
    for (c, s) in clients.iter_mut().enumerate() {
        exchange(s, &format!("{round}: client {c}"));
    }
    let mut fresh = client(addr);
    exchange(&mut fresh, &format!("{round}: a new client"));
}

/// New processes that fail do not hurt the running one. One started with `--take-over` and
/// an invalid flag value exits 2 with a one-line error; a peer that connects to the upgrade
/// socket and never answers is given up after `--upgrade-timeout 1s`. The running process
/// keeps every session and accepts throughout, and a real new process then takes everything
/// over.
#[test]
fn failing_new_processes_leave_the_old_one_serving() {
    const SESSIONS: usize = 6;
    let backend = EchoBackend::start();
    let backend_arg = backend.addr().to_string();
    let hf = Upgradable::start(&["--backend", &backend_arg, "--upgrade-timeout", "1s"]);
    let addr = hf.addr();
    let mut clients: Vec<TcpStream> = (0..SESSIONS).map(|_| client(addr)).collect();
    still_serving(&mut clients, addr, "at first");

    // A bad flag: refused before anything is taken.
    let path = hf.path();
    let out = run_binary(
        &[
            "--listen",
            &addr.to_string(),
            "--backend",
            &backend_arg,
            "--take-over",
            &path,
            "--upgrade-timeout",
            "soon",
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("soon"), "the error names the bad value: {err}");
    still_serving(&mut clients, addr, "after the bad flag");

    // A configuration that parses but cannot serve (a backends file that lists none): found
    // once the new process has connected and been given the listeners; it fails, exits 2,
    // and the old one takes the listeners back.
    let empty = TempFile::new("backends", "# none\n");
    let out = run_binary(
        &[
            "--listen",
            &addr.to_string(),
            "--backends-file",
            &path_of(&empty),
            "--take-over",
            &path,
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no backends"), "the error says why: {err}");
    hf.hf.wait_for_stderr(
        "upgrade failed, keeping every session not handed over: the other process refused: \
         the new process cannot start: no backends",
        WAIT,
    );
    still_serving(&mut clients, addr, "after the bad configuration");

    // A peer that connects and never answers: given up at the timeout, everything kept.
    let silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
    hf.hf
        .wait_for_stderr("upgrade: a new process connected", WAIT);
    still_serving(&mut clients, addr, "while the silent peer is connected");
    hf.hf.wait_for_stderr(
        "upgrade failed, keeping every session not handed over: no answer within the upgrade timeout",
        WAIT,
    );
    still_serving(&mut clients, addr, "after the timeout");
    drop(silent);
    still_serving(&mut clients, addr, "after the silent peer left");
    assert_eq!(hf.hf.stderr().matches("a new process connected").count(), 2);

    // Nothing was lost on the way: a real upgrade takes every session.
    let hf = hf.upgrade(SESSIONS);
    still_serving(&mut clients, addr, "after the real upgrade");
    drop(hf);
}
