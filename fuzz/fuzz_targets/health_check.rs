//! `--health-check` values: parsing never panics, whatever parses prints as text that parses
//! back to the same value, and the send/expect escapes round-trip for any bytes.
//!
//! `cargo +nightly fuzz run health_check`

#![no_main]

use holdfast::HealthCheck;
use holdfast::fuzzing::{escape, unescape};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Any bytes, escaped, come back unchanged.
    assert_eq!(unescape(&escape(data)).as_deref(), Ok(data));

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(check) = text.parse::<HealthCheck>() {
        let shown = check.to_string();
        assert_eq!(
            shown.parse::<HealthCheck>().ok(),
            Some(check),
            "{text:?} displays as {shown:?}"
        );
    }
    if let Ok(bytes) = unescape(text) {
        assert_eq!(unescape(&escape(&bytes)), Ok(bytes), "{text:?}");
    }
});
