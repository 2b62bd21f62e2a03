//! In-memory GCRA counters and lease sets, sharded so concurrent decisions on different
//! keys do not contend on one lock. A batch locks its shards in index order (no deadlock
//! between two batches) and is applied atomically. Expired counters and leases are swept
//! as a shard grows.

use super::{decide_batch, CounterStore, Hit, LeaseWrite, StoreError, StoredState};
use crate::gcra::{Nanos, Verdict};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;
const SWEEP_AT: usize = 4_096;

#[derive(Debug)]
struct Shard {
    tats: HashMap<String, Nanos>,
    /// Lease key → request id → expiry.
    leases: HashMap<String, HashMap<String, Nanos>>,
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

fn shard_of(key: &str) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        leases: HashMap::new(),
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
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1_000_000_000)
    }

    fn lock(&self, idx: usize) -> MutexGuard<'_, Shard> {
        // A poisoned lock only means another decision panicked mid-update; the map is
        // still a valid map of timestamps.
        self.shards[idx]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides a batch at a given time (tests drive the clock through this).
    pub fn hit_batch_at(&self, hits: &[Hit], now: Nanos) -> Vec<Verdict> {
        let mut idx: Vec<usize> = hits.iter().map(|h| shard_of(&h.key)).collect();
        let mut order = idx.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, self.lock(i))).collect();
        // Map each hit to its guard's position so reads and writes find their shard.
        for i in idx.iter_mut() {
            *i = order.binary_search(i).unwrap_or(0);
        }
        let pos_of = |key: &str| -> usize {
            hits.iter()
                .position(|h| h.key == key)
                .map(|p| idx[p])
                .unwrap_or(0)
        };
        struct Locked<'g, 's, F> {
            guards: &'g mut [(usize, MutexGuard<'s, Shard>)],
            pos_of: F,
            now: Nanos,
        }
        impl<F: Fn(&str) -> usize> StoredState for Locked<'_, '_, F> {
            fn tat(&mut self, key: &str) -> Nanos {
                let shard = &self.guards[(self.pos_of)(key)].1;
                shard.tats.get(key).copied().unwrap_or(0)
            }
            fn leases(&mut self, key: &str, id: &str) -> (u32, bool) {
                let now = self.now;
                let shard = &mut self.guards[(self.pos_of)(key)].1;
                match shard.leases.get_mut(key) {
                    Some(set) => {
                        set.retain(|_, expires| *expires > now);
                        let n = u32::try_from(set.len()).unwrap_or(u32::MAX);
                        (n, set.contains_key(id))
                    }
                    None => (0, false),
                }
            }
        }
        let mut state = Locked {
            guards: &mut guards,
            pos_of,
            now,
        };
        let (verdicts, writes, lease_writes) = decide_batch(hits, now, &mut state);
        for w in lease_writes {
            match w {
                LeaseWrite::Add { key, id, expires } => {
                    let shard = &mut guards[pos_of(key)].1;
                    match shard.leases.get_mut(key) {
                        Some(set) => {
                            set.insert(id.to_string(), expires);
                        }
                        None => {
                            let set = HashMap::from([(id.to_string(), expires)]);
                            shard.leases.insert(key.to_string(), set);
                        }
                    }
                }
                LeaseWrite::Remove { key, id } => {
                    let shard = &mut guards[pos_of(key)].1;
                    if let Some(set) = shard.leases.get_mut(key) {
                        set.remove(id);
                        if set.is_empty() {
                            shard.leases.remove(key);
                        }
                    }
                }
            }
        }
        for (key, tat) in writes {
            let shard = &mut guards[pos_of(key)].1;
            if tat > now {
                // Update in place: no key allocation for a counter that already exists.
                match shard.tats.get_mut(key) {
                    Some(t) => *t = tat,
                    None => {
                        shard.tats.insert(key.to_string(), tat);
                    }
                }
            } else {
                shard.tats.remove(key);
            }
        }
        for (_, shard) in guards.iter_mut() {
            if shard.tats.len() + shard.leases.len() >= shard.sweep_at {
                shard.tats.retain(|_, t| *t > now);
                shard.leases.retain(|_, set| {
                    set.retain(|_, expires| *expires > now);
                    !set.is_empty()
                });
                shard.sweep_at = ((shard.tats.len() + shard.leases.len()) * 2).max(SWEEP_AT);
            }
        }
        verdicts
    }

    /// Counters and lease sets held (expired ones may linger until a sweep).
    pub fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                let s = self.lock(i);
                s.tats.len() + s.leases.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CounterStore for MemoryStore {
    async fn hit_batch(&self, hits: &[Hit]) -> Result<Vec<Verdict>, StoreError> {
        Ok(self.hit_batch_at(hits, self.now()))
    }

    async fn expires_in(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        let now = self.now();
        let shard = self.lock(shard_of(key));
        // A lease set lives as long as its longest lease.
        let until = shard.tats.get(key).copied().or_else(|| {
            shard
                .leases
                .get(key)
                .and_then(|set| set.values().copied().max())
        });
        Ok(until
            .filter(|t| *t > now)
            .map(|t| Duration::from_nanos(t - now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter_store::HitMode;
    use crate::limit_policy::{Limit, Unit};

    const SEC: Nanos = 1_000_000_000;

    fn hit(key: &str, n: u32, unit: Unit) -> Hit {
        Hit {
            key: key.to_string(),
            limit: Limit {
                requests_per_unit: n,
                unit,
            },
            hits: 1,
            mode: HitMode::Enforce,
        }
    }

    #[test]
    fn keys_are_counted_independently() {
        let s = MemoryStore::new();
        let a = [hit("a", 1, Unit::Minute)];
        assert!(s.hit_batch_at(&a, 100 * SEC)[0].allowed);
        assert!(!s.hit_batch_at(&a, 100 * SEC)[0].allowed);
        assert!(s.hit_batch_at(&[hit("b", 1, Unit::Minute)], 100 * SEC)[0].allowed);
    }

    #[test]
    fn a_repeated_key_in_one_batch_sees_the_earlier_hit() {
        let s = MemoryStore::new();
        let k = hit("k", 2, Unit::Minute);
        let v = s.hit_batch_at(&[k.clone(), k.clone(), k.clone()], 100 * SEC);
        let allowed: Vec<bool> = v.iter().map(|v| v.allowed).collect();
        assert_eq!(allowed, vec![true, true, false]);
        // The third hit denied the request, so nothing was consumed.
        assert_eq!(s.hit_batch_at(&[k], 100 * SEC)[0].remaining, 1);
    }

    #[test]
    fn expired_counters_are_swept() {
        let s = MemoryStore::new();
        for i in 0..(SWEEP_AT * SHARDS) {
            s.hit_batch_at(&[hit(&format!("k{i}"), 100, Unit::Second)], SEC);
        }
        // Much later every counter is expired; new hits trigger sweeps per shard.
        for i in 0..(SWEEP_AT * SHARDS) {
            s.hit_batch_at(&[hit(&format!("n{i}"), 100, Unit::Second)], 1_000 * SEC);
        }
        assert!(s.len() < 2 * SWEEP_AT * SHARDS, "len {}", s.len());
    }
}
