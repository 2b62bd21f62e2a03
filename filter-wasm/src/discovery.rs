//! The model set the upstream actually serves, learned by polling its list endpoint
//! (`/api/tags` for Ollama, `/v1/models` for OpenAI-style servers). Until one poll has
//! succeeded the set is unknown and model requests fail closed.

use serde::Deserialize;
use std::collections::BTreeSet;
use tollgate_core::model_pattern::canonical;

/// What a list endpoint returned, as names the client may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSet {
    names: BTreeSet<String>,
    /// The same names as a server resolves them (`model_pattern::canonical`).
    canonical: BTreeSet<String>,
}

#[derive(Deserialize)]
struct OllamaTags {
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    name: String,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiList {
    data: Vec<OpenAiModel>,
}

#[derive(Deserialize)]
struct OpenAiModel {
    id: String,
}

/// A poll's body that is neither list shape (the poll failed).
#[derive(Debug, thiserror::Error)]
#[error("model list is neither /api/tags nor /v1/models: {0}")]
pub struct UnknownListing(serde_json::Error);

impl ModelSet {
    /// Parses either list shape; anything else is an error (the poll failed).
    pub fn parse(body: &[u8]) -> Result<Self, UnknownListing> {
        if let Ok(tags) = serde_json::from_slice::<OllamaTags>(body) {
            let mut names = BTreeSet::new();
            for m in tags.models {
                names.insert(m.name);
                if let Some(model) = m.model {
                    names.insert(model);
                }
            }
            return Ok(Self::from_names(names));
        }
        match serde_json::from_slice::<OpenAiList>(body) {
            Ok(list) => Ok(Self::from_names(list.data.into_iter().map(|m| m.id))),
            Err(e) => Err(UnknownListing(e)),
        }
    }

    pub fn from_names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        let names: BTreeSet<String> = names.into_iter().map(Into::into).collect();
        let canonical = names.iter().map(|n| canonical(n).into_owned()).collect();
        Self { names, canonical }
    }

    /// Whether the upstream serves `model` as it resolves names: Ollama treats a name
    /// without a tag as `:latest` (`llama3` is a served `llama3:latest`), ignores case and
    /// fills in its default registry and namespace.
    pub fn contains(&self, model: &str) -> bool {
        self.names.contains(model) || self.canonical.contains(canonical(model).as_ref())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// What discovery has learned so far, per source: a backend name under routing, or
/// [`Served::SINGLE`] for the one model server of a configuration without routing. A source
/// that never answered is absent, which callers treat as "unknown" (fail closed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    sets: std::collections::BTreeMap<String, ModelSet>,
}

impl Served {
    pub const SINGLE: &'static str = "";

    pub fn get(&self, source: &str) -> Option<&ModelSet> {
        self.sets.get(source)
    }

    /// The set of a configuration without routing.
    pub fn single(&self) -> Option<&ModelSet> {
        self.get(Self::SINGLE)
    }

    pub fn insert(&mut self, source: &str, set: ModelSet) {
        self.sets.insert(source.to_owned(), set);
    }

    pub fn knows(&self, source: &str) -> bool {
        self.sets.contains_key(source)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ollama_tags_and_openai_models_both_parse() {
        let tags = br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b","size":1},{"name":"qwen2:latest","model":"qwen2:latest"}]}"#;
        let s = ModelSet::parse(tags).unwrap();
        assert!(s.contains("llama3.1:8b"));
        assert!(s.contains("qwen2"), "an untagged name means :latest");
        assert!(!s.contains("llama3.1"));
        let list = br#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model"}]}"#;
        let s = ModelSet::parse(list).unwrap();
        assert!(s.contains("gpt-4o-mini"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn other_bodies_are_errors() {
        assert!(ModelSet::parse(b"not json").is_err());
        assert!(ModelSet::parse(br#"{"error":"boom"}"#).is_err());
    }
}
