//! Model routing through real Envoy with three mock model servers (two Ollama-kind, one
//! OpenAI-kind) and the routing example of docs/CONFIGURATION.md (tests/src/routing_config.rs):
//! aliases, routing by model, allowlists on aliases, a spoofed routing header, a host going
//! down (health checks, retries, fallback), both going down, and no retry once a stream began.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::process::Proc;
use tollgate_e2e::routing_config::RoutingSpec;
use tollgate_e2e::stack::{Stack, StackOptions};

const HOSTED_KEY_ENV: &str = "TOLLGATE_E2E_HOSTED_KEY";
const HOSTED_KEY: &str = "sk-hosted-e2e-0123456789";

struct Mock {
    proc: Proc,
    port: u16,
}

impl Mock {
    fn start(dir: &std::path::Path, name: &str, models: &str) -> Mock {
        let mut cmd = Command::new(paths::binary("mock-model-server"));
        cmd.args(["--listen", "127.0.0.1:0", "--models", models]);
        let mut proc = Proc::spawn(name, cmd, dir).unwrap();
        let addr = proc
            .wait_for_line("LISTENING ", Duration::from_secs(20))
            .unwrap();
        let port = addr.rsplit(':').next().unwrap().trim().parse().unwrap();
        Mock { proc, port }
    }

    fn requests(&self) -> Vec<Value> {
        match http::get(self.port, "/__mock/requests", &[])
            .unwrap()
            .json()
        {
            Value::Array(a) => a,
            other => panic!("mock requests: {other}"),
        }
    }

    /// Recorded requests other than health checks and model discovery.
    fn model_requests(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["method"] == "POST")
            .collect()
    }
}

struct Routed {
    stack: Stack,
    a: Mock,
    b: Mock,
    c: Mock,
    key: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn start() -> Routed {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-routing-{}-{}",
        std::process::id(),
        tollgate_e2e::process::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let a = Mock::start(&dir, "ollama-a", "llama3.1:8b,qwen2:0.5b");
    let b = Mock::start(&dir, "ollama-b", "llama3.1:8b,qwen2:0.5b");
    let c = Mock::start(&dir, "hosted", "gpt-4o-mini");
    let host = |m: &Mock| ("127.0.0.1".to_string(), m.port);
    let spec = RoutingSpec {
        ollama_a: host(&a),
        ollama_b: host(&b),
        hosted: host(&c),
        hosted_tls: false,
        hosted_key_env: HOSTED_KEY_ENV.into(),
        health_interval_ms: 300,
        discovery_interval_ms: 500,
    };
    let stack = Stack::start(StackOptions {
        model: Some(host(&a)),
        filter_config: spec.filter_config(),
        routing: Some(spec),
        envoy_env: vec![(HOSTED_KEY_ENV.into(), HOSTED_KEY.into())],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("stack did not start: {e}"));
    let (_, key) = stack.create_key("acme", None).unwrap();
    stack
        .admin(&[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--models",
            "chat-default,chat-hosted,llama3*,qwen2*,gpt-4o-mini",
            "--operations",
            "*",
        ])
        .unwrap();
    let r = Routed {
        stack,
        a,
        b,
        c,
        key,
        _dir: TempDir(dir),
    };
    r.wait_discovered();
    r
}

impl Routed {
    fn auth(&self) -> String {
        format!("Bearer {}", self.key)
    }

    fn chat(&self, model: &str, extra: &[(&str, &str)]) -> http::Response {
        let auth = self.auth();
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        http::request(
            self.stack.envoy_port,
            "POST",
            "/v1/chat/completions",
            &headers,
            body.as_bytes(),
        )
        .unwrap()
    }

    /// Until every backend's models are known to the filter (a listing shows them all).
    fn wait_discovered(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let auth = self.auth();
            let r = http::get(
                self.stack.envoy_port,
                "/v1/models",
                &[("authorization", &auth)],
            )
            .unwrap();
            let n = r.json()["data"].as_array().map_or(0, Vec::len);
            if n >= 5 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "discovery incomplete: {}\n{}\nmock a saw {:?}",
                r.text(),
                self.stack.logs(),
                self.a
                    .requests()
                    .iter()
                    .map(|q| q["path"].to_string())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Envoy's view of a cluster's hosts: (address, healthy).
    fn hosts(&self, cluster: &str) -> Vec<(String, bool)> {
        let text = http::get(self.stack.admin_port, "/clusters?format=json", &[])
            .unwrap()
            .json();
        let mut out = Vec::new();
        for c in text["cluster_statuses"].as_array().into_iter().flatten() {
            if c["name"] != cluster {
                continue;
            }
            for h in c["host_statuses"].as_array().into_iter().flatten() {
                let addr = h["address"]["socket_address"]["port_value"].to_string();
                let status = &h["health_status"];
                let healthy = status["failed_active_health_check"] != true
                    && status["failed_outlier_check"] != true
                    && status["eds_health_status"] == "HEALTHY";
                out.push((addr, healthy));
            }
        }
        out
    }

    fn wait_unhealthy(&self, cluster: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .hosts(cluster)
            .iter()
            .any(|(p, healthy)| *p == port.to_string() && *healthy)
        {
            assert!(
                Instant::now() < deadline,
                "{cluster}: {port} still healthy: {}",
                http::get(self.stack.admin_port, "/clusters?format=json", &[])
                    .unwrap()
                    .text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stat(&self, name: &str) -> u64 {
        let text = http::get(self.stack.admin_port, "/stats", &[])
            .unwrap()
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn python(r: &Routed, script: &str) -> Value {
    let port = r.stack.envoy_port;
    let out = Command::new(paths::python())
        .arg(paths::workspace_root().join("tests/clients").join(script))
        .env("TOLLGATE_URL", format!("http://127.0.0.1:{port}"))
        .env("TOLLGATE_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("TOLLGATE_API_KEY", &r.key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.stack.logs()
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn models_sent(m: &Mock) -> Vec<String> {
    m.model_requests()
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_str(r["body"].as_str().unwrap_or("")).unwrap();
            format!(
                "{} {}",
                r["path"].as_str().unwrap(),
                body["model"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn models_and_aliases_route_to_their_backends_for_real_clients() {
    let r = start();
    let v = python(&r, "routing_clients.py");
    assert_eq!(
        v["models"],
        serde_json::json!([
            "chat-default",
            "chat-hosted",
            "gpt-4o-mini",
            "llama3.1:8b",
            "qwen2:0.5b"
        ]),
        "the union of backends and aliases, minus chat-small which the key may not use: {v}"
    );
    assert_eq!(v["ollama_list"], v["models"], "{v}");
    for model in ["chat-default", "chat-hosted", "llama3.1:8b", "qwen2:0.5b"] {
        let got = &v[model];
        assert!(
            got["content"].as_str().is_some_and(|c| !c.is_empty()),
            "{model}: {v}"
        );
        assert_eq!(got["stream"], got["content"], "{model}: {v}");
    }
    assert_eq!(v["chat-default"]["model"], "llama3.1:8b");
    assert_eq!(v["chat-hosted"]["model"], "gpt-4o-mini");
    assert_eq!(v["chat-small"]["status"], 403, "{v}");
    assert_eq!(v["chat-small"]["code"], "model_not_allowed", "{v}");
    assert!(v["ollama_chat"]["eval_count"].as_u64().unwrap() > 0, "{v}");

    // Each model reached only its backend, under the upstream's name and API.
    let hosted = models_sent(&r.c);
    assert_eq!(
        hosted,
        vec!["/v1/chat/completions gpt-4o-mini"; 2],
        "chat-hosted twice (plain, stream); nothing else reached the hosted provider"
    );
    let local: Vec<String> = [models_sent(&r.a), models_sent(&r.b)].concat();
    let count = |m: &str| local.iter().filter(|s| s.as_str() == m).count();
    assert_eq!(count("/api/chat llama3.1:8b"), 5, "{local:?}");
    assert_eq!(count("/api/chat qwen2:0.5b"), 2, "{local:?}");
    assert_eq!(local.len(), 7, "{local:?}");
    // qwen2 goes to `primary` (host a) while it is healthy.
    assert_eq!(
        models_sent(&r.b)
            .iter()
            .filter(|s| s.contains("qwen2"))
            .count(),
        0
    );
    // Only the hosted provider gets a credential, and it is the gateway's, not the client's.
    for req in r.c.model_requests() {
        assert_eq!(
            req["headers"]["authorization"],
            format!("Bearer {HOSTED_KEY}")
        );
        assert!(req["headers"].get("x-tollgate-backend").is_none(), "{req}");
    }
    for req in [r.a.model_requests(), r.b.model_requests()].concat() {
        assert!(req["headers"].get("authorization").is_none(), "{req}");
        assert!(req["headers"].get("x-tollgate-backend").is_none(), "{req}");
    }
}

#[test]
fn a_spoofed_routing_header_never_picks_a_backend_and_refusals_are_json() {
    let r = start();
    let spoof = [("x-tollgate-backend", "hosted")];
    let resp = r.chat("llama3.1:8b", &spoof);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = r.chat("chat-small", &spoof);
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "model_not_allowed");
    let resp = r.chat("llama3.3:70b", &spoof);
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "model_not_found");
    assert!(resp.json()["error"]["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(
        r.c.model_requests().is_empty(),
        "the spoofed header reached the hosted provider"
    );
    // Without a key nothing is routed at all.
    let resp = http::request(
        r.stack.envoy_port,
        "POST",
        "/v1/chat/completions",
        &[("x-tollgate-backend", "hosted")],
        br#"{"model":"gpt-4o-mini","messages":[]}"#,
    )
    .unwrap();
    assert_eq!(resp.status, 401, "{}", resp.text());
    // A path without a model goes to the default backend.
    let auth = r.auth();
    let resp = http::get(
        r.stack.envoy_port,
        "/api/version",
        &[("authorization", &auth)],
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(r.c.requests().iter().all(|q| q["path"] != "/api/version"));
}

#[test]
fn a_host_going_down_moves_traffic_and_both_down_gives_503_json() {
    let mut r = start();
    r.a.proc.kill();
    // New requests right after the kill, before any health check noticed: the pool retries
    // on its other host, `primary` (an aggregate cluster) retries on its fallback's priority.
    // Connection failures only, so no client sees an error.
    for i in 0..12 {
        let resp = r.chat("llama3.1:8b", &[]);
        assert_eq!(
            resp.status,
            200,
            "pool request {i}: {}\nhosts {:?}\n{}\n{}",
            resp.text(),
            r.hosts("ollama_pool"),
            http::get(r.stack.admin_port, "/stats?filter=ollama_pool", &[])
                .unwrap()
                .text(),
            r.stack.logs()
        );
        if i < 5 {
            let resp = r.chat("qwen2:0.5b", &[]);
            assert_eq!(resp.status, 200, "fallback request {i}: {}", resp.text());
        }
    }
    // And once the health check has marked host a down, without retries.
    r.wait_unhealthy("ollama_a", r.a.port);
    r.wait_unhealthy("ollama_pool", r.a.port);
    for i in 0..5 {
        let resp = r.chat("qwen2:0.5b", &[]);
        assert_eq!(resp.status, 200, "fallback request {i}: {}", resp.text());
    }
    let on_b = models_sent(&r.b);
    assert_eq!(
        on_b.iter().filter(|s| s.contains("qwen2")).count(),
        10,
        "{on_b:?}"
    );
    assert_eq!(on_b.iter().filter(|s| s.contains("llama3")).count(), 12);

    r.b.proc.kill();
    r.wait_unhealthy("ollama_b", r.b.port);
    for model in ["llama3.1:8b", "qwen2:0.5b", "chat-default"] {
        let resp = r.chat(model, &[]);
        assert_eq!(resp.status, 503, "{model}: {}", resp.text());
        let e = &resp.json()["error"];
        assert_eq!(e["code"], "upstream_unavailable", "{model}");
        assert!(e["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(
            !resp.text().contains("127.0.0.1"),
            "upstream address leaked"
        );
    }
    // The hosted backend is unaffected.
    assert_eq!(r.chat("gpt-4o-mini", &[]).status, 200);
}

/// Reads a raw HTTP/1.1 response until `needle` appears (or EOF); returns what was read.
fn read_until(s: &mut TcpStream, needle: &[u8], got: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        if got.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn a_stream_is_never_retried_after_its_first_byte() {
    let mut r = start();
    let marker = "stream-marker-7f3a";
    let body = format!(
        r#"{{"model":"llama3.1:8b","stream":true,"messages":[{{"role":"user","content":"{marker}"}}]}}"#
    );
    let mut s = TcpStream::connect(("127.0.0.1", r.stack.envoy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {}\r\n\
         content-type: application/json\r\nx-mock-chunks: 40\r\nx-mock-chunk-delay-ms: 100\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        r.auth(),
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    assert!(
        read_until(&mut s, b"data: {", &mut got),
        "no first chunk: {}",
        String::from_utf8_lossy(&got)
    );
    let has_marker = |m: &Mock| {
        m.model_requests()
            .iter()
            .any(|q| q["body"].as_str().is_some_and(|b| b.contains(marker)))
    };
    let (serving, other) = if has_marker(&r.a) {
        (&mut r.a, &r.b)
    } else {
        (&mut r.b, &r.a)
    };
    serving.proc.kill();
    let finished = read_until(&mut s, b"data: [DONE]", &mut got);
    assert!(
        !finished,
        "the stream cannot complete once its host died: {}",
        String::from_utf8_lossy(&got)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !has_marker(other),
        "the half-streamed request was sent again to the other host"
    );
    assert_eq!(r.stat("cluster.ollama_pool.upstream_rq_retry"), 0);
}

#[test]
fn the_documented_routing_example_is_current_and_passes_envoy_validate() {
    let root = paths::workspace_root();
    let text = std::fs::read_to_string(root.join("envoy/examples/routing.yaml")).unwrap();
    assert_eq!(
        text,
        tollgate_e2e::routing_config::render_example().unwrap(),
        "envoy/examples/routing.yaml is stale: run \
         `target/debug/tollgate-dev render-routing > envoy/examples/routing.yaml`"
    );
    // Validate mode loads the wasm and runs its configuration check; point it at the build.
    let local = text.replace(
        "/etc/tollgate/tollgate_filter.wasm",
        &paths::filter_wasm().display().to_string(),
    );
    let path = std::env::temp_dir().join(format!("tollgate-routing-{}.yaml", std::process::id()));
    std::fs::write(&path, local).unwrap();
    let out = Command::new(paths::envoy())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .env("OPENAI_API_KEY", "sk-validate")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "envoy --mode validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The docs show the example's routing pieces; they must be the file's.
    let doc = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
    let filter_config = tollgate_e2e::routing_config::RoutingSpec::example().filter_config();
    let shown: Value = doc
        .split("```json\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter_map(|b| serde_json::from_str::<Value>(b).ok())
        .find(|v| v.get("routing").is_some())
        .expect("docs/CONFIGURATION.md shows the routing filter configuration");
    assert_eq!(
        shown,
        serde_json::from_str::<Value>(&filter_config).unwrap()
    );
    assert!(doc.contains("envoy/examples/routing.yaml"));
}
