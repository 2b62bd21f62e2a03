//! Envoy RLS v3 `ShouldRateLimit`: maps descriptors to the limiter, answers with
//! per-descriptor statuses, and on OVER_LIMIT with Tollgate's JSON error and
//! `retry-after`. A counter store error is gRPC `UNAVAILABLE`, never OK: Envoy is
//! configured to deny on it.

use crate::config_watch::SharedConfig;
use crate::counter_store::redis_keys;
use crate::counter_store::{CounterStore, StoreError};
use crate::descriptor_config::Config;
use crate::gcra::{Nanos, Verdict};
use crate::ledger::{CounterRef, Ledger, Record};
use crate::limit_policy::{Limit, Unit};
use crate::limiter::{self, Decision, Descriptor, Lease, Outcome};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_core::{error_body, metadata};
use tonic::{Request, Response, Status};

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct RlsService<S> {
    store: Arc<S>,
    config: Arc<SharedConfig>,
    /// Unix second of the last store-error log line: one line per second in an outage,
    /// not one per request.
    last_error_log: AtomicU64,
    shadow_over_limit: AtomicU64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    lease_ttl: Duration,
    ledger: Option<Arc<Ledger>>,
}

impl<S: CounterStore> RlsService<S> {
    pub fn new(store: Arc<S>, config: Arc<SharedConfig>) -> Self {
        Self {
            store,
            config,
            last_error_log: AtomicU64::new(0),
            shadow_over_limit: AtomicU64::new(0),
            metrics: None,
            lease_ttl: limiter::DEFAULT_LEASE_TTL,
            ledger: None,
        }
    }

    /// Records every stream's real usage (`tollgate_phase=usage`) in the budget ledger.
    pub fn with_ledger(mut self, ledger: Arc<Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// How long a concurrency slot is held when its release never comes.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Counts every decision in `metrics` (served on the HTTP side port).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Puts a stream-done call's usage in the budget ledger. Only stream-done calls carry
    /// usage: admission never waits on the ledger.
    async fn record_usage(&self, req: &RateLimitRequest, decision: Option<&Decision>) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        for record in ledger_records(req, decision, crate::ledger::unix_micros()) {
            if let Err(e) = ledger.record(record).await {
                tracing::error!(error = %e, "ledger: usage not recorded");
            }
        }
    }

    /// Decisions a `shadow_mode` limit would have denied, since start.
    pub fn shadow_over_limit_total(&self) -> u64 {
        self.shadow_over_limit.load(Ordering::Relaxed)
    }
}

/// Splits a descriptor into what the limiter needs and the request id entry.
pub fn parse_descriptor(
    d: &RateLimitDescriptor,
    request_hits: u32,
) -> (Descriptor<'_>, Option<&str>) {
    let mut request_id = None;
    let mut lease_id = None;
    let mut entries = Vec::with_capacity(d.entries.len());
    let (mut tokens, mut debit, mut phase_refund) = (false, false, false);
    let mut lease_phase = None;
    let mut usage = false;
    for e in &d.entries {
        // The request id identifies the request, not the limit: never matched, never
        // part of a counter key.
        if e.key == metadata::DESCRIPTOR_REQUEST_ID {
            request_id = Some(e.value.as_str());
        } else if e.key == metadata::LEASE_ID {
            // Names the slot, not the limit: never part of the set's key.
            lease_id = Some(e.value.as_str()).filter(|v| !v.is_empty() && *v != "-");
        } else if e.key == metadata::DESCRIPTOR_PHASE
            && (e.value == metadata::PHASE_LEASE || e.value == metadata::PHASE_RELEASE)
        {
            // Lease and release address one lease set.
            lease_phase = Some(e.value == metadata::PHASE_LEASE);
            entries.push((e.key.as_str(), metadata::PHASE_LEASE));
        } else if e.key == metadata::DESCRIPTOR_PHASE && e.value == metadata::PHASE_USAGE {
            usage = true;
            entries.push((e.key.as_str(), metadata::PHASE_USAGE));
        } else if e.key == metadata::DESCRIPTOR_PHASE {
            // Admission, extra debit and refund all address one token counter.
            tokens = true;
            debit = e.value == metadata::PHASE_TOKENS_EXTRA;
            phase_refund = e.value == metadata::PHASE_TOKENS_REFUND;
            entries.push((e.key.as_str(), metadata::PHASE_TOKENS));
        } else {
            entries.push((e.key.as_str(), e.value.as_str()));
        }
    }
    let limit_override = d.limit.as_ref().and_then(|o| {
        Some(Limit {
            requests_per_unit: o.requests_per_unit,
            unit: Unit::from_envoy(o.unit)?,
        })
    });
    // Envoy sends hits_addend per descriptor; the request-level field is the fallback.
    let hits = match d.hits_addend {
        Some(h) => h.value,
        None if request_hits > 0 => u64::from(request_hits),
        None => 1,
    };
    // The slot is held under tollgate-authz's per-check nonce, else the request id;
    // without either the lease is denied.
    let lease = lease_phase.map(|acquire| {
        let id = lease_id.or(request_id).unwrap_or("");
        if acquire {
            Lease::Acquire(id)
        } else {
            Lease::Release(id)
        }
    });
    let descriptor = Descriptor {
        entries,
        limit_override,
        hits,
        refund: d.is_negative_hits || phase_refund,
        debit,
        tokens,
        lease,
        usage,
    };
    (descriptor, request_id)
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        ..Default::default()
    }
}

fn ceil_secs(n: Nanos) -> u64 {
    n.div_ceil(NANOS_PER_SEC)
}

/// OpenAI's reset format: "20s", "6m0s", "1h2m3s".
pub fn openai_duration(n: Nanos) -> String {
    let s = ceil_secs(n);
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn status_for(outcome: &Outcome, counts: Counts) -> DescriptorStatus {
    match outcome {
        // Not a rate: no limit or reset for Envoy's x-ratelimit-* headers.
        Outcome::Counted { verdict: v, .. } if matches!(counts, Counts::Concurrency { .. }) => {
            DescriptorStatus {
                code: if v.allowed { Code::Ok } else { Code::OverLimit } as i32,
                ..Default::default()
            }
        }
        Outcome::NotLimited => DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        },
        Outcome::Unlimited => DescriptorStatus {
            code: Code::Ok as i32,
            limit_remaining: u32::MAX,
            ..Default::default()
        },
        Outcome::Counted {
            limit,
            name,
            shadow,
            verdict: v,
        } => DescriptorStatus {
            // Shadow mode: counted and reported, but answered OK.
            code: if v.allowed || *shadow {
                Code::Ok
            } else {
                Code::OverLimit
            } as i32,
            current_limit: Some(RateLimit {
                name: name.clone().unwrap_or_default(),
                requests_per_unit: limit.requests_per_unit,
                unit: limit.unit.to_envoy(),
            }),
            limit_remaining: v.remaining,
            duration_until_reset: Some(PbDuration {
                seconds: i64::try_from(ceil_secs(v.reset_after)).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            quota: None,
        },
    }
}

/// What a counted limit limits, for headers and error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    Requests,
    Tokens,
    /// Cost in `tollgate_core::usd` units (a token-phase descriptor with `tollgate_unit=usd`).
    Usd,
    /// Concurrent requests (leases); `tenant`: the slots all of a tenant's keys share.
    Concurrency {
        tenant: bool,
    },
}

/// A token-phase descriptor whose counter counts cost (`tollgate_unit=usd`), not tokens.
/// The entry stays in the counter key, so it never shares a counter with tokens.
fn counts_usd(d: &Descriptor<'_>) -> bool {
    d.entries
        .iter()
        .any(|(k, v)| *k == metadata::DESCRIPTOR_UNIT && *v == metadata::UNIT_USD)
}

/// Token limits over a day or longer are budgets; shorter ones are rates (TPM).
fn is_budget(limit: &Limit) -> bool {
    matches!(
        limit.unit,
        Unit::Day | Unit::Week | Unit::Month | Unit::Year
    )
}

fn refusal(counts: Counts, limit: &Limit) -> (&'static str, &'static str) {
    match counts {
        Counts::Requests => ("rate_limited", "request rate limit reached"),
        Counts::Tokens if is_budget(limit) => ("budget_exceeded", "token budget used up"),
        Counts::Tokens => ("tokens_exhausted", "token rate limit reached"),
        Counts::Usd => ("budget_exceeded", "USD budget used up"),
        Counts::Concurrency { tenant: false } => (
            "too_many_concurrent",
            "too many concurrent requests for this key",
        ),
        Counts::Concurrency { tenant: true } => (
            "too_many_concurrent",
            "too many concurrent requests for this key's tenant",
        ),
    }
}

/// Builds Envoy's answer from a decision; `counts` says, per descriptor, what it counts, and
/// `hits` how much it asked for.
pub fn response_for(
    decision: &Decision,
    counts: &[Counts],
    hits: &[u64],
    request_id: &str,
) -> RateLimitResponse {
    let kinds = || {
        counts
            .iter()
            .copied()
            .chain(std::iter::repeat(Counts::Requests))
    };
    let statuses = decision
        .outcomes
        .iter()
        .zip(kinds())
        .map(|(o, c)| status_for(o, c))
        .collect();
    let enforced = decision
        .outcomes
        .iter()
        .zip(kinds())
        .zip(hits.iter().copied().chain(std::iter::repeat(1)))
        .filter_map(|((o, c), h)| match o {
            Outcome::Counted {
                limit,
                shadow: false,
                verdict,
                ..
            } => Some((c, *limit, *verdict, h)),
            _ => None,
        });
    let mut over: Option<(Counts, Limit, Verdict)> = None;
    // A reservation larger than a whole limit's burst: no wait ever admits it.
    let mut oversized: Option<(Counts, Limit, u64)> = None;
    let mut tightest_requests: Option<(Limit, Verdict)> = None;
    let mut tightest_tokens: Option<(Limit, Verdict)> = None;
    for (c, limit, v, h) in enforced {
        let metered = matches!(c, Counts::Tokens | Counts::Usd);
        if !v.allowed && metered && h > u64::from(limit.requests_per_unit) && oversized.is_none() {
            oversized = Some((c, limit, h));
        }
        // The request is admitted once every denying limit admits: report the longest wait.
        if !v.allowed && over.is_none_or(|(_, _, o)| v.retry_after > o.retry_after) {
            over = Some((c, limit, v));
        }
        let slot = match c {
            Counts::Requests => &mut tightest_requests,
            Counts::Tokens if is_budget(&limit) => continue,
            Counts::Tokens => &mut tightest_tokens,
            // Money is not a rate: no x-ratelimit-* figures.
            Counts::Usd | Counts::Concurrency { .. } => continue,
        };
        if slot.is_none_or(|(_, t)| v.remaining < t.remaining) {
            *slot = Some((limit, v));
        }
    }
    let mut response = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses,
        ..Default::default()
    };
    // OpenAI's headers, for requests and for tokens (per minute), on every answer.
    for (kind, tightest) in [("requests", tightest_requests), ("tokens", tightest_tokens)] {
        if let Some((limit, v)) = tightest {
            response.response_headers_to_add.extend([
                header(
                    &format!("x-ratelimit-limit-{kind}"),
                    limit.requests_per_unit.to_string(),
                ),
                header(
                    &format!("x-ratelimit-remaining-{kind}"),
                    v.remaining.to_string(),
                ),
                header(
                    &format!("x-ratelimit-reset-{kind}"),
                    openai_duration(v.reset_after),
                ),
            ]);
        }
    }
    if let (true, Some((c, limit, h))) = (decision.over_limit, oversized) {
        response.overall_code = Code::OverLimit as i32;
        let (code, what) = refusal(c, &limit);
        let message = format!(
            "{what}: this request's reservation ({h}) is larger than the whole limit ({} per {}), \
             so no wait admits it; ask for fewer max_tokens",
            limit.requests_per_unit,
            limit.unit.name()
        );
        response.response_headers_to_add.extend([
            header("content-type", "application/json".to_string()),
            header(metadata::HEADER_ERROR, code.to_string()),
        ]);
        response.raw_body = error_body::render(429, code, &message, request_id).into_bytes();
    } else if decision.over_limit {
        response.overall_code = Code::OverLimit as i32;
        let retry = over.map_or(1, |(_, _, v)| ceil_secs(v.retry_after).max(1));
        let (code, what) = over.map_or(
            ("rate_limited", "request rate limit reached"),
            |(c, l, _)| refusal(c, &l),
        );
        response
            .response_headers_to_add
            .push(header("retry-after", retry.to_string()));
        response
            .response_headers_to_add
            .push(header("content-type", "application/json".to_string()));
        // The error code header is what the audit log records as the reason.
        response
            .response_headers_to_add
            .push(header(metadata::HEADER_ERROR, code.to_string()));
        response.raw_body =
            error_body::render(429, code, &format!("{what}; retry in {retry}s"), request_id)
                .into_bytes();
    }
    response
}

/// Decides one request: parse, limit, count, answer. `lease_ttl` bounds how long a
/// concurrency slot is held without its release.
pub async fn decide<S: CounterStore>(
    store: &S,
    config: &Config,
    req: &RateLimitRequest,
    lease_ttl: Duration,
) -> Result<(RateLimitResponse, Decision), StoreError> {
    let mut request_id = "";
    let descriptors: Vec<Descriptor<'_>> = req
        .descriptors
        .iter()
        .map(|d| {
            let (descriptor, rid) = parse_descriptor(d, req.hits_addend);
            if let Some(rid) = rid {
                request_id = rid;
            }
            descriptor
        })
        .collect();
    let decision = limiter::decide(store, config, &req.domain, &descriptors, lease_ttl).await?;
    let counts: Vec<Counts> = descriptors
        .iter()
        .map(|d| {
            if d.lease.is_some() {
                Counts::Concurrency {
                    tenant: d
                        .entries
                        .first()
                        .is_some_and(|(k, _)| *k == metadata::TENANT_ID),
                }
            } else if d.tokens && counts_usd(d) {
                Counts::Usd
            } else if d.tokens {
                Counts::Tokens
            } else {
                Counts::Requests
            }
        })
        .collect();
    let hits: Vec<u64> = descriptors.iter().map(|d| d.hits).collect();
    Ok((
        response_for(&decision, &counts, &hits, request_id),
        decision,
    ))
}

/// The ledger records of a stream-done call: one per `usage` descriptor that used tokens,
/// with the cost its `usage` + `tollgate_unit=usd` twin carries (0 without one: the model
/// has no price), each naming the budget counters (day or longer, tokens and USD) the same
/// call debited or refunded. Without a decision (the counter store failed) the counters
/// are the ones Envoy's overrides name: the debit they missed is what reconciliation shows.
pub fn ledger_records(
    req: &RateLimitRequest,
    decision: Option<&Decision>,
    at_us: u64,
) -> Vec<Record> {
    let parsed: Vec<(Descriptor<'_>, Option<&str>)> = req
        .descriptors
        .iter()
        .map(|d| parse_descriptor(d, req.hits_addend))
        .collect();
    let token_usage = |d: &Descriptor<'_>| d.usage && !counts_usd(d) && d.hits > 0;
    if !parsed.iter().any(|(d, _)| token_usage(d)) {
        return Vec::new();
    }
    let limits: Vec<Option<Limit>> = match decision {
        Some(decision) => decision
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Counted { limit, .. } => Some(*limit),
                _ => None,
            })
            .collect(),
        None => parsed.iter().map(|(d, _)| d.limit_override).collect(),
    };
    let counters: Vec<CounterRef> = parsed
        .iter()
        .zip(&limits)
        .filter_map(|((d, _), limit)| match limit {
            Some(limit) if d.tokens && (d.debit || d.refund) && is_budget(limit) => {
                let (kind, id) = d.entries.first()?;
                Some(CounterRef {
                    key: redis_keys::counter_key(&req.domain, &d.entries, limit),
                    subject_kind: kind.to_string(),
                    subject_id: id.to_string(),
                    requests_per_unit: limit.requests_per_unit,
                    unit: limit.unit.name().to_string(),
                    usd: counts_usd(d),
                })
            }
            _ => None,
        })
        .collect();
    parsed
        .iter()
        .filter(|(d, _)| token_usage(d))
        .map(|(d, rid)| {
            let entry = |k: &str| {
                d.entries
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map_or(String::new(), |(_, v)| v.to_string())
            };
            let cost_usd = parsed
                .iter()
                .filter(|(c, crid)| c.usage && counts_usd(c) && crid == rid)
                .map(|(c, _)| c.hits)
                .sum();
            Record {
                request_id: rid.unwrap_or_default().to_string(),
                key_id: entry(metadata::KEY_ID),
                tenant_id: entry(metadata::TENANT_ID),
                tokens: d.hits,
                cost_usd,
                at_us,
                counters: counters.clone(),
            }
        })
        .collect()
}

#[tonic::async_trait]
impl<S: CounterStore> RateLimitService for RlsService<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        let config = self.config.current();
        let started = std::time::Instant::now();
        let result = decide(&*self.store, &config, &req, self.lease_ttl).await;
        if let Some(m) = &self.metrics {
            let label = match &result {
                Ok((_, d)) if d.over_limit => "over_limit",
                Ok(_) => "ok",
                Err(_) => "unavailable",
            };
            m.observe(label, started.elapsed().as_secs_f64());
        }
        match result {
            Ok((resp, decision)) => {
                for o in &decision.outcomes {
                    if let Outcome::Counted {
                        shadow: true,
                        verdict,
                        limit,
                        name,
                    } = o
                    {
                        if !verdict.allowed {
                            self.shadow_over_limit.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                domain = %req.domain,
                                name = name.as_deref().unwrap_or(""),
                                requests_per_unit = limit.requests_per_unit,
                                unit = limit.unit.name(),
                                "shadow mode: over limit, answered OK"
                            );
                        }
                    }
                }
                if decision.over_limit {
                    tracing::debug!(domain = %req.domain, "over limit");
                }
                self.record_usage(&req, Some(&decision)).await;
                Ok(Response::new(resp))
            }
            Err(e) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if self.last_error_log.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(error = %e, "counter store unavailable; answering UNAVAILABLE");
                }
                // The stream was served whatever the counters say: its usage is still real.
                self.record_usage(&req, None).await;
                Err(Status::unavailable("rate limit counters unavailable"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter_store::MemoryStore;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };

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
        let config = Config::default();
        let decide_one = |d: RateLimitDescriptor| {
            let req = request(vec![d]);
            let store = &store;
            let config = &config;
            async move { decide(store, config, &req, TTL).await.unwrap().0 }
        };
        // 100 tokens per minute; a 60-token reservation is admitted.
        let r = decide_one(tokens("tokens", 100, 2, 60)).await;
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
        let r = decide_one(tokens("tokens", 100, 2, 60)).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        assert_eq!(body["error"]["code"], "tokens_exhausted");
        assert_eq!(
            header_value(&r, "x-tollgate-error").as_deref(),
            Some("tokens_exhausted")
        );
        // The first stream used 10: 50 come back, and now 60 fit.
        decide_one(tokens("tokens_refund", 100, 2, 50)).await;
        assert_eq!(
            decide_one(tokens("tokens", 100, 2, 60)).await.overall_code,
            Code::Ok as i32
        );
        // That one used 90: 30 more are debited past what is left, never refused.
        let r = decide_one(tokens("tokens_extra", 100, 2, 30)).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(
            header_value(&r, "x-ratelimit-remaining-tokens").as_deref(),
            Some("0")
        );
        assert_eq!(
            decide_one(tokens("tokens", 100, 2, 1)).await.overall_code,
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
        let config = Config::default();
        let decide_one = |d: RateLimitDescriptor| {
            let req = request(vec![d]);
            let store = &store;
            let config = &config;
            async move { decide(store, config, &req, TTL).await.unwrap().0 }
        };
        for rid in ["r1", "r2"] {
            let r = decide_one(lease("lease", rid, 2)).await;
            assert_eq!(r.overall_code, OK);
            assert!(
                r.statuses[0].current_limit.is_none(),
                "not a rate: no x-ratelimit-* limit"
            );
        }
        let r = decide_one(lease("lease", "r3", 2)).await;
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
        assert_eq!(decide_one(lease("release", "r3", 2)).await.overall_code, OK);
        assert_eq!(decide_one(lease("lease", "r4", 2)).await.overall_code, OVER);
        // r1 ends: its slot is free, once.
        decide_one(lease("release", "r1", 2)).await;
        decide_one(lease("release", "r1", 2)).await;
        assert_eq!(decide_one(lease("lease", "r4", 2)).await.overall_code, OK);
        assert_eq!(decide_one(lease("lease", "r5", 2)).await.overall_code, OVER);
        // A request id that already holds a slot cannot take a second one.
        decide_one(lease("release", "r2", 2)).await;
        assert_eq!(decide_one(lease("lease", "r4", 2)).await.overall_code, OVER);
    }

    #[tokio::test]
    async fn a_slot_is_held_under_the_authz_lease_id_not_a_reused_request_id() {
        let store = MemoryStore::new();
        let config = Config::default();
        let with_nonce = |phase: &str, nonce: &str| {
            let mut d = lease(phase, "client-chosen", 1);
            d.entries.insert(2, entry("lease_id", nonce));
            d
        };
        let run = |d: RateLimitDescriptor| {
            let req = request(vec![d]);
            let (store, config) = (&store, &config);
            async move { decide(store, config, &req, TTL).await.unwrap().0 }
        };
        assert_eq!(run(with_nonce("lease", "n1")).await.overall_code, OK);
        // Another request with the same x-request-id: refused, and its release frees nothing.
        assert_eq!(run(with_nonce("lease", "n2")).await.overall_code, OVER);
        run(with_nonce("release", "n2")).await;
        assert_eq!(run(with_nonce("lease", "n3")).await.overall_code, OVER);
        run(with_nonce("release", "n1")).await;
        assert_eq!(run(with_nonce("lease", "n3")).await.overall_code, OK);
        // Envoy's default when tollgate-authz sent no lease_id: the request id, as before.
        let fallback = with_nonce("lease", "-");
        let (p, _) = parse_descriptor(&fallback, 0);
        assert_eq!(p.lease, Some(Lease::Acquire("client-chosen")));
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
        let run = |d: RateLimitDescriptor| {
            let req = request(vec![d]);
            let store = &store;
            async move {
                decide(store, &Config::default(), &req, TTL)
                    .await
                    .unwrap()
                    .0
            }
        };
        assert_eq!(run(tenant_lease("r1")).await.overall_code, OK);
        let r = run(tenant_lease("r2")).await;
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        assert_eq!(body["error"]["code"], "too_many_concurrent");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("tenant"), "{message}");
        // A key's own slots are the key's.
        assert_eq!(run(lease("lease", "r3", 1)).await.overall_code, OK);
        let r = run(lease("lease", "r4", 1)).await;
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
        let config = Config::default();
        let decide_one = |ds: Vec<RateLimitDescriptor>| {
            let req = request(ds);
            let store = &store;
            let config = &config;
            async move { decide(store, config, &req, TTL).await.unwrap().0 }
        };
        // $0.01 a day (100 units) and, with the same figures, 100 tokens a day.
        let r = decide_one(vec![
            usd("tokens", 100, 4, 80),
            tokens("tokens", 100, 4, 80),
        ])
        .await;
        assert_eq!(r.overall_code, OK, "the two counters do not add up");
        assert_eq!(header_value(&r, "x-ratelimit-limit-tokens"), None);
        // The stream cost 30 of the 80 reserved: 50 come back, and 60 fit again.
        decide_one(vec![usd("tokens_refund", 100, 4, 50)]).await;
        assert_eq!(
            decide_one(vec![usd("tokens", 100, 4, 60)])
                .await
                .overall_code,
            OK
        );
        // It cost 75: 15 more are debited past the budget, never refused.
        let r = decide_one(vec![usd("tokens_extra", 100, 4, 15)]).await;
        assert_eq!(r.overall_code, OK);
        let r = decide_one(vec![usd("tokens", 100, 4, 1)]).await;
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
        let r = decide_one(vec![tokens("tokens", 100, 4, 20)]).await;
        assert_eq!(r.overall_code, OK);
        let r = decide_one(vec![tokens("tokens", 100, 4, 1)]).await;
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

    async fn run(
        store: &MemoryStore,
        config: &Config,
        req: &RateLimitRequest,
    ) -> RateLimitResponse {
        decide(store, config, req, TTL).await.unwrap().0
    }

    const OK: i32 = Code::Ok as i32;
    const OVER: i32 = Code::OverLimit as i32;

    #[test]
    fn request_id_entry_is_neither_matched_nor_counted() {
        let d = descriptor("k1", Some(5));
        let (p, rid) = parse_descriptor(&d, 0);
        assert_eq!(p.entries, vec![("key_id", "k1")]);
        assert_eq!(rid, Some("rid-7"));
        assert_eq!(p.hits, 1);
        assert_eq!(
            p.limit_override,
            Some(Limit {
                requests_per_unit: 5,
                unit: Unit::Minute
            })
        );
    }

    #[test]
    fn hits_come_from_the_descriptor_then_the_request() {
        let mut d = descriptor("k1", Some(5));
        assert_eq!(parse_descriptor(&d, 3).0.hits, 3);
        d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
        assert_eq!(parse_descriptor(&d, 3).0.hits, 0);
        d.is_negative_hits = true;
        assert!(parse_descriptor(&d, 3).0.refund);
    }

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

    #[test]
    fn openai_duration_format() {
        assert_eq!(openai_duration(20 * NANOS_PER_SEC), "20s");
        assert_eq!(openai_duration(360 * NANOS_PER_SEC), "6m0s");
        assert_eq!(openai_duration(3723 * NANOS_PER_SEC), "1h2m3s");
        assert_eq!(openai_duration(1), "1s");
    }
}
