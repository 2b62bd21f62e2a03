//! Owns deciding how a request is translated for the model server a route points at, and doing
//! it: OpenAI clients to Ollama or Anthropic upstreams, and passthrough (count only) for clients
//! that already speak the upstream's API. The response side of each translation lives beside
//! its request side (`ollama`, `anthropic`); the per-chunk driver is `crate::response_stream`.
//!
//! | client path              | OpenAI upstream     | Ollama upstream        | Anthropic upstream   |
//! |--------------------------|---------------------|------------------------|----------------------|
//! | `/v1/chat/completions`   | passthrough, count  | → `/api/chat`          | → `/v1/messages`     |
//! | `/v1/completions`        | passthrough, count  | → `/api/generate`      | unsupported (404)    |
//! | `/v1/embeddings`         | passthrough, count  | → `/api/embed`         | unsupported (404)    |
//! | `/v1/models`             | passthrough         | → `/api/tags`          | `/v1/models`, mapped |
//! | `/v1/messages`           | passthrough, count  | passthrough, count     | passthrough, count   |
//! | `/api/chat`, `/generate` | passthrough, count  | passthrough, count     | passthrough, count   |
//! | `/api/embed(dings)`      | passthrough, count  | passthrough, count     | passthrough, count   |
//! | anything else            | opaque              | opaque                 | opaque               |
//!
//! Ollama's native paths are counted on every single upstream (one Ollama serves both APIs,
//! and the default configuration declares `openai`); under routing, a backend that does not
//! declare `ollama` refuses them. "Opaque" is forwarded untouched and not counted: the filter
//! refuses it to a caller with a model allowlist or token limits.

pub mod anthropic;
mod base64;
pub mod ollama;
pub mod openai;
mod rfc3339;
pub mod upstream_error;
pub mod wire;

use tollgate_core::refusal::RefusalCode;

use crate::request_head::{BoundField, RequestHead, StreamOptions};

/// The API of the model server a route points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// OpenAI or anything speaking its API (vLLM, llama.cpp server, …).
    OpenAi,
    Ollama,
    Anthropic,
}

impl Upstream {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "openai" => Some(Upstream::OpenAi),
            "ollama" => Some(Upstream::Ollama),
            "anthropic" => Some(Upstream::Anthropic),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Upstream::OpenAi => "openai",
            Upstream::Ollama => "ollama",
            Upstream::Anthropic => "anthropic",
        }
    }
}

/// What the response side does; see [`crate::response_stream::ResponseTranscoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    /// Forwarded untouched, nothing counted.
    Opaque,
    /// OpenAI-shaped response to an OpenAI client: counted from `usage`; on streams the usage
    /// chunk the gateway asked for is removed unless the client asked too.
    OpenAiPassthrough,
    /// Ollama-shaped response to an Ollama client: counted from the final object.
    OllamaPassthrough,
    /// Anthropic-shaped response to an Anthropic client: counted from its usage events.
    AnthropicPassthrough,
    /// Ollama `/api/chat` to OpenAI `chat.completion` (or chunks).
    OllamaChat,
    /// Ollama `/api/generate` to OpenAI `text_completion` (or chunks).
    OllamaGenerate,
    /// Ollama `/api/embed` to an OpenAI embedding list.
    OllamaEmbed,
    /// Ollama `/api/tags` to an OpenAI model list.
    OllamaTags,
    /// Anthropic Messages to OpenAI `chat.completion` (or chunks).
    AnthropicMessages,
    /// Anthropic `/v1/models` to an OpenAI model list.
    AnthropicModels,
}

/// Everything the response side needs to know about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePlan {
    pub kind: ResponseKind,
    /// The model the request named (`None` for endpoints without one, such as model lists).
    pub model: Option<String>,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    /// The client asked for `encoding_format: "base64"` embeddings.
    pub embeddings_base64: bool,
}

impl ResponsePlan {
    pub fn new(kind: ResponseKind) -> Self {
        ResponsePlan {
            kind,
            model: None,
            stream: false,
            client_wants_usage: false,
            embeddings_base64: false,
        }
    }
}

/// Settings of request translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestOptions {
    /// Anthropic requires `max_tokens`; used when an OpenAI client gives none.
    pub anthropic_max_tokens: u64,
    /// Ask OpenAI-style upstreams for usage on streams the client did not ask it for.
    pub inject_stream_usage: bool,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            anthropic_max_tokens: 4096,
            inject_stream_usage: true,
        }
    }
}

/// The Messages API version the translation writes.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
const ANTHROPIC_HEADERS: &[(&str, &str)] = &[("anthropic-version", ANTHROPIC_VERSION)];

/// What to do with a request, known from its path alone: usable in the request-headers phase,
/// before the body arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPlan {
    /// The new `:path` (query kept), or `None` to keep it.
    pub path: Option<String>,
    /// Headers to set for the upstream.
    pub headers: &'static [(&'static str, &'static str)],
    /// The body must be read (buffered) and passed to [`RequestPlan::translate_body`].
    /// When `false`, call it with an empty body.
    pub reads_body: bool,
    route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Opaque,
    /// A model list: no body.
    Models(ResponseKind),
    OpenAiPassthrough {
        streams: bool,
    },
    OllamaPassthrough {
        stream_default: bool,
    },
    AnthropicPassthrough,
    ChatToOllama,
    CompletionToOllama,
    EmbeddingsToOllama,
    ChatToAnthropic,
}

/// A request ready for the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatedRequest {
    /// The new `:path`, or `None` to keep it.
    pub path: Option<String>,
    pub headers: &'static [(&'static str, &'static str)],
    /// The new body (set `content-length` to its length), or `None` to forward the body as is.
    pub body: Option<Vec<u8>>,
    pub response: ResponsePlan,
}

impl TranslatedRequest {
    pub fn model(&self) -> Option<&str> {
        self.response.model.as_deref()
    }

    pub fn stream(&self) -> bool {
        self.response.stream
    }

    pub fn client_wants_usage(&self) -> bool {
        self.response.client_wants_usage
    }
}

/// Why a request cannot be sent on; [`RequestError::code`] gives the reply's code and
/// status, `Display` its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON at all (syntax error, empty body).
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// JSON, but not a request of this API (wrong types, not an object, bad values).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No `model`, so the allowlist cannot be checked.
    #[error("the request names no model")]
    MissingModel,
    /// This endpoint has no equivalent on the route's upstream.
    #[error("{path} is not available for this model server ({})", upstream.as_str())]
    UnsupportedEndpoint { path: String, upstream: Upstream },
    /// A valid request using something the upstream cannot do.
    #[error("not supported by this model server: {0}")]
    UnsupportedParameter(String),
}

impl RequestError {
    pub fn status(&self) -> u16 {
        self.code().status()
    }

    pub fn code(&self) -> RefusalCode {
        match self {
            RequestError::MalformedJson(_) => RefusalCode::InvalidJson,
            RequestError::InvalidRequest(_) => RefusalCode::InvalidRequest,
            RequestError::MissingModel => RefusalCode::MissingModel,
            RequestError::UnsupportedEndpoint { .. } => RefusalCode::UnsupportedEndpoint,
            RequestError::UnsupportedParameter(_) => RefusalCode::UnsupportedParameter,
        }
    }
}

/// Plans a request from its `:path`. Matching is exact (one trailing slash ignored, as
/// `tollgate_core::operation` does), so a disguised path is opaque, never translated.
pub fn plan_request(upstream: Upstream, path: &str) -> Result<RequestPlan, RequestError> {
    let (bare, query) = path.split_at(path.find(['?', '#']).unwrap_or(path.len()));
    let bare = if bare.len() > 1 {
        bare.strip_suffix('/').unwrap_or(bare)
    } else {
        bare
    };
    let to = |new: &str| Some(format!("{new}{query}"));
    let plan = |path: Option<String>, route: Route| RequestPlan {
        path,
        // Only requests the gateway writes need it; a native client sends its own version.
        headers: match route {
            Route::ChatToAnthropic | Route::Models(ResponseKind::AnthropicModels) => {
                ANTHROPIC_HEADERS
            }
            _ => &[],
        },
        reads_body: !matches!(route, Route::Opaque | Route::Models(_)),
        route,
    };
    use Upstream::*;
    Ok(match (upstream, bare) {
        (_, "/v1/messages") => plan(None, Route::AnthropicPassthrough),
        (OpenAi, "/v1/chat/completions" | "/v1/completions") => {
            plan(None, Route::OpenAiPassthrough { streams: true })
        }
        (OpenAi, "/v1/embeddings") => plan(None, Route::OpenAiPassthrough { streams: false }),
        (OpenAi, "/v1/models") => plan(None, Route::Models(ResponseKind::Opaque)),
        (Ollama, "/v1/chat/completions") => plan(to("/api/chat"), Route::ChatToOllama),
        (Ollama, "/v1/completions") => plan(to("/api/generate"), Route::CompletionToOllama),
        (Ollama, "/v1/embeddings") => plan(to("/api/embed"), Route::EmbeddingsToOllama),
        (Ollama, "/v1/models") => plan(to("/api/tags"), Route::Models(ResponseKind::OllamaTags)),
        // Counted whatever API the route declares: one Ollama serves its native API and the
        // OpenAI one, and the default configuration (`openai`) is used in front of it.
        (_, "/api/chat" | "/api/generate") => plan(
            None,
            Route::OllamaPassthrough {
                stream_default: true,
            },
        ),
        (_, "/api/embed" | "/api/embeddings") => plan(
            None,
            Route::OllamaPassthrough {
                stream_default: false,
            },
        ),
        (Anthropic, "/v1/chat/completions") => plan(to("/v1/messages"), Route::ChatToAnthropic),
        (Anthropic, "/v1/models") => plan(None, Route::Models(ResponseKind::AnthropicModels)),
        (Anthropic, "/v1/completions" | "/v1/embeddings") => {
            return Err(RequestError::UnsupportedEndpoint {
                path: bare.to_owned(),
                upstream,
            })
        }
        _ => plan(None, Route::Opaque),
    })
}

/// Ollama's native model endpoints (query and one trailing slash ignored).
pub fn is_ollama_native(path: &str) -> bool {
    let bare = path.split(['?', '#']).next().unwrap_or("");
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    matches!(
        bare,
        "/api/chat" | "/api/generate" | "/api/embed" | "/api/embeddings"
    )
}

impl RequestPlan {
    /// Neither read nor translated: the filter cannot check what it does.
    pub fn is_opaque(&self) -> bool {
        self.route == Route::Opaque
    }

    /// Where this request's output bound goes when the gateway imposes one; `None` for
    /// requests that generate nothing (embeddings, listings) or whose translation always
    /// writes one (to Anthropic).
    pub fn output_bound_field(&self) -> Option<BoundField> {
        match self.route {
            Route::OpenAiPassthrough { streams: true }
            | Route::ChatToOllama
            | Route::CompletionToOllama
            | Route::AnthropicPassthrough => Some(BoundField::MaxTokens),
            Route::OllamaPassthrough {
                stream_default: true,
            } => Some(BoundField::NumPredict),
            _ => None,
        }
    }

    /// The completion budget the translation writes when the client names none: the
    /// upstream is told it, so it is what the request reserves.
    pub fn implied_completion(&self, options: &RequestOptions) -> Option<u64> {
        (self.route == Route::ChatToAnthropic).then_some(options.anthropic_max_tokens)
    }

    /// Translates the (whole) request body, reading its head first (see
    /// [`crate::request_head`]).
    pub fn translate_body(
        &self,
        body: &[u8],
        options: &RequestOptions,
    ) -> Result<TranslatedRequest, RequestError> {
        let head = if self.reads_body {
            RequestHead::parse(body)?
        } else {
            RequestHead::default()
        };
        self.translate_with_head(body, &head, options)
    }

    /// Translates a body whose head was already read: a passthrough reads nothing more; a
    /// translation parses the body once more, into the upstream's request.
    pub fn translate_with_head(
        &self,
        body: &[u8],
        head: &RequestHead,
        options: &RequestOptions,
    ) -> Result<TranslatedRequest, RequestError> {
        let done = |body: Option<Vec<u8>>, response: ResponsePlan| TranslatedRequest {
            path: self.path.clone(),
            headers: self.headers,
            body,
            response,
        };
        match self.route {
            Route::Opaque => Ok(done(None, ResponsePlan::new(ResponseKind::Opaque))),
            Route::Models(kind) => Ok(done(None, ResponsePlan::new(kind))),
            Route::OpenAiPassthrough { streams } => {
                let start = object_start(body)?;
                let model = head.model()?.to_owned();
                let stream = streams && head.stream.unwrap_or(false);
                let client_wants_usage = head.stream_options == StreamOptions::IncludeUsage;
                let new_body = if stream && options.inject_stream_usage {
                    openai::inject_include_usage(body, start, head.stream_options)?
                } else {
                    None
                };
                Ok(done(
                    new_body,
                    ResponsePlan {
                        kind: ResponseKind::OpenAiPassthrough,
                        model: Some(model),
                        stream,
                        // Without injection nothing is removed: the client sees what it asked.
                        client_wants_usage: client_wants_usage || !options.inject_stream_usage,
                        embeddings_base64: false,
                    },
                ))
            }
            Route::OllamaPassthrough { stream_default } => Ok(done(
                None,
                passthrough(head, ResponseKind::OllamaPassthrough, stream_default)?,
            )),
            Route::AnthropicPassthrough => Ok(done(
                None,
                passthrough(head, ResponseKind::AnthropicPassthrough, false)?,
            )),
            Route::ChatToOllama => {
                object_start(body)?;
                let (new, plan) = ollama::chat_request(body)?;
                Ok(done(Some(new), plan))
            }
            Route::CompletionToOllama => {
                object_start(body)?;
                let (new, plan) = ollama::generate_request(body)?;
                Ok(done(Some(new), plan))
            }
            Route::EmbeddingsToOllama => {
                object_start(body)?;
                let (new, plan) = ollama::embed_request(body)?;
                Ok(done(Some(new), plan))
            }
            Route::ChatToAnthropic => {
                object_start(body)?;
                let (new, plan) = anthropic::messages_request(body, options)?;
                Ok(done(Some(new), plan))
            }
        }
    }
}

/// Plans and translates in one step, for callers that have the body already.
pub fn translate_request(
    upstream: Upstream,
    path: &str,
    body: &[u8],
    options: &RequestOptions,
) -> Result<TranslatedRequest, RequestError> {
    plan_request(upstream, path)?.translate_body(body, options)
}

fn passthrough(
    head: &RequestHead,
    kind: ResponseKind,
    stream_default: bool,
) -> Result<ResponsePlan, RequestError> {
    Ok(ResponsePlan {
        kind,
        model: Some(head.model()?.to_owned()),
        stream: head.stream.unwrap_or(stream_default),
        client_wants_usage: false,
        embeddings_base64: false,
    })
}

/// The offset of the body's opening `{`. serde would also read a struct from a JSON array, and
/// the upstream must never see a different shape than the one checked here.
pub(crate) fn object_start(body: &[u8]) -> Result<usize, RequestError> {
    match body.iter().position(|b| !b.is_ascii_whitespace()) {
        None => Err(RequestError::MalformedJson("the body is empty".to_owned())),
        Some(i) if body.get(i) == Some(&b'{') => Ok(i),
        Some(_) => Err(RequestError::InvalidRequest(
            "the body must be a JSON object".to_owned(),
        )),
    }
}

pub(crate) fn body_error(e: serde_json::Error) -> RequestError {
    match e.classify() {
        serde_json::error::Category::Data => RequestError::InvalidRequest(e.to_string()),
        _ => RequestError::MalformedJson(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn translate(upstream: Upstream, path: &str, body: &str) -> TranslatedRequest {
        translate_request(upstream, path, body.as_bytes(), &RequestOptions::default()).unwrap()
    }

    fn error(upstream: Upstream, path: &str, body: &str) -> RequestError {
        translate_request(upstream, path, body.as_bytes(), &RequestOptions::default()).unwrap_err()
    }

    #[test]
    fn openai_paths_are_rewritten_for_ollama_with_the_query_kept() {
        let plan = plan_request(Upstream::Ollama, "/v1/chat/completions?x=1").unwrap();
        assert_eq!(plan.path.as_deref(), Some("/api/chat?x=1"));
        assert!(plan.reads_body);
        let plan = plan_request(Upstream::Ollama, "/v1/completions/").unwrap();
        assert_eq!(plan.path.as_deref(), Some("/api/generate"));
        let plan = plan_request(Upstream::Ollama, "/v1/embeddings").unwrap();
        assert_eq!(plan.path.as_deref(), Some("/api/embed"));
        let plan = plan_request(Upstream::Ollama, "/v1/models").unwrap();
        assert_eq!(plan.path.as_deref(), Some("/api/tags"));
        assert!(!plan.reads_body);
    }

    #[test]
    fn anthropic_routes_set_the_version_header() {
        let plan = plan_request(Upstream::Anthropic, "/v1/chat/completions").unwrap();
        assert_eq!(plan.path.as_deref(), Some("/v1/messages"));
        assert_eq!(plan.headers, [("anthropic-version", "2023-06-01")]);
        let plan = plan_request(Upstream::Anthropic, "/v1/models").unwrap();
        assert_eq!(plan.path, None);
        assert_eq!(plan.headers, [("anthropic-version", "2023-06-01")]);
        let plan = plan_request(Upstream::Anthropic, "/v1/messages").unwrap();
        assert!(plan.headers.is_empty(), "a native client's version is kept");
    }

    #[test]
    fn endpoints_without_an_anthropic_equivalent_are_404() {
        let err = plan_request(Upstream::Anthropic, "/v1/embeddings").unwrap_err();
        assert_eq!(err.status(), 404);
        assert_eq!(err.code(), RefusalCode::UnsupportedEndpoint);
    }

    #[test]
    fn disguised_and_unknown_paths_are_opaque() {
        for path in [
            "/V1/chat/completions",
            "/v1/chat/completionsx",
            "/api/show",
            "/",
        ] {
            let t = translate(Upstream::Ollama, path, "");
            assert_eq!(t.response.kind, ResponseKind::Opaque, "{path}");
            assert_eq!(t.path, None);
            assert_eq!(t.body, None);
        }
    }

    #[test]
    fn openai_passthrough_stream_gets_usage_injected_and_remembers_the_client_did_not_ask() {
        let t = translate(
            Upstream::OpenAi,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        );
        assert_eq!(t.model(), Some("gpt-4o-mini"));
        assert!(t.stream());
        assert!(!t.client_wants_usage());
        let body: serde_json::Value = serde_json::from_slice(t.body.as_ref().unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(t.path, None);
    }

    #[test]
    fn openai_passthrough_that_asked_for_usage_is_forwarded_unchanged() {
        let t = translate(
            Upstream::OpenAi,
            "/v1/chat/completions",
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        assert_eq!(t.body, None);
        assert!(t.client_wants_usage());
    }

    #[test]
    fn openai_passthrough_without_stream_is_forwarded_unchanged() {
        let t = translate(Upstream::OpenAi, "/v1/chat/completions", r#"{"model":"m"}"#);
        assert_eq!(t.body, None);
        assert!(!t.stream());
        let t = translate(
            Upstream::OpenAi,
            "/v1/embeddings",
            r#"{"model":"m","input":"x","stream":true}"#,
        );
        assert_eq!(t.body, None);
        assert!(!t.stream());
    }

    #[test]
    fn injection_can_be_turned_off() {
        let options = RequestOptions {
            inject_stream_usage: false,
            ..RequestOptions::default()
        };
        let t = translate_request(
            Upstream::OpenAi,
            "/v1/completions",
            br#"{"model":"m","stream":true}"#,
            &options,
        )
        .unwrap();
        assert_eq!(t.body, None);
        assert!(t.client_wants_usage(), "nothing to remove from the stream");
    }

    #[test]
    fn ollama_native_streams_by_default_except_embeddings() {
        let t = translate(Upstream::Ollama, "/api/chat", r#"{"model":"llama3.2"}"#);
        assert_eq!(t.response.kind, ResponseKind::OllamaPassthrough);
        assert!(t.stream());
        let t = translate(
            Upstream::Ollama,
            "/api/generate",
            r#"{"model":"llama3.2","stream":false}"#,
        );
        assert!(!t.stream());
        let t = translate(Upstream::Ollama, "/api/embed", r#"{"model":"all-minilm"}"#);
        assert!(!t.stream());
        assert_eq!(t.body, None);
    }

    #[test]
    fn anthropic_native_is_counted_on_any_upstream() {
        let t = translate(
            Upstream::Ollama,
            "/v1/messages",
            r#"{"model":"qwen3","stream":true,"max_tokens":5,"messages":[]}"#,
        );
        assert_eq!(t.response.kind, ResponseKind::AnthropicPassthrough);
        assert!(t.stream());
    }

    #[test]
    fn missing_or_empty_model_is_400_missing_model() {
        for (upstream, path) in [
            (Upstream::OpenAi, "/v1/chat/completions"),
            (Upstream::Ollama, "/api/chat"),
            (Upstream::Ollama, "/v1/chat/completions"),
            (Upstream::Anthropic, "/v1/chat/completions"),
            (Upstream::Anthropic, "/v1/messages"),
        ] {
            for body in [
                r#"{"messages":[]}"#,
                r#"{"model":"","messages":[]}"#,
                r#"{"model":null}"#,
            ] {
                let err = error(upstream, path, body);
                assert_eq!(err, RequestError::MissingModel, "{path} {body}");
                assert_eq!(err.status(), 400);
            }
        }
    }

    #[test]
    fn malformed_json_is_400_invalid_json() {
        for body in ["", "  ", "{", r#"{"model":"m",}"#, "\u{FEFF}{}"] {
            let err = error(Upstream::Ollama, "/v1/chat/completions", body);
            assert!(
                matches!(
                    err,
                    RequestError::MalformedJson(_) | RequestError::InvalidRequest(_)
                ),
                "{body:?}: {err:?}"
            );
            assert_eq!(err.status(), 400);
        }
        assert_eq!(
            error(Upstream::OpenAi, "/v1/chat/completions", "{")
                .code()
                .as_str(),
            "invalid_json"
        );
    }

    #[test]
    fn non_object_and_wrongly_typed_bodies_are_400_invalid_request() {
        for body in [
            r#"["m", true]"#,
            r#""x""#,
            r#"{"model":5}"#,
            r#"{"model":"m","stream":"yes"}"#,
        ] {
            let err = error(Upstream::OpenAi, "/v1/chat/completions", body);
            assert!(
                matches!(err, RequestError::InvalidRequest(_)),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn duplicate_model_field_is_refused() {
        // The allowlist and the upstream must not read different models.
        let err = error(
            Upstream::OpenAi,
            "/v1/chat/completions",
            r#"{"model":"allowed","model":"other"}"#,
        );
        assert!(matches!(err, RequestError::InvalidRequest(_)), "{err:?}");
    }
}
