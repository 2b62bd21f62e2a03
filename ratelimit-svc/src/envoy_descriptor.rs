//! Envoy's RLS descriptors read into the limiter's terms: one [`Parsed`] per descriptor,
//! holding the limiter's [`Descriptor`] (its [`Phase`] from `tollgate_phase`), the request
//! id entry and what the descriptor counts.

use crate::limit_policy::{Limit, Unit};
use crate::limiter::{Descriptor, Lease, Phase, TokenStep};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tollgate_core::metadata;

/// What a counted limit limits, for headers and refusal codes.
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

/// One descriptor of a request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub descriptor: Descriptor<'a>,
    /// The `request_id` entry: identifies the request, never matched or counted.
    pub request_id: Option<&'a str>,
}

impl<'a> AsRef<Descriptor<'a>> for Parsed<'a> {
    fn as_ref(&self) -> &Descriptor<'a> {
        &self.descriptor
    }
}

impl Parsed<'_> {
    /// A counter that counts cost (`tollgate_unit=usd`), not tokens. The entry stays in the
    /// counter key, so it never shares a counter with tokens.
    pub fn counts_usd(&self) -> bool {
        self.descriptor
            .entries
            .iter()
            .any(|(k, v)| *k == metadata::DESCRIPTOR_UNIT && *v == metadata::UNIT_USD)
    }

    pub fn counts(&self) -> Counts {
        match self.descriptor.phase {
            Phase::Lease(_) => Counts::Concurrency {
                tenant: self
                    .descriptor
                    .entries
                    .first()
                    .is_some_and(|(k, _)| *k == metadata::TENANT_ID),
            },
            Phase::Tokens(_) if self.counts_usd() => Counts::Usd,
            Phase::Tokens(_) => Counts::Tokens,
            Phase::Requests { .. } | Phase::Usage => Counts::Requests,
        }
    }

    /// A stream-done call's real token usage, for the ledger.
    pub fn is_token_usage(&self) -> bool {
        self.descriptor.phase == Phase::Usage && !self.counts_usd() && self.descriptor.hits > 0
    }

    /// The value of entry `key`, empty without one.
    pub fn entry(&self, key: &str) -> String {
        self.descriptor
            .entries
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(String::new(), |(_, v)| v.to_string())
    }
}

/// Every descriptor of `req`, in order.
pub fn parse_request(req: &RateLimitRequest) -> Vec<Parsed<'_>> {
    req.descriptors
        .iter()
        .map(|d| parse(d, req.hits_addend))
        .collect()
}

/// The request id a request's descriptors carry (the last one that names it).
pub fn request_id<'a>(parsed: &[Parsed<'a>]) -> &'a str {
    parsed.iter().rev().find_map(|p| p.request_id).unwrap_or("")
}

/// The `tollgate_phase` entry's value, and what the counter key keeps of it: lease and
/// release address one lease set; admission, extra debit and refund one token counter.
enum PhaseEntry {
    Lease { acquire: bool },
    Usage,
    Tokens(TokenStep),
}

fn phase_entry(value: &str) -> (PhaseEntry, &'static str) {
    match value {
        metadata::PHASE_LEASE => (PhaseEntry::Lease { acquire: true }, metadata::PHASE_LEASE),
        metadata::PHASE_RELEASE => (PhaseEntry::Lease { acquire: false }, metadata::PHASE_LEASE),
        metadata::PHASE_USAGE => (PhaseEntry::Usage, metadata::PHASE_USAGE),
        metadata::PHASE_TOKENS_EXTRA => {
            (PhaseEntry::Tokens(TokenStep::Debit), metadata::PHASE_TOKENS)
        }
        metadata::PHASE_TOKENS_REFUND => (
            PhaseEntry::Tokens(TokenStep::Refund),
            metadata::PHASE_TOKENS,
        ),
        _ => (
            PhaseEntry::Tokens(TokenStep::Reserve),
            metadata::PHASE_TOKENS,
        ),
    }
}

/// Parses one descriptor; `request_hits` is the request-level `hits_addend`.
pub fn parse(d: &RateLimitDescriptor, request_hits: u32) -> Parsed<'_> {
    let mut request_id = None;
    let mut lease_id = None;
    let mut entries = Vec::with_capacity(d.entries.len());
    let (mut lease, mut usage, mut tokens) = (None, false, None);
    for e in &d.entries {
        if e.key == metadata::DESCRIPTOR_REQUEST_ID {
            // The request id identifies the request, not the limit: never matched, never
            // part of a counter key.
            request_id = Some(e.value.as_str());
        } else if e.key == metadata::LEASE_ID {
            // Names the slot, not the limit: never part of the set's key.
            lease_id = Some(e.value.as_str()).filter(|v| !v.is_empty() && *v != "-");
        } else if e.key == metadata::DESCRIPTOR_PHASE {
            let (phase, keyed) = phase_entry(&e.value);
            match phase {
                PhaseEntry::Lease { acquire } => lease = Some(acquire),
                PhaseEntry::Usage => usage = true,
                PhaseEntry::Tokens(step) => tokens = Some(step),
            }
            entries.push((e.key.as_str(), keyed));
        } else {
            entries.push((e.key.as_str(), e.value.as_str()));
        }
    }
    // The slot is held under tollgate-authz's per-check nonce, else the request id;
    // without either the lease is denied.
    let slot = lease_id.or(request_id).unwrap_or("");
    let phase = match (usage, lease, tokens) {
        (true, _, _) => Phase::Usage,
        (_, Some(true), _) => Phase::Lease(Lease::Acquire(slot)),
        (_, Some(false), _) => Phase::Lease(Lease::Release(slot)),
        (_, None, Some(_)) if d.is_negative_hits => Phase::Tokens(TokenStep::Refund),
        (_, None, Some(step)) => Phase::Tokens(step),
        (_, None, None) => Phase::Requests {
            refund: d.is_negative_hits,
        },
    };
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
    Parsed {
        descriptor: Descriptor {
            entries,
            limit_override,
            hits,
            phase,
        },
        request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn descriptor(pairs: &[(&str, &str)], rpm: Option<u32>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: pairs
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            limit: rpm.map(|n| RateLimitOverride {
                requests_per_unit: n,
                unit: 2,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn request_id_entry_is_neither_matched_nor_counted() {
        let d = descriptor(&[("key_id", "k1"), ("request_id", "rid-7")], Some(5));
        let p = parse(&d, 0);
        assert_eq!(p.descriptor.entries, vec![("key_id", "k1")]);
        assert_eq!(p.request_id, Some("rid-7"));
        assert_eq!(p.descriptor.hits, 1);
        assert_eq!(p.descriptor.phase, Phase::Requests { refund: false });
        assert_eq!(
            p.descriptor.limit_override,
            Some(Limit {
                requests_per_unit: 5,
                unit: Unit::Minute
            })
        );
    }

    #[test]
    fn hits_come_from_the_descriptor_then_the_request() {
        let mut d = descriptor(&[("key_id", "k1")], Some(5));
        assert_eq!(parse(&d, 3).descriptor.hits, 3);
        d.hits_addend = Some(UInt64Value { value: 0 });
        assert_eq!(parse(&d, 3).descriptor.hits, 0);
        d.is_negative_hits = true;
        assert_eq!(
            parse(&d, 3).descriptor.phase,
            Phase::Requests { refund: true }
        );
    }

    #[test]
    fn each_phase_value_names_one_phase_and_one_counter() {
        let cases = [
            ("tokens", Phase::Tokens(TokenStep::Reserve), "tokens"),
            ("tokens_extra", Phase::Tokens(TokenStep::Debit), "tokens"),
            ("tokens_refund", Phase::Tokens(TokenStep::Refund), "tokens"),
            ("lease", Phase::Lease(Lease::Acquire("r1")), "lease"),
            ("release", Phase::Lease(Lease::Release("r1")), "lease"),
            ("usage", Phase::Usage, "usage"),
        ];
        for (value, phase, keyed) in cases {
            let d = descriptor(
                &[
                    ("key_id", "k1"),
                    ("tollgate_phase", value),
                    ("request_id", "r1"),
                ],
                None,
            );
            let p = parse(&d, 0);
            assert_eq!(p.descriptor.phase, phase, "{value}");
            assert_eq!(
                p.descriptor.entries,
                [("key_id", "k1"), ("tollgate_phase", keyed)],
                "{value}"
            );
        }
    }

    #[test]
    fn a_negative_token_hit_is_a_refund_whatever_its_phase() {
        let mut d = descriptor(
            &[("key_id", "k1"), ("tollgate_phase", "tokens_extra")],
            None,
        );
        d.is_negative_hits = true;
        assert_eq!(
            parse(&d, 0).descriptor.phase,
            Phase::Tokens(TokenStep::Refund)
        );
    }

    #[test]
    fn what_a_descriptor_counts_follows_its_phase_and_unit() {
        let counts = |pairs: &[(&str, &str)]| parse(&descriptor(pairs, None), 0).counts();
        assert_eq!(counts(&[("key_id", "k")]), Counts::Requests);
        assert_eq!(
            counts(&[("key_id", "k"), ("tollgate_phase", "tokens")]),
            Counts::Tokens
        );
        assert_eq!(
            counts(&[
                ("key_id", "k"),
                ("tollgate_phase", "tokens"),
                ("tollgate_unit", "usd")
            ]),
            Counts::Usd
        );
        assert_eq!(
            counts(&[("tenant_id", "t"), ("tollgate_phase", "lease")]),
            Counts::Concurrency { tenant: true }
        );
        assert_eq!(
            counts(&[("key_id", "k"), ("tollgate_phase", "release")]),
            Counts::Concurrency { tenant: false }
        );
    }
}
