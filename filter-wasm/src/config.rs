//! Owns the plugin configuration (Envoy's wasm `configuration` field): parsed and validated once,
//! in `on_configure`; a bad configuration stops the filter from starting rather than letting
//! requests through unchecked.
//!
//! ```json
//! {"blocked_paths": ["/api/pull", "/api/push"], "blocked_prefixes": ["/api/blobs/"],
//!  "upstream": "ollama", "routes": {"hosted": "openai"}, "max_body_bytes": 1048576,
//!  "anthropic_max_tokens": 4096, "default_reservation_tokens": 1024,
//!  "discovery": {"cluster": "model", "path": "/api/tags", "interval_ms": 10000},
//!  "allow_runtime_options": false}
//! ```
//! `upstream` is the API the model server speaks (`openai`, `ollama`, `anthropic`; default
//! `openai`); `routes` overrides it per Envoy route name. Without `discovery` the served
//! model set is not checked (only the key's allowlist).
//!
//! With `routing` (see `crate::routing` and docs/CONFIGURATION.md) the model picks the
//! backend and its API instead; `upstream`, `routes` and `discovery` are then refused.
//! `prices` (see `crate::pricing`) prices models for USD budgets.
//! An empty configuration, or an omitted (or `null`) field, means that field's defaults below;
//! an empty list means "none". Entries are normalised like request paths (see `path_guard`).
//! Unknown fields are errors, so a typo cannot silently drop a block.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::path_guard::{BadEntry, Blocklist, EntryKind};
use crate::pricing::{PriceConfigError, PriceMap, RawPrices};
use crate::request_head::COUNT_MAX;
use crate::routing::{InvalidRouting, RawRouting, Routing};
use crate::translate::{RequestOptions, Upstream};

/// Ollama's endpoints that change what the model server holds.
pub const DEFAULT_BLOCKED_PATHS: [&str; 5] = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
];

/// Ollama's blob endpoints (`/api/blobs/:digest`); `/api/blobs` itself is blocked too.
pub const DEFAULT_BLOCKED_PREFIXES: [&str; 1] = ["/api/blobs/"];

/// Request bodies above this are refused with 413 (the listener's buffer limit is higher).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Tokens reserved for a request that names no `max_tokens`, until its real count is known.
pub const DEFAULT_RESERVATION_TOKENS: u64 = 1024;

/// Where the served model set is learned from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Envoy cluster of the model server.
    pub cluster: String,
    /// `/api/tags` (Ollama) or `/v1/models` (OpenAI-style).
    pub path: String,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_interval() -> u64 {
    10_000
}
fn default_timeout() -> u64 {
    2_000
}

/// The filter's validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub blocklist: Blocklist,
    pub upstream: Upstream,
    pub routes: BTreeMap<String, Upstream>,
    pub max_body_bytes: usize,
    pub request_options: RequestOptions,
    pub default_reservation_tokens: u64,
    pub discovery: Option<DiscoveryConfig>,
    /// Model routing over several backends; `None` means one model server.
    pub routing: Option<Routing>,
    /// Per-model prices for USD budgets; `None`: no model has a price.
    pub prices: Option<PriceMap>,
    /// Pass Ollama's runtime options (`keep_alive`, `options.num_ctx`, …) on; by default
    /// they are dropped, since they change the shared server for everyone on it.
    pub allow_runtime_options: bool,
}

/// The JSON shape, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginConfig {
    blocked_paths: Option<Vec<String>>,
    blocked_prefixes: Option<Vec<String>>,
    upstream: Option<String>,
    routes: Option<BTreeMap<String, String>>,
    max_body_bytes: Option<usize>,
    anthropic_max_tokens: Option<u64>,
    default_reservation_tokens: Option<u64>,
    discovery: Option<DiscoveryConfig>,
    routing: Option<RawRouting>,
    prices: Option<RawPrices>,
    allow_runtime_options: Option<bool>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid plugin configuration: {0}")]
    Json(serde_json::Error),
    #[error(
        "invalid plugin configuration: {} entry {:?}: {}",
        blocklist_field(.0.kind),
        .0.entry,
        .0.reason
    )]
    BadEntry(BadEntry),
    #[error("invalid plugin configuration: routing: {0}")]
    Routing(#[from] InvalidRouting),
    #[error("invalid plugin configuration: prices: {0}")]
    Prices(#[from] PriceConfigError),
    #[error("invalid plugin configuration: {0}")]
    Invalid(String),
}

/// The configuration field a blocklist entry came from.
fn blocklist_field(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Path => "blocked_paths",
        EntryKind::Prefix => "blocked_prefixes",
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are constants that normalise cleanly (a test checks it); should that ever
        // break, block everything rather than nothing.
        let blocklist = Blocklist::new(&DEFAULT_BLOCKED_PATHS, &DEFAULT_BLOCKED_PREFIXES)
            .unwrap_or_else(|_| Blocklist::everything());
        Config {
            blocklist,
            upstream: Upstream::OpenAi,
            routes: BTreeMap::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_options: RequestOptions::default(),
            default_reservation_tokens: DEFAULT_RESERVATION_TOKENS,
            discovery: None,
            routing: None,
            prices: None,
            allow_runtime_options: false,
        }
    }
}

impl Config {
    /// Parses the plugin configuration bytes. Empty or whitespace-only means all defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Config::default());
        }
        let raw: PluginConfig = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
        let paths = raw
            .blocked_paths
            .unwrap_or_else(|| to_strings(&DEFAULT_BLOCKED_PATHS));
        let prefixes = raw
            .blocked_prefixes
            .unwrap_or_else(|| to_strings(&DEFAULT_BLOCKED_PREFIXES));
        let blocklist = Blocklist::new(&paths, &prefixes).map_err(ConfigError::BadEntry)?;
        let kind = |name: &str| {
            Upstream::parse(name).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "upstream {name:?} is not one of openai, ollama, anthropic"
                ))
            })
        };
        let upstream = match raw.upstream.as_deref() {
            Some(u) => kind(u)?,
            None => Upstream::OpenAi,
        };
        let mut routes = BTreeMap::new();
        for (route, u) in raw.routes.unwrap_or_default() {
            routes.insert(route, kind(&u)?);
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(ConfigError::Invalid("max_body_bytes must be > 0".into()));
        }
        if let Some(d) = &raw.discovery {
            if d.cluster.is_empty() || !d.path.starts_with('/') || d.interval_ms < 100 {
                return Err(ConfigError::Invalid(
                    "discovery needs a cluster, a path starting with '/' and interval_ms >= 100"
                        .into(),
                ));
            }
        }
        let routing = match raw.routing {
            Some(r) => {
                if raw.upstream.is_some() || !routes.is_empty() || raw.discovery.is_some() {
                    return Err(ConfigError::Invalid(
                        "with routing, each backend names its upstream and discovery; \
                         drop upstream, routes and discovery"
                            .into(),
                    ));
                }
                Some(Routing::from_raw(r)?)
            }
            None => None,
        };
        let prices = match raw.prices {
            Some(p) => Some(PriceMap::from_raw(p)?),
            None => None,
        };
        let mut request_options = RequestOptions::default();
        if let Some(n) = raw.anthropic_max_tokens {
            request_options.anthropic_max_tokens = n;
        }
        let default_reservation_tokens = raw
            .default_reservation_tokens
            .unwrap_or(DEFAULT_RESERVATION_TOKENS);
        // Both end in a reservation Envoy must carry (see `request_head::COUNT_MAX`).
        for (name, n) in [
            ("default_reservation_tokens", default_reservation_tokens),
            ("anthropic_max_tokens", request_options.anthropic_max_tokens),
        ] {
            if n == 0 || n > COUNT_MAX {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be from 1 to {COUNT_MAX}"
                )));
            }
        }
        Ok(Config {
            blocklist,
            upstream,
            routes,
            max_body_bytes,
            request_options,
            default_reservation_tokens,
            discovery: raw.discovery,
            routing,
            prices,
            allow_runtime_options: raw.allow_runtime_options.unwrap_or(false),
        })
    }

    /// The upstream API for a route (by Envoy route name), else the default.
    pub fn upstream_for(&self, route_name: Option<&str>) -> Upstream {
        route_name
            .and_then(|r| self.routes.get(r))
            .copied()
            .unwrap_or(self.upstream)
    }
}

fn to_strings(entries: &[&str]) -> Vec<String> {
    entries.iter().map(|e| (*e).to_owned()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::path_guard::{decide, Decision};

    fn config(json: &str) -> Result<Config, ConfigError> {
        Config::from_json(json.as_bytes())
    }

    #[test]
    fn defaults_block_the_ollama_mutating_endpoints() {
        let cfg = Config::default();
        assert_eq!(
            cfg.blocklist.paths(),
            [
                "/api/pull",
                "/api/push",
                "/api/create",
                "/api/copy",
                "/api/delete"
            ]
        );
        assert_eq!(cfg.blocklist.prefixes(), ["/api/blobs"]);
    }

    #[test]
    fn empty_configuration_means_defaults() {
        assert_eq!(Config::from_json(b"").unwrap(), Config::default());
        assert_eq!(Config::from_json(b" \n\t").unwrap(), Config::default());
        assert_eq!(config("{}").unwrap(), Config::default());
    }

    #[test]
    fn upstream_routes_body_cap_and_discovery_parse_and_validate() {
        let cfg = config(
            r#"{"upstream":"ollama","routes":{"hosted":"anthropic"},"max_body_bytes":2048,
                "discovery":{"cluster":"model","path":"/api/tags","interval_ms":500}}"#,
        )
        .unwrap();
        assert_eq!(cfg.upstream_for(None), Upstream::Ollama);
        assert_eq!(cfg.upstream_for(Some("hosted")), Upstream::Anthropic);
        assert_eq!(cfg.upstream_for(Some("other")), Upstream::Ollama);
        assert_eq!(cfg.max_body_bytes, 2048);
        assert_eq!(cfg.discovery.as_ref().unwrap().timeout_ms, 2000);
        assert!(config(r#"{"upstream":"grpc"}"#).is_err());
        assert!(config(r#"{"routes":{"a":"x"}}"#).is_err());
        assert!(config(r#"{"max_body_bytes":0}"#).is_err());
        assert!(config(r#"{"discovery":{"cluster":"m","path":"api/tags"}}"#).is_err());
        assert!(config(r#"{"discovery":{"cluster":"m","path":"/x","bogus":1}}"#).is_err());
    }

    #[test]
    fn price_map_is_validated_at_load() {
        let cfg = config(
            r#"{"prices": {"models": [{"match": "gpt-4o-mini", "input_usd_per_mtok": 0.15,
                                       "output_usd_per_mtok": 0.6}]}}"#,
        )
        .unwrap();
        let prices = cfg.prices.unwrap();
        assert_eq!(
            prices.price_for("gpt-4o-mini").map(|p| p.output),
            Some(6_000)
        );
        assert_eq!(prices.price_for("other"), None);
        let err = config(
            r#"{"prices": {"default": {"input_usd_per_mtok": -2, "output_usd_per_mtok": 1}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("prices: default"), "{err}");
        assert!(config(r#"{"prices": {}}"#).is_err());
        assert!(config(r#"{"prices": {"model": []}}"#).is_err());
    }

    #[test]
    fn null_fields_mean_defaults() {
        let cfg = config(r#"{"blocked_paths": null, "blocked_prefixes": null}"#).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn custom_paths_replace_default_paths_and_keep_default_prefixes() {
        let cfg = config(r#"{"blocked_paths": ["/api/generate"]}"#).unwrap();
        assert_eq!(cfg.blocklist.paths(), ["/api/generate"]);
        assert_eq!(cfg.blocklist.prefixes(), ["/api/blobs"]);
        assert_eq!(decide("/api/generate", &cfg.blocklist), Decision::Block);
        assert_eq!(decide("/api/pull", &cfg.blocklist), Decision::Allow);
        assert_eq!(decide("/api/blobs/x", &cfg.blocklist), Decision::Block);
    }

    #[test]
    fn custom_prefixes_replace_default_prefixes() {
        let cfg = config(r#"{"blocked_prefixes": ["/admin/"]}"#).unwrap();
        assert_eq!(cfg.blocklist.prefixes(), ["/admin"]);
        assert_eq!(decide("/ADMIN/x", &cfg.blocklist), Decision::Block);
        assert_eq!(decide("/api/blobs/x", &cfg.blocklist), Decision::Allow);
        assert_eq!(decide("/api/pull", &cfg.blocklist), Decision::Block);
    }

    #[test]
    fn empty_lists_block_nothing() {
        let cfg = config(r#"{"blocked_paths": [], "blocked_prefixes": []}"#).unwrap();
        assert_eq!(decide("/api/pull", &cfg.blocklist), Decision::Allow);
        assert_eq!(decide("/api/blobs/x", &cfg.blocklist), Decision::Allow);
    }

    #[test]
    fn configured_entries_are_normalised() {
        let cfg = config(r#"{"blocked_paths": ["//API/%50ull/"], "blocked_prefixes": ["/x\\Y/"]}"#)
            .unwrap();
        assert_eq!(cfg.blocklist.paths(), ["/api/pull"]);
        assert_eq!(cfg.blocklist.prefixes(), ["/x/y"]);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = config(r#"{"blocked_path": ["/api/pull"]}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Json(_)));
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn path_entry_without_leading_slash_is_rejected() {
        let err = config(r#"{"blocked_paths": ["api/pull"]}"#).unwrap_err();
        assert!(err.to_string().contains("blocked_paths"), "{err}");
        assert!(err.to_string().contains("api/pull"), "{err}");
    }

    #[test]
    fn prefix_entry_without_leading_slash_is_rejected() {
        let err = config(r#"{"blocked_prefixes": ["api/blobs/"]}"#).unwrap_err();
        assert!(err.to_string().contains("blocked_prefixes"), "{err}");
    }

    #[test]
    fn empty_or_malformed_entries_are_rejected() {
        assert!(config(r#"{"blocked_paths": [""]}"#).is_err());
        assert!(config(r#"{"blocked_paths": ["/api/pull?x=1"]}"#).is_err());
        assert!(config(r#"{"blocked_paths": ["/api/%zz"]}"#).is_err());
        assert!(config(r#"{"blocked_prefixes": ["/a%00"]}"#).is_err());
    }

    #[test]
    fn invalid_json_is_rejected() {
        assert!(config("{").is_err());
        assert!(config("blocked_paths: [/api/pull]").is_err());
        assert!(config("[]").is_err());
        assert!(config("null").is_err());
        assert!(config(r#"{"blocked_paths": "/api/pull"}"#).is_err());
        assert!(config(r#"{"blocked_paths": [1]}"#).is_err());
    }
}
