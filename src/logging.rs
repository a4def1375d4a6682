//! The binary's logger: env_logger writing text (the default) or, with `--log-format json`,
//! one JSON object per line: `ts` (RFC 3339, milliseconds, UTC), `level`, `target`, `msg`,
//! and, for the per-session lines of `--log-sessions`, their `key=value` pairs again as
//! `fields` (strings, as in the text).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::OnceLock;

use clap::ValueEnum;
use serde::Serialize;

/// How log lines (and the binary's own `error:` line) are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `[ts LEVEL] message`, for people.
    #[default]
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the logger. `RUST_LOG`, if set, refines `level` as before.
pub fn init(level: log::LevelFilter, format: LogFormat) {
    let _ = FORMAT.set(format);
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).parse_default_env();
    match format {
        LogFormat::Text => {
            builder.format_target(false);
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let ts = buf.timestamp_millis().to_string();
                let msg = record.args().to_string();
                writeln!(
                    buf,
                    "{}",
                    json_line(&ts, record.level(), record.target(), &msg)
                )
            });
        }
    }
    builder.init();
}

/// The one-line `error: ...` the binary ends with, in the log format chosen (text before the
/// flags are read).
pub fn error_line(e: &dyn std::fmt::Display) -> String {
    match FORMAT.get() {
        Some(LogFormat::Json) => {
            let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            json_line(&ts, log::Level::Error, "holdfast", &format!("error: {e}"))
        }
        _ => format!("error: {e}"),
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: &'a str,
    level: &'a str,
    target: &'a str,
    msg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<BTreeMap<&'a str, &'a str>>,
}

fn json_line(ts: &str, level: log::Level, target: &str, msg: &str) -> String {
    let line = Line {
        ts,
        level: level.as_str(),
        target,
        msg,
        fields: fields(msg),
    };
    // Serializing strings into a String cannot fail; should it ever, the text still goes out.
    serde_json::to_string(&line).unwrap_or_else(|_| format!("{{\"msg\":{msg:?}}}"))
}

/// `word key=value key=value ...` (a session line) as its pairs; `None` for any other text.
fn fields(msg: &str) -> Option<BTreeMap<&str, &str>> {
    let mut words = msg.split(' ');
    words.next()?;
    let mut pairs = BTreeMap::new();
    for word in words {
        let (key, value) = word.split_once('=')?;
        if key.is_empty() {
            return None;
        }
        pairs.insert(key, value);
    }
    (!pairs.is_empty()).then_some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_line_keeps_its_text_and_gains_fields() {
        let line = json_line(
            "2026-01-01T00:00:00.000Z",
            log::Level::Info,
            "holdfast::session",
            "session client=127.0.0.1:5 duration=0.010s end=client-close",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v["msg"],
            "session client=127.0.0.1:5 duration=0.010s end=client-close"
        );
        assert_eq!(v["fields"]["client"], "127.0.0.1:5");
        assert_eq!(v["fields"]["end"], "client-close");
        assert_eq!(v["level"], "INFO");
    }

    #[test]
    fn other_lines_have_no_fields_and_quotes_are_escaped() {
        let line = json_line(
            "t",
            log::Level::Warn,
            "holdfast",
            "a \"quoted\" word\nand more",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["msg"], "a \"quoted\" word\nand more");
        assert!(v.get("fields").is_none());
        assert!(!line.contains('\n'));
    }
}
