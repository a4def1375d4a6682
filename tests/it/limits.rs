//! Resource limits: running out of descriptors degrades and recovers; `--max-conns` holds
//! clients in the backlog instead of refusing them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

/// One round trip with a short read timeout: `true` if the echo came back.
fn served(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut back = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut back).is_ok() && &back == b"ping"
}

#[test]
fn running_out_of_descriptors_degrades_and_recovers() {
    let echo = EchoBackend::start();
    // 48 descriptors: the process's own handful, then room for about 20 sessions of two
    // sockets each. 40 clients cannot all be served at once.
    let mut lb = Child::quiet().nofile(48).spawn(&[
        "--backend",
        &echo.addr().to_string(),
        "--workers",
        "1",
        "--relay",
        "copy",
    ]);

    let mut clients: Vec<TcpStream> = (0..40).map(|_| client(lb.addr())).collect();
    let mut ok = 0;
    for c in &mut clients {
        ok += usize::from(served(c, Duration::from_millis(500)));
    }
    assert!(ok >= 10, "only {ok} of 40 clients served below the limit");
    assert!(
        ok < 40,
        "all 40 clients served: the descriptor limit was never reached"
    );
    assert!(lb.is_running(), "holdfast died at the descriptor limit");
    assert!(
        lb.stderr().contains("Too many open files"),
        "running out of descriptors was not logged:\n{}",
        lb.stderr()
    );

    // Once the clients go away, every new client is served again.
    drop(clients);
    for i in 0..40 {
        let mut ok = false;
        wait_until(IO_TIMEOUT, || {
            let mut c = client(lb.addr());
            ok = served(&mut c, Duration::from_secs(2));
            ok
        });
        assert!(ok, "client {i} not served after recovery");
    }
    assert!(lb.is_running());
}

#[test]
fn max_conns_holds_clients_in_the_backlog_until_there_is_room() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.max_conns = 2;
    cfg.workers = 2;
    let lb = start_balancer(cfg);
    let addr = lb_addr(&lb);

    let mut a = client(addr);
    let mut b = client(addr);
    round_trip(&mut a, b"a");
    round_trip(&mut b, b"b");

    // The third client's connect succeeds (the kernel completes the handshake into the
    // backlog) but holdfast does not take it while two sessions are live.
    let mut c = client(addr);
    assert!(
        !served(&mut c, Duration::from_millis(300)),
        "a third session was admitted"
    );
    assert_eq!(lb.stats().active, 2);

    // Room appears: the waiting client is served without reconnecting.
    drop(a);
    let started = Instant::now();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back)
        .expect("the waiting client is served once there is room");
    assert_eq!(&back, b"ping", "the bytes sent while waiting arrive intact");
    assert!(started.elapsed() < Duration::from_secs(2));
    round_trip(&mut c, b"more");
    round_trip(&mut b, b"still here");
    assert!(lb.stats().active <= 2);
}

/// The scenario of [`running_out_of_local_ports_is_not_the_backends_fault`], run inside a
/// network namespace of its own whose ephemeral port range is two ports wide. Prints
/// `RESULT <what the third client got>`, then holdfast's log.
const PORTS_SCRIPT: &str = r#"
set -eu
trap 'kill $(jobs -p) 2>/dev/null' EXIT
ip link set lo up
echo "40000 40001" > /proc/sys/net/ipv4/ip_local_port_range
wait_for() { for _ in $(seq 200); do grep -q "$1" "$2" 2>/dev/null && return 0; sleep 0.05; done; return 1; }
"$LOAD" echo-server --listen 127.0.0.1:7000 >"$DIR/echo.log" 2>&1 &
wait_for "listening on" "$DIR/echo.log"
"$HF" --listen 127.0.0.1:7001 --backend 127.0.0.1:7000 --workers 1 --health-check none \
    --observe-errors 1 2>"$DIR/hf.log" &
wait_for "listening on" "$DIR/hf.log"
python3 - <<'PY'
import socket
def client(port):
    # Bound to a port outside the two ephemeral ones, which holdfast's backend sockets need.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.connect(("127.0.0.1", 7001))
    s.settimeout(15)
    return s
def echo(s, data):
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        part = s.recv(len(data) - len(got))
        if not part:
            break
        got += part
    return got
a, b = client(50001), client(50002)
assert echo(a, b"one") == b"one" and echo(b, b"two") == b"two"
# Both ephemeral ports now carry a backend connection: the third client's connect fails.
c = client(50003)
c.sendall(b"three")
a.close()  # its backend port comes back (after TIME_WAIT's one-second reuse rule)
got = b""
try:
    while len(got) < 5:
        part = c.recv(5 - len(got))
        if not part:
            break
        got += part
except OSError as e:
    got = repr(e).encode()
print("RESULT", got.decode())
PY
cat "$DIR/hf.log"
"#;

/// No ephemeral port left for a backend connect (EADDRNOTAVAIL) is holdfast's own shortage,
/// like running out of descriptors: the client waits and is served once a port is free, and
/// the backend is not blamed (with `--observe-errors 1`, one failure counted against it would
/// take it down and close the client). Run in a network namespace with a two-port range.
#[test]
fn running_out_of_local_ports_is_not_the_backends_fault() {
    if !std::process::Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: cannot create a network namespace (needs root and unshare)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("holdfast-it-ports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the logs");
    let out = std::process::Command::new("unshare")
        .args(["-n", "bash", "-c", PORTS_SCRIPT])
        .env("HF", env!("CARGO_BIN_EXE_holdfast"))
        .env("LOAD", env!("CARGO_BIN_EXE_holdfast-load"))
        .env("DIR", &dir)
        .output()
        .expect("run the scenario");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("RESULT three"),
        "the third client was not served:\n{stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("is DOWN"),
        "the backend was blamed:\n{stdout}"
    );
    assert!(
        stdout.contains("Cannot assign requested address"),
        "the shortage was not reported:\n{stdout}"
    );
}
