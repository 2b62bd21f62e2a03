//! Verified-key cache: a presented key whose argon2id check passed is remembered by a
//! BLAKE2b digest of the whole key (never the key itself) for a short TTL, so the hot path
//! costs a hash and a map lookup instead of ~20 ms of argon2. Any key event (revocation,
//! rotation, policy change, tenant disabled) clears it on every replica.

use crate::identity::Identity;
use crate::key_digest::KeyDigest;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Entry {
    identity: Identity,
    /// The key's own expiry (unix seconds), checked on every hit.
    expires_at: Option<i64>,
    cached_at: Instant,
}

#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    max_entries: usize,
    entries: RwLock<HashMap<KeyDigest, Entry>>,
}

impl KeyCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub fn get(&self, d: &KeyDigest, now_unix: i64) -> Option<Identity> {
        if self.ttl.is_zero() {
            return None;
        }
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let e = map.get(d)?;
        if e.cached_at.elapsed() >= self.ttl || e.expires_at.is_some_and(|x| x <= now_unix) {
            return None;
        }
        Some(e.identity.clone())
    }

    pub fn put(&self, d: KeyDigest, identity: Identity, expires_at: Option<i64>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max_entries {
            let ttl = self.ttl;
            map.retain(|_, e| e.cached_at.elapsed() < ttl);
            if map.len() >= self.max_entries {
                map.clear();
            }
        }
        map.insert(
            d,
            Entry {
                identity,
                expires_at,
                cached_at: Instant::now(),
            },
        );
    }

    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_digest::digest;
    use crate::policy::{effective, PolicyRow};

    fn identity() -> Identity {
        Identity {
            key_id: "key_1".into(),
            tenant_id: "ten_1".into(),
            policy: effective(&PolicyRow::default(), None),
            log_prompts: false,
        }
    }

    #[test]
    fn hit_until_ttl_or_key_expiry_or_clear() {
        let c = KeyCache::new(Duration::from_secs(60), 10);
        let d = digest("tg_a_b");
        c.put(d, identity(), Some(1_000));
        assert_eq!(c.get(&d, 999).map(|i| i.key_id), Some("key_1".into()));
        assert!(c.get(&d, 1_000).is_none(), "expired key must miss");
        assert!(c.get(&digest("tg_a_c"), 0).is_none());
        c.clear();
        assert!(c.get(&d, 0).is_none());
    }

    #[test]
    fn zero_ttl_disables_and_size_is_bounded() {
        let off = KeyCache::new(Duration::ZERO, 10);
        off.put(digest("x"), identity(), None);
        assert!(off.get(&digest("x"), 0).is_none());
        let c = KeyCache::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            c.put(digest(&i.to_string()), identity(), None);
        }
        assert!(c.len() <= 3);
    }
}
