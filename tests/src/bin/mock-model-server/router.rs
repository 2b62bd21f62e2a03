//! Per-request entry point: reads the body under the size cap, records the request (except
//! the `/__mock/` control endpoints), and dispatches by method and path.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::catalog::Catalog;
use crate::record::{RecordedRequest, Recorder, MAX_RECORDED};
use crate::request::{read_body, BodyError, MockRequest};
use crate::responses::{self, Body};
use crate::{anthropic, ollama, openai};

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
}

impl State {
    pub fn new(catalog: Catalog) -> Self {
        Self {
            recorder: Recorder::new(MAX_RECORDED),
            catalog,
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
    state.recorder.record(RecordedRequest::new(
        &req.method,
        &req.uri,
        &req.headers,
        &req.body,
    ));
    Ok(route(&req, &state.catalog))
}

fn control_endpoint(req: &MockRequest, recorder: &Recorder) -> Response<Body> {
    match (&req.method, req.uri.path()) {
        (&Method::GET, "/__mock/health") => responses::text(StatusCode::OK, "ok"),
        (&Method::GET, "/__mock/requests") => responses::json(StatusCode::OK, &recorder.snapshot()),
        (&Method::DELETE, "/__mock/requests") => {
            recorder.clear();
            responses::no_content()
        }
        _ => responses::not_found(),
    }
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
