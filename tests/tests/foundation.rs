//! The first request end to end through real Envoy: SDK chat, 401s, blocked Ollama
//! endpoints, RPM 429s and fail-closed 503s when a side service is down.

use serde_json::{json, Value};
use std::process::Command;
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::stack::{Stack, StackOptions};

const MODEL: &str = "gpt-4o-mini";

fn stack() -> Stack {
    match Stack::start(StackOptions::default()) {
        Ok(s) => s,
        Err(e) => panic!("stack did not start: {e}"),
    }
}

fn chat_body() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]})
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Asserts Tollgate's error shape and that request_id matches the x-request-id header.
fn assert_error(r: &http::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "body: {}", r.text());
    assert!(v["error"]["type"].is_string(), "body: {}", r.text());
    assert!(v["error"]["message"].is_string(), "body: {}", r.text());
    let rid = r.header("x-request-id").unwrap_or_default();
    assert!(
        !rid.is_empty(),
        "x-request-id header missing: {:?}",
        r.headers
    );
    assert_eq!(v["error"]["request_id"], rid, "body: {}", r.text());
}

fn model_paths(stack: &Stack) -> Vec<String> {
    stack
        .mock_requests()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["path"].as_str().map(String::from))
        .collect()
}

#[test]
fn openai_sdk_gets_chat_completion_plain_and_streamed() {
    let stack = stack();
    let (_, key) = stack.create_key("acme", None).unwrap();
    let out = Command::new(paths::python())
        .arg(paths::workspace_root().join("tests/clients/openai_chat.py"))
        .env(
            "TOLLGATE_BASE_URL",
            format!("http://127.0.0.1:{}/v1", stack.envoy_port),
        )
        .env("TOLLGATE_API_KEY", &key)
        .env("TOLLGATE_MODEL", MODEL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v.get("error").is_none(), "{v}\n{}", stack.logs());
    assert_eq!(v["plain"]["content"], "Hello from the Tollgate mock");
    assert_eq!(v["plain"]["finish_reason"], "stop");
    // The mock counts prompt words (5) and one completion token per chunk (5).
    assert_eq!(v["plain"]["usage"]["prompt_tokens"], 5);
    assert_eq!(v["plain"]["usage"]["completion_tokens"], 5);
    assert!(v["plain"]["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(v["stream"]["content"], "Hello from the Tollgate mock");
    assert_eq!(v["stream"]["finish_reason"], "stop");
    assert_eq!(v["stream"]["usage"]["completion_tokens"], 5);
    // The upstream saw the request without the client's key.
    let seen = stack.mock_requests().unwrap();
    let chats: Vec<&Value> = seen
        .iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .collect();
    assert_eq!(chats.len(), 2, "{seen:?}");
    for r in chats {
        assert!(
            r["headers"].get("authorization").is_none(),
            "client key leaked upstream: {r}"
        );
        assert!(r["headers"]["x-tollgate-tenant"]
            .as_str()
            .is_some_and(|t| t.starts_with("ten_")));
    }
}

#[test]
fn missing_unknown_and_malformed_keys_get_401_json() {
    let stack = stack();
    let (_, key) = stack.create_key("acme", None).unwrap();
    let r = http::post_json(stack.envoy_port, "/v1/chat/completions", &[], &chat_body()).unwrap();
    assert_error(&r, 401, "missing_api_key");
    // Right shape, wrong secret.
    let mut wrong = key.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    for bad in [
        wrong.as_str(),
        "tg_000000000000_000000000000000000000000000000000000000000000000",
        "sk-not-ours",
    ] {
        let auth = bearer(bad);
        let r = http::post_json(
            stack.envoy_port,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            &chat_body(),
        )
        .unwrap();
        assert_error(&r, 401, "invalid_api_key");
        assert!(!r.text().contains(bad), "error echoes key material");
    }
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", "Basic Zm9vOmJhcg==")],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 401, "invalid_api_key");
    assert!(
        model_paths(&stack).is_empty(),
        "denied requests reached the model server"
    );
    // At the edge a client cannot choose the request id that audit and logs will carry.
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("x-request-id", "client-rid-42")],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 401, "missing_api_key");
    assert_ne!(r.header("x-request-id"), Some("client-rid-42"));
}

#[test]
fn every_disguise_of_ollama_management_endpoints_is_blocked_before_the_upstream() {
    let stack = stack();
    let (_, key) = stack.create_key("acme", None).unwrap();
    let auth = bearer(&key);
    // A default policy does not even allow unknown operations: authz refuses first.
    let r = http::post_json(
        stack.envoy_port,
        "/api/pull",
        &[("authorization", &auth)],
        &json!({}),
    )
    .unwrap();
    assert_error(&r, 403, "operation_not_allowed");
    // With every operation allowed, the filter is what stands between the key and the upstream.
    stack
        .admin(&["policy", "set", "--tenant", "acme", "--operations", "*"])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let disguises = [
        "/api/pull",
        "/API/PULL",
        "/Api/Pull",
        "//api//pull",
        "/api/./pull",
        "/api/x/../pull",
        "/x/../api/pull",
        "/api/pull/",
        "/api/pull?name=llama3",
        "/api/%70ull",
        "/api/pul%6C",
        "/api%2Fpull",
        "/api%2fpull",
        "/api/%2570ull",
        "/%61pi/pull",
        "/api/pull;x=1",
        "/api/pull%3Fx",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/DELETE/",
        "/api/blobs/sha256:abc",
        "/api/BLOBS/sha256:abc",
        "/api//blobs/x",
        "/./api/blobs/../pull",
        "/%2e%2e/api/pull",
        "/api/%2e/pull",
        "/api\\pull",
    ];
    for path in disguises {
        for method in ["POST", "GET", "DELETE", "HEAD"] {
            let r = http::request(
                stack.envoy_port,
                method,
                path,
                &[("authorization", &auth)],
                b"{}",
            )
            .unwrap();
            assert!(
                r.status == 403 || r.status == 400,
                "{method} {path} got {} {}",
                r.status,
                r.text()
            );
            if method != "HEAD" {
                let code = r.json()["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    code == "endpoint_blocked" || code == "invalid_path",
                    "{method} {path}: {}",
                    r.text()
                );
                assert_eq!(
                    r.json()["error"]["request_id"],
                    r.header("x-request-id").unwrap_or_default()
                );
            }
        }
    }
    let seen = model_paths(&stack);
    assert!(
        seen.is_empty(),
        "the model server saw blocked requests: {seen:?}"
    );
    // Harmless endpoints still pass.
    for path in ["/api/tags", "/api/version", "/v1/models"] {
        let r = http::get(stack.envoy_port, path, &[("authorization", &auth)]).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let r = http::post_json(stack.envoy_port, "/api/chat", &[("authorization", &auth)], &json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false})).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["done"], true);
    // A path that only looks like a blocked one is not blocked: it reaches the upstream.
    let r = http::get(
        stack.envoy_port,
        "/api/pulls/..",
        &[("authorization", &auth)],
    )
    .unwrap();
    assert_ne!(r.status, 403, "{}", r.text());
    let seen = model_paths(&stack);
    assert!(seen.iter().any(|p| p == "/api" || p == "/api/"), "{seen:?}");
}

#[test]
fn rpm_exceeded_gets_429_with_retry_after_and_json() {
    let stack = stack();
    let (_, key) = stack.create_key("acme", Some(3)).unwrap();
    let (_, other) = stack.create_key("acme", Some(3)).unwrap();
    let auth = bearer(&key);
    for i in 0..3 {
        let r = http::post_json(
            stack.envoy_port,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            &chat_body(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "request {i}: {}\n{}", r.text(), stack.logs());
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some((2 - i).to_string().as_str())
        );
    }
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    // Another key has its own budget.
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &bearer(&other))],
        &chat_body(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let chats = model_paths(&stack)
        .iter()
        .filter(|p| *p == "/v1/chat/completions")
        .count();
    assert_eq!(chats, 4, "the 429 must not reach the model server");
}

#[test]
fn authz_down_fails_closed_with_503_json() {
    let mut stack = stack();
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack.kill_authz();
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 503, "authz_unavailable");
    assert!(model_paths(&stack).is_empty());
}

#[test]
fn ratelimit_down_fails_closed_with_503_json() {
    let mut stack = stack();
    let (_, key) = stack.create_key("acme", Some(100)).unwrap();
    stack.ratelimit.kill();
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 503, "ratelimit_unavailable");
    assert!(model_paths(&stack).is_empty());
}

#[test]
fn model_server_down_gets_json_without_upstream_details() {
    let mut stack = stack();
    let (_, key) = stack.create_key("acme", None).unwrap();
    if let Some(m) = stack.mock.as_mut() {
        m.kill();
    }
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &bearer(&key))],
        &chat_body(),
    )
    .unwrap();
    assert_error(&r, 503, "upstream_unavailable");
    let text = r.text();
    assert!(
        !text.contains("127.0.0.1") && !text.contains("reset reason"),
        "{text}"
    );
}
