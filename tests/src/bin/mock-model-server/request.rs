//! What the mock reads from a request: the size-capped body, the JSON payload, the model, the
//! `x-mock-*` knobs, and the prompt token count.
//!
//! Token counting (tests assert these numbers):
//! - prompt tokens = number of whitespace-separated words in every `messages[].content` (a
//!   string, or the `text` of each content part / block), the top-level `system` (Anthropic,
//!   Ollama generate; counted so an OpenAI system message moved there by translation keeps
//!   the same count), `prompt` (string or list of strings) and `input` (string or list of
//!   strings; a pre-tokenised integer array counts one per integer); at least 1.
//! - completion tokens = number of content chunks emitted = `x-mock-chunks` (default 5), one
//!   word per chunk, for streamed and non-streamed replies alike.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::catalog::Catalog;

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Content chunks per reply when `x-mock-chunks` is absent.
pub const DEFAULT_CHUNKS: usize = 5;
/// Bounds on the test knobs, so a typo cannot pin the server for hours.
const MAX_CHUNKS: usize = 10_000;
const MAX_CHUNK_DELAY_MS: u64 = 60_000;

pub const CHUNKS_HEADER: &str = "x-mock-chunks";
pub const CHUNK_DELAY_HEADER: &str = "x-mock-chunk-delay-ms";

/// A request with its body fully read.
#[derive(Debug)]
pub struct MockRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Read(String),
}

pub async fn read_body(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

/// Why a model request was refused; each provider module renders it in its own error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Body is not JSON, or not a JSON object.
    MalformedJson(String),
    MissingField(&'static str),
    UnknownModel(String),
    /// An `x-mock-*` header that does not parse or is out of range.
    BadMockHeader(String),
}

/// A parsed generation or embedding request.
#[derive(Debug)]
pub struct ModelRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub chunks: usize,
    pub chunk_delay: Duration,
    pub prompt_tokens: u64,
}

impl ModelRequest {
    pub fn parse(req: &MockRequest, catalog: &Catalog) -> Result<Self, RequestError> {
        let body = json_object(&req.body)?;
        let chunks = header_number(&req.headers, CHUNKS_HEADER, MAX_CHUNKS as u64)?
            .map_or(DEFAULT_CHUNKS, |n| n as usize);
        let delay_ms =
            header_number(&req.headers, CHUNK_DELAY_HEADER, MAX_CHUNK_DELAY_MS)?.unwrap_or(0);
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            _ => return Err(RequestError::MissingField("model")),
        };
        if !catalog.contains(&model) {
            return Err(RequestError::UnknownModel(model));
        }
        let prompt_tokens = prompt_tokens(&body);
        Ok(Self {
            body,
            model,
            chunks,
            chunk_delay: Duration::from_millis(delay_ms),
            prompt_tokens,
        })
    }

    /// The request's `stream` flag, or `default` when absent (Ollama streams by default,
    /// OpenAI and Anthropic do not).
    pub fn stream(&self, default: bool) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }

    /// Completion tokens: one per content chunk.
    pub fn completion_tokens(&self) -> u64 {
        self.chunks as u64
    }
}

/// The `x-mock-chunks` (`None` when absent) and `x-mock-chunk-delay-ms` knobs.
pub fn mock_knobs(headers: &HeaderMap) -> Result<(Option<usize>, Duration), RequestError> {
    let chunks = header_number(headers, CHUNKS_HEADER, MAX_CHUNKS as u64)?.map(|n| n as usize);
    let delay_ms = header_number(headers, CHUNK_DELAY_HEADER, MAX_CHUNK_DELAY_MS)?.unwrap_or(0);
    Ok((chunks, Duration::from_millis(delay_ms)))
}

pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(RequestError::MalformedJson(
            "request body must be a JSON object".to_owned(),
        )),
        Err(e) => Err(RequestError::MalformedJson(e.to_string())),
    }
}

fn header_number(headers: &HeaderMap, name: &str, max: u64) -> Result<Option<u64>, RequestError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let bad = || RequestError::BadMockHeader(format!("{name} must be an integer in 0..={max}"));
    let n: u64 = value
        .to_str()
        .map_err(|_| bad())?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if n > max {
        return Err(bad());
    }
    Ok(Some(n))
}

/// Prompt tokens by the rule in the module docs.
pub fn prompt_tokens(body: &Map<String, Value>) -> u64 {
    let in_messages: u64 = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| {
            messages
                .iter()
                .filter_map(|m| m.get("content"))
                .map(words_in)
                .sum()
        });
    let elsewhere: u64 = ["system", "prompt", "input"]
        .iter()
        .filter_map(|field| body.get(*field))
        .map(words_in)
        .sum();
    (in_messages + elsewhere).max(1)
}

fn words_in(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(words_in).sum(),
        // Pre-tokenised input (OpenAI accepts token id arrays): one token per id.
        Value::Number(_) => 1,
        // A content part / block: only its text counts (images and tool ids do not).
        Value::Object(part) => part.get("text").map_or(0, words_in),
        Value::Null | Value::Bool(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokens(v: Value) -> u64 {
        match v {
            Value::Object(map) => prompt_tokens(&map),
            _ => panic!("test body must be an object"),
        }
    }

    #[test]
    fn prompt_tokens_count_words_across_all_messages() {
        let body = json!({"model": "m", "messages": [
            {"role": "system", "content": "be  brief"},
            {"role": "user", "content": "what is\tthe answer"},
            {"role": "user", "content": [
                {"type": "text", "text": "two words"},
                {"type": "image_url", "image_url": {"url": "data:..."}}
            ]}
        ]});
        assert_eq!(tokens(body), 2 + 4 + 2);
    }

    #[test]
    fn anthropic_system_blocks_are_counted() {
        let body = json!({"system": [{"type": "text", "text": "you are terse"}],
            "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(tokens(body), 4);
    }

    #[test]
    fn prompt_and_input_lists_count_every_entry() {
        assert_eq!(tokens(json!({"prompt": ["a b", "c"]})), 3);
        assert_eq!(tokens(json!({"input": "one two three"})), 3);
        assert_eq!(tokens(json!({"input": [[1, 2, 3], [4]]})), 4);
    }

    #[test]
    fn prompt_tokens_are_at_least_one() {
        assert_eq!(
            tokens(json!({"messages": [{"role": "user", "content": "   "}]})),
            1
        );
        assert_eq!(tokens(json!({})), 1);
    }

    #[test]
    fn mock_headers_out_of_range_are_rejected() {
        let mut headers = HeaderMap::new();
        headers.insert(CHUNKS_HEADER, http::HeaderValue::from_static("10001"));
        assert!(header_number(&headers, CHUNKS_HEADER, MAX_CHUNKS as u64).is_err());
        headers.insert(CHUNKS_HEADER, http::HeaderValue::from_static(" 7 "));
        assert_eq!(
            header_number(&headers, CHUNKS_HEADER, MAX_CHUNKS as u64),
            Ok(Some(7))
        );
    }
}
