//! The SQL pool both services open: SQLite (`sqlite:…`, the embedded default) or PostgreSQL
//! (`postgres://…`, TLS per `sslmode`), chosen by the URL scheme, and the migrations in
//! `migrations/` (the key store, audit events and the budget ledger share one schema, so
//! both services may point at one database).

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

/// How long a query waits for a free connection before failing (the store is then
/// "unavailable", never waited on without bound).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long SQLite waits for another writer (the admin CLI, the other service).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SqlPoolError {
    #[error("database URL must start with sqlite: or postgres://")]
    UnsupportedUrl,
    /// A malformed URL (`sqlx::Error::Configuration`) or an unreachable database.
    #[error(transparent)]
    Connect(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl SqlPoolError {
    /// Whether waiting may help (the database is down or refusing), as opposed to a
    /// configuration that will never work.
    pub fn is_transient(&self) -> bool {
        matches!(self, SqlPoolError::Connect(e) if !matches!(e, sqlx::Error::Configuration(_)))
    }
}

/// Pool sizes per backend: SQLite has one writer at a time, PostgreSQL serves many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    pub sqlite: u32,
    pub postgres: u32,
}

#[derive(Debug, Clone)]
pub enum SqlPool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl SqlPool {
    /// Connects (SQLite: creating the file, WAL so readers never wait for the writer);
    /// does not migrate.
    pub async fn connect(url: &str, size: PoolSize) -> Result<Self, SqlPoolError> {
        if is_postgres_url(url) {
            let opts = PgConnectOptions::from_str(url)?;
            Ok(SqlPool::Postgres(
                PgPoolOptions::new()
                    .max_connections(size.postgres)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(opts)
                    .await?,
            ))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            Ok(SqlPool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(size.sqlite)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(opts)
                    .await?,
            ))
        } else {
            Err(SqlPoolError::UnsupportedUrl)
        }
    }

    /// Applies the migrations of `migrations/sqlite` or `migrations/postgres`.
    pub async fn migrate(&self) -> Result<(), SqlPoolError> {
        match self {
            SqlPool::Sqlite(p) => sqlx::migrate!("../migrations/sqlite").run(p).await?,
            SqlPool::Postgres(p) => sqlx::migrate!("../migrations/postgres").run(p).await?,
        }
        Ok(())
    }

    /// [`SqlPool::connect`], then [`SqlPool::migrate`].
    pub async fn open(url: &str, size: PoolSize) -> Result<Self, SqlPoolError> {
        let pool = Self::connect(url, size).await?;
        pool.migrate().await?;
        Ok(pool)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, SqlPool::Postgres(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: PoolSize = PoolSize {
        sqlite: 2,
        postgres: 2,
    };

    fn temp_db(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-runtime-{tag}-{}-{}",
            std::process::id(),
            crate::ids::random_hex64().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("t.db")
    }

    #[tokio::test]
    async fn sqlite_is_created_migrated_and_in_wal_mode() {
        let path = temp_db("wal");
        let pool = SqlPool::open(&format!("sqlite://{}", path.display()), SIZE)
            .await
            .unwrap();
        let SqlPool::Sqlite(p) = &pool else {
            panic!("not SQLite: {pool:?}")
        };
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        // Both services' tables are there: the key store's and the ledger's.
        for table in ["api_keys", "audit_events", "token_ledger"] {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
            )
            .bind(table)
            .fetch_one(p)
            .await
            .unwrap();
            assert_eq!(n, 1, "{table}");
        }
        // Migrating again is a no-op, not an error.
        pool.migrate().await.unwrap();
        assert!(!pool.is_postgres());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn an_unknown_scheme_or_a_malformed_url_is_not_worth_waiting_for() {
        let e = SqlPool::connect("mysql://x", SIZE).await.unwrap_err();
        assert!(matches!(e, SqlPoolError::UnsupportedUrl), "{e:?}");
        assert!(!e.is_transient());
        let e = SqlPool::connect("postgres://u@h:notaport/db", SIZE)
            .await
            .unwrap_err();
        assert!(!e.is_transient(), "{e:?}");
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_transient() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = SqlPool::connect(&format!("postgres://u@127.0.0.1:{port}/db"), SIZE)
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }
}
