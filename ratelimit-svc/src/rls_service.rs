//! Envoy RLS v3 `ShouldRateLimit`: maps descriptors to counters, answers with per-descriptor
//! statuses, and on OVER_LIMIT with Tollgate's JSON error and `retry-after`.

use crate::counter_store::MemoryStore;
use crate::gcra::{Nanos, Verdict};
use crate::limit_policy::{Limit, Unit};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::sync::Arc;
use tollgate_core::{error_body, metadata};
use tonic::{Request, Response, Status};

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct RlsService {
    store: Arc<MemoryStore>,
}

impl RlsService {
    pub fn new(store: Arc<MemoryStore>) -> Self {
        Self { store }
    }
}

/// One descriptor, reduced to what the limiter needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Counter key: the domain and the limit-bearing entries, in order.
    pub counter_key: String,
    pub limit: Option<Limit>,
    pub hits: u64,
    pub request_id: Option<String>,
}

pub fn parse_descriptor(domain: &str, d: &RateLimitDescriptor, request_hits: u32) -> Parsed {
    let mut counter_key = String::with_capacity(64);
    counter_key.push_str(domain);
    let mut request_id = None;
    for e in &d.entries {
        if e.key == metadata::DESCRIPTOR_REQUEST_ID {
            request_id = Some(e.value.clone());
            continue;
        }
        counter_key.push('|');
        counter_key.push_str(&e.key);
        counter_key.push('=');
        counter_key.push_str(&e.value);
    }
    let limit = d.limit.as_ref().and_then(|o| {
        Some(Limit {
            requests_per_unit: o.requests_per_unit,
            unit: Unit::from_envoy(o.unit)?,
        })
    });
    if let Some(l) = &limit {
        // A changed override starts a fresh counter instead of inheriting a TAT computed
        // with another interval.
        counter_key.push_str(&format!("#{}/{}", l.requests_per_unit, l.unit.to_envoy()));
    }
    // Envoy sends hits_addend per descriptor; the request-level field is the fallback.
    let hits = match d.hits_addend {
        Some(h) => h.value,
        None if request_hits > 0 => u64::from(request_hits),
        None => 1,
    };
    // Refunds come with is_negative_hits; they must never consume.
    let hits = if d.is_negative_hits { 0 } else { hits };
    Parsed {
        counter_key,
        limit,
        hits,
        request_id,
    }
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

fn status_for(limit: &Limit, v: &Verdict) -> DescriptorStatus {
    DescriptorStatus {
        code: if v.allowed { Code::Ok } else { Code::OverLimit } as i32,
        current_limit: Some(RateLimit {
            name: String::new(),
            requests_per_unit: limit.requests_per_unit,
            unit: limit.unit.to_envoy(),
        }),
        limit_remaining: v.remaining,
        duration_until_reset: Some(PbDuration {
            seconds: i64::try_from(ceil_secs(v.reset_after)).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        quota: None,
    }
}

/// Decides one request against a store. Pure apart from the store, for tests.
pub fn decide(store: &MemoryStore, req: &RateLimitRequest) -> RateLimitResponse {
    let mut statuses = Vec::with_capacity(req.descriptors.len());
    let mut over: Option<(Limit, Verdict)> = None;
    let mut tightest: Option<(Limit, Verdict)> = None;
    let mut request_id = String::new();
    for d in &req.descriptors {
        let p = parse_descriptor(&req.domain, d, req.hits_addend);
        if let Some(rid) = p.request_id {
            request_id = rid;
        }
        let Some(limit) = p.limit else {
            // No limit for this descriptor: like envoyproxy/ratelimit, it is not limited.
            statuses.push(DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            });
            continue;
        };
        let v = store.hit(&p.counter_key, &limit, p.hits);
        statuses.push(status_for(&limit, &v));
        if !v.allowed && over.is_none() {
            over = Some((limit, v));
        }
        if tightest.is_none_or(|(_, t)| v.remaining < t.remaining) {
            tightest = Some((limit, v));
        }
    }
    let mut response = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses,
        ..Default::default()
    };
    if let Some((limit, v)) = over.or(tightest) {
        response.response_headers_to_add = vec![
            header(
                "x-ratelimit-limit-requests",
                limit.requests_per_unit.to_string(),
            ),
            header("x-ratelimit-remaining-requests", v.remaining.to_string()),
            header("x-ratelimit-reset-requests", openai_duration(v.reset_after)),
        ];
    }
    if let Some((_, v)) = over {
        response.overall_code = Code::OverLimit as i32;
        let retry = ceil_secs(v.retry_after).max(1);
        response
            .response_headers_to_add
            .push(header("retry-after", retry.to_string()));
        response
            .response_headers_to_add
            .push(header("content-type", "application/json".to_string()));
        // The error code header is what the audit log records as the reason.
        response
            .response_headers_to_add
            .push(header(metadata::HEADER_ERROR, "rate_limited".to_string()));
        response.raw_body = error_body::render(
            429,
            "rate_limited",
            &format!("request rate limit reached; retry in {retry}s"),
            &request_id,
        )
        .into_bytes();
    }
    response
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        let resp = decide(&self.store, &req);
        if resp.overall_code == Code::OverLimit as i32 {
            tracing::info!(domain = %req.domain, "over limit");
        }
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };

    fn descriptor(key: &str, rpm: Option<u32>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "key_id".into(),
                    value: key.into(),
                },
                Entry {
                    key: "request_id".into(),
                    value: "rid-7".into(),
                },
            ],
            limit: rpm.map(|n| RateLimitOverride {
                requests_per_unit: n,
                unit: 2,
            }),
            ..Default::default()
        }
    }

    fn request(d: RateLimitDescriptor) -> RateLimitRequest {
        RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![d],
            hits_addend: 0,
        }
    }

    fn header_value(r: &RateLimitResponse, name: &str) -> Option<String> {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
    }

    #[test]
    fn request_id_entry_is_not_part_of_the_counter_key() {
        let p = parse_descriptor("tollgate", &descriptor("k1", Some(5)), 0);
        assert_eq!(p.counter_key, "tollgate|key_id=k1#5/2");
        assert_eq!(p.request_id.as_deref(), Some("rid-7"));
        assert_eq!(p.hits, 1);
    }

    #[test]
    fn over_limit_gets_json_body_retry_after_and_openai_headers() {
        let store = MemoryStore::new();
        let req = request(descriptor("k1", Some(2)));
        let first = decide(&store, &req);
        assert_eq!(first.overall_code, Code::Ok as i32);
        assert_eq!(
            header_value(&first, "x-ratelimit-remaining-requests").as_deref(),
            Some("1")
        );
        assert_eq!(
            header_value(&first, "x-ratelimit-limit-requests").as_deref(),
            Some("2")
        );
        assert_eq!(decide(&store, &req).overall_code, Code::Ok as i32);
        let third = decide(&store, &req);
        assert_eq!(third.overall_code, Code::OverLimit as i32);
        assert_eq!(header_value(&third, "retry-after").as_deref(), Some("30"));
        assert_eq!(
            header_value(&third, "x-tollgate-error").as_deref(),
            Some("rate_limited")
        );
        let body: serde_json::Value = serde_json::from_slice(&third.raw_body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
        assert_eq!(body["error"]["request_id"], "rid-7");
        assert_eq!(third.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(
            third.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            2
        );
    }

    #[test]
    fn descriptor_without_limit_is_not_limited() {
        let store = MemoryStore::new();
        let req = request(descriptor("k1", None));
        for _ in 0..100 {
            assert_eq!(decide(&store, &req).overall_code, Code::Ok as i32);
        }
    }

    #[test]
    fn negative_hits_never_consume() {
        let mut d = descriptor("k1", Some(1));
        d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 5 });
        d.is_negative_hits = true;
        assert_eq!(parse_descriptor("t", &d, 0).hits, 0);
    }

    #[test]
    fn openai_duration_format() {
        assert_eq!(openai_duration(20 * NANOS_PER_SEC), "20s");
        assert_eq!(openai_duration(360 * NANOS_PER_SEC), "6m0s");
        assert_eq!(openai_duration(3723 * NANOS_PER_SEC), "1h2m3s");
        assert_eq!(openai_duration(1), "1s");
    }
}
