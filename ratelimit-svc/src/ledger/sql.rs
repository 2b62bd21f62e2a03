//! The ledger's SQL side: SQLite (default) or PostgreSQL, migrated from `migrations/` like
//! tollgate-authz's key store (the two may share one database). Inserts are idempotent on
//! (`source`, `seq`), so a buffer replayed after a crash adds nothing twice.

use super::{CounterRef, LedgerError, Line};
use sqlx::{PgPool, QueryBuilder, Row, SqlitePool};
use std::collections::BTreeMap;
use tollgate_runtime::sql_pool::{PoolSize, SqlPool, SqlPoolError};

#[derive(Debug, Clone)]
pub enum LedgerDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One usage row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub source: String,
    pub seq: u64,
    pub at_us: u64,
    pub request_id: String,
    pub key_id: String,
    pub tenant_id: String,
    pub tokens: u64,
    /// In 1/10000 USD.
    pub cost_usd: u64,
}

/// A budget counter the ledger has seen charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    pub counter_key: String,
    pub subject_kind: String,
    pub subject_id: String,
    pub requests_per_unit: u32,
    pub unit: String,
    /// Counts cost in 1/10000 USD (`measure = 'usd'`), not tokens.
    pub usd: bool,
}

/// `token_ledger_counters.measure` of a counter.
fn measure(usd: bool) -> &'static str {
    if usd {
        "usd"
    } else {
        "tokens"
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The counters of a batch, one per key (PostgreSQL refuses to upsert a row twice in one
/// statement), with the latest time each was seen.
fn counters_of(lines: &[Line]) -> BTreeMap<&str, (&CounterRef, u64)> {
    let mut out: BTreeMap<&str, (&CounterRef, u64)> = BTreeMap::new();
    for l in lines {
        for c in &l.counters {
            let seen = out.entry(c.key.as_str()).or_insert((c, l.at_us));
            seen.1 = seen.1.max(l.at_us);
        }
    }
    out
}

/// The same statements for both backends (`QueryBuilder` binds with each one's syntax).
macro_rules! insert_batch {
    ($db:ty, $pool:expr, $source:expr, $lines:expr) => {{
        let mut tx = $pool.begin().await?;
        let mut q = QueryBuilder::<$db>::new(
            "INSERT INTO token_ledger \
             (source, seq, at_us, request_id, key_id, tenant_id, tokens, cost_usd) ",
        );
        q.push_values($lines, |mut b, l| {
            b.push_bind($source)
                .push_bind(i64_of(l.seq))
                .push_bind(i64_of(l.at_us))
                .push_bind(&l.request_id)
                .push_bind(&l.key_id)
                .push_bind(&l.tenant_id)
                .push_bind(i64_of(l.tokens))
                .push_bind(i64_of(l.cost_usd));
        });
        q.push(" ON CONFLICT (source, seq) DO NOTHING");
        q.build().execute(&mut *tx).await?;
        let counters = counters_of($lines);
        if !counters.is_empty() {
            let mut q = QueryBuilder::<$db>::new(
                "INSERT INTO token_ledger_counters \
                 (counter_key, subject_kind, subject_id, requests_per_unit, unit, last_seen_us, measure) ",
            );
            q.push_values(counters, |mut b, (key, (c, seen))| {
                b.push_bind(key.to_string())
                    .push_bind(c.subject_kind.clone())
                    .push_bind(c.subject_id.clone())
                    .push_bind(i64::from(c.requests_per_unit))
                    .push_bind(c.unit.clone())
                    .push_bind(i64_of(seen))
                    .push_bind(measure(c.usd));
            });
            q.push(" ON CONFLICT (counter_key) DO UPDATE SET last_seen_us = excluded.last_seen_us");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }};
}

impl LedgerDb {
    /// One writer task inserts; the drift report reads.
    const POOL: PoolSize = PoolSize {
        sqlite: 2,
        postgres: 2,
    };

    /// `sqlite:…` or `postgres://…`; runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, LedgerError> {
        let pool = SqlPool::open(url, Self::POOL).await.map_err(|e| match e {
            SqlPoolError::UnsupportedUrl => {
                LedgerError::InvalidUrl("ledger URL must start with sqlite: or postgres://".into())
            }
            SqlPoolError::Connect(e) => LedgerError::Sql(e),
            SqlPoolError::Migrate(e) => LedgerError::Migrate(e),
        })?;
        Ok(match pool {
            SqlPool::Sqlite(p) => LedgerDb::Sqlite(p),
            SqlPool::Postgres(p) => LedgerDb::Postgres(p),
        })
    }

    /// Inserts buffered lines in one transaction; rows already present are skipped.
    pub(crate) async fn insert(&self, source: &str, lines: &[Line]) -> Result<(), LedgerError> {
        if lines.is_empty() {
            return Ok(());
        }
        match self {
            LedgerDb::Sqlite(p) => insert_batch!(sqlx::Sqlite, p, source, lines),
            LedgerDb::Postgres(p) => insert_batch!(sqlx::Postgres, p, source, lines),
        }
        Ok(())
    }

    /// Usage rows of one subject (`key_id` or `tenant_id`) since `since_us`, oldest first.
    pub async fn usage(
        &self,
        subject_kind: &str,
        subject_id: &str,
        since_us: u64,
    ) -> Result<Vec<UsageRow>, LedgerError> {
        let column = match subject_kind {
            "key_id" => "key_id",
            "tenant_id" => "tenant_id",
            other => return Err(LedgerError::InvalidUrl(format!("unknown subject {other}"))),
        };
        let sql = |p: &str| {
            format!(
                "SELECT source, seq, at_us, request_id, key_id, tenant_id, tokens, cost_usd \
                 FROM token_ledger \
                 WHERE {column} = {p}1 AND at_us >= {p}2 ORDER BY at_us, source, seq"
            )
        };
        macro_rules! rows {
            ($pool:expr, $sql:expr) => {
                sqlx::query(&$sql)
                    .bind(subject_id)
                    .bind(i64_of(since_us))
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|r| UsageRow {
                        source: r.get("source"),
                        seq: u64_of(r.get("seq")),
                        at_us: u64_of(r.get("at_us")),
                        request_id: r.get("request_id"),
                        key_id: r.get("key_id"),
                        tenant_id: r.get("tenant_id"),
                        tokens: u64_of(r.get("tokens")),
                        cost_usd: u64_of(r.get("cost_usd")),
                    })
                    .collect()
            };
        }
        Ok(match self {
            LedgerDb::Sqlite(p) => rows!(p, sql("?")),
            LedgerDb::Postgres(p) => rows!(p, sql("$")),
        })
    }

    /// Every budget counter the ledger has seen charged.
    pub async fn counters(&self) -> Result<Vec<CounterRow>, LedgerError> {
        let sql = "SELECT counter_key, subject_kind, subject_id, requests_per_unit, unit, measure \
                   FROM token_ledger_counters ORDER BY counter_key";
        macro_rules! rows {
            ($pool:expr) => {
                sqlx::query(sql)
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|r| CounterRow {
                        counter_key: r.get("counter_key"),
                        subject_kind: r.get("subject_kind"),
                        subject_id: r.get("subject_id"),
                        requests_per_unit: u32::try_from(r.get::<i64, _>("requests_per_unit"))
                            .unwrap_or(u32::MAX),
                        unit: r.get("unit"),
                        usd: r.get::<String, _>("measure") == measure(true),
                    })
                    .collect()
            };
        }
        Ok(match self {
            LedgerDb::Sqlite(p) => rows!(p),
            LedgerDb::Postgres(p) => rows!(p),
        })
    }

    /// Total rows (tests and the drift report).
    pub async fn row_count(&self) -> Result<u64, LedgerError> {
        let sql = "SELECT COUNT(*) AS n FROM token_ledger";
        let n: i64 = match self {
            LedgerDb::Sqlite(p) => sqlx::query(sql).fetch_one(p).await?.get("n"),
            LedgerDb::Postgres(p) => sqlx::query(sql).fetch_one(p).await?.get("n"),
        };
        Ok(u64_of(n))
    }
}
