//! Stable hashing for backend selection.
//!
//! Two holdfast instances behind the same VIP (or one instance before and
//! after a restart) must send a given client to the same backend, so every
//! hash used for selection has to be a pure function of its input bytes: the
//! same value in every process, on every platform and with every Rust
//! version. std's `Hasher`/`RandomState` promise none of that (SipHash keys
//! are random per process and the algorithm may change), so this module
//! spells its hash out: FNV-1a over the bytes, started from a seed-dependent
//! state, then murmur3's `fmix64` finalizer. FNV-1a alone is cheap for the
//! short inputs used here (4–26 bytes) but mixes its high bits poorly;
//! `fmix64` gives full avalanche, which matters because callers reduce the
//! result modulo a table size.

use std::net::IpAddr;

/// FNV-1a 64-bit offset basis and prime (from the FNV reference).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seed for [`hash_ip`]. Fixed forever: changing it would move every
/// source-hashed client to a different backend on upgrade.
const IP_SEED: u64 = 0x686f_6c64_6661_7374; // "holdfast"

/// murmur3's 64-bit finalizer: a bijection with full avalanche.
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Stable 64-bit hash: the same value in every process, on every platform,
/// with every Rust version (so never std's `Hasher`/`RandomState`).
///
/// FNV-1a over `bytes`, starting from the offset basis xor a finalized
/// `seed` (so different seeds give unrelated functions, which Maglev needs
/// for its independent offset and skip), with the length folded in before
/// the `fmix64` finalizer.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ fmix64(seed);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // `usize` -> `u64` never truncates on supported (<= 64-bit) targets; the
    // length keeps inputs that differ only by trailing zero bytes apart even
    // in the unlikely case the FNV state hits zero.
    fmix64(h ^ (bytes.len() as u64))
}

/// Hash of a client IP for source-hash. IPv4 and IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`) hash identically (as the 4 IPv4 bytes), because a
/// dual-stack listener reports IPv4 clients in the mapped form and the same
/// client must land on the same backend whichever socket accepted it. The
/// port never matters (it isn't an input): a client's source port changes on
/// every connection.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(IP_SEED, &v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(IP_SEED, &v4.octets()),
            None => hash_bytes(IP_SEED, &v6.octets()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    // Known answers, computed once and pinned (and cross-checked against an
    // independent Python implementation of the same definition): if any of
    // these changes, every deployed source-hash and Maglev mapping changes
    // with it.
    #[test]
    fn known_answers_bytes() {
        assert_eq!(hash_bytes(0, b""), KAT_EMPTY);
        assert_eq!(hash_bytes(0, b"a"), KAT_A);
        assert_eq!(hash_bytes(1, b"a"), KAT_A_SEED1);
        assert_eq!(hash_bytes(0, b"holdfast"), KAT_HOLDFAST);
        assert_eq!(hash_bytes(u64::MAX, &[0u8; 16]), KAT_ZEROS);
    }

    #[test]
    fn known_answers_ip() {
        assert_eq!(hash_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))), KAT_V4);
        assert_eq!(hash_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), KAT_V6_LOOPBACK);
        let doc: Ipv6Addr = "2001:db8::1".parse().expect("valid literal");
        assert_eq!(hash_ip(IpAddr::V6(doc)), KAT_V6_DOC);
    }

    const KAT_EMPTY: u64 = 0xefd0_1f60_ba99_2926;
    const KAT_A: u64 = 0x25ad_9d1b_70de_62d1;
    const KAT_A_SEED1: u64 = 0x8228_7790_5604_3a16;
    const KAT_HOLDFAST: u64 = 0xee45_b38e_d96f_4108;
    const KAT_ZEROS: u64 = 0x61df_b720_731d_fc42;
    const KAT_V4: u64 = 0xcb2c_154c_05a2_f070;
    const KAT_V6_LOOPBACK: u64 = 0x9344_ae2d_bc49_e180;
    const KAT_V6_DOC: u64 = 0xa116_0266_34d7_3d91;

    #[test]
    fn seeds_and_lengths_separate() {
        assert_ne!(hash_bytes(0, b"x"), hash_bytes(1, b"x"));
        assert_ne!(hash_bytes(0, b""), hash_bytes(0, &[0]));
        assert_ne!(hash_bytes(0, &[0]), hash_bytes(0, &[0, 0]));
    }

    #[test]
    fn v4_mapped_is_v4() {
        let v4 = Ipv4Addr::new(203, 0, 113, 7);
        let mapped = v4.to_ipv6_mapped();
        assert_eq!(hash_ip(IpAddr::V4(v4)), hash_ip(IpAddr::V6(mapped)));
        // The deprecated IPv4-compatible form (::a.b.c.d) is a different
        // address and must not collapse onto the IPv4 one.
        let compat = v4.to_ipv6_compatible();
        assert_ne!(hash_ip(IpAddr::V4(v4)), hash_ip(IpAddr::V6(compat)));
    }

    proptest! {
        #[test]
        fn prop_v4_mapped_is_v4(raw in any::<u32>()) {
            let v4 = Ipv4Addr::from(raw);
            prop_assert_eq!(hash_ip(IpAddr::V4(v4)), hash_ip(IpAddr::V6(v4.to_ipv6_mapped())));
        }

        #[test]
        fn prop_deterministic(seed in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(hash_bytes(seed, &bytes), hash_bytes(seed, &bytes.clone()));
        }
    }
}
