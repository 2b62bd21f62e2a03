//! `--api ollama`: Ollama's native API and its OpenAI-compatible endpoints, routed like
//! gin (method and decoded path; a trailing slash redirects; anything else is
//! `404 page not found` as text) and decoded like Go's `encoding/json` (see `decode::go`).
//!
//! Generation budget: native requests read `options.num_predict` (absent, 0 or negative:
//! unbounded, Ollama's default −1); compatible requests read `max_tokens` (passed on as
//! `num_predict`). `keep_alive` and `options.num_ctx` change what the shared server holds
//! for everyone; they are recorded so the suite can prove they never arrive unasked.

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::catalog::Catalog;
use crate::decode::{go, J};
use crate::embedding;
use crate::kind::{self, Handled};
use crate::kind_openai::{self, Reply, Shape};
use crate::ollama;
use crate::record::Interpreted;
use crate::request::{mock_knobs, MockRequest};
use crate::responses::{self, Body};

const API: &str = "ollama";

/// Load-time options besides `num_ctx` (Ollama's runner options): a request with other
/// values reloads the model for every user of the server.
const LOAD_OPTIONS: [&str; 10] = [
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "use_mmap",
    "use_mlock",
    "low_vram",
    "numa",
    "f16_kv",
    "vocab_only",
];

const ROUTES: [(&str, &str, &str); 24] = [
    ("GET", "/", "health"),
    ("HEAD", "/", "health"),
    ("GET", "/api/version", "version"),
    ("HEAD", "/api/version", "version"),
    ("GET", "/api/tags", "tags"),
    ("HEAD", "/api/tags", "tags"),
    ("GET", "/api/ps", "ps"),
    ("POST", "/api/chat", "chat"),
    ("POST", "/api/generate", "generate"),
    ("POST", "/api/embed", "embed"),
    ("POST", "/api/embeddings", "embeddings"),
    ("POST", "/api/show", "show"),
    ("POST", "/api/pull", "pull"),
    ("POST", "/api/push", "push"),
    ("POST", "/api/create", "create"),
    ("POST", "/api/copy", "copy"),
    ("DELETE", "/api/delete", "delete"),
    ("POST", "/api/blobs/*", "blob_upload"),
    ("HEAD", "/api/blobs/*", "blob_check"),
    ("POST", "/v1/chat/completions", "compat_chat"),
    ("POST", "/v1/completions", "compat_completions"),
    ("POST", "/v1/embeddings", "compat_embeddings"),
    ("GET", "/v1/models", "compat_models"),
    ("GET", "/v1/models/*", "compat_model"),
];

pub fn operation_of(method: &Method, path: &str) -> Option<&'static str> {
    kind::operation_in(&ROUTES, method, path)
}

pub fn route(req: &MockRequest, catalog: &Catalog) -> Handled {
    let path = kind::decoded_path(req);
    let Some(op) = operation_of(&req.method, &path) else {
        return unrouted(req, &path);
    };
    let it = Interpreted::new(API, op);
    if let Some(status) = kind::forced_error(req) {
        return error(
            it,
            status,
            "server busy, please try again.  maximum pending requests exceeded",
        );
    }
    match op {
        "health" => (responses::text(StatusCode::OK, "Ollama is running"), it),
        "version" => (ollama::version(), it),
        "tags" => (ollama::tags(catalog), it),
        "ps" => (responses::json(StatusCode::OK, &json!({"models": []})), it),
        "chat" | "generate" => native(req, catalog, it),
        "embed" | "embeddings" => embed(req, catalog, it),
        "show" => show(req, catalog, it),
        "pull" | "push" | "create" | "copy" | "delete" | "blob_upload" | "blob_check" => {
            management(req, it)
        }
        "compat_chat" | "compat_completions" => compat_generation(req, catalog, it),
        "compat_embeddings" => compat_embeddings(req, catalog, it),
        "compat_models" => (compat_models(catalog), it),
        _ => {
            let id = path.rsplit('/').next().unwrap_or_default().to_owned();
            compat_model(catalog, &id, it)
        }
    }
}

/// gin: a trailing slash redirects (301 for GET, 307 otherwise) when the path without it
/// is a route; anything else is its plain-text 404 (no 405: HandleMethodNotAllowed is off).
fn unrouted(req: &MockRequest, path: &str) -> Handled {
    let it = Interpreted::new(API, "none");
    if let Some(stripped) = path.strip_suffix('/') {
        if !stripped.is_empty() && operation_of(&req.method, stripped).is_some() {
            let mut r = kind_openai::redirect(stripped);
            if req.method == Method::GET {
                *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
            }
            return (r, it);
        }
    }
    let r = responses::text(StatusCode::NOT_FOUND, "404 page not found");
    kind::refused(it, StatusCode::NOT_FOUND, "404 page not found", r)
}

/// Ollama's native error shape.
fn error(it: Interpreted, status: StatusCode, message: &str) -> Handled {
    let r = responses::json(status, &json!({ "error": message }));
    kind::refused(it, status, message, r)
}

fn not_found(it: Interpreted, model: &str) -> Handled {
    error(
        it,
        StatusCode::NOT_FOUND,
        &format!("model \"{model}\" not found, try pulling it first"),
    )
}

/// The served model Ollama runs for `model` (see `Catalog::ollama_resolve`), recorded on
/// `it` under that name.
fn resolve(catalog: &Catalog, it: &mut Interpreted, model: &str) -> Option<String> {
    let resolved = catalog.ollama_resolve(model)?;
    it.model = Some(resolved.clone());
    Some(resolved)
}

/// `keep_alive` and `options` of a native request, recorded on `it`; returns the options.
fn runtime_knobs(obj: &[(String, J)], it: &mut Interpreted) -> Result<Vec<(String, J)>, String> {
    it.keep_alive = go::pointer(obj, "keep_alive").map(J::to_value);
    let options = match go::value(obj, "options") {
        None => Vec::new(),
        Some(J::Obj(o)) => o.clone(),
        Some(other) => {
            return Err(format!(
                "json: cannot unmarshal {} into Go struct field .options of type map[string]interface {{}}",
                other.kind()
            ))
        }
    };
    it.num_ctx = options
        .iter()
        .rev()
        .find(|(k, _)| k == "num_ctx")
        .map(|(_, v)| v.to_value())
        .filter(|v| !v.is_null());
    it.load_options = LOAD_OPTIONS
        .iter()
        .filter(|name| options.iter().any(|(k, v)| k == *name && *v != J::Null))
        .map(|name| (*name).to_owned())
        .collect();
    Ok(options)
}

/// `num_predict` (or `max_tokens` of the compatible API) as a budget: positive bounds it,
/// anything else is Ollama's unbounded generation.
fn budget(num_predict: Option<i64>) -> Option<u64> {
    num_predict
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// `/api/chat` and `/api/generate`.
fn native(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let chat = it.operation == "chat";
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let model = go::string(&obj, "model")?;
        it.model = model.clone();
        let stream = go::bool_pointer(&obj, "stream")?;
        let options = runtime_knobs(&obj, &mut it)?;
        let num_predict = go::option_int(&options, "num_predict")?;
        Ok::<_, String>((
            obj,
            model.unwrap_or_default(),
            stream.unwrap_or(true),
            num_predict,
        ))
    })();
    let (obj, model, stream, num_predict) = match read {
        Ok(r) => r,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, &e),
    };
    it.stream = Some(stream);
    it.max_tokens = budget(num_predict);
    if model.is_empty() {
        return error(it, StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(model) = resolve(catalog, &mut it, &model) else {
        return not_found(it, &model);
    };
    let (knob, delay) = match mock_knobs(&req.headers) {
        Ok(k) => k,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, &format!("{e:?}")),
    };
    let prompt = if chat {
        kind::prompt_tokens(&[("messages", go::value(&obj, "messages"))])
    } else {
        kind::prompt_tokens(&[
            ("prompt", go::value(&obj, "prompt")),
            ("system", go::value(&obj, "system")),
        ])
    };
    let out = kind::generated_per_choice(it.max_tokens, knob);
    it.tokens_in = prompt;
    it.tokens_out = out;
    let request = kind::model_request(&model, out, delay, prompt, Map::new());
    let payload = if chat {
        ollama::chat_payload
    } else {
        ollama::generate_payload
    };
    (ollama::respond(&request, stream, payload), it)
}

/// `/api/embed` (`input`: string or list) and the older `/api/embeddings` (`prompt`).
fn embed(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    let legacy = it.operation == "embeddings";
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let model = go::string(&obj, "model")?;
        it.model = model.clone();
        runtime_knobs(&obj, &mut it)?;
        Ok::<_, String>((obj, model.unwrap_or_default()))
    })();
    let (obj, model) = match read {
        Ok(r) => r,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, &e),
    };
    if model.is_empty() {
        return error(it, StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(model) = resolve(catalog, &mut it, &model) else {
        return not_found(it, &model);
    };
    let field = if legacy { "prompt" } else { "input" };
    let input = go::value(&obj, field).cloned().unwrap_or(J::Null);
    it.tokens_in = kind::prompt_tokens(&[("input", Some(&input))]);
    let texts: Vec<String> = match input.to_value() {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let vectors: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| embedding::vector(t, embedding::DEFAULT_DIMENSIONS))
        .collect();
    let body = if legacy {
        json!({"embedding": vectors.first().cloned().unwrap_or_default()})
    } else {
        json!({"model": model, "embeddings": vectors, "total_duration": 1_000_000,
               "load_duration": 1_000_000, "prompt_eval_count": it.tokens_in})
    };
    (responses::json(StatusCode::OK, &body), it)
}

/// `/api/show`: `model`, or the older `name` when `model` is empty.
fn show(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let model = go::string(&obj, "model")?.filter(|m| !m.is_empty());
        let name = go::string(&obj, "name")?;
        // ShowRequest has no keep_alive, and show loads nothing: no runtime knob applies.
        Ok::<_, String>(model.or(name).unwrap_or_default())
    })();
    let model = match read {
        Ok(m) => m,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, &e),
    };
    it.model = Some(model.clone()).filter(|m| !m.is_empty());
    if model.is_empty() {
        return error(it, StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(model) = resolve(catalog, &mut it, &model) else {
        return not_found(it, &model);
    };
    let details = ollama::details(&model);
    (
        responses::json(
            StatusCode::OK,
            &json!({"modelfile": format!("FROM {model}\n"), "parameters": "", "template": "{{ .Prompt }}",
                    "details": details, "model_info": {"general.architecture": details["family"]},
                    "capabilities": ["completion"], "modified_at": "2024-07-23T10:00:00.000000000Z"}),
        ),
        it,
    )
}

/// pull / push / create / copy / delete / blobs: success, so a leak is visible.
fn management(req: &MockRequest, mut it: Interpreted) -> Handled {
    if let Ok(obj) = kind::object(&req.body) {
        let field = if it.operation == "copy" {
            "source"
        } else {
            "model"
        };
        it.model = go::string(&obj, field)
            .ok()
            .flatten()
            .filter(|m| !m.is_empty())
            .or_else(|| go::string(&obj, "name").ok().flatten());
    }
    (ollama::management_success(), it)
}

/// The OpenAI-compatible error shape Ollama uses on `/v1/*`.
fn compat_error(it: Interpreted, status: StatusCode, message: &str) -> Handled {
    let kind = if status == StatusCode::NOT_FOUND {
        "not_found_error"
    } else {
        "invalid_request_error"
    };
    let r = kind_openai::error(status, message, kind, Value::Null, Value::Null);
    kind::refused(it, status, message, r)
}

/// `/v1/chat/completions` and `/v1/completions` on Ollama: Go decoding; `max_tokens`
/// becomes `num_predict`; `n` is not supported (one choice).
fn compat_generation(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let chat = it.operation == "compat_chat";
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let model = go::string(&obj, "model")?;
        it.model = model.clone();
        let stream = go::bool_value(&obj, "stream")?.unwrap_or(false);
        let usage = match go::value(&obj, "stream_options") {
            Some(J::Obj(o)) => go::bool_value(o, "include_usage")?.unwrap_or(false),
            _ => false,
        };
        let max_tokens = go::int_pointer(&obj, "max_tokens")?;
        Ok::<_, String>((obj, model.unwrap_or_default(), stream, usage, max_tokens))
    })();
    let (obj, model, stream, usage, max_tokens) = match read {
        Ok(r) => r,
        Err(e) => return compat_error(it, StatusCode::BAD_REQUEST, &e),
    };
    it.stream = Some(stream);
    it.max_tokens = budget(max_tokens);
    if model.is_empty() {
        return compat_error(it, StatusCode::BAD_REQUEST, "model is required");
    }
    let Some(model) = resolve(catalog, &mut it, &model) else {
        return compat_error(
            it,
            StatusCode::NOT_FOUND,
            &format!("model \"{model}\" not found, try pulling it first"),
        );
    };
    let (knob, delay) = match mock_knobs(&req.headers) {
        Ok(k) => k,
        Err(e) => return compat_error(it, StatusCode::BAD_REQUEST, &format!("{e:?}")),
    };
    let prompt = if chat {
        kind::prompt_tokens(&[("messages", go::value(&obj, "messages"))])
    } else {
        kind::prompt_tokens(&[("prompt", go::value(&obj, "prompt"))])
    };
    let reply = Reply::new(
        &model,
        1,
        kind::generated_per_choice(it.max_tokens, knob),
        prompt,
        delay,
    );
    it.tokens_in = prompt;
    it.tokens_out = reply.total_out();
    let shape = if chat { Shape::Chat } else { Shape::Completion };
    (reply.respond(shape, stream, usage), it)
}

fn compat_embeddings(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let model = go::string(&obj, "model")?;
        it.model = model.clone();
        let input = go::value(&obj, "input")
            .cloned()
            .ok_or_else(|| "invalid input".to_owned())?;
        Ok::<_, String>((model.unwrap_or_default(), input))
    })();
    let (model, input) = match read {
        Ok(r) => r,
        Err(e) => return compat_error(it, StatusCode::BAD_REQUEST, &e),
    };
    let Some(model) = resolve(catalog, &mut it, &model) else {
        return compat_error(
            it,
            StatusCode::NOT_FOUND,
            &format!("model \"{model}\" not found, try pulling it first"),
        );
    };
    let (response, tokens) = kind_openai::embedding_reply(&model, &input, false);
    it.tokens_in = tokens;
    (response, it)
}

fn compat_models(catalog: &Catalog) -> http::Response<Body> {
    let data: Vec<Value> = catalog
        .names()
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "library"}))
        .collect();
    responses::json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn compat_model(catalog: &Catalog, id: &str, mut it: Interpreted) -> Handled {
    it.model = Some(id.to_owned());
    let Some(id) = resolve(catalog, &mut it, id) else {
        return compat_error(
            it,
            StatusCode::NOT_FOUND,
            &format!("model \"{id}\" not found"),
        );
    };
    (
        responses::json(
            StatusCode::OK,
            &json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "library"}),
        ),
        it,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_method_specific_like_gin() {
        assert_eq!(operation_of(&Method::POST, "/api/chat"), Some("chat"));
        assert_eq!(operation_of(&Method::GET, "/api/chat"), None);
        assert_eq!(operation_of(&Method::DELETE, "/api/delete"), Some("delete"));
        assert_eq!(operation_of(&Method::POST, "/api/delete"), None);
        assert_eq!(
            operation_of(&Method::GET, "/v1/models/llama3.1:8b"),
            Some("compat_model")
        );
        assert_eq!(
            operation_of(&Method::DELETE, "/v1/models/llama3.1:8b"),
            None
        );
        assert_eq!(operation_of(&Method::POST, "/v1/messages"), None);
    }

    fn catalog() -> Catalog {
        Catalog::new(vec!["llama3.1:8b".into(), "qwen2:0.5b".into()])
    }

    #[test]
    fn chat_reads_the_body_as_go_does() {
        let body = "{\"model\":\"qwen2:0.5b\",\"Model\":\"LLAMA3.1:8B\",\"\u{017f}tream\":false,\
                    \"options\":{\"num_predict\":7,\"num_ctx\":9000},\"Keep_Alive\":\"1h\",\"messages\":[]}";
        let (r, it) = route(&kind::test_request("POST", "/api/chat", body), &catalog());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(it.model.as_deref(), Some("llama3.1:8b"));
        assert_eq!(
            (it.stream, it.max_tokens, it.tokens_out),
            (Some(false), Some(7), 7)
        );
        assert_eq!(it.keep_alive, Some(json!("1h")));
        assert_eq!(it.num_ctx, Some(json!(9000)));
    }

    #[test]
    fn compat_max_tokens_refuses_float_spellings_and_wrong_paths_get_gins_404() {
        let body = r#"{"model":"llama3.1:8b","max_tokens":1e5,"messages":[]}"#;
        let (r, it) = route(
            &kind::test_request("POST", "/v1/chat/completions", body),
            &catalog(),
        );
        assert_eq!((r.status(), it.tokens_out), (StatusCode::BAD_REQUEST, 0));
        let (r, it) = route(
            &kind::test_request("POST", "/v1/messages", "{}"),
            &catalog(),
        );
        assert_eq!(
            (r.status(), it.operation.as_str()),
            (StatusCode::NOT_FOUND, "none")
        );
        let (r, _) = route(&kind::test_request("POST", "/api/chat/", "{}"), &catalog());
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
        let (_, it) = route(
            &kind::test_request(
                "POST",
                "/api/%63hat",
                r#"{"model":"qwen2:0.5b","stream":false}"#,
            ),
            &catalog(),
        );
        assert_eq!(it.operation, "chat");
    }

    #[test]
    fn non_positive_num_predict_is_unbounded() {
        assert_eq!(budget(Some(-1)), None);
        assert_eq!(budget(Some(0)), None);
        assert_eq!(budget(Some(i64::MIN)), None);
        assert_eq!(budget(Some(7)), Some(7));
        assert_eq!(budget(None), None);
    }
}
