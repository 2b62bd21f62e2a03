//! Owns the bodies the filter answers with itself: Tollgate's JSON error (with Envoy's request
//! id) and the model listings it answers from discovery.

use tollgate_core::metadata;
use tollgate_core::refusal::RefusalCode;

use crate::endpoint;
use crate::host::Host;

pub const BLOCKED_MESSAGE: &str = "this endpoint is disabled on this gateway";

/// Envoy's `x-request-id` of this request; empty when Envoy has none.
pub fn request_id(host: &impl Host) -> String {
    host.property(&["request", "id"])
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .unwrap_or_default()
}

/// Sends Tollgate's JSON error, echoing Envoy's request id in the body and `x-request-id`.
pub fn send_error(host: &mut impl Host, request_id: &str, code: RefusalCode, message: &str) {
    let body = code.render(message, request_id);
    // The error code header is what the audit log records as the reason.
    let mut headers = vec![
        ("content-type", "application/json"),
        (metadata::HEADER_ERROR, code.as_str()),
    ];
    if !request_id.is_empty() {
        headers.push(("x-request-id", request_id));
    }
    host.send_local_reply(code.status(), &headers, &body);
}

/// Sends a JSON body with 200.
pub fn send_json(host: &mut impl Host, body: &str) {
    host.send_local_reply(200, &[("content-type", "application/json")], body);
}

/// One model in OpenAI's shape (`GET /v1/models/{id}`).
pub fn model_body(id: &str, now: u64) -> String {
    serde_json::json!({"id": id, "object": "model", "created": now, "owned_by": "tollgate"})
        .to_string()
}

/// A model listing in the shape the client asked for: Ollama's `/api/tags` or OpenAI's list.
pub fn listing_body(path: &str, names: &[String], now: u64) -> String {
    let v = if endpoint::bare(path) == "/api/tags" {
        let models: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "model": n}))
            .collect();
        serde_json::json!({ "models": models })
    } else {
        let data: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"id": n, "object": "model", "created": now, "owned_by": "tollgate"}))
            .collect();
        serde_json::json!({"object": "list", "data": data})
    };
    v.to_string()
}
