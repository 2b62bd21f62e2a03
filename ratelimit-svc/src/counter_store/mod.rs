//! Where counters live, behind one async trait: in memory for a single process (`make up`),
//! in Redis (single node or Cluster) for replicas. Both implement the same batch semantics,
//! checked by one contract suite (`tests/store_contract.rs`).

mod memory;
mod redis;
pub mod redis_keys;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, RedisTarget};

use crate::gcra::{self, Nanos, Verdict};
use crate::limit_policy::Limit;
use std::future::Future;
use std::time::Duration;

/// How a hit treats its counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HitMode {
    /// Admit or deny; a denial denies the whole request.
    Enforce,
    /// Counted like `Enforce` but never denies (envoyproxy/ratelimit's `shadow_mode`).
    Shadow,
    /// Gives `hits` back (Envoy's `is_negative_hits`); never denies, never consumes.
    Refund,
    /// Consumes `hits` even past the limit; never denies (tokens already used).
    Debit,
    /// Concurrency: holds one of `limit.requests_per_unit` slots under `id` (the request
    /// id) until released or until `ttl` has passed. Denied when every slot is held, or
    /// when `id` is empty or already holds a slot (a duplicate request id must not share
    /// one slot between two streams). `hits` is ignored; `key` is a
    /// [`redis_keys::lease_key`].
    Acquire { id: String, ttl: Duration },
    /// Gives the slot held under `id` back. Idempotent: releasing a slot that was never
    /// taken (the request was denied) or already expired changes nothing. Never denies.
    Release { id: String },
}

/// One counter update of a rate-limit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Built by [`redis_keys::counter_key`]; it includes the limit, so one key always
    /// has one limit.
    pub key: String,
    pub limit: Limit,
    /// Cost of this request (1, or Envoy's `hits_addend`); 0 only reads.
    pub hits: u64,
    pub mode: HitMode,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("counter store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the counter store: {0}")]
    BadReply(String),
    #[error("invalid redis url: {0}")]
    InvalidUrl(String),
}

/// A counter store decides all hits of one request together.
///
/// Semantics every implementation keeps (the contract suite checks them):
/// - hits are applied in order; a key repeated within a batch sees the earlier hits;
/// - if any `Enforce` hit is denied, the request is denied and consumes nothing
///   (refunds still apply); otherwise every allowed hit is consumed;
/// - a denied hit never changes its counter; `hits == 0` only reads;
/// - counters are forgotten once back to a full burst (Redis: a TTL, memory: a sweep).
///
/// Atomicity: the memory store and single-node Redis apply a batch atomically. Redis
/// Cluster is atomic per hash slot only (see `redis.rs`).
///
/// TPM and budget counters are GCRAs whose `requests_per_unit` is tokens and whose
/// `hits` is the token count; a reservation is an `Enforce` hit of the estimate at request
/// time, the correction a `Refund` or `Debit` at stream end. Concurrency limits are lease
/// sets (`Acquire`/`Release`), decided in the same atomic batch: a request denied by a
/// rate takes no slot, and a request denied a slot consumes no rate.
pub trait CounterStore: Send + Sync + 'static {
    /// One verdict per hit, in order.
    fn hit_batch(
        &self,
        hits: &[Hit],
    ) -> impl Future<Output = Result<Vec<Verdict>, StoreError>> + Send;

    /// How long until `key` is back to a full burst and dropped by the store (for Redis
    /// its TTL); `None` when the store holds no counter under that key.
    fn expires_in(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Duration>, StoreError>> + Send;
}

/// The store chosen at start-up (`--redis-url` or not), without boxing futures.
#[derive(Debug)]
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl CounterStore for AnyStore {
    async fn hit_batch(&self, hits: &[Hit]) -> Result<Vec<Verdict>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.hit_batch(hits).await,
            AnyStore::Redis(s) => s.hit_batch(hits).await,
        }
    }

    async fn expires_in(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.expires_in(key).await,
            AnyStore::Redis(s) => s.expires_in(key).await,
        }
    }
}

/// A store's state as a batch reads it.
pub(crate) trait StoredState {
    /// The stored TAT of a counter (0 when there is none).
    fn tat(&mut self, key: &str) -> Nanos;
    /// Live (unexpired) leases under a lease key, and whether `id` holds one of them.
    fn leases(&mut self, key: &str, id: &str) -> (u32, bool);
}

/// What a batch does to a lease set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseWrite<'a> {
    Add {
        key: &'a str,
        id: &'a str,
        expires: Nanos,
    },
    Remove {
        key: &'a str,
        id: &'a str,
    },
}

/// A denied lease is retried soon: slots free whenever a stream ends.
pub const LEASE_RETRY_AFTER: Nanos = 1_000_000_000;

/// The batch semantics above over a store's state: returns the
/// verdicts, the TATs to write back (only changed ones) and the lease changes. `gcra.lua`
/// is the same algorithm in Lua.
pub(crate) fn decide_batch<'a>(
    hits: &'a [Hit],
    now: Nanos,
    stored: &mut impl StoredState,
) -> (Vec<Verdict>, Vec<(&'a str, Nanos)>, Vec<LeaseWrite<'a>>) {
    struct Counter<'a> {
        key: &'a str,
        stored: Nanos,
        /// With every hit of the batch applied.
        all: Nanos,
        /// With only the refunds applied, kept in case the request is denied.
        refunds: Nanos,
    }
    /// One lease set as this batch changes it.
    struct Slots<'a> {
        key: &'a str,
        live: u32,
        /// Ids this batch touched: (id, held before the batch, held now).
        ids: Vec<(&'a str, bool, bool)>,
        ttl: Nanos,
    }
    let mut counters: Vec<Counter<'a>> = Vec::with_capacity(hits.len());
    let mut slots: Vec<Slots<'a>> = Vec::new();
    let mut verdicts = Vec::with_capacity(hits.len());
    let mut denied = false;
    for h in hits {
        if let HitMode::Acquire { id, .. } | HitMode::Release { id } = &h.mode {
            let i = match slots.iter().position(|s| s.key == h.key) {
                Some(i) => i,
                None => {
                    slots.push(Slots {
                        key: &h.key,
                        live: stored.leases(&h.key, id).0,
                        ids: Vec::new(),
                        ttl: 0,
                    });
                    slots.len() - 1
                }
            };
            let s = &mut slots[i];
            let j = match s.ids.iter().position(|(x, _, _)| *x == id.as_str()) {
                Some(j) => j,
                None => {
                    let held = !id.is_empty() && stored.leases(&h.key, id).1;
                    s.ids.push((id, held, held));
                    s.ids.len() - 1
                }
            };
            let per = h.limit.requests_per_unit;
            let held = s.ids[j].2;
            match &h.mode {
                HitMode::Acquire { ttl, .. } => {
                    if id.is_empty() || held || s.live >= per {
                        denied = true;
                        verdicts.push(Verdict {
                            allowed: false,
                            remaining: per.saturating_sub(s.live),
                            reset_after: 0,
                            retry_after: LEASE_RETRY_AFTER,
                        });
                    } else {
                        s.live += 1;
                        s.ids[j].2 = true;
                        s.ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
                        verdicts.push(Verdict {
                            allowed: true,
                            remaining: per - s.live,
                            ..Verdict::default()
                        });
                    }
                }
                _ => {
                    if held {
                        s.live -= 1;
                        s.ids[j].2 = false;
                    }
                    verdicts.push(Verdict {
                        allowed: true,
                        remaining: per.saturating_sub(s.live),
                        ..Verdict::default()
                    });
                }
            }
            continue;
        }
        // Batches hold a handful of hits: a linear search beats hashing.
        let i = match counters.iter().position(|c| c.key == h.key) {
            Some(i) => i,
            None => {
                let t = stored.tat(&h.key);
                counters.push(Counter {
                    key: &h.key,
                    stored: t,
                    all: t,
                    refunds: t,
                });
                counters.len() - 1
            }
        };
        let c = &mut counters[i];
        match h.mode {
            HitMode::Refund => {
                let (v, t) = gcra::refund(&h.limit, c.all, now, h.hits);
                c.all = t;
                c.refunds = gcra::refund(&h.limit, c.refunds, now, h.hits).1;
                verdicts.push(v);
            }
            HitMode::Debit => {
                let (v, t) = gcra::debit(&h.limit, c.all, now, h.hits);
                c.all = t;
                // Applied even when another hit denies the request: the tokens were used.
                c.refunds = gcra::debit(&h.limit, c.refunds, now, h.hits).1;
                verdicts.push(v);
            }
            _ => {
                let (v, t) = gcra::decide(&h.limit, c.all, now, h.hits);
                if v.allowed && h.hits > 0 {
                    c.all = t;
                }
                if !v.allowed && h.mode == HitMode::Enforce {
                    denied = true;
                }
                verdicts.push(v);
            }
        }
    }
    let writes = counters
        .into_iter()
        .filter_map(|c| {
            let t = if denied { c.refunds } else { c.all };
            (t != c.stored).then_some((c.key, t))
        })
        .collect();
    // Releases always land (like refunds); new leases only when the request is admitted.
    let mut lease_writes = Vec::new();
    for s in slots {
        for (id, before, after) in s.ids {
            match (before, after) {
                (false, true) if !denied => lease_writes.push(LeaseWrite::Add {
                    key: s.key,
                    id,
                    expires: now.saturating_add(s.ttl),
                }),
                (true, false) => lease_writes.push(LeaseWrite::Remove { key: s.key, id }),
                _ => {}
            }
        }
    }
    (verdicts, writes, lease_writes)
}
