//! Cost of the per-IP limiter table (`holdfast::client_ip::IpLimits`): memory and fill time
//! for 100k distinct client IPs (printed once, before the criterion runs), and the time of
//! one admit + close on a table that already holds 100k clients.
//!
//! `cargo bench --bench client_ip`. Memory is the growth of the process's resident set while
//! the table fills (Linux `/proc/self/statm`): what the allocator really took, slack included,
//! rather than an estimate from the hash map's layout.

use criterion::{Criterion, criterion_group};
use holdfast::client_ip::{IpLimits, IpLimitsConfig, Ticket};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: u32 = 100_000;

/// Distinct IPv4 clients spread over 10.0.0.0/8 (an odd step visits all of them).
fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        0x0a00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff),
    ))
}

/// Distinct IPv6 clients, one per /64.
fn v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        (0x2001_0db8_u128 << 96) | (u128::from(i) << 64) | 1,
    ))
}

fn table(max_rate: u32) -> Arc<IpLimits> {
    IpLimits::new(IpLimitsConfig {
        max_conns: 100,
        max_rate,
        ..IpLimitsConfig::default()
    })
    .expect("valid config")
}

/// A table holding `CLIENTS` clients with one live session each.
fn filled(max_rate: u32, t0: Instant) -> (Arc<IpLimits>, Vec<Ticket>) {
    let table = table(max_rate);
    let held = (0..CLIENTS)
        .map(|i| table.try_open(v4(i), t0).expect("room"))
        .collect();
    (table, held)
}

/// Resident set size in bytes, or `None` where `/proc` is missing.
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn report(name: &str, client: fn(u32) -> IpAddr) {
    let table = table(100);
    // The tickets are the sessions' memory, not the table's: allocated before measuring.
    let mut tickets: Vec<Ticket> = Vec::with_capacity(CLIENTS as usize);
    let before = rss();
    let start = Instant::now();
    let t0 = Instant::now();
    for i in 0..CLIENTS {
        match table.try_open(client(i), t0) {
            Ok(ticket) => tickets.push(ticket),
            Err(refusal) => panic!("client {i} refused: {refusal}"),
        }
    }
    let fill = start.elapsed();
    let after = rss();
    assert_eq!(table.len(), CLIENTS as usize);
    let grown = match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.1} MiB resident ({:.0} bytes per client)",
            a.saturating_sub(b) as f64 / (1024.0 * 1024.0),
            a.saturating_sub(b) as f64 / f64::from(CLIENTS)
        ),
        _ => "memory not measured (no /proc/self/statm)".into(),
    };
    // Closed before their buckets refill: the entries stay until a sweep.
    for ticket in tickets.drain(..) {
        ticket.close(t0);
    }
    let kept = table.len();
    let start = Instant::now();
    let removed = table.sweep(t0 + Duration::from_secs(1));
    let swept = start.elapsed();
    let freed = match (after, rss()) {
        (Some(a), Some(now)) => format!(
            ", resident {:.1} MiB lower",
            a.saturating_sub(now) as f64 / (1024.0 * 1024.0)
        ),
        _ => String::new(),
    };
    println!(
        "{name}: {CLIENTS} distinct clients: {grown}; filled in {:.1} ms ({:.0} ns per \
         client); all closed: {kept} entries kept until their buckets refill; a sweep a second \
         later removed {removed} in {:.1} ms, {} left{freed}",
        fill.as_secs_f64() * 1e3,
        fill.as_nanos() as f64 / f64::from(CLIENTS),
        swept.as_secs_f64() * 1e3,
        table.len(),
    );
}

fn bench_open_close(c: &mut Criterion) {
    let t0 = Instant::now();
    let (table, held) = filled(100, t0);
    // Without a rate, an entry leaves as soon as its last session does.
    let (conns_only, held_too) = filled(0, t0);
    let mut g = c.benchmark_group("ip_limits_100k_clients");
    // A known client: a lookup, one more session, and back.
    let mut k = 0u64;
    g.bench_function("open_close_known_client", |b| {
        b.iter(|| {
            k += 1;
            // Each client comes back every 100k ms of the clock used here: the rate never
            // refuses.
            let now = t0 + Duration::from_millis(k);
            let i = (k % u64::from(CLIENTS)) as u32;
            let ticket = table.try_open(black_box(v4(i)), now).expect("admitted");
            ticket.close(now);
        })
    });
    // A new client: an insert, and a removal at close.
    let mut n = 0u32;
    g.bench_function("open_close_new_client", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let ip = IpAddr::V4(Ipv4Addr::from(0xc000_0000 | n));
            let ticket = conns_only.try_open(black_box(ip), t0).expect("admitted");
            ticket.close(t0);
        })
    });
    g.finish();
    drop((held, held_too));
}

criterion_group!(benches, bench_open_close);

fn main() {
    report("ipv4", v4);
    report("ipv6 /64s", v6);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
