//! Regression tests for the filter findings of "Airtight enforcement", through real Envoy,
//! tollgate-authz and tollgate-ratelimit on the default filter configuration (`{}`, the one
//! `make up` uses), with the mock model server's recorder as the witness.

use serde_json::{json, Value};
use tollgate_e2e::http;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start() -> Stack {
    Stack::start(StackOptions::default()).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

/// A key of tenant `acme` with the given `policy set` flags.
fn key_with(stack: &Stack, flags: &[&str]) -> String {
    let (id, key) = stack.create_key("acme", None).unwrap();
    if !flags.is_empty() {
        let mut args = vec!["policy", "set", "--key", id.as_str()];
        args.extend_from_slice(flags);
        stack.admin(&args).unwrap();
    }
    key
}

fn post(stack: &Stack, key: &str, path: &str, body: &Value) -> http::Response {
    post_with(stack, key, path, body, &[])
}

fn post_with(
    stack: &Stack,
    key: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> http::Response {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    http::post_json(stack.envoy_port, path, &all, body).unwrap()
}

fn recorded(stack: &Stack) -> Vec<Value> {
    stack.mock_requests().unwrap()
}

fn assert_json_refusal(r: &http::Response, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.error_code()),
        (status, code.to_string()),
        "{}",
        r.text()
    );
    let rid = r.header("x-request-id").unwrap_or_default().to_string();
    assert!(!rid.is_empty());
    assert_eq!(r.json()["error"]["request_id"], rid.as_str());
}

#[test]
fn native_ollama_endpoints_are_model_checked_under_the_default_config() {
    let stack = start();
    let key = key_with(&stack, &["--models", "qwen2*"]);
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.1:8b", "prompt": "hi"}),
        ),
        ("/api/embed", json!({"model": "llama3.1:8b", "input": "hi"})),
        (
            "/api/embeddings",
            json!({"model": "llama3.1:8b", "prompt": "hi"}),
        ),
    ] {
        let r = post(&stack, &key, path, &body);
        assert_json_refusal(&r, 403, "model_not_allowed");
    }
    assert!(recorded(&stack).is_empty(), "{:?}", recorded(&stack));
    let r = post(
        &stack,
        &key,
        "/api/chat",
        &json!({"model": "qwen2:0.5b", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recorded(&stack).len(), 1);
}

#[test]
fn native_ollama_chat_is_reserved_and_debited_under_a_tpm_limit() {
    let stack = start();
    let key = key_with(&stack, &["--tpm", "1000"]);
    // Each really generates 300 tokens (the mock's `x-mock-chunks`): debited, at most three
    // fit in 1000 per minute; uncounted (the hole), all ten ran.
    let body = json!({"model": "llama3.1:8b", "stream": false,
                      "options": {"num_predict": 400},
                      "messages": [{"role": "user", "content": "hi"}]});
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..10 {
        let r = post_with(
            &stack,
            &key,
            "/api/chat",
            &body,
            &[("x-mock-chunks", "300")],
        );
        if r.status == 200 {
            admitted += 1;
            std::thread::sleep(std::time::Duration::from_millis(150));
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("ten 400-token requests all ran under a 1000 TPM limit");
    assert_json_refusal(&refused, 429, "tokens_exhausted");
    assert!((1..=3).contains(&admitted), "{admitted}");
    assert_eq!(recorded(&stack).len(), admitted);
}

#[test]
fn a_max_tokens_envoy_cannot_carry_never_switches_token_limits_off() {
    let stack = start();
    let key = key_with(&stack, &["--tpm", "5000"]);
    let spend = |max_tokens: &str| {
        let body: Value = serde_json::from_str(&format!(
            r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .unwrap();
        post(&stack, &key, "/v1/chat/completions", &body)
    };
    // Reserved at the clamp (10^9), larger than the whole limit: refused, never admitted
    // on the other limits as when Envoy dropped the descriptor.
    for n in [
        "2147483647",
        "2147483648",
        "4294967296",
        "9223372036854775807",
    ] {
        let r = spend(n);
        assert_json_refusal(&r, 429, "tokens_exhausted");
    }
    for n in ["1e11", "1e30", "-1", "1.5", "\"100\""] {
        let r = spend(n);
        assert_json_refusal(&r, 400, "invalid_request");
    }
    assert!(recorded(&stack).is_empty(), "{:?}", recorded(&stack));
    // `null` is absent: the default reservation, admitted.
    assert_eq!(spend("null").status, 200);
}

#[test]
fn other_methods_on_model_paths_never_reach_a_hosted_provider() {
    let stack = start();
    let key = key_with(&stack, &[]);
    let auth = format!("Bearer {key}");
    for (method, path) in [
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/chat/completions/chatcmpl-1"),
        ("DELETE", "/v1/models/gpt-4o-mini"),
        ("PUT", "/api/chat"),
        ("GET", "/api/show"),
    ] {
        let r = http::request(
            stack.envoy_port,
            method,
            path,
            &[("authorization", &auth)],
            b"",
        )
        .unwrap();
        assert!(
            matches!(r.status, 403 | 405),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
        assert!(!r.error_code().is_empty(), "{method} {path}: {}", r.text());
    }
    assert!(recorded(&stack).is_empty(), "{:?}", recorded(&stack));
}

#[test]
fn a_clients_backend_header_never_reaches_the_upstream_in_single_upstream_mode() {
    let stack = start();
    let key = key_with(&stack, &[]);
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth), ("x-tollgate-backend", "hosted")],
        &body,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = recorded(&stack);
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]["headers"].get("x-tollgate-backend").is_none(),
        "{}",
        seen[0]
    );
}

#[test]
fn upstream_errors_keep_their_specific_code_and_never_pass_raw() {
    let stack = start();
    let key = key_with(&stack, &[]);
    // The mock answers an unknown model with OpenAI's 404 (type invalid_request_error,
    // code model_not_found).
    let r = post(
        &stack,
        &key,
        "/v1/chat/completions",
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_json_refusal(&r, 404, "model_not_found");
    // A path the filter passes through unread: the upstream's own 404 body is rewritten.
    let auth = format!("Bearer {key}");
    let r = http::get(
        stack.envoy_port,
        "/v1/models/no-such-model",
        &[("authorization", &auth)],
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json()["error"]["request_id"],
        r.header("x-request-id").unwrap()
    );
}

#[test]
fn ollama_runtime_options_never_reach_the_shared_server() {
    let stack = start();
    let key = key_with(&stack, &[]);
    let r = post(
        &stack,
        &key,
        "/api/generate",
        &json!({"model": "llama3.1:8b", "prompt": "hi", "stream": false, "keep_alive": -1,
                "options": {"num_ctx": 262144, "temperature": 0}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = recorded(&stack);
    let body: Value = serde_json::from_str(seen[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body.get("keep_alive"), None, "{body}");
    assert_eq!(body["options"], json!({"temperature": 0}));
}

#[test]
fn a_header_name_with_an_underscore_is_refused_at_the_edge() {
    // A server that maps '_' to '-' (CGI, WSGI) would read it as the x-tollgate-tenant
    // tollgate-authz sets.
    let stack = start();
    let key = key_with(&stack, &[]);
    let r = post_with(
        &stack,
        &key,
        "/v1/chat/completions",
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        &[("x_tollgate_tenant", "evil")],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rid = r.header("x-request-id").unwrap_or_default().to_string();
    assert!(!rid.is_empty());
    assert_eq!(r.json()["error"]["request_id"], rid.as_str());
    assert!(recorded(&stack).is_empty(), "{:?}", recorded(&stack));
}
