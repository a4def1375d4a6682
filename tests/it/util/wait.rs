//! Waiting: bounded polls for a condition, and the one sleep for when there is none.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::connect_refused;

/// Polls `cond` every few milliseconds until it is true; panics (at the caller's line) if it
/// is still false after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Like [`wait_until`], but the check explains itself: it returns `Err(why)` while not yet
/// satisfied, and the last `why` is in the panic message.
#[track_caller]
pub fn wait_until_ok(timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check() {
            Ok(()) => return,
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?}: {why}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls connects to `addr` until one is refused; returns when that was. Panics if connects
/// are still not refused after `timeout`.
#[track_caller]
pub fn wait_refused(addr: SocketAddr, timeout: Duration) -> Instant {
    let mut refused_at = None;
    wait_until_ok(timeout, || {
        if connect_refused(addr) {
            refused_at = Some(Instant::now());
            Ok(())
        } else {
            Err(format!("{addr} still accepts connections"))
        }
    });
    refused_at.expect("set when the wait succeeded")
}

/// Sleeps until `at` (at once if it has passed). For tests that check that nothing happens
/// before a moment, where there is no condition to wait for.
pub fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}
