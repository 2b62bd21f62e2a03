use super::*;
use crate::counter_store::MemoryStore;
use crate::envoy_descriptor;
use crate::gcra::Verdict;
use crate::limiter::{Lease, Phase};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

const TTL: Duration = limiter::DEFAULT_LEASE_TTL;

fn entry(k: &str, v: &str) -> Entry {
    Entry {
        key: k.into(),
        value: v.into(),
    }
}

fn descriptor(key: &str, rpm: Option<u32>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![entry("key_id", key), entry("request_id", "rid-7")],
        limit: rpm.map(|n| RateLimitOverride {
            requests_per_unit: n,
            unit: 2,
        }),
        ..Default::default()
    }
}

/// A token descriptor of `phase` for key `k1`, limit `n` per `unit`, costing `hits`.
fn tokens(phase: &str, n: u32, unit: i32, hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![
            entry("key_id", "k1"),
            entry("tollgate_phase", phase),
            entry("request_id", "rid-9"),
        ],
        limit: Some(RateLimitOverride {
            requests_per_unit: n,
            unit,
        }),
        hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: hits }),
        ..Default::default()
    }
}

#[tokio::test]
async fn tokens_are_reserved_then_refunded_or_debited_on_one_counter() {
    let store = MemoryStore::new();
    // 100 tokens per minute; a 60-token reservation is admitted.
    let r = answer(&store, vec![tokens("tokens", 100, 2, 60)]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(
        header_value(&r, "x-ratelimit-limit-tokens").as_deref(),
        Some("100")
    );
    assert_eq!(
        header_value(&r, "x-ratelimit-remaining-tokens").as_deref(),
        Some("40")
    );
    // A second 60 does not fit: tokens_exhausted, nothing consumed.
    let r = answer(&store, vec![tokens("tokens", 100, 2, 60)]).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "tokens_exhausted");
    assert_eq!(
        header_value(&r, "x-tollgate-error").as_deref(),
        Some("tokens_exhausted")
    );
    // The first stream used 10: 50 come back, and now 60 fit.
    answer(&store, vec![tokens("tokens_refund", 100, 2, 50)]).await;
    assert_eq!(
        answer(&store, vec![tokens("tokens", 100, 2, 60)])
            .await
            .overall_code,
        Code::Ok as i32
    );
    // That one used 90: 30 more are debited past what is left, never refused.
    let r = answer(&store, vec![tokens("tokens_extra", 100, 2, 30)]).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(
        header_value(&r, "x-ratelimit-remaining-tokens").as_deref(),
        Some("0")
    );
    assert_eq!(
        answer(&store, vec![tokens("tokens", 100, 2, 1)])
            .await
            .overall_code,
        Code::OverLimit as i32
    );
}

/// A concurrency descriptor of `phase` for key `k1` and request `rid`, at most `n`.
fn lease(phase: &str, rid: &str, n: u32) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![
            entry("key_id", "k1"),
            entry("tollgate_phase", phase),
            entry("request_id", rid),
        ],
        limit: Some(RateLimitOverride {
            requests_per_unit: n,
            unit: 2,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn concurrent_requests_hold_slots_until_released() {
    let store = MemoryStore::new();
    for rid in ["r1", "r2"] {
        let r = answer(&store, vec![lease("lease", rid, 2)]).await;
        assert_eq!(r.overall_code, OK);
        assert!(
            r.statuses[0].current_limit.is_none(),
            "not a rate: no x-ratelimit-* limit"
        );
    }
    let r = answer(&store, vec![lease("lease", "r3", 2)]).await;
    assert_eq!(r.overall_code, OVER);
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "too_many_concurrent");
    assert_eq!(body["error"]["request_id"], "r3");
    assert_eq!(header_value(&r, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        header_value(&r, "x-ratelimit-limit-requests"),
        None,
        "concurrency is not a request rate"
    );
    // The denied request's release (Envoy sends it at stream end) frees nothing.
    assert_eq!(
        answer(&store, vec![lease("release", "r3", 2)])
            .await
            .overall_code,
        OK
    );
    assert_eq!(
        answer(&store, vec![lease("lease", "r4", 2)])
            .await
            .overall_code,
        OVER
    );
    // r1 ends: its slot is free, once.
    answer(&store, vec![lease("release", "r1", 2)]).await;
    answer(&store, vec![lease("release", "r1", 2)]).await;
    assert_eq!(
        answer(&store, vec![lease("lease", "r4", 2)])
            .await
            .overall_code,
        OK
    );
    assert_eq!(
        answer(&store, vec![lease("lease", "r5", 2)])
            .await
            .overall_code,
        OVER
    );
    // A request id that already holds a slot cannot take a second one.
    answer(&store, vec![lease("release", "r2", 2)]).await;
    assert_eq!(
        answer(&store, vec![lease("lease", "r4", 2)])
            .await
            .overall_code,
        OVER
    );
}

#[tokio::test]
async fn a_slot_is_held_under_the_authz_lease_id_not_a_reused_request_id() {
    let store = MemoryStore::new();
    let with_nonce = |phase: &str, nonce: &str| {
        let mut d = lease(phase, "client-chosen", 1);
        d.entries.insert(2, entry("lease_id", nonce));
        d
    };
    assert_eq!(
        answer(&store, vec![with_nonce("lease", "n1")])
            .await
            .overall_code,
        OK
    );
    // Another request with the same x-request-id: refused, and its release frees nothing.
    assert_eq!(
        answer(&store, vec![with_nonce("lease", "n2")])
            .await
            .overall_code,
        OVER
    );
    answer(&store, vec![with_nonce("release", "n2")]).await;
    assert_eq!(
        answer(&store, vec![with_nonce("lease", "n3")])
            .await
            .overall_code,
        OVER
    );
    answer(&store, vec![with_nonce("release", "n1")]).await;
    assert_eq!(
        answer(&store, vec![with_nonce("lease", "n3")])
            .await
            .overall_code,
        OK
    );
    // Envoy's default when tollgate-authz sent no lease_id: the request id, as before.
    let fallback = with_nonce("lease", "-");
    let p = envoy_descriptor::parse(&fallback, 0).descriptor;
    assert_eq!(p.phase, Phase::Lease(Lease::Acquire("client-chosen")));
    assert_eq!(p.entries, [("key_id", "k1"), ("tollgate_phase", "lease")]);
}

#[tokio::test]
async fn a_full_tenant_is_named_in_the_refusal() {
    let store = MemoryStore::new();
    let tenant_lease = |rid: &str| {
        let mut d = lease("lease", rid, 1);
        d.entries[0] = entry("tenant_id", "t1");
        d
    };
    assert_eq!(
        answer(&store, vec![tenant_lease("r1")]).await.overall_code,
        OK
    );
    let r = answer(&store, vec![tenant_lease("r2")]).await;
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "too_many_concurrent");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("tenant"), "{message}");
    // A key's own slots are the key's.
    assert_eq!(
        answer(&store, vec![lease("lease", "r3", 1)])
            .await
            .overall_code,
        OK
    );
    let r = answer(&store, vec![lease("lease", "r4", 1)]).await;
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("tenant"), "{message}");
}

#[tokio::test]
async fn a_lease_without_a_request_id_is_denied() {
    let store = MemoryStore::new();
    let mut d = lease("lease", "x", 5);
    d.entries.pop();
    let (r, _) = decide(&store, &Config::default(), &request(vec![d]), TTL)
        .await
        .unwrap();
    assert_eq!(r.overall_code, OVER);
}

#[tokio::test]
async fn a_reservation_larger_than_the_whole_limit_is_not_told_to_retry() {
    let store = MemoryStore::new();
    let config = Config::default();
    // 5000 tokens asked against 1000 per minute: no wait ever admits it.
    for d in [
        tokens("tokens", 1000, 2, 5000),
        usd("tokens", 1000, 4, 5000),
    ] {
        let (r, _) = decide(&store, &config, &request(vec![d]), TTL)
            .await
            .unwrap();
        assert_eq!(r.overall_code, OVER);
        assert_eq!(
            header_value(&r, "retry-after"),
            None,
            "retrying cannot help"
        );
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("larger than the whole limit"), "{message}");
        assert!(!message.contains("retry in"), "{message}");
    }
    // One that fits the limit, later, is still told when.
    let (r, _) = decide(
        &store,
        &config,
        &request(vec![tokens("tokens", 1000, 2, 1000)]),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(r.overall_code, OK);
    let (r, _) = decide(
        &store,
        &config,
        &request(vec![tokens("tokens", 1000, 2, 10)]),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(r.overall_code, OVER);
    assert!(header_value(&r, "retry-after").is_some());
}

#[tokio::test]
async fn a_daily_token_limit_is_a_budget() {
    let store = MemoryStore::new();
    let config = Config::default();
    let req = request(vec![tokens("tokens", 50, 4, 60)]);
    let (r, _) = decide(&store, &config, &req, TTL).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(
        header_value(&r, "x-ratelimit-limit-tokens"),
        None,
        "budgets are not TPM"
    );
}

/// A USD descriptor: a token descriptor of `phase` whose counter counts cost.
fn usd(phase: &str, n: u32, unit: i32, hits: u64) -> RateLimitDescriptor {
    let mut d = tokens(phase, n, unit, hits);
    d.entries.insert(2, entry("tollgate_unit", "usd"));
    d
}

#[tokio::test]
async fn usd_budget_has_its_own_counter_and_is_refused_as_budget_exceeded() {
    let store = MemoryStore::new();
    // $0.01 a day (100 units) and, with the same figures, 100 tokens a day.
    let r = answer(
        &store,
        vec![usd("tokens", 100, 4, 80), tokens("tokens", 100, 4, 80)],
    )
    .await;
    assert_eq!(r.overall_code, OK, "the two counters do not add up");
    assert_eq!(header_value(&r, "x-ratelimit-limit-tokens"), None);
    // The stream cost 30 of the 80 reserved: 50 come back, and 60 fit again.
    answer(&store, vec![usd("tokens_refund", 100, 4, 50)]).await;
    assert_eq!(
        answer(&store, vec![usd("tokens", 100, 4, 60)])
            .await
            .overall_code,
        OK
    );
    // It cost 75: 15 more are debited past the budget, never refused.
    let r = answer(&store, vec![usd("tokens_extra", 100, 4, 15)]).await;
    assert_eq!(r.overall_code, OK);
    let r = answer(&store, vec![usd("tokens", 100, 4, 1)]).await;
    assert_eq!(r.overall_code, OVER);
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("USD budget used up"), "{message}");
    assert_eq!(
        header_value(&r, "x-tollgate-error").as_deref(),
        Some("budget_exceeded")
    );
    assert!(header_value(&r, "retry-after").is_some());
    // The token counter of the same key and limit was untouched by the USD calls.
    let r = answer(&store, vec![tokens("tokens", 100, 4, 20)]).await;
    assert_eq!(r.overall_code, OK);
    let r = answer(&store, vec![tokens("tokens", 100, 4, 1)]).await;
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(
        body["error"]["message"]
            .as_str()
            .map(|m| m.starts_with("token budget")),
        Some(true)
    );
}

#[tokio::test]
async fn the_ledger_records_the_cost_and_marks_usd_counters() {
    let store = MemoryStore::new();
    let config = Config::default();
    let usage = |tag: Option<&str>, hits| {
        let mut d = tokens("usage", 0, 4, hits);
        d.limit = None;
        d.entries.insert(1, entry("tenant_id", "t1"));
        if let Some(unit) = tag {
            d.entries.insert(3, entry("tollgate_unit", unit));
        }
        d
    };
    let req = request(vec![
        usage(None, 12),
        usage(Some("usd"), 102),
        tokens("tokens_refund", 1000, 4, 30),
        usd("tokens_refund", 1000, 4, 30),
    ]);
    let (_, decision) = decide(&store, &config, &req, TTL).await.unwrap();
    let records = ledger_records(&req, Some(&decision), 1);
    assert_eq!(records.len(), 1, "the cost is not a record of its own");
    assert_eq!((records[0].tokens, records[0].cost_usd), (12, 102));
    let counters: Vec<(bool, bool)> = records[0]
        .counters
        .iter()
        .map(|c| (c.usd, c.key.contains("tollgate_unit=usd")))
        .collect();
    assert_eq!(counters, [(false, false), (true, true)]);
    // An unpriced model: no cost descriptor, cost 0.
    let req = request(vec![usage(None, 12)]);
    let (_, decision) = decide(&store, &config, &req, TTL).await.unwrap();
    assert_eq!(ledger_records(&req, Some(&decision), 1)[0].cost_usd, 0);
}

/// A counter store that never answers (Redis down or slow).
struct DownStore;

impl CounterStore for DownStore {
    async fn hit_batch(
        &self,
        _hits: &[crate::counter_store::Hit],
    ) -> Result<Vec<Verdict>, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(500)))
    }

    async fn expires_in(&self, _key: &str) -> Result<Option<Duration>, StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(500)))
    }
}

#[tokio::test]
async fn usage_reaches_the_ledger_while_the_counter_store_is_down() {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-rls-ledger-{}-{}",
        std::process::id(),
        crate::ledger::unix_micros()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("ledger.db").display());
    let db = crate::ledger::LedgerDb::connect(&url).await.unwrap();
    let ledger = Arc::new(Ledger::open(&dir.join("buffer"), db.clone()).await.unwrap());
    let service = RlsService::new(
        Arc::new(DownStore),
        Arc::new(SharedConfig::new(Config::default())),
    )
    .with_ledger(ledger.clone());
    let mut usage = tokens("usage", 0, 4, 12);
    usage.limit = None;
    let req = request(vec![usage, tokens("tokens_refund", 1000, 4, 30)]);
    let answer = service.should_rate_limit(Request::new(req)).await;
    assert_eq!(
        answer.unwrap_err().code(),
        tonic::Code::Unavailable,
        "a store error is never OK"
    );
    // The debit is lost from the counters, but the stream's usage is not lost from
    // the ledger, which is what reconciliation needs to see the loss.
    ledger.flush().await.unwrap();
    assert_eq!(db.row_count().await.unwrap(), 1);
    let counters = db.counters().await.unwrap();
    assert_eq!(counters.len(), 1, "the budget counter it was meant for");
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(ds: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "tollgate".into(),
        descriptors: ds,
        hits_addend: 0,
    }
}

fn header_value(r: &RateLimitResponse, name: &str) -> Option<String> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.clone())
}

async fn answer(store: &MemoryStore, ds: Vec<RateLimitDescriptor>) -> RateLimitResponse {
    run(store, &Config::default(), &request(ds)).await
}

async fn run(store: &MemoryStore, config: &Config, req: &RateLimitRequest) -> RateLimitResponse {
    decide(store, config, req, TTL).await.unwrap().0
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn over_limit_gets_json_body_retry_after_and_openai_headers() {
    let store = MemoryStore::new();
    let config = Config::default();
    let req = request(vec![descriptor("k1", Some(2))]);
    let first = run(&store, &config, &req).await;
    assert_eq!(first.overall_code, OK);
    assert_eq!(
        header_value(&first, "x-ratelimit-remaining-requests").as_deref(),
        Some("1")
    );
    assert_eq!(
        header_value(&first, "x-ratelimit-limit-requests").as_deref(),
        Some("2")
    );
    assert_eq!(run(&store, &config, &req).await.overall_code, OK);
    let third = run(&store, &config, &req).await;
    assert_eq!(third.overall_code, OVER);
    assert_eq!(header_value(&third, "retry-after").as_deref(), Some("30"));
    assert_eq!(
        header_value(&third, "x-tollgate-error").as_deref(),
        Some("rate_limited")
    );
    let body: serde_json::Value = serde_json::from_slice(&third.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["request_id"], "rid-7");
    assert_eq!(third.statuses[0].code, OVER);
    assert_eq!(
        third.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        2
    );
}

#[tokio::test]
async fn descriptor_without_limit_is_not_limited() {
    let store = MemoryStore::new();
    let req = request(vec![descriptor("k1", None)]);
    for _ in 0..100 {
        assert_eq!(run(&store, &Config::default(), &req).await.overall_code, OK);
    }
    assert!(store.is_empty(), "nothing may be counted");
}

const FILE: &str = r#"
domain: tollgate
descriptors:
  - key: key_id
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: key_id
    value: vip
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: tenant_id
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, name: tenant}
  - key: internal
    rate_limit: {unlimited: true}
  - key: model
    rate_limit: {unit: minute, requests_per_unit: 1, name: per_model}
  - key: model_wide
    rate_limit: {unit: minute, requests_per_unit: 3, name: wide, replaces: [{name: per_model}]}
"#;

fn admitted(store: &MemoryStore, config: &Config, req: &RateLimitRequest, n: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    (0..n)
        .filter(|_| rt.block_on(run(store, config, req)).overall_code == OK)
        .count()
}

#[test]
fn file_limits_apply_with_value_precedence_and_the_override_wins() {
    let config = Config::from_yaml(FILE).unwrap();
    let store = MemoryStore::new();
    assert_eq!(
        admitted(&store, &config, &request(vec![descriptor("k1", None)]), 10),
        2
    );
    assert_eq!(
        admitted(&store, &config, &request(vec![descriptor("vip", None)]), 10),
        4
    );
    // Envoy's override beats the file.
    assert_eq!(
        admitted(
            &store,
            &config,
            &request(vec![descriptor("k9", Some(7))]),
            10
        ),
        7
    );
}

#[test]
fn shadow_mode_counts_and_reports_but_answers_ok() {
    let config = Config::from_yaml(FILE).unwrap();
    let store = MemoryStore::new();
    let d = RateLimitDescriptor {
        entries: vec![entry("tenant_id", "t1")],
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let first = rt.block_on(run(&store, &config, &request(vec![d.clone()])));
    assert_eq!(first.statuses[0].limit_remaining, 0);
    let second = rt.block_on(run(&store, &config, &request(vec![d])));
    assert_eq!(second.overall_code, OK);
    assert_eq!(second.statuses[0].code, OK);
    assert_eq!(
        second.statuses[0].current_limit.as_ref().unwrap().name,
        "tenant"
    );
    assert_eq!(store.len(), 1, "the shadow counter is counted");
}

#[test]
fn unlimited_is_ok_and_not_counted() {
    let config = Config::from_yaml(FILE).unwrap();
    let store = MemoryStore::new();
    let d = RateLimitDescriptor {
        entries: vec![entry("internal", "x")],
        ..Default::default()
    };
    assert_eq!(admitted(&store, &config, &request(vec![d.clone()]), 50), 50);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let r = rt.block_on(run(&store, &config, &request(vec![d])));
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    assert!(store.is_empty());
}

#[test]
fn replaced_limit_is_not_checked() {
    let config = Config::from_yaml(FILE).unwrap();
    let model = RateLimitDescriptor {
        entries: vec![entry("model", "llama3")],
        ..Default::default()
    };
    let wide = RateLimitDescriptor {
        entries: vec![entry("model_wide", "all")],
        ..Default::default()
    };
    // Alone, per_model admits one.
    let store = MemoryStore::new();
    assert_eq!(
        admitted(&store, &config, &request(vec![model.clone()]), 5),
        1
    );
    // With `wide` in the same request, per_model is replaced: wide's 3 apply.
    let store = MemoryStore::new();
    assert_eq!(admitted(&store, &config, &request(vec![model, wide]), 5), 3);
}

#[test]
fn a_denied_request_consumes_no_other_limit() {
    let store = MemoryStore::new();
    let config = Config::default();
    let tight = descriptor("tight", Some(1));
    let roomy = descriptor("roomy", Some(10));
    let both = request(vec![roomy.clone(), tight]);
    assert_eq!(admitted(&store, &config, &both, 5), 1);
    // Four denied requests did not consume `roomy`: 9 left.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let r = rt.block_on(run(&store, &config, &request(vec![roomy])));
    assert_eq!(r.statuses[0].limit_remaining, 8);
}
