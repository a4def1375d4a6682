//! `--config FILE`: a TOML file whose keys are the flags' names, read with the flags' own
//! parsers.
//!
//! The library's `holdfast::config_file` checks the file's shape and gives each key as the
//! flag it names, with its line. Here each service becomes the command line it stands for
//! (the global keys, then the service's), which clap parses exactly as it parses a real one,
//! and [`Args::into_config`] turns into a [`Config`]. So a key and its flag cannot drift
//! apart: a flag added later has its key at once. What clap or the configuration refuses is
//! reported against the key that gave it, with the file and line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches};

use holdfast::Config;
use holdfast::config_file::{self as file, Entry, EntryValue};

use crate::cli::Args;
use crate::logging::LogFormat;

/// The largest file read (a config of a few hundred services fits in far less).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Flags a file cannot set: how the process was started, not what it runs.
const COMMAND_LINE_ONLY: &[&str] = &["config", "take-over", "check", "help", "version"];

/// Keys read as another flag's name: `backends = [...]` reads as the repeatable `--backend`.
const ALIASES: &[(&str, &str)] = &[("backends", "backend")];

/// The flag an entry gives: its own name, or the flag its key is an alias of.
fn flag_of(e: &Entry) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == e.flag)
        .map_or(e.flag.as_str(), |(_, flag)| flag)
}

/// One service of a file, ready to run.
pub struct Service {
    pub name: String,
    pub config: Config,
}

/// A file's services and the process-wide settings that are not part of a [`Config`].
pub struct Loaded {
    pub services: Vec<Service>,
    pub pid_file: Option<PathBuf>,
    pub log_level: log::LevelFilter,
    pub log_format: LogFormat,
}

/// Reads and checks `path`; an error is one line naming the file, and the line and key
/// where there is one.
pub fn load(path: &Path) -> Result<Loaded, String> {
    let shown = path.display();
    let text = read(path).map_err(|e| format!("{shown}: {e}"))?;
    let entries = file::parse(&text).map_err(|e| format!("{shown}: {e}"))?;
    let flags = known_flags();
    let global = to_args(&entries.global, &flags).map_err(|e| format!("{shown}: {e}"))?;
    let mut services = Vec::with_capacity(entries.services.len());
    let mut pid_file = None;
    let mut log_level = log::LevelFilter::Info;
    let mut log_format = LogFormat::Text;
    let mut listening: HashMap<SocketAddr, String> = HashMap::new();
    for service in &entries.services {
        let at = |e: String| format!("{shown}: service '{}': {e}", service.name);
        let own = to_args(&service.entries, &flags).map_err(at)?;
        let mut argv = vec!["holdfast".to_string()];
        argv.extend(global.iter().cloned());
        argv.extend(own);
        let both: Vec<&Entry> = entries.global.iter().chain(&service.entries).collect();
        let args = parse_args(&argv).map_err(|e| at(locate(&e, &both, service.line)))?;
        for addr in &args.listen {
            let listen = service.entries.iter().find(|e| e.flag == "listen");
            let line = listen.map_or(service.line, |e| e.line);
            if addr.port() == 0 {
                return Err(at(format!(
                    "line {line}: listen: {addr}: port 0 is for tests; a file names its ports"
                )));
            }
            if let Some(other) = listening.insert(*addr, service.name.clone())
                && other != service.name
            {
                return Err(at(format!(
                    "line {line}: listen: {addr} is also service '{other}''s"
                )));
            }
        }
        pid_file = args.pid_file.clone();
        log_level = args.log_level;
        log_format = args.log_format;
        let config = args
            .into_config()
            .map_err(|e| at(locate(&e.to_string(), &both, service.line)))?;
        services.push(Service {
            name: service.name.clone(),
            config,
        });
    }
    Ok(Loaded {
        services,
        pid_file,
        log_level,
        log_format,
    })
}

fn read(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())
}

/// What each long flag takes: a switch, one value, or one per use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takes {
    Switch,
    One,
    Many,
}

fn known_flags() -> HashMap<String, Takes> {
    Args::command()
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let takes = match arg.get_action() {
                ArgAction::SetTrue | ArgAction::SetFalse => Takes::Switch,
                ArgAction::Append => Takes::Many,
                _ => Takes::One,
            };
            Some((long.to_string(), takes))
        })
        .filter(|(long, _)| !COMMAND_LINE_ONLY.contains(&long.as_str()))
        .collect()
}

/// Entries as command-line arguments (`--flag=value`, so a value may start with `-`).
fn to_args(entries: &[Entry], flags: &HashMap<String, Takes>) -> Result<Vec<String>, String> {
    let mut argv = Vec::new();
    for e in entries {
        let flag = flag_of(e);
        let at = |why: &str| format!("line {}: {}: {why}", e.line, e.key);
        let Some(&takes) = flags.get(flag) else {
            return Err(at("unknown key"));
        };
        match (&e.value, takes) {
            (EntryValue::Switch(on), Takes::Switch) => {
                if *on {
                    argv.push(format!("--{flag}"));
                }
            }
            (EntryValue::Switch(_), _) => return Err(at("expected a value, not true or false")),
            (EntryValue::Values(_), Takes::Switch) => return Err(at("expected true or false")),
            (EntryValue::Values(v), Takes::One) if v.len() != 1 => {
                return Err(at("takes one value, not an array"));
            }
            (EntryValue::Values(values), _) => {
                for value in values {
                    argv.push(format!("--{flag}={}", backend_options(flag, value)));
                }
            }
        }
    }
    Ok(argv)
}

/// `"10.0.0.2:8080 weight=2"` (as a file would write it) as `10.0.0.2:8080,weight=2`.
fn backend_options(flag: &str, value: &str) -> String {
    if flag == "backend" && !value.contains(',') {
        value.split_whitespace().collect::<Vec<_>>().join(",")
    } else {
        value.to_string()
    }
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let matches = Args::command()
        .try_get_matches_from(argv)
        .map_err(|e| first_line(&e.to_string()))?;
    Args::from_arg_matches(&matches).map_err(|e| first_line(&e.to_string()))
}

fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Puts the line and key of the entry `message` is about in front of it: the first `--flag`
/// the message names that an entry gave, else the service's header line.
fn locate(message: &str, entries: &[&Entry], header: usize) -> String {
    let named = message
        .split("--")
        .skip(1)
        .filter_map(|rest| {
            let flag: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            entries.iter().find(|e| flag_of(e) == flag)
        })
        .next();
    // No flag named: the entry a value of which the message quotes (a backend listed twice).
    let named = named.or_else(|| {
        entries.iter().rev().find(|e| match &e.value {
            EntryValue::Values(values) => values.iter().any(|v| {
                let value = v.split([',', ' ']).next().unwrap_or_default();
                !value.is_empty() && message.contains(value)
            }),
            EntryValue::Switch(_) => false,
        })
    });
    // A file has keys, not flags: say the key.
    match named {
        Some(e) => format!("line {}: {}: {message}", e.line, e.key),
        None => format!("line {header}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Loaded, String> {
        let dir = std::env::temp_dir().join(format!("holdfast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join(format!("{:x}.toml", text.len() ^ text.as_ptr() as usize));
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let loaded = load(&path);
        let _ = std::fs::remove_file(&path);
        loaded.map_err(|e| e.replace(&path.display().to_string(), "FILE"))
    }

    #[test]
    fn a_service_reads_as_its_flags_would() {
        let loaded = load_text(
            r#"
workers = 3
pid_file = "/run/holdfast.pid"

[[service]]
name = "ws"
listen = ["127.0.0.1:4430"]
algorithm = "source-hash"
backends = ["127.0.0.1:8080", "127.0.0.1:8081 weight=2"]
health = { check = "websocket:/healthz", interval = "3s", rise = 4 }
idle_timeout = "2m"
log_sessions = true
"#,
        )
        .unwrap();
        assert_eq!(loaded.services.len(), 1);
        assert_eq!(
            loaded.pid_file.as_deref(),
            Some(Path::new("/run/holdfast.pid"))
        );
        let s = &loaded.services[0];
        assert_eq!(s.name, "ws");
        let c = &s.config;
        assert_eq!(c.workers, 3);
        assert_eq!(c.listen, vec!["127.0.0.1:4430".parse().unwrap()]);
        assert_eq!(c.algorithm.to_string(), "source-hash");
        let weights: Vec<u32> = c.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, vec![1, 2]);
        assert_eq!(c.health.check.to_string(), "websocket:/healthz");
        assert_eq!(c.health.interval, std::time::Duration::from_secs(3));
        assert_eq!(c.health.rise, 4);
        assert_eq!(c.health.fall, 3, "the default fills in");
        assert_eq!(c.idle_timeout, Some(std::time::Duration::from_secs(120)));
        assert!(c.log_sessions);
    }

    /// What clap or the configuration refuses is reported at the key that gave it.
    #[test]
    fn refusals_name_the_file_line_and_key() {
        let head = "[[service]]\nname = \"ws\"\nlisten = \"127.0.0.1:4430\"\nbackend = \"127.0.0.1:8080\"\n";
        let cases: &[(&str, &str)] = &[
            (
                "idle_timeout = \"soon\"\n",
                "FILE: service 'ws': line 5: idle_timeout: invalid value 'soon'",
            ),
            (
                "colour = \"blue\"\n",
                "FILE: service 'ws': line 5: colour: unknown key",
            ),
            (
                "log_sessions = \"yes\"\n",
                "line 5: log_sessions: expected true or false",
            ),
            ("retries = true\n", "line 5: retries: expected a value"),
            (
                "algorithm = [\"a\", \"b\"]\n",
                "line 5: algorithm: takes one value",
            ),
            ("take_over = \"/x\"\n", "line 5: take_over: unknown key"),
            (
                "backends = [\"127.0.0.1:8080\"]\n",
                "line 5: backends: backend 127.0.0.1:8080 is listed twice",
            ),
            (
                "health = { interval = \"0s\" }\n",
                "line 5: health.interval: --health-interval and --health-timeout must be greater than 0",
            ),
        ];
        for (extra, want) in cases {
            let e = load_text(&format!("{head}{extra}"))
                .err()
                .unwrap_or_default();
            assert!(e.contains(want), "{extra:?}: got {e:?}, want {want:?}");
            assert!(!e.contains('\n'), "not one line: {e}");
        }
    }

    #[test]
    fn listen_addresses_are_checked_across_services() {
        let two = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:4430\"\nbackend = \"127.0.0.1:8080\"\n\
                   [[service]]\nname = \"b\"\nlisten = \"127.0.0.1:4430\"\nbackend = \"127.0.0.1:8081\"\n";
        let e = load_text(two).err().unwrap_or_default();
        assert!(
            e.contains("service 'b': line 7: listen: 127.0.0.1:4430 is also service 'a''s"),
            "{e}"
        );
        let zero =
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:8080\"\n";
        let e = load_text(zero).err().unwrap_or_default();
        assert!(e.contains("line 3: listen: 127.0.0.1:0: port 0"), "{e}");
    }

    #[test]
    fn a_missing_or_unreadable_file_is_one_line() {
        let e = load(Path::new("/nonexistent/holdfast.toml"))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("/nonexistent/holdfast.toml: "), "{e}");
        let e = load(Path::new("/")).err().unwrap_or_default();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
