//! A backend as the user writes it: `HOST:PORT[,weight=N]` ([`BackendSpec`]), a
//! `--backend-dns NAME:PORT` ([`DnsName`]), and how host names become addresses ([`Lookup`]
//! for a name given once, [`Resolver`] for a name followed over time).

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;

use super::ConfigError;

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
pub(crate) type Lookup = dyn Fn(&str, u16) -> Result<SocketAddr, String>;

impl BackendSpec {
    /// `HOST:PORT[,weight=N]`, with `lookup` asked for the address of a host name (an IP
    /// address is never looked up). With a pure `lookup` this is a pure function.
    pub(crate) fn parse_with(s: &str, lookup: &Lookup) -> Result<BackendSpec, ConfigError> {
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

/// Resolves `HOST:PORT` (or `[v6]:PORT`), a listen or admin address, to one socket address:
/// an IP address as it is, a host name to the first address the system resolver gives.
pub fn resolve_addr(s: &str) -> Result<SocketAddr, ConfigError> {
    resolve_with(s, &system_lookup).map_err(|why| ConfigError::Address {
        value: s.to_string(),
        why,
    })
}

/// `HOST:PORT` (or `[v6]:PORT`) to one socket address, with `lookup` asked for the address of
/// a host name.
fn resolve_with(s: &str, lookup: &Lookup) -> Result<SocketAddr, String> {
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
pub(crate) fn system_lookup(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{host}': {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("'{host}' resolves to no address"))
}

/// Resolves a host name to addresses. The system resolver (`getaddrinfo`, which reads
/// `/etc/hosts` and then DNS) unless a test supplies its own.
#[derive(Clone)]
pub struct Resolver(Arc<ResolveFn>);

type ResolveFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

impl Resolver {
    pub fn system() -> Resolver {
        Resolver(Arc::new(|host, port| {
            Ok((host, port).to_socket_addrs()?.collect())
        }))
    }

    /// A resolver of your own, for tests or service discovery.
    pub fn new(
        f: impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Resolver {
        Resolver(Arc::new(f))
    }

    pub fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        (self.0)(host, port)
    }
}

impl Default for Resolver {
    fn default() -> Resolver {
        Resolver::system()
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

/// A `--backend-dns NAME:PORT`: every address NAME resolves to is a backend (weight 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsName {
    pub host: String,
    pub port: u16,
}

impl FromStr for DnsName {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<DnsName, ConfigError> {
        let bad = |why| ConfigError::DnsName {
            value: s.to_string(),
            why,
        };
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected NAME:PORT"))?;
        if host.is_empty() {
            return Err(bad("missing name"));
        }
        let port: u16 = port.parse().map_err(|_| bad("port must be 1-65535"))?;
        if port == 0 {
            return Err(bad("port 0 cannot be connected to (expected 1-65535)"));
        }
        Ok(DnsName {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
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
    fn localhost_resolves() {
        let b: BackendSpec = "localhost:9,weight=2".parse().unwrap();
        assert!(b.addr.ip().is_loopback());
        assert_eq!(b.addr.port(), 9);
    }
}
