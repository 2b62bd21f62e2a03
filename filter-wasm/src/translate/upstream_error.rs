//! Owns turning a model server's error (a non-2xx body, or an error inside a stream) into
//! Tollgate's one error shape, which is OpenAI's, for clients whose request was translated.
//!
//! The status is the upstream's. Messages of 4xx errors are kept (they say what was wrong with
//! the request), but those of 402 and 429 (the provider account's billing and limits) and 5xx
//! messages are replaced, since they carry the operator's or the upstream's internals. The code
//! is the upstream's error type when it gives a plain one (`overloaded_error`), else derived
//! from the status.

use serde::Deserialize;
use tollgate_core::error_body;

use super::openai::OutputContext;
use super::wire::Text;
use crate::stream::StreamError;

/// The members an error body is read from (`{"error": "…"}` from Ollama,
/// `{"type":"error","error":{"type","message"}}` from Anthropic, OpenAI's `{"error":{…}}`).
pub const ERROR_FIELDS: &[&str] = &["error"];

const UPSTREAM_FAILED: &str = "the model server failed to handle the request";

#[derive(Debug, Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    error: Option<ErrorField<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ErrorField<'a> {
    Message(#[serde(borrow)] Text<'a>),
    Detail {
        #[serde(rename = "type", borrow)]
        kind: Option<Text<'a>>,
        /// OpenAI's specific code (`model_not_found`) beside its broad type
        /// (`invalid_request_error`); preferred when plain.
        #[serde(borrow)]
        code: Option<Text<'a>>,
        #[serde(borrow)]
        message: Option<Text<'a>>,
    },
}

/// The HTTP status Anthropic documents for each error type, for errors that arrive inside a
/// stream (after the 200 was sent).
pub fn anthropic_status(kind: Option<&str>) -> u16 {
    match kind {
        Some("invalid_request_error") => 400,
        Some("authentication_error") => 401,
        Some("permission_error") => 403,
        Some("not_found_error") => 404,
        Some("request_too_large") => 413,
        Some("rate_limit_error") => 429,
        Some("overloaded_error") => 529,
        _ => 500,
    }
}

/// The error body for a non-2xx upstream response. `reduced` is the body reduced to
/// [`ERROR_FIELDS`], or `None` when it was not a JSON object (an HTML page from a proxy, …).
pub fn render(status: u16, reduced: Option<&[u8]>, request_id: &str) -> String {
    let envelope = reduced.and_then(|r| serde_json::from_slice::<Envelope<'_>>(r).ok());
    let (kind, message) = match envelope.as_ref().and_then(|e| e.error.as_ref()) {
        Some(ErrorField::Message(message)) => (None, Some(message.as_str())),
        Some(ErrorField::Detail {
            kind,
            code,
            message,
        }) => (
            code.as_ref()
                .map(Text::as_str)
                .filter(|c| is_plain_code(c))
                .or(kind.as_ref().map(Text::as_str)),
            message.as_ref().map(Text::as_str),
        ),
        None => (None, None),
    };
    rendered(status, kind, message.unwrap_or(""), request_id)
}

/// An error inside a translated stream, as the OpenAI SDKs read one: a `data:` event whose
/// JSON has an `error` member. Nothing follows it, not even `[DONE]`.
pub fn write_stream_error(
    out: &mut Vec<u8>,
    status: u16,
    kind: Option<&str>,
    message: &str,
    ctx: &OutputContext,
) -> Result<(), StreamError> {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(rendered(status, kind, message, &ctx.request_id).as_bytes());
    out.extend_from_slice(b"\n\n");
    Ok(())
}

fn rendered(status: u16, kind: Option<&str>, message: &str, request_id: &str) -> String {
    // 402 and 429 are about the gateway's provider account (its organisation id, limits and
    // billing in the message), never about the client's request.
    let message = if status >= 500 || matches!(status, 402 | 429) || message.is_empty() {
        default_message(status)
    } else {
        message
    };
    let code = kind.filter(|k| is_plain_code(k)).unwrap_or(match status {
        400 | 422 => "invalid_request",
        401 | 403 => "upstream_auth_failed",
        404 => "model_not_found",
        413 => "request_too_large",
        429 => "upstream_rate_limited",
        _ => "upstream_error",
    });
    error_body::render(status, code, message, request_id)
}

fn default_message(status: u16) -> &'static str {
    match status {
        404 => "the model server does not know this model or endpoint",
        429 => "the model server is rate limiting requests",
        s if s >= 500 => UPSTREAM_FAILED,
        _ => "the model server refused the request",
    }
}

/// Only short snake_case codes are passed through from the upstream.
fn is_plain_code(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 48
        && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn body(status: u16, upstream: &str) -> Value {
        serde_json::from_str(&render(status, Some(upstream.as_bytes()), "rid-1")).unwrap()
    }

    #[test]
    fn ollama_error_string_keeps_its_message_on_4xx() {
        let v = body(
            404,
            r#"{"error":"model \"x\" not found, try pulling it first"}"#,
        );
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(
            v["error"]["message"],
            "model \"x\" not found, try pulling it first"
        );
        assert_eq!(v["error"]["request_id"], "rid-1");
    }

    #[test]
    fn openai_specific_code_wins_over_its_broad_type() {
        let v = body(
            404,
            r#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        );
        assert_eq!(v["error"]["code"], "model_not_found");
        let v = body(
            400,
            r#"{"error":{"type":"invalid_request_error","code":null}}"#,
        );
        assert_eq!(v["error"]["code"], "invalid_request_error");
    }

    #[test]
    fn anthropic_error_type_becomes_the_code() {
        let v = body(
            400,
            r#"{"error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#,
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "max_tokens: Field required");
    }

    #[test]
    fn server_errors_are_sanitised() {
        let v = body(
            500,
            r#"{"error":"llama runner process has terminated: /usr/lib/x.so"}"#,
        );
        assert_eq!(v["error"]["message"], UPSTREAM_FAILED);
        assert_eq!(v["error"]["code"], "upstream_error");
        let v = body(
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(v["error"]["code"], "overloaded_error");
        assert_eq!(v["error"]["message"], UPSTREAM_FAILED);
    }

    #[test]
    fn unreadable_bodies_and_odd_codes_get_defaults() {
        let v: Value = serde_json::from_str(&render(502, None, "")).unwrap();
        assert_eq!(v["error"]["code"], "upstream_error");
        let v = body(400, r#"{"error":{"type":"Bad <script>","message":"m"}}"#);
        assert_eq!(v["error"]["code"], "invalid_request");
        let v = body(403, r#"{"error":5}"#);
        assert_eq!(
            v["error"]["message"],
            "the model server refused the request"
        );
    }

    #[test]
    fn provider_account_errors_do_not_reach_the_client() {
        // About the gateway's provider account (organisation id, its limits, its billing),
        // not about the client's request.
        let v = body(
            429,
            r#"{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-Ab12 on tokens per min (TPM): Limit 200000","type":"tokens","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(
            v["error"]["message"],
            "the model server is rate limiting requests"
        );
        let v = body(
            402,
            r#"{"type":"error","error":{"type":"billing_error","message":"Your credit balance is too low for org org-Ab12"}}"#,
        );
        assert!(!v.to_string().contains("org-Ab12"), "{v}");
        let mut out = Vec::new();
        let ctx = OutputContext {
            id: "chatcmpl-rid-1".into(),
            created: 0,
            model: "m".into(),
            request_id: "rid-1".into(),
            include_usage: false,
            embeddings_base64: false,
        };
        write_stream_error(
            &mut out,
            429,
            Some("rate_limit_error"),
            "org-Ab12 over its limit",
            &ctx,
        )
        .unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("org-Ab12"));
    }
}
