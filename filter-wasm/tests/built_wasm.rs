//! Runs the built `tollgate_filter.wasm` in a wasmtime host that speaks the proxy-wasm ABI like
//! Envoy (`wasm_host`), so these tests cover the proxy-wasm contexts and the module, not only the logic.
//! Needs `cargo build -p tollgate-filter --target wasm32-wasip1 --release` first.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod wasm_host;

use wasm_host::{Action, Filter, RequestSpec};

fn filter() -> Filter {
    Filter::load("{}").unwrap_or_else(|e| panic!("the filter refused `{{}}`: {e}"))
}

#[test]
fn module_loads_and_configures_with_an_empty_config() {
    let filter = filter();
    // Without discovery the filter starts no polling.
    assert_eq!(filter.tick_period_ms(), None);
    assert!(filter.http_calls().is_empty());
}

#[test]
fn unknown_config_field_makes_on_configure_fail() {
    let err = Filter::load(r#"{"nope":1}"#)
        .err()
        .expect("a config with an unknown field must be refused");
    assert!(err.contains("proxy_on_configure returned false"), "{err}");
    // The filter says why in its log.
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn malformed_config_makes_on_configure_fail() {
    let err = Filter::load("{")
        .err()
        .expect("malformed JSON must be refused");
    assert!(err.contains("proxy_on_configure returned false"), "{err}");
}

fn assert_blocked(path: &str) {
    let mut filter = filter();
    let id = "req-blocked-1";
    let ex = filter.request(RequestSpec::post(path).request_id(id));
    assert_eq!(ex.request_headers_action(), Action::Pause, "{path}");
    assert!(
        ex.upstream_request().is_none(),
        "{path} reached the upstream"
    );
    let reply = ex
        .local_reply()
        .unwrap_or_else(|| panic!("{path}: no local reply"));
    assert_eq!(reply.status, 403, "{path}");
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{path}"
    );
    assert_eq!(reply.header("x-request-id").as_deref(), Some(id), "{path}");
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string()),
        "{path}"
    );
    let body = reply.json();
    assert_eq!(body["error"]["code"], "endpoint_blocked", "{path}: {body}");
    assert_eq!(body["error"]["request_id"], id, "{path}: {body}");
}

#[test]
fn pull_is_blocked_with_a_json_403_carrying_the_request_id() {
    assert_blocked("/api/pull");
}

#[test]
fn disguised_pull_paths_are_blocked_too() {
    for path in [
        "/API/%70ull",
        "//api/./pull?x",
        "/api/pull/",
        "/api/%2e/pull",
    ] {
        assert_blocked(path);
    }
}

#[test]
fn block_applies_to_get_with_a_body_following() {
    let mut filter = filter();
    let ex = filter.request(RequestSpec::get("/api/pull").body_chunks(["{}"]));
    assert_eq!(ex.request_headers_action(), Action::Pause);
    // A local reply ends the request: no body callback runs.
    assert!(ex.request_body_actions().is_empty());
    assert_eq!(ex.local_reply().map(|r| r.status), Some(403));
}

#[test]
fn model_listing_passes_without_a_local_reply() {
    let mut filter = filter();
    let ex = filter.request(RequestSpec::get("/v1/models"));
    assert_eq!(ex.request_headers_action(), Action::Continue);
    assert!(ex.local_reply().is_none());
    let up = ex.upstream_request().expect("the request must go upstream");
    assert!(up.complete);
    assert_eq!(up.headers.get_str(":path").as_deref(), Some("/v1/models"));
}

#[test]
fn nul_byte_in_path_gets_400_invalid_path() {
    let mut filter = filter();
    let ex = filter.request(RequestSpec::get("/v1/models%00.json"));
    assert_eq!(ex.request_headers_action(), Action::Pause);
    let reply = ex.local_reply().expect("a NUL in the path must be refused");
    assert_eq!(reply.status, 400);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_path", "{body}");
    assert_eq!(
        body["error"]["request_id"],
        RequestSpec::REQUEST_ID,
        "{body}"
    );
    assert!(ex.upstream_request().is_none());
}

#[test]
fn local_reply_sets_no_filter_state() {
    let mut filter = filter();
    let mut ex = filter.request(RequestSpec::post("/api/pull"));
    ex.finish();
    assert!(ex.set_properties().is_empty(), "{:?}", ex.set_properties());
}

#[test]
fn openai_chat_to_ollama_is_translated_streamed_and_counted_in_the_built_module() {
    let mut filter = Filter::load(r#"{"upstream":"ollama"}"#).unwrap();
    let mut ex = filter.request(
        RequestSpec::post("/v1/chat/completions")
            .json(r#"{"model":"llama3.1:8b","stream":true,"max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#)
            .authz("models", "llama3*")
            .request_id("rid-7"),
    );
    assert_eq!(ex.request_body_actions().last(), Some(&Action::Continue));
    let up = ex.upstream_request().expect("the request went upstream");
    assert_eq!(up.headers.get_str(":path").as_deref(), Some("/api/chat"));
    let sent: serde_json::Value = serde_json::from_slice(&up.body).unwrap();
    assert_eq!(sent["options"]["num_predict"], 9);
    assert_eq!(sent["stream"], true);
    assert_eq!(
        up.headers.get_str("content-length"),
        Some(up.body.len().to_string())
    );
    ex.respond(
        &[(":status", "200"), ("content-type", "application/x-ndjson")],
        [
            "{\"model\":\"llama3.1:8b\",\"created_at\":\"2024-07-23T10:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"He",
            "llo\"},\"done\":false}\n{\"model\":\"llama3.1:8b\",\"created_at\":\"2024-07-23T10:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"!\"},\"done\":false}\n",
            "{\"model\":\"llama3.1:8b\",\"created_at\":\"2024-07-23T10:00:01Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":4,\"eval_count\":2}\n",
        ],
    );
    // The first chunk holds half a line: nothing is emitted until it completes.
    assert_eq!(ex.response_chunks()[0].emitted, b"");
    assert_eq!(
        ex.response_header("content-type").as_deref(),
        Some("text/event-stream")
    );
    let sse = String::from_utf8(ex.response_body()).unwrap();
    let data: Vec<serde_json::Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = data
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello!");
    assert!(data.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    assert_eq!(ex.filter_state("tollgate_tokens_in").as_deref(), Some("4"));
    assert_eq!(ex.filter_state("tollgate_tokens_out").as_deref(), Some("2"));
    assert_eq!(ex.filter_state("tollgate_tokens").as_deref(), Some("6"));
    assert_eq!(
        ex.filter_state("tollgate_model").as_deref(),
        Some("llama3.1:8b")
    );
    let reserved: u64 = ex.filter_state("tollgate_req").unwrap().parse().unwrap();
    assert!(reserved >= 9, "max_tokens is reserved");
    assert_eq!(
        ex.filter_state("tollgate_tokens_refund"),
        Some((reserved - 6).to_string())
    );
}

#[test]
fn model_outside_the_keys_allowlist_is_refused_in_the_built_module() {
    let mut filter = Filter::load(r#"{"upstream":"ollama"}"#).unwrap();
    let ex = filter.request(
        RequestSpec::post("/v1/chat/completions")
            .json(r#"{"model":"qwen2:0.5b","messages":[{"role":"user","content":"hi"}]}"#)
            .authz("models", "llama3*")
            .request_id("rid-8"),
    );
    let reply = ex.local_reply().expect("a local reply");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["code"], "model_not_allowed");
    assert_eq!(reply.json()["error"]["request_id"], "rid-8");
    assert!(ex.upstream_request().is_none());
}

#[test]
fn discovery_polls_the_cluster_and_fails_closed_until_it_answers() {
    let mut filter = Filter::load(
        r#"{"upstream":"ollama","discovery":{"cluster":"model","path":"/api/tags","interval_ms":5000}}"#,
    )
    .unwrap();
    let body = r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}]}"#;
    let before = filter.request(
        RequestSpec::post("/v1/chat/completions")
            .json(body)
            .authz("models", "*"),
    );
    assert_eq!(before.local_reply().map(|r| r.status), Some(503));
    drop(before);
    filter.tick();
    let call = filter
        .http_calls()
        .last()
        .cloned()
        .expect("a discovery call");
    assert_eq!(call.headers.get_str(":path").as_deref(), Some("/api/tags"));
    filter.answer_http_call(
        call.token,
        &[(":status", "200")],
        br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b"}]}"#,
    );
    assert_eq!(
        filter.tick_period_ms(),
        Some(5000),
        "back to the configured interval"
    );
    let ok = filter.request(
        RequestSpec::post("/v1/chat/completions")
            .json(body)
            .authz("models", "*"),
    );
    assert!(
        ok.local_reply().is_none(),
        "{:?}",
        ok.local_reply().map(|r| r.json())
    );
    drop(ok);
    let unknown = filter.request(
        RequestSpec::post("/v1/chat/completions")
            .json(r#"{"model":"mistral","messages":[{"role":"user","content":"hi"}]}"#)
            .authz("models", "*"),
    );
    assert_eq!(unknown.local_reply().map(|r| r.status), Some(404));
}
