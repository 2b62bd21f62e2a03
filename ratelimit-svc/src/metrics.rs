//! Prometheus metrics of tollgate-ratelimit, served on the side port's `/metrics`
//! (`tollgate_runtime::side_port`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let decisions = IntCounterVec::new(
            Opts::new(
                "tollgate_ratelimit_decisions_total",
                "ShouldRateLimit answers: ok, over_limit, unavailable (counter store down)",
            ),
            &["result"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_ratelimit_decision_duration_seconds",
                "Time to decide one call",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            &["result"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Self {
            registry,
            decisions,
            seconds,
        })
    }

    pub fn observe(&self, result: &str, seconds: f64) {
        self.decisions.with_label_values(&[result]).inc();
        self.seconds.with_label_values(&[result]).observe(seconds);
    }

    pub fn render(&self) -> String {
        tollgate_runtime::side_port::exposition(&self.registry)
    }
}
