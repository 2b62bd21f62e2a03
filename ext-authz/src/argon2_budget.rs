//! The global argon2 budget: at most `concurrency` verifications run at once and at most
//! `queue` more checks are admitted behind them (looking their key up or waiting for a
//! slot). A check past that is refused at once, so a flood of keys (random prefixes from
//! many addresses included) can queue neither CPU nor key-store work without bound, nor
//! hold checks until Envoy's ext_authz timeout answers for authz.

use crate::api_key;
use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The budget is spent: the check is refused without hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// Where the budget reports (created with the service's other metrics).
#[derive(Debug, Clone)]
pub struct Argon2Metrics {
    pub runs: IntCounter,
    pub admitted: IntGauge,
    pub admitted_peak: IntGauge,
    pub capacity: IntGauge,
}

#[derive(Debug, Default)]
struct Admitted {
    now: usize,
    peak: usize,
}

#[derive(Debug)]
struct Inner {
    slots: Arc<Semaphore>,
    capacity: usize,
    admitted: Mutex<Admitted>,
    runs: AtomicU64,
    metrics: OnceLock<Argon2Metrics>,
}

impl Inner {
    fn admitted(&self) -> std::sync::MutexGuard<'_, Admitted> {
        self.admitted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, a: &Admitted) {
        if let Some(m) = self.metrics.get() {
            m.admitted.set(gauge_value(a.now));
            m.admitted_peak.set(gauge_value(a.peak));
        }
    }
}

#[derive(Debug, Clone)]
pub struct Argon2Budget {
    inner: Arc<Inner>,
    /// How long an admitted check may wait for a slot (a last bound if argon2 is slower
    /// than expected, e.g. on a throttled CPU).
    wait: Duration,
}

/// One admitted check (looking its key up, waiting for a slot or hashing); dropping it
/// frees its place in the budget.
#[derive(Debug)]
pub struct Admission(Arc<Inner>);

impl Drop for Admission {
    fn drop(&mut self) {
        let mut a = self.0.admitted();
        a.now = a.now.saturating_sub(1);
        self.0.report(&a);
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Argon2Budget {
    pub fn new(concurrency: usize, queue: usize, wait: Duration) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(concurrency)),
                capacity: concurrency.saturating_add(queue),
                admitted: Mutex::new(Admitted::default()),
                runs: AtomicU64::new(0),
                metrics: OnceLock::new(),
            }),
            wait,
        }
    }

    /// Reports to `m` from now on (once; a second call is ignored).
    pub fn attach(&self, m: Argon2Metrics) {
        m.capacity.set(gauge_value(self.inner.capacity));
        m.runs.inc_by(self.runs());
        let _ = self.inner.metrics.set(m);
        self.inner.report(&self.inner.admitted());
    }

    /// Slots plus queue places.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Verifications run since start.
    pub fn runs(&self) -> u64 {
        self.inner.runs.load(Ordering::Relaxed)
    }

    /// Most checks running or waiting at once since start.
    pub fn admitted_peak(&self) -> usize {
        self.inner.admitted().peak
    }

    /// A place in the budget, taken before the check does any work for an unproven key
    /// (its key-store lookup included), or `Overloaded` at once.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        let mut a = self.inner.admitted();
        if a.now >= self.inner.capacity {
            return Err(Overloaded);
        }
        a.now += 1;
        a.peak = a.peak.max(a.now);
        self.inner.report(&a);
        Ok(Admission(self.inner.clone()))
    }

    /// Verifies `secret` against `hash` on the blocking pool, in one of the slots.
    pub async fn verify(
        &self,
        admission: Admission,
        secret: &str,
        hash: String,
    ) -> Result<bool, Overloaded> {
        let slot = tokio::time::timeout(self.wait, self.inner.slots.clone().acquire_owned())
            .await
            .map_err(|_| Overloaded)?
            .map_err(|_| Overloaded)?;
        let secret = secret.to_string();
        // The slot and the admission move into the blocking task: a check whose caller
        // went away (Envoy's timeout) keeps its place until argon2 has finished.
        let verified = tokio::task::spawn_blocking(move || {
            let ok = api_key::verify_secret(&secret, &hash);
            let inner = &admission.0;
            inner.runs.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = inner.metrics.get() {
                m.runs.inc();
            }
            drop(slot);
            drop(admission);
            ok
        })
        .await
        .unwrap_or(false);
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_past_slots_and_queue_is_refused_without_hashing() {
        let budget = Argon2Budget::new(1, 2, Duration::from_secs(30));
        let hash = api_key::hash_secret("s3cret").unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let b = budget.clone();
            let h = hash.clone();
            tasks.push(tokio::spawn(async move {
                let admission = b.admit()?;
                b.verify(admission, "wrong", h).await
            }));
        }
        let mut refused = 0;
        let mut verified = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(false) => verified += 1,
                Ok(true) => panic!("a wrong secret verified"),
                Err(Overloaded) => refused += 1,
            }
        }
        assert!(refused > 0, "twenty at once cannot all fit in 1 + 2");
        assert_eq!(budget.runs(), verified);
        assert!(budget.admitted_peak() <= 3, "{}", budget.admitted_peak());
        // Once the flood is over the budget is free again.
        let admission = budget.admit().unwrap();
        assert_eq!(budget.verify(admission, "s3cret", hash).await, Ok(true));
    }
}
