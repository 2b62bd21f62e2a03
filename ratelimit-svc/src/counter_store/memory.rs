//! In-memory GCRA counters, sharded so concurrent decisions on different keys do not
//! contend on one lock. Expired counters are swept as a shard grows.

use crate::gcra::{self, Nanos, Verdict};
use crate::limit_policy::Limit;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 64;
const SWEEP_AT: usize = 4_096;

#[derive(Debug)]
struct Shard {
    tats: HashMap<String, Nanos>,
    sweep_at: usize,
}

#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    epoch: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        sweep_at: SWEEP_AT,
                    })
                })
                .collect(),
            epoch: Instant::now(),
        }
    }

    /// Current time on the store's clock; starts well above zero so that a fresh
    /// counter (TAT 0) is never "in the future".
    pub fn now(&self) -> Nanos {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn hit(&self, key: &str, limit: &Limit, hits: u64) -> Verdict {
        self.hit_at(key, limit, hits, self.now())
    }

    pub fn hit_at(&self, key: &str, limit: &Limit, hits: u64, now: Nanos) -> Verdict {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let idx = (h.finish() as usize) % SHARDS;
        // A poisoned lock only means another decision panicked mid-update; the map is
        // still a valid map of timestamps.
        let mut shard = self.shards[idx]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tat = shard.tats.get(key).copied().unwrap_or(0);
        let (verdict, new_tat) = gcra::decide(limit, tat, now, hits);
        if new_tat != tat {
            shard.tats.insert(key.to_string(), new_tat);
        }
        if shard.tats.len() >= shard.sweep_at {
            shard.tats.retain(|_, t| *t > now);
            shard.sweep_at = (shard.tats.len() * 2).max(SWEEP_AT);
        }
        verdict
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.tats.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit_policy::Unit;

    const SEC: Nanos = 1_000_000_000;

    #[test]
    fn keys_are_counted_independently() {
        let s = MemoryStore::new();
        let l = Limit {
            requests_per_unit: 1,
            unit: Unit::Minute,
        };
        assert!(s.hit_at("a", &l, 1, 100 * SEC).allowed);
        assert!(!s.hit_at("a", &l, 1, 100 * SEC).allowed);
        assert!(s.hit_at("b", &l, 1, 100 * SEC).allowed);
    }

    #[test]
    fn expired_counters_are_swept() {
        let s = MemoryStore::new();
        let l = Limit {
            requests_per_unit: 100,
            unit: Unit::Second,
        };
        for i in 0..(SWEEP_AT * SHARDS) {
            s.hit_at(&format!("k{i}"), &l, 1, SEC);
        }
        // Much later every counter is expired; new hits trigger sweeps per shard.
        for i in 0..(SWEEP_AT * SHARDS) {
            s.hit_at(&format!("n{i}"), &l, 1, 1_000 * SEC);
        }
        assert!(s.len() < 2 * SWEEP_AT * SHARDS, "len {}", s.len());
    }
}
