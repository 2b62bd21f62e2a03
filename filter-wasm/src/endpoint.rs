//! Owns what a request path is to the filter: a listing, a model's details, a model call, or
//! a path it does not read, and which methods each takes.

use crate::path_guard;

/// The path without query, fragment and trailing slashes.
pub fn bare(path: &str) -> &str {
    path.split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
}

/// A model listing the filter filters to the caller's models.
pub fn is_listing(path: &str) -> bool {
    matches!(bare(path), "/v1/models" | "/api/tags")
}

/// Ollama's list of loaded models: the same shape as `/api/tags`, filtered the same way.
pub fn is_running_listing(path: &str) -> bool {
    bare(path) == "/api/ps"
}

/// Ollama's model details (Modelfile, system prompt, template): its body names the model.
pub fn is_model_details(path: &str) -> bool {
    bare(path) == "/api/show"
}

/// The model a `GET /v1/models/{id}` asks about, percent-decoded once as servers route on
/// it; `Some(None)` when it does not decode or holds a dot segment.
pub fn retrieved_model(path: &str) -> Option<Option<String>> {
    let id = bare(path).strip_prefix("/v1/models/")?;
    let decoded = path_guard::percent_decode_once(id.as_bytes()).ok();
    // A dot segment would let a server that resolves it reach another model than the one
    // checked (`qwen2%2F..%2Fllama3`); no model id needs one.
    Some(
        decoded
            .and_then(|d| String::from_utf8(d).ok())
            .filter(|id| !id.split('/').any(|seg| seg == "." || seg == "..")),
    )
}

/// Methods the endpoints the filter reads take; `None` for paths it does not read, where
/// the caller's policy decides. A hosted provider acts on other methods of the same paths
/// (`DELETE /v1/models/{id}` deletes a fine-tune, `GET /v1/chat/completions` lists stored
/// completions) with the gateway's credential, so they are refused.
pub fn methods(path: &str, reads_body: bool) -> Option<&'static [&'static str]> {
    const POST: &[&str] = &["POST"];
    const READ: &[&str] = &["GET", "HEAD"];
    if reads_body || is_model_details(path) {
        Some(POST)
    } else if is_listing(path)
        || is_running_listing(path)
        || bare(path) == "/api/version"
        || retrieved_model(path).is_some()
    {
        Some(READ)
    } else {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn retrieved_model_is_decoded_once_and_refuses_dot_segments() {
        assert_eq!(
            retrieved_model("/v1/models/llama3.1%3A8b?x=1"),
            Some(Some("llama3.1:8b".into()))
        );
        assert_eq!(
            retrieved_model("/v1/models/a%252Fb"),
            Some(Some("a%2Fb".into()))
        );
        assert_eq!(
            retrieved_model("/v1/models/qwen2%2F..%2Fllama3"),
            Some(None)
        );
        assert_eq!(retrieved_model("/v1/models/%zz"), Some(None));
        assert_eq!(retrieved_model("/v1/models"), None);
    }

    #[test]
    fn methods_follow_what_the_endpoint_does() {
        assert_eq!(methods("/v1/chat/completions", true), Some(&["POST"][..]));
        assert_eq!(methods("/api/show", false), Some(&["POST"][..]));
        for path in [
            "/v1/models/",
            "/api/tags",
            "/api/ps",
            "/api/version",
            "/v1/models/m",
        ] {
            assert_eq!(methods(path, false), Some(&["GET", "HEAD"][..]), "{path}");
        }
        assert_eq!(methods("/v1/files", false), None);
    }
}
