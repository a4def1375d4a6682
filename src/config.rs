//! Validated configuration: what the balancer runs with.
//!
//! The command line (`cli.rs`) and tests both produce a [`Config`]; nothing below this layer
//! looks at raw flags. Every value here has already been checked, so the data plane never has
//! to report a configuration error.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::client_ip::{AccessList, Cidr, IpLimitsConfig};
use crate::error::ConfigError;
use crate::sources::{DnsName, Resolver};

/// Largest weight a backend may carry (HAProxy's limit as well).
pub const MAX_WEIGHT: u32 = 256;

/// One backend as the user wrote it: an address and a weight.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
}

impl BackendSpec {
    pub fn new(addr: SocketAddr) -> BackendSpec {
        BackendSpec { addr, weight: 1 }
    }

    pub fn with_weight(addr: SocketAddr, weight: u32) -> BackendSpec {
        BackendSpec { addr, weight }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{},weight={}", self.addr, self.weight)
        }
    }
}

impl FromStr for BackendSpec {
    type Err = ConfigError;

    /// `HOST:PORT[,weight=N]`. A host name is resolved once, here; the first address wins.
    fn from_str(s: &str) -> Result<BackendSpec, ConfigError> {
        BackendSpec::parse_with(s, &system_lookup)
    }
}

/// Finds the address of a host name (`HOST`, `PORT`): the system resolver, or a stand-in
/// where the parse must stay a pure function (property tests, fuzzing).
pub type Lookup = dyn Fn(&str, u16) -> Result<SocketAddr, String>;

impl BackendSpec {
    /// `HOST:PORT[,weight=N]`, with `lookup` asked for the address of a host name (an IP
    /// address is never looked up). With a pure `lookup` this is a pure function.
    pub fn parse_with(s: &str, lookup: &Lookup) -> Result<BackendSpec, ConfigError> {
        let bad = |why: &str| ConfigError::Backend {
            value: s.to_string(),
            why: why.to_string(),
        };
        let mut parts = s.split(',');
        let addr_part = parts.next().unwrap_or_default().trim();
        if addr_part.is_empty() {
            return Err(bad("expected HOST:PORT"));
        }
        let addr = resolve_with(addr_part, lookup).map_err(|why| bad(&why))?;
        if addr.port() == 0 {
            return Err(bad("port 0 cannot be connected to (expected 1-65535)"));
        }
        let mut weight = 1;
        for opt in parts {
            let (key, value) = opt
                .split_once('=')
                .ok_or_else(|| bad("expected weight=N"))?;
            match key.trim() {
                "weight" => {
                    weight = value
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|w| (1..=MAX_WEIGHT).contains(w))
                        .ok_or_else(|| bad("weight must be an integer from 1 to 256"))?;
                }
                other => return Err(bad(&format!("unknown option '{other}'"))),
            }
        }
        Ok(BackendSpec { addr, weight })
    }
}

/// Resolves `HOST:PORT` (or `[v6]:PORT`) to one socket address.
pub fn resolve(s: &str) -> Result<SocketAddr, String> {
    resolve_with(s, &system_lookup)
}

/// Like [`resolve`], with `lookup` asked for the address of a host name.
pub fn resolve_with(s: &str, lookup: &Lookup) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = s.rsplit_once(':').ok_or("expected HOST:PORT")?;
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = port.parse::<u16>().map_err(|_| "port must be 0-65535")?;
    lookup(host, port)
}

/// The system resolver (`getaddrinfo`); the first address wins.
pub fn system_lookup(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{host}': {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("'{host}' resolves to no address"))
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

/// Most bytes a `send:` or `expect:` may hold, and most bytes of an answer a probe reads.
pub const MAX_PROBE_BYTES: usize = 4096;

/// User name the `postgres` probe starts up as, unless one is given.
pub const DEFAULT_POSTGRES_USER: &str = "holdfast";

/// How backends are probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// No active probes: only failures seen on real traffic mark a backend down.
    None,
    /// A TCP connect must complete within the timeout.
    Tcp,
    /// A WebSocket upgrade request for this path must be answered `101` within the timeout.
    WebSocket { path: String },
    /// `send:BYTES,expect:BYTES`: after the connect, these bytes are written and the answer
    /// must contain those (HAProxy's `tcp-check send` / `expect string`).
    SendExpect(SendExpect),
    /// `redis`: `PING\r\n` must be answered with `+PONG`.
    Redis,
    /// `postgres[:USER[/DATABASE]]`: a PostgreSQL StartupMessage for USER (and DATABASE) must
    /// be answered with an authentication request (a message of type `R`), not an error
    /// (`E`, e.g. "the database system is shutting down"). The probe never authenticates.
    Postgres {
        user: String,
        database: Option<String>,
    },
}

/// The bytes a send/expect probe writes and the bytes it wants to see, at least one of them
/// non-empty (an empty one was omitted), each at most [`MAX_PROBE_BYTES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendExpect {
    send: Vec<u8>,
    expect: Vec<u8>,
}

impl SendExpect {
    /// `None` if both are empty or either is longer than [`MAX_PROBE_BYTES`].
    pub fn new(send: impl Into<Vec<u8>>, expect: impl Into<Vec<u8>>) -> Option<SendExpect> {
        let (send, expect) = (send.into(), expect.into());
        let fits = send.len() <= MAX_PROBE_BYTES && expect.len() <= MAX_PROBE_BYTES;
        (fits && !(send.is_empty() && expect.is_empty())).then_some(SendExpect { send, expect })
    }

    /// Written once the connect completes; empty: nothing is written.
    pub fn send(&self) -> &[u8] {
        &self.send
    }

    /// Must appear in what the backend sends; empty: nothing is read.
    pub fn expect(&self) -> &[u8] {
        &self.expect
    }
}

impl FromStr for HealthCheck {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<HealthCheck, ConfigError> {
        let bad = |why: String| ConfigError::HealthCheck {
            value: s.to_string(),
            why,
        };
        match s {
            "none" => return Ok(HealthCheck::None),
            "tcp" => return Ok(HealthCheck::Tcp),
            "redis" => return Ok(HealthCheck::Redis),
            "postgres" => {
                return Ok(HealthCheck::Postgres {
                    user: DEFAULT_POSTGRES_USER.to_string(),
                    database: None,
                });
            }
            _ => {}
        }
        if let Some(path) = s.strip_prefix("websocket:") {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(bad("the path must start with '/' and hold no spaces".into()));
            }
            return Ok(HealthCheck::WebSocket {
                path: path.to_string(),
            });
        }
        if let Some(rest) = s.strip_prefix("postgres:") {
            let (user, database) = match rest.split_once('/') {
                Some((user, database)) => (user, Some(database)),
                None => (rest, None),
            };
            let name_ok = |n: &str| !n.is_empty() && !n.contains('\0');
            if !name_ok(user) || !database.is_none_or(name_ok) {
                return Err(bad(
                    "expected postgres:USER or postgres:USER/DATABASE, names not empty".into(),
                ));
            }
            return Ok(HealthCheck::Postgres {
                user: user.to_string(),
                database: database.map(str::to_string),
            });
        }
        if s.starts_with("send:") || s.starts_with("expect:") {
            return parse_send_expect(s)
                .map(HealthCheck::SendExpect)
                .map_err(bad);
        }
        Err(bad(
            "expected tcp, none, websocket:/PATH, redis, postgres[:USER[/DATABASE]], or \
             send:BYTES and/or expect:BYTES separated by a comma"
                .into(),
        ))
    }
}

/// `send:BYTES,expect:BYTES`, either part alone, in either order; BYTES with escapes.
fn parse_send_expect(s: &str) -> Result<SendExpect, String> {
    let (mut send, mut expect) = (None, None);
    for part in split_unescaped_commas(s) {
        let (slot, name, value) = if let Some(v) = part.strip_prefix("send:") {
            (&mut send, "send", v)
        } else if let Some(v) = part.strip_prefix("expect:") {
            (&mut expect, "expect", v)
        } else {
            return Err(format!(
                "'{part}' is neither send:BYTES nor expect:BYTES (a comma in BYTES is written \\,)"
            ));
        };
        if slot.is_some() {
            return Err(format!("{name}: is given twice"));
        }
        let bytes = unescape(value).map_err(|why| format!("{name}: {why}"))?;
        if bytes.is_empty() {
            return Err(format!("{name}: is empty (leave it out instead)"));
        }
        if bytes.len() > MAX_PROBE_BYTES {
            return Err(format!("{name}: is longer than {MAX_PROBE_BYTES} bytes"));
        }
        *slot = Some(bytes);
    }
    SendExpect::new(send.unwrap_or_default(), expect.unwrap_or_default())
        .ok_or_else(|| "nothing to send or expect".to_string())
}

/// Splits at every comma that is not escaped by a backslash.
fn split_unescaped_commas(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b',' => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Decodes `\r \n \t \\ \, \xHH`; every other character stands for its own (UTF-8) bytes.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match bytes.next() {
            Some(b'r') => b'\r',
            Some(b'n') => b'\n',
            Some(b't') => b'\t',
            Some(b'\\') => b'\\',
            Some(b',') => b',',
            Some(b'x') => {
                let hex = |d: Option<u8>| d.and_then(|d| (d as char).to_digit(16));
                match (hex(bytes.next()), hex(bytes.next())) {
                    (Some(hi), Some(lo)) => (hi * 16 + lo) as u8,
                    _ => return Err("\\x needs two hex digits".into()),
                }
            }
            Some(c) if c.is_ascii() => {
                return Err(format!(
                    "unknown escape '\\{}' (known: \\r \\n \\t \\\\ \\, \\xHH)",
                    c.escape_ascii()
                ));
            }
            Some(_) => return Err("unknown escape: '\\' before a non-ASCII character".into()),
            None => return Err("a lone '\\' at the end (a backslash is written \\\\)".into()),
        });
    }
    Ok(out)
}

/// The inverse of [`unescape`]: printable ASCII as it is (but `\` and `,`), `\r \n \t` by
/// name, every other byte as `\xHH`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b',' => out.push_str("\\,"),
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b' '..=b'~' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::None => f.write_str("none"),
            HealthCheck::Tcp => f.write_str("tcp"),
            HealthCheck::WebSocket { path } => write!(f, "websocket:{path}"),
            HealthCheck::SendExpect(se) => {
                let send = (!se.send.is_empty()).then(|| format!("send:{}", escape(&se.send)));
                let expect =
                    (!se.expect.is_empty()).then(|| format!("expect:{}", escape(&se.expect)));
                let parts: Vec<String> = send.into_iter().chain(expect).collect();
                f.write_str(&parts.join(","))
            }
            HealthCheck::Redis => f.write_str("redis"),
            HealthCheck::Postgres { user, database } => match database {
                None if user == DEFAULT_POSTGRES_USER => f.write_str("postgres"),
                None => write!(f, "postgres:{user}"),
                Some(db) => write!(f, "postgres:{user}/{db}"),
            },
        }
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
            max_conns: 0,
            backlog: 4096,
            health: HealthConfig::default(),
            limits: LimitsConfig::default(),
            drain_timeout: Duration::from_secs(30),
            close_spread: Duration::from_secs(10),
            backend_drain_timeout: None,
            log_sessions: false,
            admin: None,
            backends_file: None,
            backend_dns: Vec::new(),
            dns_interval: Duration::from_secs(10),
            resolver: Resolver::system(),
            client_ip: ClientIpConfig::default(),
            tcp_user_timeout: None,
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
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError::Invalid(
                "--workers must be from 1 to 1024".into(),
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
                return Err(ConfigError::Invalid(format!(
                    "backend {} is listed twice",
                    b.addr
                )));
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

/// More workers than this many per core are warned about.
const WORKERS_PER_CORE_WARNING: usize = 2;

/// One worker per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_spec_parses_weight_and_rejects_nonsense() {
        let b: BackendSpec = "127.0.0.1:80,weight=7".parse().unwrap();
        assert_eq!(b.addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(b.weight, 7);
        let b: BackendSpec = "[::1]:8080".parse().unwrap();
        assert_eq!(b.weight, 1);
        assert_eq!(b.to_string(), "[::1]:8080");
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:99999",
            "127.0.0.1:80,weight=0",
            "127.0.0.1:80,weight=257",
            "127.0.0.1:80,weight=x",
            "127.0.0.1:80,colour=red",
            ":80",
        ] {
            assert!(
                bad.parse::<BackendSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

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
    fn localhost_resolves() {
        let b: BackendSpec = "localhost:9,weight=2".parse().unwrap();
        assert!(b.addr.ip().is_loopback());
        assert_eq!(b.addr.port(), 9);
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
    fn health_check_kinds() {
        assert_eq!("tcp".parse::<HealthCheck>().unwrap(), HealthCheck::Tcp);
        assert_eq!("none".parse::<HealthCheck>().unwrap(), HealthCheck::None);
        assert_eq!(
            "websocket:/ws".parse::<HealthCheck>().unwrap(),
            HealthCheck::WebSocket { path: "/ws".into() }
        );
        assert_eq!("redis".parse::<HealthCheck>().unwrap(), HealthCheck::Redis);
        let pg = |user: &str, database: Option<&str>| HealthCheck::Postgres {
            user: user.into(),
            database: database.map(Into::into),
        };
        assert_eq!(
            "postgres".parse::<HealthCheck>().unwrap(),
            pg("holdfast", None)
        );
        assert_eq!(
            "postgres:app".parse::<HealthCheck>().unwrap(),
            pg("app", None)
        );
        assert_eq!(
            "postgres:app/shop".parse::<HealthCheck>().unwrap(),
            pg("app", Some("shop"))
        );
        for bad in [
            "http",
            "websocket:",
            "websocket:ws",
            "websocket:/a b",
            "postgres:",
            "postgres:/db",
            "postgres:app/",
            "redis:",
        ] {
            assert!(bad.parse::<HealthCheck>().is_err(), "{bad:?}");
        }
    }

    fn send_expect(send: &[u8], expect: &[u8]) -> HealthCheck {
        HealthCheck::SendExpect(SendExpect::new(send, expect).unwrap())
    }

    #[test]
    fn send_expect_parts_and_escapes() {
        for (text, send, expect) in [
            (
                r"send:PING\r\n,expect:+PONG",
                &b"PING\r\n"[..],
                &b"+PONG"[..],
            ),
            (r"expect:+PONG,send:PING\r\n", b"PING\r\n", b"+PONG"),
            ("expect:SSH-", b"", b"SSH-"),
            (
                r"send:\x00\x00\x00\x08\x04\xd2\x16\x2f",
                b"\0\0\0\x08\x04\xd2\x16/",
                b"",
            ),
            (r"send:a\,b\\c\td,expect:x\x2cy", b"a,b\\c\td", b"x,y"),
            ("send:héllo world", "héllo world".as_bytes(), b""),
        ] {
            assert_eq!(
                text.parse::<HealthCheck>().unwrap(),
                send_expect(send, expect),
                "{text}"
            );
        }
        assert_eq!(
            send_expect(b"PING\r\n", b"+PONG").to_string(),
            r"send:PING\r\n,expect:+PONG"
        );
        assert_eq!(send_expect(b"", b"220 ").to_string(), "expect:220 ");
        assert_eq!(
            send_expect(b"\0,\\\xff", b"").to_string(),
            r"send:\x00\,\\\xff"
        );
    }

    #[test]
    fn send_expect_rejects_nonsense() {
        let long = format!("send:{}", "a".repeat(MAX_PROBE_BYTES + 1));
        for bad in [
            "send:",
            "expect:",
            "send:,expect:x",
            "send:a,send:b",
            "send:a,expect:b,expect:c",
            "send:a,b",
            "send:a,",
            r"send:\q",
            r"send:\x4",
            r"send:\xzz",
            "send:a\\",
            "send:\\é",
            long.as_str(),
        ] {
            let err = bad.parse::<HealthCheck>().unwrap_err().to_string();
            assert!(
                err.starts_with("invalid health check '") && !err.contains('\n'),
                "{bad:?}: {err}"
            );
        }
        assert!(SendExpect::new(*b"", *b"").is_none());
        assert!(SendExpect::new(vec![b'a'; MAX_PROBE_BYTES + 1], *b"").is_none());
    }

    mod health_check_props {
        use super::super::*;
        use proptest::prelude::*;

        /// Every value `FromStr` can produce.
        fn any_check() -> impl Strategy<Value = HealthCheck> {
            let bytes = || prop::collection::vec(any::<u8>(), 0..64);
            let name = || "[^\0/]{1,20}";
            prop_oneof![
                Just(HealthCheck::None),
                Just(HealthCheck::Tcp),
                Just(HealthCheck::Redis),
                "/[^\\s]{0,30}".prop_map(|path| HealthCheck::WebSocket { path }),
                (bytes(), bytes()).prop_filter_map("both empty", |(send, expect)| {
                    SendExpect::new(send, expect).map(HealthCheck::SendExpect)
                }),
                (name(), prop::option::of("[^\0]{1,20}"))
                    .prop_map(|(user, database)| { HealthCheck::Postgres { user, database } }),
            ]
        }

        /// Strings made mostly of the syntax's own pieces, so the parser's corners are
        /// reached more often than by arbitrary text.
        fn syntaxy() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    Just("send:".to_string()),
                    Just("expect:".to_string()),
                    Just("postgres".to_string()),
                    Just("websocket:".to_string()),
                    Just(",".to_string()),
                    Just("\\".to_string()),
                    Just("x".to_string()),
                    Just("/".to_string()),
                    Just(":".to_string()),
                    "[0-9a-fA-F]",
                    "[rnt,\\\\]",
                    any::<char>().prop_map(String::from),
                ],
                0..16,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            #[test]
            fn display_parses_back_to_the_same_value(check in any_check()) {
                let shown = check.to_string();
                prop_assert_eq!(shown.parse::<HealthCheck>().ok(), Some(check), "{}", shown);
            }

            #[test]
            fn escape_then_unescape_is_identity(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                prop_assert_eq!(unescape(&escape(&bytes)), Ok(bytes));
            }

            #[test]
            fn unescape_then_escape_keeps_the_bytes(s in syntaxy()) {
                if let Ok(bytes) = unescape(&s) {
                    prop_assert_eq!(unescape(&escape(&bytes)), Ok(bytes));
                }
            }

            /// Never panics, and whatever parses prints as something that parses back to it.
            #[test]
            fn any_text_parses_or_is_rejected(s in prop_oneof![syntaxy(), any::<String>()]) {
                if let Ok(check) = s.parse::<HealthCheck>() {
                    let shown = check.to_string();
                    prop_assert_eq!(shown.parse::<HealthCheck>().ok(), Some(check), "{}", shown);
                }
            }
        }
    }

    #[test]
    fn duplicate_backends_are_rejected() {
        let b = BackendSpec::new("127.0.0.1:1".parse().unwrap());
        let c = Config::new(vec!["127.0.0.1:0".parse().unwrap()], vec![b.clone(), b]);
        assert!(c.validate().is_err());
    }
}
