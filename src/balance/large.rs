//! Picks in O(log n) for large pools: a heap instead of a scan.
//!
//! [`least_conn`](super::least_conn) and [`SmoothRoundRobin`](super::SmoothRoundRobin) look at
//! every backend on every pick: about 2.5 µs at 1,000 backends and ten times that at 10,000,
//! on the accept path. Past [`LINEAR_MAX`] backends the picker uses these instead:
//!
//! - [`LeastConnHeap`]: a min-heap of each backend's load ratio `(active + 1) / weight` as last
//!   seen. The counts are shared by every worker and change under it, so the heap is lazy: the
//!   top is read again before it is taken, and one that got busier goes back with its new load
//!   (a count that grew is always seen). A count that *fell* (a session ended) is seen at the
//!   next rebuild, which reads every count again: when the set changes, and at least every
//!   [`REBUILD_EVERY`]. So a pick is exact up to sessions that ended in the last 50 ms, which
//!   is the same staleness every worker already has about the others' picks in flight.
//! - [`DeadlineRoundRobin`]: weighted round-robin by earliest virtual deadline: backend `i`'s
//!   `k`-th turn is due at `(k - 1/2) / w_i` (the middle of its `k`-th share of the cycle),
//!   the earliest due goes next. Over any `sum(w)` picks from a fresh start each backend gets
//!   exactly `w_i` turns, evenly spread (weights 5, 1, 1 give `a a a b c a a`: nginx's smooth
//!   algorithm gives `a a b a c a a`, plain round-robin `a a a a a b c`). A backend skipped
//!   for a while does not catch up in a burst when it returns: its next turn is never earlier
//!   than the turn just taken. The state is per worker and rebuilt when the set changes, as
//!   the smooth round-robin's is.
//!
//! Both skip a backend the caller's closure refuses (down, drained, already tried, full)
//! without losing its place: it is set aside and put back after the pick. Ties go to a
//! per-worker order (a salted hash of the index), so workers deciding together do not all
//! take the same backend.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::Load;

/// Up to this many backends the linear algorithms are as fast or faster (a scan of a few
/// cache lines beats heap bookkeeping), and exact with no staleness at all.
pub const LINEAR_MAX: usize = 64;

/// The longest a least-conn heap goes without reading every count again.
pub const REBUILD_EVERY: Duration = Duration::from_millis(50);

/// `(a + 1) / w` as a fraction, compared exactly (u128 cross-multiplication, as
/// `least_conn` does), ties by a per-worker salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ratio {
    num: u64,
    den: u32,
    tie: u32,
    index: u32,
}

impl Ord for Ratio {
    fn cmp(&self, other: &Ratio) -> Ordering {
        let lhs = u128::from(self.num) * u128::from(other.den);
        let rhs = u128::from(other.num) * u128::from(self.den);
        // Reversed: BinaryHeap is a max-heap and the smallest ratio must come out first.
        rhs.cmp(&lhs)
            .then_with(|| other.tie.cmp(&self.tie))
            .then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Ratio) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A per-worker order among equals: a 32-bit mix of the index and the salt.
fn tie(index: usize, salt: u64) -> u32 {
    let mut x = (index as u64) ^ salt;
    x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    (x >> 32) as u32
}

fn ratio(index: usize, load: Load, salt: u64) -> Ratio {
    Ratio {
        num: load.active.saturating_add(1),
        den: load.weight,
        tie: tie(index, salt),
        index: index as u32,
    }
}

/// Weighted least-connections over a large pool in O(log n) a pick (see the module doc).
#[derive(Debug)]
pub struct LeastConnHeap {
    heap: BinaryHeap<Ratio>,
    /// Entries refused by the caller during one pick, put back after it.
    aside: Vec<Ratio>,
    /// The set the heap was built for (its generation) and when.
    built_for: Option<u64>,
    built_at: Instant,
    salt: u64,
}

impl LeastConnHeap {
    pub fn new(salt: u64) -> LeastConnHeap {
        LeastConnHeap {
            heap: BinaryHeap::new(),
            aside: Vec::new(),
            built_for: None,
            built_at: Instant::now(),
            salt,
        }
    }

    /// Rebuilds from every count: O(n).
    fn rebuild(&mut self, n: usize, generation: u64, now: Instant, load: &impl Fn(usize) -> Load) {
        let salt = self.salt;
        let entries: Vec<Ratio> = (0..n)
            .map(|i| (i, load(i)))
            .filter(|(_, l)| l.weight > 0)
            .map(|(i, l)| ratio(i, l, salt))
            .collect();
        self.heap = BinaryHeap::from(entries);
        self.built_for = Some(generation);
        self.built_at = now;
    }

    /// The backend with the least `(active + 1) / weight` among those `usable` accepts, as
    /// last seen (see the module doc); `None` if none is. `load(i)` reads backend `i`'s count
    /// and weight now; `generation` names the set (a new one rebuilds the heap). The caller
    /// then takes a slot on the backend: the heap counts it.
    pub fn pick(
        &mut self,
        n: usize,
        generation: u64,
        now: Instant,
        load: impl Fn(usize) -> Load,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.built_for != Some(generation)
            || now.saturating_duration_since(self.built_at) >= REBUILD_EVERY
        {
            self.rebuild(n, generation, now, &load);
        }
        let salt = self.salt;
        let mut picked = None;
        while let Some(top) = self.heap.pop() {
            let i = top.index as usize;
            if !usable(i) {
                self.aside.push(top);
                continue;
            }
            let seen = ratio(i, load(i), salt);
            if seen.den == 0 {
                continue; // weight 0: never picked; gone until the next rebuild.
            }
            // Busier than the heap thought (another worker's pick): back in, in its place.
            if seen < top {
                self.heap.push(seen);
                continue;
            }
            // The caller takes a slot: count it now, so the next pick sees it.
            let taken = Load {
                active: load(i).active.saturating_add(1),
                weight: seen.den,
            };
            self.heap.push(ratio(i, taken, salt));
            picked = Some(i);
            break;
        }
        self.heap.extend(self.aside.drain(..));
        picked
    }
}

/// A backend's next turn in [`DeadlineRoundRobin`]: due at `turn / (2 weight)`, `turn` odd
/// (`2k - 1` for the `k`-th turn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Turn {
    turn: u64,
    weight: u32,
    index: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Turn) -> Ordering {
        let lhs = u128::from(self.turn) * u128::from(other.weight);
        let rhs = u128::from(other.turn) * u128::from(self.weight);
        // Earliest deadline first; among equals the lower index, as the smooth algorithm.
        rhs.cmp(&lhs).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Turn) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Weighted round-robin by earliest virtual deadline, O(log n) a pick (see the module doc).
#[derive(Debug, Default)]
pub struct DeadlineRoundRobin {
    heap: BinaryHeap<Turn>,
    aside: Vec<Turn>,
    built_for: Option<u64>,
}

impl DeadlineRoundRobin {
    /// Starts the rotation afresh at the next pick.
    pub fn reset(&mut self) {
        self.built_for = None;
    }

    /// The next backend in the rotation among those `usable` accepts; `None` if none is.
    /// `weight(i)` is backend `i`'s weight (0: never); `generation` names the set, and a new
    /// one starts the rotation afresh with the new weights.
    pub fn pick(
        &mut self,
        n: usize,
        generation: u64,
        weight: impl Fn(usize) -> u32,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.built_for != Some(generation) {
            let turns: Vec<Turn> = (0..n)
                .map(|i| (i, weight(i)))
                .filter(|&(_, w)| w > 0)
                .map(|(i, w)| Turn {
                    turn: 1,
                    weight: w,
                    index: i as u32,
                })
                .collect();
            self.heap = BinaryHeap::from(turns);
            self.built_for = Some(generation);
        }
        let mut picked = None;
        while let Some(top) = self.heap.pop() {
            if usable(top.index as usize) {
                self.heap.push(Turn {
                    turn: top.turn.saturating_add(2),
                    ..top
                });
                picked = Some(top);
                break;
            }
            self.aside.push(top);
        }
        // Skipped backends keep their place but gain none: a turn that fell due before the
        // one just taken moves up to it (the next odd numerator at or after it).
        for mut t in self.aside.drain(..) {
            if let Some(p) = picked
                && t > p
            {
                let due = u128::from(p.turn) * u128::from(t.weight);
                let turn = due.div_ceil(u128::from(p.weight));
                let odd = turn | 1;
                t.turn = u64::try_from(odd).unwrap_or(u64::MAX);
            }
            self.heap.push(t);
        }
        picked.map(|t| t.index as usize)
    }
}

#[cfg(test)]
mod tests;
