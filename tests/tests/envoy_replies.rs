//! Replies Envoy makes itself (protocol errors, a refused upgrade, no route, body and header
//! limits, timeouts, an overflowing or unreachable model server, a side service that is down)
//! carry Tollgate's JSON error shape, `x-tollgate-error`, and a request id equal to the
//! `x-request-id` header, while Tollgate's own replies pass unchanged (docs/API.md, "Replies
//! Envoy makes itself"). Raw bytes on a socket: a real client refuses to send most of these.
//! Over HTTP/2 Envoy's codec resets a stream it cannot parse instead of answering it; that
//! documented exception is asserted with hand-made frames.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use tollgate_e2e::http::Response;
use tollgate_e2e::paths;
use tollgate_e2e::process::Proc;
use tollgate_e2e::routing_config::RoutingSpec;
use tollgate_e2e::stack::{Stack, StackOptions};

const READ_TIMEOUT: Duration = Duration::from_secs(15);

fn start(opts: StackOptions) -> Stack {
    Stack::start(opts).unwrap_or_else(|e| panic!("stack did not start: {e}"))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// `content-length` of a response head, 0 when absent.
fn content_length(head: &str) -> usize {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Splits the first complete HTTP/1 response off `raw`; `None` while it is incomplete.
/// A 1xx head is skipped. `head_request`: the body is never sent (HEAD).
fn parse_response(raw: &[u8], head_request: bool) -> Option<Response> {
    let mut rest = raw;
    loop {
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        if (100..200).contains(&status) {
            rest = &rest[end + 4..];
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len = if head_request {
            0
        } else {
            content_length(&head)
        };
        let body = rest.get(end + 4..end + 4 + len)?.to_vec();
        return Some(Response {
            status,
            headers,
            body,
        });
    }
}

/// Writes `raw` on a new connection and reads one response. Envoy may answer and close
/// before it read everything, so a failed write is fine once the answer is in.
fn exchange(port: u16, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to Envoy");
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let write = s.write_all(raw);
    let head_request = raw.starts_with(b"HEAD ");
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(r) = parse_response(&got, head_request) {
            return r;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    panic!(
        "no complete response; write: {write:?}; got: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Tollgate's error shape: status, JSON content type, `error.code` (also in
/// `x-tollgate-error`), a type and message, and a request id equal to `x-request-id`.
fn assert_json_error(what: &str, r: &Response, status: u16, code: &str) -> Value {
    let ctx = format!("{what}: {} {:?} {}", r.status, r.headers, r.text());
    assert_eq!(r.status, status, "{ctx}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{ctx}");
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{ctx}");
    assert_eq!(r.header("x-tollgate-error"), Some(code), "{ctx}");
    for field in ["type", "message"] {
        assert!(
            v["error"][field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}: {ctx}"
        );
    }
    let rid = r.header("x-request-id").unwrap_or_default();
    assert!(!rid.is_empty(), "no x-request-id: {ctx}");
    assert_eq!(v["error"]["request_id"], rid, "{ctx}");
    v
}

fn chat_request(port: u16, key: &str, extra_headers: &str) -> Vec<u8> {
    let body = r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"hi"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        bearer(key),
        body.len()
    )
    .into_bytes()
}

/// A header block of `n` headers of 1000 bytes each.
fn big_headers(n: usize) -> String {
    (0..n)
        .map(|i| format!("x-h{i}: {}\r\n", "a".repeat(1000)))
        .collect()
}

#[test]
fn every_http1_protocol_error_and_refused_upgrade_is_json_with_the_request_id() {
    let stack = start(StackOptions::default());
    let port = stack.envoy_port;
    let long_url = format!("GET /v1/{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let long_head = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\n{}\r\n",
        big_headers(100)
    );
    let long_trailers = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
         2\r\n{{}}\r\n0\r\n{}\r\n",
        big_headers(100)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        // Paths Envoy's normaliser refuses before the filter ever sees them.
        ("NUL in the path", b"GET /api/pull%00 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(), 400, "invalid_path"),
        ("fragment in the path", b"GET /v1/models#x HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(), 400, "invalid_path"),
        // HTTP/1 the codec cannot parse.
        (
            "Content-Length with Transfer-Encoding",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "two Content-Lengths",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
            400,
            "bad_request",
        ),
        (
            "Content-Length not a number",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "malformed chunk",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "unknown Transfer-Encoding",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked, foo\r\n\r\n0\r\n\r\n".to_vec(),
            501,
            "not_implemented",
        ),
        (
            "Transfer-Encoding identity",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n\r\n".to_vec(),
            501,
            "not_implemented",
        ),
        ("HTTP/1.0 without Host", b"GET /v1/models HTTP/1.0\r\n\r\n".to_vec(), 426, "http_version_not_supported"),
        ("HTTP/1.1 without Host", b"GET /v1/models HTTP/1.1\r\n\r\n".to_vec(), 400, "bad_request"),
        ("Host with a space", b"GET /v1/models HTTP/1.1\r\nhost: a b\r\n\r\n".to_vec(), 400, "bad_request"),
        ("invalid header name", b"GET /v1/models HTTP/1.1\r\nhost: x\r\nba d: y\r\n\r\n".to_vec(), 400, "bad_request"),
        ("control byte in a header value", b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: a\x01b\r\n\r\n".to_vec(), 400, "bad_request"),
        ("NUL in a header value", b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n".to_vec(), 400, "bad_request"),
        ("header line without a colon", b"GET /v1/models HTTP/1.1\r\nhost: x\r\nfoo\r\n\r\n".to_vec(), 400, "bad_request"),
        ("invalid method", b"G@T /v1/models HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(), 400, "bad_request"),
        ("not HTTP at all", b"\x16\x03\x01 garbage\r\n\r\n".to_vec(), 400, "bad_request"),
        ("request target `*` on GET", b"GET * HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(), 400, "bad_request"),
        ("request target `*` on OPTIONS", b"OPTIONS * HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(), 404, "not_found"),
        ("over-long header block", long_head.into_bytes(), 431, "headers_too_large"),
        ("over-long URL", long_url.into_bytes(), 431, "headers_too_large"),
        ("over-long trailers", long_trailers.into_bytes(), 431, "headers_too_large"),
        // No upgrade is configured: a WebSocket handshake was an empty 403.
        (
            "WebSocket upgrade",
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
            403,
            "upgrade_not_supported",
        ),
        (
            "upgrade on a POST",
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
            403,
            "upgrade_not_supported",
        ),
    ];
    for (what, raw, status, code) in &cases {
        let r = exchange(port, raw);
        let v = assert_json_error(what, &r, *status, code);
        if *code == "bad_request" || *code == "not_implemented" {
            // Envoy's reason, for whoever reads the error.
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains('('), "{what}: {message}");
        }
    }

    // Refused before Envoy assigns an id: a client's own id is kept in header and body.
    let r = exchange(
        port,
        b"GET /api/pull%00 HTTP/1.1\r\nhost: x\r\nx-request-id: client-id-1\r\n\r\n",
    );
    let v = assert_json_error("client x-request-id", &r, 400, "invalid_path");
    assert_eq!(v["error"]["request_id"], "client-id-1");

    // Two requests refused the same way get different ids.
    let a = exchange(port, b"GET /api/pull%00 HTTP/1.1\r\nhost: x\r\n\r\n");
    let b = exchange(port, b"GET /api/pull%00 HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));

    // HEAD: the same status and headers, no body (HTTP forbids one).
    let r = exchange(port, b"HEAD /api/pull%00 HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-tollgate-error"), Some("invalid_path"));
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()));
    assert!(r.body.is_empty());

    // Tollgate's own replies pass unchanged: the authz 401 and the filter's 400.
    let r = exchange(
        port,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let v = assert_json_error("no key", &r, 401, "missing_api_key");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("API key")));
    let (_, key) = stack.create_key("acme", None).unwrap();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: 5\r\nconnection: close\r\n\r\n{{not}}",
        bearer(&key)
    );
    let r = exchange(port, raw.as_bytes());
    let v = assert_json_error("body not JSON", &r, 400, "invalid_json");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("request body is not valid JSON")),
        "{v}"
    );
    assert!(
        stack.mock_requests().unwrap().is_empty(),
        "nothing reached the model server"
    );
}

// ---- HTTP/2 (h2c prior knowledge) ----

/// One request over HTTP/2 with hyper; Envoy's listener speaks h2c when a connection
/// starts with the HTTP/2 preface.
fn h2_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let mut req = ::http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("h2 response");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("h2 body")
            .to_bytes()
            .to_vec();
        Response {
            status,
            headers,
            body,
        }
    })
}

/// What Envoy did with a hand-made HTTP/2 stream 1.
#[derive(Debug, PartialEq)]
enum H2Outcome {
    /// It answered with response headers.
    Answered,
    /// RST_STREAM on the stream, with this error code.
    Reset(u32),
    /// GOAWAY on the connection, with this error code.
    GoAway(u32),
    /// The connection closed without a frame about the stream.
    Closed,
    /// Nothing within the read timeout.
    Silent,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Literal header fields without indexing, new names, no Huffman: any bytes at all.
fn hpack_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_GOAWAY: u8 = 0x7;
const H2_CONTINUATION: u8 = 0x9;

/// Sends one GET as stream 1 with exactly these header fields (pseudo-headers included),
/// split into HEADERS and CONTINUATION frames of the default maximum size.
fn h2_raw(port: u16, fields: &[(&[u8], &[u8])]) -> H2Outcome {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, H2_SETTINGS, 0, 0, &[]);
    let block = hpack_block(fields);
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let end_headers = if i + 1 == chunks.len() { 0x4 } else { 0 };
        if i == 0 {
            // END_STREAM: a GET without a body.
            h2_frame(&mut out, H2_HEADERS, 0x1 | end_headers, 1, chunk);
        } else {
            h2_frame(&mut out, H2_CONTINUATION, end_headers, 1, chunk);
        }
    }
    if s.write_all(&out).is_err() {
        return H2Outcome::Closed;
    }
    let ended = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => H2Outcome::Silent,
        _ => H2Outcome::Closed,
    };
    loop {
        let mut head = [0u8; 9];
        if let Err(e) = s.read_exact(&mut head) {
            return ended(e);
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if let Err(e) = s.read_exact(&mut payload) {
            return ended(e);
        }
        let code_at = |i: usize| {
            payload
                .get(i..i + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            H2_SETTINGS if flags & 0x1 == 0 => {
                let mut ack = Vec::new();
                h2_frame(&mut ack, H2_SETTINGS, 0x1, 0, &[]);
                let _ = s.write_all(&ack);
            }
            H2_HEADERS if stream == 1 => return H2Outcome::Answered,
            H2_RST_STREAM if stream == 1 => return H2Outcome::Reset(code_at(0)),
            H2_GOAWAY => return H2Outcome::GoAway(code_at(4)),
            _ => {}
        }
    }
}

#[test]
fn over_h2c_envoy_replies_are_json_and_streams_the_codec_cannot_parse_are_reset() {
    let stack = start(StackOptions::default());
    let port = stack.envoy_port;

    // What Envoy refuses above the codec is answered in the JSON shape, as over HTTP/1.
    let r = h2_request(port, "GET", "/api/pull%00", &[]);
    assert_json_error("h2 NUL in the path", &r, 400, "invalid_path");
    let r = h2_request(
        port,
        "GET",
        "/api/pull%00",
        &[("x-request-id", "client-id-2")],
    );
    let v = assert_json_error("h2 client x-request-id", &r, 400, "invalid_path");
    assert_eq!(v["error"]["request_id"], "client-id-2");
    // Tollgate's own reply passes unchanged over HTTP/2 too.
    let r = h2_request(port, "GET", "/v1/models", &[]);
    assert_json_error("h2 no key", &r, 401, "missing_api_key");

    // The hand-made frames are sound: a valid stream is answered.
    let ok: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/v1/models"),
        (b":authority", b"x"),
    ];
    assert_eq!(h2_raw(port, &ok), H2Outcome::Answered);

    // Documented exception: what the HTTP/2 codec itself rejects gets no HTTP response at
    // all (no request exists to answer): the stream is reset or the connection closed,
    // with or without a GOAWAY.
    let mut bad_value = ok.clone();
    bad_value.push((b"x-a", b"a\x01b"));
    let mut bad_name = ok.clone();
    bad_name.push((b"X-Upper", b"b"));
    let mut connection_header = ok.clone();
    connection_header.push((b"connection", b"keep-alive"));
    let big = "a".repeat(70_000);
    let mut too_large = ok.clone();
    too_large.push((b"x-big", big.as_bytes()));
    for (what, fields) in [
        ("control byte in a value", bad_value),
        ("upper-case header name", bad_name),
        ("connection-specific header", connection_header),
        ("header block over the limit", too_large),
    ] {
        let outcome = h2_raw(port, &fields);
        assert!(
            matches!(
                outcome,
                H2Outcome::Reset(_) | H2Outcome::GoAway(_) | H2Outcome::Closed
            ),
            "{what}: {outcome:?}"
        );
    }
}

#[test]
fn a_client_x_tollgate_backend_is_stripped_at_the_edge_before_any_filter() {
    // Without the wasm filter (which removes the header too): the edge rule alone must do it.
    let stack = start(StackOptions {
        envoy_http_filters: Some(vec![
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.ratelimit",
        ]),
        ..Default::default()
    });
    let (_, key) = stack.create_key("acme", None).unwrap();
    let r = exchange(
        stack.envoy_port,
        &chat_request(
            stack.envoy_port,
            &key,
            "x-tollgate-backend: hosted\r\nX-Tollgate-Backend: other\r\nconnection: close\r\n",
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = stack.mock_requests().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let headers = seen[0]["headers"].as_object().expect("recorded headers");
    assert!(!headers.contains_key("x-tollgate-backend"), "{headers:?}");
}

// ---- limits, overflow, services down ----

/// Envoy's buffer filter first in the chain (bodies over 1 MiB: Envoy's own 413), and a
/// model cluster that admits no request at all (circuit breaker): every request that gets
/// past the checks overflows.
fn buffer_limit_and_model_cluster_overflow(yaml: &str) -> Result<String, String> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    let filters = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence_mut()
        .ok_or("no http filters")?;
    filters.insert(
        0,
        serde_yaml::from_str(
            r#"{name: envoy.filters.http.buffer, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer, max_request_bytes: 1048576}}"#,
        )
        .map_err(|e| e.to_string())?,
    );
    let clusters = v["static_resources"]["clusters"]
        .as_sequence_mut()
        .ok_or("no clusters")?;
    let model = clusters
        .iter_mut()
        .find(|c| c["name"] == "model")
        .ok_or("no model cluster")?;
    model["circuit_breakers"] = serde_yaml::from_str(
        "{thresholds: [{priority: DEFAULT, max_connections: 0, max_pending_requests: 0, max_requests: 0}]}",
    )
    .map_err(|e| e.to_string())?;
    serde_yaml::to_string(&v).map_err(|e| e.to_string())
}

#[test]
fn body_limit_overflow_and_services_down_are_json_with_the_request_id() {
    let mut stack = start(StackOptions {
        envoy_transform: Some(buffer_limit_and_model_cluster_overflow),
        ..Default::default()
    });
    let port = stack.envoy_port;
    let (_, key) = stack.create_key("acme", None).unwrap();

    let body = format!(
        r#"{{"model":"llama3.1:8b","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(2 * 1024 * 1024)
    );
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        bearer(&key),
        body.len()
    );
    let r = exchange(port, raw.as_bytes());
    let v = assert_json_error(
        "body over Envoy's buffer limit",
        &r,
        413,
        "request_too_large",
    );
    assert_eq!(v["error"]["message"], "the request body is too large");

    let r = exchange(port, &chat_request(port, &key, "connection: close\r\n"));
    assert_json_error("circuit breaker overflow", &r, 503, "upstream_unavailable");

    stack.ratelimit.kill();
    let r = exchange(port, &chat_request(port, &key, "connection: close\r\n"));
    assert_json_error("rate limiter down", &r, 503, "ratelimit_unavailable");

    stack.kill_authz();
    let r = exchange(port, &chat_request(port, &key, "connection: close\r\n"));
    assert_json_error("authz down", &r, 503, "authz_unavailable");
    assert!(stack.mock_requests().unwrap().is_empty());
}

// ---- timeouts ----

fn short_stream_idle_timeout(yaml: &str) -> Result<String, String> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["stream_idle_timeout"] = serde_yaml::Value::String("1s".into());
    serde_yaml::to_string(&v).map_err(|e| e.to_string())
}

#[test]
fn a_request_or_model_server_that_goes_silent_gets_json_with_the_request_id() {
    // A model server that never answers: the kernel completes Envoy's connections into the
    // listen backlog, and nothing ever reads or writes them.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let stack = start(StackOptions {
        model: Some(("127.0.0.1".into(), silent_port)),
        envoy_transform: Some(short_stream_idle_timeout),
        ..Default::default()
    });
    let port = stack.envoy_port;
    let (_, key) = stack.create_key("acme", None).unwrap();

    // The body never completes: 408 once the stream has been idle.
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\"",
        bearer(&key)
    );
    let r = exchange(port, raw.as_bytes());
    assert_json_error("incomplete request", &r, 408, "request_timeout");

    // A complete request the model server never answers: 504.
    let r = exchange(port, &chat_request(port, &key, "connection: close\r\n"));
    assert_json_error("silent model server", &r, 504, "upstream_timeout");
    drop(stack);
    drop(silent);
}

// ---- the routing example ----

struct Mock {
    _proc: Proc,
    port: u16,
}

fn mock(dir: &std::path::Path, name: &str, models: &str) -> Mock {
    let mut cmd = std::process::Command::new(paths::binary("mock-model-server"));
    cmd.args(["--listen", "127.0.0.1:0", "--models", models]);
    let mut proc = Proc::spawn(name, cmd, dir).unwrap();
    let addr = proc
        .wait_for_line("LISTENING ", Duration::from_secs(20))
        .unwrap();
    let port = addr.rsplit(':').next().unwrap().trim().parse().unwrap();
    Mock { _proc: proc, port }
}

/// The routing example without its backend routes: only the catch-all is left.
fn only_the_catch_all_route(yaml: &str) -> Result<String, String> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    let routes = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        .as_sequence_mut()
        .ok_or("no routes")?;
    routes.retain(|r| r.get("direct_response").is_some());
    if routes.len() != 1 {
        return Err(format!(
            "expected one catch-all route, found {}",
            routes.len()
        ));
    }
    serde_yaml::to_string(&v).map_err(|e| e.to_string())
}

#[test]
fn the_routing_example_answers_protocol_errors_and_unrouted_requests_in_json() {
    let dir = tollgate_e2e::process::temp_dir("envoy-replies-routing");
    let local = mock(&dir, "ollama", "llama3.1:8b,qwen2:0.5b");
    let hosted = mock(&dir, "hosted", "gpt-4o-mini");
    let host = |m: &Mock| ("127.0.0.1".to_string(), m.port);
    let spec = RoutingSpec {
        ollama_a: host(&local),
        ollama_b: host(&local),
        hosted: host(&hosted),
        hosted_tls: false,
        hosted_key_env: "TOLLGATE_E2E_REPLIES_HOSTED_KEY".into(),
        health_interval_ms: 300,
        discovery_interval_ms: 500,
    };
    let stack = start(StackOptions {
        model: Some(host(&local)),
        filter_config: spec.filter_config(),
        routing: Some(spec),
        envoy_env: vec![("TOLLGATE_E2E_REPLIES_HOSTED_KEY".into(), "sk-test".into())],
        envoy_transform: Some(only_the_catch_all_route),
        ..Default::default()
    });
    let port = stack.envoy_port;
    let r = exchange(port, b"GET /api/pull%00 HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_json_error("routed: NUL in the path", &r, 400, "invalid_path");
    let r = exchange(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_json_error("routed: CL with TE", &r, 400, "bad_request");
    let r = exchange(
        port,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
    );
    assert_json_error("routed: upgrade", &r, 403, "upgrade_not_supported");
    // A request the filter let through to a backend whose route is gone ends in the example's
    // catch-all direct 404: the JSON error with the request id, and no model server saw it.
    let (_, key) = stack.create_key("acme", None).unwrap();
    // The filter first learns which models each backend serves (discovery).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = exchange(port, &chat_request(port, &key, "connection: close\r\n"));
        if r.header("x-tollgate-error") != Some("models_unavailable")
            || std::time::Instant::now() > deadline
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_json_error("routed: catch-all", &r, 404, "not_found");
    for m in [&local, &hosted] {
        let seen = tollgate_e2e::http::get(m.port, "/__mock/requests", &[]).unwrap();
        let posts = seen
            .json()
            .as_array()
            .map_or(0, |a| a.iter().filter(|r| r["method"] == "POST").count());
        assert_eq!(posts, 0, "{}", seen.text());
    }
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
}
