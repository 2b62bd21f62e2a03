//! One contract for the key store and the authorizer on top of it, run against SQLite and
//! against a real PostgreSQL server started for the test.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_authz::api_key;
use tollgate_authz::decision::{self, Authorizer, AuthorizerSettings, Outcome, Request};
use tollgate_authz::key_cache::KeyCache;
use tollgate_authz::key_events;
use tollgate_authz::key_store::{KeyStore, Scope, StoreError};
use tollgate_authz::policy::{Limits, PolicyRow};
use tollgate_authz::static_keys::StaticKeys;
use tollgate_e2e::postgres::Postgres;

fn authorizer(store: &KeyStore, cache: Arc<KeyCache>) -> Authorizer {
    Authorizer::new(
        store.clone(),
        cache,
        StaticKeys::default(),
        AuthorizerSettings {
            trusted_proxies: Vec::new(),
            failure_window: Duration::from_secs(60),
            max_failures_per_ip: 1000,
            max_failures_per_prefix: 1000,
            argon2_slots: 2,
        },
    )
}

async fn check(a: &Authorizer, key: &str, path: &str) -> Outcome {
    let mut headers = HashMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {key}"));
    a.authorize(Request {
        headers: &headers,
        path,
        peer: Some("127.0.0.1"),
    })
    .await
}

async fn new_key(store: &KeyStore, tenant_id: &str, name: &str) -> (String, String) {
    let k = api_key::generate().unwrap();
    let id = store
        .insert_key(tenant_id, name, "", &k.prefix, &k.hash, None)
        .await
        .unwrap();
    (id, k.full_key)
}

async fn contract(store: KeyStore) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap(); // idempotent
    store.ping().await.unwrap();

    // Tenants.
    let t = store.create_tenant("acme", "team=ml").await.unwrap();
    assert!(matches!(
        store.create_tenant("acme", "").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create_tenant("  ", "").await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        store.tenant_by_name("acme").await.unwrap().unwrap().id,
        t.id
    );
    assert!(store.tenant_by_name("nope").await.unwrap().is_none());
    let other = store.create_tenant("beta", "").await.unwrap();
    let names: Vec<String> = store
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme", "beta"]);

    // Keys: lookup by prefix returns the hash, tenant status and default policy.
    let (key_id, key) = new_key(&store, &t.id, "ci").await;
    let prefix = tollgate_core::api_key::parse(&key)
        .unwrap()
        .prefix
        .to_string();
    let rec = store.find_key(&prefix).await.unwrap().unwrap();
    assert_eq!(rec.id, key_id);
    assert_eq!(rec.tenant_id, t.id);
    assert!(rec.tenant_active);
    assert!(rec.secret_hash.starts_with("$argon2id$"));
    assert_eq!(rec.tenant_policy, PolicyRow::default());
    assert_eq!(rec.key_policy, None);
    assert!(store.find_key("000000000000").await.unwrap().is_none());
    let (other_key_id, _) = new_key(&store, &other.id, "b").await;
    assert_eq!(store.list_keys(Some(&t.id)).await.unwrap().len(), 1);
    assert_eq!(store.list_keys(None).await.unwrap().len(), 2);
    assert_eq!(
        store
            .key_info(&other_key_id)
            .await
            .unwrap()
            .unwrap()
            .tenant_name,
        "beta"
    );

    // Policies: tenant row and key override both come back with the key.
    let tenant_policy = PolicyRow {
        models: Some("llama3*".into()),
        operations: Some("chat,models".into()),
        ips: None,
        limits: Limits {
            rpm: Some(100),
            tpm: Some(10_000),
            budget_day: Some(1_000_000),
            budget_month: None,
            budget_usd_day: None,
            budget_usd_month: Some(4_000_000),
            max_concurrent: None,
        },
    };
    store
        .put_policy(Scope::Tenant, &t.id, &tenant_policy)
        .await
        .unwrap();
    let key_policy = PolicyRow {
        limits: Limits {
            rpm: Some(5),
            max_concurrent: Some(2),
            budget_usd_day: Some(125_000),
            ..Default::default()
        },
        ..Default::default()
    };
    store
        .put_policy(Scope::Key, &key_id, &key_policy)
        .await
        .unwrap();
    let rec = store.find_key(&prefix).await.unwrap().unwrap();
    assert_eq!(rec.tenant_policy, tenant_policy);
    assert_eq!(rec.key_policy, Some(key_policy.clone()));
    assert_eq!(
        store.policy(Scope::Key, &key_id).await.unwrap(),
        Some(key_policy)
    );
    assert_eq!(store.policy(Scope::Tenant, &other.id).await.unwrap(), None);

    // The authorizer on top: allow, operation check, cache, revocation via the event log.
    let cache = Arc::new(KeyCache::new(Duration::from_secs(30), 1000));
    let a = authorizer(&store, cache.clone());
    let follower = tokio::spawn(key_events::follow(
        store.clone(),
        cache.clone(),
        Duration::from_millis(100),
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    match check(&a, &key, "/v1/chat/completions").await {
        Outcome::Allow(id) => {
            assert_eq!(id.key_id, key_id);
            assert_eq!(id.policy.models_text(), "llama3*");
            assert_eq!(id.policy.key_limits.rpm, Some(5));
            assert_eq!(id.policy.tenant_limits.tpm, Some(10_000));
        }
        other => panic!("expected allow, got {other:?}"),
    }
    assert_eq!(cache.len(), 1, "a verified key is cached");
    assert_eq!(
        check(&a, &key, "/v1/embeddings").await,
        Outcome::Deny(decision::OPERATION_NOT_ALLOWED)
    );
    let mut wrong = key.clone();
    wrong.pop();
    wrong.push(if key.ends_with('0') { '1' } else { '0' });
    assert_eq!(
        check(&a, &wrong, "/v1/chat/completions").await,
        Outcome::Deny(decision::INVALID_KEY)
    );

    store.revoke_key(&key_id).await.unwrap();
    let revoked_at = Instant::now();
    loop {
        match check(&a, &key, "/v1/chat/completions").await {
            Outcome::Deny(d) => {
                assert_eq!(d, decision::REVOKED_KEY);
                break;
            }
            Outcome::Allow(_) => {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "revocation took over 1 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    println!(
        "revocation reached the cache after {:?}",
        revoked_at.elapsed()
    );
    assert!(matches!(
        store.revoke_key(&key_id).await,
        Err(StoreError::NotFound(_))
    ));

    // Rotation's grace: the sooner expiry wins; disabled tenants are reported.
    let (k2, key2) = new_key(&store, &t.id, "rot").await;
    store
        .expire_key_at(&k2, 4_000_000_000, "key_new")
        .await
        .unwrap();
    store
        .expire_key_at(&k2, 3_000_000_000, "key_new")
        .await
        .unwrap();
    store
        .expire_key_at(&k2, 3_500_000_000, "key_new")
        .await
        .unwrap();
    let info = store.key_info(&k2).await.unwrap().unwrap();
    assert_eq!(info.expires_at, Some(3_000_000_000));
    assert_eq!(info.rotated_to.as_deref(), Some("key_new"));
    store.set_tenant_status("acme", "disabled").await.unwrap();
    let p2 = tollgate_core::api_key::parse(&key2)
        .unwrap()
        .prefix
        .to_string();
    assert!(!store.find_key(&p2).await.unwrap().unwrap().tenant_active);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        check(&a, &key2, "/v1/chat/completions").await,
        Outcome::Deny(decision::TENANT_DISABLED)
    );

    // Event log and last-used bookkeeping.
    let events = store.events_since(0).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|(_, _, k)| k.as_str()).collect();
    assert!(
        kinds.contains(&"key_revoked") && kinds.contains(&"tenant_disabled"),
        "{kinds:?}"
    );
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        store.last_event_id().await.unwrap(),
        events.last().unwrap().0
    );
    store.touch_last_used(&k2, 1234).await.unwrap();
    assert_eq!(
        store.key_info(&k2).await.unwrap().unwrap().last_used_at,
        Some(1234)
    );

    // Nothing stored reveals a secret.
    let secret = tollgate_core::api_key::parse(&key2)
        .unwrap()
        .secret
        .to_string();
    let dump = store.dump_text().await.unwrap();
    assert!(dump.contains(&p2), "dump must cover api_keys");
    assert!(!dump.contains(&secret), "a key secret is stored in clear");
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_key_store_meets_the_contract() {
    let dir = std::env::temp_dir().join(format!("tollgate-contract-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("keys.db").display());
    contract(KeyStore::connect(&url).await.unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_key_store_meets_the_contract() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL did not start: {e}"));
    contract(KeyStore::connect(&pg.url()).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_denies_uncached_keys_with_503_and_serves_cached_ones() {
    let mut pg = Postgres::start().unwrap();
    let store = KeyStore::connect(&pg.url()).await.unwrap();
    store.migrate().await.unwrap();
    let t = store.create_tenant("acme", "").await.unwrap();
    let (_, cached) = new_key(&store, &t.id, "a").await;
    let (_, uncached) = new_key(&store, &t.id, "b").await;
    let cache = Arc::new(KeyCache::new(Duration::from_secs(30), 100));
    let a = authorizer(&store, cache);
    assert!(matches!(
        check(&a, &cached, "/v1/models").await,
        Outcome::Allow(_)
    ));
    pg.stop_server();
    assert!(matches!(
        check(&a, &cached, "/v1/models").await,
        Outcome::Allow(_)
    ));
    assert_eq!(
        check(&a, &uncached, "/v1/models").await,
        Outcome::Deny(decision::STORE_UNAVAILABLE)
    );
    pg.start_server().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if matches!(check(&a, &uncached, "/v1/models").await, Outcome::Allow(_)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not recover after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
