//! Presented keys known to be genuine: the BLAKE2b digest of each key whose secret passed
//! argon2id, with a digest of the stored hash it passed against. Such a key is never
//! throttled for other people's failures, and on a cache miss it skips argon2 while the
//! stored hash is unchanged. It is not an authorization cache: revocation, expiry, tenant
//! status and policy are read from the store on every miss, so key events do not clear it.

use crate::key_digest::KeyDigest;
use blake2::{Blake2b, Digest};
use std::collections::HashMap;
use std::sync::Mutex;

type Blake2b256 = Blake2b<blake2::digest::consts::U32>;
type HashDigest = [u8; 32];

fn hash_digest(stored_hash: &str) -> HashDigest {
    let mut h = Blake2b256::new();
    h.update(b"tollgate-verified-hash\0");
    h.update(stored_hash.as_bytes());
    h.finalize().into()
}

#[derive(Debug)]
pub struct VerifiedSecrets {
    max_entries: usize,
    entries: Mutex<HashMap<KeyDigest, HashDigest>>,
}

impl VerifiedSecrets {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<KeyDigest, HashDigest>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the key with digest `key` verified against `stored_hash`. Only keys
    /// that passed argon2 get here, so the table grows with real keys, not with guesses;
    /// when full it starts over (the keys in use come back at one argon2 each).
    pub fn remember(&self, key: KeyDigest, stored_hash: &str) {
        let mut map = self.map();
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, hash_digest(stored_hash));
    }

    /// Whether this exact key has verified before (against any hash).
    pub fn knows(&self, key: &KeyDigest) -> bool {
        self.map().contains_key(key)
    }

    /// Whether this exact key verified against this exact stored hash, so argon2 would
    /// say yes again.
    pub fn verified(&self, key: &KeyDigest, stored_hash: &str) -> bool {
        self.map()
            .get(key)
            .is_some_and(|h| *h == hash_digest(stored_hash))
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_digest::digest;

    #[test]
    fn a_remembered_key_verifies_only_against_the_same_hash() {
        let v = VerifiedSecrets::new(10);
        let k = digest("tg_a_b");
        assert!(!v.knows(&k));
        v.remember(k, "$argon2id$one");
        assert!(v.knows(&k));
        assert!(v.verified(&k, "$argon2id$one"));
        assert!(
            !v.verified(&k, "$argon2id$two"),
            "a changed hash needs argon2"
        );
        assert!(!v.knows(&digest("tg_a_c")));
        assert!(!v.verified(&digest("tg_a_c"), "$argon2id$one"));
    }

    #[test]
    fn the_table_is_bounded() {
        let v = VerifiedSecrets::new(3);
        for i in 0..10 {
            v.remember(digest(&i.to_string()), "h");
        }
        assert!(v.len() <= 3);
        assert!(v.knows(&digest("9")), "the newest key is kept");
    }
}
