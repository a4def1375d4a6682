//! `holdfast --check`: validate the flags (and read the backends file, resolve the names) as a
//! start would, print the effective configuration, and start nothing.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use holdfast::{Config, ProxyVersion};

use crate::logging::LogFormat;

/// What the binary keeps for itself rather than in [`Config`].
pub struct BinarySettings {
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
    pub pid_file: Option<PathBuf>,
}

/// Every setting, one `flag = value` line each, in the order of `--help`, values written as
/// the flag takes them (a flag off or unset: `none`; repeatable flags: one line per value, or
/// `none`). Backends are the effective list: the flags', the file's and the names' together.
pub fn describe(config: &Config, binary: &BinarySettings) -> String {
    let mut out = String::from("# holdfast --check: the configuration is valid; in effect:\n");
    let mut line = |key: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{key} = {value}");
    };
    for addr in &config.listen {
        line("listen", addr);
    }
    for backend in &config.backends {
        line("backend", backend);
    }
    line("backends-file", &path(&config.backends_file));
    many(&mut line, "backend-dns", &config.backend_dns);
    line("dns-interval", &dur(config.dns_interval));
    line("algorithm", &config.algorithm);
    line("workers", &config.workers);
    line("relay", &config.relay);
    line("connect-timeout", &dur(config.connect_timeout));
    line("retries", &config.retries);
    line("idle-timeout", &opt_dur(config.idle_timeout));
    line("backend-timeout", &opt_dur(config.backend_timeout));
    line("tcp-keepalive", &opt_dur(config.tcp_keepalive));
    line("defer-accept", &opt_dur(config.defer_accept));
    line("pipe-memory", &size(config.pipe_memory));
    line("max-conns", &config.max_conns);
    line("backlog", &config.backlog);
    let health = &config.health;
    line("health-interval", &dur(health.interval));
    line("health-timeout", &dur(health.timeout));
    line("health-check", &health.check);
    line("rise", &health.rise);
    line("fall", &health.fall);
    line("observe-errors", &health.observe_errors);
    line("slow-start", &opt_dur(health.slow_start));
    line("slow-start-on-boot", &health.slow_start_on_boot);
    let limits = &config.limits;
    line("max-conns-per-backend", &limits.max_conns_per_backend);
    line("max-connect-rate", &limits.max_connect_rate);
    line("queue-timeout", &dur(limits.queue_timeout));
    line("max-queue", &limits.max_queue);
    line("drain-timeout", &dur(config.drain_timeout));
    line("close-spread", &dur(config.close_spread));
    line(
        "backend-drain-timeout",
        &config
            .backend_drain_timeout
            .map_or_else(|| "none".to_string(), dur),
    );
    line("log-sessions", &config.log_sessions);
    line(
        "admin",
        &config
            .admin
            .map_or_else(|| "none".to_string(), |a| a.to_string()),
    );
    let ip = &config.client_ip;
    line(
        "send-proxy",
        &match ip.send_proxy {
            None => "none",
            Some(ProxyVersion::V1) => "v1",
            Some(ProxyVersion::V2) => "v2",
        },
    );
    line("health-send-proxy", &ip.health_send_proxy);
    line("accept-proxy", &ip.accept_proxy);
    many(&mut line, "trusted-proxy", &ip.trusted_proxies);
    line("proxy-header-timeout", &dur(ip.proxy_header_timeout));
    many(&mut line, "allow", &ip.access.allow);
    many(&mut line, "deny", &ip.access.deny);
    line("max-conns-per-ip", &ip.limits.max_conns);
    line("max-conn-rate-per-ip", &ip.limits.max_rate);
    line("ipv6-prefix", &ip.limits.ipv6_prefix);
    line("tcp-user-timeout", &opt_dur(config.tcp_user_timeout));
    line("upgrade-socket", &path(&config.upgrade_socket));
    line("take-over", &path(&config.take_over));
    line("pid-file", &path(&binary.pid_file));
    line("upgrade-timeout", &dur(config.upgrade_timeout));
    line("log-level", &binary.log_level.as_str().to_ascii_lowercase());
    line(
        "log-format",
        &match binary.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
    );
    out
}

fn many<T: std::fmt::Display>(
    line: &mut impl FnMut(&str, &dyn std::fmt::Display),
    key: &str,
    values: &[T],
) {
    if values.is_empty() {
        line(key, &"none");
    }
    for value in values {
        line(key, value);
    }
}

fn dur(d: Duration) -> String {
    if d.is_zero() {
        "0".to_string()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// A duration whose flag takes `0` for off.
fn opt_dur(d: Option<Duration>) -> String {
    d.map_or_else(|| "0".to_string(), dur)
}

/// A size as `--pipe-memory` takes it: the largest binary unit that divides it.
fn size(bytes: usize) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display().to_string())
}
