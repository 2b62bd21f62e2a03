//! Which models a caller may use: the key's allowlist (from tollgate-authz's metadata)
//! intersected with what the upstream serves. Also filters model listings down to that set.

use crate::discovery::ModelSet;
use serde_json::Value;
use tollgate_core::model_pattern::{self, ModelPattern};
use tollgate_core::refusal::{Refusal, RefusalCode};

pub const MODEL_NOT_ALLOWED: Refusal = Refusal::new(
    RefusalCode::ModelNotAllowed,
    "this API key may not use this model",
);
pub const MODEL_NOT_FOUND: Refusal =
    Refusal::new(RefusalCode::ModelNotFound, "this model is not served here");
pub const DISCOVERY_UNAVAILABLE: Refusal = Refusal::new(
    RefusalCode::ModelsUnavailable,
    "the gateway does not yet know which models are served; retry shortly",
);
pub const NO_POLICY: Refusal = Refusal::new(
    RefusalCode::ModelNotAllowed,
    "no model allowlist was provided for this request",
);

/// The allowlist from metadata (`"llama3*,local/*"`, `"*"`). Missing or unreadable
/// metadata allows nothing: the filter never guesses wider than authz said.
pub fn allowlist(metadata: Option<&str>) -> Vec<ModelPattern> {
    metadata
        .and_then(|m| model_pattern::parse_list(m).ok())
        .unwrap_or_default()
}

/// `discovered` is `None` when discovery is configured but no poll has succeeded yet, and
/// `Some` of every model when discovery is off.
pub fn check(
    model: &str,
    allow: &[ModelPattern],
    discovered: Option<&ModelSet>,
    discovery_on: bool,
) -> Result<(), Refusal> {
    if allow.is_empty() {
        return Err(NO_POLICY);
    }
    if !model_pattern::any_matches(allow, model) {
        return Err(MODEL_NOT_ALLOWED);
    }
    if !discovery_on {
        return Ok(());
    }
    match discovered {
        None => Err(DISCOVERY_UNAVAILABLE),
        Some(set) if set.contains(model) => Ok(()),
        Some(_) => Err(MODEL_NOT_FOUND),
    }
}

/// Rewrites a model listing (`/api/tags` or `/v1/models` shape) to the entries the caller
/// may use. A body that is neither shape is returned as an empty listing of the OpenAI
/// shape rather than passed through unfiltered.
pub fn filter_listing(body: &[u8], allow: &[ModelPattern]) -> Vec<u8> {
    let keep = |name: Option<&str>| name.is_some_and(|n| model_pattern::any_matches(allow, n));
    let mut v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return br#"{"object":"list","data":[]}"#.to_vec(),
    };
    if let Some(models) = v.get_mut("models").and_then(Value::as_array_mut) {
        models.retain(|m| keep(m.get("name").and_then(Value::as_str)));
    } else if let Some(data) = v.get_mut("data").and_then(Value::as_array_mut) {
        data.retain(|m| keep(m.get("id").and_then(Value::as_str)));
    } else {
        return br#"{"object":"list","data":[]}"#.to_vec();
    }
    serde_json::to_vec(&v).unwrap_or_else(|_| br#"{"object":"list","data":[]}"#.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn served() -> ModelSet {
        ModelSet::from_names(["llama3.1:8b", "qwen2:0.5b", "gpt-4o-mini"])
    }

    #[test]
    fn allowlist_then_discovered_set_decide() {
        let allow = allowlist(Some("llama3*,qwen2:0.5b,mistral"));
        assert_eq!(check("llama3.1:8b", &allow, Some(&served()), true), Ok(()));
        assert_eq!(
            check("gpt-4o-mini", &allow, Some(&served()), true),
            Err(MODEL_NOT_ALLOWED)
        );
        assert_eq!(
            check("mistral", &allow, Some(&served()), true),
            Err(MODEL_NOT_FOUND)
        );
        assert_eq!(
            check("llama3.1:8b", &allow, None, true),
            Err(DISCOVERY_UNAVAILABLE)
        );
        assert_eq!(check("mistral", &allow, None, false), Ok(()));
    }

    #[test]
    fn missing_or_broken_metadata_allows_nothing() {
        assert_eq!(
            check("x", &allowlist(None), Some(&served()), true),
            Err(NO_POLICY)
        );
        assert_eq!(
            check("x", &allowlist(Some("a*b")), Some(&served()), true),
            Err(NO_POLICY)
        );
        assert_eq!(
            check("gpt-4o-mini", &allowlist(Some("*")), Some(&served()), true),
            Ok(())
        );
    }

    #[test]
    fn listings_are_filtered_to_the_allowlist() {
        let allow = allowlist(Some("llama3*"));
        let tags = br#"{"models":[{"name":"llama3.1:8b"},{"name":"qwen2:0.5b"}]}"#;
        let out: Value = serde_json::from_slice(&filter_listing(tags, &allow)).unwrap();
        assert_eq!(out["models"].as_array().unwrap().len(), 1);
        assert_eq!(out["models"][0]["name"], "llama3.1:8b");
        let list = br#"{"object":"list","data":[{"id":"llama3"},{"id":"gpt-4o-mini"}]}"#;
        let out: Value = serde_json::from_slice(&filter_listing(list, &allow)).unwrap();
        assert_eq!(out["data"].as_array().unwrap().len(), 1);
        let out: Value = serde_json::from_slice(&filter_listing(b"<html>", &allow)).unwrap();
        assert_eq!(out["data"].as_array().unwrap().len(), 0);
    }
}
