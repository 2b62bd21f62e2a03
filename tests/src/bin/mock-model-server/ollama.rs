//! Ollama's native API (`/api/*`): chat and generate (NDJSON streamed by default), embed,
//! tags, version, show, and the model-management endpoints the gateway must never forward.

use http::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::catalog::Catalog;
use crate::embedding;
use crate::reply::{chunk_texts, full_text, rfc3339_now};
use crate::request::{json_object, MockRequest, ModelRequest, RequestError};
use crate::responses::{self, Body, NDJSON};
use crate::stream_body::{ndjson, StreamPlan};

/// Reported by `GET /api/version`; a recent release, so clients that gate features on the
/// version enable everything.
const VERSION: &str = "0.5.7";

/// Fixed `modified_at` for listed models, so `/api/tags` is byte-for-byte stable.
const MODIFIED_AT: &str = "2024-07-23T10:00:00.000000000Z";

/// Fake durations in nanoseconds: one millisecond per token and one for loading, so the
/// numbers are plausible and deterministic.
const NANOS_PER_TOKEN: u64 = 1_000_000;
const LOAD_DURATION: u64 = 1_000_000;

pub fn chat(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    generation(req, catalog, chat_payload)
}

pub fn generate(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    generation(req, catalog, generate_payload)
}

/// Chat and generate differ only in where the text goes (`message.content` vs `response`);
/// `payload` builds that part for a piece of text.
fn generation(req: &MockRequest, catalog: &Catalog, payload: fn(&str) -> Value) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let stream = request.stream(true);
    respond(&request, stream, payload)
}

/// The `message` payload of `/api/chat`.
pub fn chat_payload(text: &str) -> Value {
    json!({"message": {"role": "assistant", "content": text}})
}

/// The `response` payload of `/api/generate`.
pub fn generate_payload(text: &str) -> Value {
    json!({ "response": text })
}

/// A chat or generate reply for an already-read request: NDJSON lines when streamed, else
/// one object.
pub fn respond(request: &ModelRequest, stream: bool, payload: fn(&str) -> Value) -> Response<Body> {
    if stream {
        responses::streaming(NDJSON, stream_plan(request, payload))
    } else {
        // Non-streamed replies carry the whole text in the single, final object.
        let done = final_line(request, payload(&full_text(request.chunks)));
        responses::json(StatusCode::OK, &done)
    }
}

fn stream_plan(request: &ModelRequest, payload: fn(&str) -> Value) -> StreamPlan {
    let content = chunk_texts(request.chunks)
        .iter()
        .map(|text| {
            let mut line = head(&request.model);
            merge(&mut line, payload(text));
            line.insert("done".to_owned(), Value::Bool(false));
            ndjson(&Value::Object(line))
        })
        .collect();
    // The closing line repeats the payload with empty text, as Ollama does.
    let done = final_line(request, payload(""));
    StreamPlan {
        content,
        epilogue: vec![ndjson(&Value::Object(done))],
        delay: request.chunk_delay,
        ..StreamPlan::default()
    }
}

/// `model` and `created_at`, the first fields of every Ollama generation object.
fn head(model: &str) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("model".to_owned(), json!(model));
    line.insert("created_at".to_owned(), json!(rfc3339_now()));
    line
}

/// The `done: true` object with the timing and token statistics.
fn final_line(request: &ModelRequest, payload: Value) -> Map<String, Value> {
    let prompt_eval_duration = request.prompt_tokens * NANOS_PER_TOKEN;
    let eval_duration = request.completion_tokens() * NANOS_PER_TOKEN;
    let mut line = head(&request.model);
    merge(&mut line, payload);
    merge(
        &mut line,
        json!({
            "done": true,
            "done_reason": "stop",
            "total_duration": LOAD_DURATION + prompt_eval_duration + eval_duration,
            "load_duration": LOAD_DURATION,
            "prompt_eval_count": request.prompt_tokens,
            "prompt_eval_duration": prompt_eval_duration,
            "eval_count": request.completion_tokens(),
            "eval_duration": eval_duration,
        }),
    );
    line
}

fn merge(into: &mut Map<String, Value>, from: Value) {
    if let Value::Object(fields) = from {
        into.extend(fields);
    }
}

/// `POST /api/embed`: one vector per input string; no input at all is allowed (Ollama uses
/// that to preload a model) and yields no vectors.
pub fn embed(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let request = match ModelRequest::parse(req, catalog) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let inputs: Vec<&str> = match request.body.get("input") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => match items.iter().map(Value::as_str).collect() {
            Some(strings) => strings,
            None => return error(&bad_request("input must be a string or a list of strings")),
        },
        Some(_) => return error(&bad_request("input must be a string or a list of strings")),
    };
    let embeddings: Vec<Vec<f32>> = inputs
        .iter()
        .map(|text| embedding::vector(text, embedding::DEFAULT_DIMENSIONS))
        .collect();
    let prompt_eval_duration = request.prompt_tokens * NANOS_PER_TOKEN;
    responses::json(
        StatusCode::OK,
        &json!({
            "model": request.model,
            "embeddings": embeddings,
            "total_duration": LOAD_DURATION + prompt_eval_duration,
            "load_duration": LOAD_DURATION,
            "prompt_eval_count": request.prompt_tokens,
        }),
    )
}

pub fn tags(catalog: &Catalog) -> Response<Body> {
    let models: Vec<Value> = catalog
        .names()
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "model": name,
                "modified_at": MODIFIED_AT,
                "size": fake_size(name),
                "digest": fake_digest(name),
                "details": details(name),
            })
        })
        .collect();
    responses::json(StatusCode::OK, &json!({ "models": models }))
}

pub fn version() -> Response<Body> {
    responses::json(StatusCode::OK, &json!({ "version": VERSION }))
}

/// `POST /api/show`: the model is named by `model` (or `name`, the older field).
pub fn show(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let body = match json_object(&req.body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let Some(model) = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
    else {
        return error(&RequestError::MissingField("model"));
    };
    if !catalog.contains(model) {
        return error(&RequestError::UnknownModel(model.to_owned()));
    }
    let details = details(model);
    responses::json(
        StatusCode::OK,
        &json!({
            "modelfile": format!("# Modelfile generated by the Tollgate mock\nFROM {model}\n"),
            "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": details,
            "model_info": {
                "general.architecture": details["family"],
                "general.parameter_count": 8_030_261_248u64,
            },
            "capabilities": ["completion"],
            "modified_at": MODIFIED_AT,
        }),
    )
}

/// pull / push / create / copy / delete / blobs: answered (and recorded by the router) so a
/// test can prove the gateway never forwarded them.
pub fn management_success() -> Response<Body> {
    responses::json(StatusCode::OK, &json!({"status": "success"}))
}

/// `details` as `/api/tags` and `/api/show` report it; family is the name without tag and
/// version digits (`llama3.1:8b` → `llama`), size is the tag (`8b` → `8B`).
pub fn details(name: &str) -> Value {
    let (base, tag) = name.split_once(':').unwrap_or((name, "latest"));
    let family = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let family = if family.is_empty() { base } else { family };
    let parameter_size = if tag.ends_with(['b', 'B']) {
        tag.to_ascii_uppercase()
    } else {
        "unknown".to_owned()
    };
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size,
        "quantization_level": "Q4_K_M",
    })
}

/// A 64-hex-digit pseudo sha256, stable per name.
pub fn fake_digest(name: &str) -> String {
    (0..4)
        .map(|seed| format!("{:016x}", embedding::fnv1a(name.as_bytes(), seed)))
        .collect()
}

/// A plausible size in bytes (1–2 GB), stable per name.
pub fn fake_size(name: &str) -> u64 {
    1_000_000_000 + embedding::fnv1a(name.as_bytes(), 99) % 1_000_000_000
}

fn bad_request(message: &str) -> RequestError {
    RequestError::MalformedJson(message.to_owned())
}

/// Ollama's error shape: `{"error": "..."}` with the matching status.
fn error(e: &RequestError) -> Response<Body> {
    let (status, message) = match e {
        RequestError::MalformedJson(detail) => (StatusCode::BAD_REQUEST, detail.clone()),
        RequestError::MissingField(field) => {
            (StatusCode::BAD_REQUEST, format!("{field} is required"))
        }
        RequestError::UnknownModel(model) => (
            StatusCode::NOT_FOUND,
            format!("model \"{model}\" not found, try pulling it first"),
        ),
        RequestError::BadMockHeader(detail) => (StatusCode::BAD_REQUEST, detail.clone()),
    };
    responses::json(status, &json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(chunks: usize, prompt_tokens: u64) -> ModelRequest {
        ModelRequest {
            body: Map::new(),
            model: "llama3.1:8b".to_owned(),
            chunks,
            chunk_delay: Duration::ZERO,
            prompt_tokens,
        }
    }

    fn lines(plan: &StreamPlan) -> Vec<Value> {
        plan.frames()
            .map(|frame| {
                let text = std::str::from_utf8(frame).expect("utf-8");
                assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
                serde_json::from_str(text).expect("each line is JSON")
            })
            .collect()
    }

    #[test]
    fn chat_stream_is_one_line_per_word_then_a_done_line_with_counts() {
        let lines = lines(&stream_plan(
            &request(3, 7),
            |t| json!({"message": {"role": "assistant", "content": t}}),
        ));
        assert_eq!(lines.len(), 4);
        let text: String = lines[..3]
            .iter()
            .map(|l| {
                assert_eq!(l["done"], false);
                l["message"]["content"]
                    .as_str()
                    .expect("content")
                    .to_owned()
            })
            .collect();
        assert_eq!(text, full_text(3));
        let done = &lines[3];
        assert_eq!(done["done"], true);
        assert_eq!(done["done_reason"], "stop");
        assert_eq!(done["message"]["content"], "");
        assert_eq!(done["prompt_eval_count"], 7);
        assert_eq!(done["eval_count"], 3);
    }

    #[test]
    fn details_derive_family_and_size_from_the_name() {
        let d = details("llama3.1:8b");
        assert_eq!(d["family"], "llama");
        assert_eq!(d["parameter_size"], "8B");
        assert_eq!(fake_digest("x").len(), 64);
    }
}
