//! Deployment profiles. `casual` (the default, what `make up` runs): SQLite, static keys
//! allowed. `foundation`: production settings are enforced at start-up, and the service
//! refuses to start on an unsafe one rather than running half-secured.

use crate::authz_config::FileConfig;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Casual,
    Foundation,
}

/// Every reason a foundation deployment must not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("foundation profile refuses to start: {}", .problems.join("; "))]
pub struct ProfileRefused {
    pub problems: Vec<&'static str>,
}

/// Why a foundation deployment must not start; `Ok` for casual.
pub fn check(
    profile: Profile,
    database_url: &str,
    config: &FileConfig,
) -> Result<(), ProfileRefused> {
    if profile == Profile::Casual {
        return Ok(());
    }
    let mut problems = Vec::new();
    let postgres =
        database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    if !postgres {
        problems.push("the key store must be PostgreSQL (--database-url postgres://…)");
    }
    if !config.static_keys.is_empty() {
        problems.push("static keys are not allowed; issue named keys with tollgate-admin");
    }
    if config.require_database_tls && postgres {
        // What the key store will do with this URL, parsed the way it parses it (`sslmode`
        // or `ssl-mode`, else PGSSLMODE, else `prefer`, which falls back to plaintext).
        let tls = PgConnectOptions::from_str(database_url).is_ok_and(|o| {
            matches!(
                o.get_ssl_mode(),
                PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
            )
        });
        if !tls {
            problems.push("require_database_tls is set but the database URL has no sslmode=require/verify-ca/verify-full");
        }
    }
    if config.cache_ttl_seconds > 300 {
        problems
            .push("cache_ttl_seconds above 300 keeps revoked keys usable too long if events stop");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ProfileRefused { problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz_config::StaticKeyConfig;

    #[test]
    fn casual_accepts_sqlite_and_static_keys() {
        let mut c = FileConfig::default();
        c.static_keys.push(StaticKeyConfig {
            name: "k".into(),
            tenant: "t".into(),
            env: "K".into(),
            rpm: None,
        });
        assert!(check(Profile::Casual, "sqlite://x.db", &c).is_ok());
    }

    #[test]
    fn foundation_refuses_sqlite_static_keys_and_plaintext_db_when_tls_required() {
        let mut c = FileConfig::default();
        let e = check(Profile::Foundation, "sqlite://x.db", &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PostgreSQL"), "{e}");
        c.static_keys.push(StaticKeyConfig {
            name: "k".into(),
            tenant: "t".into(),
            env: "K".into(),
            rpm: None,
        });
        assert!(check(Profile::Foundation, "postgres://db/x", &c)
            .unwrap_err()
            .to_string()
            .contains("static keys"));
        c.static_keys.clear();
        assert!(check(Profile::Foundation, "postgres://db/x", &c).is_ok());
        c.require_database_tls = true;
        assert!(check(Profile::Foundation, "postgres://db/x", &c)
            .unwrap_err()
            .to_string()
            .contains("sslmode"));
        assert!(check(
            Profile::Foundation,
            "postgres://db/x?sslmode=verify-full",
            &c
        )
        .is_ok());
    }

    #[test]
    fn required_database_tls_reads_the_sslmode_the_connection_uses() {
        let c = FileConfig {
            require_database_tls: true,
            ..FileConfig::default()
        };
        for url in [
            "postgres://db/x?sslmode=require",
            "postgresql://u:p@db:5432/x?ssl-mode=verify-ca&sslrootcert=/ca.pem",
            "postgres://db/x?application_name=a&sslmode=verify-full",
        ] {
            assert!(check(Profile::Foundation, url, &c).is_ok(), "{url}");
        }
        for url in [
            "postgres://db/x?sslmode=disable",
            "postgres://db/x?sslmode=prefer",
            "postgres://db/x?sslmode=allow",
            // The text is there, but not as the sslmode the connection uses.
            "postgres://db/x?application_name=sslmode=require&sslmode=disable",
            "postgres://db/x?sslmode=bogus",
        ] {
            assert!(
                check(Profile::Foundation, url, &c)
                    .unwrap_err()
                    .to_string()
                    .contains("sslmode"),
                "{url}"
            );
        }
    }
}
