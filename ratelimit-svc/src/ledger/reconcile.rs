//! Drift between the budget counters (Redis or memory) and the ledger: for every budget
//! counter the ledger has seen charged, the tokens the counter still holds (its time to a
//! full budget, in tokens) against the tokens the ledger's usage rows would leave in the
//! same GCRA (replayed over the last two periods).
//!
//! A USD counter (`measure` `usd`) is compared with the rows' cost instead, and its
//! `*_tokens` figures are in 1/10000 USD.
//!
//! Reading it: positive drift is usage the counter holds but the ledger does not, which is
//! normally the reservations of streams still in flight; negative drift is usage the ledger
//! has but the counter lost (a Redis flush or failover, a restarted in-memory store).

use super::{LedgerDb, LedgerError};
use crate::counter_store::CounterStore;
use crate::limit_policy::Unit;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drift {
    pub counter_key: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub requests_per_unit: u32,
    pub unit: String,
    /// What the counter counts: `tokens`, or `usd` (then the figures below are 1/10000 USD).
    pub measure: &'static str,
    /// Tokens the counter store holds for this counter now.
    pub counter_tokens: u64,
    /// Tokens the ledger's rows leave in the same counter now.
    pub ledger_tokens: u64,
    /// `counter_tokens - ledger_tokens`.
    pub drift: i64,
}

/// One report line per counter, in counter key order. `now_us` is Unix time in µs.
pub async fn reconcile<S: CounterStore>(
    store: &S,
    db: &LedgerDb,
    now_us: u64,
) -> Result<Vec<Drift>, LedgerError> {
    let mut out = Vec::new();
    for c in db.counters().await? {
        let Some(unit) = Unit::from_name(&c.unit) else {
            continue;
        };
        let period_us = unit.period().as_micros() as f64;
        let interval_us = (period_us / f64::from(c.requests_per_unit.max(1))).max(1.0);
        let held = store
            .expires_in(&c.counter_key)
            .await
            .map_err(|e| LedgerError::Failed(format!("counter store: {e}")))?;
        let counter_tokens =
            held.map_or(0, |d| (d.as_micros() as f64 / interval_us).round() as u64);
        // Usage older than two periods has drained from any counter not debited far past
        // its limit.
        let since = now_us.saturating_sub(2 * period_us as u64);
        let rows = db.usage(&c.subject_kind, &c.subject_id, since).await?;
        let mut tat = 0f64;
        for r in &rows {
            let used = if c.usd { r.cost_usd } else { r.tokens };
            tat = tat.max(r.at_us as f64) + used as f64 * interval_us;
        }
        let ledger_tokens = ((tat - now_us as f64).max(0.0) / interval_us).round() as u64;
        out.push(Drift {
            drift: counter_tokens as i64 - ledger_tokens as i64,
            measure: if c.usd { "usd" } else { "tokens" },
            counter_key: c.counter_key,
            subject_kind: c.subject_kind,
            subject_id: c.subject_id,
            requests_per_unit: c.requests_per_unit,
            unit: c.unit,
            counter_tokens,
            ledger_tokens,
        });
    }
    Ok(out)
}
