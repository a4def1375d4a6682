//! holdfast's integration tests: one test binary, real loopback sockets, fake backends.
//!
//! Run with `cargo test --test it`. Every test uses port 0 (or a reserved port) and bounded
//! waits, so they run in parallel and a broken balancer fails a test rather than hanging it.

mod util;

mod admin;
mod algorithms;
mod cli;
mod client_ip;
mod config_file;
mod faults;
mod haproxy;
mod health;
mod idle;
mod lifecycle;
mod limits;
mod pacing;
mod packaging;
mod rebalance;
mod relay;
mod reliability;
mod reload;
mod retry;
mod services;
mod upgrade;
mod upgrade_proof;
mod websocket;
