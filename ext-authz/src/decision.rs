//! The authorization decision, free of gRPC types: which key was presented, and whether
//! the stored key behind it may call.

use crate::api_key;
use crate::key_store::{SqliteKeyStore, StoredKey};
use std::collections::HashMap;
use tollgate_core::api_key as key_format;

/// Who is calling, once the key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub tenant_id: String,
    pub rpm: Option<u32>,
}

/// Why a request is refused. Messages never contain key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow(Identity),
    Deny(Denial),
}

pub const MISSING_KEY: Denial = Denial {
    status: 401,
    code: "missing_api_key",
    message: "no API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
};
pub const INVALID_KEY: Denial = Denial {
    status: 401,
    code: "invalid_api_key",
    message: "the API key is not valid",
};
pub const EXPIRED_KEY: Denial = Denial {
    status: 401,
    code: "expired_api_key",
    message: "the API key has expired",
};
pub const REVOKED_KEY: Denial = Denial {
    status: 401,
    code: "revoked_api_key",
    message: "the API key has been revoked",
};
pub const TENANT_DISABLED: Denial = Denial {
    status: 403,
    code: "tenant_disabled",
    message: "the tenant of this API key is disabled",
};
pub const STORE_UNAVAILABLE: Denial = Denial {
    status: 503,
    code: "authz_unavailable",
    message: "the API key could not be checked right now; retry later",
};

/// The key the client presented, from `Authorization: Bearer` (OpenAI SDKs) or
/// `x-api-key` (Anthropic SDKs). Header names arrive lower-cased from Envoy.
pub fn presented_key(headers: &HashMap<String, String>) -> Result<&str, Denial> {
    if let Some(auth) = headers.get("authorization") {
        return key_format::from_bearer(auth).ok_or(INVALID_KEY);
    }
    match headers.get("x-api-key").map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(INVALID_KEY),
        None => Err(MISSING_KEY),
    }
}

/// Judges a stored key whose secret was already verified (or not).
pub fn judge(stored: &StoredKey, secret_ok: bool, now: i64) -> Outcome {
    if !secret_ok {
        return Outcome::Deny(INVALID_KEY);
    }
    if stored.revoked_at.is_some() {
        return Outcome::Deny(REVOKED_KEY);
    }
    if stored.expires_at.is_some_and(|e| e <= now) {
        return Outcome::Deny(EXPIRED_KEY);
    }
    if !stored.tenant_active {
        return Outcome::Deny(TENANT_DISABLED);
    }
    Outcome::Allow(Identity {
        key_id: stored.id.clone(),
        tenant_id: stored.tenant_id.clone(),
        rpm: stored.rpm,
    })
}

/// Verifies presented keys against the store.
#[derive(Debug, Clone)]
pub struct Authorizer {
    store: SqliteKeyStore,
}

impl Authorizer {
    pub fn new(store: SqliteKeyStore) -> Self {
        Self { store }
    }

    pub async fn authorize(&self, headers: &HashMap<String, String>) -> Outcome {
        let presented = match presented_key(headers) {
            Ok(k) => k,
            Err(d) => return Outcome::Deny(d),
        };
        let Some(parsed) = key_format::parse(presented) else {
            return Outcome::Deny(INVALID_KEY);
        };
        let stored = match self.store.find_key(parsed.prefix).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "key store lookup failed");
                return Outcome::Deny(STORE_UNAVAILABLE);
            }
        };
        // An unknown prefix still pays for one verification, so timing does not tell
        // an attacker which prefixes exist.
        let hash = stored
            .as_ref()
            .map(|s| s.secret_hash.clone())
            .unwrap_or_else(|| api_key::decoy_hash().to_string());
        let secret = parsed.secret.to_string();
        let secret_ok = tokio::task::spawn_blocking(move || api_key::verify_secret(&secret, &hash))
            .await
            .unwrap_or(false);
        match stored {
            Some(s) => judge(&s, secret_ok, crate::time::unix_now()),
            None => Outcome::Deny(INVALID_KEY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StoredKey {
        StoredKey {
            id: "key_1".into(),
            secret_hash: String::new(),
            tenant_id: "ten_1".into(),
            tenant_active: true,
            rpm: Some(5),
            expires_at: None,
            revoked_at: None,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bearer_and_x_api_key_are_both_accepted() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer k")])),
            Ok("k")
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", "k")])), Ok("k"));
    }

    #[test]
    fn missing_and_malformed_credentials_are_401() {
        assert_eq!(presented_key(&headers(&[])), Err(MISSING_KEY));
        assert_eq!(
            presented_key(&headers(&[("authorization", "Basic abc")])),
            Err(INVALID_KEY)
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", " ")])),
            Err(INVALID_KEY)
        );
    }

    #[test]
    fn valid_key_is_allowed_with_identity() {
        assert_eq!(
            judge(&key(), true, 100),
            Outcome::Allow(Identity {
                key_id: "key_1".into(),
                tenant_id: "ten_1".into(),
                rpm: Some(5)
            })
        );
    }

    #[test]
    fn wrong_secret_revoked_expired_and_disabled_are_denied() {
        assert_eq!(judge(&key(), false, 100), Outcome::Deny(INVALID_KEY));
        let revoked = StoredKey {
            revoked_at: Some(1),
            ..key()
        };
        assert_eq!(judge(&revoked, true, 100), Outcome::Deny(REVOKED_KEY));
        let expired = StoredKey {
            expires_at: Some(100),
            ..key()
        };
        assert_eq!(judge(&expired, true, 100), Outcome::Deny(EXPIRED_KEY));
        let disabled = StoredKey {
            tenant_active: false,
            ..key()
        };
        assert_eq!(judge(&disabled, true, 100), Outcome::Deny(TENANT_DISABLED));
    }
}
