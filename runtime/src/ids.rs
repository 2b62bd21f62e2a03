//! Random ids (tenant and key ids, the ledger buffer's `source`) from the operating
//! system's generator. There is no fallback: an id made from the clock and the process id
//! can repeat (two replicas started in the same microsecond), and a repeated ledger
//! `source` makes the database drop one replica's usage as duplicates.

use rand::rngs::OsRng;
use rand::RngCore;

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct IdError(#[from] rand::Error);

/// 64 random bits as 16 lowercase hex digits.
pub fn random_hex64() -> Result<String, IdError> {
    let mut b = [0u8; 8];
    OsRng.try_fill_bytes(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `<kind>_<16 hex digits>`, e.g. `key_3f9a0c1d2e4b5a69`.
pub fn prefixed(kind: &str) -> Result<String, IdError> {
    Ok(format!("{kind}_{}", random_hex64()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_sixteen_lowercase_hex_digits_and_do_not_repeat() {
        let ids: HashSet<String> = (0..1000).map(|_| random_hex64().unwrap()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
    }

    #[test]
    fn prefixed_ids_carry_their_kind() {
        let id = prefixed("ten").unwrap();
        let (kind, hex) = id.split_once('_').unwrap();
        assert_eq!(kind, "ten");
        assert_eq!(hex.len(), 16);
    }
}
