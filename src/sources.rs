//! Where the backend list comes from: `--backend` flags, a `--backends-file` (re-read on
//! reload), and `--backend-dns` names (re-resolved every `--dns-interval`).
//!
//! The list in force is the union of the three, in that order, the first entry for an address
//! winning. Whenever the file or a name's answer changes, the union is handed to
//! `Controller::set_backends`, which applies the difference: new backends join (with slow
//! start), removed ones drain and leave once empty, changed weights apply to new connections.
//! Listeners and live sessions are never touched by a reload.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::BackendSpec;

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

impl std::str::FromStr for DnsName {
    type Err = String;
    fn from_str(s: &str) -> Result<DnsName, String> {
        let (host, port) = s.rsplit_once(':').ok_or("expected NAME:PORT")?;
        if host.is_empty() {
            return Err("missing name".into());
        }
        let port = port
            .parse()
            .map_err(|_| "port must be 1-65535".to_string())?;
        if port == 0 {
            return Err("port 0 cannot be connected to (expected 1-65535)".into());
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

/// Reads a backends file: one `HOST:PORT[,weight=N]` per line; blank lines and everything
/// after a `#` are ignored. The error names the file and line.
pub fn read_backends_file(path: &Path) -> Result<Vec<BackendSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_backends(&text).map_err(|(line, why)| format!("{}:{line}: {why}", path.display()))
}

fn parse_backends(text: &str) -> Result<Vec<BackendSpec>, (usize, String)> {
    let mut specs: Vec<BackendSpec> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let spec: BackendSpec = entry.parse().map_err(|e| (i + 1, format!("{e}")))?;
        if specs.iter().any(|s| s.addr == spec.addr) {
            return Err((i + 1, format!("backend {} is listed twice", spec.addr)));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// The three sources and what each last gave.
#[derive(Debug)]
pub struct Sources {
    pub fixed: Vec<BackendSpec>,
    pub file: Option<PathBuf>,
    pub file_specs: Vec<BackendSpec>,
    pub dns: Vec<DnsName>,
    /// The last good answer for each name (same order as `dns`).
    pub dns_specs: Vec<Vec<BackendSpec>>,
    pub resolver: Resolver,
}

impl Sources {
    /// Reads the file and resolves the names once, at start. Any failure here stops the start:
    /// a balancer should not come up with half its backends.
    pub fn load(
        fixed: Vec<BackendSpec>,
        file: Option<PathBuf>,
        dns: Vec<DnsName>,
        resolver: Resolver,
    ) -> Result<Sources, String> {
        let file_specs = match &file {
            Some(path) => read_backends_file(path)?,
            None => Vec::new(),
        };
        let mut sources = Sources {
            fixed,
            file,
            file_specs,
            dns_specs: vec![Vec::new(); dns.len()],
            dns,
            resolver,
        };
        for i in 0..sources.dns.len() {
            sources.dns_specs[i] = sources.resolve(i)?;
        }
        Ok(sources)
    }

    fn resolve(&self, i: usize) -> Result<Vec<BackendSpec>, String> {
        let name = &self.dns[i];
        let mut addrs = self
            .resolver
            .resolve(&name.host, name.port)
            .map_err(|e| format!("cannot resolve {name}: {e}"))?;
        // An empty answer is a failed lookup, not a request to remove every backend the name
        // gave: it keeps the last answer, as an error does.
        if addrs.is_empty() {
            return Err(format!("{name} resolves to no address"));
        }
        // A stable order, so an unchanged answer in another order is no change.
        addrs.sort();
        addrs.dedup();
        Ok(addrs.into_iter().map(BackendSpec::new).collect())
    }

    /// Re-reads the backends file. On error nothing changes.
    pub fn reload_file(&mut self) -> Result<bool, String> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let specs = read_backends_file(path)?;
        let changed = specs != self.file_specs;
        self.file_specs = specs;
        Ok(changed)
    }

    /// Re-resolves every name; a name that fails to resolve keeps its last answer. Returns
    /// whether any answer changed, and the errors.
    pub fn refresh_dns(&mut self) -> (bool, Vec<String>) {
        let mut changed = false;
        let mut errors = Vec::new();
        for i in 0..self.dns.len() {
            match self.resolve(i) {
                Ok(specs) if specs != self.dns_specs[i] => {
                    self.dns_specs[i] = specs;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        (changed, errors)
    }

    /// The union in force: flags, then the file, then the names; the first entry for an
    /// address wins.
    pub fn backends(&self) -> Vec<BackendSpec> {
        let mut out: Vec<BackendSpec> = Vec::new();
        let all = self
            .fixed
            .iter()
            .chain(&self.file_specs)
            .chain(self.dns_specs.iter().flatten());
        for spec in all {
            if !out.iter().any(|s| s.addr == spec.addr) {
                out.push(spec.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_comments_and_errors() {
        let specs =
            parse_backends("# pool A\n127.0.0.1:80\n\n  127.0.0.2:80,weight=3  # heavy\n").unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].weight, 3);
        let (line, why) = parse_backends("127.0.0.1:80\n# ok\nbogus\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(why.contains("bogus"), "{why}");
        let (line, why) = parse_backends("127.0.0.1:80\n127.0.0.1:80\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("twice"), "{why}");
    }

    #[test]
    fn union_prefers_the_first_source() {
        let a: BackendSpec = "127.0.0.1:1".parse().unwrap();
        let mut sources = Sources::load(vec![a.clone()], None, vec![], Resolver::system()).unwrap();
        sources.file_specs = vec![
            "127.0.0.1:1,weight=9".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let all = sources.backends();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], a, "the flag's weight wins");
    }

    #[test]
    fn dns_answers_are_compared_in_a_stable_order() {
        let answers = Arc::new(std::sync::Mutex::new(vec![
            "127.0.0.2:80".parse::<SocketAddr>().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        ]));
        let given = Arc::clone(&answers);
        let resolver = Resolver::new(move |_, _| Ok(given.lock().unwrap().clone()));
        let name: DnsName = "pool.test:80".parse().unwrap();
        let mut sources = Sources::load(vec![], None, vec![name], resolver).unwrap();
        assert_eq!(sources.backends().len(), 2);
        answers.lock().unwrap().reverse();
        assert_eq!(sources.refresh_dns(), (false, vec![]));
        answers.lock().unwrap().pop();
        assert_eq!(sources.refresh_dns(), (true, vec![]));
        assert_eq!(sources.backends().len(), 1);
        answers.lock().unwrap().clear();
        let (changed, errors) = sources.refresh_dns();
        assert!(
            !changed && errors.len() == 1,
            "an empty answer keeps the last one"
        );
        assert_eq!(sources.backends().len(), 1);
    }
}
