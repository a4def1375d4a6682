//! The admin endpoint's request parser (`holdfast::fuzzing::parse_request`) on any
//! method, path and body: it never panics; what it accepts reads back as the same request;
//! what it refuses gets a 4xx with a reason on one short line.
//!
//! The input is `METHOD \n PATH \n BODY` (bytes that are not UTF-8 become U+FFFD in the
//! method and path, as a server's would never reach the parser otherwise). From the top of
//! the repository, with the nightly toolchain and `cargo install cargo-fuzz`:
//!
//! ```sh
//! cargo +nightly fuzz run admin_request -- -max_total_time=300
//! ```
//!
//! Addresses are hard to find by mutation alone; seeding the corpus with a few valid requests
//! gets the fuzzer to the paths behind them within seconds:
//!
//! ```sh
//! mkdir -p fuzz/corpus/admin_request && cd fuzz/corpus/admin_request
//! printf 'GET\n/metrics\n' > metrics
//! printf 'GET\n/backends/[::1%%2512]:80\n' > backend
//! printf 'POST\n/backends/10.0.0.1%%3A80/drain\n' > drain
//! printf 'POST\n/backends/10.0.0.1:80/weight\n 7\r\n' > weight
//! ```
//!
//! The corpus grows in `fuzz/corpus/admin_request`; a failing input is saved in
//! `fuzz/artifacts/admin_request/` and replayed with
//! `cargo +nightly fuzz run admin_request fuzz/artifacts/admin_request/<file>`.

#![no_main]

use holdfast::fuzzing::parse_request;
use libfuzzer_sys::fuzz_target;

/// The parser's bound on a body, and a generous one on an error line.
const MAX_BODY_BYTES: usize = 1024;
const MAX_ERROR_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    match parse_request(&method, &path, body) {
        Ok(request) => {
            assert!(
                ["GET", "HEAD", "POST"].contains(&&*method),
                "{method:?} accepted"
            );
            assert!(body.len() <= MAX_BODY_BYTES, "a body of {} accepted", body.len());
            let (m, p, b) = request.encode();
            assert_eq!(
                parse_request(m, &p, &b).ok(),
                Some(request.clone()),
                "{method:?} {path:?} parsed as {request:?}, which encodes as {m} {p:?} {b:?}"
            );
        }
        Err(reply) => {
            assert!(reply.status.is_client_error(), "{}", reply.status);
            assert!(
                reply.body.ends_with('\n')
                    && reply.body.matches(['\n', '\r']).count() == 1
                    && reply.body.len() < MAX_ERROR_BYTES,
                "not one short line: {:?}",
                reply.body
            );
        }
    }
});
