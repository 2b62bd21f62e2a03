//! One readiness value behind both `/readyz` on the side port and gRPC health
//! (`grpc.health.v1`), so Kubernetes probes and Envoy's health checks never disagree. A
//! service is ready while its store answers; it starts not ready and turns not ready for
//! good once it drains.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// How often the store is checked, and how long one check may take.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Inner {
    ready: AtomicBool,
    draining: AtomicBool,
    health: HealthReporter,
    /// The gRPC service names reported besides the server-wide `""`.
    services: Vec<String>,
    /// Serialises updates, so a check that started before the drain cannot report
    /// SERVING after it.
    update: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl Readiness {
    /// Not ready. gRPC health reports `""` and each of `grpc_services` (e.g.
    /// `envoy.service.auth.v3.Authorization`).
    pub async fn new(grpc_services: &[&str]) -> Self {
        let health = HealthReporter::new();
        let readiness = Self {
            inner: Arc::new(Inner {
                ready: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                health,
                services: grpc_services.iter().map(|s| s.to_string()).collect(),
                update: tokio::sync::Mutex::new(()),
            }),
        };
        readiness.publish(false).await;
        readiness
    }

    /// The `grpc.health.v1.Health` service to add to the gRPC server.
    pub fn grpc_health(&self) -> HealthServer<HealthService> {
        HealthServer::new(self.health_service())
    }

    fn health_service(&self) -> HealthService {
        HealthService::from_health_reporter(self.inner.health.clone())
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Records one check's result; ignored (not ready) once draining.
    pub async fn set(&self, ok: bool) {
        let _guard = self.inner.update.lock().await;
        let ready = ok && !self.is_draining();
        if ready != self.is_ready() {
            tracing::info!(ready, "readiness changed");
        }
        self.publish(ready).await;
    }

    /// Not ready from now on, whatever later checks say: the service is shutting down.
    pub async fn drain(&self) {
        let _guard = self.inner.update.lock().await;
        self.inner.draining.store(true, Ordering::Release);
        self.publish(false).await;
        tracing::info!("draining: not ready");
    }

    /// gRPC health first, then the HTTP flag: whoever sees `/readyz` 200 also sees SERVING.
    async fn publish(&self, ready: bool) {
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.inner.health.set_service_status("", status).await;
        for s in &self.inner.services {
            self.inner.health.set_service_status(s, status).await;
        }
        self.inner.ready.store(ready, Ordering::Release);
    }

    /// Runs `check` every [`CHECK_EVERY`] (a check slower than [`CHECK_TIMEOUT`] counts as
    /// a failure) until the service drains.
    pub async fn follow<F, Fut>(self, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        while !self.is_draining() {
            let ok = tokio::time::timeout(CHECK_TIMEOUT, check())
                .await
                .unwrap_or(false);
            self.set(ok).await;
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    /// (HTTP ready, gRPC status of "", gRPC status of "svc.A")
    async fn seen(r: &Readiness) -> (bool, i32, i32) {
        let svc = r.health_service();
        let mut grpc = Vec::new();
        for service in ["", "svc.A"] {
            let reply = svc
                .check(tonic::Request::new(HealthCheckRequest {
                    service: service.into(),
                }))
                .await
                .unwrap();
            grpc.push(reply.into_inner().status);
        }
        (r.is_ready(), grpc[0], grpc[1])
    }

    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;

    #[tokio::test]
    async fn http_and_grpc_health_start_not_ready_follow_checks_and_stay_down_once_draining() {
        let r = Readiness::new(&["svc.A"]).await;
        assert_eq!(seen(&r).await, (false, NOT_SERVING, NOT_SERVING));
        r.set(true).await;
        assert_eq!(seen(&r).await, (true, SERVING, SERVING));
        r.set(false).await;
        assert_eq!(seen(&r).await, (false, NOT_SERVING, NOT_SERVING));
        r.set(true).await;
        r.drain().await;
        assert_eq!(seen(&r).await, (false, NOT_SERVING, NOT_SERVING));
        r.set(true).await;
        assert_eq!(
            seen(&r).await,
            (false, NOT_SERVING, NOT_SERVING),
            "a check after the drain must not turn it ready"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn follow_reports_each_check_and_a_hung_check_as_not_ready_and_stops_on_drain() {
        let r = Readiness::new(&[]).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let answers = std::sync::Arc::new(std::sync::Mutex::new(vec![true, false, true]));
        let task = tokio::spawn(r.clone().follow({
            let answers = answers.clone();
            move || {
                let next = answers.lock().unwrap().pop();
                let tx = tx.clone();
                async move {
                    match next {
                        Some(ok) => {
                            let _ = tx.send(ok);
                            ok
                        }
                        // Out of answers: hang, as a store that never replies does.
                        None => std::future::pending().await,
                    }
                }
            }
        }));
        // Answers pop from the back: true, false, true; then hung checks.
        let mut states = Vec::new();
        for _ in 0..3 {
            let ok = rx.recv().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            states.push((ok, r.is_ready()));
        }
        assert_eq!(states, [(true, true), (false, false), (true, true)]);
        tokio::time::sleep(CHECK_EVERY + CHECK_TIMEOUT + Duration::from_millis(10)).await;
        assert!(!r.is_ready(), "a check that never answers is a failure");
        r.drain().await;
        task.await.unwrap();
    }
}
