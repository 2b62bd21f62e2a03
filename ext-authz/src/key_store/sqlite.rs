//! SQLite key store: the embedded default. WAL mode so the admin CLI can write while
//! the service reads.

use super::{StoreError, StoredKey, Tenant};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SqliteKeyStore {
    pool: SqlitePool,
}

fn new_id(kind: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{kind}_{hex}")
}

impl SqliteKeyStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn find_key(&self, prefix: &str) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id, k.secret_hash, k.tenant_id, t.status, k.rpm, k.expires_at, k.revoked_at \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = ?",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let rpm: Option<i64> = row.try_get("rpm")?;
        Ok(Some(StoredKey {
            id: row.try_get("id")?,
            secret_hash: row.try_get("secret_hash")?,
            tenant_id: row.try_get("tenant_id")?,
            tenant_active: row.try_get::<String, _>("status")? == "active",
            rpm: rpm.and_then(|r| u32::try_from(r).ok()),
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
        }))
    }

    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        if name.trim().is_empty() {
            return Err(StoreError::Invalid("tenant name must not be empty".into()));
        }
        let t = Tenant {
            id: new_id("ten"),
            name: name.to_string(),
            status: "active".into(),
            created_at: crate::time::unix_now(),
        };
        sqlx::query("INSERT INTO tenants (id, name, status, created_at) VALUES (?, ?, ?, ?)")
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.status)
            .bind(t.created_at)
            .execute(&self.pool)
            .await?;
        Ok(t)
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query("SELECT id, name, status, created_at FROM tenants WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(Tenant {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                status: r.try_get("status")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    /// Stores a key row; the caller hashed the secret already. Returns the key id.
    pub async fn insert_key(
        &self,
        tenant_id: &str,
        name: &str,
        prefix: &str,
        secret_hash: &str,
        rpm: Option<u32>,
        expires_at: Option<i64>,
    ) -> Result<String, StoreError> {
        let id = new_id("key");
        sqlx::query(
            "INSERT INTO api_keys (id, prefix, secret_hash, name, tenant_id, rpm, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(prefix)
        .bind(secret_hash)
        .bind(name)
        .bind(tenant_id)
        .bind(rpm.map(i64::from))
        .bind(crate::time::unix_now())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn revoke_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(crate::time::unix_now())
                .bind(key_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }
}
