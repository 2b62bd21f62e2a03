//! Owns what a request is admitted against (its token and USD reservation) and how it
//! settles when it ends (what is debited, and how that differs from the reservation), as
//! plain values: the exchange publishes them as filter state for the rate limiter.
//!
//! Every count is at most [`COUNT_MAX`]: Envoy drops a `hits_addend` it cannot carry, and a
//! dropped reservation admits the request on the other limits.

use tollgate_core::metadata;
use tollgate_core::usd::Price;

pub use crate::request_head::COUNT_MAX;

/// Events of a stream that carry no generated token (role, block starts and stops, finish,
/// usage, `[DONE]`, Anthropic's pings): a cut stream is charged for its events beyond these.
pub const STREAM_EVENTS_WITHOUT_TOKENS: u64 = 16;

/// The reservation a request was admitted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub tokens: u64,
    /// The model's price and the cost reserved (USD units), for a priced model.
    pub cost: Option<(Price, u64)>,
}

impl Admission {
    /// Reserves `prompt + completion` tokens and, for a priced model, their cost.
    pub fn new(prompt: u64, completion: u64, price: Option<Price>) -> Self {
        Admission {
            tokens: prompt.saturating_add(completion).min(COUNT_MAX),
            cost: price.map(|p| (p, p.cost(prompt, completion).min(COUNT_MAX))),
        }
    }

    /// Filter state the rate limiter's request-time descriptors read.
    pub fn filter_state(&self) -> Vec<(&'static str, String)> {
        let mut state = vec![(metadata::FILTER_STATE_RESERVATION, self.tokens.to_string())];
        if let Some((_, cost)) = self.cost {
            state.push((metadata::FILTER_STATE_COST_RESERVATION, cost.to_string()));
        }
        state
    }
}

/// What the model server reported, as far as the bill goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub prompt: u64,
    pub completion: u64,
    /// The server reported usage (else the counts are zero).
    pub usage: bool,
    /// Stream events that went by.
    pub events: u64,
}

/// How an admitted request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The model server's answer reached the client.
    Answered(Reported),
    /// The rate limiter refused or failed: nothing was reserved.
    NotAdmitted,
    /// Admitted, then it never reached a model server: no tokens were used.
    NeverSent,
    /// Admitted and sent, then no answer reached the client (it hung up, a timeout, a
    /// reset): the server may have generated it all.
    Lost,
}

impl Outcome {
    /// From Envoy's response code details; `answered` is read only for `via_upstream`.
    pub fn from_details(details: &[u8], answered: impl FnOnce() -> Reported) -> Self {
        match details {
            b"via_upstream" => Outcome::Answered(answered()),
            b"request_rate_limited" | b"rate_limiter_error" => Outcome::NotAdmitted,
            d if never_reached_the_model(d) => Outcome::NeverSent,
            _ => Outcome::Lost,
        }
    }
}

/// Envoy's response code details of a request that ended before any model server got it
/// (connection refused or timed out, no healthy host, circuit breaker).
fn never_reached_the_model(details: &[u8]) -> bool {
    let details = String::from_utf8_lossy(details);
    matches!(
        details.as_ref(),
        "no_healthy_upstream" | "cluster_not_found" | "route_not_found" | "direct_response"
    ) || details.contains("connection_failure")
        || details.contains("{overflow}")
        || details.contains("refused_stream")
}

/// What an ended request is debited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub tokens: u64,
    /// Cost debited, for a priced model.
    pub cost: Option<u64>,
    /// Prompt and completion tokens as reported, for the access log (answered requests).
    pub reported: Option<(u64, u64)>,
}

/// The debit of an admitted request; `None` when nothing was reserved. An unreported answer
/// is never free: the reservation stands, and a stream cut after more events than carry no
/// token costs at least one token per event.
pub fn settle(admission: &Admission, outcome: Outcome) -> Option<Settlement> {
    let reserved_cost = admission.cost.map(|(_, c)| c);
    let (tokens, cost, reported) = match outcome {
        Outcome::NotAdmitted => return None,
        Outcome::NeverSent => (0, reserved_cost.map(|_| 0), None),
        Outcome::Lost => (admission.tokens, reserved_cost, None),
        Outcome::Answered(r) if r.usage => (
            r.prompt.saturating_add(r.completion),
            admission.cost.map(|(p, _)| p.cost(r.prompt, r.completion)),
            Some((r.prompt, r.completion)),
        ),
        Outcome::Answered(r) => {
            let streamed = r.events.saturating_sub(STREAM_EVENTS_WITHOUT_TOKENS);
            (
                admission.tokens.max(streamed),
                admission.cost.map(|(p, c)| c.max(p.cost(0, streamed))),
                Some((r.prompt, r.completion)),
            )
        }
    };
    // What a model server reports is clamped like the reservation.
    Some(Settlement {
        tokens: tokens.min(COUNT_MAX),
        cost: cost.map(|c| c.min(COUNT_MAX)),
        reported,
    })
}

impl Settlement {
    /// Filter state the access log and the rate limiter's stream-done descriptors read: the
    /// debit, and how it differs from the reservation (`extra` to add, `refund` to return).
    pub fn filter_state(&self, admission: &Admission) -> Vec<(&'static str, String)> {
        let mut state = Vec::with_capacity(9);
        if let Some((prompt, completion)) = self.reported {
            state.push((metadata::FILTER_STATE_TOKENS_IN, prompt.to_string()));
            state.push((metadata::FILTER_STATE_TOKENS_OUT, completion.to_string()));
        }
        let reserved = admission.tokens;
        state.push((metadata::FILTER_STATE_TOKENS, self.tokens.to_string()));
        state.push((
            metadata::FILTER_STATE_TOKENS_EXTRA,
            self.tokens.saturating_sub(reserved).to_string(),
        ));
        state.push((
            metadata::FILTER_STATE_TOKENS_REFUND,
            reserved.saturating_sub(self.tokens).to_string(),
        ));
        if let (Some((_, reserved)), Some(cost)) = (admission.cost, self.cost) {
            state.push((metadata::FILTER_STATE_COST, cost.to_string()));
            state.push((
                metadata::FILTER_STATE_COST_EXTRA,
                cost.saturating_sub(reserved).to_string(),
            ));
            state.push((
                metadata::FILTER_STATE_COST_REFUND,
                reserved.saturating_sub(cost).to_string(),
            ));
        }
        state
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn get<'a>(state: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        state
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn reported_usage_settles_with_extra_or_refund() {
        let a = Admission::new(10, 90, None);
        assert_eq!(a.tokens, 100);
        let s = settle(
            &a,
            Outcome::Answered(Reported {
                prompt: 7,
                completion: 5,
                usage: true,
                events: 0,
            }),
        )
        .unwrap();
        let state = s.filter_state(&a);
        assert_eq!(get(&state, "tollgate_tokens"), Some("12"));
        assert_eq!(get(&state, "tollgate_tokens_refund"), Some("88"));
        assert_eq!(get(&state, "tollgate_tokens_extra"), Some("0"));
        assert_eq!(get(&state, "tollgate_tokens_in"), Some("7"));
    }

    #[test]
    fn unreported_answers_keep_the_reservation_or_count_events() {
        let a = Admission::new(0, 20, None);
        let r = |events| {
            settle(
                &a,
                Outcome::Answered(Reported {
                    events,
                    ..Reported::default()
                }),
            )
            .unwrap()
            .tokens
        };
        assert_eq!(r(3), 20);
        assert_eq!(r(16 + 50), 50);
    }

    #[test]
    fn outcomes_from_envoys_details() {
        let none = Reported::default;
        assert_eq!(
            Outcome::from_details(b"request_rate_limited", none),
            Outcome::NotAdmitted
        );
        assert_eq!(
            Outcome::from_details(
                b"upstream_reset_before_response_started{connection_failure}",
                none
            ),
            Outcome::NeverSent
        );
        assert_eq!(
            Outcome::from_details(b"downstream_remote_disconnect", none),
            Outcome::Lost
        );
        let a = Admission::new(5, 5, None);
        assert_eq!(settle(&a, Outcome::NotAdmitted), None);
        assert_eq!(settle(&a, Outcome::NeverSent).unwrap().tokens, 0);
        assert_eq!(settle(&a, Outcome::Lost).unwrap().tokens, 10);
    }

    #[test]
    fn every_count_is_clamped_to_what_envoy_carries() {
        let a = Admission::new(u64::MAX, u64::MAX, None);
        assert_eq!(a.tokens, COUNT_MAX);
        let s = settle(
            &a,
            Outcome::Answered(Reported {
                prompt: u64::MAX,
                completion: u64::MAX,
                usage: true,
                events: 0,
            }),
        )
        .unwrap();
        assert_eq!(s.tokens, COUNT_MAX);
    }
}
