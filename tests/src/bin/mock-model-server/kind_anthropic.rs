//! `--api anthropic`: the Messages API (`/v1/messages` with its event stream,
//! `/v1/messages/count_tokens`, `/v1/messages/batches`) and `/v1/models`. Keys match
//! exactly (the last duplicate wins) and ints are read like pydantic lax mode; anything
//! else is Anthropic's 404 error shape.

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::anthropic;
use crate::catalog::Catalog;
use crate::decode::{lax, J};
use crate::kind::{self, Handled};
use crate::record::Interpreted;
use crate::reply::next_id;
use crate::request::{mock_knobs, MockRequest};
use crate::responses;

const API: &str = "anthropic";

const ROUTES: [(&str, &str, &str); 5] = [
    ("POST", "/v1/messages", "messages"),
    ("POST", "/v1/messages/count_tokens", "count_tokens"),
    ("POST", "/v1/messages/batches", "batch"),
    ("GET", "/v1/models", "models"),
    ("GET", "/v1/models/*", "model"),
];

pub fn operation_of(method: &Method, path: &str) -> Option<&'static str> {
    kind::operation_in(&ROUTES, method, path)
}

pub fn route(req: &MockRequest, catalog: &Catalog) -> Handled {
    let path = kind::decoded_path(req);
    let Some(op) = operation_of(&req.method, &path) else {
        let it = Interpreted::new(API, "none");
        return error(it, StatusCode::NOT_FOUND, "not_found_error", "Not Found");
    };
    let it = Interpreted::new(API, op);
    if let Some(status) = kind::forced_error(req) {
        return error(it, status, "overloaded_error", "Overloaded");
    }
    match op {
        "messages" | "count_tokens" => messages(req, catalog, it),
        "batch" => batch(req, catalog, it),
        "models" => {
            let data: Vec<Value> = catalog.names().iter().map(|id| model_object(id)).collect();
            (
                responses::json(
                    StatusCode::OK,
                    &json!({"data": data, "has_more": false, "first_id": null, "last_id": null}),
                ),
                it,
            )
        }
        _ => {
            let id = path.rsplit('/').next().unwrap_or_default().to_owned();
            let mut it = it;
            it.model = Some(id.clone());
            if !catalog.contains(&id) {
                return error(
                    it,
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    &format!("model: {id}"),
                );
            }
            (responses::json(StatusCode::OK, &model_object(&id)), it)
        }
    }
}

fn model_object(id: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": "2024-10-22T00:00:00Z"})
}

/// Anthropic's error shape.
fn error(it: Interpreted, status: StatusCode, kind: &str, message: &str) -> Handled {
    let r = responses::json(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    );
    kind::refused(it, status, message, r)
}

/// `model`, `max_tokens` (required for messages, at least 1) and `stream` of one
/// Messages request object.
fn params(
    obj: &[(String, J)],
    it: &mut Interpreted,
    needs_max: bool,
) -> Result<(String, Option<u64>, bool), String> {
    let model = lax::string(obj, "model")?;
    it.model = model.clone();
    let model = model.ok_or_else(|| "model: Field required".to_owned())?;
    if !matches!(lax::get(obj, "messages"), Some(J::Arr(_))) {
        return Err("messages: Field required".to_owned());
    }
    let max_tokens = match lax::int(obj, "max_tokens")? {
        Some(n) if n < 1 => {
            return Err("max_tokens: Input should be greater than or equal to 1".to_owned())
        }
        Some(n) => Some(kind::saturate(n)),
        None if needs_max => return Err("max_tokens: Field required".to_owned()),
        None => None,
    };
    let stream = lax::boolean(obj, "stream")?.unwrap_or(false);
    Ok((model, max_tokens, stream))
}

fn messages(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    let generates = it.operation == "messages";
    it.generates = generates;
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let p = params(&obj, &mut it, generates)?;
        Ok::<_, String>((obj, p))
    })();
    let (obj, (model, max_tokens, stream)) = match read {
        Ok(r) => r,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    if generates {
        it.stream = Some(stream);
        it.max_tokens = max_tokens;
    }
    if !catalog.contains(&model) {
        return error(
            it,
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("model: {model}"),
        );
    }
    let prompt = kind::prompt_tokens(&[
        ("messages", lax::get(&obj, "messages")),
        ("system", lax::get(&obj, "system")),
    ]);
    it.tokens_in = prompt;
    if !generates {
        return (
            responses::json(StatusCode::OK, &json!({ "input_tokens": prompt })),
            it,
        );
    }
    let (knob, delay) = match mock_knobs(&req.headers) {
        Ok(k) => k,
        Err(e) => {
            return error(
                it,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("{e:?}"),
            )
        }
    };
    let out = kind::generated_per_choice(max_tokens, knob);
    it.tokens_out = out;
    let request = kind::model_request(&model, out, delay, prompt, Map::new());
    (anthropic::respond(&request, stream), it)
}

/// `POST /v1/messages/batches`: every `requests[].params` is a Messages request run later;
/// the recorded budget is the sum of their `max_tokens`, the model the first one's.
fn batch(req: &MockRequest, catalog: &Catalog, mut it: Interpreted) -> Handled {
    it.generates = true;
    let read = (|| {
        let obj = kind::object(&req.body)?;
        let Some(J::Arr(requests)) = lax::get(&obj, "requests").cloned() else {
            return Err("requests: Field required".to_owned());
        };
        let mut total = 0u64;
        let mut first_model = None;
        let mut prompt = 0;
        for r in &requests {
            let found = r
                .entries()
                .and_then(|e| lax::get(e, "params"))
                .and_then(J::entries);
            let Some(p) = found else {
                return Err("requests.params: Field required".to_owned());
            };
            let mut one = Interpreted::new(API, "messages");
            let (model, max_tokens, _) = params(p, &mut one, true)?;
            if !catalog.contains(&model) {
                return Err(format!("model: {model}"));
            }
            first_model.get_or_insert(model);
            total = total.saturating_add(max_tokens.unwrap_or(0));
            prompt += kind::prompt_tokens(&[("messages", lax::get(p, "messages"))]);
        }
        it.model = first_model;
        Ok::<_, String>((total, prompt, requests.len()))
    })();
    let (total, prompt, count) = match read {
        Ok(r) => r,
        Err(e) => return error(it, StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    it.max_tokens = Some(total);
    it.tokens_in = prompt;
    (
        responses::json(
            StatusCode::OK,
            &json!({"id": next_id("msgbatch_"), "type": "message_batch", "processing_status": "in_progress",
                    "request_counts": {"processing": count, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}}),
        ),
        it,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_budget_is_the_sum_of_its_requests_and_errors_are_forced_by_header() {
        let catalog = Catalog::new(vec!["claude".into()]);
        let one = r#"{"custom_id":"a","params":{"model":"claude","max_tokens":60,"messages":[]}}"#;
        let body = format!(r#"{{"requests":[{one},{one},{one}]}}"#);
        let (r, it) = route(
            &kind::test_request("POST", "/v1/messages/batches", &body),
            &catalog,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            (it.max_tokens, it.model.as_deref()),
            (Some(180), Some("claude"))
        );
        let mut req = kind::test_request("POST", "/v1/messages", "{}");
        req.headers
            .insert(kind::ERROR_HEADER, http::HeaderValue::from_static("529"));
        let (r, it) = route(&req, &catalog);
        assert_eq!((r.status().as_u16(), it.tokens_out), (529, 0));
    }

    #[test]
    fn only_the_messages_family_and_models_are_routes() {
        assert_eq!(
            operation_of(&Method::POST, "/v1/messages"),
            Some("messages")
        );
        assert_eq!(
            operation_of(&Method::POST, "/v1/messages/batches"),
            Some("batch")
        );
        assert_eq!(operation_of(&Method::POST, "/v1/chat/completions"), None);
        assert_eq!(operation_of(&Method::GET, "/v1/messages"), None);
    }
}
