//! The digest a presented key is known by in memory (key cache, static keys, verified
//! secrets): BLAKE2b-256 of the whole key, never the key itself.

use blake2::{Blake2b, Digest};

type Blake2b256 = Blake2b<blake2::digest::consts::U32>;
pub type KeyDigest = [u8; 32];

pub fn digest(presented: &str) -> KeyDigest {
    let mut h = Blake2b256::new();
    h.update(b"tollgate-key-cache\0");
    h.update(presented.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_differs_per_key() {
        assert_ne!(digest("a"), digest("b"));
    }
}
