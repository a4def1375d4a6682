//! From a request's method, path and body to a [`Reply`]: [`parse_request`] checks the
//! request and says what it asks for (a pure function: no I/O, no [`Controller`], so it can be
//! property-tested and fuzzed), then [`respond`] answers it through the [`Controller`] alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::Serialize;

use super::view::{BackendView, views};
use super::{MAX_BODY_BYTES, metrics};
use crate::config::{MAX_REBALANCE_WINDOW, MAX_WEIGHT, parse_duration};
use crate::control::Controller;
use crate::plane::{BackendChange, ControlError};
use crate::stats::{RebalanceSnapshot, StatsSnapshot};

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// An answer, before it becomes an HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    content_type: &'static str,
    /// For 405: the methods the path takes.
    allow: Option<&'static str>,
    pub body: String,
}

impl Reply {
    /// A one-line plain-text answer (the reason, for an error).
    pub fn text(status: StatusCode, line: impl Into<String>) -> Reply {
        let mut body = line.into();
        body.push('\n');
        Reply {
            status,
            content_type: TEXT,
            allow: None,
            body,
        }
    }

    fn json(value: &impl Serialize) -> Reply {
        match serde_json::to_string(value) {
            Ok(mut body) => {
                body.push('\n');
                Reply {
                    status: StatusCode::OK,
                    content_type: JSON,
                    allow: None,
                    body,
                }
            }
            Err(e) => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode JSON: {e}"),
            ),
        }
    }

    fn metrics(body: String) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: metrics::CONTENT_TYPE,
            allow: None,
            body,
        }
    }

    fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Reply {
        Reply {
            allow: Some(allow),
            ..Reply::text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {}; use {allow}",
                    shown(method),
                    shown(path)
                ),
            )
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

const INDEX: &str = "holdfast admin endpoint
GET  /metrics                 Prometheus metrics
GET  /backends                backends as JSON
GET  /backends/ADDR           one backend as JSON
GET  /clients                 client addresses: refusals, PROXY header errors, the per-IP table
GET  /healthz                 200 while serving, 503 once draining (for a readiness probe)
POST /backends/ADDR/drain     no new sessions to ADDR; live ones continue
POST /backends/ADDR/ready     ADDR back in rotation
POST /backends/ADDR/weight    body: the new weight, 1 to 256
POST /rebalance[?window=DUR]  move sessions off over-loaded backends over DUR (default 60s)
GET  /rebalance               the rebalance under way or the last one
GET  /services                the services: names, listen addresses, backend counts
GET  /services/NAME/backends  (and every /backends and /rebalance route under /services/NAME)
The /backends and /rebalance routes without /services/NAME work while one service runs.
";

/// What a client asked for, once its method, path and body have been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminRequest {
    /// `GET /`: the list of endpoints.
    Index,
    /// `GET /metrics`.
    Metrics,
    /// `GET /backends`.
    Backends,
    /// `GET /backends/{addr}`.
    Backend(SocketAddr),
    /// `GET /clients`: what was done with client addresses (the process-wide counters of
    /// `--allow`/`--deny`, the per-IP limits and `--accept-proxy`).
    Clients,
    /// `GET /healthz`: 200 while holdfast serves, 503 once it drains (or shuts down).
    Healthz,
    /// `POST /backends/{addr}/{drain|ready|weight}`; a weight is within 1..=[`MAX_WEIGHT`].
    Change(SocketAddr, BackendChange),
    /// `POST /rebalance[?window=DUR]`: start one over the window (default 60 s, not 0).
    Rebalance(Duration),
    /// `GET /rebalance`: the one under way, or the last one.
    RebalanceStatus,
    /// `GET /services`: every service's name, listen addresses and backend counts.
    Services,
    /// `/services/{name}/...`: a per-service request (backends, a change, a rebalance) for the
    /// service named `name` (never empty). Without it, a per-service request concerns the
    /// only service, and is refused while several run.
    Service(String, Box<AdminRequest>),
}

impl AdminRequest {
    /// True for a change, which waits for the health thread (up to 5 s): the server runs it
    /// off its runtime.
    pub fn is_change(&self) -> bool {
        match self {
            AdminRequest::Change(..) => true,
            AdminRequest::Service(_, inner) => inner.is_change(),
            _ => false,
        }
    }

    /// A request about one service's backends or rebalance, which `/services/NAME` may
    /// prefix.
    fn per_service(&self) -> bool {
        matches!(
            self,
            AdminRequest::Backends
                | AdminRequest::Backend(_)
                | AdminRequest::Change(..)
                | AdminRequest::Rebalance(_)
                | AdminRequest::RebalanceStatus
        )
    }

    /// A method, path and body that [`parse_request`] turns back into this request. The
    /// address is percent-encoded where it must be (an IPv6 scope's `%`).
    pub fn encode(&self) -> (&'static str, String, Vec<u8>) {
        let path = |addr: &SocketAddr, action: &str| {
            let addr = utf8_percent_encode(&addr.to_string(), ADDR_ENCODE).to_string();
            format!("/backends/{addr}{action}")
        };
        match self {
            AdminRequest::Index => ("GET", "/".into(), Vec::new()),
            AdminRequest::Metrics => ("GET", "/metrics".into(), Vec::new()),
            AdminRequest::Backends => ("GET", "/backends".into(), Vec::new()),
            AdminRequest::Backend(addr) => ("GET", path(addr, ""), Vec::new()),
            AdminRequest::Clients => ("GET", "/clients".into(), Vec::new()),
            AdminRequest::Healthz => ("GET", "/healthz".into(), Vec::new()),
            AdminRequest::Change(addr, BackendChange::Drain) => {
                ("POST", path(addr, "/drain"), Vec::new())
            }
            AdminRequest::Change(addr, BackendChange::Ready) => {
                ("POST", path(addr, "/ready"), Vec::new())
            }
            AdminRequest::Change(addr, BackendChange::Weight(w)) => {
                ("POST", path(addr, "/weight"), w.to_string().into_bytes())
            }
            AdminRequest::Rebalance(window) => (
                "POST",
                format!("/rebalance?window={}ns", window.as_nanos()),
                Vec::new(),
            ),
            AdminRequest::RebalanceStatus => ("GET", "/rebalance".into(), Vec::new()),
            AdminRequest::Services => ("GET", "/services".into(), Vec::new()),
            AdminRequest::Service(name, inner) => {
                let (method, path, body) = inner.encode();
                let name = utf8_percent_encode(name, ADDR_ENCODE);
                (method, format!("/services/{name}{path}"), body)
            }
        }
    }
}

/// What [`AdminRequest::encode`] percent-encodes in an address: what a path segment cannot
/// carry as it is.
const ADDR_ENCODE: &AsciiSet = &CONTROLS.add(b'%').add(b'/').add(b'?').add(b'#').add(b' ');

/// Checks a request and says what it asks for, or answers it with an error: no I/O, no
/// [`Controller`]. `method` is case-sensitive (HTTP's methods are); `path` is the request
/// target's path, with its query if any (ignored, but for `window` on `POST /rebalance`);
/// `body` is what a POST
/// carried (the server reads no other), at most `MAX_BODY_BYTES` (a longer one is answered
/// 413). `HEAD` is answered like `GET`. Errors are 4xx with a one-line reason, quoting the
/// client's text escaped and cut short.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<AdminRequest, Reply> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes"),
        ));
    }
    let read_only = || {
        if method == "GET" || method == "HEAD" {
            Ok(())
        } else {
            Err(Reply::method_not_allowed(method, path, "GET, HEAD"))
        }
    };
    let not_found = || {
        Reply::text(
            StatusCode::NOT_FOUND,
            format!("no such path: {} (GET / lists them)", shown(path)),
        )
    };
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let Some(rest) = path.strip_prefix('/') else {
        return Err(not_found());
    };
    if rest == "services" {
        return read_only().map(|()| AdminRequest::Services);
    }
    if let Some(scoped) = rest.strip_prefix("services/") {
        let (name, inner) = scoped.split_once('/').unwrap_or((scoped, ""));
        let name = percent_decode_str(name).decode_utf8_lossy().into_owned();
        if name.is_empty() {
            return Err(Reply::text(
                StatusCode::BAD_REQUEST,
                "an empty service name (GET /services lists them)",
            ));
        }
        let inner_path = match query {
            "" => format!("/{inner}"),
            query => format!("/{inner}?{query}"),
        };
        // Errors name the whole path.
        let inner = parse_request(method, &inner_path, body).map_err(|e| match e.allow {
            _ if e.status == StatusCode::NOT_FOUND => not_found(),
            Some(allow) => Reply::method_not_allowed(method, path, allow),
            None => e,
        })?;
        if !inner.per_service() {
            return Err(not_found());
        }
        return Ok(AdminRequest::Service(name, Box::new(inner)));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [""] => read_only().map(|()| AdminRequest::Index),
        ["metrics"] => read_only().map(|()| AdminRequest::Metrics),
        ["backends"] => read_only().map(|()| AdminRequest::Backends),
        ["clients"] => read_only().map(|()| AdminRequest::Clients),
        ["healthz"] => read_only().map(|()| AdminRequest::Healthz),
        ["backends", addr] => {
            read_only()?;
            Ok(AdminRequest::Backend(parse_addr(addr)?))
        }
        ["backends", addr, action @ ("drain" | "ready" | "weight")] => {
            if method != "POST" {
                return Err(Reply::method_not_allowed(method, path, "POST"));
            }
            let addr = parse_addr(addr)?;
            let change = match *action {
                "drain" => BackendChange::Drain,
                "ready" => BackendChange::Ready,
                _ => BackendChange::Weight(parse_weight(body)?),
            };
            Ok(AdminRequest::Change(addr, change))
        }
        ["rebalance"] => match method {
            "POST" => parse_window(query).map(AdminRequest::Rebalance),
            "GET" | "HEAD" => Ok(AdminRequest::RebalanceStatus),
            _ => Err(Reply::method_not_allowed(method, path, "GET, HEAD, POST")),
        },
        _ => Err(not_found()),
    }
}

/// Answers a request through `control`. A change waits for the health thread's answer (at
/// most 5 s); everything else answers at once.
pub(super) fn respond(request: &AdminRequest, control: &Controller) -> Reply {
    let live = match request.per_service() {
        true => control.services(),
        false => Vec::new(),
    };
    if let [only] = live.as_slice() {
        // The one service running (not necessarily the first one started).
        return respond_in(request, only);
    }
    if live.len() > 1 {
        let (method, path, _) = request.encode();
        return Reply::text(
            StatusCode::CONFLICT,
            format!(
                "several services run: use {method} /services/NAME{path} (GET /services lists \
                 them)"
            ),
        );
    }
    respond_in(request, control)
}

/// [`respond`], `control` acting on the service the request concerns.
fn respond_in(request: &AdminRequest, control: &Controller) -> Reply {
    let answer = match *request {
        AdminRequest::Index => Ok(Reply {
            body: INDEX.to_string(),
            ..Reply::text(StatusCode::OK, "")
        }),
        AdminRequest::Metrics => {
            let services: Vec<metrics::ServiceMetrics> = control
                .services()
                .into_iter()
                .map(|s| {
                    let name = s.service_name().to_string();
                    (name, s.service_stats(), s.backend_stats())
                })
                .collect();
            Ok(Reply::metrics(metrics::render(&control.stats(), &services)))
        }
        AdminRequest::Backends => Ok(Reply::json(&views(&control.backend_stats()))),
        AdminRequest::Backend(addr) => find(control, addr)
            .ok_or_else(|| unknown(addr))
            .map(|backend| Reply::json(&backend)),
        AdminRequest::Clients => Ok(Reply::json(&ClientsView::from(&control.stats()))),
        AdminRequest::Healthz => Ok(match control.is_draining() {
            false => Reply::text(StatusCode::OK, "ok"),
            true => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        }),
        AdminRequest::Change(addr, change) => apply(control, addr, change),
        AdminRequest::Rebalance(window) => {
            control.rebalance(window);
            Ok(Reply::json(&RebalanceView::from(
                control.rebalance_status(),
            )))
        }
        AdminRequest::RebalanceStatus => Ok(Reply::json(&RebalanceView::from(
            control.rebalance_status(),
        ))),
        AdminRequest::Services => Ok(Reply::json(
            &control
                .services()
                .iter()
                .map(ServiceView::from)
                .collect::<Vec<_>>(),
        )),
        AdminRequest::Service(ref name, ref inner) => match control.service(name) {
            Some(service) => Ok(respond_in(inner, &service)),
            None => Err(Reply::text(
                StatusCode::NOT_FOUND,
                format!("no service {} (GET /services lists them)", shown(name)),
            )),
        },
    };
    answer.unwrap_or_else(|e| e)
}

/// One service in `GET /services`.
#[derive(Serialize)]
struct ServiceView {
    name: String,
    listen: Vec<SocketAddr>,
    algorithm: String,
    /// Backends in its current set (removed ones still draining included).
    backends: usize,
    /// Of those, the ones taking new sessions.
    backends_up: usize,
    /// Its sessions open now, and its clients accepted so far.
    sessions_active: u64,
    accepted: u64,
}

impl From<&Controller> for ServiceView {
    fn from(control: &Controller) -> ServiceView {
        let backends = control.backend_stats();
        ServiceView {
            name: control.service_name().to_string(),
            listen: control.listen_addrs().to_vec(),
            algorithm: control.config().algorithm.to_string(),
            backends: backends.len(),
            backends_up: backends
                .iter()
                .filter(|b| b.state == crate::backend::BackendState::Up)
                .count(),
            sessions_active: control.service_stats().active,
            accepted: control.service_stats().accepted,
        }
    }
}

/// A rebalance's window when `POST /rebalance` names none.
pub const DEFAULT_REBALANCE_WINDOW: Duration = Duration::from_secs(60);

/// `window=DUR` of `POST /rebalance` (a duration with units, above 0); no query is the default
/// window. Any other parameter is an error, so a typo is not silently ignored.
fn parse_window(query: &str) -> Result<Duration, Reply> {
    let mut window = DEFAULT_REBALANCE_WINDOW;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let bad = |why: String| Reply::text(StatusCode::BAD_REQUEST, why);
        match pair.split_once('=') {
            Some(("window", value)) => {
                let value = percent_decode_str(value).decode_utf8_lossy();
                window = parse_duration(&value).map_err(|e| bad(e.to_string()))?;
                if window.is_zero() || window > MAX_REBALANCE_WINDOW {
                    return Err(bad("window must be greater than 0 and at most 24h".into()));
                }
            }
            _ => return Err(bad(format!("unknown parameter {}", shown(pair)))),
        }
    }
    Ok(window)
}

/// `GET /rebalance` (and the answer to `POST /rebalance`).
#[derive(Serialize)]
struct RebalanceView {
    running: bool,
    /// Sessions it closed so far.
    closed: u64,
    /// Sessions still to move (`null` until every worker has looked).
    left: Option<u64>,
    /// Seconds left in its window.
    window_left_seconds: f64,
}

impl From<RebalanceSnapshot> for RebalanceView {
    fn from(s: RebalanceSnapshot) -> RebalanceView {
        RebalanceView {
            running: s.running,
            closed: s.closed,
            left: s.left,
            window_left_seconds: s.window_left.as_secs_f64(),
        }
    }
}

/// `GET /clients`: the client-address counters, by reason (the same numbers as the
/// `holdfast_clients_refused_total`, `holdfast_proxy_header_errors_total` and
/// `holdfast_ip_table_*` families of `/metrics`).
#[derive(Serialize)]
struct ClientsView {
    refused: BTreeMap<&'static str, u64>,
    proxy_header_errors: BTreeMap<&'static str, u64>,
    ip_table_entries: u64,
    ip_table_untracked: u64,
}

impl From<&StatsSnapshot> for ClientsView {
    fn from(s: &StatsSnapshot) -> ClientsView {
        ClientsView {
            refused: s.clients_refused().into_iter().collect(),
            proxy_header_errors: s.proxy_header_errors().into_iter().collect(),
            ip_table_entries: s.ip_table_entries,
            ip_table_untracked: s.ip_table_untracked,
        }
    }
}

/// `POST /backends/{addr}/{action}`.
fn apply(control: &Controller, addr: SocketAddr, change: BackendChange) -> Result<Reply, Reply> {
    control.change_backend(addr, change).map_err(|e| match e {
        ControlError::UnknownBackend(_) => Reply::text(StatusCode::NOT_FOUND, e.to_string()),
        ControlError::BadWeight(_) => Reply::text(StatusCode::BAD_REQUEST, e.to_string()),
        ControlError::ShuttingDown | ControlError::Timeout => {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        // Only a new list or a reload fails these ways, not a change to one backend.
        ControlError::Invalid(_) | ControlError::Source(_) => {
            Reply::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    })?;
    // The change is published; show the backend as the workers now see it. It can only be
    // missing if the list was replaced in between.
    Ok(match find(control, addr) {
        Some(backend) => Reply::json(&backend),
        None => Reply::text(StatusCode::OK, "ok"),
    })
}

fn find(control: &Controller, addr: SocketAddr) -> Option<BackendView> {
    views(&control.backend_stats())
        .into_iter()
        .find(|b| b.addr == addr)
}

fn unknown(addr: SocketAddr) -> Reply {
    Reply::text(
        StatusCode::NOT_FOUND,
        ControlError::UnknownBackend(addr).to_string(),
    )
}

/// `IP:PORT` or `[IPv6]:PORT`, possibly percent-encoded.
fn parse_addr(segment: &str) -> Result<SocketAddr, Reply> {
    let decoded = percent_decode_str(segment).decode_utf8_lossy();
    decoded.parse().map_err(|_| {
        Reply::text(
            StatusCode::BAD_REQUEST,
            format!(
                "not a backend address: {} (expected IP:PORT or [IPv6]:PORT)",
                shown(&decoded)
            ),
        )
    })
}

/// The body of `POST .../weight`: an integer from 1 to [`MAX_WEIGHT`], surrounding white
/// space allowed.
fn parse_weight(body: &[u8]) -> Result<u32, Reply> {
    let text = String::from_utf8_lossy(body);
    let weight: u32 = text.trim().parse().map_err(|_| {
        Reply::text(
            StatusCode::BAD_REQUEST,
            format!(
                "the body must be the new weight, an integer from 1 to {MAX_WEIGHT}, not {}",
                shown(&text)
            ),
        )
    })?;
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err(Reply::text(
            StatusCode::BAD_REQUEST,
            ControlError::BadWeight(weight).to_string(),
        ));
    }
    Ok(weight)
}

/// A client's text quoted for a one-line error: escaped, and cut so that the escaped text
/// takes at most 80 bytes (a control character escapes to up to 10).
fn shown(text: &str) -> String {
    const MAX_BYTES: usize = 80;
    let mut used = 0;
    let mut end = text.len();
    for (i, c) in text.char_indices() {
        // An upper bound on what `{:?}` writes for it.
        used += c.escape_debug().map(char::len_utf8).sum::<usize>();
        if used > MAX_BYTES {
            end = i;
            break;
        }
    }
    let mut cut = text[..end].to_string();
    if end < text.len() {
        cut.push_str("...");
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_plain_and_percent_encoded() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(parse_addr("127.0.0.1:8080").unwrap(), v4);
        assert_eq!(parse_addr("127.0.0.1%3A8080").unwrap(), v4);
        assert_eq!(parse_addr("[::1]:8080").unwrap(), v6);
        assert_eq!(parse_addr("%5B%3A%3A1%5D%3A8080").unwrap(), v6);
        for bad in [
            "",
            "localhost:80",
            "127.0.0.1",
            "::1:8080",
            "1.2.3.4:99999",
            "%ZZ",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(e.body.lines().count(), 1, "{bad:?}: {}", e.body);
        }
    }

    #[test]
    fn weights_are_integers_from_1_to_256() {
        assert_eq!(parse_weight(b"3").unwrap(), 3);
        assert_eq!(parse_weight(b" 256\r\n").unwrap(), 256);
        assert_eq!(parse_weight(b"1").unwrap(), 1);
        for bad in [
            &b""[..],
            b"abc",
            b"-1",
            b"1.5",
            b"99999999999",
            b"\xff",
            b"0",
            b"257",
        ] {
            let e = parse_weight(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.body.lines().count(), 1, "{}", e.body);
        }
    }

    #[test]
    fn requests_parse_into_what_they_ask_for() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let ok = |method, path, body: &[u8]| parse_request(method, path, body).unwrap();
        assert_eq!(ok("GET", "/", b""), AdminRequest::Index);
        assert_eq!(ok("HEAD", "/metrics", b""), AdminRequest::Metrics);
        assert_eq!(ok("GET", "/backends", b""), AdminRequest::Backends);
        assert_eq!(ok("GET", "/healthz", b""), AdminRequest::Healthz);
        assert_eq!(
            ok("GET", "/backends/10.0.0.1:80", b""),
            AdminRequest::Backend(a)
        );
        assert_eq!(
            ok("POST", "/backends/10.0.0.1:80/drain", b"ignored"),
            AdminRequest::Change(a, BackendChange::Drain)
        );
        assert_eq!(
            ok("POST", "/backends/10.0.0.1%3A80/ready", b""),
            AdminRequest::Change(a, BackendChange::Ready)
        );
        assert_eq!(
            ok("POST", "/backends/10.0.0.1:80/weight", b"7\n"),
            AdminRequest::Change(a, BackendChange::Weight(7))
        );
        assert_eq!(ok("GET", "/services", b""), AdminRequest::Services);
        let scoped = |name: &str, inner| AdminRequest::Service(name.into(), Box::new(inner));
        assert_eq!(
            ok("GET", "/services/ws/backends", b""),
            scoped("ws", AdminRequest::Backends)
        );
        assert_eq!(
            ok("POST", "/services/a%2Fb/backends/10.0.0.1:80/weight", b"7"),
            scoped("a/b", AdminRequest::Change(a, BackendChange::Weight(7)))
        );
        assert_eq!(
            ok("POST", "/services/ws/rebalance?window=2s", b""),
            scoped("ws", AdminRequest::Rebalance(Duration::from_secs(2)))
        );
        let err = |method, path, body: &[u8]| parse_request(method, path, body).unwrap_err();
        for (method, path, body, status, allow) in [
            ("GET", "/nope", &b""[..], 404, None),
            ("GET", "/metrics/", b"", 404, None),
            ("GET", "metrics", b"", 404, None),
            ("GET", "", b"", 404, None),
            ("POST", "/backends/10.0.0.1:80/frobnicate", b"", 404, None),
            ("POST", "/metrics", b"", 405, Some("GET, HEAD")),
            ("get", "/metrics", b"", 405, Some("GET, HEAD")),
            (
                "DELETE",
                "/backends/10.0.0.1:80",
                b"",
                405,
                Some("GET, HEAD"),
            ),
            ("GET", "/backends/10.0.0.1:80/drain", b"", 405, Some("POST")),
            ("GET", "/backends/nope", b"", 400, None),
            ("POST", "/backends/10.0.0.1/drain", b"", 400, None),
            ("GET", "/services//backends", b"", 400, None),
            ("GET", "/services/ws", b"", 404, None),
            ("GET", "/services/ws/metrics", b"", 404, None),
            ("GET", "/services/ws/services", b"", 404, None),
            ("POST", "/services", b"", 405, Some("GET, HEAD")),
            (
                "GET",
                "/services/ws/backends/10.0.0.1:80/drain",
                b"",
                405,
                Some("POST"),
            ),
            ("POST", "/backends/10.0.0.1:80/weight", b"0", 400, None),
            (
                "POST",
                "/backends/10.0.0.1:80/weight",
                &[b'1'; 1025],
                413,
                None,
            ),
            ("GET", "/nope", &[0; 1025], 413, None),
        ] {
            let e = err(method, path, body);
            assert_eq!(e.status.as_u16(), status, "{method} {path:?}: {}", e.body);
            assert_eq!(e.allow, allow, "{method} {path:?}");
        }
    }

    #[test]
    fn addresses_with_an_ipv6_scope_round_trip() {
        // Display writes the scope after a `%`, which must be encoded to survive decoding.
        let scoped: SocketAddr = "[fe80::1%12]:80".parse().unwrap();
        let request = AdminRequest::Change(scoped, BackendChange::Drain);
        let (method, path, body) = request.encode();
        assert_eq!(path, "/backends/[fe80::1%2512]:80/drain");
        assert_eq!(parse_request(method, &path, &body).unwrap(), request);
    }

    #[test]
    fn quoted_client_text_stays_on_one_short_line() {
        let long = "x\n".repeat(1000);
        let q = shown(&long);
        assert!(!q.contains('\n'));
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("...\""));
        assert_eq!(shown("abc"), "\"abc\"");
        // Characters that escape long count at their escaped length (found by fuzzing: 80
        // control characters made a 700-byte line).
        for c in ['\u{14}', '\u{10ffff}', '\u{301}', '\n', 'é'] {
            let q = shown(&c.to_string().repeat(1000));
            assert!(q.len() < 100, "{c:?}: {} bytes: {q}", q.len());
            assert!(q.ends_with("...\""), "{q}");
        }
    }

    /// The fuzzer's finds: errors quoting control characters were one line, but 500 to 700
    /// bytes long.
    #[test]
    fn errors_quoting_unprintable_text_stay_short() {
        let path = "\u{14}".repeat(85) + "\u{fffd}";
        let e = parse_request("!", &path, b"").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.body.len() < 200, "{} bytes: {}", e.body.len(), e.body);
        let method = "GE".to_string() + &"\u{1b}".repeat(85);
        let e = parse_request(&method, &path, b"").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = parse_request(&method, "/metrics", b"").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(e.body.len() < 200, "{} bytes: {}", e.body.len(), e.body);
    }

    #[test]
    fn rebalance_takes_a_window_in_its_query() {
        let parse = |method, path| parse_request(method, path, b"");
        assert_eq!(
            parse("POST", "/rebalance").unwrap(),
            AdminRequest::Rebalance(DEFAULT_REBALANCE_WINDOW)
        );
        assert_eq!(
            parse("POST", "/rebalance?window=90s").unwrap(),
            AdminRequest::Rebalance(Duration::from_secs(90))
        );
        assert_eq!(
            parse("GET", "/rebalance?window=90s").unwrap(),
            AdminRequest::RebalanceStatus
        );
        assert_eq!(
            parse("GET", "/metrics?x=1").unwrap(),
            AdminRequest::Metrics,
            "other queries are ignored"
        );
        for bad in [
            "/rebalance?window=0",
            "/rebalance?window=25h",
            "/rebalance?window=-1s",
            "/rebalance?window=soon",
            "/rebalance?windows=1s",
        ] {
            let e = parse("POST", bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}: {}", e.body);
        }
        let e = parse("DELETE", "/rebalance").unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    mod properties {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

        use proptest::prelude::*;

        use super::*;

        /// Any address: IPv6 with or without a scope (its flow label is never written).
        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<Ipv4Addr>(), any::<u16>())
                    .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip, port))),
                (
                    any::<Ipv6Addr>(),
                    any::<u16>(),
                    prop_oneof![Just(0u32), any::<u32>()]
                )
                    .prop_map(|(ip, port, scope)| {
                        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
                    }),
            ]
        }

        /// Any request, or a per-service one under `/services/NAME` (any non-empty name).
        fn request() -> impl Strategy<Value = AdminRequest> {
            prop_oneof![
                3 => unscoped(),
                1 => Just(AdminRequest::Services),
                1 => (".+", unscoped().prop_filter("per service", AdminRequest::per_service))
                    .prop_map(|(name, inner)| AdminRequest::Service(name, Box::new(inner))),
            ]
        }

        fn unscoped() -> impl Strategy<Value = AdminRequest> {
            prop_oneof![
                Just(AdminRequest::Index),
                Just(AdminRequest::Metrics),
                Just(AdminRequest::Backends),
                Just(AdminRequest::Clients),
                Just(AdminRequest::Healthz),
                addr().prop_map(AdminRequest::Backend),
                (
                    addr(),
                    prop_oneof![
                        Just(BackendChange::Drain),
                        Just(BackendChange::Ready),
                        (1..=MAX_WEIGHT).prop_map(BackendChange::Weight),
                    ]
                )
                    .prop_map(|(addr, change)| AdminRequest::Change(addr, change)),
                Just(AdminRequest::RebalanceStatus),
                (1..=MAX_REBALANCE_WINDOW.as_nanos() as u64)
                    .prop_map(|ns| AdminRequest::Rebalance(Duration::from_nanos(ns))),
            ]
        }

        fn method() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("GET".to_string()),
                Just("HEAD".to_string()),
                Just("POST".to_string()),
                Just("PUT".to_string()),
                any::<String>(),
            ]
        }

        /// Paths near the real ones as well as anything at all.
        fn path() -> impl Strategy<Value = String> {
            prop_oneof![
                "(/(backends|metrics|drain|ready|weight|[0-9a-f.:\\[\\]%]{0,12})){0,4}",
                "/backends/.*",
                "/services(/[a-z%/]{0,6}(/backends(/.{0,12})?)?)?",
                "/rebalance(\\?(window|w)=[0-9]{1,6}(ns|us|ms|s|m|h|d|y|x)?(&.{0,4})?)?",
                any::<String>(),
            ]
        }

        /// An error is a 4xx with a reason on one short line.
        fn check_error(e: &Reply) -> Result<(), TestCaseError> {
            prop_assert!(e.status.is_client_error(), "{}", e.status);
            prop_assert!(e.body.ends_with('\n'), "{:?}", e.body);
            prop_assert_eq!(e.body.matches(['\n', '\r']).count(), 1, "{:?}", &e.body);
            prop_assert!(e.body.len() < 512, "{:?}", e.body);
            prop_assert_eq!(
                e.allow.is_some(),
                e.status == StatusCode::METHOD_NOT_ALLOWED
            );
            Ok(())
        }

        proptest! {
            #[test]
            fn prop_any_request_parses_or_gets_a_one_line_4xx(
                method in method(),
                path in path(),
                body in proptest::collection::vec(any::<u8>(), 0..1100),
            ) {
                match parse_request(&method, &path, &body) {
                    Ok(request) => {
                        prop_assert!(["GET", "HEAD", "POST"].contains(&method.as_str()));
                        prop_assert!(body.len() <= MAX_BODY_BYTES);
                        // What was understood reads back as the same request.
                        let (m, p, b) = request.encode();
                        prop_assert_eq!(parse_request(m, &p, &b).ok(), Some(request.clone()));
                    }
                    Err(e) => check_error(&e)?,
                }
            }

            #[test]
            fn prop_valid_requests_round_trip(request in request()) {
                let (method, path, body) = request.encode();
                prop_assert_eq!(parse_request(method, &path, &body).ok(), Some(request.clone()));
                if method == "GET" {
                    prop_assert_eq!(parse_request("HEAD", &path, &body).ok(), Some(request));
                }
            }

            #[test]
            fn prop_percent_encoded_addresses_parse_like_plain_ones(
                ip in any::<IpAddr>(),
                port in any::<u16>(),
                encode in proptest::collection::vec(any::<(bool, bool)>(), 64),
                action in prop_oneof![Just(""), Just("/drain"), Just("/ready")],
            ) {
                let addr = SocketAddr::new(ip, port);
                let plain = addr.to_string();
                // Each byte encoded or not, in upper- or lower-case hex.
                let encoded: String = plain
                    .bytes()
                    .zip(encode.iter().cycle())
                    .map(|(b, &(on, upper))| match (on, upper) {
                        (false, _) => char::from(b).to_string(),
                        (true, true) => format!("%{b:02X}"),
                        (true, false) => format!("%{b:02x}"),
                    })
                    .collect();
                let method = if action.is_empty() { "GET" } else { "POST" };
                let parse = |a: &str| parse_request(method, &format!("/backends/{a}{action}"), b"");
                let from_plain = parse(&plain).ok();
                prop_assert!(from_plain.is_some());
                prop_assert_eq!(parse(&encoded).ok(), from_plain);
            }

            #[test]
            fn prop_bodies_are_bounded(
                method in method(),
                path in path(),
                extra in 1..4096usize,
                byte in any::<u8>(),
            ) {
                let body = vec![byte; MAX_BODY_BYTES + extra];
                let e = parse_request(&method, &path, &body).unwrap_err();
                prop_assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
                check_error(&e)?;
            }
        }
    }
}
