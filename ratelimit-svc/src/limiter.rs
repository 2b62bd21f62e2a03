//! One rate-limit decision, free of gRPC types (so admission can later be decided in the
//! same call as authorization): resolves each descriptor's limit (Envoy's per-descriptor
//! override first, then the file configuration), applies `replaces` and `unlimited`, asks
//! the counter store once for every counted descriptor, and says whether the request is
//! over limit.

use crate::counter_store::{redis_keys, CounterStore, Hit, HitMode, StoreError};
use crate::descriptor_config::Config;
use crate::gcra::Verdict;
use crate::limit_policy::Limit;
use std::time::Duration;

/// A descriptor as the limiter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor<'a> {
    /// Entries in order, without the request id (which only identifies the request).
    pub entries: Vec<(&'a str, &'a str)>,
    /// Envoy's `descriptor.limit` (Tollgate's authz fills it from per-key metadata).
    pub limit_override: Option<Limit>,
    pub hits: u64,
    /// What this call does with its counter (`tollgate_phase`).
    pub phase: Phase<'a>,
}

/// What one descriptor's call does, from its `tollgate_phase` entry (none: a request rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase<'a> {
    /// A request counter; `refund` (Envoy's `is_negative_hits`) gives `hits` back.
    Requests { refund: bool },
    /// A token counter (TPM or budget): admission, extra debit and refund share it.
    Tokens(TokenStep),
    /// A concurrency limit (`lease` or `release`) rather than a rate.
    Lease(Lease<'a>),
    /// A stream's real usage for the ledger (`usage`): never limited.
    Usage,
}

/// Which step of a request's token accounting a token descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStep {
    /// At admission: reserve `hits`, refused past the limit.
    Reserve,
    /// `tokens_extra`: consume `hits` even past the limit.
    Debit,
    /// `tokens_refund` (or Envoy's `is_negative_hits`): give `hits` back.
    Refund,
}

impl<'a> AsRef<Descriptor<'a>> for Descriptor<'a> {
    fn as_ref(&self) -> &Descriptor<'a> {
        self
    }
}

impl Phase<'_> {
    /// A token counter (TPM or budget) rather than a request counter.
    pub fn is_tokens(&self) -> bool {
        matches!(self, Phase::Tokens(_))
    }
}

/// What a concurrency descriptor does with the slot of its request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease<'a> {
    /// At admission: take a slot (an empty id is denied).
    Acquire(&'a str),
    /// At stream end: give it back.
    Release(&'a str),
}

/// How long a lease is held when its release never comes: longer than any stream can
/// last (Envoy's route timeout and stream idle timeout are 300 s).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No limit matched (or it was replaced): OK, not counted.
    NotLimited,
    /// `unlimited: true`: OK, not counted.
    Unlimited,
    Counted {
        limit: Limit,
        name: Option<String>,
        shadow: bool,
        verdict: Verdict,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// One per descriptor, in order.
    pub outcomes: Vec<Outcome>,
    /// Some enforced (not shadow) limit denied.
    pub over_limit: bool,
}

struct Resolved<'c> {
    /// `None`: unlimited.
    limit: Option<Limit>,
    name: Option<&'c str>,
    replaces: &'c [String],
    shadow: bool,
}

fn resolve<'c>(config: &'c Config, domain: &str, d: &Descriptor<'_>) -> Option<Resolved<'c>> {
    if d.entries.is_empty() || d.phase == Phase::Usage {
        return None;
    }
    if let Some(limit) = d.limit_override {
        // As in envoyproxy/ratelimit an override is never shadowed, named or replacing.
        // Unlike it, an override applies even to a domain with no configuration: that is
        // how Tollgate runs without `--config`.
        return Some(Resolved {
            limit: Some(limit),
            name: None,
            replaces: &[],
            shadow: false,
        });
    }
    let rule = config.find(domain, &d.entries)?;
    Some(Resolved {
        limit: rule.limit,
        name: rule.name.as_deref(),
        replaces: &rule.replaces,
        shadow: rule.shadow_mode,
    })
}

/// `descriptors` are the limiter's [`Descriptor`]s or values holding one (the RLS's parsed
/// descriptors). `lease_ttl` bounds how long a concurrency slot is held without its release.
pub async fn decide<'d, S: CounterStore, D: AsRef<Descriptor<'d>>>(
    store: &S,
    config: &Config,
    domain: &str,
    descriptors: &[D],
    lease_ttl: Duration,
) -> Result<Decision, StoreError> {
    let mut resolved: Vec<Option<Resolved<'_>>> = descriptors
        .iter()
        .map(|d| {
            let d = d.as_ref();
            let r = resolve(config, domain, d);
            // A slot cannot be held "in shadow": a shadow concurrency limit is not counted.
            if matches!(d.phase, Phase::Lease(_)) {
                r.filter(|r| !r.shadow)
            } else {
                r
            }
        })
        .collect();
    // `replaces`: a limit named in another matched limit's `replaces` is not checked.
    // Unlimited rules replace too, as in envoyproxy/ratelimit.
    let replaced: Vec<&str> = resolved
        .iter()
        .flatten()
        .flat_map(|r| r.replaces.iter().map(String::as_str))
        .collect();
    if !replaced.is_empty() {
        for r in resolved.iter_mut() {
            if r.as_ref()
                .and_then(|r| r.name)
                .is_some_and(|n| replaced.contains(&n))
            {
                *r = None;
            }
        }
    }
    let mut hits = Vec::with_capacity(descriptors.len());
    for (d, r) in descriptors.iter().map(AsRef::as_ref).zip(&resolved) {
        let Some(Resolved {
            limit: Some(limit),
            shadow,
            ..
        }) = r
        else {
            continue;
        };
        if let Phase::Lease(lease) = d.phase {
            let mode = match lease {
                Lease::Acquire(id) => HitMode::Acquire {
                    id: id.to_string(),
                    ttl: lease_ttl,
                },
                Lease::Release(id) => HitMode::Release { id: id.to_string() },
            };
            hits.push(Hit {
                key: redis_keys::lease_key(domain, &d.entries),
                limit: *limit,
                hits: 1,
                mode,
            });
            continue;
        }
        hits.push(Hit {
            key: redis_keys::counter_key(domain, &d.entries, limit),
            limit: *limit,
            hits: d.hits,
            mode: match d.phase {
                Phase::Requests { refund: true } | Phase::Tokens(TokenStep::Refund) => {
                    HitMode::Refund
                }
                Phase::Tokens(TokenStep::Debit) => HitMode::Debit,
                _ if *shadow => HitMode::Shadow,
                _ => HitMode::Enforce,
            },
        });
    }
    let verdicts = if hits.is_empty() {
        Vec::new()
    } else {
        store.hit_batch(&hits).await?
    };
    let mut verdicts = verdicts.into_iter();
    let mut over_limit = false;
    let outcomes = resolved
        .into_iter()
        .map(|r| match r {
            None => Outcome::NotLimited,
            Some(Resolved { limit: None, .. }) => Outcome::Unlimited,
            Some(Resolved {
                limit: Some(limit),
                name,
                shadow,
                ..
            }) => {
                // One verdict per hit, in order; a missing one (a store bug) denies.
                let verdict = verdicts.next().unwrap_or_default();
                over_limit |= !verdict.allowed && !shadow;
                Outcome::Counted {
                    limit,
                    name: name.map(str::to_string),
                    shadow,
                    verdict,
                }
            }
        })
        .collect();
    Ok(Decision {
        outcomes,
        over_limit,
    })
}
