//! `--config FILE` (issue #14): a service read from a TOML file, with the real binary.

use std::time::Duration;

use crate::util::*;

const WITHIN: Duration = Duration::from_secs(10);

fn service(backends: &[&TaggedBackend], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{} weight=1\"", b.addr()))
        .collect();
    format!(
        "workers = 1\n\n[[service]]\nname = \"ws\"\nlisten = \"{{listen}}\"\n\
         algorithm = \"round-robin\"\nbackends = [{}]\n{extra}",
        list.join(", ")
    )
}

/// A file's service is served as its flags would be: the backends it lists take turns, and
/// the log names the service.
#[test]
fn a_service_from_a_file_is_served() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (hf, _file) = Child::spawn_config(&service(&[&a, &b], "idle_timeout = \"2m\"\n"));
    let tags = tags_of_new_clients(hf.addr(), 4);
    assert_eq!(count_tag(&tags, "a"), 2, "{tags:?}");
    assert_eq!(count_tag(&tags, "b"), 2, "{tags:?}");
    hf.wait_for_stderr("service 'ws' from ", WITHIN);
}

/// SIGHUP re-reads the file: a backend added there gets clients, a removed one none; a
/// setting that cannot change live is named in the log, and nothing else changes.
#[test]
fn sighup_applies_the_files_new_backends_and_names_what_waits() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let (hf, file) = Child::spawn_config(&service(&[&a], ""));
    assert_eq!(tags_of_new_clients(hf.addr(), 3), vec!["a"; 3]);
    let text = std::fs::read_to_string(file.path()).unwrap();
    let backend_line = format!("backends = [\"{} weight=1\"]", a.addr());
    assert!(text.contains(&backend_line), "{text}");
    file.write(
        &text
            .replace(&backend_line, &format!("backends = [\"{}\"]", b.addr()))
            .replace("workers = 1", "workers = 2"),
    );
    hf.signal(libc::SIGHUP);
    hf.wait_for_stderr("SIGHUP: backends reloaded", WITHIN);
    let log = hf.stderr();
    assert!(
        log.contains("SIGHUP: workers changed in "),
        "the change that waits is not named:\n{log}"
    );
    assert_eq!(tags_of_new_clients(hf.addr(), 3), vec!["b"; 3]);

    // An invalid file changes nothing and says why, with the line.
    file.write(&format!(
        "[[service]]\nname = \"ws\"\nlisten = \"{}\"\nretries = \"many\"\n",
        hf.addr()
    ));
    hf.signal(libc::SIGHUP);
    hf.wait_for_stderr("SIGHUP: reload failed, backends unchanged", WITHIN);
    assert!(
        hf.stderr()
            .contains("line 4: retries: invalid value 'many'"),
        "{}",
        hf.stderr()
    );
    assert_eq!(tags_of_new_clients(hf.addr(), 2), vec!["b"; 2]);
}

/// A bad file, a flag beside --config, or two services on one address: one line, exit 2,
/// nothing started.
#[test]
fn bad_files_and_mixed_flags_exit_2_with_one_line() {
    let good = "[[service]]\nname = \"ws\"\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\n";
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            format!("{good}colour = \"blue\"\n"),
            vec![],
            "service 'ws': line 5: colour: unknown key",
        ),
        (
            good.to_string(),
            vec!["--backend", "127.0.0.1:3"],
            "--backend cannot be given with --config",
        ),
        (
            format!(
                "{good}[[service]]\nname = \"two\"\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\n"
            ),
            vec![],
            "listen: 127.0.0.1:1 is also service 'ws''s",
        ),
        (
            "workers = \"x\"\n[[service]]\nname = \"ws\"\n".to_string(),
            vec![],
            "line 1: workers: invalid value 'x'",
        ),
    ];
    for (text, extra, want) in cases {
        let file = TempFile::new("config.toml", &text);
        let mut args = vec!["--config", file.path().to_str().unwrap()];
        args.extend(extra);
        let out = run_binary(&args, WITHIN);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?}, got:\n{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "not one line:\n{stderr}");
    }
}

/// The example in contrib/ is a valid file: `--check` prints its settings and exits 0, and
/// `--check` names what is wrong in a bad one.
#[test]
fn the_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/holdfast.toml");
    let out = run_binary(&["--check", "--config", example], WITHIN);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("127.0.0.1:8080"), "{stdout}");
    assert!(stdout.contains("websocket:/healthz"), "{stdout}");
    assert!(stdout.contains("# service 'redis'"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:6380"), "{stdout}");

    let bad = TempFile::new(
        "config.toml",
        "[[service]]\nname = \"ws\"\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\nrise = 0\n",
    );
    let out = run_binary(
        &["--check", "--config", bad.path().to_str().unwrap()],
        WITHIN,
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 5: rise: --rise and --fall must be at least 1"),
        "{stderr}"
    );
}

/// A port of 127.0.0.1 held with SO_REUSEPORT (never listening), for holdfast to bind beside
/// it: the test knows the address before holdfast starts.
pub(crate) fn reserved_port() -> (socket2::Socket, std::net::SocketAddr) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&SockAddr::from(localhost0())).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// Every [[service]] of a file runs in the one process: each on its own port, with its own
/// backends and algorithm; the log names each service.
#[test]
fn every_service_of_a_file_is_served() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let c = TaggedBackend::start("c");
    let (_held, second) = reserved_port();
    let text = format!(
        "workers = 1\n\n[[service]]\nname = \"ws\"\nlisten = \"{{listen}}\"\n\
         algorithm = \"round-robin\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [[service]]\nname = \"cache\"\nlisten = \"{second}\"\nalgorithm = \"source-hash\"\n\
         backends = [\"{}\"]\n",
        a.addr(),
        b.addr(),
        c.addr()
    );
    let (hf, _file) = Child::spawn_config(&text);
    let tags = tags_of_new_clients(hf.addr(), 4);
    assert_eq!(count_tag(&tags, "a"), 2, "{tags:?}");
    assert_eq!(count_tag(&tags, "b"), 2, "{tags:?}");
    wait_until_ok(WITHIN, || {
        visit_tagged("127.0.0.1", second, WITHIN).map(|_| ())
    });
    assert_eq!(tags_of_new_clients(second, 3), vec!["c"; 3]);
    hf.wait_for_stderr("service 'cache' from ", WITHIN);
    hf.wait_for_stderr("(service 'cache')", WITHIN);
}

/// SIGHUP with services added and removed in the file, sessions open on each: the kept
/// service's session goes on and its new clients reach its new backend, the removed
/// service's port refuses new clients and its session is closed at its drain timeout, and
/// the added service serves.
#[test]
fn sighup_adds_and_removes_services_with_live_sessions() {
    let a = TaggedBackend::start("a");
    let b = TaggedBackend::start("b");
    let c = TaggedBackend::start("c");
    let (_held, second) = reserved_port();
    let (_held_too, third) = reserved_port();
    let service = |name: &str, listen: &str, backend: &TaggedBackend| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [\"{}\"]\n\
             drain_timeout = \"300ms\"\nclose_spread = \"0s\"\n\n",
            backend.addr()
        )
    };
    let text = format!(
        "workers = 2\n\n{}{}",
        service("kept", "{listen}", &a),
        service("leaving", &second.to_string(), &c)
    );
    let (hf, file) = Child::spawn_config(&text);
    wait_until_ok(WITHIN, || {
        visit_tagged("127.0.0.1", second, WITHIN).map(|_| ())
    });
    let (tag, mut on_kept) = connect_tagged(hf.addr());
    assert_eq!(tag, "a");
    let (tag, mut on_leaving) = connect_tagged(second);
    assert_eq!(tag, "c");

    file.write(&format!(
        "workers = 2\n\n{}{}",
        service("kept", &hf.addr().to_string(), &b),
        service("added", &third.to_string(), &c)
    ));
    hf.signal(libc::SIGHUP);
    hf.wait_for_stderr("SIGHUP: backends reloaded", WITHIN);
    let log = hf.stderr();
    assert!(log.contains("SIGHUP: service 'added' added"), "{log}");
    assert!(log.contains("SIGHUP: service 'leaving' removed"), "{log}");

    round_trip(&mut on_kept, b"nothing dropped");
    assert_eq!(tags_of_new_clients(hf.addr(), 3), vec!["b"; 3]);
    assert_eq!(tags_of_new_clients(third, 2), vec!["c"; 2]);
    wait_refused(second, WITHIN);
    expect_closed(&mut on_leaving, WITHIN);
    round_trip(&mut on_kept, b"still nothing dropped");
}

/// `--check` on a file with two services prints each service's settings under its name.
#[test]
fn check_prints_every_service() {
    let text = "workers = 1\n\n[[service]]\nname = \"ws\"\nlisten = \"127.0.0.1:1\"\n\
                backend = \"127.0.0.1:2\"\n\n[[service]]\nname = \"cache\"\n\
                listen = \"127.0.0.1:3\"\nbackend = \"127.0.0.1:4\"\nalgorithm = \"source-hash\"\n";
    let file = TempFile::new("config.toml", text);
    let out = run_binary(
        &["--check", "--config", file.path().to_str().unwrap()],
        WITHIN,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ws = stdout.find("# service 'ws'").expect("ws named");
    let cache = stdout.find("# service 'cache'").expect("cache named");
    assert!(ws < cache, "{stdout}");
    assert!(
        stdout[ws..cache].contains("listen = 127.0.0.1:1"),
        "{stdout}"
    );
    assert!(stdout[cache..].contains("listen = 127.0.0.1:3"), "{stdout}");
    assert!(
        stdout[cache..].contains("algorithm = source-hash"),
        "{stdout}"
    );
}

/// Three services, each probing its own pool, are probed from one health thread, and the two
/// that find backends by DNS are re-resolved by one DNS thread (adding a service adds no
/// thread): each service's dead backend goes down, the live ones serve.
#[test]
fn every_service_is_probed_from_one_health_thread() {
    let live: Vec<EchoBackend> = (0..3).map(|_| EchoBackend::start()).collect();
    let dead: Vec<ClosedPort> = (0..3).map(|_| closed_port()).collect();
    let mut text = String::from(
        "workers = 2\n\n[[service]]\nname = \"s0\"\nlisten = \"{listen}\"\n\
         backends = [\"LIVE0\", \"DEAD0\"]\n\
         health = { interval = \"100ms\", timeout = \"100ms\", fall = 1, rise = 1 }\n",
    );
    // Listen addresses for the other two services, held (bound, not listening, with
    // SO_REUSEPORT) so that no other test takes them; holdfast's listeners share them.
    let reserved: Vec<socket2::Socket> = (0..2)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            s.bind(&localhost0().into()).expect("bind");
            s
        })
        .collect();
    for (i, r) in (1..3).zip(&reserved) {
        let addr = r
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("an inet address");
        let port = live[i].addr().port();
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\nlisten = \"{addr}\"\n\
             backends = [\"DEAD{i}\"]\nbackend_dns = [\"localhost:{port}\"]\n\
             dns_interval = \"100ms\"\n\
             health = {{ interval = \"100ms\", timeout = \"100ms\", fall = 1, rise = 1 }}\n"
        ));
    }
    for i in 0..3 {
        text = text
            .replace(&format!("LIVE{i}"), &live[i].addr().to_string())
            .replace(&format!("DEAD{i}"), &dead[i].addr().to_string());
    }
    let (hf, _file) = Child::spawn_config(&text);
    for d in &dead {
        hf.wait_for_stderr(&format!("backend {} is DOWN", d.addr()), WITHIN);
    }
    let threads = |name: &str| {
        std::fs::read_dir(format!("/proc/{}/task", hf.pid()))
            .expect("the process's threads")
            .filter_map(|t| t.ok())
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
            })
            .count()
    };
    assert_eq!(
        threads("holdfast-health"),
        1,
        "one health thread for three services"
    );
    assert_eq!(
        threads("holdfast-dns"),
        1,
        "one DNS thread for two services"
    );
    // The live backend of each service serves (its dead one is skipped), the last two's
    // found by DNS.
    let mut c = client(hf.addr());
    round_trip(&mut c, b"through s0");
    for r in &reserved {
        let addr = r
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("inet");
        let mut c = client(addr);
        round_trip(&mut c, b"through a service found by DNS");
    }
}
