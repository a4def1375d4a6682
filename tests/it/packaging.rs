//! What an operator packaging holdfast relies on: completions and a man page built from the
//! same definitions as `--help`, `--check`, JSON logs, `/healthz` and socket activation.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `holdfast <args>`, which must exit 0; returns its stdout.
#[track_caller]
fn stdout_of(args: &[&str]) -> String {
    let out = run_binary(args, RUN_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "holdfast {args:?} exited with {}; stderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn completions_name_the_flags_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(&["completions", shell]);
        for flag in ["backend", "listen", "drain-timeout", "log-level"] {
            assert!(
                script.contains(flag),
                "{shell} completions do not mention --{flag}:\n{script}"
            );
        }
    }
}

#[test]
fn completions_for_an_unknown_shell_are_a_usage_error() {
    let out = run_binary(&["completions", "tcsh"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("error:") && err.contains("tcsh"), "{err}");
}

#[test]
fn man_page_is_roff_with_every_flag() {
    let page = stdout_of(&["man"]);
    assert!(
        page.lines().any(|l| l.starts_with(".TH holdfast 1")),
        "no .TH header:\n{page}"
    );
    assert!(page.contains(".SH OPTIONS"), "no OPTIONS section:\n{page}");
    for flag in [r"\-\-backend", r"\-\-listen", r"\-\-drain\-timeout"] {
        assert!(page.contains(flag), "the man page lacks {flag}");
    }
    // Where groff is installed, the page must also render without a complaint.
    let Ok(mut groff) = Command::new("groff")
        .args(["-man", "-Tascii", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("groff not installed: the man page is not rendered");
        return;
    };
    let mut stdin = groff.stdin.take().expect("piped");
    std::io::Write::write_all(&mut stdin, page.as_bytes()).expect("write to groff");
    drop(stdin);
    let out = groff.wait_with_output().expect("groff runs");
    assert!(out.status.success(), "groff failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "groff warns about the page");
    let rendered = text(&out.stdout);
    assert!(
        rendered.contains("--backend"),
        "the rendered page lacks --backend:\n{rendered}"
    );
}

#[test]
fn a_subcommand_does_not_mix_with_flags() {
    let out = run_binary(&["--listen", "127.0.0.1:0", "man"], RUN_TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("error:"));
}
