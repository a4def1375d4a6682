//! The backends file parser on arbitrary bytes: it never panics, an error names a line of the
//! input, and what it accepts is a valid list that reads back the same once written out.

#![no_main]

use std::collections::HashSet;

use holdfast::fuzzing::parse_backends_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The file is read as UTF-8 (invalid bytes are refused before parsing).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_backends_file(text) {
        Ok(specs) => {
            let mut seen = HashSet::new();
            for s in &specs {
                assert!(s.addr.port() != 0, "port 0 accepted: {s}");
                assert!(
                    (1..=256).contains(&s.weight),
                    "weight {} accepted",
                    s.weight
                );
                assert!(seen.insert(s.addr), "{} accepted twice", s.addr);
            }
            let written: String = specs.iter().map(|s| format!("{s}\n")).collect();
            assert_eq!(
                parse_backends_file(&written).as_ref(),
                Ok(&specs),
                "written out:\n{written}"
            );
            let crlf = text.replace('\n', "\r\n");
            assert_eq!(parse_backends_file(&crlf).as_ref(), Ok(&specs), "with CRLF");
        }
        Err((line, why)) => {
            let lines = text.lines().count();
            assert!(
                (1..=lines).contains(&line),
                "error on line {line} of {lines}: {why}"
            );
        }
    }
});
