//! Command-line flags and their translation into a [`Config`]. Part of the binary, not of the
//! library: a library user builds a [`Config`] directly.
//!
//! clap checks each value's syntax (and exits with status 2 and a one-line `error:` naming
//! the bad value) with the library's own parsers (`FromStr` of each value type,
//! [`parse_duration`], [`resolve_addr`]), so a flag reads a value as the library does;
//! [`Args::into_config`] then builds the [`Config`], whose `validate` checks what a single
//! flag cannot (duplicates, ranges across flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::logging::LogFormat;

use holdfast::{
    AccessList, Algorithm, BackendSpec, Cidr, ClientIpConfig, Config, ConfigError, DnsName,
    HealthCheck, HealthConfig, IpLimitsConfig, LimitsConfig, ProxyVersion, RelayMode, resolve_addr,
};

/// An L4 TCP load balancer for long-lived connections (WebSockets and any other TCP service).
///
/// Every connection to a --listen address is handed, untouched, to one backend until either
/// side closes it. Durations accept units: 500ms, 2s, 5m, 1h.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, max_term_width = 100,
          // `holdfast man` needs no --listen; `holdfast --listen ...` runs as it always has.
          args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// Read the settings from this TOML file (keys are these flags' names with _ for -,
    /// docs/operations.md "Config file"); no other flag may be given with it; re-read on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print something about holdfast instead of running it
    #[command(subcommand)]
    pub command: Option<Tool>,

    /// Address to accept on, IPv4 or IPv6 (repeatable)
    #[arg(short, long = "listen", value_name = "ADDR", required_unless_present = "config",
          value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,

    /// A backend, optionally weighted 1..=256 (repeatable; at least one --backend,
    /// --backends-file or --backend-dns is required)
    // Not `required_unless_present_any`: `Config::validate` says which three flags can give
    // backends, where clap would name only this one.
    #[arg(short, long = "backend", value_name = "HOST:PORT[,weight=N]",
          value_parser = parse_backend)]
    pub backend: Vec<BackendSpec>,

    /// More backends from a file, one HOST:PORT[,weight=N] per line (# comments), a regular
    /// file of at most 16 MiB; re-read on SIGHUP
    #[arg(long, value_name = "PATH")]
    pub backends_file: Option<PathBuf>,

    /// Backends are also every address NAME resolves to (re-resolved every --dns-interval),
    /// e.g. a Kubernetes headless service (repeatable)
    #[arg(long, value_name = "NAME:PORT", value_parser = parse_dns_name)]
    pub backend_dns: Vec<DnsName>,

    /// How often --backend-dns names are resolved again
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub dns_interval: Duration,

    /// least-conn, source-hash (aliases ip-hash, source) or round-robin
    #[arg(short, long, value_name = "NAME", default_value = "least-conn",
          value_parser = parse_algorithm)]
    pub algorithm: Algorithm,

    /// Event-loop threads, each with its own SO_REUSEPORT listener (more than twice the cores
    /// is warned about) [default: number of cores]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// auto (copy small messages, splice bulk streams), splice, or copy
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = parse_relay)]
    pub relay: RelayMode,

    /// Time allowed to establish the backend connection
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub connect_timeout: Duration,

    /// Other backends tried when a connect fails, before the client is closed
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub retries: u32,

    /// Close a connection with no bytes in either direction for this long; 0 disables
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub idle_timeout: Duration,

    /// Close a connection whose backend has not answered the client's bytes with a single
    /// byte for this long (HAProxy's timeout server); one-way downloads are never affected.
    /// 0 disables
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    pub backend_timeout: Duration,

    /// TCP keepalive idle time on both sockets; 0 disables
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub tcp_keepalive: Duration,

    /// TCP_DEFER_ACCEPT: hand a connection over only once the client has sent its first bytes
    /// (after DUR at most, 1s if no DUR; up to 10m), saving a wake-up per connection and
    /// ignoring idle connects. For client-speaks-first protocols (HTTP, TLS, WebSocket); it
    /// delays a server-speaks-first one (SMTP, MySQL, Redis MONITOR-style banners) by DUR;
    /// 0 = off [default: off]
    #[arg(long, value_name = "DUR", num_args = 0..=1, default_missing_value = "1s",
          value_parser = parse_duration)]
    pub defer_accept: Option<Duration>,

    /// Memory for grown (256 KiB) pipes of bulk streams under splice, all workers together,
    /// e.g. 16MiB, 512KiB, 0 (pipes never grow); beyond it streams use 64 KiB pipes
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub pipe_memory: usize,

    /// Global cap on live connections; at the cap new clients wait in the backlog. 0 = no cap
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conns: usize,

    /// Listen backlog
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: i32,

    /// Time between two probes of the same backend
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub health_interval: Duration,

    /// Time one probe may take
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub health_timeout: Duration,

    /// tcp (a connect), websocket:/PATH (an upgrade answered 101), redis (PING answered
    /// +PONG), postgres[:USER[/DATABASE]] (a startup answered by an auth request, not an
    /// error), send:BYTES,expect:BYTES (\r \n \t \\ \, \xHH escapes; either part alone), or
    /// none
    #[arg(long, value_name = "KIND", default_value = "tcp", value_parser = parse_health_check)]
    pub health_check: HealthCheck,

    /// Consecutive successful probes that bring a down backend up
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub rise: u32,

    /// Consecutive failed probes that take an up backend down
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub fall: u32,

    /// Consecutive failures on real traffic (a connect failed, or the backend ended a session
    /// without answering a byte, within --connect-timeout) that take a backend down at once;
    /// 0 disables
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub observe_errors: u32,

    /// Ramp a backend that comes up from a small share to its full weight over DUR; 0 = off
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub slow_start: Duration,

    /// Also apply --slow-start to every backend when holdfast starts
    #[arg(long)]
    pub slow_start_on_boot: bool,

    /// Most concurrent connections to one backend; 0 = unlimited
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conns_per_backend: u64,

    /// Most new connections per second to one backend, all workers together; 0 = unlimited
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connect_rate: u32,

    /// How long a client may wait for a backend with room before it is closed
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub queue_timeout: Duration,

    /// Most clients waiting for room at once; beyond it a client is closed at once
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_queue: usize,

    /// On SIGTERM/SIGINT, how long sessions may end on their own before the rest are closed
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub drain_timeout: Duration,

    /// Sessions still open after a drain timeout are closed evenly over this long
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub close_spread: Duration,

    /// A drained backend's remaining sessions are closed (spread out) after DUR [default: never]
    #[arg(long, value_name = "DUR", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub backend_drain_timeout: Option<Duration>,

    /// When a backend joins or comes back up, close sessions on over-loaded backends (gently,
    /// spread over DUR) until each holds its weighted share [default: off]
    #[arg(long, value_name = "DUR", value_parser = parse_duration, allow_hyphen_values = true)]
    pub rebalance_on_join: Option<Duration>,

    /// Most sessions a rebalance closes per second, all workers together
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub rebalance_max_rate: u32,

    /// Close a session gently once it is DUR old, each with its own jitter of up to 10% either way
    /// [default: off]
    #[arg(long, value_name = "DUR", value_parser = parse_duration, allow_hyphen_values = true)]
    pub max_session_age: Option<Duration>,

    /// Log one line per session when it closes (client, listener, backend, duration, bytes,
    /// how it ended)
    #[arg(long)]
    pub log_sessions: bool,

    /// Serve metrics, backend state and the runtime API over HTTP on ADDR (bind it to
    /// loopback) [default: off]
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub admin: Option<SocketAddr>,

    /// Write a PROXY protocol header (v1 or v2) first on every backend connection, carrying
    /// the client's address and the address it connected to [default: off]
    #[arg(long, value_name = "VERSION")]
    pub send_proxy: Option<ProxyVersion>,

    /// Health probes write a PROXY v2 LOCAL header first (for backends that require one)
    #[arg(long)]
    pub health_send_proxy: bool,

    /// Clients must start with a PROXY protocol header (v1 or v2); its address is the
    /// client's from then on. Needs --trusted-proxy
    #[arg(long)]
    pub accept_proxy: bool,

    /// A source allowed to send a PROXY header (repeatable); others are closed
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<Cidr>,

    /// Time a client has to send its whole PROXY header
    #[arg(long, value_name = "DUR", default_value = "3s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub proxy_header_timeout: Duration,

    /// Serve only clients in these ranges (repeatable; with none, everyone not denied)
    #[arg(long, value_name = "CIDR")]
    pub allow: Vec<Cidr>,

    /// Close clients in these ranges at once (repeatable; wins over --allow)
    #[arg(long, value_name = "CIDR")]
    pub deny: Vec<Cidr>,

    /// Most live connections from one client IP (IPv6: one --ipv6-prefix), all workers
    /// together; 0 = unlimited
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conns_per_ip: u32,

    /// Most new connections per second from one client IP (a token bucket of N); 0 =
    /// unlimited
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conn_rate_per_ip: u32,

    /// Bits of an IPv6 client address that the per-IP limits count as one client
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    pub ipv6_prefix: u8,

    /// TCP_USER_TIMEOUT on both sockets: a peer that stops acknowledging is dropped after DUR
    /// even while data is queued; 0 = off
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub tcp_user_timeout: Duration,

    /// Live upgrade: listen on this UNIX socket for a new holdfast started with --take-over,
    /// hand it every session (queued, connecting or relaying), then exit 0; SIGUSR2 starts that new holdfast (this
    /// binary, these arguments) [default: off]
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,

    /// Live upgrade: once listening, take every session over from the holdfast whose
    /// --upgrade-socket is PATH [default: off]
    #[arg(long, value_name = "PATH")]
    pub take_over: Option<PathBuf>,

    /// Write this process's pid to PATH (atomically) at start, and again in a process started
    /// with --take-over once it has taken over; removed at exit if it still names this process
    /// [default: off]
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// A handover not finished within DUR fails; the old process keeps what it still has
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration,
          allow_hyphen_values = true)]
    pub upgrade_timeout: Duration,

    /// off, error, warn, info, debug or trace (RUST_LOG, if set, refines it)
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: log::LevelFilter,

    /// text, or json: one object per line (ts, level, target, msg; session lines' key=value
    /// pairs also as fields)
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Validate the flags (read the backends file, resolve the names), print the effective
    /// configuration and exit 0, or 2 with the error; binds and starts nothing
    #[arg(long)]
    pub check: bool,
}

/// What `holdfast <COMMAND>` prints, built from the same definitions as `--help`.
#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Print shell completions for SHELL (bash, zsh, fish, elvish or powershell) to stdout
    Completions {
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
    /// Print the man page (roff) to stdout: `holdfast man > holdfast.1`
    Man,
}

impl Tool {
    /// The text the tool prints.
    pub fn render(&self) -> std::io::Result<Vec<u8>> {
        let mut command = Args::command();
        let mut out = Vec::new();
        match self {
            Tool::Completions { shell } => {
                clap_complete::generate(*shell, &mut command, "holdfast", &mut out)
            }
            Tool::Man => clap_mangen::Man::new(command).render(&mut out)?,
        }
        Ok(out)
    }
}

impl Args {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut config = Config::new(self.listen, self.backend);
        config.algorithm = self.algorithm;
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        config.relay = self.relay;
        config.connect_timeout = self.connect_timeout;
        config.retries = self.retries;
        config.idle_timeout = nonzero(self.idle_timeout);
        config.backend_timeout = nonzero(self.backend_timeout);
        config.tcp_keepalive = nonzero(self.tcp_keepalive);
        config.defer_accept = self.defer_accept.and_then(nonzero);
        config.pipe_memory = self.pipe_memory;
        config.max_conns = self.max_conns;
        config.backlog = self.backlog;
        config.health = HealthConfig {
            check: self.health_check,
            interval: self.health_interval,
            timeout: self.health_timeout,
            rise: self.rise,
            fall: self.fall,
            observe_errors: self.observe_errors,
            slow_start: nonzero(self.slow_start),
            slow_start_on_boot: self.slow_start_on_boot,
        };
        config.limits = LimitsConfig {
            max_conns_per_backend: self.max_conns_per_backend,
            max_connect_rate: self.max_connect_rate,
            queue_timeout: self.queue_timeout,
            max_queue: self.max_queue,
        };
        config.drain_timeout = self.drain_timeout;
        config.close_spread = self.close_spread;
        config.backend_drain_timeout = self.backend_drain_timeout;
        config.rebalance_on_join = self.rebalance_on_join.and_then(nonzero);
        config.rebalance_max_rate = self.rebalance_max_rate;
        config.max_session_age = self.max_session_age.and_then(nonzero);
        config.log_sessions = self.log_sessions;
        config.admin = self.admin;
        config.backends_file = self.backends_file;
        config.backend_dns = self.backend_dns;
        config.dns_interval = self.dns_interval;
        config.client_ip = ClientIpConfig {
            send_proxy: self.send_proxy,
            health_send_proxy: self.health_send_proxy,
            accept_proxy: self.accept_proxy,
            trusted_proxies: self.trusted_proxy,
            proxy_header_timeout: self.proxy_header_timeout,
            access: AccessList {
                allow: self.allow,
                deny: self.deny,
            },
            limits: IpLimitsConfig {
                max_conns: self.max_conns_per_ip,
                max_rate: self.max_conn_rate_per_ip,
                ipv6_prefix: self.ipv6_prefix,
                ..IpLimitsConfig::default()
            },
        };
        config.tcp_user_timeout = nonzero(self.tcp_user_timeout);
        config.upgrade_socket = self.upgrade_socket;
        config.take_over = self.take_over;
        config.upgrade_timeout = self.upgrade_timeout;
        config.validate()?;
        Ok(config)
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    resolve_addr(s).map_err(|e| match e {
        ConfigError::Address { why, .. } => why,
        other => other.to_string(),
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    holdfast::parse_duration(s).map_err(|e| match e {
        ConfigError::Duration { why, .. } => why,
        other => other.to_string(),
    })
}

/// A size in bytes: a number with an optional unit B, KiB, MiB or GiB (K, M, G and KB, MB,
/// GB read as the binary units too).
fn parse_size(s: &str) -> Result<usize, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err("expected a size such as 16MiB, 512KiB or 0".into()),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| "expected a size such as 16MiB, 512KiB or 0".to_string())?;
    n.checked_mul(1 << shift)
        .filter(|bytes| u64::try_from(*bytes).is_ok())
        .ok_or_else(|| "size too large".to_string())
}

fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    s.parse::<BackendSpec>().map_err(|e| match e {
        ConfigError::Backend { why, .. } => why,
        other => other.to_string(),
    })
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_dns_name(s: &str) -> Result<DnsName, String> {
    s.parse::<DnsName>().map_err(|e| match e {
        ConfigError::DnsName { why, .. } => why.to_string(),
        other => other.to_string(),
    })
}

fn parse_health_check(s: &str) -> Result<HealthCheck, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

fn parse_relay(s: &str) -> Result<RelayMode, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("holdfast").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn flags_become_config() {
        let c = parse(&[
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:1",
            "-b",
            "127.0.0.1:2,weight=3",
            "-a",
            "ip-hash",
            "--workers",
            "3",
            "--relay",
            "copy",
            "--connect-timeout",
            "250ms",
            "--retries",
            "0",
            "--idle-timeout",
            "0",
            "--backend-timeout",
            "30s",
            "--tcp-keepalive",
            "2m",
            "--max-conns",
            "10",
            "--backlog",
            "16",
        ])
        .unwrap();
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.algorithm, Algorithm::SourceHash);
        assert_eq!(c.workers, 3);
        assert_eq!(c.relay, RelayMode::Copy);
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.retries, 0);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.backend_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(120)));
        assert_eq!(c.max_conns, 10);
        assert_eq!(c.backlog, 16);
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse(&["-l", "[::1]:0", "-b", "127.0.0.1:1"]).unwrap();
        assert_eq!(c.algorithm, Algorithm::LeastConn);
        assert_eq!(c.relay, RelayMode::Auto);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.retries, 2);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.backend_timeout, None);
        assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(60)));
        assert_eq!(c.backlog, 4096);
        assert_eq!(c.health.check, HealthCheck::Tcp);
        assert_eq!(c.health.interval, Duration::from_secs(2));
        assert_eq!(c.health.timeout, Duration::from_secs(1));
        assert_eq!(
            (c.health.rise, c.health.fall, c.health.observe_errors),
            (2, 3, 5)
        );
        assert_eq!(c.health.slow_start, None);
        assert_eq!(c.limits.max_conns_per_backend, 0);
        assert_eq!(c.limits.max_connect_rate, 0);
        assert_eq!(c.limits.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.client_ip, ClientIpConfig::default());
        assert_eq!(c.client_ip.proxy_header_timeout, Duration::from_secs(3));
        assert_eq!(c.client_ip.limits.ipv6_prefix, 64);
        assert_eq!(c.tcp_user_timeout, None);
        assert_eq!(c.defer_accept, None);
        assert_eq!(c.pipe_memory, 16 << 20);
    }

    #[test]
    fn defer_accept_takes_an_optional_duration() {
        let base = ["-l", "127.0.0.1:0", "-b", "127.0.0.1:1"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert_eq!(
            with(&["--defer-accept"]).unwrap().defer_accept,
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            with(&["--defer-accept", "5s"]).unwrap().defer_accept,
            Some(Duration::from_secs(5))
        );
        assert_eq!(with(&["--defer-accept", "0"]).unwrap().defer_accept, None);
        // A flag after it is not taken for its value.
        let c = parse(&["--defer-accept", "-l", "127.0.0.1:0", "-b", "127.0.0.1:1"]).unwrap();
        assert_eq!(c.defer_accept, Some(Duration::from_secs(1)));
        assert!(with(&["--defer-accept", "11m"]).is_err());
        assert!(with(&["--defer-accept", "soon"]).is_err());
    }

    #[test]
    fn pipe_memory_takes_a_size() {
        for (given, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512KiB", 512 << 10),
            ("16MiB", 16 << 20),
            ("16M", 16 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(super::parse_size(given), Ok(bytes), "{given}");
        }
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5MiB",
            "16 parsecs",
            "99999999999999999999GiB",
        ] {
            assert!(super::parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn client_address_flags_become_config() {
        let c = parse(&[
            "-l",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:1",
            "--send-proxy",
            "v2",
            "--health-send-proxy",
            "--accept-proxy",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "::1",
            "--proxy-header-timeout",
            "500ms",
            "--allow",
            "192.0.2.0/24",
            "--deny",
            "192.0.2.7",
            "--max-conns-per-ip",
            "10",
            "--max-conn-rate-per-ip",
            "5",
            "--ipv6-prefix",
            "48",
            "--tcp-user-timeout",
            "30s",
        ])
        .unwrap();
        let ip = &c.client_ip;
        assert_eq!(ip.send_proxy, Some(ProxyVersion::V2));
        assert!(ip.health_send_proxy && ip.accept_proxy);
        assert_eq!(ip.trusted_proxies.len(), 2);
        assert_eq!(ip.proxy_header_timeout, Duration::from_millis(500));
        assert!(ip.access.permits("192.0.2.1".parse().unwrap()));
        assert!(!ip.access.permits("192.0.2.7".parse().unwrap()));
        assert!(!ip.access.permits("198.51.100.1".parse().unwrap()));
        assert_eq!((ip.limits.max_conns, ip.limits.max_rate), (10, 5));
        assert_eq!(ip.limits.ipv6_prefix, 48);
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        for (args, needle) in [
            (vec!["-l", "nonsense", "-b", "127.0.0.1:1"], "nonsense"),
            (
                vec!["-l", "127.0.0.1:0", "-b", "127.0.0.1:1,weight=0"],
                "weight",
            ),
            (
                vec![
                    "-l",
                    "127.0.0.1:0",
                    "-b",
                    "127.0.0.1:1",
                    "--idle-timeout",
                    "5 parsecs",
                ],
                "5 parsecs",
            ),
            (
                vec!["-l", "127.0.0.1:0", "-b", "127.0.0.1:1", "-a", "random"],
                "random",
            ),
            (
                vec!["-l", "127.0.0.1:0", "-b", "127.0.0.1:1", "--workers", "0"],
                "--workers",
            ),
            (
                vec![
                    "-l",
                    "127.0.0.1:0",
                    "-b",
                    "127.0.0.1:1",
                    "-b",
                    "127.0.0.1:1",
                ],
                "twice",
            ),
            (
                vec!["-l", "127.0.0.1:0", "-b", "127.0.0.1:1", "--accept-proxy"],
                "--trusted-proxy",
            ),
            (
                vec![
                    "-l",
                    "127.0.0.1:0",
                    "-b",
                    "127.0.0.1:1",
                    "--accept-proxy",
                    "--trusted-proxy",
                    "10.0.0.1/8",
                ],
                "10.0.0.1/8",
            ),
            (
                vec![
                    "-l",
                    "127.0.0.1:0",
                    "-b",
                    "127.0.0.1:1",
                    "--send-proxy",
                    "v3",
                ],
                "v3",
            ),
            (
                vec![
                    "-l",
                    "127.0.0.1:0",
                    "-b",
                    "127.0.0.1:1",
                    "--ipv6-prefix",
                    "129",
                ],
                "129",
            ),
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
