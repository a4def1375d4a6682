//! Deterministic test data and its digest.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// `n` pseudo-random bytes from `seed` (xorshift64*): deterministic, incompressible enough,
/// and different for different seeds.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = vec![0u8; n];
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&next().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = next().to_le_bytes();
    let len = rest.len();
    rest.copy_from_slice(&last[..len]);
    out
}

/// 128 MiB of random bytes, generated once per test process and shared by the bulk tests
/// (generating it in an unoptimised test build costs about a second).
pub fn shared_random() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| random_bytes(128 << 20, 0x686f_6c64_6661_7374))
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
