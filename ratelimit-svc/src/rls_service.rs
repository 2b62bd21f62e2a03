//! Envoy RLS v3 `ShouldRateLimit`, the gRPC side only: parses the descriptors
//! ([`envoy_descriptor`]), asks the limiter, answers ([`rls_response`]) and hands
//! stream-done usage to the ledger ([`usage_records`]). A counter store error is gRPC
//! `UNAVAILABLE`, never OK: Envoy is configured to deny on it.
//!
//! [`envoy_descriptor`]: crate::envoy_descriptor
//! [`rls_response`]: crate::rls_response
//! [`usage_records`]: crate::usage_records

use crate::config_watch::SharedConfig;
use crate::counter_store::{CounterStore, StoreError};
use crate::descriptor_config::Config;
use crate::envoy_descriptor;
use crate::ledger::Ledger;
use crate::limiter::{self, Decision, Outcome};
use crate::rls_response::response_for;
use crate::usage_records::ledger_records;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

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

/// Decides one request: parse, limit, count, answer. `lease_ttl` bounds how long a
/// concurrency slot is held without its release.
pub async fn decide<S: CounterStore>(
    store: &S,
    config: &Config,
    req: &RateLimitRequest,
    lease_ttl: Duration,
) -> Result<(RateLimitResponse, Decision), StoreError> {
    let parsed = envoy_descriptor::parse_request(req);
    let decision = limiter::decide(store, config, &req.domain, &parsed, lease_ttl).await?;
    let request_id = envoy_descriptor::request_id(&parsed);
    Ok((response_for(&decision, &parsed, request_id), decision))
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
mod tests;
