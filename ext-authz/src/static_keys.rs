//! Static keys for the casual profile: keys given in the environment, matched by digest
//! (a preimage-resistant hash, so lookup timing tells nothing about the key).

use crate::authz_config::StaticKeyConfig;
use crate::key_digest::{digest, KeyDigest};
use std::collections::HashMap;

pub const MIN_LEN: usize = 32;

/// Why the static keys refuse start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaticKeyError {
    #[error("static key {name:?}: environment variable {env} is not set")]
    Unset { name: String, env: String },
    #[error("static key {0:?} must be at least {MIN_LEN} characters")]
    TooShort(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticKey {
    pub name: String,
    pub tenant: String,
    pub rpm: Option<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct StaticKeys {
    by_digest: HashMap<KeyDigest, StaticKey>,
}

impl StaticKeys {
    pub fn from_config(
        config: &[StaticKeyConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StaticKeyError> {
        let mut by_digest = HashMap::new();
        for c in config {
            let key = env(&c.env).ok_or_else(|| StaticKeyError::Unset {
                name: c.name.clone(),
                env: c.env.clone(),
            })?;
            if key.len() < MIN_LEN {
                return Err(StaticKeyError::TooShort(c.name.clone()));
            }
            by_digest.insert(
                digest(&key),
                StaticKey {
                    name: c.name.clone(),
                    tenant: c.tenant.clone(),
                    rpm: c.rpm,
                },
            );
        }
        Ok(Self { by_digest })
    }

    pub fn find(&self, d: &KeyDigest) -> Option<&StaticKey> {
        self.by_digest.get(d)
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Vec<StaticKeyConfig> {
        vec![StaticKeyConfig {
            name: "casual".into(),
            tenant: "default".into(),
            env: "K".into(),
            rpm: Some(5),
        }]
    }

    #[test]
    fn configured_key_is_found_by_digest_only() {
        let key = "s".repeat(40);
        let k = StaticKeys::from_config(&cfg(), |_| Some(key.clone())).unwrap();
        assert_eq!(
            k.find(&digest(&key)).map(|s| s.name.as_str()),
            Some("casual")
        );
        assert!(k.find(&digest("other")).is_none());
    }

    #[test]
    fn short_or_missing_keys_refuse_start() {
        assert!(StaticKeys::from_config(&cfg(), |_| Some("short".into())).is_err());
        assert!(StaticKeys::from_config(&cfg(), |_| None).is_err());
    }
}
