//! The filter's translation and counting through real Envoy with real clients: the `openai`
//! SDK against an Ollama-kind and an Anthropic-kind upstream, the `ollama` client natively,
//! model allowlists and discovery, and token counts checked against what the mock reported.

use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::stack::{Stack, StackOptions};

fn start(filter_config: &str, mock_models: Option<&str>) -> Stack {
    Stack::start(StackOptions {
        filter_config: filter_config.into(),
        mock_models: mock_models.map(String::from),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn python(stack: &Stack, script: &str, env: &[(&str, &str)]) -> Value {
    let out = Command::new(paths::python())
        .arg(paths::workspace_root().join("tests/clients").join(script))
        .env(
            "TOLLGATE_URL",
            format!("http://127.0.0.1:{}", stack.envoy_port),
        )
        .env(
            "TOLLGATE_BASE_URL",
            format!("http://127.0.0.1:{}/v1", stack.envoy_port),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Audit rows once `n` have arrived (the access log flushes every 0.2 s).
fn audit_rows(stack: &Stack, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = stack.admin(&["--json", "audit", "--since", "1h"]).unwrap();
        let rows: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mock_paths(stack: &Stack) -> Vec<String> {
    stack
        .mock_requests()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap_or("").to_string())
        .collect()
}

const GREETING: &str = "Hello from the Tollgate mock";

#[test]
fn openai_sdk_reaches_an_ollama_upstream_translated_and_counted() {
    let stack = start(r#"{"upstream":"ollama"}"#, None);
    let (_, key) = stack.create_key("acme", None).unwrap();
    let v = python(
        &stack,
        "openai_translation.py",
        &[
            ("TOLLGATE_API_KEY", &key),
            ("TOLLGATE_MODEL", "llama3.1:8b"),
            (
                "TOLLGATE_CASES",
                "chat,chat_stream,chat_stream_usage,completion,embeddings,models",
            ),
        ],
    );
    assert_eq!(v["chat"]["content"], GREETING, "{v}");
    assert_eq!(v["chat"]["finish_reason"], "stop");
    assert_eq!(v["chat"]["object"], "chat.completion");
    // Mock: prompt tokens = words in all messages (2 + 5), completion = 5 chunks.
    assert_eq!(
        v["chat"]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "completion_tokens_details": null, "prompt_tokens_details": null})
    );
    assert_eq!(v["chat_stream"]["content"], GREETING);
    assert_eq!(v["chat_stream"]["finish_reason"], "stop");
    assert_eq!(
        v["chat_stream"]["usage"],
        Value::Null,
        "usage only when asked"
    );
    assert_eq!(v["chat_stream"]["ids"], 1, "one id across the chunks");
    assert_eq!(v["chat_stream_usage"]["usage"]["completion_tokens"], 5);
    assert_eq!(v["chat_stream_usage"]["usage"]["prompt_tokens"], 7);
    assert_eq!(v["completion"]["text"], GREETING);
    assert_eq!(v["embeddings"]["count"], 2);
    assert_eq!(
        v["models"],
        json!(["gpt-4o-mini", "llama3.1:8b", "qwen2:0.5b"])
    );
    let seen = mock_paths(&stack);
    for p in ["/api/chat", "/api/generate", "/api/embed", "/api/tags"] {
        assert!(
            seen.iter().any(|s| s == p),
            "the mock never saw {p}: {seen:?}"
        );
    }
    assert!(
        !seen.iter().any(|s| s.starts_with("/v1/")),
        "untranslated request: {seen:?}"
    );
    // The mock got options translated (max_tokens → num_predict, temperature kept).
    let reqs = stack.mock_requests().unwrap();
    let chat: Value = serde_json::from_str(
        reqs.iter().find(|r| r["path"] == "/api/chat").unwrap()["body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(chat["options"]["num_predict"], 50);
    assert_eq!(chat["options"]["temperature"], 0.2);
    assert_eq!(chat["stream"], false);
    // Counted tokens reached the audit log: 3 chats × (7 in, 5 out), 1 completion.
    let rows = audit_rows(&stack, 6);
    let chats: Vec<&Value> = rows.iter().filter(|r| r["operation"] == "chat").collect();
    assert_eq!(chats.len(), 3, "{rows:#?}");
    for r in chats {
        assert_eq!(
            (r["tokens_in"].as_u64(), r["tokens_out"].as_u64()),
            (Some(7), Some(5)),
            "{r}"
        );
        assert_eq!(r["model"], "llama3.1:8b");
    }
}

#[test]
fn ollama_client_passes_through_counted_and_management_is_still_blocked() {
    let stack = start(r#"{"upstream":"ollama"}"#, None);
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--models",
            "llama3*,qwen2:0.5b",
            "--operations",
            "*",
        ])
        .unwrap();
    let v = python(
        &stack,
        "ollama_native.py",
        &[
            ("TOLLGATE_API_KEY", &key),
            ("TOLLGATE_MODEL", "llama3.1:8b"),
        ],
    );
    assert_eq!(v["chat"]["content"], GREETING, "{v}");
    assert_eq!(v["chat"]["eval_count"], 5);
    assert_eq!(v["chat"]["prompt_eval_count"], 2);
    assert_eq!(v["chat_stream"]["content"], GREETING);
    assert_eq!(v["chat_stream"]["done"], true);
    assert_eq!(v["generate"]["eval_count"], 5);
    assert_eq!(v["embed"]["count"], 2);
    assert_eq!(
        v["list"],
        json!(["llama3.1:8b", "qwen2:0.5b"]),
        "listing filtered to the allowlist"
    );
    assert_eq!(v["pull"]["status"], 403, "{v}");
    assert!(!mock_paths(&stack).iter().any(|p| p.contains("pull")));
    let rows = audit_rows(&stack, 6);
    let chat_rows: Vec<&Value> = rows.iter().filter(|r| r["operation"] == "chat").collect();
    assert_eq!(chat_rows.len(), 2);
    assert!(
        chat_rows
            .iter()
            .all(|r| r["tokens_out"] == 5 && r["tokens_in"] == 2),
        "{rows:#?}"
    );
}

#[test]
fn openai_sdk_reaches_an_anthropic_upstream_translated_and_counted() {
    let stack = start(
        r#"{"upstream":"anthropic"}"#,
        Some("claude-3-5-haiku-latest,gpt-4o-mini"),
    );
    let (_, key) = stack.create_key("acme", None).unwrap();
    let v = python(
        &stack,
        "openai_translation.py",
        &[
            ("TOLLGATE_API_KEY", &key),
            ("TOLLGATE_MODEL", "claude-3-5-haiku-latest"),
            ("TOLLGATE_CASES", "chat,chat_stream_usage,embeddings"),
        ],
    );
    assert_eq!(v["chat"]["content"], GREETING, "{v}");
    assert_eq!(v["chat"]["finish_reason"], "stop");
    // The system message moved to Anthropic's `system` and still counts: 2 + 5 words.
    assert_eq!(v["chat"]["usage"]["prompt_tokens"], 7);
    assert_eq!(v["chat"]["usage"]["completion_tokens"], 5);
    assert_eq!(v["chat_stream_usage"]["content"], GREETING);
    assert_eq!(v["chat_stream_usage"]["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["embeddings"]["error"], 404,
        "no embeddings on Anthropic: {v}"
    );
    let reqs = stack.mock_requests().unwrap();
    let m = reqs
        .iter()
        .find(|r| r["path"] == "/v1/messages")
        .expect("a Messages request");
    let body: Value = serde_json::from_str(m["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(m["headers"]["anthropic-version"], "2023-06-01");
}

#[test]
fn model_allowlist_and_discovery_gate_requests_and_listings() {
    let stack = start(
        r#"{"upstream":"ollama","discovery":{"cluster":"model","path":"/api/tags","interval_ms":500}}"#,
        None,
    );
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--models",
            "llama3*,mistral*",
        ])
        .unwrap();
    let auth = format!("Bearer {key}");
    let chat = |model: &str| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        http::post_json(
            stack.envoy_port,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            &body,
        )
        .unwrap()
    };
    // Discovery polls the mock at start; give it its first answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut r = chat("llama3.1:8b");
    while r.status == 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        r = chat("llama3.1:8b");
    }
    assert_eq!(r.status, 200, "{}", r.text());
    let r = chat("qwen2:0.5b");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let r = chat("mistral-large");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{}",
        r.text()
    );
    assert_eq!(
        r.json()["error"]["request_id"],
        r.header("x-request-id").unwrap()
    );
    let r = http::get(stack.envoy_port, "/v1/models", &[("authorization", &auth)]).unwrap();
    let listing = r.json();
    let ids: Vec<&str> = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama3.1:8b"]);
    // Bad bodies: 400 JSON, never forwarded.
    let r = http::request(
        stack.envoy_port,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        b"{\"model\": ",
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &json!({"messages": []}),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("missing_model"))
    );
    let chats = mock_paths(&stack)
        .iter()
        .filter(|p| *p == "/api/chat")
        .count();
    assert_eq!(
        chats, 1,
        "only the allowed, served model reached the model server"
    );
}

#[test]
fn oversized_bodies_are_refused_and_upstream_errors_are_sanitised() {
    let stack = start(r#"{"upstream":"ollama","max_body_bytes":4096}"#, None);
    let (_, key) = stack.create_key("acme", None).unwrap();
    let auth = format!("Bearer {key}");
    let big = "word ".repeat(2000);
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": big}]}),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{}",
        r.text()
    );
    // A model the upstream does not have (no discovery configured): the upstream's 404 comes
    // back in Tollgate's shape with the request id.
    let r = http::post_json(
        stack.envoy_port,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        &json!({"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        r.json()["error"]["request_id"],
        r.header("x-request-id").unwrap()
    );
    assert!(r.json()["error"]["code"].is_string());
}
