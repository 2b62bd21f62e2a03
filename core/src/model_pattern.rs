//! Model allowlist patterns: an exact name (`llama3.1:8b`), a trailing-star prefix
//! (`llama3*`, `local/*`), or `*` for every model.
//!
//! Names are compared the way the most forgiving model server resolves them (see
//! [`canonical`]): Ollama runs `LLAMA3.1:8B`, `registry.ollama.ai/library/llama3.1:8b` and
//! `llama3.1:8b` as one model, so an allowlist, a price or a served set that told them apart
//! would check one model and let the server run another.

use std::borrow::Cow;

/// Ollama's default registry and namespace, which it fills in for a bare name.
const DEFAULT_REGISTRY: &str = "registry.ollama.ai/";
const DEFAULT_NAMESPACE: &str = "library/";

/// The name a model server resolves `model` to, as far as telling models apart goes: ASCII
/// case folded, Ollama's default registry and namespace dropped, and its default tag added to
/// a name without one (`llama3` is `llama3:latest`). Borrowed when nothing changes.
pub fn canonical(model: &str) -> Cow<'_, str> {
    let name = fold(model);
    let last = name.rsplit('/').next().unwrap_or(&name);
    if last.contains(':') {
        name
    } else {
        Cow::Owned(format!("{name}:latest"))
    }
}

/// Case folded and default registry/namespace dropped (no tag added): for prefixes.
fn fold(model: &str) -> Cow<'_, str> {
    let mut name: Cow<'_, str> = if model.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(model.to_ascii_lowercase())
    } else {
        Cow::Borrowed(model)
    };
    for default in [DEFAULT_REGISTRY, DEFAULT_NAMESPACE] {
        // Only a prefix that leaves a name behind: `library/` alone names nothing.
        if name.len() > default.len() && name.starts_with(default) {
            name = match name {
                Cow::Borrowed(b) => Cow::Borrowed(&b[default.len()..]),
                Cow::Owned(o) => Cow::Owned(o[default.len()..].to_owned()),
            };
        }
    }
    name
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPattern {
    Any,
    Exact(String),
    Prefix(String),
}

/// Why a model pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty model pattern")]
    Empty,
    #[error("model pattern {0:?}: '*' only at the end")]
    InnerStar(String),
}

impl ModelPattern {
    /// Parses one pattern. A star anywhere but at the end is refused, so a pattern never
    /// means more than it looks like.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(ModelPattern::Any);
        }
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(ModelPattern::Prefix(prefix.to_string())),
            Some(_) => Err(PatternError::InnerStar(s.to_string())),
            None if s.contains('*') => Err(PatternError::InnerStar(s.to_string())),
            None => Ok(ModelPattern::Exact(s.to_string())),
        }
    }

    /// Whether `model`, as a server resolves it ([`canonical`]), is one this pattern names.
    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Any => true,
            ModelPattern::Exact(m) => m == model || canonical(m) == canonical(model),
            ModelPattern::Prefix(p) => {
                model.starts_with(p.as_str()) || canonical(model).starts_with(fold(p).as_ref())
            }
        }
    }

    /// Whether the pattern names `model` exactly as written: for servers that match names
    /// exactly (OpenAI-style), where another spelling is another (absent) model.
    pub fn matches_as_written(&self, model: &str) -> bool {
        match self {
            ModelPattern::Any => true,
            ModelPattern::Exact(m) => m == model,
            ModelPattern::Prefix(p) => model.starts_with(p.as_str()),
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            ModelPattern::Any => "*".into(),
            ModelPattern::Exact(m) => m.clone(),
            ModelPattern::Prefix(p) => format!("{p}*"),
        }
    }
}

/// A comma-separated list as carried in metadata (`"llama3*,local/*"`).
pub fn parse_list(s: &str) -> Result<Vec<ModelPattern>, PatternError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(ModelPattern::parse)
        .collect()
}

pub fn join(patterns: &[ModelPattern]) -> String {
    patterns
        .iter()
        .map(ModelPattern::as_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub fn any_matches(patterns: &[ModelPattern], model: &str) -> bool {
    patterns.iter().any(|p| p.matches(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_server_resolves_alike_match_alike() {
        let l = parse_list("llama3*,qwen2:0.5b,mistral").unwrap();
        for alike in [
            "LLAMA3.1:8B",
            "registry.ollama.ai/library/llama3.1:8b",
            "library/Llama3.1:8b",
            "Qwen2:0.5B",
            "registry.ollama.ai/library/qwen2:0.5b",
            "mistral:latest",
            "MISTRAL",
        ] {
            assert!(any_matches(&l, alike), "{alike}");
        }
        for other in [
            "qwen2:7b",
            "hf.co/x/llama3",
            "mistral:7b",
            "registry.ollama.ai/me/llama3",
        ] {
            assert!(!any_matches(&l, other), "{other}");
        }
        assert_eq!(canonical("llama3.1:8b"), Cow::Borrowed("llama3.1:8b"));
        assert_eq!(canonical("Llama3"), "llama3:latest");
        assert_eq!(canonical("library/"), "library/:latest");
        assert!(!ModelPattern::parse("library/*").unwrap().matches("llama3"));
        let exact = ModelPattern::parse("gpt-4o-mini").unwrap();
        assert!(exact.matches("GPT-4O-MINI"));
        assert!(!exact.matches_as_written("GPT-4O-MINI"));
    }

    #[test]
    fn exact_prefix_and_any_match() {
        let l = parse_list("llama3*, local/*,qwen2:0.5b").unwrap();
        assert!(any_matches(&l, "llama3.1:8b"));
        assert!(any_matches(&l, "local/anything"));
        assert!(any_matches(&l, "qwen2:0.5b"));
        assert!(!any_matches(&l, "qwen2:7b"));
        assert!(!any_matches(&l, "llama2"));
        assert!(any_matches(&[ModelPattern::Any], "x"));
        assert!(!any_matches(&[], "x"));
    }

    #[test]
    fn stars_inside_are_refused_and_lists_round_trip() {
        assert!(ModelPattern::parse("ll*ma").is_err());
        assert!(ModelPattern::parse("**").is_err());
        assert!(ModelPattern::parse(" ").is_err());
        let l = parse_list("llama3*,local/*,x").unwrap();
        assert_eq!(join(&l), "llama3*,local/*,x");
    }
}
