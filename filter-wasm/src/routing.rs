//! Owns model routing: which backend serves a model and under which name, aliases, and the
//! model set a caller may see across backends.
//!
//! The filter only *names* the backend (in `x-tollgate-backend`); Envoy's routes match that
//! header and pick the cluster, so load balancing, health checks, outlier detection, retries
//! and fallback (an aggregate cluster) stay Envoy's.
//!
//! Allowlist rule: a request for an alias needs the key to allow both the alias and the
//! model it stands for; a listing shows an alias only under the same rule. A backend's
//! `upstream_model` rename is the operator's detail and is not checked against allowlists.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use tollgate_core::model_pattern::{self, ModelPattern, PatternError};

use crate::discovery::{ModelSet, Served};
use crate::model_gate::{
    DISCOVERY_UNAVAILABLE, MODEL_NOT_ALLOWED, MODEL_NOT_FOUND as NOT_SERVED, NO_POLICY,
};
use crate::translate::Upstream;
use tollgate_core::refusal::{Refusal, RefusalCode};

pub const NO_BACKEND: Refusal = Refusal::new(
    RefusalCode::ModelNotFound,
    "no backend on this gateway serves this model",
);
pub const NO_ROUTE: Refusal =
    Refusal::new(RefusalCode::NotFound, "no such endpoint on this gateway");

/// Why a `routing` configuration was refused: the message names the entry and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRouting(String);

impl From<PatternError> for InvalidRouting {
    fn from(e: PatternError) -> Self {
        Self(e.to_string())
    }
}

/// One model server pool, as Envoy sees it: requests go to the route matching its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub upstream: Upstream,
    /// The Envoy cluster discovery polls (the route's cluster, or one of its members).
    pub cluster: String,
    /// List endpoint to poll; `None` turns discovery off for this backend.
    pub discovery_path: Option<String>,
    /// Backend whose hosts Envoy's aggregate cluster uses when this one has none healthy.
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelRoute {
    pattern: ModelPattern,
    backend: String,
    upstream_model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    model: String,
    backend: Option<String>,
}

/// The validated routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub backends: BTreeMap<String, Backend>,
    models: Vec<ModelRoute>,
    aliases: BTreeMap<String, Alias>,
    /// Where requests without a model (`/api/version`, …) go; `None` refuses them.
    pub default_backend: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub backend: &'a str,
    pub upstream: Upstream,
    /// The model after alias resolution (what allowlists see).
    pub target: &'a str,
    /// The name sent to the model server.
    pub upstream_model: &'a str,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    backends: BTreeMap<String, RawBackend>,
    #[serde(default)]
    models: Vec<RawModelRoute>,
    #[serde(default)]
    aliases: BTreeMap<String, RawAlias>,
    default_backend: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    upstream: String,
    cluster: String,
    /// `true` polls the upstream kind's list endpoint, a string names the path, `false` off.
    #[serde(default)]
    discovery: Option<RawDiscovery>,
    fallback: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDiscovery {
    On(bool),
    Path(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelRoute {
    #[serde(rename = "match")]
    pattern: String,
    backend: String,
    upstream_model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAlias {
    Model(String),
    Full {
        model: String,
        backend: Option<String>,
    },
}

fn list_path(upstream: Upstream) -> &'static str {
    match upstream {
        Upstream::Ollama => "/api/tags",
        Upstream::OpenAi | Upstream::Anthropic => "/v1/models",
    }
}

/// Backend names become header values Envoy routes match on: keep them plain.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Routing {
    pub(crate) fn from_raw(raw: RawRouting) -> Result<Routing, InvalidRouting> {
        let mut backends = BTreeMap::new();
        for (name, b) in &raw.backends {
            if !valid_name(name) {
                return Err(InvalidRouting(format!(
                    "backend name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
            let upstream = Upstream::parse(&b.upstream).ok_or_else(|| {
                InvalidRouting(format!(
                    "backend {name:?}: upstream {:?} is not one of openai, ollama, anthropic",
                    b.upstream
                ))
            })?;
            if b.cluster.is_empty() {
                return Err(InvalidRouting(format!("backend {name:?} needs a cluster")));
            }
            let discovery_path = match &b.discovery {
                None | Some(RawDiscovery::On(true)) => Some(list_path(upstream).to_owned()),
                Some(RawDiscovery::On(false)) => None,
                Some(RawDiscovery::Path(p)) if p.starts_with('/') => Some(p.clone()),
                Some(RawDiscovery::Path(p)) => {
                    return Err(InvalidRouting(format!(
                        "backend {name:?}: discovery path {p:?} must start with '/'"
                    )))
                }
            };
            backends.insert(
                name.clone(),
                Backend {
                    upstream,
                    cluster: b.cluster.clone(),
                    discovery_path,
                    fallback: b.fallback.clone(),
                },
            );
        }
        if backends.is_empty() {
            return Err(InvalidRouting("routing needs at least one backend".into()));
        }
        for (name, b) in &backends {
            let Some(f) = &b.fallback else { continue };
            let fb = backends.get(f).ok_or_else(|| {
                InvalidRouting(format!("backend {name:?}: fallback {f:?} is not a backend"))
            })?;
            // The body was translated for the first backend's API before Envoy picks a host;
            // a fallback speaking another API would get a body it cannot read.
            if f == name || fb.upstream != b.upstream || fb.fallback.is_some() {
                return Err(InvalidRouting(format!(
                    "backend {name:?}: fallback {f:?} must be another backend with the same \
                     upstream and no fallback of its own"
                )));
            }
        }
        let known = |b: &str, what: &str| {
            if backends.contains_key(b) {
                Ok(())
            } else {
                Err(InvalidRouting(format!(
                    "{what} names backend {b:?}, which is not defined"
                )))
            }
        };
        let mut models = Vec::new();
        for m in raw.models {
            known(&m.backend, &format!("model route {:?}", m.pattern))?;
            let pattern = ModelPattern::parse(&m.pattern)?;
            if m.upstream_model.is_some() && !matches!(pattern, ModelPattern::Exact(_)) {
                return Err(InvalidRouting(format!(
                    "model route {:?}: upstream_model needs an exact model name",
                    m.pattern
                )));
            }
            models.push(ModelRoute {
                pattern,
                backend: m.backend,
                upstream_model: m.upstream_model.filter(|u| !u.is_empty()),
            });
        }
        let mut aliases = BTreeMap::new();
        for (name, a) in raw.aliases {
            let alias = match a {
                RawAlias::Model(model) => Alias {
                    model,
                    backend: None,
                },
                RawAlias::Full { model, backend } => Alias { model, backend },
            };
            if let Some(b) = &alias.backend {
                known(b, &format!("alias {name:?}"))?;
            }
            if name.is_empty() || alias.model.is_empty() || alias.model == name {
                return Err(InvalidRouting(format!(
                    "alias {name:?} must name another model"
                )));
            }
            aliases.insert(name, alias);
        }
        if let Some(b) = &raw.default_backend {
            known(b, "default_backend")?;
        }
        let routing = Routing {
            backends,
            models,
            aliases,
            default_backend: raw.default_backend,
            interval_ms: raw.interval_ms.unwrap_or(10_000),
            timeout_ms: raw.timeout_ms.unwrap_or(2_000),
        };

        for (name, alias) in &routing.aliases {
            if routing.aliases.contains_key(&alias.model) {
                return Err(InvalidRouting(format!(
                    "alias {name:?} points at another alias"
                )));
            }
            if alias.backend.is_none() && routing.model_route(&alias.model).is_none() {
                return Err(InvalidRouting(format!(
                    "alias {name:?}: no model route serves {:?}",
                    alias.model
                )));
            }
        }
        if routing.interval_ms < 100 || routing.timeout_ms == 0 {
            return Err(InvalidRouting(
                "routing needs interval_ms >= 100 and timeout_ms > 0".into(),
            ));
        }
        Ok(routing)
    }

    /// The first model route for `model`. A route to an Ollama backend matches names as
    /// Ollama resolves them (case, default registry and tag); a route to any other backend
    /// only as written, since those servers match names exactly and would not run it.
    fn model_route(&self, model: &str) -> Option<&ModelRoute> {
        self.models.iter().find(|m| {
            let ollama = self
                .backends
                .get(&m.backend)
                .is_some_and(|b| b.upstream == Upstream::Ollama);
            if ollama {
                m.pattern.matches(model)
            } else {
                m.pattern.matches_as_written(model)
            }
        })
    }

    /// Where `model` goes, aliases resolved; `None` when no route serves it.
    pub fn resolve<'a>(&'a self, model: &'a str) -> Option<Resolved<'a>> {
        let (target, pinned) = match self.aliases.get(model) {
            Some(a) => (a.model.as_str(), a.backend.as_deref()),
            None => (model, None),
        };
        let (backend, upstream_model) = match pinned {
            Some(b) => (b, target),
            None => {
                let r = self.model_route(target)?;
                (
                    r.backend.as_str(),
                    r.upstream_model.as_deref().unwrap_or(target),
                )
            }
        };
        let upstream = self.backends.get(backend)?.upstream;
        Some(Resolved {
            backend,
            upstream,
            target,
            upstream_model,
        })
    }

    /// Decides a request for `model`: allowlist (alias and target), route, served set.
    pub fn check<'a>(
        &'a self,
        model: &'a str,
        allow: &[ModelPattern],
        served: &Served,
    ) -> Result<Resolved<'a>, Refusal> {
        if allow.is_empty() {
            return Err(NO_POLICY);
        }
        if !model_pattern::any_matches(allow, model) {
            return Err(MODEL_NOT_ALLOWED);
        }
        let r = self.resolve(model).ok_or(NO_BACKEND)?;
        if r.target != model && !model_pattern::any_matches(allow, r.target) {
            return Err(MODEL_NOT_ALLOWED);
        }
        self.served_by(r.backend, r.upstream_model, served)?;
        Ok(r)
    }

    /// Whether the backend (or its fallback) serves `model`, as far as discovery knows.
    fn served_by(&self, backend: &str, model: &str, served: &Served) -> Result<(), Refusal> {
        let mut sets: Vec<Option<&ModelSet>> = Vec::new();
        let mut name = Some(backend);
        while let Some(n) = name {
            let Some(b) = self.backends.get(n) else { break };
            if b.discovery_path.is_none() {
                // Not discovered: the model route is the operator's word for it.
                return Ok(());
            }
            sets.push(served.get(n));
            name = b.fallback.as_deref().filter(|f| *f != n);
        }
        if sets.iter().flatten().any(|s| s.contains(model)) {
            return Ok(());
        }
        if sets.iter().all(Option::is_none) {
            return Err(DISCOVERY_UNAVAILABLE);
        }
        Err(NOT_SERVED)
    }

    /// Every model name a caller with `allow` can use right now: discovered names, exact
    /// model routes and aliases, each only if a request for it would pass [`Routing::check`].
    pub fn visible_models(&self, allow: &[ModelPattern], served: &Served) -> Vec<String> {
        let mut candidates: BTreeSet<&str> = BTreeSet::new();
        for name in self.backends.keys() {
            if let Some(set) = served.get(name) {
                candidates.extend(set.names());
            }
        }
        for m in &self.models {
            if let ModelPattern::Exact(name) = &m.pattern {
                candidates.insert(name);
            }
        }
        candidates.extend(self.aliases.keys().map(String::as_str));
        candidates
            .into_iter()
            .filter(|m| self.check(m, allow, served).is_ok())
            .map(str::to_owned)
            .collect()
    }

    /// `(backend, cluster, path)` of every backend that discovers its models.
    pub fn discovery_targets(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.backends.iter().filter_map(|(name, b)| {
            b.discovery_path
                .as_deref()
                .map(|p| (name.as_str(), b.cluster.as_str(), p))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model_gate::allowlist;

    fn routing(json: &str) -> Result<Routing, String> {
        let raw: RawRouting = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Routing::from_raw(raw).map_err(|e| e.to_string())
    }

    fn example() -> Routing {
        routing(
            r#"{"backends":{
                  "local":{"upstream":"ollama","cluster":"ollama_pool","fallback":"spare"},
                  "spare":{"upstream":"ollama","cluster":"ollama_spare"},
                  "hosted":{"upstream":"openai","cluster":"hosted","discovery":false}},
                "models":[{"match":"llama3*","backend":"local"},
                          {"match":"gpt-4o-mini","backend":"hosted","upstream_model":"gpt-4o-mini-2024-07-18"},
                          {"match":"qwen2*","backend":"spare"}],
                "aliases":{"chat-default":"llama3.1:8b","chat-hosted":{"model":"gpt-4o-mini"},
                           "pinned":{"model":"qwen2:0.5b","backend":"local"}}}"#,
        )
        .unwrap()
    }

    fn served() -> Served {
        let mut s = Served::default();
        s.insert("local", ModelSet::from_names(["llama3.1:8b"]));
        s.insert("spare", ModelSet::from_names(["llama3.2:1b", "qwen2:0.5b"]));
        s
    }

    #[test]
    fn aliases_and_patterns_resolve_to_backend_and_upstream_name() {
        let r = example();
        let x = r.resolve("chat-default").unwrap();
        assert_eq!(
            (x.backend, x.target, x.upstream_model),
            ("local", "llama3.1:8b", "llama3.1:8b")
        );
        assert_eq!(x.upstream, Upstream::Ollama);
        let x = r.resolve("chat-hosted").unwrap();
        assert_eq!(
            (x.backend, x.upstream_model),
            ("hosted", "gpt-4o-mini-2024-07-18")
        );
        assert_eq!(x.upstream, Upstream::OpenAi);
        assert_eq!(r.resolve("pinned").unwrap().backend, "local");
        assert_eq!(r.resolve("qwen2:0.5b").unwrap().backend, "spare");
        assert!(r.resolve("mistral").is_none());
    }

    #[test]
    fn allowlist_applies_to_the_alias_and_its_target() {
        let r = example();
        let s = served();
        assert_eq!(
            r.check("chat-default", &allowlist(Some("chat-default")), &s),
            Err(MODEL_NOT_ALLOWED),
            "the target must be allowed too"
        );
        assert_eq!(
            r.check("chat-default", &allowlist(Some("llama3*")), &s),
            Err(MODEL_NOT_ALLOWED),
            "the alias must be allowed too"
        );
        let ok = r
            .check("chat-default", &allowlist(Some("chat-*,llama3*")), &s)
            .unwrap();
        assert_eq!(ok.backend, "local");
        assert_eq!(r.check("x", &[], &s), Err(NO_POLICY));
        assert_eq!(
            r.check("mistral", &allowlist(Some("*")), &s),
            Err(NO_BACKEND)
        );
    }

    #[test]
    fn served_sets_of_backend_and_fallback_decide_and_unknown_fails_closed() {
        let r = example();
        let all = allowlist(Some("*"));
        assert!(r.check("llama3.1:8b", &all, &served()).is_ok());
        assert!(
            r.check("llama3.2:1b", &all, &served()).is_ok(),
            "served by the fallback"
        );
        assert_eq!(r.check("llama3.3:70b", &all, &served()), Err(NOT_SERVED));
        assert_eq!(
            r.check("llama3.1:8b", &all, &Served::default()),
            Err(DISCOVERY_UNAVAILABLE)
        );
        assert!(
            r.check("gpt-4o-mini", &all, &Served::default()).is_ok(),
            "a backend without discovery trusts its model routes"
        );
    }

    #[test]
    fn visible_models_are_the_usable_union() {
        let r = example();
        let s = served();
        assert_eq!(
            r.visible_models(&allowlist(Some("*")), &s),
            [
                "chat-default",
                "chat-hosted",
                "gpt-4o-mini",
                "llama3.1:8b",
                "llama3.2:1b",
                "pinned",
                "qwen2:0.5b"
            ]
        );
        assert_eq!(
            r.visible_models(&allowlist(Some("llama3*,chat-default")), &s),
            ["chat-default", "llama3.1:8b", "llama3.2:1b"]
        );
        assert!(r.visible_models(&[], &s).is_empty());
    }

    #[test]
    fn bad_tables_are_refused() {
        let base = r#""backends":{"a":{"upstream":"ollama","cluster":"a"},"o":{"upstream":"openai","cluster":"o"}}"#;
        for bad in [
            r#"{"backends":{}}"#.to_string(),
            r#"{"backends":{"a b":{"upstream":"ollama","cluster":"a"}}}"#.into(),
            r#"{"backends":{"a":{"upstream":"grpc","cluster":"a"}}}"#.into(),
            r#"{"backends":{"a":{"upstream":"ollama","cluster":""}}}"#.into(),
            r#"{"backends":{"a":{"upstream":"ollama","cluster":"a","discovery":"api/tags"}}}"#.into(),
            format!(r#"{{{base},"models":[{{"match":"x","backend":"nope"}}]}}"#),
            format!(r#"{{{base},"models":[{{"match":"x*","backend":"a","upstream_model":"y"}}]}}"#),
            format!(r#"{{{base},"models":[{{"match":"a*b","backend":"a"}}]}}"#),
            format!(r#"{{{base},"aliases":{{"x":"unrouted"}}}}"#),
            format!(r#"{{{base},"models":[{{"match":"m","backend":"a"}}],"aliases":{{"x":"y","y":"m"}}}}"#),
            format!(r#"{{{base},"default_backend":"nope"}}"#),
            r#"{"backends":{"a":{"upstream":"ollama","cluster":"a","fallback":"o"},"o":{"upstream":"openai","cluster":"o"}}}"#.into(),
            r#"{"backends":{"a":{"upstream":"ollama","cluster":"a","fallback":"a"}}}"#.into(),
            format!(r#"{{{base},"interval_ms":10}}"#),
            format!(r#"{{{base},"extra":1}}"#),
        ] {
            assert!(routing(&bad).is_err(), "accepted: {bad}");
        }
        let ok = routing(&format!(r#"{{{base},"default_backend":"a"}}"#)).unwrap();
        assert_eq!(
            ok.discovery_targets().collect::<Vec<_>>(),
            [("a", "a", "/api/tags"), ("o", "o", "/v1/models")]
        );
    }
}
