//! Per-request entry point: reads the body under the size cap, records the request (except
//! the `/__mock/` control endpoints), and dispatches by method and path.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::catalog::Catalog;
use crate::record::{Interpreted, RecordedRequest, Recorder, MAX_RECORDED};
use crate::request::{read_body, BodyError, MockRequest};
use crate::responses::{self, Body};
use crate::{anthropic, kind_anthropic, kind_ollama, kind_openai, ollama, openai};

/// Which server the mock plays (`--api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// Every API in one process (the default: `make up` and the feature tests).
    All,
    Ollama,
    Openai,
    Anthropic,
}

/// Paths under this prefix control the mock itself; they are never recorded, so tests see
/// only gateway traffic in `/__mock/requests`.
const CONTROL_PREFIX: &str = "/__mock/";

/// Ollama management endpoints: answered with success so that, if the gateway ever let one
/// through, the recording proves it.
const OLLAMA_MANAGEMENT: [&str; 5] = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
];

#[derive(Debug)]
pub struct State {
    recorder: Recorder,
    catalog: Catalog,
    api: Api,
}

impl State {
    pub fn new(catalog: Catalog, api: Api) -> Self {
        Self {
            recorder: Recorder::new(MAX_RECORDED),
            catalog,
            api,
        }
    }
}

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let control = parts.uri.path().starts_with(CONTROL_PREFIX);
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            if !control {
                // Still recorded (with an empty body): the test wants to know it arrived.
                state.recorder.record(RecordedRequest::new(
                    &parts.method,
                    &parts.uri,
                    &parts.headers,
                    b"",
                ));
            }
            return Ok(responses::json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": "request body exceeds 8 MiB"}),
            ));
        }
        // The client went away mid-body; nobody will read this response.
        Err(BodyError::Read(e)) => {
            return Ok(responses::json(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("reading body: {e}") }),
            ))
        }
    };
    let req = MockRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    };
    if control {
        return Ok(control_endpoint(&req, &state.recorder));
    }
    let (response, interpreted) = match state.api {
        Api::All => {
            let response = route(&req, &state.catalog);
            let interpreted = legacy_interpretation(&req, response.status());
            (response, interpreted)
        }
        Api::Ollama => kind_ollama::route(&req, &state.catalog),
        Api::Openai => kind_openai::route(&req, &state.catalog),
        Api::Anthropic => kind_anthropic::route(&req, &state.catalog),
    };
    let mut interpreted = interpreted;
    interpreted.status = response.status().as_u16();
    state.recorder.record(
        RecordedRequest::new(&req.method, &req.uri, &req.headers, &req.body).with(interpreted),
    );
    Ok(response)
}

/// What the one-process mock did, roughly: it reads `model`, `stream` and `max_tokens`
/// exactly as named and generates `x-mock-chunks` (default 5) tokens.
fn legacy_interpretation(req: &MockRequest, status: StatusCode) -> Interpreted {
    let path = req.uri.path();
    let (operation, generates) = match path {
        "/api/chat" => ("chat", true),
        "/api/generate" => ("generate", true),
        "/api/embed" => ("embed", false),
        "/api/tags" => ("tags", false),
        "/api/version" => ("version", false),
        "/api/show" => ("show", false),
        "/" => ("health", false),
        "/v1/chat/completions" => ("chat", true),
        "/v1/completions" => ("completions", true),
        "/v1/embeddings" => ("embeddings", false),
        "/v1/models" => ("models", false),
        "/v1/messages" => ("messages", true),
        p if OLLAMA_MANAGEMENT.contains(&p) || p.starts_with("/api/blobs/") => {
            (p.trim_start_matches("/api/"), false)
        }
        _ => ("none", false),
    };
    let mut it = Interpreted::new("all", operation);
    it.generates = generates;
    if let Ok(body) = crate::request::json_object(&req.body) {
        it.model = body
            .get("model")
            .and_then(|m| m.as_str())
            .map(str::to_owned);
        it.stream = body.get("stream").and_then(serde_json::Value::as_bool);
        it.max_tokens = body.get("max_tokens").and_then(serde_json::Value::as_u64);
        if status == StatusCode::OK {
            it.tokens_in = crate::request::prompt_tokens(&body);
            if generates {
                it.tokens_out = crate::request::mock_knobs(&req.headers)
                    .ok()
                    .and_then(|(chunks, _)| chunks)
                    .unwrap_or(crate::request::DEFAULT_CHUNKS)
                    as u64;
            }
        }
    }
    it
}

fn control_endpoint(req: &MockRequest, recorder: &Recorder) -> Response<Body> {
    match (&req.method, req.uri.path()) {
        (&Method::GET, "/__mock/health") => responses::text(StatusCode::OK, "ok"),
        (&Method::GET, "/__mock/requests") => match tag_query(req) {
            Some(tag) => responses::json(StatusCode::OK, &recorder.tagged(&tag)),
            None => responses::json(StatusCode::OK, &recorder.snapshot()),
        },
        (&Method::DELETE, "/__mock/requests") => {
            recorder.clear();
            responses::no_content()
        }
        _ => responses::not_found(),
    }
}

/// `tag=<value>` of the query (values are plain tokens: no decoding needed).
fn tag_query(req: &MockRequest) -> Option<String> {
    req.uri
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("tag="))
        .map(str::to_owned)
}

fn route(req: &MockRequest, catalog: &Catalog) -> Response<Body> {
    let path = req.uri.path();
    match (&req.method, path) {
        // Ollama answers its root with this text; clients use it as a liveness probe.
        (&Method::GET | &Method::HEAD, "/") => responses::text(StatusCode::OK, "Ollama is running"),
        (&Method::POST, "/api/chat") => ollama::chat(req, catalog),
        (&Method::POST, "/api/generate") => ollama::generate(req, catalog),
        (&Method::POST, "/api/embed") => ollama::embed(req, catalog),
        (&Method::GET, "/api/tags") => ollama::tags(catalog),
        (&Method::GET, "/api/version") => ollama::version(),
        (&Method::POST, "/api/show") => ollama::show(req, catalog),
        (_, p) if OLLAMA_MANAGEMENT.contains(&p) || p.starts_with("/api/blobs/") => {
            ollama::management_success()
        }
        (&Method::POST, "/v1/chat/completions") => openai::chat_completions(req, catalog),
        (&Method::POST, "/v1/completions") => openai::completions(req, catalog),
        (&Method::POST, "/v1/embeddings") => openai::embeddings(req, catalog),
        (&Method::GET, "/v1/models") => openai::models(catalog),
        (&Method::POST, "/v1/messages") => anthropic::messages(req, catalog),
        _ => responses::not_found(),
    }
}
