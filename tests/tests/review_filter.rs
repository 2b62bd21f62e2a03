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
