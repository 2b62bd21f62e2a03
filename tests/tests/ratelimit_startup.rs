//! tollgate-ratelimit started while Redis is down: alive at once (the HTTP side port answers
//! /healthz, so a liveness probe does not kill it), not ready (/readyz 503, grpc.health.v1
//! NOT_SERVING), and admitting nothing (every ShouldRateLimit is UNAVAILABLE) until Redis
//! answers; then ready and deciding, with no restart. A real Envoy health-checks it with the
//! production template's `tollgate_ratelimit` cluster (grpc.health.v1) all along. The same
//! while the budget ledger's database is down at start-up.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::http;
use tollgate_e2e::paths;
use tollgate_e2e::postgres::Postgres;
use tollgate_e2e::process::{free_port, Proc};
use tollgate_e2e::redis::Redis;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// One request a minute for key `k1`, as Envoy sends it with tollgate-authz's override.
fn one_per_minute() -> RateLimitRequest {
    RateLimitRequest {
        domain: "tollgate".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "key_id".into(),
                value: "k1".into(),
            }],
            limit: Some(RateLimitOverride {
                requests_per_unit: 1,
                unit: 2, // MINUTE
            }),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

async fn health(channel: &Channel, service: &str) -> Result<i32, tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Both names the service reports under (the server's, the RLS's) say `expected`.
async fn assert_health(channel: &Channel, expected: ServingStatus) {
    for service in ["", RLS_SERVICE] {
        assert_eq!(
            health(channel, service).await.map_err(|s| s.code()),
            Ok(expected as i32),
            "grpc.health.v1 {service:?}"
        );
    }
}

async fn decide(channel: &Channel) -> Result<i32, tonic::Status> {
    RateLimitServiceClient::new(channel.clone())
        .should_rate_limit(one_per_minute())
        .await
        .map(|r| r.into_inner().overall_code)
}

fn status(port: u16, path: &str) -> Result<u16, String> {
    http::get(port, path, &[]).map(|r| r.status)
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tollgate-rls-startup-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// tollgate-ratelimit with gRPC on `grpc_port`; returns it and its HTTP port, printed
/// before anything is awaited.
fn spawn_rls(dir: &std::path::Path, grpc_port: u16, args: &[&str]) -> (Proc, u16) {
    let mut cmd = Command::new(paths::binary("tollgate-ratelimit"));
    cmd.args(["--listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("TOLLGATE_PROFILE")
        .env("RUST_LOG", "info");
    let mut rls = Proc::spawn("tollgate-ratelimit", cmd, dir).unwrap_or_else(|e| panic!("{e}"));
    let http_addr = rls
        .wait_for_line("HTTP ", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    let http_port = http_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("HTTP {http_addr}"));
    (rls, http_port)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn connect(grpc_port: u16) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("gRPC port {grpc_port} never accepted: {e}"),
        }
    }
}

/// Until `ready_by` passes: alive, not ready, NOT_SERVING, every decision UNAVAILABLE.
/// Returns how many decisions were refused.
fn assert_alive_unready_and_refusing(
    rls: &mut Proc,
    http_port: u16,
    rt: &tokio::runtime::Runtime,
    channel: &Channel,
    ready_by: Instant,
) -> usize {
    let mut refused = 0;
    while Instant::now() < ready_by {
        assert!(rls.alive(), "{}", rls.failure("exited while waiting"));
        assert_eq!(status(http_port, "/healthz"), Ok(200), "liveness");
        assert_eq!(status(http_port, "/readyz"), Ok(503), "readiness");
        rt.block_on(async {
            assert_health(channel, ServingStatus::NotServing).await;
            let e = decide(channel)
                .await
                .expect_err("no decision before the backends answer");
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        });
        refused += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !rls.log_text().contains("LISTENING"),
        "LISTENING means deciding: {}",
        rls.log_text()
    );
    refused
}

/// Ready within 10 s, then SERVING and deciding (one request a minute: OK, then over).
fn assert_ready_and_deciding(
    rls: &mut Proc,
    http_port: u16,
    rt: &tokio::runtime::Runtime,
    channel: &Channel,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(http_port, "/readyz") != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "{}",
            rls.failure("not ready after its backends came up")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rls.wait_for_line("LISTENING ", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status(http_port, "/healthz"), Ok(200));
    rt.block_on(async {
        assert_health(channel, ServingStatus::Serving).await;
        // The refusals consumed nothing: the one request of the minute is still there.
        assert_eq!(decide(channel).await.ok(), Some(Code::Ok as i32));
        assert_eq!(decide(channel).await.ok(), Some(Code::OverLimit as i32));
    });
}

/// The `tollgate_ratelimit` cluster of envoy/envoy.production.yaml.tmpl, its health check
/// included, pointed at `127.0.0.1:grpc_port` (the other placeholders do not matter here).
fn production_ratelimit_cluster(grpc_port: u16) -> serde_yaml::Value {
    let path = paths::workspace_root().join("envoy/envoy.production.yaml.tmpl");
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace("{{RLS_HOST}}", "127.0.0.1")
        .replace("{{RLS_PORT}}", &grpc_port.to_string());
    while let Some(start) = text.find("{{") {
        let len = text[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("unclosed placeholder"));
        text.replace_range(start..start + len + 2, "1");
    }
    let config: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("production template: {e}"));
    config["static_resources"]["clusters"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "tollgate_ratelimit")
        .cloned()
        .unwrap_or_else(|| panic!("no tollgate_ratelimit cluster in the production template"))
}

/// Envoy with nothing but that cluster and its admin API on `admin_port`.
fn start_envoy(dir: &std::path::Path, grpc_port: u16, admin_port: u16) -> Proc {
    let bootstrap = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}\n\
         static_resources:\n  clusters:\n  - {}\n",
        serde_json::to_string(&production_ratelimit_cluster(grpc_port))
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, bootstrap).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(paths::envoy());
    cmd.arg("-c").arg(&config).args([
        "--disable-hot-restart",
        "-l",
        "warning",
        "--concurrency",
        "1",
    ]);
    Proc::spawn("envoy", cmd, dir).unwrap_or_else(|e| panic!("{e}"))
}

/// Envoy's view of the one ratelimit host: `(health_flags, failed health checks)`, once the
/// admin API answers.
fn envoy_view(admin_port: u16) -> Option<(String, u64)> {
    let clusters = http::get(admin_port, "/clusters", &[]).ok()?.text();
    let flags = clusters
        .lines()
        .find_map(|l| l.split_once("::health_flags::"))
        .map(|(_, f)| f.trim().to_string())?;
    let stats = http::get(
        admin_port,
        "/stats?filter=^cluster\\.tollgate_ratelimit\\.health_check\\.failure$",
        &[],
    )
    .ok()?
    .text();
    let failures = stats
        .lines()
        .find_map(|l| l.strip_prefix("cluster.tollgate_ratelimit.health_check.failure: "))
        .and_then(|n| n.trim().parse().ok())?;
    Some((flags, failures))
}

#[test]
fn ratelimit_started_during_a_redis_outage_is_alive_not_ready_and_admits_nothing_until_redis_answers(
) {
    let mut redis = Redis::start().unwrap_or_else(|e| panic!("redis: {e}"));
    redis.stop_server();
    let dir = temp_dir("redis");
    let grpc_port = free_port();
    // As deployed: counters in Redis or nothing.
    let (mut rls, http_port) = spawn_rls(
        &dir,
        grpc_port,
        &["--redis-url", &redis.url(), "--profile", "foundation"],
    );
    let admin_port = free_port();
    let mut envoy = start_envoy(&dir, grpc_port, admin_port);
    let rt = runtime();
    let channel = rt.block_on(connect(grpc_port));

    // Several of the service's one-second Redis retries: alive all along, never ready,
    // nothing admitted.
    let refused = assert_alive_unready_and_refusing(
        &mut rls,
        http_port,
        &rt,
        &channel,
        Instant::now() + Duration::from_secs(3),
    );
    let metrics = http::get(http_port, "/metrics", &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        metrics.text().contains(&format!(
            "tollgate_ratelimit_decisions_total{{result=\"unavailable\"}} {refused}"
        )),
        "every refusal is counted as unavailable:\n{}",
        metrics.text()
    );

    // Envoy's grpc.health.v1 check of the production cluster fails (NOT_SERVING): the host
    // is out of rotation.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match envoy_view(admin_port) {
            Some((flags, failures)) if failures > 0 => {
                assert!(flags.contains("failed_active_hc"), "{flags}");
                break;
            }
            view => assert!(
                Instant::now() < deadline,
                "Envoy never failed a health check while Redis was down: {view:?}; {}",
                envoy.failure("")
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Redis comes up: ready within a few seconds, on the same process.
    redis.start_server().unwrap_or_else(|e| panic!("{e}"));
    assert_ready_and_deciding(&mut rls, http_port, &rt, &channel);
    // And Envoy puts the host back at its next check (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view = envoy_view(admin_port);
        if view.as_ref().is_some_and(|(flags, _)| flags == "healthy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy's health check did not pass once ready: {view:?}; {}",
            envoy.failure("")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    envoy.kill();
    rls.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ratelimit_started_during_a_ledger_database_outage_waits_for_it_alive_unready_and_refusing() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("postgres: {e}"));
    pg.stop_server();
    let dir = temp_dir("ledger");
    let grpc_port = free_port();
    let buffer = dir.join("ledger-buffer");
    let url = pg.url();
    // In-memory counters (ready at once): only the ledger database is awaited.
    let (mut rls, http_port) = spawn_rls(
        &dir,
        grpc_port,
        &[
            "--ledger-url",
            &url,
            "--ledger-buffer",
            buffer.to_str().unwrap_or_else(|| panic!("path")),
        ],
    );
    let rt = runtime();
    let channel = rt.block_on(connect(grpc_port));
    assert_alive_unready_and_refusing(
        &mut rls,
        http_port,
        &rt,
        &channel,
        Instant::now() + Duration::from_secs(3),
    );
    assert_eq!(
        status(http_port, "/ledger/drift"),
        Ok(503),
        "no drift report before the ledger is connected"
    );
    assert!(
        rls.log_text()
            .contains("ledger database unreachable at start-up"),
        "{}",
        rls.log_text()
    );

    pg.start_server().unwrap_or_else(|e| panic!("{e}"));
    assert_ready_and_deciding(&mut rls, http_port, &rt, &channel);
    assert_eq!(status(http_port, "/ledger/drift"), Ok(200));
    assert!(buffer.join("buffer.jsonl").is_file(), "the buffer is open");
    rls.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
