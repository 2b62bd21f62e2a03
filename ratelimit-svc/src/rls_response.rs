//! Envoy's `RateLimitResponse` from a limiter decision: per-descriptor statuses, OpenAI's
//! `x-ratelimit-*` headers, and on OVER_LIMIT Tollgate's JSON error with `retry-after`.

use crate::envoy_descriptor::{Counts, Parsed};
use crate::gcra::{Nanos, Verdict};
use crate::limit_policy::Limit;
use crate::limiter::{Decision, Outcome};
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tollgate_core::metadata;
use tollgate_core::refusal::{Refusal, RefusalCode};

const NANOS_PER_SEC: u64 = 1_000_000_000;

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

const RATE_LIMITED: Refusal = Refusal::new(RefusalCode::RateLimited, "request rate limit reached");

/// The refusal for a denying limit that counts `counts`.
fn refusal(counts: Counts, limit: &Limit) -> Refusal {
    match counts {
        Counts::Requests => RATE_LIMITED,
        Counts::Tokens if limit.is_budget() => {
            Refusal::new(RefusalCode::BudgetExceeded, "token budget used up")
        }
        Counts::Tokens => Refusal::new(RefusalCode::TokensExhausted, "token rate limit reached"),
        Counts::Usd => Refusal::new(RefusalCode::BudgetExceeded, "USD budget used up"),
        Counts::Concurrency { tenant: false } => Refusal::new(
            RefusalCode::TooManyConcurrent,
            "too many concurrent requests for this key",
        ),
        Counts::Concurrency { tenant: true } => Refusal::new(
            RefusalCode::TooManyConcurrent,
            "too many concurrent requests for this key's tenant",
        ),
    }
}

/// A refusal's JSON body and the headers that carry its code.
fn refuse(response: &mut RateLimitResponse, code: RefusalCode, message: &str, request_id: &str) {
    response.overall_code = Code::OverLimit as i32;
    response.response_headers_to_add.extend([
        header("content-type", "application/json".to_string()),
        // The error code header is what the audit log records as the reason.
        header(metadata::HEADER_ERROR, code.as_str().to_string()),
    ]);
    response.raw_body = code.render(message, request_id).into_bytes();
}

/// Builds Envoy's answer from a decision over `descriptors` (one outcome each, in order).
pub fn response_for(
    decision: &Decision,
    descriptors: &[Parsed<'_>],
    request_id: &str,
) -> RateLimitResponse {
    let answered = || {
        decision
            .outcomes
            .iter()
            .zip(descriptors)
            .map(|(o, d)| (o, d.counts(), d.descriptor.hits))
    };
    let statuses = answered().map(|(o, c, _)| status_for(o, c)).collect();
    let enforced = answered().filter_map(|(o, c, h)| match o {
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
            Counts::Tokens if limit.is_budget() => continue,
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
        let r = refusal(c, &limit);
        let message = format!(
            "{}: this request's reservation ({h}) is larger than the whole limit ({} per {}), \
             so no wait admits it; ask for fewer max_tokens",
            r.message,
            limit.requests_per_unit,
            limit.unit.name()
        );
        refuse(&mut response, r.code, &message, request_id);
    } else if decision.over_limit {
        let retry = over.map_or(1, |(_, _, v)| ceil_secs(v.retry_after).max(1));
        let r = over.map_or(RATE_LIMITED, |(c, l, _)| refusal(c, &l));
        response
            .response_headers_to_add
            .push(header("retry-after", retry.to_string()));
        let message = format!("{}; retry in {retry}s", r.message);
        refuse(&mut response, r.code, &message, request_id);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_duration_format() {
        assert_eq!(openai_duration(20 * NANOS_PER_SEC), "20s");
        assert_eq!(openai_duration(360 * NANOS_PER_SEC), "6m0s");
        assert_eq!(openai_duration(3723 * NANOS_PER_SEC), "1h2m3s");
        assert_eq!(openai_duration(1), "1s");
    }
}
