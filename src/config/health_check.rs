//! How backends are probed: the `--health-check` value ([`HealthCheck`]), parsed and printed
//! back, and the escapes of its `send:`/`expect:` bytes.

use std::fmt;
use std::str::FromStr;

use super::ConfigError;

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
/// non-empty (an empty one was omitted), each at most 4096 bytes (`MAX_PROBE_BYTES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendExpect {
    send: Vec<u8>,
    expect: Vec<u8>,
}

impl SendExpect {
    /// `None` if both are empty or either is longer than 4096 bytes.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
