//! Writes audit events to SQL in batches from a bounded queue, so a slow or unreachable
//! database never slows a request: past the queue's capacity events are dropped and
//! counted (`tollgate_audit_events_total{result="dropped"}`).

use super::AuditEvent;
use crate::key_store::KeyStore;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const BATCH: usize = 500;
/// A failed batch is retried this many times, a second apart, then dropped and counted.
const RETRIES: u32 = 30;

#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    pub fn submit(&self, e: AuditEvent) {
        if self.tx.try_send(e).is_err() {
            self.metrics.audit.with_label_values(&["dropped"]).inc();
        }
    }
}

/// Starts the writer task; returns the sink the access-log service feeds and the task.
/// Once `stop` resolves the queue takes no more events (they count as dropped), and the
/// task ends when what was queued by then is written: awaiting it is the shutdown drain.
pub fn start(
    store: KeyStore,
    metrics: Arc<Metrics>,
    capacity: usize,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (AuditSink, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let task = tokio::spawn(run(store, rx, metrics.clone(), stop));
    (AuditSink { tx, metrics }, task)
}

async fn run(
    store: KeyStore,
    mut rx: mpsc::Receiver<AuditEvent>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    loop {
        let next = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                e = rx.recv() => e,
                () = &mut stop => {
                    // Closed: `recv` hands out what is queued, then `None`.
                    rx.close();
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(first) = next else { break };
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut attempt = 0;
        loop {
            match store.insert_audit(&batch).await {
                Ok(()) => {
                    metrics
                        .audit
                        .with_label_values(&["written"])
                        .inc_by(batch.len() as u64);
                    break;
                }
                Err(e) if attempt < RETRIES => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "audit batch not written; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, events = batch.len(), "audit batch dropped");
                    metrics
                        .audit
                        .with_label_values(&["failed"])
                        .inc_by(batch.len() as u64);
                    break;
                }
            }
        }
        batch.clear();
    }
}

/// Deletes events older than the retention, hourly.
pub async fn purge_loop(store: KeyStore, retention: Duration) {
    loop {
        let cutoff =
            crate::time::unix_now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match store.purge_audit_before(cutoff).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "audit retention purge"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "audit retention purge failed"),
        }
        match store.purge_prompt_logs(crate::time::unix_now_ms()).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "prompt log retention purge"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "prompt log retention purge failed"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
