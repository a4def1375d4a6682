//! A configuration file (`--config FILE`, TOML) read into flag-shaped entries.
//!
//! The file's keys are the flags' names with `_` for `-`, so this layer only checks the
//! file's shape and turns each key into the flag it names with its values as text; the
//! binary hands those to the same parsers the command line uses, so a key and its flag can
//! never mean different things. What is checked here, each error naming the line and key:
//!
//! - the TOML syntax (the `toml` crate's parser);
//! - the shape: scalars (string, integer, boolean), arrays of scalars (a repeatable flag), the
//!   `health` table (`health = { check = "tcp", interval = "2s", rise = 2, fall = 3 }`), and
//!   `[[service]]` tables each with a unique `name`; floats, dates, nested arrays and other
//!   tables are refused;
//! - which keys are global and which belong to a service ([`GLOBAL_KEYS`]).
//!
//! Which keys exist, and whether a value is acceptable, is the binary's question: it knows
//! the flags.

use std::fmt;

use toml::de::{DeTable, DeValue};

/// Keys that configure the process, not one service: they go at the top of the file.
/// Every other key belongs inside a `[[service]]`.
pub const GLOBAL_KEYS: &[&str] = &[
    "workers",
    "admin",
    "log_level",
    "log_format",
    "upgrade_socket",
    "upgrade_timeout",
    "pid_file",
    "max_conns",
    "pipe_memory",
];

/// The keys of the `health` table and the flags they stand for.
const HEALTH_KEYS: &[(&str, &str)] = &[
    ("check", "health-check"),
    ("interval", "health-interval"),
    ("timeout", "health-timeout"),
    ("rise", "rise"),
    ("fall", "fall"),
    ("observe_errors", "observe-errors"),
    ("slow_start", "slow-start"),
    ("slow_start_on_boot", "slow-start-on-boot"),
    ("send_proxy", "health-send-proxy"),
];

/// The most services one file may declare.
pub const MAX_SERVICES: usize = 64;

/// A file read into entries: global ones, and each service's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntries {
    pub global: Vec<Entry>,
    pub services: Vec<ServiceEntries>,
}

/// One `[[service]]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntries {
    pub name: String,
    /// Where its `[[service]]` header is (from 1).
    pub line: usize,
    pub entries: Vec<Entry>,
}

/// One key: the flag it names and its values as a flag would take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key as written (`health.interval` for a key of the `health` table).
    pub key: String,
    /// The flag's long name, without the dashes (`health-interval`).
    pub flag: String,
    pub value: EntryValue,
    /// Where the key is (from 1).
    pub line: usize,
}

/// A key's value, as flags take values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryValue {
    /// A switch (`--log-sessions`): given when true.
    Switch(bool),
    /// One value, or each value of an array (a repeatable flag given once per value).
    Values(Vec<String>),
}

/// Why a file was refused: where, which key, and why, on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// From 1.
    pub line: usize,
    /// The key, when the error is about one.
    pub key: Option<String>,
    pub why: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "line {}: {key}: {}", self.line, self.why),
            None => write!(f, "line {}: {}", self.line, self.why),
        }
    }
}

impl std::error::Error for FileError {}

/// Reads a configuration file's text into entries.
pub fn parse(text: &str) -> Result<FileEntries, FileError> {
    let lines = LineIndex::new(text);
    let root = DeTable::parse(text).map_err(|e| FileError {
        line: e.span().map_or(1, |s| lines.line(s.start)),
        key: None,
        why: e.message().trim().replace('\n', " "),
    })?;
    let mut global = Vec::new();
    let mut services = Vec::new();
    for (key, value) in root.get_ref() {
        let line = lines.line(key.span().start);
        let name = key.get_ref().as_ref();
        if name == "service" {
            services = read_services(value, line, &lines)?;
            continue;
        }
        if !GLOBAL_KEYS.contains(&name) {
            return Err(FileError {
                line,
                key: Some(name.to_string()),
                why: "not a global key: it goes inside a [[service]]".into(),
            });
        }
        global.push(entry(name, name, value, line, &lines)?);
    }
    if services.is_empty() {
        return Err(FileError {
            line: 1,
            key: None,
            why: "no [[service]]: a file declares at least one".into(),
        });
    }
    Ok(FileEntries { global, services })
}

fn read_services(
    value: &toml::Spanned<DeValue<'_>>,
    line: usize,
    lines: &LineIndex,
) -> Result<Vec<ServiceEntries>, FileError> {
    let bad = |why: &str| FileError {
        line,
        key: Some("service".into()),
        why: why.into(),
    };
    let DeValue::Array(tables) = value.get_ref() else {
        return Err(bad("expected [[service]] tables"));
    };
    if tables.len() > MAX_SERVICES {
        return Err(bad(&format!("at most {MAX_SERVICES} services")));
    }
    let mut services: Vec<ServiceEntries> = Vec::with_capacity(tables.len());
    for table in tables {
        let header = lines.line(table.span().start);
        let DeValue::Table(table) = table.get_ref() else {
            return Err(bad("expected [[service]] tables"));
        };
        let mut name = None;
        let mut entries = Vec::new();
        for (key, value) in table {
            let line = lines.line(key.span().start);
            let k = key.get_ref().as_ref();
            let at = |why: String| FileError {
                line,
                key: Some(k.to_string()),
                why,
            };
            if k == "name" {
                let DeValue::String(s) = value.get_ref() else {
                    return Err(at("expected a string".into()));
                };
                if !valid_name(s) {
                    return Err(at(format!(
                        "'{s}' is not a service name (1 to 64 of a-z, A-Z, 0-9, - and _)"
                    )));
                }
                if services.iter().any(|other| other.name == *s) {
                    return Err(at(format!("a service named '{s}' is declared twice")));
                }
                name = Some(s.to_string());
            } else if GLOBAL_KEYS.contains(&k) {
                return Err(at("a global key: it goes at the top of the file".into()));
            } else if k == "health" {
                entries.extend(health_entries(value, line, lines)?);
            } else {
                entries.push(entry(k, k, value, line, lines)?);
            }
        }
        let name = name.ok_or_else(|| FileError {
            line: header,
            key: Some("service".into()),
            why: "a service needs a name".into(),
        })?;
        services.push(ServiceEntries {
            name,
            line: header,
            entries,
        });
    }
    Ok(services)
}

fn health_entries(
    value: &toml::Spanned<DeValue<'_>>,
    line: usize,
    lines: &LineIndex,
) -> Result<Vec<Entry>, FileError> {
    let DeValue::Table(table) = value.get_ref() else {
        return Err(FileError {
            line,
            key: Some("health".into()),
            why: "expected a table, e.g. { check = \"tcp\", interval = \"2s\" }".into(),
        });
    };
    let mut entries = Vec::with_capacity(table.len());
    for (key, value) in table {
        let line = lines.line(key.span().start);
        let k = key.get_ref().as_ref();
        let full = format!("health.{k}");
        let Some(&(_, flag)) = HEALTH_KEYS.iter().find(|(name, _)| *name == k) else {
            let known: Vec<&str> = HEALTH_KEYS.iter().map(|(name, _)| *name).collect();
            return Err(FileError {
                line,
                key: Some(full),
                why: format!("unknown key (expected one of {})", known.join(", ")),
            });
        };
        entries.push(entry(&full, flag, value, line, lines)?);
    }
    Ok(entries)
}

/// `key = value` as the flag `flag` with its values.
fn entry(
    key: &str,
    flag: &str,
    value: &toml::Spanned<DeValue<'_>>,
    line: usize,
    lines: &LineIndex,
) -> Result<Entry, FileError> {
    let err = |line: usize, why: &str| FileError {
        line,
        key: Some(key.to_string()),
        why: why.into(),
    };
    let value = match value.get_ref() {
        DeValue::Boolean(b) => EntryValue::Switch(*b),
        DeValue::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                let at = lines.line(item.span().start);
                match scalar(item.get_ref()) {
                    Some(v) => values.push(v),
                    None => return Err(err(at, "expected an array of strings or integers")),
                }
            }
            EntryValue::Values(values)
        }
        other => match scalar(other) {
            Some(v) => EntryValue::Values(vec![v]),
            None => {
                return Err(err(
                    line,
                    "expected a string, an integer, a boolean or an array of them",
                ));
            }
        },
    };
    Ok(Entry {
        key: key.to_string(),
        flag: flag.replace('_', "-"),
        value,
        line,
    })
}

/// A string as it is; an integer in decimal (as written, in any radix TOML allows).
fn scalar(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(&i.as_str().replace('_', ""), i.radix())
            .ok()
            .map(|n| n.to_string()),
        _ => None,
    }
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Byte offsets to line numbers.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { starts }
    }

    /// The line (from 1) holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset).max(1)
    }
}

#[cfg(test)]
mod tests;
