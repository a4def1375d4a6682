//! `GET /metrics`: the counters in Prometheus' text exposition format (version 0.0.4).
//!
//! Every family has `# HELP` and `# TYPE` lines and a `holdfast_` name; counters end in
//! `_total`. Global families come from [`StatsSnapshot`], per-backend ones (label
//! `backend="IP:PORT"`) from [`BackendStatsSnapshot`]:
//!
//! - `holdfast_backend_up` is 1 while the backend takes new sessions (state up), and
//!   `holdfast_backend_state{state="up|down|drain"}` is a state set: 1 for the current state,
//!   0 for the others. `holdfast_backend_healthy` is the health verdict, also while draining.
//! - `holdfast_backend_effective_weight` is in units of weight (fractional during slow start).
//! - Connect latencies are gauges in seconds over the backend's lifetime: p50, p99 and max.
//! - `holdfast_service_backends{service,state}` counts each service's backends by state;
//!   `holdfast_service_*` are each service's own session counters (the global families count
//!   every service together).

use std::fmt::{self, Write};

use crate::backend::BackendStatsSnapshot;
use crate::stats::{ServiceStatsSnapshot, StatsSnapshot};

use super::view::{STATES, effective_weight, state_name};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A sample's value: counts print as integers, the rest as decimals.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            // Rust never prints an f64 in exponent form, which the format also accepts.
            Value::Float(x) if x.is_finite() => write!(f, "{x}"),
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x > 0.0 => f.write_str("+Inf"),
            Value::Float(_) => f.write_str("-Inf"),
        }
    }
}

type Global = (&'static str, Kind, &'static str, fn(&StatsSnapshot) -> u64);

/// The global families: name, type, help, value.
const GLOBAL: &[Global] = &[
    (
        "holdfast_sessions_active",
        Kind::Gauge,
        "Client sessions open now (connecting to a backend or relaying).",
        |s| s.active,
    ),
    (
        "holdfast_accepted_total",
        Kind::Counter,
        "Client connections accepted.",
        |s| s.accepted,
    ),
    (
        "holdfast_sessions_closed_total",
        Kind::Counter,
        "Client sessions closed, for any reason.",
        |s| s.closed,
    ),
    (
        "holdfast_no_backend_total",
        Kind::Counter,
        "Clients refused because no backend was eligible or every candidate failed.",
        |s| s.no_backend,
    ),
    (
        "holdfast_connect_failures_total",
        Kind::Counter,
        "Backend connects that failed (refused, reset, timed out), retried or not.",
        |s| s.connect_failures,
    ),
    (
        "holdfast_queue_length",
        Kind::Gauge,
        "Clients waiting in the queue for a backend with room now.",
        |s| s.queued,
    ),
    (
        "holdfast_queued_total",
        Kind::Counter,
        "Clients that had to wait in the queue.",
        |s| s.queued_total,
    ),
    (
        "holdfast_queue_timeouts_total",
        Kind::Counter,
        "Clients closed after waiting longer than the queue timeout.",
        |s| s.queue_timeouts,
    ),
    (
        "holdfast_queue_full_total",
        Kind::Counter,
        "Clients closed at once because the queue was full.",
        |s| s.queue_full,
    ),
    (
        "holdfast_sessions_closed_by_drain_total",
        Kind::Counter,
        "Sessions closed by a drain (graceful shutdown or a backend's drain timeout).",
        |s| s.closed_by_drain,
    ),
    (
        "holdfast_sessions_closed_by_age_total",
        Kind::Counter,
        "Sessions closed because they reached --max-session-age (with their jitter).",
        |s| s.sessions_closed_by_age,
    ),
    (
        "holdfast_idle_timeouts_total",
        Kind::Counter,
        "Sessions closed by the idle timeout.",
        |s| s.idle_timeouts,
    ),
    (
        "holdfast_backend_timeouts_total",
        Kind::Counter,
        "Sessions closed because the backend left the client's bytes unanswered.",
        |s| s.backend_timeouts,
    ),
    (
        "holdfast_resets_total",
        Kind::Counter,
        "Sessions that ended with a reset or socket error on either side.",
        |s| s.resets,
    ),
    (
        "holdfast_accept_errors_total",
        Kind::Counter,
        "Times descriptors, memory or local ports ran out when accepting, or opening or connecting a backend socket.",
        |s| s.accept_errors,
    ),
    (
        "holdfast_pipes_in_use",
        Kind::Gauge,
        "Pipes held by sessions now (bytes in flight through splice).",
        |s| s.pipes_in_use,
    ),
    (
        "holdfast_buffers_in_use",
        Kind::Gauge,
        "Per-session copy buffers held now (a write to a peer was partial).",
        |s| s.buffers_in_use,
    ),
    (
        "holdfast_bytes_client_to_backend_total",
        Kind::Counter,
        "Bytes relayed from clients to backends.",
        |s| s.bytes_client_to_backend,
    ),
    (
        "holdfast_bytes_backend_to_client_total",
        Kind::Counter,
        "Bytes relayed from backends to clients.",
        |s| s.bytes_backend_to_client,
    ),
    (
        "holdfast_ip_table_entries",
        Kind::Gauge,
        "Client addresses the per-IP limit table holds (updated every few seconds).",
        |s| s.ip_table_entries,
    ),
    (
        "holdfast_ip_table_untracked_total",
        Kind::Counter,
        "Clients served without a per-IP limit because the table was full (it fails open).",
        |s| s.ip_table_untracked,
    ),
];

type PerBackend = (
    &'static str,
    Kind,
    &'static str,
    fn(&BackendStatsSnapshot) -> Value,
);

fn seconds(micros: u64) -> Value {
    Value::Float(micros as f64 / 1e6)
}

/// The per-backend families with one sample per backend.
const PER_BACKEND: &[PerBackend] = &[
    (
        "holdfast_backend_up",
        Kind::Gauge,
        "1 if the backend takes new sessions (state up), 0 if it is down or draining.",
        |b| Value::Int(u64::from(b.state == crate::backend::BackendState::Up)),
    ),
    (
        "holdfast_backend_healthy",
        Kind::Gauge,
        "1 unless health checks or passive detection hold the backend down (also while draining).",
        |b| Value::Int(u64::from(b.healthy)),
    ),
    (
        "holdfast_backend_weight",
        Kind::Gauge,
        "Configured weight (or the one last set through the admin API).",
        |b| Value::Int(u64::from(b.weight)),
    ),
    (
        "holdfast_backend_effective_weight",
        Kind::Gauge,
        "Weight new sessions see now, in units of weight; below the weight during slow start.",
        |b| Value::Float(effective_weight(b)),
    ),
    (
        "holdfast_backend_sessions_active",
        Kind::Gauge,
        "Sessions assigned to the backend now (connecting or relaying).",
        |b| Value::Int(b.active),
    ),
    (
        "holdfast_backend_sessions_total",
        Kind::Counter,
        "Sessions established to the backend.",
        |b| Value::Int(b.total),
    ),
    (
        "holdfast_backend_connect_failures_total",
        Kind::Counter,
        "Connects to the backend that failed: refused, reset or timed out.",
        |b| Value::Int(b.connect_failures),
    ),
    (
        "holdfast_backend_passive_failures_total",
        Kind::Counter,
        "Sessions the backend ended without answering a byte, soon after they began.",
        |b| Value::Int(b.passive_failures),
    ),
    (
        "holdfast_rebalance_closed_total",
        Kind::Counter,
        "Sessions of the backend closed by a rebalance to make room on it.",
        |b| Value::Int(b.rebalance_closed),
    ),
    (
        "holdfast_backend_bytes_client_to_backend_total",
        Kind::Counter,
        "Bytes relayed from clients to the backend.",
        |b| Value::Int(b.bytes_client_to_backend),
    ),
    (
        "holdfast_backend_bytes_backend_to_client_total",
        Kind::Counter,
        "Bytes relayed from the backend to clients.",
        |b| Value::Int(b.bytes_backend_to_client),
    ),
    (
        "holdfast_backend_connect_latency_p50_seconds",
        Kind::Gauge,
        "Median time to establish a connection to the backend (0 before any).",
        |b| seconds(b.connect_latency_p50_us),
    ),
    (
        "holdfast_backend_connect_latency_p99_seconds",
        Kind::Gauge,
        "99th percentile of the time to establish a connection to the backend (0 before any).",
        |b| seconds(b.connect_latency_p99_us),
    ),
    (
        "holdfast_backend_connect_latency_max_seconds",
        Kind::Gauge,
        "Longest time to establish a connection to the backend (0 before any).",
        |b| seconds(b.connect_latency_max_us),
    ),
];

/// One service's part of the metrics: its name, its own counters, its backends.
pub type ServiceMetrics = (String, ServiceStatsSnapshot, Vec<BackendStatsSnapshot>);

type PerService = (
    &'static str,
    Kind,
    &'static str,
    fn(&ServiceStatsSnapshot) -> u64,
);

/// The per-service families (label `service`): name, type, help, value.
const PER_SERVICE: &[PerService] = &[
    (
        "holdfast_service_sessions_active",
        Kind::Gauge,
        "The service's client sessions open now.",
        |s| s.active,
    ),
    (
        "holdfast_service_accepted_total",
        Kind::Counter,
        "Client connections accepted on the service's listeners.",
        |s| s.accepted,
    ),
    (
        "holdfast_service_sessions_closed_total",
        Kind::Counter,
        "The service's client sessions closed, for any reason.",
        |s| s.closed,
    ),
    (
        "holdfast_service_no_backend_total",
        Kind::Counter,
        "The service's clients closed because no backend was available.",
        |s| s.no_backend,
    ),
    (
        "holdfast_service_connect_failures_total",
        Kind::Counter,
        "Connects to the service's backends that failed, retried or not.",
        |s| s.connect_failures,
    ),
    (
        "holdfast_service_queue_length",
        Kind::Gauge,
        "The service's clients waiting in the queue now.",
        |s| s.queued,
    ),
    (
        "holdfast_service_queued_total",
        Kind::Counter,
        "The service's clients that had to wait in the queue.",
        |s| s.queued_total,
    ),
    (
        "holdfast_service_queue_timeouts_total",
        Kind::Counter,
        "The service's clients closed after waiting longer than its queue timeout.",
        |s| s.queue_timeouts,
    ),
    (
        "holdfast_service_queue_full_total",
        Kind::Counter,
        "The service's clients closed at once because the queue was full.",
        |s| s.queue_full,
    ),
    (
        "holdfast_service_sessions_closed_by_drain_total",
        Kind::Counter,
        "The service's sessions closed by a drain.",
        |s| s.closed_by_drain,
    ),
    (
        "holdfast_service_sessions_closed_by_age_total",
        Kind::Counter,
        "The service's sessions closed at --max-session-age.",
        |s| s.sessions_closed_by_age,
    ),
    (
        "holdfast_service_idle_timeouts_total",
        Kind::Counter,
        "The service's sessions closed by the idle timeout.",
        |s| s.idle_timeouts,
    ),
    (
        "holdfast_service_backend_timeouts_total",
        Kind::Counter,
        "The service's sessions closed because the backend left the client's bytes unanswered.",
        |s| s.backend_timeouts,
    ),
    (
        "holdfast_service_resets_total",
        Kind::Counter,
        "The service's sessions that ended with a reset or socket error on either side.",
        |s| s.resets,
    ),
    (
        "holdfast_service_bytes_client_to_backend_total",
        Kind::Counter,
        "Bytes relayed from the service's clients to its backends.",
        |s| s.bytes_client_to_backend,
    ),
    (
        "holdfast_service_bytes_backend_to_client_total",
        Kind::Counter,
        "Bytes relayed from the service's backends to its clients.",
        |s| s.bytes_backend_to_client,
    ),
    (
        "holdfast_service_proxy_header_errors_total",
        Kind::Counter,
        "The service's clients closed for a PROXY header error (every reason).",
        |s| s.proxy_header_errors,
    ),
    (
        "holdfast_service_ip_table_entries",
        Kind::Gauge,
        "Client addresses the service's per-IP limit table holds (updated every few seconds).",
        |s| s.ip_table_entries,
    ),
    (
        "holdfast_service_ip_table_untracked_total",
        Kind::Counter,
        "The service's clients served without a per-IP limit because its table was full.",
        |s| s.ip_table_untracked,
    ),
];

/// Renders every family; `services` are each service's name, counters and backends.
pub fn render(stats: &StatsSnapshot, services: &[ServiceMetrics]) -> String {
    let n: usize = services.iter().map(|(_, _, b)| b.len()).sum();
    let mut out = String::with_capacity(4096 + 2048 * n);
    let backends: Vec<(String, &BackendStatsSnapshot)> = services
        .iter()
        .flat_map(|(name, _, list)| {
            let name = escape(name);
            list.iter().map(move |b| (name.clone(), b))
        })
        .collect();
    // Writing to a String cannot fail.
    let _ = write_all(&mut out, stats, services, &backends);
    out
}

/// The process's start and the live upgrade's families.
fn write_upgrade(out: &mut String, stats: &StatsSnapshot) -> fmt::Result {
    family(
        out,
        "holdfast_start_time_seconds",
        Kind::Gauge,
        "When this process started, in seconds since the Unix epoch.",
    )?;
    let start = Value::Float(stats.start_time_ms as f64 / 1000.0);
    writeln!(out, "holdfast_start_time_seconds {start}")?;
    family(
        out,
        "holdfast_upgrades_total",
        Kind::Counter,
        "Live upgrades: ok (handed over by this process, or the take-over that started it) \
         and failed (this process kept its sessions).",
    )?;
    writeln!(
        out,
        "holdfast_upgrades_total{{result=\"ok\"}} {}",
        stats.upgrades_ok
    )?;
    writeln!(
        out,
        "holdfast_upgrades_total{{result=\"failed\"}} {}",
        stats.upgrades_failed
    )?;
    family(
        out,
        "holdfast_sessions_handed_over_total",
        Kind::Counter,
        "Sessions handed over by a live upgrade: given by this process, or received by it.",
    )?;
    writeln!(
        out,
        "holdfast_sessions_handed_over_total {}",
        stats.sessions_handed_over
    )?;
    family(
        out,
        "holdfast_upgrade_pause_seconds_max",
        Kind::Gauge,
        "The longest session pause of the last upgrade: from the old process's freeze to the \
         session's first run in the new one.",
    )?;
    let pause = Value::Float(stats.upgrade_pause_max_us as f64 / 1e6);
    writeln!(out, "holdfast_upgrade_pause_seconds_max {pause}")
}

fn write_all(
    out: &mut String,
    stats: &StatsSnapshot,
    services: &[ServiceMetrics],
    backends: &[(String, &BackendStatsSnapshot)],
) -> fmt::Result {
    family(
        out,
        "holdfast_build_info",
        Kind::Gauge,
        "Always 1; the version label says which holdfast this is.",
    )?;
    writeln!(
        out,
        "holdfast_build_info{{version=\"{}\"}} 1",
        escape(env!("CARGO_PKG_VERSION"))
    )?;
    write_upgrade(out, stats)?;
    for &(name, kind, help, value) in GLOBAL {
        family(out, name, kind, help)?;
        writeln!(out, "{name} {}", value(stats))?;
    }
    // The client's address (issue #11).
    family(
        out,
        "holdfast_proxy_header_errors_total",
        Kind::Counter,
        "Client connections closed because of their PROXY header, by reason.",
    )?;
    for (reason, n) in stats.proxy_header_errors() {
        writeln!(
            out,
            "holdfast_proxy_header_errors_total{{reason=\"{reason}\"}} {n}"
        )?;
    }
    family(
        out,
        "holdfast_clients_refused_total",
        Kind::Counter,
        "Clients closed at once by --allow/--deny or a per-IP limit, by reason.",
    )?;
    for (reason, n) in stats.clients_refused() {
        writeln!(
            out,
            "holdfast_clients_refused_total{{reason=\"{reason}\"}} {n}"
        )?;
    }
    family(
        out,
        "holdfast_backend_state",
        Kind::Gauge,
        "1 for the backend's current state (up, down or drain), 0 for the others.",
    )?;
    for (service, b) in backends {
        let backend = escape(&b.addr.to_string());
        for state in STATES {
            writeln!(
                out,
                "holdfast_backend_state{{service=\"{service}\",backend=\"{backend}\",state=\"{}\"}} {}",
                state_name(state),
                u8::from(b.state == state)
            )?;
        }
    }
    for &(name, kind, help, value) in PER_BACKEND {
        family(out, name, kind, help)?;
        for (service, b) in backends {
            let backend = escape(&b.addr.to_string());
            writeln!(
                out,
                "{name}{{service=\"{service}\",backend=\"{backend}\"}} {}",
                value(b)
            )?;
        }
    }
    family(
        out,
        "holdfast_service_backends",
        Kind::Gauge,
        "The service's backends in each state (up, down or drain).",
    )?;
    for (service, _, list) in services {
        let service = escape(service);
        for state in STATES {
            writeln!(
                out,
                "holdfast_service_backends{{service=\"{service}\",state=\"{}\"}} {}",
                state_name(state),
                list.iter().filter(|b| b.state == state).count()
            )?;
        }
    }
    for &(name, kind, help, value) in PER_SERVICE {
        family(out, name, kind, help)?;
        for (service, stats, _) in services {
            let service = escape(service);
            writeln!(out, "{name}{{service=\"{service}\"}} {}", value(stats))?;
        }
    }
    family(
        out,
        "holdfast_service_clients_refused_total",
        Kind::Counter,
        "The service's clients closed at once by --allow/--deny or a per-IP limit, by reason.",
    )?;
    for (service, stats, _) in services {
        let service = escape(service);
        for (reason, n) in stats.clients_refused() {
            writeln!(
                out,
                "holdfast_service_clients_refused_total{{service=\"{service}\",reason=\"{reason}\"}} {n}"
            )?;
        }
    }
    Ok(())
}

fn family(out: &mut String, name: &str, kind: Kind, help: &str) -> fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {}", kind.name())
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendState, WEIGHT_SCALE};

    fn backend(addr: &str, state: BackendState) -> BackendStatsSnapshot {
        BackendStatsSnapshot {
            addr: addr.parse().unwrap(),
            weight: 2,
            effective_weight: WEIGHT_SCALE, // half way through slow start
            state,
            healthy: true,
            active: 1,
            total: 7,
            connect_failures: 3,
            passive_failures: 1,
            bytes_client_to_backend: 100,
            bytes_backend_to_client: 200,
            connect_latency_p50_us: 120,
            connect_latency_p99_us: 1_500,
            connect_latency_max_us: 2_000_000,
            rebalance_closed: 0,
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_one_sample_per_backend() {
        let backends = [
            backend("127.0.0.1:1", BackendState::Up),
            backend("[::1]:2", BackendState::Drain),
        ];
        let text = render(
            &StatsSnapshot::default(),
            &[(
                "default".to_string(),
                ServiceStatsSnapshot::default(),
                backends.to_vec(),
            )],
        );
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let name = help.split(' ').next().unwrap();
                assert!(name.starts_with("holdfast_"), "{line}");
                assert!(
                    lines[i + 1].starts_with(&format!("# TYPE {name} ")),
                    "no TYPE after {line}"
                );
                if lines[i + 1].ends_with(" counter") {
                    assert!(name.ends_with("_total"), "counter {name}");
                }
            } else if !line.starts_with("# TYPE ") {
                assert!(line.starts_with("holdfast_"), "{line}");
            }
        }
        let samples = |name: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))
                })
                .count()
        };
        assert_eq!(samples("holdfast_accepted_total"), 1);
        for &(name, ..) in PER_BACKEND {
            assert_eq!(samples(name), 2, "{name}");
        }
        assert_eq!(samples("holdfast_backend_state"), 6);
        assert_eq!(samples("holdfast_service_backends"), 3);
        for &(name, ..) in PER_SERVICE {
            assert_eq!(samples(name), 1, "{name}");
        }
        assert_eq!(samples("holdfast_service_clients_refused_total"), 3);
    }

    #[test]
    fn backend_values() {
        let text = render(
            &StatsSnapshot::default(),
            &[
                (
                    "w\"s".to_string(),
                    ServiceStatsSnapshot::default(),
                    vec![backend("[::1]:2", BackendState::Drain)],
                ),
                (
                    "db".to_string(),
                    ServiceStatsSnapshot {
                        accepted: 5,
                        active: 2,
                        closed: 3,
                        no_backend: 1,
                        idle_timeouts: 4,
                        refused_max_conns_per_ip: 6,
                        ..ServiceStatsSnapshot::default()
                    },
                    vec![backend("[::1]:2", BackendState::Up)],
                ),
            ],
        );
        for expected in [
            "holdfast_backend_up{service=\"w\\\"s\",backend=\"[::1]:2\"} 0",
            "holdfast_backend_healthy{service=\"w\\\"s\",backend=\"[::1]:2\"} 1",
            "holdfast_backend_state{service=\"w\\\"s\",backend=\"[::1]:2\",state=\"up\"} 0",
            "holdfast_backend_state{service=\"w\\\"s\",backend=\"[::1]:2\",state=\"down\"} 0",
            "holdfast_backend_state{service=\"w\\\"s\",backend=\"[::1]:2\",state=\"drain\"} 1",
            "holdfast_backend_weight{service=\"w\\\"s\",backend=\"[::1]:2\"} 2",
            "holdfast_backend_effective_weight{service=\"w\\\"s\",backend=\"[::1]:2\"} 1",
            "holdfast_backend_sessions_total{service=\"w\\\"s\",backend=\"[::1]:2\"} 7",
            "holdfast_backend_connect_latency_p50_seconds{service=\"w\\\"s\",backend=\"[::1]:2\"} 0.00012",
            "holdfast_backend_connect_latency_p99_seconds{service=\"w\\\"s\",backend=\"[::1]:2\"} 0.0015",
            "holdfast_backend_connect_latency_max_seconds{service=\"w\\\"s\",backend=\"[::1]:2\"} 2",
            // The same backend in another service: its own series.
            "holdfast_backend_up{service=\"db\",backend=\"[::1]:2\"} 1",
            "holdfast_service_backends{service=\"w\\\"s\",state=\"drain\"} 1",
            "holdfast_service_backends{service=\"db\",state=\"drain\"} 0",
            "holdfast_service_backends{service=\"db\",state=\"up\"} 1",
            "holdfast_service_sessions_active{service=\"db\"} 2",
            "holdfast_service_accepted_total{service=\"db\"} 5",
            "holdfast_service_sessions_closed_total{service=\"db\"} 3",
            "holdfast_service_no_backend_total{service=\"db\"} 1",
            "holdfast_service_idle_timeouts_total{service=\"db\"} 4",
            "holdfast_service_clients_refused_total{service=\"db\",reason=\"max_conns_per_ip\"} 6",
            "holdfast_service_clients_refused_total{service=\"w\\\"s\",reason=\"deny\"} 0",
            "holdfast_service_sessions_active{service=\"w\\\"s\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected}\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn values_print_in_the_format() {
        assert_eq!(Value::Int(42).to_string(), "42");
        assert_eq!(Value::Float(0.5).to_string(), "0.5");
        assert_eq!(Value::Float(1e-7).to_string(), "0.0000001");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
    }
}
