//! Building responses: the body type every handler returns, and JSON / text / stream helpers.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use serde::Serialize;
use serde_json::json;

use crate::stream_body::StreamPlan;

pub type Body = BoxBody<Bytes, Infallible>;

pub const SSE: &str = "text/event-stream";
pub const NDJSON: &str = "application/x-ndjson";

pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_body(
            status,
            "application/json",
            Full::new(Bytes::from(bytes)).boxed(),
        ),
        // Only possible for non-string map keys, which none of our types have.
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("serialize: {e}"),
        ),
    }
}

pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    with_body(
        status,
        "text/plain; charset=utf-8",
        Full::new(Bytes::from(body.to_owned())).boxed(),
    )
}

pub fn no_content() -> Response<Body> {
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// 200 with a body that is sent frame by frame as the plan dictates.
pub fn streaming(content_type: &'static str, plan: StreamPlan) -> Response<Body> {
    let mut response = with_body(StatusCode::OK, content_type, plan.spawn().boxed());
    // As the real SSE APIs do, so no cache in between holds the stream back.
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `{"error":"not found"}`: unknown path, whichever provider the caller thought it was.
pub fn not_found() -> Response<Body> {
    json(StatusCode::NOT_FOUND, &json!({"error": "not found"}))
}

fn with_body(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
