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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitMode {
    /// Admit or deny; a denial denies the whole request.
    Enforce,
    /// Counted like `Enforce` but never denies (envoyproxy/ratelimit's `shadow_mode`).
    Shadow,
    /// Gives `hits` back (Envoy's `is_negative_hits`); never denies, never consumes.
    Refund,
    /// Consumes `hits` even past the limit; never denies (tokens already used).
    Debit,
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
/// A later TPM or budget counter fits as is: a GCRA whose `requests_per_unit` is tokens
/// and whose `hits` is the token count; a reservation is an `Enforce` hit of the estimate
/// at request time, the correction a `Refund` (or a further hit) at stream end.
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

/// The batch semantics above over any source of stored TATs: returns the verdicts and
/// the TATs to write back (only changed ones). `gcra.lua` is the same algorithm in Lua.
pub(crate) fn decide_batch<'a>(
    hits: &'a [Hit],
    now: Nanos,
    mut stored_tat: impl FnMut(&str) -> Nanos,
) -> (Vec<Verdict>, Vec<(&'a str, Nanos)>) {
    struct Counter<'a> {
        key: &'a str,
        stored: Nanos,
        /// With every hit of the batch applied.
        all: Nanos,
        /// With only the refunds applied, kept in case the request is denied.
        refunds: Nanos,
    }
    let mut counters: Vec<Counter<'a>> = Vec::with_capacity(hits.len());
    let mut verdicts = Vec::with_capacity(hits.len());
    let mut denied = false;
    for h in hits {
        // Batches hold a handful of hits: a linear search beats hashing.
        let i = match counters.iter().position(|c| c.key == h.key) {
            Some(i) => i,
            None => {
                let t = stored_tat(&h.key);
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
            HitMode::Enforce | HitMode::Shadow => {
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
    (verdicts, writes)
}
