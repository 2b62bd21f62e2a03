//! Key material: generation from the OS RNG, argon2id hashing and constant-time verification.
//!
//! Parameters: argon2id, m = 19 MiB, t = 2, p = 1 (OWASP's first recommended set), a 16-byte
//! random salt per key, stored as a PHC string. The secret itself is never stored.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::rngs::OsRng;
use rand::RngCore;
use tollgate_core::api_key::{self, PREFIX_LEN, SECRET_LEN};

const M_COST_KIB: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn hasher() -> Argon2<'static> {
    // The parameters are constants within argon2's accepted ranges.
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A freshly minted key: the full key is shown once, only `prefix` and `hash` are stored.
pub struct NewKey {
    pub full_key: String,
    pub prefix: String,
    pub hash: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn random_hex(chars: usize) -> String {
    let mut bytes = vec![0u8; chars.div_ceil(2)];
    OsRng.fill_bytes(&mut bytes);
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.truncate(chars);
    s
}

pub fn generate() -> Result<NewKey, argon2::password_hash::Error> {
    let prefix = random_hex(PREFIX_LEN);
    let secret = random_hex(SECRET_LEN);
    let hash = hash_secret(&secret)?;
    Ok(NewKey {
        full_key: api_key::format(&prefix, &secret),
        prefix,
        hash,
    })
}

pub fn hash_secret(secret: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(hasher()
        .hash_password(secret.as_bytes(), &salt)?
        .to_string())
}

/// Constant-time verification (argon2's comparison of the derived hash).
/// A malformed stored hash verifies as false.
pub fn verify_secret(secret: &str, stored_hash: &str) -> bool {
    match PasswordHash::new(stored_hash) {
        Ok(parsed) => hasher().verify_password(secret.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A hash of a random secret, verified against when a prefix is unknown so that an
/// unknown prefix costs the same time as a wrong secret.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_secret(&random_hex(SECRET_LEN)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_verifies_and_wrong_secret_does_not() {
        let k = generate().unwrap();
        let parsed = api_key::parse(&k.full_key).unwrap();
        assert_eq!(parsed.prefix, k.prefix);
        assert!(verify_secret(parsed.secret, &k.hash));
        let mut wrong = parsed.secret.to_string();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert!(!verify_secret(&wrong, &k.hash));
    }

    #[test]
    fn hash_is_argon2id_with_documented_params_and_hides_secret() {
        let k = generate().unwrap();
        assert!(
            k.hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            k.hash
        );
        let secret = api_key::parse(&k.full_key).unwrap().secret;
        assert!(!k.hash.contains(secret));
        assert!(!format!("{k:?}").contains(secret));
    }

    #[test]
    fn malformed_stored_hash_never_verifies() {
        assert!(!verify_secret("abc", "not-a-hash"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// PHC strings argon2 can parse, with cheap parameters and random salt and output.
        fn phc_like() -> impl Strategy<Value = String> {
            (
                prop_oneof![
                    Just("argon2id"),
                    Just("argon2i"),
                    Just("argon2d"),
                    Just("x")
                ],
                8u32..64,
                1u32..3,
                "[A-Za-z0-9+/]{11,24}",
                "[A-Za-z0-9+/]{0,48}",
            )
                .prop_map(|(alg, m, t, salt, out)| {
                    format!("${alg}$v=19$m={m},t={t},p=1${salt}${out}")
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_stored_hash_that_tollgate_did_not_make_never_verifies(
                secret in "\\PC{0,60}",
                stored in prop_oneof!["\\PC{0,120}", phc_like()],
            ) {
                prop_assert!(!verify_secret(&secret, &stored));
            }
        }
    }
}
