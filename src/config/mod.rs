//! Validated configuration: what the balancer runs with.
//!
//! The command line (the binary's `cli.rs`) and library users both produce a [`Config`];
//! nothing below this layer looks at raw flags. Every value here has already been checked, so
//! the data plane never has to report a configuration error. The value types are parsed
//! here too (`FromStr`), so a flag, a backends file line and a library user read them alike:
//!
//! - `backend.rs`: [`BackendSpec`], [`DnsName`], and turning host names into addresses;
//! - `health_check.rs`: [`HealthCheck`] and its send/expect bytes;
//! - here: [`Algorithm`], [`RelayMode`], [`HealthConfig`], [`LimitsConfig`], [`Config`] and
//!   what [`Config::validate`] checks across fields.

mod backend;
pub mod file;
mod health_check;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::client_ip::{AccessList, Cidr, IpLimitsConfig};

pub use backend::{BackendSpec, DnsName, MAX_WEIGHT, Resolver, resolve_addr};
pub(crate) use backend::{Lookup, system_lookup};
pub use health_check::{HealthCheck, MAX_PROBE_BYTES, SendExpect, escape, unescape};

/// A value in the configuration is not acceptable. Every message is one line that names the
/// value or the flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A backend (`HOST:PORT[,weight=N]`) that does not parse, or whose host does not resolve.
    #[error("invalid backend '{value}': {why}")]
    Backend { value: String, why: String },
    /// An algorithm name holdfast does not know.
    #[error(
        "invalid algorithm '{0}' (expected least-conn, source-hash, ip-hash, source or round-robin)"
    )]
    Algorithm(String),
    /// A duration that does not parse, or is negative.
    #[error("invalid duration '{value}': {why}")]
    Duration { value: String, why: String },
    /// A listen or admin address that is not `HOST:PORT`, or whose host does not resolve.
    #[error("invalid address '{value}': {why}")]
    Address { value: String, why: String },
    /// A `--backend-dns` value that is not `NAME:PORT`.
    #[error("invalid DNS name '{value}': {why}")]
    DnsName { value: String, why: &'static str },
    /// A relay mode holdfast does not know.
    #[error("invalid relay mode '{0}' (expected auto, splice or copy)")]
    Relay(String),
    /// A `--health-check` value that does not parse.
    #[error("invalid health check '{value}': {why}")]
    HealthCheck { value: String, why: String },
    /// The same backend address twice in one list.
    #[error("backend {0} is listed twice")]
    DuplicateBackend(SocketAddr),
    /// A value out of range, or values that do not go together: what [`Config::validate`]
    /// checks. The message names the flag.
    #[error("{0}")]
    Invalid(String),
}

/// How a backend is chosen for a new client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Fewest active connections relative to weight, counted across all workers.
    LeastConn,
    /// Consistent hash (Maglev) of the client IP.
    SourceHash,
    /// Smooth weighted round-robin, per worker.
    RoundRobin,
}

impl FromStr for Algorithm {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Algorithm, ConfigError> {
        match s {
            "least-conn" | "leastconn" => Ok(Algorithm::LeastConn),
            "source-hash" | "ip-hash" | "source" => Ok(Algorithm::SourceHash),
            "round-robin" | "roundrobin" => Ok(Algorithm::RoundRobin),
            _ => Err(ConfigError::Algorithm(s.to_string())),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::LeastConn => "least-conn",
            Algorithm::SourceHash => "source-hash",
            Algorithm::RoundRobin => "round-robin",
        })
    }
}

/// How bytes are moved between the two sockets of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    /// Per connection and direction: copy small messages, splice bulk streams.
    Auto,
    /// Always `splice(2)` through a pipe (falls back to copying where unavailable).
    Splice,
    /// Always copy through user space.
    Copy,
}

impl FromStr for RelayMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<RelayMode, ConfigError> {
        match s {
            "auto" => Ok(RelayMode::Auto),
            "splice" => Ok(RelayMode::Splice),
            "copy" => Ok(RelayMode::Copy),
            _ => Err(ConfigError::Relay(s.to_string())),
        }
    }
}

impl fmt::Display for RelayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelayMode::Auto => "auto",
            RelayMode::Splice => "splice",
            RelayMode::Copy => "copy",
        })
    }
}

/// Active and passive health checking and slow start.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    pub check: HealthCheck,
    /// Time between two probes of the same backend.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive successful probes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed probes that take an up backend down.
    pub fall: u32,
    /// Consecutive failures on real traffic that take a backend down at once; 0 disables.
    pub observe_errors: u32,
    /// Ramp a backend that comes up from a small share to its full weight over this long.
    pub slow_start: Option<Duration>,
    /// Also ramp every backend when holdfast itself starts.
    pub slow_start_on_boot: bool,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            check: HealthCheck::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            observe_errors: 5,
            slow_start: None,
            slow_start_on_boot: false,
        }
    }
}

/// Per-backend limits, and the queue where clients wait for room instead of being refused.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Most concurrent sessions to one backend; 0 = unlimited.
    pub max_conns_per_backend: u64,
    /// Most new connections per second to one backend, across all workers; 0 = unlimited.
    pub max_connect_rate: u32,
    /// How long a client may wait for a backend with room.
    pub queue_timeout: Duration,
    /// Most clients waiting at once (all workers together); beyond it a client is closed.
    pub max_queue: usize,
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            max_conns_per_backend: 0,
            max_connect_rate: 0,
            queue_timeout: Duration::from_secs(5),
            max_queue: 4096,
        }
    }
}

/// The longest `--defer-accept`: the kernel counts it in SYN-ACK retransmissions (at most
/// 255), and a client silent for longer than a few seconds is not one it is meant for.
pub const MAX_DEFER_ACCEPT: Duration = Duration::from_secs(600);

/// Everything the balancer runs with. Build one with [`Config::new`] and adjust the fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to accept on. Port 0 picks a free port (shared by all workers).
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<BackendSpec>,
    pub algorithm: Algorithm,
    /// Event-loop threads, each with its own SO_REUSEPORT listener per listen address.
    pub workers: usize,
    pub relay: RelayMode,
    pub connect_timeout: Duration,
    /// Other backends tried after a failed connect, before the client is closed.
    pub retries: u32,
    /// Close a session with no bytes either way for this long. `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Close a session whose backend has not answered the client's bytes for this long (the
    /// clock starts at the first client byte after the backend's last one). `None`
    /// disables.
    pub backend_timeout: Option<Duration>,
    /// TCP keepalive idle time on both sockets. `None` disables.
    pub tcp_keepalive: Option<Duration>,
    /// TCP_DEFER_ACCEPT on the listeners: a connection is accepted once the client has sent
    /// its first bytes (or after about this long). `None`: off.
    pub defer_accept: Option<Duration>,
    /// Bytes of grown pipes (256 KiB each, for proven bulk streams under splice) all workers
    /// may hold together; 0: pipes never grow.
    pub pipe_memory: usize,
    /// Global cap on live sessions; 0 means only the fd limit applies.
    pub max_conns: usize,
    pub backlog: i32,
    pub health: HealthConfig,
    pub limits: LimitsConfig,
    /// Graceful shutdown: how long sessions may end on their own.
    pub drain_timeout: Duration,
    /// Sessions still open after a drain timeout are closed evenly over this long.
    pub close_spread: Duration,
    /// A drained backend's remaining sessions are closed (spread) after this long; `None`:
    /// they may live on until they end.
    pub backend_drain_timeout: Option<Duration>,
    /// When a backend joins or comes back up, close sessions on over-loaded backends over
    /// this window until every backend holds its weighted share; `None`: never.
    pub rebalance_on_join: Option<Duration>,
    /// Most sessions a rebalance closes per second, all workers together (at least 1).
    pub rebalance_max_rate: u32,
    /// Close a session (gently) once it is this old, each with its own ±10% jitter; `None`:
    /// never.
    pub max_session_age: Option<Duration>,
    /// One log line per session at close.
    pub log_sessions: bool,
    /// Where to serve the admin endpoint (metrics, backends, runtime API); `None`: nowhere.
    pub admin: Option<SocketAddr>,
    /// More backends from a file, re-read by [`crate::Controller::reload`] (SIGHUP).
    pub backends_file: Option<PathBuf>,
    /// Backends are also every address these names resolve to, re-resolved every
    /// `dns_interval`.
    pub backend_dns: Vec<DnsName>,
    pub dns_interval: Duration,
    /// How `backend_dns` names are resolved (the system resolver unless replaced).
    pub resolver: Resolver,
    /// The real client address: PROXY protocol in and out, allow/deny, per-IP limits.
    pub client_ip: ClientIpConfig,
    /// TCP_USER_TIMEOUT on both sockets of a session. `None` disables.
    pub tcp_user_timeout: Option<Duration>,
    /// Live upgrade (the binary's): listen on this UNIX socket for a new process that takes
    /// the sessions over.
    pub upgrade_socket: Option<PathBuf>,
    /// Live upgrade (the binary's): take the sessions over from the process listening on
    /// this UNIX socket once started.
    pub take_over: Option<PathBuf>,
    /// How long a handover may take before the old process keeps what it has not given.
    pub upgrade_timeout: Duration,
    /// Live upgrade, new side: the old process's backend state, applied to the first set
    /// (set by the handover, never by a flag).
    pub inherited_backends: Vec<crate::upgrade::wire::BackendInfo>,
}

impl Config {
    /// A configuration with holdfast's defaults.
    pub fn new(listen: Vec<SocketAddr>, backends: Vec<BackendSpec>) -> Config {
        Config {
            listen,
            backends,
            algorithm: Algorithm::LeastConn,
            workers: default_workers(),
            relay: RelayMode::Auto,
            connect_timeout: Duration::from_secs(5),
            retries: 2,
            idle_timeout: Some(Duration::from_secs(3600)),
            backend_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(60)),
            defer_accept: None,
            pipe_memory: crate::relay::DEFAULT_PIPE_MEMORY,
            max_conns: 0,
            backlog: 4096,
            health: HealthConfig::default(),
            limits: LimitsConfig::default(),
            drain_timeout: Duration::from_secs(30),
            close_spread: Duration::from_secs(10),
            backend_drain_timeout: None,
            rebalance_on_join: None,
            rebalance_max_rate: 100,
            max_session_age: None,
            log_sessions: false,
            admin: None,
            backends_file: None,
            backend_dns: Vec::new(),
            dns_interval: Duration::from_secs(10),
            resolver: Resolver::system(),
            client_ip: ClientIpConfig::default(),
            tcp_user_timeout: None,
            upgrade_socket: None,
            take_over: None,
            upgrade_timeout: Duration::from_secs(30),
            inherited_backends: Vec::new(),
        }
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one --listen address is required".into(),
            ));
        }
        if self.listen.len() > crate::token::MAX_LISTENERS {
            return Err(ConfigError::Invalid(format!(
                "at most {} --listen addresses are supported",
                crate::token::MAX_LISTENERS
            )));
        }
        if self.backends.is_empty() && self.backends_file.is_none() && self.backend_dns.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one --backend, --backends-file or --backend-dns is required".into(),
            ));
        }
        if !self.backend_dns.is_empty() && self.dns_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "--dns-interval must be greater than 0".into(),
            ));
        }
        if self
            .rebalance_on_join
            .is_some_and(|w| w > MAX_REBALANCE_WINDOW)
        {
            return Err(ConfigError::Invalid(
                "--rebalance-on-join must be at most 24h".into(),
            ));
        }
        if self.max_session_age.is_some_and(|a| a > MAX_SESSION_AGE) {
            return Err(ConfigError::Invalid(
                "--max-session-age must be at most 365d".into(),
            ));
        }
        if self.rebalance_max_rate == 0 {
            return Err(ConfigError::Invalid(
                "--rebalance-max-rate must be at least 1".into(),
            ));
        }
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError::Invalid(
                "--workers must be from 1 to 1024".into(),
            ));
        }
        if self.defer_accept.is_some_and(|d| d > MAX_DEFER_ACCEPT) {
            return Err(ConfigError::Invalid(
                "--defer-accept must be at most 10m".into(),
            ));
        }
        let mut listening = HashSet::with_capacity(self.listen.len());
        for addr in &self.listen {
            // Port 0 twice is two different free ports; any other address twice is a mistake.
            if addr.port() != 0 && !listening.insert(addr) {
                return Err(ConfigError::Invalid(format!(
                    "--listen {addr} is given twice"
                )));
            }
        }
        // The Maglev table has 65537 slots: a longer list would leave backends without one.
        if self.algorithm == Algorithm::SourceHash && self.backends.len() > MAX_SOURCE_HASH_BACKENDS
        {
            return Err(ConfigError::Invalid(format!(
                "source-hash takes at most {MAX_SOURCE_HASH_BACKENDS} backends, not {}",
                self.backends.len()
            )));
        }
        let mut seen = HashSet::with_capacity(self.backends.len());
        for b in &self.backends {
            if !(1..=MAX_WEIGHT).contains(&b.weight) {
                return Err(ConfigError::Invalid(format!(
                    "backend {}: weight must be from 1 to {MAX_WEIGHT}",
                    b.addr
                )));
            }
            if b.addr.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "backend {}: port 0 cannot be connected to",
                    b.addr
                )));
            }
            if !seen.insert(b.addr) {
                return Err(ConfigError::DuplicateBackend(b.addr));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "--connect-timeout must be greater than 0".into(),
            ));
        }
        if self.backlog <= 0 {
            return Err(ConfigError::Invalid("--backlog must be at least 1".into()));
        }
        // Checked with or without probes: without them, `rise × interval` is how long a
        // backend taken down by passive detection waits before it is retried.
        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "--health-interval and --health-timeout must be greater than 0".into(),
            ));
        }
        if h.rise == 0 || h.fall == 0 {
            return Err(ConfigError::Invalid(
                "--rise and --fall must be at least 1".into(),
            ));
        }
        if self.limits.queue_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "--queue-timeout must be greater than 0".into(),
            ));
        }
        self.client_ip.validate()?;
        Ok(())
    }
}

impl Config {
    /// The settings (by their `--config` key) in which `other` differs from `self`, besides
    /// the backend list: what a reload of the file cannot apply to a running balancer.
    pub fn differences(&self, other: &Config) -> Vec<&'static str> {
        // One list: the pattern names every field, so a new one does not compile until it is
        // compared here or skipped.
        macro_rules! compare {
            (skip: [$($skip:ident),*], compare: [$($field:ident),* $(,)?]) => {{
                let Config { $($field,)* $($skip: _,)* } = self;
                let mut keys = Vec::new();
                $(
                    if format!("{:?}", $field) != format!("{:?}", other.$field) {
                        keys.push(stringify!($field));
                    }
                )*
                keys
            }};
        }
        compare!(
            skip: [backends, resolver, take_over, inherited_backends],
            compare: [
                listen,
                algorithm,
                workers,
                relay,
                connect_timeout,
                retries,
                idle_timeout,
                backend_timeout,
                tcp_keepalive,
                max_conns,
                backlog,
                health,
                limits,
                drain_timeout,
                close_spread,
                backend_drain_timeout,
                rebalance_on_join,
                rebalance_max_rate,
                max_session_age,
                log_sessions,
                admin,
                backends_file,
                backend_dns,
                dns_interval,
                client_ip,
                tcp_user_timeout,
                upgrade_socket,
                upgrade_timeout,
                defer_accept,
                pipe_memory,
            ]
        )
    }

    /// What is allowed but probably a mistake, one line each, for the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let cores = default_workers();
        if self.workers > WORKERS_PER_CORE_WARNING * cores {
            warnings.push(format!(
                "--workers {} is far above the {cores} core(s) holdfast may run on: workers \
                 beyond one per core only take turns on the same cores",
                self.workers
            ));
        }
        warnings
    }
}

/// Which PROXY protocol header holdfast writes first on every backend connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header; TLVs received with `--accept-proxy` are passed on.
    V2,
}

impl FromStr for ProxyVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<ProxyVersion, String> {
        match s {
            "v1" | "1" => Ok(ProxyVersion::V1),
            "v2" | "2" => Ok(ProxyVersion::V2),
            _ => Err(format!(
                "invalid PROXY protocol version '{s}' (expected v1 or v2)"
            )),
        }
    }
}

/// The client's real address (issue #11): where it comes from (`--accept-proxy`), where it is
/// sent (`--send-proxy`, `--health-send-proxy`), and what is done with it (`--allow`,
/// `--deny`, the per-IP limits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIpConfig {
    /// Write a PROXY header of this version first on every backend connection.
    pub send_proxy: Option<ProxyVersion>,
    /// Health probes write a v2 `LOCAL` header first.
    pub health_send_proxy: bool,
    /// Clients must start with a PROXY header (v1 or v2), from a `trusted_proxies` source.
    pub accept_proxy: bool,
    /// Sources allowed to send a PROXY header; required with `accept_proxy`.
    pub trusted_proxies: Vec<Cidr>,
    /// How long a client may take to send its whole PROXY header.
    pub proxy_header_timeout: Duration,
    /// `--allow` / `--deny`, checked against the client address (the header's, if any).
    pub access: AccessList,
    /// `--max-conns-per-ip`, `--max-conn-rate-per-ip`, `--ipv6-prefix`.
    pub limits: IpLimitsConfig,
}

impl Default for ClientIpConfig {
    fn default() -> ClientIpConfig {
        ClientIpConfig {
            send_proxy: None,
            health_send_proxy: false,
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            proxy_header_timeout: Duration::from_secs(3),
            access: AccessList::default(),
            limits: IpLimitsConfig::default(),
        }
    }
}

impl ClientIpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.accept_proxy && self.trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid(
                "--accept-proxy needs at least one --trusted-proxy CIDR (who may send the header)"
                    .into(),
            ));
        }
        if !self.accept_proxy && !self.trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid(
                "--trusted-proxy is only used with --accept-proxy".into(),
            ));
        }
        if self.accept_proxy && self.proxy_header_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "--proxy-header-timeout must be greater than 0".into(),
            ));
        }
        if self.limits.ipv6_prefix > 128 {
            return Err(ConfigError::Invalid(
                "--ipv6-prefix must be from 0 to 128".into(),
            ));
        }
        if self.limits.max_entries == 0 {
            return Err(ConfigError::Invalid(
                "the per-IP table needs room for at least one entry".into(),
            ));
        }
        Ok(())
    }

    /// Whether any per-IP limit is on (the shared table is needed).
    pub fn limits_on(&self) -> bool {
        self.limits.max_conns > 0 || self.limits.max_rate > 0
    }
}

/// Most backends source-hash takes: one fewer than its Maglev table has slots.
pub const MAX_SOURCE_HASH_BACKENDS: usize = crate::balance::maglev::DEFAULT_TABLE_SIZE - 1;

/// The longest rebalance window (`--rebalance-on-join`, `POST /rebalance`).
pub const MAX_REBALANCE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The longest `--max-session-age`.
pub const MAX_SESSION_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// More workers than this many per core are warned about.
const WORKERS_PER_CORE_WARNING: usize = 2;

/// One worker per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A duration as holdfast's flags take it: `500ms`, `2s`, `1h`, `1h 30m`; a bare `0` means
/// zero; a negative one is an error. A pure function of its input.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = |why: String| ConfigError::Duration {
        value: s.to_string(),
        why,
    };
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    // The duration flags take values that start with '-' (clap would otherwise read `-1s` as
    // an unknown flag `-1`), so that this can say what is wrong with them.
    if s.trim_start().starts_with('-') {
        return Err(bad(
            "a duration cannot be negative (expected e.g. 500ms, 2s, 1h)".into(),
        ));
    }
    humantime::parse_duration(s).map_err(|e| bad(format!("{e} (expected e.g. 500ms, 2s, 1h)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_and_a_listen_address_twice_are_rejected() {
        let err = "127.0.0.1:0"
            .parse::<BackendSpec>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("port 0"), "{err}");
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let backend = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        let mut c = Config::new(vec![listen, listen], vec![backend]);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        c.listen = vec!["127.0.0.1:0".parse().unwrap(); 2];
        assert!(c.validate().is_ok(), "port 0 twice is two free ports");
        // The library is checked as the flags are.
        c.backends = vec![BackendSpec::new("127.0.0.1:0".parse().unwrap())];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("port 0"), "{err}");
    }

    #[test]
    fn rebalancing_values_are_bounded() {
        let backend = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        let mut c = Config::new(vec!["127.0.0.1:0".parse().unwrap()], vec![backend]);
        c.rebalance_on_join = Some(MAX_REBALANCE_WINDOW);
        c.max_session_age = Some(MAX_SESSION_AGE);
        assert!(c.validate().is_ok());
        c.rebalance_max_rate = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--rebalance-max-rate"), "{err}");
        c.rebalance_max_rate = 1;
        c.rebalance_on_join = Some(MAX_REBALANCE_WINDOW + Duration::from_secs(1));
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--rebalance-on-join"), "{err}");
        c.rebalance_on_join = None;
        c.max_session_age = Some(MAX_SESSION_AGE * 2);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--max-session-age"), "{err}");
    }

    #[test]
    fn source_hash_takes_no_more_backends_than_its_table_has_slots() {
        let backends: Vec<BackendSpec> = (0..=65536u32)
            .map(|i| {
                let [_, b, c, d] = i.to_be_bytes();
                BackendSpec::new(SocketAddr::from(([10, b, c, d], 80)))
            })
            .collect();
        let mut c = Config::new(vec!["127.0.0.1:0".parse().unwrap()], backends);
        assert!(c.validate().is_ok(), "least-conn has no such limit");
        c.algorithm = Algorithm::SourceHash;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("source-hash") && err.contains("65536"),
            "{err}"
        );
        c.backends.pop();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn algorithm_aliases() {
        for (s, a) in [
            ("least-conn", Algorithm::LeastConn),
            ("source-hash", Algorithm::SourceHash),
            ("ip-hash", Algorithm::SourceHash),
            ("source", Algorithm::SourceHash),
            ("round-robin", Algorithm::RoundRobin),
        ] {
            assert_eq!(s.parse::<Algorithm>().unwrap(), a);
        }
        assert!("random".parse::<Algorithm>().is_err());
    }
    #[test]
    fn duplicate_backends_are_rejected() {
        let b = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        let c = Config::new(vec!["127.0.0.1:0".parse().unwrap()], vec![b.clone(), b]);
        assert!(c.validate().is_err());
    }
}

/// Properties of the duration parser, over generated input.
#[cfg(test)]
mod duration_properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused(text in any::<String>()) {
            let _ = parse_duration(&text);
        }

        #[test]
        fn duration_like_text_parses_or_is_refused(
            text in "[-+ 0-9.a-zµ]{0,40}",
        ) {
            if let Ok(d) = parse_duration(&text) {
                // What it read, written out, reads the same.
                let again = humantime::format_duration(d).to_string();
                prop_assert_eq!(parse_duration(&again), Ok(d), "{:?} -> {:?}", text, again);
            }
        }

        #[test]
        fn a_duration_round_trips_through_its_written_form(
            secs in prop_oneof![0u64..100_000, any::<u64>()],
            nanos in 0u32..1_000_000_000,
        ) {
            let d = Duration::new(secs, nanos);
            let text = humantime::format_duration(d).to_string();
            prop_assert_eq!(parse_duration(&text), Ok(d), "{}", text);
        }

        #[test]
        fn whole_units_read_as_written(n in any::<u32>()) {
            let n64 = u64::from(n);
            prop_assert_eq!(parse_duration(&format!("{n}ms")), Ok(Duration::from_millis(n64)));
            prop_assert_eq!(parse_duration(&format!("{n}s")), Ok(Duration::from_secs(n64)));
            prop_assert_eq!(parse_duration(&format!("{n}m")), Ok(Duration::from_secs(60 * n64)));
        }

        #[test]
        fn a_negative_duration_says_so(
            secs in any::<u64>(),
            text in "[0-9a-z ]{0,10}",
        ) {
            for negative in [format!("-{secs}s"), format!("-{text}"), format!(" -{text}")] {
                let err = parse_duration(&negative).unwrap_err().to_string();
                prop_assert!(err.contains("negative"), "{:?}: {}", negative, err);
            }
        }
    }
}
