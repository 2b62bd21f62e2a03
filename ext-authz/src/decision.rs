//! The authorization decision, free of gRPC types: which key was presented, whether it is
//! valid, and whether its policy lets this caller use this operation from this address.

use crate::api_key;
use crate::client_ip;
use crate::failure_throttle::FailureThrottle;
use crate::ip_net::IpNet;
use crate::key_cache::{self, KeyCache};
use crate::key_store::{KeyRecord, KeyStore};
use crate::policy::{self, EffectivePolicy, Limits, PolicyRow};
use crate::static_keys::StaticKeys;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tollgate_core::api_key as key_format;
use tollgate_core::operation::Operation;

/// Who is calling and what they may do, once the key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub tenant_id: String,
    pub policy: EffectivePolicy,
    /// The tenant opted in to prompt logging.
    pub log_prompts: bool,
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
    /// Boxed: an identity (with its key and tenant limits) is far larger than a denial.
    Allow(Box<Identity>),
    Deny(Denial),
}

const fn denial(status: u16, code: &'static str, message: &'static str) -> Denial {
    Denial {
        status,
        code,
        message,
    }
}

pub const MISSING_KEY: Denial = denial(
    401,
    "missing_api_key",
    "no API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
);
pub const INVALID_KEY: Denial = denial(401, "invalid_api_key", "the API key is not valid");
pub const EXPIRED_KEY: Denial = denial(401, "expired_api_key", "the API key has expired");
pub const REVOKED_KEY: Denial = denial(401, "revoked_api_key", "the API key has been revoked");
pub const TENANT_DISABLED: Denial = denial(
    403,
    "tenant_disabled",
    "the tenant of this API key is disabled",
);
pub const IP_NOT_ALLOWED: Denial = denial(
    403,
    "ip_not_allowed",
    "this API key may not be used from this address",
);
pub const OPERATION_NOT_ALLOWED: Denial = denial(
    403,
    "operation_not_allowed",
    "this API key may not use this endpoint",
);
/// The filter counts tokens and cost only for chat, completions and embeddings: any other
/// endpoint's usage would be spent outside the key's token and USD limits.
pub const OPERATION_NOT_COUNTED: Denial = denial(
    403,
    "operation_not_allowed",
    "this endpoint's usage is not counted, so a key with token or USD limits may not use it",
);
pub const TOO_MANY_FAILURES: Denial = denial(
    429,
    "too_many_failed_attempts",
    "too many failed authentication attempts; retry later",
);
pub const STORE_UNAVAILABLE: Denial = denial(
    503,
    "authz_unavailable",
    "the API key could not be checked right now; retry later",
);
pub const CREDENTIAL_UNAVAILABLE: Denial = denial(
    503,
    "credential_unavailable",
    "the gateway has no credential configured for this route",
);

/// What the decision reads from one request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub headers: &'a HashMap<String, String>,
    pub path: &'a str,
    /// Envoy's downstream peer address, without port.
    pub peer: Option<&'a str>,
}

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
pub fn judge(stored: &KeyRecord, secret_ok: bool, now: i64) -> Result<Identity, Denial> {
    if !secret_ok {
        return Err(INVALID_KEY);
    }
    if stored.revoked_at.is_some() {
        return Err(REVOKED_KEY);
    }
    if stored.expires_at.is_some_and(|e| e <= now) {
        return Err(EXPIRED_KEY);
    }
    if !stored.tenant_active {
        return Err(TENANT_DISABLED);
    }
    Ok(Identity {
        key_id: stored.id.clone(),
        tenant_id: stored.tenant_id.clone(),
        policy: policy::effective(&stored.tenant_policy, stored.key_policy.as_ref()),
        log_prompts: stored.tenant_logs_prompts,
    })
}

/// Checks a known identity's policy against this request.
pub fn permit(identity: &Identity, op: Operation, ip: Option<IpAddr>) -> Result<(), Denial> {
    if !identity.policy.allows_ip(ip) {
        return Err(IP_NOT_ALLOWED);
    }
    if !identity.policy.allows_operation(op) {
        return Err(OPERATION_NOT_ALLOWED);
    }
    let metered =
        identity.policy.key_limits.meters_usage() || identity.policy.tenant_limits.meters_usage();
    if metered && !op.usage_is_counted() {
        return Err(OPERATION_NOT_COUNTED);
    }
    Ok(())
}

#[derive(Debug)]
pub struct AuthorizerSettings {
    pub trusted_proxies: Vec<IpNet>,
    pub failure_window: Duration,
    pub max_failures_per_ip: u32,
    pub max_failures_per_prefix: u32,
    /// Concurrent argon2 verifications (each uses one core and 19 MiB).
    pub argon2_slots: usize,
}

/// Verifies presented keys against the store, with a cache and failure throttling.
#[derive(Debug)]
pub struct Authorizer {
    store: KeyStore,
    cache: Arc<KeyCache>,
    static_keys: StaticKeys,
    trusted_proxies: Vec<IpNet>,
    failures: FailureThrottle,
    max_failures_per_ip: u32,
    max_failures_per_prefix: u32,
    argon2_slots: Semaphore,
}

/// How long a check waits for an argon2 slot before answering 503.
const ARGON2_QUEUE_WAIT: Duration = Duration::from_millis(1500);

impl Authorizer {
    pub fn new(
        store: KeyStore,
        cache: Arc<KeyCache>,
        static_keys: StaticKeys,
        s: AuthorizerSettings,
    ) -> Self {
        Self {
            store,
            cache,
            static_keys,
            trusted_proxies: s.trusted_proxies,
            failures: FailureThrottle::new(s.failure_window),
            max_failures_per_ip: s.max_failures_per_ip,
            max_failures_per_prefix: s.max_failures_per_prefix,
            argon2_slots: Semaphore::new(s.argon2_slots.max(1)),
        }
    }

    pub fn cache(&self) -> &Arc<KeyCache> {
        &self.cache
    }

    pub async fn authorize(&self, req: Request<'_>) -> Outcome {
        let ip = client_ip::resolve(
            req.peer,
            req.headers.get("x-forwarded-for").map(String::as_str),
            &self.trusted_proxies,
        );
        let op = Operation::of_path(req.path);
        match self.identify(req, ip).await {
            Ok(identity) => match permit(&identity, op, ip) {
                Ok(()) => Outcome::Allow(Box::new(identity)),
                Err(d) => Outcome::Deny(d),
            },
            Err(d) => Outcome::Deny(d),
        }
    }

    fn ip_subject(ip: Option<IpAddr>) -> String {
        ip.map(|i| format!("ip:{i}"))
            .unwrap_or_else(|| "ip:unknown".into())
    }

    async fn identify(&self, req: Request<'_>, ip: Option<IpAddr>) -> Result<Identity, Denial> {
        let presented = presented_key(req.headers)?;
        if self
            .failures
            .is_blocked(&Self::ip_subject(ip), self.max_failures_per_ip)
        {
            return Err(TOO_MANY_FAILURES);
        }
        let digest = key_cache::digest(presented);
        if let Some(s) = self.static_keys.find(&digest) {
            return Ok(Identity {
                key_id: format!("static:{}", s.name),
                tenant_id: s.tenant.clone(),
                policy: policy::effective(
                    &PolicyRow::default(),
                    Some(&PolicyRow {
                        limits: Limits {
                            rpm: s.rpm,
                            ..Default::default()
                        },
                        ..Default::default()
                    }),
                ),
                log_prompts: false,
            });
        }
        let now = crate::time::unix_now();
        if let Some(identity) = self.cache.get(&digest, now) {
            return Ok(identity);
        }
        let Some(parsed) = key_format::parse(presented) else {
            self.failures.record_failure(&Self::ip_subject(ip));
            return Err(INVALID_KEY);
        };
        let prefix_subject = format!("prefix:{}", parsed.prefix);
        if self
            .failures
            .is_blocked(&prefix_subject, self.max_failures_per_prefix)
        {
            return Err(TOO_MANY_FAILURES);
        }
        let stored = self.store.find_key(parsed.prefix).await.map_err(|e| {
            tracing::warn!(error = %e, "key store lookup failed");
            STORE_UNAVAILABLE
        })?;
        // An unknown prefix still pays for one verification, so timing does not tell an
        // attacker which prefixes exist.
        let hash = stored
            .as_ref()
            .map(|s| s.secret_hash.clone())
            .unwrap_or_else(|| api_key::decoy_hash().to_string());
        let secret_ok = self.verify(parsed.secret, hash).await?;
        let outcome = match &stored {
            Some(s) => judge(s, secret_ok, now),
            None => Err(INVALID_KEY),
        };
        match &outcome {
            Ok(identity) => {
                let expires_at = stored.as_ref().and_then(|s| s.expires_at);
                self.cache.put(digest, identity.clone(), expires_at);
                let store = self.store.clone();
                let key_id = identity.key_id.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.touch_last_used(&key_id, now).await {
                        tracing::debug!(error = %e, "last_used_at not updated");
                    }
                });
            }
            Err(d) if d.code == INVALID_KEY.code => {
                self.failures.record_failure(&Self::ip_subject(ip));
                self.failures.record_failure(&prefix_subject);
            }
            Err(_) => {}
        }
        outcome
    }

    /// argon2 runs on the blocking pool, at most `argon2_slots` at once; a check that
    /// cannot get a slot in time is refused with 503 rather than queueing without bound.
    async fn verify(&self, secret: &str, hash: String) -> Result<bool, Denial> {
        let permit = tokio::time::timeout(ARGON2_QUEUE_WAIT, self.argon2_slots.acquire())
            .await
            .map_err(|_| STORE_UNAVAILABLE)?
            .map_err(|_| STORE_UNAVAILABLE)?;
        let secret = secret.to_string();
        let ok = tokio::task::spawn_blocking(move || api_key::verify_secret(&secret, &hash))
            .await
            .unwrap_or(false);
        drop(permit);
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            secret_hash: String::new(),
            tenant_id: "ten_1".into(),
            tenant_active: true,
            tenant_logs_prompts: false,
            expires_at: None,
            revoked_at: None,
            tenant_policy: PolicyRow::default(),
            key_policy: None,
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
    fn valid_key_is_allowed_with_identity_and_policy() {
        let id = judge(&key(), true, 100).unwrap();
        assert_eq!(id.key_id, "key_1");
        assert_eq!(id.tenant_id, "ten_1");
        assert_eq!(id.policy.models_text(), "*");
    }

    #[test]
    fn wrong_secret_revoked_expired_and_disabled_are_denied() {
        assert_eq!(judge(&key(), false, 100), Err(INVALID_KEY));
        let revoked = KeyRecord {
            revoked_at: Some(1),
            ..key()
        };
        assert_eq!(judge(&revoked, true, 100), Err(REVOKED_KEY));
        let expired = KeyRecord {
            expires_at: Some(100),
            ..key()
        };
        assert_eq!(judge(&expired, true, 100), Err(EXPIRED_KEY));
        assert!(judge(
            &KeyRecord {
                expires_at: Some(101),
                ..key()
            },
            true,
            100
        )
        .is_ok());
        let disabled = KeyRecord {
            tenant_active: false,
            ..key()
        };
        assert_eq!(judge(&disabled, true, 100), Err(TENANT_DISABLED));
    }

    #[test]
    fn policy_denies_other_operations_and_addresses() {
        let mut k = key();
        k.tenant_policy = PolicyRow {
            operations: Some("chat".into()),
            ips: Some("10.0.0.0/8".into()),
            ..Default::default()
        };
        let id = judge(&k, true, 0).unwrap();
        let inside = Some("10.1.1.1".parse().unwrap());
        assert_eq!(permit(&id, Operation::Chat, inside), Ok(()));
        assert_eq!(
            permit(&id, Operation::Embeddings, inside),
            Err(OPERATION_NOT_ALLOWED)
        );
        assert_eq!(
            permit(&id, Operation::Chat, Some("8.8.8.8".parse().unwrap())),
            Err(IP_NOT_ALLOWED)
        );
    }

    #[test]
    fn uncounted_operations_are_refused_to_keys_with_token_or_usd_limits() {
        let mut k = key();
        k.tenant_policy = PolicyRow {
            operations: Some("*".into()),
            ..Default::default()
        };
        let unlimited = judge(&k, true, 0).unwrap();
        assert_eq!(permit(&unlimited, Operation::Images, None), Ok(()));
        assert_eq!(permit(&unlimited, Operation::Other, None), Ok(()));
        let limited = |limits: Limits, tenant: bool| {
            let mut k = k.clone();
            let row = PolicyRow {
                limits,
                ..Default::default()
            };
            if tenant {
                k.tenant_policy.limits = limits;
            } else {
                k.key_policy = Some(row);
            }
            judge(&k, true, 0).unwrap()
        };
        for (limits, tenant) in [
            (
                Limits {
                    tpm: Some(100),
                    ..Default::default()
                },
                false,
            ),
            (
                Limits {
                    budget_day: Some(100),
                    ..Default::default()
                },
                true,
            ),
            (
                Limits {
                    budget_month: Some(100),
                    ..Default::default()
                },
                false,
            ),
            (
                Limits {
                    budget_usd_day: Some(100),
                    ..Default::default()
                },
                false,
            ),
            (
                Limits {
                    budget_usd_month: Some(100),
                    ..Default::default()
                },
                true,
            ),
        ] {
            let id = limited(limits, tenant);
            // Their requests reach the model server without a reservation or a count.
            for op in [
                Operation::Audio,
                Operation::Images,
                Operation::Moderation,
                Operation::Other,
            ] {
                assert_eq!(
                    permit(&id, op, None),
                    Err(OPERATION_NOT_COUNTED),
                    "{op:?} under {limits:?}"
                );
            }
            for op in [
                Operation::Chat,
                Operation::Completions,
                Operation::Embeddings,
                Operation::Models,
            ] {
                assert_eq!(permit(&id, op, None), Ok(()), "{op:?} under {limits:?}");
            }
        }
        // Requests and concurrency are counted for every operation.
        let id = limited(
            Limits {
                rpm: Some(5),
                max_concurrent: Some(1),
                ..Default::default()
            },
            false,
        );
        assert_eq!(permit(&id, Operation::Images, None), Ok(()));
    }
}
