//! A content hash for fingerprints and cache keys: FNV-1a, 64 bits — stable
//! across builds and platforms, fast, not cryptographic.

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// `h` extended by `bytes`.
pub fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(fnv1a(b"", FNV_OFFSET), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a", FNV_OFFSET), 0xaf63_dc4c_8601_ec8c);
    }
}
