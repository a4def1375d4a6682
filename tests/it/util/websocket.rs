//! WebSocket helpers: a real WebSocket server as a backend, and the EINTR wrapper that
//! tungstenite's clients and servers need in this test process.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{BACKEND_READ_TICK, IO_TIMEOUT, localhost0, lock};

/// A stream wrapper that retries reads and writes interrupted by a signal (EINTR).
///
/// Sockets with SO_RCVTIMEO/SO_SNDTIMEO are not restarted after a signal, and this test
/// process does get signals: a child (the `holdfast` binary) exiting raises SIGCHLD, which
/// can wake a thread of a multi-threaded parent even though its default action is to ignore
/// it. std's `read_exact`/`write_all`/`read_to_end` retry EINTR themselves; libraries that
/// call `read`/`write` directly (tungstenite) need this wrapper.
pub struct NoEintr<S>(pub S);

impl<S: Read> Read for NoEintr<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl<S: Write> Write for NoEintr<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A real WebSocket server (tungstenite's `accept` on each connection, one thread per
/// connection) that records the request path of every upgrade it completes, then reads
/// frames until the peer goes away.
pub struct WebSocketBackend {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebSocketBackend {
    pub fn start() -> WebSocketBackend {
        let listener = TcpListener::bind(localhost0()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (paths, failed, stop) =
                (Arc::clone(&paths), Arc::clone(&failed), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let (paths, failed, stop) =
                        (Arc::clone(&paths), Arc::clone(&failed), Arc::clone(&stop));
                    std::thread::spawn(move || websocket_conn(stream, &paths, &failed, &stop));
                }
            })
        };
        WebSocketBackend {
            addr,
            paths,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Request paths of the upgrades completed so far.
    pub fn paths(&self) -> Vec<String> {
        lock(&self.paths).clone()
    }

    /// Connections whose upgrade request was not a valid WebSocket handshake.
    pub fn failed_handshakes(&self) -> usize {
        self.failed.load(SeqCst)
    }
}

impl Drop for WebSocketBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn websocket_conn(
    stream: TcpStream,
    paths: &Mutex<Vec<String>>,
    failed: &AtomicUsize,
    stop: &AtomicBool,
) {
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(BACKEND_READ_TICK));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut path = String::new();
    // The callback's signature is tungstenite's, large error variant and all.
    #[allow(clippy::result_large_err)]
    let handshake = tungstenite::accept_hdr(
        NoEintr(stream),
        |req: &tungstenite::handshake::server::Request,
         resp: tungstenite::handshake::server::Response| {
            path = req.uri().path().to_string();
            Ok(resp)
        },
    );
    let mut ws = match handshake {
        Ok(ws) => ws,
        Err(_) => {
            failed.fetch_add(1, SeqCst);
            return;
        }
    };
    lock(paths).push(path);
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
