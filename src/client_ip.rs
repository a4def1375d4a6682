//! Per-client-IP policy: address ranges ([`Cidr`], [`AccessList`]) and per-IP limits
//! ([`IpLimits`]). Pure data structures, no I/O.
//!
//! These serve `--allow` / `--deny` (who is served at all), `--trusted-proxy` (who may send a
//! PROXY header), and `--max-conns-per-ip` / `--max-conn-rate-per-ip` / `--ipv6-prefix` (how
//! much one client may take). The module is public because [`Cidr`] and [`IpLimitsConfig`]
//! become part of the library's `Config`, and so that the benchmark in `benches/` can measure
//! the table. The workers check `--allow`/`--deny` and take a [`Ticket`] for each admitted
//! session from one shared [`IpLimits`] (worker 0 sweeps it every 5 s).
//!
//! # IPv4-mapped addresses
//!
//! A dual-stack listener (`[::]:443`) reports an IPv4 client as `::ffff:a.b.c.d`. That client
//! is the IPv4 client `a.b.c.d` everywhere here: [`Cidr::contains`] matches it against IPv4
//! ranges, and [`IpLimits`] counts it under the same key as `a.b.c.d` arriving on an IPv4
//! listener. IPv6 ranges match only real IPv6 clients: `--deny ::/0` blocks IPv6, not
//! everyone. A mapped range written with a prefix of 96 or more (`::ffff:10.0.0.0/104`) is
//! read as the IPv4 range it covers (`10.0.0.0/8`).
//!
//! # Per-IP limits
//!
//! [`IpLimits`] is one table shared by every worker (behind an `Arc`), because "live sessions
//! per client IP" is a count over all workers: the kernel spreads one client's connections over
//! every SO_REUSEPORT listener. It is split into [`SHARDS`] shards, each a `Mutex<HashMap>`,
//! chosen by a keyed hash of the client key, so two workers contend only when two clients
//! fall in the same shard at the same instant; a lock is held for one hash-map operation, once
//! per accepted connection and once per closed one, never per byte.
//!
//! - **Key**: the IPv4 address, or the IPv6 address masked to `--ipv6-prefix` bits (64 by
//!   default: one subscriber usually gets a whole /64, and limiting single addresses would let
//!   one host use 2^64 of them).
//! - **Live sessions**: [`IpLimits::try_open`] refuses when the key already holds `max_conns`
//!   sessions, otherwise counts one more and returns a [`Ticket`]; closing or dropping the
//!   ticket counts it back. Check and increment happen under the shard's lock, so concurrent
//!   opens never exceed the limit.
//! - **Rate**: a token bucket per key of `max_rate` tokens refilled at `max_rate` per second
//!   (a client may open `max_rate` connections at once, then `max_rate` a second). It is
//!   implemented as GCRA, one `u64` per key (the time the bucket will be full again), like the
//!   per-backend `--max-connect-rate`. A refused attempt takes no token.
//!
//! # Bounded memory
//!
//! An entry with no live session and a full bucket carries no information (a fresh entry would
//! behave exactly the same), so it is removed: at once when its last session closes with the
//! bucket full, otherwise by [`IpLimits::sweep`] (which the owner calls every few seconds) or
//! by the next insert into a full shard. An entry is 32 bytes of key and value plus a control
//! byte, in hash maps between 7/16 and 7/8 full: 38 to 75 bytes per client. Measured with
//! `benches/client_ip.rs` for 100k distinct clients: 5.3 to 7.7 MiB more resident memory
//! (56 to 80 bytes per client, allocator slack included), about 0.4 µs per new client, a
//! sweep of all 100k in 1 to 4 ms.
//!
//! The table holds at most `max_entries` keys (1,000,000 by default), enforced per shard
//! (`max_entries / SHARDS` each). When a new client's shard is full even after removing what
//! can be removed, the table **fails open**: the connection is served untracked (its
//! [`Ticket`] counts nothing and no limit applies to it) and [`IpLimits::untracked_total`]
//! counts it. A full table means on the order of a million distinct clients holding sessions
//! or recent connections at once; per-IP limits cannot stop such a crowd anyway (each member
//! is within its own quota), while refusing every newcomer would turn the limiter itself into
//! the outage, for legitimate clients first. Clients already in the table stay limited; the
//! global `--max-conns` still bounds the total. (HAProxy behaves alike: a stick table that is
//! full of entries in use does not track new sessions.)

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// An IPv4 or IPv6 address range: a network address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address: no bit set beyond the prefix. IPv4-mapped ranges with a prefix of
    /// 96 or more are stored as IPv4.
    network: IpAddr,
    prefix: u8,
}

/// Why a range could not be read; the message names the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("invalid address range '{0}': expected ADDRESS or ADDRESS/PREFIX")]
    Syntax(String),
    #[error("invalid address range '{input}': the prefix length must be 0..={max}")]
    Prefix { input: String, max: u8 },
    #[error(
        "invalid address range '{input}': bits are set past the prefix (the range is {network})"
    )]
    HostBits { input: String, network: Cidr },
}

impl Cidr {
    /// The range of `prefix` bits containing `ip` (bits past the prefix are cleared, unlike
    /// [`Cidr::from_str`], which rejects them). `None` if `prefix` is longer than the address.
    pub fn new(ip: IpAddr, prefix: u8) -> Option<Cidr> {
        let (ip, prefix) = match ip {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (ip, prefix),
            },
            _ => (ip, prefix),
        };
        let network = match ip {
            IpAddr::V4(v4) if prefix <= 32 => {
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_u32(prefix)))
            }
            IpAddr::V6(v6) if prefix <= 128 => {
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_u128(prefix)))
            }
            _ => return None,
        };
        Some(Cidr { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the range; an IPv4-mapped IPv6 `ip` is its IPv4 address (see the
    /// module doc).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_u32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_u128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// Whether any range of `ranges` contains `ip` (e.g. `--trusted-proxy`).
pub fn any_contains(ranges: &[Cidr], ip: IpAddr) -> bool {
    ranges.iter().any(|r| r.contains(ip))
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a plain address, which is the one-address range
/// (`/32`, `/128`). Bits set past the prefix (`10.0.0.1/8`) are an error rather than silently
/// cleared: such a range is usually a typo for another one, and in an allow or deny list the
/// difference is who gets in.
impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(input.to_string());
        let (addr, prefix) = match input.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (input, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        let range = Cidr::new(ip, prefix).ok_or_else(|| CidrError::Prefix {
            input: input.to_string(),
            max,
        })?;
        let unmasked = Cidr::new(ip, max).map(|c| c.network);
        if unmasked != Some(range.network) {
            return Err(CidrError::HostBits {
                input: input.to_string(),
                network: range,
            });
        }
        Ok(range)
    }
}

/// `network/prefix`, which [`Cidr::from_str`] reads back as the same range.
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `--allow` and `--deny`: with any `allow` range, only those clients are served; a `deny`
/// range wins over an `allow` one. Both empty: everyone is served. The lists are scanned in
/// order (they are expected to hold tens of ranges, not thousands).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessList {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl AccessList {
    /// Whether a client at `ip` may be served.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !any_contains(&self.deny, ip) && (self.allow.is_empty() || any_contains(&self.allow, ip))
    }
}

/// Number of shards of an [`IpLimits`] table.
pub const SHARDS: usize = 64;

/// Default of `--ipv6-prefix`.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// Default cap on the keys an [`IpLimits`] table holds.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// The settings of an [`IpLimits`] table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpLimitsConfig {
    /// Most live sessions per key, all workers together; 0 = unlimited.
    pub max_conns: u32,
    /// New connections per second per key (and the bucket size); 0 = unlimited.
    pub max_rate: u32,
    /// Bits of an IPv6 address that make the key, 0..=128.
    pub ipv6_prefix: u8,
    /// Most keys held (see the module doc for what happens beyond); at least 1.
    pub max_entries: usize,
}

impl Default for IpLimitsConfig {
    fn default() -> IpLimitsConfig {
        IpLimitsConfig {
            max_conns: 0,
            max_rate: 0,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// Why [`IpLimits::try_open`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The key already holds `max_conns` live sessions.
    TooManyConns,
    /// The key's token bucket is empty.
    RateLimited,
}

impl Refusal {
    /// A metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooManyConns => "max_conns_per_ip",
            Refusal::RateLimited => "max_conn_rate_per_ip",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-IP limiter table; see the module doc. Share it as `Arc<IpLimits>`.
pub struct IpLimits {
    max_conns: u32,
    /// GCRA emission interval in nanoseconds (1 s / max_rate); 0 = no rate limit.
    interval: u64,
    /// GCRA tolerance: how far ahead of now the bucket's "full again" time may be and still
    /// admit, `(max_rate - 1) × interval`.
    tolerance: u64,
    ipv6_mask: u128,
    shard_cap: usize,
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Times are kept as nanoseconds since this instant.
    epoch: Instant,
    untracked: AtomicU64,
}

/// One shard, on a cache line of its own so that two workers locking neighbouring shards do
/// not slow each other down.
#[repr(align(64))]
struct Shard(Mutex<ShardMap>);

struct ShardMap {
    map: HashMap<u128, Entry>,
    /// No entry without live sessions can be removed before this time (a lower bound kept
    /// up to date on every change, made exact by each sweep): an insert into a full shard
    /// sweeps only when a sweep can free something, so a shard full of busy clients costs
    /// no scan per new client.
    next_idle: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// GCRA: when the bucket is full again (nanoseconds since the epoch); 0 without a rate.
    full_at: u64,
    /// Live sessions (0 when `max_conns` is 0: nothing is counted then).
    live: u32,
}

impl Entry {
    fn idle(&self, now: u64) -> bool {
        self.live == 0 && self.full_at <= now
    }
}

impl IpLimits {
    /// A table for `config`, or a one-line reason it is invalid.
    pub fn new(config: IpLimitsConfig) -> Result<Arc<IpLimits>, String> {
        if config.ipv6_prefix > 128 {
            return Err(format!(
                "invalid IPv6 prefix length {}: expected 0..=128",
                config.ipv6_prefix
            ));
        }
        if config.max_entries == 0 {
            return Err("the per-IP table needs room for at least one entry".into());
        }
        let interval = match config.max_rate {
            0 => 0,
            rate => (1_000_000_000 / u64::from(rate)).max(1),
        };
        let shards = (0..SHARDS)
            .map(|_| {
                Shard(Mutex::new(ShardMap {
                    map: HashMap::new(),
                    next_idle: u64::MAX,
                }))
            })
            .collect();
        Ok(Arc::new(IpLimits {
            max_conns: config.max_conns,
            interval,
            tolerance: u64::from(config.max_rate.saturating_sub(1)) * interval,
            ipv6_mask: mask_u128(config.ipv6_prefix),
            shard_cap: config.max_entries.div_ceil(SHARDS),
            shards,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            untracked: AtomicU64::new(0),
        }))
    }

    /// Admits a new connection from `ip` at `now`, or says why not. The returned [`Ticket`]
    /// holds the session's place until it is closed or dropped.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        if self.max_conns == 0 && self.interval == 0 {
            return Ok(Ticket { held: None });
        }
        let key = self.key(ip);
        let now = self.nanos(now);
        let mut guard = self.lock(key);
        let shard: &mut ShardMap = &mut guard;
        let count = self.max_conns > 0;
        if let Some(entry) = shard.map.get_mut(&key) {
            if count && entry.live >= self.max_conns {
                return Err(Refusal::TooManyConns);
            }
            entry.full_at = self.admit(entry.full_at, now).ok_or(Refusal::RateLimited)?;
            if count {
                entry.live += 1;
            } else {
                shard.next_idle = shard.next_idle.min(entry.full_at);
            }
        } else {
            if shard.map.len() >= self.shard_cap {
                if now >= shard.next_idle {
                    shard.sweep(now);
                }
                if shard.map.len() >= self.shard_cap {
                    self.untracked.fetch_add(1, Ordering::Relaxed);
                    return Ok(Ticket { held: None });
                }
            }
            // A new key's bucket is full: admission cannot fail.
            let full_at = self.admit(0, now).unwrap_or(now);
            shard.map.insert(
                key,
                Entry {
                    full_at,
                    live: u32::from(count),
                },
            );
            if !count {
                shard.next_idle = shard.next_idle.min(full_at);
            }
        }
        Ok(Ticket {
            held: count.then(|| (Arc::clone(self), key)),
        })
    }

    /// Removes every entry that carries no information any more (no live session, bucket
    /// full); returns how many. Call it every few seconds to give memory back sooner; the
    /// table stays within its cap without it.
    pub fn sweep(&self, now: Instant) -> usize {
        let now = self.nanos(now);
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
                if now >= shard.next_idle {
                    shard.sweep(now)
                } else {
                    0
                }
            })
            .sum()
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live sessions counted for `ip`'s key (0 when `max_conns` is 0).
    pub fn live(&self, ip: IpAddr) -> u32 {
        let key = self.key(ip);
        self.lock(key).map.get(&key).map_or(0, |e| e.live)
    }

    /// Connections served untracked because the table was full.
    pub fn untracked_total(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    /// The key of a client: IPv4 (mapped or not) as `::ffff:a.b.c.d`, IPv6 masked to the
    /// prefix. The two never collide: the top 80 bits of a mapped key are zero and the next 16
    /// are ones, and a real IPv6 address in that range is an IPv4 client.
    fn key(&self, ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6) & self.ipv6_mask,
        }
    }

    fn lock(&self, key: u128) -> MutexGuard<'_, ShardMap> {
        // SipHash with a per-process key: clients choose their addresses, so a predictable
        // hash would let them crowd one shard.
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// GCRA: the bucket's new "full again" time if a token is available at `now`.
    fn admit(&self, full_at: u64, now: u64) -> Option<u64> {
        if self.interval == 0 {
            return Some(0);
        }
        let start = full_at.max(now);
        (start - now <= self.tolerance).then(|| start.saturating_add(self.interval))
    }

    fn release(&self, key: u128, now: u64) {
        let mut shard = self.lock(key);
        let Some(entry) = shard.map.get_mut(&key) else {
            // Entries with live sessions are never removed, so this cannot happen; if it did,
            // there is nothing left to count back.
            debug_assert!(false, "released a key the table does not hold");
            return;
        };
        debug_assert!(entry.live > 0);
        entry.live = entry.live.saturating_sub(1);
        let entry = *entry;
        if entry.idle(now) {
            shard.map.remove(&key);
        } else if entry.live == 0 {
            shard.next_idle = shard.next_idle.min(entry.full_at);
        }
    }
}

impl ShardMap {
    fn sweep(&mut self, now: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| !e.idle(now));
        self.next_idle = self
            .map
            .values()
            .filter(|e| e.live == 0)
            .map(|e| e.full_at)
            .min()
            .unwrap_or(u64::MAX);
        // Give memory back after a burst of clients has gone, without reallocating at every
        // small change.
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to(2 * self.map.len());
        }
        before - self.map.len()
    }
}

/// One admitted session's place in an [`IpLimits`] table: closing or dropping it counts the
/// session out. A ticket from a table without `max_conns`, or served untracked because the
/// table was full, counts nothing.
#[must_use = "dropping the ticket ends the session's count at once"]
pub struct Ticket {
    held: Option<(Arc<IpLimits>, u128)>,
}

impl Ticket {
    /// Whether this ticket counts a live session.
    pub fn is_tracked(&self) -> bool {
        self.held.is_some()
    }

    /// Counts the session out at `now` (dropping the ticket does the same with the current
    /// time).
    pub fn close(mut self, now: Instant) {
        if let Some((table, key)) = self.held.take() {
            table.release(key, table.nanos(now));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((table, key)) = self.held.take() {
            table.release(key, table.nanos(Instant::now()));
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("tracked", &self.is_tracked())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("test range")
    }

    fn limits(max_conns: u32, max_rate: u32) -> Arc<IpLimits> {
        IpLimits::new(IpLimitsConfig {
            max_conns,
            max_rate,
            ..IpLimitsConfig::default()
        })
        .expect("valid config")
    }

    #[test]
    fn cidr_parses_ranges_and_plain_addresses() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::ffff:0:0/96").to_string(), "0.0.0.0/0");
    }

    #[test]
    fn cidr_rejects_bad_input_with_a_one_line_reason() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "/8",
            "[::1]/128",
            "10.0.0.0/8/8",
            "10.0.0.0/0008",
            "host.example/32",
        ] {
            let err = bad.parse::<Cidr>().expect_err(bad);
            assert!(matches!(err, CidrError::Syntax(_)), "{bad}: {err}");
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string(),
            "invalid address range '10.0.0.0/33': the prefix length must be 0..=32"
        );
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap_err().to_string(),
            "invalid address range '10.1.2.3/8': bits are set past the prefix (the range is \
             10.0.0.0/8)"
        );
        assert!(matches!(
            "2001:db8::1/64".parse::<Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
    }

    #[test]
    fn cidr_new_clears_host_bits() {
        let c = Cidr::new(ip("10.1.2.3"), 8).unwrap();
        assert_eq!((c.network(), c.prefix_len()), (ip("10.0.0.0"), 8));
        assert_eq!(Cidr::new(ip("10.1.2.3"), 33), None);
        assert_eq!(
            Cidr::new(ip("::ffff:10.1.2.3"), 120),
            Some(cidr("10.1.2.0/24"))
        );
    }

    #[test]
    fn cidr_contains_treats_mapped_addresses_as_ipv4() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.255.0.1")));
        assert!(net.contains(ip("::ffff:10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("::a00:1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        // IPv6 ranges match IPv6 clients only, even the widest one.
        assert!(!cidr("::/0").contains(ip("::ffff:10.0.0.1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("::ffff:1.2.3.4")));
        assert!(cidr("1.2.3.4").contains(ip("1.2.3.4")));
        assert!(!cidr("1.2.3.4").contains(ip("1.2.3.5")));
    }

    #[test]
    fn access_list_deny_wins_and_allow_restricts() {
        let open = AccessList::default();
        assert!(open.permits(ip("192.0.2.1")));
        let list = AccessList {
            allow: vec![cidr("10.0.0.0/8"), cidr("2001:db8::/32")],
            deny: vec![cidr("10.66.0.0/16")],
        };
        assert!(list.permits(ip("10.1.1.1")));
        assert!(list.permits(ip("::ffff:10.1.1.1")));
        assert!(list.permits(ip("2001:db8::5")));
        assert!(!list.permits(ip("10.66.1.1")));
        assert!(!list.permits(ip("192.0.2.1")));
        let deny_only = AccessList {
            allow: vec![],
            deny: vec![cidr("192.0.2.0/24")],
        };
        assert!(!deny_only.permits(ip("192.0.2.9")));
        assert!(deny_only.permits(ip("198.51.100.1")));
    }

    #[test]
    fn live_sessions_are_capped_per_ip_and_counted_back() {
        let table = limits(2, 0);
        let t0 = Instant::now();
        let a = table.try_open(ip("192.0.2.1"), t0).unwrap();
        let b = table.try_open(ip("::ffff:192.0.2.1"), t0).unwrap();
        assert_eq!(
            table.try_open(ip("192.0.2.1"), t0).unwrap_err(),
            Refusal::TooManyConns
        );
        // Another client is not affected.
        let other = table.try_open(ip("192.0.2.2"), t0).unwrap();
        assert_eq!(table.live(ip("192.0.2.1")), 2);
        a.close(t0);
        let c = table.try_open(ip("192.0.2.1"), t0).unwrap();
        drop(b);
        drop(c);
        drop(other);
        // Without a rate, an entry goes as soon as its last session does.
        assert!(table.is_empty());
    }

    #[test]
    fn ipv6_clients_are_limited_per_prefix() {
        let table = limits(1, 0);
        let t0 = Instant::now();
        let _a = table.try_open(ip("2001:db8:1:2::1"), t0).unwrap();
        assert_eq!(
            table.try_open(ip("2001:db8:1:2:ffff::9"), t0).unwrap_err(),
            Refusal::TooManyConns
        );
        let _b = table.try_open(ip("2001:db8:1:3::1"), t0).unwrap();

        let per_address = IpLimits::new(IpLimitsConfig {
            max_conns: 1,
            ipv6_prefix: 128,
            ..IpLimitsConfig::default()
        })
        .unwrap();
        let _c = per_address.try_open(ip("2001:db8::1"), t0).unwrap();
        let _d = per_address.try_open(ip("2001:db8::2"), t0).unwrap();
    }

    #[test]
    fn the_rate_is_a_bucket_of_one_second() {
        let table = limits(0, 5);
        let t0 = Instant::now();
        let client = ip("198.51.100.1");
        for _ in 0..5 {
            assert!(!table.try_open(client, t0).unwrap().is_tracked());
        }
        assert_eq!(
            table.try_open(client, t0).unwrap_err(),
            Refusal::RateLimited
        );
        assert!(table.try_open(ip("198.51.100.2"), t0).is_ok());
        // One token every 200 ms.
        let t1 = t0 + Duration::from_millis(200);
        assert!(table.try_open(client, t1).is_ok());
        assert_eq!(
            table.try_open(client, t1).unwrap_err(),
            Refusal::RateLimited
        );
        // A refusal takes no token; after a full second the bucket is full again.
        let t2 = t1 + Duration::from_secs(1);
        for _ in 0..5 {
            assert!(table.try_open(client, t2).is_ok());
        }
        assert_eq!(
            table.try_open(client, t2).unwrap_err(),
            Refusal::RateLimited
        );
        assert_eq!(table.len(), 2);
        assert_eq!(table.sweep(t2 + Duration::from_secs(1)), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn a_refused_connection_takes_neither_a_slot_nor_a_token() {
        let table = limits(1, 2);
        let t0 = Instant::now();
        let client = ip("203.0.113.1");
        let held = table.try_open(client, t0).unwrap();
        assert_eq!(
            table.try_open(client, t0).unwrap_err(),
            Refusal::TooManyConns
        );
        held.close(t0);
        let _again = table.try_open(client, t0).unwrap();
        assert_eq!(table.live(client), 1);
    }

    #[test]
    fn a_full_table_serves_new_clients_untracked_and_recovers() {
        // One entry per shard.
        let table = IpLimits::new(IpLimitsConfig {
            max_conns: 1,
            max_rate: 10,
            max_entries: SHARDS,
            ..IpLimitsConfig::default()
        })
        .unwrap();
        let t0 = Instant::now();
        let mut tickets = Vec::new();
        for i in 0..2000u32 {
            let t = table
                .try_open(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0)
                .unwrap();
            tickets.push(t);
        }
        assert_eq!(table.len(), SHARDS);
        let tracked = tickets.iter().filter(|t| t.is_tracked()).count();
        assert_eq!(tracked, SHARDS);
        assert_eq!(table.untracked_total(), 2000 - SHARDS as u64);
        // A tracked client is still limited.
        let limited = (0..2000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
            .find(|&a| table.live(a) == 1)
            .unwrap();
        assert_eq!(
            table.try_open(limited, t0).unwrap_err(),
            Refusal::TooManyConns
        );
        // Once the sessions end and the buckets refill, the room is found again on insert.
        let t1 = t0 + Duration::from_secs(1);
        for t in tickets.drain(..) {
            t.close(t0);
        }
        assert_eq!(table.len(), SHARDS);
        let fresh = table.try_open(ip("192.0.2.200"), t1).unwrap();
        assert!(fresh.is_tracked());
        assert_eq!(table.untracked_total(), 2000 - SHARDS as u64);
    }

    #[test]
    fn an_unlimited_table_holds_nothing() {
        let table = limits(0, 0);
        let t = table.try_open(ip("192.0.2.1"), Instant::now()).unwrap();
        assert!(!t.is_tracked());
        assert!(table.is_empty());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad_prefix = IpLimitsConfig {
            ipv6_prefix: 129,
            ..IpLimitsConfig::default()
        };
        assert!(IpLimits::new(bad_prefix).is_err());
        let no_room = IpLimitsConfig {
            max_entries: 0,
            ..IpLimitsConfig::default()
        };
        assert!(IpLimits::new(no_room).is_err());
    }

    #[test]
    fn concurrent_opens_never_exceed_the_limit() {
        const LIMIT: u32 = 3;
        let table = limits(LIMIT, 0);
        let held = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (table, held, most) =
                    (Arc::clone(&table), Arc::clone(&held), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        if let Ok(ticket) = table.try_open(ip("192.0.2.7"), Instant::now()) {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(ticket);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker thread");
        }
        assert!(most.load(Ordering::SeqCst) <= LIMIT);
        assert!(most.load(Ordering::SeqCst) >= 1);
        assert!(table.is_empty());
    }

    fn cidr_strategy() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Cidr::new(IpAddr::V4(a.into()), p).unwrap()),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, p)| Cidr::new(IpAddr::V6(a.into()), p).unwrap()),
        ]
    }

    #[derive(Clone, Debug)]
    enum Op {
        Open {
            client: usize,
            after_ms: u64,
        },
        Close {
            which: prop::sample::Index,
            after_ms: u64,
        },
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..4, 0u64..400).prop_map(|(client, after_ms)| Op::Open { client, after_ms }),
            (any::<prop::sample::Index>(), 0u64..400)
                .prop_map(|(which, after_ms)| Op::Close { which, after_ms }),
        ]
    }

    proptest! {
        #[test]
        fn cidr_display_round_trips(c in cidr_strategy()) {
            prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
            prop_assert!(c.contains(c.network()));
        }

        #[test]
        fn cidr_contains_agrees_with_masking(c in cidr_strategy(), a in any::<u128>()) {
            let probe = match c.network() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(a as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(a)),
            };
            let masked = Cidr::new(probe, c.prefix_len()).map(|m| m.network());
            // A probe in the mapped range is an IPv4 client and never in an IPv6 range.
            let mapped = matches!(probe, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
            prop_assert_eq!(c.contains(probe), !mapped && masked == Some(c.network()));
        }

        /// Arbitrary interleavings of opens and closes over four clients (two sharing a /64),
        /// checked against a model: live counts are exact, never above the limit, never below
        /// zero; the rate never refuses a client idle for a second; once everything is closed
        /// and a second has passed, a sweep leaves the table empty.
        #[test]
        fn counts_stay_within_limits_and_expire(
            max_conns in 0u32..4,
            max_rate in 0u32..6,
            ops in proptest::collection::vec(op_strategy(), 1..80),
        ) {
            let table = limits(max_conns, max_rate);
            let clients = [
                ip("192.0.2.1"),
                ip("::ffff:192.0.2.2"),
                ip("2001:db8::1"),
                ip("2001:db8::2"), // same /64 as the one before
            ];
            let key_of = |c: usize| c.min(2);
            let t0 = Instant::now();
            let mut now = t0;
            let mut open: Vec<(usize, Ticket)> = Vec::new();
            let mut last_admitted: [Option<Instant>; 3] = [None; 3];
            for op in ops {
                match op {
                    Op::Open { client, after_ms } => {
                        now += Duration::from_millis(after_ms);
                        let key = key_of(client);
                        let live = open.iter().filter(|(k, _)| *k == key).count() as u32;
                        match table.try_open(clients[client], now) {
                            Ok(ticket) => {
                                prop_assert!(max_conns == 0 || live < max_conns);
                                prop_assert_eq!(ticket.is_tracked(), max_conns > 0);
                                last_admitted[key] = Some(now);
                                open.push((key, ticket));
                            }
                            Err(Refusal::TooManyConns) => {
                                prop_assert!(max_conns > 0 && live == max_conns);
                            }
                            Err(Refusal::RateLimited) => {
                                prop_assert!(max_rate > 0);
                                let last = last_admitted[key].expect("refused before any open");
                                prop_assert!(now.duration_since(last) < Duration::from_secs(1));
                            }
                        }
                    }
                    Op::Close { which, after_ms } => {
                        if !open.is_empty() {
                            now += Duration::from_millis(after_ms);
                            let (_, ticket) = open.swap_remove(which.index(open.len()));
                            ticket.close(now);
                        }
                    }
                }
                if max_conns > 0 {
                    for (c, &client) in clients.iter().enumerate() {
                        let live = open.iter().filter(|(k, _)| *k == key_of(c)).count() as u32;
                        prop_assert_eq!(table.live(client), live);
                        prop_assert!(live <= max_conns);
                    }
                }
            }
            for (_, ticket) in open.drain(..) {
                ticket.close(now);
            }
            table.sweep(now + Duration::from_secs(1));
            prop_assert!(table.is_empty());
        }
    }
}
