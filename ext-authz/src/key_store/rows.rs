//! Row types and their mapping from SQLite and PostgreSQL rows alike.

use super::StoreError;
use crate::policy::{Limits, PolicyRow};
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub status: String,
    pub labels: String,
    pub created_at: i64,
    /// Prompt log retention in days; 0 = prompts are not logged.
    pub prompt_log_days: u32,
}

/// What the decision needs about a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub secret_hash: String,
    pub tenant_id: String,
    pub tenant_active: bool,
    pub tenant_logs_prompts: bool,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub tenant_policy: PolicyRow,
    pub key_policy: Option<PolicyRow>,
}

/// What operators see about a key: never the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub prefix: String,
    pub name: String,
    pub tenant_id: String,
    pub tenant_name: String,
    pub labels: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub rotated_to: Option<String>,
}

pub const KEY_INFO_SELECT: &str =
    "SELECT k.id, k.prefix, k.name, k.tenant_id, t.name AS tenant_name, \
     k.labels, k.created_at, k.expires_at, k.revoked_at, k.last_used_at, k.rotated_to \
     FROM api_keys k JOIN tenants t ON t.id = k.tenant_id";

const POLICY_FIELDS: [&str; 11] = [
    "models",
    "operations",
    "ips",
    "rpm",
    "tpm",
    "budget_day",
    "budget_month",
    "max_concurrent",
    "budget_usd_day",
    "budget_usd_month",
    "scope",
];

/// `alias.field AS alias_field, …` so two policy joins can share a row.
pub fn policy_columns(alias: &str) -> String {
    POLICY_FIELDS
        .iter()
        .map(|f| format!("{alias}.{f} AS {alias}_{f}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Typed column access that reads the same on both backends.
pub trait Cells {
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn cell_debug(&self, idx: usize) -> String;
    fn width(&self) -> usize;
}

macro_rules! impl_cells {
    ($row:ty) => {
        impl Cells for $row {
            fn text(&self, col: &str) -> Result<String, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(col)
            }
            fn cell_debug(&self, idx: usize) -> String {
                if let Ok(v) = self.try_get::<Option<String>, _>(idx) {
                    return format!("{v:?}");
                }
                if let Ok(v) = self.try_get::<Option<i64>, _>(idx) {
                    return format!("{v:?}");
                }
                "?".into()
            }
            fn width(&self) -> usize {
                self.len()
            }
        }
    };
}
impl_cells!(SqliteRow);
impl_cells!(PgRow);

fn count<T: TryFrom<i64>>(v: Option<i64>) -> Option<T> {
    v.and_then(|x| T::try_from(x).ok())
}

/// A policy row read through `policy_columns(alias)`; `None` when the join found nothing.
pub fn policy_row(r: &impl Cells, alias: &str) -> Result<Option<PolicyRow>, StoreError> {
    let c = |f: &str| format!("{alias}_{f}");
    if r.opt_text(&c("scope"))?.is_none() {
        return Ok(None);
    }
    Ok(Some(PolicyRow {
        models: r.opt_text(&c("models"))?,
        operations: r.opt_text(&c("operations"))?,
        ips: r.opt_text(&c("ips"))?,
        limits: Limits {
            rpm: count(r.opt_int(&c("rpm"))?),
            tpm: count(r.opt_int(&c("tpm"))?),
            budget_day: count(r.opt_int(&c("budget_day"))?),
            budget_month: count(r.opt_int(&c("budget_month"))?),
            budget_usd_day: count(r.opt_int(&c("budget_usd_day"))?),
            budget_usd_month: count(r.opt_int(&c("budget_usd_month"))?),
            max_concurrent: count(r.opt_int(&c("max_concurrent"))?),
        },
    }))
}

pub fn key_record(r: &impl Cells) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        id: r.text("id")?,
        secret_hash: r.text("secret_hash")?,
        tenant_id: r.text("tenant_id")?,
        tenant_active: r.text("status")? == "active",
        tenant_logs_prompts: r.opt_int("prompt_log_days")?.unwrap_or(0) > 0,
        expires_at: r.opt_int("expires_at")?,
        revoked_at: r.opt_int("revoked_at")?,
        tenant_policy: policy_row(r, "tp")?.unwrap_or_default(),
        key_policy: policy_row(r, "kp")?,
    })
}

pub fn tenant(r: &impl Cells) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: r.text("id")?,
        name: r.text("name")?,
        status: r.text("status")?,
        labels: r.text("labels")?,
        created_at: r.opt_int("created_at")?.unwrap_or(0),
        prompt_log_days: count(r.opt_int("prompt_log_days")?).unwrap_or(0),
    })
}

pub fn key_info(r: &impl Cells) -> Result<KeyInfo, StoreError> {
    Ok(KeyInfo {
        id: r.text("id")?,
        prefix: r.text("prefix")?,
        name: r.text("name")?,
        tenant_id: r.text("tenant_id")?,
        tenant_name: r.text("tenant_name")?,
        labels: r.text("labels")?,
        created_at: r.opt_int("created_at")?.unwrap_or(0),
        expires_at: r.opt_int("expires_at")?,
        revoked_at: r.opt_int("revoked_at")?,
        last_used_at: r.opt_int("last_used_at")?,
        rotated_to: r.opt_text("rotated_to")?,
    })
}

pub fn audit_event(r: &impl Cells) -> Result<crate::audit::AuditEvent, StoreError> {
    let n = |c: &str| r.opt_int(c);
    Ok(crate::audit::AuditEvent {
        at_ms: n("at_ms")?.unwrap_or(0),
        request_id: r.text("request_id")?,
        key_id: r.opt_text("key_id")?,
        tenant_id: r.opt_text("tenant_id")?,
        model: r.opt_text("model")?,
        operation: r.text("operation")?,
        decision: r.text("decision")?,
        reason: r.text("reason")?,
        status: count(n("status")?).unwrap_or(0),
        tokens_in: count(n("tokens_in")?),
        tokens_out: count(n("tokens_out")?),
        latency_ms: n("latency_ms")?.unwrap_or(0),
        first_byte_ms: None,
        client_ip: r.opt_text("client_ip")?,
        prompt: None,
    })
}

pub fn debug_row(r: &impl Cells) -> String {
    (0..r.width())
        .map(|i| r.cell_debug(i))
        .collect::<Vec<_>>()
        .join(" | ")
}
