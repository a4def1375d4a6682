use proptest::prelude::*;

use super::*;

fn values(v: &[&str]) -> EntryValue {
    EntryValue::Values(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn reads_global_keys_services_and_the_health_table() {
    let text = r#"
workers = 2
admin = "127.0.0.1:9000"

[[service]]
name = "ws"
listen = ["0.0.0.0:443", "[::]:443"]
algorithm = "least-conn"
backends = ["10.0.0.1:8080", "10.0.0.2:8080,weight=2"]
health = { check = "websocket:/healthz", interval = "2s", rise = 2, fall = 3 }
idle_timeout = "2m"
log_sessions = true

[[service]]
name = "redis"
listen = "127.0.0.1:6379"
backend = ["10.0.1.1:6379"]
max_conns_per_backend = 0x10
"#;
    let file = parse(text).unwrap();
    assert_eq!(
        file.global,
        vec![
            Entry {
                key: "admin".into(),
                flag: "admin".into(),
                value: values(&["127.0.0.1:9000"]),
                line: 3
            },
            Entry {
                key: "workers".into(),
                flag: "workers".into(),
                value: values(&["2"]),
                line: 2
            },
        ]
    );
    assert_eq!(file.services.len(), 2);
    let ws = &file.services[0];
    assert_eq!((ws.name.as_str(), ws.line), ("ws", 5));
    let find = |s: &ServiceEntries, key: &str| {
        s.entries
            .iter()
            .find(|e| e.key == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {s:?}"))
    };
    assert_eq!(
        find(ws, "listen").value,
        values(&["0.0.0.0:443", "[::]:443"])
    );
    let interval = find(ws, "health.interval");
    assert_eq!(
        (interval.flag.as_str(), interval.line),
        ("health-interval", 10)
    );
    assert_eq!(find(ws, "health.rise").flag, "rise");
    assert_eq!(find(ws, "idle_timeout").flag, "idle-timeout");
    assert_eq!(find(ws, "log_sessions").value, EntryValue::Switch(true));
    let redis = &file.services[1];
    assert_eq!(find(redis, "listen").value, values(&["127.0.0.1:6379"]));
    assert_eq!(find(redis, "max_conns_per_backend").value, values(&["16"]));
}

/// Each refusal names the line and, where there is one, the key.
#[test]
fn errors_name_the_line_and_the_key() {
    let cases: &[(&str, usize, Option<&str>, &str)] = &[
        ("workers = \n", 1, None, "string values must be quoted"),
        (
            "workers = 1\nlisten = \"1.2.3.4:5\"\n",
            2,
            Some("listen"),
            "goes inside a [[service]]",
        ),
        (
            "[[service]]\nname = \"a\"\nworkers = 2\n",
            3,
            Some("workers"),
            "goes at the top",
        ),
        ("workers = 2\n", 1, None, "no [[service]]"),
        (
            "[[service]]\nname = \"a\"\n\n[[service]]\nname = \"a\"\n",
            5,
            Some("name"),
            "declared twice",
        ),
        (
            "[[service]]\nlisten = \"1.2.3.4:5\"\n",
            1,
            Some("service"),
            "needs a name",
        ),
        (
            "[[service]]\nname = \"a b\"\n",
            2,
            Some("name"),
            "not a service name",
        ),
        (
            "[[service]]\nname = \"a\"\nidle_timeout = 1.5\n",
            3,
            Some("idle_timeout"),
            "expected a string",
        ),
        (
            "[[service]]\nname = \"a\"\nbackend = [\n  \"1.2.3.4:5\",\n  [1],\n]\n",
            5,
            Some("backend"),
            "expected an array",
        ),
        (
            "[[service]]\nname = \"a\"\nhealth = { check = \"tcp\", every = \"2s\" }\n",
            3,
            Some("health.every"),
            "unknown key",
        ),
        (
            "[[service]]\nname = \"a\"\nhealth = \"tcp\"\n",
            3,
            Some("health"),
            "expected a table",
        ),
        (
            "service = 3\n",
            1,
            Some("service"),
            "expected [[service]] tables",
        ),
        (
            "[[service]]\nname = \"a\"\nretries = 1\nretries = 2\n",
            4,
            None,
            "duplicate key",
        ),
    ];
    for &(text, line, key, why) in cases {
        let e = parse(text).expect_err(text);
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert_eq!(e.key.as_deref(), key, "{text:?}: {e}");
        assert!(e.why.contains(why), "{text:?}: {e}");
        assert!(!e.to_string().contains('\n'), "not one line: {e}");
    }
}

#[test]
fn integers_are_read_in_their_radix_and_with_underscores() {
    let text = "[[service]]\nname = \"a\"\nmax_queue = 1_000\nretries = 0o7\nbacklog = -1\n";
    let file = parse(text).unwrap();
    let got: Vec<_> = file.services[0]
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("backlog", values(&["-1"])),
            ("max_queue", values(&["1000"])),
            ("retries", values(&["7"])),
        ]
    );
}

fn key() -> impl Strategy<Value = String> {
    "[a-z][a-z_]{0,12}".prop_filter("not reserved", |k| {
        k != "name" && k != "health" && k != "service" && !GLOBAL_KEYS.contains(&k.as_str())
    })
}

fn scalar_text() -> impl Strategy<Value = String> {
    "[ -~]{0,20}"
}

fn value() -> impl Strategy<Value = EntryValue> {
    prop_oneof![
        any::<bool>().prop_map(EntryValue::Switch),
        proptest::collection::vec(scalar_text(), 0..4).prop_map(EntryValue::Values),
    ]
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_value(v: &EntryValue) -> String {
    match v {
        EntryValue::Switch(b) => b.to_string(),
        EntryValue::Values(vs) => format!(
            "[{}]",
            vs.iter()
                .map(|s| toml_string(s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

proptest! {
    /// Any text: no panic, and an error names a line of the text.
    #[test]
    fn never_panics_and_errors_point_into_the_text(text in "(?s).{0,300}") {
        if let Err(e) = parse(&text) {
            let lines = text.split('\n').count();
            prop_assert!((1..=lines).contains(&e.line), "line {} of {}: {}", e.line, lines, e);
            prop_assert!(!e.to_string().contains('\n'));
        }
    }

    /// Services written out as TOML read back as the same entries, each on its line.
    #[test]
    fn written_services_read_back(
        services in proptest::collection::btree_map(
            "[a-z0-9_-]{1,10}",
            proptest::collection::btree_map(key(), value(), 0..6),
            1..4,
        )
    ) {
        let mut text = String::new();
        let mut expected = Vec::new();
        for (name, entries) in &services {
            text.push_str("[[service]]\n");
            let header = text.lines().count();
            text.push_str(&format!("name = {}\n", toml_string(name)));
            let mut read = Vec::new();
            for (k, v) in entries {
                text.push_str(&format!("{k} = {}\n", write_value(v)));
                read.push(Entry {
                    key: k.clone(),
                    flag: k.replace('_', "-"),
                    value: v.clone(),
                    line: text.lines().count(),
                });
            }
            expected.push(ServiceEntries { name: name.clone(), line: header, entries: read });
        }
        let file = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(file.global, vec![]);
        prop_assert_eq!(file.services, expected);
    }
}
