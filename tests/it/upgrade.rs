//! Live upgrade between two real `holdfast` processes: `--upgrade-socket` on the running one,
//! `--take-over` on the new one (issue #12).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

const SESSIONS: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

/// Message `n` of client `c`: distinct, of varying lengths.
fn message(c: usize, n: usize) -> Vec<u8> {
    let len = 1 + (c * 7919 + n * 104_729) % 30_000;
    (0..len).map(|i| (c * 31 + n * 17 + i) as u8).collect()
}

fn exchange(client: &mut TcpStream, c: usize, n: usize) {
    let sent = message(c, n);
    client.write_all(&sent).unwrap();
    let mut got = vec![0u8; sent.len()];
    client.read_exact(&mut got).unwrap();
    assert!(got == sent, "client {c}: message {n} came back altered");
}

/// Clients relaying through a running holdfast, each with a message in flight, keep their
/// sessions when a new holdfast started with `--take-over` takes them: the echo of the
/// message in flight arrives once, later round trips work, the new process listens on the
/// old one's sockets, the old process exits 0, and new clients on the same port are served
/// (by the new process).
#[test]
fn take_over_moves_every_relaying_session_to_a_new_process() {
    let backend = EchoBackend::start();
    let socket = TempFile::new("upgrade-sock", "");
    let path = socket.path().to_str().unwrap().to_owned();
    let backend_arg = backend.addr().to_string();
    let mut old = Child::spawn(&[
        "--backend",
        &backend_arg,
        "--workers",
        "2",
        "--upgrade-socket",
        &path,
    ]);
    old.wait_for_stderr("listening on", IO_TIMEOUT);
    let addr = old.addr();
    let mut clients: Vec<TcpStream> = (0..SESSIONS).map(|_| client(addr)).collect();
    for (c, cl) in clients.iter_mut().enumerate() {
        exchange(cl, c, 0);
        exchange(cl, c, 1);
    }
    // In flight across the handover: sent now, read back after it.
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.write_all(&message(c, 2)).unwrap();
    }

    let mut new = Child::spawn_on(
        addr,
        &[
            "--backend",
            &backend_arg,
            "--workers",
            "2",
            "--take-over",
            &path,
        ],
    );
    new.wait_for_stderr("upgrade: took over", WAIT);
    // The same sockets: one per old worker.
    assert!(
        new.stderr()
            .contains("starting on the old process's 2 listeners"),
        "new stderr:\n{}",
        new.stderr()
    );
    let status = old
        .wait_exit(WAIT)
        .expect("the old process exits after the handover");
    assert!(
        status.success(),
        "old process: {status}; stderr:\n{}",
        old.stderr()
    );
    assert!(
        old.stderr()
            .contains(&format!("handed {SESSIONS} sessions over")),
        "old stderr:\n{}",
        old.stderr()
    );

    for (c, cl) in clients.iter_mut().enumerate() {
        let sent = message(c, 2);
        let mut got = vec![0u8; sent.len()];
        cl.read_exact(&mut got).unwrap();
        assert!(
            got == sent,
            "client {c}: the message in flight came back altered"
        );
    }
    for n in 3..6 {
        for (c, cl) in clients.iter_mut().enumerate() {
            exchange(cl, c, n);
        }
    }
    // The old process is gone: a new client on the same port is served by the new one.
    let mut fresh = client(addr);
    exchange(&mut fresh, SESSIONS, 0);
    // Nothing more than was sent.
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        cl.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "client {c}: {} bytes too many", rest.len());
    }
    assert!(new.is_running(), "new stderr:\n{}", new.stderr());
}
