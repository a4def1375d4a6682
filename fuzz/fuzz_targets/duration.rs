//! The duration parser (every duration flag) on arbitrary bytes: it never panics, and what it
//! accepts reads back the same once written out.

#![no_main]

use holdfast::fuzzing::{format_duration, parse_duration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Flag values reach holdfast as UTF-8 (clap refuses anything else).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration(text) {
        let written = format_duration(d);
        assert_eq!(
            parse_duration(&written),
            Ok(d),
            "{text:?} written as {written:?}"
        );
    }
});
