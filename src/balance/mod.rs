//! Backend selection algorithms.
//!
//! Everything here is pure: no I/O, no clocks, no global state, no
//! randomness of its own. Callers pass in what an algorithm needs (a flow
//! hash, a random scan start, per-backend health and load through closures),
//! so each algorithm is deterministic given its inputs, seedable by the
//! caller, and testable without sockets. Picks never allocate: they run once
//! per accepted connection.
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
//! Across all three, a weight of 0 means "never pick" (draining).

pub mod hash;
pub mod least_conn;
pub mod maglev;
pub mod round_robin;

pub use least_conn::{Load, least_conn};
pub use maglev::Maglev;
pub use round_robin::SmoothRoundRobin;
