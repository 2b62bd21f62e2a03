//! The RLS over gRPC, with envoy-types' tonic client: in process on the memory store, and
//! the `tollgate-ratelimit` binary with `--config` and `--redis-url` (reload, Redis
//! outage → UNAVAILABLE, recovery).
// Test helpers outside #[test] functions (the shared `support` launchers) may panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Redis, TempDir};
use tollgate_ratelimit::config_watch::SharedConfig;
use tollgate_ratelimit::counter_store::MemoryStore;
use tollgate_ratelimit::descriptor_config::Config;
use tollgate_ratelimit::rls_service::RlsService;
use tonic::transport::Channel;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

fn entry(k: &str, v: &str) -> Entry {
    Entry {
        key: k.into(),
        value: v.into(),
    }
}

fn request(entries: Vec<Entry>, rpm_override: Option<u32>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "tollgate".into(),
        descriptors: vec![RateLimitDescriptor {
            entries,
            limit: rpm_override.map(|n| RateLimitOverride {
                requests_per_unit: n,
                unit: 2, // MINUTE
            }),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

async fn call(
    c: &mut RateLimitServiceClient<Channel>,
    req: &RateLimitRequest,
) -> Result<RateLimitResponse, tonic::Status> {
    c.should_rate_limit(req.clone())
        .await
        .map(|r| r.into_inner())
}

async fn codes(
    c: &mut RateLimitServiceClient<Channel>,
    req: &RateLimitRequest,
    n: usize,
) -> Vec<i32> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(call(c, req).await.expect("decision").overall_code);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ok_then_over_limit_with_json_body_and_headers() {
    let config = Config::from_yaml(
        "domain: tollgate\ndescriptors:\n  - key: tenant_id\n    rate_limit: {unit: minute, requests_per_unit: 1, name: tenant_rpm}\n",
    )
    .unwrap();
    let service = RlsService::new(
        Arc::new(MemoryStore::new()),
        Arc::new(SharedConfig::new(config)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut c = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // Per-key override from Envoy (authz metadata): 2 per minute.
    let req = request(
        vec![entry("key_id", "k1"), entry("request_id", "req-42")],
        Some(2),
    );
    let r = call(&mut c, &req).await.unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), Some("30s"));
    assert_eq!(header(&r, "retry-after"), None);
    assert!(r.raw_body.is_empty());
    assert_eq!(r.statuses[0].limit_remaining, 1);
    assert_eq!(call(&mut c, &req).await.unwrap().overall_code, OK);

    let r = call(&mut c, &req).await.unwrap();
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].code, OVER);
    assert_eq!(header(&r, "retry-after"), Some("30"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(header(&r, "x-tollgate-error"), Some("rate_limited"));
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), Some("0"));
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["request_id"], "req-42");
    assert!(body["error"]["message"].as_str().unwrap().contains("30s"));

    // Another request id is the same counter.
    let other_rid = request(
        vec![entry("key_id", "k1"), entry("request_id", "req-43")],
        Some(2),
    );
    assert_eq!(call(&mut c, &other_rid).await.unwrap().overall_code, OVER);

    // A file limit, reported with its name.
    let tenant = request(vec![entry("tenant_id", "t1")], None);
    let r = call(&mut c, &tenant).await.unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "tenant_rpm"
    );
    assert_eq!(call(&mut c, &tenant).await.unwrap().overall_code, OVER);
    server.abort();
}

/// The service binary as a child process, killed when dropped.
struct Rls {
    child: Child,
    port: u16,
}

impl Drop for Rls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_rls(args: &[&str]) -> Result<Rls, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-ratelimit"))
        .args(["--listen", "127.0.0.1:0", "--reload-ms", "50"])
        // Tests run binaries in parallel: not the fixed default HTTP port.
        .args(["--http-listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    // Logs go to stderr: collected to explain an exit.
    let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("LISTENING ") {
                let _ = tx.send(Ok(addr.to_string()));
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = tx.send(Err(seen));
    });
    let mut rls = Rls { child, port: 0 };
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(addr)) => {
            rls.port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or(addr)?;
            Ok(rls)
        }
        Ok(Err(output)) => {
            let status = rls.child.wait();
            let logs = logs.join().unwrap_or_default();
            Err(format!("exited: {status:?}\n{output}{logs}"))
        }
        Err(_) => Err("no LISTENING line".into()),
    }
}

fn limits(rpm: u32) -> String {
    format!(
        "domain: tollgate\ndescriptors:\n  - key: key_id\n    rate_limit: {{unit: minute, requests_per_unit: {rpm}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_config_and_redis_reloads_fails_closed_and_recovers() {
    let dir = TempDir::new("binary");
    let file = dir.0.join("limits.yaml");
    std::fs::write(&file, limits(2)).unwrap();
    let mut redis = Redis::start_in(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let rls = start_rls(&[
        "--config",
        file.to_str().unwrap(),
        "--redis-url",
        &redis.url(),
    ])
    .unwrap();
    let mut c = RateLimitServiceClient::connect(format!("http://127.0.0.1:{}", rls.port))
        .await
        .unwrap();
    let req = request(vec![entry("key_id", "k1")], None);
    assert_eq!(codes(&mut c, &req, 3).await, vec![OK, OK, OVER]);

    // Edit the file: the new limit applies without a restart (a new limit is a new counter).
    std::fs::write(&file, limits(4)).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&mut c, &req).await.unwrap();
        if r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
            == Some(4)
        {
            break;
        }
        assert!(Instant::now() < until, "reload not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(codes(&mut c, &req, 4).await, vec![OK, OK, OK, OVER]);

    // Redis down: UNAVAILABLE (Envoy denies), never OK.
    redis.stop_server();
    for _ in 0..3 {
        let t = Instant::now();
        let e = call(&mut c, &req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    // Back on the same port: decisions succeed again without restarting the service.
    redis.restart().unwrap_or_else(|e| panic!("{e}"));
    let until = Instant::now() + Duration::from_secs(10);
    let fresh = request(vec![entry("key_id", "k2")], None);
    loop {
        match call(&mut c, &fresh).await {
            Ok(r) => {
                assert_eq!(r.overall_code, OK);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < until, "no recovery: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(rls);
}

#[test]
fn binary_refuses_to_start_on_a_bad_config() {
    let dir = TempDir::new("badstart");
    let file = dir.0.join("limits.yaml");
    std::fs::write(
        &file,
        "domain: tollgate\ndescriptors: [{key: k, rate_limit: {unit: eon}}]\n",
    )
    .unwrap();
    let err = start_rls(&["--config", file.to_str().unwrap()])
        .err()
        .expect("must not start");
    assert!(err.contains("invalid rate limit unit 'eon'"), "{err}");
    for url in [
        "http://nope",
        "redis://127.0.0.1:99999",
        "rediss://127.0.0.1:6379",
    ] {
        let err = start_rls(&["--redis-url", url])
            .err()
            .expect("must not start");
        assert!(err.contains("invalid redis url"), "{url}: {err}");
    }
}
