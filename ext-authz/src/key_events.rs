//! Follows the key-event log so that revocations, rotations, disabled tenants and policy
//! changes reach this replica's cache within one poll interval; on PostgreSQL a
//! LISTEN/NOTIFY wake-up makes it immediate. Any event clears the whole cache: events are
//! rare and a cold cache only costs one argon2 check per active key.

use crate::key_cache::KeyCache;
use crate::key_store::KeyStore;
use std::sync::Arc;
use std::time::Duration;

pub const CHANNEL: &str = "tollgate_key_events";

/// Runs until the process ends.
pub async fn follow(store: KeyStore, cache: Arc<KeyCache>, poll: Duration) {
    let mut last = loop {
        match store.last_event_id().await {
            Ok(id) => break id,
            Err(e) => {
                tracing::warn!(error = %e, "key events: cannot read the log yet");
                // Nothing cached can be stale before the first read succeeds, but clear
                // anyway so no decision outlives an outage unseen.
                cache.clear();
                tokio::time::sleep(poll).await;
            }
        }
    };
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    if store.is_postgres() {
        tokio::spawn(listen(store.url().to_string(), wake_tx));
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = wake_rx.recv() => {}
        }
        match store.events_since(last).await {
            Ok(events) if !events.is_empty() => {
                if let Some((id, _, _)) = events.last() {
                    last = *id;
                }
                cache.clear();
                tracing::info!(count = events.len(), "key events: cache cleared");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "key events: poll failed"),
        }
    }
}

async fn listen(url: String, wake: tokio::sync::mpsc::Sender<()>) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut l) => {
                if let Err(e) = l.listen(CHANNEL).await {
                    tracing::warn!(error = %e, "key events: LISTEN failed");
                } else {
                    while l.recv().await.is_ok() {
                        // A full channel means a wake-up is already pending.
                        let _ = wake.try_send(());
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "key events: listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
