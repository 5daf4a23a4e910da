//! The worker's memory policy, pure: which results to move to disk, and when.
//!
//! A worker with a memory limit keeps the bytes of the results it holds in memory ("managed"
//! memory) under [`SPILL_FRACTION`] of the limit: whenever a result arrives (computed, fetched,
//! scattered or read back from disk), the least recently used ones are chosen to be written to
//! disk until managed memory is under that target again. The process's resident memory, which
//! also counts what running tasks allocate, is sampled a few times a second: above
//! [`SPILL_RSS_FRACTION`] more results go to disk; above [`PAUSE_FRACTION`] the worker pauses
//! (starts no task, gets no new work) until it is back under; above 95% its supervisor
//! restarts it (see the `rask worker` supervisor). This module only decides; the store
//! in `worker.rs` does the I/O and reports back. No clock, no I/O: every decision is
//! unit-tested.

use rask_graph::{FxHashMap, Key};
use std::collections::BTreeMap;

/// Managed memory is kept under this fraction of the limit (Dask's `target`, 60%).
pub(crate) const SPILL_FRACTION: f64 = 0.6;
/// Process memory above this fraction of the limit spills more results (Dask's `spill`, 70%).
pub(crate) const SPILL_RSS_FRACTION: f64 = 0.7;
/// Process memory above this fraction of the limit pauses the worker (Dask's `pause`, 80%).
pub(crate) const PAUSE_FRACTION: f64 = 0.8;

/// Which results are in memory (by last use) and which are on disk, with their sizes.
#[derive(Debug, Default)]
pub(crate) struct SpillPolicy {
    /// The memory limit; `None`: nothing is ever spilled or paused.
    limit: Option<u64>,
    /// Bytes of managed memory to stay under.
    target: Option<u64>,
    /// In memory: key → (last-use tick, bytes).
    in_memory: FxHashMap<Key, (u64, u64)>,
    /// In memory, least recently used first: tick → key.
    lru: BTreeMap<u64, Key>,
    /// On disk: key → bytes.
    on_disk: FxHashMap<Key, u64>,
    managed: u64,
    spilled: u64,
    tick: u64,
}

impl SpillPolicy {
    /// A policy for a worker with this memory limit (bytes), if any.
    pub(crate) fn new(limit: Option<u64>) -> Self {
        SpillPolicy { limit, target: limit.map(|l| (l as f64 * SPILL_FRACTION) as u64), ..SpillPolicy::default() }
    }

    /// The memory limit, if any.
    pub(crate) fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether there is a limit (without one, nothing is tracked per result: the store only
    /// counts bytes, at no cost per task).
    pub(crate) fn limited(&self) -> bool {
        self.limit.is_some()
    }

    /// Bytes of results held in memory.
    pub(crate) fn managed(&self) -> u64 {
        self.managed
    }

    /// Bytes of results held on disk.
    pub(crate) fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Whether `key` is on disk.
    #[cfg(test)]
    pub(crate) fn is_spilled(&self, key: &Key) -> bool {
        self.on_disk.contains_key(key)
    }

    /// A result of `nbytes` is now in memory (new, or read back from disk). Returns the results
    /// to write to disk, least recently used first, to get back under the target — possibly
    /// this one, if it alone is over it.
    #[must_use]
    pub(crate) fn stored(&mut self, key: &Key, nbytes: u64) -> Vec<Key> {
        self.kept(key, nbytes);
        self.lru.insert(self.tick, key.clone());
        let mut out = Vec::new();
        let Some(target) = self.target else { return out };
        while self.managed > target {
            let Some((victim, _)) = self.evict() else { break };
            out.push(victim);
        }
        out
    }

    /// Moves the least recently used result from memory to disk (in the books): which, and
    /// its bytes.
    fn evict(&mut self) -> Option<(Key, u64)> {
        let (_, victim) = self.lru.pop_first()?;
        let bytes = self.in_memory.remove(&victim).map_or(0, |(_, b)| b);
        self.managed -= bytes;
        self.spilled += bytes;
        self.on_disk.insert(victim.clone(), bytes);
        Some((victim, bytes))
    }

    /// The process uses `rss` bytes: the results to write to disk (least recently used first)
    /// to bring it back under [`SPILL_RSS_FRACTION`] of the limit, counting each spilled byte
    /// as given back.
    #[must_use]
    pub(crate) fn spill_for_rss(&mut self, rss: u64) -> Vec<Key> {
        let Some(limit) = self.limit else { return Vec::new() };
        let goal = (limit as f64 * SPILL_RSS_FRACTION) as u64;
        let mut over = rss.saturating_sub(goal);
        let mut out = Vec::new();
        while over > 0 {
            let Some((victim, bytes)) = self.evict() else { break };
            over = over.saturating_sub(bytes);
            out.push(victim);
        }
        out
    }

    /// Whether a worker using `rss` bytes should be paused: above [`PAUSE_FRACTION`] of the
    /// limit while it still holds results in memory. With everything already on disk, the
    /// excess is the process itself or a running task; pausing could then only wait forever,
    /// so the worker runs on (and its supervisor restarts it above 95%). `writing`: bytes of
    /// results chosen for disk whose files are still being written — memory that will come back,
    /// so the worker pauses while it waits for them too.
    pub(crate) fn should_pause(&self, rss: u64, writing: u64) -> bool {
        (!self.lru.is_empty() || writing > 0) && self.limit.is_some_and(|l| rss as f64 > l as f64 * PAUSE_FRACTION)
    }

    /// A result that could not be written to disk stays in memory (over the target, rather
    /// than lost).
    /// It is not offered for spilling again (it would fail again, every few hundred ms), and
    /// does not keep the worker paused.
    pub(crate) fn kept(&mut self, key: &Key, nbytes: u64) {
        self.removed(key);
        self.tick += 1;
        self.in_memory.insert(key.clone(), (self.tick, nbytes));
        self.managed += nbytes;
    }

    /// `key` was used (read for a task or a peer): it becomes the most recently used.
    pub(crate) fn touched(&mut self, key: &Key) {
        if let Some((tick, _)) = self.in_memory.get_mut(key) {
            // Only results that may be spilled are in the LRU order (see `kept`).
            if self.lru.remove(tick).is_some() {
                self.tick += 1;
                *tick = self.tick;
                self.lru.insert(self.tick, key.clone());
            }
        }
    }

    /// `key` was read back from disk and is about to be stored again: it leaves the disk.
    pub(crate) fn unspilled(&mut self, key: &Key) {
        if let Some(bytes) = self.on_disk.remove(key) {
            self.spilled -= bytes;
        }
    }

    /// `key` is gone (freed), from memory or disk.
    pub(crate) fn removed(&mut self, key: &Key) {
        if let Some((tick, bytes)) = self.in_memory.remove(key) {
            self.lru.remove(&tick);
            self.managed -= bytes;
        }
        self.unspilled(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(i: u32) -> Key {
        Key::from(format!("k{i}"))
    }

    #[test]
    fn least_recently_used_results_go_to_disk_above_sixty_percent() {
        let mut p = SpillPolicy::new(Some(100)); // target 60 bytes
        assert!(p.stored(&k(1), 20).is_empty());
        assert!(p.stored(&k(2), 20).is_empty());
        assert!(p.stored(&k(3), 20).is_empty());
        p.touched(&k(1)); // k2 is now the least recently used
        assert_eq!(p.stored(&k(4), 20), [k(2)]);
        assert_eq!((p.managed(), p.spilled()), (60, 20));
        // Reading k2 back pushes out the next least recently used (k3).
        p.unspilled(&k(2));
        assert_eq!(p.stored(&k(2), 20), [k(3)]);
        assert!(p.is_spilled(&k(3)) && !p.is_spilled(&k(2)));
        p.removed(&k(3));
        assert_eq!((p.managed(), p.spilled()), (60, 0));
    }

    #[test]
    fn process_memory_over_seventy_percent_spills_and_over_eighty_pauses() {
        let mut p = SpillPolicy::new(Some(1000)); // spill under 700, pause over 800
        for i in 0..5 {
            assert!(p.stored(&k(i), 100).is_empty());
        }
        // 500 managed plus 350 allocated by a task: 150 bytes must go (two results).
        assert_eq!(p.spill_for_rss(850), [k(0), k(1)]);
        assert!(p.should_pause(850, 0) && !p.should_pause(700, 0));
        assert!(p.spill_for_rss(650).is_empty());
        assert!(!SpillPolicy::new(None).should_pause(u64::MAX, 1));
        // Everything on disk: pausing cannot help any more.
        assert_eq!(p.spill_for_rss(5000).len(), 3);
        assert!(!p.should_pause(5000, 0));
        // ... unless results are still on their way to disk.
        assert!(p.should_pause(5000, 100));
        // Nor does a result that could not be written: it is not offered again.
        p.kept(&k(9), 900);
        assert!(!p.should_pause(5000, 0) && p.spill_for_rss(5000).is_empty());
        assert_eq!(p.managed(), 900);
    }

    #[test]
    fn a_result_larger_than_the_target_goes_to_disk_itself_and_no_limit_spills_nothing() {
        let mut p = SpillPolicy::new(Some(100));
        assert_eq!(p.stored(&k(1), 500), [k(1)]);
        assert_eq!((p.managed(), p.spilled()), (0, 500));
        let mut unlimited = SpillPolicy::new(None);
        assert!(unlimited.stored(&k(1), u64::MAX / 4).is_empty());
    }

    proptest! {
        /// Whatever happens, managed memory ends under the target and every byte is counted
        /// once, in memory or on disk.
        #[test]
        fn managed_memory_stays_under_the_target_and_bytes_add_up(
            ops in prop::collection::vec((0u8..4, 0u32..20, 1u64..50), 1..200),
        ) {
            let mut p = SpillPolicy::new(Some(200));
            let mut model: FxHashMap<Key, u64> = FxHashMap::default();
            for (op, key, bytes) in ops {
                let key = k(key);
                match op {
                    0 | 1 => {
                        if p.is_spilled(&key) {
                            p.unspilled(&key);
                        }
                        let _ = p.stored(&key, bytes);
                        model.insert(key, bytes);
                    }
                    2 => p.touched(&key),
                    _ => {
                        p.removed(&key);
                        model.remove(&key);
                    }
                }
                prop_assert!(p.managed() <= 120, "managed {}", p.managed());
                prop_assert_eq!(p.managed() + p.spilled(), model.values().sum::<u64>());
            }
        }
    }
}
