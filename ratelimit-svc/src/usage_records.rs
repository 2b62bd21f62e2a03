//! The budget ledger's records of a stream-done call: the tokens and cost a stream really
//! used, and the budget counters the same call debited or refunded.

use crate::counter_store::redis_keys;
use crate::envoy_descriptor::{self, Parsed};
use crate::ledger::{CounterRef, Record};
use crate::limit_policy::Limit;
use crate::limiter::{Decision, Outcome, Phase, TokenStep};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tollgate_core::metadata;

/// One record per `usage` descriptor that used tokens, with the cost its `usage` +
/// `tollgate_unit=usd` twin carries (0 without one: the model has no price), each naming
/// the budget counters (day or longer, tokens and USD) the same call debited or refunded.
/// Without a decision (the counter store failed) the counters are the ones Envoy's
/// overrides name: the debit they missed is what reconciliation shows.
pub fn ledger_records(
    req: &RateLimitRequest,
    decision: Option<&Decision>,
    at_us: u64,
) -> Vec<Record> {
    let parsed = envoy_descriptor::parse_request(req);
    if !parsed.iter().any(Parsed::is_token_usage) {
        return Vec::new();
    }
    let limit_of = |i: usize, p: &Parsed<'_>| match decision {
        Some(decision) => match decision.outcomes.get(i) {
            Some(Outcome::Counted { limit, .. }) => Some(*limit),
            _ => None,
        },
        None => p.descriptor.limit_override,
    };
    let counters: Vec<CounterRef> = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, p)| counter_ref(&req.domain, p, limit_of(i, p)?))
        .collect();
    parsed
        .iter()
        .filter(|p| p.is_token_usage())
        .map(|p| {
            let cost_usd = parsed
                .iter()
                .filter(|c| {
                    c.descriptor.phase == Phase::Usage
                        && c.counts_usd()
                        && c.request_id == p.request_id
                })
                .map(|c| c.descriptor.hits)
                .sum();
            Record {
                request_id: p.request_id.unwrap_or_default().to_string(),
                key_id: p.entry(metadata::KEY_ID),
                tenant_id: p.entry(metadata::TENANT_ID),
                tokens: p.descriptor.hits,
                cost_usd,
                at_us,
                counters: counters.clone(),
            }
        })
        .collect()
}

/// The budget counter a token debit or refund touched, if it is a budget.
fn counter_ref(domain: &str, p: &Parsed<'_>, limit: Limit) -> Option<CounterRef> {
    let settles = matches!(
        p.descriptor.phase,
        Phase::Tokens(TokenStep::Debit | TokenStep::Refund)
    );
    if !settles || !limit.is_budget() {
        return None;
    }
    let (kind, id) = p.descriptor.entries.first()?;
    Some(CounterRef {
        key: redis_keys::counter_key(domain, &p.descriptor.entries, &limit),
        subject_kind: kind.to_string(),
        subject_id: id.to_string(),
        requests_per_unit: limit.requests_per_unit,
        unit: limit.unit.name().to_string(),
        usd: p.counts_usd(),
    })
}
