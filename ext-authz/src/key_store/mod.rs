//! Where tenants, keys, policies and key events live: SQLite (embedded default) or
//! PostgreSQL, chosen by the URL scheme. One set of SQL serves both: `$n` parameters are
//! understood by SQLite and PostgreSQL alike, and both migrations define the same columns.

mod rows;

use crate::audit::AuditEvent;
use crate::policy::{Limits, PolicyRow};
use tollgate_runtime::sql_pool::{PoolSize, SqlPoolError};

/// The key store's pool: the runtime's, under the name the store's code uses.
pub use tollgate_runtime::sql_pool::SqlPool as Pool;

pub use rows::{KeyInfo, KeyRecord, Tenant};

/// (at_ms, request_id, key_id, model, body)
pub type PromptLogRow = (i64, String, Option<String>, Option<String>, String);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("key store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
}

impl From<SqlPoolError> for StoreError {
    fn from(e: SqlPoolError) -> Self {
        match e {
            SqlPoolError::UnsupportedUrl => StoreError::Invalid(e.to_string()),
            SqlPoolError::Connect(e) => StoreError::from(e),
            SqlPoolError::Migrate(e) => StoreError::Migration(e),
        }
    }
}

impl From<tollgate_runtime::ids::IdError> for StoreError {
    fn from(e: tollgate_runtime::ids::IdError) -> Self {
        StoreError::Invalid(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // A constraint violation is the caller's mistake, not an outage.
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_string()),
            _ => StoreError::Unavailable(e),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Key,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Key => "key",
        }
    }
}

/// Runs the same code against whichever pool this store has; `$p` is the typed pool.
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

#[derive(Debug, Clone)]
pub struct KeyStore {
    pool: Pool,
    url_is_postgres: bool,
    url: String,
}

/// `ten_…` / `key_…` with 64 random bits from the operating system.
fn new_id(kind: &str) -> Result<String, StoreError> {
    Ok(tollgate_runtime::ids::prefixed(kind)?)
}

fn to_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| i64::try_from(x).unwrap_or(i64::MAX))
}

impl KeyStore {
    /// Key store pool sizes: checks read concurrently; SQLite has one writer anyway.
    const POOL: PoolSize = PoolSize {
        sqlite: 4,
        postgres: 8,
    };

    /// `sqlite:…` or `postgres://…`; does not migrate (see [`KeyStore::migrate`]).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = Pool::connect(url, Self::POOL).await?;
        Ok(Self {
            url_is_postgres: pool.is_postgres(),
            pool,
            url: url.to_string(),
        })
    }

    pub fn is_postgres(&self) -> bool {
        self.url_is_postgres
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        Ok(self.pool.migrate().await?)
    }

    /// Whether the store answers at all (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The key with this prefix, its tenant's status and both policy rows.
    pub async fn find_key(&self, prefix: &str) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT k.id, k.secret_hash, k.tenant_id, k.expires_at, k.revoked_at, t.status, t.prompt_log_days, {}, {} \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             LEFT JOIN policies tp ON tp.scope = 'tenant' AND tp.subject_id = k.tenant_id \
             LEFT JOIN policies kp ON kp.scope = 'key' AND kp.subject_id = k.id \
             WHERE k.prefix = $1",
            rows::policy_columns("tp"),
            rows::policy_columns("kp")
        );
        on_pool!(&self.pool, |p| {
            let row = sqlx::query(&sql).bind(prefix).fetch_optional(p).await?;
            row.map(|r| rows::key_record(&r)).transpose()
        })
    }

    async fn record_event(&self, subject_id: &str, kind: &str) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p| sqlx::query(
            "INSERT INTO key_events (subject_id, kind, at) VALUES ($1, $2, $3)"
        )
        .bind(subject_id)
        .bind(kind)
        .bind(crate::time::unix_now())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Highest event id, where a follower starts.
    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        let id: Option<i64> = on_pool!(&self.pool, |p| sqlx::query_scalar(
            "SELECT MAX(id) FROM key_events"
        )
        .fetch_one(p)
        .await)?;
        Ok(id.unwrap_or(0))
    }

    /// Events after `after`: (id, subject id, kind), oldest first.
    pub async fn events_since(&self, after: i64) -> Result<Vec<(i64, String, String)>, StoreError> {
        let rows: Vec<(i64, String, String)> = on_pool!(&self.pool, |p| sqlx::query_as(
            "SELECT id, subject_id, kind FROM key_events WHERE id > $1 ORDER BY id LIMIT 1000"
        )
        .bind(after)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    pub async fn create_tenant(&self, name: &str, labels: &str) -> Result<Tenant, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::Invalid(
                "tenant name must be 1..=128 characters".into(),
            ));
        }
        let t = Tenant {
            id: new_id("ten")?,
            name: name.to_string(),
            status: "active".into(),
            labels: labels.to_string(),
            created_at: crate::time::unix_now(),
            prompt_log_days: 0,
        };
        on_pool!(&self.pool, |p| {
            sqlx::query(
            "INSERT INTO tenants (id, name, status, labels, created_at) VALUES ($1, $2, $3, $4, $5)"
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.status)
        .bind(&t.labels)
        .bind(t.created_at)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(t)
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        on_pool!(&self.pool, |p| {
            let row = sqlx::query(
                "SELECT id, name, status, labels, created_at, prompt_log_days FROM tenants WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(p)
            .await?;
            row.map(|r| rows::tenant(&r)).transpose()
        })
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        on_pool!(&self.pool, |p| {
            let all = sqlx::query(
                "SELECT id, name, status, labels, created_at, prompt_log_days FROM tenants ORDER BY name",
            )
            .fetch_all(p)
            .await?;
            all.iter().map(rows::tenant).collect()
        })
    }

    pub async fn set_tenant_status(&self, name: &str, status: &str) -> Result<Tenant, StoreError> {
        let t = self
            .tenant_by_name(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {name:?}")))?;
        on_pool!(&self.pool, |p| sqlx::query(
            "UPDATE tenants SET status = $1 WHERE id = $2"
        )
        .bind(status)
        .bind(&t.id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        self.record_event(&t.id, &format!("tenant_{status}"))
            .await?;
        Ok(Tenant {
            status: status.to_string(),
            ..t
        })
    }

    /// Stores a key row; the caller hashed the secret already. Returns the key id.
    pub async fn insert_key(
        &self,
        tenant_id: &str,
        name: &str,
        labels: &str,
        prefix: &str,
        secret_hash: &str,
        expires_at: Option<i64>,
    ) -> Result<String, StoreError> {
        let id = new_id("key")?;
        on_pool!(&self.pool, |p| {
            sqlx::query(
            "INSERT INTO api_keys (id, prefix, secret_hash, name, tenant_id, labels, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )
        .bind(&id)
        .bind(prefix)
        .bind(secret_hash)
        .bind(name)
        .bind(tenant_id)
        .bind(labels)
        .bind(crate::time::unix_now())
        .bind(expires_at)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(id)
    }

    pub async fn key_info(&self, key_id: &str) -> Result<Option<KeyInfo>, StoreError> {
        let sql = format!("{} WHERE k.id = $1", rows::KEY_INFO_SELECT);
        on_pool!(&self.pool, |p| {
            let row = sqlx::query(&sql).bind(key_id).fetch_optional(p).await?;
            row.map(|r| rows::key_info(&r)).transpose()
        })
    }

    pub async fn list_keys(&self, tenant_id: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
        let sql = format!(
            "{} WHERE ($1 = '' OR k.tenant_id = $1) ORDER BY t.name, k.created_at, k.id",
            rows::KEY_INFO_SELECT
        );
        on_pool!(&self.pool, |p| {
            let all = sqlx::query(&sql)
                .bind(tenant_id.unwrap_or(""))
                .fetch_all(p)
                .await?;
            all.iter().map(rows::key_info).collect()
        })
    }

    pub async fn revoke_key(&self, key_id: &str) -> Result<(), StoreError> {
        let done = on_pool!(&self.pool, |p| sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"
        )
        .bind(crate::time::unix_now())
        .bind(key_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        if done != 1 {
            return Err(StoreError::NotFound(format!("active key {key_id:?}")));
        }
        self.record_event(key_id, "key_revoked").await
    }

    /// Ends a key's life at `expires_at` (rotation's grace period) unless it ends sooner.
    pub async fn expire_key_at(
        &self,
        key_id: &str,
        expires_at: i64,
        rotated_to: &str,
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p| sqlx::query(
            "UPDATE api_keys SET expires_at = CASE WHEN expires_at IS NULL OR expires_at > $1 \
             THEN $1 ELSE expires_at END, rotated_to = $2 WHERE id = $3"
        )
        .bind(expires_at)
        .bind(rotated_to)
        .bind(key_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        self.record_event(key_id, "key_rotated").await
    }

    pub async fn touch_last_used(&self, key_id: &str, at: i64) -> Result<(), StoreError> {
        on_pool!(&self.pool, |p| sqlx::query(
            "UPDATE api_keys SET last_used_at = $1 WHERE id = $2"
        )
        .bind(at)
        .bind(key_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn policy(
        &self,
        scope: Scope,
        subject_id: &str,
    ) -> Result<Option<PolicyRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM policies p WHERE p.scope = $1 AND p.subject_id = $2",
            rows::policy_columns("p")
        );
        on_pool!(&self.pool, |p| {
            let row = sqlx::query(&sql)
                .bind(scope.as_str())
                .bind(subject_id)
                .fetch_optional(p)
                .await?;
            row.map(|r| rows::policy_row(&r, "p"))
                .transpose()
                .map(Option::flatten)
        })
    }

    pub async fn put_policy(
        &self,
        scope: Scope,
        subject_id: &str,
        row: &PolicyRow,
    ) -> Result<(), StoreError> {
        let Limits {
            rpm,
            tpm,
            budget_day,
            budget_month,
            budget_usd_day,
            budget_usd_month,
            max_concurrent,
        } = row.limits;
        on_pool!(&self.pool, |p| {
            sqlx::query(
            "INSERT INTO policies (scope, subject_id, models, operations, ips, rpm, tpm, budget_day, budget_month, max_concurrent, budget_usd_day, budget_usd_month) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (scope, subject_id) DO UPDATE SET models = excluded.models, \
             operations = excluded.operations, ips = excluded.ips, rpm = excluded.rpm, tpm = excluded.tpm, \
             budget_day = excluded.budget_day, budget_month = excluded.budget_month, \
             max_concurrent = excluded.max_concurrent, budget_usd_day = excluded.budget_usd_day, \
             budget_usd_month = excluded.budget_usd_month"
        )
        .bind(scope.as_str())
        .bind(subject_id)
        .bind(&row.models)
        .bind(&row.operations)
        .bind(&row.ips)
        .bind(rpm.map(i64::from))
        .bind(tpm.map(i64::from))
        .bind(to_i64(budget_day))
        .bind(to_i64(budget_month))
        .bind(max_concurrent.map(i64::from))
        .bind(to_i64(budget_usd_day))
        .bind(to_i64(budget_usd_month))
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        self.record_event(subject_id, "policy_changed").await
    }

    /// Turns prompt logging of a tenant on (`days` > 0, the retention) or off (0).
    pub async fn set_tenant_prompt_log(&self, name: &str, days: u32) -> Result<Tenant, StoreError> {
        let t = self
            .tenant_by_name(name)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {name:?}")))?;
        on_pool!(&self.pool, |p| sqlx::query(
            "UPDATE tenants SET prompt_log_days = $1 WHERE id = $2"
        )
        .bind(i64::from(days))
        .bind(&t.id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        self.record_event(&t.id, "tenant_prompt_log").await?;
        Ok(Tenant {
            prompt_log_days: days,
            ..t
        })
    }

    /// Prompt log rows at or after `since_ms` for one tenant: (at_ms, request_id, key_id, model, body).
    pub async fn prompt_logs(
        &self,
        tenant_id: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<PromptLogRow>, StoreError> {
        let rows: Vec<PromptLogRow> = on_pool!(&self.pool, |p| sqlx::query_as(
            "SELECT at_ms, request_id, key_id, model, body FROM prompt_logs \
             WHERE tenant_id = $1 AND at_ms >= $2 ORDER BY at_ms, id LIMIT $3"
        )
        .bind(tenant_id)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    /// Deletes prompt logs past each tenant's retention (all of a tenant that turned it off).
    pub async fn purge_prompt_logs(&self, now_ms: i64) -> Result<u64, StoreError> {
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query(
            "DELETE FROM prompt_logs WHERE at_ms < $1 - COALESCE((SELECT t.prompt_log_days FROM tenants t \
             WHERE t.id = prompt_logs.tenant_id), 0) * 86400000"
        )
        .bind(now_ms)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?)
    }

    /// Writes audit events in one transaction.
    pub async fn insert_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO audit_events (at_ms, request_id, key_id, tenant_id, model, \
             operation, decision, reason, status, tokens_in, tokens_out, latency_ms, client_ip) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
        on_pool!(&self.pool, |p| {
            let mut tx = p.begin().await?;
            for e in events {
                if let (Some(body), Some(tenant)) = (&e.prompt, &e.tenant_id) {
                    // Opted-in tenants only (the filter sets it on their metadata), and
                    // into its own table: audit rows never hold content.
                    sqlx::query(
                        "INSERT INTO prompt_logs (at_ms, request_id, tenant_id, key_id, model, body) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(e.at_ms)
                    .bind(&e.request_id)
                    .bind(tenant)
                    .bind(&e.key_id)
                    .bind(&e.model)
                    .bind(body)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(SQL)
                    .bind(e.at_ms)
                    .bind(&e.request_id)
                    .bind(&e.key_id)
                    .bind(&e.tenant_id)
                    .bind(&e.model)
                    .bind(&e.operation)
                    .bind(&e.decision)
                    .bind(&e.reason)
                    .bind(i64::from(e.status))
                    .bind(to_i64(e.tokens_in))
                    .bind(to_i64(e.tokens_out))
                    .bind(e.latency_ms)
                    .bind(&e.client_ip)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, StoreError>(())
        })
    }

    /// Audit events at or after `since_ms`, optionally for one tenant, oldest first.
    pub async fn audit_events(
        &self,
        since_ms: i64,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        const SQL: &str =
            "SELECT at_ms, request_id, key_id, tenant_id, model, operation, decision, \
             reason, status, tokens_in, tokens_out, latency_ms, client_ip FROM audit_events \
             WHERE at_ms >= $1 AND ($2 = '' OR tenant_id = $2) ORDER BY at_ms, id LIMIT $3";
        on_pool!(&self.pool, |p| {
            let all = sqlx::query(SQL)
                .bind(since_ms)
                .bind(tenant_id.unwrap_or(""))
                .bind(limit)
                .fetch_all(p)
                .await?;
            all.iter().map(rows::audit_event).collect()
        })
    }

    /// Deletes audit events older than `before_ms`; returns how many.
    pub async fn purge_audit_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(on_pool!(&self.pool, |p| sqlx::query(
            "DELETE FROM audit_events WHERE at_ms < $1"
        )
        .bind(before_ms)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?)
    }

    /// Raw rows of every table, for tests that check no secret is stored.
    pub async fn dump_text(&self) -> Result<String, StoreError> {
        let mut out = String::new();
        for t in [
            "tenants",
            "api_keys",
            "policies",
            "key_events",
            "audit_events",
            "prompt_logs",
        ] {
            let sql = format!("SELECT * FROM {t}");
            let text = on_pool!(&self.pool, |p| {
                let all = sqlx::query(&sql).fetch_all(p).await?;
                Ok::<_, StoreError>(
                    all.iter()
                        .map(rows::debug_row)
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            })?;
            out.push_str(&text);
            out.push('\n');
        }
        Ok(out)
    }
}
