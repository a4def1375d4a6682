//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, "Maglev: A Fast
//! and Reliable Software Network Load Balancer", section 3.4).
//!
//! A lookup table of `M` slots (`M` prime) maps every slot to a backend.
//! Each backend owns a pseudo-random permutation of the slots, given by an
//! `offset` and a `skip` derived from a stable hash of its address; the
//! table is filled by letting backends take turns claiming their next
//! preferred slot that is still free. The result spreads slots almost
//! evenly and, when the backend set changes, moves only slightly more than
//! the unavoidable share of slots (near-minimal disruption).
//!
//! Two deliberate extensions over the paper:
//!
//! * **Weights.** Turns are not plain round-robin: backend `i` with weight
//!   `w_i` takes its `k`-th turn at virtual time `k / w_i` (k = 1, 2, ...),
//!   earliest first, ties broken by canonical position. By any time `T` it
//!   has claimed all its turns before `T` and possibly the one at `T`, so
//!   its count `c_i` satisfies `|c_i - T w_i| < 1`. Summing, the time `T`
//!   at which the last of the `M` slots is claimed satisfies
//!   `|M - T W| < N` (`W = sum(w)`), hence
//!   `|c_i - M w_i / W| < 1 + N w_i / W`: the share is proportional to the
//!   weight to within about one slot. This is the "credit" idea (each round
//!   a backend accrues `w_i` credit and places one entry per `max_weight`
//!   of credit) run in exact rational time, which avoids one O(N) pass per
//!   round when weights are skewed. The schedule repeats every `W` turns,
//!   so only one period (at most `M` turns) is ordered, with a heap. With
//!   all weights equal it is exactly the paper's round-robin.
//! * **Failure handling without rebuild.** [`Maglev::pick`] takes a `skip`
//!   predicate; a skipped backend's slot falls through to the next slot in
//!   the table. Slots owned by healthy backends are never looked past, so a
//!   backend going down (or being tried and refused for one client) moves
//!   only its own clients, spreads them over the others in proportion to
//!   the slots that follow (pseudo-random, so roughly evenly), and they come
//!   back when it recovers. Removing a backend from configuration instead
//!   rebuilds the table.
//!
//! One idea in one file, over 600 lines only with its tests (the code is
//! about 450).

use super::hash::hash_bytes;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;
use std::net::SocketAddr;

/// Table size the paper uses in production-like measurements; prime, and
/// large enough (> 65 × the backends of a big pool) that per-backend shares
/// are within a couple of percent of the ideal.
pub const DEFAULT_TABLE_SIZE: usize = 65537; // prime

/// Seeds for the two independent address hashes. Fixed forever: changing
/// either moves almost every client on upgrade.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_2d6f; // "maglev-o"
const SKIP_SEED: u64 = 0x6d61_676c_6576_2d73; // "maglev-s"

/// Marks a slot not yet claimed during population.
const EMPTY: u32 = u32::MAX;

/// Consistent-hash lookup table from a 64-bit flow hash to a backend index.
#[derive(Clone)]
pub struct Maglev {
    /// The configured table size `M` (kept even when the table is empty, so
    /// [`Maglev::size`] reports what the caller asked for).
    size: usize,
    /// `table[slot]` = index into the caller's `backends`. Empty when no
    /// backend has a non-zero weight.
    table: Vec<u32>,
    /// `cover[slot]` = the length of the shortest run of slots starting at
    /// `slot` (wrapping) that contains every backend present in the table.
    /// `pick` gives up after that many steps: if every backend in the run
    /// was skipped, every backend in the table is skipped. This bounds any
    /// walk to ~N ln N steps instead of M, without allocating a "seen" set
    /// on the hot path.
    cover: Vec<u32>,
    /// The backends that own at least one slot (caller indices, ascending):
    /// lets `pick` answer "is everything skipped?" in O(N) calls once a walk
    /// has grown long, instead of walking the whole `cover` run.
    present: Vec<u32>,
}

impl fmt::Debug for Maglev {
    // The table itself is 65537 entries; print only its shape.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.size)
            .field("backends", &self.present.len())
            .finish_non_exhaustive()
    }
}

/// A backend's position in its own slot permutation during population.
struct Cursor {
    /// The caller's index, stored in the table.
    index: u32,
    /// Next slot to try: `(offset + j * skip) % M` maintained incrementally
    /// so population never divides.
    pos: usize,
    skip: usize,
}

/// A backend's next turn: it claims its `k`-th slot at virtual time
/// `k / weight`. Ordered by that time, then by canonical position, so the
/// fill order depends only on the set of (address, weight) pairs.
#[derive(Clone, Copy)]
struct Turn {
    k: u64,
    weight: u32,
    canon: u32,
}

impl Turn {
    fn key(&self, other: &Turn) -> Ordering {
        // k1/w1 vs k2/w2 without division or floats; u128 because
        // k (<= M + 1) times a u32 weight can exceed u64 for huge M.
        let lhs = u128::from(self.k) * u128::from(other.weight);
        let rhs = u128::from(other.k) * u128::from(self.weight);
        lhs.cmp(&rhs).then(self.canon.cmp(&other.canon))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Turn) -> bool {
        self.key(other) == Ordering::Equal
    }
}
impl Eq for Turn {}
impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Turn) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Turn {
    fn cmp(&self, other: &Turn) -> Ordering {
        self.key(other)
    }
}

/// Stable identity bytes of a backend address: family tag, IP octets, port
/// (big-endian) and, for IPv6, the scope id (link-local addresses on
/// different interfaces are different backends). Raw bytes rather than
/// `to_string()` because `Display` formatting is not a stability promise
/// (IPv6 formatting has changed between Rust releases).
fn addr_key(addr: &SocketAddr, buf: &mut [u8; 23]) -> usize {
    match addr {
        SocketAddr::V4(a) => {
            buf[0] = 4;
            buf[1..5].copy_from_slice(&a.ip().octets());
            buf[5..7].copy_from_slice(&a.port().to_be_bytes());
            7
        }
        SocketAddr::V6(a) => {
            buf[0] = 6;
            buf[1..17].copy_from_slice(&a.ip().octets());
            buf[17..19].copy_from_slice(&a.port().to_be_bytes());
            buf[19..23].copy_from_slice(&a.scope_id().to_be_bytes());
            23
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    // `d <= n / d` rather than `d * d <= n`: no overflow near usize::MAX.
    while d <= n / d {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

impl Maglev {
    /// Builds the lookup table.
    ///
    /// `backends[i] = (address, weight)`; weight 0 means "not in the table"
    /// (holdfast's configured weights are 1..=256; a down or drained backend
    /// stays in the table and is skipped by [`Maglev::pick`]). `size` must be prime and larger than the number of
    /// backends (checked by `debug_assert`; in release a non-prime size still
    /// terminates, see below, but spreads worse). The table maps every slot
    /// to an index `i` into `backends`.
    ///
    /// Order independence: the mapping from a hash to an *address* depends
    /// only on the set of (address, weight) pairs, never on the order of
    /// `backends` and never on the process. Offsets and skips come from
    /// [`hash_bytes`] of the address bytes with two fixed seeds, and
    /// population runs in a canonical order (sorted by address, then weight)
    /// before mapping back to the caller's indices.
    ///
    /// Weights: a backend's share of slots is `weight / sum(weights)` to
    /// within about one slot (see the module docs for the turn schedule).
    ///
    /// Cost: O(M log M) expected slot probes plus O(min(sum(w), M) log N)
    /// heap work, and O(M + N) memory; no O(M * N) permutation table is
    /// materialised.
    pub fn new(backends: &[(SocketAddr, u32)], size: usize) -> Maglev {
        debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
        debug_assert!(
            size > backends.len(),
            "Maglev table size {size} must exceed the {} backends",
            backends.len()
        );
        let empty = Maglev {
            size,
            table: Vec::new(),
            cover: Vec::new(),
            present: Vec::new(),
        };
        if size == 0 {
            return empty;
        }

        // Canonical order: by address, then weight, so that duplicates (same
        // address listed twice) are ordered by content, not position.
        // Indices that don't fit the u32 table entries (never in practice)
        // and zero weights are left out.
        let mut live: Vec<(SocketAddr, u32, u32)> = backends
            .iter()
            .enumerate()
            .filter(|(_, (_, w))| *w > 0)
            .filter_map(|(i, &(a, w))| {
                u32::try_from(i)
                    .ok()
                    .filter(|&i| i != EMPTY)
                    .map(|i| (a, w, i))
            })
            .collect();
        if live.is_empty() {
            return empty;
        }
        live.sort_unstable_by_key(|x| (x.0, x.1));

        let m = size;
        let mut buf = [0u8; 23];
        let mut cursors: Vec<Cursor> = live
            .iter()
            .map(|&(addr, _, index)| {
                let len = addr_key(&addr, &mut buf);
                let key = &buf[..len];
                // usize <-> u64 conversions below are lossless on 64-bit
                // targets; on 32-bit the modulus keeps values < m anyway.
                let offset = (hash_bytes(OFFSET_SEED, key) % m as u64) as usize;
                let mut skip = if m > 1 {
                    (hash_bytes(SKIP_SEED, key) % (m as u64 - 1)) as usize + 1
                } else {
                    1
                };
                // For prime m every skip in 1..m is coprime and this never
                // loops. For a non-prime m (a caller bug caught only by the
                // debug_assert) it guarantees each permutation still visits
                // every slot, so population below always terminates.
                while m > 1 && gcd(skip, m) != 1 {
                    skip = skip % (m - 1) + 1;
                }
                Cursor {
                    index,
                    pos: offset,
                    skip,
                }
            })
            .collect();

        // The turn schedule is periodic: in every unit of virtual time
        // (e, e + 1] backend i takes its turns at e + j / w_i for
        // j = 1..=w_i, so the order of turns within a unit is the same in
        // every unit. Generate one period (W = sum of weights turns, or just
        // the first M if W is larger) with a heap, then cycle it: heap work
        // is O(min(W, M) log N) and, for equal weights, only O(N log N).
        // `live.len()` < 2^32 and weights < 2^32, so the u64 sum can't
        // overflow.
        let total: u64 = live.iter().map(|l| u64::from(l.1)).sum();
        let period_len = usize::try_from(total).map_or(m, |t| t.min(m));
        let mut heap: BinaryHeap<Reverse<Turn>> = live
            .iter()
            .enumerate()
            .map(|(canon, &(_, weight, _))| {
                Reverse(Turn {
                    k: 1,
                    weight,
                    // `live.len()` <= number of u32-indexable backends.
                    canon: canon as u32,
                })
            })
            .collect();
        let mut period: Vec<u32> = Vec::with_capacity(period_len);
        while period.len() < period_len {
            let Some(mut top) = heap.peek_mut() else {
                break;
            };
            period.push(top.0.canon);
            // Schedule the next turn; dropping `top` sifts it into place
            // (one sift instead of a pop and a push).
            top.0.k += 1;
        }
        drop(heap);
        if period.is_empty() {
            return empty;
        }

        let mut table = vec![EMPTY; m];
        let mut filled = 0;
        'fill: loop {
            for &canon in &period {
                let cursor = &mut cursors[canon as usize];
                // Walk this backend's permutation to its next free slot.
                // Every permutation covers all m slots and at least one is
                // free, so this ends within m steps.
                loop {
                    let slot = cursor.pos;
                    cursor.pos += cursor.skip;
                    if cursor.pos >= m {
                        cursor.pos -= m;
                    }
                    if table[slot] == EMPTY {
                        table[slot] = cursor.index;
                        break;
                    }
                }
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }

        let (cover, present) = cover_runs(&table, backends.len());
        Maglev {
            size,
            table,
            cover,
            present,
        }
    }

    /// The table size `M` passed to [`Maglev::new`].
    pub fn size(&self) -> usize {
        self.size
    }

    /// True when no backend is in the table (none given, or all weight 0).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The backend index for `hash`: the slot `hash % size`; if
    /// `skip(index)` is true for that slot's backend (down, or already tried
    /// for this client), walks successive slots (wrapping) to the first
    /// entry whose backend is not skipped. `None` when the table is empty or
    /// every backend is skipped.
    ///
    /// `skip` must answer consistently during one call. The walk is exact
    /// but bounded, and never allocates:
    /// * `skip` is called at most once per run of equal entries;
    /// * the walk stops after `cover[slot]` steps, by which point every
    ///   distinct backend has been seen, so it is at most ~N ln N steps
    ///   (not M);
    /// * once the walk has taken N steps (N = backends in the table), it
    ///   asks `skip` about each of the N backends once and returns `None`
    ///   if all are skipped. That at most doubles the cost of a long walk
    ///   and makes the all-skipped case O(N) instead of O(N log N).
    pub fn pick(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        // `hash % m` < m fits usize.
        let start = (hash % m as u64) as usize;
        let first = self.table[start] as usize;
        if !skip(first) {
            return Some(first);
        }
        let limit = self.cover[start] as usize;
        let check_all_at = self.present.len();
        let mut last_skipped = first;
        let mut slot = start;
        for step in 1..limit {
            if step == check_all_at && self.present.iter().all(|&b| skip(b as usize)) {
                return None;
            }
            slot += 1;
            if slot == m {
                slot = 0;
            }
            let b = self.table[slot] as usize;
            // Runs of the same backend are common once N is small; don't
            // re-ask about the one just refused.
            if b == last_skipped {
                continue;
            }
            if !skip(b) {
                return Some(b);
            }
            last_skipped = b;
        }
        None
    }
}

/// For each slot, the length of the shortest wrapping run starting there
/// that contains every backend present in `table`; plus the list of those
/// backends. Classic two-pointer sliding window over the doubled table: the
/// right end only moves forward, so O(M + N) in total.
fn cover_runs(table: &[u32], n: usize) -> (Vec<u32>, Vec<u32>) {
    let m = table.len();
    let mut counts = vec![0u32; n];
    for &b in table {
        counts[b as usize] = 1;
    }
    // Indices < n came from u32 table entries, so the cast is lossless.
    let present: Vec<u32> = (0..n)
        .filter(|&i| counts[i] != 0)
        .map(|i| i as u32)
        .collect();
    let distinct = present.len();
    counts.fill(0);

    let mut cover = Vec::with_capacity(m);
    let mut seen = 0;
    // Window is [s, r) in doubled coordinates; r - s <= m always, because
    // the whole table contains every backend.
    let mut r = 0;
    for s in 0..m {
        while seen < distinct {
            let c = &mut counts[table[r % m] as usize];
            if *c == 0 {
                seen += 1;
            }
            *c += 1;
            r += 1;
        }
        // r - s <= m <= u32::MAX + 1 in any table addressable by u32
        // indices; the cap keeps the cast lossless for the full-wrap case.
        cover.push((r - s).min(u32::MAX as usize) as u32);
        let c = &mut counts[table[s] as usize];
        *c -= 1;
        if *c == 0 {
            seen -= 1;
        }
    }
    (cover, present)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), port))
    }

    fn pool(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0a00_0000 + i as u32);
                (SocketAddr::V4(SocketAddrV4::new(ip, 8080)), 1)
            })
            .collect()
    }

    /// Owner address of every slot.
    fn owners(t: &Maglev, backends: &[(SocketAddr, u32)]) -> Vec<SocketAddr> {
        t.table.iter().map(|&i| backends[i as usize].0).collect()
    }

    /// Reference pick: plain walk of at most M slots, no shortcuts.
    fn naive_pick(t: &Maglev, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        let m = t.table.len();
        if m == 0 {
            return None;
        }
        let start = (hash % m as u64) as usize;
        (0..m)
            .map(|k| t.table[(start + k) % m] as usize)
            .find(|&b| !skip(b))
    }

    /// Fraction of slots whose owner address differs.
    fn changed(a: &[SocketAddr], b: &[SocketAddr]) -> f64 {
        let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
        diff as f64 / a.len() as f64
    }

    #[test]
    fn every_slot_filled() {
        let b = pool(7);
        let t = Maglev::new(&b, 1009);
        assert_eq!(t.size(), 1009);
        assert_eq!(t.table.len(), 1009);
        assert!(t.table.iter().all(|&i| (i as usize) < b.len()));
        assert_eq!(t.present.len(), 7);
    }

    #[test]
    fn empty_and_zero_weight() {
        let t = Maglev::new(&[], 13);
        assert!(t.is_empty());
        assert_eq!(t.size(), 13);
        assert_eq!(t.pick(42, |_| false), None);

        let t = Maglev::new(&[(v4(1, 80), 0), (v4(2, 80), 0)], 13);
        assert!(t.is_empty());
        assert_eq!(t.pick(42, |_| false), None);

        // A zero-weight backend never appears.
        let t = Maglev::new(&[(v4(1, 80), 0), (v4(2, 80), 1)], 13);
        assert!(!t.is_empty());
        assert!(t.table.iter().all(|&i| i == 1));
    }

    #[test]
    fn all_skipped_is_none() {
        let b = pool(5);
        let t = Maglev::new(&b, 1009);
        for h in 0..2000u64 {
            assert_eq!(t.pick(h, |_| true), None);
        }
        // Every backend but one skipped: always that one.
        for h in 0..2000u64 {
            assert_eq!(t.pick(h, |i| i != 3), Some(3));
        }
        // Long walks (past the N-step all-skipped check) still find the
        // same backend as a plain walk.
        let b = pool(50);
        let t = Maglev::new(&b, 1009);
        for alive in [0usize, 17, 49] {
            for h in 0..1009u64 {
                let skip = |i: usize| i != alive;
                assert_eq!(t.pick(h, skip), naive_pick(&t, h, skip));
                assert_eq!(t.pick(h, skip), Some(alive));
            }
        }
    }

    #[test]
    fn cover_runs_are_minimal() {
        let b = pool(6);
        let t = Maglev::new(&b, 101);
        let m = t.table.len();
        for s in 0..m {
            let run = |len: usize| {
                (0..len)
                    .map(|k| t.table[(s + k) % m])
                    .collect::<BTreeSet<_>>()
                    .len()
            };
            let c = t.cover[s] as usize;
            assert_eq!(run(c), 6, "slot {s}");
            assert!(run(c - 1) < 6, "slot {s} not minimal");
        }
    }

    // Pins the table for a small fixed input: the mapping must be the same in
    // every process and every release, or instances disagree after upgrade.
    // Cross-checked against an independent Python implementation.
    #[test]
    fn known_answer_table() {
        let b = [(v4(1, 80), 1), (v4(2, 80), 2), (v4(3, 81), 1)];
        let t = Maglev::new(&b, 13);
        let got: Vec<u32> = t.table.clone();
        assert_eq!(got, KAT_TABLE);
    }
    const KAT_TABLE: [u32; 13] = [1, 0, 1, 1, 0, 1, 1, 2, 1, 1, 0, 2, 2];

    #[test]
    fn order_independent_fixed() {
        let b = pool(20);
        let mut r = b.clone();
        r.reverse();
        let t1 = Maglev::new(&b, 65537);
        let t2 = Maglev::new(&r, 65537);
        assert_eq!(owners(&t1, &b), owners(&t2, &r));
    }

    #[test]
    fn ipv6_and_scope_are_identities() {
        let a = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 80, 0, 0));
        let b = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 80, 0, 1));
        let c = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 81, 0, 0));
        let backends = [(a, 1), (b, 1), (c, 1)];
        let t = Maglev::new(&backends, 1009);
        assert_eq!(t.present.len(), 3);
        let mut k1 = [0u8; 23];
        let mut k2 = [0u8; 23];
        let l1 = addr_key(&a, &mut k1);
        let l2 = addr_key(&b, &mut k2);
        assert_ne!(k1[..l1], k2[..l2]);
    }

    #[test]
    fn weights_1_and_3() {
        let b = [(v4(1, 80), 1), (v4(2, 80), 3)];
        let t = Maglev::new(&b, DEFAULT_TABLE_SIZE);
        let n1 = t.table.iter().filter(|&&i| i == 0).count();
        let n3 = t.table.iter().filter(|&&i| i == 1).count();
        assert_eq!(n1 + n3, DEFAULT_TABLE_SIZE);
        let share = n1 as f64 / DEFAULT_TABLE_SIZE as f64;
        assert!((share - 0.25).abs() < 0.001, "share of weight 1 = {share}");
        // Exact up to one slot (see the turn schedule).
        assert!((n1 as f64 - DEFAULT_TABLE_SIZE as f64 / 4.0).abs() <= 1.0);
    }

    #[test]
    fn equal_weights_are_balanced() {
        let b = pool(100);
        let t = Maglev::new(&b, DEFAULT_TABLE_SIZE);
        let mut counts = vec![0usize; b.len()];
        for &i in &t.table {
            counts[i as usize] += 1;
        }
        // Round-robin turns give each backend floor(M/N) or one more.
        let lo = DEFAULT_TABLE_SIZE / 100;
        assert!(counts.iter().all(|&c| c == lo || c == lo + 1), "{counts:?}");
    }

    #[test]
    fn skipped_clients_return() {
        let b = pool(10);
        let t = Maglev::new(&b, 1009);
        let before: Vec<_> = (0..5000u64).map(|h| t.pick(h, |_| false)).collect();
        let during: Vec<_> = (0..5000u64).map(|h| t.pick(h, |i| i == 4)).collect();
        let after: Vec<_> = (0..5000u64).map(|h| t.pick(h, |_| false)).collect();
        assert_eq!(before, after);
        for (x, y) in before.iter().zip(&during) {
            if *x != Some(4) {
                assert_eq!(x, y);
            } else {
                assert_ne!(*y, Some(4));
                assert!(y.is_some());
            }
        }
    }

    /// Removing one of N equal backends from the list and rebuilding. The
    /// removed backend's ~1/N of slots must move; Maglev also moves a few
    /// others (it is near-minimal, not minimal). Measured with M = 65537
    /// (this test's pool, all weights 1): N = 10 moved 0.1023 of the slots
    /// (ideal 0.1000), N = 100 moved 0.0160 (ideal 0.0100). The bench's
    /// remap report covers N = 1000.
    #[test]
    fn removal_disruption_near_one_over_n() {
        for &n in &[10usize, 100] {
            let b = pool(n);
            let t = Maglev::new(&b, DEFAULT_TABLE_SIZE);
            let before = owners(&t, &b);
            // Remove a backend from the middle of the list.
            let mut fewer = b.clone();
            fewer.remove(n / 2);
            let t2 = Maglev::new(&fewer, DEFAULT_TABLE_SIZE);
            let after = owners(&t2, &fewer);
            let frac = changed(&before, &after);
            let ideal = 1.0 / n as f64;
            assert!(frac >= ideal * 0.99, "n={n} frac={frac}");
            assert!(frac < ideal + 0.01, "n={n} frac={frac}");
        }
    }

    /// Random distinct IPv4 backends with weights 1..=4.
    fn backends_strategy(max: usize) -> impl Strategy<Value = Vec<(SocketAddr, u32)>> {
        proptest::collection::btree_map((any::<u32>(), 1u16..4), 1u32..=4, 1..max).prop_map(
            |m: BTreeMap<(u32, u16), u32>| {
                m.into_iter()
                    .map(|((ip, port), w)| {
                        (
                            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)),
                            w,
                        )
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_order_independent(
            (orig, shuffled) in backends_strategy(30)
                .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle()))
        ) {
            let a = Maglev::new(&orig, 1009);
            let b = Maglev::new(&shuffled, 1009);
            prop_assert_eq!(owners(&a, &orig), owners(&b, &shuffled));
        }

        #[test]
        fn prop_weighted_shares(backends in backends_strategy(40)) {
            let m = 4099;
            let t = Maglev::new(&backends, m);
            let n = backends.len() as f64;
            let total: f64 = backends.iter().map(|b| f64::from(b.1)).sum();
            let mut counts = vec![0usize; backends.len()];
            for &i in &t.table {
                counts[i as usize] += 1;
            }
            for (i, &(_, w)) in backends.iter().enumerate() {
                let ideal = m as f64 * f64::from(w) / total;
                // |count - ideal| < 1 + N * w / W (derivation in module docs:
                // within one slot of floor(T * w), T within N/W of M/W).
                let bound = 1.0 + n * f64::from(w) / total;
                prop_assert!((counts[i] as f64 - ideal).abs() < bound,
                    "backend {} weight {} got {} ideal {}", i, w, counts[i], ideal);
            }
        }

        #[test]
        fn prop_skip_only_moves_skipped(
            (backends, mask) in backends_strategy(25).prop_flat_map(|v| {
                let n = v.len();
                (Just(v), proptest::collection::vec(any::<bool>(), n))
            })
        ) {
            let m = 1009;
            let t = Maglev::new(&backends, m);
            let skip = |i: usize| mask[i];
            let all_skipped = mask.iter().all(|&s| s);
            for h in 0..m as u64 {
                let owner = t.pick(h, |_| false).expect("non-empty table");
                prop_assert_eq!(owner, t.table[h as usize] as usize);
                let got = t.pick(h, skip);
                prop_assert_eq!(got, naive_pick(&t, h, skip));
                if !mask[owner] {
                    // Non-skipped owners never lose their clients.
                    prop_assert_eq!(got, Some(owner));
                } else if all_skipped {
                    prop_assert_eq!(got, None);
                } else {
                    let g = got.expect("some backend is not skipped");
                    prop_assert!(!mask[g]);
                }
                // Unskipping restores the owner.
                prop_assert_eq!(t.pick(h, |_| false), Some(owner));
            }
        }

        #[test]
        fn prop_removal_moves_removed_and_little_else(backends in backends_strategy(30), which in any::<prop::sample::Index>()) {
            let m = 4099;
            let t = Maglev::new(&backends, m);
            let before = owners(&t, &backends);
            let mut fewer = backends.clone();
            let gone = fewer.remove(which.index(backends.len()));
            let t2 = Maglev::new(&fewer, m);
            if fewer.is_empty() {
                prop_assert!(t2.is_empty());
                return Ok(());
            }
            let after = owners(&t2, &fewer);
            // Collateral moves (slots of surviving backends changing owner)
            // stay small. Over 2000 random cases (N < 30, weights 1..=4,
            // M = 4099) the worst seen was 7% of M; a rebuild that lost
            // consistency would move ~(1 - 1/N) of the slots instead.
            let collateral = before
                .iter()
                .zip(&after)
                .filter(|(x, y)| **x != gone.0 && x != y)
                .count();
            prop_assert!((collateral as f64) < 0.12 * m as f64, "collateral {}", collateral);
            // Every slot the removed backend owned must move.
            for (x, y) in before.iter().zip(&after) {
                if *x == gone.0 {
                    prop_assert_ne!(x, y);
                }
            }
        }
    }
}
