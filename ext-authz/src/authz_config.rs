//! tollgate-authz's configuration file (YAML), validated once at start-up: trusted proxies,
//! cache and throttle settings, provider credentials and static keys. Secrets are never in
//! the file: credentials and static keys name the environment variable that holds them.

use crate::ip_net::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Proxies whose `x-forwarded-for` is believed (CIDRs). Empty: the peer is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_seconds: u64,
    #[serde(default = "default_cache_entries")]
    pub cache_max_entries: usize,
    #[serde(default = "default_window")]
    pub failure_window_seconds: u64,
    #[serde(default = "default_ip_failures")]
    pub max_failures_per_ip: u32,
    #[serde(default = "default_prefix_failures")]
    pub max_failures_per_prefix: u32,
    /// argon2 verifications at once; default: one per CPU.
    #[serde(default)]
    pub argon2_concurrency: Option<usize>,
    /// Checks that may wait for an argon2 slot; past it 503 `authz_overloaded`. Default:
    /// four per slot.
    #[serde(default)]
    pub argon2_queue: Option<usize>,
    /// A key-store lookup slower than this is refused with 503 `authz_unavailable`; keep
    /// it well under Envoy's ext_authz timeout (2 s in the shipped configs).
    #[serde(default = "default_store_timeout_ms")]
    pub store_timeout_ms: u64,
    /// How often the key-event log is polled (PostgreSQL also pushes via LISTEN/NOTIFY).
    #[serde(default = "default_poll_ms")]
    pub event_poll_ms: u64,
    /// Named provider credentials; a route picks one with the ext_authz context extension
    /// `tollgate_credential: <name>`.
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialConfig>,
    #[serde(default)]
    pub static_keys: Vec<StaticKeyConfig>,
    /// Audit events older than this are deleted (hourly).
    #[serde(default = "default_retention")]
    pub audit_retention_days: u32,
    /// Events waiting to be written; past it they are dropped and counted.
    #[serde(default = "default_audit_queue")]
    pub audit_queue_capacity: usize,
    /// With the foundation profile: refuse a PostgreSQL URL without `sslmode=require` or
    /// stronger.
    #[serde(default)]
    pub require_database_tls: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Header to set on the upstream request, e.g. `authorization` or `x-api-key`.
    pub header: String,
    /// Environment variable holding the secret.
    pub env: String,
    /// How the value is written; `{}` is the secret. Default `{}`.
    #[serde(default = "default_format")]
    pub format: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticKeyConfig {
    pub name: String,
    pub tenant: String,
    /// Environment variable holding the key (at least 32 characters).
    pub env: String,
    #[serde(default)]
    pub rpm: Option<u32>,
}

fn default_cache_ttl() -> u64 {
    30
}
fn default_cache_entries() -> usize {
    100_000
}
fn default_window() -> u64 {
    60
}
fn default_ip_failures() -> u32 {
    30
}
fn default_prefix_failures() -> u32 {
    10
}
fn default_store_timeout_ms() -> u64 {
    500
}
fn default_poll_ms() -> u64 {
    200
}
fn default_retention() -> u32 {
    90
}
fn default_audit_queue() -> usize {
    10_000
}
fn default_format() -> String {
    "{}".into()
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            cache_ttl_seconds: default_cache_ttl(),
            cache_max_entries: default_cache_entries(),
            failure_window_seconds: default_window(),
            max_failures_per_ip: default_ip_failures(),
            max_failures_per_prefix: default_prefix_failures(),
            argon2_concurrency: None,
            argon2_queue: None,
            store_timeout_ms: default_store_timeout_ms(),
            event_poll_ms: default_poll_ms(),
            credentials: BTreeMap::new(),
            static_keys: Vec::new(),
            audit_retention_days: default_retention(),
            audit_queue_capacity: default_audit_queue(),
            require_database_tls: false,
        }
    }
}

/// Why the authz configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthzConfigError {
    #[error("authz config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// An entry of `trusted_proxies`, with `IpNet::parse`'s reason.
    #[error("authz config: trusted_proxies: {0}")]
    TrustedProxy(String),
    #[error("authz config: event_poll_ms and failure_window_seconds must be > 0")]
    ZeroInterval,
    #[error("authz config: argon2_concurrency and store_timeout_ms must be > 0")]
    ZeroCapacity,
    #[error("authz config: credential {0:?} needs a header and a format containing {{}}")]
    Credential(String),
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<Self, AuthzConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let c: FileConfig = serde_yaml::from_str(text)?;
        c.trusted_proxy_nets()?;
        if c.event_poll_ms == 0 || c.failure_window_seconds == 0 {
            return Err(AuthzConfigError::ZeroInterval);
        }
        if c.argon2_concurrency == Some(0) || c.store_timeout_ms == 0 {
            return Err(AuthzConfigError::ZeroCapacity);
        }
        for (name, cred) in &c.credentials {
            if cred.header.is_empty() || !cred.format.contains("{}") {
                return Err(AuthzConfigError::Credential(name.clone()));
            }
        }
        Ok(c)
    }

    /// argon2 slots: the configured number, else one per CPU (`cpus`).
    pub fn argon2_slots(&self, cpus: usize) -> usize {
        self.argon2_concurrency.unwrap_or(cpus).max(1)
    }

    pub fn trusted_proxy_nets(&self) -> Result<Vec<IpNet>, AuthzConfigError> {
        self.trusted_proxies
            .iter()
            .map(|s| IpNet::parse(s).map_err(AuthzConfigError::TrustedProxy))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = FileConfig::parse("").unwrap();
        assert_eq!(c.cache_ttl_seconds, 30);
        assert!(c.credentials.is_empty());
    }

    #[test]
    fn full_file_parses() {
        let c = FileConfig::parse(
            "trusted_proxies: [127.0.0.1/32]\ncache_ttl_seconds: 5\ncredentials:\n  openai: {header: authorization, env: OPENAI_API_KEY, format: 'Bearer {}'}\nstatic_keys:\n  - {name: casual, tenant: default, env: TG_KEY, rpm: 10}\n",
        )
        .unwrap();
        assert_eq!(c.cache_ttl_seconds, 5);
        assert_eq!(c.credentials["openai"].format, "Bearer {}");
        assert_eq!(c.static_keys[0].rpm, Some(10));
    }

    #[test]
    fn argon2_and_store_bounds_have_defaults_and_refuse_zero() {
        let c = FileConfig::parse("").unwrap();
        assert_eq!((c.argon2_concurrency, c.argon2_queue), (None, None));
        assert_eq!(c.argon2_slots(6), 6);
        assert_eq!(c.store_timeout_ms, 500);
        let c =
            FileConfig::parse("argon2_concurrency: 2\nargon2_queue: 0\nstore_timeout_ms: 250\n")
                .unwrap();
        assert_eq!((c.argon2_slots(6), c.argon2_queue), (2, Some(0)));
        assert_eq!(c.store_timeout_ms, 250);
        assert!(FileConfig::parse("argon2_concurrency: 0").is_err());
        assert!(FileConfig::parse("store_timeout_ms: 0").is_err());
    }

    #[test]
    fn unknown_fields_bad_cidrs_and_bad_formats_are_refused() {
        assert!(FileConfig::parse("cache_ttl: 5").is_err());
        assert!(FileConfig::parse("trusted_proxies: [nope]").is_err());
        assert!(FileConfig::parse(
            "credentials:\n  x: {header: authorization, env: X, format: 'Bearer'}"
        )
        .is_err());
    }
}
