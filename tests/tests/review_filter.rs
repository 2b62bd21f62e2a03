//! The filter against a key holder who disguises a request: a model named twice under keys
//! that differ in case, details of a model the key may not use, and an HTTP/2 body that ends
//! in trailers. None may reach the model server unchecked or uncounted. One stack, the mock as an OpenAI-style upstream.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tollgate_e2e::http;
use tollgate_e2e::stack::{Stack, StackOptions};

/// A key that may use `qwen2*` only.
fn start() -> (Stack, String) {
    let stack = Stack::start(StackOptions {
        filter_config: "{}".into(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (_, key) = stack.create_key("review", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "review",
            "--models",
            "qwen2*",
            "--operations",
            "*",
        ])
        .unwrap();
    (stack, key)
}

/// POSTs `body` over HTTP/2 (prior knowledge), ending the stream with a trailer; the status.
fn h2_post_with_trailers(port: u16, path: &str, key: &str, body: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-trailer", "1".parse().unwrap());
        let frames = vec![
            Frame::data(Bytes::from(body.to_owned())),
            Frame::trailers(trailers),
        ];
        let req = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Frames(frames.into_iter()))
            .unwrap();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), send.send_request(req))
            .await
            .expect("no answer in 10 s")
            .unwrap();
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    })
}

/// A request body of ready frames (data, then trailers).
struct Frames(std::vec::IntoIter<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.next().map(Ok))
    }
}

#[test]
fn disguised_requests_never_reach_the_model_server_unchecked() {
    let (stack, key) = start();
    let auth = format!("Bearer {key}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let post_to = |path: &str, body: &str| {
        http::request(stack.envoy_port, "POST", path, &headers, body.as_bytes()).unwrap()
    };
    let post = |body: &str| post_to("/v1/chat/completions", body);
    let ok = post(r#"{"model":"qwen2:0.5b","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(ok.status, 200, "{}", ok.text());
    stack.clear_mock_requests().unwrap();

    // A second model under a key in another case: Go servers (Ollama) would run it.
    let r = post(r#"{"model":"qwen2:0.5b","Model":"llama3.1:8b","messages":[]}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code(), "invalid_request");

    // Details of a model the key may not use: as if it did not exist, before the upstream.
    let r = post_to("/api/show", r#"{"model":"llama3.1:8b"}"#);
    assert_eq!(r.status, 403, "{}", r.text());
    let r = http::get(stack.envoy_port, "/v1/models/llama3.1:8b", &headers).unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.error_code(), "model_not_found");

    // HTTP/2 with trailers: the body never ends with end_of_stream, the trailers do.
    let body = r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}]}"#;
    let status = h2_post_with_trailers(stack.envoy_port, "/v1/chat/completions", &key, body);
    assert_eq!(status, 403, "{}", stack.logs());
    let seen = stack.mock_requests().unwrap();
    assert!(
        seen.iter().all(|r| r["method"] != "POST"),
        "reached the model server: {seen:?}"
    );

    let body = r#"{"model":"qwen2:0.5b","messages":[{"role":"user","content":"hi"}]}"#;
    let status = h2_post_with_trailers(stack.envoy_port, "/v1/chat/completions", &key, body);
    assert_eq!(status, 200, "an allowed model is served with trailers too");
    let seen = stack.mock_requests().unwrap();
    let posts: Vec<_> = seen.iter().filter(|r| r["method"] == "POST").collect();
    assert_eq!(posts.len(), 1, "{seen:?}");
}

/// Sends a raw HTTP/1.1 request; the whole response text.
fn raw_http1(port: u16, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_chunked_body_split_inside_the_model_is_translated_and_checked() {
    let stack = Stack::start(StackOptions {
        filter_config: r#"{"upstream":"ollama"}"#.into(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (_, key) = stack.create_key("review", None).unwrap();
    stack
        .admin(&["policy", "set", "--tenant", "review", "--models", "qwen2*"])
        .unwrap();
    let send = |model: &str| {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let (a, b) = body.split_at(14);
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nx-trailer: 1\r\n\r\n",
            a.len(),
            b.len()
        );
        raw_http1(stack.envoy_port, req.as_bytes())
    };
    let ok = send("qwen2:0.5b");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}\n{}", stack.logs());
    assert!(ok.contains("chat.completion"), "{ok}");
    let denied = send("llama3.1:8b");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let posts: Vec<_> = stack
        .mock_requests()
        .unwrap()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["path"], "/api/chat");
}

/// A mock model server on a free port: (process, port).
fn mock(dir: &std::path::Path, name: &str, models: &str) -> (tollgate_e2e::process::Proc, u16) {
    let mut cmd = std::process::Command::new(tollgate_e2e::paths::binary("mock-model-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--models", models]);
    let mut proc = tollgate_e2e::process::Proc::spawn(name, cmd, dir).unwrap();
    let addr = proc
        .wait_for_line("LISTENING ", std::time::Duration::from_secs(20))
        .unwrap();
    let port = addr.rsplit(':').next().unwrap().trim().parse().unwrap();
    (proc, port)
}

fn posts(port: u16) -> Vec<serde_json::Value> {
    match http::get(port, "/__mock/requests", &[]).unwrap().json() {
        serde_json::Value::Array(a) => a.into_iter().filter(|r| r["method"] == "POST").collect(),
        other => panic!("mock requests: {other}"),
    }
}

#[test]
fn routed_trailers_and_model_details_reach_the_models_backend_only_when_allowed() {
    use tollgate_e2e::routing_config::RoutingSpec;
    let dir = std::env::temp_dir().join(format!(
        "tollgate-review-{}-{}",
        std::process::id(),
        tollgate_e2e::process::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (_a, a) = mock(&dir, "ollama-a", "llama3.1:8b,qwen2:0.5b");
    let (_b, b) = mock(&dir, "ollama-b", "llama3.1:8b,qwen2:0.5b");
    let (_c, c) = mock(&dir, "hosted", "gpt-4o-mini");
    let host = |p: u16| ("127.0.0.1".to_string(), p);
    let spec = RoutingSpec {
        ollama_a: host(a),
        ollama_b: host(b),
        hosted: host(c),
        hosted_tls: false,
        hosted_key_env: "TOLLGATE_REVIEW_HOSTED_KEY".into(),
        health_interval_ms: 300,
        discovery_interval_ms: 300,
    };
    let stack = Stack::start(StackOptions {
        model: Some(host(a)),
        filter_config: spec.filter_config(),
        routing: Some(spec),
        envoy_env: vec![("TOLLGATE_REVIEW_HOSTED_KEY".into(), "sk-review".into())],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (_, key) = stack.create_key("review", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "review",
            "--models",
            "gpt-4o-mini,chat-hosted",
        ])
        .unwrap();
    let auth = format!("Bearer {key}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    // Until discovery knows the Ollama backends (a refusal then says 403, not 503).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = http::request(
            stack.envoy_port,
            "POST",
            "/api/show",
            &headers,
            br#"{"model":"qwen2:0.5b"}"#,
        )
        .unwrap();
        if r.status == 403 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let chat = |model: &str| {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    let status = h2_post_with_trailers(
        stack.envoy_port,
        "/v1/chat/completions",
        &key,
        &chat("llama3.1:8b"),
    );
    assert_eq!(status, 403);
    let status = h2_post_with_trailers(
        stack.envoy_port,
        "/v1/chat/completions",
        &key,
        &chat("chat-hosted"),
    );
    assert_eq!(status, 200, "{}", stack.logs());
    assert_eq!(posts(c).len(), 1, "the hosted backend got the request");
    assert!(
        posts(a).is_empty() && posts(b).is_empty(),
        "no Ollama host saw a request"
    );
}
