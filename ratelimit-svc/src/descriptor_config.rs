//! Descriptor configuration in envoyproxy/ratelimit's YAML format: per domain, nested
//! descriptors with limits. Parsed and validated once per load, then matched per request
//! without allocating, exactly as envoyproxy/ratelimit matches.
//!
//! ```yaml
//! domain: tollgate
//! descriptors:
//!   - key: tenant_id                  # any tenant: 600/minute
//!     rate_limit: {unit: minute, requests_per_unit: 600}
//!   - key: tenant_id
//!     value: acme                     # this tenant: more (a value entry beats a key-only one)
//!     rate_limit: {unit: minute, requests_per_unit: 6000}
//!   - key: key_id
//!     descriptors:                    # two-entry descriptors: (key_id, phase)
//!       - key: phase
//!         value: tokens_est
//!         shadow_mode: true           # counted and logged, never denies
//!         rate_limit: {unit: minute, requests_per_unit: 100000, name: tpm}
//!   - key: internal
//!     rate_limit: {unlimited: true}   # never limited, not counted
//! ```
//!
//! Matching walks the request's entries level by level; at each level an entry matches
//! `key` + `value` first, else a key-only entry. The limit applies only if the walk
//! reaches the descriptor's last entry. `rate_limit.replaces: [{name: …}]` drops the named
//! limits from the same request. `detailed_metric` is accepted and ignored.

use crate::limit_policy::{Limit, Unit};
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(file: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_string(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    #[serde(default, deserialize_with = "scalar")]
    domain: String,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    #[serde(default, deserialize_with = "scalar")]
    key: String,
    #[serde(default, deserialize_with = "scalar")]
    value: String,
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    shadow_mode: bool,
    /// Per-value metrics in envoyproxy/ratelimit; Tollgate has no such metrics.
    #[serde(default, rename = "detailed_metric")]
    _detailed_metric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    requests_per_unit: u32,
    #[serde(default, deserialize_with = "scalar")]
    unit: String,
    #[serde(default)]
    unlimited: bool,
    #[serde(default, deserialize_with = "scalar")]
    name: String,
    #[serde(default)]
    replaces: Vec<YamlReplaces>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlReplaces {
    #[serde(default, deserialize_with = "scalar")]
    name: String,
}

/// Like Go's YAML decoder into a string field: `value: 42` and `value: true` are strings.
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    use serde_yaml::Value;
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        _ => Err(D::Error::custom("expected a string")),
    }
}

/// A configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None` when `unlimited: true`: always OK and not counted.
    pub limit: Option<Limit>,
    /// `rate_limit.name`, which `replaces` refers to and which is reported to Envoy.
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
}

#[derive(Debug, Default)]
struct Node {
    rule: Option<Arc<Rule>>,
    /// key → value → node: entries with a `value`.
    by_value: HashMap<String, HashMap<String, Node>>,
    /// key → node: key-only entries (any value).
    by_key: HashMap<String, Node>,
}

impl Node {
    fn has_children(&self) -> bool {
        !self.by_value.is_empty() || !self.by_key.is_empty()
    }
}

/// Every loaded domain. Immutable once built; a reload builds a new one.
#[derive(Debug, Default)]
pub struct Config {
    domains: HashMap<String, Node>,
}

impl Config {
    /// Parses YAML sources, each `(file name for errors, text)`. A source may hold several
    /// domains as YAML documents separated by `---`. A domain may appear only once.
    pub fn parse(sources: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        for (file, text) in sources {
            for doc in serde_yaml::Deserializer::from_str(text) {
                let root = YamlRoot::deserialize(doc).map_err(|e| invalid(file, e.to_string()))?;
                if root.domain.is_empty() {
                    return Err(invalid(file, "config file cannot have an empty domain"));
                }
                if config.domains.contains_key(&root.domain) {
                    return Err(invalid(file, format!("duplicate domain '{}'", root.domain)));
                }
                let mut node = Node::default();
                load_level(file, &root.domain, root.descriptors, &mut node)?;
                config.domains.insert(root.domain, node);
            }
        }
        Ok(config)
    }

    /// One YAML text (tests, inline configuration).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Self::parse(&[("<inline>".to_string(), text.to_string())])
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Loaded domain names, sorted.
    pub fn domain_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.domains.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The rule for a descriptor's entries (request id already removed), if any.
    pub fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<&Rule> {
        let mut node = self.domains.get(domain)?;
        let last = entries.len().checked_sub(1)?;
        for (i, (key, value)) in entries.iter().enumerate() {
            let next = node
                .by_value
                .get(*key)
                .and_then(|values| values.get(*value))
                .or_else(|| node.by_key.get(*key))?;
            if i == last {
                return next.rule.as_deref();
            }
            if !next.has_children() {
                // The request has more entries than the configuration is deep.
                return None;
            }
            node = next;
        }
        None
    }
}

fn load_level(
    file: &str,
    parent: &str,
    descriptors: Vec<YamlDescriptor>,
    node: &mut Node,
) -> Result<(), ConfigError> {
    for d in descriptors {
        if d.key.is_empty() {
            return Err(invalid(
                file,
                format!("{parent}: descriptor has an empty key"),
            ));
        }
        let path = if d.value.is_empty() {
            format!("{parent}.{}", d.key)
        } else {
            format!("{parent}.{}_{}", d.key, d.value)
        };
        let duplicate = if d.value.is_empty() {
            node.by_key.contains_key(&d.key)
        } else {
            node.by_value
                .get(&d.key)
                .is_some_and(|values| values.contains_key(&d.value))
        };
        if duplicate {
            return Err(invalid(
                file,
                format!("duplicate descriptor composite key '{path}'"),
            ));
        }
        let mut child = Node {
            rule: d
                .rate_limit
                .map(|rl| rule(file, &path, rl, d.shadow_mode))
                .transpose()?
                .map(Arc::new),
            ..Node::default()
        };
        load_level(file, &path, d.descriptors, &mut child)?;
        if d.value.is_empty() {
            node.by_key.insert(d.key, child);
        } else {
            node.by_value
                .entry(d.key)
                .or_default()
                .insert(d.value, child);
        }
    }
    Ok(())
}

fn rule(file: &str, path: &str, rl: YamlRateLimit, shadow_mode: bool) -> Result<Rule, ConfigError> {
    let unit = Unit::from_name(&rl.unit);
    let limit = match (rl.unlimited, unit) {
        (true, None) => None,
        (true, Some(_)) => {
            return Err(invalid(
                file,
                format!("{path}: should not specify rate limit unit when unlimited"),
            ))
        }
        (false, Some(unit)) => Some(Limit {
            requests_per_unit: rl.requests_per_unit,
            unit,
        }),
        (false, None) => {
            return Err(invalid(
                file,
                format!("{path}: invalid rate limit unit '{}'", rl.unit),
            ))
        }
    };
    let name = (!rl.name.is_empty()).then_some(rl.name);
    let mut replaces = Vec::with_capacity(rl.replaces.len());
    for r in rl.replaces {
        if r.name.is_empty() {
            return Err(invalid(
                file,
                format!("{path}: should not have an empty replaces entry"),
            ));
        }
        if name.as_deref() == Some(r.name.as_str()) {
            return Err(invalid(
                file,
                format!("{path}: replaces should not contain name of same descriptor"),
            ));
        }
        replaces.push(r.name);
    }
    Ok(Rule {
        limit,
        name,
        replaces,
        shadow_mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
domain: tollgate
descriptors:
  - key: tenant_id
    rate_limit: {unit: minute, requests_per_unit: 600}
  - key: tenant_id
    value: acme
    rate_limit: {unit: MINUTE, requests_per_unit: 6000}
  - key: key_id
    descriptors:
      - key: phase
        value: tokens_est
        shadow_mode: true
        detailed_metric: true
        rate_limit: {unit: minute, requests_per_unit: 100000, name: tpm}
  - key: internal
    rate_limit: {unlimited: true}
  - key: code
    value: 42
    rate_limit: {unit: second, requests_per_unit: 1}
"#;

    fn per(n: u32, unit: Unit) -> Option<Limit> {
        Some(Limit {
            requests_per_unit: n,
            unit,
        })
    }

    fn limit_of(c: &Config, entries: &[(&str, &str)]) -> Option<Option<Limit>> {
        c.find("tollgate", entries).map(|r| r.limit)
    }

    #[test]
    fn value_entry_wins_over_key_only_entry() {
        let c = Config::from_yaml(EXAMPLE).unwrap();
        assert_eq!(
            limit_of(&c, &[("tenant_id", "acme")]),
            Some(per(6000, Unit::Minute))
        );
        assert_eq!(
            limit_of(&c, &[("tenant_id", "other")]),
            Some(per(600, Unit::Minute))
        );
    }

    #[test]
    fn nested_descriptors_match_only_at_full_depth() {
        let c = Config::from_yaml(EXAMPLE).unwrap();
        let r = c
            .find("tollgate", &[("key_id", "k1"), ("phase", "tokens_est")])
            .unwrap();
        assert_eq!(r.limit, per(100_000, Unit::Minute));
        assert!(r.shadow_mode);
        assert_eq!(r.name.as_deref(), Some("tpm"));
        // The parent has no limit of its own; other phases and deeper requests miss.
        assert_eq!(c.find("tollgate", &[("key_id", "k1")]), None);
        assert_eq!(
            c.find("tollgate", &[("key_id", "k1"), ("phase", "other")]),
            None
        );
        assert_eq!(
            c.find(
                "tollgate",
                &[("key_id", "k1"), ("phase", "tokens_est"), ("x", "y")]
            ),
            None
        );
        // A limited leaf does not apply to a longer descriptor.
        assert_eq!(
            c.find("tollgate", &[("tenant_id", "acme"), ("x", "y")]),
            None
        );
    }

    #[test]
    fn unlimited_unknown_domain_and_scalar_values() {
        let c = Config::from_yaml(EXAMPLE).unwrap();
        assert_eq!(limit_of(&c, &[("internal", "x")]), Some(None));
        assert_eq!(c.find("other", &[("tenant_id", "acme")]), None);
        assert_eq!(c.find("tollgate", &[]), None);
        assert_eq!(limit_of(&c, &[("code", "42")]), Some(per(1, Unit::Second)));
    }

    #[test]
    fn several_domains_in_documents_and_files() {
        let c = Config::parse(&[
            (
                "a.yaml".into(),
                "domain: a\ndescriptors: [{key: k, rate_limit: {unit: hour, requests_per_unit: 5}}]\n---\ndomain: b\n".into(),
            ),
            ("c.yaml".into(), "domain: c\n".into()),
        ])
        .unwrap();
        assert_eq!(c.domain_names(), vec!["a", "b", "c"]);
        assert_eq!(
            c.find("a", &[("k", "v")]).unwrap().limit,
            per(5, Unit::Hour)
        );
    }

    #[test]
    fn replaces_are_parsed() {
        let c = Config::from_yaml(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 5, name: wide, replaces: [{name: narrow}]}\n",
        )
        .unwrap();
        let r = c.find("d", &[("k", "v")]).unwrap();
        assert_eq!(r.replaces, vec!["narrow".to_string()]);
        assert_eq!(r.name.as_deref(), Some("wide"));
    }

    #[test]
    fn invalid_configurations_are_refused_with_the_reason() {
        let cases = [
            ("descriptors: []", "empty domain"),
            ("domain: d\nbogus: 1", "unknown field"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: 1, bogus: 2}}]", "unknown field"),
            ("domain: d\ndescriptors: [{value: v}]", "empty key"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unit: fortnight, requests_per_unit: 1}}]", "invalid rate limit unit 'fortnight'"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {requests_per_unit: 1}}]", "invalid rate limit unit ''"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unlimited: true, unit: minute}}]", "unlimited"),
            ("domain: d\ndescriptors: [{key: k}, {key: k}]", "duplicate descriptor composite key 'd.k'"),
            ("domain: d\ndescriptors: [{key: k, value: v}, {key: k, value: v}]", "duplicate descriptor composite key 'd.k_v'"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: 1, replaces: [{name: ''}]}}]", "empty replaces"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: 1, name: a, replaces: [{name: a}]}}]", "same descriptor"),
            ("domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, requests_per_unit: -1}}]", "requests_per_unit: invalid type: integer `-1`"),
            ("domain: d\n---\ndomain: d", "duplicate domain 'd'"),
            ("domain: [", "did not find expected"),
        ];
        for (yaml, want) in cases {
            let err = Config::from_yaml(yaml).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml:?}: got {err:?}, want {want:?}");
            assert!(err.starts_with("<inline>: "), "{err}");
        }
    }
}
