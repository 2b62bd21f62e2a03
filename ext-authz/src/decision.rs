//! The authorization decision, free of gRPC types: which key was presented, whether it is
//! valid, and whether its policy lets this caller use this operation from this address.

use crate::api_key;
use crate::argon2_budget::{Admission, Argon2Budget};
use crate::client_ip;
use crate::failure_throttle::FailureThrottle;
use crate::identity::Identity;
use crate::ip_net::IpNet;
use crate::key_cache::KeyCache;
use crate::key_digest;
use crate::key_store::{KeyRecord, KeyStore};
use crate::policy::{self, Limits, PolicyRow};
use crate::static_keys::StaticKeys;
use crate::store_breaker::StoreBreaker;
use crate::verified_secrets::VerifiedSecrets;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::api_key as key_format;
use tollgate_core::operation::Operation;
use tollgate_core::refusal::{Refusal, RefusalCode};

/// Why a request is refused: one of Tollgate's refusal codes with a fixed message.
/// Messages never contain key material.
pub type Denial = Refusal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Boxed: an identity (with its key and tenant limits) is far larger than a denial.
    Allow(Box<Identity>),
    Deny(Denial),
}

pub const MISSING_KEY: Denial = Denial::new(
    RefusalCode::MissingApiKey,
    "no API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
);
pub const INVALID_KEY: Denial = Denial::new(RefusalCode::InvalidApiKey, "the API key is not valid");
pub const EXPIRED_KEY: Denial = Denial::new(RefusalCode::ExpiredApiKey, "the API key has expired");
pub const REVOKED_KEY: Denial =
    Denial::new(RefusalCode::RevokedApiKey, "the API key has been revoked");
pub const TENANT_DISABLED: Denial = Denial::new(
    RefusalCode::TenantDisabled,
    "the tenant of this API key is disabled",
);
pub const IP_NOT_ALLOWED: Denial = Denial::new(
    RefusalCode::IpNotAllowed,
    "this API key may not be used from this address",
);
pub const OPERATION_NOT_ALLOWED: Denial = Denial::new(
    RefusalCode::OperationNotAllowed,
    "this API key may not use this endpoint",
);
/// The filter counts tokens and cost only for chat, completions and embeddings: any other
/// endpoint's usage would be spent outside the key's token and USD limits.
pub const OPERATION_NOT_COUNTED: Denial = Denial::new(
    RefusalCode::OperationNotAllowed,
    "this endpoint's usage is not counted, so a key with token or USD limits may not use it",
);
pub const TOO_MANY_FAILURES: Denial = Denial::new(
    RefusalCode::TooManyFailedAttempts,
    "too many failed authentication attempts; retry later",
);
pub const STORE_UNAVAILABLE: Denial = Denial::new(
    RefusalCode::AuthzUnavailable,
    "the API key could not be checked right now; retry later",
);
/// The argon2 budget is spent (many uncached keys at once): refused without hashing.
pub const AUTHZ_OVERLOADED: Denial = Denial::new(
    RefusalCode::AuthzOverloaded,
    "too many API keys are being checked at once; retry shortly",
);
pub const CREDENTIAL_UNAVAILABLE: Denial = Denial::new(
    RefusalCode::CredentialUnavailable,
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
    /// Failures from one source address (any key) before it is refused before hashing.
    pub max_failures_per_ip: u32,
    /// Failures from one source address against one key prefix before that source is
    /// refused for that prefix. Other sources are never affected.
    pub max_failures_per_prefix: u32,
    /// Concurrent argon2 verifications (each uses one core and 19 MiB).
    pub argon2_slots: usize,
}

/// Bounds that keep authz answering under floods and outages (`Authorizer::with_safeguards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Safeguards {
    /// Checks that may wait for an argon2 slot; past slots + queue a check is refused at
    /// once with 503 `authz_overloaded`.
    pub argon2_queue: usize,
    /// How long an admitted check may wait for its slot.
    pub argon2_wait: Duration,
    /// A key-store lookup that takes longer is refused with 503 `authz_unavailable`; it
    /// must stay well inside Envoy's ext_authz timeout (2 s in the shipped configs).
    pub store_timeout: Duration,
    /// Keys remembered as genuine (`VerifiedSecrets`).
    pub verified_keys: usize,
}

impl Safeguards {
    pub fn for_slots(argon2_slots: usize) -> Self {
        Self {
            argon2_queue: argon2_slots.max(1).saturating_mul(4),
            argon2_wait: Duration::from_secs(1),
            store_timeout: Duration::from_millis(500),
            verified_keys: 100_000,
        }
    }
}

/// Verifies presented keys against the store, with a cache, failure throttling, a global
/// argon2 budget and a fail-fast key-store breaker.
///
/// Brute-force protection never works against a valid key: a key found in the cache or in
/// `VerifiedSecrets` skips every throttle, and failures are counted per source address
/// and per (source address, key prefix), so guesses from one source never lock out the
/// prefix's owner elsewhere. CPU is bounded by the argon2 budget, whoever sends the keys.
#[derive(Debug)]
pub struct Authorizer {
    store: KeyStore,
    cache: Arc<KeyCache>,
    static_keys: StaticKeys,
    trusted_proxies: Vec<IpNet>,
    failures: FailureThrottle,
    max_failures_per_ip: u32,
    max_failures_per_prefix: u32,
    argon2_slots: usize,
    argon2: Argon2Budget,
    genuine: VerifiedSecrets,
    store_breaker: StoreBreaker,
}

impl Authorizer {
    pub fn new(
        store: KeyStore,
        cache: Arc<KeyCache>,
        static_keys: StaticKeys,
        s: AuthorizerSettings,
    ) -> Self {
        let slots = s.argon2_slots.max(1);
        let guards = Safeguards::for_slots(slots);
        Self {
            store,
            cache,
            static_keys,
            trusted_proxies: s.trusted_proxies,
            failures: FailureThrottle::new(s.failure_window),
            max_failures_per_ip: s.max_failures_per_ip,
            max_failures_per_prefix: s.max_failures_per_prefix,
            argon2_slots: slots,
            argon2: Argon2Budget::new(slots, guards.argon2_queue, guards.argon2_wait),
            genuine: VerifiedSecrets::new(guards.verified_keys),
            store_breaker: StoreBreaker::new(guards.store_timeout),
        }
    }

    pub fn with_safeguards(mut self, g: Safeguards) -> Self {
        self.argon2 = Argon2Budget::new(self.argon2_slots, g.argon2_queue, g.argon2_wait);
        self.genuine = VerifiedSecrets::new(g.verified_keys);
        self.store_breaker = StoreBreaker::new(g.store_timeout);
        self
    }

    pub fn cache(&self) -> &Arc<KeyCache> {
        &self.cache
    }

    pub fn argon2(&self) -> &Argon2Budget {
        &self.argon2
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

    fn source_subject(ip: Option<IpAddr>) -> String {
        ip.map(|i| format!("src:{i}"))
            .unwrap_or_else(|| "src:unknown".into())
    }

    async fn identify(&self, req: Request<'_>, ip: Option<IpAddr>) -> Result<Identity, Denial> {
        let presented = presented_key(req.headers)?;
        let digest = key_digest::digest(presented);
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
        // A key that verified before is never held back by anyone's failures, the
        // caller's own address included (it may be shared: NAT, an untrusted proxy).
        let genuine = self.genuine.knows(&digest);
        let source = Self::source_subject(ip);
        if !genuine && self.failures.is_blocked(&source, self.max_failures_per_ip) {
            return Err(TOO_MANY_FAILURES);
        }
        let Some(parsed) = key_format::parse(presented) else {
            self.failures.record_failure(&source);
            return Err(INVALID_KEY);
        };
        let source_prefix = format!("{source}|prefix:{}", parsed.prefix);
        if !genuine
            && self
                .failures
                .is_blocked(&source_prefix, self.max_failures_per_prefix)
        {
            return Err(TOO_MANY_FAILURES);
        }
        // An unproven key takes its place in the argon2 budget before any work (the store
        // lookup included), so a flood of them is refused at once instead of queueing on
        // the store or the CPU; a genuine key takes one only if its hash changed.
        let admission = if genuine { None } else { Some(self.admit()?) };
        let stored = self
            .store_breaker
            .run(self.store.find_key(parsed.prefix))
            .await
            .map_err(|_| STORE_UNAVAILABLE)?;
        let secret_ok = match &stored {
            Some(s) if self.genuine.verified(&digest, &s.secret_hash) => true,
            _ => {
                // An unknown prefix still pays for one verification, so timing does not
                // tell an attacker which prefixes exist; the budget bounds what that costs.
                let hash = stored.as_ref().map_or_else(
                    || api_key::decoy_hash().to_string(),
                    |s| s.secret_hash.clone(),
                );
                let admission = match admission {
                    Some(a) => a,
                    None => self.admit()?,
                };
                let ok = self.verify(admission, parsed.secret, hash).await?;
                if let (true, Some(s)) = (ok, &stored) {
                    self.genuine.remember(digest, &s.secret_hash);
                }
                ok
            }
        };
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
            Err(d) if d.code == RefusalCode::InvalidApiKey => {
                self.failures.record_failure(&source);
                self.failures.record_failure(&source_prefix);
            }
            Err(_) => {}
        }
        outcome
    }

    fn admit(&self) -> Result<Admission, Denial> {
        self.argon2.admit().map_err(|_| AUTHZ_OVERLOADED)
    }

    async fn verify(&self, a: Admission, secret: &str, hash: String) -> Result<bool, Denial> {
        self.argon2
            .verify(a, secret, hash)
            .await
            .map_err(|_| AUTHZ_OVERLOADED)
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

    /// An authorizer on a fresh SQLite store with the verified-key cache off, so every
    /// check goes past the cache as it does after a TTL end or a key event.
    async fn uncached_authorizer(tag: &str) -> (Authorizer, KeyStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-decision-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = KeyStore::connect(&format!("sqlite://{}", dir.join("k.db").display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let a = Authorizer::new(
            store.clone(),
            Arc::new(KeyCache::new(Duration::ZERO, 10)),
            StaticKeys::default(),
            AuthorizerSettings {
                trusted_proxies: Vec::new(),
                failure_window: Duration::from_secs(60),
                max_failures_per_ip: 30,
                max_failures_per_prefix: 10,
                argon2_slots: 2,
            },
        );
        (a, store, dir)
    }

    async fn new_key(store: &KeyStore) -> String {
        let t = match store.tenant_by_name("acme").await.unwrap() {
            Some(t) => t,
            None => store.create_tenant("acme", "").await.unwrap(),
        };
        let k = api_key::generate().unwrap();
        store
            .insert_key(&t.id, "k", "", &k.prefix, &k.hash, None)
            .await
            .unwrap();
        k.full_key
    }

    async fn check(a: &Authorizer, key: &str, peer: &str) -> Result<(), RefusalCode> {
        let h = headers(&[("authorization", &format!("Bearer {key}"))]);
        let req = Request {
            headers: &h,
            path: "/v1/chat/completions",
            peer: Some(peer),
        };
        match a.authorize(req).await {
            Outcome::Allow(_) => Ok(()),
            Outcome::Deny(d) => Err(d.code),
        }
    }

    fn guess(key: &str, n: usize) -> String {
        let prefix = key_format::parse(key).unwrap().prefix;
        format!("tg_{prefix}_{n:048x}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_that_verified_is_never_throttled_even_from_the_guessing_address() {
        let (a, store, dir) = uncached_authorizer("genuine").await;
        let key = new_key(&store).await;
        assert_eq!(check(&a, &key, "10.0.0.1").await, Ok(()));
        let runs = a.argon2().runs();
        // Past the per-(address, prefix) limit (10), then past the per-address one (30)
        // with unknown prefixes.
        let mut last = Ok(());
        for n in 0..12 {
            last = check(&a, &guess(&key, n), "10.0.0.1").await;
        }
        assert_eq!(
            last,
            Err(TOO_MANY_FAILURES.code),
            "the guesser is throttled"
        );
        for n in 0..25u64 {
            last = check(&a, &format!("tg_{n:012x}_{n:048x}"), "10.0.0.1").await;
        }
        assert_eq!(last, Err(TOO_MANY_FAILURES.code));
        assert_eq!(
            check(&a, "tg_junk", "10.0.0.1").await,
            Err(TOO_MANY_FAILURES.code)
        );
        let before = a.argon2().runs();
        assert_eq!(check(&a, &key, "10.0.0.1").await, Ok(()));
        assert_eq!(check(&a, &key, "10.0.0.1").await, Ok(()));
        assert_eq!(
            a.argon2().runs(),
            before,
            "a known key skips argon2 on a miss"
        );
        assert_eq!(
            before - runs,
            30,
            "only the guesses before each block were hashed"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guesses_from_one_address_never_count_against_another() {
        let (a, store, dir) = uncached_authorizer("sources").await;
        let key = new_key(&store).await;
        for n in 0..12 {
            let _ = check(&a, &guess(&key, n), "203.0.113.9").await;
        }
        assert_eq!(
            check(&a, &key, "203.0.113.9").await,
            Err(TOO_MANY_FAILURES.code),
            "a key never verified is refused from the blocked source, before hashing"
        );
        assert_eq!(check(&a, &key, "198.51.100.1").await, Ok(()));
        // Verified now: from the blocked source too.
        assert_eq!(check(&a, &key, "203.0.113.9").await, Ok(()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
