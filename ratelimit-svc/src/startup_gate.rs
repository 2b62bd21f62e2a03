//! The RLS as served before the counter store is connected: every call is `UNAVAILABLE`
//! (Envoy's `failure_mode_deny` answers 503), so the gRPC port can be bound at once and
//! nothing is admitted until the real service is put in with [`StartupGate::open`].

use crate::counter_store::CounterStore;
use crate::metrics::Metrics;
use crate::rls_service::RlsService;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::sync::{Arc, OnceLock};
use tonic::{Request, Response, Status};

#[derive(Debug)]
pub struct StartupGate<S> {
    service: Arc<OnceLock<RlsService<S>>>,
    metrics: Option<Arc<Metrics>>,
}

impl<S> Clone for StartupGate<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
            metrics: self.metrics.clone(),
        }
    }
}

impl<S: CounterStore> StartupGate<S> {
    /// A closed gate; its refusals are counted as `unavailable` decisions in `metrics`.
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            service: Arc::new(OnceLock::new()),
            metrics,
        }
    }

    /// From now on every call is decided by `service`. Only the first call has an effect.
    pub fn open(&self, service: RlsService<S>) {
        let _ = self.service.set(service);
    }

    pub fn is_open(&self) -> bool {
        self.service.get().is_some()
    }
}

#[tonic::async_trait]
impl<S: CounterStore> RateLimitService for StartupGate<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        match self.service.get() {
            Some(service) => service.should_rate_limit(request).await,
            None => {
                if let Some(m) = &self.metrics {
                    m.observe("unavailable", 0.0);
                }
                Err(Status::unavailable(
                    "tollgate-ratelimit is starting: counter store not connected yet",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_watch::SharedConfig;
    use crate::counter_store::MemoryStore;
    use crate::descriptor_config::Config;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

    fn one_per_minute() -> Request<RateLimitRequest> {
        Request::new(RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "key_id".into(),
                    value: "k1".into(),
                }],
                limit: Some(RateLimitOverride {
                    requests_per_unit: 1,
                    unit: 2, // MINUTE
                }),
                ..Default::default()
            }],
            hits_addend: 0,
        })
    }

    #[tokio::test]
    async fn closed_gate_answers_unavailable_and_counts_nothing_then_the_service_decides() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let gate = StartupGate::<MemoryStore>::new(Some(Arc::clone(&metrics)));
        for _ in 0..3 {
            let e = gate.should_rate_limit(one_per_minute()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable);
        }
        assert!(metrics
            .render()
            .contains("tollgate_ratelimit_decisions_total{result=\"unavailable\"} 3"));
        assert!(!gate.is_open());

        let store = Arc::new(MemoryStore::new());
        gate.open(RlsService::new(
            store,
            Arc::new(SharedConfig::new(Config::default())),
        ));
        assert!(gate.is_open());
        // The refusals consumed nothing: the one request a minute is still there.
        let codes = [
            gate.should_rate_limit(one_per_minute()).await,
            gate.should_rate_limit(one_per_minute()).await,
        ]
        .map(|r| r.unwrap().into_inner().overall_code);
        assert_eq!(codes, [Code::Ok as i32, Code::OverLimit as i32]);
    }
}
