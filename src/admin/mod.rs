//! The admin endpoint (`--admin ADDR`): metrics, backend state, and the runtime API.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text exposition format (0.0.4), holdfast_* families |
//! | `GET /backends` | JSON array, one object per backend |
//! | `GET /backends/{addr}` | that backend's JSON object |
//! | `POST /backends/{addr}/drain` | no new sessions for it; live ones continue |
//! | `POST /backends/{addr}/ready` | back in rotation after a drain |
//! | `POST /backends/{addr}/weight` | body: the new weight, `1`..=`256`, as plain text |
//! | `POST /rebalance[?window=DUR]` | move sessions off over-loaded backends over DUR (60s) |
//! | `GET /rebalance` | the rebalance under way or the last one: running, closed, left |
//!
//! `{addr}` is `IP:PORT`, `[IPv6]:PORT`, either one percent-encoded or not. A query string is
//! ignored, except `window` on `POST /rebalance`. A change answers 200 with the backend's JSON object as it is once the workers have
//! been sent the change. Errors answer 4xx (5xx while shutting down, or when the health thread
//! does not answer within 5 s) with a one-line reason as plain text.
//!
//! # How it is served
//!
//! hyper's HTTP/1.1 server on a single-threaded tokio runtime, on a thread of its own
//! (`holdfast-admin`). A request is checked by [`routes::parse_request`], a pure function, and
//! answered through a [`Controller`] alone, so the data plane never waits for it. Reads answer
//! at once. A change waits for the health thread's answer (up to 5 s), so it runs on tokio's
//! blocking pool, never on the runtime: a slow change delays its own client only, not
//! `/metrics` nor any other client. At most [`MAX_CONNECTIONS`] changes are in flight at once.
//!
//! What a client can cost is bounded: at most [`MAX_CONNECTIONS`] connections, request heads of
//! at most [`MAX_HEAD_BYTES`] that must arrive within [`HEAD_TIMEOUT`] (which also closes idle
//! keep-alive connections), bodies of at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`],
//! and a connection is wound down after [`MAX_CONNECTION_AGE`] (the request in flight is
//! answered first, for at most [`CLOSE_GRACE`]), which also bounds a client that never reads
//! its response. When every connection slot is taken, a new connection is let in and a
//! connection waiting on its client is closed instead (see `slots.rs` for which one), so
//! clients that connect and never finish a request (a slowloris), even reconnecting ones,
//! cannot keep a scrape out; only when every connection is being answered is the new one
//! answered 503 and closed. A failed `accept` (out of descriptors) is retried after a pause
//! rather than ending the endpoint: it matters most when the balancer is in trouble.
//!
//! [`AdminServer::stop`] closes the listener, drops every connection and joins the thread at
//! once; a change in progress finishes on its blocking thread (the health thread answers, or
//! 5 s pass).

mod metrics;
pub(crate) mod routes;
mod slots;
mod view;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};

use crate::control::Controller;
use routes::{AdminRequest, Reply};
use slots::{Admission, Slot, Slots, Tracker};

/// Connections served at once; one more takes the slot of a connection that waits on its
/// client (see the module's documentation).
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body accepted; a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 1024;
/// Time a client has to send a request head, and the longest a keep-alive connection idles.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request body once its head has arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection older than this is closed once its request in flight (if any) is answered.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long the request in flight may take to finish when a connection is wound down.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (descriptors or memory ran out) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The admin HTTP server, on a thread of its own. It reads through a [`Controller`] and
/// never touches the data plane.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` and starts serving. Binding errors are returned here, not logged later.
    pub fn start(addr: SocketAddr, control: Controller) -> io::Result<AdminServer> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .thread_name("holdfast-admin")
            // The changes in flight; see `answer`.
            .max_blocking_threads(MAX_CONNECTIONS)
            .build()?;
        let listener = std::net::TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("holdfast-admin".into())
            .spawn(move || {
                runtime.block_on(serve(listener, control, stop_rx));
                // This drops every connection task, closing its socket, and does not wait
                // for a change in progress: it ends on its own once the health thread
                // answers or the wait for it times out.
                runtime.shutdown_background();
                log::debug!("admin endpoint stopped");
            })?;
        Ok(AdminServer {
            addr: local,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread: once it returns, the port refuses connections
    /// and every admin connection is closed.
    pub fn stop(self) {
        // Drop does it.
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the thread has already ended; joining says how.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("the admin endpoint's thread panicked");
        }
    }
}

/// Accepts until told to stop (or until the [`AdminServer`] is gone).
async fn serve(listener: TcpListener, control: Controller, mut stop: oneshot::Receiver<()>) {
    let slots = Slots::new(MAX_CONNECTIONS);
    let changes = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Accept failures and a full house come in streaks (descriptors stay short for a while, a
    // client opens connections in a loop): one warning per streak, not one per connection.
    let mut failing = false;
    let mut full = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if std::mem::take(&mut failing) {
                    log::info!("admin endpoint: accepting again");
                }
                match slots.admit(peer.ip(), Instant::now()) {
                    Admission::Admitted {
                        slot,
                        close,
                        closed_other,
                    } => {
                        if !closed_other {
                            full = false;
                        } else if !std::mem::replace(&mut full, true) {
                            log::warn!(
                                "admin endpoint: {MAX_CONNECTIONS} connections open; each new \
                                 one (the first from {peer}) closes one that waits on its client"
                            );
                        }
                        tokio::spawn(serve_connection(
                            stream,
                            control.clone(),
                            Arc::clone(&changes),
                            slot,
                            close,
                        ));
                        // Let the closed connection go and the new one read its request
                        // before the next accept: under a flood of connections, a client
                        // that sends its request at once is answered.
                        tokio::task::yield_now().await;
                    }
                    Admission::Full => {
                        if !std::mem::replace(&mut full, true) {
                            log::warn!(
                                "admin endpoint: {MAX_CONNECTIONS} requests being answered; \
                                 refusing {peer} and others until one is done"
                            );
                        }
                        refuse_busy(&stream);
                    }
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    log::warn!(
                        "admin endpoint: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?}"
                    );
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    // The listener closes here, before the thread is joined.
}

/// Tells a client turned away why it is closed, if its socket takes the few bytes at once;
/// never waits.
fn refuse_busy(stream: &TcpStream) {
    let body = "too many admin requests in progress\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
         content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// Serves one connection's requests (keep-alive allowed) within the bounds above, until the
/// connection ends, grows too old, or `close` says its slot was given to a newer one.
async fn serve_connection(
    stream: TcpStream,
    control: Controller,
    changes: Arc<Semaphore>,
    slot: Slot,
    mut close: oneshot::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let tracker = slot.tracker();
    let service = service_fn(move |request| {
        let control = control.clone();
        let changes = Arc::clone(&changes);
        let tracker = tracker.clone();
        async move { Ok::<_, Infallible>(handle(request, control, changes, tracker).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                log::debug!("admin connection: {e}");
            }
            return;
        }
        _ = &mut close => {
            log::debug!("admin connection: closed to make room for a new one");
            return;
        }
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    connection.as_mut().graceful_shutdown();
    if tokio::time::timeout(CLOSE_GRACE, connection).await.is_err() {
        log::debug!("admin connection: closed after {MAX_CONNECTION_AGE:?} and a grace period");
    }
}

/// Reads a bounded body (POST only; others are not read), checks the request, then answers.
/// The connection counts as waiting on its client until the request is checked, and as busy
/// (never closed for a newer connection) while it is answered.
async fn handle(
    request: Request<Incoming>,
    control: Controller,
    changes: Arc<Semaphore>,
    tracker: Tracker,
) -> Response<Full<Bytes>> {
    let (head, body) = request.into_parts();
    let body = if head.method == Method::POST {
        let collected =
            tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect()).await;
        match collected {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                return Reply::text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {MAX_BODY_BYTES} bytes"),
                )
                .into_response();
            }
            Ok(Err(e)) => {
                return Reply::text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
                .into_response();
            }
            Err(_) => {
                return Reply::text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {BODY_TIMEOUT:?}"),
                )
                .into_response();
            }
        }
    } else {
        Bytes::new()
    };
    let reply = match routes::parse_request(head.method.as_str(), path_and_query(&head.uri), &body)
    {
        Ok(request) => {
            let _busy = tracker.busy();
            answer(request, control, &changes).await
        }
        Err(reply) => reply,
    };
    reply.into_response()
}

/// Answers a checked request: a read at once, a change on the blocking pool (it waits for
/// the health thread), at most [`MAX_CONNECTIONS`] of them at a time. A change whose client
/// has gone is still made.
/// The request target without the scheme and authority: the path, and the query if any.
fn path_and_query(uri: &hyper::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

async fn answer(request: AdminRequest, control: Controller, changes: &Arc<Semaphore>) -> Reply {
    if !request.is_change() {
        return routes::respond(&request, &control);
    }
    let Ok(permit) = Arc::clone(changes).acquire_owned().await else {
        // Only a closed semaphore fails, and this one is never closed.
        return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "the endpoint is stopping");
    };
    let change = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        routes::respond(&request, &control)
    });
    change.await.unwrap_or_else(|e| {
        Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change did not complete: {e}"),
        )
    })
}
