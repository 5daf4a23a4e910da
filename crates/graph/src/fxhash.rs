//! A fast, non-cryptographic hasher for the hot maps keyed by task keys and ids.
//!
//! The standard `SipHash` resists hash flooding but costs several times more per lookup, and the
//! schedulers look keys up for every task event. This is the multiply-rotate hash used by rustc
//! ("FxHash"). Trade-off: a peer able to choose many colliding keys could slow a map down; keys
//! come from authenticated clients, and the slowdown is bounded to that client's own graph.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash state.
#[derive(Default, Clone, Copy, Debug)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Fold the high bits into the low ones: hash tables index by the low bits, and keys
        // sharing a prefix ("t-1", "t-2", ...) differ mostly in the high bits of the product.
        let m = u128::from(self.hash) * u128::from(0x9E37_79B9_7F4A_7C15u64);
        (m as u64) ^ ((m >> 64) as u64)
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// A `HashSet` with [`FxHasher`].
pub type FxHashSet<T> = HashSet<T, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_work_and_distinct_keys_hash_differently() {
        let mut m: FxHashMap<String, u32> = FxHashMap::default();
        for i in 0..10_000 {
            m.insert(format!("key-{i}"), i);
        }
        assert_eq!(m.get("key-1234"), Some(&1234));
        let h = |s: &str| {
            let mut h = FxHasher::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_ne!(h("ab"), h("ba"));
        // Keys with a common prefix must spread over the low bits (hash tables use those).
        let buckets: std::collections::HashSet<u64> = (0..4096).map(|i| h(&format!("t-{i}")) & 4095).collect();
        assert!(buckets.len() > 2000, "only {} of 4096 low-bit buckets used", buckets.len());
    }
}
