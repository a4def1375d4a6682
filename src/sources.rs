//! Where the backend list comes from: `--backend` flags, a `--backends-file` (re-read on
//! reload), and `--backend-dns` names (re-resolved every `--dns-interval`).
//!
//! The list in force is the union of the three, in that order, the first entry for an address
//! winning. Whenever the file or a name's answer changes, the union is handed to
//! `Controller::set_backends`, which applies the difference: new backends join (with slow
//! start), removed ones drain and leave once empty, changed weights apply to new connections.
//! Listeners and live sessions are never touched by a reload.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::config::{self, BackendSpec, ConfigError, DnsName, Lookup, Resolver};

/// A source of backends gave no usable list. What it gave before stays in force.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A reload was asked for, but no `--backends-file` is configured.
    #[error("no --backends-file to reload")]
    NoFile,
    /// The backends file cannot be read: missing, not a regular file, larger than
    /// 16 MiB (`MAX_BACKENDS_FILE_BYTES`), or not UTF-8.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line of the backends file (numbered from 1) is not a backend, or repeats one.
    #[error("{}:{line}: {why}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        #[source]
        why: ConfigError,
    },
    /// A `--backend-dns` name could not be resolved.
    #[error("cannot resolve {name}: {source}")]
    Resolve {
        name: DnsName,
        #[source]
        source: io::Error,
    },
    /// A `--backend-dns` name resolved to nothing: a failed lookup, not an empty pool.
    #[error("{name} resolves to no address")]
    NoAddress { name: DnsName },
}

/// The largest backends file holdfast reads: 16 MiB (over half a million lines). A larger
/// one is refused like an invalid one.
pub const MAX_BACKENDS_FILE_BYTES: u64 = 16 << 20;

/// Reads a backends file: one `HOST:PORT[,weight=N]` per line; blank lines and everything
/// after a `#` are ignored. The error names the file and line. Only a regular file of at most
/// [`MAX_BACKENDS_FILE_BYTES`] is read, and opening it never blocks (a FIFO would wait for a
/// writer; a device such as `/dev/zero` would be read without end).
pub fn read_backends_file(path: &Path) -> Result<Vec<BackendSpec>, SourceError> {
    let text =
        read_regular_file(path, MAX_BACKENDS_FILE_BYTES).map_err(|source| SourceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    parse_backends(&text, &config::system_lookup).map_err(|(line, why)| SourceError::Line {
        path: path.to_path_buf(),
        line,
        why,
    })
}

/// The text of the regular file at `path`, if it holds at most `cap` bytes.
fn read_regular_file(path: &Path, cap: u64) -> io::Result<String> {
    let mut options = OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading waits for a writer, unless non-blocking: then it returns at
    // once, and the file type check below refuses it. A regular file ignores the flag.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", file_kind(&meta)),
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} MiB", cap >> 20),
        )
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    // The length can change between fstat and read: never read more than the cap anyway.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// What a file that is not a regular file is, for the error message.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    if meta.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a file"
}

/// Parses the text of a backends file, with `lookup` asked for the address of each host name
/// (see [`BackendSpec::parse_with`]): a pure function when `lookup` is one. The error is the
/// line number (from 1) and why: [`ConfigError::Backend`] or
/// [`ConfigError::DuplicateBackend`].
pub fn parse_backends(
    text: &str,
    lookup: &Lookup,
) -> Result<Vec<BackendSpec>, (usize, ConfigError)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut specs: Vec<BackendSpec> = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let spec = BackendSpec::parse_with(entry, lookup).map_err(|e| (i + 1, e))?;
        if !seen.insert(spec.addr) {
            return Err((i + 1, ConfigError::DuplicateBackend(spec.addr)));
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
    ) -> Result<Sources, SourceError> {
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

    fn resolve(&self, i: usize) -> Result<Vec<BackendSpec>, SourceError> {
        let name = &self.dns[i];
        let mut addrs = self
            .resolver
            .resolve(&name.host, name.port)
            .map_err(|source| SourceError::Resolve {
                name: name.clone(),
                source,
            })?;
        // An empty answer is a failed lookup, not a request to remove every backend the name
        // gave: it keeps the last answer, as an error does.
        if addrs.is_empty() {
            return Err(SourceError::NoAddress { name: name.clone() });
        }
        // A stable order, so an unchanged answer in another order is no change.
        addrs.sort();
        addrs.dedup();
        Ok(addrs.into_iter().map(BackendSpec::new).collect())
    }

    /// Re-reads the backends file and says whether it changed. On error nothing changes.
    pub fn reload_file(&mut self) -> Result<bool, SourceError> {
        let Some(path) = &self.file else {
            return Err(SourceError::NoFile);
        };
        let specs = read_backends_file(path)?;
        let changed = specs != self.file_specs;
        self.file_specs = specs;
        Ok(changed)
    }

    /// Re-resolves every name; a name that fails to resolve keeps its last answer. Returns
    /// whether any answer changed, and the errors.
    pub fn refresh_dns(&mut self) -> (bool, Vec<SourceError>) {
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
        let all = self
            .fixed
            .iter()
            .chain(&self.file_specs)
            .chain(self.dns_specs.iter().flatten());
        let mut seen = HashSet::new();
        all.filter(|spec| seen.insert(spec.addr)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;

    fn no_names(host: &str, _port: u16) -> Result<SocketAddr, String> {
        Err(format!("'{host}' is not looked up in this test"))
    }

    #[test]
    fn file_format_comments_and_errors() {
        let specs = parse_backends(
            "# pool A\n127.0.0.1:80\n\n  127.0.0.2:80,weight=3  # heavy\n",
            &no_names,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].weight, 3);
        let (line, why) = parse_backends("127.0.0.1:80\n# ok\nbogus\n", &no_names).unwrap_err();
        assert_eq!(line, 3);
        assert!(
            matches!(&why, ConfigError::Backend { value, .. } if value == "bogus"),
            "{why}"
        );
        let (line, why) = parse_backends("127.0.0.1:80\n127.0.0.1:80\n", &no_names).unwrap_err();
        assert_eq!(line, 2);
        assert_eq!(why.to_string(), "backend 127.0.0.1:80 is listed twice");
        let twice = ConfigError::DuplicateBackend("127.0.0.1:80".parse().unwrap());
        assert_eq!(why, twice);
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
        let (changed, errors) = sources.refresh_dns();
        assert!(!changed && errors.is_empty(), "{errors:?}");
        answers.lock().unwrap().pop();
        let (changed, errors) = sources.refresh_dns();
        assert!(changed && errors.is_empty(), "{errors:?}");
        assert_eq!(sources.backends().len(), 1);
        answers.lock().unwrap().clear();
        let (changed, errors) = sources.refresh_dns();
        assert!(
            !changed && matches!(errors[..], [SourceError::NoAddress { .. }]),
            "an empty answer keeps the last one: {errors:?}"
        );
        assert_eq!(sources.backends().len(), 1);
    }
}

/// Properties of the backends file parser, over generated input.
#[cfg(test)]
mod properties {
    use std::net::{IpAddr, SocketAddr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;
    use crate::config::MAX_WEIGHT;
    use crate::fuzzing::stand_in_lookup;

    fn parse(text: &str) -> Result<Vec<BackendSpec>, (usize, ConfigError)> {
        parse_backends(text, &stand_in_lookup)
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1u16..)
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            // Display shows the scope id but not the flow label, so the flow label is 0.
            (any::<[u8; 16]>(), 1u16.., any::<u32>()).prop_map(|(ip, port, scope)| {
                SocketAddr::V6(SocketAddrV6::new(ip.into(), port, 0, scope))
            }),
        ]
    }

    fn spec() -> impl Strategy<Value = BackendSpec> {
        (addr(), 1..=MAX_WEIGHT).prop_map(|(addr, weight)| BackendSpec { addr, weight })
    }

    /// Backends with distinct addresses.
    fn specs() -> impl Strategy<Value = Vec<BackendSpec>> {
        proptest::collection::vec(spec(), 0..30).prop_map(|specs| {
            let mut seen = HashSet::new();
            specs.into_iter().filter(|s| seen.insert(s.addr)).collect()
        })
    }

    /// How one backend's line may be dressed: blanks around it, a trailing comment, and
    /// blank or comment lines before it.
    #[derive(Clone, Debug)]
    struct Dress {
        before: Vec<String>,
        lead: String,
        trail: String,
        comment: Option<String>,
    }

    fn dress() -> impl Strategy<Value = Dress> {
        let filler = prop_oneof![Just(String::new()), "[ \t]{1,3}", "[ \t]*#[^\r\n]{0,20}"];
        (
            proptest::collection::vec(filler, 0..3),
            "[ \t]{0,3}",
            "[ \t]{0,3}",
            proptest::option::of("[^\r\n]{0,20}"),
        )
            .prop_map(|(before, lead, trail, comment)| Dress {
                before,
                lead,
                trail,
                comment,
            })
    }

    /// The file for `specs`, each line dressed by the matching `dress` (plain without one).
    fn render(specs: &[BackendSpec], dress: &[Dress]) -> String {
        let mut text = String::new();
        for (i, spec) in specs.iter().enumerate() {
            match dress.get(i) {
                Some(d) => {
                    for line in &d.before {
                        text.push_str(line);
                        text.push('\n');
                    }
                    text.push_str(&format!("{}{spec}{}", d.lead, d.trail));
                    if let Some(comment) = &d.comment {
                        text.push_str(&format!("#{comment}"));
                    }
                }
                None => text.push_str(&spec.to_string()),
            }
            text.push('\n');
        }
        text
    }

    /// Text that looks like a backends file: the characters of addresses, weights and
    /// comments, in lines.
    fn file_like() -> impl Strategy<Value = String> {
        "[0-9a-f.:\\[\\]%,=#weight \t\r\n-]{0,300}"
    }

    proptest! {
        #[test]
        fn any_text_parses_or_names_a_line_of_it(text in any::<String>()) {
            if let Err((line, _)) = parse(&text) {
                prop_assert!((1..=text.lines().count()).contains(&line), "line {line}");
            }
        }

        #[test]
        fn file_like_text_parses_or_names_a_line_of_it(text in file_like()) {
            match parse(&text) {
                Ok(specs) => {
                    let mut seen = HashSet::new();
                    for s in &specs {
                        prop_assert!(s.addr.port() != 0 && (1..=MAX_WEIGHT).contains(&s.weight));
                        prop_assert!(seen.insert(s.addr), "{} twice", s.addr);
                    }
                }
                Err((line, _)) => {
                    prop_assert!((1..=text.lines().count()).contains(&line), "line {line}");
                }
            }
        }

        #[test]
        fn a_backend_round_trips_through_display(spec in spec()) {
            let text = spec.to_string();
            let back = BackendSpec::parse_with(&text, &stand_in_lookup);
            prop_assert_eq!(back.ok(), Some(spec), "{}", text);
        }

        #[test]
        fn a_file_of_valid_lines_parses_back_whatever_its_comments_and_blanks(
            specs in specs(),
            dress in proptest::collection::vec(dress(), 0..30),
        ) {
            let plain = render(&specs, &[]);
            let dressed = render(&specs, &dress);
            prop_assert_eq!(parse(&plain), Ok(specs.clone()));
            prop_assert_eq!(parse(&dressed), Ok(specs), "{:?}", dressed);
        }

        #[test]
        fn crlf_line_ends_parse_the_same(
            text in prop_oneof![file_like(), (specs(), proptest::collection::vec(dress(), 0..30))
                .prop_map(|(s, d)| render(&s, &d))],
        ) {
            prop_assert_eq!(parse(&text.replace('\n', "\r\n")), parse(&text));
        }

        #[test]
        fn a_backend_listed_again_is_an_error_on_that_line(
            specs in specs().prop_filter("some backends", |s| !s.is_empty()),
            pick in any::<prop::sample::Index>(),
            weight in 1..=MAX_WEIGHT,
        ) {
            let again = BackendSpec { weight, ..pick.get(&specs).clone() };
            let text = format!("{}{again}\n", render(&specs, &[]));
            let (line, why) = parse(&text).unwrap_err();
            prop_assert_eq!(line, specs.len() + 1);
            prop_assert_eq!(why, ConfigError::DuplicateBackend(again.addr));
        }
    }
}
