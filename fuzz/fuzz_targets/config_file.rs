//! The `--config` file reader on arbitrary bytes: it never panics, an error names a line of
//! the input on one line, and what it accepts has at least one named service whose entries
//! name lines of the input.

#![no_main]

use holdfast::fuzzing::parse_config_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The file is read as UTF-8 (invalid bytes are refused before parsing).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.split('\n').count();
    match parse_config_file(text) {
        Ok(file) => {
            assert!(!file.services.is_empty());
            for service in &file.services {
                assert!(!service.name.is_empty());
                assert!((1..=lines).contains(&service.line));
                for e in file.global.iter().chain(&service.entries) {
                    assert!((1..=lines).contains(&e.line), "{e:?}");
                    assert!(!e.flag.contains('_'), "{e:?}");
                }
            }
        }
        Err(e) => {
            assert!((1..=lines).contains(&e.line), "{e} of {lines}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
});
