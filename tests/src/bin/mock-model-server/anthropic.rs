//! Anthropic's Messages API (`POST /v1/messages`), plain JSON and the named-event SSE stream.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::reply::{chunk_texts, full_text, next_id};
use crate::request::{MockRequest, ModelRequest, RequestError};
use crate::responses::{self, Body, SSE};
use crate::stream_body::{sse, StreamPlan};

pub fn messages(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let stream = request.stream(false);
    respond(&request, stream)
}

/// A Messages reply for an already-read request: the event stream or one JSON object.
pub fn respond(request: &ModelRequest, stream: bool) -> Response<Body> {
    if stream {
        return responses::streaming(SSE, stream_plan(request));
    }
    responses::json(
        StatusCode::OK,
        &json!({
            "id": next_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [{"type": "text", "text": full_text(request.chunks)}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {
                "input_tokens": request.prompt_tokens,
                "output_tokens": request.completion_tokens(),
            },
        }),
    )
}

/// The event sequence Anthropic sends: `message_start` (usage so far: input tokens and one
/// output token), `content_block_start`, `ping`, one `content_block_delta` per word,
/// `content_block_stop`, `message_delta` (stop reason and final output tokens),
/// `message_stop`. Each event's `data.type` repeats its `event:` name.
fn stream_plan(request: &ModelRequest) -> StreamPlan {
    let event = |data: Value| {
        let name = data["type"].as_str().unwrap_or_default().to_owned();
        sse(Some(&name), &data)
    };
    let preamble = vec![
        event(json!({"type": "message_start", "message": {
            "id": next_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": request.prompt_tokens, "output_tokens": 1},
        }})),
        event(json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})),
        event(json!({"type": "ping"})),
    ];
    let content = chunk_texts(request.chunks)
        .iter()
        .map(|text| {
            event(json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}))
        })
        .collect();
    let epilogue = vec![
        event(json!({"type": "content_block_stop", "index": 0})),
        event(json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": request.completion_tokens()}})),
        event(json!({"type": "message_stop"})),
    ];
    StreamPlan {
        preamble,
        content,
        epilogue,
        delay: request.chunk_delay,
    }
}

/// Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`.
fn error(e: &RequestError) -> Response<Body> {
    let (status, kind, message) = match e {
        RequestError::MalformedJson(detail) => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("Invalid JSON in request body: {detail}"),
        ),
        RequestError::MissingField(field) => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{field}: Field required"),
        ),
        RequestError::UnknownModel(model) => (
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("model: {model}"),
        ),
        RequestError::BadMockHeader(detail) => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            detail.clone(),
        ),
    };
    responses::json(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use std::time::Duration;

    #[test]
    fn stream_is_the_anthropic_event_sequence_with_counts() {
        let request = ModelRequest {
            body: Map::new(),
            model: "claude-3-5-haiku-latest".to_owned(),
            chunks: 2,
            chunk_delay: Duration::ZERO,
            prompt_tokens: 9,
        };
        let plan = stream_plan(&request);
        let mut names = Vec::new();
        let mut events = Vec::new();
        for frame in plan.frames() {
            let text = std::str::from_utf8(frame).expect("utf-8");
            let body = text
                .strip_suffix("\n\n")
                .expect("blank line after each event");
            let (name_line, data_line) = body.split_once('\n').expect("event and data lines");
            let name = name_line.strip_prefix("event: ").expect("event line");
            let data: Value =
                serde_json::from_str(data_line.strip_prefix("data: ").expect("data line"))
                    .expect("data is JSON");
            assert_eq!(data["type"], name);
            names.push(name.to_owned());
            events.push(data);
        }
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0]["message"]["usage"]["input_tokens"], 9);
        assert_eq!(events[0]["message"]["usage"]["output_tokens"], 1);
        assert_eq!(events[4]["delta"]["text"], " from");
        assert_eq!(events[6]["usage"]["output_tokens"], 2);
        assert_eq!(events[6]["delta"]["stop_reason"], "end_turn");
    }
}
