//! Cost of backend selection: per-pick latency on the connection hot path,
//! Maglev table build time on the control thread, and Maglev's disruption
//! when a backend leaves.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use holdfast::balance::large::{DeadlineRoundRobin, LeastConnHeap};
use holdfast::balance::maglev::DEFAULT_TABLE_SIZE;
use holdfast::balance::{Load, Maglev, SmoothRoundRobin, least_conn};
use std::cell::Cell;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

const SIZES: [usize; 2] = [10, 1000];
/// Pool sizes for the linear scans against the heaps of `balance::large` (used past 64).
const LARGE: [usize; 3] = [100, 1000, 10_000];

fn pool(n: usize) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            // 10.0.0.0/8 plus the index: distinct for any n used here.
            let ip = Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i as u32));
            (
                SocketAddr::V4(SocketAddrV4::new(ip, 8080)),
                1 + (i % 3) as u32,
            )
        })
        .collect()
}

/// Golden-ratio increment: a cheap way to visit hashes spread over the
/// whole table instead of hammering one cache line.
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

fn bench_least_conn(c: &mut Criterion) {
    let mut g = c.benchmark_group("least_conn_pick");
    for &n in &SIZES {
        let loads: Vec<Load> = (0..n)
            .map(|i| Load {
                active: (i as u64 * 7919) % 97,
                weight: 1 + (i % 3) as u32,
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &loads, |b, loads| {
            let mut start = 0usize;
            b.iter(|| {
                start = start.wrapping_add(1);
                least_conn(loads.len(), black_box(start), |i| Some(loads[i]))
            });
        });
    }
    g.finish();
}

/// Linear scan against heap, in a steady state: each pick takes a slot on the chosen backend
/// and a session ends somewhere else, as on a busy balancer (the heap sees an ended session
/// only at its next rebuild, at most every 50 ms, which this includes).
fn bench_least_conn_large(c: &mut Criterion) {
    let mut g = c.benchmark_group("least_conn_pick_large");
    for &n in &LARGE {
        let loads: Vec<Cell<Load>> = (0..n)
            .map(|i| {
                Cell::new(Load {
                    active: 50 + (i as u64 * 7919) % 97,
                    weight: 1 + (i % 3) as u32,
                })
            })
            .collect();
        let churn = |picked: usize, step: &mut u64| {
            let l = &loads[picked];
            l.set(Load {
                active: l.get().active + 1,
                ..l.get()
            });
            *step = step.wrapping_add(STEP);
            let end = &loads[(*step % n as u64) as usize];
            let e = end.get();
            end.set(Load {
                active: e.active.saturating_sub(1),
                ..e
            });
        };
        g.bench_function(BenchmarkId::new("scan", n), |b| {
            let (mut start, mut step) = (0usize, 0u64);
            b.iter(|| {
                start = start.wrapping_add(1);
                let i = least_conn(n, black_box(start), |i| Some(loads[i].get())).unwrap_or(0);
                churn(i, &mut step);
            });
        });
        g.bench_function(BenchmarkId::new("heap", n), |b| {
            let mut heap = LeastConnHeap::new(1);
            let mut step = 0u64;
            b.iter(|| {
                let i = heap
                    .pick(n, 1, Instant::now(), |i| loads[i].get(), |_| true)
                    .unwrap_or(0);
                churn(black_box(i), &mut step);
            });
        });
    }
    g.finish();
}

fn bench_round_robin_large(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_robin_pick_large");
    for &n in &LARGE {
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 3) as u32).collect();
        g.bench_function(BenchmarkId::new("smooth", n), |b| {
            let mut rr = SmoothRoundRobin::new(n);
            b.iter(|| rr.pick(n, |i| Some(black_box(weights[i]))));
        });
        g.bench_function(BenchmarkId::new("deadline", n), |b| {
            let mut rr = DeadlineRoundRobin::default();
            b.iter(|| rr.pick(n, 1, |i| black_box(weights[i]), |_| true));
        });
    }
    g.finish();
}

fn bench_maglev_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_pick");
    for &n in &SIZES {
        let backends = pool(n);
        let table = Maglev::new(&backends, DEFAULT_TABLE_SIZE);
        g.bench_with_input(BenchmarkId::from_parameter(n), &table, |b, t| {
            let mut h = 0u64;
            b.iter(|| {
                h = h.wrapping_add(STEP);
                t.pick(black_box(h), |_| false)
            });
        });
        // Backend 0 down: its ~1/N share of picks walks on to a neighbour.
        g.bench_with_input(BenchmarkId::new("one_down", n), &table, |b, t| {
            let mut h = 0u64;
            b.iter(|| {
                h = h.wrapping_add(STEP);
                t.pick(black_box(h), |i| i == 0)
            });
        });
        // Worst case: everything down, the walk gives up after `cover`.
        g.bench_with_input(BenchmarkId::new("all_down", n), &table, |b, t| {
            let mut h = 0u64;
            b.iter(|| {
                h = h.wrapping_add(STEP);
                t.pick(black_box(h), |_| true)
            });
        });
    }
    g.finish();
}

fn bench_round_robin(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_robin_pick");
    for &n in &SIZES {
        let weights: Vec<Option<u32>> = (0..n).map(|i| Some(1 + (i % 3) as u32)).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &weights, |b, w| {
            let mut rr = SmoothRoundRobin::new(w.len());
            b.iter(|| rr.pick(w.len(), |i| black_box(w[i])));
        });
    }
    g.finish();
}

fn bench_maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_65537");
    for &n in &[10usize, 100, 1000] {
        let backends = pool(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &backends, |b, bs| {
            b.iter(|| Maglev::new(black_box(bs), DEFAULT_TABLE_SIZE));
        });
    }
    g.finish();
}

/// Not a timing: prints, once, the fraction of hash space that changes
/// backend when one of N equal-weight backends is removed and the table
/// rebuilt (ideal 1/N). Uses `pick` over every slot so it measures exactly
/// what clients see.
fn remap_fractions(_: &mut Criterion) {
    let m = DEFAULT_TABLE_SIZE;
    for &n in &[10usize, 100, 1000] {
        let all: Vec<(SocketAddr, u32)> = pool(n).into_iter().map(|(a, _)| (a, 1)).collect();
        let mut fewer = all.clone();
        let gone = fewer.remove(n / 2).0;
        let before = Maglev::new(&all, m);
        let after = Maglev::new(&fewer, m);
        let mut moved = 0usize;
        let mut collateral = 0usize;
        for slot in 0..m as u64 {
            let a = before.pick(slot, |_| false).map(|i| all[i].0);
            let b = after.pick(slot, |_| false).map(|i| fewer[i].0);
            if a != b {
                moved += 1;
                if a != Some(gone) {
                    collateral += 1;
                }
            }
        }
        println!(
            "maglev remap M={m} N={n}: moved {:.5} (ideal {:.5}; collateral {:.5})",
            moved as f64 / m as f64,
            1.0 / n as f64,
            collateral as f64 / m as f64,
        );
    }
}

criterion_group!(
    benches,
    remap_fractions,
    bench_least_conn,
    bench_maglev_pick,
    bench_round_robin,
    bench_least_conn_large,
    bench_round_robin_large,
    bench_maglev_build
);
criterion_main!(benches);
