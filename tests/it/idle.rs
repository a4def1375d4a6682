//! The idle timeout closes silent sessions and only those.

use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn idle_session_is_closed_and_busy_one_is_not() {
    let echo = EchoBackend::start();
    let mut cfg = config(&[echo.addr()]);
    cfg.idle_timeout = Some(Duration::from_millis(300));
    let lb = start_balancer(cfg);
    let target = lb_addr(&lb);

    let mut idle = client(target);
    let mut busy = client(target);
    round_trip(&mut idle, b"hello, then silence");
    let idle_since = Instant::now();
    let watcher = std::thread::spawn(move || {
        let (how, _) = expect_closed(&mut idle, Duration::from_secs(2));
        (how, idle_since.elapsed())
    });

    // The busy session talks every 100 ms for 1.2 s: never idle for 300 ms.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        round_trip(&mut busy, format!("tick {i}").as_bytes());
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    round_trip(&mut busy, b"still here");

    let (how, took) = watcher.join().expect("idle client closed within 2 s");
    assert!(
        took >= Duration::from_millis(250),
        "idle session closed ({how:?}) after only {took:?}"
    );
    wait_until_ok(Duration::from_secs(2), || {
        let st = lb.stats();
        if st.idle_timeouts >= 1 && st.active == 1 {
            Ok(())
        } else {
            Err(format!(
                "want 1 idle timeout and the busy session alone: {st:?}"
            ))
        }
    });
}
