//! The exchange under a fake host: every refusal, translation, listing, reservation and
//! settlement the filter makes, without Envoy.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::admission::{COUNT_MAX, STREAM_EVENTS_WITHOUT_TOKENS};
use crate::discovery::ModelSet;
use std::collections::HashMap;

/// The request-headers phase of a fresh exchange, with nothing discovered.
fn on_request_headers(host: &mut impl Host, config: &Config) -> Action {
    Exchange::default().on_request_headers(host, config, true, &Served::default())
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

#[derive(Default)]
struct FakeHost {
    headers: Vec<(String, Vec<u8>)>,
    request_id: Option<String>,
    reply: Option<Reply>,
    properties: HashMap<String, Vec<u8>>,
    state: HashMap<String, String>,
    request_body: Vec<u8>,
    response_headers: Vec<(String, String)>,
    response_chunk: Vec<u8>,
}

impl FakeHost {
    fn request(method: &str, path: &str) -> Self {
        FakeHost {
            headers: vec![
                (":method".into(), method.into()),
                (":path".into(), path.into()),
            ],
            request_id: Some("rid-42".into()),
            ..Default::default()
        }
    }

    fn with_models(mut self, models: &str) -> Self {
        self.properties.insert(
            "metadata/filter_metadata/envoy.filters.http.ext_authz/models".into(),
            models.as_bytes().to_vec(),
        );
        self
    }

    fn reply_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.reply.as_ref().unwrap().body).unwrap()
    }

    fn reply_header(&self, name: &str) -> Option<&str> {
        self.reply
            .as_ref()
            .unwrap()
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<String> {
        self.request_header(name)
            .map(|v| String::from_utf8(v).unwrap())
    }

    fn response_header_value(&self, name: &str) -> Option<&str> {
        self.response_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Host for FakeHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            self.headers.push((name.into(), v.as_bytes().to_vec()));
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        match path {
            ["request", "id"] => self.request_id.clone().map(String::into_bytes),
            _ => self.properties.get(&path.join("/")).cloned(),
        }
    }

    fn set_property(&mut self, name: &str, value: &str) {
        self.state.insert(name.into(), value.into());
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        assert!(self.reply.is_none(), "a second local reply was sent");
        let headers = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        self.reply = Some(Reply {
            status,
            headers,
            body: body.to_owned(),
        });
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        Some(self.request_body[..size.min(self.request_body.len())].to_vec())
    }

    fn set_request_body(&mut self, _size: usize, body: &[u8]) {
        self.request_body = body.to_vec();
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_header_value(name)
            .map(|v| v.as_bytes().to_vec())
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.response_headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            self.response_headers.push((name.into(), v.into()));
        }
    }

    fn response_body(&self, _size: usize) -> Option<Vec<u8>> {
        Some(self.response_chunk.clone())
    }

    fn set_response_body(&mut self, _size: usize, body: &[u8]) {
        self.response_chunk = body.to_vec();
    }

    fn now_secs(&self) -> u64 {
        1_700_000_000
    }

    fn log_warn(&self, _message: &str) {}
}

fn ollama() -> Config {
    Config::from_json(br#"{"upstream":"ollama"}"#).unwrap()
}

/// Runs a request with a JSON body through the request callbacks.
fn send(
    host: &mut FakeHost,
    config: &Config,
    body: &str,
    served: Option<&ModelSet>,
) -> (Exchange, Action) {
    let mut known = Served::default();
    if let Some(set) = served {
        known.insert(Served::SINGLE, set.clone());
    }
    let mut s = Exchange::default();
    host.request_body = body.as_bytes().to_vec();
    assert_eq!(
        s.on_request_headers(host, config, false, &known),
        Action::Pause
    );
    let action = s.on_request_body(host, config, body.len(), true, &known);
    (s, action)
}

/// Feeds response chunks; returns what the client got.
fn respond(
    host: &mut FakeHost,
    s: &mut Exchange,
    status: &str,
    chunks: &[&[u8]],
    via_upstream: bool,
) -> Vec<u8> {
    host.response_headers = vec![
        (":status".into(), status.into()),
        ("content-length".into(), "1".into()),
    ];
    if via_upstream {
        host.properties
            .insert("response/code_details".into(), b"via_upstream".to_vec());
    }
    s.on_response_headers(host);
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        host.response_chunk = c.to_vec();
        s.on_response_body(host, c.len(), i + 1 == chunks.len());
        out.extend_from_slice(&host.response_chunk);
    }
    out
}

#[test]
fn blocked_endpoint_gets_403_json_with_request_id_and_pauses() {
    let mut host = FakeHost::request("POST", "/api/pull");
    let action = on_request_headers(&mut host, &Config::default());
    assert_eq!(action, Action::Pause);
    assert_eq!(host.reply.as_ref().unwrap().status, 403);
    assert_eq!(host.reply_header("content-type"), Some("application/json"));
    assert_eq!(host.reply_header("x-request-id"), Some("rid-42"));
    assert_eq!(
        host.reply_header("x-tollgate-error"),
        Some("endpoint_blocked")
    );
    let body = host.reply_json();
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(body["error"]["code"], "endpoint_blocked");
    assert_eq!(body["error"]["message"], BLOCKED_MESSAGE);
    assert_eq!(body["error"]["request_id"], "rid-42");
}

#[test]
fn blocked_endpoint_is_blocked_for_every_method() {
    for method in [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO",
    ] {
        let mut host = FakeHost::request(method, "/api/blobs/sha256:abc");
        assert_eq!(
            on_request_headers(&mut host, &Config::default()),
            Action::Pause
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 403, "{method}");
    }
}

#[test]
fn invalid_path_gets_400_invalid_path() {
    let mut host = FakeHost::request("POST", "/api/pull%00");
    assert_eq!(
        on_request_headers(&mut host, &Config::default()),
        Action::Pause
    );
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
    let body = host.reply_json();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_path");
    assert_eq!(body["error"]["request_id"], "rid-42");
}

#[test]
fn path_that_is_not_utf8_gets_400() {
    let mut host = FakeHost::request("GET", "/");
    host.headers[1].1 = b"/api/\xffpull".to_vec();
    assert_eq!(
        on_request_headers(&mut host, &Config::default()),
        Action::Pause
    );
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
}

#[test]
fn request_without_path_gets_400() {
    let mut host = FakeHost::request("CONNECT", "/");
    host.headers.truncate(1);
    assert_eq!(
        on_request_headers(&mut host, &Config::default()),
        Action::Pause
    );
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
}

#[test]
fn missing_request_id_gives_empty_id_and_no_header() {
    let mut host = FakeHost::request("POST", "/api/delete");
    host.request_id = None;
    on_request_headers(&mut host, &Config::default());
    assert_eq!(host.reply_header("x-request-id"), None);
    assert_eq!(host.reply_json()["error"]["request_id"], "");
}

#[test]
fn openai_chat_to_ollama_is_rewritten_and_the_model_recorded() {
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("llama3*");
    host.headers
        .push(("accept-encoding".into(), b"gzip".to_vec()));
    let body =
        r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}],"max_tokens":7}"#;
    let (_, action) = send(&mut host, &ollama(), body, None);
    assert_eq!(action, Action::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.header(":path").as_deref(), Some("/api/chat"));
    assert_eq!(
        host.header("accept-encoding"),
        None,
        "the response must come uncompressed"
    );
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["options"]["num_predict"], 7);
    assert_eq!(sent["stream"], false);
    assert_eq!(
        host.header("content-length"),
        Some(host.request_body.len().to_string())
    );
    assert_eq!(
        host.state.get("tollgate_model").map(String::as_str),
        Some("llama3.1:8b")
    );
}

#[test]
fn model_outside_the_allowlist_or_the_served_set_is_refused() {
    let body = r#"{"model":"qwen2:0.5b","messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("llama3*");
    send(&mut host, &ollama(), body, None);
    assert_eq!(host.reply.as_ref().unwrap().status, 403);
    assert_eq!(host.reply_json()["error"]["code"], "model_not_allowed");

    let mut host = FakeHost::request("POST", "/v1/chat/completions");
    send(&mut host, &ollama(), body, None);
    assert_eq!(
        host.reply_json()["error"]["code"],
        "model_not_allowed",
        "no metadata allows nothing"
    );

    let discovering = Config::from_json(
        br#"{"upstream":"ollama","discovery":{"cluster":"model","path":"/api/tags"}}"#,
    )
    .unwrap();
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    send(&mut host, &discovering, body, None);
    assert_eq!(
        host.reply.as_ref().unwrap().status,
        503,
        "unknown served set fails closed"
    );
    let served = ModelSet::from_names(["llama3.1:8b"]);
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    send(&mut host, &discovering, body, Some(&served));
    assert_eq!(host.reply.as_ref().unwrap().status, 404);
    assert_eq!(host.reply_json()["error"]["code"], "model_not_found");
}

#[test]
fn malformed_and_oversized_bodies_get_4xx() {
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    send(&mut host, &ollama(), "{not json", None);
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
    assert_eq!(host.reply_json()["error"]["code"], "invalid_json");

    let small = Config::from_json(br#"{"upstream":"ollama","max_body_bytes":16}"#).unwrap();
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let mut s = Exchange::default();
    assert_eq!(
        s.on_request_headers(&mut host, &small, false, &Served::default()),
        Action::Pause
    );
    assert_eq!(
        s.on_request_body(&mut host, &small, 17, false, &Served::default()),
        Action::Pause
    );
    assert_eq!(host.reply.as_ref().unwrap().status, 413);
}

#[test]
fn ollama_stream_becomes_openai_sse_and_tokens_are_published_at_log() {
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let body =
        r#"{"model":"llama3.1:8b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (mut s, _) = send(&mut host, &ollama(), body, None);
    let lines: [&[u8]; 3] = [
        br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}"#,
        b"\n{\"model\":\"llama3.1:8b\",\"created_at\":\"2024-07-23T10:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"lo\"},\"done\":false}\n",
        br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":2}
"#,
    ];
    let out = String::from_utf8(respond(&mut host, &mut s, "200", &lines, true)).unwrap();
    assert_eq!(
        host.response_header_value("content-type"),
        Some("text/event-stream")
    );
    assert_eq!(host.response_header_value("content-length"), None);
    assert!(
        out.contains(r#""content":"Hel""#) && out.contains(r#""content":"lo""#),
        "{out}"
    );
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
    s.on_log(&mut host);
    assert_eq!(
        host.state.get("tollgate_tokens_in").map(String::as_str),
        Some("3")
    );
    assert_eq!(
        host.state.get("tollgate_tokens_out").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        host.state.get("tollgate_tokens").map(String::as_str),
        Some("5")
    );
}

#[test]
fn unreported_usage_debits_the_reservation_and_local_replies_debit_nothing() {
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let (mut s, _) = send(&mut host, &Config::default(), body, None);
    respond(&mut host, &mut s, "200", &[br#"{"choices":[]}"#], true);
    s.on_log(&mut host);
    let reserved = host.state["tollgate_req"].clone();
    assert_eq!(host.state.get("tollgate_tokens"), Some(&reserved));
    assert_eq!(host.state["tollgate_tokens_refund"], "0");

    // Admitted, then the upstream failed: the whole reservation comes back.
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &Config::default(), body, None);
    host.properties.insert(
        "response/code_details".into(),
        b"upstream_reset_before_response_started{connection_failure}".to_vec(),
    );
    s.on_log(&mut host);
    assert_eq!(host.state["tollgate_tokens"], "0");
    assert_eq!(
        host.state["tollgate_tokens_refund"],
        host.state["tollgate_req"]
    );

    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &Config::default(), body, None);
    let out = respond(
        &mut host,
        &mut s,
        "429",
        &[br#"{"error":{"code":"rate_limited"}}"#],
        false,
    );
    assert_eq!(
        out, br#"{"error":{"code":"rate_limited"}}"#,
        "the gateway's own 429 is untouched"
    );
    host.properties.insert(
        "response/code_details".into(),
        b"request_rate_limited".to_vec(),
    );
    s.on_log(&mut host);
    assert!(
        !host.state.contains_key("tollgate_tokens"),
        "a refused request reserved nothing"
    );
    assert!(!host.state.contains_key("tollgate_tokens_refund"));
}

/// Ollama upstream with llama3* at $1 in / $3 out per million tokens, $2 / $4 by default.
fn priced(default: bool) -> Config {
    let default = if default {
        r#","default":{"input_usd_per_mtok":2,"output_usd_per_mtok":4}"#
    } else {
        ""
    };
    Config::from_json(
        format!(
            r#"{{"upstream":"ollama","prices":{{"models":[{{"match":"llama3*",
                "input_usd_per_mtok":1,"output_usd_per_mtok":3}}]{default}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

fn with_usd_budget(mut host: FakeHost) -> FakeHost {
    host.properties.insert(
        "metadata/filter_metadata/envoy.filters.http.ext_authz/tenant_budget_usd_month".into(),
        b"struct".to_vec(),
    );
    host
}

fn headers_only(host: &mut FakeHost, config: &Config) -> Action {
    Exchange::default().on_request_headers(host, config, true, &Served::default())
}

fn with_metadata(mut host: FakeHost, name: &str) -> FakeHost {
    host.properties.insert(
        format!("metadata/filter_metadata/envoy.filters.http.ext_authz/{name}"),
        b"struct".to_vec(),
    );
    host
}

#[test]
fn ollama_native_chat_is_checked_and_reserved_under_the_default_openai_config() {
    let config = Config::default();
    for path in [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings/",
    ] {
        let body = r#"{"model":"llama3.1:8b","max_tokens":5}"#;
        let mut host = FakeHost::request("POST", path).with_models("qwen2*");
        let (_, action) = send(&mut host, &config, body, None);
        assert_eq!(action, Action::Pause, "{path}");
        assert_eq!(host.reply.as_ref().unwrap().status, 403, "{path}");
        assert_eq!(host.reply_json()["error"]["code"], "model_not_allowed");
        let mut host = FakeHost::request("POST", path).with_models("llama3*");
        let body = r#"{"model":"llama3.1:8b","options":{"num_predict":7}}"#;
        let (_, action) = send(&mut host, &config, body, None);
        assert_eq!(action, Action::Continue, "{path}");
        let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
        assert!(reserved >= 7, "{path}: {reserved}");
        assert_eq!(host.state["tollgate_model"], "llama3.1:8b");
    }
}

#[test]
fn methods_an_upstream_acts_on_beside_the_read_one_are_405() {
    let config = Config::default();
    for (method, path) in [
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/chat/completions"),
        ("PUT", "/api/chat"),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:org"),
        ("POST", "/v1/models"),
        ("DELETE", "/api/tags"),
        ("GET", "/api/show"),
        ("POST", "/api/version"),
    ] {
        let mut host = FakeHost::request(method, path).with_models("*");
        assert_eq!(
            headers_only(&mut host, &config),
            Action::Pause,
            "{method} {path}"
        );
        assert_eq!(host.reply.as_ref().unwrap().status, 405, "{method} {path}");
        assert_eq!(host.reply_json()["error"]["code"], "method_not_allowed");
        assert_eq!(host.reply_json()["error"]["request_id"], "rid-42");
    }
    let mut host = FakeHost::request("GET", "/v1/models").with_models("*");
    assert_eq!(headers_only(&mut host, &config), Action::Continue);
}

#[test]
fn paths_the_filter_cannot_read_are_refused_to_restricted_callers_only() {
    let config = Config::default();
    for path in [
        "/v1/responses",
        "/v1/files",
        "/v1/audio/speech",
        "/",
        "/v1/chat/completions/x",
    ] {
        for host in [
            FakeHost::request("POST", path).with_models("llama3*"),
            with_metadata(FakeHost::request("POST", path).with_models("*"), "key_tpm"),
            with_metadata(
                FakeHost::request("POST", path).with_models("*"),
                "tenant_budget_usd_day",
            ),
            FakeHost::request("POST", path),
        ] {
            let mut host = host;
            assert_eq!(headers_only(&mut host, &config), Action::Pause, "{path}");
            assert_eq!(host.reply.as_ref().unwrap().status, 403, "{path}");
            assert_eq!(host.reply_json()["error"]["code"], "operation_not_allowed");
        }
        let mut host = FakeHost::request("POST", path).with_models("*, llama3*");
        assert_eq!(headers_only(&mut host, &config), Action::Continue, "{path}");
    }
    // Read-only endpoints the filter answers or filters stay open to everyone.
    let mut host = FakeHost::request("GET", "/api/version").with_models("llama3*");
    assert_eq!(headers_only(&mut host, &config), Action::Continue);
}

#[test]
fn a_clients_backend_header_is_dropped_in_single_upstream_mode() {
    let mut host = FakeHost::request("GET", "/v1/models").with_models("*");
    host.headers
        .push((metadata::HEADER_BACKEND.into(), b"hosted".to_vec()));
    headers_only(&mut host, &Config::default());
    assert_eq!(host.header(metadata::HEADER_BACKEND), None);
}

#[test]
fn ollama_runtime_options_are_dropped_unless_allowed() {
    let body =
        r#"{"model":"llama3.1:8b","keep_alive":-1,"options":{"num_ctx":262144,"temperature":0}}"#;
    let mut host = FakeHost::request("POST", "/api/chat").with_models("*");
    let config = Config::from_json(br#"{"upstream":"ollama"}"#).unwrap();
    let (_, action) = send(&mut host, &config, body, None);
    assert_eq!(action, Action::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"model":"llama3.1:8b","options":{"temperature":0}})
    );
    assert_eq!(
        host.header("content-length").unwrap(),
        host.request_body.len().to_string()
    );
    let config =
        Config::from_json(br#"{"upstream":"ollama","allow_runtime_options":true}"#).unwrap();
    let mut host = FakeHost::request("POST", "/api/chat").with_models("*");
    send(&mut host, &config, body, None);
    assert_eq!(host.request_body, body.as_bytes());
}

#[test]
fn huge_max_tokens_reserve_the_largest_count_envoy_carries() {
    let config = Config::default();
    for n in ["2147483648", "4294967296", "9223372036854775807"] {
        let body = format!(r#"{{"model":"m","max_tokens":{n},"n":8,"messages":[]}}"#);
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (_, action) = send(&mut host, &config, &body, None);
        assert_eq!(action, Action::Continue, "{n}");
        assert_eq!(host.state["tollgate_req"], COUNT_MAX.to_string(), "{n}");
    }
    for n in ["1e11", "-1", "1.5", "\"100\""] {
        let body = format!(r#"{{"model":"m","max_tokens":{n},"messages":[]}}"#);
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (_, action) = send(&mut host, &config, &body, None);
        assert_eq!(action, Action::Pause, "{n}");
        assert_eq!(host.reply.as_ref().unwrap().status, 400, "{n}");
        assert!(!host.state.contains_key("tollgate_req"));
    }
}

#[test]
fn an_upstream_error_on_a_path_the_filter_does_not_read_is_rewritten() {
    let config = Config::default();
    let mut host = FakeHost::request("GET", "/v1/models/llama3.1:8b").with_models("*");
    let mut s = Exchange::default();
    assert_eq!(
        s.on_request_headers(&mut host, &config, true, &Served::default()),
        Action::Continue
    );
    let out = respond(
        &mut host,
        &mut s,
        "404",
        &[br#"{"error":"not found"}"#],
        true,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["request_id"], "rid-42");
    // A success passes untouched.
    let mut host = FakeHost::request("GET", "/v1/models/llama3.1:8b").with_models("*");
    let mut s = Exchange::default();
    s.on_request_headers(&mut host, &config, true, &Served::default());
    let out = respond(&mut host, &mut s, "200", &[br#"{"id":"x"}"#], true);
    assert_eq!(out, br#"{"id":"x"}"#);
}

#[test]
fn a_translation_to_anthropic_reserves_the_max_tokens_it_writes() {
    let config =
        Config::from_json(br#"{"upstream":"anthropic","anthropic_max_tokens":5000}"#).unwrap();
    let body = r#"{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (_, action) = send(&mut host, &config, body, None);
    assert_eq!(action, Action::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["max_tokens"], 5000);
    let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
    assert!((5000..5100).contains(&reserved), "{reserved}");
}

#[test]
fn an_upstream_error_to_a_model_details_request_is_rewritten() {
    let config = Config::from_json(br#"{"upstream":"ollama"}"#).unwrap();
    let mut host = FakeHost::request("POST", "/api/show").with_models("*");
    let (mut s, action) = send(&mut host, &config, r#"{"model":"llama3.1:8b"}"#, None);
    assert_eq!(action, Action::Continue);
    let raw = br#"{"error":"model 'llama3.1:8b' not found at /srv/ollama/models"}"#;
    let out = respond(&mut host, &mut s, "500", &[raw], true);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["code"], "upstream_error");
    assert_eq!(v["error"]["request_id"], "rid-42");
    assert!(!String::from_utf8_lossy(&out).contains("/srv"));
}

#[test]
fn an_upstream_error_carries_the_request_id_read_with_the_request() {
    // Envoy gives the response callbacks no `request.id`.
    let config = Config::default();
    let mut host = FakeHost::request("GET", "/v1/models/llama3.1:8b").with_models("*");
    let mut s = Exchange::default();
    s.on_request_headers(&mut host, &config, true, &Served::default());
    host.request_id = None;
    let out = respond(
        &mut host,
        &mut s,
        "404",
        &[br#"{"error":"not found"}"#],
        true,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["request_id"], "rid-42");
}

#[test]
fn a_model_spelt_as_ollama_resolves_it_is_priced_and_allowed_as_that_model() {
    // Ollama runs all of these as llama3.1:8b: pricing them at the cheaper default would
    // let a USD budget overshoot.
    let config = priced(true);
    let cost = |model: &str| {
        let body = format!(r#"{{"model":"{model}","max_tokens":1000,"messages":[]}}"#);
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("llama3*");
        let (_, action) = send(&mut host, &config, &body, None);
        assert_eq!(action, Action::Continue, "{model}");
        host.state["tollgate_cost_req"].clone()
    };
    let expected = cost("llama3.1:8b");
    for alike in [
        "LLAMA3.1:8B",
        "registry.ollama.ai/library/llama3.1:8b",
        "library/Llama3.1:8b",
    ] {
        assert_eq!(cost(alike), expected, "{alike}");
    }
    let served = ModelSet::from_names(["llama3.1:8b"]);
    assert!(served.contains("registry.ollama.ai/library/LLAMA3.1:8B"));
    assert!(!served.contains("llama3.1:70b"));
}

#[test]
fn a_metered_callers_unbounded_request_is_bounded_by_its_reservation() {
    let metered = |method: &str, path: &str| {
        with_metadata(FakeHost::request(method, path).with_models("*"), "key_tpm")
    };
    // Ollama native: -1, -2, 0 or nothing means "until the context is full".
    for options in [
        r#","options":{"num_predict":-2}"#,
        r#","options":{"num_predict":0}"#,
        "",
    ] {
        let config = Config::default();
        let body = format!(r#"{{"model":"llama3.1:8b","messages":[]{options}}}"#);
        let mut host = metered("POST", "/api/chat");
        let (_, action) = send(&mut host, &config, &body, None);
        assert_eq!(action, Action::Continue, "{options}");
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["options"]["num_predict"], 1024, "{options}");
    }
    // OpenAI-style chat passed through, and chat translated for Ollama.
    for config in [
        Config::default(),
        Config::from_json(br#"{"upstream":"ollama"}"#).unwrap(),
    ] {
        let mut host = metered("POST", "/v1/chat/completions");
        send(&mut host, &config, r#"{"model":"m","messages":[]}"#, None);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        let bound = &sent["max_tokens"];
        let bound = if bound.is_null() {
            &sent["options"]["num_predict"]
        } else {
            bound
        };
        assert_eq!(*bound, 1024, "{sent}");
    }
    // A caller without limits, or a bounded request, is sent as it came.
    let body = r#"{"model":"m","messages":[]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    send(&mut host, &Config::default(), body, None);
    assert_eq!(host.request_body, body.as_bytes());
    let body = r#"{"model":"m","messages":[],"max_tokens":5}"#;
    let mut host = metered("POST", "/v1/chat/completions");
    send(&mut host, &Config::default(), body, None);
    assert_eq!(host.request_body, body.as_bytes());
    // Embeddings generate nothing.
    let body = r#"{"model":"m","input":"x"}"#;
    let mut host = metered("POST", "/v1/embeddings");
    send(&mut host, &Config::default(), body, None);
    assert_eq!(host.request_body, body.as_bytes());
}

#[test]
fn priced_model_reserves_cost_and_settles_it_from_the_reported_usage() {
    let config = priced(false);
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    // A prompt estimate of 100 tokens (300 letters and the JSON around them), plus
    // 1 000 000 completion tokens.
    let body = format!(
        r#"{{"model":"llama3.1:8b","stream":true,"max_tokens":1000000,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(300)
    );
    assert_eq!(request_head::prompt_estimate(body.as_bytes()), 100);
    let (mut s, _) = send(&mut host, &config, &body, None);
    // 100 × 10 000 + 1 000 000 × 30 000 micro-units: 30 001 units.
    assert_eq!(host.state["tollgate_cost_req"], "30001");
    let lines: [&[u8]; 1] = [
        br#"{"model":"llama3.1:8b","created_at":"2024-07-23T10:00:01Z","message":{"role":"assistant","content":"hi"},"done":true,"prompt_eval_count":3,"eval_count":2}
"#,
    ];
    respond(&mut host, &mut s, "200", &lines, true);
    s.on_log(&mut host);
    // 3 × 10 000 + 2 × 30 000 = 90 000 micro-units: rounded up to 1 unit, never free.
    assert_eq!(host.state["tollgate_cost"], "1");
    assert_eq!(host.state["tollgate_cost_extra"], "0");
    assert_eq!(host.state["tollgate_cost_refund"], "30000");
    assert_eq!(host.state["tollgate_tokens"], "5");
}

#[test]
fn unreported_usage_costs_the_reserved_amount_and_a_failed_upstream_nothing() {
    let config = priced(false);
    let body = r#"{"model":"llama3.1:8b","max_tokens":10,"messages":[]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &config, body, None);
    let reserved = host.state["tollgate_cost_req"].clone();
    respond(&mut host, &mut s, "200", &[b"{}"], true);
    s.on_log(&mut host);
    assert_eq!(host.state["tollgate_cost"], reserved);
    assert_eq!(host.state["tollgate_cost_refund"], "0");

    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &config, body, None);
    host.properties.insert(
        "response/code_details".into(),
        b"upstream_reset_before_response_started{connection_failure}".to_vec(),
    );
    s.on_log(&mut host);
    assert_eq!(host.state["tollgate_cost"], "0");
    assert_eq!(host.state["tollgate_cost_refund"], reserved);
}

#[test]
fn unpriced_model_is_refused_only_under_a_usd_budget_and_a_default_prices_it() {
    let body = r#"{"model":"qwen2:0.5b","messages":[]}"#;
    // No USD budget: passes, with no cost state (no USD counter to feed).
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    send(&mut host, &priced(false), body, None);
    assert!(host.reply.is_none());
    assert!(!host.state.contains_key("tollgate_cost_req"));
    // A USD budget and no price: refused before the upstream, fail closed.
    for config in [priced(false), ollama()] {
        let mut host =
            with_usd_budget(FakeHost::request("POST", "/v1/chat/completions").with_models("*"));
        let (_, action) = send(&mut host, &config, body, None);
        assert_eq!(action, Action::Pause);
        assert_eq!(host.reply.as_ref().unwrap().status, 403);
        assert_eq!(host.reply_json()["error"]["code"], "model_not_priced");
        assert_eq!(
            host.reply_header("x-tollgate-error"),
            Some("model_not_priced")
        );
    }
    // The default price covers it: 1024 default completion tokens at $4 = 4096 + the
    // prompt estimate at $2, rounded up.
    let mut host =
        with_usd_budget(FakeHost::request("POST", "/v1/chat/completions").with_models("*"));
    send(&mut host, &priced(true), body, None);
    assert!(host.reply.is_none());
    let prompt = body.len() as u64 / 4;
    let want = (1024 * 40_000 + prompt * 20_000).div_ceil(1_000_000);
    assert_eq!(host.state["tollgate_cost_req"], want.to_string());
}

#[test]
fn upstream_errors_are_sanitised_and_auth_failures_become_502() {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &Config::default(), body, None);
    let out = respond(
        &mut host,
        &mut s,
        "500",
        &[b"Traceback at /srv/internal/host-7: boom"],
        true,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["request_id"], "rid-42");
    assert!(
        !String::from_utf8_lossy(&out).contains("/srv/internal"),
        "upstream internals leaked"
    );

    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &Config::default(), body, None);
    let out = respond(
        &mut host,
        &mut s,
        "401",
        &[br#"{"error":{"message":"Incorrect API key provided: sk-abc***"}}"#],
        true,
    );
    assert_eq!(host.response_header_value(":status"), Some("502"));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["error"]["code"], "upstream_auth_failed");
    assert!(!String::from_utf8_lossy(&out).contains("sk-abc"));
}

#[test]
fn model_listings_are_filtered_to_the_callers_models() {
    let mut host = FakeHost::request("GET", "/v1/models").with_models("llama3*");
    let mut s = Exchange::default();
    assert_eq!(
        s.on_request_headers(&mut host, &ollama(), true, &Served::default()),
        Action::Continue
    );
    assert_eq!(host.header(":path").as_deref(), Some("/api/tags"));
    let tags: &[u8] = br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b","modified_at":"2024-07-23T10:00:00Z","size":1,"digest":"a","details":{}},{"name":"qwen2:0.5b","model":"qwen2:0.5b","modified_at":"2024-07-23T10:00:00Z","size":1,"digest":"b","details":{}}]}"#;
    let out = respond(&mut host, &mut s, "200", &[&tags[..40], &tags[40..]], true);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama3.1:8b"]);
}

fn routed() -> Config {
    Config::from_json(
        br#"{"routing":{"backends":{
               "local":{"upstream":"ollama","cluster":"ollama_pool"},
               "hosted":{"upstream":"openai","cluster":"hosted","discovery":false}},
             "models":[{"match":"llama3*","backend":"local"},
                       {"match":"gpt-4o-mini","backend":"hosted","upstream_model":"gpt-4o-mini-2024-07-18"}],
             "aliases":{"chat-default":"llama3.1:8b","chat-hosted":"gpt-4o-mini"},
             "default_backend":"local"}}"#,
    )
    .unwrap()
}

fn local_served() -> Served {
    let mut s = Served::default();
    s.insert(
        "local",
        ModelSet::from_names(["llama3.1:8b", "llama3.2:1b"]),
    );
    s
}

fn send_routed(host: &mut FakeHost, body: &str) -> Action {
    let config = routed();
    let served = local_served();
    let mut s = Exchange::default();
    host.request_body = body.as_bytes().to_vec();
    assert_eq!(
        s.on_request_headers(host, &config, false, &served),
        Action::Pause
    );
    s.on_request_body(host, &config, body.len(), true, &served)
}

#[test]
fn routed_alias_names_the_backend_translates_for_it_and_drops_a_spoofed_header() {
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("chat-*,llama3*");
    host.headers
        .push(("x-tollgate-backend".into(), b"hosted".to_vec()));
    let body = r#"{"model":"chat-default","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(send_routed(&mut host, body), Action::Continue);
    assert!(host.reply.is_none());
    assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));
    assert_eq!(host.header(":path").as_deref(), Some("/api/chat"));
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["model"], "llama3.1:8b");
    assert_eq!(host.state["tollgate_model"], "llama3.1:8b");

    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let body = r#"{"model":"chat-hosted","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(send_routed(&mut host, body), Action::Continue);
    assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("hosted"));
    assert_eq!(
        host.header(":path").as_deref(),
        Some("/v1/chat/completions"),
        "an OpenAI upstream keeps the path"
    );
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(
        host.header("content-length"),
        Some(host.request_body.len().to_string())
    );
}

#[test]
fn routed_refusals_name_no_backend() {
    let cases = [
        (
            "chat-*",
            r#"{"model":"chat-default","messages":[]}"#,
            403,
            "model_not_allowed",
        ),
        (
            "*",
            r#"{"model":"mistral","messages":[]}"#,
            404,
            "model_not_found",
        ),
        (
            "*",
            r#"{"model":"llama3.3:70b","messages":[]}"#,
            404,
            "model_not_found",
        ),
        ("*", r#"{"messages":[]}"#, 400, "missing_model"),
        ("*", "{oops", 400, "invalid_json"),
        (
            "*",
            r#"{"model":"chat-hosted","prompt":"x","path":"/api/generate"}"#,
            404,
            "unsupported_endpoint",
        ),
    ];
    for (allow, body, status, code) in cases {
        let path = if body.contains("/api/generate") {
            "/api/generate"
        } else {
            "/v1/chat/completions"
        };
        let mut host = FakeHost::request("POST", path).with_models(allow);
        host.headers
            .push(("x-tollgate-backend".into(), b"hosted".to_vec()));
        assert_eq!(send_routed(&mut host, body), Action::Pause, "{body}");
        assert_eq!(host.reply.as_ref().unwrap().status, status, "{body}");
        assert_eq!(host.reply_json()["error"]["code"], code, "{body}");
        assert_eq!(host.header("x-tollgate-backend"), None, "{body}");
    }
}

#[test]
fn routed_listing_is_answered_from_discovery_and_the_allowlist() {
    for (path, field, key) in [
        ("/v1/models", "data", "id"),
        ("/api/tags", "models", "name"),
    ] {
        let mut host = FakeHost::request("GET", path).with_models("chat-default,llama3*");
        let mut s = Exchange::default();
        let action = s.on_request_headers(&mut host, &routed(), true, &local_served());
        assert_eq!(action, Action::Pause);
        let reply = host.reply.as_ref().unwrap();
        assert_eq!(reply.status, 200);
        let v = host.reply_json();
        let names: Vec<&str> = v[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[key].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["chat-default", "llama3.1:8b", "llama3.2:1b"],
            "{path}"
        );
    }
}

#[test]
fn routed_requests_without_a_model_go_to_the_default_backend_or_get_404() {
    let mut host = FakeHost::request("GET", "/api/version").with_models("*");
    let mut s = Exchange::default();
    let action = s.on_request_headers(&mut host, &routed(), true, &local_served());
    assert_eq!(action, Action::Continue);
    assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));

    let config =
        Config::from_json(br#"{"routing":{"backends":{"a":{"upstream":"ollama","cluster":"a"}}}}"#)
            .unwrap();
    let mut host = FakeHost::request("GET", "/api/version").with_models("*");
    let action =
        Exchange::default().on_request_headers(&mut host, &config, true, &Served::default());
    assert_eq!(action, Action::Pause);
    assert_eq!(host.reply.as_ref().unwrap().status, 404);
}

#[test]
fn keys_differing_only_in_case_are_refused_before_the_upstream() {
    // Go's encoding/json (Ollama, also its OpenAI-compatible API) matches keys ignoring
    // case and keeps the last one: it would run the second model, or stream unlike planned.
    for (path, body) in [
        (
            "/api/chat",
            r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b","messages":[]}"#,
        ),
        (
            "/api/chat",
            r#"{"model":"qwen2:0.5b","MODEL":"llama3.1:8b","messages":[]}"#,
        ),
        (
            "/api/chat",
            r#"{"model":"qwen2:0.5b","mod\u0045l":"llama3.1:8b"}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"qwen2:0.5b","stream":false,"Stream":true}"#,
        ),
        (
            "/api/generate",
            r#"{"model":"qwen2:0.5b","options":{"num_predict":1,"Num_Predict":-1}}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b","messages":[]}"#,
        ),
    ] {
        let mut host = FakeHost::request("POST", path).with_models("qwen2*");
        let (_, action) = send(&mut host, &ollama(), body, None);
        assert_eq!(action, Action::Pause, "{body}");
        assert_eq!(host.reply.as_ref().unwrap().status, 400, "{body}");
        assert_eq!(
            host.reply_json()["error"]["code"],
            "invalid_request",
            "{body}"
        );
    }
    // Look-alike keys deeper down (a tool schema's properties) are the client's business.
    let body = r#"{"model":"qwen2:0.5b","messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"Name":{},"name":{}}}}}]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("qwen2*");
    let (_, action) = send(&mut host, &ollama(), body, None);
    assert_eq!(action, Action::Continue);
    assert!(host.reply.is_none());
}

#[test]
fn routed_keys_differing_only_in_case_are_refused() {
    let mut host = FakeHost::request("POST", "/api/chat").with_models("llama3*");
    let body = r#"{"model":"llama3.1:8b","Model":"qwen2:0.5b","messages":[]}"#;
    assert_eq!(send_routed(&mut host, body), Action::Pause);
    assert_eq!(host.reply.as_ref().unwrap().status, 400);
    assert_eq!(host.header("x-tollgate-backend"), None);
}

#[test]
fn a_body_ended_by_trailers_is_checked_and_reserved_like_any_other() {
    let allowed = r#"{"model":"qwen2:0.5b","max_tokens":7,"messages":[]}"#;
    let denied = r#"{"model":"llama3.1:8b","messages":[]}"#;
    for (config, served) in [
        (Config::default(), Served::default()),
        (routed(), local_served()),
    ] {
        for (body, want) in [(allowed, None), (denied, Some(403))] {
            let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("qwen2*");
            host.request_body = body.as_bytes().to_vec();
            let mut s = Exchange::default();
            assert_eq!(
                s.on_request_headers(&mut host, &config, false, &served),
                Action::Pause
            );
            assert_eq!(
                s.on_request_body(&mut host, &config, body.len(), false, &served),
                Action::Pause
            );
            let action = s.on_request_trailers(&mut host, &config, &served);
            match want {
                Some(status) => {
                    assert_eq!(action, Action::Pause, "{body}");
                    assert_eq!(host.reply.as_ref().unwrap().status, status, "{body}");
                }
                None if config.routing.is_some() => {
                    // qwen2 has no route in the routing table: refused, never forwarded.
                    assert_eq!(action, Action::Pause, "{body}");
                    assert_eq!(host.reply.as_ref().unwrap().status, 404, "{body}");
                }
                None => {
                    assert_eq!(action, Action::Continue, "{body}");
                    assert!(host.reply.is_none());
                    assert!(host.state.contains_key("tollgate_req"), "no reservation");
                }
            }
        }
    }
    // Trailers after a finished body, or on a request without one, change nothing.
    let mut host = FakeHost::request("GET", "/api/version").with_models("*");
    let mut s = Exchange::default();
    s.on_request_headers(&mut host, &Config::default(), false, &Served::default());
    assert_eq!(
        s.on_request_trailers(&mut host, &Config::default(), &Served::default()),
        Action::Continue
    );
}

#[test]
fn model_details_and_running_models_are_limited_to_the_callers_models() {
    let show = |config: &Config, served: &Served, body: &str| {
        let mut host = FakeHost::request("POST", "/api/show").with_models("qwen2*,chat-*");
        host.request_body = body.as_bytes().to_vec();
        let mut s = Exchange::default();
        assert_eq!(
            s.on_request_headers(&mut host, config, false, served),
            Action::Pause
        );
        let action = s.on_request_body(&mut host, config, body.len(), true, served);
        (host, action)
    };
    let none = Served::default();
    for body in [r#"{"model":"llama3.1:8b"}"#, r#"{"name":"llama3.1:8b"}"#] {
        let (host, action) = show(&ollama(), &none, body);
        assert_eq!(action, Action::Pause, "{body}");
        assert_eq!(host.reply.as_ref().unwrap().status, 403, "{body}");
    }
    let (host, action) = show(&ollama(), &none, r#"{"model":"qwen2:0.5b"}"#);
    assert_eq!(action, Action::Continue);
    assert!(host.reply.is_none());
    let (host, _) = show(&ollama(), &none, "{}");
    assert_eq!(host.reply_json()["error"]["code"], "missing_model");

    // Routed: to the backend serving it, under its upstream name; never to the default.
    let mut served = local_served();
    served.insert("local", ModelSet::from_names(["llama3.1:8b", "qwen2:0.5b"]));
    let routed = Config::from_json(
        br#"{"routing":{"backends":{
               "local":{"upstream":"ollama","cluster":"ollama_pool"},
               "hosted":{"upstream":"openai","cluster":"hosted","discovery":false}},
             "models":[{"match":"qwen2*","backend":"local"},{"match":"llama3*","backend":"local"},
                       {"match":"gpt-4o-mini","backend":"hosted"}],
             "aliases":{"chat-small":"qwen2:0.5b","chat-hosted":"gpt-4o-mini"},
             "default_backend":"local"}}"#,
    )
    .unwrap();
    let (host, action) = show(&routed, &served, r#"{"model":"chat-small"}"#);
    assert_eq!(action, Action::Continue);
    assert_eq!(host.header("x-tollgate-backend").as_deref(), Some("local"));
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["model"], "qwen2:0.5b");
    let (host, _) = show(&routed, &served, r#"{"model":"llama3.1:8b"}"#);
    assert_eq!(host.reply.as_ref().unwrap().status, 403);
    assert_eq!(host.header("x-tollgate-backend"), None);

    // One model's entry: 404 for a model the key may not use, as for an unknown one.
    for (config, served) in [(ollama(), &none), (routed, &served)] {
        for (path, status) in [
            ("/v1/models/llama3.1%3A8b", Some(404)),
            ("/v1/models/qwen2%2F..%2Fllama3.1:8b", Some(400)),
            ("/v1/models/qwen2%zz", Some(400)),
            ("/v1/models/llama3.1:8b", Some(404)),
            ("/v1/models/qwen2:0.5b", None),
        ] {
            let mut host = FakeHost::request("GET", path).with_models("qwen2*");
            let mut s = Exchange::default();
            let action = s.on_request_headers(&mut host, &config, true, served);
            let got = host.reply.as_ref().map(|r| r.status);
            match (status, config.routing.is_some()) {
                (Some(want), _) => assert_eq!((action, got), (Action::Pause, Some(want))),
                (None, true) => {
                    assert_eq!((action, got), (Action::Pause, Some(200)));
                    assert_eq!(host.reply_json()["id"], "qwen2:0.5b");
                }
                (None, false) => assert_eq!((action, got), (Action::Continue, None), "{path}"),
            }
        }

        // Running models: filtered like a listing.
        let mut host = FakeHost::request("GET", "/api/ps").with_models("qwen2*");
        let mut s = Exchange::default();
        assert_eq!(
            s.on_request_headers(&mut host, &config, true, served),
            Action::Continue
        );
        let ps: &[u8] = br#"{"models":[{"name":"llama3.1:8b","model":"llama3.1:8b"},{"name":"qwen2:0.5b","model":"qwen2:0.5b"}]}"#;
        let out = respond(&mut host, &mut s, "200", &[&ps[..30], &ps[30..]], true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["models"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["models"][0]["name"], "qwen2:0.5b");
    }
}

#[test]
fn an_anthropic_stream_cut_before_its_final_usage_costs_the_reservation() {
    // message_start carries input tokens and an output count of 1; only message_delta
    // says what was generated. A client that hangs up in between must not get the rest
    // of the reservation refunded.
    let config = Config::from_json(br#"{"upstream":"anthropic"}"#).unwrap();
    let events: &[&[u8]] = &[
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
        b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a long answer\"}}\n\n",
    ];
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"claude-x","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "/v1/messages",
            r#"{"model":"claude-x","stream":true,"max_tokens":500,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ] {
        let mut host = FakeHost::request("POST", path).with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        let reserved = host.state["tollgate_req"].clone();
        host.response_headers = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
        ];
        host.properties
            .insert("response/code_details".into(), b"via_upstream".to_vec());
        s.on_response_headers(&mut host);
        for e in events {
            host.response_chunk = e.to_vec();
            s.on_response_body(&mut host, e.len(), false);
        }
        s.on_log(&mut host);
        assert_eq!(host.state["tollgate_tokens"], reserved, "{path}");
        assert_eq!(host.state["tollgate_tokens_refund"], "0", "{path}");
    }
}

#[test]
fn a_stream_cut_before_its_usage_costs_at_least_what_went_by() {
    // No max_tokens: the reservation is the default; the client hangs up after many
    // chunks, before the usage chunk. It pays for the chunks it got, not the default.
    let config = Config::from_json(br#"{"default_reservation_tokens":10}"#).unwrap();
    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &config, body, None);
    let reserved: u64 = host.state["tollgate_req"].parse().unwrap();
    host.response_headers = vec![(":status".into(), "200".into())];
    host.properties
        .insert("response/code_details".into(), b"via_upstream".to_vec());
    s.on_response_headers(&mut host);
    let chunk = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
    for _ in 0..500 {
        host.response_chunk = chunk.to_vec();
        s.on_response_body(&mut host, chunk.len(), false);
    }
    s.on_log(&mut host);
    let used: u64 = host.state["tollgate_tokens"].parse().unwrap();
    assert!(
        used >= 500 - STREAM_EVENTS_WITHOUT_TOKENS && used > reserved,
        "{used}"
    );
    assert_eq!(host.state["tollgate_tokens_refund"], "0");
    assert_eq!(
        host.state["tollgate_tokens_extra"],
        (used - reserved).to_string()
    );

    // A short cut stream still costs its reservation.
    let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
    let (mut s, _) = send(&mut host, &config, body, None);
    host.response_headers = vec![(":status".into(), "200".into())];
    host.properties
        .insert("response/code_details".into(), b"via_upstream".to_vec());
    s.on_response_headers(&mut host);
    host.response_chunk = chunk.to_vec();
    s.on_response_body(&mut host, chunk.len(), false);
    s.on_log(&mut host);
    assert_eq!(host.state["tollgate_tokens"], host.state["tollgate_req"]);
}

#[test]
fn a_client_that_hangs_up_before_the_answer_keeps_its_reservation_spent() {
    // The model server works on a non-streamed request until it answers; a client that
    // disconnects just before must not get the whole reservation back (free generation
    // on a hosted provider's bill). Only failures before the server got the request
    // refund it.
    let config = priced(false);
    let body = r#"{"model":"llama3.1:8b","max_tokens":4000,"messages":[]}"#;
    for (details, charged) in [
        ("downstream_remote_disconnect", true),
        ("upstream_response_timeout", true),
        ("upstream_reset_before_response_started{remote_reset}", true),
        (
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
            false,
        ),
        ("no_healthy_upstream", false),
        ("upstream_reset_before_response_started{overflow}", false),
    ] {
        let mut host = FakeHost::request("POST", "/v1/chat/completions").with_models("*");
        let (mut s, _) = send(&mut host, &config, body, None);
        host.properties
            .insert("response/code_details".into(), details.as_bytes().to_vec());
        s.on_log(&mut host);
        let (reserved, cost) = (&host.state["tollgate_req"], &host.state["tollgate_cost_req"]);
        if charged {
            assert_eq!(&host.state["tollgate_tokens"], reserved, "{details}");
            assert_eq!(&host.state["tollgate_cost"], cost, "{details}");
            assert_eq!(host.state["tollgate_tokens_refund"], "0", "{details}");
        } else {
            assert_eq!(host.state["tollgate_tokens"], "0", "{details}");
            assert_eq!(host.state["tollgate_cost"], "0", "{details}");
        }
    }
}
