//! Fails key-store lookups fast during an outage. Every lookup is bounded by a timeout well
//! inside Envoy's ext_authz timeout, so authz answers (and counts) its own 503 instead of
//! Envoy timing out for it; once a lookup has failed, the store is known to be down and
//! only one lookup at a time probes it while every other uncached check is refused at once.

use crate::key_store::StoreError;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The store could not answer (down, too slow, or known to be down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreDown;

#[derive(Debug)]
pub struct StoreBreaker {
    timeout: Duration,
    down: AtomicBool,
    probing: AtomicBool,
}

/// Held by the one lookup that probes a store known to be down.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl StoreBreaker {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether the last lookup failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Runs `lookup` unless the store is known to be down and another lookup is already
    /// probing it. A store error that is not an outage (a row that cannot be read) is
    /// refused the same way but does not mark the store down.
    pub async fn run<T>(
        &self,
        lookup: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreDown> {
        let _probe = if self.is_down() {
            if self.probing.swap(true, Ordering::AcqRel) {
                return Err(StoreDown);
            }
            Some(Probe(&self.probing))
        } else {
            None
        };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(v)) => {
                self.down.store(false, Ordering::Release);
                Ok(v)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "key store lookup failed");
                if matches!(e, StoreError::Unavailable(_)) {
                    self.down.store(true, Ordering::Release);
                }
                Err(StoreDown)
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "key store lookup timed out");
                self.down.store(true, Ordering::Release);
                Err(StoreDown)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn outage() -> StoreError {
        StoreError::Unavailable(sqlx::Error::PoolTimedOut)
    }

    #[tokio::test]
    async fn a_slow_lookup_is_cut_at_the_timeout_and_marks_the_store_down() {
        let b = StoreBreaker::new(Duration::from_millis(20));
        let slow = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(1)
        };
        assert_eq!(b.run(slow).await, Err(StoreDown));
        assert!(b.is_down());
        assert_eq!(b.run(async { Ok(2) }).await, Ok(2), "a probe that works");
        assert!(!b.is_down());
    }

    #[tokio::test]
    async fn while_down_only_one_lookup_probes_and_the_rest_are_refused_at_once() {
        let b = Arc::new(StoreBreaker::new(Duration::from_secs(30)));
        assert_eq!(
            b.run(async { Err::<u8, _>(outage()) }).await,
            Err(StoreDown)
        );
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let probe = {
            let b = b.clone();
            tokio::spawn(async move {
                b.run(async {
                    let _ = wait.await;
                    Err::<u8, _>(outage())
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        while !b.probing.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        let mut ran = false;
        let refused = b
            .run(async {
                ran = true;
                Ok(3u8)
            })
            .await;
        assert_eq!(refused, Err(StoreDown));
        assert!(!ran, "a second lookup must not reach the store");
        let _ = release.send(());
        assert_eq!(probe.await.unwrap(), Err(StoreDown));
        assert_eq!(
            b.run(async { Ok(4u8) }).await,
            Ok(4),
            "the next probe recovers"
        );
    }

    #[tokio::test]
    async fn a_bad_row_is_refused_without_marking_the_store_down() {
        let b = StoreBreaker::new(Duration::from_secs(1));
        let bad = async { Err::<u8, _>(StoreError::Invalid("bad row".into())) };
        assert_eq!(b.run(bad).await, Err(StoreDown));
        assert!(!b.is_down());
    }
}
