//! OpenAI's API (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`),
//! including SSE streams with the optional trailing usage chunk.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::embedding;
use crate::reply::{chunk_texts, full_text, next_id, unix_seconds};
use crate::request::{MockRequest, ModelRequest, RequestError};
use crate::responses::{self, Body, SSE};
use crate::stream_body::{sse, sse_done, StreamPlan};

/// `created` of every listed model; a fixed past date keeps `/v1/models` stable.
const MODEL_CREATED: u64 = 1_700_000_000;

pub fn chat_completions(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    if request.stream(false) {
        return responses::streaming(SSE, chat_stream_plan(&request));
    }
    responses::json(
        StatusCode::OK,
        &json!({
            "id": next_id("chatcmpl-"),
            "object": "chat.completion",
            "created": unix_seconds(),
            "model": request.model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": full_text(request.chunks),
                    "refusal": null,
                },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage(&request),
        }),
    )
}

pub fn completions(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    if request.stream(false) {
        return responses::streaming(SSE, completion_stream_plan(&request));
    }
    responses::json(
        StatusCode::OK,
        &json!({
            "id": next_id("cmpl-"),
            "object": "text_completion",
            "created": unix_seconds(),
            "model": request.model,
            "choices": [{
                "text": full_text(request.chunks),
                "index": 0,
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage(&request),
        }),
    )
}

/// Fields shared by every chunk of one stream.
struct ChunkHeader {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    /// With `stream_options.include_usage`, OpenAI adds `"usage": null` to every chunk and
    /// sends the numbers in one extra chunk with no choices.
    include_usage: bool,
}

impl ChunkHeader {
    fn new(request: &ModelRequest, id_prefix: &str, object: &'static str) -> Self {
        Self {
            id: next_id(id_prefix),
            object,
            created: unix_seconds(),
            model: request.model.clone(),
            include_usage: request
                .body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The closing frames: the usage chunk (only if asked for) and `[DONE]`.
    fn trailer(&self, request: &ModelRequest) -> Vec<bytes::Bytes> {
        let mut frames = Vec::with_capacity(2);
        if self.include_usage {
            let mut chunk = self.chunk(json!([]));
            chunk["usage"] = usage(request);
            frames.push(sse(None, &chunk));
        }
        frames.push(sse_done());
        frames
    }
}

fn chat_stream_plan(request: &ModelRequest) -> StreamPlan {
    let header = ChunkHeader::new(request, "chatcmpl-", "chat.completion.chunk");
    let choice = |delta: Value, finish_reason: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);
    let role = header.chunk(choice(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    let content = chunk_texts(request.chunks)
        .iter()
        .map(|text| {
            let chunk = header.chunk(choice(json!({ "content": text }), Value::Null));
            sse(None, &chunk)
        })
        .collect();
    let finish = header.chunk(choice(json!({}), json!("stop")));
    let mut epilogue = vec![sse(None, &finish)];
    epilogue.extend(header.trailer(request));
    StreamPlan {
        preamble: vec![sse(None, &role)],
        content,
        epilogue,
        delay: request.chunk_delay,
    }
}

fn completion_stream_plan(request: &ModelRequest) -> StreamPlan {
    let header = ChunkHeader::new(request, "cmpl-", "text_completion");
    let choice = |text: &str, finish_reason: Value| json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}]);
    let content = chunk_texts(request.chunks)
        .iter()
        .map(|text| sse(None, &header.chunk(choice(text, Value::Null))))
        .collect();
    let finish = header.chunk(choice("", json!("stop")));
    let mut epilogue = vec![sse(None, &finish)];
    epilogue.extend(header.trailer(request));
    StreamPlan {
        content,
        epilogue,
        delay: request.chunk_delay,
        ..StreamPlan::default()
    }
}

fn usage(request: &ModelRequest) -> Value {
    let completion = request.completion_tokens();
    json!({
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": request.prompt_tokens + completion,
    })
}

/// `POST /v1/embeddings`: one vector per input item, as floats or, with
/// `encoding_format: "base64"`, as base64 little-endian f32 (the Python SDK's default).
pub fn embeddings(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let Some(items) = request.body.get("input").and_then(embedding_inputs) else {
        return error(&RequestError::MissingField("input"));
    };
    let dimensions = match request.body.get("dimensions") {
        None | Some(Value::Null) => embedding::DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= embedding::MAX_DIMENSIONS as u64 => n as usize,
            _ => {
                return error(&RequestError::MalformedJson(format!(
                    "dimensions must be an integer in 1..={}",
                    embedding::MAX_DIMENSIONS
                )))
            }
        },
    };
    let base64 = request.body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embedding::vector(text, dimensions);
            let encoded = if base64 {
                json!(embedding::base64_f32_le(&vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": encoded})
        })
        .collect();
    responses::json(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {
                "prompt_tokens": request.prompt_tokens,
                "total_tokens": request.prompt_tokens,
            },
        }),
    )
}

/// The items to embed: a string, a list of strings, one token array, or a list of token
/// arrays (a token array is embedded by its JSON text). `None` when empty or ill-typed.
fn embedding_inputs(input: &Value) -> Option<Vec<String>> {
    let items = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![input.to_string()]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(s.clone()),
                Value::Array(tokens) if tokens.iter().all(Value::is_number) => {
                    Some(item.to_string())
                }
                _ => None,
            })
            .collect::<Option<Vec<String>>>()?,
        _ => return None,
    };
    (!items.is_empty()).then_some(items)
}

pub fn models(catalog: &Catalog) -> Response<Body> {
    let data: Vec<Value> = catalog
        .names()
        .iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}),
        )
        .collect();
    responses::json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
fn error(e: &RequestError) -> Response<Body> {
    let (status, message, param, code) = match e {
        RequestError::MalformedJson(detail) => (
            StatusCode::BAD_REQUEST,
            format!("We could not parse the JSON body of your request. ({detail})"),
            Value::Null,
            Value::Null,
        ),
        RequestError::MissingField(field) => (
            StatusCode::BAD_REQUEST,
            format!("you must provide a {field} parameter"),
            Value::Null,
            Value::Null,
        ),
        RequestError::UnknownModel(model) => (
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist or you do not have access to it."),
            Value::Null,
            json!("model_not_found"),
        ),
        RequestError::BadMockHeader(detail) => (
            StatusCode::BAD_REQUEST,
            detail.clone(),
            Value::Null,
            Value::Null,
        ),
    };
    responses::json(
        status,
        &json!({"error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(chunks: usize, body: Value) -> ModelRequest {
        let Value::Object(body) = body else {
            panic!("test body must be an object");
        };
        ModelRequest {
            prompt_tokens: crate::request::prompt_tokens(&body),
            body,
            model: "gpt-4o-mini".to_owned(),
            chunks,
            chunk_delay: Duration::ZERO,
        }
    }

    /// Reads a whole SSE body the way a client does: line by line, every `data:` payload
    /// must be JSON except the final `[DONE]`, and events are separated by blank lines.
    fn parse_sse(plan: &StreamPlan) -> Vec<Value> {
        let wire: Vec<u8> = plan.frames().flat_map(|f| f.iter().copied()).collect();
        let wire = String::from_utf8(wire).expect("utf-8");
        assert!(
            wire.ends_with("data: [DONE]\n\n"),
            "stream must end with [DONE]"
        );
        let mut events = Vec::new();
        let mut saw_done = false;
        for event in wire.split_terminator("\n\n") {
            assert!(!saw_done, "nothing may follow [DONE]");
            let data = event
                .strip_prefix("data: ")
                .expect("every event is a data line");
            assert!(!data.contains('\n'), "one line per event");
            if data == "[DONE]" {
                saw_done = true;
            } else {
                events.push(serde_json::from_str(data).expect("data is JSON"));
            }
        }
        assert!(saw_done);
        events
    }

    #[test]
    fn streamed_chat_parses_line_by_line_and_ends_with_done() {
        let events = parse_sse(&chat_stream_plan(&request(
            4,
            json!({"messages": [{"role": "user", "content": "hi there"}]}),
        )));
        // role chunk + 4 content chunks + finish chunk
        assert_eq!(events.len(), 6);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = events[1..5]
            .iter()
            .map(|e| {
                assert_eq!(e["object"], "chat.completion.chunk");
                e["choices"][0]["delta"]["content"]
                    .as_str()
                    .expect("delta")
                    .to_owned()
            })
            .collect();
        assert_eq!(text, full_text(4));
        assert_eq!(events[5]["choices"][0]["finish_reason"], "stop");
        assert!(events.iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn usage_chunk_appears_only_with_include_usage() {
        let body = json!({
            "messages": [{"role": "user", "content": "count these four words"}],
            "stream_options": {"include_usage": true},
        });
        let events = parse_sse(&chat_stream_plan(&request(3, body)));
        let last = events.last().expect("events");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
        );
        let others = &events[..events.len() - 1];
        assert!(others.iter().all(|e| e["usage"].is_null()));

        let without = json!({"messages": [], "stream_options": {"include_usage": false}});
        let events = parse_sse(&chat_stream_plan(&request(3, without)));
        assert!(events.iter().all(|e| e.get("usage").is_none()));
        assert!(events.iter().all(|e| e["choices"] != json!([])));
    }

    #[test]
    fn streamed_completion_carries_text_and_usage_when_asked() {
        let body = json!({"prompt": "say something", "stream_options": {"include_usage": true}});
        let events = parse_sse(&completion_stream_plan(&request(2, body)));
        assert_eq!(events.len(), 4);
        assert_eq!(events[0]["object"], "text_completion");
        assert_eq!(events[0]["choices"][0]["text"], "Hello");
        assert_eq!(events[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[3]["usage"]["completion_tokens"], 2);
        assert_eq!(events[3]["usage"]["prompt_tokens"], 2);
    }

    #[test]
    fn embedding_inputs_accept_strings_and_token_arrays() {
        assert_eq!(embedding_inputs(&json!("a")), Some(vec!["a".to_owned()]));
        assert_eq!(
            embedding_inputs(&json!(["a", "b"])).map(|v| v.len()),
            Some(2)
        );
        assert_eq!(
            embedding_inputs(&json!([1, 2])),
            Some(vec!["[1,2]".to_owned()])
        );
        assert_eq!(
            embedding_inputs(&json!([[1], [2, 3]])).map(|v| v.len()),
            Some(2)
        );
        assert_eq!(embedding_inputs(&json!([])), None);
        assert_eq!(embedding_inputs(&json!([{"x": 1}])), None);
    }
}
