//! What the three server kinds (`--api ollama|openai|anthropic`) share: the path as their
//! routers see it, how much a request makes them generate, and the reply they give a
//! request they could not read.

use std::time::Duration;

use http::{Response, StatusCode};
use serde_json::{Map, Value};

use crate::decode::{self, J};
use crate::record::Interpreted;
use crate::request::{self, MockRequest, ModelRequest};
use crate::responses::Body;

/// The most output tokens the mock really generates per choice, whatever it was asked to
/// honour (the budget it was asked for is recorded as is).
pub const MAX_GENERATED: u64 = 64;

/// A handler's reply and what it made of the request.
pub type Handled = (Response<Body>, Interpreted);

/// The path as Go's `URL.Path` and Starlette's `scope["path"]` hold it: the query cut
/// off and every `%XX` escape decoded (`/api/%63hat` is `/api/chat` to them).
pub fn decoded_path(req: &MockRequest) -> String {
    let raw = req.uri.path().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `x-mock-error: <status>`: the server fails the request with that status (4xx or 5xx)
/// in its own error shape, as a real one does when overloaded or crashing.
pub const ERROR_HEADER: &str = "x-mock-error";

pub fn forced_error(req: &MockRequest) -> Option<StatusCode> {
    let value = req.headers.get(ERROR_HEADER)?.to_str().ok()?;
    let status = StatusCode::from_bytes(value.trim().as_bytes()).ok()?;
    (status.is_client_error() || status.is_server_error()).then_some(status)
}

/// Output tokens generated per choice: the budget (unbounded when `None`), the
/// `x-mock-chunks` knob, and `MAX_GENERATED`, whichever is least.
pub fn generated_per_choice(budget: Option<u64>, knob: Option<usize>) -> u64 {
    let knob = knob.map_or(MAX_GENERATED, |k| k as u64);
    budget.unwrap_or(u64::MAX).min(knob).min(MAX_GENERATED)
}

/// Saturating i128 → u64 for the record (negative values never reach here: they are
/// refused or mean "unbounded").
pub fn saturate(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

/// The prompt token count of the fields a server read (`messages`, `prompt`, `system`,
/// `input`), by the rule of `request::prompt_tokens`.
pub fn prompt_tokens(fields: &[(&str, Option<&J>)]) -> u64 {
    let mut map = Map::new();
    for (name, value) in fields {
        if let Some(v) = value {
            map.insert((*name).to_owned(), v.to_value());
        }
    }
    request::prompt_tokens(&map)
}

/// A `ModelRequest` for the shared reply builders: `chunks` is the per-choice generation.
pub fn model_request(
    model: &str,
    chunks: u64,
    delay: Duration,
    prompt_tokens: u64,
    body: Map<String, Value>,
) -> ModelRequest {
    ModelRequest {
        body,
        model: model.to_owned(),
        chunks: usize::try_from(chunks).unwrap_or(usize::MAX),
        chunk_delay: delay,
        prompt_tokens,
    }
}

/// The body as an object, or the parser's complaint.
pub fn object(body: &[u8]) -> Result<Vec<(String, J)>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("missing request body".to_owned());
    }
    match decode::parse(body)? {
        J::Obj(entries) => Ok(entries),
        other => Err(format!(
            "json: cannot unmarshal {} into Go value of type object",
            other.kind()
        )),
    }
}

/// Records a refusal on `it` and returns it with `response`.
pub fn refused(
    mut it: Interpreted,
    status: StatusCode,
    message: &str,
    response: Response<Body>,
) -> Handled {
    it.status = status.as_u16();
    it.error = Some(message.to_owned());
    it.tokens_in = 0;
    it.tokens_out = 0;
    (response, it)
}

/// A kind's route table: (method, path pattern, operation).
pub type Routes = [(&'static str, &'static str, &'static str)];

/// The operation a route table names for `method` and `path`.
pub fn operation_in(routes: &Routes, method: &http::Method, path: &str) -> Option<&'static str> {
    routes
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && route_matches(p, path))
        .map(|(_, _, op)| *op)
}

/// Whether `path` matches a route pattern: segment by segment, `*` standing for any one
/// non-empty segment.
pub fn route_matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// A request for handler tests.
#[cfg(test)]
pub fn test_request(method: &str, path: &str, body: &str) -> MockRequest {
    MockRequest {
        method: method.parse().unwrap_or(http::Method::GET),
        uri: path.parse().unwrap_or_default(),
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::from(body.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_bounded_by_budget_knob_and_cap() {
        assert_eq!(generated_per_choice(None, None), MAX_GENERATED);
        assert_eq!(generated_per_choice(Some(10), None), 10);
        assert_eq!(generated_per_choice(Some(10), Some(3)), 3);
        assert_eq!(
            generated_per_choice(Some(u64::MAX), Some(1_000)),
            MAX_GENERATED
        );
    }

    #[test]
    fn route_wildcard_takes_one_segment() {
        assert!(route_matches("/v1/models/*", "/v1/models/llama3.1:8b"));
        assert!(!route_matches("/v1/models/*", "/v1/models/"));
        assert!(!route_matches("/v1/models/*", "/v1/models/a/b"));
        assert!(route_matches("/api/tags", "/api/tags"));
        assert!(route_matches(
            "/v1/files/*/content",
            "/v1/files/file-1/content"
        ));
        assert!(!route_matches("/v1/files/*/content", "/v1/files/file-1"));
    }
}
