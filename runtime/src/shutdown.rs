//! Stopping on SIGINT or SIGTERM (what Kubernetes sends) with a bounded drain. Both signals
//! are caught from start-up on, so a SIGTERM never kills the process with work queued: the
//! service marks itself not ready, stops accepting, finishes what is open and writes what
//! it queued, each step within its share of the grace period.

use crate::readiness::Readiness;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
#[error("cannot install the {signal} handler: {source}")]
pub struct SignalError {
    signal: &'static str,
    source: std::io::Error,
}

/// A shutdown request, shared by everything that must stop. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Not requested until [`Shutdown::trigger`] is called.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Requested by the first SIGINT or SIGTERM. The handlers are installed before this
    /// returns, so a signal that arrives while the service is still starting is not lost.
    /// Must be called inside a Tokio runtime.
    pub fn on_signals() -> Result<Self, SignalError> {
        let shutdown = Self::new();
        let signalled = shutdown.clone();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind, name: &'static str| {
                signal(kind).map_err(|source| SignalError {
                    signal: name,
                    source,
                })
            };
            let mut int = install(SignalKind::interrupt(), "SIGINT")?;
            let mut term = install(SignalKind::terminate(), "SIGTERM")?;
            tokio::spawn(async move {
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                tracing::info!(signal = name, "shutting down: draining");
                signalled.trigger();
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!(signal = "Ctrl-C", "shutting down: draining");
                signalled.trigger();
            }
        });
        Ok(shutdown)
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once shutdown is requested (at once if it already was).
    pub fn triggered(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // `Err` means every sender is gone: nobody can request shutdown any more, so
            // this waits forever rather than stopping a service nobody asked to stop.
            if rx.wait_for(|requested| *requested).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// `--shutdown-grace-ms`, flattened into each service's flags.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Grace {
    /// On SIGTERM or SIGINT, the longest time spent draining before exit, in milliseconds:
    /// the first half serves open calls, the rest writes what the service queued
    /// (tollgate-authz: audit events; tollgate-ratelimit: the ledger buffer). Keep it below
    /// the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

impl Grace {
    /// The share for open calls (and long-lived streams such as Envoy's access log).
    pub fn calls(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms / 2)
    }

    /// The share for writing what was queued, after the calls.
    pub fn queue(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms - self.shutdown_grace_ms / 2)
    }
}

/// How a server future ended.
#[derive(Debug)]
pub enum Served<T> {
    /// On its own, before any shutdown request: an error; there is nothing to drain.
    Early(T),
    /// After a shutdown request: readiness is off, and the server's output is here when it
    /// finished within the calls' share (long-lived streams may keep it open).
    Drained(Option<T>),
}

/// Waits for `server` to end or for `shutdown`; then turns `readiness` off and gives the
/// server `limit` to answer what is open. The server stops accepting on the same request
/// (its own shutdown signal), and may finish first: the drain happens either way.
pub async fn serve_until_drained<F: Future + Unpin>(
    mut server: F,
    shutdown: &Shutdown,
    readiness: &Readiness,
    limit: Duration,
) -> Served<F::Output> {
    let stopped = tokio::select! {
        served = &mut server => Some(served),
        () = shutdown.triggered() => None,
    };
    if !shutdown.is_triggered() {
        if let Some(served) = stopped {
            return Served::Early(served);
        }
    }
    readiness.drain().await;
    match stopped {
        Some(served) => Served::Drained(Some(served)),
        None => Served::Drained(within("open calls", limit, server).await),
    }
}

/// Runs one drain step for at most `limit`; `None` (and a warning naming `what`) when it
/// did not finish in time.
pub async fn within<F: Future>(what: &str, limit: Duration, step: F) -> Option<F::Output> {
    match tokio::time::timeout(limit, step).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(
                step = what,
                limit_ms = limit.as_millis() as u64,
                "drain step cut short"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn triggered_resolves_for_waiters_started_before_and_after_the_trigger() {
        let shutdown = Shutdown::new();
        let early = tokio::spawn(shutdown.triggered());
        assert!(!shutdown.is_triggered());
        shutdown.clone().trigger();
        assert!(shutdown.is_triggered());
        early.await.unwrap();
        shutdown.triggered().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_outlives_its_limit_is_cut_and_one_that_finishes_returns_its_value() {
        let cut = within(
            "never",
            Duration::from_secs(5),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(cut, None);
        let done = within("quick", Duration::from_secs(5), async { 7 }).await;
        assert_eq!(done, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_still_open_at_the_limit_is_left_and_readiness_is_off() {
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(&[]).await;
        readiness.set(true).await;
        shutdown.trigger();
        let server = Box::pin(std::future::pending::<u8>());
        let served =
            serve_until_drained(server, &shutdown, &readiness, Duration::from_secs(5)).await;
        assert!(matches!(served, Served::Drained(None)), "{served:?}");
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn a_server_that_stops_on_the_request_is_drained_with_its_output() {
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(&[]).await;
        readiness.set(true).await;
        let server = Box::pin({
            let stop = shutdown.triggered();
            async move {
                stop.await;
                7
            }
        });
        shutdown.trigger();
        let served =
            serve_until_drained(server, &shutdown, &readiness, Duration::from_secs(5)).await;
        assert!(matches!(served, Served::Drained(Some(7))), "{served:?}");
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn a_server_that_fails_on_its_own_is_not_drained() {
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(&[]).await;
        readiness.set(true).await;
        let served = serve_until_drained(
            Box::pin(async { 3 }),
            &shutdown,
            &readiness,
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(served, Served::Early(3)), "{served:?}");
        assert!(readiness.is_ready());
    }

    #[test]
    fn the_grace_is_split_between_open_calls_and_the_queue() {
        let g = Grace {
            shutdown_grace_ms: 10_001,
        };
        assert_eq!(
            (g.calls(), g.queue()),
            (Duration::from_millis(5_000), Duration::from_millis(5_001))
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn sigterm_requests_shutdown_instead_of_killing_the_process() {
        let shutdown = Shutdown::on_signals().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        shutdown.triggered().await;
        assert!(shutdown.is_triggered());
    }
}
