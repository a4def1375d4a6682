//! The counting echo backend, which knows exactly how many connections are open at its end
//! and when each arrived, for the pacing and connection-cap tests.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{localhost0, lock};

/// Counts of one [`CountingBackend`].
#[derive(Default)]
struct CountingState {
    /// For each accepted connection: it was established after the first instant and before
    /// the second (see [`CountingBackend::arrivals`]).
    arrivals: Vec<(Instant, Instant)>,
    open: usize,
    peak: usize,
}

/// An echo backend that knows exactly how many connections are open at its end, and when
/// each was accepted.
///
/// One thread owns every socket (non-blocking): each turn it accepts what is pending, then
/// reads every connection (echoing data, dropping those at EOF or reset), and only then
/// counts. A connection closed by the balancer before it opened the next one is therefore
/// never counted together with it: on loopback the FIN is queued on the old socket before
/// the new connection's handshake completes, so the sweep after the accept sees it. (A
/// thread-per-connection backend only notices the EOF when that thread next runs, and could
/// briefly count one connection too many.)
pub struct CountingBackend {
    addr: SocketAddr,
    state: Arc<Mutex<CountingState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CountingBackend {
    pub fn start() -> CountingBackend {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.bind(&SockAddr::from(localhost0())).unwrap();
        sock.listen(1024).unwrap();
        sock.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let listener: TcpListener = sock.into();
        let state = Arc::new(Mutex::new(CountingState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || counting_loop(listener, &state, &stop))
        };
        CountingBackend {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        lock(&self.state).arrivals.len()
    }

    /// When each connection arrived, in order, as an interval that surely contains it:
    /// after the last look at the listener that found nothing, and before the accept that
    /// returned it. Normally under a millisecond wide; wider where this backend's thread was
    /// not scheduled for a while, which a bare accept timestamp would silently shift (and
    /// bunch up) instead.
    pub fn arrivals(&self) -> Vec<(Instant, Instant)> {
        lock(&self.state).arrivals.clone()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.state).open
    }

    /// Most connections ever open at once.
    pub fn peak(&self) -> usize {
        lock(&self.state).peak
    }
}

impl Drop for CountingBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn counting_loop(listener: TcpListener, state: &Mutex<CountingState>, stop: &AtomicBool) {
    // Each connection with the bytes it still has to echo.
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    // When the listener was last found empty: anything accepted later arrived after this.
    let mut empty_at = Instant::now();
    while !stop.load(SeqCst) {
        let mut busy = false;
        let mut accepted = Vec::new();
        loop {
            let looked_at = Instant::now();
            match listener.accept() {
                Ok((stream, _)) => {
                    accepted.push((empty_at, Instant::now()));
                    if stream.set_nonblocking(true).is_ok() {
                        conns.push((stream, Vec::new()));
                    }
                }
                Err(_) => {
                    empty_at = looked_at;
                    break;
                }
            }
        }
        busy |= !accepted.is_empty();
        conns.retain_mut(|(stream, out)| {
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => {
                        busy = true;
                        out.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            while !out.is_empty() {
                match stream.write(out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            true
        });
        {
            let mut st = lock(state);
            st.arrivals.extend(accepted);
            st.open = conns.len();
            st.peak = st.peak.max(conns.len());
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The largest number of `arrivals` (intervals as from [`CountingBackend::arrivals`], in
/// order) that surely fell within one window of length `window`: those whose whole interval
/// lies inside it. A lower bound of the true busiest window, and equal to it when the
/// intervals are narrow, so a bound asserted on it cannot fail because the observer was
/// slow.
pub fn busiest_window(arrivals: &[(Instant, Instant)], window: Duration) -> usize {
    arrivals
        .iter()
        .map(|&(start, _)| {
            arrivals
                .iter()
                .filter(|&&(after, before)| after >= start && before < start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}
