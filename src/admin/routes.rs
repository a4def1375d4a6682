//! From a request's method, path and body to a [`Reply`], through the [`Controller`] alone.
//! Nothing here does I/O, so every answer can be checked without a socket.

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde::Serialize;

use super::{MAX_BODY_BYTES, metrics};
use crate::backend::{BackendState, BackendStatsSnapshot, WEIGHT_SCALE};
use crate::config::MAX_WEIGHT;
use crate::control::{BackendChange, ControlError, Controller};

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// An answer, before it becomes an HTTP response.
#[derive(Debug)]
pub(super) struct Reply {
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

    fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
        Reply {
            allow: Some(allow),
            ..Reply::text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}; use {allow}", shown(path)),
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

/// One backend as `/backends` shows it: the facts of [`BackendStatsSnapshot`], with the state
/// as a word and the effective weight in units of weight (it is below `weight` only while slow
/// start ramps the backend up).
#[derive(Debug, Serialize)]
pub(super) struct BackendView {
    pub addr: SocketAddr,
    /// `up`, `down` or `drain`.
    pub state: &'static str,
    /// The health verdict, also while drained (`state` then says only `drain`).
    pub healthy: bool,
    pub weight: u32,
    pub effective_weight: f64,
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub connect_failures: u64,
    pub passive_failures: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub connect_latency_p50_us: u64,
    pub connect_latency_p99_us: u64,
    pub connect_latency_max_us: u64,
}

impl From<&BackendStatsSnapshot> for BackendView {
    fn from(b: &BackendStatsSnapshot) -> BackendView {
        BackendView {
            addr: b.addr,
            state: state_name(b.state),
            healthy: b.healthy,
            weight: b.weight,
            effective_weight: effective_weight(b),
            sessions_active: b.active,
            sessions_total: b.total,
            connect_failures: b.connect_failures,
            passive_failures: b.passive_failures,
            bytes_client_to_backend: b.bytes_client_to_backend,
            bytes_backend_to_client: b.bytes_backend_to_client,
            connect_latency_p50_us: b.connect_latency_p50_us,
            connect_latency_p99_us: b.connect_latency_p99_us,
            connect_latency_max_us: b.connect_latency_max_us,
        }
    }
}

/// A backend state as one lower-case word, as `/backends` and `/metrics` show it.
pub(super) fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Drain => "drain",
    }
}

/// Every state, in the order `/metrics` lists them.
pub(super) const STATES: [BackendState; 3] =
    [BackendState::Up, BackendState::Down, BackendState::Drain];

/// The weight new connections see, in units of weight.
pub(super) fn effective_weight(b: &BackendStatsSnapshot) -> f64 {
    f64::from(b.effective_weight) / f64::from(WEIGHT_SCALE)
}

const INDEX: &str = "holdfast admin endpoint
GET  /metrics                 Prometheus metrics
GET  /backends                backends as JSON
GET  /backends/ADDR           one backend as JSON
POST /backends/ADDR/drain     no new sessions to ADDR; live ones continue
POST /backends/ADDR/ready     ADDR back in rotation
POST /backends/ADDR/weight    body: the new weight, 1 to 256
";

/// Answers one request. `body` is what a POST carried (empty otherwise), at most
/// [`MAX_BODY_BYTES`].
pub(super) fn route(method: &Method, path: &str, body: &[u8], control: &Controller) -> Reply {
    let read = |answer: &dyn Fn() -> Result<Reply, Reply>| {
        if method == Method::GET || method == Method::HEAD {
            answer().unwrap_or_else(|e| e)
        } else {
            Reply::method_not_allowed(method, path, "GET, HEAD")
        }
    };
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match segments.as_slice() {
        [""] => read(&|| {
            Ok(Reply {
                body: INDEX.to_string(),
                ..Reply::text(StatusCode::OK, "")
            })
        }),
        ["metrics"] => read(&|| {
            Ok(Reply::metrics(metrics::render(
                &control.stats(),
                &control.backend_stats(),
            )))
        }),
        ["backends"] => read(&|| {
            let all: Vec<BackendView> = control.backend_stats().iter().map(Into::into).collect();
            Ok(Reply::json(&all))
        }),
        ["backends", addr] => read(&|| {
            let addr = parse_addr(addr)?;
            let backend = find(control, addr).ok_or_else(|| unknown(addr))?;
            Ok(Reply::json(&backend))
        }),
        ["backends", addr, action @ ("drain" | "ready" | "weight")] => {
            if method != Method::POST {
                return Reply::method_not_allowed(method, path, "POST");
            }
            change(control, addr, action, body).unwrap_or_else(|e| e)
        }
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            format!("no such path: {} (GET / lists them)", shown(path)),
        ),
    }
}

/// `POST /backends/{addr}/{action}`.
fn change(control: &Controller, addr: &str, action: &str, body: &[u8]) -> Result<Reply, Reply> {
    let addr = parse_addr(addr)?;
    let change = match action {
        "drain" => BackendChange::Drain,
        "ready" => BackendChange::Ready,
        _ => BackendChange::Weight(parse_weight(body)?),
    };
    control.change_backend(addr, change).map_err(|e| match e {
        ControlError::UnknownBackend(_) => Reply::text(StatusCode::NOT_FOUND, e.to_string()),
        ControlError::BadWeight(_) => Reply::text(StatusCode::BAD_REQUEST, e.to_string()),
        ControlError::ShuttingDown | ControlError::Timeout => {
            Reply::text(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
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
    control
        .backend_stats()
        .iter()
        .find(|b| b.addr == addr)
        .map(Into::into)
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

/// The body of `POST .../weight`: an integer, surrounding white space allowed. Its range is
/// checked by [`Controller::change_backend`].
fn parse_weight(body: &[u8]) -> Result<u32, Reply> {
    let text = String::from_utf8_lossy(body);
    text.trim().parse().map_err(|_| {
        Reply::text(
            StatusCode::BAD_REQUEST,
            format!(
                "the body must be the new weight, an integer from 1 to {MAX_WEIGHT}, not {}",
                shown(&text)
            ),
        )
    })
}

/// A client's text quoted for a one-line error: escaped, and cut to a reasonable length
/// (bodies are at most [`MAX_BODY_BYTES`], paths longer).
fn shown(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    const _: () = assert!(MAX_CHARS <= MAX_BODY_BYTES);
    let mut cut: String = text.chars().take(MAX_CHARS).collect();
    if cut.len() < text.len() {
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
    fn weights_are_integers() {
        assert_eq!(parse_weight(b"3").unwrap(), 3);
        assert_eq!(parse_weight(b" 256\r\n").unwrap(), 256);
        // The range is the controller's to check.
        assert_eq!(parse_weight(b"0").unwrap(), 0);
        for bad in [&b""[..], b"abc", b"-1", b"1.5", b"99999999999", b"\xff"] {
            let e = parse_weight(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.body.lines().count(), 1, "{}", e.body);
        }
    }

    #[test]
    fn quoted_client_text_stays_on_one_short_line() {
        let long = "x\n".repeat(1000);
        let q = shown(&long);
        assert!(!q.contains('\n'));
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("...\""));
        assert_eq!(shown("abc"), "\"abc\"");
    }

    #[test]
    fn effective_weight_is_in_units_of_weight() {
        let snapshot = BackendStatsSnapshot {
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 2,
            effective_weight: 2 * WEIGHT_SCALE,
            state: BackendState::Drain,
            healthy: false,
            active: 0,
            total: 0,
            connect_failures: 0,
            passive_failures: 0,
            bytes_client_to_backend: 0,
            bytes_backend_to_client: 0,
            connect_latency_p50_us: 0,
            connect_latency_p99_us: 0,
            connect_latency_max_us: 0,
        };
        let view = BackendView::from(&snapshot);
        assert_eq!(view.effective_weight, 2.0);
        assert_eq!(view.state, "drain");
        assert!(!view.healthy);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["addr"], "127.0.0.1:1");
        assert_eq!(json["effective_weight"], 2.0);
    }
}
