//! Where keys and tenants live: SQLite by default (PostgreSQL joins in the policy work).

mod sqlite;

pub use sqlite::SqliteKeyStore;

/// A key row as the decision needs it. The hash is the argon2id PHC string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub id: String,
    pub secret_hash: String,
    pub tenant_id: String,
    pub tenant_active: bool,
    pub rpm: Option<u32>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub status: String,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("key store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
}
