//! Backend selection algorithms.
//!
//! The algorithms are pure: no I/O, no clocks, no global state, no
//! randomness of their own. Callers pass in what an algorithm needs (a flow
//! hash, a random scan start, per-backend health and load through closures),
//! so each algorithm is deterministic given its inputs, seedable by the
//! caller, and testable without sockets. Picks never allocate: they run once
//! per accepted connection. `Picker` is the one caller: it applies the
//! configured algorithm to a worker's backend set, and owns the worker's
//! round-robin rotation and the seed of least-conn's random scan start.
//!
//! * [`hash`]: a stable 64-bit hash (identical across processes, platforms
//!   and Rust versions) for source-IP affinity and for Maglev's address
//!   permutations. std's hashers are randomly keyed per process and would
//!   make two instances disagree.
//! * [`maglev`]: Maglev consistent hashing. Keeps a client on the same
//!   backend across instances and restarts and moves few clients when the
//!   backend set changes; a down backend's clients fall through to
//!   neighbouring slots without disturbing anyone else's.
//! * [`least_conn`](mod@least_conn): weighted least-connections, for workloads whose
//!   connections differ widely in lifetime or cost.
//! * [`round_robin`]: nginx's smooth weighted round-robin, the cheap
//!   default when connections are alike: exact weight proportions with no
//!   bursts.
//!
//! * [`rebalance`]: how many sessions each backend must shed after a scale-out (the
//!   weighted shares), and source-hash's rule (those whose client IP maps elsewhere).
//!
//! * `Picker`: the algorithm chosen by `--algorithm`, over one backend set.
//!
//! A backend that must not be picked (down, drained, already tried for this
//! client, or full) is excluded by the caller's closure, not by its weight:
//! holdfast's weights are at least 1 (slow start ramps from a floor of 1).
//! All three algorithms still treat a weight of 0 as "never pick", so no
//! input can make them divide by zero or favour a weightless backend.

pub mod hash;
pub mod large;
pub mod least_conn;
pub mod maglev;
mod picker;
pub mod rebalance;
pub mod round_robin;

pub use least_conn::{Load, least_conn};
pub use maglev::Maglev;
pub(crate) use picker::Picker;
pub use round_robin::SmoothRoundRobin;
