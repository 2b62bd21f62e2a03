//! `--api openai`: a hosted provider's surface. Besides generation it acts on `GET` and
//! `DELETE` of the same paths (stored completions, fine-tuned models), files, audio, images
//! and moderations, all with the gateway's credential. Bodies are read like Python `json` +
//! pydantic lax mode (see `decode::lax`); `n` (or `best_of`) choices are generated, each of
//! up to `max_completion_tokens`, else `max_tokens`.
//!
//! The reply builders here also serve Ollama's OpenAI-compatible endpoints.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::decode::{lax, J};
use crate::embedding;
use crate::kind::{self, Handled};
use crate::record::Interpreted;
use crate::reply::{chunk_texts, full_text, next_id, unix_seconds};
use crate::request::{mock_knobs, MockRequest};
use crate::responses::{self, Body, SSE};
use crate::stream_body::{sse, sse_done, StreamPlan};

const API: &str = "openai";
const MODEL_CREATED: u64 = 1_700_000_000;
/// `/v1/completions` generates this many tokens when `max_tokens` is absent (OpenAI's default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: u64 = 16;

/// Routes by method and (decoded) path; what is not a route is OpenAI's 404.
const ROUTES: [(&str, &str, &str); 28] = [
    ("POST", "/v1/chat/completions", "chat"),
    ("GET", "/v1/chat/completions", "list_stored"),
    ("GET", "/v1/chat/completions/*", "get_stored"),
    ("POST", "/v1/chat/completions/*", "update_stored"),
    ("DELETE", "/v1/chat/completions/*", "delete_stored"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/embeddings", "embeddings"),
    ("GET", "/v1/models", "models"),
    ("GET", "/v1/models/*", "model"),
    ("DELETE", "/v1/models/*", "delete_model"),
    ("POST", "/v1/responses", "responses"),
    ("GET", "/v1/files", "list_files"),
    ("POST", "/v1/files", "upload_file"),
    ("POST", "/v1/audio/speech", "speech"),
    ("POST", "/v1/audio/transcriptions", "transcription"),
    ("POST", "/v1/audio/translations", "translation"),
    ("POST", "/v1/images/generations", "images"),
    ("POST", "/v1/images/edits", "images"),
    ("POST", "/v1/moderations", "moderation"),
    ("GET", "/v1/files/*", "get_file"),
    ("DELETE", "/v1/files/*", "delete_file"),
    ("GET", "/v1/files/*/content", "file_content"),
    ("GET", "/v1/responses/*", "get_response"),
    ("DELETE", "/v1/responses/*", "delete_response"),
    ("POST", "/v1/batches", "batch"),
    ("GET", "/v1/batches", "list_batches"),
    ("POST", "/v1/fine_tuning/jobs", "fine_tune"),
    ("POST", "/v1/realtime/sessions", "realtime_session"),
];

pub fn operation_of(method: &Method, path: &str) -> Option<&'static str> {
    kind::operation_in(&ROUTES, method, path)
}

pub fn route(req: &MockRequest, catalog: &Catalog) -> Handled {
    let path = kind::decoded_path(req);
    let Some(op) = operation_of(&req.method, &path) else {
        return unrouted(req, &path);
    };
    let id = path.rsplit('/').next().unwrap_or_default().to_owned();
    let it = Interpreted::new(API, op);
    if let Some(status) = kind::forced_error(req) {
        let message = "The server had an error while processing your request. Sorry about that!";
        let r = error(status, message, "server_error", Value::Null, Value::Null);
        return kind::refused(it, status, message, r);
    }
    match op {
        "chat" => chat(req, catalog, it),
        "completions" => completions(req, catalog, it),
        "embeddings" => embeddings(req, catalog, it),
        "models" => (models(catalog), it),
        "model" => model(catalog, &id, it),
        "delete_model" => delete_model(catalog, &id, it),
        "responses" => responses_api(req, catalog, it),
        "list_stored" => (
            responses::json(
                StatusCode::OK,
                &json!({"object": "list", "data": [stored("chatcmpl-stored0001")],
                        "first_id": "chatcmpl-stored0001", "last_id": "chatcmpl-stored0001",
                        "has_more": false}),
            ),
            it,
        ),
        "get_stored" | "update_stored" => (responses::json(StatusCode::OK, &stored(&id)), it),
        "delete_stored" => (
            responses::json(
                StatusCode::OK,
                &json!({"object": "chat.completion.deleted", "id": id, "deleted": true}),
            ),
            it,
        ),
        "list_files" => (
            responses::json(
                StatusCode::OK,
                &json!({"object": "list", "data": [], "has_more": false}),
            ),
            it,
        ),
        "upload_file" => (
            responses::json(
                StatusCode::OK,
                &json!({"id": next_id("file-"), "object": "file", "bytes": req.body.len(),
                        "created_at": unix_seconds(), "filename": "upload.jsonl",
                        "purpose": "batch"}),
            ),
            it,
        ),
        "get_file" | "delete_file" | "file_content" | "get_response" | "delete_response"
        | "list_batches" | "batch" | "fine_tune" | "realtime_session" => account(req, op, &id, it),
        _ => side_model(req, op, it),
    }
}

/// Account-wide objects a hosted provider keeps per API key (which the gateway's
/// credential is): files, stored responses, batches, fine-tuning jobs, and realtime
/// sessions (an ephemeral key for generation that never passes the gateway again).
/// Batches, fine-tuning and realtime sessions generate later, without a bound here.
fn account(req: &MockRequest, op: &str, id: &str, mut it: Interpreted) -> Handled {
    let obj = kind::object(&req.body).unwrap_or_default();
    it.model = lax::string(&obj, "model").ok().flatten();
    it.generates = matches!(op, "batch" | "fine_tune" | "realtime_session");
    let body = match op {
        "get_file" => {
            json!({"id": id, "object": "file", "bytes": 42, "filename": "secret.jsonl", "purpose": "batch"})
        }
        "delete_file" => json!({"id": id, "object": "file", "deleted": true}),
        "file_content" => {
            return (
                responses::text(StatusCode::OK, "{\"prompt\": \"someone else's data\"}"),
                it,
            )
        }
        "get_response" => {
            json!({"id": id, "object": "response", "status": "completed", "output": []})
        }
        "delete_response" => json!({"id": id, "object": "response", "deleted": true}),
        "list_batches" => json!({"object": "list", "data": [], "has_more": false}),
        "batch" => json!({"id": next_id("batch_"), "object": "batch", "status": "validating"}),
        "fine_tune" => {
            json!({"id": next_id("ftjob-"), "object": "fine_tuning.job", "model": it.model, "status": "queued"})
        }
        _ => json!({"id": next_id("sess_"), "object": "realtime.session", "model": it.model,
                    "client_secret": {"value": "ek_mock_ephemeral", "expires_at": unix_seconds() + 60}}),
    };
    (responses::json(StatusCode::OK, &body), it)
}

/// OpenAI's 404 for an unknown URL, after a Starlette-style redirect for a trailing slash.
fn unrouted(req: &MockRequest, path: &str) -> Handled {
    let it = Interpreted::new(API, "none");
    if let Some(stripped) = path.strip_suffix('/') {
        if operation_of(&req.method, stripped).is_some() {
            return (redirect(stripped), it);
        }
    }
    let message = format!("Invalid URL ({} {})", req.method, req.uri.path());
    let response = error(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        Value::Null,
        Value::Null,
    );
    kind::refused(it, StatusCode::NOT_FOUND, &message, response)
}

pub fn redirect(location: &str) -> Response<Body> {
    let mut r = responses::text(StatusCode::TEMPORARY_REDIRECT, "");
    if let Ok(v) = http::HeaderValue::from_str(location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

/// OpenAI's error envelope.
pub fn error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Value,
    code: Value,
) -> Response<Body> {
    responses::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn bad(it: Interpreted, message: &str) -> Handled {
    let r = error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        Value::Null,
        Value::Null,
    );
    kind::refused(it, StatusCode::BAD_REQUEST, message, r)
}

fn unknown_model(it: Interpreted, model: &str) -> Handled {
    let message = format!("The model `{model}` does not exist or you do not have access to it.");
    let r = error(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        Value::Null,
        json!("model_not_found"),
    );
    kind::refused(it, StatusCode::NOT_FOUND, &message, r)
}

/// A lax int field that must be at least `min` when present.
fn bounded_int(
    obj: &[(String, J)],
    field: &str,
    min: i128,
    max: Option<i128>,
) -> Result<Option<i128>, String> {
    match lax::int(obj, field)? {
        Some(n) if n < min => Err(format!(
            "{field}: Input should be greater than or equal to {min}"
        )),
        Some(n) if max.is_some_and(|m| n > m) => Err(format!(
            "{field}: Input should be less than or equal to {}",
            max.unwrap_or_default()
        )),
        other => Ok(other),
    }
}

/// The fields every generation endpoint reads first: the object, `model` and the knobs.
struct Common {
    obj: Vec<(String, J)>,
    model: String,
    knob: Option<usize>,
    delay: Duration,
}

fn common(req: &MockRequest, it: &mut Interpreted) -> Result<Common, String> {
    let obj = kind::object(&req.body)
        .map_err(|e| format!("We could not parse the JSON body of your request. ({e})"))?;
    let model = lax::string(&obj, "model")?;
    it.model = model.clone();
    let model = model.ok_or_else(|| "you must provide a model parameter".to_owned())?;
    let (knob, delay) = mock_knobs(&req.headers).map_err(|e| format!("{e:?}"))?;
    Ok(Common {
        obj,
        model,
        knob,
        delay,
    })
}

fn include_usage(obj: &[(String, J)]) -> Result<bool, String> {
    match lax::get(obj, "stream_options") {
        Some(J::Obj(o)) => Ok(lax::boolean(o, "include_usage")?.unwrap_or(false)),
        Some(_) => Err("stream_options: Input should be an object".to_owned()),
        None => Ok(false),
    }
}

fn chat(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let read = (|| {
        let c = common(req, &mut it)?;
        if !matches!(lax::get(&c.obj, "messages"), Some(J::Arr(_))) {
            return Err("messages: Field required".to_owned());
        }
        let stream = lax::boolean(&c.obj, "stream")?.unwrap_or(false);
        let usage = include_usage(&c.obj)?;
        let max_tokens = bounded_int(&c.obj, "max_tokens", 1, None)?;
        let max_completion = bounded_int(&c.obj, "max_completion_tokens", 1, None)?;
        let n = bounded_int(&c.obj, "n", 1, Some(128))?.unwrap_or(1);
        Ok::<_, String>((
            c,
            stream,
            usage,
            max_completion.or(max_tokens).map(kind::saturate),
            kind::saturate(n),
        ))
    })();
    let (c, stream, usage, budget, n) = match read {
        Ok(r) => r,
        Err(e) => return bad(it, &e),
    };
    it.stream = Some(stream);
    it.max_tokens = budget;
    it.n = n;
    if !catalog.contains(&c.model) {
        return unknown_model(it, &c.model);
    }
    let prompt = kind::prompt_tokens(&[("messages", lax::get(&c.obj, "messages"))]);
    let reply = Reply::new(
        &c.model,
        n,
        kind::generated_per_choice(budget, c.knob),
        prompt,
        c.delay,
    );
    it.tokens_in = prompt;
    it.tokens_out = reply.total_out();
    (reply.respond(Shape::Chat, stream, usage), it)
}

fn completions(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let read = (|| {
        let c = common(req, &mut it)?;
        let stream = lax::boolean(&c.obj, "stream")?.unwrap_or(false);
        let usage = include_usage(&c.obj)?;
        let max_tokens = bounded_int(&c.obj, "max_tokens", 0, None)?;
        let n = bounded_int(&c.obj, "n", 1, Some(128))?.unwrap_or(1);
        let best_of = bounded_int(&c.obj, "best_of", 1, Some(20))?.unwrap_or(n);
        if best_of < n {
            return Err("best_of must be greater than or equal to n".to_owned());
        }
        let budget = max_tokens.map_or(COMPLETIONS_DEFAULT_MAX_TOKENS, kind::saturate);
        Ok::<_, String>((
            c,
            stream,
            usage,
            budget,
            kind::saturate(n),
            kind::saturate(best_of),
        ))
    })();
    let (c, stream, usage, budget, n, best_of) = match read {
        Ok(r) => r,
        Err(e) => return bad(it, &e),
    };
    it.stream = Some(stream);
    it.max_tokens = Some(budget);
    // best_of candidates are generated (and billed) server-side; n of them are returned.
    it.n = best_of.max(n);
    if !catalog.contains(&c.model) {
        return unknown_model(it, &c.model);
    }
    let prompt = kind::prompt_tokens(&[("prompt", lax::get(&c.obj, "prompt"))]);
    let per_choice = kind::generated_per_choice(Some(budget), c.knob);
    let reply = Reply::new(&c.model, n, per_choice, prompt, c.delay);
    it.tokens_in = prompt;
    it.tokens_out = per_choice * it.n;
    let mut response = reply.clone();
    response.billed_out = it.tokens_out;
    (response.respond(Shape::Completion, stream, usage), it)
}

fn embeddings(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    let read = (|| {
        let c = common(req, &mut it)?;
        let input = lax::get(&c.obj, "input")
            .cloned()
            .ok_or_else(|| "input: Field required".to_owned())?;
        Ok::<_, String>((c, input))
    })();
    let (c, input) = match read {
        Ok(r) => r,
        Err(e) => return bad(it, &e),
    };
    if !catalog.contains(&c.model) {
        return unknown_model(it, &c.model);
    }
    let base64 = lax::string(&c.obj, "encoding_format")
        .ok()
        .flatten()
        .as_deref()
        == Some("base64");
    let (response, tokens) = embedding_reply(&c.model, &input, base64);
    it.tokens_in = tokens;
    (response, it)
}

/// An OpenAI-shaped embeddings reply for `input` (one vector per string).
pub fn embedding_reply(model: &str, input: &J, base64: bool) -> (Response<Body>, u64) {
    let texts: Vec<String> = match input.to_value() {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        other => vec![other.to_string()],
    };
    let tokens = kind::prompt_tokens(&[("input", Some(input))]);
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embedding::vector(text, embedding::DEFAULT_DIMENSIONS);
            let encoded = if base64 {
                json!(embedding::base64_f32_le(&vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": encoded})
        })
        .collect();
    let body = json!({"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    (responses::json(StatusCode::OK, &body), tokens)
}

pub fn models(catalog: &Catalog) -> Response<Body> {
    let data: Vec<Value> = catalog.names().iter().map(|id| model_object(id)).collect();
    responses::json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"})
}

fn model(catalog: &Catalog, id: &str, mut it: Interpreted) -> Handled {
    it.model = Some(id.to_owned());
    if !catalog.contains(id) {
        return unknown_model(it, id);
    }
    (responses::json(StatusCode::OK, &model_object(id)), it)
}

fn delete_model(catalog: &Catalog, id: &str, mut it: Interpreted) -> Handled {
    it.model = Some(id.to_owned());
    if !catalog.contains(id) {
        return unknown_model(it, id);
    }
    (
        responses::json(
            StatusCode::OK,
            &json!({"id": id, "object": "model", "deleted": true}),
        ),
        it,
    )
}

fn stored(id: &str) -> Value {
    json!({"id": id, "object": "chat.completion", "created": MODEL_CREATED, "model": "gpt-4o-mini",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "stored answer"},
                        "finish_reason": "stop"}],
           "metadata": {}, "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})
}

/// `POST /v1/responses`: `input`, `max_output_tokens`, `stream` (events with usage at
/// `response.completed`).
fn responses_api(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let read = (|| {
        let c = common(req, &mut it)?;
        let stream = lax::boolean(&c.obj, "stream")?.unwrap_or(false);
        let budget = bounded_int(&c.obj, "max_output_tokens", 16, None)?.map(kind::saturate);
        Ok::<_, String>((c, stream, budget))
    })();
    let (c, stream, budget) = match read {
        Ok(r) => r,
        Err(e) => return bad(it, &e),
    };
    it.stream = Some(stream);
    it.max_tokens = budget;
    if !catalog.contains(&c.model) {
        return unknown_model(it, &c.model);
    }
    let prompt = kind::prompt_tokens(&[
        ("input", lax::get(&c.obj, "input")),
        ("system", lax::get(&c.obj, "instructions")),
    ]);
    let out = kind::generated_per_choice(budget, c.knob);
    it.tokens_in = prompt;
    it.tokens_out = out;
    let id = next_id("resp_");
    let usage = json!({"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out});
    let done = json!({"id": id, "object": "response", "status": "completed", "model": c.model,
        "output": [{"type": "message", "id": next_id("msg_"), "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": full_text(out as usize), "annotations": []}]}],
        "usage": usage});
    if !stream {
        return (responses::json(StatusCode::OK, &done), it);
    }
    let event = |data: Value| {
        let name = data["type"].as_str().unwrap_or_default().to_owned();
        sse(Some(&name), &data)
    };
    let mut created = done.clone();
    created["status"] = json!("in_progress");
    created["output"] = json!([]);
    created["usage"] = Value::Null;
    let plan = StreamPlan {
        preamble: vec![event(json!({"type": "response.created", "response": created}))],
        content: chunk_texts(out as usize)
            .iter()
            .map(|t| event(json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": t})))
            .collect(),
        epilogue: vec![event(json!({"type": "response.completed", "response": done}))],
        delay: c.delay,
    };
    (responses::streaming(SSE, plan), it)
}

/// Audio, images and moderations: the model read from a JSON body when there is one, else
/// the provider's default for the endpoint (which is a model as well).
fn side_model(req: &MockRequest, op: &str, mut it: Interpreted) -> Handled {
    let default = match op {
        "speech" => "tts-1",
        "transcription" | "translation" => "whisper-1",
        "images" => "dall-e-2",
        _ => "omni-moderation-latest",
    };
    let obj = kind::object(&req.body).unwrap_or_default();
    let model = lax::string(&obj, "model")
        .ok()
        .flatten()
        .unwrap_or_else(|| default.to_owned());
    it.model = Some(model.clone());
    match op {
        "speech" => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ID3\x04mock-audio")).boxed());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("audio/mpeg"),
            );
            (r, it)
        }
        "transcription" | "translation" => (
            responses::json(
                StatusCode::OK,
                &json!({"text": "Hello from the Tollgate mock."}),
            ),
            it,
        ),
        "images" => {
            let n = lax::int(&obj, "n").ok().flatten().unwrap_or(1).clamp(1, 10);
            it.n = kind::saturate(n);
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"url": format!("https://images.invalid/mock-{i}.png")}))
                .collect();
            (
                responses::json(
                    StatusCode::OK,
                    &json!({"created": unix_seconds(), "data": data}),
                ),
                it,
            )
        }
        _ => (
            responses::json(
                StatusCode::OK,
                &json!({"id": next_id("modr-"), "model": model,
                        "results": [{"flagged": false, "categories": {}, "category_scores": {}}]}),
            ),
            it,
        ),
    }
}

/// How an OpenAI-style generation reply looks.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    Chat,
    Completion,
}

/// `n` choices of `per_choice` tokens each, as JSON or as an SSE stream.
#[derive(Debug, Clone)]
pub struct Reply {
    model: String,
    n: u64,
    per_choice: u64,
    prompt: u64,
    /// Completion tokens reported in usage (more than `n × per_choice` with `best_of`).
    pub billed_out: u64,
    delay: Duration,
}

impl Reply {
    pub fn new(model: &str, n: u64, per_choice: u64, prompt: u64, delay: Duration) -> Self {
        Self {
            model: model.to_owned(),
            n,
            per_choice,
            prompt,
            billed_out: n * per_choice,
            delay,
        }
    }

    pub fn total_out(&self) -> u64 {
        self.billed_out
    }

    fn usage(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.billed_out,
               "total_tokens": self.prompt + self.billed_out})
    }

    pub fn respond(&self, shape: Shape, stream: bool, include_usage: bool) -> Response<Body> {
        let (id, object, chunk_object) = match shape {
            Shape::Chat => (
                next_id("chatcmpl-"),
                "chat.completion",
                "chat.completion.chunk",
            ),
            Shape::Completion => (next_id("cmpl-"), "text_completion", "text_completion"),
        };
        let text = full_text(self.per_choice as usize);
        if !stream {
            let choices: Vec<Value> = (0..self.n)
                .map(|i| match shape {
                    Shape::Chat => json!({"index": i, "message": {"role": "assistant", "content": text, "refusal": null},
                                          "logprobs": null, "finish_reason": "stop"}),
                    Shape::Completion => json!({"index": i, "text": text, "logprobs": null, "finish_reason": "stop"}),
                })
                .collect();
            return responses::json(
                StatusCode::OK,
                &json!({"id": id, "object": object, "created": unix_seconds(), "model": self.model,
                        "choices": choices, "usage": self.usage()}),
            );
        }
        let created = unix_seconds();
        let chunk = |choices: Value| {
            let mut c = json!({"id": id, "object": chunk_object, "created": created, "model": self.model, "choices": choices});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let delta = |i: u64, piece: &str, finish: Value| match shape {
            Shape::Chat => {
                json!([{"index": i, "delta": {"content": piece}, "logprobs": null, "finish_reason": finish}])
            }
            Shape::Completion => {
                json!([{"index": i, "text": piece, "logprobs": null, "finish_reason": finish}])
            }
        };
        let mut preamble = Vec::new();
        if let Shape::Chat = shape {
            for i in 0..self.n {
                preamble.push(sse(
                    None,
                    &chunk(
                        json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": null, "finish_reason": null}]),
                    ),
                ));
            }
        }
        let mut content = Vec::new();
        for i in 0..self.n {
            for piece in chunk_texts(self.per_choice as usize) {
                content.push(sse(None, &chunk(delta(i, &piece, Value::Null))));
            }
        }
        let mut epilogue: Vec<Bytes> = (0..self.n)
            .map(|i| match shape {
                Shape::Chat => sse(None, &chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": "stop"}]))),
                Shape::Completion => sse(None, &chunk(delta(i, "", json!("stop")))),
            })
            .collect();
        if include_usage {
            let mut last = chunk(json!([]));
            last["usage"] = self.usage();
            epilogue.push(sse(None, &last));
        }
        epilogue.push(sse_done());
        responses::streaming(
            SSE,
            StreamPlan {
                preamble,
                content,
                epilogue,
                delay: self.delay,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_read_lax_ints_and_multiply_by_choices() {
        let catalog = Catalog::new(vec!["gpt-4o-mini".into()]);
        let body = r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":10,"max_completion_tokens":"1000","n":3.0}"#;
        let (r, it) = route(
            &kind::test_request("POST", "/v1/chat/completions", body),
            &catalog,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            (it.max_tokens, it.n, it.tokens_out),
            (Some(1000), 3, 3 * kind::MAX_GENERATED)
        );
        let body = r#"{"model":"gpt-4o-mini","prompt":"x","best_of":4}"#;
        let (_, it) = route(
            &kind::test_request("POST", "/v1/completions", body),
            &catalog,
        );
        assert_eq!((it.max_tokens, it.n), (Some(16), 4));
        let body = r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":1.5}"#;
        let (r, _) = route(
            &kind::test_request("POST", "/v1/chat/completions", body),
            &catalog,
        );
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn get_and_delete_of_generation_paths_are_their_own_operations() {
        assert_eq!(
            operation_of(&Method::GET, "/v1/chat/completions"),
            Some("list_stored")
        );
        assert_eq!(
            operation_of(&Method::DELETE, "/v1/chat/completions/abc"),
            Some("delete_stored")
        );
        assert_eq!(
            operation_of(&Method::DELETE, "/v1/models/gpt-4o-mini"),
            Some("delete_model")
        );
        assert_eq!(operation_of(&Method::PUT, "/v1/chat/completions"), None);
        assert_eq!(operation_of(&Method::POST, "/api/chat"), None);
    }
}
