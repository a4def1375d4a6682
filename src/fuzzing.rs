//! Entry points for the `cargo fuzz` targets in `fuzz/`: every parser of outside input, as a
//! pure function (no socket, no resolver, no clock). Doc-hidden, not a stable API: it exists
//! so that the fuzz crate, which can only see the library's public items, reaches parsers that
//! are otherwise private. See `fuzz/README.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::config::BackendSpec;

/// The admin endpoint's request parser.
pub use crate::admin::routes::{AdminRequest, Reply, parse_request};
/// The `--config` file's reader (its shape; values are the flags' parsers').
pub use crate::config::file::parse as parse_config_file;
/// The `--health-check` value's escapes, and a duration flag's value (`500ms`, `2s`,
/// `1h 30m`, `0`).
pub use crate::config::{escape, parse_duration, unescape};
/// The PROXY protocol parser and encoders.
pub use crate::proxy_protocol::{
    Command, MAX_TLVS_LEN, Parse, ProxyHeader, Reason, Tlvs, V1_MAX_LEN, V2_MAX_LEN, encode_v1,
    encode_v2, encode_v2_local, parse,
};

/// A backends file's text to its backends, or the line (from 1) and why not. Host names
/// are not resolved: [`stand_in_lookup`] gives each one an address.
pub fn parse_backends_file(text: &str) -> Result<Vec<BackendSpec>, (usize, String)> {
    crate::sources::parse_backends(text, &stand_in_lookup)
        .map_err(|(line, why)| (line, why.to_string()))
}

/// One `HOST:PORT[,weight=N]` (a `--backend` value or a file line).
pub fn parse_backend_spec(s: &str) -> Result<BackendSpec, String> {
    BackendSpec::parse_with(s, &stand_in_lookup).map_err(|e| e.to_string())
}

/// `d` the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A pure stand-in for the resolver: the same name always gets the same address in
/// 10.0.0.0/8 (FNV-1a of the name).
pub fn stand_in_lookup(host: &str, port: u16) -> Result<SocketAddr, String> {
    let hash = host.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, b, c, d] = hash.to_be_bytes();
    Ok(SocketAddr::from((Ipv4Addr::new(10, b, c, d), port)))
}
