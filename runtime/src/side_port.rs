//! The plain-HTTP side port of a service: `/metrics` (Prometheus text exposition),
//! `/healthz` (the process runs) and `/readyz` (its store answers: the [`Readiness`] that
//! gRPC health reports too), plus routes a service adds (tollgate-ratelimit's
//! `/ledger/drift`). Kept off the gRPC port so probes and scrapes never compete with checks.

use crate::accept::Incoming;
use crate::readiness::Readiness;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
pub use hyper::StatusCode;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Prometheus' text format 0.0.4. Prometheus 3 refuses a scrape without a Content-Type
/// (or with one it does not know) unless told a fallback.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A registry in that format.
pub fn exposition(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for the text format.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";

/// What a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: body.into(),
        }
    }

    pub fn json(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: JSON,
            body,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.body)));
        *r.status_mut() = self.status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        r
    }
}

pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;
/// An extra `GET` route.
pub type Route = Arc<dyn Fn() -> ReplyFuture + Send + Sync>;
type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct SidePort {
    metrics: Render,
    readiness: Readiness,
    routes: Vec<(&'static str, Route)>,
}

impl std::fmt::Debug for SidePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidePort")
            .field(
                "routes",
                &self.routes.iter().map(|r| r.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl SidePort {
    /// `metrics` renders the exposition text on each scrape.
    pub fn new(metrics: impl Fn() -> String + Send + Sync + 'static, readiness: Readiness) -> Self {
        Self {
            metrics: Arc::new(metrics),
            readiness,
            routes: Vec::new(),
        }
    }

    pub fn with_route(mut self, path: &'static str, route: Route) -> Self {
        self.routes.push((path, route));
        self
    }

    /// The reply to a request for `path` (any method: probes and scrapes only read).
    pub async fn reply(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply {
                status: StatusCode::OK,
                content_type: METRICS_CONTENT_TYPE,
                body: (self.metrics)(),
            },
            "/healthz" => Reply::text(StatusCode::OK, "ok\n"),
            "/readyz" if self.readiness.is_ready() => Reply::text(StatusCode::OK, "ready\n"),
            "/readyz" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => match self.routes.iter().find(|(p, _)| *p == path) {
                Some((_, route)) => route().await,
                None => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }

    /// Serves until the process exits: during a drain `/healthz` still answers and
    /// `/readyz` says not ready.
    pub async fn serve(self, listener: TcpListener) {
        let port = Arc::new(self);
        let mut incoming = Incoming::new(listener);
        loop {
            let stream = incoming.accept().await;
            let port = Arc::clone(&port);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let port = Arc::clone(&port);
                        async move {
                            Ok::<_, Infallible>(port.reply(req.uri().path()).await.into_response())
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn port() -> (SidePort, Readiness) {
        let readiness = Readiness::new(&[]).await;
        let drift: Route = Arc::new(|| Box::pin(async { Reply::json("[]".into()) }));
        let port = SidePort::new(|| "up 1\n".to_string(), readiness.clone())
            .with_route("/ledger/drift", drift);
        (port, readiness)
    }

    #[test]
    fn the_declared_content_type_is_the_format_the_encoder_writes() {
        let encoder = prometheus::TextEncoder::new();
        assert!(
            METRICS_CONTENT_TYPE.starts_with(prometheus::Encoder::format_type(&encoder)),
            "{METRICS_CONTENT_TYPE}"
        );
        let registry = prometheus::Registry::new();
        let c = prometheus::IntCounter::new("up_total", "help").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        assert!(exposition(&registry).contains("\nup_total 1\n"));
    }

    #[tokio::test]
    async fn routes_answer_with_their_status_and_content_type() {
        let (port, readiness) = port().await;
        let metrics = port.reply("/metrics").await;
        assert_eq!(
            (metrics.status, metrics.content_type, metrics.body.as_str()),
            (StatusCode::OK, METRICS_CONTENT_TYPE, "up 1\n")
        );
        assert_eq!(port.reply("/healthz").await.status, StatusCode::OK);
        assert_eq!(
            port.reply("/readyz").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set(true).await;
        assert_eq!(port.reply("/readyz").await.status, StatusCode::OK);
        assert_eq!(port.reply("/ledger/drift").await, Reply::json("[]".into()));
        assert_eq!(port.reply("/nope").await.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn metrics_over_http_carry_the_prometheus_content_type() {
        let (port, _) = port().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(port.serve(listener));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.unwrap();
        server.abort();
        let head = raw.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{raw}");
        assert!(
            head.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{raw}"
        );
        assert!(raw.ends_with("up 1\n"), "{raw}");
    }
}
