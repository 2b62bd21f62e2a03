//! Prometheus metrics of tollgate-ratelimit and its plain-HTTP side port: `/metrics`,
//! `/healthz` (the process runs) and `/readyz` (the counter store answers).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    seconds: HistogramVec,
    ready: AtomicBool,
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
            ready: AtomicBool::new(false),
        })
    }

    pub fn observe(&self, result: &str, seconds: f64) {
        self.decisions.with_label_values(&[result]).inc();
        self.seconds.with_label_values(&[result]).observe(seconds);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Renders the budget ledger's drift report for `GET /ledger/drift`: `Ok(json)` or an error.
pub type DriftReport = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, drift: Option<DriftReport>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let drift = drift.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let report = match (req.uri().path(), &drift) {
                        ("/ledger/drift", Some(d)) => Some(d()),
                        _ => None,
                    };
                    let r = match req.uri().path() {
                        "/metrics" => text(StatusCode::OK, metrics.render()),
                        "/healthz" => text(StatusCode::OK, "ok\n".into()),
                        "/readyz" if metrics.ready() => text(StatusCode::OK, "ready\n".into()),
                        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
                        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
                    };
                    async move {
                        Ok::<_, Infallible>(match report {
                            Some(report) => match report.await {
                                Ok(json) => text(StatusCode::OK, json),
                                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                            },
                            None => r,
                        })
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
